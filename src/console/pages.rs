//! The console's pages: each handler asks what it shows through the
//! pipeline ([`super::via`]) or reads the gateway's own state, and renders
//! an askama template (HTML-escaped by default).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use askama::Template;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::session::{self, Session};
use super::{html, param, plain, redirect, via, Console, Visit};
use crate::gateway::builtin::audit::MAX_LIMIT;
use crate::identity::token::Presented;
use crate::identity::ConnInfo;
use crate::problem::Body;

/// Records on one page of search results.
pub const PAGE: usize = 50;
/// How far back the signals and charts look.
pub const WINDOW_DAYS: i64 = 7;

/// The signed-in officer, as the page header shows them.
pub struct Who {
    /// The officer's id.
    pub(super) officer: String,
    /// The agency whose key signed the token.
    pub(super) agency: String,
    /// The purpose the token states.
    pub(super) purpose: String,
    /// The session's CSRF token, for the sign-out form.
    pub(super) csrf: String,
    /// The administrators' pages lead the navigation (the policy still decides each page).
    pub(super) admin: bool,
}

pub(super) fn who(s: &Session) -> Option<Who> {
    Some(Who {
        officer: s.officer.id.clone(),
        agency: s.agency.clone(),
        purpose: s.officer.purpose.clone(),
        csrf: s.csrf.clone(),
        admin: s.officer.purpose == crate::gateway::builtin::admin::ADMINISTRATION,
    })
}

pub(super) fn render(t: &impl Template) -> Response<Body> {
    match t.render() {
        Ok(body) => html(StatusCode::OK, body),
        Err(err) => {
            tracing::error!(%err, "console page not rendered");
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be rendered",
            )
        }
    }
}

#[derive(Template)]
#[template(path = "message.html")]
struct Message<'a> {
    lang: &'a str,
    title: &'a str,
    who: Option<Who>,
    kind: &'a str,
    text: String,
    request_id: Option<String>,
    next: &'a str,
}

pub(super) fn message(
    status: StatusCode,
    s: Option<&Session>,
    title: &str,
    text: String,
    request_id: Option<String>,
) -> Response<Body> {
    let mut resp = render(&Message {
        lang: "en",
        title,
        who: s.and_then(who),
        kind: "error",
        text,
        request_id,
        next: if s.is_some() { "/search" } else { "/signin" },
    });
    *resp.status_mut() = status;
    resp
}

// ---------------------------------------------------------------- sign-in

#[derive(Template)]
#[template(path = "signin.html")]
struct SignIn<'a> {
    lang: &'a str,
    title: &'a str,
    who: Option<Who>,
    csrf: String,
}

/// The sign-in form, with a fresh double-submit token in its cookie.
pub fn signin_form(note: Option<&str>) -> Response<Body> {
    let csrf = session::random_hex(16);
    let mut resp = render(&SignIn {
        lang: "en",
        title: note.unwrap_or("Sign in"),
        who: None,
        csrf: csrf.clone(),
    });
    set_cookie(
        &mut resp,
        &session::set_cookie(
            session::SIGNIN_COOKIE,
            &csrf,
            Some(std::time::Duration::from_secs(600)),
        ),
    );
    resp
}

fn set_cookie(resp: &mut Response<Body>, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// The claims the console reads before verifying: which agency's key to verify with, and the expiry.
fn unverified_claims(token: &str) -> Option<(String, i64)> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    Some((v.get("iss")?.as_str()?.to_owned(), v.get("exp")?.as_i64()?))
}

/// `POST /signin`: the token verified as the gateway verifies it, exchanged for a session cookie.
pub async fn signin(
    console: &Console,
    conn: &ConnInfo,
    headers: &HeaderMap,
    params: &[(String, String)],
) -> Response<Body> {
    let refuse = |text: String| {
        let mut r = message(StatusCode::UNAUTHORIZED, None, "Not signed in", text, None);
        set_cookie(
            &mut r,
            &session::set_cookie(session::SIGNIN_COOKIE, "", Some(std::time::Duration::ZERO)),
        );
        r
    };
    let expected = session::cookie(headers, session::SIGNIN_COOKIE).unwrap_or_default();
    if !session::same_secret(&param(params, "csrf"), expected) {
        return plain(
            StatusCode::FORBIDDEN,
            "this sign-in form did not come from the console (CSRF token missing or wrong); reload the sign-in page",
        );
    }
    let token = param(params, "token");
    let Some((agency_id, exp)) = unverified_claims(&token) else {
        return refuse("That is not an officer token.".into());
    };
    let gateway = &console.gateway;
    let policy = gateway.policy.load_full();
    let Some(agency) = policy.agency(&agency_id) else {
        return refuse("The token's issuer is not an agency of the policy.".into());
    };
    let client = if console.require_client_certificate {
        match conn.client.as_ref() {
            Some(c) if policy.agency_for_certificate(c).is_some_and(|a| a.id == agency.id) => {
                Some(c.clone())
            }
            _ => {
                return refuse(
                    "The console asks for your agency's client certificate, and the token's agency must be the certificate's.".into(),
                )
            }
        }
    } else {
        let bound = gateway.require_bound_tokens || agency.require_bound_tokens;
        match via::vouched_certificate(&policy, &agency.id) {
            Some(c) if !bound => Some(c),
            _ => {
                return refuse(format!(
                    "Agency {} can use the console only with its client certificate (console.require_client_certificate).",
                    agency.id
                ))
            }
        }
    };
    let on = Presented {
        agency: &agency.id,
        certificate_sha256: client
            .as_ref()
            .filter(|_| console.require_client_certificate)
            .map(|c| c.sha256.as_str()),
        require_bound: gateway.require_bound_tokens || agency.require_bound_tokens,
    };
    let officer = match gateway.keys.load().verify(&token, &on) {
        Ok(o) => o,
        Err(err) => return refuse(format!("The token is not accepted: {err}.")),
    };
    let left = u64::try_from(exp - OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(0);
    let session = match console.sessions.open(
        &agency.id,
        officer,
        token,
        std::time::Duration::from_secs(left),
        client,
    ) {
        Ok(s) => s,
        Err(err) => return refuse(format!("{err}.")),
    };
    record_event(
        console,
        &session,
        "console-sign-in",
        "signed in to the console",
    )
    .await;
    let mut resp = redirect(home(&session));
    set_cookie(
        &mut resp,
        &session::set_cookie(session::COOKIE, &session.id, None),
    );
    set_cookie(
        &mut resp,
        &session::set_cookie(session::SIGNIN_COOKIE, "", Some(std::time::Duration::ZERO)),
    );
    resp
}

/// The first page of a session: the policy for administrators, the search for everyone else.
pub fn home(s: &Session) -> &'static str {
    if s.officer.purpose == crate::gateway::builtin::admin::ADMINISTRATION {
        "/policy"
    } else {
        "/search"
    }
}

