//! RFC 3161 time-stamps of signed tree heads (`[audit.tsa]`). A background
//! task, woken like the witness tasks by the writer's tree-head watch, sends
//! the newest head's note to a time-stamping authority (SHA-256 imprint,
//! nonce, certReq), verifies the answer against the configured TSA
//! certificate and stores the token with the head (`audit_timestamps`). It
//! never sits on a request's path; an unreachable TSA is retried with backoff
//! (1 s doubling to 30 s) and how far behind it is shows on `/readyz` and
//! `/metrics` ([`TimestampBoard`]).
//!
//! [`verify_token`] is also what `audit verify` and `audit verify-proof` run.
//! It is strict on purpose: a CMS token has parts no signature covers (the
//! embedded certificates, the signer identifier, unsigned attributes, the
//! digest algorithm set), so the token must re-encode to exactly its own
//! bytes, every certificate in it must be the pinned TSA certificate byte for
//! byte, and unsigned attributes and CRLs are refused: no byte of a token
//! that verifies can change without it failing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::digest;
use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use bytes::Bytes;
use cms::cert::CertificateChoices;
use cms::content_info::{CmsVersion, ContentInfo};
use cms::signed_data::{SignedData, SignerIdentifier};
use der::asn1::{Int, Null, OctetString};
use der::oid::ObjectIdentifier;
use der::{Any, Decode, Encode, Tagged};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use x509_cert::Certificate;
use x509_tsp::{MessageImprint, TimeStampReq, TimeStampResp, TspVersion, TstInfo};

use super::tree;
use super::AuditError;
use crate::store::Store;
use crate::witness::client::{next_backoff, next_round};

const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const ID_CT_TST_INFO: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.16.1.4");
const ID_CONTENT_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.3");
const ID_MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
const ID_SHA_256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const ID_SHA_384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
const ID_SHA_512: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.3");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const SHA_256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const ECDSA_WITH_SHA_256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ID_EXT_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37");
const ID_KP_TIME_STAMPING: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.8");

/// Why a time-stamp (or the TSA certificate) was refused.
#[derive(Debug, thiserror::Error)]
pub enum TimestampError {
    /// The TSA certificate cannot be used.
    #[error("TSA certificate {0}")]
    Certificate(String),
    /// The token or the response does not verify.
    #[error("time-stamp token {0}")]
    Token(String),
}

fn bad(reason: impl std::fmt::Display) -> TimestampError {
    TimestampError::Token(reason.to_string())
}

/// The configured TSA certificate: its DER and what verification needs of it.
#[derive(Debug, Clone)]
pub struct TsaCertificate {
    der: Vec<u8>,
    cert: Certificate,
}

impl TsaCertificate {
    /// Reads a PEM (or DER) certificate; it must allow time-stamping (extendedKeyUsage
    /// id-kp-timeStamping, critical, as RFC 3161 §2.3 requires).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TimestampError> {
        let der = if bytes.starts_with(b"-----") {
            x509_parser::pem::parse_x509_pem(bytes)
                .map_err(|e| TimestampError::Certificate(format!("is not PEM: {e}")))?
                .1
                .contents
        } else {
            bytes.to_vec()
        };
        let cert = Certificate::from_der(&der).map_err(|e| {
            TimestampError::Certificate(format!("is not an X.509 certificate: {e}"))
        })?;
        let eku = cert
            .tbs_certificate
            .extensions
            .iter()
            .flatten()
            .find(|e| e.extn_id == ID_EXT_KEY_USAGE)
            .ok_or_else(|| TimestampError::Certificate("has no extendedKeyUsage".into()))?;
        let usages = x509_cert::ext::pkix::ExtendedKeyUsage::from_der(eku.extn_value.as_bytes())
            .map_err(|e| TimestampError::Certificate(format!("extendedKeyUsage: {e}")))?;
        if !eku.critical || usages.0 != [ID_KP_TIME_STAMPING] {
            return Err(TimestampError::Certificate(
                "must have a critical extendedKeyUsage of timeStamping only (RFC 3161 §2.3)".into(),
            ));
        }
        Ok(TsaCertificate { der, cert })
    }

    /// Reads the certificate file at `path`.
    pub fn load(path: &std::path::Path) -> Result<Self, TimestampError> {
        let bytes = std::fs::read(path)
            .map_err(|e| TimestampError::Certificate(format!("{}: {e}", path.display())))?;
        Self::from_bytes(&bytes)
            .map_err(|e| TimestampError::Certificate(format!("{}: {e}", path.display())))
    }

    /// The certificate's DER.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// Hex SHA-256 of the certificate's DER.
    pub fn fingerprint(&self) -> String {
        hex::encode(digest::digest(&digest::SHA256, &self.der))
    }
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    /// The TSA's time (genTime), RFC 3339 UTC.
    pub gen_time: String,
    /// The TSTInfo's nonce, big-endian bytes, if any.
    pub nonce: Option<Vec<u8>>,
}

