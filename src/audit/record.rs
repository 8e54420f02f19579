//! The audit record and its hash: what one request leaves behind, and the one
//! canonical serialisation that both the writer and the verifier hash.
//!
//! A record's hash covers every column but `trace_id` (a correlation aid stored beside it), its place in the node's chain (`node`,
//! `seq`) and the previous record's hash, so changing, inserting or removing
//! any stored row breaks the chain from that row on.

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

use super::text::{STORED_INDEXED_CHARS, STORED_TEXT_CHARS};
use super::AuditError;

/// `prev_hash` of the first record of every node's chain: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What the gateway hands to the log for one request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Request id (UUID v7 text), assigned by the caller, unique.
    pub id: String,
    /// RFC 3339 UTC with microseconds, assigned by the caller at request start.
    pub ts: String,
    /// The calling agency's id.
    pub agency: Option<String>,
    /// SHA-256 fingerprint of the agency's client certificate.
    pub certificate: Option<String>,
    /// The officer named by the token.
    pub officer: Option<String>,
    /// The declared purpose of the request.
    pub purpose: Option<String>,
    /// The legal basis the grant relies on.
    pub legal_basis: Option<String>,
    /// The case number the officer works on.
    pub case_ref: Option<String>,
    /// The data subject's consent the request relied on.
    pub consent_ref: Option<String>,
    /// The token's `jti`.
    pub token_id: Option<String>,
    /// The provider asked.
    pub provider: Option<String>,
    /// The provider's service asked.
    pub service: Option<String>,
    /// The operation within the service, or the event's name.
    pub operation: Option<Operation>,
    /// HTTP method.
    pub method: String,
    /// HTTP path as requested.
    pub path: String,
    /// Identifiers of the data subjects whose records were asked for.
    pub subjects: Vec<String>,
    /// Fields released to the caller.
    pub fields: Vec<String>,
    /// `"allow"` or `"deny"`.
    pub decision: Decision,
    /// Reason code for a denial or an error (`no_grant`, `token_expired`, …).
    pub reason: Option<String>,
    /// HTTP status returned to the caller.
    pub status: u16,
    /// Version of the policy set that decided.
    pub policy_version: String,
    /// What the agency's `shadow = true` grants would have decided (`"allow"` or `"deny"`), not enforced;
    /// `None` when no shadow grant applies to the request.
    #[serde(default)]
    pub shadow_decision: Option<Decision>,
    /// Hex SHA-256 of the response body exactly as released; `None` when nothing was released.
    #[serde(default)]
    pub response_digest: Option<String>,
    /// Whether a grant marked `restricted` allowed the request (kept out of the
    /// data subject's report until `audit.restricted_report_delay` has passed).
    #[serde(default)]
    pub restricted: bool,
    /// The provider's own HTTP status when it answered with an error; the
    /// caller got the gateway's problem (`status`) instead of its body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    /// Whether the deciding grant releases the data subject only as a
    /// pseudonym: the agency's own audit views withhold `subjects`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub pseudonymised: bool,
    /// `"attempt"` or `"outcome"` for a change logged ahead (a write, a consent,
    /// an administrative change); `None` for a request or event with one record.
    #[serde(default)]
    pub phase: Option<String>,
    /// On an outcome: the id of its attempt (the request id the caller was given).
    #[serde(default)]
    pub attempt_id: Option<String>,
    /// Hex SHA-256 of the request body exactly as received, on a change's records.
    #[serde(default)]
    pub request_digest: Option<String>,
    /// The field paths a change writes (its body's members), on a change's records.
    #[serde(default)]
    pub written: Vec<String>,
    /// The request's W3C trace id (`traceparent`). Stored beside the record,
    /// not covered by its hash: a correlation aid, not evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// What the record says was decided: stored and hashed as `"allow"` / `"deny"`.
///
/// A request the policy allowed stays `Allow` when the provider or the
/// gateway then failed it; only the gateway's own checks make a `Deny`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Allowed by a grant (events and changes logged ahead are allowed too).
    Allow,
    /// Refused; nothing is allowed unless a grant says so.
    #[default]
    Deny,
}

