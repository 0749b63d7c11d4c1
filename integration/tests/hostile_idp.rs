//! Attack suite, part 1: a malicious or faulty IdP (security-cases.md sections A4-A5, C, D, E, I,
//! J and the CVE replays that need one). Every case asserts the exact outcome: status, no session
//! cookie, the IdP calls that happened (mock-idp stats), nothing upstream that should not be
//! there (echo upstream), and no panic or wasm trap in Envoy's log.
//!
//! Each test function is one section with its own stack; the cases of a section run one after the
//! other against it, switching the mock IdP's fault per case.

mod hostile_common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use hostile_common::*;
use integration::stack::{
    jwt_payload, Stack, StackOptions, APP_HOST, CLIENT_ID, CLIENT_SECRET, SESSION_COOKIE, USERNAME,
};
use integration::{Browser, Resp};
use mock_idp::{subject_for, ClientConfig, Fault, IdpState, MockIdpConfig, SigningAlg};
use serde_json::{json, Value};

/// `patch` with its numeric `iat`, `exp` and `nbf` moved `by` seconds later.
fn shifted_times(mut patch: Value, by: u64) -> Value {
    for claim in ["iat", "exp", "nbf"] {
        if let Some(at) = patch.get(claim).and_then(Value::as_u64) {
            patch[claim] = json!(at + by);
        }
    }
    patch
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn b64(data: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

fn unb64(s: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(s).unwrap_or_default()
}

/// `base` with `patch` applied (JSON merge patch: `null` removes).
fn patched(base: &Value, patch: &Value) -> Value {
    let mut v = base.clone();
    integration::config::merge(&mut v, patch);
    v
}

/// The ID-token claims the IdP would issue for `admin` in this login.
fn good_claims(stack: &Stack, nonce: &str) -> Value {
    let t = now();
    json!({
        "iss": stack.idp.issuer(),
        "sub": subject_for(USERNAME),
        "aud": CLIENT_ID,
        "azp": CLIENT_ID,
        "iat": t,
        "exp": t + 300,
        "nonce": nonce,
        "email": "admin@example.com",
    })
}

/// Sign `claims` with the IdP's current key, header fields patched over `{alg, kid, typ}`.
fn signed(stack: &Stack, header: Value, claims: &Value) -> String {
    stack.idp.sign_jwt(header, claims.clone())
}

/// Replace one segment of a compact token.
fn with_segment(token: &str, index: usize, value: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    parts[index] = value.to_string();
    parts.join(".")
}

/// What a case must end in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// The callback is refused with this status after exactly one token call.
    Reject(u16),
    /// The login completes: 302 back to the original path with a session cookie.
    Accept,
}

/// A browser that already has a login session at the mock IdP (so each case needs only the
/// gateway's redirect, the IdP's immediate redirect back, and the callback).
async fn idp_session_browser(stack: &Stack) -> Browser {
    let b = stack.browser();
    let flow = stack.login(&b, &stack.url("/warm-up")).await;
    assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());
    b.jar().remove(APP_HOST, SESSION_COOKIE);
    b
}

/// Run one login in `b` for `path`: the IdP answers with `fault(nonce)` active at the token
/// endpoint; assert the outcome.
async fn login_case(
    stack: &Stack,
    b: &Browser,
    what: &str,
    path: &str,
    fault: impl FnOnce(&str) -> Fault,
    expect: Expect,
) -> Resp {
    let (start, to_cb) = to_callback(stack, b, path).await;
    let nonce = start.location_param("nonce").expect("nonce");
    let before = snapshot(stack);
    stack.idp.set_fault(fault(&nonce));
    let r = b.follow_one(&to_cb).await;
    stack.idp.set_fault(Fault::None);
    match expect {
        Expect::Reject(status) => assert_refused(stack, what, &r, status, before, 1),
        Expect::Accept => {
            assert_eq!(r.status, 302, "{what}: {}", r.describe());
            assert!(sets_session(&r), "{what}: session set: {}", r.describe());
            assert_eq!(
                r.location().map(|u| u.to_string()),
                Some(stack.url(path)),
                "{what}: back to the original URL"
            );
            assert_eq!(stack.upstream.count(), before.upstream, "{what}");
            assert_eq!(stack.idp.stats().token - before.token, 1, "{what}");
            b.jar().remove(APP_HOST, SESSION_COOKIE);
        }
    }
    r
}

/// A case whose ID token the test builds from this login's nonce.
async fn id_token_case(
    stack: &Stack,
    b: &Browser,
    what: &str,
    make: impl FnOnce(&str) -> String,
    expect: Expect,
) {
    let path = format!(
        "/case/{}",
        b64(what.as_bytes()).chars().take(24).collect::<String>()
    );
    login_case(
        stack,
        b,
        what,
        &path,
        |nonce| Fault::TokenResponseFields(json!({ "id_token": make(nonce) })),
        expect,
    )
    .await;
}

