//! Sealed pagination cursors: a provider's `next` never reaches an agency as
//! the provider wrote it.
//!
//! A provider's cursor is its position in a search, and providers write
//! positions they can read back: the register's was the last register id in
//! base64, which handed every agency the real id behind the last record of a
//! page, pseudonymised or not. So the gateway seals each `next` it releases
//! with AES-256-GCM under a key derived from the gateway's secret, binding it
//! to the agency, provider and service it was issued for and to an expiry,
//! and opens each `cursor` before forwarding it. An agency sees an opaque
//! token it cannot read, forge, or use for another agency or service; one
//! that fails to open is refused (400), never forwarded.
//!
//! ```text
//! sealed = base64url( nonce(12) || AES-256-GCM(key, nonce, aad, version(1) || expires(8) || position) )
//! aad    = "karibche-cursor-v1" 0 agency 0 provider 0 service
//! ```
//!
//! The key is derived from the same secret as the pseudonyms
//! (`pseudonyms.key`), so every replica that shares it opens the others'
//! cursors.

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use aws_lc_rs::hmac;
use base64::Engine;

/// How long a sealed cursor stays usable: long enough to page through any search.
pub const CURSOR_TTL_SECS: u64 = 24 * 60 * 60;
/// Longest provider position the gateway seals (bytes).
pub const MAX_POSITION: usize = 1024;
/// The query parameter that carries a cursor back.
pub const PARAM: &str = crate::policy::CURSOR_PARAM;

const VERSION: u8 = 1;
const LABEL: &[u8] = b"karibche-cursor-v1";
/// Longest sealed cursor accepted before decoding it.
const MAX_SEALED: usize = (NONCE_LEN + 1 + 8 + MAX_POSITION + 16) * 4 / 3 + 4;

/// Whose cursor it is: a cursor opens only for the scope it was sealed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope<'a> {
    /// The agency the answer was released to.
    pub agency: &'a str,
    /// The provider that paginates.
    pub provider: &'a str,
    /// The provider's service.
    pub service: &'a str,
}

impl Scope<'_> {
    fn aad(&self) -> Vec<u8> {
        let mut aad = LABEL.to_vec();
        for part in [self.agency, self.provider, self.service] {
            aad.push(0);
            aad.extend_from_slice(part.as_bytes());
        }
        aad
    }
}

/// Why a cursor was not sealed or not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CursorError {
    /// Not a cursor this gateway sealed for this scope, tampered with, or malformed.
    #[error("the cursor is not one this gateway issued for this agency and service")]
    Invalid,
    /// A cursor this gateway sealed, past its expiry.
    #[error("the cursor has expired")]
    Expired,
    /// The provider's position is longer than [`MAX_POSITION`].
    #[error("the provider's cursor is too long to seal")]
    TooLong,
    /// The system has no randomness for a nonce.
    #[error("no randomness for a nonce")]
    NoRandomness,
}

/// The cursor sealing key; derived, never stored.
pub struct CursorKey {
    key: LessSafeKey,
}

impl std::fmt::Debug for CursorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CursorKey(..)")
    }
}

impl CursorKey {
    /// Derives the key from the gateway's secret (domain-separated from the pseudonym keys).
    pub fn derive(secret: &[u8]) -> Self {
        let master = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let derived = hmac::sign(&master, LABEL);
        // A 32-byte HMAC-SHA-256 tag is exactly an AES-256 key; `new` only fails on a wrong length.
        let unbound = UnboundKey::new(&aead::AES_256_GCM, derived.as_ref())
            .unwrap_or_else(|_| unreachable!("HMAC-SHA-256 tags are 32 bytes"));
        CursorKey {
            key: LessSafeKey::new(unbound),
        }
    }

