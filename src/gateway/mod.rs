//! The request pipeline: every step of DESIGN.md's "request pipeline", in
//! order, each a named function returning a typed result.
//!
//! ```text
//! agency → token → route → decide → limit → consent → forward → minimise → audit → respond
//! ```
//!
//! Whatever happens, [`Gateway::handle`] ends by committing the request's
//! audit record, and only a committed record lets a response leave: if the
//! log cannot be written the caller gets 503 and no data. A change (a write
//! to a provider, a consent) is logged ahead: its attempt record is committed
//! before it is forwarded or made, and `handle` ends with its outcome record
//! (`crate::audit::ahead`). [`Gateway::handle_detached`] runs each request as
//! a task of its own, so a client that resets its stream or closes its
//! connection cannot cut a pipeline short between a change and its record.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use time::OffsetDateTime;

use crate::admin::Metrics;
use crate::audit::text::{
    self, MAX_CLAIM_CHARS, MAX_NAME_CHARS, MAX_PATH_CHARS, MAX_PURPOSE_CHARS,
};
use crate::audit::{Attempt, AuditLog, Entry};
use crate::breaker::{Providers, Refused};
use crate::identity::PeerCert;
use crate::limits::{Exceeded, Limits, Sample, RATE_LIMITED};
use crate::policy::{Decision, DecisionRequest, DenyReason, Operation, Policy, Service, Upstream};
use crate::problem::{Body, Problem};
use crate::server::ConnInfo;
use crate::token::{KeyStore, Officer, Presented, TokenError};

/// The HTTPS client towards providers; pooled, so connections are reused.
pub type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the pooled provider client presenting the gateway's certificate.
pub fn upstream_client(tls: rustls::ClientConfig, connect_timeout: Duration) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(512)
        .build(https)
}

/// Bounds of the pipeline.
#[derive(Debug, Clone)]
pub struct PipelineLimits {
    /// Largest request body read.
    pub max_body_bytes: usize,
    /// Largest provider response read.
    pub max_response_bytes: usize,
    /// Time a provider has to answer, body included.
    pub upstream_timeout: Duration,
    /// Time a caller has to send a write's body once its headers are in.
    pub body_timeout: Duration,
}

/// The gateway: shared state of the pipeline.
pub struct Gateway {
    /// The policy in force; swapped whole on reload.
    pub policy: Arc<ArcSwap<Policy>>,
    /// Agencies' token verification keys; swapped whole on reload.
    pub keys: Arc<ArcSwap<KeyStore>>,
    /// Every agency must present certificate-bound tokens (`tokens.require_bound_tokens`).
    pub require_bound_tokens: bool,
    /// The audit log every request ends in.
    pub audit: AuditLog,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Pooled client towards providers.
    pub upstream: UpstreamClient,
    /// Base URLs of built-in providers (`builtin:registry` → `https://127.0.0.1:8444`).
    pub builtin: Vec<(String, String)>,
    /// Pipeline bounds.
    pub limits: PipelineLimits,
    /// The key behind `pseudonymise` transforms.
    pub pseudonymiser: Arc<crate::transform::Pseudonymiser>,
    /// Agency, officer and grant quotas.
    pub rate: Arc<Limits>,
    /// Concurrency caps and circuit breakers of providers.
    pub providers: Arc<Providers>,
    /// Consent records: checked for `consent = "required"` grants, recorded through `/v1/consents`.
    pub consents: crate::consent::Consents,
    /// The requests' pipelines, each a task of its own; shutdown waits for them.
    pub pipelines: tokio_util::task::TaskTracker,
}

/// Pipelines one connection may have running at once (HTTP/2's stream limit):
/// a stream the client resets keeps its pipeline, and its place, until it ends.
pub const PIPELINES_PER_CONNECTION: usize = 256;

/// A place among a connection's running pipelines, given back when dropped.
struct PipelineSlot {
    running: Arc<std::sync::atomic::AtomicUsize>,
    admitted: bool,
}

impl PipelineSlot {
    fn take(running: &Arc<std::sync::atomic::AtomicUsize>) -> PipelineSlot {
        let before = running.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        PipelineSlot {
            running: running.clone(),
            admitted: before < PIPELINES_PER_CONNECTION,
        }
    }
}

impl Drop for PipelineSlot {
    fn drop(&mut self) {
        self.running
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The answer to a request over [`PIPELINES_PER_CONNECTION`]: nothing of it ran.
fn over_pipelines() -> Response<Body> {
    let mut resp = Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "over-capacity",
        "Service unavailable",
        "this connection has too many requests running; retry shortly",
    )
    .to_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// A refusal: what the caller sees and what the log records. Kept small
/// (static strings) because every pipeline step returns it.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    slug: &'static str,
    title: Cow<'static, str>,
    detail: Cow<'static, str>,
    reason: &'static str,
    /// Refused by the gateway's own checks (identity, policy), as opposed to a provider error.
    denied: bool,
    challenge: bool,
    /// Sent with the problem (`Retry-After`, `RateLimit`, …).
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Refusal {
    fn deny(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        reason: &'static str,
        detail: &'static str,
    ) -> Self {
        Refusal {
            status,
            slug,
            title: Cow::Borrowed(title),
            detail: Cow::Borrowed(detail),
            reason,
            denied: true,
            challenge: false,
            headers: Vec::new(),
        }
    }

    fn error(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        reason: &'static str,
        detail: &'static str,
    ) -> Self {
        Refusal {
            denied: false,
            ..Refusal::deny(status, slug, title, reason, detail)
        }
    }

    /// 500 with a fixed detail: the cause is the gateway's, and stays in its logs.
    fn internal() -> Self {
        Refusal::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "internal",
            "the server could not complete the request",
        )
    }

    fn problem(&self) -> Problem {
        Problem::new(self.status, self.slug, &self.title, self.detail.clone())
    }
}

/// Who asks, for the provider's benefit.
struct Caller<'a> {
    agency: &'a str,
    officer: &'a Officer,
    request_id: &'a str,
}

/// What a successful pass through the pipeline releases.
struct Released {
    status: StatusCode,
    body: Bytes,
    content_type: &'static str,
}

/// `/v1/{provider}/{service}/{rest}` split up.
#[derive(Debug, PartialEq, Eq)]
struct Route<'a> {
    provider: &'a str,
    service: &'a str,
    /// Everything after the service, with its leading `/` (may be empty).
    rest: &'a str,
}

