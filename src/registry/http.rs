//! The register's HTTP API, behind the gateway: routing, reads and searches,
//! and the idempotent write wrapper around [`super::write`].
//!
//! The gateway has already checked TLS, the client and the body size; this
//! layer answers one fully read request. Every failure is a problem+json,
//! and database errors are logged here and shown only as `internal`.
//! The API is described in `openapi/registry.json`, served at `/openapi.json`.

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::answer::{internal, parse_query, private, Answer, Params};
use super::dates::parse_date;
use super::db::{self, CrossingQuery};
use super::model::{self, CROSSING_POINTS, DIRECTIONS, RECORD_KINDS};
use super::names::surname_key;
use super::write::{self, Kind, MAX_TOKEN};
use super::Registry;
use crate::problem::{json_response, Body, Problem};

/// Most persons a document or name search returns; a name and birth date rarely match more than a few.
const MAX_RESULTS: i64 = 50;
/// Page size of the paginated searches when the caller gives none.
const DEFAULT_PAGE: i64 = 50;
/// Largest page the caller may ask for.
const MAX_PAGE: i64 = 200;

/// The register's OpenAPI document, kept in the repository and served as is.
pub(crate) const OPENAPI: &str = include_str!("../../openapi/registry.json");

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
    OpenApi,
    SearchPersons,
    Person(&'a str),
    Records(&'a str, &'a str),
    SearchCrossings,
    Statistics,
    Create(Kind),
    DecideAsylum(&'a str),
    AssignPersonalNumber(&'a str),
}

const GET: &[Method] = &[Method::GET];
const POST: &[Method] = &[Method::POST];
const GET_POST: &[Method] = &[Method::GET, Method::POST];

async fn route(reg: &Registry, req: Request<Bytes>) -> Answer {
    let path = req.uri().path();
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let (allowed, target) = match segments.as_slice() {
        ["healthz"] => (GET, Target::Health),
        ["openapi.json"] => (GET, Target::OpenApi),
        ["persons"] if req.method() == Method::POST => (GET_POST, Target::Create(Kind::Person)),
        ["persons"] => (GET_POST, Target::SearchPersons),
        ["persons", id] if valid_token(id) => (GET, Target::Person(id)),
        ["persons", id, kind] if valid_token(id) && RECORD_KINDS.contains(kind) => {
            (GET, Target::Records(id, kind))
        }
        ["crossings"] if req.method() == Method::POST => (GET_POST, Target::Create(Kind::Crossing)),
        ["crossings"] => (GET_POST, Target::SearchCrossings),
        ["statistics"] => (GET, Target::Statistics),
        ["asylum-cases", id, "decision"] if valid_token(id) => (POST, Target::DecideAsylum(id)),
        ["persons", id, "personal-number"] if valid_token(id) => {
            (POST, Target::AssignPersonalNumber(id))
        }
        [kind] => match Kind::from_segment(kind) {
            Some(k) => (POST, Target::Create(k)),
            None => return Err(Problem::not_found("no such resource in the register")),
        },
        _ => return Err(Problem::not_found("no such resource in the register")),
    };
    if !allowed.contains(req.method()) {
        return Ok(method_not_allowed(allowed));
    }
    let query = req.uri().query().unwrap_or("");
    match target {
        Target::Health => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        Target::OpenApi => {
            let mut resp = Response::new(Body::new(Bytes::from_static(OPENAPI.as_bytes())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok(resp)
        }
        Target::SearchPersons => search_persons(reg, query).await,
        Target::Person(id) => get_person(reg, id).await,
        Target::Records(id, kind) => get_records(reg, id, kind).await,
        Target::SearchCrossings => search_crossings(reg, query).await,
        Target::Statistics => super::statistics::answer(reg, &parse_query(query)?).await,
        Target::Create(kind) => create(reg, kind, &req).await,
        Target::DecideAsylum(id) => super::update::decide_asylum(reg, id, req.body()).await,
        Target::AssignPersonalNumber(id) => {
            super::update::assign_personal_number(reg, id, req.body()).await
        }
    }
}

/// 405 naming, in `Allow`, the methods the path serves.
fn method_not_allowed(allowed: &[Method]) -> Response<Body> {
    let list: Vec<&str> = allowed.iter().map(Method::as_str).collect();
    let list = list.join(", ");
    let mut resp = Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!("this resource accepts {list} only"),
    )
    .to_response();
    if let Ok(v) = HeaderValue::from_str(&list) {
        resp.headers_mut().insert(header::ALLOW, v);
    }
    resp
}

fn valid_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_TOKEN
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
    let records = db::records(&mut conn, id, kind)
        .await
        .map_err(internal)?
        .ok_or_else(|| Problem::not_found("no person with this id"))?;
    let mut body = Map::new();
    body.insert("id".to_owned(), Value::String(id.to_owned()));
    body.insert(kind.to_owned(), records);
    Ok(private(json_response(StatusCode::OK, &body)))
}

/// `GET /persons`: by document, by names and birth date, or by nationality (paginated).
async fn search_persons(reg: &Registry, query: &str) -> Answer {
    let p = parse_query(query)?;
    p.only(
        &[
            "document",
            "issuing_state",
            "surname",
            "given_names",
            "birth_date",
            "nationality",
            "born_from",
            "born_until",
            "limit",
            "cursor",
        ],
        "search by document, by surname and birth_date, or by nationality",
    )?;
    let by_document = p.get("document").is_some();
    let by_name = p.get("surname").is_some() || p.get("birth_date").is_some();
    let by_nationality = p.get("nationality").is_some();
    let modes = [by_document, by_name, by_nationality]
        .iter()
        .filter(|m| **m)
        .count();
    if modes == 0 {
        return Err(Problem::bad_request(
            "document, surname and birth_date, or nationality is missing",
        ));
    }
    if modes > 1 {
        return Err(Problem::bad_request(
            "search by one of document, surname and birth_date, or nationality",
        ));
    }
    let stray = |names: &[&str]| -> Result<(), Problem> {
        match names.iter().find(|n| p.get(n).is_some()) {
            Some(n) => Err(Problem::bad_request(format!(
                "{n} does not apply to this search"
            ))),
            None => Ok(()),
        }
    };
    let mut conn = reg.store.pool().acquire().await.map_err(internal)?;
    let mut next = None;
    let ids = if by_document {
        stray(&["given_names", "born_from", "born_until", "limit", "cursor"])?;
        let doc = bounded("document", p.get("document"))?;
        let state = p.get("issuing_state");
        if let Some(s) = state {
            if !model::is_country(s) {
                return Err(Problem::bad_request(
                    "issuing_state must be an ISO 3166-1 alpha-2 code",
                ));
            }
        }
        db::ids_by_document(&mut conn, doc, state, MAX_RESULTS)
            .await
            .map_err(internal)?
    } else if by_name {
        stray(&[
            "issuing_state",
            "born_from",
            "born_until",
            "limit",
            "cursor",
        ])?;
        let surname = p
            .get("surname")
            .ok_or_else(|| Problem::bad_request("surname is missing"))?;
        let birth = p
            .get("birth_date")
            .ok_or_else(|| Problem::bad_request("birth_date is missing"))?;
        bounded("surname", Some(surname))?;
        if parse_date(birth).is_none() {
            return Err(Problem::bad_request("birth_date must be a date YYYY-MM-DD"));
        }
        let key = surname_key(surname);
        if key.is_empty() {
            return Err(Problem::bad_request("surname must contain letters"));
        }
        let given = p.get("given_names").map(surname_key);
        db::by_surname_key(&mut conn, &key, birth, MAX_RESULTS)
            .await
            .map_err(internal)?
            .into_iter()
            .filter(|(_, names)| given.as_deref().is_none_or(|g| given_matches(g, names)))
            .map(|(id, _)| id)
            .collect()
    } else {
        stray(&["issuing_state", "given_names"])?;
        let code = p.get("nationality").unwrap_or_default();
        if !model::is_country(code) {
            return Err(Problem::bad_request(
                "nationality must be an ISO 3166-1 alpha-2 code",
            ));
        }
        let born_from = opt_date(&p, "born_from")?.unwrap_or_else(|| "0000-01-01".to_owned());
        let born_until = opt_date(&p, "born_until")?.unwrap_or_else(|| "9999-12-31".to_owned());
        let limit = page_limit(&p)?;
        let after = match p.get("cursor") {
            Some(c) => decode_cursor(c)?,
            None => String::new(),
        };
        let mut ids =
            db::ids_by_nationality(&mut conn, code, &after, &born_from, &born_until, limit + 1)
                .await
                .map_err(internal)?;
        if ids.len() as i64 > limit {
            ids.truncate(limit as usize);
            next = ids.last().map(|id| encode_cursor(id));
        }
        ids
    };
    let mut results = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(p) = db::load_person(&mut conn, &id).await.map_err(internal)? {
            results.push(p);
        }
    }
    let mut body = json!({ "results": results });
    if let Some(n) = next {
        body["next"] = Value::String(n);
    }
    Ok(private(json_response(StatusCode::OK, &body)))
}

/// Whether given names typed by an officer (already keyed) match a person's given names:
/// all of them, or any one of them.
fn given_matches(query_key: &str, names: &str) -> bool {
    surname_key(names) == query_key
        || names
            .split([' ', '-'])
            .any(|word| !word.is_empty() && surname_key(word) == query_key)
}

/// `GET /crossings`: crossings in a time range, oldest first, paginated.
async fn search_crossings(reg: &Registry, query: &str) -> Answer {
    let p = parse_query(query)?;
    p.only(
        &[
            "from",
            "until",
            "point",
            "direction",
            "nationality",
            "limit",
            "cursor",
        ],
        "search crossings by from, until, point, direction and nationality",
    )?;
    let from = p
        .get("from")
        .ok_or_else(|| Problem::bad_request("from is missing"))?;
    let until = p
        .get("until")
        .ok_or_else(|| Problem::bad_request("until is missing"))?;
    let from = instant("from", from)?;
    let until = instant("until", until)?;
    if until <= from {
        return Err(Problem::bad_request("until must be after from"));
    }
    let point = p.get("point").unwrap_or_default();
    if !point.is_empty() && !CROSSING_POINTS.contains(&point) {
        return Err(Problem::bad_request(format!(
            "point must be one of: {}",
            CROSSING_POINTS.join(", ")
        )));
    }
    let direction = p.get("direction").unwrap_or_default();
    if !direction.is_empty() && !DIRECTIONS.contains(&direction) {
        return Err(Problem::bad_request("direction must be entry or exit"));
    }
    let nationality = p.get("nationality").unwrap_or_default();
    if !nationality.is_empty() && !model::is_country(nationality) {
        return Err(Problem::bad_request(
            "nationality must be an ISO 3166-1 alpha-2 code",
        ));
    }
    let limit = page_limit(&p)?;
    let after = match p.get("cursor") {
        Some(c) => {
            let raw = decode_cursor(c)?;
            let (at, id) = raw
                .split_once('|')
                .ok_or_else(|| Problem::bad_request("cursor is not valid"))?;
            Some((at.to_owned(), id.to_owned()))
        }
        None => None,
    };
    let q = CrossingQuery {
        from,
        until,
        point: point.to_owned(),
        direction: direction.to_owned(),
        nationality: nationality.to_owned(),
        after,
    };
    let mut conn = reg.store.pool().acquire().await.map_err(internal)?;
    let mut found = db::crossings_between(&mut conn, &q, limit + 1)
        .await
        .map_err(internal)?;
    let mut body = Map::new();
    if found.len() as i64 > limit {
        found.truncate(limit as usize);
        if let Some(last) = found.last() {
            body.insert(
                "next".to_owned(),
                Value::String(encode_cursor(&format!("{}|{}", last.at, last.id))),
            );
        }
    }
    body.insert(
        "results".to_owned(),
        serde_json::to_value(found).map_err(|_| Problem::internal())?,
    );
    Ok(private(json_response(StatusCode::OK, &body)))
}

/// An RFC 3339 timestamp or a date (midnight UTC), in the stored form.
fn instant(name: &str, v: &str) -> Result<String, Problem> {
    if let Some(d) = parse_date(v) {
        return Ok(format!("{}T00:00:00Z", super::dates::iso(d)));
    }
    OffsetDateTime::parse(v, &Rfc3339)
        .map(db::rfc3339)
        .map_err(|_| {
            Problem::bad_request(format!(
                "{name} must be an RFC 3339 timestamp or a date YYYY-MM-DD"
            ))
        })
}

fn opt_date(p: &Params, name: &str) -> Result<Option<String>, Problem> {
    match p.get(name) {
        None => Ok(None),
        Some(v) => parse_date(v)
            .map(|d| Some(super::dates::iso(d)))
            .ok_or_else(|| Problem::bad_request(format!("{name} must be a date YYYY-MM-DD"))),
    }
}

fn page_limit(p: &Params) -> Result<i64, Problem> {
    match p.get("limit") {
        None => Ok(DEFAULT_PAGE),
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| Problem::bad_request(format!("limit must be 1 to {MAX_PAGE}"))),
    }
}

