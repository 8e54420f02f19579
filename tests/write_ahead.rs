//! No change without its record, whatever the client does (issue 13, §1).
//!
//! Writes to the register and consent recordings are sent over real mutual
//! TLS and abandoned 0–20 ms after sending: over HTTP/1.1 by closing the TCP
//! connection, over HTTP/2 by resetting the stream. Afterwards every crossing
//! the register holds and every consent the gateway holds has its attempt
//! record (found by the request body's digest and the consent's id) and its
//! outcome, and the chain verifies — on SQLite and on PostgreSQL.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{http1_post, post_request, sha256_hex, Db, Rng, TestGateway};
use karibche::audit::{self, Filter, Record};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

const PERSON: &str = karibche::registry::EXAMPLE_PERSON_ID;
/// Writes of each kind over each protocol.
const EACH: usize = 40;
/// Officers per agency, so the per-officer quota never refuses the load.
const OFFICERS: usize = 8;

/// How the client abandons a request it sent.
#[derive(Clone, Copy)]
enum Abandon {
    /// HTTP/1.1: the TCP connection is closed.
    TcpClose,
    /// HTTP/2: the stream is reset (RST_STREAM), the connection lives on.
    StreamReset,
}

/// Sends every `(path, token, body)` and abandons each after 0–20 ms; returns
/// how many answers arrived before their client gave up.
async fn send_and_abandon(
    gw: &TestGateway,
    agency: &str,
    requests: Vec<(String, String, Vec<u8>)>,
    how: Abandon,
    rng: &mut Rng,
) -> usize {
    let client = std::sync::Arc::new(gw.client(agency));
    let mut tasks = JoinSet::new();
    let mut h2 = None;
    for (i, (path, token, body)) in requests.into_iter().enumerate() {
        let delay = Duration::from_millis(rng.below(21));
        match how {
            Abandon::TcpClose => {
                let client = client.clone();
                tasks.spawn(async move {
                    let mut tls = client.tls().await;
                    tls.write_all(&http1_post(&path, &token, &body))
                        .await
                        .unwrap();
                    tls.flush().await.unwrap();
                    tokio::time::sleep(delay).await;
                    drop(tls);
                    false
                });
            }
            Abandon::StreamReset => {
                // A few connections, many streams on each.
                if i % 10 == 0 {
                    h2 = Some(client.h2().await);
                }
                let Some(sender) = h2.as_mut() else {
                    unreachable!()
                };
                sender.ready().await.unwrap();
                let answer = sender.send_request(post_request(&path, &token, &body));
                tasks.spawn(async move {
                    // Dropping the response future resets the stream.
                    tokio::time::timeout(delay, answer).await.is_ok()
                });
            }
        }
    }
    let mut answered = 0;
    while let Some(done) = tasks.join_next().await {
        answered += usize::from(done.unwrap());
    }
    answered
}

fn tokens(gw: &TestGateway, agency: &str, purpose: &str) -> Vec<String> {
    (0..OFFICERS)
        .map(|i| gw.officer_token(agency, &format!("officer-{i}"), purpose))
        .collect()
}

/// The attempt and the outcome records, by attempt id.
fn changes(records: &[Record]) -> (Vec<&Record>, HashMap<&str, &Record>) {
    let attempts = records
        .iter()
        .filter(|r| r.entry.phase.as_deref() == Some("attempt"))
        .collect();
    let outcomes = records
        .iter()
        .filter_map(|r| r.entry.attempt_id.as_deref().map(|a| (a, r)))
        .collect();
    (attempts, outcomes)
}