/// Records a sign-in or sign-out in the audit log, as an event of this node.
async fn record_event(console: &Console, s: &Session, name: &str, what: &str) {
    let policy = console.gateway.policy.load();
    let mut entry = crate::audit::event::event(
        name,
        format!(
            "officer {} of {} ({}) {what}",
            s.officer.id, s.agency, s.officer.purpose
        ),
        policy.version(),
    );
    entry.agency = Some(s.agency.clone());
    entry.officer = Some(s.officer.id.clone());
    entry.purpose = Some(s.officer.purpose.clone());
    entry.token_id = s.officer.token_id.clone();
    if let Err(err) = console.gateway.audit.append(entry).await {
        tracing::error!(%err, event = name, "console event not recorded");
    }
}

/// `POST /signout`: the session ends here and now.
pub async fn signout(console: &Console, v: &Visit<'_>) -> Response<Body> {
    console.sessions.close(&v.session.id);
    record_event(
        console,
        &v.session,
        "console-sign-out",
        "signed out of the console",
    )
    .await;
    let mut resp = signin_form(Some("Signed out"));
    set_cookie(
        &mut resp,
        &session::set_cookie(session::COOKIE, "", Some(std::time::Duration::ZERO)),
    );
    resp
}

// ---------------------------------------------------------------- the API, through the pipeline

/// Asks the auditors' API, as the officer, through the whole pipeline; a refusal becomes a page.
pub(super) async fn api(
    console: &Console,
    v: &Visit<'_>,
    path: &str,
) -> Result<bytes::Bytes, Response<Body>> {
    let s = &v.session;
    let answer = via::get(
        &console.gateway,
        v.conn.peer,
        s.client.clone(),
        &s.token,
        path,
    )
    .await
    .map_err(|err| {
        tracing::error!(%err, "console request through the pipeline failed");
        message(
            StatusCode::BAD_GATEWAY,
            Some(s),
            "Not available",
            "The gateway did not answer.".into(),
            None,
        )
    })?;
    if answer.status.is_success() {
        return Ok(answer.body);
    }
    let problem: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    let said = |k: &str| {
        problem
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    if answer.status == StatusCode::UNAUTHORIZED {
        // The token behind the session is no longer accepted (expired, key rotated): the session ends.
        console.sessions.close(&s.id);
        return Err(signin_form(Some(
            "Your session has ended: its token is no longer accepted",
        )));
    }
    Err(message(
        answer.status,
        Some(s),
        "Refused",
        format!("{} — {}", said("title"), said("detail")),
        answer.request_id,
    ))
}

/// `GET /v1/audit/records` with these query pairs, as the officer, through the pipeline.
async fn audit_records(
    console: &Console,
    v: &Visit<'_>,
    pairs: &[(&str, String)],
) -> Result<bytes::Bytes, Response<Body>> {
    api(
        console,
        v,
        &format!("/v1/audit/records?{}", query_string(pairs)),
    )
    .await
}

pub(super) fn query_string(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", crate::query::encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn records(body: &[u8]) -> Vec<Value> {
    serde_json::from_slice::<Vec<Value>>(body).unwrap_or_default()
}

/// A record's field as text (lists joined).
pub(super) fn text(v: &Value, k: &str) -> String {
    match v.get(k) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(", "),
        Some(other) => other.to_string(),
    }
}

/// One line of a table of records.
pub struct Row {
    ts: String,
    ts_q: String,
    node: String,
    seq: String,
    agency: String,
    officer: String,
    purpose: String,
    provider: String,
    service: String,
    subjects: String,
    decision: String,
    reason: String,
    restricted: bool,
}

fn row(v: &Value) -> Row {
    let ts = text(v, "ts");
    Row {
        ts_q: crate::query::encode(&ts),
        ts,
        node: crate::query::encode(&text(v, "node")),
        seq: text(v, "seq"),
        agency: text(v, "agency"),
        officer: text(v, "officer"),
        purpose: text(v, "purpose"),
        provider: text(v, "provider"),
        service: text(v, "service"),
        subjects: text(v, "subjects"),
        decision: text(v, "decision"),
        reason: text(v, "reason"),
        restricted: v
            .get("restricted")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    }
}

