//! Pseudonyms and statistics that hold (issue 14, §1), attacked from outside
//! as the statistics office (geostat) over real mutual TLS.
//!
//! geostat receives persons only under pseudonyms and counts only as
//! aggregates. Each test tries one route by which it could link a pseudonym
//! to a register id, a name or a document number, or recover a suppressed
//! count, and shows the route closed. The register's own tables serve as the
//! oracle: they tell the test the truth the attacker is after.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use common::PERSON;
use common::{Reply, TestGateway};
use http::StatusCode;
use karibche::audit::{self, Filter};
use serde_json::Value;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The nationality held by most persons, and their register ids.
async fn biggest_nationality(gw: &TestGateway) -> (String, Vec<String>) {
    let code: String = sqlx::query_scalar(
        "SELECT code FROM reg_person_nationalities GROUP BY code ORDER BY COUNT(*) DESC, code LIMIT 1",
    )
    .fetch_one(gw.registry_store().pool())
    .await
    .unwrap();
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT person_id FROM reg_person_nationalities WHERE code = $1 ORDER BY person_id",
    )
    .bind(&code)
    .fetch_all(gw.registry_store().pool())
    .await
    .unwrap();
    (code, ids)
}

fn geostat(gw: &TestGateway) -> (common::Client, String) {
    (
        gw.client("geostat"),
        gw.token("geostat", "official-statistics", None),
    )
}

