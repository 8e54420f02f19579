//! TLS policy in one place: versions, cipher suites, client-certificate
//! verification, ALPN — for the gateway's listener, the register's listener
//! and the gateway's connections to providers.
//!
//! TLS 1.3 is preferred; TLS 1.2 is allowed for older agency stacks, and with
//! the aws-lc-rs provider its only suites are ECDHE key exchange with AEAD
//! ciphers (AES-GCM, ChaCha20-Poly1305), so every session is forward-secret.
//! The provider is passed explicitly everywhere instead of relying on a
//! process-wide default, so a second crypto stack can never be picked up.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// Errors building a TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A CA certificate could not be added to the trust store.
    #[error("unusable CA certificate: {0}")]
    Ca(rustls::Error),
    /// The client verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// rustls refused the configuration (e.g. key does not match certificate).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// A certificate, key or CRL file could not be read.
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
}

/// The crypto provider karibche uses everywhere: aws-lc-rs, its TLS 1.2 suites cut down to
/// ECDHE key exchange with AEAD ciphers (which is all aws-lc-rs offers today; the filter keeps it so).
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.retain(|s| match s {
        rustls::SupportedCipherSuite::Tls13(_) => true,
        rustls::SupportedCipherSuite::Tls12(_) => {
            let name = format!("{:?}", s.suite());
            name.contains("_ECDHE_")
                && (name.contains("_GCM_") || name.contains("CHACHA20_POLY1305"))
        }
    });
    Arc::new(p)
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// A trust store from CA certificates.
pub fn roots(cas: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for ca in cas {
        store.add(ca.clone()).map_err(TlsError::Ca)?;
    }
    Ok(store)
}

/// How client certificates are checked: which CAs, which revocation lists.
#[derive(Debug, Clone, Default)]
pub struct ClientVerification {
    /// Every CA an agency certificate may chain to (several during a CA change).
    pub cas: Vec<CertificateDer<'static>>,
    /// Revocation lists; with none, revocation is not checked.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// Accept certificates whose issuer has no CRL here (default: refuse them).
    pub allow_unknown_revocation: bool,
    /// Refuse every certificate of a CA whose CRL is past its `nextUpdate`.
    pub enforce_crl_expiry: bool,
}

/// The client-certificate verifier for a [`ClientVerification`].
pub fn client_verifier(
    v: &ClientVerification,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut b = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&v.cas)?), provider());
    if !v.crls.is_empty() {
        b = b.with_crls(v.crls.iter().cloned());
        if v.allow_unknown_revocation {
            b = b.allow_unknown_revocation_status();
        }
        if v.enforce_crl_expiry {
            b = b.enforce_revocation_expiration();
        }
    }
    Ok(b.build()?)
}

/// A server configuration that requires a client certificate passing `client`.
///
/// TLS 1.3 and 1.2 (ECDHE + AEAD only); rustls never renegotiates. Resumption is on:
/// a fresh session cache and stateless tickets whose key rotates every six hours.
/// Every rebuild (a CRL or CA reload) starts new ones, so no session established before
/// a revocation can be resumed past it.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client: &ClientVerification,
) -> Result<ServerConfig, TlsError> {
    let verifier = client_verifier(client)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    // Without ALPN clients never pick HTTP/2.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    Ok(config)
}

/// A client configuration that presents `chain` and trusts servers chaining to `server_roots`.
pub fn client_config(
    server_roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_root_certificates(server_roots)
        .with_client_auth_cert(chain, key)?)
}

/// A server configuration that can be replaced while connections are open.
///
/// Replacing it (new CRLs, CAs or certificate) also tells every open
/// connection, which then closes gracefully: its client reconnects and
/// handshakes against the new configuration, so a revocation reaches
/// connections that were established before it.
#[derive(Debug)]
pub struct ReloadableTls {
    config: arc_swap::ArcSwap<ServerConfig>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl ReloadableTls {
    /// Wraps the first configuration.
    pub fn new(config: ServerConfig) -> ReloadableTls {
        ReloadableTls {
            config: arc_swap::ArcSwap::from_pointee(config),
            generation: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    /// Swaps in a new configuration and asks open connections to close.
    pub fn replace(&self, config: ServerConfig) {
        self.config.store(Arc::new(config));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Changes whenever the configuration is replaced.
    pub fn replaced(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_build_from_dev_pki() {
        let dir = tempfile::tempdir().unwrap();
        crate::pki::ensure_dev_pki(dir.path(), &["psda"]).unwrap();
        let ca = crate::pki::load_certs(&dir.path().join("ca.pem")).unwrap();
        let chain = crate::pki::load_certs(&dir.path().join("gateway.pem")).unwrap();
        let key = crate::pki::load_key(&dir.path().join("gateway.key")).unwrap();
        let v = ClientVerification {
            cas: ca.clone(),
            ..ClientVerification::default()
        };
        let s = server_config(chain.clone(), key.clone_key(), &v).unwrap();
        assert_eq!(s.alpn_protocols[0], b"h2");
        assert!(s.ticketer.enabled(), "resumption by tickets is on");
        assert!(s.session_storage.can_cache());
        client_config(roots(&ca).unwrap(), chain, key).unwrap();
    }

    #[test]
    fn only_forward_secret_aead_suites() {
        let p = provider();
        assert!(!p.cipher_suites.is_empty());
        for s in &p.cipher_suites {
            let name = format!("{:?}", s.suite());
            assert!(
                name.starts_with("TLS13_") || (name.contains("ECDHE") && !name.contains("CBC")),
                "{name}"
            );
        }
    }
}