/// A DER TimeStampReq for `message` (SHA-256 imprint) with `nonce`, asking for the certificate.
pub fn request(message: &[u8], nonce: &[u8]) -> Result<Vec<u8>, TimestampError> {
    let req = TimeStampReq {
        version: TspVersion::V1,
        message_imprint: imprint(message)?,
        req_policy: None,
        nonce: Some(Int::new(nonce).map_err(bad)?),
        cert_req: true,
        extensions: None,
    };
    req.to_der().map_err(bad)
}

fn imprint(message: &[u8]) -> Result<MessageImprint, TimestampError> {
    Ok(MessageImprint {
        hash_algorithm: x509_cert::spki::AlgorithmIdentifier {
            oid: ID_SHA_256,
            parameters: Some(Any::from(Null)),
        },
        hashed_message: OctetString::new(digest::digest(&digest::SHA256, message).as_ref())
            .map_err(bad)?,
    })
}

/// Checks a TimeStampResp to the request for `message` with `nonce`; the token's DER.
pub fn verify_response(
    response: &[u8],
    message: &[u8],
    nonce: &[u8],
    tsa: &TsaCertificate,
) -> Result<(Vec<u8>, Stamp), TimestampError> {
    let resp = TimeStampResp::from_der(response).map_err(|e| bad(format!("response: {e}")))?;
    use cmpv2::status::PkiStatus;
    if !matches!(
        resp.status.status,
        PkiStatus::Accepted | PkiStatus::GrantedWithMods
    ) {
        return Err(bad(format!(
            "the TSA did not grant the request: {:?}",
            resp.status.status
        )));
    }
    let token = resp
        .time_stamp_token
        .ok_or_else(|| bad("the TSA granted but sent no token"))?
        .to_der()
        .map_err(bad)?;
    let stamp = verify_token(&token, message, tsa)?;
    if stamp.nonce.as_deref() != Some(nonce) {
        return Err(bad("does not carry the request's nonce"));
    }
    Ok((token, stamp))
}

