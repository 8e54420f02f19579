//! Officer tokens: JWTs signed by each agency's identity provider.
//!
//! A token says which officer (`sub`) of which agency (`iss`) asks, for which
//! purpose (`purpose`) and case (`case`). The gateway accepts it only when it
//! is signed by a key of the agency that holds the TLS connection, is meant
//! for the gateway (`aud`), is inside its validity (`exp` required, `nbf` and
//! `iat` honoured with a small leeway), and does not live longer than the
//! configured maximum whatever its `exp` says (RFC 8725 rules). Algorithms
//! are allow-listed per key: a P-256 key verifies ES256 and nothing else, so
//! `alg: none` and algorithm confusion fail before any signature check.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The claims karibche reads from an officer token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The agency that issued the token.
    pub iss: String,
    /// The officer.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// Not before, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Issued at, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Token id, traced into the audit record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Purpose code from the policy vocabulary.
    pub purpose: String,
    /// Case reference, when the officer works a case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case: Option<String>,
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
    /// Not a well-formed JWT, or an algorithm not allowed for the agency's keys.
    #[error("malformed token or algorithm not allowed")]
    Malformed,
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
}

impl TokenError {
    /// Reason code for the audit log.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Missing => "token_missing",
            TokenError::Malformed => "token_malformed",
            TokenError::NoKey => "token_no_key",
            TokenError::WrongAgency => "token_wrong_agency",
            TokenError::BadSignature => "token_bad_signature",
            TokenError::Expired => "token_expired",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::WrongIssuer => "token_wrong_issuer",
            TokenError::WrongAudience => "token_wrong_audience",
            TokenError::MissingClaim(_) => "token_missing_claim",
            TokenError::LifetimeTooLong => "token_lifetime_too_long",
        }
    }

    /// A sentence safe to show the caller.
    pub fn detail(&self) -> &'static str {
        match self {
            TokenError::Missing => "an Authorization: Bearer token is required",
            TokenError::Expired => "the token has expired",
            TokenError::NotYetValid => "the token is not valid yet",
            TokenError::MissingClaim(_) => "the token lacks a required claim (sub, purpose, exp)",
            TokenError::LifetimeTooLong => "the token's lifetime exceeds the gateway's maximum",
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
}

struct AgencyKey {
    key: DecodingKey,
    alg: Algorithm,
}

/// The verification keys of every agency, loaded once and shared.
pub struct KeyStore {
    keys: HashMap<String, Vec<AgencyKey>>,
    options: VerifyOptions,
}

/// A key file that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct KeyLoadError {
    /// The file.
    pub path: String,
    /// What was wrong.
    pub message: String,
}

impl KeyStore {
    /// Loads `<keys_dir>/<agency>.pub.pem` (an EC P-256 public key, ES256) for each agency that has one.
    pub fn load(
        keys_dir: &Path,
        agencies: &[&str],
        options: VerifyOptions,
    ) -> Result<KeyStore, KeyLoadError> {
        let mut keys = HashMap::new();
        for agency in agencies {
            let (_, public) = crate::pki::signing_key_files(keys_dir, agency);
            let pem = match std::fs::read(&public) {
                Ok(pem) => pem,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(KeyLoadError {
                        path: public.display().to_string(),
                        message: e.to_string(),
                    })
                }
            };
            let key = DecodingKey::from_ec_pem(&pem).map_err(|e| KeyLoadError {
                path: public.display().to_string(),
                message: e.to_string(),
            })?;
            keys.insert(
                (*agency).to_owned(),
                vec![AgencyKey {
                    key,
                    alg: Algorithm::ES256,
                }],
            );
        }
        Ok(KeyStore { keys, options })
    }

    /// Whether the agency has at least one verification key.
    pub fn has_keys(&self, agency: &str) -> bool {
        self.keys.get(agency).is_some_and(|k| !k.is_empty())
    }

    /// Verifies a bearer token presented on a connection held by `agency`.
    pub fn verify(&self, token: &str, agency: &str) -> Result<Officer, TokenError> {
        let keys = self.keys.get(agency).ok_or(TokenError::NoKey)?;
        let now = unix_now();
        let mut last = TokenError::NoKey;
        for k in keys {
            match self.verify_with(token, agency, k, now) {
                Ok(officer) => return Ok(officer),
                Err(TokenError::BadSignature) => last = TokenError::BadSignature,
                Err(other) => return Err(other),
            }
        }
        if last == TokenError::BadSignature && claimed_issuer(token).is_some_and(|i| i != agency) {
            return Err(TokenError::WrongAgency);
        }
        Err(last)
    }

    fn verify_with(
        &self,
        token: &str,
        agency: &str,
        k: &AgencyKey,
        now: i64,
    ) -> Result<Officer, TokenError> {
        let o = &self.options;
        let mut v = Validation::new(k.alg);
        v.leeway = o.leeway.as_secs();
        v.validate_nbf = true;
        v.validate_exp = true;
        v.set_audience(&[&o.audience]);
        v.set_issuer(&[agency]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &k.key, &v).map_err(map_error)?;
        let c = data.claims;
        let leeway = o.leeway.as_secs() as i64;
        if c.iat.is_some_and(|iat| iat > now + leeway) {
            return Err(TokenError::NotYetValid);
        }
        let max = o.max_lifetime.as_secs() as i64;
        let lifetime = c.exp - c.iat.unwrap_or(now);
        if lifetime > max + leeway {
            return Err(TokenError::LifetimeTooLong);
        }
        if c.sub.trim().is_empty() {
            return Err(TokenError::MissingClaim("sub"));
        }
        if c.purpose.trim().is_empty() {
            return Err(TokenError::MissingClaim("purpose"));
        }
        Ok(Officer {
            id: c.sub,
            purpose: c.purpose,
            case_ref: c.case.filter(|s| !s.is_empty()),
            token_id: c.jti,
        })
    }
}

