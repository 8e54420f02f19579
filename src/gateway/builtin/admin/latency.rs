//! Latency percentiles over time, from the gateway's own request histogram.
//!
//! `karibche_request_duration_seconds` (src/metrics.rs) is cumulative since
//! the process started, and prometheus-client gives its buckets back only as
//! exposition text. So once a minute [`run`] reads the histogram exactly as
//! `/metrics` serves it and keeps the cumulative bucket counts per agency and
//! per provider in a [`Ring`] of the last [`SNAPSHOTS`]; a minute's
//! distribution is the difference of two snapshots, and the last, partial
//! interval runs from the newest snapshot to now. Percentiles are read from
//! the buckets as Prometheus's `histogram_quantile` reads them (linear within
//! a bucket), so the console and a Prometheus dashboard show the same
//! figures. Why not time each request again for the console: the histogram
//! is already the measurement operators trust, and a second one on the hot
//! path would cost every request for a page few people open. The ring holds
//! this node's requests for the last hour, and starts empty at each start.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::metrics::{Metrics, Registry};

/// Snapshots kept: an hour of minutes.
pub const SNAPSHOTS: usize = 61;
/// How often a snapshot is taken.
pub const EVERY: Duration = Duration::from_secs(60);
/// The histogram read.
const HISTOGRAM: &str = "karibche_request_duration_seconds_bucket";
/// The quota refusals counter read for the providers' page.
const QUOTA_REFUSALS: &str = "karibche_quota_refusals_total";
/// The percentiles drawn.
pub const QUANTILES: [(&str, f64); 3] = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)];

/// How the requests are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    /// By the calling agency.
    Agency,
    /// By the provider asked.
    Provider,
}

impl By {
    fn as_str(self) -> &'static str {
        match self {
            By::Agency => "agency",
            By::Provider => "provider",
        }
    }
}

/// One series' cumulative bucket counts: `counts[i]` requests took at most `bounds[i]` seconds
/// (the last bound is +Inf).
#[derive(Debug, Clone, Default, PartialEq)]
struct Buckets {
    bounds: Vec<f64>,
    counts: Vec<u64>,
}

impl Buckets {
    fn add(&mut self, le: f64, n: u64) {
        match self.bounds.iter().position(|b| *b == le) {
            Some(i) => self.counts[i] += n,
            None => {
                let i = self.bounds.partition_point(|b| *b < le);
                self.bounds.insert(i, le);
                self.counts.insert(i, n);
            }
        }
    }

    /// The requests between `earlier` and `self` (same bounds; a series new since counts from zero).
    fn since(&self, earlier: Option<&Buckets>) -> Buckets {
        let counts = self
            .bounds
            .iter()
            .zip(&self.counts)
            .map(|(b, n)| {
                let before = earlier
                    .and_then(|e| e.bounds.iter().position(|x| x == b).map(|i| e.counts[i]))
                    .unwrap_or(0);
                n.saturating_sub(before)
            })
            .collect();
        Buckets {
            bounds: self.bounds.clone(),
            counts,
        }
    }

    fn total(&self) -> u64 {
        self.counts.last().copied().unwrap_or(0)
    }

    /// The `q` quantile in seconds, as `histogram_quantile` computes it; `None` without requests.
    fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let i = self.counts.iter().position(|c| *c as f64 >= rank)?;
        let upper = self.bounds[i];
        let (lower, below) = match i {
            0 => (0.0, 0),
            _ => (self.bounds[i - 1], self.counts[i - 1]),
        };
        if upper.is_infinite() {
            // Beyond the last finite bound nothing is known but that bound.
            return Some(lower);
        }
        let inside = (self.counts[i] - below) as f64;
        if inside == 0.0 {
            return Some(upper);
        }
        Some(lower + (upper - lower) * (rank - below as f64) / inside)
    }
}

