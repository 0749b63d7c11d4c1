//! Plugin configuration: parsed once in `on_configure`, validated, then immutable.
//!
//! The JSON arrives as Istio produces it from `WasmPlugin.spec.pluginConfig`: compact, keys sorted,
//! numbers possibly as floats (`600.0`). Unknown keys and wrong types are errors that name the field.

use std::collections::BTreeSet;

use crate::http::parse_url;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde::{Deserialize, Deserializer};
use url::Url;

use crate::types::{Secret, SecretBytes};

/// Default callback path, as oauth2-proxy and Envoy Gateway use.
pub const DEFAULT_REDIRECT_PATH: &str = "/oauth2/callback";
/// Default sign-out path, as oauth2-proxy uses.
pub const DEFAULT_LOGOUT_PATH: &str = "/oauth2/sign_out";
/// Scopes asked for when `scopes` is not set.
pub const DEFAULT_SCOPES: [&str; 3] = ["openid", "email", "profile"];
/// Minimum cookie secret length: 256 bits of key material.
pub const MIN_COOKIE_SECRET_BYTES: usize = 32;
/// Absolute session lifetime when `session_max_age` is not set (oauth2-proxy uses 168 h; a
/// gateway in front of many apps is better served by a day).
pub const DEFAULT_SESSION_MAX_AGE_SECS: u64 = 24 * 3600;

/// Refresh this long before the access token expires, when `refresh_skew` is not set.
pub const DEFAULT_REFRESH_SKEW_SECS: u64 = 60;
/// Headers a claim can never be mapped to: credentials (the filter's own included), the
/// request's framing and encoding, what Envoy and the upstream route, trust or check by (client
/// address, original URL and method, CSRF checks).
const RESERVED_HEADERS: [&str; 37] = [
    "authorization",
    "cookie",
    "cookie2",
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "max-forwards",
    "via",
    "forwarded",
    "origin",
    "referer",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-proto",
    "x-forwarded-prefix",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-forwarded-server",
    "x-forwarded-client-cert",
    "x-forwarded-access-token",
    "x-auth-request-access-token",
    "x-real-ip",
    "true-client-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-method-override",
    "x-request-id",
];
/// Header-name prefixes a claim can never be mapped to: Envoy's control headers, proxy
/// credentials and hop-by-hop headers, Fetch Metadata.
const RESERVED_HEADER_PREFIXES: [&str; 3] = ["x-envoy-", "proxy-", "sec-"];

/// A configuration error: which field, and why. Printed as the one log line an operator reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: field `{field}`: {reason}")]
pub struct ConfigError {
    /// The configuration key at fault (JSON path for nested values).
    pub field: String,
    /// Why it was refused; never contains secret values.
    pub reason: String,
}

impl ConfigError {
    fn new(field: &str, reason: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// How the client authenticates at the token endpoint (RFC 6749 §2.3.1, OIDC Core §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenEndpointAuthMethod {
    /// HTTP Basic with the URL-encoded client id and secret.
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the form body.
    ClientSecretPost,
}

/// Which token the upstream receives in `Authorization: Bearer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamAuthorization {
    /// The OAuth access token: the token meant for APIs.
    AccessToken,
    /// The ID token, for upstreams built around oauth2-proxy's old behaviour.
    IdToken,
    /// No `Authorization` header at all (the client's is still removed).
    None,
}

/// What a refresh the IdP does not answer (5xx, 429, timeout) does to the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefreshUnavailable {
    /// The session ends as on a refusal: browsers go to login, API calls get 401.
    EndSession,
    /// The session stays: requests go on with the access token while it is valid, get a
    /// retryable 503 after, and the refresh is asked again after a pause.
    KeepSession,
}

/// A protected host pattern: exact or a leading `*.` wildcard, lowercase, without port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Matches this host exactly.
    Exact(String),
    /// `*.example.com`: matches any host ending in `.example.com` (at least one more label).
    Suffix(String),
}

