//! Verifying the chains: every hash recomputed, every link and sequence
//! number checked, and the subject index compared with the records, a page
//! at a time so that a long log never has to fit in memory.
//!
//! What a chain alone cannot show is a cut at its end: deleting a node's
//! newest records leaves a shorter, intact chain. Signed checkpoints (the
//! last `seq` and `hash` kept elsewhere) close that gap.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::merkle::{CompactRange, Hash};

use super::checkpoint::Checkpoint;
use super::record::{Row, GENESIS_HASH};
use super::writer::distinct;
use super::AuditError;
use crate::store::Store;

/// Records read per query while verifying.
const PAGE: i64 = 1000;

/// The outcome of verifying one or all nodes' chains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// One report per node, ordered by node name.
    pub nodes: Vec<NodeReport>,
}

/// The outcome of verifying one node's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReport {
    /// The node.
    pub node: String,
    /// Records read (up to the break, if any).
    pub records: i64,
    /// The first sequence number at which the chain fails, and why.
    pub broken_at: Option<(i64, String)>,
    /// Signed checkpoints checked against the chain.
    pub checkpoints: usize,
    /// The first sequence number verified (1 unless `--from` or archived records moved the start).
    pub first_seq: i64,
    /// Attempts of changes (seq, id) whose outcome the chain does not hold: the
    /// node stopped between the change and its record, so whether the change
    /// was made is unknown. Reported, not tampering.
    pub unknown_outcomes: Vec<(i64, String)>,
    /// The log is shorter than, or differs from, a checkpoint a witness cosigned:
    /// records were cut off or the database was restored from an older copy. Why, naming the range.
    pub rolled_back: Option<String>,
    /// Signed Merkle tree heads whose root the records still give.
    pub tree_heads: usize,
}

/// Attempts seen while reading a chain, until their outcome comes.
#[derive(Debug, Default)]
pub(crate) struct Outcomes {
    pending: std::collections::HashMap<String, i64>,
}

impl Outcomes {
    /// Notes an attempt, or the outcome that settles one.
    pub(crate) fn see(&mut self, seq: i64, entry: &super::Entry) {
        if entry.phase.as_deref() == Some(super::PHASE_ATTEMPT) {
            self.pending.insert(entry.id.clone(), seq);
        } else if let Some(attempt) = &entry.attempt_id {
            self.pending.remove(attempt);
        }
    }

    /// The attempts still without an outcome, oldest first.
    pub(crate) fn unknown(self) -> Vec<(i64, String)> {
        let mut out: Vec<(i64, String)> = self
            .pending
            .into_iter()
            .map(|(id, seq)| (seq, id))
            .collect();
        out.sort_unstable();
        out
    }
}

impl VerifyReport {
    /// Whether every chain verified.
    pub fn intact(&self) -> bool {
        self.nodes
            .iter()
            .all(|n| n.broken_at.is_none() && n.rolled_back.is_none())
    }

    /// Whether some chain is shorter than or differs from a witnessed checkpoint.
    pub fn rolled_back(&self) -> bool {
        self.nodes.iter().any(|n| n.rolled_back.is_some())
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for n in &self.nodes {
            writeln!(f, "{n}")?;
        }
        Ok(())
    }
}

