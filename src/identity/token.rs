//! Officer tokens: JWTs signed by each agency's identity provider.
//!
//! A token says which officer (`sub`) of which agency (`iss`) asks, for which
//! purpose (`purpose`) and case (`case`). The gateway accepts it only when
//! (RFC 8725):
//!
//! - it is at most [`VerifyOptions::max_token_bytes`] long (checked before any parsing);
//! - its `alg` is allowed for the key that verifies it ([`crate::identity::keys`]): `none`
//!   and HMAC are never allowed, so algorithm confusion fails before any signature check;
//! - its `kid`, if any, names one of the connection's agency's own keys;
//! - it is signed by a key of the agency that holds the TLS connection, and `iss` is that agency;
//! - `aud` names the gateway, `exp` is present, `nbf`/`iat` are honoured with a small
//!   leeway, and it does not live longer than the configured maximum whatever `exp` says;
//! - `sub` and `purpose` are present;
//! - if it carries `cnf.x5t#S256` (RFC 8705), the connection's client certificate has
//!   that thumbprint; and if the agency requires bound tokens, it carries one.
//!
//! A verified token is cached (keyed by its SHA-256, bounded, never past its
//! `exp`) so a token used for many requests is verified once; the cache lives
//! in the [`KeyStore`], so a key reload starts a fresh one.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::{Deserialize, Serialize};

pub use super::keys::KeyLoadError;
use super::keys::VerifyKey;
use crate::config::{TokenConfig, DEFAULT_CACHE_CAPACITY, DEFAULT_MAX_TOKEN_BYTES};

/// The `cnf` claim: the certificate the token is bound to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Confirmation {
    /// base64url of the SHA-256 of the DER client certificate.
    #[serde(rename = "x5t#S256", default, skip_serializing_if = "Option::is_none")]
    pub x5t_s256: Option<String>,
}

/// What verification reads: every claim optional, so a missing one gets its own refusal.
#[derive(Debug, Deserialize)]
struct RawClaims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<i64>,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    purpose: Option<String>,
    #[serde(default)]
    case: Option<String>,
    #[serde(default)]
    cnf: Option<Confirmation>,
}

/// The verified officer behind a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Officer {
    /// Officer id (`sub`).
    pub id: String,
    /// Purpose code.
    pub purpose: String,
    /// Case reference.
    pub case_ref: Option<String>,
    /// Token id (`jti`).
    pub token_id: Option<String>,
}

/// Why a token was refused. Every variant is a 401 for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// No `Authorization: Bearer` header.
    #[error("no bearer token")]
    Missing,
    /// Longer than the configured maximum; refused before parsing.
    #[error("token too large")]
    TooLarge,
    /// Not a well-formed JWT.
    #[error("malformed token")]
    Malformed,
    /// `alg` is `none`, HMAC, or not allowed for any key of the agency.
    #[error("algorithm not allowed")]
    AlgorithmNotAllowed,
    /// `kid` names no key of the connection's agency.
    #[error("kid names no key of the agency")]
    UnknownKey,
    /// The agency has no verification key configured.
    #[error("no verification key for the agency")]
    NoKey,
    /// Signature does not verify with the connection's agency keys, and `iss` names another agency.
    #[error("token issued by another agency than the connection's")]
    WrongAgency,
    /// Signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` or `iat` lies in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iss` is not the connection's agency.
    #[error("issuer is not the connection's agency")]
    WrongIssuer,
    /// `aud` does not name the gateway.
    #[error("audience is not this gateway")]
    WrongAudience,
    /// A required claim is missing or empty.
    #[error("required claim missing: {0}")]
    MissingClaim(&'static str),
    /// The token lives longer than the configured maximum.
    #[error("token lifetime exceeds the maximum")]
    LifetimeTooLong,
    /// The token is bound (`cnf`) to another certificate than the connection's.
    #[error("token bound to another certificate")]
    CertificateMismatch,
    /// The agency requires certificate-bound tokens and this one is not bound.
    #[error("token not bound to a certificate")]
    Unbound,
}

