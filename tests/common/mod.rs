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
use karibche::runtime::{self, Listeners, Running};
use karibche::testing::PgDatabase;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

impl Db {
    /// The database of tests that do not name one: SQLite, or PostgreSQL with
    /// `KARIBCHE_TEST_DB=postgres`, to run the same attacks against it.
    pub fn from_env() -> Db {
        match std::env::var("KARIBCHE_TEST_DB").as_deref() {
            Ok("postgres") => Db::Postgres,
            _ => Db::Sqlite,
        }
    }
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

    /// Starts gateway, register and admin on 127.0.0.1:0 with [`Db::from_env`]'s database.
    pub async fn start() -> TestGateway {
        Self::start_with(Db::from_env())
            .await
            .expect("the test database is available")
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
            // `configure` may turn the in-process register off (`--no-registry`).
            registry: match config.registry.enabled {
                true => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
                false => None,
            },
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let running = runtime::start(config.clone(), listeners).await.unwrap();
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
        karibche::devpki::token::issue(
            &self.config.data_path(&self.config.tokens.keys_dir),
            &karibche::devpki::token::IssueRequest {
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
        let (cert, key) = karibche::devpki::agency_files(&self.pki(), agency);
        Client::new(
            &self.pki().join("ca.pem"),
            Some((&cert, &key)),
            self.gateway_addr(),
        )
    }

    pub async fn shutdown(self) {
        self.running.shutdown().await;
    }

    /// Stops the system and starts it again on the same files and database.
    pub async fn restart(self) -> TestGateway {
        let TestGateway {
            running,
            dir,
            config,
            _pg,
        } = self;
        running.shutdown().await;
        let listeners = Listeners {
            gateway: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            // `configure` may turn the in-process register off (`--no-registry`).
            registry: match config.registry.enabled {
                true => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
                false => None,
            },
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let running = runtime::start(config.clone(), listeners).await.unwrap();
        TestGateway {
            running,
            dir,
            config,
            _pg,
        }
    }

    /// Waits until no request pipeline runs (those whose clients went away included).
    pub async fn wait_for_pipelines(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.running.gateway.pipelines_in_flight() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "request pipelines still running after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The database name of a PostgreSQL-backed gateway.
    pub fn pg_name(&self) -> Option<String> {
        self._pg
            .as_ref()
            .and_then(|pg| pg.url.rsplit('/').next().map(str::to_owned))
    }

    /// The bodies of `n` border crossings of the example person, one a second
    /// back from now (so each is a distinct crossing, stored with this `at`).
    pub async fn crossings(&self, n: usize) -> Vec<(String, Vec<u8>)> {
        let document = karibche::registry::example_document(self.registry_store())
            .await
            .unwrap()
            .unwrap();
        let now = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap();
        (1..=n)
            .map(|i| {
                let at = (now - Duration::from_secs(i as u64))
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap();
                let body = serde_json::json!({
                    "person_id": karibche::registry::EXAMPLE_PERSON_ID, "direction": "exit",
                    "point": "Sarpi", "at": at, "document_number": document
                });
                (at, serde_json::to_vec(&body).unwrap())
            })
            .collect()
    }

    /// A development token for a named officer of an agency.
    pub fn officer_token(&self, agency: &str, officer: &str, purpose: &str) -> String {
        dev_token(
            &self.config.data_path(&self.config.tokens.keys_dir),
            agency,
            officer,
            purpose,
        )
    }

    /// `/readyz` of the running system: its status.
    pub async fn readyz(&self) -> StatusCode {
        admin_get(self.running.started.admin, "/readyz").await.0
    }

    /// Polls `/readyz` until it answers `want`; panics after `within`.
    pub async fn wait_ready(&self, want: StatusCode, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let (status, body) = admin_get(self.running.started.admin, "/readyz").await;
            if status == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "/readyz is still {status} after {within:?}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A minimal mutual-TLS client, HTTP/1.1 (or HTTP/2 after [`Client::http2`]); one
/// connection per request keeps tests independent.
pub struct Client {
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    http2: bool,
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
        let roots =
            karibche::identity::tls::roots(&karibche::files::load_certs(ca).unwrap()).unwrap();
        let builder =
            rustls::ClientConfig::builder_with_provider(karibche::identity::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
        let config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    karibche::files::load_certs(cert).unwrap(),
                    karibche::files::load_key(key).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        Client {
            config: Arc::new(config),
            addr,
            http2: false,
        }
    }

    /// The same identity speaking HTTP/2 (ALPN `h2`); the authority travels in `:authority`.
    pub fn http2(&self) -> Client {
        let mut config = (*self.config).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Client {
            config: Arc::new(config),
            addr: self.addr,
            http2: true,
        }
    }

    /// An HTTP/2 connection (ALPN `h2`): many requests as streams of one connection.
    /// Dropping a request's response future resets its stream (`RST_STREAM`).
    pub async fn h2(&self) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        let mut config = (*self.config).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        sender
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
        let mut req = self.builder(method, path);
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
        self.request(req.body(Full::new(body)).unwrap()).await
    }

    /// A request to `path` as this client's protocol carries it (HTTP/1.1: `Host`; HTTP/2: `:authority`).
    pub fn builder(&self, method: Method, path: &str) -> http::request::Builder {
        if self.http2 {
            Request::builder()
                .method(method)
                .uri(format!("https://localhost{path}"))
        } else {
            Request::builder()
                .method(method)
                .uri(path)
                .header("host", "localhost")
        }
    }

    /// Sends `req` on a new connection and reads the whole answer; `Err` when the
    /// handshake, the connection or the stream fails.
    pub async fn request<B>(&self, req: Request<B>) -> Result<Reply, String>
    where
        B: hyper::body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let resp = if self.http2 {
            let (mut sender, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                TokioIo::new(tls),
            )
            .await
            .map_err(|e| format!("http: {e}"))?;
            tokio::spawn(conn);
            sender.send_request(req).await
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| format!("http: {e}"))?;
            tokio::spawn(conn);
            sender.send_request(req).await
        }
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

/// The synthetic person every seeded register holds.
pub const PERSON: &str = karibche::registry::EXAMPLE_PERSON_ID;

/// The gateway path of person `id` in the built-in register.
pub fn person_path(id: &str) -> String {
    format!("/v1/registry/persons/{id}")
}

impl TestGateway {
    /// The audit record with id `id`; panics naming it if there is none.
    pub async fn record(&self, id: &str) -> karibche::audit::Record {
        karibche::audit::query(&self.running.store, &karibche::audit::Filter::default())
            .await
            .unwrap()
            .into_iter()
            .find(|r| r.entry.id == id)
            .unwrap_or_else(|| panic!("no audit record {id}"))
    }

    /// The audit record carrying the request id of `reply`.
    pub async fn record_of(&self, reply: &Reply) -> karibche::audit::Record {
        self.record(&reply.request_id()).await
    }
}

/// TLS for a test provider: the register's development certificate under `pki`
/// (which the gateway trusts for providers), clients verified against the CA.
pub fn provider_acceptor(pki: &Path) -> tokio_rustls::TlsAcceptor {
    let config = karibche::identity::tls::server_config(
        karibche::files::load_certs(&pki.join("registry.pem")).unwrap(),
        karibche::files::load_key(&pki.join("registry.key")).unwrap(),
        &karibche::identity::tls::ClientVerification {
            cas: karibche::files::load_certs(&pki.join("ca.pem")).unwrap(),
            ..Default::default()
        },
    )
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A five-minute development token of `officer` (no case), signed with the agency's key in `keys_dir`.
pub fn dev_token(keys_dir: &Path, agency: &str, officer: &str, purpose: &str) -> String {
    karibche::devpki::token::issue(
        keys_dir,
        &karibche::devpki::token::IssueRequest {
            agency: agency.into(),
            officer: officer.into(),
            purpose: purpose.into(),
            case_ref: None,
            ttl: Duration::from_secs(300),
            audience: "karibche".into(),
            backdate: Duration::ZERO,
        },
    )
    .unwrap()
}

/// Polls `check` until it holds or `within` passes.
pub async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
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

/// Sends `head` and `body` over raw TLS and returns the status line and the x-request-id,
/// which must arrive `within` the given time (whether or not the server read the body).
pub async fn raw_exchange(
    gw: &TestGateway,
    agency: &str,
    head: &str,
    body: &[u8],
    within: Duration,
) -> (String, String) {
    let mut bytes = head.as_bytes().to_vec();
    bytes.extend_from_slice(body);
    let answer = raw_answer(gw, agency, &bytes, within).await;
    let id = answer.header("x-request-id").unwrap_or_default().to_owned();
    (answer.status_line().to_owned(), id)
}

/// An HTTP/1.1 answer read off the wire.
#[derive(Debug)]
pub struct RawAnswer {
    /// The status line and the header lines.
    pub head: String,
    /// The body, as far as `Content-Length` says.
    pub body: Vec<u8>,
}

impl RawAnswer {
    pub fn status_line(&self) -> &str {
        self.head.lines().next().unwrap_or_default()
    }

    pub fn status(&self) -> u16 {
        self.status_line()
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Writes `bytes` over raw TLS as `agency` and reads one answer, which must arrive `within`
/// the given time whether or not the server read everything sent.
pub async fn raw_answer(
    gw: &TestGateway,
    agency: &str,
    bytes: &[u8],
    within: Duration,
) -> RawAnswer {
    let mut tls = gw.client(agency).tls().await;
    tls.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        let end = loop {
            if let Some(i) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed without an answer");
            answer.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&answer[..end]).to_string();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while answer.len() < end + length {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        RawAnswer {
            head,
            body: answer[end..].to_vec(),
        }
    })
    .await
    .expect("an answer")
}

// ---- a provider we do not own ------------------------------------------------------------

/// Another ministry's service behind the gateway, played by a small hyper server over real
/// TLS. It is a test double at a boundary we do not own (a provider's own software): it
/// answers every request with `status` and `{"id": "X-1"}`, and while `hold` is set it keeps
/// each request until [`TestProvider::release`] lets it go, recording per
/// `x-karibche-agency` how many requests it holds at once.
pub struct TestProvider {
    pub addr: SocketAddr,
    listener: std::sync::Mutex<Option<TcpListener>>,
    pub state: Arc<ProviderDouble>,
}

/// What the provider double saw and how it answers.
pub struct ProviderDouble {
    seen: std::sync::Mutex<Seen>,
    changed: tokio::sync::Notify,
    /// Per agency: permits that let its held requests go.
    release: std::sync::Mutex<std::collections::BTreeMap<String, Arc<tokio::sync::Semaphore>>>,
    /// The status every answer carries (200 unless set).
    pub status: std::sync::atomic::AtomicU16,
    /// Hold requests until released.
    pub hold: std::sync::atomic::AtomicBool,
    /// A value the test sets; recorded with every arrival (e.g. "agency B is waiting").
    pub mark: std::sync::atomic::AtomicU32,
}

#[derive(Default)]
struct Seen {
    in_flight: std::collections::BTreeMap<String, usize>,
    arrivals: Vec<Arrival>,
}

/// One request as it reached the provider.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub agency: String,
    pub method: String,
    /// Requests held per agency, this one included.
    pub in_flight: std::collections::BTreeMap<String, usize>,
    /// [`ProviderDouble::mark`] when it arrived.
    pub mark: u32,
}

impl TestProvider {
    /// Binds the provider's port (so the policy can name it before the gateway starts).
    pub async fn bind() -> TestProvider {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        TestProvider {
            addr: listener.local_addr().unwrap(),
            listener: std::sync::Mutex::new(Some(listener)),
            state: Arc::new(ProviderDouble {
                seen: Default::default(),
                changed: tokio::sync::Notify::new(),
                release: Default::default(),
                status: std::sync::atomic::AtomicU16::new(200),
                hold: Default::default(),
                mark: Default::default(),
            }),
        }
    }

    /// Serves with the register's certificate from `gw`'s development PKI, trusting the
    /// gateway's CA for the gateway's client certificate.
    pub fn serve(&self, gw: &TestGateway) {
        let acceptor = provider_acceptor(&gw.pki());
        let listener = self.listener.lock().unwrap().take().expect("served once");
        let state = self.state.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, state) = (acceptor.clone(), state.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(state.answer(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
                });
            }
        });
    }

    /// The policy line that names this provider, for `providers.toml`.
    pub fn upstream(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Lets `n` held requests of `agency` go (those held now or later).
    pub fn release(&self, agency: &str, n: usize) {
        self.state.gate(agency).add_permits(n);
    }

    /// Every request seen so far, in order of arrival.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.state.seen.lock().unwrap().arrivals.clone()
    }

    /// Requests held now per agency.
    pub fn in_flight(&self) -> std::collections::BTreeMap<String, usize> {
        self.state.seen.lock().unwrap().in_flight.clone()
    }

    /// Waits (up to 10 s) until `check` holds for the requests held now per agency and every
    /// arrival so far.
    pub async fn until(
        &self,
        what: &str,
        check: impl Fn(&std::collections::BTreeMap<String, usize>, &[Arrival]) -> bool,
    ) {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let changed = self.state.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if check(&self.in_flight(), &self.arrivals()) {
                    return;
                }
                changed.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("provider never saw {what}: {:?}", self.in_flight()));
    }
}

impl ProviderDouble {
    fn gate(&self, agency: &str) -> Arc<tokio::sync::Semaphore> {
        self.release
            .lock()
            .unwrap()
            .entry(agency.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(0)))
            .clone()
    }

    async fn answer(&self, req: Request<hyper::body::Incoming>) -> http::Response<Full<Bytes>> {
        use std::sync::atomic::Ordering;
        let agency = req
            .headers()
            .get("x-karibche-agency")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        {
            let mut seen = self.seen.lock().unwrap();
            *seen.in_flight.entry(agency.clone()).or_default() += 1;
            let arrival = Arrival {
                agency: agency.clone(),
                method: req.method().to_string(),
                in_flight: seen.in_flight.clone(),
                mark: self.mark.load(Ordering::SeqCst),
            };
            seen.arrivals.push(arrival);
        }
        self.changed.notify_waiters();
        if self.hold.load(Ordering::SeqCst) {
            if let Ok(p) = self.gate(&agency).acquire_owned().await {
                p.forget();
            }
        }
        {
            let mut seen = self.seen.lock().unwrap();
            if let Some(n) = seen.in_flight.get_mut(&agency) {
                *n -= 1;
            }
        }
        self.changed.notify_waiters();
        let status = StatusCode::from_u16(self.status.load(Ordering::SeqCst)).unwrap();
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"id":"X-1"}"#)))
            .unwrap()
    }
}

