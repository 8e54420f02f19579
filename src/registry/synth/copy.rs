//! Loading synthetic persons into PostgreSQL with `COPY`, the bulk path
//! [`super::super::seed`] takes there.
//!
//! Sampling `pg_stat_activity` once a second while the earlier loader seeded
//! 200,000 persons found the server in its `INSERT … SELECT FROM
//! jsonb_array_elements(…)` statements 44 times out of 48 (the JSON taken
//! apart row by row, each child row's foreign key looked up in its person,
//! the `person_id` indexes kept up row by row), the index rebuilds in the
//! rest. So, in one transaction: the secondary indexes and the foreign keys
//! are dropped, every batch goes in by `COPY … FROM STDIN` (text format), then
//! the indexes are rebuilt (one sort each) and the foreign keys added back,
//! which checks every row against its person in one join. A register is
//! seeded completely or not at all, and no other session sees the tables
//! without their constraints (the `ALTER TABLE`s hold their locks until the
//! commit).

use sqlx::{Connection, Executor};

use crate::registry::db::{self, PersonRows, PERSON_TABLES};
use crate::registry::RegistryError;
use crate::store::Store;

/// Seeds `persons` persons into the (empty) register of `store`, a PostgreSQL store.
pub(crate) async fn seed(
    store: &Store,
    persons: usize,
    seed: u64,
    anchor: time::Date,
) -> Result<usize, RegistryError> {
    // COPY needs the PostgreSQL connection itself, which the `Any` pool does not expose:
    // one connection of its own, to the pool's database.
    let url = store.pool().connect_options().database_url.clone();
    let mut conn = sqlx::PgConnection::connect(url.as_str()).await?;
    let result = load(&mut conn, persons, seed, anchor).await;
    let _ = conn.close().await;
    result
}