/// Verifies a time-stamp token (DER ContentInfo) over `message` with `tsa`'s key.
pub fn verify_token(
    token: &[u8],
    message: &[u8],
    tsa: &TsaCertificate,
) -> Result<Stamp, TimestampError> {
    let info = ContentInfo::from_der(token).map_err(|e| bad(format!("is not DER CMS: {e}")))?;
    if info.content_type != ID_SIGNED_DATA {
        return Err(bad("is not CMS SignedData"));
    }
    let sd: SignedData = info.content.decode_as().map_err(bad)?;
    // Canonical: the bytes are exactly what the parsed values encode to.
    let again = ContentInfo {
        content_type: ID_SIGNED_DATA,
        content: Any::encode_from(&sd).map_err(bad)?,
    }
    .to_der()
    .map_err(bad)?;
    if again != token {
        return Err(bad("is not in canonical DER"));
    }
    if sd.version != CmsVersion::V3 || sd.crls.is_some() {
        return Err(bad("is not a version 3 SignedData without CRLs"));
    }
    // Unsigned: every certificate carried must be the pinned one, byte for byte.
    for c in sd.certificates.iter().flat_map(|s| s.0.iter()) {
        let CertificateChoices::Certificate(c) = c else {
            return Err(bad("carries a certificate that is not X.509"));
        };
        if c.to_der().map_err(bad)? != tsa.der {
            return Err(bad("carries a certificate other than the TSA's"));
        }
    }
    if sd.encap_content_info.econtent_type != ID_CT_TST_INFO {
        return Err(bad("does not hold a TSTInfo"));
    }
    let econtent = sd
        .encap_content_info
        .econtent
        .as_ref()
        .ok_or_else(|| bad("holds no TSTInfo"))?;
    let tst_der = OctetString::from_der(&econtent.to_der().map_err(bad)?)
        .map_err(bad)?
        .into_bytes();
    let tst = TstInfo::from_der(&tst_der).map_err(|e| bad(format!("TSTInfo: {e}")))?;
    if tst.to_der().map_err(bad)? != tst_der {
        return Err(bad("TSTInfo is not in canonical DER"));
    }
    let mi = &tst.message_imprint;
    if mi.hash_algorithm.oid != ID_SHA_256
        || !null_or_absent(&mi.hash_algorithm)
        || mi.hashed_message != imprint(message)?.hashed_message
    {
        return Err(bad("is not over this checkpoint (message imprint differs)"));
    }
    let [signer] = sd.signer_infos.0.as_slice() else {
        return Err(bad("must have exactly one signer"));
    };
    let tbs = &tsa.cert.tbs_certificate;
    match &signer.sid {
        SignerIdentifier::IssuerAndSerialNumber(s)
            if signer.version == CmsVersion::V1
                && s.issuer == tbs.issuer
                && s.serial_number == tbs.serial_number => {}
        _ => {
            return Err(bad(
                "is not signed by the TSA certificate (signer identifier)",
            ))
        }
    }
    if signer.unsigned_attrs.is_some() {
        return Err(bad("carries unsigned attributes"));
    }
    let hash = digest_of(&signer.digest_alg)?;
    if sd.digest_algorithms.as_slice() != [signer.digest_alg.clone()] {
        return Err(bad("digestAlgorithms is not the signer's digest"));
    }
    let attrs = signer
        .signed_attrs
        .as_ref()
        .ok_or_else(|| bad("has no signed attributes"))?;
    let single = |oid: ObjectIdentifier| -> Result<&Any, TimestampError> {
        let mut found = attrs.iter().filter(|a| a.oid == oid);
        match (found.next(), found.next()) {
            (Some(a), None) if a.values.len() == 1 => Ok(&a.values.as_slice()[0]),
            _ => Err(bad(format!("must carry exactly one {oid} attribute"))),
        }
    };
    let content_type: ObjectIdentifier = single(ID_CONTENT_TYPE)?.decode_as().map_err(bad)?;
    if content_type != ID_CT_TST_INFO {
        return Err(bad("content-type attribute is not TSTInfo"));
    }
    let md: OctetString = single(ID_MESSAGE_DIGEST)?.decode_as().map_err(bad)?;
    if md.as_bytes() != digest::digest(hash, &tst_der).as_ref() {
        return Err(bad("message-digest attribute does not match the TSTInfo"));
    }
    let signed = attrs.to_der().map_err(bad)?;
    let spki = &tbs.subject_public_key_info;
    let key = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| TimestampError::Certificate("public key is not whole bytes".into()))?;
    let alg = verify_algorithm(&spki.algorithm.oid, &signer.signature_algorithm, hash)?;
    UnparsedPublicKey::new(alg, key)
        .verify(&signed, signer.signature.as_bytes())
        .map_err(|_| bad("signature does not verify with the TSA certificate's key"))?;
    let secs = tst.gen_time.to_unix_duration().as_secs();
    let gen_time = time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .ok_or_else(|| bad("genTime is out of range"))?;
    Ok(Stamp {
        gen_time,
        nonce: tst.nonce.map(|n| n.as_bytes().to_vec()),
    })
}

/// The digest an algorithm identifier names (parameters absent or NULL).
fn digest_of(
    alg: &x509_cert::spki::AlgorithmIdentifierOwned,
) -> Result<&'static digest::Algorithm, TimestampError> {
    if !null_or_absent(alg) {
        return Err(bad("digest algorithm has parameters"));
    }
    match alg.oid {
        ID_SHA_256 => Ok(&digest::SHA256),
        ID_SHA_384 => Ok(&digest::SHA384),
        ID_SHA_512 => Ok(&digest::SHA512),
        oid => Err(bad(format!("digest {oid} is not SHA-2"))),
    }
}

fn null_or_absent(alg: &x509_cert::spki::AlgorithmIdentifierOwned) -> bool {
    match &alg.parameters {
        None => true,
        Some(p) => p.tag() == der::Tag::Null && p.value().is_empty(),
    }
}

/// The aws-lc-rs verifier for the TSA's key type and the signer's algorithms.
fn verify_algorithm(
    key: &ObjectIdentifier,
    sig: &x509_cert::spki::AlgorithmIdentifierOwned,
    hash: &'static digest::Algorithm,
) -> Result<&'static dyn VerificationAlgorithm, TimestampError> {
    let sha256 = hash == &digest::SHA256;
    match (*key, sig.oid) {
        (RSA_ENCRYPTION, RSA_ENCRYPTION | SHA_256_WITH_RSA) if sha256 && null_or_absent(sig) => {
            Ok(&signature::RSA_PKCS1_2048_8192_SHA256)
        }
        (_, ECDSA_WITH_SHA_256) if sha256 && sig.parameters.is_none() => {
            Ok(&signature::ECDSA_P256_SHA256_ASN1)
        }
        (k, s) => Err(bad(format!(
            "signature algorithm {s} with key type {k} is not supported (RSA PKCS#1 v1.5 or ECDSA P-256, SHA-256)"
        ))),
    }
}

