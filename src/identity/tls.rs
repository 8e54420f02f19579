//! TLS policy in one place: versions, cipher suites, client-certificate
//! verification, ALPN — for the gateway's listener, the register's listener
//! and the gateway's connections to providers.
//!
//! TLS 1.3 is preferred; TLS 1.2 is allowed for older agency stacks, and with
//! the aws-lc-rs provider its only suites are ECDHE key exchange with AEAD
//! ciphers (AES-GCM, ChaCha20-Poly1305), so every session is forward-secret.
//! The provider is passed explicitly everywhere instead of relying on a
//! process-wide default, so a second crypto stack can never be picked up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};

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
    File(#[from] crate::files::FileError),
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
pub fn client_verifier(v: &ClientVerification) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
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
    Ok(Arc::new(CachingClientVerifier::new(b.build()?)))
}

/// How long an accepted client certificate chain is taken on trust again.
const ACCEPTED_CHAIN_TTL: Duration = Duration::from_secs(60);
/// At most this many accepted chains are remembered (the cache empties when full).
const ACCEPTED_CHAINS_MAX: usize = 10_000;

/// Remembers the client certificate chains the inner verifier accepted, so an
/// agency reconnecting with the same certificate skips the chain check (the
/// CA's ECDSA signature, a quarter of a full handshake's CPU) for a minute.
///
/// Only the chain check is cached: the client's proof that it holds the key
/// (the handshake signature) is verified on every handshake. A cached chain is
/// never used past its certificate's `notAfter`, and each CRL or CA reload
/// builds a new verifier with an empty cache, so a revocation is not delayed.
#[derive(Debug)]
struct CachingClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    /// Chain digest → until when its acceptance holds (UNIX seconds).
    accepted: Mutex<HashMap<[u8; 32], u64>>,
}

impl CachingClientVerifier {
    fn new(inner: Arc<dyn ClientCertVerifier>) -> CachingClientVerifier {
        CachingClientVerifier {
            inner,
            accepted: Mutex::new(HashMap::new()),
        }
    }

    /// SHA-256 over the chain, each certificate prefixed by its length.
    fn digest(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for cert in std::iter::once(end_entity).chain(intermediates) {
            ctx.update(&(cert.len() as u64).to_be_bytes());
            ctx.update(cert);
        }
        let mut out = [0; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    fn accepted(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], u64>> {
        // The map holds no invariant a panicking holder could break.
        self.accepted.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientCertVerifier for CachingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        note_presented(end_entity);
        let key = Self::digest(end_entity, intermediates);
        let t = now.as_secs();
        if self.accepted().get(&key).is_some_and(|until| t < *until) {
            return Ok(ClientCertVerified::assertion());
        }
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let not_after = x509_parser::parse_x509_certificate(end_entity)
            .map(|(_, c)| c.validity().not_after.timestamp())
            .ok()
            .and_then(|t| u64::try_from(t).ok());
        if let Some(not_after) = not_after {
            let until = not_after.min(t.saturating_add(ACCEPTED_CHAIN_TTL.as_secs()));
            let mut accepted = self.accepted();
            if accepted.len() >= ACCEPTED_CHAINS_MAX {
                accepted.clear();
            }
            accepted.insert(key, until);
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

tokio::task_local! {
    /// SHA-256 of the client certificate presented in the handshake this task runs.
    static PRESENTED: std::cell::RefCell<Option<String>>;
}

fn note_presented(end_entity: &CertificateDer<'_>) {
    let _ = PRESENTED.try_with(|p| *p.borrow_mut() = Some(crate::files::sha256_hex(end_entity)));
}

/// Runs the handshake `f` and tells, with its outcome, the SHA-256 of the
/// client certificate it was presented (to log a failed handshake's peer).
pub async fn noting_presented<F: std::future::Future>(f: F) -> (F::Output, Option<String>) {
    PRESENTED
        .scope(std::cell::RefCell::new(None), async move {
            let out = f.await;
            let presented = PRESENTED.with(|p| p.borrow_mut().take());
            (out, presented)
        })
        .await
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

/// A server configuration that asks for no client certificate (the web console, where officers
/// sign in with their token): the same versions, suites, ALPN and resumption as [`server_config`].
pub fn server_config_without_clients(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
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
        crate::devpki::ensure_dev_pki(dir.path(), &["psda"]).unwrap();
        let ca = crate::files::load_certs(&dir.path().join("ca.pem")).unwrap();
        let chain = crate::files::load_certs(&dir.path().join("gateway.pem")).unwrap();
        let key = crate::files::load_key(&dir.path().join("gateway.key")).unwrap();
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
    fn accepted_chains_are_cached_until_ttl_or_not_after_and_others_still_checked() {
        let dir = tempfile::tempdir().unwrap();
        crate::devpki::ensure_dev_pki(dir.path(), &["psda"]).unwrap();
        let ca = crate::files::load_certs(&dir.path().join("ca.pem")).unwrap();
        let agency = crate::files::load_certs(&dir.path().join("agencies/psda.pem")).unwrap();
        let v = ClientVerification {
            cas: ca.clone(),
            ..ClientVerification::default()
        };
        let verifier = CachingClientVerifier::new(
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&ca).unwrap()), provider())
                .build()
                .unwrap(),
        );
        let now = UnixTime::now();
        verifier.verify_client_cert(&agency[0], &[], now).unwrap();
        assert_eq!(verifier.accepted().len(), 1);
        let until = *verifier.accepted().values().next().unwrap();
        assert!(until <= now.as_secs() + ACCEPTED_CHAIN_TTL.as_secs());
        // A hit answers from the cache; past the TTL the chain is checked again (and still passes).
        verifier.verify_client_cert(&agency[0], &[], now).unwrap();
        let later = UnixTime::since_unix_epoch(Duration::from_secs(until + 1));
        verifier.verify_client_cert(&agency[0], &[], later).unwrap();
        assert!(*verifier.accepted().values().next().unwrap() > until);
        // Far past notAfter the cached entry is not used: the inner verifier refuses the expired certificate.
        let expired =
            UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() + 100 * 365 * 86_400));
        assert!(verifier
            .verify_client_cert(&agency[0], &[], expired)
            .is_err());
        // A certificate from another CA is refused, and not remembered.
        let other = tempfile::tempdir().unwrap();
        crate::devpki::ensure_dev_pki(other.path(), &["psda"]).unwrap();
        let stranger = crate::files::load_certs(&other.path().join("agencies/psda.pem")).unwrap();
        let before = verifier.accepted().len();
        assert!(verifier.verify_client_cert(&stranger[0], &[], now).is_err());
        assert_eq!(verifier.accepted().len(), before);
        // client_verifier wraps webpki in the cache.
        client_verifier(&v).unwrap();
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
