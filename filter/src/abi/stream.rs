//! The per-request context: gathers the request, runs the engine, executes its decisions.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::cache::IdpCache;
use super::host::{unix_seconds, HostRandom};
use crate::discovery::{ProviderMetadata, MAX_DOCUMENT_BYTES};
use crate::flow::{
    Callout, Decision, Forward, Gate, Keys, LoginStep, PendingLogin, Request,
    MAX_TOKEN_RESPONSE_BYTES,
};
use crate::reply::{Failure, Reply};
use crate::token::Jwks;

/// Timeout of every IdP callout.
const CALLOUT_TIMEOUT: Duration = Duration::from_secs(5);

/// The request facts, owned, so a decision can be re-run after a callout.
#[derive(Default)]
struct Facts {
    method: String,
    scheme: String,
    authority: String,
    path: String,
    cookies: Vec<String>,
    sec_fetch_mode: Option<String>,
    has_sec_fetch: bool,
    accept: Option<String>,
    request_id: Option<String>,
}

impl Facts {
    fn request(&self) -> Request<'_> {
        Request {
            method: &self.method,
            scheme: &self.scheme,
            authority: &self.authority,
            path: &self.path,
            cookie_headers: self.cookies.iter().map(String::as_str).collect(),
            sec_fetch_mode: self.sec_fetch_mode.as_deref(),
            has_sec_fetch: self.has_sec_fetch,
            accept: self.accept.as_deref(),
            request_id: self.request_id.as_deref(),
        }
    }

    fn browser(&self) -> bool {
        self.request().is_navigation()
    }
}

enum Waiting {
    Nothing,
    Discovery {
        token: u32,
    },
    Token {
        token: u32,
        pending: PendingLogin,
    },
    Jwks {
        token: u32,
        pending: PendingLogin,
        status: u16,
        body: Vec<u8>,
    },
}

/// One HTTP stream.
pub struct Stream {
    id: u32,
    gate: Option<Rc<Gate>>,
    cache: Option<Rc<RefCell<IdpCache>>>,
    facts: Facts,
    waiting: Waiting,
    provider: Option<Rc<ProviderMetadata>>,
    response_cookies: Vec<String>,
    replied: bool,
}

impl Stream {
    /// A stream; `gate` is `None` when the configuration was refused (fail closed).
    pub fn new(id: u32, gate: Option<Rc<Gate>>, cache: Option<Rc<RefCell<IdpCache>>>) -> Self {
        Self {
            id,
            gate,
            cache,
            facts: Facts::default(),
            waiting: Waiting::Nothing,
            provider: None,
            response_cookies: Vec::new(),
            replied: false,
        }
    }

    fn now(&self) -> u64 {
        unix_seconds(self.get_current_time())
    }

    fn gather(&self) -> Facts {
        let mut f = Facts::default();
        let mut scheme = None;
        let mut forwarded_proto = None;
        for (name, value) in self.get_http_request_headers() {
            match name.as_str() {
                ":method" => f.method = value,
                ":scheme" => scheme = Some(value),
                ":authority" => f.authority = value,
                ":path" => f.path = value,
                "cookie" => f.cookies.push(value),
                "sec-fetch-mode" => {
                    f.has_sec_fetch = true;
                    f.sec_fetch_mode = Some(value);
                }
                n if n.starts_with("sec-fetch-") => f.has_sec_fetch = true,
                "accept" => f.accept = Some(value),
                "x-request-id" => f.request_id = Some(value),
                // At an Istio gateway (use_remote_address, no trusted hops) Envoy sets this
                // from the downstream connection; behind a trusted proxy it carries the
                // browser-facing scheme.
                "x-forwarded-proto" => forwarded_proto = Some(value),
                _ => {}
            }
        }
        f.scheme = match forwarded_proto.or(scheme) {
            Some(s) if s.eq_ignore_ascii_case("http") => "http".into(),
            _ => "https".into(),
        };
        f
    }

