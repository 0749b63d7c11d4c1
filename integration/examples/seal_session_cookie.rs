//! Prints a `Cookie` header value carrying a valid oidc-gate session for `app.example.com`, sealed
//! by the filter's own code with the secret `integration/profile/wasm-host.mjs` configures:
//! the input of that profiling host.
//!
//! `cargo run -q -p integration --example seal_session_cookie > cookie.txt`

use oidc_filter::crypto::{key_scope, Keyring, Purpose};
use oidc_filter::session::{cookie_context, SESSION_COOKIE};
use oidc_filter::types::SecretBytes;

/// `MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=` in wasm-host.mjs.
const SECRET: &[u8; 32] = b"01234567890123456789012345678901";

fn main() {
    // The issuer and client wasm-host.mjs configures.
    let keys = Keyring::new(
        &SecretBytes::new(SECRET.to_vec()),
        &[],
        &key_scope("https://idp.example.com", "oidc-gate"),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // The session's wire form (oidc_filter::session), sized like the benchmark's: an opaque
    // access token, an ID token and a refresh token, valid for a day.
    let session = serde_json::json!({
        "a": "a".repeat(43),
        "i": format!("eyJ{}", "x".repeat(800)),
        "r": "r".repeat(200),
        "e": now + 86_400,
        "s": "user-1",
        "c": now,
        "m": now + 86_400,
    });
    let mut rng = integration::bench::client::OsRandom;
    match keys.seal(
        Purpose::Session,
        &cookie_context("app.example.com", SESSION_COOKIE),
        session.to_string().as_bytes(),
        &mut rng,
    ) {
        Ok(sealed) => println!("{SESSION_COOKIE}={sealed}"),
        Err(e) => {
            eprintln!("seal: {e}");
            std::process::exit(1);
        }
    }
}
