//! Opening a node's chain for writing — the one way every process does it.
//!
//! The gateway (`serve`) and the command line (`consent grant`/`revoke`,
//! which write on their own `<node>-cli` chain) both go through [`open`], so
//! a chain is always written through the store fenced by its node's lock and
//! its checkpoints are always signed the same way. The caller takes the lock
//! first (one live process per node name) and chooses only what differs
//! between a long-running node and a one-shot command: whether a missing key
//! is created, and how often checkpoints are signed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::checkpoint::{AuditKey, AuditKeyError};
use super::{AuditConfig, AuditError, AuditLog, AuditWriter, CheckpointPolicy};
use crate::store::{NodeLock, Store};

/// What a missing audit key means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingKey {
    /// Create it: a gateway node always signs its checkpoints.
    Create,
    /// Sign no checkpoints: a command must not invent the node's key.
    NoCheckpoints,
}

/// Which key signs the chain's checkpoints, and how often.
#[derive(Debug, Clone)]
pub struct Signing {
    /// The node's Ed25519 audit key file.
    pub key_path: PathBuf,
    /// What happens when the file does not exist.
    pub missing: MissingKey,
    /// A checkpoint after at most this many records.
    pub every: u64,
    /// …or with the first batch after this long, and at shutdown.
    pub interval: Duration,
}

/// Why a chain could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The audit key could not be read or created.
    #[error(transparent)]
    Key(#[from] AuditKeyError),
    /// The writer could not start.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// Loading the key on a blocking thread failed.
    #[error("loading the audit key failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Starts the writer of `config.node`'s chain on `store` fenced by `lock`, signing as `signing` says.
pub async fn open(
    store: &Store,
    lock: &NodeLock,
    mut config: AuditConfig,
    signing: Signing,
) -> Result<(AuditLog, AuditWriter), OpenError> {
    let key = match signing.missing {
        MissingKey::NoCheckpoints if !signing.key_path.exists() => None,
        _ => {
            let path = signing.key_path.clone();
            Some(tokio::task::spawn_blocking(move || AuditKey::load_or_create(&path)).await??)
        }
    };
    config.checkpoints = key.map(|key| CheckpointPolicy {
        key: Arc::new(key),
        every: signing.every,
        interval: signing.interval,
    });
    Ok(AuditLog::start(store.guarded_by(lock), config).await?)
}