impl fmt::Display for NodeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(why) = &self.rolled_back {
            write!(f, "node {}: TRUNCATED OR ROLLED BACK: {why}", self.node)?;
            if let Some((seq, reason)) = &self.broken_at {
                write!(f, "; also broken at seq {seq}: {reason}")?;
            }
            return Ok(());
        }
        match &self.broken_at {
            None => {
                write!(f, "node {}: {} records", self.node, self.records)?;
                if self.first_seq > 1 {
                    write!(f, " from seq {}", self.first_seq)?;
                }
                write!(f, ", chain intact")?;
                if self.checkpoints > 0 {
                    write!(f, ", {} signed checkpoint(s) verified", self.checkpoints)?;
                }
                if self.tree_heads > 0 {
                    write!(f, ", {} signed tree head(s) verified", self.tree_heads)?;
                }
                if !self.unknown_outcomes.is_empty() {
                    let listed: Vec<String> = self
                        .unknown_outcomes
                        .iter()
                        .map(|(seq, id)| format!("seq {seq} ({id})"))
                        .collect();
                    write!(
                        f,
                        "; {} attempt(s) with outcome unknown (a change may or may not have been made): {}",
                        self.unknown_outcomes.len(),
                        listed.join(", ")
                    )?;
                }
                Ok(())
            }
            Some((seq, reason)) => write!(f, "node {}: broken at seq {seq}: {reason}", self.node),
        }
    }
}

/// Verifies the chain of `node`, or of every node in the log.
pub async fn verify(store: &Store, node: Option<&str>) -> Result<VerifyReport, AuditError> {
    verify_with_key(store, node, None).await
}

/// Verifies chains and their checkpoints; with `trusted` (hex Ed25519 public
/// key) every checkpoint must be signed by that key.
pub async fn verify_with_key(
    store: &Store,
    node: Option<&str>,
    trusted: Option<&str>,
) -> Result<VerifyReport, AuditError> {
    verify_from(store, node, trusted, None).await
}

/// [`verify_with_key`] from sequence number `from` on (`audit verify --from`):
/// the `prev_hash` of the record at `from` is taken as given, and checkpoints
/// below it are not checked. Without `from`, a chain whose oldest records
/// were archived is verified from the archive's signed checkpoint on.
pub async fn verify_from(
    store: &Store,
    node: Option<&str>,
    trusted: Option<&str>,
    from: Option<i64>,
) -> Result<VerifyReport, AuditError> {
    verify_witnessed(store, node, trusted, from, &[]).await
}

/// [`verify_from`], and every chain checked against `witnessed`: signed
/// checkpoints (C2SP notes, e.g. the latest a witness cosigned) kept outside
/// the database. A chain shorter than one, or whose tree at its size has
/// another root, is reported as truncated or rolled back.
pub async fn verify_witnessed(
    store: &Store,
    node: Option<&str>,
    trusted: Option<&str>,
    from: Option<i64>,
    witnessed: &[String],
) -> Result<VerifyReport, AuditError> {
    let nodes: Vec<String> =
        match node {
            Some(node) => vec![node.to_owned()],
            None => sqlx::query_scalar(
                "SELECT node FROM audit_log UNION SELECT node FROM audit_archives ORDER BY node",
            )
            .fetch_all(store.pool())
            .await?,
        };
    let mut reports = Vec::with_capacity(nodes.len());
    for node in nodes {
        let heads = super::tree::heads(store, &node).await?;
        let origin = heads
            .last()
            .and_then(|h| super::note::Note::parse(&h.note))
            .and_then(|n| super::note::parse_checkpoint_text(&n.text))
            .map_or_else(|| super::tree::default_origin(&node), |(o, _, _)| o);
        let outside: Vec<(u64, Hash, String)> = witnessed
            .iter()
            .filter_map(|w| {
                let n = super::note::Note::parse(w)?;
                let (o, size, root) = super::note::parse_checkpoint_text(&n.text)?;
                (o == origin).then_some((size, root, w.clone()))
            })
            .collect();
        let want: BTreeSet<u64> = heads
            .iter()
            .map(|h| h.size as u64)
            .chain(outside.iter().map(|w| w.0))
            .collect();
        let (mut report, last, roots) = verify_node(store, node, trusted, from, &want).await?;
        if report.broken_at.is_none() {
            check_checkpoints(store, &mut report, last, trusted).await?;
        }
        if let Some(roots) = roots {
            let key = node_key(store, &report.node, trusted).await?;
            check_tree(
                &mut report,
                last,
                &roots,
                key.as_deref(),
                &origin,
                &heads,
                &outside,
            );
        }
        reports.push(report);
    }
    Ok(VerifyReport { nodes: reports })
}

