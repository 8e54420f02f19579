//! Certificate revocation lists: loading them for the TLS verifier and
//! reading what they say (for the certificate inventory and `certs revoke`).
//!
//! The gateway reads every configured CRL at start and again whenever a CRL
//! file changes (`crate::runtime`'s credential reload); the client verifier
//! then refuses revoked certificates at the handshake. The development CRL is
//! written by the development PKI (`devpki::crl`).

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::files::FileError;

fn pem_err(path: &Path, what: impl Into<String>) -> FileError {
    FileError::pem(path, what)
}

/// Reads every CRL in a PEM (or DER) file.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, FileError> {
    let bytes = std::fs::read(path).map_err(|e| FileError::io(path, e))?;
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
pub fn summarize(path: &Path) -> Result<CrlSummary, FileError> {
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

/// A certificate's serial, big-endian without leading zeros.
pub fn serial_of(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let (_, c) = X509Certificate::from_der(cert.as_ref()).ok()?;
    Some(c.serial.to_bytes_be())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verifier_refuses_a_revoked_certificate() {
        let dir = tempfile::tempdir().unwrap();
        crate::devpki::ensure_dev_pki(dir.path(), &["psda", "ssg"]).unwrap();
        crate::devpki::crl::revoke_dev_agency(dir.path(), "psda").unwrap();
        let ca = crate::files::load_certs(&dir.path().join("ca.pem")).unwrap();
        let crls = load_crls(&crate::devpki::dev_crl_path(dir.path())).unwrap();
        let verifier =
            crate::identity::tls::client_verifier(&crate::identity::tls::ClientVerification {
                cas: ca,
                crls,
                allow_unknown_revocation: false,
                enforce_crl_expiry: true,
            })
            .unwrap();
        let now = rustls_pki_types::UnixTime::now();
        let cert = |a: &str| {
            crate::files::load_certs(&crate::devpki::agency_files(dir.path(), a).0)
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
