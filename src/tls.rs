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
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

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
}

/// The crypto provider karibche uses everywhere: aws-lc-rs with its default suites.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
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

/// A server configuration that requires a client certificate chaining to `client_roots`.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: RootCertStore,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(client_roots), provider.clone())
            .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    // Without ALPN clients never pick HTTP/2.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Stateless resumption with rotating ticket keys; the stateful cache stays on too.
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
        let s = server_config(chain.clone(), key.clone_key(), roots(&ca).unwrap()).unwrap();
        assert_eq!(s.alpn_protocols[0], b"h2");
        client_config(roots(&ca).unwrap(), chain, key).unwrap();
    }
}
