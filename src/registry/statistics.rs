//! Aggregate counts for official statistics: how many records of a kind, grouped
//! by a few attributes (nationality, year, type…), never a person.
//!
//! `GET /statistics?dataset=residence_permits&by=nationality,year[&from=2020&until=2025][&nationality=TR]`
//! answers `{"rows": [{"nationality": "TR", "year": 2024, "count": 810}, …]}`.
//! A dual national is counted once under each nationality; a stateless person
//! under `"nationality": null`.
//!
//! **Disclosure control: cell-key random rounding.** Leaving out small cells
//! is not enough: a suppressed cell is a coarse cell minus its finer ones, and
//! four such cells were recovered exactly that way. So every count is
//! published rounded to a multiple of [`ROUNDING_BASE`] (random rounding, as
//! Statistics Canada and Stats NZ publish census tables), and the rounding is
//! driven by a cell key (the method of the ABS TableBuilder and of Eurostat's
//! census tables): each record has a secret, permanent random key (`ckey`,
//! 32 bits); a cell's key is the sum of its records' keys mod 2³²; a count
//! `n = 5q + r` is published as `5q + 5` when the cell key, as a fraction of
//! 2³², is below `r/5`, else as `5q`. Then:
//!
//! - every published count is a multiple of 5, so any sum or difference of
//!   published counts is one too, and never equals a count of 1 to 4;
//! - the rounding is unbiased (expected value = true count) and consistent:
//!   the same records give the same cell key, so the same cell asked again,
//!   or through another query, gets the same answer, and averaging gains nothing;
//! - cells of fewer than [`MIN_CELL`] records are still left out.
//!
//! What it does not do: a published count differs from the true one by up to
//! 4, and a total from the sum of its parts by up to 4 per part; many
//! overlapping tables combined (by linear programming) narrow a suppressed
//! cell's range, though not to its value by differencing. The keys must stay
//! secret: they are stored only in the register's database.

use http::StatusCode;
use serde_json::{json, Map, Value};
use sqlx::Row;

use super::answer::{internal, private, Params};
use super::model;
use super::Registry;
use crate::problem::{json_response, Body, Problem};

/// Smallest true count shown; smaller cells are suppressed.
pub const MIN_CELL: i64 = 5;
/// Every published count is a multiple of this.
pub const ROUNDING_BASE: i64 = 5;
/// Record keys are uniform below this (2³²); a cell key is a sum of them modulo it.
pub const KEY_SPACE: i64 = 1 << 32;

/// The count published for a cell of `count` records whose keys sum to `key_sum`:
/// `None` when suppressed, else the count randomly rounded to [`ROUNDING_BASE`] by the cell key.
pub fn publish(count: i64, key_sum: i64) -> Option<i64> {
    if count < MIN_CELL {
        return None;
    }
    let cell_key = key_sum.rem_euclid(KEY_SPACE);
    let (q, r) = (count - count % ROUNDING_BASE, count % ROUNDING_BASE);
    // Up with probability r / base: cell_key / 2³² < r / base, in integers.
    let up =
        i128::from(cell_key) * i128::from(ROUNDING_BASE) < i128::from(r) * i128::from(KEY_SPACE);
    Some(if up { q + ROUNDING_BASE } else { q })
}

/// One dataset: the table, its date column, and the dimensions it can be grouped by.
struct Dataset {
    name: &'static str,
    table: &'static str,
    /// The column that places a record in time (`year`, `month`); `None` for persons.
    date: Option<&'static str>,
    /// Column naming the person (`id` for the persons table itself).
    person: &'static str,
    /// Dimension name → SQL expression over the record `r` (constants only).
    dims: &'static [(&'static str, &'static str)],
}

