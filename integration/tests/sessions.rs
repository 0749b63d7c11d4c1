//! Sessions over time and machine clients (issue 3), against a real Envoy: refresh of expired
//! access tokens (alone, concurrent, failing), API vs browser answers, CORS preflights, bearer
//! JWTs, identity header hygiene, chunked session cookies, cookie key rotation and the metrics.
//!
//! The mock IdP issues access tokens that live [`TTL`] seconds and the filter refreshes
//! [`SKEW`] second(s) early, so every refresh test waits at most a few seconds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use integration::config::istio_plugin_json;
use integration::stack::{
    jwt_payload, Stack, StackOptions, APP_HOST, CLIENT_ID, CLIENT_SECRET, LOGIN_COOKIE_PREFIX,
    OTHER_HOST, SESSION_COOKIE,
};
use integration::{random_bytes, Browser, GatewayConfig, Mode, Resp, SeenRequest, TEST_HOSTS};
use mock_idp::{subject_for, Fault, MockIdpConfig};
use reqwest::Method;
use serde_json::{json, Value};
use url::Url;

/// Access-token lifetime at the mock IdP (seconds).
const TTL: u64 = 3;
/// `refresh_skew` given to the filter (seconds).
const SKEW: u64 = 1;
/// The audience machine clients' tokens are minted for.
const ORDERS_AUD: &str = "api://orders";
/// How Envoy names the filter's metrics in admin `/stats` (wasm metrics live in Envoy's
/// `wasmcustom` stat namespace).
const STAT_PREFIX: &str = "wasmcustom.oidc_gate_";

// ---------------------------------------------------------------------------------------------
// helpers

/// Options for a stack whose access tokens expire after [`TTL`] s, refreshed [`SKEW`] s early.
fn short_ttl() -> StackOptions {
    StackOptions {
        idp: MockIdpConfig {
            access_token_ttl: Duration::from_secs(TTL),
            ..MockIdpConfig::default()
        },
        ..StackOptions::default()
    }
    .with_config(json!({ "refresh_skew": SKEW }))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Sleep until the wall clock reaches `t` (unix seconds); bounded.
async fn wait_until(t: f64) {
    let d = t - unix_now();
    assert!(d < 30.0, "refusing to wait {d:.1} s");
    if d > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(d)).await;
    }
}

/// Log in `b` (landing on `/`); returns the whole second after the login finished. The session's
/// access token expires at the latest at `returned + TTL` (the filter counts in whole seconds).
async fn login(stack: &Stack, b: &Browser) -> f64 {
    let flow = stack.login(b, &stack.url("/")).await;
    assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());
    unix_now().floor()
}

/// Wait until a session logged in at `t_login` must be refreshed (`expires_at - refresh_skew`).
async fn wait_refresh_due(t_login: f64) {
    wait_until(t_login + (TTL - SKEW) as f64 + 0.05).await;
}

/// The bearer token of a request the upstream saw (exactly one `Authorization`).
fn bearer_of(seen: &SeenRequest) -> String {
    let auth = seen.header_all("authorization");
    assert_eq!(
        auth.len(),
        1,
        "exactly one Authorization upstream: {auth:?}"
    );
    auth[0]
        .strip_prefix("Bearer ")
        .unwrap_or_else(|| panic!("not a Bearer token: {}", auth[0]))
        .to_string()
}

/// The request the upstream saw for this exact path and query.
fn seen_at(stack: &Stack, path: &str) -> SeenRequest {
    let all: Vec<SeenRequest> = stack
        .upstream
        .requests()
        .into_iter()
        .filter(|r| r.path == path)
        .collect();
    assert_eq!(all.len(), 1, "upstream saw {path} once");
    all.into_iter().next().expect("one")
}

fn session_value(b: &Browser) -> String {
    b.jar()
        .get(APP_HOST, SESSION_COOKIE)
        .unwrap_or_else(|| panic!("no session cookie in the jar"))
        .value
}

/// Copy the session cookie and its chunks from one jar to another.
fn copy_session(from: &Browser, to: &Browser) {
    let cookies: Vec<(String, String)> = from
        .jar()
        .for_host(APP_HOST)
        .into_iter()
        .filter(|c| c.name.starts_with(SESSION_COOKIE) && !c.name.starts_with(LOGIN_COOKIE_PREFIX))
        .map(|c| (c.name, c.value))
        .collect();
    assert!(!cookies.is_empty(), "no session to copy");
    for (n, v) in cookies {
        to.set_cookie_raw(APP_HOST, &n, &v);
    }
}

/// Whether the response deletes cookie `name` (`Max-Age<=0` or an `Expires` in the past).
fn deletes(r: &Resp, name: &str) -> bool {
    r.set_cookie(name).is_some_and(|c| {
        c.max_age().is_some_and(|m| m.is_zero() || m.is_negative())
            || matches!(c.expires_datetime(), Some(t) if t < cookie::time::OffsetDateTime::now_utc())
    })
}

fn is_login_redirect(stack: &Stack, r: &Resp) -> bool {
    r.status == 302
        && r.location()
            .is_some_and(|l| l.as_str().starts_with(&stack.authorize_endpoint()))
}

/// The filter's 401 for clients that cannot follow a login redirect.
fn assert_unauthenticated(r: &Resp, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.describe());
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some("Bearer"),
        "{what}: {}",
        r.describe()
    );
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{what}: JSON body: {}",
        r.describe()
    );
    assert_eq!(r.json()["error"], "unauthenticated", "{what}: {}", r.body);
    assert!(r.header("location").is_none(), "{what}: never a redirect");
    assert!(
        r.set_cookies_with_prefix(LOGIN_COOKIE_PREFIX).is_empty(),
        "{what}: no login started: {:?}",
        r.set_cookies()
    );
}

/// GET `url` with `browsers[i % n]` for every url at once; answers in url order.
async fn parallel_gets(browsers: &[Arc<Browser>], urls: Vec<String>) -> Vec<Resp> {
    let mut set = tokio::task::JoinSet::new();
    for (i, url) in urls.into_iter().enumerate() {
        let b = browsers[i % browsers.len()].clone();
        set.spawn(async move { (i, b.get(&url).await) });
    }
    let mut out: Vec<Option<Resp>> = Vec::new();
    while let Some(r) = set.join_next().await {
        let (i, resp) = r.expect("request task");
        if out.len() <= i {
            out.resize(i + 1, None);
        }
        out[i] = Some(resp);
    }
    out.into_iter().map(|r| r.expect("answer")).collect()
}

/// A JWT signed by the mock IdP's current key with the given claims.
fn signed(stack: &Stack, header: Value, claims: Value) -> String {
    stack.idp.sign_jwt(header, claims)
}

fn now_secs() -> u64 {
    unix_now() as u64
}

/// Replay an authorization code at the IdP: like a real IdP, mock-idp then revokes every token
/// issued from it (including the session's refresh token).
async fn replay_code(stack: &Stack, code: &str) -> (u16, Value) {
    integration::browser::install_crypto_provider();
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let r = client
        .post(format!("{}/token", stack.idp.issuer()))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", "https://app.example.com/oauth2/callback"),
        ])
        .send()
        .await
        .expect("token endpoint");
    let status = r.status().as_u16();
    let body: Value = serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default();
    (status, body)
}

/// The filter's counters as Envoy reports them (`/stats`), by full name.
async fn filter_stats(stack: &Stack) -> BTreeMap<String, u64> {
    stack.envoy.stats("oidc_gate_").await
}

/// One of the filter's counters by its short name (`logins_started`), 0 when not defined yet.
async fn counter(stack: &Stack, short: &str) -> u64 {
    stack.envoy.stat(&format!("{STAT_PREFIX}{short}")).await
}

