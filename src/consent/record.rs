//! A consent record and its rules: what a consent holds, what makes a new
//! one valid, how a body sent through the gateway becomes one, and why a
//! consent operation fails.

use serde::Serialize;
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime};

use crate::audit::AuditError;

/// Longest accepted subject id, purpose, agency or scope entry.
const MAX_ID: usize = 64;
/// Longest accepted evidence reference.
const MAX_EVIDENCE: usize = 128;
/// Most scope entries on one consent.
const MAX_SCOPE: usize = 32;
/// How far in the future `given_at` may lie (clock skew between agencies).
const GIVEN_AT_SKEW: time::Duration = time::Duration::minutes(5);

/// A stored consent record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Consent {
    /// UUID v7 text, assigned when recorded; cited as `consent_ref` in audit records.
    pub id: String,
    /// The data subject's register id.
    pub subject: String,
    /// The agency the consent was given to.
    pub agency: String,
    /// The purpose consented to (a code from the purpose vocabulary).
    pub purpose: String,
    /// The `provider/service` entries covered; empty covers every service.
    pub scope: Vec<String>,
    /// When the person gave the consent (RFC 3339 UTC).
    pub given_at: String,
    /// The last day (UTC, inclusive) the consent holds; `None` until revoked.
    pub valid_until: Option<String>,
    /// Reference to the evidence, e.g. the signed form's number.
    pub evidence_ref: Option<String>,
    /// When the gateway recorded it (RFC 3339 UTC).
    pub recorded_at: String,
    /// Who recorded it: `agency/officer`, or `cli:<node>` for an administrator.
    pub recorded_by: String,
    /// When it was revoked, if it was.
    pub revoked_at: Option<String>,
}

impl Consent {
    /// Whether the consent holds on `today` for this `provider/service` (not revoked, not expired, in scope).
    pub fn holds(&self, today: Date, service: &str) -> bool {
        self.revoked_at.is_none()
            && self
                .valid_until
                .as_deref()
                .and_then(parse_date)
                .is_none_or(|until| today <= until)
            && self.covers(service)
    }

    /// Whether the scope covers `provider/service`.
    pub fn covers(&self, service: &str) -> bool {
        self.scope.is_empty() || self.scope.iter().any(|s| s == service)
    }
}

/// A consent to record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewConsent {
    /// The data subject's register id.
    pub subject: String,
    /// The agency the consent is given to.
    pub agency: String,
    /// The purpose consented to.
    pub purpose: String,
    /// `provider/service` entries covered; empty covers every service.
    pub scope: Vec<String>,
    /// When the person gave it; default now.
    pub given_at: Option<OffsetDateTime>,
    /// Last day it holds (UTC, inclusive); default until revoked.
    pub valid_until: Option<Date>,
    /// Evidence reference (form number, file reference).
    pub evidence_ref: Option<String>,
}

impl NewConsent {
    /// Checks every member; the first problem names its field.
    pub fn validate(&self, now: OffsetDateTime) -> Result<(), ConsentError> {
        if !is_plain_id(&self.subject) {
            return Err(invalid(
                "subject",
                "must be a register id: 1 to 64 letters, digits, '-' or '_'",
            ));
        }
        if !is_plain_id(&self.agency) {
            return Err(invalid("agency", "must be an agency id"));
        }
        if !is_plain_id(&self.purpose) {
            return Err(invalid("purpose", "must be a purpose code"));
        }
        if self.scope.len() > MAX_SCOPE {
            return Err(invalid("scope", "lists too many services"));
        }
        for s in &self.scope {
            let ok = s
                .split_once('/')
                .is_some_and(|(p, sv)| is_plain_id(p) && is_plain_id(sv));
            if !ok {
                return Err(invalid("scope", "entries must be \"provider/service\""));
            }
        }
        let given = self.given_at.unwrap_or(now);
        if given > now + GIVEN_AT_SKEW {
            return Err(invalid("given_at", "lies in the future"));
        }
        if self.valid_until.is_some_and(|u| u < given.date()) {
            return Err(invalid("valid_until", "is before given_at"));
        }
        if let Some(e) = &self.evidence_ref {
            let printable = e.chars().all(|c| !c.is_control());
            if e.trim().is_empty() || e.chars().count() > MAX_EVIDENCE || !printable {
                return Err(invalid(
                    "evidence_ref",
                    "must be 1 to 128 printable characters",
                ));
            }
        }
        Ok(())
    }
}

