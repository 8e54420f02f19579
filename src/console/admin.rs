//! The administrators' pages: the policy as loaded and "explain", the
//! history of policy reloads and the difference between two sets, shadow
//! grants and where they decide otherwise, certificates and CRLs, providers'
//! breakers and quotas, latency percentiles — and the hash chains, which
//! security officers open too.
//!
//! Each page is one or two reads of the administrators' API
//! ([`crate::gateway::builtin::admin`]) or the auditors' API through the
//! pipeline ([`super::via`]), with the officer's own token: the policy
//! decides who may open it (a grant under `policy-administration`), quotas
//! apply, and each read leaves its audit record. A page the officer may not
//! open is the API's refusal, with its record's id.

use std::collections::{BTreeMap, BTreeSet};

use askama::Template;
use http::Response;
use serde_json::Value;
use time::OffsetDateTime;

use super::pages::{api, query_string, render, text, who, Who, WINDOW_DAYS};
use super::{Console, Visit};
use crate::gateway::builtin::audit::MAX_LIMIT;
use crate::problem::Body;

/// Records where shadow decisions differ, listed on the shadow page (newest first).
pub const SHADOW_LISTED: usize = 100;

/// A page, or the page that stands in for it (the API's refusal, a failure).
pub type Page = Result<Response<Body>, Response<Body>>;

/// Reads `path` through the pipeline as the officer and parses its JSON answer.
async fn api_json(console: &Console, v: &Visit<'_>, path: &str) -> Result<Value, Response<Body>> {
    let body = api(console, v, path).await?;
    Ok(serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null))
}

fn list<'a>(v: &'a Value, k: &str) -> &'a [Value] {
    v.get(k)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn flag(v: &Value, k: &str) -> bool {
    v.get(k).and_then(Value::as_bool).unwrap_or(false)
}

// ---------------------------------------------------------------- the policy and explain

/// A grant, for display.
pub struct GrantRow {
    id: String,
    flags: String,
    service: String,
    operations: String,
    purposes: String,
    fields: String,
    location: String,
}

fn grant_row(g: &Value) -> GrantRow {
    GrantRow {
        id: text(g, "id"),
        flags: ["shadow", "restricted", "consent", "case"]
            .into_iter()
            .filter(|f| flag(g, f))
            .collect::<Vec<_>>()
            .join(", "),
        service: format!("{}/{}", text(g, "provider"), text(g, "service")),
        operations: text(g, "operations"),
        purposes: text(g, "purposes"),
        fields: text(g, "fields"),
        location: text(g, "location"),
    }
}

/// An agency, for display.
pub struct AgencyRow {
    id: String,
    name: String,
    certificate: String,
    grants: Vec<GrantRow>,
}

/// The explain form's fields.
#[derive(Default)]
pub struct Explain {
    agency: String,
    purpose: String,
    method: String,
    path: String,
    case: String,
}

#[derive(Template)]
#[template(path = "policy.html")]
struct PolicyPage<'a> {
    lang: &'a str,
    title: &'a str,
    who: Option<Who>,
    csrf: String,
    version: String,
    x: Explain,
    explained: Option<String>,
    agencies: Vec<AgencyRow>,
    purposes: Vec<(String, String, String)>,
    services: Vec<String>,
    matrix: Vec<(String, Vec<String>)>,
}

/// `GET /policy`: the policy as the administrators' API gives it, and the explain form.
pub async fn policy(console: &Console, v: &Visit<'_>) -> Page {
    let x = Explain {
        method: "GET".into(),
        ..Explain::default()
    };
    policy_page(console, v, x, None).await
}

