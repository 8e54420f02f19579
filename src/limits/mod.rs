//! Rate limits: every agency, every officer and, optionally, every grant gets
//! its share of the gateway.
//!
//! Quotas live in `policies/limits.toml` ([`LimitSet::load`]): a rate and a
//! burst (GCRA, governor's limiters) per agency and per officer, defaults plus
//! per-agency overrides, and optional per-grant quotas keyed by agency,
//! provider and service. The file is validated against the policy (every
//! agency and grant it names must exist) and every problem is reported with
//! its `file:line:column`. [`Limits`] holds the limiter state; a reload
//! ([`Limits::reload`]) builds a new table but keeps the state of every
//! limiter whose quota did not change, so a reload never hands out a fresh
//! burst. Keyed limiters forget idle keys in [`Limits::forget_idle`], which
//! the server calls periodically, so memory stays bounded however many
//! officers pass.
//!
//! Several replicas share a quota by configuration: each enforces
//! `rate / replicas` with `ceil(burst / replicas)`.
//!
//! Over the limit a request gets 429 with `Retry-After`, `RateLimit-Policy`
//! and `RateLimit` ([`Exceeded::headers`]). A flood must not fill the audit
//! log, so [`RefusalLog`] records the first refusal per key (agency, officer,
//! provider, service) and window one by one and folds the rest of the window
//! into one summary record written when the window closes.
//!
//! [`ConnectionCaps`] bounds the connections one agency holds open at once.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::num::NonZeroU32;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use governor::clock::{Clock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::{HeaderName, HeaderValue};
use serde::Deserialize;
use toml::Spanned;

use crate::audit::Entry;
use crate::identity::PeerCert;
use crate::policy::Policy;

/// The quota file, relative to the policy directory.
pub const LIMITS_FILE: &str = "limits.toml";

/// The reason code of a request refused by a quota (audit log and metrics).
pub const RATE_LIMITED: &str = "rate_limited";

/// The reason code of a record standing for several refused requests.
pub const RATE_LIMITED_SUMMARY: &str = "rate_limited_summary";

// ---- quotas as written -------------------------------------------------------------------

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

struct Reporter<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<LimitError>,
}

impl Reporter<'_> {
    fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = crate::policy::line_column(self.text, span.start);
        self.errors.push(LimitError {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
        });
    }

    fn rate(&mut self, rate: &Spanned<String>, burst: Option<&Spanned<i64>>) -> Option<Rate> {
        let parsed = parse_rate(rate.get_ref());
        if let Err(msg) = &parsed {
            self.at(rate.span(), msg.clone());
        }
        let burst = match burst {
            None => parsed.as_ref().ok().map(|r| r.0),
            Some(b) => match u32::try_from(*b.get_ref()) {
                Ok(n) if n >= 1 => Some(n),
                _ => {
                    self.at(
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

    fn raw_rate(&mut self, r: Option<&Spanned<RawRate>>) -> Option<Rate> {
        let r = r?.get_ref();
        self.rate(&r.rate, r.burst.as_ref())
    }
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
            Err(e) => Err(crate::policy::PolicyErrors(vec![LimitError {
                file,
                line: 0,
                column: 0,
                message: format!("cannot read: {e}"),
            }])),
        }
    }

    /// Parses and validates the text of a quota file named `file`, checking names against `policy`.
    pub fn parse(file: &Path, text: &str, policy: &Policy) -> Result<LimitSet, LimitErrors> {
        let mut r = Reporter {
            file,
            text,
            errors: Vec::new(),
        };
        let raw: RawFile = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                r.at(e.span().unwrap_or(0..0), e.message().trim_end());
                return Err(crate::policy::PolicyErrors(r.errors));
            }
        };
        let mut set = LimitSet {
            agency: r.raw_rate(raw.defaults.agency.as_ref()),
            officer: r.raw_rate(raw.defaults.officer.as_ref()),
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
                agency: r.raw_rate(p.agency.as_ref()),
                officer: r.raw_rate(p.officer.as_ref()),
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
            if let Some(rate) = r.rate(&g.rate, g.burst.as_ref()) {
                set.grants.insert(key, rate);
            }
        }
        if r.errors.is_empty() {
            Ok(set)
        } else {
            r.errors.sort_by_key(|e| (e.line, e.column));
            Err(crate::policy::PolicyErrors(r.errors))
        }
    }
}

