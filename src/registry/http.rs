//! The register's HTTP API, behind the gateway: routing, query and body
//! validation, and idempotent writes.
//!
//! The gateway has already checked TLS, the client and the body size; this
//! layer answers one fully read request. Every failure is a problem+json,
//! and database errors are logged here and shown only as `internal`.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::db;
use super::model::{self, Crossing, Visa, CROSSING_POINTS, DIRECTIONS, RECORD_KINDS, VISA_ENTRIES};
use super::synth::parse_date;
use super::Registry;
use crate::problem::{json_response, Body, Problem};

/// Most persons one search returns; a surname and birth date rarely match more than a few.
const MAX_RESULTS: i64 = 50;
/// Longest id, number or key accepted in a path, query or header.
const MAX_TOKEN: usize = 64;
/// Longest free-text field (issuing post).
const MAX_TEXT: usize = 200;
/// How far in the future a crossing may be stamped, for clock skew between posts and the register.
const CLOCK_SKEW_SECS: i64 = 600;

type Answer = Result<Response<Body>, Problem>;

/// Routes one request.
pub(crate) async fn handle(reg: &Registry, req: Request<Bytes>) -> Response<Body> {
    match route(reg, req).await {
        Ok(resp) => resp,
        Err(problem) => problem.to_response(),
    }
}

/// What a path names, before the method is checked.
enum Target<'a> {
    Health,
    Search,
    Person(&'a str),
    Records(&'a str, &'a str),
    NewCrossing,
    NewVisa,
}

async fn route(reg: &Registry, req: Request<Bytes>) -> Answer {
    let path = req.uri().path();
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let (allowed, target) = match segments.as_slice() {
        ["healthz"] => (Method::GET, Target::Health),
        ["persons"] => (Method::GET, Target::Search),
        ["persons", id] if valid_token(id) => (Method::GET, Target::Person(id)),
        ["persons", id, kind] if valid_token(id) && RECORD_KINDS.contains(kind) => {
            (Method::GET, Target::Records(id, kind))
        }
        ["crossings"] => (Method::POST, Target::NewCrossing),
        ["visas"] => (Method::POST, Target::NewVisa),
        _ => return Err(Problem::not_found("no such resource in the register")),
    };
    if req.method() != allowed {
        return Ok(method_not_allowed(&allowed));
    }
    match target {
        Target::Health => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        Target::Search => search(reg, req.uri().query().unwrap_or("")).await,
        Target::Person(id) => get_person(reg, id).await,
        Target::Records(id, kind) => get_records(reg, id, kind).await,
        Target::NewCrossing => idempotent(reg, "crossings", &req, post_crossing).await,
        Target::NewVisa => idempotent(reg, "visas", &req, post_visa).await,
    }
}

/// 405 naming, in `Allow`, the one method the path serves.
fn method_not_allowed(allowed: &Method) -> Response<Body> {
    let mut resp = Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!("this resource accepts {allowed} only"),
    )
    .to_response();
    if let Ok(v) = HeaderValue::from_str(allowed.as_str()) {
        resp.headers_mut().insert(header::ALLOW, v);
    }
    resp
}

fn valid_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_TOKEN
}

/// Logs a database error where it happened and hides it from the caller.
fn internal(err: sqlx::Error) -> Problem {
    tracing::error!(%err, "register database error");
    Problem::internal()
}

fn unprocessable(field: &str, why: &str) -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-field",
        "Invalid field",
        format!("{field}: {why}"),
    )
}

