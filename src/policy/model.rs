//! The loaded, validated policy: agencies and their grants, providers and
//! their services, the purpose vocabulary, and the indexes the decision
//! function reads. Everything here is immutable once built.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use time::Date;

use crate::policy::FieldSet;

/// A loaded and validated policy set; immutable, shared as `Arc<Policy>` and swapped whole on reload.
#[derive(Debug)]
pub struct Policy {
    pub(crate) version: String,
    /// Each policy file's relative path and the hex SHA-256 of its contents, in path order.
    pub(crate) files: Vec<(String, String)>,
    pub(crate) purposes: BTreeMap<String, Purpose>,
    pub(crate) providers: BTreeMap<String, Provider>,
    pub(crate) agencies: BTreeMap<String, Agency>,
    /// URI SAN → agency id, for the per-connection certificate lookup.
    pub(crate) by_uri_san: HashMap<String, String>,
    /// DNS SAN → agency id.
    pub(crate) by_dns_san: HashMap<String, String>,
    /// Subject DN (RFC 4514 text as x509-parser prints it) → agency id.
    pub(crate) by_subject: HashMap<String, String>,
    /// Lowercase hex SHA-256 fingerprint → agency id.
    pub(crate) by_sha256: HashMap<String, String>,
    /// agency → provider → service → that agency's grants for it.
    /// Nested so a lookup takes `&str` keys and allocates nothing.
    pub(crate) index: HashMap<String, HashMap<String, HashMap<String, ServiceGrants>>>,
}

/// The grants of one agency for one service, as indexes into [`Agency::grants`] in file order.
#[derive(Debug, Default)]
pub(crate) struct ServiceGrants {
    /// The grants in force (not shadow).
    pub(crate) enforced: Vec<usize>,
    /// The grants marked `shadow = true`: what the service's grants would be if the change were switched on.
    pub(crate) shadow: Vec<usize>,
}

impl Policy {
    /// First 16 hex characters of the SHA-256 over all policy files; names this policy in audit records.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// All agencies, sorted by id.
    pub fn agencies(&self) -> impl Iterator<Item = &Agency> {
        self.agencies.values()
    }

    /// The agency with this id.
    pub fn agency(&self, id: &str) -> Option<&Agency> {
        self.agencies.get(id)
    }

    /// The agency whose certificate matchers match a verified client certificate.
    ///
    /// Any one matcher (URI SAN, DNS SAN, subject, fingerprint) is enough.
    /// Fails closed: if the certificate's facts point at two different
    /// agencies, no agency is returned.
    pub fn agency_for_certificate(&self, cert: &crate::identity::PeerCert) -> Option<&Agency> {
        let candidates = std::iter::once(get_lowercase(&self.by_sha256, &cert.sha256))
            .chain(cert.uri_sans.iter().map(|s| self.by_uri_san.get(s)))
            .chain(
                cert.dns_sans
                    .iter()
                    .map(|s| get_lowercase(&self.by_dns_san, s)),
            )
            .chain(std::iter::once(self.by_subject.get(&cert.subject)))
            .flatten();
        let mut found: Option<&String> = None;
        for id in candidates {
            match found {
                Some(other) if other != id => {
                    tracing::warn!(
                        agency_a = %other,
                        agency_b = %id,
                        "client certificate matches two agencies; refusing it"
                    );
                    return None;
                }
                _ => found = Some(id),
            }
        }
        found.and_then(|id| self.agencies.get(id))
    }

    /// Each policy file (relative path) with the hex SHA-256 of its contents, in path order.
    pub fn files(&self) -> &[(String, String)] {
        &self.files
    }

    /// The provider with this id.
    pub fn provider(&self, id: &str) -> Option<&Provider> {
        self.providers.get(id)
    }

    /// All providers, sorted by id.
    pub fn providers(&self) -> impl Iterator<Item = &Provider> {
        self.providers.values()
    }

    /// A provider's service.
    pub fn service(&self, provider: &str, service: &str) -> Option<&Service> {
        self.providers.get(provider)?.service(service)
    }

    /// A purpose from the vocabulary.
    pub fn purpose(&self, code: &str) -> Option<&Purpose> {
        self.purposes.get(code)
    }

    /// The whole purpose vocabulary, sorted by code.
    pub fn purposes(&self) -> impl Iterator<Item = &Purpose> {
        self.purposes.values()
    }

