//! The stored Merkle tree of a node ([`super::merkle`]): tree heads (signed
//! C2SP checkpoints with the tree's right edge), the stored hashes of large
//! complete subtrees, and the inclusion and consistency proofs read from them.
//!
//! The writer extends the tree only when it signs a checkpoint, inside the
//! same transaction: it reads the chain hashes committed since the last head
//! (at most `audit.checkpoint_every` of them, plus one batch), appends them to
//! the stored right edge and stores the subtrees they complete. A request
//! never waits for more than that.

use sqlx::AnyConnection;

use super::checkpoint::AuditKey;
use super::merkle::{self, CompactRange, Hash, Subtree, STORED_LEVEL};
use super::note;
use super::AuditError;
use crate::store::Store;

/// The origin line of a node's checkpoints unless `audit.origin` says otherwise.
pub fn default_origin(node: &str) -> String {
    format!("karibche/audit/{node}")
}

/// A signed tree head as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TreeHead {
    /// The node whose records the tree holds.
    pub node: String,
    /// Leaves (records) in the tree.
    pub size: i64,
    /// The root hash, hex.
    pub root: String,
    /// The right edge ([`CompactRange::edge_text`]).
    pub edge: String,
    /// The C2SP checkpoint signed by the node (a signed note).
    pub note: String,
    /// When it was signed.
    pub ts: String,
}

impl TreeHead {
    /// The stored right edge.
    pub fn range(&self) -> Option<CompactRange> {
        CompactRange::from_text(u64::try_from(self.size).ok()?, &self.edge)
    }
}

/// The leaf hash of a record from its (hex) chain hash.
pub fn leaf_of(chain_hash: &str) -> Option<Hash> {
    merkle::from_hex(chain_hash).map(|h| merkle::leaf_hash(&h))
}

/// The newest tree head of `node`, on the caller's connection.
pub(crate) async fn latest_on(
    conn: &mut AnyConnection,
    node: &str,
) -> Result<Option<TreeHead>, sqlx::Error> {
    sqlx::query_as(
        "SELECT node, size, root, edge, note, ts FROM audit_tree_heads WHERE node = $1 \
         ORDER BY size DESC LIMIT 1",
    )
    .bind(node)
    .fetch_optional(conn)
    .await
}

/// The newest tree head of `node`.
pub async fn latest(store: &Store, node: &str) -> Result<Option<TreeHead>, AuditError> {
    let mut conn = store.pool().acquire().await?;
    Ok(latest_on(&mut conn, node).await?)
}

/// Every tree head of `node`, oldest first.
pub async fn heads(store: &Store, node: &str) -> Result<Vec<TreeHead>, AuditError> {
    Ok(sqlx::query_as(
        "SELECT node, size, root, edge, note, ts FROM audit_tree_heads WHERE node = $1 ORDER BY size",
    )
    .bind(node)
    .fetch_all(store.pool())
    .await?)
}

/// The smallest tree head covering leaf `index`.
pub async fn head_covering(
    store: &Store,
    node: &str,
    index: u64,
) -> Result<Option<TreeHead>, AuditError> {
    Ok(sqlx::query_as(
        "SELECT node, size, root, edge, note, ts FROM audit_tree_heads WHERE node = $1 AND size > $2 \
         ORDER BY size LIMIT 1",
    )
    .bind(node)
    .bind(index as i64)
    .fetch_optional(store.pool())
    .await?)
}

