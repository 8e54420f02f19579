//! The access policy: which agency may do what, for which purposes, and
//! which fields it may see.
//!
//! Administrators keep it as TOML files under `policies/` (see [`schema`]):
//! the purpose vocabulary, the providers table, and one file per agency with
//! its certificate and grants. [`Policy::load`] parses and validates the whole
//! directory, reporting every problem with its file, line and column; only a
//! flawless set becomes a [`Policy`], which is immutable and shared as
//! `Arc<Policy>` (a reload builds a new one and swaps it). Nothing is allowed
//! unless a grant says so. [`Policy::decide`] runs per request and only looks
//! up what loading precomputed.

mod decide;
mod load;
mod model;

use std::path::Path;

pub use decide::{Allow, Decision, DecisionRequest, DenyReason};
pub use load::{PolicyError, PolicyErrors, AGENCIES_DIR, PROVIDERS_FILE, PURPOSES_FILE};
pub use model::{
    Agency, CertificateMatcher, Grant, GrantPurpose, Operation, Policy, Provider, Purpose, Service,
    Upstream,
};

impl Policy {
    /// Reads, parses and validates every policy file under `dir`; a set with any problem yields all of them.
    pub fn load(dir: &Path) -> Result<Policy, PolicyErrors> {
        load::load(dir)
    }

    /// The decision for one request; `today` is the UTC date, against which grant validity dates are checked.
    pub fn decide(&self, req: &DecisionRequest<'_>, today: time::Date) -> Decision {
        decide::decide(self, req, today)
    }

    /// Human-readable account of every grant of the agency, why it did or did not match, and the decision.
    pub fn explain(&self, req: &DecisionRequest<'_>, today: time::Date) -> String {
        decide::explain(self, req, today)
    }
}

/// A description of the policy file format, printed by `karibche policy schema`.
pub fn schema() -> String {
    SCHEMA.to_owned()
}

const SCHEMA: &str = r#"karibche policy files (TOML; unknown keys are errors; nothing is allowed unless a grant says so)

policies/purposes.toml — the purpose vocabulary
  [[purposes]]
  code        = "residence-permit-review"   # kebab-case, unique; officers' tokens carry it
  title       = "..."                       # non-empty
  legal_basis = "Law of Georgia ..."        # non-empty; cited in every audit record

policies/providers.toml — who serves data
  [[providers]]
  id       = "registry"                     # kebab-case, unique; URL: /v1/{provider}/{service}/...
  title    = "..."
  upstream = "builtin:registry"             # or "https://host/base"
    [[providers.services]]
    id            = "persons"               # kebab-case, unique within the provider
    title         = "..."
    operations    = ["read"]                # "read" (GET, HEAD) and/or "write" (POST, PUT, PATCH, DELETE)
    subject_field = "id"                    # field of each record holding the data subject's id
    collection    = "results"               # optional: key of the record array in list responses
    fields        = ["id", "names.surname"] # optional: the record's known field paths; grants are checked against them

policies/agencies/<id>.toml — one file per agency; the file name is the agency id
  id   = "mia-border"                       # kebab-case, equal to the file name
  name = "..."
  [certificate]                             # at least one matcher; either matching is enough; never shared by two agencies
  uri_san = "urn:karibche:agency:mia-border"
  sha256  = ["<64 hex digits, colons allowed>"]
  [[grants]]                                # zero or more; grant ids are "<agency>#<index>", index from 0 in file order
  provider      = "registry"                # must exist in providers.toml
  service       = "persons"                 # must exist under that provider
  operations    = ["read"]                  # each supported by the service
  purposes      = ["border-control"]        # codes from purposes.toml
  fields        = ["names", "visas.valid_until"]  # dotted paths (a.b.c: lowercase, digits, _); a path grants its whole
                                            # subtree; arrays are transparent; no duplicates or nested repeats
  consent       = "none"                    # optional: "none" (default) or "required" (subject's consent on record)
  case_required = false                     # optional: the officer's token must carry a case reference
  valid_from    = 2026-01-01                # optional first day (inclusive), TOML date or "YYYY-MM-DD"
  valid_until   = 2026-12-31                # optional last day (inclusive); not before valid_from
  Two grants of one agency may not both apply to one request (same service, a shared operation and purpose,
  overlapping validity).

Decision order: unknown agency, unknown service, unknown purpose, then among the agency's grants for the
service the most specific failure: operation_not_allowed < purpose_not_allowed < grant_not_valid_today
< case_required; no grant for the service at all: no_grant.
"#;

#[cfg(test)]
mod tests;
