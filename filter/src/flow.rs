//! The decision engine: given a request (and, when needed, the provider metadata, a token
//! response, the JWKS), decide what happens. No I/O here: the glue gathers inputs, runs the
//! callouts the decisions ask for, and applies the result.
//!
//! Order of checks (after Envoy's OAuth2 filter): host not ours -> untouched; callback; logout;
//! skip paths; valid session -> forward with the access token; otherwise login redirect for
//! browser navigations and 401 for everything else.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde::Deserialize;
use url::Url;

use crate::config::{
    port_is_well_formed, strip_port, Config, RefreshUnavailable, TokenEndpointAuthMethod,
    UpstreamAuthorization,
};
use crate::crypto::{key_scope, Keyring, Purpose};
use crate::discovery::ProviderMetadata;
use crate::ended::{ending_of, EndedLogins, Ending, Inserted, SessionIds, MAX_ENDED};
use crate::headers::{claim_header_value, email_vouched_for, named_claim_header_value};
use crate::http::{
    cookie_header_without, form_encode, same_origin_target, sanitize_return_path, split_path,
    CookieList, QueryError, StrictQuery,
};
use crate::reply::{Failure, Reply};
use crate::session::{
    delete_cookie, is_own_cookie, login_cookie_name, set_cookie, LoginState, Session,
    LOGIN_COOKIE_PREFIX, LOGIN_TTL_SECS, MAX_PENDING_LOGINS, SESSION_COOKIE,
};
use crate::token::{self, Expectations, Jwks, TokenError, DEFAULT_CLOCK_SKEW_SECS};
use crate::types::{random_token, Random, Secret, UnixSeconds};

/// Largest sealed session cookie we set; browsers drop cookies over 4096 bytes (name + value).
pub const MAX_SESSION_COOKIE_BYTES: usize = 3800;
/// Largest token endpoint answer accepted.
pub const MAX_TOKEN_RESPONSE_BYTES: usize = 256 * 1024;
/// Access-token lifetime assumed when the IdP omits `expires_in` (RFC 6749 §5.1 makes it optional).
pub const DEFAULT_EXPIRES_IN_SECS: u64 = 600;
/// Longest return URL kept across a login (sealed into the login cookie).
pub const MAX_RETURN_URL_BYTES: usize = 1536;
/// Longest access-token lifetime believed (ten years); anything longer is an IdP error.
const MAX_EXPIRES_IN_SECS: u64 = 10 * 365 * 86400;
/// ID-token claims kept in the session for identity headers.
const KEPT_CLAIMS: [&str; 5] = [
    "email",
    "name",
    "preferred_username",
    "groups",
    "email_verified",
];

/// The request facts the engine needs, gathered by the glue.
#[derive(Debug, Default, Clone)]
pub struct Request<'a> {
    /// `:method`.
    pub method: &'a str,
    /// `x-forwarded-proto` as set by the gateway, else `:scheme`.
    pub scheme: &'a str,
    /// `:authority`.
    pub authority: &'a str,
    /// `:path`, with query.
    pub path: &'a str,
    /// Every `Cookie` header.
    pub cookie_headers: Vec<&'a str>,
    /// `sec-fetch-mode`.
    pub sec_fetch_mode: Option<&'a str>,
    /// `sec-fetch-site`.
    pub sec_fetch_site: Option<&'a str>,
    /// Whether a body follows the headers.
    pub has_body: bool,
    /// Whether any `sec-fetch-*` header was sent.
    pub has_sec_fetch: bool,
    /// `accept`.
    pub accept: Option<&'a str>,
    /// `x-request-id` (Envoy sets it at the edge).
    pub request_id: Option<&'a str>,
    /// Every `Authorization` header (more than one is refused).
    pub authorization: Vec<&'a str>,
    /// `origin`.
    pub origin: Option<&'a str>,
    /// `access-control-request-method`.
    pub access_control_request_method: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// The host without port, lowercase: the identity cookies are bound to.
    pub fn host(&self) -> Cow<'a, str> {
        let h = strip_port(self.authority);
        let h = h.strip_suffix('.').unwrap_or(h);
        // Every request asks: borrowed unless the client spelled the host in capitals.
        if h.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(h.to_ascii_lowercase())
        } else {
            Cow::Borrowed(h)
        }
    }

    /// A top-level browser navigation: the only kind of request worth redirecting to a login
    /// page. Everything else (fetch, XHR, API clients) gets a 401 it can act on.
    pub fn is_navigation(&self) -> bool {
        match self.sec_fetch_mode {
            Some(mode) => mode.eq_ignore_ascii_case("navigate"),
            None => {
                !self.has_sec_fetch
                    && self
                        .accept
                        .is_some_and(|a| a.to_ascii_lowercase().contains("text/html"))
            }
        }
    }
}

/// Headers to change on a request that goes upstream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Forward {
    /// New `Authorization` value; `None` removes the header.
    pub authorization: Option<String>,
    /// New `Cookie` value without the filter's cookies; `None` removes the header.
    pub cookie: Option<String>,
    /// Identity headers to set (after all client-sent identity headers were removed).
    pub set_headers: Vec<(String, String)>,
    /// `Set-Cookie` values for the response (a refreshed or resealed session).
    pub response_cookies: Vec<String>,
}

/// An HTTP request to the IdP for the glue to dispatch on the configured cluster.
#[derive(Clone, PartialEq, Eq)]
pub struct Callout {
    /// `:method`.
    pub method: &'static str,
    /// `:path` with query.
    pub path: String,
    /// `:authority`.
    pub authority: String,
    /// Other headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Callout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Body and headers carry the code, the verifier and client credentials.
        f.debug_struct("Callout")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

/// A login waiting for the token endpoint's answer.
#[derive(Debug)]
pub struct PendingLogin {
    login_cookie: String,
    host: String,
    origin_scheme: String,
    authority: String,
    return_to: String,
    nonce: Secret,
    browser: bool,
    request_id: Option<String>,
    present_session_cookies: Vec<String>,
}

impl PendingLogin {
    /// Whether the login came from a browser (for the error page format).
    pub fn browser(&self) -> bool {
        self.browser
    }

    /// The request id, for error replies.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    /// The answer to a callback whose login failed after its login cookie matched: `f`, and the
    /// login cookie deleted whatever went wrong, so a reload of the callback from history is no
    /// second try with the same code.
    pub fn failed(&self, f: Failure) -> Reply {
        f.reply(self.browser, self.request_id.as_deref())
            .with_cookies(vec![delete_cookie(&self.login_cookie)])
    }
}

/// What to do with a request.
// One Decision exists per request and is consumed at once; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Decision {
    /// Not a protected host: leave the request exactly as it is.
    PassThrough,
    /// Send upstream with these changes.
    Forward(Forward),
    /// Answer locally.
    Reply(Reply),
    /// Provider metadata is needed: fetch discovery, then decide again.
    NeedProvider,
    /// The JWKS is needed (bearer token): fetch it, then decide again.
    NeedKeys,
    /// Exchange the code: send `call`, then pass the answer to [`Gate::complete_login`].
    ExchangeCode {
        /// The token request.
        call: Callout,
        /// What the answer is checked against.
        pending: PendingLogin,
    },
    /// Refresh the session: send `call`, then pass the answer to [`Gate::complete_refresh`].
    Refresh {
        /// The refresh request.
        call: Callout,
        /// The session being refreshed and the request waiting for it.
        pending: PendingRefresh,
    },
}

/// A request waiting for a refresh.
#[derive(Clone)]
pub struct PendingRefresh {
    session: Session,
    host: String,
    cookie: Option<String>,
    present_session_cookies: Vec<String>,
}

impl std::fmt::Debug for PendingRefresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingRefresh")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// The end of a session whose refresh failed: its cookies deleted, the failure counted.
fn ended_refresh(
    pending: &PendingRefresh,
    reason: &'static str,
    detail: String,
) -> (RefreshStep, Note) {
    let clear = pending
        .present_session_cookies
        .iter()
        .map(|n| delete_cookie(n))
        .collect();
    (
        RefreshStep::Ended(clear),
        Note::event(Event::RefreshFailed(reason), detail),
    )
}

fn ended_note() -> Note {
    Note::event(
        Event::SessionRejected("ended"),
        "session rejected: its login ended (logout)",
    )
}

/// Whether a token endpoint's status says the IdP was down or busy (5xx, 429, or no answer in
/// time, which the glue reports as 503) rather than refusing anything.
pub fn idp_unavailable(status: u16) -> bool {
    status == 429 || status >= 500
}

/// The IdP's answer to a refresh as one stream got it: what other streams, here or on other
/// workers, apply instead of presenting the same refresh token again.
#[derive(Clone, PartialEq, Eq)]
pub struct RefreshAnswer {
    /// The HTTP status (503 when the IdP did not answer in time).
    pub status: u16,
    /// The body (empty when unreadable or absent); holds tokens.
    pub body: Vec<u8>,
    /// When it came.
    pub at: UnixSeconds,
}

impl std::fmt::Debug for RefreshAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefreshAnswer")
            .field("status", &self.status)
            .field(
                "body",
                &format_args!("[{} bytes redacted]", self.body.len()),
            )
            .field("at", &self.at)
            .finish()
    }
}

/// Why a bearer token was refused, as the `bearer_rejected_*` metrics name it.
fn bearer_rejection(e: &TokenError) -> &'static str {
    match e {
        TokenError::UnknownKey => "unknown key",
        TokenError::Expired => "expired",
        TokenError::InvalidAudience => "audience",
        TokenError::InvalidIssuer => "issuer",
        TokenError::AlgorithmNotAllowed(_) => "algorithm",
        TokenError::BadSignature => "signature",
        _ => "invalid",
    }
}

/// What a shared refresh answer is bound to: the refresh token it answers and when it came.
fn refresh_result_context(refresh_key: &[u8; 16], at: UnixSeconds) -> [u8; 24] {
    let mut context = [0u8; 24];
    context[..16].copy_from_slice(refresh_key);
    context[16..].copy_from_slice(&at.to_be_bytes());
    context
}

