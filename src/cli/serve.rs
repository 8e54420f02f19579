//! `karibche serve`: run the gateway, the built-in register and the admin endpoint
//! until a signal, and tell the operator where everything is.
//!
//! The work is the library's [`crate::runtime::serve`]; this file only maps the
//! flags onto the configuration and prints the banner once everything is ready.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Args;

use crate::config::Config;
use crate::runtime::{self, Listeners, Started};

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
    /// Web console listen address; turns the console on [default: 127.0.0.1:8445, on without --config;
    /// an ephemeral port when --listen names one].
    #[arg(long, value_name = "ADDR")]
    pub console_listen: Option<SocketAddr>,
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

impl ServeArgs {
    /// Lays these flags over the configuration (file and defaults).
    pub fn apply(&self, config: &mut Config) {
        if let Some(a) = self.listen {
            config.gateway.listen = a;
            // A gateway on an ephemeral port (tests, several instances) gets an ephemeral console too.
            if a.port() == 0 {
                config.console.listen = SocketAddr::new(a.ip(), 0);
            }
        }
        if let Some(a) = self.console_listen {
            config.console.listen = a;
            config.console.enabled = true;
        }
        if let Some(a) = self.admin_listen {
            config.admin.listen = a;
        }
        if let Some(a) = self.registry_listen {
            config.registry.listen = a;
        }
        if self.no_registry {
            config.registry.enabled = false;
        }
        if let Some(n) = self.seed_persons {
            config.registry.seed_persons = n;
        }
        if let Some(n) = &self.node {
            config.node = n.clone();
        }
    }
}

/// Runs `karibche serve` until a shutdown signal.
pub async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let listeners = Listeners::bind(&config).await?;
    let data_dir = config.data_dir.clone();
    runtime::serve(config, listeners, |s| {
        // A server whose standard output is gone keeps serving; its logs go to standard error.
        if let Err(err) = print_banner(s, &data_dir) {
            tracing::debug!(%err, "banner not printed");
        }
    })
    .await?;
    Ok(ExitCode::SUCCESS)
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
    if let Some(c) = s.console {
        writeln!(
            out,
            "  console          https://{c}/  (sign in: {exe} console login --agency pdps --officer officer-1 --purpose supervision)"
        )?;
    }
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