fn record_href(v: &Value) -> String {
    format!(
        "/record?node={}&seq={}&ts={}",
        crate::query::encode(&text(v, "node")),
        text(v, "seq"),
        crate::query::encode(&text(v, "ts"))
    )
}

// ---------------------------------------------------------------- search

/// The search form's fields.
#[derive(Default)]
pub struct Fields {
    subject: String,
    agency: String,
    officer: String,
    purpose: String,
    provider: String,
    service: String,
    decision: String,
    since: String,
    until: String,
}

impl Fields {
    fn from(v: &Visit<'_>) -> Fields {
        Fields {
            subject: v.get("subject"),
            agency: v.get("agency"),
            officer: v.get("officer"),
            purpose: v.get("purpose"),
            provider: v.get("provider"),
            service: v.get("service"),
            decision: v.get("decision"),
            since: timestamp(&v.get("since")),
            until: timestamp(&v.get("until")),
        }
    }

    fn pairs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("subject", self.subject.clone()),
            ("agency", self.agency.clone()),
            ("officer", self.officer.clone()),
            ("purpose", self.purpose.clone()),
            ("provider", self.provider.clone()),
            ("service", self.service.clone()),
            ("decision", self.decision.clone()),
            ("since", self.since.clone()),
            ("until", self.until.clone()),
        ]
    }

    /// The fields set, for the next page's form.
    pub fn hidden(&self) -> Vec<(&'static str, String)> {
        self.pairs()
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .collect()
    }
}

/// A time as typed (`2026-12-01T10:00`, a browser's `datetime-local`) made RFC 3339 UTC.
fn timestamp(s: &str) -> String {
    match s.len() {
        16 => format!("{s}:00Z"),
        19 => format!("{s}Z"),
        _ => s.to_owned(),
    }
}

#[derive(Template)]
#[template(path = "search.html")]
struct Search<'a> {
    lang: &'a str,
    title: &'a str,
    who: Option<Who>,
    csrf: String,
    f: Fields,
    searched: bool,
    rows: Vec<Row>,
    more: bool,
    next_after: String,
}

/// `GET /search`: the empty form.
pub fn search_form(v: &Visit<'_>) -> Response<Body> {
    render(&Search {
        lang: "en",
        title: "Search the access log",
        who: who(&v.session),
        csrf: v.session.csrf.clone(),
        f: Fields::default(),
        searched: false,
        rows: Vec::new(),
        more: false,
        next_after: String::new(),
    })
}

/// `POST /search`: one page of records (or the whole search exported), read through the auditors' API.
pub async fn search(console: &Console, v: &Visit<'_>) -> Response<Body> {
    let f = Fields::from(v);
    let format = v.get("format");
    if format == "csv" || format == "jsonl" {
        return export(console, v, &f, &format).await;
    }
    // Paging: records come oldest first; the next page starts after the last one shown.
    let after = v.get("after");
    let cursor = after.rsplitn(3, '|').collect::<Vec<_>>();
    let cursor = match cursor.as_slice() {
        [seq, node, ts] => seq
            .parse::<i64>()
            .ok()
            .map(|s| (ts.to_string(), node.to_string(), s)),
        _ => None,
    };
    let mut pairs = f.pairs();
    // Records sharing the cursor's instant are read again and skipped.
    let slack = 200;
    if let Some((ts, _, _)) = &cursor {
        if let Some(p) = pairs.iter_mut().find(|(k, _)| *k == "since") {
            p.1 = ts.clone();
        }
    }
    pairs.push((
        "limit",
        (PAGE + 1 + if cursor.is_some() { slack } else { 0 }).to_string(),
    ));
    pairs.push(("format", "json".into()));
    let body = match audit_records(console, v, &pairs).await {
        Ok(b) => b,
        Err(page) => return page,
    };
    let all = records(&body);
    let seq_of = |r: &Value| r.get("seq").and_then(Value::as_i64).unwrap_or(0);
    let fresh: Vec<&Value> = all
        .iter()
        .filter(|r| match &cursor {
            None => true,
            Some((ts, node, seq)) => {
                let key = (text(r, "ts"), text(r, "node"), seq_of(r));
                key > (ts.clone(), node.clone(), *seq)
            }
        })
        .collect();
    let more = fresh.len() > PAGE;
    let shown: Vec<&Value> = fresh.into_iter().take(PAGE).collect();
    let next_after = shown
        .last()
        .map(|r| format!("{}|{}|{}", text(r, "ts"), text(r, "node"), seq_of(r)))
        .unwrap_or_default();
    render(&Search {
        lang: "en",
        title: "Search the access log",
        who: who(&v.session),
        csrf: v.session.csrf.clone(),
        rows: shown.iter().map(|r| row(r)).collect(),
        f,
        searched: true,
        more,
        next_after,
    })
}

/// The columns of a CSV export (every field the auditors' API may release that reads well in a sheet).
const CSV_COLUMNS: &[&str] = &[
    "seq",
    "node",
    "id",
    "ts",
    "agency",
    "officer",
    "purpose",
    "legal_basis",
    "case_ref",
    "consent_ref",
    "provider",
    "service",
    "operation",
    "method",
    "path",
    "subjects",
    "fields",
    "decision",
    "reason",
    "status",
    "restricted",
    "policy_version",
    "hash",
];

