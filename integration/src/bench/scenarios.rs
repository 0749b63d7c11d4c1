//! The benchmark scenarios and their Envoy bootstraps.
//!
//! Every scenario is the same Istio-shaped gateway ([`GatewayConfig`]: TLS listener
//! `0.0.0.0_8443`, the gateway HCM settings and tail filters) with two changes that apply to all
//! of them alike: the route answers with a `direct_response` (no upstream, so the filter is what
//! is measured) and the access log is off. Only the authentication filter in front differs.

use std::path::Path;

use serde_json::{json, Value};

use crate::config::{self, GatewayConfig};
use crate::stack::{default_filter_config, CLIENT_ID, CLIENT_SECRET};
use crate::tls::CertFiles;

/// `aud` of the mock IdP's JWT access tokens (its default), accepted by scenarios 6.
pub const ACCESS_TOKEN_AUDIENCE: &str = "api://oidc-gate-demo";
/// The zero-work authorizer's cluster, named as Istio names an `oauth2-proxy` service.
pub const AUTHZ_CLUSTER: &str = "outbound|4180||oauth2-proxy.oauth2-proxy.svc.cluster.local";
/// Envoy OAuth2 filter callback path.
pub const OAUTH2_CALLBACK: &str = "/oauth2/callback";
/// The body every scenario's route answers with.
pub const DIRECT_RESPONSE_BODY: &str = "ok\n";
/// The path the load generator requests (protected: not a skip path of the filter).
pub const BENCH_PATH: &str = "/bench";

/// One measured configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scenario {
    /// (1) No authentication filter: the limit.
    Bare,
    /// (2) A wasm filter that reads one header and sets one: the floor of any wasm filter.
    NoopWasm,
    /// (2f) The no-op filter making exactly the host calls of oidc-gate's authenticated request
    /// and nothing else (read the header map, read the clock, remove `cookie`, add
    /// `authorization`): what any filter that swaps a session cookie for a bearer token pays,
    /// before its own code runs. Declared here so it runs next to (2).
    HostCallFloor,
    /// (3) oidc-gate with a valid session cookie from a real login.
    OidcSession,
    /// (3b) (3) with another oidc-gate module (`--oidc-b`): two builds compared in one run,
    /// interleaved like every scenario, and next to (3) in every round (declared here for the
    /// order). Never part of a default run.
    OidcSessionB,
    /// (4) Envoy's OAuth2 filter with valid cookies from a real login.
    EnvoyOAuth2,
    /// (5) `ext_authz` (HTTP) to an authorizer that answers 200 to everything.
    ExtAuthz,
    /// (6a) oidc-gate with a machine client's RS256 bearer JWT.
    OidcBearer,
    /// (6b) Envoy's `jwt_authn` on the same token (default: no verification cache).
    JwtAuthn,
    /// (6c) `jwt_authn` with `jwt_cache_config` (verified tokens cached), for reference.
    JwtAuthnCached,
}

impl Scenario {
    /// All scenarios, in report order.
    pub const ALL: [Scenario; 9] = [
        Scenario::Bare,
        Scenario::NoopWasm,
        Scenario::HostCallFloor,
        Scenario::OidcSession,
        Scenario::EnvoyOAuth2,
        Scenario::ExtAuthz,
        Scenario::OidcBearer,
        Scenario::JwtAuthn,
        Scenario::JwtAuthnCached,
    ];

