//! What a benchmark run measured, and how it is printed.
//!
//! Latencies go into an HdrHistogram in microseconds (1 µs to 60 s, three
//! significant digits), so p99.9 and max are exact enough to compare runs
//! side by side. Every answer is counted by status; a request that got no
//! answer at all (connect, handshake or protocol failure) is counted by kind.
//! The last line of [`Report`]'s `Display` is a single `summary key=value …`
//! line that scripts read with `awk`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Highest latency the histogram holds, in microseconds (longer ones are clamped to it).
const MAX_MICROS: u64 = 60_000_000;

/// The measurements of one run.
#[derive(Debug, Clone)]
pub struct Report {
    /// What was run, e.g. `gateway open 1000/s http1`.
    pub label: String,
    /// Length of the measured window (warm-up excluded).
    pub elapsed: Duration,
    /// Latency of every measured request, µs (open loop: from its intended send time).
    pub latency: Histogram<u64>,
    /// Service time of every measured request, µs: from the actual send to the whole answer.
    pub service: Histogram<u64>,
    /// Answers by HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no answer, by what failed (`connect`, `handshake`, `http`).
    pub failures: BTreeMap<String, u64>,
    /// Requests sent before measuring (warm-up and discovery of document numbers), all answered 2xx.
    pub setup_ok: u64,
    /// Requests sent before measuring that were not answered 2xx.
    pub setup_errors: u64,
    /// Measured connections that only did a TLS handshake (no request; counted as requests, not as 2xx).
    pub handshakes_only: u64,
    /// Connections whose TLS handshake was a full one.
    pub full_handshakes: u64,
    /// Connections whose TLS handshake resumed an earlier session.
    pub resumed_handshakes: u64,
    /// CPU time (user + system) the watched process spent in the measured window.
    pub cpu: Option<Duration>,
    /// Resident memory of the watched process before and after, KiB (idle mode).
    pub rss_kib: Option<(u64, u64)>,
    /// Connections held open (idle mode).
    pub held_connections: u64,
    /// Request ids (`X-Request-Id`, the audit record's id) of the 2xx answers, when kept.
    pub request_ids: Vec<u128>,
}

impl Report {
    /// An empty report named `label`.
    pub fn new(label: impl Into<String>) -> Report {
        Report {
            label: label.into(),
            elapsed: Duration::ZERO,
            latency: new_histogram(),
            service: new_histogram(),
            statuses: BTreeMap::new(),
            failures: BTreeMap::new(),
            setup_ok: 0,
            setup_errors: 0,
            handshakes_only: 0,
            full_handshakes: 0,
            resumed_handshakes: 0,
            cpu: None,
            rss_kib: None,
            held_connections: 0,
            request_ids: Vec::new(),
        }
    }

    /// Records one answered request.
    pub fn answered(&mut self, status: u16, latency: Duration) {
        *self.statuses.entry(status).or_default() += 1;
        self.record_latency(latency);
    }

    /// Records one connection that only did its TLS handshake.
    pub fn handshake_done(&mut self, resumed: bool, latency: Duration) {
        self.handshakes_only += 1;
        if resumed {
            self.resumed_handshakes += 1;
        } else {
            self.full_handshakes += 1;
        }
        self.record_latency(latency);
    }

    /// Records one request that got no answer.
    pub fn failed(&mut self, kind: &str, latency: Duration) {
        *self.failures.entry(kind.to_owned()).or_default() += 1;
        self.record_latency(latency);
    }

    /// Records the service time of one measured request (open loop: the latency minus the wait for a sender).
    pub fn service(&mut self, time: Duration) {
        let _ = self.service.record(micros(time));
    }

    fn record_latency(&mut self, latency: Duration) {
        // Within the histogram's bounds, recording cannot fail.
        let _ = self.latency.record(micros(latency));
    }

    /// Adds another worker's measurements to these.
    pub fn merge(&mut self, other: &Report) {
        let _ = self.latency.add(&other.latency);
        let _ = self.service.add(&other.service);
        for (s, n) in &other.statuses {
            *self.statuses.entry(*s).or_default() += n;
        }
        for (k, n) in &other.failures {
            *self.failures.entry(k.clone()).or_default() += n;
        }
        self.setup_ok += other.setup_ok;
        self.setup_errors += other.setup_errors;
        self.handshakes_only += other.handshakes_only;
        self.full_handshakes += other.full_handshakes;
        self.resumed_handshakes += other.resumed_handshakes;
        self.held_connections += other.held_connections;
        self.request_ids.extend_from_slice(&other.request_ids);
    }

    /// Requests (or bare handshakes) measured, answered or not.
    pub fn requests(&self) -> u64 {
        self.statuses.values().sum::<u64>()
            + self.failures.values().sum::<u64>()
            + self.handshakes_only
    }

    /// Measured requests answered 2xx.
    pub fn ok(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    /// Measured requests not answered 2xx, and handshakes that failed.
    pub fn errors(&self) -> u64 {
        self.requests() - self.ok() - self.handshakes_only
    }

    /// Measured requests per second.
    pub fn throughput(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.requests() as f64 / secs
        } else {
            0.0
        }
    }

