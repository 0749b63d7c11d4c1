//! The floor of any proxy-wasm filter, for `make bench`: per request it reads one request header
//! (`cookie`, the one an authentication filter must read) and sets one (`x-noop-cookie-bytes`).
//! Everything a real filter pays for on top of this (the VM, the host calls, the header copies)
//! is already paid here.
//!
//! For calibration (`oidc-gate-bench --noop-extra`), a plugin configuration such as
//! `clock_reads=100 header_writes=100 cookie_byte_passes=10` adds that much work per request, so
//! the cost of one host call or of one byte of wasm loop inside this Envoy can be measured.
//!
//! With `session_floor=1` it makes, instead, exactly the host calls oidc-gate's authenticated
//! request makes, with no work of its own between them: one read of the whole request header map,
//! one clock read, the `cookie` header removed and an `authorization` header added (requests
//! without a `cookie` header get a 401). Against plain (2) that is what any filter pays that
//! forwards a bearer token in place of a session cookie, whatever its code does
//! (integration/README.md, "The host-call floor").
//!
//! Built with the `stage-timing` feature, it logs the time of its stages at the same callback
//! boundaries as oidc-gate (the filter's own timing module, included below).

// oidc-gate's read of the request headers (one host call, no copy per header), for the floor.
#[allow(dead_code)]
#[path = "../../../filter/src/abi/header_map.rs"]
mod header_map;

// One definition of the stages for both filters; the no-op filter uses a few of them.
#[allow(dead_code)]
#[path = "../../../filter/src/abi/timing.rs"]
mod timing;

/// The header set on every request: the length of the `cookie` header (0 without one).
pub const SET_HEADER: &str = "x-noop-cookie-bytes";

/// Extra work per request (all zero by default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExtraWork {
    /// Reads of the host clock.
    pub clock_reads: u32,
    /// Header writes (alternately adding and removing `x-noop-extra`).
    pub header_writes: u32,
    /// Byte-at-a-time passes over the `cookie` header value.
    pub cookie_byte_passes: u32,
    /// The session path's host calls instead of the one read and one write (see above).
    pub session_floor: bool,
}

impl ExtraWork {
    /// Parses `name=count` words separated by spaces; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let mut work = ExtraWork::default();
        for word in text.split_whitespace() {
            let (name, count) = word.split_once('=')?;
            let count: u32 = count.parse().ok()?;
            match name {
                "clock_reads" => work.clock_reads = count,
                "header_writes" => work.header_writes = count,
                "cookie_byte_passes" => work.cookie_byte_passes = count,
                "session_floor" if count <= 1 => work.session_floor = count == 1,
                _ => return None,
            }
        }
        Some(work)
    }
}

/// The `authorization` value the floor adds: as long as oidc-gate's for the mock IdP's opaque
/// access tokens (32 random bytes, base64url).
pub const FLOOR_AUTHORIZATION: &str = "Bearer AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// One byte-at-a-time pass: the shape of a naive parser's loop.
pub fn byte_pass(bytes: &[u8]) -> u64 {
    let mut sum = 0u64;
    for b in std::hint::black_box(bytes) {
        sum = sum.wrapping_add(u64::from(*b));
    }
    sum
}