// ---- limiter state -----------------------------------------------------------------------

/// Which quota refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The agency's quota, shared by all its officers.
    Agency,
    /// One officer's quota.
    Officer,
    /// The quota of one grant (agency × provider × service).
    Grant,
}

impl Scope {
    /// The policy name shown in the `RateLimit` headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Agency => "agency",
            Scope::Officer => "officer",
            Scope::Grant => "grant",
        }
    }
}

/// A request over a quota: what the caller is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    /// The quota that refused.
    pub scope: Scope,
    /// Its burst: requests admitted within `window`.
    pub burst: u32,
    /// The time that burst takes to refill.
    pub window: Duration,
    /// When the next request may pass.
    pub retry_after: Duration,
}

impl Exceeded {
    fn new<P: governor::clock::Reference>(
        scope: Scope,
        quota: Quota,
        not_until: &governor::NotUntil<P>,
        now: P,
    ) -> Exceeded {
        Exceeded {
            scope,
            burst: quota.burst_size().get(),
            window: quota.burst_size_replenished_in(),
            retry_after: not_until.wait_time_from(now),
        }
    }

    /// Whole seconds until the next request may pass (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        ceil_secs(self.retry_after)
    }

    /// `Retry-After`, `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
    pub fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        let t = self.retry_after_secs();
        let name = self.scope.as_str();
        let policy = format!("\"{name}\";q={};w={}", self.burst, ceil_secs(self.window));
        let current = format!("\"{name}\";r=0;t={t}");
        [
            (http::header::RETRY_AFTER, t.to_string()),
            (HeaderName::from_static("ratelimit-policy"), policy),
            (HeaderName::from_static("ratelimit"), current),
        ]
        .into_iter()
        .filter_map(|(k, v)| HeaderValue::from_str(&v).ok().map(|v| (k, v)))
        .collect()
    }
}

fn ceil_secs(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

// The standard monotonic clock rather than governor's default (quanta's TSC
// clock): quanta calibrates the TSC for up to 200 ms at first use, and a
// calibration skewed by a busy machine would refill buckets at the wrong pace.
type Direct = RateLimiter<NotKeyed, InMemoryState, MonotonicClock, NoOpMiddleware<Instant>>;
type Keyed<K> = RateLimiter<K, DashMapStateStore<K>, MonotonicClock, NoOpMiddleware<Instant>>;

fn direct_limiter(quota: Quota) -> Direct {
    RateLimiter::direct_with_clock(quota, MonotonicClock)
}

fn keyed_limiter<K: std::hash::Hash + Eq + Clone>(quota: Quota) -> Keyed<K> {
    RateLimiter::dashmap_with_clock(quota, MonotonicClock)
}

/// A limiter and the quota it was built with, so a reload can tell whether to keep it.
struct Bucket<L> {
    quota: Quota,
    limiter: Arc<L>,
}

impl<L> Bucket<L> {
    /// The old bucket when its quota is unchanged, so its state survives; a fresh one otherwise.
    fn reuse(old: Option<&Bucket<L>>, quota: Quota, make: impl FnOnce(Quota) -> L) -> Bucket<L> {
        let limiter = match old {
            Some(b) if b.quota == quota => b.limiter.clone(),
            _ => Arc::new(make(quota)),
        };
        Bucket { quota, limiter }
    }
}

#[derive(Default)]
struct AgencyBuckets {
    agency: Option<Bucket<Direct>>,
    officers: Option<Bucket<Keyed<String>>>,
}

/// One immutable generation of limiters; a reload swaps in a new one.
#[derive(Default)]
struct Table {
    /// Agencies without an override, keyed by agency id.
    default_agency: Option<Bucket<Keyed<String>>>,
    /// Officers of agencies without an officer override, keyed by (agency, officer).
    default_officer: Option<Bucket<Keyed<(String, String)>>>,
    agencies: HashMap<String, AgencyBuckets>,
    /// Keyed by `agency/provider/service` (ids are kebab-case, so `/` cannot occur in them).
    grants: HashMap<String, Bucket<Direct>>,
}

fn grant_key(agency: &str, provider: &str, service: &str) -> String {
    format!("{agency}/{provider}/{service}")
}

impl Table {
    fn build(set: &LimitSet, replicas: u32, old: Option<&Table>) -> Table {
        let q = |r: &Rate| r.quota(replicas);
        let default_agency = set.agency.map(|r| {
            Bucket::reuse(
                old.and_then(|o| o.default_agency.as_ref()),
                q(&r),
                keyed_limiter,
            )
        });
        let default_officer = set.officer.map(|r| {
            Bucket::reuse(
                old.and_then(|o| o.default_officer.as_ref()),
                q(&r),
                keyed_limiter,
            )
        });
        let agencies = set
            .agencies
            .iter()
            .map(|(id, rates)| {
                let was = old.and_then(|o| o.agencies.get(id));
                let buckets = AgencyBuckets {
                    agency: rates.agency.map(|r| {
                        Bucket::reuse(was.and_then(|w| w.agency.as_ref()), q(&r), direct_limiter)
                    }),
                    officers: rates.officer.map(|r| {
                        Bucket::reuse(was.and_then(|w| w.officers.as_ref()), q(&r), keyed_limiter)
                    }),
                };
                (id.clone(), buckets)
            })
            .collect();
        let grants = set
            .grants
            .iter()
            .map(|((a, p, s), r)| {
                let key = grant_key(a, p, s);
                let bucket =
                    Bucket::reuse(old.and_then(|o| o.grants.get(&key)), q(r), direct_limiter);
                (key, bucket)
            })
            .collect();
        Table {
            default_agency,
            default_officer,
            agencies,
            grants,
        }
    }
}

/// The rate limiters of one gateway node.
pub struct Limits {
    table: ArcSwap<Table>,
    replicas: u32,
    /// Which refusals are written to the audit log one by one.
    pub refusals: RefusalLog,
}

impl fmt::Debug for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limits")
            .field("replicas", &self.replicas)
            .field("keys", &self.keys())
            .finish_non_exhaustive()
    }
}