/// A copy of the repository's policies under `dir` in which provider `id` (at `upstream`)
/// offers a read service `records` to each `(agency, purpose)` given.
pub fn policies_with_provider(
    dir: &Path,
    id: &str,
    upstream: &str,
    grants: &[(&str, &str)],
) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }
    let to = dir.join("policies");
    copy(&repo_policies(), &to);
    let mut providers = std::fs::read_to_string(to.join("providers.toml")).unwrap();
    providers.push_str(&format!(
        "\n[[providers]]\nid = \"{id}\"\ntitle = \"Another ministry's service\"\nupstream = \"{upstream}\"\n\n[[providers.services]]\nid = \"records\"\ntitle = \"Records\"\noperations = [\"read\"]\nsubject_field = \"id\"\n"
    ));
    std::fs::write(to.join("providers.toml"), providers).unwrap();
    for (agency, purpose) in grants {
        let file = to.join(format!("agencies/{agency}.toml"));
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str(&format!(
            "\n[[grants]]\nprovider = \"{id}\"\nservice = \"records\"\noperations = [\"read\"]\npurposes = [\"{purpose}\"]\nfields = [\"id\"]\n"
        ));
        std::fs::write(file, text).unwrap();
    }
    to
}

/// A raw HTTP/2 connection (the `h2` crate) as `agency`, for frames hyper's client would not send.
pub async fn h2_connection(gw: &TestGateway, agency: &str) -> h2::client::SendRequest<Bytes> {
    let client = gw.client(agency).http2();
    let tls = client.tls().await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await.unwrap()
}

