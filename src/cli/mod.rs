//! The `karibche` command line: the shared options, the list of commands and
//! the dispatch to them — one file per command beside this one.
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

pub mod audit;
pub mod bench;
pub mod certs;
pub mod consent;
pub mod console;
pub mod health;
pub mod policy;
pub mod registry;
pub mod serve;
pub mod token;
pub mod witness;

use std::path::PathBuf;
use std::process::ExitCode;

use std::io::Write as _;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::config::Config;

/// karibche — secure data-exchange gateway between state agencies.
///
/// With no options, `karibche serve` runs the whole system on development
/// defaults: PKI and keys under ./var/, SQLite at ./var/karibche.db, policies
/// from ./policies/, the gateway on 127.0.0.1:8443, the register of
/// foreigners behind it, health and metrics on 127.0.0.1:9090.
#[derive(Debug, Parser)]
#[command(name = "karibche", version = VERSION, about, long_about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Settings shared by every command.
    #[command(flatten)]
    pub common: Common,
}

/// `karibche --version`: the release, the commit and the build date (`build.rs`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("KARIBCHE_BUILD_COMMIT"),
    ", built ",
    env!("KARIBCHE_BUILD_DATE"),
    ")"
);

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
    Serve(serve::ServeArgs),
    /// Development officer tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Check and explain the policy files.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Verify, query and export the access log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Development certificates.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// The register of foreigners: serve it as its own process, seed it, measure it.
    #[command(subcommand)]
    Registry(registry::RegistryCommand),
    /// Load generator: mutual TLS, officers' tokens, HTTP/1.1 or HTTP/2, fixed rate or max throughput (BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// Data subjects' consents: record, revoke, list (each change is an audit event).
    #[command(subcommand)]
    Consent(consent::ConsentCommand),
    /// The web console: a one-time sign-in URL (development).
    #[command(subcommand)]
    Console(console::ConsoleCommand),
    /// Witness other nodes' audit logs: cosign checkpoints that extend the last one, refuse rollbacks and forks.
    #[command(subcommand)]
    Witness(witness::WitnessCommand),
    /// Ask a node's admin endpoint whether it is ready (exit 0) or not (exit 1).
    Health(health::HealthArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) for `man -l -`, or install it as karibche.1.
    Man,
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
            // The development defaults include the web console; a configuration file says for itself.
            if self.common.config.is_none() {
                config.console.enabled = true;
            }
            s.apply(&mut config);
        }
        if let Command::Registry(registry::RegistryCommand::Serve(s)) = &self.command {
            s.apply(&mut config);
        }
        config.validate()?;
        Ok(config)
    }
}

/// Sets up logging: text or JSON on standard error, level from `RUST_LOG`;
/// colours only when standard error is a terminal (never in a file or a journal).
pub fn init_logging(format: LogFormat, default_level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
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

/// The one line `karibche` prints for a failed command: each cause once,
/// even where an error's own message already includes its source's.
pub fn error_message(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
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
    // These need no configuration (a health check must not fail on one).
    match &cli.command {
        Command::Health(args) => return health::run(args).await,
        Command::Completions { shell } => return completions(*shell),
        Command::Man => return man(),
        _ => {}
    }
    let quiet = !matches!(
        cli.command,
        Command::Serve(_)
            | Command::Registry(registry::RegistryCommand::Serve(_))
            | Command::Witness(_)
    );
    init_logging(cli.common.log_format, if quiet { "warn" } else { "info" });
    let config = cli.config()?;
    match &cli.command {
        Command::Serve(_) => serve::run(config).await,
        Command::Token(cmd) => token::run(&config, cmd),
        Command::Policy(cmd) => policy::run(&config, cmd),
        Command::Bench(args) => bench::run(&config, args).await,
        Command::Audit(cmd) => audit::run(&config, cmd).await,
        Command::Certs(cmd) => certs::run(&config, cmd),
        Command::Registry(cmd) => registry::run(&config, cmd).await,
        Command::Consent(cmd) => consent::run(&config, cmd).await,
        Command::Console(cmd) => console::run(&config, cmd),
        Command::Witness(cmd) => witness::run(cmd).await,
        Command::Health(args) => health::run(args).await,
        Command::Completions { shell } => completions(*shell),
        Command::Man => man(),
    }
}

/// `karibche completions SHELL`: the completion script, generated from the command line's definition.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<ExitCode> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "karibche", &mut out);
    std::io::stdout().lock().write_all(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// `karibche man`: the manual page (roff), generated from the command line's definition.
fn man() -> anyhow::Result<ExitCode> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut out)?;
    std::io::stdout().lock().write_all(&out)?;
    Ok(ExitCode::SUCCESS)
}
