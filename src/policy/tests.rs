use std::path::{Path, PathBuf};

use time::macros::date;

use super::*;

const TODAY: time::Date = date!(2026 - 11 - 25);

fn repo_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

fn real() -> Policy {
    match Policy::load(&repo_policies()) {
        Ok(p) => p,
        Err(e) => panic!("the repository's policies must load:\n{e}"),
    }
}

fn req<'a>(
    agency: &'a str,
    service: &'a str,
    operation: Operation,
    purpose: &'a str,
) -> DecisionRequest<'a> {
    DecisionRequest {
        agency,
        provider: "registry",
        service,
        operation,
        purpose,
        case_ref: None,
    }
}

fn allow(d: Decision) -> Allow {
    match d {
        Decision::Allow(a) => a,
        Decision::Deny(r) => panic!("expected allow, got {}", r.code()),
    }
}

/// A policy directory with the repository's vocabulary and providers and the given agency files.
fn temp_policy(agencies: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [PURPOSES_FILE, PROVIDERS_FILE] {
        std::fs::copy(repo_policies().join(f), dir.path().join(f)).unwrap();
    }
    std::fs::create_dir(dir.path().join(AGENCIES_DIR)).unwrap();
    for (name, text) in agencies {
        std::fs::write(dir.path().join(AGENCIES_DIR).join(name), text).unwrap();
    }
    dir
}

fn errors_of(dir: &Path) -> Vec<String> {
    match Policy::load(dir) {
        Ok(_) => panic!("policy should not load"),
        Err(e) => {
            let base = format!("{}/", dir.display());
            e.to_string()
                .lines()
                .map(|l| l.replace(&base, ""))
                .collect()
        }
    }
}

#[test]
fn policy_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Policy>();
    assert_send_sync::<Decision>();
}

#[test]
fn repository_policies_load() {
    let p = real();
    assert_eq!(p.version().len(), 16);
    assert!(p.version().bytes().all(|b| b.is_ascii_hexdigit()));
    let ids: Vec<&str> = p.agencies().map(|a| a.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "geostat",
            "mfa-consular",
            "mia-border",
            "mia-migration",
            "molhsa",
            "psda",
            "ssg"
        ]
    );
    for code in [
        "residence-permit-review",
        "asylum-procedure",
        "expulsion-procedure",
        "border-control",
        "visa-decision",
        "identity-documentation",
        "personal-number-assignment",
        "work-permit-review",
        "national-security-investigation",
        "official-statistics",
    ] {
        assert!(p.purpose(code).is_some(), "{code} missing");
    }
    let registry = p.provider("registry").unwrap();
    assert_eq!(registry.upstream, Upstream::Builtin("registry".into()));
    let persons = p.service("registry", "persons").unwrap();
    assert_eq!(persons.collection.as_deref(), Some("results"));
    assert_eq!(
        p.service("registry", "crossings").unwrap().subject_field,
        "person_id"
    );
}

#[test]
fn geostat_cannot_see_names_or_numbers() {
    let p = real();
    let a = allow(p.decide(
        &req("geostat", "persons", Operation::Read, "official-statistics"),
        TODAY,
    ));
    for secret in [
        "names",
        "names.surname",
        "id",
        "personal_number",
        "documents.number",
        "visas.number",
    ] {
        assert!(!a.fields.covers(secret), "geostat may see {secret}");
    }
    assert!(a.fields.covers("visas.category"));
    assert_eq!(
        p.decide(
            &req("geostat", "persons", Operation::Read, "border-control"),
            TODAY
        )
        .deny_reason(),
        Some(DenyReason::PurposeNotAllowed)
    );
}

#[test]
fn ssg_needs_a_case() {
    let p = real();
    let mut r = req(
        "ssg",
        "persons",
        Operation::Read,
        "national-security-investigation",
    );
    assert_eq!(
        p.decide(&r, TODAY).deny_reason(),
        Some(DenyReason::CaseRequired)
    );
    r.case_ref = Some("  ");
    assert_eq!(
        p.decide(&r, TODAY).deny_reason(),
        Some(DenyReason::CaseRequired)
    );
    r.case_ref = Some("SSG-2026-0042");
    let a = allow(p.decide(&r, TODAY));
    assert_eq!(&*a.grant, "ssg#0");
    assert!(a.legal_basis.contains("State Security Service"));
}

