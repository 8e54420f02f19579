//! The development CRL that `karibche certs revoke` writes.
//!
//! `<pki>/crl.pem` is signed by the development CA, valid for
//! [`DEV_CRL_DAYS`] days, and re-signed by [`super::ensure_dev_pki`] before it
//! runs out, because an expired CRL makes the gateway refuse every
//! certificate of that CA (when `tls.enforce_crl_expiry` is on, the default).

use std::path::{Path, PathBuf};

use rcgen::{
    CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use super::{DevCa, PkiError};
use crate::files::{load_certs, write_public, FileError};
use crate::identity::crl::{serial_of, summarize, RevokedSerial};

/// Days a development CRL is valid (its `nextUpdate`).
pub const DEV_CRL_DAYS: i64 = 30;

/// Re-sign the development CRL when fewer days than this remain.
const DEV_CRL_RENEW_DAYS: i64 = 7;

/// Writes the development CRL listing `revoked`, numbered `number`.
fn write_dev_crl(
    path: &Path,
    ca: &DevCa,
    number: u64,
    revoked: &[RevokedSerial],
) -> Result<(), PkiError> {
    let now = OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now - Duration::minutes(5),
        next_update: now + Duration::days(DEV_CRL_DAYS),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|r| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&r.serial),
                revocation_time: r.at,
                reason_code: Some(RevocationReason::Unspecified),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&ca.issuer)?;
    Ok(write_public(path, &crl.pem()?)?)
}

/// Creates the development CRL if missing, or re-signs it when it nears its `nextUpdate`.
/// Returns whether a new file was created.
pub fn ensure_dev_crl(pki_dir: &Path, ca: &DevCa) -> Result<bool, PkiError> {
    let path = super::dev_crl_path(pki_dir);
    if !path.exists() {
        write_dev_crl(&path, ca, 1, &[])?;
        return Ok(true);
    }
    let s = summarize(&path)?;
    let soon = OffsetDateTime::now_utc() + Duration::days(DEV_CRL_RENEW_DAYS);
    if s.next_update.is_none_or(|n| n < soon) {
        write_dev_crl(&path, ca, s.number + 1, &s.revoked)?;
        tracing::info!(crl = %path.display(), "development CRL re-signed before it runs out");
    }
    Ok(false)
}

/// What `revoke_dev_agency` did.
#[derive(Debug, Clone)]
pub struct Revocation {
    /// The certificate revoked.
    pub certificate: PathBuf,
    /// Its serial, hex.
    pub serial: String,
    /// The CRL written.
    pub crl: PathBuf,
    /// False when the certificate was already on the list.
    pub newly_revoked: bool,
}

/// Adds an agency's development certificate to the development CRL (signed by the development CA).
/// A running gateway picks the new CRL up within its reload interval.
pub fn revoke_dev_agency(pki_dir: &Path, agency: &str) -> Result<Revocation, PkiError> {
    let (cert_path, _) = super::agency_files(pki_dir, agency);
    let certs = load_certs(&cert_path)?;
    let leaf = certs
        .first()
        .ok_or_else(|| FileError::pem(&cert_path, "no certificate"))?;
    let serial =
        serial_of(leaf).ok_or_else(|| FileError::pem(&cert_path, "unreadable certificate"))?;
    let ca = DevCa::open_dev(pki_dir)?;
    let path = super::dev_crl_path(pki_dir);
    let (number, mut revoked) = if path.exists() {
        let s = summarize(&path)?;
        (s.number + 1, s.revoked)
    } else {
        (1, Vec::new())
    };
    let newly_revoked = !revoked.iter().any(|r| r.serial == serial);
    if newly_revoked {
        revoked.push(RevokedSerial {
            serial: serial.clone(),
            at: OffsetDateTime::now_utc() - Duration::seconds(1),
        });
    }
    write_dev_crl(&path, &ca, number, &revoked)?;
    Ok(Revocation {
        certificate: cert_path,
        serial: hex::encode(&serial),
        crl: path,
        newly_revoked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoking_an_agency_lists_its_serial_once_and_counts_up() {
        let dir = tempfile::tempdir().unwrap();
        crate::devpki::ensure_dev_pki(dir.path(), &["psda", "ssg"]).unwrap();
        let path = crate::devpki::dev_crl_path(dir.path());
        let empty = summarize(&path).unwrap();
        assert!(empty.revoked.is_empty());
        assert!(empty.next_update.unwrap() > OffsetDateTime::now_utc() + Duration::days(20));

        let r = revoke_dev_agency(dir.path(), "psda").unwrap();
        assert!(r.newly_revoked);
        let again = revoke_dev_agency(dir.path(), "psda").unwrap();
        assert!(!again.newly_revoked);
        revoke_dev_agency(dir.path(), "ssg").unwrap();
        let s = summarize(&path).unwrap();
        assert_eq!(s.revoked.len(), 2);
        assert_eq!(s.number, empty.number + 3);
        let (psda, _) = crate::devpki::agency_files(dir.path(), "psda");
        let serial = serial_of(&load_certs(&psda).unwrap()[0]).unwrap();
        assert_eq!(s.revoked[0].serial, serial);
        assert_eq!(hex::encode(&serial), r.serial);
        assert!(revoke_dev_agency(dir.path(), "nobody").is_err());
    }
}
