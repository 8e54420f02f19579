#![allow(clippy::unwrap_used)]

use ::http::{Method, Request, StatusCode};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use time::macros::date;
use time::Date;

use super::synth::{self, parse_date, surname_key, to_georgian};
use super::*;

const ANCHOR: Date = date!(2026 - 06 - 15);

async fn sqlite_store(dir: &tempfile::TempDir) -> Store {
    Store::connect(&format!("sqlite://{}/t.db", dir.path().display()))
        .await
        .unwrap()
}

use crate::testing::PgDatabase;

async fn pg_store() -> Option<(Store, PgDatabase)> {
    PgDatabase::store().await
}

async fn call(
    reg: &Registry,
    method: Method,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    call_with(reg, method, uri, body, None).await.0
}

async fn call_with(
    reg: &Registry,
    method: Method,
    uri: &str,
    body: Option<Value>,
    idem: Option<&str>,
) -> ((StatusCode, Value), ::http::HeaderMap) {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(k) = idem {
        b = b.header("Idempotency-Key", k);
    }
    let bytes = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
    let resp = reg.handle(b.body(bytes).unwrap()).await;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap()
    };
    ((status, value), headers)
}

#[test]
fn generation_is_deterministic() {
    let a = synth::person(42, 1, ANCHOR);
    let b = synth::person(42, 1, ANCHOR);
    assert_eq!(a, b);
    assert_eq!(a.id, EXAMPLE_PERSON_ID);
    let c = synth::person(43, 1, ANCHOR);
    assert_ne!(a, c);
}

#[test]
fn transliteration_and_search_key() {
    assert_eq!(to_georgian("Shevchenko"), "შევჩენკო");
    assert_eq!(to_georgian("Tsiklauri"), "ციკლაური");
    assert_eq!(to_georgian("Al-Hassan"), "ალ ჰასსან");
    assert_eq!(to_georgian("Max"), "მაქს");
    let key = surname_key("Öztürk");
    assert_eq!(key, surname_key("OZTURK"));
    assert_eq!(key, surname_key("ozturk"));
    assert_eq!(key, surname_key(&to_georgian("Öztürk")));
    // The Georgian rendering a clerk might choose (თ for t) finds the same person.
    assert_eq!(key, surname_key("ოზთურქ"));
    assert_eq!(surname_key("Иванов"), surname_key("Ivanov"));
    assert_eq!(surname_key("Müller"), surname_key("MULLER"));
    assert_ne!(surname_key("Ivanov"), surname_key("Petrov"));
}

