//! The gateway's one refusal vocabulary: every answer other than released
//! data is a [`Refusal`], and every kind of refusal is one constant here.
//!
//! A refusal carries what the caller sees (status, problem type, title, a
//! detail safe to show), what the audit record keeps (the reason code) and
//! which side failed ([`Side`]): the caller's request, the policy, the
//! provider, or the gateway itself. The side decides the record's
//! `decision`: a refusal by the caller's or the policy's side is a `deny`; a
//! provider or internal failure of a request the policy allowed stays an
//! `allow` that did not complete.
//!
//! The errors of the modules the pipeline calls (tokens, the policy's
//! [`DenyReason`], consents, the audit log, the auditors' API, quotas, the
//! providers' admission) are mapped to refusals in this file only, so a
//! reader finds every status, slug and reason code the gateway answers with
//! in one place.

use std::borrow::Cow;
use std::time::Duration;

use http::{header, HeaderName, HeaderValue, Response, StatusCode};

use crate::audit::text::Unfit;
use crate::audit::AuditError;
use crate::consent::ConsentError;
use crate::gateway::builtin::audit::ApiError;
use crate::gateway::forward::breaker::Refused;
use crate::identity::token::TokenError;
use crate::limits::{Exceeded, RATE_LIMITED};
use crate::policy::DenyReason;
use crate::problem::{Body, Problem};

/// Which side a refusal comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The request itself is unfit: malformed, too large, unauthenticated.
    Caller,
    /// The policy (grants, quotas, consents) does not allow it.
    Policy,
    /// The provider failed or refused a request the policy allowed.
    Provider,
    /// The gateway itself failed (its log, its stores, a bug).
    Internal,
}

impl Side {
    /// Whether the gateway's own checks refused the request (recorded as `deny`).
    pub fn is_denial(self) -> bool {
        matches!(self, Side::Caller | Side::Policy)
    }
}

/// What the caller is told and the log records when a request is not answered with data.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// HTTP status.
    pub status: StatusCode,
    /// Problem type slug (`urn:karibche:problem:<slug>`).
    pub problem: &'static str,
    /// Problem title.
    pub title: &'static str,
    /// Reason code in the audit record and the metrics.
    pub reason: &'static str,
    /// Detail safe to show the caller.
    pub detail: Cow<'static, str>,
    /// Which side failed.
    pub side: Side,
    /// Sent with `WWW-Authenticate: Bearer error="invalid_token"`.
    pub challenge: bool,
    /// Sent with the problem (`Retry-After`, `RateLimit`, …).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// One refusal kind, written as a constant below.
const fn kind(
    status: StatusCode,
    problem: &'static str,
    title: &'static str,
    reason: &'static str,
    detail: &'static str,
    side: Side,
) -> Refusal {
    Refusal {
        status,
        problem,
        title,
        reason,
        detail: Cow::Borrowed(detail),
        side,
        challenge: false,
        headers: Vec::new(),
    }
}

use Side::{Caller, Internal, Policy, Provider};
use StatusCode as S;

impl Refusal {
    // ---- the gateway itself ----------------------------------------------------------

    /// 500 with a fixed detail: the cause is the gateway's, and stays in its logs.
    pub const INTERNAL: Refusal = kind(
        S::INTERNAL_SERVER_ERROR,
        "internal",
        "Internal error",
        "internal",
        "the server could not complete the request",
        Internal,
    );
    /// The audit log cannot take the request's record (its attempt, its outcome, or its one record).
    pub const AUDIT_UNAVAILABLE: Refusal = kind(
        S::SERVICE_UNAVAILABLE,
        "audit-unavailable",
        "Service unavailable",
        "audit_unavailable",
        "the access log cannot be written; no data is released",
        Internal,
    );
    /// The auditors' API could not read the log.
    pub const AUDIT_READ_FAILED: Refusal = kind(
        S::SERVICE_UNAVAILABLE,
        "audit-unavailable",
        "Service unavailable",
        "audit_read_failed",
        "the audit log could not be read",
        Internal,
    );
    /// The auditors' API failed otherwise.
    pub const AUDIT_READ_INTERNAL: Refusal = kind(
        S::INTERNAL_SERVER_ERROR,
        "internal",
        "Internal error",
        "audit_read_failed",
        "the audit log could not be read",
        Internal,
    );
    /// Consent records cannot be checked.
    pub const CONSENT_UNAVAILABLE: Refusal = kind(
        S::SERVICE_UNAVAILABLE,
        "consent-unavailable",
        "Service unavailable",
        "consent_store_unavailable",
        "consent records cannot be checked now; no data is released",
        Internal,
    );
    /// A connection has too many pipelines running.
    pub const OVER_PIPELINES: Refusal = kind(
        S::SERVICE_UNAVAILABLE,
        "over-capacity",
        "Service unavailable",
        "over_capacity",
        "this connection has too many requests running; retry shortly",
        Internal,
    );

