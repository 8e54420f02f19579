//! forward: the request as the provider receives it, sent with the
//! gateway's certificate over a pooled client, within the provider's fair
//! share and circuit breaker ([`breaker`]) and the upstream timeout; and a
//! provider's error answer re-issued as one of the gateway's own problems.

pub mod breaker;

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::gateway::refusal::Refusal;
use crate::gateway::route::Route;
use crate::gateway::trace::TraceContext;
use crate::gateway::Gateway;
use crate::identity::token::Officer;
use crate::policy::Service;
use breaker::Refused;

/// The HTTPS client towards providers; pooled, so connections are reused.
pub type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the pooled provider client presenting the gateway's certificate; it offers
/// HTTP/2 to providers only when `http2` is set (`gateway.upstream_http2`).
///
/// HTTP/1.1 is the default: each request then has a pooled connection of its own, where
/// HTTP/2 funnels every request through one connection task on each side and adds
/// framing, header compression and flow control the provider has to undo.
pub fn upstream_client(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    http2: bool,
) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = if http2 {
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http)
    } else {
        // Built by hand so ALPN can say `http/1.1` (the builder leaves it empty for
        // HTTP/1.1 alone), for providers that insist on it.
        let mut tls = tls;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut https = hyper_rustls::HttpsConnector::from((http, tls));
        https.enforce_https();
        https
    };
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(512)
        .build(https)
}

/// Who asks, for the provider's benefit.
pub(crate) struct Caller<'a> {
    /// The calling agency.
    pub agency: &'a str,
    /// The officer and purpose.
    pub officer: &'a Officer,
    /// The request (and record) id.
    pub request_id: &'a str,
    /// The request's W3C trace, passed on as `traceparent`/`tracestate`.
    pub trace: &'a TraceContext,
}

