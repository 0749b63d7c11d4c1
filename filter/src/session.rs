//! The session and per-login cookies: what they hold, how they are sealed and named.

use serde::{Deserialize, Serialize};

use crate::crypto::{Keyring, OpenError, Purpose, SealError};
use crate::types::{Random, Secret, UnixSeconds};

/// Name of the session cookie. `__Host-` makes browsers insist on `Secure`, `Path=/` and no
/// `Domain`, so no other host (or plain-http page) can set or read it (RFC 6265bis §4.1.3.2).
pub const SESSION_COOKIE: &str = "__Host-oidc-gate";
/// Prefix of the per-login cookies: `__Host-oidc-gate-login-<flow id>`.
pub const LOGIN_COOKIE_PREFIX: &str = "__Host-oidc-gate-login-";
/// Lifetime of a login attempt, as Envoy's OAuth2 filter and Envoy Gateway use.
pub const LOGIN_TTL_SECS: u64 = 600;
/// At most this many login attempts live at once per browser; older ones are deleted, so many
/// tabs or a login loop cannot grow the Cookie header without bound.
pub const MAX_PENDING_LOGINS: usize = 4;

/// Whether a cookie name belongs to this filter (any of its cookies, present or future).
pub fn is_own_cookie(name: &str) -> bool {
    name.starts_with(SESSION_COOKIE)
}

/// An authenticated session, sealed into the session cookie.
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    /// The access token forwarded upstream.
    pub access_token: Secret,
    /// The ID token, kept for `id_token_hint` at logout (and optional forwarding).
    pub id_token: Option<Secret>,
    /// The refresh token, if the IdP issued one.
    pub refresh_token: Option<Secret>,
    /// When the access token expires (with `upstream_authorization: id_token`, the earlier of the
    /// access and ID tokens' expiries).
    pub expires_at: UnixSeconds,
    /// When the access token was obtained (at login or the last refresh); 0 in cookies sealed
    /// before it was kept.
    pub tokens_at: UnixSeconds,
    /// The ID token's `sub`.
    pub subject: String,
    /// When the user logged in.
    pub created_at: UnixSeconds,
    /// When the session was last seen in use, as the cookie records it (login, refresh, or a
    /// reseal for `session_idle_timeout`); 0 in cookies sealed before it was kept.
    pub seen_at: UnixSeconds,
    /// Absolute end of the session, whatever refreshes happen.
    pub max_expires_at: UnixSeconds,
    /// Random id of this login, kept through refreshes: what a logout ends (`None` in cookies
    /// sealed before it existed).
    pub login_id: Option<String>,
    /// ID-token claims kept for identity headers (small subset).
    pub claims: serde_json::Map<String, serde_json::Value>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("expires_at", &self.expires_at)
            .field("created_at", &self.created_at)
            .field("max_expires_at", &self.max_expires_at)
            .field("has_id_token", &self.id_token.is_some())
            .field("has_refresh_token", &self.refresh_token.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct SessionWire {
    #[serde(rename = "a")]
    access_token: String,
    #[serde(rename = "i", default, skip_serializing_if = "Option::is_none")]
    id_token: Option<String>,
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(rename = "e")]
    expires_at: u64,
    #[serde(rename = "t", default)]
    tokens_at: u64,
    #[serde(rename = "s")]
    subject: String,
    #[serde(rename = "c")]
    created_at: u64,
    #[serde(rename = "v", default)]
    seen_at: u64,
    #[serde(rename = "m")]
    max_expires_at: u64,
    #[serde(rename = "l", default, skip_serializing_if = "Option::is_none")]
    login_id: Option<String>,
    #[serde(
        rename = "k",
        default,
        skip_serializing_if = "serde_json::Map::is_empty"
    )]
    claims: serde_json::Map<String, serde_json::Value>,
}

/// Why a session cookie was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// Decryption or authentication failed.
    #[error("session cookie rejected: {0}")]
    Open(#[from] OpenError),
    /// Authentic but not a session we understand (format change).
    #[error("session cookie has an unknown format")]
    Format,
    /// The access token expired (and there is no refresh) or the absolute lifetime passed.
    #[error("session expired")]
    Expired,
}

/// Binds a cookie to the browser-visible host and its name.
pub fn cookie_context(host: &str, name: &str) -> Vec<u8> {
    let mut c = Vec::with_capacity(host.len() + name.len() + 1);
    c.extend_from_slice(host.as_bytes());
    c.push(b'|');
    c.extend_from_slice(name.as_bytes());
    c
}

