use super::*;
use serde_json::json;

const SECRET32: &str = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE="; // 32 bytes

fn base() -> serde_json::Value {
    json!({
        "issuer": "https://idp.example.com",
        "idp_cluster": "outbound|443||idp.example.com",
        "client_id": "gate",
        "client_secret": "s3cret",
        "cookie_secret": SECRET32,
        "hosts": ["app.example.com", "*.apps.example.com"],
    })
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn parse(v: &serde_json::Value) -> Result<Config, ConfigError> {
    Config::parse(v.to_string().as_bytes(), &no_env)
}

fn with(field: &str, value: serde_json::Value) -> serde_json::Value {
    let mut v = base();
    v[field] = value;
    v
}

fn without(field: &str) -> serde_json::Value {
    let mut v = base();
    v.as_object_mut().unwrap().remove(field);
    v
}

#[test]
fn accepts_minimal_config_with_defaults() {
    let c = parse(&base()).unwrap();
    assert_eq!(c.redirect_path, "/oauth2/callback");
    assert_eq!(c.logout_path, "/oauth2/sign_out");
    assert_eq!(c.scopes, vec!["openid", "email", "profile"]);
    assert_eq!(
        c.token_endpoint_auth_method,
        TokenEndpointAuthMethod::ClientSecretBasic
    );
    assert_eq!(c.upstream_authorization, UpstreamAuthorization::AccessToken);
    assert!(c.skip_paths.is_empty());
}

#[test]
fn names_unknown_field() {
    let e = parse(&with("isuer", json!("x"))).unwrap_err();
    assert_eq!(e.field, "isuer");
    assert!(e.to_string().contains("field `isuer`"), "{e}");
}

#[test]
fn names_field_with_wrong_type() {
    let e = parse(&with("hosts", json!("app.example.com"))).unwrap_err();
    assert_eq!(e.field, "hosts");
    let e = parse(&with("scopes", json!(["openid", 3]))).unwrap_err();
    assert!(e.field.starts_with("scopes"), "{e}");
    let e = parse(&with("upstream_authorization", json!("cookie"))).unwrap_err();
    assert_eq!(e.field, "upstream_authorization");
}

#[test]
fn names_missing_required_field() {
    for f in ["issuer", "idp_cluster", "client_id", "hosts"] {
        let e = parse(&without(f)).unwrap_err();
        assert!(e.to_string().contains(f), "{f}: {e}");
    }
}

#[test]
fn requires_exactly_one_secret_source() {
    let e = parse(&without("client_secret")).unwrap_err();
    assert_eq!(e.field, "client_secret");
    let e = parse(&with("client_secret_env", json!("X"))).unwrap_err();
    assert_eq!(e.field, "client_secret");
    let e = parse(&without("cookie_secret")).unwrap_err();
    assert_eq!(e.field, "cookie_secret");
}

#[test]
fn reads_secrets_from_environment() {
    let mut v = without("client_secret");
    v["client_secret_env"] = json!("CS");
    v.as_object_mut().unwrap().remove("cookie_secret");
    v["cookie_secret_env"] = json!("CK");
    let env = |k: &str| match k {
        "CS" => Some("from-env".to_string()),
        "CK" => Some(SECRET32.to_string()),
        _ => None,
    };
    let c = Config::parse(v.to_string().as_bytes(), &env).unwrap();
    assert_eq!(c.client_secret.expose(), "from-env");
    let e = Config::parse(v.to_string().as_bytes(), &no_env).unwrap_err();
    assert_eq!(e.field, "client_secret_env");
    assert!(e.reason.contains("not set"), "{e}");
}

#[test]
fn refuses_short_or_non_base64_cookie_secret() {
    let e = parse(&with("cookie_secret", json!("c2hvcnQ="))).unwrap_err();
    assert_eq!(e.field, "cookie_secret");
    assert!(e.reason.contains("32"));
    let e = parse(&with("cookie_secret", json!("not base64 !!"))).unwrap_err();
    assert_eq!(e.field, "cookie_secret");
}

#[test]
fn error_messages_never_contain_secret_values() {
    let e = parse(&with("cookie_secret", json!("c2hvcnQ="))).unwrap_err();
    assert!(!e.to_string().contains("c2hvcnQ"));
}

#[test]
fn hosts_match_exact_and_wildcard_ignoring_port_and_case() {
    let c = parse(&base()).unwrap();
    assert!(c.protects("app.example.com"));
    assert!(c.protects("APP.Example.com:443"));
    assert!(c.protects("app.example.com."));
    assert!(c.protects("a.apps.example.com"));
    assert!(c.protects("x.y.apps.example.com:8443"));
    assert!(!c.protects("apps.example.com"));
    assert!(!c.protects("evilapps.example.com"));
    assert!(!c.protects("app.example.com.evil.com"));
    assert!(!c.protects("other.example.com"));
}

// Envoy routes `app.example.com:x` under Istio's `app.example.com:*` domain: every spelling
// whose host is protected stays protected, whatever follows it (decide refuses the malformed).
#[test]
fn a_protected_host_with_any_port_text_is_protected() {
    let c = parse(&base()).unwrap();
    for authority in [
        "app.example.com:x",
        "app.example.com:443:443",
        "APP.example.com:abc",
        "app.example.com:-1",
        "app.example.com:",
        "app.example.com.:x",
        "a.apps.example.com:1:2",
    ] {
        assert!(c.protects(authority), "{authority}");
    }
    assert!(!c.protects("other.example.com:app.example.com"));
}

#[test]
fn ports_are_well_formed_only_as_one_to_five_digits() {
    for ok in [
        "app",
        "app:1",
        "app:443",
        "app:65535",
        "[::1]",
        "[::1]:8443",
        "app.:443",
    ] {
        assert!(port_is_well_formed(ok), "{ok}");
    }
    for bad in [
        "app:",
        "app:x",
        "app:443:443",
        "app:-1",
        "app:123456",
        "app: 443",
        "[::1]x",
        "[::1]:",
        "[::1]:a",
    ] {
        assert!(!port_is_well_formed(bad), "{bad}");
    }
}

#[test]
fn refuses_bad_host_patterns() {
    for bad in [
        "",
        "*",
        "a.*.com",
        "*example.com",
        "app example.com",
        "https://app.example.com",
        "app.example.com:x",
        "app.example.com:443:443",
    ] {
        let e = parse(&with("hosts", json!([bad]))).unwrap_err();
        assert_eq!(e.field, "hosts[0]", "{bad}");
    }
    let e = parse(&with("hosts", json!([]))).unwrap_err();
    assert_eq!(e.field, "hosts");
}

#[test]
fn accepts_float_numbers_as_istio_sends_them() {
    let c = parse(&with("session_max_age", json!(600.0))).unwrap();
    assert_eq!(c.session_max_age, 600);
    let e = parse(&with("session_max_age", json!(600.5))).unwrap_err();
    assert_eq!(e.field, "session_max_age");
    let e = parse(&with("session_max_age", json!(-1))).unwrap_err();
    assert_eq!(e.field, "session_max_age");
}

#[test]
fn session_idle_timeout_is_off_unless_set_and_shorter_than_the_session() {
    assert_eq!(parse(&base()).unwrap().session_idle_timeout, None);
    let c = parse(&with("session_idle_timeout", json!(900.0))).unwrap();
    assert_eq!(c.session_idle_timeout, Some(900));
    // The default session_max_age is a day.
    for bad in [
        json!(59),
        json!(86_400),
        json!(90_000),
        json!(-1),
        json!("900"),
    ] {
        let e = parse(&with("session_idle_timeout", bad.clone())).unwrap_err();
        assert_eq!(e.field, "session_idle_timeout", "{bad}");
    }
}

#[test]
fn openid_scope_is_always_first_and_unique() {
    let c = parse(&with(
        "scopes",
        json!(["email", "openid", "groups", "email"]),
    ))
    .unwrap();
    assert_eq!(c.scopes, vec!["openid", "email", "groups"]);
    let e = parse(&with("scopes", json!(["has space"]))).unwrap_err();
    assert_eq!(e.field, "scopes[0]");
}

#[test]
fn redirect_uri_sets_callback_path() {
    let mut v = with("redirect_uri", json!("https://APP.example.com:8443/cb"));
    v["hosts"] = json!(["app.example.com"]);
    let c = parse(&v).unwrap();
    assert_eq!(c.redirect_path, "/cb");
    let e = parse(&with("redirect_uri", json!("/relative"))).unwrap_err();
    assert_eq!(e.field, "redirect_uri");
}

/// Found in review: the login cookie is host-only, so a callback on another host never sees it,
/// and a callback host outside `hosts` would hand authorization codes to its upstream.
#[test]
fn redirect_uri_must_be_the_one_protected_host() {
    for hosts in [
        json!(["app.example.com"]),                      // not the callback's host
        json!(["login.example.com", "app.example.com"]), // logins from app would fail
        json!(["*.example.com"]),                        // likewise, any other match
    ] {
        let mut v = with("redirect_uri", json!("https://login.example.com/cb"));
        v["hosts"] = hosts.clone();
        let e = parse(&v).unwrap_err();
        assert_eq!(e.field, "redirect_uri", "{hosts}");
        assert!(e.to_string().contains("login.example.com"), "{e}");
        assert!(!e.to_string().contains("  "), "{e}");
    }
}

#[test]
fn paths_must_be_plain() {
    // Non-ASCII: request paths arrive ASCII (percent-encoded), so such a prefix never matches.
    for bad in [
        "relative",
        "/a?b",
        "/a%2f",
        "/a/../b",
        "/a//b",
        "/a;b",
        "/caf\u{e9}",
    ] {
        assert!(parse(&with("redirect_path", json!(bad))).is_err(), "{bad}");
        assert!(parse(&with("skip_paths", json!([bad]))).is_err(), "{bad}");
    }
    let e = parse(&with("skip_paths", json!(["/oauth2/"]))).unwrap_err();
    assert_eq!(e.field, "skip_paths");
}

#[test]
fn refuses_empty_and_non_object_configuration() {
    assert_eq!(Config::parse(b"", &no_env).unwrap_err().field, "(root)");
    assert!(Config::parse(b"[]", &no_env).is_err());
    assert!(Config::parse(b"{", &no_env).is_err());
}

#[test]
fn refuses_issuer_with_query() {
    let e = parse(&with("issuer", json!("https://idp.example.com/?x=1"))).unwrap_err();
    assert_eq!(e.field, "issuer");
    let e = parse(&with("issuer", json!("idp.example.com"))).unwrap_err();
    assert_eq!(e.field, "issuer");
}

#[test]
fn debug_output_redacts_secrets() {
    let c = parse(&base()).unwrap();
    let out = format!("{c:?}");
    assert!(!out.contains("s3cret"));
    assert!(!out.contains(SECRET32));
}

#[test]
fn refresh_unavailable_ends_sessions_unless_told_to_keep_them() {
    assert_eq!(
        parse(&base()).unwrap().refresh_unavailable,
        RefreshUnavailable::EndSession
    );
    let c = parse(&with("refresh_unavailable", json!("keep_session"))).unwrap();
    assert_eq!(c.refresh_unavailable, RefreshUnavailable::KeepSession);
    let e = parse(&with("refresh_unavailable", json!("keep"))).unwrap_err();
    assert_eq!(e.field, "refresh_unavailable");
}

#[test]
fn the_client_id_as_a_bearer_audience_is_accepted_with_a_warning() {
    let c = parse(&with(
        "bearer_tokens",
        json!({"audiences": ["api://orders", "gate"]}),
    ))
    .unwrap();
    let warnings = c.warnings();
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains("bearer_tokens.audiences") && warnings[0].contains("`gate`"));
    let c = parse(&with(
        "bearer_tokens",
        json!({"audiences": ["api://orders"]}),
    ))
    .unwrap();
    assert!(c.warnings().is_empty());
    assert!(parse(&base()).unwrap().warnings().is_empty());
}