/// A digest of a session's refresh token: the token itself never becomes a map key or a log line.
fn refresh_token_key(session: &Session) -> [u8; 16] {
    let digest = hmac_sha256::Hash::hash(
        session
            .refresh_token
            .as_ref()
            .map(|t| t.expose())
            .unwrap_or("")
            .as_bytes(),
    );
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

impl PendingRefresh {
    /// Whether the session already holds what an answer given at `answered_at` brought (an
    /// IdP that does not rotate refresh tokens is answered for the same token again and again).
    pub fn already_reflects(&self, answered_at: UnixSeconds) -> bool {
        answered_at <= self.session.tokens_at
    }

    /// When the session's tokens were obtained.
    pub fn tokens_at(&self) -> UnixSeconds {
        self.session.tokens_at
    }

    /// A key identifying the refresh token, for coalescing concurrent refreshes of one session
    /// (a digest: the token itself never becomes a map key or a log line).
    pub fn coalescing_key(&self) -> [u8; 16] {
        refresh_token_key(&self.session)
    }
}

/// The outcome of a refresh.
#[derive(Debug)]
pub enum RefreshStep {
    /// Refreshed: forward with these changes (new token, new cookie on the response).
    Forward(Forward),
    /// The JWKS has no key for the refreshed ID token: fetch it, then call again.
    NeedKeys,
    /// The session is over (refresh refused or impossible): clear these cookies and decide again
    /// as if there were no session (login for browsers, 401 for APIs).
    Ended(Vec<String>),
    /// The IdP did not answer and the access token has expired: a retryable 503; the session
    /// stays for when the IdP is back.
    Unavailable,
}

/// Something worth counting, reported with each decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A login redirect was sent.
    LoginStarted,
    /// A login completed and a session was set.
    LoginCompleted,
    /// A login failed at the callback, the token exchange or the ID-token check.
    LoginFailed(&'static str),
    /// A session was refreshed.
    RefreshCompleted,
    /// A refresh failed; the session ended.
    RefreshFailed(&'static str),
    /// A machine client's bearer JWT was accepted.
    BearerAccepted,
    /// A bearer JWT was refused.
    BearerRejected(&'static str),
    /// A session cookie was present but not accepted.
    SessionRejected(&'static str),
    /// A user logged out; the list of ended logins may have been full.
    Logout {
        /// Whether a live ended login had to be dropped to make room.
        dropped_an_ended_login: bool,
    },
}

/// A secret-free log line and an event for the metrics, reported with each decision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Note {
    /// One line for the log.
    pub log: Option<String>,
    /// What to count.
    pub event: Option<Event>,
}

impl Note {
    /// Nothing to report.
    pub fn none() -> Self {
        Self::default()
    }

    /// A log line only.
    pub fn log(line: impl Into<String>) -> Self {
        Self {
            log: Some(line.into()),
            event: None,
        }
    }

    /// An event with a log line.
    pub fn event(event: Event, line: impl Into<String>) -> Self {
        Self {
            log: Some(line.into()),
            event: Some(event),
        }
    }

    /// An event without a log line.
    pub fn count(event: Event) -> Self {
        Self {
            log: None,
            event: Some(event),
        }
    }
}

/// What the engine knows besides the request: IdP documents, and whether a JWKS refetch for an
/// unknown key is allowed right now.
#[derive(Debug, Clone, Copy, Default)]
pub struct Known<'a> {
    /// Provider metadata, once discovery succeeded.
    pub provider: Option<&'a ProviderMetadata>,
    /// The JWKS, once fetched.
    pub jwks: Option<&'a Jwks>,
    /// Whether an unknown `kid` may trigger a refetch (rate limit not yet used).
    pub may_refetch_keys: bool,
}

/// The verification keys available to finish a login or a refresh.
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    /// The cached JWKS, if any.
    pub jwks: Option<&'a Jwks>,
    /// Whether an unknown `kid` may trigger a refetch (rate limit not yet used).
    pub may_refetch: bool,
    /// Whether `jwks` was fetched for this very answer: a key missing from it is not coming.
    pub fetched_for_it: bool,
}

/// The next step after the token endpoint answered.
#[derive(Debug)]
pub enum LoginStep {
    /// Finished: send this reply (success redirect or error page).
    Done(Reply),
    /// The JWKS is missing or has no key for the ID token: fetch it, then call again.
    NeedKeys,
}

/// A token endpoint answer (RFC 6749 §5.1), checked for shape.
pub struct TokenResponse {
    access_token: Secret,
    id_token: Option<Secret>,
    refresh_token: Option<Secret>,
    expires_in: u64,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// Why a token endpoint answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenResponseError {
    /// Non-2xx; the OAuth `error` code if there was one.
    #[error("token endpoint answered {status} ({error})")]
    Status {
        /// HTTP status.
        status: u16,
        /// OAuth error code, sanitized.
        error: String,
    },
    /// Not the JSON object RFC 6749 §5.1 describes.
    #[error("token response malformed: {0}")]
    Malformed(String),
    /// `token_type` is not Bearer (RFC 6750; compared case-insensitively, RFC 6749 §5.1).
    #[error("token_type is not Bearer")]
    NotBearer,
    /// No ID token although `openid` was requested.
    #[error("token response has no id_token")]
    NoIdToken,
    /// `expires_in` is negative or absurd.
    #[error("expires_in is invalid")]
    BadExpiry,
}

#[derive(Deserialize)]
struct RawTokenResponse {
    access_token: String,
    token_type: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    id_token: Option<String>,
}

/// Parses a token endpoint answer.
pub fn parse_token_response(
    status: u16,
    body: &[u8],
    require_id_token: bool,
) -> Result<TokenResponse, TokenResponseError> {
    if !(200..300).contains(&status) {
        let error = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .map(|e| {
                e.chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .take(64)
                    .collect()
            })
            .unwrap_or_else(|| "-".to_string());
        return Err(TokenResponseError::Status { status, error });
    }
    if body.len() > MAX_TOKEN_RESPONSE_BYTES {
        return Err(TokenResponseError::Malformed("too large".into()));
    }
    let raw: RawTokenResponse = serde_json::from_slice(body).map_err(|e| {
        // serde messages can quote input; keep only the category.
        TokenResponseError::Malformed(format!("{:?}", e.classify()))
    })?;
    if raw.access_token.is_empty() || raw.access_token.len() > token::MAX_TOKEN_LEN {
        return Err(TokenResponseError::Malformed(
            "access_token empty or too long".into(),
        ));
    }
    // It goes upstream as a header value, copied as is: a CR or LF would end the header on an
    // HTTP/1 connection and start one the IdP chose. RFC 6750's b64token is narrower still.
    if !raw.access_token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenResponseError::Malformed(
            "access_token has bytes other than visible ASCII".into(),
        ));
    }
    if !raw.token_type.eq_ignore_ascii_case("bearer") {
        return Err(TokenResponseError::NotBearer);
    }
    let expires_in = match raw.expires_in {
        None | Some(serde_json::Value::Null) => DEFAULT_EXPIRES_IN_SECS,
        Some(serde_json::Value::Number(n)) => match n.as_f64() {
            // Under a second is an already expired token: a session with it would send the
            // browser back to the IdP at once, and again, or refresh on every request.
            Some(v) if v.is_finite() && (1.0..=MAX_EXPIRES_IN_SECS as f64).contains(&v) => v as u64,
            _ => return Err(TokenResponseError::BadExpiry),
        },
        // Some IdPs send it as a string; accept digits only.
        Some(serde_json::Value::String(s))
            if !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()) =>
        {
            s.parse::<u64>()
                .ok()
                .filter(|v| (1..=MAX_EXPIRES_IN_SECS).contains(v))
                .ok_or(TokenResponseError::BadExpiry)?
        }
        Some(_) => return Err(TokenResponseError::BadExpiry),
    };
    let id_token = raw.id_token.filter(|t| !t.is_empty());
    if require_id_token && id_token.is_none() {
        return Err(TokenResponseError::NoIdToken);
    }
    Ok(TokenResponse {
        access_token: Secret::new(raw.access_token),
        id_token: id_token.map(Secret::new),
        refresh_token: raw.refresh_token.filter(|t| !t.is_empty()).map(Secret::new),
        expires_in,
    })
}

/// The configured filter: configuration plus derived keys. One per VM, shared by all streams.
#[derive(Debug)]
pub struct Gate {
    config: Config,
    keys: Keyring,
    sessions: RefCell<VerifiedCache<CachedSession>>,
    bearers: RefCell<VerifiedCache<CachedBearer>>,
    refused_refresh_tokens: RefCell<RefusedRefreshTokens>,
    /// Refreshes the IdP could not answer, by refresh-token digest: when to ask again.
    refresh_retry_at: RefCell<HashMap<[u8; 16], UnixSeconds>>,
    /// Logins ended before their cookies expire (this VM's view; the glue shares it).
    ended: RefCell<EndedLogins>,
    /// Endings decided here that the glue has not shared with the other VMs yet.
    unpublished_endings: RefCell<Vec<Ending>>,
}

/// A session read from the request's cookies.
struct FoundSession {
    session: Rc<Session>,
    needs_reseal: bool,
}

/// How long a worker waits before asking the IdP again for a refresh it could not answer.
pub const REFRESH_RETRY_SECS: u64 = 30;

/// Verified sessions and bearer tokens kept per VM (a few MB at most per worker).
pub const SESSION_CACHE_CAPACITY: usize = 1024;

/// Credentials this VM already verified, keyed by their exact text.
///
/// Decrypting a 1-2 KB cookie or checking an RS256 signature on every request is most of the
/// filter's cost inside wasm. A hit needs the very same bytes (any change is a miss and gets the
/// full check); the caller still checks expiry on every request; failures are never cached.
/// Entries are found by the value's last characters (the AEAD tag or JWS signature: random per
/// credential) so a lookup hashes a few bytes, and the whole value is compared on a hit.
struct VerifiedCache<V> {
    entries: HashMap<String, (String, V)>,
}

impl<V> Default for VerifiedCache<V> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
        }
    }
}

impl<V> std::fmt::Debug for VerifiedCache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifiedCache({} entries)", self.entries.len())
    }
}

fn cache_key(value: &str) -> &str {
    const TAG_CHARS: usize = 24;
    value
        .get(value.len().saturating_sub(TAG_CHARS)..)
        .unwrap_or(value)
}

/// `a == b` in 16-byte words. Inside wasm `==` on slices calls libc's `memcmp`, a byte loop
/// that made comparing a 1.5 KB cookie the filter's costliest step per request. It also takes
/// the same time wherever the first difference is.
pub(crate) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    const WORD: usize = 16;
    if a.len() != b.len() {
        return false;
    }
    let (a_words, a_rest) = a.split_at(a.len() - a.len() % WORD);
    let (b_words, b_rest) = b.split_at(a_words.len());
    let mut diff = 0u128;
    for (x, y) in a_words.chunks_exact(WORD).zip(b_words.chunks_exact(WORD)) {
        let x = u128::from_le_bytes(x.try_into().unwrap_or([0; WORD]));
        let y = u128::from_le_bytes(y.try_into().unwrap_or([0; WORD]));
        diff |= x ^ y;
    }
    for (x, y) in a_rest.iter().zip(b_rest) {
        diff |= u128::from(x ^ y);
    }
    diff == 0
}

