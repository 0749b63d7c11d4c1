//! The per-request context: gathers the request, runs the engine, executes its decisions.

use std::ops::Range;
use std::rc::Rc;
use std::time::SystemTime;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::header_map::HeaderMapBytes;
use super::host::{self, unix_seconds, HostRandom};
use super::refresh::{
    abandon_local, give_up_refresh, raise_tick, recent_answer, record, release_local,
    store_fetched_jwks, wake_root, RemoteWaiter, Tick, REMOTE_WAIT_SECS,
};
use super::root::{Follower, Shared};
use super::timing::{self, Stage};
use crate::discovery::{ProviderMetadata, MAX_DOCUMENT_BYTES};
use crate::flow::{
    same_bytes, Callout, Decision, Forward, Gate, Keys, Known, LoginStep, Note, PendingLogin,
    PendingRefresh, RefreshAnswer, RefreshStep, Request, MAX_TOKEN_RESPONSE_BYTES,
};
use crate::headers::is_identity_header;
use crate::http::split_path;
use crate::reply::{Failure, Reply};
use crate::session::is_own_cookie;
use crate::token::Jwks;

/// Where a header value lies in [`Facts::text`].
#[derive(Clone, Copy, Default)]
struct Span {
    start: usize,
    end: usize,
}

impl From<Range<usize>> for Span {
    fn from(r: Range<usize>) -> Self {
        Span {
            start: r.start,
            end: r.end,
        }
    }
}

/// The request facts, owned, so a decision can be re-run after a callout.
#[derive(Default, Clone)]
pub struct Facts {
    /// The header names and values the host gave, as one string: the fields are spans of it, so
    /// gathering a request copies and allocates nothing per header.
    text: String,
    method: Span,
    scheme: &'static str,
    authority: Span,
    path: Span,
    /// The `Cookie` headers the engine sees.
    cookies: Vec<Span>,
    /// The `Cookie` headers as the client sent them, once the engine sees fewer (a session
    /// ended): what a forwarded request must replace, so no cookie of ours reaches the upstream.
    sent_cookies: Option<Vec<Span>>,
    sec_fetch_mode: Option<Span>,
    sec_fetch_site: Option<Span>,
    has_sec_fetch: bool,
    accept: Option<Span>,
    request_id: Option<Span>,
    authorization: Vec<Span>,
    origin: Option<Span>,
    access_control_request_method: Option<Span>,
    /// Client-sent headers the filter owns (identity headers in any spelling).
    identity_headers: Vec<String>,
    /// A client-sent header the filter owns whose name is not UTF-8: the host's API cannot name
    /// it to remove it, so the request is refused.
    unremovable_identity_header: bool,
    /// Whether a body follows the headers (the host's `end_of_stream` said otherwise).
    has_body: bool,
}

impl Facts {
    /// The facts of the request whose headers the host serialised into `map`.
    fn read(map: HeaderMapBytes, gate: Option<&Gate>) -> Facts {
        let values = map.values();
        let mut f = Facts::default();
        let mut scheme_is_http = None;
        let mut forwarded_proto_is_http = None;
        for (name, range) in map.spans() {
            // Names are lowercase tokens (Envoy validates them), compared as bytes: a name that
            // is not UTF-8 equals none of these.
            let is_http = || {
                values
                    .get(range.clone())
                    .is_some_and(|v| v.eq_ignore_ascii_case(b"http"))
            };
            let span = Span::from(range.clone());
            match name {
                b":method" => f.method = span,
                b":scheme" => scheme_is_http = Some(is_http()),
                b":authority" => f.authority = span,
                b":path" => f.path = span,
                b"cookie" => f.cookies.push(span),
                b"authorization" => f.authorization.push(span),
                b"sec-fetch-mode" => {
                    f.has_sec_fetch = true;
                    f.sec_fetch_mode = Some(span);
                }
                b"sec-fetch-site" => {
                    f.has_sec_fetch = true;
                    f.sec_fetch_site = Some(span);
                }
                n if n.starts_with(b"sec-fetch-") => f.has_sec_fetch = true,
                b"accept" => f.accept = Some(span),
                b"origin" => f.origin = Some(span),
                b"access-control-request-method" => f.access_control_request_method = Some(span),
                b"x-request-id" => f.request_id = Some(span),
                // At an Istio gateway (use_remote_address, no trusted hops) Envoy sets this from
                // the downstream connection; behind a trusted proxy it is the browser's scheme.
                b"x-forwarded-proto" => forwarded_proto_is_http = Some(is_http()),
                _ => {}
            }
            if gate.is_some_and(|g| is_identity_header(g.config(), name)) {
                // Envoy's codecs pass only token names (ASCII); anything else cannot be removed
                // by name through the host, so it fails the request instead of passing on.
                match std::str::from_utf8(name) {
                    Ok(name) => f.identity_headers.push(name.to_string()),
                    Err(_) => f.unremovable_identity_header = true,
                }
            }
        }
        f.scheme = if forwarded_proto_is_http.or(scheme_is_http) == Some(true) {
            "http"
        } else {
            "https"
        };
        // HTTP allows bytes that are not UTF-8 in values (obs-text): rare enough that only then
        // is the text rebuilt value by value.
        match map.into_text() {
            Ok(text) => Facts { text, ..f },
            Err(raw) => f.with_lossy_text(&raw),
        }
    }

    fn at(&self, span: Span) -> &str {
        self.text.get(span.start..span.end).unwrap_or_default()
    }

    fn at_each(&self, spans: &[Span]) -> Vec<&str> {
        spans.iter().map(|s| self.at(*s)).collect()
    }

    pub(crate) fn request(&self) -> Request<'_> {
        Request {
            method: self.at(self.method),
            scheme: self.scheme,
            authority: self.at(self.authority),
            path: self.at(self.path),
            cookie_headers: self.at_each(&self.cookies),
            sec_fetch_mode: self.sec_fetch_mode.map(|s| self.at(s)),
            sec_fetch_site: self.sec_fetch_site.map(|s| self.at(s)),
            has_sec_fetch: self.has_sec_fetch,
            accept: self.accept.map(|s| self.at(s)),
            request_id: self.request_id(),
            authorization: self.at_each(&self.authorization),
            origin: self.origin.map(|s| self.at(s)),
            access_control_request_method: self.access_control_request_method.map(|s| self.at(s)),
            has_body: self.has_body,
        }
    }

    pub(crate) fn browser(&self) -> bool {
        self.request().is_navigation()
    }

    pub(crate) fn request_id(&self) -> Option<&str> {
        self.request_id.map(|s| self.at(s))
    }

    fn authority(&self) -> &str {
        self.at(self.authority)
    }

    fn path(&self) -> &str {
        self.at(self.path)
    }

    /// Appends `value` to the text and returns where it lies.
    fn push(&mut self, value: &str) -> Span {
        let start = self.text.len();
        self.text.push_str(value);
        Span {
            start,
            end: self.text.len(),
        }
    }

    /// Rebuilds the text from `raw` (header values with bytes that are not UTF-8) value by value:
    /// such bytes become U+FFFD, so a value can never match a session, a token or a path of ours.
    fn with_lossy_text(mut self, raw: &[u8]) -> Facts {
        let mut text = String::new();
        let mut respan = |s: &mut Span| {
            let start = text.len();
            text.push_str(&String::from_utf8_lossy(
                raw.get(s.start..s.end).unwrap_or_default(),
            ));
            *s = Span {
                start,
                end: text.len(),
            };
        };
        // Every field named: a span added to `Facts` does not compile until it is rebuilt here.
        let Facts {
            text: _,
            method,
            scheme: _,
            authority,
            path,
            cookies,
            sent_cookies,
            sec_fetch_mode,
            sec_fetch_site,
            has_sec_fetch: _,
            accept,
            request_id,
            authorization,
            origin,
            access_control_request_method,
            identity_headers: _,
            unremovable_identity_header: _,
            has_body: _,
        } = &mut self;
        for s in [method, authority, path]
            .into_iter()
            .chain(cookies.iter_mut())
            .chain(sent_cookies.iter_mut().flatten())
            .chain(authorization.iter_mut())
            .chain(sec_fetch_mode.iter_mut())
            .chain(sec_fetch_site.iter_mut())
            .chain(accept.iter_mut())
            .chain(request_id.iter_mut())
            .chain(origin.iter_mut())
            .chain(access_control_request_method.iter_mut())
        {
            respan(s);
        }
        self.text = text;
        self
    }

    /// The `Cookie` headers the client sent (what forwarding replaces).
    fn sent_cookies(&self) -> &[Span] {
        self.sent_cookies.as_deref().unwrap_or(&self.cookies)
    }

    /// Whether the headers at `sent` already are the one value (or absence) to forward.
    fn already(&self, sent: &[Span], forward: Option<&str>) -> bool {
        match (sent, forward) {
            ([], None) => true,
            ([one], Some(v)) => same_bytes(self.at(*one).as_bytes(), v.as_bytes()),
            _ => false,
        }
    }

    /// The same request without the session cookies: what remains once a session ended.
    pub(crate) fn without_session(&self) -> Facts {
        let mut f = self.clone();
        let kept: Vec<String> = self
            .cookies
            .iter()
            .filter_map(|h| {
                crate::http::cookie_header_without(&[self.at(*h)], |n| {
                    is_own_cookie(n) && !n.starts_with(crate::session::LOGIN_COOKIE_PREFIX)
                })
            })
            .collect();
        f.sent_cookies = Some(self.sent_cookies().to_vec());
        f.cookies = kept.iter().map(|c| f.push(c)).collect();
        f
    }
}

/// Why the JWKS is being fetched, and what continues afterwards.
enum AfterKeys {
    Decide,
    Login {
        pending: PendingLogin,
        status: u16,
        body: Vec<u8>,
    },
    Refresh {
        pending: PendingRefresh,
        key: [u8; 16],
        answer: RefreshAnswer,
        from: AnswerFrom,
    },
}

/// Where a refresh answer this stream applies came from, which decides whether this stream
/// leads the refresh (holds the worker's registration and the cross-worker lock, and answers
/// the streams that wait for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AnswerFrom {
    /// Shared data, read while this stream held the refresh lock.
    OwnShared,
    /// Another stream's refresh, from shared data: this stream leads nothing.
    Shared,
}

impl AnswerFrom {
    fn leading(self) -> bool {
        self != Self::Shared
    }
}

enum Waiting {
    Nothing,
    Discovery {
        token: u32,
        started: SystemTime,
    },
    Jwks {
        token: u32,
        started: SystemTime,
        then: AfterKeys,
    },
    Token {
        token: u32,
        started: SystemTime,
        pending: PendingLogin,
    },
    RefreshFollower {
        key: [u8; 16],
    },
    RemoteRefresh {
        key: [u8; 16],
    },
}

/// One HTTP stream.
pub struct Stream {
    id: u32,
    shared: Option<Rc<Shared>>,
    facts: Facts,
    waiting: Waiting,
    provider: Option<Rc<ProviderMetadata>>,
    keys_fetched: bool,
    /// Whether a JWKS was fetched and stored for this stream's request (not only tried).
    keys_fetched_ok: bool,
    response_cookies: Vec<String>,
    extra_reply_cookies: Vec<String>,
    replied: bool,
}

impl Stream {
    /// A stream; `shared` is `None` when the configuration was refused (fail closed).
    pub fn new(id: u32, shared: Option<Rc<Shared>>) -> Self {
        Self {
            id,
            shared,
            facts: Facts::default(),
            waiting: Waiting::Nothing,
            provider: None,
            keys_fetched: false,
            keys_fetched_ok: false,
            response_cookies: Vec::new(),
            extra_reply_cookies: Vec::new(),
            replied: false,
        }
    }

    fn now(&self) -> u64 {
        unix_seconds(self.get_current_time())
    }

    /// The request facts; `None` when the host would not give the headers.
    fn gather(&self, gate: Option<&Gate>) -> Option<Facts> {
        let map = HeaderMapBytes::request()?;
        timing::end(Stage::HeaderRead);
        let facts = Facts::read(map, gate);
        timing::end(Stage::Parse);
        Some(facts)
    }

    fn note(&self, note: Note) {
        match &self.shared {
            Some(shared) => record(shared, note, self.id),
            None => {
                if let Some(line) = note.log {
                    log::info!("oidc-gate #{}: {line}", self.id);
                }
            }
        }
    }

    fn reply(&mut self, r: Reply) -> Action {
        let mut r = r;
        if !self.extra_reply_cookies.is_empty() {
            r = r.with_cookies(std::mem::take(&mut self.extra_reply_cookies));
        }
        let headers: Vec<(&str, &str)> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.send_http_response(u32::from(r.status), headers, Some(r.body.as_bytes()));
        self.replied = true;
        Action::Pause
    }

    fn fail(&mut self, f: Failure) -> Action {
        let r = f.reply(self.facts.browser(), self.facts.request_id());
        self.reply(r)
    }

    /// The callback's query holds the authorization code, and Envoy's access log prints
    /// `:path`: the request keeps only the path. The filter answers the callback itself, from
    /// the facts, which keep the query.
    fn hide_callback_query(&self, gate: &Gate) {
        let (path, _) = split_path(self.facts.path());
        if path == gate.callback_path() && self.facts.path().len() > path.len() {
            self.set_http_request_header(":path", Some(path));
        }
    }

    /// Removes every identity header the client sent, in every spelling, before anything else.
    fn strip_identity_headers(&self) {
        for name in &self.facts.identity_headers {
            self.set_http_request_header(name, None);
        }
    }

    /// Sets or removes a header the client may have sent `sent` times: adding when absent, one
    /// replace when once, and remove-then-add when repeated, so no client copy survives.
    fn replace_header(&self, name: &str, sent: usize, value: Option<&str>) {
        match (sent, value) {
            (0, None) => {}
            (0, Some(v)) => self.add_http_request_header(name, v),
            (1, v) => self.set_http_request_header(name, v),
            (_, v) => {
                self.set_http_request_header(name, None);
                if let Some(v) = v {
                    self.add_http_request_header(name, v);
                }
            }
        }
    }

    fn apply_forward(&mut self, fwd: Forward) {
        // Unchanged headers (a verified bearer token, a Cookie without ours) cost no host call.
        let facts = &self.facts;
        if !facts.already(&facts.authorization, fwd.authorization.as_deref()) {
            let sent = facts.authorization.len();
            self.replace_header("authorization", sent, fwd.authorization.as_deref());
        }
        let sent = facts.sent_cookies();
        if !facts.already(sent, fwd.cookie.as_deref()) {
            self.replace_header("cookie", sent.len(), fwd.cookie.as_deref());
        }
        for (name, value) in &fwd.set_headers {
            self.set_http_request_header(name, None);
            self.add_http_request_header(name, value);
        }
        self.response_cookies = fwd.response_cookies;
        // A session that ended on this request (its refresh refused) is cleared in the browser
        // also when the request itself still passes (on a bearer token, say).
        self.response_cookies.append(&mut self.extra_reply_cookies);
    }

    fn dispatch(&self, gate: &Gate, call: &Callout) -> Option<u32> {
        host::dispatch(
            gate,
            self.shared.as_ref().map(|s| &s.metrics),
            call,
            self.id,
        )
    }

    fn known_provider(&mut self, shared: &Shared, now: u64) -> Option<Rc<ProviderMetadata>> {
        if let Some(p) = &self.provider {
            return Some(p.clone());
        }
        let fresh = shared
            .cache
            .borrow_mut()
            .provider(&shared.gate.config().issuer, now)?;
        if fresh.stale {
            return None;
        }
        self.provider = Some(fresh.value.clone());
        Some(fresh.value)
    }

