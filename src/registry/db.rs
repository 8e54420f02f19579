//! The register's tables (`reg_*`): bulk inserts for seeding, reads for the
//! API, and the idempotency records of the write endpoints.
//!
//! Everything goes through sqlx's `Any` driver with `$n` placeholders, so the
//! same statements run on SQLite and PostgreSQL. Flags are stored as INTEGER
//! 0/1 on both, because `Any` cannot decode a SQLite integer as a bool.

use std::sync::LazyLock;

use sqlx::{AnyConnection, AssertSqlSafe};

use super::model::{
    AsylumCase, BirthPlace, Crossing, Document, Employer, EntryBan, Names, Person, ResidencePermit,
    Visa, WorkPermit, RECORD_KINDS,
};
use super::names::surname_key;
use crate::store::Backend;

/// How a column's value is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    Text,
    Int,
}

/// A table the register bulk-loads: its name and columns, in the order rows list them.
#[derive(Debug)]
pub(crate) struct Table {
    pub(crate) name: &'static str,
    pub(crate) cols: &'static [(&'static str, Ty)],
}

use Ty::{Int, Text};

pub(crate) const PERSONS: Table = Table {
    name: "reg_persons",
    cols: &[
        ("id", Text),
        ("personal_number", Text),
        ("surname", Text),
        ("given_names", Text),
        ("surname_ka", Text),
        ("given_names_ka", Text),
        ("surname_key", Text),
        ("sex", Text),
        ("birth_date", Text),
        ("birth_city", Text),
        ("birth_country", Text),
        ("nationalities", Text),
        ("stateless", Int),
    ],
};
pub(crate) const NATIONALITIES: Table = Table {
    name: "reg_person_nationalities",
    cols: &[("code", Text), ("person_id", Text)],
};
pub(crate) const DOCUMENTS: Table = Table {
    name: "reg_documents",
    cols: &[
        ("id", Text),
        ("person_id", Text),
        ("kind", Text),
        ("number", Text),
        ("issuing_state", Text),
        ("issued_on", Text),
        ("valid_until", Text),
    ],
};
pub(crate) const VISAS: Table = Table {
    name: "reg_visas",
    cols: &[
        ("id", Text),
        ("person_id", Text),
        ("number", Text),
        ("category", Text),
        ("issuing_post", Text),
        ("valid_from", Text),
        ("valid_until", Text),
        ("entries", Text),
    ],
};
pub(crate) const PERMITS: Table = Table {
    name: "reg_residence_permits",
    cols: &[
        ("id", Text),
        ("person_id", Text),
        ("number", Text),
        ("permit_type", Text),
        ("status", Text),
        ("valid_from", Text),
        ("valid_until", Text),
    ],
};
pub(crate) const WORK_PERMITS: Table = Table {
    name: "reg_work_permits",
    cols: &[
        ("id", Text),
        ("person_id", Text),
        ("number", Text),
        ("employer_name", Text),
        ("employer_tax_id", Text),
        ("position", Text),
        ("valid_from", Text),
        ("valid_until", Text),
    ],
};
pub(crate) const CROSSINGS: Table = Table {
    name: "reg_crossings",
    cols: &[
        ("id", Text),
        ("person_id", Text),
        ("direction", Text),
        ("point", Text),
        ("at", Text),
        ("document_number", Text),
    ],
};
pub(crate) const ASYLUM: Table = Table {
    name: "reg_asylum_cases",
    cols: &[
        ("id", Text),
        ("person_id", Text),
        ("case_number", Text),
        ("applied_on", Text),
        ("status", Text),
        ("decision_on", Text),
    ],
};
pub(crate) const BANS: Table = Table {
    name: "reg_entry_bans",
    cols: &[
        ("id", Text),
        ("person_id", Text),
        ("reason", Text),
        ("valid_from", Text),
        ("valid_until", Text),
        ("expulsion", Int),
    ],
};

/// Every table a person's records fill, parents first (for the foreign keys).
pub(crate) const PERSON_TABLES: [&Table; 9] = [
    &PERSONS,
    &NATIONALITIES,
    &DOCUMENTS,
    &VISAS,
    &PERMITS,
    &WORK_PERMITS,
    &CROSSINGS,
    &ASYLUM,
    &BANS,
];