/// The checkpoint of the newest archive of `node` (`crate::audit::archive`): its chain goes on from there.
pub(crate) async fn archived_base(
    store: &Store,
    node: &str,
) -> Result<Option<Checkpoint>, AuditError> {
    Ok(sqlx::query_as(
        "SELECT node, seq, hash, ts, public_key, signature FROM audit_archives \
         WHERE node = $1 ORDER BY seq DESC LIMIT 1",
    )
    .bind(node)
    .fetch_optional(store.pool())
    .await?)
}

/// Verifies one chain; returns the report and the last sequence number read.
async fn verify_node(
    store: &Store,
    node: String,
    trusted: Option<&str>,
    from: Option<i64>,
    want: &BTreeSet<u64>,
) -> Result<(NodeReport, i64, Option<BTreeMap<u64, Hash>>), AuditError> {
    // Records moved to an archive: the chain goes on from its signed checkpoint.
    let archived = archived_base(store, &node).await?;
    let (base_seq, base_hash) = match &archived {
        Some(cp) => (cp.seq, cp.hash.clone()),
        None => (0, GENESIS_HASH.to_owned()),
    };
    let (mut expected_seq, mut prev_hash) = match from {
        Some(f) if f > base_seq + 1 => (f, None),
        _ => (base_seq + 1, Some(base_hash)),
    };
    let first_seq = expected_seq;
    let mut records = 0_i64;
    // Without --from, read from the very bottom, so rows below the start are seen (and refused) too.
    let mut after = if from.is_some() {
        expected_seq - 1
    } else {
        i64::MIN
    };
    let broken = |records, seq, reason: String| NodeReport {
        node: node.clone(),
        records,
        broken_at: Some((seq, reason)),
        checkpoints: 0,
        first_seq,
        unknown_outcomes: Vec::new(),
        rolled_back: None,
        tree_heads: 0,
    };
    let mut outcomes = Outcomes::default();
    // The Merkle tree is rebuilt from the records themselves when the whole chain is read.
    let mut tree = (first_seq == 1 && prev_hash.is_some()).then(CompactRange::default);
    let mut roots = BTreeMap::new();
    if let Some(cp) = &archived {
        if let Err(why) = cp.verify(trusted) {
            return Ok((
                broken(
                    0,
                    cp.seq,
                    format!("archive checkpoint at seq {}: {why}", cp.seq),
                ),
                base_seq,
                None,
            ));
        }
    }
    loop {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT * FROM audit_log WHERE node = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(node.as_str())
        .bind(after)
        .bind(PAGE)
        .fetch_all(store.pool())
        .await?;
        let Some(last) = rows.last().map(|r| r.place().1) else {
            break;
        };
        let first = rows.first().map_or(last, |r| r.place().1);
        let index: Vec<(i64, String)> = sqlx::query_as(
            "SELECT seq, subject FROM audit_subjects WHERE node = $1 AND seq >= $2 AND seq <= $3 \
             ORDER BY seq, subject",
        )
        .bind(node.as_str())
        .bind(first)
        .bind(last)
        .fetch_all(store.pool())
        .await?;
        let mut index = index.into_iter().peekable();

        let full = rows.len() as i64 == PAGE;
        for row in rows {
            let seq = row.place().1;
            if seq < expected_seq {
                let why = if archived.as_ref().is_some_and(|cp| seq <= cp.seq) {
                    format!("unexpected seq {seq}: records up to {base_seq} were archived")
                } else {
                    format!("unexpected seq {seq} (chains start at 1)")
                };
                return Ok((broken(records, seq, why), expected_seq - 1, None));
            }
            if seq > expected_seq {
                let why = if records == 0 && archived.is_some() && from.is_none() {
                    format!(
                        "record {expected_seq} is missing (next is {seq}; the archive ends at {base_seq})"
                    )
                } else {
                    format!("record {expected_seq} is missing (next is {seq})")
                };
                return Ok((broken(records, expected_seq, why), expected_seq - 1, None));
            }
            let record = match row.into_record() {
                Ok(r) => r,
                Err(reason) => return Ok((broken(records, seq, reason), expected_seq - 1, None)),
            };
            if prev_hash.as_ref().is_some_and(|p| *p != record.prev_hash) {
                let why = if records == 0 && archived.is_some() {
                    "prev_hash does not match the archived checkpoint"
                } else {
                    "prev_hash does not match the previous record"
                };
                return Ok((broken(records, seq, why.into()), expected_seq - 1, None));
            }
            if record.expected_hash()? != record.hash {
                return Ok((
                    broken(
                        records,
                        seq,
                        "hash does not match the record's content".into(),
                    ),
                    expected_seq - 1,
                    None,
                ));
            }
            let mut indexed = Vec::new();
            while let Some((_, subject)) = index.next_if(|(s, _)| *s == seq) {
                indexed.push(subject);
            }
            if indexed
                .iter()
                .map(String::as_str)
                .ne(distinct(&record.entry.subjects))
            {
                return Ok((
                    broken(
                        records,
                        seq,
                        "subject index does not match the record".into(),
                    ),
                    expected_seq - 1,
                    None,
                ));
            }
            outcomes.see(seq, &record.entry);
            if let Some(t) = tree.as_mut() {
                match super::tree::leaf_of(&record.hash) {
                    Some(leaf) => {
                        t.push(leaf);
                        if want.contains(&t.size) {
                            roots.insert(t.size, t.root());
                        }
                    }
                    None => {
                        return Ok((
                            broken(records, seq, "hash is not 64 hex digits".into()),
                            expected_seq - 1,
                            None,
                        ))
                    }
                }
            }
            records += 1;
            expected_seq += 1;
            prev_hash = Some(record.hash);
        }
        if let Some((seq, _)) = index.next() {
            return Ok((
                broken(
                    records,
                    seq,
                    "subject index lists a record that does not exist".into(),
                ),
                expected_seq - 1,
                None,
            ));
        }
        after = last;
        if !full {
            break;
        }
    }
    let last_seq = expected_seq - 1;
    // Index rows outside the chain would put phantom accesses in a subject's report.
    let below = if from.is_some() { i64::MIN } else { first_seq };
    let stray: Option<i64> = sqlx::query_scalar(
        "SELECT MIN(seq) FROM audit_subjects WHERE node = $1 AND (seq < $2 OR seq > $3)",
    )
    .bind(node.as_str())
    .bind(below)
    .bind(last_seq)
    .fetch_one(store.pool())
    .await?;
    if let Some(seq) = stray {
        return Ok((
            broken(
                records,
                seq,
                "subject index lists a record that does not exist".into(),
            ),
            last_seq,
            None,
        ));
    }
    Ok((
        NodeReport {
            node: node.clone(),
            records,
            broken_at: None,
            checkpoints: 0,
            first_seq,
            unknown_outcomes: outcomes.unknown(),
            rolled_back: None,
            tree_heads: 0,
        },
        last_seq,
        tree.map(|_| roots),
    ))
}