    /// Runs the engine on the gathered facts. `paused` tells whether the stream is already paused
    /// (after a callout), so forwarding means resuming.
    fn run(&mut self, paused: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            log::error!(
                "oidc-gate #{}: no valid configuration; refusing the request",
                self.id
            );
            return self.fail(Failure::Internal);
        };
        let gate = shared.gate.clone();
        let now = self.now();
        shared.endings.learn(&gate, now);
        let provider = self.known_provider(&shared, now);
        let cached_jwks = shared.cache.borrow_mut().jwks(now);
        // A set past its refresh time is refetched first, under the same process-wide claim as
        // an unknown key: without it (another stream refetched within 30 s), the stale set is
        // used rather than fetching again for every request.
        let stale_jwks = cached_jwks
            .as_ref()
            .filter(|f| f.stale && !self.keys_fetched)
            .map(|f| f.value.clone());
        let jwks = cached_jwks
            .filter(|f| !f.stale || self.keys_fetched)
            .map(|f| f.value);
        // Optimistic: the process-wide refetch right is claimed only when a decision needs it.
        let known = Known {
            provider: provider.as_deref(),
            jwks: jwks.as_deref(),
            may_refetch_keys: !self.keys_fetched,
        };
        let (mut decision, mut note) =
            gate.decide(&self.facts.request(), known, now, &mut HostRandom);
        if !paused {
            timing::end(Stage::Engine);
        }
        if matches!(decision, Decision::NeedKeys)
            && (jwks.is_some() || stale_jwks.is_some())
            && !shared.cache.borrow().claim_jwks_refetch(now)
        {
            let known = Known {
                jwks: jwks.as_deref().or(stale_jwks.as_deref()),
                may_refetch_keys: false,
                ..known
            };
            (decision, note) = gate.decide(&self.facts.request(), known, now, &mut HostRandom);
        }
        self.note(note);
        shared.endings.publish(&gate, now);
        match decision {
            Decision::PassThrough => self.continue_or_resume(paused),
            Decision::Forward(fwd) => {
                self.apply_forward(fwd);
                self.continue_or_resume(paused)
            }
            Decision::Reply(r) => self.reply(r),
            Decision::NeedProvider => {
                if self.provider.is_some() || matches!(self.waiting, Waiting::Discovery { .. }) {
                    return self.fail(Failure::IdpUnavailable);
                }
                // A document past its refresh time is fetched again under a process-wide claim,
                // as keys are; without it (another VM asked within 30 s) the cached one serves,
                // so anonymous navigations while the IdP is slow or down are not one call each.
                let stale = shared
                    .cache
                    .borrow_mut()
                    .provider(&gate.config().issuer, now);
                if let Some(stale) = stale {
                    if !shared.cache.borrow().claim_discovery_refetch(now) {
                        self.provider = Some(stale.value);
                        return self.run(paused);
                    }
                }
                let Some(call) = gate.discovery_request() else {
                    return self.fail(Failure::Internal);
                };
                match self.dispatch(&gate, &call) {
                    Some(token) => {
                        self.waiting = Waiting::Discovery {
                            token,
                            started: self.get_current_time(),
                        };
                        Action::Pause
                    }
                    None => self.use_stale_provider_or_fail(
                        &shared,
                        now,
                        paused,
                        Failure::IdpUnavailable,
                    ),
                }
            }
            Decision::NeedKeys => {
                if self.keys_fetched {
                    return self.fail(Failure::IdpUnavailable);
                }
                self.fetch_jwks(&shared, AfterKeys::Decide, jwks.or(stale_jwks), paused)
            }
            Decision::ExchangeCode { call, pending } => match self.dispatch(&gate, &call) {
                Some(token) => {
                    self.waiting = Waiting::Token {
                        token,
                        started: self.get_current_time(),
                        pending,
                    };
                    Action::Pause
                }
                None => self.fail_login(&pending, Failure::IdpUnavailable, "idp unreachable"),
            },
            Decision::Refresh { call, pending } => {
                self.start_refresh(&shared, call, pending, now, paused)
            }
        }
    }

    /// Runs `step` with the cached JWKS, allowing a refetch for an unknown key. Only when it asks
    /// for keys is the process-wide refetch right claimed; without it, `step` runs again knowing
    /// no refetch may happen (so a flood of unknown keys cannot become a flood of fetches).
    fn with_keys<T>(
        &self,
        shared: &Shared,
        jwks: Option<&Jwks>,
        stale_jwks: Option<&Jwks>,
        now: u64,
        needs_keys: fn(&T) -> bool,
        mut step: impl FnMut(Keys<'_>) -> T,
    ) -> T {
        let keys = Keys {
            jwks,
            may_refetch: !self.keys_fetched,
            fetched_for_it: self.keys_fetched_ok,
        };
        let out = step(keys);
        if needs_keys(&out)
            && (jwks.is_some() || stale_jwks.is_some())
            && !self.keys_fetched
            && !shared.cache.borrow().claim_jwks_refetch(now)
        {
            return step(Keys {
                jwks: jwks.or(stale_jwks),
                may_refetch: false,
                ..keys
            });
        }
        out
    }

    fn continue_or_resume(&mut self, paused: bool) -> Action {
        if paused {
            self.resume_http_request();
        }
        Action::Continue
    }

    /// Goes on with the cached discovery document while the IdP gives no usable one; without
    /// one, a logout still signs out here and anything else gets `failure`.
    fn use_stale_provider_or_fail(
        &mut self,
        shared: &Shared,
        now: u64,
        paused: bool,
        failure: Failure,
    ) -> Action {
        let stale = shared
            .cache
            .borrow_mut()
            .provider(&shared.gate.config().issuer, now);
        match stale {
            Some(f) => {
                log::warn!(
                    "oidc-gate #{}: IdP discovery unavailable; using the cached document",
                    self.id
                );
                self.provider = Some(f.value);
                self.run(paused)
            }
            None => {
                let gate = &shared.gate;
                if let Some((reply, note)) = gate.logout_without_idp(&self.facts.request(), now) {
                    self.note(note);
                    shared.endings.publish(gate, now);
                    return self.reply(reply);
                }
                self.fail(failure)
            }
        }
    }

    fn start_refresh(
        &mut self,
        shared: &Rc<Shared>,
        call: Callout,
        pending: PendingRefresh,
        now: u64,
        paused: bool,
    ) -> Action {
        let key = pending.coalescing_key();
        // Another worker may already have refreshed this session (and the IdP rotated the
        // refresh token): reuse its answer instead of presenting the old token again.
        // Not one this session already reflects (an IdP that does not rotate refresh tokens
        // answers the same token again and again).
        if let Some(answer) = recent_answer(shared, &pending, &key, now) {
            return self.finish_refresh(pending, key, answer, AnswerFrom::Shared, paused);
        }
        if let Some((RefreshStep::Ended(clear), note)) =
            shared.gate.end_if_refused_earlier(&pending)
        {
            // A revoked cookie replayed over and over costs the IdP one refusal per worker.
            self.note(note);
            self.extra_reply_cookies = clear;
            self.facts = self.facts.without_session();
            return self.run(paused);
        }
        if !shared.refreshes.borrow_mut().lead(key) {
            shared.refreshes.borrow_mut().follow(
                key,
                Follower {
                    context_id: self.id,
                    pending,
                    facts: self.facts.clone(),
                },
            );
            self.waiting = Waiting::RefreshFollower { key };
            return Action::Pause;
        }
        let locked_elsewhere = !shared.cache.borrow().try_lock_refresh(&key, now);
        if locked_elsewhere {
            // Another worker is refreshing this session: wait for its answer, which the root's
            // tick polls for.
            if !raise_tick(shared, Tick::Poll) {
                // This stream registered as the worker's leader for the session: its local
                // followers are answered too, or they would wait for it forever.
                abandon_local(shared, &key, self.now(), self.id);
                return self.fail(Failure::IdpUnavailable);
            }
            shared.remote_waiters.borrow_mut().push(RemoteWaiter {
                follower: Follower {
                    context_id: self.id,
                    pending,
                    facts: self.facts.clone(),
                },
                key,
                deadline: now.saturating_add(REMOTE_WAIT_SECS),
            });
            self.waiting = Waiting::RemoteRefresh { key };
            return Action::Pause;
        }
        // A leader elsewhere may have stored its answer (in the result slot, or a verdict in the
        // session's other lock slot; one left in the slot this lock took, when both held one, is
        // overwritten) and let go between the first look and this worker's lock.
        if let Some(answer) = recent_answer(shared, &pending, &key, now) {
            return self.finish_refresh(pending, key, answer, AnswerFrom::OwnShared, paused);
        }
        // The root context sends the refresh and applies the answer, to this stream as to any
        // other waiting for it: a callout this stream sent would lose its answer if the client
        // left first, and with refresh-token rotation the session would end.
        if !wake_root(shared) {
            // The IdP was not asked: nothing to tell the other workers.
            return self.finish_without_answer(shared, pending, key, true, paused);
        }
        shared.root_calls.borrow_mut().queue(
            call,
            key,
            self.id,
            pending.clone(),
            self.get_current_time(),
        );
        shared.refreshes.borrow_mut().follow(
            key,
            Follower {
                context_id: self.id,
                pending,
                facts: self.facts.clone(),
            },
        );
        self.waiting = Waiting::RefreshFollower { key };
        Action::Pause
    }

    /// Applies a refresh answer to this stream and, when it leads the refresh, to every stream
    /// that waited for it. `paused`: whether this stream's request is paused (it is not while
    /// its request-headers callback runs, and must then not be resumed from inside it).
    fn finish_refresh(
        &mut self,
        pending: PendingRefresh,
        key: [u8; 16],
        answer: RefreshAnswer,
        from: AnswerFrom,
        paused: bool,
    ) -> Action {
        let Some(shared) = self.shared.clone() else {
            return self.fail(Failure::Internal);
        };
        let now = self.now();
        let leading = from.leading();
        // Refused: another worker may have rotated the refresh token a moment ago.
        let rotated_elsewhere = (answer.status != 200)
            .then(|| recent_answer(&shared, &pending, &key, now))
            .flatten()
            .filter(|elsewhere| elsewhere.status == 200);
        let answer = rotated_elsewhere.unwrap_or(answer);
        let jwks = shared.cache.borrow_mut().jwks(now).map(|f| f.value);
        let gate = shared.gate.clone();
        let (step, note) = self.with_keys(
            &shared,
            jwks.as_deref(),
            None,
            now,
            |(step, _)| matches!(step, RefreshStep::NeedKeys),
            |keys| gate.complete_answered_refresh(&pending, &answer, keys, now, &mut HostRandom),
        );
        self.note(note);
        match step {
            // Keys were fetched for this stream already and still none are at hand.
            RefreshStep::NeedKeys if self.keys_fetched => {
                self.finish_without_answer(&shared, pending, key, leading, paused)
            }
            RefreshStep::NeedKeys => {
                let then = AfterKeys::Refresh {
                    pending,
                    key,
                    answer,
                    from,
                };
                self.fetch_jwks(&shared, then, jwks, paused)
            }
            RefreshStep::Forward(fwd) => {
                self.apply_forward(fwd);
                if leading {
                    self.release_as_leader(&shared, &key, &answer, now);
                }
                self.continue_or_resume(paused)
            }
            RefreshStep::Unavailable => {
                if leading {
                    give_up_refresh(&shared, &key, now, self.id);
                }
                self.fail(Failure::IdpUnavailable)
            }
            RefreshStep::Ended(clear) => {
                if leading {
                    self.release_as_leader(&shared, &key, &answer, now);
                }
                self.extra_reply_cookies = clear;
                self.facts = self.facts.without_session();
                self.run(paused)
            }
        }
    }

    /// The leader's end of a refresh with an answer: the cross-worker lock goes (leaving a
    /// refusal or failure for the waiters elsewhere), and this worker's waiting streams get the
    /// answer.
    fn release_as_leader(&self, shared: &Shared, key: &[u8; 16], answer: &RefreshAnswer, now: u64) {
        shared
            .cache
            .borrow()
            .release_refresh(&shared.gate, key, answer);
        release_local(
            shared,
            key,
            answer,
            now,
            self.provider.as_deref(),
            false,
            self.id,
        );
    }

    fn fetch_jwks(
        &mut self,
        shared: &Rc<Shared>,
        then: AfterKeys,
        fallback: Option<Rc<Jwks>>,
        paused: bool,
    ) -> Action {
        let gate = shared.gate.clone();
        let now = self.now();
        let provider = self.known_provider(shared, now).or_else(|| {
            shared
                .cache
                .borrow_mut()
                .provider(&gate.config().issuer, now)
                .map(|f| f.value)
        });
        let Some(provider) = provider else {
            return self.fail_after_keys(shared, then, paused);
        };
        let call = gate.document_request(&provider.jwks_uri);
        match self.dispatch(&gate, &call) {
            Some(token) => {
                self.waiting = Waiting::Jwks {
                    token,
                    started: self.get_current_time(),
                    then,
                };
                Action::Pause
            }
            None => {
                self.keys_fetched = true;
                if fallback.is_some() {
                    self.after_keys(then, paused)
                } else {
                    self.fail_after_keys(shared, then, paused)
                }
            }
        }
    }

    /// No keys to go on with: a 503 (a login's also deletes its login cookie), or for a refresh,
    /// what a refresh with no answer gives (its answer, if any, stays shared for a request that
    /// can check it).
    fn fail_after_keys(&mut self, shared: &Rc<Shared>, then: AfterKeys, paused: bool) -> Action {
        match then {
            AfterKeys::Refresh {
                pending, key, from, ..
            } => self.finish_without_answer(shared, pending, key, from.leading(), paused),
            AfterKeys::Login { pending, .. } => {
                self.fail_login(&pending, Failure::IdpUnavailable, "jwks unavailable")
            }
            AfterKeys::Decide => self.fail(Failure::IdpUnavailable),
        }
    }

    /// A login the glue ends itself: counted, and answered with its login cookie deleted.
    fn fail_login(&mut self, pending: &PendingLogin, f: Failure, reason: &'static str) -> Action {
        self.note(Note::count(crate::flow::Event::LoginFailed(reason)));
        self.reply(pending.failed(f))
    }

    /// A refresh ends with no answer to apply here (the IdP was not asked, or its answer cannot
    /// be checked for want of keys): this stream, and when it leads the refresh the streams
    /// waiting for it, go on with the access token while it is valid and get a retryable 503
    /// after; a login ended meanwhile ends here too.
    fn finish_without_answer(
        &mut self,
        shared: &Rc<Shared>,
        pending: PendingRefresh,
        key: [u8; 16],
        leading: bool,
        paused: bool,
    ) -> Action {
        let now = self.now();
        if leading {
            give_up_refresh(shared, &key, now, self.id);
        }
        match shared.gate.refresh_without_answer(&pending, now) {
            RefreshStep::Forward(fwd) => {
                self.apply_forward(fwd);
                self.continue_or_resume(paused)
            }
            RefreshStep::Ended(clear) => {
                self.extra_reply_cookies = clear;
                self.facts = self.facts.without_session();
                self.run(paused)
            }
            _ => self.fail(Failure::IdpUnavailable),
        }
    }

    fn after_keys(&mut self, then: AfterKeys, paused: bool) -> Action {
        match then {
            AfterKeys::Decide => self.run(paused),
            AfterKeys::Login {
                pending,
                status,
                body,
            } => {
                self.finish_login(pending, status, body);
                Action::Pause
            }
            AfterKeys::Refresh {
                pending,
                key,
                answer,
                from,
            } => self.finish_refresh(pending, key, answer, from, paused),
        }
    }

    fn call_response(
        &self,
        body_size: usize,
        limit: usize,
        started: SystemTime,
    ) -> Option<(u16, Option<Vec<u8>>)> {
        let elapsed = self.get_current_time().duration_since(started).ok();
        host::call_response(
            self.shared.as_ref().map(|s| &s.metrics),
            body_size,
            limit,
            elapsed,
        )
    }

    fn on_discovery(&mut self, body_size: usize, started: SystemTime) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let now = self.now();
        let issuer = shared.gate.config().issuer.clone();
        match self.call_response(body_size, MAX_DOCUMENT_BYTES, started) {
            Some((200, Some(body))) => match ProviderMetadata::parse(&body, &issuer) {
                Ok(meta) => {
                    log::info!(
                        "oidc-gate #{}: discovery document fetched for {issuer}",
                        self.id
                    );
                    let value = shared.cache.borrow_mut().store_provider(&body, meta, now);
                    self.provider = Some(value);
                    self.run(true);
                }
                Err(e) => {
                    log::error!("oidc-gate #{}: discovery document refused: {e}", self.id);
                    self.use_stale_provider_or_fail(&shared, now, true, Failure::IdpInvalid);
                }
            },
            Some((status, _)) => {
                log::error!(
                    "oidc-gate #{}: discovery answered HTTP {status} (or too large)",
                    self.id
                );
                self.use_stale_provider_or_fail(&shared, now, true, Failure::IdpUnavailable);
            }
            None => {
                log::error!(
                    "oidc-gate #{}: discovery callout failed (IdP unreachable or timed out)",
                    self.id
                );
                self.use_stale_provider_or_fail(&shared, now, true, Failure::IdpUnavailable);
            }
        }
    }

    fn on_token(&mut self, pending: PendingLogin, body_size: usize, started: SystemTime) {
        match self.call_response(body_size, MAX_TOKEN_RESPONSE_BYTES, started) {
            None => {
                log::error!(
                    "oidc-gate #{}: token callout failed (IdP unreachable or timed out)",
                    self.id
                );
                self.fail_login(&pending, Failure::IdpUnavailable, "idp unreachable");
            }
            Some((status, None)) => {
                log::error!(
                    "oidc-gate #{}: token endpoint answered HTTP {status} with an oversized body",
                    self.id
                );
                self.fail_login(&pending, Failure::IdpInvalid, "token exchange");
            }
            Some((status, Some(body))) => self.finish_login(pending, status, body),
        }
    }

    fn finish_login(&mut self, pending: PendingLogin, status: u16, body: Vec<u8>) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let now = self.now();
        let cached = shared.cache.borrow_mut().jwks(now);
        // A set past its refresh time is fetched again first, under the process-wide claim
        // (`run` does the same).
        let (jwks, stale_jwks) = match &cached {
            Some(f) if !f.stale || self.keys_fetched => (Some(f.value.clone()), None),
            Some(f) => (None, Some(f.value.clone())),
            None => (None, None),
        };
        let gate = shared.gate.clone();
        let (step, note) = self.with_keys(
            &shared,
            jwks.as_deref(),
            stale_jwks.as_deref(),
            now,
            |(step, _)| matches!(step, LoginStep::NeedKeys),
            |keys| gate.complete_login(&pending, status, &body, keys, now, &mut HostRandom),
        );
        self.note(note);
        match step {
            LoginStep::Done(reply) => {
                self.reply(reply);
            }
            LoginStep::NeedKeys if self.keys_fetched => {
                self.fail_login(&pending, Failure::IdpUnavailable, "jwks unavailable");
            }
            LoginStep::NeedKeys => {
                let then = AfterKeys::Login {
                    pending,
                    status,
                    body,
                };
                // After the token callout: the request is paused.
                self.fetch_jwks(&shared, then, cached.map(|f| f.value), true);
            }
        }
    }

    fn on_jwks(&mut self, then: AfterKeys, body_size: usize, started: SystemTime) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let now = self.now();
        self.keys_fetched = true;
        let answer = self.call_response(body_size, MAX_DOCUMENT_BYTES, started);
        self.keys_fetched_ok = store_fetched_jwks(&shared, answer, now, self.id);
        let have_keys = shared.cache.borrow_mut().jwks(now).is_some();
        // After the JWKS callout: the request is paused.
        if have_keys {
            self.after_keys(then, true);
        } else {
            self.fail_after_keys(&shared, then, true);
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
            Waiting::Discovery { token, started } if token == token_id => {
                self.on_discovery(body_size, started)
            }
            Waiting::Token {
                token,
                started,
                pending,
            } if token == token_id => self.on_token(pending, body_size, started),
            Waiting::Jwks {
                token,
                started,
                then,
            } if token == token_id => self.on_jwks(then, body_size, started),
            other => {
                log::warn!(
                    "oidc-gate #{}: ignoring an unexpected callout answer",
                    self.id
                );
                self.waiting = other;
            }
        }
    }

    fn on_done(&mut self) -> bool {
        timing::end(Stage::LogToDone);
        let done = self.done();
        timing::end(Stage::Done);
        done
    }
}

