//! The decision engine: given a request (and, when needed, the provider metadata, a token
//! response, the JWKS), decide what happens. No I/O here: the glue gathers inputs, runs the
//! callouts the decisions ask for, and applies the result.
//!
//! Order of checks (after Envoy's OAuth2 filter): host not ours -> untouched; callback; logout;
//! skip paths; valid session -> forward with the access token; otherwise login redirect for
//! browser navigations and 401 for everything else.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use url::Url;

use crate::config::{strip_port, Config, TokenEndpointAuthMethod, UpstreamAuthorization};
use crate::crypto::Keyring;
use crate::discovery::ProviderMetadata;
use crate::http::{
    cookie_header_without, form_encode, parse_cookies, same_origin_target, split_path, QueryError,
    StrictQuery,
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
    /// Whether any `sec-fetch-*` header was sent.
    pub has_sec_fetch: bool,
    /// `accept`.
    pub accept: Option<&'a str>,
    /// `x-request-id` (Envoy sets it at the edge).
    pub request_id: Option<&'a str>,
}

impl Request<'_> {
    /// The host without port, lowercase: the identity cookies are bound to.
    pub fn host(&self) -> String {
        let h = strip_port(self.authority).to_ascii_lowercase();
        h.strip_suffix('.').map(str::to_string).unwrap_or(h)
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
    /// `Set-Cookie` values for the response (a resealed session after key rotation).
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
    /// Exchange the code: send `call`, then pass the answer to [`Gate::complete_login`].
    ExchangeCode {
        /// The token request.
        call: Callout,
        /// What the answer is checked against.
        pending: PendingLogin,
    },
}

/// The verification keys available to finish a login.
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    /// The cached JWKS, if any.
    pub jwks: Option<&'a Jwks>,
    /// Whether an unknown `kid` may trigger a refetch (rate limit not yet used).
    pub may_refetch: bool,
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
    if !raw.token_type.eq_ignore_ascii_case("bearer") {
        return Err(TokenResponseError::NotBearer);
    }
    let expires_in = match raw.expires_in {
        None | Some(serde_json::Value::Null) => DEFAULT_EXPIRES_IN_SECS,
        Some(serde_json::Value::Number(n)) => match n.as_f64() {
            Some(v) if v.is_finite() && (0.0..=10.0 * 365.0 * 86400.0).contains(&v) => v as u64,
            _ => return Err(TokenResponseError::BadExpiry),
        },
        // Some IdPs send it as a string; accept digits only.
        Some(serde_json::Value::String(s)) => s
            .parse::<u64>()
            .map_err(|_| TokenResponseError::BadExpiry)?,
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
}

/// A one-line, secret-free note for the log about what the engine decided and why.
pub type Note = Option<String>;

