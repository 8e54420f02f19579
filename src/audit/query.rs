//! Reading the log back: filtered queries for auditors and data subjects,
//! JSON-lines export, and counts.
//!
//! The SQL text is fixed; a filter only binds values (`$n IS NULL OR …`), so
//! no input ever reaches the SQL text. A subject filter starts from the
//! subject index, so a data subject's accesses are found without a scan.

use std::io::Write;

use super::record::{normalise_ts, Record, Row};
use super::AuditError;
use crate::store::Store;

/// Records fetched per query while exporting.
const EXPORT_PAGE: i64 = 1000;

/// Which records to return; every field that is set must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Records that name this data subject.
    pub subject: Option<String>,
    /// Requests by this agency.
    pub agency: Option<String>,
    /// Requests by this officer.
    pub officer: Option<String>,
    /// Requests to this provider.
    pub provider: Option<String>,
    /// Requests to this service (of any provider, unless `provider` is set too).
    pub service: Option<String>,
    /// Requests stating this purpose.
    pub purpose: Option<String>,
    /// `"allow"` or `"deny"`.
    pub decision: Option<String>,
    /// Requests at or after this time (RFC 3339).
    pub since: Option<String>,
    /// Requests before this time (RFC 3339).
    pub until: Option<String>,
    /// Records of this node's chain.
    pub node: Option<String>,
    /// Only records whose shadow decision differs from the enforced one (`audit query --shadow-diff`).
    pub shadow_diff: bool,
    /// At most this many records.
    pub limit: Option<i64>,
    /// Leave out records of restricted grants at or after this time (RFC 3339):
    /// the data subject's report sets it to now minus the report delay.
    pub hide_restricted_since: Option<String>,
}

/// Placeholders shared by both query forms: $1 subject, $2 agency, $3 officer,
/// $4 provider, $5 decision, $6 since, $7 until, $8 node, then the keyset
/// cursor after (ts, node, seq) = ($9, $10, $11), $12 the limit, and $13 set
/// (non-NULL) for records whose shadow decision differs from the enforced one,
/// $14 purpose, $15 service, $16 hides restricted records at or after that time.
macro_rules! filter_clauses {
    () => {
        " ($2 IS NULL OR l.agency = $2) \
          AND ($3 IS NULL OR l.officer = $3) \
          AND ($4 IS NULL OR l.provider = $4) \
          AND ($5 IS NULL OR l.decision = $5) \
          AND ($6 IS NULL OR l.ts >= $6) \
          AND ($7 IS NULL OR l.ts < $7) \
          AND ($8 IS NULL OR l.node = $8) \
          AND ($9 IS NULL OR l.ts > $9 OR (l.ts = $9 AND (l.node > $10 OR (l.node = $10 AND l.seq > $11)))) \
          AND ($13 IS NULL OR (l.shadow_decision IS NOT NULL AND l.shadow_decision <> l.decision)) \
          AND ($14 IS NULL OR l.purpose = $14) \
          AND ($15 IS NULL OR l.service = $15) \
          AND ($16 IS NULL OR l.restricted = 0 OR l.ts < $16) \
          ORDER BY l.ts, l.node, l.seq LIMIT $12"
    };
}

/// The selected columns: every stored one, and for an attempt how many outcomes name it
/// (an index lookup, only for attempts), so that an unknown outcome shows.
macro_rules! selected {
    () => {
        "SELECT l.*, CASE WHEN l.phase = 'attempt' THEN \
         (SELECT COUNT(*) FROM audit_log o WHERE o.attempt_id = l.id) END AS outcomes"
    };
}

/// The query without a subject filter ($1 is bound, always NULL).
const BY_COLUMNS: &str = concat!(
    selected!(),
    " FROM audit_log l WHERE $1 IS NULL AND",
    filter_clauses!()
);
/// The query for one data subject, driven by the subject index.
const BY_SUBJECT: &str = concat!(
    selected!(),
    " FROM audit_subjects s JOIN audit_log l ON l.node = s.node AND l.seq = s.seq \
     WHERE s.subject = $1 AND",
    filter_clauses!()
);

/// A filter with its times in stored form, checked once.
struct Bound<'a> {
    filter: &'a Filter,
    since: Option<String>,
    until: Option<String>,
    hide_restricted_since: Option<String>,
}

