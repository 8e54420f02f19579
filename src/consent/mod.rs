//! Consent records: a data subject's consent, collected by an agency, to the
//! processing of their record for one purpose — granted, revoked, and checked
//! on every request whose grant says `consent = "required"`.
//!
//! Records live beside the audit log in the same database (table `consents`,
//! migration 0007, SQLite and PostgreSQL through one code path). [`Consents`]
//! is the only way to change them, and every change is logged ahead
//! (`crate::audit::ahead`): its attempt record — naming the consent's id, the
//! person and what is written — is committed before the row is written, and
//! the writing methods take the committed [`Attempt`] as proof; its outcome
//! follows. Through the gateway the request's own records are the attempt and
//! the outcome; at the command line they are events (method `EVENT`, path
//! `consent-grant` / `consent-revoke`). So no consent exists that the log
//! does not know of, and a crash in between leaves an attempt whose outcome
//! is unknown. The check ([`Consents::valid`]) reads the
//! database on every request and caches nothing, so a revocation holds from
//! the next request on, on every replica.
//!
//! Agencies record the consents they collected through the gateway
//! (`POST /v1/consents`, `POST /v1/consents/{id}/revoke`, served by
//! `crate::gateway::builtin::consents`),
//! authorised by a grant on the gateway's own service `gateway/consents`;
//! administrators use `karibche consent grant|revoke|list`.

use serde::Serialize;
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime};

use crate::audit::{Attempt, AuditError, AuditLog, Entry};
use crate::store::Store;

/// The provider id under which policy grants authorise recording consents.
pub const API_PROVIDER: &str = "gateway";
/// The service id under which policy grants authorise recording consents.
pub const API_SERVICE: &str = "consents";

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

