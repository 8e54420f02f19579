//! Witnesses (issue 17): a node's tree heads cosigned by a `karibche witness`
//! that only accepts consistent extensions; a witness that restarts keeps its
//! state; a node whose witness is down keeps serving and catches up; a fork
//! and a rollback are refused, counted and recorded by the witness.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{audit_node as node, start_witness, write_reads as write, RunningWitness as Running};
use karibche::audit::{self, note, AuditKey};
use karibche::witness::client::{self, WitnessBoard, WitnessPeer};
use karibche::witness::{AddCheckpoint, KnownLog};

fn peer(w: &Running) -> WitnessPeer {
    WitnessPeer {
        name: w.witness.name().to_owned(),
        url: format!("http://{}", w.addr),
        public_key: hex::decode(w.witness.public_hex()).unwrap(),
    }
}

async fn post(addr: std::net::SocketAddr, body: String) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!(
        "POST /add-checkpoint HTTP/1.1\r\nhost: w\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

#[tokio::test]
async fn node_is_cosigned_witness_keeps_state_and_a_down_witness_is_caught_up() {
    let (store, dir) = karibche::testing::sqlite_store().await;
    let key = Arc::new(AuditKey::load_or_create(&dir.path().join("node.key")).unwrap());
    let (log, writer) = node(&store, key.clone(), "n-w").await;
    let logs = vec![KnownLog {
        origin: log.origin().to_owned(),
        public_key: key.public_bytes().to_vec(),
    }];
    let wdir = tempfile::tempdir().unwrap();
    let w = start_witness(wdir.path(), logs.clone(), 0).await;
    let port = w.addr.port();
    let board = Arc::new(WitnessBoard::default());
    let (stop_tasks, shutdown) = tokio::sync::watch::channel(false);
    let tasks = client::spawn(
        store.clone(),
        "n-w".into(),
        log.tree_heads(),
        vec![peer(&w)],
        board.clone(),
        shutdown,
    );
    write(&log, "a", 12).await;
    let cosigned = common::eventually(Duration::from_secs(20), async || {
        board
            .snapshot()
            .get("witness.test")
            .is_some_and(|s| s.cosigned == 10)
    })
    .await;
    assert!(cosigned, "{:?}", board.snapshot());
    let lines = client::cosignatures(&store, "n-w", 10).await.unwrap();
    assert_eq!(lines.len(), 1);
    let head = audit::tree::heads(&store, "n-w").await.unwrap();
    let text = note::Note::parse(&head.last().unwrap().note).unwrap().text;
    let wkey = hex::decode(w.witness.public_hex()).unwrap();
    assert!(note::verify_cosignature("witness.test", &wkey, &text, &lines[0].1).is_some());

    // The witness goes away: the node keeps committing and says how far behind it is.
    w.stop().await;
    write(&log, "b", 10).await;
    let behind = common::eventually(Duration::from_secs(20), async || {
        board
            .snapshot()
            .get("witness.test")
            .is_some_and(|s| s.error.is_some() && s.behind == 10)
    })
    .await;
    assert!(behind, "{:?}", board.snapshot());

    // It returns with its state (same directory, same port) and is caught up with one proof.
    let w = start_witness(wdir.path(), logs, port).await;
    let caught_up = common::eventually(Duration::from_secs(40), async || {
        board
            .snapshot()
            .get("witness.test")
            .is_some_and(|s| s.cosigned == 20 && s.error.is_none() && s.behind == 0)
    })
    .await;
    assert!(caught_up, "{:?}", board.snapshot());
    let state = std::fs::read_to_string(wdir.path().join("state.json")).unwrap();
    assert!(state.contains("\"size\": 20"), "{state}");

    let _ = stop_tasks.send(true);
    for t in tasks {
        t.await.unwrap();
    }
    w.stop().await;
    log.close();
    drop(log);
    writer.finish().await;
}

#[tokio::test]
async fn witness_refuses_a_fork_a_rollback_a_bad_proof_and_unknown_logs() {
    let dir = tempfile::tempdir().unwrap();
    let key = AuditKey::load_or_create(&dir.path().join("node.key")).unwrap();
    let stranger = AuditKey::load_or_create(&dir.path().join("other.key")).unwrap();
    let origin = "karibche/audit/n-fork";
    let wdir = tempfile::tempdir().unwrap();
    let w = start_witness(
        wdir.path(),
        vec![KnownLog {
            origin: origin.into(),
            public_key: key.public_bytes().to_vec(),
        }],
        0,
    )
    .await;
    let leaves = |tag: &str, n: u64| -> Vec<audit::merkle::Hash> {
        (0..n)
            .map(|i| audit::merkle::leaf_hash(format!("{tag}{i}").as_bytes()))
            .collect()
    };
    let tree = |l: &[audit::merkle::Hash]| {
        let mut t = audit::merkle::CompactRange::default();
        l.iter().for_each(|h| {
            t.push(*h);
        });
        t.root()
    };
    let signed = |k: &AuditKey, o: &str, size: u64, root| {
        let text = note::checkpoint_text(o, size, &root);
        note::Note {
            signatures: vec![note::sign(k, o, &text)],
            text,
        }
        .render()
    };
    let add = |old, proof, checkpoint| {
        AddCheckpoint {
            old,
            proof,
            checkpoint,
        }
        .render()
    };
    let a = leaves("a", 8);
    let (s, body) = post(w.addr, add(0, vec![], signed(&key, origin, 8, tree(&a)))).await;
    assert_eq!(s, 200, "{body}");
    assert!(body.starts_with("\u{2014} witness.test "), "{body}");

    // Unknown origin, signature by another key, a stale `old`.
    let (s, _) = post(
        w.addr,
        add(0, vec![], signed(&key, "other/log", 8, tree(&a))),
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = post(
        w.addr,
        add(0, vec![], signed(&stranger, origin, 8, tree(&a))),
    )
    .await;
    assert_eq!(s, 403);
    let (s, body) = post(w.addr, add(3, vec![], signed(&key, origin, 8, tree(&a)))).await;
    assert_eq!((s, body.as_str()), (409, "8\n"));

    // A fork: a different tree of the same size.
    let b = leaves("b", 8);
    let (s, _) = post(w.addr, add(8, vec![], signed(&key, origin, 8, tree(&b)))).await;
    assert_eq!(s, 422);
    // A rollback: a smaller tree.
    let (s, _) = post(
        w.addr,
        add(8, vec![], signed(&key, origin, 5, tree(&a[..5]))),
    )
    .await;
    assert_eq!(s, 400);
    // An extension whose proof is wrong.
    let mut c = a.clone();
    c.extend(leaves("c", 4));
    let (s, _) = post(
        w.addr,
        add(8, vec![[7; 32]], signed(&key, origin, 12, tree(&c))),
    )
    .await;
    assert_eq!(s, 422);
    // The right proof (old size 8 is a power of two: the proof is the new subtree's hash).
    let (s, body) = post(
        w.addr,
        add(8, vec![tree(&c[8..])], signed(&key, origin, 12, tree(&c))),
    )
    .await;
    assert_eq!(s, 200, "{body}");

    let refusals = std::fs::read_to_string(wdir.path().join("refusals.jsonl")).unwrap();
    let kinds: Vec<String> = refusals
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(kinds, ["fork", "rollback", "inconsistent"]);
    let (status, metrics) = common::admin_get(w.addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("karibche_witness_refusals_total 3"),
        "{metrics}"
    );
    w.stop().await;
}

/// Starts `karibche witness serve` on an ephemeral port; its address from the banner.
fn spawn_witness(dir: &std::path::Path, log: &str) -> (common::KillOnDrop, std::net::SocketAddr) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_karibche"))
        .args([
            "witness",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--name",
            "w.cli",
        ])
        .args(["--dir", dir.to_str().unwrap(), "--log", log])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().parse().unwrap();
    (common::KillOnDrop(child), addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_witness_command_cosigns_and_remembers_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key = AuditKey::load_or_create(&dir.path().join("node.key")).unwrap();
    let origin = "karibche/audit/n-cli";
    let log = format!("{origin}={}", key.public_hex());
    let wdir = dir.path().join("w");
    let (child, addr) = spawn_witness(&wdir, &log);
    let text = note::checkpoint_text(origin, 3, &[9; 32]);
    let checkpoint = note::Note {
        signatures: vec![note::sign(&key, origin, &text)],
        text,
    }
    .render();
    let body = AddCheckpoint {
        old: 0,
        proof: vec![],
        checkpoint,
    }
    .render();
    let (s, line) = post(addr, body.clone()).await;
    assert_eq!(s, 200, "{line}");
    drop(child);

    let (_child, addr) = spawn_witness(&wdir, &log);
    let latest = client::fetch_latest(&format!("http://{addr}"), origin)
        .await
        .unwrap()
        .unwrap();
    assert!(latest.contains(line.trim()), "{latest}");
    // The same `old 0` is now stale: the restarted witness says where it is.
    let (s, size) = post(addr, body).await;
    assert_eq!((s, size.as_str()), (409, "3\n"));
}

/// The real gateway with a witness that is down: ready, and `/readyz` and
/// `/metrics` say how far behind the witness is; once it is up, it catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_witness_is_down_stays_ready_and_says_so() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let wdir = tempfile::tempdir().unwrap();
    let wkey = AuditKey::load_or_create(&wdir.path().join("witness.key")).unwrap();
    let public_key = wkey.public_hex().to_owned();
    let gw = common::TestGateway::start_configured(common::Db::Sqlite, move |c, _| {
        c.audit.checkpoint_every = 1;
        c.audit.witnesses = vec![karibche::config::WitnessSettings {
            name: "witness.test".into(),
            url: format!("http://127.0.0.1:{port}"),
            public_key,
        }];
    })
    .await
    .unwrap();
    let admin = gw.running.started.admin;
    let detail = |body: &str| {
        serde_json::from_str::<serde_json::Value>(body).unwrap()["witnesses"]["witness.test"]
            .clone()
    };
    let down = common::eventually(Duration::from_secs(20), async || {
        let (status, body) = common::admin_get(admin, "/readyz").await;
        status == 200
            && detail(&body)["error"].is_string()
            && detail(&body)["behind"].as_u64() > Some(0)
    })
    .await;
    assert!(down, "{}", common::admin_get(admin, "/readyz").await.1);
    let (_, metrics) = common::admin_get(admin, "/metrics").await;
    assert!(
        metrics.contains("karibche_audit_witness_behind{witness=\"witness.test\"} "),
        "{metrics}"
    );

    let node_key = AuditKey::load_or_create(&gw.config.audit_key_path()).unwrap();
    let w = start_witness(
        wdir.path(),
        vec![KnownLog {
            origin: audit::tree::default_origin(&gw.config.node),
            public_key: node_key.public_bytes().to_vec(),
        }],
        port,
    )
    .await;
    let caught_up = common::eventually(Duration::from_secs(40), async || {
        let (_, body) = common::admin_get(admin, "/readyz").await;
        detail(&body)["behind"] == 0 && detail(&body)["error"].is_null()
    })
    .await;
    assert!(caught_up, "{}", common::admin_get(admin, "/readyz").await.1);
    gw.shutdown().await;
    w.stop().await;
}
