//! Evidence that does not depend on trusting the operators (issue 17): the
//! tamper cases a witness catches — a cut tail, a restored older backup, a
//! SQLite file copied without its WAL — named by `audit verify` (exit 3) and
//! refused by the witness; and one-record proofs that verify offline and fail
//! when any byte of the file or the body changes.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{audit_node, read_body, start_witness, write_reads, RunningWitness};
use karibche::audit::{self, evidence, AuditKey, AuditLog};
use karibche::store::Store;
use karibche::witness::client::{self, WitnessBoard, WitnessPeer};
use karibche::witness::KnownLog;

const NODE: &str = "n-ev";

fn karibche(dir: &Path, db: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_karibche"));
    c.args(["--data-dir", dir.to_str().unwrap()])
        .args(["--database-url", &format!("sqlite://{}", db.display())])
        .args(args)
        .env("RUST_LOG", "warn");
    c
}

/// A node on `db` whose tree heads one witness cosigns.
struct Witnessed {
    store: Store,
    log: AuditLog,
    writer: audit::AuditWriter,
    board: Arc<WitnessBoard>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn witnessed_node(db: &Path, key: &Arc<AuditKey>, w: &RunningWitness) -> Witnessed {
    let store = Store::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let (log, writer) = audit_node(&store, key.clone(), NODE).await;
    let board = Arc::new(WitnessBoard::default());
    let (stop, tasks) = witnessing(&store, &log, w, &board);
    Witnessed {
        store,
        log,
        writer,
        board,
        stop,
        tasks,
    }
}

/// The witness task for `log`, reporting to `board`; send `true` to stop it.
fn witnessing(
    store: &Store,
    log: &AuditLog,
    w: &RunningWitness,
    board: &Arc<WitnessBoard>,
) -> (
    tokio::sync::watch::Sender<bool>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let tasks = client::spawn(
        store.clone(),
        NODE.into(),
        log.tree_heads(),
        vec![WitnessPeer {
            name: w.witness.name().into(),
            url: format!("http://{}", w.addr),
            public_key: hex::decode(w.witness.public_hex()).unwrap(),
        }],
        board.clone(),
        shutdown,
    );
    (stop, tasks)
}

/// A writer for [`NODE`] signing a tree head every `every` records.
fn checkpointed(key: &Arc<AuditKey>, every: u64) -> audit::AuditConfig {
    let mut config = audit::AuditConfig::new(NODE);
    config.checkpoints = Some(audit::CheckpointPolicy {
        key: key.clone(),
        every,
        interval: Duration::from_secs(3600),
    });
    config
}

impl Witnessed {
    /// Waits until the witness has cosigned `size` (or answered with an error, if `refused`).
    async fn cosigned(&self, size: u64) -> bool {
        common::eventually(Duration::from_secs(20), async || {
            self.board
                .snapshot()
                .values()
                .any(|s| s.cosigned == size && s.error.is_none())
        })
        .await
    }

    async fn close(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.log.close();
        drop(self.log);
        self.writer.finish().await;
        self.store.close().await;
    }
}

fn known(key: &AuditKey) -> Vec<KnownLog> {
    vec![KnownLog {
        origin: audit::tree::default_origin(NODE),
        public_key: key.public_bytes().to_vec(),
    }]
}

/// The witness's latest cosigned checkpoint, as `audit verify --witness` fetches it.
async fn witness_note(w: &RunningWitness) -> String {
    client::fetch_latest(
        &format!("http://{}", w.addr),
        &audit::tree::default_origin(NODE),
    )
    .await
    .unwrap()
    .unwrap()
}

async fn verify(db: &Path, note: &str) -> audit::VerifyReport {
    let store = Store::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let r = audit::chain::verify_witnessed(&store, Some(NODE), None, None, &[note.to_owned()])
        .await
        .unwrap();
    store.close().await;
    r
}

// Multi-threaded: the witness in this process must answer the command line while the test waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_tail_is_named_with_its_range_and_exit_code_3() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gw.db");
    let key = Arc::new(AuditKey::load_or_create(&dir.path().join("node.key")).unwrap());
    let w = start_witness(&dir.path().join("w"), known(&key), 0).await;
    let node = witnessed_node(&db, &key, &w).await;
    write_reads(&node.log, "a", 30).await;
    assert!(node.cosigned(30).await, "{:?}", node.board.snapshot());
    node.close().await;
    let note = witness_note(&w).await;

