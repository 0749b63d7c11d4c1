//! HTTP endpoints.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::keys::{self, SignMode};
use crate::{html, unix_now, AccessGrant, ClientConfig, CodeGrant, Fault, IdpState, RefreshGrant};

/// Name of mock-idp's own login session cookie.
pub const SESSION_COOKIE: &str = "mock-idp-session";

type St = State<Arc<IdpState>>;

/// The router serving all endpoints (OIDC endpoints below the issuer's path, admin API at
/// `/__admin/...`).
pub fn app(state: Arc<IdpState>) -> Router {
    let prefix = url::Url::parse(&state.issuer)
        .map(|u| u.path().trim_end_matches('/').to_string())
        .unwrap_or_default();
    let oidc: Router<Arc<IdpState>> = Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/keys", get(jwks))
        .route("/jwks/{name}", get(jwks))
        .route("/authorize", get(authorize_get).post(authorize_post))
        .route("/token", post(token))
        .route("/userinfo", get(userinfo).post(userinfo))
        .route("/logout", get(logout).post(logout));
    let admin: Router<Arc<IdpState>> = Router::new()
        .route("/__admin/fault", post(admin_fault))
        .route("/__admin/stats", get(admin_stats))
        .route("/__admin/reset", post(admin_reset))
        .route("/__admin/rotate-keys", post(admin_rotate))
        .layer(middleware::from_fn(loopback_only));
    let routes = if prefix.is_empty() {
        oidc
    } else {
        Router::new().nest(&prefix, oidc)
    };
    routes
        .merge(admin)
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// helpers

async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    // Path only: query strings carry codes, states and tokens.
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    eprintln!("mock-idp: {method} {path} {}", resp.status().as_u16());
    resp
}

async fn loopback_only(req: Request, next: Next) -> Response {
    if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
        if !peer.ip().is_loopback() {
            return StatusCode::NOT_FOUND.into_response();
        }
    }
    next.run(req).await
}

fn parse_params(raw: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(raw).into_owned().collect()
}

/// First value of `name`; `Err` when the parameter is repeated (RFC 6749 §3.1).
fn single(params: &[(String, String)], name: &str) -> Result<Option<String>, String> {
    let mut it = params.iter().filter(|(k, _)| k == name);
    let first = it.next().map(|(_, v)| v.clone());
    if it.next().is_some() {
        return Err(format!("parameter `{name}` repeated"));
    }
    Ok(first.filter(|v| !v.is_empty()))
}

