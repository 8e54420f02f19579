//! The administrators' API: the gateway's own state, read over the gateway
//! by the officers who administer it — mostly through the web console.
//!
//! ```text
//! GET /v1/admin/policy                                  the policy as loaded
//! GET /v1/admin/explain?agency=&purpose=&method=&path=&case=
//! GET /v1/admin/reloads[?old=VERSION&new=VERSION]       reload events; the sets held; their difference in words
//! GET /v1/admin/shadow                                  shadow grants
//! GET /v1/admin/certificates                            certificates and CRLs, days left
//! GET /v1/admin/providers                               breakers, provider slots, quotas and their refusals
//! GET /v1/admin/latency[?by=agency|provider]            p50/p90/p99 per minute
//! ```
//!
//! Why a provider and not console pages reading the gateway's memory: so the
//! policy decides who administers (a grant on `admin/<service>` under the
//! purpose [`ADMINISTRATION`], with its legal basis), quotas apply, and every
//! read — an explain, a diff — leaves its audit record like any API read.
//! None of these answers holds personal data; the explain form may name a
//! person in the imagined path, which the record keeps as the API path.
//!
//! What the gateway does not hold itself is in [`Sources`]: the policy sets
//! this node loaded (kept by the reloader), the configuration naming the
//! certificate files, and the per-minute latency snapshots ([`latency`]).

pub mod latency;

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::audit::{allow_only, parse_query, ApiError};
use super::{Builtin, Call, Serving};
use crate::audit::{Attempt, AuditError};
use crate::config::Config;
use crate::gateway::exchange::Exchange;
use crate::gateway::refusal::Refusal;
use crate::gateway::release::minimise;
use crate::gateway::release::Answer;
use crate::gateway::Gateway;
use crate::policy::{Grant, Policy, Upstream};
use crate::runtime::reload::policy::PolicyHistory;

pub use super::audit::ADMINISTRATION;

/// The name after `builtin:` in the providers table.
pub const ADMIN_BUILTIN: &str = "admin";
/// Reload events listed, newest first.
pub const RELOAD_EVENTS: i64 = 100;

/// What the administrators' API reads beyond the gateway's own state.
#[derive(Debug)]
pub struct Sources {
    /// The policy sets this node loaded, with their quotas (the reloader adds to it).
    pub history: Arc<PolicyHistory>,
    /// The configuration: which certificate and CRL files the node uses.
    pub config: Arc<Config>,
    /// Per-minute snapshots of the request latency histogram.
    pub latency: latency::Ring,
}

/// The administrators' API, `builtin:admin`.
pub struct AdminApi;

impl Builtin for AdminApi {
    fn name(&self) -> &'static str {
        ADMIN_BUILTIN
    }

    fn serve<'a>(
        &'a self,
        call: Call<'a>,
        exchange: &'a mut Exchange,
        _ahead: &'a mut Option<Attempt>,
    ) -> Serving<'a> {
        Box::pin(async move {
            let mut value = answer(&call).await.map_err(|e| Refusal::audit_api(&e))?;
            let released = minimise::apply(
                &mut value,
                &call.allow.fields,
                None,
                &call.service.subject_field,
            );
            exchange.released_fields(released.fields);
            let body = Bytes::from(
                serde_json::to_vec(&value)
                    .map_err(|e| Refusal::audit_api(&ApiError::Audit(AuditError::Json(e))))?,
            );
            exchange.released_body(&body);
            Ok(Answer {
                status: StatusCode::OK,
                body,
                content_type: "application/json",
            })
        })
    }
}