async fn policy_page(
    console: &Console,
    v: &Visit<'_>,
    x: Explain,
    explained: Option<String>,
) -> Page {
    let p = api_json(console, v, "/v1/admin/policy").await?;
    let agencies: Vec<AgencyRow> = list(&p, "agencies")
        .iter()
        .map(|a| AgencyRow {
            id: text(a, "id"),
            name: text(a, "name"),
            certificate: list(a, "certificate")
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("; "),
            grants: list(a, "grants").iter().map(grant_row).collect(),
        })
        .collect();
    let purposes = list(&p, "purposes")
        .iter()
        .map(|u| (text(u, "code"), text(u, "title"), text(u, "legal_basis")))
        .collect();
    let services: BTreeSet<String> = list(&p, "services")
        .iter()
        .map(|s| format!("{}/{}", text(s, "provider"), text(s, "service")))
        .collect();
    let services: Vec<String> = services.into_iter().collect();
    let matrix = agencies
        .iter()
        .map(|a| {
            let cells = services
                .iter()
                .map(|s| {
                    let ops: BTreeSet<&str> = a
                        .grants
                        .iter()
                        .filter(|g| &g.service == s && !g.flags.contains("shadow"))
                        .flat_map(|g| g.operations.split(", "))
                        .collect();
                    ops.into_iter().collect::<Vec<_>>().join("+")
                })
                .collect();
            (a.id.clone(), cells)
        })
        .collect();
    Ok(render(&PolicyPage {
        lang: "en",
        title: "Policy",
        who: who(&v.session),
        csrf: v.session.csrf.clone(),
        version: text(&p, "version"),
        x,
        explained,
        agencies,
        purposes,
        services,
        matrix,
    }))
}

/// `POST /explain`: the decision for an imagined request, from the administrators' API.
pub async fn explain(console: &Console, v: &Visit<'_>) -> Page {
    let x = Explain {
        agency: v.get("agency"),
        purpose: v.get("purpose"),
        method: v.get("method"),
        path: v.get("path"),
        case: v.get("case"),
    };
    let q = query_string(&[
        ("agency", x.agency.clone()),
        ("purpose", x.purpose.clone()),
        ("method", x.method.clone()),
        ("path", x.path.clone()),
        ("case", x.case.clone()),
    ]);
    let said = text(
        &api_json(console, v, &format!("/v1/admin/explain?{q}")).await?,
        "explanation",
    );
    policy_page(console, v, x, Some(said)).await
}

// ---------------------------------------------------------------- the chains

/// One node's chain, for display.
pub struct NodeRow {
    node: String,
    head: String,
    checkpoint: String,
}

/// One node's verification, for display.
pub struct VerifiedRow {
    node: String,
    records: String,
    checkpoints: String,
    ok: bool,
    result: String,
}

#[derive(Template)]
#[template(path = "chains.html")]
struct Chains<'a> {
    lang: &'a str,
    title: &'a str,
    who: Option<Who>,
    csrf: String,
    nodes: Vec<NodeRow>,
    verified: Vec<VerifiedRow>,
}

/// `GET /chains` (heads and checkpoints) and `POST /chains` (every chain verified), from the auditors' API.
pub async fn chains(console: &Console, v: &Visit<'_>, verify: bool) -> Page {
    let path = if verify {
        "/v1/audit/chains?verify=true"
    } else {
        "/v1/audit/chains"
    };
    let c = api_json(console, v, path).await?;
    let short = |h: String| h.chars().take(16).collect::<String>();
    let nodes = list(&c, "nodes")
        .iter()
        .map(|n| {
            let head = n.get("head").unwrap_or(&Value::Null);
            let cp = n.get("checkpoint").unwrap_or(&Value::Null);
            NodeRow {
                node: text(n, "node"),
                head: format!(
                    "record {} at {}, hash {}…",
                    text(head, "seq"),
                    text(head, "ts"),
                    short(text(head, "hash"))
                ),
                checkpoint: if cp.is_null() {
                    "none yet".to_owned()
                } else {
                    format!(
                        "record {}, signed {} ({})",
                        text(cp, "seq"),
                        text(cp, "ts"),
                        if flag(cp, "signature_valid") {
                            "signature valid"
                        } else {
                            "SIGNATURE INVALID"
                        }
                    )
                },
            }
        })
        .collect();
    let verified = list(&c, "verified")
        .iter()
        .map(|n| VerifiedRow {
            node: text(n, "node"),
            records: text(n, "records"),
            checkpoints: text(n, "checkpoints"),
            ok: flag(n, "intact"),
            result: text(n, "result"),
        })
        .collect();
    Ok(render(&Chains {
        lang: "en",
        title: "Hash chains",
        who: who(&v.session),
        csrf: v.session.csrf.clone(),
        nodes,
        verified,
    }))
}