async fn export(console: &Console, v: &Visit<'_>, f: &Fields, format: &str) -> Response<Body> {
    let mut pairs = f.pairs();
    pairs.push(("limit", MAX_LIMIT.to_string()));
    pairs.push(("format", "jsonl".into()));
    let body = match audit_records(console, v, &pairs).await {
        Ok(b) => b,
        Err(page) => return page,
    };
    let (content_type, name, out) = if format == "jsonl" {
        ("application/jsonl", "audit-records.jsonl", body)
    } else {
        let mut csv = CSV_COLUMNS.join(",");
        csv.push_str("\r\n");
        for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(r) = serde_json::from_slice::<Value>(line) else {
                continue;
            };
            let cells: Vec<String> = CSV_COLUMNS.iter().map(|c| csv_cell(&text(&r, c))).collect();
            csv.push_str(&cells.join(","));
            csv.push_str("\r\n");
        }
        (
            "text/csv; charset=utf-8",
            "audit-records.csv",
            bytes::Bytes::from(csv),
        )
    };
    let mut resp = Response::new(http_body_util::Full::new(out));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(d) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, d);
    }
    resp
}

/// One CSV cell, quoted when it must be; a leading `= + - @` is defused so a sheet never runs it as a formula.
fn csv_cell(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

// ---------------------------------------------------------------- one record

#[derive(Template)]
#[template(path = "record.html")]
struct RecordPage<'a> {
    lang: &'a str,
    title: &'a str,
    who: Option<Who>,
    node: String,
    seq: i64,
    hash_ok: bool,
    checkpoint: String,
    fields: Vec<(String, String)>,
}

/// `GET /record?node=&seq=&ts=`: every field the API releases, the record's place in its chain, and whether it verifies.
pub async fn record(console: &Console, v: &Visit<'_>) -> Response<Body> {
    let (node, ts) = (v.get("node"), v.get("ts"));
    let Ok(seq) = v.get("seq").parse::<i64>() else {
        return plain(StatusCode::BAD_REQUEST, "seq must be a number");
    };
    let pairs = [
        ("node", node.clone()),
        ("since", ts.clone()),
        ("limit", "100".to_owned()),
        ("format", "json".to_owned()),
    ];
    let body = match audit_records(console, v, &pairs).await {
        Ok(b) => b,
        Err(page) => return page,
    };
    let found = records(&body)
        .into_iter()
        .find(|r| r.get("seq").and_then(Value::as_i64) == Some(seq));
    let Some(found) = found else {
        return message(
            StatusCode::NOT_FOUND,
            Some(&v.session),
            "No such record",
            "No record of yours at that place in the chain.".into(),
            None,
        );
    };
    let fields = found
        .as_object()
        .map(|m| m.keys().map(|k| (k.clone(), text(&found, k))).collect())
        .unwrap_or_default();
    // The API released the record to this officer; its verification (hashes and signatures, no
    // personal data) is read from the log beside it.
    let (hash_ok, checkpoint) = verification(console, &node, &ts, seq).await;
    render(&RecordPage {
        lang: "en",
        title: "Audit record",
        who: who(&v.session),
        node,
        seq,
        hash_ok,
        checkpoint,
        fields,
    })
}

async fn verification(console: &Console, node: &str, ts: &str, seq: i64) -> (bool, String) {
    let store = console.gateway.audit.store();
    let filter = crate::audit::Filter {
        node: Some(node.to_owned()),
        since: Some(ts.to_owned()),
        limit: Some(100),
        ..Default::default()
    };
    let record = crate::audit::query(store, &filter)
        .await
        .ok()
        .and_then(|rs| rs.into_iter().find(|r| r.seq == seq));
    let Some(record) = record else {
        return (false, "the record could not be read back".into());
    };
    let hash_ok = record.expected_hash().is_ok_and(|h| h == record.hash);
    let cps = crate::audit::checkpoint::list(store, node)
        .await
        .unwrap_or_default();
    let covering = cps.iter().find(|c| c.seq >= seq);
    let checkpoint = match covering {
        None => {
            "none yet: the writer signs a checkpoint every so many records or seconds".to_owned()
        }
        Some(c) => {
            let sig = match c.verify(None) {
                Ok(()) => "signature valid".to_owned(),
                Err(e) => format!("SIGNATURE INVALID: {e}"),
            };
            let exact = if c.seq == seq {
                if c.hash == record.hash {
                    "; it names this record's hash"
                } else {
                    "; it names ANOTHER hash for this record"
                }
            } else {
                "; the chain from this record to it is checked by \"Verify the chains\""
            };
            format!(
                "record {} of {}, signed {} ({sig}{exact})",
                c.seq, c.node, c.ts
            )
        }
    };
    (hash_ok, checkpoint)
}

// ---------------------------------------------------------------- a person

/// The person's report as the auditors' API gives it to this officer.
async fn subject_report(
    console: &Console,
    v: &Visit<'_>,
    subject: &str,
) -> Result<Value, Response<Body>> {
    let q = query_string(&[("subject", subject.to_owned())]);
    let body = api(console, v, &format!("/v1/audit/report?{q}")).await?;
    Ok(serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null))
}