impl<V> VerifiedCache<V> {
    fn get(&self, value: &str) -> Option<&V> {
        let (full, v) = self.entries.get(cache_key(value))?;
        same_bytes(full.as_bytes(), value.as_bytes()).then_some(v)
    }

    fn insert(&mut self, value: &str, v: V) {
        if self.entries.len() >= SESSION_CACHE_CAPACITY {
            // Bounded memory with no bookkeeping on the hot path.
            let mut keep = every_other();
            self.entries.retain(|_, _| keep());
        }
        self.entries
            .insert(cache_key(value).to_string(), (value.to_string(), v));
    }

    fn remove(&mut self, value: &str) {
        if self.get(value).is_some() {
            self.entries.remove(cache_key(value));
        }
    }
}

/// A `retain` predicate keeping about half of a full cache, in hash order (arbitrary, not
/// attacker-chosen).
fn every_other() -> impl FnMut() -> bool {
    let mut keep = false;
    move || {
        keep = !keep;
        keep
    }
}

/// Refresh tokens the IdP refused with `invalid_grant` (revoked at logout, expired, reused),
/// by digest. A session cookie carrying one is ended without asking the IdP again (unless
/// another worker's answer for it is at hand): a copied or stale cookie sent over and over must
/// not become one token request per request.
#[derive(Default)]
struct RefusedRefreshTokens {
    keys: HashSet<[u8; 16]>,
}

impl std::fmt::Debug for RefusedRefreshTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RefusedRefreshTokens({} entries)", self.keys.len())
    }
}

impl RefusedRefreshTokens {
    fn insert(&mut self, key: [u8; 16]) {
        if self.keys.len() >= SESSION_CACHE_CAPACITY && !self.keys.contains(&key) {
            // Forgetting one only costs the IdP one more refusal.
            let mut keep = every_other();
            self.keys.retain(|_| keep());
        }
        self.keys.insert(key);
    }

    fn contains(&self, key: &[u8; 16]) -> bool {
        self.keys.contains(key)
    }
}

/// A verified session; the host is part of the AEAD context, so it must match too.
struct CachedSession {
    host: String,
    session: Rc<Session>,
    needs_reseal: bool,
    /// Looked up in the ended logins on every hit.
    ids: SessionIds,
}

/// A verified bearer token and the identity headers it yields.
struct CachedBearer {
    /// The key set the token was verified against ([`Jwks::generation`]).
    jwks_generation: u64,
    expires_at: UnixSeconds,
    /// The latest of `nbf` and `iat`: a clock that moves back must not make it valid early.
    valid_from: UnixSeconds,
    set_headers: Vec<(String, String)>,
}

impl Gate {
    /// Builds the engine from a validated configuration.
    pub fn new(config: Config) -> Self {
        let keys = Keyring::new(
            &config.cookie_secret,
            &config.previous_cookie_secrets,
            &key_scope(&config.issuer, &config.client_id),
        );
        Self {
            config,
            keys,
            sessions: RefCell::new(VerifiedCache::default()),
            bearers: RefCell::new(VerifiedCache::default()),
            refused_refresh_tokens: RefCell::new(RefusedRefreshTokens::default()),
            refresh_retry_at: RefCell::new(HashMap::new()),
            ended: RefCell::new(EndedLogins::default()),
            unpublished_endings: RefCell::new(Vec::new()),
        }
    }

    /// Records an ending in this VM's set and queues it for the other VMs; true when the set
    /// was full of live records and one was dropped.
    fn end(&self, ending: Ending, now: UnixSeconds) -> bool {
        let inserted = self.ended.borrow_mut().insert(ending, now);
        if inserted != Inserted::Unchanged {
            self.queue_endings(vec![ending]);
        }
        inserted == Inserted::Evicted
    }

    /// Endings decided in this VM and not shared yet, for the glue to share.
    pub fn take_unpublished_endings(&self) -> Vec<Ending> {
        std::mem::take(&mut *self.unpublished_endings.borrow_mut())
    }

    /// Queues endings for the glue to share: new ones, or ones it could not share yet.
    pub fn queue_endings(&self, endings: Vec<Ending>) {
        let mut queue = self.unpublished_endings.borrow_mut();
        queue.extend(endings);
        if queue.len() > MAX_ENDED {
            // This VM refuses them anyway; only the oldest lose their chance to be shared.
            let excess = queue.len() - MAX_ENDED;
            queue.drain(..excess);
        }
    }

    /// Adds the endings other VMs shared (a value [`EndedLogins::encode`] wrote); a value that
    /// does not decode changes nothing.
    pub fn learn_endings(&self, shared: &[u8], now: UnixSeconds) {
        if let Some(other) = EndedLogins::decode(shared, now) {
            self.learn_ended(&other, now);
        }
    }

    /// Adds the endings of `other` (the shared set this VM just wrote).
    pub fn learn_ended(&self, other: &EndedLogins, now: UnixSeconds) {
        self.ended.borrow_mut().merge(other, now);
    }

    /// How many ended logins this VM knows of.
    pub fn ended_logins(&self) -> usize {
        self.ended.borrow().len()
    }

    /// Ends the session as a refusal would when the IdP refused this refresh's token with
    /// `invalid_grant` before (as seen by this VM), without presenting the token again; `None`
    /// when it did not. The glue asks after looking for another worker's answer for the token.
    pub fn end_if_refused_earlier(&self, pending: &PendingRefresh) -> Option<(RefreshStep, Note)> {
        let refused = pending.session.refresh_token.is_some()
            && self
                .refused_refresh_tokens
                .borrow()
                .contains(&refresh_token_key(&pending.session));
        refused.then(|| {
            ended_refresh(
                pending,
                "refused",
                "refresh token refused by the IdP earlier; session ended without asking again"
                    .to_string(),
            )
        })
    }

