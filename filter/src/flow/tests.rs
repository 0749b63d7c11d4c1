use std::sync::Arc;

use mock_idp::{IdpState, MockIdpConfig};
use serde_json::json;

use super::*;
use crate::types::testing::SeededRandom;

const ISS: &str = "https://idp.example.com";
const NOW: u64 = 1_800_000_000;
const COOKIE_SECRET: &str = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";

fn gate_with(extra: serde_json::Value) -> Gate {
    let mut cfg = json!({
        "issuer": ISS,
        "idp_cluster": "outbound|443||idp.example.com",
        "client_id": "gate",
        "client_secret": "gate-secret",
        "cookie_secret": COOKIE_SECRET,
        "hosts": ["app.example.com"],
        "skip_paths": ["/healthz", "/public/"],
        "post_logout_redirect_uri": "https://app.example.com/bye",
    });
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    Gate::new(Config::parse(cfg.to_string().as_bytes(), &|_| None).unwrap())
}

fn gate() -> Gate {
    gate_with(json!({}))
}

fn provider() -> ProviderMetadata {
    ProviderMetadata::parse(
        json!({
            "issuer": ISS,
            "authorization_endpoint": "https://idp.example.com/authorize",
            "token_endpoint": "https://idp.example.com/token",
            "jwks_uri": "https://idp.example.com/keys",
            "end_session_endpoint": "https://idp.example.com/logout",
            "authorization_response_iss_parameter_supported": true
        })
        .to_string()
        .as_bytes(),
        ISS,
    )
    .unwrap()
}

fn browser<'a>(path: &'a str, cookies: Vec<&'a str>) -> Request<'a> {
    Request {
        method: "GET",
        scheme: "https",
        authority: "app.example.com",
        path,
        cookie_headers: cookies,
        sec_fetch_mode: Some("navigate"),
        has_sec_fetch: true,
        accept: Some("text/html"),
        request_id: Some("rid-1"),
    }
}

fn header<'a>(r: &'a Reply, name: &str) -> Vec<&'a str> {
    r.headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

fn cookie_pair(set_cookie: &str) -> (String, String) {
    let pair = set_cookie.split(';').next().unwrap();
    let (n, v) = pair.split_once('=').unwrap();
    (n.to_string(), v.to_string())
}

fn expect_reply(d: (Decision, Note)) -> Reply {
    match d.0 {
        Decision::Reply(r) => r,
        other => panic!("expected a reply, got {other:?}"),
    }
}

struct Login {
    state: String,
    nonce: String,
    challenge: String,
    cookie: String,
}

fn start_login(g: &Gate, path: &str, rng: &mut SeededRandom) -> Login {
    let r = expect_reply(g.decide(&browser(path, vec![]), Some(&provider()), NOW, rng));
    assert_eq!(r.status, 302);
    let location = Url::parse(header(&r, "location")[0]).unwrap();
    let q: std::collections::HashMap<_, _> = location.query_pairs().into_owned().collect();
    let set = header(&r, "set-cookie");
    let (name, value) = cookie_pair(set[0]);
    Login {
        state: q["state"].clone(),
        nonce: q["nonce"].clone(),
        challenge: q["code_challenge"].clone(),
        cookie: format!("{name}={value}"),
    }
}

