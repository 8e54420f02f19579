//! The auditors' API: the audit log read over mutual TLS on the gateway
//! itself, for tools.
//!
//! ```text
//! GET /v1/audit/records?subject=&agency=&officer=&purpose=&provider=&service=&decision=&since=&until=&node=&shadow_diff=&limit=&format=json|jsonl
//! GET /v1/audit/report?subject=
//! GET /v1/audit/chains[?verify=true]
//! ```
//!
//! The log is a provider like any other: `providers.toml` names a provider
//! `audit` with `upstream = "builtin:audit"` and the services `records` and
//! `report`, and agencies hold grants on it. So a request passes the whole
//! pipeline (agency, token, decide, limit) and leaves its own audit record
//! before any answer — reads of the log are logged. Only the last step
//! differs: the gateway answers from its database instead of forwarding, and
//! the grant's fields minimise each record as they would a provider's.
//!
//! Scope: a grant used with the purpose [`SUPERVISION`] (the Personal Data
//! Protection Service, `pdps`) sees every agency's records; under any other
//! purpose (each agency's `internal-audit`) the caller sees its own agency's
//! records only — insider misuse is found there first.
//!
//! What an agency's own view must not give back:
//!
//! - **What its grant hid.** The record of a read under a pseudonymising
//!   grant names the real subjects, because the data subject's report and the
//!   supervisory authority need them. The agency's own view of such a record
//!   withholds `subjects` (and says so in `withheld`), and a `subject=` filter
//!   does not match it, so its auditors cannot link the pseudonyms their
//!   agency received to register ids. The supervisory authority sees them: it
//!   receives no register data to link them with, and answers the subjects'
//!   complaints.
//! - **A restricted interest.** A query naming a data subject, from an agency
//!   that holds restricted grants (the State Security Service), tells as much
//!   about the agency's interest in the person as its reads do; its record is
//!   restricted like them, and kept out of the subject's report for as long.

use bytes::Bytes;
use http::{header, HeaderMap, StatusCode};

use super::{Builtin, Call, Serving};
use crate::audit::report::{subject_report_with, NameKind, ReportOptions, LOG_BUILTIN};
use crate::audit::{Attempt, AuditError, AuditLog, Filter};
use crate::gateway::exchange::Exchange;
use crate::gateway::refusal::Refusal;
use crate::gateway::release::minimise;
use crate::gateway::release::Answer;
use crate::policy::{FieldSet, Policy, Upstream};

/// The auditors' API, `builtin:audit`.
pub struct AuditApi;

impl Builtin for AuditApi {
    fn name(&self) -> &'static str {
        LOG_BUILTIN
    }

    fn serve<'a>(
        &'a self,
        call: Call<'a>,
        exchange: &'a mut Exchange,
        _ahead: &'a mut Option<Attempt>,
    ) -> Serving<'a> {
        Box::pin(async move {
            let officer = call.officer;
            let asker = Asker {
                agency: call.agency,
                purpose: &officer.purpose,
            };
            let ask = Ask {
                service: call.route.service,
                rest: call.route.rest,
                query: call.parts.uri.query(),
            };
            let served = serve(
                &call.gateway.audit,
                call.policy,
                asker,
                ask,
                &call.parts.headers,
                &call.allow.fields,
                exchange,
            )
            .await
            .map_err(|e| Refusal::audit_api(&e))?;
            exchange.released_body(&served.body);
            Ok(Answer {
                status: served.status,
                body: served.body,
                content_type: served.content_type,
            })
        })
    }
}
/// The purpose under which an audit grant reaches every agency's records.
pub const SUPERVISION: &str = "supervision";
/// The purpose under which administrators read the gateway's state
/// ([`super::admin`]) and, of the log, only where shadow decisions differ.
pub const ADMINISTRATION: &str = "policy-administration";
/// The purpose under which a public service hall answers a person's request for their own
/// report (`psda`, the console's printable report): the report covers every agency, as the
/// person would receive it, and a grant under it names no other service.
pub const SUBJECT_ACCESS: &str = "subject-access-request";
/// Records returned when the request names no `limit`.
pub const DEFAULT_LIMIT: i64 = 1000;
/// The most records one request returns.
pub const MAX_LIMIT: i64 = 10_000;