impl Gateway {
    /// Runs [`Gateway::handle`] as a task of its own and resolves to its answer.
    ///
    /// Dropping the returned future (hyper does when the client resets its
    /// stream or closes the connection) only stops waiting: the pipeline
    /// still runs to its end, records included.
    ///
    /// A connection has at most [`PIPELINES_PER_CONNECTION`] pipelines running,
    /// those of reset streams included, so resetting streams cannot pile up
    /// work beyond what HTTP/2's stream limit allows; more are answered 503.
    pub fn handle_detached(
        self: &Arc<Self>,
        conn: Arc<ConnInfo>,
        req: Request<Incoming>,
    ) -> impl std::future::Future<Output = Response<Body>> + Send + 'static {
        let slot = PipelineSlot::take(&conn.pipelines);
        let task = if slot.admitted {
            let gateway = self.clone();
            Some(self.pipelines.spawn(async move {
                let _slot = slot;
                gateway.handle(conn, req).await
            }))
        } else {
            self.metrics.overload("gateway", "pipelines_connection");
            None
        };
        async move {
            let Some(task) = task else {
                return over_pipelines();
            };
            task.await.unwrap_or_else(|err| {
                tracing::error!(%err, "request pipeline ended abnormally");
                Refusal::internal().problem().to_response()
            })
        }
    }

    /// Request pipelines running now.
    pub fn pipelines_in_flight(&self) -> usize {
        self.pipelines.len()
    }

    /// Waits up to `grace` for the pipelines running now to end (at shutdown,
    /// after the listener stopped taking requests); `false` if some did not.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.pipelines.close();
        tokio::time::timeout(grace, self.pipelines.wait())
            .await
            .is_ok()
    }

    /// Runs one request through the pipeline and answers it; never panics on input.
    pub async fn handle(&self, conn: Arc<ConnInfo>, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let policy = self.policy.load_full();
        let path = req.uri().path_and_query().map_or("", |p| p.as_str());
        let mut entry = Entry {
            id: uuid::Uuid::now_v7().to_string(),
            ts: crate::audit::now_ts(),
            method: text::shorten(req.method().as_str(), MAX_NAME_CHARS).into_owned(),
            path: text::shorten(path, MAX_PATH_CHARS).into_owned(),
            certificate: conn.client.as_ref().map(|c| c.sha256.clone()),
            policy_version: policy.version().to_owned(),
            decision: "deny".to_owned(),
            ..Entry::default()
        };
        // Set once a change's attempt is committed; its outcome is then this request's last record.
        let mut ahead = None;
        let outcome = self
            .pipeline(&policy, &conn, req, &mut entry, &mut ahead)
            .await;
        let (status, response) = match outcome {
            Ok(released) => {
                entry.decision = "allow".to_owned();
                (released.status, Ok((released.body, released.content_type)))
            }
            Err(refusal) => {
                if !refusal.denied {
                    // The policy allowed the request; the provider or the gateway failed it.
                    entry.decision = if entry.legal_basis.is_some() {
                        "allow".to_owned()
                    } else {
                        "deny".to_owned()
                    };
                }
                entry.reason = Some(refusal.reason.to_owned());
                self.metrics.denied(refusal.reason);
                (refusal.status, Err(refusal))
            }
        };
        entry.status = status.as_u16();
        let mut id = entry.id.clone();
        // A flood of 429s is folded into summary records (src/limits.rs); a 429 carries no data.
        let sample = if entry.reason.as_deref() == Some(RATE_LIMITED) {
            self.rate.refusals.sample(&entry, Instant::now())
        } else {
            Sample::Record
        };
        let recorded = match (ahead, sample) {
            (Some(attempt), _) => attempt.outcome(entry).await.map(drop),
            (None, Sample::Record) => self.audit.append(entry).await.map(drop),
            (None, Sample::Summarised { summary_id }) => {
                id = summary_id;
                Ok(())
            }
        };
        let resp = match recorded {
            Ok(()) => match response {
                Ok((body, content_type)) => released_response(status, body, content_type),
                Err(refusal) => {
                    let mut resp = refusal.problem().with_request_id(id.clone()).to_response();
                    if refusal.challenge {
                        resp.headers_mut().insert(
                            header::WWW_AUTHENTICATE,
                            HeaderValue::from_static("Bearer error=\"invalid_token\""),
                        );
                    }
                    for (name, value) in refusal.headers {
                        resp.headers_mut().insert(name, value);
                    }
                    resp
                }
            },
            Err(err) => {
                tracing::error!(request_id = %id, %err, "audit record not committed; refusing the request");
                self.metrics.audit_failure();
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "audit-unavailable",
                    "Service unavailable",
                    "the access log cannot be written; no data is released",
                )
                .with_request_id(id.clone())
                .to_response()
            }
        };
        let mut resp = resp;
        if let Ok(v) = HeaderValue::from_str(&id) {
            resp.headers_mut().insert("x-request-id", v);
        }
        self.metrics.request_done(resp.status(), started.elapsed());
        resp
    }

    async fn pipeline(
        &self,
        policy: &Policy,
        conn: &ConnInfo,
        req: Request<Incoming>,
        entry: &mut Entry,
        ahead: &mut Option<Attempt>,
    ) -> Result<Released, Refusal> {
        let (parts, body) = req.into_parts();
        let holder = agency(policy, conn.client.as_ref())?;
        let (agency, bound_required) = (holder.id.as_str(), holder.require_bound_tokens);
        entry.agency = Some(agency.to_owned());
        request_head(&parts)?;
        let officer = self.token(&parts.headers, agency, bound_required, conn)?;
        let short = |v: &str, max| text::shorten(v, max).into_owned();
        entry.officer = Some(short(&officer.id, MAX_CLAIM_CHARS));
        entry.purpose = Some(short(&officer.purpose, MAX_PURPOSE_CHARS));
        entry.case_ref = officer
            .case_ref
            .as_deref()
            .map(|c| short(c, MAX_CLAIM_CHARS));
        entry.token_id = officer
            .token_id
            .as_deref()
            .map(|t| short(t, MAX_CLAIM_CHARS));
        // Bounded before anything else reads them: the record keeps them shortened.
        bounded(&officer, &parts.uri)?;
        // The gateway's own consent API is answered here, never forwarded (src/consent.rs).
        if let Some(api) = crate::consent::api_route(parts.uri.path()) {
            return self
                .consent_api(policy, agency, &officer, api, &parts, body, entry, ahead)
                .await;
        }
        let route = route(&parts.uri)?;
        entry.provider = Some(short(route.provider, MAX_NAME_CHARS));
        entry.service = Some(short(route.service, MAX_NAME_CHARS));
        let (base, service) = self.resolve(policy, &route)?;
        // `/{service}/{id}` names a data subject only where the service's records are persons.
        let path_person = if service.subject_field == "id" {
            path_subject(route.rest)
        } else {
            None
        };
        entry.subjects.extend(path_person.clone());
        let operation = Operation::from_method(&parts.method).ok_or_else(|| {
            Refusal::deny(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "method_not_allowed",
                "this method is not supported through the gateway",
            )
        })?;
        entry.operation = Some(operation.as_str().to_owned());
        entry.shadow_decision = shadow_decision(policy, agency, &route, operation, &officer);
        // Set before deciding: a refused request under a restricted grant reveals as much as an allowed one.
        entry.restricted = restricted_service(policy, agency, &route);
        let allow = decide(policy, agency, &route, operation, &officer)?;
        entry.legal_basis = Some(allow.legal_basis.to_string());
        entry.restricted |= allow.restricted;
        // A grant that pseudonymises serves no lookup naming a person (src/pseudonymity.rs).
        entry.pseudonymised = allow.transforms.pseudonymises();
        if entry.pseudonymised {
            crate::pseudonymity::check_lookup(service, route.rest, parts.uri.query())
                .map_err(|i| identifying_lookup(&i, route.provider, service))?;
        }
        // limit: the officer's, the grant's and the agency's quota (src/limits.rs).
        self.rate
            .check(agency, &officer.id, route.provider, route.service)
            .map_err(rate_limited)?;
        let (body, written) = match operation {
            Operation::Write => {
                let body = self
                    .read_body(body, &parts.headers, allow.max_body_bytes)
                    .await?;
                let written = write_fields(&body, &allow.fields, &route)?;
                (body, written)
            }
            Operation::Read => (Bytes::new(), None),
        };
        let subject = path_person.or_else(|| {
            written
                .as_ref()
                .and_then(|v| v.get(&service.subject_field))
                .and_then(|v| v.as_str())
                .and_then(|s| path_subject(&format!("/{s}")))
        });
        entry.consent_ref = self
            .consent(&allow, agency, &officer.purpose, &route, subject.as_deref())
            .await?;
        if crate::audit_api::is_builtin(policy, route.provider) {
            // The auditors' API: answered from the log itself, not forwarded.
            let ask = crate::audit_api::Ask {
                service: route.service,
                rest: route.rest,
                query: parts.uri.query(),
            };
            let asker = crate::audit_api::Asker {
                agency,
                purpose: &officer.purpose,
            };
            let served = crate::audit_api::serve(
                &self.audit,
                policy,
                asker,
                ask,
                &parts.headers,
                &allow.fields,
                entry,
            )
            .await
            .map_err(audit_api_refusal)?;
            entry.response_digest = Some(crate::audit_api::digest(&served.body));
            return Ok(Released {
                status: served.status,
                body: served.body,
                content_type: served.content_type,
            });
        }
        let query = narrow_fields(parts.uri.query(), &allow.fields)?;
        let query = self.open_cursor(query, agency, &route)?;
        if operation == Operation::Write {
            // Logged ahead: nothing reaches the provider before its attempt is committed.
            entry.request_digest = Some(crate::audit_api::digest(&body));
            entry.written = written.as_ref().map(written_paths).unwrap_or_default();
            // The person the body names, so their report shows the attempt even without an outcome.
            if let Some(s) = subject.as_ref().filter(|s| !entry.subjects.contains(s)) {
                entry.subjects.push(s.clone());
            }
            self.log_ahead(entry, ahead).await?;
        }
        let (status, body, content_type) = self
            .forward(
                &base,
                &route,
                &parts,
                query.as_deref(),
                body,
                &Caller {
                    agency,
                    officer: &officer,
                    request_id: &entry.id,
                },
            )
            .await?;
        let transform = crate::transform::Context {
            pseudonymiser: &self.pseudonymiser,
            agency,
            today: OffsetDateTime::now_utc().date(),
        };
        let released = minimise(
            status,
            body,
            content_type.as_deref(),
            (&allow.fields, &allow.transforms, &transform),
            service,
            entry,
        )?;
        // A consent covers one person: an answer about anyone else is withheld.
        if let (Some(_), Some(subject)) = (&entry.consent_ref, subject.as_deref()) {
            if entry.subjects.iter().any(|s| s != subject) {
                tracing::warn!(
                    provider = route.provider,
                    "answer under a consent names other subjects; withheld"
                );
                return Err(Refusal::error(
                    StatusCode::BAD_GATEWAY,
                    "provider-error",
                    "Bad gateway",
                    "consent_subject_mismatch",
                    "the provider's answer concerns persons the consent does not cover",
                ));
            }
        }
        Ok(released)
    }

    /// Reads a write's body: at most the grant's limit (capped by the gateway's), within the
    /// body timeout. A body refused as too large is first read on and dropped, within a bound,
    /// so that the refusal reaches a client still sending it ([`drain`]).
    async fn read_body(
        &self,
        mut body: Incoming,
        headers: &HeaderMap,
        grant_max: Option<usize>,
    ) -> Result<Bytes, Refusal> {
        let max = grant_max.map_or(self.limits.max_body_bytes, |g| {
            g.min(self.limits.max_body_bytes)
        });
        let read =
            tokio::time::timeout(self.limits.body_timeout, read_body(&mut body, headers, max))
                .await;
        match read {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(BodyError::TooLarge)) => {
                drain(&mut body, headers).await;
                Err(Refusal::deny(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body-too-large",
                    "Payload too large",
                    "body_too_large",
                    "the request body exceeds the gateway's limit",
                ))
            }
            Ok(Err(BodyError::Malformed)) => Err(Refusal::deny(
                StatusCode::BAD_REQUEST,
                "bad-request",
                "Bad request",
                "body_malformed",
                "the request body could not be read: its framing is malformed or it ended early",
            )),
            Err(_) => {
                // A slow upload holds a connection; it gets the header timeout's treatment.
                self.metrics.overload("gateway", "body_timeout");
                Err(Refusal::deny(
                    StatusCode::REQUEST_TIMEOUT,
                    "body-timeout",
                    "Request timeout",
                    "body_timeout",
                    "the request body did not arrive in time",
                ))
            }
        }
    }

    /// Verifies the bearer token against the connection's agency keys and certificate.
    fn token(
        &self,
        headers: &HeaderMap,
        agency: &str,
        bound_required: bool,
        conn: &ConnInfo,
    ) -> Result<Officer, Refusal> {
        let on = Presented {
            agency,
            certificate_sha256: conn.client.as_ref().map(|c| c.sha256.as_str()),
            require_bound: self.require_bound_tokens || bound_required,
        };
        let result = bearer(headers)
            .ok_or(TokenError::Missing)
            .and_then(|t| self.keys.load().verify(t, &on));
        result.map_err(|e| Refusal {
            challenge: true,
            ..Refusal::deny(
                StatusCode::UNAUTHORIZED,
                "invalid-token",
                "Unauthorized",
                e.code(),
                e.detail(),
            )
        })
    }

    /// The provider's base URL and the service description, or 404.
    fn resolve<'p>(
        &self,
        policy: &'p Policy,
        route: &Route<'_>,
    ) -> Result<(String, &'p Service), Refusal> {
        let not_found = || {
            Refusal::deny(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                "unknown_route",
                "no such provider or service",
            )
        };
        let provider = policy.provider(route.provider).ok_or_else(not_found)?;
        let service = policy
            .service(route.provider, route.service)
            .ok_or_else(not_found)?;
        let base = match &provider.upstream {
            Upstream::Url(url) => url.trim_end_matches('/').to_owned(),
            // Served in-process by the pipeline (src/audit_api.rs).
            Upstream::Builtin(name) if name == crate::audit_api::BUILTIN => String::new(),
            Upstream::Builtin(name) => self
                .builtin
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, url)| url.clone())
                .ok_or_else(|| {
                    tracing::warn!(provider = route.provider, builtin = %name, "built-in provider not running");
                    Refusal::error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "provider-unavailable",
                        "Service unavailable",
                        "upstream_unavailable",
                        "the provider is not available",
                    )
                })?,
        };
        Ok((base, service))
    }

    /// Sends the request to the provider with the gateway's certificate; returns status and body.
    async fn forward(
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
            .map_err(|_| {
                Refusal::deny(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    "Bad request",
                    "bad_path",
                    "the request path cannot be forwarded",
                )
            })?;
        // A HEAD is asked of the provider as the GET it stands for: the pipeline decides,
        // minimises and records that GET's answer, and the listener sends its headers
        // without the body (src/server.rs). Providers need not implement HEAD.
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
            .header("x-karibche-agency", caller.agency)
            .header("x-karibche-purpose", header_safe(&caller.officer.purpose))
            .header("x-karibche-officer", header_safe(&caller.officer.id));
        let up = up.body(Full::new(body)).map_err(|_| {
            Refusal::deny(
                StatusCode::BAD_REQUEST,
                "bad-request",
                "Bad request",
                "bad_header",
                "the request cannot be forwarded",
            )
        })?;
        let permit = self
            .providers
            .admit(route.provider, caller.agency)
            .await
            .map_err(|r| self.provider_refused(route.provider, r))?;
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
                (upstream_unavailable(), !ours)
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
                        let refusal = Refusal::error(
                            StatusCode::BAD_GATEWAY,
                            "provider-error",
                            "Bad gateway",
                            "upstream_too_large",
                            "the provider's answer exceeds the gateway's limit",
                        );
                        (refusal, false)
                    } else {
                        tracing::warn!(provider = route.provider, err = %e, "provider answer unreadable");
                        (upstream_unavailable(), true)
                    }
                })?
                .to_bytes();
            Ok((status, body, content_type))
        };
        match tokio::time::timeout(self.limits.upstream_timeout, call).await {
            Ok(Ok(x)) => {
                // 501: the provider does not implement what this request asks, which is not a failure.
                let failed = x.0.is_server_error() && x.0 != StatusCode::NOT_IMPLEMENTED;
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
                self.metrics.upstream_error();
                Err(refusal)
            }
            Err(_) => {
                permit.done(false);
                self.metrics.upstream_error();
                tracing::warn!(provider = route.provider, "provider timed out");
                Err(Refusal::error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "provider-timeout",
                    "Gateway timeout",
                    "upstream_timeout",
                    "the provider did not answer in time",
                ))
            }
        }
    }
}

