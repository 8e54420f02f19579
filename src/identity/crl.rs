//! Certificate revocation lists: loading them for the TLS verifier, and the
//! development CRL that `karibche certs revoke` writes.
//!
//! The gateway reads every configured CRL at start and again whenever a CRL
//! file changes ([`crate::reload`]); the client verifier then refuses revoked
//! certificates at the handshake. The development CRL (`<pki>/crl.pem`) is
//! signed by the development CA, valid for [`DEV_CRL_DAYS`] days, and re-signed
//! by `ensure_dev_pki` before it runs out, because an expired CRL makes the
//! gateway refuse every certificate of that CA (when `tls.enforce_crl_expiry`
//! is on, the default).

use std::path::{Path, PathBuf};

use rcgen::{
    CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::devpki::{DevCa, PkiError};

/// Days a development CRL is valid (its `nextUpdate`).
pub const DEV_CRL_DAYS: i64 = 30;

/// Re-sign the development CRL when fewer days than this remain.
const DEV_CRL_RENEW_DAYS: i64 = 7;

fn pem_err(path: &Path, what: impl Into<String>) -> PkiError {
    PkiError::Pem {
        path: path.display().to_string(),
        what: what.into(),
    }
}

/// Reads every CRL in a PEM (or DER) file.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, PkiError> {
    let bytes = std::fs::read(path).map_err(|source| PkiError::Io {
        path: path.display().to_string(),
        source,
    })?;
    if bytes.first() == Some(&0x30) {
        return Ok(vec![CertificateRevocationListDer::from(bytes)]);
    }
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e.to_string()))?;
    if crls.is_empty() {
        return Err(pem_err(path, "no X509 CRL block found"));
    }
    for crl in &crls {
        CertificateRevocationList::from_der(crl.as_ref())
            .map_err(|e| pem_err(path, format!("unreadable CRL: {e}")))?;
    }
    Ok(crls)
}

/// A revoked serial number with the time it was revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedSerial {
    /// The serial, big-endian without leading zeros.
    pub serial: Vec<u8>,
    /// When it was revoked.
    pub at: OffsetDateTime,
}

/// What a CRL file says: its number, next update and revoked serials.
#[derive(Debug, Clone)]
pub struct CrlSummary {
    /// The CRL number (0 when absent).
    pub number: u64,
    /// When the issuer promises the next CRL.
    pub next_update: Option<OffsetDateTime>,
    /// Revoked serials.
    pub revoked: Vec<RevokedSerial>,
}

/// Reads the first CRL of a file.
pub fn summarize(path: &Path) -> Result<CrlSummary, PkiError> {
    let crls = load_crls(path)?;
    let der = crls.first().ok_or_else(|| pem_err(path, "no CRL"))?;
    let (_, crl) = CertificateRevocationList::from_der(der.as_ref())
        .map_err(|e| pem_err(path, format!("unreadable CRL: {e}")))?;
    let number = crl
        .crl_number()
        .and_then(|n| u64::try_from(n.clone()).ok())
        .unwrap_or(0);
    let to_time =
        |t: x509_parser::time::ASN1Time| OffsetDateTime::from_unix_timestamp(t.timestamp()).ok();
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| RevokedSerial {
            serial: r.serial().to_bytes_be(),
            at: to_time(r.revocation_date).unwrap_or(OffsetDateTime::UNIX_EPOCH),
        })
        .collect();
    Ok(CrlSummary {
        number,
        next_update: crl.next_update().and_then(to_time),
        revoked,
    })
}

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
    crate::devpki::write_public(path, &crl.pem()?)
}

/// Creates the development CRL if missing, or re-signs it when it nears its `nextUpdate`.
/// Returns whether a new file was created.
pub fn ensure_dev_crl(pki_dir: &Path, ca: &DevCa) -> Result<bool, PkiError> {
    let path = crate::devpki::dev_crl_path(pki_dir);
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
    let (cert_path, _) = crate::devpki::agency_files(pki_dir, agency);
    let certs = crate::devpki::load_certs(&cert_path)?;
    let leaf = certs
        .first()
        .ok_or_else(|| pem_err(&cert_path, "no certificate"))?;
    let serial = serial_of(leaf).ok_or_else(|| pem_err(&cert_path, "unreadable certificate"))?;
    let ca = DevCa::open_dev(pki_dir)?;
    let path = crate::devpki::dev_crl_path(pki_dir);
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

/// A certificate's serial, big-endian without leading zeros.
pub fn serial_of(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let (_, c) = X509Certificate::from_der(cert.as_ref()).ok()?;
    Some(c.serial.to_bytes_be())
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
        let serial = serial_of(&crate::devpki::load_certs(&psda).unwrap()[0]).unwrap();
        assert_eq!(s.revoked[0].serial, serial);
        assert_eq!(hex::encode(&serial), r.serial);
        assert!(revoke_dev_agency(dir.path(), "nobody").is_err());
    }

    #[test]
    fn the_verifier_refuses_a_revoked_certificate() {
        let dir = tempfile::tempdir().unwrap();
        crate::devpki::ensure_dev_pki(dir.path(), &["psda", "ssg"]).unwrap();
        revoke_dev_agency(dir.path(), "psda").unwrap();
        let ca = crate::devpki::load_certs(&dir.path().join("ca.pem")).unwrap();
        let crls = load_crls(&crate::devpki::dev_crl_path(dir.path())).unwrap();
        let verifier = crate::identity::tls::client_verifier(&crate::identity::tls::ClientVerification {
            cas: ca,
            crls,
            allow_unknown_revocation: false,
            enforce_crl_expiry: true,
        })
        .unwrap();
        let now = rustls_pki_types::UnixTime::now();
        let cert = |a: &str| {
            crate::devpki::load_certs(&crate::devpki::agency_files(dir.path(), a).0)
                .unwrap()
                .remove(0)
        };
        let err = verifier
            .verify_client_cert(&cert("psda"), &[], now)
            .unwrap_err();
        assert!(format!("{err:?}").contains("Revoked"), "{err:?}");
        verifier.verify_client_cert(&cert("ssg"), &[], now).unwrap();
    }

    #[test]
    fn garbage_is_not_a_crl() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("crl.pem");
        std::fs::write(
            &p,
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        )
        .unwrap();
        assert!(load_crls(&p).is_err());
        std::fs::write(&p, "nothing").unwrap();
        assert!(load_crls(&p).is_err());
    }
}
