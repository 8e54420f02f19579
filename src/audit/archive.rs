//! Retention: the oldest records of each node's chain move to an archive
//! file and leave the database, and the chain stays verifiable across the cut.
//!
//! `karibche audit archive --before T --out FILE` takes, per node, the
//! longest prefix of the chain whose records are all older than `T`, up to a
//! signed checkpoint (signed at the cut with the node's audit key when the
//! command runs with that key, else the newest existing checkpoint inside the
//! prefix). It refuses to archive a chain that does not verify, writes the
//! records as JSON lines (the `audit export` format) to `FILE` and their
//! checkpoints, the cut's included, to `FILE.checkpoints`, syncs both, and
//! then in one transaction deletes the records, their subject index rows and
//! checkpoints, and stores the cut's checkpoint in `audit_archives`. The
//! verifier starts each chain from that checkpoint: the first remaining
//! record's `prev_hash` must equal its hash. `audit verify --file FILE
//! --checkpoints FILE.checkpoints` checks the archive itself offline.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::checkpoint::{AuditKey, Checkpoint};
use super::record::{normalise_ts, Row};
use super::AuditError;
use crate::store::Store;

/// Records read per query while writing an archive.
const PAGE: i64 = 1000;

/// What one node's chain lost to the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedNode {
    /// The node.
    pub node: String,
    /// First archived sequence number.
    pub first_seq: i64,
    /// Last archived sequence number: the cut.
    pub last_seq: i64,
    /// The signed checkpoint at the cut, kept in `audit_archives`.
    pub checkpoint: Checkpoint,
}

/// The outcome of `audit archive`.
#[derive(Debug, Clone, Default)]
pub struct ArchiveReport {
    /// Nodes whose oldest records were archived.
    pub archived: Vec<ArchivedNode>,
    /// Nodes with old records left in place, and why.
    pub skipped: Vec<(String, String)>,
    /// The records file, unless nothing was archived.
    pub file: Option<PathBuf>,
    /// The checkpoints file beside it.
    pub checkpoints_file: Option<PathBuf>,
}

impl std::fmt::Display for ArchiveReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for a in &self.archived {
            writeln!(
                f,
                "node {}: archived seq {}..={} ({} records), cut checkpoint {}",
                a.node,
                a.first_seq,
                a.last_seq,
                a.last_seq - a.first_seq + 1,
                a.checkpoint.hash
            )?;
        }
        for (node, why) in &self.skipped {
            writeln!(f, "node {node}: nothing archived: {why}")?;
        }
        if let (Some(file), Some(cps)) = (&self.file, &self.checkpoints_file) {
            writeln!(
                f,
                "archive: {} (checkpoints: {})",
                file.display(),
                cps.display()
            )?;
        }
        Ok(())
    }
}

/// A node's part of the archive, planned before anything is written.
struct Plan {
    node: String,
    first_seq: i64,
    last_seq: i64,
    checkpoint: Checkpoint,
}

/// Moves every node's records older than `before` (RFC 3339) to `out` (created, never overwritten).
///
/// `signer` is this node's name and audit key: its chain is cut exactly at
/// `before`; other nodes' chains at their newest checkpoint inside the prefix.
pub async fn archive(
    store: &Store,
    before: &str,
    out: &Path,
    signer: Option<(&str, &AuditKey)>,
) -> Result<ArchiveReport, AuditError> {
    let cut = normalise_ts(before)
        .ok_or_else(|| AuditError::InvalidFilter("--before is not an RFC 3339 time".into()))?;
    let nodes: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT node FROM audit_log ORDER BY node")
            .fetch_all(store.pool())
            .await?;
    let mut report = ArchiveReport::default();
    let mut plans = Vec::new();
    for node in nodes {
        match plan(store, &node, &cut, signer).await? {
            Ok(p) => plans.push(p),
            Err(why) => report.skipped.push((node, why)),
        }
    }
    if plans.is_empty() {
        return Ok(report);
    }

    let cps_path = checkpoints_path(out);
    let digest = write_files(store, &plans, out, &cps_path).await?;
    let file = out.display().to_string();
    let now = super::now_ts();
    // On its own connection: a failure anywhere closes it with the transaction (crate::store::WriteTx).
    let mut tx = store.begin_write().await?;
    for p in &plans {
        for sql in [
            "DELETE FROM audit_subjects WHERE node = $1 AND seq <= $2",
            "DELETE FROM audit_log WHERE node = $1 AND seq <= $2",
            "DELETE FROM audit_checkpoints WHERE node = $1 AND seq <= $2",
        ] {
            sqlx::query(sql)
                .bind(p.node.as_str())
                .bind(p.last_seq)
                .execute(tx.conn())
                .await?;
        }
        let cp = &p.checkpoint;
        sqlx::query(
            "INSERT INTO audit_archives (node, seq, hash, ts, public_key, signature, first_seq, \
             cut, file, file_sha256, archived_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(cp.node.as_str())
        .bind(cp.seq)
        .bind(cp.hash.as_str())
        .bind(cp.ts.as_str())
        .bind(cp.public_key.as_str())
        .bind(cp.signature.as_str())
        .bind(p.first_seq)
        .bind(cut.as_str())
        .bind(file.as_str())
        .bind(digest.as_str())
        .bind(now.as_str())
        .execute(tx.conn())
        .await?;
    }
    tx.commit().await?;
    tracing::info!(file = %out.display(), nodes = plans.len(), "audit records archived");
    report.archived = plans
        .into_iter()
        .map(|p| ArchivedNode {
            node: p.node,
            first_seq: p.first_seq,
            last_seq: p.last_seq,
            checkpoint: p.checkpoint,
        })
        .collect();
    report.file = Some(out.to_owned());
    report.checkpoints_file = Some(cps_path);
    Ok(report)
}

/// `FILE.checkpoints`: where the archive's checkpoints go.
pub fn checkpoints_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".checkpoints");
    PathBuf::from(name)
}