/// The histogram at one instant, per agency and per provider.
#[derive(Debug, Clone)]
struct Snapshot {
    at: OffsetDateTime,
    agency: BTreeMap<String, Buckets>,
    provider: BTreeMap<String, Buckets>,
}

impl Snapshot {
    fn read(metrics: &Metrics) -> Snapshot {
        let text = metrics.render(&Registry::default(), false);
        let mut snap = Snapshot {
            at: OffsetDateTime::now_utc(),
            agency: BTreeMap::new(),
            provider: BTreeMap::new(),
        };
        for (labels, value) in samples(&text, HISTOGRAM) {
            let label = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let (Some(agency), Some(provider), Some(le)) =
                (label("agency"), label("provider"), label("le"))
            else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse::<f64>() {
                    Ok(v) => v,
                    Err(_) => continue,
                }
            };
            // Counts are whole numbers written as such; anything else is not ours.
            let n = value as u64;
            snap.agency.entry(agency).or_default().add(le, n);
            snap.provider.entry(provider).or_default().add(le, n);
        }
        snap
    }

    fn series(&self, by: By) -> &BTreeMap<String, Buckets> {
        match by {
            By::Agency => &self.agency,
            By::Provider => &self.provider,
        }
    }
}

/// The last [`SNAPSHOTS`] snapshots of this node's request histogram.
#[derive(Debug)]
pub struct Ring {
    snaps: Mutex<VecDeque<Snapshot>>,
}

impl Default for Ring {
    fn default() -> Self {
        Ring::new()
    }
}

impl Ring {
    /// An empty ring.
    pub fn new() -> Ring {
        Ring {
            snaps: Mutex::new(VecDeque::with_capacity(SNAPSHOTS)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Snapshot>> {
        // Only whole snapshots are pushed: a poisoned lock holds a valid ring.
        self.snaps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a snapshot now (the task does once a minute; tests may in between).
    pub fn record(&self, metrics: &Metrics) {
        let snap = Snapshot::read(metrics);
        let mut snaps = self.lock();
        snaps.push_back(snap);
        while snaps.len() > SNAPSHOTS {
            snaps.pop_front();
        }
    }

    /// p50, p90 and p99 for each interval between snapshots, the last one up to now.
    pub fn answer(&self, metrics: &Metrics, by: By) -> Value {
        let mut snaps: Vec<Snapshot> = self.lock().iter().cloned().collect();
        snaps.push(Snapshot::read(metrics));
        let names: BTreeSet<&String> = snaps.iter().flat_map(|s| s.series(by).keys()).collect();
        let intervals: Vec<Value> = snaps
            .windows(2)
            .map(|pair| {
                let (before, after) = (&pair[0], &pair[1]);
                let series: Vec<Value> = after
                    .series(by)
                    .iter()
                    .filter_map(|(name, b)| {
                        let d = b.since(before.series(by).get(name));
                        (d.total() > 0).then(|| {
                            let mut v = json!({"name": name, "count": d.total()});
                            for (k, q) in QUANTILES {
                                v[k] = json!(d.quantile(q));
                            }
                            v
                        })
                    })
                    .collect();
                json!({
                    "from": crate::audit::record::format_ts(before.at),
                    "until": crate::audit::record::format_ts(after.at),
                    "series": series,
                })
            })
            .collect();
        json!({
            "by": by.as_str(),
            "every_seconds": EVERY.as_secs(),
            "names": names,
            "intervals": intervals,
        })
    }
}

/// Takes a snapshot of the histogram at once and then every [`EVERY`], until `stop` turns true.
pub async fn run(
    sources: Arc<super::Sources>,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tick.tick() => sources.latency.record(&metrics),
        }
    }
}

/// Requests refused by a quota since the start, by agency and quota, as `/metrics` counts them.
pub fn quota_refusals(metrics: &Metrics) -> Vec<(String, String, u64)> {
    let text = metrics.render(&Registry::default(), false);
    samples(&text, QUOTA_REFUSALS)
        .filter_map(|(labels, v)| {
            let label = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            Some((label("agency")?, label("quota")?, v as u64))
        })
        .collect()
}

/// The samples of metric `name` in Prometheus exposition text: labels and value.
///
/// Only what prometheus-client writes is read: `name{k="v",…} value`, label
/// values escaped with `\\`, `\"` and `\n`. A line that does not parse is skipped.
fn samples<'a>(
    text: &'a str,
    name: &'a str,
) -> impl Iterator<Item = (Vec<(String, String)>, f64)> + 'a {
    text.lines().filter_map(move |line| {
        let rest = line.strip_prefix(name)?;
        let (labels, rest) = match rest.strip_prefix('{') {
            Some(inner) => labels(inner)?,
            None => (Vec::new(), rest),
        };
        let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
        Some((labels, value))
    })
}

