//! Locks that let several replicas share one database safely.
//!
//! - The **setup lock** serialises what every replica does once on a fresh
//!   database (seeding the register, bringing stored search keys up to date),
//!   so replicas started at the same moment take turns instead of tripping
//!   over each other's half-built tables.
//! - The **node lock** makes a node name — one hash chain — belong to one
//!   live process at a time: a second process started with the same name is
//!   refused, with the holder named.
//!
//! PostgreSQL: session-level advisory locks, each on a dedicated connection
//! (a pooled one would keep the lock after going back to the pool). The
//! server drops them with the session, so a SIGKILLed holder frees its name
//! as soon as its socket closes. SQLite: an exclusive `flock` on a file
//! beside the database, which the kernel drops with the process.
//!
//! Losing the node lock must not leave a process writing its chain
//! unguarded. On PostgreSQL the lock session can die while the process lives
//! (server restart, connection killed); so every audit batch checks, inside
//! its own transaction, that this process's lock session still holds the name
//! ([`super::Store::check_node_lock`]), and a watchdog notices a dead lock
//! session within [`WATCH_EVERY`] and takes the name again on a new
//! connection once it is free. Until then every batch fails: requests get
//! 503 and the node reports not ready (fail closed). If another process took
//! the name meanwhile, this one stays fenced, logs who holds it, and keeps
//! trying. Records the other process wrote in between are safe: the chain's
//! `(node, seq)` key refuses a stale head, and the writer then reloads it.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::{AnyConnection, AnyPool, ConnectOptions, Connection};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::StoreError;

/// How often the watchdog checks that the node lock's session is alive (PostgreSQL).
pub const WATCH_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for the lock session to answer before it is taken for dead.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// Longest a new lock session may take to connect and take the name before the watchdog tries again.
const TAKE_WITHIN: Duration = Duration::from_secs(10);
/// Longest [`NodeLock::release`] waits for the watchdog to unlock; then its connection is dropped.
const RELEASE_WITHIN: Duration = Duration::from_secs(5);
/// PostgreSQL keeps this many bytes of `application_name`.
const APPLICATION_NAME_BYTES: usize = 63;

/// A 64-bit advisory lock key for `name` of `kind`: the first 8 bytes of a tagged SHA-256.
///
/// 64 bits make a collision with another name (or with sqlx's own migration
/// lock, the other user of this key space) negligible.
pub fn lock_key(kind: &str, name: &str) -> i64 {
    let tagged = format!("karibche {kind} lock\0{name}");
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, tagged.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    i64::from_be_bytes(first)
}

/// The two halves `pg_locks` shows a bigint advisory key as (`classid`, `objid`).
fn key_halves(key: i64) -> (i64, i64) {
    let bits = key as u64;
    ((bits >> 32) as i64, (bits & 0xFFFF_FFFF) as i64)
}

/// Who this process is, as the other side of a refusal should read it.
fn whoami() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "an unknown host".to_owned());
    format!("pid {} on {host}", std::process::id())
}

/// A dedicated connection with the pool's options, outside the pool.
async fn dedicated(pool: &AnyPool) -> Result<AnyConnection, sqlx::Error> {
    pool.connect_options().connect().await
}

/// Held while a replica does its one-time setup; [`SetupLock::release`] lets the next one in.
///
/// Dropping it releases it too (the connection or file closes), only less promptly.
#[derive(Debug)]
pub struct SetupLock {
    held: SetupHeld,
}

#[derive(Debug)]
enum SetupHeld {
    /// In-memory SQLite: private to this process, nothing to share.
    Nothing,
    File(File),
    Postgres {
        conn: AnyConnection,
        key: i64,
    },
}

impl SetupLock {
    /// Waits for the setup lock of the database behind `pool` (or the SQLite `file`).
    pub(super) async fn acquire(
        pool: &AnyPool,
        file: Option<&Path>,
        postgres: bool,
    ) -> Result<SetupLock, StoreError> {
        let held = if postgres {
            let key = lock_key("setup", "database");
            let mut conn = dedicated(pool).await.map_err(StoreError::Connect)?;
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(key)
                .execute(&mut conn)
                .await
                .map_err(StoreError::Connect)?;
            SetupHeld::Postgres { conn, key }
        } else if let Some(db) = file {
            let path = sibling(db, "setup");
            let file = tokio::task::spawn_blocking(move || -> Result<File, StoreError> {
                let file = open_lock_file(&path)?;
                file.lock().map_err(|source| StoreError::LockFile {
                    path: path.display().to_string(),
                    source,
                })?;
                Ok(file)
            })
            .await
            .map_err(|e| StoreError::LockFile {
                path: db.display().to_string(),
                source: std::io::Error::other(e),
            })??;
            SetupHeld::File(file)
        } else {
            SetupHeld::Nothing
        };
        Ok(SetupLock { held })
    }

