//! Where a problem in a hand-edited file is: `file:line:column`.
//!
//! Every file an administrator writes — the policy files, the policy test
//! cases, the quota file `limits.toml` — reports its problems the same way,
//! all at once and each at its place, so an editor can jump to it. This room
//! holds that one way: the located error ([`PolicyError`]), the list of them
//! ([`PolicyErrors`]), the byte-offset → line/column conversion
//! ([`line_column`]) and the [`Reporter`] that collects errors for one file.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in the policy files, located at `file:line:column` (1-based; 0 when the whole file is at fault).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", Located(self))]
pub struct PolicyError {
    /// The file, as the policy directory joined with the file's relative path.
    pub file: PathBuf,
    /// 1-based line, or 0 when no position applies (the file is missing or unreadable).
    pub line: usize,
    /// 1-based column in characters, or 0 with `line`.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

struct Located<'a>(&'a PolicyError);

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = self.0;
        if e.line == 0 {
            write!(f, "{}: {}", e.file.display(), e.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                e.file.display(),
                e.line,
                e.column,
                e.message
            )
        }
    }
}

/// Every problem found in a policy set; displays one `file:line:col: message` per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// 1-based line and character column of a byte offset (past the end: the end; inside a character: its start).
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// A problem with a whole file (missing, unreadable): no line or column.
pub fn whole_file(file: &Path, message: impl Into<String>) -> PolicyError {
    PolicyError {
        file: file.to_path_buf(),
        line: 0,
        column: 0,
        message: message.into(),
    }
}

/// Collects errors for one file, turning byte spans into line and column.
pub struct Reporter<'a> {
    file: &'a Path,
    text: &'a str,
    errors: &'a mut Vec<PolicyError>,
}

impl<'a> Reporter<'a> {
    /// Reports problems in `file`, whose content is `text`, into `errors`.
    pub fn new(file: &'a Path, text: &'a str, errors: &'a mut Vec<PolicyError>) -> Reporter<'a> {
        Reporter { file, text, errors }
    }

    /// The file problems are reported in.
    pub fn file(&self) -> &Path {
        self.file
    }

    /// Line and column where `span` starts.
    pub fn line_column(&self, span: Range<usize>) -> (usize, usize) {
        line_column(self.text, span.start)
    }

    /// Reports `message` at the start of `span`.
    pub fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = self.line_column(span);
        self.errors.push(PolicyError {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
        });
    }

    /// Reports a file that is not valid TOML (or not of the expected shape) where the parser stopped.
    pub fn toml_error(&mut self, e: &toml::de::Error) {
        self.at(e.span().unwrap_or(0..0), e.message().trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_characters() {
        let text = "a = 1\nბ = \"x\"\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        // "ბ" is three bytes; the `=` after it is the 3rd character.
        assert_eq!(line_column(text, 10), (2, 3));
        assert_eq!(line_column(text, 999), (3, 1));
    }
}