    fn reply(&mut self, r: Reply) -> Action {
        let headers: Vec<(&str, &str)> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.send_http_response(u32::from(r.status), headers, Some(r.body.as_bytes()));
        self.replied = true;
        Action::Pause
    }

    fn fail(&mut self, f: Failure, browser: bool, request_id: Option<String>) -> Action {
        let r = f.reply(browser, request_id.as_deref());
        self.reply(r)
    }

    fn apply_forward(&mut self, fwd: Forward) {
        // Remove first: a client may have sent the header twice.
        self.set_http_request_header("authorization", None);
        if let Some(v) = &fwd.authorization {
            self.add_http_request_header("authorization", v);
        }
        self.set_http_request_header("cookie", None);
        if let Some(v) = &fwd.cookie {
            self.add_http_request_header("cookie", v);
        }
        self.response_cookies = fwd.response_cookies;
    }

    fn dispatch(&mut self, gate: &Gate, call: &Callout) -> Result<u32, ()> {
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", call.method),
            (":path", &call.path),
            (":authority", &call.authority),
        ];
        headers.extend(call.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let body = if call.body.is_empty() {
            None
        } else {
            Some(call.body.as_slice())
        };
        self.dispatch_http_call(&gate.config().idp_cluster, headers, body, vec![], CALLOUT_TIMEOUT).map_err(|status| {
            log::error!(
                "oidc-gate #{}: callout to cluster `{}` refused by the host ({status:?}); check idp_cluster names an existing Envoy cluster",
                self.id,
                gate.config().idp_cluster
            );
        })
    }

    /// Runs the engine on the gathered facts. `paused` tells whether the stream is already
    /// paused (after a callout), so forwarding means resuming.
    fn run(&mut self, paused: bool) -> Action {
        let Some(gate) = self.gate.clone() else {
            log::error!(
                "oidc-gate #{}: no valid configuration; refusing the request",
                self.id
            );
            return self.fail(
                Failure::Internal,
                self.facts.browser(),
                self.facts.request_id.clone(),
            );
        };
        let now = self.now();
        let provider = match &self.provider {
            Some(p) => Some(p.clone()),
            None => self
                .cache
                .as_ref()
                .and_then(|c| c.borrow_mut().provider(&gate.config().issuer, now))
                .and_then(|f| (!f.stale).then_some(f.value)),
        };
        let (decision, note) = gate.decide(
            &self.facts.request(),
            provider.as_deref(),
            now,
            &mut HostRandom,
        );
        if let Some(note) = note {
            log::info!("oidc-gate #{}: {note}", self.id);
        }
        match decision {
            Decision::PassThrough => self.continue_or_resume(paused),
            Decision::Forward(fwd) => {
                self.apply_forward(fwd);
                self.continue_or_resume(paused)
            }
            Decision::Reply(r) => self.reply(r),
            Decision::NeedProvider => {
                if paused {
                    // Discovery just ran and still gave nothing usable.
                    return self.fail(
                        Failure::IdpUnavailable,
                        self.facts.browser(),
                        self.facts.request_id.clone(),
                    );
                }
                let Some(call) = gate.discovery_request() else {
                    return self.fail(
                        Failure::Internal,
                        self.facts.browser(),
                        self.facts.request_id.clone(),
                    );
                };
                match self.dispatch(&gate, &call) {
                    Ok(token) => {
                        self.waiting = Waiting::Discovery { token };
                        Action::Pause
                    }
                    Err(()) => self.use_stale_provider_or_fail(&gate, now),
                }
            }
            Decision::ExchangeCode { call, pending } => match self.dispatch(&gate, &call) {
                Ok(token) => {
                    self.waiting = Waiting::Token { token, pending };
                    Action::Pause
                }
                Err(()) => self.fail(
                    Failure::IdpUnavailable,
                    pending.browser(),
                    pending.request_id().map(str::to_string),
                ),
            },
        }
    }

    fn continue_or_resume(&mut self, paused: bool) -> Action {
        if paused {
            self.resume_http_request();
        }
        Action::Continue
    }

