//! `karibche witness …`: run a witness of other nodes' audit logs
//! ([`crate::witness`]), or print its public key for their configuration.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Subcommand;

use crate::witness::{KnownLog, Witness};

/// `karibche witness …`
#[derive(Debug, Subcommand)]
pub enum WitnessCommand {
    /// Cosign the checkpoints of the logs named by --log (C2SP tlog-witness over plain HTTP).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9300")]
        listen: SocketAddr,
        /// The witness's own directory: its key (witness.key), state.json and refusals.jsonl.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The witness's key name, on every cosignature it makes.
        #[arg(long)]
        name: String,
        /// A log to witness: ORIGIN=HEX, the node's checkpoint origin and its audit public key (`audit pubkey`). Repeatable.
        #[arg(long = "log", value_name = "ORIGIN=HEX", required = true)]
        logs: Vec<String>,
    },
    /// Print the witness's public key (hex Ed25519) for the nodes' `[[audit.witnesses]]`.
    Pubkey {
        /// The witness's directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

/// Parses `ORIGIN=HEX`.
fn known_log(arg: &str) -> anyhow::Result<KnownLog> {
    let Some((origin, key)) = arg.rsplit_once('=') else {
        bail!("--log {arg}: expected ORIGIN=HEX");
    };
    let public_key = hex::decode(key).ok().filter(|k| k.len() == 32);
    let Some(public_key) = public_key else {
        bail!("--log {arg}: the key must be 64 hex digits (an Ed25519 public key)");
    };
    Ok(KnownLog {
        origin: origin.to_owned(),
        public_key,
    })
}

/// Runs `karibche witness …`.
pub async fn run(cmd: &WitnessCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        WitnessCommand::Serve {
            listen,
            dir,
            name,
            logs,
        } => {
            let logs = logs
                .iter()
                .map(|l| known_log(l))
                .collect::<anyhow::Result<_>>()?;
            let witness = Arc::new(Witness::open(dir, name, logs)?);
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("listening on {listen}"))?;
            outln!(
                "witness {} ({}) listening on {}",
                witness.name(),
                witness.public_hex(),
                listener.local_addr()?
            );
            let (stop, shutdown) = tokio::sync::watch::channel(false);
            let server = tokio::spawn(crate::witness::serve(witness, listener, shutdown));
            crate::runtime::shutdown::wait_for_signal().await;
            let _ = stop.send(true);
            let _ = server.await;
            Ok(ExitCode::SUCCESS)
        }
        WitnessCommand::Pubkey { dir } => {
            std::fs::create_dir_all(dir)?;
            let key = crate::audit::AuditKey::load_or_create(&dir.join("witness.key"))?;
            outln!("{}", key.public_hex());
            Ok(ExitCode::SUCCESS)
        }
    }
}