/// The whole answer of one request, before the grant's fields minimise it.
async fn answer(call: &Call<'_>) -> Result<Value, ApiError> {
    if !call.route.rest.is_empty() {
        return Err(ApiError::NotFound);
    }
    let params = parse_query(call.parts.uri.query().unwrap_or_default())?;
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let gateway = call.gateway;
    let sources = &gateway.administration;
    match call.route.service {
        "policy" => {
            allow_only(&params, &[])?;
            Ok(policy_json(call.policy))
        }
        "explain" => {
            allow_only(&params, &["agency", "purpose", "method", "path", "case"])?;
            Ok(json!({"explanation": explain(
                call.policy,
                &get("agency"),
                &get("purpose"),
                &get("method"),
                &get("path"),
                &get("case"),
            )}))
        }
        "reloads" => {
            allow_only(&params, &["old", "new"])?;
            reloads(gateway, call.policy, &get("old"), &get("new")).await
        }
        "shadow" => {
            allow_only(&params, &[])?;
            Ok(shadow_json(call.policy))
        }
        "certificates" => {
            allow_only(&params, &[])?;
            Ok(certificates_json(&sources.config))
        }
        "providers" => {
            allow_only(&params, &[])?;
            Ok(providers_json(gateway, call.policy))
        }
        "latency" => {
            allow_only(&params, &["by"])?;
            let by = match get("by").as_str() {
                "" | "agency" => latency::By::Agency,
                "provider" => latency::By::Provider,
                _ => return Err(ApiError::BadRequest("by must be agency or provider".into())),
            };
            Ok(sources.latency.answer(&gateway.metrics, by))
        }
        _ => Err(ApiError::NotFound),
    }
}

/// A grant as the administrators' pages show it.
fn grant_json(g: &Grant) -> Value {
    json!({
        "id": g.id.as_ref(),
        "provider": g.provider,
        "service": g.service,
        "operations": g.operations.iter().map(|o| o.as_str()).collect::<Vec<_>>(),
        "purposes": g.purposes.iter().map(|p| p.code.to_string()).collect::<Vec<_>>(),
        "fields": g.fields.paths(),
        "shadow": g.shadow,
        "restricted": g.restricted,
        "consent": g.consent_required,
        "case": g.case_required,
        "valid_from": g.valid_from.map(|d| d.to_string()),
        "valid_until": g.valid_until.map(|d| d.to_string()),
        "location": format!("{}:{}", g.location.file.display(), g.location.line),
    })
}

/// The policy as loaded: agencies with their certificate matchers and grants, purposes, services.
pub fn policy_json(policy: &Policy) -> Value {
    let mut agencies: Vec<Value> = policy
        .agencies()
        .map(|a| {
            let c = &a.certificate;
            let certificate: Vec<String> = [
                c.uri_san
                    .iter()
                    .map(|s| format!("URI {s}"))
                    .collect::<Vec<_>>(),
                c.dns_san.iter().map(|s| format!("DNS {s}")).collect(),
                c.subject.iter().map(|s| format!("subject {s}")).collect(),
                c.sha256.iter().map(|s| format!("SHA-256 {s}")).collect(),
            ]
            .concat();
            json!({
                "id": a.id,
                "name": a.name,
                "certificate": certificate,
                "require_bound_tokens": a.require_bound_tokens,
                "grants": a.grants.iter().map(grant_json).collect::<Vec<_>>(),
            })
        })
        .collect();
    agencies.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    let mut purposes: Vec<Value> = policy
        .purposes()
        .map(|p| json!({"code": p.code, "title": p.title, "legal_basis": p.legal_basis}))
        .collect();
    purposes.sort_by(|a, b| a["code"].as_str().cmp(&b["code"].as_str()));
    let services: Vec<Value> = policy
        .providers()
        .flat_map(|p| {
            p.services.iter().map(move |s| {
                json!({
                    "provider": p.id,
                    "service": s.id,
                    "title": s.title,
                    "operations": s.operations.iter().map(|o| o.as_str()).collect::<Vec<_>>(),
                })
            })
        })
        .collect();
    json!({
        "version": policy.version(),
        "agencies": agencies,
        "purposes": purposes,
        "services": services,
    })
}

/// The decision for an imagined request and the grant that makes it, as `policy explain` says it.
pub fn explain(
    policy: &Policy,
    agency: &str,
    purpose: &str,
    method: &str,
    path: &str,
    case: &str,
) -> String {
    let operation = http::Method::from_bytes(method.as_bytes())
        .ok()
        .and_then(|m| crate::policy::Operation::from_method(&m));
    match (crate::policy::split_gateway_path(path), operation) {
        (None, _) => format!("{path:?} is not a gateway path /v1/{{provider}}/{{service}}/…"),
        (_, None) => format!("method {method:?} is not forwarded by the gateway"),
        (Some((provider, service)), Some(operation)) => {
            let req = crate::policy::DecisionRequest {
                agency,
                provider,
                service,
                operation,
                purpose,
                case_ref: Some(case).filter(|c| !c.is_empty()),
            };
            policy.explain(&req, OffsetDateTime::now_utc().date())
        }
    }
}

