//! Several replicas as an operator runs them: PostgreSQL (a throw-away
//! database on the shared server), a Redis of the test's own (so it can be
//! stopped), the register as its own process, three gateway replicas sharing
//! quotas in that Redis, and HAProxy in TCP mode with health checks on
//! `/readyz`. Load for officers with a known quota goes through HAProxy on
//! several connections: every 2xx has its record, every chain verifies, and
//! the quota holds across all replicas together, after one replica is
//! SIGKILLed, and — at the documented local split — after Redis is stopped,
//! with no request waiting longer than the bounded wait.
//!
//! Also here: replicas on one database report each other's policy versions
//! and warn while they differ.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    admin_get, copy_policies, dev_token, eventually, person_path, policies_with_registry_at,
    require_tool, shared_data, spawn_registry, spawn_serve_with, Client, Db, KillOnDrop,
    ServeProcess, TestGateway, PERSON,
};
use http::{Method, StatusCode};
use karibche::config::Config;
use karibche::testing::{PgDatabase, RedisServer};

/// The officers' quota in this test: 30 at once, one more an hour, so what a
/// run admits is the burst, whichever replicas serve it.
const LIMITS: &str = "[defaults]\nagency = { rate = \"1000/s\", burst = 2000 }\nofficer = { rate = \"1/h\", burst = 30 }\n";
const BURST: usize = 30;
const REPLICAS: usize = 3;
/// Requests per phase: twice the quota, on several connections.
const REQUESTS: usize = 60;
const CONNECTIONS: usize = 4;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// HAProxy in TCP mode (the client certificate must reach the gateway), round
/// robin, each replica checked on its admin port's `/readyz`.
fn haproxy_config(front: u16, replicas: &[&ServeProcess]) -> String {
    let mut cfg = format!(
        "global\n    maxconn 512\n\
         defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 10s\n    timeout server 10s\n    retries 3\n    option redispatch\n\
         frontend gateway\n    bind 127.0.0.1:{front}\n    default_backend replicas\n\
         backend replicas\n    balance roundrobin\n    option httpchk\n\
         \x20   http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost\n\
         \x20   http-check expect status 200\n\
         \x20   default-server inter 200ms fastinter 100ms downinter 200ms fall 2 rise 1\n"
    );
    for (i, r) in replicas.iter().enumerate() {
        cfg.push_str(&format!(
            "    server r{} {} check port {}\n",
            i + 1,
            r.gateway,
            r.admin.port()
        ));
    }
    cfg
}

/// What one phase of load got back.
#[derive(Debug, Default)]
struct Outcome {
    /// Request ids of the 2xx answers.
    ok: Vec<String>,
    refused: usize,
    /// Other answers or failed connections.
    failed: Vec<String>,
    slowest: Duration,
}

/// `REQUESTS` reads of the example person for `officer`, on `CONNECTIONS` connections at once
/// (each request its own TLS connection, so HAProxy spreads them over the replicas).
async fn drive(client: &Arc<Client>, token: &str) -> Outcome {
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let (client, token) = (client.clone(), token.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            for _ in (c..REQUESTS).step_by(CONNECTIONS) {
                let t = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.send(Method::GET, &person_path(PERSON), Some(&token), None),
                )
                .await;
                out.slowest = out.slowest.max(t.elapsed());
                match r {
                    Ok(Ok(r)) if r.status.is_success() => out.ok.push(r.request_id()),
                    Ok(Ok(r)) if r.status == StatusCode::TOO_MANY_REQUESTS => out.refused += 1,
                    Ok(Ok(r)) => out.failed.push(r.status.to_string()),
                    Ok(Err(e)) => out.failed.push(e),
                    Err(_) => out.failed.push("no answer within 10 s".to_owned()),
                }
            }
            out
        }));
    }
    let mut all = Outcome::default();
    for t in tasks {
        let o = t.await.unwrap();
        all.ok.extend(o.ok);
        all.refused += o.refused;
        all.failed.extend(o.failed);
        all.slowest = all.slowest.max(o.slowest);
    }
    all
}

fn within_ten_percent(got: usize, want: usize) -> bool {
    let (got, want) = (got as f64, want as f64);
    (got - want).abs() <= want * 0.1
}

