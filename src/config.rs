//! The gateway's own settings: listen addresses, paths, database, limits.
//!
//! Every field has a development default, so `karibche serve` with no
//! arguments runs the whole system from `./var/` and `./policies/`. A real
//! deployment passes `--config FILE` (TOML, same names as the fields here).
//! Loading is parse → [`Config::validate`] (every problem reported at once)
//! → an immutable value the server shares behind an `Arc`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default `tokens.max_token_bytes`: 8 KiB, far above any honest officer token.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Default `tokens.cache_capacity`: verified tokens remembered.
pub const DEFAULT_CACHE_CAPACITY: usize = 10_000;
/// Default `audit.max_batch`: records committed in one transaction.
pub const DEFAULT_AUDIT_MAX_BATCH: usize = 512;
/// Default `audit.queue`: records waiting for the writer before callers are held back.
pub const DEFAULT_AUDIT_QUEUE: usize = 8192;
/// Default `audit.restricted_report_delay`: a year.
pub const DEFAULT_RESTRICTED_REPORT_DELAY: Duration = Duration::from_secs(365 * 24 * 3600);

/// All settings of one gateway node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where generated development files live (PKI, keys, SQLite database). Default `var`.
    pub data_dir: PathBuf,
    /// The policy files administrators edit. Default `policies`.
    pub policies_dir: PathBuf,
    /// `sqlite://…` (default `sqlite://<data_dir>/karibche.db`) or `postgres://…`.
    pub database_url: Option<String>,
    /// This node's name in the audit log; each node keeps its own hash chain. Default `node-1`.
    pub node: String,
    /// The gateway listener agencies connect to.
    pub gateway: GatewayConfig,
    /// The built-in register of foreigners.
    pub registry: RegistryConfig,
    /// Health, readiness and metrics.
    pub admin: AdminConfig,
    /// Certificates and keys; relative paths are under `data_dir`.
    pub tls: TlsConfig,
    /// Officer tokens.
    pub tokens: TokenConfig,
    /// The audit log writer.
    pub audit: AuditSettings,
    /// Rate limits and overload bounds (the quotas themselves are in `policies/limits.toml`).
    pub limits: LimitsConfig,
    /// Pseudonyms released under `pseudonymise` transforms.
    pub pseudonyms: PseudonymConfig,
    /// The web console for security officers and administrators (src/console/).
    pub console: ConsoleConfig,
    /// W3C Trace Context.
    pub tracing: TracingConfig,
}

/// W3C Trace Context (`traceparent`, `tracestate`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// Continue the trace an agency's `traceparent` names; `false` starts a new one for every request. Default `true`.
    pub trust_incoming: bool,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            trust_incoming: true,
        }
    }
}

/// The web console: its own TLS listener, sessions exchanged for officer tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Serve the console. Default false; `karibche serve` without `--config` turns it on.
    pub enabled: bool,
    /// Its TLS listener (the gateway's certificate). Default `127.0.0.1:8445`.
    pub listen: SocketAddr,
    /// Ask for the agency's client certificate on the console too. Default false.
    pub require_client_certificate: bool,
    /// A session unused this long ends. Default 15 minutes.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// A session ends this long after sign-in, used or not (and never after its token). Default 8 hours.
    #[serde(with = "humantime_serde_compat")]
    pub absolute_timeout: Duration,
    /// Sessions held at once (in memory, this node only). Default 1,000.
    pub max_sessions: usize,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 8445)),
            require_client_certificate: false,
            idle_timeout: Duration::from_secs(15 * 60),
            absolute_timeout: Duration::from_secs(8 * 3600),
            max_sessions: 1000,
        }
    }
}

/// The key behind `pseudonymise` transforms.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PseudonymConfig {
    /// Secret (hex) the period keys derive from; created if missing. Default `keys/pseudonym.key` under `data_dir`.
    pub key: PathBuf,
    /// Key period label: pseudonyms are stable within it. Default: the current UTC year.
    pub period: Option<String>,
}

impl Default for PseudonymConfig {
    fn default() -> Self {
        PseudonymConfig {
            key: PathBuf::from("keys/pseudonym.key"),
            period: None,
        }
    }
}