#[derive(Template)]
#[template(path = "subject_form.html")]
struct SubjectForm<'a> {
    lang: &'a str,
    title: &'a str,
    who: Option<Who>,
    csrf: String,
    intro: &'a str,
    action: &'a str,
    with_lang: bool,
}

/// `GET /person`: which person (posted, so the id stays out of URLs).
pub fn person_form(v: &Visit<'_>) -> Response<Body> {
    render(&SubjectForm {
        lang: "en",
        title: "A person's page",
        who: who(&v.session),
        csrf: v.session.csrf.clone(),
        intro: "Who looked at this person, why, on what legal basis, and what they got.",
        action: "/person",
        with_lang: false,
    })
}

/// One access of a report, for display.
pub struct Shown {
    at: String,
    agency: String,
    purpose: String,
    basis: String,
    released: bool,
    fields: String,
    record_id: String,
}

fn shown(a: &Value) -> Shown {
    let or = |a1: &str, a2: &str| {
        let t = text(a, a1);
        if t.is_empty() {
            text(a, a2)
        } else {
            t
        }
    };
    Shown {
        at: text(a, "at"),
        agency: or("agency_name", "agency"),
        purpose: or("purpose_title", "purpose"),
        basis: text(a, "legal_basis"),
        released: a.get("released").and_then(Value::as_bool).unwrap_or(false),
        fields: text(a, "fields"),
        record_id: text(a, "record_id"),
    }
}

#[derive(Template)]
#[template(path = "person.html")]
struct Person<'a> {
    lang: &'a str,
    title: &'a str,
    who: Option<Who>,
    subject: String,
    rows: Vec<Row>,
    report: Vec<Shown>,
    notice: String,
}

/// `POST /person`: the person's accesses in the log and their report, both read through the API.
pub async fn person(console: &Console, v: &Visit<'_>) -> Response<Body> {
    let subject = v.get("subject");
    if subject.is_empty() {
        return person_form(v);
    }
    let q = query_string(&[
        ("subject", subject.clone()),
        ("limit", MAX_LIMIT.to_string()),
        ("format", "json".into()),
    ]);
    let body = match api(console, v, &format!("/v1/audit/records?{q}")).await {
        Ok(b) => b,
        Err(page) => return page,
    };
    let rows = records(&body).iter().map(row).collect();
    let report = match subject_report(console, v, &subject).await {
        Ok(r) => r,
        Err(page) => return page,
    };
    render(&Person {
        lang: "en",
        title: "A person's page",
        who: who(&v.session),
        subject,
        rows,
        report: report
            .get("accesses")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(shown).collect())
            .unwrap_or_default(),
        notice: text(&report, "notice"),
    })
}

// ---------------------------------------------------------------- the subject's printable report

/// `GET /report`: which person, in which language.
pub fn report_form(v: &Visit<'_>) -> Response<Body> {
    render(&SubjectForm {
        lang: "en",
        title: "A data subject's access report",
        who: who(&v.session),
        csrf: v.session.csrf.clone(),
        intro: "The report as the person receives it, to print and hand over. Opening it is recorded like any access.",
        action: "/report",
        with_lang: true,
    })
}

/// The report's words in one language.
pub struct Words {
    title: &'static str,
    back: &'static str,
    print: &'static str,
    subject: &'static str,
    issued: &'static str,
    issuer: &'static str,
    intro: &'static str,
    none: &'static str,
    when: &'static str,
    agency: &'static str,
    purpose: &'static str,
    basis: &'static str,
    what: &'static str,
    record: &'static str,
    released: &'static str,
    refused: &'static str,
    notice: &'static str,
}

const ENGLISH: Words = Words {
    title: "Report on access to your personal data",
    back: "Another report",
    print: "Print",
    subject: "Register id",
    issued: "Issued",
    issuer: "Issued by",
    intro: "Every time a state agency asked the gateway for your record in the register of foreigners, it was logged: who, when, for what purpose, on what legal basis and what was released. These are those accesses.",
    none: "No access to your record is on the log.",
    when: "When (UTC)",
    agency: "Agency",
    purpose: "Purpose",
    basis: "Legal basis",
    what: "Result",
    record: "Record (quote it in a complaint)",
    released: "released",
    refused: "refused, nothing released",
    notice: "You may complain to the Personal Data Protection Service of Georgia about any access listed here.",
};

const GEORGIAN: Words = Words {
    title: "ანგარიში თქვენს პერსონალურ მონაცემებზე წვდომის შესახებ",
    back: "სხვა ანგარიში",
    print: "ბეჭდვა",
    subject: "რეესტრის ნომერი",
    issued: "გაცემის თარიღი",
    issuer: "გასცა",
    intro: "ყოველი შემთხვევა, როცა სახელმწიფო უწყებამ უცხოელთა რეესტრიდან თქვენი ჩანაწერი მოითხოვა, აღრიცხულია: ვინ, როდის, რა მიზნით, რა სამართლებრივი საფუძვლით და რა მონაცემები გაიცა. ქვემოთ ჩამოთვლილია ეს შემთხვევები.",
    none: "თქვენს ჩანაწერზე წვდომა აღრიცხული არ არის.",
    when: "როდის (UTC)",
    agency: "უწყება",
    purpose: "მიზანი",
    basis: "სამართლებრივი საფუძველი",
    what: "შედეგი",
    record: "ჩანაწერი (მიუთითეთ საჩივარში)",
    released: "გაიცა",
    refused: "უარი, არაფერი გაცემულა",
    notice: "აქ ჩამოთვლილ ნებისმიერ წვდომაზე შეგიძლიათ საჩივრით მიმართოთ საქართველოს პერსონალურ მონაცემთა დაცვის სამსახურს.",
};