/// Sends `head` on `conn` and then `body` in pieces, each only once the peer gives flow-control
/// capacity (as a simple client would: all of the body first, then the answer). The answer's
/// status, headers and body, or what went wrong.
pub async fn h2_exchange(
    conn: &mut h2::client::SendRequest<Bytes>,
    head: Request<()>,
    body: &[u8],
    end: bool,
) -> Result<Reply, String> {
    let (response, mut stream) = conn
        .send_request(head, body.is_empty() && end)
        .map_err(|e| format!("send headers: {e}"))?;
    let mut rest = body;
    while !rest.is_empty() {
        stream.reserve_capacity(rest.len().min(64 * 1024));
        let n = std::future::poll_fn(|cx| stream.poll_capacity(cx))
            .await
            .ok_or("stream closed while sending")?
            .map_err(|e| format!("capacity: {e}"))?;
        let (piece, after) = rest.split_at(n.min(rest.len()));
        rest = after;
        stream
            .send_data(Bytes::copy_from_slice(piece), rest.is_empty() && end)
            .map_err(|e| format!("send data: {e}"))?;
    }
    let resp = response.await.map_err(|e| format!("response: {e}"))?;
    let (parts, mut recv) = resp.into_parts();
    let mut out = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(|e| format!("response body: {e}"))?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body: Bytes::from(out),
    })
}

