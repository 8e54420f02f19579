#![allow(clippy::unwrap_used)]

use ::http::{Method, Request, StatusCode};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use time::macros::date;
use time::Date;

use super::dates::parse_date;
use super::names::{surname_key, to_georgian};
use super::synth;
use super::*;

const ANCHOR: Date = date!(2026 - 06 - 15);

async fn sqlite_store(dir: &tempfile::TempDir) -> Store {
    Store::connect_registry(&format!("sqlite://{}/t.db", dir.path().display()))
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
fn names_in_every_script_have_search_keys() {
    // The same script finds the same name; where the folding gives Latin, Latin finds it too.
    for name in [
        "الحسيني",
        "王",
        "李小龙",
        "Παπαδόπουλος",
        "Պետրոսյան",
        "כהן",
        "शर्मा",
        "김민준",
        "Nguyễn",
        "ბერიძე",
    ] {
        assert!(!surname_key(name).is_empty(), "{name}");
        assert_eq!(
            surname_key(name),
            surname_key(&name.to_uppercase()),
            "{name}"
        );
    }
    assert_eq!(surname_key("王"), surname_key("Wang"));
    assert_eq!(surname_key("李小龙"), surname_key("Li Xiaolong"));
    assert_eq!(surname_key("Nguyễn"), surname_key("NGUYEN"));
    // Decomposed accents fold like composed ones.
    assert_eq!(surname_key("Nguye\u{302}\u{303}n"), surname_key("Nguyễn"));
    // Arabic presentation forms are the same letters.
    assert_eq!(surname_key("ﻣﺤﻤﺪ"), surname_key("محمد"));
    assert_ne!(surname_key("محمد"), surname_key("أحمد"));
    // A symbol is no name.
    assert!(surname_key("😀 ★").is_empty());
}

#[test]
fn synthetic_names_keep_their_keys() {
    // Every generated name is in the register's own tables, so the keys a seeded register
    // stored before names in every script were folded are still the keys searched for.
    for i in 1..=2_000 {
        let p = synth::person(2013, i, ANCHOR);
        let key = surname_key(&p.names.surname);
        assert!(
            !key.is_empty() && key.chars().all(|c| ('\u{10D0}'..='\u{10FF}').contains(&c)),
            "{}: {key}",
            p.names.surname
        );
    }
}

#[tokio::test]
async fn stale_search_keys_are_refreshed_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(&dir).await;
    seed(&store, 20, 1).await.unwrap();
    // As stored by a version that dropped the letters it did not know.
    sqlx::query("UPDATE reg_persons SET surname = 'Nguyễn', surname_key = 'ნგუნ' WHERE id = $1")
        .bind(EXAMPLE_PERSON_ID)
        .execute(store.pool())
        .await
        .unwrap();
    assert_eq!(refresh_search_keys(&store).await.unwrap(), 1);
    let key: String = sqlx::query_scalar("SELECT surname_key FROM reg_persons WHERE id = $1")
        .bind(EXAMPLE_PERSON_ID)
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(key, surname_key("Nguyen"));
    // Once per database: recorded in karibche_meta.
    sqlx::query("UPDATE reg_persons SET surname_key = 'x' WHERE id = $1")
        .bind(EXAMPLE_PERSON_ID)
        .execute(store.pool())
        .await
        .unwrap();
    assert_eq!(refresh_search_keys(&store).await.unwrap(), 0);
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
    let ((s, _), headers) = call_with(&reg, Method::GET, "/visas", None, None).await;
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

/// A POST as the gateway sends it: with the calling agency and, optionally, a key.
async fn post(
    reg: &Registry,
    uri: &str,
    agency: &str,
    key: Option<&str>,
    body: Value,
) -> (StatusCode, Value, ::http::HeaderMap) {
    let mut b = Request::post(uri).header("x-karibche-agency", agency);
    if let Some(k) = key {
        b = b.header("Idempotency-Key", k);
    }
    let resp = reg
        .handle(b.body(Bytes::from(body.to_string())).unwrap())
        .await;
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap(), headers)
}

