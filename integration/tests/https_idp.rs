//! The IdP over HTTPS, the way a production gateway reaches Auth0, Okta, Entra ID or a Keycloak
//! outside the mesh: an `https://` issuer, a `ServiceEntry` cluster `outbound|443||<host>` with a
//! `DestinationRule` `tls.mode: SIMPLE` and no `sni`, so Istio derives SNI and the certificate's
//! name check from each callout's `:authority` (README, Troubleshooting, "IdP over TLS").
//!
//! The mock IdP sits behind its own TLS listener in the same Envoy, serving the test certificate
//! (`*.example.com`). Browsers reach that listener directly; the filter's callouts reach it through
//! the TLS cluster.

use std::net::SocketAddr;

use integration::config::{add_upstream_tls, downstream_tls, static_cluster};
use integration::envoy::free_port;
use integration::stack::{StackOptions, APP_HOST, SESSION_COOKIE};
use integration::{Browser, GatewayConfig, Mode, Stack, TEST_HOSTS};
use serde_json::{json, Value};

const IDP_HOST: &str = "idp.example.com";
const IDP_TLS_CLUSTER: &str = "outbound|443||idp.example.com";
const IDP_FRONT_LISTENER: &str = "idp-front";
/// A name the test certificate does not carry.
const OTHER_IDP_NAME: &str = "idp.example.org";

/// A TLS listener on `port` serving the gateway's certificate and passing everything to the
/// mock IdP's plain cluster. It only answers connections whose SNI is one of the names the tests
/// use, so a callout without SNI fails.
fn idp_front_listener(gw: &GatewayConfig, port: u16) -> Value {
    json!({
        "name": IDP_FRONT_LISTENER,
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": port } },
        "listener_filters": [{
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" },
        }],
        "filter_chains": [{
            "filter_chain_match": { "server_names": [IDP_HOST, OTHER_IDP_NAME] },
            "transport_socket": downstream_tls(&gw.cert, &[]),
            "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "idp_front",
                    "route_config": {
                        "virtual_hosts": [{
                            "name": "idp",
                            "domains": ["*"],
                            "routes": [{
                                "match": { "prefix": "/" },
                                "route": { "cluster": gw.idp_cluster() },
                            }],
                        }],
                    },
                    "http_filters": [{
                        "name": "envoy.filters.http.router",
                        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" },
                    }],
                },
            }],
        }],
    })
}

/// What Istio generates for the IdP's `ServiceEntry` (port 443, resolved here to the front
/// listener) with a `DestinationRule` `tls: { mode: SIMPLE, caCertificates: <trusted_ca> }` (the
/// demo's shape for an external IdP, with the system CAs there).
fn idp_tls_cluster(port: u16, trusted_ca: &str) -> Value {
    let mut c = static_cluster(IDP_TLS_CLUSTER, port);
    add_upstream_tls(&mut c, trusted_ca);
    c
}

/// A stack whose issuer is `https://idp.example.com:<port>`, reached by the filter through the TLS
/// cluster. `trusted_ca` is the CA file the cluster trusts (`None`: the test certificate);
/// `config` is merged into the filter's configuration.
async fn start_with_https_idp(trusted_ca: Option<String>, config: Value) -> (Stack, u16) {
    let port = free_port();
    let mut opts = StackOptions::default()
        .with_config(json!({ "idp_cluster": IDP_TLS_CLUSTER }))
        .with_config(config);
    opts.idp.issuer = Some(format!("https://{IDP_HOST}:{port}"));
    opts.tweak = Some(std::sync::Arc::new(move |gw: &mut GatewayConfig| {
        let ca = trusted_ca
            .clone()
            .unwrap_or_else(|| gw.cert.cert.to_string_lossy().into_owned());
        gw.extra_listeners.push(idp_front_listener(gw, port));
        gw.extra_clusters.push(idp_tls_cluster(port, &ca));
    }));
    (Stack::start(opts).await, port)
}

