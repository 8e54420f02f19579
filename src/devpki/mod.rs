//! The development PKI and loading of certificates and keys.
//!
//! On first start (and by `karibche certs init`) karibche generates, under
//! `<data_dir>/pki/`, one development CA, a certificate for the gateway (used
//! both as its server certificate and as its client certificate towards
//! providers), one for the built-in register, and a client certificate for
//! every agency in the policy files; under `<data_dir>/keys/` each agency's
//! token signing key. Existing files are never overwritten. All keys are
//! ECDSA P-256. Production deployments bring their own files instead.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

/// The URI SAN that names an agency in its development certificate.
pub fn agency_uri(agency: &str) -> String {
    format!("urn:karibche:agency:{agency}")
}

/// The URI SAN that names the gateway in its certificate; providers accept only this.
pub const GATEWAY_URI: &str = "urn:karibche:gateway";

/// Errors creating or loading certificates and keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A file holds no usable PEM object of the expected kind.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: String,
        /// What was wrong.
        what: String,
    },
    /// Certificate generation failed.
    #[error("generating a certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| PkiError::Pem {
            path: path.display().to_string(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::Pem {
            path: path.display().to_string(),
            what: "no certificate found".to_owned(),
        });
    }
    Ok(certs)
}

/// Reads the private key in a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| PkiError::Pem {
        path: path.display().to_string(),
        what: e.to_string(),
    })
}

/// Lowercase hex SHA-256 of a DER certificate: the fingerprint policies may pin.
pub fn fingerprint(cert: &[u8]) -> String {
    sha256_hex(cert)
}

/// Lowercase hex SHA-256 of some bytes: fingerprints, digests of released bodies, file hashes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes))
}

/// A certificate authority that can sign leaf certificates (development only).
pub struct DevCa {
    pub(crate) issuer: Issuer<'static, KeyPair>,
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
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Pem {
            path: key_path.display().to_string(),
            what: e.to_string(),
        })?;
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
        Leaf {
            common_name: common_name.to_owned(),
            dns: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
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

/// Creates the development CA, gateway, register and agency certificates that are missing.
pub fn ensure_dev_pki(pki_dir: &Path, agencies: &[&str]) -> Result<PkiReport, PkiError> {
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
            Leaf::local_server("karibche gateway", Some(GATEWAY_URI), true),
        ),
        (
            pki_dir.join("registry.pem"),
            pki_dir.join("registry.key"),
            Leaf::local_server("karibche register of foreigners", None, false),
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
    if crate::identity::crl::ensure_dev_crl(pki_dir, &ca)? {
        report.created.push(dev_crl_path(pki_dir));
    }
    Ok(report)
}

/// The development CRL: `<pki_dir>/crl.pem`, signed by the development CA.
pub fn dev_crl_path(pki_dir: &Path) -> PathBuf {
    pki_dir.join("crl.pem")
}

/// One certificate (or CRL) the gateway's files hold, and when it runs out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    /// Short name: `gateway`, `registry`, `client_ca:<CN>`, `provider_ca:<CN>`, `agency:<id>`, `crl:<file>`.
    pub label: String,
    /// The file.
    pub path: PathBuf,
    /// The subject (or, for a CRL, the issuer).
    pub subject: String,
    /// `notAfter` (a CRL's `nextUpdate`), seconds since the epoch.
    pub not_after: i64,
    /// A CRL rather than a certificate (its issuer re-signs it routinely, days before `nextUpdate`).
    pub is_crl: bool,
}

impl Expiry {
    /// Whole and fractional days left from `now` (negative once expired).
    pub fn days_left(&self, now: OffsetDateTime) -> f64 {
        (self.not_after - now.unix_timestamp()) as f64 / 86_400.0
    }
}

fn cert_expiry(label: &str, path: &Path, der: &[u8], with_cn: bool) -> Option<Expiry> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = c
        .subject()
        .iter_common_name()
        .next()
        .and_then(|n| n.as_str().ok())
        .unwrap_or("?")
        .to_owned();
    Some(Expiry {
        label: if with_cn {
            format!("{label}:{cn}")
        } else {
            label.to_owned()
        },
        path: path.to_path_buf(),
        subject: c.subject().to_string(),
        not_after: c.validity().not_after.timestamp(),
        is_crl: false,
    })
}

