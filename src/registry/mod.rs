//! The built-in register of foreigners: a provider behind the gateway, like
//! any other ministry's service.
//!
//! It keeps persons and their documents, visas, residence and work permits,
//! border crossings, asylum cases and entry bans in the `reg_*` tables
//! ([`db`]), serves them over a small HTTP API ([`Registry::handle`]), and
//! fills an empty register with synthetic, internally consistent foreigners
//! ([`seed`]) so that a development gateway has something to guard.
//!
//! The gateway maps `/v1/registry/{rest}` to `/{rest}` here, after TLS,
//! client, policy and body-size checks; field names in [`model`] are what the
//! policy files' field paths name.

mod db;
mod http;
pub mod model;
mod synth;

#[cfg(test)]
mod tests;

use crate::problem::Body;
use crate::store::Store;

pub use synth::{surname_key, to_georgian};

/// One synthetic person's id that exists after seeding with any seed and at least one person.
pub const EXAMPLE_PERSON_ID: &str = "RF-0000001";

/// Persons generated and inserted per batch while seeding (bounds memory; one transaction overall).
const SEED_BATCH: usize = 500;

/// Errors of the register's library functions (the HTTP handler turns its own into problems).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The database failed.
    #[error("register database error: {0}")]
    Database(#[from] sqlx::Error),
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
pub async fn seed(store: &Store, persons: usize, seed: u64) -> Result<usize, RegistryError> {
    if count_persons(store).await? > 0 {
        return Ok(0);
    }
    let anchor = time::OffsetDateTime::now_utc().date();
    let started = std::time::Instant::now();
    let mut tx = store.pool().begin().await?;
    let mut next = 1usize;
    while next <= persons {
        let end = (next + SEED_BATCH).min(persons + 1);
        let batch: Vec<model::Person> = (next..end)
            .map(|i| synth::person(seed, i as u64, anchor))
            .collect();
        match db::insert_persons(&mut tx, &batch, db::max_params(store.backend())).await {
            Ok(()) => {}
            Err(e) if db::is_unique_violation(&e) => {
                tracing::info!("another process is seeding the register; leaving it to them");
                return Ok(0);
            }
            Err(e) => return Err(e.into()),
        }
        next = end;
    }
    match tx.commit().await {
        Ok(()) => {}
        Err(e) if db::is_unique_violation(&e) => return Ok(0),
        Err(e) => return Err(e.into()),
    }
    tracing::info!(
        persons,
        seed,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "register seeded with synthetic foreigners"
    );
    Ok(persons)
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