impl Limits {
    /// Limiters for `set`, each replica of `replicas` enforcing its share.
    pub fn new(set: &LimitSet, replicas: u32) -> Limits {
        Limits {
            table: ArcSwap::from_pointee(Table::build(set, replicas, None)),
            replicas: replicas.max(1),
            refusals: RefusalLog::new(Duration::from_secs(1), 10_000),
        }
    }

    /// Swaps in the quotas of `set`; limiters whose quota is unchanged keep their state.
    pub fn reload(&self, set: &LimitSet) {
        let old = self.table.load();
        self.table
            .store(Arc::new(Table::build(set, self.replicas, Some(&old))));
    }

    /// Takes one request from the officer's, the grant's and the agency's quota, in that order.
    ///
    /// The most specific quota is asked first so that an officer over their own
    /// quota does not use up the agency's, which the other officers share.
    pub fn check(
        &self,
        agency: &str,
        officer: &str,
        provider: &str,
        service: &str,
    ) -> Result<(), Exceeded> {
        let t = self.table.load();
        let own = t.agencies.get(agency);
        match own.and_then(|a| a.officers.as_ref()) {
            Some(b) => keyed(b, &officer.to_owned(), Scope::Officer)?,
            None => {
                if let Some(b) = &t.default_officer {
                    keyed(b, &(agency.to_owned(), officer.to_owned()), Scope::Officer)?;
                }
            }
        }
        if !t.grants.is_empty() {
            if let Some(b) = t.grants.get(&grant_key(agency, provider, service)) {
                direct(b, Scope::Grant)?;
            }
        }
        match own.and_then(|a| a.agency.as_ref()) {
            Some(b) => direct(b, Scope::Agency)?,
            None => {
                if let Some(b) = &t.default_agency {
                    keyed(b, &agency.to_owned(), Scope::Agency)?;
                }
            }
        }
        Ok(())
    }

    /// Drops the state of keys whose bucket is full again (indistinguishable from new) and frees the memory.
    pub fn forget_idle(&self) {
        let t = self.table.load();
        if let Some(b) = &t.default_agency {
            b.limiter.retain_recent();
            b.limiter.shrink_to_fit();
        }
        if let Some(b) = &t.default_officer {
            b.limiter.retain_recent();
            b.limiter.shrink_to_fit();
        }
        for b in t.agencies.values().filter_map(|a| a.officers.as_ref()) {
            b.limiter.retain_recent();
            b.limiter.shrink_to_fit();
        }
    }

