//! Health, readiness and metrics for operators (plain HTTP, private interface).
//!
//! `/healthz` answers while the process runs; `/readyz` only once the
//! database, the policies and every listener are up (and the database still
//! answers); `/metrics` is Prometheus text format: the counters of
//! [`crate::metrics`] plus what the audit writer, limiters and breakers report.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::audit::AuditLog;
use crate::gateway::forward::breaker::Providers;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::problem::{json_response, Body, Problem};
use crate::store::Store;

/// What the admin endpoint reads.
pub struct AdminState {
    /// The counters.
    pub metrics: Arc<Metrics>,
    /// Set once every listener is up.
    pub ready: AtomicBool,
    /// The database, pinged by `/readyz`.
    pub store: Store,
    /// The audit writer, for its counters.
    pub audit: AuditLog,
    /// The policy in force, for its version.
    pub policy: Arc<ArcSwap<Policy>>,
    /// The rate limiters, for their counters.
    pub limits: Arc<Limits>,
    /// Providers' breakers, reported by `/readyz` and `/metrics`.
    pub providers: Arc<Providers>,
    /// The policy versions of the live replicas on this database (`runtime::cluster`).
    pub cluster: Arc<PolicyVersions>,
}

/// The policy version each live replica on the database runs, as last read.
#[derive(Debug, Default)]
pub struct PolicyVersions {
    /// (policy version, node) pairs, sorted.
    rows: ArcSwap<Vec<(String, String)>>,
}

impl PolicyVersions {
    /// Replaces the view with freshly read (version, node) rows.
    pub fn set(&self, rows: Vec<(String, String)>) {
        self.rows.store(Arc::new(rows));
    }

    /// Each version in use and the nodes running it.
    pub fn by_version(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut out = std::collections::BTreeMap::<String, Vec<String>>::new();
        for (v, n) in self.rows.load().iter() {
            out.entry(v.clone()).or_default().push(n.clone());
        }
        out
    }

    /// Whether live replicas run more than one policy version.
    pub fn mixed(&self) -> bool {
        self.by_version().len() > 1
    }

    /// `version: node, node; version: node` for a log line.
    pub fn describe(&self) -> String {
        self.by_version()
            .iter()
            .map(|(v, n)| format!("{v}: {}", n.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl AdminState {
    /// Answers one admin request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body> {
        if let Some(refused) = refuse_writes(req.method()) {
            return refused;
        }
        match req.uri().path() {
            "/healthz" => json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})),
            "/readyz" => self.readyz().await,
            "/metrics" => self.metrics_response(),
            _ => Problem::not_found("no such admin endpoint").to_response(),
        }
    }

