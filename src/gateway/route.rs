//! route: which provider and service a request asks, by the one path grammar
//! (`crate::policy::path`), and where that provider is served — forwarded to
//! a URL, or answered in-process by a built-in provider
//! (`crate::gateway::builtin`).
//!
//! Short forms stand for full gateway paths (`/v1/consents…` is
//! `/v1/gateway/consents…`, see [`GatewayPath::route`]).

use http::Uri;

use crate::gateway::builtin::{self, Builtin};
use crate::gateway::refusal::Refusal;
use crate::gateway::Gateway;
use crate::policy::{GatewayPath, PathError, Policy, Service, Upstream};

/// `/v1/{provider}/{service}{rest}` of a request, checked.
pub type Route<'a> = GatewayPath<'a>;

/// route: `/v1/{provider}/{service}/{rest}`; anything else is 404, a path a provider
/// might resolve elsewhere (dot, empty or encoded separator segments) 400.
pub fn route(uri: &Uri) -> Result<Route<'_>, Refusal> {
    GatewayPath::route(uri.path()).map_err(|e| match e {
        PathError::NotGateway => Refusal::NOT_GATEWAY_PATH,
        PathError::Suspicious => Refusal::SUSPICIOUS_PATH,
    })
}

/// Where a routed request is served.
pub enum Target {
    /// Forwarded to the provider at this base URL.
    Url(String),
    /// Answered in-process.
    Builtin(&'static dyn Builtin),
}

/// By convention `/{service}/{id}/…` names the data subject; recorded even when access is refused.
pub fn path_subject(rest: &str) -> Option<String> {
    let first = rest.split('/').nth(1)?;
    let plausible = !first.is_empty()
        && first.len() <= 64
        && first
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    plausible.then(|| first.to_owned())
}

impl Gateway {
    /// Where the provider is served and the service's description, or 404.
    pub(crate) fn resolve<'p>(
        &self,
        policy: &'p Policy,
        route: &Route<'_>,
    ) -> Result<(Target, &'p Service), Refusal> {
        let provider = policy
            .provider(route.provider)
            .ok_or(Refusal::UNKNOWN_ROUTE)?;
        let service = policy
            .service(route.provider, route.service)
            .ok_or(Refusal::UNKNOWN_ROUTE)?;
        let target = match &provider.upstream {
            Upstream::Url(url) => Target::Url(url.trim_end_matches('/').to_owned()),
            Upstream::Builtin(name) => match builtin::find(name) {
                Some(b) => Target::Builtin(b),
                None => self
                    .builtin
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, url)| Target::Url(url.clone()))
                    .ok_or_else(|| {
                        tracing::warn!(provider = route.provider, builtin = %name, "built-in provider not running");
                        Refusal::PROVIDER_NOT_RUNNING
                    })?,
            },
        };
        Ok((target, service))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Result<Route<'_>, &'static str> {
        // Leak is fine in tests: a Uri that outlives the call.
        let uri: &'static Uri = Box::leak(Box::new(s.parse::<Uri>().unwrap()));
        route(uri).map_err(|e| e.reason)
    }

    #[test]
    fn routes_split_provider_service_rest() {
        let ok = r("/v1/registry/persons/RF-1/visas?x=1").unwrap();
        assert_eq!(
            (ok.provider, ok.service, ok.rest),
            ("registry", "persons", "/RF-1/visas")
        );
        let bare = r("/v1/registry/persons?document=X").unwrap();
        assert_eq!(bare.rest, "");
        assert_eq!(r("/v2/registry/persons"), Err("unknown_route"));
        assert_eq!(r("/v1/registry"), Err("unknown_route"));
        assert_eq!(r("/v1/registry/persons/../crossings"), Err("bad_path"));
        assert_eq!(r("/v1/registry/persons/%2e%2e/x"), Err("bad_path"));
        assert_eq!(r("/v1/registry/persons//x"), Err("bad_path"));
    }

    #[test]
    fn short_forms_stand_for_gateway_paths() {
        let c = r("/v1/consents/abc/revoke").unwrap();
        assert_eq!(
            (c.provider, c.service, c.rest),
            ("gateway", "consents", "/abc/revoke")
        );
        assert_eq!(r("/v1/consents").unwrap().rest, "");
        assert!(r("/v1/consentsx/a").is_ok_and(|x| x.provider == "consentsx"));
        assert_eq!(path_subject("/RF-0000001/visas"), Some("RF-0000001".into()));
        assert_eq!(path_subject(""), None);
    }
}
