//! `audit backup` on a live gateway: a copy taken while requests are being
//! recorded verifies and holds every record committed before it started —
//! on SQLite through `VACUUM INTO`, on PostgreSQL through `pg_dump`, restored
//! into a database of its own and verified there.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{require_tool, Db, TestGateway};
use http::StatusCode;
use karibche::audit::backup::{backup, BackupOutcome};
use karibche::audit::Filter;
use karibche::store::Store;

const PERSON: &str = karibche::registry::EXAMPLE_PERSON_ID;

/// Replies answered with data (request id, when), and whether the load still runs.
struct Load {
    answered: Arc<Mutex<Vec<(String, Instant)>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<usize>>,
}

/// Eight officers (each within their quota) asking for a person over and over until stopped.
fn start_load(gw: &TestGateway) -> Load {
    let load = Load {
        answered: Arc::default(),
        stop: Arc::default(),
        tasks: Vec::new(),
    };
    let mut tasks = Vec::new();
    for i in 0..8 {
        let client = gw.client("mia-border");
        let token = gw.officer_token("mia-border", &format!("officer-{i}"), "border-control");
        let (answered, stop) = (load.answered.clone(), load.stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            // Bounded: the test stops the load long before this.
            for _ in 0..5_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let reply = client
                    .get(&format!("/v1/registry/persons/{PERSON}"), Some(&token))
                    .await;
                if reply.status == StatusCode::TOO_MANY_REQUESTS {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                assert_eq!(reply.status, StatusCode::OK);
                n += 1;
                answered
                    .lock()
                    .unwrap()
                    .push((reply.request_id(), Instant::now()));
            }
            n
        }));
    }
    Load { tasks, ..load }
}

async fn ids(store: &Store) -> BTreeSet<String> {
    karibche::audit::query(store, &Filter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.entry.id)
        .collect()
}

/// Waits until at least `n` records are committed.
async fn until_records(store: &Store, n: usize) {
    assert!(
        common::eventually(Duration::from_secs(20), async || ids(store).await.len()
            >= n)
        .await,
        "the load did not get going"
    );
}

/// Backs up under load; returns (ids committed before, replies answered before, load's total).
async fn backup_under_load(
    gw: &TestGateway,
    out: &Path,
) -> (BTreeSet<String>, Vec<String>, BackupOutcome) {
    let load = start_load(gw);
    until_records(&gw.running.store, 200).await;
    let committed_before = ids(&gw.running.store).await;
    let started = Instant::now();
    let outcome = backup(&gw.running.store, &gw.config.database_url(), out)
        .await
        .unwrap();
    // The load went on during the backup: records kept being committed.
    until_records(&gw.running.store, committed_before.len() + 50).await;
    load.stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for t in load.tasks {
        total += t.await.unwrap();
    }
    assert!(total > committed_before.len() / 2);
    // Answered before the backup began: its record was committed before, too.
    let answered: Vec<String> = load
        .answered
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, at)| *at < started)
        .map(|(id, _)| id.clone())
        .collect();
    (committed_before, answered, outcome)
}

fn assert_holds(copy: &BTreeSet<String>, committed: &BTreeSet<String>, answered: &[String]) {
    assert!(
        !answered.is_empty(),
        "requests were answered before the backup"
    );
    let missing: Vec<&String> = committed.difference(copy).collect();
    assert!(
        missing.is_empty(),
        "{} of {} records committed before the backup are missing from it",
        missing.len(),
        committed.len()
    );
    for id in answered {
        assert!(
            copy.contains(id),
            "answered request {id} has no record in the backup"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_backup_under_load_verifies_and_holds_every_earlier_record() {
    let gw = TestGateway::start_with(Db::Sqlite).await.unwrap();
    let out = gw.dir.path().join("backup/karibche.db");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let (committed, answered, outcome) = backup_under_load(&gw, &out).await;
    let BackupOutcome::Sqlite { report, bytes, .. } = outcome else {
        panic!("a SQLite log is copied by VACUUM INTO: {outcome:?}")
    };
    assert!(report.intact() && bytes > 0);

    // The copy stands alone (no -wal beside it) and verifies again when opened afresh.
    assert!(!out.with_extension("db-wal").exists());
    let copy = Store::connect(&format!("sqlite://{}", out.display()))
        .await
        .unwrap();
    assert!(karibche::audit::verify(&copy, None).await.unwrap().intact());
    assert_holds(&ids(&copy).await, &committed, &answered);
    copy.close().await;

    // A backup never overwrites.
    let again = backup(&gw.running.store, &gw.config.database_url(), &out).await;
    assert!(
        matches!(again, Err(karibche::audit::backup::BackupError::Exists(_))),
        "{again:?}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_backup_under_load_restores_and_verifies() {
    let Some(gw) = TestGateway::start_with(Db::Postgres).await else {
        return; // no PostgreSQL outside CI (noted by PgDatabase)
    };
    let pg_restore = require_tool("pg_restore", "postgresql-client");
    require_tool("pg_dump", "postgresql-client");
    let out = gw.dir.path().join("karibche.dump");
    let (committed, answered, outcome) = backup_under_load(&gw, &out).await;
    let BackupOutcome::PgDump { command, .. } = outcome else {
        panic!("pg_dump is installed: {outcome:?}")
    };
    assert!(command.starts_with("pg_dump --format=custom"), "{command}");

    // The documented restore: into an empty database, then verify there.
    let target = karibche::testing::PgDatabase::create().await.unwrap();
    let restored = tokio::process::Command::new(pg_restore)
        .args(["--no-owner", "--exit-on-error", "--dbname"])
        .arg(&target.url)
        .arg(&out)
        .output()
        .await
        .unwrap();
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    let copy = Store::connect(&target.url).await.unwrap();
    assert!(karibche::audit::verify(&copy, None).await.unwrap().intact());
    assert_holds(&ids(&copy).await, &committed, &answered);
    copy.close().await;
    gw.shutdown().await;
}
