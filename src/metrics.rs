//! The process-wide metrics operators read at `/metrics` (served by the admin endpoint).
//!
//! Every room counts here (requests, refusals, provider calls, handshakes,
//! overload bounds, reloads, quotas, certificate expiry) and none needs the
//! admin server to do so: this is a leaf module that imports nothing of the
//! crate. The metrics are `prometheus-client`'s, which encodes OpenMetrics
//! text and escapes every label value; [`Metrics::render`] adds what other
//! rooms report at scrape time (a [`Registry`] the admin endpoint fills) and
//! the process's own figures from `/proc`.
//!
//! Cardinality is bounded by construction: agencies, providers and services
//! are labels only as the policy names them (the caller maps anything else to
//! [`OTHER`]), reasons and kinds are the code's own constants, and no label
//! ever holds an officer, a person or anything else a request chooses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use http::StatusCode;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::Registry;

/// The label value for an agency, provider or service the policy does not name.
pub const OTHER: &str = "other";
/// The label value where a request never got as far as naming one.
pub const NONE: &str = "none";

/// Request and provider latency bucket bounds, in seconds: up to and beyond
/// the default upstream timeout (10 s) and the body timeout (30 s).
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0,
];

/// The listeners counted separately.
const LISTENERS: [&str; 2] = ["gateway", "registry"];