    /// Releases the lock now.
    pub async fn release(self) {
        match self.held {
            SetupHeld::Nothing => {}
            SetupHeld::File(file) => {
                let _ = file.unlock();
            }
            SetupHeld::Postgres { mut conn, key } => {
                let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(key)
                    .execute(&mut conn)
                    .await;
                let _ = conn.close().await;
            }
        }
    }
}

/// This process's hold on a node name; released by [`NodeLock::release`], or when the process ends.
#[derive(Debug)]
pub struct NodeLock {
    node: String,
    fence: Arc<Fence>,
    /// PostgreSQL: the watchdog task that owns the lock connection, and how to stop it.
    watchdog: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

/// What an audit batch checks before it commits: that the node lock is still this process's.
#[derive(Debug)]
pub(super) struct Fence {
    node: String,
    kind: FenceKind,
    /// Set by [`NodeLock::release`]: whatever still holds the fence may write no more.
    released: AtomicBool,
}

#[derive(Debug)]
enum FenceKind {
    /// The lock file, held open and locked for the process's life.
    File { file: File, path: PathBuf },
    /// The backend pid of the session that holds the advisory lock; 0 while not held.
    Postgres { key: i64, pid: AtomicI32 },
    /// In-memory SQLite: nothing another process could share.
    Nothing,
}

/// The error an audit batch fails with when its node lock is gone.
#[derive(Debug, thiserror::Error)]
#[error("this process no longer holds node name {node:?}; nothing is written to its chain until it does again")]
pub struct NodeLockLost {
    /// The node name.
    pub node: String,
}

impl Fence {
    /// `Ok` while the lock is this process's; checked on `conn`, inside the batch's transaction.
    pub(super) async fn check(&self, conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
        let held = !self.released.load(Ordering::Acquire)
            && match &self.kind {
                FenceKind::Nothing => true,
                FenceKind::File { file, path } => same_file(file, path),
                FenceKind::Postgres { key, pid } => {
                    let pid = pid.load(Ordering::Acquire);
                    pid != 0 && session_holds(conn, *key, pid).await?
                }
            };
        if held {
            Ok(())
        } else {
            Err(sqlx::Error::Io(std::io::Error::other(NodeLockLost {
                node: self.node.clone(),
            })))
        }
    }
}

/// Whether the open, locked file is still the one at `path` (not deleted or replaced under us).
fn same_file(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

/// Whether the session with backend `pid` holds advisory lock `key` (asked on any connection).
async fn session_holds(conn: &mut AnyConnection, key: i64, pid: i32) -> Result<bool, sqlx::Error> {
    let (class, obj) = key_halves(key);
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND objsubid = 1 AND classid::bigint = $1 AND objid::bigint = $2 AND pid = $3",
    )
    .bind(class)
    .bind(obj)
    .bind(pid)
    .fetch_one(conn)
    .await?;
    Ok(n > 0)
}

impl NodeLock {
    /// Takes `node` for this process, or says who holds it.
    pub(super) async fn acquire(
        pool: &AnyPool,
        file: Option<&Path>,
        postgres: bool,
        node: &str,
    ) -> Result<NodeLock, StoreError> {
        if postgres {
            let key = lock_key("node", node);
            let (conn, pid) = match take_pg(pool, node, key).await {
                Ok(taken) => taken,
                Err(PgTake::Held(holder)) => {
                    return Err(StoreError::NodeTaken {
                        node: node.to_owned(),
                        holder,
                    })
                }
                Err(PgTake::Db(e)) => return Err(StoreError::Connect(e)),
            };
            let fence = Arc::new(Fence {
                node: node.to_owned(),
                kind: FenceKind::Postgres {
                    key,
                    pid: AtomicI32::new(pid),
                },
                released: AtomicBool::new(false),
            });
            let (stop, stopped) = oneshot::channel();
            let task = tokio::spawn(watch(
                conn,
                pool.clone(),
                node.to_owned(),
                fence.clone(),
                stopped,
            ));
            return Ok(NodeLock {
                node: node.to_owned(),
                fence,
                watchdog: Some((stop, task)),
            });
        }
        let kind = match file {
            Some(db) => {
                let path = sibling(db, &format!("node-{}", file_safe(node)));
                let file = lock_node_file(&path, node)?;
                FenceKind::File { file, path }
            }
            None => FenceKind::Nothing,
        };
        Ok(NodeLock {
            node: node.to_owned(),
            fence: Arc::new(Fence {
                node: node.to_owned(),
                kind,
                released: AtomicBool::new(false),
            }),
            watchdog: None,
        })
    }