impl TokenError {
    /// Reason code for the audit log.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Missing => "token_missing",
            TokenError::TooLarge => "token_too_large",
            TokenError::Malformed => "token_malformed",
            TokenError::AlgorithmNotAllowed => "token_algorithm_not_allowed",
            TokenError::UnknownKey => "token_unknown_key",
            TokenError::NoKey => "token_no_key",
            TokenError::WrongAgency => "token_wrong_agency",
            TokenError::BadSignature => "token_bad_signature",
            TokenError::Expired => "token_expired",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::WrongIssuer => "token_wrong_issuer",
            TokenError::WrongAudience => "token_wrong_audience",
            TokenError::MissingClaim(c) => match *c {
                "sub" => "token_missing_sub",
                "purpose" => "token_missing_purpose",
                _ => "token_missing_claim",
            },
            TokenError::LifetimeTooLong => "token_lifetime_too_long",
            TokenError::CertificateMismatch => "token_certificate_mismatch",
            TokenError::Unbound => "token_unbound",
        }
    }

    /// A sentence safe to show the caller.
    pub fn detail(&self) -> &'static str {
        match self {
            TokenError::Missing => "an Authorization: Bearer token is required",
            TokenError::TooLarge => "the token exceeds the gateway's size limit",
            TokenError::Expired => "the token has expired",
            TokenError::NotYetValid => "the token is not valid yet",
            TokenError::MissingClaim(_) => "the token lacks a required claim (sub, purpose, exp)",
            TokenError::LifetimeTooLong => "the token's lifetime exceeds the gateway's maximum",
            TokenError::Unbound => "this agency must present tokens bound to its certificate",
            _ => "the token is not valid for this connection",
        }
    }
}

/// Verification settings shared by all agencies.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The `aud` every token must carry.
    pub audience: String,
    /// Clock skew tolerated.
    pub leeway: Duration,
    /// Longest lifetime accepted.
    pub max_lifetime: Duration,
    /// Longest token accepted, in bytes; longer ones are refused unparsed.
    pub max_token_bytes: usize,
    /// Verified tokens remembered at most (0 turns the cache off).
    pub cache_capacity: usize,
}

impl VerifyOptions {
    /// The options with the defaults for everything but the audience, leeway and lifetime.
    pub fn new(audience: String, leeway: Duration, max_lifetime: Duration) -> VerifyOptions {
        VerifyOptions {
            audience,
            leeway,
            max_lifetime,
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
        }
    }

    /// The options a gateway configuration sets.
    pub fn from_config(tokens: &TokenConfig) -> VerifyOptions {
        VerifyOptions {
            max_token_bytes: tokens.max_token_bytes,
            cache_capacity: tokens.cache_capacity,
            ..VerifyOptions::new(tokens.audience.clone(), tokens.leeway, tokens.max_lifetime)
        }
    }
}

/// The connection a token is presented on.
#[derive(Debug, Clone, Copy)]
pub struct Presented<'a> {
    /// The agency that holds the connection.
    pub agency: &'a str,
    /// Lowercase hex SHA-256 of the connection's client certificate.
    pub certificate_sha256: Option<&'a str>,
    /// Whether the agency must present certificate-bound tokens.
    pub require_bound: bool,
}

struct Cached {
    agency: String,
    officer: Officer,
    exp: i64,
    x5t: Option<String>,
}

