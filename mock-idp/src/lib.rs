//! mock-idp: a small, real OpenID Connect provider for oidc-gate development and tests.
//!
//! It implements the authorization code flow with PKCE (S256), client_secret_basic and
//! client_secret_post client authentication, refresh tokens with rotation, userinfo and
//! RP-initiated logout, plus fault injection ([`Fault`]) and request statistics ([`Stats`]) so
//! integration tests can exercise the filter's error paths.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let idp = mock_idp::MockIdp::start(mock_idp::MockIdpConfig::default()).await?;
//! println!("issuer: {}", idp.issuer());
//! idp.set_fault(mock_idp::Fault::TokenStatus(500));
//! # Ok(()) }
//! ```

mod html;
mod keys;
mod server;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

pub use server::app;

use keys::{SignMode, SigningKey};

/// Signing algorithm for ID tokens and JWT access tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SigningAlg {
    /// RSASSA-PKCS1-v1_5 with SHA-256, 2048-bit key.
    #[default]
    Rs256,
    /// ECDSA P-256 with SHA-256.
    Es256,
}

impl SigningAlg {
    /// JOSE name (`RS256`, `ES256`).
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlg::Rs256 => "RS256",
            SigningAlg::Es256 => "ES256",
        }
    }
}

impl std::str::FromStr for SigningAlg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "RS256" => Ok(SigningAlg::Rs256),
            "ES256" => Ok(SigningAlg::Es256),
            other => Err(format!(
                "unsupported signing algorithm `{other}` (RS256 or ES256)"
            )),
        }
    }
}

/// A registered OAuth client (confidential, secret based).
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub id: String,
    pub secret: String,
    /// Allowed redirect URIs (exact match). Empty = any absolute URI is allowed.
    pub redirect_uris: Vec<String>,
    /// Allowed post-logout redirect URIs (exact match). Empty = any is allowed.
    pub post_logout_redirect_uris: Vec<String>,
}

/// A user that can sign in on the login page.
#[derive(Clone, Debug)]
pub struct UserConfig {
    pub username: String,
    pub password: String,
    pub email: String,
    pub name: String,
    pub groups: Vec<String>,
}

impl UserConfig {
    /// The stable `sub` of this user: a UUID-shaped string derived from the username.
    pub fn subject(&self) -> String {
        subject_for(&self.username)
    }
}

