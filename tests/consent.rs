//! Purpose, consent and minimisation end to end: a real system on ephemeral
//! ports, real mutual TLS and tokens, the consent API, the register behind
//! the gateway, and the audit log and the register checked after.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{leaf_paths, Db, Reply, TestGateway};
use common::{person_path, PERSON};
use http::{Method, StatusCode};
use karibche::audit::{self, Entry, Filter};
use serde_json::{json, Value};

const AGENCY: &str = "molhsa";
const PURPOSE: &str = "social-assistance";

async fn entries(gw: &TestGateway) -> Vec<Entry> {
    audit::query(&gw.running.store, &Filter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.entry)
        .collect()
}

/// The last record of a request: its one record, or for a change the outcome of its attempt.
async fn record_of(gw: &TestGateway, reply: &Reply) -> Entry {
    let id = reply.request_id();
    let all = entries(gw).await;
    let own: Vec<&Entry> = all.iter().filter(|e| e.id == id).collect();
    assert_eq!(own.len(), 1, "one record carries the request id");
    let outcomes: Vec<&Entry> = all
        .iter()
        .filter(|e| e.attempt_id.as_deref() == Some(id.as_str()))
        .collect();
    match own[0].phase.as_deref() {
        Some("attempt") => {
            assert_eq!(outcomes.len(), 1, "an attempt has exactly one outcome");
            outcomes[0].clone()
        }
        _ => {
            assert!(outcomes.is_empty());
            own[0].clone()
        }
    }
}

/// The attempt record of a change (the record the request id names).
async fn attempt_of(gw: &TestGateway, reply: &Reply) -> Entry {
    let id = reply.request_id();
    let e = entries(gw).await.into_iter().find(|e| e.id == id).unwrap();
    assert_eq!(e.phase.as_deref(), Some("attempt"), "{e:?}");
    e
}

async fn read(gw: &TestGateway, id: &str) -> Reply {
    let token = gw.token(AGENCY, PURPOSE, None);
    gw.client(AGENCY).get(&person_path(id), Some(&token)).await
}

async fn post(gw: &TestGateway, agency: &str, purpose: &str, path: &str, body: Value) -> Reply {
    let token = gw.token(agency, purpose, None);
    gw.client(agency)
        .send(Method::POST, path, Some(&token), Some(body))
        .await
        .unwrap()
}

fn problem_type(r: &Reply) -> String {
    assert_eq!(r.content_type(), "application/problem+json");
    r.json()["type"].as_str().unwrap().to_owned()
}