fn no_store(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

fn html_response(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    no_store(resp)
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut resp = (status, v.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn redirect(location: &str) -> Response {
    let mut resp = StatusCode::FOUND.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    no_store(resp)
}

/// Append query parameters to an absolute URI.
fn add_query(uri: &str, params: &[(&str, &str)]) -> String {
    match url::Url::parse(uri) {
        Ok(mut u) => {
            {
                let mut q = u.query_pairs_mut();
                for (k, v) in params {
                    q.append_pair(k, v);
                }
            }
            u.to_string()
        }
        Err(_) => {
            let mut ser = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in params {
                ser.append_pair(k, v);
            }
            let sep = if uri.contains('?') { '&' } else { '?' };
            format!("{uri}{sep}{}", ser.finish())
        }
    }
}

fn status_or_500(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn injected(status: u16) -> Response {
    json_response(
        status_or_500(status),
        &json!({"error": "server_error", "error_description": "mock-idp injected fault"}),
    )
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn session_cookie(value: &str, clear: bool) -> HeaderValue {
    let s = if clear {
        format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0")
    } else {
        format!("{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax")
    };
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn url_decode(s: &str) -> String {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8_lossy()
        .into_owned()
}

fn s256(verifier: &str) -> String {
    use sha2::Digest as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier))
}

/// RFC 7636 code_verifier / code_challenge syntax: 43-128 unreserved characters.
fn pkce_syntax_ok(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

// ---------------------------------------------------------------------------------------------
// discovery and keys

async fn discovery(State(st): St) -> Response {
    st.lock().stats.discovery += 1;
    let mut issuer = st.issuer.clone();
    for f in st.faults() {
        match f {
            Fault::DiscoveryStatus(code) => return injected(code),
            Fault::DiscoveryIssuer(i) => issuer = i,
            _ => {}
        }
    }
    let base = &st.issuer;
    let mut doc = json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{base}/authorize"),
        "token_endpoint": format!("{base}/token"),
        "jwks_uri": format!("{base}/keys"),
        "userinfo_endpoint": format!("{base}/userinfo"),
        "end_session_endpoint": format!("{base}/logout"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [st.cfg.signing_alg.as_str()],
        "scopes_supported": ["openid", "email", "profile", "groups", "offline_access"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "code_challenge_methods_supported": ["S256"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "claims_supported": [
            "iss", "sub", "aud", "azp", "exp", "iat", "auth_time", "nonce", "at_hash", "sid",
            "email", "email_verified", "name", "preferred_username", "groups"
        ],
        "authorization_response_iss_parameter_supported": true,
    });
    for f in st.faults() {
        if let (Fault::DiscoveryFields(fields), Value::Object(d)) = (&f, &mut doc) {
            keys::merge(d, fields);
        }
    }
    json_response(StatusCode::OK, &doc)
}

async fn jwks(State(st): St, uri: axum::http::Uri) -> Response {
    {
        let mut inner = st.lock();
        inner.stats.jwks += 1;
        inner.stats.last_jwks_path = Some(uri.path().to_string());
    }
    let mut doc = st.jwks();
    for f in st.faults() {
        match f {
            Fault::JwksStatus(code) => return injected(code),
            Fault::JwksBody(body) => {
                return json_response_raw(StatusCode::OK, "application/json", body);
            }
            Fault::IdTokenSignWithWeakRsaKey => {
                if let Some(list) = doc.get_mut("keys").and_then(Value::as_array_mut) {
                    list.push(keys::weak_rsa_key().jwk.clone());
                }
            }
            _ => {}
        }
    }
    json_response(StatusCode::OK, &doc)
}

fn json_response_raw(status: StatusCode, content_type: &str, body: String) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type)
            .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream")),
    );
    resp
}

// ---------------------------------------------------------------------------------------------
// authorization endpoint

struct AuthzRequest {
    client_id: String,
    redirect_uri: String,
    scope: String,
    state: Option<String>,
    nonce: Option<String>,
    code_challenge: String,
    prompt: Option<String>,
}

enum AuthzError {
    /// Not safe to redirect: show an error page.
    Page(String),
    /// Redirect back to the (validated) client with `error=`.
    Redirect {
        redirect_uri: String,
        error: &'static str,
        description: String,
        state: Option<String>,
    },
}

const AUTHZ_PARAMS: &[&str] = &[
    "client_id",
    "redirect_uri",
    "response_type",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
    "prompt",
];

impl IdpState {
    fn client(&self, id: &str) -> Option<&ClientConfig> {
        self.cfg.clients.iter().find(|c| c.id == id)
    }

    fn validate_authz(&self, params: &[(String, String)]) -> Result<AuthzRequest, AuthzError> {
        let page = AuthzError::Page;
        let get = |n: &str| single(params, n);
        let client_id = get("client_id")
            .map_err(page)?
            .ok_or_else(|| AuthzError::Page("Missing client_id.".into()))?;
        let client = self
            .client(&client_id)
            .ok_or_else(|| AuthzError::Page(format!("Unknown client `{client_id}`.")))?;
        let redirect_uri = get("redirect_uri")
            .map_err(page)?
            .ok_or_else(|| AuthzError::Page("Missing redirect_uri.".into()))?;
        let parsed = url::Url::parse(&redirect_uri)
            .map_err(|_| AuthzError::Page("redirect_uri is not an absolute URI.".into()))?;
        if parsed.fragment().is_some() {
            return Err(AuthzError::Page(
                "redirect_uri must not contain a fragment.".into(),
            ));
        }
        if !client.redirect_uris.is_empty() && !client.redirect_uris.contains(&redirect_uri) {
            return Err(AuthzError::Page(format!(
                "redirect_uri is not registered for client `{client_id}`."
            )));
        }
        // From here on errors are redirected to the client.
        let state = params
            .iter()
            .find(|(k, _)| k == "state")
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty());
        let fail = |error: &'static str, description: String| AuthzError::Redirect {
            redirect_uri: redirect_uri.clone(),
            error,
            description,
            state: state.clone(),
        };
        for name in AUTHZ_PARAMS {
            if let Err(e) = get(name) {
                return Err(fail("invalid_request", e));
            }
        }
        let get = |n: &str| get(n).ok().flatten();
        match get("response_type").as_deref() {
            Some("code") => {}
            None => return Err(fail("invalid_request", "missing response_type".into())),
            Some(_) => {
                return Err(fail(
                    "unsupported_response_type",
                    "only response_type=code is supported".into(),
                ))
            }
        }
        let scope = get("scope").unwrap_or_default();
        if !scope.split(' ').any(|s| s == "openid") {
            return Err(fail("invalid_scope", "scope must contain openid".into()));
        }
        let code_challenge = get("code_challenge")
            .ok_or_else(|| fail("invalid_request", "PKCE code_challenge is required".into()))?;
        if get("code_challenge_method").as_deref() != Some("S256") {
            return Err(fail(
                "invalid_request",
                "code_challenge_method must be S256".into(),
            ));
        }
        if !pkce_syntax_ok(&code_challenge) {
            return Err(fail("invalid_request", "malformed code_challenge".into()));
        }
        Ok(AuthzRequest {
            client_id,
            redirect_uri: redirect_uri.clone(),
            scope,
            state: state.clone(),
            nonce: get("nonce"),
            code_challenge,
            prompt: get("prompt"),
        })
    }

    /// Issue a code and build the redirect back to the client.
    fn code_redirect(
        &self,
        req: &AuthzRequest,
        username: &str,
        auth_time: u64,
        session_cookie: &str,
    ) -> String {
        let code = keys::random_token(32);
        self.lock().codes.insert(
            code.clone(),
            CodeGrant {
                client_id: req.client_id.clone(),
                redirect_uri: req.redirect_uri.clone(),
                code_challenge: req.code_challenge.clone(),
                nonce: req.nonce.clone(),
                username: username.to_string(),
                scope: req.scope.clone(),
                auth_time,
                expires: Instant::now() + self.cfg.code_ttl,
                used: false,
                family: keys::random_token(12),
                sid: crate::public_sid(session_cookie),
            },
        );
        let mut q: Vec<(&str, &str)> = vec![("code", &code)];
        if let Some(s) = &req.state {
            q.push(("state", s));
        }
        q.push(("iss", &self.issuer));
        add_query(&req.redirect_uri, &q)
    }
}

fn authz_error_response(e: AuthzError, issuer: &str) -> Response {
    match e {
        AuthzError::Page(msg) => html_response(
            StatusCode::BAD_REQUEST,
            html::error_page("Invalid request", &msg),
        ),
        AuthzError::Redirect {
            redirect_uri,
            error,
            description,
            state,
        } => {
            let mut q: Vec<(&str, &str)> =
                vec![("error", error), ("error_description", &description)];
            if let Some(s) = &state {
                q.push(("state", s));
            }
            q.push(("iss", issuer));
            redirect(&add_query(&redirect_uri, &q))
        }
    }
}

fn hidden_fields(params: &[(String, String)]) -> Vec<(String, String)> {
    AUTHZ_PARAMS
        .iter()
        .filter_map(|n| {
            params
                .iter()
                .find(|(k, _)| k == n)
                .map(|(k, v)| (k.clone(), v.clone()))
        })
        .filter(|(k, _)| k != "prompt")
        .collect()
}

async fn authorize_get(State(st): St, RawQuery(q): RawQuery, headers: HeaderMap) -> Response {
    st.lock().stats.authorize_get += 1;
    let params = parse_params(q.unwrap_or_default().as_bytes());
    let req = match st.validate_authz(&params) {
        Ok(r) => r,
        Err(e) => return authz_error_response(e, &st.issuer),
    };
    let prompts: Vec<&str> = req.prompt.as_deref().unwrap_or("").split(' ').collect();
    let session = cookie_value(&headers, SESSION_COOKIE).and_then(|sid| {
        let found = st.lock().sessions.get(&sid).cloned();
        found.map(|s| (sid, s))
    });
    if let Some((sid, (username, auth_time))) = &session {
        if !prompts.contains(&"login") {
            return redirect(&st.code_redirect(&req, username, *auth_time, sid));
        }
    }
    if prompts.contains(&"none") {
        return authz_error_response(
            AuthzError::Redirect {
                redirect_uri: req.redirect_uri,
                error: "login_required",
                description: "no login session".into(),
                state: req.state,
            },
            &st.issuer,
        );
    }
    html_response(
        StatusCode::OK,
        html::login_page(&req.client_id, &hidden_fields(&params), "", None),
    )
}

async fn authorize_post(State(st): St, body: Bytes) -> Response {
    st.lock().stats.authorize_post += 1;
    let params = parse_params(&body);
    let req = match st.validate_authz(&params) {
        Ok(r) => r,
        Err(e) => return authz_error_response(e, &st.issuer),
    };
    let username = single(&params, "username")
        .ok()
        .flatten()
        .unwrap_or_default();
    let password = single(&params, "password")
        .ok()
        .flatten()
        .unwrap_or_default();
    let user = st
        .cfg
        .users
        .iter()
        .find(|u| u.username == username && u.password == password);
    let Some(user) = user else {
        return html_response(
            StatusCode::OK,
            html::login_page(
                &req.client_id,
                &hidden_fields(&params),
                &username,
                Some("Invalid username or password"),
            ),
        );
    };
    let auth_time = unix_now();
    let sid = keys::random_token(24);
    st.lock()
        .sessions
        .insert(sid.clone(), (user.username.clone(), auth_time));
    let mut resp = redirect(&st.code_redirect(&req, &user.username, auth_time, &sid));
    resp.headers_mut()
        .append(header::SET_COOKIE, session_cookie(&sid, false));
    resp
}

// ---------------------------------------------------------------------------------------------
// token endpoint

struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
}

