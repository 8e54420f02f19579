//! Verifying an export without the database: the JSON lines of
//! `karibche audit export` (and optionally the checkpoints written beside
//! them) are checked exactly as `audit verify` checks the live log, so a
//! third party holding only the files and the node's public key can confirm
//! them.
//!
//! An export of a whole chain starts at seq 1 (genesis); an export that
//! starts later is verified from its first record on, which is said in the
//! report. A filtered export (by agency, subject, …) has gaps by design and
//! fails verification: export whole chains (`--node`, time range at most).

use std::collections::BTreeMap;
use std::io::BufRead;

use super::checkpoint::Checkpoint;
use super::{AuditError, NodeReport, Record, VerifyReport, GENESIS_HASH};

/// Verifies exported records (and checkpoints, if given) offline.
pub fn verify_export(
    records: impl BufRead,
    checkpoints: Option<impl BufRead>,
    trusted: Option<&str>,
) -> Result<VerifyReport, AuditError> {
    let mut chains: BTreeMap<String, Vec<Record>> = BTreeMap::new();
    for line in records.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let record: Record = serde_json::from_str(&line)?;
        chains.entry(record.node.clone()).or_default().push(record);
    }
    let mut cps: BTreeMap<String, Vec<Checkpoint>> = BTreeMap::new();
    if let Some(cp_lines) = checkpoints {
        for line in cp_lines.lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let cp: Checkpoint = serde_json::from_str(&line)?;
            cps.entry(cp.node.clone()).or_default().push(cp);
        }
    }
    let mut nodes = Vec::new();
    for (node, mut chain) in chains {
        chain.sort_by_key(|r| r.seq);
        let node_cps = cps.remove(&node).unwrap_or_default();
        nodes.push(verify_chain(node, &chain, &node_cps, trusted)?);
    }
    Ok(VerifyReport { nodes })
}

fn verify_chain(
    node: String,
    chain: &[Record],
    cps: &[Checkpoint],
    trusted: Option<&str>,
) -> Result<NodeReport, AuditError> {
    let mut report = NodeReport {
        node,
        records: 0,
        broken_at: None,
        checkpoints: 0,
        first_seq: chain.first().map_or(1, |r| r.seq),
        unknown_outcomes: Vec::new(),
        rolled_back: None,
        tree_heads: 0,
    };
    let mut outcomes = super::chain::Outcomes::default();
    let Some(first) = chain.first() else {
        return Ok(report);
    };
    let mut expected_seq = first.seq;
    let mut prev = if first.seq == 1 {
        GENESIS_HASH.to_owned()
    } else {
        first.prev_hash.clone()
    };
    for r in chain {
        let broken = if r.seq != expected_seq {
            Some(format!(
                "record {expected_seq} is missing (next is {})",
                r.seq
            ))
        } else if r.prev_hash != prev {
            Some("prev_hash does not match the previous record".to_owned())
        } else if r.expected_hash()? != r.hash {
            Some("hash does not match the record's content".to_owned())
        } else {
            None
        };
        if let Some(why) = broken {
            report.broken_at = Some((expected_seq.min(r.seq), why));
            return Ok(report);
        }
        outcomes.see(r.seq, &r.entry);
        report.records += 1;
        expected_seq += 1;
        prev.clone_from(&r.hash);
    }
    report.unknown_outcomes = outcomes.unknown();
    let (lo, hi) = (first.seq, expected_seq - 1);
    for cp in cps {
        if let Err(why) = cp.verify(trusted) {
            report.broken_at = Some((cp.seq, format!("checkpoint at seq {}: {why}", cp.seq)));
            return Ok(report);
        }
        if cp.seq > hi {
            report.broken_at = Some((
                hi + 1,
                format!(
                    "records removed from the end: the export ends at seq {hi} but a signed checkpoint covers seq {}",
                    cp.seq
                ),
            ));
            return Ok(report);
        }
        if cp.seq >= lo {
            let at = &chain[(cp.seq - lo) as usize];
            if at.hash != cp.hash {
                report.broken_at = Some((
                    cp.seq,
                    format!("record {} differs from its signed checkpoint", cp.seq),
                ));
                return Ok(report);
            }
            report.checkpoints += 1;
        }
    }
    Ok(report)
}

/// Writes every checkpoint (all nodes, or one) as JSON lines; returns the count.
pub async fn export_checkpoints<W: std::io::Write>(
    store: &crate::store::Store,
    node: Option<&str>,
    out: &mut W,
) -> Result<u64, AuditError> {
    let nodes: Vec<String> = match node {
        Some(n) => vec![n.to_owned()],
        None => {
            sqlx::query_scalar("SELECT DISTINCT node FROM audit_checkpoints ORDER BY node")
                .fetch_all(store.pool())
                .await?
        }
    };
    let mut n = 0;
    for node in nodes {
        for cp in super::checkpoint::list(store, &node).await? {
            serde_json::to_writer(&mut *out, &cp)?;
            out.write_all(b"\n")?;
            n += 1;
        }
    }
    out.flush()?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{export, Filter};

    #[tokio::test]
    async fn an_export_verifies_offline_and_edits_are_named() {
        let (store, dir) = crate::testing::sqlite_store().await;
        let key = crate::audit::checkpoint::tests::write_checkpointed(
            &store,
            dir.path(),
            "n1",
            512,
            5,
            12,
        )
        .await;
        let mut records = Vec::new();
        export(&store, &Filter::default(), &mut records)
            .await
            .unwrap();
        let mut cps = Vec::new();
        assert!(export_checkpoints(&store, None, &mut cps).await.unwrap() >= 2);

        let ok = verify_export(&records[..], Some(&cps[..]), Some(key.public_hex())).unwrap();
        assert!(ok.intact(), "{ok}");
        assert_eq!(ok.nodes[0].records, 12);

        let text = String::from_utf8(records.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // Changed field.
        let changed = text.replacen("RF-3", "RF-4", 1);
        let r = verify_export(changed.as_bytes(), Some(&cps[..]), None).unwrap();
        assert_eq!(r.nodes[0].broken_at.as_ref().unwrap().0, 4);
        // Deleted record.
        let deleted = [&lines[..6], &lines[7..]].concat().join("\n");
        let r = verify_export(deleted.as_bytes(), Some(&cps[..]), None).unwrap();
        assert!(r.nodes[0].broken_at.as_ref().unwrap().1.contains("missing"));
        // Reordered: two records swap places (seq numbers kept, content swapped).
        let mut swapped: Vec<Record> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let (a, b) = (swapped[2].entry.clone(), swapped[3].entry.clone());
        swapped[2].entry = b;
        swapped[3].entry = a;
        let swapped: String = swapped
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect();
        let r = verify_export(swapped.as_bytes(), Some(&cps[..]), None).unwrap();
        assert_eq!(r.nodes[0].broken_at.as_ref().unwrap().0, 3);
        // Truncated tail: the last checkpoint (seq 12, at shutdown) shows it.
        let truncated = lines[..10].join("\n");
        let r = verify_export(truncated.as_bytes(), Some(&cps[..]), None).unwrap();
        assert!(r.nodes[0]
            .broken_at
            .as_ref()
            .unwrap()
            .1
            .contains("removed from the end"));
    }
}