/// Whether `provider` is the audit log itself (served in-process).
pub fn is_builtin(policy: &Policy, provider: &str) -> bool {
    matches!(policy.provider(provider).map(|p| &p.upstream), Some(Upstream::Builtin(n)) if n == LOG_BUILTIN)
}

/// Who asks, as the pipeline established it.
#[derive(Debug, Clone, Copy)]
pub struct Asker<'a> {
    /// The calling agency.
    pub agency: &'a str,
    /// The purpose the officer's token states.
    pub purpose: &'a str,
}

/// What a request to the auditors' API asks for.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// `records`, `report` or `chains`.
    pub service: &'a str,
    /// The path after the service (must be empty).
    pub rest: &'a str,
    /// The raw query string.
    pub query: Option<&'a str>,
}

/// An answer of the auditors' API.
#[derive(Debug)]
pub struct Served {
    /// `200 OK`.
    pub status: StatusCode,
    /// The minimised answer.
    pub body: Bytes,
    /// `application/json` or `application/jsonl`.
    pub content_type: &'static str,
}

/// Why the auditors' API refused or failed a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The query string is malformed or names an unknown parameter.
    #[error("{0}")]
    BadRequest(String),
    /// No such service or path under `/v1/audit/`.
    #[error("no such audit service")]
    NotFound,
    /// The caller asked for another agency's records without the supervision purpose.
    #[error("this purpose reaches only the calling agency's own records")]
    OutOfScope,
    /// Reading the log failed.
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// Answers one request of the auditors' API, recording what it names and releases on the exchange.
///
/// `fields` are the grant's fields: each record (or the report) is minimised
/// to them, like a provider's answer.
pub async fn serve(
    audit: &AuditLog,
    policy: &Policy,
    asker: Asker<'_>,
    ask: Ask<'_>,
    headers: &HeaderMap,
    fields: &FieldSet,
    exchange: &mut Exchange,
) -> Result<Served, ApiError> {
    if !ask.rest.is_empty() {
        return Err(ApiError::NotFound);
    }
    let params = parse_query(ask.query.unwrap_or_default())?;
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let administration = ask.service == "records" && asker.purpose == ADMINISTRATION;
    let own_only = asker.purpose != SUPERVISION
        && !(ask.service == "report" && asker.purpose == SUBJECT_ACCESS)
        && !administration
        && ask.service != "chains";
    let agency = match get("agency") {
        Some(a) if own_only && a != asker.agency => return Err(ApiError::OutOfScope),
        Some(a) => Some(a),
        None if own_only => Some(asker.agency.to_owned()),
        None => None,
    };
    let subject = get("subject");
    let shadow_diff = match get("shadow_diff").as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return Err(ApiError::BadRequest(
                "shadow_diff must be true or false".into(),
            ))
        }
    };
    if administration && (!shadow_diff || subject.is_some()) {
        return Err(ApiError::BadRequest(format!(
            "under {ADMINISTRATION} the log is read only where shadow decisions differ \
             (shadow_diff=true), and never by data subject"
        )));
    }
    if let Some(s) = &subject {
        exchange.subject(s);
        if holds_restricted_grants(policy, asker.agency) {
            exchange.restrict();
        }
    }
    match ask.service {
        "records" => {
            allow_only(
                &params,
                &[
                    "subject",
                    "agency",
                    "officer",
                    "purpose",
                    "provider",
                    "service",
                    "decision",
                    "since",
                    "until",
                    "node",
                    "shadow_diff",
                    "limit",
                    "format",
                ],
            )?;
            let limit = match get("limit") {
                Some(l) => l
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!("limit must be 1 to {MAX_LIMIT}"))
                    })?,
                None => DEFAULT_LIMIT,
            };
            let jsonl = match get("format").as_deref() {
                Some("jsonl") => true,
                Some("json") => false,
                Some(_) => return Err(ApiError::BadRequest("format must be json or jsonl".into())),
                None => accepts_jsonl(headers),
            };
            let filter = Filter {
                subject,
                agency,
                officer: get("officer"),
                purpose: get("purpose"),
                provider: get("provider"),
                service: get("service"),
                decision: get("decision"),
                since: get("since"),
                until: get("until"),
                node: get("node"),
                shadow_diff,
                limit: Some(limit),
                ..Filter::default()
            };
            let by_subject = filter.subject.is_some();
            let records = crate::audit::query(audit.store(), &filter).await?;
            let mut released = Vec::new();
            let mut body = Vec::new();
            let mut values = Vec::with_capacity(records.len());
            for record in &records {
                let hides = own_only && record.entry.pseudonymised;
                if hides && by_subject {
                    continue;
                }
                let mut value = serde_json::to_value(record).map_err(AuditError::Json)?;
                let r = minimise::apply(&mut value, fields, None, "subjects");
                released.extend(r.fields);
                if hides {
                    withhold_subjects(&mut value);
                }
                values.push(value);
            }
            // Line and paragraph separators escaped: a value never splits a line.
            if jsonl {
                for v in &values {
                    crate::audit::query::write_json_line(&mut body, v)?;
                }
            } else {
                crate::audit::query::write_json(&mut body, &values)?;
            }
            released.sort_unstable();
            released.dedup();
            exchange.released_fields(released);
            Ok(Served {
                status: StatusCode::OK,
                body: Bytes::from(body),
                content_type: if jsonl {
                    "application/jsonl"
                } else {
                    "application/json"
                },
            })
        }
        "report" => {
            allow_only(&params, &["subject", "agency"])?;
            let subject =
                subject.ok_or_else(|| ApiError::BadRequest("subject is required".into()))?;
            let options = ReportOptions {
                restricted_delay: audit.restricted_report_delay(),
                hide_pseudonymised: own_only,
                log_providers: log_providers(policy),
                agency,
            };
            let name_of = |kind: NameKind, id: &str| match kind {
                NameKind::Agency => policy.agency(id).map(|a| a.name.clone()),
                NameKind::Purpose => policy.purpose(id).map(|p| p.title.clone()),
            };
            let report = subject_report_with(audit.store(), &subject, &options, &name_of).await?;
            let mut value = serde_json::to_value(&report).map_err(AuditError::Json)?;
            exchange.released_fields(minimise::apply(&mut value, fields, None, "subject").fields);
            Ok(Served {
                status: StatusCode::OK,
                body: Bytes::from(serde_json::to_vec(&value).map_err(AuditError::Json)?),
                content_type: "application/json",
            })
        }
        "chains" => {
            allow_only(&params, &["verify"])?;
            let verify = match get("verify").as_deref() {
                None | Some("false") => false,
                Some("true") => true,
                Some(_) => return Err(ApiError::BadRequest("verify must be true or false".into())),
            };
            let mut value = chains(audit, verify).await?;
            exchange.released_fields(minimise::apply(&mut value, fields, None, "subject").fields);
            Ok(Served {
                status: StatusCode::OK,
                body: Bytes::from(serde_json::to_vec(&value).map_err(AuditError::Json)?),
                content_type: "application/json",
            })
        }
        _ => Err(ApiError::NotFound),
    }
}

