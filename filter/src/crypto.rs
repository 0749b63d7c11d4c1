//! Cookie sealing: XChaCha20-Poly1305 (fast in software, which matters inside wasm where there is
//! no AES-NI) with keys derived by HKDF-SHA256 from the configured cookie secret.
//!
//! Sealed value (base64url, no padding): `version(1) | key_id(4) | nonce(24) | ciphertext+tag`.
//! The associated data binds a value to its purpose and context (cookie name and host), so a
//! login cookie cannot be replayed as a session cookie, and a cookie for one host is refused on
//! another.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::types::{Random, RandomUnavailable, SecretBytes};

const VERSION: u8 = 1;
const KEY_ID_LEN: usize = 4;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;
const HKDF_SALT: &[u8] = b"oidc-gate cookie sealing v1";
/// Longest sealed value accepted; bounds the work an attacker can cause with one cookie.
pub const MAX_SEALED_LEN: usize = 64 * 1024;

/// What a sealed value is for; part of the key derivation and of the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The session cookie.
    Session,
    /// A per-login (state, nonce, PKCE verifier) cookie.
    Login,
    /// A refresh's token answer, kept in the host's shared data for the other workers.
    RefreshResult,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Session => b"session",
            Purpose::Login => b"login",
            Purpose::RefreshResult => b"refresh-result",
        }
    }
}

/// Why a sealed value could not be opened. Deliberately coarse: callers treat all as "no cookie".
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Not base64url, too short or too long.
    #[error("malformed sealed value")]
    Malformed,
    /// Sealed with a key this filter does not hold.
    #[error("unknown key id")]
    UnknownKey,
    /// Authentication failed: tampered, truncated, or bound to another purpose or context.
    #[error("authentication failed")]
    Forged,
}

/// Why sealing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// No randomness for the nonce.
    #[error(transparent)]
    Random(#[from] RandomUnavailable),
    /// The AEAD refused (cannot happen for in-range inputs; kept to avoid a panic path).
    #[error("encryption failed")]
    Encrypt,
}

struct DerivedKey {
    id: [u8; KEY_ID_LEN],
    session: XChaCha20Poly1305,
    login: XChaCha20Poly1305,
    refresh_result: XChaCha20Poly1305,
}

/// What a keyring's keys are bound to besides the secret: the policy's issuer and client. A
/// cookie secret shared by two policies (another IdP, another client, or this one after a move)
/// never opens the other's cookies, so a session never outlives the login it came from.
pub fn key_scope(issuer: &str, client_id: &str) -> Vec<u8> {
    let mut scope = Vec::with_capacity(8 + issuer.len() + client_id.len());
    for part in [issuer, client_id] {
        // Length-prefixed: no two (issuer, client) pairs give the same bytes.
        scope.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
        scope.extend_from_slice(part.as_bytes());
    }
    scope
}

impl DerivedKey {
    fn derive(secret: &SecretBytes, scope: &[u8]) -> Self {
        let prk = hmac_sha256::HKDF::extract(HKDF_SALT, secret.expose());
        let expand = |label: &[u8], out: &mut [u8]| {
            let mut info = Vec::with_capacity(label.len() + scope.len());
            info.extend_from_slice(label);
            info.extend_from_slice(scope);
            hmac_sha256::HKDF::expand(out, prk, &info);
        };
        let mut id = [0u8; KEY_ID_LEN];
        let mut session = [0u8; 32];
        let mut login = [0u8; 32];
        let mut refresh_result = [0u8; 32];
        hmac_sha256::HKDF::expand(&mut id, prk, b"key-id");
        expand(Purpose::Session.label(), &mut session);
        expand(Purpose::Login.label(), &mut login);
        expand(Purpose::RefreshResult.label(), &mut refresh_result);
        Self {
            id,
            session: XChaCha20Poly1305::new(&session.into()),
            login: XChaCha20Poly1305::new(&login.into()),
            refresh_result: XChaCha20Poly1305::new(&refresh_result.into()),
        }
    }

