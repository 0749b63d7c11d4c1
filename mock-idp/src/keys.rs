//! Signing keys and JWT assembly.
//!
//! Keys are generated with `jwt-simple`; the signatures themselves are computed with the same
//! primitives jwt-simple uses internally (superboring RSA, p256 ECDSA, hmac-sha256), because the
//! mock needs full control over the JOSE header and claims (fault injection).

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jwt_simple::prelude::*;
use serde_json::{Map, Value};

use crate::SigningAlg;

/// One signing key with its key id.
pub(crate) struct SigningKey {
    pub(crate) kid: String,
    material: Material,
    /// Public key as PEM (SubjectPublicKeyInfo); used as the HMAC secret by the
    /// "HS256 with the public key" key-confusion fault.
    pub(crate) public_pem: String,
    pub(crate) jwk: Value,
}

enum Material {
    Rsa(Box<superboring::pkey::PKey<superboring::pkey::Private>>),
    Ec(p256::ecdsa::SigningKey),
}

/// RSA key generation is slow (especially in debug builds); the first key of every
/// [`crate::MockIdp`] in a process shares one generated key. Rotations always generate new keys.
static SHARED_RSA: OnceLock<RS256KeyPair> = OnceLock::new();

fn b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

pub(crate) fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf).expect("getrandom");
    b64(&buf)
}

fn new_kid() -> String {
    random_token(9)
}

impl SigningKey {
    /// Generate a key. `shared` allows reusing the process-wide RSA key.
    pub(crate) fn generate(alg: SigningAlg, shared: bool) -> SigningKey {
        let kid = new_kid();
        match alg {
            SigningAlg::Rs256 => {
                let gen = || RS256KeyPair::generate(2048).expect("RSA key generation");
                let kp = if shared {
                    SHARED_RSA.get_or_init(gen).clone()
                } else {
                    gen()
                };
                let der = kp.to_der().expect("RSA key to DER");
                let rsa = superboring::rsa::Rsa::private_key_from_der(&der).expect("RSA DER");
                let pkey = superboring::pkey::PKey::from_rsa(rsa).expect("RSA pkey");
                let public = kp.public_key();
                let comps = public.to_components();
                let jwk = serde_json::json!({
                    "kty": "RSA",
                    "alg": "RS256",
                    "use": "sig",
                    "kid": kid,
                    "n": b64(&comps.n),
                    "e": b64(&comps.e),
                });
                SigningKey {
                    public_pem: public.to_pem().expect("RSA public PEM"),
                    kid,
                    material: Material::Rsa(Box::new(pkey)),
                    jwk,
                }
            }
            SigningAlg::Es256 => {
                let kp = ES256KeyPair::generate();
                let sk = p256::ecdsa::SigningKey::from_slice(&kp.key_pair().to_bytes())
                    .expect("P-256 key");
                let public = kp.public_key();
                let point = public.public_key().to_bytes_uncompressed();
                // 0x04 || x (32) || y (32)
                let jwk = serde_json::json!({
                    "kty": "EC",
                    "alg": "ES256",
                    "use": "sig",
                    "kid": kid,
                    "crv": "P-256",
                    "x": b64(&point[1..33]),
                    "y": b64(&point[33..65]),
                });
                SigningKey {
                    public_pem: public.to_pem().expect("EC public PEM"),
                    kid,
                    material: Material::Ec(sk),
                    jwk,
                }
            }
        }
    }

    pub(crate) fn alg(&self) -> &'static str {
        match self.material {
            Material::Rsa(_) => "RS256",
            Material::Ec(_) => "ES256",
        }
    }

    fn sign(&self, input: &[u8]) -> Vec<u8> {
        match &self.material {
            Material::Rsa(pkey) => {
                let mut signer = superboring::sign::Signer::new(
                    superboring::hash::MessageDigest::sha256(),
                    pkey,
                )
                .expect("RSA signer");
                signer
                    .set_rsa_padding(superboring::rsa::Padding::PKCS1)
                    .expect("RSA padding");
                signer.update(input).expect("RSA update");
                signer.sign_to_vec().expect("RSA sign")
            }
            Material::Ec(sk) => {
                use p256::ecdsa::signature::Signer as _;
                let sig: p256::ecdsa::Signature = sk.sign(input);
                sig.to_bytes().to_vec()
            }
        }
    }
}

/// How to produce the signature part of a JWT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SignMode {
    /// Sign with the key (header `alg` "none" produces an unsigned token).
    Normal,
    /// `alg: HS256`, HMAC keyed with the public key PEM (algorithm confusion attack).
    Hs256WithPublicKey,
}