// `proxy_wasm::main!` exports `_initialize` with `#[no_mangle]`, which the `unsafe_code` lint
// flags; it is the module's entry point and only built for wasm.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
mod entry {
    use super::timing::{self, Stage};
    use super::{byte_pass, ExtraWork};
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, LogLevel};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
            Box::new(NoopRoot { work: ExtraWork::default() })
        });
    }}

    struct NoopRoot {
        work: ExtraWork,
    }

    impl Context for NoopRoot {}

    impl RootContext for NoopRoot {
        fn on_configure(&mut self, _size: usize) -> bool {
            let config = self.get_plugin_configuration().unwrap_or_default();
            let text = String::from_utf8_lossy(&config);
            // Istio and the bench hand the configuration over as a JSON string.
            match ExtraWork::parse(text.trim().trim_matches('"')) {
                Some(work) => {
                    self.work = work;
                    timing::announce();
                    true
                }
                None => {
                    log::error!("noop-filter: configuration is not `name=count ...`: {text}");
                    false
                }
            }
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            timing::start();
            let noop = Noop { work: self.work };
            timing::end(Stage::Create);
            Some(Box::new(noop))
        }
    }

    struct Noop {
        work: ExtraWork,
    }

    impl Context for Noop {
        fn on_done(&mut self) -> bool {
            timing::end(Stage::LogToDone);
            timing::end(Stage::Done);
            true
        }
    }

    impl HttpContext for Noop {
        fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
            timing::end(Stage::CreateToRequest);
            if self.work.session_floor {
                return self.session_floor();
            }
            let cookie = self.get_http_request_header("cookie").unwrap_or_default();
            timing::end(Stage::HeaderRead);
            let mut n = cookie.len();
            if self.work != ExtraWork::default() {
                n = n.wrapping_add(self.extra(&cookie));
            }
            self.set_http_request_header(super::SET_HEADER, Some(&n.to_string()));
            timing::end(Stage::Act);
            Action::Continue
        }

        fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
            timing::end(Stage::RequestToResponse);
            timing::end(Stage::Response);
            Action::Continue
        }

        fn on_log(&mut self) {
            timing::end(Stage::ResponseToLog);
        }
    }

    impl Noop {
        /// oidc-gate's host calls on an authenticated request, and nothing else.
        fn session_floor(&mut self) -> Action {
            let map = super::header_map::HeaderMapBytes::request();
            timing::end(Stage::HeaderRead);
            if !map.is_some_and(|m| m.pairs().any(|(name, _)| name == b"cookie")) {
                self.send_http_response(401, vec![], None);
                return Action::Pause;
            }
            let _ = std::hint::black_box(self.get_current_time());
            self.set_http_request_header("cookie", None);
            self.add_http_request_header("authorization", super::FLOOR_AUTHORIZATION);
            timing::end(Stage::Act);
            Action::Continue
        }

        /// The calibration work; returns 0 (folded into the header so it cannot be skipped).
        fn extra(&self, cookie: &str) -> usize {
            let mut sum = 0u64;
            for _ in 0..self.work.clock_reads {
                // One host call: comparing with the epoch is arithmetic (elapsed() would ask
                // WASI's clock as well).
                let t = self.get_current_time();
                let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                sum = sum.wrapping_add(since.as_secs());
            }
            for i in 0..self.work.header_writes {
                if i % 2 == 0 {
                    self.add_http_request_header("x-noop-extra", "1");
                } else {
                    self.set_http_request_header("x-noop-extra", None);
                }
            }
            for _ in 0..self.work.cookie_byte_passes {
                sum = sum.wrapping_add(byte_pass(cookie.as_bytes()));
            }
            usize::from(sum == u64::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_work_parses_counts_and_refuses_the_rest() {
        assert_eq!(ExtraWork::parse(""), Some(ExtraWork::default()));
        assert_eq!(
            ExtraWork::parse("clock_reads=100 header_writes=3  cookie_byte_passes=10"),
            Some(ExtraWork {
                clock_reads: 100,
                header_writes: 3,
                cookie_byte_passes: 10,
                session_floor: false,
            })
        );
        assert_eq!(
            ExtraWork::parse("session_floor=1").map(|w| w.session_floor),
            Some(true)
        );
        assert_eq!(ExtraWork::parse("session_floor=2"), None);
        assert_eq!(ExtraWork::parse("clock_reads"), None);
        assert_eq!(ExtraWork::parse("clock_reads=-1"), None);
        assert_eq!(ExtraWork::parse("sleep=1"), None);
    }

    #[test]
    fn byte_pass_sums_every_byte() {
        assert_eq!(byte_pass(b"\x01\x02\xff"), 258);
    }
}
