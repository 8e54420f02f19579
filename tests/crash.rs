//! Crash safety of the audit log: a gateway killed with SIGKILL under load
//! restarts with an intact chain, and every response a client received has
//! its committed record.

#![allow(clippy::unwrap_used, clippy::zombie_processes)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Client;
use http::StatusCode;
use tokio::sync::Mutex;

fn spawn_gateway(data: &Path) -> (common::KillOnDrop, SocketAddr) {
    common::spawn_gateway(data, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("var");
    let (mut child, addr) = spawn_gateway(&data);
    let pki = data.join("pki");
    let (cert, key) = karibche::pki::agency_files(&pki, "mia-border");
    let client = Arc::new(Client::new(&pki.join("ca.pem"), Some((&cert, &key)), addr));
    let token = karibche::token::issue(
        &data.join("keys"),
        &karibche::token::IssueRequest {
            agency: "mia-border".into(),
            officer: "officer-1".into(),
            purpose: "border-control".into(),
            case_ref: None,
            ttl: Duration::from_secs(300),
            audience: "karibche".into(),
            backdate: Duration::ZERO,
        },
    )
    .unwrap();

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
    let (mut child, _addr) = spawn_gateway(&data);
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
