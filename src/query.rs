//! Query components as the gateway and the register read and write them:
//! `application/x-www-form-urlencoded`, strictly. One decoder for every room
//! that reads a query (the auditors' API, the pseudonymity check, the
//! register) and one encoder for every one that writes one (sealed cursors,
//! the load generator), on the `percent-encoding` crate of rust-url.
//!
//! Strict means a malformed escape (`%zz`, `%+1`, a lone `%`) or bytes that
//! are not UTF-8 make the component unreadable, where a lenient decoder would
//! pass them through: a value the gateway checks must be the value the
//! provider reads.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Everything but RFC 3986's unreserved characters is escaped.
const RESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// One component decoded (`+` is a space); `None` if an escape is malformed or the bytes are not UTF-8.
pub fn decode(s: &str) -> Option<String> {
    let well_formed = s.match_indices('%').all(|(i, _)| {
        s.get(i + 1..i + 3)
            .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
    });
    if !well_formed {
        return None;
    }
    let spaced = s.replace('+', " ");
    let decoded = percent_decode_str(&spaced).decode_utf8().ok()?;
    Some(decoded.into_owned())
}

/// One component encoded: everything but RFC 3986's unreserved characters escaped.
pub fn encode(s: &str) -> String {
    utf8_percent_encode(s, RESERVED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_decode_strictly() {
        assert_eq!(decode("a+b%20c%2B").as_deref(), Some("a b c+"));
        assert_eq!(
            decode("2026-01-01T00%3A00%3A00Z").as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
        assert_eq!(decode("%E1%83%92").as_deref(), Some("გ"));
        for bad in ["%zz", "%+1", "%", "a%4", "%%41", "%FF"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn components_round_trip() {
        for s in ["RF-0000042", "a b&c=d/é", "~._-", "გიორგი"] {
            assert_eq!(decode(&encode(s)).as_deref(), Some(s));
        }
        assert_eq!(encode("a b/~"), "a%20b%2F~");
    }
}
