//! Console sessions: an officer token exchanged for a short-lived cookie.
//!
//! Sessions live in this process's memory (one node; a restart signs everyone
//! out). Each ends after `console.idle_timeout` unused, after
//! `console.absolute_timeout`, when its token expires, or at sign-out —
//! whichever comes first. The token is kept with the session and presented
//! to the pipeline on every page, which verifies it again: a session never
//! outlives what its token allows. A token signs in once (its `jti` is
//! remembered until it expires), so a one-time sign-in URL stays one-time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::identity::token::Officer;
use crate::identity::PeerCert;

/// The session cookie's name.
pub const COOKIE: &str = "karibche_console";
/// The sign-in form's cookie (a double-submit token against login CSRF).
pub const SIGNIN_COOKIE: &str = "karibche_signin";

/// One signed-in officer.
#[derive(Debug, Clone)]
pub struct Session {
    /// The cookie's secret value.
    pub id: String,
    /// The token every state-changing form must carry back.
    pub csrf: String,
    /// The agency whose key signed the token.
    pub agency: String,
    /// Officer, purpose and case, as the token states them.
    pub officer: Officer,
    /// The token itself, presented to the pipeline on every page.
    pub token: String,
    /// The client certificate the officer signed in with, if the console asks for one.
    pub client: Option<PeerCert>,
    /// Last use.
    last: Instant,
    /// The session ends at this instant whatever its use.
    ends: Instant,
}

/// The sessions of this node, bounded.
#[derive(Debug)]
pub struct Sessions {
    idle: Duration,
    absolute: Duration,
    max: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<String, Session>,
    /// Token ids that have signed in, with when they stop mattering (the token's expiry).
    used: HashMap<String, Instant>,
}

/// Why a sign-in was not accepted (beyond the token's own verification).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignInError {
    /// The token has no `jti`, so it could sign in again and again.
    #[error("the token has no id (jti); the console accepts only tokens that can be used once")]
    NoTokenId,
    /// The token signed in before.
    #[error("this token has already been used to sign in; issue a new one")]
    Replayed,
    /// Too many sessions at once.
    #[error("too many sessions on this node; try again later")]
    Full,
}

impl Sessions {
    /// Sessions with these expiries, at most `max` at once.
    pub fn new(idle: Duration, absolute: Duration, max: usize) -> Sessions {
        Sessions {
            idle,
            absolute,
            max,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves only plain maps behind: keep serving.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Opens a session for a verified token that expires in `token_left`.
    pub fn open(
        &self,
        agency: &str,
        officer: Officer,
        token: String,
        token_left: Duration,
        client: Option<PeerCert>,
    ) -> Result<Session, SignInError> {
        let now = Instant::now();
        let jti = officer.token_id.clone().ok_or(SignInError::NoTokenId)?;
        let mut inner = self.lock();
        inner.sweep(now, self.idle);
        if inner.used.contains_key(&jti) {
            return Err(SignInError::Replayed);
        }
        if inner.by_id.len() >= self.max {
            return Err(SignInError::Full);
        }
        inner.used.insert(jti, now + token_left);
        let session = Session {
            id: random_hex(32),
            csrf: random_hex(32),
            agency: agency.to_owned(),
            officer,
            token,
            client,
            last: now,
            ends: now + self.absolute.min(token_left),
        };
        inner.by_id.insert(session.id.clone(), session.clone());
        Ok(session)
    }

    /// The live session with this cookie value, its idle clock restarted; an expired one is ended.
    pub fn touch(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let mut inner = self.lock();
        let alive = inner
            .by_id
            .get(id)
            .is_some_and(|s| now < s.ends && now.duration_since(s.last) < self.idle);
        if !alive {
            inner.by_id.remove(id);
            return None;
        }
        let s = inner.by_id.get_mut(id)?;
        s.last = now;
        Some(s.clone())
    }

    /// Ends a session (sign-out, or its token refused by the pipeline).
    pub fn close(&self, id: &str) {
        self.lock().by_id.remove(id);
    }

    /// Sessions open now.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn sweep(&mut self, now: Instant, idle: Duration) {
        self.by_id
            .retain(|_, s| now < s.ends && now.duration_since(s.last) < idle);
        self.used.retain(|_, until| now < *until);
    }
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    // The system's generator failing leaves zeros; refuse to hand those out as secrets.
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        tracing::error!("random generator failed; console secret not created");
        return String::new();
    }
    hex::encode(bytes)
}

/// Compares two secrets in constant time.
pub fn same_secret(a: &str, b: &str) -> bool {
    !a.is_empty()
        && aws_lc_rs::constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).is_ok()
}

/// The value of the cookie `name` in a `Cookie` header.
pub fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A `Set-Cookie` value: HttpOnly, Secure, SameSite=Strict, for the whole console.
pub fn set_cookie(name: &str, value: &str, max_age: Option<Duration>) -> String {
    let age = max_age.map_or(String::new(), |d| format!("; Max-Age={}", d.as_secs()));
    format!("{name}={value}; Path=/; HttpOnly; Secure; SameSite=Strict{age}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn officer(jti: &str) -> Officer {
        Officer {
            id: "o-1".into(),
            purpose: "supervision".into(),
            case_ref: None,
            token_id: Some(jti.into()),
        }
    }

    #[test]
    fn sessions_expire_and_tokens_sign_in_once() {
        // An absolute expiry long enough that a loaded machine still touches the session in time.
        let s = Sessions::new(Duration::from_secs(60), Duration::from_millis(500), 2);
        let a = s
            .open(
                "pdps",
                officer("j1"),
                "t".into(),
                Duration::from_secs(60),
                None,
            )
            .unwrap();
        assert!(s.touch(&a.id).is_some());
        assert_eq!(
            s.open(
                "pdps",
                officer("j1"),
                "t".into(),
                Duration::from_secs(60),
                None
            )
            .unwrap_err(),
            SignInError::Replayed
        );
        std::thread::sleep(Duration::from_millis(550));
        assert!(s.touch(&a.id).is_none(), "past the absolute expiry");
        let mut no_jti = officer("x");
        no_jti.token_id = None;
        assert_eq!(
            s.open("pdps", no_jti, "t".into(), Duration::from_secs(60), None)
                .unwrap_err(),
            SignInError::NoTokenId
        );
    }

    #[test]
    fn cookies_are_read_and_written_strictly() {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            http::HeaderValue::from_static("a=1; karibche_console=abc"),
        );
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "b"), None);
        let c = set_cookie(COOKIE, "v", None);
        assert!(c.contains("HttpOnly") && c.contains("Secure") && c.contains("SameSite=Strict"));
        assert!(same_secret("ab", "ab") && !same_secret("ab", "ac") && !same_secret("", ""));
    }
}
