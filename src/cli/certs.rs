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
    /// Create the development CA, gateway, register and agency certificates, token keys, the
    /// pseudonym secret and the node's audit key, where missing.
    Init {
        /// Another DNS name or IP address for the gateway's certificate (besides localhost),
        /// e.g. a compose service or Kubernetes Service name; repeatable.
        #[arg(long = "gateway-name", value_name = "NAME")]
        gateway_names: Vec<String>,
        /// Another DNS name or IP address for the register's certificate (besides localhost),
        /// the host name providers.toml reaches it by; repeatable.
        #[arg(long = "registry-name", value_name = "NAME")]
        registry_names: Vec<String>,
    },
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
        CertsCommand::Init {
            gateway_names,
            registry_names,
        } => {
            let policy = runtime::load_policy(&config.policies_dir)?;
            let names: Vec<String> = policy.agencies().map(|a| a.id.clone()).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let servers = crate::devpki::ServerNames {
                gateway: gateway_names.clone(),
                registry: registry_names.clone(),
            };
            let a = crate::devpki::ensure_dev_pki_named(&config.pki_dir(), &names, &servers)?;
            for (file, asked) in [
                ("gateway.pem", gateway_names),
                ("registry.pem", registry_names),
            ] {
                if !asked.is_empty() && !a.created.iter().any(|f| f.ends_with(file)) {
                    outln!("note: {file} existed and keeps its names; delete it to reissue it with {asked:?}");
                }
            }
            let b = crate::devpki::ensure_signing_keys(
                &config.data_path(&config.tokens.keys_dir),
                &names,
            )?;
            // Replicas must share these two: the pseudonym secret (pseudonyms and the cursors
            // sealed with it) and the audit key when `audit.key` names one file for all nodes.
            let mut shared = Vec::new();
            let pseudonym = config.data_path(&config.pseudonyms.key);
            if !pseudonym.exists() {
                crate::gateway::release::transform::Pseudonymiser::load_or_create(&pseudonym, "")
                    .with_context(|| format!("cannot create {}", pseudonym.display()))?;
                shared.push(pseudonym);
            }
            let audit_key = config.audit_key_path();
            if !audit_key.exists() {
                crate::audit::AuditKey::load_or_create(&audit_key)?;
                shared.push(audit_key);
            }
            for f in a.created.iter().chain(&b.created).chain(&shared) {
                outln!("created {}", f.display());
            }
            if a.created.is_empty() && b.created.is_empty() && shared.is_empty() {
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
