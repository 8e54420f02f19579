//! W3C Trace Context (`traceparent`, `tracestate`): the trace a request
//! belongs to, taken from the agency when the configuration trusts it
//! (`[tracing] trust_incoming`), generated otherwise, and passed on to the
//! provider with the gateway's own span as the parent.
//!
//! The trace id goes into the access log and the audit record, so one
//! request can be followed from the agency's logs through the gateway's to
//! the provider's. Only a well-formed `traceparent` is taken (version not
//! `ff`, ids not all zeros, lowercase hex); anything else starts a new trace.

use http::HeaderMap;

/// Longest `tracestate` passed on (the specification's 32 members of at most 256 bytes fit in 512 for real use).
const MAX_TRACESTATE: usize = 512;

/// The trace of one request through the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// The gateway's span for this request, 16 lowercase hex digits (the provider call's parent).
    pub span_id: String,
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
    /// The caller's `tracestate`, passed on unchanged when its `traceparent` was taken.
    pub state: Option<String>,
}

fn random_hex<const N: usize>() -> String {
    use aws_lc_rs::rand::SecureRandom;
    let mut bytes = [0u8; N];
    // The system's generator does not fail on Linux; a zero id would be refused by the next hop, so retry once with a UUID's randomness.
    if aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut bytes)
        .is_err()
        || bytes.iter().all(|b| *b == 0)
    {
        let uuid = uuid::Uuid::now_v7();
        for (b, u) in bytes.iter_mut().rev().zip(uuid.as_bytes().iter().rev()) {
            *b = *u | 1;
        }
    }
    hex::encode(bytes)
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `(trace id, flags)` of a well-formed `traceparent`, if it is one.
fn parse_traceparent(v: &str) -> Option<(String, u8)> {
    let mut parts = v.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four parts; later versions may add more.
    if !is_lower_hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !is_lower_hex(trace, 32) || trace.bytes().all(|b| b == b'0') {
        return None;
    }
    if !is_lower_hex(parent, 16) || parent.bytes().all(|b| b == b'0') {
        return None;
    }
    if !is_lower_hex(flags, 2) {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace.to_owned(), flags))
}

impl TraceContext {
    /// The request's trace: the caller's, when `trust` and its `traceparent` is well formed; a new one otherwise.
    pub fn from_headers(headers: &HeaderMap, trust: bool) -> TraceContext {
        let incoming = trust
            .then(|| headers.get("traceparent"))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        match incoming {
            Some((trace_id, flags)) => {
                let state = headers
                    .get("tracestate")
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
                    .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE)
                    .map(str::to_owned);
                TraceContext {
                    trace_id,
                    span_id: random_hex::<8>(),
                    flags,
                    state,
                }
            }
            None => TraceContext::new(),
        }
    }

    /// A new trace (sampled), for a request that brought none the gateway takes.
    pub fn new() -> TraceContext {
        TraceContext {
            trace_id: random_hex::<16>(),
            span_id: random_hex::<8>(),
            flags: 1,
            state: None,
        }
    }

    /// The `traceparent` the provider receives: this trace, the gateway's span as parent.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags)
    }
}

impl Default for TraceContext {
    fn default() -> Self {
        TraceContext::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(parent: &str, state: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("traceparent", parent.parse().expect("header"));
        if let Some(s) = state {
            h.insert("tracestate", s.parse().expect("header"));
        }
        h
    }

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_trusted_wellformed_traceparent_is_continued_with_a_new_span() {
        let t = TraceContext::from_headers(&headers(GOOD, Some("vendor=x")), true);
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(t.span_id, "00f067aa0ba902b7");
        assert_eq!(t.state.as_deref(), Some("vendor=x"));
        let out = t.traceparent();
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && out.ends_with("-01"),
            "{out}"
        );
        assert!(parse_traceparent(&out).is_some());
    }

    #[test]
    fn untrusted_or_malformed_traceparents_start_a_new_trace() {
        let untrusted = TraceContext::from_headers(&headers(GOOD, Some("vendor=x")), false);
        assert_ne!(untrusted.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(untrusted.state, None);
        for bad in [
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        let fresh = TraceContext::new();
        assert!(is_lower_hex(&fresh.trace_id, 32) && is_lower_hex(&fresh.span_id, 16));
    }
}
