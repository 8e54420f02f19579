//! Warnings for a policy set that loaded: grants no request can use, and
//! protections one grant gives that another grant of the same agency undoes.
//!
//! These do not stop a policy (an expired grant is harmless), but an
//! administrator reading `policy check` should learn that a grant is dead
//! weight, or that an agency can never be served, before someone asks why.
//!
//! **Purpose shopping.** A grant that needs the data subject's consent (or a
//! case reference) protects the fields it releases only if the agency cannot
//! read the same fields of the same service under another of its grants that
//! needs none: an officer would simply state that grant's purpose. Each such
//! overlap is a warning naming the fields, unless the grant that releases them
//! acknowledges exactly those fields with a reason (`[[grants.acknowledge]]`,
//! `check = "consent-bypass"` or `"case-bypass"`). An acknowledgement that
//! no longer matches anything is a warning too, so none outlives its reason.

use time::Date;

use super::model::{Agency, Check, Grant, Operation, Policy};
use super::source::PolicyError;
use crate::policy::FieldSet;

/// A warning: same shape and display as an error (`file:line:col: message`).
pub type Warning = PolicyError;

/// The grants of `policy` that no request can use on or after `today`, and
/// the protections that another grant of the same agency undoes.
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
                let acknowledged = grant
                    .acknowledged
                    .iter()
                    .any(|a| a.check == Check::ConsentSearch);
                if !acknowledged {
                    out.push(at(format!(
                        "grant {} needs consent on {}/{}, which also answers searches with many subjects (list {list:?}): consent is per person, so searches under this grant are always refused; only reads of one person can use it (acknowledge with check = \"consent-search\" if that is intended)",
                        grant.id, grant.provider, grant.service
                    )));
                }
            } else if let Some(a) = grant
                .acknowledged
                .iter()
                .find(|a| a.check == Check::ConsentSearch)
            {
                out.push(stale(grant, a.line, Check::ConsentSearch));
            }
            if grant.operations == [Operation::Read] && grant.fields.is_empty() {
                out.push(at(format!(
                    "grant {} reads but releases no fields: every answer under it is empty",
                    grant.id
                )));
            }
        }
        bypasses(agency, &mut out);
    }
    out
}

/// The consent and case bypasses within one agency's grants, and stale acknowledgements of them.
fn bypasses(agency: &Agency, out: &mut Vec<Warning>) {
    let reads = |g: &&Grant| !g.shadow && g.operations.contains(&Operation::Read);
    for open in agency.grants.iter().filter(reads) {
        for check in [Check::ConsentBypass, Check::CaseBypass] {
            let protects = |g: &Grant| match check {
                Check::ConsentBypass => g.consent_required,
                _ => g.case_required,
            };
            let ack = open.acknowledged.iter().find(|a| a.check == check);
            let accepted = FieldSet::from_paths(ack.map_or(&[][..], |a| a.fields.as_slice()));
            let mut matched = false;
            if !protects(open) {
                for guarded in agency.grants.iter().filter(reads) {
                    if !protects(guarded)
                        || guarded.provider != open.provider
                        || guarded.service != open.service
                    {
                        continue;
                    }
                    let common = common_fields(&guarded.fields, &open.fields);
                    matched |= common.iter().any(|f| accepted.covers(f));
                    let unaccepted: Vec<&str> = common
                        .iter()
                        .map(String::as_str)
                        .filter(|f| !accepted.covers(f))
                        .collect();
                    if !unaccepted.is_empty() {
                        out.push(bypass(open, guarded, check, &unaccepted));
                    }
                }
            }
            if let (Some(a), false) = (ack, matched) {
                out.push(stale(open, a.line, check));
            }
        }
    }
}

