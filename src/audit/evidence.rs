//! Evidence for one record (`audit prove`, `audit verify-proof`): a JSON file
//! a third party checks offline, with no database and without seeing any
//! other record — the record, its Merkle inclusion proof to a signed tree
//! head, that head's signatures and witnesses' cosignatures, and the public
//! keys with their fingerprints. docs/EVIDENCE.md specifies the format and
//! the steps, so the check can be re-implemented without karibche.

use serde::{Deserialize, Serialize};

use super::merkle::{self, Hash};
use super::note::{self, Note};
use super::record::{Record, Row};
use super::tree::{self, TreeReader};
use super::AuditError;
use crate::store::Store;

/// The `format` of evidence files this version writes and reads.
pub const FORMAT: &str = "karibche-evidence-v1";

/// A public key as an evidence file names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyInfo {
    /// The key name in the note (the log's origin, or the witness's name).
    pub name: String,
    /// The Ed25519 public key, hex.
    pub public_key: String,
    /// Hex SHA-256 of the raw public key: compare it with one published out of band.
    pub fingerprint: String,
    /// The C2SP verifier key (`name+keyid+base64`), for note tools.
    pub verifier_key: String,
}

impl KeyInfo {
    /// Describes `public_key` under `name`.
    pub fn new(name: &str, public_key: &[u8]) -> KeyInfo {
        KeyInfo {
            name: name.to_owned(),
            public_key: hex::encode(public_key),
            fingerprint: fingerprint(public_key),
            verifier_key: note::verifier_key(name, public_key),
        }
    }
}

/// Hex SHA-256 of a raw public key.
pub fn fingerprint(public_key: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, public_key).as_ref())
}

/// A self-contained proof that one record is in a node's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    /// [`FORMAT`].
    pub format: String,
    /// The record, as `audit export` writes it.
    pub record: Record,
    /// `hex(SHA-256(0x00 || raw chain hash))`: the record's leaf in the tree.
    pub leaf_hash: String,
    /// The leaf's position: `record.seq - 1`.
    pub leaf_index: u64,
    /// Leaves in the tree the proof leads to.
    pub tree_size: u64,
    /// RFC 9162 inclusion proof, hex hashes, leaf to root.
    pub inclusion_proof: Vec<String>,
    /// The C2SP checkpoint (signed note): the node's signature, then witnesses' cosignatures.
    pub checkpoint: String,
    /// The node's key (name = the checkpoint's origin).
    pub log_key: KeyInfo,
    /// The keys of the witnesses whose cosignatures the checkpoint carries.
    pub witness_keys: Vec<KeyInfo>,
}

/// What a verified evidence file shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The record's id.
    pub record_id: String,
    /// Its node and sequence number.
    pub node: String,
    /// Its place in the chain.
    pub seq: i64,
    /// The checkpoint's origin and tree size.
    pub origin: String,
    /// Leaves in the tree.
    pub tree_size: u64,
    /// The log key's fingerprint.
    pub log_fingerprint: String,
    /// Witnesses whose cosignatures verified, with their fingerprints and the times they cosigned (Unix seconds).
    pub cosigned_by: Vec<(String, String, u64)>,
    /// Whether a response body was checked against the record's `response_digest`.
    pub body_checked: bool,
}

impl std::fmt::Display for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "record {} (node {}, seq {}) is in the tree of {} records of {}",
            self.record_id, self.node, self.seq, self.tree_size, self.origin
        )?;
        writeln!(
            f,
            "signed by the log key with fingerprint {}",
            self.log_fingerprint
        )?;
        for (name, fp, time) in &self.cosigned_by {
            writeln!(
                f,
                "cosigned by witness {name} (fingerprint {fp}) at unix time {time}"
            )?;
        }
        if self.cosigned_by.is_empty() {
            writeln!(
                f,
                "no witness cosignatures: the log's operators alone vouch for this tree"
            )?;
        }
        if self.body_checked {
            writeln!(
                f,
                "the response body is exactly the one the record says was released"
            )?;
        }
        Ok(())
    }
}