impl Session {
    /// Seals the session for `host`.
    pub fn seal(
        &self,
        keys: &Keyring,
        host: &str,
        rng: &mut dyn Random,
    ) -> Result<String, SealError> {
        let wire = SessionWire {
            access_token: self.access_token.expose().to_string(),
            id_token: self.id_token.as_ref().map(|s| s.expose().to_string()),
            refresh_token: self.refresh_token.as_ref().map(|s| s.expose().to_string()),
            expires_at: self.expires_at,
            tokens_at: self.tokens_at,
            subject: self.subject.clone(),
            created_at: self.created_at,
            seen_at: self.seen_at,
            max_expires_at: self.max_expires_at,
            login_id: self.login_id.clone(),
            claims: self.claims.clone(),
        };
        let json = serde_json::to_vec(&wire).map_err(|_| SealError::Encrypt)?;
        keys.seal(
            Purpose::Session,
            &cookie_context(host, SESSION_COOKIE),
            &json,
            rng,
        )
    }

    /// Opens a session cookie for `host`; returns the session and whether it needs resealing.
    pub fn open(keys: &Keyring, host: &str, value: &str) -> Result<(Self, bool), SessionError> {
        let opened = keys.open(
            Purpose::Session,
            &cookie_context(host, SESSION_COOKIE),
            value,
        )?;
        let wire: SessionWire =
            serde_json::from_slice(&opened.plaintext).map_err(|_| SessionError::Format)?;
        Ok((
            Self {
                access_token: Secret::new(wire.access_token),
                id_token: wire.id_token.map(Secret::new),
                refresh_token: wire.refresh_token.map(Secret::new),
                expires_at: wire.expires_at,
                tokens_at: wire.tokens_at,
                subject: wire.subject,
                created_at: wire.created_at,
                seen_at: wire.seen_at,
                max_expires_at: wire.max_expires_at,
                login_id: wire.login_id,
                claims: wire.claims,
            },
            opened.needs_reseal,
        ))
    }

    /// Whether the session may serve a request at `now` without a refresh.
    pub fn is_usable(&self, now: UnixSeconds) -> bool {
        now < self.expires_at && now < self.max_expires_at
    }

    /// Whether the access token is to be refreshed at `now`: `skew` before it expires, but never
    /// in the first half of its life, so that tokens the IdP issues for no longer than `skew` are
    /// not refreshed on every request.
    pub fn refresh_due(&self, now: UnixSeconds, skew: u64) -> bool {
        let margin = if self.tokens_at == 0 {
            skew
        } else {
            skew.min(self.expires_at.saturating_sub(self.tokens_at) / 2)
        };
        now.saturating_add(margin) >= self.expires_at
    }
}

/// What one login attempt must remember between the redirect and the callback.
pub struct LoginState {
    /// The full `state` value sent to the IdP (`<flow id>.<random>`).
    pub state: Secret,
    /// The `nonce` sent to the IdP.
    pub nonce: Secret,
    /// The PKCE code verifier (RFC 7636); never leaves the gateway except to the token endpoint.
    pub code_verifier: Secret,
    /// Path and query to return to after login.
    pub return_to: String,
    /// The `:authority` (host and port) the login started on: the callback must come back to it,
    /// since the `redirect_uri` sent to the IdP was built from it.
    pub authority: String,
    /// When the login started.
    pub created_at: UnixSeconds,
}

impl std::fmt::Debug for LoginState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginState")
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct LoginWire {
    s: String,
    n: String,
    v: String,
    r: String,
    #[serde(default)]
    a: String,
    c: u64,
}

/// Why a login cookie was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginCookieError {
    /// Decryption or authentication failed.
    #[error("login cookie rejected: {0}")]
    Open(#[from] OpenError),
    /// Authentic but unreadable.
    #[error("login cookie has an unknown format")]
    Format,
    /// Older than the login lifetime.
    #[error("login attempt expired")]
    Expired,
}

/// The login cookie name for a flow id.
pub fn login_cookie_name(flow_id: &str) -> String {
    format!("{LOGIN_COOKIE_PREFIX}{flow_id}")
}

