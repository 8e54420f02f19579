//! The migration sets: each database gets only its own tables, databases
//! created before the split keep opening, and the SQLite and PostgreSQL files
//! of a set say the same thing but where the dialects must differ.

use std::path::Path;

use regex::Regex;

use super::*;
use crate::audit::{AuditConfig, AuditLog, Entry};

async fn has_table(store: &Store, name: &str) -> bool {
    crate::store::has_table(store.pool(), store.backend(), name)
        .await
        .unwrap()
}

#[tokio::test]
async fn each_database_gets_only_its_own_tables() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = Store::connect(&format!("sqlite://{}/g.db", dir.path().display()))
        .await
        .unwrap();
    let registry = Store::connect_registry(&format!("sqlite://{}/r.db", dir.path().display()))
        .await
        .unwrap();
    for t in [
        "audit_log",
        "audit_checkpoints",
        "consents",
        "_karibche_gateway_migrations",
    ] {
        assert!(has_table(&gateway, t).await, "gateway lacks {t}");
        assert!(!has_table(&registry, t).await, "register has {t}");
    }
    for t in [
        "reg_persons",
        "reg_visas",
        "karibche_meta",
        "_karibche_registry_migrations",
    ] {
        assert!(has_table(&registry, t).await, "register lacks {t}");
        assert!(!has_table(&gateway, t).await, "gateway has {t}");
    }
    assert!(!has_table(&gateway, LEGACY_MIGRATIONS_TABLE).await);
}

/// Builds a database exactly as the code before the split did (one migrator,
/// every table, `_sqlx_migrations`), then opens it with today's code: it
/// must open as the gateway's and as the register's database, take records
/// and verify.
async fn legacy_database_opens_and_verifies(url: &str) {
    sqlx::any::install_default_drivers();
    let legacy = match backend_of(url).unwrap() {
        Backend::Sqlite => sqlx::migrate!("migrations/legacy/sqlite"),
        Backend::Postgres => sqlx::migrate!("migrations/legacy/postgres"),
    };
    {
        let raw = Store::connect_with(url, &[]).await.unwrap();
        legacy.run(raw.pool()).await.unwrap();
        raw.close().await;
    }
    let store = Store::connect(url).await.unwrap();
    let (log, writer) = AuditLog::start(store.clone(), AuditConfig::new("legacy-node"))
        .await
        .unwrap();
    for i in 0..3 {
        log.append(Entry {
            id: uuid::Uuid::now_v7().to_string(),
            ts: crate::audit::now_ts(),
            agency: Some("mia-border".into()),
            method: "GET".into(),
            path: format!("/v1/registry/persons/RF-{i}"),
            status: 200,
            ..Entry::default()
        })
        .await
        .unwrap();
    }
    log.close();
    drop(log);
    writer.finish().await;
    let report = crate::audit::verify(&store, None).await.unwrap();
    assert!(report.intact(), "{report}");
    store.close().await;
    // Opening again (adoption already done) and as the register's database.
    Store::connect(url).await.unwrap().close().await;
    let registry = Store::connect_registry(url).await.unwrap();
    crate::registry::seed(&registry, 3, 1).await.unwrap();
    assert_eq!(crate::registry::count_persons(&registry).await.unwrap(), 3);
    registry.close().await;
}

#[tokio::test]
async fn a_sqlite_database_from_before_the_split_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    legacy_database_opens_and_verifies(&format!("sqlite://{}/old.db", dir.path().display())).await;
}

#[tokio::test]
async fn a_postgres_database_from_before_the_split_keeps_working() {
    let Some(db) = crate::testing::PgDatabase::create().await else {
        eprintln!("PostgreSQL not reachable; skipped");
        return;
    };
    legacy_database_opens_and_verifies(&db.url).await;
}

/// One migration file as a list of statements, comments dropped, dialect
/// differences that are known and necessary rewritten to one spelling.
fn normalised(sql: &str, postgres: bool) -> Vec<String> {
    let text: String = sql
        .lines()
        .map(|l| l.split_once("--").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join(" ");
    let mut statements: Vec<String> = text
        .split(';')
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| !s.is_empty())
        .collect();
    let rules: &[(&str, &str)] = if postgres {
        &[
            // A random 32-bit key for every existing row: PostgreSQL takes a volatile default…
            (
                r"^ALTER TABLE (\w+) ADD COLUMN (\w+) BIGINT NOT NULL DEFAULT \(floor\(random\(\) \* 4294967296\)\)::bigint$",
                "ALTER TABLE $1 ADD COLUMN $2 <random u32>",
            ),
            // A backfill written with PostgreSQL's array functions.
            (r"^INSERT INTO (\w+) .*$", "<backfill $1>"),
            (r"\bBIGSERIAL PRIMARY KEY\b", "<serial key>"),
            (r"\bBYTEA\b", "BLOB"),
        ]
    } else {
        &[
            // …SQLite cannot, so it adds the column and then updates every row (dropped below).
            (
                r"^ALTER TABLE (\w+) ADD COLUMN (\w+) INTEGER NOT NULL DEFAULT 0$",
                "ALTER TABLE $1 ADD COLUMN $2 <maybe random u32>",
            ),
            // A backfill written with a recursive CTE.
            (
                r"^WITH RECURSIVE .* INSERT OR IGNORE INTO (\w+) .*$",
                "<backfill $1>",
            ),
            (r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b", "<serial key>"),
        ]
    };
    // Both spell a 64-bit integer either way (SQLite's INTEGER is 64-bit).
    let common: &[(&str, &str)] = &[(r"\bBIGINT\b", "INTEGER")];
    for s in &mut statements {
        for (pattern, with) in rules.iter().chain(common) {
            *s = Regex::new(pattern)
                .unwrap()
                .replace_all(s, *with)
                .into_owned();
        }
    }
    if !postgres {
        let random = Regex::new(r"^UPDATE (\w+) SET (\w+) = random\(\) & 4294967295$").unwrap();
        let updated: Vec<(String, String)> = statements
            .iter()
            .filter_map(|s| {
                random
                    .captures(s)
                    .map(|c| (c[1].to_owned(), c[2].to_owned()))
            })
            .collect();
        statements.retain(|s| !random.is_match(s));
        for s in &mut statements {
            for (table, column) in &updated {
                let maybe = format!("ALTER TABLE {table} ADD COLUMN {column} <maybe random u32>");
                if *s == maybe {
                    *s = format!("ALTER TABLE {table} ADD COLUMN {column} <random u32>");
                }
            }
        }
        for s in &mut statements {
            // A zero default no UPDATE filled in is a plain zero default.
            *s = s.replace("<maybe random u32>", "INTEGER NOT NULL DEFAULT 0");
        }
    }
    statements
}

#[test]
fn sqlite_and_postgres_files_differ_only_where_they_must() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    for set in ["gateway", "registry", "legacy"] {
        let names = |db: &str| {
            let mut v: Vec<String> = std::fs::read_dir(root.join(set).join(db))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let (sqlite, postgres) = (names("sqlite"), names("postgres"));
        assert_eq!(sqlite, postgres, "{set}: the two backends have other files");
        assert!(!sqlite.is_empty(), "{set}: no migrations");
        for name in &sqlite {
            let read =
                |db: &str| std::fs::read_to_string(root.join(set).join(db).join(name)).unwrap();
            let (a, b) = (
                normalised(&read("sqlite"), false),
                normalised(&read("postgres"), true),
            );
            assert_eq!(
                a, b,
                "{set}/{name}: SQLite and PostgreSQL differ beyond the known dialect differences"
            );
        }
    }
}
