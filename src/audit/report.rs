//! The data subject's access report: every access to one person's record —
//! who (agency), when, why (purpose and legal basis), what was released, and
//! what was refused — in plain words, or as JSON for a portal.
//!
//! The report is built from the subject index, never by scanning the log.
//! Names of agencies and purposes come from the policy in force (a closure,
//! so this module stays independent of the policy model).
//!
//! A request to the audit log that names the person (an auditor's query) is
//! not a read of the person's record: it is reported as a look-up of the log
//! (`"what": "access-log"`), in words that say so.

use serde::Serialize;

use super::{query, AuditError, Filter, Record};
use crate::store::Store;

/// The built-in provider that is the audit log itself (`upstream = "builtin:audit"`):
/// reads of it are look-ups of the log, not of a record. Served by `crate::gateway::builtin::audit`.
pub const LOG_BUILTIN: &str = "audit";

/// What an access reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reached {
    /// The person's record at a provider (read, or written to).
    Record,
    /// The gateway's access log, asked about the person (an auditor's query): no data of the record.
    AccessLog,
}

/// One access as the data subject sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Access {
    /// When (UTC).
    pub at: String,
    /// Whether the person's record was asked for, or the access log about it.
    pub what: Reached,
    /// Agency id.
    pub agency: Option<String>,
    /// Agency name, where the policy knows it.
    pub agency_name: Option<String>,
    /// Purpose code.
    pub purpose: Option<String>,
    /// Purpose in words, where the policy knows it.
    pub purpose_title: Option<String>,
    /// The legal basis the access relied on.
    pub legal_basis: Option<String>,
    /// `read` or `write`.
    pub operation: Option<String>,
    /// Whether data was released (`allow` with a 2xx answer).
    pub released: bool,
    /// Fields released.
    pub fields: Vec<String>,
    /// Why the request was refused or failed.
    pub refused_because: Option<String>,
    /// The audit record's id, to quote in a complaint.
    pub record_id: String,
    /// A change was attempted but its outcome is not in the log: the gateway
    /// stopped before recording it, so whether the record was changed is unknown.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub outcome_unknown: bool,
}

/// Everything the log holds about accesses to one data subject.
#[derive(Debug, Clone, Serialize)]
pub struct SubjectReport {
    /// The register id of the person.
    pub subject: String,
    /// Accesses, oldest first.
    pub accesses: Vec<Access>,
    /// Said in every report, whether or not such accesses exist: accesses
    /// under restricted grants appear only after a delay.
    pub notice: String,
}

/// Which accesses a report shows.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// Accesses under restricted grants appear only once they are this old.
    pub restricted_delay: std::time::Duration,
    /// Only this agency's accesses (an agency's own internal audit).
    pub agency: Option<String>,
    /// Leave out accesses under pseudonymising grants: an agency's own view
    /// must not tell it which of its pseudonymised reads named the person.
    pub hide_pseudonymised: bool,
    /// Providers that are the audit log itself (`builtin:audit`); requests to them are look-ups of the log.
    pub log_providers: Vec<String>,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            restricted_delay: super::DEFAULT_RESTRICTED_REPORT_DELAY,
            agency: None,
            hide_pseudonymised: false,
            log_providers: vec![LOG_BUILTIN.to_owned()],
        }
    }
}

/// Builds the report for `subject` with the default options; `name_of` maps agency ids and purpose codes to words.
pub async fn subject_report(
    store: &Store,
    subject: &str,
    name_of: &(dyn Fn(NameKind, &str) -> Option<String> + Sync),
) -> Result<SubjectReport, AuditError> {
    subject_report_with(store, subject, &ReportOptions::default(), name_of).await
}