    fn cipher(&self, purpose: Purpose) -> &XChaCha20Poly1305 {
        match purpose {
            Purpose::Session => &self.session,
            Purpose::Login => &self.login,
            Purpose::RefreshResult => &self.refresh_result,
        }
    }
}

/// The current sealing key plus older keys that may still open values (rotation without logout).
pub struct Keyring {
    current: DerivedKey,
    previous: Vec<DerivedKey>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring([redacted]; {} previous)", self.previous.len())
    }
}

/// A successfully opened value.
#[derive(Debug)]
pub struct Opened {
    /// The plaintext.
    pub plaintext: Vec<u8>,
    /// Sealed with a previous key: the caller should reseal with the current one.
    pub needs_reseal: bool,
}

impl Keyring {
    /// Builds a keyring from the current secret and previous (decrypt-only) secrets, its keys
    /// bound to `scope` ([`key_scope`]).
    pub fn new(current: &SecretBytes, previous: &[SecretBytes], scope: &[u8]) -> Self {
        Self {
            current: DerivedKey::derive(current, scope),
            previous: previous
                .iter()
                .map(|s| DerivedKey::derive(s, scope))
                .collect(),
        }
    }

    /// Seals `plaintext` for `purpose`, bound to `context`.
    pub fn seal(
        &self,
        purpose: Purpose,
        context: &[u8],
        plaintext: &[u8],
        rng: &mut dyn Random,
    ) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce)?;
        let mut header = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
        header.push(VERSION);
        header.extend_from_slice(&self.current.id);
        header.extend_from_slice(&nonce);
        let aad = associated_data(purpose, &header[..1 + KEY_ID_LEN], context);
        let ct = self
            .current
            .cipher(purpose)
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::Encrypt)?;
        header.extend_from_slice(&ct);
        Ok(URL_SAFE_NO_PAD.encode(&header))
    }

    /// Opens a value sealed by [`Keyring::seal`] with the same purpose and context.
    pub fn open(
        &self,
        purpose: Purpose,
        context: &[u8],
        sealed: &str,
    ) -> Result<Opened, OpenError> {
        if sealed.len() > MAX_SEALED_LEN {
            return Err(OpenError::Malformed);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(sealed.as_bytes())
            .map_err(|_| OpenError::Malformed)?;
        if raw.len() < HEADER_LEN + TAG_LEN || raw[0] != VERSION {
            return Err(OpenError::Malformed);
        }
        let key_id = &raw[1..1 + KEY_ID_LEN];
        let (key, needs_reseal) = if key_id == self.current.id {
            (&self.current, false)
        } else {
            match self.previous.iter().find(|k| k.id == key_id) {
                Some(k) => (k, true),
                None => return Err(OpenError::UnknownKey),
            }
        };
        let nonce = XNonce::from_slice(&raw[1 + KEY_ID_LEN..HEADER_LEN]);
        let aad = associated_data(purpose, &raw[..1 + KEY_ID_LEN], context);
        let plaintext = key
            .cipher(purpose)
            .decrypt(
                nonce,
                Payload {
                    msg: &raw[HEADER_LEN..],
                    aad: &aad,
                },
            )
            .map_err(|_| OpenError::Forged)?;
        Ok(Opened {
            plaintext,
            needs_reseal,
        })
    }
}

