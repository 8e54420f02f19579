//! The audit log end to end over real mutual TLS: response digests, node
//! events, restricted grants, the auditors' API (`/v1/audit/...`) and the
//! exit codes of `karibche audit verify`.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::{person_path, PERSON};
use common::{Db, TestGateway};
use http::StatusCode;
use karibche::audit::{self, Filter};
use karibche::files::sha256_hex;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_bodies_are_digested_and_node_events_recorded() {
    let gw = TestGateway::start().await;
    let token = gw.token("mia-border", "border-control", None);
    let r = gw
        .client("mia-border")
        .get(&person_path(PERSON), Some(&token))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let rec = gw.record(&r.request_id()).await;
    assert_eq!(rec.entry.response_digest, Some(sha256_hex(&r.body)));
    assert!(!rec.entry.restricted);
    // A refusal releases nothing, so it has no digest.
    let r = gw
        .client("mia-border")
        .get(
            &person_path(PERSON),
            Some(&gw.token("mia-border", "asylum-procedure", None)),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(gw.record(&r.request_id()).await.entry.response_digest, None);

    let url = gw.config.database_url();
    let TestGateway {
        running, dir: _tmp, ..
    } = gw;
    running.shutdown().await;
    let store = karibche::store::Store::connect(&url).await.unwrap();
    let records = audit::query(&store, &Filter::default()).await.unwrap();
    let events: Vec<&str> = records
        .iter()
        .filter(|r| r.entry.method == "EVENT")
        .map(|r| r.entry.path.as_str())
        .collect();
    assert_eq!(
        events,
        ["node-start", "node-stop"],
        "start first, stop last"
    );
    assert_eq!(records.first().unwrap().entry.path, "node-start");
    assert_eq!(records.last().unwrap().entry.path, "node-stop");
    assert!(audit::verify(&store, None).await.unwrap().intact());
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reload_is_an_audit_event() {
    let gw = TestGateway::start_configured(Db::Sqlite, |c, _| {
        c.tls.reload_interval = std::time::Duration::from_millis(50);
    })
    .await
    .unwrap();
    let keys = gw.config.data_path(&gw.config.tokens.keys_dir);
    // Rotating psda's signing key: a new key file appears beside the old.
    let before: Vec<_> = std::fs::read_dir(&keys).unwrap().collect();
    assert!(!before.is_empty());
    let psda_pub = karibche::identity::keys::agency_key_files(&keys, "psda");
    let target = psda_pub.first().unwrap().clone();
    let mut text = std::fs::read(&target).unwrap();
    text.extend_from_slice(b"\n");
    std::fs::write(&target, text).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let records = audit::query(&gw.running.store, &Filter::default())
            .await
            .unwrap();
        if let Some(r) = records.iter().find(|r| r.entry.path == "keys-reload") {
            let reason = r.entry.reason.clone().unwrap();
            assert!(reason.contains(&target.display().to_string()), "{reason}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no keys-reload event");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    gw.shutdown().await;
}

async fn auditors_api(db: Db) {
    let Some(gw) = TestGateway::start_with(db).await else {
        return;
    };
    // Some traffic: the Border Police, a State Security investigation (restricted), the Migration Department.
    let border = gw.token("mia-border", "border-control", None);
    let r = gw
        .client("mia-border")
        .get(&person_path(PERSON), Some(&border))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let border_id = r.request_id();
    let ssg = gw.token("ssg", "national-security-investigation", Some("SSG-2026-7"));
    let r = gw.client("ssg").get(&person_path(PERSON), Some(&ssg)).await;
    assert_eq!(r.status, StatusCode::OK);
    let ssg_id = r.request_id();
    assert!(gw.record(&ssg_id).await.entry.restricted);
    let migration = gw.token("mia-migration", "residence-permit-review", None);
    assert_eq!(
        gw.client("mia-migration")
            .get(&person_path(PERSON), Some(&migration))
            .await
            .status,
        StatusCode::OK
    );

    // The supervisory authority sees everything, restricted records included.
    let pdps = gw.token("pdps", "supervision", None);
    let r = gw
        .client("pdps")
        .get(&format!("/v1/audit/records?subject={PERSON}"), Some(&pdps))
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.content_type(), "application/json");
    let list = r.json();
    let list = list.as_array().unwrap();
    let agencies: Vec<&str> = list.iter().map(|v| v["agency"].as_str().unwrap()).collect();
    assert_eq!(agencies, ["mia-border", "ssg", "mia-migration"]);
    assert_eq!(list[1]["restricted"], true);
    assert!(list[0]["hash"].is_string() && list[0]["response_digest"].is_string());
    // The read itself is logged, naming the subject asked about, with its digest.
    let read = gw.record(&r.request_id()).await;
    assert_eq!(read.entry.provider.as_deref(), Some("audit"));
    assert_eq!(read.entry.subjects, [PERSON]);
    assert_eq!(read.entry.response_digest, Some(sha256_hex(&r.body)));
    assert!(read.entry.legal_basis.is_some());

    // JSON lines, with filters.
    let r = gw
        .client("pdps")
        .get(
            "/v1/audit/records?agency=ssg&purpose=national-security-investigation&service=persons&format=jsonl",
            Some(&pdps),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.content_type(), "application/jsonl");
    let lines: Vec<serde_json::Value> = String::from_utf8(r.body.to_vec())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["id"], ssg_id.as_str());

    // The subject's report leaves the restricted access out, and says such accesses may exist.
    let r = gw
        .client("pdps")
        .get(&format!("/v1/audit/report?subject={PERSON}"), Some(&pdps))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let report = r.json();
    let ids: Vec<&str> = report["accesses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["record_id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&border_id.as_str()));
    assert!(!ids.contains(&ssg_id.as_str()));
    assert!(!String::from_utf8_lossy(&r.body).contains("ssg"));
    assert!(report["notice"].as_str().unwrap().contains("restricted"));

    // An agency's security officers: their own agency's records only, minimised by their grant.
    let internal = gw.token("mia-border", "internal-audit", None);
    let r = gw
        .client("mia-border")
        .get("/v1/audit/records", Some(&internal))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let own = r.json();
    let own = own.as_array().unwrap();
    assert!(!own.is_empty());
    assert!(own.iter().all(|v| v["agency"] == "mia-border"));
    assert!(own
        .iter()
        .all(|v| v.get("certificate").is_none() && v.get("token_id").is_none()));
    let r = gw
        .client("mia-border")
        .get("/v1/audit/records?agency=ssg", Some(&internal))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let denied = gw.record(&r.request_id()).await;
    assert_eq!(denied.entry.reason.as_deref(), Some("audit_scope"));
    // Not for casework, not another purpose, not the subject's report.
    let r = gw
        .client("mia-border")
        .get("/v1/audit/records", Some(&border))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = gw
        .client("mia-border")
        .get(
            &format!("/v1/audit/report?subject={PERSON}"),
            Some(&internal),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Malformed queries are refused, and logged.
    let r = gw
        .client("pdps")
        .get("/v1/audit/records?sinse=2026-01-01T00:00:00Z", Some(&pdps))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.content_type(), "application/problem+json");
    let r = gw
        .client("pdps")
        .get("/v1/audit/records?since=yesterday", Some(&pdps))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = gw
        .client("pdps")
        .get("/v1/audit/records/x", Some(&pdps))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        gw.record(&r.request_id()).await.entry.reason.as_deref(),
        Some("unknown_route")
    );
    assert!(audit::verify(&gw.running.store, None)
        .await
        .unwrap()
        .intact());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auditors_api_sqlite() {
    auditors_api(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auditors_api_postgres() {
    auditors_api(Db::Postgres).await;
}

fn karibche(data: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_karibche"))
        .args(["--data-dir", data.to_str().unwrap()])
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_exit_codes_and_archive_from_the_command_line() {
    let gw = TestGateway::start().await;
    let token = gw.token("mia-border", "border-control", None);
    for _ in 0..5 {
        let r = gw
            .client("mia-border")
            .get(&person_path(PERSON), Some(&token))
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let data = gw.config.data_dir.clone();
    let url = gw.config.database_url();
    // Keep the temporary directory past the shutdown.
    let TestGateway {
        running, dir: tmp, ..
    } = gw;
    running.shutdown().await;
    let dir = tmp.path().to_owned();
    let db_url = ["--database-url", url.as_str()];

    let (code, out) = karibche(&data, &[&db_url[..], &["audit", "verify"]].concat());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("chain intact"), "{out}");
    let (code, out) = karibche(
        &data,
        &[&db_url[..], &["audit", "verify", "--from", "3"]].concat(),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("from seq 3"), "{out}");
    let (code, out) = karibche(
        &data,
        &[
            &db_url[..],
            &[
                "audit",
                "query",
                "--format",
                "jsonl",
                "--service",
                "persons",
            ],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with('{')).count(),
        5,
        "{out}"
    );
    let (code, out) = karibche(
        &data,
        &[
            &db_url[..],
            &["audit", "query", "--purpose", "border-control"],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("TIME (UTC)") && out.contains("5 record(s)"),
        "{out}"
    );

    // Archive everything so far; the chain still verifies, and so does the archive.
    let archive = dir.join("archive.jsonl");
    let (code, out) = karibche(
        &data,
        &[
            &db_url[..],
            &[
                "audit",
                "archive",
                "--before",
                "2100-01-01T00:00:00Z",
                "--out",
                archive.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("archived seq 1..="), "{out}");
    let cps = format!("{}.checkpoints", archive.display());
    let (code, out) = karibche(
        &data,
        &[
            "audit",
            "verify",
            "--file",
            archive.to_str().unwrap(),
            "--checkpoints",
            &cps,
        ],
    );
    assert_eq!(code, 0, "{out}");
    let (code, out) = karibche(&data, &[&db_url[..], &["audit", "verify"]].concat());
    assert_eq!(code, 0, "{out}");

    // Tampered: exit 1.
    let store = karibche::store::Store::connect(&url).await.unwrap();
    let line = std::fs::read_to_string(&archive).unwrap();
    std::fs::write(&archive, line.replacen("mia-border", "mia-borderx", 1)).unwrap();
    let (code, out) = karibche(
        &data,
        &["audit", "verify", "--file", archive.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{out}");
    sqlx::raw_sql("UPDATE audit_archives SET hash = 'ff'")
        .execute(store.pool())
        .await
        .unwrap();
    store.close().await;
    let (code, out) = karibche(&data, &[&db_url[..], &["audit", "verify"]].concat());
    assert_eq!(code, 1, "{out}");
    // Could not check: exit 2.
    let (code, out) = karibche(
        &data,
        &[
            "--database-url",
            "postgres://postgres@127.0.0.1:1/none",
            "audit",
            "verify",
        ],
    );
    assert_eq!(code, 2, "{out}");
    let (code, out) = karibche(
        &data,
        &["audit", "verify", "--file", "/nonexistent/export.jsonl"],
    );
    assert_eq!(code, 2, "{out}");
}