/// The verification keys of every agency, loaded once and shared; a reload builds a new one.
pub struct KeyStore {
    keys: HashMap<String, Vec<VerifyKey>>,
    options: VerifyOptions,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

impl KeyStore {
    /// Loads `<keys_dir>/<agency>.pub.pem` and `<agency>.jwks.json` for each agency that has them.
    pub fn load(
        keys_dir: &Path,
        agencies: &[&str],
        options: VerifyOptions,
    ) -> Result<KeyStore, KeyLoadError> {
        let mut keys = HashMap::new();
        for agency in agencies {
            let k = super::keys::load_agency_keys(keys_dir, agency)?;
            if !k.is_empty() {
                keys.insert((*agency).to_owned(), k);
            }
        }
        Ok(KeyStore {
            keys,
            options,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Whether the agency has at least one verification key.
    pub fn has_keys(&self, agency: &str) -> bool {
        self.keys.get(agency).is_some_and(|k| !k.is_empty())
    }

    /// Number of keys per agency (for logs after a reload).
    pub fn key_counts(&self) -> Vec<(String, usize)> {
        let mut v: Vec<_> = self
            .keys
            .iter()
            .map(|(a, k)| (a.clone(), k.len()))
            .collect();
        v.sort();
        v
    }

    /// Verifies a bearer token presented on a connection.
    pub fn verify(&self, token: &str, on: &Presented<'_>) -> Result<Officer, TokenError> {
        if token.len() > self.options.max_token_bytes {
            return Err(TokenError::TooLarge);
        }
        let now = unix_now();
        let hash = token_hash(token);
        if let Some(officer) = self.cached(&hash, on, now) {
            return officer;
        }
        let (officer, exp, x5t) = self.verify_uncached(token, on.agency, now)?;
        check_binding(x5t.as_deref(), on)?;
        if exp > now {
            self.remember(
                hash,
                Cached {
                    agency: on.agency.to_owned(),
                    officer: officer.clone(),
                    exp,
                    x5t,
                },
                now,
            );
        }
        Ok(officer)
    }

    fn cached(
        &self,
        hash: &[u8; 32],
        on: &Presented<'_>,
        now: i64,
    ) -> Option<Result<Officer, TokenError>> {
        let cache = self.cache.lock().ok()?;
        let hit = cache.get(hash)?;
        // A token verified for one agency says nothing about another; and no entry outlives exp.
        if hit.agency != on.agency || hit.exp <= now {
            return None;
        }
        Some(check_binding(hit.x5t.as_deref(), on).map(|()| hit.officer.clone()))
    }

    fn remember(&self, hash: [u8; 32], entry: Cached, now: i64) {
        let cap = self.options.cache_capacity;
        if cap == 0 {
            return;
        }
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if cache.len() >= cap {
            cache.retain(|_, c| c.exp > now);
        }
        if cache.len() >= cap {
            // Still full of live tokens: start over rather than grow without bound.
            cache.clear();
        }
        cache.insert(hash, entry);
    }

    /// Number of verified tokens currently cached.
    pub fn cached_tokens(&self) -> usize {
        self.cache.lock().map(|c| c.len()).unwrap_or(0)
    }

    fn verify_uncached(
        &self,
        token: &str,
        agency: &str,
        now: i64,
    ) -> Result<(Officer, i64, Option<String>), TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            // `none` and unknown algorithms do not parse as a header at all.
            if raw_alg(token).is_some() {
                TokenError::AlgorithmNotAllowed
            } else {
                TokenError::Malformed
            }
        })?;
        let keys = self
            .keys
            .get(agency)
            .filter(|k| !k.is_empty())
            .ok_or(TokenError::NoKey)?;
        let named: Vec<&VerifyKey> = match &header.kid {
            // kid only ever selects among this agency's keys; it is compared, never resolved.
            Some(kid) => keys.iter().filter(|k| &k.kid == kid).collect(),
            None => keys.iter().collect(),
        };
        if named.is_empty() {
            // Name the likely cause for the audit log: a token of another agency, or a stray kid.
            return Err(if claimed_issuer(token).is_some_and(|i| i != agency) {
                TokenError::WrongAgency
            } else {
                TokenError::UnknownKey
            });
        }
        let usable: Vec<&VerifyKey> = named
            .into_iter()
            .filter(|k| k.algorithms.contains(&header.alg))
            .collect();
        if usable.is_empty() {
            return Err(TokenError::AlgorithmNotAllowed);
        }
        for k in usable {
            match self.verify_with(token, agency, header.alg, k, now) {
                Err(TokenError::BadSignature) => continue,
                other => return other,
            }
        }
        if claimed_issuer(token).is_some_and(|i| i != agency) {
            return Err(TokenError::WrongAgency);
        }
        Err(TokenError::BadSignature)
    }

