//! Misconfiguration and IdP failures: the gateway fails closed.

use std::time::Duration;

use integration::stack::{Stack, StackOptions, SESSION_COOKIE};
use mock_idp::Fault;
use serde_json::json;

/// A bad plugin config delivered the way Istio does (ECDS): Envoy rejects the update, the
/// listener stays up and every request on it fails; the log names the field.
async fn bad_config_fails_closed(patch: serde_json::Value, field: &str) {
    let stack = Stack::start(StackOptions::default().ecds().with_config(patch)).await;
    let needle = format!("invalid configuration: field `{field}`");
    assert!(
        stack.envoy.wait_log(&needle, Duration::from_secs(10)).await,
        "log should contain {needle:?}"
    );
    let b = stack.browser();
    for path in ["/anything", "/healthz"] {
        let r = b.get(&stack.url(path)).await;
        eprintln!("bad config: {}", r.describe());
        assert!(
            (500..600).contains(&r.status),
            "{path}: requests fail while the config is bad: {}",
            r.describe()
        );
    }
    assert_eq!(stack.upstream.count(), 0, "nothing reached the upstream");
    assert_eq!(stack.idp.stats().discovery, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_config_key_is_rejected() {
    bad_config_fails_closed(
        json!({"issuer": null, "isuer": "https://idp.example.com"}),
        "isuer",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrongly_typed_config_field_is_rejected() {
    bad_config_fails_closed(json!({"hosts": "app.example.com"}), "hosts").await;
}

/// Inline (not Istio's ECDS) a bad config is a bootstrap error: Envoy refuses to start
/// (FAIL_CLOSED plugin failed to load), and the log names the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_bad_config_stops_envoy_from_starting() {
    let err = match Stack::try_start(
        StackOptions::default().with_config(json!({"hosts": "app.example.com"})),
    )
    .await
    {
        Ok(_) => panic!("Envoy started with a bad inline plugin config"),
        Err(e) => e,
    };
    assert!(
        err.contains("invalid configuration: field `hosts`"),
        "{err}"
    );
    assert!(err.contains("Unable to create Wasm plugin"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_style_numbers_are_accepted_over_ecds() {
    let stack = Stack::start(
        StackOptions::default()
            .ecds()
            .with_config(json!({"session_max_age": 600})),
    )
    .await;
    assert!(
        stack.plugin_config.contains(r#""session_max_age":600.0"#),
        "{}",
        stack.plugin_config
    );
    let r = stack.browser().get(&stack.url("/anything")).await;
    assert_eq!(r.status, 302, "config accepted: {}", r.describe());
    assert!(!stack.envoy.log().contains("invalid configuration"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_idp_is_503() {
    let stack = Stack::start(StackOptions {
        idp_unreachable: true,
        ..StackOptions::default()
    })
    .await;
    let r = stack.browser().get(&stack.url("/anything")).await;
    assert_eq!(r.status, 503, "{}", r.describe());
    assert!(r.set_cookie(SESSION_COOKIE).is_none());
    assert_eq!(stack.upstream.count(), 0, "upstream saw nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_discovery_is_503() {
    let stack = Stack::start(StackOptions {
        idp_fault: Some(Fault::DiscoveryStatus(500)),
        ..StackOptions::default()
    })
    .await;
    let r = stack.browser().get(&stack.url("/anything")).await;
    assert_eq!(r.status, 503, "{}", r.describe());
    assert_eq!(stack.upstream.count(), 0, "upstream saw nothing");
    assert!(stack.idp.stats().discovery >= 1, "discovery was tried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_error_is_502_without_session() {
    let stack = Stack::start_default().await;
    let b = stack.browser();
    let start = b.get(&stack.url("/anything")).await;
    assert_eq!(start.status, 302, "{}", start.describe());
    let page = b.follow_one(&start).await;
    let to_cb = b
        .submit_login(
            &page,
            integration::stack::USERNAME,
            integration::stack::PASSWORD,
        )
        .await;
    stack.idp.set_fault(Fault::TokenStatus(500));
    let cb = b.follow_one(&to_cb).await;
    assert_eq!(cb.status, 502, "{}", cb.describe());
    assert!(cb.set_cookie(SESSION_COOKIE).is_none());
    assert_eq!(stack.idp.stats().token, 1);
    assert_eq!(stack.upstream.count(), 0);
}

/// GET `url` until it answers `want` (or `timeout` passes); returns the last answer.
async fn poll_status(
    b: &integration::Browser,
    url: &str,
    want: u16,
    timeout: Duration,
) -> integration::Resp {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let r = b.get(url).await;
        if r.status == want || std::time::Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// ECDS updates as istio-agent sends them: the deny-all RBAC that replaces the plugin when the
/// module download fails (FAIL_CLOSE) answers 403; a good plugin config brings the login back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecds_updates_switch_between_deny_all_and_the_plugin() {
    let stack = Stack::start(StackOptions::default().ecds()).await;
    let b = stack.browser();
    let url = stack.url("/anything");
    let r = b.get(&url).await;
    assert_eq!(r.status, 302, "{}", r.describe());

    stack.push_ecds_typed_config(integration::GatewayConfig::rbac_deny_all());
    let r = poll_status(&b, &url, 403, Duration::from_secs(10)).await;
    assert_eq!(r.status, 403, "deny-all RBAC: {}", r.describe());
    assert_eq!(r.body, "RBAC: access denied");

    stack.push_plugin_config(&stack.plugin_config);
    let r = poll_status(&b, &url, 302, Duration::from_secs(10)).await;
    assert_eq!(r.status, 302, "plugin back: {}", r.describe());
    assert_eq!(stack.upstream.count(), 0);
}

/// Whether `id` looks like the UUID Envoy generates for `x-request-id`.
fn is_uuid(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The filter's error answers carry the request id Envoy gave the request (so a user's report
/// can be matched to Envoy's log), as an HTML page for navigations and as JSON for API calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_answers_carry_envoys_request_id_as_html_or_json() {
    let stack = Stack::start(StackOptions {
        idp_unreachable: true,
        ..StackOptions::default()
    })
    .await;
    let page = stack.browser().get(&stack.url("/anything")).await;
    assert_eq!(page.status, 503, "{}", page.describe());
    assert!(
        page.header("content-type")
            .is_some_and(|t| t.starts_with("text/html")),
        "{}",
        page.describe()
    );
    let id = page
        .body
        .split_once("Request id: <code>")
        .and_then(|(_, rest)| rest.split_once("</code>"))
        .map(|(id, _)| id.to_string())
        .unwrap_or_default();
    assert!(is_uuid(&id), "request id {id:?} in {}", page.body);

    // An API call needs no IdP to be told it is not signed in.
    let api = stack.api_client().get(&stack.url("/anything")).await;
    assert_eq!(api.status, 401, "{}", api.describe());
    assert!(
        api.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{}",
        api.describe()
    );
    let api_id = api.json()["request_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(is_uuid(&api_id), "request id {api_id:?} in {}", api.body);
    assert_ne!(id, api_id, "one id per request");
}
