//! Several replicas on one database, as real processes: started together on a
//! fresh PostgreSQL database they all come up; a node name (one audit chain)
//! belongs to one live process at a time, on PostgreSQL and SQLite; a killed
//! holder frees its name; and a node that loses its lock writes nothing until
//! it holds the name again.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{admin_get, spawn_serve, Spawned, TestGateway};
use http::StatusCode;
use karibche::store::{lock_key, Store};
use karibche::testing::PgDatabase;
use sqlx::Connection;

/// `pg_locks` rows of the advisory lock of node `node` (held or waited for).
const LOCK_ROWS: &str =
    "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 \
     AND classid::bigint = $1 AND objid::bigint = $2";

fn halves(key: i64) -> (i64, i64) {
    let bits = key as u64;
    ((bits >> 32) as i64, (bits & 0xFFFF_FFFF) as i64)
}

async fn spawn(data: &Path, args: &[&str]) -> Spawned {
    let data = data.to_path_buf();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn_serve(&data, &args)
    })
    .await
    .unwrap()
}

/// Waits until nobody holds or waits for node `node`'s lock on `url`.
async fn until_released(url: &str, node: &str) {
    let (class, obj) = halves(lock_key("node", node));
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = sqlx::query_scalar(LOCK_ROWS)
            .bind(class)
            .bind(obj)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        if n == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "node {node} still locked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_started_together_on_a_fresh_postgres_database_all_serve() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // All three at the same moment: migrations, seeding and chain starts race.
    let starts: Vec<_> = (1..=3)
        .map(|i| {
            let data = dir.path().join(format!("r{i}"));
            let args = [
                "--database-url".to_owned(),
                db.url.clone(),
                "--node".to_owned(),
                format!("replica-{i}"),
            ];
            tokio::spawn(async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                spawn(&data, &args).await
            })
        })
        .collect();
    let mut replicas = Vec::new();
    for s in starts {
        replicas.push(s.await.unwrap().ready());
    }
    for r in &replicas {
        let (status, body) = admin_get(r.admin, "/readyz").await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let store = Store::connect(&db.url).await.unwrap();
    assert_eq!(
        karibche::registry::count_persons(&store).await.unwrap(),
        100
    );
    let nodes: Vec<(String, i64)> =
        sqlx::query_as("SELECT node, COUNT(*) FROM audit_log GROUP BY node ORDER BY node")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(
        nodes,
        (1..=3)
            .map(|i| (format!("replica-{i}"), 1))
            .collect::<Vec<_>>(),
        "each replica recorded its start on its own chain"
    );
    store.close().await;
    for r in replicas {
        r.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_name_is_held_by_one_process_on_postgres() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pg = ["--database-url", db.url.as_str()];
    let with = |node: &'static str| [pg[0], pg[1], "--node", node];
    let first = spawn(&dir.path().join("a"), &with("gw-1")).await.ready();
    match spawn(&dir.path().join("b"), &with("gw-1")).await {
        Spawned::Exited { code, stderr } => {
            assert_eq!(code, Some(1), "{stderr}");
            assert!(
                stderr.contains("node name \"gw-1\" is already held by")
                    && stderr.contains(&format!("pid {}", first.child.id())),
                "the refusal names the node and its holder: {stderr}"
            );
        }
        Spawned::Ready(_) => panic!("a second process took node gw-1"),
    }
    // Another name runs beside it on the same database.
    let other = spawn(&dir.path().join("c"), &with("gw-2")).await.ready();
    for p in [&first, &other] {
        assert_eq!(admin_get(p.admin, "/readyz").await.0, StatusCode::OK);
    }
    // SIGKILL: the server drops the lock with the session.
    first.kill();
    until_released(&db.url, "gw-1").await;
    let second = spawn(&dir.path().join("b"), &with("gw-1")).await.ready();
    assert_eq!(admin_get(second.admin, "/readyz").await.0, StatusCode::OK);
    second.kill();
    other.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_name_is_held_by_one_process_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("var");
    let first = spawn(&data, &["--node", "edge"]).await.ready();
    match spawn(&data, &["--node", "edge"]).await {
        Spawned::Exited { code, stderr } => {
            assert_eq!(code, Some(1), "{stderr}");
            assert!(
                stderr.contains("node name \"edge\" is already held by")
                    && stderr.contains(&format!("pid {}", first.child.id())),
                "the refusal names the node and its holder: {stderr}"
            );
        }
        Spawned::Ready(_) => panic!("a second process took node edge"),
    }
    // SIGKILL: the kernel drops the file lock with the process.
    first.kill();
    let second = spawn(&data, &["--node", "edge"]).await.ready();
    assert_eq!(admin_get(second.admin, "/readyz").await.0, StatusCode::OK);
    second.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_loses_its_lock_writes_nothing_until_it_holds_the_name_again() {
    let Some(gw) = TestGateway::start_with(common::Db::Postgres).await else {
        return;
    };
    let url = gw.config.database_url();
    let node = gw.config.node.clone();
    let (class, obj) = halves(lock_key("node", &node));
    let client = gw.client("mia-border");
    let token = gw.token("mia-border", "border-control", None);
    let read = "/v1/registry/persons/RF-0000001";
    assert_eq!(client.get(read, Some(&token)).await.status, StatusCode::OK);

    // The lock session dies (as in a PostgreSQL restart), and another session takes the
    // name before the node's watchdog can: the node must stop writing its chain.
    let mut other = sqlx::AnyConnection::connect(&url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' \
             AND granted AND objsubid = 1 AND classid::bigint = $1 AND objid::bigint = $2",
        )
        .bind(class)
        .bind(obj)
        .execute(&mut other)
        .await
        .unwrap();
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(lock_key("node", &node))
            .fetch_one(&mut other)
            .await
            .unwrap();
        if taken {
            break;
        }
        assert!(Instant::now() < deadline, "could not take the node's name");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_log")
        .fetch_one(gw.running.store.pool())
        .await
        .unwrap();
    let refused = client.get(read, Some(&token)).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, body) = admin_get(gw.running.started.admin, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let after: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_log")
        .fetch_one(gw.running.store.pool())
        .await
        .unwrap();
    assert_eq!(after, before, "a fenced node wrote to its chain");

    // The other session lets go: the node takes its name again by itself and serves.
    other.close().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if client.get(read, Some(&token)).await.status == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node did not recover its name"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = karibche::audit::verify(&gw.running.store, None)
        .await
        .unwrap();
    assert!(report.intact(), "{report}");
    gw.shutdown().await;
}
