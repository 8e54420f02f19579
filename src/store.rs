//! The database: one sqlx pool for SQLite (embedded default) or PostgreSQL
//! (several replicas), with the schema migrations embedded in the binary.
//!
//! Each database gets the schema of what it holds ([`Schema`]): the gateway's
//! (audit log, checkpoints, archives, consents; `migrations/gateway/`) or the
//! register's (`migrations/registry/`), or both when the two share one
//! database. Each schema keeps its own migration table, so neither set's
//! history constrains the other. A database created before the split (one
//! `_sqlx_migrations` table, every table present) is adopted on open: the
//! versions it already applied are marked applied in the new tables, and
//! only later ones run.
//!
//! Queries go through sqlx's `Any` driver so one code path serves both
//! backends. Write SQL with `$1, $2, …` placeholders (both backends accept
//! them) and stick to the types `Any` maps: integers, floats, text, blobs,
//! bools. Timestamps are stored as RFC 3339 text in UTC.
//!
//! Writes that must be durable go through [`WriteTx`]: a transaction that
//! fails anywhere — a statement, or the commit itself — is abandoned with its
//! connection, which is closed instead of going back to the pool. A pooled
//! connection never carries half a transaction: SQLite rolls a transaction
//! back by itself on some errors (`SQLITE_FULL`), sqlx's own rollback then
//! fails and leaves its nesting counter above zero, and the next `begin()` on
//! that connection becomes a `SAVEPOINT` whose "commit" is only a `RELEASE`
//! inside a transaction that is never committed (issue 13). The pool closes
//! any connection handed back while sqlx still counts a transaction open.
//!
//! Several replicas may share one PostgreSQL database: [`Store::setup_lock`]
//! serialises their one-time setup, and [`Store::lock_node`] makes each node
//! name (one audit chain) belong to one live process (see `locks`).

mod locks;
#[cfg(test)]
mod schema_tests;

pub use locks::{lock_key, NodeLock, NodeLockLost, SetupLock};

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Connection};

/// What a database holds, and so which migrations it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// The gateway's own tables: audit log, checkpoints, archives, consents.
    Gateway,
    /// The built-in register's tables.
    Registry,
}

/// The migration table of databases created before the schemas were split.
const LEGACY_MIGRATIONS_TABLE: &str = "_sqlx_migrations";

/// A migration set embedded at build time, with its own migration table.
macro_rules! migrator {
    ($dir:literal, $table:literal) => {
        LazyLock::new(|| {
            let mut m = sqlx::migrate!($dir);
            m.dangerous_set_table_name($table);
            m
        })
    };
}

static GATEWAY_SQLITE: LazyLock<Migrator> =
    migrator!("migrations/gateway/sqlite", "_karibche_gateway_migrations");
static GATEWAY_POSTGRES: LazyLock<Migrator> = migrator!(
    "migrations/gateway/postgres",
    "_karibche_gateway_migrations"
);
static REGISTRY_SQLITE: LazyLock<Migrator> = migrator!(
    "migrations/registry/sqlite",
    "_karibche_registry_migrations"
);
static REGISTRY_POSTGRES: LazyLock<Migrator> = migrator!(
    "migrations/registry/postgres",
    "_karibche_registry_migrations"
);

impl Schema {
    /// This schema's migrations for `backend`.
    pub fn migrator(self, backend: Backend) -> &'static Migrator {
        match (self, backend) {
            (Schema::Gateway, Backend::Sqlite) => &GATEWAY_SQLITE,
            (Schema::Gateway, Backend::Postgres) => &GATEWAY_POSTGRES,
            (Schema::Registry, Backend::Sqlite) => &REGISTRY_SQLITE,
            (Schema::Registry, Backend::Postgres) => &REGISTRY_POSTGRES,
        }
    }
}

