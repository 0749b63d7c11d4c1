//! The gateway's serving certificate: self-signed, generated per test with `rcgen`.

use std::path::{Path, PathBuf};

/// Certificate and key files written by [`write_self_signed`].
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// DNS names on the certificate.
pub const CERT_NAMES: &[&str] = &[
    "*.example.com",
    "app.example.com",
    "other.example.com",
    "*.apps.example.com",
    "localhost",
];

/// Generate a self-signed certificate for [`CERT_NAMES`] and write `gateway.crt`/`gateway.key` into `dir`.
pub fn write_self_signed(dir: &Path) -> CertFiles {
    let names: Vec<String> = CERT_NAMES.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).expect("rcgen self-signed certificate");
    let cert = dir.join("gateway.crt");
    let key = dir.join("gateway.key");
    std::fs::write(&cert, ck.cert.pem()).expect("write gateway.crt");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write gateway.key");
    CertFiles { cert, key }
}
