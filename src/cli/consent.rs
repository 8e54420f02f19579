//! `karibche consent …`: record, revoke and list data subjects' consents; each
//! change is an audit event, as it is through the gateway's consent API.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;

use crate::config::Config;
use crate::runtime;

/// `karibche consent …`
#[derive(Debug, Subcommand)]
pub enum ConsentCommand {
    /// Record a consent the agency collected; prints its id.
    Grant {
        /// The person's register id.
        #[arg(long)]
        subject: String,
        /// The agency the consent is given to.
        #[arg(long)]
        agency: String,
        /// The purpose consented to (policies/purposes.toml).
        #[arg(long)]
        purpose: String,
        /// Last day the consent holds, YYYY-MM-DD (UTC, inclusive) [default: until revoked].
        #[arg(long, value_name = "DATE")]
        until: Option<String>,
        /// Reference to the evidence, e.g. the signed form's number.
        #[arg(long, value_name = "REF")]
        evidence: Option<String>,
        /// When the person gave it, YYYY-MM-DD or RFC 3339 [default: now].
        #[arg(long, value_name = "DATE")]
        given: Option<String>,
        /// Only this provider/service (repeatable) [default: every service].
        #[arg(long, value_name = "PROVIDER/SERVICE")]
        scope: Vec<String>,
    },
    /// Revoke a consent; requests relying on it are refused from the next one on.
    Revoke {
        /// The consent id (as printed by `consent grant`).
        id: String,
    },
    /// List consents, one line each.
    List {
        /// Only this person's.
        #[arg(long)]
        subject: Option<String>,
    },
}

/// `karibche consent …`: changes are audited on this host's own chain, `<node>-cli`,
/// so they never contend with a running gateway's chain head.
pub async fn run(config: &Config, cmd: &ConsentCommand) -> anyhow::Result<ExitCode> {
    use crate::consent::{parse_day, parse_instant, Actor, ConsentStore, Consents, NewConsent};
    let store = crate::store::Store::connect(&config.database_url()).await?;
    if let ConsentCommand::List { subject } = cmd {
        let consents = ConsentStore::new(store.clone())
            .list(subject.as_deref())
            .await?;
        for c in &consents {
            let state = match &c.revoked_at {
                Some(at) => format!("revoked {at}"),
                None => match &c.valid_until {
                    Some(u) => format!("valid until {u}"),
                    None => "valid until revoked".to_owned(),
                },
            };
            outln!(
                "{} subject={} agency={} purpose={} scope={} given={} evidence={} {state}",
                c.id,
                c.subject,
                c.agency,
                c.purpose,
                if c.scope.is_empty() {
                    "*".to_owned()
                } else {
                    c.scope.join(",")
                },
                c.given_at,
                c.evidence_ref.as_deref().unwrap_or("-"),
            );
        }
        outln!("{} consent(s)", consents.len());
        store.close().await;
        return Ok(ExitCode::SUCCESS);
    }
    let policy = runtime::load_policy(&config.policies_dir)?;
    let node = format!("{}-cli", config.node);
    // Like a gateway node, this chain is written by one process at a time.
    let node_lock = store.lock_node(&node).await?;
    // Every change signed at once, with the node's key if it has one (a command never creates it).
    let signing = crate::audit::open::Signing {
        key_path: config.audit_key_path(),
        missing: crate::audit::open::MissingKey::NoCheckpoints,
        every: 1,
        interval: Duration::from_secs(60),
    };
    let (audit, writer) = crate::audit::open::open(
        &store,
        &node_lock,
        crate::audit::AuditConfig::new(node),
        signing,
    )
    .await?;
    let consents = Consents::new(store.clone(), audit.clone());
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_owned());
    let actor = Actor {
        officer: format!("admin:{user}"),
        policy_version: policy.version().to_owned(),
        ..Actor::default()
    };
    let outcome = match cmd {
        ConsentCommand::Grant {
            subject,
            agency,
            purpose,
            until,
            evidence,
            given,
            scope,
        } => {
            if policy.agency(agency).is_none() {
                bail!("no agency {agency:?} in {}", config.policies_dir.display());
            }
            if policy.purpose(purpose).is_none() {
                bail!("no purpose {purpose:?} in the purpose vocabulary");
            }
            let valid_until = until
                .as_deref()
                .map(|u| parse_day(u).with_context(|| format!("--until {u:?} is not YYYY-MM-DD")))
                .transpose()?;
            let given_at = given
                .as_deref()
                .map(|g| {
                    parse_instant(g)
                        .with_context(|| format!("--given {g:?} is not YYYY-MM-DD or RFC 3339"))
                })
                .transpose()?;
            let new = NewConsent {
                subject: subject.clone(),
                agency: agency.clone(),
                purpose: purpose.clone(),
                scope: scope.clone(),
                given_at,
                valid_until,
                evidence_ref: evidence.clone(),
            };
            consents.grant(new, &actor).await.map(|c| c.id)
        }
        ConsentCommand::Revoke { id } => consents.revoke(id, None, &actor).await.map(|c| {
            format!(
                "revoked {} (subject {}, agency {}, purpose {})",
                c.id, c.subject, c.agency, c.purpose
            )
        }),
        ConsentCommand::List { .. } => Ok(String::new()),
    };
    audit.close();
    drop(consents);
    drop(audit);
    writer.finish().await;
    node_lock.release().await;
    store.close().await;
    let said = outcome?;
    if !said.is_empty() {
        outln!("{said}");
    }
    Ok(ExitCode::SUCCESS)
}
