//! The quota file, `policies/limits.toml`: what it may say and how it is checked.
//!
//! A rate and a burst per agency and per officer, defaults plus per-agency
//! overrides, and optional per-grant quotas keyed by agency, provider and
//! service. The file is validated against the policy (every agency and grant
//! it names must exist) and every problem is reported with its
//! `file:line:column`, the policy files' own way ([`crate::policy::Reporter`]).

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use governor::Quota;
use serde::Deserialize;
use toml::Spanned;

use crate::policy::{Policy, PolicyErrors, Reporter};

/// The quota file, relative to the policy directory.
pub const LIMITS_FILE: &str = "limits.toml";

/// A quota: `count` requests per `per`, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests admitted per period, sustained.
    pub count: u32,
    /// The period of `count`.
    pub per: Duration,
    /// Requests admitted at once after a quiet spell (the bucket's size).
    pub burst: u32,
}

impl Rate {
    /// The governor quota one replica of `replicas` enforces.
    pub fn quota(&self, replicas: u32) -> Quota {
        let replicas = replicas.max(1);
        // Each replica admits count/replicas per period: one request every per*replicas/count.
        let interval =
            (self.per.saturating_mul(replicas) / self.count.max(1)).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(self.burst.div_ceil(replicas)).unwrap_or(NonZeroU32::MIN);
        Quota::with_period(interval)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} burst {}",
            self.count,
            humantime::format_duration(self.per),
            self.burst
        )
    }
}

/// An agency's overrides; `None` takes the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgencyRates {
    /// All requests of the agency together.
    pub agency: Option<Rate>,
    /// Each officer of the agency.
    pub officer: Option<Rate>,
}

/// The validated content of `limits.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitSet {
    /// Default quota of each agency without an override; `None`: unlimited.
    pub agency: Option<Rate>,
    /// Default quota of each officer; `None`: unlimited.
    pub officer: Option<Rate>,
    /// Per-agency overrides, by agency id.
    pub agencies: BTreeMap<String, AgencyRates>,
    /// Per-grant quotas by (agency, provider, service).
    pub grants: BTreeMap<(String, String, String), Rate>,
}

/// One problem in `limits.toml`: the policy files' own error, `file:line:col: message`.
pub type LimitError = crate::policy::PolicyError;

/// Every problem found in `limits.toml`, one `file:line:col: message` per line.
pub type LimitErrors = crate::policy::PolicyErrors;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    defaults: RawPair,
    #[serde(default)]
    agencies: BTreeMap<Spanned<String>, Spanned<RawPair>>,
    #[serde(default)]
    grants: Vec<Spanned<RawGrant>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPair {
    agency: Option<Spanned<RawRate>>,
    officer: Option<Spanned<RawRate>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    rate: Spanned<String>,
    burst: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    agency: Spanned<String>,
    provider: Spanned<String>,
    service: Spanned<String>,
    rate: Spanned<String>,
    burst: Option<Spanned<i64>>,
}

/// The rate at `rate` with the burst at `burst` (default: one period's count), or `None` after reporting why not.
fn rate(
    r: &mut Reporter<'_>,
    rate: &Spanned<String>,
    burst: Option<&Spanned<i64>>,
) -> Option<Rate> {
    let parsed = parse_rate(rate.get_ref());
    if let Err(msg) = &parsed {
        r.at(rate.span(), msg.clone());
    }
    let burst = match burst {
        None => parsed.as_ref().ok().map(|r| r.0),
        Some(b) => match u32::try_from(*b.get_ref()) {
            Ok(n) if n >= 1 => Some(n),
            _ => {
                r.at(
                    b.span(),
                    "burst must be a whole number from 1 to 4294967295",
                );
                None
            }
        },
    };
    let (count, per) = parsed.ok()?;
    Some(Rate {
        count,
        per,
        burst: burst?,
    })
}

/// [`rate`] of an optional `{ rate, burst }` table.
fn raw_rate(r: &mut Reporter<'_>, raw: Option<&Spanned<RawRate>>) -> Option<Rate> {
    let raw = raw?.get_ref();
    rate(r, &raw.rate, raw.burst.as_ref())
}

/// `"100/s"`, `"6000/min"`, `"50000/h"`, `"200000/d"` → (count, period).
fn parse_rate(s: &str) -> Result<(u32, Duration), String> {
    let bad =
        || format!("rate {s:?} must look like \"100/s\", \"600/min\", \"5000/h\" or \"100000/d\"");
    let (n, unit) = s.split_once('/').ok_or_else(bad)?;
    let count: u32 = n.trim().parse().map_err(|_| bad())?;
    if count == 0 {
        return Err(format!(
            "rate {s:?} admits nothing; remove the quota or grant at least 1"
        ));
    }
    let per = match unit.trim() {
        "s" | "sec" | "second" => 1,
        "min" | "minute" => 60,
        "h" | "hour" => 3600,
        "d" | "day" => 86_400,
        _ => return Err(bad()),
    };
    Ok((count, Duration::from_secs(per)))
}

