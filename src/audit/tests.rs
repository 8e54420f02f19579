//! Tests of the audit log against SQLite and, where reachable, PostgreSQL.

use std::collections::BTreeSet;

use super::query::export_paged;
use super::*;
use crate::store::Store;

use crate::testing::{sqlite_store, PgDatabase};

async fn pg_store() -> Option<(Store, PgDatabase)> {
    PgDatabase::store().await
}

/// Runs one scenario against SQLite and against PostgreSQL.
macro_rules! both {
    ($sqlite:ident, $pg:ident, $scenario:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            let (store, _dir) = sqlite_store().await;
            $scenario(store).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $pg() {
            let Some((store, _guard)) = pg_store().await else {
                return;
            };
            $scenario(store).await;
        }
    };
}

fn entry(n: usize) -> Entry {
    Entry {
        id: uuid::Uuid::now_v7().to_string(),
        ts: format!("2026-11-03T09:{:02}:{:02}.{:06}Z", (n / 60) % 60, n % 60, n),
        agency: Some(format!("agency-{}", n % 3)),
        certificate: Some("ab".repeat(32)),
        officer: Some(format!("officer-{}", n % 5)),
        purpose: Some("visa-check".into()),
        legal_basis: Some("law-123".into()),
        case_ref: Some(format!("case-{n}")),
        consent_ref: None,
        token_id: Some(format!("jti-{n}")),
        provider: Some("register".into()),
        service: Some("persons".into()),
        operation: Some("read".into()),
        method: "GET".into(),
        path: format!("/v1/register/persons/P{n}"),
        subjects: vec![format!("P{n}"), format!("P{}", n % 7)],
        fields: vec!["name".into(), "visa".into()],
        decision: if n.is_multiple_of(4) { "deny" } else { "allow" }.into(),
        reason: n.is_multiple_of(4).then(|| "no_grant".to_owned()),
        status: if n.is_multiple_of(4) { 403 } else { 200 },
        policy_version: "v1".into(),
        // Every sixth request also had a shadow decision, "allow".
        shadow_decision: n.is_multiple_of(6).then(|| "allow".into()),
        response_digest: (!n.is_multiple_of(4))
            .then(|| crate::files::sha256_hex(n.to_string().as_bytes())),
        // Every fifth request was under a restricted grant.
        restricted: n.is_multiple_of(5),
        // Every seventh provider answered with an error; every eighth read was pseudonymised.
        upstream_status: n.is_multiple_of(7).then_some(500),
        pseudonymised: n.is_multiple_of(8),
        ..Entry::default()
    }
}

async fn start(store: &Store, node: &str) -> (AuditLog, AuditWriter) {
    AuditLog::start(store.clone(), AuditConfig::new(node))
        .await
        .unwrap()
}

async fn append_n(log: &AuditLog, range: std::ops::Range<usize>) -> Vec<Committed> {
    let mut out = Vec::new();
    for n in range {
        out.push(log.append(entry(n)).await.unwrap());
    }
    out
}

async fn exec(store: &Store, sql: &'static str) {
    sqlx::raw_sql(sql).execute(store.pool()).await.unwrap();
}

async fn concurrent_appends_form_one_chain(store: Store) {
    let (log, writer) = start(&store, "n1").await;
    let mut tasks = Vec::new();
    for t in 0..50 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..20 {
                seqs.push(log.append(entry(t * 20 + i)).await.unwrap().seq);
            }
            seqs
        }));
    }
    let mut seqs = BTreeSet::new();
    for task in tasks {
        seqs.extend(task.await.unwrap());
    }
    assert_eq!(seqs, (1..=1000).collect::<BTreeSet<i64>>());
    let stats = log.stats();
    assert_eq!(stats.committed, 1000);
    assert_eq!(stats.failed_batches, 0);
    assert!(stats.batches < 1000, "no group commit happened: {stats:?}");
    assert_eq!(stats.queue_depth, 0);
    drop(log);
    writer.finish().await;

    let report = verify(&store, None).await.unwrap();
    assert!(report.intact(), "{report}");
    assert_eq!(report.to_string(), "node n1: 1000 records, chain intact\n");
    assert_eq!(count(&store).await.unwrap(), 1000);
}
both!(
    concurrent_appends_sqlite,
    concurrent_appends_pg,
    concurrent_appends_form_one_chain
);

