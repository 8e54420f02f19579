//! RFC 3161 time-stamps of tree heads (issue 17, item 3). The time-stamping
//! authority is a test double at a boundary we do not own: OpenSSL's real
//! `openssl ts -reply` behind a small HTTP wrapper (common::TsaDouble), with
//! a key and certificate made here. Tokens are stored per head and verified;
//! a token from another TSA key is refused; a TSA that is down leaves the
//! node serving with the lag shown, and it catches up; evidence files carry
//! the token and fail on any changed byte of it.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::{audit_node, read_body, write_reads, TsaDouble};
use karibche::audit::timestamp::{self, TimestampBoard, TsaCertificate};
use karibche::audit::{evidence, AuditKey};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A TimeStampReq sent to the double by hand; the raw TimeStampResp.
async fn ask(tsa: &TsaDouble, message: &[u8], nonce: &[u8]) -> Vec<u8> {
    let req = timestamp::request(message, nonce).unwrap();
    let mut stream = tokio::net::TcpStream::connect(tsa.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!(
        "POST / HTTP/1.1\r\nhost: tsa\r\ncontent-type: application/timestamp-query\r\ncontent-length: {}\r\n\r\n",
        req.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    out[end + 4..].to_vec()
}

#[tokio::test]
async fn openssl_tokens_verify_other_keys_and_changed_bytes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    TsaDouble::make(&dir.path().join("a"), false);
    TsaDouble::make(&dir.path().join("b"), true);
    let a = TsaDouble::serve(&dir.path().join("a"), 0).await;
    let b = TsaDouble::serve(&dir.path().join("b"), 0).await;
    let message = b"karibche/audit/n\n3\nAAAA\n";
    let nonce = [0x5a, 1, 2, 3, 4, 5, 6, 7];

    // RSA (a) and ECDSA P-256 (b) tokens verify with their own certificate.
    let resp = ask(&a, message, &nonce).await;
    let (token, stamp) =
        timestamp::verify_response(&resp, message, &nonce, &a.certificate()).unwrap();
    assert_eq!(stamp.nonce.as_deref(), Some(&nonce[..]));
    // certReq: the token carries the TSA certificate, unsigned; it is pinned byte for byte.
    let cert_der = a.certificate().der().to_vec();
    assert!(token.windows(cert_der.len()).any(|w| w == cert_der));
    let resp_b = ask(&b, message, &nonce).await;
    let (token_b, _) =
        timestamp::verify_response(&resp_b, message, &nonce, &b.certificate()).unwrap();

    // Another TSA's key, another message, another nonce: refused.
    assert!(timestamp::verify_token(&token_b, message, &a.certificate()).is_err());
    assert!(timestamp::verify_token(&token, message, &b.certificate()).is_err());
    assert!(timestamp::verify_token(&token, b"another checkpoint", &a.certificate()).is_err());
    assert!(timestamp::verify_response(&resp, message, &[0x11; 8], &a.certificate()).is_err());

    // Any changed byte, signed or not (embedded certificate, signer id, lengths): refused.
    let cert = a.certificate();
    let passed: Vec<usize> = (0..token.len())
        .filter(|&i| {
            let mut t = token.clone();
            t[i] ^= 0x01;
            timestamp::verify_token(&t, message, &cert).is_ok()
        })
        .collect();
    assert!(
        passed.is_empty(),
        "flipped bytes that still verify: {passed:?}"
    );

    // A certificate without the critical timeStamping usage is not a TSA certificate.
    let plain = dir.path().join("plain.pem");
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-nodes", "-days", "1", "-newkey", "ec"])
        .args(["-pkeyopt", "ec_paramgen_curve:P-256", "-subj", "/CN=plain"])
        .arg("-keyout")
        .arg(dir.path().join("plain.key"))
        .arg("-out")
        .arg(&plain)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(TsaCertificate::load(&plain).is_err());
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn node_stamps_each_head_keeps_serving_while_the_tsa_is_down_and_proofs_carry_the_token() {
    let (store, dir) = karibche::testing::sqlite_store().await;
    let tsa_dir = dir.path().join("tsa");
    TsaDouble::make(&tsa_dir, false);
    let tsa = TsaDouble::serve(&tsa_dir, 0).await;
    let port = tsa.addr.port();
    let cert = tsa.certificate();
    let key = Arc::new(AuditKey::load_or_create(&dir.path().join("node.key")).unwrap());
    let (log, writer) = audit_node(&store, key.clone(), "n-ts").await;
    let board = Arc::new(TimestampBoard::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = timestamp::spawn(
        store.clone(),
        "n-ts".into(),
        log.tree_heads(),
        tsa.url(),
        cert.clone(),
        board.clone(),
        shutdown,
    );
    write_reads(&log, "a", 10).await;
    let stamped = common::eventually(Duration::from_secs(20), async || {
        board
            .snapshot()
            .is_some_and(|s| s.stamped == 10 && s.behind == 0)
    })
    .await;
    assert!(stamped, "{:?}", board.snapshot());
    let stored = timestamp::stored(&store, "n-ts", 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.tsa, cert.fingerprint());
    let check = timestamp::check_stored(&store, "n-ts", Some(&cert))
        .await
        .unwrap();
    assert!(check.failed.is_empty() && check.verified >= 1, "{check:?}");

    // The TSA goes away: records are still committed, and the lag shows.
    tsa.stop().await;
    write_reads(&log, "b", 10).await;
    let behind = common::eventually(Duration::from_secs(20), async || {
        board
            .snapshot()
            .is_some_and(|s| s.error.is_some() && s.behind == 10)
    })
    .await;
    assert!(behind, "{:?}", board.snapshot());
    // It returns on the same port: the newest head is stamped.
    let tsa = TsaDouble::serve(&tsa_dir, port).await;
    let caught_up = common::eventually(Duration::from_secs(40), async || {
        board
            .snapshot()
            .is_some_and(|s| s.stamped == 20 && s.behind == 0 && s.error.is_none())
    })
    .await;
    assert!(caught_up, "{:?}", board.snapshot());

    // The evidence of one record carries its head's token and verifies offline.
    let ev = evidence::prove_with(&store, "b-3", &[], Some(&cert))
        .await
        .unwrap();
    let t = ev.timestamp.clone().expect("the head is time-stamped");
    assert_eq!(t.tsa_fingerprint, cert.fingerprint());
    let file = serde_json::to_vec_pretty(&ev).unwrap();
    let v = evidence::verify_with(
        &file,
        Some(read_body("b", 3).as_bytes()),
        None,
        Some(cert.der()),
    )
    .unwrap();
    assert_eq!(
        v.timestamped,
        Some((cert.fingerprint(), t.gen_time.clone()))
    );

    // Pinned to another TSA's certificate: refused.
    let other_dir = dir.path().join("other");
    TsaDouble::make(&other_dir, true);
    let other = TsaCertificate::load(&other_dir.join("tsa.pem")).unwrap();
    assert!(evidence::verify_with(&file, None, None, Some(other.der())).is_err());

    // A token signed by another TSA key, re-labelled with that TSA's certificate, over
    // another checkpoint: it does not verify over this one.
    let o = TsaDouble::serve(&other_dir, 0).await;
    let nonce = [0x22; 8];
    let resp = ask(&o, b"another checkpoint", &nonce).await;
    let (foreign, _) =
        timestamp::verify_response(&resp, b"another checkpoint", &nonce, &other).unwrap();
    let mut swapped = ev.clone();
    swapped.timestamp = Some(evidence::TimestampInfo {
        token: B64.encode(&foreign),
        tsa_certificate: B64.encode(other.der()),
        tsa_fingerprint: other.fingerprint(),
        gen_time: t.gen_time.clone(),
    });
    let swapped = serde_json::to_vec(&swapped).unwrap();
    assert!(evidence::verify_with(&swapped, None, None, None).is_err());
    o.stop().await;

    // Every byte of the token, flipped inside its base64: the file no longer verifies.
    let token = B64.decode(&t.token).unwrap();
    let passed: Vec<usize> = (0..token.len())
        .filter(|&i| {
            let mut bad = token.clone();
            bad[i] ^= 0x80;
            let mut e = ev.clone();
            e.timestamp.as_mut().unwrap().token = B64.encode(&bad);
            evidence::verify(&serde_json::to_vec(&e).unwrap(), None, None).is_ok()
        })
        .collect();
    assert!(passed.is_empty(), "token bytes that can change: {passed:?}");

    // The command line, offline: valid, and invalid with the other TSA's certificate pinned.
    let path = dir.path().join("b-3.json");
    std::fs::write(&path, &file).unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_karibche"))
            .args(["audit", "verify-proof", path.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--tsa-cert", tsa_dir.join("tsa.pem").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("time-stamped at"),
        "{out:?}"
    );
    let out = run(&["--tsa-cert", other_dir.join("tsa.pem").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    // A stored token changed in the database: `audit verify`'s check names the head.
    sqlx::query("UPDATE audit_timestamps SET token = $1 WHERE node = 'n-ts' AND size = 10")
        .bind(B64.encode(&foreign))
        .execute(store.pool())
        .await
        .unwrap();
    let check = timestamp::check_stored(&store, "n-ts", Some(&cert))
        .await
        .unwrap();
    assert_eq!(
        check.failed.iter().map(|f| f.0).collect::<Vec<_>>(),
        [10],
        "{check:?}"
    );

    let _ = stop.send(true);
    task.await.unwrap();
    tsa.stop().await;
    log.close();
    drop(log);
    writer.finish().await;
}

/// The real gateway with its TSA down: ready, `/readyz` and `/metrics` show
/// the lag; once the TSA is up, it catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_tsa_is_down_stays_ready_and_says_so() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tdir = tempfile::tempdir().unwrap();
    TsaDouble::make(tdir.path(), false);
    let certificate = tdir.path().join("tsa.pem");
    let gw = common::TestGateway::start_configured(common::Db::Sqlite, move |c, _| {
        c.audit.checkpoint_every = 1;
        c.audit.tsa = Some(karibche::config::TsaSettings {
            url: format!("http://127.0.0.1:{port}/"),
            certificate,
        });
    })
    .await
    .unwrap();
    let admin = gw.running.started.admin;
    let detail =
        |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap()["timestamps"].clone();
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
        metrics.contains("karibche_audit_timestamp_behind "),
        "{metrics}"
    );

    let tsa = TsaDouble::serve(tdir.path(), port).await;
    let caught_up = common::eventually(Duration::from_secs(40), async || {
        let (_, body) = common::admin_get(admin, "/readyz").await;
        detail(&body)["behind"] == 0 && detail(&body)["error"].is_null()
    })
    .await;
    assert!(caught_up, "{}", common::admin_get(admin, "/readyz").await.1);
    gw.shutdown().await;
    tsa.stop().await;
}