/// Builds the report for `subject`: restricted accesses younger than the delay are left out, unmarked.
pub async fn subject_report_with(
    store: &Store,
    subject: &str,
    options: &ReportOptions,
    name_of: &(dyn Fn(NameKind, &str) -> Option<String> + Sync),
) -> Result<SubjectReport, AuditError> {
    let delay = time::Duration::try_from(options.restricted_delay).unwrap_or(time::Duration::MAX);
    let cut = time::OffsetDateTime::now_utc()
        .checked_sub(delay)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let records = query(
        store,
        &Filter {
            subject: Some(subject.to_owned()),
            agency: options.agency.clone(),
            hide_restricted_since: Some(super::format_ts(cut)),
            ..Filter::default()
        },
    )
    .await?;
    let days = options.restricted_delay.as_secs() / 86_400;
    Ok(SubjectReport {
        subject: subject.to_owned(),
        // A change shows once: as its outcome, or as an attempt whose outcome is unknown.
        accesses: records
            .iter()
            .filter(|r| !(options.hide_pseudonymised && r.entry.pseudonymised))
            .filter(|r| r.entry.phase.as_deref() != Some(super::PHASE_ATTEMPT) || r.outcome_unknown)
            .map(|r| access(r, &options.log_providers, name_of))
            .collect(),
        notice: format!(
            "Accesses under restricted grants (such as national security investigations) may exist; \
             they are shown here only {days} day(s) after they happened. The supervisory authority \
             sees them at once."
        ),
    })
}

/// What a name is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// An agency id.
    Agency,
    /// A purpose code.
    Purpose,
}

fn access(
    r: &Record,
    log_providers: &[String],
    name_of: &(dyn Fn(NameKind, &str) -> Option<String> + Sync),
) -> Access {
    let e = &r.entry;
    let released = e.decision == "allow" && (200..300).contains(&e.status);
    let log = e
        .provider
        .as_deref()
        .is_some_and(|p| log_providers.iter().any(|l| l == p));
    Access {
        at: e.ts.clone(),
        what: if log {
            Reached::AccessLog
        } else {
            Reached::Record
        },
        agency_name: e
            .agency
            .as_deref()
            .and_then(|a| name_of(NameKind::Agency, a)),
        agency: e.agency.clone(),
        purpose_title: e
            .purpose
            .as_deref()
            .and_then(|p| name_of(NameKind::Purpose, p)),
        purpose: e.purpose.clone(),
        legal_basis: e.legal_basis.clone(),
        operation: e.operation.as_deref().map(str::to_owned),
        released,
        fields: if released {
            e.fields.clone()
        } else {
            Vec::new()
        },
        refused_because: if released || r.outcome_unknown {
            None
        } else {
            Some(
                e.reason
                    .clone()
                    .unwrap_or_else(|| format!("status {}", e.status)),
            )
        },
        record_id: e.id.clone(),
        outcome_unknown: r.outcome_unknown,
    }
}

