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
}

impl AdminState {
    /// Answers one admin request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "the admin endpoint is read-only",
            )
            .to_response();
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
                "open_breakers": open,
                "providers": providers,
                // Witnesses never make the node unready: the log stays local and durable.
                "witnesses": self.audit.witnesses().snapshot().into_iter().map(|(name, w)| {
                    (name, serde_json::json!({"cosigned_size": w.cosigned, "behind": w.behind, "error": w.error}))
                }).collect::<serde_json::Map<_, _>>(),
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
        let _ = writeln!(
            out,
            "# HELP karibche_policy_info The policy version in force.\n# TYPE karibche_policy_info gauge\nkaribche_policy_info{{version=\"{}\"}} 1",
            self.policy.load().version()
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
        let mut resp = Response::new(Full::new(Bytes::from(out)));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        resp
    }
}