impl HostPattern {
    fn parse(raw: &str) -> Result<Self, String> {
        let lower = raw.trim().to_ascii_lowercase();
        if lower.is_empty() {
            return Err("empty host".into());
        }
        if !port_is_well_formed(&lower) {
            return Err(format!("`{raw}` has a port that is not a number"));
        }
        let without_port = strip_port(&lower);
        if let Some(rest) = without_port.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') || !is_hostname(rest) {
                return Err(format!("`{raw}` is not a valid wildcard host"));
            }
            return Ok(Self::Suffix(format!(".{rest}")));
        }
        if without_port.contains('*') || !is_hostname(without_port) {
            return Err(format!(
                "`{raw}` is not a host name (only a leading `*.` wildcard is allowed)"
            ));
        }
        Ok(Self::Exact(without_port.to_string()))
    }

    /// Whether `host` (lowercase, no port) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(h) => h == host,
            Self::Suffix(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
        }
    }
}

fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The host of an authority: the bracketed IPv6 literal, or everything before the first `:`
/// (a host name never has one). What follows is the port, well-formed or not
/// ([`port_is_well_formed`]): Envoy routes `app.example.com:x` to `app.example.com` under
/// Istio's `app.example.com:*` domain, so the policy must see that host too.
pub fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    // A byte search: `:` is ASCII, and this runs several times per request on a short string.
    match authority.bytes().position(|b| b == b':') {
        Some(i) => authority.get(..i).unwrap_or(authority),
        None => authority,
    }
}

