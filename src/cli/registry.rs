//! `karibche registry …`: seed the built-in register with synthetic persons,
//! and measure its lookups.

use std::io::Write;
use std::process::ExitCode;

use clap::Subcommand;

use crate::config::Config;

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

/// Runs `karibche registry …`.
pub async fn run(config: &Config, cmd: &RegistryCommand) -> anyhow::Result<ExitCode> {
    match cmd {
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