#[test]
fn border_police_writes_crossings_not_visas() {
    let p = real();
    let a = allow(p.decide(
        &req(
            "mia-border",
            "crossings",
            Operation::Write,
            "border-control",
        ),
        TODAY,
    ));
    assert_eq!(&*a.grant, "mia-border#1");
    assert!(!a.consent_required);
    assert_eq!(
        p.decide(
            &req("mia-border", "visas", Operation::Write, "border-control"),
            TODAY
        )
        .deny_reason(),
        Some(DenyReason::NoGrant)
    );
    assert_eq!(
        p.decide(
            &req("mia-border", "persons", Operation::Write, "border-control"),
            TODAY
        )
        .deny_reason(),
        Some(DenyReason::OperationNotAllowed)
    );
    let a = allow(p.decide(
        &req("mfa-consular", "visas", Operation::Write, "visa-decision"),
        TODAY,
    ));
    assert_eq!(&*a.grant, "mfa-consular#1");
}

#[test]
fn molhsa_sees_only_what_the_brief_lists() {
    let p = real();
    let a = allow(p.decide(
        &req("molhsa", "persons", Operation::Read, "work-permit-review"),
        TODAY,
    ));
    assert_eq!(
        a.fields.paths(),
        [
            "birth_date",
            "names",
            "nationalities",
            "residence_permits.type",
            "residence_permits.valid_until",
            "work_permits"
        ]
    );
}

