//! What the pipeline has learnt about one request so far, as typed facts,
//! and the one function that turns them into its audit [`Entry`].
//!
//! Each step records what it established (the caller, the route, the
//! policy's verdict, the subjects named, what was written or released, the
//! provider's status) through the methods here, and nothing else touches the
//! record: [`Exchange::entry`] builds it once, for the attempt of a change
//! and for the request's last record alike. Values that come from the
//! request are held to the bounds of `crate::audit::text` as they are
//! recorded, so the record keeps them shortened.

use crate::audit::text::{
    self, MAX_CLAIM_CHARS, MAX_NAME_CHARS, MAX_PATH_CHARS, MAX_PURPOSE_CHARS,
};
use crate::audit::{Decision, Entry};
use crate::gateway::trace::TraceContext;
use crate::identity::token::Officer;
use crate::policy::Operation;

/// The policy's verdict on a request, once it was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// The legal basis of the grant that allowed it.
    pub legal_basis: String,
}

/// The typed facts of one request, gathered along the pipeline.
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    /// Request (and record) id, UUID v7.
    pub id: String,
    ts: String,
    method: String,
    path: String,
    certificate: Option<String>,
    policy_version: String,
    agency: Option<String>,
    officer: Option<String>,
    purpose: Option<String>,
    case_ref: Option<String>,
    token_id: Option<String>,
    provider: Option<String>,
    service: Option<String>,
    operation: Option<crate::audit::Operation>,
    shadow: Option<Decision>,
    restricted: bool,
    allowed: Option<Allowed>,
    pseudonymised: bool,
    consent_ref: Option<String>,
    subjects: Vec<String>,
    request_digest: Option<String>,
    written: Vec<String>,
    fields: Vec<String>,
    response_digest: Option<String>,
    upstream_status: Option<u16>,
    trace: TraceContext,
    upstream_time: Option<std::time::Duration>,
}

/// How a request ended, as its record states it.
#[derive(Debug, Clone, Copy)]
pub struct Ending<'a> {
    /// Whether the gateway's own checks refused it (`deny` whatever the policy said).
    pub denied: bool,
    /// The status the caller received (0 on an attempt).
    pub status: u16,
    /// The refusal's reason code, if it was refused.
    pub reason: Option<&'a str>,
}

impl Ending<'_> {
    /// The ending of a change's attempt: allowed, not yet answered.
    pub const ATTEMPT: Ending<'static> = Ending {
        denied: false,
        status: 0,
        reason: None,
    };
}

fn short(v: &str, max: usize) -> String {
    text::shorten(v, max).into_owned()
}

impl Exchange {
    /// A request just arrived: its id, time, method, path, certificate and the policy version in force.
    pub fn start(
        method: &str,
        path: &str,
        certificate: Option<&str>,
        policy_version: &str,
    ) -> Exchange {
        Exchange {
            id: uuid::Uuid::now_v7().to_string(),
            ts: crate::audit::now_ts(),
            method: short(method, MAX_NAME_CHARS),
            path: short(path, MAX_PATH_CHARS),
            certificate: certificate.map(str::to_owned),
            policy_version: policy_version.to_owned(),
            ..Exchange::default()
        }
    }

    /// The W3C trace the request belongs to (access log, audit record, the provider's `traceparent`).
    pub fn trace(&mut self, trace: TraceContext) {
        self.trace = trace;
    }

    /// The request's trace.
    pub fn trace_context(&self) -> &TraceContext {
        &self.trace
    }

    /// forward: how long the provider call took, waiting for a slot included (access log only).
    pub fn upstream_time(&mut self, took: std::time::Duration) {
        self.upstream_time = Some(took);
    }

    /// The provider call's time, if one was made.
    pub fn upstream_took(&self) -> Option<std::time::Duration> {
        self.upstream_time
    }

    /// SHA-256 of the client certificate, if one was presented.
    pub fn certificate(&self) -> Option<&str> {
        self.certificate.as_deref()
    }

    /// authn: the agency holding the client certificate.
    pub fn agency(&mut self, agency: &str) {
        self.agency = Some(agency.to_owned());
    }

    /// authn: the officer, purpose, case and token id the token states.
    pub fn officer(&mut self, officer: &Officer) {
        self.officer = Some(short(&officer.id, MAX_CLAIM_CHARS));
        self.purpose = Some(short(&officer.purpose, MAX_PURPOSE_CHARS));
        self.case_ref = officer
            .case_ref
            .as_deref()
            .map(|c| short(c, MAX_CLAIM_CHARS));
        self.token_id = officer
            .token_id
            .as_deref()
            .map(|t| short(t, MAX_CLAIM_CHARS));
    }

    /// route: the provider and service asked.
    pub fn route(&mut self, provider: &str, service: &str) {
        self.provider = Some(short(provider, MAX_NAME_CHARS));
        self.service = Some(short(service, MAX_NAME_CHARS));
    }

    /// The operation asked for.
    pub fn operation(&mut self, operation: Operation) {
        self.operation = Some(match operation {
            Operation::Read => crate::audit::Operation::Read,
            Operation::Write => crate::audit::Operation::Write,
        });
    }

    /// authz: what the agency's shadow grants would decide, never enforced.
    pub fn shadow(&mut self, decision: Option<Decision>) {
        self.shadow = decision;
    }

    /// The request reveals as much as a restricted grant's reads (kept out of subjects' reports for a while).
    pub fn restrict(&mut self) {
        self.restricted = true;
    }

