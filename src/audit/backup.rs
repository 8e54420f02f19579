//! `audit backup`: a consistent copy of a live audit log that verifies.
//!
//! SQLite keeps recent commits in its write-ahead log (`karibche.db-wal`)
//! until a checkpoint moves them into the main file, so copying
//! `karibche.db` alone while the gateway runs loses records without
//! breaking the chain: the copy verifies and is silently short. `VACUUM
//! INTO` instead writes, inside one read transaction, a self-contained copy
//! of everything committed when it started, while the gateway goes on
//! writing; the copy is then opened and its chains verified before this
//! reports success.
//!
//! PostgreSQL's tool for the same is `pg_dump` (one snapshot, online): it is
//! run when it is on the `PATH`, and otherwise its exact command is
//! returned for the operator to run.

use std::path::{Path, PathBuf};

use crate::store::{Backend, Store, StoreError};

use super::{AuditError, VerifyReport};

/// Errors of [`backup`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// The target exists; a backup never overwrites a file.
    #[error("{0} exists; a backup never overwrites a file")]
    Exists(PathBuf),
    /// The live database or the copy could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Making the copy failed.
    #[error("the copy failed: {0}")]
    Copy(#[from] sqlx::Error),
    /// Verifying the copy failed to run.
    #[error("the copy could not be verified: {0}")]
    Verify(#[from] AuditError),
    /// The copy was made but its chains do not verify; it is left in place for inspection.
    #[error("the copy {path} does not verify:\n{report}")]
    NotIntact {
        /// The copy.
        path: PathBuf,
        /// What verification found.
        report: VerifyReport,
    },
    /// `pg_dump` could not be started or failed.
    #[error("pg_dump failed: {0}")]
    PgDump(String),
}

/// What [`backup`] did.
#[derive(Debug)]
#[non_exhaustive]
pub enum BackupOutcome {
    /// A SQLite copy, verified.
    Sqlite {
        /// The copy.
        path: PathBuf,
        /// Its size in bytes.
        bytes: u64,
        /// Its chains, verified.
        report: VerifyReport,
    },
    /// A PostgreSQL dump written by `pg_dump` (custom format, for `pg_restore`).
    PgDump {
        /// The dump.
        path: PathBuf,
        /// The command that made it (the database URL as given).
        command: String,
    },
    /// `pg_dump` is not installed here: the command to run where it is.
    PgDumpCommand {
        /// The exact command.
        command: String,
    },
}

/// Backs up the audit log in `store` (at `database_url`) to `out`, which must not exist.
///
/// SQLite: `VACUUM INTO`, then the copy's chains are verified; PostgreSQL: `pg_dump
/// --format=custom` if it is installed, else the command is returned.
pub async fn backup(
    store: &Store,
    database_url: &str,
    out: &Path,
) -> Result<BackupOutcome, BackupError> {
    if tokio::fs::try_exists(out).await.unwrap_or(true) {
        return Err(BackupError::Exists(out.to_path_buf()));
    }
    match store.backend() {
        Backend::Sqlite => sqlite_backup(store, out).await,
        Backend::Postgres => pg_backup(database_url, out).await,
    }
}

async fn sqlite_backup(store: &Store, out: &Path) -> Result<BackupOutcome, BackupError> {
    let target = out.to_string_lossy().into_owned();
    // One read transaction of its own: a snapshot of every commit before it began, WAL included.
    sqlx::query("VACUUM INTO $1")
        .bind(target)
        .execute(store.pool())
        .await?;
    let copy = Store::connect(&format!("sqlite://{}", out.display())).await?;
    let report = super::verify(&copy, None).await;
    copy.close().await;
    let report = report?;
    if !report.intact() {
        return Err(BackupError::NotIntact {
            path: out.to_path_buf(),
            report,
        });
    }
    let bytes = tokio::fs::metadata(out).await.map_or(0, |m| m.len());
    Ok(BackupOutcome::Sqlite {
        path: out.to_path_buf(),
        bytes,
        report,
    })
}

/// The `pg_dump` command line that backs up `database_url` to `out`.
pub fn pg_dump_args(database_url: &str, out: &Path) -> Vec<String> {
    vec![
        "--format=custom".to_owned(),
        "--no-owner".to_owned(),
        format!("--file={}", out.display()),
        format!("--dbname={database_url}"),
    ]
}

async fn pg_backup(database_url: &str, out: &Path) -> Result<BackupOutcome, BackupError> {
    let args = pg_dump_args(database_url, out);
    let command = format!("pg_dump {}", shell_words(&args));
    let run = tokio::process::Command::new("pg_dump")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    match run {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(BackupOutcome::PgDumpCommand { command })
        }
        Err(e) => Err(BackupError::PgDump(e.to_string())),
        Ok(o) if o.status.success() => Ok(BackupOutcome::PgDump {
            path: out.to_path_buf(),
            command,
        }),
        Ok(o) => Err(BackupError::PgDump(format!(
            "{}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
    }
}

/// Arguments quoted for a POSIX shell where they need it, for printing.
fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_=./:@%+,".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pg_dump_command_is_quoted_for_a_shell() {
        let args = pg_dump_args(
            "postgres://gw@db/karibche",
            Path::new("/backups/audit it.dump"),
        );
        assert_eq!(
            format!("pg_dump {}", shell_words(&args)),
            "pg_dump --format=custom --no-owner '--file=/backups/audit it.dump' \
             --dbname=postgres://gw@db/karibche"
        );
    }
}