#[test]
fn unknown_names_are_denied_first() {
    let p = real();
    let d = |r: DecisionRequest<'_>| p.decide(&r, TODAY).deny_reason();
    assert_eq!(
        d(req("nobody", "persons", Operation::Read, "border-control")),
        Some(DenyReason::UnknownAgency)
    );
    assert_eq!(
        d(req(
            "mia-border",
            "nothing",
            Operation::Read,
            "border-control"
        )),
        Some(DenyReason::UnknownService)
    );
    assert_eq!(
        d(req("mia-border", "persons", Operation::Read, "curiosity")),
        Some(DenyReason::UnknownPurpose)
    );
    let mut other_provider = req("mia-border", "persons", Operation::Read, "border-control");
    other_provider.provider = "elsewhere";
    assert_eq!(d(other_provider), Some(DenyReason::UnknownService));
    for reason in [
        DenyReason::NoGrant,
        DenyReason::PurposeNotAllowed,
        DenyReason::UnknownService,
    ] {
        assert!(reason
            .code()
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_'));
        assert!(reason.detail().ends_with('.'));
    }
    assert_eq!(DenyReason::PurposeNotAllowed.code(), "purpose_not_allowed");
    assert_eq!(
        DenyReason::UnknownService.status(),
        http::StatusCode::NOT_FOUND
    );
}

#[test]
fn certificates_map_to_agencies() {
    let p = real();
    let sans = vec!["urn:karibche:agency:psda".to_owned()];
    assert_eq!(
        p.agency_for_certificate(&sans, "00").map(|a| a.id.as_str()),
        Some("psda")
    );
    assert!(p
        .agency_for_certificate(&["urn:karibche:agency:nobody".to_owned()], "00")
        .is_none());
    assert!(p.agency_for_certificate(&[], "").is_none());

    let fp = "ab".repeat(32);
    let dir = temp_policy(&[
        (
            "a.toml",
            &format!(
                "id = \"a\"\nname = \"A\"\n[certificate]\nsha256 = [\"{}\"]\n",
                fp.to_uppercase()
            ),
        ),
        (
            "b.toml",
            "id = \"b\"\nname = \"B\"\n[certificate]\nuri_san = \"urn:karibche:agency:b\"\n",
        ),
    ]);
    let p = Policy::load(dir.path()).unwrap();
    assert_eq!(
        p.agency_for_certificate(&[], &fp).map(|a| a.id.as_str()),
        Some("a")
    );
    assert_eq!(
        p.agency_for_certificate(&[], &fp.to_uppercase())
            .map(|a| a.id.as_str()),
        Some("a")
    );
    // A certificate that two agencies' matchers point at is nobody's.
    assert!(p
        .agency_for_certificate(&["urn:karibche:agency:b".to_owned()], &fp)
        .is_none());
}

#[test]
fn operation_from_method() {
    assert_eq!(
        Operation::from_method(&http::Method::GET),
        Some(Operation::Read)
    );
    assert_eq!(
        Operation::from_method(&http::Method::HEAD),
        Some(Operation::Read)
    );
    for m in [
        http::Method::POST,
        http::Method::PUT,
        http::Method::PATCH,
        http::Method::DELETE,
    ] {
        assert_eq!(Operation::from_method(&m), Some(Operation::Write));
    }
    assert_eq!(Operation::from_method(&http::Method::OPTIONS), None);
    assert_eq!(Operation::Write.as_str(), "write");
}

const GOOD_GRANT: &str = r#"
[[grants]]
provider = "registry"
service = "persons"
operations = ["read"]
purposes = ["border-control"]
fields = ["names"]
"#;

#[test]
fn every_problem_is_reported_with_its_position() {
    let psda = r#"id = "psda"
name = "PSDA"

[certificate]
uri_san = "urn:karibche:agency:psda"

[[grants]]
provider = "registry"
service = "persons"
operations = ["read", "write"]
purposes = ["identity-documentation", "residence-review"]
fields = ["names.surname", "Names", "visas", "visas.number", "names.surname", "birth_place.colour"]
valid_from = 2026-12-01
valid_until = "2026-01-01"

[[grants]]
provider = "regsitry"
service = "persons"
operations = ["read"]
purposes = ["identity-documentation"]
fields = []

[[grants]]
provider = "registry"
service = "people"
operations = ["read"]
purposes = []
fields = []

[[grants]]
provider = "registry"
service = "statistics"
operations = ["write"]
purposes = ["official-statistics"]
fields = ["count"]
"#;
    let copied = "id = \"geostat\"\nname = \"Copy\"\n[certificate]\nuri_san = \"urn:karibche:agency:psda\"\n";
    let shared = "id = \"other\"\nname = \"Other\"\n[certificate]\nuri_san = \"urn:x:shared\"\n";
    let shared2 =
        "id = \"other2\"\nname = \"Other 2\"\n[certificate]\nuri_san = \"urn:x:shared\"\n";
    let misnamed = "id = \"wrong\"\nname = \"W\"\n[certificate]\n";
    let typo = format!("id = \"typo\"\nname = \"T\"\n[certificate]\nuri_san = \"urn:karibche:agency:typo\"\n{GOOD_GRANT}purpose = \"x\"\n");
    let dir = temp_policy(&[
        ("psda.toml", psda),
        ("geostat.toml", copied),
        ("other.toml", shared),
        ("other2.toml", shared2),
        ("misnamed.toml", misnamed),
        ("typo.toml", &typo),
        (".psda.toml.swp", "garbage"),
        ("README.md", "not policy"),
    ]);
    let errors = errors_of(dir.path());
    let expected = [
        "agencies/geostat.toml:4:11: uri_san names agency \"psda\", but this file is agency \"geostat\"",
        "agencies/misnamed.toml:1:6: agency id \"wrong\" does not match the file name \"misnamed\".toml",
        "agencies/misnamed.toml:3:1: certificate needs uri_san or sha256 (at least one matcher)",
        "agencies/other2.toml:4:11: certificate URI SAN \"urn:x:shared\" is already agency \"other\"'s",
        "agencies/psda.toml:11:39: unknown purpose \"residence-review\" (known: asylum-procedure, border-control,",
        "agencies/psda.toml:12:28: malformed field path \"Names\"",
        "agencies/psda.toml:12:46: field path \"visas.number\" overlaps \"visas\"",
        "agencies/psda.toml:12:62: duplicate field path \"names.surname\"",
        "agencies/psda.toml:12:79: unknown field \"birth_place.colour\" for registry/persons (known: ",
        "agencies/psda.toml:14:15: valid_until 2026-01-01 is before valid_from 2026-12-01",
        "agencies/psda.toml:17:12: unknown provider \"regsitry\" (known: registry)",
        "agencies/psda.toml:25:11: unknown service \"people\" of provider \"registry\" (known: persons, crossings, visas, documents, residence-permits, work-permits, asylum-cases, entry-bans, statistics)",
        "agencies/psda.toml:27:12: a grant needs at least one purpose",
        "agencies/psda.toml:33:15: operation \"write\" is not supported by registry/statistics (supports: read)",
        "agencies/typo.toml:12:1: unknown field `purpose`",
    ];
    assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    for (got, want) in errors.iter().zip(expected) {
        assert!(got.starts_with(want), "\n got: {got}\nwant: {want}");
    }
}

#[test]
fn broken_shared_files_are_reported_without_cascades() {
    let dir = temp_policy(&[(
        "a.toml",
        &format!("id = \"a\"\nname = \"A\"\n[certificate]\nuri_san = \"u:a\"\n{GOOD_GRANT}"),
    )]);
    std::fs::write(
        dir.path().join(PURPOSES_FILE),
        "[[purposes]]\ncode = \"Border Control\"\ntitle = \"\"\n",
    )
    .unwrap();
    std::fs::remove_file(dir.path().join(PROVIDERS_FILE)).unwrap();
    let errors = errors_of(dir.path());
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors[0].starts_with("providers.toml: cannot read"),
        "{errors:#?}"
    );
    assert!(
        errors[1].starts_with("purposes.toml:1:1: missing field `legal_basis`"),
        "{errors:#?}"
    );
}