fn problem_type(r: &Reply) -> String {
    r.json()["type"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_are_opaque_authenticated_and_bound_to_their_agency() {
    let gw = TestGateway::start().await;
    let (code, ids) = biggest_nationality(&gw).await;
    assert!(ids.len() >= 4, "{code}: {ids:?}");
    let (client, token) = geostat(&gw);
    let search = format!("/v1/registry/persons?nationality={code}&limit=2");
    let first = client.get(&search, Some(&token)).await;
    assert_eq!(first.status, StatusCode::OK);
    let next = first.json()["next"].as_str().unwrap().to_owned();

    // The old attack: the cursor was the last register id of the page in base64.
    let decoded = B64.decode(&next).unwrap_or_default();
    let decoded = String::from_utf8_lossy(&decoded);
    for id in &ids {
        assert!(!decoded.contains(id.as_str()), "{id} in the cursor");
        assert!(!next.contains(&B64.encode(id)), "{id} in the cursor");
        assert!(!next.contains(id.as_str()));
    }
    assert!(!decoded.contains("RF-"));

    // The cursor works for whom it was issued: the next page, other persons.
    let page = |r: &Reply| -> BTreeSet<String> {
        r.json()["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let second = client
        .get(&format!("{search}&cursor={next}"), Some(&token))
        .await;
    assert_eq!(second.status, StatusCode::OK);
    assert!(page(&first).is_disjoint(&page(&second)));

    let refused = |r: &Reply, what: &str| {
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}");
        assert_eq!(
            problem_type(r),
            "urn:karibche:problem:invalid-cursor",
            "{what}"
        );
        assert!(!String::from_utf8_lossy(&r.body).contains("RF-"), "{what}");
    };
    // Tampered: any one character changed.
    for at in [0, next.len() / 2, next.len() - 1] {
        let mut forged: Vec<char> = next.chars().collect();
        forged[at] = if forged[at] == 'A' { 'B' } else { 'A' };
        let forged: String = forged.into_iter().collect();
        let r = client
            .get(&format!("{search}&cursor={forged}"), Some(&token))
            .await;
        refused(&r, "tampered");
        assert_eq!(
            gw.record_of(&r).await.entry.reason.as_deref(),
            Some("cursor_invalid")
        );
    }
    // Made up in the old format: a position of the attacker's choosing.
    let made_up = B64.encode(&ids[ids.len() / 2]);
    let r = client
        .get(&format!("{search}&cursor={made_up}"), Some(&token))
        .await;
    refused(&r, "made up");

    // Another agency's cursor, either way round, and a cursor of another service.
    let (other, other_token) = (
        gw.client("mia-migration"),
        gw.token("mia-migration", "residence-permit-review", None),
    );
    let theirs = other.get(&search, Some(&other_token)).await;
    assert_eq!(theirs.status, StatusCode::OK);
    let their_next = theirs.json()["next"].as_str().unwrap().to_owned();
    // Sealed for a non-pseudonymised agency too: no provider ever hands out its position.
    assert!(!String::from_utf8_lossy(&B64.decode(&their_next).unwrap()).contains("RF-"));
    let r = client
        .get(&format!("{search}&cursor={their_next}"), Some(&token))
        .await;
    refused(&r, "mia-migration's cursor used by geostat");
    let r = other
        .get(&format!("{search}&cursor={next}"), Some(&other_token))
        .await;
    refused(&r, "geostat's cursor used by mia-migration");
    let crossings = other
        .get(
            "/v1/registry/crossings?from=2000-01-01T00:00:00Z&until=2100-01-01T00:00:00Z&limit=1",
            Some(&other_token),
        )
        .await;
    assert_eq!(crossings.status, StatusCode::OK);
    let crossing_next = crossings.json()["next"].as_str().unwrap().to_owned();
    let r = other
        .get(
            &format!("{search}&cursor={crossing_next}"),
            Some(&other_token),
        )
        .await;
    refused(&r, "a crossings cursor on persons");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_lookup_names_a_person_to_the_statistics_office() {
    let gw = TestGateway::start().await;
    let store = gw.registry_store();
    let document = karibche::registry::example_document(store)
        .await
        .unwrap()
        .unwrap();
    let whole = gw
        .client("mia-migration")
        .get(
            &format!("/v1/registry/persons/{PERSON}"),
            Some(&gw.token("mia-migration", "asylum-procedure", None)),
        )
        .await
        .json();
    let surname = whole["names"]["surname"].as_str().unwrap().to_owned();
    let given = whole["names"]["given_names"].as_str().unwrap().to_owned();
    let birth = whole["birth_date"].as_str().unwrap().to_owned();
    let code = whole["nationalities"][0]
        .as_str()
        .unwrap_or("GE")
        .to_owned();
    let enc = |s: &str| -> String { s.bytes().map(|b| format!("%{b:02X}")).collect() };
    let (client, token) = geostat(&gw);
    let attempts = [
        format!("/v1/registry/persons/{PERSON}"),
        format!("/v1/registry/persons/{PERSON}/visas"),
        format!("/v1/registry/persons?document={}", enc(&document)),
        format!(
            "/v1/registry/persons?surname={}&birth_date={birth}",
            enc(&surname)
        ),
        format!(
            "/v1/registry/persons?surname={}&given_names={}&birth_date={birth}",
            enc(&surname),
            enc(&given)
        ),
        // A birth date to the day, where the grant releases the year only.
        format!("/v1/registry/persons?nationality={code}&born_from={birth}&born_until={birth}"),
        // The parameter's name percent-encoded, as the provider would decode it.
        format!("/v1/registry/persons?docu%6Dent={}", enc(&document)),
        format!(
            "/v1/registry/persons?nationality={code}&document={}",
            enc(&document)
        ),
    ];
    for path in &attempts {
        let r = client.get(path, Some(&token)).await;
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {text}");
        assert_eq!(
            problem_type(&r),
            "urn:karibche:problem:identifying-lookup",
            "{path}"
        );
        assert!(!text.contains("ps-"), "{path}: a pseudonym in {text}");
        assert!(
            text.contains("nationality"),
            "the detail says what is allowed: {text}"
        );
        let e = gw.record_of(&r).await.entry;
        assert_eq!(e.reason.as_deref(), Some("identifying_lookup"), "{path}");
        assert!(e.pseudonymised, "{path}");
        assert!(
            e.response_digest.is_none() && e.upstream_status.is_none(),
            "{path}: the provider was not asked"
        );
    }
    // What the grant is for still works: persons by attribute, pseudonymised.
    let persons = common::geostat_persons(&gw, &code).await;
    assert!(!persons.is_empty());
    assert!(persons
        .iter()
        .all(|p| p["id"].as_str().unwrap().starts_with("ps-")));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statistics_offices_own_audit_view_links_no_pseudonym() {
    let gw = TestGateway::start().await;
    let (code, ids) = biggest_nationality(&gw).await;
    let released = common::geostat_persons(&gw, &code).await;
    assert_eq!(released.len(), ids.len());
    let (client, token) = geostat(&gw);
    // An officer also tries to look someone up by id (refused): someone of another nationality.
    let stranger: String = sqlx::query_scalar(
        "SELECT id FROM reg_persons WHERE id NOT IN (SELECT person_id FROM reg_person_nationalities WHERE code = $1) ORDER BY id LIMIT 1",
    )
    .bind(&code)
    .fetch_one(gw.registry_store().pool())
    .await
    .unwrap();
    let r = client
        .get(&format!("/v1/registry/persons/{stranger}"), Some(&token))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // The log itself names the real subjects of the pseudonymised reads…
    let logged: BTreeSet<String> = audit::query(
        &gw.running.store,
        &Filter {
            agency: Some("geostat".into()),
            ..Filter::default()
        },
    )
    .await
    .unwrap()
    .into_iter()
    .flat_map(|r| r.entry.subjects)
    .collect();
    assert!(ids.iter().all(|id| logged.contains(id)));

    // …but the office's own internal audit never shows them.
    let internal = gw.token("geostat", "internal-audit", None);
    let view = client.get("/v1/audit/records", Some(&internal)).await;
    assert_eq!(view.status, StatusCode::OK);
    let text = String::from_utf8_lossy(&view.body).into_owned();
    for id in &ids {
        assert!(!text.contains(id.as_str()), "{id} in geostat's audit view");
    }
    let records = view.json();
    let searches: Vec<&Value> = records
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["service"] == "persons")
        .collect();
    assert!(searches.len() >= 2);
    for r in &searches {
        assert!(r.get("subjects").is_none(), "{r}");
        assert_eq!(r["withheld"], serde_json::json!(["subjects"]), "{r}");
    }
    // The officer's refused attempt stays visible to internal audit as typed: no pseudonym beside it.
    assert!(searches
        .iter()
        .any(|r| r["path"].as_str().unwrap().ends_with(&stranger)
            && r["reason"] == "identifying_lookup"));
    // A subject filter does not tell which of its reads named a person.
    for id in ids.iter().take(3) {
        let r = client
            .get(&format!("/v1/audit/records?subject={id}"), Some(&internal))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json(), serde_json::json!([]), "{id}");
    }

    // The supervisory authority still sees who was read, for the subjects' complaints.
    let pdps = gw.token("pdps", "supervision", None);
    let r = gw
        .client("pdps")
        .get(
            &format!("/v1/audit/records?subject={}&agency=geostat", ids[0]),
            Some(&pdps),
        )
        .await;
    let seen = r.json();
    assert!(!seen.as_array().unwrap().is_empty());
    assert!(seen[0]["subjects"]
        .as_array()
        .unwrap()
        .contains(&Value::from(ids[0].as_str())));
    let report = gw
        .client("pdps")
        .get(&format!("/v1/audit/report?subject={}", ids[0]), Some(&pdps))
        .await
        .json();
    assert!(report["accesses"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["agency"] == "geostat" && a["what"] == "record"));
    gw.shutdown().await;
}

/// Published counts of a statistics query, keyed by the values of `by` in order.
async fn published(gw: &TestGateway, query: &str, by: &[&str]) -> BTreeMap<Vec<String>, i64> {
    let (client, token) = geostat(gw);
    let r = client
        .get(&format!("/v1/registry/statistics?{query}"), Some(&token))
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{query}: {}",
        String::from_utf8_lossy(&r.body)
    );
    let mut out = BTreeMap::new();
    for row in r.json()["rows"].as_array().unwrap() {
        let key = by
            .iter()
            .map(|d| match &row[*d] {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        let count = row["count"].as_i64().unwrap();
        assert_eq!(count % 5, 0, "{query}: {row} is not rounded to 5");
        assert!(count >= 5, "{query}: {row}");
        out.insert(key, count);
    }
    out
}

/// True counts from the register's own tables: text dimensions, then the count.
async fn truth(gw: &TestGateway, sql: &'static str, dims: usize) -> BTreeMap<Vec<String>, i64> {
    use sqlx::Row;
    let rows = sqlx::query(sql)
        .fetch_all(gw.registry_store().pool())
        .await
        .unwrap();
    rows.iter()
        .map(|row| {
            let key = (0..dims).map(|i| row.get::<String, _>(i)).collect();
            (key, row.get::<i64, _>(dims))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differencing_recovers_no_suppressed_count_on_sqlite() {
    differencing_recovers_no_suppressed_count(common::Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differencing_recovers_no_suppressed_count_on_postgresql() {
    differencing_recovers_no_suppressed_count(common::Db::Postgres).await;
}

async fn differencing_recovers_no_suppressed_count(db: common::Db) {
    // Many queries in a row: the attacker is patient, the test need not be rate limited.
    let Some(gw) = TestGateway::start_configured(db, |c, dir| {
        c.policies_dir = common::copy_policies(dir);
        std::fs::write(c.policies_dir.join("limits.toml"), "").unwrap();
    })
    .await
    else {
        return;
    };
    // (dataset, coarse dimension, finer dimension, the truth of the fine table)
    let attacks: [(&str, &str, &str, &'static str); 6] = [
        ("residence_permits", "nationality", "type",
         "SELECT COALESCE(n.code, ''), r.permit_type, COUNT(*) FROM reg_residence_permits r LEFT JOIN reg_person_nationalities n ON n.person_id = r.person_id GROUP BY 1, 2"),
        ("residence_permits", "nationality", "status",
         "SELECT COALESCE(n.code, ''), r.status, COUNT(*) FROM reg_residence_permits r LEFT JOIN reg_person_nationalities n ON n.person_id = r.person_id GROUP BY 1, 2"),
        ("visas", "nationality", "category",
         "SELECT COALESCE(n.code, ''), r.category, COUNT(*) FROM reg_visas r LEFT JOIN reg_person_nationalities n ON n.person_id = r.person_id GROUP BY 1, 2"),
        ("crossings", "point", "year",
         "SELECT r.point, substr(r.at, 1, 4), COUNT(*) FROM reg_crossings r GROUP BY 1, 2"),
        ("entry_bans", "reason", "expulsion",
         "SELECT r.reason, CASE WHEN r.expulsion <> 0 THEN 'true' ELSE 'false' END, COUNT(*) FROM reg_entry_bans r GROUP BY 1, 2"),
        ("persons", "birth_country", "sex",
         "SELECT r.birth_country, r.sex, COUNT(*) FROM reg_persons r GROUP BY 1, 2"),
    ];
    let (mut old_recovered, mut targets) = (0, 0);
    for (dataset, coarse, fine, sql) in attacks {
        let fine_truth = truth(&gw, sql, 2).await;
        let coarse_pub = published(&gw, &format!("dataset={dataset}&by={coarse}"), &[coarse]).await;
        let fine_pub = published(
            &gw,
            &format!("dataset={dataset}&by={coarse},{fine}"),
            &[coarse, fine],
        )
        .await;
        let mut coarse_truth: BTreeMap<String, i64> = BTreeMap::new();
        for (k, n) in &fine_truth {
            *coarse_truth.entry(k[0].clone()).or_default() += n;
        }
        for (c, total) in &coarse_truth {
            // Plain suppression (the old method): the coarse cell minus its shown parts is exact.
            let hidden_old: i64 = fine_truth
                .iter()
                .filter(|(k, n)| &k[0] == c && **n < 5)
                .map(|(_, n)| n)
                .sum();
            if *total >= 5 && (1..5).contains(&hidden_old) {
                old_recovered += 1;
            }
            // Now: what the attacker derives from what is published.
            let Some(shown) = coarse_pub.get(std::slice::from_ref(c)) else {
                continue;
            };
            let parts: i64 = fine_pub
                .iter()
                .filter(|(k, _)| &k[0] == c)
                .map(|(_, n)| n)
                .sum();
            let derived = shown - parts;
            let hidden: Vec<i64> = fine_truth
                .iter()
                .filter(|(k, _)| &k[0] == c && !fine_pub.contains_key(*k))
                .map(|(_, n)| *n)
                .collect();
            let hidden_sum: i64 = hidden.iter().sum();
            if (1..5).contains(&hidden_sum) {
                targets += 1;
                assert_ne!(derived, hidden_sum, "{dataset} {coarse}={c}: recovered");
            }
            for n in hidden.iter().filter(|n| (1..5).contains(*n)) {
                assert_ne!(
                    derived, *n,
                    "{dataset} {coarse}={c}: a small cell recovered"
                );
            }
        }
    }
    assert!(
        old_recovered >= 4,
        "plain suppression would have given away {old_recovered} cells: the attack must be real"
    );
    assert!(targets >= 4, "{targets} targets");

    // Year ranges: a range minus the range one year shorter is that year.
    let years = truth(
        &gw,
        "SELECT substr(r.at, 1, 4), COUNT(*) FROM reg_crossings r GROUP BY 1",
        1,
    )
    .await;
    let by_point_year = truth(
        &gw,
        "SELECT r.point, substr(r.at, 1, 4), COUNT(*) FROM reg_crossings r GROUP BY 1, 2",
        2,
    )
    .await;
    let last: i32 = years.keys().last().unwrap()[0].parse().unwrap();
    let mut year_targets = 0;
    for (y, _) in years.iter().take(12) {
        let y: i32 = y[0].parse().unwrap();
        let range = |from: i32| format!("dataset=crossings&by=point&from={from}&until={last}");
        let longer = published(&gw, &range(y), &["point"]).await;
        let shorter = published(&gw, &range(y + 1), &["point"]).await;
        for (point, n) in &longer {
            let derived = n - shorter.get(point).copied().unwrap_or(0);
            let true_count = by_point_year
                .get(&vec![point[0].clone(), y.to_string()])
                .copied()
                .unwrap_or(0);
            if (1..5).contains(&true_count) {
                year_targets += 1;
                assert_ne!(
                    derived, true_count,
                    "crossings at {} in {y}: recovered",
                    point[0]
                );
            }
        }
    }
    assert!(year_targets >= 1, "the year-range attack had targets");

    // Consistent: the same cell asked again, or through a filter, gives the same count.
    let by_nationality = published(&gw, "dataset=visas&by=nationality", &["nationality"]).await;
    assert_eq!(
        by_nationality,
        published(&gw, "dataset=visas&by=nationality", &["nationality"]).await
    );
    for (code, n) in by_nationality
        .iter()
        .filter(|(k, _)| !k[0].is_empty())
        .take(5)
    {
        let filtered = published(&gw, &format!("dataset=visas&nationality={}", code[0]), &[]).await;
        assert_eq!(filtered.get(&Vec::new()), Some(n), "{code:?}");
    }
    gw.shutdown().await;
}