/// Rows of one table as the JSON text of an array of row arrays, built directly (no
/// `serde_json::Value` per cell) by whoever generates them, so the loading task only binds it.
#[derive(Debug, Default)]
pub(crate) struct Rows {
    /// The rows as JSON, or as `COPY` text.
    text: Vec<u8>,
    n: usize,
    /// PostgreSQL `COPY … FROM STDIN` text (tab-separated lines) instead of JSON.
    copy: bool,
}

/// One cell of a row.
pub(crate) enum Cell<'a> {
    S(&'a str),
    O(Option<&'a str>),
    I(i64),
}

impl Rows {
    fn push(&mut self, cells: &[Cell<'_>]) {
        if self.copy {
            return self.push_copy(cells);
        }
        self.text.push(if self.n == 0 { b'[' } else { b',' });
        self.text.push(b'[');
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                self.text.push(b',');
            }
            match c {
                Cell::S(s) | Cell::O(Some(s)) => write_json_str(&mut self.text, s),
                Cell::O(None) => self.text.extend_from_slice(b"null"),
                Cell::I(i) => self.text.extend_from_slice(i.to_string().as_bytes()),
            }
        }
        self.text.push(b']');
        self.n += 1;
    }

    /// One line of `COPY` text format: cells separated by tabs, `\N` for NULL, and
    /// backslash, tab, newline and carriage return escaped.
    fn push_copy(&mut self, cells: &[Cell<'_>]) {
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                self.text.push(b'\t');
            }
            match c {
                Cell::S(s) | Cell::O(Some(s)) => {
                    for &b in s.as_bytes() {
                        match b {
                            b'\\' => self.text.extend_from_slice(b"\\\\"),
                            b'\t' => self.text.extend_from_slice(b"\\t"),
                            b'\n' => self.text.extend_from_slice(b"\\n"),
                            b'\r' => self.text.extend_from_slice(b"\\r"),
                            b => self.text.push(b),
                        }
                    }
                }
                Cell::O(None) => self.text.extend_from_slice(b"\\N"),
                Cell::I(i) => self.text.extend_from_slice(i.to_string().as_bytes()),
            }
        }
        self.text.push(b'\n');
        self.n += 1;
    }

    /// The `COPY` text of [`PersonRows::for_copy`] rows, or `None` without rows.
    pub(crate) fn finish_copy(self) -> Option<Vec<u8>> {
        (self.copy && self.n > 0).then_some(self.text)
    }

    /// The JSON text, or `None` without rows.
    fn finish(mut self) -> Option<String> {
        if self.n == 0 {
            return None;
        }
        self.text.push(b']');
        // Only valid UTF-8 went in: whole `&str`s, ASCII punctuation and digits.
        String::from_utf8(self.text).ok()
    }
}