async fn tampering_is_detected(store: Store) {
    let (log, writer) = start(&store, "n1").await;
    append_n(&log, 0..12).await;
    let (other, other_writer) = start(&store, "n2").await;
    append_n(&other, 100..103).await;
    drop((log, other));
    writer.finish().await;
    other_writer.finish().await;
    assert!(verify(&store, None).await.unwrap().intact());

    exec(
        &store,
        "UPDATE audit_log SET officer = 'mallory' WHERE node = 'n1' AND seq = 4",
    )
    .await;
    let report = verify(&store, None).await.unwrap();
    assert!(!report.intact());
    assert_eq!(report.nodes[0].broken_at.as_ref().unwrap().0, 4, "{report}");
    assert!(report.nodes[1].broken_at.is_none(), "{report}");
    assert!(
        report
            .to_string()
            .starts_with("node n1: broken at seq 4: hash"),
        "{report}"
    );
    // The other node's chain is unaffected and verifiable alone.
    assert!(verify(&store, Some("n2")).await.unwrap().intact());

    exec(
        &store,
        "DELETE FROM audit_log WHERE node = 'n2' AND seq = 2",
    )
    .await;
    let report = verify(&store, Some("n2")).await.unwrap();
    assert_eq!(report.nodes[0].broken_at.as_ref().unwrap().0, 2, "{report}");

    // Hiding an access from a data subject's report breaks the chain too.
    exec(
        &store,
        "DELETE FROM audit_subjects WHERE node = 'n1' AND seq = 9",
    )
    .await;
    exec(
        &store,
        "UPDATE audit_log SET officer = 'officer-3' WHERE node = 'n1' AND seq = 4",
    )
    .await;
    let report = verify(&store, Some("n1")).await.unwrap();
    assert_eq!(report.nodes[0].broken_at.as_ref().unwrap().0, 9, "{report}");
}
both!(tampering_sqlite, tampering_pg, tampering_is_detected);

async fn failed_commit_fails_closed_and_recovers(store: Store) {
    let (log, writer) = start(&store, "n1").await;
    append_n(&log, 0..3).await;
    match store.backend() {
        crate::store::Backend::Sqlite => {
            exec(
                &store,
                "CREATE TRIGGER audit_block BEFORE INSERT ON audit_log \
                 BEGIN SELECT RAISE(ABORT, 'blocked'); END;",
            )
            .await
        }
        crate::store::Backend::Postgres => {
            exec(
                &store,
                "CREATE FUNCTION audit_block() RETURNS trigger AS $$ \
                 BEGIN RAISE EXCEPTION 'blocked'; END $$ LANGUAGE plpgsql; \
                 CREATE TRIGGER audit_block BEFORE INSERT ON audit_log \
                 FOR EACH ROW EXECUTE FUNCTION audit_block();",
            )
            .await
        }
    }
    let err = log.append(entry(3)).await.unwrap_err();
    assert!(matches!(err, AuditError::CommitFailed), "{err:?}");
    assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    assert!(log.stats().failing);
    assert!(log.stats().failed_batches >= 1);

    match store.backend() {
        crate::store::Backend::Sqlite => exec(&store, "DROP TRIGGER audit_block").await,
        crate::store::Backend::Postgres => {
            exec(&store, "DROP TRIGGER audit_block ON audit_log").await
        }
    }
    // Nobody sends anything: the writer finds out by itself that it can write again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while log.stats().failing {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer did not recover by itself"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // seq 4 is the event that records the outage.
    let next = log.append(entry(4)).await.unwrap();
    assert_eq!(next.seq, 5);

    // A request id used twice: only the repeat is refused (an event says so),
    // the node stays ready and the chain carries on without a gap.
    let mut again = entry(5);
    log.append(again.clone()).await.unwrap();
    again.case_ref = None;
    assert!(matches!(
        log.append(again).await,
        Err(AuditError::InvalidEntry(_))
    ));
    assert!(!log.stats().failing);
    assert_eq!(log.append(entry(6)).await.unwrap().seq, 8);
    drop(log);
    writer.finish().await;
    let report = verify(&store, None).await.unwrap();
    assert_eq!(report.to_string(), "node n1: 8 records, chain intact\n");
    let mut records = query(&store, &Filter::default()).await.unwrap();
    records.sort_by_key(|r| r.seq);
    let paths: Vec<String> = records.into_iter().map(|r| r.entry.path).collect();
    assert_eq!(paths[3], super::event::AUDIT_RECOVERED);
    assert!(paths[6] == super::event::ENTRY_REFUSED, "{paths:?}");
}
both!(
    failed_commit_sqlite,
    failed_commit_pg,
    failed_commit_fails_closed_and_recovers
);

/// An entry the database refuses (here: a request id already in the log) is
/// refused alone: the rest of its batch commits, an event records the
/// refusal, and the node does not turn failing.
async fn one_bad_entry_does_not_fail_its_batch(store: Store) {
    let (log, writer) = start(&store, "n1").await;
    let first = entry(0);
    log.append(first.clone()).await.unwrap();
    let mut tasks = Vec::new();
    for n in 1..64 {
        let log = log.clone();
        let e = if n == 32 {
            Entry {
                case_ref: None,
                ..first.clone()
            }
        } else {
            entry(n)
        };
        tasks.push(tokio::spawn(async move { (n, log.append(e).await) }));
    }
    for t in tasks {
        let (n, result) = t.await.unwrap();
        match n {
            32 => assert!(
                matches!(result, Err(AuditError::InvalidEntry(_))),
                "{result:?}"
            ),
            _ => assert!(result.is_ok(), "entry {n}: {result:?}"),
        }
    }
    assert!(!log.stats().failing);
    drop(log);
    writer.finish().await;
    let records = query(&store, &Filter::default()).await.unwrap();
    assert_eq!(records.len(), 64, "63 entries and the refusal event");
    assert_eq!(
        records
            .iter()
            .filter(|r| r.entry.path == super::event::ENTRY_REFUSED)
            .count(),
        1
    );
    assert!(verify(&store, None).await.unwrap().intact());
}
both!(
    one_bad_entry_sqlite,
    one_bad_entry_pg,
    one_bad_entry_does_not_fail_its_batch
);