impl Stream {
    fn done(&mut self) -> bool {
        let Some(shared) = self.shared.clone() else {
            return true;
        };
        match std::mem::replace(&mut self.waiting, Waiting::Nothing) {
            Waiting::RefreshFollower { key } => shared.refreshes.borrow_mut().forget(&key, self.id),
            // The leader's client went away before the keys for an answer from shared data
            // came. Waiting streams must not hang: they go on with a still-valid access token,
            // or get a retryable 503. (A refresh the IdP is asked for belongs to the root
            // context and goes on without its stream.)
            Waiting::Jwks {
                then:
                    AfterKeys::Refresh {
                        key,
                        from: AnswerFrom::OwnShared,
                        ..
                    },
                ..
            } => give_up_refresh(&shared, &key, self.now(), self.id),
            Waiting::RemoteRefresh { key } => {
                let mut waiters = shared.remote_waiters.borrow_mut();
                let before = waiters.len();
                waiters.retain(|w| w.follower.context_id != self.id);
                let still_waiting = waiters.len() != before;
                drop(waiters);
                // Requests of this worker that waited on this one must not hang either. Once
                // the root's poll answered it (it cannot reset this state), they were answered
                // too, and the key may belong to a newer refresh of the session by now.
                if still_waiting {
                    abandon_local(&shared, &key, self.now(), self.id);
                }
            }
            _ => {}
        }
        let mut refreshes = shared.refreshes.borrow_mut();
        // Empty but for a refresh in flight: no hashing on the common path.
        if !refreshes.response_cookies.is_empty() {
            refreshes.response_cookies.remove(&self.id);
        }
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        timing::end(Stage::CreateToRequest);
        let action = self.request_headers(end_of_stream);
        timing::end(Stage::Act);
        action
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.request_trailers()
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        timing::end(Stage::RequestToResponse);
        let action = self.response_headers();
        timing::end(Stage::Response);
        action
    }

    fn on_log(&mut self) {
        timing::end(Stage::ResponseToLog);
    }
}

impl Stream {
    fn request_headers(&mut self, end_of_stream: bool) -> Action {
        let gate = self.shared.as_ref().map(|s| s.gate.clone());
        // One read of the header map serves every decision (each host call costs more than the
        // work the filter does per request).
        let Some(facts) = self.gather(gate.as_deref()) else {
            log::error!(
                "oidc-gate #{}: the host did not give the request headers; refusing the request",
                self.id
            );
            return self.fail(Failure::Internal);
        };
        self.facts = facts;
        self.facts.has_body = !end_of_stream;
        if gate
            .as_ref()
            .is_some_and(|g| !g.config().protects(self.facts.authority()))
        {
            // Hosts this policy does not list pass untouched.
            return Action::Continue;
        }
        if self.facts.unremovable_identity_header {
            log::warn!(
                "oidc-gate #{}: an identity header whose name is not UTF-8 cannot be removed; \
                 refusing the request",
                self.id
            );
            return self.fail(Failure::BadRequest);
        }
        self.strip_identity_headers();
        if let Some(g) = &gate {
            self.hide_callback_query(g);
        }
        self.run(false)
    }

    /// Trailers reach an HTTP/2 upstream after the headers (gRPC sends them): what the headers
    /// may not carry upstream, identity headers, `Authorization` and cookies, is removed from
    /// them too. Only requests with trailers come here.
    fn request_trailers(&mut self) -> Action {
        let Some(gate) = self.shared.as_ref().map(|s| s.gate.clone()) else {
            return Action::Continue;
        };
        if self.replied || !gate.config().protects(self.facts.authority()) {
            return Action::Continue;
        }
        let Some(trailers) = HeaderMapBytes::request_trailers() else {
            log::error!(
                "oidc-gate #{}: the host did not give the request trailers; refusing the request",
                self.id
            );
            return self.fail(Failure::Internal);
        };
        let mut remove = Vec::new();
        for (name, _) in trailers.pairs() {
            if name == b"authorization"
                || name == b"cookie"
                || is_identity_header(gate.config(), name)
            {
                match std::str::from_utf8(name) {
                    Ok(name) => remove.push(name.to_string()),
                    Err(_) => {
                        log::warn!(
                            "oidc-gate #{}: a trailer whose name is not UTF-8 cannot be removed; \
                             refusing the request",
                            self.id
                        );
                        return self.fail(Failure::BadRequest);
                    }
                }
            }
        }
        for name in remove {
            self.set_http_request_trailer(&name, None);
        }
        Action::Continue
    }