impl Gateway {
    /// Opens the `cursor` of a forwarded query: only a cursor the gateway sealed
    /// for this agency and service reaches the provider (src/cursor.rs).
    fn open_cursor(
        &self,
        query: Option<String>,
        agency: &str,
        route: &Route<'_>,
    ) -> Result<Option<String>, Refusal> {
        let scope = crate::cursor::Scope {
            agency,
            provider: route.provider,
            service: route.service,
        };
        self.pseudonymiser
            .cursors()
            .open_query(query, scope, crate::cursor::now_secs())
            .map_err(|e| Refusal {
                detail: Cow::Owned(format!(
                    "{e}: pass back the `next` of your agency's last page unchanged, or start the search again without a cursor"
                )),
                ..Refusal::deny(
                    StatusCode::BAD_REQUEST,
                    "invalid-cursor",
                    "Bad request",
                    "cursor_invalid",
                    "",
                )
            })
    }

    /// A provider call not made: too many in flight, or its circuit breaker is open.
    fn provider_refused(&self, provider: &str, refused: Refused) -> Refusal {
        let (kind, reason, retry_after, detail) = match refused {
            Refused::Busy => (
                "provider_busy",
                "upstream_busy",
                Duration::from_secs(1),
                "the provider is busy with other requests of your agency or others; retry shortly",
            ),
            Refused::Open { retry_after } => (
                "breaker_open",
                "upstream_circuit_open",
                retry_after,
                "the provider is failing and is given time to recover; retry later",
            ),
        };
        self.metrics.overload("gateway", kind);
        tracing::debug!(provider, reason, "provider call not made");
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        Refusal {
            headers: vec![(header::RETRY_AFTER, HeaderValue::from(secs.max(1)))],
            ..Refusal::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "provider-unavailable",
                "Service unavailable",
                reason,
                detail,
            )
        }
    }
}

