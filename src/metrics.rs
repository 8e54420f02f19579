//! The process-wide counters operators read at `/metrics` (served by the admin endpoint).
//!
//! Every room counts here (requests, denials, handshakes, overload bounds,
//! reloads, certificate expiry) and none needs the admin server to do so:
//! this is a leaf module that imports nothing of the crate. The counters are
//! plain atomics updated on the hot path; rendering reads them without locks.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use http::StatusCode;

/// Latency histogram bucket bounds, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// The listeners counted separately.
const LISTENERS: [&str; 2] = ["gateway", "registry"];

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    by_status: [AtomicU64; 6],
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    handshake_failures: [AtomicU64; LISTENERS.len()],
    open_connections: [AtomicI64; LISTENERS.len()],
    // Reason codes are static strings; denials are rare next to successes.
    denials: Mutex<BTreeMap<&'static str, u64>>,
    upstream_errors: AtomicU64,
    audit_failures: AtomicU64,
    policy_reloads: AtomicU64,
    policy_reload_failures: AtomicU64,
    // (label, notAfter unix seconds); days are computed at render time, so they count down.
    certificates: Mutex<Vec<(String, i64)>>,
    // Overload bounds that cut off or refused a connection or request, by listener and kind.
    overload: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

fn listener_index(name: &str) -> usize {
    LISTENERS.iter().position(|l| *l == name).unwrap_or(0)
}