/// Whether what follows the host ([`strip_port`]) is nothing or `:` and a port of 1-5 digits.
pub fn port_is_well_formed(authority: &str) -> bool {
    let rest = authority
        .get(strip_port(authority).len()..)
        .unwrap_or_default();
    match rest.strip_prefix(':') {
        None => rest.is_empty(),
        Some(port) => (1..=5).contains(&port.len()) && port.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// The validated configuration the filter runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Issuer URL exactly as configured; discovery must return the same string.
    pub issuer: String,
    /// Envoy cluster for every IdP callout.
    pub idp_cluster: String,
    /// `:authority` override for callouts.
    pub idp_authority: Option<String>,
    /// OAuth client id.
    pub client_id: String,
    /// OAuth client secret.
    pub client_secret: Secret,
    /// Client authentication at the token endpoint.
    pub token_endpoint_auth_method: TokenEndpointAuthMethod,
    /// Key material for cookie encryption (at least 32 bytes).
    pub cookie_secret: SecretBytes,
    /// Hosts this policy protects.
    pub hosts: Vec<HostPattern>,
    /// Path of the OAuth callback on every protected host.
    pub redirect_path: String,
    /// Absolute redirect URI override.
    pub redirect_uri: Option<Url>,
    /// Path that signs the user out.
    pub logout_path: String,
    /// Where the IdP sends the user after logout.
    pub post_logout_redirect_uri: Option<String>,
    /// Scopes, `openid` first.
    pub scopes: Vec<String>,
    /// Which token goes upstream.
    pub upstream_authorization: UpstreamAuthorization,
    /// Path prefixes that pass without login.
    pub skip_paths: Vec<String>,
    /// Absolute session lifetime in seconds.
    pub session_max_age: u64,
    /// A session unused this many seconds ends (off when `None`).
    pub session_idle_timeout: Option<u64>,
    /// Refresh this long before the access token expires.
    pub refresh_skew: u64,
    /// What a refresh the IdP does not answer does to the session.
    pub refresh_unavailable: RefreshUnavailable,
    /// Path prefixes that always answer 401 instead of redirecting.
    pub api_paths: Vec<String>,
    /// Whether CORS preflights pass without login.
    pub pass_cors_preflight: bool,
    /// Machine clients with bearer JWTs, when enabled.
    pub bearer_tokens: Option<BearerTokens>,
    /// Identity headers set from claims: (lowercase header name, claim name).
    pub claims_to_headers: Vec<(String, String)>,
    /// Also send the access token as `x-auth-request-access-token` and `x-forwarded-access-token`.
    pub pass_access_token_headers: bool,
    /// Map `email` to a header even when the token says `email_verified: false` (oauth2-proxy's
    /// `--insecure-oidc-allow-unverified-email`).
    pub allow_unverified_email: bool,
    /// Older cookie secrets, accepted for decryption only.
    pub previous_cookie_secrets: Vec<SecretBytes>,
}

/// Acceptance rules for machine clients' bearer JWTs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerTokens {
    /// `aud` must contain one of these.
    pub audiences: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBearerTokens {
    audiences: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    issuer: String,
    idp_cluster: String,
    #[serde(default)]
    idp_authority: Option<String>,
    client_id: String,
    #[serde(default)]
    client_secret: Option<String>,
    #[serde(default)]
    client_secret_env: Option<String>,
    #[serde(default)]
    token_endpoint_auth_method: Option<TokenEndpointAuthMethod>,
    #[serde(default)]
    cookie_secret: Option<String>,
    #[serde(default)]
    cookie_secret_env: Option<String>,
    hosts: Vec<String>,
    #[serde(default)]
    redirect_path: Option<String>,
    #[serde(default)]
    redirect_uri: Option<String>,
    #[serde(default)]
    logout_path: Option<String>,
    #[serde(default)]
    post_logout_redirect_uri: Option<String>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    upstream_authorization: Option<UpstreamAuthorization>,
    #[serde(default)]
    skip_paths: Option<Vec<String>>,
    #[serde(default, deserialize_with = "seconds")]
    session_max_age: Option<u64>,
    #[serde(default, deserialize_with = "seconds")]
    session_idle_timeout: Option<u64>,
    #[serde(default, deserialize_with = "seconds")]
    refresh_skew: Option<u64>,
    #[serde(default)]
    refresh_unavailable: Option<RefreshUnavailable>,
    #[serde(default)]
    api_paths: Option<Vec<String>>,
    #[serde(default)]
    pass_cors_preflight: Option<bool>,
    #[serde(default)]
    bearer_tokens: Option<RawBearerTokens>,
    #[serde(default)]
    claims_to_headers: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pass_access_token_headers: Option<bool>,
    #[serde(default)]
    allow_unverified_email: Option<bool>,
    #[serde(default)]
    previous_cookie_secrets: Option<Vec<String>>,
    #[serde(default)]
    previous_cookie_secrets_env: Option<Vec<String>>,
}

/// Accepts whole seconds given as an integer or as an integral float (`600.0`), as Istio's JSON
/// conversion produces, and refuses fractions, negatives and absurd values.
fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let value = Option::<f64>::deserialize(d)?;
    match value {
        None => Ok(None),
        Some(v) if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= 1.0e9 => {
            Ok(Some(v as u64))
        }
        Some(_) => Err(serde::de::Error::custom(
            "expected a whole, non-negative number of seconds",
        )),
    }
}