fn oauth_err(error: &'static str, description: impl Into<String>) -> OAuthError {
    let status = if error == "invalid_client" {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::BAD_REQUEST
    };
    OAuthError {
        status,
        error,
        description: description.into(),
    }
}

/// Data needed to mint a token set.
struct Issue {
    client_id: String,
    username: String,
    scope: String,
    auth_time: u64,
    nonce: Option<String>,
    family: String,
    /// The IdP session's public id.
    sid: String,
    /// Refresh token to hand back unchanged (no rotation).
    keep_refresh: Option<String>,
}

fn basic_credentials(headers: &HeaderMap) -> Option<Result<(String, String), OAuthError>> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let parsed = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(id, secret)| (url_decode(id), url_decode(secret)))
        });
    Some(parsed.ok_or_else(|| oauth_err("invalid_client", "malformed Basic credentials")))
}

impl IdpState {
    fn authenticate_client(
        &self,
        headers: &HeaderMap,
        params: &[(String, String)],
    ) -> Result<&ClientConfig, OAuthError> {
        let form_id = single(params, "client_id").map_err(|e| oauth_err("invalid_request", e))?;
        let form_secret =
            single(params, "client_secret").map_err(|e| oauth_err("invalid_request", e))?;
        let (id, secret) = match (basic_credentials(headers), form_secret) {
            (Some(_), Some(_)) => {
                return Err(oauth_err(
                    "invalid_request",
                    "more than one client authentication method",
                ))
            }
            (Some(basic), None) => {
                let (id, secret) = basic?;
                if form_id.as_ref().is_some_and(|f| *f != id) {
                    return Err(oauth_err("invalid_client", "client_id mismatch"));
                }
                (id, secret)
            }
            (None, Some(secret)) => {
                let id =
                    form_id.ok_or_else(|| oauth_err("invalid_client", "client_id is required"))?;
                (id, secret)
            }
            (None, None) => {
                return Err(oauth_err(
                    "invalid_client",
                    "client authentication required",
                ))
            }
        };
        let client = self
            .client(&id)
            .ok_or_else(|| oauth_err("invalid_client", "unknown client"))?;
        if client.secret != secret {
            return Err(oauth_err("invalid_client", "client authentication failed"));
        }
        Ok(client)
    }