#[test]
fn grant_validity_dates() {
    let agency = |extra: &str| {
        format!("id = \"a\"\nname = \"A\"\n[certificate]\nuri_san = \"urn:karibche:agency:a\"\n{GOOD_GRANT}{extra}")
    };
    let dir = temp_policy(&[(
        "a.toml",
        &agency("valid_from = 2026-01-01\nvalid_until = \"2026-06-30\"\n"),
    )]);
    let p = Policy::load(dir.path()).unwrap();
    let r = req("a", "persons", Operation::Read, "border-control");
    assert!(matches!(
        p.decide(&r, date!(2026 - 06 - 30)),
        Decision::Allow(_)
    ));
    assert!(matches!(
        p.decide(&r, date!(2026 - 01 - 01)),
        Decision::Allow(_)
    ));
    assert_eq!(
        p.decide(&r, date!(2026 - 07 - 01)).deny_reason(),
        Some(DenyReason::GrantNotValidToday)
    );
    assert_eq!(
        p.decide(&r, date!(2025 - 12 - 31)).deny_reason(),
        Some(DenyReason::GrantNotValidToday)
    );
    assert!(p
        .explain(&r, date!(2026 - 07 - 01))
        .contains("not in force on 2026-07-01"));

    let dir = temp_policy(&[("a.toml", &agency("valid_until = \"2026-02-30\"\n"))]);
    let errors = errors_of(dir.path());
    assert_eq!(
        errors,
        ["agencies/a.toml:12:15: valid_until must be a date YYYY-MM-DD"]
    );
    let dir = temp_policy(&[("a.toml", &agency("valid_until = 2026-02-30\n"))]);
    let errors = errors_of(dir.path());
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].starts_with("agencies/a.toml:12:"), "{errors:#?}");
}

#[test]
fn overlapping_grants_are_refused_unless_disjoint_in_time() {
    let head = "id = \"a\"\nname = \"A\"\n[certificate]\nuri_san = \"urn:karibche:agency:a\"\n";
    let dir = temp_policy(&[("a.toml", &format!("{head}{GOOD_GRANT}{GOOD_GRANT}"))]);
    let errors = errors_of(dir.path());
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].contains("grant #1 overlaps grant #0"),
        "{errors:#?}"
    );

    let old = format!("{GOOD_GRANT}valid_until = 2025-12-31\n");
    let new = format!("{GOOD_GRANT}valid_from = 2026-01-01\ncase_required = true\n");
    let dir = temp_policy(&[("a.toml", &format!("{head}{old}{new}"))]);
    let p = Policy::load(dir.path()).unwrap();
    let mut r = req("a", "persons", Operation::Read, "border-control");
    // The expired grant would not help; the current one needs a case: say so.
    assert_eq!(
        p.decide(&r, TODAY).deny_reason(),
        Some(DenyReason::CaseRequired)
    );
    r.case_ref = Some("C-1");
    assert_eq!(&*allow(p.decide(&r, TODAY)).grant, "a#1");
    assert_eq!(&*allow(p.decide(&r, date!(2025 - 06 - 01))).grant, "a#0");
}