/// Where `karibche serve` says the gateway listens, from its banner.
pub fn gateway_from_banner(line: &str) -> Option<std::net::SocketAddr> {
    let rest = line.trim().strip_prefix("gateway")?.trim();
    let addr = rest.strip_prefix("https://")?.split('/').next()?;
    addr.parse().ok()
}

/// A TLS ClientHello offering only `version` (0x0301 = TLS 1.0, 0x0302 = TLS 1.1, 0x0303 =
/// TLS 1.2) and CBC-era suites, naming `server_name` in SNI (any bytes, an IP address too).
pub fn client_hello(version: [u8; 2], server_name: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend(version);
    body.extend([7u8; 32]);
    body.push(0);
    // Including a suite the gateway does speak (ECDHE-RSA-AES128-GCM), so only the version is wrong.
    let suites: [u16; 6] = [0xc02b, 0xc013, 0xc014, 0x002f, 0x0035, 0x000a];
    body.extend(((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend(s.to_be_bytes());
    }
    body.extend([1, 0]);
    let mut ext = Vec::new();
    let name = server_name.as_bytes();
    let mut sni = Vec::new();
    sni.extend(((name.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend((name.len() as u16).to_be_bytes());
    sni.extend(name);
    ext.extend(0u16.to_be_bytes());
    ext.extend((sni.len() as u16).to_be_bytes());
    ext.extend(sni);
    ext.extend([0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x17]); // supported_groups: secp256r1
    ext.extend([0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]); // ec_point_formats: uncompressed
                                                      // signature_algorithms (ecdsa_secp256r1_sha256, rsa_pkcs1_sha256): without it rustls stops
                                                      // earlier with handshake_failure; with it, the version alone decides.
    ext.extend([0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x04, 0x01]);
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut hs = vec![1u8];
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((hs.len() as u16).to_be_bytes());
    record.extend(hs);
    record
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

/// A JSON POST request with a bearer token, for [`Client::h2`] and raw exchanges.
pub fn post_request(path: &str, token: &str, body: &[u8]) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("https://localhost{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap()
}

/// The bytes of an HTTP/1.1 JSON POST, as a client writes them on the wire.
pub fn http1_post(path: &str, token: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// Hex SHA-256, as the log records request and response digests.
pub fn sha256_hex(bytes: &[u8]) -> String {
    karibche::files::sha256_hex(bytes)
}

/// A tiny deterministic generator (splitmix64) for random timings in tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A small tmpfs mounted for one test (unmounted when dropped, also on panic).
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    /// Mounts `size` (e.g. `"4m"`) at a fresh directory; `None` (with a note)
    /// where mounting is not permitted and `CI` is unset.
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir =
            std::env::temp_dir().join(format!("karibche-tmpfs-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::fs::remove_dir(&dir);
            if std::env::var_os("CI").is_some() {
                panic!("cannot mount a tmpfs in CI (the storage fault tests need root)");
            }
            eprintln!("note: cannot mount a tmpfs (not root?); skipping the full-disk test");
            return None;
        }
        Some(Tmpfs { dir })
    }

    /// Fills the filesystem up with a file `name`; returns its path.
    pub fn fill(&self, name: &str) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let small = [0u8; 512];
        while f.write_all(&small).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a file still open somewhere must not keep the mount (and the test) alive.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A `karibche serve` process of the real binary, killed (SIGKILL) when dropped.
pub struct ServeProcess {
    pub child: KillOnDrop,
    pub gateway: SocketAddr,
    pub admin: SocketAddr,
}

impl ServeProcess {
    /// SIGKILL, then reap: no shutdown path runs.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a spawned `serve` ended up: ready to serve, or exited before (with its standard error).
pub enum Spawned {
    Ready(ServeProcess),
    Exited { code: Option<i32>, stderr: String },
}

impl Spawned {
    /// The running process; panics (with its standard error) if it exited.
    pub fn ready(self) -> ServeProcess {
        match self {
            Spawned::Ready(p) => p,
            Spawned::Exited { code, stderr } => {
                panic!("karibche serve exited ({code:?}) before it was ready:\n{stderr}")
            }
        }
    }
}

/// Starts the real binary's `serve` on ephemeral ports, with data under `data`, the
/// repository's policies, 100 synthetic persons and `args` (e.g. `--node`, `--database-url`);
/// returns once it is ready (it printed its banner) or has exited.
pub fn spawn_serve(data: &Path, args: &[&str]) -> Spawned {
    spawn_serve_with(data, &repo_policies(), None, args)
}

/// [`spawn_serve`] with the policies in `policies`, under `umask` when given (through
/// `sh -c 'umask …; exec karibche …'`): the one way tests start the real binary.
pub fn spawn_serve_with(
    data: &Path,
    policies: &Path,
    umask: Option<&str>,
    args: &[&str],
) -> Spawned {
    match spawn_until_banner(serve_command(data, policies, umask, args), &SERVE_BANNER) {
        Ok((child, addrs)) => Spawned::Ready(ServeProcess {
            child,
            gateway: addrs[0],
            admin: addrs[1],
        }),
        Err((code, stderr)) => Spawned::Exited { code, stderr },
    }
}

/// The banner lines naming the gateway's and the admin endpoint's addresses.
const SERVE_BANNER: [&str; 2] = ["gateway", "health, metrics"];

/// The command line of [`spawn_serve_with`].
fn serve_command(
    data: &Path,
    policies: &Path,
    umask: Option<&str>,
    args: &[&str],
) -> std::process::Command {
    use std::process::Command;
    let bin = env!("CARGO_BIN_EXE_karibche");
    let mut command = match umask {
        Some(mask) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("umask {mask}; exec \"$0\" \"$@\""))
                .arg(bin);
            c
        }
        None => Command::new(bin),
    };
    command
        .args(["--data-dir", data.to_str().unwrap()])
        .args(["--policies", policies.to_str().unwrap()])
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen"])
        .args(["127.0.0.1:0", "--registry-listen", "127.0.0.1:0"])
        .args(["--seed-persons", "100"])
        .args(args);
    command
}

/// Copies the repository's policies under `dir` and adds a provider
/// `ministry` at `url` on whose service `notes` the Border Police may write
/// (`{"person_id": …, "note": …}`); returns the copy's directory.
pub fn policies_with_write_provider(dir: &Path, url: &str) -> PathBuf {
    let out = copy_policies(dir);
    let append = |file: &str, text: String| {
        let path = out.join(file);
        let mut s = std::fs::read_to_string(&path).unwrap();
        s.push_str(&text);
        std::fs::write(path, s).unwrap();
    };
    append(
        "providers.toml",
        format!(
            "\n[[providers]]\nid = \"ministry\"\ntitle = \"Another ministry's service\"\nupstream = \"{url}\"\n\n\
             [[providers.services]]\nid = \"notes\"\ntitle = \"Notes about a person\"\noperations = [\"write\"]\n\
             subject_field = \"person_id\"\nfields = [\"id\", \"person_id\", \"note\"]\n"
        ),
    );
    append(
        "agencies/mia-border.toml",
        "\n[[grants]]\nprovider = \"ministry\"\nservice = \"notes\"\noperations = [\"write\"]\n\
         purposes = [\"border-control\"]\nfields = [\"id\", \"person_id\", \"note\"]\n"
            .to_owned(),
    );
    out
}

/// Serves, on `listener`, a provider that takes requests and never answers;
/// each connection's first bytes are sent on the returned channel once they
/// stopped coming (the provider holds the request).
///
/// A test double at a boundary karibche does not own: another ministry's
/// service, slow at the worst moment. It speaks real TLS with the register's
/// development certificate under `pki` (which the gateway trusts for providers).
pub fn holding_provider(
    listener: std::net::TcpListener,
    pki: &Path,
) -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let acceptor = provider_acceptor(pki);
    listener.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(listener).unwrap();
    let (held, holding) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, held) = (acceptor.clone(), held.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                // Read until the request (HTTP/1.1 or HTTP/2 frames) has arrived, then hold it.
                while let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(200), tls.read(&mut buf)).await
                {
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                let _ = held.try_send(seen);
                // Hold the connection without answering until the gateway is gone.
                while tls.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                let _ = tls.shutdown().await;
            });
        }
    });
    holding
}

