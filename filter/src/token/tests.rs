use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use mock_idp::{IdpState, MockIdpConfig, SigningAlg};
use serde_json::{json, Value};

use super::*;

const ISS: &str = "https://idp.example.com";
const NOW: u64 = 1_800_000_000;

fn idp(alg: SigningAlg) -> Arc<IdpState> {
    IdpState::new(MockIdpConfig {
        signing_alg: alg,
        ..Default::default()
    })
}

fn jwks_of(idp: &IdpState) -> Jwks {
    Jwks::parse(idp.jwks().to_string().as_bytes()).unwrap()
}

fn claims() -> Value {
    json!({"iss": ISS, "sub": "user-1", "aud": "gate", "exp": NOW + 300, "iat": NOW - 10, "nonce": "n-123"})
}

fn audiences() -> Vec<String> {
    vec!["gate".to_string()]
}

fn expect(aud: &[String]) -> Expectations<'_> {
    Expectations {
        exclusive_audiences: true,
        issuer: ISS,
        audiences: aud,
        client_id: Some("gate"),
        nonce: Some("n-123"),
        require_iat: true,
        require_sub: true,
        now: NOW,
        skew: DEFAULT_CLOCK_SKEW_SECS,
    }
}

fn with_claim(k: &str, v: Value) -> Value {
    let mut c = claims();
    if v.is_null() {
        c.as_object_mut().unwrap().remove(k);
    } else {
        c[k] = v;
    }
    c
}

fn raw_token(header: &Value, payload: &str, sig: &str) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload),
        sig
    )
}

#[test]
fn accepts_valid_rs256_and_es256_tokens() {
    for alg in [SigningAlg::Rs256, SigningAlg::Es256] {
        let idp = idp(alg);
        let t = idp.sign_jwt(json!({}), claims());
        let aud = audiences();
        let v = verify(&t, &jwks_of(&idp), &expect(&aud)).unwrap();
        assert_eq!(v.subject.as_deref(), Some("user-1"));
        assert_eq!(v.expires_at, NOW + 300);
    }
}

#[test]
fn rejects_tampered_signature_and_payload() {
    let idp = idp(SigningAlg::Rs256);
    let t = idp.sign_jwt(json!({}), claims());
    let aud = audiences();
    let keys = jwks_of(&idp);
    let (head, sig) = t.rsplit_once('.').unwrap();
    let mut sig_bytes = URL_SAFE_NO_PAD.decode(sig).unwrap();
    sig_bytes[10] ^= 1;
    let bad = format!("{head}.{}", URL_SAFE_NO_PAD.encode(&sig_bytes));
    assert_eq!(
        verify(&bad, &keys, &expect(&aud)).unwrap_err(),
        TokenError::BadSignature
    );
    let parts: Vec<&str> = t.split('.').collect();
    let forged_payload = URL_SAFE_NO_PAD.encode(with_claim("sub", json!("admin")).to_string());
    let forged = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
    assert_eq!(
        verify(&forged, &keys, &expect(&aud)).unwrap_err(),
        TokenError::BadSignature
    );
    let empty_sig = format!("{}.{}.", parts[0], parts[1]);
    assert_eq!(
        verify(&empty_sig, &keys, &expect(&aud)).unwrap_err(),
        TokenError::BadSignature
    );
}

#[test]
fn rejects_alg_none_in_every_spelling_and_hmac() {
    let idp = idp(SigningAlg::Rs256);
    let keys = jwks_of(&idp);
    let aud = audiences();
    let payload = claims().to_string();
    for alg in [
        "none", "None", "NONE", "nOnE", "HS256", "HS384", "HS512", "RS384", "PS256", "EdDSA", "",
    ] {
        for sig in ["", "c2ln"] {
            let t = raw_token(
                &json!({"alg": alg, "kid": idp.current_kid()}),
                &payload,
                sig,
            );
            let e = verify(&t, &keys, &expect(&aud)).unwrap_err();
            assert!(
                matches!(
                    e,
                    TokenError::AlgorithmNotAllowed(_) | TokenError::BadSignature
                ),
                "{alg}: {e:?}"
            );
        }
    }
    let no_alg = raw_token(&json!({"kid": idp.current_kid()}), &payload, "c2ln");
    assert!(matches!(
        verify(&no_alg, &keys, &expect(&aud)).unwrap_err(),
        TokenError::AlgorithmNotAllowed(_)
    ));
}