    /// Short id used on the command line and in JSON (`1-bare`, …).
    pub fn id(self) -> &'static str {
        match self {
            Scenario::Bare => "1-bare",
            Scenario::NoopWasm => "2-noop-wasm",
            Scenario::HostCallFloor => "2f-host-call-floor",
            Scenario::OidcSession => "3-oidc-gate-session",
            Scenario::EnvoyOAuth2 => "4-envoy-oauth2",
            Scenario::ExtAuthz => "5-ext-authz",
            Scenario::OidcBearer => "6a-oidc-gate-bearer",
            Scenario::JwtAuthn => "6b-jwt-authn",
            Scenario::JwtAuthnCached => "6c-jwt-authn-cached",
            Scenario::OidcSessionB => "3b-oidc-gate-session-b",
        }
    }

    /// Human label.
    pub fn label(self) -> &'static str {
        match self {
            Scenario::Bare => "bare Envoy (direct_response)",
            Scenario::NoopWasm => "no-op wasm filter",
            Scenario::HostCallFloor => "no-op wasm, oidc-gate's host calls",
            Scenario::OidcSession => "oidc-gate, session cookie",
            Scenario::EnvoyOAuth2 => "Envoy oauth2 filter, cookies",
            Scenario::ExtAuthz => "ext_authz HTTP, zero-work authorizer",
            Scenario::OidcBearer => "oidc-gate, bearer JWT (RS256)",
            Scenario::JwtAuthn => "jwt_authn, same JWT",
            Scenario::JwtAuthnCached => "jwt_authn + jwt_cache, same JWT",
            Scenario::OidcSessionB => "oidc-gate module B, session cookie",
        }
    }

    /// Parse an id (`1-bare`), its number (`1`, `6a`) or the name after the number (`bare`).
    pub fn parse(s: &str) -> Option<Scenario> {
        let s = s.trim().to_ascii_lowercase();
        Scenario::ALL
            .into_iter()
            .chain([Scenario::OidcSessionB])
            .find(|sc| {
                let id = sc.id();
                let (num, name) = id.split_once('-').unwrap_or((id, id));
                s == id || s == num || s == name
            })
    }

    /// Whether the scenario's requests carry the oidc-gate session cookie.
    pub fn uses_session_cookie(self) -> bool {
        matches!(
            self,
            Scenario::Bare
                | Scenario::NoopWasm
                | Scenario::HostCallFloor
                | Scenario::OidcSession
                | Scenario::OidcSessionB
                | Scenario::ExtAuthz
        )
    }

    /// Whether the scenario's requests carry the bearer JWT.
    pub fn uses_bearer(self) -> bool {
        matches!(
            self,
            Scenario::OidcBearer | Scenario::JwtAuthn | Scenario::JwtAuthnCached
        )
    }

    /// Whether the scenario refuses requests without credentials (checked before measuring).
    /// Not `ext_authz`: its authorizer allows everything (its calls are counted instead).
    pub fn authenticates(self) -> bool {
        !matches!(
            self,
            Scenario::Bare | Scenario::NoopWasm | Scenario::ExtAuthz
        )
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id())
    }
}

/// What the bootstraps need to know about the environment.
#[derive(Clone, Debug)]
pub struct ConfigInputs<'a> {
    /// oidc-gate module.
    pub oidc_wasm: &'a Path,
    /// The other oidc-gate module of (3b), if any.
    pub oidc_b_wasm: Option<&'a Path>,
    /// The no-op module.
    pub noop_wasm: &'a Path,
    /// Its extra work per request (calibration), if any.
    pub noop_extra: Option<&'a str>,
    /// Serving certificate.
    pub cert: &'a CertFiles,
    /// Mock IdP issuer (`http://127.0.0.1:<port>`).
    pub issuer: &'a str,
    /// Mock IdP port.
    pub idp_port: u16,
    /// Mock IdP JWKS (for `jwt_authn`'s `local_jwks`).
    pub jwks: &'a Value,
    /// oidc-gate cookie secret (base64).
    pub cookie_secret: &'a str,
    /// Envoy OAuth2 filter HMAC secret.
    pub hmac_secret: &'a str,
    /// Port of the zero-work authorizer.
    pub authz_port: u16,
}

/// The oidc-gate configuration used by every oidc-gate scenario (sessions and bearer JWTs).
pub fn oidc_filter_config(issuer: &str, idp_cluster: &str) -> Value {
    let mut c = default_filter_config(issuer, idp_cluster);
    config::merge(
        &mut c,
        &json!({ "bearer_tokens": { "audiences": [ACCESS_TOKEN_AUDIENCE] } }),
    );
    c
}

