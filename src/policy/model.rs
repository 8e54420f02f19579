//! The loaded, validated policy: agencies and their grants, providers and
//! their services, the purpose vocabulary, and the indexes the decision
//! function reads. Everything here is immutable once built.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use time::Date;

use crate::minimise::FieldSet;

/// A loaded and validated policy set; immutable, shared as `Arc<Policy>` and swapped whole on reload.
#[derive(Debug)]
pub struct Policy {
    pub(crate) version: String,
    pub(crate) purposes: BTreeMap<String, Purpose>,
    pub(crate) providers: BTreeMap<String, Provider>,
    pub(crate) agencies: BTreeMap<String, Agency>,
    /// URI SAN → agency id, for the per-connection certificate lookup.
    pub(crate) by_uri_san: HashMap<String, String>,
    /// Lowercase hex SHA-256 fingerprint → agency id.
    pub(crate) by_sha256: HashMap<String, String>,
    /// agency → provider → service → indexes into that agency's grants, in file order.
    /// Nested so a lookup takes `&str` keys and allocates nothing.
    pub(crate) index: HashMap<String, HashMap<String, HashMap<String, Vec<usize>>>>,
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

    /// The agency whose certificate matcher matches a client certificate's URI SANs or SHA-256 fingerprint.
    ///
    /// Fails closed: if the URI SAN and the fingerprint point at different
    /// agencies, no agency is returned.
    pub fn agency_for_certificate(&self, uri_sans: &[String], sha256_hex: &str) -> Option<&Agency> {
        let by_fingerprint = if sha256_hex.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_sha256.get(&sha256_hex.to_ascii_lowercase())
        } else {
            self.by_sha256.get(sha256_hex)
        };
        let mut found: Option<&String> = by_fingerprint;
        for san in uri_sans {
            if let Some(id) = self.by_uri_san.get(san) {
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
        }
        found.and_then(|id| self.agencies.get(id))
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
        self.index
            .get(agency)
            .and_then(|p| p.get(provider))
            .and_then(|s| s.get(service))
            .map_or(&[], Vec::as_slice)
    }
}

/// A client agency (ministry, department) and what it may ask for.
#[derive(Debug, Clone)]
pub struct Agency {
    /// Short id, equal to the policy file's name (`mia-border`).
    pub id: String,
    /// Full name.
    pub name: String,
    /// Which client certificate is this agency's.
    pub certificate: CertificateMatcher,
    /// The grants, in file order; a grant's index is its position here.
    pub grants: Vec<Grant>,
}

/// Identifies an agency's client certificate; either matcher matching is enough.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateMatcher {
    /// A URI subject alternative name, e.g. `urn:karibche:agency:psda`.
    pub uri_san: Option<String>,
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