/// What a gateway request is counted by.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The calling agency as the policy names it, or [`NONE`].
    pub agency: String,
    /// The provider asked, as the policy names it, [`OTHER`] or [`NONE`].
    pub provider: String,
    /// The service asked, as the policy names it, [`OTHER`] or [`NONE`].
    pub service: String,
    /// `2xx`, `4xx`, `5xx`, …
    pub class: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    agency: String,
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderKindLabels {
    provider: String,
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuotaLabels {
    agency: String,
    quota: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerReasonLabels {
    listener: String,
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerKindLabels {
    listener: String,
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    cert: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    commit: String,
    build_date: String,
}

type Histograms<S> = Family<S, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Process-wide metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Histograms<RequestLabels>,
    denials: Family<ReasonLabels, Counter>,
    failures: Family<ReasonLabels, Counter>,
    upstream_duration: Histograms<ProviderLabels>,
    upstream_errors: Family<ProviderKindLabels, Counter>,
    quota_refusals: Family<QuotaLabels, Counter>,
    handshake_failures: Family<ListenerReasonLabels, Counter>,
    open_connections: Family<ListenerLabels, Gauge>,
    overload: Family<ListenerKindLabels, Counter>,
    audit_failures: Counter,
    policy_reloads: Counter,
    policy_reload_failures: Counter,
    certificates: Family<CertLabels, Gauge>,
    // Per listener, for the tests' and the runtime's own reading.
    handshake_totals: [AtomicU64; LISTENERS.len()],
    // (listener, kind) → count, read back by `overloads`.
    overload_totals: Mutex<Vec<((&'static str, &'static str), u64)>>,
}

/// `metric`, registered in `registry` as `name` with `help`; the handle that updates it.
fn registered_with<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// [`registered_with`] a new, empty metric.
fn registered<M: prometheus_client::registry::Metric + Clone + Default>(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> M {
    registered_with(registry, name, help, M::default())
}

fn listener_index(name: &str) -> usize {
    LISTENERS.iter().position(|l| *l == name).unwrap_or(0)
}

/// This binary's version, commit and build date (set by `build.rs`).
pub fn build_facts() -> (&'static str, &'static str, &'static str) {
    (
        env!("CARGO_PKG_VERSION"),
        env!("KARIBCHE_BUILD_COMMIT"),
        env!("KARIBCHE_BUILD_DATE"),
    )
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric, registered once under the `karibche_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("karibche");
        let requests: Family<RequestLabels, Counter> = registered(
            &mut registry,
            "requests",
            "Gateway requests by agency, provider, service and status class",
        );
        let request_duration: Histograms<RequestLabels> = registered_with(
            &mut registry,
            "request_duration_seconds",
            "Time from request to response, by agency, provider, service and status class",
            Family::new_with_constructor(latency_histogram),
        );
        let denials: Family<ReasonLabels, Counter> = registered(
            &mut registry,
            "denials",
            "Requests refused by the gateway's checks or the policy, by agency and reason code",
        );
        let failures: Family<ReasonLabels, Counter> = registered(&mut registry, "failures", "Allowed requests that did not complete (provider or gateway failure, provider 404/422/409), by agency and reason code");
        let upstream_duration: Histograms<ProviderLabels> = registered_with(
            &mut registry,
            "upstream_duration_seconds",
            "Time a provider took to answer, body included, by provider",
            Family::new_with_constructor(latency_histogram),
        );
        let upstream_errors: Family<ProviderKindLabels, Counter> = registered(&mut registry, "upstream_errors", "Provider calls that failed, by provider and kind (unreachable, timeout, too_large, server_error)");
        let quota_refusals: Family<QuotaLabels, Counter> = registered(
            &mut registry,
            "quota_refusals",
            "Requests refused by a quota, by agency and quota (agency, officer, grant)",
        );
        let handshake_failures: Family<ListenerReasonLabels, Counter> = registered(
            &mut registry,
            "tls_handshake_failures",
            "Failed or timed-out TLS handshakes, by listener and reason",
        );
        let open_connections: Family<ListenerLabels, Gauge> =
            registered(&mut registry, "open_connections", "TLS connections open");
        let overload: Family<ListenerKindLabels, Counter> = registered(
            &mut registry,
            "overload",
            "Connections and requests cut off or refused by an overload bound, by kind",
        );
        let audit_failures: Counter = registered(
            &mut registry,
            "audit_refusals",
            "Requests answered 503 because the audit record could not be committed",
        );
        let policy_reloads: Counter = registered(
            &mut registry,
            "policy_reloads",
            "Policy reloads that swapped in a new set",
        );
        let policy_reload_failures: Counter = registered(
            &mut registry,
            "policy_reload_failures",
            "Policy reloads refused because the new set is invalid; the old set stays",
        );
        let certificates: Family<CertLabels, Gauge> = registered(
            &mut registry,
            "certificate_expiry_timestamp_seconds",
            "A certificate's notAfter (a CRL's nextUpdate) as a Unix timestamp",
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        let (version, commit, build_date) = build_facts();
        build_info
            .get_or_create(&BuildLabels {
                version: version.to_owned(),
                commit: commit.to_owned(),
                build_date: build_date.to_owned(),
            })
            .set(1);
        registry.register(
            "build_info",
            "The running binary's version, commit and build date (value 1)",
            build_info,
        );
        for l in LISTENERS {
            let _ = open_connections.get_or_create(&ListenerLabels {
                listener: l.to_owned(),
            });
        }
        Metrics {
            registry,
            requests,
            request_duration,
            denials,
            failures,
            upstream_duration,
            upstream_errors,
            quota_refusals,
            handshake_failures,
            open_connections,
            overload,
            audit_failures,
            policy_reloads,
            policy_reload_failures,
            certificates,
            handshake_totals: Default::default(),
            overload_totals: Mutex::default(),
        }
    }

    /// Counts one finished gateway request (labels as the policy names them).
    pub fn request_done(
        &self,
        agency: &str,
        provider: &str,
        service: &str,
        status: StatusCode,
        elapsed: Duration,
    ) {
        let labels = RequestLabels {
            agency: agency.to_owned(),
            provider: provider.to_owned(),
            service: service.to_owned(),
            class: format!("{}xx", (status.as_u16() / 100).clamp(1, 5)),
        };
        self.requests.get_or_create(&labels).inc();
        self.request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a refusal: a denial (the caller's or the policy's side) or a failure of an allowed request.
    pub fn refused(&self, agency: &str, reason: &'static str, denial: bool) {
        let labels = ReasonLabels {
            agency: agency.to_owned(),
            reason: reason.to_owned(),
        };
        if denial {
            self.denials.get_or_create(&labels).inc();
        } else {
            self.failures.get_or_create(&labels).inc();
        }
    }

    /// Observes one provider call's time (answered or not).
    pub fn upstream_done(&self, provider: &str, elapsed: Duration) {
        self.upstream_duration
            .get_or_create(&ProviderLabels {
                provider: provider.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a failed provider call: `unreachable`, `timeout`, `too_large` or `server_error`.
    pub fn upstream_error(&self, provider: &str, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&ProviderKindLabels {
                provider: provider.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Counts a request refused by a quota (`agency`, `officer` or `grant`).
    pub fn quota_refused(&self, agency: &str, quota: &'static str) {
        self.quota_refusals
            .get_or_create(&QuotaLabels {
                agency: agency.to_owned(),
                quota: quota.to_owned(),
            })
            .inc();
    }

    /// Counts a request refused because its audit record could not be committed.
    pub fn audit_failure(&self) {
        self.audit_failures.inc();
    }

    /// Counts a policy reload that swapped in a new policy set.
    pub fn policy_reloaded(&self) {
        self.policy_reloads.inc();
    }

    /// Counts a policy reload refused because the new set is broken (the old set stays).
    pub fn policy_reload_failed(&self) {
        self.policy_reload_failures.inc();
    }

    /// Policy reloads so far: (swapped in, refused).
    pub fn policy_reload_counts(&self) -> (u64, u64) {
        (self.policy_reloads.get(), self.policy_reload_failures.get())
    }

    /// Counts a connection or request cut off or refused by an overload bound
    /// (`handshake_timeout`, `header_timeout`, `header_too_large`, `idle_timeout`,
    /// `connections_total`, `connections_agency`, `provider_busy`, `breaker_open`,
    /// `pipelines_connection`).
    pub fn overload(&self, listener: &'static str, kind: &'static str) {
        self.overload
            .get_or_create(&ListenerKindLabels {
                listener: listener.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
        if let Ok(mut totals) = self.overload_totals.lock() {
            match totals.iter_mut().find(|(k, _)| *k == (listener, kind)) {
                Some((_, n)) => *n += 1,
                None => totals.push(((listener, kind), 1)),
            }
        }
    }

    /// How often an overload bound of this kind has acted on a listener.
    pub fn overloads(&self, listener: &str, kind: &str) -> u64 {
        self.overload_totals
            .lock()
            .map(|t| {
                t.iter()
                    .filter(|((l, k), _)| *l == listener && *k == kind)
                    .map(|(_, n)| *n)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Counts a failed TLS handshake on a listener, by reason (`timeout`, `no_certificate`, `revoked`, …).
    pub fn handshake_failed(&self, listener: &str, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&ListenerReasonLabels {
                listener: listener.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
        self.handshake_totals[listener_index(listener)].fetch_add(1, Ordering::Relaxed);
    }

    /// Handshake failures so far on a listener.
    pub fn handshake_failures(&self, listener: &str) -> u64 {
        self.handshake_totals[listener_index(listener)].load(Ordering::Relaxed)
    }

    /// Counts a connection that completed its handshake.
    pub fn connection_opened(&self, listener: &str) {
        self.open_connections
            .get_or_create(&ListenerLabels {
                listener: listener.to_owned(),
            })
            .inc();
    }

    /// Counts a connection that closed.
    pub fn connection_closed(&self, listener: &str) {
        self.open_connections
            .get_or_create(&ListenerLabels {
                listener: listener.to_owned(),
            })
            .dec();
    }

    /// Replaces the certificates whose expiry `/metrics` reports (label, notAfter in unix seconds).
    pub fn set_certificates(&self, certs: Vec<(String, i64)>) {
        self.certificates.clear();
        for (cert, not_after) in certs {
            self.certificates
                .get_or_create(&CertLabels { cert })
                .set(not_after);
        }
    }

    /// The exposition of these metrics, then of `more` (what other rooms
    /// report at scrape time), then the process's own figures: OpenMetrics
    /// text, or the Prometheus text format 0.0.4 for clients that ask for no
    /// OpenMetrics (`promtool check metrics`, `curl`).
    pub fn render(&self, more: &Registry, openmetrics: bool) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let mut process = Registry::with_prefix("process");
        process_metrics(&mut process);
        let registries = [&self.registry, more, &process];
        // Writing to a String cannot fail.
        let _ = if openmetrics {
            registries
                .iter()
                .try_for_each(|r| encode_registry(&mut out, r))
                .and_then(|()| encode_eof(&mut out))
        } else {
            registries
                .iter()
                .try_for_each(|r| prometheus_text::encode(&mut out, r))
        };
        out
    }
}

/// The `Content-Type` of [`Metrics::render`]'s answer.
pub fn content_type(openmetrics: bool) -> &'static str {
    if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    }
}

/// A gauge holding `v`, for the registries filled at scrape time.
pub fn gauge(v: i64) -> Gauge {
    let g = Gauge::default();
    g.set(v);
    g
}

/// A counter holding `v` (a total kept elsewhere), for the registries filled at scrape time.
pub fn counter(v: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(v);
    c
}

/// Label sets built at scrape time: `(name, value)` pairs.
pub type Labels = Vec<(String, String)>;

/// A family with one sample per `(label values, value)` under `names` (an
/// empty value leaves its label out), each set by `set`.
fn family<'a, M: Default, V>(
    names: [&'static str; 2],
    samples: impl IntoIterator<Item = ([&'a str; 2], V)>,
    set: impl Fn(&M, V),
) -> Family<Labels, M> {
    let family = Family::<Labels, M>::default();
    for (values, v) in samples {
        let labels: Labels = names
            .iter()
            .zip(values)
            .filter(|(_, value)| !value.is_empty())
            .map(|(n, value)| ((*n).to_owned(), value.to_owned()))
            .collect();
        set(&family.get_or_create(&labels), v);
    }
    family
}

/// A gauge family with one sample per `(labels, value)`, for the registries filled at scrape time.
pub fn gauges<'a>(
    names: [&'static str; 2],
    samples: impl IntoIterator<Item = ([&'a str; 2], i64)>,
) -> Family<Labels, Gauge> {
    family(names, samples, |g: &Gauge, v| {
        g.set(v);
    })
}

/// A counter family with one sample per `(labels, value)`, for the registries filled at scrape time.
pub fn counters<'a>(
    names: [&'static str; 2],
    samples: impl IntoIterator<Item = ([&'a str; 2], u64)>,
) -> Family<Labels, Counter> {
    family(names, samples, |c: &Counter, v| {
        c.inc_by(v);
    })
}

/// The standard `process_*` metrics, read from `/proc/self` (Linux; nothing elsewhere).
fn process_metrics(registry: &mut Registry) {
    const TICKS_PER_SECOND: f64 = 100.0;
    const PAGE_SIZE: i64 = 4096;
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    // (3-based in proc(5)): utime 14, stime 15, starttime 22, vsize 23, rss 24.
    if let (Some(utime), Some(stime)) = (field(11), field(12)) {
        let cpu = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        cpu.inc_by((utime + stime) as f64 / TICKS_PER_SECOND);
        registry.register("cpu_seconds", "User and system CPU time spent", cpu);
    }
    if let Some(vsize) = field(20) {
        registry.register(
            "virtual_memory_bytes",
            "Virtual memory size",
            gauge(vsize as i64),
        );
    }
    if let Some(rss) = field(21) {
        registry.register(
            "resident_memory_bytes",
            "Resident memory size",
            gauge(rss as i64 * PAGE_SIZE),
        );
    }
    if let (Some(start), Ok(uptime)) = (field(19), std::fs::read_to_string("/proc/uptime")) {
        let booted_for = uptime
            .split_whitespace()
            .next()
            .and_then(|u| u.parse::<f64>().ok())
            .unwrap_or(0.0);
        let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
        let started = now - booted_for + start as f64 / TICKS_PER_SECOND;
        registry.register(
            "start_time_seconds",
            "Start time of the process since the Unix epoch",
            gauge(started as i64),
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        registry.register(
            "open_fds",
            "Open file descriptors",
            gauge(fds.count() as i64),
        );
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
        let max = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<i64>().ok());
        if let Some(max) = max {
            registry.register("max_fds", "Maximum open file descriptors", gauge(max));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_openmetrics_text() {
        let m = Metrics::default();
        m.request_done("a", "p", "s", StatusCode::OK, Duration::from_millis(2));
        m.request_done(
            "a",
            "p",
            "s",
            StatusCode::FORBIDDEN,
            Duration::from_millis(1),
        );
        m.refused("a", "no_grant", true);
        m.refused("a", "provider_not_found", false);
        m.handshake_failed("gateway", "no_certificate");
        m.overload("gateway", "header_timeout");
        m.set_certificates(vec![("ca \"x\"\n".into(), 1_900_000_000)]);
        let out = m.render(&Registry::default(), true);
        for line in [
            "karibche_requests_total{agency=\"a\",provider=\"p\",service=\"s\",class=\"2xx\"} 1",
            "karibche_requests_total{agency=\"a\",provider=\"p\",service=\"s\",class=\"4xx\"} 1",
            "karibche_denials_total{agency=\"a\",reason=\"no_grant\"} 1",
            "karibche_failures_total{agency=\"a\",reason=\"provider_not_found\"} 1",
            "karibche_tls_handshake_failures_total{listener=\"gateway\",reason=\"no_certificate\"} 1",
            "karibche_overload_total{listener=\"gateway\",kind=\"header_timeout\"} 1",
            "karibche_certificate_expiry_timestamp_seconds{cert=\"ca \\\"x\\\"\\n\"} 1900000000",
            "le=\"30.0\"",
        ] {
            assert!(out.contains(line), "{line} missing from:\n{out}");
        }
        assert!(out.contains("karibche_build_info{"), "{out}");
        assert!(out.ends_with("# EOF\n"), "{out}");
        let classic = m.render(&Registry::default(), false);
        assert!(
            classic.contains("# TYPE karibche_requests_total counter"),
            "{classic}"
        );
        assert_eq!(m.overloads("gateway", "header_timeout"), 1);
        assert_eq!(m.handshake_failures("gateway"), 1);
    }
}