    // ---- the caller's request --------------------------------------------------------

    /// The client certificate names no agency.
    pub const UNKNOWN_AGENCY: Refusal = kind(
        S::FORBIDDEN,
        "unknown-agency",
        "Forbidden",
        "unknown_certificate",
        "the client certificate belongs to no agency known to the gateway",
        Caller,
    );
    /// Not a gateway path.
    pub const NOT_GATEWAY_PATH: Refusal = kind(
        S::NOT_FOUND,
        "not-found",
        "Not found",
        "unknown_route",
        "gateway paths have the form /v1/{provider}/{service}/…",
        Caller,
    );
    /// No such provider or service in the providers table.
    pub const UNKNOWN_ROUTE: Refusal = kind(
        S::NOT_FOUND,
        "not-found",
        "Not found",
        "unknown_route",
        "no such provider or service",
        Caller,
    );
    /// A path a provider might resolve to another service than the one decided on.
    pub const SUSPICIOUS_PATH: Refusal = kind(
        S::BAD_REQUEST,
        "bad-request",
        "Bad request",
        "bad_path",
        "the path contains empty, dot or encoded separator segments",
        Caller,
    );
    /// A path that cannot be forwarded as a URI.
    pub const UNFORWARDABLE_PATH: Refusal = kind(
        S::BAD_REQUEST,
        "bad-request",
        "Bad request",
        "bad_path",
        "the request path cannot be forwarded",
        Caller,
    );
    /// A header that cannot be forwarded.
    pub const UNFORWARDABLE_HEADER: Refusal = kind(
        S::BAD_REQUEST,
        "bad-request",
        "Bad request",
        "bad_header",
        "the request cannot be forwarded",
        Caller,
    );
    /// A method the gateway does not carry.
    pub const METHOD_NOT_ALLOWED: Refusal = kind(
        S::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "method_not_allowed",
        "this method is not supported through the gateway",
        Caller,
    );
    /// The path and query exceed the record's bound.
    pub const URI_TOO_LONG: Refusal = kind(
        S::URI_TOO_LONG,
        "uri-too-long",
        "URI too long",
        "path_too_long",
        "the request path with its query exceeds 2048 characters",
        Caller,
    );
    /// Too many header fields, or too large a head (detail says which).
    pub const HEADERS_TOO_LARGE: Refusal = kind(
        S::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "headers-too-large",
        "Request header fields too large",
        "headers_too_large",
        "the request's head is too large",
        Caller,
    );
    /// No, several, or disagreeing authorities (detail says which).
    pub const BAD_HOST: Refusal = kind(
        S::BAD_REQUEST,
        "bad-request",
        "Bad request",
        "bad_host",
        "the request's Host is not acceptable",
        Caller,
    );
    /// A body over the grant's or the gateway's limit.
    pub const BODY_TOO_LARGE: Refusal = kind(
        S::PAYLOAD_TOO_LARGE,
        "body-too-large",
        "Payload too large",
        "body_too_large",
        "the request body exceeds the gateway's limit",
        Caller,
    );
    /// A body with broken framing.
    pub const BODY_MALFORMED: Refusal = kind(
        S::BAD_REQUEST,
        "bad-request",
        "Bad request",
        "body_malformed",
        "the request body could not be read: its framing is malformed or it ended early",
        Caller,
    );
    /// A body that did not arrive within the body timeout.
    pub const BODY_TIMEOUT: Refusal = kind(
        S::REQUEST_TIMEOUT,
        "body-timeout",
        "Request timeout",
        "body_timeout",
        "the request body did not arrive in time",
        Caller,
    );
    /// A write whose body is not a JSON object.
    pub const BODY_NOT_JSON: Refusal = kind(
        S::BAD_REQUEST,
        "bad-request",
        "Bad request",
        "body_not_json",
        "a write's body must be a JSON object",
        Caller,
    );
    /// A `cursor` the gateway did not seal for this agency and service (detail says why).
    pub const INVALID_CURSOR: Refusal = kind(
        S::BAD_REQUEST,
        "invalid-cursor",
        "Bad request",
        "cursor_invalid",
        "",
        Caller,
    );
    /// The auditors' API: a malformed query (detail says what).
    pub const BAD_QUERY: Refusal = kind(
        S::BAD_REQUEST,
        "bad-request",
        "Bad request",
        "bad_query",
        "",
        Caller,
    );
    /// The auditors' API: a filter the log's query refuses (detail says what). Recorded as
    /// the log's own failure, not a denial, as it always was.
    pub const BAD_FILTER: Refusal = kind(
        S::BAD_REQUEST,
        "bad-request",
        "Bad request",
        "bad_query",
        "",
        Internal,
    );
    /// A built-in provider's path that names nothing (detail says which paths exist).
    pub const UNKNOWN_BUILTIN_PATH: Refusal = kind(
        S::NOT_FOUND,
        "not-found",
        "Not found",
        "unknown_route",
        "no such audit service",
        Caller,
    );

