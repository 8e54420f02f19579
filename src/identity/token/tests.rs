//! Unit tests of token verification: every RFC 8725 rule, binding, cache, rotation.

use super::*;
use crate::devpki::token::{issue, issue_bound, issue_claims, IssueRequest};
use base64::Engine;
use jsonwebtoken::{EncodingKey, Header};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn options() -> VerifyOptions {
    VerifyOptions::new(
        "karibche".into(),
        Duration::from_secs(5),
        Duration::from_secs(900),
    )
}

fn setup() -> (tempfile::TempDir, KeyStore) {
    let dir = tempfile::tempdir().unwrap();
    crate::devpki::ensure_signing_keys(dir.path(), &["psda", "ssg"]).unwrap();
    let ks = KeyStore::load(dir.path(), &["psda", "ssg", "geostat"], options()).unwrap();
    (dir, ks)
}

fn req(agency: &str, ttl: u64) -> IssueRequest {
    IssueRequest {
        agency: agency.into(),
        officer: "officer-7".into(),
        purpose: "identity-documentation".into(),
        case_ref: Some("C-1".into()),
        ttl: Duration::from_secs(ttl),
        audience: "karibche".into(),
        backdate: Duration::ZERO,
    }
}

fn on(agency: &str) -> Presented<'_> {
    Presented {
        agency,
        certificate_sha256: None,
        require_bound: false,
    }
}

fn claims(iss: &str) -> serde_json::Value {
    let now = unix_now();
    serde_json::json!({
        "iss": iss, "sub": "officer-7", "aud": "karibche", "purpose": "p",
        "iat": now, "nbf": now, "exp": now + 300, "jti": "j-1"
    })
}

#[test]
fn issued_token_verifies_for_its_agency_only() {
    let (dir, ks) = setup();
    let t = issue(dir.path(), &req("psda", 300)).unwrap();
    let o = ks.verify(&t, &on("psda")).unwrap();
    assert_eq!(o.id, "officer-7");
    assert_eq!(o.case_ref.as_deref(), Some("C-1"));
    assert!(o.token_id.is_some());
    // The token's kid is psda's key: on an ssg connection it names no key of ssg.
    assert_eq!(ks.verify(&t, &on("ssg")), Err(TokenError::WrongAgency));
    assert_eq!(ks.verify(&t, &on("geostat")), Err(TokenError::NoKey));
}

#[test]
fn another_agencys_key_without_kid_is_a_wrong_agency() {
    let (dir, ks) = setup();
    let pem = std::fs::read(dir.path().join("psda.key")).unwrap();
    let key = EncodingKey::from_ec_pem(&pem).unwrap();
    let t = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims("psda"), &key).unwrap();
    assert_eq!(ks.verify(&t, &on("ssg")), Err(TokenError::WrongAgency));
    let t = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims("ssg"), &key).unwrap();
    assert_eq!(ks.verify(&t, &on("ssg")), Err(TokenError::BadSignature));
}

#[test]
fn claims_are_checked_one_by_one() {
    let (dir, ks) = setup();
    let sign = |c: serde_json::Value| issue_claims(dir.path(), "psda", &c).unwrap();
    let now = unix_now();
    let cases: Vec<(&str, serde_json::Value, TokenError)> = vec![
        (
            "exp passed",
            serde_json::json!({"exp": now - 60, "iat": now - 120, "nbf": now - 120}),
            TokenError::Expired,
        ),
        (
            "nbf ahead",
            serde_json::json!({"nbf": now + 120}),
            TokenError::NotYetValid,
        ),
        (
            "iat ahead",
            serde_json::json!({"iat": now + 120, "nbf": now}),
            TokenError::NotYetValid,
        ),
        (
            "too long",
            serde_json::json!({"exp": now + 3600}),
            TokenError::LifetimeTooLong,
        ),
        (
            "aud",
            serde_json::json!({"aud": "someone-else"}),
            TokenError::WrongAudience,
        ),
        (
            "iss",
            serde_json::json!({"iss": "ssg"}),
            TokenError::WrongIssuer,
        ),
        (
            "purpose",
            serde_json::json!({"purpose": null}),
            TokenError::MissingClaim("purpose"),
        ),
        (
            "empty purpose",
            serde_json::json!({"purpose": " "}),
            TokenError::MissingClaim("purpose"),
        ),
        (
            "sub",
            serde_json::json!({"sub": null}),
            TokenError::MissingClaim("sub"),
        ),
        (
            "exp",
            serde_json::json!({"exp": null}),
            TokenError::MissingClaim("exp"),
        ),
    ];
    for (name, patch, want) in cases {
        let mut c = claims("psda");
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        assert_eq!(ks.verify(&sign(c), &on("psda")), Err(want), "{name}");
    }
    // Without iat, the lifetime counts from now.
    let mut c = claims("psda");
    c.as_object_mut().unwrap().remove("iat");
    c.as_object_mut().unwrap().remove("nbf");
    c["exp"] = serde_json::json!(now + 3600);
    assert_eq!(
        ks.verify(&sign(c), &on("psda")),
        Err(TokenError::LifetimeTooLong)
    );
}