#[test]
fn generated_dates_are_consistent() {
    let n = 2_000u64;
    let mut counts = [0usize; 9];
    let mut doc_numbers = std::collections::HashSet::new();
    for i in 1..=n {
        let p = synth::person(7, i, ANCHOR);
        let d = |s: &str| parse_date(s).unwrap_or_else(|| panic!("{}: bad date {s}", p.id));
        let birth = d(&p.birth_date);
        assert!(birth < ANCHOR);
        assert!(!p.names.surname_ka.is_empty() && !p.names.given_names_ka.is_empty());
        assert_eq!(p.stateless, p.nationalities.is_empty(), "{}", p.id);
        assert!((1..=3).contains(&p.documents.len()), "{}", p.id);
        for doc in &p.documents {
            assert!(d(&doc.issued_on) > birth, "{}: document before birth", p.id);
            assert!(d(&doc.issued_on) < d(&doc.valid_until), "{}", p.id);
            assert!(d(&doc.issued_on) < ANCHOR, "{}", p.id);
            assert!(
                doc_numbers.insert(doc.number.clone()),
                "duplicate {}",
                doc.number
            );
        }
        if p.stateless {
            assert!(p.documents.iter().any(|d| d.kind == "stateless_document"));
        }
        for v in &p.visas {
            let (from, until) = (d(&v.valid_from), d(&v.valid_until));
            assert!(from < until, "{}", p.id);
            assert!(model::is_visa_category(&v.category));
            assert!(
                p.documents
                    .iter()
                    .any(|doc| d(&doc.issued_on) < from && d(&doc.valid_until) >= until),
                "{}: visa outside every document",
                p.id
            );
        }
        for r in &p.residence_permits {
            assert!(d(&r.valid_from) < d(&r.valid_until) && d(&r.valid_from) > birth);
            assert!(model::RESIDENCE_PERMIT_TYPES.contains(&r.permit_type.as_str()));
            let expected = if d(&r.valid_until) < ANCHOR {
                "expired"
            } else {
                "valid"
            };
            assert!(r.status == expected || r.status == "revoked", "{}", p.id);
        }
        for w in &p.work_permits {
            assert!(d(&w.valid_from) < d(&w.valid_until) && d(&w.valid_from) > birth);
        }
        let mut last_at = String::new();
        for (k, c) in p.crossings.iter().enumerate() {
            let expected = if k % 2 == 0 { "entry" } else { "exit" };
            assert_eq!(c.direction, expected, "{}: crossings must alternate", p.id);
            assert!(c.at > last_at, "{}: crossings out of order", p.id);
            last_at = c.at.clone();
            assert!(time::OffsetDateTime::parse(
                &c.at,
                &time::format_description::well_known::Rfc3339
            )
            .is_ok());
            assert!(model::CROSSING_POINTS.contains(&c.point.as_str()));
            let day = d(&c.at[..10]);
            assert!(day < ANCHOR, "{}: crossing in the future", p.id);
            let doc = p
                .documents
                .iter()
                .find(|x| x.number == c.document_number)
                .unwrap();
            assert!(
                d(&doc.issued_on) <= day && day <= d(&doc.valid_until),
                "{}: crossing outside document validity",
                p.id
            );
        }
        for a in &p.asylum_cases {
            let applied = d(&a.applied_on);
            assert!(applied > birth && applied < ANCHOR);
            match (&a.status[..], &a.decision_on) {
                ("pending", None) => {}
                ("granted" | "refused" | "withdrawn", Some(dec)) => {
                    assert!(d(dec) > applied && d(dec) < ANCHOR, "{}", p.id)
                }
                other => panic!("{}: asylum case {other:?}", p.id),
            }
        }
        for b in &p.entry_bans {
            assert!(d(&b.valid_from) < d(&b.valid_until));
            if let Some(c) = p.crossings.last() {
                assert!(
                    d(&b.valid_from) >= d(&c.at[..10]),
                    "{}: ban before last crossing",
                    p.id
                );
                assert_eq!(c.direction, "exit", "{}: banned person still inside", p.id);
            }
        }
        let flags = [
            !p.visas.is_empty(),
            !p.residence_permits.is_empty(),
            !p.work_permits.is_empty(),
            !p.crossings.is_empty(),
            !p.asylum_cases.is_empty(),
            !p.entry_bans.is_empty(),
            p.personal_number.is_some(),
            p.stateless,
            p.nationalities.len() > 1,
        ];
        for (c, f) in counts.iter_mut().zip(flags) {
            *c += usize::from(f);
        }
    }
    let pct = |i: usize| counts[i] as f64 * 100.0 / n as f64;
    eprintln!(
        "visas {:.1}% permits {:.1}% work {:.1}% crossings {:.1}% asylum {:.1}% bans {:.1}% pn {:.1}% stateless {:.1}% dual {:.1}%",
        pct(0), pct(1), pct(2), pct(3), pct(4), pct(5), pct(6), pct(7), pct(8)
    );
    let within =
        |i: usize, lo: f64, hi: f64| assert!((lo..=hi).contains(&pct(i)), "share {i}: {}", pct(i));
    within(0, 50.0, 70.0);
    within(1, 28.0, 42.0);
    within(2, 10.0, 20.0);
    within(3, 82.0, 96.0);
    within(4, 1.5, 5.0);
    within(5, 1.0, 3.5);
    within(6, 33.0, 47.0);
    within(7, 0.3, 2.0);
}

#[tokio::test]
async fn seeds_ten_thousand_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(&dir).await;
    let started = std::time::Instant::now();
    assert_eq!(seed(&store, 10_000, 1).await.unwrap(), 10_000);
    let took = started.elapsed();
    eprintln!("seeded 10,000 persons on SQLite in {took:?}");
    // About 1 s in a debug build; the bound only catches a return to slow bulk inserts.
    assert!(
        took < std::time::Duration::from_secs(15),
        "seeding took {took:?}"
    );
    assert_eq!(count_persons(&store).await.unwrap(), 10_000);
    assert_eq!(
        seed(&store, 10_000, 1).await.unwrap(),
        0,
        "seeding twice inserts nothing"
    );
    assert!(example_document(&store).await.unwrap().is_some());
}

