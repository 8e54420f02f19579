//! The group-commit writer: one task per node owns the chain head and turns
//! whatever requests have queued into one transaction, so one fsync serves
//! many requests.
//!
//! Callers wait on a oneshot until their batch has committed; only then may
//! the gateway answer. A failed transaction fails every entry in it, the
//! chain head is reloaded from the database, and later batches carry on from
//! what was really committed, so the chain never has a gap.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use super::checkpoint::{self, AuditKey, Checkpoint};
use super::record::{audit_columns, prepare, Entry, Record, AUDIT_COLUMN_COUNT, GENESIS_HASH};
use super::AuditError;
use crate::store::{Backend, Store};

/// Rows per multi-row `INSERT` into `audit_log`: 32 × 28 parameters stays far
/// below SQLite's and PostgreSQL's parameter limits.
const LOG_ROWS_PER_INSERT: usize = 32;
/// Rows per multi-row `INSERT` into `audit_subjects` (3 parameters each).
const SUBJECT_ROWS_PER_INSERT: usize = 256;

/// Settings of a node's audit writer.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// This gateway node's name: the chain the writer extends. Unique per process.
    pub node: String,
    /// Most entries committed in one transaction (default 512).
    pub max_batch: usize,
    /// Entries that may wait for the writer before `append` waits too (default 8192).
    pub queue: usize,
    /// Signed checkpoints of the chain head; `None` writes none.
    pub checkpoints: Option<CheckpointPolicy>,
    /// How long accesses under restricted grants stay out of the data subject's report (default 365 days).
    pub restricted_report_delay: Duration,
}

/// When the writer signs a checkpoint of its chain head.
#[derive(Debug, Clone)]
pub struct CheckpointPolicy {
    /// The node's signing key.
    pub key: Arc<AuditKey>,
    /// After at most this many records (default 1000)…
    pub every: u64,
    /// …or with the first batch after this much time (default 60 s), and at shutdown.
    pub interval: Duration,
}

impl AuditConfig {
    /// Defaults for `node`: batches of 512, a queue of 8192.
    pub fn new(node: impl Into<String>) -> Self {
        AuditConfig {
            node: node.into(),
            max_batch: 512,
            queue: 8192,
            checkpoints: None,
            restricted_report_delay: DEFAULT_RESTRICTED_REPORT_DELAY,
        }
    }
}

/// Default of [`AuditConfig::restricted_report_delay`]: a year.
pub const DEFAULT_RESTRICTED_REPORT_DELAY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Where an entry went: its place in the node's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The record's sequence number in its node's chain.
    pub seq: i64,
    /// The record's hash.
    pub hash: String,
}

/// A snapshot of the writer's counters, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Records committed since start.
    pub committed: u64,
    /// Transactions committed since start.
    pub batches: u64,
    /// Transactions that failed (their entries were answered with an error).
    pub failed_batches: u64,
    /// Entries answered with an error.
    pub failed_records: u64,
    /// Entries queued for the writer right now.
    pub queue_depth: usize,
    /// Whether the last transaction failed: requests are being refused (fail closed).
    pub failing: bool,
}

/// Counters shared by the writer task and every handle.
#[derive(Debug, Default)]
struct Counters {
    committed: AtomicU64,
    batches: AtomicU64,
    failed_batches: AtomicU64,
    failed_records: AtomicU64,
    /// Set by a failed transaction, cleared by the next one that commits.
    failing: std::sync::atomic::AtomicBool,
}

/// One caller waiting for its record.
struct Job {
    entry: Entry,
    reply: oneshot::Sender<Result<Committed, AuditError>>,
}

/// The last committed record of this node: what the next one links to.
#[derive(Debug, Clone)]
struct Head {
    seq: i64,
    hash: String,
}

/// A handle to the node's audit log; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
    counters: Arc<Counters>,
    /// Wakes the writer to stop taking entries and drain the queue.
    close: Arc<Notify>,
    /// The database the log lives in, for the auditors' API.
    store: Store,
    /// How long restricted accesses stay out of the data subject's report.
    restricted_report_delay: Duration,
}

/// The writer task; [`AuditWriter::finish`] waits for it to drain and stop.
pub struct AuditWriter {
    task: JoinHandle<()>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("stats", &self.stats())
            .finish()
    }
}

