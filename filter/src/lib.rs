//! oidc-gate: OpenID Connect login enforced at the Istio ingress gateway by one proxy-wasm filter.
//!
//! # Architecture
//!
//! Everything that decides is plain Rust with no `proxy_wasm` import, tested natively with an
//! injected clock and randomness; only [`abi`] talks to the host.
//!
//! - [`config`]: the plugin configuration (the public API), validated once.
//! - [`crypto`]: cookie sealing (XChaCha20-Poly1305, HKDF-derived keys, key ids for rotation).
//! - [`session`]: what the session and per-login cookies hold, their names and attributes.
//! - [`discovery`]: provider metadata and the checks before trusting it.
//! - [`token`]: JWKS parsing and JWT verification (ID tokens, bearer tokens).
//! - [`ended`]: logins ended before their cookies expire (logout, back-channel logout).
//! - [`flow`]: the decision engine: request in, [`flow::Decision`] out.
//! - [`http`]: cookies, strict query parsing, skip-path and return-URL rules.
//! - [`reply`]: every answer the filter gives itself, in one place.
//! - [`abi`]: the proxy-wasm glue (root context, stream context, callouts, shared-data cache).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![warn(missing_docs)]

pub mod abi;
pub mod config;
pub mod crypto;
pub mod discovery;
pub mod ended;
pub mod flow;
pub mod headers;
pub mod http;
pub mod reply;
pub mod session;
pub mod token;
pub mod types;