/// Generates the development PKI and agency keys under `config`'s data
/// directory ahead of the start (as `serve` would), for test doubles that need them first.
pub fn dev_pki_ahead(config: &Config) {
    let policy = karibche::policy::Policy::load(&repo_policies()).unwrap();
    let names: Vec<&str> = policy.agencies().map(|a| a.id.as_str()).collect();
    karibche::devpki::ensure_dev_pki(&config.pki_dir(), &names).unwrap();
    karibche::devpki::ensure_signing_keys(&config.data_path(&config.tokens.keys_dir), &names)
        .unwrap();
}

/// Every person of a nationality as the statistics office receives them
/// (pseudonymised), following the sealed cursors page by page.
pub async fn geostat_persons(gw: &TestGateway, nationality: &str) -> Vec<serde_json::Value> {
    let token = gw.token("geostat", "official-statistics", None);
    let client = gw.client("geostat");
    let mut path = format!("/v1/registry/persons?nationality={nationality}&limit=50");
    let mut out = Vec::new();
    for _ in 0..100 {
        let r = client.get(&path, Some(&token)).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        let page = r.json();
        out.extend(page["results"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(next) => {
                path =
                    format!("/v1/registry/persons?nationality={nationality}&limit=50&cursor={next}")
            }
            None => return out,
        }
    }
    panic!("pagination does not end")
}

/// Starts the real binary (under `umask` when given, see [`spawn_serve_with`]); returns
/// it and the gateway address once ready. The child is killed and reaped when the guard
/// drops, so a failing test never leaves a gateway behind holding the test harness's
/// output pipe.
pub fn spawn_gateway(data: &Path, umask: Option<&str>) -> (KillOnDrop, SocketAddr) {
    spawn_gateway_with(data, umask, &repo_policies())
}

/// [`spawn_gateway`] with the policies in `policies`.
pub fn spawn_gateway_with(
    data: &Path,
    umask: Option<&str>,
    policies: &Path,
) -> (KillOnDrop, SocketAddr) {
    let p = spawn_serve_with(data, policies, umask, &[]).ready();
    (p.child, p.gateway)
}

/// A copy of the repository's policy directory under `dir`, to edit in a test.
pub fn copy_policies(dir: &Path) -> PathBuf {
    let to = dir.join("policies");
    copy_dir(&repo_policies(), &to);
    to
}

/// Copies the directory tree `from` to `to` (created).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped, even on panic.
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The path of an outside tool a test needs (haproxy, promtool, chromium, …);
/// panics naming the package when it is missing (`bash .ci/run` installs them).
pub fn require_tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("this test needs `{name}` (package {package}); `bash .ci/run` installs it")
}

