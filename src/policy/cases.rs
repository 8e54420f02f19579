//! Policy test cases kept beside the policies (`policies/tests/*.toml`), run
//! by `karibche policy test` like `opa test`: each case is a request and the
//! decision (and fields) it must get, so a policy edit that changes what an
//! agency may do fails a test before it reaches a gateway.
//!
//! ```toml
//! [[cases]]
//! name    = "border police reads a traveller's visas"
//! agency  = "mia-border"
//! purpose = "border-control"
//! method  = "GET"                          # default GET
//! path    = "/v1/registry/persons/123"
//! case    = "C-1"                          # optional case reference
//! date    = 2026-06-01                     # optional; default today (UTC)
//! expect  = "allow"                        # or "deny"
//! reason  = "purpose_not_allowed"          # optional, with deny
//! grant   = "mia-border#0"                 # optional, with allow
//! fields  = ["id", "names", "visas"]       # optional, with allow: exactly these
//! must_not_release = ["personal_number"]   # optional, with allow: none of these
//! shadow  = "deny"                         # optional: the expected shadow decision
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use time::Date;
use toml::Spanned;

use super::decide::{Decision, DecisionRequest};
use super::model::{Operation, Policy};
use super::source::{line_column, whole_file, PolicyErrors, Reporter};
use super::split_gateway_path;

/// The directory of test cases, relative to the policy directory.
pub const CASES_DIR: &str = "tests";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CasesFile {
    #[serde(default)]
    cases: Vec<Spanned<RawCase>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    agency: String,
    purpose: String,
    #[serde(default = "default_method")]
    method: String,
    path: String,
    case: Option<String>,
    date: Option<toml::value::Datetime>,
    expect: Expect,
    reason: Option<String>,
    grant: Option<String>,
    fields: Option<Vec<String>>,
    #[serde(default)]
    must_not_release: Vec<String>,
    shadow: Option<Expect>,
}

fn default_method() -> String {
    "GET".to_owned()
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Allow,
    Deny,
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expect::Allow => "allow",
            Expect::Deny => "deny",
        })
    }
}

/// A case whose request did not get what the case expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseFailure {
    /// The test file.
    pub file: PathBuf,
    /// 1-based line of the case.
    pub line: usize,
    /// The case's name.
    pub name: String,
    /// What differed.
    pub message: String,
}

impl fmt::Display for CaseFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: FAIL {}: {}",
            self.file.display(),
            self.line,
            self.name,
            self.message
        )
    }
}

/// The outcome of a test run.
#[derive(Debug, Clone, Default)]
pub struct CaseReport {
    /// Cases that got what they expect.
    pub passed: usize,
    /// Cases that did not.
    pub failures: Vec<CaseFailure>,
}

impl CaseReport {
    /// True when every case passed (and there was at least one).
    pub fn ok(&self) -> bool {
        self.failures.is_empty() && self.passed > 0
    }
}

/// Runs every case under `<dir>/tests/*.toml` against `policy`; malformed case files are errors.
pub fn run_cases(policy: &Policy, dir: &Path, today: Date) -> Result<CaseReport, PolicyErrors> {
    let cases_dir = dir.join(CASES_DIR);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&cases_dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "toml")
                    && !p
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with('.'))
            })
            .collect(),
        Err(e) => {
            return Err(PolicyErrors(vec![whole_file(
                &cases_dir,
                format!("cannot list: {e}"),
            )]))
        }
    };
    files.sort();
    let mut errors = Vec::new();
    let mut report = CaseReport::default();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                errors.push(whole_file(&file, format!("cannot read: {e}")));
                continue;
            }
        };
        let parsed = match toml::from_str::<CasesFile>(&text) {
            Ok(p) => p,
            Err(e) => {
                Reporter::new(&file, &text, &mut errors).toml_error(&e);
                continue;
            }
        };
        for case in parsed.cases {
            let (line, _) = line_column(&text, case.span().start);
            let case = case.into_inner();
            match run_one(policy, &case, today) {
                Ok(()) => report.passed += 1,
                Err(message) => report.failures.push(CaseFailure {
                    file: file.clone(),
                    line,
                    name: case.name.clone(),
                    message,
                }),
            }
        }
    }
    if errors.is_empty() {
        Ok(report)
    } else {
        Err(PolicyErrors(errors))
    }
}

