//! C2SP signed notes, checkpoints and cosignatures, so that tools written
//! for transparency logs (Go's `sumdb/note`, Sigsum, litewitness) can read
//! what a node signs and what its witnesses answer.
//!
//! - **Checkpoint** (c2sp.org/tlog-checkpoint): the note text
//!   `{origin}\n{size}\n{base64 root}\n`.
//! - **Signed note** (c2sp.org/signed-note): the text, a blank line, then one
//!   line per signature, `— {key name} {base64(key id || signature)}`. An
//!   Ed25519 key's id is the first 4 bytes of
//!   `SHA-256(name || "\n" || 0x01 || public key)`; its signature covers the text.
//! - **Cosignature** (c2sp.org/tlog-cosignature): a witness's signature line,
//!   key id from `0x04` instead of `0x01`, signature bytes `key id ||
//!   u64 big-endian seconds || Ed25519 over "cosignature/v1\ntime {secs}\n" ||
//!   checkpoint text`.

use aws_lc_rs::signature::{self, UnparsedPublicKey};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

use super::checkpoint::AuditKey;
use super::merkle::Hash;

/// Signature algorithm byte of Ed25519 note signatures.
const ALG_ED25519: u8 = 0x01;
/// Signature algorithm byte of timestamped Ed25519 cosignatures.
const ALG_COSIGNATURE_V1: u8 = 0x04;
/// What starts every signature line.
const DASH: &str = "\u{2014} ";

/// A key's 4-byte id in a note: `SHA-256(name || "\n" || alg || key)[..4]`.
pub fn key_id(name: &str, alg: u8, public_key: &[u8]) -> [u8; 4] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(name.as_bytes());
    ctx.update(b"\n");
    ctx.update(&[alg]);
    ctx.update(public_key);
    let d = ctx.finish();
    let mut id = [0; 4];
    id.copy_from_slice(&d.as_ref()[..4]);
    id
}

/// The C2SP verifier key of a node or witness key: `{name}+{hex id}+{base64(0x01 || key)}`.
pub fn verifier_key(name: &str, public_key: &[u8]) -> String {
    let mut bytes = vec![ALG_ED25519];
    bytes.extend_from_slice(public_key);
    format!(
        "{name}+{}+{}",
        hex::encode(key_id(name, ALG_ED25519, public_key)),
        B64.encode(bytes)
    )
}

/// The text of a checkpoint.
pub fn checkpoint_text(origin: &str, size: u64, root: &Hash) -> String {
    format!("{origin}\n{size}\n{}\n", B64.encode(root))
}

/// The origin, size and root a checkpoint text states.
pub fn parse_checkpoint_text(text: &str) -> Option<(String, u64, Hash)> {
    let mut lines = text.split('\n');
    let origin = lines.next().filter(|o| !o.is_empty())?;
    let size = lines.next()?;
    if size.is_empty() || (size.len() > 1 && size.starts_with('0')) {
        return None;
    }
    let size: u64 = size.parse().ok()?;
    let root = B64.decode(lines.next()?).ok()?;
    let root: Hash = root.try_into().ok()?;
    Some((origin.to_owned(), size, root))
}

/// A note split into its text and its signature lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The signed text, ending in a newline.
    pub text: String,
    /// The signature lines (without their newline).
    pub signatures: Vec<String>,
}

impl Note {
    /// Splits a signed note at its last blank line.
    pub fn parse(note: &str) -> Option<Note> {
        let cut = note.rfind("\n\n")?;
        let text = &note[..=cut];
        let sigs = note[cut + 2..].strip_suffix('\n')?;
        let signatures: Vec<String> = sigs.split('\n').map(str::to_owned).collect();
        if signatures.iter().any(|l| !l.starts_with(DASH)) {
            return None;
        }
        Some(Note {
            text: text.to_owned(),
            signatures,
        })
    }

    /// The note as sent: text, blank line, signature lines.
    pub fn render(&self) -> String {
        let mut out = self.text.clone();
        out.push('\n');
        for s in &self.signatures {
            out.push_str(s);
            out.push('\n');
        }
        out
    }
}

