//! Agency token verification keys: loading, algorithm allow-lists, key ids.
//!
//! Each agency's identity provider publishes its public keys to the gateway as
//! files in the keys directory: `<agency>.pub.pem` (one or more `PUBLIC KEY`
//! blocks) and/or `<agency>.jwks.json` (a JWK set). Several keys per agency
//! let an identity provider rotate: publish the new key next to the old one,
//! switch signing, then remove the old key. The files are reloaded when they
//! change (the runtime's credential reload,
//! `src/runtime/reload/credentials.rs`).
//!
//! Every key gets the algorithms its type allows and nothing else (RFC 8725
//! §3.1): P-256 → ES256, Ed25519 → EdDSA, RSA of at least 2048 bits → RS256
//! and PS256. A JWK's own `alg` narrows that set further. Symmetric keys,
//! other curves and short RSA keys are refused at load, so HMAC algorithms
//! (and with them the "public key as HMAC secret" confusion) are never
//! accepted. Each key has a `kid`: the JWK's own, else its RFC 7638
//! thumbprint; a token's `kid` only ever selects among its agency's keys.

use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters,
    EllipticCurveKeyType, Jwk, JwkSet, KeyAlgorithm, OctetKeyPairParameters, OctetKeyPairType,
    RSAKeyParameters, RSAKeyType, ThumbprintHash,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use rustls_pki_types::pem::{PemObject, SectionKind};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

/// Smallest RSA modulus accepted (RFC 8725 via NIST SP 800-131A).
pub const MIN_RSA_BITS: usize = 2048;

/// One verification key of one agency.
pub struct VerifyKey {
    /// Key id: the JWK's `kid`, or the key's RFC 7638 SHA-256 thumbprint.
    pub kid: String,
    /// The algorithms this key may verify; never empty, never HMAC or `none`.
    pub algorithms: Vec<Algorithm>,
    /// Where the key came from (`file#index`), for logs.
    pub source: String,
    pub(crate) key: DecodingKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .field("source", &self.source)
            .finish()
    }
}

/// A key file that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct KeyLoadError {
    /// The file.
    pub path: String,
    /// What was wrong.
    pub message: String,
}

fn load_err(path: &Path, message: impl Into<String>) -> KeyLoadError {
    KeyLoadError {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// The files that may hold an agency's keys: `<agency>.pub.pem` and `<agency>.jwks.json`.
pub fn agency_key_files(keys_dir: &Path, agency: &str) -> [PathBuf; 2] {
    [
        keys_dir.join(format!("{agency}.pub.pem")),
        keys_dir.join(format!("{agency}.jwks.json")),
    ]
}

/// Loads every key of one agency; an agency without files has no keys.
pub fn load_agency_keys(keys_dir: &Path, agency: &str) -> Result<Vec<VerifyKey>, KeyLoadError> {
    let [pem, jwks] = agency_key_files(keys_dir, agency);
    let mut keys = Vec::new();
    if let Some(bytes) = read_optional(&pem)? {
        keys.extend(keys_from_pem(&pem, &bytes)?);
    }
    if let Some(bytes) = read_optional(&jwks)? {
        keys.extend(keys_from_jwks(&jwks, &bytes)?);
    }
    for (i, k) in keys.iter().enumerate() {
        if keys[..i].iter().any(|o| o.kid == k.kid) {
            return Err(load_err(
                keys_dir,
                format!("agency {agency} has two keys with kid {:?}", k.kid),
            ));
        }
    }
    Ok(keys)
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, KeyLoadError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(load_err(path, e.to_string())),
    }
}

/// Every `PUBLIC KEY` block of a PEM file as a verification key.
pub fn keys_from_pem(path: &Path, pem: &[u8]) -> Result<Vec<VerifyKey>, KeyLoadError> {
    let mut keys = Vec::new();
    for (i, item) in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem).enumerate() {
        let (kind, der) = item.map_err(|e| load_err(path, e.to_string()))?;
        if kind != SectionKind::PublicKey {
            return Err(load_err(
                path,
                format!("PEM block {i} is {kind:?}; only PUBLIC KEY blocks belong here"),
            ));
        }
        let jwk = jwk_from_spki(&der).map_err(|m| load_err(path, format!("key {i}: {m}")))?;
        let source = format!("{}#{i}", path.display());
        keys.push(verify_key(jwk, source).map_err(|m| load_err(path, format!("key {i}: {m}")))?);
    }
    if keys.is_empty() {
        return Err(load_err(path, "no PUBLIC KEY block found"));
    }
    Ok(keys)
}

