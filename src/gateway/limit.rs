//! limit: the officer's, the grant's and the agency's quota (`crate::limits`),
//! checked once the policy has allowed the request; a used-up quota is a 429
//! with `Retry-After` and the `RateLimit` headers. With shared quotas the
//! check is one bounded round trip to Redis (`limits::redis`).

use crate::gateway::refusal::Refusal;
use crate::gateway::route::Route;
use crate::gateway::Gateway;

impl Gateway {
    /// limit: takes one request from each quota the request falls under, or refuses it.
    pub(crate) async fn limit(
        &self,
        agency: &str,
        officer: &str,
        route: &Route<'_>,
    ) -> Result<(), Refusal> {
        self.rate
            .check(agency, officer, route.provider, route.service)
            .await
            .map_err(|e| {
                self.metrics.quota_refused(agency, e.scope.as_str());
                Refusal::rate_limited(&e)
            })
    }
}
