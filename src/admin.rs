//! Health, readiness and metrics for operators (plain HTTP, private interface).
//!
//! `/healthz` answers while the process runs; `/readyz` only once the
//! database, the policies and every listener are up (and the database still
//! answers); `/metrics` is OpenMetrics text (`prometheus-client`): the metrics
//! of [`crate::metrics`] plus what the audit writer, limiters and breakers
//! report, read into a registry of their own at each scrape.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::audit::AuditLog;
use crate::gateway::forward::breaker::{ProviderState, Providers};
use crate::limits::Limits;
use crate::metrics::{counter, counters, gauge, gauges, Metrics, Registry};
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
            "/metrics" => {
                self.metrics_response(wants_openmetrics(req.headers()))
                    .await
            }
            _ => Problem::not_found("no such admin endpoint").to_response(),
        }
    }

    /// Whether every listener is up, the database answers and the audit log can be written.
    async fn readiness(&self) -> (bool, bool, bool) {
        let listening = self.ready.load(Ordering::Acquire);
        let database = tokio::time::timeout(Duration::from_secs(2), self.store.ping())
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false);
        // A log that cannot be written means every data request gets 503: not ready.
        let audit = !self.audit.stats().failing;
        (listening, database, audit)
    }

    async fn readyz(&self) -> Response<Body> {
        let (listening, database, audit) = self.readiness().await;
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
            }),
        )
    }

    async fn metrics_response(&self, openmetrics: bool) -> Response<Body> {
        let mut more = Registry::with_prefix("karibche");
        let (listening, database, audit) = self.readiness().await;
        more.register(
            "ready",
            "1 while /readyz answers 200 (listeners up, database answering, audit log writable)",
            gauge(i64::from(listening && database && audit)),
        );
        more.register(
            "database_up",
            "1 while the database answers within 2 s",
            gauge(i64::from(database)),
        );
        let a = self.audit.stats();
        more.register(
            "audit_records",
            "Audit records committed",
            counter(a.committed),
        );
        more.register(
            "audit_batches",
            "Audit transactions committed (group commits)",
            counter(a.batches),
        );
        more.register(
            "audit_failed_batches",
            "Audit transactions that failed",
            counter(a.failed_batches),
        );
        more.register(
            "audit_queue_depth",
            "Records waiting for the audit writer",
            gauge(a.queue_depth as i64),
        );
        let witnesses = self.audit.witnesses().snapshot();
        more.register(
            "audit_witness_behind",
            "Records in signed tree heads a witness has not cosigned yet",
            gauges(
                ["witness", ""],
                witnesses.iter().map(|(name, w)| {
                    (
                        [name.as_str(), ""],
                        i64::try_from(w.behind).unwrap_or(i64::MAX),
                    )
                }),
            ),
        );
        let commits = self.audit.histograms();
        more.register(
            "audit_commit_duration_seconds",
            "Time from an audit transaction's begin to its commit",
            commits.seconds,
        );
        more.register(
            "audit_batch_records",
            "Records per committed audit transaction (group commit)",
            commits.records,
        );
        more.register(
            "audit_failing",
            "1 while the audit log cannot be written (every data request gets 503)",
            gauge(i64::from(a.failing)),
        );
        let policy = self.policy.load();
        more.register(
            "policy_info",
            "The policy version in force (value 1)",
            gauges(["version", ""], [([policy.version(), ""], 1)]),
        );
        more.register(
            "rate_limit_unrecorded",
            "Rate-limited requests not recorded one by one (each counted in a summary record)",
            counter(self.audit.refusals().unrecorded()),
        );
        more.register(
            "rate_limit_summaries",
            "Summary records of rate-limited requests",
            counter(self.audit.refusals().summaries()),
        );
        more.register(
            "rate_limit_keys",
            "Agencies and officers with limiter state in memory",
            gauge(self.limits.keys() as i64),
        );
        more.register(
            "policy_versions_in_cluster",
            "Distinct policy versions among the live replicas on this database (more than 1: replicas disagree)",
            gauge(self.cluster.by_version().len() as i64),
        );
        if let Some(shared) = self.limits.shared() {
            more.register(
                "limits_backend_up",
                "1 while the shared-quota backend (Redis) answers; 0: this replica enforces its local share",
                gauge(i64::from(shared.is_up())),
            );
            let fallbacks = shared.fallbacks();
            more.register(
                "limits_backend_fallbacks",
                "Quota checks that took the local share because Redis did not answer in time",
                counters(
                    ["reason", ""],
                    fallbacks.iter().map(|(why, n)| ([why.as_str(), ""], *n)),
                ),
            );
        }
        let states = self.providers.states();
        let per_provider = |f: fn(&ProviderState) -> i64| {
            gauges(
                ["provider", ""],
                states.iter().map(|(p, s)| ([p.as_str(), ""], f(s))),
            )
        };
        let per_provider_total = |f: fn(&ProviderState) -> u64| {
            counters(
                ["provider", ""],
                states.iter().map(|(p, s)| ([p.as_str(), ""], f(s))),
            )
        };
        more.register(
            "provider_breaker_open",
            "1 while a provider's circuit breaker is open or half-open",
            per_provider(|s| i64::from(s.breaker != "closed")),
        );
        more.register(
            "provider_breaker_opened",
            "Times a provider's circuit breaker opened",
            per_provider_total(|s| s.opened),
        );
        more.register(
            "provider_in_flight",
            "Requests in flight to a provider",
            per_provider(|s| s.in_flight as i64),
        );
        // Fair shares (src/gateway/forward/breaker.rs): agency labels come from the policy, so they stay few.
        let per_agency = |waiting: bool| {
            gauges(
                ["provider", "agency"],
                states.iter().flat_map(|(p, s)| {
                    s.agencies.iter().map(move |a| {
                        let n = if waiting { a.waiting } else { a.in_flight };
                        ([p.as_str(), a.agency.as_str()], n as i64)
                    })
                }),
            )
        };
        more.register(
            "provider_agency_in_flight",
            "Requests in flight to a provider per agency",
            per_agency(false),
        );
        more.register(
            "provider_agency_waiting",
            "Requests waiting for a provider slot per agency",
            per_agency(true),
        );
        more.register(
            "provider_waited",
            "Requests that waited for a provider slot",
            per_provider_total(|s| s.waited),
        );
        more.register(
            "provider_wait_timeouts",
            "Requests refused because no provider slot came free in time",
            per_provider_total(|s| s.wait_timeouts),
        );
        metrics_answer(self.metrics.render(&more, openmetrics), openmetrics)
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

/// Whether a scraper asks for OpenMetrics (Prometheus does); a plain client gets the classic text format.
pub fn wants_openmetrics(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

/// A `/metrics` answer: `text` as [`Metrics::render`] wrote it.
pub fn metrics_answer(text: String, openmetrics: bool) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::content_type(openmetrics)),
    );
    resp
}