/// Personal data must not linger in shared caches.
fn private(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn get_person(reg: &Registry, id: &str) -> Answer {
    let mut conn = reg.store.pool().acquire().await.map_err(internal)?;
    match db::load_person(&mut conn, id).await.map_err(internal)? {
        Some(p) => Ok(private(json_response(StatusCode::OK, &p))),
        None => Err(Problem::not_found("no person with this id")),
    }
}

async fn get_records(reg: &Registry, id: &str, kind: &str) -> Answer {
    let mut conn = reg.store.pool().acquire().await.map_err(internal)?;
    if !db::person_exists(&mut conn, id).await.map_err(internal)? {
        return Err(Problem::not_found("no person with this id"));
    }
    let records = db::records(&mut conn, id, kind)
        .await
        .map_err(internal)?
        .ok_or_else(Problem::internal)?;
    let mut body = Map::new();
    body.insert("id".to_owned(), Value::String(id.to_owned()));
    body.insert(kind.to_owned(), records);
    Ok(private(json_response(StatusCode::OK, &body)))
}

/// `GET /persons?document=N` or `GET /persons?surname=S&birth_date=D`.
async fn search(reg: &Registry, query: &str) -> Answer {
    let params = parse_query(query)?;
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if let Some((k, _)) = params
        .iter()
        .find(|(k, _)| !["document", "surname", "birth_date"].contains(&k.as_str()))
    {
        return Err(Problem::bad_request(format!(
            "unknown query parameter {k}: search by document, or by surname and birth_date"
        )));
    }
    let mut conn = reg.store.pool().acquire().await.map_err(internal)?;
    let ids = match (get("document"), get("surname"), get("birth_date")) {
        (Some(doc), None, None) => {
            nonempty("document", doc)?;
            db::ids_by_document(&mut conn, doc, MAX_RESULTS)
                .await
                .map_err(internal)?
        }
        (None, Some(surname), Some(birth)) => {
            nonempty("surname", surname)?;
            if parse_date(birth).is_none() {
                return Err(Problem::bad_request("birth_date must be a date YYYY-MM-DD"));
            }
            db::ids_by_surname(&mut conn, surname, birth, MAX_RESULTS)
                .await
                .map_err(internal)?
        }
        (Some(_), _, _) => {
            return Err(Problem::bad_request(
                "search by document alone, or by surname and birth_date, not both",
            ))
        }
        (None, Some(_), None) => return Err(Problem::bad_request("birth_date is missing")),
        (None, None, Some(_)) => return Err(Problem::bad_request("surname is missing")),
        (None, None, None) => {
            return Err(Problem::bad_request(
                "document, or surname and birth_date, is missing",
            ))
        }
    };
    let mut results = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(p) = db::load_person(&mut conn, &id).await.map_err(internal)? {
            results.push(p);
        }
    }
    Ok(private(json_response(
        StatusCode::OK,
        &json!({ "results": results }),
    )))
}

fn nonempty(name: &str, value: &str) -> Result<(), Problem> {
    if value.trim().is_empty() || value.len() > MAX_TOKEN {
        return Err(Problem::bad_request(format!(
            "{name} must be 1 to {MAX_TOKEN} characters"
        )));
    }
    Ok(())
}