async fn restart_continues_the_chain(store: Store) {
    let (log, writer) = start(&store, "n1").await;
    let first = append_n(&log, 0..3).await;
    drop(log);
    writer.finish().await;

    let (log, writer) = start(&store, "n1").await;
    let next = log.append(entry(3)).await.unwrap();
    assert_eq!(next.seq, 4);
    let records = query(&store, &Filter::default()).await.unwrap();
    assert_eq!(records[3].prev_hash, first[2].hash);

    // After close nothing new is taken, and the writer stops although a handle lives.
    log.close();
    writer.finish().await;
    assert!(matches!(
        log.append(entry(9)).await,
        Err(AuditError::Closed)
    ));
    assert!(verify(&store, Some("n1")).await.unwrap().intact());
}
both!(restart_sqlite, restart_pg, restart_continues_the_chain);

async fn filters_select_records(store: Store) {
    let (log, writer) = start(&store, "n1").await;
    append_n(&log, 0..30).await;
    let mut odd = entry(30);
    odd.ts = "2026-11-03T12:00:00+02:00".into(); // 10:00 UTC
    odd.subjects = vec!["P\0X".into(), "P\0X".into()];
    odd.agency = None;
    log.append(odd).await.unwrap();
    drop(log);
    writer.finish().await;

    let q = |f: Filter| {
        let store = store.clone();
        async move { query(&store, &f).await.unwrap() }
    };
    // entry(n) names P{n} and P{n % 7}: P3 is in 3, 10, 17, 24.
    let by_subject = q(Filter {
        subject: Some("P3".into()),
        ..Filter::default()
    })
    .await;
    let cases: Vec<_> = by_subject
        .iter()
        .map(|r| r.entry.case_ref.clone().unwrap())
        .collect();
    assert_eq!(cases, ["case-3", "case-10", "case-17", "case-24"]);

    let by_agency = q(Filter {
        agency: Some("agency-1".into()),
        ..Filter::default()
    })
    .await;
    assert_eq!(by_agency.len(), 10);
    assert!(by_agency
        .iter()
        .all(|r| r.entry.agency.as_deref() == Some("agency-1")));

    let by_officer_denied = q(Filter {
        officer: Some("officer-0".into()),
        decision: Some("deny".into()),
        ..Filter::default()
    })
    .await;
    // n % 5 == 0 and n % 4 == 0: 0 and 20.
    assert_eq!(by_officer_denied.len(), 2);

    // Shadow "allow" (n % 6 == 0) against an enforced deny (n % 4 == 0): 0, 12, 24.
    let shadow_diff = q(Filter {
        shadow_diff: true,
        ..Filter::default()
    })
    .await;
    let cases: Vec<_> = shadow_diff
        .iter()
        .map(|r| r.entry.case_ref.clone().unwrap())
        .collect();
    assert_eq!(cases, ["case-0", "case-12", "case-24"]);

    let window = q(Filter {
        since: Some("2026-11-03T09:00:10Z".into()),
        until: Some("2026-11-03T11:00:20+02:00".into()),
        ..Filter::default()
    })
    .await;
    let cases: Vec<_> = window
        .iter()
        .map(|r| r.entry.case_ref.clone().unwrap())
        .collect();
    assert_eq!(cases.len(), 10, "{cases:?}");
    assert_eq!(cases[0], "case-10");

    let limited = q(Filter {
        limit: Some(5),
        node: Some("n1".into()),
        ..Filter::default()
    })
    .await;
    assert_eq!(limited.len(), 5);
    assert_eq!(
        q(Filter {
            node: Some("n9".into()),
            ..Filter::default()
        })
        .await
        .len(),
        0
    );

    // The normalised timestamp and scrubbed subjects are what was stored and hashed.
    let odd = q(Filter {
        since: Some("2026-11-03T10:00:00Z".into()),
        ..Filter::default()
    })
    .await;
    assert_eq!(odd.len(), 1);
    assert_eq!(odd[0].entry.ts, "2026-11-03T10:00:00.000000Z");
    assert_eq!(odd[0].entry.subjects, ["P\u{FFFD}X", "P\u{FFFD}X"]);
    let by_subject = q(Filter {
        subject: Some("P\u{FFFD}X".into()),
        ..Filter::default()
    })
    .await;
    assert_eq!(by_subject.len(), 1);

    let bad = query(
        &store,
        &Filter {
            since: Some("yesterday".into()),
            ..Filter::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(bad.status(), http::StatusCode::BAD_REQUEST);
    assert!(verify(&store, None).await.unwrap().intact());
}
both!(filters_sqlite, filters_pg, filters_select_records);

async fn export_writes_json_lines(store: Store) {
    let (log, writer) = start(&store, "n1").await;
    append_n(&log, 0..23).await;
    drop(log);
    writer.finish().await;

    let mut out = Vec::new();
    // A small page size makes the keyset cursor cross pages.
    let n = export_paged(&store, &Filter::default(), &mut out, 4)
        .await
        .unwrap();
    assert_eq!(n, 23);
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 23);
    let required = [
        "seq",
        "id",
        "ts",
        "node",
        "agency",
        "certificate",
        "officer",
        "purpose",
        "legal_basis",
        "case_ref",
        "consent_ref",
        "token_id",
        "provider",
        "service",
        "operation",
        "method",
        "path",
        "subjects",
        "fields",
        "decision",
        "reason",
        "status",
        "policy_version",
        "prev_hash",
        "hash",
    ];
    for line in &lines {
        let obj = line.as_object().unwrap();
        for key in required {
            assert!(obj.contains_key(key), "missing {key} in {line}");
        }
        assert!(obj["consent_ref"].is_null());
    }
    let seqs: Vec<i64> = lines.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=23).collect::<Vec<_>>());

    // An exported line still verifies on its own.
    let record: Record = serde_json::from_value(lines[7].clone()).unwrap();
    assert_eq!(record.expected_hash().unwrap(), record.hash);
    assert_eq!(record.prev_hash, lines[6]["hash"].as_str().unwrap());

    let mut out = Vec::new();
    let filter = Filter {
        limit: Some(6),
        ..Filter::default()
    };
    assert_eq!(export_paged(&store, &filter, &mut out, 4).await.unwrap(), 6);
    let mut out = Vec::new();
    assert_eq!(
        export(&store, &Filter::default(), &mut out).await.unwrap(),
        23
    );
}
both!(export_sqlite, export_pg, export_writes_json_lines);