/// The auditors' API refused or failed a request.
fn audit_api_refusal(e: crate::audit_api::ApiError) -> Refusal {
    let base = Refusal::deny(e.status(), e.slug(), e.title(), e.reason(), "");
    Refusal {
        detail: Cow::Owned(e.detail()),
        denied: e.denied(),
        ..base
    }
}

/// limit: a quota is used up → 429 with `Retry-After` and the `RateLimit` headers.
fn rate_limited(e: Exceeded) -> Refusal {
    Refusal {
        detail: Cow::Owned(format!(
            "the {} quota is used up; retry after {} s",
            e.scope.as_str(),
            e.retry_after_secs()
        )),
        headers: e.headers(),
        ..Refusal::deny(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests",
            RATE_LIMITED,
            "",
        )
    }
}

/// agency: the client certificate → the agency the policy says holds it.
fn agency<'p>(
    policy: &'p Policy,
    client: Option<&PeerCert>,
) -> Result<&'p crate::policy::Agency, Refusal> {
    client
        .and_then(|c| policy.agency_for_certificate(c))
        .ok_or_else(|| {
            Refusal::deny(
                StatusCode::FORBIDDEN,
                "unknown-agency",
                "Forbidden",
                "unknown_certificate",
                "the client certificate belongs to no agency known to the gateway",
            )
        })
}

/// route: `/v1/{provider}/{service}/{rest}`; anything else is 404.
fn route(uri: &Uri) -> Result<Route<'_>, Refusal> {
    let not_found = || {
        Refusal::deny(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            "unknown_route",
            "gateway paths have the form /v1/{provider}/{service}/…",
        )
    };
    let path = uri.path().strip_prefix("/v1/").ok_or_else(not_found)?;
    let (provider, after) = path.split_once('/').ok_or_else(not_found)?;
    let (service, rest) = match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, ""),
    };
    if provider.is_empty() || service.is_empty() {
        return Err(not_found());
    }
    // Refuse anything a provider might resolve to another service than the
    // one the policy decided on: dot segments, empty segments, encoded separators.
    let suspicious = rest.split('/').skip(1).any(|s| {
        let lower = s.to_ascii_lowercase();
        s.is_empty()
            || s == "."
            || s == ".."
            || lower.contains("%2f")
            || lower.contains("%2e")
            || lower.contains("%5c")
    });
    if suspicious {
        return Err(Refusal::deny(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Bad request",
            "bad_path",
            "the path contains empty, dot or encoded separator segments",
        ));
    }
    Ok(Route {
        provider,
        service,
        rest,
    })
}

/// decide: the policy's verdict for agency × service × operation × purpose.
fn decide(
    policy: &Policy,
    agency: &str,
    route: &Route<'_>,
    operation: Operation,
    officer: &Officer,
) -> Result<crate::policy::Allow, Refusal> {
    let req = DecisionRequest {
        agency,
        provider: route.provider,
        service: route.service,
        operation,
        purpose: &officer.purpose,
        case_ref: officer.case_ref.as_deref(),
    };
    match policy.decide(&req, OffsetDateTime::now_utc().date()) {
        Decision::Allow(allow) => Ok(allow),
        Decision::Deny(DenyReason::CaseInvalid) => {
            let format = policy
                .agency(agency)
                .map(|a| a.case_format.describe())
                .unwrap_or_default();
            Err(Refusal {
                detail: Cow::Owned(format!(
                    "{} Expected: {format}.",
                    DenyReason::CaseInvalid.detail()
                )),
                ..denied(DenyReason::CaseInvalid)
            })
        }
        Decision::Deny(reason) => Err(denied(reason)),
    }
}