/// A browser that reaches the app hosts through the gateway and the IdP through its listener.
fn browser(stack: &Stack, idp_port: u16) -> Browser {
    let mut routes: Vec<(&str, SocketAddr)> = TEST_HOSTS
        .iter()
        .map(|h| (*h, stack.gateway_addr()))
        .collect();
    routes.push((IDP_HOST, SocketAddr::from(([127, 0, 0, 1], idp_port))));
    Browser::with_routes(&routes, Mode::Navigation, false)
}

async fn tls_cluster_stat(stack: &Stack, name: &str) -> u64 {
    stack
        .envoy
        .stat(&format!("cluster.{IDP_TLS_CLUSTER}.{name}"))
        .await
}

/// A login attempt on a fresh gateway whose IdP certificate Envoy refuses (`failure` is the TLS
/// cluster's counter for the reason): 503 at discovery, nothing upstream, nothing at the IdP.
async fn assert_login_refused_by_tls(stack: &Stack, idp_port: u16, failure: &str) {
    let start = browser(stack, idp_port).get(&stack.url("/over-tls")).await;
    assert_eq!(
        start.status,
        503,
        "without a verified discovery document there is no login: {}",
        start.describe()
    );
    assert!(
        stack.upstream.last().is_none(),
        "the upstream must not be reached"
    );
    assert!(
        tls_cluster_stat(stack, failure).await >= 1,
        "Envoy should have refused the IdP's certificate ({failure})"
    );
    assert_eq!(
        stack.idp.stats().discovery,
        0,
        "nothing may reach the IdP through an unverified connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_through_an_https_idp_with_sni_and_name_check_from_the_issuer() {
    // No `idp_authority`: the callouts' `:authority` is the issuer's host and port.
    let (stack, idp_port) = start_with_https_idp(None, json!({})).await;
    let b = browser(&stack, idp_port);

    let flow = stack.login(&b, &stack.url("/over-tls")).await;
    assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());
    assert!(
        b.jar().get(APP_HOST, SESSION_COOKIE).is_some(),
        "no session cookie after the login"
    );
    let seen = stack.upstream.last().expect("upstream saw the request");
    let auth = seen.header_all("authorization");
    assert_eq!(auth.len(), 1, "one Authorization upstream: {auth:?}");
    assert!(auth[0].starts_with("Bearer "), "{auth:?}");

    // Discovery, JWKS and the token exchange went over TLS, with the certificate checked.
    let handshakes = tls_cluster_stat(&stack, "ssl.handshake").await;
    assert!(handshakes >= 1, "no TLS handshake to the IdP cluster");
    assert!(
        tls_cluster_stat(&stack, "upstream_rq_200").await >= 3,
        "discovery, JWKS and token requests should all have reached the IdP over TLS"
    );
    assert_eq!(
        tls_cluster_stat(&stack, "ssl.fail_verify_san").await
            + tls_cluster_stat(&stack, "ssl.fail_verify_error").await,
        0
    );
    // The token exchange reached the IdP (through its TLS listener: the plain port has no route).
    assert!(stack.idp.stats().token_ok >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idp_certificate_from_an_untrusted_ca_stops_the_login() {
    // The cluster trusts another CA: what a man in the middle with its own certificate meets.
    let other = tempfile::tempdir().expect("temp dir");
    let other_ca = integration::tls::write_self_signed(other.path());
    let (stack, idp_port) = start_with_https_idp(
        Some(other_ca.cert.to_string_lossy().into_owned()),
        json!({}),
    )
    .await;
    assert_login_refused_by_tls(&stack, idp_port, "ssl.fail_verify_error").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idp_authority_the_certificate_does_not_name_stops_the_login() {
    // The SNI and the name check follow `idp_authority`: a name not on the IdP's certificate is
    // refused like a wrong certificate.
    let (stack, idp_port) =
        start_with_https_idp(None, json!({ "idp_authority": OTHER_IDP_NAME })).await;
    assert_login_refused_by_tls(&stack, idp_port, "ssl.fail_verify_san").await;

    // The same gateway with the IdP's real name logs in (the certificate names idp.example.com).
    let (stack, idp_port) = start_with_https_idp(None, json!({ "idp_authority": IDP_HOST })).await;
    let b = browser(&stack, idp_port);
    let flow = stack.login(&b, &stack.url("/named")).await;
    assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());
}