    // ---- the token -------------------------------------------------------------------

    /// A token that does not verify (reason and detail from the [`TokenError`]).
    const INVALID_TOKEN: Refusal = kind(
        S::UNAUTHORIZED,
        "invalid-token",
        "Unauthorized",
        "token_invalid",
        "the token is not valid for this connection",
        Caller,
    );

    // ---- the policy ------------------------------------------------------------------

    /// A request field outside the grant (detail names it).
    pub const FIELD_NOT_ALLOWED: Refusal = kind(
        S::FORBIDDEN,
        "field-not-allowed",
        "Forbidden",
        "field_not_allowed",
        "",
        Policy,
    );
    /// A lookup naming a person under a pseudonymising grant (detail says which).
    pub const IDENTIFYING_LOOKUP: Refusal = kind(
        S::FORBIDDEN,
        "identifying-lookup",
        "Forbidden",
        "identifying_lookup",
        "",
        Policy,
    );
    /// No valid consent of the data subject (detail says what is missing).
    pub const CONSENT_MISSING: Refusal = kind(
        S::FORBIDDEN,
        "consent-required",
        "Forbidden",
        "consent_missing",
        "",
        Policy,
    );
    /// A quota is used up (detail and headers from the [`Exceeded`]).
    const RATE_LIMITED: Refusal = kind(
        S::TOO_MANY_REQUESTS,
        "rate-limited",
        "Too many requests",
        RATE_LIMITED,
        "",
        Policy,
    );
    /// The auditors' API: another agency's records without the supervision purpose.
    pub const AUDIT_SCOPE: Refusal = kind(
        S::FORBIDDEN,
        "access-denied",
        "Forbidden",
        "audit_scope",
        "this purpose reaches only the calling agency's own records",
        Policy,
    );

    // ---- the provider ----------------------------------------------------------------

