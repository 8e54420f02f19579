//! The development PKI: a CA, certificates, a CRL and token signing keys for
//! a gateway that runs out of the box, and tokens signed with those keys.
//!
//! Nothing in the request path uses this room: production deployments bring
//! their own certificates, CRLs and agency keys, which the gateway reads
//! through [`crate::files`] and [`crate::identity`]. The CLI (`certs init`,
//! `certs revoke`, `token issue`), `serve` on a fresh data directory, the
//! bench and the tests make their files here.
//!
//! On first start (and by `karibche certs init`) karibche generates, under
//! `<data_dir>/pki/`, one development CA, a certificate for the gateway (used
//! both as its server certificate and as its client certificate towards
//! providers), one for the built-in register, and a client certificate for
//! every agency in the policy files; under `<data_dir>/keys/` each agency's
//! token signing key. Existing files are never overwritten. All keys are
//! ECDSA P-256. Production deployments bring their own files instead.

pub mod crl;
pub mod token;

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::files::{write_private, write_public, FileError};
use crate::identity::GATEWAY_URI;

/// The URI SAN that names an agency in its development certificate.
pub fn agency_uri(agency: &str) -> String {
    format!("urn:karibche:agency:{agency}")
}

/// Errors creating development certificates and keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file could not be read or written, or holds no usable PEM object.
    #[error(transparent)]
    File(#[from] FileError),
    /// Certificate generation failed.
    #[error("generating a certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| FileError::io(path, source).into()
}

