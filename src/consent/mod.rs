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

mod record;
mod store;

use time::OffsetDateTime;

use crate::audit::{Attempt, AuditLog, Entry};
use crate::store::Store;
pub(crate) use record::{format_date, is_plain_id};
pub use record::{parse_day, parse_grant, parse_instant, Consent, ConsentError, NewConsent};
pub use store::ConsentStore;

/// The provider id under which policy grants authorise recording consents.
pub const API_PROVIDER: &str = "gateway";
/// The service id under which policy grants authorise recording consents.
pub const API_SERVICE: &str = "consents";

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
        operation: Some(crate::audit::Operation::Event(action.to_owned())),
        method: "EVENT".to_owned(),
        path: action.to_owned(),
        subjects: vec![c.subject.clone()],
        decision: crate::audit::Decision::Allow,
        reason: Some(reason),
        status: 0,
        policy_version: by.policy_version.clone(),
        request_digest: serde_json::to_vec(c)
            .ok()
            .map(|json| crate::files::sha256_hex(&json)),
        written,
        ..Entry::default()
    }
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