/// Apply `overrides` to `base`: fields are set, JSON null removes the field.
pub(crate) fn merge(base: &mut Map<String, Value>, overrides: &Value) {
    if let Value::Object(o) = overrides {
        for (k, v) in o {
            if v.is_null() {
                base.remove(k);
            } else {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Build a compact JWS. `header_overrides` are merged over `{alg, kid, typ}`.
pub(crate) fn encode_jwt(
    key: &SigningKey,
    typ: &str,
    header_overrides: &[&Value],
    claims: &Value,
    mode: SignMode,
    corrupt: bool,
) -> String {
    let mut header = Map::new();
    header.insert("alg".into(), Value::String(key.alg().into()));
    header.insert("kid".into(), Value::String(key.kid.clone()));
    header.insert("typ".into(), Value::String(typ.into()));
    if mode == SignMode::Hs256WithPublicKey {
        header.insert("alg".into(), Value::String("HS256".into()));
    }
    for o in header_overrides {
        merge(&mut header, o);
    }
    let header_json = serde_json::to_vec(&Value::Object(header.clone())).expect("header json");
    let claims_json = serde_json::to_vec(claims).expect("claims json");
    let signing_input = format!("{}.{}", b64(&header_json), b64(&claims_json));
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    let mut sig = if mode == SignMode::Hs256WithPublicKey {
        hmac_sha256::HMAC::mac(signing_input.as_bytes(), key.public_pem.as_bytes()).to_vec()
    } else if alg.eq_ignore_ascii_case("none") {
        Vec::new()
    } else {
        key.sign(signing_input.as_bytes())
    };
    if corrupt && !sig.is_empty() {
        let mid = sig.len() / 2;
        sig[mid] ^= 0x5a;
    }
    format!("{signing_input}.{}", b64(&sig))
}

/// A deliberately weak 1024-bit RSA key (PKCS#1 DER, base64 lines), for the
/// [`crate::Fault::IdTokenSignWithWeakRsaKey`] fault only: relying parties must refuse RSA keys
/// under 2048 bits. Fixed rather than generated because RSA libraries refuse to generate it.
const WEAK_RSA_1024_DER_B64: &[&str] = &[
    "MIICWwIBAAKBgQDP3NF8ooOoXZ8B0RYiieK+DVnIroUpYRBNHq7GBGbxy9ltQWz9kZVsriKio+5h",
    "bAUFwSY9bTfz02DXYm3Yfr4FLx3N6xRF2xXPTc65ru8UDATH1y5Uu6EQR0pMiAlvkOrSn1uHXwFC",
    "q7S9LmbbYNMGj+LkQZptH0iEO8c+PelXowIDAQABAoGAdeKWLEk+wc3W0AD0vMHWhlKsCNRxUPZr",
    "eFFebY8xkxA5T207ktNuGyTnH7Y5C6dnccwJE+1NPkszMPPxuEapHOB+DvkMs9cs/VGjml5v/jwk",
    "nJa8I/a2XeK13snSZssngtueAatz20cAYk4V1IUqvabnTd+Nf0dY4Wiw2tU34IECQQD/znNrKvvV",
    "qNeaI1B5IGrt/Xmu53i+frU8Q/qqkh7fB1JUTxuUQbXLRUWhN48br4bmjgorEcIh0jr3FePB98Xl",
    "AkEA0AUUsU/MeVpP+7xMp1rALRtNTsmYhnw/wrTCfnamVsNV9DQAnDRtuZBad/hJ/YMih3cXiKAJ",
    "83zWiXGFpEJO5wJAcGLKsKXE2L0CZFTpkR3d/MtlP6Owl7jhdSXEplXmPERiNmo/CqbH8RNxIQBg",
    "3mACm56B9yQpL2TGxTGXy+tIxQJAUrQybeyUFwtZEXTj5QWnskdQjSqJga6Uiwzi5vS1XXl8CwNB",
    "2tjdZxGFZn1IrYodiE5JBQDb8/qGMU75Gz1hsQJAEu1cFcacfzhS+JiU8g8TxWpNMLPwDLsDa65q",
    "jJ1QCPRf62SibUJaqfG/SS/41KVZAc4Ay2LhmyWvOI0PW4M85w==",
];

/// Key id of the weak key in the JWKS.
pub(crate) const WEAK_KID: &str = "weak-rsa-1024";

static WEAK_RSA: OnceLock<SigningKey> = OnceLock::new();

/// The weak 1024-bit signing key (see [`WEAK_RSA_1024_DER_B64`]).
pub(crate) fn weak_rsa_key() -> &'static SigningKey {
    WEAK_RSA.get_or_init(|| {
        use base64::engine::general_purpose::STANDARD;
        let der = STANDARD
            .decode(WEAK_RSA_1024_DER_B64.concat())
            .expect("weak key base64");
        let rsa = superboring::rsa::Rsa::private_key_from_der(&der).expect("weak RSA DER");
        let jwk = serde_json::json!({
            "kty": "RSA",
            "alg": "RS256",
            "use": "sig",
            "kid": WEAK_KID,
            "n": b64(&rsa.n().to_vec()),
            "e": b64(&rsa.e().to_vec()),
        });
        let pkey = superboring::pkey::PKey::from_rsa(rsa).expect("weak RSA pkey");
        SigningKey {
            kid: WEAK_KID.to_string(),
            material: Material::Rsa(Box::new(pkey)),
            public_pem: String::new(),
            jwk,
        }
    })
}

/// A compact JWS over exactly these header and payload bytes, signed with `key` (for tokens a
/// JSON serializer cannot produce, e.g. duplicate members).
pub(crate) fn sign_raw(key: &SigningKey, header_json: &[u8], payload_json: &[u8]) -> String {
    let signing_input = format!("{}.{}", b64(header_json), b64(payload_json));
    let sig = key.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", b64(&sig))
}

/// A compact JWS over exactly these bytes with `alg` HS256 keyed with `key` (whatever the header
/// says).
pub(crate) fn hs256_raw(key: &[u8], header_json: &[u8], payload_json: &[u8]) -> String {
    let signing_input = format!("{}.{}", b64(header_json), b64(payload_json));
    let mac = hmac_sha256::HMAC::mac(signing_input.as_bytes(), key);
    format!("{signing_input}.{}", b64(&mac))
}

/// `at_hash` for a SHA-256 based algorithm: base64url of the left half of SHA-256(token).
pub(crate) fn at_hash(access_token: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(access_token.as_bytes());
    b64(&digest[..16])
}

/// Decode (without verification) the payload of a JWT.
pub(crate) fn decode_payload_unverified(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice(&bytes).ok()
}