impl LoginState {
    /// Seals the login state for `host` under the cookie `name`.
    pub fn seal(
        &self,
        keys: &Keyring,
        host: &str,
        name: &str,
        rng: &mut dyn Random,
    ) -> Result<String, SealError> {
        let wire = LoginWire {
            s: self.state.expose().to_string(),
            n: self.nonce.expose().to_string(),
            v: self.code_verifier.expose().to_string(),
            r: self.return_to.clone(),
            a: self.authority.clone(),
            c: self.created_at,
        };
        let json = serde_json::to_vec(&wire).map_err(|_| SealError::Encrypt)?;
        keys.seal(Purpose::Login, &cookie_context(host, name), &json, rng)
    }

    /// Opens a login cookie; refuses it after [`LOGIN_TTL_SECS`].
    pub fn open(
        keys: &Keyring,
        host: &str,
        name: &str,
        value: &str,
        now: UnixSeconds,
    ) -> Result<Self, LoginCookieError> {
        let opened = keys.open(Purpose::Login, &cookie_context(host, name), value)?;
        let w: LoginWire =
            serde_json::from_slice(&opened.plaintext).map_err(|_| LoginCookieError::Format)?;
        if now >= w.c.saturating_add(LOGIN_TTL_SECS) || w.c > now.saturating_add(LOGIN_TTL_SECS) {
            return Err(LoginCookieError::Expired);
        }
        Ok(Self {
            state: Secret::new(w.s),
            nonce: Secret::new(w.n),
            code_verifier: Secret::new(w.v),
            return_to: w.r,
            authority: w.a,
            created_at: w.c,
        })
    }
}

/// A `Set-Cookie` value with the attributes every cookie of ours carries.
pub fn set_cookie(name: &str, value: &str, max_age: u64) -> String {
    format!("{name}={value}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={max_age}")
}

/// A `Set-Cookie` value that deletes the cookie (same attributes, so browsers match it).
pub fn delete_cookie(name: &str) -> String {
    format!("{name}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::testing::SeededRandom;
    use crate::types::SecretBytes;

    fn keys() -> Keyring {
        Keyring::new(&SecretBytes::new(vec![9u8; 32]), &[], b"scope")
    }

    fn session() -> Session {
        Session {
            access_token: Secret::new("at"),
            id_token: Some(Secret::new("it")),
            refresh_token: None,
            expires_at: 2000,
            tokens_at: 1000,
            subject: "u1".into(),
            created_at: 1000,
            seen_at: 0,
            max_expires_at: 5000,
            login_id: Some("login-1".into()),
            claims: Default::default(),
        }
    }

    #[test]
    fn session_round_trip_and_host_binding() {
        let mut rng = SeededRandom(11);
        let s = session();
        let sealed = s.seal(&keys(), "app.example.com", &mut rng).unwrap();
        let (back, reseal) = Session::open(&keys(), "app.example.com", &sealed).unwrap();
        assert!(back == s && !reseal);
        assert!(Session::open(&keys(), "other.example.com", &sealed).is_err());
    }

    #[test]
    fn session_usability_respects_both_expiries() {
        let s = session();
        assert!(s.is_usable(1999));
        assert!(!s.is_usable(2000));
        let mut long = session();
        long.expires_at = 9000;
        assert!(!long.is_usable(5000));
    }

    #[test]
    fn login_state_expires_and_is_bound_to_its_name() {
        let mut rng = SeededRandom(12);
        let l = LoginState {
            state: Secret::new("f.s"),
            nonce: Secret::new("n"),
            code_verifier: Secret::new("v"),
            return_to: "/x".into(),
            authority: "h".into(),
            created_at: 100,
        };
        let name = login_cookie_name("f");
        let sealed = l.seal(&keys(), "h", &name, &mut rng).unwrap();
        assert!(LoginState::open(&keys(), "h", &name, &sealed, 100 + LOGIN_TTL_SECS - 1).is_ok());
        assert_eq!(
            LoginState::open(&keys(), "h", &name, &sealed, 100 + LOGIN_TTL_SECS).unwrap_err(),
            LoginCookieError::Expired
        );
        assert!(LoginState::open(&keys(), "h", &login_cookie_name("g"), &sealed, 101).is_err());
    }

    #[test]
    fn debug_output_has_no_tokens() {
        let out = format!("{:?}", session());
        assert!(!out.contains("at\"") && !out.contains("\"it"));
    }
}