impl Config {
    /// Parses and validates the plugin configuration. `env` reads the VM's environment
    /// (Istio `vmConfig.env`) for the `*_env` fields.
    pub fn parse(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(ConfigError::new(
                "(root)",
                "the plugin configuration is empty; set WasmPlugin.spec.pluginConfig",
            ));
        }
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let mut msg = strip_position(&inner.to_string());
            if holds_secret(&path) {
                msg = without_value(&msg);
            }
            // serde reports an unknown key at the parent path; name the key itself.
            match unknown_field_name(&msg) {
                Some(name) => ConfigError::new(&name, "unknown field"),
                None if path == "." => ConfigError::new("(root)", msg),
                None => ConfigError::new(&path, msg),
            }
        })?;
        Self::validate(raw, env)
    }

    fn validate(raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let issuer = validate_issuer(&raw.issuer)?;
        if raw.idp_cluster.trim().is_empty() {
            return Err(ConfigError::new("idp_cluster", "must not be empty"));
        }
        if let Some(a) = &raw.idp_authority {
            if a.is_empty() || a.contains(['/', ' ', '@']) {
                return Err(ConfigError::new("idp_authority", "must be host[:port]"));
            }
        }
        if raw.client_id.is_empty() {
            return Err(ConfigError::new("client_id", "must not be empty"));
        }
        let client_secret = Secret::new(one_of(
            "client_secret",
            raw.client_secret,
            "client_secret_env",
            raw.client_secret_env,
            env,
        )?);
        let cookie_secret_text = one_of(
            "cookie_secret",
            raw.cookie_secret,
            "cookie_secret_env",
            raw.cookie_secret_env,
            env,
        )?;
        let cookie_secret = decode_cookie_secret(&cookie_secret_text)
            .map_err(|why| ConfigError::new("cookie_secret", why))?;

        if raw.hosts.is_empty() {
            return Err(ConfigError::new("hosts", "must list at least one host"));
        }
        let hosts = raw
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                HostPattern::parse(h).map_err(|e| ConfigError::new(&format!("hosts[{i}]"), e))
            })
            .collect::<Result<Vec<_>, _>>()?;

        let redirect_uri = match raw.redirect_uri {
            None => None,
            Some(u) => {
                let url =
                    parse_url(&u).map_err(|e| ConfigError::new("redirect_uri", e.to_string()))?;
                if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
                    return Err(ConfigError::new(
                        "redirect_uri",
                        "must be an absolute http(s) URL",
                    ));
                }
                // The login cookie is `Secure`: a browser sends it back over plain HTTP only to
                // a loopback host, and anywhere else the code would travel in the clear.
                if url.scheme() == "http"
                    && !matches!(url.host_str(), Some("localhost" | "127.0.0.1"))
                {
                    return Err(ConfigError::new(
                        "redirect_uri",
                        "must be https (plain http only for localhost)",
                    ));
                }
                validate_path("redirect_uri", url.path())?;
                if url.fragment().is_some() {
                    return Err(ConfigError::new("redirect_uri", "must not have a fragment"));
                }
                // Every login's callback lands on this host, and its login cookie (host-only)
                // is sent back only to the host the login started on: logins from any other
                // host would fail, and a host outside `hosts` would hand codes to its upstream.
                let callback_host = url.host_str().unwrap_or_default();
                if !hosts
                    .iter()
                    .all(|p| matches!(p, HostPattern::Exact(h) if h == callback_host))
                {
                    return Err(ConfigError::new(
                        "redirect_uri",
                        format!(
                            "sends every login back to {callback_host}, so `hosts` must list that host \
                             alone; for several hosts leave it out (and set redirect_path)"
                        ),
                    ));
                }
                Some(url)
            }
        };
        let redirect_path = match (&redirect_uri, raw.redirect_path) {
            (Some(u), Some(p)) if u.path() != p => {
                return Err(ConfigError::new(
                    "redirect_path",
                    "differs from the path of redirect_uri; set only one",
                ))
            }
            (Some(u), _) => u.path().to_string(),
            (None, Some(p)) => validate_path("redirect_path", &p)?,
            (None, None) => DEFAULT_REDIRECT_PATH.to_string(),
        };
        let logout_path = match raw.logout_path {
            Some(p) => validate_path("logout_path", &p)?,
            None => DEFAULT_LOGOUT_PATH.to_string(),
        };
        if logout_path == redirect_path {
            return Err(ConfigError::new(
                "logout_path",
                "must differ from redirect_path",
            ));
        }
        if let Some(u) = &raw.post_logout_redirect_uri {
            let url = parse_url(u)
                .map_err(|e| ConfigError::new("post_logout_redirect_uri", e.to_string()))?;
            if !matches!(url.scheme(), "https" | "http") {
                return Err(ConfigError::new(
                    "post_logout_redirect_uri",
                    "must be an absolute http(s) URL",
                ));
            }
            // The IdP's redirect back comes from another site: on the logout path it would ask
            // for confirmation again, and again after every confirmation.
            if url.path() == logout_path {
                return Err(ConfigError::new(
                    "post_logout_redirect_uri",
                    "must not be the logout path",
                ));
            }
        }
        let scopes = validate_scopes(raw.scopes)?;
        let skip_paths = raw
            .skip_paths
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, p)| validate_path(&format!("skip_paths[{i}]"), &p))
            .collect::<Result<Vec<_>, _>>()?;
        for p in &skip_paths {
            if path_has_prefix(&redirect_path, p) || path_has_prefix(&logout_path, p) {
                return Err(ConfigError::new(
                    "skip_paths",
                    format!("`{p}` would skip the callback or logout path"),
                ));
            }
        }
        let session_max_age = raw.session_max_age.unwrap_or(DEFAULT_SESSION_MAX_AGE_SECS);
        if session_max_age < 60 {
            return Err(ConfigError::new(
                "session_max_age",
                "must be at least 60 seconds",
            ));
        }
        // Activity is written into the cookie at most every tenth of the timeout: under a minute
        // that would be a new cookie every few seconds.
        if let Some(idle) = raw.session_idle_timeout {
            if idle < 60 || idle >= session_max_age {
                return Err(ConfigError::new(
                    "session_idle_timeout",
                    "must be at least 60 seconds and less than session_max_age",
                ));
            }
        }

        let refresh_skew = raw.refresh_skew.unwrap_or(DEFAULT_REFRESH_SKEW_SECS);
        if refresh_skew > 3600 {
            return Err(ConfigError::new(
                "refresh_skew",
                "must be at most 3600 seconds",
            ));
        }
        let api_paths = raw
            .api_paths
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, p)| validate_path(&format!("api_paths[{i}]"), &p))
            .collect::<Result<Vec<_>, _>>()?;
        let bearer_tokens = match raw.bearer_tokens {
            None => None,
            Some(b) => {
                if b.audiences.is_empty() || b.audiences.iter().any(String::is_empty) {
                    return Err(ConfigError::new(
                        "bearer_tokens.audiences",
                        "must list at least one non-empty audience",
                    ));
                }
                Some(BearerTokens {
                    audiences: b.audiences,
                })
            }
        };
        let mut claims_to_headers = Vec::new();
        for (header, claim) in raw.claims_to_headers.unwrap_or_default() {
            let field = format!("claims_to_headers.{header}");
            let name = header.to_ascii_lowercase();
            if name.is_empty()
                || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                || name.starts_with(':')
            {
                return Err(ConfigError::new(
                    &field,
                    "not a valid header name (letters, digits, `-`)",
                ));
            }
            if RESERVED_HEADERS.contains(&name.as_str())
                || RESERVED_HEADER_PREFIXES.iter().any(|p| name.starts_with(p))
            {
                return Err(ConfigError::new(
                    &field,
                    "this header cannot be set from a claim",
                ));
            }
            if claim.is_empty() {
                return Err(ConfigError::new(&field, "claim name must not be empty"));
            }
            claims_to_headers.push((name, claim));
        }
        let mut previous_cookie_secrets = Vec::new();
        for (i, s) in raw
            .previous_cookie_secrets
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            previous_cookie_secrets.push(
                decode_cookie_secret(s).map_err(|why| {
                    ConfigError::new(&format!("previous_cookie_secrets[{i}]"), why)
                })?,
            );
        }
        for (i, key) in raw
            .previous_cookie_secrets_env
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let field = format!("previous_cookie_secrets_env[{i}]");
            let value = env(key).filter(|v| !v.trim().is_empty()).ok_or_else(|| {
                ConfigError::new(
                    &field,
                    "the environment variable it names is not set in the VM (the name is not \
                     shown: a secret pasted here by mistake must not reach the log)",
                )
            })?;
            previous_cookie_secrets.push(
                decode_cookie_secret(value.trim()).map_err(|why| ConfigError::new(&field, why))?,
            );
        }

        Ok(Self {
            issuer,
            idp_cluster: raw.idp_cluster,
            idp_authority: raw.idp_authority,
            client_id: raw.client_id,
            client_secret,
            token_endpoint_auth_method: raw
                .token_endpoint_auth_method
                .unwrap_or(TokenEndpointAuthMethod::ClientSecretBasic),
            cookie_secret,
            hosts,
            redirect_path,
            redirect_uri,
            logout_path,
            post_logout_redirect_uri: raw.post_logout_redirect_uri,
            scopes,
            upstream_authorization: raw
                .upstream_authorization
                .unwrap_or(UpstreamAuthorization::AccessToken),
            skip_paths,
            session_max_age,
            session_idle_timeout: raw.session_idle_timeout,
            refresh_skew,
            refresh_unavailable: raw
                .refresh_unavailable
                .unwrap_or(RefreshUnavailable::EndSession),
            api_paths,
            // Off unless asked for (as oauth2-proxy's `skip_auth_preflight`): an upstream handler that
            // does not look at the method would answer a preflight with what it protects.
            pass_cors_preflight: raw.pass_cors_preflight.unwrap_or(false),
            bearer_tokens,
            claims_to_headers,
            pass_access_token_headers: raw.pass_access_token_headers.unwrap_or(false),
            allow_unverified_email: raw.allow_unverified_email.unwrap_or(false),
            previous_cookie_secrets,
        })
    }

    /// Settings that are valid but weaken something, each a log line for the operator.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.id_tokens_are_bearer_credentials() {
            out.push(format!(
                "bearer_tokens.audiences lists the client id `{}`: ID tokens of this gateway's \
                 own logins pass as bearer tokens too (needed only for IdPs whose access tokens \
                 carry the client id as their audience, such as Dex), so logout sends the IdP no \
                 id_token_hint",
                self.client_id
            ));
        }
        out
    }

    /// Whether the ID tokens of this gateway's logins pass as bearer tokens: then one must
    /// never be put where it outlives the session (a logout URL in browser history).
    pub fn id_tokens_are_bearer_credentials(&self) -> bool {
        self.bearer_tokens
            .as_ref()
            .is_some_and(|b| b.audiences.contains(&self.client_id))
    }

    /// Whether this policy applies to a request for `authority` (any case, port ignored).
    pub fn protects(&self, authority: &str) -> bool {
        let host = strip_port(authority);
        let host = host.strip_suffix('.').unwrap_or(host);
        // Runs twice per request: lowercase (what browsers send) needs no copy.
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            let lower = host.to_ascii_lowercase();
            self.hosts.iter().any(|p| p.matches(&lower))
        } else {
            self.hosts.iter().any(|p| p.matches(host))
        }
    }

    /// Whether a path always answers 401 instead of redirecting to the login page.
    pub fn is_api_path(&self, path: &str) -> bool {
        let (path, _) = crate::http::split_path(path);
        self.api_paths.iter().any(|p| path_has_prefix(path, p))
    }

    /// Whether a request path (already normalized by Envoy) may pass without login.
    pub fn is_skipped(&self, path: &str) -> bool {
        !self.skip_paths.is_empty() && crate::http::skip_path_matches(path, &self.skip_paths)
    }
}

