//! End-to-end tests over real HTTP (127.0.0.1, port 0).

use std::collections::HashMap;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jwt_simple::prelude::*;
use mock_idp::{ClientConfig, Fault, MockIdp, MockIdpConfig, SigningAlg};
use serde_json::{json, Map, Value};
use sha2::Digest as _;

const VERIFIER: &str = "a-very-long-and-random-code-verifier-0123456789-abcdefghij";
const REDIRECT: &str = "http://127.0.0.1:9/callback";
type Claims = JWTClaims<Map<String, Value>>;

fn challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()))
}

fn http() -> reqwest::Client {
    // Already installed by another test is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn start(cfg: MockIdpConfig) -> MockIdp {
    MockIdp::start(cfg).await.unwrap()
}

fn query_of(location: &str) -> HashMap<String, String> {
    url::Url::parse(location)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect()
}

fn location(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("location")
        .expect("location header")
        .to_str()
        .unwrap()
        .to_string()
}

fn authz_params(nonce: Option<&str>) -> Vec<(&'static str, String)> {
    let mut p = vec![
        ("client_id", "oidc-gate".to_string()),
        ("redirect_uri", REDIRECT.to_string()),
        ("response_type", "code".to_string()),
        ("scope", "openid email profile".to_string()),
        ("state", "flow1.xyz".to_string()),
        ("code_challenge", challenge(VERIFIER)),
        ("code_challenge_method", "S256".to_string()),
    ];
    if let Some(n) = nonce {
        p.push(("nonce", n.to_string()));
    }
    p
}

/// Sign in through the form; returns (code, Set-Cookie of the session).
async fn login(idp: &MockIdp, c: &reqwest::Client, nonce: Option<&str>) -> (String, String) {
    let params = authz_params(nonce);
    let page = c
        .get(format!("{}/authorize", idp.issuer()))
        .query(&params)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let mut form: Vec<(&str, String)> = params.clone();
    form.push(("username", "admin".into()));
    form.push(("password", "password".into()));
    let resp = c
        .post(format!("{}/authorize", idp.issuer()))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 302);
    let cookie = resp
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let loc = location(&resp);
    assert!(loc.starts_with(REDIRECT), "{loc}");
    let q = query_of(&loc);
    assert_eq!(q["state"], "flow1.xyz");
    assert_eq!(q["iss"], idp.issuer());
    (q["code"].clone(), cookie)
}

async fn exchange_basic(
    idp: &MockIdp,
    c: &reqwest::Client,
    code: &str,
    verifier: &str,
    secret: &str,
) -> reqwest::Response {
    c.post(format!("{}/token", idp.issuer()))
        .basic_auth("oidc-gate", Some(secret))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
        ])
        .send()
        .await
        .unwrap()
}