/// Every key of a JWK set as a verification key.
pub fn keys_from_jwks(path: &Path, json: &[u8]) -> Result<Vec<VerifyKey>, KeyLoadError> {
    let set: JwkSet = serde_json::from_slice(json).map_err(|e| load_err(path, e.to_string()))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.into_iter().enumerate() {
        let source = format!("{}#{i}", path.display());
        keys.push(verify_key(jwk, source).map_err(|m| load_err(path, format!("key {i}: {m}")))?);
    }
    Ok(keys)
}

/// A public key (SubjectPublicKeyInfo DER) as a JWK, so PEM and JWKS keys share one path.
pub fn jwk_from_spki(der: &[u8]) -> Result<Jwk, String> {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let (_, spki) =
        SubjectPublicKeyInfo::from_der(der).map_err(|e| format!("not a public key: {e}"))?;
    let oid = &spki.algorithm.algorithm;
    let algorithm = if *oid == OID_SIG_ED25519 {
        let x = &spki.subject_public_key.data;
        if x.len() != 32 {
            return Err("Ed25519 key is not 32 bytes".into());
        }
        AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
            key_type: OctetKeyPairType::OctetKeyPair,
            curve: EllipticCurve::Ed25519,
            x: b64(x),
        })
    } else if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        if curve.as_ref() != Some(&OID_EC_P256) {
            return Err("only the P-256 curve is accepted for EC keys".into());
        }
        let point = &spki.subject_public_key.data;
        if point.len() != 65 || point[0] != 4 {
            return Err("EC key is not an uncompressed P-256 point".into());
        }
        AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
            key_type: EllipticCurveKeyType::EC,
            curve: EllipticCurve::P256,
            x: b64(&point[1..33]),
            y: b64(&point[33..]),
        })
    } else if *oid == OID_PKCS1_RSAENCRYPTION {
        let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err("unreadable RSA key".into());
        };
        AlgorithmParameters::RSA(RSAKeyParameters {
            key_type: RSAKeyType::RSA,
            n: b64(strip_leading_zeros(rsa.modulus)),
            e: b64(strip_leading_zeros(rsa.exponent)),
        })
    } else {
        return Err(format!("unsupported key type {oid}"));
    };
    Ok(Jwk {
        common: CommonParameters::default(),
        algorithm,
    })
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    &b[start..]
}

/// The algorithms a key type allows, narrowed by the JWK's `alg` when it has one.
fn allowed_algorithms(jwk: &Jwk) -> Result<Vec<Algorithm>, String> {
    use base64::Engine;
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            vec![Algorithm::ES256]
        }
        AlgorithmParameters::EllipticCurve(_) => {
            return Err("only the P-256 curve is accepted for EC keys".into())
        }
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            vec![Algorithm::EdDSA]
        }
        AlgorithmParameters::OctetKeyPair(_) => {
            return Err("only Ed25519 is accepted for OKP keys".into())
        }
        AlgorithmParameters::RSA(rsa) => {
            let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(rsa.n.trim_end_matches('='))
                .map_err(|_| "RSA modulus is not base64url")?;
            let bits = strip_leading_zeros(&n).len() * 8;
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "RSA key of {bits} bits; at least {MIN_RSA_BITS} required"
                ));
            }
            vec![Algorithm::RS256, Algorithm::PS256]
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (oct) keys are refused: agencies sign with private keys".into())
        }
        _ => return Err("unsupported key type".into()),
    };
    match &jwk.common.key_algorithm {
        None => Ok(by_type),
        Some(declared) => {
            let alg = match declared {
                KeyAlgorithm::ES256 => Algorithm::ES256,
                KeyAlgorithm::EdDSA => Algorithm::EdDSA,
                KeyAlgorithm::RS256 => Algorithm::RS256,
                KeyAlgorithm::PS256 => Algorithm::PS256,
                other => return Err(format!("algorithm {other:?} is not allowed")),
            };
            if by_type.contains(&alg) {
                Ok(vec![alg])
            } else {
                Err(format!("alg {alg:?} does not fit the key type"))
            }
        }
    }
}