/// The last version a database created before the schema split applied, if it is one.
///
/// Legacy version numbers are kept in both new sets (each set holds its share
/// of them), so "applied up to N" means the same in the new tables.
async fn legacy_version(pool: &AnyPool, backend: Backend) -> Result<Option<i64>, sqlx::Error> {
    if !has_table(pool, backend, LEGACY_MIGRATIONS_TABLE).await? {
        return Ok(None);
    }
    let (max,): (Option<i64>,) =
        sqlx::query_as("SELECT MAX(version) FROM _sqlx_migrations WHERE success = TRUE")
            .fetch_one(pool)
            .await?;
    Ok(max)
}

/// Whether the database has a table of that name (in the current schema on PostgreSQL).
pub(crate) async fn has_table(
    pool: &AnyPool,
    backend: Backend,
    name: &str,
) -> Result<bool, sqlx::Error> {
    let sql = match backend {
        Backend::Sqlite => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = $1",
        Backend::Postgres => {
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name = $1"
        }
    };
    let (n,): (i64,) = sqlx::query_as(sql).bind(name).fetch_one(pool).await?;
    Ok(n > 0)
}

/// Which database engine the store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite file, WAL mode, `synchronous=FULL`.
    Sqlite,
    /// A PostgreSQL server shared by replicas.
    Postgres,
}

