//! The system's periodic chores, on one timer: the audit log's summary
//! records of rate-limited floods (written as each sampling window closes),
//! and the limiters forgetting keys that have gone idle, so their memory
//! stays bounded. At shutdown the summaries still pending are written.

use std::sync::Arc;
use std::time::Duration;

use super::shutdown::{stopped, Shutdown};
use crate::audit::{AuditLog, Entry};
use crate::limits::Limits;

/// Writes the summary records of rate-limited floods as their windows close,
/// and lets the limiters forget idle keys; at shutdown writes what is pending.
pub async fn run(limits: Arc<Limits>, audit: AuditLog, mut stop: Shutdown) {
    const TICK: Duration = Duration::from_millis(250);
    const FORGET_EVERY: u32 = 240; // ticks: once a minute
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u32;
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = tick.tick() => {}
        }
        for entry in audit.refusals().due(std::time::Instant::now()) {
            write_summary(&audit, entry).await;
        }
        ticks = (ticks + 1) % FORGET_EVERY;
        if ticks == 0 {
            limits.forget_idle();
        }
    }
    for entry in audit.refusals().drain() {
        write_summary(&audit, entry).await;
    }
}

/// Appends one summary record; a failure is logged (the flood was already answered).
async fn write_summary(audit: &AuditLog, entry: Entry) {
    let (id, path) = (entry.id.clone(), entry.path.clone());
    if let Err(err) = audit.append(entry).await {
        tracing::error!(%id, %path, %err, "summary of rate-limited requests not recorded");
    }
}
