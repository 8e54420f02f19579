//! Listeners and the whole system's lifecycle.
//!
//! [`start`] builds everything from a [`Config`] and bound listeners — PKI,
//! database, policies, audit writer, the register, the gateway, the admin
//! endpoint — and returns once all of it is ready; [`serve`] additionally
//! waits for a shutdown signal. Tests call [`start`] with `127.0.0.1:0`
//! listeners and talk to the real thing.
//!
//! Every TLS listener shares one accept loop ([`serve_tls`]): a semaphore caps
//! connections, the handshake has its own timeout, hyper's header-read timeout
//! bounds slow clients, and shutdown stops accepting, lets requests in flight
//! finish within a grace period, and returns.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::admin::Metrics;
use crate::identity::PeerCert;
use crate::problem::Body;

/// What is known about a connection before any request on it is read.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The remote address.
    pub peer: SocketAddr,
    /// The verified client certificate's identity facts.
    pub client: Option<PeerCert>,
}

/// Bounds applied to every connection of one listener.
#[derive(Debug, Clone)]
pub struct ListenLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for request headers.
    pub header_timeout: Duration,
    /// Time requests in flight get to finish at shutdown.
    pub shutdown_grace: Duration,
}

/// A receiver that turns true once the system should stop.
pub type Shutdown = watch::Receiver<bool>;

/// Serves HTTP/1.1 and HTTP/2 over TLS on `listener` until `shutdown` turns true.
pub async fn serve_tls<H, F>(
    name: &'static str,
    listener: TcpListener,
    tls: Arc<ArcSwap<ServerConfig>>,
    limits: ListenLimits,
    metrics: Arc<Metrics>,
    handler: H,
    mut shutdown: Shutdown,
) where
    H: Fn(Arc<ConnInfo>, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024);
    let builder = Arc::new(builder);
    loop {
        let permit = tokio::select! {
            _ = shutdown.changed() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.changed() => break,
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
        let _ = stream.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.load_full());
        let handler = handler.clone();
        let metrics = metrics.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = limits.handshake_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let tls_stream =
                match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(err)) => {
                        metrics.handshake_failed(name);
                        tracing::debug!(listener = name, %peer, %err, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        metrics.handshake_failed(name);
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
            let info = Arc::new(ConnInfo { peer, client });
            metrics.connection_opened(name);
            let svc = service_fn(move |req| {
                let handler = handler.clone();
                let info = info.clone();
                async move { Ok::<_, Infallible>(handler(info, req).await) }
            });
            let conn = builder
                .serve_connection(TokioIo::new(tls_stream), svc)
                .into_owned();
            if let Err(err) = watcher.watch(conn).await {
                tracing::debug!(listener = name, %peer, %err, "connection ended with an error");
            }
            metrics.connection_closed(name);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(listener = name, "connections still open after the grace period");
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