    /// Number of verified sessions cached in this VM.
    pub fn cached_sessions(&self) -> usize {
        self.sessions.borrow().entries.len()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Decides what to do with a request.
    pub fn decide(
        &self,
        req: &Request<'_>,
        known: Known<'_>,
        now: UnixSeconds,
        rng: &mut dyn Random,
    ) -> (Decision, Note) {
        if !self.config.protects(req.authority) {
            return (Decision::PassThrough, Note::none());
        }
        if !port_is_well_formed(req.authority) {
            // No browser sends it; refused rather than guessed at, so a host spelling can never
            // make a protected host look like another one.
            return (
                Decision::Reply(Failure::BadRequest.reply(false, req.request_id)),
                Note::log("refused: the Host header of a protected host has a malformed port"),
            );
        }
        let (path, query) = split_path(req.path);
        let cookies = CookieList::parse(&req.cookie_headers);
        let host = req.host();

        if path == self.callback_path() {
            let Some(provider) = known.provider else {
                return (Decision::NeedProvider, Note::none());
            };
            return self.callback(req, &host, query, &cookies, provider, now);
        }
        if path == self.config.logout_path {
            if !signs_out_at_once(req) {
                // Another site's link or form (a sibling subdomain's too) would sign the user
                // out here and, with the ID token hint, at the IdP: asked first, and the
                // confirmation posts same-origin. Clients without Fetch Metadata sign out as
                // they ask.
                return (
                    Decision::Reply(Reply::logout_confirmation(&self.config.logout_path)),
                    Note::log("logout request from another site: confirmation asked"),
                );
            }
            let Some(provider) = known.provider else {
                return (Decision::NeedProvider, Note::none());
            };
            let (reply, note) = self.sign_out(&host, &cookies, Some(provider), now);
            return (Decision::Reply(reply), note);
        }
        if self.config.is_skipped(req.path)
            || (self.config.pass_cors_preflight && is_cors_preflight(req))
        {
            return (
                Decision::Forward(self.forward_without_identity(req)),
                Note::none(),
            );
        }

        let (found, mut note) = self.session_from(&host, &cookies, now);
        if let Some(found) = found {
            let session = found.session;
            let due = session.refresh_due(now, self.config.refresh_skew);
            // The IdP did not answer this session's refresh moments ago: not asked again on
            // every request of an outage (served while the token is valid, 503 after).
            let deferred = due && self.refresh_deferred(&session, now);
            let wants_refresh = due && !(deferred && session.is_usable(now));
            if wants_refresh && session.refresh_token.is_some() {
                if deferred {
                    return (
                        Decision::Reply(
                            Failure::IdpUnavailable.reply(req.is_navigation(), req.request_id),
                        ),
                        Note::log("refresh paused after the IdP did not answer; 503"),
                    );
                }
                let Some(provider) = known.provider else {
                    // Still valid: serve now rather than wait for discovery; refresh next time.
                    if session.is_usable(now) {
                        let fwd = self.forward_with(
                            req,
                            &session,
                            &cookies,
                            found.needs_reseal,
                            now,
                            rng,
                        );
                        return (Decision::Forward(fwd), note);
                    }
                    return (Decision::NeedProvider, note);
                };
                let token_call = self.token_request(
                    provider,
                    &[
                        ("grant_type", "refresh_token"),
                        (
                            "refresh_token",
                            session
                                .refresh_token
                                .as_ref()
                                .map(|t| t.expose())
                                .unwrap_or(""),
                        ),
                    ],
                );
                let pending = PendingRefresh {
                    host: host.to_string(),
                    cookie: cookie_header_without(&req.cookie_headers, is_own_cookie),
                    present_session_cookies: session_cookie_names(&cookies),
                    session: (*session).clone(),
                };
                return (
                    Decision::Refresh {
                        call: token_call,
                        pending,
                    },
                    note,
                );
            }
            if session.is_usable(now) {
                let fwd = self.forward_with(req, &session, &cookies, found.needs_reseal, now, rng);
                return (Decision::Forward(fwd), note);
            }
            note = Note::event(Event::SessionRejected("expired"), "session expired");
        }

        if let Some(bearer) = &self.config.bearer_tokens {
            // A browser sending another scheme (Basic, remembered from an auth layer in front)
            // presents no token: it gets the login like any browser without one.
            if !req.authorization.is_empty() && (!req.is_navigation() || presents_bearer(req)) {
                return self.bearer(req, &bearer.audiences, known, now);
            }
        }
        if !req.is_navigation() || self.config.is_api_path(req.path) {
            let mut reply = Failure::Unauthenticated.reply(false, req.request_id);
            if matches!(
                note.event,
                Some(Event::SessionRejected(
                    "ended" | "expired" | "max_age" | "idle"
                ))
            ) {
                // A session that will never be accepted again is not worth sending again (an
                // unreadable one may be from a key or chunk this replica does not know yet).
                reply = reply.with_cookies(
                    session_cookie_names(&cookies)
                        .iter()
                        .map(|n| delete_cookie(n))
                        .collect(),
                );
            }
            return (Decision::Reply(reply), note);
        }
        if !matches!(req.method, "GET" | "HEAD") {
            // A cross-site form POST carries none of this site's SameSite=Lax cookies, though its
            // answer may set them: a login started here could not see the pending logins to cap
            // them, and a page posting again and again would pile up login cookies until every
            // request to the host got Envoy's 431. The GET this 303 turns it into carries them.
            // Relative: whatever the Host header holds, the browser stays on the origin it is on.
            let again = sanitize_return_path(req.path).to_string();
            let mut reply = Reply::redirect(again, Vec::new());
            reply.status = 303;
            // Whatever was wrong with the session is counted by the GET; logged here too, for a
            // client that does not follow.
            let logged = Note {
                event: None,
                ..note
            };
            return (Decision::Reply(reply), logged);
        }
        let Some(provider) = known.provider else {
            return (Decision::NeedProvider, note);
        };
        match self.start_login(req, &host, &cookies, provider, now, rng) {
            Ok(reply) => {
                let log = note.log.unwrap_or_else(|| "login started".into());
                (
                    Decision::Reply(reply),
                    Note::event(Event::LoginStarted, log),
                )
            }
            Err(_) => (
                Decision::Reply(Failure::Internal.reply(true, req.request_id)),
                Note::log("no randomness from the host"),
            ),
        }
    }

    /// A logout while the IdP's discovery document cannot be had (none cached, the IdP down or
    /// answering garbage): signed out here all the same, cookies deleted and the login ended in
    /// every worker, with a page saying that the IdP's own session remains. `None` for any
    /// other request, which fails as before.
    pub fn logout_without_idp(&self, req: &Request<'_>, now: UnixSeconds) -> Option<(Reply, Note)> {
        if !self.config.protects(req.authority)
            || !port_is_well_formed(req.authority)
            || split_path(req.path).0 != self.config.logout_path
            || !signs_out_at_once(req)
        {
            return None;
        }
        let cookies = CookieList::parse(&req.cookie_headers);
        let (reply, mut note) = self.sign_out(&req.host(), &cookies, None, now);
        note.log = Some(format!(
            "{}; IdP discovery unavailable: signed out at the gateway only, the IdP session \
             remains",
            note.log.unwrap_or_default()
        ));
        Some((reply, note))
    }

    /// The path the IdP redirects back to.
    pub fn callback_path(&self) -> &str {
        &self.config.redirect_path
    }

    fn redirect_uri(&self, scheme: &str, authority: &str) -> String {
        match &self.config.redirect_uri {
            Some(u) => u.to_string(),
            None => format!(
                "{scheme}://{}{}",
                authority.to_ascii_lowercase(),
                self.config.redirect_path
            ),
        }
    }

    fn session_from(
        &self,
        host: &str,
        cookies: &[(&str, &str)],
        now: UnixSeconds,
    ) -> (Option<FoundSession>, Note) {
        let value = match assemble_session_cookie(cookies) {
            Ok(Some(v)) => v,
            Ok(None) => return (None, Note::none()),
            Err(why) => {
                return (
                    None,
                    Note::event(
                        Event::SessionRejected("malformed"),
                        format!("session rejected: {why}"),
                    ),
                )
            }
        };
        let ended = self.ended.borrow();
        let hit = self
            .sessions
            .borrow()
            .get(&value)
            .filter(|c| c.host == host)
            .map(|c| {
                (
                    c.session.clone(),
                    c.needs_reseal,
                    !ended.is_empty() && ended.ends(&c.ids),
                )
            });
        if let Some((session, needs_reseal, has_ended)) = hit {
            if has_ended {
                return (None, ended_note());
            }
            if let Some(over) = self.over(&session, now) {
                return (None, over);
            }
            return (
                Some(FoundSession {
                    session,
                    needs_reseal,
                }),
                Note::none(),
            );
        }
        match Session::open(&self.keys, host, &value) {
            Ok((mut session, needs_reseal)) => {
                if let Some(over) = self.over(&session, now) {
                    return (None, over);
                }
                if self.config.upstream_authorization == UpstreamAuthorization::IdToken {
                    // Sealed before the ID token's expiry counted, or under another mode.
                    let id_token_expires_at = session
                        .id_token
                        .as_ref()
                        .and_then(|t| token::sealed_token_expiry(t.expose()));
                    session.expires_at =
                        self.tokens_expire_at(session.expires_at, id_token_expires_at);
                }
                let ids = SessionIds::of(&session);
                if ended.ends(&ids) {
                    return (None, ended_note());
                }
                let session = Rc::new(session);
                self.sessions.borrow_mut().insert(
                    &value,
                    CachedSession {
                        host: host.to_string(),
                        session: session.clone(),
                        needs_reseal,
                        ids,
                    },
                );
                (
                    Some(FoundSession {
                        session,
                        needs_reseal,
                    }),
                    Note::none(),
                )
            }
            Err(e) => (
                None,
                Note::event(
                    Event::SessionRejected("invalid"),
                    format!("session rejected: {e}"),
                ),
            ),
        }
    }
    fn cookie_max_age(&self, session: &Session, now: UnixSeconds) -> u64 {
        self.accepted_until(session).saturating_sub(now).max(1)
    }

    /// Why a session is no longer accepted at `now` (its absolute end, or unused too long),
    /// if it is not.
    fn over(&self, session: &Session, now: UnixSeconds) -> Option<Note> {
        if now >= self.session_end(session) {
            return Some(Note::event(
                Event::SessionRejected("max_age"),
                "session reached session_max_age",
            ));
        }
        if self.idle_end(session).is_some_and(|end| now >= end) {
            return Some(Note::event(
                Event::SessionRejected("idle"),
                "session unused for session_idle_timeout",
            ));
        }
        None
    }

    /// Until when a session is accepted if not used again: its absolute end, or sooner the end
    /// of its idle time.
    fn accepted_until(&self, session: &Session) -> UnixSeconds {
        let end = self.session_end(session);
        self.idle_end(session).map_or(end, |idle| idle.min(end))
    }

    /// When a session the cookie last recorded in use ends unless used again
    /// (`session_idle_timeout`).
    fn idle_end(&self, session: &Session) -> Option<UnixSeconds> {
        self.config
            .session_idle_timeout
            .map(|idle| last_seen(session).saturating_add(idle))
    }

    /// Whether this request's use is to be written into the cookie: a tenth of the idle timeout
    /// after the cookie last recorded one, so a busy session gets a new cookie now and then, not
    /// on every request (with the margin before a refresh in `forward_with`, it ends at most a
    /// tenth of the timeout and a minute short of it after its last request).
    fn use_to_record(&self, session: &Session, now: UnixSeconds) -> bool {
        self.config
            .session_idle_timeout
            .is_some_and(|idle| now >= last_seen(session).saturating_add(idle / 10))
    }

    /// The absolute end of a session: the one sealed at login, or sooner when `session_max_age`
    /// was lowered since (an operator shortening sessions after an incident shortens the live
    /// ones too).
    fn session_end(&self, session: &Session) -> UnixSeconds {
        session.max_expires_at.min(
            session
                .created_at
                .saturating_add(self.config.session_max_age),
        )
    }

    /// The value of an identity header from `claim`, if it can be passed on: `sub` from the
    /// session's subject when given, and the claim named `email` only when the token vouches for
    /// it (unless `allow_unverified_email`): an IdP that lets users sign up with any address
    /// would otherwise let one claim another's. The rule follows the claim's name: another claim
    /// holding an address (`mail`, `upn`) is passed on as the IdP sends it.
    fn header_from_claim(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
        subject: Option<&str>,
        claim: &str,
    ) -> Option<String> {
        if claim == "email" && !self.config.allow_unverified_email && !email_vouched_for(claims) {
            return None;
        }
        match subject {
            Some(s) if claim == "sub" => claim_header_value(&serde_json::Value::String(s.into())),
            _ => claims
                .get(claim)
                .and_then(|value| named_claim_header_value(claim, value)),
        }
    }

    fn identity_headers(&self, session: &Session) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (header, claim) in &self.config.claims_to_headers {
            if let Some(v) = self.header_from_claim(&session.claims, Some(&session.subject), claim)
            {
                out.push((header.clone(), v));
            }
        }
        if self.config.pass_access_token_headers {
            for h in ["x-auth-request-access-token", "x-forwarded-access-token"] {
                out.push((h.to_string(), session.access_token.expose().to_string()));
            }
        }
        out
    }

    fn forward_with(
        &self,
        req: &Request<'_>,
        session: &Session,
        cookies: &CookieList<'_>,
        needs_reseal: bool,
        now: UnixSeconds,
        rng: &mut dyn Random,
    ) -> Forward {
        let mut fwd = self.forward_session(session, cookies.header_without(is_own_cookie));
        // Not within a minute of the refresh: this response could reach the browser after the
        // refresh's and put back a refresh token the IdP has rotated. The refresh records the use.
        let record_use = self.use_to_record(session, now)
            && !session.refresh_due(
                now.saturating_add(USE_RECORD_REFRESH_MARGIN_SECS),
                self.config.refresh_skew,
            );
        if needs_reseal || record_use {
            // Sealed with a previous key: reseal with the current one, so rotation logs nobody
            // out. Or in use: the cookie records it for session_idle_timeout.
            let mut s = session.clone();
            s.seen_at = now;
            if let Ok((set, _)) = self.session_cookies(
                &mut s,
                &req.host(),
                &session_cookie_names(cookies),
                now,
                rng,
            ) {
                fwd.response_cookies = set;
            }
        }
        fwd
    }

    /// When a session's tokens expire (and are refreshed before). With `upstream_authorization:
    /// id_token` the upstream receives the ID token, so the session's tokens expire with it too.
    fn tokens_expire_at(
        &self,
        access_token_expires_at: UnixSeconds,
        id_token_expires_at: Option<UnixSeconds>,
    ) -> UnixSeconds {
        match (self.config.upstream_authorization, id_token_expires_at) {
            (UpstreamAuthorization::IdToken, Some(id)) => access_token_expires_at.min(id),
            // No readable expiry (not seen: every ID token was verified with one): due now, and
            // its refresh renews the ID token or ends the session.
            (UpstreamAuthorization::IdToken, None) => 0,
            _ => access_token_expires_at,
        }
    }