    fn token_grant(
        &self,
        headers: &HeaderMap,
        params: &[(String, String)],
    ) -> Result<Value, OAuthError> {
        let get = |n: &str| single(params, n).map_err(|e| oauth_err("invalid_request", e));
        let grant_type =
            get("grant_type")?.ok_or_else(|| oauth_err("invalid_request", "missing grant_type"))?;
        if grant_type != "authorization_code" && grant_type != "refresh_token" {
            return Err(oauth_err(
                "unsupported_grant_type",
                format!("grant_type `{grant_type}` is not supported"),
            ));
        }
        let client = self.authenticate_client(headers, params)?;
        let issue = if grant_type == "authorization_code" {
            let code = get("code")?.ok_or_else(|| oauth_err("invalid_request", "missing code"))?;
            let redirect_uri = get("redirect_uri")?;
            let verifier = get("code_verifier")?;
            let mut inner = self.lock();
            let grant = inner
                .codes
                .get_mut(&code)
                .ok_or_else(|| oauth_err("invalid_grant", "unknown authorization code"))?;
            if grant.used {
                // Like real IdPs: revoke everything issued from this code.
                let family = grant.family.clone();
                inner.refresh.retain(|_, r| r.family != family);
                inner
                    .access
                    .retain(|_, a| a.family.as_deref() != Some(family.as_str()));
                return Err(oauth_err(
                    "invalid_grant",
                    "authorization code already used",
                ));
            }
            if Instant::now() >= grant.expires {
                return Err(oauth_err("invalid_grant", "authorization code expired"));
            }
            if grant.client_id != client.id {
                return Err(oauth_err(
                    "invalid_grant",
                    "authorization code was issued to another client",
                ));
            }
            match redirect_uri {
                None => return Err(oauth_err("invalid_request", "missing redirect_uri")),
                Some(r) if r != grant.redirect_uri => {
                    return Err(oauth_err("invalid_grant", "redirect_uri mismatch"))
                }
                Some(_) => {}
            }
            let verifier =
                verifier.ok_or_else(|| oauth_err("invalid_grant", "missing code_verifier"))?;
            if !pkce_syntax_ok(&verifier) || s256(&verifier) != grant.code_challenge {
                return Err(oauth_err("invalid_grant", "PKCE verification failed"));
            }
            grant.used = true;
            Issue {
                client_id: grant.client_id.clone(),
                username: grant.username.clone(),
                scope: grant.scope.clone(),
                auth_time: grant.auth_time,
                nonce: grant.nonce.clone(),
                family: grant.family.clone(),
                sid: grant.sid.clone(),
                keep_refresh: None,
            }
        } else {
            let rt = get("refresh_token")?
                .ok_or_else(|| oauth_err("invalid_request", "missing refresh_token"))?;
            let requested_scope = get("scope")?;
            let mut inner = self.lock();
            let grant = inner
                .refresh
                .get(&rt)
                .ok_or_else(|| oauth_err("invalid_grant", "unknown or revoked refresh token"))?;
            if Instant::now() >= grant.expires {
                inner.refresh.remove(&rt);
                return Err(oauth_err("invalid_grant", "refresh token expired"));
            }
            if grant.client_id != client.id {
                return Err(oauth_err(
                    "invalid_grant",
                    "refresh token was issued to another client",
                ));
            }
            let scope = match requested_scope {
                Some(s) => {
                    let granted: Vec<&str> = grant.scope.split(' ').collect();
                    if !s.split(' ').all(|x| granted.contains(&x)) {
                        return Err(oauth_err("invalid_scope", "scope exceeds the grant"));
                    }
                    s
                }
                None => grant.scope.clone(),
            };
            let issue = Issue {
                client_id: grant.client_id.clone(),
                username: grant.username.clone(),
                scope,
                auth_time: grant.auth_time,
                nonce: None,
                family: grant.family.clone(),
                sid: grant.sid.clone(),
                keep_refresh: (!self.cfg.rotate_refresh_tokens).then(|| rt.clone()),
            };
            if self.cfg.rotate_refresh_tokens {
                inner.refresh.remove(&rt);
            }
            issue
        };
        Ok(self.issue_tokens(issue))
    }