    /// Indexes of the agency's grants for one provider's service, in file order (empty if none).
    pub(crate) fn grants_for(&self, agency: &str, provider: &str, service: &str) -> &[usize] {
        self.service_grants(agency, provider, service)
            .map_or(&[], |g| g.enforced.as_slice())
    }

    /// The agency's grants for one service, enforced and shadow.
    pub(crate) fn service_grants(
        &self,
        agency: &str,
        provider: &str,
        service: &str,
    ) -> Option<&ServiceGrants> {
        self.index
            .get(agency)
            .and_then(|p| p.get(provider))
            .and_then(|s| s.get(service))
    }
}

/// Looks `key` up case-insensitively in a map with lowercase keys, allocating only when `key` has uppercase.
fn get_lowercase<'m>(map: &'m HashMap<String, String>, key: &str) -> Option<&'m String> {
    if key.bytes().any(|b| b.is_ascii_uppercase()) {
        map.get(&key.to_ascii_lowercase())
    } else {
        map.get(key)
    }
}

/// A client agency (ministry, department) and what it may ask for.
#[derive(Debug, Clone)]
pub struct Agency {
    /// Short id, equal to the policy file's name (`mia-border`).
    pub id: String,
    /// Full name.
    pub name: String,
    /// Which client certificates are this agency's (several during a rotation).
    pub certificate: CertificateMatcher,
    /// Whether officers' tokens must be bound to the client certificate (`cnf.x5t#S256`); default false.
    pub require_bound_tokens: bool,
    /// The form the agency's case references take (`case_format`); checked where a grant needs a case.
    pub case_format: super::case_ref::CaseFormat,
    /// The policy file the agency was read from.
    pub file: PathBuf,
    /// The grants, in file order; a grant's index is its position here.
    pub grants: Vec<Grant>,
}

/// Identifies an agency's client certificates; any one matcher matching is enough.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateMatcher {
    /// URI subject alternative names, e.g. `urn:karibche:agency:psda`.
    pub uri_san: Vec<String>,
    /// DNS subject alternative names, lowercase.
    pub dns_san: Vec<String>,
    /// Subject distinguished names, exactly as x509-parser prints them (RFC 4514 style).
    pub subject: Vec<String>,
    /// Pinned certificate fingerprints, lowercase hex without separators.
    pub sha256: Vec<String>,
}

/// One permission of an agency: a service, operations, purposes and the fields released.
#[derive(Debug, Clone)]
pub struct Grant {
    /// `"<agency>#<index>"`, named in decisions and audit records.
    pub id: Arc<str>,
    /// Provider id.
    pub provider: String,
    /// Service id within the provider.
    pub service: String,
    /// Operations the grant allows.
    pub operations: Vec<Operation>,
    /// Purposes the grant allows, each with the legal basis the decision cites.
    pub purposes: Vec<GrantPurpose>,
    /// The fields released, shared with every decision that cites this grant.
    pub fields: Arc<FieldSet>,
    /// Whether the data subject's consent must be on record.
    pub consent_required: bool,
    /// Whether the officer's token must carry a case reference.
    pub case_required: bool,
    /// First day the grant applies (inclusive), if limited.
    pub valid_from: Option<Date>,
    /// Last day the grant applies (inclusive), if limited.
    pub valid_until: Option<Date>,
    /// A proposed grant: decided and recorded as the shadow decision, never enforced.
    pub shadow: bool,
    /// Released only under the stricter handling of restricted records (issue 9); default false.
    pub restricted: bool,
    /// Transforms applied to released fields (pseudonymise, year_only, age_band).
    pub transforms: Arc<crate::policy::Transforms>,
    /// Largest write body under this grant, if lower than the gateway's limit.
    pub max_body_bytes: Option<usize>,
    /// Where the grant is written: its policy file and the 1-based line of its `[[grants]]` header.
    pub location: GrantLocation,
    /// Warnings of `policy check` reviewed and accepted for this grant, each with its reason.
    pub acknowledged: Vec<Acknowledgement>,
}