/// The decision of the agency's shadow grants for the service (`"allow"`/`"deny"`), recorded, never enforced.
fn shadow_decision(
    policy: &Policy,
    agency: &str,
    route: &Route<'_>,
    operation: Operation,
    officer: &Officer,
) -> Option<String> {
    let req = DecisionRequest {
        agency,
        provider: route.provider,
        service: route.service,
        operation,
        purpose: &officer.purpose,
        case_ref: officer.case_ref.as_deref(),
    };
    policy
        .decide_shadow(&req, OffsetDateTime::now_utc().date())
        .map(|d| match d {
            Decision::Allow(_) => "allow".to_owned(),
            Decision::Deny(_) => "deny".to_owned(),
        })
}

/// Whether any of the agency's grants for the service is marked `restricted` (kept out of subjects' reports for a while).
fn restricted_service(policy: &Policy, agency: &str, route: &Route<'_>) -> bool {
    policy.agency(agency).is_some_and(|a| {
        policy
            .grants_for(agency, route.provider, route.service)
            .iter()
            .any(|&i| a.grants.get(i).is_some_and(|g| g.restricted))
    })
}

fn denied(reason: DenyReason) -> Refusal {
    Refusal::deny(
        StatusCode::FORBIDDEN,
        "access-denied",
        "Forbidden",
        reason.code(),
        reason.detail(),
    )
}

impl Gateway {
    /// consent: where the grant needs it, the id of a valid consent of the
    /// request's one data subject for this agency, purpose and service.
    /// Read from the database on every request, so a revocation holds at once.
    async fn consent(
        &self,
        allow: &crate::policy::Allow,
        agency: &str,
        purpose: &str,
        route: &Route<'_>,
        subject: Option<&str>,
    ) -> Result<Option<String>, Refusal> {
        if !allow.consent_required {
            return Ok(None);
        }
        let missing = |detail: String| Refusal {
            detail: Cow::Owned(detail),
            ..Refusal::deny(
                StatusCode::FORBIDDEN,
                "consent-required",
                "Forbidden",
                "consent_missing",
                "",
            )
        };
        let Some(subject) = subject else {
            return Err(missing(
                "this access needs the data subject's consent, so the request must name one person (…/{service}/{id}); searches are not possible under it".to_owned(),
            ));
        };
        match self
            .consents
            .valid(subject, agency, purpose, route.provider, route.service)
            .await
        {
            Ok(Some(id)) => Ok(Some(id)),
            Ok(None) => Err(missing(format!(
                "no valid consent of data subject {subject} to agency {agency} for purpose {purpose} on {}/{} is on record: none was recorded, or it was revoked or has expired",
                route.provider, route.service
            ))),
            Err(err) => {
                tracing::error!(%err, "consent records cannot be read; refusing");
                Err(Refusal::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "consent-unavailable",
                    "Service unavailable",
                    "consent_store_unavailable",
                    "consent records cannot be checked now; no data is released",
                ))
            }
        }
    }

    /// `POST /v1/consents` and `POST /v1/consents/{id}/revoke`: authorised by the
    /// agency's grant on `gateway/consents` like any request, answered by the gateway.
    #[allow(clippy::too_many_arguments)]
    async fn consent_api(
        &self,
        policy: &Policy,
        agency: &str,
        officer: &Officer,
        api: Result<crate::consent::ApiRoute<'_>, ()>,
        parts: &http::request::Parts,
        body: Incoming,
        entry: &mut Entry,
        ahead: &mut Option<Attempt>,
    ) -> Result<Released, Refusal> {
        use crate::consent::{ApiRoute, API_PROVIDER, API_SERVICE};
        entry.provider = Some(API_PROVIDER.to_owned());
        entry.service = Some(API_SERVICE.to_owned());
        let api = api.map_err(|()| {
            Refusal::deny(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                "unknown_route",
                "consent paths are /v1/consents and /v1/consents/{id}/revoke",
            )
        })?;
        if let ApiRoute::Revoke(id) = api {
            entry.consent_ref = Some(id.to_owned());
        }
        if parts.method != http::Method::POST {
            return Err(Refusal::deny(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "method_not_allowed",
                "consents are recorded and revoked with POST",
            ));
        }
        entry.operation = Some(Operation::Write.as_str().to_owned());
        let route = Route {
            provider: API_PROVIDER,
            service: API_SERVICE,
            rest: "",
        };
        let allow = decide(policy, agency, &route, Operation::Write, officer)?;
        entry.legal_basis = Some(allow.legal_basis.to_string());
        let service = policy
            .service(API_PROVIDER, API_SERVICE)
            .ok_or_else(|| denied(crate::policy::DenyReason::UnknownService))?;
        self.rate
            .check(agency, &officer.id, API_PROVIDER, API_SERVICE)
            .map_err(rate_limited)?;
        let body = self
            .read_body(body, &parts.headers, allow.max_body_bytes)
            .await?;
        let written = write_fields(&body, &allow.fields, &route)?;
        let actor = crate::consent::Actor {
            agency: Some(agency.to_owned()),
            officer: officer.id.clone(),
            purpose: Some(officer.purpose.clone()),
            certificate: entry.certificate.clone(),
            token_id: officer.token_id.clone(),
            request_id: Some(entry.id.clone()),
            policy_version: policy.version().to_owned(),
        };
        // Refusals come first; then the attempt is committed, and only then the consent changed.
        enum Change {
            Grant(crate::consent::Consent),
            Revoke(crate::consent::Consent),
        }
        let change = match api {
            ApiRoute::Grant => {
                let new = crate::consent::parse_grant(&body, agency, &officer.purpose)
                    .map_err(consent_failed)?;
                // Recorded even if it is refused below, so kept to what a record may hold.
                entry.subjects = vec![text::shorten(&new.subject, MAX_CLAIM_CHARS).into_owned()];
                Change::Grant(
                    self.consents
                        .prepare_grant(new, &actor)
                        .map_err(consent_failed)?,
                )
            }
            ApiRoute::Revoke(id) => Change::Revoke(
                self.consents
                    .revocable(id, Some(agency))
                    .await
                    .map_err(consent_failed)?,
            ),
        };
        let (Change::Grant(c) | Change::Revoke(c)) = &change;
        entry.consent_ref = Some(c.id.clone());
        entry.subjects = vec![c.subject.clone()];
        entry.request_digest = Some(crate::audit_api::digest(&body));
        entry.written = match &change {
            Change::Grant(_) => written.as_ref().map(written_paths).unwrap_or_default(),
            Change::Revoke(_) => vec!["revoked_at".to_owned()],
        };
        let attempt = self.log_ahead(entry, ahead).await?;
        let (status, consent) = match change {
            Change::Grant(c) => {
                self.consents
                    .record(&c, attempt)
                    .await
                    .map_err(consent_failed)?;
                (StatusCode::CREATED, c)
            }
            Change::Revoke(c) => (
                StatusCode::OK,
                self.consents
                    .revoke_now(c, attempt)
                    .await
                    .map_err(consent_failed)?,
            ),
        };
        let json = serde_json::to_vec(&consent).map_err(|_| Refusal::internal())?;
        let transform = crate::transform::Context {
            pseudonymiser: &self.pseudonymiser,
            agency,
            today: OffsetDateTime::now_utc().date(),
        };
        minimise(
            status,
            Bytes::from(json),
            Some("application/json"),
            (&allow.fields, &allow.transforms, &transform),
            service,
            entry,
        )
    }
}