/// The gateway with the scenario's filter, `concurrency`-independent.
pub fn bootstrap(s: Scenario, inp: &ConfigInputs<'_>, dir: &Path) -> Value {
    let mut gw = GatewayConfig::new(
        inp.oidc_wasm.to_path_buf(),
        inp.cert.clone(),
        inp.idp_port,
        inp.idp_port,
    );
    gw.wasm_filter = matches!(
        s,
        Scenario::NoopWasm
            | Scenario::HostCallFloor
            | Scenario::OidcSession
            | Scenario::OidcSessionB
            | Scenario::OidcBearer
    );
    match s {
        Scenario::NoopWasm => {
            gw.wasm = inp.noop_wasm.to_path_buf();
            gw.plugin_config = inp.noop_extra.map(|w| config::istio_plugin_json(&json!(w)));
        }
        Scenario::HostCallFloor => {
            gw.wasm = inp.noop_wasm.to_path_buf();
            gw.plugin_config = Some(config::istio_plugin_json(&json!("session_floor=1")));
        }
        Scenario::OidcSession | Scenario::OidcSessionB | Scenario::OidcBearer => {
            if let (Scenario::OidcSessionB, Some(b)) = (s, inp.oidc_b_wasm) {
                gw.wasm = b.to_path_buf();
            }
            gw.env
                .insert("OIDC_CLIENT_SECRET".into(), CLIENT_SECRET.into());
            gw.env
                .insert("OIDC_COOKIE_SECRET".into(), inp.cookie_secret.into());
            let c = oidc_filter_config(inp.issuer, &gw.idp_cluster());
            gw.plugin_config = Some(config::istio_plugin_json(&c));
        }
        _ => {}
    }
    let idp_cluster = gw.idp_cluster();
    let mut b = gw.bootstrap(None, &dir.join("access.log"));
    {
        let hcm = &mut b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"];
        if let Some(m) = hcm.as_object_mut() {
            m.remove("access_log");
        }
        hcm["route_config"]["virtual_hosts"][0]["routes"] = json!([{
            "match": { "prefix": "/" },
            "direct_response": { "status": 200, "body": { "inline_string": DIRECT_RESPONSE_BODY } },
        }]);
        let front = match s {
            Scenario::EnvoyOAuth2 => Some(oauth2_filter(inp.issuer, &idp_cluster)),
            Scenario::ExtAuthz => Some(ext_authz_filter(inp.authz_port)),
            Scenario::JwtAuthn => Some(jwt_authn_filter(inp.issuer, inp.jwks, false)),
            Scenario::JwtAuthnCached => Some(jwt_authn_filter(inp.issuer, inp.jwks, true)),
            _ => None,
        };
        if let (Some(f), Some(filters)) = (front, hcm["http_filters"].as_array_mut()) {
            filters.insert(0, f);
        }
    }
    match s {
        Scenario::EnvoyOAuth2 => {
            b["static_resources"]["secrets"] = json!([
                { "name": "oauth2-token", "generic_secret": { "secret": { "inline_string": CLIENT_SECRET } } },
                { "name": "oauth2-hmac", "generic_secret": { "secret": { "inline_string": inp.hmac_secret } } },
            ]);
        }
        Scenario::ExtAuthz => {
            if let Some(clusters) = b["static_resources"]["clusters"].as_array_mut() {
                clusters.push(config::static_cluster(AUTHZ_CLUSTER, inp.authz_port));
            }
        }
        _ => {}
    }
    b
}

/// `envoy.filters.http.oauth2` against the mock IdP: client secret and HMAC secret as static
/// generic secrets, PKCE and refresh on (Envoy's defaults), the bearer token forwarded.
pub fn oauth2_filter(issuer: &str, idp_cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.http.oauth2",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.oauth2.v3.OAuth2",
            "config": {
                "token_endpoint": {
                    "cluster": idp_cluster,
                    "uri": format!("{issuer}/token"),
                    "timeout": "5s",
                },
                "authorization_endpoint": format!("{issuer}/authorize"),
                "redirect_uri": format!("https://%REQ(:authority)%{OAUTH2_CALLBACK}"),
                "redirect_path_matcher": { "path": { "exact": OAUTH2_CALLBACK } },
                "signout_path": { "path": { "exact": "/oauth2/signout" } },
                "credentials": {
                    "client_id": CLIENT_ID,
                    "token_secret": { "name": "oauth2-token" },
                    "hmac_secret": { "name": "oauth2-hmac" },
                },
                "auth_scopes": ["openid", "profile", "email"],
                "forward_bearer_token": true,
            },
        },
    })
}

/// `envoy.filters.http.ext_authz` (HTTP service), configured as Istio's CUSTOM action for
/// oauth2-proxy: the `cookie` header goes to the authorizer, `authorization` may come back.
pub fn ext_authz_filter(port: u16) -> Value {
    json!({
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "failure_mode_allow": false,
            "http_service": {
                "server_uri": {
                    "uri": format!("http://127.0.0.1:{port}"),
                    "cluster": AUTHZ_CLUSTER,
                    "timeout": "2s",
                },
                "authorization_request": {
                    "allowed_headers": { "patterns": [{ "exact": "cookie" }] },
                },
                "authorization_response": {
                    "allowed_upstream_headers": { "patterns": [{ "exact": "authorization" }] },
                },
            },
        },
    })
}

/// `envoy.filters.http.jwt_authn` with the mock IdP's JWKS inline; `cached` adds
/// `jwt_cache_config` (Envoy then skips the signature check for a token it verified before).
pub fn jwt_authn_filter(issuer: &str, jwks: &Value, cached: bool) -> Value {
    let mut provider = json!({
        "issuer": issuer,
        "audiences": [ACCESS_TOKEN_AUDIENCE],
        "local_jwks": { "inline_string": jwks.to_string() },
        "forward": true,
    });
    if cached {
        provider["jwt_cache_config"] = json!({ "jwt_cache_size": 1000 });
    }
    json!({
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": { "mock-idp": provider },
            "rules": [{ "match": { "prefix": "/" }, "requires": { "provider_name": "mock-idp" } }],
        },
    })
}