    // The operator deletes the newest records and their checkpoints and tree heads too.
    let store = Store::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    for sql in [
        "DELETE FROM audit_subjects WHERE seq > 22",
        "DELETE FROM audit_log WHERE seq > 22",
        "DELETE FROM audit_checkpoints WHERE seq > 22",
        "DELETE FROM audit_tree_heads WHERE size > 22",
        "DELETE FROM audit_cosignatures WHERE size > 22",
    ] {
        sqlx::query(sql).execute(store.pool()).await.unwrap();
    }
    store.close().await;
    let plain = audit::verify(
        &Store::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap(),
        Some(NODE),
    )
    .await
    .unwrap();
    assert!(
        plain.intact(),
        "without the witness the cut is invisible: {plain}"
    );
    let report = verify(&db, &note).await;
    let why = report.nodes[0].rolled_back.clone().unwrap();
    assert!(why.contains("records 23..=30 are missing"), "{why}");

    let file = dir.path().join("witnessed.note");
    std::fs::write(&file, &note).unwrap();
    let out = karibche(
        dir.path(),
        &db,
        &[
            "audit",
            "verify",
            "--witnessed",
            file.to_str().unwrap(),
            "--node",
            NODE,
        ],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("TRUNCATED OR ROLLED BACK"));
    let out = karibche(
        dir.path(),
        &db,
        &[
            "audit",
            "verify",
            "--witness",
            &format!("http://{}", w.addr),
            "--node",
            NODE,
        ],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    w.stop().await;
}

#[tokio::test]
async fn a_restored_backup_is_named_by_verify_and_refused_by_the_witness() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gw.db");
    let backup = dir.path().join("backup.db");
    let key = Arc::new(AuditKey::load_or_create(&dir.path().join("node.key")).unwrap());
    let wdir = dir.path().join("w");
    let w = start_witness(&wdir, known(&key), 0).await;
    let node = witnessed_node(&db, &key, &w).await;
    write_reads(&node.log, "a", 20).await;
    assert!(node.cosigned(20).await);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "VACUUM INTO '{}'",
        backup.display()
    )))
    .execute(node.store.pool())
    .await
    .unwrap();
    write_reads(&node.log, "b", 15).await;
    assert!(node.cosigned(35).await);
    node.close().await;

    // Restore the older copy; the node goes on writing, reusing sequence numbers 21…
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
    }
    std::fs::copy(&backup, &db).unwrap();
    let node = witnessed_node(&db, &key, &w).await;
    write_reads(&node.log, "c", 20).await;
    let refused = common::eventually(Duration::from_secs(20), async || {
        node.board
            .snapshot()
            .values()
            .any(|s| s.error.as_deref().is_some_and(|e| e.contains("422")))
    })
    .await;
    assert!(refused, "{:?}", node.board.snapshot());
    node.close().await;
    let refusals = std::fs::read_to_string(wdir.join("refusals.jsonl")).unwrap();
    assert!(refusals.contains("\"kind\":\"inconsistent\""), "{refusals}");

    let report = verify(&db, &witness_note(&w).await).await;
    let why = report.nodes[0].rolled_back.clone().unwrap();
    assert!(
        why.contains("records 1..=35 are not the ones a witness cosigned"),
        "{why}"
    );
    w.stop().await;
}

#[tokio::test]
async fn a_sqlite_file_copied_without_its_wal_is_named_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gw.db");
    let copy = dir.path().join("copy.db");
    let key = Arc::new(AuditKey::load_or_create(&dir.path().join("node.key")).unwrap());
    let w = start_witness(&dir.path().join("w"), known(&key), 0).await;
    let node = witnessed_node(&db, &key, &w).await;
    write_reads(&node.log, "a", 10).await;
    assert!(node.cosigned(10).await);
    // Everything so far into the main file; what follows stays in the WAL.
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(node.store.pool())
        .await
        .unwrap();
    write_reads(&node.log, "b", 15).await;
    assert!(node.cosigned(25).await);
    std::fs::copy(&db, &copy).unwrap();
    node.close().await;

    let report = verify(&copy, &witness_note(&w).await).await;
    let n = &report.nodes[0];
    assert!(
        n.records < 25,
        "the copy lacks what was in the WAL: {report}"
    );
    let why = n.rolled_back.clone().unwrap();
    assert!(
        why.contains(&format!("records {}..=25 are missing", n.records + 1)),
        "{why}"
    );
    w.stop().await;
}