impl std::fmt::Display for SubjectReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "Access report for the record {}", self.subject)?;
        if self.accesses.is_empty() {
            writeln!(f, "No agency has asked for this record.")?;
            return writeln!(f, "\n{}", self.notice);
        }
        let (records, logs): (Vec<&Access>, Vec<&Access>) = self
            .accesses
            .iter()
            .partition(|a| a.what == Reached::Record);
        let released = records.iter().filter(|a| a.released).count();
        let unknown = records.iter().filter(|a| a.outcome_unknown).count();
        writeln!(
            f,
            "{} request(s) asked for this record; {released} received data, {} were refused or failed.",
            records.len(),
            records.len() - released - unknown
        )?;
        if unknown > 0 {
            writeln!(
                f,
                "{unknown} change(s) were attempted whose outcome the log does not hold."
            )?;
        }
        if !logs.is_empty() {
            writeln!(
                f,
                "{} look-up(s) of the access log named this record; they show who asked for it, not what it holds.",
                logs.len()
            )?;
        }
        writeln!(f)?;
        for a in &self.accesses {
            let who = match (&a.agency_name, &a.agency) {
                (Some(name), Some(id)) => format!("{name} ({id})"),
                (None, Some(id)) => id.clone(),
                _ => "an unidentified caller".to_owned(),
            };
            let why = a
                .purpose_title
                .clone()
                .or_else(|| a.purpose.clone())
                .unwrap_or_else(|| "no stated purpose".to_owned());
            let verb = match a.operation.as_deref() {
                Some("write") => "added to",
                _ => "read",
            };
            let date = a.at.get(..16).unwrap_or(&a.at).replace('T', " ");
            if a.outcome_unknown {
                writeln!(
                    f,
                    "- {date} UTC: {who} tried to change your record ({why}); the gateway stopped \
                     before recording whether the change was made (outcome unknown)."
                )?;
            } else if a.what == Reached::AccessLog {
                let outcome = if a.released {
                    "it saw which accesses to your record are logged; none of your record's data"
                        .to_owned()
                } else {
                    format!(
                        "nothing was released ({})",
                        a.refused_because.as_deref().unwrap_or("refused")
                    )
                };
                writeln!(
                    f,
                    "- {date} UTC: {who} looked up the access log about your record for: {why}; {outcome}."
                )?;
            } else if a.released {
                writeln!(f, "- {date} UTC: {who} {verb} your record for: {why}.")?;
                if let Some(basis) = &a.legal_basis {
                    writeln!(f, "    Legal basis: {basis}")?;
                }
                writeln!(f, "    Released: {}", a.fields.join(", "))?;
            } else {
                writeln!(
                    f,
                    "- {date} UTC: {who} asked for your record ({why}); nothing was released ({}).",
                    a.refused_because.as_deref().unwrap_or("refused")
                )?;
            }
            writeln!(f, "    Record: {}", a.record_id)?;
        }
        writeln!(f, "\n{}", self.notice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditConfig, AuditLog, Entry};

    #[tokio::test]
    async fn report_lists_releases_and_refusals_in_words() {
        let (store, _dir) = crate::testing::sqlite_store().await;
        let (log, writer) = AuditLog::start(store.clone(), AuditConfig::new("n1"))
            .await
            .unwrap();
        let base = Entry {
            ts: crate::audit::now_ts(),
            agency: Some("mia-border".into()),
            purpose: Some("border-control".into()),
            legal_basis: Some("Law on the State Border".into()),
            operation: Some("read".into()),
            method: "GET".into(),
            path: "/v1/registry/persons/RF-1".into(),
            subjects: vec!["RF-1".into()],
            policy_version: "v".into(),
            ..Entry::default()
        };
        log.append(Entry {
            id: "a".into(),
            fields: vec!["names".into(), "visas".into()],
            decision: "allow".into(),
            status: 200,
            ..base.clone()
        })
        .await
        .unwrap();
        log.append(Entry {
            id: "b".into(),
            decision: "deny".into(),
            reason: Some("purpose_not_allowed".into()),
            status: 403,
            ..base.clone()
        })
        .await
        .unwrap();
        log.append(Entry {
            id: "c".into(),
            subjects: vec!["RF-2".into()],
            decision: "allow".into(),
            status: 200,
            ..base
        })
        .await
        .unwrap();
        log.close();
        drop(log);
        writer.finish().await;
        let names = |k: NameKind, id: &str| match (k, id) {
            (NameKind::Agency, "mia-border") => Some("Border Police".to_owned()),
            (NameKind::Purpose, "border-control") => Some("border control".to_owned()),
            _ => None,
        };
        let report = subject_report(&store, "RF-1", &names).await.unwrap();
        assert_eq!(report.accesses.len(), 2, "only RF-1's accesses");
        assert!(report.accesses[0].released);
        assert_eq!(
            report.accesses[1].refused_because.as_deref(),
            Some("purpose_not_allowed")
        );
        let text = report.to_string();
        assert!(text.contains("Border Police (mia-border) read your record for: border control."));
        assert!(text.contains("Released: names, visas"));
        assert!(text.contains("nothing was released (purpose_not_allowed)"));
        let none = subject_report(&store, "RF-9", &names).await.unwrap();
        assert!(none.to_string().contains("No agency has asked"));
    }
}
