//! The decision function: may this agency perform this operation on this
//! service for this purpose, and which fields does it get?
//!
//! It runs on every request, so it only looks things up: the grants of an
//! (agency, provider, service) triple were indexed at load, and an Allow
//! shares the grant's `Arc`s instead of copying. A denial names the most
//! specific reason: the one of the grant that came closest to matching.

use std::fmt::Write as _;
use std::sync::Arc;

use time::Date;

use super::case_ref::CaseFormat;
use super::model::{Grant, GrantPurpose, Operation, Policy};
use crate::policy::FieldSet;

/// What is asked: by whom, of which service, how and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecisionRequest<'a> {
    /// The calling agency, from its client certificate.
    pub agency: &'a str,
    /// Provider id from the URL.
    pub provider: &'a str,
    /// Service id from the URL.
    pub service: &'a str,
    /// Read or write, from the HTTP method.
    pub operation: Operation,
    /// Purpose code from the officer's token.
    pub purpose: &'a str,
    /// Case reference from the officer's token, if any.
    pub case_ref: Option<&'a str>,
}

/// The outcome of [`Policy::decide`].
#[derive(Debug, Clone)]
pub enum Decision {
    /// The request may proceed under this grant.
    Allow(Allow),
    /// The request is refused.
    Deny(DenyReason),
}

impl Decision {
    /// The reason, if this is a denial.
    pub fn deny_reason(&self) -> Option<DenyReason> {
        match self {
            Decision::Allow(_) => None,
            Decision::Deny(reason) => Some(*reason),
        }
    }
}

/// A permitted request: the grant that allowed it and what it releases.
#[derive(Debug, Clone)]
pub struct Allow {
    /// `"<agency>#<index>"` of the deciding grant.
    pub grant: Arc<str>,
    /// The fields the response may release.
    pub fields: Arc<FieldSet>,
    /// Whether the data subject's consent must be checked before forwarding.
    pub consent_required: bool,
    /// The legal basis of the request's purpose, for the audit record.
    pub legal_basis: Arc<str>,
    /// Whether the grant is marked `restricted` (stricter handling, issue 9).
    pub restricted: bool,
    /// Transforms applied to the released fields.
    pub transforms: Arc<crate::policy::Transforms>,
    /// Largest write body under the grant, if it sets one.
    pub max_body_bytes: Option<usize>,
}

/// Why a request was refused, most specific first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// No agency of that id in the policy.
    UnknownAgency,
    /// No such provider or service.
    UnknownService,
    /// The agency has grants for the service, but none for this operation.
    OperationNotAllowed,
    /// The agency has grants for the service and operation, but none for this purpose.
    PurposeNotAllowed,
    /// The purpose is not in the vocabulary.
    UnknownPurpose,
    /// The matching grant needs a case reference and the token carries none.
    CaseRequired,
    /// The matching grant needs a case reference and the token's does not match the agency's case-number format.
    CaseInvalid,
    /// The matching grant is not in force today (not yet started, or expired).
    GrantNotValidToday,
    /// The agency has no grant for the service at all.
    NoGrant,
}

impl DenyReason {
    /// Snake-case code for logs, audit records and problem types.
    pub fn code(&self) -> &'static str {
        match self {
            DenyReason::UnknownAgency => "unknown_agency",
            DenyReason::UnknownService => "unknown_service",
            DenyReason::OperationNotAllowed => "operation_not_allowed",
            DenyReason::PurposeNotAllowed => "purpose_not_allowed",
            DenyReason::UnknownPurpose => "unknown_purpose",
            DenyReason::CaseRequired => "case_required",
            DenyReason::CaseInvalid => "case_ref_invalid",
            DenyReason::GrantNotValidToday => "grant_not_valid_today",
            DenyReason::NoGrant => "no_grant",
        }
    }

    /// A sentence safe to show the caller.
    pub fn detail(&self) -> &'static str {
        match self {
            DenyReason::UnknownAgency => {
                "The client certificate does not belong to a known agency."
            }
            DenyReason::UnknownService => "No such service.",
            DenyReason::OperationNotAllowed => {
                "Your agency may not perform this operation on this service."
            }
            DenyReason::PurposeNotAllowed => {
                "Your agency may not use this service for the stated purpose."
            }
            DenyReason::UnknownPurpose => "The stated purpose is not a recognised purpose code.",
            DenyReason::CaseRequired => "This access requires a case reference in the token.",
            DenyReason::CaseInvalid => {
                "This access requires a case reference, and the token's does not match your agency's case-number format."
            }
            DenyReason::GrantNotValidToday => {
                "Your agency's permission for this access is not in force today."
            }
            DenyReason::NoGrant => "Your agency has no permission for this service.",
        }
    }

    /// The HTTP status a caller receives: 404 for an unknown service, 403 otherwise.
    pub fn status(&self) -> http::StatusCode {
        match self {
            DenyReason::UnknownService => http::StatusCode::NOT_FOUND,
            _ => http::StatusCode::FORBIDDEN,
        }
    }

    /// How far a grant got before failing; a denial reports the furthest.
    fn rank(self) -> u8 {
        match self {
            DenyReason::OperationNotAllowed => 1,
            DenyReason::PurposeNotAllowed => 2,
            DenyReason::GrantNotValidToday => 3,
            DenyReason::CaseRequired | DenyReason::CaseInvalid => 4,
            _ => 0,
        }
    }
}

