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
            "dga",
            "geostat",
            "mfa-consular",
            "mia-border",
            "mia-migration",
            "molhsa",
            "pdps",
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
        "personal_number",
        "documents.number",
        "visas.number",
    ] {
        assert!(!a.fields.covers(secret), "geostat may see {secret}");
    }
    assert!(a.fields.covers("visas.category"));
    // The register id only as a pseudonym, the birth date only as a year.
    let transforms: Vec<_> = a.transforms.pairs().collect();
    assert!(transforms.contains(&("id".to_owned(), crate::policy::Transform::Pseudonymise)));
    assert!(transforms.contains(&("birth_date".to_owned(), crate::policy::Transform::YearOnly)));
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
    // Placeholders and strangers to the agency's case-number format are not cases.
    for placeholder in [
        "-",
        "null",
        "\u{200B}",
        "\0",
        "SSG-2026-0042\u{200B}",
        "2026-42",
    ] {
        r.case_ref = Some(placeholder);
        assert_eq!(
            p.decide(&r, TODAY).deny_reason(),
            Some(DenyReason::CaseInvalid),
            "{placeholder:?}"
        );
    }
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
        ["birth_date", "names", "nationalities", "work_permits"]
    );
    // The residence status is read only with the person's consent, under social assistance.
    assert!(!a.fields.overlaps("residence_permits"));
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

