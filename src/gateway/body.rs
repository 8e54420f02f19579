//! The request's head and body: the bounds a head is held to before anything
//! reads it, and the reading of a write's body within its limit and its time.
//!
//! Both are checked by the pipeline rather than only by hyper, so that a
//! refusal is problem+json and recorded like any other.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::gateway::refusal::Refusal;
use crate::gateway::Gateway;

/// The documented bound on a request's head, in octets, as [`head_size`] counts it.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Header fields per request (hyper's own bound over HTTP/1.1, held to over HTTP/2 alike).
pub const MAX_HEADER_FIELDS: usize = 100;

/// A request's head as [`MAX_HEAD_BYTES`] counts it, the same over HTTP/1.1 and HTTP/2: the
/// request target (path and query), and each header field's name and value plus 32 octets
/// (HTTP/2's measure of a header list, RFC 9113 §6.5.2). An authority given as `:authority`
/// rather than `Host` counts as the `Host` field it stands for.
pub fn head_size(parts: &http::request::Parts) -> usize {
    let target = parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
    let fields: usize = parts
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 32)
        .sum();
    let authority = match parts.uri.authority() {
        Some(a) if !parts.headers.contains_key(header::HOST) => {
            "host".len() + a.as_str().len() + 32
        }
        _ => 0,
    };
    target + fields + authority
}

/// A request's head must be within the documented bounds and name one authority: exactly
/// one valid `Host` over HTTP/1.1, and where both `Host` and the request target (or HTTP/2's
/// `:authority`) name one, the same. Checked in the handler, so the refusal is
/// problem+json and recorded; hyper only enforces a bound twice as large (the listener, `src/runtime/listener.rs`).
pub(crate) fn request_head(parts: &http::request::Parts) -> Result<(), Refusal> {
    let too_large = |detail: &'static str| Refusal::HEADERS_TOO_LARGE.with_detail(detail);
    if parts.headers.len() > MAX_HEADER_FIELDS {
        return Err(too_large("the request has more than 100 header fields"));
    }
    if head_size(parts) > MAX_HEAD_BYTES {
        return Err(too_large(
            "the request's head exceeds 64 KiB (65,536 octets: the target, and each header field's name and value plus 32)",
        ));
    }
    let bad_host = |detail: &'static str| Refusal::BAD_HOST.with_detail(detail);
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(bad_host("the request carries more than one Host header"));
    }
    let Some(host) = host else {
        return match parts.version {
            http::Version::HTTP_11 => Err(bad_host("an HTTP/1.1 request must carry a Host header")),
            _ => Ok(()),
        };
    };
    let host = host
        .to_str()
        .ok()
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .filter(|a| !a.as_str().contains('@'))
        .ok_or_else(|| bad_host("the Host header is not a valid host name"))?;
    match parts.uri.authority() {
        Some(a) if !a.as_str().eq_ignore_ascii_case(host.as_str()) => Err(bad_host(
            "the Host header and the request's authority name different hosts",
        )),
        _ => Ok(()),
    }
}

/// Why a request body was not read.
#[derive(Debug, PartialEq, Eq)]
enum BodyError {
    /// Over the limit, declared or found on reading.
    TooLarge,
    /// Bad chunked framing, a length the data does not match, or a body cut short.
    Malformed,
}

/// Reads a request body up to `max` bytes; one declared larger is refused before it is read.
async fn read_body<B>(body: &mut B, headers: &HeaderMap, max: usize) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    if declared_length(headers).is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut read = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| BodyError::Malformed)?.into_data() else {
            continue; // trailers
        };
        if read.len() + data.len() > max {
            return Err(BodyError::TooLarge);
        }
        read.extend_from_slice(&data);
    }
    Ok(read.freeze())
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// The most of a refused body still read and dropped, and for how long.
const DRAIN_BYTES: u64 = 4 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// Reads the rest of a refused body and drops it, up to [`DRAIN_BYTES`] within [`DRAIN_TIME`].
///
/// A client that sends its whole body before it reads the answer would otherwise meet a
/// reset stream (HTTP/2) or a reset connection (HTTP/1.1) instead of the 413. A body
/// declared larger than the bound, or sent only after `Expect: 100-continue`, is not read.
async fn drain<B>(body: &mut B, headers: &HeaderMap)
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let expects = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects || declared_length(headers).is_some_and(|n| n > DRAIN_BYTES) {
        return;
    }
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut left = DRAIN_BYTES;
        while let Some(Ok(frame)) = body.frame().await {
            let n = frame.data_ref().map_or(0, |d| d.len() as u64);
            match left.checked_sub(n) {
                Some(l) => left = l,
                None => return,
            }
        }
    })
    .await;
}

impl Gateway {
    /// Reads a write's body: at most the grant's limit (capped by the gateway's), within the
    /// body timeout. A body refused as too large is first read on and dropped, within a bound,
    /// so that the refusal reaches a client still sending it ([`drain`]).
    pub(crate) async fn read_body(
        &self,
        mut body: Incoming,
        headers: &HeaderMap,
        grant_max: Option<usize>,
    ) -> Result<Bytes, Refusal> {
        let max = grant_max.map_or(self.limits.max_body_bytes, |g| {
            g.min(self.limits.max_body_bytes)
        });
        let read =
            tokio::time::timeout(self.limits.body_timeout, read_body(&mut body, headers, max))
                .await;
        match read {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(BodyError::TooLarge)) => {
                drain(&mut body, headers).await;
                Err(Refusal::BODY_TOO_LARGE)
            }
            Ok(Err(BodyError::Malformed)) => Err(Refusal::BODY_MALFORMED),
            Err(_) => {
                // A slow upload holds a connection; it gets the header timeout's treatment.
                self.metrics.overload("gateway", "body_timeout");
                Err(Refusal::BODY_TIMEOUT)
            }
        }
    }
}
