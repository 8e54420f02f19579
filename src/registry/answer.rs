//! What every register endpoint answers with: the answer type, query
//! parameters, and the two rules every answer keeps — database errors are
//! logged here and shown only as `internal`, personal data is never cached.
//!
//! Shared by the routing ([`super::http`]), statistics and updates, so none
//! of them imports another.

use http::{header, HeaderValue, Response};

use crate::problem::{Body, Problem};

/// A register answer: a response, or the problem to answer instead.
pub(crate) type Answer = Result<Response<Body>, Problem>;

/// Logs a database error where it happened and hides it from the caller.
pub(crate) fn internal(err: sqlx::Error) -> Problem {
    tracing::error!(%err, "register database error");
    Problem::internal()
}

/// Personal data must not linger in shared caches.
pub(crate) fn private(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Query parameters, decoded, each at most once.
pub(crate) struct Params(Vec<(String, String)>);

impl Params {
    /// The value of `name`, if given (an empty value counts as not given).
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    /// Refuses any parameter not in `allowed`.
    pub(crate) fn only(&self, allowed: &[&str], hint: &str) -> Result<(), Problem> {
        match self.0.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            Some((k, _)) => Err(Problem::bad_request(format!(
                "unknown query parameter {k}: {hint}"
            ))),
            None => Ok(()),
        }
    }
}

/// Decodes `application/x-www-form-urlencoded` pairs; repeats are refused so no value is silently ignored.
pub(crate) fn parse_query(query: &str) -> Result<Params, Problem> {
    let mut out: Vec<(String, String)> = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let bad = || Problem::bad_request("the query string is not valid percent-encoded UTF-8");
        let k = crate::query::decode(k).ok_or_else(bad)?;
        let v = crate::query::decode(v).ok_or_else(bad)?;
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(Problem::bad_request(format!(
                "query parameter {k} is given twice"
            )));
        }
        out.push((k, v));
    }
    Ok(Params(out))
}
