//! One bad entry never breaks the log for others (issue 13, §3).
//!
//! A hostile agency sends validly signed tokens whose `sub`, `case`, `jti`
//! and `purpose` are thousands of characters long or hold NUL and control
//! characters, over-long paths and provider names, and auditors' API queries
//! naming such subjects — while another agency sends ordinary requests. On
//! PostgreSQL one such value used to make whole audit batches fail (the
//! btree index row limit, NUL in text). Every ordinary request must succeed,
//! every hostile one gets its refusal and its own record (values shortened
//! and escaped), and the node stays ready. The log's table and JSON-lines
//! outputs must not let any value forge a row or a line.

#![allow(clippy::unwrap_used)]

mod common;

use common::{Db, Rng, TestGateway};
use http::StatusCode;
use karibche::audit::{self, text, Filter};

const PERSON: &str = karibche::registry::EXAMPLE_PERSON_ID;

/// `n` random letters and digits: text PostgreSQL cannot compress below its index row limit.
fn noise(rng: &mut Rng, n: usize) -> String {
    const ABC: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    (0..n)
        .map(|_| ABC[rng.below(ABC.len() as u64) as usize] as char)
        .collect()
}

/// A token of `agency` with these claims, signed with its development key.
fn token(gw: &TestGateway, agency: &str, claims: serde_json::Value) -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut c = serde_json::json!({
        "iss": agency, "aud": "karibche", "sub": "officer-1", "purpose": "supervision",
        "iat": now, "nbf": now, "exp": now + 300, "jti": uuid::Uuid::now_v7().to_string(),
    });
    for (k, v) in claims.as_object().unwrap() {
        c[k] = v.clone();
    }
    karibche::devpki::token::issue_claims(
        &gw.config.data_path(&gw.config.tokens.keys_dir),
        agency,
        &c,
    )
    .unwrap()
}

/// One hostile request: what it sends, and the status it must get.
struct Hostile {
    what: &'static str,
    token: String,
    path: String,
    status: StatusCode,
}