/// The gateway listener and its bounds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address agencies connect to. Default `127.0.0.1:8443`.
    pub listen: SocketAddr,
    /// Connections served at once; further ones wait in the kernel backlog. Default 4096.
    pub max_connections: usize,
    /// Time allowed for a TLS handshake. Default 10 s.
    #[serde(with = "humantime_serde_compat")]
    pub handshake_timeout: Duration,
    /// Time allowed to send the request headers (slowloris bound). Default 10 s.
    #[serde(with = "humantime_serde_compat")]
    pub header_timeout: Duration,
    /// Largest request body accepted (a grant may set less). Default 1 MiB.
    pub max_body_bytes: usize,
    /// Time to send a write's body once the headers are in (slow uploads). Default 30 s.
    #[serde(with = "humantime_serde_compat")]
    pub body_timeout: Duration,
    /// Largest provider response accepted. Default 16 MiB.
    pub max_response_bytes: usize,
    /// Time a provider has to answer. Default 10 s.
    #[serde(with = "humantime_serde_compat")]
    pub upstream_timeout: Duration,
    /// How long in-flight requests may take to finish at shutdown. Default 20 s.
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_grace: Duration,
    /// At shutdown, how long `/readyz` answers 503 "draining" before the listener closes (lets a balancer move away). Default 0.
    #[serde(with = "humantime_serde_compat")]
    pub drain_delay: Duration,
    /// Offer HTTP/2 to providers (ALPN); they answer over HTTP/1.1 otherwise. Default false:
    /// pooled HTTP/1.1 connections cost the gateway and the provider less per request.
    pub upstream_http2: bool,
}

/// The built-in register of foreigners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Run the built-in register in this process. Default true.
    pub enabled: bool,
    /// Its TLS listener (only the gateway's certificate may call it). Default `127.0.0.1:8444`.
    pub listen: SocketAddr,
    /// Synthetic persons seeded into an empty register. Default 10,000.
    pub seed_persons: usize,
    /// Seed of the synthetic data generator. Default 2013 (the programme's start).
    pub seed: u64,
    /// The register's own database. Default: `registry.db` under `data_dir` when the
    /// gateway's database is SQLite (so its writes never wait on the audit log's
    /// write lock, and the other way round), else the gateway's database.
    pub database_url: Option<String>,
    /// Health and metrics of `karibche registry serve` (the register as its own
    /// process); apart from the gateway's `admin.listen`. Default `127.0.0.1:9091`.
    pub admin_listen: SocketAddr,
}

/// Health and metrics listener (plain HTTP; keep it on a private interface).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Default `127.0.0.1:9090`.
    pub listen: SocketAddr,
}

/// Certificate and key files; relative paths resolve under `data_dir`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// CA bundle(s) that agency client certificates must chain to: one file or a list; each
    /// file may hold several CAs (e.g. the old and the new during a CA change). Default `pki/ca.pem`.
    #[serde(deserialize_with = "one_or_many")]
    pub client_ca: Vec<PathBuf>,
    /// Certificate revocation lists (PEM or DER), one file or a list, reloaded when they change.
    /// Default `pki/crl.pem`. An empty list turns revocation checking off.
    #[serde(deserialize_with = "one_or_many")]
    pub crls: Vec<PathBuf>,
    /// Accept client certificates whose CA has no CRL configured. Default false (refuse them).
    pub allow_unknown_revocation: bool,
    /// Refuse certificates of a CA whose CRL is past its `nextUpdate`. Default true.
    pub enforce_crl_expiry: bool,
    /// How often CA, CRL, certificate and token key files are checked for changes. Default 1 s.
    #[serde(with = "humantime_serde_compat")]
    pub reload_interval: Duration,
    /// The gateway's certificate chain (server, and client towards providers). Default `pki/gateway.pem`.
    pub cert: PathBuf,
    /// The gateway's private key. Default `pki/gateway.key`.
    pub key: PathBuf,
    /// CA bundle that provider certificates must chain to. Default `pki/ca.pem`.
    pub provider_ca: PathBuf,
    /// The built-in register's certificate. Default `pki/registry.pem`.
    pub registry_cert: PathBuf,
    /// The built-in register's key. Default `pki/registry.key`.
    pub registry_key: PathBuf,
    /// Generate a development PKI for missing files on start. Default true; turn off in production.
    pub generate_dev_pki: bool,
}