/// Appends `s` as a JSON string; plain text (the common case) is copied in one go.
fn write_json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    // A plain loop: iterator adaptors cost several times more in unoptimised builds.
    let bytes = s.as_bytes();
    let mut plain = true;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b < 0x20 || b == b'"' || b == b'\\' {
            plain = false;
            break;
        }
        i += 1;
    }
    if plain {
        out.extend_from_slice(bytes);
    } else {
        for c in s.chars() {
            match c {
                '"' => out.extend_from_slice(b"\\\""),
                '\\' => out.extend_from_slice(b"\\\\"),
                c if (c as u32) < 0x20 => {
                    out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
                }
                c => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
    }
    out.push(b'"');
}

/// The rows of whole persons, one [`Rows`] per table in [`PERSON_TABLES`] order.
#[derive(Debug, Default)]
pub(crate) struct PersonRows {
    pub(crate) tables: [Rows; 9],
}

impl PersonRows {
    /// Empty rows encoded for PostgreSQL's `COPY` (the bulk load of [`super::seed`]).
    pub(crate) fn for_copy() -> PersonRows {
        let mut rows = PersonRows::default();
        for t in &mut rows.tables {
            t.copy = true;
        }
        rows
    }

    /// Adds a person and all their records.
    pub(crate) fn add(&mut self, p: &Person) {
        use Cell::{I, O, S};
        let key = surname_key(&p.names.surname);
        let nationalities = p.nationalities.join(",");
        let [persons, nats, docs, visas, permits, works, crossings, asylum, bans] =
            &mut self.tables;
        persons.push(&[
            S(&p.id),
            O(p.personal_number.as_deref()),
            S(&p.names.surname),
            S(&p.names.given_names),
            S(&p.names.surname_ka),
            S(&p.names.given_names_ka),
            S(&key),
            S(&p.sex),
            S(&p.birth_date),
            S(&p.birth_place.city),
            S(&p.birth_place.country),
            S(&nationalities),
            I(i64::from(p.stateless)),
        ]);
        for code in &p.nationalities {
            nats.push(&[S(code), S(&p.id)]);
        }
        for d in &p.documents {
            docs.push(&document_cells(&p.id, d));
        }
        for v in &p.visas {
            visas.push(&visa_cells(&p.id, v));
        }
        for r in &p.residence_permits {
            permits.push(&permit_cells(&p.id, r));
        }
        for w in &p.work_permits {
            works.push(&work_cells(&p.id, w));
        }
        for c in &p.crossings {
            crossings.push(&crossing_cells(c));
        }
        for a in &p.asylum_cases {
            asylum.push(&asylum_cells(&p.id, a));
        }
        for b in &p.entry_bans {
            bans.push(&ban_cells(&p.id, b));
        }
    }
}

pub(crate) fn document_cells<'a>(pid: &'a str, d: &'a Document) -> [Cell<'a>; 7] {
    use Cell::S;
    [
        S(&d.id),
        S(pid),
        S(&d.kind),
        S(&d.number),
        S(&d.issuing_state),
        S(&d.issued_on),
        S(&d.valid_until),
    ]
}

pub(crate) fn visa_cells<'a>(pid: &'a str, v: &'a Visa) -> [Cell<'a>; 8] {
    use Cell::S;
    [
        S(&v.id),
        S(pid),
        S(&v.number),
        S(&v.category),
        S(&v.issuing_post),
        S(&v.valid_from),
        S(&v.valid_until),
        S(&v.entries),
    ]
}

pub(crate) fn permit_cells<'a>(pid: &'a str, r: &'a ResidencePermit) -> [Cell<'a>; 7] {
    use Cell::S;
    [
        S(&r.id),
        S(pid),
        S(&r.number),
        S(&r.permit_type),
        S(&r.status),
        S(&r.valid_from),
        S(&r.valid_until),
    ]
}

pub(crate) fn work_cells<'a>(pid: &'a str, w: &'a WorkPermit) -> [Cell<'a>; 8] {
    use Cell::S;
    [
        S(&w.id),
        S(pid),
        S(&w.number),
        S(&w.employer.name),
        S(&w.employer.tax_id),
        S(&w.position),
        S(&w.valid_from),
        S(&w.valid_until),
    ]
}

pub(crate) fn crossing_cells(c: &Crossing) -> [Cell<'_>; 6] {
    use Cell::S;
    [
        S(&c.id),
        S(&c.person_id),
        S(&c.direction),
        S(&c.point),
        S(&c.at),
        S(&c.document_number),
    ]
}

pub(crate) fn asylum_cells<'a>(pid: &'a str, a: &'a AsylumCase) -> [Cell<'a>; 6] {
    use Cell::{O, S};
    [
        S(&a.id),
        S(pid),
        S(&a.case_number),
        S(&a.applied_on),
        S(&a.status),
        O(a.decision_on.as_deref()),
    ]
}

pub(crate) fn ban_cells<'a>(pid: &'a str, b: &'a EntryBan) -> [Cell<'a>; 6] {
    use Cell::{I, S};
    [
        S(&b.id),
        S(pid),
        S(&b.reason),
        S(&b.valid_from),
        S(&b.valid_until),
        I(i64::from(b.expulsion)),
    ]
}

