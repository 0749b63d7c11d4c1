//! Small shared types: secrets that never print, and the injected sources of time and randomness.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use subtle::ConstantTimeEq;

/// Seconds since the Unix epoch, as the host reports it. Core code never reads a clock itself.
pub type UnixSeconds = u64;

/// A source of cryptographically secure random bytes, injected so tests can be deterministic.
pub trait Random {
    /// Fills `buf` with random bytes. Implementations must not fail silently: if the host has no
    /// randomness they return an error and the caller fails closed.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RandomUnavailable>;
}

/// The host could not provide random bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no randomness available from the host")]
pub struct RandomUnavailable;

/// Returns `n` random bytes encoded as unpadded base64url.
pub fn random_token(rng: &mut dyn Random, n: usize) -> Result<String, RandomUnavailable> {
    let mut buf = vec![0u8; n];
    rng.fill(&mut buf)?;
    Ok(URL_SAFE_NO_PAD.encode(&buf))
}

/// A string that must never appear in logs: tokens, secrets, codes, state, nonces.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must send or seal it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares in constant time, so timing reveals nothing about where two values differ.
    pub fn ct_eq(&self, other: &str) -> bool {
        let a = self.0.as_bytes();
        let b = other.as_bytes();
        a.len() == b.len() && bool::from(a.ct_eq(b))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Secret key material (the cookie secret); `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    /// Wraps key material.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The raw bytes, for key derivation only.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([redacted; {} bytes])", self.0.len())
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A deterministic generator for tests (xorshift); never used outside tests.
    pub struct SeededRandom(pub u64);

    impl Random for SeededRandom {
        fn fill(&mut self, buf: &mut [u8]) -> Result<(), RandomUnavailable> {
            for b in buf.iter_mut() {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                *b = (self.0 >> 24) as u8;
            }
            Ok(())
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("super-secret-token");
        assert!(!format!("{s:?}").contains("super"));
        let b = SecretBytes::new(vec![1, 2, 3]);
        assert!(!format!("{b:?}").contains('1'));
    }

    #[test]
    fn constant_time_compare_matches_equality() {
        let s = Secret::new("abc");
        assert!(s.ct_eq("abc"));
        assert!(!s.ct_eq("abd"));
        assert!(!s.ct_eq("ab"));
    }
}