/// Errors opening or migrating the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The URL names no backend karibche supports.
    #[error("unsupported database URL (expected sqlite:… or postgres://…): {0}")]
    UnsupportedUrl(String),
    /// The SQLite file or its directory could not be created (or made private).
    #[error("cannot create {path} privately: {source}")]
    CreateDir {
        /// The file or directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    /// A migration failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Another live process holds this node name.
    #[error("node name {node:?} is already held by {holder}: every replica needs its own node name (--node, KARIBCHE_NODE); stop the other process or choose another name")]
    NodeTaken {
        /// The node name.
        node: String,
        /// Who holds it, as far as can be told.
        holder: String,
    },
    /// A lock file beside the SQLite database could not be opened or locked.
    #[error("lock file {path}: {source}")]
    LockFile {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// A handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// The SQLite file (`None` for PostgreSQL and in-memory SQLite): its lock files go beside it.
    file: Option<Arc<PathBuf>>,
    /// Set by [`Store::guarded_by`]: audit batches commit only while this node lock is held.
    fence: Option<Arc<locks::Fence>>,
}

impl Store {
    /// Connects to the gateway's database at `url` (see [`Store::connect_with`]).
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        Store::connect_with(url, &[Schema::Gateway]).await
    }

    /// Connects to the register's database at `url` (see [`Store::connect_with`]).
    pub async fn connect_registry(url: &str) -> Result<Store, StoreError> {
        Store::connect_with(url, &[Schema::Registry]).await
    }

    /// Connects to `url`, creating a SQLite file (and its directory) if needed,
    /// and applies the embedded migrations of each of `schemas`.
    pub async fn connect_with(url: &str, schemas: &[Schema]) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = backend_of(url)?;
        let file = match backend {
            Backend::Sqlite => create_sqlite_file(url)?.map(Arc::new),
            Backend::Postgres => None,
        };
        let url = match backend {
            // `mode=rwc` lets SQLite create the file on first start.
            Backend::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_owned(),
        };
        let options = AnyConnectOptions::from_str(&url).map_err(StoreError::Connect)?;
        let max = match backend {
            // One writer at a time in SQLite anyway; readers share a few connections.
            Backend::Sqlite => 8,
            Backend::Postgres => 16,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            // A SQLite connection is a file handle in this process: the test query on every
            // acquire would only cost a round trip to its worker thread. A connection whose
            // transaction failed is closed instead (`WriteTx`); PostgreSQL's are tested.
            .test_before_acquire(backend == Backend::Postgres)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers run beside the audit writer; FULL makes
                        // every commit durable (one fsync per group commit).
                        sqlx::raw_sql(
                            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; \
                             PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;",
                        )
                        .execute(&mut *conn)
                        .await?;
                    }
                    Ok(())
                })
            })
            // A connection handed back inside a transaction (dropped mid-way, or whose
            // rollback failed) is closed, never lent out again with half a transaction.
            .after_release(|conn, _meta| Box::pin(async move { Ok(!conn.is_in_transaction()) }))
            .connect_with(options)
            .await
            .map_err(StoreError::Connect)?;
        let legacy = legacy_version(&pool, backend)
            .await
            .map_err(StoreError::Connect)?;
        for schema in schemas {
            let migrator = schema.migrator(backend);
            // sqlx's migrator holds a PostgreSQL advisory lock while it runs (skip
            // included), so replicas starting together migrate one after the other.
            if let Some(applied) = legacy {
                migrator.skip(&pool, Some(applied)).await?;
            }
            migrator.run(&pool).await?;
        }
        Ok(Store {
            pool,
            backend,
            file,
            fence: None,
        })
    }

    /// Waits until no other process is in its one-time setup on this database, and holds it off until released.
    pub async fn setup_lock(&self) -> Result<SetupLock, StoreError> {
        SetupLock::acquire(
            &self.pool,
            self.file.as_deref().map(PathBuf::as_path),
            self.backend == Backend::Postgres,
        )
        .await
    }

    /// Takes node name `node` for this process, or fails with [`StoreError::NodeTaken`] naming its holder.
    pub async fn lock_node(&self, node: &str) -> Result<NodeLock, StoreError> {
        NodeLock::acquire(
            &self.pool,
            self.file.as_deref().map(PathBuf::as_path),
            self.backend == Backend::Postgres,
            node,
        )
        .await
    }

    /// This store, for the audit writer of `lock`'s node: its batches commit only while `lock` holds.
    pub fn guarded_by(&self, lock: &NodeLock) -> Store {
        Store {
            fence: Some(lock.fence()),
            ..self.clone()
        }
    }

    /// Inside an audit batch's transaction: `Ok` unless this store is guarded by a node lock that is no longer held.
    pub async fn check_node_lock(&self, conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
        match &self.fence {
            Some(fence) => fence.check(conn).await,
            None => Ok(()),
        }
    }

    /// The connection pool.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The database engine behind the pool.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Checks that the database answers (for `/readyz`).
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// Closes every connection, waiting for those in use.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Starts a write transaction on a connection of its own (see [`WriteTx`]).
    ///
    /// SQLite takes the write lock at once (`BEGIN IMMEDIATE`), so a transaction
    /// that reads before it writes cannot fail half-way on a lock upgrade.
    pub async fn begin_write(&self) -> Result<WriteTx, sqlx::Error> {
        self.begin_write_on(None).await
    }

    /// [`Store::begin_write`] on `held`, a connection kept from an earlier
    /// [`WriteTx::commit_keep`] (none: one from the pool). A writer that commits
    /// often keeps its connection so it is not taken from the pool, and tested,
    /// for every transaction; one whose transaction failed was closed instead.
    pub async fn begin_write_on(
        &self,
        held: Option<PoolConnection<Any>>,
    ) -> Result<WriteTx, sqlx::Error> {
        let mut conn = match held {
            Some(conn) => conn,
            None => self.pool.acquire().await?,
        };
        if conn.is_in_transaction() {
            // Cannot happen with the release check above; never write into someone else's transaction.
            conn.close_on_drop();
            drop(conn);
            conn = self.pool.acquire().await?;
            if conn.is_in_transaction() {
                conn.close_on_drop();
                return Err(sqlx::Error::Protocol(
                    "pooled connection is inside a transaction".into(),
                ));
            }
        }
        let begin = match self.backend {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        };
        let mut tx = WriteTx {
            conn: Some(conn),
            committed: false,
        };
        sqlx::raw_sql(begin).execute(tx.conn()).await?;
        Ok(tx)
    }
}