/// Checks one grant of the right service against the request, in the order
/// operation, purpose, validity, case: each later check is more specific.
/// A case reference must have the form of the agency's case numbers.
fn evaluate<'g>(
    grant: &'g Grant,
    req: &DecisionRequest<'_>,
    today: Date,
    cases: &CaseFormat,
) -> Result<&'g GrantPurpose, DenyReason> {
    if !grant.operations.contains(&req.operation) {
        return Err(DenyReason::OperationNotAllowed);
    }
    let purpose = grant
        .purpose(req.purpose)
        .ok_or(DenyReason::PurposeNotAllowed)?;
    if !grant.valid_on(today) {
        return Err(DenyReason::GrantNotValidToday);
    }
    if grant.case_required {
        match req.case_ref {
            None => return Err(DenyReason::CaseRequired),
            Some(c) if c.trim().is_empty() => return Err(DenyReason::CaseRequired),
            Some(c) if !cases.accepts(c) => return Err(DenyReason::CaseInvalid),
            Some(_) => {}
        }
    }
    Ok(purpose)
}

/// Checks that do not depend on grants: the names in the request exist.
fn precheck(policy: &Policy, req: &DecisionRequest<'_>) -> Result<(), DenyReason> {
    if policy.agency(req.agency).is_none() {
        return Err(DenyReason::UnknownAgency);
    }
    if policy.service(req.provider, req.service).is_none() {
        return Err(DenyReason::UnknownService);
    }
    if policy.purpose(req.purpose).is_none() {
        return Err(DenyReason::UnknownPurpose);
    }
    Ok(())
}

pub(crate) fn decide(policy: &Policy, req: &DecisionRequest<'_>, today: Date) -> Decision {
    if let Err(reason) = precheck(policy, req) {
        return Decision::Deny(reason);
    }
    decide_among(
        policy,
        req,
        policy.grants_for(req.agency, req.provider, req.service),
        today,
    )
}

/// The decision the agency's shadow grants for the requested service would
/// give, or `None` when it has none: shadow grants of a service stand in for
/// all of its enforced grants, so a change is previewed whole.
pub(crate) fn decide_shadow(
    policy: &Policy,
    req: &DecisionRequest<'_>,
    today: Date,
) -> Option<Decision> {
    let grants = policy.service_grants(req.agency, req.provider, req.service)?;
    if grants.shadow.is_empty() {
        return None;
    }
    Some(match precheck(policy, req) {
        Err(reason) => Decision::Deny(reason),
        Ok(()) => decide_among(policy, req, &grants.shadow, today),
    })
}

/// The first of the given grants that allows the request, else the most specific refusal.
fn decide_among(
    policy: &Policy,
    req: &DecisionRequest<'_>,
    grants: &[usize],
    today: Date,
) -> Decision {
    let Some(agency) = policy.agency(req.agency) else {
        return Decision::Deny(DenyReason::UnknownAgency);
    };
    let mut best = DenyReason::NoGrant;
    for grant in grants.iter().filter_map(|&i| agency.grants.get(i)) {
        match evaluate(grant, req, today, &agency.case_format) {
            Ok(purpose) => {
                return Decision::Allow(Allow {
                    grant: Arc::clone(&grant.id),
                    fields: Arc::clone(&grant.fields),
                    consent_required: grant.consent_required,
                    legal_basis: Arc::clone(&purpose.legal_basis),
                    restricted: grant.restricted,
                    transforms: Arc::clone(&grant.transforms),
                    max_body_bytes: grant.max_body_bytes,
                });
            }
            Err(reason) if reason.rank() > best.rank() => best = reason,
            Err(_) => {}
        }
    }
    Decision::Deny(best)
}