#[test]
fn rejects_hs256_signed_with_the_public_key() {
    let idp = idp(SigningAlg::Rs256);
    let jwks = idp.jwks();
    let n = jwks["keys"][0]["n"].as_str().unwrap();
    let header = json!({"alg": "HS256", "kid": idp.current_kid()});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims().to_string())
    );
    let mac = hmac_sha256::HMAC::mac(signing_input.as_bytes(), n.as_bytes());
    let t = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(mac));
    let aud = audiences();
    assert_eq!(
        verify(&t, &jwks_of(&idp), &expect(&aud)).unwrap_err(),
        TokenError::AlgorithmNotAllowed("HS256".into())
    );
}

#[test]
fn rejects_embedded_or_referenced_keys_and_crit() {
    let idp = idp(SigningAlg::Rs256);
    let keys = jwks_of(&idp);
    let aud = audiences();
    for (k, v) in [
        ("jku", json!("https://evil.example/keys")),
        ("jwk", json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"})),
        ("x5u", json!("https://evil.example/cert")),
        ("x5c", json!(["MII..."])),
        ("crit", json!(["exp"])),
    ] {
        let t = idp.sign_jwt(json!({ k: v }), claims());
        assert!(
            matches!(
                verify(&t, &keys, &expect(&aud)).unwrap_err(),
                TokenError::ForbiddenHeader(_)
            ),
            "{k}"
        );
    }
    let t = idp.sign_jwt(json!({"b64": false, "crit": ["b64"]}), claims());
    assert!(matches!(
        verify(&t, &keys, &expect(&aud)).unwrap_err(),
        TokenError::ForbiddenHeader(_)
    ));
}

#[test]
fn unknown_kid_asks_for_keys_and_odd_kids_do_no_harm() {
    let idp = idp(SigningAlg::Rs256);
    let keys = jwks_of(&idp);
    let aud = audiences();
    for kid in ["other", "../../dev/null", "1"] {
        let t = idp.sign_jwt(json!({ "kid": kid }), claims());
        assert_eq!(
            verify(&t, &keys, &expect(&aud)).unwrap_err(),
            TokenError::UnknownKey,
            "{kid}"
        );
    }
    let long = "k".repeat(10_000);
    let t = idp.sign_jwt(json!({ "kid": long }), claims());
    assert!(verify(&t, &keys, &expect(&aud)).is_err());
    let t = idp.sign_jwt(json!({ "kid": 5 }), claims());
    assert!(verify(&t, &keys, &expect(&aud)).is_err());
}

#[test]
fn token_without_kid_verifies_by_trying_matching_keys() {
    let idp = idp(SigningAlg::Rs256);
    let aud = audiences();
    let t = idp.sign_jwt(json!({"kid": null}), claims());
    assert!(verify(&t, &jwks_of(&idp), &expect(&aud)).is_ok());
    idp.rotate_keys_keep_old();
    let t = idp.sign_jwt(json!({"kid": null}), claims());
    assert!(verify(&t, &jwks_of(&idp), &expect(&aud)).is_ok());
}

#[test]
fn rotated_keys_need_the_new_jwks() {
    let idp = idp(SigningAlg::Es256);
    let old = jwks_of(&idp);
    idp.rotate_keys();
    let t = idp.sign_jwt(json!({}), claims());
    let aud = audiences();
    assert_eq!(
        verify(&t, &old, &expect(&aud)).unwrap_err(),
        TokenError::UnknownKey
    );
    assert!(verify(&t, &jwks_of(&idp), &expect(&aud)).is_ok());
}

#[test]
fn claim_rules() {
    let idp = idp(SigningAlg::Es256);
    let keys = jwks_of(&idp);
    let aud = audiences();
    let check = |c: Value| verify(&idp.sign_jwt(json!({}), c), &keys, &expect(&aud));
    assert_eq!(
        check(with_claim("iss", json!("https://idp.example.com1"))).unwrap_err(),
        TokenError::InvalidIssuer
    );
    assert_eq!(
        check(with_claim("iss", json!("https://idp.example.com/"))).unwrap_err(),
        TokenError::InvalidIssuer
    );
    assert_eq!(
        check(with_claim("iss", Value::Null)).unwrap_err(),
        TokenError::MissingClaim("iss")
    );
    assert_eq!(
        check(with_claim("aud", json!("gate1"))).unwrap_err(),
        TokenError::InvalidAudience
    );
    assert_eq!(
        check(with_claim("aud", json!([]))).unwrap_err(),
        TokenError::InvalidAudience
    );
    assert_eq!(
        check(with_claim("aud", Value::Null)).unwrap_err(),
        TokenError::MissingClaim("aud")
    );
    // OIDC Core §3.1.3.7 (3): an untrusted extra audience is refused, with or without azp.
    assert_eq!(
        check(with_claim("aud", json!(["gate", "untrusted"]))).unwrap_err(),
        TokenError::InvalidAudience
    );
    let mut multi = with_claim("aud", json!(["gate", "api"]));
    multi["azp"] = json!("gate");
    assert_eq!(
        check(multi.clone()).unwrap_err(),
        TokenError::InvalidAudience
    );
    // With several trusted audiences, azp decides (items 4-5).
    let trusted = vec!["gate".to_string(), "api".to_string()];
    let several = Expectations {
        audiences: &trusted,
        ..expect(&aud)
    };
    let check_several = |c: Value| verify(&idp.sign_jwt(json!({}), c), &keys, &several);
    assert!(check_several(multi.clone()).is_ok());
    multi.as_object_mut().unwrap().remove("azp");
    assert_eq!(
        check_several(multi.clone()).unwrap_err(),
        TokenError::InvalidAuthorizedParty
    );
    multi["azp"] = json!("other");
    assert_eq!(
        check_several(multi).unwrap_err(),
        TokenError::InvalidAuthorizedParty
    );
    assert_eq!(
        check(with_claim("azp", json!("other"))).unwrap_err(),
        TokenError::InvalidAuthorizedParty
    );
    assert_eq!(
        check(with_claim("sub", Value::Null)).unwrap_err(),
        TokenError::MissingClaim("sub")
    );
    assert_eq!(
        check(with_claim("sub", json!(""))).unwrap_err(),
        TokenError::MissingClaim("sub")
    );
    assert_eq!(
        check(with_claim("iat", Value::Null)).unwrap_err(),
        TokenError::MissingClaim("iat")
    );
    assert_eq!(
        check(with_claim("exp", Value::Null)).unwrap_err(),
        TokenError::MissingClaim("exp")
    );
    assert_eq!(
        check(with_claim("nonce", json!("012345678"))).unwrap_err(),
        TokenError::InvalidNonce
    );
    assert_eq!(
        check(with_claim("nonce", Value::Null)).unwrap_err(),
        TokenError::MissingClaim("nonce")
    );
}

#[test]
fn time_rules_with_skew_at_the_edge() {
    let idp = idp(SigningAlg::Es256);
    let keys = jwks_of(&idp);
    let aud = audiences();
    let check = |c: Value| verify(&idp.sign_jwt(json!({}), c), &keys, &expect(&aud));
    assert_eq!(
        check(with_claim("exp", json!(NOW - 360))).unwrap_err(),
        TokenError::Expired
    );
    assert!(
        check(with_claim("exp", json!(NOW - 30))).is_ok(),
        "inside skew"
    );
    assert_eq!(
        check(with_claim("exp", json!(NOW - 61))).unwrap_err(),
        TokenError::Expired
    );
    assert_eq!(
        check(with_claim("nbf", json!(NOW + 600))).unwrap_err(),
        TokenError::NotYetValid
    );
    assert_eq!(
        check(with_claim("iat", json!(NOW + 600))).unwrap_err(),
        TokenError::NotYetValid
    );
    assert!(
        check(with_claim("iat", json!(NOW + 30))).is_ok(),
        "inside skew"
    );
}

#[test]
fn rejects_duplicate_members() {
    let idp = idp(SigningAlg::Rs256);
    let keys = jwks_of(&idp);
    let aud = audiences();
    let payload = format!(
        r#"{{"iss":"{ISS}","iss":"https://evil","sub":"u","aud":"gate","exp":{},"iat":{},"nonce":"n-123"}}"#,
        NOW + 60,
        NOW
    );
    let t = raw_token(
        &json!({"alg": "RS256", "kid": idp.current_kid()}),
        &payload,
        "c2ln",
    );
    assert_eq!(
        verify(&t, &keys, &expect(&aud)).unwrap_err(),
        TokenError::DuplicateMember("iss".into())
    );
    let header = format!(
        r#"{{"alg":"RS256","alg":"none","kid":"{}"}}"#,
        idp.current_kid()
    );
    let t = format!(
        "{}.{}.c2ln",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims().to_string())
    );
    assert_eq!(
        verify(&t, &keys, &expect(&aud)).unwrap_err(),
        TokenError::DuplicateMember("alg".into())
    );
}