// ---------------------------------------------------------------- policy reloads

/// A policy-reload event, for display.
pub struct EventRow {
    ts: String,
    node: String,
    version: String,
    reason: String,
    held: bool,
}

/// A set this node holds, for the pickers.
pub struct SetRow {
    version: String,
    label: String,
}

#[derive(Template)]
#[template(path = "reloads.html")]
struct Reloads<'a> {
    lang: &'a str,
    title: &'a str,
    who: Option<Who>,
    version: String,
    events: Vec<EventRow>,
    sets: Vec<SetRow>,
    old: String,
    new: String,
    diff: Option<String>,
}

/// `GET /reloads[?old=&new=]`: the reload events, the sets this node holds, and the difference between two.
pub async fn reloads(console: &Console, v: &Visit<'_>) -> Page {
    let (old, new) = (v.get("old"), v.get("new"));
    let q = query_string(&[("old", old.clone()), ("new", new.clone())]);
    let path = if q.is_empty() {
        "/v1/admin/reloads".to_owned()
    } else {
        format!("/v1/admin/reloads?{q}")
    };
    let r = api_json(console, v, &path).await?;
    let sets: Vec<SetRow> = list(&r, "sets")
        .iter()
        .map(|s| SetRow {
            version: text(s, "version"),
            label: format!(
                "{} — loaded {} ({}){}",
                text(s, "version"),
                text(s, "at"),
                text(s, "trigger"),
                if flag(s, "in_force") {
                    ", in force"
                } else {
                    ""
                }
            ),
        })
        .collect();
    // By default the set in force against the one before it.
    let pick = |given: String, i: usize| {
        if given.is_empty() {
            sets.get(i).map(|s| s.version.clone()).unwrap_or_default()
        } else {
            given
        }
    };
    let (new, old) = (pick(new, 0), pick(old, 1));
    let diff = r.get("diff").filter(|d| !d.is_null()).map(|d| {
        format!(
            "From {} to {}:\n{}",
            text(d, "old"),
            text(d, "new"),
            text(d, "text")
        )
    });
    Ok(render(&Reloads {
        lang: "en",
        title: "Policy reloads",
        who: who(&v.session),
        version: text(&r, "version"),
        events: list(&r, "events")
            .iter()
            .map(|e| EventRow {
                ts: text(e, "ts"),
                node: text(e, "node"),
                version: text(e, "version"),
                reason: text(e, "reason"),
                held: flag(e, "held"),
            })
            .collect(),
        sets,
        old,
        new,
        diff,
    }))
}

// ---------------------------------------------------------------- shadow grants

/// A group of records where the shadow decision differs, for display.
pub struct Divergence {
    agency: String,
    service: String,
    purpose: String,
    enforced: String,
    shadow: String,
    count: usize,
    last: String,
}

/// Agency, service, purpose, enforced and shadow decision: what a group of diverging records shares.
type DivergenceKey = (String, String, String, String, String);

/// One such record, for display.
pub struct ShadowRecord {
    ts: String,
    id: String,
    agency: String,
    service: String,
    purpose: String,
    enforced: String,
    shadow: String,
    reason: String,
}

#[derive(Template)]
#[template(path = "shadow.html")]
struct Shadow<'a> {
    lang: &'a str,
    title: &'a str,
    who: Option<Who>,
    version: String,
    grants: Vec<(String, GrantRow)>,
    window: String,
    scanned: usize,
    divergences: Vec<Divergence>,
    recent: Vec<ShadowRecord>,
}