/// Segment-aware prefix match: `/api` matches `/api` and `/api/x` but not `/apix`; a prefix that
/// ends in `/` matches everything below it.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

fn validate_issuer(raw: &str) -> Result<String, ConfigError> {
    let url = parse_url(raw).map_err(|e| ConfigError::new("issuer", e.to_string()))?;
    if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
        return Err(ConfigError::new(
            "issuer",
            "must be an absolute http(s) URL",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::new(
            "issuer",
            "must not have a query or fragment (OIDC Discovery §2)",
        ));
    }
    Ok(raw.to_string())
}

fn validate_path(field: &str, p: &str) -> Result<String, ConfigError> {
    if !p.starts_with('/') {
        return Err(ConfigError::new(field, "must start with `/`"));
    }
    if p.contains(['?', '#', '%', ';', '\\'])
        || p.contains("//")
        || p.bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || !b.is_ascii())
    {
        return Err(ConfigError::new(
            field,
            "must be a plain ASCII path (no query, fragment, escapes, `;`, `\\`, `//`)",
        ));
    }
    if p.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(ConfigError::new(
            field,
            "must not contain `.` or `..` segments",
        ));
    }
    Ok(p.to_string())
}

fn validate_scopes(scopes: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    let requested =
        scopes.unwrap_or_else(|| DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect());
    let mut seen = BTreeSet::new();
    let mut out = vec!["openid".to_string()];
    seen.insert("openid".to_string());
    for (i, s) in requested.into_iter().enumerate() {
        // RFC 6749 §3.3 scope-token characters.
        if s.is_empty()
            || !s
                .bytes()
                .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
        {
            return Err(ConfigError::new(
                &format!("scopes[{i}]"),
                "not a valid scope token",
            ));
        }
        if seen.insert(s.clone()) {
            out.push(s);
        }
    }
    Ok(out)
}

