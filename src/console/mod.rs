//! The web console: security officers search and follow the audit log,
//! administrators read the policy as loaded, and a public-service-hall
//! officer prints a data subject's report — in a browser, on a listener of
//! its own (`[console]`), over TLS.
//!
//! ```text
//! browser ──TLS──▶ console listener ──▶ Console::handle
//!                    session cookie ─▶ session.rs (token kept, expiries)
//!                    every page with data ─▶ via.rs: GET /v1/audit/… or /v1/admin/…
//!                        through Gateway::handle_detached (authn, authz, limit, audit)
//!                    pages.rs (security officers, the subject's report),
//!                    admin.rs (administrators, the chains): the answer as HTML
//!                        (askama), charts as SVG (charts-rs)
//! ```
//!
//! Nothing here decides who may see what: every page that shows data is an
//! auditors' API read ([`crate::gateway::builtin::audit`]) or an
//! administrators' API read ([`crate::gateway::builtin::admin`]) made with
//! the officer's own token, decided by the policy, held to the officer's
//! quotas and recorded like any API read. A page the policy does not allow
//! the officer is the API's refusal (403), with its audit record's id. Only
//! the empty forms (search, person, report) and sign-in read nothing.
//!
//! Browser rules: a strict Content-Security-Policy (no inline script or
//! style; the one script and style sheet are files in the binary), a CSRF
//! token on every form that posts, cookies `HttpOnly; Secure;
//! SameSite=Strict`, `no-store` everywhere. A data subject's id never goes
//! into a console URL: person, report and search forms post it, and it
//! reaches the log only as the API records it.

pub mod admin;
pub mod pages;
pub mod session;
pub mod via;

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::config::ConsoleConfig;
use crate::gateway::Gateway;
use crate::identity::ConnInfo;
use crate::problem::Body;
use session::{Session, Sessions};

/// The Content-Security-Policy of every console answer.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'";

/// The largest form a browser may post to the console.
pub const MAX_FORM_BYTES: usize = 64 * 1024;

const CSS: &[u8] = include_bytes!("assets/console.css");
const JS: &[u8] = include_bytes!("assets/console.js");

/// The console's state: the gateway it reads through, and its sessions.
pub struct Console {
    /// The gateway whose pipeline every log read passes.
    pub gateway: Arc<Gateway>,
    /// Signed-in officers (this node's memory).
    pub sessions: Sessions,
    /// Whether officers present their agency's client certificate here too.
    pub require_client_certificate: bool,
}

/// A request to the console, as the router hands it to a page.
pub struct Visit<'a> {
    /// The connection (peer address, client certificate).
    pub conn: &'a ConnInfo,
    /// The signed-in officer.
    pub session: Session,
    /// The query string's pairs (GET) or the form's (POST).
    pub params: Vec<(String, String)>,
}

impl Visit<'_> {
    /// The parameter `name`, or empty.
    pub fn get(&self, name: &str) -> String {
        param(&self.params, name)
    }
}

/// The value of `name` among decoded pairs, or empty.
pub fn param(params: &[(String, String)], name: &str) -> String {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default()
}

impl Console {
    /// A console over `gateway` with the sessions `settings` describe.
    pub fn new(gateway: Arc<Gateway>, settings: &ConsoleConfig) -> Arc<Console> {
        Arc::new(Console {
            gateway,
            sessions: Sessions::new(
                settings.idle_timeout,
                settings.absolute_timeout,
                settings.max_sessions,
            ),
            require_client_certificate: settings.require_client_certificate,
        })
    }

    /// Answers one browser request; never panics on input.
    pub async fn handle(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let mut resp = self.route(&conn, req).await;
        secure(&mut resp);
        resp
    }

