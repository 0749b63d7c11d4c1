//! Which requests the filter touches: protected hosts, skip paths, other hosts.

mod hostile_common;

use integration::stack::{Stack, OTHER_HOST};

fn is_login_redirect(stack: &Stack, r: &integration::Resp) -> bool {
    r.status == 302
        && r.location()
            .is_some_and(|l| l.as_str().starts_with(&stack.authorize_endpoint()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_paths_pass_without_login_and_nothing_else_does() {
    let stack = Stack::start_default().await;
    let b = stack.browser();

    for path in ["/healthz", "/public/x", "/public/a/b?c=d"] {
        let before = stack.upstream.count();
        let r = b.get(&stack.url(path)).await;
        assert_eq!(r.status, 200, "{path} skips login: {}", r.describe());
        assert_eq!(
            stack.upstream.count(),
            before + 1,
            "{path} reached upstream"
        );
        assert_eq!(stack.upstream.last().unwrap().path, path);
    }

    // Look-alikes and traversal stay protected.
    let before = stack.upstream.count();
    for path in ["/healthzx", "/publicx", "/secret"] {
        let r = b.get(&stack.url(path)).await;
        assert!(
            is_login_redirect(&stack, &r),
            "{path} is protected: {}",
            r.describe()
        );
    }
    // Sent as it is (a URL library would resolve the dot segments first): Envoy normalises
    // `/public/../secret` to `/secret` before the filter sees it (normalize_path: true, as
    // Istio's gateway), so it is no skip path.
    let r = hostile_common::raw_get(&stack, b"/public/../secret", &[]).await;
    assert_eq!(r.status, 302, "/public/../secret: {}", r.body);
    assert!(r
        .header("location")
        .is_some_and(|l| l.starts_with(&stack.authorize_endpoint())));
    assert_eq!(stack.upstream.count(), before, "nothing reached upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_hosts_pass_untouched() {
    let stack = Stack::start_default().await;
    let b = stack.browser();
    let r = b
        .get_with(
            &stack.url_for(OTHER_HOST, "/headers"),
            &[("authorization", "Bearer client-token")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.set_cookies().is_empty(), "{:?}", r.set_cookies());
    let seen = stack.upstream.last().expect("upstream reached");
    assert_eq!(seen.header("host"), Some(OTHER_HOST));
    assert_eq!(
        seen.header_all("authorization"),
        vec!["Bearer client-token"]
    );
    assert_eq!(
        stack.idp.stats().discovery,
        0,
        "no IdP call for other hosts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_hosts_are_protected_with_their_own_callback() {
    let stack = Stack::start_default().await;
    let b = stack.browser();
    let r = b.get(&stack.url_for("a.apps.example.com", "/x")).await;
    assert!(is_login_redirect(&stack, &r), "{}", r.describe());
    assert_eq!(
        r.location_param("redirect_uri").as_deref(),
        Some("https://a.apps.example.com/oauth2/callback")
    );
    // The wildcard does not cover the parent domain's other children.
    let r = b.get(&stack.url_for(OTHER_HOST, "/x")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
}
