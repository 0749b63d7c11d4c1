//! Several Envoy workers (one wasm VM each) share the IdP metadata.

use std::collections::BTreeMap;
use std::sync::Arc;

use integration::stack::Stack;

/// Connections accepted per worker on the gateway listener.
async fn per_worker_connections(stack: &Stack) -> BTreeMap<String, u64> {
    stack
        .envoy
        .stats(r"^listener\.127\.0\.0\.1_[0-9]+\.worker_[0-9]+\.downstream_cx_total$")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_discovery_and_jwks() {
    let stack = Arc::new(Stack::start_default().await); // --concurrency 2
                                                        // Warm up: one complete login (discovery + JWKS fetched once).
    let first = stack.browser();
    let flow = stack.login(&first, &stack.url("/")).await;
    assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());

    // More browsers, each with its own connection, until both workers have served logins.
    let mut rounds = 0;
    loop {
        rounds += 1;
        let mut set = tokio::task::JoinSet::new();
        for i in 0..4 {
            let stack = stack.clone();
            set.spawn(async move {
                let b = stack.browser();
                let flow = stack.login(&b, &stack.url(&format!("/w{i}"))).await;
                assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());
                let r = b.get(&stack.url("/headers")).await;
                assert_eq!(r.status, 200, "{}", r.describe());
            });
        }
        while let Some(r) = set.join_next().await {
            r.expect("login task");
        }
        let per_worker = per_worker_connections(&stack).await;
        eprintln!("round {rounds}: connections per worker {per_worker:?}");
        let busy = per_worker.values().filter(|n| **n >= 2).count();
        if busy >= 2 {
            break;
        }
        assert!(
            rounds < 5,
            "connections did not spread over both workers: {per_worker:?}"
        );
    }

    // The filter keeps discovery and JWKS in proxy-wasm shared data (one process-wide store),
    // so the IdP serves each exactly once, no matter how many workers (VMs) serve logins.
    let st = stack.idp.stats();
    eprintln!("IdP stats: {st:?}");
    assert_eq!(st.discovery, 1, "discovery fetched once: {st:?}");
    assert_eq!(st.jwks, 1, "JWKS fetched once: {st:?}");
    assert_eq!(st.token, st.authorize_post, "one token call per login");
}