async fn abandoned_changes_keep_their_records(gw: TestGateway) {
    let mut rng = Rng(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64);
    let border = tokens(&gw, "mia-border", "border-control");
    let molhsa = tokens(&gw, "molhsa", "social-assistance");
    let crossings = gw.crossings(2 * EACH).await;
    let digest_of_at: HashMap<String, String> = crossings
        .iter()
        .map(|(at, body)| (at.clone(), sha256_hex(body)))
        .collect();
    let writes = |range: std::ops::Range<usize>| -> Vec<(String, String, Vec<u8>)> {
        crossings[range]
            .iter()
            .enumerate()
            .map(|(i, (_, body))| {
                let token = border[i % OFFICERS].clone();
                ("/v1/registry/crossings".to_owned(), token, body.clone())
            })
            .collect()
    };
    let consents = |from: usize| -> Vec<(String, String, Vec<u8>)> {
        (from..from + EACH)
            .map(|i| {
                let body = serde_json::json!({
                    "subject": format!("RF-CANCEL-{i:04}"), "evidence_ref": format!("FORM-{i}"),
                });
                let token = molhsa[i % OFFICERS].clone();
                (
                    "/v1/consents".to_owned(),
                    token,
                    serde_json::to_vec(&body).unwrap(),
                )
            })
            .collect()
    };

    let mut answered = 0;
    answered += send_and_abandon(
        &gw,
        "mia-border",
        writes(0..EACH),
        Abandon::TcpClose,
        &mut rng,
    )
    .await;
    answered += send_and_abandon(
        &gw,
        "mia-border",
        writes(EACH..2 * EACH),
        Abandon::StreamReset,
        &mut rng,
    )
    .await;
    answered += send_and_abandon(&gw, "molhsa", consents(0), Abandon::TcpClose, &mut rng).await;
    answered += send_and_abandon(
        &gw,
        "molhsa",
        consents(EACH),
        Abandon::StreamReset,
        &mut rng,
    )
    .await;
    assert!(
        answered < 2 * EACH,
        "too few requests were abandoned before their answer ({answered} answered)"
    );
    gw.wait_for_pipelines().await;

    let records = audit::query(&gw.running.store, &Filter::default())
        .await
        .unwrap();
    let (attempts, outcomes) = changes(&records);
    // Every attempt ends in an outcome: the pipelines ran on after their clients left.
    for a in &attempts {
        assert!(
            outcomes.contains_key(a.entry.id.as_str()),
            "attempt {} has no outcome",
            a.entry.id
        );
        assert!(!a.outcome_unknown);
    }
    let by_digest: HashMap<&str, &Record> = attempts
        .iter()
        .filter_map(|a| a.entry.request_digest.as_deref().map(|d| (d, *a)))
        .collect();

    // Every crossing this test wrote is known to the log: the attempt with its body's digest.
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT at FROM reg_crossings WHERE person_id = $1")
            .bind(PERSON)
            .fetch_all(gw.registry_store().pool())
            .await
            .unwrap();
    let ours: Vec<&String> = stored
        .iter()
        .filter(|at| digest_of_at.contains_key(*at))
        .collect();
    assert!(!ours.is_empty(), "no crossing was written at all");
    for at in &ours {
        let digest = &digest_of_at[*at];
        let attempt = by_digest.get(digest.as_str()).unwrap_or_else(|| {
            panic!("crossing at {at} is in the register without its audit record")
        });
        assert_eq!(attempt.entry.service.as_deref(), Some("crossings"));
        assert_eq!(attempt.entry.subjects, [PERSON]);
        let outcome = outcomes[attempt.entry.id.as_str()];
        assert_eq!(outcome.entry.status, 201, "{:?}", outcome.entry);
    }

    // Every consent the gateway holds is known to the log: the attempt naming its id.
    let held = karibche::consent::ConsentStore::new(gw.running.store.clone())
        .list(None)
        .await
        .unwrap();
    assert!(!held.is_empty(), "no consent was recorded at all");
    for c in &held {
        let attempt = attempts
            .iter()
            .find(|a| a.entry.consent_ref.as_deref() == Some(c.id.as_str()))
            .unwrap_or_else(|| panic!("consent {} exists without its audit record", c.id));
        assert_eq!(attempt.entry.subjects, std::slice::from_ref(&c.subject));
        assert_eq!(outcomes[attempt.entry.id.as_str()].entry.status, 201);
    }
    eprintln!(
        "{} crossings and {} consents written, {answered} of {} answers read before abandoning",
        ours.len(),
        held.len(),
        4 * EACH
    );
    let report = audit::verify(&gw.running.store, None).await.unwrap();
    assert!(report.intact(), "{report}");
    assert!(
        report.nodes.iter().all(|n| n.unknown_outcomes.is_empty()),
        "{report}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_writes_and_consents_keep_their_records_on_sqlite() {
    abandoned_changes_keep_their_records(TestGateway::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_writes_and_consents_keep_their_records_on_postgres() {
    let Some(gw) = TestGateway::start_with(Db::Postgres).await else {
        return;
    };
    abandoned_changes_keep_their_records(gw).await;
}

/// Streams reset while their pipelines run keep their places: one HTTP/2
/// connection cannot pile up more running pipelines than its stream limit
/// (HTTP/2 "rapid reset"), and the connection's further requests are
/// refused at once while other connections are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_streams_cannot_pile_up_pipelines() {
    let mut provider = None;
    let gw = TestGateway::start_configured(Db::Sqlite, |config, dir| {
        common::dev_pki_ahead(config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        config.policies_dir = common::policies_with_write_provider(dir, &url);
        config.gateway.upstream_timeout = Duration::from_secs(3);
        provider = Some(listener);
    })
    .await
    .unwrap();
    let _holding = common::holding_provider(provider.take().unwrap(), &gw.pki());
    let tokens: Vec<String> = (0..10)
        .map(|i| gw.officer_token("mia-border", &format!("officer-{i}"), "border-control"))
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({"person_id": PERSON, "note": "n"})).unwrap();
    let client = gw.client("mia-border");
    let mut h2 = client.h2().await;
    let limit = karibche::gateway::PIPELINES_PER_CONNECTION;
    let mut resets = JoinSet::new();
    for i in 0..limit + 20 {
        h2.ready().await.unwrap();
        let answer = h2.send_request(post_request(
            "/v1/ministry/notes",
            &tokens[i % tokens.len()],
            &body,
        ));
        resets.spawn(async move {
            // Reset once the gateway took the stream on; the provider holds every one of them.
            let _ = tokio::time::timeout(Duration::from_millis(50), answer).await;
        });
        // Paced, so each stream is accepted before its reset (resets of streams not yet
        // accepted are h2's own "rapid reset" guard: past 20 it closes the connection).
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    while resets.join_next().await.is_some() {}
    // All of this connection's places are taken by held pipelines: one more is refused at once.
    h2.ready().await.unwrap();
    let refused = tokio::time::timeout(
        Duration::from_secs(2),
        h2.send_request(post_request("/v1/ministry/notes", &tokens[0], &body)),
    )
    .await
    .expect("the request over the limit waited instead of being refused")
    .unwrap();
    assert_eq!(refused.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        gw.running
            .gateway
            .metrics
            .overloads("gateway", "pipelines_connection")
            > 0
    );
    assert!(gw.running.gateway.pipelines_in_flight() <= limit);
    // Another connection is served meanwhile.
    let r = gw
        .client("mia-border")
        .get(&format!("/v1/registry/persons/{PERSON}"), Some(&tokens[1]))
        .await;
    assert_eq!(r.status, http::StatusCode::OK);
    // The held writes end at the provider's timeout, each attempt with its outcome.
    gw.wait_for_pipelines().await;
    let records = audit::query(&gw.running.store, &Filter::default())
        .await
        .unwrap();
    let (attempts, outcomes) = changes(&records);
    assert!(attempts.len() >= limit - 60, "{} attempts", attempts.len());
    // Each ends at the provider's timeout (504), or — past the agency's fair share of
    // the provider — after waiting for a slot (503 `upstream_busy`), or, once enough
    // timeouts opened the provider's breaker (a slow machine), refused by it (503
    // `upstream_circuit_open`); whichever, recorded.
    for a in &attempts {
        let outcome = &outcomes[a.entry.id.as_str()].entry;
        assert!(
            outcome.status == 504
                || (outcome.status == 503
                    && matches!(
                        outcome.reason.as_deref(),
                        Some("upstream_busy" | "upstream_circuit_open")
                    )),
            "{outcome:?}"
        );
    }
    gw.shutdown().await;
}
