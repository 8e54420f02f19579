//! Test support shared by the unit tests and the integration tests in
//! `tests/`: throw-away databases on SQLite and PostgreSQL, and a Redis of a
//! test's own ([`RedisServer`]) that it may stop.
//!
//! PostgreSQL tests use the server at `KARIBCHE_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/test`), create a fresh database per
//! test and drop it afterwards, so tests stay parallel-safe. When the server
//! is unreachable they are skipped with a note — except under CI (`CI` set),
//! where that is a failure.

use sqlx::Connection;

use crate::store::{Schema, Store};

/// Test stores hold both schemas: a test may put audit records and register data side by side.
const BOTH_SCHEMAS: &[Schema] = &[Schema::Gateway, Schema::Registry];

/// The PostgreSQL server tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("KARIBCHE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A fresh PostgreSQL database, dropped when this value is dropped (even on panic).
#[derive(Debug)]
pub struct PgDatabase {
    /// URL of the new database.
    pub url: String,
    name: String,
}

impl PgDatabase {
    /// Creates a database, or `None` (with a note) when PostgreSQL is unreachable outside CI.
    pub async fn create() -> Option<PgDatabase> {
        sqlx::any::install_default_drivers();
        let admin_url = postgres_admin_url();
        let mut admin = match sqlx::AnyConnection::connect(&admin_url).await {
            Ok(conn) => conn,
            Err(err) if std::env::var_os("CI").is_none() => {
                eprintln!("note: PostgreSQL at {admin_url} unreachable ({err}); skipping");
                return None;
            }
            Err(err) => panic!("PostgreSQL at {admin_url} unreachable in CI: {err}"),
        };
        let name = format!("k_{}", uuid::Uuid::now_v7().simple());
        if let Err(err) = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
        {
            panic!("cannot create test database {name}: {err}");
        }
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url.as_str(), |(b, _)| b);
        Some(PgDatabase {
            url: format!("{base}/{name}"),
            name,
        })
    }

    /// Creates a database and opens a migrated store on it.
    pub async fn store() -> Option<(Store, PgDatabase)> {
        let db = PgDatabase::create().await?;
        match Store::connect_with(&db.url, BOTH_SCHEMAS).await {
            Ok(store) => Some((store, db)),
            Err(err) => panic!("cannot open test database: {err}"),
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let admin_url = postgres_admin_url();
        // Drop may run inside a test's runtime, which must not block: use a
        // thread with its own.
        let done = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = sqlx::AnyConnection::connect(&admin_url).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                        .execute(&mut conn)
                        .await;
                }
            });
        });
        let _ = done.join();
    }
}

/// A migrated SQLite store in a fresh temporary directory (kept alive by the returned guard).
pub async fn sqlite_store() -> (Store, tempfile::TempDir) {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(err) => panic!("cannot create a temporary directory: {err}"),
    };
    match Store::connect_with(
        &format!("sqlite://{}/t.db", dir.path().display()),
        BOTH_SCHEMAS,
    )
    .await
    {
        Ok(store) => (store, dir),
        Err(err) => panic!("cannot open test database: {err}"),
    }
}

/// A `redis-server` of the test's own, on a free port in a temporary
/// directory, so the test may stall (SIGSTOP) or kill it without touching the
/// shared Redis. Killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: std::process::Child,
    /// `redis://127.0.0.1:PORT`.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one and waits (bounded) until it answers PING; `None` if it cannot be started.
    pub async fn start() -> Option<RedisServer> {
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().ok()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let server = RedisServer {
            child,
            url: format!("redis://127.0.0.1:{port}"),
            _dir: dir,
        };
        let client = redis::Client::open(server.url.as_str()).ok()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                let pong: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut conn).await;
                if pong.is_ok() {
                    return Some(server);
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        None
    }

    /// Sends `signal` (`-STOP`, `-CONT`, `-KILL`, …) to the server.
    pub fn signal(&self, signal: &str) {
        let _ = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status();
    }

    /// Kills the server and waits for it to go.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal("-CONT");
            self.stop();
        }
    }
}
