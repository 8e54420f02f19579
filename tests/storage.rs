//! Storage faults: fail closed, lose nothing, recover by itself (issue 13, §2).
//!
//! The gateway's SQLite database lives on a tiny tmpfs that the test fills
//! up; PostgreSQL has the writer's backend terminated in the middle of its
//! batches. Every 2xx a client saw must have its committed record, no
//! sequence number may be handed out twice (also across a restart), the
//! chain must verify, and the node must turn ready again without a restart
//! once the store accepts writes — with nobody sending it anything.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Db, TestGateway, Tmpfs};
use http::{Method, StatusCode};
use karibche::audit::{self, Filter};
use sqlx::Connection;

const PERSON: &str = karibche::registry::EXAMPLE_PERSON_ID;

/// What clients were told: (request id, status).
type Seen = Arc<Mutex<Vec<(String, StatusCode)>>>;

/// Reads and writes from two agencies until `stop`; every answer goes to `seen`.
fn load(gw: &TestGateway, stop: Arc<AtomicBool>, seen: Seen) -> Vec<tokio::task::JoinHandle<()>> {
    let bodies: Arc<Mutex<VecDeque<Vec<u8>>>> = Arc::new(Mutex::new(VecDeque::new()));
    let mut workers = Vec::new();
    for w in 0..4 {
        let agency = if w % 2 == 0 { "mia-border" } else { "psda" };
        let purpose = if w % 2 == 0 {
            "border-control"
        } else {
            "identity-documentation"
        };
        let tokens: Vec<String> = (0..4)
            .map(|i| gw.officer_token(agency, &format!("officer-{w}-{i}"), purpose))
            .collect();
        let client = gw.client(agency);
        let (stop, seen, bodies) = (stop.clone(), seen.clone(), bodies.clone());
        let writes = w == 0;
        workers.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let token = &tokens[n % tokens.len()];
                let body = if writes && n.is_multiple_of(3) {
                    bodies.lock().unwrap().pop_front()
                } else {
                    None
                };
                let reply = match body {
                    Some(body) => {
                        client
                            .send(
                                Method::POST,
                                "/v1/registry/crossings",
                                Some(token),
                                Some(serde_json::from_slice(&body).unwrap()),
                            )
                            .await
                    }
                    None => {
                        client
                            .send(
                                Method::GET,
                                &format!("/v1/registry/persons/{PERSON}"),
                                Some(token),
                                None,
                            )
                            .await
                    }
                };
                if let Ok(r) = reply {
                    if r.status.is_server_error() {
                        // Fail closed: a refusal carries no record data.
                        let text = String::from_utf8_lossy(&r.body);
                        assert!(!text.contains("names"), "{text}");
                    }
                    seen.lock().unwrap().push((r.request_id(), r.status));
                }
            }
        }));
    }
    // Bodies for the writer: distinct crossings, filled in once the gateway runs.
    let gw_bodies = bodies;
    let registry = gw.registry_store().clone();
    workers.push(tokio::spawn(async move {
        let document = karibche::registry::example_document(&registry)
            .await
            .unwrap()
            .unwrap();
        let now = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap();
        let mut q = gw_bodies.lock().unwrap();
        for i in 1..=3000u64 {
            let at = (now - Duration::from_secs(i))
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            q.push_back(
                serde_json::to_vec(&serde_json::json!({
                    "person_id": PERSON, "direction": "exit", "point": "Sarpi",
                    "at": at, "document_number": document
                }))
                .unwrap(),
            );
        }
    }));
    workers
}

