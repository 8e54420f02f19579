//! The running system: everything wired together, from a [`Config`] and
//! bound listeners to a gateway that serves, and back down again.
//!
//! [`start`] builds the parts in order — rules, development PKI, databases,
//! audit log, identity material, the register, the gateway, the admin
//! endpoint, the reloaders — each step a function below, and returns once all
//! of it is ready; [`serve`] additionally waits for a shutdown signal.
//! [`Running::shutdown`] takes it down in the opposite order. Tests call
//! [`start`] with `127.0.0.1:0` listeners and talk to the real thing.
//!
//! The rooms: [`listener`] (accept loops and their bounds), [`connections`]
//! (per-agency connection caps), [`housekeeping`] (periodic chores),
//! [`reload`] (policies and credentials while running), [`shutdown`] (the
//! stop signal every task ends on), [`registry`] (the register as a process
//! of its own: `karibche registry serve`).

pub mod cluster;
pub mod connections;
pub mod housekeeping;
pub mod listener;
pub mod registry;
pub mod reload;
pub mod shutdown;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper::Request;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{AdminState, PolicyVersions};
use crate::audit::{AuditConfig, AuditLog, AuditWriter};
use crate::config::Config;
use crate::gateway::forward::breaker::{BreakerSettings, Providers};
use crate::gateway::release::transform::Pseudonymiser;
use crate::gateway::{upstream_client, Gateway, PipelineLimits};
use crate::identity::tls::{self, ReloadableTls};
use crate::identity::token::{KeyStore, VerifyOptions};
use crate::identity::ConnInfo;
use crate::limits::{LimitSet, Limits};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::store::{NodeLock, Schema, Store};
use connections::ConnectionCaps;
use listener::{serve_plain, serve_tls, ListenLimits};
use reload::credentials::{spawn_key_reloader, spawn_tls_reloader, GatewayTlsFiles};

pub use shutdown::Shutdown;

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
    /// `[audit.tsa]` names a certificate that cannot verify time-stamps.
    #[error("audit.tsa: {0}")]
    Timestamp(#[from] crate::audit::timestamp::TimestampError),
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
    /// The shared-quota backend (`limits.backend`) could not be set up.
    #[error("limits.backend: {0}")]
    LimitsBackend(String),
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
    /// Where the web console listens, when it is on.
    pub console: Option<SocketAddr>,
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
    /// How long `/readyz` says "draining" before the gateway stops accepting.
    drain_delay: Duration,
    /// The admin endpoint, told first that the node is going away.
    admin: Arc<AdminState>,
}

impl Running {
    /// Reloads the policy files now (as SIGHUP does): validated whole, recorded, then swapped in; a broken set is refused.
    pub async fn reload_policy(&self) -> Result<reload::ReloadOutcome, reload::ReloadError> {
        self.reloader.reload(reload::Trigger::Api).await
    }