const DATASETS: &[Dataset] = &[
    Dataset {
        name: "persons",
        table: "reg_persons",
        date: None,
        person: "id",
        dims: &[
            ("sex", "r.sex"),
            ("birth_year", "substr(r.birth_date, 1, 4)"),
            ("birth_country", "r.birth_country"),
        ],
    },
    Dataset {
        name: "visas",
        table: "reg_visas",
        date: Some("valid_from"),
        person: "person_id",
        dims: &[("category", "r.category"), ("entries", "r.entries")],
    },
    Dataset {
        name: "residence_permits",
        table: "reg_residence_permits",
        date: Some("valid_from"),
        person: "person_id",
        dims: &[("type", "r.permit_type"), ("status", "r.status")],
    },
    Dataset {
        name: "work_permits",
        table: "reg_work_permits",
        date: Some("valid_from"),
        person: "person_id",
        dims: &[],
    },
    Dataset {
        name: "crossings",
        table: "reg_crossings",
        date: Some("at"),
        person: "person_id",
        dims: &[("point", "r.point"), ("direction", "r.direction")],
    },
    Dataset {
        name: "asylum_cases",
        table: "reg_asylum_cases",
        date: Some("applied_on"),
        person: "person_id",
        dims: &[("status", "r.status")],
    },
    Dataset {
        name: "entry_bans",
        table: "reg_entry_bans",
        date: Some("valid_from"),
        person: "person_id",
        dims: &[
            ("reason", "r.reason"),
            (
                "expulsion",
                "CASE WHEN r.expulsion <> 0 THEN 'true' ELSE 'false' END",
            ),
        ],
    },
];

/// Dimensions whose values are shown as numbers or booleans rather than text.
const NUMERIC: [&str; 2] = ["year", "birth_year"];