fn one_of(
    name: &str,
    inline: Option<String>,
    env_name: &str,
    env_key: Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    match (inline, env_key) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            name,
            format!("set either `{name}` or `{env_name}`, not both"),
        )),
        (None, None) => Err(ConfigError::new(
            name,
            format!("one of `{name}` or `{env_name}` is required"),
        )),
        (Some(v), None) if v.is_empty() => Err(ConfigError::new(name, "must not be empty")),
        (Some(v), None) => Ok(v),
        (None, Some(key)) => match env(&key) {
            Some(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
            _ => Err(ConfigError::new(
                env_name,
                "the environment variable it names is not set in the VM (WasmPlugin \
                 vmConfig.env; the name is not shown: a secret pasted here by mistake must not \
                 reach the log)",
            )),
        },
    }
}

fn decode_cookie_secret(text: &str) -> Result<SecretBytes, String> {
    let bytes = [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text.as_bytes()).ok())
        .ok_or_else(|| "must be base64 (standard or URL-safe)".to_string())?;
    if bytes.len() < MIN_COOKIE_SECRET_BYTES {
        return Err(format!(
            "decodes to {} bytes; at least {MIN_COOKIE_SECRET_BYTES} random bytes are required",
            bytes.len()
        ));
    }
    Ok(SecretBytes::new(bytes))
}

