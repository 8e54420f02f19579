//! Policy administration end to end: hot reload under load, broken edits,
//! the file watcher, reload audit events and shadow decisions, against the
//! real system over mutual TLS.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, leaf_paths, Db, TestGateway};
use http::StatusCode;
use karibche::audit::{self, Filter};
use karibche::policy::Policy;
use karibche::runtime::reload::{ReloadError, ReloadOutcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PERSON: &str = karibche::registry::EXAMPLE_PERSON_ID;
const BORDER: &str = "agencies/mia-border.toml";

/// A copy of the repository's policies the test may edit.
fn copy_policies() -> tempfile::TempDir {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let dir = tempfile::tempdir().unwrap();
    for sub in ["", "agencies"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        for e in std::fs::read_dir(repo.join(sub)).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), dir.path().join(sub).join(e.file_name())).unwrap();
            }
        }
    }
    dir
}

/// Replaces a policy file the way a deployment should: write beside it, then rename over it.
fn replace_file(dir: &Path, rel: &str, text: &str) {
    let target = dir.join(rel);
    let tmp = target.with_file_name(format!(
        ".{}.tmp",
        target.file_name().unwrap().to_str().unwrap()
    ));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &target).unwrap();
}

async fn start(policies: &Path) -> TestGateway {
    let dir: PathBuf = policies.to_path_buf();
    TestGateway::start_configured(Db::Sqlite, move |c, _| c.policies_dir = dir)
        .await
        .unwrap()
}

async fn all_records(gw: &TestGateway) -> Vec<audit::Record> {
    audit::query(&gw.running.store, &Filter::default())
        .await
        .unwrap()
}

