//! The certificate inventory: every certificate and CRL the gateway's files
//! hold and when each runs out, for `karibche certs list` and the
//! `karibche_certificate_expiry_timestamp_seconds` gauges in `/metrics`.
//!
//! A certificate that expires unnoticed stops an agency (or the whole
//! gateway) at the handshake; listing them all in one place, with the days
//! left, lets operators renew in time.

use std::fs;
use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use crate::config::Config;
use crate::files::{load_certs, FileError};

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
pub fn inventory(config: &Config) -> Vec<Result<Expiry, FileError>> {
    let t = &config.tls;
    let mut out = Vec::new();
    let leaf = |label: &str, p: &Path, out: &mut Vec<Result<Expiry, FileError>>| match load_certs(p)
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
        |label: &str, p: &Path, out: &mut Vec<Result<Expiry, FileError>>| match load_certs(p) {
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
        match super::crl::summarize(&p) {
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
pub fn expiry_gauges(config: &Config) -> Vec<(String, i64)> {
    inventory(config)
        .into_iter()
        .filter_map(Result::ok)
        .map(|e| (e.label, e.not_after))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_lists_every_certificate_with_days_left() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        crate::devpki::ensure_dev_pki(&config.pki_dir(), &["psda"]).unwrap();
        let ca = crate::devpki::DevCa::open_dev(&config.pki_dir()).unwrap();
        let mut old = crate::devpki::Leaf::agency("old");
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
}