/// Flips each byte of `bytes` in turn (XOR 1) and counts the variants `accepts` takes.
fn accepted_flips(bytes: &[u8], accepts: impl Fn(&[u8]) -> bool) -> Vec<usize> {
    let mut copy = bytes.to_vec();
    let mut accepted = Vec::new();
    for i in 0..copy.len() {
        copy[i] ^= 1;
        if accepts(&copy) {
            accepted.push(i);
        }
        copy[i] ^= 1;
    }
    accepted
}

#[tokio::test]
async fn a_proof_verifies_offline_and_fails_when_any_byte_changes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gw.db");
    let key = Arc::new(AuditKey::load_or_create(&dir.path().join("node.key")).unwrap());
    let w = start_witness(&dir.path().join("w"), known(&key), 0).await;
    let node = witnessed_node(&db, &key, &w).await;
    write_reads(&node.log, "a", 23).await;
    assert!(node.cosigned(20).await);
    let wkey = (
        w.witness.name().to_owned(),
        hex::decode(w.witness.public_hex()).unwrap(),
    );
    let ev = evidence::prove(&node.store, "a-13", std::slice::from_ref(&wkey))
        .await
        .unwrap();
    node.close().await;
    // The smallest cosigned head covering seq 14: 15 or 20, depending on which heads the witness saw.
    assert!(ev.tree_size >= 15 && ev.witness_keys.len() == 1, "{ev:?}");
    let file = serde_json::to_vec_pretty(&ev).unwrap();
    println!("evidence file for a tree of 20: {} bytes", file.len());
    let body = read_body("a", 13);
    let ok = evidence::verify(&file, Some(body.as_bytes()), Some(key.public_hex())).unwrap();
    assert_eq!((ok.seq, ok.cosigned_by.len()), (14, 1));
    assert!(evidence::verify(&file, Some(read_body("a", 12).as_bytes()), None).is_err());
    assert!(evidence::verify(&file, None, Some(w.witness.public_hex())).is_err());

    let flips = accepted_flips(&file, |f| {
        evidence::verify(f, Some(body.as_bytes()), None).is_ok()
    });
    assert!(
        flips.is_empty(),
        "accepted with a byte changed at {:?}",
        flips
            .iter()
            .map(|&i| String::from_utf8_lossy(
                &file[i.saturating_sub(20)..(i + 20).min(file.len())]
            ))
            .collect::<Vec<_>>()
    );
    let flips = accepted_flips(body.as_bytes(), |b| {
        evidence::verify(&file, Some(b), None).is_ok()
    });
    assert!(flips.is_empty(), "{flips:?}");

    // The command line: offline, no database.
    let path = dir.path().join("a-13.json");
    std::fs::write(&path, &file).unwrap();
    let body_path = dir.path().join("body.json");
    std::fs::write(&body_path, &body).unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_karibche"))
            .args(args)
            .output()
            .unwrap()
    };
    let p = path.to_str().unwrap();
    let out = run(&[
        "audit",
        "verify-proof",
        p,
        "--body",
        body_path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("cosigned by witness witness.test"));
    std::fs::write(&body_path, read_body("a", 14)).unwrap();
    let out = run(&[
        "audit",
        "verify-proof",
        p,
        "--body",
        body_path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    w.stop().await;
}

#[tokio::test]
async fn a_subject_report_writes_one_verifiable_proof_per_access() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gw.db");
    let key = Arc::new(AuditKey::load_or_create(&dir.path().join("node.key")).unwrap());
    let w = start_witness(&dir.path().join("w"), known(&key), 0).await;
    let node = witnessed_node(&db, &key, &w).await;
    // Three reads of RF-1 among others (ids a-1, b-1, c-1).
    for prefix in ["a", "b", "c"] {
        write_reads(&node.log, prefix, 4).await;
    }
    node.close().await;
    let config = dir.path().join("karibche.toml");
    std::fs::write(
        &config,
        format!(
            "[[audit.witnesses]]\nname = \"witness.test\"\nurl = \"http://{}\"\npublic_key = \"{}\"\n",
            w.addr,
            w.witness.public_hex()
        ),
    )
    .unwrap();
    let proofs = dir.path().join("proofs");
    let out = karibche(
        dir.path(),
        &db,
        &[
            "--config",
            config.to_str().unwrap(),
            "audit",
            "report",
            "--subject",
            "RF-1",
            "--proofs",
            proofs.to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut files: Vec<_> = std::fs::read_dir(&proofs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    for (f, prefix) in files.iter().zip(["a", "b", "c"]) {
        let v = evidence::verify(
            &std::fs::read(f).unwrap(),
            Some(read_body(prefix, 1).as_bytes()),
            Some(key.public_hex()),
        )
        .unwrap();
        assert_eq!(v.record_id, format!("{prefix}-1"));
    }
    w.stop().await;
}

/// Append latency with and without a witness, side by side in one run: two
/// nodes (own SQLite files) under the same concurrent load at the same time,
/// a tree head every 100 records, one of them witnessed.
/// `cargo test --test evidence figures -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn figures_append_latency_with_and_without_witnessing() {
    let dir = tempfile::tempdir().unwrap();
    let key = Arc::new(AuditKey::load_or_create(&dir.path().join("node.key")).unwrap());
    let w = start_witness(&dir.path().join("w"), known(&key), 0).await;
    let url = |name: &str| format!("sqlite://{}", dir.path().join(name).display());
    let store = Store::connect(&url("on.db")).await.unwrap();
    let plain_store = Store::connect(&url("off.db")).await.unwrap();
    let (on, on_writer) = AuditLog::start(store.clone(), checkpointed(&key, 100))
        .await
        .unwrap();
    let (plain, plain_writer) = AuditLog::start(plain_store.clone(), checkpointed(&key, 100))
        .await
        .unwrap();
    let board = Arc::new(WitnessBoard::default());
    let (stop, tasks) = witnessing(&store, &on, &w, &board);
    const PER_NODE: usize = 6_000;
    const CONCURRENCY: usize = 32;
    let run = |log: AuditLog, tag: &'static str| async move {
        let mut hist = hdrhistogram::Histogram::<u64>::new(3).unwrap();
        let mut set = tokio::task::JoinSet::new();
        for c in 0..CONCURRENCY {
            let log = log.clone();
            set.spawn(async move {
                let mut out = Vec::new();
                for i in 0..PER_NODE / CONCURRENCY {
                    let started = std::time::Instant::now();
                    log.append(audit::Entry {
                        id: format!("{tag}-{c}-{i}"),
                        ts: audit::now_ts(),
                        method: "GET".into(),
                        path: "/v1/registry/persons/RF-1".into(),
                        decision: "allow".into(),
                        status: 200,
                        policy_version: "v".into(),
                        subjects: vec!["RF-1".into()],
                        ..audit::Entry::default()
                    })
                    .await
                    .unwrap();
                    out.push(started.elapsed().as_micros() as u64);
                }
                out
            });
        }
        while let Some(r) = set.join_next().await {
            for v in r.unwrap() {
                hist.record(v).unwrap();
            }
        }
        hist
    };
    let started = std::time::Instant::now();
    let (h_on, h_off) = tokio::join!(run(on.clone(), "on"), run(plain.clone(), "off"));
    let took = started.elapsed();
    for (name, h) in [("witnessing on ", &h_on), ("witnessing off", &h_off)] {
        println!(
            "{name}: {} appends, p50 {} µs, p99 {} µs, max {} µs",
            h.len(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max()
        );
    }
    let _ = stop.send(true);
    for t in tasks {
        t.await.unwrap();
    }
    let cosigned_during: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_cosignatures")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let heads = audit::tree::heads(&store, NODE).await.unwrap().len();
    println!("both nodes in {took:?}; {heads} tree heads on the witnessed node, {cosigned_during} cosigned while the load ran");
    for (log, writer) in [(on, on_writer), (plain, plain_writer)] {
        log.close();
        drop(log);
        writer.finish().await;
    }
    w.stop().await;
}
