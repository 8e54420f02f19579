//! Files that hold personal data or keys are created private: `0600`, and
//! the directories karibche creates for them `0700`, whatever the umask.
//!
//! The databases (and SQLite's `-wal`/`-shm`, which SQLite gives the database
//! file's mode), private keys, token signing keys, the audit and pseudonym
//! keys, and the exports the CLI writes all pass through here. A mode given
//! to `open` is only an upper bound (the umask removes bits, never adds
//! them), so each file's mode is also set explicitly once it is open; an
//! existing file is tightened, never loosened.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of files with personal data or keys.
pub const PRIVATE_FILE: u32 = 0o600;
/// Mode of the directories created for them.
pub const PRIVATE_DIR: u32 = 0o700;

/// Creates `dir` and any missing parents with mode `0700`; existing directories are left as they are.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR)
        .create(dir)
}

/// Creates (or truncates) `path` for writing with exactly `mode`, creating its directory private.
pub fn create_with_mode(path: &Path, mode: u32) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    file.set_permissions(Permissions::from_mode(mode))?;
    Ok(file)
}

/// Creates (or truncates) a private file (`0600`) for writing: exports, archives, keys.
pub fn create_private(path: &Path) -> io::Result<File> {
    create_with_mode(path, PRIVATE_FILE)
}

/// Creates a new private file (`0600`), failing if `path` exists.
pub fn create_new_private(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE)
        .open(path)?;
    file.set_permissions(Permissions::from_mode(PRIVATE_FILE))?;
    Ok(file)
}

/// Makes sure `path` exists and is private: created empty with `0600` if
/// missing, its group and other bits removed if present. Returns whether an
/// existing file had to be tightened.
pub fn ensure_private_file(path: &Path) -> io::Result<bool> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE)
        .open(path)
    {
        Ok(file) => {
            file.set_permissions(Permissions::from_mode(PRIVATE_FILE))?;
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => tighten(path),
        Err(e) => Err(e),
    }
}

/// Removes group and other permission bits from an existing file; `Ok(false)` if none were set or it is missing.
pub fn tighten(path: &Path) -> io::Result<bool> {
    let mode = match fs::metadata(path) {
        Ok(m) => m.permissions().mode(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if mode & 0o077 == 0 {
        return Ok(false);
    }
    fs::set_permissions(path, Permissions::from_mode(mode & 0o700))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn files_and_directories_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        let file = nested.join("x.db");
        assert!(!ensure_private_file(&file).unwrap());
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&nested), 0o700);
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        fs::set_permissions(&file, Permissions::from_mode(0o664)).unwrap();
        assert!(ensure_private_file(&file).unwrap(), "tightened");
        assert_eq!(mode(&file), 0o600);
        let export = dir.path().join("out/export.jsonl");
        drop(create_private(&export).unwrap());
        assert_eq!(mode(&export), 0o600);
        fs::set_permissions(&export, Permissions::from_mode(0o644)).unwrap();
        drop(create_private(&export).unwrap());
        assert_eq!(mode(&export), 0o600, "an existing file is made private too");
        assert!(create_new_private(&export).is_err());
        assert!(!tighten(&dir.path().join("missing")).unwrap());
    }
}
