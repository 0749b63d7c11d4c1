//! The login flow through a real Envoy running the built filter (docs/CONTRACT.md).

use cookie::SameSite;
use integration::browser::Browser;
use integration::stack::{
    jwt_payload, Stack, APP_HOST, CLIENT_ID, LOGIN_COOKIE_PREFIX, SESSION_COOKIE,
};
use integration::Resp;

/// The bearer token the upstream saw on its last request.
fn upstream_bearer(stack: &Stack) -> String {
    let seen = stack.upstream.last().expect("upstream saw a request");
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

fn assert_host_cookie_attrs(c: &cookie::Cookie<'_>) {
    assert_eq!(c.secure(), Some(true), "Secure: {c}");
    assert_eq!(c.http_only(), Some(true), "HttpOnly: {c}");
    assert_eq!(c.same_site(), Some(SameSite::Lax), "SameSite=Lax: {c}");
    assert_eq!(c.path(), Some("/"), "Path=/: {c}");
    assert_eq!(c.domain(), None, "no Domain: {c}");
}

fn deleted(r: &Resp, name: &str) -> bool {
    r.set_cookie(name).is_some_and(|c| {
        c.max_age().is_some_and(|m| m.is_zero() || m.is_negative())
            || matches!(c.expires_datetime(), Some(t) if t < cookie::time::OffsetDateTime::now_utc())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_login_forwards_the_access_token() {
    let stack = Stack::start_default().await;
    let b = stack.browser();

    // 1. Unauthenticated navigation -> 302 to the IdP's authorization endpoint.
    let start = b.get(&stack.url("/anything?x=1")).await;
    assert_eq!(start.status, 302, "{}", start.describe());
    let loc = start.location().expect("Location");
    assert!(
        loc.as_str().starts_with(&stack.authorize_endpoint()),
        "{}",
        start.describe()
    );
    let p = |k: &str| start.location_param(k);
    assert_eq!(p("response_type").as_deref(), Some("code"));
    assert_eq!(p("client_id").as_deref(), Some(CLIENT_ID));
    assert_eq!(
        p("redirect_uri").as_deref(),
        Some("https://app.example.com/oauth2/callback")
    );
    let scope = p("scope").expect("scope");
    assert!(scope.split(' ').any(|s| s == "openid"), "scope {scope}");
    let state = p("state").expect("state");
    assert!(!p("nonce").unwrap_or_default().is_empty(), "nonce");
    assert_eq!(p("code_challenge").map(|c| c.len()), Some(43));
    assert_eq!(p("code_challenge_method").as_deref(), Some("S256"));
    for secret in ["code_verifier", "client_secret"] {
        assert!(p(secret).is_none(), "{secret} must not be in the URL");
    }

    // The per-flow login cookie, named after the flow id in `state`.
    let (flow_id, _) = state.split_once('.').expect("state = <flow_id>.<random>");
    let login_cookies = start.set_cookies_with_prefix(LOGIN_COOKIE_PREFIX);
    assert_eq!(login_cookies.len(), 1, "{:?}", start.set_cookies());
    let lc = &login_cookies[0];
    assert_eq!(lc.name(), format!("{LOGIN_COOKIE_PREFIX}{flow_id}"));
    assert_host_cookie_attrs(lc);
    assert_eq!(lc.max_age().map(|m| m.whole_seconds()), Some(600));
    assert!(
        b.jar().get(APP_HOST, lc.name()).is_some(),
        "browser kept it: {:?}",
        b.jar().rejected
    );
    assert!(start.set_cookie(SESSION_COOKIE).is_none());
    assert_eq!(stack.upstream.count(), 0, "nothing upstream before login");

    // 2. Log in at the IdP, come back through the callback.
    let flow = stack.login_from(&b, start).await;
    assert_eq!(
        flow.idp_redirect.location_param("state").as_deref(),
        Some(state.as_str())
    );
    let cb = &flow.callback;
    assert_eq!(
        cb.location().map(|u| u.to_string()).as_deref(),
        Some("https://app.example.com/anything?x=1"),
        "{}",
        cb.describe()
    );
    let session = cb.set_cookie(SESSION_COOKIE).expect("session cookie set");
    assert_host_cookie_attrs(&session);
    assert!(
        deleted(cb, lc.name()),
        "login cookie deleted: {:?}",
        cb.set_cookies()
    );
    assert!(b.jar().get(APP_HOST, lc.name()).is_none());
    assert!(b.jar().get(APP_HOST, SESSION_COOKIE).is_some());

    // The token request the IdP saw: code grant, PKCE verifier, same redirect_uri.
    let st = stack.idp.stats();
    assert_eq!(st.token, 1);
    assert_eq!(st.token_ok, 1);
    let form = &st.last_token_form;
    assert_eq!(
        form.get("grant_type").map(String::as_str),
        Some("authorization_code")
    );
    assert_eq!(
        form.get("redirect_uri").map(String::as_str),
        Some("https://app.example.com/oauth2/callback")
    );
    assert!(form.contains_key("code_verifier"), "{form:?}");

    // 3. Landed on the original URL, upstream answered.
    assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());
    assert_eq!(flow.landed.json()["path"], "/anything?x=1");

    // 4. /headers: the access token (not the ID token) goes upstream, our cookies do not.
    let r = b.get(&stack.url("/headers")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let token = upstream_bearer(&stack);
    let claims = jwt_payload(&token);
    assert_eq!(
        claims["aud"],
        stack.idp.state().config().access_token_audience.as_str(),
        "access token audience, not the client id: {claims}"
    );
    assert_ne!(claims["aud"], CLIENT_ID);
    assert!(
        claims.get("nonce").is_none(),
        "the ID token has a nonce, the access token does not: {claims}"
    );
    assert_eq!(claims["iss"], stack.idp.issuer().as_str());
    let seen = stack.upstream.last().unwrap();
    for c in seen.header_all("cookie") {
        assert!(
            !c.contains("__Host-oidc-gate"),
            "our cookie leaked upstream: {c}"
        );
    }
    assert_eq!(r.json()["headers"]["host"], APP_HOST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_requests_make_no_idp_calls() {
    let stack = Stack::start_default().await;
    let b = stack.browser();
    let flow = stack.login(&b, &stack.url("/")).await;
    assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());
    stack.idp.reset_stats();
    let before = stack.upstream.count();
    for path in ["/a", "/b?c=d", "/headers"] {
        let r = b.get(&stack.url(path)).await;
        assert_eq!(r.status, 200, "{}", r.describe());
    }
    // A fresh connection (another client sharing the jar) as well.
    let b2 = b.with_mode(
        stack.gateway_addr(),
        integration::TEST_HOSTS,
        integration::Mode::Navigation,
    );
    let r = b2.get(&stack.url("/e")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    // And over HTTP/1.1 (the Cookie header arrives as one line instead of h2's split crumbs).
    let h1 = stack.browser_http1();
    let session = b
        .jar()
        .get(APP_HOST, SESSION_COOKIE)
        .expect("session")
        .value;
    h1.set_cookie_raw(APP_HOST, SESSION_COOKIE, &session);
    h1.set_cookie_raw(APP_HOST, "other", "1");
    let r = h1.get(&stack.url("/f")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.version, "HTTP/1.1");
    assert_eq!(
        stack.upstream.last().unwrap().header_all("cookie"),
        vec!["other=1"],
        "only our cookie is removed"
    );
    assert_eq!(stack.upstream.count(), before + 5);
    assert_eq!(
        stack.idp.stats(),
        mock_idp::Stats::default(),
        "no IdP call after login"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authorization_is_replaced_by_the_session_token() {
    let stack = Stack::start_default().await;
    let b = stack.browser();
    stack.login(&b, &stack.url("/")).await;
    b.get(&stack.url("/headers")).await;
    let genuine = upstream_bearer(&stack);

    let r = b
        .get_with(&stack.url("/headers"), &[("authorization", "Bearer evil")])
        .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(upstream_bearer(&stack), genuine);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_clears_the_session_and_ends_the_idp_session() {
    let stack = Stack::start_default().await;
    let b = stack.browser();
    stack.login(&b, &stack.url("/")).await;
    assert!(b.jar().get(APP_HOST, SESSION_COOKIE).is_some());

    let r = b.get(&stack.url("/oauth2/sign_out")).await;
    assert_eq!(r.status, 302, "{}", r.describe());
    let loc = r.location().expect("Location");
    assert!(
        loc.as_str().starts_with(&stack.logout_endpoint()),
        "{}",
        r.describe()
    );
    let hint = r.location_param("id_token_hint").expect("id_token_hint");
    let hint_claims = jwt_payload(&hint);
    assert_eq!(hint_claims["aud"], CLIENT_ID, "the ID token: {hint_claims}");
    assert_eq!(r.location_param("client_id").as_deref(), Some(CLIENT_ID));
    let cleared = r
        .set_cookie(SESSION_COOKIE)
        .expect("session cookie cleared");
    assert_eq!(
        cleared.max_age().map(|m| m.whole_seconds()),
        Some(0),
        "{cleared}"
    );
    assert_eq!(cleared.path(), Some("/"));
    assert!(b.jar().get(APP_HOST, SESSION_COOKIE).is_none());

    // The IdP ends its session.
    let idp = b.follow_one(&r).await;
    assert!(idp.status < 400, "{}", idp.describe());
    assert_eq!(stack.idp.stats().end_session, 1);

    // Next request needs a new login.
    let before = stack.upstream.count();
    let again = b.get(&stack.url("/anything")).await;
    assert_eq!(again.status, 302, "{}", again.describe());
    assert!(again
        .location()
        .unwrap()
        .as_str()
        .starts_with(&stack.authorize_endpoint()));
    assert_eq!(stack.upstream.count(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_session_cookie_means_login_again() {
    let stack = Stack::start_default().await;
    let b = stack.browser();
    stack.login(&b, &stack.url("/")).await;
    let value = b
        .jar()
        .get(APP_HOST, SESSION_COOKIE)
        .expect("session")
        .value;

    // Flip one character in the middle (stay inside the base64url alphabet).
    let mut chars: Vec<char> = value.chars().collect();
    let i = chars.len() / 2;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    let tampered: String = chars.into_iter().collect();
    assert_ne!(tampered, value);
    b.set_cookie_raw(APP_HOST, SESSION_COOKIE, &tampered);

    let before = stack.upstream.count();
    let r = b.get(&stack.url("/anything")).await;
    assert_eq!(r.status, 302, "{}", r.describe());
    assert!(r
        .location()
        .unwrap()
        .as_str()
        .starts_with(&stack.authorize_endpoint()));
    assert_eq!(stack.upstream.count(), before, "upstream not reached");

    // Truncated cookie too.
    b.set_cookie_raw(APP_HOST, SESSION_COOKIE, &value[..value.len() / 2]);
    let r = b.get(&stack.url("/anything")).await;
    assert_eq!(r.status, 302, "{}", r.describe());
    assert_eq!(stack.upstream.count(), before, "upstream not reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_with_wrong_state_is_rejected_without_token_call() {
    /// A browser with a login up to its callback: the browser, the callback URL without its
    /// query, and the callback's `code`, `state` and `iss` (the last form-encoded).
    async fn at_the_callback(stack: &Stack) -> (Browser, String, [String; 3]) {
        let b = stack.browser();
        let start = b.get(&stack.url("/anything")).await;
        assert_eq!(start.status, 302, "{}", start.describe());
        let page = b.follow_one(&start).await;
        let to_callback = b
            .submit_login(
                &page,
                integration::stack::USERNAME,
                integration::stack::PASSWORD,
            )
            .await;
        assert_eq!(to_callback.status, 302, "{}", to_callback.describe());
        let cb_url = to_callback.location().expect("callback URL");
        let base = format!("{}://{}{}", cb_url.scheme(), APP_HOST, cb_url.path());
        let param = |name: &str| to_callback.location_param(name).expect(name);
        let iss = url::form_urlencoded::byte_serialize(param("iss").as_bytes()).collect();
        let params = [param("code"), param("state"), iss];
        (b, base, params)
    }

    let stack = Stack::start_default().await;
    let token_before = stack.idp.stats().token;
    type Case = fn(&str, &str, &str, &str) -> String;
    let cases: [(&str, Case); 5] = [
        ("random part changed", |base, code, state, iss| {
            let (flow_id, random) = state.split_once('.').expect("<flow_id>.<random>");
            let mut r: Vec<char> = random.chars().collect();
            r[0] = if r[0] == 'A' { 'B' } else { 'A' };
            let flipped: String = r.into_iter().collect();
            format!("{base}?code={code}&state={flow_id}.{flipped}&iss={iss}")
        }),
        ("unknown flow id", |base, code, state, iss| {
            let (_, random) = state.split_once('.').expect("<flow_id>.<random>");
            format!("{base}?code={code}&state=AAAAAAAAAAAAAAAA.{random}&iss={iss}")
        }),
        ("state missing", |base, code, _, iss| {
            format!("{base}?code={code}&iss={iss}")
        }),
        ("code missing", |base, _, state, iss| {
            format!("{base}?state={state}&iss={iss}")
        }),
        ("no query", |base, _, _, _| base.to_string()),
    ];
    // Each case in a browser of its own, whose login cookie is still there: a refused callback
    // deletes it, and the next case would be refused for that alone.
    for (what, url) in cases {
        let (b, base, [code, state, iss]) = at_the_callback(&stack).await;
        let r = b.get(&url(&base, &code, &state, &iss)).await;
        assert_eq!(r.status, 400, "{what}: {}", r.describe());
        assert!(r.set_cookie(SESSION_COOKIE).is_none(), "{what}: no session");
        assert_eq!(
            stack.idp.stats().token,
            token_before,
            "{what}: no token call"
        );
    }

    // The right state without the login cookie (another browser: login CSRF) -> 400 too.
    let (_, base, [code, state, iss]) = at_the_callback(&stack).await;
    let other = stack.browser();
    let r = other
        .get(&format!("{base}?code={code}&state={state}&iss={iss}"))
        .await;
    assert_eq!(r.status, 400, "no login cookie: {}", r.describe());
    assert_eq!(stack.idp.stats().token, token_before);
    assert_eq!(stack.upstream.count(), 0, "nothing reached the upstream");
    // The control: that browser's own callback completes the login.
    let (b, base, [code, state, iss]) = at_the_callback(&stack).await;
    let r = b
        .get(&format!("{base}?code={code}&state={state}&iss={iss}"))
        .await;
    assert_eq!(r.status, 302, "control: {}", r.describe());
    assert!(
        r.set_cookie(SESSION_COOKIE).is_some(),
        "control: {}",
        r.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_error_on_callback_is_forbidden() {
    let stack = Stack::start_default().await;
    let b = stack.browser();
    let start = b.get(&stack.url("/anything")).await;
    assert_eq!(start.status, 302, "{}", start.describe());
    let state = start.location_param("state").expect("state");
    // As the IdP would send it (RFC 9207: `iss` also on error responses; mock-idp advertises it).
    let iss: String = url::form_urlencoded::byte_serialize(stack.idp.issuer().as_bytes()).collect();
    let r = b
        .get(&stack.url(&format!(
            "/oauth2/callback?error=access_denied&error_description=%3Cscript%3E&state={state}&iss={iss}"
        )))
        .await;
    assert_eq!(r.status, 403, "{}", r.describe());
    assert!(!r.body.contains("<script>"), "error text not reflected raw");
    assert!(r.set_cookie(SESSION_COOKIE).is_none());
    assert_eq!(stack.idp.stats().token, 0);
    assert_eq!(stack.upstream.count(), 0);
}

/// The cluster `make demo --issuer` gives an external IdP (Istio's name, STRICT_DNS), here for the
/// issuer's host `localhost`: Envoy resolves the name and the whole login goes through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_through_a_strict_dns_cluster_named_like_istios() {
    use integration::config::external_issuer_cluster;
    use integration::stack::StackOptions;
    use serde_json::json;
    const CLUSTER: &str = "outbound|80||localhost";
    let mut opts = StackOptions::default().with_config(json!({ "idp_cluster": CLUSTER }));
    opts.tweak = Some(std::sync::Arc::new(
        |gw: &mut integration::GatewayConfig| {
            let issuer = url::Url::parse(&format!("http://localhost:{}", gw.idp_endpoint_port))
                .expect("url");
            let (_, mut cluster) =
                external_issuer_cluster(&issuer, "/nonexistent-ca-bundle").expect("cluster");
            assert_eq!(cluster["type"], "STRICT_DNS");
            // The name Istio would give a ServiceEntry on port 80; the endpoint is the mock IdP.
            cluster["name"] = json!(CLUSTER);
            cluster["load_assignment"]["cluster_name"] = json!(CLUSTER);
            gw.extra_clusters.push(cluster);
        },
    ));
    let stack = Stack::start(opts).await;
    let b = stack.browser();
    let flow = stack.login(&b, &stack.url("/dns")).await;
    assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());
    assert!(b.jar().get(APP_HOST, SESSION_COOKIE).is_some());
    let requests = stack
        .envoy
        .stat(&format!("cluster.{CLUSTER}.upstream_rq_completed"))
        .await;
    assert!(
        requests >= 3,
        "discovery, token and keys through the DNS cluster: {requests}"
    );
    assert_eq!(
        stack
            .envoy
            .stat(&format!("cluster.{CLUSTER}.membership_healthy"))
            .await,
        1,
        "`localhost` resolved to one endpoint"
    );
}