    /// A latency percentile (0–100) in milliseconds.
    pub fn percentile_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q / 100.0) as f64 / 1000.0
    }

    /// A service-time percentile (0–100) in milliseconds.
    pub fn service_ms(&self, q: f64) -> f64 {
        self.service.value_at_quantile(q / 100.0) as f64 / 1000.0
    }

    /// Measured requests per second of the watched process's CPU time.
    pub fn per_cpu_second(&self) -> Option<f64> {
        let cpu = self.cpu?.as_secs_f64();
        (cpu > 0.0).then(|| self.requests() as f64 / cpu)
    }

    /// Resident memory added per held connection, KiB.
    pub fn kib_per_connection(&self) -> Option<f64> {
        let (before, after) = self.rss_kib?;
        (self.held_connections > 0)
            .then(|| (after as f64 - before as f64) / self.held_connections as f64)
    }
}

/// A duration in whole microseconds, within the histogram's bounds.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(MAX_MICROS)
        .clamp(1, MAX_MICROS)
}

/// A histogram of microseconds, 1 µs to 60 s, three significant digits.
fn new_histogram() -> Histogram<u64> {
    // These bounds are valid constants; `new_with_bounds` fails only for invalid ones.
    Histogram::new_with_bounds(1, MAX_MICROS, 3).unwrap_or_else(|_| {
        Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits is valid"))
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "== {}", self.label)?;
        if self.requests() > 0 {
            writeln!(
                f,
                "  requests   {} in {:.1} s = {:.0}/s ({} 2xx, {} errors; before measuring: {} 2xx, {} errors)",
                self.requests(),
                self.elapsed.as_secs_f64(),
                self.throughput(),
                self.ok(),
                self.errors(),
                self.setup_ok,
                self.setup_errors
            )?;
            writeln!(
                f,
                "  latency ms p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                self.percentile_ms(50.0),
                self.percentile_ms(90.0),
                self.percentile_ms(99.0),
                self.percentile_ms(99.9),
                self.latency.max() as f64 / 1000.0
            )?;
            if !self.service.is_empty() {
                writeln!(
                    f,
                    "  service ms p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                    self.service_ms(50.0),
                    self.service_ms(90.0),
                    self.service_ms(99.0),
                    self.service_ms(99.9),
                    self.service.max() as f64 / 1000.0
                )?;
            }
            let statuses: Vec<String> = self
                .statuses
                .iter()
                .map(|(s, n)| format!("{s}: {n}"))
                .collect();
            writeln!(f, "  statuses   {}", statuses.join(", "))?;
        }
        if !self.failures.is_empty() {
            let failures: Vec<String> = self
                .failures
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect();
            writeln!(f, "  no answer  {}", failures.join(", "))?;
        }
        if self.full_handshakes + self.resumed_handshakes > 0 {
            writeln!(
                f,
                "  handshakes {} full, {} resumed",
                self.full_handshakes, self.resumed_handshakes
            )?;
        }
        if let Some(cpu) = self.cpu {
            writeln!(
                f,
                "  cpu        {:.2} s of the watched process = {:.2} cores; {:.0} requests per CPU-second",
                cpu.as_secs_f64(),
                cpu.as_secs_f64() / self.elapsed.as_secs_f64().max(1e-9),
                self.per_cpu_second().unwrap_or(0.0)
            )?;
        }
        if let (Some((before, after)), Some(per)) = (self.rss_kib, self.kib_per_connection()) {
            writeln!(
                f,
                "  memory     VmRSS {before} KiB -> {after} KiB with {} connections open = {per:.1} KiB per connection",
                self.held_connections
            )?;
        }
        write!(
            f,
            "summary label={} requests={} rps={:.1} ok={} errors={} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} p999_ms={:.3} max_ms={:.3} svc_p50_ms={:.3} svc_p99_ms={:.3} setup_ok={} setup_errors={} cpu_s={:.3} per_cpu_s={:.1} full_hs={} resumed_hs={} conns={} kib_per_conn={:.1}",
            self.label.replace(' ', "_"),
            self.requests(),
            self.throughput(),
            self.ok(),
            self.errors(),
            self.percentile_ms(50.0),
            self.percentile_ms(90.0),
            self.percentile_ms(99.0),
            self.percentile_ms(99.9),
            self.latency.max() as f64 / 1000.0,
            self.service_ms(50.0),
            self.service_ms(99.0),
            self.setup_ok,
            self.setup_errors,
            self.cpu.map(|c| c.as_secs_f64()).unwrap_or(0.0),
            self.per_cpu_second().unwrap_or(0.0),
            self.full_handshakes,
            self.resumed_handshakes,
            self.held_connections,
            self.kib_per_connection().unwrap_or(0.0),
        )?;
        writeln!(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_statuses_failures_and_percentiles() {
        let mut a = Report::new("a");
        for ms in 1..=100 {
            a.answered(200, Duration::from_millis(ms));
        }
        let mut b = Report::new("b");
        b.answered(429, Duration::from_millis(5));
        b.failed("connect", Duration::from_millis(7));
        a.merge(&b);
        a.elapsed = Duration::from_secs(2);
        assert_eq!(a.requests(), 102);
        assert_eq!(a.ok(), 100);
        assert_eq!(a.errors(), 2);
        assert!((a.throughput() - 51.0).abs() < 1e-9);
        let p50 = a.percentile_ms(50.0);
        assert!((49.0..=52.0).contains(&p50), "{p50}");
        let text = a.to_string();
        assert!(text.contains("429: 1"), "{text}");
        assert!(text.contains("connect: 1"), "{text}");
        assert!(text.lines().last().unwrap().starts_with("summary label=a "));
    }

    #[test]
    fn memory_per_connection() {
        let mut r = Report::new("idle");
        r.rss_kib = Some((10_000, 30_000));
        r.held_connections = 1000;
        assert_eq!(r.kib_per_connection(), Some(20.0));
    }
}