/// Extends `node`'s tree to its record `seq` and stores a head signed with
/// `key` under `origin`, on the writer's transaction. `from` is the tree as
/// the writer last left it (`None`: read the newest head back). Returns the
/// new tree, or `None` when the tree cannot be extended (its records were
/// archived before it existed, or its stored edge is unreadable): then no
/// head is written and the chain checkpoint alone covers the records.
pub(crate) async fn advance(
    conn: &mut AnyConnection,
    node: &str,
    origin: &str,
    key: &AuditKey,
    from: Option<CompactRange>,
    seq: i64,
    known: &[(i64, &str)],
) -> Result<Option<CompactRange>, sqlx::Error> {
    let mut tree = match from {
        Some(t) => t,
        None => match latest_on(conn, node).await? {
            Some(head) => match head.range() {
                Some(t) => t,
                None => return Ok(None),
            },
            None => CompactRange::default(),
        },
    };
    // The writer knows the hashes it committed since the last head; read back only
    // when it does not (after a restart or a failed transaction).
    let first = tree.size as i64 + 1;
    let from_writer = known.first().is_some_and(|(s, _)| *s == first)
        && known.last().is_some_and(|(s, _)| *s == seq)
        && known.len() as i64 == seq - first + 1;
    let read: Vec<(i64, String)> = if from_writer {
        Vec::new()
    } else {
        sqlx::query_as(
            "SELECT seq, hash FROM audit_log WHERE node = $1 AND seq > $2 AND seq <= $3 ORDER BY seq",
        )
        .bind(node)
        .bind(tree.size as i64)
        .bind(seq)
        .fetch_all(&mut *conn)
        .await?
    };
    let hashes: Vec<(i64, &str)> = if from_writer {
        known.to_vec()
    } else {
        read.iter().map(|(s, h)| (*s, h.as_str())).collect()
    };
    let mut stored: Vec<(Subtree, Hash)> = Vec::new();
    for (s, hash) in hashes {
        // Archived records are not in the table: the tree cannot be extended past them.
        let (true, Some(leaf)) = (s == tree.size as i64 + 1, leaf_of(hash)) else {
            return Ok(None);
        };
        stored.extend(
            tree.push(leaf)
                .into_iter()
                .filter(|(t, _)| t.level >= STORED_LEVEL),
        );
    }
    if !stored.is_empty() {
        // All of them in one statement, as one JSON text of `[level, index, hash]`.
        let rows: Vec<(u32, u64, String)> = stored
            .iter()
            .map(|(t, h)| (t.level, t.index, hex::encode(h)))
            .collect();
        let rows = serde_json::to_string(&rows).map_err(|e| sqlx::Error::Encode(e.into()))?;
        let sql = match conn.backend_name() {
            "PostgreSQL" => {
                "INSERT INTO audit_tree_nodes (node, level, idx, hash) \
                 SELECT $1, (e ->> 0)::integer, (e ->> 1)::bigint, e ->> 2 \
                 FROM jsonb_array_elements($2::jsonb) AS e ON CONFLICT (node, level, idx) DO NOTHING"
            }
            // `WHERE true` tells SQLite's parser the ON CONFLICT is the upsert's.
            _ => {
                "INSERT INTO audit_tree_nodes (node, level, idx, hash) \
                 SELECT $1, value ->> 0, value ->> 1, value ->> 2 FROM jsonb_each($2) WHERE true \
                 ON CONFLICT (node, level, idx) DO NOTHING"
            }
        };
        sqlx::query(sql)
            .bind(node)
            .bind(rows)
            .execute(&mut *conn)
            .await?;
    }
    let root = tree.root();
    let text = note::checkpoint_text(origin, tree.size, &root);
    let signed = note::Note {
        signatures: vec![note::sign(key, origin, &text)],
        text,
    };
    sqlx::query(
        "INSERT INTO audit_tree_heads (node, size, root, edge, note, ts) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (node, size) DO NOTHING",
    )
    .bind(node)
    .bind(tree.size as i64)
    .bind(hex::encode(root))
    .bind(tree.edge_text())
    .bind(signed.render())
    .bind(super::now_ts())
    .execute(&mut *conn)
    .await?;
    Ok(Some(tree))
}

/// Reads the hashes of ranges of `node`'s tree from the database.
pub struct TreeReader<'a> {
    store: &'a Store,
    node: &'a str,
}

impl<'a> TreeReader<'a> {
    /// A reader of `node`'s stored tree.
    pub fn new(store: &'a Store, node: &'a str) -> Self {
        TreeReader { store, node }
    }