    /// Stops accepting, lets requests in flight finish (bounded), flushes the audit log, closes the database.
    pub async fn shutdown(self) {
        // Balancers see 503 on /readyz first and move new connections elsewhere.
        self.admin.draining.store(true, Ordering::Release);
        if !self.drain_delay.is_zero() {
            tracing::info!(delay = ?self.drain_delay, "draining: /readyz answers 503 before the listener closes");
            tokio::time::sleep(self.drain_delay).await;
        }
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
    let (policy, quotas) = load_rules(&config)?;
    let agencies: Vec<String> = policy.agencies().map(|a| a.id.clone()).collect();
    let created_files = make_dev_pki(&config, &agencies).await?;
    let stores = open_stores(&config, listeners.registry.is_some()).await?;
    let persons = prepare_register(&config, stores.registry.as_ref()).await?;
    let (audit, audit_writer) = open_audit(&config, &stores, policy.version()).await?;
    let tls = load_tls(&config)?;
    let keys = load_keys(&config, &agencies)?;
    let pseudonymiser = load_pseudonymiser(&config).await?;

    let (stop_gateway, gateway_rx) = watch::channel(false);
    let (stop_rest, rest_rx) = watch::channel(false);
    let rate = open_limits(&config, &quotas).await?;
    // Witnesses get the node's tree heads off the request path (crate::witness::client).
    let mut witness_tasks = crate::witness::client::start(&config, &audit, rest_rx.clone());
    // So is the time-stamping authority (crate::audit::timestamp); a bad TSA certificate stops startup.
    witness_tasks.extend(crate::audit::timestamp::start(
        &config,
        &audit,
        rest_rx.clone(),
    )?);
    let shared = Shared::new(config.clone(), policy, rate, audit, rest_rx);
    // The administrators' API reads the sets the reloader keeps and the latency snapshots.
    let administration = Arc::new(crate::gateway::builtin::admin::Sources {
        history: Arc::new(reload::policy::PolicyHistory::new(
            shared.policy.load_full(),
            quotas.clone(),
        )),
        config: config.clone(),
        latency: crate::gateway::builtin::admin::latency::Ring::new(),
    });
    let limits = listen_limits(&config);
    let mut rest_tasks = Vec::new();
    let gateway_tls = Arc::new(ReloadableTls::new(tls.gateway));
    rest_tasks.extend(start_credential_reloaders(&shared, &gateway_tls, &keys));
    rest_tasks.extend(witness_tasks);
    let registry = start_register(&shared, listeners.registry, tls.registry, &stores, &limits)?;
    let builtin = registry
        .iter()
        .map(|(addr, _)| ("registry".to_owned(), format!("https://{addr}")))
        .collect();
    let (registry_addr, registry_task) = registry.unzip();
    rest_tasks.extend(registry_task);
    let gateway = build_gateway(
        &shared,
        &stores.store,
        keys,
        tls.upstream,
        builtin,
        pseudonymiser,
        administration.clone(),
    );
    rest_tasks.push(tokio::spawn(crate::gateway::builtin::admin::latency::run(
        administration.clone(),
        shared.metrics.clone(),
        shared.stop.clone(),
    )));
    rest_tasks.push(tokio::spawn(housekeeping::run(
        shared.rate.clone(),
        shared.audit.clone(),
        shared.stop.clone(),
    )));
    let console = start_console(&shared, &gateway, &gateway_tls, gateway_rx.clone()).await?;
    let (console_addr, console_task) = console.unzip();
    rest_tasks.extend(console_task);
    let (gateway_addr, gateway_task) = start_gateway_listener(
        &shared,
        listeners.gateway,
        &gateway_tls,
        limits,
        &gateway,
        gateway_rx,
    )?;
    let (reloader, reload_task) = start_policy_reloader(&shared, &administration.history);
    rest_tasks.push(reload_task);
    let cluster = Arc::new(PolicyVersions::default());
    rest_tasks.push(tokio::spawn(cluster::run(
        stores.store.clone(),
        config.node.clone(),
        shared.policy.clone(),
        cluster.clone(),
        shared.stop.clone(),
    )));
    let (admin_addr, admin_task, admin) =
        start_admin(&shared, &stores.store, &cluster, listeners.admin)?;
    rest_tasks.push(admin_task);

    let started = Started {
        gateway: gateway_addr,
        registry: registry_addr,
        admin: admin_addr,
        console: console_addr,
        database_url: config.database_url(),
        policy_version: shared.policy.load().version().to_owned(),
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
        store: stores.store,
        registry_store: stores.registry,
        gateway_tls,
        stop_gateway,
        stop_rest,
        gateway_task,
        rest_tasks,
        audit_writer,
        reloader,
        node_lock: stores.node_lock,
        shutdown_grace: config.gateway.shutdown_grace,
        drain_delay: config.gateway.drain_delay,
        admin,
    })
}

/// What most start-up steps hand on: the policy in force, the audit log, the
/// metrics, the quotas and provider guards, and the stop signal of every task
/// but the gateway's listener.
struct Shared {
    config: Arc<Config>,
    policy: Arc<ArcSwap<Policy>>,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    rate: Arc<Limits>,
    providers: Arc<Providers>,
    stop: Shutdown,
}

