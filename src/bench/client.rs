//! The load generator's client side: mutual TLS, then HTTP/1.1 or HTTP/2.
//!
//! An [`Endpoint`] holds the rustls client configuration (the client
//! certificate, the CA, ALPN for the chosen protocol, resumption on or off)
//! and opens [`Conn`]s: TCP, the TLS handshake, then a hyper client
//! connection whose driver runs in its own task. An HTTP/1.1 connection
//! carries one request at a time (keep-alive); an HTTP/2 connection is
//! cloned to carry many streams at once.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::Resumption;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{BenchError, Protocol};

/// Where and how to connect.
#[derive(Clone)]
pub struct Endpoint {
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    protocol: Protocol,
}

/// Which step of a request failed, for the report's failure counts.
#[derive(Debug)]
pub enum SendError {
    /// TCP connect failed.
    Connect,
    /// The TLS handshake failed.
    Handshake,
    /// The HTTP exchange failed (connection closed, protocol error).
    Http,
}

impl SendError {
    /// The failure's name in reports.
    pub fn kind(&self) -> &'static str {
        match self {
            SendError::Connect => "connect",
            SendError::Handshake => "handshake",
            SendError::Http => "http",
        }
    }
}

impl Endpoint {
    /// A client presenting `cert`/`key`, trusting `ca`; `resume` keeps TLS sessions for resumption.
    pub fn new(
        addr: SocketAddr,
        ca: &Path,
        cert: &Path,
        key: &Path,
        protocol: Protocol,
        resume: bool,
    ) -> Result<Endpoint, BenchError> {
        let roots = crate::identity::tls::roots(&crate::files::load_certs(ca)?)?;
        let mut tls = ClientConfig::builder_with_provider(crate::identity::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(crate::identity::tls::TlsError::from)?
            .with_root_certificates(roots)
            .with_client_auth_cert(
                crate::files::load_certs(cert)?,
                crate::files::load_key(key)?,
            )
            .map_err(crate::identity::tls::TlsError::from)?;
        tls.alpn_protocols = vec![match protocol {
            Protocol::Http1 => b"http/1.1".to_vec(),
            Protocol::Http2 => b"h2".to_vec(),
        }];
        if !resume {
            tls.resumption = Resumption::disabled();
        }
        Ok(Endpoint {
            addr,
            tls: Arc::new(tls),
            protocol,
        })
    }

    /// The address requests go to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn tls(&self) -> Result<(TlsStream<TcpStream>, bool), SendError> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|_| SendError::Connect)?;
        let _ = tcp.set_nodelay(true);
        // The development certificates name localhost; the address may be any loopback one.
        let name = ServerName::try_from("localhost").map_err(|_| SendError::Handshake)?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|_| SendError::Handshake)?;
        let resumed = matches!(
            tls.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
        Ok((tls, resumed))
    }

    /// Only a TLS handshake, then a clean close (`close_notify`); true when the session was resumed.
    pub async fn handshake(&self) -> Result<bool, SendError> {
        let (mut tls, resumed) = self.tls().await?;
        // TLS 1.3 sends session tickets after the handshake: read until the server closes,
        // so they are stored for resumption and the server sees a complete exchange.
        tls.shutdown().await.map_err(|_| SendError::Http)?;
        let mut sink = [0u8; 1024];
        loop {
            match tls.read(&mut sink).await {
                Ok(0) => return Ok(resumed),
                Ok(_) => {}
                // A server may close without close_notify once it has read ours.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(resumed),
                // An alert: the server refused the client certificate after all.
                Err(_) => return Err(SendError::Handshake),
            }
        }
    }

    /// Opens a connection: TCP, TLS (full or resumed), HTTP.
    pub async fn connect(&self) -> Result<Conn, SendError> {
        let (tls, resumed) = self.tls().await?;
        let io = TokioIo::new(tls);
        let sender = match self.protocol {
            Protocol::Http1 => {
                let (sender, conn) = http1::handshake(io).await.map_err(|_| SendError::Http)?;
                tokio::spawn(conn);
                Sender::H1(sender)
            }
            Protocol::Http2 => {
                let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|_| SendError::Http)?;
                tokio::spawn(conn);
                Sender::H2(sender)
            }
        };
        Ok(Conn {
            sender,
            resumed,
            authority: format!("localhost:{}", self.addr.port()),
        })
    }
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// One open connection.
pub struct Conn {
    sender: Sender,
    /// Whether its TLS handshake resumed an earlier session.
    pub resumed: bool,
    authority: String,
}

/// One request to send: method, path (with query), optional JSON body.
#[derive(Debug, Clone)]
pub struct Call {
    /// GET or POST.
    pub method: http::Method,
    /// Path and query, e.g. `/v1/registry/persons/RF-0000001`.
    pub path: String,
    /// JSON body for writes.
    pub body: Option<Bytes>,
}

/// One answer, read whole.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its `X-Request-Id`: the gateway's audit record of the request.
    pub request_id: Option<uuid::Uuid>,
    /// Its body.
    pub body: Bytes,
}

impl Conn {
    /// Another handle on the same connection (HTTP/2 only: a new stream each request).
    pub fn share(&self) -> Option<Conn> {
        match &self.sender {
            Sender::H1(_) => None,
            Sender::H2(s) => Some(Conn {
                sender: Sender::H2(s.clone()),
                resumed: self.resumed,
                authority: self.authority.clone(),
            }),
        }
    }

    /// Sends one request with `token` and reads the whole answer.
    pub async fn send(&mut self, call: &Call, token: &str) -> Result<Answer, SendError> {
        // HTTP/2 carries the authority in the URI; HTTP/1.1 in the Host header.
        let uri = match &self.sender {
            Sender::H1(_) => call.path.clone(),
            Sender::H2(_) => format!("https://{}{}", self.authority, call.path),
        };
        let mut req = Request::builder()
            .method(call.method.clone())
            .uri(uri)
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        if matches!(self.sender, Sender::H1(_)) {
            req = req.header(http::header::HOST, self.authority.as_str());
        }
        let body = match &call.body {
            Some(b) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                b.clone()
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(body)).map_err(|_| SendError::Http)?;
        let resp = match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await.map_err(|_| SendError::Http)?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready().await.map_err(|_| SendError::Http)?;
                s.send_request(req).await
            }
        }
        .map_err(|_| SendError::Http)?;
        let status = resp.status();
        let request_id = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| uuid::Uuid::parse_str(v).ok());
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|_| SendError::Http)?
            .to_bytes();
        Ok(Answer {
            status,
            request_id,
            body,
        })
    }
}
