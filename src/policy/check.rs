//! Warnings for a policy set that loaded: grants no request can use.
//!
//! These do not stop a policy (an expired grant is harmless), but an
//! administrator reading `policy check` should learn that a grant is dead
//! weight, or that an agency can never be served, before someone asks why.

use time::Date;

use super::load::PolicyError;
use super::model::{Operation, Policy};

/// A warning: same shape and display as an error (`file:line:col: message`).
pub type Warning = PolicyError;

/// The grants of `policy` that no request can use on or after `today`.
pub fn warnings(policy: &Policy, today: Date) -> Vec<Warning> {
    let mut out = Vec::new();
    for agency in policy.agencies() {
        for grant in &agency.grants {
            let at = |message: String| PolicyError {
                file: grant.location.file.clone(),
                line: grant.location.line,
                column: 1,
                message,
            };
            if let Some(until) = grant.valid_until.filter(|u| *u < today) {
                out.push(at(format!(
                    "grant {} expired on {until}: no request can use it any more; remove it",
                    grant.id
                )));
            }
            let collection = policy
                .service(&grant.provider, &grant.service)
                .and_then(|s| s.collection.as_deref());
            if let (true, true, Some(list)) = (
                grant.consent_required,
                grant.operations.contains(&Operation::Read),
                collection,
            ) {
                out.push(at(format!(
                    "grant {} needs consent on {}/{}, which also answers searches with many subjects (list {list:?}): consent is per person, so searches under this grant are always refused; only reads of one person can use it",
                    grant.id, grant.provider, grant.service
                )));
            }
            if grant.operations == [Operation::Read] && grant.fields.is_empty() {
                out.push(at(format!(
                    "grant {} reads but releases no fields: every answer under it is empty",
                    grant.id
                )));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_policy_has_no_dead_grants() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let p = Policy::load(&dir).unwrap();
        let today = time::OffsetDateTime::now_utc().date();
        // molhsa's consent grant reads one person at a time by design; the note on searches is expected.
        let unexpected: Vec<_> = warnings(&p, today)
            .into_iter()
            .filter(|w| {
                !w.message
                    .contains("searches under this grant are always refused")
            })
            .collect();
        assert!(unexpected.is_empty(), "{unexpected:?}");
        assert!(warnings(&p, today).iter().any(|w| w
            .message
            .contains("grant molhsa#1 needs consent on registry/persons")));
    }
}