    /// Keys held by the keyed limiters (agencies and officers with recent requests).
    pub fn keys(&self) -> usize {
        let t = self.table.load();
        t.default_agency.as_ref().map_or(0, |b| b.limiter.len())
            + t.default_officer.as_ref().map_or(0, |b| b.limiter.len())
            + t.agencies
                .values()
                .filter_map(|a| a.officers.as_ref())
                .map(|b| b.limiter.len())
                .sum::<usize>()
    }
}

fn direct(b: &Bucket<Direct>, scope: Scope) -> Result<(), Exceeded> {
    b.limiter
        .check()
        .map_err(|e| Exceeded::new(scope, b.quota, &e, b.limiter.clock().now()))
}

fn keyed<K: std::hash::Hash + Eq + Clone>(
    b: &Bucket<Keyed<K>>,
    key: &K,
    scope: Scope,
) -> Result<(), Exceeded> {
    b.limiter
        .check_key(key)
        .map_err(|e| Exceeded::new(scope, b.quota, &e, b.limiter.clock().now()))
}

// ---- refusals in the audit log -----------------------------------------------------------

/// Whether a rate-limited request gets its own audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sample {
    /// Write this refusal's record as usual.
    Record,
    /// Counted into the summary record with this id, written when the window closes.
    Summarised {
        /// The summary record's id (the response's `X-Request-Id`).
        summary_id: String,
    },
}

/// At most this many data subjects are named in one summary record.
const SUMMARY_SUBJECTS: usize = 64;

struct Window {
    opened: Instant,
    /// The record that will stand for this window's further refusals, once there is one.
    summary: Option<Entry>,
    count: u64,
}

impl Window {
    fn close(self) -> Option<Entry> {
        let mut summary = self.summary?;
        summary.path = format!("summary:{}", self.count);
        Some(summary)
    }
}

#[derive(Default)]
struct RefusalState {
    windows: HashMap<String, Window>,
    /// Summaries of windows closed by a later refusal, waiting to be written.
    ready: Vec<Entry>,
}

/// Aggregates rate-limit refusals for the audit log: per key (agency,
/// officer, provider, service) the first refusal of each window is recorded
/// one by one, the rest of the window is counted into one summary record.
pub struct RefusalLog {
    window: Duration,
    max_windows: usize,
    state: Mutex<RefusalState>,
    unrecorded: AtomicU64,
    summaries: AtomicU64,
}

impl RefusalLog {
    /// Windows of `window`; with more than `max_windows` keys flooding at once, refusals are recorded one by one.
    pub fn new(window: Duration, max_windows: usize) -> RefusalLog {
        RefusalLog {
            window,
            max_windows,
            state: Mutex::new(RefusalState::default()),
            unrecorded: AtomicU64::new(0),
            summaries: AtomicU64::new(0),
        }
    }

    /// Decides whether the refusal `entry` (complete but for its id) is recorded on its own.
    pub fn sample(&self, entry: &Entry, now: Instant) -> Sample {
        let key = [
            &entry.agency,
            &entry.officer,
            &entry.provider,
            &entry.service,
        ]
        .map(|s| s.as_deref().unwrap_or(""))
        .join("\n");
        let Ok(mut st) = self.state.lock() else {
            return Sample::Record;
        };
        if let Some(w) = st.windows.get_mut(&key) {
            if now.saturating_duration_since(w.opened) < self.window {
                w.count += 1;
                let summary = w.summary.get_or_insert_with(|| Entry {
                    id: uuid::Uuid::now_v7().to_string(),
                    reason: Some(RATE_LIMITED_SUMMARY.to_owned()),
                    subjects: Vec::new(),
                    ..entry.clone()
                });
                for s in &entry.subjects {
                    if summary.subjects.len() < SUMMARY_SUBJECTS && !summary.subjects.contains(s) {
                        summary.subjects.push(s.clone());
                    }
                }
                let summary_id = summary.id.clone();
                self.unrecorded.fetch_add(1, Ordering::Relaxed);
                return Sample::Summarised { summary_id };
            }
            if let Some(s) = st.windows.remove(&key).and_then(Window::close) {
                st.ready.push(s);
            }
        }
        if st.windows.len() < self.max_windows {
            st.windows.insert(
                key,
                Window {
                    opened: now,
                    summary: None,
                    count: 0,
                },
            );
        }
        Sample::Record
    }

