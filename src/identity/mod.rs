//! Who is asking: the agency from its client certificate, read once per
//! connection; the officer from the token, verified per request ([`crate::identity::token`]).

pub mod crl;
pub mod inventory;
pub mod keys;
pub mod tls;
pub mod token;

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The URI SAN that names the gateway in its certificate; providers accept only this.
pub const GATEWAY_URI: &str = "urn:karibche:gateway";

/// What is known about a connection before any request on it is read.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The remote address.
    pub peer: SocketAddr,
    /// The verified client certificate's identity facts.
    pub client: Option<PeerCert>,
    /// Request pipelines of this connection still running, those whose
    /// stream the client reset included (bounded by the gateway).
    pub pipelines: Arc<AtomicUsize>,
}

/// The facts about a verified client certificate that policy can match on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCert {
    /// Lowercase hex SHA-256 of the DER certificate.
    pub sha256: String,
    /// URI subject alternative names.
    pub uri_sans: Vec<String>,
    /// DNS subject alternative names.
    pub dns_sans: Vec<String>,
    /// The subject distinguished name, RFC 4514 style.
    pub subject: String,
}

impl PeerCert {
    /// Reads the identity facts from a DER certificate (already verified by the TLS layer).
    pub fn from_der(der: &[u8]) -> Option<PeerCert> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let mut peer = PeerCert {
            sha256: crate::files::fingerprint(der),
            subject: cert.subject().to_string(),
            ..PeerCert::default()
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => peer.uri_sans.push((*u).to_owned()),
                    GeneralName::DNSName(d) => peer.dns_sans.push((*d).to_owned()),
                    _ => {}
                }
            }
        }
        Some(peer)
    }

    /// Whether this certificate carries the given URI SAN.
    pub fn has_uri(&self, uri: &str) -> bool {
        self.uri_sans.iter().any(|u| u == uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agency_certificate_names_its_agency() {
        let dir = tempfile::tempdir().unwrap();
        crate::devpki::ensure_dev_pki(dir.path(), &["psda"]).unwrap();
        let der = crate::files::load_certs(&dir.path().join("agencies/psda.pem")).unwrap();
        let peer = PeerCert::from_der(&der[0]).unwrap();
        assert!(peer.has_uri("urn:karibche:agency:psda"));
        assert!(peer.subject.contains("psda"));
        assert_eq!(peer.sha256.len(), 64);
        assert!(PeerCert::from_der(b"garbage").is_none());
    }
}
