//! The register's tables (`reg_*`): bulk inserts for seeding, reads for the
//! API, and the idempotency records of the write endpoints.
//!
//! Everything goes through sqlx's `Any` driver with `$n` placeholders, so the
//! same statements run on SQLite and PostgreSQL. Flags are stored as INTEGER
//! 0/1 on both, because `Any` cannot decode a SQLite integer as a bool.

use sqlx::{AnyConnection, AssertSqlSafe};

use super::model::{
    AsylumCase, BirthPlace, Crossing, Document, Employer, EntryBan, Names, Person, ResidencePermit,
    Visa, WorkPermit,
};
use super::synth::surname_key;
use crate::store::Backend;

/// A value bound into a bulk insert.
pub(crate) enum Val {
    Text(String),
    OptText(Option<String>),
    Int(i32),
}

/// Parameters per multi-row INSERT. SQLite parses long statements slowly (10,000 persons:
/// 20,000 parameters 10 s, 300 parameters 1 s); PostgreSQL pays per round trip instead.
pub(crate) fn max_params(backend: Backend) -> usize {
    match backend {
        Backend::Sqlite => 300,
        Backend::Postgres => PG_PARAMS,
    }
}
const PG_PARAMS: usize = 2000;

/// Inserts `rows` into `table`, as few multi-row statements as the parameter limit allows.
async fn insert_rows(
    conn: &mut AnyConnection,
    table: &'static str,
    cols: &'static [&'static str],
    rows: Vec<Vec<Val>>,
    max_params: usize,
) -> Result<(), sqlx::Error> {
    let per_stmt = (max_params / cols.len()).max(1);
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<Vec<Val>> = rows.by_ref().take(per_stmt).collect();
        let mut sql = format!("INSERT INTO {table} ({}) VALUES ", cols.join(", "));
        let mut n = 0;
        for (i, _) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for c in 0..cols.len() {
                if c > 0 {
                    sql.push_str(", ");
                }
                n += 1;
                sql.push('$');
                sql.push_str(&n.to_string());
            }
            sql.push(')');
        }
        // Built from the constant table and column names above; values are bound.
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for v in chunk.into_iter().flatten() {
            q = match v {
                Val::Text(s) => q.bind(s),
                Val::OptText(s) => q.bind(s),
                Val::Int(i) => q.bind(i),
            };
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

const PERSON_COLS: &[&str] = &[
    "id",
    "personal_number",
    "surname",
    "given_names",
    "surname_ka",
    "given_names_ka",
    "surname_key",
    "sex",
    "birth_date",
    "birth_city",
    "birth_country",
    "nationalities",
    "stateless",
];
const DOCUMENT_COLS: &[&str] = &[
    "id",
    "person_id",
    "kind",
    "number",
    "issuing_state",
    "issued_on",
    "valid_until",
];
const VISA_COLS: &[&str] = &[
    "id",
    "person_id",
    "number",
    "category",
    "issuing_post",
    "valid_from",
    "valid_until",
    "entries",
];
const PERMIT_COLS: &[&str] = &[
    "id",
    "person_id",
    "number",
    "permit_type",
    "status",
    "valid_from",
    "valid_until",
];
const WORK_COLS: &[&str] = &[
    "id",
    "person_id",
    "number",
    "employer_name",
    "employer_tax_id",
    "position",
    "valid_from",
    "valid_until",
];
const CROSSING_COLS: &[&str] = &[
    "id",
    "person_id",
    "direction",
    "point",
    "at",
    "document_number",
];
const ASYLUM_COLS: &[&str] = &[
    "id",
    "person_id",
    "case_number",
    "applied_on",
    "status",
    "decision_on",
];
const BAN_COLS: &[&str] = &[
    "id",
    "person_id",
    "reason",
    "valid_from",
    "valid_until",
    "expulsion",
];

/// Inserts whole persons with all their records (parents first, for the foreign keys).
pub(crate) async fn insert_persons(
    conn: &mut AnyConnection,
    persons: &[Person],
    max_params: usize,
) -> Result<(), sqlx::Error> {
    use Val::{Int, OptText, Text};
    let t = |s: &String| Text(s.clone());
    let mut people = Vec::with_capacity(persons.len());
    let mut docs = Vec::new();
    let mut visas = Vec::new();
    let mut permits = Vec::new();
    let mut works = Vec::new();
    let mut crossings = Vec::new();
    let mut asylum = Vec::new();
    let mut bans = Vec::new();
    for p in persons {
        let pid = || Text(p.id.clone());
        people.push(vec![
            pid(),
            OptText(p.personal_number.clone()),
            t(&p.names.surname),
            t(&p.names.given_names),
            t(&p.names.surname_ka),
            t(&p.names.given_names_ka),
            Text(surname_key(&p.names.surname)),
            t(&p.sex),
            t(&p.birth_date),
            t(&p.birth_place.city),
            t(&p.birth_place.country),
            Text(p.nationalities.join(",")),
            Int(i32::from(p.stateless)),
        ]);
        for d in &p.documents {
            docs.push(vec![
                t(&d.id),
                pid(),
                t(&d.kind),
                t(&d.number),
                t(&d.issuing_state),
                t(&d.issued_on),
                t(&d.valid_until),
            ]);
        }
        for v in &p.visas {
            visas.push(visa_row(&p.id, v));
        }
        for r in &p.residence_permits {
            permits.push(vec![
                t(&r.id),
                pid(),
                t(&r.number),
                t(&r.permit_type),
                t(&r.status),
                t(&r.valid_from),
                t(&r.valid_until),
            ]);
        }
        for w in &p.work_permits {
            works.push(vec![
                t(&w.id),
                pid(),
                t(&w.number),
                t(&w.employer.name),
                t(&w.employer.tax_id),
                t(&w.position),
                t(&w.valid_from),
                t(&w.valid_until),
            ]);
        }
        for c in &p.crossings {
            crossings.push(crossing_row(c));
        }
        for a in &p.asylum_cases {
            asylum.push(vec![
                t(&a.id),
                pid(),
                t(&a.case_number),
                t(&a.applied_on),
                t(&a.status),
                OptText(a.decision_on.clone()),
            ]);
        }
        for b in &p.entry_bans {
            bans.push(vec![
                t(&b.id),
                pid(),
                t(&b.reason),
                t(&b.valid_from),
                t(&b.valid_until),
                Int(i32::from(b.expulsion)),
            ]);
        }
    }
    insert_rows(conn, "reg_persons", PERSON_COLS, people, max_params).await?;
    insert_rows(conn, "reg_documents", DOCUMENT_COLS, docs, max_params).await?;
    insert_rows(conn, "reg_visas", VISA_COLS, visas, max_params).await?;
    insert_rows(
        conn,
        "reg_residence_permits",
        PERMIT_COLS,
        permits,
        max_params,
    )
    .await?;
    insert_rows(conn, "reg_work_permits", WORK_COLS, works, max_params).await?;
    insert_rows(conn, "reg_crossings", CROSSING_COLS, crossings, max_params).await?;
    insert_rows(conn, "reg_asylum_cases", ASYLUM_COLS, asylum, max_params).await?;
    insert_rows(conn, "reg_entry_bans", BAN_COLS, bans, max_params).await?;
    Ok(())
}

fn visa_row(person_id: &str, v: &Visa) -> Vec<Val> {
    use Val::Text;
    vec![
        Text(v.id.clone()),
        Text(person_id.to_owned()),
        Text(v.number.clone()),
        Text(v.category.clone()),
        Text(v.issuing_post.clone()),
        Text(v.valid_from.clone()),
        Text(v.valid_until.clone()),
        Text(v.entries.clone()),
    ]
}

fn crossing_row(c: &Crossing) -> Vec<Val> {
    use Val::Text;
    vec![
        Text(c.id.clone()),
        Text(c.person_id.clone()),
        Text(c.direction.clone()),
        Text(c.point.clone()),
        Text(c.at.clone()),
        Text(c.document_number.clone()),
    ]
}

/// Stores one crossing.
pub(crate) async fn insert_crossing(
    conn: &mut AnyConnection,
    c: &Crossing,
) -> Result<(), sqlx::Error> {
    insert_rows(
        conn,
        "reg_crossings",
        CROSSING_COLS,
        vec![crossing_row(c)],
        1000,
    )
    .await
}

/// Stores one visa of `person_id`.
pub(crate) async fn insert_visa(
    conn: &mut AnyConnection,
    person_id: &str,
    v: &Visa,
) -> Result<(), sqlx::Error> {
    insert_rows(
        conn,
        "reg_visas",
        VISA_COLS,
        vec![visa_row(person_id, v)],
        1000,
    )
    .await
}

#[derive(sqlx::FromRow)]
struct PersonRow {
    id: String,
    personal_number: Option<String>,
    surname: String,
    given_names: String,
    surname_ka: String,
    given_names_ka: String,
    sex: String,
    birth_date: String,
    birth_city: String,
    birth_country: String,
    nationalities: String,
    stateless: i64,
}

#[derive(sqlx::FromRow)]
struct VisaRow {
    id: String,
    number: String,
    category: String,
    issuing_post: String,
    valid_from: String,
    valid_until: String,
    entries: String,
}

impl From<VisaRow> for Visa {
    fn from(r: VisaRow) -> Visa {
        Visa {
            id: r.id,
            person_id: None,
            number: r.number,
            category: r.category,
            issuing_post: r.issuing_post,
            valid_from: r.valid_from,
            valid_until: r.valid_until,
            entries: r.entries,
        }
    }
}

#[derive(sqlx::FromRow)]
struct WorkRow {
    id: String,
    number: String,
    employer_name: String,
    employer_tax_id: String,
    position: String,
    valid_from: String,
    valid_until: String,
}

#[derive(sqlx::FromRow)]
struct BanRow {
    id: String,
    reason: String,
    valid_from: String,
    valid_until: String,
    expulsion: i64,
}

/// Whether a person with this id exists.
pub(crate) async fn person_exists(conn: &mut AnyConnection, id: &str) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM reg_persons WHERE id = $1")
        .bind(id.to_owned())
        .fetch_one(&mut *conn)
        .await?;
    Ok(n > 0)
}