/// What of `node` can be archived, or why nothing.
async fn plan(
    store: &Store,
    node: &str,
    cut: &str,
    signer: Option<(&str, &AuditKey)>,
) -> Result<Result<Plan, String>, AuditError> {
    let first_seq = super::chain::archived_base(store, node)
        .await?
        .map_or(0, |cp| cp.seq)
        + 1;
    // The longest prefix of records all older than the cut (ts is taken at request
    // start, so a later seq may carry an earlier ts).
    let first_new: Option<i64> =
        sqlx::query_scalar("SELECT MIN(seq) FROM audit_log WHERE node = $1 AND ts >= $2")
            .bind(node)
            .bind(cut)
            .fetch_one(store.pool())
            .await?;
    let last_in_db: Option<i64> =
        sqlx::query_scalar("SELECT MAX(seq) FROM audit_log WHERE node = $1")
            .bind(node)
            .fetch_one(store.pool())
            .await?;
    let prefix_end = match (first_new, last_in_db) {
        (Some(s), _) => s - 1,
        (None, Some(s)) => s,
        (None, None) => return Ok(Err("no records".into())),
    };
    if prefix_end < first_seq {
        return Ok(Err("no records older than the cut".into()));
    }
    let checkpoint = match signer.filter(|(n, _)| *n == node) {
        Some((_, key)) => {
            let hash: Option<String> =
                sqlx::query_scalar("SELECT hash FROM audit_log WHERE node = $1 AND seq = $2")
                    .bind(node)
                    .bind(prefix_end)
                    .fetch_optional(store.pool())
                    .await?;
            let Some(hash) = hash else {
                return Ok(Err(format!("record {prefix_end} is missing")));
            };
            key.sign(node, prefix_end, &hash)
        }
        None => {
            let cp: Option<Checkpoint> = sqlx::query_as(
                "SELECT node, seq, hash, ts, public_key, signature FROM audit_checkpoints \
                 WHERE node = $1 AND seq >= $2 AND seq <= $3 ORDER BY seq DESC LIMIT 1",
            )
            .bind(node)
            .bind(first_seq)
            .bind(prefix_end)
            .fetch_optional(store.pool())
            .await?;
            match cp {
                Some(cp) => cp,
                None => {
                    return Ok(Err(
                        "no signed checkpoint inside the prefix; archive on that node (with its audit key)"
                            .into(),
                    ))
                }
            }
        }
    };
    // Archiving a tampered prefix would launder it: refuse unless the chain verifies.
    let report = super::chain::verify_from(store, Some(node), None, None).await?;
    if let Some(n) = report.nodes.first() {
        if let Some((seq, why)) = &n.broken_at {
            return Err(AuditError::ArchiveRefused(format!(
                "the chain of node {node} is broken at seq {seq} ({why}); nothing was archived"
            )));
        }
    }
    Ok(Ok(Plan {
        node: node.to_owned(),
        first_seq,
        last_seq: checkpoint.seq,
        checkpoint,
    }))
}

/// Writes and syncs the records and checkpoints files; returns the records file's hex SHA-256.
async fn write_files(
    store: &Store,
    plans: &[Plan],
    out: &Path,
    cps_path: &Path,
) -> Result<String, AuditError> {
    // Archives hold personal data: private, whatever the umask.
    let create = |p: &Path| crate::files::create_new_private(p);
    let mut records = std::io::BufWriter::new(create(out)?);
    let mut cps = std::io::BufWriter::new(create(cps_path)?);
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for p in plans {
        let mut after = p.first_seq - 1;
        while after < p.last_seq {
            let rows: Vec<Row> = sqlx::query_as(
                "SELECT * FROM audit_log WHERE node = $1 AND seq > $2 AND seq <= $3 \
                 ORDER BY seq LIMIT $4",
            )
            .bind(p.node.as_str())
            .bind(after)
            .bind(p.last_seq)
            .bind(PAGE)
            .fetch_all(store.pool())
            .await?;
            let Some(last) = rows.last().map(|r| r.place().1) else {
                break;
            };
            for row in rows {
                let (node, seq) = (row.place().0.to_owned(), row.place().1);
                let record = row.into_record().map_err(|reason| AuditError::Corrupt {
                    node,
                    seq,
                    reason,
                })?;
                let mut line = serde_json::to_vec(&record)?;
                line.push(b'\n');
                ctx.update(&line);
                records.write_all(&line)?;
            }
            after = last;
        }
        let mut listed: Vec<Checkpoint> = super::checkpoint::list(store, &p.node)
            .await?
            .into_iter()
            .filter(|cp| cp.seq >= p.first_seq && cp.seq < p.last_seq)
            .collect();
        listed.push(p.checkpoint.clone());
        for cp in listed {
            serde_json::to_writer(&mut cps, &cp)?;
            cps.write_all(b"\n")?;
        }
    }
    for w in [&mut records, &mut cps] {
        w.flush()?;
        w.get_ref().sync_all()?;
    }
    Ok(hex::encode(ctx.finish().as_ref()))
}