#[test]
fn canonical_form_is_fixed() {
    let e = Entry {
        id: "01900000-0000-7000-8000-000000000000".into(),
        ts: "2026-11-03T09:00:00.000000Z".into(),
        method: "GET".into(),
        path: "/v1/x".into(),
        decision: "deny".into(),
        status: 401,
        policy_version: "v1".into(),
        ..Entry::default()
    };
    let json = canonical_json(1, "n1", &e, GENESIS_HASH).unwrap();
    assert_eq!(
        json,
        format!(
            "{{\"seq\":1,\"node\":\"n1\",\"id\":\"01900000-0000-7000-8000-000000000000\",\
             \"ts\":\"2026-11-03T09:00:00.000000Z\",\"agency\":null,\"certificate\":null,\
             \"officer\":null,\"purpose\":null,\"legal_basis\":null,\"case_ref\":null,\
             \"consent_ref\":null,\"token_id\":null,\"provider\":null,\"service\":null,\
             \"operation\":null,\"method\":\"GET\",\"path\":\"/v1/x\",\"subjects\":[],\"fields\":[],\
             \"decision\":\"deny\",\"reason\":null,\"status\":401,\"policy_version\":\"v1\",\
             \"prev_hash\":\"{GENESIS_HASH}\"}}"
        )
    );
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(format!("{GENESIS_HASH}\n{json}").as_bytes());
    let hash = chain_hash(1, "n1", &e, GENESIS_HASH).unwrap();
    assert_eq!(hash, hex::encode(ctx.finish().as_ref()));
    let record = Record::chain(1, "n1", e, GENESIS_HASH).unwrap();
    assert_eq!(record.hash, hash);
}

#[test]
fn a_shadow_decision_is_hashed_only_when_present() {
    let mut e = Entry {
        id: "01900000-0000-7000-8000-000000000000".into(),
        ts: "2026-11-03T09:00:00.000000Z".into(),
        method: "GET".into(),
        path: "/v1/x".into(),
        decision: "deny".into(),
        status: 403,
        policy_version: "v1".into(),
        ..Entry::default()
    };
    let without = chain_hash(1, "n1", &e, GENESIS_HASH).unwrap();
    e.shadow_decision = Some("allow".into());
    let json = canonical_json(1, "n1", &e, GENESIS_HASH).unwrap();
    assert!(
        json.contains("\"policy_version\":\"v1\",\"shadow_decision\":\"allow\",\"prev_hash\""),
        "{json}"
    );
    assert_ne!(chain_hash(1, "n1", &e, GENESIS_HASH).unwrap(), without);
}

#[test]
fn timestamps_are_normalised() {
    assert_eq!(
        record::normalise_ts("2026-01-02T03:04:05.5+02:00").as_deref(),
        Some("2026-01-02T01:04:05.500000Z")
    );
    assert_eq!(record::normalise_ts("2026-01-02"), None);
    assert_eq!(now_ts().len(), "2026-01-02T01:04:05.500000Z".len());
}

#[tokio::test]
async fn bad_entries_are_refused_before_queueing() {
    let (store, _dir) = sqlite_store().await;
    let (log, writer) = start(&store, "n1").await;
    let mut e = entry(1);
    e.ts = "now".into();
    assert!(matches!(
        log.append(e).await,
        Err(AuditError::InvalidEntry(_))
    ));
    drop(log);
    writer.finish().await;
    assert_eq!(count(&store).await.unwrap(), 0);
}

/// Throughput of the writer on SQLite: `cargo test --lib audit::tests::throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check"]
async fn throughput_sqlite() {
    let (store, _dir) = sqlite_store().await;
    let (log, writer) = start(&store, "n1").await;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for t in 0..1000 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                log.append(entry(t * 20 + i)).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    let stats = log.stats();
    eprintln!(
        "{} records in {} batches, {:.0} records/s",
        stats.committed,
        stats.batches,
        stats.committed as f64 / elapsed.as_secs_f64()
    );
    drop(log);
    writer.finish().await;
}