/// Decodes `application/x-www-form-urlencoded` pairs; repeats are refused so no value is silently ignored.
fn parse_query(query: &str) -> Result<Vec<(String, String)>, Problem> {
    let mut out: Vec<(String, String)> = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let k = percent_decode(k)?;
        let v = percent_decode(v)?;
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(Problem::bad_request(format!(
                "query parameter {k} is given twice"
            )));
        }
        out.push((k, v));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, Problem> {
    let bad = || Problem::bad_request("the query string is not valid percent-encoded UTF-8");
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                    .ok_or_else(bad)?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// A validated write, ready to store: the answer body and how to insert it.
struct Write {
    body: Value,
    insert: Insert,
}

enum Insert {
    Crossing(Crossing),
    Visa { person_id: String, visa: Visa },
}

type Validator = fn(&Map<String, Value>) -> Result<(String, Write), Problem>;

/// Runs a POST under an optional `Idempotency-Key`: a key seen before replays the first
/// answer; the new record and the key's answer are stored in one transaction.
async fn idempotent(
    reg: &Registry,
    scope: &str,
    req: &Request<Bytes>,
    validate: Validator,
) -> Answer {
    let key = match req.headers().get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if valid_token(k) && k.bytes().all(|c| c.is_ascii_graphic()) => {
                Some(k.to_owned())
            }
            _ => {
                return Err(Problem::bad_request(format!(
                    "Idempotency-Key must be 1 to {MAX_TOKEN} visible ASCII characters"
                )))
            }
        },
    };
    let fields = match serde_json::from_slice::<Value>(req.body()) {
        Ok(Value::Object(m)) => m,
        _ => return Err(Problem::bad_request("the body must be a JSON object")),
    };
    // serde_json maps are ordered by key, so this hash ignores member order and whitespace.
    let canonical = serde_json::to_vec(&fields).map_err(|_| Problem::internal())?;
    let request_hash = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &canonical,
    ));

    let mut conn = reg.store.pool().acquire().await.map_err(internal)?;
    if let Some(key) = &key {
        if let Some(stored) = db::idempotent_answer(&mut conn, scope, key)
            .await
            .map_err(internal)?
        {
            return replay(stored, &request_hash);
        }
    }

    let (person_id, write) = validate(&fields)?;
    if !db::person_exists(&mut conn, &person_id)
        .await
        .map_err(internal)?
    {
        return Err(unprocessable("person_id", "no person with this id"));
    }
    let body_text = serde_json::to_string(&write.body).map_err(|_| Problem::internal())?;

    let mut tx = sqlx::Acquire::begin(&mut *conn).await.map_err(internal)?;
    let inserted = match &write.insert {
        Insert::Crossing(c) => {
            db::insert(&mut tx, reg.store.backend(), &db::CROSSINGS, db::one_row(&db::crossing_cells(c))).await
        }
        Insert::Visa { person_id, visa } => {
            db::insert(&mut tx, reg.store.backend(), &db::VISAS, db::one_row(&db::visa_cells(person_id, visa))).await
        }
    };
    match inserted {
        Ok(()) => {}
        Err(e) if db::is_unique_violation(&e) => {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "conflict",
                "Conflict",
                "number: a record with this number is already registered",
            ));
        }
        Err(e) => return Err(internal(e)),
    }
    if let Some(key) = &key {
        let stored = db::store_answer(
            &mut tx,
            scope,
            key,
            &request_hash,
            StatusCode::CREATED.as_u16(),
            &body_text,
        )
        .await;
        match stored {
            Ok(()) => {}
            Err(e) if db::is_unique_violation(&e) => {
                // The same key raced us and won: drop our record, answer with theirs.
                drop(tx);
                let stored = db::idempotent_answer(&mut conn, scope, key)
                    .await
                    .map_err(internal)?
                    .ok_or_else(Problem::internal)?;
                return replay(stored, &request_hash);
            }
            Err(e) => return Err(internal(e)),
        }
    }
    tx.commit().await.map_err(internal)?;
    Ok(private(json_response(StatusCode::CREATED, &write.body)))
}