    /// Seals a provider's position for `scope`, usable until `now + CURSOR_TTL_SECS` (Unix seconds).
    pub fn seal(&self, scope: Scope<'_>, position: &str, now: u64) -> Result<String, CursorError> {
        if position.len() > MAX_POSITION {
            return Err(CursorError::TooLong);
        }
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| CursorError::NoRandomness)?;
        let mut data = Vec::with_capacity(1 + 8 + position.len() + 16);
        data.push(VERSION);
        data.extend_from_slice(&(now + CURSOR_TTL_SECS).to_be_bytes());
        data.extend_from_slice(position.as_bytes());
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(scope.aad()),
                &mut data,
            )
            .map_err(|_| CursorError::Invalid)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out))
    }

    /// Opens a sealed cursor for `scope`: the provider's position, or why not.
    pub fn open(&self, scope: Scope<'_>, sealed: &str, now: u64) -> Result<String, CursorError> {
        if sealed.len() > MAX_SEALED {
            return Err(CursorError::Invalid);
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sealed)
            .map_err(|_| CursorError::Invalid)?;
        if raw.len() < NONCE_LEN + 16 {
            return Err(CursorError::Invalid);
        }
        let (nonce, data) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CursorError::Invalid)?;
        let mut data = data.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(scope.aad()), &mut data)
            .map_err(|_| CursorError::Invalid)?;
        let (version, rest) = plain.split_first().ok_or(CursorError::Invalid)?;
        if *version != VERSION || rest.len() < 8 {
            return Err(CursorError::Invalid);
        }
        let (expires, position) = rest.split_at(8);
        let expires = u64::from_be_bytes(expires.try_into().map_err(|_| CursorError::Invalid)?);
        if now > expires {
            return Err(CursorError::Expired);
        }
        String::from_utf8(position.to_vec()).map_err(|_| CursorError::Invalid)
    }

    /// Seals the top-level `next` of a released answer in place; a `next`
    /// that is not a string is removed rather than passed on.
    pub fn seal_next(
        &self,
        body: &mut serde_json::Value,
        scope: Scope<'_>,
        now: u64,
    ) -> Result<(), CursorError> {
        let Some(map) = body.as_object_mut() else {
            return Ok(());
        };
        match map.get("next") {
            None | Some(serde_json::Value::Null) => Ok(()),
            Some(serde_json::Value::String(position)) => {
                let sealed = self.seal(scope, position, now)?;
                map.insert("next".to_owned(), serde_json::Value::String(sealed));
                Ok(())
            }
            Some(_) => {
                map.remove("next");
                Ok(())
            }
        }
    }

    /// The query string with its `cursor` opened and re-encoded for the provider.
    /// A query without one is returned as it is; two cursors are refused.
    pub fn open_query(
        &self,
        query: Option<String>,
        scope: Scope<'_>,
        now: u64,
    ) -> Result<Option<String>, CursorError> {
        let Some(query) = query else {
            return Ok(None);
        };
        let prefix = format!("{PARAM}=");
        if !query.split('&').any(|p| p.starts_with(&prefix)) {
            return Ok(Some(query));
        }
        let mut opened = false;
        let mut parts = Vec::new();
        for pair in query.split('&') {
            match pair.strip_prefix(&prefix) {
                Some(_) if opened => return Err(CursorError::Invalid),
                Some(sealed) => {
                    let position = self.open(scope, sealed, now)?;
                    parts.push(format!("{prefix}{}", percent_encode(&position)));
                    opened = true;
                }
                None => parts.push(pair.to_owned()),
            }
        }
        Ok(Some(parts.join("&")))
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Now as Unix seconds (0 before 1970, which no clock reports).
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn scope(agency: &str) -> Scope<'_> {
        Scope {
            agency,
            provider: "registry",
            service: "persons",
        }
    }

    #[test]
    fn sealed_cursors_open_only_for_their_scope_and_time() {
        let key = CursorKey::derive(b"secret");
        let sealed = key.seal(scope("geostat"), "RF-0000042", NOW).unwrap();
        // The old cursor was the position in base64; the sealed one must not carry it.
        let plain = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("RF-0000042");
        assert!(!sealed.contains(&plain), "{sealed}");
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&sealed)
            .unwrap();
        assert!(!String::from_utf8_lossy(&decoded).contains("0000042"));
        assert_eq!(
            key.open(scope("geostat"), &sealed, NOW + 60).unwrap(),
            "RF-0000042"
        );
        // Fresh nonce each time: two seals of one position differ.
        assert_ne!(
            key.seal(scope("geostat"), "RF-0000042", NOW).unwrap(),
            sealed
        );
        assert_eq!(
            key.open(scope("psda"), &sealed, NOW),
            Err(CursorError::Invalid)
        );
        let other_service = Scope {
            service: "crossings",
            ..scope("geostat")
        };
        assert_eq!(
            key.open(other_service, &sealed, NOW),
            Err(CursorError::Invalid)
        );
        assert_eq!(
            CursorKey::derive(b"other").open(scope("geostat"), &sealed, NOW),
            Err(CursorError::Invalid)
        );
        assert_eq!(
            key.open(scope("geostat"), &sealed, NOW + CURSOR_TTL_SECS + 1),
            Err(CursorError::Expired)
        );
    }

    #[test]
    fn tampered_or_made_up_cursors_are_invalid() {
        let key = CursorKey::derive(b"secret");
        let sealed = key.seal(scope("geostat"), "pos", NOW).unwrap();
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&sealed)
            .unwrap();
        for i in [0, NONCE_LEN, raw.len() - 1] {
            raw[i] ^= 1;
            let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
            assert_eq!(
                key.open(scope("geostat"), &forged, NOW),
                Err(CursorError::Invalid)
            );
            raw[i] ^= 1;
        }
        let plain = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("RF-0000001");
        for bad in [plain.as_str(), "", "!!", &"A".repeat(MAX_SEALED + 1)] {
            assert_eq!(
                key.open(scope("geostat"), bad, NOW),
                Err(CursorError::Invalid)
            );
        }
        assert_eq!(
            key.seal(scope("geostat"), &"x".repeat(MAX_POSITION + 1), NOW),
            Err(CursorError::TooLong)
        );
    }

    #[test]
    fn answers_and_queries_are_rewritten() {
        let key = CursorKey::derive(b"secret");
        let mut body = serde_json::json!({"results": [], "next": "UkYtMQ"});
        key.seal_next(&mut body, scope("a"), NOW).unwrap();
        let sealed = body["next"].as_str().unwrap().to_owned();
        assert_ne!(sealed, "UkYtMQ");
        let q = format!("nationality=TR&cursor={sealed}&limit=5");
        assert_eq!(
            key.open_query(Some(q), scope("a"), NOW).unwrap().as_deref(),
            Some("nationality=TR&cursor=UkYtMQ&limit=5")
        );
        let twice = format!("cursor={sealed}&cursor={sealed}");
        assert!(key.open_query(Some(twice), scope("a"), NOW).is_err());
        assert_eq!(
            key.open_query(Some("x=1".into()), scope("a"), NOW).unwrap(),
            Some("x=1".into())
        );
        let mut odd = serde_json::json!({"results": [], "next": 7});
        key.seal_next(&mut odd, scope("a"), NOW).unwrap();
        assert!(odd.get("next").is_none());
        // Positions with reserved characters reach the provider percent-encoded.
        let sealed = key
            .seal(scope("a"), "2025-01-01T00:00:00Z|CR-1", NOW)
            .unwrap();
        assert_eq!(
            key.open_query(Some(format!("cursor={sealed}")), scope("a"), NOW)
                .unwrap()
                .as_deref(),
            Some("cursor=2025-01-01T00%3A00%3A00Z%7CCR-1")
        );
    }
}