    async fn readyz(&self) -> Response<Body> {
        let listening = self.ready.load(Ordering::Acquire);
        let database = tokio::time::timeout(Duration::from_secs(2), self.store.ping())
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false);
        // An open breaker is reported but keeps the gateway ready: every replica
        // shares the provider, so taking this one out of rotation would not help.
        let providers: serde_json::Map<String, serde_json::Value> = self
            .providers
            .states()
            .into_iter()
            .map(|(name, s)| {
                let mut v = serde_json::json!({"breaker": s.breaker, "in_flight": s.in_flight});
                if let Some(r) = s.retry_after {
                    v["retry_after_ms"] = serde_json::json!(r.as_millis() as u64);
                }
                (name, v)
            })
            .collect();
        let open: Vec<&String> = providers
            .iter()
            .filter(|(_, v)| v["breaker"] != "closed")
            .map(|(k, _)| k)
            .collect();
        // A log that cannot be written means every data request gets 503: not ready.
        let audit = !self.audit.stats().failing;
        let ok = listening && database && audit;
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json_response(
            status,
            &serde_json::json!({
                "status": if ok { "ready" } else { "not ready" },
                "listeners": listening,
                "database": database,
                "audit_log": audit,
                "policy_version": self.policy.load().version(),
                // Replicas on this database and the policy each runs; mixed is a warning, not unready.
                "policy_versions_in_cluster": self.cluster.by_version(),
                "mixed_policy_versions": self.cluster.mixed(),
                // Redis down keeps the node ready: it enforces its local share meanwhile.
                "quotas": match self.limits.shared() {
                    None => "local",
                    Some(s) if s.is_up() => "shared",
                    Some(_) => "local-fallback",
                },
                "open_breakers": open,
                "providers": providers,
                // Witnesses never make the node unready: the log stays local and durable.
                "witnesses": self.audit.witnesses().snapshot().into_iter().map(|(name, w)| {
                    (name, serde_json::json!({"cosigned_size": w.cosigned, "behind": w.behind, "error": w.error}))
                }).collect::<serde_json::Map<_, _>>(),
                // Nor does the time-stamping authority (null: none configured).
                "timestamps": self.audit.timestamps().snapshot().map(|t| {
                    serde_json::json!({"stamped_size": t.stamped, "behind": t.behind, "error": t.error})
                }),
            }),
        )
    }

    fn metrics_response(&self) -> Response<Body> {
        let mut out = String::with_capacity(4096);
        self.metrics.render(&mut out);
        let a = self.audit.stats();
        let _ = writeln!(
            out,
            "# HELP karibche_audit_records_total Audit records committed.\n# TYPE karibche_audit_records_total counter\nkaribche_audit_records_total {}",
            a.committed
        );
        let _ = writeln!(
            out,
            "# HELP karibche_audit_batches_total Audit transactions committed (group commits).\n# TYPE karibche_audit_batches_total counter\nkaribche_audit_batches_total {}",
            a.batches
        );
        let _ = writeln!(
            out,
            "# HELP karibche_audit_failed_batches_total Audit transactions that failed.\n# TYPE karibche_audit_failed_batches_total counter\nkaribche_audit_failed_batches_total {}",
            a.failed_batches
        );
        let _ = writeln!(
            out,
            "# HELP karibche_audit_queue_depth Records waiting for the audit writer.\n# TYPE karibche_audit_queue_depth gauge\nkaribche_audit_queue_depth {}",
            a.queue_depth
        );
        let _ = writeln!(
            out,
            "# HELP karibche_audit_witness_behind Records in signed tree heads a witness has not cosigned yet.\n# TYPE karibche_audit_witness_behind gauge"
        );
        for (name, w) in self.audit.witnesses().snapshot() {
            let _ = writeln!(
                out,
                "karibche_audit_witness_behind{{witness=\"{name}\"}} {}",
                w.behind
            );
        }
        if let Some(t) = self.audit.timestamps().snapshot() {
            let _ = writeln!(
                out,
                "# HELP karibche_audit_timestamp_behind Records in signed tree heads the time-stamping authority has not stamped yet.\n# TYPE karibche_audit_timestamp_behind gauge\nkaribche_audit_timestamp_behind {}",
                t.behind
            );
        }
        let _ = writeln!(
            out,
            "# HELP karibche_policy_info The policy version in force.\n# TYPE karibche_policy_info gauge\nkaribche_policy_info{{version=\"{}\"}} 1",
            self.policy.load().version()
        );
        let _ = writeln!(
            out,
            "# HELP karibche_policy_versions_in_cluster Distinct policy versions among the live replicas on this database (more than 1: replicas disagree).\n# TYPE karibche_policy_versions_in_cluster gauge\nkaribche_policy_versions_in_cluster {}",
            self.cluster.by_version().len()
        );
        let _ = writeln!(
            out,
            "# HELP karibche_rate_limit_unrecorded_total Rate-limited requests not recorded one by one (each counted in a summary record).\n# TYPE karibche_rate_limit_unrecorded_total counter\nkaribche_rate_limit_unrecorded_total {}",
            self.audit.refusals().unrecorded()
        );
        let _ = writeln!(
            out,
            "# HELP karibche_rate_limit_summaries_total Summary records of rate-limited requests.\n# TYPE karibche_rate_limit_summaries_total counter\nkaribche_rate_limit_summaries_total {}",
            self.audit.refusals().summaries()
        );
        let _ = writeln!(
            out,
            "# HELP karibche_rate_limit_keys Agencies and officers with limiter state in memory.\n# TYPE karibche_rate_limit_keys gauge\nkaribche_rate_limit_keys {}",
            self.limits.keys()
        );
        if let Some(shared) = self.limits.shared() {
            let _ = writeln!(
                out,
                "# HELP karibche_limits_backend_up 1 while the shared-quota backend (Redis) answers; 0: this replica enforces its local share.\n# TYPE karibche_limits_backend_up gauge\nkaribche_limits_backend_up {}",
                u8::from(shared.is_up())
            );
            let _ = writeln!(
                out,
                "# HELP karibche_limits_backend_fallbacks_total Quota checks that took the local share because Redis did not answer in time.\n# TYPE karibche_limits_backend_fallbacks_total counter"
            );
            for (why, n) in shared.fallbacks() {
                let _ = writeln!(
                    out,
                    "karibche_limits_backend_fallbacks_total{{reason=\"{}\"}} {n}",
                    why.as_str()
                );
            }
        }
        let states = self.providers.states();
        let _ = writeln!(
            out,
            "# HELP karibche_provider_breaker_open 1 while a provider's circuit breaker is open or half-open.\n# TYPE karibche_provider_breaker_open gauge"
        );
        for (p, s) in &states {
            let _ = writeln!(
                out,
                "karibche_provider_breaker_open{{provider=\"{p}\"}} {}",
                u8::from(s.breaker != "closed")
            );
        }
        let _ = writeln!(
            out,
            "# HELP karibche_provider_breaker_opened_total Times a provider's circuit breaker opened.\n# TYPE karibche_provider_breaker_opened_total counter"
        );
        for (p, s) in &states {
            let _ = writeln!(
                out,
                "karibche_provider_breaker_opened_total{{provider=\"{p}\"}} {}",
                s.opened
            );
        }
        let _ = writeln!(
            out,
            "# HELP karibche_provider_in_flight Requests in flight to a provider.\n# TYPE karibche_provider_in_flight gauge"
        );
        for (p, s) in &states {
            let _ = writeln!(
                out,
                "karibche_provider_in_flight{{provider=\"{p}\"}} {}",
                s.in_flight
            );
        }
        // Fair shares (src/gateway/forward/breaker.rs): agency labels come from the policy, so they stay few.
        for (name, help, kind) in [
            (
                "karibche_provider_agency_in_flight",
                "Requests in flight to a provider per agency.",
                "gauge",
            ),
            (
                "karibche_provider_agency_waiting",
                "Requests waiting for a provider slot per agency.",
                "gauge",
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (p, s) in &states {
                for a in &s.agencies {
                    let n = if name.ends_with("waiting") {
                        a.waiting
                    } else {
                        a.in_flight
                    };
                    let _ = writeln!(
                        out,
                        "{name}{{provider=\"{p}\",agency=\"{}\"}} {n}",
                        a.agency
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP karibche_provider_waited_total Requests that waited for a provider slot.\n# TYPE karibche_provider_waited_total counter"
        );
        for (p, s) in &states {
            let _ = writeln!(
                out,
                "karibche_provider_waited_total{{provider=\"{p}\"}} {}",
                s.waited
            );
        }
        let _ = writeln!(
            out,
            "# HELP karibche_provider_wait_timeouts_total Requests refused because no provider slot came free in time.\n# TYPE karibche_provider_wait_timeouts_total counter"
        );
        for (p, s) in &states {
            let _ = writeln!(
                out,
                "karibche_provider_wait_timeouts_total{{provider=\"{p}\"}} {}",
                s.wait_timeouts
            );
        }
        prometheus_text(out)
    }
}

/// `405` for anything but GET and HEAD: admin endpoints are read-only.
pub fn refuse_writes(method: &Method) -> Option<Response<Body>> {
    (method != Method::GET && method != Method::HEAD).then(|| {
        Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method not allowed",
            "the admin endpoint is read-only",
        )
        .to_response()
    })
}

/// A `/metrics` answer: `out` in the Prometheus text format.
pub fn prometheus_text(out: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(out)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}
