//! The request pipeline: every step of a request, in order, each a named
//! function in the file named for it, returning a typed result.
//!
//! ```text
//! authn → route → authz → limit → body → consent → forward → release → audit → respond
//!   │       │       │       │       │       │         │         │         │
//! agency  provider decide  quotas  a write's consent  provider  minimise  the record,
//! token   service  shadow          body,    of the    call,     transform built once
//! bounds  builtin? lookups         fields   subject   breaker   cursors   (exchange)
//! ```
//!
//! [`authn`] knows the agency and the officer, [`route`] the provider and
//! where it is served, [`authz`] what the policy allows, [`limit`] the
//! quotas, [`body`] a write's body, [`consent`] the data subject's consent,
//! [`forward`] the provider's answer and [`release`] what of it leaves. A
//! built-in provider ([`builtin`]) answers in place of forward and release.
//! Every refusal is one of [`refusal`]'s; every fact for the record goes to
//! the [`exchange`], which builds the audit entry once.
//!
//! Whatever happens, [`Gateway::handle`] ends by committing the request's
//! audit record, and only a committed record lets a response leave: if the
//! log cannot be written the caller gets 503 and no data. A change (a write
//! to a provider, a consent) is logged ahead: its attempt record is committed
//! before it is forwarded or made, and `handle` ends with its outcome record
//! (`crate::audit::ahead`). [`Gateway::handle_detached`] runs each request as
//! a task of its own, so a client that resets its stream or closes its
//! connection cannot cut a pipeline short between a change and its record.

pub mod access;
pub mod authn;
pub mod authz;
pub mod body;
pub mod builtin;
pub mod consent;
pub mod exchange;
pub mod forward;
pub mod limit;
pub mod refusal;
pub mod release;
pub mod route;
pub mod trace;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tracing::Instrument;

use crate::audit::sampling::Sample;
use crate::audit::{Attempt, AuditLog};
use crate::identity::token::KeyStore;
use crate::identity::ConnInfo;
use crate::limits::{Limits, RATE_LIMITED};
use crate::metrics::Metrics;
use crate::policy::{Operation, Policy};
use crate::problem::Body;
use access::Access;
use authz::Asked;
use exchange::{Ending, Exchange};
use forward::Caller;
use refusal::Refusal;
use release::Answer;
use route::Target;
use trace::TraceContext;