impl AuditLog {
    /// Starts the writer task on the current tokio runtime; loads this node's
    /// chain head from the database.
    pub async fn start(
        store: Store,
        config: AuditConfig,
    ) -> Result<(AuditLog, AuditWriter), AuditError> {
        if config.node.is_empty() || config.node.contains('\0') {
            return Err(AuditError::InvalidConfig(
                "node name must be non-empty text".into(),
            ));
        }
        let head = load_head(&store, &config.node).await?;
        tracing::info!(node = %config.node, seq = head.seq, "audit chain head loaded");
        let last_checkpoint = checkpoint::latest(&store, &config.node).await?.unwrap_or(0);
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let restricted_report_delay = config.restricted_report_delay;
        let counters = Arc::new(Counters::default());
        let close = Arc::new(Notify::new());
        let writer = Writer {
            store: store.clone(),
            node: config.node,
            max_batch: config.max_batch.max(1),
            head: Some(head),
            counters: counters.clone(),
            checkpoints: config.checkpoints,
            last_checkpoint: (last_checkpoint, Instant::now()),
        };
        let task = tokio::spawn(writer.run(rx, close.clone()));
        Ok((
            AuditLog {
                tx,
                counters,
                close,
                store,
                restricted_report_delay,
            },
            AuditWriter { task },
        ))
    }

    /// Queues the entry and resolves once its record is durably committed
    /// (or with an error: then nothing about it was committed).
    ///
    /// Waits while the queue is full (back-pressure). Fails at once if the
    /// writer has stopped, so the gateway fails closed.
    pub async fn append(&self, entry: Entry) -> Result<Committed, AuditError> {
        let entry = prepare(entry)?;
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job { entry, reply })
            .await
            .map_err(|_| AuditError::Closed)?;
        // A dropped sender means the writer died with the entry in hand: not committed.
        answer.await.map_err(|_| AuditError::Closed)?
    }

    /// The writer's counters and the current queue depth.
    pub fn stats(&self) -> AuditStats {
        let c = &self.counters;
        AuditStats {
            committed: c.committed.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            failed_batches: c.failed_batches.load(Ordering::Relaxed),
            failed_records: c.failed_records.load(Ordering::Relaxed),
            queue_depth: self.tx.max_capacity().saturating_sub(self.tx.capacity()),
            failing: c.failing.load(Ordering::Relaxed),
        }
    }

    /// The database the log is written to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// How long accesses under restricted grants stay out of the data subject's report.
    pub fn restricted_report_delay(&self) -> Duration {
        self.restricted_report_delay
    }

    /// Stops taking entries (later `append`s fail); what is queued is still committed.
    pub fn close(&self) {
        self.close.notify_one();
    }
}

impl AuditWriter {
    /// Waits until every queued entry is committed or failed and the task
    /// exits (after all [`AuditLog`] handles are dropped, or after
    /// [`AuditLog::close`]).
    pub async fn finish(self) {
        if let Err(err) = self.task.await {
            tracing::error!(%err, "audit writer task ended abnormally");
        }
    }
}