/// The shadow grants of the policy, by agency.
pub fn shadow_json(policy: &Policy) -> Value {
    let grants: Vec<Value> = policy
        .agencies()
        .flat_map(|a| {
            a.grants.iter().filter(|g| g.shadow).map(|g| {
                let mut v = grant_json(g);
                v["agency"] = json!(a.id);
                v
            })
        })
        .collect();
    json!({"version": policy.version(), "grants": grants})
}

/// The policy-reload events of the log (every node's), the sets this node holds, and the
/// difference between two of them when `old` and `new` name held versions.
async fn reloads(
    gateway: &Gateway,
    policy: &Policy,
    old: &str,
    new: &str,
) -> Result<Value, ApiError> {
    let history = &gateway.administration.history;
    // Events have no provider: the (provider, service, ts) index finds them without
    // reading the requests' records.
    let events: Vec<(String, String, i64, String, Option<String>)> = sqlx::query_as(
        "SELECT ts, node, seq, policy_version, reason FROM audit_log \
         WHERE provider IS NULL AND method = 'EVENT' AND path = 'policy-reload' \
         ORDER BY ts DESC, node, seq DESC LIMIT $1",
    )
    .bind(RELOAD_EVENTS)
    .fetch_all(gateway.audit.store().pool())
    .await
    .map_err(AuditError::from)?;
    let held = history.sets();
    let events: Vec<Value> = events
        .into_iter()
        .map(|(ts, node, seq, version, reason)| {
            json!({
                "ts": ts,
                "node": node,
                "seq": seq,
                "version": version,
                "reason": reason,
                "held": held.iter().any(|l| l.policy.version() == version),
            })
        })
        .collect();
    let sets: Vec<Value> = held
        .iter()
        .rev()
        .map(|l| {
            json!({
                "version": l.policy.version(),
                "at": l.at,
                "trigger": l.trigger,
                "in_force": l.policy.version() == policy.version(),
            })
        })
        .collect();
    let diff = if old.is_empty() && new.is_empty() {
        Value::Null
    } else {
        let (Some(o), Some(n)) = (history.get(old), history.get(new)) else {
            return Err(ApiError::BadRequest(format!(
                "this node holds the last {} policy sets it loaded; {old:?} or {new:?} is not among them",
                crate::runtime::reload::policy::HISTORY
            )));
        };
        let text = crate::policy::diff(&o.policy, &n.policy);
        json!({
            "old": old,
            "new": new,
            "text": if text.is_empty() { "No agency gains or loses access, and no purpose changes.".to_owned() } else { text },
        })
    };
    Ok(json!({
        "version": policy.version(),
        "events": events,
        "sets": sets,
        "diff": diff,
    }))
}