    async fn route(&self, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or_default().to_owned();
        let headers = req.headers().clone();
        match (&method, path.as_str()) {
            (&Method::GET, "/assets/console.css") => return asset(CSS, "text/css; charset=utf-8"),
            (&Method::GET, "/assets/console.js") => {
                return asset(JS, "text/javascript; charset=utf-8")
            }
            (&Method::GET, "/signin") => return pages::signin_form(None),
            _ => {}
        }
        let params = if method == Method::POST {
            match read_form(req).await {
                Some(p) => p,
                None => return plain(StatusCode::BAD_REQUEST, "malformed or oversized form"),
            }
        } else if method == Method::GET {
            match parse_pairs(&query) {
                Some(p) => p,
                None => return plain(StatusCode::BAD_REQUEST, "malformed query string"),
            }
        } else {
            return plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "the console answers GET and POST",
            );
        };
        if (&method, path.as_str()) == (&Method::POST, "/signin") {
            return pages::signin(self, conn, &headers, &params).await;
        }
        let Some(session) =
            session::cookie(&headers, session::COOKIE).and_then(|id| self.sessions.touch(id))
        else {
            return pages::signin_form(Some("Please sign in (no session, or it has expired)."));
        };
        if method == Method::POST && !session::same_secret(&param(&params, "csrf"), &session.csrf) {
            return plain(
                StatusCode::FORBIDDEN,
                "this form did not come from your console session (CSRF token missing or wrong)",
            );
        }
        let visit = Visit {
            conn,
            session,
            params,
        };
        match (&method, path.as_str()) {
            (&Method::GET, "/") => redirect(pages::home(&visit.session)),
            (&Method::POST, "/signout") => pages::signout(self, &visit).await,
            (&Method::GET, "/search") => pages::search_form(&visit),
            (&Method::POST, "/search") => pages::search(self, &visit).await,
            (&Method::GET, "/record") => pages::record(self, &visit).await,
            (&Method::GET, "/person") => pages::person_form(&visit),
            (&Method::POST, "/person") => pages::person(self, &visit).await,
            (&Method::GET, "/report") => pages::report_form(&visit),
            (&Method::POST, "/report") => pages::report(self, &visit).await,
            (&Method::GET, "/signals") => pages::signals(self, &visit).await,
            (&Method::GET, "/charts") => pages::charts(self, &visit).await,
            (&Method::GET, "/policy") => page(admin::policy(self, &visit).await),
            (&Method::POST, "/explain") => page(admin::explain(self, &visit).await),
            (&Method::GET, "/chains") => page(admin::chains(self, &visit, false).await),
            (&Method::POST, "/chains") => page(admin::chains(self, &visit, true).await),
            (&Method::GET, "/reloads") => page(admin::reloads(self, &visit).await),
            (&Method::GET, "/shadow") => page(admin::shadow(self, &visit).await),
            (&Method::GET, "/certificates") => page(admin::certificates(self, &visit).await),
            (&Method::GET, "/providers") => page(admin::providers(self, &visit).await),
            (&Method::GET, "/latency") => page(admin::latency(self, &visit).await),
            _ => plain(StatusCode::NOT_FOUND, "no such console page"),
        }
    }
}

/// The page, or the answer that stands in for it.
fn page(p: admin::Page) -> Response<Body> {
    p.unwrap_or_else(|refused| refused)
}

/// Headers every console answer carries.
fn secure(resp: &mut Response<Body>) {
    let h = resp.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "strict-transport-security",
        HeaderValue::from_static("max-age=31536000"),
    );
}

/// A static file of the binary.
fn asset(bytes: &'static [u8], content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from_static(bytes)));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A short plain-text answer.
pub fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// `303 See Other` to a console page.
pub fn redirect(to: &'static str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SEE_OTHER;
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    resp
}

/// An HTML page.
pub fn html(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

/// The posted form's pairs; `None` when it is too large, not a form, or malformed.
async fn read_form(req: Request<Incoming>) -> Option<Vec<(String, String)>> {
    let form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form {
        return None;
    }
    let body = Limited::new(req.into_body(), MAX_FORM_BYTES)
        .collect()
        .await
        .ok()?
        .to_bytes();
    parse_pairs(std::str::from_utf8(&body).ok()?)
}

/// `a=1&b=2` decoded; `None` if an escape is malformed.
pub fn parse_pairs(s: &str) -> Option<Vec<(String, String)>> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((crate::query::decode(k)?, crate::query::decode(v)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_strictly() {
        let p = parse_pairs("subject=RF-1&x=a+b&csrf=").unwrap();
        assert_eq!(param(&p, "subject"), "RF-1");
        assert_eq!(param(&p, "x"), "a b");
        assert_eq!(param(&p, "missing"), "");
        assert!(parse_pairs("a=%zz").is_none());
    }
}