#[test]
fn write_ahead_members_are_hashed_only_when_set() {
    let mut e = Entry {
        id: "01900000-0000-7000-8000-000000000000".into(),
        ts: "2026-11-03T09:00:00.000000Z".into(),
        method: "POST".into(),
        path: "/v1/x".into(),
        decision: "allow".into(),
        status: 201,
        policy_version: "v1".into(),
        ..Entry::default()
    };
    let without = chain_hash(1, "n1", &e, GENESIS_HASH).unwrap();
    let plain = canonical_json(1, "n1", &e, GENESIS_HASH).unwrap();
    for member in ["phase", "attempt_id", "request_digest", "written"] {
        assert!(!plain.contains(member), "{plain}");
    }
    e.phase = Some("outcome".into());
    e.attempt_id = Some("a-1".into());
    e.request_digest = Some("cd".repeat(32));
    e.written = vec!["person_id".into()];
    let json = canonical_json(1, "n1", &e, GENESIS_HASH).unwrap();
    assert!(
        json.ends_with(&format!(
            "\"policy_version\":\"v1\",\"phase\":\"outcome\",\"attempt_id\":\"a-1\",\
             \"request_digest\":\"{}\",\"written\":[\"person_id\"],\"prev_hash\":\"{GENESIS_HASH}\"}}",
            "cd".repeat(32)
        )),
        "{json}"
    );
    assert_ne!(chain_hash(1, "n1", &e, GENESIS_HASH).unwrap(), without);
}

#[test]
fn digest_and_restricted_are_hashed_only_when_set() {
    let mut e = Entry {
        id: "01900000-0000-7000-8000-000000000000".into(),
        ts: "2026-11-03T09:00:00.000000Z".into(),
        method: "GET".into(),
        path: "/v1/x".into(),
        decision: "allow".into(),
        status: 200,
        policy_version: "v1".into(),
        ..Entry::default()
    };
    let plain = canonical_json(1, "n1", &e, GENESIS_HASH).unwrap();
    assert!(!plain.contains("response_digest") && !plain.contains("restricted"));
    let without = chain_hash(1, "n1", &e, GENESIS_HASH).unwrap();
    e.response_digest = Some("ab".repeat(32));
    e.restricted = true;
    let json = canonical_json(1, "n1", &e, GENESIS_HASH).unwrap();
    assert!(
        json.contains(&format!(
            "\"policy_version\":\"v1\",\"response_digest\":\"{}\",\"restricted\":true,\"prev_hash\"",
            "ab".repeat(32)
        )),
        "{json}"
    );
    assert_ne!(chain_hash(1, "n1", &e, GENESIS_HASH).unwrap(), without);
    // An export line without the new members (written before them) still reads and verifies.
    let record = Record::chain(
        1,
        "n1",
        Entry {
            response_digest: None,
            restricted: false,
            ..e
        },
        GENESIS_HASH,
    )
    .unwrap();
    let mut line: serde_json::Value = serde_json::to_value(&record).unwrap();
    let map = line.as_object_mut().unwrap();
    map.remove("response_digest");
    map.remove("restricted");
    let back: Record = serde_json::from_value(line).unwrap();
    assert_eq!(back.expected_hash().unwrap(), record.hash);
}

async fn digest_and_restricted_are_stored(store: Store) {
    let (log, writer) = start(&store, "n1").await;
    let entries: Vec<Entry> = (0..10).map(entry).collect();
    for e in &entries {
        log.append(e.clone()).await.unwrap();
    }
    drop(log);
    writer.finish().await;
    let records = query(&store, &Filter::default()).await.unwrap();
    let got: Vec<&Entry> = records.iter().map(|r| &r.entry).collect();
    assert_eq!(got, entries.iter().collect::<Vec<_>>());
    assert!(records[1].entry.response_digest.is_some());
    assert!(records[0].entry.restricted && !records[1].entry.restricted);
    assert!(verify(&store, None).await.unwrap().intact());
    // The new columns are covered by the hash.
    exec(
        &store,
        "UPDATE audit_log SET restricted = 0 WHERE node = 'n1' AND seq = 6",
    )
    .await;
    let report = verify(&store, None).await.unwrap();
    assert_eq!(report.nodes[0].broken_at.as_ref().unwrap().0, 6, "{report}");
    exec(
        &store,
        "UPDATE audit_log SET restricted = 1 WHERE node = 'n1' AND seq = 6",
    )
    .await;
    exec(
        &store,
        "UPDATE audit_log SET response_digest = NULL WHERE node = 'n1' AND seq = 2",
    )
    .await;
    let report = verify(&store, None).await.unwrap();
    assert_eq!(report.nodes[0].broken_at.as_ref().unwrap().0, 2, "{report}");
}
both!(digest_sqlite, digest_pg, digest_and_restricted_are_stored);