async fn load(
    conn: &mut sqlx::PgConnection,
    persons: usize,
    seed: u64,
    anchor: time::Date,
) -> Result<usize, RegistryError> {
    let (mut rx_rows, generators) = super::super::spawn_generators(persons, seed, anchor, true);
    let mut tx = conn.begin().await?;
    // Index rebuilds sort in memory rather than in temporary files; this transaction only.
    tx.execute("SET LOCAL maintenance_work_mem = '256MB'")
        .await?;
    let indexes: Vec<(String, String)> = sqlx::query_as(db::PG_SECONDARY_INDEXES)
        .fetch_all(&mut *tx)
        .await?;
    let foreign_keys: Vec<(String, String, String)> =
        sqlx::query_as(FOREIGN_KEYS).fetch_all(&mut *tx).await?;
    // Names and definitions below come from the database's own catalogue, not from input.
    for (table, name, _) in &foreign_keys {
        tx.execute(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {table} DROP CONSTRAINT {name}"
        )))
        .await?;
    }
    for (name, _) in &indexes {
        tx.execute(sqlx::AssertSqlSafe(format!("DROP INDEX {name}")))
            .await?;
    }
    while let Some(rows) = rx_rows.recv().await {
        match copy_persons(&mut tx, rows).await {
            Ok(()) => {}
            Err(e) if db::is_unique_violation(&e) => {
                tracing::info!("another process is seeding the register; leaving it to them");
                return Ok(0);
            }
            Err(e) => return Err(e.into()),
        }
    }
    super::super::join_generators(generators).await?;
    for (_, create) in &indexes {
        tx.execute(sqlx::AssertSqlSafe(create.clone())).await?;
    }
    for (table, name, definition) in &foreign_keys {
        tx.execute(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {table} ADD CONSTRAINT {name} {definition}"
        )))
        .await?;
    }
    match tx.commit().await {
        Ok(()) => Ok(persons),
        Err(e) if db::is_unique_violation(&e) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// One batch, a `COPY` per table.
async fn copy_persons(conn: &mut sqlx::PgConnection, rows: PersonRows) -> Result<(), sqlx::Error> {
    for (table, rows) in PERSON_TABLES.iter().zip(rows.tables) {
        let Some(text) = rows.finish_copy() else {
            continue;
        };
        let mut copy = conn.copy_in_raw(&db::copy_sql(table)).await?;
        if let Err(e) = copy.send(text).await {
            // The connection must leave COPY mode before it can report anything else.
            let _ = copy.abort(e.to_string()).await;
            return Err(e);
        }
        copy.finish().await?;
    }
    Ok(())
}

/// The person tables' foreign keys as `(table, name, definition)`.
const FOREIGN_KEYS: &str = "SELECT c.conrelid::regclass::text, c.conname::text, \
     pg_get_constraintdef(c.oid) FROM pg_constraint c \
     WHERE c.contype = 'f' AND c.connamespace = current_schema()::regnamespace \
     AND c.conrelid::regclass::text IN ('reg_person_nationalities', 'reg_documents', \
     'reg_visas', 'reg_residence_permits', 'reg_work_permits', 'reg_crossings', \
     'reg_asylum_cases', 'reg_entry_bans') ORDER BY 1, 2";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::PgDatabase;

    /// Every row of every person table, as text (NULL as `~`), `ckey` left out, sorted.
    async fn all_rows(store: &Store) -> Vec<String> {
        let mut out = Vec::new();
        for table in PERSON_TABLES {
            let cells: Vec<String> = table
                .cols
                .iter()
                .map(|(c, _)| format!("COALESCE(CAST({c} AS TEXT), '~')"))
                .collect();
            let sql = format!("SELECT {} FROM {}", cells.join(" || '|' || "), table.name);
            let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_all(store.pool())
                .await
                .unwrap();
            out.extend(rows.into_iter().map(|r| format!("{}: {r}", table.name)));
        }
        out.sort();
        out
    }

    async fn foreign_key_count(store: &Store) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM ({FOREIGN_KEYS}) f"
        )))
        .fetch_one(store.pool())
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn postgres_gets_the_same_register_as_sqlite_and_its_foreign_keys_back() {
        let Some((pg, _guard)) = PgDatabase::store().await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let sqlite = Store::connect_registry(&format!("sqlite://{}/r.db", dir.path().display()))
            .await
            .unwrap();
        let keys = foreign_key_count(&pg).await;
        assert_eq!(keys, 8, "every record table refers to its person");
        // Several batches, the last one partial.
        let persons = 2 * crate::registry::SEED_BATCH + 17;
        assert_eq!(
            crate::registry::seed(&pg, persons, 11).await.unwrap(),
            persons
        );
        assert_eq!(
            crate::registry::seed(&sqlite, persons, 11).await.unwrap(),
            persons
        );
        let (a, b) = (all_rows(&pg).await, all_rows(&sqlite).await);
        assert!(a.len() > persons * 3, "{} rows", a.len());
        assert!(a == b, "PostgreSQL and SQLite hold different registers");
        assert_eq!(foreign_key_count(&pg).await, keys);
        let orphan = sqlx::query(
            "INSERT INTO reg_documents (id, person_id, kind, number, issuing_state, issued_on, \
             valid_until) VALUES ('D-x', 'RF-9999999', 'passport', 'X1', 'TR', '2020-01-01', \
             '2030-01-01')",
        )
        .execute(pg.pool())
        .await;
        assert!(orphan.is_err(), "the foreign key is enforced again");
        let keyed: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT ckey) FROM reg_persons")
            .fetch_one(pg.pool())
            .await
            .unwrap();
        assert!(keyed > persons as i64 / 2, "each record drew its own key");
        pg.close().await;
        sqlite.close().await;
    }

    #[tokio::test]
    async fn copy_text_carries_tabs_backslashes_and_newlines() {
        let Some((pg, _guard)) = PgDatabase::store().await else {
            return;
        };
        let anchor = time::OffsetDateTime::now_utc().date();
        let mut p = super::super::person(1, 1, anchor);
        p.names.surname = "Tab\there Back\\slash\nNew\rline \\N".to_owned();
        p.personal_number = None;
        let mut rows = PersonRows::for_copy();
        rows.add(&p);
        let url = pg.pool().connect_options().database_url.clone();
        let mut conn = sqlx::PgConnection::connect(url.as_str()).await.unwrap();
        copy_persons(&mut conn, rows).await.unwrap();
        let (surname, number): (String, Option<String>) =
            sqlx::query_as("SELECT surname, personal_number FROM reg_persons WHERE id = $1")
                .bind(&p.id)
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert_eq!(surname, p.names.surname);
        assert_eq!(number, None, "\\N is NULL, a name \\N is text");
        conn.close().await.unwrap();
        pg.close().await;
    }
}
