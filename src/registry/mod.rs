//! The built-in register of foreigners: a provider behind the gateway, like
//! any other ministry's service.
//!
//! It keeps persons and their documents, visas, residence and work permits,
//! border crossings, asylum cases and entry bans in the `reg_*` tables
//! (`db`), serves them over an HTTP API ([`Registry::handle`]; reads and
//! searches in `http`, the validated, idempotent writes of each agency in
//! `write`, aggregate counts in `statistics`; described in
//! `openapi/registry.json`), fills an empty register with synthetic,
//! internally consistent foreigners ([`seed()`]), and measures its own lookups
//! ([`bench()`]).
//!
//! The gateway maps `/v1/registry/{service}/{rest}` to `/{service}/{rest}`
//! here, after TLS, client, policy and body-size checks; field names in
//! [`model`] are what the policy files' field paths name.

mod answer;
mod bench;
mod dates;
mod db;
mod front;
mod http;
pub mod model;
mod names;
mod statistics;
pub(crate) mod synth;
mod update;
mod write;

#[cfg(test)]
mod tests;

use crate::problem::Body;
use crate::store::Store;

pub use bench::{bench, BenchOptions, BenchReport, BenchResult, QueryPlan};
pub use front::provider_request;
pub use names::{surname_key, to_georgian};
pub use statistics::MIN_CELL;

/// One synthetic person's id that exists after seeding with any seed and at least one person.
pub const EXAMPLE_PERSON_ID: &str = "RF-0000001";

/// Persons generated, serialised and inserted per batch: big enough that each bulk statement
/// carries thousands of rows, small enough to keep a few batches in memory.
pub(crate) const SEED_BATCH: usize = 5_000;
/// Batches the generator may run ahead of the database.
const SEED_QUEUE: usize = 2;

/// Errors of the register's library functions (the HTTP handler turns its own into problems).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The database failed.
    #[error("register database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The synthetic data generator stopped unexpectedly.
    #[error("the synthetic data generator failed")]
    Generator,
    /// The setup lock shared with other replicas could not be taken.
    #[error(transparent)]
    Lock(#[from] crate::store::StoreError),
}

/// The register's request handler; cheap to clone.
#[derive(Debug, Clone)]
pub struct Registry {
    store: Store,
}

impl Registry {
    /// A register over the given store (migrations already applied by [`Store::connect`]).
    pub fn new(store: Store) -> Self {
        Registry { store }
    }

    /// Handles one fully-read request; never panics on input.
    pub async fn handle(&self, req: ::http::Request<bytes::Bytes>) -> ::http::Response<Body> {
        http::handle(self, req).await
    }
}

/// Seeds `persons` synthetic persons from `seed` unless the register already holds persons;
/// returns how many were inserted (0 if already seeded).
///
/// Names, ids and numbers depend on `seed` only; dates are anchored on today (UTC) so the
/// register always looks current. All persons go in one transaction: a register is either
/// seeded completely or not at all, and a replica racing another one backs off with 0.
///
/// Speed: generator threads build batches of rows while this task loads the previous batch.
/// SQLite: one bulk `INSERT … SELECT` from JSON per table and batch, foreign keys off, the
/// secondary indexes dropped for the load and rebuilt at the end (sorting once beats millions
/// of random B-tree inserts). PostgreSQL: `COPY` per table and batch, with the secondary
/// indexes and the foreign keys dropped for the load and restored (checked) at the end
/// ([`synth::copy`]).
pub async fn seed(store: &Store, persons: usize, seed: u64) -> Result<usize, RegistryError> {
    if persons == 0 {
        return Ok(0);
    }
    // Replicas started together would otherwise all see an empty register and
    // drop and rebuild the same indexes at once: one seeds, the others then find it full.
    let lock = store.setup_lock().await?;
    let result = seed_unless_full(store, persons, seed).await;
    lock.release().await;
    result
}

