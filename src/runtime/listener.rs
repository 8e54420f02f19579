//! The accept loops every listener shares, and the bounds they enforce.
//!
//! Every TLS listener (the gateway's and the register's) runs [`serve_tls`]:
//! a semaphore caps connections (and per agency, [`ConnectionCaps`]), a
//! connection over a cap is still told why (one 503) while few are, the
//! handshake has its own timeout, hyper's header-read timeout bounds slow
//! clients, an idle connection is closed, and a new TLS configuration (a
//! CRL, say) closes connections so clients re-handshake under it. At
//! shutdown the listener stops accepting, lets requests in flight finish
//! within a grace period, and returns. The admin endpoint is plain HTTP/1.1
//! ([`serve_plain`]).

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::connections::ConnectionCaps;
use super::shutdown::{stopped, Shutdown};
use crate::identity::tls::{noting_presented, ReloadableTls};
use crate::identity::{ConnInfo, PeerCert};
use crate::metrics::Metrics;
use crate::problem::{Body, Problem};

/// Failed handshakes logged at info per second and listener; the rest are
/// counted and the next line logged says how many were left out.
const HANDSHAKE_LOGS_PER_SECOND: u32 = 5;

/// Logs failed handshakes at info, at most [`HANDSHAKE_LOGS_PER_SECOND`], so
/// anyone who reaches the port cannot flood the log (every one is counted in `/metrics`).
struct HandshakeLog {
    budget: governor::DefaultDirectRateLimiter,
    suppressed: std::sync::atomic::AtomicU64,
}

impl HandshakeLog {
    fn new() -> HandshakeLog {
        let per_second = std::num::NonZeroU32::new(HANDSHAKE_LOGS_PER_SECOND)
            .unwrap_or(std::num::NonZeroU32::MIN);
        HandshakeLog {
            budget: governor::RateLimiter::direct(governor::Quota::per_second(per_second)),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn failed(
        &self,
        listener: &'static str,
        peer: std::net::SocketAddr,
        reason: &'static str,
        certificate: Option<&str>,
        err: &std::io::Error,
    ) {
        // A peer that hung up or reset mid-handshake (a scanner, a health probe, a client
        // giving up) says nothing about certificates: debug only, like before.
        if reason == "io" {
            tracing::debug!(listener, %peer, %err, "TLS handshake failed");
            return;
        }
        if self.budget.check().is_err() {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        tracing::info!(listener, %peer, reason, certificate, suppressed, %err, "TLS handshake failed");
    }
}

/// The `/metrics` reason of a failed handshake: what the peer's certificate or protocol got wrong.
fn handshake_reason(err: &std::io::Error) -> &'static str {
    use rustls::CertificateError as C;
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return "io";
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::InvalidCertificate(c) => match c {
            C::Revoked => "revoked",
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => "expired",
            C::UnknownIssuer => "unknown_ca",
            C::UnknownRevocationStatus
            | C::ExpiredRevocationList
            | C::ExpiredRevocationListContext { .. } => "revocation_unknown",
            _ => "bad_certificate",
        },
        rustls::Error::PeerIncompatible(_) => "incompatible",
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::InvalidMessage(_)
        | rustls::Error::PeerMisbehaved(_)
        | rustls::Error::InappropriateHandshakeMessage { .. }
        | rustls::Error::InappropriateMessage { .. } => "protocol",
        _ => "tls",
    }
}

/// Bounds applied to every connection of one listener.
#[derive(Debug, Clone)]
pub struct ListenLimits {
    /// Connections served at once; further ones are refused.
    pub max_connections: usize,
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for request headers.
    pub header_timeout: Duration,
    /// Time requests in flight get to finish at shutdown.
    pub shutdown_grace: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Connections per agency; `None` on listeners agencies do not use.
    pub per_agency: Option<Arc<ConnectionCaps>>,
}

/// Connections over a cap are still told why (a TLS handshake, then 503) while
/// there are at most this many of them at once; past that they are closed unanswered.
const REFUSING_AT_ONCE: usize = 64;

/// A connection's place: served, or only told it is over a cap (`refused`).
struct Admission {
    /// Held for the connection's life: a slot of the total cap, or of the refusals.
    _slot: tokio::sync::OwnedSemaphorePermit,
    refused: Option<&'static str>,
}

/// When a connection last had a request, and how many it has in flight (for the idle timeout).
struct Activity {
    state: std::sync::Mutex<(usize, std::time::Instant)>,
    served: std::sync::atomic::AtomicU64,
    ended: tokio::sync::Notify,
}

/// Marks a request in flight on its connection until dropped.
struct InFlight(Arc<Activity>);

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            state: std::sync::Mutex::new((0, std::time::Instant::now())),
            served: std::sync::atomic::AtomicU64::new(0),
            ended: tokio::sync::Notify::new(),
        })
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        if let Ok(mut st) = self.state.lock() {
            st.0 += 1;
        }
        InFlight(self.clone())
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Resolves once no request has been in flight for `idle` and at least `min_served` were answered.
    async fn idle(&self, idle: Duration, min_served: u64) {
        loop {
            let (in_flight, last) = match self.state.lock() {
                Ok(st) => *st,
                Err(_) => return,
            };
            if in_flight > 0 || self.served() < min_served {
                self.ended.notified().await;
                continue;
            }
            let since = last.elapsed();
            if since >= idle {
                return;
            }
            tokio::time::sleep(idle - since).await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut st) = self.0.state.lock() {
            st.0 = st.0.saturating_sub(1);
            st.1 = std::time::Instant::now();
        }
        self.0.served.fetch_add(1, Ordering::Relaxed);
        self.0.ended.notify_one();
    }
}