    /// authz: the policy allowed the request under a grant with this legal basis.
    pub fn allowed(&mut self, legal_basis: &str, restricted: bool, pseudonymised: bool) {
        self.allowed = Some(Allowed {
            legal_basis: legal_basis.to_owned(),
        });
        self.restricted |= restricted;
        self.pseudonymised = pseudonymised;
    }

    /// Whether the policy allowed the request.
    pub fn is_allowed(&self) -> bool {
        self.allowed.is_some()
    }

    /// The data subject's consent the request relies on, or the consent a change concerns.
    pub fn consent(&mut self, id: &str) {
        self.consent_ref = Some(id.to_owned());
    }

    /// The consent the request relies on, if any.
    pub fn consent_ref(&self) -> Option<&str> {
        self.consent_ref.as_deref()
    }

    /// A data subject the request names or its answer holds (each recorded once, in order).
    pub fn subject(&mut self, subject: &str) {
        if !self.subjects.iter().any(|s| s == subject) {
            self.subjects.push(subject.to_owned());
        }
    }

    /// The one data subject a change concerns, replacing any named before.
    pub fn only_subject(&mut self, subject: &str) {
        self.subjects = vec![subject.to_owned()];
    }

    /// The subjects recorded so far.
    pub fn subjects(&self) -> &[String] {
        &self.subjects
    }

    /// A change's body as received, and the field paths it writes.
    pub fn writes(&mut self, body: &[u8], written: Vec<String>) {
        self.request_digest = Some(digest(body));
        self.written = written;
    }

    /// The granted fields the answer holds.
    pub fn released_fields(&mut self, fields: Vec<String>) {
        self.fields = fields;
    }

    /// The body exactly as released.
    pub fn released_body(&mut self, body: &[u8]) {
        self.response_digest = Some(digest(body));
    }

    /// The provider answered with an error status (the caller gets the gateway's problem).
    pub fn upstream_status(&mut self, status: u16) {
        self.upstream_status = Some(status);
    }

    /// The audit entry of the request as it stands, ending as `ending` says.
    pub fn entry(&self, ending: Ending<'_>) -> Entry {
        // The policy's verdict, unless the gateway's own checks refused the request after it.
        let decision = if !ending.denied && self.allowed.is_some() {
            Decision::Allow
        } else {
            Decision::Deny
        };
        Entry {
            id: self.id.clone(),
            ts: self.ts.clone(),
            agency: self.agency.clone(),
            certificate: self.certificate.clone(),
            officer: self.officer.clone(),
            purpose: self.purpose.clone(),
            legal_basis: self.allowed.as_ref().map(|a| a.legal_basis.clone()),
            case_ref: self.case_ref.clone(),
            consent_ref: self.consent_ref.clone(),
            token_id: self.token_id.clone(),
            provider: self.provider.clone(),
            service: self.service.clone(),
            operation: self.operation.clone(),
            method: self.method.clone(),
            path: self.path.clone(),
            subjects: self.subjects.clone(),
            fields: self.fields.clone(),
            decision,
            reason: ending.reason.map(str::to_owned),
            status: ending.status,
            policy_version: self.policy_version.clone(),
            shadow_decision: self.shadow,
            response_digest: self.response_digest.clone(),
            restricted: self.restricted,
            upstream_status: self.upstream_status,
            pseudonymised: self.pseudonymised,
            phase: None,
            attempt_id: None,
            request_digest: self.request_digest.clone(),
            written: self.written.clone(),
            trace_id: Some(self.trace.trace_id.clone()),
        }
    }
}

/// Hex SHA-256 of a body: the record's `request_digest` and `response_digest`.
pub fn digest(body: &[u8]) -> String {
    crate::files::sha256_hex(body)
}

/// The field paths a write's body sets (`employer.name`, …): what its attempt record says it writes.
pub fn written_paths(body: &serde_json::Value) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(exchange: &Exchange, denied: bool, status: u16) -> Entry {
        exchange.entry(Ending {
            denied,
            status,
            reason: Some("x"),
        })
    }

    #[test]
    fn the_decision_is_the_policys_verdict_unless_the_gateway_denied() {
        let mut ex = Exchange::start("GET", "/v1/a/b", None, "v1");
        // Refused before the policy decided: deny, whichever side failed.
        assert_eq!(ended(&ex, false, 503).decision, Decision::Deny);
        ex.allowed("basis", false, false);
        // Allowed, then failed by the provider or the gateway: still allow.
        assert_eq!(ended(&ex, false, 502).decision, Decision::Allow);
        // Allowed, then refused by the gateway's own checks (a quota, a field): deny.
        assert_eq!(ended(&ex, true, 429).decision, Decision::Deny);
        let attempt = ex.entry(Ending::ATTEMPT);
        assert_eq!(
            (attempt.decision, attempt.status, attempt.reason),
            (Decision::Allow, 0, None)
        );
        assert_eq!(attempt.legal_basis.as_deref(), Some("basis"));
    }

    #[test]
    fn subjects_are_recorded_once_and_writes_name_their_paths() {
        let mut ex = Exchange::start("POST", "/v1/a/b", None, "v1");
        ex.subject("P-1");
        ex.subject("P-1");
        ex.subject("P-2");
        assert_eq!(ex.subjects(), ["P-1", "P-2"]);
        let body =
            serde_json::json!({"person_id": "P-1", "employer": {"name": "X"}, "tags": ["a"]});
        assert_eq!(written_paths(&body), ["employer.name", "person_id", "tags"]);
    }
}