/// `GET /shadow`: the shadow grants, and the records of the window where their decision differs.
pub async fn shadow(console: &Console, v: &Visit<'_>) -> Page {
    let s = api_json(console, v, "/v1/admin/shadow").await?;
    let since = OffsetDateTime::now_utc() - time::Duration::days(WINDOW_DAYS);
    let q = query_string(&[
        ("shadow_diff", "true".into()),
        ("since", crate::audit::record::format_ts(since)),
        ("limit", MAX_LIMIT.to_string()),
        ("format", "json".into()),
    ]);
    let recs = match api_json(console, v, &format!("/v1/audit/records?{q}")).await? {
        Value::Array(r) => r,
        _ => Vec::new(),
    };
    let service = |r: &Value| format!("{}/{}", text(r, "provider"), text(r, "service"));
    let mut groups: BTreeMap<DivergenceKey, (usize, String)> = BTreeMap::new();
    for r in &recs {
        let g = groups
            .entry((
                text(r, "agency"),
                service(r),
                text(r, "purpose"),
                text(r, "decision"),
                text(r, "shadow_decision"),
            ))
            .or_default();
        g.0 += 1;
        g.1 = text(r, "ts");
    }
    Ok(render(&Shadow {
        lang: "en",
        title: "Shadow grants",
        who: who(&v.session),
        version: text(&s, "version"),
        grants: list(&s, "grants")
            .iter()
            .map(|g| (text(g, "agency"), grant_row(g)))
            .collect(),
        window: format!("the last {WINDOW_DAYS} days"),
        scanned: recs.len(),
        divergences: groups
            .into_iter()
            .map(
                |((agency, service, purpose, enforced, shadow), (count, last))| Divergence {
                    agency,
                    service,
                    purpose,
                    enforced,
                    shadow,
                    count,
                    last,
                },
            )
            .collect(),
        recent: recs
            .iter()
            .rev()
            .take(SHADOW_LISTED)
            .map(|r| ShadowRecord {
                ts: text(r, "ts"),
                id: text(r, "id"),
                agency: text(r, "agency"),
                service: service(r),
                purpose: text(r, "purpose"),
                enforced: text(r, "decision"),
                shadow: text(r, "shadow_decision"),
                reason: text(r, "reason"),
            })
            .collect(),
    }))
}

// ---------------------------------------------------------------- certificates

/// A certificate or CRL, for display.
pub struct CertRow {
    label: String,
    subject: String,
    path: String,
    not_after: String,
    days_left: String,
    crl: bool,
    /// `expired`, `soon` or empty.
    state: &'static str,
}

#[derive(Template)]
#[template(path = "certificates.html")]
struct Certificates<'a> {
    lang: &'a str,
    title: &'a str,
    who: Option<Who>,
    now: String,
    certificates: Vec<CertRow>,
    problems: Vec<String>,
}

/// Days under which a certificate is flagged (a CRL is re-signed routinely, days before).
const SOON_DAYS: f64 = 30.0;
const CRL_SOON_DAYS: f64 = 2.0;

/// `GET /certificates`: every certificate and CRL the node uses, with the days left.
pub async fn certificates(console: &Console, v: &Visit<'_>) -> Page {
    let c = api_json(console, v, "/v1/admin/certificates").await?;
    Ok(render(&Certificates {
        lang: "en",
        title: "Certificates and CRLs",
        who: who(&v.session),
        now: text(&c, "now"),
        certificates: list(&c, "certificates")
            .iter()
            .map(|e| {
                let days = e.get("days_left").and_then(Value::as_f64).unwrap_or(0.0);
                let crl = flag(e, "crl");
                CertRow {
                    label: text(e, "label"),
                    subject: text(e, "subject"),
                    path: text(e, "path"),
                    not_after: text(e, "not_after"),
                    days_left: format!("{days:.1}"),
                    crl,
                    state: if days < 0.0 {
                        "expired"
                    } else if days < if crl { CRL_SOON_DAYS } else { SOON_DAYS } {
                        "soon"
                    } else {
                        ""
                    },
                }
            })
            .collect(),
        problems: list(&c, "problems")
            .iter()
            .filter_map(|p| p.as_str().map(str::to_owned))
            .collect(),
    }))
}