/// How the TSA stands, for `/readyz` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimestampState {
    /// The largest tree size with a stored token.
    pub stamped: u64,
    /// Records in signed tree heads not covered by a token yet.
    pub behind: u64,
    /// The last failure, until the TSA answers again.
    pub error: Option<String>,
}

/// The TSA task's state, shared with the admin endpoint (`None`: no TSA configured).
#[derive(Debug, Default)]
pub struct TimestampBoard {
    state: Mutex<Option<TimestampState>>,
}

impl TimestampBoard {
    /// A snapshot; `None` without a TSA.
    pub fn snapshot(&self) -> Option<TimestampState> {
        self.state.lock().ok().and_then(|s| s.clone())
    }

    fn set(&self, state: TimestampState) {
        if let Ok(mut s) = self.state.lock() {
            *s = Some(state);
        }
    }
}

/// A stored token.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredStamp {
    /// The head's tree size.
    pub size: i64,
    /// The token's DER, base64.
    pub token: String,
    /// Hex SHA-256 of the TSA certificate that verified it.
    pub tsa: String,
    /// The TSA's genTime.
    pub gen_time: String,
}

/// The token stored for `node`'s head of `size`, if any.
pub async fn stored(
    store: &Store,
    node: &str,
    size: u64,
) -> Result<Option<StoredStamp>, AuditError> {
    Ok(sqlx::query_as(
        "SELECT size, token, tsa, gen_time FROM audit_timestamps WHERE node = $1 AND size = $2",
    )
    .bind(node)
    .bind(size as i64)
    .fetch_optional(store.pool())
    .await?)
}

/// Every token stored for `node`, by size.
pub async fn all(store: &Store, node: &str) -> Result<Vec<StoredStamp>, AuditError> {
    Ok(sqlx::query_as(
        "SELECT size, token, tsa, gen_time FROM audit_timestamps WHERE node = $1 ORDER BY size",
    )
    .bind(node)
    .fetch_all(store.pool())
    .await?)
}

/// Starts the TSA task if `[audit.tsa]` is configured; fails if its certificate is unusable.
pub fn start(
    config: &crate::config::Config,
    audit: &crate::audit::AuditLog,
    shutdown: crate::runtime::shutdown::Shutdown,
) -> Result<Option<tokio::task::JoinHandle<()>>, TimestampError> {
    let Some(tsa) = &config.audit.tsa else {
        return Ok(None);
    };
    let cert = TsaCertificate::load(&config.data_path(&tsa.certificate))?;
    Ok(Some(spawn(
        audit.store().clone(),
        config.node.clone(),
        audit.tree_heads(),
        tsa.url.clone(),
        cert,
        audit.timestamps().clone(),
        shutdown,
    )))
}

/// Starts the TSA task; it stops when `shutdown` turns true.
pub fn spawn(
    store: Store,
    node: String,
    heads: tokio::sync::watch::Receiver<u64>,
    url: String,
    cert: TsaCertificate,
    board: Arc<TimestampBoard>,
    shutdown: crate::runtime::shutdown::Shutdown,
) -> tokio::task::JoinHandle<()> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let client = Client::builder(TokioExecutor::new()).build(http);
    board.set(TimestampState::default());
    let task = Task {
        store,
        node,
        url,
        cert,
        client,
        board,
    };
    tokio::spawn(task.run(heads, shutdown))
}

struct Task {
    store: Store,
    node: String,
    url: String,
    cert: TsaCertificate,
    client: Client<HttpConnector, Full<Bytes>>,
    board: Arc<TimestampBoard>,
}