async fn jwks(idp: &MockIdp, c: &reqwest::Client) -> Value {
    c.get(format!("{}/keys", idp.issuer()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn header_of(token: &str) -> Value {
    let h = token.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap()
}

fn payload_of(token: &str) -> Value {
    let p = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
}

/// Verify a token against the JWKS with jwt-simple (RS256 or ES256 by the JWK's kty).
fn verify(jwks: &Value, token: &str, issuer: &str, audience: &str) -> Result<Claims, String> {
    let kid = header_of(token)["kid"].as_str().unwrap_or("").to_string();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .ok_or("kid not in JWKS")?;
    let opts = VerificationOptions {
        allowed_issuers: Some(HashSet::from_strings(&[issuer])),
        allowed_audiences: Some(HashSet::from_strings(&[audience])),
        ..Default::default()
    };
    let b = |f: &str| URL_SAFE_NO_PAD.decode(jwk[f].as_str().unwrap()).unwrap();
    match jwk["kty"].as_str().unwrap() {
        "RSA" => RS256PublicKey::from_components(&b("n"), &b("e"))
            .unwrap()
            .verify_token::<Map<String, Value>>(token, Some(opts))
            .map_err(|e| e.to_string()),
        "EC" => {
            let mut point = vec![4u8];
            point.extend(b("x"));
            point.extend(b("y"));
            ES256PublicKey::from_bytes(&point)
                .unwrap()
                .verify_token::<Map<String, Value>>(token, Some(opts))
                .map_err(|e| e.to_string())
        }
        other => Err(format!("kty {other}")),
    }
}

#[tokio::test]
async fn discovery_document() {
    let idp = start(MockIdpConfig::default()).await;
    let c = http();
    let d: Value = c
        .get(format!("{}/.well-known/openid-configuration", idp.issuer()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let iss = idp.issuer();
    assert_eq!(iss, format!("http://{}", idp.addr()));
    assert_eq!(d["issuer"], iss.as_str());
    assert_eq!(d["authorization_endpoint"], format!("{iss}/authorize"));
    assert_eq!(d["token_endpoint"], format!("{iss}/token"));
    assert_eq!(d["jwks_uri"], format!("{iss}/keys"));
    assert_eq!(d["userinfo_endpoint"], format!("{iss}/userinfo"));
    assert_eq!(d["end_session_endpoint"], format!("{iss}/logout"));
    assert_eq!(d["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(d["id_token_signing_alg_values_supported"], json!(["RS256"]));
    assert_eq!(d["authorization_response_iss_parameter_supported"], true);
    let k = jwks(&idp, &c).await;
    assert_eq!(k["keys"][0]["kty"], "RSA");
    assert_eq!(k["keys"][0]["use"], "sig");
    assert_eq!(k["keys"][0]["alg"], "RS256");
    assert_eq!(idp.stats().discovery, 1);
    assert_eq!(idp.stats().jwks, 1);
}

#[tokio::test]
async fn login_form_wrong_password_then_code_and_token_basic() {
    let idp = start(MockIdpConfig::default()).await;
    let c = http();
    let params = authz_params(Some("n-0S6_WzA2Mj"));
    let page = c
        .get(format!("{}/authorize", idp.issuer()))
        .query(&params)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    for needle in [
        "<title>Sign in</title>",
        "oidc-gate",
        "<label for=\"username\">",
        "<label for=\"password\">",
        "id=\"username\"",
        "id=\"password\"",
        "id=\"submit\"",
        "autocomplete=\"username\"",
        "autocomplete=\"current-password\"",
        "autofocus",
        "type=\"hidden\" name=\"code_challenge\"",
    ] {
        assert!(html.contains(needle), "login page lacks {needle}");
    }
    assert!(!html.contains("id=\"error\""));

    // Wrong password: same page, 200, error shown, username kept.
    let mut form = params.clone();
    form.push(("username", "admin".into()));
    form.push(("password", "nope".into()));
    let resp = c
        .post(format!("{}/authorize", idp.issuer()))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let html = resp.text().await.unwrap();
    assert!(html.contains("id=\"error\""));
    assert!(html.contains("Invalid username or password"));
    assert!(html.contains("value=\"admin\""));

    let (code, cookie) = login(&idp, &c, Some("n-0S6_WzA2Mj")).await;
    assert!(cookie.starts_with("mock-idp-session="));
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"));

    let resp = exchange_basic(&idp, &c, &code, VERIFIER, "oidc-gate-secret").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let t: Value = resp.json().await.unwrap();
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["expires_in"], 300);
    assert_eq!(t["scope"], "openid email profile");
    let keys = jwks(&idp, &c).await;
    let id = verify(
        &keys,
        t["id_token"].as_str().unwrap(),
        &idp.issuer(),
        "oidc-gate",
    )
    .unwrap();
    assert_eq!(id.nonce.as_deref(), Some("n-0S6_WzA2Mj"));
    assert_eq!(id.custom["azp"], "oidc-gate");
    assert_eq!(id.custom["email"], "admin@example.com");
    assert_eq!(id.custom["groups"], json!(["admins", "users"]));
    assert!(id.custom.contains_key("auth_time"));
    let sub = id.subject.clone().unwrap();
    assert_eq!(sub, mock_idp::subject_for("admin"));
    let idh = header_of(t["id_token"].as_str().unwrap());
    assert_eq!(idh["typ"], "JWT");
    assert_eq!(idh["kid"], idp.current_kid().as_str());
    // raw aud is a string
    assert_eq!(
        payload_of(t["id_token"].as_str().unwrap())["aud"],
        "oidc-gate"
    );

    // Access token: a JWT for the API audience, never the client id.
    let at = t["access_token"].as_str().unwrap();
    assert_eq!(header_of(at)["typ"], "at+jwt");
    assert!(verify(&keys, at, &idp.issuer(), "oidc-gate").is_err());
    let atc = verify(&keys, at, &idp.issuer(), "api://oidc-gate-demo").unwrap();
    assert_eq!(atc.custom["client_id"], "oidc-gate");
    assert!(atc.jwt_id.is_some());

    // userinfo
    let ui: Value = c
        .get(format!("{}/userinfo", idp.issuer()))
        .bearer_auth(at)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ui["sub"], sub.as_str());
    assert_eq!(ui["name"], "Admin");
    let bad = c
        .get(format!("{}/userinfo", idp.issuer()))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);

    let s = idp.stats();
    assert_eq!(s.authorize_get, 2);
    assert_eq!(s.authorize_post, 2);
    assert_eq!(s.token, 1);
    assert_eq!(s.token_ok, 1);
    assert_eq!(
        s.last_token_auth_method.as_deref(),
        Some("client_secret_basic")
    );
    assert_eq!(s.last_token_form["grant_type"], "authorization_code");
    assert_eq!(s.userinfo, 2);

    // Existing session: authorize redirects immediately.
    let session = cookie.split(';').next().unwrap().to_string();
    let resp = c
        .get(format!("{}/authorize", idp.issuer()))
        .query(&authz_params(None))
        .header("cookie", session)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 302);
    assert!(query_of(&location(&resp)).contains_key("code"));
}

#[tokio::test]
async fn token_post_auth_with_es256() {
    let idp = start(MockIdpConfig {
        signing_alg: SigningAlg::Es256,
        ..Default::default()
    })
    .await;
    let c = http();
    let (code, _) = login(&idp, &c, None).await;
    let resp = c
        .post(format!("{}/token", idp.issuer()))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", VERIFIER),
            ("client_id", "oidc-gate"),
            ("client_secret", "oidc-gate-secret"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let t: Value = resp.json().await.unwrap();
    let keys = jwks(&idp, &c).await;
    assert_eq!(keys["keys"][0]["crv"], "P-256");
    let id = verify(
        &keys,
        t["id_token"].as_str().unwrap(),
        &idp.issuer(),
        "oidc-gate",
    )
    .unwrap();
    assert!(id.nonce.is_none());
    assert_eq!(header_of(t["id_token"].as_str().unwrap())["alg"], "ES256");
    assert_eq!(
        idp.stats().last_token_auth_method.as_deref(),
        Some("client_secret_post")
    );
}

#[tokio::test]
async fn code_errors_pkce_reuse_secret_expiry() {
    let idp = start(MockIdpConfig::default()).await;
    let c = http();

    // Wrong client secret -> 401 invalid_client.
    let (code, _) = login(&idp, &c, None).await;
    let resp = exchange_basic(&idp, &c, &code, VERIFIER, "wrong").await;
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().contains_key("www-authenticate"));
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "invalid_client"
    );

    // Wrong PKCE verifier -> invalid_grant.
    let other = "another-code-verifier-which-is-long-enough-0123456789";
    let resp = exchange_basic(&idp, &c, &code, other, "oidc-gate-secret").await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "invalid_grant"
    );

    // Correct exchange, then reuse -> invalid_grant, and the refresh token is revoked.
    let resp = exchange_basic(&idp, &c, &code, VERIFIER, "oidc-gate-secret").await;
    assert_eq!(resp.status(), 200);
    let t: Value = resp.json().await.unwrap();
    let resp = exchange_basic(&idp, &c, &code, VERIFIER, "oidc-gate-secret").await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "invalid_grant"
    );
    let resp = c
        .post(format!("{}/token", idp.issuer()))
        .basic_auth("oidc-gate", Some("oidc-gate-secret"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", t["refresh_token"].as_str().unwrap()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Unsupported grant type.
    let resp = c
        .post(format!("{}/token", idp.issuer()))
        .basic_auth("oidc-gate", Some("oidc-gate-secret"))
        .form(&[("grant_type", "password")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "unsupported_grant_type"
    );
    let s = idp.stats();
    assert_eq!(s.token, 6);
    assert_eq!(s.token_ok, 1);
    assert_eq!(s.token_errors, 5);
    assert_eq!(s.refresh, 1);
    drop(idp);

    // Expired code.
    let idp = start(MockIdpConfig {
        code_ttl: Duration::from_millis(1),
        ..Default::default()
    })
    .await;
    let (code, _) = login(&idp, &c, None).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let resp = exchange_basic(&idp, &c, &code, VERIFIER, "oidc-gate-secret").await;
    assert_eq!(resp.status(), 400);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"], "invalid_grant");
    assert_eq!(e["error_description"], "authorization code expired");
}

#[tokio::test]
async fn authorize_validation() {
    let idp = start(MockIdpConfig {
        clients: vec![ClientConfig {
            id: "oidc-gate".into(),
            secret: "oidc-gate-secret".into(),
            redirect_uris: vec![REDIRECT.into()],
            post_logout_redirect_uris: vec![],
        }],
        ..Default::default()
    })
    .await;
    let c = http();
    let url = format!("{}/authorize", idp.issuer());
    // Unregistered redirect_uri -> 400 page, no redirect.
    let mut p = authz_params(None);
    p[1].1 = "https://evil.example/cb".into();
    let resp = c.get(&url).query(&p).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.headers().get("location").is_none());
    // Unknown client -> 400.
    let mut p = authz_params(None);
    p[0].1 = "nobody".into();
    assert_eq!(c.get(&url).query(&p).send().await.unwrap().status(), 400);
    // Missing PKCE -> redirect with error + state.
    let p: Vec<_> = authz_params(None)
        .into_iter()
        .filter(|(k, _)| !k.starts_with("code_challenge"))
        .collect();
    let resp = c.get(&url).query(&p).send().await.unwrap();
    assert_eq!(resp.status(), 302);
    let q = query_of(&location(&resp));
    assert_eq!(q["error"], "invalid_request");
    assert_eq!(q["state"], "flow1.xyz");
    // No openid scope.
    let mut p = authz_params(None);
    p[3].1 = "email".into();
    let resp = c.get(&url).query(&p).send().await.unwrap();
    assert_eq!(query_of(&location(&resp))["error"], "invalid_scope");
}

#[tokio::test]
async fn refresh_with_rotation() {
    let idp = start(MockIdpConfig::default()).await;
    let c = http();
    let (code, _) = login(&idp, &c, Some("nonce-1")).await;
    let t: Value = exchange_basic(&idp, &c, &code, VERIFIER, "oidc-gate-secret")
        .await
        .json()
        .await
        .unwrap();
    let rt1 = t["refresh_token"].as_str().unwrap().to_string();
    let refresh = |rt: String| {
        let c = c.clone();
        let url = format!("{}/token", idp.issuer());
        async move {
            c.post(url)
                .basic_auth("oidc-gate", Some("oidc-gate-secret"))
                .form(&[("grant_type", "refresh_token"), ("refresh_token", &rt)])
                .send()
                .await
                .unwrap()
        }
    };
    let resp = refresh(rt1.clone()).await;
    assert_eq!(resp.status(), 200);
    let t2: Value = resp.json().await.unwrap();
    let rt2 = t2["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(rt1, rt2);
    let keys = jwks(&idp, &c).await;
    let id1 = verify(
        &keys,
        t["id_token"].as_str().unwrap(),
        &idp.issuer(),
        "oidc-gate",
    )
    .unwrap();
    let id2 = verify(
        &keys,
        t2["id_token"].as_str().unwrap(),
        &idp.issuer(),
        "oidc-gate",
    )
    .unwrap();
    assert_eq!(id1.subject, id2.subject);
    assert!(id2.nonce.is_none());
    // Old refresh token is invalid now.
    let resp = refresh(rt1).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "invalid_grant"
    );
    assert_eq!(refresh(rt2).await.status(), 200);
    assert_eq!(idp.stats().refresh, 3);
}

#[tokio::test]
async fn end_session() {
    let idp = start(MockIdpConfig {
        clients: vec![ClientConfig {
            id: "oidc-gate".into(),
            secret: "oidc-gate-secret".into(),
            redirect_uris: vec![],
            post_logout_redirect_uris: vec!["https://app.example/bye".into()],
        }],
        ..Default::default()
    })
    .await;
    let c = http();
    let (code, cookie) = login(&idp, &c, None).await;
    let t: Value = exchange_basic(&idp, &c, &code, VERIFIER, "oidc-gate-secret")
        .await
        .json()
        .await
        .unwrap();
    let session = cookie.split(';').next().unwrap().to_string();
    let url = format!("{}/logout", idp.issuer());
    let resp = c
        .get(&url)
        .query(&[
            ("id_token_hint", t["id_token"].as_str().unwrap()),
            ("post_logout_redirect_uri", "https://app.example/bye"),
            ("state", "s1"),
        ])
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 302);
    assert_eq!(location(&resp), "https://app.example/bye?state=s1");
    assert!(resp.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    // Session is gone: authorize shows the form again.
    let resp = c
        .get(format!("{}/authorize", idp.issuer()))
        .query(&authz_params(None))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Unregistered post_logout_redirect_uri -> 400.
    let resp = c
        .get(&url)
        .query(&[
            ("client_id", "oidc-gate"),
            ("post_logout_redirect_uri", "https://evil.example/"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // No redirect: signed-out page.
    let resp = c.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains("You have been signed out"));
    assert_eq!(idp.stats().end_session, 3);
}

#[tokio::test]
async fn faults() {
    let idp = start(MockIdpConfig::default()).await;
    let c = http();
    let iss = idp.issuer();

    // Token status.
    idp.set_fault(Fault::TokenStatus(503));
    let (code, _) = login(&idp, &c, None).await;
    let resp = exchange_basic(&idp, &c, &code, VERIFIER, "oidc-gate-secret").await;
    assert_eq!(resp.status(), 503);

    // Raw HTML body.
    idp.set_fault(Fault::TokenBody {
        content_type: "text/html".into(),
        body: "<html>oops".into(),
    });
    let resp = exchange_basic(&idp, &c, &code, VERIFIER, "oidc-gate-secret").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "<html>oops");

    // Claims override + header alg none + corrupt signature, combined with All.
    idp.set_fault(Fault::IdTokenClaims(
        json!({"iss": "https://evil.example", "email": null}),
    ));
    let t: Value = exchange_basic(&idp, &c, &code, VERIFIER, "oidc-gate-secret")
        .await
        .json()
        .await
        .unwrap();
    let p = payload_of(t["id_token"].as_str().unwrap());
    assert_eq!(p["iss"], "https://evil.example");
    assert!(p.get("email").is_none());

    let (code, _) = login(&idp, &c, None).await;
    idp.set_fault(Fault::IdTokenHeader(json!({"alg": "none"})));
    let t: Value = exchange_basic(&idp, &c, &code, VERIFIER, "oidc-gate-secret")
        .await
        .json()
        .await
        .unwrap();
    let id = t["id_token"].as_str().unwrap();
    assert!(id.ends_with('.'));
    assert_eq!(header_of(id)["alg"], "none");

    let keys = jwks(&idp, &c).await;
    let (code, _) = login(&idp, &c, None).await;
    idp.set_fault(Fault::IdTokenCorruptSignature);
    let t: Value = exchange_basic(&idp, &c, &code, VERIFIER, "oidc-gate-secret")
        .await
        .json()
        .await
        .unwrap();
    assert!(verify(&keys, t["id_token"].as_str().unwrap(), &iss, "oidc-gate").is_err());

    let (code, _) = login(&idp, &c, None).await;
    idp.set_fault(Fault::All(vec![
        Fault::IdTokenSignWithHs256PublicKey,
        Fault::TokenResponseFields(json!({"token_type": "mac", "refresh_token": null})),
    ]));
    let t: Value = exchange_basic(&idp, &c, &code, VERIFIER, "oidc-gate-secret")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(t["token_type"], "mac");
    assert!(t.get("refresh_token").is_none());
    assert_eq!(header_of(t["id_token"].as_str().unwrap())["alg"], "HS256");

    // Discovery / JWKS faults over the admin HTTP API.
    let admin = |body: Value| {
        let c = c.clone();
        let url = format!("{iss}/__admin/fault");
        async move { c.post(url).json(&body).send().await.unwrap().status() }
    };
    assert_eq!(
        admin(json!({"fault": "discovery_issuer", "issuer": "https://other"})).await,
        200
    );
    let d: Value = c
        .get(format!("{iss}/.well-known/openid-configuration"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(d["issuer"], "https://other");
    assert_eq!(
        admin(json!({"fault": "jwks_status", "status": 500})).await,
        200
    );
    assert_eq!(
        c.get(format!("{iss}/keys")).send().await.unwrap().status(),
        500
    );
    assert_eq!(admin(json!({"fault": "bogus"})).await, 400);

    // Hang: the client times out.
    assert_eq!(admin(json!({"fault": "token_hang"})).await, 200);
    let (code, _) = login(&idp, &c, None).await;
    let r = tokio::time::timeout(
        Duration::from_millis(300),
        exchange_basic(&idp, &c, &code, VERIFIER, "oidc-gate-secret"),
    )
    .await;
    assert!(r.is_err());

    // Stats / reset / rotate over HTTP.
    let stats: Value = c
        .get(format!("{iss}/__admin/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(stats["token"].as_u64().unwrap() >= 6);
    assert_eq!(
        c.post(format!("{iss}/__admin/reset"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(idp.stats().token, 0);
    let old_kid = idp.current_kid();
    let r: Value = c
        .post(format!("{iss}/__admin/rotate-keys?keep_old=true"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(r["kid"], old_kid.as_str());
    assert_eq!(jwks(&idp, &c).await["keys"].as_array().unwrap().len(), 2);
    idp.rotate_keys();
    let k = jwks(&idp, &c).await;
    assert_eq!(k["keys"].as_array().unwrap().len(), 1);
    assert_eq!(k["keys"][0]["kid"], idp.current_kid().as_str());
    idp.shutdown().await;
}

#[tokio::test]
async fn sign_jwt_and_mint_access_token() {
    let idp = start(MockIdpConfig::default()).await;
    let c = http();
    let keys = jwks(&idp, &c).await;
    let iss = idp.issuer();
    let tok = idp.sign_jwt(
        json!({"typ": "at+jwt"}),
        json!({"iss": iss, "aud": "x", "sub": "s", "exp": 4_000_000_000u64}),
    );
    assert_eq!(header_of(&tok)["typ"], "at+jwt");
    assert!(verify(&keys, &tok, &iss, "x").is_ok());
    let at = idp.mint_access_token(
        &mock_idp::subject_for("admin"),
        "api://x",
        Duration::from_secs(60),
    );
    let claims = verify(&keys, &at, &iss, "api://x").unwrap();
    assert_eq!(claims.subject.unwrap(), mock_idp::subject_for("admin"));
    let ui = c
        .get(format!("{iss}/userinfo"))
        .bearer_auth(&at)
        .send()
        .await
        .unwrap();
    assert_eq!(ui.status(), 200);
    assert_eq!(
        ui.json::<Value>().await.unwrap()["email"],
        "admin@example.com"
    );
}

#[tokio::test]
async fn in_process_router_oneshot() {
    use tower::ServiceExt as _;
    let state = mock_idp::IdpState::new(MockIdpConfig {
        issuer: Some("https://idp.example/realms/demo".into()),
        ..Default::default()
    });
    let app = mock_idp::app(state.clone());
    let resp = app
        .oneshot(
            axum::http::Request::get("/realms/demo/.well-known/openid-configuration")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(state.stats().discovery, 1);
}

#[tokio::test]
async fn opaque_access_tokens_without_rotation() {
    let idp = start(MockIdpConfig {
        opaque_access_tokens: true,
        rotate_refresh_tokens: false,
        ..Default::default()
    })
    .await;
    let c = http();
    let (code, _) = login(&idp, &c, None).await;
    let t: Value = exchange_basic(&idp, &c, &code, VERIFIER, "oidc-gate-secret")
        .await
        .json()
        .await
        .unwrap();
    let at = t["access_token"].as_str().unwrap();
    assert!(!at.contains('.'));
    let ui = c
        .get(format!("{}/userinfo", idp.issuer()))
        .bearer_auth(at)
        .send()
        .await
        .unwrap();
    assert_eq!(ui.status(), 200);
    let rt = t["refresh_token"].as_str().unwrap();
    for _ in 0..2 {
        let t2: Value = c
            .post(format!("{}/token", idp.issuer()))
            .basic_auth("oidc-gate", Some("oidc-gate-secret"))
            .form(&[("grant_type", "refresh_token"), ("refresh_token", rt)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(t2["refresh_token"], rt);
    }
}
