//! Policy hot reload: the running gateway picks up edited policy files
//! without a restart, on a file-system change under the policy directory or
//! on SIGHUP.
//!
//! A reload builds the new [`Policy`] completely (every file parsed and
//! validated, as `karibche policy check` does), records the reload in the
//! audit log, and only then swaps the `Arc` the gateway reads: a request
//! loads the policy once when it starts (`Gateway::handle`),
//! so requests in flight finish under the set they started with and no
//! request ever sees a half-loaded one. A broken set is refused: its problems
//! are logged with the same `file:line:col: message` lines as `policy check`,
//! counted (`karibche_policy_reload_failures_total`), and the old set stays.
//!
//! Each successful reload is an audit event: method `EVENT`, path
//! `policy-reload`, decision `allow`, status 0, `policy_version` the new
//! version, and `reason` naming the old and new versions, the trigger, and
//! each changed policy file with its SHA-256 before and after.
//!
//! The reloader also keeps the last [`HISTORY`] sets this node loaded (the
//! one it started with included), with their quotas, in a [`PolicyHistory`]:
//! the administrators' console compares any two of them in words
//! ([`crate::policy::diff`]). Only sets loaded by this process are there; an
//! older version, or one another replica loaded, is known by its audit event
//! alone.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, Mutex};

use crate::audit::{AuditError, AuditLog, Entry};
use crate::metrics::Metrics;
use crate::policy::{Policy, PolicyErrors};
use crate::runtime::shutdown::Shutdown;

/// How long the directory must stay quiet after a change before reloading:
/// editors and deploy tools write a file in several steps.
const QUIET: Duration = Duration::from_millis(200);

/// What asked for a reload; named in the audit event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// A change under the policy directory.
    FileWatch,
    /// A direct call (`Running::reload_policy`, tests, tools).
    Api,
}

impl Trigger {
    /// `"sighup"`, `"file-watch"` or `"api"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::FileWatch => "file-watch",
            Trigger::Api => "api",
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new set is in force.
    Reloaded {
        /// The version before.
        old: String,
        /// The version now in force.
        new: String,
    },
    /// The files are unchanged; nothing was swapped or recorded.
    Unchanged {
        /// The version in force.
        version: String,
    },
}

/// Why a reload was refused; the old policy stays in force in every case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The new set has problems, listed as `policy check` lists them.
    #[error("the policy files in {dir} are not valid; the old policy stays in force:\n{errors}")]
    Invalid {
        /// The policy directory.
        dir: String,
        /// Every problem found.
        errors: PolicyErrors,
    },
    /// The quotas in `limits.toml` do not fit the new policy (or are malformed).
    #[error("the quotas in {dir}/limits.toml are not valid; the old policy and quotas stay in force:\n{errors}")]
    Limits {
        /// The policy directory.
        dir: String,
        /// Every problem found.
        errors: crate::limits::LimitErrors,
    },
    /// The reload could not be recorded, so it was not carried out.
    #[error("the policy reload could not be recorded in the audit log; the old policy stays in force: {0}")]
    Audit(#[from] AuditError),
    /// The loading task failed.
    #[error("policy loading task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// How many loaded policy sets a node keeps for comparison (a set is its parsed files, some hundred KiB).
pub const HISTORY: usize = 20;

/// A policy set this node loaded, with the quotas loaded beside it.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The set.
    pub policy: Arc<Policy>,
    /// Its quotas (`limits.toml`), as applied with it or since.
    pub quotas: Arc<crate::limits::LimitSet>,
    /// When it was swapped in (RFC 3339, UTC).
    pub at: String,
    /// `start`, or the reload's trigger.
    pub trigger: &'static str,
}

/// The policy sets this node has loaded, oldest first, at most [`HISTORY`]:
/// the last one is the set in force.
#[derive(Debug)]
pub struct PolicyHistory {
    sets: std::sync::Mutex<VecDeque<Loaded>>,
}

