//! Development officer tokens: what `karibche token issue`, the bench and the
//! tests sign with the development agency keys.
//!
//! The gateway itself never signs; it only verifies ([`crate::identity::token`]).
//! Minting lives here, next to the keys it signs with, so the verifying room
//! holds no signing code at all.

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use crate::identity::token::{unix_now, x5t_s256, Confirmation};

/// The claims of a development token (what [`issue`] signs).
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
    /// Binding to a client certificate (RFC 8705).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
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

/// Everything wrong with a token request that the gateway would refuse anyway, each said once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the gateway would refuse this token: {}", .0.join("; "))]
pub struct IssueProblems(pub Vec<String>);

/// Checks a development token request against what the gateway accepts: an agency and a
/// purpose the policy knows, an officer, and a lifetime of at most `max_lifetime`
/// (`tokens.max_lifetime`). Reports every problem at once.
pub fn check_issue(
    req: &IssueRequest,
    policy: &crate::policy::Policy,
    max_lifetime: Duration,
) -> Result<(), IssueProblems> {
    let mut problems = Vec::new();
    let known = |codes: Vec<&str>| codes.join(", ");
    if policy.agency(&req.agency).is_none() {
        problems.push(format!(
            "agency {:?} is not in the policy (known: {})",
            req.agency,
            known(policy.agencies().map(|a| a.id.as_str()).collect())
        ));
    }
    if req.officer.trim().is_empty() {
        problems.push("the officer id is empty".to_owned());
    }
    if policy.purpose(&req.purpose).is_none() {
        problems.push(format!(
            "purpose {:?} is not in the purpose vocabulary, purposes.toml (known: {})",
            req.purpose,
            known(policy.purposes().map(|p| p.code.as_str()).collect())
        ));
    }
    if req.ttl.is_zero() {
        problems.push("a lifetime of zero makes the token expired at once".to_owned());
    } else if req.ttl > max_lifetime {
        problems.push(format!(
            "lifetime {} is longer than the gateway accepts (tokens.max_lifetime = {})",
            humantime::format_duration(req.ttl),
            humantime::format_duration(max_lifetime)
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(IssueProblems(problems))
    }
}

/// Signs a development token with `<keys_dir>/<agency>.key` (ES256).
pub fn issue(keys_dir: &Path, req: &IssueRequest) -> Result<String, IssueError> {
    issue_claims(keys_dir, &req.agency, &dev_claims(req, None))
}

/// Signs a development token bound (RFC 8705 `cnf.x5t#S256`) to a certificate's SHA-256 (hex).
pub fn issue_bound(
    keys_dir: &Path,
    req: &IssueRequest,
    certificate_sha256: &str,
) -> Result<String, IssueError> {
    let cnf = Confirmation {
        x5t_s256: x5t_s256(certificate_sha256),
    };
    issue_claims(keys_dir, &req.agency, &dev_claims(req, Some(cnf)))
}

fn dev_claims(req: &IssueRequest, cnf: Option<Confirmation>) -> serde_json::Value {
    let now = unix_now() - req.backdate.as_secs() as i64;
    let claims = Claims {
        iss: req.agency.clone(),
        sub: req.officer.clone(),
        exp: now + req.ttl.as_secs() as i64,
        nbf: Some(now),
        iat: Some(now),
        jti: Some(uuid::Uuid::now_v7().to_string()),
        purpose: req.purpose.clone(),
        case: req.case_ref.clone(),
        cnf,
    };
    let mut v = serde_json::to_value(claims).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.insert("aud".into(), serde_json::Value::from(req.audience.clone()));
    }
    v
}

/// Signs any claims with an agency's development key (ES256, `kid` = the key's thumbprint).
/// Tests use it to build hostile tokens; the gateway itself never signs.
pub fn issue_claims(
    keys_dir: &Path,
    agency: &str,
    claims: &serde_json::Value,
) -> Result<String, IssueError> {
    let (private, public) = super::signing_key_files(keys_dir, agency);
    let pem = std::fs::read(&private).map_err(|source| IssueError::ReadKey {
        path: private.display().to_string(),
        source,
    })?;
    let key = EncodingKey::from_ec_pem(&pem)?;
    let mut header = Header::new(Algorithm::ES256);
    header.kid = std::fs::read(&public)
        .ok()
        .and_then(|p| crate::identity::keys::pem_kid(&p));
    Ok(jsonwebtoken::encode(&header, claims, &key)?)
}
