//! The register as a process of its own (`karibche registry serve`): its TLS
//! listener, its database and its own admin endpoint, without a gateway.
//!
//! The register is a provider like any other agency's service: gateways run
//! with `--no-registry` and name `https://HOST:PORT` of this process as the
//! register's `upstream` in `providers.toml`. It uses the same pieces as the
//! register inside `karibche serve` — the TLS accept loop and its bounds
//! ([`super::listener`]), the front door that lets only the gateway's client
//! certificate in ([`crate::registry::provider_request`]), the stop signal
//! ([`super::shutdown`]) — and adds `/healthz`, `/readyz` (the database
//! answers) and `/metrics` on `registry.admin_listen` (default 127.0.0.1:9091).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use hyper::body::Incoming;
use hyper::{Request, Response};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::listener::{serve_plain, serve_tls, ListenLimits};
use super::{listen_limits, prepare_register, shutdown, StartError};
use crate::admin::{metrics_answer, refuse_writes, wants_openmetrics};
use crate::config::Config;
use crate::identity::tls::{self, ReloadableTls};
use crate::identity::ConnInfo;
use crate::metrics::Metrics;
use crate::problem::{json_response, Body, Problem};
use crate::store::Store;

/// The register's listeners, bound by the caller (tests bind port 0).
#[derive(Debug)]
pub struct RegistryListeners {
    /// The register's API (TLS; only the gateway's certificate is served).
    pub api: TcpListener,
    /// Health, readiness and metrics (plain HTTP).
    pub admin: TcpListener,
}

impl RegistryListeners {
    /// Binds `registry.listen` and `registry.admin_listen`.
    pub async fn bind(config: &Config) -> Result<RegistryListeners, StartError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        Ok(RegistryListeners {
            api: bind(config.registry.listen).await?,
            admin: bind(config.registry.admin_listen).await?,
        })
    }
}

/// The running register; [`RunningRegistry::shutdown`] stops it cleanly.
pub struct RunningRegistry {
    /// Where its API listens.
    pub api: SocketAddr,
    /// Where its health and metrics are served.
    pub admin: SocketAddr,
    /// Persons it holds.
    pub persons: i64,
    /// Its database.
    pub store: Store,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningRegistry {
    /// Stops accepting, lets requests in flight finish (bounded), closes the database.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.store.close().await;
    }
}

/// The register's TLS configuration: its certificate, and the provider CA as
/// the only issuer of client certificates it accepts (the front door then
/// checks that the certificate is the gateway's).
pub(super) fn registry_tls(config: &Config) -> Result<ServerConfig, StartError> {
    let t = &config.tls;
    Ok(tls::server_config(
        crate::files::load_certs(&config.data_path(&t.registry_cert))?,
        crate::files::load_key(&config.data_path(&t.registry_key))?,
        &tls::ClientVerification {
            cas: crate::files::load_certs(&config.data_path(&t.provider_ca))?,
            ..tls::ClientVerification::default()
        },
    )?)
}

/// Starts the register's TLS listener on `db`; shared by `serve` (in-process) and `registry serve`.
pub(super) fn spawn_register(
    listener: TcpListener,
    tls: ServerConfig,
    db: Store,
    limits: ListenLimits,
    metrics: Arc<Metrics>,
    max_body: usize,
    stop: shutdown::Shutdown,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let addr = listener.local_addr()?;
    let registry = Arc::new(crate::registry::Registry::new(db));
    let handler = move |info: Arc<ConnInfo>, req: Request<Incoming>| {
        let registry = registry.clone();
        // Boxed: hyper keeps a slot the size of this future for the
        // connection's whole life, and the register's is kilobytes.
        Box::pin(
            async move { crate::registry::provider_request(&registry, &info, req, max_body).await },
        )
    };
    let task = tokio::spawn(serve_tls(
        "registry",
        listener,
        Arc::new(ReloadableTls::new(tls)),
        limits,
        metrics,
        handler,
        stop,
    ));
    Ok((addr, task))
}

/// Opens (and seeds, when empty) the register's own database and starts its
/// listeners; returns once it serves.
pub async fn start_registry(
    config: Config,
    listeners: RegistryListeners,
) -> Result<RunningRegistry, StartError> {
    config.validate()?;
    let tls = registry_tls(&config)?;
    let store = Store::connect_registry(&config.registry_database_url()).await?;
    let persons = prepare_register(&config, Some(&store)).await?;
    let (stop, rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::default());
    let bind_err = |addr| move |source| StartError::Bind { addr, source };
    let (api, api_task) = spawn_register(
        listeners.api,
        tls,
        store.clone(),
        listen_limits(&config),
        metrics.clone(),
        config.gateway.max_body_bytes,
        rx.clone(),
    )
    .map_err(bind_err(config.registry.listen))?;
    let admin = listeners
        .admin
        .local_addr()
        .map_err(bind_err(config.registry.admin_listen))?;
    let state = Arc::new(RegistryAdmin {
        metrics,
        store: store.clone(),
    });
    let handler = move |req: Request<Incoming>| {
        let state = state.clone();
        async move { state.handle(req).await }
    };
    let admin_task = tokio::spawn(serve_plain(listeners.admin, handler, rx));
    tracing::info!(%api, %admin, persons, "register ready");
    Ok(RunningRegistry {
        api,
        admin,
        persons,
        store,
        stop,
        tasks: vec![api_task, admin_task],
    })
}

/// Runs the register until SIGTERM or Ctrl-C, then shuts down cleanly.
pub async fn serve_registry(
    config: Config,
    listeners: RegistryListeners,
    on_ready: impl FnOnce(&RunningRegistry),
) -> Result<(), StartError> {
    let running = start_registry(config, listeners).await?;
    on_ready(&running);
    shutdown::wait_for_signal().await;
    tracing::info!("register shutting down: draining requests");
    running.shutdown().await;
    tracing::info!("register stopped");
    Ok(())
}

/// What the register's admin endpoint reads.
struct RegistryAdmin {
    metrics: Arc<Metrics>,
    store: Store,
}

impl RegistryAdmin {
    async fn handle<B>(&self, req: Request<B>) -> Response<Body> {
        if let Some(refused) = refuse_writes(req.method()) {
            return refused;
        }
        match req.uri().path() {
            "/healthz" => json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})),
            "/readyz" => {
                let database = tokio::time::timeout(Duration::from_secs(2), self.store.ping())
                    .await
                    .is_ok_and(|r| r.is_ok());
                let status = if database {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json_response(
                    status,
                    &serde_json::json!({
                        "status": if database { "ready" } else { "not ready" },
                        "service": "registry",
                        "database": database,
                    }),
                )
            }
            "/metrics" => {
                let openmetrics = wants_openmetrics(req.headers());
                let text = self
                    .metrics
                    .render(&crate::metrics::Registry::default(), openmetrics);
                metrics_answer(text, openmetrics)
            }
            _ => Problem::not_found("no such admin endpoint").to_response(),
        }
    }
}