    fn forward_session(&self, session: &Session, cookie: Option<String>) -> Forward {
        let authorization = match self.config.upstream_authorization {
            UpstreamAuthorization::AccessToken => Some(bearer_value(session.access_token.expose())),
            UpstreamAuthorization::IdToken => {
                session.id_token.as_ref().map(|t| bearer_value(t.expose()))
            }
            UpstreamAuthorization::None => None,
        };
        Forward {
            authorization,
            cookie,
            set_headers: self.identity_headers(session),
            response_cookies: Vec::new(),
        }
    }

    fn forward_without_identity(&self, req: &Request<'_>) -> Forward {
        Forward {
            authorization: None,
            cookie: cookie_header_without(&req.cookie_headers, is_own_cookie),
            set_headers: Vec::new(),
            response_cookies: Vec::new(),
        }
    }

    fn bearer(
        &self,
        req: &Request<'_>,
        audiences: &[String],
        known: Known<'_>,
        now: UnixSeconds,
    ) -> (Decision, Note) {
        let reject = |why: &'static str| {
            (
                Decision::Reply(Failure::Unauthenticated.reply(false, req.request_id)),
                Note::event(
                    Event::BearerRejected(why),
                    format!("bearer token rejected: {why}"),
                ),
            )
        };
        let [value] = req.authorization.as_slice() else {
            return reject("several Authorization headers");
        };
        let token = match bearer_token(value) {
            Some(t) if !t.is_empty() => t,
            _ => return reject("not a Bearer token"),
        };
        let forward = |set_headers: Vec<(String, String)>| {
            let fwd = Forward {
                authorization: Some(bearer_value(token)),
                cookie: cookie_header_without(&req.cookie_headers, is_own_cookie),
                set_headers,
                response_cookies: Vec::new(),
            };
            (Decision::Forward(fwd), Note::count(Event::BearerAccepted))
        };
        // A token this VM already verified: the signature check (about a millisecond for RS256
        // in wasm) is not repeated, expiry is.
        // Only against the key set it was verified with: a JWKS fetched since (a key withdrawn)
        // means one more signature check.
        let generation = known.jwks.map(Jwks::generation);
        let hit = self.bearers.borrow().get(token).and_then(|c| {
            (Some(c.jwks_generation) == generation
                && now <= c.expires_at.saturating_add(DEFAULT_CLOCK_SKEW_SECS)
                && now.saturating_add(DEFAULT_CLOCK_SKEW_SECS) >= c.valid_from)
                .then(|| c.set_headers.clone())
        });
        if let Some(set_headers) = hit {
            return forward(set_headers);
        }
        let Some(jwks) = known.jwks else {
            // A value that cannot be a token of ours is refused before any key is fetched for
            // it (with keys at hand, `verify` makes the same checks).
            if let Err(e) = token::check_shape(token) {
                return reject(bearer_rejection(&e));
            }
            return if known.provider.is_some() {
                (Decision::NeedKeys, Note::none())
            } else {
                (Decision::NeedProvider, Note::none())
            };
        };
        let expect = Expectations {
            exclusive_audiences: false,
            issuer: &self.config.issuer,
            audiences,
            client_id: None,
            nonce: None,
            require_iat: false,
            require_sub: false,
            now,
            skew: DEFAULT_CLOCK_SKEW_SECS,
        };
        match token::verify(token, jwks, &expect) {
            Ok(verified) => {
                let mut set_headers = Vec::new();
                for (header, claim) in &self.config.claims_to_headers {
                    if let Some(v) = self.header_from_claim(&verified.claims, None, claim) {
                        set_headers.push((header.clone(), v));
                    }
                }
                let valid_from = ["nbf", "iat"]
                    .iter()
                    .filter_map(|c| verified.claims.get(*c).and_then(serde_json::Value::as_u64))
                    .max()
                    .unwrap_or(0);
                self.bearers.borrow_mut().insert(
                    token,
                    CachedBearer {
                        jwks_generation: jwks.generation(),
                        expires_at: verified.expires_at,
                        valid_from,
                        set_headers: set_headers.clone(),
                    },
                );
                forward(set_headers)
            }
            Err(TokenError::UnknownKey) if known.may_refetch_keys => (
                Decision::NeedKeys,
                Note::log("bearer key not in cached JWKS; refetching"),
            ),
            Err(e) => reject(bearer_rejection(&e)),
        }
    }

    fn start_login(
        &self,
        req: &Request<'_>,
        host: &str,
        cookies: &[(&str, &str)],
        provider: &ProviderMetadata,
        now: UnixSeconds,
        rng: &mut dyn Random,
    ) -> Result<Reply, crate::crypto::SealError> {
        let flow_id = random_token(rng, 12)?;
        let state = format!("{flow_id}.{}", random_token(rng, 24)?);
        let nonce = random_token(rng, 24)?;
        let code_verifier = random_token(rng, 32)?;
        let code_challenge =
            URL_SAFE_NO_PAD.encode(hmac_sha256::Hash::hash(code_verifier.as_bytes()));
        let (path, query) = split_path(req.path);
        // The return URL is sealed into the login cookie, which must stay under the browsers'
        // 4096-byte limit: a long query is dropped, a long path becomes `/`.
        let return_to = if path.len() > MAX_RETURN_URL_BYTES {
            "/".to_string()
        } else if query.is_empty() || path.len() + 1 + query.len() > MAX_RETURN_URL_BYTES {
            path.to_string()
        } else {
            format!("{path}?{query}")
        };
        let login = LoginState {
            state: Secret::new(state.clone()),
            nonce: Secret::new(nonce.clone()),
            code_verifier: Secret::new(code_verifier),
            return_to,
            authority: req.authority.to_ascii_lowercase(),
            created_at: now,
        };
        let name = login_cookie_name(&flow_id);
        let sealed = login.seal(&self.keys, host, &name, rng)?;

        let mut location = provider.authorization_endpoint.clone();
        let scope = self.config.scopes.join(" ");
        let redirect_uri = self.redirect_uri(req.scheme, req.authority);
        {
            let mut q = location.query_pairs_mut();
            q.append_pair("response_type", "code");
            q.append_pair("client_id", &self.config.client_id);
            q.append_pair("redirect_uri", &redirect_uri);
            q.append_pair("scope", &scope);
            q.append_pair("state", &state);
            q.append_pair("nonce", &nonce);
            q.append_pair("code_challenge", &code_challenge);
            q.append_pair("code_challenge_method", "S256");
        }
        let mut set_cookies = vec![set_cookie(&name, &sealed, LOGIN_TTL_SECS)];
        // A session cookie that did not verify is cleared, so a stale or planted one cannot
        // linger next to the new session (GHSA-f24x-5g9q-753f).
        set_cookies.extend(
            session_cookie_names(cookies)
                .iter()
                .map(|n| delete_cookie(n)),
        );
        set_cookies.extend(self.expire_old_logins(host, cookies, now));
        Ok(Reply::redirect(location.to_string(), set_cookies))
    }

    /// Deletes login cookies beyond the newest `MAX_PENDING_LOGINS - 1`, and unreadable ones.
    fn expire_old_logins(
        &self,
        host: &str,
        cookies: &[(&str, &str)],
        now: UnixSeconds,
    ) -> Vec<String> {
        let mut live: Vec<(u64, &str)> = Vec::new();
        let mut out = Vec::new();
        for (name, value) in cookies.iter().filter(|(n, _)| is_login_cookie_name(n)) {
            match LoginState::open(&self.keys, host, name, value, now) {
                Ok(l) => live.push((l.created_at, name)),
                Err(_) => out.push(delete_cookie(name)),
            }
        }
        live.sort_by_key(|l| std::cmp::Reverse(l.0));
        for (_, name) in live.iter().skip(MAX_PENDING_LOGINS.saturating_sub(1)) {
            out.push(delete_cookie(name));
        }
        out
    }

    #[allow(clippy::too_many_lines)]
    fn callback(
        &self,
        req: &Request<'_>,
        host: &str,
        query: &str,
        cookies: &[(&str, &str)],
        provider: &ProviderMetadata,
        now: UnixSeconds,
    ) -> (Decision, Note) {
        let browser = req.is_navigation() || req.sec_fetch_mode.is_none();
        let fail = |f: Failure, reason: &'static str, extra_cookies: Vec<String>| {
            (
                Decision::Reply(f.reply(browser, req.request_id).with_cookies(extra_cookies)),
                Note::event(
                    Event::LoginFailed(reason),
                    format!("callback rejected: {reason}"),
                ),
            )
        };
        let malformed = Failure::BadCallback("The sign-in response was malformed.");
        let q = match StrictQuery::parse(query) {
            Ok(q) => q,
            Err(QueryError::Duplicate(_)) => return fail(malformed, "duplicate parameter", vec![]),
            Err(QueryError::TooMany) => return fail(malformed, "too many parameters", vec![]),
            Err(QueryError::TooLong) => return fail(malformed, "query too long", vec![]),
        };
        let Some(state) = q.get("state") else {
            return fail(
                Failure::BadCallback("The sign-in response had no state."),
                "missing state",
                vec![],
            );
        };
        let flow_id = match state.split_once('.') {
            Some((id, rest))
                if !id.is_empty()
                    && id.len() <= 32
                    && !rest.is_empty()
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
            {
                id
            }
            _ => {
                return fail(
                    Failure::BadCallback("The sign-in response had an unknown state."),
                    "malformed state",
                    vec![],
                )
            }
        };
        let cookie_name = login_cookie_name(flow_id);
        let mut matching = cookies
            .iter()
            .filter(|(n, _)| *n == cookie_name.as_str())
            .map(|(_, v)| *v);
        let (Some(login_value), None) = (matching.next(), matching.next()) else {
            return fail(
                Failure::BadCallback("This sign-in was started in another browser or has expired."),
                "no login cookie for this state",
                vec![],
            );
        };
        let delete_login = vec![delete_cookie(&cookie_name)];
        let login = match LoginState::open(&self.keys, host, &cookie_name, login_value, now) {
            Ok(l) => l,
            Err(_) => {
                return fail(
                    Failure::BadCallback("This sign-in has expired."),
                    "login cookie invalid or expired",
                    delete_login,
                )
            }
        };
        if !login.state.ct_eq(state) {
            return fail(
                Failure::BadCallback("The sign-in response did not match."),
                "state mismatch",
                delete_login,
            );
        }
        // The code was issued for the redirect_uri built from the login's authority; a callback
        // on another host:port is not this login's callback (and would waste the code).
        if !login.authority.is_empty() && !login.authority.eq_ignore_ascii_case(req.authority) {
            return fail(
                Failure::BadCallback("The sign-in response came back to another address."),
                "authority mismatch",
                delete_login,
            );
        }
        // RFC 9207: the authorization response's `iss` must be our issuer (mix-up defence).
        match q.get("iss") {
            Some(iss) if iss != self.config.issuer => {
                return fail(
                    Failure::BadCallback("The sign-in response came from an unexpected issuer."),
                    "iss mismatch",
                    delete_login,
                )
            }
            None if provider.authorization_response_iss_parameter_supported => {
                return fail(
                    Failure::BadCallback("The sign-in response was incomplete."),
                    "iss missing",
                    delete_login,
                )
            }
            _ => {}
        }
        if let Some(error) = q.get("error") {
            return fail(
                Failure::LoginDenied(error.to_string()),
                "idp error",
                delete_login,
            );
        }
        let Some(code) = q.get("code").filter(|c| !c.is_empty() && c.len() <= 4096) else {
            return fail(
                Failure::BadCallback("The sign-in response had no code."),
                "missing code",
                delete_login,
            );
        };

        let redirect_uri = self.redirect_uri(req.scheme, req.authority);
        let call = self.token_request(
            provider,
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", &redirect_uri),
                ("code_verifier", login.code_verifier.expose()),
            ],
        );
        let pending = PendingLogin {
            login_cookie: cookie_name,
            host: host.to_string(),
            origin_scheme: req.scheme.to_string(),
            authority: req.authority.to_string(),
            return_to: login.return_to,
            nonce: login.nonce,
            browser,
            request_id: req.request_id.map(str::to_string),
            present_session_cookies: session_cookie_names(cookies),
        };
        (Decision::ExchangeCode { call, pending }, Note::none())
    }

    /// A POST to the token endpoint with client authentication (RFC 6749 §2.3.1, §4.1.3, §6).
    fn token_request(&self, provider: &ProviderMetadata, params: &[(&str, &str)]) -> Callout {
        let mut fields: Vec<(&str, &str)> = params.to_vec();
        let mut headers = vec![
            (
                "content-type".to_string(),
                "application/x-www-form-urlencoded".to_string(),
            ),
            ("accept".to_string(), "application/json".to_string()),
        ];
        match self.config.token_endpoint_auth_method {
            TokenEndpointAuthMethod::ClientSecretBasic => {
                let user = form_encode(&[("", &self.config.client_id)]);
                let pass = form_encode(&[("", self.config.client_secret.expose())]);
                let credentials = format!("{}:{}", &user[1..], &pass[1..]);
                headers.push((
                    "authorization".to_string(),
                    format!("Basic {}", STANDARD.encode(credentials)),
                ));
            }
            TokenEndpointAuthMethod::ClientSecretPost => {
                fields.push(("client_id", &self.config.client_id));
                fields.push(("client_secret", self.config.client_secret.expose()));
            }
        }
        Callout {
            method: "POST",
            path: path_and_query(&provider.token_endpoint),
            authority: self.callout_authority(&provider.token_endpoint),
            headers,
            body: form_encode(&fields).into_bytes(),
        }
    }

    /// A GET for a document on the IdP (discovery, JWKS).
    pub fn document_request(&self, url: &Url) -> Callout {
        Callout {
            method: "GET",
            path: path_and_query(url),
            authority: self.callout_authority(url),
            headers: vec![("accept".to_string(), "application/json".to_string())],
            body: Vec::new(),
        }
    }

    /// The discovery request for the configured issuer.
    pub fn discovery_request(&self) -> Option<Callout> {
        crate::http::parse_url(&crate::discovery::discovery_url(&self.config.issuer))
            .ok()
            .map(|u| self.document_request(&u))
    }

    fn callout_authority(&self, url: &Url) -> String {
        if let Some(a) = &self.config.idp_authority {
            return a.clone();
        }
        let host = url.host_str().unwrap_or_default();
        match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        }
    }

    /// Finishes a login once the token endpoint answered: checks the answer and the ID token,
    /// then sets the session cookie and sends the browser back where it started.
    pub fn complete_login(
        &self,
        pending: &PendingLogin,
        status: u16,
        body: &[u8],
        keys: Keys<'_>,
        now: UnixSeconds,
        rng: &mut dyn Random,
    ) -> (LoginStep, Note) {
        let fail = |f: Failure, reason: &'static str, detail: String| {
            (
                LoginStep::Done(pending.failed(f)),
                Note::event(Event::LoginFailed(reason), detail),
            )
        };
        let tokens = match parse_token_response(status, body, true) {
            Ok(t) => t,
            // 502-504 come from Envoy itself when the IdP times out, resets or has no healthy
            // endpoint (or from a proxy in front of the IdP): unreachable, not a bad answer.
            Err(
                e @ TokenResponseError::Status {
                    status: 502..=504, ..
                },
            ) => {
                return fail(
                    Failure::IdpUnavailable,
                    "idp unreachable",
                    format!("token exchange failed: {e}"),
                )
            }
            Err(e) => {
                return fail(
                    Failure::IdpInvalid,
                    "token exchange",
                    format!("token exchange failed: {e}"),
                )
            }
        };
        let Some(jwks) = keys.jwks else {
            return (LoginStep::NeedKeys, Note::none());
        };
        let Some(id_token) = tokens.id_token.as_ref() else {
            return fail(
                Failure::IdpInvalid,
                "token exchange",
                "token exchange failed: no id_token".into(),
            );
        };
        let audiences = [self.config.client_id.clone()];
        let expect = Expectations {
            exclusive_audiences: true,
            issuer: &self.config.issuer,
            audiences: &audiences,
            client_id: Some(&self.config.client_id),
            nonce: Some(pending.nonce.expose()),
            require_iat: true,
            require_sub: true,
            now,
            skew: DEFAULT_CLOCK_SKEW_SECS,
        };
        let verified = match token::verify(id_token.expose(), jwks, &expect) {
            Ok(v) => v,
            Err(TokenError::UnknownKey) if keys.may_refetch => {
                return (
                    LoginStep::NeedKeys,
                    Note::log("ID token key not in cached JWKS; refetching"),
                )
            }
            Err(e) => {
                return fail(
                    Failure::IdpInvalid,
                    "id token",
                    format!("ID token rejected: {e}"),
                )
            }
        };
        if self.config.upstream_authorization == UpstreamAuthorization::IdToken
            && verified.expires_at <= now
        {
            // Accepted within the clock skew, but the upstream would get it expired and the
            // session would be due at once: a login loop instead of an answer.
            return fail(
                Failure::IdpInvalid,
                "id token",
                "ID token rejected: it has expired, and upstream_authorization is id_token \
                 (is the IdP's clock behind the gateway's?)"
                    .into(),
            );
        }
        let Ok(login_id) = random_token(rng, 16) else {
            return fail(
                Failure::Internal,
                "no randomness",
                "no randomness from the host".into(),
            );
        };
        let mut session = Session {
            access_token: tokens.access_token,
            id_token: tokens.id_token,
            refresh_token: tokens.refresh_token,
            expires_at: self.tokens_expire_at(
                now.saturating_add(tokens.expires_in),
                Some(verified.expires_at),
            ),
            tokens_at: now,
            subject: verified.subject.unwrap_or_default(),
            created_at: now,
            seen_at: now,
            max_expires_at: now.saturating_add(self.config.session_max_age),
            login_id: Some(login_id),
            claims: self.kept_claims(&verified.claims),
        };
        if session.refresh_token.is_none() {
            // Without a refresh token the session cannot outlive the access token.
            session.max_expires_at = session.max_expires_at.min(session.expires_at);
        }
        let (mut cookies, dropped) = match self.session_cookies(
            &mut session,
            &pending.host,
            &pending.present_session_cookies,
            now,
            rng,
        ) {
            Ok(v) => v,
            Err(f) => {
                return fail(
                    f,
                    "session too large",
                    "session cookie would exceed the budget even without ID and refresh tokens"
                        .into(),
                )
            }
        };
        cookies.push(delete_cookie(&pending.login_cookie));
        let location = same_origin_target(
            &pending.origin_scheme,
            &pending.authority.to_ascii_lowercase(),
            &pending.return_to,
        );
        let log = if dropped.is_empty() {
            "login completed".to_string()
        } else {
            format!(
                "login completed; dropped {} to fit the cookie budget",
                dropped.join(", ")
            )
        };
        (
            LoginStep::Done(Reply::redirect(location, cookies)),
            Note::event(Event::LoginCompleted, log),
        )
    }

    /// Applies a refresh answer: a new session on success; the end of the session otherwise.
    pub fn complete_refresh(
        &self,
        pending: &PendingRefresh,
        status: u16,
        body: &[u8],
        keys: Keys<'_>,
        now: UnixSeconds,
        rng: &mut dyn Random,
    ) -> (RefreshStep, Note) {
        self.complete_refresh_at(pending, status, body, keys, now, now, rng)
    }

    /// [`Gate::complete_refresh`] for an answer the IdP gave at `answer.at` (perhaps another
    /// worker's, reused): the new access token's lifetime counts from then, not from its reuse.
    pub fn complete_answered_refresh(
        &self,
        pending: &PendingRefresh,
        answer: &RefreshAnswer,
        keys: Keys<'_>,
        now: UnixSeconds,
        rng: &mut dyn Random,
    ) -> (RefreshStep, Note) {
        self.complete_refresh_at(
            pending,
            answer.status,
            &answer.body,
            keys,
            now,
            answer.at,
            rng,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn complete_refresh_at(
        &self,
        pending: &PendingRefresh,
        status: u16,
        body: &[u8],
        keys: Keys<'_>,
        now: UnixSeconds,
        answered_at: UnixSeconds,
        rng: &mut dyn Random,
    ) -> (RefreshStep, Note) {
        let answered_at = answered_at.min(now);
        let end = |reason: &'static str, detail: String| ended_refresh(pending, reason, detail);
        if self.ended.borrow().ends(&SessionIds::of(&pending.session)) {
            // Logged out while the refresh was under way.
            return end("ended", "refresh dropped: the login ended meanwhile".into());
        }
        let tokens = match parse_token_response(status, body, false) {
            Ok(t) => t,
            Err(e @ TokenResponseError::Status { .. }) => {
                if matches!(&e, TokenResponseError::Status { status: 400, error } if error == "invalid_grant")
                {
                    self.refused_refresh_tokens
                        .borrow_mut()
                        .insert(refresh_token_key(&pending.session));
                }
                // An IdP that is down or overloaded (5xx, 429, or no answer, which the glue
                // reports as 503) refused nothing. By default the session ends all the same
                // (nothing vouches for it any more); with `keep_session` it goes on with its
                // access token while that is valid, and its refresh is asked again after a pause.
                if idp_unavailable(status) {
                    if self.config.refresh_unavailable == RefreshUnavailable::EndSession {
                        return end(
                            "idp unavailable",
                            format!("refresh failed: {e}; the session ends (refresh_unavailable)"),
                        );
                    }
                    self.defer_refresh(&pending.session, now);
                    let step = self.refresh_without_answer(pending, now);
                    let outcome = if matches!(step, RefreshStep::Forward(_)) {
                        "the session goes on with its access token until it expires"
                    } else {
                        "the access token has expired: a retryable 503, the session stays"
                    };
                    return (
                        step,
                        Note::event(
                            Event::RefreshFailed("idp unavailable"),
                            format!(
                                "refresh failed: {e}; {outcome}, asked again in \
                                 {REFRESH_RETRY_SECS} s"
                            ),
                        ),
                    );
                }
                return end("refused", format!("refresh failed: {e}"));
            }
            Err(e) => return end("invalid response", format!("refresh failed: {e}")),
        };
        let old = &pending.session;
        let mut claims = old.claims.clone();
        let mut id_token_expires_at = None;
        if let Some(id_token) = &tokens.id_token {
            let Some(jwks) = keys.jwks else {
                return (RefreshStep::NeedKeys, Note::none());
            };
            let audiences = [self.config.client_id.clone()];
            let expect = Expectations {
                exclusive_audiences: true,
                issuer: &self.config.issuer,
                audiences: &audiences,
                client_id: Some(&self.config.client_id),
                nonce: None,
                require_iat: true,
                require_sub: true,
                now,
                skew: DEFAULT_CLOCK_SKEW_SECS,
            };
            match token::verify(id_token.expose(), jwks, &expect) {
                // OIDC Core §12.2: the refreshed ID token must name the same subject.
                Ok(v) if v.subject.as_deref() == Some(old.subject.as_str()) => {
                    claims = self.kept_claims(&v.claims);
                    id_token_expires_at = Some(v.expires_at);
                }
                Ok(_) => {
                    return end(
                        "subject changed",
                        "refresh failed: ID token subject changed".into(),
                    )
                }
                Err(TokenError::UnknownKey) if keys.may_refetch => {
                    return (
                        RefreshStep::NeedKeys,
                        Note::log("refreshed ID token key not in cached JWKS; refetching"),
                    )
                }
                // Signed with a key this VM may not fetch now (another stream holds the
                // refetch right): the IdP is rotating its keys and refused nothing. The answer
                // stays shared for a request that can check it.
                Err(TokenError::UnknownKey) if !keys.fetched_for_it => {
                    return (
                        self.refresh_without_answer(pending, now),
                        Note::log(
                            "refreshed ID token signed with a key not known here yet; the \
                             session goes on as it was",
                        ),
                    )
                }
                Err(e) => {
                    return end(
                        "id token",
                        format!("refresh failed: ID token rejected: {e}"),
                    )
                }
            }
        }
        if self.config.upstream_authorization == UpstreamAuthorization::IdToken {
            // The upstream receives the ID token: the answer's (OIDC Core §12.2 lets an IdP leave
            // it out, and the session's own goes on). One that expires no later than the session
            // was good for already cannot extend it, and refreshing again would only ask the IdP
            // in ever shorter intervals: the session ends instead, for a new login.
            let exp = id_token_expires_at.or_else(|| {
                old.id_token
                    .as_ref()
                    .and_then(|t| token::sealed_token_expiry(t.expose()))
            });
            match exp {
                Some(exp) if exp > now.max(old.expires_at) => id_token_expires_at = Some(exp),
                _ => {
                    let (reason, detail) = if tokens.id_token.is_some() {
                        ("id token not renewed", "its new ID token expires")
                    } else {
                        (
                            "no id token",
                            "it has no ID token and the session's expires",
                        )
                    };
                    return end(
                        reason,
                        format!(
                            "refresh failed: {detail} no later than the session was valid; the \
                             upstream receives the ID token, so the session ends"
                        ),
                    );
                }
            }
        }
        let mut session = Session {
            access_token: tokens.access_token,
            id_token: tokens.id_token.or_else(|| old.id_token.clone()),
            refresh_token: tokens.refresh_token.or_else(|| old.refresh_token.clone()),
            expires_at: self.tokens_expire_at(
                answered_at.saturating_add(tokens.expires_in),
                id_token_expires_at,
            ),
            tokens_at: answered_at,
            subject: old.subject.clone(),
            created_at: old.created_at,
            seen_at: now.max(old.seen_at),
            max_expires_at: old.max_expires_at,
            login_id: old.login_id.clone(),
            claims,
        };
        if session.expires_at <= now {
            // Another worker's answer, reused after its access token expired (or one issued
            // already expired): nothing to forward on.
            return (
                self.refresh_without_answer(pending, now),
                Note::log("the refreshed access token has already expired"),
            );
        }
        match self.session_cookies(
            &mut session,
            &pending.host,
            &pending.present_session_cookies,
            now,
            rng,
        ) {
            Ok((mut cookies, dropped)) => {
                let mut fwd = self.forward_session(&session, pending.cookie.clone());
                cookies.shrink_to_fit();
                fwd.response_cookies = cookies;
                let log = if dropped.is_empty() {
                    "session refreshed".to_string()
                } else {
                    format!(
                        "session refreshed; dropped {} to fit the cookie budget",
                        dropped.join(", ")
                    )
                };
                (
                    RefreshStep::Forward(fwd),
                    Note::event(Event::RefreshCompleted, log),
                )
            }
            Err(_) => end(
                "session too large",
                "refresh failed: session too large for the cookie budget".into(),
            ),
        }
    }

    /// Seals a refresh's answer (the IdP's status and body, received at `at`) for the other
    /// workers: shared data is readable by every plugin of the gateway's VM and keeps a slot's
    /// last value for as long as the process lives, so the tokens in it are encrypted with a key
    /// only this policy's cookie secret gives, bound to the refresh token it answers and to `at`.
    pub fn seal_refresh_result(
        &self,
        refresh_key: &[u8; 16],
        at: UnixSeconds,
        status: u16,
        body: &[u8],
        rng: &mut dyn Random,
    ) -> Option<Vec<u8>> {
        let mut plaintext = Vec::with_capacity(2 + body.len());
        plaintext.extend_from_slice(&status.to_be_bytes());
        plaintext.extend_from_slice(body);
        self.keys
            .seal(
                Purpose::RefreshResult,
                &refresh_result_context(refresh_key, at),
                &plaintext,
                rng,
            )
            .ok()
            .map(String::into_bytes)
    }

    /// Opens what [`Gate::seal_refresh_result`] sealed for the same refresh token and time: the
    /// status and body; `None` for anything else (another policy's secret, another refresh
    /// token, another time, tampering).
    pub fn open_refresh_result(
        &self,
        refresh_key: &[u8; 16],
        at: UnixSeconds,
        sealed: &[u8],
    ) -> Option<(u16, Vec<u8>)> {
        let sealed = std::str::from_utf8(sealed).ok()?;
        let mut plaintext = self
            .keys
            .open(
                Purpose::RefreshResult,
                &refresh_result_context(refresh_key, at),
                sealed,
            )
            .ok()?
            .plaintext;
        let status = u16::from_be_bytes(plaintext.get(..2)?.try_into().ok()?);
        plaintext.drain(..2);
        Some((status, plaintext))
    }

    /// A refresh that ends with no answer to apply (the callout could not be made, the answer
    /// cannot be checked for want of keys, or another worker's refresh let go or took too long):
    /// the IdP refused nothing, so the session goes on with its access token while that is
    /// valid, and gets a retryable 503 after. Nothing is paused: the IdP may never have been
    /// asked, and the next request refreshes.
    pub fn refresh_without_answer(
        &self,
        pending: &PendingRefresh,
        now: UnixSeconds,
    ) -> RefreshStep {
        if self.ended.borrow().ends(&SessionIds::of(&pending.session)) {
            // Logged out while it waited.
            return ended_refresh(pending, "ended", String::new()).0;
        }
        if pending.session.is_usable(now) {
            RefreshStep::Forward(self.forward_session(&pending.session, pending.cookie.clone()))
        } else {
            RefreshStep::Unavailable
        }
    }

    /// Whether a refresh the IdP could not answer is paused for this session.
    fn refresh_deferred(&self, session: &Session, now: UnixSeconds) -> bool {
        let retry_at = self.refresh_retry_at.borrow();
        // Nothing to look up (and no digest to compute) unless the IdP failed lately.
        !retry_at.is_empty()
            && retry_at
                .get(&refresh_token_key(session))
                .is_some_and(|at| now < *at)
    }

    fn defer_refresh(&self, session: &Session, now: UnixSeconds) {
        let mut retry_at = self.refresh_retry_at.borrow_mut();
        retry_at.retain(|_, at| now < *at);
        if retry_at.len() >= SESSION_CACHE_CAPACITY {
            // Forgetting one only costs the IdP one more request.
            let mut keep = every_other();
            retry_at.retain(|_, _| keep());
        }
        retry_at.insert(
            refresh_token_key(session),
            now.saturating_add(REFRESH_RETRY_SECS),
        );
    }

    fn kept_claims(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> serde_json::Map<String, serde_json::Value> {
        claims
            .iter()
            .filter(|(k, _)| {
                KEPT_CLAIMS.contains(&k.as_str())
                    || self.config.claims_to_headers.iter().any(|(_, c)| c == *k)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The `Set-Cookie` values that store `session`: one cookie, or chunks when it is large;
    /// stale chunks from a previous, larger session are deleted. Over the total budget, the parts
    /// the gateway can live without are dropped (claims, then the ID token, then the refresh
    /// token) instead of producing headers that browsers or Envoy refuse.
    fn session_cookies(
        &self,
        session: &mut Session,
        host: &str,
        present: &[String],
        now: UnixSeconds,
        rng: &mut dyn Random,
    ) -> Result<(Vec<String>, Vec<&'static str>), Failure> {
        let mut dropped = Vec::new();
        let sealed = loop {
            let sealed = session
                .seal(&self.keys, host, rng)
                .map_err(|_| Failure::Internal)?;
            if sealed.len() <= MAX_CHUNKS * CHUNK_BYTES {
                break sealed;
            }
            if !session.claims.is_empty() {
                session.claims.clear();
                dropped.push("claims");
            } else if session.id_token.is_some()
                && self.config.upstream_authorization != UpstreamAuthorization::IdToken
            {
                session.id_token = None;
                dropped.push("id_token");
            } else if session.refresh_token.is_some() {
                session.refresh_token = None;
                session.max_expires_at = session.max_expires_at.min(session.expires_at);
                dropped.push("refresh_token");
            } else {
                return Err(Failure::SessionTooLarge);
            }
        };
        let max_age = self.cookie_max_age(session, now);
        let mut out = Vec::new();
        let chunks: Vec<&str> = if sealed.len() <= CHUNK_BYTES {
            vec![sealed.as_str()]
        } else {
            sealed
                .as_bytes()
                .chunks(CHUNK_BYTES)
                .filter_map(|c| std::str::from_utf8(c).ok())
                .collect()
        };
        if chunks.len() == 1 {
            out.push(set_cookie(SESSION_COOKIE, chunks[0], max_age));
        } else {
            out.push(set_cookie(
                SESSION_COOKIE,
                &format!("{}{CHUNK_MARK}{}", chunks.len(), chunks[0]),
                max_age,
            ));
            for (i, c) in chunks.iter().enumerate().skip(1) {
                out.push(set_cookie(&chunk_cookie_name(i), c, max_age));
            }
        }
        for name in present {
            if let Some(i) = chunk_index(name) {
                if i >= chunks.len() {
                    out.push(delete_cookie(name));
                }
            }
        }
        Ok((out, dropped))
    }

    /// The logout reply and its note.
    fn sign_out(
        &self,
        host: &str,
        cookies: &[(&str, &str)],
        provider: Option<&ProviderMetadata>,
        now: UnixSeconds,
    ) -> (Reply, Note) {
        let (reply, list_full) = self.logout(host, cookies, provider, now);
        let event = Event::Logout {
            dropped_an_ended_login: list_full,
        };
        let note = if list_full {
            Note::event(
                event,
                format!(
                    "logout; the list of ended logins is full ({MAX_ENDED}): the one expiring \
                     first was dropped, and copies of its cookie pass again until their refresh \
                     or expiry"
                ),
            )
        } else {
            Note::event(event, "logout")
        };
        (reply, note)
    }

    /// The logout reply (a page instead of a redirect when there is no `provider`, the IdP
    /// having given no discovery document), and whether the list of ended logins was full.
    fn logout(
        &self,
        host: &str,
        cookies: &[(&str, &str)],
        provider: Option<&ProviderMetadata>,
        now: UnixSeconds,
    ) -> (Reply, bool) {
        let value = assemble_session_cookie(cookies).ok().flatten();
        if let Some(v) = &value {
            // This worker must not serve the session again from its cache.
            self.sessions.borrow_mut().remove(v);
        }
        let session = value.and_then(|v| Session::open(&self.keys, host, &v).ok());
        // Only a live session's logout names its ID token to the IdP: a copy of an ended or
        // expired one would otherwise hand it out at every visit of the logout path.
        let hint_allowed = session.as_ref().is_some_and(|(s, _)| {
            now < self.accepted_until(s)
                && !self.ended.borrow().ends(&SessionIds::of(s))
                && !self.config.id_tokens_are_bearer_credentials()
        });
        let mut list_full = false;
        if let Some((s, _)) = &session {
            // A copy of the cookie (another tab, a stolen copy) must not outlive the logout. A
            // copy may outlive this one (which may have dropped its refresh token for size), but
            // not the session's absolute end.
            let keep_until = s
                .max_expires_at
                .max(s.created_at.saturating_add(self.config.session_max_age))
                .saturating_add(DEFAULT_CLOCK_SKEW_SECS);
            list_full = self.end(ending_of(s, keep_until), now);
        }
        let id_token_hint = session
            .and_then(|(s, _)| s.id_token)
            .filter(|_| hint_allowed);
        let mut set_cookies = vec![delete_cookie(SESSION_COOKIE)];
        set_cookies.extend(
            session_cookie_names(cookies)
                .iter()
                .filter(|n| n.as_str() != SESSION_COOKIE)
                .map(|n| delete_cookie(n)),
        );
        set_cookies.extend(
            cookies
                .iter()
                .filter(|(n, _)| is_login_cookie_name(n))
                .map(|(n, _)| delete_cookie(n)),
        );
        let Some(provider) = provider else {
            // The IdP could not be asked: the user must learn that its session remains.
            return (
                Reply::signed_out_here_only().with_cookies(set_cookies),
                list_full,
            );
        };
        let location = match &provider.end_session_endpoint {
            Some(end) => {
                let mut u = end.clone();
                {
                    let mut q = u.query_pairs_mut();
                    if let Some(hint) = &id_token_hint {
                        q.append_pair("id_token_hint", hint.expose());
                    }
                    q.append_pair("client_id", &self.config.client_id);
                    if let Some(post) = &self.config.post_logout_redirect_uri {
                        q.append_pair("post_logout_redirect_uri", post);
                    }
                }
                u.to_string()
            }
            None => "/".to_string(),
        };
        (Reply::redirect(location, set_cookies), list_full)
    }
}

/// Whether a logout request signs out without asking: not started by another site (Fetch
/// Metadata), or from a client that sends none.
fn signs_out_at_once(req: &Request<'_>) -> bool {
    req.sec_fetch_site.is_none_or(|site| {
        site.eq_ignore_ascii_case("same-origin") || site.eq_ignore_ascii_case("none")
    })
}

/// Bytes of sealed session per cookie: with the name and attributes this stays under the
/// browsers' 4096-byte limit per cookie.
pub const CHUNK_BYTES: usize = 3800;
/// Most chunks per session: about 15 KB of cookies, far below Envoy's 60 KiB header limit, and
/// the filter's cookies never reach the upstream.
pub const MAX_CHUNKS: usize = 4;
/// Separates the chunk count from the first chunk; never part of base64url.
const CHUNK_MARK: char = '.';
/// Digits of the chunk count before [`CHUNK_MARK`] (`MAX_CHUNKS` has one; two leave room).
const MAX_CHUNK_COUNT_DIGITS: usize = 2;

fn chunk_cookie_name(i: usize) -> String {
    format!("{SESSION_COOKIE}-{i}")
}

fn chunk_index(name: &str) -> Option<usize> {
    let rest = name.strip_prefix(SESSION_COOKIE)?.strip_prefix('-')?;
    rest.parse::<usize>().ok().filter(|i| (1..16).contains(i))
}

/// Names of the session cookie and its chunks present in the request.
fn session_cookie_names(cookies: &[(&str, &str)]) -> Vec<String> {
    cookies
        .iter()
        .filter(|(n, _)| *n == SESSION_COOKIE || chunk_index(n).is_some())
        .map(|(n, _)| n.to_string())
        .collect()
}

/// The sealed session value from the session cookie and its chunks. Duplicates are refused:
/// two values under one name mean an injected cookie, and neither can be trusted.
///
/// Borrowed when unchunked: this runs on every request, and the value is 1-4 KB.
fn assemble_session_cookie<'a>(
    cookies: &[(&'a str, &'a str)],
) -> Result<Option<Cow<'a, str>>, &'static str> {
    let get = |name: &str| -> Result<Option<&'a str>, &'static str> {
        let mut values = cookies.iter().filter(|(n, _)| *n == name).map(|(_, v)| *v);
        match (values.next(), values.next()) {
            (Some(_), Some(_)) => Err("duplicate session cookie"),
            (v, _) => Ok(v),
        }
    };
    let Some(first) = get(SESSION_COOKIE)? else {
        return Ok(None);
    };
    let Some((count, head)) = split_chunk_count(first) else {
        return Ok(Some(Cow::Borrowed(first)));
    };
    let count: usize = count.parse().map_err(|_| "bad chunk count")?;
    if !(2..=MAX_CHUNKS).contains(&count) {
        return Err("bad chunk count");
    }
    let mut value = head.to_string();
    for i in 1..count {
        value.push_str(get(&chunk_cookie_name(i))?.ok_or("missing chunk")?);
    }
    Ok(Some(Cow::Owned(value)))
}

/// `Bearer <token>` without the formatting machinery (this runs on every request).
fn bearer_value(token: &str) -> String {
    const SCHEME: &str = "Bearer ";
    let mut v = String::with_capacity(SCHEME.len() + token.len());
    v.push_str(SCHEME);
    v.push_str(token);
    v
}

/// `"<count>.<first chunk>"`: the mark can only follow a short count, so only the first bytes are
/// searched (the sealed value itself is base64url and never contains it).
fn split_chunk_count(first: &str) -> Option<(&str, &str)> {
    let mark = first
        .bytes()
        .take(MAX_CHUNK_COUNT_DIGITS + 1)
        .position(|b| b == CHUNK_MARK as u8)?;
    Some((&first[..mark], &first[mark + 1..]))
}

/// A login cookie name this filter could have set: the prefix and a base64url flow id. Other
/// names a client sends are never echoed back into `Set-Cookie`.
fn is_login_cookie_name(name: &str) -> bool {
    name.strip_prefix(LOGIN_COOKIE_PREFIX).is_some_and(|id| {
        !id.is_empty()
            && id.len() <= 32
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// How long before its refresh is due a session's use is no longer written into its cookie.
const USE_RECORD_REFRESH_MARGIN_SECS: u64 = 60;

/// When a session was last in use as far as its cookie knows: its last recorded use, refresh or
/// login (cookies sealed before uses were recorded have the latter two).
fn last_seen(session: &Session) -> UnixSeconds {
    session
        .seen_at
        .max(session.tokens_at)
        .max(session.created_at)
}

/// The token of an `Authorization` value in the Bearer scheme (in any case), if it is one.
fn bearer_token(value: &str) -> Option<&str> {
    value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

/// Whether any `Authorization` header uses the Bearer scheme.
fn presents_bearer(req: &Request<'_>) -> bool {
    req.authorization.iter().any(|v| bearer_token(v).is_some())
}

/// A CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`, and no body
/// (browsers never send one): an upstream handler that ignores the method must not run a request
/// with a body for nobody.
fn is_cors_preflight(req: &Request<'_>) -> bool {
    req.method == "OPTIONS"
        && req.origin.is_some()
        && req.access_control_request_method.is_some()
        && !req.has_body
}

fn path_and_query(url: &Url) -> String {
    match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests;