fn peer(uri: &[&str], sha256: &str) -> crate::identity::PeerCert {
    crate::identity::PeerCert {
        sha256: sha256.to_owned(),
        uri_sans: uri.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

#[test]
fn certificates_map_to_agencies() {
    let p = real();
    assert_eq!(
        p.agency_for_certificate(&peer(&["urn:karibche:agency:psda"], "00"))
            .map(|a| a.id.as_str()),
        Some("psda")
    );
    assert!(p
        .agency_for_certificate(&peer(&["urn:karibche:agency:nobody"], "00"))
        .is_none());
    assert!(p.agency_for_certificate(&peer(&[], "")).is_none());

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
        p.agency_for_certificate(&peer(&[], &fp))
            .map(|a| a.id.as_str()),
        Some("a")
    );
    assert_eq!(
        p.agency_for_certificate(&peer(&[], &fp.to_uppercase()))
            .map(|a| a.id.as_str()),
        Some("a")
    );
    // A certificate that two agencies' matchers point at is nobody's.
    assert!(p
        .agency_for_certificate(&peer(&["urn:karibche:agency:b"], &fp))
        .is_none());
}

#[test]
fn rotation_dns_and_subject_matchers() {
    let old_fp = "01".repeat(32);
    let new_fp = "02".repeat(32);
    let a = format!(
        "id = \"a\"\nname = \"A\"\nrequire_bound_tokens = true\n[certificate]\n\
         uri_san = [\"urn:karibche:agency:a\", \"urn:ministry:a:2027\"]\n\
         dns_san = \"A.Gov.ge\"\nsha256 = [\"{old_fp}\", \"{new_fp}\"]\n"
    );
    let b =
        "id = \"b\"\nname = \"B\"\n[certificate]\nsubject = \"CN=b, O=Government of Georgia\"\n";
    let dir = temp_policy(&[("a.toml", &a), ("b.toml", b)]);
    let p = Policy::load(dir.path()).unwrap();
    let id = |c: &crate::identity::PeerCert| p.agency_for_certificate(c).map(|a| a.id.clone());
    assert_eq!(id(&peer(&[], &old_fp)).as_deref(), Some("a"));
    assert_eq!(id(&peer(&[], &new_fp)).as_deref(), Some("a"));
    assert_eq!(
        id(&peer(&["urn:ministry:a:2027"], "00")).as_deref(),
        Some("a")
    );
    let mut dns = peer(&[], "00");
    dns.dns_sans = vec!["a.gov.GE".into()];
    assert_eq!(id(&dns).as_deref(), Some("a"));
    let mut subject = peer(&[], "00");
    subject.subject = "CN=b, O=Government of Georgia".into();
    assert_eq!(id(&subject).as_deref(), Some("b"));
    subject.subject = "CN=b,O=Government of Georgia".into();
    assert_eq!(id(&subject), None, "subjects match exactly");
    // Facts pointing at two agencies: nobody's.
    let mut both = peer(&[], &old_fp);
    both.subject = "CN=b, O=Government of Georgia".into();
    assert_eq!(id(&both), None);
    assert!(p.agency("a").unwrap().require_bound_tokens);
    assert!(!p.agency("b").unwrap().require_bound_tokens);
    assert_eq!(p.agency("a").unwrap().certificate.sha256.len(), 2);
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
        "agencies/misnamed.toml:3:1: certificate needs uri_san, dns_san, subject or sha256 (at least one matcher)",
        "agencies/other2.toml:4:11: certificate URI SAN \"urn:x:shared\" is already agency \"other\"'s",
        "agencies/psda.toml:11:39: unknown purpose \"residence-review\" (known: asylum-procedure, border-control,",
        "agencies/psda.toml:12:28: malformed field path \"Names\"",
        "agencies/psda.toml:12:46: field path \"visas.number\" overlaps \"visas\"",
        "agencies/psda.toml:12:62: duplicate field path \"names.surname\"",
        "agencies/psda.toml:12:79: unknown field \"birth_place.colour\" for registry/persons (known: ",
        "agencies/psda.toml:14:15: valid_until 2026-01-01 is before valid_from 2026-12-01",
        "agencies/psda.toml:17:12: unknown provider \"regsitry\" (known: admin, audit, gateway, registry)",
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
fn certificate_shadow_and_key_mistakes_are_reported_with_their_position() {
    let head = |id: &str| format!("id = \"{id}\"\nname = \"N\"\n");
    let typo = format!(
        "{}[certificate]\nuri_san = \"urn:karibche:agency:typo\"\n{}",
        head("typo"),
        GOOD_GRANT.replace("fields =", "feilds =")
    );
    let dns1 = format!(
        "{}[certificate]\ndns_san = \"gw.psda.gov.ge\"\n",
        head("dns1")
    );
    let dns2 = format!(
        "{}[certificate]\ndns_san = [\"GW.psda.gov.ge\"]\n",
        head("dns2")
    );
    let badcert = format!(
        "{}[certificate]\nuri_san = 42\nsubject = \"psda\"\nsha256 = \"xyz\"\n",
        head("badcert")
    );
    let shadow = format!(
        "{}[certificate]\nuri_san = \"urn:karibche:agency:shadow\"\n{GOOD_GRANT}{GOOD_GRANT}shadow = true\n{GOOD_GRANT}shadow = true\n",
        head("shadow")
    );
    let dup = format!("{}[certificate]\nuri_san = \"urn:x:dup\"\n", head("dup"));
    let dup2 = format!("{}[certificate]\nuri_san = \"urn:x:dup2\"\n", head("dup"));
    let dir = temp_policy(&[
        ("typo.toml", &typo),
        ("dns1.toml", &dns1),
        ("dns2.toml", &dns2),
        ("badcert.toml", &badcert),
        ("shadow.toml", &shadow),
        ("dup.toml", &dup),
        ("dup2.toml", &dup2),
    ]);
    let errors = errors_of(dir.path());
    let expected = [
        "agencies/badcert.toml:4:11: uri_san must be a string or a non-empty list of strings",
        "agencies/badcert.toml:5:11: subject \"psda\" must be a distinguished name",
        "agencies/badcert.toml:6:10: sha256 must be 64 hex digits",
        "agencies/dns2.toml:4:11: certificate DNS SAN \"gw.psda.gov.ge\" is already agency \"dns1\"'s",
        "agencies/dup2.toml:1:6: agency id \"dup\" does not match the file name \"dup2\".toml",
        "agencies/dup2.toml:1:6: duplicate agency id \"dup\": ",
        "agencies/shadow.toml:25:12: shadow grant #2 overlaps grant #1 (registry/persons, read, border-control)",
        "agencies/typo.toml:11:1: unknown field `feilds`, expected one of",
    ];
    assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    for (got, want) in errors.iter().zip(expected) {
        assert!(got.starts_with(want), "\n got: {got}\nwant: {want}");
    }
}

#[test]
fn shadow_grants_are_decided_apart_and_never_enforced() {
    let head = "id = \"a\"\nname = \"A\"\n[certificate]\nuri_san = \"urn:karibche:agency:a\"\n";
    // Enforced: names for border control. Proposed: names and visas, and a new purpose.
    let proposed = r#"
[[grants]]
provider = "registry"
service = "persons"
operations = ["read"]
purposes = ["border-control", "visa-decision"]
fields = ["names", "visas"]
shadow = true
"#;
    let dir = temp_policy(&[("a.toml", &format!("{head}{GOOD_GRANT}{proposed}"))]);
    let p = Policy::load(dir.path()).unwrap();
    let border = req("a", "persons", Operation::Read, "border-control");
    let visa = req("a", "persons", Operation::Read, "visa-decision");
    assert_eq!(allow(p.decide(&border, TODAY)).fields.paths(), ["names"]);
    assert_eq!(
        p.decide(&visa, TODAY).deny_reason(),
        Some(DenyReason::PurposeNotAllowed)
    );
    let shadow = allow(p.decide_shadow(&border, TODAY).unwrap());
    assert_eq!(&*shadow.grant, "a#1");
    assert_eq!(shadow.fields.paths(), ["names", "visas"]);
    assert!(matches!(
        p.decide_shadow(&visa, TODAY),
        Some(Decision::Allow(_))
    ));
    // No shadow grant for a service: no shadow decision.
    assert!(p
        .decide_shadow(
            &req("a", "crossings", Operation::Write, "border-control"),
            TODAY
        )
        .is_none());
    assert!(p
        .explain(&visa, TODAY)
        .contains("shadow decision (not enforced): ALLOW by a#1"));
}

#[test]
fn a_whole_file_can_be_a_proposal() {
    // An agency being onboarded: its file is decided and recorded, never enforced.
    let head = "id = \"a\"\nname = \"A\"\nshadow = true\n[certificate]\nuri_san = \"urn:karibche:agency:a\"\n";
    let dir = temp_policy(&[("a.toml", &format!("{head}{GOOD_GRANT}"))]);
    let p = Policy::load(dir.path()).unwrap();
    let border = req("a", "persons", Operation::Read, "border-control");
    assert!(
        p.decide(&border, TODAY).deny_reason().is_some(),
        "nothing enforced"
    );
    assert!(matches!(
        p.decide_shadow(&border, TODAY),
        Some(Decision::Allow(_))
    ));
}

#[test]
fn a_body_limit_belongs_on_write_grants() {
    let head = "id = \"a\"\nname = \"A\"\n[certificate]\nuri_san = \"urn:karibche:agency:a\"\n";
    let dir = temp_policy(&[(
        "a.toml",
        &format!("{head}{GOOD_GRANT}max_body_bytes = 1024\n"),
    )]);
    let errors = Policy::load(dir.path()).unwrap_err().to_string();
    assert!(
        errors.contains("agencies/a.toml:12:18: max_body_bytes applies to writes"),
        "{errors}"
    );
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
    // Accepted on a service that also answers searches: the gateway refuses
    // those at run time, since consent is per subject.
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
        text.contains("mia-border#0 registry/persons [read] for [border-control] at "),
        "{text}"
    );
    assert!(
        text.contains("agencies/mia-border.toml:12: other service"),
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

#[test]
fn committed_schema_is_current() {
    let committed = std::fs::read_to_string(repo_policies().join("schema.json")).unwrap();
    assert!(
        committed == schema(),
        "policies/schema.json is stale: run `karibche policy schema > policies/schema.json`"
    );
    let v: serde_json::Value = serde_json::from_str(&committed).unwrap();
    assert_eq!(v["$schema"], "https://json-schema.org/draft/2020-12/schema");
    for key in ["require_bound_tokens", "certificate", "grants"] {
        assert!(v["properties"].get(key).is_some(), "{key}");
    }
    for key in [
        "provider",
        "fields",
        "consent",
        "case_required",
        "valid_until",
        "shadow",
        "restricted",
    ] {
        assert!(
            v["$defs"]["grant"]["properties"].get(key).is_some(),
            "{key}"
        );
    }
    for key in ["uri_san", "dns_san", "subject", "sha256"] {
        assert!(
            v["$defs"]["certificate"]["properties"].get(key).is_some(),
            "{key}"
        );
    }
    for def in ["providers_file", "purposes_file", "cases_file"] {
        assert!(v["$defs"].get(def).is_some(), "{def}");
    }
}

#[test]
fn the_shipped_policy_tests_pass() {
    let report = run_cases(&real(), &repo_policies(), TODAY).unwrap();
    assert!(report.failures.is_empty(), "{:#?}", report.failures);
    assert!(report.passed >= 20, "{}", report.passed);
}

/// Copies the repository's policies (and their tests) into a temporary directory.
fn copy_policies() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["", AGENCIES_DIR, CASES_DIR] {
        let from = repo_policies().join(sub);
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        for e in std::fs::read_dir(&from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), dir.path().join(sub).join(e.file_name())).unwrap();
            }
        }
    }
    dir
}