/// `GET /statistics`.
pub(crate) async fn answer(reg: &Registry, p: &Params) -> Result<http::Response<Body>, Problem> {
    p.only(
        &["dataset", "by", "from", "until", "nationality"],
        "ask with dataset, by, from, until and nationality",
    )?;
    let names: Vec<&str> = DATASETS.iter().map(|d| d.name).collect();
    let ds = p
        .get("dataset")
        .and_then(|n| DATASETS.iter().find(|d| d.name == n))
        .ok_or_else(|| {
            Problem::bad_request(format!("dataset must be one of: {}", names.join(", ")))
        })?;
    let mut available: Vec<(&str, String)> =
        vec![("nationality", "COALESCE(n.code, '')".to_owned())];
    if ds.name != "persons" {
        available.push(("sex", "p.sex".to_owned()));
    }
    if let Some(date) = ds.date {
        available.push(("year", format!("substr(r.{date}, 1, 4)")));
        available.push(("month", format!("substr(r.{date}, 1, 7)")));
    }
    available.extend(ds.dims.iter().map(|(n, e)| (*n, (*e).to_owned())));
    let by: Vec<&str> = match p.get("by") {
        None => Vec::new(),
        Some(list) => list.split(',').map(str::trim).collect(),
    };
    let mut exprs = Vec::new();
    for (i, b) in by.iter().enumerate() {
        let Some((_, expr)) = available.iter().find(|(n, _)| n == b) else {
            let dims: Vec<&str> = available.iter().map(|(n, _)| *n).collect();
            return Err(Problem::bad_request(format!(
                "by: {b} is not a dimension of {}; choose from: {}",
                ds.name,
                dims.join(", ")
            )));
        };
        if by[..i].contains(b) {
            return Err(Problem::bad_request(format!("by names {b} twice")));
        }
        exprs.push(expr.clone());
    }
    let year = |name: &str| -> Result<Option<i32>, Problem> {
        p.get(name)
            .map(|v| {
                v.parse::<i32>()
                    .ok()
                    .filter(|y| (1900..=9999).contains(y))
                    .ok_or_else(|| Problem::bad_request(format!("{name} must be a year")))
            })
            .transpose()
    };
    let (from, until) = (year("from")?, year("until")?);
    if (from.is_some() || until.is_some()) && ds.date.is_none() {
        return Err(Problem::bad_request(format!(
            "{} has no date to filter by",
            ds.name
        )));
    }
    let nationality = p.get("nationality").unwrap_or_default();
    if !nationality.is_empty() && !model::is_country(nationality) {
        return Err(Problem::bad_request(
            "nationality must be an ISO 3166-1 alpha-2 code",
        ));
    }

    // Everything spliced in below is a constant of this module; the caller's values are bound.
    let uses_nationality = by.contains(&"nationality") || !nationality.is_empty();
    let mut sql = String::from("SELECT ");
    for (i, e) in exprs.iter().enumerate() {
        sql.push_str(&format!("{e} AS d{i}, "));
    }
    sql.push_str(&format!(
        "COUNT(*) AS n, CAST(SUM(r.ckey) AS BIGINT) AS k FROM {} r",
        ds.table
    ));
    if uses_nationality {
        sql.push_str(&format!(
            " LEFT JOIN reg_person_nationalities n ON n.person_id = r.{}",
            ds.person
        ));
    }
    if by.contains(&"sex") && ds.name != "persons" {
        sql.push_str(" JOIN reg_persons p ON p.id = r.person_id");
    }
    let date = ds.date.unwrap_or("id");
    sql.push_str(&format!(
        " WHERE ($1 = '' OR r.{date} >= $1) AND ($2 = '' OR r.{date} < $2) \
         AND ($3 = '' OR n.code = $3)"
    ));
    if !exprs.is_empty() {
        let cols: Vec<String> = (0..exprs.len()).map(|i| format!("d{i}")).collect();
        sql.push_str(&format!(
            " GROUP BY {} ORDER BY {}",
            exprs.join(", "),
            cols.join(", ")
        ));
    }
    if !uses_nationality {
        // Keep `$3` bound and harmless when the nationality table is not joined.
        sql = sql.replace("($3 = '' OR n.code = $3)", "($3 = '')");
    }
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(from.map(|y| format!("{y:04}")).unwrap_or_default())
        .bind(until.map(|y| format!("{:04}", y + 1)).unwrap_or_default())
        .bind(nationality.to_owned())
        .fetch_all(reg.store.pool())
        .await
        .map_err(internal)?;
    let mut out = Vec::new();
    for row in rows {
        let count: i64 = row.try_get(exprs.len()).map_err(internal)?;
        let key_sum: Option<i64> = row.try_get(exprs.len() + 1).map_err(internal)?;
        let Some(count) = publish(count, key_sum.unwrap_or(0)) else {
            continue;
        };
        let mut cell = Map::new();
        for (i, b) in by.iter().enumerate() {
            let v: String = row.try_get(i).map_err(internal)?;
            let value = if *b == "nationality" && v.is_empty() {
                Value::Null
            } else if NUMERIC.contains(b) {
                v.parse::<i64>().map_or(Value::String(v), Value::from)
            } else if *b == "expulsion" {
                Value::Bool(v == "true")
            } else {
                Value::String(v)
            };
            cell.insert((*b).to_owned(), value);
        }
        cell.insert("count".to_owned(), Value::from(count));
        out.push(Value::Object(cell));
    }
    Ok(private(json_response(
        StatusCode::OK,
        &json!({ "rows": out }),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_counts_are_multiples_of_the_base_and_small_cells_vanish() {
        for n in 0..MIN_CELL {
            assert_eq!(publish(n, 12345), None);
        }
        for n in MIN_CELL..200 {
            for key in [0, 1, KEY_SPACE / 3, KEY_SPACE - 1, -7, 3 * KEY_SPACE + 5] {
                let p = publish(n, key).unwrap();
                assert_eq!(p % ROUNDING_BASE, 0, "{n} -> {p}");
                assert!((p - n).abs() < ROUNDING_BASE, "{n} -> {p}");
                assert!(p >= MIN_CELL);
            }
        }
        // Exact multiples are published as they are, whatever the key.
        assert_eq!(publish(35, KEY_SPACE - 1), Some(35));
    }

    #[test]
    fn rounding_is_unbiased_over_cell_keys() {
        // Cell keys spread evenly over the key space: the mean published count is the true one.
        let steps = 10_000_i64;
        for n in [6_i64, 7, 8, 9, 13] {
            let total: i64 = (0..steps)
                .map(|i| publish(n, i * (KEY_SPACE / steps)).unwrap())
                .sum();
            let mean = total as f64 / steps as f64;
            assert!((mean - n as f64).abs() < 0.01, "{n}: mean {mean}");
        }
    }
}