async fn get(reg: &Registry, uri: &str) -> (StatusCode, Value) {
    call(reg, Method::GET, uri, None).await
}

/// Asserts a 422 (or other refusal) whose detail starts with `field`.
#[track_caller]
fn refused(got: (StatusCode, Value, ::http::HeaderMap), status: StatusCode, field: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    let detail = got.1["detail"].as_str().unwrap_or_default();
    assert!(detail.starts_with(field), "expected {field}: {detail}");
}

/// Every write, read and search path, validation errors and idempotent retries, on one store.
async fn api_scenario(store: &Store) {
    assert_eq!(seed(store, 300, 9).await.unwrap(), 300);
    let reg = Registry::new(store.clone());
    let today = time::OffsetDateTime::now_utc().date();

    // Persons (PSDA): registered, replayed, refused.
    let person = json!({
        "names": {"surname": "Öztürk", "given_names": "Mehmet Ali"},
        "sex": "M", "birth_date": "1990-03-04",
        "birth_place": {"city": "Trabzon", "country": "TR"},
        "nationalities": ["TR"], "personal_number": "01999999999",
    });
    let (s, p, _) = post(&reg, "/persons", "psda", Some("p-1"), person.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    let pid = p["id"].as_str().unwrap().to_owned();
    assert_eq!(p["names"]["surname_ka"], to_georgian("Öztürk"));
    assert_eq!(p["documents"], json!([]));
    let (s, again, h) = post(&reg, "/persons", "psda", Some("p-1"), person.clone()).await;
    assert_eq!((s, &again), (StatusCode::CREATED, &p), "a retry replays");
    assert_eq!(h["idempotent-replayed"], "true");
    let mut other = person.clone();
    other["sex"] = json!("F");
    refused(
        post(&reg, "/persons", "psda", Some("p-1"), other).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "Idempotency-Key",
    );
    // Another agency's key space is its own: the same key is a new request there.
    let mut second = person.clone();
    second["personal_number"] = json!("01999999998");
    let (s, p2, _) = post(&reg, "/persons", "mia-migration", Some("p-1"), second).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_ne!(p2["id"], p["id"]);
    refused(
        post(&reg, "/persons", "psda", None, person.clone()).await,
        StatusCode::CONFLICT,
        "personal_number",
    );
    for (field, path, value) in [
        ("sex", "sex", json!("Q")),
        ("birth_date", "birth_date", json!("1990-02-30")),
        ("birth_date", "birth_date", json!("2999-01-01")),
        ("birth_place.country", "birth_place.country", json!("XX")),
        ("nationalities", "nationalities", json!(["TR", "ZZ"])),
        ("nationalities", "nationalities", json!(["GE"])),
        ("stateless", "stateless", json!(true)),
        ("personal_number", "personal_number", json!("123")),
        ("names.surname", "names.surname", json!("")),
        ("colour", "colour", json!("blue")),
    ] {
        let mut bad = person.clone();
        match path.split_once('.') {
            Some((outer, inner)) => bad[outer][inner] = value,
            None => bad[path] = value,
        }
        refused(
            post(&reg, "/persons", "psda", None, bad).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            field,
        );
    }

    // Documents (PSDA).
    let doc = json!({
        "person_id": pid, "kind": "passport", "number": "U99000001", "issuing_state": "TR",
        "issued_on": "2020-01-10", "valid_until": "2030-01-09",
    });
    let (s, d, _) = post(&reg, "/documents", "psda", Some("d-1"), doc.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{d}");
    assert_eq!(d["person_id"], pid.as_str());
    refused(
        post(&reg, "/documents", "psda", None, doc.clone()).await,
        StatusCode::CONFLICT,
        "number",
    );
    for (field, key, value) in [
        ("issued_on", "issued_on", json!("1980-01-01")),
        ("valid_until", "valid_until", json!("2019-01-01")),
        ("issuing_state", "kind", json!("travel_document")),
        ("person_id", "person_id", json!("RF-9999999")),
        ("kind", "kind", json!("library_card")),
    ] {
        let mut bad = doc.clone();
        bad[key] = value;
        bad["number"] = json!("U99000002");
        refused(
            post(&reg, "/documents", "psda", None, bad).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            field,
        );
    }

    // Visas (consular department).
    let visa = json!({
        "person_id": pid, "number": "GE99000001", "category": "D1",
        "issuing_post": "Consulate General of Georgia in Trabzon",
        "valid_from": "2025-09-01", "valid_until": "2026-08-31", "entries": "multiple",
    });
    let (s, v, _) = post(&reg, "/visas", "mfa-consular", None, visa.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    refused(
        post(&reg, "/visas", "mfa-consular", None, visa.clone()).await,
        StatusCode::CONFLICT,
        "number",
    );
    let mut bad = visa.clone();
    bad["category"] = json!("Z9");
    refused(
        post(&reg, "/visas", "mfa-consular", None, bad).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "category",
    );

    // Residence and work permits (PSDA).
    let permit = json!({
        "person_id": pid, "number": "RP990000001", "type": "work",
        "valid_from": "2024-01-15", "valid_until": "2099-01-14",
    });
    let (s, r, _) = post(&reg, "/residence-permits", "psda", None, permit.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    assert_eq!(r["status"], "valid");
    assert_eq!(r["type"], "work");
    let mut bad = permit.clone();
    bad["number"] = json!("RP990000002");
    bad["valid_from"] = json!("2019-01-01");
    refused(
        post(&reg, "/residence-permits", "psda", None, bad).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "valid_from",
    );
    let mut bad = permit.clone();
    bad["number"] = json!("RP990000003");
    bad["status"] = json!("expired");
    refused(
        post(&reg, "/residence-permits", "psda", None, bad).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "status",
    );
    let work = json!({
        "person_id": pid, "number": "WP990000001", "position": "chef",
        "employer": {"name": "Adjara Hospitality JSC", "tax_id": "245601884"},
        "valid_from": "2024-02-01", "valid_until": "2025-01-31",
    });
    let (s, w, _) = post(&reg, "/work-permits", "psda", None, work.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{w}");
    let mut bad = work.clone();
    bad["employer"]["tax_id"] = json!("12");
    refused(
        post(&reg, "/work-permits", "psda", None, bad).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "employer.tax_id",
    );

    // Crossings (Border Police): document checks, bans, expulsion.
    let crossing = json!({
        "person_id": pid, "direction": "entry", "point": "Sarpi",
        "at": "2025-02-01T14:22:00+04:00", "document_number": "U99000001",
    });
    let (s, c, _) = post(
        &reg,
        "/crossings",
        "mia-border",
        Some("c-1"),
        crossing.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    assert_eq!(c["at"], "2025-02-01T10:22:00Z");
    let (_, c2, h) = post(
        &reg,
        "/crossings",
        "mia-border",
        Some("c-1"),
        crossing.clone(),
    )
    .await;
    assert_eq!(
        (c2, &h["idempotent-replayed"]),
        (c.clone(), &"true".parse().unwrap())
    );
    for (field, key, value) in [
        ("document_number", "document_number", json!("X1")),
        ("document_number", "at", json!("2019-05-01T10:00:00Z")),
        ("at", "at", json!("2999-01-01T00:00:00Z")),
        ("point", "point", json!("Moon")),
        ("direction", "direction", json!("sideways")),
    ] {
        let mut bad = crossing.clone();
        bad[key] = value;
        refused(
            post(&reg, "/crossings", "mia-border", None, bad).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            field,
        );
    }
    let exit = json!({
        "person_id": pid, "direction": "exit", "point": "Tbilisi International Airport",
        "at": "2025-02-20T08:00:00Z", "document_number": "U99000001",
    });
    assert_eq!(
        post(&reg, "/crossings", "mia-border", None, exit).await.0,
        StatusCode::CREATED
    );

    // Entry bans and asylum cases (Migration Department).
    let ban = json!({
        "person_id": pid, "reason": "overstay", "valid_from": "2025-03-01",
        "valid_until": "2025-08-01", "expulsion": true,
    });
    let (s, b, _) = post(&reg, "/entry-bans", "mia-migration", None, ban.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["expulsion"], true);
    let mut entry = crossing.clone();
    entry["at"] = json!("2025-06-01T10:00:00Z");
    refused(
        post(&reg, "/crossings", "mia-border", None, entry).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "person_id: an entry ban",
    );
    // After the ban: an entry needs a visa issued after the expulsion (the D1 visa above).
    let mut entry = crossing.clone();
    entry["at"] = json!("2025-08-20T10:00:00Z");
    refused(
        post(&reg, "/crossings", "mia-border", None, entry).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "person_id: expelled",
    );
    let mut entry = crossing.clone();
    entry["at"] = json!("2025-09-10T10:00:00Z");
    assert_eq!(
        post(&reg, "/crossings", "mia-border", None, entry).await.0,
        StatusCode::CREATED
    );
    let mut bad = ban.clone();
    bad["valid_until"] = json!("2025-01-01");
    refused(
        post(&reg, "/entry-bans", "mia-migration", None, bad).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "valid_until",
    );
    let case = json!({
        "person_id": pid, "case_number": "AS-2025-990001", "applied_on": "2025-02-05",
        "status": "refused", "decision_on": "2025-02-25",
    });
    let (s, a, _) = post(&reg, "/asylum-cases", "mia-migration", None, case.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    refused(
        post(&reg, "/asylum-cases", "mia-migration", None, case.clone()).await,
        StatusCode::CONFLICT,
        "case_number",
    );
    let mut bad = case.clone();
    bad["case_number"] = json!("AS-2025-990002");
    bad["status"] = json!("pending");
    refused(
        post(&reg, "/asylum-cases", "mia-migration", None, bad).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "decision_on",
    );
    let mut bad = case.clone();
    bad["case_number"] = json!("AS-2025-990003");
    bad["decision_on"] = json!("2025-01-01");
    refused(
        post(&reg, "/asylum-cases", "mia-migration", None, bad).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "decision_on",
    );
    // A pending case is decided once; a decided one is never overwritten.
    let mut pending = case.clone();
    pending["case_number"] = json!("AS-2025-990004");
    pending["status"] = json!("pending");
    pending.as_object_mut().unwrap().remove("decision_on");
    let (s, p_case, _) = post(&reg, "/asylum-cases", "mia-migration", None, pending).await;
    assert_eq!(s, StatusCode::CREATED, "{p_case}");
    let decide = format!("/asylum-cases/{}/decision", p_case["id"].as_str().unwrap());
    let decision = json!({"status": "granted", "decision_on": "2025-03-01"});
    let (s, d) = call(&reg, Method::POST, &decide, Some(decision.clone())).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    assert_eq!(
        (&d["status"], &d["person_id"]),
        (&json!("granted"), &json!(pid))
    );
    let (s, again) = call(&reg, Method::POST, &decide, Some(decision)).await;
    assert_eq!(s, StatusCode::CONFLICT, "{again}");
    let (s, bad) = call(
        &reg,
        Method::POST,
        &decide,
        Some(json!({"status": "maybe", "decision_on": "2025-03-01"})),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    let (s, _) = call(
        &reg,
        Method::POST,
        "/asylum-cases/AS-none/decision",
        Some(json!({"status": "granted", "decision_on": "2025-03-01"})),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // A personal number is assigned once, and never twice the same.
    let (s, np, _) = post(&reg, "/persons", "psda", None, {
        let mut n = person.clone();
        n.as_object_mut().unwrap().remove("personal_number");
        n
    })
    .await;
    assert_eq!(s, StatusCode::CREATED, "{np}");
    let assign = format!("/persons/{}/personal-number", np["id"].as_str().unwrap());
    let (s, taken) = call(
        &reg,
        Method::POST,
        &assign,
        Some(json!({"personal_number": "01999999999"})),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{taken}");
    let (s, ok) = call(
        &reg,
        Method::POST,
        &assign,
        Some(json!({"personal_number": "01999999990"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{ok}");
    let (s, _) = call(
        &reg,
        Method::POST,
        &assign,
        Some(json!({"personal_number": "01999999991"})),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = call(
        &reg,
        Method::POST,
        &assign,
        Some(json!({"personal_number": "12"})),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (_, whole) = get(&reg, &format!("/persons/{}", np["id"].as_str().unwrap())).await;
    assert_eq!(whole["personal_number"], "01999999990");

    let (s, _) = call(&reg, Method::POST, "/persons/x", Some(json!({}))).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    let ((s, _), h) = call_with(&reg, Method::PUT, "/persons", None, None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(h["allow"], "GET, POST");
    let ((s, _), h) = call_with(&reg, Method::GET, "/entry-bans", None, None).await;
    assert_eq!(
        (s, &h["allow"]),
        (StatusCode::METHOD_NOT_ALLOWED, &"POST".parse().unwrap())
    );

    // The whole person, and each kind on its own.
    let (s, whole) = get(&reg, &format!("/persons/{pid}")).await;
    assert_eq!(s, StatusCode::OK);
    for (kind, n) in [
        ("documents", 1),
        ("visas", 1),
        ("residence_permits", 1),
        ("work_permits", 1),
        ("crossings", 3),
        ("asylum_cases", 2),
        ("entry_bans", 1),
    ] {
        assert_eq!(whole[kind].as_array().unwrap().len(), n, "{kind}");
        let (s, one) = get(&reg, &format!("/persons/{pid}/{kind}")).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(one[kind], whole[kind]);
        // Records inside a person do not repeat the person's id.
        assert!(one[kind][0].get("person_id").is_none() || kind == "crossings");
    }

    // Searches: by document, by names in any script, by nationality with pages.
    let ids = |v: &Value| -> Vec<String> {
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (s, found) = get(&reg, "/persons?document=U99000001&issuing_state=TR").await;
    assert_eq!((s, ids(&found)), (StatusCode::OK, vec![pid.clone()]));
    let (_, found) = get(&reg, "/persons?document=U99000001&issuing_state=DE").await;
    assert!(ids(&found).is_empty());
    for (surname, given, hit) in [
        ("OZTURK", "", true),
        ("ozturk", "mehmet", true),
        (
            "%E1%83%9D%E1%83%96%E1%83%97%E1%83%A3%E1%83%A0%E1%83%A5",
            "ALI",
            true,
        ),
        ("%C3%96ZT%C3%9CRK", "Mehmet%20Ali", true),
        ("Öztürk", "Ahmet", false),
    ] {
        let surname = if surname.contains('%') {
            surname.to_owned()
        } else {
            percent(surname)
        };
        let uri = format!("/persons?surname={surname}&given_names={given}&birth_date=1990-03-04");
        let (s, found) = get(&reg, &uri).await;
        assert_eq!(s, StatusCode::OK, "{uri}: {found}");
        assert_eq!(ids(&found).contains(&pid), hit, "{uri}");
    }
    let total: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM reg_person_nationalities WHERE code = 'TR'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    let mut seen: Vec<String> = Vec::new();
    let mut uri = "/persons?nationality=TR&limit=7".to_owned();
    loop {
        let (s, page) = get(&reg, &uri).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        assert!(ids(&page).len() <= 7);
        for p in page["results"].as_array().unwrap() {
            assert!(p["nationalities"]
                .as_array()
                .unwrap()
                .contains(&json!("TR")));
        }
        seen.extend(ids(&page));
        match page["next"].as_str() {
            Some(c) => uri = format!("/persons?nationality=TR&limit=7&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(
        seen.len() as i64,
        total,
        "pages cover every TR national once"
    );
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
    assert!(seen.contains(&pid));
    let (_, young) = get(
        &reg,
        "/persons?nationality=TR&born_from=2000-01-01&limit=200",
    )
    .await;
    for p in young["results"].as_array().unwrap() {
        assert!(p["birth_date"].as_str().unwrap() >= "2000-01-01");
    }

    // Crossings in a time range, page by page.
    let (s, day) = get(&reg, "/crossings?from=2025-02-01&until=2025-02-02").await;
    assert_eq!(s, StatusCode::OK, "{day}");
    assert!(day["results"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["id"] == c["id"]));
    let from = format!("{}", today - time::Duration::days(400));
    let until = format!("{}", today);
    let expected: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM reg_crossings WHERE at >= $1 AND at < $2")
            .bind(format!("{from}T00:00:00Z"))
            .bind(format!("{until}T00:00:00Z"))
            .fetch_one(store.pool())
            .await
            .unwrap();
    let mut got = Vec::new();
    let mut uri = format!("/crossings?from={from}&until={until}&limit=50");
    loop {
        let (s, page) = get(&reg, &uri).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        for c in page["results"].as_array().unwrap() {
            got.push((
                c["at"].as_str().unwrap().to_owned(),
                c["id"].as_str().unwrap().to_owned(),
            ));
        }
        match page["next"].as_str() {
            Some(c) => uri = format!("/crossings?from={from}&until={until}&limit=50&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(got.len() as i64, expected);
    assert!(got.windows(2).all(|w| w[0] < w[1]), "ordered, no repeats");
    let (s, tr) = get(&reg, &format!("/crossings?from={from}&until={until}&nationality=TR&point=Sarpi&direction=entry&limit=200")).await;
    assert_eq!(s, StatusCode::OK);
    for c in tr["results"].as_array().unwrap() {
        assert_eq!(
            (c["point"].as_str(), c["direction"].as_str()),
            (Some("Sarpi"), Some("entry"))
        );
    }

    // Statistics: aggregates only, small cells suppressed.
    let (s, stats) = get(&reg, "/statistics?dataset=crossings&by=nationality,year").await;
    assert_eq!(s, StatusCode::OK, "{stats}");
    let rows = stats["rows"].as_array().unwrap();
    assert!(!rows.is_empty());
    for r in rows {
        let keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["count", "nationality", "year"]);
        assert!(r["count"].as_i64().unwrap() >= MIN_CELL);
        assert!(r["year"].is_i64());
    }
    let (_, all) = get(&reg, "/statistics?dataset=persons").await;
    // The seeded persons plus every person this scenario registered (303),
    // rounded to a multiple of 5 by the cell key.
    let total = all["rows"][0]["count"].as_i64().unwrap();
    assert!(total == 300 || total == 305, "{total}");
    let (_, again) = get(&reg, "/statistics?dataset=persons").await;
    assert_eq!(
        again["rows"][0]["count"], total,
        "the same cell, the same answer"
    );
    for uri in [
        "/statistics?dataset=residence_permits&by=type,status,sex&from=2020&until=2030",
        "/statistics?dataset=entry_bans&by=reason,expulsion",
        "/statistics?dataset=asylum_cases&by=status,nationality&nationality=TR",
        "/statistics?dataset=visas&by=category,month",
        "/statistics?dataset=work_permits&by=year",
        "/statistics?dataset=persons&by=sex,birth_country",
    ] {
        let (s, v) = get(&reg, uri).await;
        assert_eq!(s, StatusCode::OK, "{uri}: {v}");
    }
    for uri in [
        "/statistics?dataset=people",
        "/statistics?dataset=crossings&by=id",
        "/statistics?dataset=crossings&by=year,year",
        "/statistics?dataset=persons&from=2020",
        "/statistics?dataset=visas&from=twenty",
    ] {
        assert_eq!(get(&reg, uri).await.0, StatusCode::BAD_REQUEST, "{uri}");
    }

    // Malformed searches.
    for uri in [
        "/persons?document=U1&surname=X&birth_date=1990-01-01",
        "/persons?nationality=TR&cursor=%%%",
        "/persons?nationality=TR&cursor=!!",
        "/persons?nationality=TR&limit=0",
        "/persons?nationality=Turkey",
        "/persons?document=U1&limit=5",
        "/crossings?from=2025-01-01",
        "/crossings?from=2025-02-01&until=2025-01-01",
        "/crossings?from=2025-01-01&until=2025-02-01&point=Moon",
    ] {
        assert_eq!(get(&reg, uri).await.0, StatusCode::BAD_REQUEST, "{uri}");
    }

    // The OpenAPI document describes every endpoint the router serves.
    let (s, doc) = get(&reg, "/openapi.json").await;
    assert_eq!(s, StatusCode::OK);
    for path in [
        "/persons",
        "/persons/{id}",
        "/persons/{id}/{kind}",
        "/crossings",
        "/visas",
        "/documents",
        "/residence-permits",
        "/work-permits",
        "/asylum-cases",
        "/asylum-cases/{id}/decision",
        "/entry-bans",
        "/persons/{id}/personal-number",
        "/statistics",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} undocumented");
    }
    assert!(doc["paths"]["/persons"]["post"].is_object());
    assert!(doc["paths"]["/crossings"]["get"].is_object());
}

#[tokio::test]
async fn api_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(&dir).await;
    api_scenario(&store).await;
}

#[tokio::test]
async fn api_on_postgres() {
    let Some((store, _guard)) = pg_store().await else {
        return;
    };
    api_scenario(&store).await;
    store.close().await;
}

/// Index names of the register's tables, as the database lists them.
async fn index_names(store: &Store) -> Vec<String> {
    let mut conn = store.pool().acquire().await.unwrap();
    let mut names: Vec<String> = db::secondary_indexes(&mut conn, store.backend())
        .await
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn seeding_restores_every_index_and_lookups_use_them_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(&dir).await;
    let before = index_names(&store).await;
    assert!(before.len() >= 12, "{before:?}");
    seed(&store, 2_000, 3).await.unwrap();
    assert_eq!(index_names(&store).await, before);
    let report = bench(
        &store,
        &BenchOptions {
            lookups: 50,
            concurrency: 2,
            seed: 1,
        },
    )
    .await
    .unwrap();
    for r in &report.results {
        assert_eq!(r.found, r.lookups, "{}", r.name);
    }
    for p in &report.plans {
        assert!(p.uses_index, "{}: {:?}", p.name, p.lines);
    }
}

#[tokio::test]
async fn seeds_and_reads_on_postgres() {
    let Some((store, _guard)) = pg_store().await else {
        return;
    };
    let before = index_names(&store).await;
    let t = std::time::Instant::now();
    assert_eq!(seed(&store, 10_000, 5).await.unwrap(), 10_000);
    eprintln!("seeded 10,000 persons on PostgreSQL in {:?}", t.elapsed());
    assert_eq!(index_names(&store).await, before);
    assert_eq!(count_persons(&store).await.unwrap(), 10_000);
    assert_eq!(seed(&store, 1_000, 5).await.unwrap(), 0);
    let reg = Registry::new(store.clone());
    let number = example_document(&store).await.unwrap().unwrap();
    let (s, found) = get(&reg, &format!("/persons?document={number}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(found["results"][0]["id"], EXAMPLE_PERSON_ID);
    let (s, person) = get(&reg, &format!("/persons/{EXAMPLE_PERSON_ID}")).await;
    assert_eq!(s, StatusCode::OK);
    let generated =
        serde_json::to_value(synth::person(5, 1, time::OffsetDateTime::now_utc().date())).unwrap();
    assert_eq!(person, generated);
    let report = bench(
        &store,
        &BenchOptions {
            lookups: 50,
            concurrency: 2,
            seed: 1,
        },
    )
    .await
    .unwrap();
    for r in &report.results {
        assert_eq!(r.found, r.lookups, "{}", r.name);
    }
    for p in &report.plans {
        assert!(p.uses_index, "{}: {:?}", p.name, p.lines);
    }
    store.close().await;
}
