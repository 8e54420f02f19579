//! Rate limits: every agency, every officer and, optionally, every grant gets
//! its share of the gateway.
//!
//! Quotas live in `policies/limits.toml` ([`quota`], [`LimitSet::load`]): a
//! rate and a burst (GCRA, governor's limiters) per agency and per officer,
//! defaults plus per-agency overrides, and optional per-grant quotas keyed by
//! agency, provider and service, each problem reported at its
//! `file:line:column`. [`Limits`] holds the limiter state; a reload
//! ([`Limits::reload`]) builds a new table but keeps the state of every
//! limiter whose quota did not change, so a reload never hands out a fresh
//! burst. Keyed limiters forget idle keys in [`Limits::forget_idle`], which
//! the runtime's housekeeping calls periodically, so memory stays bounded however many
//! officers pass.
//!
//! Several replicas share a quota in one of two ways. The embedded default
//! (`limits.backend = "local"`) is a fixed split: each replica enforces
//! `rate / replicas` with `ceil(burst / replicas)`. With `limits.backend =
//! "redis://…"` ([`redis`]) every replica takes from one GCRA cell per quota
//! in Redis, and the local split is the fallback for a request Redis does not
//! answer in time.
//!
//! Over the limit a request gets 429 with `Retry-After`, `RateLimit-Policy`
//! and `RateLimit` ([`Exceeded::headers`]). What the audit log keeps of a
//! flood of 429s is the audit log's business (`crate::audit::sampling`, held
//! by the `AuditLog`): limits know nothing of the log.
//!
//! The connections one agency holds open at once are bounded by the
//! listener (`src/runtime/connections.rs`), not here.

pub mod quota;
pub mod redis;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use governor::clock::{Clock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::{HeaderName, HeaderValue};

pub use quota::{AgencyRates, LimitError, LimitErrors, LimitSet, Rate, LIMITS_FILE};
pub use redis::{Fallback, RedisQuotas};

/// The reason code of a request refused by a quota (audit log and metrics).
pub const RATE_LIMITED: &str = "rate_limited";

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
    /// This replica's share (the local limiter's quota).
    quota: Quota,
    /// The whole quota, all replicas together (the shared backend's).
    whole: Quota,
    limiter: Arc<L>,
}

