//! Events in the log: what happened to the gateway itself, beside the
//! requests it served — a node started or stopped, its TLS material (its
//! certificate, the agency CAs, the CRLs) or the agencies' token keys were
//! reloaded. Policy reloads are written by the runtime's policy reloader the
//! same way.
//!
//! An event is an ordinary record in the node's chain with `method = "EVENT"`,
//! `path` naming the event (`node-start`, `node-stop`, `tls-reload`,
//! `keys-reload`, `policy-reload`, `audit-recovered`, `audit-entry-refused`,
//! and the changes logged ahead: `consent-grant`, `consent-revoke`), `decision = "allow"`, `status = 0`, and
//! what changed in `reason`. So a court can see which CRL and which keys were
//! in force when a request was decided.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{AuditError, AuditLog, Committed, Entry};
use crate::policy::Policy;

/// `path` of the event written when a node has started its audit writer.
pub const NODE_START: &str = "node-start";
/// `path` of the event written when a node stops, after its last request.
pub const NODE_STOP: &str = "node-stop";
/// `path` of the event written when the gateway's TLS files were reloaded.
pub const TLS_RELOAD: &str = "tls-reload";
/// `path` of the event written when the agencies' token keys were reloaded.
pub const KEYS_RELOAD: &str = "keys-reload";
/// `path` of the event the writer commits when its store accepts writes again
/// after an outage: since when, and how many records were refused.
pub const AUDIT_RECOVERED: &str = "audit-recovered";
/// `path` of the event written when the store refused one entry (its request was refused).
pub const ENTRY_REFUSED: &str = "audit-entry-refused";

/// The entry of an event named `name`, with `detail` in `reason`.
pub fn event(name: &str, detail: String, policy_version: &str) -> Entry {
    Entry {
        id: uuid::Uuid::now_v7().to_string(),
        ts: super::now_ts(),
        method: "EVENT".to_owned(),
        path: name.to_owned(),
        operation: Some(super::Operation::Event(name.to_owned())),
        decision: super::Decision::Allow,
        reason: Some(detail),
        status: 0,
        policy_version: policy_version.to_owned(),
        ..Entry::default()
    }
}

/// Writes events for tasks that know neither the log nor the policy in force.
#[derive(Clone)]
pub struct EventLog {
    audit: AuditLog,
    policy: Arc<ArcSwap<Policy>>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog").finish_non_exhaustive()
    }
}

impl EventLog {
    /// Events go to `audit`, stamped with the version of the policy in `policy`.
    pub fn new(audit: AuditLog, policy: Arc<ArcSwap<Policy>>) -> EventLog {
        EventLog { audit, policy }
    }

    /// Commits an event and waits for it.
    pub async fn record(&self, name: &str, detail: String) -> Result<Committed, AuditError> {
        let version = self.policy.load().version().to_owned();
        self.audit.append(event(name, detail, &version)).await
    }

    /// [`EventLog::record`] from a blocking thread (reload tasks load files on
    /// one); a failure is logged, since the reload itself has happened.
    pub fn record_blocking(&self, name: &str, detail: String) {
        let result = match tokio::runtime::Handle::try_current() {
            Ok(handle) => handle.block_on(self.record(name, detail)),
            Err(_) => Err(AuditError::Closed),
        };
        if let Err(err) = result {
            tracing::error!(event = name, %err, "audit event not recorded");
        }
    }
}

/// `"<file> <sha256>"` of each file, `; `-separated (`unreadable` for a file that cannot be read):
/// the reason of a reload event, naming exactly what was loaded.
pub fn files_detail(what: &str, paths: &[PathBuf]) -> String {
    let files: Vec<String> = paths
        .iter()
        .map(|p| match std::fs::read(p) {
            Ok(bytes) => format!("{} {}", p.display(), crate::files::sha256_hex(&bytes)),
            Err(_) => format!("{} unreadable", p.display()),
        })
        .collect();
    format!("{what} reloaded; {}", files.join("; "))
}