    /// Summary records of windows closed by `now`; the caller writes them to the audit log.
    pub fn due(&self, now: Instant) -> Vec<Entry> {
        self.take(|w| now.saturating_duration_since(w.opened) >= self.window)
    }

    /// Every pending summary, open windows included (at shutdown).
    pub fn drain(&self) -> Vec<Entry> {
        self.take(|_| true)
    }

    fn take(&self, closed: impl Fn(&Window) -> bool) -> Vec<Entry> {
        let Ok(mut st) = self.state.lock() else {
            return Vec::new();
        };
        let mut out = std::mem::take(&mut st.ready);
        let keys: Vec<String> = st
            .windows
            .iter()
            .filter(|(_, w)| closed(w))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            if let Some(s) = st.windows.remove(&k).and_then(Window::close) {
                out.push(s);
            }
        }
        self.summaries
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        out
    }

    /// Refusals not written one by one (each counted in a summary record).
    pub fn unrecorded(&self) -> u64 {
        self.unrecorded.load(Ordering::Relaxed)
    }

    /// Summary records handed out for writing.
    pub fn summaries(&self) -> u64 {
        self.summaries.load(Ordering::Relaxed)
    }
}

// ---- connections per agency --------------------------------------------------------------

/// Caps the connections one agency holds open at once, so one agency cannot take every slot.
pub struct ConnectionCaps {
    per_agency: usize,
    policy: Arc<ArcSwap<Policy>>,
    open: Mutex<HashMap<String, usize>>,
}

impl fmt::Debug for ConnectionCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionCaps")
            .field("per_agency", &self.per_agency)
            .finish_non_exhaustive()
    }
}

/// One admitted connection; dropping it frees the agency's slot.
#[derive(Debug)]
pub struct ConnectionSlot {
    caps: Arc<ConnectionCaps>,
    agency: String,
}

