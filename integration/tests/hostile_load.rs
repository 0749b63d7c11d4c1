//! Attack suite, part 3 (load): 500 concurrent callbacks against a slow IdP (security-cases.md
//! J87, J91). In its own test binary so that it does not share the two cores with the other
//! hostile sections (`hostile_idp.rs`, `hostile_client.rs`): the mock IdP and Envoy must answer
//! 500 logins inside the filter's 5 s callout timeout.

mod hostile_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hostile_common::*;
use integration::stack::{jwt_payload, Stack, StackOptions};
use integration::{Browser, Resp};
use mock_idp::{subject_for, Fault, MockIdpConfig, SigningAlg, UserConfig};
use serde_json::json;

fn b64(data: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

// ------------------------------------------------------------------------------------------------
// J87, J91: 500 concurrent callbacks with a slow token endpoint; memory back to baseline
// ------------------------------------------------------------------------------------------------

const USERS: usize = 500;

fn user(i: usize) -> String {
    format!("user{i:03}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callbacks_stay_separate_and_memory_returns() {
    let users: Vec<UserConfig> = (0..USERS)
        .map(|i| UserConfig {
            username: user(i),
            password: format!("pw-{i}"),
            email: format!("{}@example.com", user(i)),
            name: user(i),
            groups: vec!["users".into()],
        })
        .collect();
    // ES256 ID tokens and opaque access tokens keep the mock IdP's signing work per token small
    // (one ECDSA signature), so 500 answers fit in the callout timeout after the 2 s delay; the
    // upstream receives the ID token, whose `sub` names the user.
    let stack = Arc::new(
        Stack::start(
            StackOptions {
                idp: MockIdpConfig {
                    users,
                    signing_alg: SigningAlg::Es256,
                    opaque_access_tokens: true,
                    ..MockIdpConfig::default()
                },
                ..StackOptions::default()
            }
            .with_config(json!({"upstream_authorization": "id_token"})),
        )
        .await,
    );
    // Warm up (discovery, JWKS, wasm), then take the baseline.
    {
        let b = stack.browser();
        let (_, to_cb) = to_callback_as(&stack, &b, "/warm", 0).await;
        let r = b.follow_one(&to_cb).await;
        assert_eq!(r.status, 302, "warm-up login: {}", r.describe());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = envoy_memory(&stack).await;
    eprintln!("baseline: allocated {} (heap {})", base.0, base.1);

    // Two identical rounds: memory after the second must not exceed memory after the first (no
    // per-login state is kept), and both stay within a fixed bound of the baseline.
    let after1 = round(&stack, 1).await;
    let after2 = round(&stack, 2).await;

    // J91: 2000 more requests with unique client x-request-ids (nothing keyed by them).
    let api = stack.api_client();
    for i in 0..2000 {
        let rid = format!("rid-{i}-{}", b64(integration::random_bytes(6)));
        let r = api
            .get_with(&stack.url("/flood"), &[("x-request-id", &rid)])
            .await;
        assert_eq!(r.status, 401);
    }
    drop(api);
    let after3 = settled_memory(&stack).await;
    let idp_conns = stack
        .envoy
        .stats(r"^cluster\.outbound.*idp.*upstream_cx_active$")
        .await;
    eprintln!(
        "Envoy memory (allocated): baseline {}, after round 1 {}, after round 2 {}, after the \
         x-request-id flood {}; IdP connections kept in Envoy's pool: {idp_conns:?}",
        base.0, after1.0, after2.0, after3.0
    );
    const MB: u64 = 1024 * 1024;
    assert!(
        after1.0 <= base.0 + 16 * MB,
        "memory after 500 logins within 16 MB of the baseline: {} -> {}",
        base.0,
        after1.0
    );
    assert!(
        after2.0 <= after1.0 + 2 * MB,
        "a second round of 500 logins does not grow memory: {} -> {}",
        after1.0,
        after2.0
    );
    assert!(
        after3.0 <= after1.0 + 2 * MB,
        "2000 unique x-request-ids do not grow memory: {} -> {}",
        after1.0,
        after3.0
    );
    assert_no_crash(&stack);
}

/// Envoy's allocated memory once it stopped changing (connections closed), at most ~10 s.
async fn settled_memory(stack: &Stack) -> (u64, u64) {
    let mut last = envoy_memory(stack).await;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = envoy_memory(stack).await;
        let stable = now.0.abs_diff(last.0) < 128 * 1024;
        last = now;
        if stable {
            break;
        }
    }
    last
}

/// One round: 500 browsers, each with its own user, login cookie and code; all callbacks at once
/// against a token endpoint that answers after ~2 s; each session's upstream request carries its
/// own user's token. Returns Envoy's memory after the browsers are gone.
async fn round(stack: &Arc<Stack>, n: usize) -> (u64, u64) {
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..25 {
        let stack = stack.clone();
        let next = next.clone();
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= USERS {
                    break;
                }
                let b = stack.browser();
                let (_start, to_cb) = to_callback_as(&stack, &b, &format!("/r{n}/u/{i}"), i).await;
                out.push((i, b, to_cb));
            }
            out
        });
    }
    let mut pending = Vec::new();
    while let Some(r) = set.join_next().await {
        pending.extend(r.expect("setup task"));
    }
    pending.sort_by_key(|p| p.0);
    eprintln!("round {n}: 500 logins prepared in {:?}", t.elapsed());

    // All callbacks at once; the IdP answers each token request after ~2 s (it does the grant's
    // work on arrival, so 500 signatures are not all computed at the end of the delay).
    stack
        .idp
        .set_fault(Fault::TokenDelayAfterGrant(Duration::from_secs(2)));
    let token_before = stack.idp.stats().token;
    let t = Instant::now();
    let pending: Vec<(usize, Arc<Browser>, Resp)> = pending
        .into_iter()
        .map(|(i, b, r)| (i, Arc::new(b), r))
        .collect();
    let mut set = tokio::task::JoinSet::new();
    for (i, b, to_cb) in &pending {
        let (i, b, to_cb) = (*i, b.clone(), to_cb.clone());
        set.spawn(async move { (i, b.follow_one(&to_cb).await) });
    }
    let mut peak = 0;
    let mut results = Vec::new();
    while let Some(r) = set.join_next().await {
        if results.len() % 100 == 0 {
            peak = peak.max(envoy_memory(stack).await.0);
        }
        results.push(r.expect("callback task"));
    }
    let took = t.elapsed();
    stack.idp.set_fault(Fault::None);
    eprintln!("round {n}: 500 concurrent callbacks answered in {took:?}; peak allocated {peak}");
    assert_eq!(stack.idp.stats().token - token_before, USERS as u64);
    for (i, r) in &results {
        assert_eq!(r.status, 302, "round {n}, user {i}: {}", r.describe());
        assert!(sets_session(r), "round {n}, user {i}: session");
        assert_eq!(
            r.location().map(|u| u.to_string()),
            Some(stack.url(&format!("/r{n}/u/{i}"))),
            "round {n}, user {i}: back to its own URL"
        );
    }
    assert!(
        took < Duration::from_secs(15),
        "callbacks were concurrent: {took:?}"
    );

    // Each browser's upstream request carries its own user's token.
    let mut set = tokio::task::JoinSet::new();
    for (i, b, _) in &pending {
        let (i, b, stack) = (*i, b.clone(), stack.clone());
        set.spawn(async move {
            let r = b.get(&stack.url(&format!("/headers?u={i}"))).await;
            (i, r)
        });
        if set.len() >= 50 {
            let (i, r) = set.join_next().await.unwrap().unwrap();
            check_own_token(i, &r);
        }
    }
    while let Some(r) = set.join_next().await {
        let (i, r) = r.unwrap();
        check_own_token(i, &r);
    }
    drop(pending);
    drop(results);
    settled_memory(stack).await
}

fn check_own_token(i: usize, r: &Resp) {
    assert_eq!(r.status, 200, "user {i}: {}", r.describe());
    let auth = r.json()["headers"]["authorization"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let claims = jwt_payload(auth.trim_start_matches("Bearer "));
    assert_eq!(
        claims["sub"],
        subject_for(&user(i)),
        "user {i} got its own token, not another session's"
    );
}

/// Like [`to_callback`] but signing in as `user(i)`.
async fn to_callback_as(stack: &Stack, b: &Browser, path: &str, i: usize) -> (Resp, Resp) {
    let s = start(stack, b, path).await;
    let page = b.follow_one(&s).await;
    assert_eq!(page.status, 200, "{}", page.describe());
    let r = b.submit_login(&page, &user(i), &format!("pw-{i}")).await;
    assert_eq!(r.status, 302, "{}", r.describe());
    (s, r)
}