impl Decision {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        }
    }

    /// The decision a stored text names, if any.
    pub fn parse(s: &str) -> Option<Decision> {
        match s {
            "allow" => Some(Decision::Allow),
            "deny" => Some(Decision::Deny),
            _ => None,
        }
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reads `"allow"` as [`Decision::Allow`] and any other text as [`Decision::Deny`].
impl From<&str> for Decision {
    fn from(s: &str) -> Self {
        Decision::parse(s).unwrap_or(Decision::Deny)
    }
}

/// A decision reads as its stored text (`e.shadow_decision.as_deref() == Some("allow")`).
impl std::ops::Deref for Decision {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<&str> for Decision {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// What a record is about: a read or a write of a provider's service, or an
/// event of the gateway itself (`node-start`, `consent-grant`, …), stored and
/// hashed as that text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Operation {
    /// A read (`GET`, `HEAD`).
    Read,
    /// A write (`POST`, `PUT`, `PATCH`, `DELETE`), or a consent change through the gateway.
    Write,
    /// An event, by its name.
    Event(String),
}

impl Operation {
    /// The stored text.
    pub fn as_str(&self) -> &str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
            Operation::Event(name) => name,
        }
    }
}

impl From<String> for Operation {
    fn from(s: String) -> Self {
        match s.as_str() {
            "read" => Operation::Read,
            "write" => Operation::Write,
            _ => Operation::Event(s),
        }
    }
}

impl From<&str> for Operation {
    fn from(s: &str) -> Self {
        Operation::from(s.to_owned())
    }
}

/// An operation reads as its stored text (`e.operation.as_deref() == Some("read")`).
impl std::ops::Deref for Operation {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl Serialize for Operation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Operation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Operation::from)
    }
}

/// `Entry::phase` of the record committed before a change is made.
pub const PHASE_ATTEMPT: &str = "attempt";
/// `Entry::phase` of the record committed once a change's outcome is known.
pub const PHASE_OUTCOME: &str = "outcome";

/// A committed record: the entry plus its place in the node's hash chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the node's chain, from 1 without gaps.
    pub seq: i64,
    /// The gateway node whose chain holds the record.
    pub node: String,
    /// What the gateway logged.
    #[serde(flatten)]
    pub entry: Entry,
    /// Hash of the previous record of this node ([`GENESIS_HASH`] for seq 1).
    pub prev_hash: String,
    /// `hex(SHA-256(prev_hash || "\n" || canonical_json))`.
    pub hash: String,
    /// Read back, not stored or hashed: an attempt whose outcome the log does
    /// not hold (yet) — the gateway stopped between making the change and
    /// recording what came of it, so whether it happened is unknown.
    #[serde(default, skip_serializing_if = "is_false")]
    pub outcome_unknown: bool,
}

impl Record {
    /// Builds the record that follows `prev_hash` at `seq`, computing its hash.
    pub fn chain(
        seq: i64,
        node: &str,
        entry: Entry,
        prev_hash: &str,
    ) -> Result<Record, AuditError> {
        let hash = chain_hash(seq, node, &entry, prev_hash)?;
        Ok(Record {
            seq,
            node: node.to_owned(),
            entry,
            prev_hash: prev_hash.to_owned(),
            hash,
            outcome_unknown: false,
        })
    }

    /// The hash this record's content calls for (equal to `hash` unless tampered with).
    pub fn expected_hash(&self) -> Result<String, AuditError> {
        chain_hash(self.seq, &self.node, &self.entry, &self.prev_hash)
    }
}

/// The hashed form of a record: every column but `hash`, in a fixed order.
///
/// A struct rather than a map so that the key order is part of the code, not
/// of a map implementation; changing it invalidates every stored chain.
#[derive(Serialize)]
struct Canonical<'a> {
    seq: i64,
    node: &'a str,
    id: &'a str,
    ts: &'a str,
    agency: Option<&'a str>,
    certificate: Option<&'a str>,
    officer: Option<&'a str>,
    purpose: Option<&'a str>,
    legal_basis: Option<&'a str>,
    case_ref: Option<&'a str>,
    consent_ref: Option<&'a str>,
    token_id: Option<&'a str>,
    provider: Option<&'a str>,
    service: Option<&'a str>,
    operation: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    subjects: &'a [String],
    fields: &'a [String],
    decision: &'a str,
    reason: Option<&'a str>,
    status: u16,
    policy_version: &'a str,
    // Left out when absent, so records written before shadow mode keep their hashes.
    #[serde(skip_serializing_if = "Option::is_none")]
    shadow_decision: Option<&'a str>,
    // Likewise for records written before response digests and restricted grants.
    #[serde(skip_serializing_if = "Option::is_none")]
    response_digest: Option<&'a str>,
    #[serde(skip_serializing_if = "is_false")]
    restricted: bool,
    // Likewise for records written before issue 14.
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_status: Option<u16>,
    #[serde(skip_serializing_if = "is_false")]
    pseudonymised: bool,
    // Likewise for records written before changes were logged ahead (issue 13).
    #[serde(skip_serializing_if = "Option::is_none")]
    phase: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_digest: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    written: &'a [String],
    prev_hash: &'a str,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The canonical JSON of a record without its hash: the text the hash covers.
