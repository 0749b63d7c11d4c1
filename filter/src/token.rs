//! JWKS parsing and JWT verification (ID tokens: OIDC Core §3.1.3.7; bearer JWTs: RFC 9068).
//!
//! The signature check is jwt-simple's; everything around it is explicit here: only RS256 and
//! ES256, never `none` or HMAC; `jku`/`jwk`/`x5u`/`x5c`/`crit` headers refused (no key ever comes
//! from the token); duplicate JSON members refused; every claim rule tested on its own.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jwt_simple::prelude::{
    Duration as JwtDuration, ECDSAP256PublicKeyLike, ES256PublicKey, NoCustomClaims,
    RS256PublicKey, RSAPublicKeyLike, VerificationOptions,
};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::discovery::MAX_DOCUMENT_BYTES;
use crate::types::UnixSeconds;

/// Longest token accepted (a 6 KB access token is large; 16 KB leaves room, 1 MB does not).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Allowed clock difference between the IdP and the gateway.
pub const DEFAULT_CLOCK_SKEW_SECS: u64 = 60;
/// Most keys kept from one JWKS; real sets have a handful.
pub const MAX_JWKS_KEYS: usize = 32;

/// A signing algorithm we accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// ECDSA P-256 with SHA-256.
    Es256,
}

enum KeyMaterial {
    Rs256(Box<RS256PublicKey>),
    Es256(Box<ES256PublicKey>),
}

/// One usable verification key from the JWKS.
pub struct VerifyKey {
    kid: Option<String>,
    material: KeyMaterial,
}

impl VerifyKey {
    fn alg(&self) -> Alg {
        match self.material {
            KeyMaterial::Rs256(_) => Alg::Rs256,
            KeyMaterial::Es256(_) => Alg::Es256,
        }
    }
}

/// The provider's verification keys; unusable entries (other types, weak RSA, encryption keys)
/// are skipped, as OIDC conformance expects ("ignores unparseable key in JWKS").
#[derive(Default)]
pub struct Jwks {
    keys: Vec<VerifyKey>,
    /// Unique to this parse in this VM: what was verified against another key set is checked
    /// again (a key the IdP withdrew stops working for tokens already verified too).
    generation: u64,
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<_> = self
            .keys
            .iter()
            .map(|k| (k.kid.as_deref(), k.alg()))
            .collect();
        f.debug_struct("Jwks").field("keys", &kids).finish()
    }
}

/// Why a JWKS document was refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    /// Not a JSON object with a `keys` array.
    #[error("JWKS is malformed: {0}")]
    Malformed(String),
    /// No key we can verify with; keeping the previous set is safer than an empty one.
    #[error("JWKS has no usable RS256 or ES256 signing key")]
    NoUsableKey,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<Value>,
}