/// The person with all records, or `None`.
pub(crate) async fn load_person(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<Option<Person>, sqlx::Error> {
    let row: Option<PersonRow> = sqlx::query_as(
        "SELECT id, personal_number, surname, given_names, surname_ka, given_names_ka, sex, \
         birth_date, birth_city, birth_country, nationalities, stateless \
         FROM reg_persons WHERE id = $1",
    )
    .bind(id.to_owned())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let mut person = Person {
        id: row.id,
        personal_number: row.personal_number,
        names: Names {
            surname: row.surname,
            given_names: row.given_names,
            surname_ka: row.surname_ka,
            given_names_ka: row.given_names_ka,
        },
        sex: row.sex,
        birth_date: row.birth_date,
        birth_place: BirthPlace {
            city: row.birth_city,
            country: row.birth_country,
        },
        nationalities: row
            .nationalities
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        stateless: row.stateless != 0,
        documents: Vec::new(),
        visas: Vec::new(),
        residence_permits: Vec::new(),
        work_permits: Vec::new(),
        crossings: Vec::new(),
        asylum_cases: Vec::new(),
        entry_bans: Vec::new(),
    };
    person.documents = documents(conn, id).await?;
    person.visas = visas(conn, id).await?;
    person.residence_permits = residence_permits(conn, id).await?;
    person.work_permits = work_permits(conn, id).await?;
    person.crossings = crossings(conn, id).await?;
    person.asylum_cases = asylum_cases(conn, id).await?;
    person.entry_bans = entry_bans(conn, id).await?;
    Ok(Some(person))
}

/// One kind of record of a person as JSON (`kind` must be one of [`super::model::RECORD_KINDS`]).
pub(crate) async fn records(
    conn: &mut AnyConnection,
    id: &str,
    kind: &str,
) -> Result<Option<serde_json::Value>, sqlx::Error> {
    fn json<T: serde::Serialize>(v: Vec<T>) -> Option<serde_json::Value> {
        serde_json::to_value(v).ok()
    }
    Ok(match kind {
        "documents" => json(documents(conn, id).await?),
        "visas" => json(visas(conn, id).await?),
        "residence_permits" => json(residence_permits(conn, id).await?),
        "work_permits" => json(work_permits(conn, id).await?),
        "crossings" => json(crossings(conn, id).await?),
        "asylum_cases" => json(asylum_cases(conn, id).await?),
        "entry_bans" => json(entry_bans(conn, id).await?),
        _ => None,
    })
}

async fn documents(conn: &mut AnyConnection, id: &str) -> Result<Vec<Document>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, kind, number, issuing_state, issued_on, valid_until FROM reg_documents \
         WHERE person_id = $1 ORDER BY issued_on, id",
    )
    .bind(id.to_owned())
    .fetch_all(conn)
    .await
}

