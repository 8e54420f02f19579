//! The HTTP edges, attacked from outside over real mutual TLS, HTTP/1.1 and
//! HTTP/2 (hyper's client with ALPN `h2`, the `h2` crate or raw bytes for
//! what a well-behaved client would never send): header size and count,
//! `Host` and `:authority`, malformed and oversized bodies, and handshakes
//! that try to flood the log. Every refusal that reaches the gateway's
//! handler is answered with problem+json and recorded in the audit log.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{person_path, PERSON};
use common::{raw_answer, TestGateway};
use http::{Method, StatusCode};
use http_body_util::Full;
use karibche::audit::{self, Filter, Record};

/// A body sent in 16 KiB pieces with no declared length (HTTP/1.1: chunked; HTTP/2: DATA frames).
struct Pieces {
    left: usize,
}

impl hyper::body::Body for Pieces {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(16 * 1024);
        self.left -= n;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(vec![
            b' ';
            n
        ])))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_upload_gets_its_413_over_both_protocols() {
    let gw = TestGateway::start().await;
    let token = gw.token("mia-border", "border-control", None);
    let h1 = gw.client("mia-border");
    for client in [h1.http2(), h1] {
        for size in [1024 * 1024 + 1, 1024 * 1024 + 64 * 1024, 3 * 1024 * 1024] {
            let req = client
                .builder(Method::POST, "/v1/registry/crossings")
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(vec![b' '; size])))
                .unwrap();
            let r = client
                .request(req)
                .await
                .unwrap_or_else(|e| panic!("{size}: {e}"));
            assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{size}");
            assert_eq!(r.content_type(), "application/problem+json");
            let rec = gw.record_of(&r).await;
            assert_eq!(rec.entry.reason.as_deref(), Some("body_too_large"));
            // The same without a declared length: refused once the limit is passed.
            let req = client
                .builder(Method::POST, "/v1/registry/crossings")
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(Pieces { left: size })
                .unwrap();
            let r = client
                .request(req)
                .await
                .unwrap_or_else(|e| panic!("{size} unannounced: {e}"));
            assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{size}");
            let rec = gw.record_of(&r).await;
            assert_eq!(rec.entry.reason.as_deref(), Some("body_too_large"));
        }
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_its_whole_body_first_still_gets_the_413() {
    let gw = TestGateway::start().await;
    let token = gw.token("mia-border", "border-control", None);
    // Up to 4 MiB, a refused body is read to its end before the answer; beyond, a client
    // must read while it sends (the first test).
    for (declared, size) in [
        (true, 1024 * 1024 + 1),
        (true, 4 * 1024 * 1024),
        (false, 1024 * 1024 + 300 * 1024),
    ] {
        let mut conn = common::h2_connection(&gw, "mia-border").await;
        let mut head = http::Request::post("https://localhost/v1/registry/crossings")
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json");
        if declared {
            head = head.header("content-length", size.to_string());
        }
        let r = common::h2_exchange(&mut conn, head.body(()).unwrap(), &vec![b' '; size], true)
            .await
            .unwrap_or_else(|e| panic!("{size} (declared: {declared}): {e}"));
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(r.content_type(), "application/problem+json");
        assert_eq!(
            gw.record_of(&r).await.entry.reason.as_deref(),
            Some("body_too_large")
        );
    }
    // HTTP/1.1, the whole body written before the answer is read, declared and chunked.
    let size = 1024 * 1024 + 1;
    let declared = format!(
        "POST /v1/registry/crossings HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    );
    let mut chunked = format!(
        "POST /v1/registry/crossings HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..(size / 65536 + 1) {
        chunked.extend_from_slice(b"10000\r\n");
        chunked.extend_from_slice(&[b' '; 65536]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let mut declared = declared.into_bytes();
    declared.extend_from_slice(&vec![b' '; size]);
    for bytes in [declared, chunked] {
        let a = raw_answer(&gw, "mia-border", &bytes, Duration::from_secs(10)).await;
        assert_eq!(a.status(), 413, "{}", a.head);
        assert_eq!(a.header("content-type"), Some("application/problem+json"));
        let rec = gw.record(a.header("x-request-id").unwrap()).await;
        assert_eq!(rec.entry.reason.as_deref(), Some("body_too_large"));
    }
    gw.shutdown().await;
}

async fn records_with_reason(gw: &TestGateway, reason: &str) -> Vec<Record> {
    audit::query(&gw.running.store, &Filter::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.entry.reason.as_deref() == Some(reason))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_body_is_a_400_not_a_413() {
    let gw = TestGateway::start().await;
    let token = gw.token("mia-border", "border-control", None);
    let head = format!(
        "POST /v1/registry/crossings HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    for body in [
        &b"zz\r\n{}\r\n0\r\n\r\n"[..],            // not a chunk size
        b"5\r\n{}\r\n\r\n0\r\n\r\n",              // a chunk shorter than it says
        b"2\r\n{}XX0\r\n\r\n",                    // no CRLF after the chunk
        b"ffffffffffffffffff\r\n{}\r\n0\r\n\r\n", // a size that overflows
    ] {
        let mut bytes = head.clone().into_bytes();
        bytes.extend_from_slice(body);
        let a = raw_answer(&gw, "mia-border", &bytes, Duration::from_secs(5)).await;
        assert_eq!(
            a.status(),
            400,
            "{:?}: {}",
            String::from_utf8_lossy(body),
            a.head
        );
        assert_eq!(a.header("content-type"), Some("application/problem+json"));
        let rec = gw.record(a.header("x-request-id").unwrap()).await;
        assert_eq!(rec.entry.reason.as_deref(), Some("body_malformed"));
        assert_eq!(rec.entry.status, 400);
    }

    // HTTP/2: DATA that does not match the declared length is a stream error (RFC 9113
    // §8.1.1), so the client sees a reset; the gateway still records the refusal.
    for (declared, sent) in [(100usize, 10usize), (5, 10)] {
        let mut conn = common::h2_connection(&gw, "mia-border").await;
        let head = http::Request::post("https://localhost/v1/registry/crossings")
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .header("content-length", declared.to_string())
            .body(())
            .unwrap();
        if let Ok(r) = common::h2_exchange(&mut conn, head, &vec![b' '; sent], true).await {
            assert_eq!(r.status, StatusCode::BAD_REQUEST);
        }
    }
    let recorded = common::eventually(Duration::from_secs(5), async || {
        records_with_reason(&gw, "body_malformed").await.len() == 6
    })
    .await;
    assert!(recorded, "every malformed body has its record");
    assert!(records_with_reason(&gw, "body_too_large").await.is_empty());
    gw.shutdown().await;
}

const LIMIT: usize = karibche::gateway::MAX_HEAD_BYTES;

/// The padding that makes a request with these fields (and the Host/`:authority` `localhost`)
/// measure exactly `size`, as the gateway counts: target + Σ(name + value + 32).
fn padding_for(size: usize, target: &str, token: &str) -> String {
    let fixed = target.len()
        + ("host".len() + "localhost".len() + 32)
        + ("authorization".len() + "Bearer ".len() + token.len() + 32)
        + ("x-pad".len() + 32);
    "a".repeat(size - fixed)
}

fn h1_get(target: &str, token: &str, pad: &str) -> Vec<u8> {
    format!(
        "GET {target} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nX-Pad: {pad}\r\n\r\n"
    )
    .into_bytes()
}

fn h2_get(target: &str, token: &str, pad: &str) -> http::Request<()> {
    http::Request::get(format!("https://localhost{target}"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-pad", pad)
        .body(())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_header_limit_holds_exactly_over_both_protocols() {
    let gw = TestGateway::start().await;
    let token = gw.token("mia-border", "border-control", None);
    let target = person_path(PERSON);
    let at = padding_for(LIMIT, &target, &token);
    let over = padding_for(LIMIT + 1, &target, &token);

    let a = raw_answer(
        &gw,
        "mia-border",
        &h1_get(&target, &token, &at),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(a.status(), 200, "exactly 64 KiB is allowed: {}", a.head);
    let a = raw_answer(
        &gw,
        "mia-border",
        &h1_get(&target, &token, &over),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(a.status(), 431, "{}", a.head);
    assert_eq!(a.header("content-type"), Some("application/problem+json"));
    assert_eq!(a.json()["type"], "urn:karibche:problem:headers-too-large");
    let rec = gw.record(a.header("x-request-id").unwrap()).await;
    assert_eq!(rec.entry.reason.as_deref(), Some("headers_too_large"));
    assert_eq!(rec.entry.agency.as_deref(), Some("mia-border"));

    // HTTP/2 counts the same request the same way; the connection lives on after a 431.
    let mut conn = common::h2_connection(&gw, "mia-border").await;
    let r = common::h2_exchange(&mut conn, h2_get(&target, &token, &at), b"", true)
        .await
        .unwrap();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "exactly 64 KiB is allowed over HTTP/2"
    );
    for pad in [over.clone(), "b".repeat(70_000), "c".repeat(100_000)] {
        let r = common::h2_exchange(&mut conn, h2_get(&target, &token, &pad), b"", true)
            .await
            .unwrap_or_else(|e| panic!("{} octets: {e}", pad.len()));
        assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert_eq!(r.content_type(), "application/problem+json");
        let rec = gw.record_of(&r).await;
        assert_eq!(rec.entry.reason.as_deref(), Some("headers_too_large"));
    }
    let r = common::h2_exchange(&mut conn, h2_get(&target, &token, "x"), b"", true)
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "the same connection still serves");

    // hyper's client over HTTP/2 and HTTP/1.1: a 70 KB header is a 431 problem, not a dead connection.
    let h1 = gw.client("mia-border");
    let big = "d".repeat(70_000);
    for client in [h1.http2(), h1] {
        let r = client
            .send_with(Method::GET, &target, Some(&token), None, &[("x-big", &big)])
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert_eq!(r.content_type(), "application/problem+json");
        assert_eq!(
            gw.record_of(&r).await.entry.reason.as_deref(),
            Some("headers_too_large")
        );
    }

    // Far beyond the limit, hyper refuses by itself (no handler, no record): never a 200.
    let huge = "e".repeat(3 * LIMIT);
    let a = raw_answer(
        &gw,
        "mia-border",
        &h1_get(&target, &token, &huge),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(a.status(), 431, "{}", a.head);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_a_hundred_header_fields_are_refused_over_both_protocols() {
    let gw = TestGateway::start().await;
    let token = gw.token("mia-border", "border-control", None);
    let target = person_path(PERSON);
    // Host and Authorization, plus n more.
    let h1 = |n: usize| {
        let mut s = format!(
            "GET {target} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
        );
        for i in 0..n {
            s.push_str(&format!("X-F{i}: v\r\n"));
        }
        s.push_str("\r\n");
        s.into_bytes()
    };
    let a = raw_answer(&gw, "mia-border", &h1(98), Duration::from_secs(5)).await;
    assert_eq!(a.status(), 200, "{}", a.head);
    let a = raw_answer(&gw, "mia-border", &h1(99), Duration::from_secs(5)).await;
    assert_eq!(
        a.status(),
        431,
        "hyper's own bound over HTTP/1.1: {}",
        a.head
    );

    let mut conn = common::h2_connection(&gw, "mia-border").await;
    for (n, status) in [
        (99, StatusCode::OK),
        (100, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
    ] {
        // :authority counts as the Host field it stands for, so n + 1 fields are in the map.
        let mut req = http::Request::get(format!("https://localhost{target}"))
            .header("authorization", format!("Bearer {token}"));
        for i in 0..n {
            req = req.header(format!("x-f{i}"), "v");
        }
        let r = common::h2_exchange(&mut conn, req.body(()).unwrap(), b"", true)
            .await
            .unwrap();
        assert_eq!(r.status, status, "{n} extra fields");
        if status != StatusCode::OK {
            assert_eq!(r.content_type(), "application/problem+json");
            assert_eq!(
                gw.record_of(&r).await.entry.reason.as_deref(),
                Some("headers_too_large")
            );
        }
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_must_name_exactly_one_authority() {
    let gw = TestGateway::start().await;
    let token = gw.token("mia-border", "border-control", None);
    let target = person_path(PERSON);
    let auth = format!("Authorization: Bearer {token}\r\n");
    for (case, request) in [
        (
            "two Host headers",
            format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n{auth}\r\n"),
        ),
        (
            "two equal Host headers",
            format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\n{auth}\r\n"),
        ),
        ("no Host", format!("GET {target} HTTP/1.1\r\n{auth}\r\n")),
        (
            "an invalid Host",
            format!("GET {target} HTTP/1.1\r\nHost: local host\r\n{auth}\r\n"),
        ),
        (
            "userinfo in Host",
            format!("GET {target} HTTP/1.1\r\nHost: user@localhost\r\n{auth}\r\n"),
        ),
        (
            "an absolute target naming another host",
            format!("GET https://evil.example{target} HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n"),
        ),
    ] {
        let a = raw_answer(
            &gw,
            "mia-border",
            request.as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(a.status(), 400, "{case}: {}", a.head);
        assert_eq!(
            a.header("content-type"),
            Some("application/problem+json"),
            "{case}"
        );
        let rec = gw.record(a.header("x-request-id").unwrap()).await;
        assert_eq!(rec.entry.reason.as_deref(), Some("bad_host"), "{case}");
    }
    // HTTP/1.0 needs no Host; an absolute target agreeing with Host is fine.
    for request in [
        format!("GET {target} HTTP/1.0\r\n{auth}\r\n"),
        format!("GET https://localhost{target} HTTP/1.1\r\nHost: LOCALHOST\r\n{auth}\r\n"),
    ] {
        let a = raw_answer(
            &gw,
            "mia-border",
            request.as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(a.status(), 200, "{request}: {}", a.head);
    }

    // HTTP/2: Host beside :authority must agree, and appear once.
    let mut conn = common::h2_connection(&gw, "mia-border").await;
    for (hosts, status) in [
        (&["evil.example"][..], StatusCode::BAD_REQUEST),
        (&["localhost", "localhost"][..], StatusCode::BAD_REQUEST),
        (&["localhost"][..], StatusCode::OK),
        (&[][..], StatusCode::OK),
    ] {
        let mut req = http::Request::get(format!("https://localhost{target}"))
            .header("authorization", format!("Bearer {token}"));
        for h in hosts {
            req = req.header("host", *h);
        }
        let r = common::h2_exchange(&mut conn, req.body(()).unwrap(), b"", true)
            .await
            .unwrap();
        assert_eq!(r.status, status, "Host {hosts:?}");
        if status == StatusCode::BAD_REQUEST {
            assert_eq!(
                gw.record_of(&r).await.entry.reason.as_deref(),
                Some("bad_host")
            );
        }
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_naming_an_ip_address_cannot_flood_the_log() {
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

    // The real binary with its real logging (default level, stderr), as an operator runs it.
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_karibche"))
        .args(["serve", "--seed-persons", "20"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--registry-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("var"))
        .arg("--policies")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"))
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let logged = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let log = logged.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            log.lock().unwrap().push(line);
        }
    });
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let gateway = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            if let Some(addr) = common::gateway_from_banner(&line) {
                return addr;
            }
        }
        panic!("serve exited before it was ready")
    })
    .await
    .expect("serve did not become ready");
    tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
    let before = logged.lock().unwrap().len();

    // Anyone who can reach the port, before any authentication.
    let burst = 200;
    for i in 0..burst {
        let name = match i % 3 {
            0 => "127.0.0.1".to_owned(),
            1 => format!("10.0.{}.{}", i / 256, i % 256),
            _ => "::1".to_owned(),
        };
        let mut tcp = tokio::net::TcpStream::connect(gateway).await.unwrap();
        tcp.write_all(&common::client_hello([3, 3], &name))
            .await
            .unwrap();
        // Any answer (a ServerHello or an alert) means the hello was read; then hang up.
        let mut answer = [0u8; 1];
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut answer)).await;
    }
    let pid = child.id().unwrap();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
    let lines = logged.lock().unwrap().clone();
    let during: Vec<&String> = lines[before..]
        .iter()
        .filter(|l| !l.contains("shutting down") && !l.contains("stopped"))
        .collect();
    assert!(
        !lines.iter().any(|l| l.contains("SNI")),
        "a handshake's server name reached the log: {during:#?}"
    );
    assert!(
        during.len() <= 3,
        "{burst} hostile handshakes wrote {} lines: {during:#?}",
        during.len()
    );
}
