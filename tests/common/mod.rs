//! Shared helpers for the integration tests: start the real system on
//! ephemeral ports in a temporary directory, and speak real mutual TLS to it.

#![allow(dead_code, clippy::unwrap_used, clippy::field_reassign_with_default)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use karibche::config::Config;
use karibche::server::{self, Listeners, Running};
use karibche::testing::PgDatabase;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

/// A running system with its temporary files.
pub struct TestGateway {
    pub running: Running,
    pub dir: tempfile::TempDir,
    pub config: Config,
    _pg: Option<PgDatabase>,
}

/// Which database the system under test uses.
pub enum Db {
    Sqlite,
    Postgres,
}

fn repo_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

impl TestGateway {
    /// The built-in register's database (its own SQLite file unless on PostgreSQL).
    pub fn registry_store(&self) -> &karibche::store::Store {
        self.running
            .registry_store
            .as_ref()
            .expect("the built-in register runs in this test gateway")
    }

    /// Starts gateway, register and admin on 127.0.0.1:0 with SQLite.
    pub async fn start() -> TestGateway {
        Self::start_with(Db::Sqlite)
            .await
            .expect("SQLite always available")
    }

    /// Starts with the given database; `None` when PostgreSQL is unreachable outside CI.
    pub async fn start_with(db: Db) -> Option<TestGateway> {
        Self::start_configured(db, |_, _| {}).await
    }

    /// Starts after `configure` adjusted the configuration; it may write files under the temporary directory given.
    pub async fn start_configured(
        db: Db,
        configure: impl FnOnce(&mut Config, &Path),
    ) -> Option<TestGateway> {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.data_dir = dir.path().join("var");
        config.policies_dir = repo_policies();
        config.registry.seed_persons = 200;
        config.gateway.upstream_timeout = Duration::from_secs(5);
        let pg = match db {
            Db::Sqlite => None,
            Db::Postgres => Some(PgDatabase::create().await?),
        };
        if let Some(pg) = &pg {
            config.database_url = Some(pg.url.clone());
        }
        configure(&mut config, dir.path());
        let listeners = Listeners {
            gateway: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            registry: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let running = server::start(config.clone(), listeners).await.unwrap();
        Some(TestGateway {
            running,
            dir,
            config,
            _pg: pg,
        })
    }

    pub fn gateway_addr(&self) -> SocketAddr {
        self.running.started.gateway
    }

    pub fn pki(&self) -> PathBuf {
        self.config.pki_dir()
    }

    /// A development token for an agency's officer.
    pub fn token(&self, agency: &str, purpose: &str, case: Option<&str>) -> String {
        self.token_with(
            agency,
            purpose,
            case,
            Duration::from_secs(300),
            Duration::ZERO,
        )
    }

    pub fn token_with(
        &self,
        agency: &str,
        purpose: &str,
        case: Option<&str>,
        ttl: Duration,
        backdate: Duration,
    ) -> String {
        karibche::token::issue(
            &self.config.data_path(&self.config.tokens.keys_dir),
            &karibche::token::IssueRequest {
                agency: agency.into(),
                officer: "officer-1".into(),
                purpose: purpose.into(),
                case_ref: case.map(str::to_owned),
                ttl,
                audience: "karibche".into(),
                backdate,
            },
        )
        .unwrap()
    }

    /// A client presenting `agency`'s development certificate.
    pub fn client(&self, agency: &str) -> Client {
        let (cert, key) = karibche::pki::agency_files(&self.pki(), agency);
        Client::new(
            &self.pki().join("ca.pem"),
            Some((&cert, &key)),
            self.gateway_addr(),
        )
    }

    pub async fn shutdown(self) {
        self.running.shutdown().await;
    }
}

/// A minimal mutual-TLS HTTP/1.1 client; one connection per request keeps tests independent.
pub struct Client {
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn request_id(&self) -> String {
        self.headers["x-request-id"].to_str().unwrap().to_owned()
    }

    pub fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

impl Client {
    pub fn new(ca: &Path, identity: Option<(&Path, &Path)>, addr: SocketAddr) -> Client {
        let roots = karibche::tls::roots(&karibche::pki::load_certs(ca).unwrap()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(karibche::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    karibche::pki::load_certs(cert).unwrap(),
                    karibche::pki::load_key(key).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        Client {
            config: Arc::new(config),
            addr,
        }
    }

    /// A bare TLS connection (handshake done), for tests that write raw HTTP.
    pub async fn tls(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap()
    }

    /// Sends one request; `Err` when the TLS handshake or the connection fails.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> Result<Reply, String> {
        self.send_with(method, path, token, body, &[]).await
    }

    /// [`Client::send`] with extra request headers (e.g. `Idempotency-Key`).
    pub async fn send_with(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("http: {e}"))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(&v).unwrap())
            }
            None => Bytes::new(),
        };
        let resp = sender
            .send_request(req.body(Full::new(body)).unwrap())
            .await
            .map_err(|e| format!("request: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.send(Method::GET, path, token, None).await.unwrap()
    }
}

/// Every leaf path in a JSON value (`visas.number`, …), arrays flattened.
pub fn leaf_paths(v: &serde_json::Value) -> std::collections::BTreeSet<String> {
    fn walk(v: &serde_json::Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(v, &p, out);
                }
            }
            serde_json::Value::Array(a) if a.iter().any(|x| x.is_object()) => {
                for x in a {
                    walk(x, prefix, out);
                }
            }
            _ => {
                out.insert(prefix.to_owned());
            }
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk(v, "", &mut out);
    out
}

/// GET on the plain-HTTP admin listener at `admin`: the status and the body.
pub async fn admin_get(admin: SocketAddr, path: &str) -> (StatusCode, String) {
    let stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "localhost")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// The records of one request, oldest first: its one record, or a change's
/// attempt (which carries the request id) and its outcome.
pub async fn request_records(
    store: &karibche::store::Store,
    request_id: &str,
) -> Vec<karibche::audit::Record> {
    karibche::audit::query(store, &karibche::audit::Filter::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.entry.id == request_id || r.entry.attempt_id.as_deref() == Some(request_id))
        .collect()
}