/// Officer token verification.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// The `aud` every token must carry. Default `karibche`.
    pub audience: String,
    /// Directory of agency verification keys, `<agency>.pub.pem` and/or `<agency>.jwks.json`
    /// (several keys each for rotation); reloaded on change. Default `keys` under `data_dir`.
    pub keys_dir: PathBuf,
    /// Longest bearer token accepted, in bytes; longer ones get 401 unparsed. Default 8192.
    pub max_token_bytes: usize,
    /// Verified tokens remembered so a reused token is verified once (0: off). Default 10,000.
    pub cache_capacity: usize,
    /// Every agency must present certificate-bound tokens (RFC 8705 `cnf.x5t#S256`),
    /// not only those whose policy says so. Default false.
    pub require_bound_tokens: bool,
    /// Clock skew tolerated on `exp`/`nbf`/`iat`. Default 30 s.
    #[serde(with = "humantime_serde_compat")]
    pub leeway: Duration,
    /// Longest lifetime accepted, whatever `exp` says. Default 15 min.
    #[serde(with = "humantime_serde_compat")]
    pub max_lifetime: Duration,
}

/// Audit writer settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// Most records committed in one transaction. Default 512.
    pub max_batch: usize,
    /// Records waiting for the writer before callers are held back. Default 8192.
    pub queue: usize,
    /// A signed checkpoint after at most this many records. Default 1000.
    pub checkpoint_every: u64,
    /// …or with the first batch after this long, and at shutdown. Default 60 s.
    #[serde(with = "humantime_serde_compat")]
    pub checkpoint_interval: Duration,
    /// The node's Ed25519 audit key (created if missing). Default `keys/audit-<node>.key` under `data_dir`.
    pub key: Option<PathBuf>,
    /// How long accesses under `restricted` grants stay out of the data subject's report. Default 365 days.
    #[serde(with = "humantime_serde_compat")]
    pub restricted_report_delay: Duration,
    /// The origin line of the node's signed tree heads (C2SP checkpoints). Default `karibche/audit/<node>`.
    pub origin: Option<String>,
    /// Witnesses the node sends its tree heads to (`[[audit.witnesses]]`). Default none.
    pub witnesses: Vec<WitnessSettings>,
    /// An RFC 3161 time-stamping authority for the node's tree heads (`[audit.tsa]`). Default none.
    pub tsa: Option<TsaSettings>,
}

/// The time-stamping authority of the node's tree heads (RFC 3161 over HTTP).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TsaSettings {
    /// Where TimeStampReqs are POSTed, `http://…` (`application/timestamp-query`).
    pub url: String,
    /// The TSA's certificate (PEM); its key must have signed every token. Relative to `data_dir`.
    pub certificate: PathBuf,
}

/// One witness of the node's audit log (C2SP tlog-witness over plain HTTP).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessSettings {
    /// The witness's key name: the name on its cosignature lines.
    pub name: String,
    /// Its base URL, `http://host:port`.
    pub url: String,
    /// Its Ed25519 public key, hex (`karibche witness pubkey`).
    pub public_key: String,
}

/// Rate limits and overload bounds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Gateway replicas sharing the quotas of `policies/limits.toml`; each enforces its share. Default 1.
    pub replicas: u32,
    /// A connection with no request in flight for this long is closed. Default 30 s.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Connections one agency may hold open at once. Default 512.
    pub max_connections_per_agency: usize,
    /// Requests in flight to one provider at once, all agencies together; more wait. Default 256.
    pub provider_concurrency: usize,
    /// Requests in flight to one provider per agency while other agencies use it too (an
    /// agency alone may use more, short of one share); more wait. Default 16.
    pub provider_agency_share: usize,
    /// The longest a request waits for a provider slot; then 503 with `Retry-After`. Default 2 s.
    #[serde(with = "humantime_serde_compat")]
    pub provider_wait: Duration,
    /// Consecutive provider failures (errors, timeouts, 5xx) that open its circuit breaker. Default 5.
    pub breaker_failures: u32,
    /// How long an opened breaker refuses before a probe; doubled after each failed probe. Default 5 s.
    #[serde(with = "humantime_serde_compat")]
    pub breaker_open: Duration,
    /// The longest a breaker stays open between probes. Default 60 s.
    #[serde(with = "humantime_serde_compat")]
    pub breaker_max_open: Duration,
    /// Where quotas are kept: `local` (default: each replica enforces its share,
    /// see `replicas`) or `redis://host:port[/db]` (shared by all replicas; the
    /// local share is the fallback while Redis is slow or down).
    pub backend: String,
    /// Prefix of every Redis key, so deployments can share one Redis. Default `karibche:`.
    pub redis_prefix: String,
    /// The longest a quota check waits for Redis before it takes the local share. Default 25 ms.
    #[serde(with = "humantime_serde_compat")]
    pub redis_timeout: Duration,
}

