//! The register of foreigners through the gateway: each agency writes its own
//! kind of record, retries are idempotent, searches page through the
//! minimiser, statistics release no person — over real mutual TLS, on SQLite
//! and PostgreSQL.

#![allow(clippy::unwrap_used)]

mod common;

use common::{Db, TestGateway};
use http::{Method, StatusCode};
use karibche::audit;
use serde_json::{json, Value};

/// The request's last record: its one record, or a write's outcome.
async fn audit_entry(gw: &TestGateway, request_id: &str) -> audit::Entry {
    common::request_records(&gw.running.store, request_id)
        .await
        .pop()
        .unwrap()
        .entry
}

/// A POST by `agency` under `purpose`, with an idempotency key.
async fn write(
    gw: &TestGateway,
    agency: &str,
    purpose: &str,
    service: &str,
    key: &str,
    body: Value,
) -> common::Reply {
    let token = gw.token(agency, purpose, None);
    gw.client(agency)
        .send_with(
            Method::POST,
            &format!("/v1/registry/{service}"),
            Some(&token),
            Some(body),
            &[("idempotency-key", key)],
        )
        .await
        .unwrap()
}

/// PSDA registers a person and a passport, the Border Police records a crossing with it,
/// the Migration Department finds it among a day's crossings, Geostat counts it.
async fn agencies_write_and_read_their_own_records(gw: &TestGateway) {
    let person = json!({
        "names": {"surname": "Grigoryan", "given_names": "Anahit"},
        "sex": "F", "birth_date": "1988-07-14",
        "birth_place": {"city": "Gyumri", "country": "AM"},
        "nationalities": ["AM"],
    });
    let r = write(
        gw,
        "psda",
        "identity-documentation",
        "persons",
        "k-1",
        person.clone(),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let created = r.json();
    let pid = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["names"]["surname_ka"], "გრიგორიან");
    let e = audit_entry(gw, &r.request_id()).await;
    assert_eq!(e.operation.as_deref(), Some("write"));
    assert_eq!(e.subjects, vec![pid.clone()]);

    // A retry (lost answer) gets the same person back, and is audited again.
    let again = write(
        gw,
        "psda",
        "identity-documentation",
        "persons",
        "k-1",
        person,
    )
    .await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.json()["id"], pid.as_str());
    // (The gateway releases its own headers only; the register's Idempotent-Replayed stays behind.)
    assert_ne!(again.request_id(), r.request_id());

    let passport = json!({
        "person_id": pid, "kind": "passport", "number": "AR7700123", "issuing_state": "AM",
        "issued_on": "2021-03-01", "valid_until": "2031-02-28",
    });
    let r = write(
        gw,
        "psda",
        "identity-documentation",
        "documents",
        "k-2",
        passport,
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );

    // The register's refusal reaches the caller as problem+json naming the field.
    let bad = json!({
        "person_id": pid, "number": "RP1", "type": "work",
        "valid_from": "2018-01-01", "valid_until": "2019-01-01",
    });
    let r = write(
        gw,
        "psda",
        "residence-permit-review",
        "residence-permits",
        "k-3",
        bad,
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.content_type(), "application/problem+json");
    // The register's problem type and the field it names; never its free text.
    assert!(r.json()["detail"]
        .as_str()
        .unwrap()
        .contains("the provider refused the value of valid_from"));

    let crossing = json!({
        "person_id": pid, "direction": "entry", "point": "Sadakhlo",
        "at": "2025-04-02T06:30:00Z", "document_number": "AR7700123",
    });
    let r = write(
        gw,
        "mia-border",
        "border-control",
        "crossings",
        "k-4",
        crossing,
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let crossing_id = r.json()["id"].as_str().unwrap().to_owned();

    // Only the Migration Department records asylum cases.
    let case =
        json!({"person_id": pid, "case_number": "AS-2025-000777", "applied_on": "2025-04-10"});
    let r = write(
        gw,
        "mia-border",
        "border-control",
        "asylum-cases",
        "k-5",
        case.clone(),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = write(
        gw,
        "mia-migration",
        "asylum-procedure",
        "asylum-cases",
        "k-5",
        case,
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.json()["status"], "pending");

    // A day's crossings, one per page: the cursor survives minimisation.
    let token = gw.token("mia-migration", "expulsion-procedure", None);
    let mut path = "/v1/registry/crossings?from=2025-04-02&until=2025-04-03&limit=1".to_owned();
    let mut seen = Vec::new();
    loop {
        let r = gw.client("mia-migration").get(&path, Some(&token)).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        let page = r.json();
        for c in page["results"].as_array().unwrap() {
            seen.push(c["id"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(next) => {
                path = format!(
                    "/v1/registry/crossings?from=2025-04-02&until=2025-04-03&limit=1&cursor={next}"
                )
            }
            None => break,
        }
        assert!(seen.len() < 1000, "pagination does not end");
    }
    assert!(seen.contains(&crossing_id));

    // Geostat: counts only, and no data subject in the audit record.
    let token = gw.token("geostat", "official-statistics", None);
    let r = gw
        .client("geostat")
        .get(
            "/v1/registry/statistics?dataset=persons&by=nationality",
            Some(&token),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let rows = r.json()["rows"].as_array().unwrap().clone();
    assert!(rows.iter().any(|row| row["nationality"] == "AM"));
    for row in &rows {
        assert!(row["count"].as_i64().unwrap() >= karibche::registry::MIN_CELL);
        assert!(row.get("id").is_none() && row.get("person_id").is_none());
    }
    assert!(audit_entry(gw, &r.request_id()).await.subjects.is_empty());
    // …and it cannot register persons.
    let r = write(
        gw,
        "geostat",
        "official-statistics",
        "persons",
        "k-6",
        json!({}),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agencies_write_and_read_through_the_gateway_on_sqlite() {
    let gw = TestGateway::start().await;
    agencies_write_and_read_their_own_records(&gw).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agencies_write_and_read_through_the_gateway_on_postgresql() {
    let Some(gw) = TestGateway::start_with(Db::Postgres).await else {
        return;
    };
    agencies_write_and_read_their_own_records(&gw).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_by_name_releases_only_granted_fields() {
    let gw = TestGateway::start().await;
    let token = gw.token("molhsa", "work-permit-review", None);
    let person = karibche::registry::EXAMPLE_PERSON_ID;
    let whole = gw
        .client("mia-migration")
        .get(
            &format!("/v1/registry/persons/{person}"),
            Some(&gw.token("mia-migration", "asylum-procedure", None)),
        )
        .await
        .json();
    let surname = whole["names"]["surname_ka"].as_str().unwrap();
    let encoded: String = surname.bytes().map(|b| format!("%{b:02X}")).collect();
    let birth = whole["birth_date"].as_str().unwrap();
    let r = gw
        .client("molhsa")
        .get(
            &format!("/v1/registry/persons?surname={encoded}&birth_date={birth}"),
            Some(&token),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let results = r.json()["results"].as_array().unwrap().clone();
    assert!(!results.is_empty());
    for p in &results {
        assert!(p.get("id").is_none() && p.get("documents").is_none(), "{p}");
        assert!(p["names"].is_object());
    }
    // The subject is logged even though its id was not released.
    let e = audit_entry(&gw, &r.request_id()).await;
    assert!(e.subjects.contains(&person.to_owned()));
    gw.shutdown().await;
}