/// The answer on a connection over a cap.
fn over_capacity(detail: &'static str) -> Response<Body> {
    let mut resp = Problem::new(
        http::StatusCode::SERVICE_UNAVAILABLE,
        "over-capacity",
        "Service unavailable",
        detail,
    )
    .to_response();
    resp.headers_mut()
        .insert(http::header::RETRY_AFTER, http::HeaderValue::from(1u32));
    resp
}

/// The answer to a `HEAD`: the headers the `GET`'s answer has, its length included, and
/// no body. HTTP/1.1 drops the body of a `HEAD` answer by itself; HTTP/2 does not.
fn without_body(resp: Response<Body>) -> Response<Body> {
    use hyper::body::Body as _;
    let (mut parts, body) = resp.into_parts();
    if let Some(n) = body.size_hint().exact() {
        parts
            .headers
            .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(n));
    }
    Response::from_parts(parts, Body::default())
}

/// An HTTP version a TLS connection agreed on.
#[derive(Debug, Clone, Copy)]
enum Protocol {
    Http1,
    Http2,
}

/// A connection builder for one HTTP version, with the listener's bounds.
///
/// ALPN has chosen the version by the time hyper gets the connection (HTTP/2
/// over TLS requires it; no ALPN means HTTP/1.1), so hyper does not sniff the
/// first bytes: sniffing hands them back as a prefix, which doubles HTTP/1.1's
/// read buffer to 16 KiB for the connection's life.
fn protocol_builder(limits: &ListenLimits, protocol: Protocol) -> auto::Builder<TokioExecutor> {
    // The documented bound on a request's head (64 KiB) is held to exactly in the gateway's
    // handler, which answers 431 problem+json and records it (src/gateway/body.rs). hyper's own
    // bounds sit twice as high, so a request a little over the limit still reaches the
    // handler; only one over these gets hyper's bare 431 (or, on HTTP/2, for a header block
    // far larger still, the connection's end), counted as `header_too_large`.
    const HARD_HEAD_BOUND: usize = 2 * crate::gateway::MAX_HEAD_BYTES;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(HARD_HEAD_BOUND);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(HARD_HEAD_BOUND as u32);
    match protocol {
        Protocol::Http1 => builder.http1_only(),
        Protocol::Http2 => builder.http2_only(),
    }
}