fn run_one(policy: &Policy, case: &RawCase, today: Date) -> Result<(), String> {
    let method = http::Method::from_bytes(case.method.as_bytes())
        .map_err(|_| format!("method {:?} is not an HTTP method", case.method))?;
    let operation = Operation::from_method(&method)
        .ok_or_else(|| format!("method {method} is not forwarded by the gateway"))?;
    let (provider, service) = split_gateway_path(&case.path)
        .ok_or_else(|| format!("path {:?} is not /v1/{{provider}}/{{service}}/…", case.path))?;
    let date = match case.date {
        None => today,
        Some(dt) => dt
            .date
            .filter(|_| dt.time.is_none())
            .and_then(|d| {
                Date::from_calendar_date(
                    i32::from(d.year),
                    time::Month::try_from(d.month).ok()?,
                    d.day,
                )
                .ok()
            })
            .ok_or_else(|| format!("date {dt} must be a plain date YYYY-MM-DD"))?,
    };
    let req = DecisionRequest {
        agency: &case.agency,
        provider,
        service,
        operation,
        purpose: &case.purpose,
        case_ref: case.case.as_deref(),
    };
    let decision = policy.decide(&req, date);
    if let Some(refused) = identifying_lookup(policy, &decision, &case.path, provider, service) {
        // The gateway refuses it after the policy allowed it (src/policy/pseudonymity.rs).
        return match (case.expect, case.reason.as_deref()) {
            (Expect::Deny, None | Some(IDENTIFYING)) => Ok(()),
            _ => Err(format!(
                "expected {}, got deny ({IDENTIFYING}): {refused}",
                case.expect
            )),
        };
    }
    check_decision(&decision, case)?;
    if let Some(expected) = case.shadow {
        let shadow = policy
            .decide_shadow(&req, date)
            .ok_or("expected a shadow decision, but no shadow grant applies")?;
        let got = outcome(&shadow);
        if got != expected {
            return Err(format!(
                "shadow: expected {expected}, got {}",
                words(&shadow)
            ));
        }
    }
    Ok(())
}

/// The reason the gateway records for a lookup a pseudonymising grant does not serve.
const IDENTIFYING: &str = "identifying_lookup";

/// Why the gateway refuses a request the policy allowed under a pseudonymising grant, if it does.
fn identifying_lookup(
    policy: &Policy,
    decision: &Decision,
    path: &str,
    provider: &str,
    service: &str,
) -> Option<String> {
    let Decision::Allow(allow) = decision else {
        return None;
    };
    if !allow.transforms.pseudonymises() {
        return None;
    }
    let svc = policy.service(provider, service)?;
    let (path, query) = path
        .split_once('?')
        .map_or((path, None), |(p, q)| (p, Some(q)));
    let rest = path
        .strip_prefix(&format!("/v1/{provider}/{service}"))
        .unwrap_or_default();
    crate::policy::pseudonymity::check_lookup(svc, rest, query)
        .err()
        .map(|i| i.detail(provider, svc))
}

fn outcome(d: &Decision) -> Expect {
    match d {
        Decision::Allow(_) => Expect::Allow,
        Decision::Deny(_) => Expect::Deny,
    }
}

fn words(d: &Decision) -> String {
    match d {
        Decision::Allow(a) => format!("allow by {}", a.grant),
        Decision::Deny(r) => format!("deny ({})", r.code()),
    }
}

fn check_decision(decision: &Decision, case: &RawCase) -> Result<(), String> {
    if outcome(decision) != case.expect {
        return Err(format!(
            "expected {}{}, got {}",
            case.expect,
            case.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            words(decision)
        ));
    }
    match decision {
        Decision::Deny(reason) => {
            if let Some(want) = case.reason.as_deref().filter(|w| *w != reason.code()) {
                return Err(format!(
                    "expected deny ({want}), got deny ({})",
                    reason.code()
                ));
            }
        }
        Decision::Allow(allow) => {
            if let Some(want) = case.grant.as_deref().filter(|w| **w != *allow.grant) {
                return Err(format!(
                    "expected allow by {want}, got allow by {}",
                    allow.grant
                ));
            }
            if let Some(want) = &case.fields {
                let want = crate::policy::FieldSet::from_paths(want).paths();
                let got = allow.fields.paths();
                if want != got {
                    let extra: Vec<&str> = got
                        .iter()
                        .filter(|g| !want.contains(g))
                        .map(String::as_str)
                        .collect();
                    let missing: Vec<&str> = want
                        .iter()
                        .filter(|w| !got.contains(w))
                        .map(String::as_str)
                        .collect();
                    let mut parts = Vec::new();
                    if !extra.is_empty() {
                        parts.push(format!("released but not expected [{}]", extra.join(", ")));
                    }
                    if !missing.is_empty() {
                        parts.push(format!(
                            "expected but not released [{}]",
                            missing.join(", ")
                        ));
                    }
                    return Err(format!("fields differ: {}", parts.join("; ")));
                }
            }
            let leaked: Vec<&str> = case
                .must_not_release
                .iter()
                .filter(|f| allow.fields.overlaps(f))
                .map(String::as_str)
                .collect();
            if !leaked.is_empty() {
                return Err(format!(
                    "releases fields it must not: {}",
                    leaked.join(", ")
                ));
            }
        }
    }
    Ok(())
}
