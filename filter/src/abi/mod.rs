//! The proxy-wasm glue: the only module that talks to the host.
//!
//! One root context per VM (Envoy runs one VM per worker thread, plus the main thread and a
//! config canary) holds the validated [`Gate`](crate::flow::Gate) and a per-VM view of the IdP
//! documents that all VMs share through proxy-wasm shared data.

mod cache;
mod ended;
mod header_map;
mod host;
mod metrics;
mod refresh;
mod root;
mod stream;
pub mod timing;

pub use root::Root;

// `proxy_wasm::main!` exports `_initialize` with `#[no_mangle]`, which the `unsafe_code` lint
// flags; it is the module's entry point and only built for wasm.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
mod entry {
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
        proxy_wasm::set_root_context(|context_id| -> Box<dyn proxy_wasm::traits::RootContext> {
            Box::new(super::Root::new(context_id))
        });
    }}
}