impl<'a> Bound<'a> {
    fn new(filter: &'a Filter) -> Result<Self, AuditError> {
        let ts = |name: &str, v: &Option<String>| -> Result<Option<String>, AuditError> {
            v.as_deref()
                .map(|s| {
                    normalise_ts(s).ok_or_else(|| {
                        AuditError::InvalidFilter(format!("{name} is not an RFC 3339 time"))
                    })
                })
                .transpose()
        };
        Ok(Bound {
            filter,
            since: ts("since", &filter.since)?,
            until: ts("until", &filter.until)?,
            hide_restricted_since: ts("hide_restricted_since", &filter.hide_restricted_since)?,
        })
    }

    /// One page of matching records after the cursor `(ts, node, seq)`.
    async fn page(
        &self,
        store: &Store,
        after: Option<(&str, &str, i64)>,
        limit: i64,
    ) -> Result<Vec<Record>, AuditError> {
        let f = self.filter;
        let sql = if f.subject.is_some() {
            BY_SUBJECT
        } else {
            BY_COLUMNS
        };
        let rows: Vec<Row> = sqlx::query_as(sql)
            .bind(f.subject.as_deref())
            .bind(f.agency.as_deref())
            .bind(f.officer.as_deref())
            .bind(f.provider.as_deref())
            .bind(f.decision.as_deref())
            .bind(self.since.as_deref())
            .bind(self.until.as_deref())
            .bind(f.node.as_deref())
            .bind(after.map(|a| a.0))
            .bind(after.map(|a| a.1))
            .bind(after.map(|a| a.2))
            .bind(limit.max(0))
            .bind(f.shadow_diff.then_some(1_i64))
            .bind(f.purpose.as_deref())
            .bind(f.service.as_deref())
            .bind(self.hide_restricted_since.as_deref())
            .fetch_all(store.pool())
            .await?;
        rows.into_iter()
            .map(|row| {
                let (node, seq) = (row.place().0.to_owned(), row.place().1);
                row.into_record()
                    .map_err(|reason| AuditError::Corrupt { node, seq, reason })
            })
            .collect()
    }
}

/// The records matching `filter`, ordered by ts, node, seq.
pub async fn query(store: &Store, filter: &Filter) -> Result<Vec<Record>, AuditError> {
    let bound = Bound::new(filter)?;
    bound
        .page(store, None, filter.limit.unwrap_or(i64::MAX))
        .await
}

/// Writes the records matching `filter` as JSON lines, one [`Record`] each,
/// in ts, node, seq order; returns how many were written.
pub async fn export<W: Write>(
    store: &Store,
    filter: &Filter,
    out: &mut W,
) -> Result<u64, AuditError> {
    export_paged(store, filter, out, EXPORT_PAGE).await
}

/// [`export`] reading `page_size` records per query.
pub(crate) async fn export_paged<W: Write>(
    store: &Store,
    filter: &Filter,
    out: &mut W,
    page_size: i64,
) -> Result<u64, AuditError> {
    let page_size = page_size.max(1);
    let bound = Bound::new(filter)?;
    let mut left = filter.limit.unwrap_or(i64::MAX).max(0);
    let mut written = 0_u64;
    let mut cursor: Option<(String, String, i64)> = None;
    while left > 0 {
        let after = cursor
            .as_ref()
            .map(|(ts, node, seq)| (ts.as_str(), node.as_str(), *seq));
        let page = bound.page(store, after, left.min(page_size)).await?;
        let Some(last) = page.last() else {
            break;
        };
        cursor = Some((last.entry.ts.clone(), last.node.clone(), last.seq));
        let full = page.len() as i64 == left.min(page_size);
        for record in &page {
            write_json_line(&mut *out, record)?;
        }
        written += page.len() as u64;
        left -= page.len() as i64;
        if !full {
            break;
        }
    }
    out.flush()?;
    Ok(written)
}

/// How many records the log holds, over all nodes.
pub async fn count(store: &Store) -> Result<i64, AuditError> {
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM audit_log")
        .fetch_one(store.pool())
        .await?)
}

/// How many records of requests the log holds, over all nodes (events such as `node-start` left out).
pub async fn count_requests(store: &Store) -> Result<i64, AuditError> {
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM audit_log WHERE method <> 'EVENT'")
            .fetch_one(store.pool())
            .await?,
    )
}