#[derive(Template)]
#[template(path = "report.html")]
struct Report<'a> {
    lang: &'a str,
    t: &'a Words,
    subject: String,
    issued: String,
    issuer: String,
    accesses: Vec<Shown>,
    notice: String,
}

/// `POST /report`: the person's report from the API (its holding-back of restricted accesses included), printable.
pub async fn report(console: &Console, v: &Visit<'_>) -> Response<Body> {
    let subject = v.get("subject");
    if subject.is_empty() {
        return report_form(v);
    }
    let (lang, t) = if v.get("lang") == "en" {
        ("en", &ENGLISH)
    } else {
        ("ka", &GEORGIAN)
    };
    let report = match subject_report(console, v, &subject).await {
        Ok(r) => r,
        Err(page) => return page,
    };
    let policy = console.gateway.policy.load();
    let issuer = policy
        .agency(&v.session.agency)
        .map_or_else(|| v.session.agency.clone(), |a| a.name.clone());
    render(&Report {
        lang,
        t,
        subject,
        issued: crate::audit::now_ts().chars().take(10).collect(),
        issuer,
        accesses: report
            .get("accesses")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(shown).collect())
            .unwrap_or_default(),
        notice: text(&report, "notice"),
    })
}

// ---------------------------------------------------------------- misuse signals and charts

/// The records of the last [`WINDOW_DAYS`] days this officer may read, through the API.
async fn window(console: &Console, v: &Visit<'_>) -> Result<Vec<Value>, Response<Body>> {
    let since = OffsetDateTime::now_utc() - time::Duration::days(WINDOW_DAYS);
    let q = query_string(&[
        ("since", crate::audit::record::format_ts(since)),
        ("limit", MAX_LIMIT.to_string()),
        ("format", "json".into()),
    ]);
    let body = api(console, v, &format!("/v1/audit/records?{q}")).await?;
    Ok(records(&body))
}

/// One lead of a signal.
pub struct Item {
    text: String,
    links: Vec<(String, String)>,
}

/// A misuse signal and its leads.
pub struct Signal {
    title: &'static str,
    rule: &'static str,
    items: Vec<Item>,
}

#[derive(Template)]
#[template(path = "signals.html")]
struct Signals<'a> {
    lang: &'a str,
    title: &'a str,
    who: Option<Who>,
    window: String,
    scanned: usize,
    truncated: bool,
    signals: Vec<Signal>,
}

/// `GET /signals`: the misuse signals over the window.
pub async fn signals(console: &Console, v: &Visit<'_>) -> Response<Body> {
    let recs = match window(console, v).await {
        Ok(r) => r,
        Err(page) => return page,
    };
    // Reads of the log and of the gateway's administration name no person's record.
    let policy = console.gateway.policy.load();
    let mut log = crate::gateway::builtin::audit::log_providers(&policy);
    log.extend(policy.providers().filter(|p| {
        matches!(&p.upstream, crate::policy::Upstream::Builtin(n) if n == crate::gateway::builtin::admin::ADMIN_BUILTIN)
    }).map(|p| p.id.clone()));
    render(&Signals {
        lang: "en",
        title: "Misuse signals",
        who: who(&v.session),
        window: format!("the last {WINDOW_DAYS} days"),
        scanned: recs.len(),
        truncated: recs.len() as i64 >= MAX_LIMIT,
        signals: compute_signals(&recs, &log),
    })
}

fn links(rs: &[&Value]) -> Vec<(String, String)> {
    rs.iter()
        .take(5)
        .map(|r| {
            (
                format!("{}#{}", text(r, "node"), text(r, "seq")),
                record_href(r),
            )
        })
        .collect()
}

fn at(r: &Value) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(&text(r, "ts"), &Rfc3339).ok()
}

/// One officer's reads: the distinct persons and the records.
type Reads<'a> = (BTreeSet<String>, Vec<&'a Value>);