/// Cursors are opaque to callers: the position, base64url-encoded.
fn encode_cursor(position: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(position)
}

fn decode_cursor(cursor: &str) -> Result<String, Problem> {
    let bad = || Problem::bad_request("cursor is not valid");
    if cursor.len() > 4 * MAX_TOKEN {
        return Err(bad());
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad())?;
    String::from_utf8(bytes).map_err(|_| bad())
}

fn bounded<'a>(name: &str, value: Option<&'a str>) -> Result<&'a str, Problem> {
    match value {
        Some(v) if !v.trim().is_empty() && v.len() <= MAX_TOKEN => Ok(v),
        _ => Err(Problem::bad_request(format!(
            "{name} must be 1 to {MAX_TOKEN} characters"
        ))),
    }
}

/// Runs a POST under an optional `Idempotency-Key`, remembered per calling agency and record
/// kind: a key seen before replays the first answer (or refuses a different body); the new
/// record and the key's answer are stored in one transaction.
async fn create(reg: &Registry, kind: Kind, req: &Request<Bytes>) -> Answer {
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
    // The gateway names the calling agency; keys of different agencies never meet.
    let agency = req
        .headers()
        .get("x-karibche-agency")
        .and_then(|v| v.to_str().ok())
        .filter(|a| valid_token(a))
        .unwrap_or("-");
    let scope = format!("{agency}/{}", kind.segment());
    let fields = match serde_json::from_slice::<Value>(req.body()) {
        Ok(Value::Object(m)) => m,
        _ => return Err(Problem::bad_request("the body must be a JSON object")),
    };
    // serde_json maps are ordered by key, so this hash ignores member order and whitespace.
    let canonical = serde_json::to_vec(&fields).map_err(|_| Problem::internal())?;
    let request_hash = crate::files::sha256_hex(&canonical);

    let mut conn = reg.store.pool().acquire().await.map_err(internal)?;
    if let Some(key) = &key {
        if let Some(stored) = db::idempotent_answer(&mut conn, &scope, key)
            .await
            .map_err(internal)?
        {
            return replay(stored, &request_hash);
        }
    }

    let record = write::parse(kind, &fields)?;
    record.check(&mut conn).await?;
    let body = record.body()?;
    let body_text = serde_json::to_string(&body).map_err(|_| Problem::internal())?;

    let mut tx = sqlx::Acquire::begin(&mut *conn).await.map_err(internal)?;
    match record.insert(&mut tx, reg.store.backend()).await {
        Ok(()) => {}
        Err(e) if db::is_unique_violation(&e) => {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "conflict",
                "Conflict",
                format!(
                    "{}: a record with this number is already registered",
                    record.unique_field()
                ),
            ));
        }
        Err(e) => return Err(internal(e)),
    }
    if let Some(key) = &key {
        let stored = db::store_answer(
            &mut tx,
            &scope,
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
                let stored = db::idempotent_answer(&mut conn, &scope, key)
                    .await
                    .map_err(internal)?
                    .ok_or_else(Problem::internal)?;
                return replay(stored, &request_hash);
            }
            Err(e) => return Err(internal(e)),
        }
    }
    tx.commit().await.map_err(internal)?;
    Ok(private(json_response(StatusCode::CREATED, &body)))
}

fn replay(stored: db::StoredAnswer, request_hash: &str) -> Answer {
    if stored.request_hash != request_hash {
        return Err(write::unprocessable(
            "Idempotency-Key",
            "this key was already used with a different request",
        )
        .into());
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
