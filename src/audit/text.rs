//! Bounded text for the log: how long, and what kind of, caller-controlled
//! text may reach an audit record, and how a value that does not fit is
//! shown and stored.
//!
//! One hostile value must never make a batch of records fail (PostgreSQL
//! refuses an index row over ~2.7 kB and any NUL in text) nor forge rows in
//! a terminal. So the gateway refuses values over the limits below with a
//! problem that is itself recorded, with the value [`shorten`]ed; and the log
//! caps whatever it is handed anyway ([`STORED_INDEXED_CHARS`],
//! [`STORED_TEXT_CHARS`]), whoever hands it over. Display code escapes
//! control characters with [`escape_for_display`].

use std::borrow::Cow;

/// Longest token `sub` (officer), `case` and `jti` accepted, in characters.
pub const MAX_CLAIM_CHARS: usize = 128;
/// Longest token `purpose` accepted, in characters (purpose codes are short).
pub const MAX_PURPOSE_CHARS: usize = 64;
/// Longest request path with its query accepted, in characters (longer: 414).
pub const MAX_PATH_CHARS: usize = 2048;
/// Longest value of one auditors' API query parameter, in characters.
pub const MAX_QUERY_VALUE_CHARS: usize = 256;
/// Longest provider or service name a record keeps of an unknown route.
pub const MAX_NAME_CHARS: usize = 64;

/// What the log itself keeps of a value in an indexed column (agency,
/// officer, purpose, provider, service, each subject): at most 1 kB in UTF-8,
/// far below PostgreSQL's index row limit.
pub const STORED_INDEXED_CHARS: usize = 256;
/// What the log itself keeps of any other text value.
pub const STORED_TEXT_CHARS: usize = 4096;

/// Marks a value cut short.
const CUT: char = '…';

/// Why a value is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfit {
    /// Longer than `max` characters.
    TooLong {
        /// The limit.
        max: usize,
    },
    /// Holds a control character (C0, DEL, C1) or a line/paragraph separator.
    Control,
}

impl std::fmt::Display for Unfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unfit::TooLong { max } => write!(f, "is longer than {max} characters"),
            Unfit::Control => write!(f, "contains control characters"),
        }
    }
}

/// Whether `c` could break a line, a row or a terminal when shown raw.
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{061c}' | '\u{200e}' | '\u{200f}'
                | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// `Ok` when `value` has at most `max` characters and none of [`is_unsafe_char`].
pub fn check(value: &str, max: usize) -> Result<(), Unfit> {
    if value.len() > max && value.chars().count() > max {
        return Err(Unfit::TooLong { max });
    }
    if value.chars().any(is_unsafe_char) {
        return Err(Unfit::Control);
    }
    Ok(())
}

/// `value` as a record may keep it: unsafe characters escaped (`\u{1b}`),
/// cut to at most `max` characters with a trailing `…`.
pub fn shorten(value: &str, max: usize) -> Cow<'_, str> {
    if check(value, max).is_ok() {
        return Cow::Borrowed(value);
    }
    let escaped = escape_for_display(value);
    Cow::Owned(cut(&escaped, max).into_owned())
}

/// `value` cut to at most `max` characters (the last one `…`), nothing else changed.
pub fn cut(value: &str, max: usize) -> Cow<'_, str> {
    if value.len() <= max || value.chars().count() <= max {
        return Cow::Borrowed(value);
    }
    let mut out: String = value.chars().take(max.saturating_sub(1)).collect();
    out.push(CUT);
    Cow::Owned(out)
}

/// `value` with every [`is_unsafe_char`] and the backslash escaped, for a
/// terminal or a table: a value can neither end a row nor send an escape sequence.
pub fn escape_for_display(value: &str) -> Cow<'_, str> {
    if !value.chars().any(|c| c == '\\' || is_unsafe_char(c)) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked_shortened_and_escaped() {
        assert!(check("officer-1", 128).is_ok());
        assert_eq!(
            check(&"a".repeat(129), 128),
            Err(Unfit::TooLong { max: 128 })
        );
        assert!(
            check(&"ა".repeat(128), 128).is_ok(),
            "characters, not bytes"
        );
        assert_eq!(check("a\nb", 128), Err(Unfit::Control));
        assert_eq!(check("a\u{1b}[2Jb", 128), Err(Unfit::Control));
        assert_eq!(check("a\u{2028}b", 128), Err(Unfit::Control));
        assert_eq!(check("a\u{202e}b", 128), Err(Unfit::Control));
        let long = "x".repeat(5000);
        let s = shorten(&long, 128);
        assert_eq!(s.chars().count(), 128);
        assert!(s.ends_with('…'));
        assert_eq!(shorten("a\u{0}b\nc", 128), "a\\u{0}b\\nc");
        assert_eq!(escape_for_display("a\\b\tc\u{9b}"), "a\\\\b\\tc\\u{9b}");
        assert_eq!(cut("abc", 2), "a…");
        assert_eq!(cut("abc", 3), "abc");
    }
}
