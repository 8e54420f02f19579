//! The logs an operations centre collects: the real binary with
//! `--log-format json`, requests that are allowed, denied, rate limited and
//! refused at the handshake. Every line must be one JSON object, every
//! request must leave exactly one access line carrying its audit id and
//! trace id, a failed handshake must name its reason and the peer
//! certificate's fingerprint, and no line may hold a query value, a person
//! id or a token — the access log says no more than the audit record.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::{dev_token, person_path, spawn_serve_logging_to, Client, PERSON};
use http::StatusCode;

/// The repository's policies with a tight quota for the Border Police's officers.
fn policies(dir: &Path) -> std::path::PathBuf {
    let to = common::copy_policies(dir);
    std::fs::write(
        to.join("limits.toml"),
        "[defaults]\nagency = { rate = \"200/s\", burst = 400 }\nofficer = { rate = \"20/s\", burst = 40 }\n\n\
         [agencies.mia-border]\nagency = { rate = \"200/s\", burst = 400 }\nofficer = { rate = \"1/h\", burst = 2 }\n",
    )
    .unwrap();
    to
}

fn access_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}"))
        })
        .filter(|v| v["target"] == "karibche::access")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_leaves_one_json_access_line_with_its_audit_and_trace_id() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("var");
    let log_file = dir.path().join("stderr.log");
    let serve = spawn_serve_logging_to(
        &data,
        &policies(dir.path()),
        &["--log-format", "json"],
        &log_file,
        "info",
    );
    let serve = serve.ready();
    let pki = data.join("pki");
    let keys = data.join("keys");
    let (cert, key) = karibche::devpki::agency_files(&pki, "mia-border");
    let client = Client::new(&pki.join("ca.pem"), Some((&cert, &key)), serve.gateway);
    let token = dev_token(&keys, "mia-border", "officer-logs", "border-control");

    const SECRET_QUERY: &str = "QUERYVALUE4711";
    let incoming = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut sent = Vec::new();
    // Allowed, continuing the agency's trace.
    let req = http::Request::get(person_path(PERSON))
        .header("host", "localhost")
        .header("authorization", format!("Bearer {token}"))
        .header("traceparent", format!("00-{incoming}-00f067aa0ba902b7-01"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let allowed = client.request(req).await.unwrap();
    assert_eq!(allowed.status, StatusCode::OK);
    sent.push(("allowed", allowed.request_id()));
    // Denied by the policy (no grant), with a query value that must not be logged.
    let denied = client
        .get(
            &format!("/v1/registry/visas?holder={SECRET_QUERY}"),
            Some(&token),
        )
        .await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN, "{:?}", denied.body);
    sent.push(("denied", denied.request_id()));
    // The officer's quota (burst 2) is used up by the third allowed request.
    let third = client.get(&person_path(PERSON), Some(&token)).await;
    sent.push(("third", third.request_id()));
    let limited = client.get(&person_path(PERSON), Some(&token)).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    sent.push(("limited", limited.request_id()));

    // A certificate from a CA the gateway does not trust.
    let foreign = rcgen::generate_simple_self_signed(vec!["foreign.example".to_owned()]).unwrap();
    let foreign_cert = dir.path().join("foreign.pem");
    let foreign_key = dir.path().join("foreign.key");
    std::fs::write(&foreign_cert, foreign.cert.pem()).unwrap();
    std::fs::write(&foreign_key, foreign.signing_key.serialize_pem()).unwrap();
    let fingerprint = common::sha256_hex(foreign.cert.der());
    let stranger = Client::new(
        &pki.join("ca.pem"),
        Some((&foreign_cert, &foreign_key)),
        serve.gateway,
    );
    let refused = stranger
        .request(
            http::Request::get(person_path(PERSON))
                .header("host", "localhost")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await;
    assert!(refused.is_err(), "{refused:?}");

    let read = || std::fs::read_to_string(&log_file).unwrap();
    let handshake_logged = || {
        read()
            .lines()
            .any(|l| l.contains("TLS handshake failed") && l.contains(&fingerprint))
    };
    assert!(
        common::eventually(std::time::Duration::from_secs(10), async || {
            handshake_logged()
        })
        .await,
        "the failed handshake is logged with the peer's fingerprint:\n{}",
        read()
    );
    serve.kill();
    let log = read();
    assert!(!log.contains('\u{1b}'), "no colour codes in a file:\n{log}");
    let lines = access_lines(&log);
    for (what, id) in &sent {
        let matching: Vec<_> = lines
            .iter()
            .filter(|l| l["fields"]["request_id"] == id.as_str())
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "{what}: one access line for {id}:\n{log}"
        );
        let f = &matching[0]["fields"];
        assert_eq!(f["agency"], "mia-border", "{what}");
        assert_eq!(f["officer"], "officer-logs", "{what}");
        assert_eq!(f["purpose"], "border-control", "{what}");
        assert_eq!(f["method"], "GET", "{what}");
        assert!(f["total_ms"].is_number(), "{what}: {f}");
        let trace = f["trace_id"].as_str().unwrap();
        assert_eq!(trace.len(), 32, "{what}: {trace}");
        // The span carries the id too, so every warning inside the request names it.
        assert_eq!(matching[0]["span"]["request_id"], id.as_str(), "{what}");
    }
    let by = |what: &str| {
        let id = &sent.iter().find(|(w, _)| *w == what).unwrap().1;
        lines
            .iter()
            .find(|l| l["fields"]["request_id"] == id.as_str())
            .unwrap()["fields"]
            .clone()
    };
    let a = by("allowed");
    assert_eq!(a["status"], 200);
    assert_eq!(a["decision"], "allow");
    assert_eq!(a["provider"], "registry");
    assert_eq!(a["service"], "persons");
    assert_eq!(a["trace_id"], incoming, "the agency's trace is continued");
    assert!(
        a["upstream_ms"].is_number() && a["bytes"].as_u64().unwrap() > 0,
        "{a}"
    );
    let d = by("denied");
    assert_eq!(
        (d["status"].as_u64(), d["decision"].as_str()),
        (Some(403), Some("deny"))
    );
    assert_eq!(d["reason"], "no_grant");
    assert_ne!(
        d["trace_id"], incoming,
        "a request without traceparent starts its own trace"
    );
    let l = by("limited");
    assert_eq!(
        (l["status"].as_u64(), l["reason"].as_str()),
        (Some(429), Some("rate_limited"))
    );
    // Nothing beyond the record: no query values, no person ids, no tokens, anywhere.
    for forbidden in [SECRET_QUERY, PERSON, token.as_str()] {
        assert!(
            !log.contains(forbidden),
            "{forbidden} is in the logs:\n{log}"
        );
    }
    let handshake = log
        .lines()
        .find(|l| l.contains("TLS handshake failed") && l.contains(&fingerprint))
        .unwrap();
    let h: serde_json::Value = serde_json::from_str(handshake).unwrap();
    assert_eq!(h["level"], "INFO");
    assert_eq!(h["fields"]["reason"], "unknown_ca", "{h}");
    // The audit record keeps the same trace id (stored beside it, not hashed).
    let url = format!("sqlite://{}", data.join("karibche.db").display());
    let store = karibche::store::Store::connect(&url).await.unwrap();
    let records = karibche::audit::query(&store, &karibche::audit::Filter::default())
        .await
        .unwrap();
    let record = records.iter().find(|r| r.entry.id == sent[0].1).unwrap();
    assert_eq!(record.entry.trace_id.as_deref(), Some(incoming));
}
