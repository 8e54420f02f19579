//! `karibche registry bench`: lookups per second through the register's own
//! handler (`GET /persons/{id}`, `GET /persons?document=N`), on whatever the
//! store holds (seed a million persons first), and the query plans of those
//! lookups, so one can see that they use indexes.
//!
//! This is a measurement, not a test: it asserts nothing about time. The
//! lookups go through [`Registry::handle`] (routing, every record kind,
//! JSON), not through TLS and the gateway, so the figure is the register's.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use sqlx::Row;

use super::synth::Rng;
use super::{Registry, RegistryError};
use crate::store::{Backend, Store};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Lookups per kind.
    pub lookups: usize,
    /// Lookups in flight at once.
    pub concurrency: usize,
    /// Picks the persons looked up.
    pub seed: u64,
}

/// One measured kind of lookup.
#[derive(Debug, Clone)]
pub struct BenchResult {
    /// What was looked up.
    pub name: String,
    /// Lookups made.
    pub lookups: usize,
    /// Lookups that found the person (all should).
    pub found: usize,
    /// Wall time.
    pub elapsed: Duration,
}

impl BenchResult {
    /// Lookups per second.
    pub fn per_second(&self) -> f64 {
        self.lookups as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The plan the database chose for one lookup query.
#[derive(Debug, Clone)]
pub struct QueryPlan {
    /// Which query.
    pub name: String,
    /// The SQL explained.
    pub sql: String,
    /// The plan, one line per step.
    pub lines: Vec<String>,
    /// Whether every table access in the plan goes through an index.
    pub uses_index: bool,
}

/// Everything `registry bench` reports.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// Persons in the register.
    pub persons: i64,
    /// The measured lookups.
    pub results: Vec<BenchResult>,
    /// Plans of the queries behind them.
    pub plans: Vec<QueryPlan>,
}

/// The queries a lookup by id or by document number runs, with a sample argument.
const LOOKUP_QUERIES: [(&str, &str); 4] = [
    (
        "person by id",
        "SELECT id, personal_number, surname FROM reg_persons WHERE id = $1",
    ),
    (
        "records by person",
        "SELECT id, number FROM reg_documents WHERE person_id = $1 ORDER BY issued_on, id",
    ),
    (
        "persons by document number",
        "SELECT DISTINCT person_id FROM reg_documents WHERE number = $1 ORDER BY person_id LIMIT 50",
    ),
    (
        "persons by surname key and birth date",
        "SELECT id, given_names FROM reg_persons WHERE surname_key = $1 AND birth_date = $2 ORDER BY id LIMIT 50",
    ),
];

/// Measures lookups by id and by document number, and explains their queries.
pub async fn bench(store: &Store, opts: &BenchOptions) -> Result<BenchReport, RegistryError> {
    let persons = super::count_persons(store).await?;
    // Fresh statistics, so PostgreSQL's planner sees a million rows, not an empty table.
    sqlx::query("ANALYZE").execute(store.pool()).await?;
    let sample = sample(store, opts, persons).await?;
    let reg = Registry::new(store.clone());
    let by_id: Vec<String> = sample
        .iter()
        .map(|(id, _, _)| format!("/persons/{id}"))
        .collect();
    let by_doc: Vec<String> = sample
        .iter()
        .map(|(_, doc, _)| format!("/persons?document={doc}"))
        .collect();
    let results = vec![
        run(&reg, "GET /persons/{id}", by_id, opts.concurrency).await,
        run(
            &reg,
            "GET /persons?document={number}",
            by_doc,
            opts.concurrency,
        )
        .await,
    ];
    let mut plans = Vec::new();
    if let Some((id, doc, (key, birth))) = sample.first() {
        for (name, sql) in LOOKUP_QUERIES {
            let args: Vec<&str> = match name {
                "persons by document number" => vec![doc],
                "persons by surname key and birth date" => vec![key, birth],
                _ => vec![id],
            };
            plans.push(explain(store, name, sql, &args).await?);
        }
    }
    Ok(BenchReport {
        persons,
        results,
        plans,
    })
}

/// `(id, a document number, (surname key, birth date))` of persons picked at random.
async fn sample(
    store: &Store,
    opts: &BenchOptions,
    persons: i64,
) -> Result<Vec<(String, String, (String, String))>, RegistryError> {
    let mut rng = Rng::for_person(opts.seed, 0);
    let mut out = Vec::with_capacity(opts.lookups);
    let mut conn = store.pool().acquire().await?;
    // Ids of seeded persons are dense (`RF-0000001`…); pick among them, then read what the
    // lookups need outside the timed part.
    let mut attempts = 0;
    while out.len() < opts.lookups && persons > 0 && attempts < opts.lookups * 4 {
        attempts += 1;
        let id = format!("RF-{:07}", 1 + rng.next_u64() % persons as u64);
        let row = sqlx::query(
            "SELECT p.surname_key, p.birth_date, d.number FROM reg_persons p \
             JOIN reg_documents d ON d.person_id = p.id WHERE p.id = $1 LIMIT 1",
        )
        .bind(id.clone())
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(row) = row {
            out.push((id, row.try_get(2)?, (row.try_get(0)?, row.try_get(1)?)));
        }
    }
    Ok(out)
}

async fn run(reg: &Registry, name: &str, uris: Vec<String>, concurrency: usize) -> BenchResult {
    let lookups = uris.len();
    let concurrency = concurrency.clamp(1, 256);
    let queue = std::sync::Arc::new(std::sync::Mutex::new(uris));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let reg = reg.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut found = 0usize;
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop());
                let Some(uri) = next else { break };
                let Ok(req) = Request::get(uri).body(Bytes::new()) else {
                    continue;
                };
                let resp = reg.handle(req).await;
                if resp.status() == StatusCode::OK {
                    found += 1;
                }
            }
            found
        }));
    }
    let mut found = 0;
    for t in tasks {
        found += t.await.unwrap_or(0);
    }
    BenchResult {
        name: name.to_owned(),
        lookups,
        found,
        elapsed: started.elapsed(),
    }
}

/// The database's plan for `sql` with `args` bound.
pub(crate) async fn explain(
    store: &Store,
    name: &str,
    sql: &str,
    args: &[&str],
) -> Result<QueryPlan, RegistryError> {
    let (prefix, detail_col) = match store.backend() {
        Backend::Sqlite => ("EXPLAIN QUERY PLAN ", 3),
        Backend::Postgres => ("EXPLAIN ", 0),
    };
    // `sql` is one of this module's constants.
    let mut q = sqlx::query(sqlx::AssertSqlSafe(format!("{prefix}{sql}")));
    for a in args {
        q = q.bind((*a).to_owned());
    }
    let rows = q.fetch_all(store.pool()).await?;
    let mut lines = Vec::with_capacity(rows.len());
    for row in rows {
        lines.push(row.try_get::<String, _>(detail_col)?);
    }
    let uses_index = match store.backend() {
        // SQLite says SCAN for a full pass and SEARCH … USING (COVERING) INDEX / PRIMARY KEY for a lookup.
        Backend::Sqlite => {
            lines.iter().any(|l| l.contains("USING"))
                && !lines
                    .iter()
                    .any(|l| l.starts_with("SCAN") && !l.contains("USING"))
        }
        Backend::Postgres => {
            lines.iter().any(|l| l.contains("Index"))
                && !lines.iter().any(|l| l.contains("Seq Scan"))
        }
    };
    Ok(QueryPlan {
        name: name.to_owned(),
        sql: sql.to_owned(),
        lines,
        uses_index,
    })
}