impl Gateway {
    /// Commits the attempt record of the change this request is about to
    /// make (the entry as it stands, decided and not yet answered) and keeps
    /// it in `ahead`, so the request's last record is its outcome.
    async fn log_ahead<'a>(
        &self,
        entry: &Entry,
        ahead: &'a mut Option<Attempt>,
    ) -> Result<&'a Attempt, Refusal> {
        let attempt = Entry {
            decision: "allow".to_owned(),
            status: 0,
            reason: None,
            ..entry.clone()
        };
        match self.audit.attempt(attempt).await {
            Ok(attempt) => Ok(ahead.insert(attempt)),
            Err(err) => {
                tracing::error!(request_id = %entry.id, %err, "attempt record not committed; the change is not made");
                Err(Refusal::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "audit-unavailable",
                    "Service unavailable",
                    "audit_unavailable",
                    "the request could not be recorded, so it was not carried out",
                ))
            }
        }
    }
}

/// The token's claims and the path, held to the limits of `crate::audit::text`:
/// a longer or control-character value is refused by name (its record keeps it shortened).
fn bounded(officer: &Officer, uri: &Uri) -> Result<(), Refusal> {
    let claims = [
        ("sub", Some(officer.id.as_str()), MAX_CLAIM_CHARS),
        ("purpose", Some(officer.purpose.as_str()), MAX_PURPOSE_CHARS),
        ("case", officer.case_ref.as_deref(), MAX_CLAIM_CHARS),
        ("jti", officer.token_id.as_deref(), MAX_CLAIM_CHARS),
    ];
    for (claim, value, max) in claims {
        let Some(value) = value else { continue };
        if let Err(unfit) = text::check(value, max) {
            return Err(Refusal {
                detail: Cow::Owned(format!("the token's {claim} claim {unfit}")),
                challenge: true,
                ..Refusal::deny(
                    StatusCode::UNAUTHORIZED,
                    "invalid-token",
                    "Unauthorized",
                    match unfit {
                        text::Unfit::TooLong { .. } => "token_claim_too_long",
                        text::Unfit::Control => "token_claim_invalid",
                    },
                    "",
                )
            });
        }
    }
    let path = uri.path_and_query().map_or("", |p| p.as_str());
    if text::check(path, MAX_PATH_CHARS).is_err() {
        return Err(Refusal::deny(
            StatusCode::URI_TOO_LONG,
            "uri-too-long",
            "URI too long",
            "path_too_long",
            "the request path with its query exceeds 2048 characters",
        ));
    }
    Ok(())
}

/// The field paths a write's body sets (`employer.name`, …): what its attempt record says it writes.
fn written_paths(body: &serde_json::Value) -> Vec<String> {
    fn walk(v: &serde_json::Value, path: &mut String, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(k);
                    walk(v, path, out);
                    path.truncate(len);
                }
            }
            serde_json::Value::Array(items) if items.iter().any(|x| x.is_object()) => {
                items.iter().for_each(|x| walk(x, path, out));
            }
            // Below a granted path the body may name members of its own: kept short and escaped.
            _ if !path.is_empty() => out.push(text::shorten(path, MAX_CLAIM_CHARS).into_owned()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(body, &mut String::new(), &mut out);
    out.sort_unstable();
    out.dedup();
    out
}

/// A consent change refused or failed, as the caller's problem.
fn consent_failed(e: crate::consent::ConsentError) -> Refusal {
    let status = e.status();
    if status.is_server_error() {
        tracing::error!(err = %e, "consent change failed");
    }
    Refusal {
        detail: Cow::Owned(e.detail()),
        denied: status.is_client_error(),
        ..Refusal::error(
            status,
            e.slug(),
            status.canonical_reason().unwrap_or("Error"),
            e.reason(),
            "",
        )
    }
}

/// A `fields=` list in the query is narrowed to the granted fields before it
/// reaches the provider (the answer is minimised anyway); a list naming no
/// granted field is refused by name rather than sent empty, which a provider
/// could read as "everything".
fn narrow_fields(
    query: Option<&str>,
    granted: &crate::minimise::FieldSet,
) -> Result<Option<String>, Refusal> {
    let Some(query) = query else {
        return Ok(None);
    };
    if !query.split('&').any(|p| p.starts_with("fields=")) {
        return Ok(Some(query.to_owned()));
    }
    let mut parts = Vec::new();
    for pair in query.split('&') {
        let Some(list) = pair.strip_prefix("fields=") else {
            parts.push(pair.to_owned());
            continue;
        };
        let list = list.replace("%2C", ",").replace("%2c", ",");
        let asked: Vec<&str> = list.split(',').filter(|f| !f.is_empty()).collect();
        let kept: Vec<&str> = asked
            .iter()
            .copied()
            .filter(|f| granted.overlaps(f))
            .collect();
        if kept.is_empty() {
            let first = asked.first().copied().unwrap_or_default();
            let shown: String = first
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_')
                .take(64)
                .collect();
            return Err(Refusal {
                detail: Cow::Owned(format!(
                    "none of the fields asked for (first: {shown:?}) is released to your agency by this grant"
                )),
                ..Refusal::deny(
                    StatusCode::FORBIDDEN,
                    "field-not-allowed",
                    "Forbidden",
                    "field_not_allowed",
                    "",
                )
            });
        }
        parts.push(format!("fields={}", kept.join(",")));
    }
    Ok(Some(parts.join("&")))
}

