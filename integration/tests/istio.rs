//! The gateway exactly as Istio runs it: the filter delivered by ECDS under Istio's >= 1.30 name,
//! secrets from the pod environment (`vmConfig.env` `valueFrom: HOST` → `host_env_keys`), and
//! several gateway replicas serving one user.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use integration::browser::Mode;
use integration::config::{self, GatewayConfig};
use integration::envoy::{Envoy, EnvoyOptions};
use integration::stack::{jwt_payload, Stack, StackOptions, SESSION_COOKIE};
use integration::{random_bytes, TEST_HOSTS};
use serde_json::json;

/// `valueFrom: HOST`: the variables come from the Envoy process's own environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecds_delivery_with_secrets_from_the_gateway_pod_environment() {
    let cookie_secret = STANDARD.encode(random_bytes(32));
    // Unique names: tests in this binary share the process environment.
    std::env::set_var("OIDC_GATE_IT_HOST_CLIENT_SECRET", "oidc-gate-secret");
    std::env::set_var("OIDC_GATE_IT_HOST_COOKIE_SECRET", &cookie_secret);
    let opts = StackOptions {
        tweak: Some(Arc::new(|gw: &mut GatewayConfig| {
            gw.env.clear();
            gw.host_env_keys = vec![
                "OIDC_GATE_IT_HOST_CLIENT_SECRET".into(),
                "OIDC_GATE_IT_HOST_COOKIE_SECRET".into(),
            ];
        })),
        ..StackOptions::default()
    }
    .ecds()
    .with_config(json!({
        "client_secret_env": "OIDC_GATE_IT_HOST_CLIENT_SECRET",
        "cookie_secret_env": "OIDC_GATE_IT_HOST_COOKIE_SECRET",
    }));
    let stack = Stack::start(opts).await;
    let ecds = std::fs::read_to_string(stack.dir().join("ecds.json")).expect("ecds file");
    assert!(
        ecds.contains("extensions.istio.io/trafficextension/"),
        "Istio >= 1.30 name"
    );
    assert!(
        !ecds.contains(&cookie_secret),
        "no secret in the ECDS resource"
    );
    assert!(ecds.contains("FAIL_CLOSED"));

    let b = stack.browser();
    let flow = stack.login(&b, &stack.url("/headers")).await;
    assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());
    let seen = stack.upstream.last().expect("upstream saw the request");
    let auth = seen
        .header("authorization")
        .expect("authorization upstream");
    let token = auth.strip_prefix("Bearer ").expect("bearer");
    assert_ne!(
        jwt_payload(token)["aud"],
        json!("oidc-gate"),
        "access token, not the ID token"
    );
}

/// A second gateway replica of `a`'s gateway (its own Envoy, the same configuration), its
/// directory and listener address.
async fn second_replica(a: &Stack) -> (tempfile::TempDir, Envoy, std::net::SocketAddr) {
    let dir = tempfile::Builder::new()
        .prefix("oidc-gate-replica-")
        .tempdir()
        .expect("dir");
    let envoy = Envoy::start(
        &a.gateway.write(dir.path()),
        dir.path(),
        &EnvoyOptions::default(),
    )
    .await
    .expect("replica B starts");
    let addr = envoy
        .listener(config::GATEWAY_LISTENER)
        .expect("B listener");
    (dir, envoy, addr)
}

/// `a`'s plugin configuration, as Istio delivers it, with these cookie secrets inline.
fn with_cookie_keys(a: &Stack, current: &str, previous: &str) -> String {
    let mut c = a.filter_config.clone().expect("generated config");
    config::merge(
        &mut c,
        &json!({"cookie_secret_env": null, "cookie_secret": current, "previous_cookie_secrets": [previous]}),
    );
    config::istio_plugin_json(&c)
}

/// Writes a new ECDS version for a second gateway that reads its own file.
fn push_replica(gw: &GatewayConfig, dir: &std::path::Path, plugin_config: &str, version: u64) {
    let mut gw = gw.clone();
    gw.plugin_config = Some(plugin_config.to_string());
    config::write_atomic(&dir.join("ecds.json"), &gw.ecds_resource(version));
}

