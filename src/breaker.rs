//! Protecting providers, and the gateway from slow ones: a cap on the
//! requests in flight to each provider and a circuit breaker per provider.
//!
//! The breaker is *closed* while calls succeed. After `failures` consecutive
//! failures (transport errors, timeouts, 5xx answers) it *opens*: requests
//! get a fast 503 with `Retry-After` instead of piling up behind a provider
//! that is down. When the open period ends one request is let through as a
//! probe (*half-open*); its success closes the breaker, its failure opens it
//! again for twice as long, up to `max_open_for` (retry with backoff).
//! `/readyz` and `/metrics` report every provider's state.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bounds for every provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Requests in flight to one provider at once; more get 503 at once.
    pub concurrency: usize,
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
    slots: Arc<Semaphore>,
    state: Mutex<State>,
    opened: AtomicU64,
}

/// Why a provider call was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The provider already has its maximum of requests in flight.
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
    _slot: OwnedSemaphorePermit,
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
                    slots: Arc::new(Semaphore::new(self.settings.concurrency.max(1))),
                    state: Mutex::new(State::Closed { failures: 0 }),
                    opened: AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// Leave to call `provider` now, or why not.
    pub fn admit(&self, provider: &str) -> Result<Permit, Refused> {
        let guard = self.guard(provider);
        let now = Instant::now();
        let probe = {
            let mut st = lock(&guard.state);
            match *st {
                State::Closed { .. } => false,
                State::Open { until, backoff } if now >= until => {
                    *st = State::HalfOpen { backoff };
                    true
                }
                State::Open { until, .. } => {
                    return Err(Refused::Open {
                        retry_after: until - now,
                    })
                }
                State::HalfOpen { .. } => {
                    return Err(Refused::Open {
                        retry_after: Duration::from_secs(1),
                    })
                }
            }
        };
        match guard.slots.clone().try_acquire_owned() {
            Ok(slot) => Ok(Permit {
                guard,
                settings: self.settings,
                probe,
                reported: false,
                _slot: slot,
            }),
            Err(_) => {
                if probe {
                    reopen_now(&guard);
                }
                Err(Refused::Busy)
            }
        }
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
                let state = ProviderState {
                    breaker,
                    retry_after,
                    in_flight: self.settings.concurrency.max(1) - g.slots.available_permits(),
                    opened: g.opened.load(Ordering::Relaxed),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            concurrency: 2,
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

    #[test]
    fn opens_after_consecutive_failures_and_probes_with_backoff() {
        let p = Providers::new(settings());
        for _ in 0..2 {
            p.admit("x").unwrap().done(false);
        }
        p.admit("x").unwrap().done(true);
        assert_eq!(breaker(&p), "closed", "a success resets the count");
        for _ in 0..3 {
            p.admit("x").unwrap().done(false);
        }
        assert_eq!(breaker(&p), "open");
        assert!(matches!(p.admit("x"), Err(Refused::Open { .. })));
        // Another provider is not affected.
        p.admit("y").unwrap().done(true);

        std::thread::sleep(Duration::from_millis(45));
        let probe = p.admit("x").unwrap();
        assert_eq!(breaker(&p), "half-open");
        assert!(
            matches!(p.admit("x"), Err(Refused::Open { .. })),
            "one probe at a time"
        );
        probe.done(false);
        // Open again, for twice as long (80 ms).
        std::thread::sleep(Duration::from_millis(45));
        assert!(matches!(p.admit("x"), Err(Refused::Open { .. })));
        std::thread::sleep(Duration::from_millis(45));
        p.admit("x").unwrap().done(true);
        assert_eq!(breaker(&p), "closed");
        let (_, s) = p.states().into_iter().find(|(n, _)| n == "x").unwrap();
        assert_eq!(s.opened, 2);
    }

    #[test]
    fn caps_requests_in_flight_and_frees_abandoned_probes() {
        let p = Providers::new(settings());
        let a = p.admit("x").unwrap();
        let b = p.admit("x").unwrap();
        assert_eq!(p.admit("x").err(), Some(Refused::Busy));
        assert_eq!(p.states()[0].1.in_flight, 2);
        drop(a);
        let c = p.admit("x").unwrap();
        drop((b, c));

        for _ in 0..3 {
            p.admit("x").unwrap().done(false);
        }
        std::thread::sleep(Duration::from_millis(45));
        drop(p.admit("x").unwrap()); // probe abandoned
        assert!(p.admit("x").is_ok(), "the next request probes again");
    }
}