/// The four signals over a set of records (`log` names the providers that are the log itself).
pub fn compute_signals(recs: &[Value], log: &[String]) -> Vec<Signal> {
    let reads: Vec<&Value> = recs
        .iter()
        .filter(|r| text(r, "method") != "EVENT" && !log.contains(&text(r, "provider")))
        .collect();
    let allowed: Vec<&Value> = reads
        .iter()
        .copied()
        .filter(|r| text(r, "decision") == "allow")
        .collect();
    // 1. Distinct persons per officer against colleagues with the same agency and purpose.
    let mut persons: BTreeMap<(String, String), BTreeMap<String, Reads<'_>>> = BTreeMap::new();
    for r in &allowed {
        let e = persons
            .entry((text(r, "agency"), text(r, "purpose")))
            .or_default()
            .entry(text(r, "officer"))
            .or_default();
        if let Some(s) = r.get("subjects").and_then(Value::as_array) {
            e.0.extend(s.iter().filter_map(Value::as_str).map(str::to_owned));
        }
        e.1.push(*r);
    }
    let mut wide = Vec::new();
    for ((agency, purpose), officers) in &persons {
        if officers.len() < 2 {
            continue;
        }
        for (officer, (set, rs)) in officers {
            let mut others: Vec<usize> = officers
                .iter()
                .filter(|(o, _)| *o != officer)
                .map(|(_, (s, _))| s.len())
                .collect();
            others.sort_unstable();
            let median = others[others.len() / 2].max(1);
            if set.len() >= 5 && set.len() > 3 * median {
                wide.push(Item {
                    text: format!(
                        "{officer} ({agency}, {purpose}) read {} distinct persons; the median of {} colleague(s) is {median}",
                        set.len(),
                        others.len()
                    ),
                    links: links(rs),
                });
            }
        }
    }
    // 2. Accesses outside working hours (Tbilisi, UTC+4: Monday to Friday, 08:00–19:00).
    let mut late = Vec::new();
    for r in &allowed {
        let Some(t) = at(r) else { continue };
        let local = t.to_offset(time::UtcOffset::from_hms(4, 0, 0).unwrap_or(time::UtcOffset::UTC));
        let weekend = matches!(
            local.weekday(),
            time::Weekday::Saturday | time::Weekday::Sunday
        );
        if weekend || local.hour() < 8 || local.hour() >= 19 {
            late.push(Item {
                text: format!(
                    "{} {} — {} of {} ({}) read {}/{}",
                    local.weekday(),
                    text(r, "ts"),
                    text(r, "officer"),
                    text(r, "agency"),
                    text(r, "purpose"),
                    text(r, "provider"),
                    text(r, "service")
                ),
                links: links(&[*r]),
            });
        }
    }
    late.truncate(200);
    // 3. One person looked up by three or more agencies within a day.
    let mut by_person: HashMap<String, Vec<(OffsetDateTime, String, &Value)>> = HashMap::new();
    for r in &reads {
        let Some(t) = at(r) else { continue };
        for s in r
            .get("subjects")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(s) = s.as_str() {
                by_person
                    .entry(s.to_owned())
                    .or_default()
                    .push((t, text(r, "agency"), *r));
            }
        }
    }
    let mut crowded = Vec::new();
    let mut people: Vec<_> = by_person.into_iter().collect();
    people.sort_by(|a, b| a.0.cmp(&b.0));
    for (person, mut hits) in people {
        hits.sort_by_key(|h| h.0);
        let mut best: Option<(usize, usize, usize)> = None;
        for i in 0..hits.len() {
            let end = hits[i..]
                .iter()
                .take_while(|h| h.0 - hits[i].0 <= time::Duration::days(1))
                .count();
            let agencies: BTreeSet<&str> = hits[i..i + end].iter().map(|h| h.1.as_str()).collect();
            if agencies.len() >= 3 && best.is_none_or(|b| agencies.len() > b.0) {
                best = Some((agencies.len(), i, end));
            }
        }
        if let Some((n, i, end)) = best {
            let rs: Vec<&Value> = hits[i..i + end].iter().map(|h| h.2).collect();
            crowded.push(Item {
                text: format!("{person} was looked up by {n} agencies within 24 hours"),
                links: links(&rs),
            });
        }
    }
    // 4. Bursts of refusals: five or more for one officer within ten minutes.
    let mut denied: BTreeMap<(String, String), Vec<(OffsetDateTime, &Value)>> = BTreeMap::new();
    for r in reads.iter().filter(|r| text(r, "decision") == "deny") {
        if let Some(t) = at(r) {
            denied
                .entry((text(r, "agency"), text(r, "officer")))
                .or_default()
                .push((t, *r));
        }
    }
    let mut bursts = Vec::new();
    for ((agency, officer), hits) in denied {
        let mut best = (0, 0);
        for i in 0..hits.len() {
            let n = hits[i..]
                .iter()
                .take_while(|h| h.0 - hits[i].0 <= time::Duration::minutes(10))
                .count();
            if n > best.0 {
                best = (n, i);
            }
        }
        if best.0 >= 5 {
            let rs: Vec<&Value> = hits[best.1..best.1 + best.0].iter().map(|h| h.1).collect();
            bursts.push(Item {
                text: format!(
                    "{officer} ({agency}) was refused {} times within ten minutes",
                    best.0
                ),
                links: links(&rs),
            });
        }
    }
    vec![
        Signal {
            title: "Officers reading far more persons than their colleagues",
            rule: "Distinct persons read under one agency and purpose: at least 5, and more than three times the median of the colleagues with the same purpose.",
            items: wide,
        },
        Signal {
            title: "Accesses outside working hours",
            rule: "Released reads and writes before 08:00, after 19:00 or at the weekend, Tbilisi time (UTC+4).",
            items: late,
        },
        Signal {
            title: "One person looked up by many agencies",
            rule: "Three or more agencies asking about the same person within 24 hours.",
            items: crowded,
        },
        Signal {
            title: "Bursts of refusals",
            rule: "Five or more refused requests of one officer within ten minutes.",
            items: bursts,
        },
    ]
}

#[derive(Template)]
#[template(path = "charts.html")]
struct Charts<'a> {
    lang: &'a str,
    title: &'a str,
    who: Option<Who>,
    window: String,
    scanned: usize,
    charts: Vec<(String, String)>,
}

/// `GET /charts`: requests over time by agency, refusals by reason, quota refusals by agency.
pub async fn charts(console: &Console, v: &Visit<'_>) -> Response<Body> {
    let recs = match window(console, v).await {
        Ok(r) => r,
        Err(page) => return page,
    };
    render(&Charts {
        lang: "en",
        title: "Charts",
        who: who(&v.session),
        window: format!("the last {WINDOW_DAYS} days"),
        scanned: recs.len(),
        charts: draw_charts(&recs),
    })
}