/// Who changes a consent; copied into the audit event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actor {
    /// The agency acting (`None` for an administrator at the command line).
    pub agency: Option<String>,
    /// The officer (from the token), or `cli:<node>` for an administrator.
    pub officer: String,
    /// The token's purpose, if the change came through the gateway.
    pub purpose: Option<String>,
    /// SHA-256 of the client certificate, if any.
    pub certificate: Option<String>,
    /// The token's `jti`, if any.
    pub token_id: Option<String>,
    /// The gateway request that made the change, if any (its own record follows the event).
    pub request_id: Option<String>,
    /// The policy version in force.
    pub policy_version: String,
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

    /// The problem `type` slug.
    pub fn slug(&self) -> &'static str {
        match self {
            ConsentError::Invalid { .. } => "invalid-consent",
            ConsentError::NotFound => "consent-not-found",
            ConsentError::AlreadyRevoked => "consent-revoked",
            ConsentError::Database(_) => "consent-store-unavailable",
            ConsentError::Audit(_) | ConsentError::OutcomeNotRecorded(_) => "audit-unavailable",
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

    /// A sentence safe to show the caller (database and audit details stay in the logs).
    pub fn detail(&self) -> String {
        match self {
            ConsentError::Database(_) => "consent records cannot be read or written now".into(),
            ConsentError::Audit(_) => {
                "the access log cannot be written; the consent was not changed".into()
            }
            ConsentError::OutcomeNotRecorded(_) => {
                "the consent was changed, but the access log cannot record the outcome".into()
            }
            other => other.to_string(),
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

fn format_date(d: Date) -> String {
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

// ---- the store -------------------------------------------------------------------------

#[derive(sqlx::FromRow)]
struct Row {
    id: String,
    subject: String,
    agency: String,
    purpose: String,
    scope: Option<String>,
    given_at: String,
    valid_until: Option<String>,
    evidence_ref: Option<String>,
    recorded_at: String,
    recorded_by: String,
    revoked_at: Option<String>,
}

impl From<Row> for Consent {
    fn from(r: Row) -> Consent {
        Consent {
            id: r.id,
            subject: r.subject,
            agency: r.agency,
            purpose: r.purpose,
            scope: r
                .scope
                .map(|s| s.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            given_at: r.given_at,
            valid_until: r.valid_until,
            evidence_ref: r.evidence_ref,
            recorded_at: r.recorded_at,
            recorded_by: r.recorded_by,
            revoked_at: r.revoked_at,
        }
    }
}

const COLUMNS: &str = "id, subject, agency, purpose, scope, given_at, valid_until, evidence_ref, \
                       recorded_at, recorded_by, revoked_at";

/// Consent records in the database; cheap to clone. Changes go through [`Consents`], which audits them.
#[derive(Debug, Clone)]
pub struct ConsentStore {
    store: Store,
}

impl ConsentStore {
    /// Consent records in `store` (migrated by [`Store::connect`]).
    pub fn new(store: Store) -> Self {
        ConsentStore { store }
    }

    /// Writes a new consent, durably or not at all (`crate::store::WriteTx`).
    async fn insert(&self, c: &Consent) -> Result<(), sqlx::Error> {
        let scope = (!c.scope.is_empty()).then(|| c.scope.join(" "));
        let mut tx = self.store.begin_write().await?;
        sqlx::query(
            "INSERT INTO consents (id, subject, agency, purpose, scope, given_at, valid_until, \
             evidence_ref, recorded_at, recorded_by, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL)",
        )
        .bind(&c.id)
        .bind(&c.subject)
        .bind(&c.agency)
        .bind(&c.purpose)
        .bind(scope)
        .bind(&c.given_at)
        .bind(c.valid_until.as_deref())
        .bind(c.evidence_ref.as_deref())
        .bind(&c.recorded_at)
        .bind(&c.recorded_by)
        .execute(tx.conn())
        .await?;
        tx.commit().await
    }

    /// The consent with this id.
    pub async fn get(&self, id: &str) -> Result<Option<Consent>, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM consents WHERE id = $1");
        let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(self.store.pool())
            .await?;
        Ok(row.map(Consent::from))
    }

    /// Every consent (of one subject, if given), oldest first.
    pub async fn list(&self, subject: Option<&str>) -> Result<Vec<Consent>, sqlx::Error> {
        let rows: Vec<Row> = match subject {
            Some(s) => {
                let sql = format!(
                    "SELECT {COLUMNS} FROM consents WHERE subject = $1 ORDER BY recorded_at, id"
                );
                sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(s)
                    .fetch_all(self.store.pool())
                    .await?
            }
            None => {
                let sql = format!("SELECT {COLUMNS} FROM consents ORDER BY recorded_at, id");
                sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .fetch_all(self.store.pool())
                    .await?
            }
        };
        Ok(rows.into_iter().map(Consent::from).collect())
    }

    /// The newest consent holding today for subject × agency × purpose on `provider/service`.
    pub async fn find_valid(
        &self,
        subject: &str,
        agency: &str,
        purpose: &str,
        service: &str,
        today: Date,
    ) -> Result<Option<Consent>, sqlx::Error> {
        // ISO dates compare as text, so expiry is filtered in SQL; scope in Rust.
        let sql = format!(
            "SELECT {COLUMNS} FROM consents WHERE subject = $1 AND agency = $2 AND purpose = $3 \
             AND revoked_at IS NULL AND (valid_until IS NULL OR valid_until >= $4) \
             ORDER BY recorded_at DESC, id DESC"
        );
        let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(subject)
            .bind(agency)
            .bind(purpose)
            .bind(format_date(today))
            .fetch_all(self.store.pool())
            .await?;
        Ok(rows
            .into_iter()
            .map(Consent::from)
            .find(|c| c.holds(today, service)))
    }

    /// Sets `revoked_at` if not yet set; false when it was already revoked or does not exist.
    async fn set_revoked(&self, id: &str, at: &str) -> Result<bool, sqlx::Error> {
        let mut tx = self.store.begin_write().await?;
        let done =
            sqlx::query("UPDATE consents SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
                .bind(id)
                .bind(at)
                .execute(tx.conn())
                .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }
}

// ---- audited changes -------------------------------------------------------------------

/// Consent records with their audit trail: the gateway's and the CLI's handle; cheap to clone.
#[derive(Debug, Clone)]
pub struct Consents {
    store: ConsentStore,
    audit: AuditLog,
}

impl Consents {
    /// Consents in `store`, changes recorded in `audit`.
    pub fn new(store: Store, audit: AuditLog) -> Self {
        Consents {
            store: ConsentStore::new(store),
            audit,
        }
    }

    /// The records, for reading.
    pub fn store(&self) -> &ConsentStore {
        &self.store
    }

    /// Validates a consent to record and gives it its id and times; nothing is written yet.
    pub fn prepare_grant(&self, new: NewConsent, by: &Actor) -> Result<Consent, ConsentError> {
        let now = OffsetDateTime::now_utc();
        new.validate(now)?;
        Ok(Consent {
            id: uuid::Uuid::now_v7().to_string(),
            subject: new.subject,
            agency: new.agency,
            purpose: new.purpose,
            scope: new.scope,
            given_at: crate::audit::format_ts(new.given_at.unwrap_or(now)),
            valid_until: new.valid_until.map(format_date),
            evidence_ref: new.evidence_ref,
            recorded_at: crate::audit::format_ts(now),
            recorded_by: match &by.agency {
                Some(a) => format!("{a}/{}", by.officer),
                None => by.officer.clone(),
            },
            revoked_at: None,
        })
    }

    /// Writes a prepared consent; `_attempt` is the committed attempt record of this change.
    pub async fn record(&self, consent: &Consent, _attempt: &Attempt) -> Result<(), ConsentError> {
        self.store.insert(consent).await?;
        tracing::info!(consent = %consent.id, agency = %consent.agency, purpose = %consent.purpose, "consent granted");
        Ok(())
    }

    /// The consent to revoke: it exists, was recorded for `agency` (if given) and is not revoked yet.
    pub async fn revocable(&self, id: &str, agency: Option<&str>) -> Result<Consent, ConsentError> {
        let consent = self
            .store
            .get(id)
            .await?
            .filter(|c| agency.is_none_or(|a| a == c.agency))
            .ok_or(ConsentError::NotFound)?;
        if consent.revoked_at.is_some() {
            return Err(ConsentError::AlreadyRevoked);
        }
        Ok(consent)
    }

    /// Revokes a consent found by [`Consents::revocable`]; `_attempt` is the
    /// committed attempt record of this change. Returns it as revoked.
    pub async fn revoke_now(
        &self,
        mut consent: Consent,
        _attempt: &Attempt,
    ) -> Result<Consent, ConsentError> {
        let at = crate::audit::now_ts();
        if !self.store.set_revoked(&consent.id, &at).await? {
            return Err(ConsentError::AlreadyRevoked);
        }
        consent.revoked_at = Some(at);
        tracing::info!(consent = %consent.id, "consent revoked");
        Ok(consent)
    }

    /// Records a consent with its attempt and outcome as events (the command line's way).
    pub async fn grant(&self, new: NewConsent, by: &Actor) -> Result<Consent, ConsentError> {
        let consent = self.prepare_grant(new, by)?;
        let reason = format!(
            "consent {} granted: subject {}, agency {}, purpose {}, scope {}, given {}, valid until {}, evidence {}",
            consent.id,
            consent.subject,
            consent.agency,
            consent.purpose,
            scope_text(&consent.scope),
            consent.given_at,
            consent.valid_until.as_deref().unwrap_or("revoked"),
            consent.evidence_ref.as_deref().unwrap_or("-"),
        );
        let entry = event(by, "consent-grant", &consent, reason);
        let attempt = self.audit.attempt(entry.clone()).await?;
        let done = self.record(&consent, &attempt).await;
        self.outcome(attempt, entry, &done, http::StatusCode::CREATED)
            .await?;
        done.map(|()| consent)
    }

    /// Revokes a consent (only one recorded for `agency`, if given) with its attempt and outcome as events.
    pub async fn revoke(
        &self,
        id: &str,
        agency: Option<&str>,
        by: &Actor,
    ) -> Result<Consent, ConsentError> {
        let consent = self.revocable(id, agency).await?;
        let reason = format!(
            "consent {} revoked: subject {}, agency {}, purpose {}",
            consent.id, consent.subject, consent.agency, consent.purpose
        );
        let mut entry = event(by, "consent-revoke", &consent, reason);
        entry.written = vec!["revoked_at".to_owned()];
        let attempt = self.audit.attempt(entry.clone()).await?;
        let done = self.revoke_now(consent, &attempt).await;
        self.outcome(attempt, entry, &done, http::StatusCode::OK)
            .await?;
        done
    }

    /// Commits the outcome event of a command-line change.
    async fn outcome<T>(
        &self,
        attempt: Attempt,
        mut entry: Entry,
        done: &Result<T, ConsentError>,
        ok: http::StatusCode,
    ) -> Result<(), ConsentError> {
        match done {
            Ok(_) => entry.status = ok.as_u16(),
            Err(err) => {
                entry.status = err.status().as_u16();
                entry.reason = Some(format!("{}: {err}", err.reason()));
            }
        }
        if let Err(err) = attempt.outcome(entry).await {
            tracing::error!(%err, "consent change made, its outcome not recorded");
            if done.is_ok() {
                return Err(ConsentError::OutcomeNotRecorded(err));
            }
        }
        Ok(())
    }

    /// The id of a consent holding now for subject × agency × purpose on `provider/service`; reads the database every time.
    pub async fn valid(
        &self,
        subject: &str,
        agency: &str,
        purpose: &str,
        provider: &str,
        service: &str,
    ) -> Result<Option<String>, sqlx::Error> {
        let today = OffsetDateTime::now_utc().date();
        let scope = format!("{provider}/{service}");
        Ok(self
            .store
            .find_valid(subject, agency, purpose, &scope, today)
            .await?
            .map(|c| c.id))
    }
}

fn scope_text(scope: &[String]) -> String {
    if scope.is_empty() {
        "all services".to_owned()
    } else {
        scope.join(" ")
    }
}

/// The attempt event of one command-line change (its outcome is the same with a status).
fn event(by: &Actor, action: &str, c: &Consent, reason: String) -> Entry {
    let reason = match &by.request_id {
        Some(r) => format!("{reason}; request {r}"),
        None => reason,
    };
    let written = [
        "subject",
        "agency",
        "purpose",
        "given_at",
        "recorded_at",
        "recorded_by",
    ]
    .into_iter()
    .chain((!c.scope.is_empty()).then_some("scope"))
    .chain(c.valid_until.is_some().then_some("valid_until"))
    .chain(c.evidence_ref.is_some().then_some("evidence_ref"))
    .map(str::to_owned)
    .collect();
    Entry {
        id: uuid::Uuid::now_v7().to_string(),
        ts: crate::audit::now_ts(),
        agency: by.agency.clone(),
        certificate: by.certificate.clone(),
        officer: Some(by.officer.clone()),
        purpose: by.purpose.clone(),
        consent_ref: Some(c.id.clone()),
        token_id: by.token_id.clone(),
        provider: Some(API_PROVIDER.to_owned()),
        service: Some(API_SERVICE.to_owned()),
        operation: Some(action.to_owned()),
        method: "EVENT".to_owned(),
        path: action.to_owned(),
        subjects: vec![c.subject.clone()],
        decision: "allow".to_owned(),
        reason: Some(reason),
        status: 0,
        policy_version: by.policy_version.clone(),
        request_digest: serde_json::to_vec(c)
            .ok()
            .map(|json| crate::pki::sha256_hex(&json)),
        written,
        ..Entry::default()
    }
}

// ---- consents given through the gateway ------------------------------------------------

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditConfig, Filter};
    use crate::testing::{sqlite_store, PgDatabase};
    use time::macros::date;

    fn actor() -> Actor {
        Actor {
            agency: Some("molhsa".into()),
            officer: "officer-1".into(),
            purpose: Some("social-assistance".into()),
            policy_version: "v1".into(),
            ..Actor::default()
        }
    }

    fn new(subject: &str) -> NewConsent {
        NewConsent {
            subject: subject.into(),
            agency: "molhsa".into(),
            purpose: "social-assistance".into(),
            evidence_ref: Some("FORM-2026-17".into()),
            ..NewConsent::default()
        }
    }

    async fn consents(store: &Store) -> (Consents, crate::audit::AuditWriter) {
        let (audit, writer) = AuditLog::start(store.clone(), AuditConfig::new("test-node"))
            .await
            .unwrap();
        (Consents::new(store.clone(), audit), writer)
    }

    /// The whole life of consents on one backend.
    async fn lifecycle(store: Store) {
        let (c, _writer) = consents(&store).await;
        let today = OffsetDateTime::now_utc().date();
        let svc = ("registry", "persons");
        assert_eq!(
            c.valid("P-1", "molhsa", "social-assistance", svc.0, svc.1)
                .await
                .unwrap(),
            None
        );
        let granted = c.grant(new("P-1"), &actor()).await.unwrap();
        assert_eq!(granted.recorded_by, "molhsa/officer-1");
        assert_eq!(
            c.valid("P-1", "molhsa", "social-assistance", svc.0, svc.1)
                .await
                .unwrap(),
            Some(granted.id.clone())
        );
        // Another person, agency or purpose is not covered.
        for (s, a, p) in [
            ("P-2", "molhsa", "social-assistance"),
            ("P-1", "psda", "social-assistance"),
            ("P-1", "molhsa", "border-control"),
        ] {
            assert_eq!(c.valid(s, a, p, svc.0, svc.1).await.unwrap(), None);
        }
        assert_eq!(
            c.store().get(&granted.id).await.unwrap(),
            Some(granted.clone())
        );

        // Scope: only the services listed.
        let scoped = c
            .grant(
                NewConsent {
                    scope: vec!["registry/visas".into()],
                    ..new("P-3")
                },
                &actor(),
            )
            .await
            .unwrap();
        assert_eq!(scoped.scope, ["registry/visas"]);
        assert_eq!(
            c.valid("P-3", "molhsa", "social-assistance", "registry", "persons")
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            c.valid("P-3", "molhsa", "social-assistance", "registry", "visas")
                .await
                .unwrap(),
            Some(scoped.id.clone())
        );

        // Expiry: the last day still holds, the day after does not.
        let expiring = c
            .grant(
                NewConsent {
                    given_at: Some(date!(2020 - 01 - 01).midnight().assume_utc()),
                    valid_until: Some(date!(2020 - 12 - 31)),
                    ..new("P-4")
                },
                &actor(),
            )
            .await
            .unwrap();
        let find = |day| {
            c.store().find_valid(
                "P-4",
                "molhsa",
                "social-assistance",
                "registry/persons",
                day,
            )
        };
        assert_eq!(
            find(date!(2020 - 12 - 31)).await.unwrap().map(|x| x.id),
            Some(expiring.id.clone())
        );
        assert_eq!(find(date!(2021 - 01 - 01)).await.unwrap(), None);
        assert_eq!(find(today).await.unwrap(), None);

        // Revocation holds from the next check; a second one is refused.
        let revoked = c
            .revoke(&granted.id, Some("molhsa"), &actor())
            .await
            .unwrap();
        assert!(revoked.revoked_at.is_some());
        assert_eq!(
            c.valid("P-1", "molhsa", "social-assistance", svc.0, svc.1)
                .await
                .unwrap(),
            None
        );
        assert!(matches!(
            c.revoke(&granted.id, None, &actor()).await,
            Err(ConsentError::AlreadyRevoked)
        ));
        // Another agency cannot see, let alone revoke, the consent.
        assert!(matches!(
            c.revoke(&scoped.id, Some("psda"), &actor()).await,
            Err(ConsentError::NotFound)
        ));
        assert!(matches!(
            c.revoke("no-such-id", None, &actor()).await,
            Err(ConsentError::NotFound)
        ));

        let all = c.store().list(None).await.unwrap();
        assert_eq!(all.len(), 3);
        let p1 = c.store().list(Some("P-1")).await.unwrap();
        assert_eq!(p1.len(), 1);
        assert!(p1[0].revoked_at.is_some());

        // Every change is logged ahead: an attempt event, then its outcome, both
        // naming the consent and the person.
        let events: Vec<Entry> = crate::audit::query(&store, &Filter::default())
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.entry)
            .collect();
        let steps: Vec<(&str, &str)> = events
            .iter()
            .map(|e| (e.path.as_str(), e.phase.as_deref().unwrap_or("-")))
            .collect();
        let grant = [("consent-grant", "attempt"), ("consent-grant", "outcome")];
        let revoke = [("consent-revoke", "attempt"), ("consent-revoke", "outcome")];
        assert_eq!(steps, [grant, grant, grant, revoke].concat());
        for pair in events.chunks(2) {
            assert_eq!(pair[1].attempt_id.as_deref(), Some(pair[0].id.as_str()));
            assert_eq!(pair[0].consent_ref, pair[1].consent_ref);
            assert_eq!(pair[0].status, 0, "an attempt has no outcome yet");
        }
        assert_eq!(events[1].status, 201);
        assert!(events[0].written.contains(&"evidence_ref".to_owned()));
        assert!(events[0].request_digest.is_some());
        let revoke = &events[7];
        assert_eq!(revoke.method, "EVENT");
        assert_eq!(revoke.status, 200);
        assert_eq!(revoke.consent_ref.as_deref(), Some(granted.id.as_str()));
        assert_eq!(revoke.subjects, ["P-1"]);
        assert_eq!(revoke.agency.as_deref(), Some("molhsa"));
        assert!(events[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("FORM-2026-17")));
    }

    #[tokio::test]
    async fn lifecycle_on_sqlite() {
        let (store, _dir) = sqlite_store().await;
        lifecycle(store).await;
    }

    #[tokio::test]
    async fn lifecycle_on_postgres() {
        let Some((store, _db)) = PgDatabase::store().await else {
            return;
        };
        lifecycle(store).await;
    }

    #[tokio::test]
    async fn a_change_the_log_cannot_record_ahead_is_not_made() {
        let (store, _dir) = sqlite_store().await;
        let (c, writer) = consents(&store).await;
        let kept = c.grant(new("P-1"), &actor()).await.unwrap();
        c.audit.close();
        writer.finish().await;
        assert!(matches!(
            c.grant(new("P-2"), &actor()).await,
            Err(ConsentError::Audit(_))
        ));
        assert!(matches!(
            c.revoke(&kept.id, None, &actor()).await,
            Err(ConsentError::Audit(_))
        ));
        let all = c.store().list(None).await.unwrap();
        assert_eq!(all.len(), 1, "the unaudited grant was never written");
        assert_eq!(
            all[0].revoked_at, None,
            "the unaudited revocation was never made"
        );
    }

    #[test]
    fn validation_names_the_field() {
        let now = OffsetDateTime::now_utc();
        let field = |c: NewConsent| match c.validate(now) {
            Err(ConsentError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert!(new("P-1").validate(now).is_ok());
        assert_eq!(field(new("a b")), "subject");
        assert_eq!(field(new("")), "subject");
        assert_eq!(
            field(NewConsent {
                scope: vec!["registry".into()],
                ..new("P-1")
            }),
            "scope"
        );
        assert_eq!(
            field(NewConsent {
                given_at: Some(now + time::Duration::days(1)),
                ..new("P-1")
            }),
            "given_at"
        );
        assert_eq!(
            field(NewConsent {
                given_at: Some(date!(2021 - 01 - 01).midnight().assume_utc()),
                valid_until: Some(date!(2020 - 12 - 31)),
                ..new("P-1")
            }),
            "valid_until"
        );
        assert_eq!(
            field(NewConsent {
                evidence_ref: Some("a\nb".into()),
                ..new("P-1")
            }),
            "evidence_ref"
        );
    }

    #[test]
    fn grant_bodies() {
        let ok = parse_grant(
            br#"{"subject":"P-1","valid_until":"2030-01-31","given_at":"2026-01-02","scope":["registry/persons"],"evidence_ref":"F-1"}"#,
            "molhsa",
            "social-assistance",
        )
        .unwrap();
        assert_eq!(ok.agency, "molhsa");
        assert_eq!(ok.purpose, "social-assistance");
        assert_eq!(ok.valid_until, Some(date!(2030 - 01 - 31)));
        assert_eq!(ok.given_at.map(|t| t.date()), Some(date!(2026 - 01 - 02)));
        let field = |body: &str| match parse_grant(body.as_bytes(), "molhsa", "social-assistance") {
            Err(ConsentError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field("[]"), "body");
        assert_eq!(field(r#"{}"#), "subject");
        assert_eq!(field(r#"{"subject":"P-1","agency":"psda"}"#), "agency");
        assert_eq!(
            field(r#"{"subject":"P-1","purpose":"border-control"}"#),
            "purpose"
        );
        assert_eq!(
            field(r#"{"subject":"P-1","valid_until":"soon"}"#),
            "valid_until"
        );
        assert_eq!(
            field(r#"{"subject":"P-1","scope":"registry/persons"}"#),
            "scope"
        );
        assert_eq!(field(r#"{"subject":"P-1","note":"x"}"#), "note");
    }
}