    /// The node name held.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether the lock is held right now (PostgreSQL: the watchdog's latest view).
    pub fn is_held(&self) -> bool {
        match &self.fence.kind {
            FenceKind::Postgres { pid, .. } => pid.load(Ordering::Acquire) != 0,
            _ => true,
        }
    }

    pub(super) fn fence(&self) -> Arc<Fence> {
        self.fence.clone()
    }

    /// Gives the name up (after the last record of this process is written).
    pub async fn release(mut self) {
        self.fence.released.store(true, Ordering::Release);
        if let Some((stop, mut task)) = self.watchdog.take() {
            let _ = stop.send(());
            // A hung connection must not hold up shutdown: dropping it ends the session too.
            if tokio::time::timeout(RELEASE_WITHIN, &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        if let FenceKind::File { file, .. } = &self.fence.kind {
            let _ = file.unlock();
        }
    }
}

impl Drop for NodeLock {
    fn drop(&mut self) {
        // Not released: the watchdog's connection closes with its task, and the server drops the lock.
        if let Some((_, task)) = self.watchdog.take() {
            task.abort();
        }
    }
}

/// Why the advisory lock was not taken.
enum PgTake {
    /// Another session holds it: who.
    Held(String),
    /// The database failed.
    Db(sqlx::Error),
}

impl From<sqlx::Error> for PgTake {
    fn from(e: sqlx::Error) -> Self {
        PgTake::Db(e)
    }
}

/// Opens a lock session named after this process and takes `key`; returns it and its backend pid.
async fn take_pg(pool: &AnyPool, node: &str, key: i64) -> Result<(AnyConnection, i32), PgTake> {
    let mut conn = dedicated(pool).await?;
    let mut name = format!("karibche node {node}, {}", whoami());
    if name.len() > APPLICATION_NAME_BYTES {
        let mut end = APPLICATION_NAME_BYTES;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    sqlx::query("SELECT set_config('application_name', $1, false)")
        .bind(name)
        .execute(&mut conn)
        .await?;
    let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(&mut conn)
        .await?;
    if !taken {
        let holder = pg_holder(&mut conn, key).await;
        let _ = conn.close().await;
        return Err(PgTake::Held(holder));
    }
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await?;
    Ok((conn, pid))
}

/// Describes the session holding advisory lock `key`: its name, address and start.
async fn pg_holder(conn: &mut AnyConnection, key: i64) -> String {
    let (class, obj) = key_halves(key);
    let row: Result<Option<(String, String, String, i32)>, _> = sqlx::query_as(
        "SELECT COALESCE(a.application_name, ''), COALESCE(host(a.client_addr), 'a local socket'), \
         COALESCE(a.backend_start::text, '?'), l.pid FROM pg_locks l \
         LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
         AND l.classid::bigint = $1 AND l.objid::bigint = $2 LIMIT 1",
    )
    .bind(class)
    .bind(obj)
    .fetch_optional(conn)
    .await;
    match row {
        Ok(Some((app, addr, since, pid))) if !app.is_empty() => {
            format!("PostgreSQL session {pid} \"{app}\" from {addr}, connected since {since}")
        }
        Ok(Some((_, addr, since, pid))) => {
            format!("PostgreSQL session {pid} from {addr}, connected since {since}")
        }
        Ok(None) => "a PostgreSQL session that has just ended; retry".to_owned(),
        Err(e) => format!("another PostgreSQL session (cannot say which: {e})"),
    }
}

/// Keeps the node lock: checks its session every [`WATCH_EVERY`], fences the writer when the
/// session is gone, and takes the name again once it can. Unlocks at `stop`.
async fn watch(
    conn: AnyConnection,
    pool: AnyPool,
    node: String,
    fence: Arc<Fence>,
    mut stop: oneshot::Receiver<()>,
) {
    let FenceKind::Postgres { key, pid } = &fence.kind else {
        return;
    };
    let key = *key;
    let mut conn = Some(conn);
    let mut last_complaint = String::new();
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        if let Some(c) = conn.as_mut() {
            let own = pid.load(Ordering::Acquire);
            let alive = tokio::time::timeout(ANSWER_WITHIN, session_holds(c, key, own)).await;
            if matches!(alive, Ok(Ok(true))) {
                continue;
            }
            pid.store(0, Ordering::Release);
            conn = None;
            tracing::error!(
                node = %node,
                "the session holding this node's name is gone; audit writes are refused until the name is held again"
            );
        }
        let taken = tokio::time::timeout(TAKE_WITHIN, take_pg(&pool, &node, key))
            .await
            .unwrap_or_else(|_| {
                Err(PgTake::Db(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer from the database",
                ))))
            });
        match taken {
            Ok((c, new_pid)) => {
                pid.store(new_pid, Ordering::Release);
                conn = Some(c);
                last_complaint.clear();
                tracing::warn!(node = %node, "node name held again; audit writes resume");
            }
            Err(PgTake::Held(holder)) => {
                let complaint = format!("node name {node:?} is now held by {holder}");
                if complaint != last_complaint {
                    tracing::error!(node = %node, %holder, "another process took this node's name; this one stays fenced");
                    last_complaint = complaint;
                }
            }
            Err(PgTake::Db(e)) => {
                let complaint = e.to_string();
                if complaint != last_complaint {
                    tracing::warn!(node = %node, err = %e, "cannot take the node name again yet; retrying");
                    last_complaint = complaint;
                }
            }
        }
    }
    if let Some(mut c) = conn {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(key)
            .execute(&mut c)
            .await;
        let _ = c.close().await;
    }
}

/// `DB.KIND.lock`, beside the SQLite file.
fn sibling(db: &Path, kind: &str) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{kind}.lock"));
    db.with_file_name(name)
}