/// Found in review: a claim (which users may edit at some IdPs) mapped to a framing or routing
/// header would let them shape the request the upstream parses.
#[test]
fn claims_cannot_set_credential_framing_or_routing_headers() {
    for header in [
        "Authorization",
        "cookie",
        "Content-Length",
        "transfer-encoding",
        "connection",
        "te",
        "upgrade",
        "x-forwarded-host",
        "forwarded",
        "x-envoy-original-path",
        "X-Envoy-Upstream-Rq-Timeout-Ms",
        "proxy-authorization",
        "sec-fetch-site",
        "origin",
        "x-forwarded-client-cert",
        "x-real-ip",
        "x-http-method-override",
        "x-auth-request-access-token",
    ] {
        let e = parse(&with("claims_to_headers", json!({ header: "email" }))).unwrap_err();
        assert_eq!(e.field, format!("claims_to_headers.{header}"));
    }
    let c = parse(&with(
        "claims_to_headers",
        json!({"x-auth-request-email": "email"}),
    ))
    .unwrap();
    assert_eq!(
        c.claims_to_headers,
        vec![("x-auth-request-email".to_string(), "email".to_string())]
    );
}

/// Found in review: the login cookie is `Secure`, so over plain http it comes back only to a
/// loopback host (and the code would travel in the clear); and a callback path the filter's own
/// paths would refuse can never match Envoy's normalised path.
#[test]
fn redirect_uri_is_https_but_on_loopback_and_its_path_plain() {
    let one_host = |uri: &str| {
        let mut v = with("redirect_uri", json!(uri));
        v["hosts"] = json!([url::Url::parse(uri).unwrap().host_str().unwrap()]);
        parse(&v)
    };
    for refused in [
        "http://app.example.com/cb",
        "https://app.example.com/a;b",
        "https://app.example.com/a%20b/cb",
        "https://app.example.com//cb",
    ] {
        assert_eq!(
            one_host(refused).unwrap_err().field,
            "redirect_uri",
            "{refused}"
        );
    }
    for accepted in [
        "http://localhost:8080/cb",
        "http://127.0.0.1/cb",
        "https://app.example.com/cb",
    ] {
        assert!(one_host(accepted).is_ok(), "{accepted}");
    }
}