impl PolicyHistory {
    /// A history that starts with the set the node started with.
    pub fn new(policy: Arc<Policy>, quotas: crate::limits::LimitSet) -> PolicyHistory {
        let first = Loaded {
            policy,
            quotas: Arc::new(quotas),
            at: crate::audit::now_ts(),
            trigger: "start",
        };
        PolicyHistory {
            sets: std::sync::Mutex::new(VecDeque::from([first])),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Loaded>> {
        // Only whole entries are ever pushed or replaced: a poisoned lock holds a valid list.
        self.sets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every set held, oldest first.
    pub fn sets(&self) -> Vec<Loaded> {
        self.lock().iter().cloned().collect()
    }

    /// The held set of this version, if any.
    pub fn get(&self, version: &str) -> Option<Loaded> {
        self.lock()
            .iter()
            .rev()
            .find(|l| l.policy.version() == version)
            .cloned()
    }

    /// The set in force and its quotas.
    pub fn current(&self) -> Option<Loaded> {
        self.lock().back().cloned()
    }

    fn push(&self, policy: Arc<Policy>, quotas: crate::limits::LimitSet, trigger: Trigger) {
        let mut sets = self.lock();
        sets.push_back(Loaded {
            policy,
            quotas: Arc::new(quotas),
            at: crate::audit::now_ts(),
            trigger: trigger.as_str(),
        });
        while sets.len() > HISTORY {
            sets.pop_front();
        }
    }

    /// The quotas now applied with the set in force (`limits.toml` changed alone).
    fn requota(&self, quotas: crate::limits::LimitSet) {
        if let Some(last) = self.lock().back_mut() {
            last.quotas = Arc::new(quotas);
        }
    }
}

/// Reloads the policy of one running gateway; reloads are serialised.
pub struct Reloader {
    dir: PathBuf,
    policy: Arc<ArcSwap<Policy>>,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    /// The running quotas, rebuilt from `limits.toml` with every reload (unchanged keys keep their state).
    limits: Option<Arc<crate::limits::Limits>>,
    /// The sets loaded so far, for the console's comparison; `None`: not kept.
    history: Option<Arc<PolicyHistory>>,
    /// One reload at a time, so two triggers cannot race between compare and swap.
    lock: Mutex<()>,
}

impl Reloader {
    /// A reloader for the policy in `policy`, read from `dir`, recording to `audit`.
    pub fn new(
        dir: PathBuf,
        policy: Arc<ArcSwap<Policy>>,
        audit: AuditLog,
        metrics: Arc<Metrics>,
    ) -> Reloader {
        Reloader {
            dir,
            policy,
            audit,
            metrics,
            limits: None,
            history: None,
            lock: Mutex::new(()),
        }
    }

    /// Also rebuilds these quotas from `limits.toml` on every reload.
    pub fn with_limits(mut self, limits: Arc<crate::limits::Limits>) -> Reloader {
        self.limits = Some(limits);
        self
    }

    /// Also keeps every set it swaps in (and the quotas applied) in `history`.
    pub fn with_history(mut self, history: Arc<PolicyHistory>) -> Reloader {
        self.history = Some(history);
        self
    }

    /// The policy directory watched.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Loads and validates the directory; if it is valid and changed, records the reload and swaps it in.
    pub async fn reload(&self, trigger: Trigger) -> Result<ReloadOutcome, ReloadError> {
        let _one_at_a_time = self.lock.lock().await;
        let dir = self.dir.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            Policy::load(&dir).map(|p| {
                let quotas = crate::limits::LimitSet::load(&dir, &p);
                (p, quotas)
            })
        })
        .await?;
        let (new, quotas) = match loaded {
            Ok(p) => p,
            Err(errors) => {
                self.metrics.policy_reload_failed();
                for e in &errors.0 {
                    tracing::error!(trigger = trigger.as_str(), "{e}");
                }
                tracing::error!(
                    trigger = trigger.as_str(),
                    problems = errors.0.len(),
                    "policy reload refused; the old policy stays in force"
                );
                return Err(ReloadError::Invalid {
                    dir: self.dir.display().to_string(),
                    errors,
                });
            }
        };
        let quotas = match quotas {
            Ok(q) => q,
            Err(errors) => {
                self.metrics.policy_reload_failed();
                for e in &errors.0 {
                    tracing::error!(trigger = trigger.as_str(), "{e}");
                }
                tracing::error!(
                    "policy reload refused: the quotas do not fit; the old policy stays in force"
                );
                return Err(ReloadError::Limits {
                    dir: self.dir.display().to_string(),
                    errors,
                });
            }
        };
        let old = self.policy.load_full();
        if old.version() == new.version() {
            // limits.toml is not part of the policy version: apply it anyway.
            if let Some(limits) = &self.limits {
                limits.reload(&quotas);
            }
            if let Some(history) = &self.history {
                history.requota(quotas);
            }
            tracing::debug!(version = new.version(), "policy files unchanged");
            return Ok(ReloadOutcome::Unchanged {
                version: new.version().to_owned(),
            });
        }
        // Recorded before the swap: no request is decided under a set the log does not know.
        if let Err(err) = self.audit.append(reload_event(&old, &new, trigger)).await {
            self.metrics.policy_reload_failed();
            tracing::error!(%err, "policy reload not recorded; the old policy stays in force");
            return Err(err.into());
        }
        let (old, new) = (old.version().to_owned(), Arc::new(new));
        self.policy.store(Arc::clone(&new));
        if let Some(limits) = &self.limits {
            limits.reload(&quotas);
        }
        if let Some(history) = &self.history {
            history.push(Arc::clone(&new), quotas, trigger);
        }
        self.metrics.policy_reloaded();
        let new = new.version().to_owned();
        tracing::info!(trigger = trigger.as_str(), %old, %new, "policy reloaded");
        Ok(ReloadOutcome::Reloaded { old, new })
    }
}

/// The audit entry that records a reload: versions, trigger and changed files' hashes in `reason`.
fn reload_event(old: &Policy, new: &Policy, trigger: Trigger) -> Entry {
    let mut changes = Vec::new();
    for (path, hash) in new.files() {
        match old.files().iter().find(|(p, _)| p == path) {
            None => changes.push(format!("added {path} {hash}")),
            Some((_, before)) if before != hash => {
                changes.push(format!("changed {path} {before} -> {hash}"))
            }
            Some(_) => {}
        }
    }
    for (path, hash) in old.files() {
        if !new.files().iter().any(|(p, _)| p == path) {
            changes.push(format!("removed {path} {hash}"));
        }
    }
    Entry {
        id: uuid::Uuid::now_v7().to_string(),
        ts: crate::audit::now_ts(),
        method: "EVENT".to_owned(),
        path: "policy-reload".to_owned(),
        operation: Some(crate::audit::Operation::Event("policy-reload".to_owned())),
        decision: crate::audit::Decision::Allow,
        reason: Some(format!(
            "policy {} -> {} by {}; {}",
            old.version(),
            new.version(),
            trigger.as_str(),
            changes.join("; ")
        )),
        status: 0,
        policy_version: new.version().to_owned(),
        ..Entry::default()
    }
}

/// Starts reloading on every change under the policy directory and on SIGHUP, until `shutdown` turns true.
///
/// The watch and the signal handler are in place when this returns, so no
/// edit made afterwards is missed; one check runs at once, for edits made
/// between the first load and now. If the directory cannot be watched
/// (inotify limits, unsupported file system), a warning is logged and SIGHUP
/// still works.
pub fn spawn(reloader: Arc<Reloader>, mut shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
    let (tx, mut changes) = mpsc::channel::<()>(1);
    let _ = tx.try_send(());
    let watcher = start_watcher(reloader.dir(), tx);
    let mut hangup = hangup_signal();
    tokio::spawn(async move {
        // Dropping the watcher ends the watch; it lives as long as this task.
        let _watcher = watcher;
        loop {
            let trigger = tokio::select! {
                _ = shutdown.changed() => break,
                Some(()) = changes.recv() => {
                    // Coalesce a burst of events into one reload.
                    while let Ok(Some(())) = tokio::time::timeout(QUIET, changes.recv()).await {}
                    Trigger::FileWatch
                }
                () = next_hangup(&mut hangup) => Trigger::Signal,
            };
            // Failures are logged and counted inside; the loop keeps watching.
            let _ = reloader.reload(trigger).await;
        }
    })
}

fn start_watcher(
    dir: &std::path::Path,
    tx: mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::event::{AccessKind, AccessMode};
    use notify::{EventKind, RecursiveMode, Watcher};
    let handler = move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        // Reading the files (our own reload included) is not a change.
        if let EventKind::Access(kind) = event.kind {
            if kind != AccessKind::Close(AccessMode::Write) {
                return;
            }
        }
        // A full channel already holds a pending reload; one is enough.
        let _ = tx.try_send(());
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(err) => {
            tracing::warn!(%err, "cannot watch the policy directory; reload with SIGHUP");
            return None;
        }
    };
    if let Err(err) = watcher.watch(dir, RecursiveMode::Recursive) {
        tracing::warn!(dir = %dir.display(), %err, "cannot watch the policy directory; reload with SIGHUP");
        return None;
    }
    Some(watcher)
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(err) => {
            tracing::warn!(%err, "cannot listen for SIGHUP");
            None
        }
    }
}

