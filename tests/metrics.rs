//! `/metrics` as Prometheus and `promtool` read it: labelled by agency,
//! provider, service and status class; a provider's 404 on an allowed request
//! counted as a failure, not a denial; handshake failures by reason; expiry
//! as timestamps; `build_info` and process metrics; and a CA whose name holds
//! a `"` and a newline must not break the scrape (the crate escapes labels).

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use bytes::Bytes;
use common::{person_path, require_tool, Client, Db, TestGateway, PERSON};
use http::StatusCode;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

/// GET /metrics with `accept`, returning the content type and the body.
async fn scrape(gw: &TestGateway, accept: Option<&str>) -> (String, String) {
    let stream = tokio::net::TcpStream::connect(gw.running.started.admin)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::get("/metrics").header("host", "localhost");
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = sender
        .send_request(req.body(http_body_util::Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (ct, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_labelled_escaped_and_pass_promtool() {
    let promtool = require_tool("promtool", "prometheus");
    let gw = TestGateway::start_configured(Db::from_env(), |config, dir| {
        // An extra trusted CA whose name holds a quote, a backslash and a newline.
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            "Ministry \"Quoted\" \\ CA\nline two",
        );
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        let path = dir.join("quoted-ca.pem");
        std::fs::write(&path, ca.pem()).unwrap();
        config.tls.client_ca.push(path);
    })
    .await
    .unwrap();
    let token = gw.token("mia-border", "border-control", None);
    let client = gw.client("mia-border");
    assert_eq!(
        client.get(&person_path(PERSON), Some(&token)).await.status,
        StatusCode::OK
    );
    // Allowed, but the register knows no such person: its 404 is no denial.
    let missing = client.get(&person_path("RF-9999999"), Some(&token)).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    // Denied: no grant for visas.
    assert_eq!(
        client.get("/v1/registry/visas", Some(&token)).await.status,
        StatusCode::FORBIDDEN
    );
    // A client without a certificate fails the handshake.
    let anonymous = Client::new(&gw.pki().join("ca.pem"), None, gw.gateway_addr());
    let _ = anonymous
        .request(
            http::Request::get(person_path(PERSON))
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        )
        .await;
    common::eventually(std::time::Duration::from_secs(5), async || {
        gw.running.gateway.metrics.handshake_failures("gateway") >= 1
    })
    .await;

    let (ct, text) = scrape(&gw, None).await;
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "karibche_requests_total{agency=\"mia-border\",provider=\"registry\",service=\"persons\",class=\"2xx\"} 1",
        "karibche_requests_total{agency=\"mia-border\",provider=\"registry\",service=\"persons\",class=\"4xx\"} 1",
        "karibche_denials_total{agency=\"mia-border\",reason=\"no_grant\"} 1",
        "karibche_failures_total{agency=\"mia-border\",reason=\"upstream_not_found\"} 1",
        "karibche_tls_handshake_failures_total{listener=\"gateway\",reason=\"no_certificate\"} 1",
        "cert=\"client_ca:Ministry \\\"Quoted\\\" \\\\ CA\\nline two\"}",
        "karibche_request_duration_seconds_bucket{agency=\"mia-border\",provider=\"registry\",service=\"persons\",class=\"2xx\",le=\"30\"} 1",
        "karibche_upstream_duration_seconds_bucket{provider=\"registry\",le=\"10\"} 2",
        "karibche_ready 1",
        "karibche_audit_commit_duration_seconds_count ",
        "karibche_audit_batch_records_bucket{le=\"1\"} ",
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    assert!(text.contains("karibche_build_info{version=\""), "{text}");
    assert!(
        !text.contains(
            "karibche_denials_total{agency=\"mia-border\",reason=\"upstream_not_found\"}"
        ),
        "a provider's 404 is not a denial:\n{text}"
    );
    assert!(
        !text.contains("officer=") && !text.contains("person="),
        "no officer or person label:\n{text}"
    );

    let (ct, open) = scrape(
        &gw,
        Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
    )
    .await;
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(open.contains("# TYPE karibche_requests counter"), "{open}");
    gw.shutdown().await;
}
