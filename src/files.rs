//! Files on disk, in one place: certificates and keys read from PEM, the
//! SHA-256 that names files, certificates and bodies, and writes that are
//! private and atomic.
//!
//! Production code reads its certificates, hashes and writes its secrets
//! through here, never through the development PKI (`devpki`),
//! which only *makes* files.
//!
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
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

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

/// Mode of certificates and public keys: readable by all, written by the owner.
pub const PUBLIC_FILE: u32 = 0o644;

/// A file that could not be read or written, or holds no usable PEM object.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// A file holds no usable PEM object of the expected kind.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: String,
        /// What was wrong.
        what: String,
    },
}

impl FileError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: io::Error) -> FileError {
        FileError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// Unusable contents of `path`.
    pub fn pem(path: &Path, what: impl Into<String>) -> FileError {
        FileError::Pem {
            path: path.display().to_string(),
            what: what.into(),
        }
    }
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| FileError::pem(path, e.to_string()))?;
    if certs.is_empty() {
        return Err(FileError::pem(path, "no certificate found"));
    }
    Ok(certs)
}

/// Reads the private key in a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, FileError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| FileError::pem(path, e.to_string()))
}

/// SHA-256 of some bytes: token cache keys, change detection of watched files.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Lowercase hex SHA-256 of some bytes: fingerprints, digests of released bodies, file hashes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha256(bytes))
}

/// Lowercase hex SHA-256 of a DER certificate: the fingerprint policies may pin.
pub fn fingerprint(cert: &[u8]) -> String {
    sha256_hex(cert)
}

/// Writes `contents` to `path` with `mode`, through a synced temporary file and a
/// rename (creating the directory), so a crash never leaves half a key or secret.
/// The file gets exactly `mode` whatever the umask, its directory `0700` if created.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = create_with_mode(&tmp, mode)?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// [`write_atomic`] with the path named in the error.
pub fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), FileError> {
    write_atomic(path, contents.as_bytes(), mode).map_err(|e| FileError::io(path, e))
}

/// Writes a private key or secret atomically, mode `0600`.
pub fn write_private(path: &Path, contents: &str) -> Result<(), FileError> {
    write_file(path, contents, PRIVATE_FILE)
}

/// Writes a certificate, CRL or public key atomically, mode `0644`.
pub fn write_public(path: &Path, contents: &str) -> Result<(), FileError> {
    write_file(path, contents, PUBLIC_FILE)
}

/// A private scratch directory under the system's temporary directory,
/// removed with everything in it when dropped (`karibche audit bench`'s database).
#[derive(Debug)]
pub struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    /// Creates a fresh, uniquely named directory with mode `0700`.
    pub fn new() -> io::Result<ScratchDir> {
        let dir = std::env::temp_dir().join(format!("karibche-{}", uuid::Uuid::now_v7().simple()));
        DirBuilder::new().mode(PRIVATE_DIR).create(&dir)?;
        Ok(ScratchDir(dir))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
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

    #[test]
    fn a_scratch_directory_is_private_and_goes_away() {
        let scratch = ScratchDir::new().unwrap();
        let path = scratch.path().to_path_buf();
        assert_eq!(mode(&path), 0o700);
        fs::write(path.join("bench.db"), "x").unwrap();
        drop(scratch);
        assert!(!path.exists());
    }
}