/// Refused without consent, allowed with it (its id in the record), refused after revocation.
async fn consent_lifecycle(gw: TestGateway) {
    let r = read(&gw, PERSON).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    assert!(problem_type(&r).ends_with("consent-required"));
    let detail = r.json()["detail"].as_str().unwrap().to_owned();
    for named in [PERSON, AGENCY, PURPOSE] {
        assert!(detail.contains(named), "{detail}");
    }
    let e = record_of(&gw, &r).await;
    assert_eq!(
        (e.decision.as_str(), e.reason.as_deref()),
        ("deny", Some("consent_missing"))
    );
    assert_eq!(e.subjects, [PERSON]);

    // The ministry records the signed form through the gateway.
    let r = post(
        &gw,
        AGENCY,
        PURPOSE,
        "/v1/consents",
        json!({"subject": PERSON, "evidence_ref": "MOLHSA-FORM-2026-0042", "valid_until": "2099-12-31"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let consent = r.json();
    let consent_id = consent["id"].as_str().unwrap().to_owned();
    assert_eq!(consent["subject"], PERSON);
    assert_eq!(consent["purpose"], PURPOSE);
    // The grant on gateway/consents does not release `agency` or `recorded_by`.
    assert!(consent.get("agency").is_none() && consent.get("recorded_by").is_none());
    let e = record_of(&gw, &r).await;
    assert_eq!(e.consent_ref.as_deref(), Some(consent_id.as_str()));
    assert_eq!(e.subjects, [PERSON]);
    assert_eq!(
        (e.provider.as_deref(), e.service.as_deref()),
        (Some("gateway"), Some("consents"))
    );
    // Logged ahead: the attempt names the consent, what it writes and the body's digest.
    let attempt = attempt_of(&gw, &r).await;
    assert_eq!(attempt.consent_ref.as_deref(), Some(consent_id.as_str()));
    assert_eq!(attempt.agency.as_deref(), Some(AGENCY));
    assert_eq!(attempt.subjects, [PERSON]);
    assert_eq!(attempt.written, ["evidence_ref", "subject", "valid_until"]);
    assert_eq!(attempt.request_digest.as_ref().map(String::len), Some(64));
    assert_eq!(e.status, 201);

    // With the consent: allowed, minimised, and the consent cited in the record.
    let r = read(&gw, PERSON).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let paths = leaf_paths(&r.json());
    for hidden in ["personal_number", "documents", "visas", "crossings"] {
        assert!(
            !paths.iter().any(|p| p.split('.').next() == Some(hidden)),
            "{hidden} leaked: {paths:?}"
        );
    }
    let e = record_of(&gw, &r).await;
    assert_eq!(e.decision, "allow");
    assert_eq!(e.consent_ref.as_deref(), Some(consent_id.as_str()));
    assert!(e
        .legal_basis
        .as_deref()
        .is_some_and(|b| b.contains("consent")));

    // Another person's record is not covered by this person's consent.
    let r = read(&gw, "GEO-000002").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Nor is a search, whoever it finds.
    let token = gw.token(AGENCY, PURPOSE, None);
    let r = gw
        .client(AGENCY)
        .get("/v1/registry/persons?document=P1234567", Some(&token))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(problem_type(&r).ends_with("consent-required"));

    // Revoked: the very next request is refused.
    let revoke = format!("/v1/consents/{consent_id}/revoke");
    let r = post(&gw, AGENCY, PURPOSE, &revoke, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(r.json()["revoked_at"].is_string());
    assert_eq!(
        record_of(&gw, &r).await.consent_ref.as_deref(),
        Some(consent_id.as_str())
    );
    let r = read(&gw, PERSON).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(problem_type(&r).ends_with("consent-required"));
    let r = post(&gw, AGENCY, PURPOSE, &revoke, json!({})).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    // Two changes, each an attempt and its outcome; the refused second revocation changed nothing.
    let changes: Vec<(String, Option<String>, u16)> = entries(&gw)
        .await
        .into_iter()
        .filter(|e| e.service.as_deref() == Some("consents"))
        .map(|e| (e.path, e.phase, e.status))
        .collect();
    let phase = |p: &str| Some(p.to_owned());
    assert_eq!(
        changes,
        [
            ("/v1/consents".to_owned(), phase("attempt"), 0),
            ("/v1/consents".to_owned(), phase("outcome"), 201),
            (revoke.clone(), phase("attempt"), 0),
            (revoke.clone(), phase("outcome"), 200),
            (revoke.clone(), None, 409),
        ]
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_required_read_on_sqlite() {
    consent_lifecycle(TestGateway::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_required_read_on_postgres() {
    let Some(gw) = TestGateway::start_with(Db::Postgres).await else {
        return;
    };
    consent_lifecycle(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_or_misdirected_consent_does_not_help() {
    let gw = TestGateway::start().await;
    // A form signed in 2020, valid through 2020: on record, but expired.
    let r = post(
        &gw,
        AGENCY,
        PURPOSE,
        "/v1/consents",
        json!({"subject": PERSON, "given_at": "2020-01-10", "valid_until": "2020-12-31", "evidence_ref": "F-2020-7"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = read(&gw, PERSON).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(problem_type(&r).ends_with("consent-required"));
    assert!(r.json()["detail"].as_str().unwrap().contains("expired"));

    // A consent limited to another service does not cover the register's persons.
    let r = post(
        &gw,
        AGENCY,
        PURPOSE,
        "/v1/consents",
        json!({"subject": PERSON, "scope": ["registry/visas"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(read(&gw, PERSON).await.status, StatusCode::FORBIDDEN);

    // An agency records only its own consents: `agency` is not a field its grant lets it write.
    let r = post(
        &gw,
        AGENCY,
        PURPOSE,
        "/v1/consents",
        json!({"subject": PERSON, "agency": "psda"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(problem_type(&r).ends_with("field-not-allowed"));
    assert!(r.json()["detail"].as_str().unwrap().contains("\"agency\""));
    // An agency without a grant on gateway/consents records nothing.
    let r = post(
        &gw,
        "psda",
        "identity-documentation",
        "/v1/consents",
        json!({"subject": PERSON}),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(record_of(&gw, &r).await.reason.as_deref(), Some("no_grant"));
    // Nor may it revoke the ministry's.
    let list = karibche::consent::ConsentStore::new(gw.running.store.clone())
        .list(Some(PERSON))
        .await
        .unwrap();
    assert_eq!(list.len(), 2, "only the two accepted consents are stored");
    let r = post(
        &gw,
        "psda",
        "identity-documentation",
        &format!("/v1/consents/{}/revoke", list[0].id),
        json!({}),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // A malformed consent is refused by name.
    let r = post(
        &gw,
        AGENCY,
        PURPOSE,
        "/v1/consents",
        json!({"subject": PERSON, "valid_until": "next year"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.json()["detail"].as_str().unwrap().contains("valid_until"));
    gw.shutdown().await;
}

/// The person with the most visas in the seeded register, and one of their nationalities.
async fn person_with_visas(gw: &TestGateway) -> (String, i64, String) {
    use sqlx::Row;
    let row = sqlx::query(
        "SELECT v.person_id, COUNT(DISTINCT v.id) AS visas, MIN(c.code) FROM reg_visas v \
         JOIN reg_person_nationalities c ON c.person_id = v.person_id \
         GROUP BY v.person_id ORDER BY visas DESC, v.person_id LIMIT 1",
    )
    .fetch_one(gw.registry_store().pool())
    .await
    .unwrap();
    (
        row.get::<String, _>(0),
        row.get::<i64, _>(1),
        row.get::<String, _>(2),
    )
}

/// How many visas the persons of a nationality hold, from the register itself.
async fn visas_of_nationality(gw: &TestGateway, code: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM reg_visas v JOIN reg_person_nationalities n ON n.person_id = v.person_id WHERE n.code = $1",
    )
    .bind(code)
    .fetch_one(gw.registry_store().pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_arrays_keep_every_element_with_only_the_granted_fields() {
    let gw = TestGateway::start().await;
    let (person, visas, nationality) = person_with_visas(&gw).await;
    assert!(visas >= 2, "the seeded register has a person with visas");
    // The statistics office may see each visa's category, nothing else of it,
    // and reads persons only by attribute (pseudonymised).
    let persons = common::geostat_persons(&gw, &nationality).await;
    let mut released = 0;
    for p in &persons {
        for v in p["visas"].as_array().unwrap() {
            let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(keys, BTreeSet::from(["category"]), "{v}");
            released += 1;
        }
    }
    assert_eq!(
        released,
        visas_of_nationality(&gw, &nationality).await,
        "all visas, none dropped"
    );
    // A field list is narrowed to the grant; one naming no granted field is refused.
    let token = gw.token("mfa-consular", "visa-decision", None);
    let path = format!("{}?fields=visas,crossings", person_path(&person));
    let r = gw.client("mfa-consular").get(&path, Some(&token)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json().get("crossings").is_none());
    let path = format!("{}?fields=crossings", person_path(&person));
    let r = gw.client("mfa-consular").get(&path, Some(&token)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(problem_type(&r).ends_with("field-not-allowed"));
    // The Border Police see each visa whole.
    let token = gw.token("mia-border", "border-control", None);
    let r = gw
        .client("mia-border")
        .get(&person_path(&person), Some(&token))
        .await;
    let whole = r.json()["visas"].as_array().unwrap().clone();
    assert_eq!(whole.len() as i64, visas);
    assert!(whole.iter().all(|v| v.get("number").is_some()));
    gw.shutdown().await;
}

/// The statistics office's pseudonyms of everyone of a nationality, sorted.
async fn pseudonyms(gw: &TestGateway, nationality: &str) -> Vec<String> {
    let mut out: Vec<String> = common::geostat_persons(gw, nationality)
        .await
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pseudonyms_are_stable_per_key_and_differ_across_keys() {
    // Each system generates its own pseudonymisation key in its data directory;
    // both seed the same synthetic register.
    let a = TestGateway::start().await;
    let b = TestGateway::start().await;
    let (_, _, nationality) = person_with_visas(&a).await;
    let first = pseudonyms(&a, &nationality).await;
    assert!(first.len() >= 2, "{first:?}");
    assert!(first
        .iter()
        .all(|p| p.starts_with("ps-") && !p.contains("RF-")));
    let distinct: BTreeSet<&String> = first.iter().collect();
    assert_eq!(distinct.len(), first.len(), "one pseudonym per person");
    assert_eq!(
        pseudonyms(&a, &nationality).await,
        first,
        "same persons, same key"
    );
    let other = pseudonyms(&b, &nationality).await;
    assert_eq!(other.len(), first.len());
    assert!(other.iter().all(|p| !first.contains(p)), "another key");
    a.shutdown().await;
    b.shutdown().await;
}

async fn visas_numbered(gw: &TestGateway, number: &str) -> i64 {
    use sqlx::Row;
    sqlx::query("SELECT COUNT(*) FROM reg_visas WHERE number = $1")
        .bind(number)
        .fetch_one(gw.registry_store().pool())
        .await
        .unwrap()
        .get::<i64, _>(0)
}

fn visa(number: &str) -> Value {
    json!({
        "person_id": PERSON, "number": number, "category": "C1",
        "issuing_post": "Embassy of Georgia, Berlin",
        "valid_from": "2026-12-01", "valid_until": "2027-02-28", "entries": "multiple"
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_carry_only_the_granted_fields() {
    let policies = tempfile::tempdir().unwrap();
    common::copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"),
        policies.path(),
    );
    let dir = policies.path().to_owned();
    let gw = TestGateway::start_configured(Db::Sqlite, move |c, _| c.policies_dir = dir)
        .await
        .unwrap();
    let consular = |body| {
        post(
            &gw,
            "mfa-consular",
            "visa-decision",
            "/v1/registry/visas",
            body,
        )
    };

    // A member no grant names: refused by the gateway, by name, nothing forwarded or stored.
    let mut body = visa("GEO-V-0001");
    body["holder_remarks"] = json!("prefers window seats");
    let r = consular(body).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    assert!(problem_type(&r).ends_with("field-not-allowed"));
    assert!(r.json()["detail"]
        .as_str()
        .unwrap()
        .contains("\"holder_remarks\""));
    assert_eq!(
        record_of(&gw, &r).await.reason.as_deref(),
        Some("field_not_allowed")
    );
    assert_eq!(visas_numbered(&gw, "GEO-V-0001").await, 0);

    // The same visa without it is recorded: the body was otherwise valid.
    let r = consular(visa("GEO-V-0001")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(visas_numbered(&gw, "GEO-V-0001").await, 1);

    // Narrow the grant: the consular service may no longer set `entries`. A
    // field the register accepts is now refused at the gateway.
    let file = policies.path().join("agencies/mfa-consular.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let narrowed = text.replace(
        "\"valid_from\", \"valid_until\", \"entries\"]",
        "\"valid_from\", \"valid_until\"]",
    );
    assert_ne!(text, narrowed);
    std::fs::write(&file, narrowed).unwrap();
    gw.running.reload_policy().await.unwrap();
    let r = consular(visa("GEO-V-0002")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    assert!(r.json()["detail"].as_str().unwrap().contains("\"entries\""));
    assert_eq!(visas_numbered(&gw, "GEO-V-0002").await, 0, "nothing stored");
    gw.shutdown().await;
}