/// Builds the evidence for record `id`: the smallest cosigned tree head that
/// covers it, else the smallest covering head; cosignatures only of `witnesses`
/// (name, raw key) the node knows.
pub async fn prove(
    store: &Store,
    id: &str,
    witnesses: &[(String, Vec<u8>)],
) -> Result<Evidence, AuditError> {
    let row: Option<Row> = sqlx::query_as("SELECT * FROM audit_log WHERE id = $1")
        .bind(id)
        .fetch_optional(store.pool())
        .await?;
    let Some(row) = row else {
        return Err(AuditError::InvalidFilter(format!("no record with id {id}")));
    };
    let (node, seq) = {
        let (n, s) = row.place();
        (n.to_owned(), s)
    };
    let record = row.into_record().map_err(|reason| AuditError::Corrupt {
        node: node.clone(),
        seq,
        reason,
    })?;
    let index = (seq - 1) as u64;
    let cosigned: Option<i64> = sqlx::query_scalar(
        "SELECT MIN(size) FROM audit_cosignatures WHERE node = $1 AND size > $2",
    )
    .bind(node.as_str())
    .bind(index as i64)
    .fetch_one(store.pool())
    .await?;
    let head = match cosigned {
        Some(size) => tree::heads(store, &node)
            .await?
            .into_iter()
            .find(|h| h.size == size),
        None => tree::head_covering(store, &node, index).await?,
    };
    let Some(head) = head else {
        return Err(AuditError::InvalidFilter(format!(
            "record {id} is not covered by a signed tree head yet (one is signed every audit.checkpoint_every records, every audit.checkpoint_interval and at shutdown)"
        )));
    };
    let size = head.size as u64;
    let proof = TreeReader::new(store, &node).inclusion(index, size).await?;
    let bad = |reason: &str| AuditError::Corrupt {
        node: node.clone(),
        seq,
        reason: reason.to_owned(),
    };
    let mut signed =
        Note::parse(&head.note).ok_or_else(|| bad("stored tree head is not a note"))?;
    let (origin, _, _) =
        note::parse_checkpoint_text(&signed.text).ok_or_else(|| bad("stored tree head"))?;
    let key: String = sqlx::query_scalar(
        "SELECT public_key FROM audit_checkpoints WHERE node = $1 ORDER BY seq DESC LIMIT 1",
    )
    .bind(node.as_str())
    .fetch_optional(store.pool())
    .await?
    .ok_or_else(|| bad("no signed checkpoint names the node's key"))?;
    let key = hex::decode(key).map_err(|_| bad("the node's key is not hex"))?;
    let mut witness_keys = Vec::new();
    for (name, line) in crate::witness::client::cosignatures(store, &node, size).await? {
        if let Some((_, k)) = witnesses.iter().find(|(n, _)| *n == name) {
            signed.signatures.push(line);
            witness_keys.push(KeyInfo::new(&name, k));
        }
    }
    let leaf = tree::leaf_of(&record.hash).ok_or_else(|| bad("chain hash is not hex"))?;
    Ok(Evidence {
        format: FORMAT.to_owned(),
        record,
        leaf_hash: hex::encode(leaf),
        leaf_index: index,
        tree_size: size,
        inclusion_proof: proof.iter().map(hex::encode).collect(),
        checkpoint: signed.render(),
        log_key: KeyInfo::new(&origin, &key),
        witness_keys,
    })
}

