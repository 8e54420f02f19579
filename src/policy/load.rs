//! Reading and validating the policy files.
//!
//! Administrators edit these files by hand, and a mistake either locks a
//! ministry out or leaks data, so loading is strict: unknown keys are errors
//! (`deny_unknown_fields`), every reference (provider, service, operation,
//! purpose, field) is checked, and *every* problem is reported at once with
//! its file, line and column. A policy set with any problem never becomes a
//! [`Policy`].

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use time::Date;
use toml::Spanned;

use super::model::{
    Acknowledgement, Agency, CertificateMatcher, Check, Grant, GrantLocation, GrantPurpose,
    Operation, Policy, Provider, Purpose, Service, ServiceGrants, Upstream,
};
use super::source::{line_column, whole_file, PolicyError, PolicyErrors, Reporter};
use crate::policy::FieldSet;

/// The purpose vocabulary, relative to the policy directory.
pub const PURPOSES_FILE: &str = "purposes.toml";
/// The providers table, relative to the policy directory.
pub const PROVIDERS_FILE: &str = "providers.toml";
/// The directory of per-agency files, relative to the policy directory.
pub const AGENCIES_DIR: &str = "agencies";

// ---- the file formats, as parsed -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurposesFile {
    #[serde(default)]
    purposes: Vec<RawPurpose>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPurpose {
    code: Spanned<String>,
    title: Spanned<String>,
    legal_basis: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvidersFile {
    #[serde(default)]
    providers: Vec<RawProvider>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    id: Spanned<String>,
    title: Spanned<String>,
    upstream: Spanned<String>,
    #[serde(default)]
    services: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    id: Spanned<String>,
    title: Spanned<String>,
    operations: Spanned<Vec<Spanned<Operation>>>,
    subject_field: Spanned<String>,
    collection: Option<Spanned<String>>,
    fields: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pseudonymous_query: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgencyFile {
    id: Spanned<String>,
    name: Spanned<String>,
    certificate: Spanned<RawCertificate>,
    #[serde(default)]
    require_bound_tokens: bool,
    /// The form of the agency's case references: a regular expression matched
    /// against the whole reference (default: [`super::case_ref::CaseFormat::Default`]).
    case_format: Option<Spanned<String>>,
    /// The whole file is a proposal: every grant in it is a shadow grant
    /// (decided and recorded as `shadow_decision`, never enforced).
    #[serde(default)]
    shadow: bool,
    #[serde(default)]
    grants: Vec<Spanned<RawGrant>>,
}

/// Each matcher is a string or a list of strings, so a rotation can list the old and the new certificate.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    uri_san: Option<Spanned<toml::Value>>,
    dns_san: Option<Spanned<toml::Value>>,
    subject: Option<Spanned<toml::Value>>,
    sha256: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    provider: Spanned<String>,
    service: Spanned<String>,
    operations: Spanned<Vec<Spanned<Operation>>>,
    purposes: Spanned<Vec<Spanned<String>>>,
    fields: Spanned<Vec<Spanned<String>>>,
    consent: Option<Spanned<Consent>>,
    #[serde(default)]
    case_required: bool,
    valid_from: Option<Spanned<toml::Value>>,
    valid_until: Option<Spanned<toml::Value>>,
    #[serde(default)]
    shadow: bool,
    #[serde(default)]
    restricted: bool,
    /// Largest request body a write under this grant may send (bytes); the gateway's limit caps it.
    max_body_bytes: Option<Spanned<i64>>,
    /// Field path → transform applied to the released value.
    #[serde(default)]
    transforms: std::collections::BTreeMap<String, Spanned<crate::policy::Transform>>,
    /// `policy check` warnings reviewed and accepted for this grant.
    #[serde(default)]
    acknowledge: Vec<Spanned<RawAcknowledgement>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAcknowledgement {
    check: Spanned<super::model::Check>,
    #[serde(default)]
    fields: Vec<Spanned<String>>,
    because: Spanned<String>,
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Consent {
    #[default]
    None,
    Required,
}

// ---- loading ----------------------------------------------------------------------------

/// One policy file's text and where it came from.
struct Source {
    /// Relative path with `/` separators: the name hashed into the version.
    rel: String,
    /// The path errors show.
    shown: PathBuf,
    text: String,
}

fn parse<T: for<'de> Deserialize<'de>>(
    source: &Source,
    errors: &mut Vec<PolicyError>,
) -> Option<T> {
    match toml::from_str::<T>(&source.text) {
        Ok(v) => Some(v),
        Err(e) => {
            Reporter::new(&source.shown, &source.text, errors).toml_error(&e);
            None
        }
    }
}

/// Reads the policy directory: the two fixed files and every `agencies/*.toml`.
fn read_sources(dir: &Path, errors: &mut Vec<PolicyError>) -> Vec<Source> {
    let mut sources = Vec::new();
    for rel in [PURPOSES_FILE, PROVIDERS_FILE] {
        let shown = dir.join(rel);
        match std::fs::read_to_string(&shown) {
            Ok(text) => sources.push(Source {
                rel: rel.to_owned(),
                shown,
                text,
            }),
            Err(e) => errors.push(whole_file(&shown, format!("cannot read: {e}"))),
        }
    }
    let agencies = dir.join(AGENCIES_DIR);
    match std::fs::read_dir(&agencies) {
        Ok(entries) => {
            for entry in entries {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(e) => {
                        errors.push(whole_file(&agencies, format!("cannot list: {e}")));
                        continue;
                    }
                };
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    errors.push(whole_file(&entry.path(), "file name is not UTF-8"));
                    continue;
                };
                // Editors leave hidden swap and backup files; only `*.toml` files are policy.
                if name.starts_with('.') || !name.ends_with(".toml") {
                    continue;
                }
                let shown = entry.path();
                match std::fs::read_to_string(&shown) {
                    Ok(text) => sources.push(Source {
                        rel: format!("{AGENCIES_DIR}/{name}"),
                        shown,
                        text,
                    }),
                    Err(e) => errors.push(whole_file(&shown, format!("cannot read: {e}"))),
                }
            }
        }
        Err(e) => errors.push(whole_file(&agencies, format!("cannot list: {e}"))),
    }
    sources.sort_by(|a, b| a.rel.cmp(&b.rel));
    sources
}

/// First 16 hex characters of SHA-256 over every file: relative path, NUL, contents, in path order.
fn version_of(sources: &[Source]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for s in sources {
        ctx.update(s.rel.as_bytes());
        ctx.update(&[0]);
        ctx.update(s.text.as_bytes());
    }
    let mut hex = hex::encode(ctx.finish().as_ref());
    hex.truncate(16);
    hex
}

/// Each file's relative path and the hex SHA-256 of its contents, for reload audit events.
fn file_hashes(sources: &[Source]) -> Vec<(String, String)> {
    sources
        .iter()
        .map(|s| (s.rel.clone(), crate::files::sha256_hex(s.text.as_bytes())))
        .collect()
}

/// Loads, parses and validates the policy directory; reports every problem at once.
pub(crate) fn load(dir: &Path) -> Result<Policy, PolicyErrors> {
    let mut errors = Vec::new();
    let sources = read_sources(dir, &mut errors);
    let version = version_of(&sources);
    let files = file_hashes(&sources);

    let find = |rel: &str| sources.iter().find(|s| s.rel == rel);
    let purposes = find(PURPOSES_FILE).and_then(|src| {
        parse::<PurposesFile>(src, &mut errors).map(|f| validate_purposes(src, f, &mut errors))
    });
    let providers = find(PROVIDERS_FILE).and_then(|src| {
        parse::<ProvidersFile>(src, &mut errors).map(|f| validate_providers(src, f, &mut errors))
    });

    let mut agencies = BTreeMap::new();
    let mut certs = CertificateOwners::default();
    for src in sources.iter().filter(|s| s.rel.starts_with(AGENCIES_DIR)) {
        let Some(file) = parse::<AgencyFile>(src, &mut errors) else {
            continue;
        };
        let refs = match (&purposes, &providers) {
            (Some(p), Some(q)) => Some((p, q)),
            // Without a vocabulary or providers table, reference checks would only repeat that error.
            _ => None,
        };
        let id_span = file.id.span();
        let agency = validate_agency(src, file, refs, &mut certs, &mut errors);
        if let Some(first) = agencies.get(&agency.id) {
            let first: &Agency = first;
            let (line, column) = line_column(&src.text, id_span.start);
            errors.push(PolicyError {
                file: src.shown.clone(),
                line,
                column,
                message: format!(
                    "duplicate agency id {:?}: {} already defines it",
                    agency.id,
                    first.file.display()
                ),
            });
            continue;
        }
        agencies.insert(agency.id.clone(), agency);
    }

    if !errors.is_empty() {
        errors.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        return Err(PolicyErrors(errors));
    }
    let (Some(purposes), Some(providers)) = (purposes, providers) else {
        // Unreachable in practice: a missing file is an error above. Fail closed regardless.
        return Err(PolicyErrors(vec![whole_file(dir, "policy incomplete")]));
    };
    Ok(build(version, files, purposes, providers, agencies, certs))
}

fn build(
    version: String,
    files: Vec<(String, String)>,
    purposes: BTreeMap<String, Purpose>,
    providers: BTreeMap<String, Provider>,
    agencies: BTreeMap<String, Agency>,
    certs: CertificateOwners,
) -> Policy {
    let mut index: HashMap<String, HashMap<String, HashMap<String, ServiceGrants>>> =
        HashMap::new();
    for agency in agencies.values() {
        let by_provider = index.entry(agency.id.clone()).or_default();
        for (i, grant) in agency.grants.iter().enumerate() {
            let entry = by_provider
                .entry(grant.provider.clone())
                .or_default()
                .entry(grant.service.clone())
                .or_default();
            if grant.shadow {
                entry.shadow.push(i);
            } else {
                entry.enforced.push(i);
            }
        }
    }
    let strip =
        |m: HashMap<String, (String, PathBuf)>| m.into_iter().map(|(k, (id, _))| (k, id)).collect();
    Policy {
        version,
        files,
        purposes,
        providers,
        agencies,
        by_uri_san: strip(certs.uri_san),
        by_dns_san: strip(certs.dns_san),
        by_subject: strip(certs.subject),
        by_sha256: strip(certs.sha256),
        index,
    }
}

// ---- validation -------------------------------------------------------------------------

/// Lowercase words joined by single hyphens: purpose codes, agency, provider and service ids.
fn is_kebab(s: &str) -> bool {
    !s.is_empty()
        && s.split('-').all(|w| {
            !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

/// `a.b.c` with lowercase, digit and underscore segments.
fn is_field_path(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|seg| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
}

fn check_text(r: &mut Reporter<'_>, what: &str, value: &Spanned<String>) {
    if value.get_ref().trim().is_empty() {
        r.at(value.span(), format!("{what} must not be empty"));
    }
}

fn validate_purposes(
    src: &Source,
    file: PurposesFile,
    errors: &mut Vec<PolicyError>,
) -> BTreeMap<String, Purpose> {
    let mut r = Reporter::new(&src.shown, &src.text, errors);
    let mut out = BTreeMap::new();
    for p in file.purposes {
        let code = p.code.get_ref();
        if !is_kebab(code) {
            r.at(
                p.code.span(),
                format!(
                    "purpose code {code:?} must be kebab-case (lowercase letters, digits, hyphens)"
                ),
            );
        }
        check_text(&mut r, "title", &p.title);
        check_text(&mut r, "legal_basis", &p.legal_basis);
        if out.contains_key(code) {
            r.at(p.code.span(), format!("duplicate purpose {code:?}"));
            continue;
        }
        out.insert(
            code.clone(),
            Purpose {
                code: code.clone(),
                title: p.title.into_inner(),
                legal_basis: p.legal_basis.into_inner(),
            },
        );
    }
    out
}

fn validate_providers(
    src: &Source,
    file: ProvidersFile,
    errors: &mut Vec<PolicyError>,
) -> BTreeMap<String, Provider> {
    let mut r = Reporter::new(&src.shown, &src.text, errors);
    let mut out = BTreeMap::new();
    for p in file.providers {
        let id = p.id.get_ref().clone();
        if !is_kebab(&id) {
            r.at(
                p.id.span(),
                format!("provider id {id:?} must be kebab-case"),
            );
        }
        check_text(&mut r, "title", &p.title);
        let raw_upstream = p.upstream.get_ref();
        let upstream = if let Some(name) = raw_upstream.strip_prefix("builtin:") {
            if !is_kebab(name) {
                r.at(
                    p.upstream.span(),
                    format!("upstream {raw_upstream:?}: builtin name must be kebab-case"),
                );
            }
            Upstream::Builtin(name.to_owned())
        } else if raw_upstream
            .strip_prefix("https://")
            .is_some_and(|rest| !rest.is_empty())
        {
            Upstream::Url(raw_upstream.clone())
        } else {
            r.at(
                p.upstream.span(),
                format!("upstream {raw_upstream:?} must be \"builtin:<name>\" or an https:// URL"),
            );
            Upstream::Url(raw_upstream.clone())
        };
        let mut services: Vec<Service> = Vec::new();
        for s in p.services {
            let sid = s.id.get_ref().clone();
            if !is_kebab(&sid) {
                r.at(
                    s.id.span(),
                    format!("service id {sid:?} must be kebab-case"),
                );
            }
            if services.iter().any(|x| x.id == sid) {
                r.at(
                    s.id.span(),
                    format!("duplicate service {sid:?} in provider {id:?}"),
                );
                continue;
            }
            check_text(&mut r, "title", &s.title);
            let mut operations = Vec::new();
            for op in s.operations.get_ref() {
                if operations.contains(op.get_ref()) {
                    r.at(
                        op.span(),
                        format!("duplicate operation \"{}\"", op.get_ref()),
                    );
                } else {
                    operations.push(*op.get_ref());
                }
            }
            if operations.is_empty() {
                r.at(
                    s.operations.span(),
                    "a service needs at least one operation",
                );
            }
            if !is_field_path(s.subject_field.get_ref()) || s.subject_field.get_ref().contains('.')
            {
                r.at(
                    s.subject_field.span(),
                    "subject_field must be one field name (lowercase, digits, underscore)",
                );
            }
            if let Some(c) = &s.collection {
                if !is_field_path(c.get_ref()) || c.get_ref().contains('.') {
                    r.at(
                        c.span(),
                        "collection must be one field name (lowercase, digits, underscore)",
                    );
                }
            }
            let fields = s.fields.map(|known| {
                let mut paths = Vec::with_capacity(known.len());
                for f in &known {
                    if !is_field_path(f.get_ref()) {
                        r.at(
                            f.span(),
                            format!("malformed field path {:?} (expected a.b.c)", f.get_ref()),
                        );
                    } else if paths.contains(f.get_ref()) {
                        r.at(f.span(), format!("duplicate field path {:?}", f.get_ref()));
                    } else {
                        paths.push(f.get_ref().clone());
                    }
                }
                FieldSet::from_paths(&paths)
            });
            let mut pseudonymous_query: Vec<String> = Vec::new();
            for q in &s.pseudonymous_query {
                let name = q.get_ref();
                let plain = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if !plain {
                    r.at(
                        q.span(),
                        format!("pseudonymous_query {name:?} must be a plain parameter name (letters, digits, _ and -)"),
                    );
                } else if pseudonymous_query.contains(name) {
                    r.at(q.span(), format!("duplicate pseudonymous_query {name:?}"));
                } else {
                    pseudonymous_query.push(name.clone());
                }
            }
            services.push(Service {
                id: sid,
                title: s.title.into_inner(),
                operations,
                subject_field: s.subject_field.into_inner(),
                collection: s.collection.map(Spanned::into_inner),
                fields,
                pseudonymous_query,
            });
        }
        if out.contains_key(&id) {
            r.at(p.id.span(), format!("duplicate provider {id:?}"));
            continue;
        }
        out.insert(
            id.clone(),
            Provider {
                id,
                title: p.title.into_inner(),
                upstream,
                services,
            },
        );
    }
    out
}

/// Which agency (and file) claimed each certificate matcher, to refuse a matcher shared by two agencies.
#[derive(Default)]
struct CertificateOwners {
    uri_san: HashMap<String, (String, PathBuf)>,
    dns_san: HashMap<String, (String, PathBuf)>,
    subject: HashMap<String, (String, PathBuf)>,
    sha256: HashMap<String, (String, PathBuf)>,
}

fn claim(
    r: &mut Reporter<'_>,
    owners: &mut HashMap<String, (String, PathBuf)>,
    key: String,
    agency: &str,
    span: Range<usize>,
    what: &str,
) {
    match owners.get(&key) {
        Some((other, file)) if other != agency => r.at(
            span,
            format!("{what} {key:?} is already agency {other:?}'s ({}); two agencies cannot share a certificate", file.display()),
        ),
        Some(_) => r.at(span, format!("duplicate {what} {key:?}")),
        None => {
            owners.insert(key, (agency.to_owned(), r.file().to_path_buf()));
        }
    }
}

/// Lowercase hex without separators, if `s` is a SHA-256 fingerprint (hex, optionally colon-separated).
fn normalise_fingerprint(s: &str) -> Option<String> {
    let hex: String = s
        .chars()
        .filter(|&c| c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

/// A date given as a TOML local date (`2026-01-31`) or a string `"2026-01-31"`.
fn parse_date(r: &mut Reporter<'_>, key: &str, value: &Spanned<toml::Value>) -> Option<Date> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let date = match value.get_ref() {
        toml::Value::String(s) => Date::parse(s, fmt).ok(),
        toml::Value::Datetime(dt) if dt.time.is_none() && dt.offset.is_none() => {
            dt.date.and_then(|d| {
                let month = time::Month::try_from(d.month).ok()?;
                Date::from_calendar_date(i32::from(d.year), month, d.day).ok()
            })
        }
        _ => None,
    };
    if date.is_none() {
        r.at(value.span(), format!("{key} must be a date YYYY-MM-DD"));
    }
    date
}

type Refs<'a> = (
    &'a BTreeMap<String, Purpose>,
    &'a BTreeMap<String, Provider>,
);

fn validate_agency(
    src: &Source,
    file: AgencyFile,
    refs: Option<Refs<'_>>,
    certs: &mut CertificateOwners,
    errors: &mut Vec<PolicyError>,
) -> Agency {
    let mut r = Reporter::new(&src.shown, &src.text, errors);
    let id = file.id.get_ref().clone();
    let stem = src
        .rel
        .trim_start_matches(AGENCIES_DIR)
        .trim_start_matches('/')
        .trim_end_matches(".toml");
    if !is_kebab(&id) {
        r.at(
            file.id.span(),
            format!("agency id {id:?} must be kebab-case"),
        );
    }
    if id != stem {
        r.at(
            file.id.span(),
            format!("agency id {id:?} does not match the file name {stem:?}.toml"),
        );
    }
    check_text(&mut r, "name", &file.name);

    let cert_span = file.certificate.span();
    let cert = file.certificate.into_inner();
    let mut certificate = CertificateMatcher::default();
    for (value, span) in strings(&mut r, "uri_san", cert.uri_san.as_ref()) {
        if value.trim().is_empty() {
            r.at(span, "uri_san must not be empty");
        } else if let Some(named) = value
            .strip_prefix("urn:karibche:agency:")
            .filter(|n| *n != id)
        {
            // Catches a file copied from another agency with its certificate left unchanged.
            r.at(
                span,
                format!("uri_san names agency {named:?}, but this file is agency {id:?}"),
            );
        } else {
            claim(
                &mut r,
                &mut certs.uri_san,
                value.clone(),
                &id,
                span,
                "certificate URI SAN",
            );
            certificate.uri_san.push(value);
        }
    }
    for (value, span) in strings(&mut r, "dns_san", cert.dns_san.as_ref()) {
        let value = value.to_ascii_lowercase();
        if value.trim().is_empty() || value.contains(char::is_whitespace) {
            r.at(span, "dns_san must be a DNS name");
        } else {
            claim(
                &mut r,
                &mut certs.dns_san,
                value.clone(),
                &id,
                span,
                "certificate DNS SAN",
            );
            certificate.dns_san.push(value);
        }
    }
    for (value, span) in strings(&mut r, "subject", cert.subject.as_ref()) {
        if !value.contains('=') {
            r.at(
                span,
                format!("subject {value:?} must be a distinguished name like \"CN=psda, O=Government of Georgia\""),
            );
        } else {
            claim(
                &mut r,
                &mut certs.subject,
                value.clone(),
                &id,
                span,
                "certificate subject",
            );
            certificate.subject.push(value);
        }
    }
    for (value, span) in strings(&mut r, "sha256", cert.sha256.as_ref()) {
        match normalise_fingerprint(&value) {
            Some(hex) => {
                claim(
                    &mut r,
                    &mut certs.sha256,
                    hex.clone(),
                    &id,
                    span,
                    "certificate fingerprint",
                );
                certificate.sha256.push(hex);
            }
            None => r.at(span, "sha256 must be 64 hex digits (colons allowed)"),
        }
    }
    if cert.uri_san.is_none()
        && cert.dns_san.is_none()
        && cert.subject.is_none()
        && cert.sha256.is_none()
    {
        r.at(
            cert_span,
            "certificate needs uri_san, dns_san, subject or sha256 (at least one matcher)",
        );
    }

    let mut grants = Vec::with_capacity(file.grants.len());
    // Spans of each grant's purposes list, for pointing overlap errors at the later grant.
    let mut purpose_spans = Vec::with_capacity(file.grants.len());
    for (index, g) in file.grants.into_iter().enumerate() {
        let (line, _) = line_column(&src.text, g.span().start);
        let location = GrantLocation {
            file: src.shown.clone(),
            line,
        };
        let mut g = g.into_inner();
        g.shadow |= file.shadow;
        purpose_spans.push(g.purposes.span());
        grants.push(validate_grant(&mut r, &id, index, g, refs, location));
    }
    // Shadow grants stand in for the enforced grants of their service, so
    // each set must be free of contradictions on its own.
    check_overlaps(&mut r, &grants, &purpose_spans, false);
    check_overlaps(&mut r, &grants, &purpose_spans, true);

    let case_format = match &file.case_format {
        None => super::case_ref::CaseFormat::Default,
        Some(pattern) => {
            super::case_ref::CaseFormat::pattern(pattern.get_ref()).unwrap_or_else(|e| {
                r.at(pattern.span(), e);
                super::case_ref::CaseFormat::Default
            })
        }
    };

    Agency {
        id,
        name: file.name.into_inner(),
        certificate,
        require_bound_tokens: file.require_bound_tokens,
        case_format,
        file: src.shown.clone(),
        grants,
    }
}

/// The strings of a matcher given as one string or a list of strings, each with the value's span.
fn strings(
    r: &mut Reporter<'_>,
    key: &str,
    value: Option<&Spanned<toml::Value>>,
) -> Vec<(String, Range<usize>)> {
    let Some(value) = value else {
        return Vec::new();
    };
    let span = value.span();
    match value.get_ref() {
        toml::Value::String(s) => vec![(s.clone(), span)],
        toml::Value::Array(items) if !items.is_empty() => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    toml::Value::String(s) => out.push((s.clone(), span.clone())),
                    _ => {
                        r.at(span, format!("{key} must be a string or a list of strings"));
                        return Vec::new();
                    }
                }
            }
            out
        }
        _ => {
            r.at(
                span,
                format!("{key} must be a string or a non-empty list of strings"),
            );
            Vec::new()
        }
    }
}

fn validate_grant(
    r: &mut Reporter<'_>,
    agency: &str,
    index: usize,
    g: RawGrant,
    refs: Option<Refs<'_>>,
    location: GrantLocation,
) -> Grant {
    let provider_id = g.provider.get_ref();
    let service_id = g.service.get_ref();
    let service = refs.and_then(|(_, providers)| match providers.get(provider_id) {
        None => {
            let known: Vec<&str> = providers.keys().map(String::as_str).collect();
            r.at(
                g.provider.span(),
                format!(
                    "unknown provider {provider_id:?} (known: {})",
                    known.join(", ")
                ),
            );
            None
        }
        Some(p) => {
            let found = p.service(service_id);
            if found.is_none() {
                let known: Vec<&str> = p.services.iter().map(|s| s.id.as_str()).collect();
                r.at(
                    g.service.span(),
                    format!(
                        "unknown service {service_id:?} of provider {provider_id:?} (known: {})",
                        known.join(", ")
                    ),
                );
            }
            found
        }
    });

    let mut operations = Vec::new();
    for op in g.operations.get_ref() {
        let op_value = *op.get_ref();
        if operations.contains(&op_value) {
            r.at(op.span(), format!("duplicate operation \"{op_value}\""));
            continue;
        }
        if let Some(s) = service.filter(|s| !s.operations.contains(&op_value)) {
            let supported: Vec<&str> = s.operations.iter().map(Operation::as_str).collect();
            r.at(
                op.span(),
                format!(
                    "operation \"{op_value}\" is not supported by {provider_id}/{service_id} (supports: {})",
                    supported.join(", ")
                ),
            );
        }
        operations.push(op_value);
    }
    if operations.is_empty() {
        r.at(g.operations.span(), "a grant needs at least one operation");
    }

    let mut purposes: Vec<GrantPurpose> = Vec::new();
    for p in g.purposes.get_ref() {
        let code = p.get_ref();
        if purposes.iter().any(|x| &*x.code == code) {
            r.at(p.span(), format!("duplicate purpose {code:?}"));
            continue;
        }
        let legal_basis: Arc<str> = match refs.map(|(vocabulary, _)| vocabulary.get(code)) {
            Some(Some(purpose)) => Arc::from(purpose.legal_basis.as_str()),
            Some(None) => {
                let known: Vec<&str> = refs
                    .map(|(v, _)| v.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                r.at(
                    p.span(),
                    format!("unknown purpose {code:?} (known: {})", known.join(", ")),
                );
                Arc::from("")
            }
            None => Arc::from(""),
        };
        purposes.push(GrantPurpose {
            code: Arc::from(code.as_str()),
            legal_basis,
        });
    }
    if purposes.is_empty() {
        r.at(g.purposes.span(), "a grant needs at least one purpose");
    }

    let mut paths: Vec<&str> = Vec::new();
    for f in g.fields.get_ref() {
        let path = f.get_ref().as_str();
        if !is_field_path(path) {
            r.at(
                f.span(),
                format!(
                    "malformed field path {path:?} (expected a.b.c: lowercase, digits, underscore)"
                ),
            );
            continue;
        }
        if paths.contains(&path) {
            r.at(f.span(), format!("duplicate field path {path:?}"));
            continue;
        }
        let within = |outer: &str, inner: &str| {
            inner
                .strip_prefix(outer)
                .is_some_and(|rest| rest.starts_with('.'))
        };
        if let Some(outer) = paths.iter().find(|p| within(p, path) || within(path, p)) {
            r.at(f.span(), format!("field path {path:?} overlaps {outer:?}: a path already grants its whole subtree"));
            continue;
        }
        if let Some(known) = service.and_then(|s| s.fields.as_ref()) {
            if !known.overlaps(path) {
                r.at(
                    f.span(),
                    format!(
                        "unknown field {path:?} for {provider_id}/{service_id} (known: {})",
                        known.paths().join(", ")
                    ),
                );
                continue;
            }
        }
        paths.push(path);
    }

    let valid_from = g
        .valid_from
        .as_ref()
        .and_then(|v| parse_date(r, "valid_from", v));
    let valid_until = g
        .valid_until
        .as_ref()
        .and_then(|v| parse_date(r, "valid_until", v));
    if let (Some(from), Some(until), Some(span)) = (
        valid_from,
        valid_until,
        g.valid_until.as_ref().map(Spanned::span),
    ) {
        if from > until {
            r.at(
                span,
                format!("valid_until {until} is before valid_from {from}"),
            );
        }
    }

    // Consent is given by one person: at run time a grant needing it serves
    // only requests that name one subject (…/{service}/{id}), never a search,
    // and withholds an answer about anyone else (src/gateway/mod.rs).
    let consent_required = g
        .consent
        .as_ref()
        .is_some_and(|c| *c.get_ref() == Consent::Required);

    let released = FieldSet::from_paths(&paths);
    let mut transforms = Vec::new();
    for (path, t) in &g.transforms {
        if !is_field_path(path) || !released.covers(path) {
            r.at(
                t.span(),
                format!(
                    "transform {:?} on field {path:?}, which this grant does not release",
                    t.get_ref().as_str()
                ),
            );
            continue;
        }
        transforms.push((path.as_str(), *t.get_ref()));
    }

    let max_body_bytes = match &g.max_body_bytes {
        None => None,
        Some(n) if !operations.contains(&Operation::Write) => {
            r.at(
                n.span(),
                "max_body_bytes applies to writes, and this grant allows none",
            );
            None
        }
        Some(n) => match usize::try_from(*n.get_ref()) {
            Ok(v) if v > 0 => Some(v),
            _ => {
                r.at(
                    n.span(),
                    "max_body_bytes must be a positive number of bytes",
                );
                None
            }
        },
    };

    let mut acknowledged: Vec<Acknowledgement> = Vec::new();
    for a in &g.acknowledge {
        let (line, _) = r.line_column(a.span());
        let a = a.get_ref();
        let check = *a.check.get_ref();
        if a.because.get_ref().trim().chars().count() < 20 {
            r.at(
                a.because.span(),
                "because must say why the finding is acceptable (at least 20 characters): it is what a reviewer reads",
            );
        }
        let mut fields = Vec::new();
        for f in &a.fields {
            let path = f.get_ref();
            if !is_field_path(path) || !released.overlaps(path) {
                r.at(
                    f.span(),
                    format!("acknowledged field {path:?} is not released by this grant"),
                );
            } else {
                fields.push(path.clone());
            }
        }
        let needs_fields = matches!(check, Check::ConsentBypass | Check::CaseBypass);
        if needs_fields && a.fields.is_empty() {
            r.at(
                a.check.span(),
                format!(
                    "an acknowledgement of {} names the fields it accepts",
                    check.as_str()
                ),
            );
        }
        if !needs_fields && !a.fields.is_empty() {
            r.at(
                a.check.span(),
                format!(
                    "an acknowledgement of {} concerns the whole grant and names no fields",
                    check.as_str()
                ),
            );
        }
        if acknowledged.iter().any(|x| x.check == check) {
            r.at(
                a.check.span(),
                format!("{} is acknowledged twice for this grant", check.as_str()),
            );
            continue;
        }
        acknowledged.push(Acknowledgement {
            check,
            fields,
            because: a.because.get_ref().trim().to_owned(),
            line,
        });
    }

    Grant {
        id: Arc::from(format!("{agency}#{index}")),
        provider: provider_id.clone(),
        service: service_id.clone(),
        operations,
        purposes,
        fields: Arc::new(FieldSet::from_paths(&paths)),
        consent_required,
        case_required: g.case_required,
        valid_from,
        valid_until,
        shadow: g.shadow,
        restricted: g.restricted,
        transforms: Arc::new(crate::policy::Transforms::new(transforms)),
        max_body_bytes,
        location,
        acknowledged,
    }
}

/// Two grants that could both decide one request make the outcome depend on
/// file order; refuse them unless their validity periods are disjoint.
fn check_overlaps(
    r: &mut Reporter<'_>,
    grants: &[Grant],
    purpose_spans: &[Range<usize>],
    shadow: bool,
) {
    for (j, later) in grants.iter().enumerate() {
        for (i, earlier) in grants.iter().enumerate().take(j) {
            if earlier.shadow != shadow || later.shadow != shadow {
                continue;
            }
            if earlier.provider != later.provider || earlier.service != later.service {
                continue;
            }
            let Some(op) = later
                .operations
                .iter()
                .find(|op| earlier.operations.contains(op))
            else {
                continue;
            };
            let Some(purpose) = later
                .purposes
                .iter()
                .find(|p| earlier.purpose(&p.code).is_some())
            else {
                continue;
            };
            let starts = match (earlier.valid_from, later.valid_from) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            let ends = match (earlier.valid_until, later.valid_until) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if starts.zip(ends).is_some_and(|(s, e)| s > e) {
                continue;
            }
            let span = purpose_spans.get(j).cloned().unwrap_or(0..0);
            r.at(
                span,
                format!(
                    "{}grant #{j} overlaps grant #{i} ({}/{}, {op}, {}) while both are valid: merge them or give them disjoint validity dates",
                    if shadow { "shadow " } else { "" },
                    later.provider, later.service, purpose.code
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_kebab("mia-border"));
        assert!(!is_kebab("mia--border"));
        assert!(!is_kebab("-x"));
        assert!(!is_kebab("Mia"));
        assert!(is_field_path("visas.valid_until"));
        assert!(!is_field_path("visas..x"));
        assert!(!is_field_path("Visas"));
        assert!(!is_field_path(""));
        assert_eq!(
            normalise_fingerprint(&"AB:".repeat(32)[..95]),
            Some("ab".repeat(32))
        );
        assert_eq!(normalise_fingerprint("abc"), None);
    }
}