impl Gateway {
    /// Sends the request to the provider with the gateway's certificate; returns status and body.
    pub(crate) async fn forward(
        &self,
        base: &str,
        route: &Route<'_>,
        parts: &http::request::Parts,
        query: Option<&str>,
        body: Bytes,
        caller: &Caller<'_>,
    ) -> Result<(StatusCode, Bytes, Option<String>), Refusal> {
        let query = query.map(|q| format!("?{q}")).unwrap_or_default();
        let uri: Uri = format!("{base}/{}{}{query}", route.service, route.rest)
            .parse()
            .map_err(|_| Refusal::UNFORWARDABLE_PATH)?;
        // A HEAD is asked of the provider as the GET it stands for: the pipeline decides,
        // minimises and records that GET's answer, and the listener sends its headers
        // without the body (the listener, `src/runtime/listener.rs`). Providers need not implement HEAD.
        let method = if parts.method == http::Method::HEAD {
            http::Method::GET
        } else {
            parts.method.clone()
        };
        let mut up = Request::builder().method(method).uri(uri);
        for name in [header::CONTENT_TYPE, header::ACCEPT_LANGUAGE] {
            if let Some(v) = parts.headers.get(&name) {
                up = up.header(name, v.clone());
            }
        }
        if let Some(v) = parts.headers.get("idempotency-key") {
            up = up.header("idempotency-key", v.clone());
        }
        up = up
            .header(header::ACCEPT, "application/json")
            .header("x-request-id", caller.request_id)
            .header("traceparent", caller.trace.traceparent())
            .header("x-karibche-agency", caller.agency)
            .header("x-karibche-purpose", header_safe(&caller.officer.purpose))
            .header("x-karibche-officer", header_safe(&caller.officer.id));
        if let Some(state) = &caller.trace.state {
            up = up.header("tracestate", header_safe(state));
        }
        let up = up
            .body(Full::new(body))
            .map_err(|_| Refusal::UNFORWARDABLE_HEADER)?;
        let permit = self
            .providers
            .admit(route.provider, caller.agency)
            .await
            .map_err(|r| self.provider_refused(route.provider, &r))?;
        let max = self.limits.max_response_bytes;
        // Each failure says whether it is the provider's own (`true`): only those count toward
        // its breaker. A request hyper refuses to send, or an answer too large for the
        // gateway's limit, is about this request: one caller must not open the breaker for all.
        let call = async {
            let resp = self.upstream.request(up).await.map_err(|e| {
                let ours = !e.is_connect()
                    && std::error::Error::source(&e)
                        .and_then(|s| s.downcast_ref::<hyper::Error>())
                        .is_some_and(hyper::Error::is_user);
                tracing::warn!(provider = route.provider, err = %e, ours, "provider call failed");
                (Refusal::PROVIDER_UNREACHABLE, !ours)
            })?;
            let status = resp.status();
            let content_type = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = Limited::new(resp.into_body(), max)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                        tracing::warn!(provider = route.provider, max, "provider answer over the gateway's limit");
                        (Refusal::PROVIDER_TOO_LARGE, false)
                    } else {
                        tracing::warn!(provider = route.provider, err = %e, "provider answer unreadable");
                        (Refusal::PROVIDER_UNREACHABLE, true)
                    }
                })?
                .to_bytes();
            Ok((status, body, content_type))
        };
        let started = std::time::Instant::now();
        let answered = tokio::time::timeout(self.limits.upstream_timeout, call).await;
        self.metrics
            .upstream_done(route.provider, started.elapsed());
        match answered {
            Ok(Ok(x)) => {
                // 501: the provider does not implement what this request asks, which is not a failure.
                let failed = x.0.is_server_error() && x.0 != StatusCode::NOT_IMPLEMENTED;
                if failed {
                    self.metrics.upstream_error(route.provider, "server_error");
                }
                permit.done(!failed);
                Ok(x)
            }
            Ok(Err((refusal, provider_failed))) => {
                if provider_failed {
                    permit.done(false);
                } else {
                    // Neither a failure nor a success of the provider: left unreported
                    // (an unreported probe lets the next request probe instead).
                    drop(permit);
                }
                let kind = if refusal.reason == Refusal::PROVIDER_TOO_LARGE.reason {
                    "too_large"
                } else {
                    "unreachable"
                };
                self.metrics.upstream_error(route.provider, kind);
                Err(refusal)
            }
            Err(_) => {
                permit.done(false);
                self.metrics.upstream_error(route.provider, "timeout");
                tracing::warn!(provider = route.provider, "provider timed out");
                Err(Refusal::PROVIDER_TIMEOUT)
            }
        }
    }

    /// A provider call not made: too many in flight, or its circuit breaker is open.
    fn provider_refused(&self, provider: &str, refused: &Refused) -> Refusal {
        let kind = match refused {
            Refused::Busy => "provider_busy",
            Refused::Open { .. } => "breaker_open",
        };
        self.metrics.overload("gateway", kind);
        let refusal = Refusal::provider_refused(refused);
        tracing::debug!(provider, reason = refusal.reason, "provider call not made");
        refusal
    }
}

/// A provider's error, re-issued as one of the gateway's own problems.
///
/// Nothing of the provider's text is passed on: its title and detail may hold
/// anything (SQL, stack traces, host names). Only the register's documented
/// problem types keep their meaning, and of those only the name of the field
/// at fault: `not-found` (404), `invalid-field` (422) and `conflict` (409).
/// A provider's 401 is the gateway's credentials failing, never the agency's
/// token, so it is a 502 (with no `WWW-Authenticate`). The provider's status
/// is kept in the audit record (`upstream_status`).
pub fn provider_problem(status: StatusCode, body: &[u8], service: &Service) -> Refusal {
    #[derive(serde::Deserialize)]
    struct Upstream {
        #[serde(rename = "type")]
        kind: Option<String>,
        detail: Option<String>,
    }
    let parsed: Option<Upstream> = serde_json::from_slice(body).ok();
    let kind = parsed
        .as_ref()
        .and_then(|p| p.kind.as_deref())
        .and_then(|k| k.strip_prefix("urn:karibche:problem:"));
    // The register's details name the field first: "{field}: {why}".
    let field = parsed
        .as_ref()
        .and_then(|p| p.detail.as_deref())
        .and_then(|d| d.split_once(':'))
        .map(|(f, _)| f.trim())
        .filter(|f| known_field(f, service));
    match status.as_u16() {
        404 => Refusal::PROVIDER_NOT_FOUND,
        422 => match (kind, field) {
            (Some("invalid-field"), Some(f)) => Refusal::PROVIDER_INVALID_FIELD.with_detail(format!(
                "the provider refused the value of {f}; see the service's documentation for its form; nothing was written"
            )),
            _ => Refusal::PROVIDER_INVALID_FIELD,
        },
        409 => match (kind, field) {
            (Some("conflict"), Some(f)) => Refusal::PROVIDER_CONFLICT.with_detail(format!(
                "the provider already holds a conflicting record ({f}); nothing was written"
            )),
            _ => Refusal::PROVIDER_CONFLICT,
        },
        400 => Refusal::PROVIDER_BAD_REQUEST,
        401 => {
            tracing::error!(service = %service.id, "provider refused the gateway's credentials (401)");
            Refusal::PROVIDER_UNAUTHORIZED
        }
        403 => Refusal::PROVIDER_FORBIDDEN,
        429 => Refusal::PROVIDER_BUSY.with_header(header::RETRY_AFTER, HeaderValue::from_static("1")),
        _ => {
            tracing::warn!(service = %service.id, status = status.as_u16(), "provider answered with an error");
            Refusal::PROVIDER_ERROR
        }
    }
}