/// Each node's chain head and last signed checkpoint; with `verify`, every chain verified.
async fn chains(audit: &AuditLog, verify: bool) -> Result<serde_json::Value, AuditError> {
    use serde_json::json;
    let store = audit.store();
    // The primary key (node, seq) answers both without reading the records.
    let heads: Vec<(String, i64)> =
        sqlx::query_as("SELECT node, MAX(seq) FROM audit_log GROUP BY node ORDER BY node")
            .fetch_all(store.pool())
            .await?;
    let mut nodes = Vec::with_capacity(heads.len());
    for (node, seq) in heads {
        let head: Option<(String, String)> =
            sqlx::query_as("SELECT ts, hash FROM audit_log WHERE node = $1 AND seq = $2")
                .bind(&node)
                .bind(seq)
                .fetch_optional(store.pool())
                .await?;
        let (ts, hash) = head.unwrap_or_default();
        let checkpoint = crate::audit::checkpoint::list(store, &node)
            .await?
            .pop()
            .map(|c| json!({"seq": c.seq, "ts": c.ts, "hash": c.hash, "signature_valid": c.verify(None).is_ok()}));
        nodes.push(json!({"node": node, "head": {"seq": seq, "ts": ts, "hash": hash}, "checkpoint": checkpoint}));
    }
    let verified = if verify {
        let report = crate::audit::chain::verify(store, None).await?;
        Some(
            report
                .nodes
                .iter()
                .map(|n| {
                    json!({
                        "node": n.node,
                        "records": n.records,
                        "checkpoints": n.checkpoints,
                        "intact": n.broken_at.is_none() && n.rolled_back.is_none(),
                        "broken_at": n.broken_at.as_ref().map(|(seq, _)| seq),
                        "unknown_outcomes": n.unknown_outcomes.len(),
                        "result": n.to_string(),
                    })
                })
                .collect::<Vec<_>>(),
        )
    } else {
        None
    };
    Ok(json!({"nodes": nodes, "verified": verified}))
}