/// The `sid` claim of an IdP login session: derived from the session cookie, which it must not
/// reveal.
pub fn public_sid(session_cookie: &str) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(format!("mock-idp-sid:{session_cookie}").as_bytes());
    d[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The stable `sub` for a username (UUID-shaped, derived from SHA-256 of the username).
pub fn subject_for(username: &str) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(format!("mock-idp-user:{username}").as_bytes());
    let h: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A compact JWS over exactly these header and payload JSON texts, HMAC-SHA256 keyed with `key`
/// (algorithm confusion: the public key as PEM, DER or modulus; a client secret; an empty key).
pub fn sign_hs256_raw(key: &[u8], header_json: &str, payload_json: &str) -> String {
    keys::hs256_raw(key, header_json.as_bytes(), payload_json.as_bytes())
}

/// Configuration of a mock-idp instance.
#[derive(Clone, Debug)]
pub struct MockIdpConfig {
    /// Issuer URL; default `http://<bound addr>`. A path component is honoured (endpoints are
    /// served below it).
    pub issuer: Option<String>,
    /// Address to bind (port 0 allowed).
    pub addr: SocketAddr,
    pub clients: Vec<ClientConfig>,
    pub users: Vec<UserConfig>,
    pub access_token_ttl: Duration,
    pub id_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    /// Lifetime of authorization codes (default 60 s).
    pub code_ttl: Duration,
    /// Issue random opaque access tokens instead of JWTs.
    pub opaque_access_tokens: bool,
    /// Refresh tokens are single use: a refresh grant returns a new one (default true).
    pub rotate_refresh_tokens: bool,
    /// `aud` of JWT access tokens (never the client id).
    pub access_token_audience: String,
    pub signing_alg: SigningAlg,
}

impl Default for MockIdpConfig {
    fn default() -> Self {
        MockIdpConfig {
            issuer: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            clients: vec![ClientConfig {
                id: "oidc-gate".into(),
                secret: "oidc-gate-secret".into(),
                redirect_uris: Vec::new(),
                post_logout_redirect_uris: Vec::new(),
            }],
            users: vec![UserConfig {
                username: "admin".into(),
                password: "password".into(),
                email: "admin@example.com".into(),
                name: "Admin".into(),
                groups: vec!["admins".into(), "users".into()],
            }],
            access_token_ttl: Duration::from_secs(300),
            id_token_ttl: Duration::from_secs(300),
            refresh_token_ttl: Duration::from_secs(3600),
            code_ttl: Duration::from_secs(60),
            opaque_access_tokens: false,
            rotate_refresh_tokens: true,
            access_token_audience: "api://oidc-gate-demo".into(),
            signing_alg: SigningAlg::Rs256,
        }
    }
}

/// Injected misbehaviour. A fault stays active until replaced (use [`Fault::None`] to go back to
/// normal). Use [`Fault::All`] to combine several.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub enum Fault {
    /// Normal behaviour.
    #[default]
    None,
    /// Several faults at once.
    All(Vec<Fault>),
    /// Token endpoint answers this status with an OAuth-looking JSON error body.
    TokenStatus(u16),
    /// Token endpoint answers 200 with this raw body and content type.
    TokenBody { content_type: String, body: String },
    /// Token endpoint waits this long, then answers normally.
    TokenDelay(Duration),
    /// Token endpoint never answers (until the server shuts down).
    TokenHang,
    /// Token endpoint answers `302 Found` to `{issuer}/`.
    TokenRedirect,
    /// Token endpoint answers normally, plus a header whose value is not UTF-8 (Latin-1 bytes,
    /// which HTTP allows as obs-text).
    TokenHeaderNotUtf8,
    /// Discovery answers this status.
    DiscoveryStatus(u16),
    /// Discovery document's `issuer` is this value.
    DiscoveryIssuer(String),
    /// JWKS answers this status.
    JwksStatus(u16),
    /// JWKS answers 200 with this raw body (`application/json`).
    JwksBody(String),
    /// Merge these claims into ID tokens (JSON null removes a claim).
    IdTokenClaims(Value),
    /// Merge these fields into the ID token JOSE header (null removes). `"alg": "none"` produces
    /// an unsigned token with an empty signature; any other alg is still signed with the current
    /// key.
    IdTokenHeader(Value),
    /// ID token with `alg: HS256`, HMAC keyed with the current public key's PEM (key confusion).
    IdTokenSignWithHs256PublicKey,
    /// ID token signature has a flipped byte.
    IdTokenCorruptSignature,
    /// Merge these fields into successful token responses (null removes, e.g. `id_token`).
    TokenResponseFields(Value),
    /// The JWKS also publishes a deliberately weak 1024-bit RSA key (kid `weak-rsa-1024`) and ID
    /// tokens are signed with it (relying parties must ignore such keys).
    IdTokenSignWithWeakRsaKey,
    /// Merge these fields into the discovery document (null removes), e.g. a `jwks_uri` at a
    /// random path (served by `{issuer}/jwks/<name>`), endpoints on other hosts, or
    /// `authorization_response_iss_parameter_supported: false`.
    DiscoveryFields(Value),
    /// Token endpoint processes the request at once (code checks, signing) but holds the answer
    /// back this long: a slow IdP whose CPU work does not bunch up after the delay when many
    /// requests arrive together.
    TokenDelayAfterGrant(Duration),
}

