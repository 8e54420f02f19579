//! The access log: one line per request, at info under the target
//! `karibche::access`, written once the request's record is committed (or
//! could not be), with the facts an operator looks for and nothing the audit
//! record does not already hold — no path, no query values, no bodies.
//!
//! The same facts label the request in `/metrics`, held to the names the
//! policy knows ([`labels`]), so an agency or a caller-chosen path can never
//! grow the metrics without bound.

use std::time::Duration;

use crate::audit::{Decision, Entry};
use crate::metrics::{NONE, OTHER};
use crate::policy::Policy;

/// What the access line says about a request, taken from its audit entry before it is committed.
#[derive(Debug, Clone)]
pub(crate) struct Access {
    agency: Option<String>,
    officer: Option<String>,
    purpose: Option<String>,
    method: String,
    provider: Option<String>,
    service: Option<String>,
    decision: Decision,
    reason: Option<String>,
    upstream_status: Option<u16>,
}

/// How the request ended, as only the end of `handle` knows it.
pub(crate) struct Finished<'a> {
    /// The request (record) id the caller was given.
    pub id: &'a str,
    /// The status sent.
    pub status: u16,
    /// Response body bytes.
    pub bytes: u64,
    /// The provider call's time, if one was made.
    pub upstream: Option<Duration>,
    /// From arrival to response.
    pub total: Duration,
    /// The W3C trace id.
    pub trace_id: &'a str,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Access {
    /// The facts of `entry` the access line reports.
    pub(crate) fn of(entry: &Entry) -> Access {
        Access {
            agency: entry.agency.clone(),
            officer: entry.officer.clone(),
            purpose: entry.purpose.clone(),
            method: entry.method.clone(),
            provider: entry.provider.clone(),
            service: entry.service.clone(),
            decision: entry.decision,
            reason: entry.reason.clone(),
            upstream_status: entry.upstream_status,
        }
    }

    /// Writes the access line.
    pub(crate) fn log(&self, f: &Finished<'_>) {
        tracing::info!(
            target: "karibche::access",
            request_id = f.id,
            trace_id = f.trace_id,
            agency = self.agency.as_deref(),
            officer = self.officer.as_deref(),
            purpose = self.purpose.as_deref(),
            method = self.method.as_str(),
            provider = self.provider.as_deref(),
            service = self.service.as_deref(),
            status = f.status,
            decision = self.decision.as_str(),
            reason = self.reason.as_deref(),
            upstream_status = self.upstream_status,
            bytes = f.bytes,
            upstream_ms = f.upstream.map(ms),
            total_ms = ms(f.total),
            "access"
        );
    }

    /// `(agency, provider, service)` as metric labels: the policy's names, [`OTHER`] or [`NONE`].
    pub(crate) fn labels<'a>(&'a self, policy: &'a Policy) -> [&'a str; 3] {
        let agency = match self.agency.as_deref() {
            Some(a) if policy.agency(a).is_some() => a,
            Some(_) => OTHER,
            None => NONE,
        };
        let (provider, service) = match (self.provider.as_deref(), self.service.as_deref()) {
            (None, _) => (NONE, NONE),
            (Some(p), s) if policy.provider(p).is_some() => {
                let service = match s {
                    Some(s) if policy.service(p, s).is_some() => s,
                    Some(_) => OTHER,
                    None => NONE,
                };
                (p, service)
            }
            (Some(_), _) => (OTHER, OTHER),
        };
        [agency, provider, service]
    }
}
