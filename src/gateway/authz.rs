//! authz: what the policy allows. The decision for agency × service ×
//! operation × purpose, what the agency's shadow grants would have decided,
//! whether the request touches a restricted grant, the lookups a
//! pseudonymising grant does not serve, and the fields a request may name:
//! a write's body members and a query's `fields=` list.

use time::OffsetDateTime;

use crate::gateway::exchange::Exchange;
use crate::gateway::refusal::Refusal;
use crate::gateway::route::Route;
use crate::identity::token::Officer;
use crate::policy::{
    Allow, Decision, DecisionRequest, DenyReason, FieldSet, Operation, Policy, Service,
};

/// Who asks what, as the policy decides on it.
#[derive(Clone, Copy)]
pub struct Asked<'a> {
    /// The calling agency.
    pub agency: &'a str,
    /// The officer, with purpose and case.
    pub officer: &'a Officer,
    /// The provider and service asked.
    pub route: &'a Route<'a>,
    /// Read or write.
    pub operation: Operation,
}

impl Asked<'_> {
    fn request(&self) -> DecisionRequest<'_> {
        DecisionRequest {
            agency: self.agency,
            provider: self.route.provider,
            service: self.route.service,
            operation: self.operation,
            purpose: &self.officer.purpose,
            case_ref: self.officer.case_ref.as_deref(),
        }
    }
}

/// authz: records the shadow decision and a restricted interest, then decides;
/// under a pseudonymising grant, a lookup naming a person is refused before the provider is asked.
pub fn authorise(
    policy: &Policy,
    asked: Asked<'_>,
    service: &Service,
    query: Option<&str>,
    exchange: &mut Exchange,
) -> Result<Allow, Refusal> {
    let today = OffsetDateTime::now_utc().date();
    let req = asked.request();
    exchange.shadow(policy.decide_shadow(&req, today).map(|d| match d {
        Decision::Allow(_) => crate::audit::Decision::Allow,
        Decision::Deny(_) => crate::audit::Decision::Deny,
    }));
    // Set before deciding: a refused request under a restricted grant reveals as much as an allowed one.
    if restricted_service(policy, asked.agency, asked.route) {
        exchange.restrict();
    }
    let allow = match policy.decide(&req, today) {
        Decision::Allow(allow) => allow,
        Decision::Deny(DenyReason::CaseInvalid) => {
            let format = policy
                .agency(asked.agency)
                .map(|a| a.case_format.describe())
                .unwrap_or_default();
            return Err(
                Refusal::denied(DenyReason::CaseInvalid).with_detail(format!(
                    "{} Expected: {format}.",
                    DenyReason::CaseInvalid.detail()
                )),
            );
        }
        Decision::Deny(reason) => return Err(Refusal::denied(reason)),
    };
    // A grant that pseudonymises serves no lookup naming a person (`crate::policy::pseudonymity`).
    let pseudonymises = allow.transforms.pseudonymises();
    exchange.allowed(&allow.legal_basis, allow.restricted, pseudonymises);
    if pseudonymises {
        crate::policy::pseudonymity::check_lookup(service, asked.route.rest, query).map_err(
            |i| Refusal::IDENTIFYING_LOOKUP.with_detail(i.detail(asked.route.provider, service)),
        )?;
    }
    Ok(allow)
}

/// Whether any of the agency's grants for the service is marked `restricted` (kept out of subjects' reports for a while).
fn restricted_service(policy: &Policy, agency: &str, route: &Route<'_>) -> bool {
    policy.agency(agency).is_some_and(|a| {
        policy
            .grants_for(agency, route.provider, route.service)
            .iter()
            .any(|&i| a.grants.get(i).is_some_and(|g| g.restricted))
    })
}

/// A `fields=` list in the query is narrowed to the granted fields before it
/// reaches the provider (the answer is minimised anyway); a list naming no
/// granted field is refused by name rather than sent empty, which a provider
/// could read as "everything".
pub fn narrow_fields(query: Option<&str>, granted: &FieldSet) -> Result<Option<String>, Refusal> {
    let Some(query) = query else {
        return Ok(None);
    };
    if !query.split('&').any(|p| p.starts_with("fields=")) {
        return Ok(Some(query.to_owned()));
    }
    let mut parts = Vec::new();
    for pair in query.split('&') {
        let Some(list) = pair.strip_prefix("fields=") else {
            parts.push(pair.to_owned());
            continue;
        };
        let list = list.replace("%2C", ",").replace("%2c", ",");
        let asked: Vec<&str> = list.split(',').filter(|f| !f.is_empty()).collect();
        let kept: Vec<&str> = asked
            .iter()
            .copied()
            .filter(|f| granted.overlaps(f))
            .collect();
        if kept.is_empty() {
            let first = asked.first().copied().unwrap_or_default();
            let shown: String = first
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_')
                .take(64)
                .collect();
            return Err(Refusal::FIELD_NOT_ALLOWED.with_detail(format!(
                "none of the fields asked for (first: {shown:?}) is released to your agency by this grant"
            )));
        }
        parts.push(format!("fields={}", kept.join(",")));
    }
    Ok(Some(parts.join("&")))
}

