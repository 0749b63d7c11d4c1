//! Test harness for oidc-gate against a real Envoy, configured the way an Istio ingress gateway is.
//!
//! The pieces, each usable alone:
//! - [`envoy`]: find the Envoy binary ([`envoy::find_envoy`]), start it with its own ports and
//!   `--base-id`, wait for the admin endpoint to report it ready, read stats and the log, kill on drop
//!   (and print the log when the test panics).
//! - [`config`]: the Envoy bootstrap shaped like `istio-gateway-envoy.yaml` (listener `0.0.0.0_8443`
//!   with TLS, Istio's gateway HCM settings, the wasm filter under its Istio ECDS name, clusters named
//!   `outbound|<port>||<fqdn>`), inline or delivered via file ECDS.
//! - [`tls`]: a self-signed certificate for the test hosts, written into the test's temp dir.
//! - [`upstream`]: a header-echo upstream that records every request it receives.
//! - [`browser`]: a client with its own browser-like cookie jar that never follows redirects by
//!   itself.
//! - [`stack`]: all of it wired together with the in-process mock IdP ([`stack::Stack::start`]).
//!
//! Paths: the filter module is `<repo>/target/wasm32-wasip1/release/oidc_filter.wasm` unless
//! `OIDC_FILTER_WASM` names another file ([`wasm_path`]).

pub mod bench;
pub mod browser;
pub mod config;
pub mod demo_app;
pub mod envoy;
pub mod stack;
pub mod tls;
pub mod upstream;

use std::path::PathBuf;

pub use browser::{Browser, CookieJar, Mode, Resp, StoredCookie};
pub use config::{Delivery, GatewayConfig};
pub use envoy::{find_envoy, Envoy, EnvoyOptions};
pub use stack::{Stack, StackOptions};
pub use upstream::{SeenRequest, Upstream};

/// Host names the test certificate covers and the browser resolves to the Envoy listener.
pub const TEST_HOSTS: &[&str] = &[
    "app.example.com",
    "other.example.com",
    "a.apps.example.com",
    "b.apps.example.com",
    "localhost",
];

/// The workspace root (the directory holding the workspace `Cargo.toml`).
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The built filter module: `$OIDC_FILTER_WASM`, else `<repo>/target/wasm32-wasip1/release/oidc_filter.wasm`.
pub fn wasm_path() -> PathBuf {
    match std::env::var_os("OIDC_FILTER_WASM") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_root().join("target/wasm32-wasip1/release/oidc_filter.wasm"),
    }
}

/// [`wasm_path`], or panic with a message telling how to build it.
pub fn require_wasm() -> PathBuf {
    let p = wasm_path();
    assert!(
        p.is_file(),
        "filter module {} is missing: run `make build` first \
         (or `cargo build -p oidc-filter --target wasm32-wasip1 --release`, or set OIDC_FILTER_WASM)",
        p.display()
    );
    p
}

/// `n` random bytes from the OS.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    getrandom::getrandom(&mut v).expect("getrandom");
    v
}