    /// The hash of one complete subtree: stored if large, else from its leaves.
    async fn subtree(&self, t: Subtree) -> Result<Hash, AuditError> {
        let bad = |reason: String| AuditError::Corrupt {
            node: self.node.to_owned(),
            seq: ((t.index << t.level) + 1) as i64,
            reason,
        };
        if t.level >= STORED_LEVEL {
            let hash: Option<String> = sqlx::query_scalar(
                "SELECT hash FROM audit_tree_nodes WHERE node = $1 AND level = $2 AND idx = $3",
            )
            .bind(self.node)
            .bind(t.level as i32)
            .bind(t.index as i64)
            .fetch_optional(self.store.pool())
            .await?;
            return hash
                .as_deref()
                .and_then(merkle::from_hex)
                .ok_or_else(|| bad(format!("tree node {}/{} is missing", t.level, t.index)));
        }
        let first = (t.index << t.level) as i64 + 1;
        let count = 1_i64 << t.level;
        let hashes: Vec<String> = sqlx::query_scalar(
            "SELECT hash FROM audit_log WHERE node = $1 AND seq >= $2 AND seq < $3 ORDER BY seq",
        )
        .bind(self.node)
        .bind(first)
        .bind(first + count)
        .fetch_all(self.store.pool())
        .await?;
        if hashes.len() as i64 != count {
            return Err(bad("leaves are missing (archived?)".into()));
        }
        let mut range = CompactRange::default();
        for h in hashes {
            range.push(leaf_of(&h).ok_or_else(|| bad("chain hash is not hex".into()))?);
        }
        Ok(range.root())
    }

    /// The hash of leaves `[a, b)` of a range a proof names.
    pub async fn range(&self, a: u64, b: u64) -> Result<Hash, AuditError> {
        let mut hashes = Vec::new();
        for t in merkle::blocks(a, b) {
            hashes.push(self.subtree(t).await?);
        }
        Ok(merkle::fold_blocks(&hashes))
    }

    /// The inclusion proof of leaf `index` in the tree of `size` leaves.
    pub async fn inclusion(&self, index: u64, size: u64) -> Result<Vec<Hash>, AuditError> {
        let mut out = Vec::new();
        for (a, b) in merkle::inclusion_ranges(index, size) {
            out.push(self.range(a, b).await?);
        }
        Ok(out)
    }