async fn visas(conn: &mut AnyConnection, id: &str) -> Result<Vec<Visa>, sqlx::Error> {
    let rows: Vec<VisaRow> = sqlx::query_as(
        "SELECT id, number, category, issuing_post, valid_from, valid_until, entries \
         FROM reg_visas WHERE person_id = $1 ORDER BY valid_from, id",
    )
    .bind(id.to_owned())
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(Visa::from).collect())
}

async fn residence_permits(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<Vec<ResidencePermit>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, number, permit_type, status, valid_from, valid_until \
         FROM reg_residence_permits WHERE person_id = $1 ORDER BY valid_from, id",
    )
    .bind(id.to_owned())
    .fetch_all(conn)
    .await
}

async fn work_permits(conn: &mut AnyConnection, id: &str) -> Result<Vec<WorkPermit>, sqlx::Error> {
    let rows: Vec<WorkRow> = sqlx::query_as(
        "SELECT id, number, employer_name, employer_tax_id, position, valid_from, valid_until \
         FROM reg_work_permits WHERE person_id = $1 ORDER BY valid_from, id",
    )
    .bind(id.to_owned())
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| WorkPermit {
            id: r.id,
            number: r.number,
            employer: Employer {
                name: r.employer_name,
                tax_id: r.employer_tax_id,
            },
            position: r.position,
            valid_from: r.valid_from,
            valid_until: r.valid_until,
        })
        .collect())
}