/// One row of `table` as JSON rows, for the single-record writes.
pub(crate) fn one_row(cells: &[Cell<'_>]) -> Rows {
    let mut rows = Rows::default();
    rows.push(cells);
    rows
}

/// `INSERT … SELECT` from a JSON array of row arrays bound as one text parameter: one
/// parameter per statement instead of one per value (binding is what costs in sqlx), and the
/// database splits the rows in C. SQLite's `jsonb_each` hands each row over as a parsed blob,
/// so `->>` does not parse it again.
fn bulk_sql(backend: Backend, table: &Table) -> String {
    let cols: Vec<&str> = table.cols.iter().map(|(c, _)| *c).collect();
    let values: Vec<String> = table
        .cols
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| match (backend, ty) {
            (Backend::Sqlite, _) => format!("value ->> {i}"),
            (Backend::Postgres, Ty::Text) => format!("e ->> {i}"),
            (Backend::Postgres, Ty::Int) => format!("(e ->> {i})::integer"),
        })
        .collect();
    let source = match backend {
        Backend::Sqlite => "jsonb_each($1)",
        // jsonb: parsed once into a binary form, so `->>` indexes each row instead of re-reading its text.
        Backend::Postgres => "jsonb_array_elements($1::jsonb) AS e",
    };
    let (mut cols, mut values) = (cols, values);
    if KEYED_TABLES.contains(&table.name) {
        // Each record's secret statistics key, drawn by the database (src/registry/statistics.rs).
        cols.push("ckey");
        values.push(
            match backend {
                Backend::Sqlite => "random() & 4294967295",
                Backend::Postgres => "floor(random() * 4294967296)::bigint",
            }
            .to_owned(),
        );
    }
    format!(
        "INSERT INTO {} ({}) SELECT {} FROM {source}",
        table.name,
        cols.join(", "),
        values.join(", ")
    )
}

/// The tables whose records carry a statistics record key (`ckey`): those the statistics count.
const KEYED_TABLES: [&str; 7] = [
    "reg_persons",
    "reg_visas",
    "reg_residence_permits",
    "reg_work_permits",
    "reg_crossings",
    "reg_asylum_cases",
    "reg_entry_bans",
];

/// `COPY <table> (<columns>) FROM STDIN`: the bulk load of [`PersonRows::for_copy`] rows;
/// `ckey` is left to its column default (a random key drawn by the database).
pub(crate) fn copy_sql(table: &Table) -> String {
    let cols: Vec<&str> = table.cols.iter().map(|(c, _)| *c).collect();
    format!("COPY {} ({}) FROM STDIN", table.name, cols.join(", "))
}