/// Checks an evidence file (its bytes) offline; with `body`, that the body is
/// the one the record says was released; with `trusted`, that the log key is
/// that one (hex). Any change to any byte of the file makes it fail.
pub fn verify(file: &[u8], body: Option<&[u8]>, trusted: Option<&str>) -> Result<Verified, String> {
    let raw: serde_json::Value =
        serde_json::from_slice(file).map_err(|e| format!("not JSON: {e}"))?;
    let ev: Evidence =
        serde_json::from_value(raw.clone()).map_err(|e| format!("not an evidence file: {e}"))?;
    // Fields the record type does not know (or spells differently) would otherwise be ignored.
    if serde_json::to_value(&ev).map_err(|e| e.to_string())? != raw {
        return Err("the file holds fields or values an evidence file does not".into());
    }
    if ev.format != FORMAT {
        return Err(format!("unknown format {:?}", ev.format));
    }
    let r = &ev.record;
    if r.outcome_unknown {
        return Err("outcome_unknown is not part of a record".into());
    }
    if r.expected_hash().map_err(|e| e.to_string())? != r.hash {
        return Err("the record's content does not give its hash: the record was changed".into());
    }
    let leaf = tree::leaf_of(&r.hash).ok_or("the record's hash is not 64 hex digits")?;
    if hex::encode(leaf) != ev.leaf_hash || r.seq < 1 || ev.leaf_index != (r.seq - 1) as u64 {
        return Err("leaf_hash or leaf_index does not match the record".into());
    }
    // The keys: what the file claims must be what the key bytes give.
    let log_key = key_bytes(&ev.log_key)?;
    if let Some(t) = trusted {
        if !t.eq_ignore_ascii_case(&ev.log_key.public_key) {
            return Err("the log key is not the trusted one".into());
        }
    }
    let signed = Note::parse(&ev.checkpoint).ok_or("the checkpoint is not a signed note")?;
    let (origin, size, root) =
        note::parse_checkpoint_text(&signed.text).ok_or("the checkpoint text is malformed")?;
    if origin != ev.log_key.name || size != ev.tree_size {
        return Err("the checkpoint's origin or size does not match the file".into());
    }
    let mut log_signed = false;
    let mut cosigned_by = Vec::new();
    // Every signature line must verify under a key the file names.
    for line in &signed.signatures {
        if note::verify(&origin, &log_key, &signed.text, line) {
            log_signed = true;
            continue;
        }
        let mut found = None;
        for w in &ev.witness_keys {
            let k = key_bytes(w)?;
            if let Some(time) = note::verify_cosignature(&w.name, &k, &signed.text, line) {
                found = Some((w.name.clone(), w.fingerprint.clone(), time));
            }
        }
        match found {
            Some(f) => cosigned_by.push(f),
            None => return Err(format!("signature line does not verify: {line}")),
        }
    }
    if !log_signed {
        return Err("the checkpoint is not signed by the log key".into());
    }
    if cosigned_by.len() != ev.witness_keys.len() {
        return Err("a witness key is listed without its cosignature".into());
    }
    let proof: Vec<Hash> = ev
        .inclusion_proof
        .iter()
        .map(|h| merkle::from_hex(h).filter(|b| hex::encode(b) == *h))
        .collect::<Option<_>>()
        .ok_or("the inclusion proof holds a malformed hash")?;
    if !merkle::verify_inclusion(ev.leaf_index, size, &leaf, &proof, &root) {
        return Err("the inclusion proof does not lead to the checkpoint's root".into());
    }
    if let Some(body) = body {
        let digest = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body));
        match &r.entry.response_digest {
            Some(d) if *d == digest => {}
            Some(_) => return Err("the body is not the one the record says was released".into()),
            None => return Err("the record holds no response digest".into()),
        }
    }
    Ok(Verified {
        record_id: r.entry.id.clone(),
        node: r.node.clone(),
        seq: r.seq,
        origin,
        tree_size: size,
        log_fingerprint: ev.log_key.fingerprint.clone(),
        cosigned_by,
        body_checked: body.is_some(),
    })
}

/// The raw key a [`KeyInfo`] names, if its fingerprint and verifier key agree with it.
fn key_bytes(k: &KeyInfo) -> Result<Vec<u8>, String> {
    let bytes = hex::decode(&k.public_key)
        .ok()
        .filter(|b| b.len() == 32 && hex::encode(b) == k.public_key)
        .ok_or_else(|| format!("key {} is not 64 lowercase hex digits", k.name))?;
    if KeyInfo::new(&k.name, &bytes) != *k {
        return Err(format!(
            "the fingerprint or verifier key of {} does not match its key",
            k.name
        ));
    }
    Ok(bytes)
}