/// Writes carry only what the grant allows: a body member outside the
/// grant's `fields` is refused by name before anything is forwarded. Returns
/// the parsed body (`None` when empty).
pub fn write_fields(
    body: &[u8],
    fields: &FieldSet,
    route: &Route<'_>,
) -> Result<Option<serde_json::Value>, Refusal> {
    fn outside(v: &serde_json::Value, path: &mut String, fields: &FieldSet) -> bool {
        match v {
            serde_json::Value::Object(map) if !map.is_empty() => map.iter().any(|(k, v)| {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                let found = outside(v, path, fields);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            serde_json::Value::Array(items) if items.iter().any(|x| x.is_object()) => {
                items.iter().any(|x| outside(x, path, fields))
            }
            // An empty object names no field inside it: granting any part of it suffices.
            serde_json::Value::Object(_) => !fields.overlaps(path),
            _ => !fields.covers(path),
        }
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .ok()
        .filter(serde_json::Value::is_object)
        .ok_or(Refusal::BODY_NOT_JSON)?;
    let mut path = String::new();
    if !value.as_object().is_some_and(|m| m.is_empty()) && outside(&value, &mut path, fields) {
        return Err(Refusal::FIELD_NOT_ALLOWED.with_detail(format!(
            "field {path:?} is not among the fields your agency may write to {}/{}; nothing was written",
            route.provider, route.service
        )));
    }
    Ok(Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn write_bodies_are_held_to_the_granted_fields() {
        let fields = FieldSet::from_paths(&["person_id", "employer.name", "tags"]);
        let route = Route {
            provider: "registry",
            service: "work_permits",
            rest: "",
        };
        let check = |body: &str| write_fields(body.as_bytes(), &fields, &route);
        assert!(check("").unwrap().is_none());
        assert!(check("{}").is_ok());
        assert!(check(r#"{"person_id":"P-1","employer":{"name":"X"},"tags":["a","b"]}"#).is_ok());
        assert!(check(r#"{"employer":[{"name":"X"},{"name":"Y"}]}"#).is_ok());
        let refused = |body: &str| {
            let r = check(body).unwrap_err();
            assert_eq!(r.status, StatusCode::FORBIDDEN);
            r.detail.into_owned()
        };
        assert!(refused(r#"{"person_id":"P-1","note":"x"}"#).contains("\"note\""));
        assert!(
            refused(r#"{"employer":{"name":"X","tax_id":"1"}}"#).contains("\"employer.tax_id\"")
        );
        assert!(refused(r#"{"employer":[{"name":"X"},{"tax_id":"1"}]}"#)
            .contains("\"employer.tax_id\""));
        // A granted path covers its subtree.
        assert!(check(r#"{"person_id":{"inner":1}}"#).is_ok());
        assert_eq!(check("[1]").unwrap_err().status, StatusCode::BAD_REQUEST);
        assert_eq!(
            check("not json").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn field_lists_are_narrowed_to_the_grant() {
        let granted = FieldSet::from_paths(&["id", "names", "visas.category"]);
        let n = |q: Option<&str>| narrow_fields(q, &granted).map_err(|r| r.reason);
        assert_eq!(n(None), Ok(None));
        assert_eq!(n(Some("document=X")), Ok(Some("document=X".into())));
        assert_eq!(
            n(Some("fields=id,personal_number,names.surname,visas&x=1")),
            Ok(Some("fields=id,names.surname,visas&x=1".into()))
        );
        assert_eq!(
            n(Some("fields=id%2Cdocuments")),
            Ok(Some("fields=id".into()))
        );
        assert_eq!(n(Some("fields=documents")), Err("field_not_allowed"));
        assert_eq!(n(Some("fields=")), Err("field_not_allowed"));
    }
}
