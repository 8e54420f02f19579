//! `karibche policy …`: check, test, explain, diff and describe the policy
//! files — the same loading and deciding the gateway does, without a gateway.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Subcommand;

use crate::config::Config;
use crate::policy::{DecisionRequest, Operation, Policy};
use crate::runtime;

/// `karibche policy …`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate the policy files: every problem as file:line:column (exit 1), then warnings (exit 0).
    Check {
        /// Policy directory [default: the configured policies directory].
        dir: Option<PathBuf>,
    },
    /// Show how a request would be decided: the decision, the grant (file:line), the fields released, the limits.
    ///
    /// Name the request as the gateway sees it (`--method GET --path /v1/registry/persons/123`)
    /// or by its parts (`--provider registry --service persons --operation read`).
    Explain {
        /// Agency id.
        #[arg(long)]
        agency: String,
        /// Purpose code.
        #[arg(long)]
        purpose: String,
        /// HTTP method of the request.
        #[arg(long, default_value = "GET", conflicts_with = "operation")]
        method: String,
        /// Gateway path, /v1/{provider}/{service}/….
        #[arg(long, required_unless_present_all = ["provider", "service"], conflicts_with_all = ["provider", "service"])]
        path: Option<String>,
        /// Provider id (instead of --path).
        #[arg(long, requires = "service")]
        provider: Option<String>,
        /// Service id (instead of --path).
        #[arg(long, requires = "provider")]
        service: Option<String>,
        /// read or write (instead of --method).
        #[arg(long)]
        operation: Option<String>,
        /// Case reference.
        #[arg(long = "case", value_name = "REF")]
        case_ref: Option<String>,
    },
    /// Run the policy test cases (DIR/tests/*.toml); exit 1 if any fails.
    Test {
        /// Policy directory [default: the configured policies directory].
        dir: Option<PathBuf>,
    },
    /// Print the JSON Schema (draft 2020-12) of the policy files (also policies/schema.json).
    Schema,
    /// What access each agency gains or loses from OLD_DIR to NEW_DIR.
    Diff {
        /// The policy directory before the change.
        old_dir: PathBuf,
        /// The policy directory after the change.
        new_dir: PathBuf,
    },
}

