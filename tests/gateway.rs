//! The gateway end to end: a real system on ephemeral ports, real mutual TLS,
//! real tokens, the real register behind it, the audit log checked after.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{admin_get, leaf_paths, Client, Db, TestGateway};
use common::{person_path, PERSON};
use http::{Method, StatusCode};
use karibche::audit::{self, Filter};

async fn records_for(gw: &TestGateway, id: &str) -> Vec<audit::Record> {
    common::request_records(&gw.running.store, id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_read_returns_only_granted_fields_and_is_audited() {
    let gw = TestGateway::start().await;
    let token = gw.token("mia-border", "border-control", None);
    let reply = gw
        .client("mia-border")
        .get(&person_path(PERSON), Some(&token))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let body = reply.json();
    assert_eq!(body["id"], PERSON);
    let paths = leaf_paths(&body);
    // Granted: names, documents, visas, entry bans, some residence-permit fields.
    assert!(paths.iter().any(|p| p.starts_with("names.")), "{paths:?}");
    // Not granted to the Border Police: personal number, birth place, crossings, work permits, asylum.
    for hidden in [
        "personal_number",
        "birth_place",
        "crossings",
        "work_permits",
        "asylum_cases",
    ] {
        assert!(
            !paths
                .iter()
                .any(|p| p == hidden || p.starts_with(&format!("{hidden}."))),
            "{hidden} leaked: {paths:?}"
        );
    }
    assert!(!paths.contains("residence_permits.number"));

    let id = reply.request_id();
    let records = records_for(&gw, &id).await;
    assert_eq!(records.len(), 1, "exactly one audit record per request");
    let e = &records[0].entry;
    assert_eq!(e.agency.as_deref(), Some("mia-border"));
    assert_eq!(e.officer.as_deref(), Some("officer-1"));
    assert_eq!(e.purpose.as_deref(), Some("border-control"));
    assert_eq!(e.provider.as_deref(), Some("registry"));
    assert_eq!(e.service.as_deref(), Some("persons"));
    assert_eq!(e.operation.as_deref(), Some("read"));
    assert_eq!(e.decision, "allow");
    assert_eq!(e.status, 200);
    assert_eq!(e.subjects, vec![PERSON.to_owned()]);
    assert!(
        e.fields.iter().any(|f| f.starts_with("names")),
        "{:?}",
        e.fields
    );
    assert!(e.certificate.as_deref().is_some_and(|c| c.len() == 64));
    assert!(e.legal_basis.is_some());
    assert_eq!(e.policy_version, gw.running.started.policy_version);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_office_sees_no_identity() {
    let gw = TestGateway::start().await;
    let token = gw.token("geostat", "official-statistics", None);
    let nationality: String =
        sqlx::query_scalar("SELECT MIN(code) FROM reg_person_nationalities WHERE person_id = $1")
            .bind(PERSON)
            .fetch_one(gw.registry_store().pool())
            .await
            .unwrap();
    let persons = common::geostat_persons(&gw, &nationality).await;
    assert!(!persons.is_empty());
    for body in &persons {
        for p in &leaf_paths(body) {
            assert!(
                !p.starts_with("names") && !p.contains("number"),
                "geostat must not see {p}"
            );
        }
        // The id only as a pseudonym; the birth date only as a year.
        let pseudonym = body["id"].as_str().unwrap();
        assert!(pseudonym.starts_with("ps-") && !pseudonym.contains("RF-"));
        assert_eq!(body["birth_date"].as_str().unwrap().len(), 4);
    }
    // Stable across requests.
    let again = common::geostat_persons(&gw, &nationality).await;
    assert_eq!(again[0]["id"], persons[0]["id"]);
    // Naming a person would link the pseudonym to them: refused, and recorded.
    let reply = gw
        .client("geostat")
        .get(&person_path(PERSON), Some(&token))
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(
        reply.json()["type"],
        "urn:karibche:problem:identifying-lookup"
    );
    let e = records_for(&gw, &reply.request_id())
        .await
        .pop()
        .unwrap()
        .entry;
    assert_eq!(e.reason.as_deref(), Some("identifying_lookup"));
    assert_eq!(e.subjects, vec![PERSON.to_owned()]);
    assert!(e.pseudonymised);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_requires_a_certificate_from_the_agency_ca() {
    let gw = TestGateway::start().await;
    let ca = gw.pki().join("ca.pem");
    let anonymous = Client::new(&ca, None, gw.gateway_addr());
    let err = anonymous
        .send(Method::GET, &person_path(PERSON), None, None)
        .await
        .expect_err("no client certificate must fail");
    assert!(
        err.contains("handshake") || err.contains("http") || err.contains("request"),
        "{err}"
    );

    // A certificate for the same agency name from another CA.
    let other = tempfile::tempdir().unwrap();
    karibche::devpki::ensure_dev_pki(other.path(), &["mia-border"]).unwrap();
    let (cert, key) = karibche::devpki::agency_files(other.path(), "mia-border");
    let forged = Client::new(&ca, Some((&cert, &key)), gw.gateway_addr());
    let token = gw.token("mia-border", "border-control", None);
    let err = forged
        .send(Method::GET, &person_path(PERSON), Some(&token), None)
        .await
        .expect_err("certificate from a foreign CA must fail");
    assert!(!err.is_empty());
    // The client may see the alert before the server task counts the failure.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while gw.running.gateway.metrics.handshake_failures("gateway") < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "handshake failures not counted"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Neither attempt reached policy, so neither left an audit record.
    assert_eq!(audit::count_requests(&gw.running.store).await.unwrap(), 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_bound_to_the_connections_agency_and_time() {
    let gw = TestGateway::start().await;
    let client = gw.client("mia-border");
    let path = person_path(PERSON);

    let foreign = gw.token("psda", "identity-documentation", None);
    let r = client.get(&path, Some(&foreign)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.content_type(), "application/problem+json");
    assert!(r.headers.contains_key("www-authenticate"));
    let p = r.json();
    for key in ["type", "title", "status", "detail", "request_id"] {
        assert!(p.get(key).is_some(), "problem lacks {key}: {p}");
    }
    assert_eq!(p["request_id"], r.request_id());

    let expired = gw.token_with(
        "mia-border",
        "border-control",
        None,
        Duration::from_secs(60),
        Duration::from_secs(600),
    );
    let r2 = client.get(&path, Some(&expired)).await;
    assert_eq!(r2.status, StatusCode::UNAUTHORIZED);
    assert!(r2.json()["detail"].as_str().unwrap().contains("expired"));

    let r3 = client.get(&path, None).await;
    assert_eq!(r3.status, StatusCode::UNAUTHORIZED);

    let mut got = Vec::new();
    for id in [r.request_id(), r2.request_id(), r3.request_id()] {
        got.push(
            records_for(&gw, &id)
                .await
                .pop()
                .unwrap()
                .entry
                .reason
                .unwrap(),
        );
    }
    assert_eq!(
        got,
        ["token_wrong_agency", "token_expired", "token_missing"]
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_grant_is_forbidden_and_the_denial_is_logged() {
    let gw = TestGateway::start().await;
    // The consular department has no grant to record border crossings.
    let token = gw.token("mfa-consular", "visa-decision", None);
    let crossing = serde_json::json!({
        "person_id": PERSON, "direction": "entry", "point": "Sarpi",
        "at": "2026-11-01T10:00:00Z", "document_number": "X1"
    });
    let r = gw
        .client("mfa-consular")
        .send(
            Method::POST,
            "/v1/registry/crossings",
            Some(&token),
            Some(crossing),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.content_type(), "application/problem+json");
    let records = records_for(&gw, &r.request_id()).await;
    assert_eq!(records.len(), 1);
    let e = &records[0].entry;
    assert_eq!(e.decision, "deny");
    assert_eq!(e.reason.as_deref(), Some("no_grant"));
    assert_eq!(e.status, 403);

    // The State Security Service must name a case.
    let ssg = gw.token("ssg", "national-security-investigation", None);
    let r = gw.client("ssg").get(&person_path(PERSON), Some(&ssg)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let with_case = gw.token(
        "ssg",
        "national-security-investigation",
        Some("SSG-2026-17"),
    );
    let r = gw
        .client("ssg")
        .get(&person_path(PERSON), Some(&with_case))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let e = records_for(&gw, &r.request_id()).await.pop().unwrap().entry;
    assert_eq!(e.case_ref.as_deref(), Some("SSG-2026-17"));

    // Unknown provider: 404 problem, still one record.
    let r = gw
        .client("mia-border")
        .get(
            "/v1/nowhere/persons/1",
            Some(&gw.token("mia-border", "border-control", None)),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(records_for(&gw, &r.request_id()).await.len(), 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn border_police_records_a_crossing_through_the_gateway() {
    let gw = TestGateway::start().await;
    let token = gw.token("mia-border", "border-control", None);
    // The register checks that the document shown is the person's and valid that day.
    let document = karibche::registry::example_document(gw.registry_store())
        .await
        .unwrap()
        .unwrap();
    let an_hour_ago = time::OffsetDateTime::now_utc() - Duration::from_secs(3600);
    let crossing = serde_json::json!({
        "person_id": PERSON, "direction": "exit", "point": "Sarpi",
        "at": an_hour_ago.format(&time::format_description::well_known::Rfc3339).unwrap(),
        "document_number": document
    });
    let r = gw
        .client("mia-border")
        .send(
            Method::POST,
            "/v1/registry/crossings",
            Some(&token),
            Some(crossing),
        )
        .await
        .unwrap();
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.json()["person_id"], PERSON);
    // Logged ahead: the attempt (the request id) before forwarding, then its outcome.
    let records = records_for(&gw, &r.request_id()).await;
    assert_eq!(records.len(), 2);
    let (attempt, e) = (&records[0].entry, &records[1].entry);
    assert_eq!(attempt.phase.as_deref(), Some("attempt"));
    assert_eq!(attempt.status, 0);
    assert_eq!(
        attempt.written,
        ["at", "direction", "document_number", "person_id", "point"]
    );
    assert_eq!(attempt.request_digest, e.request_digest);
    assert_eq!(e.phase.as_deref(), Some("outcome"));
    assert_eq!(e.attempt_id.as_deref(), Some(attempt.id.as_str()));
    assert_eq!(e.status, 201);
    assert_eq!(e.operation.as_deref(), Some("write"));
    assert_eq!(e.subjects, vec![PERSON.to_owned()]);

    // A provider's validation error comes back as problem+json naming the field.
    let bad = serde_json::json!({
        "person_id": "RF-9999999", "direction": "entry", "point": "Sarpi",
        "at": "2026-11-01T10:00:00Z", "document_number": "X1"
    });
    let r = gw
        .client("mia-border")
        .send(
            Method::POST,
            "/v1/registry/crossings",
            Some(&token),
            Some(bad),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.content_type(), "application/problem+json");
    assert!(r.json()["detail"].as_str().unwrap().contains("person_id"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_accepts_only_the_gateway() {
    let gw = TestGateway::start().await;
    let registry = gw.running.started.registry.unwrap();
    let (cert, key) = karibche::devpki::agency_files(&gw.pki(), "mia-border");
    let direct = Client::new(&gw.pki().join("ca.pem"), Some((&cert, &key)), registry);
    let r = direct.get(&format!("/persons/{PERSON}"), None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(!String::from_utf8_lossy(&r.body).contains("names"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_audit_log_means_503_and_no_data() {
    // A SQLite trigger blocks the log; tests/storage.rs kills PostgreSQL's backends instead.
    let gw = TestGateway::start_with(Db::Sqlite).await.unwrap();
    let store = gw.running.store.clone();
    sqlx::raw_sql(
        "CREATE TRIGGER audit_block BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'blocked'); END;",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let token = gw.token("mia-border", "border-control", None);
    let client = gw.client("mia-border");
    let r = client.get(&person_path(PERSON), Some(&token)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.content_type(), "application/problem+json");
    let text = String::from_utf8_lossy(&r.body);
    assert!(!text.contains(PERSON) && !text.contains("names"), "{text}");
    assert_eq!(audit::count_requests(&store).await.unwrap(), 0);
    // Health says so too: a node that cannot log is taken out of rotation.
    let (status, body) = admin_get(gw.running.started.admin, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("\"audit_log\":false"), "{body}");

    sqlx::raw_sql("DROP TRIGGER audit_block;")
        .execute(store.pool())
        .await
        .unwrap();
    let r = client.get(&person_path(PERSON), Some(&token)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(audit::verify(&store, None).await.unwrap().intact());
    assert_eq!(
        admin_get(gw.running.started.admin, "/readyz").await.0,
        StatusCode::OK
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_has_exactly_one_record_and_the_chain_holds() {
    let gw = TestGateway::start().await;
    let border = gw.token("mia-border", "border-control", None);
    let psda = gw.token("psda", "identity-documentation", None);
    let mut ids = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..30 {
        let client = gw.client(if i % 2 == 0 { "mia-border" } else { "psda" });
        let token = if i % 2 == 0 {
            border.clone()
        } else {
            psda.clone()
        };
        let path = match i % 3 {
            0 => person_path(PERSON),
            1 => format!("{}/visas", person_path(PERSON)),
            _ => "/v1/registry/persons/RF-does-not-exist".to_owned(),
        };
        tasks.push(tokio::spawn(async move {
            client.get(&path, Some(&token)).await
        }));
    }
    for t in tasks {
        ids.push(t.await.unwrap().request_id());
    }
    let records: Vec<_> = audit::query(&gw.running.store, &Filter::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.entry.method != "EVENT")
        .collect();
    assert_eq!(records.len(), ids.len());
    for id in &ids {
        assert_eq!(records.iter().filter(|r| &r.entry.id == id).count(), 1);
    }
    let report = audit::verify(&gw.running.store, None).await.unwrap();
    assert!(report.intact(), "{report}");

    // The export carries the fields DESIGN.md promises.
    let mut out = Vec::new();
    audit::export(&gw.running.store, &Filter::default(), &mut out)
        .await
        .unwrap();
    let first: serde_json::Value =
        serde_json::from_slice(out.split(|b| *b == b'\n').next().unwrap()).unwrap();
    for key in [
        "seq",
        "id",
        "ts",
        "node",
        "agency",
        "officer",
        "purpose",
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
        "policy_version",
        "prev_hash",
        "hash",
    ] {
        assert!(first.get(key).is_some(), "export lacks {key}");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reports_health_readiness_and_metrics() {
    let gw = TestGateway::start().await;
    let token = gw.token("mia-border", "border-control", None);
    gw.client("mia-border")
        .get(&person_path(PERSON), Some(&token))
        .await;
    let admin = gw.running.started.admin;
    let get = |path: &'static str| admin_get(admin, path);
    assert_eq!(get("/healthz").await.0, StatusCode::OK);
    let (status, ready) = get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    let (_, metrics) = get("/metrics").await;
    assert!(
        metrics.contains("karibche_requests_total{agency=\"mia-border\",provider=\"registry\",service=\"persons\",class=\"2xx\"} 1"),
        "{metrics}"
    );
    assert!(
        // The request's record and the node-start event.
        metrics.contains("karibche_audit_records_total 2"),
        "{metrics}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_path_works_on_postgresql() {
    let Some(gw) = TestGateway::start_with(Db::Postgres).await else {
        return;
    };
    let token = gw.token("psda", "identity-documentation", None);
    let r = gw
        .client("psda")
        .get(&person_path(PERSON), Some(&token))
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let r2 = gw
        .client("geostat")
        .get(&person_path(PERSON), Some(&token))
        .await;
    assert_eq!(r2.status, StatusCode::UNAUTHORIZED);
    assert_eq!(audit::count_requests(&gw.running.store).await.unwrap(), 2);
    assert!(audit::verify(&gw.running.store, None)
        .await
        .unwrap()
        .intact());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_on_an_asylum_case_is_logged_against_the_person() {
    let gw = TestGateway::start().await;
    let token = gw.token("mia-migration", "asylum-procedure", None);
    let client = gw.client("mia-migration");
    let case = serde_json::json!({
        "person_id": PERSON, "case_number": "AS-2026-000777", "applied_on": "2026-01-10",
    });
    let r = client
        .send(
            Method::POST,
            "/v1/registry/asylum-cases",
            Some(&token),
            Some(case),
        )
        .await
        .unwrap();
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let case_id = r.json()["id"].as_str().unwrap().to_owned();
    let decision = serde_json::json!({"status": "granted", "decision_on": "2026-02-01"});
    let path = format!("/v1/registry/asylum-cases/{case_id}/decision");
    let r = client
        .send(Method::POST, &path, Some(&token), Some(decision.clone()))
        .await
        .unwrap();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let e = records_for(&gw, &r.request_id()).await.pop().unwrap().entry;
    assert_eq!(
        e.subjects,
        vec![PERSON.to_owned()],
        "the person, not the case id"
    );
    let again = client
        .send(Method::POST, &path, Some(&token), Some(decision))
        .await
        .unwrap();
    assert_eq!(again.status, StatusCode::CONFLICT);
    gw.shutdown().await;
}