impl Shared {
    fn new(
        config: Arc<Config>,
        policy: Policy,
        rate: Limits,
        audit: AuditLog,
        stop: Shutdown,
    ) -> Shared {
        let metrics = Arc::new(Metrics::default());
        metrics.set_certificates(crate::identity::inventory::expiry_gauges(&config));
        let rate = Arc::new(rate);
        let l = &config.limits;
        let providers = Arc::new(Providers::new(BreakerSettings {
            concurrency: l.provider_concurrency,
            agency_share: l.provider_agency_share,
            wait: l.provider_wait,
            failures: l.breaker_failures,
            open_for: l.breaker_open,
            max_open_for: l.breaker_max_open,
        }));
        Shared {
            policy: Arc::new(ArcSwap::from_pointee(policy)),
            audit,
            metrics,
            rate,
            providers,
            stop,
            config,
        }
    }

    /// Where start-up events of this kind go: the audit log, under the policy in force.
    fn events(&self) -> crate::audit::event::EventLog {
        crate::audit::event::EventLog::new(self.audit.clone(), self.policy.clone())
    }
}

/// The policy files and the quotas beside them; no quotas only warns.
fn load_rules(config: &Config) -> Result<(Policy, LimitSet), StartError> {
    let policy = load_policy(&config.policies_dir)?;
    let quotas = LimitSet::load(&config.policies_dir, &policy)?;
    if quotas == LimitSet::default() {
        tracing::warn!(dir = %config.policies_dir.display(), "no quotas in {}: requests are not rate limited", crate::limits::LIMITS_FILE);
    }
    Ok((policy, quotas))
}

/// Creates the development certificates and token keys missing, when configured; returns how many files it made.
async fn make_dev_pki(config: &Config, agencies: &[String]) -> Result<usize, StartError> {
    if !config.tls.generate_dev_pki {
        return Ok(0);
    }
    let (pki_dir, keys_dir) = (config.pki_dir(), config.data_path(&config.tokens.keys_dir));
    let names = agencies.to_vec();
    tokio::task::spawn_blocking(move || -> Result<usize, StartError> {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let a = crate::devpki::ensure_dev_pki(&pki_dir, &names)?;
        let b = crate::devpki::ensure_signing_keys(&keys_dir, &names)?;
        Ok(a.created.len() + b.created.len())
    })
    .await?
}

/// The databases a node has open, and its hold on its node name.
struct Stores {
    store: Store,
    node_lock: NodeLock,
    /// The register's database, when the register runs here (maybe `store` itself).
    registry: Option<Store>,
}

/// Opens the gateway's database (and the register's, when it runs here) and takes the node's name.
async fn open_stores(config: &Config, with_registry: bool) -> Result<Stores, StartError> {
    // One database for both: it gets both schemas; otherwise each its own.
    let shared = with_registry && config.registry_database_url() == config.database_url();
    let schemas: &[Schema] = if shared {
        &[Schema::Gateway, Schema::Registry]
    } else {
        &[Schema::Gateway]
    };
    let store = Store::connect_with(&config.database_url(), schemas).await?;
    // Before anything reads or writes this node's chain: one live process per node name.
    let node_lock = store.lock_node(&config.node).await?;
    let registry = match with_registry {
        true if shared => Some(store.clone()),
        true => Some(Store::connect_registry(&config.registry_database_url()).await?),
        false => None,
    };
    Ok(Stores {
        store,
        node_lock,
        registry,
    })
}

/// The limiters: this replica's share of each quota and, with `limits.backend =
/// "redis://…"`, the quotas shared in Redis (a Redis that is down at start means
/// the local share until it is back, not a node that will not start).
async fn open_limits(config: &Config, quotas: &LimitSet) -> Result<Limits, StartError> {
    let l = &config.limits;
    let local = Limits::new(quotas, l.replicas);
    let Some(url) = l.redis_url() else {
        return Ok(local);
    };
    let shared = crate::limits::RedisQuotas::open(url, &l.redis_prefix, l.redis_timeout)
        .await
        .map_err(|e| StartError::LimitsBackend(e.to_string()))?;
    Ok(local.with_shared(shared))
}