#[test]
fn algorithm_none_hmac_confusion_and_foreign_kids_are_refused() {
    let (dir, ks) = setup();
    let body = B64.encode(serde_json::to_vec(&claims("psda")).unwrap());
    for alg in ["none", "None", "HS256", "ES384", "RS256"] {
        let header = B64.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
        let t = format!("{header}.{body}.");
        assert_eq!(
            ks.verify(&t, &on("psda")),
            Err(TokenError::AlgorithmNotAllowed),
            "{alg}"
        );
    }
    // HS256 keyed with the agency's public key bytes (the classic confusion).
    let public = std::fs::read(dir.path().join("psda.pub.pem")).unwrap();
    let t = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("psda"),
        &EncodingKey::from_secret(&public),
    )
    .unwrap();
    assert_eq!(
        ks.verify(&t, &on("psda")),
        Err(TokenError::AlgorithmNotAllowed)
    );
    // A kid that looks like a path is only ever compared.
    let pem = std::fs::read(dir.path().join("psda.key")).unwrap();
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("../ssg.pub.pem".into());
    let t = jsonwebtoken::encode(
        &h,
        &claims("psda"),
        &EncodingKey::from_ec_pem(&pem).unwrap(),
    )
    .unwrap();
    assert_eq!(ks.verify(&t, &on("psda")), Err(TokenError::UnknownKey));
}

#[test]
fn size_limit_truncation_and_tampering() {
    let (dir, ks) = setup();
    let huge = format!("{}.{}.{}", "a".repeat(10), "b".repeat(9000), "c");
    assert_eq!(ks.verify(&huge, &on("psda")), Err(TokenError::TooLarge));
    let good = issue(dir.path(), &req("psda", 300)).unwrap();
    let truncated = &good[..good.len() - 8];
    assert!(ks.verify(truncated, &on("psda")).is_err());
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let mut sig = B64.decode(&parts[2]).unwrap();
    sig[10] ^= 1;
    parts[2] = B64.encode(sig);
    assert_eq!(
        ks.verify(&parts.join("."), &on("psda")),
        Err(TokenError::BadSignature)
    );
    // A payload changed after signing.
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let mut c: serde_json::Value = serde_json::from_slice(&B64.decode(&parts[1]).unwrap()).unwrap();
    c["sub"] = "someone-else".into();
    parts[1] = B64.encode(serde_json::to_vec(&c).unwrap());
    assert_eq!(
        ks.verify(&parts.join("."), &on("psda")),
        Err(TokenError::BadSignature)
    );
    assert_eq!(
        ks.verify("not-a-jwt", &on("psda")),
        Err(TokenError::Malformed)
    );
}

#[test]
fn bound_tokens_hold_only_on_their_certificate() {
    let (dir, ks) = setup();
    let cert = "ab".repeat(32);
    let other = "cd".repeat(32);
    let t = issue_bound(dir.path(), &req("psda", 300), &cert).unwrap();
    let mut p = on("psda");
    p.certificate_sha256 = Some(&cert);
    ks.verify(&t, &p).unwrap();
    p.certificate_sha256 = Some(&other);
    assert_eq!(
        ks.verify(&t, &p),
        Err(TokenError::CertificateMismatch),
        "cache must not skip the binding"
    );
    p.certificate_sha256 = None;
    assert_eq!(ks.verify(&t, &p), Err(TokenError::CertificateMismatch));
    let unbound = issue(dir.path(), &req("psda", 300)).unwrap();
    p.require_bound = true;
    p.certificate_sha256 = Some(&cert);
    assert_eq!(ks.verify(&unbound, &p), Err(TokenError::Unbound));
    assert_eq!(x5t_s256(&"00".repeat(32)).unwrap().len(), 43);
    assert!(x5t_s256("zz").is_none());
}

