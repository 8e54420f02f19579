//! Crash safety of the audit log: a gateway killed with SIGKILL under load
//! restarts with an intact chain, and every response a client received has
//! its committed record; a gateway killed while a provider holds a write
//! leaves that write's attempt record, shown as "outcome unknown".

#![allow(clippy::unwrap_used, clippy::zombie_processes)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Client;
use http::StatusCode;
use tokio::sync::Mutex;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("var");
    let (mut child, addr) = common::spawn_gateway(&data, None);
    let pki = data.join("pki");
    let (cert, key) = karibche::devpki::agency_files(&pki, "mia-border");
    let client = Arc::new(Client::new(&pki.join("ca.pem"), Some((&cert, &key)), addr));
    let token = common::dev_token(
        &data.join("keys"),
        "mia-border",
        "officer-1",
        "border-control",
    );

    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (client, token, acked) = (client.clone(), token.clone(), acknowledged.clone());
        workers.push(tokio::spawn(async move {
            // Until the gateway dies under us: each worker stops at its first failure.
            while let Ok(reply) = client
                .send(
                    http::Method::GET,
                    "/v1/registry/persons/RF-0000001",
                    Some(&token),
                    None,
                )
                .await
            {
                if reply.status == StatusCode::OK {
                    acked.lock().await.push(reply.request_id());
                }
            }
        }));
    }
    // Kill once a good number of requests went through (or after a bound).
    let deadline = Instant::now() + Duration::from_secs(30);
    while acknowledged.lock().await.len() < 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL: no shutdown path runs.
    child.wait().unwrap();
    for w in workers {
        w.await.unwrap();
    }
    let acknowledged = acknowledged.lock().await.clone();
    assert!(acknowledged.len() >= 100, "load did not get going");

    // Restart on the same files: the chain head is recovered from the database
    // (the restarted node records its start on it). Then stop it, so the
    // check below reads the files alone.
    let (mut child, _addr) = common::spawn_gateway(&data, None);
    child.kill().unwrap();
    child.wait().unwrap();
    let store = karibche::store::Store::connect(&format!(
        "sqlite://{}",
        data.join("karibche.db").display()
    ))
    .await
    .unwrap();
    let report = karibche::audit::verify(&store, None).await.unwrap();
    assert!(report.intact(), "{report}");
    let records = karibche::audit::query(&store, &karibche::audit::Filter::default())
        .await
        .unwrap();
    let ids: std::collections::HashSet<_> = records.iter().map(|r| r.entry.id.as_str()).collect();
    let missing: Vec<_> = acknowledged
        .iter()
        .filter(|id| !ids.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged without a record: {missing:?}"
    );
    store.close().await;
}

/// Runs the real binary's command line on the data directory; returns stdout and the exit code.
fn karibche(data: &Path, policies: &Path, args: &[&str]) -> (String, i32) {
    let out = Command::new(env!("CARGO_BIN_EXE_karibche"))
        .args(["--data-dir", data.to_str().unwrap()])
        .args(["--policies", policies.to_str().unwrap()])
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    (
        String::from_utf8(out.stdout).unwrap(),
        out.status.code().unwrap_or(-1),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_forward_and_outcome_leaves_an_attempt_with_outcome_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("var");
    let pki = data.join("pki");
    // The development PKI first, so the provider can serve with it before the gateway starts.
    common::dev_pki_ahead(&karibche::config::Config {
        data_dir: data.clone(),
        ..Default::default()
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let provider = listener.local_addr().unwrap();
    let mut holding = common::holding_provider(listener, &pki);
    let policies = common::policies_with_write_provider(dir.path(), &format!("https://{provider}"));
    let (mut child, addr) = common::spawn_gateway_with(&data, None, &policies);

    let (cert, key) = karibche::devpki::agency_files(&pki, "mia-border");
    let client = Client::new(&pki.join("ca.pem"), Some((&cert, &key)), addr);
    let token = common::dev_token(
        &data.join("keys"),
        "mia-border",
        "officer-7",
        "border-control",
    );
    let body = serde_json::json!({"person_id": "RF-0000001", "note": "seen at Sarpi"});
    let digest = common::sha256_hex(&serde_json::to_vec(&body).unwrap());
    let write = tokio::spawn(async move {
        client
            .send(
                http::Method::POST,
                "/v1/ministry/notes",
                Some(&token),
                Some(body),
            )
            .await
    });
    // The provider holds the write: the change may have happened, its outcome is not known yet.
    let seen = tokio::time::timeout(Duration::from_secs(30), holding.recv())
        .await
        .expect("the write never reached the provider")
        .unwrap();
    assert!(!seen.is_empty());
    child.kill().unwrap(); // SIGKILL between forward and outcome.
    child.wait().unwrap();
    assert!(
        write.await.unwrap().is_err(),
        "no answer can come from a killed gateway"
    );

    // The attempt is there, with the body's digest, and is shown as outcome unknown.
    let (jsonl, code) = karibche(&data, &policies, &["audit", "query", "--format", "jsonl"]);
    assert_eq!(code, 0);
    let attempts: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["phase"] == "attempt")
        .collect();
    assert_eq!(attempts.len(), 1, "{jsonl}");
    let attempt = &attempts[0];
    assert_eq!(attempt["request_digest"], digest.as_str());
    assert_eq!(attempt["outcome_unknown"], true);
    assert_eq!(attempt["officer"], "officer-7");
    assert_eq!(attempt["written"], serde_json::json!(["note", "person_id"]));
    assert_eq!(attempt["subjects"], serde_json::json!(["RF-0000001"]));
    let (table, code) = karibche(&data, &policies, &["audit", "query"]);
    assert_eq!(code, 0);
    assert!(table.contains("attempt, OUTCOME UNKNOWN"), "{table}");
    // Verify reports it, and does not call it tampering (exit 0: intact).
    let (verify, code) = karibche(&data, &policies, &["audit", "verify"]);
    assert_eq!(code, 0, "{verify}");
    assert!(verify.contains("chain intact"), "{verify}");
    assert!(
        verify.contains("1 attempt(s) with outcome unknown"),
        "{verify}"
    );
    assert!(verify.contains(attempt["id"].as_str().unwrap()), "{verify}");
    // And the person's report says a change was tried whose outcome is unknown.
    let (report, code) = karibche(
        &data,
        &policies,
        &["audit", "report", "--subject", "RF-0000001"],
    );
    assert_eq!(code, 0);
    assert!(report.contains("outcome unknown"), "{report}");
}