// ---------------------------------------------------------------- providers and quotas

/// A provider, for display.
pub struct ProviderRow {
    id: String,
    upstream: String,
    breaker: String,
    in_flight: String,
    opened: String,
    waited: String,
    agencies: String,
}

#[derive(Template)]
#[template(path = "providers.html")]
struct Providers<'a> {
    lang: &'a str,
    title: &'a str,
    who: Option<Who>,
    settings: String,
    providers: Vec<ProviderRow>,
    defaults: Vec<(String, String)>,
    agency_quotas: Vec<(String, String, String)>,
    grant_quotas: Vec<(String, String, String)>,
    refusals: Vec<(String, String, String)>,
    limiter: String,
}

/// `GET /providers`: breakers and slots of each provider; the quotas in force and their refusals.
pub async fn providers(console: &Console, v: &Visit<'_>) -> Page {
    let p = api_json(console, v, "/v1/admin/providers").await?;
    let s = p.get("settings").unwrap_or(&Value::Null);
    let quotas = p.get("quotas").unwrap_or(&Value::Null);
    let or_default = |v: String| {
        if v.is_empty() {
            "default".to_owned()
        } else {
            v
        }
    };
    Ok(render(&Providers {
        lang: "en",
        title: "Providers and quotas",
        who: who(&v.session),
        settings: format!(
            "At most {} requests in flight per provider, {} per agency while others wait; a wait of {} ms at most; the breaker opens after {} failures in a row, for {} s at first.",
            text(s, "concurrency"),
            text(s, "agency_share"),
            text(s, "wait_ms"),
            text(s, "breaker_failures"),
            text(s, "breaker_open_seconds")
        ),
        providers: list(&p, "providers")
            .iter()
            .map(|r| {
                let retry = text(r, "retry_after_seconds");
                ProviderRow {
                    id: text(r, "id"),
                    upstream: text(r, "upstream"),
                    breaker: if retry.is_empty() {
                        text(r, "breaker")
                    } else {
                        format!("{} (probe in {retry} s)", text(r, "breaker"))
                    },
                    in_flight: text(r, "in_flight"),
                    opened: text(r, "opened"),
                    waited: format!(
                        "{} waited, {} timed out",
                        text(r, "waited"),
                        text(r, "wait_timeouts")
                    ),
                    agencies: list(r, "agencies")
                        .iter()
                        .map(|a| {
                            format!(
                                "{}: {} in flight, {} waiting",
                                text(a, "agency"),
                                text(a, "in_flight"),
                                text(a, "waiting")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; "),
                }
            })
            .collect(),
        defaults: vec![
            ("each agency".to_owned(), text(quotas, "agency")),
            ("each officer".to_owned(), text(quotas, "officer")),
        ],
        agency_quotas: list(quotas, "agencies")
            .iter()
            .map(|a| {
                (
                    text(a, "agency"),
                    or_default(text(a, "agency_rate")),
                    or_default(text(a, "officer_rate")),
                )
            })
            .collect(),
        grant_quotas: list(quotas, "grants")
            .iter()
            .map(|g| {
                (
                    text(g, "agency"),
                    format!("{}/{}", text(g, "provider"), text(g, "service")),
                    text(g, "rate"),
                )
            })
            .collect(),
        refusals: list(&p, "quota_refusals")
            .iter()
            .map(|r| (text(r, "agency"), text(r, "quota"), text(r, "refused")))
            .collect(),
        limiter: format!(
            "{} agencies and officers hold limiter state on this node now{}; replicas: {} (each enforces its share).",
            text(&p, "limiter_keys"),
            if flag(&p, "shared_quotas") {
                ", quotas shared through Redis"
            } else {
                ""
            },
            text(&p, "replicas")
        ),
    }))
}

// ---------------------------------------------------------------- latency

/// One chart of p50/p90/p99, and its figures.
pub struct LatencyChart {
    name: String,
    svg: String,
    rows: Vec<(String, String, String, String, String)>,
}

#[derive(Template)]
#[template(path = "latency.html")]
struct Latency<'a> {
    lang: &'a str,
    title: &'a str,
    who: Option<Who>,
    by: String,
    every: String,
    charts: Vec<LatencyChart>,
}

/// `GET /latency[?by=agency|provider]`: request latency percentiles per interval, one chart per agency or provider.
pub async fn latency(console: &Console, v: &Visit<'_>) -> Page {
    let by = if v.get("by") == "provider" {
        "provider"
    } else {
        "agency"
    };
    let l = api_json(console, v, &format!("/v1/admin/latency?by={by}")).await?;
    Ok(render(&Latency {
        lang: "en",
        title: "Latency",
        who: who(&v.session),
        by: by.to_owned(),
        every: text(&l, "every_seconds"),
        charts: latency_charts(&l),
    }))
}

/// The percentile charts of an administrators' API latency answer, one per agency or provider with requests.
pub fn latency_charts(l: &Value) -> Vec<LatencyChart> {
    use charts_rs::{LineChart, Series};
    let intervals = list(l, "intervals");
    let label = |i: &Value| {
        let until = text(i, "until");
        // HH:MM, or HH:MM:SS where snapshots came closer than a minute.
        until.get(11..19).unwrap_or(&until).to_owned()
    };
    let ms = |x: Option<f64>| x.map_or(String::new(), |s| format!("{:.1}", s * 1000.0));
    let mut out = Vec::new();
    for name in list(l, "names").iter().filter_map(Value::as_str) {
        let points: Vec<(String, &Value)> = intervals
            .iter()
            .filter_map(|i| {
                list(i, "series")
                    .iter()
                    .find(|s| text(s, "name") == name)
                    .map(|s| (label(i), s))
            })
            .collect();
        if points.is_empty() {
            continue;
        }
        let q = |s: &Value, k: &str| s.get(k).and_then(Value::as_f64);
        let series = crate::gateway::builtin::admin::latency::QUANTILES
            .iter()
            .map(|(k, _)| {
                Series::new(
                    (*k).to_owned(),
                    points
                        .iter()
                        .map(|(_, s)| (q(s, k).unwrap_or(0.0) * 1000.0) as f32)
                        .collect(),
                )
            })
            .collect();
        let mut chart = LineChart::new(series, points.iter().map(|(t, _)| t.clone()).collect());
        chart.width = 900.0;
        chart.height = 320.0;
        if let Some(y) = chart.y_axis_configs.first_mut() {
            y.formatter = Some("{c} ms".to_owned());
        }
        let svg = chart.svg().unwrap_or_else(|e| {
            tracing::warn!(%e, "latency chart not drawn");
            String::new()
        });
        out.push(LatencyChart {
            name: name.to_owned(),
            svg,
            rows: points
                .iter()
                .map(|(t, s)| {
                    (
                        t.clone(),
                        text(s, "count"),
                        ms(q(s, "p50")),
                        ms(q(s, "p90")),
                        ms(q(s, "p99")),
                    )
                })
                .collect(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_charts_are_svg_without_script_or_inline_style() {
        let l = serde_json::json!({
            "names": ["psda", "idle"],
            "intervals": [
                {"until": "2026-12-01T10:01:00Z", "series": [{"name": "psda", "count": 3, "p50": 0.004, "p90": 0.02, "p99": 0.2}]},
                {"until": "2026-12-01T10:02:00Z", "series": [{"name": "psda", "count": 5, "p50": 0.003, "p90": 0.01, "p99": null}]},
            ]
        });
        let charts = latency_charts(&l);
        assert_eq!(charts.len(), 1, "a name without requests has no chart");
        let c = &charts[0];
        assert!(c.svg.starts_with("<svg"), "{:.80}", c.svg);
        assert!(!c.svg.contains("<script") && !c.svg.contains("style="));
        assert_eq!(c.rows[0].0, "10:01:00");
        assert_eq!(c.rows[0].4, "200.0");
        assert_eq!(c.rows[1].4, "", "no p99 where none is known");
    }
}
