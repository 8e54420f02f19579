//! Listeners and the whole system's lifecycle.
//!
//! [`start`] builds everything from a [`Config`] and bound listeners — PKI,
//! database, policies, audit writer, the register, the gateway, the admin
//! endpoint — and returns once all of it is ready; [`serve`] additionally
//! waits for a shutdown signal. Tests call [`start`] with `127.0.0.1:0`
//! listeners and talk to the real thing.
//!
//! Every TLS listener shares one accept loop ([`serve_tls`]): a semaphore caps
//! connections, the handshake has its own timeout, hyper's header-read timeout
//! bounds slow clients, and shutdown stops accepting, lets requests in flight
//! finish within a grace period, and returns.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::BodyExt;

use crate::admin::AdminState;
use crate::audit::{AuditConfig, AuditLog, AuditWriter};
use crate::config::Config;
use crate::gateway::forward::breaker::{BreakerSettings, Providers};
use crate::gateway::{upstream_client, Gateway, PipelineLimits};
use crate::identity::tls;
use crate::identity::token::{KeyStore, VerifyOptions};
use crate::identity::{ConnInfo, PeerCert};
use crate::limits::{LimitSet, Limits};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::problem::{Body, Problem};
use crate::store::{Schema, Store};
use connections::ConnectionCaps;

pub mod connections;
pub mod reload;

/// Bounds applied to every connection of one listener.
#[derive(Debug, Clone)]
pub struct ListenLimits {
    /// Connections served at once; further ones are refused.
    pub max_connections: usize,
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for request headers.
    pub header_timeout: Duration,
    /// Time requests in flight get to finish at shutdown.
    pub shutdown_grace: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Connections per agency; `None` on listeners agencies do not use.
    pub per_agency: Option<Arc<ConnectionCaps>>,
}

pub use reload::Shutdown;

/// Resolves once `rx` is (or turns) true, or its sender is gone.
async fn stopped(rx: &mut Shutdown) {
    // The borrow `wait_for` returns is not `Send`; drop it before any await.
    let _ = rx.wait_for(|s| *s).await.map(drop);
}

/// Connections over a cap are still told why (a TLS handshake, then 503) while
/// there are at most this many of them at once; past that they are closed unanswered.
const REFUSING_AT_ONCE: usize = 64;

/// A connection's place: served, or only told it is over a cap (`refused`).
struct Admission {
    /// Held for the connection's life: a slot of the total cap, or of the refusals.
    _slot: tokio::sync::OwnedSemaphorePermit,
    refused: Option<&'static str>,
}

/// When a connection last had a request, and how many it has in flight (for the idle timeout).
struct Activity {
    state: std::sync::Mutex<(usize, std::time::Instant)>,
    served: std::sync::atomic::AtomicU64,
    ended: tokio::sync::Notify,
}

/// Marks a request in flight on its connection until dropped.
struct InFlight(Arc<Activity>);

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            state: std::sync::Mutex::new((0, std::time::Instant::now())),
            served: std::sync::atomic::AtomicU64::new(0),
            ended: tokio::sync::Notify::new(),
        })
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        if let Ok(mut st) = self.state.lock() {
            st.0 += 1;
        }
        InFlight(self.clone())
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Resolves once no request has been in flight for `idle` and at least `min_served` were answered.
    async fn idle(&self, idle: Duration, min_served: u64) {
        loop {
            let (in_flight, last) = match self.state.lock() {
                Ok(st) => *st,
                Err(_) => return,
            };
            if in_flight > 0 || self.served() < min_served {
                self.ended.notified().await;
                continue;
            }
            let since = last.elapsed();
            if since >= idle {
                return;
            }
            tokio::time::sleep(idle - since).await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut st) = self.0.state.lock() {
            st.0 = st.0.saturating_sub(1);
            st.1 = std::time::Instant::now();
        }
        self.0.served.fetch_add(1, Ordering::Relaxed);
        self.0.ended.notify_one();
    }
}