/// Default `limits.backend`: each replica enforces its share of every quota.
pub const LOCAL_LIMITS: &str = "local";

impl LimitsConfig {
    /// The Redis URL of the shared-quota backend, or `None` for the local split.
    pub fn redis_url(&self) -> Option<&str> {
        (self.backend != LOCAL_LIMITS).then_some(self.backend.as_str())
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            replicas: 1,
            idle_timeout: Duration::from_secs(30),
            max_connections_per_agency: 512,
            provider_concurrency: 256,
            provider_agency_share: 16,
            provider_wait: Duration::from_secs(2),
            breaker_failures: 5,
            breaker_open: Duration::from_secs(5),
            breaker_max_open: Duration::from_secs(60),
            backend: LOCAL_LIMITS.to_owned(),
            redis_prefix: "karibche:".to_owned(),
            redis_timeout: Duration::from_millis(25),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("var"),
            policies_dir: PathBuf::from("policies"),
            database_url: None,
            node: "node-1".to_owned(),
            gateway: GatewayConfig::default(),
            registry: RegistryConfig::default(),
            admin: AdminConfig::default(),
            tls: TlsConfig::default(),
            tokens: TokenConfig::default(),
            audit: AuditSettings::default(),
            pseudonyms: PseudonymConfig::default(),
            limits: LimitsConfig::default(),
            console: ConsoleConfig::default(),
            tracing: TracingConfig::default(),
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            max_body_bytes: 1024 * 1024,
            body_timeout: Duration::from_secs(30),
            max_response_bytes: 16 * 1024 * 1024,
            upstream_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(20),
            drain_delay: Duration::ZERO,
            upstream_http2: false,
        }
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8444)),
            seed_persons: 10_000,
            seed: 2013,
            database_url: None,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            client_ca: vec![PathBuf::from("pki/ca.pem")],
            crls: vec![PathBuf::from("pki/crl.pem")],
            allow_unknown_revocation: false,
            enforce_crl_expiry: true,
            reload_interval: Duration::from_secs(1),
            cert: PathBuf::from("pki/gateway.pem"),
            key: PathBuf::from("pki/gateway.key"),
            provider_ca: PathBuf::from("pki/ca.pem"),
            registry_cert: PathBuf::from("pki/registry.pem"),
            registry_key: PathBuf::from("pki/registry.key"),
            generate_dev_pki: true,
        }
    }
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            audience: "karibche".to_owned(),
            keys_dir: PathBuf::from("keys"),
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            require_bound_tokens: false,
            leeway: Duration::from_secs(30),
            max_lifetime: Duration::from_secs(15 * 60),
        }
    }
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            max_batch: DEFAULT_AUDIT_MAX_BATCH,
            queue: DEFAULT_AUDIT_QUEUE,
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(60),
            key: None,
            restricted_report_delay: DEFAULT_RESTRICTED_REPORT_DELAY,
            origin: None,
            witnesses: Vec::new(),
            tsa: None,
        }
    }
}

/// A configuration that could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What the parser said, with line and column.
        message: String,
    },
    /// One or more values are unusable; every problem is listed.
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