/// Whether a provider's problem names a field the caller may be told about:
/// a field of the service's records (when declared) or the idempotency key.
fn known_field(name: &str, service: &Service) -> bool {
    let plain = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    plain
        && (name.eq_ignore_ascii_case("idempotency-key")
            || service.fields.as_ref().is_none_or(|f| f.overlaps(name)))
}

/// Claim values can hold anything; headers to providers carry only visible ASCII.
fn header_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(128)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Operation;

    #[test]
    fn headers_to_providers_carry_visible_ascii() {
        assert_eq!(header_safe("a\u{1}b"), "a?b");
    }

    #[test]
    fn provider_errors_become_the_gateways_own_problems() {
        let service = Service {
            id: "visas".into(),
            title: "Visas".into(),
            operations: vec![Operation::Write],
            subject_field: "person_id".into(),
            collection: None,
            fields: Some(crate::policy::FieldSet::from_paths(&[
                "person_id",
                "number",
            ])),
            pseudonymous_query: Vec::new(),
        };
        let p = |status: u16, body: &str| {
            let r = provider_problem(
                StatusCode::from_u16(status).unwrap(),
                body.as_bytes(),
                &service,
            );
            (
                r.status.as_u16(),
                r.problem,
                r.reason,
                r.detail.into_owned(),
            )
        };
        let invalid = r#"{"type":"urn:karibche:problem:invalid-field","title":"Invalid field","detail":"person_id: no such person, see SELECT * FROM reg_persons","status":422}"#;
        let (status, slug, _, detail) = p(422, invalid);
        assert_eq!((status, slug), (422, "invalid-field"));
        assert!(
            detail.contains("person_id") && !detail.contains("SELECT"),
            "{detail}"
        );
        // A field the service does not have is not repeated.
        let odd = r#"{"type":"urn:karibche:problem:invalid-field","detail":"Jane Doe: x"}"#;
        assert!(!p(422, odd).3.contains("Jane"));
        let conflict = r#"{"type":"urn:karibche:problem:conflict","detail":"number: a record with this number is already registered"}"#;
        assert_eq!(p(409, conflict).0, 409);
        assert!(p(409, conflict).3.contains("(number)"));
        let sql = r#"{"title":"SQL error on db01","detail":"syntax error at SELECT * FROM persons WHERE"}"#;
        let (status, _, reason, detail) = p(400, sql);
        assert_eq!((status, reason), (400, "upstream_bad_request"));
        assert!(!detail.contains("SQL") && !detail.contains("db01"));
        assert_eq!(
            p(401, "").0,
            502,
            "the gateway's credentials, not the agency's token"
        );
        assert_eq!(p(403, "").1, "provider-denied");
        assert_eq!(p(404, "<html>").0, 404);
        assert_eq!(p(429, "").0, 503);
        let (status, _, _, detail) = p(500, "panicked at src/db.rs:12 password=hunter2");
        assert_eq!(status, 502);
        assert!(!detail.contains("hunter2"));
        assert_eq!(p(302, "").0, 502);
        assert_eq!(p(418, "").0, 502);
    }
}