    fn verify_with(
        &self,
        token: &str,
        agency: &str,
        alg: Algorithm,
        k: &VerifyKey,
        now: i64,
    ) -> Result<(Officer, i64, Option<String>), TokenError> {
        let o = &self.options;
        let mut v = Validation::new(alg);
        v.leeway = o.leeway.as_secs();
        v.validate_nbf = true;
        v.validate_exp = true;
        v.set_audience(&[&o.audience]);
        v.set_issuer(&[agency]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<RawClaims>(token, &k.key, &v).map_err(map_error)?;
        let c = data.claims;
        let exp = c.exp.ok_or(TokenError::MissingClaim("exp"))?;
        let leeway = o.leeway.as_secs() as i64;
        if c.iat.is_some_and(|iat| iat > now + leeway) {
            return Err(TokenError::NotYetValid);
        }
        let max = o.max_lifetime.as_secs() as i64;
        let start = c.iat.or(c.nbf).unwrap_or(now);
        if exp.saturating_sub(start) > max + leeway {
            return Err(TokenError::LifetimeTooLong);
        }
        let sub = c
            .sub
            .filter(|s| !s.trim().is_empty())
            .ok_or(TokenError::MissingClaim("sub"))?;
        let purpose = c
            .purpose
            .filter(|s| !s.trim().is_empty())
            .ok_or(TokenError::MissingClaim("purpose"))?;
        let x5t = c.cnf.and_then(|c| c.x5t_s256);
        Ok((
            Officer {
                id: sub,
                purpose,
                case_ref: c.case.filter(|s| !s.is_empty()),
                token_id: c.jti,
            },
            exp,
            x5t,
        ))
    }
}

/// RFC 8705: a bound token only on its certificate; an unbound one only where the agency allows it.
fn check_binding(x5t: Option<&str>, on: &Presented<'_>) -> Result<(), TokenError> {
    match x5t {
        Some(bound) => {
            let presented = on.certificate_sha256.and_then(x5t_s256);
            if presented.as_deref() == Some(bound) {
                Ok(())
            } else {
                Err(TokenError::CertificateMismatch)
            }
        }
        None if on.require_bound => Err(TokenError::Unbound),
        None => Ok(()),
    }
}

/// The `x5t#S256` value for a certificate given its lowercase hex SHA-256 (base64url of the raw digest).
pub fn x5t_s256(sha256_hex: &str) -> Option<String> {
    use base64::Engine;
    let raw = hex::decode(sha256_hex).ok()?;
    (raw.len() == 32).then(|| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw))
}

fn token_hash(token: &str) -> [u8; 32] {
    crate::files::sha256(token.as_bytes())
}

fn map_error(e: jsonwebtoken::errors::Error) -> TokenError {
    match e.kind() {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::InvalidAlgorithm => TokenError::AlgorithmNotAllowed,
        ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(match c.as_str() {
            "exp" => "exp",
            "iss" => "iss",
            "aud" => "aud",
            _ => "sub",
        }),
        _ => TokenError::Malformed,
    }
}

/// Reads the first two segments without verification; only to name a refusal.
fn unverified_json(token: &str, index: usize) -> Option<serde_json::Value> {
    use base64::Engine;
    let part = token.split('.').nth(index)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The `alg` a header claims, whatever it is.
fn raw_alg(token: &str) -> Option<String> {
    unverified_json(token, 0)?
        .get("alg")?
        .as_str()
        .map(str::to_owned)
}

/// The `iss` a token claims, read without verification: only to name the refusal.
fn claimed_issuer(token: &str) -> Option<String> {
    unverified_json(token, 1)?
        .get("iss")?
        .as_str()
        .map(str::to_owned)
}

/// Now, in seconds since the epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