impl Jwks {
    /// Parses a JWKS document.
    pub fn parse(body: &[u8]) -> Result<Self, JwksError> {
        if body.len() > MAX_DOCUMENT_BYTES {
            return Err(JwksError::Malformed("too large".into()));
        }
        let raw: RawJwks =
            serde_json::from_slice(body).map_err(|e| JwksError::Malformed(e.to_string()))?;
        let keys: Vec<VerifyKey> = raw
            .keys
            .iter()
            .filter_map(parse_jwk)
            .take(MAX_JWKS_KEYS)
            .collect();
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey);
        }
        // From 1: no parsed set shares a generation with a default one.
        static PARSED: AtomicU64 = AtomicU64::new(1);
        Ok(Self {
            keys,
            generation: PARSED.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Distinct for every parse: two key sets with the same generation are the same one.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are no usable keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether a key with this id is present.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

fn b64_field(jwk: &Value, name: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD
        .decode(jwk.get(name)?.as_str()?.trim_end_matches('='))
        .ok()
}

fn parse_jwk(jwk: &Value) -> Option<VerifyKey> {
    if let Some(u) = jwk.get("use") {
        if u.as_str() != Some("sig") {
            return None;
        }
    }
    let kid = match jwk.get("kid") {
        None => None,
        Some(Value::String(s)) if s.len() <= 256 => Some(s.clone()),
        Some(_) => return None,
    };
    let alg = jwk.get("alg").and_then(Value::as_str);
    let material = match jwk.get("kty").and_then(Value::as_str)? {
        "RSA" if alg.is_none() || alg == Some("RS256") => {
            let n = b64_field(jwk, "n")?;
            let e = b64_field(jwk, "e")?;
            // jwt-simple refuses moduli under 2048 bits (WeakKey): such keys are skipped.
            KeyMaterial::Rs256(Box::new(RS256PublicKey::from_components(&n, &e).ok()?))
        }
        "EC" if (alg.is_none() || alg == Some("ES256"))
            && jwk.get("crv").and_then(Value::as_str) == Some("P-256") =>
        {
            let x = b64_field(jwk, "x")?;
            let y = b64_field(jwk, "y")?;
            if x.len() != 32 || y.len() != 32 {
                return None;
            }
            let mut sec1 = Vec::with_capacity(65);
            sec1.push(0x04);
            sec1.extend_from_slice(&x);
            sec1.extend_from_slice(&y);
            KeyMaterial::Es256(Box::new(ES256PublicKey::from_bytes(&sec1).ok()?))
        }
        _ => return None,
    };
    Some(VerifyKey { kid, material })
}

/// Why a token was refused. Detail for logs; clients only ever see a generic answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a compact JWS (three base64url parts of sane size, JSON objects).
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    /// A JSON member appears twice (RFC 7519 §4 / RFC 7515 §5.2: must reject or use the last; we reject).
    #[error("duplicate JSON member `{0}`")]
    DuplicateMember(String),
    /// `alg` is not RS256 or ES256 (so `none`, HMAC and the rest are refused).
    #[error("algorithm `{0}` is not allowed")]
    AlgorithmNotAllowed(String),
    /// The header tries to supply or point to its own key, or marks extensions critical.
    #[error("header member `{0}` is not accepted")]
    ForbiddenHeader(&'static str),
    /// No key in the JWKS matches `kid` and `alg`: the JWKS may need a refetch.
    #[error("no matching key in the JWKS")]
    UnknownKey,
    /// The signature does not verify with any matching key.
    #[error("signature verification failed")]
    BadSignature,
    /// `iss` differs from the expected issuer.
    #[error("issuer mismatch")]
    InvalidIssuer,
    /// `aud` does not contain an accepted audience.
    #[error("audience mismatch")]
    InvalidAudience,
    /// Several audiences without `azp`, or `azp` is not our client (OIDC Core §3.1.3.7 items 4-5).
    #[error("authorized party (azp) missing or wrong")]
    InvalidAuthorizedParty,
    /// `exp` passed (beyond the allowed skew).
    #[error("token expired")]
    Expired,
    /// `nbf` or `iat` lies in the future (beyond the allowed skew).
    #[error("token not yet valid")]
    NotYetValid,
    /// A required claim is missing or has the wrong type.
    #[error("claim `{0}` missing or of the wrong type")]
    MissingClaim(&'static str),
    /// `nonce` does not match the one sent in the authorization request.
    #[error("nonce mismatch")]
    InvalidNonce,
}

/// What a verified token must satisfy.
pub struct Expectations<'a> {
    /// Exact issuer.
    pub issuer: &'a str,
    /// Accepted audiences: for an ID token, just the client id.
    pub audiences: &'a [String],
    /// Every `aud` entry must be accepted (ID tokens), not just one (bearer tokens).
    pub exclusive_audiences: bool,
    /// For ID tokens: the client id that must be `azp` when there are several audiences.
    pub client_id: Option<&'a str>,
    /// For ID tokens from a login: the nonce sent; `None` skips the check (refresh, bearer).
    pub nonce: Option<&'a str>,
    /// Whether `iat` is required (ID tokens: yes).
    pub require_iat: bool,
    /// Whether `sub` is required (ID tokens: yes).
    pub require_sub: bool,
    /// Current time from the host.
    pub now: UnixSeconds,
    /// Allowed clock skew.
    pub skew: u64,
}

/// A token whose signature and claims verified.
#[derive(Clone)]
pub struct VerifiedToken {
    /// `sub`, if present.
    pub subject: Option<String>,
    /// `exp`.
    pub expires_at: UnixSeconds,
    /// All claims, for claim-to-header mapping.
    pub claims: Map<String, Value>,
}

impl fmt::Debug for VerifiedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedToken")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// A JSON object parsed with duplicate members refused.
struct StrictObject(Map<String, Value>);

impl<'de> Deserialize<'de> for StrictObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrictObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                let mut out = Map::new();
                while let Some(key) = access.next_key::<String>()? {
                    if out.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!(
                            "duplicate member `{key}`"
                        )));
                    }
                    let value: Value = access.next_value()?;
                    out.insert(key, value);
                }
                Ok(StrictObject(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn decode_strict_object(part: &str) -> Result<Map<String, Value>, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed("not base64url"))?;
    match serde_json::from_slice::<StrictObject>(&bytes) {
        Ok(o) => Ok(o.0),
        Err(e) => {
            let msg = e.to_string();
            match msg.strip_prefix("duplicate member `") {
                Some(rest) => Err(TokenError::DuplicateMember(
                    rest.split('`').next().unwrap_or("").to_string(),
                )),
                None => Err(TokenError::Malformed("not a JSON object")),
            }
        }
    }
}