#[test]
fn cache_hits_are_per_agency_bounded_and_never_past_exp() {
    let dir = tempfile::tempdir().unwrap();
    crate::devpki::ensure_signing_keys(dir.path(), &["psda"]).unwrap();
    let mut o = options();
    o.cache_capacity = 3;
    let ks = KeyStore::load(dir.path(), &["psda"], o).unwrap();
    let t = issue(dir.path(), &req("psda", 300)).unwrap();
    ks.verify(&t, &on("psda")).unwrap();
    ks.verify(&t, &on("psda")).unwrap();
    assert_eq!(ks.cached_tokens(), 1);
    assert_eq!(ks.verify(&t, &on("ssg")), Err(TokenError::NoKey));
    for _ in 0..5 {
        let t = issue(dir.path(), &req("psda", 300)).unwrap();
        ks.verify(&t, &on("psda")).unwrap();
        assert!(ks.cached_tokens() <= 3);
    }
    // An entry whose exp has passed is never served.
    let t = issue(dir.path(), &req("psda", 300)).unwrap();
    ks.verify(&t, &on("psda")).unwrap();
    let hash = token_hash(&t);
    ks.cache.lock().unwrap().get_mut(&hash).unwrap().exp = unix_now() - 1;
    let mut fake = ks.cache.lock().unwrap();
    fake.get_mut(&hash).unwrap().officer.id = "from-cache".into();
    drop(fake);
    assert_eq!(ks.verify(&t, &on("psda")).unwrap().id, "officer-7");
}

#[test]
fn rotation_several_keys_pem_and_jwks() {
    use rcgen::PublicKeyData;
    let dir = tempfile::tempdir().unwrap();
    crate::devpki::ensure_signing_keys(dir.path(), &["psda"]).unwrap();
    let old = issue(dir.path(), &req("psda", 300)).unwrap();
    // The identity provider publishes a new key as JWKS next to the old PEM, then signs with it.
    let new = rcgen::KeyPair::generate().unwrap();
    let mut jwk = crate::identity::keys::jwk_from_spki(&new.subject_public_key_info()).unwrap();
    jwk.common.key_id = Some("2026-12".into());
    let set = serde_json::json!({ "keys": [jwk] });
    std::fs::write(dir.path().join("psda.jwks.json"), set.to_string()).unwrap();
    let ks = KeyStore::load(dir.path(), &["psda"], options()).unwrap();
    assert_eq!(ks.key_counts(), vec![("psda".to_owned(), 2)]);
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("2026-12".into());
    let key = EncodingKey::from_ec_der(&new.serialize_der());
    let fresh = jsonwebtoken::encode(&h, &claims("psda"), &key).unwrap();
    ks.verify(&fresh, &on("psda")).unwrap();
    ks.verify(&old, &on("psda")).unwrap();
    // Without a kid every key of the agency is tried.
    let anon = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims("psda"), &key).unwrap();
    ks.verify(&anon, &on("psda")).unwrap();
    // The old key withdrawn: its tokens stop verifying.
    std::fs::remove_file(dir.path().join("psda.pub.pem")).unwrap();
    let ks = KeyStore::load(dir.path(), &["psda"], options()).unwrap();
    assert_eq!(ks.verify(&old, &on("psda")), Err(TokenError::UnknownKey));
    ks.verify(&fresh, &on("psda")).unwrap();
}

#[test]
fn eddsa_and_rsa_keys_verify_their_algorithms() {
    let dir = tempfile::tempdir().unwrap();
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    std::fs::write(dir.path().join("a.pub.pem"), ed.public_key_pem()).unwrap();
    let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let rsa_pub = {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::signature::KeyPair;
        rsa.public_key().as_der().unwrap()
    };
    let spki = rustls_pki_types::SubjectPublicKeyInfoDer::from(rsa_pub.as_ref().to_vec());
    let jwk = crate::identity::keys::jwk_from_spki(spki.as_ref()).unwrap();
    std::fs::write(
        dir.path().join("b.jwks.json"),
        serde_json::json!({ "keys": [jwk] }).to_string(),
    )
    .unwrap();
    let ks = KeyStore::load(dir.path(), &["a", "b"], options()).unwrap();
    let ed_key = EncodingKey::from_ed_der(&ed.serialize_der());
    let t = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims("a"), &ed_key).unwrap();
    ks.verify(&t, &on("a")).unwrap();
    let pkcs8 = {
        use aws_lc_rs::encoding::AsDer;
        rsa.as_der().unwrap()
    };
    let pem = {
        let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            lines.join("\n")
        )
    };
    let rsa_key = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
    for alg in [Algorithm::RS256, Algorithm::PS256] {
        let t = jsonwebtoken::encode(&Header::new(alg), &claims("b"), &rsa_key).unwrap();
        ks.verify(&t, &on("b"))
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
    }
    let t = jsonwebtoken::encode(&Header::new(Algorithm::RS512), &claims("b"), &rsa_key).unwrap();
    assert_eq!(
        ks.verify(&t, &on("b")),
        Err(TokenError::AlgorithmNotAllowed)
    );
}
