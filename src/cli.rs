//! The `karibche` command line: argument definitions and what each command does.
//!
//! This is the binary's edge, the one module that reports errors with
//! `anyhow`: every command prints a clear message and exits non-zero on
//! failure. Everything it calls is a library function the tests use too.

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
    /// Database URL: sqlite://FILE or postgres://USER@HOST/DB [default: sqlite://<data-dir>/karibche.db].
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
    },
}

/// `karibche policy …`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate the policy files; print every problem as file:line:column.
    Check,
    /// Show how a request would be decided, grant by grant.
    Explain {
        /// Agency id.
        #[arg(long)]
        agency: String,
        /// Provider id.
        #[arg(long)]
        provider: String,
        /// Service id.
        #[arg(long)]
        service: String,
        /// read or write.
        #[arg(long, default_value = "read")]
        operation: String,
        /// Purpose code.
        #[arg(long)]
        purpose: String,
        /// Case reference.
        #[arg(long = "case", value_name = "REF")]
        case_ref: Option<String>,
    },
    /// Describe the policy file format.
    Schema,
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
            decision: self.decision.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
            node: self.node.clone(),
            limit: self.limit,
        }
    }
}

/// `karibche audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute every node's hash chain; exit 1 if any is broken.
    Verify {
        /// Only this node's chain.
        #[arg(long)]
        node: Option<String>,
    },
    /// List matching records, one line each.
    Query(FilterArgs),
    /// Write matching records as JSON lines.
    Export {
        /// Filters.
        #[command(flatten)]
        filter: FilterArgs,
        /// Output file [default: standard output].
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

/// `karibche certs …`
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create the development CA, gateway, register and agency certificates and token keys that are missing.
    Init,
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

/// Runs the command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let quiet = !matches!(cli.command, Command::Serve(_));
    init_logging(cli.common.log_format, if quiet { "warn" } else { "info" });
    let config = cli.config()?;
    match &cli.command {
        Command::Serve(_) => {
            let listeners = Listeners::bind(&config).await?;
            let data_dir = config.data_dir.clone();
            server::serve(config, listeners, |s| print_banner(s, &data_dir)).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::Issue {
            agency,
            officer,
            purpose,
            case_ref,
            ttl,
        }) => {
            let keys_dir = config.data_path(&config.tokens.keys_dir);
            let token = crate::token::issue(
                &keys_dir,
                &crate::token::IssueRequest {
                    agency: agency.clone(),
                    officer: officer.clone(),
                    purpose: purpose.clone(),
                    case_ref: case_ref.clone(),
                    ttl: *ttl,
                    audience: config.tokens.audience.clone(),
                    backdate: Duration::ZERO,
                },
            )
            .with_context(|| {
                format!("no development key for agency {agency:?}; run `karibche certs init` (or `serve`) first")
            })?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(cmd) => policy_command(&config, cmd),
        Command::Audit(cmd) => audit_command(&config, cmd).await,
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
                println!("created {}", f.display());
            }
            if a.created.is_empty() && b.created.is_empty() {
                println!(
                    "all development certificates and keys exist under {}",
                    config.data_dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Registry(RegistryCommand::Seed { persons, seed }) => {
            let store = crate::store::Store::connect(&config.database_url()).await?;
            let n = crate::registry::seed(&store, *persons, *seed).await?;
            let total = crate::registry::count_persons(&store).await?;
            println!("seeded {n} persons; the register holds {total}");
            store.close().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Registry(RegistryCommand::Bench {
            lookups,
            concurrency,
        }) => {
            let store = crate::store::Store::connect(&config.database_url()).await?;
            let opts = crate::registry::BenchOptions {
                lookups: *lookups,
                concurrency: *concurrency,
                seed: 1,
            };
            let report = crate::registry::bench(&store, &opts).await?;
            store.close().await;
            println!("register: {} persons", report.persons);
            for r in &report.results {
                println!(
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
                println!("plan [{verdict}] {}: {}", p.name, p.sql);
                for line in &p.lines {
                    println!("    {line}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn policy_command(config: &Config, cmd: &PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Schema => {
            println!("{}", crate::policy::schema());
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Check => match Policy::load(&config.policies_dir) {
            Ok(p) => {
                println!(
                    "{}: {} agencies, {} providers, policy version {}",
                    config.policies_dir.display(),
                    p.agencies().count(),
                    p.providers().count(),
                    p.version()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("{} problem(s); the policy was not accepted", errors.0.len());
                Ok(ExitCode::FAILURE)
            }
        },
        PolicyCommand::Explain {
            agency,
            provider,
            service,
            operation,
            purpose,
            case_ref,
        } => {
            let policy = server::load_policy(&config.policies_dir)?;
            let operation = match operation.as_str() {
                "read" => Operation::Read,
                "write" => Operation::Write,
                other => bail!("operation must be read or write, not {other:?}"),
            };
            let req = DecisionRequest {
                agency,
                provider,
                service,
                operation,
                purpose,
                case_ref: case_ref.as_deref(),
            };
            print!(
                "{}",
                policy.explain(&req, time::OffsetDateTime::now_utc().date())
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn audit_command(config: &Config, cmd: &AuditCommand) -> anyhow::Result<ExitCode> {
    let store = crate::store::Store::connect(&config.database_url()).await?;
    let code = match cmd {
        AuditCommand::Verify { node } => {
            let report = crate::audit::verify(&store, node.as_deref()).await?;
            print!("{report}");
            if report.nodes.is_empty() {
                println!("no audit records");
            }
            if report.intact() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        AuditCommand::Query(filter) => {
            let records = crate::audit::query(&store, &filter.to_filter()).await?;
            let mut out = std::io::stdout().lock();
            for r in &records {
                let e = &r.entry;
                writeln!(
                    out,
                    "{} {}#{} {} {} officer={} purpose={} {} {} subjects={} -> {} {}{}",
                    e.ts,
                    r.node,
                    r.seq,
                    e.id,
                    e.agency.as_deref().unwrap_or("-"),
                    e.officer.as_deref().unwrap_or("-"),
                    e.purpose.as_deref().unwrap_or("-"),
                    e.method,
                    e.path,
                    e.subjects.join(","),
                    e.decision,
                    e.status,
                    e.reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                )?;
            }
            writeln!(out, "{} record(s)", records.len())?;
            ExitCode::SUCCESS
        }
        AuditCommand::Export { filter, output } => {
            let n = match output {
                Some(path) => {
                    let file = std::fs::File::create(path)
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

/// What `serve` prints once everything is ready.
fn print_banner(s: &Started, data_dir: &std::path::Path) {
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
    println!(
        "karibche is ready (policy {}, {} persons in the register)",
        s.policy_version, s.persons
    );
    println!(
        "  gateway          https://{}/v1/{{provider}}/{{service}}/…",
        s.gateway
    );
    if let Some(r) = s.registry {
        println!("  register         https://{r} (only the gateway's certificate is accepted)");
    }
    println!(
        "  health, metrics  http://{}/healthz  /readyz  /metrics",
        s.admin
    );
    println!("  CA certificate   {}", pki.join("ca.pem").display());
    println!(
        "  agency certs     {}/<agency>.pem and .key",
        pki.join("agencies").display()
    );
    println!("  database         {}", s.database_url);
    println!();
    println!("Try it (another terminal, from this directory):");
    println!(
        "  curl --cacert {ca} --cert {dir}/{agency}.pem --key {dir}/{agency}.key \\\n    -H \"Authorization: Bearer $({exe} token issue --agency {agency} --officer officer-1 --purpose border-control)\" \\\n    https://{gw}/v1/registry/persons/{person}",
        ca = pki.join("ca.pem").display(),
        dir = pki.join("agencies").display(),
        gw = s.gateway,
        person = crate::registry::EXAMPLE_PERSON_ID,
    );
}