/// Found in review: the IdP's redirect back after logout comes from another site, so on the
/// logout path it would get the confirmation page after every confirmation.
#[test]
fn post_logout_redirect_uri_is_not_the_logout_path() {
    let e = parse(&with(
        "post_logout_redirect_uri",
        json!("https://app.example.com/oauth2/sign_out"),
    ))
    .unwrap_err();
    assert_eq!(e.field, "post_logout_redirect_uri");
    assert!(parse(&with(
        "post_logout_redirect_uri",
        json!("https://app.example.com/bye")
    ))
    .is_ok());
}

#[test]
fn errors_in_secret_fields_never_show_the_value() {
    let numeric_secret = 918_273_645_012_345u64;
    for (field, value, shown) in [
        // A list given as one string, an easy slip during key rotation.
        (
            "previous_cookie_secrets",
            json!(SECRET32),
            SECRET32.to_string(),
        ),
        (
            "previous_cookie_secrets",
            json!([7, SECRET32]),
            "7".to_string(),
        ),
        // An all-digit secret left unquoted in YAML.
        (
            "client_secret",
            json!(numeric_secret),
            numeric_secret.to_string(),
        ),
        (
            "cookie_secret",
            json!(numeric_secret),
            numeric_secret.to_string(),
        ),
        ("cookie_secret", json!([SECRET32]), SECRET32.to_string()),
        // A secret that holds serde's own words.
        (
            "previous_cookie_secrets",
            json!("s3cret, expected b"),
            "expected b".to_string(),
        ),
        // The same slips where the name of the secret's variable belongs.
        (
            "previous_cookie_secrets_env",
            json!(SECRET32),
            SECRET32.to_string(),
        ),
        (
            "client_secret_env",
            json!(numeric_secret),
            numeric_secret.to_string(),
        ),
        (
            "cookie_secret_env",
            json!(numeric_secret),
            numeric_secret.to_string(),
        ),
    ] {
        let e = parse(&with(field, value.clone())).unwrap_err();
        let text = e.to_string();
        assert!(e.field.starts_with(field), "{value}: {text}");
        assert!(!text.contains(&shown), "{field} = {value}: {text}");
        assert!(text.contains("expected"), "{field} = {value}: {text}");
    }
    // Other fields still show what was wrong.
    let e = parse(&with("idp_cluster", json!(12345))).unwrap_err();
    assert!(e.to_string().contains("12345"), "{e}");
    // The secret itself pasted where the name of its variable belongs.
    for (field, value) in [
        ("client_secret_env", json!(SECRET32)),
        ("cookie_secret_env", json!(SECRET32)),
        ("previous_cookie_secrets_env", json!([SECRET32])),
    ] {
        let mut config = with(field, value);
        let own = field.trim_end_matches("_env");
        if own != "previous_cookie_secrets" {
            config.as_object_mut().unwrap().remove(own);
        }
        let e = parse(&config).unwrap_err();
        assert!(e.field.starts_with(field), "{e}");
        assert!(!e.to_string().contains(SECRET32), "{field}: {e}");
    }
}