/// `k="v",…}` → the pairs and what follows the `}`.
fn labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut out = Vec::new();
    loop {
        if let Some(rest) = s.strip_prefix('}') {
            return Some((out, rest));
        }
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        out.push((key.to_owned(), value));
        s = &rest[end + 1..];
        s = s.strip_prefix(',').unwrap_or(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn labels_are_read_with_their_escapes() {
        let text = "# HELP x\nx_bucket{a=\"q\\\"uote\",b=\"2\",le=\"+Inf\"} 7\nx_bucket 3\nx_other{a=\"1\"} 1\n";
        let got: Vec<_> = samples(text, "x_bucket").collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0[0], ("a".to_owned(), "q\"uote".to_owned()));
        assert_eq!(got[0].0[2].1, "+Inf");
        assert_eq!(got[0].1, 7.0);
        assert!(got[1].0.is_empty());
    }

    #[test]
    fn quantiles_are_read_as_histogram_quantile_reads_them() {
        let mut b = Buckets::default();
        for (le, n) in [(0.1, 50), (0.2, 90), (0.4, 100), (f64::INFINITY, 100)] {
            b.add(le, n);
        }
        let q = |x| b.quantile(x).unwrap();
        assert!((q(0.5) - 0.1).abs() < 1e-9, "{}", q(0.5));
        assert!((q(0.9) - 0.2).abs() < 1e-9);
        assert!((q(0.95) - 0.3).abs() < 1e-9, "{}", q(0.95));
        let mut slow = Buckets::default();
        slow.add(1.0, 0);
        slow.add(f64::INFINITY, 4);
        assert_eq!(
            slow.quantile(0.99),
            Some(1.0),
            "past the last bound: that bound"
        );
        assert_eq!(Buckets::default().quantile(0.5), None);
    }

    #[test]
    fn the_ring_gives_each_interval_its_own_requests() {
        let m = Metrics::new();
        let ring = Ring::new();
        let slow = Duration::from_millis(300);
        m.request_done("psda", "registry", "persons", StatusCode::OK, slow);
        ring.record(&m);
        for _ in 0..10 {
            m.request_done(
                "psda",
                "registry",
                "persons",
                StatusCode::OK,
                Duration::from_millis(3),
            );
        }
        m.request_done("pdps", "audit", "records", StatusCode::OK, slow);
        let v = ring.answer(&m, By::Agency);
        let intervals = v["intervals"].as_array().unwrap();
        assert_eq!(intervals.len(), 1, "one snapshot, then the live interval");
        let psda = intervals[0]["series"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "psda")
            .unwrap();
        assert_eq!(
            psda["count"], 10,
            "the slow request before the snapshot is not in it"
        );
        assert!(psda["p99"].as_f64().unwrap() <= 0.005);
        let by_provider = ring.answer(&m, By::Provider);
        assert!(by_provider["names"]
            .as_array()
            .unwrap()
            .contains(&json!("audit")));
        m.quota_refused("psda", "officer");
        assert_eq!(
            quota_refusals(&m),
            [("psda".to_owned(), "officer".to_owned(), 1)]
        );
    }
}