/// Runs `karibche policy …`.
pub fn run(config: &Config, cmd: &PolicyCommand) -> anyhow::Result<ExitCode> {
    let today = time::OffsetDateTime::now_utc().date();
    let dir_or_default = |d: &Option<PathBuf>| d.clone().unwrap_or(config.policies_dir.clone());
    match cmd {
        PolicyCommand::Schema => {
            out!("{}", crate::policy::schema());
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Check { dir } => {
            let dir = dir_or_default(dir);
            match Policy::load(&dir) {
                Ok(p) => {
                    let mut warnings: Vec<String> = crate::policy::warnings(&p, today)
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    let (key_errors, key_warnings) = check_token_keys(config, &p);
                    warnings.extend(key_warnings);
                    for w in &warnings {
                        outln!("warning: {w}");
                    }
                    if !key_errors.is_empty() {
                        for e in &key_errors {
                            eprintln!("{e}");
                        }
                        eprintln!(
                            "{} problem(s); the policy was not accepted",
                            key_errors.len()
                        );
                        return Ok(ExitCode::FAILURE);
                    }
                    // The quotas name agencies and grants, so they are checked against this policy.
                    if let Err(errors) = crate::limits::LimitSet::load(&dir, &p) {
                        eprintln!("{errors}");
                        eprintln!(
                            "{} problem(s) in {}; the quotas were not accepted",
                            errors.0.len(),
                            crate::limits::LIMITS_FILE
                        );
                        return Ok(ExitCode::FAILURE);
                    }
                    outln!(
                        "{}: {} agencies, {} providers, policy version {}, {} warning(s)",
                        dir.display(),
                        p.agencies().count(),
                        p.providers().count(),
                        p.version(),
                        warnings.len()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    eprintln!("{errors}");
                    eprintln!("{} problem(s); the policy was not accepted", errors.0.len());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        PolicyCommand::Test { dir } => {
            let dir = dir_or_default(dir);
            let policy = match Policy::load(&dir) {
                Ok(p) => p,
                Err(errors) => {
                    eprintln!("{errors}");
                    eprintln!("the policy does not load; no test ran");
                    return Ok(ExitCode::FAILURE);
                }
            };
            match crate::policy::run_cases(&policy, &dir, today) {
                Ok(report) => {
                    for f in &report.failures {
                        outln!("{f}");
                    }
                    outln!("{} passed, {} failed", report.passed, report.failures.len());
                    if report.passed == 0 && report.failures.is_empty() {
                        eprintln!(
                            "no test cases under {}",
                            dir.join(crate::policy::CASES_DIR).display()
                        );
                    }
                    Ok(if report.ok() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    })
                }
                Err(errors) => {
                    eprintln!("{errors}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        PolicyCommand::Diff { old_dir, new_dir } => {
            let old = runtime::load_policy(old_dir)?;
            let new = runtime::load_policy(new_dir)?;
            let text = crate::policy::diff(&old, &new);
            if text.is_empty() {
                outln!(
                    "no change in access (policy {} -> {})",
                    old.version(),
                    new.version()
                );
            } else {
                outln!("policy {} -> {}", old.version(), new.version());
                out!("{text}");
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Explain {
            agency,
            purpose,
            method,
            path,
            provider,
            service,
            operation,
            case_ref,
        } => {
            let policy = runtime::load_policy(&config.policies_dir)?;
            let (provider, service) = match (path, provider, service) {
                (Some(path), _, _) => {
                    crate::policy::split_gateway_path(path).with_context(|| {
                        format!("--path {path:?} is not /v1/{{provider}}/{{service}}/…")
                    })?
                }
                (None, Some(p), Some(s)) => (p.as_str(), s.as_str()),
                _ => bail!("give --path, or --provider and --service"),
            };
            let operation = match operation.as_deref() {
                Some("read") => Operation::Read,
                Some("write") => Operation::Write,
                Some(other) => bail!("operation must be read or write, not {other:?}"),
                None => http::Method::from_bytes(method.as_bytes())
                    .ok()
                    .and_then(|m| Operation::from_method(&m))
                    .with_context(|| {
                        format!("method {method:?} is not forwarded by the gateway")
                    })?,
            };
            let req = DecisionRequest {
                agency,
                provider,
                service,
                operation,
                purpose,
                case_ref: case_ref.as_deref(),
            };
            out!("{}", policy.explain(&req, today));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Each agency's token verification key: unreadable or malformed is an error; missing is a warning
/// (none of its officers can be authenticated, so none of its grants can be used).
fn check_token_keys(config: &Config, policy: &Policy) -> (Vec<String>, Vec<String>) {
    let keys_dir = config.data_path(&config.tokens.keys_dir);
    let (mut errors, mut warnings) = (Vec::new(), Vec::new());
    if !keys_dir.is_dir() {
        warnings.push(format!(
            "{}: no token key directory (development keys are generated on first `serve`); officers' tokens cannot be checked yet",
            keys_dir.display()
        ));
        return (errors, warnings);
    }
    for agency in policy.agencies() {
        let options = crate::identity::token::VerifyOptions::from_config(&config.tokens);
        match crate::identity::token::KeyStore::load(&keys_dir, &[agency.id.as_str()], options) {
            Err(e) => errors.push(format!("{e}: the token key of agency {} cannot be read", agency.id)),
            Ok(keys) if !keys.has_keys(&agency.id) => warnings.push(format!(
                "{}: agency {} has no token verification key in {}: none of its officers can be authenticated, so none of its {} grant(s) can be used",
                agency.file.display(),
                agency.id,
                keys_dir.display(),
                agency.grants.len()
            )),
            Ok(_) => {}
        }
    }
    (errors, warnings)
}