/// Writes `value` as one line of JSON. U+2028 and U+2029, which JSON allows
/// raw but JavaScript and many line readers take for line ends, are escaped,
/// so a value can never split or forge a line of an export.
pub fn write_json_line<W: Write, T: serde::Serialize + ?Sized>(
    out: &mut W,
    value: &T,
) -> Result<(), AuditError> {
    write_json(&mut *out, value)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// [`write_json_line`] without the line end (a JSON document).
pub fn write_json<W: Write, T: serde::Serialize + ?Sized>(
    out: &mut W,
    value: &T,
) -> Result<(), AuditError> {
    let mut ser = serde_json::Serializer::with_formatter(out, LineSafe);
    value.serialize(&mut ser)?;
    Ok(())
}

/// serde_json's compact format, with the line and paragraph separators escaped.
struct LineSafe;

impl serde_json::ser::Formatter for LineSafe {
    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut rest = fragment;
        while let Some(i) = rest.find(['\u{2028}', '\u{2029}']) {
            writer.write_all(&rest.as_bytes()[..i])?;
            let c = rest[i..].chars().next().unwrap_or('\u{2028}');
            writer.write_all(if c == '\u{2028}' {
                b"\\u2028"
            } else {
                b"\\u2029"
            })?;
            rest = &rest[i + c.len_utf8()..];
        }
        writer.write_all(rest.as_bytes())
    }
}

/// Writes records as an aligned table for people: one line each, newest last.
///
/// Every value is escaped for the terminal (`crate::audit::text`): a claim
/// holding a newline, a tab or an escape sequence shows as `\n`, `\t`,
/// `\u{1b}` and can neither forge a row nor drive the terminal.
pub fn write_table<W: Write>(records: &[Record], out: &mut W) -> std::io::Result<()> {
    const HEADER: [&str; 9] = [
        "TIME (UTC)",
        "RECORD",
        "ID",
        "AGENCY",
        "OFFICER",
        "PURPOSE",
        "REQUEST",
        "SUBJECTS",
        "OUTCOME",
    ];
    let rows: Vec<[String; 9]> = records
        .iter()
        .map(|r| {
            let e = &r.entry;
            let request = match (&e.provider, &e.service) {
                (Some(p), Some(s)) => format!("{} {p}/{s}", e.method),
                _ => format!("{} {}", e.method, e.path),
            };
            let mut outcome = match (e.phase.as_deref(), &e.attempt_id) {
                (Some(super::PHASE_ATTEMPT), _) if r.outcome_unknown => {
                    "attempt, OUTCOME UNKNOWN".to_owned()
                }
                (Some(super::PHASE_ATTEMPT), _) => "attempt".to_owned(),
                (_, Some(attempt)) => format!("{} {} for {attempt}", e.decision, e.status),
                _ => format!("{} {}", e.decision, e.status),
            };
            if let Some(reason) = &e.reason {
                outcome.push_str(&format!(" ({reason})"));
            }
            if let Some(shadow) = &e.shadow_decision {
                outcome.push_str(&format!(" shadow={shadow}"));
            }
            if e.restricted {
                outcome.push_str(" restricted");
            }
            let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
            let mut subjects = e.subjects.join(",");
            if subjects.chars().count() > 40 {
                subjects = subjects.chars().take(39).collect::<String>() + "…";
            }
            [
                e.ts.get(..19).unwrap_or(&e.ts).replace('T', " "),
                format!("{}#{}", r.node, r.seq),
                e.id.clone(),
                dash(&e.agency),
                dash(&e.officer),
                dash(&e.purpose),
                request,
                if subjects.is_empty() {
                    "-".to_owned()
                } else {
                    subjects
                },
                outcome,
            ]
            .map(|cell| super::text::escape_for_display(&cell).into_owned())
        })
        .collect();
    let mut widths = HEADER.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str], out: &mut W| -> std::io::Result<()> {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let pad = w.saturating_sub(cell.chars().count());
                text.push_str(cell);
                text.push_str(&" ".repeat(pad + 2));
            }
        }
        writeln!(out, "{}", text.trim_end())
    };
    line(&HEADER, out)?;
    for row in &rows {
        line(&row.each_ref().map(String::as_str), out)?;
    }
    Ok(())
}