/// Writes carry only what the grant allows: a body member outside the
/// grant's `fields` is refused by name before anything is forwarded. Returns
/// the parsed body (`None` when empty).
fn write_fields(
    body: &[u8],
    fields: &crate::minimise::FieldSet,
    route: &Route<'_>,
) -> Result<Option<serde_json::Value>, Refusal> {
    fn outside(
        v: &serde_json::Value,
        path: &mut String,
        fields: &crate::minimise::FieldSet,
    ) -> bool {
        match v {
            serde_json::Value::Object(map) if !map.is_empty() => map.iter().any(|(k, v)| {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                let found = outside(v, path, fields);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            serde_json::Value::Array(items) if items.iter().any(|x| x.is_object()) => {
                items.iter().any(|x| outside(x, path, fields))
            }
            // An empty object names no field inside it: granting any part of it suffices.
            serde_json::Value::Object(_) => !fields.overlaps(path),
            _ => !fields.covers(path),
        }
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .ok()
        .filter(serde_json::Value::is_object)
        .ok_or_else(|| {
            Refusal::deny(
                StatusCode::BAD_REQUEST,
                "bad-request",
                "Bad request",
                "body_not_json",
                "a write's body must be a JSON object",
            )
        })?;
    let mut path = String::new();
    if !value.as_object().is_some_and(|m| m.is_empty()) && outside(&value, &mut path, fields) {
        return Err(Refusal {
            detail: Cow::Owned(format!(
                "field {path:?} is not among the fields your agency may write to {}/{}; nothing was written",
                route.provider, route.service
            )),
            ..Refusal::deny(
                StatusCode::FORBIDDEN,
                "field-not-allowed",
                "Forbidden",
                "field_not_allowed",
                "",
            )
        });
    }
    Ok(Some(value))
}

/// minimise: the provider's JSON reduced to the granted fields; provider errors passed on safely.
fn minimise(
    status: StatusCode,
    body: Bytes,
    content_type: Option<&str>,
    (fields, transforms, transform): (
        &crate::minimise::FieldSet,
        &crate::transform::Transforms,
        &crate::transform::Context<'_>,
    ),
    service: &Service,
    entry: &mut Entry,
) -> Result<Released, Refusal> {
    if !status.is_success() {
        entry.upstream_status = Some(status.as_u16());
        return Err(provider_problem(status, &body, service));
    }
    // Only JSON can be minimised; anything else is withheld rather than passed on whole.
    let json = content_type.is_some_and(|ct| {
        let ct = ct.split(';').next().unwrap_or_default().trim();
        ct.eq_ignore_ascii_case("application/json") || ct.ends_with("+json")
    });
    let parsed = if json {
        serde_json::from_slice::<serde_json::Value>(&body).ok()
    } else {
        None
    };
    let mut value = parsed.ok_or_else(|| {
        tracing::warn!(service = %service.id, "provider answered with something other than JSON");
        Refusal::error(
            StatusCode::BAD_GATEWAY,
            "provider-error",
            "Bad gateway",
            "upstream_bad_response",
            "the provider's answer could not be processed",
        )
    })?;
    let released = crate::minimise::apply(
        &mut value,
        fields,
        service.collection.as_deref(),
        &service.subject_field,
    );
    for s in released.subjects {
        if !entry.subjects.contains(&s) {
            entry.subjects.push(s);
        }
    }
    entry.fields = released.fields;
    crate::transform::apply(
        &mut value,
        service.collection.as_deref(),
        transforms,
        transform,
    );
    // The provider's cursor is its position (a register id); only a sealed one leaves (src/cursor.rs).
    if let (Some(agency), Some(provider)) = (entry.agency.as_deref(), entry.provider.as_deref()) {
        let scope = crate::cursor::Scope {
            agency,
            provider,
            service: &service.id,
        };
        transform
            .pseudonymiser
            .cursors()
            .seal_next(&mut value, scope, crate::cursor::now_secs())
            .map_err(|e| {
                tracing::warn!(service = %service.id, err = %e, "provider cursor not sealed; answer withheld");
                Refusal::error(
                    StatusCode::BAD_GATEWAY,
                    "provider-error",
                    "Bad gateway",
                    "upstream_bad_response",
                    "the provider's answer could not be processed",
                )
            })?;
    }
    let body = serde_json::to_vec(&value).map_err(|_| Refusal::internal())?;
    entry.response_digest = Some(crate::audit_api::digest(&body));
    Ok(Released {
        status,
        body: Bytes::from(body),
        content_type: "application/json",
    })
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
fn provider_problem(status: StatusCode, body: &[u8], service: &Service) -> Refusal {
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
    let owned = |status, slug, title, reason, detail: String| Refusal {
        detail: Cow::Owned(detail),
        ..Refusal::error(status, slug, title, reason, "")
    };
    match status.as_u16() {
        404 => Refusal::error(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            "upstream_not_found",
            "the provider has no such record",
        ),
        422 => match (kind, field) {
            (Some("invalid-field"), Some(f)) => owned(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-field",
                "Invalid field",
                "upstream_invalid_field",
                format!("the provider refused the value of {f}; see the service's documentation for its form; nothing was written"),
            ),
            _ => Refusal::error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-field",
                "Invalid field",
                "upstream_invalid_field",
                "the provider refused a value of the request; nothing was written",
            ),
        },
        409 => match (kind, field) {
            (Some("conflict"), Some(f)) => owned(
                StatusCode::CONFLICT,
                "conflict",
                "Conflict",
                "upstream_conflict",
                format!("the provider already holds a conflicting record ({f}); nothing was written"),
            ),
            _ => Refusal::error(
                StatusCode::CONFLICT,
                "conflict",
                "Conflict",
                "upstream_conflict",
                "the request conflicts with a record the provider holds; nothing was written",
            ),
        },
        400 => Refusal::error(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Bad request",
            "upstream_bad_request",
            "the provider refused the request as malformed; check its parameters against the service's documentation",
        ),
        401 => {
            tracing::error!(service = %service.id, "provider refused the gateway's credentials (401)");
            Refusal::error(
                StatusCode::BAD_GATEWAY,
                "provider-error",
                "Bad gateway",
                "upstream_unauthorized",
                "the provider refused the gateway's own credentials; your token was accepted",
            )
        }
        403 => Refusal::error(
            StatusCode::FORBIDDEN,
            "provider-denied",
            "Forbidden",
            "upstream_forbidden",
            "the provider refused this request; the gateway's policy allowed it",
        ),
        429 => Refusal {
            headers: vec![(header::RETRY_AFTER, HeaderValue::from_static("1"))],
            ..Refusal::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "provider-unavailable",
                "Service unavailable",
                "upstream_busy",
                "the provider is busy; retry shortly",
            )
        },
        _ => {
            tracing::warn!(service = %service.id, status = status.as_u16(), "provider answered with an error");
            Refusal::error(
                StatusCode::BAD_GATEWAY,
                "provider-error",
                "Bad gateway",
                "upstream_error",
                "the provider failed to answer the request",
            )
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

/// A lookup a pseudonymising grant does not serve: refused, and recorded, before the provider is asked.
fn identifying_lookup(
    lookup: &crate::pseudonymity::Identifying,
    provider: &str,
    service: &Service,
) -> Refusal {
    Refusal {
        detail: Cow::Owned(lookup.detail(provider, service)),
        ..Refusal::deny(
            StatusCode::FORBIDDEN,
            "identifying-lookup",
            "Forbidden",
            "identifying_lookup",
            "",
        )
    }
}

fn upstream_unavailable() -> Refusal {
    Refusal::error(
        StatusCode::BAD_GATEWAY,
        "provider-unavailable",
        "Bad gateway",
        "upstream_unavailable",
        "the provider could not be reached",
    )
}

/// The documented bound on a request's head, in octets, as [`head_size`] counts it.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Header fields per request (hyper's own bound over HTTP/1.1, held to over HTTP/2 alike).
pub const MAX_HEADER_FIELDS: usize = 100;

/// A request's head as [`MAX_HEAD_BYTES`] counts it, the same over HTTP/1.1 and HTTP/2: the
/// request target (path and query), and each header field's name and value plus 32 octets
/// (HTTP/2's measure of a header list, RFC 9113 §6.5.2). An authority given as `:authority`
/// rather than `Host` counts as the `Host` field it stands for.
pub fn head_size(parts: &http::request::Parts) -> usize {
    let target = parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
    let fields: usize = parts
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 32)
        .sum();
    let authority = match parts.uri.authority() {
        Some(a) if !parts.headers.contains_key(header::HOST) => {
            "host".len() + a.as_str().len() + 32
        }
        _ => 0,
    };
    target + fields + authority
}

/// A request's head must be within the documented bounds and name one authority: exactly
/// one valid `Host` over HTTP/1.1, and where both `Host` and the request target (or HTTP/2's
/// `:authority`) name one, the same. Checked in the handler, so the refusal is
/// problem+json and recorded; hyper only enforces a bound twice as large (src/server.rs).
fn request_head(parts: &http::request::Parts) -> Result<(), Refusal> {
    let too_large = |detail: &'static str| {
        Refusal::deny(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers-too-large",
            "Request header fields too large",
            "headers_too_large",
            detail,
        )
    };
    if parts.headers.len() > MAX_HEADER_FIELDS {
        return Err(too_large("the request has more than 100 header fields"));
    }
    if head_size(parts) > MAX_HEAD_BYTES {
        return Err(too_large(
            "the request's head exceeds 64 KiB (65,536 octets: the target, and each header field's name and value plus 32)",
        ));
    }
    let bad_host = |detail: &'static str| {
        Refusal::deny(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Bad request",
            "bad_host",
            detail,
        )
    };
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(bad_host("the request carries more than one Host header"));
    }
    let Some(host) = host else {
        return match parts.version {
            http::Version::HTTP_11 => Err(bad_host("an HTTP/1.1 request must carry a Host header")),
            _ => Ok(()),
        };
    };
    let host = host
        .to_str()
        .ok()
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .filter(|a| !a.as_str().contains('@'))
        .ok_or_else(|| bad_host("the Host header is not a valid host name"))?;
    match parts.uri.authority() {
        Some(a) if !a.as_str().eq_ignore_ascii_case(host.as_str()) => Err(bad_host(
            "the Host header and the request's authority name different hosts",
        )),
        _ => Ok(()),
    }
}

/// Why a request body was not read.
#[derive(Debug, PartialEq, Eq)]
enum BodyError {
    /// Over the limit, declared or found on reading.
    TooLarge,
    /// Bad chunked framing, a length the data does not match, or a body cut short.
    Malformed,
}

/// Reads a request body up to `max` bytes; one declared larger is refused before it is read.
async fn read_body<B>(body: &mut B, headers: &HeaderMap, max: usize) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    if declared_length(headers).is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut read = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| BodyError::Malformed)?.into_data() else {
            continue; // trailers
        };
        if read.len() + data.len() > max {
            return Err(BodyError::TooLarge);
        }
        read.extend_from_slice(&data);
    }
    Ok(read.freeze())
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// The most of a refused body still read and dropped, and for how long.
const DRAIN_BYTES: u64 = 4 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// Reads the rest of a refused body and drops it, up to [`DRAIN_BYTES`] within [`DRAIN_TIME`].
///
/// A client that sends its whole body before it reads the answer would otherwise meet a
/// reset stream (HTTP/2) or a reset connection (HTTP/1.1) instead of the 413. A body
/// declared larger than the bound, or sent only after `Expect: 100-continue`, is not read.
async fn drain<B>(body: &mut B, headers: &HeaderMap)
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let expects = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects || declared_length(headers).is_some_and(|n| n > DRAIN_BYTES) {
        return;
    }
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut left = DRAIN_BYTES;
        while let Some(Ok(frame)) = body.frame().await {
            let n = frame.data_ref().map_or(0, |d| d.len() as u64);
            match left.checked_sub(n) {
                Some(l) => left = l,
                None => return,
            }
        }
    })
    .await;
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

