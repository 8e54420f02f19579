//! The `karibche` command line: argument definitions and what each command does.
//!
//! This is the binary's edge, the one module that reports errors with
//! `anyhow`: every command prints a clear message and exits non-zero on
//! failure. Everything it calls is a library function the tests use too.
//!
//! Output goes through `out!`/`outln!`, never `print!` (which panics on a
//! closed pipe): a reader that stops early (`karibche audit report | head -1`)
//! ends the command quietly with exit 0, as it does for any Unix filter.

#![deny(clippy::print_stdout)]

/// `print!` that hands a failed write back to the caller (`?`) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        write!(std::io::stdout().lock(), $($arg)*)?
    };
}

/// `println!` that hands a failed write back to the caller (`?`) instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*)?
    };
}

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::Config;
use crate::policy::{DecisionRequest, Operation, Policy};
use crate::server::{self, Listeners, Started};

/// karibche — secure data-exchange gateway between state agencies.
///
/// With no options, `karibche serve` runs the whole system on development
/// defaults: PKI and keys under ./var/, SQLite at ./var/karibche.db, policies
/// from ./policies/, the gateway on 127.0.0.1:8443, the register of
/// foreigners behind it, health and metrics on 127.0.0.1:9090.
#[derive(Debug, Parser)]
#[command(name = "karibche", version, about, long_about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Settings shared by every command.
    #[command(flatten)]
    pub common: Common,
}

/// Options every command understands.
#[derive(Debug, Args)]
pub struct Common {
    /// Configuration file (TOML); defaults apply to whatever it leaves out.
    #[arg(long, global = true, env = "KARIBCHE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for generated PKI, keys and the SQLite database [default: var].
    #[arg(long, global = true, env = "KARIBCHE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Directory of policy files [default: policies].
    #[arg(long, global = true, env = "KARIBCHE_POLICIES", value_name = "DIR")]
    pub policies: Option<PathBuf>,
    /// Database URL: sqlite://FILE or postgres://USER@HOST/DB [default: sqlite://DATA_DIR/karibche.db].
    #[arg(long, global = true, env = "KARIBCHE_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway, the built-in register and the admin endpoint.
    Serve(ServeArgs),
    /// Development officer tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Check and explain the policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Verify, query and export the access log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Development certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// The built-in register of foreigners.
    #[command(subcommand)]
    Registry(RegistryCommand),
    /// Load generator: mutual TLS, officers' tokens, HTTP/1.1 or HTTP/2, fixed rate or max throughput (BENCHMARKS.md).
    Bench(crate::bench::args::BenchArgs),
    /// Data subjects' consents: record, revoke, list (each change is an audit event).
    #[command(subcommand)]
    Consent(ConsentCommand),
}

/// `karibche consent …`
#[derive(Debug, Subcommand)]
pub enum ConsentCommand {
    /// Record a consent the agency collected; prints its id.
    Grant {
        /// The person's register id.
        #[arg(long)]
        subject: String,
        /// The agency the consent is given to.
        #[arg(long)]
        agency: String,
        /// The purpose consented to (policies/purposes.toml).
        #[arg(long)]
        purpose: String,
        /// Last day the consent holds, YYYY-MM-DD (UTC, inclusive) [default: until revoked].
        #[arg(long, value_name = "DATE")]
        until: Option<String>,
        /// Reference to the evidence, e.g. the signed form's number.
        #[arg(long, value_name = "REF")]
        evidence: Option<String>,
        /// When the person gave it, YYYY-MM-DD or RFC 3339 [default: now].
        #[arg(long, value_name = "DATE")]
        given: Option<String>,
        /// Only this provider/service (repeatable) [default: every service].
        #[arg(long, value_name = "PROVIDER/SERVICE")]
        scope: Vec<String>,
    },
    /// Revoke a consent; requests relying on it are refused from the next one on.
    Revoke {
        /// The consent id (as printed by `consent grant`).
        id: String,
    },
    /// List consents, one line each.
    List {
        /// Only this person's.
        #[arg(long)]
        subject: Option<String>,
    },
}

/// `karibche serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Gateway listen address [default: 127.0.0.1:8443].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Health and metrics listen address [default: 127.0.0.1:9090].
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Built-in register listen address [default: 127.0.0.1:8444].
    #[arg(long, value_name = "ADDR")]
    pub registry_listen: Option<SocketAddr>,
    /// Do not run the built-in register in this process.
    #[arg(long)]
    pub no_registry: bool,
    /// Synthetic persons to seed into an empty register [default: 10000].
    #[arg(long, value_name = "N")]
    pub seed_persons: Option<usize>,
    /// This node's name in the audit log (one hash chain per node) [default: node-1].
    #[arg(long, env = "KARIBCHE_NODE", value_name = "NAME")]
    pub node: Option<String>,
}