async fn crossings(conn: &mut AnyConnection, id: &str) -> Result<Vec<Crossing>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, person_id, direction, point, at, document_number FROM reg_crossings \
         WHERE person_id = $1 ORDER BY at, id",
    )
    .bind(id.to_owned())
    .fetch_all(conn)
    .await
}

async fn asylum_cases(conn: &mut AnyConnection, id: &str) -> Result<Vec<AsylumCase>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, case_number, applied_on, status, decision_on FROM reg_asylum_cases \
         WHERE person_id = $1 ORDER BY applied_on, id",
    )
    .bind(id.to_owned())
    .fetch_all(conn)
    .await
}

async fn entry_bans(conn: &mut AnyConnection, id: &str) -> Result<Vec<EntryBan>, sqlx::Error> {
    let rows: Vec<BanRow> = sqlx::query_as(
        "SELECT id, reason, valid_from, valid_until, expulsion FROM reg_entry_bans \
         WHERE person_id = $1 ORDER BY valid_from, id",
    )
    .bind(id.to_owned())
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| EntryBan {
            id: r.id,
            reason: r.reason,
            valid_from: r.valid_from,
            valid_until: r.valid_until,
            expulsion: r.expulsion != 0,
        })
        .collect())
}

/// Ids of persons holding a document with this number (at most `limit`).
pub(crate) async fn ids_by_document(
    conn: &mut AnyConnection,
    number: &str,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT person_id FROM reg_documents WHERE number = $1 ORDER BY person_id LIMIT $2",
    )
    .bind(number.to_owned())
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Ids of persons with this surname (any script, see [`surname_key`]) born on `birth_date` (at most `limit`).
pub(crate) async fn ids_by_surname(
    conn: &mut AnyConnection,
    surname: &str,
    birth_date: &str,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM reg_persons WHERE surname_key = $1 AND birth_date = $2 ORDER BY id LIMIT $3",
    )
    .bind(surname_key(surname))
    .bind(birth_date.to_owned())
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