fn hostile_requests(gw: &TestGateway, rng: &mut Rng) -> Vec<Hostile> {
    let long = noise(rng, 3000);
    let mut out = Vec::new();
    let records = "/v1/audit/records?limit=1".to_owned();
    for (claim, value) in [
        ("sub", long.clone()),
        ("sub", format!("officer\u{0}{}", noise(rng, 10))),
        (
            "sub",
            "a\nTIME 2026-01-01 forged-row\t\u{1b}[2J\u{1b}]0;pwned\u{7}".to_owned(),
        ),
        ("sub", format!("x\u{2028}{}", noise(rng, 5))),
        ("case", long.clone()),
        ("case", "C-1\r\nX: y".to_owned()),
        ("jti", long.clone()),
        ("jti", "j\u{0}t\u{0}i".to_owned()),
        ("purpose", long.clone()),
        ("purpose", "supervision\n".to_owned()),
    ] {
        out.push(Hostile {
            what: claim,
            token: token(gw, "pdps", serde_json::json!({ claim: value })),
            path: records.clone(),
            status: StatusCode::UNAUTHORIZED,
        });
    }
    let ok = token(gw, "pdps", serde_json::json!({}));
    let subject = |s: &str| format!("/v1/audit/records?subject={s}");
    for (what, path, status) in [
        (
            "subject",
            subject(&noise(rng, 2000)),
            StatusCode::BAD_REQUEST,
        ),
        ("subject", subject("RF-1%00%00"), StatusCode::BAD_REQUEST),
        ("subject", subject("RF-1%0AFORGED"), StatusCode::BAD_REQUEST),
        (
            "subject",
            subject("RF-1%E2%80%A8x"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "report subject",
            format!("/v1/audit/report?subject={}", noise(rng, 1000)),
            StatusCode::BAD_REQUEST,
        ),
        (
            "query value",
            format!("/v1/audit/records?officer={}", noise(rng, 300)),
            StatusCode::BAD_REQUEST,
        ),
        (
            "path",
            format!("/v1/registry/persons/{}", noise(rng, 5000)),
            StatusCode::URI_TOO_LONG,
        ),
        (
            "provider",
            format!("/v1/{}/{}", noise(rng, 1200), noise(rng, 700)),
            StatusCode::NOT_FOUND,
        ),
    ] {
        out.push(Hostile {
            what,
            token: ok.clone(),
            path,
            status,
        });
    }
    out
}

async fn hostile_values_are_refused_recorded_and_harm_no_one(gw: TestGateway) {
    let mut rng = Rng(0x005e_ed13);
    let hostile = hostile_requests(&gw, &mut rng);
    // Ordinary requests of another agency, concurrently, throughout.
    let normal = {
        let tokens: Vec<String> = (0..6)
            .map(|i| gw.officer_token("mia-border", &format!("officer-{i}"), "border-control"))
            .collect();
        let client = std::sync::Arc::new(gw.client("mia-border"));
        let mut tasks = Vec::new();
        for (i, token) in tokens.into_iter().enumerate() {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut ok = Vec::new();
                for _ in 0..8 {
                    let r = client
                        .get(&format!("/v1/registry/persons/{PERSON}"), Some(&token))
                        .await;
                    assert_eq!(r.status, StatusCode::OK, "officer {i}: {:?}", r.body);
                    ok.push(r.request_id());
                }
                ok
            }));
        }
        tasks
    };
    let client = std::sync::Arc::new(gw.client("pdps"));
    let mut attacks = Vec::new();
    for h in hostile {
        let client = client.clone();
        attacks.push(tokio::spawn(async move {
            let r = client.get(&h.path, Some(&h.token)).await;
            (h.what, h.status, r)
        }));
    }
    let mut refused = Vec::new();
    for a in attacks {
        let (what, want, r) = a.await.unwrap();
        assert_eq!(
            r.status,
            want,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.content_type(), "application/problem+json", "{what}");
        let problem = r.json();
        assert_eq!(problem["request_id"], r.request_id().as_str());
        refused.push((what, r.request_id()));
    }
    let mut ordinary = Vec::new();
    for t in normal {
        ordinary.extend(t.await.unwrap());
    }
    assert!(!gw.running.gateway.audit.stats().failing);
    assert_eq!(gw.readyz().await, StatusCode::OK);

    // Every request has its own record; hostile values are kept shortened and escaped.
    let records = audit::query(&gw.running.store, &Filter::default())
        .await
        .unwrap();
    let record = |id: &str| {
        records
            .iter()
            .find(|r| r.entry.id == id)
            .unwrap_or_else(|| panic!("request {id} has no record"))
    };
    for id in &ordinary {
        assert_eq!(record(id).entry.status, 200);
    }
    for (what, id) in &refused {
        let e = &record(id).entry;
        assert_eq!(e.agency.as_deref(), Some("pdps"), "{what}");
        for v in [
            &e.officer,
            &e.case_ref,
            &e.token_id,
            &e.purpose,
            &e.provider,
            &e.service,
        ]
        .into_iter()
        .flatten()
        .chain(&e.subjects)
        {
            assert!(v.chars().count() <= text::MAX_CLAIM_CHARS, "{what}: {v}");
            assert!(!v.chars().any(text::is_unsafe_char), "{what}: {v:?}");
        }
        assert!(e.path.chars().count() <= text::MAX_PATH_CHARS, "{what}");
        assert!(e.reason.is_some(), "{what}");
    }
    // The first hostile request: a 3000-character `sub`, kept as its first 127 characters and "…".
    let long_sub = &record(&refused[0].1).entry;
    assert_eq!(long_sub.reason.as_deref(), Some("token_claim_too_long"));
    assert!(long_sub.officer.as_deref().unwrap().ends_with('…'));
    let report = audit::verify(&gw.running.store, None).await.unwrap();
    assert!(report.intact(), "{report}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_harm_no_one_on_sqlite() {
    hostile_values_are_refused_recorded_and_harm_no_one(TestGateway::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_harm_no_one_on_postgres() {
    let Some(gw) = TestGateway::start_with(Db::Postgres).await else {
        return;
    };
    hostile_values_are_refused_recorded_and_harm_no_one(gw).await;
}

/// What the log holds is shown safely whoever wrote it: the command line's
/// table escapes control characters and its JSON lines escape U+2028/U+2029.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_query_output_cannot_be_forged_by_a_value() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("var");
    let store = karibche::store::Store::connect(&format!(
        "sqlite://{}",
        data.join("karibche.db").display()
    ))
    .await
    .unwrap();
    let (log, writer) = audit::AuditLog::start(store.clone(), audit::AuditConfig::new("n1"))
        .await
        .unwrap();
    // Written through the library, as a provider's answer or a future caller might.
    let forged = "o\n2026-01-01 00:00:00  n1#99  forged\t\u{1b}[31mred\u{1b}[0m\u{9b}2J\u{2028}\u{2029}\u{202e}";
    log.append(audit::Entry {
        id: uuid::Uuid::now_v7().to_string(),
        ts: audit::now_ts(),
        agency: Some("psda".into()),
        officer: Some(forged.into()),
        purpose: Some("identity-documentation".into()),
        method: "GET".into(),
        path: format!("/v1/registry/persons/{PERSON}"),
        subjects: vec![forged.into()],
        decision: "allow".into(),
        reason: Some(forged.into()),
        status: 200,
        policy_version: "v".into(),
        ..audit::Entry::default()
    })
    .await
    .unwrap();
    log.close();
    drop(log);
    writer.finish().await;
    store.close().await;

    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_karibche"))
            .args(["--data-dir", data.to_str().unwrap()])
            .args(args)
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let table = String::from_utf8(run(&["audit", "query"])).unwrap();
    assert_eq!(
        table.lines().count(),
        3,
        "header, one row, the count:\n{table}"
    );
    assert!(!table.contains('\u{1b}') && !table.contains('\t') && !table.contains('\u{9b}'));
    assert!(
        !table.chars().any(|c| c != '\n' && text::is_unsafe_char(c)),
        "{table:?}"
    );
    assert!(table.contains("o\\n2026-01-01"), "{table}");
    for out in [
        run(&["audit", "query", "--format", "jsonl"]),
        run(&["audit", "export"]),
    ] {
        let jsonl = String::from_utf8(out).unwrap();
        assert!(!jsonl.contains('\u{2028}') && !jsonl.contains('\u{2029}'));
        assert!(jsonl.contains("\\u2028") && jsonl.contains("\\u2029"));
        assert_eq!(jsonl.lines().count(), 1);
        let back: serde_json::Value = serde_json::from_str(jsonl.trim_end()).unwrap();
        assert_eq!(back["officer"], forged, "the value itself is kept");
    }
}