/// Whether the agency holds any grant marked `restricted`: its interest in a person is itself restricted.
pub fn holds_restricted_grants(policy: &Policy, agency: &str) -> bool {
    policy
        .agency(agency)
        .is_some_and(|a| a.grants.iter().any(|g| g.restricted))
}

/// The providers that are the audit log itself: reads of them are reads of the log, not of a record.
pub fn log_providers(policy: &Policy) -> Vec<String> {
    policy
        .providers()
        .filter(|p| is_builtin(policy, &p.id))
        .map(|p| p.id.clone())
        .collect()
}

/// Removes `subjects` from a record as released, naming what was withheld.
fn withhold_subjects(value: &mut serde_json::Value) {
    if let Some(map) = value.as_object_mut() {
        if map.remove("subjects").is_some() {
            map.insert("withheld".to_owned(), serde_json::json!(["subjects"]));
        }
    }
}

pub(super) fn allow_only(params: &[(String, String)], known: &[&str]) -> Result<(), ApiError> {
    match params.iter().find(|(k, _)| !known.contains(&k.as_str())) {
        Some((k, _)) => Err(ApiError::BadRequest(format!(
            "unknown parameter {k:?} (known: {})",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

fn accepts_jsonl(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/jsonl") || v.contains("application/x-ndjson"))
}

/// Splits a query string into decoded pairs; a repeated or undecodable
/// parameter is refused, and so is a value over
/// [`MAX_QUERY_VALUE_CHARS`](crate::audit::text::MAX_QUERY_VALUE_CHARS)
/// characters or holding control characters (it would reach the request's
/// own record, as a subject or in the path).
pub(super) fn parse_query(query: &str) -> Result<Vec<(String, String)>, ApiError> {
    use crate::audit::text;
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = || ApiError::BadRequest("malformed percent-encoding in the query".into());
        let (k, v) = (
            crate::query::decode(k).ok_or_else(bad)?,
            crate::query::decode(v).ok_or_else(bad)?,
        );
        let shown = text::shorten(&k, 32);
        if let Err(unfit) = text::check(&k, 32) {
            return Err(ApiError::BadRequest(format!("parameter {shown:?} {unfit}")));
        }
        if let Err(unfit) = text::check(&v, text::MAX_QUERY_VALUE_CHARS) {
            return Err(ApiError::BadRequest(format!(
                "the value of parameter {shown:?} {unfit}"
            )));
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(ApiError::BadRequest(format!("parameter {k:?} given twice")));
        }
        out.push((k, v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_decoded_and_checked() {
        let p = parse_query("subject=RF-1&since=2026-01-01T00%3A00%3A00Z&x=a+b").unwrap();
        assert_eq!(p[0], ("subject".into(), "RF-1".into()));
        assert_eq!(p[1].1, "2026-01-01T00:00:00Z");
        assert_eq!(p[2].1, "a b");
        assert!(parse_query("a=1&a=2").is_err());
        assert!(parse_query("a=%zz").is_err());
        assert!(parse_query("a=%e2%82").is_err());
        assert!(allow_only(&p, &["subject", "since"]).is_err());
        assert_eq!(crate::gateway::exchange::digest(b"abc").len(), 64);
    }
}