    fn response_headers(&mut self) -> Action {
        if self.replied {
            return Action::Continue;
        }
        let mut cookies = std::mem::take(&mut self.response_cookies);
        if let Some(shared) = &self.shared {
            let mut refreshes = shared.refreshes.borrow_mut();
            // Empty but for a refresh in flight: no hashing on the common path.
            if !refreshes.response_cookies.is_empty() {
                if let Some(c) = refreshes.response_cookies.remove(&self.id) {
                    cookies.extend(c);
                }
            }
        }
        if !cookies.is_empty() {
            // A response that carries a refreshed session must not be cached by anyone.
            self.set_http_response_header("cache-control", Some("no-store"));
        }
        for cookie in cookies {
            self.add_http_response_header("set-cookie", &cookie);
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::header_map::serialise;
    use crate::config::Config;

    fn gate() -> Gate {
        let config = serde_json::json!({
            "issuer": "https://idp.example.com",
            "idp_cluster": "idp",
            "client_id": "gate",
            "client_secret": "s",
            "cookie_secret": "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=",
            "hosts": ["app.example.com"],
        });
        Gate::new(Config::parse(config.to_string().as_bytes(), &|_| None).unwrap())
    }

    fn read(pairs: &[(&[u8], &[u8])]) -> Facts {
        Facts::read(HeaderMapBytes::from_bytes(serialise(pairs)), Some(&gate()))
    }

    const REQUEST: &[(&[u8], &[u8])] = &[
        (b":authority", b"app.example.com"),
        (b":path", b"/a?b=c"),
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b"cookie", b"theme=dark; __Host-oidc-gate=abc"),
        (b"cookie", b"lang=en"),
        (b"authorization", b"Bearer t"),
        (b"accept", b"text/html"),
        (b"sec-fetch-dest", b"document"),
        (b"sec-fetch-mode", b"navigate"),
        (b"sec-fetch-site", b"cross-site"),
        (b"origin", b"https://app.example.com"),
        (b"access-control-request-method", b"PUT"),
        (b"x-request-id", b"rid-1"),
        (b"x-forwarded-user", b"mallory"),
        (b"x-forwarded-proto", b"http"),
    ];

    #[test]
    fn reads_every_fact_from_the_header_map() {
        let f = read(REQUEST);
        let r = f.request();
        assert_eq!(r.authority, "app.example.com");
        assert_eq!(r.path, "/a?b=c");
        assert_eq!(r.method, "GET");
        assert_eq!(r.scheme, "http", "x-forwarded-proto wins over :scheme");
        assert_eq!(
            r.cookie_headers,
            ["theme=dark; __Host-oidc-gate=abc", "lang=en"]
        );
        assert_eq!(r.authorization, ["Bearer t"]);
        assert_eq!(r.accept, Some("text/html"));
        assert!(r.has_sec_fetch);
        assert_eq!(r.sec_fetch_mode, Some("navigate"));
        assert_eq!(r.sec_fetch_site, Some("cross-site"));
        assert_eq!(r.origin, Some("https://app.example.com"));
        assert_eq!(r.access_control_request_method, Some("PUT"));
        assert_eq!(r.request_id, Some("rid-1"));
        assert_eq!(f.identity_headers, ["x-forwarded-user"]);
        assert!(f.already(&f.authorization, Some("Bearer t")));
        assert!(!f.already(&f.authorization, Some("Bearer u")));
        assert!(!f.already(&f.cookies, Some("lang=en")), "two headers sent");
    }

    #[test]
    fn an_identity_header_that_cannot_be_named_to_the_host_is_flagged() {
        assert!(!read(REQUEST).unremovable_identity_header);
        let mut pairs = REQUEST.to_vec();
        pairs.push((b"x-auth-request-\xffuser", b"mallory"));
        pairs.push((b"x-\xff", b"not one of ours"));
        let f = read(&pairs);
        assert!(f.unremovable_identity_header);
        assert_eq!(f.identity_headers, ["x-forwarded-user"]);
        let mut pairs = REQUEST.to_vec();
        pairs.push((b"x-\xff", b"not one of ours"));
        assert!(!read(&pairs).unremovable_identity_header);
    }

    #[test]
    fn bytes_that_are_not_utf8_touch_only_their_own_value() {
        // Another header's odd bytes leave every value exact.
        let mut pairs = REQUEST.to_vec();
        pairs.insert(2, (b"x-note", b"caf\xe9 \xff"));
        let f = read(&pairs);
        assert_eq!(
            format!("{:?}", f.request()),
            format!("{:?}", read(REQUEST).request())
        );
        assert_eq!(f.identity_headers, ["x-forwarded-user"]);
        // Also once the session ended (the spans the client's cookies keep are rebuilt too).
        let ended = read(REQUEST).without_session();
        let f = Facts {
            text: String::new(),
            ..ended.clone()
        }
        .with_lossy_text(ended.text.as_bytes());
        assert_eq!(
            format!("{:?}", f.request()),
            format!("{:?}", ended.request())
        );
        assert_eq!(
            f.at_each(f.sent_cookies()),
            ended.at_each(ended.sent_cookies())
        );

        // In a value of ours they become U+FFFD, which no session or token contains.
        let f = read(&[
            (b":authority", b"app.example.com"),
            (b"cookie", b"__Host-oidc-gate=a\xffb"),
            (b"authorization", b"Bearer \xfe"),
        ]);
        let r = f.request();
        assert_eq!(r.authority, "app.example.com");
        assert_eq!(r.cookie_headers, ["__Host-oidc-gate=a\u{fffd}b"]);
        assert_eq!(r.authorization, ["Bearer \u{fffd}"]);
    }

    #[test]
    fn without_session_keeps_the_other_cookies_and_facts() {
        let f = read(REQUEST).without_session();
        let r = f.request();
        assert_eq!(r.cookie_headers, ["theme=dark", "lang=en"]);
        assert_eq!(r.path, "/a?b=c");
        assert_eq!(r.authorization, ["Bearer t"]);
        // Forwarding still replaces what the client sent, so our cookie cannot slip through.
        assert_eq!(
            f.at_each(f.sent_cookies()),
            ["theme=dark; __Host-oidc-gate=abc", "lang=en"]
        );
    }

    #[test]
    fn a_forward_after_the_session_ended_still_removes_our_cookie() {
        // The client's only Cookie header held the ended session: the engine sees none, and a
        // forward without a Cookie (a valid bearer token, say) must still remove the header.
        let f = read(&[
            (b":authority", b"app.example.com"),
            (b"cookie", b"__Host-oidc-gate=ended"),
        ])
        .without_session();
        assert!(f.request().cookie_headers.is_empty());
        assert!(!f.already(f.sent_cookies(), None));
        assert_eq!(f.sent_cookies().len(), 1);
        // Ending twice keeps the client's headers, not the first ending's.
        let twice = f.without_session();
        assert_eq!(
            twice.at_each(twice.sent_cookies()),
            ["__Host-oidc-gate=ended"]
        );
    }

    #[test]
    fn a_malformed_or_empty_map_reads_as_a_request_without_headers() {
        let f = Facts::read(HeaderMapBytes::from_bytes(vec![9, 0, 0, 0, 1]), None);
        let r = f.request();
        assert_eq!((r.authority, r.path, r.method), ("", "", ""));
        assert!(r.cookie_headers.is_empty());
        assert_eq!(r.scheme, "https");
    }

    // Host stubs so the glue links natively (no host: calls succeed; shared data is this test
    // thread's own, with Envoy's compare-and-swap rules).
    #[allow(unsafe_code)]
    mod host_stubs {
        use std::collections::HashMap;

        /// A key's value and its CAS, which every write advances.
        type SharedData = HashMap<Vec<u8>, (Vec<u8>, u32)>;

        unsafe fn bytes<'a>(data: *const u8, size: usize) -> &'a [u8] {
            if size == 0 {
                &[]
            } else {
                unsafe { std::slice::from_raw_parts(data, size) }
            }
        }

        #[no_mangle]
        extern "C" fn proxy_get_shared_data(
            key: *const u8,
            key_size: usize,
            data: *mut *mut u8,
            size: *mut usize,
            cas: *mut u32,
        ) -> u32 {
            let key = unsafe { bytes(key, key_size) };
            let Some((value, at)) = SHARED.with(|m| m.borrow().get(key).cloned()) else {
                return 1;
            };
            // As Envoy (proxy-wasm-cpp-host's copyToPointerSize): an empty value is handed over
            // as no bytes at all.
            unsafe {
                *size = value.len();
                *data = if value.is_empty() {
                    std::ptr::null_mut()
                } else {
                    Box::into_raw(value.into_boxed_slice()).cast::<u8>()
                };
                *cas = at;
            }
            0
        }
        #[no_mangle]
        extern "C" fn proxy_set_shared_data(
            key: *const u8,
            key_size: usize,
            value: *const u8,
            value_size: usize,
            cas: u32,
        ) -> u32 {
            let key = unsafe { bytes(key, key_size) }.to_vec();
            let value = unsafe { bytes(value, value_size) }.to_vec();
            LAST_SET_CAS.with(|c| c.set(cas));
            let status = SHARED.with(|m| {
                let mut m = m.borrow_mut();
                let current = m.get(&key).map_or(0, |(_, at)| *at);
                if cas != 0 && cas != current {
                    return 8;
                }
                m.insert(key.clone(), (value, current + 1));
                0
            });
            if status == 0 {
                // Taken out while it runs: what it writes does not call it again.
                if let Some(mut hook) = AFTER_WRITE.with(|h| h.borrow_mut().take()) {
                    hook(&key);
                    AFTER_WRITE.with(|h| *h.borrow_mut() = Some(hook));
                }
            }
            status
        }
        /// Called with the key of each shared-data write that succeeded.
        pub type WriteHook = Box<dyn FnMut(&[u8])>;
        thread_local! {
            /// This test thread's shared data.
            pub static SHARED: std::cell::RefCell<SharedData> = std::cell::RefCell::new(HashMap::new());
            /// Whether a paused request was resumed.
            pub static RESUMED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
            /// The last `authorization` request header the glue set.
            pub static AUTHORIZATION_SET: std::cell::RefCell<Option<Vec<u8>>> = const { std::cell::RefCell::new(None) };
            /// The CAS the last shared-data write asked for (0: none).
            pub static LAST_SET_CAS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
            /// The status of the last local reply this thread's test sent.
            pub static LAST_REPLY: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
            /// The headers of that reply, serialised as the SDK sends them.
            pub static LAST_REPLY_HEADERS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
            /// The `:status` of the callout answer the host hands over.
            pub static STATUS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
            /// The last callout token the host gave (the first is 100).
            pub static LAST_TOKEN: std::cell::Cell<u32> = const { std::cell::Cell::new(99) };
            /// How often the root told the host it is done.
            pub static DONE: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
            /// Messages put on a shared queue.
            pub static WAKES: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
            /// The tick periods set, in milliseconds.
            pub static TICKS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
            /// The body of that answer.
            pub static BODY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
            /// The host clock, in nanoseconds.
            pub static NOW_NS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
            /// What another worker does the moment this one writes a shared-data key.
            pub static AFTER_WRITE: std::cell::RefCell<Option<WriteHook>> = std::cell::RefCell::new(None);
            /// Whether the host refuses callouts (an unknown cluster, no endpoints yet).
            pub static CALLOUTS_REFUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        }
        #[no_mangle]
        extern "C" fn proxy_send_local_response(
            status: u32,
            _: *const u8,
            _: usize,
            _: *const u8,
            _: usize,
            headers: *const u8,
            headers_size: usize,
            _: i32,
        ) -> u32 {
            let headers = unsafe { bytes(headers, headers_size) }.to_vec();
            LAST_REPLY_HEADERS.with(|h| *h.borrow_mut() = headers);
            LAST_REPLY.with(|r| r.set(status));
            0
        }
        #[no_mangle]
        extern "C" fn proxy_set_effective_context(_: u32) -> u32 {
            0
        }
        #[no_mangle]
        extern "C" fn proxy_define_metric(_: u32, _: *const u8, _: usize, _: *mut u32) -> u32 {
            0
        }
        #[no_mangle]
        extern "C" fn proxy_replace_header_map_value(
            _: u32,
            name: *const u8,
            name_size: usize,
            value: *const u8,
            value_size: usize,
        ) -> u32 {
            let name = unsafe { bytes(name, name_size) };
            if name == b"authorization" {
                let value = unsafe { bytes(value, value_size) };
                AUTHORIZATION_SET.with(|a| *a.borrow_mut() = Some(value.to_vec()));
            }
            0
        }
        #[no_mangle]
        extern "C" fn proxy_remove_header_map_value(_: u32, _: *const u8, _: usize) -> u32 {
            0
        }
        #[no_mangle]
        extern "C" fn proxy_increment_metric(_: u32, _: i64) -> u32 {
            0
        }
        #[no_mangle]
        extern "C" fn proxy_continue_stream(_: u32) -> u32 {
            RESUMED.with(|r| r.set(true));
            0
        }
        #[no_mangle]
        extern "C" fn proxy_get_header_map_pairs(
            _: u32,
            data: *mut *mut u8,
            size: *mut usize,
        ) -> u32 {
            let status = STATUS.with(|s| s.borrow().clone());
            let buf = super::serialise(&[(b":status", &status)]);
            let b = buf.into_boxed_slice();
            unsafe {
                *size = b.len();
                *data = Box::into_raw(b).cast::<u8>();
            }
            0
        }
        #[no_mangle]
        extern "C" fn proxy_get_current_time_nanoseconds(t: *mut u64) -> u32 {
            unsafe { *t = NOW_NS.with(std::cell::Cell::get) };
            0
        }
        #[no_mangle]
        extern "C" fn proxy_record_metric(_: u32, _: u64) -> u32 {
            0
        }
        #[no_mangle]
        extern "C" fn proxy_get_buffer_bytes(
            _: u32,
            _: usize,
            _: usize,
            d: *mut *mut u8,
            n: *mut usize,
        ) -> u32 {
            let body = BODY.with(|b| b.borrow().clone());
            if body.is_empty() {
                unsafe {
                    *d = std::ptr::null_mut();
                    *n = 0;
                }
                return 1;
            }
            let b = body.into_boxed_slice();
            unsafe {
                *n = b.len();
                *d = Box::into_raw(b).cast::<u8>();
            }
            0
        }
        #[no_mangle]
        extern "C" fn proxy_add_header_map_value(
            map: u32,
            name: *const u8,
            name_size: usize,
            value: *const u8,
            value_size: usize,
        ) -> u32 {
            proxy_replace_header_map_value(map, name, name_size, value, value_size)
        }
        #[no_mangle]
        extern "C" fn proxy_done() -> u32 {
            DONE.with(|d| d.set(d.get() + 1));
            0
        }
        #[no_mangle]
        extern "C" fn proxy_register_shared_queue(_: *const u8, _: usize, q: *mut u32) -> u32 {
            // Queue 0, which enqueueing does not find (NotFound): the tick fallback.
            unsafe { *q = 0 };
            0
        }
        #[no_mangle]
        extern "C" fn proxy_dequeue_shared_queue(_: u32, _: *mut *mut u8, _: *mut usize) -> u32 {
            // Status::Empty.
            7
        }
        #[no_mangle]
        extern "C" fn proxy_enqueue_shared_queue(queue: u32, _: *const u8, _: usize) -> u32 {
            if queue == 0 {
                // Status::NotFound: no such queue.
                return 1;
            }
            WAKES.with(|w| w.set(w.get() + 1));
            0
        }
        #[no_mangle]
        extern "C" fn proxy_set_tick_period_milliseconds(period: u32) -> u32 {
            TICKS.with(|t| t.borrow_mut().push(period));
            0
        }
        #[no_mangle]
        extern "C" fn proxy_http_call(
            _: *const u8,
            _: usize,
            _: *const u8,
            _: usize,
            _: *const u8,
            _: usize,
            _: *const u8,
            _: usize,
            _: u32,
            t: *mut u32,
        ) -> u32 {
            if CALLOUTS_REFUSED.with(std::cell::Cell::get) {
                // Status::BadArgument, as Envoy answers for a cluster it does not have.
                return 2;
            }
            // A new token each time: the SDK refuses a token it already holds.
            let token = LAST_TOKEN.with(|l| {
                l.set(l.get() + 1);
                l.get()
            });
            unsafe { *t = token };
            0
        }
    }

    #[test]
    fn the_jwks_refetch_claim_is_a_compare_and_swap_from_the_first_claim_on() {
        use crate::abi::cache::{IdpCache, JWKS_REFETCH_INTERVAL_SECS};
        let cache = IdpCache::new("https://idp.example", "idp", "gate");
        cache.init_shared_slots();
        assert!(cache.claim_jwks_refetch(1_000));
        assert_ne!(
            host_stubs::LAST_SET_CAS.with(std::cell::Cell::get),
            0,
            "a claim without CAS wins even when another VM claimed at the same moment"
        );
        // Another VM configured later must not reset the claim.
        IdpCache::new("https://idp.example", "idp", "gate").init_shared_slots();
        assert!(!cache.claim_jwks_refetch(1_000 + JWKS_REFETCH_INTERVAL_SECS - 1));
        assert!(cache.claim_jwks_refetch(1_000 + JWKS_REFETCH_INTERVAL_SECS));
    }

    // Found in review: Envoy hands an existing empty value over as no bytes with a CAS, and
    // every VM that configured wrote an empty value without a CAS over every empty slot: a lock
    // another VM took between that read and write was erased.
    #[test]
    fn configuring_again_writes_nothing_over_existing_slots() {
        use super::super::ended::SharedEndings;
        use crate::abi::cache::IdpCache;
        let configure = || {
            IdpCache::new("https://idp.example", "idp", "gate").init_shared_slots();
            SharedEndings::new("https://idp.example", "gate").init();
        };
        configure();
        assert_eq!(
            host_stubs::SHARED.with(|m| m.borrow().len()),
            2 * 1024 + 3,
            "1,024 lock and 1,024 result slots, the JWKS and discovery refetch claims and the ended logins"
        );
        host_stubs::LAST_SET_CAS.with(|c| c.set(12_345));
        configure();
        assert_eq!(
            host_stubs::LAST_SET_CAS.with(std::cell::Cell::get),
            12_345,
            "a write without CAS over a slot that exists"
        );
    }

    // Found in review: a request waiting on another worker's refresh waited past its 10 s for as
    // long as the host clock had been set back.
    #[test]
    fn a_wait_on_another_worker_ends_when_the_clock_was_set_back() {
        use super::super::refresh::poll_remote;
        host_stubs::SHARED.with(|m| m.borrow_mut().clear());
        let (worker_a, _, key) = refreshing();
        worker_a.cache.borrow().init_shared_slots();
        assert!(
            worker_a.cache.borrow().try_lock_refresh(&key, VALID),
            "worker A leads"
        );
        let (g, _) = crate::flow::tests::a_due_refresh();
        let worker_b = shared_for(g);
        let mut outcomes = Vec::new();
        // A deadline within one wait, one set before the clock went back a second, and one set
        // before it went back 15 minutes.
        for deadline in [VALID + 10, VALID + 11, VALID + 900] {
            let (_, pending) = crate::flow::tests::a_due_refresh();
            worker_b.remote_waiters.borrow_mut().clear();
            wait_elsewhere(
                &worker_b,
                pending,
                api_call_facts(&worker_b.gate),
                key,
                deadline,
            );
            outcomes.push(outcome_of(|| poll_remote(&worker_b, VALID, 1)));
        }
        assert_eq!(
            outcomes,
            [
                Outcome::Waiting,
                Outcome::Waiting,
                Outcome::Forwarded(OLD_TOKEN.into())
            ]
        );
    }

    // Found in review: a lock stamped by a clock later set back stayed live for as long as the
    // clock went back (plus its 10 s), holding every refresh of the session if its holder died.
    #[test]
    fn a_refresh_lock_from_before_the_clock_was_set_back_is_stale() {
        use crate::abi::cache::IdpCache;
        let a = IdpCache::new("https://idp.example", "idp", "gate");
        let b = IdpCache::new("https://idp.example", "idp", "gate");
        a.init_shared_slots();
        b.init_shared_slots();
        let key = [9u8; 16];
        assert!(a.try_lock_refresh(&key, 1_000));
        assert!(!b.try_lock_refresh(&key, 1_005), "live within its 10 s");
        assert!(
            !b.try_lock_refresh(&key, 995),
            "a few seconds back: still live"
        );
        assert!(
            b.try_lock_refresh(&key, 100),
            "set back by 15 minutes: stale"
        );
    }

    #[test]
    fn a_refresh_lock_is_one_clients() {
        use crate::abi::cache::IdpCache;
        let a = IdpCache::new("https://idp.example", "idp", "app-a");
        let b = IdpCache::new("https://idp.example", "idp", "app-b");
        a.init_shared_slots();
        b.init_shared_slots();
        let key = [7u8; 16];
        assert!(a.try_lock_refresh(&key, 1_000));
        assert!(
            b.try_lock_refresh(&key, 1_000),
            "another client's refresh in the same slot waits for nothing it could use"
        );
        // The same client behind another cluster holds the same refresh tokens.
        let a_elsewhere = IdpCache::new("https://idp.example", "idp-2", "app-a");
        a_elsewhere.init_shared_slots();
        assert!(!a_elsewhere.try_lock_refresh(&key, 1_000));
    }

    #[test]
    fn a_refresh_answer_shared_with_the_other_workers_holds_no_token_in_the_clear() {
        let (shared, _, key) = refreshing();
        let body = br#"{"access_token":"access-secret-2","refresh_token":"refresh-secret-2"}"#;
        let cache = shared.cache.borrow();
        let answer = RefreshAnswer {
            status: 200,
            body: body.to_vec(),
            at: 1_000,
        };
        cache.store_refresh_result(&shared.gate, &key, &answer, 0);
        let stored: Vec<Vec<u8>> =
            host_stubs::SHARED.with(|m| m.borrow().values().map(|(v, _)| v.clone()).collect());
        assert_eq!(stored.len(), 1);
        let text = String::from_utf8_lossy(&stored[0]);
        assert!(!text.contains("secret-2"), "tokens in shared data: {text}");
        assert_eq!(
            cache.refresh_result(&shared.gate, &key, 1_010),
            Some(answer)
        );
        // The time it came is sealed with it: moved on in shared data, it no longer opens.
        host_stubs::SHARED.with(|m| {
            for (v, _) in m.borrow_mut().values_mut() {
                v[16..24].copy_from_slice(&1_050u64.to_be_bytes());
            }
        });
        assert_eq!(cache.refresh_result(&shared.gate, &key, 1_070), None);
    }

    // Found in review: a refresh the IdP refused on one worker stored nothing, so the requests
    // of that session waiting on another worker saw "let go, no answer" and went upstream with
    // the old token. Every answer the IdP gives is now shared; they get its verdict.
    #[test]
    fn a_refusal_on_one_worker_reaches_the_requests_waiting_on_another() {
        let (worker_a, pending, key) = refreshing();
        assert_eq!(
            refused_at_the_idp(&worker_a, pending, key),
            Outcome::Answered(401),
            "the leader's own request is refused"
        );

        assert_eq!(waiting_on_another_worker(key), Outcome::Answered(401));
    }

    // Found in review: another session's fresh tokens keep a refusal out of the shared result
    // slot (so that no client can evict them by provoking refusals); the refused session's
    // requests waiting on other workers get the refusal from the lock slot its leader released.
    #[test]
    fn a_refusal_kept_out_of_the_result_slot_still_reaches_the_waiters() {
        let (worker_a, key, other, tokens) = refused_with_another_sessions_tokens_kept();
        assert_eq!(
            worker_a
                .cache
                .borrow()
                .refresh_result(&worker_a.gate, &other, VALID),
            Some(tokens),
            "the other session's tokens stay"
        );
        // A request of the session waiting on worker B.
        assert_eq!(waiting_on_another_worker(key), Outcome::Answered(401));
    }

    // Found in review: a new lock took the first free slot even when it held another session's
    // released verdict, which that session's later requests would have read.
    #[test]
    fn a_lock_leaves_another_sessions_verdict_when_its_other_slot_is_free() {
        let (worker_a, key, _, _) = refused_with_another_sessions_tokens_kept();
        assert!(worker_a
            .cache
            .borrow()
            .refresh_verdict(&worker_a.gate, &key, VALID)
            .is_some());
        // Another session whose first lock slot is the one the verdict lies in.
        let mut other = key;
        other[2] ^= 0x55;
        assert!(worker_a.cache.borrow().try_lock_refresh(&other, VALID));
        assert!(worker_a.cache.borrow().refresh_locked(&other, VALID));
        assert!(
            worker_a
                .cache
                .borrow()
                .refresh_verdict(&worker_a.gate, &key, VALID)
                .is_some(),
            "the verdict stays"
        );
    }

    // Found in review: a refusal kept out of the result slot reached only the requests already
    // waiting; a later request of the session on another worker presented the refused token to
    // the IdP again.
    #[test]
    fn a_refusal_left_in_the_lock_slot_reaches_later_requests_on_other_workers() {
        refused_with_another_sessions_tokens_kept();
        // A later request of the session on worker B.
        let (g, pending) = crate::flow::tests::a_due_refresh();
        let worker_b = shared_for(g);
        let mut stream = Stream::new(8, Some(worker_b.clone()));
        stream.facts = api_call_facts(&worker_b.gate);
        let call = token_callout();
        let outcome = outcome_of(|| {
            stream.start_refresh(&worker_b, call, pending, VALID, true);
        });
        assert_eq!(outcome, Outcome::Answered(401));
        assert_eq!(
            worker_b.root_calls.borrow().queued(),
            0,
            "the IdP was asked"
        );
    }

    // Found in review: an answer reused from shared data was stored again with the time of its
    // reuse, so replaying the old cookie kept it alive past its 60 s.
    #[test]
    fn a_reused_refresh_answer_keeps_the_time_the_idp_gave_it() {
        let (shared, pending, key) = refreshing();
        share_a_rotating_answer(&shared, &key);
        let mut reuser = Stream::new(7, Some(shared.clone()));
        reuser.facts = api_call_facts(&shared.gate);
        host_stubs::NOW_NS.with(|t| t.set(VALID * 1_000_000_000));
        let outcome = outcome_of(|| {
            let reused = shared
                .cache
                .borrow()
                .refresh_result(&shared.gate, &key, VALID)
                .unwrap();
            reuser.finish_refresh(pending, key, reused, AnswerFrom::Shared, true);
        });
        assert_eq!(outcome, Outcome::Forwarded("Bearer access-2".into()));
        let kept = shared
            .cache
            .borrow()
            .refresh_result(&shared.gate, &key, VALID)
            .unwrap();
        assert_eq!(kept.at, VALID - 10);
    }

    // Found in review: a leader whose refreshed ID token needed keys it could not get (the JWKS
    // fetch failed, a cold cache) fed itself a made-up 503: under end_session that ended the
    // session though the IdP had answered, and with the IdP's own answer already shared it went
    // back to fetching keys again and again. It now ends as a refresh without answer does.
    #[test]
    fn a_leader_that_cannot_get_keys_for_the_answer_goes_on_as_without_answer() {
        for (now, expected) in as_without_an_answer() {
            let (shared, pending, key) = refreshing();
            assert!(shared.refreshes.borrow_mut().lead(key));
            let answer = RefreshAnswer {
                status: 200,
                body: br#"{"access_token":"access-2","token_type":"Bearer","expires_in":300,"id_token":"a.b.c"}"#.to_vec(),
                at: now,
            };
            // Shared when it came, as finish_refresh does with its own answer.
            shared
                .cache
                .borrow()
                .store_refresh_result(&shared.gate, &key, &answer, 0);
            let mut leader = leader_waiting_for_keys(&shared, pending, key, answer);
            host_stubs::STATUS.with(|s| *s.borrow_mut() = b"500".to_vec());
            host_stubs::NOW_NS.with(|t| t.set(now * 1_000_000_000));
            let outcome = outcome_of(|| leader.on_http_call_response(1, 1, 0, 0));
            assert_eq!(outcome, expected, "at {now}");
            assert!(
                matches!(leader.waiting, Waiting::Nothing),
                "at {now}: the leader fetches keys again"
            );
            assert!(
                shared.refreshes.borrow_mut().lead(key),
                "at {now}: the refresh is released"
            );
        }
    }

    // Found in review: with an IdP that does not rotate refresh tokens, a session due again
    // within a minute found its own earlier answer in shared data and reused it instead of
    // asking the IdP (forwarding its token again, expired or not).
    #[test]
    fn a_session_does_not_reuse_an_answer_it_already_holds() {
        // 60 s tokens from NOW (1_800_000_000): due from NOW + 30, within the minute an answer
        // is shared.
        const DUE: u64 = 1_800_000_035;
        let (g, pending) = crate::flow::tests::a_due_refresh_of_tokens_living(60, DUE);
        let key = pending.coalescing_key();
        let shared = shared_for(g);
        // The session's tokens came at NOW from this very answer.
        let answer = RefreshAnswer {
            status: 200,
            body: br#"{"access_token":"access-abc","token_type":"Bearer","expires_in":60}"#
                .to_vec(),
            at: 1_800_000_000,
        };
        shared
            .cache
            .borrow()
            .store_refresh_result(&shared.gate, &key, &answer, 0);
        let mut stream = Stream::new(7, Some(shared.clone()));
        stream.facts = api_call_facts(&shared.gate);
        host_stubs::NOW_NS.with(|t| t.set(DUE * 1_000_000_000));
        let call = token_callout();
        stream.start_refresh(&shared, call, pending, DUE, true);
        assert_eq!(shared.root_calls.borrow().queued(), 1, "the IdP is asked");
    }

    // Found in review: a refusal or failure for a refresh token could overwrite the new tokens
    // another worker had got for it, and "the IdP did not answer" was kept as long as a verdict.
    #[test]
    fn shared_tokens_outlast_later_failures_and_failures_are_kept_briefly() {
        let (shared, _, key) = refreshing();
        let cache = shared.cache.borrow();
        let answer = |status: u16, at: u64| RefreshAnswer {
            status,
            body: br#"{"access_token":"a2","token_type":"Bearer"}"#.to_vec(),
            at,
        };
        cache.store_refresh_result(&shared.gate, &key, &answer(200, 1_000), 0);
        for status in [400, 503] {
            cache.store_refresh_result(&shared.gate, &key, &answer(status, 1_001), 0);
        }
        assert_eq!(
            cache.refresh_result(&shared.gate, &key, 1_059),
            Some(answer(200, 1_000))
        );
        // Unless the session refused already held those tokens: an IdP that does not rotate
        // refresh tokens answered the token, then refused it; the refusal is the news.
        cache.store_refresh_result(&shared.gate, &key, &answer(400, 1_002), 1_000);
        assert_eq!(
            cache.refresh_result(&shared.gate, &key, 1_003),
            Some(answer(400, 1_002))
        );
        // A failure for a token with no shared answer: for the requests already waiting only.
        let other_key = [9u8; 16];
        assert_ne!(other_key, key);
        cache.store_refresh_result(&shared.gate, &other_key, &answer(503, 2_000), 0);
        assert!(cache
            .refresh_result(&shared.gate, &other_key, 2_010)
            .is_some());
        assert_eq!(cache.refresh_result(&shared.gate, &other_key, 2_011), None);
    }

    // Found in review: a 200 too large to share, shared without its body, read as garbage on
    // the other workers and ended the session there.
    #[test]
    fn answers_too_large_to_share_keep_their_status_but_never_lose_their_tokens() {
        let (shared, _, key) = refreshing();
        let cache = shared.cache.borrow();
        let big = |status: u16| RefreshAnswer {
            status,
            body: vec![b' '; 40 * 1024],
            at: 1_000,
        };
        assert!(
            !format!("{:?}", big(200)).contains("   "),
            "Debug shows no body"
        );
        cache.store_refresh_result(&shared.gate, &key, &big(200), 0);
        assert_eq!(cache.refresh_result(&shared.gate, &key, 1_001), None);
        cache.store_refresh_result(&shared.gate, &key, &big(400), 0);
        assert_eq!(
            cache.refresh_result(&shared.gate, &key, 1_001),
            Some(RefreshAnswer {
                status: 400,
                body: Vec::new(),
                at: 1_000
            })
        );
    }

    // Found in review: "keys were fetched for this answer" was read from a fetch that had only
    // been tried. With the IdP rotating its signing key and its JWKS endpoint failing, the
    // refreshed ID token's new key was taken for one that is not coming, and the session ended.
    #[test]
    fn a_failed_jwks_fetch_during_a_key_rotation_does_not_end_the_session() {
        let (g, pending, body, old_jwks) =
            crate::flow::tests::a_due_refresh_answered_with_a_new_signing_key();
        let key = pending.coalescing_key();
        let shared = shared_for(g);
        let now = 1_800_000_250;
        let jwks = Jwks::parse(old_jwks.as_bytes()).unwrap();
        shared
            .cache
            .borrow_mut()
            .store_jwks(old_jwks.as_bytes(), jwks, now);
        assert!(shared.refreshes.borrow_mut().lead(key));
        let mut leader = leader_waiting_for_keys(
            &shared,
            pending,
            key,
            RefreshAnswer {
                status: 200,
                body,
                at: now,
            },
        );
        host_stubs::STATUS.with(|s| *s.borrow_mut() = b"500".to_vec());
        host_stubs::NOW_NS.with(|t| t.set(now * 1_000_000_000));
        let outcome = outcome_of(|| leader.on_http_call_response(1, 1, 0, 0));
        assert_eq!(outcome, Outcome::Forwarded(OLD_TOKEN.into()));
    }

    /// The IdP's refreshed ID token is signed with a key this worker does not have yet: the
    /// root context fetches the keys itself (the request that set the refresh off may be gone)
    /// and then applies the answer; when the fetch fails the session goes on as without an
    /// answer instead of ending.
    #[test]
    fn the_root_fetches_keys_for_an_answer_signed_with_a_new_key() {
        use super::super::refresh::on_root_callout;
        use crate::flow::tests::{a_due_refresh_answered_after_a_key_rotation, provider};
        for (jwks_status, expected) in [
            (&b"200"[..], Outcome::Forwarded("Bearer access-2".into())),
            (b"500", Outcome::Forwarded(OLD_TOKEN.into())),
        ] {
            // Each case on its own shared data: the first one's fetch claims the next 30 s.
            host_stubs::SHARED.with(|m| m.borrow_mut().clear());
            let (g, pending, body, old_jwks, new_jwks) =
                a_due_refresh_answered_after_a_key_rotation();
            let key = pending.coalescing_key();
            let shared = shared_for(g);
            let now = 1_800_000_250;
            let jwks = Jwks::parse(old_jwks.as_bytes()).unwrap();
            let mut cache = shared.cache.borrow_mut();
            cache.store_jwks(old_jwks.as_bytes(), jwks, now - 100);
            let document = serde_json::json!({
                "issuer": "https://idp.example.com",
                "authorization_endpoint": "https://idp.example.com/authorize",
                "token_endpoint": "https://idp.example.com/token",
                "jwks_uri": "https://idp.example.com/keys",
            });
            cache.store_provider(document.to_string().as_bytes(), provider(), now);
            drop(cache);
            assert!(shared.refreshes.borrow_mut().lead(key));
            assert!(shared.cache.borrow().try_lock_refresh(&key, now));
            leader_awaiting_the_idp(&shared, pending, key);
            host_stubs::BODY.with(|b| *b.borrow_mut() = body.clone());
            let outcome = idp_answers(&shared, b"200", body.len(), now);
            assert_eq!(outcome, Outcome::Waiting, "the keys are fetched first");

            let token = host_stubs::LAST_TOKEN.with(std::cell::Cell::get);
            host_stubs::STATUS.with(|s| *s.borrow_mut() = jwks_status.to_vec());
            host_stubs::BODY.with(|b| *b.borrow_mut() = new_jwks.clone().into_bytes());
            let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(now);
            let outcome = outcome_of(|| on_root_callout(&shared, token, new_jwks.len(), at, 1));
            host_stubs::BODY.with(|b| b.borrow_mut().clear());
            assert_eq!(
                outcome,
                expected,
                "JWKS answered {}",
                String::from_utf8_lossy(jwks_status)
            );
            assert!(
                shared.refreshes.borrow_mut().lead(key),
                "the refresh is over"
            );
            assert!(
                !shared.cache.borrow().refresh_locked(&key, now),
                "the cross-worker lock is released"
            );
        }
    }

    /// With its shared queue registered, a VM's root is woken by a message on it, once for all
    /// the refreshes queued before it runs, and the slow poll stands by should the message be
    /// lost; a queue the host no longer knows falls back to the fast tick.
    #[test]
    fn refreshes_wake_the_root_through_its_queue() {
        let (shared, pending, key) = refreshing();
        let periods = || host_stubs::TICKS.with(|t| t.borrow_mut().split_off(0));
        let wakes = || host_stubs::WAKES.with(|w| w.replace(0));
        periods();
        wakes();
        shared.wake.queue.set(Some(5));
        shared.wake.queue_tried.set(true);
        host_stubs::NOW_NS.with(|t| t.set(VALID * 1_000_000_000));
        let mut leader = Stream::new(7, Some(shared.clone()));
        leader.facts = api_call_facts(&shared.gate);
        leader.start_refresh(&shared, token_callout(), pending, VALID, true);
        assert_eq!((wakes(), periods()), (1, vec![100]));
        // Another session's refresh before the root ran: no second message.
        let (_, other) = crate::flow::tests::a_due_refresh_with(serde_json::json!({}));
        let mut other_key = key;
        other_key[0] ^= 1;
        assert!(wake_root(&shared));
        shared.root_calls.borrow_mut().queue(
            token_callout(),
            other_key,
            8,
            other,
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!((wakes(), periods()), (0, vec![]));
        assert_eq!(shared.root_calls.borrow().queued(), 2);

        // Another worker, without the first one's refresh lock.
        host_stubs::SHARED.with(|m| m.borrow_mut().clear());
        let (shared, pending, _) = refreshing();
        shared.wake.queue.set(Some(0));
        shared.wake.queue_tried.set(true);
        let mut leader = Stream::new(7, Some(shared.clone()));
        leader.facts = api_call_facts(&shared.gate);
        leader.start_refresh(&shared, token_callout(), pending, VALID, true);
        assert_eq!((wakes(), periods()), (0, vec![1]));
    }

    /// The queue's message has the root send what streams queued; the answer to a refresh sent
    /// for an earlier configuration of the root still reaches the requests waiting for it.
    #[test]
    fn the_root_sends_on_its_queue_and_answers_for_retired_configurations() {
        use super::super::root::Root;
        use proxy_wasm::traits::RootContext;
        let (shared, pending, key) = refreshing();
        let mut leader = Stream::new(7, Some(shared.clone()));
        leader.facts = api_call_facts(&shared.gate);
        host_stubs::NOW_NS.with(|t| t.set(VALID * 1_000_000_000));
        leader.start_refresh(&shared, token_callout(), pending, VALID, true);
        let mut root = Root::serving(1, shared.clone());
        let before = host_stubs::LAST_TOKEN.with(std::cell::Cell::get);
        root.on_queue_ready(5);
        assert_eq!(shared.root_calls.borrow().queued(), 0);
        let token = host_stubs::LAST_TOKEN.with(std::cell::Cell::get);
        assert_eq!(token, before + 1, "the refresh went out");
        assert!(shared.root_calls.borrow().awaits(token));

        // A new configuration before the IdP answers.
        let (g, _) = crate::flow::tests::a_due_refresh();
        let mut next = shared_for(g);
        Rc::get_mut(&mut next).expect("unshared").wake = root.wake();
        root.install(Some(next));
        let outcome =
            the_idp_rotates(|size| outcome_of(|| root.on_http_call_response(token, 1, size, 0)));
        assert_eq!(outcome, Outcome::Forwarded("Bearer access-2".into()));
        assert!(
            shared.refreshes.borrow_mut().lead(key),
            "the refresh is over"
        );
    }

    /// A configuration replaced while one of its streams is still busy (here: fetching a
    /// document) is served when that stream queues a refresh afterwards.
    #[test]
    fn a_replaced_configuration_is_served_while_its_streams_last() {
        use super::super::root::Root;
        use proxy_wasm::traits::RootContext;
        let (shared, pending, _) = refreshing();
        let mut root = Root::serving(1, shared.clone());
        let mut stream = Stream::new(7, Some(shared.clone()));
        stream.facts = api_call_facts(&shared.gate);
        let (g, _) = crate::flow::tests::a_due_refresh();
        let mut next = shared_for(g);
        Rc::get_mut(&mut next).expect("unshared").wake = root.wake();
        root.install(Some(next));
        drop(shared);
        let shared = stream.shared.clone().expect("the stream's configuration");
        host_stubs::NOW_NS.with(|t| t.set(VALID * 1_000_000_000));
        stream.start_refresh(&shared, token_callout(), pending, VALID, true);
        let before = host_stubs::LAST_TOKEN.with(std::cell::Cell::get);
        root.on_queue_ready(5);
        assert_eq!(shared.root_calls.borrow().queued(), 0, "sent");
        assert_eq!(
            host_stubs::LAST_TOKEN.with(std::cell::Cell::get),
            before + 1
        );
    }

    /// A root whose plugin goes away while a refresh is in flight (the last request, whose
    /// client left, led it) holds the host off until the answer is shared, then says it is done.
    #[test]
    fn a_closing_root_finishes_its_refresh_first() {
        use super::super::root::Root;
        use proxy_wasm::traits::Context;
        let (shared, pending, key) = refreshing();
        assert!(shared.cache.borrow().try_lock_refresh(&key, VALID));
        shared.root_calls.borrow_mut().sent(1, key, 7, pending);
        let mut root = Root::serving(1, shared.clone());
        host_stubs::DONE.with(|d| d.set(0));
        assert!(!root.on_done(), "not done while the IdP is asked");
        host_stubs::NOW_NS.with(|t| t.set(VALID * 1_000_000_000));
        the_idp_rotates(|size| root.on_http_call_response(1, 1, size, 0));
        assert_eq!(
            host_stubs::DONE.with(std::cell::Cell::get),
            1,
            "done once answered"
        );
        let (_, pending) = crate::flow::tests::a_due_refresh();
        assert_eq!(
            recent_answer(&shared, &pending, &key, VALID).map(|a| a.status),
            Some(200),
            "the answer was shared"
        );
        assert!(Root::serving(2, shared).on_done(), "nothing to wait for");
    }

    /// The root's tick runs every millisecond while a refresh waits to be sent, at the poll's
    /// pace while requests wait on other workers, and not at all otherwise; a waiter arriving
    /// while a refresh waits to be sent does not slow the tick down (nor re-arm it).
    #[test]
    fn the_root_tick_follows_the_work_waiting_for_it() {
        use super::super::refresh::{needs_tick, send_queued};
        let settle_tick = |shared: &Shared| {
            super::super::refresh::settle_tick(&shared.wake, needs_tick(shared));
        };
        let (shared, pending, key) = refreshing();
        let periods = || host_stubs::TICKS.with(|t| t.borrow_mut().split_off(0));
        periods();
        let mut leader = Stream::new(7, Some(shared.clone()));
        leader.facts = api_call_facts(&shared.gate);
        host_stubs::NOW_NS.with(|t| t.set(VALID * 1_000_000_000));
        leader.start_refresh(&shared, token_callout(), pending, VALID, true);
        assert_eq!(periods(), vec![1], "a refresh to send");

        // Another session's request waits on another worker's refresh meanwhile.
        let mut other = key;
        other[15] ^= 1;
        assert!(shared.cache.borrow().try_lock_refresh(&other, VALID));
        shared.cache.borrow().unlock_refresh(&other);
        let (_, pending) = crate::flow::tests::a_due_refresh();
        wait_elsewhere(
            &shared,
            pending,
            api_call_facts(&shared.gate),
            other,
            VALID + 10,
        );
        assert!(raise_tick(&shared, Tick::Poll));
        assert_eq!(
            periods(),
            Vec::<u32>::new(),
            "already fast enough: not re-armed"
        );

        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(VALID);
        send_queued(&shared, at, 1, true);
        settle_tick(&shared);
        assert_eq!(
            periods(),
            vec![100],
            "sent; a request still waits elsewhere"
        );
        shared.remote_waiters.borrow_mut().clear();
        settle_tick(&shared);
        assert_eq!(periods(), vec![0], "nothing left to wait for");
        settle_tick(&shared);
        assert_eq!(periods(), Vec::<u32>::new());
    }

    // Found in review: a leader on another worker could store its answer and unlock between this
    // worker's look for an answer and its lock: this worker then presented the old, perhaps
    // rotated, refresh token again.
    #[test]
    fn an_answer_shared_while_the_lock_is_taken_is_applied_without_asking_the_idp() {
        // Paused (a request resumed by the answer) and inside the request-headers callback (the
        // request goes on by returning Continue, never resumed from inside it).
        for paused in [true, false] {
            let (shared, pending, key) = refreshing();
            let mut stream = Stream::new(7, Some(shared.clone()));
            stream.facts = api_call_facts(&shared.gate);
            host_stubs::NOW_NS.with(|t| t.set(VALID * 1_000_000_000));
            let call = token_callout();
            let elsewhere = shared.clone();
            host_stubs::AFTER_WRITE.with(|h| {
                *h.borrow_mut() = Some(Box::new(move |written: &[u8]| {
                    if written.windows(11).any(|w| w == b"refreshing/") {
                        share_a_rotating_answer(&elsewhere, &key);
                    }
                }));
            });
            host_stubs::RESUMED.with(|r| r.set(false));
            host_stubs::AUTHORIZATION_SET.with(|a| *a.borrow_mut() = None);
            let action = stream.start_refresh(&shared, call, pending, VALID, paused);
            host_stubs::AFTER_WRITE.with(|h| *h.borrow_mut() = None);
            assert_eq!(
                host_stubs::AUTHORIZATION_SET.with(|a| a.borrow().clone()),
                Some(b"Bearer access-2".to_vec()),
                "paused: {paused}"
            );
            assert_eq!(host_stubs::RESUMED.with(std::cell::Cell::get), paused);
            if !paused {
                assert_eq!(action, Action::Continue);
            }
            assert_eq!(shared.root_calls.borrow().queued(), 0, "the IdP was asked");
            assert!(!shared.cache.borrow().refresh_locked(&key, VALID));
            assert!(shared.refreshes.borrow_mut().lead(key), "no leader left");
        }
    }

    /// A refresh whose callout the host refuses asked the IdP nothing: the session goes on as it
    /// was while its token is valid (a retryable 503 after), and neither this worker's registry
    /// nor the cross-worker lock keeps other requests waiting for an answer that never comes.
    #[test]
    fn a_refresh_the_host_would_not_send_leaves_the_session_and_frees_the_lock() {
        for (now, expected) in as_without_an_answer() {
            let (shared, pending, key) = refreshing();
            let mut stream = Stream::new(7, Some(shared.clone()));
            stream.facts = api_call_facts(&shared.gate);
            host_stubs::NOW_NS.with(|t| t.set(now * 1_000_000_000));
            let call = token_callout();
            host_stubs::CALLOUTS_REFUSED.with(|r| r.set(true));
            let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(now);
            let outcome = outcome_of(|| {
                stream.start_refresh(&shared, call, pending, now, true);
                super::super::refresh::send_queued(&shared, at, 1, false);
            });
            host_stubs::CALLOUTS_REFUSED.with(|r| r.set(false));
            assert_eq!(outcome, expected, "at {now}");
            assert!(!shared.cache.borrow().refresh_locked(&key, now));
            assert!(
                shared.refreshes.borrow_mut().lead(key),
                "no leader left registered"
            );
        }
    }

    // Found in review: a refresh answered at once from another refresh's shared answer resumed
    // the request from inside its own request-headers callback; a POST's body never reached the
    // upstream. Inside that callback the request goes on by returning Continue, and a stream
    // that applies another's answer leaves the refresh it does not lead alone.
    #[test]
    fn a_refresh_answered_inside_the_headers_callback_continues_without_resuming() {
        let (shared, pending, key) = refreshing();
        share_a_rotating_answer(&shared, &key);
        // Another worker holds the refresh lock; this worker has a leader with a follower.
        assert!(shared.cache.borrow().try_lock_refresh(&key, VALID));
        assert!(shared.refreshes.borrow_mut().lead(key));
        let mut stream = Stream::new(7, Some(shared.clone()));
        stream.facts = api_call_facts(&shared.gate);
        host_stubs::NOW_NS.with(|t| t.set(VALID * 1_000_000_000));
        let call = token_callout();
        host_stubs::RESUMED.with(|r| r.set(false));
        host_stubs::LAST_REPLY.with(|r| r.set(0));
        let action = stream.start_refresh(&shared, call, pending, VALID, false);
        assert_eq!(action, Action::Continue);
        assert!(
            !host_stubs::RESUMED.with(std::cell::Cell::get),
            "not resumed from inside the callback"
        );
        assert_eq!(host_stubs::LAST_REPLY.with(std::cell::Cell::get), 0);
        assert_eq!(
            host_stubs::AUTHORIZATION_SET.with(|a| a.borrow().clone()),
            Some(b"Bearer access-2".to_vec())
        );
        assert!(
            shared.cache.borrow().refresh_locked(&key, VALID),
            "the other worker's lock is left alone"
        );
        assert!(
            !shared.refreshes.borrow_mut().lead(key),
            "this worker's leader is left alone"
        );
    }

    // Found in review: 256 shared slots, and any refresh took over its slot's lock and answer:
    // under load a session's fresh tokens lasted seconds, and a refusal of another session
    // (even one a client provokes by replaying its own revoked cookies) erased them.
    #[test]
    fn a_session_in_the_same_slot_takes_neither_the_lock_nor_the_fresh_tokens() {
        let (shared, _, _) = refreshing();
        let cache = shared.cache.borrow();
        cache.init_shared_slots();
        let a = [7u8; 16];
        let mut b = [7u8; 16];
        b[15] = 8; // the same slot, another refresh token
        let tokens = RefreshAnswer {
            status: 200,
            body: br#"{"access_token":"a2","token_type":"Bearer"}"#.to_vec(),
            at: 1_000,
        };
        cache.store_refresh_result(&shared.gate, &a, &tokens, 0);
        // Neither b's failure nor its refusal (which a client can provoke at will) evicts them:
        // b's waiting requests get b's verdict from b's lock slot.
        for (status, at) in [(503, 1_001), (400, 1_002)] {
            let answer = RefreshAnswer {
                status,
                body: Vec::new(),
                at,
            };
            cache.store_refresh_result(&shared.gate, &b, &answer, 0);
            assert_eq!(
                cache.refresh_result(&shared.gate, &a, 1_003),
                Some(tokens.clone()),
                "{status}"
            );
        }
        // Another session's tokens do take the slot over (the first keeps its copy per VM).
        let b_tokens = RefreshAnswer {
            at: 1_003,
            ..tokens.clone()
        };
        cache.store_refresh_result(&shared.gate, &b, &b_tokens, 0);
        assert_eq!(
            cache.refresh_result(&shared.gate, &b, 1_004),
            Some(b_tokens)
        );

        assert!(cache.try_lock_refresh(&a, 2_000));
        assert!(
            cache.try_lock_refresh(&b, 2_001),
            "b takes its other lock slot..."
        );
        assert!(cache.refresh_locked(&b, 2_001), "...and is coordinated");
        assert!(cache.refresh_locked(&a, 2_002), "...leaving a's lock to it");
        assert!(!cache.try_lock_refresh(&a, 2_002), "a's lock holds");
        assert!(!cache.try_lock_refresh(&b, 2_002), "b's lock holds");
        // A third session with both slots locked by others goes on without coordination,
        // writing nothing.
        let mut c = a;
        c[15] = 9;
        assert!(cache.try_lock_refresh(&c, 2_003));
        assert!(!cache.refresh_locked(&c, 2_003));
        assert!(cache.refresh_locked(&a, 2_003) && cache.refresh_locked(&b, 2_003));
    }

    // Found in review: a refresh that went on without coordination released "its" lock when it
    // ended, and so removed a lock another worker had taken for the same session meanwhile: a
    // third worker then refreshed with the same (perhaps rotated) refresh token.
    #[test]
    fn only_the_worker_that_took_a_refresh_lock_releases_it() {
        use super::super::cache::IdpCache;
        let worker = |_| {
            let cache = IdpCache::new("https://idp.example.com", "idp", "gate");
            cache.init_shared_slots();
            cache
        };
        let (one, two) = (worker(1), worker(2));
        let a = [7u8; 16];
        let (mut b, mut c) = (a, a);
        b[15] = 8;
        c[15] = 9;
        // Both of c's lock slots hold other sessions' locks: worker one refreshes c alone.
        assert!(one.try_lock_refresh(&a, 3_000));
        assert!(one.try_lock_refresh(&b, 3_000));
        assert!(one.try_lock_refresh(&c, 3_000));
        // a's refresh ends; worker two takes c's lock in the slot it left.
        one.unlock_refresh(&a);
        assert!(!one.refresh_locked(&a, 3_001));
        assert!(two.try_lock_refresh(&c, 3_001));
        // Worker one's uncoordinated refresh of c ends: worker two's lock stays.
        one.unlock_refresh(&c);
        one.release_refresh(
            &shared_for(crate::flow::tests::a_due_refresh().0).gate,
            &c,
            &RefreshAnswer {
                status: 400,
                body: Vec::new(),
                at: 3_002,
            },
        );
        assert!(two.refresh_locked(&c, 3_002));
        assert!(!one.try_lock_refresh(&c, 3_002), "worker two leads c");
        // Worker two's own release does free it.
        two.unlock_refresh(&c);
        assert!(!two.refresh_locked(&c, 3_003));

        // A lock that expired under its taker and was taken again by another worker stays
        // with the other worker when its first taker releases.
        assert!(one.try_lock_refresh(&c, 4_000));
        let expired = 4_000 + super::super::cache::REFRESH_LOCK_SECS;
        assert!(two.try_lock_refresh(&c, expired));
        one.unlock_refresh(&c);
        assert!(two.refresh_locked(&c, expired));
    }

    #[test]
    fn a_worker_keeps_its_own_recent_answers_when_the_shared_slot_is_taken() {
        let (shared, pending, key) = refreshing();
        let tokens = RefreshAnswer {
            status: 200,
            body: br#"{"access_token":"a2","token_type":"Bearer"}"#.to_vec(),
            at: VALID,
        };
        shared
            .refreshes
            .borrow_mut()
            .remember(key, &tokens, 0, VALID);
        // Nothing in shared data (another session's answer took the slot, say).
        assert_eq!(
            shared
                .cache
                .borrow()
                .refresh_result(&shared.gate, &key, VALID + 1),
            None
        );
        assert_eq!(
            recent_answer(&shared, &pending, &key, VALID + 59),
            Some(tokens)
        );
        assert_eq!(recent_answer(&shared, &pending, &key, VALID + 61), None);
    }

    // Found in review: this worker's own refusal (its uncoordinated refresh lost the race)
    // hid the new tokens another worker had shared, and its stale requests ended the session.
    #[test]
    fn a_workers_own_refusal_does_not_hide_tokens_another_worker_shared() {
        let (shared, pending, key) = refreshing();
        let refusal = RefreshAnswer {
            status: 400,
            body: br#"{"error":"invalid_grant"}"#.to_vec(),
            at: VALID - 5,
        };
        shared
            .refreshes
            .borrow_mut()
            .remember(key, &refusal, 0, VALID - 5);
        let tokens = share_a_rotating_answer(&shared, &key);
        assert_eq!(recent_answer(&shared, &pending, &key, VALID), Some(tokens));
    }

    // Found in review: with a worker's table of recent answers full of new tokens, a refusal of
    // a session that already held its tokens was dropped, so a stale request on that worker got
    // the revoked session's tokens again.
    #[test]
    fn a_full_table_of_recent_answers_keeps_tokens_but_takes_a_refusal_that_supersedes_them() {
        use super::super::root::RefreshRegistry;
        let mut registry = RefreshRegistry::default();
        let answer = |status: u16, at: u64| RefreshAnswer {
            status,
            body: Vec::new(),
            at,
        };
        for i in 0..=255u8 {
            registry.remember([i; 16], &answer(200, 1_000), 0, 1_000);
        }
        // A refusal for a new key does not push out anyone's tokens...
        let mut new_key = [0u8; 16];
        new_key[15] = 1;
        registry.remember(new_key, &answer(400, 1_001), 0, 1_001);
        assert_eq!(registry.recent(&new_key, 1_001), None);
        assert_eq!(registry.recent(&[0u8; 16], 1_001), Some(answer(200, 1_000)));
        // ...nor one for a key whose session did not hold its tokens yet (a rotation race)...
        registry.remember([1u8; 16], &answer(400, 1_002), 999, 1_002);
        assert_eq!(registry.recent(&[1u8; 16], 1_002), Some(answer(200, 1_000)));
        // ...but the refusal of a session that held them is the news.
        registry.remember([2u8; 16], &answer(400, 1_003), 1_000, 1_003);
        assert_eq!(registry.recent(&[2u8; 16], 1_003), Some(answer(400, 1_003)));
    }

    /// A leader of a refresh, an API call, waiting for the keys to check the IdP's `answer`
    /// (already shared), with discovery at hand, so that fetching keys again would be possible.
    fn leader_waiting_for_keys(
        shared: &Rc<Shared>,
        pending: PendingRefresh,
        key: [u8; 16],
        answer: RefreshAnswer,
    ) -> Stream {
        let mut leader = Stream::new(7, Some(shared.clone()));
        leader.facts = api_call_facts(&shared.gate);
        leader.provider = Some(Rc::new(crate::flow::tests::provider()));
        leader.waiting = Waiting::Jwks {
            token: 1,
            started: SystemTime::UNIX_EPOCH,
            then: AfterKeys::Refresh {
                pending,
                key,
                answer,
                from: AnswerFrom::OwnShared,
            },
        };
        leader
    }

    /// An API call of the session on `worker` that leads the refresh `key`, waiting for the
    /// IdP's answer to the root context's callout (token 1).
    fn leader_awaiting_the_idp(
        worker: &Rc<Shared>,
        pending: PendingRefresh,
        key: [u8; 16],
    ) -> Stream {
        let mut leader = Stream::new(7, Some(worker.clone()));
        leader.facts = api_call_facts(&worker.gate);
        worker.refreshes.borrow_mut().follow(
            key,
            Follower {
                context_id: leader.id,
                pending: pending.clone(),
                facts: leader.facts.clone(),
            },
        );
        worker
            .root_calls
            .borrow_mut()
            .sent(1, key, leader.id, pending);
        leader.waiting = Waiting::RefreshFollower { key };
        leader
    }

    /// The IdP answers the root's callout 1 with `status` and a body of `body_size` bytes at
    /// `now`: what the request that led the refresh gets.
    fn idp_answers(worker: &Shared, status: &[u8], body_size: usize, now: u64) -> Outcome {
        use super::super::refresh::on_root_callout;
        host_stubs::STATUS.with(|s| *s.borrow_mut() = status.to_vec());
        host_stubs::NOW_NS.with(|t| t.set(now * 1_000_000_000));
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(now);
        outcome_of(|| on_root_callout(worker, 1, body_size, at, 1))
    }

    /// Runs `answer` (given the body's size) while the host hands over the IdP's 200 with
    /// `access-2` and a rotated refresh token as the callout's answer.
    fn the_idp_rotates<T>(answer: impl FnOnce(usize) -> T) -> T {
        let rotated = br#"{"access_token":"access-2","token_type":"Bearer","expires_in":300,"refresh_token":"r2"}"#;
        host_stubs::BODY.with(|b| *b.borrow_mut() = rotated.to_vec());
        host_stubs::STATUS.with(|s| *s.borrow_mut() = b"200".to_vec());
        let out = answer(rotated.len());
        host_stubs::BODY.with(|b| b.borrow_mut().clear());
        out
    }

    /// A leader on `worker` whose refresh the IdP refuses (400) at `VALID`, as an API call:
    /// what its request got.
    fn refused_at_the_idp(worker: &Rc<Shared>, pending: PendingRefresh, key: [u8; 16]) -> Outcome {
        leader_awaiting_the_idp(worker, pending, key);
        idp_answers(worker, b"400", 0, VALID)
    }

    /// Worker A's refresh of a session, refused by the IdP while another session's fresh tokens
    /// (`other`'s) hold the shared result slot: worker A, the session's key, `other` and its
    /// tokens.
    fn refused_with_another_sessions_tokens_kept() -> (Rc<Shared>, [u8; 16], [u8; 16], RefreshAnswer)
    {
        let (worker_a, pending, key) = refreshing();
        worker_a.cache.borrow().init_shared_slots();
        let mut other = key;
        other[15] ^= 1;
        let tokens = RefreshAnswer {
            status: 200,
            body: br#"{"access_token":"x","token_type":"Bearer"}"#.to_vec(),
            at: VALID - 1,
        };
        worker_a
            .cache
            .borrow()
            .store_refresh_result(&worker_a.gate, &other, &tokens, 0);
        // Worker A leads the refresh and holds the cross-worker lock; the IdP refuses.
        assert!(worker_a.refreshes.borrow_mut().lead(key));
        assert!(worker_a.cache.borrow().try_lock_refresh(&key, VALID));
        refused_at_the_idp(&worker_a, pending, key);
        (worker_a, key, other, tokens)
    }

    /// A refresh grant to the IdP's token endpoint, as the engine would build it.
    fn token_callout() -> Callout {
        Callout {
            method: "POST",
            path: "/token".into(),
            authority: "idp.example.com".into(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// What an API call of the session, waiting on another worker for the refresh `key`, gets
    /// at that worker's next poll at `VALID`.
    fn waiting_on_another_worker(key: [u8; 16]) -> Outcome {
        use super::super::refresh::poll_remote;
        let (g, pending) = crate::flow::tests::a_due_refresh();
        let worker = shared_for(g);
        wait_elsewhere(
            &worker,
            pending,
            api_call_facts(&worker.gate),
            key,
            VALID + 10,
        );
        outcome_of(|| poll_remote(&worker, VALID, 1))
    }

    /// Another worker's answer to the refresh `key`, 10 s before `VALID`: `access-2` and a
    /// rotated refresh token, stored in shared data.
    fn share_a_rotating_answer(shared: &Shared, key: &[u8; 16]) -> RefreshAnswer {
        let answer = RefreshAnswer {
            status: 200,
            body: br#"{"access_token":"access-2","token_type":"Bearer","expires_in":300,"refresh_token":"r2"}"#.to_vec(),
            at: VALID - 10,
        };
        shared
            .cache
            .borrow()
            .store_refresh_result(&shared.gate, key, &answer, 0);
        answer
    }

    /// The status of the last local reply, and whether it deleted a cookie named `prefix`….
    fn last_reply_and_deleted(prefix: &str) -> (u32, bool) {
        let headers = host_stubs::LAST_REPLY_HEADERS.with(|h| h.borrow_mut().split_off(0));
        let deleted = HeaderMapBytes::from_bytes(headers)
            .pairs()
            .any(|(name, value)| {
                let value = String::from_utf8_lossy(value);
                name == b"set-cookie" && value.starts_with(prefix) && value.contains("Max-Age=0")
            });
        (host_stubs::LAST_REPLY.with(|r| r.replace(0)), deleted)
    }

    /// What a failed login left: the reply's status, whether it deleted the login cookie, and
    /// whether `shared` counted a failed login.
    fn failed_login(shared: &Shared) -> ((u32, bool), bool) {
        let counted = shared.metrics.counted("logins_failed_");
        (last_reply_and_deleted("__Host-oidc-gate-login-"), counted)
    }

    /// A login whose callback matched its login cookie deletes that cookie however it fails
    /// (SECURITY.md: one-time), also where the glue answers: the host refusing the token
    /// callout, no answer, an oversized answer, no keys after a fetch, a failed key fetch, no
    /// discovery document to fetch keys with.
    #[test]
    fn a_login_that_fails_in_the_glue_deletes_its_login_cookie() {
        use crate::flow::tests::{a_callback, a_pending_login, NOW};
        host_stubs::NOW_NS.with(|t| t.set(NOW * 1_000_000_000));
        let stream_for = |g: Gate| {
            let shared = shared_for(g);
            (Stream::new(7, Some(shared.clone())), shared)
        };
        let mut outcomes = Vec::new();

        let (g, path, cookie) = a_callback();
        let (mut s, shared) = stream_for(g);
        let provider = crate::flow::tests::provider();
        shared
            .cache
            .borrow_mut()
            .store_provider(b"{}", provider, NOW);
        s.facts = navigation_facts(&shared.gate, &path, Some(&cookie));
        host_stubs::CALLOUTS_REFUSED.with(|r| r.set(true));
        s.run(false);
        host_stubs::CALLOUTS_REFUSED.with(|r| r.set(false));
        outcomes.push(("callout refused", failed_login(&shared)));

        for (what, status, body_size) in [
            ("no answer", &b""[..], 0),
            (
                "oversized answer",
                &b"200"[..],
                MAX_TOKEN_RESPONSE_BYTES + 1,
            ),
        ] {
            let (g, pending, _) = a_pending_login();
            let (mut s, shared) = stream_for(g);
            s.waiting = Waiting::Token {
                token: 1,
                started: SystemTime::UNIX_EPOCH,
                pending,
            };
            host_stubs::STATUS.with(|st| *st.borrow_mut() = status.to_vec());
            s.on_http_call_response(1, 0, body_size, 0);
            outcomes.push((what, failed_login(&shared)));
        }

        let (g, pending, body) = a_pending_login();
        let (mut s, shared) = stream_for(g);
        s.keys_fetched = true;
        s.finish_login(pending, 200, body);
        outcomes.push(("no keys after a fetch", failed_login(&shared)));

        let (g, pending, body) = a_pending_login();
        let (mut s, shared) = stream_for(g);
        host_stubs::STATUS.with(|st| *st.borrow_mut() = b"500".to_vec());
        let then = AfterKeys::Login {
            pending,
            status: 200,
            body,
        };
        s.on_jwks(then, 0, SystemTime::UNIX_EPOCH);
        outcomes.push(("key fetch failed", failed_login(&shared)));

        let (g, pending, body) = a_pending_login();
        let (mut s, shared) = stream_for(g);
        let then = AfterKeys::Login {
            pending,
            status: 200,
            body,
        };
        s.fetch_jwks(&shared, then, None, true);
        outcomes.push(("no provider to fetch keys from", failed_login(&shared)));

        for (what, ((status, deleted), counted)) in outcomes {
            assert!(matches!(status, 502 | 503), "{what}: {status}");
            assert!(deleted, "{what}: the login cookie was kept");
            assert!(counted, "{what}: not counted as a failed login");
        }
    }

    /// The IdP down, no discovery document cached: a logout is still answered, locally, with
    /// the session cookie deleted and the login ended for the other workers; a navigation that
    /// needs the IdP gets a 503.
    #[test]
    fn a_logout_with_the_idp_unreachable_signs_out_at_the_gateway() {
        use crate::flow::tests::{a_logged_in_session, NOW};
        host_stubs::NOW_NS.with(|t| t.set((NOW + 1) * 1_000_000_000));
        host_stubs::CALLOUTS_REFUSED.with(|r| r.set(true));
        let mut outcomes = Vec::new();
        for path in ["/oauth2/sign_out", "/some/page"] {
            host_stubs::SHARED.with(|m| m.borrow_mut().clear());
            let (g, session) = a_logged_in_session();
            let shared = shared_for(g);
            let mut s = Stream::new(7, Some(shared.clone()));
            // The page without a session: the way to the IdP's login is the only way on.
            let session = (path == "/oauth2/sign_out").then_some(session.as_str());
            s.facts = navigation_facts(&shared.gate, path, session);
            s.run(false);
            let (status, deleted) = last_reply_and_deleted("__Host-oidc-gate=");
            // Another worker learns of the ended login from shared data.
            let other = shared_for(a_logged_in_session().0);
            other.endings.learn(&other.gate, NOW + 1);
            outcomes.push((path, status, deleted, other.gate.ended_logins() > 0));
        }
        host_stubs::CALLOUTS_REFUSED.with(|r| r.set(false));
        assert_eq!(
            outcomes,
            [
                ("/oauth2/sign_out", 200, true, true),
                ("/some/page", 503, false, false)
            ]
        );
    }

    /// The same when the IdP answers its discovery URL with something that is no discovery
    /// document (a maintenance page): the logout signs out here; anything else gets a 502.
    #[test]
    fn a_logout_while_the_idp_serves_no_discovery_document_signs_out_at_the_gateway() {
        use crate::flow::tests::{a_logged_in_session, NOW};
        host_stubs::NOW_NS.with(|t| t.set((NOW + 1) * 1_000_000_000));
        host_stubs::STATUS.with(|st| *st.borrow_mut() = b"200".to_vec());
        let mut outcomes = Vec::new();
        for path in ["/oauth2/sign_out", "/some/page"] {
            let (g, session) = a_logged_in_session();
            let shared = shared_for(g);
            let mut s = Stream::new(7, Some(shared.clone()));
            let session = (path == "/oauth2/sign_out").then_some(session.as_str());
            s.facts = navigation_facts(&shared.gate, path, session);
            // An empty 200 answer: no discovery document.
            s.on_discovery(0, SystemTime::UNIX_EPOCH);
            let (status, _) = last_reply_and_deleted("");
            outcomes.push((path, status, shared.gate.ended_logins() > 0));
        }
        assert_eq!(
            outcomes,
            [("/oauth2/sign_out", 200, true), ("/some/page", 502, false)]
        );
    }

    /// An IdP that answers its discovery URL with something that is no discovery document is
    /// treated as one that does not answer: a document checked earlier and still within its
    /// staleness bound is used, and the login goes on; without one, a 502.
    #[test]
    fn a_refused_discovery_document_falls_back_to_the_cached_one() {
        use crate::flow::tests::{a_logged_in_session, provider, NOW};
        host_stubs::NOW_NS.with(|t| t.set(NOW * 1_000_000_000));
        host_stubs::STATUS.with(|st| *st.borrow_mut() = b"200".to_vec());
        let mut outcomes = Vec::new();
        for cached in [true, false] {
            host_stubs::SHARED.with(|m| m.borrow_mut().clear());
            let shared = shared_for(a_logged_in_session().0);
            if cached {
                // Past its refresh time (an hour), within the staleness bound (a day).
                let fetched_at = NOW - 4_000;
                shared
                    .cache
                    .borrow_mut()
                    .store_provider(b"{}", provider(), fetched_at);
            }
            let mut s = Stream::new(7, Some(shared.clone()));
            s.facts = navigation_facts(&shared.gate, "/some/page", None);
            s.on_discovery(0, SystemTime::UNIX_EPOCH);
            outcomes.push((cached, host_stubs::LAST_REPLY.with(|r| r.replace(0))));
        }
        assert_eq!(outcomes, [(true, 302), (false, 502)]);
    }

    // Found in review: a login finishing on a key set past its refresh time fetched the keys
    // again every time, without the process-wide claim that limits refetches to one per 30 s.
    #[test]
    fn a_login_on_a_stale_key_set_refetches_only_under_the_process_wide_claim() {
        use crate::abi::cache::JWKS_TTL_SECS;
        use crate::flow::tests::{a_pending_login_with_keys, provider, NOW};
        host_stubs::SHARED.with(|m| m.borrow_mut().clear());
        host_stubs::NOW_NS.with(|t| t.set(NOW * 1_000_000_000));
        let mut outcomes = Vec::new();
        for _ in 0..2 {
            let (g, pending, body, jwks) = a_pending_login_with_keys();
            let shared = shared_for(g);
            shared.cache.borrow().init_shared_slots();
            let keys = Jwks::parse(jwks.as_bytes()).expect("jwks");
            shared
                .cache
                .borrow_mut()
                .store_jwks(jwks.as_bytes(), keys, NOW - JWKS_TTL_SECS - 1);
            shared
                .cache
                .borrow_mut()
                .store_provider(b"{}", provider(), NOW);
            let mut s = Stream::new(7, Some(shared.clone()));
            host_stubs::LAST_REPLY.with(|r| r.set(0));
            s.finish_login(pending, 200, body);
            outcomes.push((
                matches!(s.waiting, Waiting::Jwks { .. }),
                host_stubs::LAST_REPLY.with(std::cell::Cell::get),
            ));
        }
        // The first fetches the keys; the second, within 30 s, logs in on the stale set.
        assert_eq!(outcomes, [(true, 0), (false, 302)]);
    }

    // Found in review: a discovery document past its refresh time was fetched again for every
    // request that needed it (anonymous navigations included), with no process-wide limit.
    #[test]
    fn a_stale_discovery_document_is_refetched_once_per_claim() {
        use crate::abi::cache::DISCOVERY_TTL_SECS;
        use crate::flow::tests::{a_logged_in_session, provider, NOW};
        host_stubs::SHARED.with(|m| m.borrow_mut().clear());
        host_stubs::NOW_NS.with(|t| t.set(NOW * 1_000_000_000));
        let shared = shared_for(a_logged_in_session().0);
        shared.cache.borrow().init_shared_slots();
        shared
            .cache
            .borrow_mut()
            .store_provider(b"{}", provider(), NOW - DISCOVERY_TTL_SECS - 1);
        let mut outcomes = Vec::new();
        for id in [7, 8] {
            let mut s = Stream::new(id, Some(shared.clone()));
            s.facts = navigation_facts(&shared.gate, "/some/page", None);
            host_stubs::LAST_REPLY.with(|r| r.set(0));
            s.run(false);
            outcomes.push((
                matches!(s.waiting, Waiting::Discovery { .. }),
                host_stubs::LAST_REPLY.with(std::cell::Cell::get),
            ));
        }
        // The first asks the IdP; the second, within 30 s, logs in with the cached document.
        assert_eq!(outcomes, [(true, 0), (false, 302)]);
    }

    // Found in review: a request waiting on another worker's refresh, which the IdP refused,
    // got a 503 even when it also carried a valid bearer token that would have passed had it
    // led the refresh itself.
    #[test]
    fn a_waiting_request_with_a_valid_bearer_token_passes_on_it_when_its_session_ends() {
        use super::super::refresh::poll_remote;
        use crate::abi::cache::JWKS_TTL_SECS;
        use crate::flow::tests::{a_bearer_token_and_keys, a_due_refresh_with};
        let bearer_config =
            || serde_json::json!({"bearer_tokens": {"audiences": ["api://orders"]}});
        let (token, jwks) = a_bearer_token_and_keys();
        let authorization = format!("Bearer {token}");
        // Keys within their refresh time, and keys past it, which no refetch can renew from
        // here (they may hold a key the IdP withdrew).
        for (keys_fetched_at, expected) in [
            (VALID, Outcome::Forwarded(authorization.clone())),
            (VALID - JWKS_TTL_SECS - 1, Outcome::Answered(503)),
        ] {
            host_stubs::SHARED.with(|m| m.borrow_mut().clear());
            let (g, pending) = a_due_refresh_with(bearer_config());
            let key = pending.coalescing_key();
            let worker_a = shared_for(g);
            assert_eq!(
                refused_at_the_idp(&worker_a, pending, key),
                Outcome::Answered(401)
            );

            let (g, pending) = a_due_refresh_with(bearer_config());
            let worker_b = shared_for(g);
            let keys = Jwks::parse(jwks.as_bytes()).expect("jwks");
            worker_b
                .cache
                .borrow_mut()
                .store_jwks(jwks.as_bytes(), keys, keys_fetched_at);
            let request: &[(&[u8], &[u8])] = &[
                (b":authority", b"app.example.com"),
                (b":path", b"/api/orders"),
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b"authorization", authorization.as_bytes()),
            ];
            let facts = Facts::read(
                HeaderMapBytes::from_bytes(serialise(request)),
                Some(&worker_b.gate),
            );
            wait_elsewhere(&worker_b, pending, facts, key, VALID + 10);
            let outcome = outcome_of(|| poll_remote(&worker_b, VALID, 1));
            let forwarded = matches!(outcome, Outcome::Forwarded(_));
            assert_eq!(outcome, expected);
            if forwarded {
                // The ended session's cookie is deleted on the way back.
                let cookies = worker_b
                    .refreshes
                    .borrow()
                    .response_cookies
                    .get(&9)
                    .cloned();
                assert!(
                    cookies.unwrap_or_default().iter().any(|c| c
                        .starts_with(&format!("{}=;", crate::session::SESSION_COOKIE))
                        && c.contains("Max-Age=0")),
                    "session cookie deleted"
                );
            }
        }
    }

    /// `pending`'s request (`facts`, stream 9) waiting on another worker's refresh `key`.
    fn wait_elsewhere(
        worker: &Shared,
        pending: PendingRefresh,
        facts: Facts,
        key: [u8; 16],
        deadline: u64,
    ) {
        use super::super::root::Follower;
        worker.remote_waiters.borrow_mut().push(RemoteWaiter {
            follower: Follower {
                context_id: 9,
                pending,
                facts,
            },
            key,
            deadline,
        });
    }

    /// A worker's shared state with a refresh due on a session, and that refresh's key.
    fn refreshing() -> (Rc<Shared>, PendingRefresh, [u8; 16]) {
        let (g, pending) = crate::flow::tests::a_due_refresh();
        let key = pending.coalescing_key();
        (shared_for(g), pending, key)
    }

    /// A browser navigation to `path` on the session's host, with `cookie` when given.
    fn navigation_facts(gate: &Gate, path: &str, cookie: Option<&str>) -> Facts {
        let mut headers: Vec<(&[u8], &[u8])> = vec![
            (b":authority", b"app.example.com"),
            (b":path", path.as_bytes()),
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b"sec-fetch-mode", b"navigate"),
        ];
        headers.extend(cookie.map(|c| (&b"cookie"[..], c.as_bytes())));
        Facts::read(HeaderMapBytes::from_bytes(serialise(&headers)), Some(gate))
    }

    /// An API call of the session's host: had its session ended, it would get a 401.
    fn api_call_facts(gate: &Gate) -> Facts {
        let api_call: &[(&[u8], &[u8])] = &[
            (b":authority", b"app.example.com"),
            (b":path", b"/api/orders"),
            (b":method", b"GET"),
            (b":scheme", b"https"),
        ];
        Facts::read(HeaderMapBytes::from_bytes(serialise(api_call)), Some(gate))
    }

    fn shared_for(g: Gate) -> Rc<Shared> {
        use super::super::cache::IdpCache;
        use super::super::ended::SharedEndings;
        use super::super::metrics::Metrics;
        use super::super::root::RefreshRegistry;
        use std::cell::RefCell;
        Rc::new(Shared {
            endings: SharedEndings::new("https://idp.example.com", "gate"),
            cache: RefCell::new(IdpCache::new("https://idp.example.com", "idp", "gate")),
            gate: Rc::new(g),
            metrics: Metrics::default(),
            refreshes: RefCell::new(RefreshRegistry::default()),
            remote_waiters: RefCell::new(Vec::new()),
            root_calls: RefCell::new(Default::default()),
            wake: Rc::new(Default::default()),
        })
    }

    /// A waiting request's fate: forwarded (the `authorization` it went on with) or answered.
    #[derive(Debug, PartialEq)]
    enum Outcome {
        Forwarded(String),
        Answered(u32),
        Waiting,
    }

    fn outcome_of(run: impl FnOnce()) -> Outcome {
        host_stubs::LAST_REPLY.with(|r| r.set(0));
        host_stubs::RESUMED.with(|r| r.set(false));
        host_stubs::AUTHORIZATION_SET.with(|a| *a.borrow_mut() = None);
        run();
        let reply = host_stubs::LAST_REPLY.with(std::cell::Cell::get);
        let authorization = host_stubs::AUTHORIZATION_SET.with(|a| a.borrow_mut().take());
        match (reply, host_stubs::RESUMED.with(std::cell::Cell::get)) {
            (0, true) => Outcome::Forwarded(
                String::from_utf8_lossy(&authorization.unwrap_or_default()).into(),
            ),
            (0, false) => Outcome::Waiting,
            (status, _) => Outcome::Answered(status),
        }
    }

    /// What a request of `a_due_refresh`'s session gets from a refresh that ended without an
    /// answer: its old token while valid, a retryable 503 once expired.
    fn as_without_an_answer() -> [(u64, Outcome); 2] {
        [
            (VALID, Outcome::Forwarded(OLD_TOKEN.into())),
            (EXPIRED, Outcome::Answered(503)),
        ]
    }

    /// The access token of `a_due_refresh`'s session: valid until NOW + 300.
    const OLD_TOKEN: &str = "Bearer access-abc";
    const VALID: u64 = 1_800_000_290;
    const EXPIRED: u64 = 1_800_000_300;

    // Found in review: a waiter on another worker took "released without an answer" (the
    // leader's client left) for a refusal and ended the session there. It is not a logout:
    // the request goes on with the access token while that is valid, and gets a retryable 503
    // after (before, a 503 even with a valid token, though that worker's own requests went on).
    #[test]
    fn a_refresh_given_up_on_another_worker_goes_on_with_a_valid_token_else_a_retryable_503() {
        use super::super::refresh::poll_remote;
        for (now, expected) in as_without_an_answer() {
            let (shared, pending, key) = refreshing();
            // An API call: had its session ended, it would get a 401.
            let facts = api_call_facts(&shared.gate);
            wait_elsewhere(&shared, pending, facts, key, now + 10);
            // No answer stored, no lock held.
            let outcome = outcome_of(|| poll_remote(&shared, now, 1));
            assert!(shared.remote_waiters.borrow().is_empty());
            assert_eq!(outcome, expected, "at {now}");
        }
    }

    // Seen in review: a refresh callout belonged to the request that led it. When its client
    // left before the IdP answered, the answer was lost; with refresh-token rotation the
    // session's next request presented the old token and the session ended. The root context
    // owns the callout now: the answer reaches the requests still waiting and the later ones.
    #[test]
    fn a_refresh_whose_leader_left_still_reaches_the_waiting_and_later_requests() {
        use super::super::root::Follower;
        let (shared, pending, key) = refreshing();
        assert!(shared.refreshes.borrow_mut().lead(key));
        assert!(shared.cache.borrow().try_lock_refresh(&key, VALID));
        let mut leader = leader_awaiting_the_idp(&shared, pending, key);
        let (_, pending_follower) = crate::flow::tests::a_due_refresh();
        shared.refreshes.borrow_mut().follow(
            key,
            Follower {
                context_id: 11,
                pending: pending_follower,
                facts: api_call_facts(&shared.gate),
            },
        );
        host_stubs::NOW_NS.with(|t| t.set(VALID * 1_000_000_000));
        // The leader's client goes away before the IdP answers: nobody is answered yet.
        let outcome = outcome_of(|| {
            Stream::done(&mut leader);
        });
        assert_eq!(outcome, Outcome::Waiting);
        assert!(shared.cache.borrow().refresh_locked(&key, VALID));

        let outcome = the_idp_rotates(|size| idp_answers(&shared, b"200", size, VALID));
        assert_eq!(outcome, Outcome::Forwarded("Bearer access-2".into()));
        assert!(!shared.cache.borrow().refresh_locked(&key, VALID));

        // A later request with the cookie the leader's client never replaced.
        let (_, pending) = crate::flow::tests::a_due_refresh();
        let mut late = Stream::new(12, Some(shared.clone()));
        late.facts = api_call_facts(&shared.gate);
        let outcome = outcome_of(|| {
            late.start_refresh(&shared, token_callout(), pending, VALID + 1, true);
        });
        assert_eq!(outcome, Outcome::Forwarded("Bearer access-2".into()));
        assert_eq!(
            shared.root_calls.borrow().queued(),
            0,
            "the IdP is not asked again"
        );
    }

    #[test]
    fn a_refresh_leader_that_ends_during_its_jwks_fetch_releases_the_refresh() {
        let (shared, pending, key) = refreshing();
        // start_refresh: this stream leads the refresh of the session...
        assert!(shared.refreshes.borrow_mut().lead(key));
        let mut leader = Stream::new(7, Some(shared.clone()));
        // ...the IdP answered, the refreshed ID token needs the JWKS (cold cache or new kid):
        // finish_refresh -> RefreshStep::NeedKeys -> fetch_jwks leaves the stream here.
        leader.waiting = Waiting::Jwks {
            token: 1,
            started: SystemTime::UNIX_EPOCH,
            then: AfterKeys::Refresh {
                pending,
                key,
                from: AnswerFrom::OwnShared,
                answer: RefreshAnswer {
                    status: 200,
                    body: Vec::new(),
                    at: 0,
                },
            },
        };
        // The browser cancels that request before the JWKS answer (the SDK drops the answer to a
        // callout whose context has ended).
        assert!(Stream::done(&mut leader));
        // A later request of the same session on this worker must be able to refresh, not
        // become a follower of a refresh nobody will ever finish.
        assert!(
            shared.refreshes.borrow_mut().lead(key),
            "refresh still registered in flight after its leader ended: followers hang forever"
        );
    }

    /// Found in review: an answer too large to read is not "the IdP did not answer". A 400
    /// invalid_grant (or a 200) over MAX_TOKEN_RESPONSE_BYTES was fed to the engine as 503, so
    /// a refused refresh kept the session (forwarded on the old token) instead of ending it.
    #[test]
    fn an_oversized_refresh_answer_is_the_idps_answer_not_an_outage() {
        use crate::flow::MAX_TOKEN_RESPONSE_BYTES;
        for status in [&b"400"[..], b"200"] {
            // Only where an outage keeps the session can the two be told apart.
            let (g, pending) = crate::flow::tests::a_due_refresh_with(
                serde_json::json!({"refresh_unavailable": "keep_session"}),
            );
            let key = pending.coalescing_key();
            let shared = shared_for(g);
            assert!(shared.refreshes.borrow_mut().lead(key));
            leader_awaiting_the_idp(&shared, pending, key);
            // The access token (exp NOW + 300) is still valid.
            let outcome = idp_answers(&shared, status, MAX_TOKEN_RESPONSE_BYTES + 1, 1_800_000_291);
            assert!(
                matches!(outcome, Outcome::Answered(_)),
                "{}: an unreadable answer was taken for an outage; the request was forwarded on \
                 the old token and the session kept",
                String::from_utf8_lossy(status)
            );
        }
    }

    // Found in review: a leader that got the IdP's answer and needs keys to check it, but can
    // fetch none (here: no provider), left the refresh registered in flight, and every later
    // request of the session on that worker followed it forever.
    #[test]
    fn fetch_jwks_without_a_provider_releases_the_refresh() {
        let (shared, pending, key) = refreshing();
        assert!(shared.refreshes.borrow_mut().lead(key));
        let mut leader = Stream::new(7, Some(shared.clone()));
        let then = AfterKeys::Refresh {
            pending,
            key,
            from: AnswerFrom::OwnShared,
            answer: RefreshAnswer {
                status: 200,
                body: Vec::new(),
                at: 0,
            },
        };
        leader.fetch_jwks(&shared, then, None, true);
        assert!(shared.refreshes.borrow_mut().lead(key));
    }

    // Found in review: poll_remote answers a remote waiter (503) but cannot reset its `waiting`;
    // when that stream ended later, done() ran abandon_local on the key again and took the
    // followers of a newer local refresh of the same session (503 to them, entry removed).
    #[test]
    fn a_remote_waiter_answered_by_the_poll_does_not_abandon_a_later_refresh() {
        use super::super::refresh::poll_remote;
        use super::super::root::Follower;
        const NOW: u64 = 1_800_000_290;
        let (shared, pending, key) = refreshing();
        let facts = || api_call_facts(&shared.gate);
        // X led locally, found the lock held elsewhere, waits remotely.
        assert!(shared.refreshes.borrow_mut().lead(key));
        let mut x = Stream::new(9, Some(shared.clone()));
        x.waiting = Waiting::RemoteRefresh { key };
        wait_elsewhere(&shared, pending, facts(), key, NOW + 10);
        poll_remote(&shared, NOW, 1); // lock gone, no answer: X gets its 503
                                      // Y leads a new refresh of the session on this worker; Z follows it.
        assert!(shared.refreshes.borrow_mut().lead(key));
        let (_, pending_z) = crate::flow::tests::a_due_refresh();
        assert_eq!(pending_z.coalescing_key(), key);
        shared.refreshes.borrow_mut().follow(
            key,
            Follower {
                context_id: 11,
                pending: pending_z,
                facts: facts(),
            },
        );
        // X's stream ends (its 503 was sent). Z, waiting on Y, is neither answered nor let go:
        // at this clock an abandoned refresh would answer it 503 (its token expired).
        host_stubs::NOW_NS.with(|t| t.set((NOW + 60) * 1_000_000_000));
        let outcome = outcome_of(|| assert!(Stream::done(&mut x)));
        assert_eq!(outcome, Outcome::Waiting, "Z was let go by X's end");
        assert!(
            !shared.refreshes.borrow_mut().lead(key),
            "Y's refresh is no longer registered"
        );
    }
}