/// A write transaction that owns its connection.
///
/// [`WriteTx::commit`] returns the connection to the pool only when `COMMIT`
/// succeeded. On any other path — a failed statement (the caller's `?`), a
/// failed commit, a dropped future — the connection is closed, which rolls
/// back whatever the database still holds open, so the next transaction
/// starts on a clean connection and nothing is ever answered for a commit
/// that only happened inside an enclosing transaction.
pub struct WriteTx {
    /// Always set; taken only by [`WriteTx::commit_keep`] once `COMMIT` succeeded.
    conn: Option<PoolConnection<Any>>,
    committed: bool,
}

impl std::fmt::Debug for WriteTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTx").finish_non_exhaustive()
    }
}

impl WriteTx {
    /// The connection to run the transaction's statements on.
    pub fn conn(&mut self) -> &mut AnyConnection {
        #[allow(clippy::expect_used)]
        self.conn
            .as_deref_mut()
            .expect("a write transaction holds its connection until it ends")
    }

    /// Commits; on failure the connection is closed with the transaction in it.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.commit_keep().await.map(drop)
    }

    /// Commits and hands the connection back for the writer's next transaction
    /// ([`Store::begin_write_on`]); on failure it is closed with the transaction in it.
    pub async fn commit_keep(mut self) -> Result<PoolConnection<Any>, sqlx::Error> {
        sqlx::raw_sql("COMMIT").execute(self.conn()).await?;
        self.committed = true;
        self.conn
            .take()
            .ok_or_else(|| sqlx::Error::Protocol("write transaction without its connection".into()))
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if let (false, Some(conn)) = (self.committed, self.conn.as_mut()) {
            conn.close_on_drop();
        }
    }
}

/// The backend a database URL names.
pub fn backend_of(url: &str) -> Result<Backend, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Backend::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Backend::Postgres)
    } else {
        Err(StoreError::UnsupportedUrl(url.to_owned()))
    }
}

/// Creates the SQLite file private (`0600`, its directory `0700`) before
/// SQLite opens it: SQLite gives `-wal` and `-shm` the database file's mode,
/// so they are private too. Files left readable by an older version are tightened.
/// Returns the file's path (`None` in memory).
fn create_sqlite_file(url: &str) -> Result<Option<PathBuf>, StoreError> {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" || url.contains("mode=memory") {
        return Ok(None);
    }
    let file = PathBuf::from(path);
    let path = Path::new(path);
    let failed = |p: &Path| {
        let path = p.display().to_string();
        move |source| StoreError::CreateDir { path, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::files::create_private_dir(dir).map_err(failed(dir))?;
    }
    if crate::files::ensure_private_file(path).map_err(failed(path))? {
        tracing::warn!(path = %path.display(), "database file was readable by others; made private (0600)");
    }
    for suffix in ["-wal", "-shm"] {
        let side = Path::new(&format!("{}{suffix}", path.display())).to_path_buf();
        crate::files::tighten(&side).map_err(failed(&side))?;
    }
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_from_url() {
        assert_eq!(backend_of("sqlite://var/k.db").unwrap(), Backend::Sqlite);
        assert_eq!(backend_of("postgres://u@h/db").unwrap(), Backend::Postgres);
        assert!(backend_of("mysql://h/db").is_err());
    }

    #[tokio::test]
    async fn sqlite_store_opens_and_migrates() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/sub/k.db", dir.path().display());
        let store = Store::connect(&url).await.unwrap();
        store.ping().await.unwrap();
        assert!(dir.path().join("sub/k.db").exists());
        use std::os::unix::fs::PermissionsExt;
        for (file, mode) in [("sub", 0o700), ("sub/k.db", 0o600), ("sub/k.db-wal", 0o600)] {
            let m = std::fs::metadata(dir.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(m & 0o777, mode, "{file}");
        }
    }
}
