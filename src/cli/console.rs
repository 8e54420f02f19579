//! `karibche console login`: a one-time sign-in URL for the web console
//! (development): a fresh officer token signed with the agency's
//! development key, carried in the URL's fragment — which browsers never
//! send to a server, so it reaches no access log — and posted by the
//! sign-in page's script. The console accepts each token once.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;

use crate::config::Config;
use crate::runtime;

/// `karibche console …`
#[derive(Debug, Subcommand)]
pub enum ConsoleCommand {
    /// Print a one-time sign-in URL for the console (development keys).
    Login {
        /// Agency id (`iss`), e.g. pdps.
        #[arg(long)]
        agency: String,
        /// Officer id (`sub`).
        #[arg(long)]
        officer: String,
        /// Purpose code, e.g. supervision or internal-audit.
        #[arg(long)]
        purpose: String,
        /// Case reference.
        #[arg(long = "case", value_name = "REF")]
        case_ref: Option<String>,
        /// Lifetime of the token, and so the longest the session can last.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The console's address [default: console.listen].
        #[arg(long, value_name = "HOST:PORT")]
        address: Option<String>,
    },
}

/// Runs `karibche console …`.
pub fn run(config: &Config, cmd: &ConsoleCommand) -> anyhow::Result<ExitCode> {
    let ConsoleCommand::Login {
        agency,
        officer,
        purpose,
        case_ref,
        ttl,
        address,
    } = cmd;
    let request = crate::devpki::token::IssueRequest {
        agency: agency.clone(),
        officer: officer.clone(),
        purpose: purpose.clone(),
        case_ref: case_ref.clone(),
        ttl: *ttl,
        audience: config.tokens.audience.clone(),
        backdate: Duration::ZERO,
    };
    let policy = runtime::load_policy(&config.policies_dir)
        .context("console login checks the token against the policy in force (--policies DIR)")?;
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
    let keys_dir = config.data_path(&config.tokens.keys_dir);
    let token = crate::devpki::token::issue(&keys_dir, &request).with_context(|| {
        format!("no development key for agency {agency:?}; run `karibche serve` (or `certs init`) first")
    })?;
    let address = address
        .clone()
        .unwrap_or_else(|| config.console.listen.to_string());
    outln!("https://{address}/signin#token={token}");
    Ok(ExitCode::SUCCESS)
}
