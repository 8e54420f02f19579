//! Protecting providers, and the gateway from slow ones: a fair share of
//! each provider's slots per agency, and a circuit breaker per provider.
//!
//! **Fair shares.** A provider has `concurrency` slots (requests in flight at
//! once). While other agencies have requests at a provider (in flight or
//! waiting), each agency may hold at most `agency_share` of its slots; an
//! agency alone may use more, but always leaves one share free, so the next
//! agency's first requests start at once. A request that may not start waits
//! (in order within its agency; when a slot frees, the agencies waiting take
//! turns) for at most `wait`, then gets a 503 with `Retry-After`. One
//! agency's flood therefore slows that agency, not the others. Slots may stay
//! free while two busy agencies each hold their share: that is the share's
//! point, since what a provider can work on at once is usually far below
//! `concurrency`.
//!
//! **Breakers.** The breaker is *closed* while calls succeed. After `failures`
//! consecutive failures of the provider itself (unreachable, timed out, a 5xx
//! answer other than 501) it *opens*: requests get a fast 503 with
//! `Retry-After` instead of piling up behind a provider that is down. A 4xx,
//! a refused method or an answer too large to read is about the request, not
//! the provider, and never counts. When the open period ends one request is
//! let through as a probe (*half-open*); its success closes the breaker, its
//! failure opens it again for twice as long, up to `max_open_for` (retry with
//! backoff). `/readyz` and `/metrics` report every provider's state.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// Bounds for every provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Requests in flight to one provider at once, all agencies together.
    pub concurrency: usize,
    /// Requests in flight to one provider per agency while other agencies use it too.
    pub agency_share: usize,
    /// Longest wait for a slot; then 503.
    pub wait: Duration,
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// First open period; doubled after each failed probe.
    pub open_for: Duration,
    /// Longest open period.
    pub max_open_for: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
        backoff: Duration,
    },
    /// One probe is in flight; `backoff` is the open period it would extend.
    HalfOpen {
        backoff: Duration,
    },
}

struct Guard {
    slots: Arc<Shares>,
    state: Mutex<State>,
    opened: AtomicU64,
}

/// Why a provider call was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No slot of the provider came free for this agency within the wait (or its queue is full).
    Busy,
    /// The breaker is open (or its probe is in flight); try again after this long.
    Open {
        /// Time until the next probe may be made.
        retry_after: Duration,
    },
}

/// A provider's breaker as `/readyz` and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderState {
    /// `closed`, `open` or `half-open`.
    pub breaker: &'static str,
    /// Time until the next probe, when open.
    pub retry_after: Option<Duration>,
    /// Requests in flight now.
    pub in_flight: usize,
    /// Times the breaker has opened.
    pub opened: u64,
    /// Requests in flight and waiting now, per agency using the provider.
    pub agencies: Vec<AgencyUse>,
    /// Requests that had to wait for a slot.
    pub waited: u64,
    /// Requests refused because no slot came free within the wait.
    pub wait_timeouts: u64,
}

/// One agency's use of a provider's slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgencyUse {
    /// The agency.
    pub agency: String,
    /// Its requests in flight.
    pub in_flight: usize,
    /// Its requests waiting for a slot.
    pub waiting: usize,
}

/// Concurrency caps and breakers of every provider, created on first use.
pub struct Providers {
    settings: BreakerSettings,
    guards: Mutex<BTreeMap<String, Arc<Guard>>>,
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Providers")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Leave to call a provider; report the outcome with [`Permit::done`].
pub struct Permit {
    guard: Arc<Guard>,
    settings: BreakerSettings,
    probe: bool,
    reported: bool,
    _slot: Slot,
}

impl Providers {
    /// Caps and breakers with the same settings for every provider.
    pub fn new(settings: BreakerSettings) -> Providers {
        Providers {
            settings,
            guards: Mutex::new(BTreeMap::new()),
        }
    }