#[test]
fn unauthenticated_navigation_redirects_to_idp_with_pkce_state_nonce() {
    let g = gate();
    let mut rng = SeededRandom(1);
    let r = expect_reply(g.decide(
        &browser("/app?x=1", vec![]),
        Some(&provider()),
        NOW,
        &mut rng,
    ));
    assert_eq!(r.status, 302);
    let loc = Url::parse(header(&r, "location")[0]).unwrap();
    assert_eq!(loc.host_str(), Some("idp.example.com"));
    assert_eq!(loc.path(), "/authorize");
    let q: std::collections::HashMap<_, _> = loc.query_pairs().into_owned().collect();
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], "gate");
    assert_eq!(q["redirect_uri"], "https://app.example.com/oauth2/callback");
    assert_eq!(q["scope"], "openid email profile");
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["code_challenge"].len(), 43);
    assert!(q["state"].len() >= 32 && q["nonce"].len() >= 32);
    assert!(!q.contains_key("code_verifier") && !q.contains_key("client_secret"));
    let set = header(&r, "set-cookie");
    assert!(set[0].starts_with(LOGIN_COOKIE_PREFIX));
    for attr in [
        "Secure",
        "HttpOnly",
        "SameSite=Lax",
        "Path=/",
        "Max-Age=600",
    ] {
        assert!(set[0].contains(attr), "{attr}");
    }
    assert!(!set[0].contains("Domain"));
    assert_eq!(header(&r, "cache-control"), vec!["no-store"]);
}

#[test]
fn login_values_are_unique_per_attempt() {
    let g = gate();
    let mut rng = SeededRandom(2);
    let mut states = std::collections::HashSet::new();
    let mut nonces = std::collections::HashSet::new();
    let mut challenges = std::collections::HashSet::new();
    for _ in 0..100 {
        let l = start_login(&g, "/", &mut rng);
        assert!(states.insert(l.state) && nonces.insert(l.nonce) && challenges.insert(l.challenge));
    }
}

#[test]
fn api_requests_get_401_not_redirect() {
    let g = gate();
    let mut rng = SeededRandom(3);
    let mut req = browser("/api/x", vec![]);
    req.sec_fetch_mode = Some("cors");
    let r = expect_reply(g.decide(&req, Some(&provider()), NOW, &mut rng));
    assert_eq!(r.status, 401);
    req.sec_fetch_mode = None;
    req.has_sec_fetch = false;
    req.accept = Some("application/json");
    let r = expect_reply(g.decide(&req, Some(&provider()), NOW, &mut rng));
    assert_eq!(r.status, 401);
    // Without Sec-Fetch headers, an HTML Accept counts as a navigation.
    req.accept = Some("text/html,application/xhtml+xml");
    assert_eq!(
        expect_reply(g.decide(&req, Some(&provider()), NOW, &mut rng)).status,
        302
    );
}

#[test]
fn other_hosts_pass_untouched() {
    let g = gate();
    let mut rng = SeededRandom(4);
    let mut req = browser("/", vec!["__Host-oidc-gate=x"]);
    req.authority = "other.example.com";
    assert!(matches!(
        g.decide(&req, None, NOW, &mut rng).0,
        Decision::PassThrough
    ));
}

#[test]
fn skip_paths_forward_without_identity_and_without_our_cookies() {
    let g = gate();
    let mut rng = SeededRandom(5);
    let req = browser("/healthz", vec!["a=1; __Host-oidc-gate=x"]);
    match g.decide(&req, None, NOW, &mut rng).0 {
        Decision::Forward(f) => {
            assert_eq!(f.authorization, None);
            assert_eq!(f.cookie.as_deref(), Some("a=1"));
        }
        other => panic!("{other:?}"),
    }
    let req = browser("/public/../secret", vec![]);
    assert!(matches!(
        g.decide(&req, None, NOW, &mut rng).0,
        Decision::NeedProvider
    ));
}

#[test]
fn login_needs_provider_but_sessions_do_not() {
    let g = gate();
    let mut rng = SeededRandom(6);
    assert!(matches!(
        g.decide(&browser("/", vec![]), None, NOW, &mut rng).0,
        Decision::NeedProvider
    ));
}

fn callback_path(login: &Login, code: &str) -> String {
    format!(
        "/oauth2/callback?{}",
        form_encode(&[("code", code), ("state", &login.state), ("iss", ISS)])
    )
}