/// Every checkpoint at or after the first verified record must verify and
/// name a record still in the (intact) chain, which ends at `last_seq`.
async fn check_checkpoints(
    store: &Store,
    report: &mut NodeReport,
    last_seq: i64,
    trusted: Option<&str>,
) -> Result<(), AuditError> {
    for cp in super::checkpoint::list(store, &report.node).await? {
        if cp.seq < report.first_seq {
            continue;
        }
        if let Err(why) = cp.verify(trusted) {
            report.broken_at = Some((cp.seq, format!("checkpoint at seq {}: {why}", cp.seq)));
            return Ok(());
        }
        if cp.seq > last_seq {
            report.broken_at = Some((
                last_seq + 1,
                format!(
                    "records removed from the end: the chain ends at seq {last_seq} but a signed checkpoint covers seq {}",
                    cp.seq
                ),
            ));
            return Ok(());
        }
        let hash: Option<String> =
            sqlx::query_scalar("SELECT hash FROM audit_log WHERE node = $1 AND seq = $2")
                .bind(report.node.as_str())
                .bind(cp.seq)
                .fetch_optional(store.pool())
                .await?;
        if hash.as_deref() != Some(cp.hash.as_str()) {
            report.broken_at = Some((
                cp.seq,
                format!(
                    "the chain was rewritten: record {} differs from its signed checkpoint",
                    cp.seq
                ),
            ));
            return Ok(());
        }
        report.checkpoints += 1;
    }
    Ok(())
}