async fn purpose_service_and_restricted_filters(store: Store) {
    let (log, writer) = start(&store, "n1").await;
    for n in 0..20 {
        let mut e = entry(n);
        if n % 2 == 0 {
            e.purpose = Some("border-control".into());
            e.service = Some("visas".into());
        }
        log.append(e).await.unwrap();
    }
    drop(log);
    writer.finish().await;
    let q = |f: Filter| {
        let store = store.clone();
        async move { query(&store, &f).await.unwrap() }
    };
    let by_purpose = q(Filter {
        purpose: Some("border-control".into()),
        ..Filter::default()
    })
    .await;
    assert_eq!(by_purpose.len(), 10);
    assert!(by_purpose
        .iter()
        .all(|r| r.entry.purpose.as_deref() == Some("border-control")));
    let by_service = q(Filter {
        service: Some("persons".into()),
        purpose: Some("visa-check".into()),
        ..Filter::default()
    })
    .await;
    assert_eq!(by_service.len(), 10);
    assert_eq!(
        q(Filter {
            service: Some("persons".into()),
            purpose: Some("border-control".into()),
            ..Filter::default()
        })
        .await
        .len(),
        0
    );
    // Restricted records (every fifth: 0, 5, 10, 15) at or after the time are left out.
    let hidden = q(Filter {
        hide_restricted_since: Some(entry(10).ts),
        ..Filter::default()
    })
    .await;
    let seqs: Vec<i64> = hidden
        .iter()
        .filter(|r| r.entry.restricted)
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, vec![1, 6], "restricted records before the time stay");
    assert_eq!(hidden.len(), 18);
    assert!(matches!(
        query(
            &store,
            &Filter {
                hide_restricted_since: Some("yesterday".into()),
                ..Filter::default()
            }
        )
        .await,
        Err(AuditError::InvalidFilter(_))
    ));
}
both!(
    filters2_sqlite,
    filters2_pg,
    purpose_service_and_restricted_filters
);

async fn verify_from_and_reordering(store: Store) {
    let (log, writer) = start(&store, "n1").await;
    append_n(&log, 0..12).await;
    drop(log);
    writer.finish().await;
    // A record changed before --from is not looked at; the prev_hash at --from is taken as given.
    exec(
        &store,
        "UPDATE audit_log SET officer = 'mallory' WHERE node = 'n1' AND seq = 3",
    )
    .await;
    assert_eq!(
        verify(&store, None).await.unwrap().nodes[0]
            .broken_at
            .as_ref()
            .unwrap()
            .0,
        3
    );
    let from4 = verify_from(&store, None, None, Some(4)).await.unwrap();
    assert!(from4.intact(), "{from4}");
    assert_eq!(from4.nodes[0].records, 9);
    assert_eq!(from4.nodes[0].first_seq, 4);
    assert_eq!(
        from4.to_string(),
        "node n1: 9 records from seq 4, chain intact\n"
    );
    // Reordered in the database: records 7 and 8 swap places (their seq numbers swapped).
    for sql in [
        "UPDATE audit_log SET seq = -7 WHERE node = 'n1' AND seq = 7",
        "UPDATE audit_log SET seq = 7 WHERE node = 'n1' AND seq = 8",
        "UPDATE audit_log SET seq = 8 WHERE node = 'n1' AND seq = -7",
        "UPDATE audit_subjects SET seq = -7 WHERE node = 'n1' AND seq = 7",
        "UPDATE audit_subjects SET seq = 7 WHERE node = 'n1' AND seq = 8",
        "UPDATE audit_subjects SET seq = 8 WHERE node = 'n1' AND seq = -7",
    ] {
        exec(&store, sql).await;
    }
    let report = verify_from(&store, None, None, Some(4)).await.unwrap();
    let (seq, why) = report.nodes[0].broken_at.clone().unwrap();
    assert_eq!(seq, 7, "{report}");
    assert!(why.contains("prev_hash") || why.contains("hash"), "{why}");
    // Starting past a missing record names it.
    exec(
        &store,
        "DELETE FROM audit_subjects WHERE node = 'n1' AND seq = 10",
    )
    .await;
    exec(
        &store,
        "DELETE FROM audit_log WHERE node = 'n1' AND seq = 10",
    )
    .await;
    let report = verify_from(&store, None, None, Some(9)).await.unwrap();
    assert_eq!(
        report.nodes[0].broken_at.as_ref().unwrap().0,
        10,
        "{report}"
    );
}
both!(
    verify_from_sqlite,
    verify_from_pg,
    verify_from_and_reordering
);