/// Brings the register's search keys up to date and seeds an empty one; returns how many persons it holds.
async fn prepare_register(config: &Config, registry: Option<&Store>) -> Result<i64, StartError> {
    let Some(reg) = registry else { return Ok(0) };
    crate::registry::refresh_search_keys(reg).await?;
    crate::registry::seed(reg, config.registry.seed_persons, config.registry.seed).await?;
    Ok(crate::registry::count_persons(reg).await?)
}

/// Opens the node's audit chain and records the node's start in it.
async fn open_audit(
    config: &Config,
    stores: &Stores,
    policy_version: &str,
) -> Result<(AuditLog, AuditWriter), StartError> {
    use crate::audit::open::{open, MissingKey, OpenError, Signing};
    let mut audit_config = AuditConfig::new(config.node.clone());
    audit_config.max_batch = config.audit.max_batch;
    audit_config.queue = config.audit.queue;
    audit_config.restricted_report_delay = config.audit.restricted_report_delay;
    if let Some(origin) = &config.audit.origin {
        audit_config.origin = origin.clone();
    }
    let signing = Signing {
        key_path: config.audit_key_path(),
        missing: MissingKey::Create,
        every: config.audit.checkpoint_every,
        interval: config.audit.checkpoint_interval,
    };
    let (audit, writer) = open(&stores.store, &stores.node_lock, audit_config, signing)
        .await
        .map_err(|e| match e {
            OpenError::Key(e) => StartError::AuditKey(e),
            OpenError::Audit(e) => StartError::Audit(e),
            OpenError::Task(e) => StartError::Task(e),
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
            policy_version,
        ))
        .await?;
    Ok((audit, writer))
}

/// The agencies' token keys, from the keys directory.
fn load_keys(config: &Config, agencies: &[String]) -> Result<Arc<ArcSwap<KeyStore>>, StartError> {
    let names: Vec<&str> = agencies.iter().map(String::as_str).collect();
    let keys = KeyStore::load(
        &config.data_path(&config.tokens.keys_dir),
        &names,
        VerifyOptions::from_config(&config.tokens),
    )?;
    Ok(Arc::new(ArcSwap::from_pointee(keys)))
}

/// The pseudonymisation secret for this period, created when missing.
async fn load_pseudonymiser(config: &Config) -> Result<Pseudonymiser, StartError> {
    let path = config.data_path(&config.pseudonyms.key);
    let period = config
        .pseudonyms
        .period
        .clone()
        .unwrap_or_else(|| time::OffsetDateTime::now_utc().year().to_string());
    let key = path.clone();
    tokio::task::spawn_blocking(move || Pseudonymiser::load_or_create(&key, &period))
        .await?
        .map_err(|source| StartError::Pseudonyms {
            path: path.display().to_string(),
            source,
        })
}

/// The connection bounds of the TLS listeners (the gateway's adds its per-agency caps).
fn listen_limits(config: &Config) -> ListenLimits {
    ListenLimits {
        max_connections: config.gateway.max_connections,
        handshake_timeout: config.gateway.handshake_timeout,
        header_timeout: config.gateway.header_timeout,
        shutdown_grace: config.gateway.shutdown_grace,
        idle_timeout: config.limits.idle_timeout,
        per_agency: None,
    }
}

/// Starts reloading the gateway's TLS configuration and the agencies' token keys when their files change.
fn start_credential_reloaders(
    shared: &Shared,
    gateway_tls: &Arc<ReloadableTls>,
    keys: &Arc<ArcSwap<KeyStore>>,
) -> [JoinHandle<()>; 2] {
    let config = &shared.config;
    let tls = spawn_tls_reloader(
        GatewayTlsFiles::from_config(config),
        gateway_tls.clone(),
        shared.metrics.clone(),
        config.clone(),
        config.tls.reload_interval,
        shared.stop.clone(),
        shared.events(),
    );
    let keys = spawn_key_reloader(
        config.data_path(&config.tokens.keys_dir),
        shared.policy.clone(),
        VerifyOptions::from_config(&config.tokens),
        keys.clone(),
        config.tls.reload_interval,
        shared.stop.clone(),
        shared.events(),
    );
    [tls, keys]
}