impl<L> Bucket<L> {
    /// The old bucket when its quota is unchanged, so its state survives; a fresh one otherwise.
    fn reuse(
        old: Option<&Bucket<L>>,
        rate: &Rate,
        replicas: u32,
        make: impl FnOnce(Quota) -> L,
    ) -> Bucket<L> {
        let quota = rate.quota(replicas);
        let limiter = match old {
            Some(b) if b.quota == quota => b.limiter.clone(),
            _ => Arc::new(make(quota)),
        };
        Bucket {
            quota,
            whole: rate.quota(1),
            limiter,
        }
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
        let default_agency = set.agency.map(|r| {
            Bucket::reuse(
                old.and_then(|o| o.default_agency.as_ref()),
                &r,
                replicas,
                keyed_limiter,
            )
        });
        let default_officer = set.officer.map(|r| {
            Bucket::reuse(
                old.and_then(|o| o.default_officer.as_ref()),
                &r,
                replicas,
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
                        let was = was.and_then(|w| w.agency.as_ref());
                        Bucket::reuse(was, &r, replicas, direct_limiter)
                    }),
                    officers: rates.officer.map(|r| {
                        let was = was.and_then(|w| w.officers.as_ref());
                        Bucket::reuse(was, &r, replicas, keyed_limiter)
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
                let was = old.and_then(|o| o.grants.get(&key));
                let bucket = Bucket::reuse(was, r, replicas, direct_limiter);
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
    /// The shared backend; `None`: the local split only (`limits.backend = "local"`).
    shared: Option<RedisQuotas>,
}

impl fmt::Debug for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limits")
            .field("replicas", &self.replicas)
            .field("keys", &self.keys())
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

/// One quota a request falls under: which, and its limiter here.
struct Step<'a> {
    scope: Scope,
    agency: &'a str,
    officer: &'a str,
    local: Local<'a>,
}

/// A quota's local limiter (and the key the request takes from it).
enum Local<'a> {
    /// An agency's own quota, or a grant's (with its `agency/provider/service` key).
    Direct(&'a Bucket<Direct>),
    /// Keyed by officer (an agency's officer override) or by agency (the default agency quota).
    Keyed(&'a Bucket<Keyed<String>>, &'a str),
    /// The default officer quota, keyed by (agency, officer).
    Pair(&'a Bucket<Keyed<(String, String)>>),
}

impl Step<'_> {
    /// Takes one request from this replica's share.
    fn take_local(&self) -> Result<(), Exceeded> {
        match self.local {
            Local::Direct(b) => direct(b, self.scope),
            Local::Keyed(b, k) => keyed(b, &k.to_owned(), self.scope),
            Local::Pair(b) => keyed(
                b,
                &(self.agency.to_owned(), self.officer.to_owned()),
                self.scope,
            ),
        }
    }

    /// The whole quota (all replicas together).
    fn whole(&self) -> Quota {
        match self.local {
            Local::Direct(b) => b.whole,
            Local::Keyed(b, _) => b.whole,
            Local::Pair(b) => b.whole,
        }
    }

    /// The shared cell: named by scope, quota and key, so a changed quota starts afresh.
    fn cell(&self, provider: &str, service: &str) -> redis::Cell {
        let whole = self.whole();
        let interval_us = u64::try_from(whole.replenish_interval().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let burst = whole.burst_size().get();
        // Agency ids are kebab-case: neither ':' nor '/' occurs in them.
        let name = match self.scope {
            Scope::Officer => format!("{}:{}", self.agency, self.officer),
            Scope::Grant => grant_key(self.agency, provider, service),
            Scope::Agency => self.agency.to_owned(),
        };
        redis::Cell {
            key: format!("{}:{interval_us}:{burst}:{name}", self.scope.as_str()),
            interval_us,
            burst,
        }
    }
}

impl Limits {
    /// Limiters for `set`, each replica of `replicas` enforcing its share.
    pub fn new(set: &LimitSet, replicas: u32) -> Limits {
        Limits {
            table: ArcSwap::from_pointee(Table::build(set, replicas, None)),
            replicas: replicas.max(1),
            shared: None,
        }
    }

    /// The same limiters with quotas shared in Redis; the local split stays as the fallback.
    pub fn with_shared(mut self, shared: RedisQuotas) -> Limits {
        self.shared = Some(shared);
        self
    }

    /// The shared backend, if configured (for its counters).
    pub fn shared(&self) -> Option<&RedisQuotas> {
        self.shared.as_ref()
    }

    /// Swaps in the quotas of `set`; limiters whose quota is unchanged keep their state.
    pub fn reload(&self, set: &LimitSet) {
        let old = self.table.load();
        self.table
            .store(Arc::new(Table::build(set, self.replicas, Some(&old))));
    }

    /// Takes one request from the officer's, the grant's and the agency's quota, in that order:
    /// from the shared quotas when a backend is configured and answers in time, else from
    /// this replica's share ([`Limits::check_local`]).
    pub async fn check(
        &self,
        agency: &str,
        officer: &str,
        provider: &str,
        service: &str,
    ) -> Result<(), Exceeded> {
        if let Some(shared) = &self.shared {
            if let Some(answer) = self
                .check_shared(shared, [agency, officer, provider, service])
                .await
            {
                return answer;
            }
            // Counted and logged by the backend; this request takes the local split.
        }
        self.check_local(agency, officer, provider, service)
    }

    /// The shared quotas' answer, or `None` when Redis gave none in time.
    async fn check_shared(
        &self,
        shared: &RedisQuotas,
        [agency, officer, provider, service]: [&str; 4],
    ) -> Option<Result<(), Exceeded>> {
        let t = self.table.load();
        let steps = plan(&t, agency, officer, provider, service);
        if steps.is_empty() {
            return Some(Ok(()));
        }
        let cells: Vec<redis::Cell> = steps.iter().map(|s| s.cell(provider, service)).collect();
        let (i, wait) = match shared.take(&cells).await {
            Ok(None) => return Some(Ok(())),
            Ok(Some(refused)) => refused,
            Err(_) => return None,
        };
        let s = steps.get(i)?;
        let whole = s.whole();
        Some(Err(Exceeded {
            scope: s.scope,
            burst: whole.burst_size().get(),
            window: whole.burst_size_replenished_in(),
            retry_after: wait,
        }))
    }

    /// Takes one request from this replica's share of each quota, in the order of [`Limits::check`].
    ///
    /// The most specific quota is asked first so that an officer over their own
    /// quota does not use up the agency's, which the other officers share.
    pub fn check_local(
        &self,
        agency: &str,
        officer: &str,
        provider: &str,
        service: &str,
    ) -> Result<(), Exceeded> {
        let t = self.table.load();
        plan(&t, agency, officer, provider, service)
            .iter()
            .try_for_each(Step::take_local)
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

/// The quotas a request falls under, most specific first: officer, grant, agency.
fn plan<'a>(
    t: &'a Table,
    agency: &'a str,
    officer: &'a str,
    provider: &str,
    service: &str,
) -> Vec<Step<'a>> {
    let step = |scope, local| Step {
        scope,
        agency,
        officer,
        local,
    };
    let mut steps = Vec::with_capacity(3);
    let own = t.agencies.get(agency);
    match own.and_then(|a| a.officers.as_ref()) {
        Some(b) => steps.push(step(Scope::Officer, Local::Keyed(b, officer))),
        None => {
            if let Some(b) = &t.default_officer {
                steps.push(step(Scope::Officer, Local::Pair(b)));
            }
        }
    }
    if !t.grants.is_empty() {
        if let Some(b) = t.grants.get(&grant_key(agency, provider, service)) {
            steps.push(step(Scope::Grant, Local::Direct(b)));
        }
    }
    match own.and_then(|a| a.agency.as_ref()) {
        Some(b) => steps.push(step(Scope::Agency, Local::Direct(b))),
        None => {
            if let Some(b) = &t.default_agency {
                steps.push(step(Scope::Agency, Local::Keyed(b, agency)));
            }
        }
    }
    steps
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::quota::tests::set;
    use super::*;

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
                l.check_local(agency, officer, "registry", "persons")
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
        assert!(l
            .check_local("mfa-consular", "a", "registry", "visas")
            .is_ok());
        let e = l
            .check_local("mfa-consular", "b", "registry", "visas")
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
            l.check_local("ssg", &format!("o{i}"), "registry", "persons")
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
            let _ = l.check_local("ssg", &officers[i % officers.len()], "registry", "persons");
        }
        let per = t.elapsed() / n as u32;
        println!(
            "{per:?} per check (officer + agency quota, 1000 officers), {} keys",
            l.keys()
        );
    }
}
