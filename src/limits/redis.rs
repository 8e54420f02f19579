//! Quotas shared by every replica, kept in Redis (`limits.backend = "redis://…"`).
//!
//! Each quota is a GCRA cell in Redis: one key holding the theoretical arrival
//! time (TAT, microseconds of the Redis server's clock, so replicas' clocks
//! never matter). One request is ONE round trip: a Lua script ([`GCRA`], sent
//! by EVALSHA, with SCRIPT LOAD and a retry when Redis does not know it yet)
//! takes the officer's, the grant's and the agency's quota in that order,
//! atomically, and stops at the first that refuses, exactly as the local
//! limiters do. Keys carry the quota's interval and burst, so a changed quota
//! starts afresh and an unchanged one keeps its state across reloads; each key
//! expires once its bucket is full again, so idle officers vanish on their own.
//!
//! The wait is bounded (`limits.redis_timeout`, default 25 ms). On a timeout or
//! an error the caller falls back to the local per-replica split for that
//! request ([`Fallback`]), the backend is marked down, and a background probe
//! reconnects; while it is down requests go to the local split at once rather
//! than each paying the timeout. Never an unbounded stall, never unlimited.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

/// The GCRA script. KEYS: one per quota, in the order they are taken. ARGV:
/// per key its emission interval (µs) and burst. Returns `{0, 0}` when every
/// quota admitted the request, else `{i, wait_us}`: the 1-based index of the
/// quota that refused and the time until it admits one more.
pub const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local stored = redis.call('GET', key)
  local tat = now
  if stored then
    tat = math.max(tonumber(stored), now)
  end
  local next_tat = tat + interval
  local allow_at = next_tat - interval * burst
  if allow_at > now then
    return {i, allow_at - now}
  end
  local ttl = math.max(1, math.ceil((next_tat - now) / 1000))
  redis.call('SET', key, string.format('%.0f', next_tat), 'PX', ttl)
end
return {0, 0}
"#;

/// How often a backend marked down is probed.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// How long a probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// At most one warning per this period while the backend fails.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Why a check fell back to the local split (the `reason` label of
/// `karibche_limits_backend_fallbacks_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Redis did not answer within `limits.redis_timeout`.
    Timeout,
    /// Redis answered with an error or the connection failed.
    Error,
    /// The backend was already marked down; the probe has not seen it back yet.
    Down,
}

impl Fallback {
    /// Every reason, in the order of the counters.
    pub const ALL: [Fallback; 3] = [Fallback::Timeout, Fallback::Error, Fallback::Down];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::Timeout => "timeout",
            Fallback::Error => "error",
            Fallback::Down => "down",
        }
    }
}

/// One quota to take a request from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    /// The key without the prefix (names the quota, its interval and burst).
    pub key: String,
    /// One request every this many microseconds, sustained.
    pub interval_us: u64,
    /// Requests admitted at once.
    pub burst: u32,
}

/// The shared-quota backend: a connection that reconnects, the script and its counters.
#[derive(Clone)]
pub struct RedisQuotas {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    script: Script,
    prefix: String,
    timeout: Duration,
    up: AtomicBool,
    fallbacks: [AtomicU64; Fallback::ALL.len()],
    /// When the last warning was logged and how many fallbacks it did not mention.
    warned: Mutex<(Option<Instant>, u64)>,
}

impl std::fmt::Debug for RedisQuotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQuotas")
            .field("prefix", &self.inner.prefix)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