/// Starts the built-in register's listener, when it runs here; returns where it listens.
fn start_register(
    shared: &Shared,
    listener: Option<TcpListener>,
    tls: ServerConfig,
    stores: &Stores,
    limits: &ListenLimits,
) -> Result<Option<(SocketAddr, JoinHandle<()>)>, StartError> {
    let Some(listener) = listener else {
        return Ok(None);
    };
    let db = stores
        .registry
        .clone()
        .unwrap_or_else(|| stores.store.clone());
    let (addr, task) = registry::spawn_register(
        listener,
        tls,
        db,
        limits.clone(),
        shared.metrics.clone(),
        shared.config.gateway.max_body_bytes,
        shared.stop.clone(),
    )
    .map_err(|source| StartError::Bind {
        addr: shared.config.registry.listen,
        source,
    })?;
    Ok(Some((addr, task)))
}

/// The gateway's shared state: policy, keys, audit log, upstream client and the pipeline's bounds.
fn build_gateway(
    shared: &Shared,
    store: &Store,
    keys: Arc<ArcSwap<KeyStore>>,
    upstream: rustls::ClientConfig,
    builtin: Vec<(String, String)>,
    pseudonymiser: Pseudonymiser,
    administration: Arc<crate::gateway::builtin::admin::Sources>,
) -> Arc<Gateway> {
    let g = &shared.config.gateway;
    Arc::new(Gateway {
        policy: shared.policy.clone(),
        keys,
        require_bound_tokens: shared.config.tokens.require_bound_tokens,
        audit: shared.audit.clone(),
        metrics: shared.metrics.clone(),
        upstream: upstream_client(upstream, Duration::from_secs(5), g.upstream_http2),
        builtin,
        limits: PipelineLimits {
            max_body_bytes: g.max_body_bytes,
            max_response_bytes: g.max_response_bytes,
            upstream_timeout: g.upstream_timeout,
            body_timeout: g.body_timeout,
        },
        pseudonymiser: Arc::new(pseudonymiser),
        rate: shared.rate.clone(),
        trust_trace: shared.config.tracing.trust_incoming,
        providers: shared.providers.clone(),
        consents: crate::consent::Consents::new(store.clone(), shared.audit.clone()),
        pipelines: tokio_util::task::TaskTracker::new(),
        administration,
    })
}

/// Starts the agencies' listener, with per-agency connection caps; it stops on its own signal, before the rest.
fn start_gateway_listener(
    shared: &Shared,
    listener: TcpListener,
    tls: &Arc<ReloadableTls>,
    limits: ListenLimits,
    gateway: &Arc<Gateway>,
    stop: Shutdown,
) -> Result<(SocketAddr, JoinHandle<()>), StartError> {
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: shared.config.gateway.listen,
        source,
    })?;
    let gw = gateway.clone();
    let task = tokio::spawn(serve_tls(
        "gateway",
        listener,
        tls.clone(),
        ListenLimits {
            per_agency: Some(ConnectionCaps::new(
                shared.config.limits.max_connections_per_agency,
                shared.policy.clone(),
            )),
            ..limits
        },
        shared.metrics.clone(),
        // Each request's pipeline is a task of its own: a client going away cannot cancel it.
        move |info: Arc<ConnInfo>, req: Request<Incoming>| gw.handle_detached(info, req),
        stop,
    ));
    Ok((addr, task))
}