/// A `policy check` warning an administrator reviewed and accepted for one grant
/// (`[[grants.acknowledge]]`): it silences that warning for exactly the fields
/// it lists, so a field added later warns again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acknowledgement {
    /// Which warning.
    pub check: Check,
    /// The fields it covers (dotted paths; empty for checks about the whole grant).
    pub fields: Vec<String>,
    /// Why the finding is acceptable: read by whoever reviews the policy.
    pub because: String,
    /// 1-based line of the acknowledgement, for warnings about it.
    pub line: usize,
}

/// The `policy check` warnings a grant can acknowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    /// The grant releases, without consent, fields another grant of the agency protects with consent.
    ConsentBypass,
    /// The grant releases, without a case reference, fields another grant of the agency releases only within a case.
    CaseBypass,
    /// A consent grant on a service that also answers searches (consent serves one person at a time).
    ConsentSearch,
}

impl Check {
    /// The name used in policy files.
    pub fn as_str(&self) -> &'static str {
        match self {
            Check::ConsentBypass => "consent-bypass",
            Check::CaseBypass => "case-bypass",
            Check::ConsentSearch => "consent-search",
        }
    }
}

/// Where a grant is written, for `policy explain` and warnings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrantLocation {
    /// The policy file.
    pub file: PathBuf,
    /// 1-based line of the grant's first key.
    pub line: usize,
}

impl fmt::Display for GrantLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

impl Grant {
    /// Whether the grant applies on `today` (UTC).
    pub fn valid_on(&self, today: Date) -> bool {
        self.valid_from.is_none_or(|from| from <= today)
            && self.valid_until.is_none_or(|until| today <= until)
    }

    /// The purpose entry for `code`, if the grant allows it.
    pub fn purpose(&self, code: &str) -> Option<&GrantPurpose> {
        self.purposes.iter().find(|p| &*p.code == code)
    }
}

/// A purpose a grant allows, with its legal basis copied from the vocabulary so an Allow costs no allocation.
#[derive(Debug, Clone)]
pub struct GrantPurpose {
    /// Purpose code.
    pub code: Arc<str>,
    /// The purpose's legal basis.
    pub legal_basis: Arc<str>,
}

/// A data provider: the built-in register or another ministry's service.
#[derive(Debug, Clone)]
pub struct Provider {
    /// Short id, the first path segment after `/v1/`.
    pub id: String,
    /// Human-readable name.
    pub title: String,
    /// Where requests are forwarded.
    pub upstream: Upstream,
    /// The provider's services.
    pub services: Vec<Service>,
}

impl Provider {
    /// The service with this id.
    pub fn service(&self, id: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.id == id)
    }
}

/// Where a provider is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// A provider inside this process, by name (`builtin:registry` → `Builtin("registry")`).
    Builtin(String),
    /// An `https://` base URL.
    Url(String),
}

/// One service of a provider.
#[derive(Debug, Clone)]
pub struct Service {
    /// Short id, the path segment after the provider.
    pub id: String,
    /// Human-readable name.
    pub title: String,
    /// Operations the service supports.
    pub operations: Vec<Operation>,
    /// The JSON field of each record that holds the data subject's id.
    pub subject_field: String,
    /// The key of the array of records in list responses, if the service returns lists.
    pub collection: Option<String>,
    /// The record's known field paths, if declared; grants are checked against them.
    pub fields: Option<FieldSet>,
    /// Query parameters that select only by attributes a pseudonymising grant
    /// releases; under such a grant every other parameter is refused (src/policy/pseudonymity.rs).
    pub pseudonymous_query: Vec<String>,
}

/// A purpose from the vocabulary.
#[derive(Debug, Clone)]
pub struct Purpose {
    /// Kebab-case code carried in officer tokens.
    pub code: String,
    /// Human-readable name.
    pub title: String,
    /// The law (and article) that allows processing for this purpose.
    pub legal_basis: String,
}

/// What a request does to a service: read or write.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// GET and HEAD.
    Read,
    /// POST, PUT, PATCH and DELETE.
    Write,
}

impl Operation {
    /// The operation an HTTP method performs; `None` for methods the gateway does not forward.
    pub fn from_method(m: &http::Method) -> Option<Operation> {
        match *m {
            http::Method::GET | http::Method::HEAD => Some(Operation::Read),
            http::Method::POST | http::Method::PUT | http::Method::PATCH | http::Method::DELETE => {
                Some(Operation::Write)
            }
            _ => None,
        }
    }

    /// `"read"` or `"write"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
