//! `karibche registry …`: serve the register as its own process, seed it with
//! synthetic persons, and measure its lookups.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::Config;

/// `karibche registry …`
#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Serve the register as its own process (gateways run `--no-registry` and name its URL in providers.toml).
    Serve(RegistryServeArgs),
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

/// `karibche registry serve` options.
#[derive(Debug, Args)]
pub struct RegistryServeArgs {
    /// The register's TLS listen address [default: 127.0.0.1:8444].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Its health and metrics listen address [default: 127.0.0.1:9091].
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Synthetic persons to seed into an empty register [default: 10000].
    #[arg(long, value_name = "N")]
    pub seed_persons: Option<usize>,
}

impl RegistryServeArgs {
    /// Lays these flags over the configuration (file and defaults).
    pub fn apply(&self, config: &mut Config) {
        if let Some(a) = self.listen {
            config.registry.listen = a;
        }
        if let Some(a) = self.admin_listen {
            config.registry.admin_listen = a;
        }
        if let Some(n) = self.seed_persons {
            config.registry.seed_persons = n;
        }
    }
}

/// Runs `karibche registry …`.
pub async fn run(config: &Config, cmd: &RegistryCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        RegistryCommand::Serve(_) => {
            use crate::runtime::registry::{serve_registry, RegistryListeners};
            let listeners = RegistryListeners::bind(config).await?;
            serve_registry(config.clone(), listeners, |r| {
                // A register whose standard output is gone keeps serving.
                let banner = writeln!(
                    std::io::stdout().lock(),
                    "karibche register is ready ({} persons)\n  register         https://{} (only the gateway's certificate is accepted)\n  health, metrics  http://{}/healthz  /readyz  /metrics",
                    r.persons, r.api, r.admin
                );
                if let Err(err) = banner {
                    tracing::debug!(%err, "banner not printed");
                }
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        RegistryCommand::Seed { persons, seed } => {
            let store =
                crate::store::Store::connect_registry(&config.registry_database_url()).await?;
            let n = crate::registry::seed(&store, *persons, *seed).await?;
            let total = crate::registry::count_persons(&store).await?;
            outln!("seeded {n} persons; the register holds {total}");
            store.close().await;
            Ok(ExitCode::SUCCESS)
        }
        RegistryCommand::Bench {
            lookups,
            concurrency,
        } => {
            let store =
                crate::store::Store::connect_registry(&config.registry_database_url()).await?;
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
    }
}