impl RedisQuotas {
    /// A backend for `url` whose keys start with `prefix`. Tries Redis once
    /// (bounded) so a reachable Redis shares quotas from the first request, then
    /// probes in the background while it is down. Fails only on a malformed URL;
    /// a Redis that is down means the local split until it is back.
    pub async fn open(
        url: &str,
        prefix: &str,
        timeout: Duration,
    ) -> redis::RedisResult<RedisQuotas> {
        let client = Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(PROBE_TIMEOUT))
            .set_response_timeout(Some(PROBE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(PROBE_EVERY);
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        let inner = Arc::new(Inner {
            conn,
            script: Script::new(GCRA),
            prefix: prefix.to_owned(),
            timeout,
            up: AtomicBool::new(false),
            fallbacks: Default::default(),
            warned: Mutex::new((None, 0)),
        });
        if !inner.reach().await {
            tracing::warn!(
                "shared quotas: Redis not reachable at start; this replica enforces its local share until it is"
            );
        }
        tokio::spawn(probe(Arc::downgrade(&inner)));
        Ok(RedisQuotas { inner })
    }

    /// Takes one request from each cell in order, in one round trip: `Ok(None)`
    /// when all admitted it, `Ok(Some((i, wait)))` when cell `i` refused it, or
    /// why the caller must fall back to the local split (counted and logged here).
    pub async fn take(&self, cells: &[Cell]) -> Result<Option<(usize, Duration)>, Fallback> {
        let i = &self.inner;
        if !i.up.load(Ordering::Acquire) {
            return Err(self.fell_back(Fallback::Down, None));
        }
        let mut call = i.script.prepare_invoke();
        for c in cells {
            call.key(format!("{}{}", i.prefix, c.key))
                .arg(c.interval_us)
                .arg(c.burst);
        }
        let mut conn = i.conn.clone();
        let answer: Result<redis::RedisResult<(i64, i64)>, _> =
            tokio::time::timeout(i.timeout, call.invoke_async(&mut conn)).await;
        match answer {
            Ok(Ok((0, _))) => Ok(None),
            Ok(Ok((n, wait))) => match usize::try_from(n - 1).ok().filter(|n| *n < cells.len()) {
                Some(idx) => Ok(Some((
                    idx,
                    Duration::from_micros(u64::try_from(wait).unwrap_or(0)),
                ))),
                None => Err(self.fell_back(Fallback::Error, Some("unexpected script answer"))),
            },
            Ok(Err(e)) => Err(self.fell_back(Fallback::Error, Some(&e.to_string()))),
            Err(_) => Err(self.fell_back(Fallback::Timeout, None)),
        }
    }

    /// Whether the last exchange with Redis succeeded (the `karibche_limits_backend_up` gauge).
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Acquire)
    }

    /// Checks that fell back to the local split, by reason.
    pub fn fallbacks(&self) -> [(Fallback, u64); Fallback::ALL.len()] {
        Fallback::ALL.map(|f| (f, self.inner.fallbacks[f as usize].load(Ordering::Relaxed)))
    }

    fn fell_back(&self, why: Fallback, err: Option<&str>) -> Fallback {
        let i = &self.inner;
        i.fallbacks[why as usize].fetch_add(1, Ordering::Relaxed);
        if why != Fallback::Down {
            i.up.store(false, Ordering::Release);
        }
        if let Ok(mut w) = i.warned.lock() {
            let now = Instant::now();
            if w.0.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
                tracing::warn!(
                    reason = why.as_str(),
                    err = err.unwrap_or(""),
                    not_logged = w.1,
                    "shared quotas unavailable: this replica enforces its local share (limits.replicas) until Redis is back"
                );
                *w = (Some(now), 0);
            } else {
                w.1 += 1;
            }
        }
        why
    }
}

impl Inner {
    /// Pings Redis and loads the script (so the first check after a restart
    /// needs no second trip); marks the backend up when both succeed.
    async fn reach(&self) -> bool {
        let mut conn = self.conn.clone();
        let ping = redis::cmd("PING");
        let ok = matches!(
            tokio::time::timeout(PROBE_TIMEOUT, ping.query_async::<String>(&mut conn)).await,
            Ok(Ok(_))
        ) && matches!(
            tokio::time::timeout(
                PROBE_TIMEOUT,
                self.script.prepare_invoke().load_async(&mut conn)
            )
            .await,
            Ok(Ok(_))
        );
        if ok {
            self.up.store(true, Ordering::Release);
        }
        ok
    }
}

/// Probes Redis while the backend is marked down; ends when the backend is dropped.
async fn probe(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(i) = inner.upgrade() else { return };
        if !i.up.load(Ordering::Acquire) && i.reach().await {
            tracing::info!("shared quotas: Redis reachable again, quotas shared across replicas");
        }
    }
}

#[cfg(test)]
mod tests;