    /// The consistency proof from the tree of `old` leaves to that of `new`.
    pub async fn consistency(&self, old: u64, new: u64) -> Result<Vec<Hash>, AuditError> {
        let mut out = Vec::new();
        for (a, b) in merkle::consistency_ranges(old, new) {
            out.push(self.range(a, b).await?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn scenario(store: Store) {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::audit::checkpoint::tests::write_checkpointed(
            &store,
            dir.path(),
            "n-tree",
            7,
            10,
            77,
        )
        .await;
        let heads = heads(&store, "n-tree").await.unwrap();
        assert!(heads.len() >= 7, "{heads:?}");
        assert_eq!(heads.last().unwrap().size, 77, "shutdown signs the head");
        let origin = default_origin("n-tree");
        let reader = TreeReader::new(&store, "n-tree");
        let leaves: Vec<String> =
            sqlx::query_scalar("SELECT hash FROM audit_log WHERE node = 'n-tree' ORDER BY seq")
                .fetch_all(store.pool())
                .await
                .unwrap();
        for h in &heads {
            let size = h.size as u64;
            let signed = note::Note::parse(&h.note).unwrap();
            assert!(note::verify(
                &origin,
                key.public_bytes(),
                &signed.text,
                &signed.signatures[0]
            ));
            let (o, s, root) = note::parse_checkpoint_text(&signed.text).unwrap();
            assert_eq!((o.as_str(), s), (origin.as_str(), size));
            let mut full = CompactRange::default();
            leaves[..size as usize].iter().for_each(|l| {
                full.push(leaf_of(l).unwrap());
            });
            assert_eq!(
                full.root(),
                root,
                "incremental root = recomputed root at {size}"
            );
            assert_eq!(reader.range(0, size).await.unwrap(), root);
            for index in [0, size / 2, size - 1] {
                let proof = reader.inclusion(index, size).await.unwrap();
                let leaf = leaf_of(&leaves[index as usize]).unwrap();
                assert!(merkle::verify_inclusion(index, size, &leaf, &proof, &root));
            }
            for old in &heads {
                let (m, old_root) = (old.size as u64, merkle::from_hex(&old.root).unwrap());
                if m <= size {
                    let proof = reader.consistency(m, size).await.unwrap();
                    assert!(merkle::verify_consistency(
                        m, size, &old_root, &root, &proof
                    ));
                }
            }
        }
        // One record's evidence, on either database: no cosignatures, so the smallest covering head.
        let ev = crate::audit::evidence::prove(&store, "n-tree-30", &[])
            .await
            .unwrap();
        let covering = heads.iter().find(|h| h.size >= 31).unwrap().size as u64;
        assert_eq!((ev.record.seq, ev.tree_size), (31, covering));
        let file = serde_json::to_vec(&ev).unwrap();
        let v = crate::audit::evidence::verify(&file, None, Some(key.public_hex())).unwrap();
        assert!(v.cosigned_by.is_empty());
    }

    #[tokio::test]
    async fn writer_extends_the_tree_and_proofs_verify_sqlite() {
        let (store, _dir) = crate::testing::sqlite_store().await;
        scenario(store).await;
    }

    #[tokio::test]
    async fn writer_extends_the_tree_and_proofs_verify_postgres() {
        let Some((store, _db)) = crate::testing::PgDatabase::store().await else {
            return;
        };
        scenario(store).await;
    }

    /// Figures for the README: `cargo test --lib audit::tree::tests::figures -- --ignored --nocapture`.
    #[tokio::test]
    #[ignore]
    async fn figures() {
        use crate::audit::{AuditConfig, AuditLog};
        let (store, dir) = crate::testing::sqlite_store().await;
        let (log, writer) = AuditLog::start(store.clone(), AuditConfig::new("fig"))
            .await
            .unwrap();
        let mut waits = tokio::task::JoinSet::new();
        for i in 0..11_000 {
            let log = log.clone();
            waits.spawn(async move {
                let entry = crate::audit::checkpoint::tests::read_of("fig", i);
                log.append(entry).await.unwrap()
            });
            if waits.len() >= 256 {
                waits.join_next().await;
            }
        }
        while waits.join_next().await.is_some() {}
        log.close();
        drop(log);
        writer.finish().await;
        let key = AuditKey::load_or_create(&dir.path().join("k")).unwrap();
        let origin = default_origin("fig");
        let mut tree = None;
        for (size, label) in [
            (10_000, "first head over 10,000 records"),
            (11_000, "next head, 1,000 records later"),
        ] {
            let nodes_before: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_tree_nodes")
                .fetch_one(store.pool())
                .await
                .unwrap();
            let started = std::time::Instant::now();
            let mut tx = store.begin_write().await.unwrap();
            tree = advance(tx.conn(), "fig", &origin, &key, tree, size, &[])
                .await
                .unwrap();
            tx.commit().await.unwrap();
            let took = started.elapsed();
            let nodes: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_tree_nodes")
                .fetch_one(store.pool())
                .await
                .unwrap();
            let head = latest(&store, "fig").await.unwrap().unwrap();
            println!(
                "{label}: {took:?} (SQLite transaction included); note {} bytes, edge {} bytes, {} subtree rows",
                head.note.len(),
                head.edge.len(),
                nodes - nodes_before
            );
        }
        let reader = TreeReader::new(&store, "fig");
        let started = std::time::Instant::now();
        let proof = reader.inclusion(4321, 11_000).await.unwrap();
        println!(
            "inclusion proof in a tree of 11,000: {} hashes, read in {:?}",
            proof.len(),
            started.elapsed()
        );
        let started = std::time::Instant::now();
        let proof = reader.consistency(10_000, 11_000).await.unwrap();
        println!(
            "consistency proof 10,000 -> 11,000: {} hashes, read in {:?}",
            proof.len(),
            started.elapsed()
        );
        let n = 10_000_000;
        let lens: Vec<usize> = [0, 1, n / 2, 8_388_607, 8_388_608, n - 1]
            .into_iter()
            .map(|i| merkle::inclusion_ranges(i, n).len())
            .collect();
        println!("inclusion proof lengths in a tree of 10,000,000 leaves: {lens:?} hashes (32 bytes each)");
        println!(
            "consistency proof 9,999,000 -> 10,000,000: {} hashes",
            merkle::consistency_ranges(9_999_000, n).len()
        );
    }
}
