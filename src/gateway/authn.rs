//! authn: who asks. The agency from the client certificate (the policy says
//! which agency holds it), the officer and purpose from the bearer token the
//! agency signed, and the token's claims and the path held to the bounds
//! their record keeps.

use http::{header, HeaderMap, Uri};

use crate::audit::text::{self, MAX_CLAIM_CHARS, MAX_PATH_CHARS, MAX_PURPOSE_CHARS};
use crate::gateway::refusal::Refusal;
use crate::gateway::Gateway;
use crate::identity::token::{Officer, Presented, TokenError};
use crate::identity::ConnInfo;
use crate::identity::PeerCert;
use crate::policy::{Agency, Policy};

/// agency: the client certificate → the agency the policy says holds it.
pub fn agency<'p>(policy: &'p Policy, client: Option<&PeerCert>) -> Result<&'p Agency, Refusal> {
    client
        .and_then(|c| policy.agency_for_certificate(c))
        .ok_or(Refusal::UNKNOWN_AGENCY)
}

impl Gateway {
    /// token: the bearer token verified against the agency's keys and the connection's certificate.
    pub(crate) fn officer(
        &self,
        headers: &HeaderMap,
        agency: &Agency,
        conn: &ConnInfo,
    ) -> Result<Officer, Refusal> {
        let on = Presented {
            agency: &agency.id,
            certificate_sha256: conn.client.as_ref().map(|c| c.sha256.as_str()),
            require_bound: self.require_bound_tokens || agency.require_bound_tokens,
        };
        bearer(headers)
            .ok_or(TokenError::Missing)
            .and_then(|t| self.keys.load().verify(t, &on))
            .map_err(|e| Refusal::token(&e))
    }
}

/// The token's claims and the path, held to the limits of `crate::audit::text`:
/// a longer or control-character value is refused by name (its record keeps it shortened).
pub fn bounded(officer: &Officer, uri: &Uri) -> Result<(), Refusal> {
    let claims = [
        ("sub", Some(officer.id.as_str()), MAX_CLAIM_CHARS),
        ("purpose", Some(officer.purpose.as_str()), MAX_PURPOSE_CHARS),
        ("case", officer.case_ref.as_deref(), MAX_CLAIM_CHARS),
        ("jti", officer.token_id.as_deref(), MAX_CLAIM_CHARS),
    ];
    for (claim, value, max) in claims {
        let Some(value) = value else { continue };
        if let Err(unfit) = text::check(value, max) {
            return Err(Refusal::token_claim(claim, &unfit));
        }
    }
    let path = uri.path_and_query().map_or("", |p| p.as_str());
    if text::check(path, MAX_PATH_CHARS).is_err() {
        return Err(Refusal::URI_TOO_LONG);
    }
    Ok(())
}

/// The bearer token in `Authorization`, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn bearer_tokens() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc.def.ghi"),
        );
        assert_eq!(bearer(&h), Some("abc.def.ghi"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic xyz"));
        assert_eq!(bearer(&h), None);
    }
}
