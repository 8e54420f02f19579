//! The register's front door: what stands between its TLS listener and its
//! HTTP API.
//!
//! The register is a provider behind the gateway, so only the gateway's own
//! client certificate may call it; everyone else gets 403 before the request
//! is read. The body is read whole, within the gateway's body bound, before
//! [`Registry::handle`] sees it (413 past that bound).

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};

use super::Registry;
use crate::identity::{ConnInfo, GATEWAY_URI};
use crate::problem::{Body, Problem};

/// A request to the built-in register: only the gateway's certificate may call, bodies bounded.
pub async fn provider_request(
    registry: &Registry,
    info: &ConnInfo,
    req: Request<Incoming>,
    max_body: usize,
) -> Response<Body> {
    if !info.client.as_ref().is_some_and(|c| c.has_uri(GATEWAY_URI)) {
        return Problem::new(
            http::StatusCode::FORBIDDEN,
            "forbidden",
            "Forbidden",
            "only the gateway may call this provider",
        )
        .to_response();
    }
    let (parts, body) = req.into_parts();
    match http_body_util::Limited::new(body, max_body).collect().await {
        Ok(body) => {
            registry
                .handle(Request::from_parts(parts, body.to_bytes()))
                .await
        }
        Err(_) => Problem::new(
            http::StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Payload too large",
            "the request body is too large",
        )
        .to_response(),
    }
}