/// The parsed, not yet verified, header: enough to choose a key.
struct Header {
    alg: Alg,
    kid: Option<String>,
}

fn parse_header(part: &str) -> Result<Header, TokenError> {
    let h = decode_strict_object(part)?;
    for forbidden in ["jku", "jwk", "x5u", "x5c", "crit"] {
        if h.contains_key(forbidden) {
            return Err(TokenError::ForbiddenHeader(match forbidden {
                "jku" => "jku",
                "jwk" => "jwk",
                "x5u" => "x5u",
                "x5c" => "x5c",
                _ => "crit",
            }));
        }
    }
    if h.get("b64").is_some() {
        return Err(TokenError::ForbiddenHeader("b64"));
    }
    let alg = match h.get("alg") {
        Some(Value::String(a)) if a == "RS256" => Alg::Rs256,
        Some(Value::String(a)) if a == "ES256" => Alg::Es256,
        Some(Value::String(a)) => {
            return Err(TokenError::AlgorithmNotAllowed(
                a.chars().take(16).collect(),
            ))
        }
        _ => return Err(TokenError::AlgorithmNotAllowed("(missing)".into())),
    };
    let kid = match h.get("kid") {
        None => None,
        Some(Value::String(k)) if k.len() <= 256 => Some(k.clone()),
        Some(_) => return Err(TokenError::Malformed("kid is not a short string")),
    };
    Ok(Header { alg, kid })
}

/// The checks of [`verify`] that need no key: three parts, a signature, and a header that
/// allows a key of ours to apply. What fails them is refused without fetching keys for it.
pub fn check_shape(token: &str) -> Result<(), TokenError> {
    let (header, _, _) = split_jws(token)?;
    parse_header(header).map(|_| ())
}

/// `exp` of a token this filter verified before and kept sealed in a session, read without a
/// second signature check; `None` when it cannot be read.
pub fn sealed_token_expiry(token: &str) -> Option<UnixSeconds> {
    let (_, payload, _) = split_jws(token).ok()?;
    number_claim(&decode_strict_object(payload).ok()?, "exp").ok()?
}

/// A compact JWS's header, payload and signature, none of them decoded yet.
fn split_jws(token: &str) -> Result<(&str, &str, &str), TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed("too long"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("not three parts"));
    };
    if s.is_empty() {
        return Err(TokenError::BadSignature);
    }
    Ok((h, p, s))
}

/// Verifies a compact JWS token: signature with a JWKS key, then every claim in `expect`.
pub fn verify(
    token: &str,
    jwks: &Jwks,
    expect: &Expectations<'_>,
) -> Result<VerifiedToken, TokenError> {
    let (h, p, _) = split_jws(token)?;
    // jwt-simple's clock is fixed-point over u32 seconds: past 2106 its arithmetic overflows.
    if expect.now.saturating_add(expect.skew) >= u64::from(u32::MAX) {
        return Err(TokenError::Malformed("clock out of range"));
    }
    let header = parse_header(h)?;
    // Parse the payload before the signature so a duplicate member is reported as such, but
    // nothing from it is trusted until the signature verified.
    let claims = decode_strict_object(p)?;
    check_registered_claim_types(&claims)?;

    let candidates: Vec<&VerifyKey> = jwks
        .keys
        .iter()
        .filter(|k| k.alg() == header.alg)
        .filter(|k| match &header.kid {
            Some(kid) => k.kid.as_deref() == Some(kid.as_str()),
            None => true,
        })
        .collect();
    if candidates.is_empty() {
        return Err(TokenError::UnknownKey);
    }
    let mut options = VerificationOptions {
        time_tolerance: Some(JwtDuration::from_secs(expect.skew)),
        artificial_time: Some(JwtDuration::from_secs(expect.now)),
        max_token_length: Some(MAX_TOKEN_LEN),
        ..Default::default()
    };
    options.accept_future = false;
    let verified = candidates.iter().any(|key| {
        let opts = options.clone();
        match &key.material {
            KeyMaterial::Rs256(k) => k.verify_token::<NoCustomClaims>(token, Some(opts)).is_ok(),
            KeyMaterial::Es256(k) => k.verify_token::<NoCustomClaims>(token, Some(opts)).is_ok(),
        }
    });
    if !verified {
        // jwt-simple also fails here on its own time checks; re-check them to report precisely.
        check_times(&claims, expect)?;
        return Err(TokenError::BadSignature);
    }
    check_claims(claims, expect)
}

