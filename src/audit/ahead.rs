//! Changes logged ahead: a write to a provider, a consent granted or revoked,
//! any administrative change first commits the record of its **attempt**
//! (who, what, which fields, the request body's digest), and only then is
//! made; the record of its **outcome** (status, response digest) follows,
//! linked to the attempt by `attempt_id`.
//!
//! An [`Attempt`] exists only once its record is committed, and code that
//! changes something takes one as proof (see `crate::consent`), so no change
//! can be made without the log knowing of it. A crash between the change and
//! its outcome leaves an attempt whose outcome is unknown — `audit query`,
//! `audit verify` and the subject report show it — never a change nobody
//! recorded.
//!
//! Ids: the attempt carries the request's id (what `X-Request-Id` and the
//! problem's `request_id` say, and what providers receive); the outcome gets
//! an id of its own and names the attempt in `attempt_id`.

use super::record::{PHASE_ATTEMPT, PHASE_OUTCOME};
use super::{AuditError, AuditLog, Committed, Entry};

/// A change's committed attempt record: the change may now be made, and its
/// outcome recorded with [`Attempt::outcome`].
#[derive(Debug)]
#[must_use = "a change's outcome must be recorded with Attempt::outcome"]
pub struct Attempt {
    log: AuditLog,
    id: String,
    committed: Committed,
}

impl AuditLog {
    /// Commits `entry` as the attempt of a change (`phase = "attempt"`) and
    /// waits for it; only the returned [`Attempt`] lets the change go ahead.
    pub async fn attempt(&self, mut entry: Entry) -> Result<Attempt, AuditError> {
        entry.phase = Some(PHASE_ATTEMPT.to_owned());
        entry.attempt_id = None;
        let id = entry.id.clone();
        let committed = self.append(entry).await?;
        Ok(Attempt {
            log: self.clone(),
            id,
            committed,
        })
    }
}

impl Attempt {
    /// The attempt record's id (the request id).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where the attempt record sits in the node's chain.
    pub fn committed(&self) -> &Committed {
        &self.committed
    }

    /// Commits the outcome: `entry` gets an id of its own, the time it was
    /// known, `phase = "outcome"` and `attempt_id` = this attempt's id.
    pub async fn outcome(self, mut entry: Entry) -> Result<Committed, AuditError> {
        entry.id = uuid::Uuid::now_v7().to_string();
        entry.ts = super::now_ts();
        entry.phase = Some(PHASE_OUTCOME.to_owned());
        entry.attempt_id = Some(self.id);
        self.log.append(entry).await
    }
}