// ------------------------------------------------------------------------------------------------
// D. ID token: signature, algorithm and header attacks (D36-D42, D49-D51; CVE-2015-2951,
// CVE-2016-10555, CVE-2018-0114, CVE-2020-28042, CVE-2019-20933; rp-id_token-sig-rs256,
// rp-id_token-bad-sig-rs256, rp-id_token-sig-none, bad-sig-hs256)
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_token_signature_and_header_attacks() {
    // Through a proxy that logs every callout: the filter can only call its IdP cluster, so a
    // `jku`/`x5u` it followed would show there, on the IdP's own origin.
    let (stack, proxy) = proxied_stack(StackOptions::default()).await;
    let b = idp_session_browser(&stack).await;
    let s = &stack;
    let trip_url = format!("{}/tripwire-jwks.json", stack.idp.issuer());
    let tripped = || {
        let lines = proxy.request_lines();
        assert!(
            lines
                .iter()
                .any(|l| l.contains("/keys") || l.contains("/jwks")),
            "the proxy sees the filter's key fetches: {lines:?}"
        );
        lines.iter().filter(|l| l.contains("tripwire")).count()
    };
    let kid = stack.idp.current_kid();
    let reject = Expect::Reject(502);

    // Baseline: a token the test signs with the IdP's key is accepted (rp-id_token-sig-rs256).
    id_token_case(
        s,
        &b,
        "valid RS256",
        |n| signed(s, json!({}), &good_claims(s, n)),
        Expect::Accept,
    )
    .await;

    // D36: signature corrupted in several ways.
    id_token_case(
        s,
        &b,
        "RS256 signature byte flipped",
        |n| {
            let t = signed(s, json!({}), &good_claims(s, n));
            let mut sig = unb64(t.split('.').nth(2).unwrap());
            let mid = sig.len() / 2;
            sig[mid] ^= 0x01;
            with_segment(&t, 2, &b64(sig))
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "RS256 signature bytes reversed",
        |n| {
            let t = signed(s, json!({}), &good_claims(s, n));
            let mut sig = unb64(t.split('.').nth(2).unwrap());
            sig.reverse();
            with_segment(&t, 2, &b64(sig))
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "payload changed after signing",
        |n| {
            let t = signed(s, json!({}), &good_claims(s, n));
            let evil = patched(&good_claims(s, n), &json!({"sub": "attacker"}));
            with_segment(&t, 1, &b64(evil.to_string()))
        },
        reject,
    )
    .await;
    login_case(
        s,
        &b,
        "IdP corrupts its signature",
        "/corrupt",
        |_| Fault::IdTokenCorruptSignature,
        reject,
    )
    .await;
    // CVE-2020-28042: empty signature.
    id_token_case(
        s,
        &b,
        "empty signature",
        |n| with_segment(&signed(s, json!({}), &good_claims(s, n)), 2, ""),
        reject,
    )
    .await;

    // D38: alg none in any spelling, signature empty or kept (CVE-2015-2951).
    for alg in ["none", "None", "NONE", "nOnE"] {
        id_token_case(
            s,
            &b,
            &format!("alg {alg}, empty signature"),
            |n| {
                let h = json!({"alg": alg, "typ": "JWT"});
                format!(
                    "{}.{}.",
                    b64(h.to_string()),
                    b64(good_claims(s, n).to_string())
                )
            },
            reject,
        )
        .await;
        id_token_case(
            s,
            &b,
            &format!("alg {alg}, RS256 signature kept"),
            |n| {
                let t = signed(s, json!({}), &good_claims(s, n));
                with_segment(
                    &t,
                    0,
                    &b64(json!({"alg": alg, "kid": kid, "typ": "JWT"}).to_string()),
                )
            },
            reject,
        )
        .await;
    }
    login_case(
        s,
        &b,
        "IdP signs with alg none",
        "/none",
        |_| Fault::IdTokenHeader(json!({"alg": "none"})),
        reject,
    )
    .await;

    // D39: HS256 keyed with the IdP's public key (CVE-2016-10555), as PEM, DER and modulus; with
    // the client secret (rp ...-sig-hs256: HS256 is not supported, so refused); with an empty key
    // (CVE-2019-20933).
    let pem = stack.idp.public_key_pem();
    let der = STANDARD
        .decode(
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        )
        .expect("PEM body");
    let jwks = stack.idp.jwks();
    let n_text = jwks["keys"][0]["n"].as_str().unwrap().to_string();
    let hmac_keys: Vec<(&str, Vec<u8>)> = vec![
        ("public key PEM", pem.clone().into_bytes()),
        (
            "public key PEM without newline",
            pem.trim_end().as_bytes().to_vec(),
        ),
        ("public key DER", der),
        ("modulus n (base64url text)", n_text.clone().into_bytes()),
        ("modulus n (bytes)", unb64(&n_text)),
        ("client secret", CLIENT_SECRET.as_bytes().to_vec()),
        ("empty key", Vec::new()),
    ];
    for (name, key) in hmac_keys {
        id_token_case(
            s,
            &b,
            &format!("HS256 keyed with the {name}"),
            |n| {
                let h = json!({"alg": "HS256", "kid": kid, "typ": "JWT"}).to_string();
                mock_idp::sign_hs256_raw(&key, &h, &good_claims(s, n).to_string())
            },
            reject,
        )
        .await;
    }
    login_case(
        s,
        &b,
        "IdP signs HS256 with its public key",
        "/hs256",
        |_| Fault::IdTokenSignWithHs256PublicKey,
        reject,
    )
    .await;
    // Other algorithms with the real RS256 signature kept (FAPI2 "unexpected alg").
    for alg in ["RS512", "PS256", "ES256", "HS512", "EdDSA"] {
        id_token_case(
            s,
            &b,
            &format!("alg {alg} with the RS256 signature"),
            |n| {
                let t = signed(s, json!({}), &good_claims(s, n));
                with_segment(
                    &t,
                    0,
                    &b64(json!({"alg": alg, "kid": kid, "typ": "JWT"}).to_string()),
                )
            },
            reject,
        )
        .await;
    }

    // D40: the attacker's key embedded (`jwk`, CVE-2018-0114) or referenced (`jku`, `x5u`, `x5c`).
    let attacker = tokio::task::spawn_blocking(|| {
        let a = IdpState::new(MockIdpConfig::default());
        a.rotate_keys(); // a fresh RSA key, not the process-wide shared one
        a
    })
    .await
    .expect("attacker key");
    let attacker: Arc<IdpState> = attacker;
    let attacker_jwk = attacker.jwks()["keys"][0].clone();
    let attacker_kid = attacker.current_kid();
    id_token_case(
        s,
        &b,
        "signed by the attacker, key in `jwk`",
        |n| {
            attacker.sign_jwt(
                json!({"jwk": attacker_jwk, "kid": attacker_kid}),
                good_claims(s, n),
            )
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "signed by the attacker, no kid, key in `jwk`",
        |n| attacker.sign_jwt(json!({"jwk": attacker_jwk, "kid": null}), good_claims(s, n)),
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "signed by the attacker, `jku` to the attacker",
        |n| {
            attacker.sign_jwt(
                json!({"jku": trip_url, "kid": attacker_kid}),
                good_claims(s, n),
            )
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "signed by the attacker, `x5u` to the attacker",
        |n| {
            attacker.sign_jwt(
                json!({"x5u": trip_url, "kid": attacker_kid}),
                good_claims(s, n),
            )
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "signed by the attacker, `x5c` chain",
        |n| {
            attacker.sign_jwt(
                json!({"x5c": [STANDARD.encode(b"not a certificate")], "kid": attacker_kid}),
                good_claims(s, n),
            )
        },
        reject,
    )
    .await;
    // The same headers on a token the real key signed: refused for the header alone.
    for (name, h) in [
        ("jwk", json!({"jwk": jwks["keys"][0]})),
        ("jku", json!({"jku": trip_url})),
        ("x5u", json!({"x5u": trip_url})),
    ] {
        id_token_case(
            s,
            &b,
            &format!("real signature with a `{name}` header"),
            |n| signed(s, h, &good_claims(s, n)),
            reject,
        )
        .await;
    }
    assert_eq!(tripped(), 0, "jku/x5u URLs were never fetched");

    // D41: odd kids (signed with the real key).
    for (name, k) in [
        ("path traversal kid", json!("../../../../../../dev/null")),
        ("10 kB kid", json!("k".repeat(10 * 1024))),
        ("numeric kid", json!(1)),
        ("SQL kid", json!("x' UNION SELECT 'key")),
        ("URL kid", json!(trip_url)),
    ] {
        id_token_case(
            s,
            &b,
            name,
            |n| signed(s, json!({"kid": k}), &good_claims(s, n)),
            reject,
        )
        .await;
    }
    assert_eq!(tripped(), 0);

    // D42: critical extensions.
    id_token_case(
        s,
        &b,
        "crit [exp]",
        |n| signed(s, json!({"crit": ["exp"]}), &good_claims(s, n)),
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "crit [b64], b64 false",
        |n| {
            signed(
                s,
                json!({"crit": ["b64"], "b64": false}),
                &good_claims(s, n),
            )
        },
        reject,
    )
    .await;

    // D49: duplicate members, signed over the exact bytes.
    let header = format!(r#"{{"alg":"RS256","kid":"{kid}","typ":"JWT"}}"#);
    let dup_payload = |n: &str, extra: &str| {
        let mut c = good_claims(s, n).to_string();
        c.pop();
        format!("{c},{extra}}}")
    };
    id_token_case(
        s,
        &b,
        "duplicate iss in the payload",
        |n| {
            stack.idp.sign_jwt_raw(
                &header,
                &dup_payload(n, r#""iss":"https://attacker.example""#),
            )
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "duplicate sub in the payload",
        |n| {
            stack
                .idp
                .sign_jwt_raw(&header, &dup_payload(n, r#""sub":"victim""#))
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "duplicate nonce in the payload",
        |n| {
            stack
                .idp
                .sign_jwt_raw(&header, &dup_payload(n, r#""nonce":"other""#))
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "duplicate alg in the header",
        |n| {
            let h = format!(r#"{{"alg":"none","alg":"RS256","kid":"{kid}","typ":"JWT"}}"#);
            stack.idp.sign_jwt_raw(&h, &good_claims(s, n).to_string())
        },
        reject,
    )
    .await;

    // D50/D51: malformed tokens.
    id_token_case(s, &b, "1 MB token", |_| "a".repeat(1024 * 1024), reject).await;
    id_token_case(
        s,
        &b,
        "64 kB token",
        |n| {
            signed(
                s,
                json!({}),
                &patched(&good_claims(s, n), &json!({"pad": "x".repeat(64 * 1024)})),
            )
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "10000-deep JSON payload",
        |_| {
            let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
            stack.idp.sign_jwt_raw(&header, &deep)
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "10000-deep JSON header",
        |n| {
            let deep = format!("{}{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
            format!(
                "{}.{}.{}",
                b64(deep),
                b64(good_claims(s, n).to_string()),
                b64([1u8; 256])
            )
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "non-UTF-8 payload",
        |_| {
            let key_signed = stack.idp.sign_jwt_raw(&header, "{}");
            with_segment(
                &key_signed,
                1,
                &b64([0xff, 0xfe, 0x7b, 0x22, 0xc3, 0x28, 0x7d]),
            )
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "extra segment",
        |n| format!("{}.x", signed(s, json!({}), &good_claims(s, n))),
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "two segments",
        |n| {
            let t = signed(s, json!({}), &good_claims(s, n));
            t.rsplit_once('.').unwrap().0.to_string()
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "base64 padding",
        |n| {
            let t = signed(s, json!({}), &good_claims(s, n));
            t.split('.')
                .map(|p| format!("{p}=="))
                .collect::<Vec<_>>()
                .join(".")
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "standard base64 alphabet",
        |n| {
            let c = patched(
                &good_claims(s, n),
                &json!({"x": "\u{3ff}\u{3ff}\u{3ff}>>>???"}),
            );
            let t = signed(s, json!({}), &c);
            with_segment(&t, 1, &STANDARD.encode(c.to_string()).replace('=', ""))
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "5-part JWE",
        |_| {
            format!(
                "{}.{}.{}.{}.{}",
                b64(r#"{"alg":"RSA-OAEP","enc":"A256GCM","kid":"k"}"#),
                b64([1u8; 256]),
                b64([2u8; 12]),
                b64([3u8; 64]),
                b64([4u8; 16])
            )
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "the access token as ID token",
        |_| {
            stack
                .idp
                .mint_access_token(&subject_for(USERNAME), CLIENT_ID, Duration::from_secs(300))
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "JSON array payload",
        |_| stack.idp.sign_jwt_raw(&header, "[]"),
        reject,
    )
    .await;

    // Every rejected case: nothing upstream at all (the warm-up's one landing aside).
    assert_eq!(
        stack.upstream.count(),
        1,
        "only the warm-up reached the upstream"
    );
    assert_no_crash(&stack);
}

// ------------------------------------------------------------------------------------------------
// D. ID token claims (D43-D48, D58 n/a, J92; rp-id_token-issuer-mismatch, -sub, -aud, -iat,
// rp-nonce-invalid; FAPI2 client tests; authservice 202eb79)
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_token_claim_rules() {
    let stack = Stack::start_default().await;
    let b = idp_session_browser(&stack).await;
    let s = &stack;
    let iss = stack.idp.issuer();
    let reject = Expect::Reject(502);
    let t = now();

    let cases: Vec<(&str, Value, Expect)> = vec![
        // D43: issuer.
        ("iss + 1", json!({"iss": format!("{iss}1")}), reject),
        (
            "iss https://example.org/",
            json!({"iss": "https://example.org/"}),
            reject,
        ),
        (
            "iss with trailing slash",
            json!({"iss": format!("{iss}/")}),
            reject,
        ),
        (
            "iss upper case",
            json!({"iss": iss.to_ascii_uppercase()}),
            reject,
        ),
        ("iss missing", json!({"iss": null}), reject),
        ("iss not a string", json!({"iss": [iss]}), reject),
        // D44: audience.
        (
            "aud client_id + 1",
            json!({"aud": format!("{CLIENT_ID}1")}),
            reject,
        ),
        ("aud missing", json!({"aud": null}), reject),
        ("aud []", json!({"aud": []}), reject),
        (
            "aud other client",
            json!({"aud": ["other-client"], "azp": "other-client"}),
            reject,
        ),
        ("aud as number", json!({"aud": 1}), reject),
        // D45: several audiences and azp.
        (
            "aud [client, untrusted] without azp",
            json!({"aud": [CLIENT_ID, "untrusted"], "azp": null}),
            reject,
        ),
        (
            "azp of another client",
            json!({"azp": "other-client"}),
            reject,
        ),
        (
            "aud [client, untrusted], azp other",
            json!({"aud": [CLIENT_ID, "untrusted"], "azp": "untrusted"}),
            reject,
        ),
        (
            "aud [client] as array (FAPI2 accept)",
            json!({"aud": [CLIENT_ID]}),
            Expect::Accept,
        ),
        (
            "aud string without azp",
            json!({"azp": null}),
            Expect::Accept,
        ),
        // D46: sub and iat.
        ("sub missing", json!({"sub": null}), reject),
        ("sub empty", json!({"sub": ""}), reject),
        ("sub not a string", json!({"sub": 42}), reject),
        ("iat missing", json!({"iat": null}), reject),
        ("iat a string", json!({"iat": t.to_string()}), reject),
        // D47 / J92: times and skew (60 s).
        (
            "exp 6 min past",
            json!({"iat": t - 900, "exp": t - 360}),
            reject,
        ),
        ("exp missing", json!({"exp": null}), reject),
        (
            "exp a string",
            json!({"exp": (t + 300).to_string()}),
            reject,
        ),
        ("nbf 10 min ahead", json!({"nbf": t + 600}), reject),
        (
            "iat 10 min ahead",
            json!({"iat": t + 600, "exp": t + 900}),
            reject,
        ),
        (
            "IdP clock 5 min ahead",
            json!({"iat": t + 300, "exp": t + 600}),
            reject,
        ),
        // At the edge of the 60 s skew (the case runs within a few seconds of `t`).
        (
            "exp 55 s past (edge, inside)",
            json!({"iat": t - 355, "exp": t - 55}),
            Expect::Accept,
        ),
        (
            "exp 66 s past (edge, outside)",
            json!({"iat": t - 366, "exp": t - 66}),
            reject,
        ),
        (
            "iat 55 s ahead (edge, inside)",
            json!({"iat": t + 55, "exp": t + 355}),
            Expect::Accept,
        ),
        (
            "nbf 66 s ahead (edge, outside)",
            json!({"nbf": t + 66}),
            reject,
        ),
        (
            "exp 30 s past (within skew)",
            json!({"iat": t - 330, "exp": t - 30}),
            Expect::Accept,
        ),
        (
            "nbf 30 s ahead (within skew)",
            json!({"nbf": t + 30}),
            Expect::Accept,
        ),
        (
            "iat 30 s ahead (within skew)",
            json!({"iat": t + 30}),
            Expect::Accept,
        ),
        (
            "IdP clock 5 min behind, 10 min token",
            json!({"iat": t - 300, "exp": t + 300}),
            Expect::Accept,
        ),
        (
            "exp 90 s past (outside skew)",
            json!({"iat": t - 390, "exp": t - 90}),
            reject,
        ),
        (
            "nbf 90 s ahead (outside skew)",
            json!({"nbf": t + 90}),
            reject,
        ),
        // D48: nonce (rp-nonce-invalid; authservice 202eb79).
        ("nonce 012345678", json!({"nonce": "012345678"}), reject),
        ("nonce missing", json!({"nonce": null}), reject),
        ("nonce empty", json!({"nonce": ""}), reject),
        ("nonce as array", json!({"nonce": ["x"]}), reject),
        // GHSA-c5c4-8r6x-56w3 style claim values: identity is `sub`, the email is only passed on.
        (
            "email with two @",
            json!({"email": "a@evil.com@company.com"}),
            Expect::Accept,
        ),
    ];
    for (what, patch, expect) in cases {
        // The times were written against `t`; 27 logins later the clock has moved on, and the
        // edge cases (55 s inside, 66 s outside the skew) must stay where they were put.
        let patch = shifted_times(patch, now() - t);
        id_token_case(
            s,
            &b,
            what,
            |n| signed(s, json!({}), &patched(&good_claims(s, n), &patch)),
            expect,
        )
        .await;
    }
    // The nonce of another login in the same browser.
    let (other_start, _) = to_callback(s, &b, "/other-login").await;
    let other_nonce = other_start.location_param("nonce").unwrap();
    id_token_case(
        s,
        &b,
        "nonce of another login",
        |n| {
            assert_ne!(n, other_nonce);
            signed(
                s,
                json!({}),
                &patched(&good_claims(s, n), &json!({"nonce": other_nonce})),
            )
        },
        reject,
    )
    .await;
    // The IdP-side claim faults (mock-idp mutates its own token).
    for (what, claims) in [
        ("IdP: iss + 1", json!({"iss": format!("{iss}1")})),
        ("IdP: aud + 1", json!({"aud": format!("{CLIENT_ID}1")})),
        ("IdP: no sub", json!({"sub": null})),
        ("IdP: no iat", json!({"iat": null})),
        ("IdP: nonce replaced", json!({"nonce": "012345678"})),
    ] {
        login_case(
            s,
            &b,
            what,
            "/idp-claims",
            |_| Fault::IdTokenClaims(claims),
            reject,
        )
        .await;
    }
    assert_eq!(
        stack.upstream.count(),
        1,
        "only the warm-up reached the upstream"
    );
    assert_no_crash(&stack);
}

/// D45 / OIDC Core §3.1.3.7 item 3 ("MUST be rejected if ... it contains additional audiences not
/// trusted by the Client") and the FAPI2 client test "extra untrusted aud": an audience list with
/// the client id and an untrusted audience is refused even when `azp` names the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_token_with_an_extra_untrusted_audience_is_rejected() {
    let stack = Stack::start_default().await;
    let b = idp_session_browser(&stack).await;
    let s = &stack;
    id_token_case(
        s,
        &b,
        "aud [client, untrusted], azp = client",
        |n| {
            signed(
                s,
                json!({}),
                &patched(
                    &good_claims(s, n),
                    &json!({"aud": [CLIENT_ID, "untrusted"], "azp": CLIENT_ID}),
                ),
            )
        },
        Expect::Reject(502),
    )
    .await;
    assert_no_crash(&stack);
}

// ------------------------------------------------------------------------------------------------
// D37: ES256 (rp sig-es256 accept; bad-sig-es256 and CVE-2022-21449 "psychic signatures" reject)
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_signatures() {
    let stack = Stack::start(StackOptions {
        idp: MockIdpConfig {
            signing_alg: SigningAlg::Es256,
            ..MockIdpConfig::default()
        },
        ..StackOptions::default()
    })
    .await;
    let b = idp_session_browser(&stack).await; // the IdP's own ES256 tokens are accepted
    let s = &stack;
    let kid = stack.idp.current_kid();
    let reject = Expect::Reject(502);
    id_token_case(
        s,
        &b,
        "valid ES256",
        |n| signed(s, json!({}), &good_claims(s, n)),
        Expect::Accept,
    )
    .await;
    id_token_case(
        s,
        &b,
        "ES256 signature byte flipped",
        |n| {
            let t = signed(s, json!({}), &good_claims(s, n));
            let mut sig = unb64(t.split('.').nth(2).unwrap());
            sig[40] ^= 0x80;
            with_segment(&t, 2, &b64(sig))
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "ECDSA r = s = 0 (CVE-2022-21449)",
        |n| {
            with_segment(
                &signed(s, json!({}), &good_claims(s, n)),
                2,
                &b64([0u8; 64]),
            )
        },
        reject,
    )
    .await;
    // r = s = n, the order of P-256 (also "zero" modulo n).
    let order = hex("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551");
    id_token_case(
        s,
        &b,
        "ECDSA r = s = n",
        |n| {
            with_segment(
                &signed(s, json!({}), &good_claims(s, n)),
                2,
                &b64([order.clone(), order.clone()].concat()),
            )
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "ES256 signature DER-encoded",
        |n| {
            let t = signed(s, json!({}), &good_claims(s, n));
            let raw = unb64(t.split('.').nth(2).unwrap());
            let int = |x: &[u8]| {
                let mut v = x.to_vec();
                if v[0] & 0x80 != 0 {
                    v.insert(0, 0);
                }
                [vec![0x02, v.len() as u8], v].concat()
            };
            let body = [int(&raw[..32]), int(&raw[32..])].concat();
            let der = [vec![0x30, body.len() as u8], body].concat();
            with_segment(&t, 2, &b64(der))
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "ES256 signature truncated",
        |n| {
            let t = signed(s, json!({}), &good_claims(s, n));
            let raw = unb64(t.split('.').nth(2).unwrap());
            with_segment(&t, 2, &b64(&raw[..63]))
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "alg RS256 on the ES256 key",
        |n| {
            let t = signed(s, json!({}), &good_claims(s, n));
            with_segment(
                &t,
                0,
                &b64(json!({"alg": "RS256", "kid": kid, "typ": "JWT"}).to_string()),
            )
        },
        reject,
    )
    .await;
    id_token_case(
        s,
        &b,
        "ES384 header on the ES256 signature",
        |n| {
            let t = signed(s, json!({}), &good_claims(s, n));
            with_segment(
                &t,
                0,
                &b64(json!({"alg": "ES384", "kid": kid, "typ": "JWT"}).to_string()),
            )
        },
        reject,
    )
    .await;
    assert_eq!(stack.upstream.count(), 1);
    assert_no_crash(&stack);
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

// ------------------------------------------------------------------------------------------------
// C. Token endpoint faults (C23-C29, C33, C35; FAPI2 "no expires_in" and "token_type
// case-inverted" accept)
// ------------------------------------------------------------------------------------------------

/// A stack whose IdP cluster goes through an [`IdpProxy`].
async fn proxied_stack(opts: StackOptions) -> (Stack, IdpProxy) {
    let proxy = IdpProxy::start().await;
    let stack = Stack::start(StackOptions {
        tweak: Some(proxy.tweak()),
        ..opts
    })
    .await;
    proxy.set_target(stack.idp.addr());
    (stack, proxy)
}

fn token_body(content_type: &str, body: &str) -> Fault {
    Fault::TokenBody {
        content_type: content_type.into(),
        body: body.into(),
    }
}

fn session_max_age(r: &Resp) -> Option<i64> {
    r.set_cookie(SESSION_COOKIE)
        .and_then(|c| c.max_age())
        .map(|d| d.whole_seconds())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_faults() {
    let (stack, proxy) = proxied_stack(StackOptions::default()).await;
    let b = idp_session_browser(&stack).await;
    let s = &stack;
    let reject = Expect::Reject(502);
    let json_ct = "application/json";
    let cases: Vec<(&str, Fault, Expect)> = vec![
        ("500", Fault::TokenStatus(500), reject),
        ("400 (invalid_grant-like)", Fault::TokenStatus(400), reject),
        ("401", Fault::TokenStatus(401), reject),
        ("200 with an empty body", token_body(json_ct, ""), reject),
        (
            "HTML",
            token_body("text/html", "<html><body>Login</body></html>"),
            reject,
        ),
        (
            "truncated JSON",
            token_body(
                json_ct,
                r#"{"access_token":"abc","token_type":"Bearer","id_tok"#,
            ),
            reject,
        ),
        ("JSON array", token_body(json_ct, "[]"), reject),
        ("JSON null", token_body(json_ct, "null"), reject),
        (
            "non-string access_token",
            Fault::TokenResponseFields(json!({"access_token": 123})),
            reject,
        ),
        (
            "empty access_token",
            Fault::TokenResponseFields(json!({"access_token": ""})),
            reject,
        ),
        (
            "no access_token",
            Fault::TokenResponseFields(json!({"access_token": null})),
            reject,
        ),
        (
            "no id_token",
            Fault::TokenResponseFields(json!({"id_token": null})),
            reject,
        ),
        (
            "empty id_token",
            Fault::TokenResponseFields(json!({"id_token": ""})),
            reject,
        ),
        (
            "non-string id_token",
            Fault::TokenResponseFields(json!({"id_token": {"a": 1}})),
            reject,
        ),
        (
            "token_type not-bearer",
            Fault::TokenResponseFields(json!({"token_type": "not-bearer"})),
            reject,
        ),
        (
            "token_type mac",
            Fault::TokenResponseFields(json!({"token_type": "mac"})),
            reject,
        ),
        (
            "token_type missing",
            Fault::TokenResponseFields(json!({"token_type": null})),
            reject,
        ),
        (
            "token_type bEARER",
            Fault::TokenResponseFields(json!({"token_type": "bEARER"})),
            Expect::Accept,
        ),
        (
            "expires_in -1",
            Fault::TokenResponseFields(json!({"expires_in": -1})),
            reject,
        ),
        (
            "expires_in 1e12",
            Fault::TokenResponseFields(json!({"expires_in": 1e12})),
            reject,
        ),
        (
            "expires_in text",
            Fault::TokenResponseFields(json!({"expires_in": "soon"})),
            reject,
        ),
        (
            "expires_in \"300\"",
            Fault::TokenResponseFields(json!({"expires_in": "300"})),
            Expect::Accept,
        ),
        (
            "10 MB body",
            token_body(
                json_ct,
                &format!("{{\"access_token\":\"{}\"}}", "a".repeat(10 * 1024 * 1024)),
            ),
            reject,
        ),
        ("302 to the issuer", Fault::TokenRedirect, reject),
        // The SDK's header reader panicked on this (a trapped VM); read in place, it is a header.
        (
            "a header value that is not UTF-8",
            Fault::TokenHeaderNotUtf8,
            Expect::Accept,
        ),
    ];
    for (i, (what, fault, expect)) in cases.into_iter().enumerate() {
        let t = Instant::now();
        let r = login_case(s, &b, what, &format!("/token-case/{i}"), |_| fault, expect).await;
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "{what}: answered promptly"
        );
        if expect != Expect::Accept {
            assert!(
                !r.body.contains("access_token"),
                "{what}: no token material in the error page"
            );
        }
    }
    // Redirects are never followed: after the token POST nothing asked for `{issuer}/`.
    let lines = proxy.request_lines();
    assert!(
        !lines.iter().any(|l| l.starts_with("GET / ")),
        "the 302 from the token endpoint was not followed: {lines:?}"
    );

    // No `expires_in` (and no refresh token): accepted with the bounded default lifetime (600 s).
    let r = login_case(
        s,
        &b,
        "no expires_in",
        "/no-expiry",
        |_| Fault::TokenResponseFields(json!({"expires_in": null, "refresh_token": null})),
        Expect::Accept,
    )
    .await;
    let max_age = session_max_age(&r).expect("Max-Age");
    assert!(
        (590..=600).contains(&max_age),
        "default lifetime bounded: Max-Age={max_age}"
    );

    // C35: a code presented with another login's PKCE verifier -> the IdP says invalid_grant.
    let (_s1, cb1) = to_callback(s, &b, "/pkce-1").await;
    let (_s2, cb2) = to_callback(s, &b, "/pkce-2").await;
    let code1 = cb1.location_param("code").unwrap();
    let mut swapped = cb2.location().unwrap();
    let pairs: Vec<(String, String)> = swapped
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "code" {
                code1.clone()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    swapped.query_pairs_mut().clear().extend_pairs(pairs);
    let before = snapshot(s);
    let r = b.get(swapped.as_str()).await;
    assert_refused(
        s,
        "code of another login (PKCE mismatch)",
        &r,
        502,
        before,
        1,
    );
    assert_eq!(
        stack.idp.stats().last_token_error.as_deref(),
        Some("invalid_grant")
    );

    assert_eq!(stack.upstream.count(), 1);
    assert_no_crash(&stack);
}

// ------------------------------------------------------------------------------------------------
// C30-C32, J88: slow, hanging, dribbling and resetting token endpoints; a client that leaves
// ------------------------------------------------------------------------------------------------

/// One callback against a token endpoint that never answers in time; returns the answer and how
/// long it took.
async fn slow_token_case(
    stack: &Stack,
    b: &Browser,
    what: &str,
    set: impl FnOnce(),
    unset: impl FnOnce(),
) -> (Resp, Duration) {
    let (_start, to_cb) = to_callback(stack, b, "/slow").await;
    let before = snapshot(stack);
    set();
    let t = Instant::now();
    let r = b.follow_one(&to_cb).await;
    let took = t.elapsed();
    unset();
    eprintln!("{what}: {} after {took:?}", r.status);
    assert!(!sets_session(&r), "{what}: no session");
    assert_eq!(
        stack.upstream.count(),
        before.upstream,
        "{what}: nothing upstream"
    );
    (r, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_timeouts_fail_closed() {
    let (stack, proxy) = proxied_stack(StackOptions::default()).await;
    let b = idp_session_browser(&stack).await;
    let idp = &stack.idp;
    type Switch<'a> = Box<dyn FnOnce() + 'a>;
    let cases: Vec<(&str, Switch, Switch)> = vec![
        (
            "hang",
            Box::new(|| idp.set_fault(Fault::TokenHang)),
            Box::new(|| idp.set_fault(Fault::None)),
        ),
        (
            "answer after 6 s",
            Box::new(|| idp.set_fault(Fault::TokenDelay(Duration::from_secs(6)))),
            Box::new(|| idp.set_fault(Fault::None)),
        ),
        (
            "body dribbles one byte per 100 ms",
            Box::new(|| proxy.set_mode(ProxyMode::DribbleToken(Duration::from_millis(100)))),
            Box::new(|| proxy.set_mode(ProxyMode::Pass)),
        ),
    ];
    for (what, set, unset) in cases {
        let (r, took) = slow_token_case(&stack, &b, what, set, unset).await;
        assert!(
            r.status == 502 || r.status == 503,
            "{what}: fails closed with a 5xx: {}",
            r.describe()
        );
        assert!(
            took >= Duration::from_millis(4500) && took < Duration::from_secs(8),
            "{what}: bounded by the 5 s callout timeout, took {took:?}"
        );
    }

    // C32: the connection is reset when the token request arrives: at most one attempt more,
    // then fail closed.
    let token_posts = |p: &IdpProxy| {
        p.request_lines()
            .iter()
            .filter(|l| l.starts_with("POST "))
            .count()
    };
    let posts_before = token_posts(&proxy);
    let (r, took) = slow_token_case(
        &stack,
        &b,
        "TCP reset",
        || proxy.set_mode(ProxyMode::ResetToken),
        || proxy.set_mode(ProxyMode::Pass),
    )
    .await;
    assert!(
        r.status == 502 || r.status == 503,
        "reset fails closed: {}",
        r.describe()
    );
    assert!(took < Duration::from_secs(6), "reset: {took:?}");
    let attempts = token_posts(&proxy) - posts_before;
    assert!(
        (1..=2).contains(&attempts),
        "token request attempts after a reset: {attempts}"
    );

    // J88: the client leaves while the token callout is in flight: no panic, the answer is
    // discarded, the gateway keeps working.
    let (_start, to_cb) = to_callback(&stack, &b, "/leaver").await;
    let cb = to_cb.location().unwrap();
    let target = format!("{}?{}", cb.path(), cb.query().unwrap_or(""));
    let cookie = b
        .jar()
        .header_for(&cb, &reqwest::Method::GET, false)
        .expect("login cookie");
    idp.set_fault(Fault::TokenDelay(Duration::from_secs(2)));
    let token_before = idp.stats().token;
    raw_get_and_leave(
        &stack,
        target.as_bytes(),
        &[&format!("Cookie: {cookie}")],
        Duration::from_millis(300),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    idp.set_fault(Fault::None);
    assert_eq!(
        idp.stats().token,
        token_before + 1,
        "the token call was made"
    );
    let flow = stack
        .login(&stack.browser(), &stack.url("/after-leaver"))
        .await;
    assert_eq!(
        flow.landed.status,
        200,
        "still working: {}",
        flow.landed.describe()
    );

    assert_no_crash(&stack);
}

/// C31 as the issue states it: a token endpoint slower than the filter's 5 s callout timeout ends
/// in 503 (IdP unavailable), like an unreachable IdP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_timeout_is_503() {
    let stack = Stack::start_default().await;
    let b = idp_session_browser(&stack).await;
    let (_start, to_cb) = to_callback(&stack, &b, "/slow").await;
    let before = snapshot(&stack);
    stack
        .idp
        .set_fault(Fault::TokenDelay(Duration::from_secs(6)));
    let r = b.follow_one(&to_cb).await;
    assert_refused(
        &stack,
        "token endpoint beyond the timeout",
        &r,
        503,
        before,
        1,
    );
    assert_no_crash(&stack);
}

/// C32 likewise: a reset connection to the token endpoint is "IdP unreachable" (503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_reset_is_503() {
    let (stack, proxy) = proxied_stack(StackOptions::default()).await;
    let b = idp_session_browser(&stack).await;
    let (_start, to_cb) = to_callback(&stack, &b, "/reset").await;
    let before = snapshot(&stack);
    proxy.set_mode(ProxyMode::ResetToken);
    let r = b.follow_one(&to_cb).await;
    assert_eq!(r.status, 503, "{}", r.describe());
    assert!(!sets_session(&r));
    assert_eq!(stack.upstream.count(), before.upstream);
    assert_no_crash(&stack);
}

// ------------------------------------------------------------------------------------------------
// C34 and the RP conformance basics: client_secret_basic with URL-encoded credentials,
// grant_type, redirect_uri, PKCE verifier; rp-response_type-code, rp-scope-userinfo-claims,
// rp-token_endpoint-client_secret_basic
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authentication_and_pkce_as_the_idp_sees_them() {
    // Credentials with every character client_secret_basic must URL-encode (RFC 6749 §2.3.1): a
    // `:` in the id would split it wrongly if sent raw.
    let client_id = "gate:one/+&x y";
    let secret = "s3 cr:t+/%&=?";
    let (stack, proxy) = proxied_stack(
        StackOptions {
            idp: MockIdpConfig {
                clients: vec![ClientConfig {
                    id: client_id.into(),
                    secret: secret.into(),
                    redirect_uris: vec!["https://app.example.com/oauth2/callback".into()],
                    post_logout_redirect_uris: Vec::new(),
                }],
                ..MockIdpConfig::default()
            },
            env: [("OIDC_CLIENT_SECRET".to_string(), secret.to_string())].into(),
            ..StackOptions::default()
        }
        .with_config(json!({
            "client_id": client_id,
            "scopes": ["openid", "profile", "email", "phone", "address"],
        })),
    )
    .await;
    let b = stack.browser();
    let flow = stack.login(&b, &stack.url("/conformance?q=1")).await;
    assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());

    // The authorization request.
    let p = |k: &str| flow.start.location_param(k);
    assert_eq!(p("response_type").as_deref(), Some("code"));
    assert_eq!(p("client_id").as_deref(), Some(client_id));
    assert_eq!(
        p("redirect_uri").as_deref(),
        Some("https://app.example.com/oauth2/callback")
    );
    let scope = p("scope").unwrap();
    let scopes: BTreeSet<&str> = scope.split(' ').collect();
    for sc in ["openid", "profile", "email", "phone", "address"] {
        assert!(scopes.contains(sc), "scope {sc} requested: {scope}");
    }
    assert!(
        p("prompt").is_none() && p("max_age").is_none(),
        "no prompt=none/max_age=0"
    );
    let challenge = p("code_challenge").unwrap();
    assert_eq!(p("code_challenge_method").as_deref(), Some("S256"));

    // The token request, as the IdP saw it.
    let st = stack.idp.stats();
    assert_eq!(
        st.last_token_auth_method.as_deref(),
        Some("client_secret_basic")
    );
    let form = &st.last_token_form;
    assert_eq!(
        form.get("grant_type").map(String::as_str),
        Some("authorization_code")
    );
    assert_eq!(
        form.get("redirect_uri").map(String::as_str),
        Some("https://app.example.com/oauth2/callback"),
        "same redirect_uri as in the authorization request"
    );
    assert!(
        !form.contains_key("client_secret"),
        "secret not in the body: {form:?}"
    );
    let verifier = form.get("code_verifier").expect("code_verifier");
    assert!((43..=128).contains(&verifier.len()), "verifier length");
    assert_ne!(verifier, &challenge, "the verifier is not the challenge");
    // mock-idp checks BASE64URL(SHA256(code_verifier)) == code_challenge and refuses otherwise
    // (invalid_grant); the login succeeding is that check passing.
    assert_eq!((st.token, st.token_ok, st.token_errors), (1, 1, 0));
    // The raw Authorization header: Basic base64(urlencode(id) ":" urlencode(secret)).
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let want = STANDARD.encode(format!("{}:{}", enc(client_id), enc(secret)));
    let token_head = proxy
        .log()
        .into_iter()
        .find(|h| h.starts_with("POST ") && h.lines().next().unwrap_or("").contains("/token"))
        .expect("token request seen by the proxy");
    let auth = token_head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        })
        .map(|(_, v)| v.trim().to_string())
        .expect("Authorization header on the token request");
    let (scheme, credentials) = auth.split_once(' ').expect("scheme and credentials");
    assert!(scheme.eq_ignore_ascii_case("basic"), "{auth}");
    assert_eq!(
        credentials, want,
        "Basic base64(urlencode(id):urlencode(secret))"
    );
    assert_no_crash(&stack);
}

// ------------------------------------------------------------------------------------------------
// A4, A5, E62, B16/RFC 9207: discovery documents (rp-discovery-openid-configuration,
// rp-discovery-jwks_uri-keys, rp-discovery-issuer-not-matching-config)
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_discovery_documents() {
    let stack = Stack::start_default().await;
    let iss = stack.idp.issuer();
    let port = stack.idp.addr().port();
    // Refused documents are never cached, so each case fetches discovery again.
    let refused: Vec<(&str, Fault)> = vec![
        (
            "issuer with trailing slash",
            Fault::DiscoveryIssuer(format!("{iss}/")),
        ),
        (
            "issuer in upper case",
            Fault::DiscoveryIssuer(iss.to_ascii_uppercase()),
        ),
        (
            "issuer of an attacker",
            Fault::DiscoveryIssuer("https://attacker.example".into()),
        ),
        (
            "issuer missing",
            Fault::DiscoveryFields(json!({"issuer": null})),
        ),
        (
            "token endpoint on another host",
            Fault::DiscoveryFields(json!({"token_endpoint": "http://attacker.example/token"})),
        ),
        (
            "token endpoint on another port",
            Fault::DiscoveryFields(
                json!({"token_endpoint": format!("http://127.0.0.1:{}/token", port + 1)}),
            ),
        ),
        (
            "jwks_uri on another host",
            Fault::DiscoveryFields(json!({"jwks_uri": "http://attacker.example/keys"})),
        ),
        (
            "authorization endpoint javascript:",
            Fault::DiscoveryFields(json!({"authorization_endpoint": "javascript:alert(1)"})),
        ),
        (
            "PKCE without S256",
            Fault::DiscoveryFields(json!({"code_challenge_methods_supported": ["plain"]})),
        ),
        (
            "token_endpoint not a string",
            Fault::DiscoveryFields(json!({"token_endpoint": 7})),
        ),
    ];
    for (what, fault) in refused {
        stack.idp.set_fault(fault);
        let b = stack.browser();
        let before = snapshot(&stack);
        let r = b.get(&stack.url("/discovery")).await;
        assert_eq!(
            r.status,
            502,
            "{what}: no authorization redirect: {}",
            r.describe()
        );
        assert!(r.header("location").is_none(), "{what}");
        assert!(
            !sets_login_cookie(&r) && !sets_session(&r),
            "{what}: no cookies"
        );
        let st = stack.idp.stats();
        assert_eq!(
            st.discovery,
            before.discovery + 1,
            "{what}: discovery fetched"
        );
        assert_eq!(
            (st.authorize_get, st.jwks, st.token),
            (0, 0, 0),
            "{what}: nothing else"
        );
        assert_eq!(stack.upstream.count(), 0, "{what}");
    }

    // A5: a random jwks_uri is fetched exactly as given; the provider does not advertise RFC 9207
    // `iss`, so a callback without it is accepted (and one with a foreign `iss` still is not).
    let name = b64(integration::random_bytes(12));
    stack.idp.set_fault(Fault::DiscoveryFields(json!({
        "jwks_uri": format!("{iss}/jwks/{name}"),
        "authorization_response_iss_parameter_supported": false,
    })));
    let b = stack.browser();
    let (_start, to_cb) = to_callback(&stack, &b, "/random-jwks").await;
    let mut cb = to_cb.location().unwrap();
    let without_iss: Vec<(String, String)> = cb
        .query_pairs()
        .filter(|(k, _)| k != "iss")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    cb.query_pairs_mut().clear().extend_pairs(&without_iss);
    let r = b.get(cb.as_str()).await;
    assert_eq!(
        r.status,
        302,
        "no iss, not advertised: accepted: {}",
        r.describe()
    );
    assert!(sets_session(&r));
    let st = stack.idp.stats();
    assert_eq!(st.jwks, 1);
    assert_eq!(
        st.last_jwks_path,
        Some(format!("/jwks/{name}")),
        "exactly the advertised jwks_uri"
    );

    let b = stack.browser();
    let (_start, to_cb) = to_callback(&stack, &b, "/foreign-iss").await;
    let mut cb = to_cb.location().unwrap();
    let foreign: Vec<(String, String)> = cb
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "iss" {
                "https://attacker.example".into()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    cb.query_pairs_mut().clear().extend_pairs(&foreign);
    let before = snapshot(&stack);
    let r = b.get(cb.as_str()).await;
    assert_refused(
        &stack,
        "foreign iss although not advertised",
        &r,
        400,
        before,
        0,
    );
    assert_no_crash(&stack);
}

// ------------------------------------------------------------------------------------------------
// E59-E61, D52, D53 (single key), D54: JWKS outages, junk and weak keys
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_outages_junk_and_weak_keys() {
    let stack = Stack::start_default().await;
    let s = &stack;
    let b = stack.browser(); // no warm-up: the JWKS cache starts cold
                             // Cold cache: nothing to verify with -> 503, nothing forwarded, one JWKS fetch per attempt.
    let cold: Vec<(&str, Fault)> = vec![
        ("JWKS 500", Fault::JwksStatus(500)),
        ("JWKS 404", Fault::JwksStatus(404)),
        ("JWKS HTML", Fault::JwksBody("<html>keys</html>".into())),
        (
            "JWKS {\"keys\":[]}",
            Fault::JwksBody(r#"{"keys":[]}"#.into()),
        ),
        (
            "JWKS of junk keys only",
            Fault::JwksBody(
                json!({"keys": [
                    {"kty": "AKP", "alg": "ML-DSA-44", "pub": "AAAA"},
                    {"kty": "OIDF-CONFORMANCE-UNSUPPORTED"},
                    {"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "tiny"},
                ]})
                .to_string(),
            ),
        ),
    ];
    for (i, (what, fault)) in cold.into_iter().enumerate() {
        let jwks_before = stack.idp.stats().jwks;
        // The fault is active through the callback: the filter fetches keys after the token answer.
        login_case(
            s,
            &b,
            what,
            &format!("/cold/{i}"),
            |_| fault,
            Expect::Reject(503),
        )
        .await;
        assert_eq!(
            stack.idp.stats().jwks,
            jwks_before + 1,
            "{what}: one JWKS fetch"
        );
    }

    // D52: the JWKS publishes a 1024-bit RSA key beside the real one and the ID token is signed
    // with it: the weak key is ignored, the token refused.
    let jwks_before = stack.idp.stats().jwks;
    login_case(
        s,
        &b,
        "ID token signed with a 1024-bit key",
        "/weak",
        |_| Fault::IdTokenSignWithWeakRsaKey,
        Expect::Reject(502),
    )
    .await;
    assert_eq!(
        stack.idp.stats().jwks,
        jwks_before + 1,
        "JWKS fetched (with the weak key in it)"
    );

    // Warm now (the real key was kept). D53: no kid, one usable key -> accepted.
    login_case(
        s,
        &b,
        "normal login, warm cache",
        "/warm",
        |_| Fault::None,
        Expect::Accept,
    )
    .await;
    login_case(
        s,
        &b,
        "no kid, one key",
        "/no-kid",
        |_| Fault::IdTokenHeader(json!({"kid": null})),
        Expect::Accept,
    )
    .await;
    // E60/E61 with a warm cache: the keys in hand keep working while the JWKS is down or garbage.
    let jwks_before = stack.idp.stats().jwks;
    for (what, fault) in [
        ("JWKS 500, warm cache", Fault::JwksStatus(500)),
        (
            "JWKS garbage, warm cache",
            Fault::JwksBody("garbage".into()),
        ),
        (
            "JWKS empty, warm cache",
            Fault::JwksBody(r#"{"keys":[]}"#.into()),
        ),
    ] {
        login_case(s, &b, what, "/warm-outage", |_| fault, Expect::Accept).await;
    }
    assert_eq!(
        stack.idp.stats().jwks,
        jwks_before,
        "no JWKS fetch needed while warm"
    );
    // A key the gateway does not hold (an unknown kid) makes it refetch, and the IdP answers
    // garbage: that login fails, and the keys in hand are not replaced by nothing.
    login_case(
        s,
        &b,
        "unknown kid while the JWKS is garbage",
        "/warm-refetch",
        |_| {
            Fault::All(vec![
                Fault::JwksBody("garbage".into()),
                Fault::IdTokenHeader(json!({"kid": "not-a-key-of-this-idp"})),
            ])
        },
        Expect::Reject(502),
    )
    .await;
    assert_eq!(
        stack.idp.stats().jwks,
        jwks_before + 1,
        "the unknown kid was looked for once, and answered with garbage"
    );
    login_case(
        s,
        &b,
        "normal login after the garbage refetch",
        "/warm-after",
        |_| Fault::None,
        Expect::Accept,
    )
    .await;
    assert_eq!(
        stack.idp.stats().jwks,
        jwks_before + 1,
        "verified with the keys kept, not fetched again"
    );
    assert_eq!(stack.upstream.count(), 0);
    assert_no_crash(&stack);
}

/// D53/D54 (rp-id_token-kid-absent-multiple-jwks, oidcc-client-test-ignores-unparseable-key-in-jwks):
/// a JWKS of several keys without `kid` plus unusable keys; an ID token without `kid` is verified
/// by trying the keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kid_absent_with_several_keys_and_junk() {
    let stack = Stack::start_default().await;
    let s = &stack;
    let idp = stack.idp.state();
    tokio::task::spawn_blocking(move || idp.rotate_keys_keep_old())
        .await
        .unwrap();
    let mut keys: Vec<Value> = stack.idp.jwks()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| patched(k, &json!({"kid": null})))
        .collect();
    assert_eq!(keys.len(), 2);
    keys.insert(
        0,
        json!({"kty": "AKP", "alg": "ML-DSA-44", "pub": "AAAA", "kid": "pq"}),
    );
    keys.insert(1, json!({"kty": "OIDF-CONFORMANCE-UNSUPPORTED"}));
    keys.push(json!({"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"}));
    let doc = json!({ "keys": keys }).to_string();
    let b = stack.browser();
    login_case(
        s,
        &b,
        "no kid, two keys without kid + junk",
        "/trial",
        |_| {
            Fault::All(vec![
                Fault::JwksBody(doc.clone()),
                Fault::IdTokenHeader(json!({"kid": null})),
            ])
        },
        Expect::Accept,
    )
    .await;
    assert_eq!(stack.idp.stats().jwks, 1);
    assert_no_crash(&stack);
}

/// D55/D56 (rp-key-rotation-op-sign-key-native, rp-key-rotation-op-sign-key): the IdP rotates
/// its signing key after the gateway cached the JWKS; the next login presents an unknown `kid`:
/// one JWKS refetch, accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_refetches_the_jwks_once() {
    let stack = Stack::start_default().await;
    let b = idp_session_browser(&stack).await;
    assert_eq!(stack.idp.stats().jwks, 1);
    let idp = stack.idp.state();
    tokio::task::spawn_blocking(move || idp.rotate_keys())
        .await
        .unwrap();
    login_case(
        &stack,
        &b,
        "login after a key rotation",
        "/rotated",
        |_| Fault::None,
        Expect::Accept,
    )
    .await;
    assert_eq!(stack.idp.stats().jwks, 2, "one refetch");
    login_case(
        &stack,
        &b,
        "next login",
        "/rotated-2",
        |_| Fault::None,
        Expect::Accept,
    )
    .await;
    assert_eq!(stack.idp.stats().jwks, 2, "no more fetches");
    assert_no_crash(&stack);
}

// ------------------------------------------------------------------------------------------------
// D57, E61 (refetch of garbage keeps the last good set), G70/G72 for machine clients
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_unknown_kid_flood_is_rate_limited() {
    let aud = "api://oidc-gate-demo";
    let stack = Arc::new(
        Stack::start(
            StackOptions::default().with_config(json!({"bearer_tokens": {"audiences": [aud]}})),
        )
        .await,
    );
    let api = stack.api_client();
    let sub = subject_for(USERNAME);
    let good = stack
        .idp
        .mint_access_token(&sub, aud, Duration::from_secs(600));
    let claims = jwt_payload(&good);
    let bearer = |t: &str| format!("Bearer {t}");

    let r = api
        .get_with(&stack.url("/api/a"), &[("authorization", &bearer(&good))])
        .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(
        stack.upstream.last().unwrap().header_all("authorization"),
        vec![bearer(&good)]
    );
    assert_eq!(stack.idp.stats().jwks, 1);

    // Two Authorization headers (CVE-2021-32777 pattern), a non-Bearer scheme, garbage: 401.
    let up = stack.upstream.count();
    for (what, headers) in [
        (
            "two Authorization headers",
            vec![
                ("authorization", bearer(&good)),
                ("authorization", bearer(&good)),
            ],
        ),
        ("Basic", vec![("authorization", "Basic YTpi".to_string())]),
        (
            "garbage bearer",
            vec![("authorization", "Bearer x".to_string())],
        ),
        (
            "empty bearer",
            vec![("authorization", "Bearer ".to_string())],
        ),
    ] {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = api.get_with(&stack.url("/api/b"), &h).await;
        assert_eq!(r.status, 401, "{what}: {}", r.describe());
    }
    assert_eq!(stack.upstream.count(), up, "nothing forwarded");

    // E61: an unknown kid makes the filter refetch the JWKS (the first refetch of the 30 s
    // budget); the IdP serves garbage; the last good key set stays in use.
    stack
        .idp
        .set_fault(Fault::JwksBody("{\"keys\": \"garbage\"}".into()));
    let unknown = stack
        .idp
        .sign_jwt(json!({"kid": "rotated-away"}), claims.clone());
    let r = api
        .get_with(
            &stack.url("/api/c"),
            &[("authorization", &bearer(&unknown))],
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.describe());
    assert_eq!(
        stack.idp.stats().jwks,
        2,
        "refetched once for the unknown kid"
    );
    stack.idp.set_fault(Fault::None);
    let r = api
        .get_with(&stack.url("/api/d"), &[("authorization", &bearer(&good))])
        .await;
    assert_eq!(
        r.status,
        200,
        "the last good JWKS is still in use: {}",
        r.describe()
    );

    // D57: 1000 tokens with random unknown kids: all refused, refetches rate-limited.
    let up = stack.upstream.count();
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..16 {
        let stack = stack.clone();
        let claims = claims.clone();
        let next = next.clone();
        set.spawn(async move {
            let api = stack.api_client();
            let mut statuses = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 1000 {
                let kid = b64(integration::random_bytes(9));
                let tok = stack.idp.sign_jwt(json!({"kid": kid}), claims.clone());
                let r = api
                    .get_with(
                        &stack.url("/api/flood"),
                        &[("authorization", &format!("Bearer {tok}"))],
                    )
                    .await;
                statuses.push(r.status);
            }
            statuses
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.expect("flood task"));
    }
    assert_eq!(all.len(), 1000);
    assert!(
        all.iter().all(|s| *s == 401),
        "all refused: {:?}",
        all.iter()
            .filter(|s| **s != 401)
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(stack.upstream.count(), up, "nothing forwarded");
    let jwks = stack.idp.stats().jwks;
    let allowed = 2 + 1 + t.elapsed().as_secs() / 30;
    assert!(
        jwks <= allowed,
        "JWKS refetches rate-limited: {jwks} fetches (allowed {allowed})"
    );
    eprintln!(
        "flood: 1000 unknown kids in {:?}, JWKS fetches {jwks}",
        t.elapsed()
    );
    assert_no_crash(&stack);
}

// ------------------------------------------------------------------------------------------------
// I83-I86: refresh (OIDC Core §12.2; oauth2-proxy#3333)
// ------------------------------------------------------------------------------------------------

/// The access token the upstream saw on its last request.
fn upstream_token(stack: &Stack) -> String {
    let seen = stack.upstream.last().expect("upstream request");
    let auth = seen.header_all("authorization");
    assert_eq!(auth.len(), 1, "one Authorization upstream: {auth:?}");
    auth[0].trim_start_matches("Bearer ").to_string()
}

/// From the gateway's login redirect: the IdP (which remembers the browser) sends it back, the
/// callback sets the session, the original URL is fetched.
async fn relogin(b: &Browser, start: &Resp) -> Resp {
    let to_cb = sign_in(b, start).await;
    let cb = b.follow_one(&to_cb).await;
    assert_eq!(cb.status, 302, "callback: {}", cb.describe());
    b.follow_one(&cb).await
}

/// Access-token lifetime of the refresh tests' IdP.
const SHORT_TTL_SECS: u64 = 2;

/// Waits until tokens obtained now are due for a refresh: past half their lifetime (the host's
/// clock counts whole seconds, hence the margin).
async fn until_due() {
    tokio::time::sleep(Duration::from_millis(SHORT_TTL_SECS * 500 + 150)).await;
}

/// A stack whose access tokens live 2 s: a token is refreshed in the second half of its life,
/// so a request [`until_due`] after the session's last tokens refreshes it.
async fn refresh_stack(rotate_refresh_tokens: bool) -> Arc<Stack> {
    refresh_stack_with(rotate_refresh_tokens, StackOptions::default()).await
}

/// [`refresh_stack`] on other stack options.
async fn refresh_stack_with(rotate_refresh_tokens: bool, options: StackOptions) -> Arc<Stack> {
    Arc::new(
        Stack::start(StackOptions {
            idp: MockIdpConfig {
                access_token_ttl: Duration::from_secs(SHORT_TTL_SECS),
                rotate_refresh_tokens,
                ..MockIdpConfig::default()
            },
            ..options
        })
        .await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_attacks() {
    let stack = refresh_stack(true).await;
    let b = stack.browser();
    let flow = stack.login(&b, &stack.url("/r0")).await;
    assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());
    let refreshes = || stack.idp.stats().refresh;
    assert_eq!(refreshes(), 0, "a new token is not refreshed at once");
    let t0 = upstream_token(&stack);
    until_due().await;
    let r = b.get(&stack.url("/r1")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_ne!(
        upstream_token(&stack),
        t0,
        "refreshed access token forwarded"
    );
    assert_eq!(refreshes(), 1);

    // I83: the refreshed ID token names another subject or issuer -> the session ends: the
    // browser is sent to log in again, its session cookie deleted, nothing forwarded.
    for (what, claims) in [
        ("other sub", json!({"sub": "someone-else"})),
        (
            "other iss",
            json!({"iss": format!("{}1", stack.idp.issuer())}),
        ),
        ("other aud", json!({"aud": "other-client"})),
    ] {
        until_due().await;
        stack.idp.set_fault(Fault::IdTokenClaims(claims));
        let up = stack.upstream.count();
        let before_refresh = refreshes();
        let r = b.get(&stack.url("/r3")).await;
        stack.idp.set_fault(Fault::None);
        assert_eq!(refreshes(), before_refresh + 1, "{what}: one refresh call");
        assert!(
            is_login_redirect(&stack, &r),
            "{what}: login again: {}",
            r.describe()
        );
        assert!(
            deletes(&r, SESSION_COOKIE),
            "{what}: session cookie deleted"
        );
        assert_eq!(stack.upstream.count(), up, "{what}: nothing forwarded");
        let landed = relogin(&b, &r).await;
        assert_eq!(
            landed.status,
            200,
            "{what}: re-login works: {}",
            landed.describe()
        );
    }

    // I84: the IdP refuses the refresh (400, as for invalid_grant): an API client gets 401, a
    // browser exactly one login redirect, and the re-login works (no loop).
    until_due().await;
    stack.idp.set_fault(Fault::TokenStatus(400));
    let api = b.with_mode(
        stack.gateway_addr(),
        integration::TEST_HOSTS,
        integration::Mode::Api,
    );
    let up = stack.upstream.count();
    let r = api.get(&stack.url("/api")).await;
    assert_eq!(r.status, 401, "API: {}", r.describe());
    assert!(deletes(&r, SESSION_COOKIE), "API: session cookie deleted");
    stack.idp.set_fault(Fault::None);
    let r = b.get(&stack.url("/r4")).await;
    assert!(is_login_redirect(&stack, &r), "{}", r.describe());
    let landed = relogin(&b, &r).await;
    assert_eq!(
        landed.status,
        200,
        "one re-login, no loop: {}",
        landed.describe()
    );
    assert_eq!(stack.upstream.count(), up + 1);
    assert_no_crash(&stack);
}

/// A browser logged in whose session was then refreshed (by `GET /r1`, answered 200; the
/// jar holds the new session), and the `Cookie` header it sent before the refresh.
async fn refreshed_keeping_the_old_cookie(stack: &Stack) -> (Browser, String) {
    let b = stack.browser();
    let flow = stack.login(&b, &stack.url("/r0")).await;
    assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());
    let url = url::Url::parse(&stack.url("/")).unwrap();
    let old_cookie = b
        .jar()
        .header_for(&url, &reqwest::Method::GET, false)
        .unwrap();
    until_due().await;
    let r = b.get(&stack.url("/r1")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    (b, old_cookie)
}

/// A session cookie from before a refresh, presented again within a minute (a second tab, a
/// request that was in flight, another Envoy worker): the filter must answer sanely (forward
/// with the refreshed tokens it remembers, or send the browser to log in) and never crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_with_a_replayed_pre_refresh_cookie_does_not_crash() {
    let stack = refresh_stack(true).await;
    let (b, old_cookie) = refreshed_keeping_the_old_cookie(&stack).await;
    let replay = stack.browser();
    let r = replay
        .get_with(&stack.url("/r2"), &[("cookie", &old_cookie)])
        .await;
    assert!(
        r.status == 200 || is_login_redirect(&stack, &r),
        "replayed pre-refresh cookie: {}",
        r.describe()
    );
    let r = b.get(&stack.url("/r3")).await;
    assert_eq!(r.status, 200, "the gateway still works: {}", r.describe());
    assert_no_crash(&stack);
}

/// A POST with a body whose refresh is answered at once from another refresh's shared answer
/// (a replayed pre-refresh cookie): the request goes upstream whole, body included, with the
/// refreshed token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_refreshed_from_a_shared_answer_keeps_its_body() {
    let one_worker = StackOptions {
        concurrency: 1,
        ..StackOptions::default()
    };
    let stack = refresh_stack_with(true, one_worker).await;
    let (_, old_cookie) = refreshed_keeping_the_old_cookie(&stack).await;
    let refreshed = upstream_token(&stack);
    let refreshes = stack.idp.stats().refresh;

    let data = "x".repeat(100_000);
    let replay = stack.api_client();
    let sent = replay
        .send(
            reqwest::Method::POST,
            url::Url::parse(&stack.url("/orders")).unwrap(),
            &[("cookie", &old_cookie)],
            Some(vec![("data".to_string(), data.clone())]),
            None,
            false,
        )
        .await;
    assert_eq!(sent.status, 200, "{}", sent.describe());
    assert_eq!(
        stack.idp.stats().refresh,
        refreshes,
        "answered from the shared answer"
    );
    let seen = stack.upstream.last().expect("upstream saw the POST");
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/orders")
    );
    assert_eq!(upstream_token(&stack), refreshed);
    assert_eq!(
        seen.body.len(),
        "data=".len() + data.len(),
        "the body reached the upstream whole"
    );
    assert_no_crash(&stack);
}

/// I85 and I86. The upstream receives the ID token here, so which ID token the session holds is
/// visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_keeps_old_tokens_and_is_coalesced() {
    let stack = Arc::new(
        Stack::start(
            StackOptions {
                idp: MockIdpConfig {
                    access_token_ttl: Duration::from_secs(SHORT_TTL_SECS),
                    ..MockIdpConfig::default()
                },
                ..StackOptions::default()
            }
            .with_config(json!({"upstream_authorization": "id_token"})),
        )
        .await,
    );
    let b = stack.browser();
    let flow = stack.login(&b, &stack.url("/r0")).await;
    assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());
    let refreshes = || stack.idp.stats().refresh;
    assert_eq!(refreshes(), 0, "a new token is not refreshed at once");
    let id0 = upstream_token(&stack);

    // I85: a refresh answer without refresh_token and id_token: the refresh succeeds and the
    // session keeps the ID token it had (and its refresh token).
    until_due().await;
    stack.idp.set_fault(Fault::TokenResponseFields(
        json!({"refresh_token": null, "id_token": null}),
    ));
    let r = b.get(&stack.url("/r1")).await;
    stack.idp.set_fault(Fault::None);
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(refreshes(), 1, "refreshed");
    assert!(r.set_cookie(SESSION_COOKIE).is_some(), "new session cookie");
    assert_eq!(upstream_token(&stack), id0, "the old ID token was kept");
    let r = b.get(&stack.url("/oauth2/sign_out")).await;
    assert_eq!(
        r.location().and_then(|l| param(&l, "id_token_hint")),
        Some(id0.clone()),
        "logout still has the kept ID token as hint"
    );

    // I86: 200 concurrent requests of one (fresh) session on an expiring token: the refresh is
    // coalesced (at most one per Envoy worker) and every request carries a token of that session.
    let b = stack.browser();
    let flow = stack.login(&b, &stack.url("/c")).await;
    assert_eq!(flow.landed.status, 200, "{}", flow.landed.describe());
    let url = url::Url::parse(&stack.url("/")).unwrap();
    let cookie = b
        .jar()
        .header_for(&url, &reqwest::Method::GET, false)
        .unwrap();
    until_due().await;
    let before_refresh = refreshes();
    let up_before = stack.upstream.count();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..200 {
        let stack = stack.clone();
        let cookie = cookie.clone();
        set.spawn(async move {
            let c = stack.browser();
            c.get_with(&stack.url(&format!("/c{i}")), &[("cookie", &cookie)])
                .await
                .status
        });
    }
    while let Some(s) = set.join_next().await {
        assert_eq!(s.unwrap(), 200);
    }
    let n = refreshes() - before_refresh;
    assert!(
        (1..=2).contains(&n),
        "refresh coalesced: {n} refresh calls for 200 requests"
    );
    let seen: BTreeSet<String> = stack.upstream.requests()[up_before..]
        .iter()
        .map(|r| r.header("authorization").unwrap_or("").to_string())
        .collect();
    assert!(
        seen.len() <= 2,
        "consistent tokens: {} distinct",
        seen.len()
    );
    for a in &seen {
        assert_eq!(
            jwt_payload(a.trim_start_matches("Bearer "))["sub"],
            subject_for(USERNAME)
        );
    }
    assert_no_crash(&stack);
}