    fn issue_tokens(&self, issue: Issue) -> Value {
        let faults = self.faults();
        let user = self
            .cfg
            .users
            .iter()
            .find(|u| u.username == issue.username)
            .cloned()
            .expect("user of a grant exists");
        let sub = user.subject();
        let now = unix_now();
        let access_token = if self.cfg.opaque_access_tokens {
            keys::random_token(32)
        } else {
            self.jwt_access_token(
                &sub,
                &self.cfg.access_token_audience,
                &issue.client_id,
                &issue.scope,
                self.cfg.access_token_ttl,
            )
        };
        let mut claims = Map::new();
        let c = &mut claims;
        c.insert("iss".into(), json!(self.issuer));
        c.insert("sub".into(), json!(sub));
        c.insert("aud".into(), json!(issue.client_id));
        c.insert("azp".into(), json!(issue.client_id));
        c.insert("iat".into(), json!(now));
        c.insert("exp".into(), json!(now + self.cfg.id_token_ttl.as_secs()));
        c.insert("auth_time".into(), json!(issue.auth_time));
        c.insert("sid".into(), json!(issue.sid));
        if let Some(n) = &issue.nonce {
            c.insert("nonce".into(), json!(n));
        }
        c.insert("at_hash".into(), json!(keys::at_hash(&access_token)));
        c.insert("email".into(), json!(user.email));
        c.insert("email_verified".into(), json!(true));
        c.insert("name".into(), json!(user.name));
        c.insert("preferred_username".into(), json!(user.username));
        c.insert("groups".into(), json!(user.groups));
        let mut header_overrides: Vec<&Value> = Vec::new();
        let mut mode = SignMode::Normal;
        let mut corrupt = false;
        let mut weak = false;
        for f in &faults {
            match f {
                Fault::IdTokenClaims(v) => keys::merge(&mut claims, v),
                Fault::IdTokenHeader(v) => header_overrides.push(v),
                Fault::IdTokenSignWithHs256PublicKey => mode = SignMode::Hs256WithPublicKey,
                Fault::IdTokenCorruptSignature => corrupt = true,
                Fault::IdTokenSignWithWeakRsaKey => weak = true,
                _ => {}
            }
        }
        let current = self.current_key();
        let key: &keys::SigningKey = if weak { keys::weak_rsa_key() } else { &current };
        let id_token = keys::encode_jwt(
            key,
            "JWT",
            &header_overrides,
            &Value::Object(claims),
            mode,
            corrupt,
        );
        let refresh_token = issue
            .keep_refresh
            .clone()
            .unwrap_or_else(|| keys::random_token(32));
        {
            let mut inner = self.lock();
            if inner.id_tokens.len() >= MAX_REMEMBERED_ID_TOKENS {
                // Forget about half (in hash order): a long-running IdP keeps honouring most hints.
                let mut keep = false;
                inner.id_tokens.retain(|_, _| {
                    keep = !keep;
                    keep
                });
            }
            inner
                .id_tokens
                .insert(id_token_digest(&id_token), issue.family.clone());
            inner.access.insert(
                access_token.clone(),
                AccessGrant {
                    sub: sub.clone(),
                    username: Some(user.username.clone()),
                    expires: Instant::now() + self.cfg.access_token_ttl,
                    family: Some(issue.family.clone()),
                },
            );
            if issue.keep_refresh.is_none() {
                inner.refresh.insert(
                    refresh_token.clone(),
                    RefreshGrant {
                        client_id: issue.client_id.clone(),
                        username: user.username.clone(),
                        scope: issue.scope.clone(),
                        auth_time: issue.auth_time,
                        expires: Instant::now() + self.cfg.refresh_token_ttl,
                        family: issue.family.clone(),
                        sid: issue.sid.clone(),
                    },
                );
            }
        }
        let mut resp = Map::new();
        resp.insert("access_token".into(), json!(access_token));
        resp.insert("token_type".into(), json!("Bearer"));
        resp.insert(
            "expires_in".into(),
            json!(self.cfg.access_token_ttl.as_secs()),
        );
        resp.insert("refresh_token".into(), json!(refresh_token));
        resp.insert("id_token".into(), json!(id_token));
        resp.insert("scope".into(), json!(issue.scope));
        for f in &faults {
            if let Fault::TokenResponseFields(v) = f {
                keys::merge(&mut resp, v);
            }
        }
        Value::Object(resp)
    }
}