/// `karibche token …`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a JWT signed with the agency's development key.
    Issue {
        /// Agency id (as in policies/agencies/).
        #[arg(long)]
        agency: String,
        /// Officer id.
        #[arg(long)]
        officer: String,
        /// Purpose code (policies/purposes.toml).
        #[arg(long)]
        purpose: String,
        /// Case reference.
        #[arg(long = "case", value_name = "REF")]
        case_ref: Option<String>,
        /// Lifetime, e.g. 5m, 90s.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Bind the token to this client certificate (RFC 8705 `cnf.x5t#S256`): it is then accepted only on a connection presenting it.
        #[arg(long, value_name = "CERT_PEM")]
        bind_cert: Option<PathBuf>,
    },
}

/// `karibche policy …`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate the policy files: every problem as file:line:column (exit 1), then warnings (exit 0).
    Check {
        /// Policy directory [default: the configured policies directory].
        dir: Option<PathBuf>,
    },
    /// Show how a request would be decided: the decision, the grant (file:line), the fields released, the limits.
    ///
    /// Name the request as the gateway sees it (`--method GET --path /v1/registry/persons/123`)
    /// or by its parts (`--provider registry --service persons --operation read`).
    Explain {
        /// Agency id.
        #[arg(long)]
        agency: String,
        /// Purpose code.
        #[arg(long)]
        purpose: String,
        /// HTTP method of the request.
        #[arg(long, default_value = "GET", conflicts_with = "operation")]
        method: String,
        /// Gateway path, /v1/{provider}/{service}/….
        #[arg(long, required_unless_present_all = ["provider", "service"], conflicts_with_all = ["provider", "service"])]
        path: Option<String>,
        /// Provider id (instead of --path).
        #[arg(long, requires = "service")]
        provider: Option<String>,
        /// Service id (instead of --path).
        #[arg(long, requires = "provider")]
        service: Option<String>,
        /// read or write (instead of --method).
        #[arg(long)]
        operation: Option<String>,
        /// Case reference.
        #[arg(long = "case", value_name = "REF")]
        case_ref: Option<String>,
    },
    /// Run the policy test cases (DIR/tests/*.toml); exit 1 if any fails.
    Test {
        /// Policy directory [default: the configured policies directory].
        dir: Option<PathBuf>,
    },
    /// Print the JSON Schema (draft 2020-12) of the policy files (also policies/schema.json).
    Schema,
    /// What access each agency gains or loses from OLD_DIR to NEW_DIR.
    Diff {
        /// The policy directory before the change.
        old_dir: PathBuf,
        /// The policy directory after the change.
        new_dir: PathBuf,
    },
}

/// Filters shared by `audit query` and `audit export`.
#[derive(Debug, Args, Clone)]
pub struct FilterArgs {
    /// Records naming this data subject (register id).
    #[arg(long)]
    pub subject: Option<String>,
    /// Records of this agency.
    #[arg(long)]
    pub agency: Option<String>,
    /// Records of this officer.
    #[arg(long)]
    pub officer: Option<String>,
    /// Records for this provider.
    #[arg(long)]
    pub provider: Option<String>,
    /// Records for this service (of any provider, unless --provider is given too).
    #[arg(long)]
    pub service: Option<String>,
    /// Records stating this purpose.
    #[arg(long)]
    pub purpose: Option<String>,
    /// allow or deny.
    #[arg(long)]
    pub decision: Option<String>,
    /// At or after this time (RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Before this time (RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
    /// Records of this gateway node.
    #[arg(long)]
    pub node: Option<String>,
    /// Only requests whose shadow decision (shadow = true grants) differs from the enforced one.
    #[arg(long)]
    pub shadow_diff: bool,
    /// At most this many records.
    #[arg(long)]
    pub limit: Option<i64>,
}

impl FilterArgs {
    fn to_filter(&self) -> crate::audit::Filter {
        crate::audit::Filter {
            subject: self.subject.clone(),
            agency: self.agency.clone(),
            officer: self.officer.clone(),
            provider: self.provider.clone(),
            service: self.service.clone(),
            purpose: self.purpose.clone(),
            decision: self.decision.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
            node: self.node.clone(),
            shadow_diff: self.shadow_diff,
            limit: self.limit,
            hide_restricted_since: None,
        }
    }
}