/// A signature line's key name and decoded bytes.
fn split_line(line: &str) -> Option<(&str, Vec<u8>)> {
    let rest = line.strip_prefix(DASH)?;
    let (name, sig) = rest.rsplit_once(' ')?;
    Some((name, B64.decode(sig).ok()?))
}

/// Signs a note text with the node's key under `name`: the signature line.
pub fn sign(key: &AuditKey, name: &str, text: &str) -> String {
    let id = key_id(name, ALG_ED25519, key.public_bytes());
    let mut bytes = id.to_vec();
    bytes.extend_from_slice(&key.sign_bytes(text.as_bytes()));
    format!("{DASH}{name} {}", B64.encode(bytes))
}

/// Whether `line` is a valid note signature of `text` by `public_key` under `name`.
pub fn verify(name: &str, public_key: &[u8], text: &str, line: &str) -> bool {
    let Some((n, bytes)) = split_line(line) else {
        return false;
    };
    n == name
        && bytes.len() == 68
        && bytes[..4] == key_id(name, ALG_ED25519, public_key)
        && UnparsedPublicKey::new(&signature::ED25519, public_key)
            .verify(text.as_bytes(), &bytes[4..])
            .is_ok()
}

fn cosigned_message(time: u64, text: &str) -> String {
    format!("cosignature/v1\ntime {time}\n{text}")
}

/// A witness's cosignature line over a checkpoint text, at `time` (Unix seconds).
pub fn cosign(key: &AuditKey, name: &str, text: &str, time: u64) -> String {
    let id = key_id(name, ALG_COSIGNATURE_V1, key.public_bytes());
    let mut bytes = id.to_vec();
    bytes.extend_from_slice(&time.to_be_bytes());
    bytes.extend_from_slice(&key.sign_bytes(cosigned_message(time, text).as_bytes()));
    format!("{DASH}{name} {}", B64.encode(bytes))
}

/// The time of a valid cosignature of `text` by `public_key` under `name`, if it is one.
pub fn verify_cosignature(name: &str, public_key: &[u8], text: &str, line: &str) -> Option<u64> {
    let (n, bytes) = split_line(line)?;
    if n != name || bytes.len() != 76 || bytes[..4] != key_id(name, ALG_COSIGNATURE_V1, public_key)
    {
        return None;
    }
    let time = u64::from_be_bytes(bytes[4..12].try_into().ok()?);
    UnparsedPublicKey::new(&signature::ED25519, public_key)
        .verify(cosigned_message(time, text).as_bytes(), &bytes[12..])
        .ok()
        .map(|()| time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip_and_signatures_bind_text_name_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = AuditKey::load_or_create(&dir.path().join("k")).unwrap();
        let other = AuditKey::load_or_create(&dir.path().join("o")).unwrap();
        let text = checkpoint_text("example.org/log", 7, &[3; 32]);
        assert_eq!(
            parse_checkpoint_text(&text),
            Some(("example.org/log".into(), 7, [3; 32]))
        );
        let line = sign(&key, "example.org/log", &text);
        assert!(verify("example.org/log", key.public_bytes(), &text, &line));
        assert!(!verify(
            "example.org/other",
            key.public_bytes(),
            &text,
            &line
        ));
        assert!(!verify(
            "example.org/log",
            other.public_bytes(),
            &text,
            &line
        ));
        let forged = checkpoint_text("example.org/log", 8, &[3; 32]);
        assert!(!verify(
            "example.org/log",
            key.public_bytes(),
            &forged,
            &line
        ));
        let note = Note {
            text: text.clone(),
            signatures: vec![line],
        };
        assert_eq!(Note::parse(&note.render()), Some(note));

        let co = cosign(&other, "witness", &text, 1_700_000_000);
        assert_eq!(
            verify_cosignature("witness", other.public_bytes(), &text, &co),
            Some(1_700_000_000)
        );
        assert_eq!(
            verify_cosignature("witness", other.public_bytes(), &forged, &co),
            None
        );
        assert!(verifier_key("witness", other.public_bytes()).starts_with("witness+"));
    }
}