impl Config {
    /// Reads a TOML configuration file; absent settings take their defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Checks every setting and reports all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.node.is_empty()
            || !self
                .node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            problems.push(format!(
                "node {:?} must be non-empty ASCII letters, digits, '-', '_' or '.'",
                self.node
            ));
        }
        if let Err(e) = crate::store::backend_of(&self.database_url()) {
            problems.push(e.to_string());
        }
        let g = &self.gateway;
        if g.max_connections == 0 {
            problems.push("gateway.max_connections must be at least 1".to_owned());
        }
        for (name, d) in [
            ("gateway.handshake_timeout", g.handshake_timeout),
            ("gateway.header_timeout", g.header_timeout),
            ("gateway.upstream_timeout", g.upstream_timeout),
            ("gateway.body_timeout", g.body_timeout),
            ("tokens.max_lifetime", self.tokens.max_lifetime),
            ("tls.reload_interval", self.tls.reload_interval),
            ("limits.idle_timeout", self.limits.idle_timeout),
            ("limits.breaker_open", self.limits.breaker_open),
            ("limits.provider_wait", self.limits.provider_wait),
            ("console.idle_timeout", self.console.idle_timeout),
            ("console.absolute_timeout", self.console.absolute_timeout),
        ] {
            if d.is_zero() {
                problems.push(format!("{name} must be longer than zero"));
            }
        }
        if g.max_body_bytes == 0 || g.max_response_bytes == 0 {
            problems.push("gateway body limits must be at least 1 byte".to_owned());
        }
        if self.tls.client_ca.is_empty() {
            problems.push("tls.client_ca must name at least one CA file".to_owned());
        }
        if self.console.max_sessions == 0 {
            problems.push("console.max_sessions must be at least 1".to_owned());
        }
        if self.tokens.max_token_bytes < 256 {
            problems.push("tokens.max_token_bytes must be at least 256".to_owned());
        }
        let l = &self.limits;
        for (name, n) in [
            ("limits.replicas", l.replicas as usize),
            (
                "limits.max_connections_per_agency",
                l.max_connections_per_agency,
            ),
            ("limits.provider_concurrency", l.provider_concurrency),
            ("limits.provider_agency_share", l.provider_agency_share),
            ("limits.breaker_failures", l.breaker_failures as usize),
        ] {
            if n == 0 {
                problems.push(format!("{name} must be at least 1"));
            }
        }
        if let Some(url) = l.redis_url() {
            let redis = url.starts_with("redis://")
                && redis::IntoConnectionInfo::into_connection_info(url).is_ok();
            if !redis {
                problems.push(format!(
                    "limits.backend must be \"local\" or redis://host:port[/db], not {url:?}"
                ));
            }
        }
        if l.redis_timeout.is_zero() || l.redis_timeout > Duration::from_secs(1) {
            problems
                .push("limits.redis_timeout must be longer than zero and at most 1 s".to_owned());
        }
        if l.breaker_max_open < l.breaker_open {
            problems.push(
                "limits.breaker_max_open must not be shorter than limits.breaker_open".to_owned(),
            );
        }
        if self.tokens.audience.is_empty() {
            problems.push("tokens.audience must not be empty".to_owned());
        }
        if self.audit.max_batch == 0 || self.audit.queue == 0 || self.audit.checkpoint_every == 0 {
            problems.push(
                "audit.max_batch, audit.queue and audit.checkpoint_every must be at least 1"
                    .to_owned(),
            );
        }
        for (i, w) in self.audit.witnesses.iter().enumerate() {
            if w.name.is_empty() || w.name.contains([' ', '\n', '+']) {
                problems.push(format!(
                    "audit.witnesses[{i}].name must be non-empty, without spaces or '+'"
                ));
            }
            if !w.url.starts_with("http://") {
                problems.push(format!("audit.witnesses[{i}].url must be http://host:port (plain HTTP on a private network, or a TLS-terminating proxy in front of it)"));
            }
            if hex::decode(&w.public_key).map_or(true, |k| k.len() != 32) {
                problems.push(format!(
                    "audit.witnesses[{i}].public_key must be 64 hex digits (an Ed25519 key)"
                ));
            }
        }
        if let Some(tsa) = &self.audit.tsa {
            if !tsa.url.starts_with("http://") {
                problems.push("audit.tsa.url must be http://… (RFC 3161 over HTTP; the token is signed, so no TLS is needed)".to_owned());
            }
        }
        if self
            .audit
            .origin
            .as_deref()
            .is_some_and(|o| o.is_empty() || o.contains('\n'))
        {
            problems.push("audit.origin must be one non-empty line".to_owned());
        }
        let mut addrs = vec![
            ("gateway.listen", g.listen),
            ("admin.listen", self.admin.listen),
        ];
        if self.registry.enabled {
            addrs.push(("registry.listen", self.registry.listen));
        }
        for (i, (a, x)) in addrs.iter().enumerate() {
            for (b, y) in &addrs[i + 1..] {
                if x == y && x.port() != 0 {
                    problems.push(format!("{a} and {b} are the same address {x}"));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The database URL in force (the default is a SQLite file under `data_dir`).
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("karibche.db").display()),
        }
    }

    /// The built-in register's database URL in force (see [`RegistryConfig::database_url`]).
    pub fn registry_database_url(&self) -> String {
        match &self.registry.database_url {
            Some(url) => url.clone(),
            None if self.database_url().starts_with("sqlite:") => {
                format!("sqlite://{}", self.data_dir.join("registry.db").display())
            }
            None => self.database_url(),
        }
    }

    /// A path from the configuration, resolved under `data_dir` when relative.
    pub fn data_path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.data_dir.join(p)
        }
    }

    /// The node's audit signing key file.
    pub fn audit_key_path(&self) -> PathBuf {
        match &self.audit.key {
            Some(p) => self.data_path(p),
            None => self
                .data_path(&self.tokens.keys_dir)
                .join(format!("audit-{}.key", self.node)),
        }
    }

    /// Directory of the development PKI (`<data_dir>/pki`).
    pub fn pki_dir(&self) -> PathBuf {
        self.data_dir.join("pki")
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node={} gateway={} registry={} admin={} policies={} data={}",
            self.node,
            self.gateway.listen,
            if self.registry.enabled {
                self.registry.listen.to_string()
            } else {
                "off".to_owned()
            },
            self.admin.listen,
            self.policies_dir.display(),
            self.data_dir.display()
        )
    }
}