async fn seed_unless_full(
    store: &Store,
    persons: usize,
    seed: u64,
) -> Result<usize, RegistryError> {
    if count_persons(store).await? > 0 {
        return Ok(0);
    }
    let anchor = time::OffsetDateTime::now_utc().date();
    let started = std::time::Instant::now();
    let backend = store.backend();
    if backend == crate::store::Backend::Postgres {
        let inserted = synth::copy::seed(store, persons, seed, anchor).await?;
        log_seeded(inserted, persons, seed, started);
        return Ok(inserted);
    }
    let mut conn = store.pool().acquire().await?;
    // SQLite. Consistent by construction; checking each foreign key costs a lookup per row.
    // A bigger page cache keeps index rebuilds in memory. Both are undone below.
    sqlx::raw_sql("PRAGMA foreign_keys=OFF; PRAGMA cache_size=-262144; PRAGMA threads=2;")
        .execute(&mut *conn)
        .await?;
    let result = seed_on(&mut conn, backend, persons, seed, anchor).await;
    sqlx::raw_sql("PRAGMA foreign_keys=ON; PRAGMA cache_size=-2000; PRAGMA threads=0;")
        .execute(&mut *conn)
        .await?;
    let inserted = result?;
    log_seeded(inserted, persons, seed, started);
    Ok(inserted)
}

fn log_seeded(inserted: usize, persons: usize, seed: u64, started: std::time::Instant) {
    if inserted > 0 {
        tracing::info!(
            persons,
            seed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "register seeded with synthetic foreigners"
        );
    }
}

/// Generator threads making batches of persons' rows (`copy`: in `COPY` text, else JSON);
/// the batches arrive on the receiver roughly in id order, at most [`SEED_QUEUE`] ahead.
fn spawn_generators(
    persons: usize,
    seed: u64,
    anchor: time::Date,
    copy: bool,
) -> (
    tokio::sync::mpsc::Receiver<db::PersonRows>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let (tx_rows, rx_rows) = tokio::sync::mpsc::channel::<db::PersonRows>(SEED_QUEUE);
    // Generation is the costlier half: one generator per core beside the database's own
    // thread; batches are claimed from a shared counter, so they arrive roughly in id order.
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let next_batch = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut generators = Vec::with_capacity(workers);
    for _ in 0..workers {
        let tx_rows = tx_rows.clone();
        let next_batch = next_batch.clone();
        generators.push(tokio::task::spawn_blocking(move || loop {
            let b = next_batch.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let first = b * SEED_BATCH + 1;
            if first > persons {
                return;
            }
            let end = (first + SEED_BATCH).min(persons + 1);
            let mut rows = if copy {
                db::PersonRows::for_copy()
            } else {
                db::PersonRows::default()
            };
            for i in first..end {
                rows.add(&synth::person(seed, i as u64, anchor));
            }
            if tx_rows.blocking_send(rows).is_err() {
                return; // the loader gave up
            }
        }));
    }
    (rx_rows, generators)
}

/// Waits for the generators; an error if one of them panicked.
async fn join_generators(
    generators: Vec<tokio::task::JoinHandle<()>>,
) -> Result<(), RegistryError> {
    for generator in generators {
        if let Err(e) = generator.await {
            tracing::error!(err = %e, "the synthetic data generator failed");
            return Err(RegistryError::Generator);
        }
    }
    Ok(())
}

