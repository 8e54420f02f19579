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

use crate::admin::{AdminState, Metrics};
use crate::audit::{AuditConfig, AuditKey, AuditLog, AuditWriter, CheckpointPolicy};
use crate::config::Config;
use crate::identity::PeerCert;
use crate::policy::Policy;
use crate::problem::{Body, Problem};
use crate::proxy::{upstream_client, Gateway, PipelineLimits};
use crate::store::Store;
use crate::tls;
use crate::token::{KeyStore, VerifyOptions};

/// What is known about a connection before any request on it is read.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The remote address.
    pub peer: SocketAddr,
    /// The verified client certificate's identity facts.
    pub client: Option<PeerCert>,
}

/// Bounds applied to every connection of one listener.
#[derive(Debug, Clone)]
pub struct ListenLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for request headers.
    pub header_timeout: Duration,
    /// Time requests in flight get to finish at shutdown.
    pub shutdown_grace: Duration,
}

/// A receiver that turns true once the system should stop.
pub type Shutdown = watch::Receiver<bool>;

/// Serves HTTP/1.1 and HTTP/2 over TLS on `listener` until `shutdown` turns true.
pub async fn serve_tls<H, F>(
    name: &'static str,
    listener: TcpListener,
    tls: Arc<ArcSwap<ServerConfig>>,
    limits: ListenLimits,
    metrics: Arc<Metrics>,
    handler: H,
    mut shutdown: Shutdown,
) where
    H: Fn(Arc<ConnInfo>, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024);
    let builder = Arc::new(builder);
    loop {
        let permit = tokio::select! {
            _ = shutdown.changed() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.changed() => break,
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
        let _ = stream.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.load_full());
        let handler = handler.clone();
        let metrics = metrics.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = limits.handshake_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let tls_stream =
                match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(err)) => {
                        metrics.handshake_failed(name);
                        tracing::debug!(listener = name, %peer, %err, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        metrics.handshake_failed(name);
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
            let info = Arc::new(ConnInfo { peer, client });
            metrics.connection_opened(name);
            let svc = service_fn(move |req| {
                let handler = handler.clone();
                let info = info.clone();
                async move { Ok::<_, Infallible>(handler(info, req).await) }
            });
            let conn = builder
                .serve_connection(TokioIo::new(tls_stream), svc)
                .into_owned();
            if let Err(err) = watcher.watch(conn).await {
                tracing::debug!(listener = name, %peer, %err, "connection ended with an error");
            }
            metrics.connection_closed(name);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "connections still open after the grace period"
        );
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
    /// A certificate or key could not be created or loaded.
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    /// A TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// An agency's token key could not be loaded.
    #[error(transparent)]
    Keys(#[from] crate::token::KeyLoadError),
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
    /// The database.
    pub store: Store,
    /// The gateway's TLS configuration in force; reloads swap it.
    pub gateway_tls: Arc<ArcSwap<ServerConfig>>,
    stop_gateway: watch::Sender<bool>,
    stop_rest: watch::Sender<bool>,
    gateway_task: tokio::task::JoinHandle<()>,
    rest_tasks: Vec<tokio::task::JoinHandle<()>>,
    audit_writer: AuditWriter,
    reloader: Arc<crate::reload::Reloader>,
}

impl Running {
    /// Reloads the policy files now (as SIGHUP does): validated whole, recorded, then swapped in; a broken set is refused.
    pub async fn reload_policy(
        &self,
    ) -> Result<crate::reload::ReloadOutcome, crate::reload::ReloadError> {
        self.reloader.reload(crate::reload::Trigger::Api).await
    }

    /// Stops accepting, lets requests in flight finish (bounded), flushes the audit log, closes the database.
    pub async fn shutdown(self) {
        let _ = self.stop_gateway.send(true);
        let _ = self.gateway_task.await;
        // Providers stop only after the gateway has drained, so requests in flight can finish.
        let _ = self.stop_rest.send(true);
        for t in self.rest_tasks {
            let _ = t.await;
        }
        self.gateway.audit.close();
        drop(self.gateway);
        self.audit_writer.finish().await;
        self.store.close().await;
    }
}

/// Builds and starts everything; returns once the system is ready to serve.
pub async fn start(config: Config, listeners: Listeners) -> Result<Running, StartError> {
    config.validate()?;
    let config = Arc::new(config);
    let policy = load_policy(&config.policies_dir)?;
    let agencies: Vec<String> = policy.agencies().map(|a| a.id.clone()).collect();

    let created_files = if config.tls.generate_dev_pki {
        let (pki_dir, keys_dir) = (config.pki_dir(), config.data_path(&config.tokens.keys_dir));
        let names = agencies.clone();
        tokio::task::spawn_blocking(move || -> Result<usize, StartError> {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let a = crate::pki::ensure_dev_pki(&pki_dir, &names)?;
            let b = crate::pki::ensure_signing_keys(&keys_dir, &names)?;
            Ok(a.created.len() + b.created.len())
        })
        .await??
    } else {
        0
    };

    let store = Store::connect(&config.database_url()).await?;
    let persons = match &listeners.registry {
        Some(_) => {
            crate::registry::seed(&store, config.registry.seed_persons, config.registry.seed)
                .await?;
            crate::registry::count_persons(&store).await?
        }
        None => 0,
    };
    let key_path = config.audit_key_path();
    let audit_key =
        tokio::task::spawn_blocking(move || AuditKey::load_or_create(&key_path)).await??;
    let mut audit_config = AuditConfig::new(config.node.clone());
    audit_config.max_batch = config.audit.max_batch;
    audit_config.queue = config.audit.queue;
    audit_config.checkpoints = Some(CheckpointPolicy {
        key: Arc::new(audit_key),
        every: config.audit.checkpoint_every,
        interval: config.audit.checkpoint_interval,
    });
    let (audit, audit_writer) = AuditLog::start(store.clone(), audit_config).await?;

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
        crate::transform::Pseudonymiser::load_or_create(&pseudonym_key, &period)
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
    metrics.set_certificates(crate::pki::expiry_gauges(&config));
    let policy = Arc::new(ArcSwap::from_pointee(policy));
    let (stop_gateway, gateway_rx) = watch::channel(false);
    let (stop_rest, rest_rx) = watch::channel(false);
    let limits = ListenLimits {
        max_connections: config.gateway.max_connections,
        handshake_timeout: config.gateway.handshake_timeout,
        header_timeout: config.gateway.header_timeout,
        shutdown_grace: config.gateway.shutdown_grace,
    };
    let mut rest_tasks = Vec::new();
    // Identity material is reloaded while the system runs (see crate::reload).
    let gateway_tls = Arc::new(ArcSwap::from_pointee(tls.gateway));
    rest_tasks.push(crate::credentials::spawn_tls_reloader(
        crate::credentials::GatewayTlsFiles::from_config(&config),
        gateway_tls.clone(),
        metrics.clone(),
        config.clone(),
        config.tls.reload_interval,
        rest_rx.clone(),
    ));
    rest_tasks.push(crate::credentials::spawn_key_reloader(
        keys_dir,
        policy.clone(),
        token_options,
        keys.clone(),
        config.tls.reload_interval,
        rest_rx.clone(),
    ));
    let mut builtin = Vec::new();
    let registry_addr = match listeners.registry {
        Some(listener) => {
            let addr = listener.local_addr().map_err(|source| StartError::Bind {
                addr: config.registry.listen,
                source,
            })?;
            builtin.push(("registry".to_owned(), format!("https://{addr}")));
            let registry = Arc::new(crate::registry::Registry::new(store.clone()));
            let max_body = config.gateway.max_body_bytes;
            let handler = move |info: Arc<ConnInfo>, req: Request<Incoming>| {
                let registry = registry.clone();
                async move { provider_request(&registry, &info, req, max_body).await }
            };
            rest_tasks.push(tokio::spawn(serve_tls(
                "registry",
                listener,
                Arc::new(ArcSwap::from_pointee(tls.registry)),
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
        },
        pseudonymiser: Arc::new(pseudonymiser),
    });
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
        limits,
        metrics.clone(),
        move |info: Arc<ConnInfo>, req: Request<Incoming>| {
            let gw = gw.clone();
            async move { gw.handle(info, req).await }
        },
        gateway_rx,
    ));

    let admin_addr = listeners
        .admin
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.admin.listen,
            source,
        })?;
    let reloader = Arc::new(crate::reload::Reloader::new(
        config.policies_dir.clone(),
        policy.clone(),
        audit.clone(),
        metrics.clone(),
    ));
    rest_tasks.push(crate::reload::spawn(reloader.clone(), rest_rx.clone()));
    let admin = Arc::new(AdminState {
        metrics,
        ready: AtomicBool::new(false),
        store: store.clone(),
        audit,
        policy: policy.clone(),
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
        gateway_tls,
        stop_gateway,
        stop_rest,
        gateway_task,
        rest_tasks,
        audit_writer,
        reloader,
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
    let provider_ca = crate::pki::load_certs(&config.data_path(&t.provider_ca))?;
    let chain = crate::pki::load_certs(&config.data_path(&t.cert))?;
    let key = crate::pki::load_key(&config.data_path(&t.key))?;
    let gateway = crate::credentials::GatewayTlsFiles::from_config(config).build()?;
    let upstream = tls::client_config(tls::roots(&provider_ca)?, chain, key)?;
    // The register trusts the same CA for its one client, the gateway, and
    // then checks the gateway's identity on every request.
    let registry = if config.registry.enabled {
        tls::server_config(
            crate::pki::load_certs(&config.data_path(&t.registry_cert))?,
            crate::pki::load_key(&config.data_path(&t.registry_key))?,
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
        .is_some_and(|c| c.has_uri(crate::pki::GATEWAY_URI))
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