/// A JWK as a verification key: allow-list, key id, decoding key.
pub fn verify_key(mut jwk: Jwk, source: String) -> Result<VerifyKey, String> {
    let algorithms = allowed_algorithms(&jwk)?;
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != jsonwebtoken::jwk::PublicKeyUse::Signature)
    {
        return Err("key is not for signatures (use != sig)".into());
    }
    let kid = match jwk.common.key_id.take() {
        Some(k) if !k.is_empty() => k,
        _ => thumbprint(&jwk)?,
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
    Ok(VerifyKey {
        kid,
        algorithms,
        source,
        key,
    })
}

/// The RFC 7638 SHA-256 thumbprint of a key, base64url: its default `kid`.
pub fn thumbprint(jwk: &Jwk) -> Result<String, String> {
    let mut bare = jwk.clone();
    bare.common = CommonParameters::default();
    bare.thumbprint(ThumbprintHash::SHA256)
        .map_err(|e| e.to_string())
}

/// The `kid` of the first key in a PEM public key file (what development tokens carry).
pub fn pem_kid(pem: &[u8]) -> Option<String> {
    let (kind, der) = <(SectionKind, Vec<u8>)>::pem_slice_iter(pem).next()?.ok()?;
    if kind != SectionKind::PublicKey {
        return None;
    }
    thumbprint(&jwk_from_spki(&der).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p256_pem() -> String {
        rcgen::KeyPair::generate().unwrap().public_key_pem()
    }

    #[test]
    fn pem_keys_get_their_type_algorithm_and_a_thumbprint_kid() {
        let dir = tempfile::tempdir().unwrap();
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let pem = format!("{}{}", p256_pem(), ed.public_key_pem());
        std::fs::write(dir.path().join("a.pub.pem"), &pem).unwrap();
        let keys = load_agency_keys(dir.path(), "a").unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].algorithms, vec![Algorithm::ES256]);
        assert_eq!(keys[1].algorithms, vec![Algorithm::EdDSA]);
        assert_eq!(keys[0].kid.len(), 43, "base64url of 32 bytes");
        assert_eq!(
            pem_kid(pem.as_bytes()).as_deref(),
            Some(keys[0].kid.as_str())
        );
        assert!(load_agency_keys(dir.path(), "nobody").unwrap().is_empty());
    }

    #[test]
    fn weak_symmetric_and_foreign_keys_are_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let oct = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#;
        std::fs::write(dir.path().join("a.jwks.json"), oct).unwrap();
        assert!(load_agency_keys(dir.path(), "a")
            .unwrap_err()
            .message
            .contains("symmetric"));
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        std::fs::write(dir.path().join("b.pub.pem"), p384.public_key_pem()).unwrap();
        assert!(load_agency_keys(dir.path(), "b").is_err());
        let priv_pem = rcgen::KeyPair::generate().unwrap().serialize_pem();
        std::fs::write(dir.path().join("c.pub.pem"), priv_pem).unwrap();
        assert!(
            load_agency_keys(dir.path(), "c").is_err(),
            "private keys do not belong in the keys directory"
        );
        // A 1024-bit RSA modulus (128 bytes) is too short.
        let short = format!(r#"{{"keys":[{{"kty":"RSA","n":"{}","e":"AQAB"}}]}}"#, {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xc5u8; 128])
        });
        std::fs::write(dir.path().join("d.jwks.json"), short).unwrap();
        assert!(load_agency_keys(dir.path(), "d")
            .unwrap_err()
            .message
            .contains("2048"));
    }

    #[test]
    fn jwks_alg_narrows_and_must_fit_the_key() {
        use rcgen::PublicKeyData;
        let der = rcgen::KeyPair::generate()
            .unwrap()
            .subject_public_key_info();
        let mut jwk = jwk_from_spki(&der).unwrap();
        jwk.common.key_algorithm = Some(KeyAlgorithm::RS256);
        assert!(verify_key(jwk.clone(), "x".into()).is_err());
        jwk.common.key_algorithm = Some(KeyAlgorithm::HS256);
        assert!(verify_key(jwk.clone(), "x".into()).is_err());
        jwk.common.key_algorithm = Some(KeyAlgorithm::ES256);
        jwk.common.key_id = Some("2026-11".into());
        let k = verify_key(jwk, "x".into()).unwrap();
        assert_eq!(k.kid, "2026-11");
        assert_eq!(k.algorithms, vec![Algorithm::ES256]);
    }
}
