//! Case references: the form an agency's case numbers take.
//!
//! A grant with `case_required = true` serves an officer only within a case,
//! so the case reference in the token is what each access is reviewed
//! against. A placeholder (`"-"`, `"null"`, a zero-width space, a NUL) names
//! no case, yet the check used to be "not empty". Each agency now states the
//! form of its case numbers (`case_format`, a regular expression matched
//! against the whole reference); without one, [`CaseFormat::Default`] accepts
//! the shape case numbers share across agencies and nothing else.

use regex::Regex;

/// Longest case reference accepted under any format (characters).
pub const MAX_CASE_REF: usize = 64;

/// The form of an agency's case references.
#[derive(Debug, Clone, Default)]
pub enum CaseFormat {
    /// 3 to 64 ASCII letters, digits and `-` `/` `.` `_`, starting with a
    /// letter or digit and holding at least one digit (`SSG-2026-0042`, `2026/117`).
    #[default]
    Default,
    /// The agency's own pattern, anchored at both ends (`^SSG-\d{4}-\d{1,6}$`).
    Pattern(Regex),
}

impl CaseFormat {
    /// Compiles an agency's `case_format`, anchoring it so it must match the whole reference.
    pub fn pattern(source: &str) -> Result<CaseFormat, String> {
        if source.trim().is_empty() {
            return Err("case_format must not be empty".to_owned());
        }
        let anchored = format!("^(?:{source})$");
        Regex::new(&anchored)
            .map(CaseFormat::Pattern)
            .map_err(|e| format!("case_format is not a valid regular expression: {e}"))
    }

    /// Whether `case_ref` is a case reference of this form.
    pub fn accepts(&self, case_ref: &str) -> bool {
        // Control and format characters (NUL, zero-width space) never belong to a case number.
        let visible = case_ref.chars().count() <= MAX_CASE_REF
            && !case_ref
                .chars()
                .any(|c| c.is_control() || c.is_whitespace() || is_invisible(c));
        visible
            && match self {
                CaseFormat::Default => default_shape(case_ref),
                CaseFormat::Pattern(re) => re.is_match(case_ref),
            }
    }

    /// The format in words, for denials and `policy explain`.
    pub fn describe(&self) -> String {
        match self {
            CaseFormat::Default => "3 to 64 letters, digits and - / . _, starting with a letter or digit and holding a digit".to_owned(),
            CaseFormat::Pattern(re) => {
                let s = re.as_str();
                let inner = s
                    .strip_prefix("^(?:")
                    .and_then(|x| x.strip_suffix(")$"))
                    .unwrap_or(s);
                format!("the pattern {inner}")
            }
        }
    }
}

fn default_shape(s: &str) -> bool {
    let b = s.as_bytes();
    (3..=MAX_CASE_REF).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'/' | b'.' | b'_'))
        && b.iter().any(u8::is_ascii_digit)
}

/// Zero-width and other format characters that render as nothing.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_not_case_numbers() {
        let d = CaseFormat::Default;
        for ok in ["SSG-2026-0042", "2026/117", "C.1_2", "MIA-7"] {
            assert!(d.accepts(ok), "{ok}");
        }
        for bad in [
            "",
            "-",
            "null",
            "NULL",
            "none",
            "n/a",
            "\u{200B}",
            "\0",
            "SSG-2026\0",
            "SSG\u{200B}-1",
            " 123",
            "12",
            "-123",
            "ССГ-1",
            &"1".repeat(65),
        ] {
            assert!(!d.accepts(bad), "{bad:?}");
        }
    }

    #[test]
    fn agency_patterns_match_the_whole_reference() {
        let p = CaseFormat::pattern(r"SSG-\d{4}-\d{1,6}").unwrap();
        assert!(p.accepts("SSG-2026-17"));
        assert!(!p.accepts("SSG-2026-17x"));
        assert!(!p.accepts("xSSG-2026-17"));
        assert!(!p.accepts("SSG-2026-17\u{200B}"));
        assert!(p.describe().contains(r"SSG-\d{4}-\d{1,6}"));
        // An alternation is anchored as a whole.
        let alt = CaseFormat::pattern("A-1|B-2").unwrap();
        assert!(alt.accepts("A-1") && alt.accepts("B-2") && !alt.accepts("A-1|B-2"));
        assert!(!alt.accepts("A-12"));
        assert!(CaseFormat::pattern("(").is_err());
        assert!(CaseFormat::pattern(" ").is_err());
    }
}