fn associated_data(purpose: Purpose, version_and_key: &[u8], context: &[u8]) -> Vec<u8> {
    let label = purpose.label();
    let mut aad = Vec::with_capacity(version_and_key.len() + label.len() + context.len() + 2);
    aad.extend_from_slice(version_and_key);
    aad.extend_from_slice(label);
    aad.push(0);
    aad.extend_from_slice(context);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::testing::SeededRandom;

    const SEALED_SESSION: &str =
        "AQjeSflEbDpvq4H5dEyAP5qIjryfnonRCi48PaSlr9wTtSXhbwve9kX9Qt0UJa_grpjSwpnhlqj-";
    const SEALED_LOGIN: &str =
        "AQjeSflEbDpvq4H5dEyAP5qIjryfnonRCi48PaSvhf8TOGIcSOvHlfpQs3LtjJGNWHJtypPaANSV";
    const SEALED_REFRESH_RESULT: &str =
        "AQjeSflEbDpvq4H5dEyAP5qIjryfnonRCi48PaSn3NgMFxWAirk09CBYCQPQUqbdd0jOrATwLXg-";

    fn ring() -> Keyring {
        Keyring::new(&SecretBytes::new(vec![7u8; 32]), &[], b"scope")
    }

    #[test]
    fn round_trips() {
        let mut rng = SeededRandom(1);
        let k = ring();
        let s = k
            .seal(Purpose::Session, b"app.example.com", b"hello", &mut rng)
            .unwrap();
        let o = k.open(Purpose::Session, b"app.example.com", &s).unwrap();
        assert_eq!(o.plaintext, b"hello");
        assert!(!o.needs_reseal);
    }

    #[test]
    fn rejects_every_single_character_change() {
        let mut rng = SeededRandom(2);
        let k = ring();
        let s = k
            .seal(Purpose::Session, b"h", b"payload-bytes", &mut rng)
            .unwrap();
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for i in 0..s.len() {
            let mut bytes = s.clone().into_bytes();
            bytes[i] = if bytes[i] == alphabet[0] {
                alphabet[1]
            } else {
                alphabet[0]
            };
            let t = String::from_utf8(bytes).unwrap();
            // The last character may carry only padding bits; then the decoded bytes are equal.
            if URL_SAFE_NO_PAD.decode(&t).ok() == URL_SAFE_NO_PAD.decode(&s).ok() {
                continue;
            }
            assert!(
                k.open(Purpose::Session, b"h", &t).is_err(),
                "flip at {i} accepted"
            );
        }
        for len in 0..s.len() {
            assert!(
                k.open(Purpose::Session, b"h", &s[..len]).is_err(),
                "truncation to {len} accepted"
            );
        }
    }

    #[test]
    fn binds_purpose_and_context() {
        let mut rng = SeededRandom(3);
        let k = ring();
        let s = k
            .seal(Purpose::Login, b"a.example.com", b"x", &mut rng)
            .unwrap();
        assert_eq!(
            k.open(Purpose::Session, b"a.example.com", &s).unwrap_err(),
            OpenError::Forged
        );
        assert_eq!(
            k.open(Purpose::Login, b"b.example.com", &s).unwrap_err(),
            OpenError::Forged
        );
    }

    #[test]
    fn previous_keys_open_and_ask_for_reseal() {
        let mut rng = SeededRandom(4);
        let old = SecretBytes::new(vec![1u8; 32]);
        let new = SecretBytes::new(vec![2u8; 32]);
        let sealed_old = Keyring::new(&old, &[], b"scope")
            .seal(Purpose::Session, b"h", b"v", &mut rng)
            .unwrap();
        let rotated = Keyring::new(&new, &[old], b"scope");
        let o = rotated.open(Purpose::Session, b"h", &sealed_old).unwrap();
        assert!(o.needs_reseal);
        let without_old = Keyring::new(&new, &[], b"scope");
        assert_eq!(
            without_old
                .open(Purpose::Session, b"h", &sealed_old)
                .unwrap_err(),
            OpenError::UnknownKey
        );
    }

    /// Values sealed by earlier builds keep opening: the key derivation (HKDF-SHA256, RFC 5869)
    /// and the format are fixed. The values were sealed by the build of 2026-11-29.
    #[test]
    fn opens_values_sealed_by_earlier_builds() {
        let k = ring();
        for (purpose, sealed) in [
            (Purpose::Session, SEALED_SESSION),
            (Purpose::Login, SEALED_LOGIN),
            (Purpose::RefreshResult, SEALED_REFRESH_RESULT),
        ] {
            let o = k.open(purpose, b"app.example.com", sealed).unwrap();
            assert_eq!(o.plaintext, b"known answer");
        }
    }

    #[test]
    fn nonces_differ() {
        let mut rng = SeededRandom(5);
        let k = ring();
        let a = k.seal(Purpose::Session, b"h", b"same", &mut rng).unwrap();
        let b = k.seal(Purpose::Session, b"h", b"same", &mut rng).unwrap();
        assert_ne!(a, b);
    }
}
