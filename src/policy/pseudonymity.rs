//! What a pseudonymising grant may ask: an agency that receives a service's
//! records only under pseudonyms must not be able to link a pseudonym to a
//! register id, a name or a document number by any route.
//!
//! The routes, and what closes each:
//!
//! - **Lookups that name a person.** `/{service}/{id}` returns the pseudonym
//!   of the id asked for, and a search by document number, or by name and
//!   birth date, returns the pseudonym of the person named. Under a grant
//!   that pseudonymises, the gateway serves only the service's collection
//!   path, with only the query parameters the providers table lists as
//!   selecting by released attributes (`pseudonymous_query`); `cursor` and
//!   `fields` are the gateway's own. Anything else is refused (403) and
//!   recorded, before the provider is asked.
//! - **Pagination cursors.** Sealed for every provider (`crate::gateway::release::cursor`).
//! - **The agency's own audit views.** The audit record of a pseudonymised
//!   read names the real subjects (the data subject's report and the
//!   supervisory authority need them); the agency's own view of it withholds
//!   them, and a subject filter does not match it (`crate::gateway::builtin::audit`).

use crate::policy::Service;

/// Query parameters the gateway handles itself and any grant may send.
const GATEWAY_PARAMS: [&str; 2] = [crate::policy::CURSOR_PARAM, crate::policy::FIELDS_PARAM];

/// A lookup a pseudonymising grant does not serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identifying {
    /// The path goes below the collection (`/{service}/{id}`, `/{service}/{id}/{kind}`).
    Path,
    /// A query parameter that does not select by released attributes (or cannot be decoded).
    Parameter(String),
}

impl Identifying {
    /// A sentence for the caller, naming what is allowed instead.
    pub fn detail(&self, provider: &str, service: &Service) -> String {
        let allowed: Vec<&str> = service
            .pseudonymous_query
            .iter()
            .map(String::as_str)
            .chain(GATEWAY_PARAMS)
            .collect();
        let what = match self {
            Identifying::Path => "name a record in the path".to_owned(),
            Identifying::Parameter(p) => format!("search by {p:?}"),
        };
        format!(
            "your agency receives {provider}/{} only under pseudonyms, so it may not {what}: \
             that would link a pseudonym to a person; list {provider}/{} with only these parameters: {}",
            service.id,
            service.id,
            allowed.join(", ")
        )
    }
}

/// Checks a request under a pseudonymising grant: the collection path, and
/// only parameters that select by released attributes.
pub fn check_lookup(service: &Service, rest: &str, query: Option<&str>) -> Result<(), Identifying> {
    if !rest.is_empty() && rest != "/" {
        return Err(Identifying::Path);
    }
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let raw = pair.split_once('=').map_or(pair, |(k, _)| k);
        // Providers decode names before matching them, so the check does too.
        let name = crate::query::decode(raw).ok_or_else(|| Identifying::Parameter(shown(raw)))?;
        let allowed =
            GATEWAY_PARAMS.contains(&name.as_str()) || service.pseudonymous_query.contains(&name);
        if !allowed {
            return Err(Identifying::Parameter(shown(&name)));
        }
    }
    Ok(())
}

/// A parameter name as it may be shown back: visible ASCII, bounded.
fn shown(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn persons() -> Service {
        Service {
            id: "persons".into(),
            title: "Persons".into(),
            operations: vec![crate::policy::Operation::Read],
            subject_field: "id".into(),
            collection: Some("results".into()),
            fields: None,
            pseudonymous_query: vec!["nationality".into(), "limit".into()],
        }
    }

    #[test]
    fn only_the_collection_and_listed_parameters_are_served() {
        let s = persons();
        assert_eq!(check_lookup(&s, "", None), Ok(()));
        assert_eq!(
            check_lookup(&s, "", Some("nationality=TR&limit=5&cursor=x&fields=id")),
            Ok(())
        );
        assert_eq!(
            check_lookup(&s, "/RF-0000001", None),
            Err(Identifying::Path)
        );
        assert_eq!(
            check_lookup(&s, "/RF-0000001/visas", None),
            Err(Identifying::Path)
        );
        for (q, p) in [
            ("document=X1", "document"),
            ("surname=Doe&birth_date=1990-01-01", "surname"),
            ("nationality=TR&born_from=1990-01-01", "born_from"),
            ("docu%6Dent=X1", "document"),
            ("%zz=1", "%zz"),
        ] {
            assert_eq!(
                check_lookup(&s, "", Some(q)),
                Err(Identifying::Parameter(p.into())),
                "{q}"
            );
        }
        let detail = Identifying::Parameter("document".into()).detail("registry", &s);
        assert!(
            detail.contains("nationality, limit, cursor, fields"),
            "{detail}"
        );
    }
}
