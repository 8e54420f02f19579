//! The console's reads go through the gateway's own pipeline.
//!
//! A page that shows log data asks the auditors' API (`/v1/audit/…`) exactly
//! as a tool would: the request is served by [`Gateway::handle_detached`] over
//! an in-memory HTTP/1.1 connection, so it passes authn (the session's token,
//! verified again), route, authz (the policy's decision for the officer's
//! agency and purpose), limit (the officer's quotas) and leaves its audit
//! record before the console sees a byte. There is no second authorisation
//! path: what a page shows is what the API released to that officer.
//!
//! The connection's identity is the client certificate the officer signed in
//! with when the console asks for one; otherwise the agency the token's key
//! belongs to, named through the policy's certificate matcher, with the
//! certificate fingerprint recorded as [`CONSOLE_CERTIFICATE`] so auditors see
//! the request came through the console without a client certificate. An
//! agency matched by certificate fingerprint alone (or one that requires
//! certificate-bound tokens) can use the console only with its certificate.

use std::convert::Infallible;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::gateway::Gateway;
use crate::identity::{ConnInfo, PeerCert};
use crate::policy::Policy;

/// The certificate fingerprint recorded for console requests made without a client certificate.
pub const CONSOLE_CERTIFICATE: &str = "console-session";

/// The most a console page reads from one API answer (the API's own cap is 10,000 records).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// An answer of the pipeline.
#[derive(Debug)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its body (data, or a problem document).
    pub body: Bytes,
    /// The audit record's id (`X-Request-Id`).
    pub request_id: Option<String>,
}

/// Why the pipeline could not be asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ViaError {
    /// The in-memory connection failed.
    #[error("in-process request failed: {0}")]
    Http(#[from] hyper::Error),
    /// The answer was larger than the console reads.
    #[error("the answer exceeds {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
    /// The request could not be built.
    #[error("request not built: {0}")]
    Request(#[from] http::Error),
}

/// The client certificate facts the pipeline sees for a console session of `agency`.
pub fn vouched_certificate(policy: &Policy, agency: &str) -> Option<PeerCert> {
    let m = &policy.agency(agency)?.certificate;
    let peer = PeerCert {
        sha256: CONSOLE_CERTIFICATE.to_owned(),
        uri_sans: m.uri_san.first().cloned().into_iter().collect(),
        dns_sans: m.dns_san.first().cloned().into_iter().collect(),
        subject: m.subject.first().cloned().unwrap_or_default(),
    };
    // Only a matcher that names the agency by its certificate's names can be vouched for.
    (policy
        .agency_for_certificate(&peer)
        .is_some_and(|a| a.id == agency))
    .then_some(peer)
}

/// Sends `GET path_and_query` with `token` through the gateway's pipeline as `client` from `peer`.
pub async fn get(
    gateway: &Arc<Gateway>,
    peer: std::net::SocketAddr,
    client: Option<PeerCert>,
    token: &str,
    path_and_query: &str,
) -> Result<Answer, ViaError> {
    let conn = Arc::new(ConnInfo {
        peer,
        client,
        pipelines: Arc::new(AtomicUsize::new(0)),
    });
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let gw = gateway.clone();
    let server = tokio::spawn(async move {
        let svc = service_fn(move |req: Request<Incoming>| {
            let (gw, conn) = (gw.clone(), conn.clone());
            async move { Ok::<_, Infallible>(gw.handle_detached(conn, req).await) }
        });
        if let Err(err) = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server_io), svc)
            .await
        {
            tracing::debug!(%err, "console's in-process connection ended");
        }
    });
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(client_io)).await?;
    let driver = tokio::spawn(connection);
    let mut req = Request::get(path_and_query)
        .header(http::header::HOST, "console.internal")
        .body(Full::new(Bytes::new()))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}"));
    if let Ok(v) = bearer {
        req.headers_mut().insert(http::header::AUTHORIZATION, v);
    }
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let request_id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|_| ViaError::TooLarge)?
        .to_bytes();
    drop(sender);
    let _ = driver.await;
    let _ = server.await;
    Ok(Answer {
        status,
        body,
        request_id,
    })
}
