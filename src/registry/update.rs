//! Changes to records that already exist: the decision on a pending asylum
//! case (Migration Department) and the assignment of a personal number
//! (Public Service Development Agency). Each change is allowed once — a
//! decided case or an assigned number is never overwritten — and answers
//! with the updated record, naming its person so the gateway logs the subject.

use ::http::{Response, StatusCode};
use serde_json::{json, Map, Value};
use time::{Date, OffsetDateTime};

use super::answer::internal;
use super::dates::{iso, parse_date};
use super::write::{unprocessable, Invalid};
use super::Registry;
use crate::problem::{json_response, Body, Problem};

/// Statuses a pending case can move to.
const DECISIONS: [&str; 3] = ["granted", "refused", "withdrawn"];

fn object(body: &[u8]) -> Result<Map<String, Value>, Problem> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Problem::bad_request("the body must be a JSON object")),
    }
}

fn only(map: &Map<String, Value>, allowed: &[&str]) -> Result<(), Invalid> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(unprocessable(k, "unknown field")),
        None => Ok(()),
    }
}

fn text<'a>(map: &'a Map<String, Value>, field: &str) -> Result<&'a str, Invalid> {
    map.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| unprocessable(field, "is required (a string)"))
}

fn conflict(detail: &str) -> Problem {
    Problem::new(StatusCode::CONFLICT, "conflict", "Conflict", detail)
}

/// `POST /asylum-cases/{id}/decision` `{"status", "decision_on"}`: decides a pending case.
pub(crate) async fn decide_asylum(
    reg: &Registry,
    id: &str,
    body: &[u8],
) -> Result<Response<Body>, Problem> {
    let map = object(body)?;
    only(&map, &["status", "decision_on"])?;
    let status = text(&map, "status")?;
    if !DECISIONS.contains(&status) {
        return Err(unprocessable("status", "must be one of granted, refused, withdrawn").into());
    }
    let decided = parse_date(text(&map, "decision_on")?)
        .ok_or_else(|| unprocessable("decision_on", "must be a date YYYY-MM-DD"))?;
    if decided > OffsetDateTime::now_utc().date() {
        return Err(unprocessable("decision_on", "must not lie in the future").into());
    }
    let mut conn = reg.store.pool().acquire().await.map_err(internal)?;
    let row: Option<(String, String, String, String)> = sqlx::query_as(
        "SELECT person_id, case_number, applied_on, status FROM reg_asylum_cases WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(internal)?;
    let Some((person_id, case_number, applied_on, current)) = row else {
        return Err(Problem::not_found("no asylum case with this id"));
    };
    if current != "pending" {
        return Err(conflict(&format!("status: the case is already {current}")));
    }
    let applied: Option<Date> = parse_date(&applied_on);
    if applied.is_some_and(|a| decided < a) {
        return Err(unprocessable("decision_on", "must not be before applied_on").into());
    }
    // The status guard makes a concurrent second decision lose instead of overwrite.
    let done = sqlx::query(
        "UPDATE reg_asylum_cases SET status = $1, decision_on = $2 WHERE id = $3 AND status = 'pending'",
    )
    .bind(status)
    .bind(iso(decided))
    .bind(id)
    .execute(&mut *conn)
    .await
    .map_err(internal)?;
    if done.rows_affected() == 0 {
        return Err(conflict("status: the case was decided meanwhile"));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "id": id, "person_id": person_id, "case_number": case_number,
            "applied_on": applied_on, "status": status, "decision_on": iso(decided),
        }),
    ))
}

/// `POST /persons/{id}/personal-number` `{"personal_number"}`: assigns the number once.
pub(crate) async fn assign_personal_number(
    reg: &Registry,
    id: &str,
    body: &[u8],
) -> Result<Response<Body>, Problem> {
    let map = object(body)?;
    only(&map, &["personal_number"])?;
    let number = text(&map, "personal_number")?;
    if number.len() != 11 || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(unprocessable("personal_number", "must be 11 digits").into());
    }
    let mut conn = reg.store.pool().acquire().await.map_err(internal)?;
    let current: Option<(Option<String>,)> =
        sqlx::query_as("SELECT personal_number FROM reg_persons WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(internal)?;
    match current {
        None => return Err(Problem::not_found("no person with this id")),
        Some((Some(_),)) => {
            return Err(conflict("personal_number: the person already has one"));
        }
        Some((None,)) => {}
    }
    let taken: Option<(String,)> =
        sqlx::query_as("SELECT id FROM reg_persons WHERE personal_number = $1")
            .bind(number)
            .fetch_optional(&mut *conn)
            .await
            .map_err(internal)?;
    if taken.is_some() {
        return Err(conflict(
            "personal_number: already assigned to another person",
        ));
    }
    let done = sqlx::query(
        "UPDATE reg_persons SET personal_number = $1 WHERE id = $2 AND personal_number IS NULL",
    )
    .bind(number)
    .bind(id)
    .execute(&mut *conn)
    .await
    .map_err(internal)?;
    if done.rows_affected() == 0 {
        return Err(conflict("personal_number: assigned meanwhile"));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": id, "person_id": id, "personal_number": number}),
    ))
}