impl Gate {
    /// Builds the engine from a validated configuration.
    pub fn new(config: Config) -> Self {
        let keys = Keyring::new(&config.cookie_secret, &[]);
        Self { config, keys }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Decides what to do with a request. `provider` is `None` until discovery succeeded.
    pub fn decide(
        &self,
        req: &Request<'_>,
        provider: Option<&ProviderMetadata>,
        now: UnixSeconds,
        rng: &mut dyn Random,
    ) -> (Decision, Note) {
        if !self.config.protects(req.authority) {
            return (Decision::PassThrough, None);
        }
        let (path, query) = split_path(req.path);
        let cookies = parse_cookies(req.cookie_headers.iter().copied());
        let host = req.host();

        if path == self.callback_path() {
            let Some(provider) = provider else {
                return (Decision::NeedProvider, None);
            };
            return self.callback(req, &host, query, &cookies, provider, now);
        }
        if path == self.config.logout_path {
            let Some(provider) = provider else {
                return (Decision::NeedProvider, None);
            };
            return (
                Decision::Reply(self.logout(&host, &cookies, provider)),
                Some("logout".into()),
            );
        }
        if self.config.is_skipped(req.path) {
            return (Decision::Forward(self.forward_without_identity(req)), None);
        }

        let (session, note) = self.session_from(&host, &cookies, now);
        if let Some((session, needs_reseal)) = session {
            let mut fwd = self.forward_with(req, &session);
            if needs_reseal {
                if let Ok(value) = session.seal(&self.keys, &host, rng) {
                    fwd.response_cookies.push(set_cookie(
                        SESSION_COOKIE,
                        &value,
                        self.cookie_max_age(&session, now),
                    ));
                }
            }
            return (Decision::Forward(fwd), None);
        }
        if !req.is_navigation() {
            return (
                Decision::Reply(Failure::Unauthenticated.reply(false, req.request_id)),
                note,
            );
        }
        let Some(provider) = provider else {
            return (Decision::NeedProvider, note);
        };
        match self.start_login(req, &host, &cookies, provider, now, rng) {
            Ok(reply) => (Decision::Reply(reply), note),
            Err(_) => (
                Decision::Reply(Failure::Internal.reply(true, req.request_id)),
                Some("no randomness from the host".into()),
            ),
        }
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
    ) -> (Option<(Session, bool)>, Note) {
        let mut values = cookies
            .iter()
            .filter(|(n, _)| *n == SESSION_COOKIE)
            .map(|(_, v)| *v);
        let Some(value) = values.next() else {
            return (None, None);
        };
        if values.next().is_some() {
            // Two session cookies: an injected one beside ours. Trust neither.
            return (
                None,
                Some("session rejected: duplicate session cookie".into()),
            );
        }
        match Session::open(&self.keys, host, value) {
            Ok((s, reseal)) if s.is_usable(now) => (Some((s, reseal)), None),
            Ok(_) => (None, Some("session expired".into())),
            Err(e) => (None, Some(format!("session rejected: {e}"))),
        }
    }

    fn cookie_max_age(&self, session: &Session, now: UnixSeconds) -> u64 {
        session.max_expires_at.saturating_sub(now).max(1)
    }

    fn forward_with(&self, req: &Request<'_>, session: &Session) -> Forward {
        let authorization = match self.config.upstream_authorization {
            UpstreamAuthorization::AccessToken => {
                Some(format!("Bearer {}", session.access_token.expose()))
            }
            UpstreamAuthorization::IdToken => session
                .id_token
                .as_ref()
                .map(|t| format!("Bearer {}", t.expose())),
            UpstreamAuthorization::None => None,
        };
        Forward {
            authorization,
            cookie: cookie_header_without(&req.cookie_headers, is_own_cookie),
            response_cookies: Vec::new(),
        }
    }

    fn forward_without_identity(&self, req: &Request<'_>) -> Forward {
        Forward {
            authorization: None,
            cookie: cookie_header_without(&req.cookie_headers, is_own_cookie),
            response_cookies: Vec::new(),
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
        let code_challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(code_verifier.as_bytes()));
        let (path, query) = split_path(req.path);
        let return_to = if query.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{query}")
        };
        let login = LoginState {
            state: Secret::new(state.clone()),
            nonce: Secret::new(nonce.clone()),
            code_verifier: Secret::new(code_verifier),
            return_to,
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
        if cookies.iter().any(|(n, _)| *n == SESSION_COOKIE) {
            set_cookies.push(delete_cookie(SESSION_COOKIE));
        }
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
        for (name, value) in cookies
            .iter()
            .filter(|(n, _)| n.starts_with(LOGIN_COOKIE_PREFIX))
        {
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
        let fail = |f: Failure, note: String, extra_cookies: Vec<String>| {
            (
                Decision::Reply(f.reply(browser, req.request_id).with_cookies(extra_cookies)),
                Some(note),
            )
        };
        let q = match StrictQuery::parse(query) {
            Ok(q) => q,
            Err(QueryError::Duplicate(p)) => {
                return fail(
                    Failure::BadCallback("The sign-in response was malformed."),
                    format!("callback: duplicate parameter `{p}`"),
                    vec![],
                )
            }
            Err(e) => {
                return fail(
                    Failure::BadCallback("The sign-in response was malformed."),
                    format!("callback: {e}"),
                    vec![],
                )
            }
        };
        let Some(state) = q.get("state") else {
            return fail(
                Failure::BadCallback("The sign-in response had no state."),
                "callback: missing state".into(),
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
                    "callback: malformed state".into(),
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
                "callback: no (or duplicate) login cookie for this state".into(),
                vec![],
            );
        };
        let delete_login = vec![delete_cookie(&cookie_name)];
        let login = match LoginState::open(&self.keys, host, &cookie_name, login_value, now) {
            Ok(l) => l,
            Err(e) => {
                return fail(
                    Failure::BadCallback("This sign-in has expired."),
                    format!("callback: {e}"),
                    delete_login,
                )
            }
        };
        if !login.state.ct_eq(state) {
            return fail(
                Failure::BadCallback("The sign-in response did not match."),
                "callback: state mismatch".into(),
                delete_login,
            );
        }
        // RFC 9207: the authorization response's `iss` must be our issuer (mix-up defence).
        match q.get("iss") {
            Some(iss) if iss != self.config.issuer => {
                return fail(
                    Failure::BadCallback("The sign-in response came from an unexpected issuer."),
                    "callback: iss parameter mismatch".into(),
                    delete_login,
                )
            }
            None if provider.authorization_response_iss_parameter_supported => {
                return fail(
                    Failure::BadCallback("The sign-in response was incomplete."),
                    "callback: iss parameter missing although advertised".into(),
                    delete_login,
                )
            }
            _ => {}
        }
        if let Some(error) = q.get("error") {
            return fail(
                Failure::LoginDenied(error.to_string()),
                format!(
                    "callback: IdP returned error `{}`",
                    error.chars().take(64).collect::<String>()
                ),
                delete_login,
            );
        }
        let Some(code) = q.get("code").filter(|c| !c.is_empty() && c.len() <= 4096) else {
            return fail(
                Failure::BadCallback("The sign-in response had no code."),
                "callback: missing code".into(),
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
        };
        (Decision::ExchangeCode { call, pending }, None)
    }

    /// A POST to the token endpoint with client authentication (RFC 6749 §2.3.1, §4.1.3).
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
        Url::parse(&crate::discovery::discovery_url(&self.config.issuer))
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
        let delete_login = vec![delete_cookie(&pending.login_cookie)];
        let fail = |f: Failure, note: String| {
            (
                LoginStep::Done(
                    f.reply(pending.browser, pending.request_id.as_deref())
                        .with_cookies(delete_login.clone()),
                ),
                Some(note),
            )
        };
        let tokens = match parse_token_response(status, body, true) {
            Ok(t) => t,
            Err(e) => return fail(Failure::IdpInvalid, format!("token exchange failed: {e}")),
        };
        let Some(jwks) = keys.jwks else {
            return (LoginStep::NeedKeys, None);
        };
        let Some(id_token) = tokens.id_token.as_ref() else {
            return fail(
                Failure::IdpInvalid,
                "token exchange failed: no id_token".into(),
            );
        };
        let audiences = [self.config.client_id.clone()];
        let expect = Expectations {
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
                    Some("ID token key not in cached JWKS; refetching".into()),
                )
            }
            Err(e) => return fail(Failure::IdpInvalid, format!("ID token rejected: {e}")),
        };
        let claims = KEPT_CLAIMS
            .iter()
            .filter_map(|k| verified.claims.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        let mut session = Session {
            access_token: tokens.access_token,
            id_token: tokens.id_token,
            refresh_token: tokens.refresh_token,
            expires_at: now.saturating_add(tokens.expires_in),
            subject: verified.subject.unwrap_or_default(),
            created_at: now,
            max_expires_at: now.saturating_add(self.config.session_max_age),
            claims,
        };
        if session.refresh_token.is_none() {
            // Without a refresh token the session cannot outlive the access token.
            session.max_expires_at = session.max_expires_at.min(session.expires_at);
        }
        let (sealed, dropped) = match self.seal_within_budget(&mut session, &pending.host, rng) {
            Ok(v) => v,
            Err(f) => return fail(
                f,
                "session cookie would exceed the browser limit even without ID and refresh tokens"
                    .into(),
            ),
        };
        let mut cookies = vec![set_cookie(
            SESSION_COOKIE,
            &sealed,
            self.cookie_max_age(&session, now),
        )];
        cookies.extend(delete_login);
        let location = same_origin_target(
            &pending.origin_scheme,
            &pending.authority.to_ascii_lowercase(),
            &pending.return_to,
        );
        let note = if dropped.is_empty() {
            "login completed".to_string()
        } else {
            format!(
                "login completed; dropped {} to fit the cookie",
                dropped.join(", ")
            )
        };
        (
            LoginStep::Done(Reply::redirect(location, cookies)),
            Some(note),
        )
    }

    /// Seals the session, dropping what the gateway can live without until it fits.
    fn seal_within_budget(
        &self,
        session: &mut Session,
        host: &str,
        rng: &mut dyn Random,
    ) -> Result<(String, Vec<&'static str>), Failure> {
        let mut dropped = Vec::new();
        loop {
            let sealed = session
                .seal(&self.keys, host, rng)
                .map_err(|_| Failure::Internal)?;
            if SESSION_COOKIE.len() + 1 + sealed.len() <= MAX_SESSION_COOKIE_BYTES {
                return Ok((sealed, dropped));
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
        }
    }

    fn logout(&self, host: &str, cookies: &[(&str, &str)], provider: &ProviderMetadata) -> Reply {
        let id_token_hint = cookies
            .iter()
            .find(|(n, _)| *n == SESSION_COOKIE)
            .and_then(|(_, v)| Session::open(&self.keys, host, v).ok())
            .and_then(|(s, _)| s.id_token);
        let mut set_cookies = vec![delete_cookie(SESSION_COOKIE)];
        set_cookies.extend(
            cookies
                .iter()
                .filter(|(n, _)| n.starts_with(LOGIN_COOKIE_PREFIX))
                .map(|(n, _)| delete_cookie(n)),
        );
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
        Reply::redirect(location, set_cookies)
    }
}

fn path_and_query(url: &Url) -> String {
    match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    }
}

#[cfg(test)]
mod tests;
