//! The consent API: agencies record the consents they collected, and revoke
//! them, through the gateway itself.
//!
//! ```text
//! POST /v1/consents                  (also /v1/gateway/consents)
//! POST /v1/consents/{id}/revoke
//! ```
//!
//! The providers table names the provider `gateway` with `upstream =
//! "builtin:gateway"` and its service `consents`; an agency's grant on
//! `gateway/consents` authorises it like any write, for the purposes it
//! lists, and its fields are both the members a body may send and those the
//! answer releases. The pipeline has decided, counted the quota, read the
//! body and checked its fields; here the consent is parsed and checked, its
//! attempt is committed, and only then the record is changed
//! (`crate::consent`).

use bytes::Bytes;
use http::StatusCode;

use super::{Builtin, Call, Serving};
use crate::audit::Attempt;
use crate::consent::{is_plain_id, parse_grant, Actor, Consent};
use crate::gateway::exchange::{written_paths, Exchange};
use crate::gateway::refusal::Refusal;
use crate::gateway::release::Answer;
use crate::policy::{GatewayPath, Operation};

/// The consent API, `builtin:gateway`.
pub struct ConsentApi;

/// A request to the consent API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiRoute<'a> {
    /// `POST /v1/consents`: record a consent.
    Grant,
    /// `POST /v1/consents/{id}/revoke`: revoke one.
    Revoke(&'a str),
}

/// What the path below `gateway/consents` asks; `None` for a path that names nothing.
fn consent_path(rest: &str) -> Option<ApiRoute<'_>> {
    if rest.is_empty() || rest == "/" {
        return Some(ApiRoute::Grant);
    }
    match rest
        .strip_prefix('/')?
        .split('/')
        .collect::<Vec<_>>()
        .as_slice()
    {
        [id, "revoke"] if is_plain_id(id) => Some(ApiRoute::Revoke(id)),
        _ => None,
    }
}

/// Recognises `/v1/consents` and `/v1/consents/{id}/revoke` (also under `/v1/gateway/consents`).
/// Any other path below them is `Some(Err(()))`: answered 404, never forwarded.
pub fn api_route(path: &str) -> Option<Result<ApiRoute<'_>, ()>> {
    let route = GatewayPath::route(path).ok().filter(|r| {
        (r.provider, r.service) == (crate::consent::API_PROVIDER, crate::consent::API_SERVICE)
    })?;
    Some(consent_path(route.rest).ok_or(()))
}

/// The change a request makes, refusals checked: the attempt is committed, then it is made.
enum Change {
    Grant(Consent),
    Revoke(Consent),
}

impl Builtin for ConsentApi {
    fn name(&self) -> &'static str {
        "gateway"
    }

    fn operation(
        &self,
        route: &GatewayPath<'_>,
        method: &http::Method,
        exchange: &mut Exchange,
    ) -> Result<Operation, Refusal> {
        let api = consent_path(route.rest).ok_or_else(|| {
            Refusal::UNKNOWN_BUILTIN_PATH
                .with_detail("consent paths are /v1/consents and /v1/consents/{id}/revoke")
        })?;
        if let ApiRoute::Revoke(id) = api {
            exchange.consent(id);
        }
        if method != http::Method::POST {
            return Err(Refusal::METHOD_NOT_ALLOWED
                .with_detail("consents are recorded and revoked with POST"));
        }
        Ok(Operation::Write)
    }

    fn serve<'a>(
        &'a self,
        call: Call<'a>,
        exchange: &'a mut Exchange,
        ahead: &'a mut Option<Attempt>,
    ) -> Serving<'a> {
        Box::pin(serve(call, exchange, ahead))
    }
}

async fn serve(
    call: Call<'_>,
    exchange: &mut Exchange,
    ahead: &mut Option<Attempt>,
) -> Result<Answer, Refusal> {
    let Call {
        gateway,
        policy,
        agency,
        officer,
        route,
        allow,
        service,
        body,
        written,
        ..
    } = call;
    let api = consent_path(route.rest).ok_or(Refusal::UNKNOWN_BUILTIN_PATH)?;
    let consents = &gateway.consents;
    let actor = Actor {
        agency: Some(agency.to_owned()),
        officer: officer.id.clone(),
        purpose: Some(officer.purpose.clone()),
        certificate: exchange.certificate().map(str::to_owned),
        token_id: officer.token_id.clone(),
        request_id: Some(exchange.id.clone()),
        policy_version: policy.version().to_owned(),
    };
    let failed = |e: crate::consent::ConsentError| {
        let refusal = Refusal::consent(&e);
        if refusal.status.is_server_error() {
            tracing::error!(err = %e, "consent change failed");
        }
        refusal
    };
    let change = match api {
        ApiRoute::Grant => {
            let new = parse_grant(&body, agency, &officer.purpose).map_err(failed)?;
            // Recorded even if it is refused below, so kept to what a record may hold.
            exchange.only_subject(&crate::audit::text::shorten(
                &new.subject,
                crate::audit::text::MAX_CLAIM_CHARS,
            ));
            Change::Grant(consents.prepare_grant(new, &actor).map_err(failed)?)
        }
        ApiRoute::Revoke(id) => {
            Change::Revoke(consents.revocable(id, Some(agency)).await.map_err(failed)?)
        }
    };
    let (Change::Grant(c) | Change::Revoke(c)) = &change;
    exchange.consent(&c.id);
    exchange.only_subject(&c.subject);
    let paths = match &change {
        Change::Grant(_) => written.as_ref().map(written_paths).unwrap_or_default(),
        Change::Revoke(_) => vec!["revoked_at".to_owned()],
    };
    exchange.writes(&body, paths);
    let attempt = gateway.log_ahead(exchange, ahead).await?;
    let (status, consent) = match change {
        Change::Grant(c) => {
            consents.record(&c, attempt).await.map_err(failed)?;
            (StatusCode::CREATED, c)
        }
        Change::Revoke(c) => (
            StatusCode::OK,
            consents.revoke_now(c, attempt).await.map_err(failed)?,
        ),
    };
    let json = serde_json::to_vec(&consent).map_err(|_| Refusal::INTERNAL)?;
    gateway.release(
        (status, Bytes::from(json), Some("application/json")),
        allow,
        agency,
        (route, service),
        exchange,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_routes() {
        assert_eq!(api_route("/v1/consents"), Some(Ok(ApiRoute::Grant)));
        assert_eq!(api_route("/v1/gateway/consents"), Some(Ok(ApiRoute::Grant)));
        assert_eq!(
            api_route("/v1/consents/abc-1/revoke"),
            Some(Ok(ApiRoute::Revoke("abc-1")))
        );
        assert_eq!(api_route("/v1/consents/abc-1"), Some(Err(())));
        assert_eq!(api_route("/v1/consents/a/b/revoke"), Some(Err(())));
        assert_eq!(api_route("/v1/registry/persons/X"), None);
        assert_eq!(api_route("/v1/consentsX"), None);
    }
}