pub fn canonical_json(
    seq: i64,
    node: &str,
    entry: &Entry,
    prev_hash: &str,
) -> Result<String, AuditError> {
    let e = entry;
    let canonical = Canonical {
        seq,
        node,
        id: &e.id,
        ts: &e.ts,
        agency: e.agency.as_deref(),
        certificate: e.certificate.as_deref(),
        officer: e.officer.as_deref(),
        purpose: e.purpose.as_deref(),
        legal_basis: e.legal_basis.as_deref(),
        case_ref: e.case_ref.as_deref(),
        consent_ref: e.consent_ref.as_deref(),
        token_id: e.token_id.as_deref(),
        provider: e.provider.as_deref(),
        service: e.service.as_deref(),
        operation: e.operation.as_deref(),
        method: &e.method,
        path: &e.path,
        subjects: &e.subjects,
        fields: &e.fields,
        decision: e.decision.as_str(),
        reason: e.reason.as_deref(),
        status: e.status,
        policy_version: &e.policy_version,
        shadow_decision: e.shadow_decision.map(Decision::as_str),
        response_digest: e.response_digest.as_deref(),
        restricted: e.restricted,
        upstream_status: e.upstream_status,
        pseudonymised: e.pseudonymised,
        phase: e.phase.as_deref(),
        attempt_id: e.attempt_id.as_deref(),
        request_digest: e.request_digest.as_deref(),
        written: &e.written,
        prev_hash,
    };
    serde_json::to_string(&canonical).map_err(AuditError::Json)
}

/// `hex(SHA-256(prev_hash || "\n" || canonical_json))` for a record.
pub fn chain_hash(
    seq: i64,
    node: &str,
    entry: &Entry,
    prev_hash: &str,
) -> Result<String, AuditError> {
    let canonical = canonical_json(seq, node, entry, prev_hash)?;
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(prev_hash.as_bytes());
    ctx.update(b"\n");
    ctx.update(canonical.as_bytes());
    Ok(hex::encode(ctx.finish().as_ref()))
}

/// Formats a time the way records store it: UTC, microseconds, `Z`
/// (`2026-11-03T09:15:02.123456Z`), so that text order is time order.
pub fn format_ts(t: OffsetDateTime) -> String {
    let fmt =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
    // Years 0..=9999 always format; anything else cannot come out of RFC 3339 parsing.
    t.to_offset(UtcOffset::UTC)
        .format(&fmt)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// The current time as a record timestamp.
pub fn now_ts() -> String {
    format_ts(OffsetDateTime::now_utc())
}

/// Parses an RFC 3339 time (any offset) into the stored form, or `None`.
pub fn normalise_ts(s: &str) -> Option<String> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    (0..=9999)
        .contains(&t.to_offset(UtcOffset::UTC).year())
        .then(|| format_ts(t))
}