/// Every certificate and CRL the configuration names, plus development agency certificates
/// under `<pki>/agencies/`; files that cannot be read are reported as errors, not skipped.
pub fn inventory(config: &crate::config::Config) -> Vec<Result<Expiry, PkiError>> {
    let t = &config.tls;
    let mut out = Vec::new();
    let leaf = |label: &str, p: &Path, out: &mut Vec<Result<Expiry, PkiError>>| match load_certs(p)
    {
        Ok(certs) => {
            if let Some(e) = certs.first().and_then(|c| cert_expiry(label, p, c, false)) {
                out.push(Ok(e));
            }
        }
        Err(e) => out.push(Err(e)),
    };
    leaf("gateway", &config.data_path(&t.cert), &mut out);
    if config.registry.enabled {
        leaf("registry", &config.data_path(&t.registry_cert), &mut out);
    }
    let bundle =
        |label: &str, p: &Path, out: &mut Vec<Result<Expiry, PkiError>>| match load_certs(p) {
            Ok(certs) => out.extend(
                certs
                    .iter()
                    .filter_map(|c| cert_expiry(label, p, c, true))
                    .map(Ok),
            ),
            Err(e) => out.push(Err(e)),
        };
    for p in &t.client_ca {
        bundle("client_ca", &config.data_path(p), &mut out);
    }
    bundle("provider_ca", &config.data_path(&t.provider_ca), &mut out);
    for p in &t.crls {
        let p = config.data_path(p);
        match crate::identity::crl::summarize(&p) {
            Ok(s) => out.push(Ok(Expiry {
                label: format!(
                    "crl:{}",
                    p.file_name()
                        .map(|f| f.to_string_lossy())
                        .unwrap_or_default()
                ),
                subject: format!("{} revoked", s.revoked.len()),
                path: p,
                not_after: s
                    .next_update
                    .map(|t| t.unix_timestamp())
                    .unwrap_or(i64::MAX),
                is_crl: true,
            })),
            Err(e) => out.push(Err(e)),
        }
    }
    let agencies = config.pki_dir().join("agencies");
    if let Ok(dir) = fs::read_dir(&agencies) {
        let mut files: Vec<PathBuf> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "pem"))
            .collect();
        files.sort();
        for p in files {
            let id = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            leaf(&format!("agency:{id}"), &p, &mut out);
        }
    }
    out
}

/// `(label, notAfter)` of every readable entry of [`inventory`], for `/metrics`.
pub fn expiry_gauges(config: &crate::config::Config) -> Vec<(String, i64)> {
    inventory(config)
        .into_iter()
        .filter_map(Result::ok)
        .map(|e| (e.label, e.not_after))
        .collect()
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

fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    write_file(path, contents, 0o600)
}

pub(crate) fn write_public(path: &Path, contents: &str) -> Result<(), PkiError> {
    write_file(path, contents, 0o644)
}

/// Writes through a temporary file and a rename, so a crash never leaves half a key.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    write_atomic(path, contents.as_bytes(), mode).map_err(|source| PkiError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Writes `contents` to `path` with `mode`, through a synced temporary file and a
/// rename (creating the directory), so a crash never leaves half a key or secret.
/// The file gets exactly `mode` whatever the umask, its directory `0700` if created.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = crate::files::create_with_mode(&tmp, mode)?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
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
        let certs = load_certs(&pki.join("agencies/ssg.pem")).unwrap();
        assert_eq!(certs.len(), 1);
        load_key(&pki.join("agencies/ssg.key")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(pki.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "private keys are not readable by others");
        assert_eq!(fingerprint(&certs[0]).len(), 64);
    }

    #[test]
    fn inventory_lists_every_certificate_with_days_left() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config {
            data_dir: dir.path().to_path_buf(),
            ..crate::config::Config::default()
        };
        ensure_dev_pki(&config.pki_dir(), &["psda"]).unwrap();
        let ca = DevCa::open_dev(&config.pki_dir()).unwrap();
        let mut old = Leaf::agency("old");
        old.days = 1;
        old.backdate_days = 3;
        let (pem, _) = ca.issue(&old).unwrap();
        fs::write(config.pki_dir().join("agencies/old.pem"), pem).unwrap();
        let inv: Vec<Expiry> = inventory(&config).into_iter().map(Result::unwrap).collect();
        let labels: Vec<&str> = inv.iter().map(|e| e.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "gateway",
                "registry",
                "client_ca:karibche development CA",
                "provider_ca:karibche development CA",
                "crl:crl.pem",
                "agency:old",
                "agency:psda"
            ]
        );
        let now = OffsetDateTime::now_utc();
        assert!(inv[0].days_left(now) > 364.0);
        assert!(
            inv[5].days_left(now) < -1.9,
            "the backdated certificate has expired"
        );
        assert_eq!(expiry_gauges(&config).len(), 7);
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
