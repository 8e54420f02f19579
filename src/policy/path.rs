//! The gateway's one path grammar, `/v1/{provider}/{service}{rest}`: the
//! address a grant names, so the policy owns it. The gateway routes by it
//! (`crate::gateway::route`), policy test cases and `karibche policy explain`
//! split their paths with it, and the query parameters the gateway reads
//! itself (never the provider's) are named here.

/// The query parameter carrying a sealed pagination cursor (`crate::gateway::release::cursor`).
pub const CURSOR_PARAM: &str = "cursor";
/// The query parameter narrowing an answer to some of the granted fields.
pub const FIELDS_PARAM: &str = "fields";

/// `/v1/{provider}/{service}{rest}` split up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayPath<'a> {
    /// The provider's id, the first segment after `/v1/`.
    pub provider: &'a str,
    /// The service's id, the second segment.
    pub service: &'a str,
    /// Everything after the service, with its leading `/` (may be empty).
    pub rest: &'a str,
}

/// Short paths and the provider and service they stand for: `/v1/consents…` is
/// `/v1/gateway/consents…`, the consent API's documented address.
const SHORT_FORMS: [(&str, &str, &str); 1] = [("/v1/consents", "gateway", "consents")];

/// Why a path is not a gateway path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not of the form `/v1/{provider}/{service}…`.
    #[error("gateway paths have the form /v1/{{provider}}/{{service}}/…")]
    NotGateway,
    /// `rest` holds a segment a provider might resolve to another service than the one decided on.
    #[error("the path contains empty, dot or encoded separator segments")]
    Suspicious,
}

impl<'a> GatewayPath<'a> {
    /// Splits a path (no query) into provider, service and rest; nothing else is checked.
    pub fn split(path: &'a str) -> Option<GatewayPath<'a>> {
        let (provider, after) = path.strip_prefix("/v1/")?.split_once('/')?;
        let (service, rest) = match after.find('/') {
            Some(i) => (&after[..i], &after[i..]),
            None => (after, ""),
        };
        (!provider.is_empty() && !service.is_empty()).then_some(GatewayPath {
            provider,
            service,
            rest,
        })
    }

    /// The path a request asks for: a short form's provider and service (its
    /// rest is the built-in provider's to check), or else [`GatewayPath::parse`].
    pub fn route(path: &'a str) -> Result<GatewayPath<'a>, PathError> {
        for (short, provider, service) in SHORT_FORMS {
            if let Some(rest) = path.strip_prefix(short) {
                if rest.is_empty() || rest.starts_with('/') {
                    return Ok(GatewayPath {
                        provider,
                        service,
                        rest,
                    });
                }
            }
        }
        GatewayPath::parse(path)
    }

    /// Splits a path that is to be forwarded: as [`GatewayPath::split`], and
    /// refusing dot segments, empty segments and encoded separators in `rest`.
    pub fn parse(path: &'a str) -> Result<GatewayPath<'a>, PathError> {
        let split = GatewayPath::split(path).ok_or(PathError::NotGateway)?;
        let suspicious = split.rest.split('/').skip(1).any(|s| {
            let lower = s.to_ascii_lowercase();
            s.is_empty()
                || s == "."
                || s == ".."
                || lower.contains("%2f")
                || lower.contains("%2e")
                || lower.contains("%5c")
        });
        if suspicious {
            return Err(PathError::Suspicious);
        }
        Ok(split)
    }
}

/// Splits a gateway path `/v1/{provider}/{service}/{rest}` (query ignored) into provider and service.
pub fn split_gateway_path(path: &str) -> Option<(&str, &str)> {
    let path = path.split('?').next().unwrap_or(path);
    GatewayPath::split(path).map(|p| (p.provider, p.service))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_provider_service_rest() {
        let ok = GatewayPath::parse("/v1/registry/persons/RF-1/visas").unwrap();
        assert_eq!(
            (ok.provider, ok.service, ok.rest),
            ("registry", "persons", "/RF-1/visas")
        );
        assert_eq!(GatewayPath::parse("/v1/registry/persons").unwrap().rest, "");
        assert_eq!(
            GatewayPath::parse("/v1/registry"),
            Err(PathError::NotGateway)
        );
        assert_eq!(
            GatewayPath::parse("/v1/registry/persons/../x"),
            Err(PathError::Suspicious)
        );
        assert!(GatewayPath::split("/v1/registry/persons/../x").is_some());
    }
}