/// Issued ID tokens remembered for `id_token_hint` (a dev IdP's memory stays bounded).
const MAX_REMEMBERED_ID_TOKENS: usize = 100_000;

fn id_token_digest(id_token: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(id_token.as_bytes()).into()
}

async fn token(State(st): St, headers: HeaderMap, body: Bytes) -> Response {
    let params = parse_params(&body);
    {
        let basic = basic_credentials(&headers).is_some();
        let post = params.iter().any(|(k, _)| k == "client_secret");
        let method = match (basic, post) {
            (true, true) => "both",
            (true, false) => "client_secret_basic",
            (false, true) => "client_secret_post",
            (false, false) => "none",
        };
        let mut inner = st.lock();
        inner.stats.token += 1;
        if params
            .iter()
            .any(|(k, v)| k == "grant_type" && v == "refresh_token")
        {
            inner.stats.refresh += 1;
        }
        inner.stats.last_token_form = params.iter().cloned().collect::<BTreeMap<_, _>>();
        inner.stats.last_token_auth_method = Some(method.to_string());
    }
    let faults = st.faults();
    for f in &faults {
        if let Fault::TokenDelay(d) = f {
            tokio::time::sleep(*d).await;
        }
    }
    for f in &faults {
        match f {
            Fault::TokenHang => {
                let mut stop = st.shutdown.subscribe();
                let _ = stop.wait_for(|v| *v).await;
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
            Fault::TokenStatus(code) => return no_store(injected(*code)),
            Fault::TokenBody { content_type, body } => {
                return no_store(json_response_raw(
                    StatusCode::OK,
                    content_type,
                    body.clone(),
                ))
            }
            Fault::TokenRedirect => return redirect(&format!("{}/", st.issuer)),
            _ => {}
        }
    }
    let result = st.token_grant(&headers, &params);
    for f in &faults {
        if let Fault::TokenDelayAfterGrant(d) = f {
            tokio::time::sleep(*d).await;
        }
    }
    match result {
        Ok(v) => {
            st.lock().stats.token_ok += 1;
            let mut resp = no_store(json_response(StatusCode::OK, &v));
            if faults
                .iter()
                .any(|f| matches!(f, Fault::TokenHeaderNotUtf8))
            {
                if let Ok(latin1) = HeaderValue::from_bytes(b"caf\xe9 cr\xe8me") {
                    resp.headers_mut().insert("x-note", latin1);
                }
            }
            resp
        }
        Err(e) => {
            {
                let mut inner = st.lock();
                inner.stats.token_errors += 1;
                inner.stats.last_token_error = Some(e.error.to_string());
            }
            let mut resp = no_store(json_response(
                e.status,
                &json!({"error": e.error, "error_description": e.description}),
            ));
            if e.status == StatusCode::UNAUTHORIZED {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"mock-idp\""),
                );
            }
            resp
        }
    }
}