    fn use_stale_provider_or_fail(&mut self, gate: &Gate, now: u64) -> Action {
        let stale = self
            .cache
            .as_ref()
            .and_then(|c| c.borrow_mut().provider(&gate.config().issuer, now));
        match stale {
            Some(f) => {
                log::warn!(
                    "oidc-gate #{}: IdP discovery unavailable; using the cached document",
                    self.id
                );
                self.provider = Some(f.value);
                self.run(true)
            }
            None => self.fail(
                Failure::IdpUnavailable,
                self.facts.browser(),
                self.facts.request_id.clone(),
            ),
        }
    }

    fn call_response(&self, body_size: usize, limit: usize) -> Option<(u16, Option<Vec<u8>>)> {
        let status = self
            .get_http_call_response_headers()
            .into_iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| v.parse::<u16>().ok())?;
        if body_size > limit {
            return Some((status, None));
        }
        let body = if body_size == 0 {
            Vec::new()
        } else {
            self.get_http_call_response_body(0, body_size)
                .unwrap_or_default()
        };
        Some((status, Some(body)))
    }

    fn on_discovery(&mut self, body_size: usize) {
        let Some(gate) = self.gate.clone() else {
            return;
        };
        let now = self.now();
        match self.call_response(body_size, MAX_DOCUMENT_BYTES) {
            Some((200, Some(body))) => {
                match ProviderMetadata::parse(&body, &gate.config().issuer) {
                    Ok(meta) => {
                        log::info!(
                            "oidc-gate #{}: discovery document fetched for {}",
                            self.id,
                            gate.config().issuer
                        );
                        let value = match &self.cache {
                            Some(c) => c.borrow_mut().store_provider(&body, meta, now),
                            None => Rc::new(meta),
                        };
                        self.provider = Some(value);
                        self.run(true);
                    }
                    Err(e) => {
                        log::error!("oidc-gate #{}: discovery document refused: {e}", self.id);
                        self.fail(
                            Failure::IdpInvalid,
                            self.facts.browser(),
                            self.facts.request_id.clone(),
                        );
                    }
                }
            }
            Some((status, _)) => {
                log::error!(
                    "oidc-gate #{}: discovery answered HTTP {status} (or too large)",
                    self.id
                );
                self.use_stale_provider_or_fail(&gate, now);
            }
            None => {
                log::error!(
                    "oidc-gate #{}: discovery callout failed (IdP unreachable or timed out)",
                    self.id
                );
                self.use_stale_provider_or_fail(&gate, now);
            }
        }
    }

    fn on_token(&mut self, pending: PendingLogin, body_size: usize) {
        match self.call_response(body_size, MAX_TOKEN_RESPONSE_BYTES) {
            None => {
                log::error!(
                    "oidc-gate #{}: token callout failed (IdP unreachable or timed out)",
                    self.id
                );
                self.fail(
                    Failure::IdpUnavailable,
                    pending.browser(),
                    pending.request_id().map(str::to_string),
                );
            }
            Some((status, None)) => {
                log::error!(
                    "oidc-gate #{}: token endpoint answered HTTP {status} with an oversized body",
                    self.id
                );
                self.fail(
                    Failure::IdpInvalid,
                    pending.browser(),
                    pending.request_id().map(str::to_string),
                );
            }
            Some((status, Some(body))) => self.finish_login(pending, status, body, false),
        }
    }

    fn finish_login(
        &mut self,
        pending: PendingLogin,
        status: u16,
        body: Vec<u8>,
        keys_just_fetched: bool,
    ) {
        let Some(gate) = self.gate.clone() else {
            return;
        };
        let now = self.now();
        let cached = self.cache.as_ref().and_then(|c| c.borrow_mut().jwks(now));
        let jwks = match &cached {
            Some(f) if !f.stale || keys_just_fetched => Some(f.value.clone()),
            _ => None,
        };
        let may_refetch = !keys_just_fetched
            && self
                .cache
                .as_ref()
                .is_some_and(|c| c.borrow().claim_jwks_refetch(now));
        let (step, note) = gate.complete_login(
            &pending,
            status,
            &body,
            Keys {
                jwks: jwks.as_deref(),
                may_refetch,
            },
            now,
            &mut HostRandom,
        );
        if let Some(note) = note {
            log::info!("oidc-gate #{}: {note}", self.id);
        }
        match step {
            LoginStep::Done(reply) => {
                self.reply(reply);
            }
            LoginStep::NeedKeys => self.fetch_jwks(pending, status, body, cached.map(|f| f.value)),
        }
    }

    fn fetch_jwks(
        &mut self,
        pending: PendingLogin,
        status: u16,
        body: Vec<u8>,
        fallback: Option<Rc<Jwks>>,
    ) {
        let Some(gate) = self.gate.clone() else {
            return;
        };
        let Some(provider) = self.provider.clone().or_else(|| {
            let now = self.now();
            self.cache
                .as_ref()
                .and_then(|c| c.borrow_mut().provider(&gate.config().issuer, now))
                .map(|f| f.value)
        }) else {
            self.fail(
                Failure::IdpUnavailable,
                pending.browser(),
                pending.request_id().map(str::to_string),
            );
            return;
        };
        let call = gate.document_request(&provider.jwks_uri);
        match self.dispatch(&gate, &call) {
            Ok(token) => {
                self.waiting = Waiting::Jwks {
                    token,
                    pending,
                    status,
                    body,
                }
            }
            Err(()) => match fallback {
                Some(_) => self.finish_login(pending, status, body, true),
                None => {
                    self.fail(
                        Failure::IdpUnavailable,
                        pending.browser(),
                        pending.request_id().map(str::to_string),
                    );
                }
            },
        }
    }

    fn on_jwks(
        &mut self,
        pending: PendingLogin,
        token_status: u16,
        token_body: Vec<u8>,
        body_size: usize,
    ) {
        let now = self.now();
        match self.call_response(body_size, MAX_DOCUMENT_BYTES) {
            Some((200, Some(body))) => match Jwks::parse(&body) {
                Ok(jwks) => {
                    log::info!(
                        "oidc-gate #{}: JWKS fetched ({} usable keys)",
                        self.id,
                        jwks.len()
                    );
                    if let Some(c) = &self.cache {
                        c.borrow_mut().store_jwks(&body, jwks, now);
                    }
                }
                // A broken or empty JWKS never replaces a good one; verification goes on with
                // the last good set (or fails closed when there is none).
                Err(e) => log::error!("oidc-gate #{}: JWKS refused: {e}", self.id),
            },
            Some((status, _)) => log::error!(
                "oidc-gate #{}: JWKS answered HTTP {status} (or too large)",
                self.id
            ),
            None => log::error!(
                "oidc-gate #{}: JWKS callout failed (IdP unreachable or timed out)",
                self.id
            ),
        }
        let have_keys = self
            .cache
            .as_ref()
            .and_then(|c| c.borrow_mut().jwks(now))
            .is_some();
        if have_keys {
            self.finish_login(pending, token_status, token_body, true);
        } else {
            self.fail(
                Failure::IdpUnavailable,
                pending.browser(),
                pending.request_id().map(str::to_string),
            );
        }
    }
}

impl Context for Stream {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let waiting = std::mem::replace(&mut self.waiting, Waiting::Nothing);
        match waiting {
            Waiting::Discovery { token } if token == token_id => self.on_discovery(body_size),
            Waiting::Token { token, pending } if token == token_id => {
                self.on_token(pending, body_size)
            }
            Waiting::Jwks {
                token,
                pending,
                status,
                body,
            } if token == token_id => self.on_jwks(pending, status, body, body_size),
            other => {
                log::warn!(
                    "oidc-gate #{}: ignoring an unexpected callout answer",
                    self.id
                );
                self.waiting = other;
            }
        }
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.facts = self.gather();
        self.run(false)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if !self.replied {
            for cookie in std::mem::take(&mut self.response_cookies) {
                self.add_http_response_header("set-cookie", &cookie);
            }
        }
        Action::Continue
    }
}