/// Inserts `rows` into `table` in one statement.
pub(crate) async fn insert(
    conn: &mut AnyConnection,
    backend: Backend,
    table: &Table,
    rows: Rows,
) -> Result<(), sqlx::Error> {
    let Some(json) = rows.finish() else {
        return Ok(());
    };
    // Built from the constant table and column names above; the values travel as one bound JSON text.
    sqlx::query(AssertSqlSafe(bulk_sql(backend, table)))
        .bind(json)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Inserts whole persons with all their records.
pub(crate) async fn insert_persons(
    conn: &mut AnyConnection,
    backend: Backend,
    rows: PersonRows,
) -> Result<(), sqlx::Error> {
    for (table, rows) in PERSON_TABLES.iter().zip(rows.tables) {
        insert(conn, backend, table, rows).await?;
    }
    Ok(())
}

/// [`secondary_indexes`] on PostgreSQL: indexes that back no constraint.
pub(crate) const PG_SECONDARY_INDEXES: &str =
    "SELECT i.indexname::text, i.indexdef::text FROM pg_indexes i WHERE i.schemaname = current_schema() \
     AND i.tablename IN ('reg_persons', 'reg_person_nationalities', 'reg_documents', \
     'reg_visas', 'reg_residence_permits', 'reg_work_permits', 'reg_crossings', \
     'reg_asylum_cases', 'reg_entry_bans') \
     AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname) \
     ORDER BY i.indexname";

/// The secondary indexes of the person tables as `(name, CREATE statement)`, read from the
/// database's own catalogue so they can be dropped for a bulk load and recreated exactly.
pub(crate) async fn secondary_indexes(
    conn: &mut AnyConnection,
    backend: Backend,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    let sql = match backend {
        Backend::Sqlite => {
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL \
             AND tbl_name IN ('reg_persons', 'reg_person_nationalities', 'reg_documents', \
             'reg_visas', 'reg_residence_permits', 'reg_work_permits', 'reg_crossings', \
             'reg_asylum_cases', 'reg_entry_bans') ORDER BY name"
        }
        Backend::Postgres => PG_SECONDARY_INDEXES,
    };
    sqlx::query_as(sql).fetch_all(conn).await
}

/// The person's own row in the wide shape every record query shares: `k` is
/// the kind (0 for the person, then 1 + the index in
/// [`super::model::RECORD_KINDS`]), `s` the sort key within the kind, `c0`…`c10`
/// text columns and `n` the one integer column.
const PERSON_SELECT: &str = "SELECT 0 AS k, '' AS s, id AS c0, personal_number AS c1, \
    surname AS c2, given_names AS c3, surname_ka AS c4, given_names_ka AS c5, sex AS c6, \
    birth_date AS c7, birth_city AS c8, birth_country AS c9, nationalities AS c10, stateless AS n \
    FROM reg_persons WHERE id = $1";

/// One branch per record kind, in the order of [`super::model::RECORD_KINDS`], in the wide shape.
const RECORD_SELECTS: [&str; 7] = [
    "SELECT 1, issued_on, id, kind, number, issuing_state, issued_on, valid_until, \
     NULL, NULL, NULL, NULL, NULL, 0 FROM reg_documents WHERE person_id = $1",
    "SELECT 2, valid_from, id, number, category, issuing_post, valid_from, valid_until, entries, \
     NULL, NULL, NULL, NULL, 0 FROM reg_visas WHERE person_id = $1",
    "SELECT 3, valid_from, id, number, permit_type, status, valid_from, valid_until, \
     NULL, NULL, NULL, NULL, NULL, 0 FROM reg_residence_permits WHERE person_id = $1",
    "SELECT 4, valid_from, id, number, employer_name, employer_tax_id, position, valid_from, \
     valid_until, NULL, NULL, NULL, NULL, 0 FROM reg_work_permits WHERE person_id = $1",
    "SELECT 5, at, id, person_id, direction, point, at, document_number, \
     NULL, NULL, NULL, NULL, NULL, 0 FROM reg_crossings WHERE person_id = $1",
    "SELECT 6, applied_on, id, case_number, applied_on, status, decision_on, \
     NULL, NULL, NULL, NULL, NULL, NULL, 0 FROM reg_asylum_cases WHERE person_id = $1",
    "SELECT 7, valid_from, id, reason, valid_from, valid_until, \
     NULL, NULL, NULL, NULL, NULL, NULL, NULL, expulsion FROM reg_entry_bans WHERE person_id = $1",
];

/// Which record kinds a read wants.
/// The statement of every read, built once: one per record kind (in the
/// order of [`RECORD_SELECTS`]), then all kinds, then the person alone.
static FETCH_SQL: LazyLock<Vec<String>> = LazyLock::new(|| {
    let one_kind = RECORD_SELECTS.iter().map(std::slice::from_ref);
    one_kind
        .chain([&RECORD_SELECTS[..], &[][..]])
        .map(|branches| {
            let mut sql = String::from(PERSON_SELECT);
            for branch in branches {
                sql.push_str(" UNION ALL ");
                sql.push_str(branch);
            }
            sql.push_str(" ORDER BY k, s, c0");
            sql
        })
        .collect()
});

#[derive(Debug, Clone, Copy)]
enum Kinds<'a> {
    All,
    /// One of [`super::model::RECORD_KINDS`]; any other name reads no records.
    One(&'a str),
}

/// The person with the records of `kinds` (the others left empty), or `None`.
///
/// One statement (a `UNION ALL` of the wide branches), not one per kind:
/// sqlx runs every SQLite statement on the connection's worker thread, so
/// each statement costs a round of context switches.
async fn fetch(
    conn: &mut AnyConnection,
    id: &str,
    kinds: Kinds<'_>,
) -> Result<Option<Person>, sqlx::Error> {
    use sqlx::Row;

    let n = RECORD_SELECTS.len();
    let which = match kinds {
        Kinds::One(kind) => RECORD_KINDS
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(n + 1),
        Kinds::All => n,
    };
    let sql = FETCH_SQL.get(which).map_or(PERSON_SELECT, String::as_str);
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(id.to_owned())
        .fetch_all(conn)
        .await?;
    let mut person: Option<Person> = None;
    for row in rows {
        let k: i64 = row.try_get("k")?;
        let n: i64 = row.try_get("n")?;
        let mut c = Cols(
            (2..13)
                .map(|i| row.try_get::<Option<String>, _>(i))
                .collect::<Result<_, _>>()?,
        );
        if k == 0 {
            person = Some(person_from(&mut c, n));
            continue;
        }
        // Records sort after their person; without one (impossible under the foreign keys) they are skipped.
        if let Some(p) = person.as_mut() {
            add_record(p, k, &mut c, n);
        }
    }
    Ok(person)
}

/// The text columns of one wide row, each taken at most once.
struct Cols(Vec<Option<String>>);

impl Cols {
    fn opt(&mut self, i: usize) -> Option<String> {
        self.0.get_mut(i).and_then(Option::take)
    }

    fn text(&mut self, i: usize) -> String {
        self.opt(i).unwrap_or_default()
    }
}

fn person_from(c: &mut Cols, stateless: i64) -> Person {
    Person {
        id: c.text(0),
        personal_number: c.opt(1),
        names: Names {
            surname: c.text(2),
            given_names: c.text(3),
            surname_ka: c.text(4),
            given_names_ka: c.text(5),
        },
        sex: c.text(6),
        birth_date: c.text(7),
        birth_place: BirthPlace {
            city: c.text(8),
            country: c.text(9),
        },
        nationalities: c
            .text(10)
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        stateless: stateless != 0,
        documents: Vec::new(),
        visas: Vec::new(),
        residence_permits: Vec::new(),
        work_permits: Vec::new(),
        crossings: Vec::new(),
        asylum_cases: Vec::new(),
        entry_bans: Vec::new(),
    }
}

/// Adds the record in a wide row of kind `k` (see [`RECORD_SELECTS`]) to the person.
fn add_record(p: &mut Person, k: i64, c: &mut Cols, n: i64) {
    match k {
        1 => p.documents.push(Document {
            id: c.text(0),
            person_id: None,
            kind: c.text(1),
            number: c.text(2),
            issuing_state: c.text(3),
            issued_on: c.text(4),
            valid_until: c.text(5),
        }),
        2 => p.visas.push(Visa {
            id: c.text(0),
            person_id: None,
            number: c.text(1),
            category: c.text(2),
            issuing_post: c.text(3),
            valid_from: c.text(4),
            valid_until: c.text(5),
            entries: c.text(6),
        }),
        3 => p.residence_permits.push(ResidencePermit {
            id: c.text(0),
            person_id: None,
            number: c.text(1),
            permit_type: c.text(2),
            status: c.text(3),
            valid_from: c.text(4),
            valid_until: c.text(5),
        }),
        4 => p.work_permits.push(WorkPermit {
            id: c.text(0),
            person_id: None,
            number: c.text(1),
            employer: Employer {
                name: c.text(2),
                tax_id: c.text(3),
            },
            position: c.text(4),
            valid_from: c.text(5),
            valid_until: c.text(6),
        }),
        5 => p.crossings.push(Crossing {
            id: c.text(0),
            person_id: c.text(1),
            direction: c.text(2),
            point: c.text(3),
            at: c.text(4),
            document_number: c.text(5),
        }),
        6 => p.asylum_cases.push(AsylumCase {
            id: c.text(0),
            person_id: None,
            case_number: c.text(1),
            applied_on: c.text(2),
            status: c.text(3),
            decision_on: c.opt(4),
        }),
        7 => p.entry_bans.push(EntryBan {
            id: c.text(0),
            person_id: None,
            reason: c.text(1),
            valid_from: c.text(2),
            valid_until: c.text(3),
            expulsion: n != 0,
        }),
        _ => {}
    }
}

/// The person with all records, or `None`.
pub(crate) async fn load_person(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<Option<Person>, sqlx::Error> {
    fetch(conn, id, Kinds::All).await
}

/// One kind of record of a person as JSON, or `None` if there is no such
/// person (`kind` must be one of [`super::model::RECORD_KINDS`]).
pub(crate) async fn records(
    conn: &mut AnyConnection,
    id: &str,
    kind: &str,
) -> Result<Option<serde_json::Value>, sqlx::Error> {
    fn json<T: serde::Serialize>(v: Vec<T>) -> Option<serde_json::Value> {
        serde_json::to_value(v).ok()
    }
    let Some(p) = fetch(conn, id, Kinds::One(kind)).await? else {
        return Ok(None);
    };
    Ok(match kind {
        "documents" => json(p.documents),
        "visas" => json(p.visas),
        "residence_permits" => json(p.residence_permits),
        "work_permits" => json(p.work_permits),
        "crossings" => json(p.crossings),
        "asylum_cases" => json(p.asylum_cases),
        "entry_bans" => json(p.entry_bans),
        _ => None,
    })
}

/// The records of one kind of a person (none if there is no such person).
async fn kind_of<T>(
    conn: &mut AnyConnection,
    id: &str,
    kind: &str,
    take: fn(Person) -> Vec<T>,
) -> Result<Vec<T>, sqlx::Error> {
    Ok(fetch(conn, id, Kinds::One(kind))
        .await?
        .map(take)
        .unwrap_or_default())
}

/// The person's travel and identity documents.
pub(crate) async fn documents(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<Vec<Document>, sqlx::Error> {
    kind_of(conn, id, "documents", |p| p.documents).await
}

/// The person's visas.
pub(crate) async fn visas(conn: &mut AnyConnection, id: &str) -> Result<Vec<Visa>, sqlx::Error> {
    kind_of(conn, id, "visas", |p| p.visas).await
}

/// The person's entry bans.
pub(crate) async fn entry_bans(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<Vec<EntryBan>, sqlx::Error> {
    kind_of(conn, id, "entry_bans", |p| p.entry_bans).await
}

/// The birth date of a person, or `None` if there is no such person.
pub(crate) async fn birth_date(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT birth_date FROM reg_persons WHERE id = $1")
        .bind(id.to_owned())
        .fetch_optional(conn)
        .await
}

/// Ids of persons holding a document with this number (and issuing state, if given), at most `limit`.
pub(crate) async fn ids_by_document(
    conn: &mut AnyConnection,
    number: &str,
    issuing_state: Option<&str>,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT person_id FROM reg_documents WHERE number = $1 \
         AND ($2 = '' OR issuing_state = $2) ORDER BY person_id LIMIT $3",
    )
    .bind(number.to_owned())
    .bind(issuing_state.unwrap_or_default().to_owned())
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// `(id, given names)` of persons whose surname has this search key, born on `birth_date`.
pub(crate) async fn by_surname_key(
    conn: &mut AnyConnection,
    key: &str,
    birth_date: &str,
    limit: i64,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, given_names FROM reg_persons WHERE surname_key = $1 AND birth_date = $2 \
         ORDER BY id LIMIT $3",
    )
    .bind(key.to_owned())
    .bind(birth_date.to_owned())
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Ids of persons of one nationality after `after` (the cursor), optionally born in a date range.
pub(crate) async fn ids_by_nationality(
    conn: &mut AnyConnection,
    code: &str,
    after: &str,
    born_from: &str,
    born_until: &str,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT n.person_id FROM reg_person_nationalities n JOIN reg_persons p ON p.id = n.person_id \
         WHERE n.code = $1 AND n.person_id > $2 AND p.birth_date >= $3 AND p.birth_date <= $4 \
         ORDER BY n.person_id LIMIT $5",
    )
    .bind(code.to_owned())
    .bind(after.to_owned())
    .bind(born_from.to_owned())
    .bind(born_until.to_owned())
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// A search for border crossings in a time range; empty strings mean "any".
#[derive(Debug, Default)]
pub(crate) struct CrossingQuery {
    /// Inclusive lower bound, RFC 3339 UTC as stored.
    pub(crate) from: String,
    /// Exclusive upper bound.
    pub(crate) until: String,
    pub(crate) point: String,
    pub(crate) direction: String,
    pub(crate) nationality: String,
    /// The last crossing of the previous page: `(at, id)`.
    pub(crate) after: Option<(String, String)>,
}

/// Crossings matching `q`, ordered by time and id, at most `limit`.
pub(crate) async fn crossings_between(
    conn: &mut AnyConnection,
    q: &CrossingQuery,
    limit: i64,
) -> Result<Vec<Crossing>, sqlx::Error> {
    // The cursor moves the index range's start, so each page costs the same.
    let (after_at, after_id) = q.after.clone().unwrap_or_default();
    let from = if after_at > q.from {
        after_at.clone()
    } else {
        q.from.clone()
    };
    sqlx::query_as(
        "SELECT c.id, c.person_id, c.direction, c.point, c.at, c.document_number \
         FROM reg_crossings c WHERE c.at >= $1 AND c.at < $2 \
         AND NOT (c.at = $3 AND c.id <= $4) \
         AND ($5 = '' OR c.point = $5) AND ($6 = '' OR c.direction = $6) \
         AND ($7 = '' OR EXISTS (SELECT 1 FROM reg_person_nationalities n \
              WHERE n.code = $7 AND n.person_id = c.person_id)) \
         ORDER BY c.at, c.id LIMIT $8",
    )
    .bind(from)
    .bind(q.until.clone())
    .bind(after_at)
    .bind(after_id)
    .bind(q.point.clone())
    .bind(q.direction.clone())
    .bind(q.nationality.clone())
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// A stored answer to an earlier request with the same idempotency key.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct StoredAnswer {
    /// Hash of the request the key was first used with.
    pub(crate) request_hash: String,
    /// HTTP status of the answer.
    pub(crate) status: i64,
    /// JSON body of the answer.
    pub(crate) body: String,
}

/// The answer stored under `(scope, key)`, if any.
pub(crate) async fn idempotent_answer(
    conn: &mut AnyConnection,
    scope: &str,
    key: &str,
) -> Result<Option<StoredAnswer>, sqlx::Error> {
    sqlx::query_as(
        "SELECT request_hash, status, body FROM reg_idempotency WHERE scope = $1 AND idem_key = $2",
    )
    .bind(scope.to_owned())
    .bind(key.to_owned())
    .fetch_optional(conn)
    .await
}

/// How long idempotency keys are remembered.
const IDEMPOTENCY_RETENTION_HOURS: i64 = 24;

/// Stores the answer under `(scope, key)`; forgets keys older than the retention period.
pub(crate) async fn store_answer(
    conn: &mut AnyConnection,
    scope: &str,
    key: &str,
    request_hash: &str,
    status: u16,
    body: &str,
) -> Result<(), sqlx::Error> {
    let now = time::OffsetDateTime::now_utc();
    let cutoff = now - time::Duration::hours(IDEMPOTENCY_RETENTION_HOURS);
    sqlx::query("DELETE FROM reg_idempotency WHERE created_at < $1")
        .bind(rfc3339(cutoff))
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO reg_idempotency (scope, idem_key, request_hash, status, body, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(scope.to_owned())
    .bind(key.to_owned())
    .bind(request_hash.to_owned())
    .bind(i32::from(status))
    .bind(body.to_owned())
    .bind(rfc3339(now))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// RFC 3339 in UTC with whole seconds, the form every timestamp in the register takes.
pub(crate) fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Whether the error is a unique-constraint violation.
pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(e) if e.is_unique_violation())
}