// ---------------------------------------------------------------------------------------------
// userinfo

async fn userinfo(State(st): St, headers: HeaderMap) -> Response {
    st.lock().stats.userinfo += 1;
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_string());
    let grant = token.and_then(|t| {
        let inner = st.lock();
        inner
            .access
            .get(&t)
            .filter(|a| Instant::now() < a.expires)
            .map(|a| (a.sub.clone(), a.username.clone()))
    });
    let Some((sub, username)) = grant else {
        let mut resp = json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"error": "invalid_token", "error_description": "missing, unknown or expired access token"}),
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        return resp;
    };
    let mut claims = json!({ "sub": sub });
    if let Some(u) = username.and_then(|n| st.cfg.users.iter().find(|u| u.username == n)) {
        claims = json!({
            "sub": sub,
            "email": u.email,
            "email_verified": true,
            "name": u.name,
            "preferred_username": u.username,
            "groups": u.groups,
        });
    }
    no_store(json_response(StatusCode::OK, &claims))
}

// ---------------------------------------------------------------------------------------------
// end session

async fn logout(
    State(st): St,
    method: Method,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    st.lock().stats.end_session += 1;
    let params = if method == Method::POST {
        parse_params(&body)
    } else {
        parse_params(q.unwrap_or_default().as_bytes())
    };
    let bad = |msg: &str| {
        html_response(
            StatusCode::BAD_REQUEST,
            html::error_page("Sign-out failed", msg),
        )
    };
    let get = |n: &str| single(&params, n);
    let (hint, client_id, post_logout, state) = match (
        get("id_token_hint"),
        get("client_id"),
        get("post_logout_redirect_uri"),
        get("state"),
    ) {
        (Ok(a), Ok(b), Ok(c), Ok(d)) => (a, b, c, d),
        _ => return bad("A parameter was repeated."),
    };
    let hint_aud = match &hint {
        None => None,
        Some(h) => {
            let Some(payload) = keys::decode_payload_unverified(h) else {
                return bad("id_token_hint is not a JWT.");
            };
            match payload.get("aud") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(a)) => a.first().and_then(Value::as_str).map(str::to_owned),
                _ => None,
            }
        }
    };
    if let (Some(c), Some(a)) = (&client_id, &hint_aud) {
        if c != a {
            return bad("client_id does not match the id_token_hint audience.");
        }
    }
    let client_id = client_id.or(hint_aud);
    let target = match &post_logout {
        None => None,
        Some(uri) => {
            let Some(client) = client_id.as_deref().and_then(|c| st.client(c)) else {
                return bad("post_logout_redirect_uri needs a known client_id or id_token_hint.");
            };
            if url::Url::parse(uri).is_err() {
                return bad("post_logout_redirect_uri is not an absolute URI.");
            }
            if !client.post_logout_redirect_uris.is_empty()
                && !client.post_logout_redirect_uris.contains(uri)
            {
                return bad("post_logout_redirect_uri is not registered for this client.");
            }
            Some(uri.clone())
        }
    };
    {
        let mut inner = st.lock();
        if let Some(sid) = cookie_value(&headers, SESSION_COOKIE) {
            if inner.sessions.remove(&sid).is_some() {
                // Ending the IdP session ends every login made in it, as Keycloak does.
                let public = crate::public_sid(&sid);
                let before = inner.refresh.len();
                inner.refresh.retain(|_, r| r.sid != public);
                let revoked = (before - inner.refresh.len()) as u64;
                inner.stats.refresh_revoked_at_logout += revoked;
            }
        }
        // Only a hint this IdP issued (byte for byte) ends a login's refresh tokens: a forged
        // hint revokes nothing.
        if let Some(family) = hint
            .as_deref()
            .and_then(|h| inner.id_tokens.get(&id_token_digest(h)).cloned())
        {
            let before = inner.refresh.len();
            inner.refresh.retain(|_, r| r.family != family);
            let revoked = (before - inner.refresh.len()) as u64;
            inner.stats.refresh_revoked_at_logout += revoked;
        }
    }
    let mut resp = match target {
        Some(uri) => match &state {
            Some(s) => redirect(&add_query(&uri, &[("state", s)])),
            None => redirect(&uri),
        },
        None => html_response(StatusCode::OK, html::signed_out_page()),
    };
    resp.headers_mut()
        .append(header::SET_COOKIE, session_cookie("", true));
    resp
}