impl Fault {
    /// Parse the admin API JSON form: `{"fault": "<snake_case name>", ...parameters}`.
    ///
    /// Parameters: `status` (token_status, discovery_status, jwks_status), `content_type` and
    /// `body` (token_body; jwks_body uses `body`), `delay_ms` (token_delay,
    /// token_delay_after_grant), `issuer`
    /// (discovery_issuer), `claims` (id_token_claims), `header` (id_token_header), `fields`
    /// (token_response_fields, discovery_fields), `faults` (all: array of fault objects).
    pub fn from_json(v: &Value) -> Result<Fault, String> {
        let name = v
            .get("fault")
            .and_then(Value::as_str)
            .ok_or("missing string field `fault`")?;
        let status = || -> Result<u16, String> {
            v.get("status")
                .and_then(Value::as_u64)
                .and_then(|s| u16::try_from(s).ok())
                .ok_or_else(|| format!("fault `{name}` needs numeric `status`"))
        };
        let string = |field: &str| -> Result<String, String> {
            v.get(field)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("fault `{name}` needs string `{field}`"))
        };
        let object = |field: &str| -> Result<Value, String> {
            match v.get(field) {
                Some(o @ Value::Object(_)) => Ok(o.clone()),
                _ => Err(format!("fault `{name}` needs object `{field}`")),
            }
        };
        Ok(match name {
            "none" => Fault::None,
            "all" => {
                let list = v
                    .get("faults")
                    .and_then(Value::as_array)
                    .ok_or("fault `all` needs array `faults`")?;
                Fault::All(
                    list.iter()
                        .map(Fault::from_json)
                        .collect::<Result<_, _>>()?,
                )
            }
            "token_status" => Fault::TokenStatus(status()?),
            "token_body" => Fault::TokenBody {
                content_type: string("content_type")
                    .unwrap_or_else(|_| "text/html; charset=utf-8".into()),
                body: string("body")?,
            },
            "token_delay" => Fault::TokenDelay(Duration::from_millis(
                v.get("delay_ms")
                    .and_then(Value::as_u64)
                    .ok_or("fault `token_delay` needs numeric `delay_ms`")?,
            )),
            "token_hang" => Fault::TokenHang,
            "token_redirect" => Fault::TokenRedirect,
            "token_header_not_utf8" => Fault::TokenHeaderNotUtf8,
            "discovery_status" => Fault::DiscoveryStatus(status()?),
            "discovery_issuer" => Fault::DiscoveryIssuer(string("issuer")?),
            "jwks_status" => Fault::JwksStatus(status()?),
            "jwks_body" => Fault::JwksBody(string("body")?),
            "id_token_claims" => Fault::IdTokenClaims(object("claims")?),
            "id_token_header" => Fault::IdTokenHeader(object("header")?),
            "id_token_sign_with_hs256_public_key" => Fault::IdTokenSignWithHs256PublicKey,
            "id_token_corrupt_signature" => Fault::IdTokenCorruptSignature,
            "token_response_fields" => Fault::TokenResponseFields(object("fields")?),
            "id_token_sign_with_weak_rsa_key" => Fault::IdTokenSignWithWeakRsaKey,
            "discovery_fields" => Fault::DiscoveryFields(object("fields")?),
            "token_delay_after_grant" => Fault::TokenDelayAfterGrant(Duration::from_millis(
                v.get("delay_ms")
                    .and_then(Value::as_u64)
                    .ok_or("fault `token_delay_after_grant` needs numeric `delay_ms`")?,
            )),
            other => return Err(format!("unknown fault `{other}`")),
        })
    }

    /// The active faults, with [`Fault::All`] flattened and [`Fault::None`] dropped.
    fn flatten(&self) -> Vec<Fault> {
        match self {
            Fault::None => Vec::new(),
            Fault::All(list) => list.iter().flat_map(Fault::flatten).collect(),
            other => vec![other.clone()],
        }
    }
}

/// Request counters and the last token request, for assertions.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Stats {
    pub discovery: u64,
    pub jwks: u64,
    pub authorize_get: u64,
    pub authorize_post: u64,
    /// Every request to the token endpoint (including fault answers).
    pub token: u64,
    /// Successful token responses.
    pub token_ok: u64,
    /// OAuth error responses of the token endpoint (not counting injected faults).
    pub token_errors: u64,
    /// Token requests with `grant_type=refresh_token`.
    pub refresh: u64,
    pub userinfo: u64,
    pub end_session: u64,
    /// Refresh tokens revoked at end_session (the login named by a known `id_token_hint`).
    pub refresh_revoked_at_logout: u64,
    /// Form fields of the last token request (as sent, including any client_secret).
    pub last_token_form: BTreeMap<String, String>,
    /// `client_secret_basic`, `client_secret_post`, `none` or `both` (both is rejected).
    pub last_token_auth_method: Option<String>,
    /// `error` code of the last failed token request.
    pub last_token_error: Option<String>,
    /// Path (below the issuer) of the last JWKS request: `/keys` or `/jwks/<name>`.
    pub last_jwks_path: Option<String>,
}

struct CodeGrant {
    client_id: String,
    redirect_uri: String,
    code_challenge: String,
    nonce: Option<String>,
    username: String,
    scope: String,
    auth_time: u64,
    expires: Instant,
    used: bool,
    /// Tokens issued from this code share this family id (revoked together on code reuse).
    family: String,
    /// The IdP session's public id (`sid` claim).
    sid: String,
}