/// The state the writer task owns.
struct Writer {
    store: Store,
    node: String,
    max_batch: usize,
    /// `None` after a failure to reload it: reloaded before the next batch.
    head: Option<Head>,
    counters: Arc<Counters>,
    checkpoints: Option<CheckpointPolicy>,
    /// Chain position of the last checkpoint, and when it was taken.
    last_checkpoint: (i64, Instant),
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>, close: Arc<Notify>) {
        let mut jobs = Vec::with_capacity(self.max_batch);
        let mut closing = false;
        loop {
            let taken = if closing {
                rx.recv_many(&mut jobs, self.max_batch).await
            } else {
                tokio::select! {
                    taken = rx.recv_many(&mut jobs, self.max_batch) => taken,
                    () = close.notified() => {
                        // Buffered entries stay receivable; new sends fail.
                        rx.close();
                        closing = true;
                        continue;
                    }
                }
            };
            if taken == 0 {
                break;
            }
            self.process(std::mem::take(&mut jobs)).await;
        }
        self.final_checkpoint().await;
        tracing::info!(node = %self.node, "audit writer stopped");
    }

    /// Commits one batch and answers its callers.
    async fn process(&mut self, jobs: Vec<Job>) {
        let head = match self.head.clone() {
            Some(head) => head,
            None => match load_head(&self.store, &self.node).await {
                Ok(head) => head,
                Err(err) => {
                    tracing::error!(node = %self.node, %err, "cannot load the audit chain head");
                    self.fail(jobs);
                    return;
                }
            },
        };

        // A repeated request id would make the whole transaction fail on the
        // unique index; refuse just the repeat instead.
        let mut seen = HashSet::with_capacity(jobs.len());
        let mut records = Vec::with_capacity(jobs.len());
        let mut replies = Vec::with_capacity(jobs.len());
        let (mut seq, mut prev) = (head.seq, head.hash.clone());
        for job in jobs {
            if !seen.insert(job.entry.id.clone()) {
                self.counters.failed_records.fetch_add(1, Ordering::Relaxed);
                let _ = job
                    .reply
                    .send(Err(AuditError::InvalidEntry("duplicate request id".into())));
                continue;
            }
            match Record::chain(seq + 1, &self.node, job.entry, &prev) {
                Ok(record) => {
                    seq = record.seq;
                    prev.clone_from(&record.hash);
                    records.push(record);
                    replies.push(job.reply);
                }
                Err(err) => {
                    self.counters.failed_records.fetch_add(1, Ordering::Relaxed);
                    let _ = job.reply.send(Err(err));
                }
            }
        }
        if records.is_empty() {
            return;
        }

        let checkpoint = self.due_checkpoint(seq, &prev);
        match write_batch(&self.store, &records, checkpoint.as_ref()).await {
            Ok(()) => {
                if checkpoint.is_some() {
                    self.last_checkpoint = (seq, Instant::now());
                }
                self.head = Some(Head { seq, hash: prev });
                let c = &self.counters;
                c.batches.fetch_add(1, Ordering::Relaxed);
                c.failing.store(false, Ordering::Relaxed);
                c.committed
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                for (record, reply) in records.into_iter().zip(replies) {
                    // The caller may have gone away; its record stays committed.
                    let _ = reply.send(Ok(Committed {
                        seq: record.seq,
                        hash: record.hash,
                    }));
                }
            }
            Err(err) => {
                tracing::error!(
                    node = %self.node,
                    first_seq = head.seq + 1,
                    entries = records.len(),
                    %err,
                    "audit batch failed to commit; its requests are refused"
                );
                self.counters.failed_batches.fetch_add(1, Ordering::Relaxed);
                self.counters.failing.store(true, Ordering::Relaxed);
                self.counters
                    .failed_records
                    .fetch_add(replies.len() as u64, Ordering::Relaxed);
                for reply in replies {
                    let _ = reply.send(Err(AuditError::CommitFailed));
                }
                // The commit may have reached the database before failing (or
                // another process shares the node name): trust only the database.
                self.head = match load_head(&self.store, &self.node).await {
                    Ok(head) => Some(head),
                    Err(err) => {
                        tracing::warn!(node = %self.node, %err, "audit chain head reload failed; retrying on the next batch");
                        None
                    }
                };
            }
        }
    }

    /// A checkpoint of the head after this batch, if one is due.
    fn due_checkpoint(&self, seq: i64, hash: &str) -> Option<Checkpoint> {
        let policy = self.checkpoints.as_ref()?;
        let (last_seq, last_at) = self.last_checkpoint;
        let due = (seq - last_seq) as u64 >= policy.every || last_at.elapsed() >= policy.interval;
        due.then(|| policy.key.sign(&self.node, seq, hash))
    }

    /// At shutdown: a checkpoint of the head if records came after the last one.
    async fn final_checkpoint(&mut self) {
        let (Some(policy), Some(head)) = (&self.checkpoints, &self.head) else {
            return;
        };
        if head.seq <= self.last_checkpoint.0 {
            return;
        }
        let cp = policy.key.sign(&self.node, head.seq, &head.hash);
        let result = async {
            let mut conn = self.store.pool().acquire().await?;
            checkpoint::insert(&mut conn, &cp).await
        }
        .await;
        match result {
            Ok(()) => self.last_checkpoint = (head.seq, Instant::now()),
            Err(err) => {
                tracing::error!(node = %self.node, %err, "final audit checkpoint not written")
            }
        }
    }

    /// Answers every job with a commit failure.
    fn fail(&self, jobs: Vec<Job>) {
        self.counters.failed_batches.fetch_add(1, Ordering::Relaxed);
        self.counters.failing.store(true, Ordering::Relaxed);
        self.counters
            .failed_records
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        for job in jobs {
            let _ = job.reply.send(Err(AuditError::CommitFailed));
        }
    }
}

