//! `bench --check-audit`: every 2xx answer of a run is backed by its
//! committed 2xx record, checked node by node.
//!
//! Replicas share one database, and the others may serve other clients
//! during the run: counting every node's records would call that a mismatch.
//! So the check follows the answers: each 2xx answer's `X-Request-Id` is the
//! id of its audit record, which names the node that wrote it. No answer may
//! lack its record, and on each node that answered, the 2xx records must have
//! grown by exactly the answers it gave (more would be records of requests
//! the run did not see answered, or other traffic on that node). A write's
//! id names its attempt record; its 2xx record is the outcome that names it.

use std::collections::BTreeMap;
use std::fmt;

use crate::store::Store;

/// Ids looked up per query.
const IDS_PER_QUERY: usize = 500;
/// Missing ids named in the report.
const NAMED_MISSING: usize = 5;

/// Each node's count of 2xx records.
pub type NodeCounts = BTreeMap<String, i64>;

/// Counts each node's 2xx records (before and after a run).
pub async fn counts(store: &Store) -> Result<NodeCounts, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT node, COUNT(*) FROM audit_log WHERE status >= 200 AND status < 300 GROUP BY node",
    )
    .fetch_all(store.pool())
    .await?;
    Ok(rows.into_iter().collect())
}

/// One node that answered during the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeCheck {
    /// Its new 2xx records.
    pub records: i64,
    /// The 2xx answers it gave (found by their records).
    pub answers: i64,
}

/// What `--check-audit` found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditCheck {
    /// Each node that answered, by name.
    pub nodes: BTreeMap<String, NodeCheck>,
    /// 2xx answers whose request id has no 2xx record (ids).
    pub missing: Vec<String>,
    /// 2xx answers without a readable request id.
    pub unidentified: u64,
}

impl AuditCheck {
    /// Whether every answer has its record and every node's growth matches its answers.
    pub fn ok(&self) -> bool {
        self.missing.is_empty()
            && self.unidentified == 0
            && self.nodes.values().all(|n| n.records == n.answers)
    }
}

/// Checks the 2xx answers of a run (`answered` of them, `ids` those with a request id)
/// against the records written since `before`.
pub async fn check(
    store: &Store,
    before: &NodeCounts,
    ids: &[u128],
    answered: u64,
) -> Result<AuditCheck, sqlx::Error> {
    let mut found: BTreeMap<String, String> = BTreeMap::new();
    for chunk in ids.chunks(IDS_PER_QUERY) {
        let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        // A write's request id names its attempt; the 2xx is on its outcome, which names the attempt.
        let list = placeholders.join(",");
        let sql = format!(
            "SELECT COALESCE(attempt_id, id), node FROM audit_log \
             WHERE status >= 200 AND status < 300 AND (id IN ({list}) OR attempt_id IN ({list}))"
        );
        let mut q = sqlx::query_as::<_, (String, String)>(sqlx::AssertSqlSafe(sql));
        for id in chunk {
            q = q.bind(uuid::Uuid::from_u128(*id).to_string());
        }
        found.extend(q.fetch_all(store.pool()).await?);
    }
    let mut check = AuditCheck {
        unidentified: answered.saturating_sub(ids.len() as u64),
        ..AuditCheck::default()
    };
    for id in ids {
        let id = uuid::Uuid::from_u128(*id).to_string();
        match found.get(&id) {
            Some(node) => check.nodes.entry(node.clone()).or_default().answers += 1,
            None => check.missing.push(id),
        }
    }
    let after = counts(store).await?;
    for (node, n) in &mut check.nodes {
        n.records = after.get(node).copied().unwrap_or(0) - before.get(node).copied().unwrap_or(0);
    }
    Ok(check)
}

impl fmt::Display for AuditCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (node, n) in &self.nodes {
            if n.records == n.answers {
                writeln!(
                    f,
                    "audit      node {node}: {} new 2xx records = {} 2xx answers",
                    n.records, n.answers
                )?;
            } else {
                writeln!(
                    f,
                    "audit      MISMATCH node {node}: {} new 2xx records, {} 2xx answers",
                    n.records, n.answers
                )?;
            }
        }
        if !self.missing.is_empty() {
            let named: Vec<&str> = self
                .missing
                .iter()
                .take(NAMED_MISSING)
                .map(String::as_str)
                .collect();
            writeln!(
                f,
                "audit      MISMATCH: {} 2xx answers without their audit record (e.g. {})",
                self.missing.len(),
                named.join(", ")
            )?;
        }
        if self.unidentified > 0 {
            writeln!(
                f,
                "audit      MISMATCH: {} 2xx answers without a request id",
                self.unidentified
            )?;
        }
        if self.nodes.is_empty() && self.missing.is_empty() && self.unidentified == 0 {
            writeln!(f, "audit      no 2xx answers to check")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditConfig, AuditLog, Entry};

    fn entry(status: u16) -> Entry {
        Entry {
            id: uuid::Uuid::now_v7().to_string(),
            ts: crate::audit::now_ts(),
            method: "GET".into(),
            path: "/v1/registry/persons/RF-0000001".into(),
            decision: "allow".into(),
            status,
            policy_version: "v1".into(),
            ..Entry::default()
        }
    }

    /// Two nodes write; only the answers of one are checked, and the other's traffic is no mismatch.
    #[tokio::test]
    async fn each_node_that_answered_is_checked_and_others_are_left_alone() {
        let (store, _dir) = crate::testing::sqlite_store().await;
        let (a, wa) = AuditLog::start(store.clone(), AuditConfig::new("a"))
            .await
            .unwrap();
        let (b, wb) = AuditLog::start(store.clone(), AuditConfig::new("b"))
            .await
            .unwrap();
        let before = counts(&store).await.unwrap();
        let mut ids = Vec::new();
        for _ in 0..3 {
            let e = entry(200);
            ids.push(uuid::Uuid::parse_str(&e.id).unwrap().as_u128());
            a.append(e).await.unwrap();
            b.append(entry(200)).await.unwrap();
        }
        let c = check(&store, &before, &ids, 3).await.unwrap();
        assert!(c.ok(), "{c}");
        assert_eq!(c.nodes.len(), 1, "{c}");
        assert_eq!(
            c.nodes["a"],
            NodeCheck {
                records: 3,
                answers: 3
            }
        );

        // An answer without its record, one without an id, a record without its answer.
        let unknown = uuid::Uuid::now_v7().as_u128();
        a.append(entry(200)).await.unwrap();
        let c = check(&store, &before, &[ids[0], unknown], 3).await.unwrap();
        assert!(!c.ok());
        assert_eq!(c.missing.len(), 1);
        assert_eq!(c.unidentified, 1);
        assert_eq!(
            c.nodes["a"],
            NodeCheck {
                records: 4,
                answers: 1
            }
        );
        let text = c.to_string();
        assert!(text.contains("MISMATCH node a"), "{text}");
        assert!(text.contains("without their audit record"), "{text}");
        drop((a, b));
        wa.finish().await;
        wb.finish().await;
    }
}