    /// A built-in provider is named by the policy but not running.
    pub const PROVIDER_NOT_RUNNING: Refusal = kind(
        S::SERVICE_UNAVAILABLE,
        "provider-unavailable",
        "Service unavailable",
        "upstream_unavailable",
        "the provider is not available",
        Provider,
    );
    /// The provider could not be reached, or its answer not read.
    pub const PROVIDER_UNREACHABLE: Refusal = kind(
        S::BAD_GATEWAY,
        "provider-unavailable",
        "Bad gateway",
        "upstream_unavailable",
        "the provider could not be reached",
        Provider,
    );
    /// The provider's answer exceeds the gateway's limit.
    pub const PROVIDER_TOO_LARGE: Refusal = kind(
        S::BAD_GATEWAY,
        "provider-error",
        "Bad gateway",
        "upstream_too_large",
        "the provider's answer exceeds the gateway's limit",
        Provider,
    );
    /// The provider did not answer in time.
    pub const PROVIDER_TIMEOUT: Refusal = kind(
        S::GATEWAY_TIMEOUT,
        "provider-timeout",
        "Gateway timeout",
        "upstream_timeout",
        "the provider did not answer in time",
        Provider,
    );
    /// The provider's answer is not JSON, or its cursor cannot be sealed.
    pub const PROVIDER_BAD_RESPONSE: Refusal = kind(
        S::BAD_GATEWAY,
        "provider-error",
        "Bad gateway",
        "upstream_bad_response",
        "the provider's answer could not be processed",
        Provider,
    );
    /// An answer under a consent names persons the consent does not cover.
    pub const CONSENT_SUBJECT_MISMATCH: Refusal = kind(
        S::BAD_GATEWAY,
        "provider-error",
        "Bad gateway",
        "consent_subject_mismatch",
        "the provider's answer concerns persons the consent does not cover",
        Provider,
    );
    /// The provider's 404.
    pub const PROVIDER_NOT_FOUND: Refusal = kind(
        S::NOT_FOUND,
        "not-found",
        "Not found",
        "upstream_not_found",
        "the provider has no such record",
        Provider,
    );
    /// The provider's 422 (detail names the field where it is a known one).
    pub const PROVIDER_INVALID_FIELD: Refusal = kind(
        S::UNPROCESSABLE_ENTITY,
        "invalid-field",
        "Invalid field",
        "upstream_invalid_field",
        "the provider refused a value of the request; nothing was written",
        Provider,
    );
    /// The provider's 409 (detail names the field where it is a known one).
    pub const PROVIDER_CONFLICT: Refusal = kind(
        S::CONFLICT,
        "conflict",
        "Conflict",
        "upstream_conflict",
        "the request conflicts with a record the provider holds; nothing was written",
        Provider,
    );
    /// The provider's 400.
    pub const PROVIDER_BAD_REQUEST: Refusal = kind(
        S::BAD_REQUEST,
        "bad-request",
        "Bad request",
        "upstream_bad_request",
        "the provider refused the request as malformed; check its parameters against the service's documentation",
        Provider,
    );
    /// The provider's 401: the gateway's own credentials, never the agency's token.
    pub const PROVIDER_UNAUTHORIZED: Refusal = kind(
        S::BAD_GATEWAY,
        "provider-error",
        "Bad gateway",
        "upstream_unauthorized",
        "the provider refused the gateway's own credentials; your token was accepted",
        Provider,
    );
    /// The provider's 403.
    pub const PROVIDER_FORBIDDEN: Refusal = kind(
        S::FORBIDDEN,
        "provider-denied",
        "Forbidden",
        "upstream_forbidden",
        "the provider refused this request; the gateway's policy allowed it",
        Provider,
    );
    /// The provider's 429.
    pub const PROVIDER_BUSY: Refusal = kind(
        S::SERVICE_UNAVAILABLE,
        "provider-unavailable",
        "Service unavailable",
        "upstream_busy",
        "the provider is busy; retry shortly",
        Provider,
    );
    /// Any other provider error.
    pub const PROVIDER_ERROR: Refusal = kind(
        S::BAD_GATEWAY,
        "provider-error",
        "Bad gateway",
        "upstream_error",
        "the provider failed to answer the request",
        Provider,
    );
    /// No slot at the provider came free within the wait.
    const PROVIDER_SLOTS_BUSY: Refusal = kind(
        S::SERVICE_UNAVAILABLE,
        "provider-unavailable",
        "Service unavailable",
        "upstream_busy",
        "the provider is busy with other requests of your agency or others; retry shortly",
        Provider,
    );
    /// The provider's circuit breaker is open.
    const PROVIDER_CIRCUIT_OPEN: Refusal = kind(
        S::SERVICE_UNAVAILABLE,
        "provider-unavailable",
        "Service unavailable",
        "upstream_circuit_open",
        "the provider is failing and is given time to recover; retry later",
        Provider,
    );

    // ---- shaping one ------------------------------------------------------------------

    /// The same refusal with a detail of its own.
    pub fn with_detail(self, detail: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal {
            detail: detail.into(),
            ..self
        }
    }

