//! The tamper-evident access log: every request through the gateway, allowed
//! or denied, leaves a record committed before any response leaves — one for
//! a read or a refusal, two for a change ([`ahead`]: its attempt before the
//! change is made, its outcome after).
//!
//! Each gateway node extends its own hash chain ([`record`]), so replicas never
//! contend for one chain head. One writer task per node commits queued entries
//! in groups ([`writer`]); [`chain`] verifies the stored chains and [`query`](mod@query)
//! reads them back for auditors, data subjects and export. [`event`] records
//! what happens to the node itself; [`archive`] moves old records out while
//! keeping the chain verifiable.

pub mod ahead;
pub mod archive;
pub mod backup;
pub mod bench;
pub mod chain;
pub mod checkpoint;
pub mod event;
pub mod evidence;
pub mod merkle;
pub mod note;
pub mod offline;
pub mod open;
pub mod query;
pub mod record;
pub mod report;
pub mod sampling;
pub mod text;
pub mod tree;
pub mod writer;

#[cfg(test)]
mod tests;

use http::StatusCode;

pub use ahead::Attempt;
pub use chain::{verify, verify_from, verify_with_key, NodeReport, VerifyReport};
pub use checkpoint::{AuditKey, Checkpoint};
pub use query::{count, count_requests, export, query, Filter};
pub use record::{
    canonical_json, chain_hash, format_ts, now_ts, Decision, Entry, Operation, Record,
    GENESIS_HASH, PHASE_ATTEMPT, PHASE_OUTCOME,
};
pub use writer::{
    AuditConfig, AuditLog, AuditStats, AuditWriter, CheckpointPolicy, CommitHistograms, Committed,
    DEFAULT_RESTRICTED_REPORT_DELAY,
};

/// Why the log could not record, verify or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The writer has stopped: nothing more can be recorded (fail closed).
    #[error("the audit writer is not running")]
    Closed,
    /// The transaction holding the entry failed; nothing about it was committed.
    /// The cause is logged by the writer.
    #[error("the audit record could not be committed")]
    CommitFailed,
    /// The gateway handed over an entry the log refuses (a bug in the caller).
    #[error("invalid audit entry: {0}")]
    InvalidEntry(String),
    /// The writer's settings are unusable.
    #[error("invalid audit configuration: {0}")]
    InvalidConfig(String),
    /// A query filter is malformed.
    #[error("invalid audit filter: {0}")]
    InvalidFilter(String),
    /// A stored row cannot be read back as a record.
    #[error("audit record {node}/{seq} is unreadable: {reason}")]
    Corrupt {
        /// The record's node.
        node: String,
        /// The record's sequence number.
        seq: i64,
        /// What is wrong with it.
        reason: String,
    },
    /// The database failed.
    #[error("audit database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Serialising a record failed.
    #[error("audit record serialisation failed: {0}")]
    Json(#[from] serde_json::Error),
    /// `audit archive` refused to move records (the chain does not verify).
    #[error("refusing to archive: {0}")]
    ArchiveRefused(String),
    /// Writing an export failed.
    #[error("writing the audit export failed: {0}")]
    Io(#[from] std::io::Error),
}

impl AuditError {
    /// The HTTP status a request gets when this error stops it.
    pub fn status(&self) -> StatusCode {
        match self {
            AuditError::InvalidFilter(_) => StatusCode::BAD_REQUEST,
            AuditError::Closed | AuditError::CommitFailed | AuditError::Database(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}