/// A certificate authority that can sign leaf certificates (development only).
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl DevCa {
    /// A fresh CA with the given common name, valid ten years.
    pub fn generate(common_name: &str) -> Result<DevCa, PkiError> {
        let key = KeyPair::generate()?;
        let params = ca_params(common_name);
        let cert = params.self_signed(&key)?;
        Ok(DevCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA loaded back from its certificate and key files.
    fn load(cert_path: &Path, key_path: &Path, common_name: &str) -> Result<DevCa, PkiError> {
        let cert_pem = fs::read_to_string(cert_path).map_err(io_err(cert_path))?;
        let key_pem = fs::read_to_string(key_path).map_err(io_err(key_path))?;
        let key =
            KeyPair::from_pem(&key_pem).map_err(|e| FileError::pem(key_path, e.to_string()))?;
        // Re-deriving the parameters gives the same subject and key identifier,
        // which is all a signature by this CA depends on.
        Ok(DevCa {
            cert_pem,
            issuer: Issuer::new(ca_params(common_name), key),
        })
    }

    /// The development CA of a PKI directory (`ca.pem`, `ca.key`), to issue or revoke with.
    pub fn open_dev(pki_dir: &Path) -> Result<DevCa, PkiError> {
        DevCa::load(
            &pki_dir.join("ca.pem"),
            &pki_dir.join("ca.key"),
            DEV_CA_NAME,
        )
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a leaf certificate; returns (certificate PEM, key PEM).
    pub fn issue(&self, leaf: &Leaf) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "karibche development");
        dn.push(DnType::CommonName, leaf.common_name.as_str());
        params.distinguished_name = dn;
        let now = OffsetDateTime::now_utc() - Duration::days(leaf.backdate_days);
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(leaf.days);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = Vec::new();
        if leaf.server {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if leaf.client {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        for name in &leaf.dns {
            params.subject_alt_names.push(match name.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into()?),
            });
        }
        for uri in &leaf.uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// What a leaf certificate should say.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// Subject common name.
    pub common_name: String,
    /// DNS names and IP addresses.
    pub dns: Vec<String>,
    /// URI SANs (identities such as `urn:karibche:agency:psda`).
    pub uris: Vec<String>,
    /// May act as a TLS server.
    pub server: bool,
    /// May act as a TLS client.
    pub client: bool,
    /// Days of validity.
    pub days: i64,
    /// Days the whole validity window is shifted into the past (0 normally; tests of expiry).
    pub backdate_days: i64,
}

impl Leaf {
    /// A client certificate for an agency.
    pub fn agency(agency: &str) -> Leaf {
        Leaf {
            common_name: agency.to_owned(),
            dns: Vec::new(),
            uris: vec![agency_uri(agency)],
            server: false,
            client: true,
            days: 365,
            backdate_days: 0,
        }
    }

    /// A server certificate for localhost with the given identity URI (and client use if asked).
    pub fn local_server(common_name: &str, uri: Option<&str>, client: bool) -> Leaf {
        Leaf::server(common_name, uri, client, &[])
    }

    /// A server certificate for localhost and `extra` host names or addresses (a compose
    /// service or Kubernetes Service name), with the given identity URI and client use if asked.
    pub fn server(common_name: &str, uri: Option<&str>, client: bool, extra: &[String]) -> Leaf {
        let mut dns: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        for name in extra {
            if !dns.contains(name) {
                dns.push(name.clone());
            }
        }
        Leaf {
            common_name: common_name.to_owned(),
            dns,
            uris: uri.map(|u| vec![u.to_owned()]).unwrap_or_default(),
            server: true,
            client,
            days: 365,
            backdate_days: 0,
        }
    }
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "karibche development");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(3650);
    params
}

const DEV_CA_NAME: &str = "karibche development CA";

/// What `ensure_dev_pki` created (empty when everything existed).
#[derive(Debug, Default)]
pub struct PkiReport {
    /// Files written, in order.
    pub created: Vec<PathBuf>,
}

/// Paths of one agency's development certificate and key.
pub fn agency_files(pki_dir: &Path, agency: &str) -> (PathBuf, PathBuf) {
    let dir = pki_dir.join("agencies");
    (
        dir.join(format!("{agency}.pem")),
        dir.join(format!("{agency}.key")),
    )
}

/// Host names the gateway's and the register's certificates carry besides localhost, for
/// deployments that reach them by a service name (compose, Kubernetes).
#[derive(Debug, Clone, Default)]
pub struct ServerNames {
    /// Extra DNS names or IP addresses of the gateway's certificate.
    pub gateway: Vec<String>,
    /// Extra DNS names or IP addresses of the register's certificate.
    pub registry: Vec<String>,
}

/// Creates the development CA, gateway, register and agency certificates that are missing.
pub fn ensure_dev_pki(pki_dir: &Path, agencies: &[&str]) -> Result<PkiReport, PkiError> {
    ensure_dev_pki_named(pki_dir, agencies, &ServerNames::default())
}

/// [`ensure_dev_pki`] with extra names in the gateway's and the register's certificates.
///
/// Names only apply to certificates created now: an existing certificate is kept as it is
/// (delete it, or the whole directory, to reissue it with new names).
pub fn ensure_dev_pki_named(
    pki_dir: &Path,
    agencies: &[&str],
    names: &ServerNames,
) -> Result<PkiReport, PkiError> {
    let mut report = PkiReport::default();
    crate::files::create_private_dir(&pki_dir.join("agencies")).map_err(io_err(pki_dir))?;
    let (ca_pem, ca_key) = (pki_dir.join("ca.pem"), pki_dir.join("ca.key"));
    let ca = if ca_pem.exists() && ca_key.exists() {
        DevCa::load(&ca_pem, &ca_key, DEV_CA_NAME)?
    } else {
        let key = KeyPair::generate()?;
        let params = ca_params(DEV_CA_NAME);
        let cert = params.self_signed(&key)?;
        write_private(&ca_key, &key.serialize_pem())?;
        write_public(&ca_pem, &cert.pem())?;
        report.created.extend([ca_pem.clone(), ca_key.clone()]);
        DevCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    };
    let mut wanted = vec![
        (
            pki_dir.join("gateway.pem"),
            pki_dir.join("gateway.key"),
            Leaf::server("karibche gateway", Some(GATEWAY_URI), true, &names.gateway),
        ),
        (
            pki_dir.join("registry.pem"),
            pki_dir.join("registry.key"),
            Leaf::server(
                "karibche register of foreigners",
                None,
                false,
                &names.registry,
            ),
        ),
    ];
    for agency in agencies {
        let (pem, key) = agency_files(pki_dir, agency);
        wanted.push((pem, key, Leaf::agency(agency)));
    }
    for (pem, key, leaf) in wanted {
        if pem.exists() && key.exists() {
            continue;
        }
        let (cert_pem, key_pem) = ca.issue(&leaf)?;
        write_private(&key, &key_pem)?;
        write_public(&pem, &cert_pem)?;
        report.created.extend([pem, key]);
    }
    if crl::ensure_dev_crl(pki_dir, &ca)? {
        report.created.push(dev_crl_path(pki_dir));
    }
    Ok(report)
}

/// The development CRL: `<pki_dir>/crl.pem`, signed by the development CA.
pub fn dev_crl_path(pki_dir: &Path) -> PathBuf {
    pki_dir.join("crl.pem")
}

/// Paths of an agency's token signing key and its public half.
pub fn signing_key_files(keys_dir: &Path, agency: &str) -> (PathBuf, PathBuf) {
    (
        keys_dir.join(format!("{agency}.key")),
        keys_dir.join(format!("{agency}.pub.pem")),
    )
}

/// Creates the development token signing keys (ES256) of agencies that have none.
pub fn ensure_signing_keys(keys_dir: &Path, agencies: &[&str]) -> Result<PkiReport, PkiError> {
    let mut report = PkiReport::default();
    crate::files::create_private_dir(keys_dir).map_err(io_err(keys_dir))?;
    for agency in agencies {
        let (private, public) = signing_key_files(keys_dir, agency);
        if private.exists() && public.exists() {
            continue;
        }
        let key = KeyPair::generate()?;
        write_private(&private, &key.serialize_pem())?;
        write_public(&public, &key.public_key_pem())?;
        report.created.extend([private, public]);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_pki_is_created_once_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let first = ensure_dev_pki(&pki, &["psda", "geostat"]).unwrap();
        assert_eq!(
            first.created.len(),
            2 + 2 + 2 + 4 + 1,
            "CA, gateway, register, agencies, CRL"
        );
        let again = ensure_dev_pki(&pki, &["psda", "geostat", "ssg"]).unwrap();
        assert_eq!(again.created.len(), 2, "only the new agency is issued");
        let certs = crate::files::load_certs(&pki.join("agencies/ssg.pem")).unwrap();
        assert_eq!(certs.len(), 1);
        crate::files::load_key(&pki.join("agencies/ssg.key")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(pki.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "private keys are not readable by others");
        assert_eq!(crate::files::fingerprint(&certs[0]).len(), 64);
    }

    #[test]
    fn server_names_are_in_the_gateway_and_register_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let names = ServerNames {
            gateway: vec!["gateway-a".into(), "gateway.karibche.svc".into()],
            registry: vec!["registry".into(), "10.0.0.7".into()],
        };
        ensure_dev_pki_named(dir.path(), &["psda"], &names).unwrap();
        let sans = |file: &str| -> Vec<String> {
            let der = crate::files::load_certs(&dir.path().join(file)).unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(der[0].as_ref()).unwrap();
            let san = cert.subject_alternative_name().unwrap().unwrap();
            san.value
                .general_names
                .iter()
                .map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
                    x509_parser::extensions::GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
                    other => format!("{other:?}"),
                })
                .collect()
        };
        let gateway = sans("gateway.pem");
        for name in ["localhost", "gateway-a", "gateway.karibche.svc"] {
            assert!(gateway.contains(&name.to_string()), "{name} in {gateway:?}");
        }
        assert!(
            gateway.iter().any(|n| n.contains(GATEWAY_URI)),
            "the gateway keeps its identity URI: {gateway:?}"
        );
        assert!(!gateway.contains(&"registry".to_string()));
        let registry = sans("registry.pem");
        assert!(registry.contains(&"registry".to_string()), "{registry:?}");
        assert!(
            registry.contains(&"ip:[10, 0, 0, 7]".to_string()),
            "an address becomes an IP SAN: {registry:?}"
        );
        assert!(!registry.contains(&"gateway-a".to_string()));
    }

    #[test]
    fn signing_keys_are_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let r = ensure_signing_keys(dir.path(), &["psda"]).unwrap();
        assert_eq!(r.created.len(), 2);
        assert!(ensure_signing_keys(dir.path(), &["psda"])
            .unwrap()
            .created
            .is_empty());
    }
}