/// By convention `/{service}/{id}/…` names the data subject; recorded even when access is refused.
fn path_subject(rest: &str) -> Option<String> {
    let first = rest.split('/').nth(1)?;
    let plausible = !first.is_empty()
        && first.len() <= 64
        && first
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    plausible.then(|| first.to_owned())
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

fn released_response(
    status: StatusCode,
    body: Bytes,
    content_type: &'static str,
) -> Response<Body> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Result<Route<'_>, &'static str> {
        // Leak is fine in tests: a Uri that outlives the call.
        let uri: &'static Uri = Box::leak(Box::new(s.parse::<Uri>().unwrap()));
        route(uri).map_err(|e| e.reason)
    }

    #[test]
    fn routes_split_provider_service_rest() {
        let ok = r("/v1/registry/persons/RF-1/visas?x=1").unwrap();
        assert_eq!(
            (ok.provider, ok.service, ok.rest),
            ("registry", "persons", "/RF-1/visas")
        );
        let bare = r("/v1/registry/persons?document=X").unwrap();
        assert_eq!(bare.rest, "");
        assert_eq!(r("/v2/registry/persons"), Err("unknown_route"));
        assert_eq!(r("/v1/registry"), Err("unknown_route"));
        assert_eq!(r("/v1/registry/persons/../crossings"), Err("bad_path"));
        assert_eq!(r("/v1/registry/persons/%2e%2e/x"), Err("bad_path"));
        assert_eq!(r("/v1/registry/persons//x"), Err("bad_path"));
    }

    #[test]
    fn bearer_and_subjects() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc.def.ghi"),
        );
        assert_eq!(bearer(&h), Some("abc.def.ghi"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic xyz"));
        assert_eq!(bearer(&h), None);
        assert_eq!(path_subject("/RF-0000001/visas"), Some("RF-0000001".into()));
        assert_eq!(path_subject(""), None);
        assert_eq!(header_safe("a\u{1}b"), "a?b");
    }

    #[test]
    fn write_bodies_are_held_to_the_granted_fields() {
        let fields = crate::minimise::FieldSet::from_paths(&["person_id", "employer.name", "tags"]);
        let route = Route {
            provider: "registry",
            service: "work_permits",
            rest: "",
        };
        let check = |body: &str| write_fields(body.as_bytes(), &fields, &route);
        assert!(check("").unwrap().is_none());
        assert!(check("{}").is_ok());
        assert!(check(r#"{"person_id":"P-1","employer":{"name":"X"},"tags":["a","b"]}"#).is_ok());
        assert!(check(r#"{"employer":[{"name":"X"},{"name":"Y"}]}"#).is_ok());
        let refused = |body: &str| {
            let r = check(body).unwrap_err();
            assert_eq!(r.status, StatusCode::FORBIDDEN);
            r.detail.into_owned()
        };
        assert!(refused(r#"{"person_id":"P-1","note":"x"}"#).contains("\"note\""));
        assert!(
            refused(r#"{"employer":{"name":"X","tax_id":"1"}}"#).contains("\"employer.tax_id\"")
        );
        assert!(refused(r#"{"employer":[{"name":"X"},{"tax_id":"1"}]}"#)
            .contains("\"employer.tax_id\""));
        // A granted path covers its subtree.
        assert!(check(r#"{"person_id":{"inner":1}}"#).is_ok());
        assert_eq!(check("[1]").unwrap_err().status, StatusCode::BAD_REQUEST);
        assert_eq!(
            check("not json").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn field_lists_are_narrowed_to_the_grant() {
        let granted = crate::minimise::FieldSet::from_paths(&["id", "names", "visas.category"]);
        let n = |q: Option<&str>| narrow_fields(q, &granted).map_err(|r| r.reason);
        assert_eq!(n(None), Ok(None));
        assert_eq!(n(Some("document=X")), Ok(Some("document=X".into())));
        assert_eq!(
            n(Some("fields=id,personal_number,names.surname,visas&x=1")),
            Ok(Some("fields=id,names.surname,visas&x=1".into()))
        );
        assert_eq!(
            n(Some("fields=id%2Cdocuments")),
            Ok(Some("fields=id".into()))
        );
        assert_eq!(n(Some("fields=documents")), Err("field_not_allowed"));
        assert_eq!(n(Some("fields=")), Err("field_not_allowed"));
    }

    #[test]
    fn provider_errors_become_the_gateways_own_problems() {
        let service = Service {
            id: "visas".into(),
            title: "Visas".into(),
            operations: vec![Operation::Write],
            subject_field: "person_id".into(),
            collection: None,
            fields: Some(crate::minimise::FieldSet::from_paths(&[
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
            (r.status.as_u16(), r.slug, r.reason, r.detail.into_owned())
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