/// `karibche audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute every node's hash chain. Exit 0: intact; 1: tampered; 2: could not check.
    Verify {
        /// Only this node's chain.
        #[arg(long)]
        node: Option<String>,
        /// Start at this sequence number (its prev_hash is taken as given).
        #[arg(long, value_name = "SEQ", conflicts_with = "file")]
        from: Option<i64>,
        /// Trusted audit public key (hex, as printed by `audit pubkey`): every checkpoint must carry its signature.
        #[arg(long, value_name = "HEX")]
        pubkey: Option<String>,
        /// Verify an export (JSON lines from `audit export`) offline instead of the database.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// With --file: the checkpoints exported beside it (`audit export --checkpoints`).
        #[arg(long, value_name = "FILE", requires = "file")]
        checkpoints: Option<PathBuf>,
    },
    /// A data subject's access report: who asked for the person's record, when, why, and what they got.
    Report {
        /// The person's register id.
        #[arg(long)]
        subject: String,
        /// Plain words, or JSON for a portal.
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        format: ReportFormat,
    },
    /// Print this node's audit public key (hex Ed25519), for offline verification.
    Pubkey,
    /// Benchmark the group-commit writer against one transaction per record (on a scratch database).
    Bench {
        /// Records per configuration.
        #[arg(long, default_value_t = 20_000)]
        records: usize,
        /// Concurrent callers.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Scratch database [default: a temporary SQLite file]; never your real audit database.
        #[arg(long, value_name = "URL")]
        scratch_url: Option<String>,
    },
    /// List matching records: a table for people, or JSON lines for tools.
    Query {
        /// Filters.
        #[command(flatten)]
        filter: FilterArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = QueryFormat::Table)]
        format: QueryFormat,
    },
    /// Move records older than a time to an archive file (JSON lines + checkpoints) and out of the database.
    Archive {
        /// Archive every node's records before this time (RFC 3339).
        #[arg(long, value_name = "RFC3339")]
        before: String,
        /// The archive file (created; FILE.checkpoints is written beside it).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Write matching records as JSON lines.
    Export {
        /// Filters.
        #[command(flatten)]
        filter: FilterArgs,
        /// Output file [default: standard output].
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Also write the signed checkpoints, as JSON lines, to this file (for `audit verify --file`).
        #[arg(long, value_name = "FILE")]
        checkpoints: Option<PathBuf>,
    },
}

/// Output of `audit query`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum QueryFormat {
    /// Aligned columns, for people.
    Table,
    /// One JSON record per line (the export format), for tools.
    Jsonl,
}

/// Output of `audit report`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReportFormat {
    /// Plain words.
    Text,
    /// One JSON document.
    Json,
}

/// `karibche certs …`
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create the development CA, gateway, register and agency certificates and token keys that are missing.
    Init,
    /// Add an agency's development certificate to the development CRL; a running gateway refuses it within seconds.
    Revoke {
        /// Agency id (as in policies/agencies/).
        #[arg(long)]
        agency: String,
    },
    /// Days left for every certificate and CRL the gateway uses; exit 1 if any has run out.
    Status {
        /// Mark certificates with fewer days left than this (CRLs: fewer than one day).
        #[arg(long, default_value_t = 30)]
        warn_days: i64,
    },
}

/// `karibche registry …`
#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Seed synthetic persons into an empty register.
    Seed {
        /// How many persons.
        #[arg(long, default_value_t = 10_000)]
        persons: usize,
        /// Generator seed.
        #[arg(long, default_value_t = 2013)]
        seed: u64,
    },
    /// Measure lookups per second by id and by document number, and show their query plans.
    Bench {
        /// Lookups per kind.
        #[arg(long, default_value_t = 20_000)]
        lookups: usize,
        /// Lookups in flight at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
}

impl Cli {
    /// The configuration these arguments describe: file (if any), then flags.
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.common.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(d) = &self.common.data_dir {
            config.data_dir = d.clone();
        }
        if let Some(p) = &self.common.policies {
            config.policies_dir = p.clone();
        }
        if let Some(u) = &self.common.database_url {
            config.database_url = Some(u.clone());
        }
        if let Command::Serve(s) = &self.command {
            if let Some(a) = s.listen {
                config.gateway.listen = a;
            }
            if let Some(a) = s.admin_listen {
                config.admin.listen = a;
            }
            if let Some(a) = s.registry_listen {
                config.registry.listen = a;
            }
            if s.no_registry {
                config.registry.enabled = false;
            }
            if let Some(n) = s.seed_persons {
                config.registry.seed_persons = n;
            }
            if let Some(n) = &s.node {
                config.node = n.clone();
            }
        }
        config.validate()?;
        Ok(config)
    }
}

/// Sets up logging: text or JSON on standard error, level from `RUST_LOG`.
pub fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Runs the command; a closed standard output (the reader went away) is a normal end.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match run_command(cli).await {
        Err(err) if is_broken_pipe(&err) => Ok(ExitCode::SUCCESS),
        other => other,
    }
}

/// Whether `err` comes from writing to a pipe whose reader has gone.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        let kind = match e.downcast_ref::<std::io::Error>() {
            Some(io) => Some(io.kind()),
            // serde_json keeps the io::Error to itself; it tells only its kind.
            None => e
                .downcast_ref::<serde_json::Error>()
                .and_then(serde_json::Error::io_error_kind),
        };
        kind == Some(std::io::ErrorKind::BrokenPipe)
    })
}

