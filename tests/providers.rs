//! A client's mistakes are not the provider's failures: `HEAD` is served like
//! `GET` and never trips a breaker; only a provider's own failures (5xx,
//! timeouts, unreachable) count toward its circuit breaker; and every agency
//! gets a fair share of each provider, so one agency's flood cannot hold
//! another's requests. Over real mutual TLS, HTTP/1.1 and HTTP/2.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{admin_get, policies_with_provider, Db, Reply, TestGateway, TestProvider};
use http::{Method, StatusCode};
use karibche::audit::{self, Filter, Record};

const PERSON: &str = karibche::registry::EXAMPLE_PERSON_ID;

fn person() -> String {
    format!("/v1/registry/persons/{PERSON}")
}

async fn record_of(gw: &TestGateway, reply: &Reply) -> Record {
    let id = reply.request_id();
    audit::query(&gw.running.store, &Filter::default())
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.entry.id == id)
        .unwrap_or_else(|| panic!("no audit record for request {id}"))
}

/// One provider's breaker as the gateway holds it: (state, times opened).
fn breaker(gw: &TestGateway, provider: &str) -> (&'static str, u64) {
    gw.running
        .gateway
        .providers
        .states()
        .into_iter()
        .find(|(name, _)| name == provider)
        .map(|(_, s)| (s.breaker, s.opened))
        .unwrap_or(("unused", 0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_is_served_as_get_without_a_body_and_never_opens_the_breaker() {
    let gw = TestGateway::start_configured(Db::Sqlite, |c, _| c.limits.breaker_failures = 2)
        .await
        .unwrap();
    let token = gw.token("mia-border", "border-control", None);
    let h1 = gw.client("mia-border");
    let h2 = h1.http2();
    let get = h1.get(&person(), Some(&token)).await;
    assert_eq!(get.status, StatusCode::OK);
    let get_record = record_of(&gw, &get).await;

    // Many more HEADs than the breaker's threshold, over both protocols.
    for client in [&h1, &h2, &h1, &h2, &h1, &h2] {
        let head = client
            .send(Method::HEAD, &person(), Some(&token), None)
            .await
            .unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert!(head.body.is_empty(), "HEAD answers carry no body");
        assert_eq!(head.content_type(), "application/json");
        assert_eq!(
            head.headers["content-length"].to_str().unwrap(),
            get.body.len().to_string(),
            "the length the GET's body has"
        );
        // The record says what the GET's would: the same decision, fields and
        // the digest of the body the HEAD describes but does not carry.
        let rec = record_of(&gw, &head).await;
        assert_eq!(rec.entry.method, "HEAD");
        assert_eq!(rec.entry.operation.as_deref(), Some("read"));
        assert_eq!(rec.entry.decision, "allow");
        assert_eq!(rec.entry.status, 200);
        assert_eq!(rec.entry.subjects, get_record.entry.subjects);
        assert_eq!(rec.entry.fields, get_record.entry.fields);
        assert_eq!(rec.entry.response_digest, get_record.entry.response_digest);
    }
    // A HEAD that is refused is refused like the GET, with no body either.
    let refused = h2
        .send(Method::HEAD, &person(), Some("not-a-token"), None)
        .await
        .unwrap();
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert!(refused.body.is_empty());

    assert_eq!(breaker(&gw, "registry"), ("closed", 0));
    let psda = gw.token("psda", "identity-documentation", None);
    assert_eq!(
        gw.client("psda").get(&person(), Some(&psda)).await.status,
        StatusCode::OK,
        "other agencies are unaffected"
    );
    gw.shutdown().await;
}

/// A gateway with provider `other` (the double) granted to the Border Police.
async fn with_double(
    adjust: impl FnOnce(&mut karibche::config::Config),
) -> (TestGateway, TestProvider) {
    let provider = TestProvider::bind().await;
    let upstream = provider.upstream();
    let gw = TestGateway::start_configured(Db::Sqlite, |c, dir| {
        c.policies_dir = policies_with_provider(
            dir,
            "other",
            &upstream,
            &[
                ("mia-border", "border-control"),
                ("psda", "identity-documentation"),
            ],
        );
        adjust(c);
    })
    .await
    .unwrap();
    provider.serve(&gw);
    (gw, provider)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providers_4xx_never_opens_its_breaker_its_5xx_does() {
    let (gw, provider) = with_double(|c| {
        c.limits.breaker_failures = 3;
        c.limits.breaker_open = Duration::from_secs(30);
        c.limits.breaker_max_open = Duration::from_secs(60);
    })
    .await;
    let token = gw.token("mia-border", "border-control", None);
    let client = gw.client("mia-border");
    let path = "/v1/other/records/X-1";

    for status in [400u16, 404, 409, 422, 429] {
        provider.state.status.store(status, Ordering::SeqCst);
        for c in [&client, &client.http2()] {
            let r = c.get(path, Some(&token)).await;
            assert!(r.status.is_client_error(), "{status}: {}", r.status);
        }
    }
    assert_eq!(breaker(&gw, "other"), ("closed", 0));

    provider.state.status.store(503, Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(
            client.get(path, Some(&token)).await.status,
            StatusCode::BAD_GATEWAY
        );
    }
    assert_eq!(breaker(&gw, "other"), ("open", 1));
    let r = client.get(path, Some(&token)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        record_of(&gw, &r).await.entry.reason.as_deref(),
        Some("upstream_circuit_open")
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_timing_out_opens_its_breaker() {
    let (gw, provider) = with_double(|c| {
        c.gateway.upstream_timeout = Duration::from_millis(300);
        c.limits.breaker_failures = 2;
        c.limits.breaker_open = Duration::from_secs(30);
        c.limits.breaker_max_open = Duration::from_secs(60);
    })
    .await;
    provider.state.hold.store(true, Ordering::SeqCst);
    let token = gw.token("mia-border", "border-control", None);
    let client = gw.client("mia-border");
    for c in [&client, &client.http2()] {
        let r = c.get("/v1/other/records/X-1", Some(&token)).await;
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    }
    assert_eq!(breaker(&gw, "other"), ("open", 1));
    provider.release(16);
    gw.shutdown().await;
}