struct RefreshGrant {
    client_id: String,
    username: String,
    scope: String,
    auth_time: u64,
    expires: Instant,
    family: String,
    sid: String,
}

struct AccessGrant {
    sub: String,
    username: Option<String>,
    expires: Instant,
    family: Option<String>,
}

struct Inner {
    /// Published keys; the last one signs.
    keys: Vec<Arc<SigningKey>>,
    codes: HashMap<String, CodeGrant>,
    refresh: HashMap<String, RefreshGrant>,
    access: HashMap<String, AccessGrant>,
    /// Login session id -> (username, auth_time).
    sessions: HashMap<String, (String, u64)>,
    /// SHA-256 of each ID token issued -> its token family: an `id_token_hint` at end_session
    /// names the login whose refresh tokens are revoked (as Keycloak does).
    id_tokens: HashMap<[u8; 32], String>,
    fault: Fault,
    stats: Stats,
}

/// Shared state of a mock-idp (what [`app`] serves).
pub struct IdpState {
    cfg: MockIdpConfig,
    issuer: String,
    inner: Mutex<Inner>,
    shutdown: tokio::sync::watch::Sender<bool>,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl IdpState {
    /// Build the state; the issuer defaults to `http://{cfg.addr}`. Generates the signing key.
    pub fn new(cfg: MockIdpConfig) -> Arc<IdpState> {
        let issuer = cfg
            .issuer
            .clone()
            .unwrap_or_else(|| format!("http://{}", cfg.addr));
        let issuer = issuer.trim_end_matches('/').to_string();
        let key = Arc::new(SigningKey::generate(cfg.signing_alg, true));
        let (shutdown, _) = tokio::sync::watch::channel(false);
        Arc::new(IdpState {
            cfg,
            issuer,
            inner: Mutex::new(Inner {
                keys: vec![key],
                codes: HashMap::new(),
                refresh: HashMap::new(),
                access: HashMap::new(),
                sessions: HashMap::new(),
                id_tokens: HashMap::new(),
                fault: Fault::None,
                stats: Stats::default(),
            }),
            shutdown,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn issuer(&self) -> String {
        self.issuer.clone()
    }

    pub fn config(&self) -> &MockIdpConfig {
        &self.cfg
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    pub fn reset_stats(&self) {
        self.lock().stats = Stats::default();
    }

    pub fn set_fault(&self, f: Fault) {
        self.lock().fault = f;
    }

    pub fn fault(&self) -> Fault {
        self.lock().fault.clone()
    }

    fn faults(&self) -> Vec<Fault> {
        self.lock().fault.flatten()
    }

    /// New signing key with a new kid; the JWKS serves only the new key afterwards.
    pub fn rotate_keys(&self) {
        self.rotate(false);
    }

    /// New signing key with a new kid; the JWKS serves the old keys and the new one.
    pub fn rotate_keys_keep_old(&self) {
        self.rotate(true);
    }

    fn rotate(&self, keep_old: bool) {
        let key = Arc::new(SigningKey::generate(self.cfg.signing_alg, false));
        let mut inner = self.lock();
        if !keep_old {
            inner.keys.clear();
        }
        inner.keys.push(key);
    }

    /// The kid of the current signing key.
    pub fn current_kid(&self) -> String {
        self.current_key().kid.clone()
    }

    fn current_key(&self) -> Arc<SigningKey> {
        self.lock().keys.last().cloned().expect("a signing key")
    }

    /// The JWKS document currently served.
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self.lock().keys.iter().map(|k| k.jwk.clone()).collect();
        serde_json::json!({ "keys": keys })
    }

    /// Sign arbitrary claims with the current key. `header` fields are merged over
    /// `{"alg", "kid", "typ": "JWT"}` (null removes); `"alg": "none"` yields an unsigned token.
    pub fn sign_jwt(&self, header: Value, claims: Value) -> String {
        let key = self.current_key();
        keys::encode_jwt(&key, "JWT", &[&header], &claims, SignMode::Normal, false)
    }

    /// Sign exactly these header and payload JSON texts with the current key (the header is used
    /// as given, so set `alg`/`kid` yourself): tokens a serializer cannot produce, such as
    /// duplicate members.
    pub fn sign_jwt_raw(&self, header_json: &str, payload_json: &str) -> String {
        let key = self.current_key();
        keys::sign_raw(&key, header_json.as_bytes(), payload_json.as_bytes())
    }

    /// The current signing key's public key as PEM (SubjectPublicKeyInfo), e.g. for algorithm
    /// confusion tokens.
    pub fn public_key_pem(&self) -> String {
        self.current_key().public_pem.clone()
    }

    /// Mint a JWT access token (as the token endpoint would) for `sub` and `audience`. The token
    /// is also accepted by the userinfo endpoint.
    pub fn mint_access_token(&self, sub: &str, audience: &str, ttl: Duration) -> String {
        let client_id = self
            .cfg
            .clients
            .first()
            .map(|c| c.id.clone())
            .unwrap_or_default();
        let token = self.jwt_access_token(sub, audience, &client_id, "openid", ttl);
        let username = self
            .cfg
            .users
            .iter()
            .find(|u| u.subject() == sub)
            .map(|u| u.username.clone());
        self.lock().access.insert(
            token.clone(),
            AccessGrant {
                sub: sub.to_string(),
                username,
                expires: Instant::now() + ttl,
                family: None,
            },
        );
        token
    }

    fn jwt_access_token(
        &self,
        sub: &str,
        audience: &str,
        client_id: &str,
        scope: &str,
        ttl: Duration,
    ) -> String {
        let now = unix_now();
        let claims = serde_json::json!({
            "iss": self.issuer,
            "sub": sub,
            "aud": audience,
            "client_id": client_id,
            "scope": scope,
            "iat": now,
            "exp": now + ttl.as_secs(),
            "jti": keys::random_token(16),
        });
        let key = self.current_key();
        keys::encode_jwt(&key, "at+jwt", &[], &claims, SignMode::Normal, false)
    }
}

/// A running mock-idp. Dropping it (or [`MockIdp::shutdown`]) stops the server.
pub struct MockIdp {
    state: Arc<IdpState>,
    addr: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl MockIdp {
    /// Bind `cfg.addr` and serve in a background task.
    pub async fn start(cfg: MockIdpConfig) -> std::io::Result<MockIdp> {
        let listener = tokio::net::TcpListener::bind(cfg.addr).await?;
        let addr = listener.local_addr()?;
        let mut cfg = cfg;
        cfg.addr = addr;
        let state = tokio::task::spawn_blocking(move || IdpState::new(cfg))
            .await
            .map_err(std::io::Error::other)?;
        let mut stop = state.shutdown.subscribe();
        let router = app(state.clone());
        let task = tokio::spawn(async move {
            let serve = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|v| *v).await;
            });
            if let Err(e) = serve.await {
                eprintln!("mock-idp: server error: {e}");
            }
        });
        Ok(MockIdp {
            state,
            addr,
            task: Some(task),
        })
    }

    /// Stop accepting connections and wait (up to 5 s) for in-flight requests.
    pub async fn shutdown(mut self) {
        let _ = self.state.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    pub fn issuer(&self) -> String {
        self.state.issuer()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared state (same methods as the ones below, plus config/jwks access).
    pub fn state(&self) -> Arc<IdpState> {
        self.state.clone()
    }

    pub fn stats(&self) -> Stats {
        self.state.stats()
    }

    pub fn reset_stats(&self) {
        self.state.reset_stats()
    }

    pub fn set_fault(&self, f: Fault) {
        self.state.set_fault(f)
    }

    pub fn rotate_keys(&self) {
        self.state.rotate_keys()
    }

    pub fn rotate_keys_keep_old(&self) {
        self.state.rotate_keys_keep_old()
    }

    pub fn current_kid(&self) -> String {
        self.state.current_kid()
    }

    pub fn jwks(&self) -> Value {
        self.state.jwks()
    }

    pub fn sign_jwt(&self, header: Value, claims: Value) -> String {
        self.state.sign_jwt(header, claims)
    }

    pub fn sign_jwt_raw(&self, header_json: &str, payload_json: &str) -> String {
        self.state.sign_jwt_raw(header_json, payload_json)
    }

    pub fn public_key_pem(&self) -> String {
        self.state.public_key_pem()
    }

    pub fn mint_access_token(&self, sub: &str, audience: &str, ttl: Duration) -> String {
        self.state.mint_access_token(sub, audience, ttl)
    }
}

impl Drop for MockIdp {
    fn drop(&mut self) {
        // Graceful: stop accepting, release hanging token requests; the task ends on its own.
        let _ = self.state.shutdown.send(true);
    }
}