#[test]
fn callback_with_valid_state_exchanges_the_code() {
    let g = gate();
    let mut rng = SeededRandom(7);
    let login = start_login(&g, "/deep/page?q=1", &mut rng);
    let path = callback_path(&login, "the-code");
    let req = browser(&path, vec![&login.cookie]);
    match g.decide(&req, Some(&provider()), NOW, &mut rng).0 {
        Decision::ExchangeCode { call, pending } => {
            assert_eq!(call.method, "POST");
            assert_eq!(call.path, "/token");
            assert_eq!(call.authority, "idp.example.com");
            let body = String::from_utf8(call.body.clone()).unwrap();
            let form: std::collections::HashMap<_, _> = form_urlencoded::parse(body.as_bytes())
                .into_owned()
                .collect();
            assert_eq!(form["grant_type"], "authorization_code");
            assert_eq!(form["code"], "the-code");
            assert_eq!(
                form["redirect_uri"],
                "https://app.example.com/oauth2/callback"
            );
            let verifier = &form["code_verifier"];
            assert_eq!(
                URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())),
                login.challenge
            );
            assert!(!form.contains_key("client_secret"));
            let auth = call
                .headers
                .iter()
                .find(|(k, _)| k == "authorization")
                .unwrap();
            assert_eq!(
                auth.1,
                format!("Basic {}", STANDARD.encode("gate:gate-secret"))
            );
            assert_eq!(pending.return_to, "/deep/page?q=1");
            assert!(!format!("{call:?}").contains("the-code"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn client_secret_post_puts_credentials_in_the_body() {
    let g = gate_with(json!({"token_endpoint_auth_method": "client_secret_post"}));
    let mut rng = SeededRandom(8);
    let login = start_login(&g, "/", &mut rng);
    let path = callback_path(&login, "c");
    match g
        .decide(
            &browser(&path, vec![&login.cookie]),
            Some(&provider()),
            NOW,
            &mut rng,
        )
        .0
    {
        Decision::ExchangeCode { call, .. } => {
            let body = String::from_utf8(call.body).unwrap();
            assert!(body.contains("client_id=gate") && body.contains("client_secret=gate-secret"));
            assert!(!call.headers.iter().any(|(k, _)| k == "authorization"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn callback_rejections_never_call_the_token_endpoint() {
    let g = gate();
    let mut rng = SeededRandom(9);
    let login = start_login(&g, "/", &mut rng);
    let other = start_login(&g, "/", &mut rng);
    let wrong_state = format!("{}.{}", login.state.split('.').next().unwrap(), "forged");
    let cases: Vec<(String, Vec<&str>, u16)> = vec![
        ("/oauth2/callback".into(), vec![&login.cookie], 400),
        ("/oauth2/callback?invalid;format".into(), vec![&login.cookie], 400),
        (format!("/oauth2/callback?code=c&iss={ISS}"), vec![&login.cookie], 400),
        (format!("/oauth2/callback?state={}&iss={ISS}", login.state), vec![&login.cookie], 400),
        (format!("/oauth2/callback?code=c&state={wrong_state}&iss={ISS}"), vec![&login.cookie], 400),
        (callback_path(&login, "c"), vec![], 400),
        (callback_path(&login, "c"), vec![&other.cookie], 400),
        (format!("{}&state={}", callback_path(&login, "c"), login.state), vec![&login.cookie], 400),
        (format!("{}&code=d", callback_path(&login, "c")), vec![&login.cookie], 400),
        (format!("{}&iss=x", callback_path(&login, "c")), vec![&login.cookie], 400),
        (format!("/oauth2/callback?code=c&state={}&iss=https://attacker.example", login.state), vec![&login.cookie], 400),
        (format!("/oauth2/callback?code=c&state={}&iss={ISS}/", login.state), vec![&login.cookie], 400),
        (format!("/oauth2/callback?code=c&state={}", login.state), vec![&login.cookie], 400),
        (
            format!("/oauth2/callback?error=access_denied&error_description=%3Cscript%3E&state={}&iss={ISS}", login.state),
            vec![&login.cookie],
            403,
        ),
    ];
    for (path, cookies, status) in cases {
        let r = expect_reply(g.decide(&browser(&path, cookies), Some(&provider()), NOW, &mut rng));
        assert_eq!(r.status, status, "{path}");
        assert!(!r.body.contains("<script>"));
        assert!(
            header(&r, "set-cookie")
                .iter()
                .all(|c| !c.starts_with("__Host-oidc-gate=")),
            "{path}"
        );
    }
}

#[test]
fn tampered_or_expired_login_cookie_is_rejected() {
    let g = gate();
    let mut rng = SeededRandom(10);
    let login = start_login(&g, "/", &mut rng);
    let path = callback_path(&login, "c");
    let mut tampered = login.cookie.clone().into_bytes();
    let last = tampered.len() - 5;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let r = expect_reply(g.decide(
        &browser(&path, vec![&tampered]),
        Some(&provider()),
        NOW,
        &mut rng,
    ));
    assert_eq!(r.status, 400);
    let r = expect_reply(g.decide(
        &browser(&path, vec![&login.cookie]),
        Some(&provider()),
        NOW + 601,
        &mut rng,
    ));
    assert_eq!(r.status, 400);
}

struct Idp(Arc<IdpState>);

impl Idp {
    fn new() -> Self {
        Self(IdpState::new(MockIdpConfig {
            issuer: Some(ISS.into()),
            ..Default::default()
        }))
    }
    fn jwks(&self) -> Jwks {
        Jwks::parse(self.0.jwks().to_string().as_bytes()).unwrap()
    }
    fn id_token(&self, nonce: &str) -> String {
        self.0.sign_jwt(
            json!({}),
            json!({"iss": ISS, "sub": "user-1", "aud": "gate", "exp": NOW + 300, "iat": NOW, "nonce": nonce, "email": "u@example.com"}),
        )
    }
    fn token_body(&self, nonce: &str) -> Vec<u8> {
        json!({"access_token": "access-abc", "token_type": "Bearer", "expires_in": 300, "id_token": self.id_token(nonce), "refresh_token": "r1"})
            .to_string()
            .into_bytes()
    }
}

fn pending_for(g: &Gate, login: &Login, rng: &mut SeededRandom) -> PendingLogin {
    let path = callback_path(login, "c");
    match g
        .decide(
            &browser(&path, vec![&login.cookie]),
            Some(&provider()),
            NOW,
            rng,
        )
        .0
    {
        Decision::ExchangeCode { pending, .. } => pending,
        other => panic!("{other:?}"),
    }
}

fn logged_in(g: &Gate, idp: &Idp, rng: &mut SeededRandom) -> String {
    let login = start_login(g, "/start?x=1", rng);
    let pending = pending_for(g, &login, rng);
    let (step, _) = g.complete_login(
        &pending,
        200,
        &idp.token_body(&login.nonce),
        Keys {
            jwks: Some(&idp.jwks()),
            may_refetch: true,
        },
        NOW,
        rng,
    );
    let LoginStep::Done(r) = step else {
        panic!("needs keys")
    };
    assert_eq!(r.status, 302);
    assert_eq!(
        header(&r, "location"),
        vec!["https://app.example.com/start?x=1"]
    );
    let set = header(&r, "set-cookie");
    let session = set
        .iter()
        .find(|c| c.starts_with("__Host-oidc-gate="))
        .unwrap();
    for attr in ["Secure", "HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(session.contains(attr));
    }
    assert!(set
        .iter()
        .any(|c| c.starts_with(LOGIN_COOKIE_PREFIX) && c.contains("Max-Age=0")));
    let (n, v) = cookie_pair(session);
    format!("{n}={v}")
}

#[test]
fn completed_login_forwards_the_access_token_and_strips_client_authorization() {
    let g = gate();
    let idp = Idp::new();
    let mut rng = SeededRandom(11);
    let session = logged_in(&g, &idp, &mut rng);
    let cookie = format!("theme=dark; {session}");
    let req = browser("/headers", vec![&cookie]);
    match g.decide(&req, None, NOW + 10, &mut rng).0 {
        Decision::Forward(f) => {
            assert_eq!(f.authorization.as_deref(), Some("Bearer access-abc"));
            assert_eq!(f.cookie.as_deref(), Some("theme=dark"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn upstream_authorization_modes() {
    let idp = Idp::new();
    let mut rng = SeededRandom(12);
    for (mode, expect_id) in [("id_token", true), ("none", false)] {
        let g = gate_with(json!({"upstream_authorization": mode}));
        let session = logged_in(&g, &idp, &mut rng);
        match g
            .decide(&browser("/", vec![&session]), None, NOW, &mut rng)
            .0
        {
            Decision::Forward(f) => match f.authorization {
                Some(a) => assert!(expect_id && a.starts_with("Bearer eyJ")),
                None => assert!(!expect_id),
            },
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn id_token_problems_end_the_login_with_502() {
    let g = gate();
    let idp = Idp::new();
    let mut rng = SeededRandom(13);
    let login = start_login(&g, "/", &mut rng);
    let pending = pending_for(&g, &login, &mut rng);
    let cases: Vec<(u16, Vec<u8>)> = vec![
        (200, idp.token_body("wrong-nonce")),
        (500, b"{}".to_vec()),
        (200, b"<html>".to_vec()),
        (200, b"{\"access_token\":\"a\"".to_vec()),
        (200, json!({"access_token": "a", "token_type": "mac", "id_token": idp.id_token(&login.nonce)}).to_string().into_bytes()),
        (200, json!({"token_type": "Bearer", "id_token": idp.id_token(&login.nonce)}).to_string().into_bytes()),
        (200, json!({"access_token": "a", "token_type": "Bearer"}).to_string().into_bytes()),
        (200, json!({"access_token": "a", "token_type": "Bearer", "expires_in": -1, "id_token": idp.id_token(&login.nonce)}).to_string().into_bytes()),
        (200, json!({"access_token": 5, "token_type": "Bearer", "id_token": idp.id_token(&login.nonce)}).to_string().into_bytes()),
    ];
    for (status, body) in cases {
        let (step, note) = g.complete_login(
            &pending,
            status,
            &body,
            Keys {
                jwks: Some(&idp.jwks()),
                may_refetch: false,
            },
            NOW,
            &mut rng,
        );
        let LoginStep::Done(r) = step else {
            panic!("unexpected NeedKeys")
        };
        assert_eq!(r.status, 502, "{note:?}");
        assert!(header(&r, "set-cookie")
            .iter()
            .all(|c| !c.starts_with("__Host-oidc-gate=")));
    }
}

#[test]
fn token_type_is_case_insensitive_and_expires_in_optional() {
    let g = gate();
    let idp = Idp::new();
    let mut rng = SeededRandom(14);
    let login = start_login(&g, "/", &mut rng);
    let pending = pending_for(&g, &login, &mut rng);
    let body = json!({"access_token": "a", "token_type": "bEARER", "id_token": idp.id_token(&login.nonce)}).to_string();
    let (step, _) = g.complete_login(
        &pending,
        200,
        body.as_bytes(),
        Keys {
            jwks: Some(&idp.jwks()),
            may_refetch: false,
        },
        NOW,
        &mut rng,
    );
    let LoginStep::Done(r) = step else { panic!() };
    assert_eq!(r.status, 302);
}

#[test]
fn unknown_key_asks_for_a_jwks_refetch_once() {
    let g = gate();
    let idp = Idp::new();
    let mut rng = SeededRandom(15);
    let old_keys = idp.jwks();
    idp.0.rotate_keys();
    let login = start_login(&g, "/", &mut rng);
    let pending = pending_for(&g, &login, &mut rng);
    let body = idp.token_body(&login.nonce);
    let (step, _) = g.complete_login(
        &pending,
        200,
        &body,
        Keys {
            jwks: Some(&old_keys),
            may_refetch: true,
        },
        NOW,
        &mut rng,
    );
    assert!(matches!(step, LoginStep::NeedKeys));
    let (step, _) = g.complete_login(
        &pending,
        200,
        &body,
        Keys {
            jwks: Some(&old_keys),
            may_refetch: false,
        },
        NOW,
        &mut rng,
    );
    assert!(matches!(step, LoginStep::Done(ref r) if r.status == 502));
    let (step, _) = g.complete_login(
        &pending,
        200,
        &body,
        Keys {
            jwks: Some(&idp.jwks()),
            may_refetch: false,
        },
        NOW,
        &mut rng,
    );
    assert!(matches!(step, LoginStep::Done(ref r) if r.status == 302));
}

#[test]
fn tampered_expired_or_foreign_sessions_start_a_new_login() {
    let g = gate();
    let idp = Idp::new();
    let mut rng = SeededRandom(16);
    let session = logged_in(&g, &idp, &mut rng);
    let (name, value) = session.split_once('=').unwrap();
    let mut bytes = value.as_bytes().to_vec();
    bytes[20] = if bytes[20] == b'A' { b'B' } else { b'A' };
    let tampered = format!("{name}={}", String::from_utf8(bytes).unwrap());
    let truncated = format!("{name}={}", &value[..value.len() - 4]);
    for (cookie, now) in [
        (tampered.as_str(), NOW),
        (truncated.as_str(), NOW),
        (session.as_str(), NOW + 301),
    ] {
        let r = expect_reply(g.decide(
            &browser("/", vec![cookie]),
            Some(&provider()),
            now,
            &mut rng,
        ));
        assert_eq!(r.status, 302);
        assert!(header(&r, "set-cookie")
            .iter()
            .any(|c| c.starts_with("__Host-oidc-gate=;") && c.contains("Max-Age=0")));
    }
    let mut other_host = browser("/", vec![&session]);
    other_host.authority = "app.example.com:8443";
    assert!(
        matches!(
            g.decide(&other_host, None, NOW, &mut rng).0,
            Decision::Forward(_)
        ),
        "port is not part of the host"
    );
    let g2 = gate_with(json!({"hosts": ["*.example.com"]}));
    let mut foreign = browser("/", vec![&session]);
    foreign.authority = "b.example.com";
    assert_eq!(
        expect_reply(g2.decide(&foreign, Some(&provider()), NOW, &mut rng)).status,
        302
    );
}

#[test]
fn duplicate_session_cookies_are_not_trusted() {
    let g = gate();
    let idp = Idp::new();
    let mut rng = SeededRandom(17);
    let session = logged_in(&g, &idp, &mut rng);
    let req = browser("/", vec![&session, "__Host-oidc-gate=planted"]);
    assert_eq!(
        expect_reply(g.decide(&req, Some(&provider()), NOW, &mut rng)).status,
        302
    );
}

#[test]
fn logout_clears_cookies_and_goes_to_end_session_with_hint() {
    let g = gate();
    let idp = Idp::new();
    let mut rng = SeededRandom(18);
    let session = logged_in(&g, &idp, &mut rng);
    let pending = start_login(&g, "/", &mut rng);
    let r = expect_reply(g.decide(
        &browser("/oauth2/sign_out", vec![&session, &pending.cookie]),
        Some(&provider()),
        NOW,
        &mut rng,
    ));
    assert_eq!(r.status, 302);
    let loc = Url::parse(header(&r, "location")[0]).unwrap();
    assert_eq!(loc.path(), "/logout");
    let q: std::collections::HashMap<_, _> = loc.query_pairs().into_owned().collect();
    assert!(q["id_token_hint"].starts_with("eyJ"));
    assert_eq!(q["client_id"], "gate");
    assert_eq!(q["post_logout_redirect_uri"], "https://app.example.com/bye");
    let set = header(&r, "set-cookie");
    assert!(set
        .iter()
        .any(|c| c.starts_with("__Host-oidc-gate=;") && c.contains("Max-Age=0")));
    assert!(set
        .iter()
        .any(|c| c.starts_with(LOGIN_COOKIE_PREFIX) && c.contains("Max-Age=0")));
}

#[test]
fn logout_without_end_session_goes_home() {
    let g = gate();
    let mut p = provider();
    p.end_session_endpoint = None;
    let mut rng = SeededRandom(19);
    let r = expect_reply(g.decide(
        &browser("/oauth2/sign_out", vec![]),
        Some(&p),
        NOW,
        &mut rng,
    ));
    assert_eq!(header(&r, "location"), vec!["/"]);
}

#[test]
fn return_url_cannot_leave_the_origin() {
    let g = gate();
    let idp = Idp::new();
    let mut rng = SeededRandom(20);
    for evil in [
        "//evil.com/x",
        "/\\evil.com",
        "/%5cevil.com",
        "/%2f%2fevil.com",
    ] {
        let login = start_login(&g, evil, &mut rng);
        let pending = pending_for(&g, &login, &mut rng);
        let (step, _) = g.complete_login(
            &pending,
            200,
            &idp.token_body(&login.nonce),
            Keys {
                jwks: Some(&idp.jwks()),
                may_refetch: false,
            },
            NOW,
            &mut rng,
        );
        let LoginStep::Done(r) = step else { panic!() };
        let loc = Url::parse(header(&r, "location")[0]).unwrap();
        assert_eq!(loc.host_str(), Some("app.example.com"), "{evil}");
    }
}

#[test]
fn pending_logins_are_capped() {
    let g = gate();
    let mut rng = SeededRandom(21);
    let logins: Vec<Login> = (0..6).map(|_| start_login(&g, "/", &mut rng)).collect();
    let cookies: Vec<&str> = logins.iter().map(|l| l.cookie.as_str()).collect();
    let r = expect_reply(g.decide(&browser("/", cookies), Some(&provider()), NOW, &mut rng));
    let deleted = header(&r, "set-cookie")
        .iter()
        .filter(|c| c.contains("Max-Age=0"))
        .count();
    assert_eq!(deleted, 6 - (MAX_PENDING_LOGINS - 1));
}

#[test]
fn oversized_tokens_drop_optional_parts_to_fit_the_cookie() {
    let g = gate();
    let idp = Idp::new();
    let mut rng = SeededRandom(22);
    let login = start_login(&g, "/", &mut rng);
    let pending = pending_for(&g, &login, &mut rng);
    let big_refresh = "r".repeat(2500);
    let body = json!({"access_token": "a".repeat(900), "token_type": "Bearer", "id_token": idp.id_token(&login.nonce), "refresh_token": big_refresh}).to_string();
    let (step, note) = g.complete_login(
        &pending,
        200,
        body.as_bytes(),
        Keys {
            jwks: Some(&idp.jwks()),
            may_refetch: false,
        },
        NOW,
        &mut rng,
    );
    let LoginStep::Done(r) = step else { panic!() };
    assert_eq!(r.status, 302);
    assert!(note.unwrap().contains("dropped"));
    let session = header(&r, "set-cookie")
        .into_iter()
        .find(|c| c.starts_with("__Host-oidc-gate="))
        .unwrap();
    assert!(session.split(';').next().unwrap().len() <= MAX_SESSION_COOKIE_BYTES);
    let huge = json!({"access_token": "a".repeat(6000), "token_type": "Bearer", "id_token": idp.id_token(&login.nonce)}).to_string();
    let (step, _) = g.complete_login(
        &pending,
        200,
        huge.as_bytes(),
        Keys {
            jwks: Some(&idp.jwks()),
            may_refetch: false,
        },
        NOW,
        &mut rng,
    );
    let LoginStep::Done(r) = step else { panic!() };
    assert_eq!(r.status, 502);
}