fn map_error(e: jsonwebtoken::errors::Error) -> TokenError {
    match e.kind() {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(match c.as_str() {
            "exp" => "exp",
            "iss" => "iss",
            "aud" => "aud",
            _ => "sub",
        }),
        // `purpose` missing surfaces as a JSON error when deserialising Claims.
        ErrorKind::Json(_) => TokenError::MissingClaim("purpose"),
        _ => TokenError::Malformed,
    }
}

/// The `iss` a token claims, read without verification: only to name the refusal.
fn claimed_issuer(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    #[derive(Deserialize)]
    struct Iss {
        iss: String,
    }
    serde_json::from_slice::<Iss>(&bytes).ok().map(|i| i.iss)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What a development token should say.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// Agency id (`iss`).
    pub agency: String,
    /// Officer id (`sub`).
    pub officer: String,
    /// Purpose code.
    pub purpose: String,
    /// Case reference.
    pub case_ref: Option<String>,
    /// Lifetime from now.
    pub ttl: Duration,
    /// Audience (the gateway).
    pub audience: String,
    /// Shifts `iat`, `nbf` and `exp` into the past (tests of expiry); zero normally.
    pub backdate: Duration,
}

/// Errors minting a development token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The agency's signing key could not be read.
    #[error("cannot read the signing key {path}: {source}")]
    ReadKey {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// Signs a development token with `<keys_dir>/<agency>.key` (ES256).
pub fn issue(keys_dir: &Path, req: &IssueRequest) -> Result<String, IssueError> {
    let (private, _) = crate::pki::signing_key_files(keys_dir, &req.agency);
    let pem = std::fs::read(&private).map_err(|source| IssueError::ReadKey {
        path: private.display().to_string(),
        source,
    })?;
    let key = EncodingKey::from_ec_pem(&pem)?;
    let now = unix_now() - req.backdate.as_secs() as i64;
    #[derive(Serialize)]
    struct WithAud<'a> {
        aud: &'a str,
        #[serde(flatten)]
        claims: Claims,
    }
    let claims = WithAud {
        aud: &req.audience,
        claims: Claims {
            iss: req.agency.clone(),
            sub: req.officer.clone(),
            exp: now + req.ttl.as_secs() as i64,
            nbf: Some(now),
            iat: Some(now),
            jti: Some(uuid::Uuid::now_v7().to_string()),
            purpose: req.purpose.clone(),
            case: req.case_ref.clone(),
        },
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &key,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, KeyStore) {
        let dir = tempfile::tempdir().unwrap();
        crate::pki::ensure_signing_keys(dir.path(), &["psda", "ssg"]).unwrap();
        let ks = KeyStore::load(
            dir.path(),
            &["psda", "ssg"],
            VerifyOptions {
                audience: "karibche".into(),
                leeway: Duration::from_secs(5),
                max_lifetime: Duration::from_secs(900),
            },
        )
        .unwrap();
        (dir, ks)
    }

    fn req(agency: &str, ttl: u64) -> IssueRequest {
        IssueRequest {
            agency: agency.into(),
            officer: "officer-7".into(),
            purpose: "identity-documentation".into(),
            case_ref: Some("C-1".into()),
            ttl: Duration::from_secs(ttl),
            audience: "karibche".into(),
            backdate: Duration::ZERO,
        }
    }

    #[test]
    fn issued_token_verifies_for_its_agency_only() {
        let (dir, ks) = setup();
        let t = issue(dir.path(), &req("psda", 300)).unwrap();
        let o = ks.verify(&t, "psda").unwrap();
        assert_eq!(o.id, "officer-7");
        assert_eq!(o.case_ref.as_deref(), Some("C-1"));
        assert!(o.token_id.is_some());
        assert_eq!(ks.verify(&t, "ssg"), Err(TokenError::WrongAgency));
        assert_eq!(ks.verify(&t, "geostat"), Err(TokenError::NoKey));
    }

    #[test]
    fn lifetime_audience_and_tampering_are_refused() {
        let (dir, ks) = setup();
        let long = issue(dir.path(), &req("psda", 3600)).unwrap();
        assert_eq!(ks.verify(&long, "psda"), Err(TokenError::LifetimeTooLong));
        let mut r = req("psda", 300);
        r.audience = "other".into();
        let t = issue(dir.path(), &r).unwrap();
        assert_eq!(ks.verify(&t, "psda"), Err(TokenError::WrongAudience));
        let good = issue(dir.path(), &req("psda", 300)).unwrap();
        let mut parts: Vec<&str> = good.split('.').collect();
        parts[2] = "AAAA";
        assert!(ks.verify(&parts.join("."), "psda").is_err());
        assert_eq!(ks.verify("not-a-jwt", "psda"), Err(TokenError::Malformed));
        let mut old = req("psda", 60);
        old.backdate = Duration::from_secs(600);
        let t = issue(dir.path(), &old).unwrap();
        assert_eq!(ks.verify(&t, "psda"), Err(TokenError::Expired));
    }

    #[test]
    fn alg_none_is_refused() {
        let (_dir, ks) = setup();
        use base64::Engine;
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b
            .encode(br#"{"iss":"psda","sub":"x","aud":"karibche","exp":9999999999,"purpose":"p"}"#);
        let t = format!("{header}.{body}.");
        assert!(ks.verify(&t, "psda").is_err());
    }
}