async fn run_command(cli: Cli) -> anyhow::Result<ExitCode> {
    let quiet = !matches!(cli.command, Command::Serve(_));
    init_logging(cli.common.log_format, if quiet { "warn" } else { "info" });
    let config = cli.config()?;
    match &cli.command {
        Command::Serve(_) => {
            let listeners = Listeners::bind(&config).await?;
            let data_dir = config.data_dir.clone();
            server::serve(config, listeners, |s| {
                // A server whose standard output is gone keeps serving; its logs go to standard error.
                if let Err(err) = print_banner(s, &data_dir) {
                    tracing::debug!(%err, "banner not printed");
                }
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::Issue {
            agency,
            officer,
            purpose,
            case_ref,
            ttl,
            bind_cert,
        }) => {
            let keys_dir = config.data_path(&config.tokens.keys_dir);
            let request = crate::token::IssueRequest {
                agency: agency.clone(),
                officer: officer.clone(),
                purpose: purpose.clone(),
                case_ref: case_ref.clone(),
                ttl: *ttl,
                audience: config.tokens.audience.clone(),
                backdate: Duration::ZERO,
            };
            // A token the gateway would refuse is refused here, with every reason at once.
            let policy = server::load_policy(&config.policies_dir).context(
                "token issue checks the token against the policy in force (--policies DIR)",
            )?;
            if let Err(problems) =
                crate::token::check_issue(&request, &policy, config.tokens.max_lifetime)
            {
                let mut text = String::from("the gateway would refuse this token:");
                for p in &problems.0 {
                    text.push_str("\n  - ");
                    text.push_str(p);
                }
                bail!(text);
            }
            let token = match bind_cert {
                Some(cert) => {
                    let der = crate::pki::load_certs(cert)?;
                    let sha256 = crate::pki::fingerprint(&der[0]);
                    crate::token::issue_bound(&keys_dir, &request, &sha256)
                }
                None => crate::token::issue(&keys_dir, &request),
            }
            .with_context(|| {
                format!("no development key for agency {agency:?}; run `karibche certs init` (or `serve`) first")
            })?;
            outln!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(cmd) => policy_command(&config, cmd),
        Command::Bench(args) => crate::bench::args::command(&config, args).await,
        Command::Audit(cmd) => audit_command(&config, cmd).await,
        Command::Certs(CertsCommand::Revoke { agency }) => {
            let r =
                crate::crl::revoke_dev_agency(&config.pki_dir(), agency).with_context(|| {
                    format!("cannot revoke the development certificate of {agency:?}")
                })?;
            if r.newly_revoked {
                outln!(
                    "revoked {} (serial {}); {} updated",
                    r.certificate.display(),
                    r.serial,
                    r.crl.display()
                );
            } else {
                outln!(
                    "{} was already revoked; {} re-signed",
                    r.certificate.display(),
                    r.crl.display()
                );
            }
            outln!("a running gateway refuses it from its next CRL reload (tls.reload_interval, default 1s)");
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(CertsCommand::Status { warn_days }) => certs_status(&config, *warn_days),
        Command::Certs(CertsCommand::Init) => {
            let policy = server::load_policy(&config.policies_dir)?;
            let names: Vec<String> = policy.agencies().map(|a| a.id.clone()).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let a = crate::pki::ensure_dev_pki(&config.pki_dir(), &names)?;
            let b = crate::pki::ensure_signing_keys(
                &config.data_path(&config.tokens.keys_dir),
                &names,
            )?;
            for f in a.created.iter().chain(&b.created) {
                outln!("created {}", f.display());
            }
            if a.created.is_empty() && b.created.is_empty() {
                outln!(
                    "all development certificates and keys exist under {}",
                    config.data_dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Registry(RegistryCommand::Seed { persons, seed }) => {
            let store = crate::store::Store::connect(&config.registry_database_url()).await?;
            let n = crate::registry::seed(&store, *persons, *seed).await?;
            let total = crate::registry::count_persons(&store).await?;
            outln!("seeded {n} persons; the register holds {total}");
            store.close().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Registry(RegistryCommand::Bench {
            lookups,
            concurrency,
        }) => {
            let store = crate::store::Store::connect(&config.registry_database_url()).await?;
            let opts = crate::registry::BenchOptions {
                lookups: *lookups,
                concurrency: *concurrency,
                seed: 1,
            };
            let report = crate::registry::bench(&store, &opts).await?;
            store.close().await;
            outln!("register: {} persons", report.persons);
            for r in &report.results {
                outln!(
                    "{:<34} {:>9.0} lookups/s  ({} lookups, {} found, {:.2?})",
                    r.name,
                    r.per_second(),
                    r.lookups,
                    r.found,
                    r.elapsed
                );
            }
            for p in &report.plans {
                let verdict = if p.uses_index { "index" } else { "NO INDEX" };
                outln!("plan [{verdict}] {}: {}", p.name, p.sql);
                for line in &p.lines {
                    outln!("    {line}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Consent(cmd) => consent_command(&config, cmd).await,
    }
}

/// `karibche consent …`: changes are audited on this host's own chain, `<node>-cli`,
/// so they never contend with a running gateway's chain head.
async fn consent_command(config: &Config, cmd: &ConsentCommand) -> anyhow::Result<ExitCode> {
    use crate::consent::{parse_day, parse_instant, Actor, ConsentStore, Consents, NewConsent};
    let store = crate::store::Store::connect(&config.database_url()).await?;
    if let ConsentCommand::List { subject } = cmd {
        let consents = ConsentStore::new(store.clone())
            .list(subject.as_deref())
            .await?;
        for c in &consents {
            let state = match &c.revoked_at {
                Some(at) => format!("revoked {at}"),
                None => match &c.valid_until {
                    Some(u) => format!("valid until {u}"),
                    None => "valid until revoked".to_owned(),
                },
            };
            outln!(
                "{} subject={} agency={} purpose={} scope={} given={} evidence={} {state}",
                c.id,
                c.subject,
                c.agency,
                c.purpose,
                if c.scope.is_empty() {
                    "*".to_owned()
                } else {
                    c.scope.join(",")
                },
                c.given_at,
                c.evidence_ref.as_deref().unwrap_or("-"),
            );
        }
        outln!("{} consent(s)", consents.len());
        store.close().await;
        return Ok(ExitCode::SUCCESS);
    }
    let policy = server::load_policy(&config.policies_dir)?;
    let node = format!("{}-cli", config.node);
    // Like a gateway node, this chain is written by one process at a time.
    let node_lock = store.lock_node(&node).await?;
    let mut audit_config = crate::audit::AuditConfig::new(node);
    let key_path = config.audit_key_path();
    if key_path.exists() {
        audit_config.checkpoints = Some(crate::audit::CheckpointPolicy {
            key: std::sync::Arc::new(crate::audit::AuditKey::load_or_create(&key_path)?),
            every: 1,
            interval: Duration::from_secs(60),
        });
    }
    let (audit, writer) =
        crate::audit::AuditLog::start(store.guarded_by(&node_lock), audit_config).await?;
    let consents = Consents::new(store.clone(), audit.clone());
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_owned());
    let actor = Actor {
        officer: format!("admin:{user}"),
        policy_version: policy.version().to_owned(),
        ..Actor::default()
    };
    let outcome = match cmd {
        ConsentCommand::Grant {
            subject,
            agency,
            purpose,
            until,
            evidence,
            given,
            scope,
        } => {
            if policy.agency(agency).is_none() {
                bail!("no agency {agency:?} in {}", config.policies_dir.display());
            }
            if policy.purpose(purpose).is_none() {
                bail!("no purpose {purpose:?} in the purpose vocabulary");
            }
            let valid_until = until
                .as_deref()
                .map(|u| parse_day(u).with_context(|| format!("--until {u:?} is not YYYY-MM-DD")))
                .transpose()?;
            let given_at = given
                .as_deref()
                .map(|g| {
                    parse_instant(g)
                        .with_context(|| format!("--given {g:?} is not YYYY-MM-DD or RFC 3339"))
                })
                .transpose()?;
            let new = NewConsent {
                subject: subject.clone(),
                agency: agency.clone(),
                purpose: purpose.clone(),
                scope: scope.clone(),
                given_at,
                valid_until,
                evidence_ref: evidence.clone(),
            };
            consents.grant(new, &actor).await.map(|c| c.id)
        }
        ConsentCommand::Revoke { id } => consents.revoke(id, None, &actor).await.map(|c| {
            format!(
                "revoked {} (subject {}, agency {}, purpose {})",
                c.id, c.subject, c.agency, c.purpose
            )
        }),
        ConsentCommand::List { .. } => Ok(String::new()),
    };
    audit.close();
    drop(consents);
    drop(audit);
    writer.finish().await;
    node_lock.release().await;
    store.close().await;
    let said = outcome?;
    if !said.is_empty() {
        outln!("{said}");
    }
    Ok(ExitCode::SUCCESS)
}

fn policy_command(config: &Config, cmd: &PolicyCommand) -> anyhow::Result<ExitCode> {
    let today = time::OffsetDateTime::now_utc().date();
    let dir_or_default = |d: &Option<PathBuf>| d.clone().unwrap_or(config.policies_dir.clone());
    match cmd {
        PolicyCommand::Schema => {
            out!("{}", crate::policy::schema());
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Check { dir } => {
            let dir = dir_or_default(dir);
            match Policy::load(&dir) {
                Ok(p) => {
                    let mut warnings: Vec<String> = crate::policy::warnings(&p, today)
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    let (key_errors, key_warnings) = check_token_keys(config, &p);
                    warnings.extend(key_warnings);
                    for w in &warnings {
                        outln!("warning: {w}");
                    }
                    if !key_errors.is_empty() {
                        for e in &key_errors {
                            eprintln!("{e}");
                        }
                        eprintln!(
                            "{} problem(s); the policy was not accepted",
                            key_errors.len()
                        );
                        return Ok(ExitCode::FAILURE);
                    }
                    // The quotas name agencies and grants, so they are checked against this policy.
                    if let Err(errors) = crate::limits::LimitSet::load(&dir, &p) {
                        eprintln!("{errors}");
                        eprintln!(
                            "{} problem(s) in {}; the quotas were not accepted",
                            errors.0.len(),
                            crate::limits::LIMITS_FILE
                        );
                        return Ok(ExitCode::FAILURE);
                    }
                    outln!(
                        "{}: {} agencies, {} providers, policy version {}, {} warning(s)",
                        dir.display(),
                        p.agencies().count(),
                        p.providers().count(),
                        p.version(),
                        warnings.len()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    eprintln!("{errors}");
                    eprintln!("{} problem(s); the policy was not accepted", errors.0.len());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        PolicyCommand::Test { dir } => {
            let dir = dir_or_default(dir);
            let policy = match Policy::load(&dir) {
                Ok(p) => p,
                Err(errors) => {
                    eprintln!("{errors}");
                    eprintln!("the policy does not load; no test ran");
                    return Ok(ExitCode::FAILURE);
                }
            };
            match crate::policy::run_cases(&policy, &dir, today) {
                Ok(report) => {
                    for f in &report.failures {
                        outln!("{f}");
                    }
                    outln!("{} passed, {} failed", report.passed, report.failures.len());
                    if report.passed == 0 && report.failures.is_empty() {
                        eprintln!(
                            "no test cases under {}",
                            dir.join(crate::policy::CASES_DIR).display()
                        );
                    }
                    Ok(if report.ok() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    })
                }
                Err(errors) => {
                    eprintln!("{errors}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        PolicyCommand::Diff { old_dir, new_dir } => {
            let old = server::load_policy(old_dir)?;
            let new = server::load_policy(new_dir)?;
            let text = crate::policy::diff(&old, &new);
            if text.is_empty() {
                outln!(
                    "no change in access (policy {} -> {})",
                    old.version(),
                    new.version()
                );
            } else {
                outln!("policy {} -> {}", old.version(), new.version());
                out!("{text}");
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Explain {
            agency,
            purpose,
            method,
            path,
            provider,
            service,
            operation,
            case_ref,
        } => {
            let policy = server::load_policy(&config.policies_dir)?;
            let (provider, service) = match (path, provider, service) {
                (Some(path), _, _) => {
                    crate::policy::split_gateway_path(path).with_context(|| {
                        format!("--path {path:?} is not /v1/{{provider}}/{{service}}/…")
                    })?
                }
                (None, Some(p), Some(s)) => (p.as_str(), s.as_str()),
                _ => bail!("give --path, or --provider and --service"),
            };
            let operation = match operation.as_deref() {
                Some("read") => Operation::Read,
                Some("write") => Operation::Write,
                Some(other) => bail!("operation must be read or write, not {other:?}"),
                None => http::Method::from_bytes(method.as_bytes())
                    .ok()
                    .and_then(|m| Operation::from_method(&m))
                    .with_context(|| {
                        format!("method {method:?} is not forwarded by the gateway")
                    })?,
            };
            let req = DecisionRequest {
                agency,
                provider,
                service,
                operation,
                purpose,
                case_ref: case_ref.as_deref(),
            };
            out!("{}", policy.explain(&req, today));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Each agency's token verification key: unreadable or malformed is an error; missing is a warning
/// (none of its officers can be authenticated, so none of its grants can be used).
fn check_token_keys(config: &Config, policy: &Policy) -> (Vec<String>, Vec<String>) {
    let keys_dir = config.data_path(&config.tokens.keys_dir);
    let (mut errors, mut warnings) = (Vec::new(), Vec::new());
    if !keys_dir.is_dir() {
        warnings.push(format!(
            "{}: no token key directory (development keys are generated on first `serve`); officers' tokens cannot be checked yet",
            keys_dir.display()
        ));
        return (errors, warnings);
    }
    for agency in policy.agencies() {
        let options = crate::token::VerifyOptions::from_config(&config.tokens);
        match crate::token::KeyStore::load(&keys_dir, &[agency.id.as_str()], options) {
            Err(e) => errors.push(format!("{e}: the token key of agency {} cannot be read", agency.id)),
            Ok(keys) if !keys.has_keys(&agency.id) => warnings.push(format!(
                "{}: agency {} has no token verification key in {}: none of its officers can be authenticated, so none of its {} grant(s) can be used",
                agency.file.display(),
                agency.id,
                keys_dir.display(),
                agency.grants.len()
            )),
            Ok(_) => {}
        }
    }
    (errors, warnings)
}

async fn audit_command(config: &Config, cmd: &AuditCommand) -> anyhow::Result<ExitCode> {
    if let AuditCommand::Bench {
        records,
        concurrency,
        scratch_url,
    } = cmd
    {
        let dir = tempfile::tempdir()?;
        let url = scratch_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}/bench.db", dir.path().display()));
        let store = crate::store::Store::connect(&url).await?;
        outln!("audit writer benchmark on {url}");
        let report = crate::audit::bench::bench(&store, *records, *concurrency).await?;
        out!("{report}");
        store.close().await;
        return Ok(ExitCode::SUCCESS);
    }
    if let AuditCommand::Verify {
        file,
        checkpoints,
        pubkey,
        node,
        from,
    } = cmd
    {
        // Exit codes a script can rely on: 0 intact, 1 tampered, 2 could not check.
        let outcome = match file {
            Some(file) => verify_file(file, checkpoints.as_ref(), pubkey.as_deref()),
            None => verify_database(config, node.as_deref(), pubkey.as_deref(), *from).await,
        };
        return Ok(match outcome {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("karibche: could not verify the audit log: {err:#}");
                ExitCode::from(2)
            }
        });
    }
    let store = crate::store::Store::connect(&config.database_url()).await?;
    let code = match cmd {
        AuditCommand::Bench { .. } | AuditCommand::Verify { .. } => ExitCode::SUCCESS,
        AuditCommand::Archive { before, out } => {
            let path = config.audit_key_path();
            let key = if path.exists() {
                Some(crate::audit::AuditKey::load_or_create(&path)?)
            } else {
                None
            };
            let signer = key.as_ref().map(|k| (config.node.as_str(), k));
            let report = crate::audit::archive::archive(&store, before, out, signer).await?;
            out!("{report}");
            if report.archived.is_empty() {
                outln!("nothing archived");
            }
            ExitCode::SUCCESS
        }
        AuditCommand::Report { subject, format } => {
            // Names come from the policy in force; without it the report shows ids.
            let policy = Policy::load(&config.policies_dir).ok();
            let name_of = |kind: crate::audit::report::NameKind, id: &str| {
                let p = policy.as_ref()?;
                match kind {
                    crate::audit::report::NameKind::Agency => p.agency(id).map(|a| a.name.clone()),
                    crate::audit::report::NameKind::Purpose => {
                        p.purpose(id).map(|x| x.title.clone())
                    }
                }
            };
            let mut options = crate::audit::report::ReportOptions {
                restricted_delay: config.audit.restricted_report_delay,
                ..Default::default()
            };
            if let Some(p) = &policy {
                options.log_providers = crate::gateway::builtin::audit::log_providers(p);
            }
            let report =
                crate::audit::report::subject_report_with(&store, subject, &options, &name_of)
                    .await?;
            match format {
                ReportFormat::Text => out!("{report}"),
                ReportFormat::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
            }
            ExitCode::SUCCESS
        }
        AuditCommand::Pubkey => {
            let path = config.audit_key_path();
            if !path.exists() {
                bail!(
                    "no audit key at {} yet: start the gateway once (or set audit.key)",
                    path.display()
                );
            }
            let key = crate::audit::AuditKey::load_or_create(&path)?;
            outln!("{}", key.public_hex());
            ExitCode::SUCCESS
        }
        AuditCommand::Query { filter, format } => {
            let records = crate::audit::query(&store, &filter.to_filter()).await?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            match format {
                QueryFormat::Table => {
                    crate::audit::query::write_table(&records, &mut out)?;
                    writeln!(out, "{} record(s)", records.len())?;
                }
                QueryFormat::Jsonl => {
                    for r in &records {
                        crate::audit::query::write_json_line(&mut out, r)?;
                    }
                }
            }
            out.flush()?;
            ExitCode::SUCCESS
        }
        AuditCommand::Export {
            filter,
            output,
            checkpoints,
        } => {
            if let Some(path) = checkpoints {
                let file = crate::files::create_private(path)
                    .with_context(|| format!("cannot create {}", path.display()))?;
                let mut w = std::io::BufWriter::new(file);
                let n = crate::audit::offline::export_checkpoints(
                    &store,
                    filter.node.as_deref(),
                    &mut w,
                )
                .await?;
                eprintln!("exported {n} checkpoint(s) to {}", path.display());
            }
            let n = match output {
                Some(path) => {
                    let file = crate::files::create_private(path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    let mut w = std::io::BufWriter::new(file);
                    let n = crate::audit::export(&store, &filter.to_filter(), &mut w).await?;
                    w.flush()?;
                    n
                }
                None => {
                    let mut w = std::io::BufWriter::new(std::io::stdout().lock());
                    let n = crate::audit::export(&store, &filter.to_filter(), &mut w).await?;
                    w.flush()?;
                    n
                }
            };
            eprintln!("exported {n} record(s)");
            ExitCode::SUCCESS
        }
    };
    store.close().await;
    Ok(code)
}

/// `audit verify --file`: an export or archive, offline. `Ok(intact)`, or why it could not be checked.
fn verify_file(
    file: &std::path::Path,
    checkpoints: Option<&PathBuf>,
    pubkey: Option<&str>,
) -> anyhow::Result<bool> {
    let open = |p: &std::path::Path| {
        std::fs::File::open(p)
            .map(std::io::BufReader::new)
            .with_context(|| format!("cannot read {}", p.display()))
    };
    let cps = checkpoints.map(|p| open(p)).transpose()?;
    let report = crate::audit::offline::verify_export(open(file)?, cps, pubkey)?;
    out!("{report}");
    Ok(report.intact())
}

/// `audit verify` against the database. `Ok(intact)`, or why it could not be checked.
async fn verify_database(
    config: &Config,
    node: Option<&str>,
    pubkey: Option<&str>,
    from: Option<i64>,
) -> anyhow::Result<bool> {
    let store = crate::store::Store::connect(&config.database_url()).await?;
    let report = crate::audit::verify_from(&store, node, pubkey, from).await;
    store.close().await;
    let report = report?;
    out!("{report}");
    if report.nodes.is_empty() {
        outln!("no audit records");
    }
    Ok(report.intact())
}

/// Prints one line per certificate and CRL: days left, label, subject, file.
fn certs_status(config: &Config, warn_days: i64) -> anyhow::Result<ExitCode> {
    let now = time::OffsetDateTime::now_utc();
    let mut expired = false;
    outln!(
        "{:>9}  {:<40}  {:<44}  file",
        "days left",
        "certificate",
        "subject"
    );
    for item in crate::pki::inventory(config) {
        match item {
            Ok(e) => {
                let days = e.days_left(now);
                let mark = if days < 0.0 {
                    expired = true;
                    "  EXPIRED"
                } else if days < if e.is_crl { 1.0 } else { warn_days as f64 } {
                    "  renew soon"
                } else {
                    ""
                };
                outln!(
                    "{days:>9.1}  {:<40}  {:<44}  {}{mark}",
                    e.label,
                    e.subject,
                    e.path.display()
                );
            }
            Err(err) => {
                expired = true;
                outln!("{:>9}  {err}", "?");
            }
        }
    }
    Ok(if expired {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// What `serve` prints once everything is ready.
fn print_banner(s: &Started, data_dir: &std::path::Path) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let pki = data_dir.join("pki");
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| {
            let cwd = std::env::current_dir().ok()?;
            Some(
                p.strip_prefix(&cwd)
                    .map(|r| format!("./{}", r.display()))
                    .unwrap_or_else(|_| p.display().to_string()),
            )
        })
        .unwrap_or_else(|| "karibche".to_owned());
    let agency = if s.agencies.iter().any(|a| a == "mia-border") {
        "mia-border"
    } else {
        s.agencies.first().map(String::as_str).unwrap_or("AGENCY")
    };
    writeln!(
        out,
        "karibche is ready (policy {}, {} persons in the register)",
        s.policy_version, s.persons
    )?;
    writeln!(
        out,
        "  gateway          https://{}/v1/{{provider}}/{{service}}/…",
        s.gateway
    )?;
    if let Some(r) = s.registry {
        writeln!(
            out,
            "  register         https://{r} (only the gateway's certificate is accepted)"
        )?;
    }
    writeln!(
        out,
        "  health, metrics  http://{}/healthz  /readyz  /metrics",
        s.admin
    )?;
    writeln!(out, "  CA certificate   {}", pki.join("ca.pem").display())?;
    writeln!(
        out,
        "  agency certs     {}/<agency>.pem and .key",
        pki.join("agencies").display()
    )?;
    writeln!(out, "  database         {}", s.database_url)?;
    writeln!(out)?;
    writeln!(out, "Try it (another terminal, from this directory):")?;
    writeln!(
        out,

        "  curl --cacert {ca} --cert {dir}/{agency}.pem --key {dir}/{agency}.key \\\n    -H \"Authorization: Bearer $({exe} token issue --agency {agency} --officer officer-1 --purpose border-control)\" \\\n    https://{gw}/v1/registry/persons/{person}",
        ca = pki.join("ca.pem").display(),
        dir = pki.join("agencies").display(),
        gw = s.gateway,
        person = crate::registry::EXAMPLE_PERSON_ID,
    )?;
    out.flush()
}