async fn seed_on(
    conn: &mut sqlx::AnyConnection,
    backend: crate::store::Backend,
    persons: usize,
    seed: u64,
    anchor: time::Date,
) -> Result<usize, RegistryError> {
    let (mut rx_rows, generators) = spawn_generators(persons, seed, anchor, false);
    let mut tx = sqlx::Acquire::begin(&mut *conn).await?;
    // Indexes led by person_id grow in insertion order and stay; the others are rebuilt.
    let indexes: Vec<(String, String)> = db::secondary_indexes(&mut tx, backend)
        .await?
        .into_iter()
        .filter(|(_, create)| !create.contains("(person_id)"))
        .collect();
    for (name, _) in &indexes {
        // Names come from the database's own catalogue, not from input.
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP INDEX {name}")))
            .execute(&mut *tx)
            .await?;
    }
    while let Some(rows) = rx_rows.recv().await {
        match db::insert_persons(&mut tx, backend, rows).await {
            Ok(()) => {}
            Err(e) if db::is_unique_violation(&e) => {
                tracing::info!("another process is seeding the register; leaving it to them");
                return Ok(0);
            }
            Err(e) => return Err(e.into()),
        }
    }
    join_generators(generators).await?;
    for (_, create) in &indexes {
        // Statements from the database's own catalogue, recreated as they were.
        sqlx::query(sqlx::AssertSqlSafe(create.clone()))
            .execute(&mut *tx)
            .await?;
    }
    match tx.commit().await {
        Ok(()) => Ok(persons),
        Err(e) if db::is_unique_violation(&e) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// What [`refresh_search_keys`] brings stored keys to; `karibche_meta` remembers it per database.
/// 2: names in every script (letters outside the register's own tables fold by `any_ascii`).
const SEARCH_KEY_VERSION: &str = "2";
/// The `karibche_meta` key holding [`SEARCH_KEY_VERSION`].
const SEARCH_KEY_META: &str = "registry.surname_key";
/// Persons re-keyed per transaction.
const REKEY_BATCH: i64 = 5_000;

/// Recomputes the stored surname search keys once after the folding changed (recorded in
/// `karibche_meta`); returns how many changed. Safe for replicas starting together.
///
/// Names the old folding dropped letters of (Vietnamese tones, say) get the key a search
/// computes today; names it covered keep theirs.
pub async fn refresh_search_keys(store: &Store) -> Result<usize, RegistryError> {
    let lock = store.setup_lock().await?;
    let result = refresh_unless_current(store).await;
    lock.release().await;
    result
}

async fn refresh_unless_current(store: &Store) -> Result<usize, RegistryError> {
    let done: Option<String> = sqlx::query_scalar("SELECT value FROM karibche_meta WHERE key = $1")
        .bind(SEARCH_KEY_META)
        .fetch_optional(store.pool())
        .await?;
    if done.as_deref() == Some(SEARCH_KEY_VERSION) {
        return Ok(0);
    }
    let (mut after, mut changed) = (String::new(), 0);
    loop {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT id, surname, surname_key FROM reg_persons WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(&after)
        .bind(REKEY_BATCH)
        .fetch_all(store.pool())
        .await?;
        let Some((last, _, _)) = rows.last() else {
            break;
        };
        after.clone_from(last);
        let mut tx = store.pool().begin().await?;
        for (id, surname, key) in rows {
            let fresh = surname_key(&surname);
            if fresh != key {
                sqlx::query("UPDATE reg_persons SET surname_key = $1 WHERE id = $2")
                    .bind(fresh)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                changed += 1;
            }
        }
        tx.commit().await?;
    }
    sqlx::query(
        "INSERT INTO karibche_meta (key, value) VALUES ($1, $2) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )
    .bind(SEARCH_KEY_META)
    .bind(SEARCH_KEY_VERSION)
    .execute(store.pool())
    .await?;
    if changed > 0 {
        tracing::info!(changed, "register search keys brought up to date");
    }
    Ok(changed)
}

/// Count of persons in the register.
pub async fn count_persons(store: &Store) -> Result<i64, RegistryError> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM reg_persons")
        .fetch_one(store.pool())
        .await?;
    Ok(n)
}

/// Some existing document number (of [`EXAMPLE_PERSON_ID`] when seeded), for docs and tests.
pub async fn example_document(store: &Store) -> Result<Option<String>, RegistryError> {
    let n: Option<String> = sqlx::query_scalar(
        "SELECT number FROM reg_documents ORDER BY CASE WHEN person_id = $1 THEN 0 ELSE 1 END, \
         person_id, valid_until DESC, id LIMIT 1",
    )
    .bind(EXAMPLE_PERSON_ID)
    .fetch_optional(store.pool())
    .await?;
    Ok(n)
}