/// The key a node's tree heads are checked against: `trusted`, else the key
/// its newest chain checkpoint names.
async fn node_key(
    store: &Store,
    node: &str,
    trusted: Option<&str>,
) -> Result<Option<Vec<u8>>, AuditError> {
    let hex_key = match trusted {
        Some(t) => Some(t.to_owned()),
        None => sqlx::query_scalar(
            "SELECT public_key FROM audit_checkpoints WHERE node = $1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(node)
        .fetch_optional(store.pool())
        .await?,
    };
    Ok(hex_key.and_then(|k| hex::decode(k).ok()))
}

/// Every stored tree head must be signed and have the root the records give;
/// every checkpoint kept outside the database (`outside`) must be signed, no
/// larger than the chain and have the root the chain gives at its size.
fn check_tree(
    report: &mut NodeReport,
    last_seq: i64,
    roots: &BTreeMap<u64, Hash>,
    key: Option<&[u8]>,
    origin: &str,
    heads: &[super::tree::TreeHead],
    outside: &[(u64, Hash, String)],
) {
    let signed = |note: &str| {
        let Some(n) = super::note::Note::parse(note) else {
            return false;
        };
        key.is_some_and(|k| {
            n.signatures
                .iter()
                .any(|l| super::note::verify(origin, k, &n.text, l))
        })
    };
    if report.broken_at.is_none() {
        for h in heads {
            let size = h.size as u64;
            let root = super::merkle::from_hex(&h.root);
            let texts = super::note::Note::parse(&h.note)
                .and_then(|n| super::note::parse_checkpoint_text(&n.text));
            let why = if !signed(&h.note) || texts.map(|t| (t.1, Some(t.2))) != Some((size, root)) {
                Some(format!(
                    "tree head of size {size}: signature does not verify"
                ))
            } else if h.size > last_seq {
                Some(format!("records removed from the end: the chain ends at seq {last_seq} but a signed tree head covers {size} records"))
            } else if roots.get(&size).copied() != root {
                Some(format!("the chain was rewritten: the first {size} records no longer give the root of their signed tree head"))
            } else {
                None
            };
            if let Some(why) = why {
                report.broken_at = Some(((size as i64).min(last_seq + 1), why));
                break;
            }
            report.tree_heads += 1;
        }
    }
    // The newest witnessed checkpoint decides; an unsigned one proves nothing.
    let Some((size, root, note)) = outside.iter().max_by_key(|w| w.0) else {
        return;
    };
    if !signed(note) {
        report.broken_at.get_or_insert((
            0,
            format!("the witnessed checkpoint of size {size} is not signed by this node's key"),
        ));
        return;
    }
    let size = *size;
    if size as i64 > last_seq {
        report.rolled_back = Some(format!(
            "records {}..={size} are missing: a witness cosigned a tree of {size} records but the log holds {last_seq}",
            last_seq + 1
        ));
    } else if roots.get(&size) != Some(root) {
        report.rolled_back = Some(format!(
            "records 1..={size} are not the ones a witness cosigned (the tree of the first {size} records has another root): the log was restored from an older copy or forked, and records up to {size} were replaced"
        ));
    }
}