// ---------------------------------------------------------------------------------------------
// 1. refresh

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_access_token_is_refreshed_without_a_redirect() {
    let stack = Stack::start(short_ttl()).await;
    let b = stack.browser();
    let t_login = login(&stack, &b).await;

    let r = b.get(&stack.url("/headers?before")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let first = bearer_of(&seen_at(&stack, "/headers?before"));
    let first_claims = jwt_payload(&first);
    let first_exp = first_claims["exp"].as_u64().expect("exp");
    let cookie_before = session_value(&b);
    let before = stack.idp.stats();
    assert_eq!(before.refresh, 0, "no refresh while the token is fresh");

    // Really expired: past the token's own `exp` and the session's expiry.
    wait_until((first_exp as f64).max(t_login + TTL as f64) + 0.05).await;

    let r = b.get(&stack.url("/headers?after")).await;
    assert_eq!(r.status, 200, "no login redirect: {}", r.describe());
    let second = bearer_of(&seen_at(&stack, "/headers?after"));
    assert_ne!(second, first, "a new access token went upstream");
    let second_claims = jwt_payload(&second);
    assert_eq!(second_claims["sub"], first_claims["sub"]);
    assert!(
        second_claims["exp"].as_u64() > Some(first_exp),
        "the new token lives longer: {second_claims}"
    );
    assert!(
        (second_claims["exp"].as_u64().unwrap_or(0) as f64) > unix_now(),
        "the new token is not expired: {second_claims}"
    );

    let set = r
        .set_cookie(SESSION_COOKIE)
        .unwrap_or_else(|| panic!("refreshed session cookie: {:?}", r.set_cookies()));
    assert_ne!(set.value(), cookie_before);
    assert!(
        set.max_age().is_some_and(|m| m.whole_seconds() > 0),
        "{set}"
    );
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(session_value(&b), set.value(), "the browser kept it");

    let st = stack.idp.stats();
    assert_eq!(st.refresh, 1, "{st:?}");
    assert_eq!(st.token, before.token + 1, "{st:?}");
    assert_eq!(st.token_ok, before.token_ok + 1, "{st:?}");
    assert_eq!(
        st.last_token_form.get("grant_type").map(String::as_str),
        Some("refresh_token")
    );
    assert_eq!(
        st.authorize_get, before.authorize_get,
        "no login at the IdP"
    );

    // The refreshed session serves the next request without another refresh.
    let r = b.get(&stack.url("/headers?again")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(bearer_of(&seen_at(&stack, "/headers?again")), second);
    assert!(
        r.set_cookie(SESSION_COOKIE).is_none(),
        "{:?}",
        r.set_cookies()
    );
    assert_eq!(stack.idp.stats().refresh, 1);
}

// ---------------------------------------------------------------------------------------------
// 2. concurrent refresh

/// 20 requests of one session, multiplexed on one HTTP/2 connection to a single worker, while
/// the access token is due: one refresh at the IdP, all 20 forwarded with the same new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_requests_share_one_refresh_on_one_worker() {
    let stack = Stack::start(StackOptions {
        concurrency: 1,
        ..short_ttl()
    })
    .await;
    let b = Arc::new(stack.browser());
    let t_login = login(&stack, &b).await;
    let r = b.get(&stack.url("/headers?before")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let first = bearer_of(&seen_at(&stack, "/headers?before"));

    wait_refresh_due(t_login).await;
    stack.idp.reset_stats();
    // An IdP that takes a moment (as real ones do): every request arrives while the refresh is
    // in flight.
    stack
        .idp
        .set_fault(Fault::TokenDelay(Duration::from_millis(300)));
    let urls: Vec<String> = (0..20)
        .map(|i| stack.url(&format!("/headers?n={i}")))
        .collect();
    let resps = parallel_gets(std::slice::from_ref(&b), urls).await;
    stack.idp.set_fault(Fault::None);

    let mut tokens = Vec::new();
    for (i, r) in resps.iter().enumerate() {
        assert_eq!(r.status, 200, "request {i}: {}", r.describe());
        assert_eq!(r.version, "HTTP/2.0", "multiplexed");
        assert!(
            r.set_cookie(SESSION_COOKIE).is_some(),
            "request {i} carries the refreshed cookie: {:?}",
            r.set_cookies()
        );
        tokens.push(bearer_of(&seen_at(&stack, &format!("/headers?n={i}"))));
    }
    let new = tokens[0].clone();
    assert_ne!(new, first, "a new token went upstream");
    assert!(
        tokens.iter().all(|t| *t == new),
        "all 20 carry the same new token"
    );
    let st = stack.idp.stats();
    assert_eq!(st.refresh, 1, "exactly one refresh at the IdP: {st:?}");
}

/// A request that still carries the pre-refresh cookie after the refresh finished (another tab,
/// a request sent before the new cookie arrived) reuses the refresh result instead of presenting
/// the rotated refresh token again; the worker keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_cookie_after_a_refresh_reuses_the_result() {
    let stack = Stack::start(StackOptions {
        concurrency: 1,
        ..short_ttl()
    })
    .await;
    let b = stack.browser();
    let t_login = login(&stack, &b).await;
    let old_cookie = session_value(&b);
    wait_refresh_due(t_login).await;
    let r = b.get(&stack.url("/headers?refreshed")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(
        r.set_cookie(SESSION_COOKIE).is_some(),
        "{:?}",
        r.set_cookies()
    );
    let new = bearer_of(&seen_at(&stack, "/headers?refreshed"));
    assert_eq!(stack.idp.stats().refresh, 1);

    let late = stack.browser();
    late.set_cookie_raw(APP_HOST, SESSION_COOKIE, &old_cookie);
    let r = late.get(&stack.url("/headers?late")).await;
    assert_eq!(
        r.status,
        200,
        "old cookie within the reuse window: {}",
        r.describe()
    );
    assert_eq!(bearer_of(&seen_at(&stack, "/headers?late")), new);
    assert!(
        r.set_cookie(SESSION_COOKIE).is_some(),
        "{:?}",
        r.set_cookies()
    );
    assert_eq!(stack.idp.stats().refresh, 1, "no second refresh");

    // The worker still serves everyone.
    let r = b.get(&stack.url("/headers?after")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let r = stack.browser().get(&stack.url("/healthz")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(
        !stack.envoy.log().contains("panicked"),
        "{}",
        stack.envoy.log_tail(20)
    );
}

/// The same over 20 connections spread over 2 workers (one VM each): at most one refresh per
/// worker, and no request loses the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_requests_over_two_workers_keep_the_session() {
    let stack = Stack::start(short_ttl()).await; // --concurrency 2
    let b = stack.browser();
    let t_login = login(&stack, &b).await;
    let tabs: Vec<Arc<Browser>> = (0..20)
        .map(|_| Arc::new(b.with_mode(stack.gateway_addr(), TEST_HOSTS, Mode::Navigation)))
        .collect();
    // Open the 20 connections now (skip path), so that the 20 requests after expiry go out at
    // the same moment.
    let warm = parallel_gets(
        &tabs,
        (0..20)
            .map(|i| stack.url(&format!("/healthz?w={i}")))
            .collect(),
    )
    .await;
    assert!(warm.iter().all(|r| r.status == 200));
    let per_worker = stack
        .envoy
        .stats(r"^listener\.127\.0\.0\.1_[0-9]+\.worker_[0-9]+\.downstream_cx_total$")
        .await;
    eprintln!("connections per worker: {per_worker:?}");
    assert!(
        per_worker.values().filter(|n| **n >= 2).count() >= 2,
        "connections spread over both workers: {per_worker:?}"
    );

    wait_refresh_due(t_login).await;
    stack.idp.reset_stats();
    stack
        .idp
        .set_fault(Fault::TokenDelay(Duration::from_millis(300)));
    let resps = parallel_gets(
        &tabs,
        (0..20)
            .map(|i| stack.url(&format!("/headers?n={i}")))
            .collect(),
    )
    .await;
    stack.idp.set_fault(Fault::None);
    let st = stack.idp.stats();
    eprintln!("IdP after the burst: {st:?}");
    let lost: Vec<String> = resps
        .iter()
        .enumerate()
        .filter(|(_, r)| r.status != 200)
        .map(|(i, r)| format!("#{i}: {}", r.describe()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of 20 requests lost the session ({} refreshes at the IdP, last error {:?}):\n{}",
        lost.len(),
        st.refresh,
        st.last_token_error,
        lost.join("\n")
    );
    for i in 0..20 {
        seen_at(&stack, &format!("/headers?n={i}"));
    }
    // The cross-worker lock: one refresh for the session, not one per worker (a second one
    // presenting the same token would be hidden by the shared answer when that lands first).
    assert_eq!(st.refresh, 1, "one refresh across both workers: {st:?}");
}

// ---------------------------------------------------------------------------------------------
// 3. failed refresh

/// A refresh the IdP refuses ends the session; the same request may still pass on a valid bearer
/// token, and then the ended session cookie must not go upstream with it (the engine re-decides
/// without it, but the client's Cookie header is what forwarding replaces).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ended_by_a_refused_refresh_is_not_forwarded_with_a_bearer_token() {
    let stack = Stack::start(
        short_ttl().with_config(json!({"bearer_tokens": {"audiences": [ORDERS_AUD]}})),
    )
    .await;
    let b = stack.browser();
    let t_login = login(&stack, &b).await;
    let api = stack.api_client();
    copy_session(&b, &api);
    api.set_cookie_raw(APP_HOST, "theme", "dark");
    let token =
        stack
            .idp
            .mint_access_token(&subject_for("admin"), ORDERS_AUD, Duration::from_secs(120));
    wait_refresh_due(t_login).await;
    stack.idp.reset_stats();
    stack.idp.set_fault(Fault::TokenStatus(400));

    let path = "/orders?ended-session-with-bearer";
    let r = api
        .get_with(
            &stack.url(path),
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(
        stack.idp.stats().refresh,
        1,
        "the refresh was tried and refused"
    );
    assert!(deletes(&r, SESSION_COOKIE), "{:?}", r.set_cookies());
    let seen = seen_at(&stack, path);
    assert_eq!(
        seen.header_all("authorization"),
        vec![format!("Bearer {token}")],
        "the client's token upstream"
    );
    let cookies = seen.header_all("cookie");
    assert!(
        cookies.iter().all(|c| !c.contains(SESSION_COOKIE)),
        "the ended session cookie reached the upstream: {cookies:?}"
    );
    assert!(
        cookies.iter().any(|c| c.contains("theme=dark")),
        "the client's own cookie is kept: {cookies:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_refresh_ends_the_session() {
    let stack = Stack::start(short_ttl()).await;
    // Session A: its refresh token gets revoked at the IdP (code replay). Session B: the IdP's
    // token endpoint answers 400 when B refreshes.
    let a = stack.browser();
    let flow = stack.login(&a, &stack.url("/")).await;
    assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());
    let code = flow.idp_redirect.location_param("code").expect("code");
    let b = stack.browser();
    let t_login = login(&stack, &b).await;
    let a_api = stack.api_client();
    copy_session(&a, &a_api);
    let b_api = stack.api_client();
    copy_session(&b, &b_api);

    let (status, body) = replay_code(&stack, &code).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_grant", "{body}");

    wait_refresh_due(t_login).await;
    let upstream_before = stack.upstream.count();
    stack.idp.reset_stats();

    // A revoked refresh token (invalid_grant): navigation -> login, cookie cleared.
    let r = a.get(&stack.url("/private")).await;
    assert!(is_login_redirect(&stack, &r), "{}", r.describe());
    assert!(
        deletes(&r, SESSION_COOKIE),
        "session cookie cleared: {:?}",
        r.set_cookies()
    );
    assert!(a.jar().get(APP_HOST, SESSION_COOKIE).is_none());
    let st = stack.idp.stats();
    assert_eq!(st.refresh, 1, "{st:?}");
    assert_eq!(st.last_token_error.as_deref(), Some("invalid_grant"));
    // ... API client with the same session -> 401 (and the cookie cleared as well).
    let r = a_api.get(&stack.url("/private")).await;
    assert_unauthenticated(&r, "revoked refresh token, API client");
    assert!(deletes(&r, SESSION_COOKIE), "{:?}", r.set_cookies());

    // The token endpoint refuses (400): same outcome.
    stack.idp.set_fault(Fault::TokenStatus(400));
    let r = b_api.get(&stack.url("/private")).await;
    assert_unauthenticated(&r, "refresh answered 400, API client");
    assert!(deletes(&r, SESSION_COOKIE), "{:?}", r.set_cookies());
    let r = b.get(&stack.url("/private")).await;
    assert!(is_login_redirect(&stack, &r), "{}", r.describe());
    assert!(deletes(&r, SESSION_COOKIE), "{:?}", r.set_cookies());
    assert!(b.jar().get(APP_HOST, SESSION_COOKIE).is_none());

    // Each session's refresh token was sent once: the IdP's refusal is shared with every worker
    // (and remembered by the one that got it), so the session's other request, on whichever
    // worker, applies it without asking again.
    assert_eq!(
        stack.idp.stats().refresh,
        2,
        "one attempt per session, not per request"
    );
    assert_eq!(
        stack.upstream.count(),
        upstream_before,
        "the upstream saw nothing"
    );
    // Every ended refresh counts, whether the IdP or the worker's memory of it refused.
    assert_eq!(counter(&stack, "refreshes_failed_refused").await, 4);
}

/// A logout this gateway never saw (at the IdP itself, or through another gateway replica), and
/// no back-channel logout: the IdP revokes the login's refresh tokens. A copy of the session
/// cookie still passes until its refresh is due, then is refused on every request: the
/// per-worker cache of verified sessions does not keep it alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_copied_before_an_idp_logout_ends_at_its_next_refresh() {
    // Longer than short_ttl(): a request, the logout and another request must all fit before
    // the refresh is due, on a slow machine too.
    const LONGER_TTL: u64 = 6;
    let stack = Stack::start(
        StackOptions {
            idp: MockIdpConfig {
                access_token_ttl: Duration::from_secs(LONGER_TTL),
                ..MockIdpConfig::default()
            },
            ..StackOptions::default()
        }
        .with_config(json!({ "refresh_skew": SKEW })),
    )
    .await;
    let b = stack.browser();
    let t_login = login(&stack, &b).await;
    let copy = stack.api_client();
    copy_session(&b, &copy);
    let saved: Vec<(String, String)> = copy
        .jar()
        .for_host(APP_HOST)
        .into_iter()
        .map(|c| (c.name, c.value))
        .collect();
    let r = copy.get(&stack.url("/private?copy-before-logout")).await;
    assert_eq!(r.status, 200, "{}", r.describe());

    // The user signs out at the IdP (its session cookie ends the IdP session and its logins).
    let idp = b.get(&stack.logout_endpoint()).await;
    assert!(idp.status < 400, "{}", idp.describe());
    let st = stack.idp.stats();
    assert_eq!(st.end_session, 1, "{st:?}");
    assert!(st.refresh_revoked_at_logout >= 1, "{st:?}");

    // The documented window (SECURITY.md, I86b): valid until the refresh is due.
    let r = copy.get(&stack.url("/private?copy-after-logout")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(
        unix_now() < t_login + (LONGER_TTL - SKEW) as f64,
        "the requests before the refresh took too long to test the window"
    );

    wait_until(t_login + (LONGER_TTL - SKEW) as f64 + 0.05).await;
    let upstream_before = stack.upstream.count();
    stack.idp.reset_stats();
    for i in 0..8 {
        // The thief keeps sending the copy, whatever the gateway answered last time.
        for (name, value) in &saved {
            copy.set_cookie_raw(APP_HOST, name, value);
        }
        let r = copy.get(&stack.url(&format!("/private?copy-{i}"))).await;
        assert_unauthenticated(&r, "session cookie copied before logout");
        assert!(deletes(&r, SESSION_COOKIE), "{:?}", r.set_cookies());
    }
    let st = stack.idp.stats();
    // Once refused, a worker does not ask again for that refresh token.
    let workers = u64::from(StackOptions::default().concurrency);
    assert!(
        (1..=workers).contains(&st.refresh),
        "at most one refresh per worker: {st:?}"
    );
    assert_eq!(st.token_ok, 0, "{st:?}");
    assert_eq!(
        st.last_token_error.as_deref(),
        Some("invalid_grant"),
        "{st:?}"
    );
    assert_eq!(
        stack.upstream.count(),
        upstream_before,
        "the upstream saw nothing"
    );
}

/// One session on one worker, refresh due, and an IdP that answers the refresh slowly with 400:
/// 10 requests at once (even: navigations, odd: API calls), all waiting for one leader.
/// Returns the answers and `logins_started` before the burst.
async fn failed_refresh_burst(stack: &Stack) -> (Vec<Resp>, u64) {
    let b = Arc::new(stack.browser());
    let t_login = login(stack, &b).await;
    let api = Arc::new(stack.api_client());
    copy_session(&b, &api);
    wait_refresh_due(t_login).await;
    let started_before = counter(stack, "logins_started").await;
    stack.idp.reset_stats();
    stack.idp.set_fault(Fault::All(vec![
        Fault::TokenDelay(Duration::from_millis(300)),
        Fault::TokenStatus(400),
    ]));
    let resps = parallel_gets(
        &[b, api],
        (0..10)
            .map(|i| stack.url(&format!("/private?n={i}")))
            .collect(),
    )
    .await;
    (resps, started_before)
}

fn one_worker_short_ttl() -> StackOptions {
    StackOptions {
        concurrency: 1,
        ..short_ttl()
    }
}

/// By default a refresh the IdP does not answer (its token endpoint answers 503) ends the session
/// as a refusal does: the browser goes to login with the session cookie cleared, an API call
/// gets 401, and nothing reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idp_that_is_down_ends_a_session_due_for_refresh_by_default() {
    let stack = Stack::start(one_worker_short_ttl()).await;
    let b = stack.browser();
    let t_login = login(&stack, &b).await;
    let api = stack.api_client();
    copy_session(&b, &api);
    wait_refresh_due(t_login).await;
    stack.idp.set_fault(Fault::TokenStatus(503));
    let upstream = stack.upstream.count();
    let r = b.get(&stack.url("/during-outage")).await;
    assert!(is_login_redirect(&stack, &r), "{}", r.describe());
    assert!(
        r.set_cookie(SESSION_COOKIE)
            .is_some_and(|c| c.value().is_empty()),
        "the session cookie is cleared: {:?}",
        r.set_cookies()
    );
    let r = api.get(&stack.url("/api-during-outage")).await;
    assert_eq!(r.status, 401, "{}", r.describe());
    assert_eq!(stack.upstream.count(), upstream, "nothing upstream");
    assert_eq!(counter(&stack, "refreshes_failed_idp_unavailable").await, 2);
}

/// With `refresh_unavailable: keep_session`, an IdP that is down (its token endpoint answers
/// 503) refused nothing: while the access token is valid the request goes upstream with it and
/// the session cookie stays; the worker does not ask the IdP again on the next request (it
/// waits `REFRESH_RETRY_SECS`); once the token has expired, requests get a retryable 503 and the
/// session stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idp_that_is_down_does_not_end_a_kept_session_whose_token_is_valid() {
    let stack = Stack::start(
        one_worker_short_ttl().with_config(json!({"refresh_unavailable": "keep_session"})),
    )
    .await;
    let b = stack.browser();
    let t_login = login(&stack, &b).await;
    let r = b.get(&stack.url("/before-outage")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let token = bearer_of(&seen_at(&stack, "/before-outage"));
    wait_refresh_due(t_login).await;
    stack.idp.reset_stats();
    stack.idp.set_fault(Fault::TokenStatus(503));
    for path in ["/during-outage-1", "/during-outage-2"] {
        let r = b.get(&stack.url(path)).await;
        assert_eq!(r.status, 200, "{path}: {}", r.describe());
        assert!(
            r.set_cookie(SESSION_COOKIE).is_none(),
            "{path}: the session cookie is neither replaced nor cleared: {:?}",
            r.set_cookies()
        );
        assert_eq!(bearer_of(&seen_at(&stack, path)), token, "{path}");
    }
    assert_eq!(
        stack.idp.stats().refresh,
        1,
        "one refresh tried, not one per request"
    );
    assert_eq!(counter(&stack, "refreshes_failed_idp_unavailable").await, 1);
    assert!(b.jar().get(APP_HOST, SESSION_COOKIE).is_some());

    // Once the access token has expired the request cannot go on: a retryable 503, nothing
    // upstream, the session kept for when the IdP is back (and the IdP not asked again yet).
    wait_until(t_login + TTL as f64 + 0.1).await;
    let upstream = stack.upstream.count();
    let r = b.get(&stack.url("/after-expiry")).await;
    assert_eq!(r.status, 503, "{}", r.describe());
    assert!(
        r.set_cookie(SESSION_COOKIE).is_none(),
        "{:?}",
        r.set_cookies()
    );
    assert_eq!(stack.upstream.count(), upstream, "nothing upstream");
    assert_eq!(stack.idp.stats().refresh, 1, "not asked again within 30 s");
    assert!(b.jar().get(APP_HOST, SESSION_COOKIE).is_some());
}

/// The request that sets off a refresh leaves (a closed tab, an aborted fetch) before the IdP
/// answers, and the IdP has rotated the refresh token by then. The refresh belongs to the
/// filter's root context, not to that request: the request waiting for it gets the new token,
/// and so does a later request with the cookie the leaving request never got to replace, without
/// asking the IdP again (which would present the rotated-out token and end the session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_whose_request_left_still_reaches_the_session() {
    let stack = Stack::start(one_worker_short_ttl()).await;
    let b = Arc::new(stack.browser());
    let t_login = login(&stack, &b).await;
    let r = b.get(&stack.url("/before")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let old_token = bearer_of(&seen_at(&stack, "/before"));
    let late = stack.browser();
    copy_session(&b, &late);
    wait_refresh_due(t_login).await;
    stack.idp.reset_stats();
    // The IdP rotates the refresh token at once and answers 1.5 s later.
    stack
        .idp
        .set_fault(Fault::TokenDelayAfterGrant(Duration::from_millis(1500)));
    let get = |path: &str| {
        let (b, url) = (b.clone(), stack.url(path));
        tokio::spawn(async move { b.get(&url).await })
    };
    let leader = get("/leader");
    let asked = Instant::now();
    while stack.idp.stats().refresh == 0 {
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "the refresh never reached the IdP"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let follower = get("/follower");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !follower.is_finished(),
        "the second request waits for the first one's refresh"
    );
    leader.abort();
    let r = tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .expect("the waiting request is answered when the IdP answers")
        .expect("request task");
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(
        r.set_cookie(SESSION_COOKIE).is_some(),
        "the refreshed session is set: {:?}",
        r.set_cookies()
    );
    let new_token = bearer_of(&seen_at(&stack, "/follower"));
    assert_ne!(
        new_token, old_token,
        "the waiting request went on with the new token"
    );
    stack.idp.set_fault(Fault::None);

    let r = late.get(&stack.url("/late")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(bearer_of(&seen_at(&stack, "/late")), new_token);
    assert!(
        r.set_cookie(SESSION_COOKIE).is_some(),
        "{:?}",
        r.set_cookies()
    );
    assert_eq!(stack.idp.stats().refresh, 1, "one refresh asked");
    assert!(
        stack
            .upstream
            .requests()
            .iter()
            .all(|r| r.path != "/leader"),
        "the request that left went nowhere"
    );
    assert_eq!(
        counter(&stack, "refreshes_sent_by_tick").await,
        0,
        "the root is woken through its own queue, not by its tick"
    );
    assert!(
        !stack.envoy.log().contains("refresh queue"),
        "{}",
        stack.envoy.log_tail(20)
    );
}

/// Requests of one session waiting for a refresh that fails: each gets its own answer (login
/// for navigations, 401 for API calls), the cookie cleared, nothing upstream, nobody hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_refresh_answers_every_waiting_request() {
    let stack = Stack::start(one_worker_short_ttl()).await;
    let (resps, _) = failed_refresh_burst(&stack).await;
    for (i, r) in resps.iter().enumerate() {
        if i % 2 == 0 {
            assert!(
                is_login_redirect(&stack, r),
                "navigation #{i}: {}",
                r.describe()
            );
        } else {
            assert_unauthenticated(r, &format!("API #{i}"));
        }
        assert!(
            deletes(r, SESSION_COOKIE),
            "#{i}: cookie cleared: {:?}",
            r.set_cookies()
        );
    }
    let st = stack.idp.stats();
    assert_eq!(
        st.refresh, 1,
        "the waiting requests shared one refresh: {st:?}"
    );
    assert_eq!(
        stack.upstream.count(),
        1,
        "nothing upstream after the login"
    );
    assert_eq!(counter(&stack, "refreshes_failed_refused").await, 1);
}

/// Every login redirect sent after a failed refresh counts in `logins_started`, also those
/// answered to requests that waited for the failed refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_redirects_after_a_failed_refresh_are_counted() {
    let stack = Stack::start(one_worker_short_ttl()).await;
    let (resps, started_before) = failed_refresh_burst(&stack).await;
    let redirects = resps
        .iter()
        .filter(|r| is_login_redirect(&stack, r))
        .count() as u64;
    assert_eq!(redirects, 5, "five navigations");
    assert_eq!(
        counter(&stack, "logins_started").await - started_before,
        redirects,
        "every login redirect is counted"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. API clients vs browsers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_clients_get_401_and_browsers_get_the_login() {
    let stack =
        Stack::start(StackOptions::default().with_config(json!({"api_paths": ["/api"]}))).await;
    let b = stack.browser();
    let api = stack.api_client();

    // fetch() from a page of the app: Sec-Fetch-Mode: cors.
    let fetch_headers = [
        ("sec-fetch-mode", "cors"),
        ("sec-fetch-dest", "empty"),
        ("sec-fetch-site", "same-origin"),
        ("origin", "https://app.example.com"),
        ("referer", "https://app.example.com/page"),
    ];
    let r = api.get_with(&stack.url("/data"), &fetch_headers).await;
    assert_unauthenticated(&r, "fetch");
    // An API client (Accept: application/json, no Sec-Fetch-*).
    let r = api.get(&stack.url("/data")).await;
    assert_unauthenticated(&r, "API client");
    assert!(r.json()["request_id"].is_string(), "{}", r.body);
    // A browser navigation.
    let r = b.get(&stack.url("/data")).await;
    assert!(
        is_login_redirect(&stack, &r),
        "navigation: {}",
        r.describe()
    );

    // api_paths: 401 even for navigations (segment-aware prefix).
    for path in ["/api", "/api/orders", "/api/orders?x=1"] {
        let r = b.get(&stack.url(path)).await;
        assert_unauthenticated(&r, &format!("navigation to {path}"));
    }
    let r = b.get(&stack.url("/apix")).await;
    assert!(
        is_login_redirect(&stack, &r),
        "/apix is no api path: {}",
        r.describe()
    );

    // POST: a form submission (navigation) comes back as a GET of the same URL, which the login
    // starts from (a cross-site POST would not carry the pending logins to cap); a JSON POST
    // gets 401.
    let r = b.post_form(&stack.url("/submit?x=1"), &[("a", "1")]).await;
    assert_eq!(r.status, 303, "form POST: {}", r.describe());
    assert_eq!(
        r.location().map(|l| (
            l.host_str().map(str::to_owned),
            l.path().to_owned(),
            l.query().map(str::to_owned)
        )),
        Some((
            Some("app.example.com".to_owned()),
            "/submit".to_owned(),
            Some("x=1".to_owned())
        )),
        "{}",
        r.describe()
    );
    assert!(r.set_cookies().is_empty(), "{}", r.describe());
    let r = b.follow_one(&r).await;
    assert!(
        is_login_redirect(&stack, &r),
        "form POST, then GET: {}",
        r.describe()
    );
    let r = api
        .send(
            Method::POST,
            Url::parse(&stack.url("/submit")).expect("url"),
            &[("content-type", "application/json")],
            None,
            None,
            false,
        )
        .await;
    assert_unauthenticated(&r, "JSON POST");

    assert_eq!(stack.upstream.count(), 0, "nothing reached the upstream");
}

// ---------------------------------------------------------------------------------------------
// 5. CORS preflight

async fn preflight(api: &Browser, url: &str, extra: &[(&str, &str)]) -> Resp {
    api.send(
        Method::OPTIONS,
        Url::parse(url).expect("url"),
        extra,
        None,
        None,
        false,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_passes_only_when_enabled() {
    let (stack, strict) = tokio::join!(
        Stack::start(StackOptions::default().with_config(json!({"pass_cors_preflight": true}))),
        Stack::start(StackOptions::default())
    );
    let full = [
        ("origin", "https://spa.example.com"),
        ("access-control-request-method", "PUT"),
        (
            "access-control-request-headers",
            "authorization,content-type",
        ),
    ];

    let api = stack.api_client();
    let r = preflight(&api, &stack.url("/orders/1"), &full).await;
    assert_eq!(r.status, 200, "preflight passes: {}", r.describe());
    let seen = seen_at(&stack, "/orders/1");
    assert_eq!(seen.method, "OPTIONS");
    assert_eq!(seen.header("origin"), Some("https://spa.example.com"));
    assert!(seen.header("authorization").is_none());
    assert!(r.set_cookies().is_empty(), "{:?}", r.set_cookies());

    // Not preflights: OPTIONS without Origin or without Access-Control-Request-Method, and a GET
    // with both headers.
    let r = preflight(&api, &stack.url("/orders/2"), &full[1..]).await;
    assert_unauthenticated(&r, "OPTIONS without Origin");
    let r = preflight(&api, &stack.url("/orders/3"), &full[..1]).await;
    assert_unauthenticated(&r, "OPTIONS without Access-Control-Request-Method");
    let r = api.get_with(&stack.url("/orders/4"), &full).await;
    assert_unauthenticated(&r, "GET with preflight headers");
    let r = api
        .send(
            Method::OPTIONS,
            Url::parse(&stack.url("/orders/5")).expect("url"),
            &full,
            Some(vec![("delete".into(), "everything".into())]),
            None,
            false,
        )
        .await;
    assert_unauthenticated(&r, "OPTIONS with preflight headers and a body");
    assert_eq!(stack.upstream.count(), 1);

    // By default the preflight needs a session like anything else.
    let api = strict.api_client();
    let r = preflight(&api, &strict.url("/orders/1"), &full).await;
    assert_unauthenticated(&r, "preflight without pass_cors_preflight");
    assert_eq!(strict.upstream.count(), 0);
}

// ---------------------------------------------------------------------------------------------
// 6. bearer JWTs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_jwts_for_machine_clients() {
    let stack = Stack::start(
        StackOptions::default().with_config(json!({"bearer_tokens": {"audiences": [ORDERS_AUD]}})),
    )
    .await;
    let api = stack.api_client();
    let nav = stack.browser();
    let sub = subject_for("admin");
    let good = stack
        .idp
        .mint_access_token(&sub, ORDERS_AUD, Duration::from_secs(120));

    let r = api
        .get_with(
            &stack.url("/orders?good"),
            &[("authorization", &format!("Bearer {good}"))],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(
        seen_at(&stack, "/orders?good").header_all("authorization"),
        vec![format!("Bearer {good}")],
        "exactly the client's token upstream"
    );
    assert!(r.set_cookies().is_empty(), "no session for machine clients");
    // A browser-looking request with a valid token is accepted as well.
    let r = nav
        .get_with(
            &stack.url("/orders?good-nav"),
            &[("authorization", &format!("Bearer {good}"))],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let st = stack.idp.stats();
    assert_eq!(st.token, 0, "no token endpoint call: {st:?}");
    assert_eq!(st.jwks, 1, "{st:?}");

    let now = now_secs();
    let claims = |over: Value| {
        let mut c = json!({
            "iss": stack.idp.issuer(), "sub": sub, "aud": ORDERS_AUD, "client_id": "machine",
            "iat": now, "exp": now + 120, "jti": "j1",
        });
        integration::config::merge(&mut c, &over);
        c
    };
    let at = json!({"typ": "at+jwt"});
    // A character inside the signature: the last one may only carry padding bits.
    let at_char = good.rfind('.').expect("a JWS") + 10;
    let mut tampered_sig = good.clone();
    let flipped = if good.as_bytes()[at_char] == b'A' {
        "B"
    } else {
        "A"
    };
    tampered_sig.replace_range(at_char..=at_char, flipped);
    let bad: Vec<(&str, String)> = vec![
        (
            "expired",
            format!(
                "Bearer {}",
                signed(
                    &stack,
                    at.clone(),
                    claims(json!({"iat": now - 900, "exp": now - 600}))
                )
            ),
        ),
        (
            "wrong audience",
            format!(
                "Bearer {}",
                stack
                    .idp
                    .mint_access_token(&sub, "api://other", Duration::from_secs(120))
            ),
        ),
        (
            "the gateway's own audience",
            format!(
                "Bearer {}",
                stack.idp.mint_access_token(
                    &sub,
                    &stack.idp.state().config().access_token_audience,
                    Duration::from_secs(120)
                )
            ),
        ),
        (
            "wrong issuer",
            format!(
                "Bearer {}",
                signed(
                    &stack,
                    at.clone(),
                    claims(json!({"iss": "https://evil.example.com"}))
                )
            ),
        ),
        (
            "alg none",
            format!(
                "Bearer {}",
                signed(&stack, json!({"alg": "none"}), claims(json!({})))
            ),
        ),
        ("bad signature", format!("Bearer {tampered_sig}")),
        ("garbage", "Bearer garbage".to_string()),
        ("three garbage parts", "Bearer a.b.c".to_string()),
        ("basic", "Basic YWRtaW46cGFzc3dvcmQ=".to_string()),
    ];
    // The control: a well-formed token from `claims` is accepted.
    let control = signed(&stack, at.clone(), claims(json!({})));
    let r = api
        .get_with(
            &stack.url("/orders?control"),
            &[("authorization", &format!("Bearer {control}"))],
        )
        .await;
    assert_eq!(r.status, 200, "control token: {}", r.describe());

    let before = stack.upstream.count();
    for (what, value) in bad {
        for (client, b) in [("API client", &api), ("navigation", &nav)] {
            let r = b
                .get_with(&stack.url("/orders"), &[("authorization", &value)])
                .await;
            if what == "basic" && client == "navigation" {
                // Not a token at all: a browser sending another scheme gets the login.
                assert!(is_login_redirect(&stack, &r), "{what}: {}", r.describe());
                continue;
            }
            assert_unauthenticated(&r, &format!("{what} ({client})"));
        }
    }
    // Two Authorization headers, even two good ones.
    let g = format!("Bearer {good}");
    for pair in [[g.as_str(), g.as_str()], [g.as_str(), "Bearer garbage"]] {
        let r = api
            .get_with(
                &stack.url("/orders"),
                &[("authorization", pair[0]), ("authorization", pair[1])],
            )
            .await;
        assert_unauthenticated(
            &r,
            &format!("two Authorization headers {:?}", &pair[1][..10]),
        );
    }
    assert_eq!(stack.upstream.count(), before, "upstream not reached");
    assert_eq!(counter(&stack, "bearer_accepted").await, 3);
}

// ---------------------------------------------------------------------------------------------
// 7. spoofed identity headers

/// Identity headers a client tries to smuggle in (every spelling, each one twice).
const SPOOFED: [(&str, &str); 16] = [
    ("X-Auth-Request-User", "spoof-user-1"),
    ("x-auth-request-user", "spoof-user-2"),
    ("X_Auth_Request_User", "spoof-user-3"),
    ("x-auth-request-email", "spoof@evil.example"),
    ("X-Auth-Request-Groups", "spoof-admins"),
    ("x-auth-request-access-token", "spoof-token"),
    ("x-auth-request-preferred-username", "spoof-root"),
    ("X-AUTH-REQUEST-ANYTHING", "spoof-any"),
    ("x-forwarded-access-token", "spoof-token-2"),
    ("X_Forwarded_Access_Token", "spoof-token-3"),
    ("X-Forwarded-User", "spoof-user-4"),
    ("x-forwarded-email", "spoof2@evil.example"),
    ("X-Forwarded-Groups", "spoof-admins-2"),
    ("x-forwarded-preferred-username", "spoof-root-2"),
    ("x-user-name", "spoof-root-3"),
    ("X_User_Name", "spoof-root-4"),
];

fn spoofed_twice() -> Vec<(&'static str, &'static str)> {
    SPOOFED.iter().chain(SPOOFED.iter()).copied().collect()
}

/// Every identity header name the upstream could see (lowercase, as it arrives).
const IDENTITY_NAMES: [&str; 14] = [
    "x-auth-request-user",
    "x_auth_request_user",
    "x-auth-request-email",
    "x-auth-request-groups",
    "x-auth-request-access-token",
    "x-auth-request-preferred-username",
    "x-auth-request-anything",
    "x-forwarded-access-token",
    "x_forwarded_access_token",
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-user-name",
];

/// Asserts that the upstream saw exactly `expected` identity headers (name -> single value)
/// and nothing else from the identity set, and no spoofed value anywhere.
fn assert_identity(seen: &SeenRequest, expected: &[(&str, &str)], what: &str) {
    for (k, v) in &seen.headers {
        assert!(
            !v.contains("spoof"),
            "{what}: a spoofed value reached the upstream: {k}: {v}"
        );
    }
    assert!(
        seen.header_all("x_user_name").is_empty(),
        "{what}: {:?}",
        seen.headers
    );
    for name in IDENTITY_NAMES {
        let got = seen.header_all(name);
        match expected.iter().find(|(n, _)| *n == name) {
            Some((_, v)) => assert_eq!(got, vec![*v], "{what}: {name}"),
            None => assert!(got.is_empty(), "{what}: {name} must be absent: {got:?}"),
        }
    }
}

// Found in review: request trailers were not inspected, so an HTTP/2 client could send identity
// headers, Authorization or cookies after the body, and an HTTP/2 upstream (gRPC, an `http2`
// Service port) got them as the client wrote them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_trailers_never_reach_an_http2_upstream() {
    let mut opts = StackOptions::default().with_config(json!({
        "claims_to_headers": {"x-user-name": "preferred_username"},
    }));
    opts.tweak = Some(Arc::new(|g: &mut GatewayConfig| g.upstream_http2 = true));
    let stack = Stack::start(opts).await;
    let forged_session = format!("{SESSION_COOKIE}=forged");
    let mut trailers: Vec<(&str, &str)> = vec![
        ("authorization", "Bearer spoof-token"),
        ("cookie", &forged_session),
        ("x-checksum", "kept"),
    ];
    trailers.extend(SPOOFED.iter().map(|(k, v)| (*k, *v)));
    let trailers: Vec<(String, String)> = trailers
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    let trailers: Vec<(&str, &str)> = trailers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();

    // Control: on a host the filter does not protect, Envoy passes every trailer on.
    let b = stack.browser();
    let r = b
        .post_with_trailers(&stack.url_for(OTHER_HOST, "/control"), b"x", &trailers)
        .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let seen = seen_at(&stack, "/control");
    assert_eq!(seen.trailers.len(), trailers.len(), "{:?}", seen.trailers);

    // A protected host: on a skip path and with a session, only the harmless trailer arrives.
    let flow = stack.login(&b, &stack.url("/")).await;
    assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());
    let anon = stack.browser();
    for (label, client, path) in [
        ("skip path", &anon, "/public/trailers"),
        ("session", &b, "/trailers"),
    ] {
        let r = client
            .post_with_trailers(&stack.url(path), b"x", &trailers)
            .await;
        assert_eq!(r.status, 200, "{label}: {}", r.describe());
        let seen = seen_at(&stack, path);
        assert_eq!(
            seen.trailers,
            vec![("x-checksum".to_string(), "kept".to_string())],
            "{label}"
        );
        assert_eq!(seen.body, b"x", "{label}");
    }
}

// session_idle_timeout through Envoy: use after a tenth of the timeout comes back as a new
// session cookie (no-store), whose lifetime is the timeout; the copy from before keeps its own
// time (its end is shown in flow::tests, a minute is too long to wait for here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_is_written_into_the_cookie_for_the_idle_timeout() {
    let stack =
        Stack::start(StackOptions::default().with_config(json!({"session_idle_timeout": 60})))
            .await;
    let b = stack.browser();
    let t_login = login(&stack, &b).await;
    let first = session_value(&b);
    let r = b.get(&stack.url("/idle-1")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(
        r.set_cookie(SESSION_COOKIE).is_none(),
        "within 6 s: {:?}",
        r.set_cookies()
    );
    wait_until(t_login + 7.0).await;
    let r = b.get(&stack.url("/idle-2")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let resealed = r
        .set_cookie(SESSION_COOKIE)
        .unwrap_or_else(|| panic!("use recorded after 6 s: {}", r.describe()));
    let max_age = resealed.max_age().map(|d| d.whole_seconds());
    assert!(matches!(max_age, Some(59..=60)), "{max_age:?}");
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    assert_ne!(session_value(&b), first, "the browser holds the new cookie");
    let r = b.get(&stack.url("/idle-3")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(
        r.set_cookie(SESSION_COOKIE).is_none(),
        "{:?}",
        r.set_cookies()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_never_reach_the_upstream() {
    let stack = Stack::start(StackOptions::default().with_config(json!({
        "claims_to_headers": {
            "x-auth-request-email": "email",
            "x-auth-request-user": "sub",
            "x-auth-request-groups": "groups",
            "x-user-name": "preferred_username",
        },
        "pass_access_token_headers": true,
        "bearer_tokens": {"audiences": [ORDERS_AUD]},
    })))
    .await;
    let spoof = spoofed_twice();
    let sub = subject_for("admin");

    // Control: Envoy itself lets underscores and duplicates through (headers_with_underscores_action
    // defaults to ALLOW), as seen on a host the filter does not protect.
    let h1 = stack.browser_http1();
    let r = h1
        .get_with(&stack.url_for(OTHER_HOST, "/control"), &spoof)
        .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.version, "HTTP/1.1");
    let seen = seen_at(&stack, "/control");
    assert_eq!(
        seen.header_all("x_auth_request_user"),
        vec!["spoof-user-3", "spoof-user-3"],
        "Envoy forwards underscore headers (unprotected host): {:?}",
        seen.headers
    );

    // With a session, over HTTP/1.1 and HTTP/2.
    let flow = stack.login(&h1, &stack.url("/")).await;
    assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());
    let h2 = stack.browser();
    copy_session(&h1, &h2);
    for (label, b) in [("session h1", &h1), ("session h2", &h2)] {
        let path = format!("/headers?{}", label.replace(' ', "-"));
        let r = b.get_with(&stack.url(&path), &spoof).await;
        assert_eq!(r.status, 200, "{label}: {}", r.describe());
        let seen = seen_at(&stack, &path);
        let token = bearer_of(&seen);
        assert_identity(
            &seen,
            &[
                ("x-auth-request-user", sub.as_str()),
                ("x-auth-request-email", "admin@example.com"),
                ("x-auth-request-groups", "admins,users"),
                ("x-user-name", "admin"),
                ("x-auth-request-access-token", token.as_str()),
                ("x-forwarded-access-token", token.as_str()),
            ],
            label,
        );
    }

    // Skip path, with and without a session: no identity at all.
    let anon = stack.browser_http1();
    for (label, b) in [("skip path, anonymous", &anon), ("skip path, session", &h1)] {
        let path = format!("/public/{}", label.replace([' ', ','], "-"));
        let r = b.get_with(&stack.url(&path), &spoof).await;
        assert_eq!(r.status, 200, "{label}: {}", r.describe());
        assert_identity(&seen_at(&stack, &path), &[], label);
    }

    // Bearer JWT (no session): only what the token says.
    let token = stack
        .idp
        .mint_access_token(&sub, ORDERS_AUD, Duration::from_secs(120));
    let machine = Browser::with_options(stack.gateway_addr(), TEST_HOSTS, Mode::Api, true);
    let auth = format!("Bearer {token}");
    let mut headers = spoof.clone();
    headers.push(("authorization", &auth));
    let r = machine
        .get_with(&stack.url("/orders?bearer"), &headers)
        .await;
    assert_eq!(r.status, 200, "bearer: {}", r.describe());
    let seen = seen_at(&stack, "/orders?bearer");
    assert_eq!(bearer_of(&seen), token);
    // The filter may or may not pass the bearer token in the access-token headers; if it does,
    // it is the real token.
    let mut expected = vec![("x-auth-request-user", sub.as_str())];
    for h in ["x-auth-request-access-token", "x-forwarded-access-token"] {
        if !seen.header_all(h).is_empty() {
            expected.push((h, token.as_str()));
        }
    }
    assert_identity(&seen, &expected, "bearer");
}

// ---------------------------------------------------------------------------------------------
// 8. large sessions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_kilobyte_access_token_is_chunked_and_shrinks_back() {
    let stack = Stack::start(short_ttl()).await;
    let big: String = {
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut s = String::from("big.");
        s.extend(
            random_bytes(5996)
                .iter()
                .map(|b| alphabet[usize::from(*b) % alphabet.len()] as char),
        );
        s
    };
    assert_eq!(big.len(), 6000);
    stack
        .idp
        .set_fault(Fault::TokenResponseFields(json!({ "access_token": big })));
    let b = stack.browser();
    let flow = stack.login(&b, &stack.url("/")).await;
    let t_login = unix_now().floor();
    assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());
    stack.idp.set_fault(Fault::None);

    // The session is split into chunk cookies, each one small enough for every browser.
    let cb = &flow.callback;
    let first = cb
        .set_cookie(SESSION_COOKIE)
        .unwrap_or_else(|| panic!("session cookie: {:?}", cb.set_cookies()));
    let (count, _) = first
        .value()
        .split_once('.')
        .unwrap_or_else(|| panic!("chunked session starts with `<count>.`: {}", first.value()));
    let count: usize = count.parse().expect("chunk count");
    assert!(count >= 2, "{count} chunks");
    assert!(b.jar().rejected.is_empty(), "{:?}", b.jar().rejected);
    let jar_cookies: Vec<_> = b
        .jar()
        .for_host(APP_HOST)
        .into_iter()
        .filter(|c| c.name.starts_with(SESSION_COOKIE))
        .collect();
    let mut names: Vec<String> = jar_cookies.iter().map(|c| c.name.clone()).collect();
    names.sort();
    let mut want: Vec<String> = vec![SESSION_COOKIE.to_string()];
    want.extend((1..count).map(|i| format!("{SESSION_COOKIE}-{i}")));
    want.sort();
    assert_eq!(names, want);
    for c in &jar_cookies {
        assert!(
            c.name.len() + c.value.len() < 4096,
            "{}: {} bytes",
            c.name,
            c.name.len() + c.value.len()
        );
        assert!(
            c.raw.len() < 4096,
            "{}: Set-Cookie line {} bytes",
            c.name,
            c.raw.len()
        );
    }
    let total: usize = jar_cookies.iter().map(|c| c.value.len()).sum();
    assert!(total > 6000, "the token is in there: {total} bytes");

    // The upstream receives the whole token, and none of our cookies.
    b.set_cookie_raw(APP_HOST, "theme", "dark");
    let r = b.get(&stack.url("/headers?big")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let seen = seen_at(&stack, "/headers?big");
    assert_eq!(bearer_of(&seen), big, "the full 6 KB token upstream");
    assert_eq!(seen.header_all("cookie"), vec!["theme=dark"]);
    assert!(r.set_cookies().is_empty(), "{:?}", r.set_cookies());

    // Refresh to a normal-size token: one cookie again, the stale chunks deleted.
    wait_refresh_due(t_login).await;
    let r = b.get(&stack.url("/headers?small")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(stack.idp.stats().refresh, 1);
    let small = bearer_of(&seen_at(&stack, "/headers?small"));
    assert_ne!(small, big);
    assert!(jwt_payload(&small)["exp"].is_u64(), "a normal JWT again");
    let set = r
        .set_cookie(SESSION_COOKIE)
        .unwrap_or_else(|| panic!("new session cookie: {:?}", r.set_cookies()));
    assert!(
        !set.value().contains('.'),
        "not chunked any more: {}",
        set.value()
    );
    for i in 1..count {
        let name = format!("{SESSION_COOKIE}-{i}");
        assert!(
            deletes(&r, &name),
            "stale chunk {name} deleted: {:?}",
            r.set_cookies()
        );
    }
    assert_eq!(
        b.jar().names_with_prefix(APP_HOST, SESSION_COOKIE),
        vec![SESSION_COOKIE.to_string()]
    );
    let r = b.get(&stack.url("/headers?small-again")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let seen = seen_at(&stack, "/headers?small-again");
    assert_eq!(bearer_of(&seen), small);
    assert_eq!(seen.header_all("cookie"), vec!["theme=dark"]);
}

// ---------------------------------------------------------------------------------------------
// 9. cookie key rotation

fn new_secret() -> String {
    STANDARD.encode(random_bytes(32))
}

/// Push a new filter config over ECDS (a merge patch over the stack's original config plus a
/// probe skip path) and wait until the (single) worker runs it.
async fn push_config(stack: &Stack, patch: Value, probe: &str) {
    let mut c = stack.filter_config.clone().expect("generated config");
    integration::config::merge(&mut c, &patch);
    integration::config::merge(
        &mut c,
        &json!({ "skip_paths": ["/healthz", "/public/", probe] }),
    );
    stack.push_plugin_config(&istio_plugin_json(&c));
    let b = stack.api_client();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = b.get(&stack.url(probe)).await;
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "config with {probe} not applied: {}",
            r.describe()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_secret_rotation_keeps_sessions() {
    let k1 = new_secret();
    let k2 = new_secret();
    let mut opts = StackOptions {
        concurrency: 1,
        ..StackOptions::default()
    }
    .ecds();
    opts.env.insert("OIDC_COOKIE_SECRET".into(), k1.clone());
    opts.env.insert("OIDC_PREVIOUS_SECRET".into(), k1.clone());
    let stack = Stack::start(opts).await;
    let b = stack.browser();
    login(&stack, &b).await;
    let r = b.get(&stack.url("/headers?k1")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let token = bearer_of(&seen_at(&stack, "/headers?k1"));
    let c1 = session_value(&b);

    // K2 current, K1 accepted for decryption only.
    push_config(
        &stack,
        json!({"cookie_secret_env": null, "cookie_secret": k2, "previous_cookie_secrets": [k1]}),
        "/probe-v2",
    )
    .await;
    let r = b.get(&stack.url("/headers?rotated")).await;
    assert_eq!(r.status, 200, "K1 cookie still works: {}", r.describe());
    assert_eq!(bearer_of(&seen_at(&stack, "/headers?rotated")), token);
    let resealed = r
        .set_cookie(SESSION_COOKIE)
        .unwrap_or_else(|| panic!("resealed with K2: {:?}", r.set_cookies()));
    assert_ne!(resealed.value(), c1);
    let c2 = session_value(&b);
    assert_eq!(c2, resealed.value());
    let r = b.get(&stack.url("/headers?resealed")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(
        r.set_cookie(SESSION_COOKIE).is_none(),
        "sealed with the current key: no second reseal: {:?}",
        r.set_cookies()
    );

    // The same with the previous secret taken from the VM environment.
    push_config(
        &stack,
        json!({"cookie_secret_env": null, "cookie_secret": k2,
               "previous_cookie_secrets_env": ["OIDC_PREVIOUS_SECRET"]}),
        "/probe-v3",
    )
    .await;
    let other = stack.browser();
    other.set_cookie_raw(APP_HOST, SESSION_COOKIE, &c1);
    let r = other.get(&stack.url("/headers?env")).await;
    assert_eq!(r.status, 200, "K1 via env: {}", r.describe());
    assert!(r.set_cookie(SESSION_COOKIE).is_some(), "resealed");

    // K2 alone: the resealed cookie works, the K1 cookie does not.
    push_config(
        &stack,
        json!({"cookie_secret_env": null, "cookie_secret": k2}),
        "/probe-v4",
    )
    .await;
    let r = b.get(&stack.url("/headers?k2-only")).await;
    assert_eq!(
        r.status,
        200,
        "resealed cookie with K2 alone: {}",
        r.describe()
    );
    assert_eq!(bearer_of(&seen_at(&stack, "/headers?k2-only")), token);
    assert!(
        r.set_cookie(SESSION_COOKIE).is_none(),
        "{:?}",
        r.set_cookies()
    );
    let old = stack.browser();
    old.set_cookie_raw(APP_HOST, SESSION_COOKIE, &c1);
    let r = old.get(&stack.url("/headers?k1-only")).await;
    assert!(
        is_login_redirect(&stack, &r),
        "K1 cookie refused once K1 is gone: {}",
        r.describe()
    );
    assert!(deletes(&r, SESSION_COOKIE), "{:?}", r.set_cookies());
}

// ---------------------------------------------------------------------------------------------
// 10. metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_logins_refreshes_and_rejections() {
    let stack = Stack::start(
        short_ttl().with_config(json!({"bearer_tokens": {"audiences": [ORDERS_AUD]}})),
    )
    .await;
    assert!(
        filter_stats(&stack).await.values().all(|v| *v == 0),
        "nothing counted before the first request: {:?}",
        filter_stats(&stack).await
    );

    // A login.
    let b = stack.browser();
    let t_login = login(&stack, &b).await;
    assert_eq!(counter(&stack, "logins_started").await, 1);
    assert_eq!(counter(&stack, "logins_completed").await, 1);

    // A failed callback.
    let r = b.get(&stack.url("/oauth2/callback?code=x")).await;
    assert_eq!(r.status, 400, "{}", r.describe());
    assert_eq!(counter(&stack, "logins_failed_missing_state").await, 1);

    // Bearer accepted and rejected.
    let api = stack.api_client();
    let sub = subject_for("admin");
    let good = stack
        .idp
        .mint_access_token(&sub, ORDERS_AUD, Duration::from_secs(60));
    let r = api
        .get_with(
            &stack.url("/orders"),
            &[("authorization", &format!("Bearer {good}"))],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let wrong = stack
        .idp
        .mint_access_token(&sub, "api://other", Duration::from_secs(60));
    let r = api
        .get_with(
            &stack.url("/orders"),
            &[("authorization", &format!("Bearer {wrong}"))],
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.describe());
    assert_eq!(counter(&stack, "bearer_accepted").await, 1);
    assert_eq!(counter(&stack, "bearer_rejected_audience").await, 1);

    // A tampered session cookie.
    let value = session_value(&b);
    let mut chars: Vec<char> = value.chars().collect();
    let i = chars.len() / 2;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    let tampered = stack.api_client();
    tampered.set_cookie_raw(
        APP_HOST,
        SESSION_COOKIE,
        &chars.into_iter().collect::<String>(),
    );
    let r = tampered.get(&stack.url("/x")).await;
    assert_eq!(r.status, 401, "{}", r.describe());
    assert_eq!(counter(&stack, "sessions_rejected_invalid").await, 1);

    // A refresh.
    wait_refresh_due(t_login).await;
    let r = b.get(&stack.url("/headers")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(stack.idp.stats().refresh, 1);
    assert_eq!(counter(&stack, "refreshes_completed").await, 1);

    let all = filter_stats(&stack).await;
    eprintln!("filter counters in /stats: {all:#?}");
    let expected: BTreeMap<String, u64> = [
        ("logins_started", 1),
        ("logins_completed", 1),
        ("logins_failed_missing_state", 1),
        ("bearer_accepted", 1),
        ("bearer_rejected_audience", 1),
        ("sessions_rejected_invalid", 1),
        ("refreshes_completed", 1),
    ]
    .into_iter()
    .map(|(k, v)| (format!("{STAT_PREFIX}{k}"), v))
    .collect();
    let nonzero: BTreeMap<String, u64> = all.into_iter().filter(|(_, v)| *v > 0).collect();
    assert_eq!(nonzero, expected, "exactly these counters moved");

    assert_eq!(counter(&stack, "callout_errors").await, 0);

    // The callout latency histogram: Envoy shows histogram values after its next stats flush
    // (every 5 s), so poll.
    let deadline = Instant::now() + Duration::from_secs(12);
    let text = loop {
        let (_, text) = stack
            .envoy
            .admin_get("/stats?filter=oidc_gate_callout_latency")
            .await
            .expect("admin");
        if text.contains("P0(") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("/stats histogram: {text}");
    assert!(
        text.contains(&format!("{STAT_PREFIX}callout_latency_ms: P0(")),
        "histogram in /stats: {text}"
    );
    let (_, prom) = stack
        .envoy
        .admin_get("/stats/prometheus")
        .await
        .expect("admin");
    let ours: Vec<&str> = prom.lines().filter(|l| l.contains("oidc_gate_")).collect();
    eprintln!("/stats/prometheus:\n{}", ours.join("\n"));
    for (name, value) in [
        ("logins_started", 1),
        ("logins_completed", 1),
        ("logins_failed_missing_state", 1),
        ("bearer_accepted", 1),
        ("bearer_rejected_audience", 1),
        ("sessions_rejected_invalid", 1),
        ("refreshes_completed", 1),
    ] {
        let line = format!("oidc_gate_{name}{{}} {value}");
        assert!(
            ours.contains(&line.as_str()),
            "Prometheus line {line:?} in {ours:#?}"
        );
        let ty = format!("# TYPE oidc_gate_{name} counter");
        assert!(ours.contains(&ty.as_str()), "{ty:?} in {ours:#?}");
    }
    assert!(
        ours.contains(&"# TYPE oidc_gate_callout_latency_ms histogram"),
        "{ours:#?}"
    );
    let count_line = ours
        .iter()
        .find(|l| l.starts_with("oidc_gate_callout_latency_ms_count"))
        .unwrap_or_else(|| panic!("histogram count in Prometheus output: {ours:#?}"));
    let samples: u64 = count_line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // At least discovery, the login's token call, JWKS and the refresh.
    assert!(samples >= 4, "{count_line}");
}

/// Connections the gateway accepted per worker.
async fn per_worker_connections(stack: &Stack) -> BTreeMap<String, u64> {
    stack
        .envoy
        .stats(r"^listener\.127\.0\.0\.1_[0-9]+\.worker_[0-9]+\.downstream_cx_total$")
        .await
}

/// Sends `saved` session cookies from fresh clients (one connection each) until every worker
/// answered at least once; every answer must be a 401 that deletes the session cookie, and the
/// upstream must see none of them.
async fn refused_on_every_worker(stack: &Stack, saved: &[(String, String)], what: &str) {
    let upstream_before = stack.upstream.count();
    let before = per_worker_connections(stack).await;
    let workers = StackOptions::default().concurrency as usize;
    for i in 0..40 {
        let thief = stack.api_client();
        for (name, value) in saved {
            thief.set_cookie_raw(APP_HOST, name, value);
        }
        let r = thief.get(&stack.url(&format!("/private?{what}-{i}"))).await;
        assert_unauthenticated(&r, what);
        assert!(deletes(&r, SESSION_COOKIE), "{what}: {:?}", r.set_cookies());
        let after = per_worker_connections(stack).await;
        let served = after
            .iter()
            .filter(|(k, v)| **v > before.get(*k).copied().unwrap_or(0))
            .count();
        if i >= 3 && served >= workers {
            assert_eq!(
                stack.upstream.count(),
                upstream_before,
                "{what}: upstream saw nothing"
            );
            return;
        }
    }
    panic!("{what}: 40 connections did not reach all {workers} workers");
}

fn saved_session(b: &Browser) -> Vec<(String, String)> {
    b.jar()
        .for_host(APP_HOST)
        .into_iter()
        .filter(|c| c.name.starts_with(SESSION_COOKIE) && !c.name.starts_with(LOGIN_COOKIE_PREFIX))
        .map(|c| (c.name, c.value))
        .collect()
}

/// Logout through the gateway ends the login in every worker within a second: a copy of the
/// session cookie taken before logout is refused at once, long before any refresh, without
/// asking the IdP. Logging in again works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_copied_before_logout_is_refused_by_every_worker() {
    let stack = Stack::start(StackOptions::default()).await;
    let b = stack.browser();
    login(&stack, &b).await;
    let saved = saved_session(&b);
    let copy = stack.api_client();
    copy_session(&b, &copy);
    let r = copy.get(&stack.url("/private?copy-before-logout")).await;
    assert_eq!(r.status, 200, "{}", r.describe());

    let out = b.get(&stack.url("/oauth2/sign_out")).await;
    assert_eq!(out.status, 302, "{}", out.describe());
    assert!(deletes(&out, SESSION_COOKIE), "{:?}", out.set_cookies());
    // Other workers read the shared set once a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    stack.idp.reset_stats();
    refused_on_every_worker(&stack, &saved, "copy-after-logout").await;
    assert_eq!(
        stack.idp.stats().refresh,
        0,
        "no refresh was needed to refuse it"
    );
    assert!(
        counter(&stack, "sessions_rejected_ended").await >= 4,
        "refusals counted"
    );
    assert_eq!(counter(&stack, "logouts").await, 1);
    assert_eq!(counter(&stack, "ended_logins_dropped").await, 0);

    // The same user logs in again (a later login is not an ended one).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let again = stack.browser();
    login(&stack, &again).await;
    let r = again.get(&stack.url("/private?logged-in-again")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
}