async fn archive_keeps_the_chain_verifiable(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let key = AuditKey::load_or_create(&dir.path().join("k")).unwrap();
    let (log, writer) = start(&store, "n1").await;
    append_n(&log, 0..20).await;
    drop(log);
    writer.finish().await;
    let (other, other_writer) = start(&store, "n2").await;
    append_n(&other, 0..5).await;
    drop(other);
    other_writer.finish().await;

    // Records 1..=11 of n1 are older than record 12; n2 has no checkpoint and no key here.
    let out = dir.path().join("archive.jsonl");
    let report = archive::archive(&store, &entry(11).ts, &out, Some(("n1", &key)))
        .await
        .unwrap();
    assert_eq!(report.archived.len(), 1, "{report}");
    let a = &report.archived[0];
    assert_eq!((a.node.as_str(), a.first_seq, a.last_seq), ("n1", 1, 11));
    assert_eq!(report.skipped.len(), 1, "{report}");
    assert_eq!(count(&store).await.unwrap(), 9 + 5);
    let subjects: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM audit_subjects WHERE node = 'n1' AND seq <= 11")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(subjects, 0);

    // The database verifies across the cut, with the archive's signature checked.
    let report = verify_with_key(&store, Some("n1"), Some(key.public_hex()))
        .await
        .unwrap();
    assert!(report.intact(), "{report}");
    assert_eq!(
        (report.nodes[0].records, report.nodes[0].first_seq),
        (9, 12)
    );
    // The archive verifies offline, its cut checkpoint included.
    let cps = std::fs::read(archive::checkpoints_path(&out)).unwrap();
    let offline = offline::verify_export(
        std::fs::File::open(&out)
            .map(std::io::BufReader::new)
            .unwrap(),
        Some(&cps[..]),
        Some(key.public_hex()),
    )
    .unwrap();
    assert!(offline.intact(), "{offline}");
    assert_eq!(
        (offline.nodes[0].records, offline.nodes[0].checkpoints),
        (11, 1)
    );
    // The writer goes on after the cut.
    let (log, writer) = start(&store, "n1").await;
    assert_eq!(log.append(entry(20)).await.unwrap().seq, 21);
    drop(log);
    writer.finish().await;
    assert!(verify(&store, None).await.unwrap().intact());
    // A second archive takes the rest, and a restart still continues the chain.
    let out2 = dir.path().join("archive2.jsonl");
    let report = archive::archive(&store, "2100-01-01T00:00:00Z", &out2, Some(("n1", &key)))
        .await
        .unwrap();
    assert_eq!(report.archived[0].first_seq, 12, "{report}");
    assert_eq!(report.archived[0].last_seq, 21, "{report}");
    assert!(
        archive::archive(&store, "2100-01-01T00:00:00Z", &out2, Some(("n1", &key)))
            .await
            .is_ok()
    );
    let (log, writer) = start(&store, "n1").await;
    assert_eq!(log.append(entry(21)).await.unwrap().seq, 22);
    drop(log);
    writer.finish().await;
    let report = verify(&store, None).await.unwrap();
    assert!(report.intact(), "{report}");

    // The first remaining record must link to the archived checkpoint.
    exec(
        &store,
        "UPDATE audit_log SET prev_hash = '00' WHERE node = 'n1' AND seq = 22",
    )
    .await;
    let report = verify(&store, Some("n1")).await.unwrap();
    let (seq, why) = report.nodes[0].broken_at.clone().unwrap();
    assert_eq!(seq, 22);
    assert!(why.contains("archived checkpoint"), "{why}");
    // A forged archive row (wrong signature) is named.
    exec(
        &store,
        "UPDATE audit_archives SET hash = 'ff' WHERE node = 'n1' AND seq = 21",
    )
    .await;
    let report = verify(&store, Some("n1")).await.unwrap();
    assert!(
        report.nodes[0]
            .broken_at
            .as_ref()
            .unwrap()
            .1
            .contains("archive checkpoint"),
        "{report}"
    );
}
both!(
    archive_sqlite,
    archive_pg,
    archive_keeps_the_chain_verifiable
);

async fn archive_refuses_a_broken_chain(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let key = AuditKey::load_or_create(&dir.path().join("k")).unwrap();
    let (log, writer) = start(&store, "n1").await;
    append_n(&log, 0..6).await;
    drop(log);
    writer.finish().await;
    exec(
        &store,
        "UPDATE audit_log SET officer = 'mallory' WHERE node = 'n1' AND seq = 2",
    )
    .await;
    let out = dir.path().join("a.jsonl");
    let err = archive::archive(&store, &entry(4).ts, &out, Some(("n1", &key)))
        .await
        .unwrap_err();
    assert!(matches!(err, AuditError::ArchiveRefused(_)), "{err}");
    assert_eq!(count(&store).await.unwrap(), 6);
    assert!(!out.exists());
}
both!(
    archive_refuses_sqlite,
    archive_refuses_pg,
    archive_refuses_a_broken_chain
);