/// Every 2xx a client saw has its committed record; returns each one's (node, seq).
async fn every_success_is_recorded(
    store: &karibche::store::Store,
    seen: &[(String, StatusCode)],
) -> HashMap<String, (String, i64)> {
    let records = audit::query(store, &Filter::default()).await.unwrap();
    let by_id: HashMap<&str, &audit::Record> =
        records.iter().map(|r| (r.entry.id.as_str(), r)).collect();
    let outcome_of: HashMap<&str, &audit::Record> = records
        .iter()
        .filter_map(|r| r.entry.attempt_id.as_deref().map(|a| (a, r)))
        .collect();
    let mut places = HashMap::new();
    for (id, status) in seen.iter().filter(|(_, s)| s.is_success()) {
        let record = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("{status} answered for request {id}, which has no record"));
        let last = outcome_of.get(id.as_str()).unwrap_or(record);
        assert_eq!(last.entry.status, status.as_u16(), "{:?}", last.entry);
        places.insert(id.clone(), (record.node.clone(), record.seq));
    }
    places
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_closed_loses_nothing_and_recovers_by_itself() {
    let Some(fs) = Tmpfs::mount("4m") else {
        return;
    };
    let db = fs.dir.join("karibche.db");
    let gw = TestGateway::start_configured(Db::Sqlite, |c, _| {
        c.database_url = Some(format!("sqlite://{}", db.display()));
    })
    .await
    .unwrap();
    let seen: Seen = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&gw, stop.clone(), seen.clone());
    // Some traffic on a healthy store, then the disk fills up under it.
    let going = common::eventually(Duration::from_secs(20), async || {
        seen.lock().unwrap().len() >= 50
    });
    assert!(going.await, "load did not get going");
    let filler = fs.fill("filler");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let refused = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| *s == StatusCode::SERVICE_UNAVAILABLE)
            .count();
        if refused >= 20 && gw.readyz().await == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert!(Instant::now() < deadline, "a full disk was never noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    gw.wait_for_pipelines().await;
    // Still full: still not ready, still no answer without a record.
    assert_eq!(gw.readyz().await, StatusCode::SERVICE_UNAVAILABLE);

    // Space comes back; nobody sends anything, and the node turns ready by itself.
    std::fs::remove_file(&filler).unwrap();
    gw.wait_ready(StatusCode::OK, Duration::from_secs(10)).await;
    let token = gw.token("mia-border", "border-control", None);
    let r = gw
        .client("mia-border")
        .get(&format!("/v1/registry/persons/{PERSON}"), Some(&token))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    seen.lock().unwrap().push((r.request_id(), r.status));

    let seen = seen.lock().unwrap().clone();
    let places = every_success_is_recorded(&gw.running.store, &seen).await;
    let records = audit::query(&gw.running.store, &Filter::default())
        .await
        .unwrap();
    let recovered = records
        .iter()
        .find(|r| r.entry.path == "audit-recovered")
        .expect("the outage is recorded");
    assert!(recovered
        .entry
        .reason
        .as_deref()
        .is_some_and(|r| r.contains("record(s) refused")));
    eprintln!(
        "{} answers: {} 2xx, {} 503",
        seen.len(),
        places.len(),
        seen.iter()
            .filter(|(_, s)| *s == StatusCode::SERVICE_UNAVAILABLE)
            .count()
    );

    // After a restart every acknowledged record is still where it was: no seq was reused.
    let gw = gw.restart().await;
    for _ in 0..5 {
        let r = gw
            .client("mia-border")
            .get(&format!("/v1/registry/persons/{PERSON}"), Some(&token))
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let again = every_success_is_recorded(&gw.running.store, &seen).await;
    assert_eq!(
        again, places,
        "a record moved or vanished across the restart"
    );
    let report = audit::verify(&gw.running.store, None).await.unwrap();
    assert!(report.intact(), "{report}");
    gw.shutdown().await;
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_postgres_backend_loses_nothing_and_the_node_recovers() {
    let Some(gw) = TestGateway::start_with(Db::Postgres).await else {
        return;
    };
    let db = gw.pg_name().unwrap();
    let mut admin = sqlx::AnyConnection::connect(&karibche::testing::postgres_admin_url())
        .await
        .unwrap();
    let seen: Seen = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&gw, stop.clone(), seen.clone());
    let going = common::eventually(Duration::from_secs(20), async || {
        seen.lock().unwrap().len() >= 30
    });
    assert!(going.await, "load did not get going");
    // Terminate the backend that is inside an audit batch — this test's own database only.
    let mut killed = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while killed < 3 {
        assert!(Instant::now() < deadline, "never caught a batch in flight");
        let n: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid() \
             AND (state LIKE 'idle in transaction%' \
                  OR (state = 'active' AND query LIKE 'INSERT INTO audit_%'))",
        )
        .bind(db.as_str())
        .fetch_all(&mut admin)
        .await
        .unwrap();
        if n.contains(&true) {
            killed += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    gw.wait_for_pipelines().await;
    gw.wait_ready(StatusCode::OK, Duration::from_secs(10)).await;
    let token = gw.token("mia-border", "border-control", None);
    let r = gw
        .client("mia-border")
        .get(&format!("/v1/registry/persons/{PERSON}"), Some(&token))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = seen.lock().unwrap().clone();
    let places = every_success_is_recorded(&gw.running.store, &seen).await;
    eprintln!(
        "{killed} backends killed; {} answers: {} 2xx, {} 503",
        seen.len(),
        places.len(),
        seen.iter()
            .filter(|(_, s)| *s == StatusCode::SERVICE_UNAVAILABLE)
            .count()
    );
    let report = audit::verify(&gw.running.store, None).await.unwrap();
    assert!(report.intact(), "{report}");
    gw.shutdown().await;
}