async fn seeded_registry(dir: &tempfile::TempDir) -> (Registry, Store) {
    let store = sqlite_store(dir).await;
    seed(&store, 300, 9).await.unwrap();
    (Registry::new(store.clone()), store)
}

#[tokio::test]
async fn reads_person_records_and_searches() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, store) = seeded_registry(&dir).await;

    let (s, v) = call(&reg, Method::GET, "/healthz", None).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"status": "ok"})));

    let (s, person) = call(
        &reg,
        Method::GET,
        &format!("/persons/{EXAMPLE_PERSON_ID}"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(person["id"], EXAMPLE_PERSON_ID);
    assert!(person["names"]["surname_ka"].is_string());
    assert!(person["documents"]
        .as_array()
        .is_some_and(|d| !d.is_empty()));
    // What the register serves is what was generated.
    let generated =
        serde_json::to_value(synth::person(9, 1, time::OffsetDateTime::now_utc().date())).unwrap();
    assert_eq!(person, generated);

    let (s, docs) = call(
        &reg,
        Method::GET,
        &format!("/persons/{EXAMPLE_PERSON_ID}/documents"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(docs["id"], EXAMPLE_PERSON_ID);
    assert_eq!(docs["documents"], person["documents"]);
    let (s, _) = call(
        &reg,
        Method::GET,
        &format!("/persons/{EXAMPLE_PERSON_ID}/crossings"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);

    let number = example_document(&store).await.unwrap().unwrap();
    let (s, found) = call(
        &reg,
        Method::GET,
        &format!("/persons?document={number}"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(found["results"][0]["id"], EXAMPLE_PERSON_ID);

    let surname = person["names"]["surname"].as_str().unwrap();
    let birth = person["birth_date"].as_str().unwrap();
    for variant in [
        surname.to_uppercase(),
        surname.to_lowercase(),
        person["names"]["surname_ka"].as_str().unwrap().to_owned(),
    ] {
        let q = percent(&variant);
        let (s, found) = call(
            &reg,
            Method::GET,
            &format!("/persons?surname={q}&birth_date={birth}"),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{variant}");
        let ids: Vec<&str> = found["results"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["id"].as_str())
            .collect();
        assert!(ids.contains(&EXAMPLE_PERSON_ID), "{variant} found {ids:?}");
    }

    let (s, found) = call(&reg, Method::GET, "/persons?document=NOSUCHDOC", None).await;
    assert_eq!((s, found), (StatusCode::OK, json!({"results": []})));
    let (s, p) = call(&reg, Method::GET, "/persons?surname=Kaya", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(p["detail"].as_str().unwrap().contains("birth_date"));
    let (s, _) = call(&reg, Method::GET, "/persons", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = call(
        &reg,
        Method::GET,
        "/persons?surname=Kaya&birth_date=1990-13-01",
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = call(&reg, Method::GET, "/persons?name=x", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    let (s, p) = call(&reg, Method::GET, "/persons/RF-9999999", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(p["type"], "urn:karibche:problem:not-found");
    let (s, _) = call(&reg, Method::GET, "/persons/RF-9999999/visas", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(
        &reg,
        Method::GET,
        &format!("/persons/{EXAMPLE_PERSON_ID}/secrets"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(&reg, Method::GET, "/nothing/here", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(
        &reg,
        Method::DELETE,
        &format!("/persons/{EXAMPLE_PERSON_ID}"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    let ((s, _), headers) = call_with(&reg, Method::GET, "/crossings", None, None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers["allow"], "POST");
    let (s, _) = call(&reg, Method::GET, "/persons?document=%+1", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test]
async fn posts_crossings_idempotently_and_visas() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, store) = seeded_registry(&dir).await;
    let number = example_document(&store).await.unwrap().unwrap();
    let body = json!({
        "person_id": EXAMPLE_PERSON_ID, "direction": "entry", "point": "Sarpi",
        "at": "2024-05-01T14:22:00+04:00", "document_number": number,
    });
    let ((s, first), _) = call_with(
        &reg,
        Method::POST,
        "/crossings",
        Some(body.clone()),
        Some("k-1"),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(first["person_id"], EXAMPLE_PERSON_ID);
    assert_eq!(first["at"], "2024-05-01T10:22:00Z");
    let ((s, again), headers) = call_with(
        &reg,
        Method::POST,
        "/crossings",
        Some(body.clone()),
        Some("k-1"),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(again, first, "the same key replays the first answer");
    assert_eq!(headers["idempotent-replayed"], "true");
    let (s, list) = call(
        &reg,
        Method::GET,
        &format!("/persons/{EXAMPLE_PERSON_ID}/crossings"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let stored = list["crossings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["id"] == first["id"])
        .count();
    assert_eq!(stored, 1, "a replay stores nothing new");

    let mut other = body.clone();
    other["point"] = json!("Vale");
    let ((s, _), _) = call_with(&reg, Method::POST, "/crossings", Some(other), Some("k-1")).await;
    assert_eq!(
        s,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a key reused for another request"
    );

    let mut bad = body.clone();
    bad["person_id"] = json!("RF-9999999");
    let (s, p) = call(&reg, Method::POST, "/crossings", Some(bad)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(p["detail"].as_str().unwrap().contains("person_id"));
    for (field, value) in [
        ("direction", json!("sideways")),
        ("point", json!("Moon")),
        ("at", json!("yesterday")),
    ] {
        let mut bad = body.clone();
        bad[field] = value;
        let (s, p) = call(&reg, Method::POST, "/crossings", Some(bad)).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(p["detail"].as_str().unwrap().starts_with(field));
    }
    let resp = reg
        .handle(
            Request::post("/crossings")
                .body(Bytes::from_static(b"{not json"))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    let visa = json!({
        "person_id": EXAMPLE_PERSON_ID, "number": "GE99000001", "category": "C1",
        "issuing_post": "Embassy of Georgia in Ankara", "valid_from": "2026-07-01",
        "valid_until": "2026-09-28", "entries": "double",
    });
    let (s, v) = call(&reg, Method::POST, "/visas", Some(visa.clone())).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(v["person_id"], EXAMPLE_PERSON_ID);
    assert_eq!(v["category"], "C1");
    let (_, visas) = call(
        &reg,
        Method::GET,
        &format!("/persons/{EXAMPLE_PERSON_ID}/visas"),
        None,
    )
    .await;
    assert!(visas["visas"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["number"] == "GE99000001"));
    let (s, _) = call(&reg, Method::POST, "/visas", Some(visa.clone())).await;
    assert_eq!(s, StatusCode::CONFLICT, "visa numbers are unique");
    let mut bad = visa.clone();
    bad["category"] = json!("Z9");
    let (s, p) = call(&reg, Method::POST, "/visas", Some(bad)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(p["detail"].as_str().unwrap().starts_with("category"));
    let mut bad = visa.clone();
    bad["valid_until"] = json!("2026-06-30");
    let (s, p) = call(&reg, Method::POST, "/visas", Some(bad)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(p["detail"].as_str().unwrap().starts_with("valid_until"));
}

#[tokio::test]
async fn seeds_and_reads_on_postgres() {
    let Some((store, _guard)) = pg_store().await else {
        return;
    };
    let t = std::time::Instant::now();
    assert_eq!(seed(&store, 10_000, 5).await.unwrap(), 10_000);
    eprintln!("seeded 10,000 persons on PostgreSQL in {:?}", t.elapsed());
    assert_eq!(count_persons(&store).await.unwrap(), 10_000);
    assert_eq!(seed(&store, 1_000, 5).await.unwrap(), 0);
    let reg = Registry::new(store.clone());
    let number = example_document(&store).await.unwrap().unwrap();
    let (s, found) = call(
        &reg,
        Method::GET,
        &format!("/persons?document={number}"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(found["results"][0]["id"], EXAMPLE_PERSON_ID);
    let (s, person) = call(
        &reg,
        Method::GET,
        &format!("/persons/{EXAMPLE_PERSON_ID}"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let generated =
        serde_json::to_value(synth::person(5, 1, time::OffsetDateTime::now_utc().date())).unwrap();
    assert_eq!(person, generated);
    let ((s, c), _) = call_with(
        &reg,
        Method::POST,
        "/crossings",
        Some(
            json!({"person_id": EXAMPLE_PERSON_ID, "direction": "exit", "point": "Larsi (Kazbegi)",
                    "at": "2025-01-02T03:04:05Z", "document_number": number}),
        ),
        Some("pg-1"),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(c["point"], "Larsi (Kazbegi)");
    store.close().await;
}