/// The answer on a connection over a cap.
fn over_capacity(detail: &'static str) -> Response<Body> {
    let mut resp = Problem::new(
        http::StatusCode::SERVICE_UNAVAILABLE,
        "over-capacity",
        "Service unavailable",
        detail,
    )
    .to_response();
    resp.headers_mut()
        .insert(http::header::RETRY_AFTER, http::HeaderValue::from(1u32));
    resp
}

/// The answer to a `HEAD`: the headers the `GET`'s answer has, its length included, and
/// no body. HTTP/1.1 drops the body of a `HEAD` answer by itself; HTTP/2 does not.
fn without_body(resp: Response<Body>) -> Response<Body> {
    use hyper::body::Body as _;
    let (mut parts, body) = resp.into_parts();
    if let Some(n) = body.size_hint().exact() {
        parts
            .headers
            .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(n));
    }
    Response::from_parts(parts, Body::default())
}

/// An HTTP version a TLS connection agreed on.
#[derive(Debug, Clone, Copy)]
enum Protocol {
    Http1,
    Http2,
}

/// A connection builder for one HTTP version, with the listener's bounds.
///
/// ALPN has chosen the version by the time hyper gets the connection (HTTP/2
/// over TLS requires it; no ALPN means HTTP/1.1), so hyper does not sniff the
/// first bytes: sniffing hands them back as a prefix, which doubles HTTP/1.1's
/// read buffer to 16 KiB for the connection's life.
fn protocol_builder(limits: &ListenLimits, protocol: Protocol) -> auto::Builder<TokioExecutor> {
    // The documented bound on a request's head (64 KiB) is held to exactly in the gateway's
    // handler, which answers 431 problem+json and records it (src/gateway/body.rs). hyper's own
    // bounds sit twice as high, so a request a little over the limit still reaches the
    // handler; only one over these gets hyper's bare 431 (or, on HTTP/2, for a header block
    // far larger still, the connection's end), counted as `header_too_large`.
    const HARD_HEAD_BOUND: usize = 2 * crate::gateway::MAX_HEAD_BYTES;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(HARD_HEAD_BOUND);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(HARD_HEAD_BOUND as u32);
    match protocol {
        Protocol::Http1 => builder.http1_only(),
        Protocol::Http2 => builder.http2_only(),
    }
}