/// Every certificate and CRL the configuration names, with the days left.
pub fn certificates_json(config: &Config) -> Value {
    let now = OffsetDateTime::now_utc();
    let mut certificates = Vec::new();
    let mut problems = Vec::new();
    for item in crate::identity::inventory::inventory(config) {
        match item {
            Ok(e) => certificates.push(json!({
                "label": e.label,
                "path": e.path.display().to_string(),
                "subject": e.subject,
                "not_after": OffsetDateTime::from_unix_timestamp(e.not_after)
                    .map(crate::audit::record::format_ts)
                    .unwrap_or_default(),
                "days_left": (e.days_left(now) * 10.0).floor() / 10.0,
                "crl": e.is_crl,
            })),
            Err(err) => problems.push(err.to_string()),
        }
    }
    certificates.sort_by(|a, b| {
        a["days_left"]
            .as_f64()
            .partial_cmp(&b["days_left"].as_f64())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    json!({
        "now": crate::audit::record::format_ts(now),
        "certificates": certificates,
        "problems": problems,
    })
}

/// Providers with their breakers and slots, and the quotas in force with their refusals.
fn providers_json(gateway: &Gateway, policy: &Policy) -> Value {
    let states = gateway.providers.states();
    let l = &gateway.administration.config.limits;
    let providers: Vec<Value> = policy
        .providers()
        .map(|p| {
            let state = states.iter().find(|(id, _)| *id == p.id).map(|(_, s)| s);
            let (upstream, in_process) = match &p.upstream {
                Upstream::Url(u) => (u.clone(), false),
                Upstream::Builtin(n) => (format!("builtin:{n}"), super::find(n).is_some()),
            };
            // A provider answered in-process is never forwarded to: it has no breaker.
            let breaker = match state {
                Some(s) => s.breaker,
                None if in_process => "none: answered in-process",
                None => "not asked yet",
            };
            json!({
                "id": p.id,
                "title": p.title,
                "upstream": upstream,
                "breaker": breaker,
                "retry_after_seconds": state.and_then(|s| s.retry_after).map(|d| d.as_secs()),
                "in_flight": state.map_or(0, |s| s.in_flight),
                "opened": state.map_or(0, |s| s.opened),
                "waited": state.map_or(0, |s| s.waited),
                "wait_timeouts": state.map_or(0, |s| s.wait_timeouts),
                "agencies": state.map(|s| s.agencies.iter().map(|a| json!({
                    "agency": a.agency, "in_flight": a.in_flight, "waiting": a.waiting,
                })).collect::<Vec<_>>()).unwrap_or_default(),
            })
        })
        .collect();
    let rate =
        |r: &Option<crate::limits::Rate>| r.map_or("unlimited".to_owned(), |r| r.to_string());
    let quotas = gateway.administration.history.current().map(|c| {
        let q = &c.quotas;
        json!({
            "agency": rate(&q.agency),
            "officer": rate(&q.officer),
            "agencies": q.agencies.iter().map(|(id, a)| json!({
                "agency": id,
                "agency_rate": a.agency.map(|r| r.to_string()),
                "officer_rate": a.officer.map(|r| r.to_string()),
            })).collect::<Vec<_>>(),
            "grants": q.grants.iter().map(|((agency, provider, service), r)| json!({
                "agency": agency, "provider": provider, "service": service, "rate": r.to_string(),
            })).collect::<Vec<_>>(),
        })
    });
    let refusals: Vec<Value> = latency::quota_refusals(&gateway.metrics)
        .into_iter()
        .map(|(agency, quota, n)| json!({"agency": agency, "quota": quota, "refused": n}))
        .collect();
    json!({
        "settings": {
            "concurrency": l.provider_concurrency,
            "agency_share": l.provider_agency_share,
            "wait_ms": u64::try_from(l.provider_wait.as_millis()).unwrap_or(u64::MAX),
            "breaker_failures": l.breaker_failures,
            "breaker_open_seconds": l.breaker_open.as_secs(),
        },
        "providers": providers,
        "quotas": quotas,
        "quota_refusals": refusals,
        "limiter_keys": gateway.rate.keys(),
        "shared_quotas": gateway.rate.shared().is_some(),
        "replicas": l.replicas,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_policy() -> Policy {
        Policy::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap()
    }

    #[test]
    fn the_policy_answer_lists_grants_with_their_place() {
        let p = repo_policy();
        let v = policy_json(&p);
        assert_eq!(v["version"], p.version());
        let psda = v["agencies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == "psda")
            .unwrap();
        let location = psda["grants"][0]["location"].as_str().unwrap();
        assert!(location.contains("psda.toml:"), "{location}");
        assert!(v["purposes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["code"] == ADMINISTRATION));
    }

    #[test]
    fn explain_says_what_policy_explain_says() {
        let p = repo_policy();
        let said = explain(
            &p,
            "mia-border",
            "border-control",
            "GET",
            "/v1/registry/persons/RF-1",
            "",
        );
        assert!(said.contains("mia-border"), "{said}");
        assert!(explain(&p, "x", "y", "GET", "/elsewhere", "").contains("not a gateway path"));
        assert!(explain(&p, "x", "y", "BREW", "/v1/a/b", "").contains("not forwarded"));
    }
}