/// Makes an entry storable identically on both backends before it is hashed.
///
/// PostgreSQL text cannot hold NUL, so one NUL smuggled into a path would
/// fail a whole batch; it is replaced (U+FFFD) instead, keeping the request
/// logged. Every text is capped ([`super::text`]): an indexed value at
/// [`STORED_INDEXED_CHARS`], any other at [`STORED_TEXT_CHARS`], so no value
/// can exceed an index row. The gateway refuses over-long values long
/// before; this holds whoever hands the entry over. The timestamp is brought
/// to the stored form so that time filters, which compare text, stay correct.
pub(crate) fn prepare(mut entry: Entry) -> Result<Entry, AuditError> {
    entry.ts = normalise_ts(&entry.ts)
        .ok_or_else(|| AuditError::InvalidEntry(format!("ts is not RFC 3339: {:?}", entry.ts)))?;
    if entry.id.is_empty() {
        return Err(AuditError::InvalidEntry("empty request id".into()));
    }
    let e = &mut entry;
    for s in [&mut e.id, &mut e.method, &mut e.path, &mut e.policy_version] {
        scrub(s, STORED_TEXT_CHARS);
    }
    for s in [
        &mut e.agency,
        &mut e.officer,
        &mut e.purpose,
        &mut e.provider,
        &mut e.service,
    ]
    .into_iter()
    .flatten()
    {
        scrub(s, STORED_INDEXED_CHARS);
    }
    for s in [
        &mut e.certificate,
        &mut e.legal_basis,
        &mut e.case_ref,
        &mut e.consent_ref,
        &mut e.token_id,
        &mut e.reason,
        &mut e.response_digest,
        &mut e.phase,
        &mut e.attempt_id,
        &mut e.request_digest,
    ]
    .into_iter()
    .flatten()
    {
        scrub(s, STORED_TEXT_CHARS);
    }
    if let Some(Operation::Event(name)) = &mut e.operation {
        scrub(name, STORED_TEXT_CHARS);
    }
    e.subjects
        .iter_mut()
        .chain(e.fields.iter_mut())
        .chain(e.written.iter_mut())
        .for_each(|s| scrub(s, STORED_INDEXED_CHARS));
    Ok(entry)
}

fn scrub(s: &mut String, max: usize) {
    if s.contains('\0') {
        *s = s.replace('\0', "\u{FFFD}");
    }
    if let std::borrow::Cow::Owned(cut) = super::text::cut(s, max) {
        *s = cut;
    }
}

/// One `audit_log` row as stored.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct Row {
    node: String,
    seq: i64,
    id: String,
    ts: String,
    agency: Option<String>,
    certificate: Option<String>,
    officer: Option<String>,
    purpose: Option<String>,
    legal_basis: Option<String>,
    case_ref: Option<String>,
    consent_ref: Option<String>,
    token_id: Option<String>,
    provider: Option<String>,
    service: Option<String>,
    operation: Option<String>,
    method: String,
    path: String,
    subjects: String,
    fields: String,
    decision: String,
    reason: Option<String>,
    status: i64,
    policy_version: String,
    shadow_decision: Option<String>,
    response_digest: Option<String>,
    restricted: i64,
    upstream_status: Option<i64>,
    pseudonymised: i64,
    prev_hash: String,
    hash: String,
    phase: Option<String>,
    attempt_id: Option<String>,
    request_digest: Option<String>,
    written: Option<String>,
    #[sqlx(default)]
    trace_id: Option<String>,
    /// For an attempt, how many outcomes name it; only the queries that ask for it compute it.
    #[sqlx(default)]
    outcomes: Option<i64>,
}

impl Row {
    /// The node and seq of the row, for error reports.
    pub(crate) fn place(&self) -> (&str, i64) {
        (&self.node, self.seq)
    }