// ---------------------------------------------------------------------------------------------
// admin API

async fn admin_fault(State(st): St, body: Bytes) -> Response {
    let parsed = serde_json::from_slice::<Value>(&body)
        .map_err(|e| e.to_string())
        .and_then(|v| Fault::from_json(&v));
    match parsed {
        Ok(f) => {
            st.set_fault(f);
            json_response(StatusCode::OK, &json!({"ok": true}))
        }
        Err(e) => json_response(StatusCode::BAD_REQUEST, &json!({"error": e})),
    }
}

async fn admin_stats(State(st): St) -> Response {
    json_response(
        StatusCode::OK,
        &serde_json::to_value(st.stats()).unwrap_or(Value::Null),
    )
}

async fn admin_reset(State(st): St) -> Response {
    st.reset_stats();
    st.set_fault(Fault::None);
    json_response(StatusCode::OK, &json!({"ok": true}))
}

async fn admin_rotate(State(st): St, RawQuery(q): RawQuery) -> Response {
    let params = parse_params(q.unwrap_or_default().as_bytes());
    let keep_old = params
        .iter()
        .any(|(k, v)| k == "keep_old" && (v == "true" || v == "1"));
    let st2 = st.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if keep_old {
            st2.rotate_keys_keep_old()
        } else {
            st2.rotate_keys()
        }
    })
    .await;
    json_response(
        StatusCode::OK,
        &json!({"ok": true, "kid": st.current_kid()}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_query_appends() {
        assert_eq!(
            add_query(
                "https://a.example/cb?x=1",
                &[("code", "a b"), ("iss", "http://i")]
            ),
            "https://a.example/cb?x=1&code=a+b&iss=http%3A%2F%2Fi"
        );
    }

    #[test]
    fn url_decode_plus_and_percent() {
        assert_eq!(url_decode("a%3Ab+c"), "a:b c");
    }

    #[test]
    fn s256_rfc7636_vector() {
        assert_eq!(
            s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }
}

#[cfg(test)]
mod attack_fault_tests {
    use super::*;
    use crate::MockIdpConfig;

    #[test]
    fn new_faults_parse_from_json() {
        assert_eq!(
            Fault::from_json(&json!({"fault": "id_token_sign_with_weak_rsa_key"})),
            Ok(Fault::IdTokenSignWithWeakRsaKey)
        );
        assert_eq!(
            Fault::from_json(&json!({"fault": "discovery_fields", "fields": {"jwks_uri": "x"}})),
            Ok(Fault::DiscoveryFields(json!({"jwks_uri": "x"})))
        );
        assert!(Fault::from_json(&json!({"fault": "discovery_fields"})).is_err());
        assert_eq!(
            Fault::from_json(&json!({"fault": "token_delay_after_grant", "delay_ms": 5})),
            Ok(Fault::TokenDelayAfterGrant(
                std::time::Duration::from_millis(5)
            ))
        );
    }

    #[test]
    fn weak_key_is_1024_bits_and_signs() {
        let k = keys::weak_rsa_key();
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(k.jwk["n"].as_str().unwrap())
            .unwrap();
        assert_eq!(n.len(), 128);
        let t = keys::encode_jwt(k, "JWT", &[], &json!({"a": 1}), SignMode::Normal, false);
        assert_eq!(t.split('.').count(), 3);
        assert!(t.contains(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
                serde_json::to_vec(&json!({"alg": "RS256", "kid": keys::WEAK_KID, "typ": "JWT"}))
                    .unwrap()
            )
        ));
    }

    #[test]
    fn raw_signing_keeps_bytes() {
        let st = IdpState::new(MockIdpConfig::default());
        let t = st.sign_jwt_raw(
            r#"{"alg":"RS256","alg":"none"}"#,
            r#"{"iss":"a","iss":"b"}"#,
        );
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(parts[1])
                .unwrap(),
            br#"{"iss":"a","iss":"b"}"#
        );
        assert!(st
            .public_key_pem()
            .starts_with("-----BEGIN PUBLIC KEY-----"));
        let h = crate::sign_hs256_raw(b"", r#"{"alg":"HS256"}"#, "{}");
        assert_eq!(h.split('.').nth(2).map(str::len), Some(43));
    }
}