/// The node's last committed record (or, when all were archived, the last
/// archived one), or the genesis position.
async fn load_head(store: &Store, node: &str) -> Result<Head, AuditError> {
    let mut row: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_log WHERE node = $1 ORDER BY seq DESC LIMIT 1")
            .bind(node)
            .fetch_optional(store.pool())
            .await?;
    if row.is_none() {
        row = sqlx::query_as(
            "SELECT seq, hash FROM audit_archives WHERE node = $1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(node)
        .fetch_optional(store.pool())
        .await?;
    }
    Ok(match row {
        Some((seq, hash)) => Head { seq, hash },
        None => Head {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        },
    })
}

/// Writes the records and their subject index rows in one transaction.
async fn write_batch(
    store: &Store,
    records: &[Record],
    checkpoint: Option<&Checkpoint>,
) -> Result<(), sqlx::Error> {
    let mut tx = store.pool().begin().await?;
    for chunk in records.chunks(LOG_ROWS_PER_INSERT) {
        let sql = insert_sql(
            store.backend(),
            concat!("INSERT INTO audit_log (", audit_columns!(), ") VALUES "),
            AUDIT_COLUMN_COUNT,
            chunk.len(),
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for r in chunk {
            let e = &r.entry;
            q = q
                .bind(r.node.as_str())
                .bind(r.seq)
                .bind(e.id.as_str())
                .bind(e.ts.as_str())
                .bind(e.agency.as_deref())
                .bind(e.certificate.as_deref())
                .bind(e.officer.as_deref())
                .bind(e.purpose.as_deref())
                .bind(e.legal_basis.as_deref())
                .bind(e.case_ref.as_deref())
                .bind(e.consent_ref.as_deref())
                .bind(e.token_id.as_deref())
                .bind(e.provider.as_deref())
                .bind(e.service.as_deref())
                .bind(e.operation.as_deref())
                .bind(e.method.as_str())
                .bind(e.path.as_str())
                .bind(json_list(&e.subjects))
                .bind(json_list(&e.fields))
                .bind(e.decision.as_str())
                .bind(e.reason.as_deref())
                .bind(i32::from(e.status))
                .bind(e.policy_version.as_str())
                .bind(r.prev_hash.as_str())
                .bind(r.hash.as_str())
                .bind(e.shadow_decision.as_deref())
                .bind(e.response_digest.as_deref())
                .bind(i32::from(e.restricted));
        }
        q.execute(&mut *tx).await?;
    }

    let subjects: Vec<(&str, i64, &str)> = records
        .iter()
        .flat_map(|r| {
            distinct(&r.entry.subjects)
                .into_iter()
                .map(move |s| (r.node.as_str(), r.seq, s))
        })
        .collect();
    for chunk in subjects.chunks(SUBJECT_ROWS_PER_INSERT) {
        let sql = insert_sql(
            store.backend(),
            "INSERT INTO audit_subjects (node, seq, subject) VALUES ",
            3,
            chunk.len(),
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (node, seq, subject) in chunk {
            q = q.bind(*node).bind(*seq).bind(*subject);
        }
        q.execute(&mut *tx).await?;
    }
    if let Some(cp) = checkpoint {
        checkpoint::insert(&mut tx, cp).await?;
    }
    // Last, so the node lock is checked as close to the commit as it can be (crate::store::locks).
    store.check_node_lock(&mut tx).await?;
    tx.commit().await
}

/// The subjects of a record without repeats, sorted: the rows of its index.
pub(crate) fn distinct(subjects: &[String]) -> Vec<&str> {
    let mut out: Vec<&str> = subjects.iter().map(String::as_str).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The stored form of a list column.
fn json_list(items: &[String]) -> String {
    // Serialising strings to JSON cannot fail.
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_owned())
}

/// `prefix` followed by `rows` groups of `cols` placeholders.
///
/// SQLite gets anonymous `?`: sqlx asks SQLite for the name of every
/// parameter it binds, and SQLite finds a numbered one by a linear scan, so
/// `$n` would make a batch of hundreds of parameters cost quadratic time.
/// PostgreSQL needs `$n`.
fn insert_sql(backend: Backend, prefix: &str, cols: usize, rows: usize) -> String {
    let mut sql = String::with_capacity(prefix.len() + rows * cols * 6);
    sql.push_str(prefix);
    let mut n = 0;
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ",(" });
        for col in 0..cols {
            n += 1;
            sql.push_str(if col == 0 { "" } else { "," });
            match backend {
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => {
                    let _ = write!(sql, "${n}");
                }
            }
        }
        sql.push(')');
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_across_rows_on_postgres_and_anonymous_on_sqlite() {
        assert_eq!(
            insert_sql(Backend::Postgres, "V ", 2, 2),
            "V ($1,$2),($3,$4)"
        );
        assert_eq!(insert_sql(Backend::Sqlite, "V ", 2, 2), "V (?,?),(?,?)");
    }
}