/// The fields released by both sets, at the finer of the two paths (`residence_permits.type`
/// when one grants `residence_permits` and the other `residence_permits.type`).
fn common_fields(a: &FieldSet, b: &FieldSet) -> Vec<String> {
    let mut out: Vec<String> = a
        .paths()
        .into_iter()
        .filter(|p| b.covers(p))
        .chain(b.paths().into_iter().filter(|p| a.covers(p)))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn bypass(open: &Grant, guarded: &Grant, check: Check, fields: &[&str]) -> Warning {
    let purposes = |g: &Grant| {
        g.purposes
            .iter()
            .map(|p| &*p.code)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (needs, without) = match check {
        Check::ConsentBypass => ("the data subject's consent", "without consent"),
        _ => ("a case reference", "without a case reference"),
    };
    PolicyError {
        file: open.location.file.clone(),
        line: open.location.line,
        column: 1,
        message: format!(
            "grant {} releases {} of {}/{} {without} (purposes: {}), while grant {} ({}) releases them only with {needs} (purposes: {}): an officer can state {} to get them {without}; drop them from {}, require {needs} there too, or acknowledge them with [[grants.acknowledge]] check = \"{}\" and a reason",
            open.id,
            fields.join(", "),
            open.provider,
            open.service,
            purposes(open),
            guarded.id,
            guarded.location,
            purposes(guarded),
            purposes(open),
            open.id,
            check.as_str(),
        ),
    }
}

fn stale(grant: &Grant, line: usize, check: Check) -> Warning {
    PolicyError {
        file: grant.location.file.clone(),
        line,
        column: 1,
        message: format!(
            "grant {} acknowledges {} for nothing it releases: the finding is gone, remove the acknowledgement",
            grant.id,
            check.as_str()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> Policy {
        Policy::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap()
    }

    #[test]
    fn shipped_policies_leave_no_warning_unexplained() {
        let today = time::OffsetDateTime::now_utc().date();
        let p = repo();
        let warnings = warnings(&p, today);
        assert!(warnings.is_empty(), "{warnings:?}");
        // …because the labour ministry's overlaps are acknowledged, each with its reason.
        let molhsa = p.agency("molhsa").unwrap();
        let review = &molhsa.grants[0];
        let ack = &review.acknowledged[0];
        assert_eq!(ack.check, Check::ConsentBypass);
        assert_eq!(ack.fields, ["names", "birth_date", "nationalities"]);
        assert!(!review.fields.overlaps("residence_permits"));
        assert!(molhsa.grants[1].acknowledged[0].check == Check::ConsentSearch);
    }

    /// Writes a policy directory from the repository's with one agency file replaced.
    fn with_agency(name: &str, text: &str) -> (tempfile::TempDir, Result<Policy, String>) {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let dir = tempfile::tempdir().unwrap();
        for file in [super::super::PURPOSES_FILE, super::super::PROVIDERS_FILE] {
            std::fs::copy(repo.join(file), dir.path().join(file)).unwrap();
        }
        std::fs::create_dir(dir.path().join("agencies")).unwrap();
        std::fs::write(dir.path().join(format!("agencies/{name}.toml")), text).unwrap();
        let p = Policy::load(dir.path()).map_err(|e| e.to_string());
        (dir, p)
    }

    const HEAD: &str = "id = \"molhsa\"\nname = \"Labour\"\n[certificate]\nuri_san = \"urn:karibche:agency:molhsa\"\n";

    fn grant(purpose: &str, extra: &str, fields: &str) -> String {
        format!(
            "\n[[grants]]\nprovider = \"registry\"\nservice = \"persons\"\noperations = [\"read\"]\npurposes = [\"{purpose}\"]\n{extra}fields = [{fields}]\n"
        )
    }

    fn messages(text: &str) -> Vec<String> {
        let (_dir, p) = with_agency("molhsa", text);
        let today = time::OffsetDateTime::now_utc().date();
        warnings(&p.unwrap(), today)
            .into_iter()
            .map(|w| w.to_string())
            .filter(|m| !m.contains("consent-search"))
            .collect()
    }

    #[test]
    fn a_consent_free_purpose_that_reaches_consent_protected_fields_is_named() {
        let consent = grant(
            "social-assistance",
            "consent = \"required\"\n",
            "\"names\", \"residence_permits.type\", \"residence_permits.status\"",
        );
        let open = grant(
            "work-permit-review",
            "",
            "\"names\", \"work_permits\", \"residence_permits\"",
        );
        let text = format!("{HEAD}{consent}{open}");
        let w = messages(&text);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("molhsa.toml:"), "{w:?}");
        assert!(w[0].contains("grant molhsa#1 releases names, residence_permits.status, residence_permits.type of registry/persons without consent (purposes: work-permit-review), while grant molhsa#0"), "{w:?}");

        // An acknowledgement covers exactly its fields; the rest still warns.
        let ack = "[[grants.acknowledge]]\ncheck = \"consent-bypass\"\nfields = [\"names\"]\nbecause = \"a work permit review identifies the migrant it reviews\"\n";
        let w = messages(&format!("{text}{ack}"));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("releases residence_permits.status, residence_permits.type of"),
            "{w:?}"
        );
        // Fixed: the open grant drops the residence data; the acknowledgement now explains everything.
        let fixed = grant("work-permit-review", "", "\"names\", \"work_permits\"");
        assert!(messages(&format!("{HEAD}{consent}{fixed}{ack}")).is_empty());
        // An acknowledgement left behind after the overlap is gone is itself a warning.
        let none = grant("work-permit-review", "", "\"work_permits\", \"names\"");
        let only_consent = grant(
            "social-assistance",
            "consent = \"required\"\n",
            "\"residence_permits.type\"",
        );
        let w = messages(&format!("{HEAD}{only_consent}{none}{ack}"));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("acknowledges consent-bypass for nothing"),
            "{w:?}"
        );
    }

    #[test]
    fn a_case_free_purpose_that_reaches_case_bound_fields_is_named() {
        let case = grant(
            "national-security-investigation",
            "case_required = true\n",
            "\"names\", \"crossings\"",
        );
        let open = grant("border-control", "", "\"names\", \"crossings.point\"");
        let w = messages(&format!("{HEAD}{case}{open}"));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains(
                "releases crossings.point, names of registry/persons without a case reference"
            ),
            "{w:?}"
        );
        // Another service is another record: no finding.
        let elsewhere = "\n[[grants]]\nprovider = \"registry\"\nservice = \"crossings\"\noperations = [\"read\"]\npurposes = [\"border-control\"]\nfields = [\"point\"]\n";
        assert!(messages(&format!("{HEAD}{case}{elsewhere}")).is_empty());
    }

    #[test]
    fn acknowledgements_are_checked_when_loading() {
        let open = grant("work-permit-review", "", "\"names\"");
        for (ack, error) in [
            ("check = \"consent-bypass\"\nfields = [\"names\"]\nbecause = \"short\"\n", "at least 20 characters"),
            ("check = \"consent-bypass\"\nfields = [\"visas\"]\nbecause = \"a reason that is long enough\"\n", "not released by this grant"),
            ("check = \"consent-bypass\"\nbecause = \"a reason that is long enough\"\n", "names the fields"),
            ("check = \"everything\"\nbecause = \"a reason that is long enough\"\n", "unknown variant"),
        ] {
            let text = format!("{HEAD}{open}[[grants.acknowledge]]\n{ack}");
            let (_dir, p) = with_agency("molhsa", &text);
            let err = p.unwrap_err();
            assert!(err.contains(error) && err.contains("molhsa.toml:"), "{err}");
        }
    }
}
