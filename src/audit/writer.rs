//! The group-commit writer: one task per node owns the chain head and turns
//! whatever requests have queued into one transaction, so one fsync serves
//! many requests.
//!
//! Callers wait on a oneshot until their batch has committed; only then may
//! the gateway answer. Each transaction runs on a connection of its own
//! ([`crate::store::WriteTx`]): one that fails is abandoned with its
//! connection, the chain head is read back inside the next transaction, and
//! later batches carry on from what was really committed, so the chain never
//! has a gap and no sequence number is handed out twice.
//!
//! A batch the store refuses for one of its rows is committed in halves, so
//! one entry that cannot be stored never costs the others theirs, nor the
//! node its readiness. A batch the store cannot commit at all starts an
//! outage: requests are refused (fail closed) and the writer tries the store
//! again every second by itself, with an event recording the outage; the
//! node is ready again as soon as that event commits.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use super::checkpoint::{self, AuditKey, Checkpoint};
use super::merkle::CompactRange;
use super::record::{audit_columns, prepare, Entry, AUDIT_COLUMN_COUNT, GENESIS_HASH};
use super::sampling::RefusalLog;
use super::AuditError;
use crate::config::{DEFAULT_AUDIT_MAX_BATCH, DEFAULT_AUDIT_QUEUE};
use crate::store::{Backend, Store};
use sqlx::{AnyConnection, AssertSqlSafe};

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
    /// The origin line of the node's signed tree heads (default `karibche/audit/{node}`).
    pub origin: String,
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
        let node = node.into();
        AuditConfig {
            origin: super::tree::default_origin(&node),
            node,
            max_batch: DEFAULT_AUDIT_MAX_BATCH,
            queue: DEFAULT_AUDIT_QUEUE,
            checkpoints: None,
            restricted_report_delay: DEFAULT_RESTRICTED_REPORT_DELAY,
        }
    }
}

pub use crate::config::DEFAULT_RESTRICTED_REPORT_DELAY;

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
    /// Whether the store cannot commit now: requests are being refused (fail
    /// closed) until the writer's own retry succeeds.
    pub failing: bool,
}

/// Counters shared by the writer task and every handle.
#[derive(Debug, Default)]
struct Counters {
    committed: AtomicU64,
    batches: AtomicU64,
    failed_batches: AtomicU64,
    failed_records: AtomicU64,
    /// Set while the store cannot commit (an outage), cleared once a transaction commits again.
    failing: std::sync::atomic::AtomicBool,
    histograms: CommitHistograms,
}

/// How long committed transactions took and how many records each held, for `/metrics`.
#[derive(Debug, Clone)]
pub struct CommitHistograms {
    /// Seconds from a transaction's begin to its commit.
    pub seconds: prometheus_client::metrics::histogram::Histogram,
    /// Records per committed transaction.
    pub records: prometheus_client::metrics::histogram::Histogram,
}

