//! release: what leaves the gateway of a provider's answer. Only JSON is
//! released, cut down to the grant's fields ([`minimise`]), some of them
//! pseudonymised or coarsened ([`transform`]), with the provider's cursor
//! sealed ([`cursor`]); the record learns which fields and subjects the
//! answer held and the digest of the body exactly as released.

pub mod cursor;
pub mod minimise;
pub mod transform;

use bytes::Bytes;
use http::StatusCode;
use time::OffsetDateTime;

use crate::gateway::exchange::Exchange;
use crate::gateway::refusal::Refusal;
use crate::gateway::route::Route;
use crate::gateway::Gateway;
use crate::policy::{Allow, Service};

/// What a successful pass through the pipeline answers.
#[derive(Debug)]
pub struct Answer {
    /// The status the caller receives.
    pub status: StatusCode,
    /// The body exactly as released.
    pub body: Bytes,
    /// Its media type.
    pub content_type: &'static str,
}

impl Gateway {
    /// release: a provider's successful JSON answer minimised, transformed and its cursor
    /// sealed for `agency`; anything that is not JSON is withheld rather than passed on whole.
    pub(crate) fn release(
        &self,
        (status, body, content_type): (StatusCode, Bytes, Option<&str>),
        allow: &Allow,
        agency: &str,
        (route, service): (&Route<'_>, &Service),
        exchange: &mut Exchange,
    ) -> Result<Answer, Refusal> {
        let json = content_type.is_some_and(|ct| {
            let ct = ct.split(';').next().unwrap_or_default().trim();
            ct.eq_ignore_ascii_case("application/json") || ct.ends_with("+json")
        });
        if !json {
            tracing::warn!(service = %service.id, "provider answered with something other than JSON");
            return Err(Refusal::PROVIDER_BAD_RESPONSE);
        }
        // The provider's cursor is its position (a register id); only a sealed one leaves.
        let scope = cursor::Scope {
            agency,
            provider: route.provider,
            service: &service.id,
        };
        let (body, released) = if allow.transforms.is_empty() {
            self.release_raw(&body, allow, service, scope)?
        } else {
            self.release_transformed(&body, allow, agency, service, scope)?
        };
        for s in &released.subjects {
            exchange.subject(s);
        }
        exchange.released_fields(released.fields);
        exchange.released_body(&body);
        Ok(Answer {
            status,
            body: Bytes::from(body),
            content_type: "application/json",
        })
    }

    /// Minimised straight from the provider's bytes ([`minimise::apply_raw`]): what a
    /// grant without transforms releases.
    fn release_raw(
        &self,
        body: &[u8],
        allow: &Allow,
        service: &Service,
        scope: cursor::Scope<'_>,
    ) -> Result<(Vec<u8>, minimise::Released), Refusal> {
        let cursors = self.pseudonymiser.cursors();
        let now = cursor::now_secs();
        let mut unsealed = None;
        let mut seal = |position: &str| {
            cursors
                .seal(scope, position, now)
                .map_err(|e| unsealed = Some(e))
                .ok()
        };
        let released = minimise::apply_raw(
            body,
            &allow.fields,
            service.collection.as_deref(),
            &service.subject_field,
            &mut seal,
        );
        match (released, unsealed) {
            (Some(released), _) => Ok(released),
            (None, Some(e)) => {
                tracing::warn!(service = %service.id, err = %e, "provider cursor not sealed; answer withheld");
                Err(Refusal::PROVIDER_BAD_RESPONSE)
            }
            // Not JSON, or JSON the one pass does not take (a repeated key): the tree decides.
            (None, None) => self.release_transformed(body, allow, "", service, scope),
        }
    }

    /// Minimised, then transformed (pseudonymised, coarsened) field by field: what a grant
    /// with transforms releases.
    fn release_transformed(
        &self,
        body: &[u8],
        allow: &Allow,
        agency: &str,
        service: &Service,
        scope: cursor::Scope<'_>,
    ) -> Result<(Vec<u8>, minimise::Released), Refusal> {
        let mut value = serde_json::from_slice::<serde_json::Value>(body).map_err(|_| {
            tracing::warn!(service = %service.id, "provider answered with something other than JSON");
            Refusal::PROVIDER_BAD_RESPONSE
        })?;
        let released = minimise::apply(
            &mut value,
            &allow.fields,
            service.collection.as_deref(),
            &service.subject_field,
        );
        let context = transform::Context {
            pseudonymiser: &self.pseudonymiser,
            agency,
            today: OffsetDateTime::now_utc().date(),
        };
        transform::apply(
            &mut value,
            service.collection.as_deref(),
            &allow.transforms,
            &context,
        );
        self.pseudonymiser
            .cursors()
            .seal_next(&mut value, scope, cursor::now_secs())
            .map_err(|e| {
                tracing::warn!(service = %service.id, err = %e, "provider cursor not sealed; answer withheld");
                Refusal::PROVIDER_BAD_RESPONSE
            })?;
        let body = serde_json::to_vec(&value).map_err(|_| Refusal::INTERNAL)?;
        Ok((body, released))
    }

    /// Opens the `cursor` of a forwarded query: only a cursor the gateway sealed
    /// for this agency and service reaches the provider.
    pub(crate) fn open_cursor(
        &self,
        query: Option<String>,
        agency: &str,
        route: &Route<'_>,
    ) -> Result<Option<String>, Refusal> {
        let scope = cursor::Scope {
            agency,
            provider: route.provider,
            service: route.service,
        };
        self.pseudonymiser
            .cursors()
            .open_query(query, scope, cursor::now_secs())
            .map_err(|e| {
                Refusal::INVALID_CURSOR.with_detail(format!(
                    "{e}: pass back the `next` of your agency's last page unchanged, or start the search again without a cursor"
                ))
            })
    }
}
