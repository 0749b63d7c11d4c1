//! Non-browser clients without a session.

use integration::stack::Stack;

/// An API client (no `Sec-Fetch-*`, `Accept: application/json`) without a session gets a 401 it
/// can act on, with a Bearer challenge and a JSON body; a forged bearer token is not forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_client_without_session_gets_401() {
    let stack = Stack::start_default().await;
    let api = stack.api_client();
    let r = api
        .get_with(
            &stack.url("/api/items"),
            &[("authorization", "Bearer forged")],
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.describe());
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some("Bearer"),
        "{}",
        r.describe()
    );
    let body = r.json();
    assert_eq!(body["error"], "unauthenticated");
    assert_eq!(stack.upstream.count(), 0);
    assert_eq!(stack.idp.stats().discovery, 0, "a 401 needs no IdP call");
}