/// Binds and serves the web console (`[console]`), when it is on: the gateway's
/// certificate, and the gateway's own client-certificate check (reloads
/// included) when `console.require_client_certificate` is set.
async fn start_console(
    shared: &Shared,
    gateway: &Arc<Gateway>,
    gateway_tls: &Arc<ReloadableTls>,
    stop: Shutdown,
) -> Result<Option<(SocketAddr, JoinHandle<()>)>, StartError> {
    let c = &shared.config.console;
    if !c.enabled {
        return Ok(None);
    }
    let bind = |source| StartError::Bind {
        addr: c.listen,
        source,
    };
    let listener = TcpListener::bind(c.listen).await.map_err(bind)?;
    let addr = listener.local_addr().map_err(bind)?;
    let tls = if c.require_client_certificate {
        gateway_tls.clone()
    } else {
        let config = &shared.config;
        let chain = crate::files::load_certs(&config.data_path(&config.tls.cert))?;
        let key = crate::files::load_key(&config.data_path(&config.tls.key))?;
        Arc::new(ReloadableTls::new(tls::server_config_without_clients(
            chain, key,
        )?))
    };
    let console = crate::console::Console::new(gateway.clone(), c);
    let task = tokio::spawn(serve_tls(
        "console",
        listener,
        tls,
        listen_limits(&shared.config),
        shared.metrics.clone(),
        move |info: Arc<ConnInfo>, req: Request<Incoming>| console.clone().handle(info, req),
        stop,
    ));
    Ok(Some((addr, task)))
}

/// Starts reloading the policy files (and quotas) on a change or SIGHUP.
fn start_policy_reloader(
    shared: &Shared,
    history: &Arc<reload::policy::PolicyHistory>,
) -> (Arc<reload::Reloader>, JoinHandle<()>) {
    let reloader = Arc::new(
        reload::Reloader::new(
            shared.config.policies_dir.clone(),
            shared.policy.clone(),
            shared.audit.clone(),
            shared.metrics.clone(),
        )
        .with_limits(shared.rate.clone())
        .with_history(history.clone()),
    );
    let task = reload::spawn(reloader.clone(), shared.stop.clone());
    (reloader, task)
}

/// Starts the admin endpoint (health, metrics) and marks the system ready.
fn start_admin(
    shared: &Shared,
    store: &Store,
    cluster: &Arc<PolicyVersions>,
    listener: TcpListener,
) -> Result<(SocketAddr, JoinHandle<()>, Arc<AdminState>), StartError> {
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: shared.config.admin.listen,
        source,
    })?;
    let admin = Arc::new(AdminState {
        metrics: shared.metrics.clone(),
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        store: store.clone(),
        audit: shared.audit.clone(),
        policy: shared.policy.clone(),
        limits: shared.rate.clone(),
        providers: shared.providers.clone(),
        cluster: cluster.clone(),
    });
    let handler = {
        let admin = admin.clone();
        move |req: Request<Incoming>| {
            let admin = admin.clone();
            async move { admin.handle(req).await }
        }
    };
    let task = tokio::spawn(serve_plain(listener, handler, shared.stop.clone()));
    admin.ready.store(true, Ordering::Release);
    Ok((addr, task, admin))
}

/// Runs the system until SIGTERM or Ctrl-C, then shuts down cleanly.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    on_ready: impl FnOnce(&Started),
) -> Result<(), StartError> {
    let running = start(config, listeners).await?;
    on_ready(&running.started);
    // systemd's Type=notify (deploy/karibche.service); nothing without $NOTIFY_SOCKET.
    if let Err(err) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(%err, "readiness not notified to systemd");
    }
    shutdown::wait_for_signal().await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("shutting down: draining requests, flushing the audit log");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
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
    let gateway = GatewayTlsFiles::from_config(config).build()?;
    let upstream = tls::client_config(tls::roots(&provider_ca)?, chain, key)?;
    // The register trusts the same CA for its one client, the gateway, and
    // then checks the gateway's identity on every request.
    let registry = if config.registry.enabled {
        registry::registry_tls(config)?
    } else {
        gateway.clone()
    };
    Ok(TlsConfigs {
        gateway,
        registry,
        upstream,
    })
}
