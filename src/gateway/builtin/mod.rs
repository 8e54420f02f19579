//! Built-in providers: services the gateway answers in-process instead of
//! forwarding — the consent API ([`consents`]), the auditors' API
//! ([`audit`]) and the administrators' API ([`admin`]). The providers table names them like any provider
//! (`upstream = "builtin:<name>"`); the route resolves them, and the request
//! passes every step of the pipeline (agency, token, decide, limit, body,
//! consent) before the provider's [`Builtin::serve`] answers in place of
//! forward and release.
//!
//! Adding one: write a file here implementing [`Builtin`], and add it to
//! `TABLE`. (`builtin:registry` is not in the table: the register is a
//! provider on its own listener, forwarded to by URL.)

pub mod admin;
pub mod audit;
pub mod consents;

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use crate::audit::Attempt;
use crate::gateway::exchange::Exchange;
use crate::gateway::refusal::Refusal;
use crate::gateway::release::Answer;
use crate::gateway::Gateway;
use crate::identity::token::Officer;
use crate::policy::{Allow, GatewayPath as Route, Operation, Policy, Service};

/// The built-in providers, by the name after `builtin:`.
const TABLE: &[&dyn Builtin] = &[&audit::AuditApi, &consents::ConsentApi, &admin::AdminApi];

/// The built-in provider of that name, if the gateway has one.
pub fn find(name: &str) -> Option<&'static dyn Builtin> {
    TABLE.iter().copied().find(|b| b.name() == name)
}

/// A built-in provider's answer, to come.
pub type Serving<'a> = Pin<Box<dyn Future<Output = Result<Answer, Refusal>> + Send + 'a>>;

/// A request to a built-in provider, as the pipeline established it: decided, within its quotas.
pub struct Call<'a> {
    /// The gateway (its audit log, consent records, pseudonymiser).
    pub gateway: &'a Gateway,
    /// The policy in force.
    pub policy: &'a Policy,
    /// The calling agency.
    pub agency: &'a str,
    /// The officer, with purpose and case.
    pub officer: &'a Officer,
    /// The provider, service and path below it.
    pub route: &'a Route<'a>,
    /// The request's head.
    pub parts: &'a http::request::Parts,
    /// The deciding grant.
    pub allow: &'a Allow,
    /// The service's description.
    pub service: &'a Service,
    /// A write's body as received (empty for a read).
    pub body: Bytes,
    /// A write's body parsed, checked against the grant's fields (`None` when empty).
    pub written: Option<serde_json::Value>,
}

/// A provider served by the gateway itself.
pub trait Builtin: Send + Sync {
    /// The name after `builtin:` in the providers table.
    fn name(&self) -> &'static str;

    /// The operation a request asks, checked before the policy decides: a path or a
    /// method the provider does not serve is refused here. By default the method's.
    fn operation(
        &self,
        route: &Route<'_>,
        method: &http::Method,
        exchange: &mut Exchange,
    ) -> Result<Operation, Refusal> {
        let _ = (route, exchange);
        Operation::from_method(method).ok_or(Refusal::METHOD_NOT_ALLOWED)
    }

    /// Answers the request; a change is logged ahead through `Gateway::log_ahead` first.
    fn serve<'a>(
        &'a self,
        call: Call<'a>,
        exchange: &'a mut Exchange,
        ahead: &'a mut Option<Attempt>,
    ) -> Serving<'a>;
}