async fn metrics_text(gw: &TestGateway) -> String {
    let mut s = tokio::net::TcpStream::connect(gw.running.started.admin)
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_loses_no_request_and_never_mixes_sets() {
    let policies = copy_policies();
    // Four clients as fast as they can go would meet the officer quota; this test is about reload.
    std::fs::remove_file(policies.path().join("limits.toml")).unwrap();
    let with_documents = std::fs::read_to_string(policies.path().join(BORDER)).unwrap();
    assert!(with_documents.contains("\"documents\", "));
    let without_documents = with_documents.replacen("\"documents\", ", "", 1);
    let v_a = Policy::load(policies.path()).unwrap().version().to_owned();
    replace_file(policies.path(), BORDER, &without_documents);
    let v_b = Policy::load(policies.path()).unwrap().version().to_owned();
    replace_file(policies.path(), BORDER, &with_documents);
    assert_ne!(v_a, v_b);

    let gw = Arc::new(start(policies.path()).await);
    assert_eq!(gw.running.started.policy_version, v_a);
    let token = gw.token("mia-border", "border-control", None);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (gw, token, stop, done) = (gw.clone(), token.clone(), stop.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let client = gw.client("mia-border");
            let mut replies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let reply = client
                    .send(
                        http::Method::GET,
                        &format!("/v1/registry/persons/{PERSON}"),
                        Some(&token),
                        None,
                    )
                    .await
                    .expect("no request may be lost to a reload");
                done.fetch_add(1, Ordering::Relaxed);
                replies.push(reply);
            }
            replies
        }));
    }

    let mut reloads = 0;
    for round in 0..12 {
        let text = if round % 2 == 0 {
            &without_documents
        } else {
            &with_documents
        };
        replace_file(policies.path(), BORDER, text);
        // The watcher may have swapped it in already; either way the result is this version.
        match gw.running.reload_policy().await.unwrap() {
            ReloadOutcome::Reloaded { .. } => reloads += 1,
            ReloadOutcome::Unchanged { .. } => {}
        }
        let want = if round % 2 == 0 { &v_b } else { &v_a };
        assert_eq!(gw.running.gateway.policy.load().version(), want);
        // Let some requests run under each set.
        let seen = done.load(Ordering::Relaxed);
        assert!(
            eventually(Duration::from_secs(20), async || {
                done.load(Ordering::Relaxed) >= seen + 3
            })
            .await,
            "timed out waiting for requests after a reload"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let mut replies = Vec::new();
    for c in clients {
        replies.extend(c.await.unwrap());
    }

    let records: HashMap<String, audit::Record> = all_records(&gw)
        .await
        .into_iter()
        .map(|r| (r.entry.id.clone(), r))
        .collect();
    let mut by_version: HashMap<String, usize> = HashMap::new();
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        let record = records
            .get(&reply.request_id())
            .expect("every answered request has its audit record");
        let version = &record.entry.policy_version;
        *by_version.entry(version.clone()).or_default() += 1;
        let body_has_documents = leaf_paths(&reply.json())
            .iter()
            .any(|p| p.starts_with("documents"));
        let logged_documents = record
            .entry
            .fields
            .iter()
            .any(|f| f.starts_with("documents"));
        // What was released and what was logged both match the one set the request was decided under.
        if version == &v_a {
            assert!(body_has_documents && logged_documents, "{record:?}");
        } else {
            assert_eq!(version, &v_b, "a request was decided under an unknown set");
            assert!(!body_has_documents && !logged_documents, "{record:?}");
        }
    }
    assert!(
        by_version.get(&v_a).is_some_and(|n| *n > 0),
        "{by_version:?}"
    );
    assert!(
        by_version.get(&v_b).is_some_and(|n| *n > 0),
        "{by_version:?}"
    );
    assert!(replies.len() >= 36, "{} requests", replies.len());
    eprintln!(
        "{} requests by 4 clients across {reloads} explicit reloads; by version: {by_version:?}",
        replies.len()
    );

    // Every swap is an audit event naming both versions; at least the explicit ones.
    let events: Vec<_> = records
        .values()
        .filter(|r| r.entry.method == "EVENT" && r.entry.path == "policy-reload")
        .collect();
    assert!(events.len() >= reloads, "{} < {reloads}", events.len());
    assert!(!events.is_empty());
    for e in &events {
        assert_eq!(e.entry.decision, "allow");
        assert_eq!(e.entry.status, 0);
        let reason = e.entry.reason.as_deref().unwrap();
        assert!(
            reason.contains(&format!("-> {}", e.entry.policy_version)),
            "{reason}"
        );
        assert!(reason.contains(&format!("changed {BORDER} ")), "{reason}");
    }
    let gw = Arc::try_unwrap(gw).ok().unwrap();
    assert!(karibche::audit::verify(&gw.running.store, None)
        .await
        .unwrap()
        .intact());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_edit_is_refused_and_the_old_policy_keeps_working() {
    let policies = copy_policies();
    let gw = start(policies.path()).await;
    let before = gw.running.started.policy_version.clone();
    let good = std::fs::read_to_string(policies.path().join(BORDER)).unwrap();
    // Two typical mistakes in two files: a misspelt key, and a purpose that does not exist.
    replace_file(
        policies.path(),
        BORDER,
        &good.replacen("fields = [", "feilds = [", 1),
    );
    let ssg = std::fs::read_to_string(policies.path().join("agencies/ssg.toml")).unwrap();
    replace_file(
        policies.path(),
        "agencies/ssg.toml",
        &ssg.replace(
            "[\"national-security-investigation\"]",
            "[\"national-security\"]",
        ),
    );

    let err = gw.running.reload_policy().await.unwrap_err();
    let ReloadError::Invalid { errors, .. } = &err else {
        panic!("{err}")
    };
    // The same messages as `policy check`: file:line:col.
    let text = errors.to_string();
    assert!(
        text.contains("agencies/mia-border.toml:17:1: unknown field `feilds`"),
        "{text}"
    );
    assert!(
        text.contains("agencies/ssg.toml:19:13: unknown purpose \"national-security\""),
        "{text}"
    );
    assert_eq!(gw.running.gateway.policy.load().version(), before);

    let token = gw.token("mia-border", "border-control", None);
    let reply = gw
        .client("mia-border")
        .get(&format!("/v1/registry/persons/{PERSON}"), Some(&token))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let (_, failed) = gw.running.gateway.metrics.policy_reload_counts();
    assert!(failed >= 1);
    let metrics = metrics_text(&gw).await;
    assert!(
        metrics.contains("karibche_policy_reload_failures_total ")
            && !metrics.contains("karibche_policy_reload_failures_total 0"),
        "{metrics}"
    );
    // Nothing was recorded as a reload.
    assert!(all_records(&gw)
        .await
        .iter()
        .all(|r| r.entry.path != "policy-reload"));

    // Fixing the files brings the same version back: nothing to swap.
    replace_file(policies.path(), BORDER, &good);
    replace_file(policies.path(), "agencies/ssg.toml", &ssg);
    assert_eq!(
        gw.running.reload_policy().await.unwrap(),
        ReloadOutcome::Unchanged { version: before }
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_picks_up_an_edit_without_a_restart() {
    let policies = copy_policies();
    let gw = start(policies.path()).await;
    let before = gw.running.started.policy_version.clone();
    let text = std::fs::read_to_string(policies.path().join(BORDER)).unwrap();
    replace_file(
        policies.path(),
        BORDER,
        &text.replacen("\"documents\", ", "", 1),
    );
    let expected = Policy::load(policies.path()).unwrap().version().to_owned();
    assert_ne!(expected, before);
    let policy = gw.running.gateway.policy.clone();
    assert!(
        eventually(Duration::from_secs(10), async || {
            policy.load().version() == expected
        })
        .await,
        "timed out waiting for the watcher's reload"
    );

    let records = all_records(&gw).await;
    let event = records
        .iter()
        .find(|r| r.entry.path == "policy-reload")
        .expect("the reload is an audit event");
    let reason = event.entry.reason.as_deref().unwrap();
    assert!(
        reason.starts_with(&format!(
            "policy {before} -> {expected} by file-watch; changed {BORDER} "
        )),
        "{reason}"
    );
    assert_eq!(event.entry.policy_version, expected);
    let (reloaded, _) = gw.running.gateway.metrics.policy_reload_counts();
    assert_eq!(reloaded, 1);
    assert!(metrics_text(&gw)
        .await
        .contains("karibche_policy_reloads_total 1"));

    let token = gw.token("mia-border", "border-control", None);
    let reply = gw
        .client("mia-border")
        .get(&format!("/v1/registry/persons/{PERSON}"), Some(&token))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(!leaf_paths(&reply.json())
        .iter()
        .any(|p| p.starts_with("documents")));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_grants_are_recorded_and_listed_where_they_differ() {
    let policies = copy_policies();
    let text = std::fs::read_to_string(policies.path().join(BORDER)).unwrap();
    // Proposed: the Border Police also read for expulsions, with fewer fields.
    let proposed = format!(
        "{text}\n[[grants]]\nprovider = \"registry\"\nservice = \"persons\"\noperations = [\"read\"]\n\
         purposes = [\"border-control\", \"expulsion-procedure\"]\nfields = [\"id\", \"names\", \"entry_bans\"]\nshadow = true\n"
    );
    replace_file(policies.path(), BORDER, &proposed);
    let gw = start(policies.path()).await;
    let client = gw.client("mia-border");
    let path = format!("/v1/registry/persons/{PERSON}");

    let same = client
        .get(&path, Some(&gw.token("mia-border", "border-control", None)))
        .await;
    assert_eq!(same.status, StatusCode::OK);
    // Enforced, not shadow: the proposed grant's narrower fields are not what was released.
    assert!(leaf_paths(&same.json())
        .iter()
        .any(|p| p.starts_with("documents")));
    let differs = client
        .get(
            &path,
            Some(&gw.token("mia-border", "expulsion-procedure", None)),
        )
        .await;
    assert_eq!(differs.status, StatusCode::FORBIDDEN, "not enforced");
    let crossing_token = gw.token("mia-border", "border-control", None);
    let other_service = client
        .send(
            http::Method::POST,
            "/v1/registry/crossings",
            Some(&crossing_token),
            Some(serde_json::json!({})),
        )
        .await
        .unwrap();

    let records: HashMap<String, audit::Record> = all_records(&gw)
        .await
        .into_iter()
        .map(|r| (r.entry.id.clone(), r))
        .collect();
    let shadow_of = |id: String| records[&id].entry.shadow_decision;
    assert_eq!(shadow_of(same.request_id()).as_deref(), Some("allow"));
    assert_eq!(shadow_of(differs.request_id()).as_deref(), Some("allow"));
    assert_eq!(shadow_of(other_service.request_id()), None);

    let listed = audit::query(
        &gw.running.store,
        &Filter {
            shadow_diff: true,
            ..Filter::default()
        },
    )
    .await
    .unwrap();
    let ids: Vec<&str> = listed.iter().map(|r| r.entry.id.as_str()).collect();
    assert_eq!(ids, [differs.request_id()]);
    assert_eq!(listed[0].entry.decision, "deny");
    assert!(karibche::audit::verify(&gw.running.store, None)
        .await
        .unwrap()
        .intact());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_changed_quotas_and_refuses_broken_ones() {
    let policies = copy_policies();
    let limits = policies.path().join("limits.toml");
    let original = std::fs::read_to_string(&limits).unwrap();
    let tight = original.replacen(
        "officer = { rate = \"30/s\", burst = 60 }",
        "officer = { rate = \"1/h\", burst = 2 }",
        1,
    );
    assert_ne!(
        tight, original,
        "the Border Police officer quota is in limits.toml"
    );
    std::fs::write(&limits, &tight).unwrap();
    let gw = start(policies.path()).await;
    let token = gw.token("mia-border", "border-control", None);
    let client = gw.client("mia-border");
    let path = format!("/v1/registry/persons/{PERSON}");
    for _ in 0..2 {
        assert_eq!(client.get(&path, Some(&token)).await.status, StatusCode::OK);
    }
    assert_eq!(
        client.get(&path, Some(&token)).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );

    // A broken quota file is refused and the old quotas stay.
    replace_file(
        policies.path(),
        "limits.toml",
        "[defaults]\nagency = { rate = \"fast\" }\n",
    );
    assert!(matches!(
        gw.running.reload_policy().await,
        Err(ReloadError::Limits { .. })
    ));
    assert_eq!(
        client.get(&path, Some(&token)).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );

    // A wider quota applies at the next reload, though the policy itself did not change.
    replace_file(policies.path(), "limits.toml", &original);
    assert!(matches!(
        gw.running.reload_policy().await.unwrap(),
        ReloadOutcome::Unchanged { .. }
    ));
    assert_eq!(client.get(&path, Some(&token)).await.status, StatusCode::OK);
    gw.shutdown().await;
}