/// A `karibche witness` served in-process (issue 17).
pub struct RunningWitness {
    /// The witness: its key and state.
    pub witness: std::sync::Arc<karibche::witness::Witness>,
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// Send `true` to stop it.
    pub stop: tokio::sync::watch::Sender<bool>,
    /// The server task.
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts a witness on `port` (0: ephemeral) keeping its state in `dir`.
pub async fn start_witness(
    dir: &std::path::Path,
    logs: Vec<karibche::witness::KnownLog>,
    port: u16,
) -> RunningWitness {
    let witness =
        std::sync::Arc::new(karibche::witness::Witness::open(dir, "witness.test", logs).unwrap());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(karibche::witness::serve(witness.clone(), listener, rx));
    RunningWitness {
        witness,
        addr,
        stop,
        task,
    }
}

impl RunningWitness {
    /// Stops it and waits for its listener to close.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// An audit writer for `name` on `store` signing a tree head every 5 records.
pub async fn audit_node(
    store: &karibche::store::Store,
    key: std::sync::Arc<karibche::audit::AuditKey>,
    name: &str,
) -> (karibche::audit::AuditLog, karibche::audit::AuditWriter) {
    let mut config = karibche::audit::AuditConfig::new(name);
    config.checkpoints = Some(karibche::audit::CheckpointPolicy {
        key,
        every: 5,
        interval: Duration::from_secs(3600),
    });
    karibche::audit::AuditLog::start(store.clone(), config)
        .await
        .unwrap()
}

/// Appends `n` reads with ids `{prefix}-{i}`, each recording the release of
/// the body [`read_body`]`(prefix, i)`.
pub async fn write_reads(log: &karibche::audit::AuditLog, prefix: &str, n: usize) {
    for i in 0..n {
        log.append(karibche::audit::Entry {
            id: format!("{prefix}-{i}"),
            ts: karibche::audit::now_ts(),
            method: "GET".into(),
            path: format!("/v1/registry/persons/RF-{i}"),
            decision: "allow".into(),
            status: 200,
            policy_version: "v".into(),
            subjects: vec![format!("RF-{i}")],
            response_digest: Some(sha256_hex(read_body(prefix, i).as_bytes())),
            ..karibche::audit::Entry::default()
        })
        .await
        .unwrap();
    }
}

/// The response body [`write_reads`] records for read `i`.
pub fn read_body(prefix: &str, i: usize) -> String {
    format!("{{\"id\":\"RF-{i}\",\"request\":\"{prefix}\"}}")
}

/// A `karibche registry serve` process of the real binary, killed (SIGKILL) when dropped.
pub struct RegistryProcess {
    pub child: KillOnDrop,
    /// Its TLS API (what a gateway's providers.toml names).
    pub api: SocketAddr,
    /// Its health and metrics.
    pub admin: SocketAddr,
}

/// Starts `karibche registry serve` with data (PKI, `registry.db`) under `data`
/// and `args` (`--listen`, `--seed-persons`, `--database-url`, …); returns once
/// its banner is out, or panics with its standard error.
pub fn spawn_registry(data: &Path, args: &[&str]) -> RegistryProcess {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_karibche"));
    command
        .args(["--data-dir", data.to_str().unwrap()])
        .args(["registry", "serve"])
        .args(args);
    match spawn_until_banner(command, &["register", "health, metrics"]) {
        Ok((child, addrs)) => RegistryProcess {
            child,
            api: addrs[0],
            admin: addrs[1],
        },
        Err((code, stderr)) => {
            panic!("karibche registry serve exited ({code:?}) before it was ready:\n{stderr}")
        }
    }
}

/// Starts `command` (a `karibche` server, logging at warn) and reads its banner until a
/// line starting with each of `labels` has named an address (`label  scheme://ADDR…`);
/// the addresses in the order of `labels`, or how it exited (code, standard error).
fn spawn_until_banner(
    command: std::process::Command,
    labels: &[&str],
) -> Result<(KillOnDrop, Vec<SocketAddr>), (Option<i32>, String)> {
    spawn_until_banner_logging(command, labels, None)
}

/// [`spawn_until_banner`], with standard error written to a file at a `RUST_LOG` level
/// when `log` is given (an early exit then reports no standard error).
fn spawn_until_banner_logging(
    mut command: std::process::Command,
    labels: &[&str],
    log: Option<(std::fs::File, &str)>,
) -> Result<(KillOnDrop, Vec<SocketAddr>), (Option<i32>, String)> {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    let child = command
        .env("RUST_LOG", log.as_ref().map_or("warn", |(_, level)| level))
        .stdout(Stdio::piped())
        .stderr(match log {
            Some((file, _)) => Stdio::from(file),
            None => Stdio::piped(),
        })
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    // Standard error is drained on a thread so the child never blocks on a full pipe.
    let stderr = child.stderr.take();
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut stderr) = stderr {
            let _ = stderr.read_to_string(&mut s);
        }
        s
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr_after = |line: &str, label: &str| -> Option<SocketAddr> {
        let rest = line.trim().strip_prefix(label)?.trim();
        rest.split("://")
            .nth(1)?
            .split(['/', ' '])
            .next()?
            .parse()
            .ok()
    };
    let mut found: Vec<Option<SocketAddr>> = vec![None; labels.len()];
    for line in lines.by_ref() {
        let Ok(line) = line else { break };
        for (slot, label) in found.iter_mut().zip(labels) {
            *slot = slot.or_else(|| addr_after(&line, label));
        }
        if found.iter().all(Option::is_some) {
            // Keep draining standard output too.
            std::thread::spawn(move || for _ in lines {});
            return Ok((child, found.into_iter().flatten().collect()));
        }
    }
    let status = child.wait().unwrap();
    Err((status.code(), errors.join().unwrap_or_default()))
}

/// A copy of the repository's policies under `dir` whose register is served at `url`
/// (its own process) instead of inside the gateway.
pub fn policies_with_registry_at(dir: &Path, url: &str) -> PathBuf {
    let out = copy_policies(dir);
    let path = out.join("providers.toml");
    let s = std::fs::read_to_string(&path).unwrap();
    assert!(s.contains("upstream = \"builtin:registry\""));
    std::fs::write(
        path,
        s.replace(
            "upstream = \"builtin:registry\"",
            &format!("upstream = \"{url}\""),
        ),
    )
    .unwrap();
    out
}

/// A configuration whose data directory is `dir/var` with the development PKI
/// and agency keys made ahead: what separate processes (a register, gateway
/// replicas) share, as they would share a volume.
pub fn shared_data(dir: &Path) -> Config {
    let config = Config {
        data_dir: dir.join("var"),
        ..Config::default()
    };
    dev_pki_ahead(&config);
    config
}

/// [`spawn_serve_with`] logging to the file `log` at `level` (`RUST_LOG`), for tests that read the logs.
pub fn spawn_serve_logging_to(
    data: &Path,
    policies: &Path,
    args: &[&str],
    log: &Path,
    level: &str,
) -> Spawned {
    let file = std::fs::File::create(log).unwrap();
    let command = serve_command(data, policies, None, args);
    match spawn_until_banner_logging(command, &SERVE_BANNER, Some((file, level))) {
        Ok((child, addrs)) => Spawned::Ready(ServeProcess {
            child,
            gateway: addrs[0],
            admin: addrs[1],
        }),
        Err((code, stderr)) => Spawned::Exited { code, stderr },
    }
}