/// Why a round with the TSA failed.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("answered {0}")]
    Refused(StatusCode),
    #[error(transparent)]
    Token(#[from] TimestampError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

impl From<sqlx::Error> for RoundError {
    fn from(e: sqlx::Error) -> Self {
        RoundError::Audit(e.into())
    }
}

impl Task {
    async fn run(
        self,
        mut heads: tokio::sync::watch::Receiver<u64>,
        mut shutdown: crate::runtime::shutdown::Shutdown,
    ) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let head = *heads.borrow_and_update();
            let stamped = self.stamped().await.unwrap_or(0);
            let wait = match self.round().await {
                Ok(size) => {
                    backoff = Duration::from_secs(1);
                    self.board.set(TimestampState {
                        stamped: size,
                        behind: head.saturating_sub(size),
                        error: None,
                    });
                    None
                }
                Err(e) => {
                    tracing::warn!(err = %e, "checkpoint not time-stamped; retrying later");
                    self.board.set(TimestampState {
                        stamped,
                        behind: head.saturating_sub(stamped),
                        error: Some(e.to_string()),
                    });
                    Some(next_backoff(&mut backoff))
                }
            };
            if !next_round(&mut heads, &mut shutdown, wait).await {
                return;
            }
        }
    }

    async fn stamped(&self) -> Result<u64, AuditError> {
        let size: Option<i64> =
            sqlx::query_scalar("SELECT MAX(size) FROM audit_timestamps WHERE node = $1")
                .bind(self.node.as_str())
                .fetch_one(self.store.pool())
                .await?;
        Ok(size.unwrap_or(0) as u64)
    }

    /// Time-stamps the newest head unless it already is; the size now stamped.
    async fn round(&self) -> Result<u64, RoundError> {
        let Some(head) = tree::latest(&self.store, &self.node).await? else {
            return Ok(0);
        };
        let size = head.size as u64;
        if stored(&self.store, &self.node, size).await?.is_some() {
            return Ok(size);
        }
        let mut nonce = [0u8; 8];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| RoundError::Unreachable("no randomness for the nonce".into()))?;
        // A positive INTEGER in minimal form: first byte 0x01..=0x7f.
        nonce[0] = (nonce[0] & 0x7f).max(1);
        let body = request(head.note.as_bytes(), &nonce)?;
        let answer = self.post(body).await?;
        let (token, stamp) = verify_response(&answer, head.note.as_bytes(), &nonce, &self.cert)?;
        let mut tx = self.store.begin_write().await?;
        sqlx::query(
            "INSERT INTO audit_timestamps (node, size, token, tsa, gen_time, ts) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (node, size) DO NOTHING",
        )
        .bind(self.node.as_str())
        .bind(size as i64)
        .bind(base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &token))
        .bind(self.cert.fingerprint())
        .bind(stamp.gen_time.as_str())
        .bind(crate::audit::now_ts())
        .execute(tx.conn())
        .await?;
        tx.commit().await?;
        tracing::info!(size, gen_time = %stamp.gen_time, "tree head time-stamped");
        Ok(size)
    }

    async fn post(&self, body: Vec<u8>) -> Result<Vec<u8>, RoundError> {
        let req = Request::post(self.url.as_str())
            .header(http::header::CONTENT_TYPE, "application/timestamp-query")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| RoundError::Unreachable(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| RoundError::Unreachable("timed out".into()))?
            .map_err(|e| RoundError::Unreachable(e.to_string()))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), 256 * 1024)
            .collect()
            .await
            .map_err(|e| RoundError::Unreachable(e.to_string()))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(RoundError::Refused(status));
        }
        Ok(body.to_vec())
    }
}

/// What `audit verify` found of `node`'s stored tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenCheck {
    /// Tokens that verified over their tree head with the TSA certificate.
    pub verified: usize,
    /// Tokens not checked: no TSA certificate configured.
    pub unchecked: usize,
    /// Tree heads whose token fails, with why.
    pub failed: Vec<(u64, String)>,
}

/// Checks every stored token of `node` against its tree head's note and `tsa`.
pub async fn check_stored(
    store: &Store,
    node: &str,
    tsa: Option<&TsaCertificate>,
) -> Result<TokenCheck, AuditError> {
    let heads = tree::heads(store, node).await?;
    let mut out = TokenCheck::default();
    for t in all(store, node).await? {
        let size = t.size as u64;
        let Some(cert) = tsa else {
            out.unchecked += 1;
            continue;
        };
        let Some(head) = heads.iter().find(|h| h.size == t.size) else {
            out.failed.push((size, "no tree head of that size".into()));
            continue;
        };
        let b64 = &base64::engine::general_purpose::STANDARD;
        let result = base64::Engine::decode(b64, &t.token)
            .map_err(|e| bad(format!("is not base64: {e}")))
            .and_then(|der| verify_token(&der, head.note.as_bytes(), cert));
        match result {
            Ok(s) if s.gen_time == t.gen_time && t.tsa == cert.fingerprint() => out.verified += 1,
            Ok(_) => out.failed.push((
                size,
                "stored genTime or TSA fingerprint differs from the token".into(),
            )),
            Err(e) => out.failed.push((size, e.to_string())),
        }
    }
    Ok(out)
}