/// A path or a list of paths.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    })
}

/// Durations in config files as humantime strings ("10s", "15m").
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_embedded() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.gateway.listen.port(), 8443);
        assert_eq!(c.admin.listen.port(), 9090);
        assert!(c.database_url().starts_with("sqlite://var/"));
    }

    #[test]
    fn the_register_gets_its_own_sqlite_file_but_shares_postgres() {
        let mut c = Config::default();
        assert!(c.registry_database_url().ends_with("registry.db"));
        assert_ne!(c.registry_database_url(), c.database_url());
        c.database_url = Some("postgres://db/karibche".to_owned());
        assert_eq!(c.registry_database_url(), "postgres://db/karibche");
        c.registry.database_url = Some("postgres://db/register".to_owned());
        assert_eq!(c.registry_database_url(), "postgres://db/register");
    }

    #[test]
    fn file_overrides_and_reports_every_problem() {
        let c: Config = toml::from_str(
            "node = \"bad node\"\ndatabase_url = \"mysql://x\"\n[gateway]\nmax_connections = 0\nupstream_timeout = \"0s\"\n",
        )
        .unwrap();
        let Err(ConfigError::Invalid(problems)) = c.validate() else {
            panic!("expected invalid")
        };
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    #[test]
    fn ca_and_crl_take_one_file_or_a_list() {
        let c: Config = toml::from_str(
            "[tls]\nclient_ca = \"a.pem\"\ncrls = [\"x.crl\", \"y.crl\"]\n[tokens]\nrequire_bound_tokens = true\n",
        )
        .unwrap();
        assert_eq!(c.tls.client_ca, vec![PathBuf::from("a.pem")]);
        assert_eq!(c.tls.crls.len(), 2);
        assert!(c.tokens.require_bound_tokens);
        let c: Config = toml::from_str("[tls]\nclient_ca = [\"old.pem\", \"new.pem\"]\n").unwrap();
        assert_eq!(c.tls.client_ca.len(), 2);
        c.validate().unwrap();
    }

    #[test]
    fn limits_section_is_read_and_checked() {
        let c: Config = toml::from_str(
            "[limits]\nreplicas = 3\nidle_timeout = \"5s\"\nbreaker_open = \"10s\"\nbreaker_max_open = \"2s\"\nprovider_concurrency = 0\n",
        )
        .unwrap();
        assert_eq!(c.limits.replicas, 3);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(5));
        let Err(ConfigError::Invalid(problems)) = c.validate() else {
            panic!("expected invalid")
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn limits_backend_is_local_or_redis() {
        let c = Config::default();
        assert_eq!(c.limits.redis_url(), None);
        let c: Config = toml::from_str(
            "[limits]\nbackend = \"redis://127.0.0.1:6379/2\"\nredis_prefix = \"t:\"\nredis_timeout = \"10ms\"\n",
        )
        .unwrap();
        assert_eq!(c.limits.redis_url(), Some("redis://127.0.0.1:6379/2"));
        assert_eq!(c.limits.redis_timeout, Duration::from_millis(10));
        c.validate().unwrap();
        for bad in ["memcached://x", "redis://", "redis-ish"] {
            let mut c = Config::default();
            c.limits.backend = bad.to_owned();
            assert!(c.validate().is_err(), "{bad}");
        }
        let mut c = Config::default();
        c.limits.redis_timeout = Duration::ZERO;
        assert!(c.validate().is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<Config>("[gateway]\nlisten_port = 1\n").unwrap_err();
        assert!(err.to_string().contains("listen_port"));
    }
}