async fn wait_reloads(envoy: &Envoy, at_least: u64) {
    for _ in 0..100 {
        let reloads: u64 = envoy
            .stats("extension_config_discovery.*config_reload$")
            .await
            .values()
            .sum();
        if reloads >= at_least {
            // The new VM configures right after the reload is counted.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("ECDS update was not applied:\n{}", envoy.log_tail(40));
}

/// Two gateway replicas (two Envoy processes, same configuration) behind one load balancer: a
/// session made on one works on the other, before and after a cookie-key rotation rolled out to
/// both (new key current, old key kept for decryption).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_sessions_across_a_key_rotation() {
    let a = Stack::start(StackOptions::default().ecds()).await;
    let (dir_b, b_envoy, b_addr) = second_replica(&a).await;

    let via_a = a.browser();
    let via_b = via_a.with_mode(b_addr, TEST_HOSTS, Mode::Navigation);
    let flow = a.login(&via_a, &a.url("/headers")).await;
    assert_eq!(flow.landed.status, 200);
    let tokens_issued = a.idp.stats().token;

    let on_b = via_b.get(&a.url("/headers")).await;
    assert_eq!(
        on_b.status,
        200,
        "session from A works on B: {}",
        on_b.describe()
    );
    assert!(a
        .upstream
        .last()
        .and_then(|r| r.header("authorization").map(str::to_string))
        .is_some());

    // Roll the rotation out to both replicas.
    let old_key = a.cookie_secret.clone();
    let new_key = STANDARD.encode(random_bytes(32));
    let rotated = with_cookie_keys(&a, &new_key, &old_key);
    let v = a.push_plugin_config(&rotated);
    push_replica(&a.gateway, dir_b.path(), &rotated, v);
    wait_reloads(&a.envoy, 1).await;
    wait_reloads(&b_envoy, 1).await;

    let before = via_b
        .jar()
        .get("app.example.com", SESSION_COOKIE)
        .expect("session cookie")
        .value;
    let on_b = via_b.get(&a.url("/headers")).await;
    assert_eq!(
        on_b.status,
        200,
        "old-key session still works on B: {}",
        on_b.describe()
    );
    assert!(
        on_b.set_cookie(SESSION_COOKIE).is_some(),
        "B reseals with the new key"
    );
    let after = via_b
        .jar()
        .get("app.example.com", SESSION_COOKIE)
        .expect("session cookie")
        .value;
    assert_ne!(before, after);
    let on_a = via_a.get(&a.url("/headers")).await;
    assert_eq!(
        on_a.status,
        200,
        "resealed session works on A: {}",
        on_a.describe()
    );
    assert!(
        on_a.set_cookie(SESSION_COOKIE).is_none(),
        "already on the current key"
    );
    assert_eq!(a.idp.stats().token, tokens_issued, "nobody logged in again");
    drop(b_envoy);
}

/// The cookie secret rotated the way wasmplugin/README.md says, in two phases, with the replicas
/// disagreeing in between as they do during a rolling restart: first every replica learns the
/// new key for opening cookies only, then the new key becomes current, replica by replica. At
/// every step a session works on both replicas and nobody logs in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_phase_key_rotation_logs_nobody_out_while_replicas_disagree() {
    let a = Stack::start(StackOptions::default().ecds()).await;
    let (dir_b, b_envoy, b_addr) = second_replica(&a).await;
    let via_a = a.browser();
    let via_b = via_a.with_mode(b_addr, TEST_HOSTS, Mode::Navigation);
    let flow = a.login(&via_a, &a.url("/headers")).await;
    assert_eq!(flow.landed.status, 200);
    let tokens_issued = a.idp.stats().token;

    let old_key = a.cookie_secret.clone();
    let new_key = STANDARD.encode(random_bytes(32));
    let with_keys = |current: &str, previous: &str| with_cookie_keys(&a, current, previous);
    let both_serve = |step: &'static str| {
        let (via_a, via_b) = (&via_a, &via_b);
        let url = a.url("/headers");
        async move {
            for (replica, via) in [("A", via_a), ("B", via_b)] {
                let r = via.get(&url).await;
                assert_eq!(r.status, 200, "{step}, on {replica}: {}", r.describe());
            }
        }
    };

    // Phase 1: the new key is added for opening only; B restarted first, A still on the old key
    // alone. Everything is still sealed with the old key.
    let phase_1 = with_keys(&old_key, &new_key);
    push_replica(&a.gateway, dir_b.path(), &phase_1, 100);
    wait_reloads(&b_envoy, 1).await;
    both_serve("phase 1 half rolled out").await;
    a.push_plugin_config(&phase_1);
    wait_reloads(&a.envoy, 1).await;
    both_serve("phase 1 rolled out").await;

    // Phase 2: the new key becomes current, B first. B reseals the session with the new key,
    // which A, still in phase 1, opens.
    let phase_2 = with_keys(&new_key, &old_key);
    push_replica(&a.gateway, dir_b.path(), &phase_2, 101);
    wait_reloads(&b_envoy, 2).await;
    let on_b = via_b.get(&a.url("/headers")).await;
    assert_eq!(on_b.status, 200, "{}", on_b.describe());
    assert!(
        on_b.set_cookie(SESSION_COOKIE).is_some(),
        "B reseals with the new key"
    );
    both_serve("phase 2 half rolled out").await;
    a.push_plugin_config(&phase_2);
    wait_reloads(&a.envoy, 2).await;
    both_serve("phase 2 rolled out").await;
    assert_eq!(a.idp.stats().token, tokens_issued, "nobody logged in again");
    drop(b_envoy);
}