async fn restricted_accesses_wait_in_the_report(store: Store) {
    let (log, writer) = start(&store, "n1").await;
    for (id, restricted, agency) in [("open", false, "mia-border"), ("secret", true, "ssg")] {
        log.append(Entry {
            id: id.into(),
            ts: now_ts(),
            agency: Some(agency.into()),
            method: "GET".into(),
            path: "/v1/registry/persons/RF-1".into(),
            subjects: vec!["RF-1".into()],
            decision: "allow".into(),
            status: 200,
            policy_version: "v".into(),
            restricted,
            ..Entry::default()
        })
        .await
        .unwrap();
    }
    drop(log);
    writer.finish().await;
    let names = |_: report::NameKind, _: &str| None;
    let r = report::subject_report(&store, "RF-1", &names)
        .await
        .unwrap();
    let ids: Vec<&str> = r.accesses.iter().map(|a| a.record_id.as_str()).collect();
    assert_eq!(ids, ["open"]);
    assert!(r.to_string().contains("restricted grants"), "{r}");
    assert!(!r.to_string().contains("ssg"));
    // After the delay the access appears.
    let options = report::ReportOptions {
        restricted_delay: std::time::Duration::ZERO,
        ..Default::default()
    };
    let r = report::subject_report_with(&store, "RF-1", &options, &names)
        .await
        .unwrap();
    assert_eq!(r.accesses.len(), 2);
    // An agency's own view.
    let options = report::ReportOptions {
        restricted_delay: std::time::Duration::ZERO,
        agency: Some("ssg".into()),
        ..Default::default()
    };
    let r = report::subject_report_with(&store, "RF-1", &options, &names)
        .await
        .unwrap();
    assert_eq!(r.accesses.len(), 1);
    // Auditors always see both.
    let all = query(
        &store,
        &Filter {
            subject: Some("RF-1".into()),
            ..Filter::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(all.len(), 2);
}
both!(
    restricted_report_sqlite,
    restricted_report_pg,
    restricted_accesses_wait_in_the_report
);

#[test]
fn upstream_status_and_pseudonymised_are_hashed_only_when_set() {
    let mut e = Entry {
        id: "01900000-0000-7000-8000-000000000000".into(),
        ts: "2026-11-03T09:00:00.000000Z".into(),
        method: "GET".into(),
        path: "/v1/x".into(),
        decision: "allow".into(),
        status: 502,
        policy_version: "v1".into(),
        ..Entry::default()
    };
    let plain = canonical_json(1, "n1", &e, GENESIS_HASH).unwrap();
    assert!(!plain.contains("upstream_status") && !plain.contains("pseudonymised"));
    let without = chain_hash(1, "n1", &e, GENESIS_HASH).unwrap();
    e.upstream_status = Some(500);
    e.pseudonymised = true;
    let json = canonical_json(1, "n1", &e, GENESIS_HASH).unwrap();
    assert!(
        json.contains("\"policy_version\":\"v1\",\"upstream_status\":500,\"pseudonymised\":true,\"prev_hash\""),
        "{json}"
    );
    assert_ne!(chain_hash(1, "n1", &e, GENESIS_HASH).unwrap(), without);
    // Serialised (export, auditors' API) only when set, and read back either way.
    let record = Record::chain(1, "n1", e, GENESIS_HASH).unwrap();
    let line = serde_json::to_string(&record).unwrap();
    let back: Record = serde_json::from_str(&line).unwrap();
    assert_eq!(back.expected_hash().unwrap(), record.hash);
    let old = Record::chain(
        1,
        "n1",
        Entry {
            upstream_status: None,
            pseudonymised: false,
            ..record.entry.clone()
        },
        GENESIS_HASH,
    )
    .unwrap();
    let line = serde_json::to_string(&old).unwrap();
    assert!(!line.contains("upstream_status") && !line.contains("pseudonymised"));
}

/// Every column of fully populated entries (hostile text, every script, the largest
/// status) and of bare ones reads back exactly as written, and the chain verifies: the
/// batch travels to the database as one JSON text.
async fn every_column_reads_back_as_written(store: Store) {
    let (log, writer) = start(&store, "n1").await;
    let hostile = "quote \" apostrophe ' backslash \\ tab \t newline \n ✓ ქართული 王 \u{1}";
    let full = |n: usize| Entry {
        officer: Some(format!("o-{n}'; DROP TABLE audit_log; --")),
        consent_ref: Some(hostile.into()),
        operation: Some("write".into()),
        method: "POST".into(),
        path: format!("/v1/register/persons/P{n}?q={hostile}"),
        status: u16::MAX,
        shadow_decision: Some("deny".into()),
        upstream_status: Some(599),
        phase: Some("outcome".into()),
        attempt_id: Some(uuid::Uuid::now_v7().to_string()),
        request_digest: Some("ef".repeat(32)),
        written: vec!["person_id".into(), hostile.into()],
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        restricted: true,
        pseudonymised: true,
        subjects: vec![hostile.into(), format!("P{n}"), format!("P{n}")],
        ..entry(n)
    };
    let bare = |n: usize| Entry {
        id: uuid::Uuid::now_v7().to_string(),
        ts: entry(n).ts,
        method: "GET".into(),
        path: "/".into(),
        decision: "deny".into(),
        policy_version: "v1".into(),
        ..Entry::default()
    };
    let entries: Vec<Entry> = (0..40)
        .map(|n| if n % 3 == 0 { bare(n) } else { full(n) })
        .collect();
    // Concurrent appends, so several share one batch.
    let tasks: Vec<_> = entries
        .iter()
        .map(|e| {
            let (log, e) = (log.clone(), e.clone());
            tokio::spawn(async move { log.append(e).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    drop(log);
    writer.finish().await;
    let mut got: Vec<Entry> = query(&store, &Filter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.entry)
        .collect();
    let mut want = entries.clone();
    for list in [&mut got, &mut want] {
        list.sort_by(|a, b| a.id.cmp(&b.id));
    }
    assert_eq!(got, want);
    assert!(verify(&store, None).await.unwrap().intact());
    let hits = query(
        &store,
        &Filter {
            subject: Some(hostile.into()),
            ..Filter::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        hits.len(),
        entries.iter().filter(|e| e.subjects.len() == 3).count()
    );
}
both!(
    every_column_sqlite,
    every_column_pg,
    every_column_reads_back_as_written
);