/// Why a consent operation failed; each variant knows its status and problem type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsentError {
    /// A member of the consent is missing or malformed.
    #[error("{field}: {message}")]
    Invalid {
        /// The member.
        field: String,
        /// What is wrong, safe to show.
        message: String,
    },
    /// No such consent (or not one the caller's agency recorded).
    #[error("no such consent")]
    NotFound,
    /// The consent was revoked before.
    #[error("the consent is already revoked")]
    AlreadyRevoked,
    /// The database failed.
    #[error("consent store: {0}")]
    Database(#[from] sqlx::Error),
    /// The attempt record could not be committed; nothing was changed.
    #[error("audit log: {0}")]
    Audit(#[from] AuditError),
    /// The change was made, but its outcome record could not be committed (the
    /// attempt stays in the log with an unknown outcome).
    #[error("consent changed, outcome not recorded: {0}")]
    OutcomeNotRecorded(AuditError),
}

/// A failed change's status and reason, as its record states them (at the command line
/// too); what a caller over the gateway is shown is `crate::gateway::refusal`'s.
impl ConsentError {
    /// The HTTP status a caller receives.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            ConsentError::Invalid { .. } => S::UNPROCESSABLE_ENTITY,
            ConsentError::NotFound => S::NOT_FOUND,
            ConsentError::AlreadyRevoked => S::CONFLICT,
            ConsentError::Database(_)
            | ConsentError::Audit(_)
            | ConsentError::OutcomeNotRecorded(_) => S::SERVICE_UNAVAILABLE,
        }
    }

    /// Snake-case reason for the audit record.
    pub fn reason(&self) -> &'static str {
        match self {
            ConsentError::Invalid { .. } => "consent_invalid",
            ConsentError::NotFound => "consent_not_found",
            ConsentError::AlreadyRevoked => "consent_already_revoked",
            ConsentError::Database(_) => "consent_store_unavailable",
            ConsentError::Audit(_) | ConsentError::OutcomeNotRecorded(_) => "audit_unavailable",
        }
    }
}

fn invalid(field: &str, message: &str) -> ConsentError {
    ConsentError::Invalid {
        field: field.to_owned(),
        message: message.to_owned(),
    }
}

/// Register ids, agency ids and purpose codes: 1 to 64 of `[A-Za-z0-9_-]`.
pub(crate) fn is_plain_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn parse_date(s: &str) -> Option<Date> {
    Date::parse(s, format_description!("[year]-[month]-[day]")).ok()
}

pub(crate) fn format_date(d: Date) -> String {
    d.format(format_description!("[year]-[month]-[day]"))
        .unwrap_or_else(|_| d.to_string())
}

/// `YYYY-MM-DD` (midnight UTC) or an RFC 3339 timestamp.
pub fn parse_instant(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .or_else(|| parse_date(s).map(|d| d.midnight().assume_utc()))
}

/// `YYYY-MM-DD`, for `valid_until`.
pub fn parse_day(s: &str) -> Option<Date> {
    parse_date(s)
}

/// Reads a `POST /v1/consents` body; the consent is for the caller's `agency` and the token's `purpose`.
///
/// `agency` and `purpose` in the body are optional; when present they must
/// equal the caller's, since an agency records only the consents given to it,
/// for the purpose its officer states.
pub fn parse_grant(body: &[u8], agency: &str, purpose: &str) -> Result<NewConsent, ConsentError> {
    let map = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => m,
        _ => return Err(invalid("body", "must be a JSON object")),
    };
    const KNOWN: [&str; 7] = [
        "subject",
        "agency",
        "purpose",
        "scope",
        "given_at",
        "valid_until",
        "evidence_ref",
    ];
    if let Some(k) = map.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(invalid(k, "unknown field"));
    }
    let text = |m: &Map<String, Value>, name: &str| -> Result<Option<String>, ConsentError> {
        match m.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(invalid(name, "must be a string")),
        }
    };
    let subject = text(&map, "subject")?.ok_or_else(|| invalid("subject", "is required"))?;
    if text(&map, "agency")?.is_some_and(|a| a != agency) {
        return Err(invalid(
            "agency",
            "an agency records only consents given to itself",
        ));
    }
    if text(&map, "purpose")?.is_some_and(|p| p != purpose) {
        return Err(invalid(
            "purpose",
            "must be the purpose stated in the token",
        ));
    }
    let scope = match map.get("scope") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid("scope", "must be a list of \"provider/service\" strings"))?,
        Some(_) => {
            return Err(invalid(
                "scope",
                "must be a list of \"provider/service\" strings",
            ))
        }
    };
    let given_at = text(&map, "given_at")?
        .map(|s| {
            parse_instant(&s)
                .ok_or_else(|| invalid("given_at", "must be a date YYYY-MM-DD or an RFC 3339 time"))
        })
        .transpose()?;
    let valid_until = text(&map, "valid_until")?
        .map(|s| parse_day(&s).ok_or_else(|| invalid("valid_until", "must be a date YYYY-MM-DD")))
        .transpose()?;
    Ok(NewConsent {
        subject,
        agency: agency.to_owned(),
        purpose: purpose.to_owned(),
        scope,
        given_at,
        valid_until,
        evidence_ref: text(&map, "evidence_ref")?,
    })
}
