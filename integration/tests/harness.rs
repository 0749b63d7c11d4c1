//! Self-tests of the harness that do not need the filter: the Istio-shaped gateway without the
//! wasm filter, the echo upstream, the browser and its jar, and the mock IdP login form.

mod hostile_common;

use std::time::Instant;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use integration::config::istio_plugin_json;
use integration::stack::{
    default_filter_config, Stack, StackOptions, CLIENT_ID, PASSWORD, USERNAME,
};

fn plain() -> StackOptions {
    StackOptions {
        with_filter: false,
        ..StackOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_gateway_proxies_to_the_echo_upstream() {
    let t = Instant::now();
    let stack = Stack::start(plain()).await;
    eprintln!("stack up in {:?}", t.elapsed());
    let b = stack.browser();
    let r = b
        .get_with(
            &stack.url("/headers?x=1"),
            &[("authorization", "Bearer abc")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.version, "HTTP/2.0", "ALPN h2 like a browser");
    let h = &r.json()["headers"];
    assert_eq!(h["host"], "app.example.com");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["authorization"], "Bearer abc");
    assert_eq!(h["sec-fetch-mode"], "navigate");
    assert!(h["x-request-id"].is_string());

    let seen = stack.upstream.last().expect("upstream saw the request");
    assert_eq!(seen.path, "/headers?x=1");
    assert_eq!(stack.upstream.count(), 1);

    // Path normalisation like Istio's gateway: /a/../b -> /b (sent as it is: a URL library
    // would resolve it first); escaped slashes kept.
    let r = hostile_common::raw_get(&stack, b"/public/../secret", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let json = &r.body[r.body.find('{').unwrap()..=r.body.rfind('}').unwrap()];
    let echoed: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(echoed["path"], "/secret");
    let r = b.get(&stack.url("/public/%2F..%2Fsecret")).await;
    assert_eq!(r.json()["path"], "/public/%2F..%2Fsecret");

    // Other host, API mode, HTTP/1.1.
    let api = stack.api_client();
    let r = api.get(&stack.url_for("other.example.com", "/x")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["host"], "other.example.com");
    assert_eq!(r.json()["headers"]["accept"], "application/json");
    assert!(r.json()["headers"]["sec-fetch-mode"].is_null());

    let stats = stack
        .envoy
        .stats("http.outbound_0.0.0.0_8443.downstream_rq_2xx")
        .await;
    assert_eq!(
        stats.get("http.outbound_0.0.0.0_8443.downstream_rq_2xx"),
        Some(&4),
        "{stats:?}"
    );
    assert!(stack.envoy.log().contains("starting main dispatch loop"));
    eprintln!("test done in {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_logs_in_at_the_mock_idp() {
    let stack = Stack::start(plain()).await;
    let b = stack.browser();
    let authorize = format!(
        "{}?response_type=code&client_id={CLIENT_ID}&redirect_uri=https%3A%2F%2Fapp.example.com%2Foauth2%2Fcallback\
         &scope=openid&state=s1&nonce=n1&code_challenge=E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM&code_challenge_method=S256",
        stack.authorize_endpoint()
    );
    let page = b.get(&authorize).await;
    assert_eq!(page.status, 200, "{}", page.describe());
    let r = b.submit_login(&page, USERNAME, PASSWORD).await;
    assert_eq!(r.status, 302, "{}", r.describe());
    let loc = r.location().unwrap();
    assert_eq!(loc.host_str(), Some("app.example.com"));
    assert_eq!(loc.path(), "/oauth2/callback");
    assert_eq!(r.location_param("state").as_deref(), Some("s1"));
    assert!(r.location_param("code").is_some());
    // Following it reaches the gateway (no filter here: the upstream answers).
    let cb = b.follow_one(&r).await;
    assert_eq!(cb.status, 200);
    assert_eq!(
        cb.json()["headers"]["sec-fetch-site"],
        "cross-site",
        "IdP -> app is a cross-site navigation"
    );
    assert_eq!(stack.idp.stats().authorize_post, 1);
}

#[test]
fn generated_configs_pass_envoy_validate() {
    use integration::config::{Delivery, GatewayConfig};
    let dir = tempfile::tempdir().unwrap();
    let cert = integration::tls::write_self_signed(dir.path());
    for delivery in [Delivery::Inline, Delivery::Ecds] {
        for wasm_filter in [false, true] {
            let mut gw = GatewayConfig::new(integration::require_wasm(), cert.clone(), 18000, 5556);
            gw.delivery = delivery;
            gw.wasm_filter = wasm_filter;
            let cfg = default_filter_config("http://127.0.0.1:5556", &gw.idp_cluster());
            gw.plugin_config = Some(istio_plugin_json(&cfg));
            gw.env.insert("OIDC_CLIENT_SECRET".into(), "s".into());
            gw.env
                .insert("OIDC_COOKIE_SECRET".into(), STANDARD.encode([7u8; 32]));
            let path = gw.write(dir.path());
            integration::envoy::validate(&path).unwrap_or_else(|e| {
                panic!("{delivery:?} wasm={wasm_filter}: envoy --mode validate failed:\n{e}")
            });
            if wasm_filter && delivery == Delivery::Inline {
                // Validation runs the plugin's on_configure: a bad inline config fails it.
                gw.plugin_config = Some(r#"{"hosts":"x"}"#.into());
                let path = gw.write(dir.path());
                let err = integration::envoy::validate(&path).expect_err("bad config validates");
                assert!(err.contains("invalid configuration: field `"), "{err}");
            }
        }
    }
}