impl LimitSet {
    /// Reads `<dir>/limits.toml`; a missing file means no quotas (`Ok` with an empty set).
    pub fn load(dir: &Path, policy: &Policy) -> Result<LimitSet, LimitErrors> {
        let file = dir.join(LIMITS_FILE);
        match std::fs::read_to_string(&file) {
            Ok(text) => LimitSet::parse(&file, &text, policy),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LimitSet::default()),
            Err(e) => Err(PolicyErrors(vec![crate::policy::whole_file(
                &file,
                format!("cannot read: {e}"),
            )])),
        }
    }

    /// Parses and validates the text of a quota file named `file`, checking names against `policy`.
    pub fn parse(file: &Path, text: &str, policy: &Policy) -> Result<LimitSet, LimitErrors> {
        let mut errors = Vec::new();
        let mut r = Reporter::new(file, text, &mut errors);
        let raw: RawFile = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                r.toml_error(&e);
                return Err(PolicyErrors(errors));
            }
        };
        let mut set = LimitSet {
            agency: raw_rate(&mut r, raw.defaults.agency.as_ref()),
            officer: raw_rate(&mut r, raw.defaults.officer.as_ref()),
            ..LimitSet::default()
        };
        for (id, pair) in &raw.agencies {
            if policy.agency(id.get_ref()).is_none() {
                r.at(
                    id.span(),
                    format!("unknown agency {:?} (not in the policy)", id.get_ref()),
                );
            }
            let p = pair.get_ref();
            if p.agency.is_none() && p.officer.is_none() {
                r.at(pair.span(), "sets no quota: give `agency` and/or `officer`");
            }
            let rates = AgencyRates {
                agency: raw_rate(&mut r, p.agency.as_ref()),
                officer: raw_rate(&mut r, p.officer.as_ref()),
            };
            set.agencies.insert(id.get_ref().clone(), rates);
        }
        for g in &raw.grants {
            let g = g.get_ref();
            let (agency, provider, service) = (
                g.agency.get_ref(),
                g.provider.get_ref(),
                g.service.get_ref(),
            );
            match policy.agency(agency) {
                None => r.at(
                    g.agency.span(),
                    format!("unknown agency {agency:?} (not in the policy)"),
                ),
                Some(a)
                    if !a
                        .grants
                        .iter()
                        .any(|x| &x.provider == provider && &x.service == service) =>
                {
                    r.at(
                        g.provider.span(),
                        format!("agency {agency:?} has no grant for {provider}/{service}"),
                    )
                }
                Some(_) => {}
            }
            let key = (agency.clone(), provider.clone(), service.clone());
            if set.grants.contains_key(&key) {
                r.at(
                    g.agency.span(),
                    format!("a second quota for {agency} {provider}/{service}"),
                );
            }
            if let Some(rate) = rate(&mut r, &g.rate, g.burst.as_ref()) {
                set.grants.insert(key, rate);
            }
        }
        if errors.is_empty() {
            Ok(set)
        } else {
            errors.sort_by_key(|e| (e.line, e.column));
            Err(PolicyErrors(errors))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn policy() -> Policy {
        Policy::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap()
    }

    pub(crate) fn parse(text: &str) -> Result<LimitSet, LimitErrors> {
        LimitSet::parse(Path::new("limits.toml"), text, &policy())
    }

    pub(crate) fn set(text: &str) -> LimitSet {
        parse(text).unwrap()
    }

    #[test]
    fn the_repository_file_is_valid() {
        let set = LimitSet::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"),
            &policy(),
        )
        .unwrap();
        assert!(set.agency.is_some() && set.officer.is_some());
        assert!(set.agencies.contains_key("mia-border"));
        assert_eq!(set.grants.len(), 1);
        let missing = LimitSet::load(Path::new("/nonexistent"), &policy()).unwrap();
        assert_eq!(missing, LimitSet::default(), "no file, no quotas");
    }

    #[test]
    fn every_problem_is_reported_with_its_position() {
        let text = "[defaults]\nagency = { rate = \"10/fortnight\" }\nofficer = { rate = \"5/s\", burst = 0 }\n\n[agencies.mia-bordr]\nagency = { rate = \"1/s\" }\n\n[agencies.ssg]\n\n[[grants]]\nagency = \"geostat\"\nprovider = \"registry\"\nservice = \"visas\"\nrate = \"0/s\"\n";
        let errors = parse(text).unwrap_err();
        let shown = errors.to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 6, "{shown}");
        assert!(
            lines[0].starts_with("limits.toml:2:19: rate \"10/fortnight\""),
            "{shown}"
        );
        assert!(lines[1].starts_with("limits.toml:3:35: burst"), "{shown}");
        assert!(
            lines[2].starts_with("limits.toml:5:11: unknown agency \"mia-bordr\""),
            "{shown}"
        );
        assert!(shown.contains("sets no quota"), "{shown}");
        assert!(
            shown.contains("agency \"geostat\" has no grant for registry/visas"),
            "{shown}"
        );
        let unknown = parse("[defaults]\nagencies = {}\n").unwrap_err();
        assert!(
            unknown
                .to_string()
                .starts_with("limits.toml:2:1: unknown field `agencies`"),
            "{unknown}"
        );
    }
}