/// The charts of a set of records, as SVG documents.
pub fn draw_charts(recs: &[Value]) -> Vec<(String, String)> {
    use charts_rs::{BarChart, LineChart, Series};
    let requests: Vec<&Value> = recs
        .iter()
        .filter(|r| text(r, "method") != "EVENT")
        .collect();
    let day = |r: &Value| text(r, "ts").chars().take(10).collect::<String>();
    let days: BTreeSet<String> = requests.iter().map(|r| day(r)).collect();
    let days: Vec<String> = days.into_iter().collect();
    let mut per_agency: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for r in &requests {
        let counts = per_agency
            .entry(text(r, "agency"))
            .or_insert_with(|| vec![0.0; days.len()]);
        if let Ok(i) = days.binary_search(&day(r)) {
            counts[i] += 1.0;
        }
    }
    let count_by = |filter: &dyn Fn(&Value) -> bool, key: &str| {
        let mut m: BTreeMap<String, f32> = BTreeMap::new();
        for r in requests.iter().copied().filter(|r| filter(r)) {
            *m.entry(text(r, key)).or_default() += 1.0;
        }
        m
    };
    let reasons = count_by(
        &|r| text(r, "decision") == "deny" || !text(r, "reason").is_empty(),
        "reason",
    );
    let quota = count_by(
        &|r| text(r, "reason") == crate::limits::RATE_LIMITED,
        "agency",
    );
    let mut out = Vec::new();
    let svg = |r: Result<String, charts_rs::Error>| {
        r.unwrap_or_else(|e| {
            tracing::warn!(%e, "chart not drawn");
            String::new()
        })
    };
    let mut line = LineChart::new(
        per_agency
            .into_iter()
            .map(|(a, d)| Series::new(if a.is_empty() { "(none)".into() } else { a }, d))
            .collect(),
        days.iter().map(|d| d.chars().skip(5).collect()).collect(),
    );
    line.width = 900.0;
    out.push(("Requests per day, by agency".to_owned(), svg(line.svg())));
    let bar = |m: BTreeMap<String, f32>, name: &str| {
        let (labels, values): (Vec<String>, Vec<f32>) = m.into_iter().unzip();
        let mut c = BarChart::new(vec![Series::new(name.to_owned(), values)], labels);
        c.width = 900.0;
        svg(c.svg())
    };
    out.push(("Refusals by reason".to_owned(), bar(reasons, "refusals")));
    out.push((
        "Quota refusals (429) by agency".to_owned(),
        bar(quota, "quota refusals"),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_defused() {
        assert_eq!(csv_cell("a"), "a");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"x\""), "\"say \"\"x\"\"\"");
        assert_eq!(csv_cell("=SUM(A1)"), "'=SUM(A1)");
    }

    #[test]
    fn charts_are_svg_without_script_or_inline_style() {
        let recs: Vec<Value> = (0..20)
            .map(|i| {
                serde_json::json!({
                    "ts": format!("2026-12-0{}T10:00:00Z", 1 + i % 3),
                    "agency": if i % 2 == 0 { "mia-border" } else { "psda" },
                    "decision": if i % 5 == 0 { "deny" } else { "allow" },
                    "reason": if i % 5 == 0 { "rate_limited" } else { "" },
                    "method": "GET",
                })
            })
            .collect();
        for (_, svg) in draw_charts(&recs) {
            assert!(svg.starts_with("<svg"), "{svg:.80}");
            assert!(!svg.contains("<script"), "no script in a chart");
            assert!(
                !svg.contains("style="),
                "no inline style (CSP style-src 'self')"
            );
        }
    }

    #[test]
    fn signals_find_the_wide_reader_and_the_burst() {
        let mut recs = Vec::new();
        for i in 0..30 {
            recs.push(serde_json::json!({"ts": "2026-12-01T10:00:00Z", "agency": "mia-border", "officer": "wide",
                "purpose": "border-control", "provider": "registry", "service": "persons", "method": "GET",
                "decision": "allow", "subjects": [format!("RF-{i}")], "node": "n", "seq": i}));
        }
        for (o, s) in [("a", "RF-1"), ("b", "RF-2")] {
            recs.push(serde_json::json!({"ts": "2026-12-01T10:00:00Z", "agency": "mia-border", "officer": o,
                "purpose": "border-control", "provider": "registry", "service": "persons", "method": "GET",
                "decision": "allow", "subjects": [s], "node": "n", "seq": 100}));
        }
        for i in 0..6 {
            recs.push(serde_json::json!({"ts": format!("2026-12-01T10:0{i}:00Z"), "agency": "psda", "officer": "x",
                "purpose": "p", "provider": "registry", "service": "persons", "method": "GET",
                "decision": "deny", "subjects": [], "node": "n", "seq": 200 + i}));
        }
        let s = compute_signals(&recs, &["audit".to_owned()]);
        assert_eq!(s[0].items.len(), 1, "the wide reader");
        assert!(s[0].items[0].text.starts_with("wide "));
        assert_eq!(s[3].items.len(), 1, "the burst");
        assert!(
            s[1].items.is_empty(),
            "10:00 UTC is 14:00 in Tbilisi on a Tuesday"
        );
    }
}
