//! The access policy: which agency may do what, for which purposes, and
//! which fields it may see.
//!
//! Administrators keep it as TOML files under `policies/` (see [`schema`],
//! `policies/schema.json`):
//! the purpose vocabulary, the providers table, and one file per agency with
//! its certificate and grants. [`Policy::load`] parses and validates the whole
//! directory, reporting every problem with its file, line and column; only a
//! flawless set becomes a [`Policy`], which is immutable and shared as
//! `Arc<Policy>` (a reload builds a new one and swaps it). Nothing is allowed
//! unless a grant says so. [`Policy::decide`] runs per request and only looks
//! up what loading precomputed.

mod case_ref;
mod cases;
mod check;
mod decide;
mod diff;
pub(crate) mod fields;
mod load;
mod model;
pub mod path;
pub mod pseudonymity;
mod schema;
mod source;
mod transforms;

use std::path::Path;

pub use case_ref::{CaseFormat, MAX_CASE_REF};
pub use cases::{run_cases, CaseFailure, CaseReport, CASES_DIR};
pub use check::{warnings, Warning};
pub use decide::{Allow, Decision, DecisionRequest, DenyReason};
pub use diff::diff;
pub use fields::FieldSet;
pub use load::{AGENCIES_DIR, PROVIDERS_FILE, PURPOSES_FILE};
pub use model::{
    Acknowledgement, Agency, CertificateMatcher, Check, Grant, GrantLocation, GrantPurpose,
    Operation, Policy, Provider, Purpose, Service, Upstream,
};
pub use path::{split_gateway_path, GatewayPath, PathError, CURSOR_PARAM, FIELDS_PARAM};
pub use schema::schema;
pub use source::{line_column, whole_file, PolicyError, PolicyErrors, Reporter};
pub use transforms::{Transform, Transforms};

impl Policy {
    /// Reads, parses and validates every policy file under `dir`; a set with any problem yields all of them.
    pub fn load(dir: &Path) -> Result<Policy, PolicyErrors> {
        load::load(dir)
    }

    /// The decision for one request under the enforced grants; `today` is the UTC date, against which grant validity dates are checked.
    pub fn decide(&self, req: &DecisionRequest<'_>, today: time::Date) -> Decision {
        decide::decide(self, req, today)
    }

    /// The decision the agency's `shadow = true` grants for the service would give; `None` when it has none for it.
    pub fn decide_shadow(&self, req: &DecisionRequest<'_>, today: time::Date) -> Option<Decision> {
        decide::decide_shadow(self, req, today)
    }

    /// Human-readable account of every grant of the agency, why it did or did not match, and the decision.
    pub fn explain(&self, req: &DecisionRequest<'_>, today: time::Date) -> String {
        decide::explain(self, req, today)
    }
}

#[cfg(test)]
mod tests;