    /// The record the row holds, or why it cannot be one.
    pub(crate) fn into_record(self) -> Result<Record, String> {
        let subjects: Vec<String> = serde_json::from_str(&self.subjects)
            .map_err(|e| format!("subjects column is not a JSON string array: {e}"))?;
        let fields: Vec<String> = serde_json::from_str(&self.fields)
            .map_err(|e| format!("fields column is not a JSON string array: {e}"))?;
        let status = u16::try_from(self.status)
            .map_err(|_| format!("status {} is out of range", self.status))?;
        let written: Vec<String> = match &self.written {
            Some(w) => serde_json::from_str(w)
                .map_err(|e| format!("written column is not a JSON string array: {e}"))?,
            None => Vec::new(),
        };
        let outcome_unknown =
            self.phase.as_deref() == Some(PHASE_ATTEMPT) && self.outcomes == Some(0);
        Ok(Record {
            seq: self.seq,
            node: self.node,
            entry: Entry {
                id: self.id,
                ts: self.ts,
                agency: self.agency,
                certificate: self.certificate,
                officer: self.officer,
                purpose: self.purpose,
                legal_basis: self.legal_basis,
                case_ref: self.case_ref,
                consent_ref: self.consent_ref,
                token_id: self.token_id,
                provider: self.provider,
                service: self.service,
                operation: self.operation.map(Operation::from),
                method: self.method,
                path: self.path,
                subjects,
                fields,
                decision: Decision::parse(&self.decision).ok_or_else(|| {
                    format!("decision {:?} is neither allow nor deny", self.decision)
                })?,
                reason: self.reason,
                status,
                policy_version: self.policy_version,
                shadow_decision: self
                    .shadow_decision
                    .map(|d| {
                        Decision::parse(&d).ok_or_else(|| {
                            format!("shadow_decision {d:?} is neither allow nor deny")
                        })
                    })
                    .transpose()?,
                response_digest: self.response_digest,
                restricted: match self.restricted {
                    0 => false,
                    1 => true,
                    n => return Err(format!("restricted {n} is neither 0 nor 1")),
                },
                upstream_status: self
                    .upstream_status
                    .map(|s| {
                        u16::try_from(s).map_err(|_| format!("upstream_status {s} is out of range"))
                    })
                    .transpose()?,
                pseudonymised: match self.pseudonymised {
                    0 => false,
                    1 => true,
                    n => return Err(format!("pseudonymised {n} is neither 0 nor 1")),
                },
                phase: self.phase,
                attempt_id: self.attempt_id,
                request_digest: self.request_digest,
                written,
                trace_id: self.trace_id,
            },
            prev_hash: self.prev_hash,
            hash: self.hash,
            outcome_unknown,
        })
    }
}

/// The columns of `audit_log` in insert order (35 of them).
macro_rules! audit_columns {
    () => {
        "node, seq, id, ts, agency, certificate, officer, purpose, legal_basis, case_ref, \
         consent_ref, token_id, provider, service, operation, method, path, subjects, fields, \
         decision, reason, status, policy_version, prev_hash, hash, shadow_decision, \
         response_digest, restricted, upstream_status, pseudonymised, phase, attempt_id, \
         request_digest, written, trace_id"
    };
}
pub(crate) use audit_columns;

/// How many columns [`audit_columns!`] lists.
pub(crate) const AUDIT_COLUMN_COUNT: usize = 35;

#[cfg(test)]
mod pinned {
    use super::*;

    /// A fully populated entry: every column set, so every column's form is pinned.
    pub(crate) fn full_entry() -> Entry {
        Entry {
            id: "0190f3a2-7b1c-7000-8000-000000000001".into(),
            ts: "2026-11-03T09:15:02.123456Z".into(),
            agency: Some("mia-border".into()),
            certificate: Some("ab".repeat(32)),
            officer: Some("officer-7".into()),
            purpose: Some("border-control".into()),
            legal_basis: Some("Aliens Act s. 12".into()),
            case_ref: Some("CASE-1".into()),
            consent_ref: Some("consent-1".into()),
            token_id: Some("jti-1".into()),
            provider: Some("registry".into()),
            service: Some("persons".into()),
            operation: Some("write".into()),
            method: "POST".into(),
            path: "/v1/registry/persons/RF-1?x=1".into(),
            subjects: vec!["RF-1".into(), "RF-2".into()],
            fields: vec!["id".into(), "names.surname".into()],
            decision: "allow".into(),
            reason: Some("upstream_error".into()),
            status: 502,
            policy_version: "v-123".into(),
            shadow_decision: Some("deny".into()),
            response_digest: Some("cd".repeat(32)),
            restricted: true,
            upstream_status: Some(500),
            pseudonymised: true,
            phase: Some("outcome".into()),
            attempt_id: Some("0190f3a2-7b1c-7000-8000-000000000000".into()),
            request_digest: Some("ef".repeat(32)),
            written: vec!["employer.name".into(), "person_id".into()],
            trace_id: None,
        }
    }