impl ConnectionCaps {
    /// At most `per_agency` connections per agency, agencies named by the policy in force.
    pub fn new(per_agency: usize, policy: Arc<ArcSwap<Policy>>) -> Arc<ConnectionCaps> {
        Arc::new(ConnectionCaps {
            per_agency,
            policy,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for the connection of `client`, or the agency id when its connections are all taken.
    ///
    /// Certificates of no known agency share one cap (they are refused on every request anyway).
    pub fn admit(self: &Arc<Self>, client: Option<&PeerCert>) -> Result<ConnectionSlot, String> {
        let agency = client
            .and_then(|c| {
                self.policy
                    .load()
                    .agency_for_certificate(c)
                    .map(|a| a.id.clone())
            })
            .unwrap_or_default();
        let Ok(mut open) = self.open.lock() else {
            return Err(agency);
        };
        let n = open.entry(agency.clone()).or_default();
        if *n >= self.per_agency {
            return Err(agency);
        }
        *n += 1;
        Ok(ConnectionSlot {
            caps: self.clone(),
            agency,
        })
    }

    /// Connections the agency holds open now.
    pub fn open(&self, agency: &str) -> usize {
        self.open
            .lock()
            .map(|m| m.get(agency).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.caps.open.lock() {
            if let Some(n) = open.get_mut(&self.agency) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&self.agency);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap()
    }

    fn parse(text: &str) -> Result<LimitSet, LimitErrors> {
        LimitSet::parse(Path::new("limits.toml"), text, &policy())
    }

    fn set(text: &str) -> LimitSet {
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

    #[test]
    fn replicas_share_a_quota() {
        let r = Rate {
            count: 100,
            per: Duration::from_secs(1),
            burst: 7,
        };
        let one = r.quota(1);
        assert_eq!(one.burst_size().get(), 7);
        assert_eq!(one.replenish_interval(), Duration::from_millis(10));
        let four = r.quota(4);
        assert_eq!(four.burst_size().get(), 2, "ceil(7/4)");
        assert_eq!(four.replenish_interval(), Duration::from_millis(40));
        assert_eq!(r.quota(100).burst_size().get(), 1);
    }

    fn allowed(l: &Limits, agency: &str, officer: &str, n: usize) -> Vec<Result<(), Scope>> {
        (0..n)
            .map(|_| {
                l.check(agency, officer, "registry", "persons")
                    .map_err(|e| e.scope)
            })
            .collect()
    }

    #[test]
    fn officer_quota_sits_inside_the_agency_quota_and_agencies_are_apart() {
        let l = Limits::new(
            &set("[defaults]\nagency = { rate = \"1/h\", burst = 6 }\nofficer = { rate = \"1/h\", burst = 4 }\n"),
            1,
        );
        let a = allowed(&l, "ssg", "o1", 5);
        assert_eq!(a[..4], [Ok(()), Ok(()), Ok(()), Ok(())]);
        assert_eq!(a[4], Err(Scope::Officer));
        // o1's refused request did not use the agency's quota: 2 left for o2.
        let b = allowed(&l, "ssg", "o2", 3);
        assert_eq!(b, vec![Ok(()), Ok(()), Err(Scope::Agency)]);
        // Another agency has its own quota.
        assert_eq!(allowed(&l, "psda", "o1", 4), vec![Ok(()); 4]);
    }

    #[test]
    fn overrides_and_grant_quotas_apply() {
        let l = Limits::new(
            &set("[defaults]\nofficer = { rate = \"1/h\", burst = 1 }\n[agencies.mia-border]\nofficer = { rate = \"1/h\", burst = 3 }\n[[grants]]\nagency = \"mfa-consular\"\nprovider = \"registry\"\nservice = \"visas\"\nrate = \"1/h\"\nburst = 1\n"),
            1,
        );
        assert_eq!(allowed(&l, "mia-border", "o", 4)[3], Err(Scope::Officer));
        assert_eq!(allowed(&l, "ssg", "o", 2)[1], Err(Scope::Officer));
        assert!(l.check("mfa-consular", "a", "registry", "visas").is_ok());
        let e = l
            .check("mfa-consular", "b", "registry", "visas")
            .unwrap_err();
        assert_eq!(e.scope, Scope::Grant);
        assert!(e.retry_after > Duration::from_secs(3500));
        let headers: BTreeMap<String, String> = e
            .headers()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        assert_eq!(headers["retry-after"], e.retry_after_secs().to_string());
        assert_eq!(headers["ratelimit-policy"], "\"grant\";q=1;w=3600");
        assert_eq!(
            headers["ratelimit"],
            format!("\"grant\";r=0;t={}", e.retry_after_secs())
        );
    }

    #[test]
    fn reload_keeps_the_state_of_unchanged_quotas() {
        let before = "[defaults]\nofficer = { rate = \"1/h\", burst = 2 }\n[agencies.ssg]\nagency = { rate = \"1/h\", burst = 2 }\n[agencies.psda]\nagency = { rate = \"1/h\", burst = 2 }\n";
        let l = Limits::new(&set(before), 1);
        for agency in ["ssg", "psda"] {
            allowed(&l, agency, "a", 1);
            allowed(&l, agency, "b", 1);
            assert_eq!(allowed(&l, agency, "c", 1), vec![Err(Scope::Agency)]);
        }
        // psda's quota changes, ssg's and the officers' do not.
        let after = before.replace(
            "[agencies.psda]\nagency = { rate = \"1/h\", burst = 2 }",
            "[agencies.psda]\nagency = { rate = \"1/h\", burst = 3 }",
        );
        l.reload(&set(&after));
        assert_eq!(
            allowed(&l, "ssg", "c", 1),
            vec![Err(Scope::Agency)],
            "no fresh burst on reload"
        );
        assert_eq!(
            allowed(&l, "psda", "c", 1),
            vec![Ok(())],
            "a changed quota starts afresh"
        );
        // c's officer bucket (2) was used by the refused and the admitted request.
        assert_eq!(
            allowed(&l, "psda", "c", 1),
            vec![Err(Scope::Officer)],
            "officer state kept"
        );
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let l = Limits::new(
            &set("[defaults]\nofficer = { rate = \"1000/s\", burst = 1 }\n"),
            1,
        );
        for i in 0..100 {
            l.check("ssg", &format!("o{i}"), "registry", "persons")
                .unwrap();
        }
        assert_eq!(l.keys(), 100);
        std::thread::sleep(Duration::from_millis(5));
        l.forget_idle();
        assert_eq!(l.keys(), 0);
    }

    /// `cargo test --lib limits::tests::check_cost -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a check"]
    fn check_cost() {
        let l = Limits::new(
            &set("[defaults]\nagency = { rate = \"1000000/s\", burst = 1000000 }\nofficer = { rate = \"100000/s\", burst = 100000 }\n"),
            1,
        );
        let officers: Vec<String> = (0..1000).map(|i| format!("officer-{i}")).collect();
        let n = 1_000_000;
        let t = Instant::now();
        for i in 0..n {
            let _ = l.check("ssg", &officers[i % officers.len()], "registry", "persons");
        }
        let per = t.elapsed() / n as u32;
        println!(
            "{per:?} per check (officer + agency quota, 1000 officers), {} keys",
            l.keys()
        );
    }

    fn refusal(officer: &str, subject: &str) -> Entry {
        Entry {
            id: uuid::Uuid::now_v7().to_string(),
            agency: Some("ssg".into()),
            officer: Some(officer.into()),
            provider: Some("registry".into()),
            service: Some("persons".into()),
            method: "GET".into(),
            path: format!("/v1/registry/persons/{subject}"),
            subjects: vec![subject.into()],
            decision: "deny".into(),
            reason: Some(RATE_LIMITED.into()),
            status: 429,
            ..Entry::default()
        }
    }

    #[test]
    fn a_flood_is_recorded_once_per_window_plus_a_summary() {
        let log = RefusalLog::new(Duration::from_millis(100), 2);
        let t0 = Instant::now();
        assert_eq!(log.sample(&refusal("o1", "RF-1"), t0), Sample::Record);
        let Sample::Summarised { summary_id } = log.sample(&refusal("o1", "RF-2"), t0) else {
            panic!("second refusal in the window must be summarised")
        };
        for i in 0..10 {
            assert_eq!(
                log.sample(
                    &refusal("o1", &format!("RF-{i}")),
                    t0 + Duration::from_millis(50)
                ),
                Sample::Summarised {
                    summary_id: summary_id.clone()
                }
            );
        }
        // Another officer is another key.
        assert_eq!(log.sample(&refusal("o2", "RF-1"), t0), Sample::Record);
        assert!(log.due(t0 + Duration::from_millis(99)).is_empty());
        let due = log.due(t0 + Duration::from_millis(100));
        assert_eq!(due.len(), 1, "o2's window had nothing to summarise");
        let s = &due[0];
        assert_eq!(s.id, summary_id);
        assert_eq!(s.path, "summary:11");
        assert_eq!(s.reason.as_deref(), Some(RATE_LIMITED_SUMMARY));
        assert_eq!(
            s.subjects.len(),
            10,
            "RF-0..RF-9, each once: {:?}",
            s.subjects
        );
        assert_eq!(log.unrecorded(), 11);

        // Past the window the next refusal is recorded again; beyond max_windows keys, every one is.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(log.sample(&refusal("o1", "RF-1"), t1), Sample::Record);
        assert_eq!(log.sample(&refusal("o2", "RF-1"), t1), Sample::Record);
        assert_eq!(log.sample(&refusal("o3", "RF-1"), t1), Sample::Record);
        assert_eq!(log.sample(&refusal("o3", "RF-1"), t1), Sample::Record);
        assert!(matches!(
            log.sample(&refusal("o1", "RF-1"), t1),
            Sample::Summarised { .. }
        ));
        let rest = log.drain();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].path, "summary:1");
        assert_eq!(log.summaries(), 2);
    }

    #[test]
    fn connections_are_capped_per_agency() {
        let policy = Arc::new(ArcSwap::from_pointee(policy()));
        let caps = ConnectionCaps::new(2, policy);
        let cert = |agency: &str| PeerCert {
            uri_sans: vec![format!("urn:karibche:agency:{agency}")],
            sha256: "00".repeat(32),
            dns_sans: Vec::new(),
            subject: String::new(),
        };
        let a = caps.admit(Some(&cert("ssg"))).unwrap();
        let _b = caps.admit(Some(&cert("ssg"))).unwrap();
        assert_eq!(caps.admit(Some(&cert("ssg"))).unwrap_err(), "ssg");
        let _c = caps.admit(Some(&cert("psda"))).unwrap();
        drop(a);
        assert_eq!(caps.open("ssg"), 1);
        let _d = caps.admit(Some(&cert("ssg"))).unwrap();
    }
}