pub(crate) fn explain(policy: &Policy, req: &DecisionRequest<'_>, today: Date) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(
        out,
        "request: agency={} provider={} service={} operation={} purpose={} case={} date={today}",
        req.agency,
        req.provider,
        req.service,
        req.operation,
        req.purpose,
        req.case_ref.unwrap_or("-"),
    );
    let _ = writeln!(out, "policy version: {}", policy.version());
    match policy.agency(req.agency) {
        None => {
            let _ = writeln!(out, "agency {:?} is not in the policy", req.agency);
        }
        Some(agency) => {
            let _ = writeln!(
                out,
                "agency {} ({}): {} grant(s)",
                agency.id,
                agency.name,
                agency.grants.len()
            );
            if policy.service(req.provider, req.service).is_none() {
                let _ = writeln!(
                    out,
                    "service {}/{} is not in the providers table",
                    req.provider, req.service
                );
            }
            match policy.purpose(req.purpose) {
                None => {
                    let _ = writeln!(out, "purpose {:?} is not in the vocabulary", req.purpose);
                }
                Some(p) => {
                    let _ = writeln!(out, "purpose {}: {} — {}", p.code, p.title, p.legal_basis);
                }
            }
            for grant in &agency.grants {
                explain_grant(&mut out, grant, req, today, &agency.case_format);
            }
        }
    }
    let _ = write!(out, "decision: ");
    describe(&mut out, policy, req.agency, &decide(policy, req, today));
    if let Some(shadow) = decide_shadow(policy, req, today) {
        let _ = write!(out, "shadow decision (not enforced): ");
        describe(&mut out, policy, req.agency, &shadow);
    }
    out
}

/// One decision in words: the grant and where it is written, the fields, the conditions.
fn describe(out: &mut String, policy: &Policy, agency: &str, decision: &Decision) {
    match decision {
        Decision::Allow(a) => {
            let grant = policy
                .agency(agency)
                .and_then(|ag| ag.grants.iter().find(|g| g.id == a.grant));
            let location = grant.map_or(String::new(), |g| format!(" ({})", g.location));
            let _ = writeln!(out, "ALLOW by {}{location}", a.grant);
            let _ = writeln!(out, "  fields released: {}", a.fields.paths().join(", "));
            let mut limits = Vec::new();
            if a.consent_required {
                limits.push("the data subject's consent must be on record".to_owned());
            }
            if let Some(g) = grant {
                if g.case_required {
                    limits.push("the token must carry a case reference".to_owned());
                }
                if g.valid_from.is_some() || g.valid_until.is_some() {
                    limits.push(format!(
                        "valid {} to {}",
                        g.valid_from.map_or("-".to_owned(), |d| d.to_string()),
                        g.valid_until.map_or("-".to_owned(), |d| d.to_string())
                    ));
                }
            }
            if a.restricted {
                limits.push("restricted records handling".to_owned());
            }
            if a.transforms.pseudonymises() {
                limits.push("pseudonymised: only searches by the parameters providers.toml lists (pseudonymous_query), no lookup by id, document or name".to_owned());
            }
            if limits.is_empty() {
                limits.push("none beyond the agency's rate limits".to_owned());
            }
            let _ = writeln!(out, "  limits: {}", limits.join("; "));
        }
        Decision::Deny(reason) => {
            let _ = writeln!(out, "DENY {} — {}", reason.code(), reason.detail());
        }
    }
}

fn explain_grant(
    out: &mut String,
    grant: &Grant,
    req: &DecisionRequest<'_>,
    today: Date,
    cases: &CaseFormat,
) {
    let ops: Vec<&str> = grant.operations.iter().map(Operation::as_str).collect();
    let purposes: Vec<&str> = grant.purposes.iter().map(|p| &*p.code).collect();
    let _ = write!(
        out,
        "  grant {} {}/{} [{}] for [{}]{} at {}: ",
        grant.id,
        grant.provider,
        grant.service,
        ops.join(", "),
        purposes.join(", "),
        if grant.shadow { " (shadow)" } else { "" },
        grant.location,
    );
    let verdict = if grant.provider != req.provider || grant.service != req.service {
        "other service".to_owned()
    } else {
        match evaluate(grant, req, today, cases) {
            Ok(_) => "MATCHES".to_owned(),
            Err(DenyReason::OperationNotAllowed) => format!("does not allow {}", req.operation),
            Err(DenyReason::PurposeNotAllowed) => {
                format!("does not allow purpose {:?}", req.purpose)
            }
            Err(DenyReason::GrantNotValidToday) => format!(
                "not in force on {today} (valid {} to {})",
                grant.valid_from.map_or("-".to_owned(), |d| d.to_string()),
                grant.valid_until.map_or("-".to_owned(), |d| d.to_string()),
            ),
            Err(DenyReason::CaseRequired) => {
                "needs a case reference, the request has none".to_owned()
            }
            Err(DenyReason::CaseInvalid) => format!(
                "needs a case reference of the agency's format ({}), the request's is not one",
                cases.describe()
            ),
            Err(other) => other.code().to_owned(),
        }
    };
    let _ = writeln!(out, "{verdict}");
}