/// A metric's value summed over its label sets, from a `/metrics` body.
fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn spawn_replica(data: &Path, policies: &Path, args: Vec<String>) -> ServeProcess {
    let (data, policies) = (data.to_path_buf(), policies.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn_serve_with(&data, &policies, None, &args).ready()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_behind_haproxy_hold_one_quota_through_a_kill_and_a_redis_loss() {
    let haproxy = require_tool("haproxy", "haproxy");
    require_tool("redis-server", "redis-server");
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let started = Instant::now();
    let mut redis = RedisServer::start().await.expect("redis-server starts");
    let dir = tempfile::tempdir().unwrap();
    let config = shared_data(dir.path());
    let data = config.data_dir.clone();

    let reg = {
        let data = data.clone();
        tokio::task::spawn_blocking(move || {
            spawn_registry(
                &data,
                &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
            )
        })
        .await
        .unwrap()
    };
    let policies = policies_with_registry_at(dir.path(), &format!("https://{}", reg.api));
    std::fs::write(policies.join("limits.toml"), LIMITS).unwrap();
    let gateway_toml = dir.path().join("gateway.toml");
    std::fs::write(
        &gateway_toml,
        format!(
            // A wait generous for a loaded 2-core CI machine: a check that merely
            // took long must not fall back and blur the quota being measured.
            "[limits]\nreplicas = {REPLICAS}\nbackend = \"{}\"\nredis_prefix = \"cluster-test:\"\nredis_timeout = \"250ms\"\n",
            redis.url
        ),
    )
    .unwrap();
    // One after another: they share the data directory (PKI, keys) as replicas share a volume.
    let mut replicas = Vec::new();
    for i in 1..=REPLICAS {
        let args = [
            "--config",
            gateway_toml.to_str().unwrap(),
            "--database-url",
            &pg.url,
            "--node",
            &format!("replica-{i}"),
            "--no-registry",
        ]
        .map(str::to_owned)
        .to_vec();
        replicas.push(spawn_replica(&data, &policies, args).await);
    }
    let front = free_port();
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        haproxy_config(front, &replicas.iter().collect::<Vec<_>>()),
    )
    .unwrap();
    let _haproxy = KillOnDrop(
        std::process::Command::new(&haproxy)
            .args(["-db", "-f", cfg.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let front: SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();
    let pki = config.pki_dir();
    let (cert, key) = karibche::devpki::agency_files(&pki, "mia-border");
    let client = Arc::new(Client::new(&pki.join("ca.pem"), Some((&cert, &key)), front));
    let keys = config.data_path(&config.tokens.keys_dir);
    let token = |officer: &str| dev_token(&keys, "mia-border", officer, "border-control");
    let warm = token("warm-up");
    assert!(
        eventually(Duration::from_secs(20), async || {
            client
                .send(Method::GET, &person_path(PERSON), Some(&warm), None)
                .await
                .is_ok_and(|r| r.status == StatusCode::OK)
        })
        .await,
        "HAProxy passes requests to the replicas"
    );
    let mut answered: Vec<String> = Vec::new();

    // All three up: one quota, across all replicas together.
    let all_up = drive(&client, &token("officer-a")).await;
    eprintln!(
        "all replicas: {} admitted, {} refused, failed {:?}, slowest {:?}",
        all_up.ok.len(),
        all_up.refused,
        all_up.failed,
        all_up.slowest
    );
    assert!(all_up.failed.is_empty(), "{:?}", all_up.failed);
    assert!(
        within_ten_percent(all_up.ok.len(), BURST),
        "{} admitted for a quota of {BURST}",
        all_up.ok.len()
    );
    answered.extend(all_up.ok);

    // One replica SIGKILLed: HAProxy moves its connections, the quota is still whole.
    replicas.remove(0).kill();
    let after_kill = drive(&client, &token("officer-b")).await;
    eprintln!(
        "one replica killed: {} admitted, {} refused, failed {:?}, slowest {:?}",
        after_kill.ok.len(),
        after_kill.refused,
        after_kill.failed,
        after_kill.slowest
    );
    assert!(after_kill.failed.len() <= 2, "{:?}", after_kill.failed);
    assert!(
        within_ten_percent(after_kill.ok.len(), BURST),
        "{} admitted for a quota of {BURST} after a fail-over (the local split would give {})",
        after_kill.ok.len(),
        2 * BURST.div_ceil(REPLICAS)
    );
    answered.extend(after_kill.ok);

    // Redis stopped: every request is still answered within the bounded wait,
    // each surviving replica enforces its local share, and says so.
    redis.stop();
    let no_redis = drive(&client, &token("officer-c")).await;
    eprintln!(
        "redis stopped: {} admitted, {} refused, failed {:?}, slowest {:?}",
        no_redis.ok.len(),
        no_redis.refused,
        no_redis.failed,
        no_redis.slowest
    );
    assert!(no_redis.failed.is_empty(), "{:?}", no_redis.failed);
    assert!(
        no_redis.slowest < Duration::from_secs(3),
        "{:?}",
        no_redis.slowest
    );
    let local_split = (REPLICAS - 1) * BURST.div_ceil(REPLICAS);
    assert!(
        within_ten_percent(no_redis.ok.len(), local_split),
        "{} admitted; the local split of the 2 live replicas is {local_split}",
        no_redis.ok.len()
    );
    answered.extend(no_redis.ok);
    for r in &replicas {
        let (_, m) = admin_get(r.admin, "/metrics").await;
        assert_eq!(metric(&m, "karibche_limits_backend_up"), 0.0, "{m}");
        assert!(metric(&m, "karibche_limits_backend_fallbacks_total") > 0.0);
        let (status, ready) = admin_get(r.admin, "/readyz").await;
        assert_eq!(
            status,
            StatusCode::OK,
            "Redis down keeps a replica ready: {ready}"
        );
        assert!(ready.contains("\"quotas\":\"local-fallback\""), "{ready}");
    }

    // Every 2xx has its record; every chain verifies.
    let store = karibche::store::Store::connect(&pg.url).await.unwrap();
    let ids: HashSet<String> = sqlx::query_scalar("SELECT id FROM audit_log")
        .fetch_all(store.pool())
        .await
        .unwrap()
        .into_iter()
        .collect();
    for id in &answered {
        assert!(ids.contains(id), "2xx {id} has no audit record");
    }
    let nodes: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT node FROM audit_log ORDER BY node")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(nodes.len(), REPLICAS, "{nodes:?}");
    store.close().await;
    let verify = std::process::Command::new(env!("CARGO_BIN_EXE_karibche"))
        .args([
            "--data-dir",
            data.to_str().unwrap(),
            "--database-url",
            &pg.url,
        ])
        .args(["audit", "verify"])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    drop(reg);
    eprintln!("cluster test took {:?}", started.elapsed());
}

fn readyz_json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_database_report_differing_policy_versions() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/shared.db", dir.path().display());
    let node = |name: &'static str, policies: Option<PathBuf>| {
        let url = url.clone();
        move |c: &mut Config, _: &Path| {
            c.database_url = Some(url);
            c.node = name.to_owned();
            if let Some(p) = policies {
                c.policies_dir = p;
            }
        }
    };
    let a = TestGateway::start_configured(Db::Sqlite, node("node-a", None))
        .await
        .unwrap();
    let edited = copy_policies(dir.path());
    // The version covers the policy files (limits.toml holds the quotas, apart).
    let providers = edited.join("providers.toml");
    let original = std::fs::read_to_string(&providers).unwrap();
    std::fs::write(
        &providers,
        format!("{original}\n# edited on one replica only\n"),
    )
    .unwrap();
    let b = TestGateway::start_configured(Db::Sqlite, node("node-b", Some(edited)))
        .await
        .unwrap();
    let (va, vb) = (
        a.running.started.policy_version.clone(),
        b.running.started.policy_version.clone(),
    );
    assert_ne!(va, vb);
    let admin = a.running.started.admin;
    let mixed = eventually(Duration::from_secs(10), async || {
        let (_, body) = admin_get(admin, "/readyz").await;
        let r = readyz_json(&body);
        r["mixed_policy_versions"] == true
            && r["policy_versions_in_cluster"][&va] == serde_json::json!(["node-a"])
            && r["policy_versions_in_cluster"][&vb] == serde_json::json!(["node-b"])
    })
    .await;
    assert!(mixed, "{}", admin_get(admin, "/readyz").await.1);
    let (status, _) = admin_get(admin, "/readyz").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "mixed versions warn, they do not take a node out"
    );
    let (_, m) = admin_get(admin, "/metrics").await;
    assert_eq!(metric(&m, "karibche_policy_versions_in_cluster"), 2.0);

    // node-b takes the same policy again: one version, the warning ends.
    std::fs::write(&providers, &original).unwrap();
    b.running.reload_policy().await.unwrap();
    let one = eventually(Duration::from_secs(10), async || {
        let (_, m) = admin_get(admin, "/metrics").await;
        metric(&m, "karibche_policy_versions_in_cluster") == 1.0
    })
    .await;
    assert!(one, "{}", admin_get(admin, "/readyz").await.1);
    b.shutdown().await;
    a.shutdown().await;
}