impl Default for CommitHistograms {
    fn default() -> Self {
        use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
        CommitHistograms {
            seconds: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            records: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
        }
    }
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
    /// Which rate-limit refusals get a record of their own, and the summaries of the rest.
    refusals: Arc<RefusalLog>,
    /// The size of the newest signed tree head: what the witness task sends on.
    tree_heads: tokio::sync::watch::Receiver<u64>,
    /// The origin line of the node's tree heads.
    origin: Arc<str>,
    /// How far each witness is behind, reported by the witness tasks.
    witnesses: Arc<crate::witness::client::WitnessBoard>,
    /// How far the time-stamping authority is behind, reported by its task.
    timestamps: Arc<super::timestamp::TimestampBoard>,
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
    /// The sampler deciding which rate-limit refusals are recorded one by one.
    pub fn refusals(&self) -> &RefusalLog {
        &self.refusals
    }

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
        let head = {
            let mut conn = store.pool().acquire().await?;
            load_head(&mut conn, &config.node).await?
        };
        tracing::info!(node = %config.node, seq = head.seq, "audit chain head loaded");
        let last_checkpoint = checkpoint::latest(&store, &config.node).await?.unwrap_or(0);
        let tree_size = super::tree::latest(&store, &config.node)
            .await?
            .map_or(0, |h| h.size as u64);
        let (heads_tx, tree_heads) = tokio::sync::watch::channel(tree_size);
        let origin: Arc<str> = config.origin.as_str().into();
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
            outage: None,
            origin: origin.clone(),
            tree: None,
            tree_disabled: false,
            heads: heads_tx,
            conn: None,
            leaves: Vec::new(),
        };
        let task = tokio::spawn(writer.run(rx, close.clone()));
        Ok((
            AuditLog {
                tx,
                counters,
                close,
                store,
                restricted_report_delay,
                refusals: Arc::new(RefusalLog::new(Duration::from_secs(1), 10_000)),
                tree_heads,
                origin,
                witnesses: Arc::default(),
                timestamps: Arc::default(),
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

    /// Commit latency and batch size histograms (shared: they keep counting).
    pub fn histograms(&self) -> CommitHistograms {
        self.counters.histograms.clone()
    }

    /// The database the log is written to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// How long accesses under restricted grants stay out of the data subject's report.
    pub fn restricted_report_delay(&self) -> Duration {
        self.restricted_report_delay
    }

    /// The size of the newest signed tree head, updated as the writer signs them.
    pub fn tree_heads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.tree_heads.clone()
    }

    /// How far each witness is behind (empty without witnesses).
    pub fn witnesses(&self) -> &Arc<crate::witness::client::WitnessBoard> {
        &self.witnesses
    }

    /// How far the time-stamping authority is behind (`None` without one).
    pub fn timestamps(&self) -> &Arc<super::timestamp::TimestampBoard> {
        &self.timestamps
    }

    /// The origin line of this node's tree heads.
    pub fn origin(&self) -> &str {
        &self.origin
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

/// Most leaves the writer keeps for the next tree head (a head is due every 1,000
/// records by default); a longer stretch is read back from the database instead.
const MAX_KNOWN_LEAVES: usize = 65_536;

/// How often a failing writer tries the store again by itself: a node out of
/// rotation gets no requests, so it must find out on its own that it can write.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The state the writer task owns.
struct Writer {
    store: Store,
    node: String,
    max_batch: usize,
    /// `None` after any failed transaction: re-read inside the next one, from
    /// what the database really committed.
    head: Option<Head>,
    counters: Arc<Counters>,
    checkpoints: Option<CheckpointPolicy>,
    /// Chain position of the last checkpoint, and when it was taken.
    last_checkpoint: (i64, Instant),
    /// Set while the store cannot commit; cleared by the event that says so.
    outage: Option<Outage>,
    /// The origin line of the signed tree heads.
    origin: Arc<str>,
    /// The Merkle tree as of the last head; `None` after a failed transaction (read back from the head).
    tree: Option<CompactRange>,
    /// Set once the tree cannot be extended (records archived before it existed): chain checkpoints only.
    tree_disabled: bool,
    /// Tells the witness task about each new tree head.
    heads: tokio::sync::watch::Sender<u64>,
    /// `(seq, hash)` of the records committed since the last tree head, so the next head
    /// need not read them back; empty when unknown (then they are read).
    leaves: Vec<(i64, String)>,
    /// The connection batches commit on, kept between them (none after a failure).
    conn: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
}

/// A time when the store refused to commit: what the recovery event reports.
#[derive(Debug)]
struct Outage {
    since: String,
    refused: u64,
    cause: String,
}

/// Why a transaction failed.
enum Failure {
    /// The store cannot commit now (full, gone, locked, read-only, …): every entry waits for it.
    Store(String),
    /// Something in the rows themselves (a constraint, a value the database refuses): one entry may be to blame.
    Rows(String),
}

impl Failure {
    fn of(err: &sqlx::Error, backend: Backend) -> Failure {
        if row_specific(err, backend) {
            Failure::Rows(err.to_string())
        } else {
            Failure::Store(err.to_string())
        }
    }
}

/// Whether a database error comes from what a row holds rather than from the
/// store: SQLite's TOOBIG, CONSTRAINT, MISMATCH and RANGE; PostgreSQL's data
/// exceptions (class 22, e.g. a NUL), integrity violations (23) and program
/// limits (54000, e.g. an index row too large).
fn row_specific(err: &sqlx::Error, backend: Backend) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match backend {
                // Extended result codes; the primary code is the low byte.
                Backend::Sqlite => code
                    .parse::<i64>()
                    .is_ok_and(|n| matches!(n & 0xff, 18..=20 | 25)),
                Backend::Postgres => {
                    code.starts_with("22") || code.starts_with("23") || code == "54000"
                }
            }
        }
        sqlx::Error::Encode(_) => true,
        _ => false,
    }
}