#[test]
fn policy_tests_fail_when_a_change_breaks_an_expected_decision() {
    let dir = copy_policies();
    let file = dir.path().join(AGENCIES_DIR).join("molhsa.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    // A well-meant edit: the labour ministry "also needs" the documents.
    std::fs::write(
        &file,
        text.replace("\"work_permits\",", "\"work_permits\", \"documents\","),
    )
    .unwrap();
    let ssg = dir.path().join(AGENCIES_DIR).join("ssg.toml");
    let text = std::fs::read_to_string(&ssg).unwrap();
    std::fs::write(&ssg, text.replace("case_required = true\n", "")).unwrap();
    let p = Policy::load(dir.path()).unwrap();
    let report = run_cases(&p, dir.path(), TODAY).unwrap();
    let failures: Vec<String> = report.failures.iter().map(ToString::to_string).collect();
    // Without case_required, the two placeholder cases fail as well.
    assert_eq!(failures.len(), 4, "{failures:#?}");
    assert!(failures[0].contains("access.toml:") && failures[0].contains("FAIL Labour ministry reviews a work permit: fields differ: released but not expected [documents]"), "{failures:#?}");
    assert!(
        failures[1].contains("denials.toml:")
            && failures[1].contains("expected deny (case_required), got allow by ssg#0"),
        "{failures:#?}"
    );
    assert!(!report.ok());

    // A malformed case file is an error with its position, not a silent pass.
    std::fs::write(
        dir.path().join(CASES_DIR).join("bad.toml"),
        "[[cases]]\nname = \"x\"\nagency = \"a\"\npurpose = \"p\"\npath = \"/v1/a/b\"\nexpect = \"maybe\"\n",
    )
    .unwrap();
    let errors = run_cases(&p, dir.path(), TODAY).unwrap_err().to_string();
    assert!(
        errors.contains("bad.toml:6:10: unknown variant `maybe`"),
        "{errors}"
    );
}

#[test]
fn diff_says_what_each_agency_gains_and_loses() {
    let dir = copy_policies();
    let agencies = dir.path().join(AGENCIES_DIR);
    let edit = |name: &str, from: &str, to: &str| {
        let file = agencies.join(name);
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains(from), "{name}: {from}");
        std::fs::write(&file, text.replace(from, to)).unwrap();
    };
    edit(
        "molhsa.toml",
        "\"work_permits\",",
        "\"work_permits\", \"documents\",",
    );
    edit(
        "geostat.toml",
        "\"crossings.point\", \"crossings.direction\",",
        "",
    );
    edit("ssg.toml", "case_required = true\n", "");
    edit(
        "mia-border.toml",
        "purposes = [\"border-control\"]\nfields = [\"id\", \"person_id\"",
        "purposes = [\"border-control\", \"expulsion-procedure\"]\nfields = [\"id\", \"person_id\"",
    );
    std::fs::remove_file(agencies.join("psda.toml")).unwrap();
    let old = real();
    let new = Policy::load(dir.path()).unwrap();
    let text = diff(&old, &new);
    for want in [
        "molhsa (Ministry of Labour, Health and Social Affairs of Georgia)\n  + when they read registry/persons for \"work-permit-review\", now also sees: documents",
        "geostat (National Statistics Office of Georgia)\n  - when they read registry/persons for \"official-statistics\", no longer sees: crossings.direction, crossings.point",
        "  + to read registry/persons for \"national-security-investigation\", a case reference is no longer required",
        "  + may now write registry/crossings for \"expulsion-procedure\" and see: at, document_number, id, person_id, point, direction",
        "psda (Public Service Development Agency, Ministry of Justice of Georgia): agency removed, loses all access\n",
        "  - may no longer read registry/persons for \"identity-documentation\"",
    ] {
        assert!(text.contains(want.split(" and see:").next().unwrap()), "missing {want:?} in\n{text}");
    }
    assert!(!text.contains("mfa-consular"), "{text}");
    assert_eq!(diff(&old, &real()), "");
}