fn strip_position(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Whether the value at `path` (serde_path_to_error's) is a secret: a slip such as a list given
/// as a string must not put the secret into Envoy's log.
fn holds_secret(path: &str) -> bool {
    let top = path.split(['.', '[']).next().unwrap_or_default();
    // The *_env fields too: the secret itself may be pasted where its variable's name belongs.
    matches!(
        top,
        "client_secret"
            | "cookie_secret"
            | "previous_cookie_secrets"
            | "client_secret_env"
            | "cookie_secret_env"
            | "previous_cookie_secrets_env"
    )
}

/// serde's `invalid type: string "…", expected …` without the value it quotes.
fn without_value(msg: &str) -> String {
    // The last one is serde's: the quoted value may itself hold ", expected ".
    let (found, expected) = match msg.rsplit_once(", expected ") {
        Some((found, expected)) => (found, Some(expected)),
        None => (msg, None),
    };
    let kind = found.split(':').next().unwrap_or("invalid value");
    match expected {
        Some(expected) => format!("{kind} (the value is secret: not shown), expected {expected}"),
        None => format!("{kind} (the value is secret: not shown)"),
    }
}

fn unknown_field_name(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    // serde: "unknown field `<name>`, expected ..." — the name itself may contain backticks.
    let end = rest.rfind("`, expected").or_else(|| rest.rfind('`'))?;
    Some(rest[..end].to_string())
}

#[cfg(test)]
mod tests;
