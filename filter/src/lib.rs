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

/// Counts heap allocations on the current thread (tests only), so the per-request path's
/// allocations can be pinned down: each one costs more inside Envoy's V8 than the work around it.
#[cfg(test)]
#[allow(unsafe_code)]
pub(crate) mod alloc_count {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static COUNTING: Cell<bool> = const { Cell::new(false) };
        static COUNT: Cell<usize> = const { Cell::new(0) };
    }

    struct Counting;

    // SAFETY: forwards every call to the system allocator unchanged; only counts.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note();
            // SAFETY: same contract as the caller's.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: same contract as the caller's.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note();
            // SAFETY: same contract as the caller's.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    fn note() {
        // `try_with`: the thread-locals may be gone while a thread exits.
        if COUNTING.try_with(Cell::get).unwrap_or(false) {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        }
    }

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;

    /// Runs `f` and returns what it returned with the allocations (and reallocations) it made on
    /// this thread.
    pub fn allocations<R>(f: impl FnOnce() -> R) -> (R, usize) {
        COUNT.with(|c| c.set(0));
        COUNTING.with(|c| c.set(true));
        let r = f();
        COUNTING.with(|c| c.set(false));
        (r, COUNT.with(Cell::get))
    }
}