/// Registered claims of the wrong JSON type (RFC 7519 §4.1) are refused by name, before
/// jwt-simple would refuse the whole token as if the signature were wrong.
fn check_registered_claim_types(claims: &Map<String, Value>) -> Result<(), TokenError> {
    for (name, numeric) in [
        ("iss", false),
        ("sub", false),
        ("jti", false),
        ("nonce", false),
        ("exp", true),
        ("nbf", true),
        ("iat", true),
    ] {
        let ok = match claims.get(name) {
            None => true,
            Some(v) if numeric => v.is_number(),
            Some(v) => v.is_string(),
        };
        if !ok {
            return Err(TokenError::MissingClaim(match name {
                "iss" => "iss",
                "sub" => "sub",
                "jti" => "jti",
                "nonce" => "nonce",
                "exp" => "exp",
                "nbf" => "nbf",
                _ => "iat",
            }));
        }
    }
    match claims.get("aud") {
        None | Some(Value::String(_)) => Ok(()),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => Ok(()),
        Some(_) => Err(TokenError::MissingClaim("aud")),
    }
}

fn number_claim(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<u64>, TokenError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(v), _) => Ok(Some(v)),
            (None, Some(f)) if f.is_finite() && f >= 0.0 => Ok(Some(f as u64)),
            _ => Err(TokenError::MissingClaim(name)),
        },
        Some(_) => Err(TokenError::MissingClaim(name)),
    }
}

fn check_times(claims: &Map<String, Value>, expect: &Expectations<'_>) -> Result<u64, TokenError> {
    let exp = number_claim(claims, "exp")?.ok_or(TokenError::MissingClaim("exp"))?;
    if expect.now > exp.saturating_add(expect.skew) {
        return Err(TokenError::Expired);
    }
    let iat = number_claim(claims, "iat")?;
    if expect.require_iat && iat.is_none() {
        return Err(TokenError::MissingClaim("iat"));
    }
    let limit = expect.now.saturating_add(expect.skew);
    if iat.is_some_and(|t| t > limit) || number_claim(claims, "nbf")?.is_some_and(|t| t > limit) {
        return Err(TokenError::NotYetValid);
    }
    Ok(exp)
}

fn check_claims(
    claims: Map<String, Value>,
    expect: &Expectations<'_>,
) -> Result<VerifiedToken, TokenError> {
    match claims.get("iss") {
        Some(Value::String(iss)) if iss == expect.issuer => {}
        Some(Value::String(_)) => return Err(TokenError::InvalidIssuer),
        _ => return Err(TokenError::MissingClaim("iss")),
    }
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(list)) => {
            let mut out = Vec::with_capacity(list.len());
            for v in list {
                out.push(v.as_str().ok_or(TokenError::MissingClaim("aud"))?);
            }
            out
        }
        _ => return Err(TokenError::MissingClaim("aud")),
    };
    let accepted: HashSet<&str> = expect.audiences.iter().map(String::as_str).collect();
    if !audiences.iter().any(|a| accepted.contains(a)) {
        return Err(TokenError::InvalidAudience);
    }
    // OIDC Core §3.1.3.7 (3): an ID token with audiences the client does not trust is refused.
    if expect.exclusive_audiences && audiences.iter().any(|a| !accepted.contains(a)) {
        return Err(TokenError::InvalidAudience);
    }
    if let Some(client_id) = expect.client_id {
        match claims.get("azp") {
            Some(Value::String(azp)) if azp == client_id => {}
            Some(_) => return Err(TokenError::InvalidAuthorizedParty),
            None if audiences.len() > 1 => return Err(TokenError::InvalidAuthorizedParty),
            None => {}
        }
    }
    let subject = match claims.get("sub") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        None if !expect.require_sub => None,
        _ => return Err(TokenError::MissingClaim("sub")),
    };
    let expires_at = check_times(&claims, expect)?;
    if let Some(expected_nonce) = expect.nonce {
        match claims.get("nonce") {
            Some(Value::String(n)) if crate::types::Secret::new(expected_nonce).ct_eq(n) => {}
            Some(Value::String(_)) => return Err(TokenError::InvalidNonce),
            _ => return Err(TokenError::MissingClaim("nonce")),
        }
    }
    Ok(VerifiedToken {
        subject,
        expires_at,
        claims,
    })
}

/// Reads `kid` from a token header without verifying anything, to decide on a JWKS refetch.
pub fn header_kid(token: &str) -> Option<String> {
    parse_header(token.split('.').next()?).ok()?.kid
}

#[cfg(test)]
mod tests;