/// Serves HTTP/1.1 and HTTP/2 over TLS on `listener` until `shutdown` turns true.
///
/// Every bound counts in `/metrics` when it acts: the total and per-agency
/// connection caps (the connection gets one 503, then is closed), the
/// handshake and header timeouts, oversized headers (hyper answers 431) and
/// the idle timeout. At shutdown the listener closes, idle connections close,
/// requests in flight finish within the grace period, and the rest are cut.
pub async fn serve_tls<H, F>(
    name: &'static str,
    listener: TcpListener,
    tls: Arc<crate::identity::tls::ReloadableTls>,
    limits: ListenLimits,
    metrics: Arc<Metrics>,
    handler: H,
    shutdown: Shutdown,
) where
    H: Fn(Arc<ConnInfo>, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSING_AT_ONCE));
    let mut conns = tokio::task::JoinSet::new();
    let builders = Arc::new([
        protocol_builder(&limits, Protocol::Http1),
        protocol_builder(&limits, Protocol::Http2),
    ]);
    let mut stop = shutdown.clone();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped(&mut stop) => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = name, %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        let admission = match slots.clone().try_acquire_owned() {
            Ok(p) => Admission {
                _slot: p,
                refused: None,
            },
            Err(_) => {
                metrics.overload(name, "connections_total");
                match refusing.clone().try_acquire_owned() {
                    Ok(p) => Admission {
                        _slot: p,
                        refused: Some(
                            "the gateway is serving its maximum of connections; retry shortly",
                        ),
                    },
                    Err(_) => {
                        tracing::debug!(listener = name, %peer, "connection closed unanswered: over capacity");
                        continue;
                    }
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.current());
        let mut replaced = tls.replaced();
        let handler = handler.clone();
        let metrics = metrics.clone();
        let builders = builders.clone();
        let limits = limits.clone();
        let mut shutdown = shutdown.clone();
        conns.spawn(async move {
            let tls_stream =
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(err)) => {
                        metrics.handshake_failed(name);
                        tracing::debug!(listener = name, %peer, %err, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        metrics.handshake_failed(name);
                        metrics.overload(name, "handshake_timeout");
                        tracing::debug!(listener = name, %peer, "TLS handshake timed out");
                        return;
                    }
                };
            let client = tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|der| PeerCert::from_der(der));
            let mut refused = admission.refused;
            let _agency_slot = match (&limits.per_agency, refused) {
                (Some(caps), None) => match caps.admit(client.as_ref()) {
                    Ok(slot) => Some(slot),
                    Err(agency) => {
                        metrics.overload(name, "connections_agency");
                        tracing::info!(listener = name, %peer, agency, "connection refused: the agency holds its maximum of connections");
                        refused = Some("your agency holds its maximum of open connections; reuse or close one");
                        None
                    }
                },
                _ => None,
            };
            let info = Arc::new(ConnInfo {
                peer,
                client,
                pipelines: Arc::default(),
            });
            metrics.connection_opened(name);
            let activity = Activity::new();
            let svc = {
                let activity = activity.clone();
                service_fn(move |req: Request<Incoming>| {
                    let handler = handler.clone();
                    let info = info.clone();
                    let in_flight = activity.begin();
                    let head = req.method() == http::Method::HEAD;
                    async move {
                        let resp = match refused {
                            Some(detail) => over_capacity(detail),
                            // Unboxed: handlers hand out small futures (the gateway's
                            // awaits a task; the register boxes its own).
                            None => handler(info, req).await,
                        };
                        drop(in_flight);
                        Ok::<_, Infallible>(if head { without_body(resp) } else { resp })
                    }
                })
            };
            let builder = match tls_stream.get_ref().1.alpn_protocol() {
                Some(b"h2") => &builders[1],
                _ => &builders[0],
            };
            let conn = builder
                .serve_connection(TokioIo::new(tls_stream), svc)
                .into_owned();
            tokio::pin!(conn);
            // A refused connection gets its one answer, then closes; it never waits long for a request.
            let (idle, min_served) = match refused {
                Some(_) => (Duration::ZERO, 1),
                None => (limits.idle_timeout, 0),
            };
            let deadline = tokio::time::sleep(limits.header_timeout);
            tokio::pin!(deadline);
            let mut closing = false;
            let result = loop {
                tokio::select! {
                    r = conn.as_mut() => break r,
                    _ = stopped(&mut shutdown), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    // New TLS configuration (e.g. a CRL): close, so the client re-handshakes under it.
                    Ok(()) = replaced.changed(), if !closing => {
                        closing = true;
                        metrics.overload(name, "tls_reloaded");
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = activity.idle(idle, min_served), if !closing => {
                        closing = true;
                        if refused.is_none() {
                            metrics.overload(name, "idle_timeout");
                        }
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = &mut deadline, if refused.is_some() => break Ok(()),
                }
            };
            if let Err(err) = result {
                match err.downcast_ref::<hyper::Error>() {
                    // hyper's header timer also runs while HTTP/1.1 waits for the next request.
                    Some(e) if e.is_timeout() && activity.served() == 0 => {
                        metrics.overload(name, "header_timeout");
                        tracing::debug!(listener = name, %peer, "request headers too slow; connection closed");
                    }
                    Some(e) if e.is_timeout() => metrics.overload(name, "idle_timeout"),
                    Some(e) if e.is_parse_too_large() => {
                        metrics.overload(name, "header_too_large");
                        tracing::debug!(listener = name, %peer, "request headers too large");
                    }
                    _ => tracing::debug!(listener = name, %peer, %err, "connection ended with an error"),
                }
            }
            metrics.connection_closed(name);
            drop(admission);
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            listener = name,
            open = conns.len(),
            "connections still open after the grace period; closing them"
        );
        conns.shutdown().await;
    }
}

/// Serves plain HTTP/1.1 (the admin endpoint) until `shutdown` turns true.
pub async fn serve_plain<H, F>(listener: TcpListener, handler: H, mut shutdown: Shutdown)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.changed() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(err) => {
                    tracing::warn!(listener = "admin", %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let svc = service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(5))
            .serve_connection(TokioIo::new(stream), svc);
        let fut = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = fut.await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

/// The listeners the system serves on, bound by the caller (tests bind port 0).
#[derive(Debug)]
pub struct Listeners {
    /// Agencies connect here.
    pub gateway: TcpListener,
    /// The built-in register; `None` when it is disabled.
    pub registry: Option<TcpListener>,
    /// Health and metrics.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses in the configuration.
    pub async fn bind(config: &Config) -> Result<Listeners, StartError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        Ok(Listeners {
            gateway: bind(config.gateway.listen).await?,
            registry: if config.registry.enabled {
                Some(bind(config.registry.listen).await?)
            } else {
                None
            },
            admin: bind(config.admin.listen).await?,
        })
    }
}

/// Why the system could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The policy files are broken; every problem is listed with file:line.
    #[error("the policy files in {dir} are not valid:\n{errors}")]
    Policy {
        /// The policy directory.
        dir: String,
        /// The problems.
        errors: crate::policy::PolicyErrors,
    },
    /// The quota file (`limits.toml`) is broken; every problem is listed with file:line.
    #[error("the quotas are not valid:\n{0}")]
    Limits(#[from] crate::limits::LimitErrors),
    /// A certificate or key file could not be read.
    #[error(transparent)]
    Files(#[from] crate::files::FileError),
    /// The development certificates or keys could not be created.
    #[error(transparent)]
    Pki(#[from] crate::devpki::PkiError),
    /// A TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] crate::identity::tls::TlsError),
    /// An agency's token key could not be loaded.
    #[error(transparent)]
    Keys(#[from] crate::identity::token::KeyLoadError),
    /// The database could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The audit log could not be started.
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
    /// The node's audit signing key could not be loaded or created.
    #[error(transparent)]
    AuditKey(#[from] crate::audit::checkpoint::AuditKeyError),
    /// The register could not be seeded.
    #[error("register: {0}")]
    Registry(#[from] crate::registry::RegistryError),
    /// The pseudonymisation secret could not be read or created.
    #[error("pseudonym key {path}: {source}")]
    Pseudonyms {
        /// The key file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A blocking start-up task failed to run.
    #[error("start-up task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Facts about the running system, printed once it is ready.
#[derive(Debug, Clone)]
pub struct Started {
    /// Where the gateway listens.
    pub gateway: SocketAddr,
    /// Where the register listens, if it runs.
    pub registry: Option<SocketAddr>,
    /// Where health and metrics are served.
    pub admin: SocketAddr,
    /// The database URL in use.
    pub database_url: String,
    /// The policy version in force.
    pub policy_version: String,
    /// Agencies known to the policy.
    pub agencies: Vec<String>,
    /// Persons in the register (0 when it is off).
    pub persons: i64,
    /// Files the development PKI created on this start.
    pub created_files: usize,
}

/// The running system; [`Running::shutdown`] stops it cleanly.
pub struct Running {
    /// What was started.
    pub started: Started,
    /// The gateway's shared state (tests read the policy and audit log through it).
    pub gateway: Arc<Gateway>,
    /// The database (audit log, consents, policy history).
    pub store: Store,
    /// The built-in register's database, when the register runs here.
    pub registry_store: Option<Store>,
    /// The gateway's TLS configuration in force; reloads swap it.
    pub gateway_tls: Arc<crate::identity::tls::ReloadableTls>,
    stop_gateway: watch::Sender<bool>,
    stop_rest: watch::Sender<bool>,
    gateway_task: tokio::task::JoinHandle<()>,
    rest_tasks: Vec<tokio::task::JoinHandle<()>>,
    audit_writer: AuditWriter,
    reloader: Arc<reload::Reloader>,
    /// This process's hold on its node name, released after the last record is written.
    node_lock: crate::store::NodeLock,
    /// How long pipelines get at shutdown to finish.
    shutdown_grace: Duration,
}

impl Running {
    /// Reloads the policy files now (as SIGHUP does): validated whole, recorded, then swapped in; a broken set is refused.
    pub async fn reload_policy(
        &self,
    ) -> Result<reload::ReloadOutcome, reload::ReloadError> {
        self.reloader.reload(reload::Trigger::Api).await
    }

    /// Stops accepting, lets requests in flight finish (bounded), flushes the audit log, closes the database.
    pub async fn shutdown(self) {
        let stopping = std::time::Instant::now();
        let _ = self.stop_gateway.send(true);
        let _ = self.gateway_task.await;
        // Pipelines run on after their connections closed: they get what is left of
        // the grace period (at least a second) to end with their records. One still
        // running then leaves, at worst, an attempt whose outcome is unknown.
        let left = self
            .shutdown_grace
            .saturating_sub(stopping.elapsed())
            .max(Duration::from_secs(1));
        if !self.gateway.drain(left).await {
            tracing::warn!(
                running = self.gateway.pipelines_in_flight(),
                "request pipelines still running after the grace period"
            );
        }
        // Providers stop only after the gateway has drained, so requests in flight can finish.
        let _ = self.stop_rest.send(true);
        for t in self.rest_tasks {
            let _ = t.await;
        }
        let stop = crate::audit::event::event(
            crate::audit::event::NODE_STOP,
            "node stopped: no more requests are served".to_owned(),
            self.gateway.policy.load().version(),
        );
        if let Err(err) = self.gateway.audit.append(stop).await {
            tracing::error!(%err, "node-stop event not recorded");
        }
        self.gateway.audit.close();
        drop(self.gateway);
        self.audit_writer.finish().await;
        self.node_lock.release().await;
        self.store.close().await;
        if let Some(store) = self.registry_store {
            store.close().await;
        }
    }
}

/// Builds and starts everything; returns once the system is ready to serve.
pub async fn start(config: Config, listeners: Listeners) -> Result<Running, StartError> {
    config.validate()?;
    let config = Arc::new(config);
    let policy = load_policy(&config.policies_dir)?;
    let quotas = LimitSet::load(&config.policies_dir, &policy)?;
    if quotas == LimitSet::default() {
        tracing::warn!(dir = %config.policies_dir.display(), "no quotas in {}: requests are not rate limited", crate::limits::LIMITS_FILE);
    }
    let agencies: Vec<String> = policy.agencies().map(|a| a.id.clone()).collect();

    let created_files = if config.tls.generate_dev_pki {
        let (pki_dir, keys_dir) = (config.pki_dir(), config.data_path(&config.tokens.keys_dir));
        let names = agencies.clone();
        tokio::task::spawn_blocking(move || -> Result<usize, StartError> {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let a = crate::devpki::ensure_dev_pki(&pki_dir, &names)?;
            let b = crate::devpki::ensure_signing_keys(&keys_dir, &names)?;
            Ok(a.created.len() + b.created.len())
        })
        .await??
    } else {
        0
    };

    // One database for both: it gets both schemas; otherwise each its own.
    let shared =
        listeners.registry.is_some() && config.registry_database_url() == config.database_url();
    let schemas: &[Schema] = if shared {
        &[Schema::Gateway, Schema::Registry]
    } else {
        &[Schema::Gateway]
    };
    let store = Store::connect_with(&config.database_url(), schemas).await?;
    // Before anything reads or writes this node's chain: one live process per node name.
    let node_lock = store.lock_node(&config.node).await?;
    let registry_store = match &listeners.registry {
        Some(_) if config.registry_database_url() == config.database_url() => Some(store.clone()),
        Some(_) => Some(Store::connect_registry(&config.registry_database_url()).await?),
        None => None,
    };
    let persons = match &registry_store {
        Some(reg) => {
            crate::registry::refresh_search_keys(reg).await?;
            crate::registry::seed(reg, config.registry.seed_persons, config.registry.seed).await?;
            crate::registry::count_persons(reg).await?
        }
        None => 0,
    };
    let mut audit_config = AuditConfig::new(config.node.clone());
    audit_config.max_batch = config.audit.max_batch;
    audit_config.queue = config.audit.queue;
    audit_config.restricted_report_delay = config.audit.restricted_report_delay;
    let signing = crate::audit::open::Signing {
        key_path: config.audit_key_path(),
        missing: crate::audit::open::MissingKey::Create,
        every: config.audit.checkpoint_every,
        interval: config.audit.checkpoint_interval,
    };
    let (audit, audit_writer) = crate::audit::open::open(&store, &node_lock, audit_config, signing)
        .await
        .map_err(|e| match e {
            crate::audit::open::OpenError::Key(e) => StartError::AuditKey(e),
            crate::audit::open::OpenError::Audit(e) => StartError::Audit(e),
            crate::audit::open::OpenError::Task(e) => StartError::Task(e),
        })?;
    // A node that cannot record its own start must not serve (fail closed).
    audit
        .append(crate::audit::event::event(
            crate::audit::event::NODE_START,
            format!(
                "node {} started, karibche {}",
                config.node,
                env!("CARGO_PKG_VERSION")
            ),
            policy.version(),
        ))
        .await?;

    let tls = load_tls(&config)?;
    let names: Vec<&str> = agencies.iter().map(String::as_str).collect();
    let keys_dir = config.data_path(&config.tokens.keys_dir);
    let token_options = VerifyOptions::from_config(&config.tokens);
    let keys = Arc::new(ArcSwap::from_pointee(KeyStore::load(
        &keys_dir,
        &names,
        token_options.clone(),
    )?));

    let pseudonym_key = config.data_path(&config.pseudonyms.key);
    let period = config
        .pseudonyms
        .period
        .clone()
        .unwrap_or_else(|| time::OffsetDateTime::now_utc().year().to_string());
    let pseudonymiser = tokio::task::spawn_blocking(move || {
        crate::gateway::release::transform::Pseudonymiser::load_or_create(&pseudonym_key, &period)
    })
    .await?
    .map_err(|source| StartError::Pseudonyms {
        path: config
            .data_path(&config.pseudonyms.key)
            .display()
            .to_string(),
        source,
    })?;
    let metrics = Arc::new(Metrics::default());
    metrics.set_certificates(crate::identity::inventory::expiry_gauges(&config));
    let policy = Arc::new(ArcSwap::from_pointee(policy));
    let (stop_gateway, gateway_rx) = watch::channel(false);
    let (stop_rest, rest_rx) = watch::channel(false);
    let limits = ListenLimits {
        max_connections: config.gateway.max_connections,
        handshake_timeout: config.gateway.handshake_timeout,
        header_timeout: config.gateway.header_timeout,
        shutdown_grace: config.gateway.shutdown_grace,
        idle_timeout: config.limits.idle_timeout,
        per_agency: None,
    };
    let rate = Arc::new(Limits::new(&quotas, config.limits.replicas));
    let providers = Arc::new(Providers::new(BreakerSettings {
        concurrency: config.limits.provider_concurrency,
        agency_share: config.limits.provider_agency_share,
        wait: config.limits.provider_wait,
        failures: config.limits.breaker_failures,
        open_for: config.limits.breaker_open,
        max_open_for: config.limits.breaker_max_open,
    }));
    let mut rest_tasks = Vec::new();
    // Identity material is reloaded while the system runs (see crate::reload).
    let gateway_tls = Arc::new(crate::identity::tls::ReloadableTls::new(tls.gateway));
    rest_tasks.push(reload::credentials::spawn_tls_reloader(
        reload::credentials::GatewayTlsFiles::from_config(&config),
        gateway_tls.clone(),
        metrics.clone(),
        config.clone(),
        config.tls.reload_interval,
        rest_rx.clone(),
        crate::audit::event::EventLog::new(audit.clone(), policy.clone()),
    ));
    rest_tasks.push(reload::credentials::spawn_key_reloader(
        keys_dir,
        policy.clone(),
        token_options,
        keys.clone(),
        config.tls.reload_interval,
        rest_rx.clone(),
        crate::audit::event::EventLog::new(audit.clone(), policy.clone()),
    ));
    let mut builtin = Vec::new();
    let registry_addr = match listeners.registry {
        Some(listener) => {
            let addr = listener.local_addr().map_err(|source| StartError::Bind {
                addr: config.registry.listen,
                source,
            })?;
            builtin.push(("registry".to_owned(), format!("https://{addr}")));
            let registry_db = registry_store.clone().unwrap_or_else(|| store.clone());
            let registry = Arc::new(crate::registry::Registry::new(registry_db));
            let max_body = config.gateway.max_body_bytes;
            let handler = move |info: Arc<ConnInfo>, req: Request<Incoming>| {
                let registry = registry.clone();
                // Boxed: hyper keeps a slot the size of this future for the
                // connection's whole life, and the register's is kilobytes.
                Box::pin(async move { provider_request(&registry, &info, req, max_body).await })
            };
            rest_tasks.push(tokio::spawn(serve_tls(
                "registry",
                listener,
                Arc::new(crate::identity::tls::ReloadableTls::new(tls.registry)),
                limits.clone(),
                metrics.clone(),
                handler,
                rest_rx.clone(),
            )));
            Some(addr)
        }
        None => None,
    };

    let gateway = Arc::new(Gateway {
        policy: policy.clone(),
        keys,
        require_bound_tokens: config.tokens.require_bound_tokens,
        audit: audit.clone(),
        metrics: metrics.clone(),
        upstream: upstream_client(tls.upstream, Duration::from_secs(5)),
        builtin,
        limits: PipelineLimits {
            max_body_bytes: config.gateway.max_body_bytes,
            max_response_bytes: config.gateway.max_response_bytes,
            upstream_timeout: config.gateway.upstream_timeout,
            body_timeout: config.gateway.body_timeout,
        },
        pseudonymiser: Arc::new(pseudonymiser),
        rate: rate.clone(),
        providers: providers.clone(),
        consents: crate::consent::Consents::new(store.clone(), audit.clone()),
        pipelines: tokio_util::task::TaskTracker::new(),
    });
    rest_tasks.push(tokio::spawn(housekeeping(
        rate.clone(),
        audit.clone(),
        rest_rx.clone(),
    )));
    let gateway_addr = listeners
        .gateway
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.gateway.listen,
            source,
        })?;
    let gw = gateway.clone();
    let gateway_task = tokio::spawn(serve_tls(
        "gateway",
        listeners.gateway,
        gateway_tls.clone(),
        ListenLimits {
            per_agency: Some(ConnectionCaps::new(
                config.limits.max_connections_per_agency,
                policy.clone(),
            )),
            ..limits
        },
        metrics.clone(),
        // Each request's pipeline is a task of its own: a client going away cannot cancel it.
        move |info: Arc<ConnInfo>, req: Request<Incoming>| gw.handle_detached(info, req),
        gateway_rx,
    ));

    let admin_addr = listeners
        .admin
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.admin.listen,
            source,
        })?;
    let reloader = Arc::new(
        reload::Reloader::new(
            config.policies_dir.clone(),
            policy.clone(),
            audit.clone(),
            metrics.clone(),
        )
        .with_limits(rate.clone()),
    );
    rest_tasks.push(reload::spawn(reloader.clone(), rest_rx.clone()));
    let admin = Arc::new(AdminState {
        metrics,
        ready: AtomicBool::new(false),
        store: store.clone(),
        audit,
        policy: policy.clone(),
        limits: rate,
        providers,
    });
    let admin_handler = {
        let admin = admin.clone();
        move |req: Request<Incoming>| {
            let admin = admin.clone();
            async move { admin.handle(req).await }
        }
    };
    rest_tasks.push(tokio::spawn(serve_plain(
        listeners.admin,
        admin_handler,
        rest_rx,
    )));
    admin.ready.store(true, Ordering::Release);

    let started = Started {
        gateway: gateway_addr,
        registry: registry_addr,
        admin: admin_addr,
        database_url: config.database_url(),
        policy_version: policy.load().version().to_owned(),
        agencies,
        persons,
        created_files,
    };
    tracing::info!(
        gateway = %started.gateway,
        admin = %started.admin,
        policy_version = %started.policy_version,
        persons,
        "karibche ready"
    );
    Ok(Running {
        started,
        gateway,
        store,
        registry_store,
        gateway_tls,
        stop_gateway,
        stop_rest,
        gateway_task,
        rest_tasks,
        audit_writer,
        reloader,
        node_lock,
        shutdown_grace: config.gateway.shutdown_grace,
    })
}

/// Runs the system until SIGTERM or Ctrl-C, then shuts down cleanly.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    on_ready: impl FnOnce(&Started),
) -> Result<(), StartError> {
    let running = start(config, listeners).await?;
    on_ready(&running.started);
    wait_for_signal().await;
    tracing::info!("shutting down: draining requests, flushing the audit log");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Writes the summary records of rate-limited floods as their windows close,
/// and lets the limiters forget idle keys; at shutdown writes what is pending.
async fn housekeeping(limits: Arc<Limits>, audit: AuditLog, mut stop: Shutdown) {
    const TICK: Duration = Duration::from_millis(250);
    const FORGET_EVERY: u32 = 240; // ticks: once a minute
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u32;
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = tick.tick() => {}
        }
        for entry in limits.refusals.due(std::time::Instant::now()) {
            write_summary(&audit, entry).await;
        }
        ticks = (ticks + 1) % FORGET_EVERY;
        if ticks == 0 {
            limits.forget_idle();
        }
    }
    for entry in limits.refusals.drain() {
        write_summary(&audit, entry).await;
    }
}

async fn write_summary(audit: &AuditLog, entry: crate::audit::Entry) {
    let (id, path) = (entry.id.clone(), entry.path.clone());
    if let Err(err) = audit.append(entry).await {
        tracing::error!(%id, %path, %err, "summary of rate-limited requests not recorded");
    }
}

/// Loads the policy files, turning their errors into a start error.
pub fn load_policy(dir: &std::path::Path) -> Result<Policy, StartError> {
    Policy::load(dir).map_err(|errors| StartError::Policy {
        dir: dir.display().to_string(),
        errors,
    })
}

struct TlsConfigs {
    gateway: ServerConfig,
    registry: ServerConfig,
    upstream: rustls::ClientConfig,
}

fn load_tls(config: &Config) -> Result<TlsConfigs, StartError> {
    let t = &config.tls;
    let provider_ca = crate::files::load_certs(&config.data_path(&t.provider_ca))?;
    let chain = crate::files::load_certs(&config.data_path(&t.cert))?;
    let key = crate::files::load_key(&config.data_path(&t.key))?;
    let gateway = reload::credentials::GatewayTlsFiles::from_config(config).build()?;
    let upstream = tls::client_config(tls::roots(&provider_ca)?, chain, key)?;
    // The register trusts the same CA for its one client, the gateway, and
    // then checks the gateway's identity on every request.
    let registry = if config.registry.enabled {
        tls::server_config(
            crate::files::load_certs(&config.data_path(&t.registry_cert))?,
            crate::files::load_key(&config.data_path(&t.registry_key))?,
            &tls::ClientVerification {
                cas: provider_ca,
                ..tls::ClientVerification::default()
            },
        )?
    } else {
        gateway.clone()
    };
    Ok(TlsConfigs {
        gateway,
        registry,
        upstream,
    })
}

/// A request to the built-in register: only the gateway's certificate may call, bodies bounded.
async fn provider_request(
    registry: &crate::registry::Registry,
    info: &ConnInfo,
    req: Request<Incoming>,
    max_body: usize,
) -> Response<Body> {
    if !info
        .client
        .as_ref()
        .is_some_and(|c| c.has_uri(crate::identity::GATEWAY_URI))
    {
        return Problem::new(
            http::StatusCode::FORBIDDEN,
            "forbidden",
            "Forbidden",
            "only the gateway may call this provider",
        )
        .to_response();
    }
    let (parts, body) = req.into_parts();
    match http_body_util::Limited::new(body, max_body).collect().await {
        Ok(body) => {
            registry
                .handle(Request::from_parts(parts, body.to_bytes()))
                .await
        }
        Err(_) => Problem::new(
            http::StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Payload too large",
            "the request body is too large",
        )
        .to_response(),
    }
}