#[test]
fn consent_flag_and_legal_basis_reach_the_decision() {
    let text = format!(
        "id = \"a\"\nname = \"A\"\n[certificate]\nuri_san = \"urn:karibche:agency:a\"\n{GOOD_GRANT}consent = \"required\"\n"
    );
    let dir = temp_policy(&[("a.toml", &text)]);
    let p = Policy::load(dir.path()).unwrap();
    let a = allow(p.decide(
        &req("a", "persons", Operation::Read, "border-control"),
        TODAY,
    ));
    assert!(a.consent_required);
    assert_eq!(
        &*a.legal_basis,
        p.purpose("border-control").unwrap().legal_basis
    );
    assert_eq!(a.fields.paths(), ["names"]);
}

#[test]
fn version_covers_every_policy_file() {
    let head = "id = \"a\"\nname = \"A\"\n[certificate]\nuri_san = \"urn:karibche:agency:a\"\n";
    let dir = temp_policy(&[("a.toml", head)]);
    let v1 = Policy::load(dir.path()).unwrap().version().to_owned();
    std::fs::write(dir.path().join(AGENCIES_DIR).join("notes.txt"), "ignored").unwrap();
    assert_eq!(Policy::load(dir.path()).unwrap().version(), v1);
    std::fs::write(
        dir.path().join(AGENCIES_DIR).join("a.toml"),
        format!("{head}# edited\n"),
    )
    .unwrap();
    assert_ne!(Policy::load(dir.path()).unwrap().version(), v1);
}

#[test]
fn explain_accounts_for_every_grant() {
    let p = real();
    let text = p.explain(
        &req("mia-border", "visas", Operation::Write, "border-control"),
        TODAY,
    );
    assert!(
        text.contains("mia-border#0 registry/persons [read] for [border-control]: other service"),
        "{text}"
    );
    assert!(
        text.contains("mia-border#1 registry/crossings [write]"),
        "{text}"
    );
    assert!(text.contains("decision: DENY no_grant"), "{text}");
    let text = p.explain(
        &req(
            "ssg",
            "persons",
            Operation::Read,
            "national-security-investigation",
        ),
        TODAY,
    );
    assert!(text.contains("needs a case reference"), "{text}");
    let text = p.explain(
        &req("geostat", "persons", Operation::Read, "official-statistics"),
        TODAY,
    );
    assert!(text.contains("decision: ALLOW by geostat#0"), "{text}");
}

#[test]
fn schema_mentions_every_key() {
    let s = schema();
    for key in [
        "uri_san",
        "sha256",
        "case_required",
        "consent",
        "valid_until",
        "subject_field",
        "collection",
        "legal_basis",
    ] {
        assert!(s.contains(key), "{key}");
    }
}

#[test]
fn typos_in_values_are_parse_errors_with_positions() {
    let head = "id = \"a\"\nname = \"A\"\n[certificate]\nuri_san = \"urn:karibche:agency:a\"\n";
    let cases = [
        (
            GOOD_GRANT.replace("[\"read\"]", "[\"reed\"]"),
            "agencies/a.toml:9:",
        ),
        (
            format!("{GOOD_GRANT}consent = \"yes\"\n"),
            "agencies/a.toml:12:",
        ),
        (
            format!("{GOOD_GRANT}case_required = \"true\"\n"),
            "agencies/a.toml:12:",
        ),
        (
            format!("{GOOD_GRANT}valid_until = 2026-02-30\n"),
            "agencies/a.toml:12:",
        ),
    ];
    for (grant, at) in cases {
        let dir = temp_policy(&[("a.toml", &format!("{head}{grant}"))]);
        let errors = errors_of(dir.path());
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(errors[0].starts_with(at), "{errors:#?}");
    }
}