/// Serves HTTP/1.1 and HTTP/2 over TLS on `listener` until `shutdown` turns true.
///
/// Every bound counts in `/metrics` when it acts: the total and per-agency
/// connection caps (the connection gets one 503, then is closed), the
/// handshake and header timeouts, oversized headers (hyper answers 431) and
/// the idle timeout. At shutdown the listener closes, idle connections close,
/// requests in flight finish within the grace period, and the rest are cut.
pub async fn serve_tls<H, F>(
    name: &'static str,
    listener: TcpListener,
    tls: Arc<ReloadableTls>,
    limits: ListenLimits,
    metrics: Arc<Metrics>,
    handler: H,
    shutdown: Shutdown,
) where
    H: Fn(Arc<ConnInfo>, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSING_AT_ONCE));
    let handshake_log = Arc::new(HandshakeLog::new());
    let mut conns = tokio::task::JoinSet::new();
    let builders = Arc::new([
        protocol_builder(&limits, Protocol::Http1),
        protocol_builder(&limits, Protocol::Http2),
    ]);
    let mut stop = shutdown.clone();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped(&mut stop) => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = name, %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        let admission = match slots.clone().try_acquire_owned() {
            Ok(p) => Admission {
                _slot: p,
                refused: None,
            },
            Err(_) => {
                metrics.overload(name, "connections_total");
                match refusing.clone().try_acquire_owned() {
                    Ok(p) => Admission {
                        _slot: p,
                        refused: Some(
                            "the gateway is serving its maximum of connections; retry shortly",
                        ),
                    },
                    Err(_) => {
                        tracing::debug!(listener = name, %peer, "connection closed unanswered: over capacity");
                        continue;
                    }
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.current());
        let mut replaced = tls.replaced();
        let handler = handler.clone();
        let metrics = metrics.clone();
        let handshake_log = handshake_log.clone();
        let builders = builders.clone();
        let limits = limits.clone();
        let mut shutdown = shutdown.clone();
        conns.spawn(async move {
            let (handshake, presented) = noting_presented(tokio::time::timeout(
                limits.handshake_timeout,
                acceptor.accept(stream),
            ))
            .await;
            let tls_stream = match handshake {
                Ok(Ok(s)) => s,
                Ok(Err(err)) => {
                    let reason = handshake_reason(&err);
                    metrics.handshake_failed(name, reason);
                    handshake_log.failed(name, peer, reason, presented.as_deref(), &err);
                    return;
                }
                Err(_) => {
                    metrics.handshake_failed(name, "timeout");
                    metrics.overload(name, "handshake_timeout");
                    tracing::debug!(listener = name, %peer, "TLS handshake timed out");
                    return;
                }
            };
            let client = tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|der| PeerCert::from_der(der));
            let mut refused = admission.refused;
            let _agency_slot = match (&limits.per_agency, refused) {
                (Some(caps), None) => match caps.admit(client.as_ref()) {
                    Ok(slot) => Some(slot),
                    Err(agency) => {
                        metrics.overload(name, "connections_agency");
                        tracing::info!(listener = name, %peer, agency, "connection refused: the agency holds its maximum of connections");
                        refused = Some("your agency holds its maximum of open connections; reuse or close one");
                        None
                    }
                },
                _ => None,
            };
            let info = Arc::new(ConnInfo {
                peer,
                client,
                pipelines: Arc::default(),
            });
            metrics.connection_opened(name);
            let activity = Activity::new();
            let svc = {
                let activity = activity.clone();
                service_fn(move |req: Request<Incoming>| {
                    let handler = handler.clone();
                    let info = info.clone();
                    let in_flight = activity.begin();
                    let head = req.method() == http::Method::HEAD;
                    async move {
                        let resp = match refused {
                            Some(detail) => over_capacity(detail),
                            // Unboxed: handlers hand out small futures (the gateway's
                            // awaits a task; the register boxes its own).
                            None => handler(info, req).await,
                        };
                        drop(in_flight);
                        Ok::<_, Infallible>(if head { without_body(resp) } else { resp })
                    }
                })
            };
            let builder = match tls_stream.get_ref().1.alpn_protocol() {
                Some(b"h2") => &builders[1],
                _ => &builders[0],
            };
            let conn = builder
                .serve_connection(TokioIo::new(tls_stream), svc)
                .into_owned();
            tokio::pin!(conn);
            // A refused connection gets its one answer, then closes; it never waits long for a request.
            let (idle, min_served) = match refused {
                Some(_) => (Duration::ZERO, 1),
                None => (limits.idle_timeout, 0),
            };
            let deadline = tokio::time::sleep(limits.header_timeout);
            tokio::pin!(deadline);
            let mut closing = false;
            let result = loop {
                tokio::select! {
                    r = conn.as_mut() => break r,
                    _ = stopped(&mut shutdown), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    // New TLS configuration (e.g. a CRL): close, so the client re-handshakes under it.
                    Ok(()) = replaced.changed(), if !closing => {
                        closing = true;
                        metrics.overload(name, "tls_reloaded");
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = activity.idle(idle, min_served), if !closing => {
                        closing = true;
                        if refused.is_none() {
                            metrics.overload(name, "idle_timeout");
                        }
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = &mut deadline, if refused.is_some() => break Ok(()),
                }
            };
            if let Err(err) = result {
                match err.downcast_ref::<hyper::Error>() {
                    // hyper's header timer also runs while HTTP/1.1 waits for the next request.
                    Some(e) if e.is_timeout() && activity.served() == 0 => {
                        metrics.overload(name, "header_timeout");
                        tracing::debug!(listener = name, %peer, "request headers too slow; connection closed");
                    }
                    Some(e) if e.is_timeout() => metrics.overload(name, "idle_timeout"),
                    Some(e) if e.is_parse_too_large() => {
                        metrics.overload(name, "header_too_large");
                        tracing::debug!(listener = name, %peer, "request headers too large");
                    }
                    _ => tracing::debug!(listener = name, %peer, %err, "connection ended with an error"),
                }
            }
            metrics.connection_closed(name);
            drop(admission);
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            listener = name,
            open = conns.len(),
            "connections still open after the grace period; closing them"
        );
        conns.shutdown().await;
    }
}

/// Serves plain HTTP/1.1 (the admin endpoint) until `shutdown` turns true.
pub async fn serve_plain<H, F>(listener: TcpListener, handler: H, mut shutdown: Shutdown)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.changed() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(err) => {
                    tracing::warn!(listener = "admin", %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let svc = service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(5))
            .serve_connection(TokioIo::new(stream), svc);
        let fut = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = fut.await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}