pub use body::{head_size, MAX_HEADER_FIELDS, MAX_HEAD_BYTES};
pub use forward::{upstream_client, UpstreamClient};

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
    pub upstream: forward::UpstreamClient,
    /// Base URLs of in-process providers on listeners of their own (`builtin:registry` → `https://127.0.0.1:8444`).
    pub builtin: Vec<(String, String)>,
    /// Pipeline bounds.
    pub limits: PipelineLimits,
    /// The key behind `pseudonymise` transforms.
    pub pseudonymiser: Arc<release::transform::Pseudonymiser>,
    /// Agency, officer and grant quotas.
    pub rate: Arc<Limits>,
    /// Take the agencies' W3C `traceparent`/`tracestate` (`tracing.trust_incoming`); otherwise every request starts a trace.
    pub trust_trace: bool,
    /// Concurrency caps and circuit breakers of providers.
    pub providers: Arc<forward::breaker::Providers>,
    /// Consent records: checked for `consent = "required"` grants, recorded through `/v1/consents`.
    pub consents: crate::consent::Consents,
    /// The requests' pipelines, each a task of its own; shutdown waits for them.
    pub pipelines: tokio_util::task::TaskTracker,
    /// What the administrators' API reads beyond the above (policy history, certificate files, latency snapshots).
    pub administration: Arc<builtin::admin::Sources>,
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
            // Boxed: the pipeline's state is several KiB, and a task's future is moved
            // whole at every change of its stage (spawn, completion, the join), so
            // spawning it unboxed costs more in copies than the allocation does.
            Some(self.pipelines.spawn(Box::pin(async move {
                let _slot = slot;
                gateway.handle(conn, req).await
            })))
        } else {
            self.metrics.overload("gateway", "pipelines_connection");
            None
        };
        async move {
            let Some(task) = task else {
                return Refusal::OVER_PIPELINES
                    .retry_after(Duration::from_secs(1))
                    .to_response(None);
            };
            task.await.unwrap_or_else(|err| {
                tracing::error!(%err, "request pipeline ended abnormally");
                Refusal::INTERNAL.to_response(None)
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
    ///
    /// Everything logged on the way carries the request id (a `request` span),
    /// and the request ends with its access line ([`access`]).
    pub async fn handle(&self, conn: Arc<ConnInfo>, req: Request<Incoming>) -> Response<Body> {
        let policy = self.policy.load_full();
        let path = req.uri().path_and_query().map_or("", |p| p.as_str());
        let mut exchange = Exchange::start(
            req.method().as_str(),
            path,
            conn.client.as_ref().map(|c| c.sha256.as_str()),
            policy.version(),
        );
        exchange.trace(TraceContext::from_headers(req.headers(), self.trust_trace));
        let span = tracing::info_span!(
            "request",
            request_id = %exchange.id,
            trace_id = %exchange.trace_context().trace_id,
        );
        self.handle_exchange(policy, conn, req, exchange)
            .instrument(span)
            .await
    }

    async fn handle_exchange(
        &self,
        policy: Arc<Policy>,
        conn: Arc<ConnInfo>,
        req: Request<Incoming>,
        mut exchange: Exchange,
    ) -> Response<Body> {
        let started = Instant::now();
        // Set once a change's attempt is committed; its outcome is then this request's last record.
        let mut ahead = None;
        let outcome = self
            .pipeline(&policy, &conn, req, &mut exchange, &mut ahead)
            .await;
        let (status, entry) = match &outcome {
            Ok(answer) => (
                answer.status,
                exchange.entry(Ending {
                    denied: false,
                    status: answer.status.as_u16(),
                    reason: None,
                }),
            ),
            Err(refusal) => (
                refusal.status,
                exchange.entry(Ending {
                    denied: refusal.side.is_denial(),
                    status: refusal.status.as_u16(),
                    reason: Some(refusal.reason),
                }),
            ),
        };
        let access = Access::of(&entry);
        let [agency, provider, service] = access.labels(&policy);
        if let Err(refusal) = &outcome {
            // A provider's 404/422 on an allowed request is no denial: it counts as a failure.
            self.metrics
                .refused(agency, refusal.reason, refusal.side.is_denial());
        }
        let mut id = exchange.id.clone();
        // A flood of 429s is folded into summary records (src/limits.rs); a 429 carries no data.
        let sample = if entry.reason.as_deref() == Some(RATE_LIMITED) {
            self.audit.refusals().sample(&entry, Instant::now())
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
        let mut resp = match (recorded, outcome) {
            (Ok(()), Ok(answer)) => released_response(status, answer.body, answer.content_type),
            (Ok(()), Err(refusal)) => refusal.to_response(Some(&id)),
            (Err(err), _) => {
                tracing::error!(%err, "audit record not committed; refusing the request");
                self.metrics.audit_failure();
                Refusal::AUDIT_UNAVAILABLE.to_response(Some(&id))
            }
        };
        if let Ok(v) = HeaderValue::from_str(&id) {
            resp.headers_mut().insert("x-request-id", v);
        }
        let total = started.elapsed();
        self.metrics
            .request_done(agency, provider, service, resp.status(), total);
        access.log(&access::Finished {
            id: &id,
            status: resp.status().as_u16(),
            bytes: hyper::body::Body::size_hint(resp.body())
                .exact()
                .unwrap_or(0),
            upstream: exchange.upstream_took(),
            total,
            trace_id: &exchange.trace_context().trace_id,
        });
        resp
    }

    /// The steps in order; each records what it learnt on the exchange.
    async fn pipeline(
        &self,
        policy: &Policy,
        conn: &ConnInfo,
        req: Request<Incoming>,
        exchange: &mut Exchange,
        ahead: &mut Option<Attempt>,
    ) -> Result<Answer, Refusal> {
        let (parts, body) = req.into_parts();
        // authn: the agency from its certificate, the officer from the token.
        let holder = authn::agency(policy, conn.client.as_ref())?;
        let agency = holder.id.as_str();
        exchange.agency(agency);
        body::request_head(&parts)?;
        let officer = self.officer(&parts.headers, holder, conn)?;
        exchange.officer(&officer);
        // Bounded before anything else reads them: the record keeps them shortened.
        authn::bounded(&officer, &parts.uri)?;
        // route: the provider and service, and where the provider is served.
        let route = route::route(&parts.uri)?;
        exchange.route(route.provider, route.service);
        let (target, service) = self.resolve(policy, &route)?;
        // `/{service}/{id}` names a data subject only where the service's records are persons.
        let path_person = if service.subject_field == "id" {
            route::path_subject(route.rest)
        } else {
            None
        };
        if let Some(p) = &path_person {
            exchange.subject(p);
        }
        let operation = match &target {
            Target::Builtin(b) => b.operation(&route, &parts.method, exchange)?,
            Target::Url(_) => {
                Operation::from_method(&parts.method).ok_or(Refusal::METHOD_NOT_ALLOWED)?
            }
        };
        exchange.operation(operation);
        // authz: the policy's verdict.
        let asked = Asked {
            agency,
            officer: &officer,
            route: &route,
            operation,
        };
        let allow = authz::authorise(policy, asked, service, parts.uri.query(), exchange)?;
        // limit: the officer's, the grant's and the agency's quota.
        self.limit(agency, &officer.id, &route).await?;
        // body: a write's, within the grant's limit and fields.
        let (body, written) = match operation {
            Operation::Write => {
                let body = self
                    .read_body(body, &parts.headers, allow.max_body_bytes)
                    .await?;
                let written = authz::write_fields(&body, &allow.fields, &route)?;
                (body, written)
            }
            Operation::Read => (Bytes::new(), None),
        };
        let subject = path_person.or_else(|| {
            written
                .as_ref()
                .and_then(|v| v.get(&service.subject_field))
                .and_then(|v| v.as_str())
                .and_then(|s| route::path_subject(&format!("/{s}")))
        });
        // consent: where the grant needs it.
        if let Some(id) = self
            .consent(&allow, agency, &officer.purpose, &route, subject.as_deref())
            .await?
        {
            exchange.consent(&id);
        }
        let base = match target {
            Target::Builtin(builtin) => {
                let call = builtin::Call {
                    gateway: self,
                    policy,
                    agency,
                    officer: &officer,
                    route: &route,
                    parts: &parts,
                    allow: &allow,
                    service,
                    body,
                    written,
                };
                return builtin.serve(call, exchange, ahead).await;
            }
            Target::Url(base) => base,
        };
        let query = authz::narrow_fields(parts.uri.query(), &allow.fields)?;
        let query = self.open_cursor(query, agency, &route)?;
        if operation == Operation::Write {
            // Logged ahead: nothing reaches the provider before its attempt is committed.
            let paths = written
                .as_ref()
                .map(exchange::written_paths)
                .unwrap_or_default();
            exchange.writes(&body, paths);
            // The person the body names, so their report shows the attempt even without an outcome.
            if let Some(s) = &subject {
                exchange.subject(s);
            }
            self.log_ahead(exchange, ahead).await?;
        }
        // forward: the provider's answer.
        let caller = Caller {
            agency,
            officer: &officer,
            request_id: &exchange.id,
            trace: exchange.trace_context(),
        };
        let sent = Instant::now();
        let forwarded = self
            .forward(&base, &route, &parts, query.as_deref(), body, &caller)
            .await;
        exchange.upstream_time(sent.elapsed());
        let (status, body, content_type) = forwarded?;
        if !status.is_success() {
            exchange.upstream_status(status.as_u16());
            return Err(forward::provider_problem(status, &body, service));
        }
        // release: what of it leaves.
        let answer = self.release(
            (status, body, content_type.as_deref()),
            &allow,
            agency,
            (&route, service),
            exchange,
        )?;
        // A consent covers one person: an answer about anyone else is withheld.
        if let (Some(_), Some(subject)) = (exchange.consent_ref(), subject.as_deref()) {
            if exchange.subjects().iter().any(|s| s != subject) {
                tracing::warn!(
                    provider = route.provider,
                    "answer under a consent names other subjects; withheld"
                );
                return Err(Refusal::CONSENT_SUBJECT_MISMATCH);
            }
        }
        Ok(answer)
    }

    /// Commits the attempt record of the change this request is about to
    /// make (the exchange as it stands, allowed and not yet answered) and keeps
    /// it in `ahead`, so the request's last record is its outcome.
    pub(crate) async fn log_ahead<'a>(
        &self,
        exchange: &Exchange,
        ahead: &'a mut Option<Attempt>,
    ) -> Result<&'a Attempt, Refusal> {
        match self.audit.attempt(exchange.entry(Ending::ATTEMPT)).await {
            Ok(attempt) => Ok(ahead.insert(attempt)),
            Err(err) => {
                tracing::error!(%err, "attempt record not committed; the change is not made");
                Err(Refusal::AUDIT_UNAVAILABLE)
            }
        }
    }
}

/// Data released: the body with its media type, never cached.
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
