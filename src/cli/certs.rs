//! `karibche certs …`: create, revoke and watch the development certificates
//! and keys the gateway uses.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use crate::config::Config;
use crate::runtime;

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

/// Runs `karibche certs …`.
pub fn run(config: &Config, cmd: &CertsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CertsCommand::Revoke { agency } => {
            let r = crate::devpki::crl::revoke_dev_agency(&config.pki_dir(), agency).with_context(
                || format!("cannot revoke the development certificate of {agency:?}"),
            )?;
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
        CertsCommand::Status { warn_days } => status(config, *warn_days),
        CertsCommand::Init => {
            let policy = runtime::load_policy(&config.policies_dir)?;
            let names: Vec<String> = policy.agencies().map(|a| a.id.clone()).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let a = crate::devpki::ensure_dev_pki(&config.pki_dir(), &names)?;
            let b = crate::devpki::ensure_signing_keys(
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
    }
}

/// Prints one line per certificate and CRL: days left, label, subject, file.
fn status(config: &Config, warn_days: i64) -> anyhow::Result<ExitCode> {
    let now = time::OffsetDateTime::now_utc();
    let mut expired = false;
    outln!(
        "{:>9}  {:<40}  {:<44}  file",
        "days left",
        "certificate",
        "subject"
    );
    for item in crate::identity::inventory::inventory(config) {
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
