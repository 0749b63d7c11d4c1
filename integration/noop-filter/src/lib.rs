//! The floor of any proxy-wasm filter, for `make bench`: per request it reads one request header
//! (`cookie`, the one an authentication filter must read) and sets one (`x-noop-cookie-bytes`).
//! Everything a real filter pays for on top of this (the VM, the host calls, the header copies)
//! is already paid here.

/// The header set on every request: the length of the `cookie` header (0 without one).
pub const SET_HEADER: &str = "x-noop-cookie-bytes";

// `proxy_wasm::main!` exports `_initialize` with `#[no_mangle]`, which the `unsafe_code` lint
// flags; it is the module's entry point and only built for wasm.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
mod entry {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, LogLevel};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(NoopRoot) });
    }}

    struct NoopRoot;

    impl Context for NoopRoot {}

    impl RootContext for NoopRoot {
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Noop))
        }
    }

    struct Noop;

    impl Context for Noop {}

    impl HttpContext for Noop {
        fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
            let n = self
                .get_http_request_header("cookie")
                .map_or(0, |c| c.len());
            self.set_http_request_header(super::SET_HEADER, Some(&n.to_string()));
            Action::Continue
        }
    }
}
