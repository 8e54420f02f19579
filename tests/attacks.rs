//! The attack suite: every known way to fake an agency or an officer, against
//! the real system over real mutual TLS. Each refusal that reaches HTTP must
//! be the right one (401 for tokens, 403 for policy) and must be in the audit
//! log with its reason; refusals at the handshake must leave no record.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::{admin_get, Client, Db, Reply, TestGateway};
use http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use karibche::audit::{self, Filter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PERSON: &str = karibche::registry::EXAMPLE_PERSON_ID;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn path() -> String {
    format!("/v1/registry/persons/{PERSON}")
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn keys_dir(gw: &TestGateway) -> std::path::PathBuf {
    gw.config.data_path(&gw.config.tokens.keys_dir)
}

/// Claims an honest Border Police token would carry.
fn claims() -> serde_json::Value {
    let now = now();
    serde_json::json!({
        "iss": "mia-border", "sub": "officer-1", "aud": "karibche",
        "purpose": "border-control", "iat": now, "nbf": now, "exp": now + 300,
        "jti": uuid::Uuid::now_v7().to_string()
    })
}

fn with(patch: serde_json::Value) -> serde_json::Value {
    let mut c = claims();
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

/// Signs with the Border Police's own key (ES256, its kid).
fn border(gw: &TestGateway, c: &serde_json::Value) -> String {
    karibche::devpki::token::issue_claims(&keys_dir(gw), "mia-border", c).unwrap()
}

fn private_key(gw: &TestGateway, agency: &str) -> EncodingKey {
    let pem = std::fs::read(keys_dir(gw).join(format!("{agency}.key"))).unwrap();
    EncodingKey::from_ec_pem(&pem).unwrap()
}

fn tamper_signature(token: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut sig = B64.decode(&parts[2]).unwrap();
    sig[5] ^= 0x40;
    parts[2] = B64.encode(sig);
    parts.join(".")
}

async fn audit_reason(gw: &TestGateway, reply: &Reply) -> (String, u16, String) {
    let id = reply.request_id();
    let records = audit::query(&gw.running.store, &Filter::default())
        .await
        .unwrap();
    let r = records
        .into_iter()
        .find(|r| r.entry.id == id)
        .unwrap_or_else(|| panic!("no audit record for request {id}"));
    (
        r.entry.reason.unwrap_or_default(),
        r.entry.status,
        r.entry.decision.to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_broken_tokens_are_refused_and_logged() {
    let gw = TestGateway::start().await;
    let client = gw.client("mia-border");
    let good = border(&gw, &claims());
    let r = client.get(&path(), Some(&good)).await;
    assert_eq!(r.status, StatusCode::OK, "the honest token works");

    let psda_pub = std::fs::read(keys_dir(&gw).join("psda.pub.pem")).unwrap();
    let psda_kid = karibche::identity::keys::pem_kid(&psda_pub).unwrap();
    let alg_none = format!(
        "{}.{}.",
        B64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        B64.encode(serde_json::to_vec(&claims()).unwrap())
    );
    let hs256_public = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(
            &std::fs::read(keys_dir(&gw).join("mia-border.pub.pem")).unwrap(),
        ),
    )
    .unwrap();
    let other_agency_key = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims(),
        &private_key(&gw, "psda"),
    )
    .unwrap();
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(psda_kid);
    let kid_of_other_agency =
        jsonwebtoken::encode(&h, &claims(), &private_key(&gw, "psda")).unwrap();
    let t = now();
    let cases: Vec<(&str, String, StatusCode, &str)> = vec![
        (
            "alg none",
            alg_none,
            StatusCode::UNAUTHORIZED,
            "token_algorithm_not_allowed",
        ),
        (
            "HS256 keyed with the public key",
            hs256_public,
            StatusCode::UNAUTHORIZED,
            "token_algorithm_not_allowed",
        ),
        (
            "another agency's key",
            other_agency_key,
            StatusCode::UNAUTHORIZED,
            "token_bad_signature",
        ),
        (
            "kid naming another agency's key",
            kid_of_other_agency,
            StatusCode::UNAUTHORIZED,
            "token_unknown_key",
        ),
        (
            "expired",
            border(
                &gw,
                &with(serde_json::json!({"iat": t - 900, "nbf": t - 900, "exp": t - 300})),
            ),
            StatusCode::UNAUTHORIZED,
            "token_expired",
        ),
        (
            "not yet valid",
            border(
                &gw,
                &with(serde_json::json!({"nbf": t + 600, "exp": t + 800})),
            ),
            StatusCode::UNAUTHORIZED,
            "token_not_yet_valid",
        ),
        (
            "lifetime too long",
            border(&gw, &with(serde_json::json!({"exp": t + 24 * 3600}))),
            StatusCode::UNAUTHORIZED,
            "token_lifetime_too_long",
        ),
        (
            "wrong aud",
            border(&gw, &with(serde_json::json!({"aud": "another-gateway"}))),
            StatusCode::UNAUTHORIZED,
            "token_wrong_audience",
        ),
        (
            "wrong iss",
            border(&gw, &with(serde_json::json!({"iss": "psda"}))),
            StatusCode::UNAUTHORIZED,
            "token_wrong_issuer",
        ),
        (
            "missing purpose",
            border(&gw, &with(serde_json::json!({"purpose": null}))),
            StatusCode::UNAUTHORIZED,
            "token_missing_purpose",
        ),
        (
            "unknown purpose",
            border(&gw, &with(serde_json::json!({"purpose": "curiosity"}))),
            StatusCode::FORBIDDEN,
            "unknown_purpose",
        ),
        (
            "missing sub",
            border(&gw, &with(serde_json::json!({"sub": null}))),
            StatusCode::UNAUTHORIZED,
            "token_missing_sub",
        ),
        (
            // Cut by whole base64 groups (4 characters = 3 bytes), so the rest still decodes
            // and the signature check itself must refuse it.
            "truncated signature",
            good[..good.len() - 6].to_owned(),
            StatusCode::UNAUTHORIZED,
            "token_bad_signature",
        ),
        (
            "tampered signature",
            tamper_signature(&good),
            StatusCode::UNAUTHORIZED,
            "token_bad_signature",
        ),
        (
            "huge token",
            format!(
                "{}.{}.{}",
                "e".repeat(100),
                "f".repeat(16 * 1024),
                "g".repeat(86)
            ),
            StatusCode::UNAUTHORIZED,
            "token_too_large",
        ),
    ];
    for (name, token, status, reason) in cases {
        let r = client.get(&path(), Some(&token)).await;
        assert_eq!(
            r.status,
            status,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.content_type(), "application/problem+json", "{name}");
        let text = String::from_utf8_lossy(&r.body);
        assert!(
            !text.contains(PERSON) || name == "unknown purpose",
            "{name} leaked data"
        );
        if status == StatusCode::UNAUTHORIZED {
            assert!(r.headers.contains_key("www-authenticate"), "{name}");
        }
        let (logged, logged_status, decision) = audit_reason(&gw, &r).await;
        assert_eq!(logged, reason, "{name}");
        assert_eq!(logged_status, status.as_u16(), "{name}");
        assert_eq!(decision, "deny", "{name}");
    }
    assert!(audit::verify(&gw.running.store, None)
        .await
        .unwrap()
        .intact());
    gw.shutdown().await;
}

fn cert_sha256(cert: &Path) -> String {
    karibche::files::fingerprint(&karibche::files::load_certs(cert).unwrap()[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_tokens_hold_only_on_their_certificate() {
    let gw =
        TestGateway::start_configured(Db::from_env(), |c, _| c.tokens.require_bound_tokens = true)
            .await
            .unwrap();
    let client = gw.client("mia-border");
    let (own, _) = karibche::devpki::agency_files(&gw.pki(), "mia-border");
    let (other, _) = karibche::devpki::agency_files(&gw.pki(), "psda");
    let bound = |sha: &str| {
        let x5t = karibche::identity::token::x5t_s256(sha).unwrap();
        border(&gw, &with(serde_json::json!({"cnf": {"x5t#S256": x5t}})))
    };
    let r = client.get(&path(), Some(&bound(&cert_sha256(&own)))).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    // The same request again is served from the verified-token cache, binding re-checked.
    let r = client.get(&path(), Some(&bound(&cert_sha256(&own)))).await;
    assert_eq!(r.status, StatusCode::OK);

    let on_other = client
        .get(&path(), Some(&bound(&cert_sha256(&other))))
        .await;
    assert_eq!(on_other.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        audit_reason(&gw, &on_other).await.0,
        "token_certificate_mismatch"
    );

    let unbound = client.get(&path(), Some(&border(&gw, &claims()))).await;
    assert_eq!(unbound.status, StatusCode::UNAUTHORIZED);
    assert_eq!(audit_reason(&gw, &unbound).await.0, "token_unbound");
    gw.shutdown().await;
}

/// The client may see the alert before the server task has counted the failure: poll.
async fn handshake_failures_reach(gw: &TestGateway, n: u64) {
    let started = Instant::now();
    while gw.running.gateway.metrics.handshake_failures("gateway") < n {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "handshake failures not counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls until the client's request fails, up to `deadline`; returns how long it took.
async fn until_refused(client: &Client, token: &str, deadline: Duration) -> Duration {
    let started = Instant::now();
    loop {
        match client
            .send(http::Method::GET, &path(), Some(token), None)
            .await
        {
            Err(_) => return started.elapsed(),
            Ok(r) => assert_eq!(r.status, StatusCode::OK),
        }
        assert!(
            started.elapsed() < deadline,
            "still accepted after {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_within_seconds() {
    let gw = TestGateway::start().await;
    let psda = gw.client("psda");
    let token = gw.token("psda", "identity-documentation", None);
    assert_eq!(psda.get(&path(), Some(&token)).await.status, StatusCode::OK);
    let r = karibche::devpki::crl::revoke_dev_agency(&gw.pki(), "psda").unwrap();
    assert!(r.newly_revoked);
    // The same client object: its session tickets from before must not resume past the revocation.
    let took = until_refused(&psda, &token, Duration::from_secs(10)).await;
    eprintln!("revoked certificate refused {took:?} after `certs revoke`");
    let records_before = audit::count_requests(&gw.running.store).await.unwrap();
    // Stays refused, and a fresh client fares no better.
    assert!(gw
        .client("psda")
        .send(http::Method::GET, &path(), Some(&token), None)
        .await
        .is_err());
    // Everyone else is unaffected.
    let border = gw.token("mia-border", "border-control", None);
    assert_eq!(
        gw.client("mia-border")
            .get(&path(), Some(&border))
            .await
            .status,
        StatusCode::OK
    );
    // Handshake refusals never reach HTTP: the log grew by the Border Police's request only.
    assert_eq!(
        audit::count_requests(&gw.running.store).await.unwrap(),
        records_before + 1
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_foreign_certificates_fail_the_handshake() {
    let gw = TestGateway::start().await;
    let token = gw.token("mia-border", "border-control", None);
    let ca_pem = gw.pki().join("ca.pem");
    let tmp = tempfile::tempdir().unwrap();

    // Issued by the right CA, for the right agency, but expired nine days ago.
    let ca = karibche::devpki::DevCa::open_dev(&gw.pki()).unwrap();
    let mut leaf = karibche::devpki::Leaf::agency("mia-border");
    leaf.days = 1;
    leaf.backdate_days = 10;
    let (cert, key) = ca.issue(&leaf).unwrap();
    let (cert_path, key_path) = (tmp.path().join("old.pem"), tmp.path().join("old.key"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let expired = Client::new(&ca_pem, Some((&cert_path, &key_path)), gw.gateway_addr());
    assert!(expired
        .send(http::Method::GET, &path(), Some(&token), None)
        .await
        .is_err());

    // The same agency name from a CA the gateway does not trust.
    let foreign = tmp.path().join("foreign");
    karibche::devpki::ensure_dev_pki(&foreign, &["mia-border"]).unwrap();
    let (fc, fk) = karibche::devpki::agency_files(&foreign, "mia-border");
    let forged = Client::new(&ca_pem, Some((&fc, &fk)), gw.gateway_addr());
    assert!(forged
        .send(http::Method::GET, &path(), Some(&token), None)
        .await
        .is_err());

    handshake_failures_reach(&gw, 2).await;
    assert_eq!(audit::count_requests(&gw.running.store).await.unwrap(), 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_offering_only_tls_1_0_or_1_1_get_an_alert() {
    let gw = TestGateway::start().await;
    for (name, version) in [("TLS 1.0", [3, 1]), ("TLS 1.1", [3, 2])] {
        let mut tcp = tokio::net::TcpStream::connect(gw.gateway_addr())
            .await
            .unwrap();
        tcp.write_all(&common::client_hello(version, "localhost"))
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
            .await
            .expect("the server closes the connection")
            .ok();
        // Either a bare close, or an alert record: never a ServerHello (0x16).
        if !answer.is_empty() {
            assert_eq!(
                answer[0], 0x15,
                "{name}: expected an alert record, got {answer:02x?}"
            );
            assert_eq!(answer.get(5), Some(&2), "{name}: a fatal alert");
            assert_eq!(answer.get(6), Some(&70), "{name}: protocol_version");
        }
    }
    handshake_failures_reach(&gw, 2).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_agency_keys_take_effect_without_restart() {
    let gw = TestGateway::start().await;
    let client = gw.client("mia-border");
    let old = gw.token("mia-border", "border-control", None);
    assert_eq!(client.get(&path(), Some(&old)).await.status, StatusCode::OK);

    // The identity provider rotates: a new key pair replaces the old one.
    let dir = keys_dir(&gw);
    let (private, public) = karibche::devpki::signing_key_files(&dir, "mia-border");
    let new = rcgen::KeyPair::generate().unwrap();
    std::fs::write(&private, new.serialize_pem()).unwrap();
    std::fs::write(&public, new.public_key_pem()).unwrap();
    let fresh = gw.token("mia-border", "border-control", None);

    let started = Instant::now();
    loop {
        let r = client.get(&path(), Some(&fresh)).await;
        if r.status == StatusCode::OK {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "new key not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The withdrawn key's token, though cached before, no longer works.
    let r = client.get(&path(), Some(&old)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(audit_reason(&gw, &r).await.0, "token_unknown_key");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_days_left_per_certificate() {
    let gw = TestGateway::start().await;
    let (_, text) = admin_get(gw.running.started.admin, "/metrics").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let days = |label: &str| -> f64 {
        let prefix = format!("karibche_certificate_expiry_timestamp_seconds{{cert=\"{label}\"}} ");
        let not_after: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {label} in {text}"))
            .parse()
            .unwrap();
        (not_after - now) / 86_400.0
    };
    assert!(days("gateway") > 360.0);
    assert!(days("client_ca:karibche development CA") > 3600.0);
    assert!(days("crl:crl.pem") > 20.0);
    assert!(days("agency:mia-border") > 360.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agency_policy_can_require_bound_tokens() {
    // A copy of the policies in which only the Border Police must bind its tokens.
    let policies = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    common::copy_dir(&src, policies.path());
    let file = policies.path().join("agencies/mia-border.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let text = text.replacen("name = ", "require_bound_tokens = true\nname = ", 1);
    std::fs::write(&file, text).unwrap();
    let dir = policies.path().to_owned();
    let gw = TestGateway::start_configured(Db::from_env(), move |c, _| c.policies_dir = dir)
        .await
        .unwrap();
    let unbound = gw
        .client("mia-border")
        .get(&path(), Some(&border(&gw, &claims())))
        .await;
    assert_eq!(unbound.status, StatusCode::UNAUTHORIZED);
    assert_eq!(audit_reason(&gw, &unbound).await.0, "token_unbound");
    let (own, _) = karibche::devpki::agency_files(&gw.pki(), "mia-border");
    let x5t = karibche::identity::token::x5t_s256(&cert_sha256(&own)).unwrap();
    let bound = border(&gw, &with(serde_json::json!({"cnf": {"x5t#S256": x5t}})));
    let ok = gw.client("mia-border").get(&path(), Some(&bound)).await;
    assert_eq!(ok.status, StatusCode::OK);
    // Other agencies are not affected.
    let psda = gw.token("psda", "identity-documentation", None);
    let r = gw.client("psda").get(&path(), Some(&psda)).await;
    assert_eq!(r.status, StatusCode::OK);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_also_closes_connections_opened_before_it() {
    let gw = TestGateway::start().await;
    let token = gw.token("psda", "identity-documentation", None);
    // A keep-alive connection, established and used before the revocation.
    let mut tls = gw.client("psda").tls().await;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n",
        path()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = tls.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    karibche::devpki::crl::revoke_dev_agency(&gw.pki(), "psda").unwrap();
    // The server closes it once the new CRL is in force; the client must handshake again, and fails.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the old connection stayed open after the revocation"
    );
    assert!(gw
        .client("psda")
        .send(http::Method::GET, &path(), Some(&token), None)
        .await
        .is_err());
    gw.shutdown().await;
}
