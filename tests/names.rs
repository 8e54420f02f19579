//! A register of foreigners keeps and finds names in every script: the
//! Public Service Development Agency registers persons whose surnames are in
//! Arabic, Chinese, Cyrillic, Georgian and accented Latin script, and another
//! agency finds each by surname and birth date, typed in the same script (and
//! in Latin where that is what the folding gives) — through the gateway.

#![allow(clippy::unwrap_used)]

mod common;

use common::{Db, TestGateway};
use http::{Method, StatusCode};
use serde_json::json;

/// `(surname, given names, birth date, Latin spellings that find it too)`.
const PERSONS: [(&str, &str, &str, &[&str]); 6] = [
    ("الحسيني", "محمد", "1979-02-11", &[]),
    ("王", "小龙", "1983-05-02", &["Wang", "WANG"]),
    ("Шевченко", "Тарас", "1990-03-09", &["Shevchenko"]),
    ("ბერიძე", "ნინო", "1986-12-24", &["Beridze"]),
    ("Nguyễn", "Thị Lan", "1995-08-30", &["Nguyen", "NGUYEN"]),
    ("Müller", "Jürgen", "1970-01-17", &["Muller", "MÜLLER"]),
];

fn encode(v: &str) -> String {
    v.bytes().map(|b| format!("%{b:02X}")).collect()
}

async fn names_in_every_script(db: Db) {
    let Some(gw) = TestGateway::start_with(db).await else {
        return;
    };
    let psda = gw.client("psda");
    let write = gw.token("psda", "identity-documentation", None);
    let mut ids = Vec::new();
    for (i, (surname, given, birth, _)) in PERSONS.iter().enumerate() {
        let r = psda
            .send_with(
                Method::POST,
                "/v1/registry/persons",
                Some(&write),
                Some(json!({
                    "names": {"surname": surname, "given_names": given},
                    "sex": "M", "birth_date": birth,
                    "birth_place": {"city": "Tbilisi", "country": "GE"},
                    "nationalities": ["TR"],
                })),
                &[("idempotency-key", &format!("names-{i}"))],
            )
            .await
            .unwrap();
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "{surname}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let created = r.json();
        assert_eq!(created["names"]["surname"], *surname, "stored as written");
        ids.push(created["id"].as_str().unwrap().to_owned());
    }

    let molhsa = gw.client("molhsa");
    let search = gw.token("molhsa", "work-permit-review", None);
    for (id, (surname, given, birth, latin)) in ids.iter().zip(PERSONS) {
        for typed in std::iter::once(surname).chain(latin.iter().copied()) {
            let r = molhsa
                .get(
                    &format!(
                        "/v1/registry/persons?surname={}&birth_date={birth}",
                        encode(typed)
                    ),
                    Some(&search),
                )
                .await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "{typed}: {}",
                String::from_utf8_lossy(&r.body)
            );
            let results = r.json()["results"].as_array().unwrap().clone();
            assert!(
                results
                    .iter()
                    .any(|p| p["names"]["surname"] == surname && p["names"]["given_names"] == given),
                "searching {typed:?} did not find {surname}: {results:?}"
            );
            // The audit record names the person found.
            let rid = r.request_id();
            let record = karibche::audit::query(&gw.running.store, &Default::default())
                .await
                .unwrap()
                .into_iter()
                .find(|x| x.entry.id == rid)
                .unwrap();
            assert!(record.entry.subjects.contains(id), "{typed}");
        }
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_in_every_script_are_stored_and_found_on_sqlite() {
    names_in_every_script(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_in_every_script_are_stored_and_found_on_postgresql() {
    names_in_every_script(Db::Postgres).await;
}