/// A node name as part of a file name: itself when plainly safe, else a digest of it.
fn file_safe(node: &str) -> String {
    let plain = node.len() <= 64
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if plain {
        node.to_owned()
    } else {
        format!("{:016x}", lock_key("node", node) as u64)
    }
}

/// Opens (creating it private, `0600`, like every file beside the database) a lock file.
fn open_lock_file(path: &Path) -> Result<File, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = || {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(crate::files::PRIVATE_FILE)
            .open(path)?;
        crate::files::tighten(path)?;
        Ok(file)
    };
    open().map_err(|source| StoreError::LockFile {
        path: path.display().to_string(),
        source,
    })
}

/// Takes the exclusive lock on the node's file and writes who holds it; or says who does.
fn lock_node_file(path: &Path, node: &str) -> Result<File, StoreError> {
    let io_err = |source| StoreError::LockFile {
        path: path.display().to_string(),
        source,
    };
    let mut file = open_lock_file(path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => format!("another process (it locks {})", path.display()),
                h => format!("{h} (it locks {})", path.display()),
            };
            return Err(StoreError::NodeTaken {
                node: node.to_owned(),
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err(e)),
    }
    let since = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    file.set_len(0).map_err(io_err)?;
    file.rewind().map_err(io_err)?;
    writeln!(file, "{}, since {since}", whoami()).map_err(io_err)?;
    file.flush().map_err(io_err)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_by_kind_and_name_and_split_as_postgres_shows_them() {
        assert_ne!(lock_key("node", "n1"), lock_key("node", "n2"));
        assert_ne!(lock_key("node", "n1"), lock_key("setup", "n1"));
        let (class, obj) = key_halves(-2);
        assert_eq!((class, obj), (0xFFFF_FFFF, 0xFFFF_FFFE));
    }

    #[test]
    fn lock_file_names_are_safe_for_any_node_name() {
        assert_eq!(file_safe("node-1"), "node-1");
        let odd = file_safe("../etc/passwd");
        assert!(odd.chars().all(|c| c.is_ascii_hexdigit()), "{odd}");
        assert_eq!(
            sibling(Path::new("/v/karibche.db"), "node-a"),
            Path::new("/v/karibche.db.node-a.lock")
        );
    }
}
