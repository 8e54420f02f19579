//! consent: where the deciding grant says `consent = "required"`, the request
//! must name one data subject who has a valid consent on record for this
//! agency, purpose and service (`crate::consent`). Read from the database on
//! every request, so a revocation holds at once.

use crate::gateway::refusal::Refusal;
use crate::gateway::route::Route;
use crate::gateway::Gateway;
use crate::policy::Allow;

impl Gateway {
    /// consent: the id of the valid consent the request relies on, `None` where the grant needs none.
    pub(crate) async fn consent(
        &self,
        allow: &Allow,
        agency: &str,
        purpose: &str,
        route: &Route<'_>,
        subject: Option<&str>,
    ) -> Result<Option<String>, Refusal> {
        if !allow.consent_required {
            return Ok(None);
        }
        let Some(subject) = subject else {
            return Err(Refusal::CONSENT_MISSING.with_detail(
                "this access needs the data subject's consent, so the request must name one person (…/{service}/{id}); searches are not possible under it",
            ));
        };
        match self
            .consents
            .valid(subject, agency, purpose, route.provider, route.service)
            .await
        {
            Ok(Some(id)) => Ok(Some(id)),
            Ok(None) => Err(Refusal::CONSENT_MISSING.with_detail(format!(
                "no valid consent of data subject {subject} to agency {agency} for purpose {purpose} on {}/{} is on record: none was recorded, or it was revoked or has expired",
                route.provider, route.service
            ))),
            Err(err) => {
                tracing::error!(%err, "consent records cannot be read; refusing");
                Err(Refusal::CONSENT_UNAVAILABLE)
            }
        }
    }
}