fn replay(stored: db::StoredAnswer, request_hash: &str) -> Answer {
    if stored.request_hash != request_hash {
        return Err(unprocessable(
            "Idempotency-Key",
            "this key was already used with a different request",
        ));
    }
    let status = u16::try_from(stored.status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(Problem::internal)?;
    let mut resp = Response::new(Body::new(Bytes::from(stored.body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok(private(resp))
}

/// The fields of a JSON object, each read once; members not read are refused.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    allowed: &'static [&'static str],
}

impl Fields<'_> {
    fn check_unknown(&self) -> Result<(), Problem> {
        match self
            .map
            .keys()
            .find(|k| !self.allowed.contains(&k.as_str()))
        {
            Some(k) => Err(unprocessable(k, "unknown field")),
            None => Ok(()),
        }
    }

    fn text(&self, name: &str, max: usize) -> Result<String, Problem> {
        match self.map.get(name) {
            Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= max => Ok(s.clone()),
            Some(Value::String(_)) => Err(unprocessable(
                name,
                &format!("must be 1 to {max} characters"),
            )),
            Some(_) => Err(unprocessable(name, "must be a string")),
            None => Err(unprocessable(name, "is required")),
        }
    }

    fn one_of(&self, name: &str, allowed: &[&str]) -> Result<String, Problem> {
        let v = self.text(name, MAX_TEXT)?;
        if allowed.contains(&v.as_str()) {
            Ok(v)
        } else {
            Err(unprocessable(
                name,
                &format!("must be one of: {}", allowed.join(", ")),
            ))
        }
    }

    fn date(&self, name: &str) -> Result<time::Date, Problem> {
        parse_date(&self.text(name, MAX_TOKEN)?)
            .ok_or_else(|| unprocessable(name, "must be a date YYYY-MM-DD"))
    }
}

fn post_crossing(map: &Map<String, Value>) -> Result<(String, Write), Problem> {
    let f = Fields {
        map,
        allowed: &["person_id", "direction", "point", "at", "document_number"],
    };
    f.check_unknown()?;
    let person_id = f.text("person_id", MAX_TOKEN)?;
    let direction = f.one_of("direction", &DIRECTIONS)?;
    let point = f.one_of("point", &CROSSING_POINTS)?;
    let at = OffsetDateTime::parse(&f.text("at", MAX_TOKEN)?, &Rfc3339)
        .map_err(|_| unprocessable("at", "must be an RFC 3339 timestamp"))?;
    if (at - OffsetDateTime::now_utc()).whole_seconds() > CLOCK_SKEW_SECS {
        return Err(unprocessable("at", "lies in the future"));
    }
    let document_number = f.text("document_number", MAX_TOKEN)?;
    let crossing = Crossing {
        id: format!("CR-{}", uuid::Uuid::now_v7().simple()),
        person_id: person_id.clone(),
        direction,
        point,
        at: db::rfc3339(at),
        document_number,
    };
    let body = serde_json::to_value(&crossing).map_err(|_| Problem::internal())?;
    Ok((
        person_id,
        Write {
            body,
            insert: Insert::Crossing(crossing),
        },
    ))
}

fn post_visa(map: &Map<String, Value>) -> Result<(String, Write), Problem> {
    let f = Fields {
        map,
        allowed: &[
            "person_id",
            "number",
            "category",
            "issuing_post",
            "valid_from",
            "valid_until",
            "entries",
        ],
    };
    f.check_unknown()?;
    let person_id = f.text("person_id", MAX_TOKEN)?;
    let number = f.text("number", MAX_TOKEN)?;
    if !number
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'-')
    {
        return Err(unprocessable(
            "number",
            "must be letters, digits and hyphens",
        ));
    }
    let category = f.text("category", MAX_TOKEN)?;
    if !model::is_visa_category(&category) {
        let codes: Vec<&str> = model::VISA_CATEGORIES.iter().map(|(c, _)| *c).collect();
        return Err(unprocessable(
            "category",
            &format!("must be one of: {}", codes.join(", ")),
        ));
    }
    let issuing_post = f.text("issuing_post", MAX_TEXT)?;
    let valid_from = f.date("valid_from")?;
    let valid_until = f.date("valid_until")?;
    if valid_until <= valid_from {
        return Err(unprocessable("valid_until", "must be after valid_from"));
    }
    let entries = f.one_of("entries", &VISA_ENTRIES)?;
    let visa = Visa {
        id: format!("VI-{}", uuid::Uuid::now_v7().simple()),
        person_id: Some(person_id.clone()),
        number,
        category,
        issuing_post,
        valid_from: super::synth::iso(valid_from),
        valid_until: super::synth::iso(valid_until),
        entries,
    };
    let body = serde_json::to_value(&visa).map_err(|_| Problem::internal())?;
    Ok((
        person_id.clone(),
        Write {
            body,
            insert: Insert::Visa { person_id, visa },
        },
    ))
}
