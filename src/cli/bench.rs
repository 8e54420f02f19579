//! The `karibche bench` command line: its options, and the audit check around a run.
//!
//! Paths default to the development files under the data directory
//! (`var/pki/…`, `var/keys/`), addresses to the configured listeners. With
//! `--check-audit` the command checks, node by node, that every 2xx answer
//! has its committed 2xx record (see [`crate::bench::audit`]), and fails otherwise.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::bench::{BenchOptions, Mix, Mode, Protocol, Target};
use crate::config::Config;

/// `karibche bench` options.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Where the load goes: the gateway, the register directly (with the gateway's certificate), or nginx.
    #[arg(long, value_enum, default_value_t = Target::Gateway)]
    pub target: Target,
    /// Address [default: gateway.listen, registry.listen, or 127.0.0.1:8445 for nginx].
    #[arg(long, value_name = "ADDR")]
    pub addr: Option<SocketAddr>,
    /// open (fixed rate), closed (max throughput), handshakes (a connection per request), idle (hold connections).
    #[arg(long, value_enum, default_value_t = Mode::Open)]
    pub mode: Mode,
    /// HTTP version (negotiated by ALPN).
    #[arg(long, value_enum, default_value_t = Protocol::Http1)]
    pub protocol: Protocol,
    /// Requests per second (open loop).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Measured time, e.g. 30s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Time before measuring, e.g. 2s.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Concurrent workers, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Connections: HTTP/2 workers share them; idle mode holds this many [default: concurrency; idle: 1000].
    #[arg(long)]
    pub connections: Option<usize>,
    /// Handshakes mode: resume TLS sessions instead of full handshakes.
    #[arg(long)]
    pub resume: bool,
    /// Handshakes mode: only the TLS handshake on each connection, no request.
    #[arg(long)]
    pub handshake_only: bool,
    /// Request mix: shares of reads by id, searches by document, writes (POST crossings).
    #[arg(long, default_value = "read=70,search=20,write=10")]
    pub mix: Mix,
    /// Agency whose certificate and officers' tokens are used.
    #[arg(long, default_value = "mia-border")]
    pub agency: String,
    /// Purpose in the officers' tokens.
    #[arg(long, default_value = "border-control")]
    pub purpose: String,
    /// Officers in the token pool.
    #[arg(long, default_value_t = 64)]
    pub officers: usize,
    /// Persons in the register (ids RF-0000001 …).
    #[arg(long, default_value_t = 10_000)]
    pub persons: u32,
    /// Client certificate [default: pki/agencies/AGENCY.pem; direct: pki/gateway.pem].
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Client key [default: beside the certificate].
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// CA of the server certificate [default: pki/ca.pem].
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Report this process's CPU time (and, idle mode, resident memory per connection).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Seed of the request sequence.
    #[arg(long, default_value_t = 2013)]
    pub seed: u64,
    /// Idle mode: keep the connections open this long after measuring.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
    /// Check that every 2xx answer has its 2xx audit record in the configured database, node by node.
    #[arg(long)]
    pub check_audit: bool,
}

impl BenchArgs {
    /// The run these arguments describe, with defaults from `config`.
    pub fn options(&self, config: &Config) -> BenchOptions {
        let addr = self.addr.unwrap_or(match self.target {
            Target::Gateway => config.gateway.listen,
            Target::Direct => config.registry.listen,
            Target::Nginx => SocketAddr::from(([127, 0, 0, 1], 8445)),
        });
        let pki = config.pki_dir();
        let mut o = BenchOptions::new(
            self.target,
            addr,
            &pki,
            &config.data_path(&config.tokens.keys_dir),
        );
        if self.target != Target::Direct {
            (o.cert, o.key) = crate::devpki::agency_files(&pki, &self.agency);
        }
        if let Some(c) = &self.cert {
            o.cert = c.clone();
            o.key = c.with_extension("key");
        }
        if let Some(k) = &self.key {
            o.key = k.clone();
        }
        if let Some(ca) = &self.ca {
            o.ca = ca.clone();
        }
        o.agency = self.agency.clone();
        o.purpose = self.purpose.clone();
        o.audience = config.tokens.audience.clone();
        o.officers = self.officers;
        o.protocol = self.protocol;
        o.mode = self.mode;
        o.rate = self.rate;
        o.duration = self.duration;
        o.warmup = self.warmup;
        o.concurrency = self.concurrency;
        o.connections = self.connections.unwrap_or(match self.mode {
            Mode::Idle => 1000,
            _ => self.concurrency,
        });
        o.resume = self.resume;
        o.handshake_only = self.handshake_only;
        o.mix = self.mix;
        o.persons = self.persons;
        o.pid = self.pid;
        o.seed = self.seed;
        o.hold = self.hold;
        o
    }
}

/// Runs `karibche bench`: prints the report; exit 1 when `--check-audit` finds a 2xx without its record.
pub async fn run(config: &Config, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let mut opts = args.options(config);
    opts.keep_request_ids = args.check_audit;
    let store = if args.check_audit {
        let url = config.database_url();
        Some(
            crate::store::Store::connect(&url)
                .await
                .with_context(|| format!("--check-audit: cannot open {url}"))?,
        )
    } else {
        None
    };
    let before = match &store {
        Some(s) => Some(crate::bench::audit::counts(s).await?),
        None => None,
    };
    let report = crate::bench::run(&opts)
        .await
        .with_context(|| format!("{} against {}", opts.label(), opts.addr))?;
    let mut out = std::io::stdout().lock();
    write!(out, "{report}")?;
    let mut code = ExitCode::SUCCESS;
    if let (Some(store), Some(before)) = (&store, before) {
        let answered = report.ok() + report.setup_ok;
        let check =
            crate::bench::audit::check(store, &before, &report.request_ids, answered).await?;
        write!(out, "{check}")?;
        if !check.ok() {
            code = ExitCode::FAILURE;
        }
        store.close().await;
    }
    out.flush()?;
    Ok(code)
}