/// One entry placed in the chain for a transaction that may still fail.
struct Chained<'a> {
    seq: i64,
    prev_hash: String,
    hash: String,
    entry: &'a Entry,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>, close: Arc<Notify>) {
        let mut jobs = Vec::with_capacity(self.max_batch);
        let mut closing = false;
        let mut probe =
            tokio::time::interval_at(tokio::time::Instant::now() + PROBE_EVERY, PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let taken = tokio::select! {
                taken = rx.recv_many(&mut jobs, self.max_batch) => taken,
                () = close.notified(), if !closing => {
                    // Buffered entries stay receivable; new sends fail.
                    rx.close();
                    closing = true;
                    continue;
                }
                _ = probe.tick(), if self.outage.is_some() => {
                    self.recover().await;
                    continue;
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
    ///
    /// A batch that fails because of its rows is split in halves until the
    /// entry that cannot be stored is alone, so the others still commit; that
    /// entry's caller is refused and an event says so, and the node stays
    /// ready. A batch that fails because of the store fails whole and starts
    /// an outage, which only an event committed about it ends.
    async fn process(&mut self, jobs: Vec<Job>) {
        if self.outage.is_some() && !self.recover().await {
            self.fail(jobs);
            return;
        }
        // A repeated request id would make the whole transaction fail on the
        // unique index; refuse just the repeat instead.
        let mut seen = HashSet::with_capacity(jobs.len());
        let mut batch = Vec::with_capacity(jobs.len());
        for job in jobs {
            if seen.insert(job.entry.id.clone()) {
                batch.push(job);
            } else {
                self.counters.failed_records.fetch_add(1, Ordering::Relaxed);
                let _ = job
                    .reply
                    .send(Err(AuditError::InvalidEntry("duplicate request id".into())));
            }
        }
        let mut work = std::collections::VecDeque::from([batch]);
        while let Some(batch) = work.pop_front() {
            if batch.is_empty() {
                continue;
            }
            let entries: Vec<&Entry> = batch.iter().map(|j| &j.entry).collect();
            match self.commit(&entries).await {
                Ok(committed) => {
                    self.counters.failing.store(false, Ordering::Relaxed);
                    for (job, c) in batch.into_iter().zip(committed) {
                        // The caller may have gone away; its record stays committed.
                        let _ = job.reply.send(Ok(c));
                    }
                }
                Err(Failure::Rows(why)) if batch.len() > 1 => {
                    tracing::warn!(node = %self.node, entries = batch.len(), err = %why, "audit batch refused for its rows; committing it in halves");
                    let mut first = batch;
                    let second = first.split_off(first.len() / 2);
                    work.push_front(second);
                    work.push_front(first);
                }
                Err(Failure::Rows(why)) => {
                    let Some(job) = batch.into_iter().next() else {
                        continue;
                    };
                    if self.refused_entry(&job.entry, &why).await {
                        self.counters.failed_records.fetch_add(1, Ordering::Relaxed);
                        let _ = job.reply.send(Err(AuditError::InvalidEntry(
                            "the log's database refused this entry".into(),
                        )));
                    } else {
                        self.start_outage(why);
                        self.fail(vec![job]);
                        work.into_iter().for_each(|b| self.fail(b));
                        return;
                    }
                }
                Err(Failure::Store(why)) => {
                    tracing::error!(node = %self.node, entries = batch.len(), err = %why, "audit batch failed to commit; its requests are refused");
                    self.start_outage(why);
                    self.fail(batch);
                    work.into_iter().for_each(|b| self.fail(b));
                    return;
                }
            }
        }
    }

    /// Places `entries` after the chain head and commits them in one
    /// transaction (with a checkpoint, if one is due); on success the head
    /// moves on. After any failure the head is forgotten: the commit may have
    /// reached the database before failing, so the next transaction reads it
    /// back from what is really there.
    async fn commit(&mut self, entries: &[&Entry]) -> Result<Vec<Committed>, Failure> {
        let backend = self.store.backend();
        let began = Instant::now();
        // The connection of the last transaction that committed; a failed one was closed.
        let held = self.conn.take();
        let result = async {
            let mut tx = self
                .store
                .begin_write_on(held)
                .await
                .map_err(|e| Failure::of(&e, backend))?;
            let head = match &self.head {
                Some(head) => head.clone(),
                None => load_head(tx.conn(), &self.node)
                    .await
                    .map_err(|e| Failure::Store(e.to_string()))?,
            };
            let (mut seq, mut prev) = (head.seq, head.hash);
            let mut chained = Vec::with_capacity(entries.len());
            for entry in entries {
                let hash = super::record::chain_hash(seq + 1, &self.node, entry, &prev)
                    .map_err(|e| Failure::Rows(e.to_string()))?;
                seq += 1;
                chained.push(Chained {
                    seq,
                    prev_hash: std::mem::replace(&mut prev, hash.clone()),
                    hash,
                    entry,
                });
            }
            let checkpoint = self.due_checkpoint(seq, &prev);
            write_rows(
                tx.conn(),
                backend,
                &self.node,
                &chained,
                checkpoint.as_ref(),
            )
            .await
            .map_err(|e| Failure::of(&e, backend))?;
            let tree = match checkpoint {
                Some(_) => self
                    .advance_tree(tx.conn(), seq, &chained)
                    .await
                    .map_err(|e| Failure::of(&e, backend))?,
                None => None,
            };
            // Last, so the node lock is checked as close to the commit as it can be (crate::store::locks).
            self.store
                .check_node_lock(tx.conn())
                .await
                .map_err(|e| Failure::of(&e, backend))?;
            let conn = tx
                .commit_keep()
                .await
                .map_err(|e| Failure::of(&e, backend))?;
            Ok((chained, checkpoint, tree, Head { seq, hash: prev }, conn))
        }
        .await;
        match result {
            Ok((chained, checkpoint, tree, head, conn)) => {
                self.conn = Some(conn);
                if tree.is_none() {
                    self.remember_leaves(&chained);
                }
                if checkpoint.is_some() {
                    self.last_checkpoint = (head.seq, Instant::now());
                }
                self.tree_advanced(tree);
                self.head = Some(head);
                let c = &self.counters;
                c.batches.fetch_add(1, Ordering::Relaxed);
                c.committed
                    .fetch_add(chained.len() as u64, Ordering::Relaxed);
                c.histograms.seconds.observe(began.elapsed().as_secs_f64());
                c.histograms.records.observe(chained.len() as f64);
                Ok(chained
                    .into_iter()
                    .map(|r| Committed {
                        seq: r.seq,
                        hash: r.hash,
                    })
                    .collect())
            }
            Err(failure) => {
                self.head = None;
                self.tree = None;
                self.leaves.clear();
                self.counters.failed_batches.fetch_add(1, Ordering::Relaxed);
                Err(failure)
            }
        }
    }

    /// Commits the event that an entry could not be stored; `true` if it
    /// committed (so the store works and the entry alone is to blame).
    async fn refused_entry(&mut self, entry: &Entry, why: &str) -> bool {
        tracing::error!(node = %self.node, request_id = %entry.id, err = %why, "the log refused one entry; its request is refused");
        let short = |v: &Option<String>| {
            v.as_deref().map_or_else(
                || "-".to_owned(),
                |s| super::text::shorten(s, 64).into_owned(),
            )
        };
        let event = super::event::event(
            super::event::ENTRY_REFUSED,
            format!(
                "the record of request {} could not be stored, so the request was refused: \
                 agency {}, officer {}, {} {}",
                super::text::shorten(&entry.id, 64),
                short(&entry.agency),
                short(&entry.officer),
                super::text::shorten(&entry.method, 16),
                super::text::shorten(&entry.path, 256),
            ),
            &entry.policy_version,
        );
        let Ok(event) = prepare(event) else {
            return false;
        };
        self.commit(&[&event]).await.is_ok()
    }

    fn start_outage(&mut self, cause: String) {
        self.counters.failing.store(true, Ordering::Relaxed);
        if self.outage.is_none() {
            self.outage = Some(Outage {
                since: super::now_ts(),
                refused: 0,
                cause,
            });
        }
    }

    /// While failing: commits the event that the log was unavailable; `true`
    /// (and ready again) once it commits.
    async fn recover(&mut self) -> bool {
        let Some(outage) = &self.outage else {
            return true;
        };
        let (since, refused) = (outage.since.clone(), outage.refused);
        let event = super::event::event(
            super::event::AUDIT_RECOVERED,
            format!(
                "the audit log could not be written from {} until now: {} record(s) refused, no data released for them (first error: {})",
                since,
                refused,
                super::text::shorten(&outage.cause, 512),
            ),
            "",
        );
        let Ok(event) = prepare(event) else {
            return false;
        };
        match self.commit(&[&event]).await {
            Ok(_) => {
                tracing::info!(node = %self.node, %since, refused, "audit log writable again");
                self.outage = None;
                self.counters.failing.store(false, Ordering::Relaxed);
                true
            }
            Err(Failure::Store(why) | Failure::Rows(why)) => {
                tracing::debug!(node = %self.node, err = %why, "audit store still failing");
                false
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

    /// Extends the Merkle tree to `seq` and signs its head, on the transaction's
    /// connection; `None` if the tree is not kept (no key, or it cannot be extended).
    async fn advance_tree(
        &mut self,
        conn: &mut AnyConnection,
        seq: i64,
        batch: &[Chained<'_>],
    ) -> Result<Option<CompactRange>, sqlx::Error> {
        let Some(policy) = &self.checkpoints else {
            return Ok(None);
        };
        if self.tree_disabled {
            return Ok(None);
        }
        let known: Vec<(i64, &str)> = self
            .leaves
            .iter()
            .map(|(s, h)| (*s, h.as_str()))
            .chain(batch.iter().map(|c| (c.seq, c.hash.as_str())))
            .collect();
        let tree = super::tree::advance(
            conn,
            &self.node,
            &self.origin,
            &policy.key,
            self.tree.clone(),
            seq,
            &known,
        )
        .await?;
        if tree.is_none() {
            tracing::warn!(node = %self.node, "the Merkle tree cannot be extended (records below it were archived before it existed); only chain checkpoints are signed");
            self.tree_disabled = true;
        }
        Ok(tree)
    }

    /// After a commit that signed no tree head: its records are the next head's leaves
    /// (up to [`MAX_KNOWN_LEAVES`]; past that the head reads them back).
    fn remember_leaves(&mut self, chained: &[Chained<'_>]) {
        if self.checkpoints.is_none() || self.tree_disabled {
            return;
        }
        if self.leaves.len() + chained.len() > MAX_KNOWN_LEAVES {
            self.leaves.clear();
            return;
        }
        self.leaves
            .extend(chained.iter().map(|c| (c.seq, c.hash.clone())));
    }

    /// After a commit: the tree as of its head, announced to the witness task.
    fn tree_advanced(&mut self, tree: Option<CompactRange>) {
        if let Some(tree) = tree {
            self.leaves.clear();
            self.heads.send_replace(tree.size);
            self.tree = Some(tree);
        }
    }

    /// At shutdown: a checkpoint of the head if records came after the last one.
    async fn final_checkpoint(&mut self) {
        let (Some(policy), Some(head)) = (&self.checkpoints, self.head.clone()) else {
            return;
        };
        if head.seq <= self.last_checkpoint.0 {
            return;
        }
        let cp = policy.key.sign(&self.node, head.seq, &head.hash);
        let result = async {
            let mut tx = self.store.begin_write().await?;
            checkpoint::insert(tx.conn(), &cp).await?;
            let tree = self.advance_tree(tx.conn(), head.seq, &[]).await?;
            tx.commit().await.map(|()| tree)
        }
        .await;
        match result {
            Ok(tree) => {
                self.tree_advanced(tree);
                self.last_checkpoint = (head.seq, Instant::now());
            }
            Err(err) => {
                tracing::error!(node = %self.node, %err, "final audit checkpoint not written")
            }
        }
    }

    /// Answers every job with a commit failure.
    fn fail(&mut self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        if let Some(o) = &mut self.outage {
            o.refused += jobs.len() as u64;
        }
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
async fn load_head(conn: &mut AnyConnection, node: &str) -> Result<Head, AuditError> {
    let mut row: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_log WHERE node = $1 ORDER BY seq DESC LIMIT 1")
            .bind(node)
            .fetch_optional(&mut *conn)
            .await?;
    if row.is_none() {
        row = sqlx::query_as(
            "SELECT seq, hash FROM audit_archives WHERE node = $1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(node)
        .fetch_optional(&mut *conn)
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

/// PostgreSQL's batch insert of records: the rows travel as one bound JSON text (an array
/// of arrays, one value per column of [`audit_columns!`]; `jsonb` indexes an array in
/// constant time), so the statement is the same for every batch and binds one value, not
/// 35 a row. The integer columns are cast from text.
static INSERT_LOG_POSTGRES: LazyLock<String> = LazyLock::new(|| {
    let integer = [
        "seq",
        "status",
        "restricted",
        "upstream_status",
        "pseudonymised",
    ];
    let select = audit_columns!()
        .split(", ")
        .map(str::trim)
        .enumerate()
        .map(|(i, col)| {
            if integer.contains(&col) {
                format!("(e ->> {i})::bigint")
            } else {
                format!("e ->> {i}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO audit_log ({}) SELECT {select} FROM jsonb_array_elements($1::jsonb) AS e",
        audit_columns!()
    )
});

/// PostgreSQL's subject index rows of a batch, as one bound JSON text of `[seq, subject]` pairs.
const INSERT_SUBJECTS_POSTGRES: &str = "INSERT INTO audit_subjects (node, seq, subject) \
     SELECT $1, (e ->> 0)::bigint, e ->> 1 FROM jsonb_array_elements($2::jsonb) AS e";

/// Most rows in one SQLite insert (256 × 35 values stays far below its 32,766).
///
/// SQLite takes positional values (`?`): reading 35 members out of each row of a JSON
/// text costs it more than binding them. A batch is written in chunks of a power of two
/// rows, so at most nine statement texts per table exist, each prepared once per connection.
const SQLITE_MAX_ROWS: usize = 256;

/// `INSERT … VALUES` for 1, 2, 4, … [`SQLITE_MAX_ROWS`] rows of `cols` values (anonymous
/// `?`: SQLite finds a numbered parameter by a linear scan).
fn sqlite_inserts(prefix: &str, cols: usize) -> Vec<String> {
    let row = format!("({})", vec!["?"; cols].join(","));
    std::iter::successors(Some(1usize), |n| (*n < SQLITE_MAX_ROWS).then_some(n * 2))
        .map(|rows| format!("{prefix} VALUES {}", vec![row.as_str(); rows].join(",")))
        .collect()
}

static INSERT_LOG_SQLITE: LazyLock<Vec<String>> = LazyLock::new(|| {
    sqlite_inserts(
        concat!("INSERT INTO audit_log (", audit_columns!(), ")"),
        AUDIT_COLUMN_COUNT,
    )
});

static INSERT_SUBJECTS_SQLITE: LazyLock<Vec<String>> =
    LazyLock::new(|| sqlite_inserts("INSERT INTO audit_subjects (node, seq, subject)", 3));

/// `items` in runs of the largest power of two that fits (at most [`SQLITE_MAX_ROWS`]),
/// each with the index of its statement text.
fn power_chunks<T>(mut items: &[T]) -> impl Iterator<Item = (usize, &[T])> {
    std::iter::from_fn(move || {
        if items.is_empty() {
            return None;
        }
        let n = items.len().min(SQLITE_MAX_ROWS);
        let k = n.ilog2() as usize;
        let (chunk, rest) = items.split_at(1 << k);
        items = rest;
        Some((k, chunk))
    })
}

/// Writes the records and their subject index rows (and a checkpoint) on the transaction's connection.
async fn write_rows(
    conn: &mut AnyConnection,
    backend: Backend,
    node: &str,
    records: &[Chained<'_>],
    checkpoint: Option<&Checkpoint>,
) -> Result<(), sqlx::Error> {
    let subjects = subject_rows(records);
    match backend {
        Backend::Sqlite => {
            for (k, chunk) in power_chunks(records) {
                let sql = INSERT_LOG_SQLITE.get(k).map_or("", String::as_str);
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for r in chunk {
                    q = bind_row(q, node, r);
                }
                q.execute(&mut *conn).await?;
            }
            for (k, chunk) in power_chunks(&subjects) {
                let sql = INSERT_SUBJECTS_SQLITE.get(k).map_or("", String::as_str);
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for (seq, subject) in chunk {
                    q = q.bind(node).bind(*seq).bind(*subject);
                }
                q.execute(&mut *conn).await?;
            }
        }
        Backend::Postgres => {
            let rows = log_json(node, records).map_err(|e| sqlx::Error::Encode(e.into()))?;
            sqlx::query(AssertSqlSafe(INSERT_LOG_POSTGRES.as_str()))
                .bind(rows)
                .execute(&mut *conn)
                .await?;
            if !subjects.is_empty() {
                let subjects =
                    serde_json::to_string(&subjects).map_err(|e| sqlx::Error::Encode(e.into()))?;
                sqlx::query(INSERT_SUBJECTS_POSTGRES)
                    .bind(node)
                    .bind(subjects)
                    .execute(&mut *conn)
                    .await?;
            }
        }
    }
    if let Some(cp) = checkpoint {
        checkpoint::insert(conn, cp).await?;
    }
    Ok(())
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

/// Binds one record's columns, in the order of [`audit_columns!`].
fn bind_row<'q>(q: AnyQuery<'q>, node: &'q str, r: &'q Chained<'_>) -> AnyQuery<'q> {
    let e = r.entry;
    q.bind(node)
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
        .bind(e.shadow_decision.map(super::Decision::as_str))
        .bind(e.response_digest.as_deref())
        .bind(i32::from(e.restricted))
        .bind(e.upstream_status.map(i32::from))
        .bind(i32::from(e.pseudonymised))
        .bind(e.phase.as_deref())
        .bind(e.attempt_id.as_deref())
        .bind(e.request_digest.as_deref())
        .bind((!e.written.is_empty()).then(|| json_list(&e.written)))
        .bind(e.trace_id.as_deref())
}

/// One record's columns, in the order of [`audit_columns!`], as its JSON row.
#[derive(serde::Serialize)]
struct Row<'a>(
    &'a str,
    i64,
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    &'a str,
    &'a str,
    String,
    String,
    &'a str,
    Option<&'a str>,
    u16,
    &'a str,
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    u8,
    Option<u16>,
    u8,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<String>,
    Option<&'a str>,
);

/// The batch's log rows as one JSON text (PostgreSQL).
fn log_json(node: &str, records: &[Chained<'_>]) -> Result<String, serde_json::Error> {
    let rows: Vec<Row<'_>> = records
        .iter()
        .map(|r| {
            let e = r.entry;
            Row(
                node,
                r.seq,
                &e.id,
                &e.ts,
                e.agency.as_deref(),
                e.certificate.as_deref(),
                e.officer.as_deref(),
                e.purpose.as_deref(),
                e.legal_basis.as_deref(),
                e.case_ref.as_deref(),
                e.consent_ref.as_deref(),
                e.token_id.as_deref(),
                e.provider.as_deref(),
                e.service.as_deref(),
                e.operation.as_deref(),
                &e.method,
                &e.path,
                json_list(&e.subjects),
                json_list(&e.fields),
                e.decision.as_str(),
                e.reason.as_deref(),
                e.status,
                &e.policy_version,
                &r.prev_hash,
                &r.hash,
                e.shadow_decision.map(super::Decision::as_str),
                e.response_digest.as_deref(),
                u8::from(e.restricted),
                e.upstream_status,
                u8::from(e.pseudonymised),
                e.phase.as_deref(),
                e.attempt_id.as_deref(),
                e.request_digest.as_deref(),
                (!e.written.is_empty()).then(|| json_list(&e.written)),
                e.trace_id.as_deref(),
            )
        })
        .collect();
    serde_json::to_string(&rows)
}

/// The batch's subject index rows: each record's distinct subjects.
fn subject_rows<'a>(records: &'a [Chained<'_>]) -> Vec<(i64, &'a str)> {
    records
        .iter()
        .flat_map(|r| {
            distinct(&r.entry.subjects)
                .into_iter()
                .map(move |s| (r.seq, s))
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_go_in_power_of_two_chunks_with_few_statement_texts() {
        let items: Vec<usize> = (0..300).collect();
        let sizes: Vec<(usize, usize)> = power_chunks(&items).map(|(k, c)| (k, c.len())).collect();
        assert_eq!(sizes, vec![(8, 256), (5, 32), (3, 8), (2, 4)]);
        assert_eq!(power_chunks(&items[..1]).count(), 1);
        assert_eq!(INSERT_LOG_SQLITE.len(), 9);
        assert!(INSERT_LOG_SQLITE[1].ends_with(&format!(
            "({0}),({0})",
            vec!["?"; AUDIT_COLUMN_COUNT].join(",")
        )));
        assert!(INSERT_SUBJECTS_SQLITE[0].ends_with("VALUES (?,?,?)"));
    }
}