    /// The same refusal sent with a header.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Refusal {
        self.headers.push((name, value));
        self
    }

    /// The same refusal sent with `Retry-After`, in whole seconds rounded up (at least 1).
    pub fn retry_after(self, after: Duration) -> Refusal {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        self.with_header(header::RETRY_AFTER, HeaderValue::from(secs.max(1)))
    }

    /// The problem the caller receives.
    pub fn problem(&self) -> Problem {
        Problem::new(self.status, self.problem, self.title, self.detail.clone())
    }

    /// The refusal as a response, tagged with the request (and record) id.
    pub fn to_response(&self, request_id: Option<&str>) -> Response<Body> {
        let mut problem = self.problem();
        if let Some(id) = request_id {
            problem = problem.with_request_id(id);
        }
        let mut resp = problem.to_response();
        if self.challenge {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
        }
        for (name, value) in &self.headers {
            resp.headers_mut().insert(name.clone(), value.clone());
        }
        resp
    }

    // ---- from the errors of other modules ---------------------------------------------

    /// A token that does not verify, with a challenge.
    pub fn token(e: &TokenError) -> Refusal {
        Refusal {
            reason: e.code(),
            challenge: true,
            ..Refusal::INVALID_TOKEN.with_detail(e.detail())
        }
    }

    /// A token claim over the record's bound or holding control characters.
    pub fn token_claim(claim: &str, unfit: &Unfit) -> Refusal {
        Refusal {
            reason: match unfit {
                Unfit::TooLong { .. } => "token_claim_too_long",
                Unfit::Control => "token_claim_invalid",
            },
            challenge: true,
            ..Refusal::INVALID_TOKEN.with_detail(format!("the token's {claim} claim {unfit}"))
        }
    }

    /// The policy's denial: 403, or 404 for a service the policy does not know.
    pub fn denied(reason: DenyReason) -> Refusal {
        let status = reason.status();
        let (problem, title) = if status == S::NOT_FOUND {
            ("not-found", "Not found")
        } else {
            ("access-denied", "Forbidden")
        };
        Refusal {
            status,
            problem,
            title,
            reason: reason.code(),
            detail: Cow::Borrowed(reason.detail()),
            side: Policy,
            challenge: false,
            headers: Vec::new(),
        }
    }

    /// A quota used up → 429 with `Retry-After` and the `RateLimit` headers.
    pub fn rate_limited(e: &Exceeded) -> Refusal {
        Refusal {
            headers: e.headers(),
            ..Refusal::RATE_LIMITED.with_detail(format!(
                "the {} quota is used up; retry after {} s",
                e.scope.as_str(),
                e.retry_after_secs()
            ))
        }
    }

    /// A provider call not made: no slot came free, or its breaker is open.
    pub fn provider_refused(refused: &Refused) -> Refusal {
        match refused {
            Refused::Busy => Refusal::PROVIDER_SLOTS_BUSY.retry_after(Duration::from_secs(1)),
            Refused::Open { retry_after } => {
                Refusal::PROVIDER_CIRCUIT_OPEN.retry_after(*retry_after)
            }
        }
    }

    /// A consent change refused or failed: its status and reason are the error's own
    /// (its command-line records state them too); what the caller is shown is said here.
    pub fn consent(e: &ConsentError) -> Refusal {
        let (problem, detail): (_, Cow<'static, str>) = match e {
            ConsentError::Invalid { .. } => ("invalid-consent", e.to_string().into()),
            ConsentError::NotFound => ("consent-not-found", e.to_string().into()),
            ConsentError::AlreadyRevoked => ("consent-revoked", e.to_string().into()),
            ConsentError::Database(_) => (
                "consent-store-unavailable",
                "consent records cannot be read or written now".into(),
            ),
            ConsentError::Audit(_) => return Refusal::AUDIT_UNAVAILABLE,
            ConsentError::OutcomeNotRecorded(_) => (
                "audit-unavailable",
                "the consent was changed, but the access log cannot record the outcome".into(),
            ),
        };
        let status = e.status();
        Refusal {
            status,
            problem,
            title: status.canonical_reason().unwrap_or("Error"),
            reason: e.reason(),
            detail,
            side: if status.is_client_error() {
                Caller
            } else {
                Internal
            },
            challenge: false,
            headers: Vec::new(),
        }
    }

    /// The auditors' API refused or failed a request.
    pub fn audit_api(e: &ApiError) -> Refusal {
        match e {
            ApiError::BadRequest(m) => Refusal::BAD_QUERY.with_detail(m.clone()),
            ApiError::NotFound => Refusal::UNKNOWN_BUILTIN_PATH,
            ApiError::OutOfScope => Refusal::AUDIT_SCOPE,
            ApiError::Audit(AuditError::InvalidFilter(m)) => {
                Refusal::BAD_FILTER.with_detail(m.clone())
            }
            ApiError::Audit(a) if a.status() == S::SERVICE_UNAVAILABLE => {
                Refusal::AUDIT_READ_FAILED
            }
            _ => Refusal::AUDIT_READ_INTERNAL,
        }
    }
}