#[test]
fn malformed_tokens_never_panic() {
    let idp = idp(SigningAlg::Rs256);
    let keys = jwks_of(&idp);
    let aud = audiences();
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let cases = vec![
        String::new(),
        ".".into(),
        "..".into(),
        "a.b.c.d.e".into(),
        "a.b".into(),
        "!!!.???.###".into(),
        format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode([0xff, 0xfe]),
            URL_SAFE_NO_PAD.encode("{}")
        ),
        format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#),
            URL_SAFE_NO_PAD.encode(&deep)
        ),
        "x".repeat(1 << 20),
        format!(
            "{}==.e30.c2ln",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#)
        ),
    ];
    for t in cases {
        assert!(verify(&t, &keys, &expect(&aud)).is_err());
    }
}

#[test]
fn jwks_skips_junk_and_weak_keys_but_keeps_good_ones() {
    let idp = idp(SigningAlg::Rs256);
    let mut doc = idp.jwks();
    let good = doc["keys"][0].clone();
    doc["keys"] = json!([
        {"kty": "AKP", "alg": "ML-DSA-44", "pub": "AAAA"},
        {"kty": "OIDF-CONFORMANCE-UNSUPPORTED"},
        {"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "weak"},
        {"kty": "RSA", "use": "enc", "n": good["n"], "e": "AQAB", "kid": "enc"},
        {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"},
        "not an object",
        good
    ]);
    let keys = Jwks::parse(doc.to_string().as_bytes()).unwrap();
    assert_eq!(keys.len(), 1);
    assert!(!keys.has_kid("weak"));
    let aud = audiences();
    assert!(verify(&idp.sign_jwt(json!({}), claims()), &keys, &expect(&aud)).is_ok());
}

#[test]
fn jwks_without_usable_keys_is_refused() {
    assert_eq!(
        Jwks::parse(br#"{"keys":[]}"#).unwrap_err(),
        JwksError::NoUsableKey
    );
    assert!(matches!(
        Jwks::parse(b"<html>").unwrap_err(),
        JwksError::Malformed(_)
    ));
    assert!(Jwks::parse(br#"{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB"}]}"#).is_err());
}

#[test]
fn rejects_1024_bit_rsa_key() {
    // A 1024-bit modulus (odd, top bit set), e = 65537: jwt-simple refuses it as weak.
    let mut n = vec![0xffu8; 128];
    n[127] = 0x01;
    let jwk = json!({"keys": [{"kty": "RSA", "n": URL_SAFE_NO_PAD.encode(&n), "e": "AQAB"}]});
    assert_eq!(
        Jwks::parse(jwk.to_string().as_bytes()).unwrap_err(),
        JwksError::NoUsableKey
    );
}
