//! Signed checkpoints: every so many records (and at shutdown) the writer
//! signs `(node, seq, hash, ts)` of its chain head with the node's Ed25519
//! audit key, in the same transaction as the records it covers.
//!
//! A hash chain alone cannot show that its newest records were cut off: the
//! shorter chain is still intact. A checkpoint can — it names a `seq` and
//! `hash` that must still be in the chain — and with the node's public key
//! (`karibche audit pubkey`) an auditor can check it offline, so rewriting
//! the whole chain after the fact needs the node's private key too.
//!
//! The signed message is the UTF-8 text
//! `karibche-audit-checkpoint-v1\n{node}\n{seq}\n{hash}\n{ts}`.

use std::path::Path;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use super::AuditError;
use crate::store::Store;

/// A node's audit signing key (Ed25519).
pub struct AuditKey {
    pair: Ed25519KeyPair,
    public_hex: String,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey")
            .field("public", &self.public_hex)
            .finish()
    }
}

/// Errors loading or creating an audit key.
#[derive(Debug, thiserror::Error)]
#[error("audit key {path}: {message}")]
pub struct AuditKeyError {
    /// The key file.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

impl AuditKey {
    /// Loads the PKCS#8 key at `path`, creating it (mode 0600) if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<AuditKey, AuditKeyError> {
        let err = |message: String| AuditKeyError {
            path: path.display().to_string(),
            message,
        };
        let der = match std::fs::read(path) {
            Ok(pem) => {
                let text = String::from_utf8(pem).map_err(|e| err(e.to_string()))?;
                let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(body.trim())
                    .map_err(|e| err(e.to_string()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                    .map_err(|_| err("key generation failed".into()))?;
                let der = doc.as_ref().to_vec();
                write_pem(path, &der).map_err(|e| err(e.to_string()))?;
                der
            }
            Err(e) => return Err(err(e.to_string())),
        };
        let pair = Ed25519KeyPair::from_pkcs8(&der)
            .map_err(|_| err("not an Ed25519 PKCS#8 key".into()))?;
        let public_hex = hex::encode(pair.public_key().as_ref());
        Ok(AuditKey { pair, public_hex })
    }

    /// The public key, lowercase hex (32 bytes).
    pub fn public_hex(&self) -> &str {
        &self.public_hex
    }

    /// The public key's 32 raw bytes.
    pub fn public_bytes(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// An Ed25519 signature over `message` (for signed notes, [`super::note`]).
    pub fn sign_bytes(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }

    /// Signs a checkpoint of `node`'s chain at `seq`/`hash`, time-stamped now.
    pub fn sign(&self, node: &str, seq: i64, hash: &str) -> Checkpoint {
        let ts = super::now_ts();
        let sig = self.pair.sign(message(node, seq, hash, &ts).as_bytes());
        Checkpoint {
            node: node.to_owned(),
            seq,
            hash: hash.to_owned(),
            ts,
            public_key: self.public_hex.clone(),
            signature: hex::encode(sig.as_ref()),
        }
    }
}

fn write_pem(path: &Path, der: &[u8]) -> std::io::Result<()> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    crate::files::write_atomic(path, pem.as_bytes(), 0o600)
}

/// The text a checkpoint signature covers.
pub fn message(node: &str, seq: i64, hash: &str, ts: &str) -> String {
    format!("karibche-audit-checkpoint-v1\n{node}\n{seq}\n{hash}\n{ts}")
}

/// A signed statement that `node`'s chain had `hash` at `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Checkpoint {
    /// The node whose chain is covered.
    pub node: String,
    /// The chain position covered.
    pub seq: i64,
    /// The record hash at `seq`.
    pub hash: String,
    /// When it was signed.
    pub ts: String,
    /// The signing public key, hex.
    pub public_key: String,
    /// Ed25519 signature over [`message`], hex.
    pub signature: String,
}

impl Checkpoint {
    /// Checks the signature, against `trusted` if given (else against the key the checkpoint names).
    pub fn verify(&self, trusted: Option<&str>) -> Result<(), String> {
        if let Some(t) = trusted {
            if !t.eq_ignore_ascii_case(&self.public_key) {
                return Err("signed by a key other than the trusted audit key".into());
            }
        }
        let key = hex::decode(&self.public_key).map_err(|_| "public key is not hex".to_owned())?;
        let sig = hex::decode(&self.signature).map_err(|_| "signature is not hex".to_owned())?;
        UnparsedPublicKey::new(&signature::ED25519, key)
            .verify(
                message(&self.node, self.seq, &self.hash, &self.ts).as_bytes(),
                &sig,
            )
            .map_err(|_| "signature does not verify".to_owned())
    }
}

/// Stores a checkpoint inside the caller's transaction.
pub(crate) async fn insert(
    conn: &mut sqlx::AnyConnection,
    cp: &Checkpoint,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_checkpoints (node, seq, hash, ts, public_key, signature) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(cp.node.as_str())
    .bind(cp.seq)
    .bind(cp.hash.as_str())
    .bind(cp.ts.as_str())
    .bind(cp.public_key.as_str())
    .bind(cp.signature.as_str())
    .execute(conn)
    .await
    .map(|_| ())
}

/// Every checkpoint of a node, oldest first.
pub async fn list(store: &Store, node: &str) -> Result<Vec<Checkpoint>, AuditError> {
    Ok(sqlx::query_as(
        "SELECT node, seq, hash, ts, public_key, signature FROM audit_checkpoints \
         WHERE node = $1 ORDER BY seq",
    )
    .bind(node)
    .fetch_all(store.pool())
    .await?)
}

/// The newest checkpoint of a node.
pub(crate) async fn latest(store: &Store, node: &str) -> Result<Option<i64>, AuditError> {
    Ok(
        sqlx::query_scalar("SELECT MAX(seq) FROM audit_checkpoints WHERE node = $1")
            .bind(node)
            .fetch_one(store.pool())
            .await?,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_and_signatures_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit-node-1.key");
        let key = AuditKey::load_or_create(&path).unwrap();
        let again = AuditKey::load_or_create(&path).unwrap();
        assert_eq!(key.public_hex(), again.public_hex());
        let cp = key.sign("node-1", 7, &"ab".repeat(32));
        cp.verify(None).unwrap();
        cp.verify(Some(key.public_hex())).unwrap();
        let other = AuditKey::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(cp.verify(Some(other.public_hex())).is_err());
        let mut forged = cp.clone();
        forged.seq = 8;
        assert!(forged.verify(None).is_err());
    }

    /// Writes `records` entries to `node` through a writer that checkpoints every
    /// `every` records (batches of at most `max_batch`), stops it, and returns its key.
    pub(crate) async fn write_checkpointed(
        store: &Store,
        dir: &std::path::Path,
        node: &str,
        max_batch: usize,
        every: u64,
        records: usize,
    ) -> std::sync::Arc<AuditKey> {
        use crate::audit::{AuditConfig, AuditLog, CheckpointPolicy};
        let key = std::sync::Arc::new(AuditKey::load_or_create(&dir.join("k")).unwrap());
        let mut config = AuditConfig::new(node);
        config.max_batch = max_batch;
        config.checkpoints = Some(CheckpointPolicy {
            key: key.clone(),
            every,
            interval: std::time::Duration::from_secs(3600),
        });
        let (log, writer) = AuditLog::start(store.clone(), config).await.unwrap();
        for i in 0..records {
            log.append(read_of(node, i)).await.unwrap();
        }
        log.close();
        drop(log);
        writer.finish().await;
        key
    }

    /// Read number `i` of `node`: the entry the checkpoint and tree tests write.
    pub(crate) fn read_of(node: &str, i: usize) -> crate::audit::Entry {
        crate::audit::Entry {
            id: format!("{node}-{i}"),
            ts: crate::audit::now_ts(),
            method: "GET".into(),
            path: format!("/v1/registry/persons/RF-{i}"),
            decision: "allow".into(),
            status: 200,
            policy_version: "v".into(),
            subjects: vec![format!("RF-{i}")],
            ..crate::audit::Entry::default()
        }
    }

    async fn scenario(store: Store) {
        use crate::audit::verify_with_key;
        let dir = tempfile::tempdir().unwrap();
        let key = write_checkpointed(&store, dir.path(), "node-cp", 4, 10, 25).await;
        let cps = list(&store, "node-cp").await.unwrap();
        assert!(cps.len() >= 3, "{cps:?}");
        assert_eq!(cps.last().unwrap().seq, 25, "shutdown checkpoints the head");
        let report = verify_with_key(&store, None, Some(key.public_hex()))
            .await
            .unwrap();
        assert!(report.intact(), "{report}");
        assert_eq!(report.nodes[0].checkpoints, cps.len());

        // Another key is not trusted.
        let other = AuditKey::load_or_create(&dir.path().join("other")).unwrap();
        let report = verify_with_key(&store, None, Some(other.public_hex()))
            .await
            .unwrap();
        assert!(!report.intact());

        // Cutting the tail leaves an intact but shorter chain: the checkpoint shows it.
        sqlx::query("DELETE FROM audit_subjects WHERE node = 'node-cp' AND seq > 22")
            .execute(store.pool())
            .await
            .unwrap();
        sqlx::query("DELETE FROM audit_log WHERE node = 'node-cp' AND seq > 22")
            .execute(store.pool())
            .await
            .unwrap();
        let report = crate::audit::verify(&store, None).await.unwrap();
        let (seq, why) = report.nodes[0].broken_at.clone().unwrap();
        assert_eq!(seq, 23);
        assert!(why.contains("removed from the end"), "{why}");
    }

    #[tokio::test]
    async fn checkpoints_reveal_a_cut_tail_sqlite() {
        let (store, _dir) = crate::testing::sqlite_store().await;
        scenario(store).await;
    }

    #[tokio::test]
    async fn checkpoints_reveal_a_cut_tail_postgres() {
        let Some((store, _db)) = crate::testing::PgDatabase::store().await else {
            return;
        };
        scenario(store).await;
    }
}