#[cfg(not(unix))]
fn hangup_signal() -> Hangup {
    None
}

/// Resolves on the next SIGHUP; never, where there is none.
async fn next_hangup(hangup: &mut Hangup) {
    #[cfg(unix)]
    if let Some(s) = hangup.as_mut() {
        if s.recv().await.is_some() {
            return;
        }
    }
    #[cfg(not(unix))]
    let _ = hangup;
    std::future::pending::<()>().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_keeps_the_last_sets_and_the_quotas_in_force() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let policy = Arc::new(Policy::load(&dir).unwrap());
        let history = PolicyHistory::new(policy.clone(), crate::limits::LimitSet::default());
        assert_eq!(history.current().unwrap().trigger, "start");
        for _ in 0..HISTORY + 5 {
            history.push(
                policy.clone(),
                crate::limits::LimitSet::default(),
                Trigger::Api,
            );
        }
        assert_eq!(history.sets().len(), HISTORY, "bounded");
        assert!(history.sets().iter().all(|l| l.trigger == "api"));
        assert!(history.get(policy.version()).is_some());
        assert!(history.get("0000").is_none());
        let quotas = crate::limits::LimitSet::load(&dir, &policy).unwrap();
        history.requota(quotas.clone());
        assert_eq!(*history.current().unwrap().quotas, quotas);
    }
}