    fn guard(&self, provider: &str) -> Arc<Guard> {
        // Providers come from the policy (the route was resolved before), so the map stays small.
        let mut guards = match self.guards.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        guards
            .entry(provider.to_owned())
            .or_insert_with(|| {
                Arc::new(Guard {
                    slots: Arc::new(Shares::new(
                        self.settings.concurrency,
                        self.settings.agency_share,
                    )),
                    state: Mutex::new(State::Closed { failures: 0 }),
                    opened: AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// Leave for `agency` to call `provider`: at once, after waiting for a fair slot, or why not.
    pub async fn admit(&self, provider: &str, agency: &str) -> Result<Permit, Refused> {
        let guard = self.guard(provider);
        let (probe, slot) = if breaker_admits(&guard)? {
            // A probe does not queue: the breaker stays half-open only as long as it runs.
            match guard.slots.try_acquire(agency) {
                Some(slot) => (true, slot),
                None => {
                    reopen_now(&guard);
                    return Err(Refused::Busy);
                }
            }
        } else {
            let slot = guard
                .slots
                .acquire(agency, self.settings.wait)
                .await
                .ok_or(Refused::Busy)?;
            // The breaker may have opened (or come due for its probe) while this request waited.
            (breaker_admits(&guard)?, slot)
        };
        Ok(Permit {
            guard,
            settings: self.settings,
            probe,
            reported: false,
            _slot: slot,
        })
    }

    /// Every provider asked so far, with its breaker.
    pub fn states(&self) -> Vec<(String, ProviderState)> {
        let guards: Vec<(String, Arc<Guard>)> = match self.guards.lock() {
            Ok(g) => g.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => Vec::new(),
        };
        let now = Instant::now();
        guards
            .into_iter()
            .map(|(name, g)| {
                let (breaker, retry_after) = match *lock(&g.state) {
                    State::Closed { .. } => ("closed", None),
                    State::Open { until, .. } => {
                        ("open", Some(until.saturating_duration_since(now)))
                    }
                    State::HalfOpen { .. } => ("half-open", None),
                };
                let use_ = g.slots.snapshot();
                let state = ProviderState {
                    breaker,
                    retry_after,
                    in_flight: use_.in_flight,
                    opened: g.opened.load(Ordering::Relaxed),
                    agencies: use_.agencies,
                    waited: use_.waited,
                    wait_timeouts: use_.wait_timeouts,
                };
                (name, state)
            })
            .collect()
    }
}

impl Permit {
    /// Reports the call's outcome: `ok` is false for a transport error, a timeout or a 5xx answer.
    pub fn done(mut self, ok: bool) {
        self.reported = true;
        let now = Instant::now();
        let s = self.settings;
        let mut st = lock(&self.guard.state);
        let next = match (*st, ok) {
            (_, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) if failures + 1 >= s.failures.max(1) => {
                self.guard.opened.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(failures = failures + 1, open_for = ?s.open_for, "provider failing; circuit breaker opens");
                State::Open {
                    until: now + s.open_for,
                    backoff: s.open_for,
                }
            }
            (State::Closed { failures }, false) => State::Closed {
                failures: failures + 1,
            },
            (State::HalfOpen { backoff }, false) => {
                let backoff = backoff.saturating_mul(2).min(s.max_open_for);
                self.guard.opened.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(open_for = ?backoff, "provider probe failed; circuit breaker stays open");
                State::Open {
                    until: now + backoff,
                    backoff,
                }
            }
            // Calls admitted before the breaker opened may still fail; the open period stands.
            (open @ State::Open { .. }, false) => open,
        };
        *st = next;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // A probe abandoned without an outcome (the caller went away) must not
        // leave the breaker half-open for ever: the next request probes again.
        if self.probe && !self.reported {
            reopen_now(&self.guard);
        }
    }
}

/// Whether the breaker lets a call through now, and whether that call is its probe.
fn breaker_admits(guard: &Guard) -> Result<bool, Refused> {
    let now = Instant::now();
    let mut st = lock(&guard.state);
    match *st {
        State::Closed { .. } => Ok(false),
        State::Open { until, backoff } if now >= until => {
            *st = State::HalfOpen { backoff };
            Ok(true)
        }
        State::Open { until, .. } => Err(Refused::Open {
            retry_after: until - now,
        }),
        State::HalfOpen { .. } => Err(Refused::Open {
            retry_after: Duration::from_secs(1),
        }),
    }
}

fn reopen_now(guard: &Guard) {
    let mut st = lock(&guard.state);
    if let State::HalfOpen { backoff } = *st {
        *st = State::Open {
            until: Instant::now(),
            backoff,
        };
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The state is a plain value, valid whatever a panicking holder left.
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

// ---- fair shares of a provider's slots -----------------------------------------------------

/// A provider's slots and who holds or waits for them.
struct Shares {
    capacity: usize,
    share: usize,
    state: Mutex<SharesState>,
}

#[derive(Default)]
struct SharesState {
    in_flight: usize,
    /// Only agencies with requests in flight or waiting: the map stays as small as the policy's agencies.
    agencies: BTreeMap<String, AgencyState>,
    /// Agencies with requests waiting, in the order they take turns.
    turns: VecDeque<String>,
    next_ticket: u64,
    waited: u64,
    wait_timeouts: u64,
}

#[derive(Default)]
struct AgencyState {
    in_flight: usize,
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
}

/// What [`Shares::snapshot`] reports.
struct SharesUse {
    in_flight: usize,
    agencies: Vec<AgencyUse>,
    waited: u64,
    wait_timeouts: u64,
}

/// A slot held by one agency's request; dropping it hands the slot to the next in turn.
struct Slot {
    shares: Arc<Shares>,
    agency: String,
}

/// A request waiting for a slot; dropped unserved, it leaves the queue (or gives back a slot granted too late).
struct Waiting<'a> {
    shares: &'a Arc<Shares>,
    agency: &'a str,
    ticket: u64,
    taken: bool,
}

impl Shares {
    fn new(capacity: usize, share: usize) -> Shares {
        Shares {
            capacity: capacity.max(1),
            share: share.max(1),
            state: Mutex::new(SharesState::default()),
        }
    }

    /// Whether a request of `agency` may start now.
    fn may_start(&self, st: &SharesState, agency: &str) -> bool {
        if st.in_flight >= self.capacity {
            return false;
        }
        let held = st.agencies.get(agency).map_or(0, |a| a.in_flight);
        if held < self.share {
            return true;
        }
        // Beyond its share only while alone, and never into the last share's worth of slots.
        let alone = st.agencies.keys().all(|k| k == agency);
        alone && self.capacity - st.in_flight > self.share
    }

    fn start(&self, st: &mut SharesState, agency: &str) {
        st.in_flight += 1;
        st.agencies.entry(agency.to_owned()).or_default().in_flight += 1;
    }

    /// A slot now, or `None` (no waiting).
    fn try_acquire(self: &Arc<Self>, agency: &str) -> Option<Slot> {
        let mut st = lock(&self.state);
        let queued = st
            .agencies
            .get(agency)
            .is_some_and(|a| !a.waiting.is_empty());
        if queued || !self.may_start(&st, agency) {
            return None;
        }
        self.start(&mut st, agency);
        Some(Slot {
            shares: self.clone(),
            agency: agency.to_owned(),
        })
    }

    /// A slot, waiting for one at most `wait`; `None` when none came free or the agency's queue is full.
    async fn acquire(self: &Arc<Self>, agency: &str, wait: Duration) -> Option<Slot> {
        let (ticket, granted) = {
            let mut st = lock(&self.state);
            let queued = st.agencies.get(agency).map_or(0, |a| a.waiting.len());
            if queued == 0 && self.may_start(&st, agency) {
                self.start(&mut st, agency);
                return Some(Slot {
                    shares: self.clone(),
                    agency: agency.to_owned(),
                });
            }
            // Waiting requests are bounded too: no more than the provider has slots, per agency.
            if queued >= self.capacity {
                st.wait_timeouts += 1;
                return None;
            }
            let (tx, rx) = oneshot::channel();
            let ticket = st.next_ticket;
            st.next_ticket += 1;
            st.waited += 1;
            let a = st.agencies.entry(agency.to_owned()).or_default();
            a.waiting.push_back((ticket, tx));
            if a.waiting.len() == 1 {
                st.turns.push_back(agency.to_owned());
            }
            (ticket, rx)
        };
        let mut waiting = Waiting {
            shares: self,
            agency,
            ticket,
            taken: false,
        };
        let got = matches!(tokio::time::timeout(wait, granted).await, Ok(Ok(())));
        // A grant racing the timeout still counts: whoever granted it already counted the slot.
        if got || waiting.granted() {
            waiting.taken = true;
            return Some(Slot {
                shares: self.clone(),
                agency: agency.to_owned(),
            });
        }
        lock(&self.state).wait_timeouts += 1;
        None
    }

    /// Hands free slots to waiting requests, agencies taking turns.
    fn dispatch(&self, st: &mut SharesState) {
        let mut passed = 0;
        while st.in_flight < self.capacity && passed < st.turns.len() {
            let Some(agency) = st.turns.pop_front() else {
                break;
            };
            if !self.may_start(st, &agency) {
                st.turns.push_back(agency);
                passed += 1;
                continue;
            }
            let next = st
                .agencies
                .get_mut(&agency)
                .and_then(|a| a.waiting.pop_front());
            let Some((_, tx)) = next else {
                continue;
            };
            // The receiver is alive: a waiter leaving takes itself out of the queue under this lock.
            if tx.send(()).is_ok() {
                self.start(st, &agency);
            }
            if st
                .agencies
                .get(&agency)
                .is_some_and(|a| !a.waiting.is_empty())
            {
                st.turns.push_back(agency);
            } else {
                forget_if_idle(st, &agency);
            }
            passed = 0;
        }
    }

    fn release(&self, agency: &str) {
        let mut st = lock(&self.state);
        st.in_flight = st.in_flight.saturating_sub(1);
        if let Some(a) = st.agencies.get_mut(agency) {
            a.in_flight = a.in_flight.saturating_sub(1);
        }
        forget_if_idle(&mut st, agency);
        self.dispatch(&mut st);
    }

    fn snapshot(&self) -> SharesUse {
        let st = lock(&self.state);
        SharesUse {
            in_flight: st.in_flight,
            agencies: st
                .agencies
                .iter()
                .map(|(agency, a)| AgencyUse {
                    agency: agency.clone(),
                    in_flight: a.in_flight,
                    waiting: a.waiting.len(),
                })
                .collect(),
            waited: st.waited,
            wait_timeouts: st.wait_timeouts,
        }
    }
}

fn forget_if_idle(st: &mut SharesState, agency: &str) {
    if st
        .agencies
        .get(agency)
        .is_some_and(|a| a.in_flight == 0 && a.waiting.is_empty())
    {
        st.agencies.remove(agency);
        st.turns.retain(|t| t != agency);
    }
}

impl Waiting<'_> {
    /// Whether this request's slot was granted (it is no longer in its agency's queue).
    fn granted(&self) -> bool {
        let st = lock(&self.shares.state);
        !st.agencies
            .get(self.agency)
            .is_some_and(|a| a.waiting.iter().any(|(t, _)| *t == self.ticket))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        let mut st = lock(&self.shares.state);
        let queued = st.agencies.get_mut(self.agency).and_then(|a| {
            let i = a.waiting.iter().position(|(t, _)| *t == self.ticket)?;
            a.waiting.remove(i)
        });
        match queued {
            // Left the queue: someone else may now start (this agency may have been all that kept them back).
            Some(_) => {
                if st
                    .agencies
                    .get(self.agency)
                    .is_some_and(|a| a.waiting.is_empty())
                {
                    st.turns.retain(|t| t != self.agency);
                }
                forget_if_idle(&mut st, self.agency);
            }
            // Granted, but nobody will use it: give the slot back.
            None => {
                st.in_flight = st.in_flight.saturating_sub(1);
                if let Some(a) = st.agencies.get_mut(self.agency) {
                    a.in_flight = a.in_flight.saturating_sub(1);
                }
                forget_if_idle(&mut st, self.agency);
            }
        }
        self.shares.dispatch(&mut st);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shares.release(&self.agency);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            concurrency: 2,
            agency_share: 2,
            wait: Duration::from_millis(20),
            failures: 3,
            open_for: Duration::from_millis(40),
            max_open_for: Duration::from_millis(100),
        }
    }

    fn breaker(p: &Providers) -> &'static str {
        p.states()
            .into_iter()
            .find(|(n, _)| n == "x")
            .map(|(_, s)| s.breaker)
            .unwrap()
    }

    async fn admit(p: &Providers, provider: &str) -> Result<Permit, Refused> {
        p.admit(provider, "a").await
    }

    #[tokio::test]
    async fn opens_after_consecutive_failures_and_probes_with_backoff() {
        let p = Providers::new(settings());
        for _ in 0..2 {
            admit(&p, "x").await.unwrap().done(false);
        }
        admit(&p, "x").await.unwrap().done(true);
        assert_eq!(breaker(&p), "closed", "a success resets the count");
        for _ in 0..3 {
            admit(&p, "x").await.unwrap().done(false);
        }
        assert_eq!(breaker(&p), "open");
        assert!(matches!(admit(&p, "x").await, Err(Refused::Open { .. })));
        // Another provider is not affected.
        admit(&p, "y").await.unwrap().done(true);

        tokio::time::sleep(Duration::from_millis(45)).await;
        let probe = admit(&p, "x").await.unwrap();
        assert_eq!(breaker(&p), "half-open");
        assert!(
            matches!(admit(&p, "x").await, Err(Refused::Open { .. })),
            "one probe at a time"
        );
        probe.done(false);
        // Open again, for twice as long (80 ms).
        tokio::time::sleep(Duration::from_millis(45)).await;
        assert!(matches!(admit(&p, "x").await, Err(Refused::Open { .. })));
        tokio::time::sleep(Duration::from_millis(45)).await;
        admit(&p, "x").await.unwrap().done(true);
        assert_eq!(breaker(&p), "closed");
        let (_, s) = p.states().into_iter().find(|(n, _)| n == "x").unwrap();
        assert_eq!(s.opened, 2);
    }

    #[tokio::test]
    async fn caps_requests_in_flight_and_frees_abandoned_probes() {
        let p = Providers::new(settings());
        let a = admit(&p, "x").await.unwrap();
        let b = admit(&p, "x").await.unwrap();
        assert_eq!(
            admit(&p, "x").await.err(),
            Some(Refused::Busy),
            "waited out"
        );
        assert_eq!(p.states()[0].1.in_flight, 2);
        assert_eq!(p.states()[0].1.wait_timeouts, 1);
        drop(a);
        let c = admit(&p, "x").await.unwrap();
        drop((b, c));

        for _ in 0..3 {
            admit(&p, "x").await.unwrap().done(false);
        }
        tokio::time::sleep(Duration::from_millis(45)).await;
        drop(admit(&p, "x").await.unwrap()); // probe abandoned
        assert!(
            admit(&p, "x").await.is_ok(),
            "the next request probes again"
        );
    }

    #[tokio::test]
    async fn a_request_that_waited_while_the_breaker_opened_is_refused_or_probes() {
        let p = Arc::new(Providers::new(BreakerSettings {
            concurrency: 1,
            agency_share: 1,
            wait: Duration::from_secs(5),
            failures: 1,
            ..settings()
        }));
        let first = admit(&p, "x").await.unwrap();
        let q = p.clone();
        let waiting = tokio::spawn(async move { q.admit("x", "b").await.map(|_| ()) });
        while p.states()[0].1.agencies.iter().all(|a| a.waiting == 0) {
            tokio::task::yield_now().await;
        }
        first.done(false);
        assert!(matches!(waiting.await.unwrap(), Err(Refused::Open { .. })));

        // A request that waited until the open period passed becomes the probe (never a
        // half-open breaker with no probe running).
        let p = Arc::new(Providers::new(BreakerSettings {
            concurrency: 2,
            agency_share: 1,
            wait: Duration::from_secs(5),
            failures: 1,
            ..settings()
        }));
        let a = p.admit("x", "a").await.unwrap();
        let b = p.admit("x", "b").await.unwrap();
        let q = p.clone();
        let waiting = tokio::spawn(async move {
            let permit = q.admit("x", "a").await?;
            let state = breaker(&q);
            permit.done(true);
            Ok::<_, Refused>(state)
        });
        while p.states()[0].1.agencies.iter().all(|u| u.waiting == 0) {
            tokio::task::yield_now().await;
        }
        b.done(false);
        assert_eq!(breaker(&p), "open");
        tokio::time::sleep(Duration::from_millis(45)).await;
        drop(a);
        assert_eq!(waiting.await.unwrap(), Ok("half-open"));
        assert_eq!(breaker(&p), "closed", "the probe's success closed it");
    }

    fn uses(shares: &Shares) -> BTreeMap<String, (usize, usize)> {
        shares
            .snapshot()
            .agencies
            .into_iter()
            .map(|a| (a.agency, (a.in_flight, a.waiting)))
            .collect()
    }

    fn of(pairs: &[(&str, (usize, usize))]) -> BTreeMap<String, (usize, usize)> {
        pairs.iter().map(|(a, u)| ((*a).to_owned(), *u)).collect()
    }

    #[tokio::test]
    async fn an_agency_alone_borrows_short_of_one_share_and_others_start_at_once() {
        let shares = Arc::new(Shares::new(6, 2));
        let wait = Duration::from_secs(5);
        let mut a = Vec::new();
        for _ in 0..4 {
            a.push(shares.acquire("a", wait).await.unwrap());
        }
        assert!(shares.try_acquire("a").is_none(), "one share stays free");
        // B starts at once, up to its share, although A holds more than its own.
        let b1 = shares.try_acquire("b").unwrap();
        let b2 = shares.try_acquire("b").unwrap();
        assert!(shares.try_acquire("b").is_none());
        assert_eq!(uses(&shares), of(&[("a", (4, 0)), ("b", (2, 0))]));

        // Both want more: A waits until it is under its share, B takes its turns.
        let s = shares.clone();
        let a_waits = tokio::spawn(async move { s.acquire("a", wait).await.map(|_| ()) });
        let s = shares.clone();
        let b_waits = tokio::spawn(async move { s.acquire("b", wait).await.map(|_| ()) });
        while uses(&shares) != of(&[("a", (4, 1)), ("b", (2, 1))]) {
            tokio::task::yield_now().await;
        }
        a.pop();
        a.pop();
        // A is at 2 = its share while B is active: still not admitted; the free slots stay free.
        assert_eq!(uses(&shares), of(&[("a", (2, 1)), ("b", (2, 1))]));
        drop(b1);
        b_waits.await.unwrap().unwrap();
        a.pop();
        a_waits.await.unwrap().unwrap();
        drop((a, b2));
        assert_eq!(shares.snapshot().in_flight, 0);
        assert!(uses(&shares).is_empty(), "idle agencies are forgotten");
    }

    #[tokio::test]
    async fn waiting_agencies_take_turns_and_a_timed_out_wait_leaves_the_queue() {
        let shares = Arc::new(Shares::new(2, 1));
        let wait = Duration::from_secs(5);
        let held = [
            shares.acquire("a", wait).await.unwrap(),
            shares.acquire("b", wait).await.unwrap(),
        ];
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        // (At most `capacity` requests of one agency wait.)
        for agency in ["a", "a", "b", "b", "c"] {
            let (s, order) = (shares.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let slot = s.acquire(agency, wait).await.unwrap();
                order.lock().unwrap().push(agency);
                // Hold briefly so the next turn is taken by whoever is due.
                tokio::task::yield_now().await;
                drop(slot);
            }));
            // Queue in this order.
            while uses(&shares).values().map(|u| u.1).sum::<usize>() < waiters.len() {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for w in waiters {
            w.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        // Not "a a b b c": every agency gets its turn before one gets a second.
        let first_three: std::collections::BTreeSet<&str> = order[..3].iter().copied().collect();
        assert_eq!(first_three.len(), 3, "{order:?}");

        let one = Arc::new(Shares::new(1, 1));
        let _held = one.acquire("a", wait).await.unwrap();
        assert!(one.acquire("b", Duration::from_millis(10)).await.is_none());
        assert_eq!(one.snapshot().wait_timeouts, 1);
        assert_eq!(
            uses(&one),
            of(&[("a", (1, 0))]),
            "the timed-out wait left no trace"
        );
    }
}
