//! What providers say is not passed on raw; what is stored is not
//! world-readable (issue 14, §3).
//!
//! A hostile provider answers with SQL text, a 401 of its own, stack traces,
//! HTML and huge bodies; the agency behind the gateway gets the gateway's own
//! problems and none of the provider's words, and the audit record keeps the
//! provider's status. Then the real binary runs under `umask 000` and every
//! file holding personal data or keys must still be private.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use common::{Db, TestGateway};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use karibche::audit::{self, Filter};

/// What the hostile provider puts in its answers; none of it may reach the agency.
const SECRETS: [&str; 12] = [
    "SQL",
    "SELECT",
    "db01",
    "hunter2",
    "svc_gateway",
    "10.12.0.7",
    "panicked",
    "backtrace",
    "pasport_no",
    "persons_pkey",
    "RF-0000001",
    "Basic realm",
];

const HUGE: usize = 4 * 1024 * 1024;

/// The hostile provider's answer to a path: status, content type, extra header, body.
fn hostile_answer(
    path: &str,
) -> (
    u16,
    &'static str,
    Option<(&'static str, &'static str)>,
    Vec<u8>,
) {
    let json = "application/problem+json";
    match path.trim_start_matches("/records/") {
        "sql" => (400, json, None, br#"{"type":"about:blank","title":"SQL error on db01.internal","status":400,"detail":"ERROR: column \"pasport_no\" does not exist in SELECT pasport_no FROM persons WHERE surname = 'Doe'"}"#.to_vec()),
        "auth" => (401, json, Some(("www-authenticate", "Basic realm=\"db01.internal\"")), br#"{"title":"Unauthorized","detail":"password of svc_gateway expired"}"#.to_vec()),
        "forbidden" => (403, json, None, br#"{"title":"Forbidden","detail":"10.12.0.7 is not in the allow-list of db01"}"#.to_vec()),
        "crash" => (500, "text/plain", None, b"thread 'worker-3' panicked at src/db.rs:88: postgres://svc_gateway:hunter2@db01.internal refused\nstack backtrace:\n   0: db01::query".to_vec()),
        "html" => (502, "text/html", None, b"<html><body>db01 SELECT failed</body></html>".to_vec()),
        "notjson" => (200, "text/html", None, b"<html><body>SELECT * FROM persons on db01</body></html>".to_vec()),
        "notfound" => (404, json, None, br#"{"type":"urn:karibche:problem:not-found","detail":"no row RF-0000001 in persons on db01"}"#.to_vec()),
        "invalid" => (422, json, None, br#"{"type":"urn:karibche:problem:invalid-field","detail":"birth_date: SELECT to_date($1) failed on db01"}"#.to_vec()),
        "conflict" => (409, json, None, br#"{"type":"urn:karibche:problem:conflict","detail":"name: duplicate key value violates unique constraint \"persons_pkey\" on db01"}"#.to_vec()),
        "redirect" => (302, "text/plain", Some(("location", "https://db01.internal/login")), b"see db01".to_vec()),
        "huge" => (200, "application/json", None, huge_json()),
        "huge-error" => (500, "text/plain", None, b"panicked at db01 ".repeat(HUGE / 16)),
        _ => (200, "application/json", None, br#"{"id":"X-1","name":"ok","birth_date":"1990-01-01"}"#.to_vec()),
    }
}

fn huge_json() -> Vec<u8> {
    let mut body = b"{\"id\":\"X-1\",\"name\":\"".to_vec();
    body.extend(std::iter::repeat_n(b'a', HUGE));
    body.extend_from_slice(b"\"}");
    body
}

/// A test double at a boundary we do not own: another ministry's provider
/// that misbehaves, over real TLS with a certificate from the development CA.
async fn serve_hostile(listener: tokio::net::TcpListener, pki: &Path) {
    let ca = karibche::devpki::DevCa::open_dev(pki).unwrap();
    let (cert, key) = ca
        .issue(&karibche::devpki::Leaf::local_server(
            "hostile", None, false,
        ))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.pem"), cert).unwrap();
    std::fs::write(dir.path().join("k.pem"), key).unwrap();
    let mut config =
        rustls::ServerConfig::builder_with_provider(karibche::identity::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                karibche::files::load_certs(&dir.path().join("c.pem")).unwrap(),
                karibche::files::load_key(&dir.path().join("k.pem")).unwrap(),
            )
            .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let (status, content_type, header, body) = hostile_answer(req.uri().path());
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                    resp.headers_mut()
                        .insert("content-type", content_type.parse().unwrap());
                    if let Some((name, value)) = header {
                        resp.headers_mut().insert(name, value.parse().unwrap());
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
}

/// The policy with the hostile provider added and a grant on it for the Migration Department.
fn hostile_policies(dir: &Path, port: u16) -> std::path::PathBuf {
    let policies = common::copy_policies(dir);
    let providers = policies.join("providers.toml");
    let mut text = std::fs::read_to_string(&providers).unwrap();
    text.push_str(&format!(
        "\n[[providers]]\nid = \"hostile\"\ntitle = \"A provider that misbehaves (test double)\"\nupstream = \"https://127.0.0.1:{port}\"\n\n\
         [[providers.services]]\nid = \"records\"\ntitle = \"Records\"\noperations = [\"read\"]\nsubject_field = \"id\"\n\
         fields = [\"id\", \"name\", \"birth_date\"]\n"
    ));
    std::fs::write(&providers, text).unwrap();
    let agency = policies.join("agencies/mia-migration.toml");
    let mut text = std::fs::read_to_string(&agency).unwrap();
    text.push_str("\n[[grants]]\nprovider = \"hostile\"\nservice = \"records\"\noperations = [\"read\"]\npurposes = [\"residence-permit-review\"]\nfields = [\"id\", \"name\", \"birth_date\"]\n");
    std::fs::write(&agency, text).unwrap();
    policies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_providers_words_never_reach_the_agency() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let gw = TestGateway::start_configured(Db::Sqlite, |c, dir| {
        c.policies_dir = hostile_policies(dir, port);
        c.gateway.max_response_bytes = 1024 * 1024;
        // Every answer here is an error; the breaker is not what this test is about.
        c.limits.breaker_failures = 1000;
    })
    .await
    .unwrap();
    serve_hostile(listener, &gw.pki()).await;
    let token = gw.token("mia-migration", "residence-permit-review", None);
    let client = gw.client("mia-migration");

    // path → (status the agency gets, problem type, reason recorded, provider status recorded)
    let cases: [(&str, u16, &str, &str, Option<u16>); 12] = [
        ("sql", 400, "bad-request", "upstream_bad_request", Some(400)),
        (
            "auth",
            502,
            "provider-error",
            "upstream_unauthorized",
            Some(401),
        ),
        (
            "forbidden",
            403,
            "provider-denied",
            "upstream_forbidden",
            Some(403),
        ),
        ("crash", 502, "provider-error", "upstream_error", Some(500)),
        ("html", 502, "provider-error", "upstream_error", Some(502)),
        (
            "notjson",
            502,
            "provider-error",
            "upstream_bad_response",
            None,
        ),
        (
            "notfound",
            404,
            "not-found",
            "upstream_not_found",
            Some(404),
        ),
        (
            "invalid",
            422,
            "invalid-field",
            "upstream_invalid_field",
            Some(422),
        ),
        ("conflict", 409, "conflict", "upstream_conflict", Some(409)),
        (
            "redirect",
            502,
            "provider-error",
            "upstream_error",
            Some(302),
        ),
        ("huge", 502, "provider-error", "upstream_too_large", None),
        (
            "huge-error",
            502,
            "provider-error",
            "upstream_too_large",
            None,
        ),
    ];
    for (path, status, kind, reason, upstream) in cases {
        let r = client
            .get(&format!("/v1/hostile/records/{path}"), Some(&token))
            .await;
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status.as_u16(), status, "{path}: {text}");
        assert_eq!(r.content_type(), "application/problem+json", "{path}");
        let problem = r.json();
        assert_eq!(
            problem["type"],
            format!("urn:karibche:problem:{kind}"),
            "{path}: {text}"
        );
        for secret in SECRETS {
            assert!(
                !text.contains(secret),
                "{path}: {secret:?} leaked in {text}"
            );
        }
        assert!(
            !r.headers.contains_key("www-authenticate"),
            "{path}: the agency's token was fine"
        );
        assert!(!r.headers.contains_key("location"), "{path}");
        let record = audit::query(&gw.running.store, &Filter::default())
            .await
            .unwrap()
            .into_iter()
            .find(|rec| rec.entry.id == r.request_id())
            .unwrap();
        assert_eq!(record.entry.reason.as_deref(), Some(reason), "{path}");
        assert_eq!(record.entry.upstream_status, upstream, "{path}");
        assert_eq!(record.entry.status, status, "{path}");
    }
    // The documented types keep the field they name, nothing else.
    let r = client
        .get("/v1/hostile/records/invalid", Some(&token))
        .await;
    assert!(r.json()["detail"].as_str().unwrap().contains("birth_date"));
    let r = client
        .get("/v1/hostile/records/conflict", Some(&token))
        .await;
    assert!(r.json()["detail"].as_str().unwrap().contains("(name)"));
    // And a well-behaved answer still gets through, minimised.
    let r = client.get("/v1/hostile/records/X-1", Some(&token)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["name"], "ok");
    // The records keep their hashes.
    assert!(audit::verify(&gw.running.store, None)
        .await
        .unwrap()
        .intact());
    gw.shutdown().await;
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_data_and_keys_stay_private_under_a_permissive_umask() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("var");
    let (mut child, addr) = common::spawn_gateway(&data, Some("000"));
    // One request, so both databases have written through their WAL.
    let pki = data.join("pki");
    let (cert, key) = karibche::devpki::agency_files(&pki, "mia-border");
    let client = common::Client::new(&pki.join("ca.pem"), Some((&cert, &key)), addr);
    let token = common::dev_token(
        &data.join("keys"),
        "mia-border",
        "officer-1",
        "border-control",
    );
    let r = client
        .get("/v1/registry/persons/RF-0000001", Some(&token))
        .await;
    assert_eq!(r.status, StatusCode::OK);

    let mut private = vec![
        data.join("karibche.db"),
        data.join("karibche.db-wal"),
        data.join("karibche.db-shm"),
        data.join("registry.db"),
        data.join("registry.db-wal"),
        data.join("registry.db-shm"),
        pki.join("ca.key"),
        pki.join("gateway.key"),
        pki.join("registry.key"),
        data.join("keys/pseudonym.key"),
        data.join("keys/audit-node-1.key"),
    ];
    for agency in ["mia-border", "geostat", "ssg", "pdps"] {
        private.push(pki.join(format!("agencies/{agency}.key")));
        private.push(data.join(format!("keys/{agency}.key")));
    }
    for file in &private {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    for d in [
        data.clone(),
        pki.clone(),
        pki.join("agencies"),
        data.join("keys"),
    ] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    // Nothing under the data directory is writable by others, or readable unless public.
    for entry in walk(&data) {
        let m = mode(&entry);
        assert_eq!(m & 0o022, 0, "{} is writable by others", entry.display());
        let public = entry.extension().is_some_and(|e| e == "pem");
        assert!(
            public || m & 0o044 == 0,
            "{} ({m:o}) is readable by others",
            entry.display()
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // An export written by the CLI under the same umask.
    let export = dir.path().join("export.jsonl");
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_karibche"))
        .args(["--data-dir", data.to_str().unwrap()])
        .args(["--policies", policies.to_str().unwrap()])
        .args(["audit", "export", "--output", export.to_str().unwrap()])
        .env("RUST_LOG", "error")
        .status()
        .unwrap();
    assert!(status.success());
    assert!(std::fs::read_to_string(&export)
        .unwrap()
        .contains("RF-0000001"));
    assert_eq!(mode(&export), 0o600);
}

/// Every file and directory under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}