    /// The hash and canonical form of a fixed record, as computed before the
    /// entry's `decision` and `operation` became typed: stored chains verify only while they hold.
    #[test]
    fn a_fixed_records_hash_never_changes() {
        let e = full_entry();
        let canonical = canonical_json(7, "node-a", &e, GENESIS_HASH).unwrap();
        assert_eq!(
            canonical,
            r#"{"seq":7,"node":"node-a","id":"0190f3a2-7b1c-7000-8000-000000000001","ts":"2026-11-03T09:15:02.123456Z","agency":"mia-border","certificate":"abababababababababababababababababababababababababababababababab","officer":"officer-7","purpose":"border-control","legal_basis":"Aliens Act s. 12","case_ref":"CASE-1","consent_ref":"consent-1","token_id":"jti-1","provider":"registry","service":"persons","operation":"write","method":"POST","path":"/v1/registry/persons/RF-1?x=1","subjects":["RF-1","RF-2"],"fields":["id","names.surname"],"decision":"allow","reason":"upstream_error","status":502,"policy_version":"v-123","shadow_decision":"deny","response_digest":"cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd","restricted":true,"upstream_status":500,"pseudonymised":true,"phase":"outcome","attempt_id":"0190f3a2-7b1c-7000-8000-000000000000","request_digest":"efefefefefefefefefefefefefefefefefefefefefefefefefefefefefefefef","written":["employer.name","person_id"],"prev_hash":"0000000000000000000000000000000000000000000000000000000000000000"}"#
        );
        assert_eq!(
            chain_hash(7, "node-a", &e, GENESIS_HASH).unwrap(),
            "17f71654886da86b2b6538241948a5dce8eb2e630539277380ceafcd30962b1a"
        );
        let stored = serde_json::to_string(&e).unwrap();
        assert_eq!(stored, PINNED_ENTRY_JSON);
        assert_eq!(serde_json::from_str::<Entry>(&stored).unwrap(), e);
    }

    /// The other decision and an event's operation name keep their stored text too.
    #[test]
    fn a_denial_and_an_events_operation_keep_their_text() {
        let mut e = full_entry();
        e.decision = "deny".into();
        e.shadow_decision = Some("allow".into());
        e.operation = Some("consent-grant".into());
        assert_eq!(
            chain_hash(7, "node-a", &e, GENESIS_HASH).unwrap(),
            "46238ae9658c7f27d95f1c964e5cdb4657583c41ab873677013170ad0391934d"
        );
        let stored = serde_json::to_string(&e).unwrap();
        assert!(
            stored.contains(r#""operation":"consent-grant""#),
            "{stored}"
        );
        assert!(stored.contains(r#""decision":"deny""#), "{stored}");
        assert_eq!(serde_json::from_str::<Entry>(&stored).unwrap(), e);
    }

    const PINNED_ENTRY_JSON: &str = r#"{"id":"0190f3a2-7b1c-7000-8000-000000000001","ts":"2026-11-03T09:15:02.123456Z","agency":"mia-border","certificate":"abababababababababababababababababababababababababababababababab","officer":"officer-7","purpose":"border-control","legal_basis":"Aliens Act s. 12","case_ref":"CASE-1","consent_ref":"consent-1","token_id":"jti-1","provider":"registry","service":"persons","operation":"write","method":"POST","path":"/v1/registry/persons/RF-1?x=1","subjects":["RF-1","RF-2"],"fields":["id","names.surname"],"decision":"allow","reason":"upstream_error","status":502,"policy_version":"v-123","shadow_decision":"deny","response_digest":"cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd","restricted":true,"upstream_status":500,"pseudonymised":true,"phase":"outcome","attempt_id":"0190f3a2-7b1c-7000-8000-000000000000","request_digest":"efefefefefefefefefefefefefefefefefefefefefefefefefefefefefefefef","written":["employer.name","person_id"]}"#;

    #[test]
    fn the_trace_id_is_stored_beside_the_record_not_hashed() {
        let mut e = Entry {
            id: "0190f3a2-7b1c-7000-8000-000000000001".into(),
            ..Entry::default()
        };
        let before = chain_hash(1, "node-a", &e, GENESIS_HASH).unwrap();
        e.trace_id = Some("4bf92f3577b34da6a3ce929d0e0e4736".into());
        assert_eq!(chain_hash(1, "node-a", &e, GENESIS_HASH).unwrap(), before);
        assert!(serde_json::to_string(&e)
            .unwrap()
            .contains("\"trace_id\":\"4bf9"));
    }
}