#[test]
fn warnings_name_grants_no_one_can_use() {
    let head = "id = \"a\"\nname = \"A\"\n[certificate]\nuri_san = \"urn:karibche:agency:a\"\n";
    let dead = format!("{GOOD_GRANT}valid_until = 2025-12-31\n");
    let empty = GOOD_GRANT
        .replace("fields = [\"names\"]", "fields = []")
        .replace("border-control", "visa-decision");
    let dir = temp_policy(&[("a.toml", &format!("{head}{dead}{empty}"))]);
    let p = Policy::load(dir.path()).unwrap();
    let base = format!("{}/", dir.path().display());
    let w: Vec<String> = warnings(&p, TODAY)
        .iter()
        .map(|w| w.to_string().replace(&base, ""))
        .collect();
    assert_eq!(
        w,
        [
            "agencies/a.toml:6:1: grant a#0 expired on 2025-12-31: no request can use it any more; remove it",
            "agencies/a.toml:14:1: grant a#1 reads but releases no fields: every answer under it is empty",
        ]
    );
}

#[test]
fn gateway_paths_split_into_provider_and_service() {
    assert_eq!(
        split_gateway_path("/v1/registry/persons/1?x=y"),
        Some(("registry", "persons"))
    );
    assert_eq!(
        split_gateway_path("/v1/registry/persons?document=1"),
        Some(("registry", "persons"))
    );
    assert_eq!(split_gateway_path("/v1/registry"), None);
    assert_eq!(split_gateway_path("/v2/a/b"), None);
}
