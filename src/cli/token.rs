//! `karibche token issue`: a development officer token, refused here if the
//! gateway would refuse it (unknown purpose, too long a lifetime), with every
//! reason at once.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;

use crate::config::Config;
use crate::runtime;

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

/// Runs `karibche token …`.
pub fn run(config: &Config, cmd: &TokenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::Issue {
            agency,
            officer,
            purpose,
            case_ref,
            ttl,
            bind_cert,
        } => {
            let keys_dir = config.data_path(&config.tokens.keys_dir);
            let request = crate::devpki::token::IssueRequest {
                agency: agency.clone(),
                officer: officer.clone(),
                purpose: purpose.clone(),
                case_ref: case_ref.clone(),
                ttl: *ttl,
                audience: config.tokens.audience.clone(),
                backdate: Duration::ZERO,
            };
            // A token the gateway would refuse is refused here, with every reason at once.
            let policy = runtime::load_policy(&config.policies_dir).context(
                "token issue checks the token against the policy in force (--policies DIR)",
            )?;
            if let Err(problems) =
                crate::devpki::token::check_issue(&request, &policy, config.tokens.max_lifetime)
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
                    let der = crate::files::load_certs(cert)?;
                    let sha256 = crate::files::fingerprint(&der[0]);
                    crate::devpki::token::issue_bound(&keys_dir, &request, &sha256)
                }
                None => crate::devpki::token::issue(&keys_dir, &request),
            }
            .with_context(|| {
                format!("no development key for agency {agency:?}; run `karibche certs init` (or `serve`) first")
            })?;
            outln!("{token}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