impl Metrics {
    /// Counts one finished gateway request.
    pub fn request_done(&self, status: StatusCode, elapsed: Duration) {
        let class = (status.as_u16() / 100).min(5) as usize;
        self.by_status[class].fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Counts a denial by reason code.
    pub fn denied(&self, reason: &'static str) {
        if let Ok(mut m) = self.denials.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    /// Counts a failed or timed-out provider call.
    pub fn upstream_error(&self) {
        self.upstream_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request refused because its audit record could not be committed.
    pub fn audit_failure(&self) {
        self.audit_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a policy reload that swapped in a new policy set.
    pub fn policy_reloaded(&self) {
        self.policy_reloads.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a policy reload refused because the new set is broken (the old set stays).
    pub fn policy_reload_failed(&self) {
        self.policy_reload_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Policy reloads so far: (swapped in, refused).
    pub fn policy_reload_counts(&self) -> (u64, u64) {
        (
            self.policy_reloads.load(Ordering::Relaxed),
            self.policy_reload_failures.load(Ordering::Relaxed),
        )
    }

    /// Counts a connection or request cut off or refused by an overload bound
    /// (`handshake_timeout`, `header_timeout`, `header_too_large`, `idle_timeout`,
    /// `connections_total`, `connections_agency`, `provider_busy`, `breaker_open`,
    /// `pipelines_connection`).
    pub fn overload(&self, listener: &'static str, kind: &'static str) {
        if let Ok(mut m) = self.overload.lock() {
            *m.entry((listener, kind)).or_default() += 1;
        }
    }

    /// How often an overload bound of this kind has acted on a listener.
    pub fn overloads(&self, listener: &str, kind: &str) -> u64 {
        self.overload
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|((l, k), _)| *l == listener && *k == kind)
                    .map(|(_, n)| *n)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Counts a failed TLS handshake on a listener.
    pub fn handshake_failed(&self, listener: &str) {
        self.handshake_failures[listener_index(listener)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection that completed its handshake.
    pub fn connection_opened(&self, listener: &str) {
        self.open_connections[listener_index(listener)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection that closed.
    pub fn connection_closed(&self, listener: &str) {
        self.open_connections[listener_index(listener)].fetch_sub(1, Ordering::Relaxed);
    }

    /// Replaces the certificates whose expiry `/metrics` reports (label, notAfter in unix seconds).
    pub fn set_certificates(&self, certs: Vec<(String, i64)>) {
        if let Ok(mut c) = self.certificates.lock() {
            *c = certs;
        }
    }

    /// Handshake failures so far on a listener.
    pub fn handshake_failures(&self, listener: &str) -> u64 {
        self.handshake_failures[listener_index(listener)].load(Ordering::Relaxed)
    }

    /// Appends these counters in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP karibche_requests_total Gateway requests by status class.\n# TYPE karibche_requests_total counter"
        );
        for (i, c) in self.by_status.iter().enumerate().skip(1) {
            let _ = writeln!(
                out,
                "karibche_requests_total{{class=\"{i}xx\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP karibche_request_duration_seconds Time from request to response.\n# TYPE karibche_request_duration_seconds histogram"
        );
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "karibche_request_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                self.latency_buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "karibche_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}\nkaribche_request_duration_seconds_sum {}\nkaribche_request_duration_seconds_count {count}",
            self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "# HELP karibche_denials_total Requests refused, by reason code.\n# TYPE karibche_denials_total counter"
        );
        if let Ok(m) = self.denials.lock() {
            for (reason, n) in m.iter() {
                let _ = writeln!(out, "karibche_denials_total{{reason=\"{reason}\"}} {n}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP karibche_tls_handshake_failures_total Failed or timed-out TLS handshakes.\n# TYPE karibche_tls_handshake_failures_total counter"
        );
        for (i, l) in LISTENERS.iter().enumerate() {
            let _ = writeln!(
                out,
                "karibche_tls_handshake_failures_total{{listener=\"{l}\"}} {}",
                self.handshake_failures[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP karibche_open_connections TLS connections open.\n# TYPE karibche_open_connections gauge"
        );
        for (i, l) in LISTENERS.iter().enumerate() {
            let _ = writeln!(
                out,
                "karibche_open_connections{{listener=\"{l}\"}} {}",
                self.open_connections[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP karibche_overload_total Connections and requests cut off or refused by an overload bound, by kind.\n# TYPE karibche_overload_total counter"
        );
        if let Ok(m) = self.overload.lock() {
            for ((listener, kind), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "karibche_overload_total{{listener=\"{listener}\",kind=\"{kind}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP karibche_upstream_errors_total Provider calls that failed or timed out.\n# TYPE karibche_upstream_errors_total counter\nkaribche_upstream_errors_total {}",
            self.upstream_errors.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP karibche_audit_refusals_total Requests answered 503 because the audit record could not be committed.\n# TYPE karibche_audit_refusals_total counter\nkaribche_audit_refusals_total {}",
            self.audit_failures.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP karibche_policy_reloads_total Policy reloads that swapped in a new set.\n# TYPE karibche_policy_reloads_total counter\nkaribche_policy_reloads_total {}",
            self.policy_reloads.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP karibche_policy_reload_failures_total Policy reloads refused because the new set is invalid; the old set stays.\n# TYPE karibche_policy_reload_failures_total counter\nkaribche_policy_reload_failures_total {}",
            self.policy_reload_failures.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP karibche_certificate_expiry_days Days until a certificate's notAfter (a CRL's nextUpdate); negative once past.\n# TYPE karibche_certificate_expiry_days gauge"
        );
        if let Ok(certs) = self.certificates.lock() {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            for (label, not_after) in certs.iter() {
                let days = (not_after.saturating_sub(now)) as f64 / 86_400.0;
                let label = label.replace(['\\', '"', '\n'], "_");
                let _ = writeln!(
                    out,
                    "karibche_certificate_expiry_days{{cert=\"{label}\"}} {days:.3}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_prometheus_text() {
        let m = Metrics::default();
        m.request_done(StatusCode::OK, Duration::from_millis(2));
        m.request_done(StatusCode::FORBIDDEN, Duration::from_millis(1));
        m.denied("no_grant");
        m.handshake_failed("gateway");
        m.overload("gateway", "header_timeout");
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("karibche_requests_total{class=\"2xx\"} 1"));
        assert!(out.contains("karibche_requests_total{class=\"4xx\"} 1"));
        assert!(out.contains("karibche_denials_total{reason=\"no_grant\"} 1"));
        assert!(out.contains("karibche_request_duration_seconds_count 2"));
        assert!(out.contains("karibche_tls_handshake_failures_total{listener=\"gateway\"} 1"));
        assert!(
            out.contains("karibche_overload_total{listener=\"gateway\",kind=\"header_timeout\"} 1")
        );
        let in_ten_days = time::OffsetDateTime::now_utc().unix_timestamp() + 10 * 86_400 + 60;
        m.set_certificates(vec![("gateway".into(), in_ten_days)]);
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains("karibche_certificate_expiry_days{cert=\"gateway\"} 10.0"),
            "{out}"
        );
    }
}
