//! Property-based fuzzing (stable Rust, proptest) of every parser the filter exposes to untrusted
//! input, and of the decision engine as a whole.
//!
//! Each block asserts "never panics" and, where there is one, the invariant the parser promises.
//! The default case counts keep `cargo test` fast; `PROPTEST_CASES=N` (what `make fuzz` sets)
//! raises them: blocks whose single case is expensive (RSA/ECDSA signing, key derivation) run
//! `N / divisor` cases.

use std::sync::{Arc, OnceLock};

use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use mock_idp::{IdpState, MockIdpConfig, SigningAlg};
use proptest::prelude::*;
use proptest::sample::{select, Index};
use serde_json::{json, Map, Value};

use oidc_filter::config::{Config, HostPattern};
use oidc_filter::crypto::{key_scope, Keyring, OpenError, Purpose, MAX_SEALED_LEN};
use oidc_filter::discovery::ProviderMetadata;
use oidc_filter::flow::{parse_token_response, Decision, Gate, Known};
use oidc_filter::http::{
    cookie_header_without, parse_cookies, parse_url, same_origin_target, sanitize_return_path,
    skip_path_matches, split_path, CookieList, QueryError, StrictQuery, MAX_QUERY_LEN,
    MAX_QUERY_PARAMS,
};
use oidc_filter::session::{
    cookie_context, is_own_cookie, login_cookie_name, LoginCookieError, LoginState, Session,
    SessionError, LOGIN_TTL_SECS, SESSION_COOKIE,
};
use oidc_filter::token::{self, Expectations, Jwks, MAX_JWKS_KEYS, MAX_TOKEN_LEN};
use oidc_filter::types::{Random, RandomUnavailable, Secret, SecretBytes};

// ------------------------------------------------------------------------------------------------
// Shared helpers
// ------------------------------------------------------------------------------------------------

/// Case count for one block: `default` unless `PROPTEST_CASES` is set, then that value divided by
/// `divisor` (at least 1). `ProptestConfig::default()` is what reads the variable; `with_cases`
/// alone would override it, so the override is applied only when the variable is absent.
fn cases(default: u32, divisor: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_some() {
        config.cases = (config.cases / divisor.max(1)).max(1);
    } else {
        config.cases = default;
    }
    // Failures are reported with their minimal input; no regression files in the source tree.
    config.failure_persistence = None;
    config
}

/// Runs a property whose cases are expensive. The `proptest!` macro applies `PROPTEST_CASES` as
/// it is; here the count from [`cases`] (scaled down by its divisor) is what runs.
fn check<S: Strategy>(
    config: ProptestConfig,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let mut runner = proptest::test_runner::TestRunner::new(config);
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}\n{runner}");
    }
}

/// Deterministic randomness for sealing (xorshift64); never used for anything but tests.
struct Xorshift(u64);

impl Xorshift {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
}

impl Random for Xorshift {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RandomUnavailable> {
        for b in buf.iter_mut() {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = (self.0 >> 24) as u8;
        }
        Ok(())
    }
}

/// Fragments that tend to matter to the parsers under test.
const FRAGMENTS: &[&str] = &[
    "/",
    "//",
    ".",
    "..",
    "%2f",
    "%2F",
    "%2e",
    "%2E%2e",
    "%5c",
    "%5C",
    "%00",
    "%25",
    "%",
    "%zz",
    "%c3%a9",
    "\\",
    ";",
    "?",
    "#",
    "=",
    "&",
    "+",
    ":",
    "@",
    "[",
    "]",
    "\"",
    "'",
    " ",
    "\t",
    "\r\n",
    "\u{0}",
    "\u{7f}",
    "é",
    "\u{202e}",
    "\u{feff}",
    "a",
    "Z",
    "0",
    "public",
    "healthz",
    "api",
    "__Host-oidc-gate",
    "__Host-oidc-gate-login-",
    "=x",
    "null",
    "{",
    "}",
    ",",
    "-",
    "_",
    "*",
    "https://",
    "evil.com",
    "app.example.com",
];

/// Strings that mix fully arbitrary Unicode, printable ASCII and parser-relevant fragments.
fn text() -> BoxedStrategy<String> {
    prop_oneof![
        2 => any::<String>(),
        2 => "[ -~]{0,48}",
        3 => prop::collection::vec(select(FRAGMENTS), 0..16).prop_map(|v| v.concat()),
    ]
    .boxed()
}

/// Strings drawn from the base64url alphabet (so they get past the first decoding step).
fn b64ish() -> BoxedStrategy<String> {
    "[A-Za-z0-9_-]{0,160}".boxed()
}

/// Whether `url::Url::parse` of a string could reach the debug assertion of the idna_adapter 1.0.0
/// stub that Cargo.lock pins: ASCII capitals together with non-ASCII characters in a host (see
/// `known_idna_stub_panics_on_mixed_case_unicode_hosts`).
fn idna_trap(s: &str) -> bool {
    !s.is_ascii() && s.bytes().any(|b| b.is_ascii_uppercase())
}

/// Lowercases the ASCII of a string that would spring the idna trap; nothing else changes.
fn defuse(s: &str) -> String {
    if idna_trap(s) {
        s.to_ascii_lowercase()
    } else {
        s.to_string()
    }
}

/// [`defuse`] for a document body, and for the URL members of a JSON object.
fn defuse_body(body: Vec<u8>) -> Vec<u8> {
    match std::str::from_utf8(&body) {
        Ok(s) if idna_trap(s) => s.to_ascii_lowercase().into_bytes(),
        _ => body,
    }
}

fn defuse_urls(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        for (k, member) in o.iter_mut() {
            let url_like = k == "issuer" || k.ends_with("_uri") || k.ends_with("_endpoint");
            if let (true, Value::String(s)) = (url_like, &mut *member) {
                *s = defuse(s);
            }
        }
    }
    v
}

fn bytes(max: usize) -> BoxedStrategy<Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max).boxed()
}

fn json_leaf() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        text().prop_map(Value::String),
    ]
    .boxed()
}

fn json_value() -> BoxedStrategy<Value> {
    json_leaf()
        .prop_recursive(3, 24, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec((text(), inner), 0..5)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
        .boxed()
}

/// A JSON object whose members are the given keys (each present or not) with, per key, either a
/// plausible value from its generator or an arbitrary JSON value, plus occasional unknown members.
fn object_of(fields: Vec<(&'static str, BoxedStrategy<Value>)>) -> BoxedStrategy<Value> {
    let per_field: Vec<BoxedStrategy<Option<(String, Value)>>> = fields
        .into_iter()
        .map(|(name, plausible)| {
            prop_oneof![
                6 => plausible.prop_map(move |v| Some((name.to_string(), v))),
                1 => json_value().prop_map(move |v| Some((name.to_string(), v))),
                1 => Just(None),
            ]
            .boxed()
        })
        .collect();
    (
        per_field,
        prop::collection::vec((text(), json_value()), 0..2),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(members, extra, add_extra)| {
            let mut m = Map::new();
            for (k, v) in members.into_iter().flatten() {
                m.insert(k, v);
            }
            if add_extra {
                for (k, v) in extra {
                    m.insert(k, v);
                }
            }
            Value::Object(m)
        })
        .boxed()
}

fn strs(values: &'static [&'static str]) -> BoxedStrategy<Value> {
    select(values).prop_map(|s| json!(s)).boxed()
}

fn purpose() -> impl Strategy<Value = Purpose> {
    prop_oneof![
        Just(Purpose::Session),
        Just(Purpose::Login),
        Just(Purpose::RefreshResult)
    ]
}

fn other_purpose(p: Purpose) -> Purpose {
    match p {
        Purpose::Session => Purpose::Login,
        Purpose::Login => Purpose::RefreshResult,
        Purpose::RefreshResult => Purpose::Session,
    }
}

fn keyring(secret: &[u8]) -> Keyring {
    Keyring::new(
        &SecretBytes::new(secret.to_vec()),
        &[],
        &key_scope(ISS, CLIENT),
    )
}

/// One keyring for the cheap blocks (HKDF per case would dominate their run time).
fn shared_ring() -> &'static Keyring {
    static RING: OnceLock<Keyring> = OnceLock::new();
    RING.get_or_init(|| keyring(&[42u8; 32]))
}

// ------------------------------------------------------------------------------------------------
// crypto::Keyring
// ------------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(256, 1))]

    #[test]
    fn keyring_open_arbitrary_never_panics(
        secret in bytes(64),
        sealed in prop_oneof![text(), b64ish()],
        context in bytes(64),
        purpose in purpose(),
    ) {
        let ring = keyring(&secret);
        if let Ok(o) = ring.open(purpose, &context, &sealed) {
            // Only a forgery of XChaCha20-Poly1305 could get here.
            prop_assert!(false, "arbitrary value opened: {} bytes", o.plaintext.len());
        }
    }

    #[test]
    fn keyring_open_well_formed_header_with_random_body_is_forged(
        body in bytes(200),
        context in bytes(32),
        purpose in purpose(),
        seed in any::<u64>(),
    ) {
        // Version and key id of a real value, so every check before the AEAD passes.
        let ring = shared_ring();
        let real = ring.seal(purpose, &context, b"x", &mut Xorshift::new(seed)).unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(real).unwrap();
        raw.truncate(5);
        raw.extend_from_slice(&body);
        let err = ring.open(purpose, &context, &URL_SAFE_NO_PAD.encode(&raw)).unwrap_err();
        if raw.len() < 5 + 24 + 16 {
            prop_assert_eq!(err, OpenError::Malformed);
        } else {
            prop_assert_eq!(err, OpenError::Forged);
        }
    }

    #[test]
    fn keyring_round_trip_and_binding(
        secret in bytes(64),
        previous in prop::collection::vec(bytes(48), 0..3),
        other_secret in bytes(64),
        context in bytes(96),
        other_context in bytes(96),
        plaintext in bytes(1024),
        purpose in purpose(),
        seed in any::<u64>(),
    ) {
        let mut rng = Xorshift::new(seed);
        let prev: Vec<SecretBytes> = previous.iter().cloned().map(SecretBytes::new).collect();
        let ring = Keyring::new(&SecretBytes::new(secret.clone()), &prev, &key_scope(ISS, CLIENT));
        let sealed = ring.seal(purpose, &context, &plaintext, &mut rng).unwrap();
        prop_assert!(sealed.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        prop_assert_eq!(sealed.len(), ((1 + 4 + 24 + plaintext.len() + 16) * 4).div_ceil(3));
        let opened = ring.open(purpose, &context, &sealed).unwrap();
        prop_assert_eq!(&opened.plaintext, &plaintext);
        prop_assert!(!opened.needs_reseal);

        // Bound to purpose and context.
        prop_assert_eq!(
            ring.open(other_purpose(purpose), &context, &sealed).unwrap_err(),
            OpenError::Forged
        );
        if other_context != context {
            prop_assert_eq!(
                ring.open(purpose, &other_context, &sealed).unwrap_err(),
                OpenError::Forged
            );
        }
        // Another secret cannot open it (unknown key id, or forged on a 32-bit id collision).
        if other_secret != secret && !previous.contains(&other_secret) {
            prop_assert!(keyring(&other_secret).open(purpose, &context, &sealed).is_err());
        }
        // The same secrets for another client of the issuer cannot open it either.
        let other_client = Keyring::new(&SecretBytes::new(secret.clone()), &prev, &key_scope(ISS, "other"));
        prop_assert_eq!(other_client.open(purpose, &context, &sealed).unwrap_err(), OpenError::Forged);
        // Rotation: a value sealed under a previous secret opens and asks for a reseal.
        if let Some(old) = previous.first().filter(|old| **old != secret) {
            let old_sealed = keyring(old).seal(purpose, &context, &plaintext, &mut rng).unwrap();
            let o = ring.open(purpose, &context, &old_sealed).unwrap();
            prop_assert_eq!(&o.plaintext, &plaintext);
            prop_assert!(o.needs_reseal);
        }
    }

    #[test]
    fn keyring_rejects_any_byte_mutation_truncation_or_extension(
        plaintext in bytes(300),
        context in bytes(32),
        purpose in purpose(),
        seed in any::<u64>(),
        at in any::<Index>(),
        xor in 1u8..=255,
        cut in any::<Index>(),
        tail in prop::collection::vec(any::<u8>(), 1..32),
    ) {
        let ring = shared_ring();
        let sealed = ring.seal(purpose, &context, &plaintext, &mut Xorshift::new(seed)).unwrap();
        let raw = URL_SAFE_NO_PAD.decode(&sealed).unwrap();

        let mut flipped = raw.clone();
        let i = at.index(flipped.len());
        flipped[i] ^= xor;
        prop_assert!(
            ring.open(purpose, &context, &URL_SAFE_NO_PAD.encode(&flipped)).is_err(),
            "byte {} ^ {:#x} accepted", i, xor
        );

        let truncated = &raw[..cut.index(raw.len())];
        prop_assert!(ring.open(purpose, &context, &URL_SAFE_NO_PAD.encode(truncated)).is_err());

        let mut extended = raw.clone();
        extended.extend_from_slice(&tail);
        prop_assert!(ring.open(purpose, &context, &URL_SAFE_NO_PAD.encode(&extended)).is_err());
    }

    #[test]
    fn keyring_text_mutation_is_rejected_or_decodes_identically(
        plaintext in bytes(200),
        seed in any::<u64>(),
        at in any::<Index>(),
        replacement in prop_oneof![
            select(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".to_vec())
                .prop_map(char::from),
            any::<char>(),
        ],
    ) {
        let ring = shared_ring();
        let sealed = ring.seal(Purpose::Session, b"ctx", &plaintext, &mut Xorshift::new(seed)).unwrap();
        let i = at.index(sealed.len());
        let mut mutated = String::with_capacity(sealed.len() + 4);
        mutated.push_str(&sealed[..i]);
        mutated.push(replacement);
        mutated.push_str(&sealed[i + 1..]);
        let same = URL_SAFE_NO_PAD.decode(&mutated).ok() == URL_SAFE_NO_PAD.decode(&sealed).ok();
        match ring.open(Purpose::Session, b"ctx", &mutated) {
            Ok(o) => {
                prop_assert!(same, "mutation at {} to {:?} accepted", i, replacement);
                prop_assert_eq!(o.plaintext, plaintext);
            }
            Err(_) => prop_assert!(!same, "identical decoding refused"),
        }
    }
}

#[test]
fn keyring_refuses_overlong_values() {
    // Anything over the bound is refused before decoding, even an authentic value.
    let ring = shared_ring();
    let big = vec![7u8; MAX_SEALED_LEN];
    let sealed = ring
        .seal(Purpose::Session, b"", &big, &mut Xorshift::new(1))
        .unwrap();
    assert!(sealed.len() > MAX_SEALED_LEN);
    assert_eq!(
        ring.open(Purpose::Session, b"", &sealed).unwrap_err(),
        OpenError::Malformed
    );
    let junk = "A".repeat(MAX_SEALED_LEN + 1);
    assert_eq!(
        ring.open(Purpose::Session, b"", &junk).unwrap_err(),
        OpenError::Malformed
    );
}

// ------------------------------------------------------------------------------------------------
// session: session and login cookies
// ------------------------------------------------------------------------------------------------

fn u64_edge() -> BoxedStrategy<u64> {
    prop_oneof![
        any::<u64>(),
        0u64..10_000,
        1_700_000_000u64..1_900_000_000,
        Just(u64::MAX),
        Just(u64::MAX - LOGIN_TTL_SECS),
    ]
    .boxed()
}

fn json_u64ish() -> BoxedStrategy<Value> {
    prop_oneof![
        3 => u64_edge().prop_map(|n| json!(n)),
        1 => any::<i64>().prop_map(|n| json!(n)),
        1 => any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        1 => Just(json!("1800000000")),
    ]
    .boxed()
}

fn json_text() -> BoxedStrategy<Value> {
    text().prop_map(Value::String).boxed()
}

fn session_wire_like() -> BoxedStrategy<Value> {
    object_of(vec![
        ("a", json_text()),
        ("i", json_text()),
        ("r", json_text()),
        ("e", json_u64ish()),
        ("s", json_text()),
        ("c", json_u64ish()),
        ("m", json_u64ish()),
        (
            "k",
            prop::collection::btree_map(text(), json_value(), 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
                .boxed(),
        ),
    ])
}

fn login_wire_like() -> BoxedStrategy<Value> {
    object_of(vec![
        ("s", json_text()),
        ("n", json_text()),
        ("v", json_text()),
        ("r", json_text()),
        ("c", json_u64ish()),
    ])
}

/// Plaintexts for sealed cookies: JSON of the right shape, any JSON, or raw bytes.
fn plaintext_of(shaped: BoxedStrategy<Value>) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        4 => shaped.prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => bytes(200),
    ]
    .boxed()
}

fn host() -> BoxedStrategy<String> {
    prop_oneof![
        2 => select(&["app.example.com", "a.apps.example.com", "", "APP.example.com"][..])
            .prop_map(str::to_string),
        1 => text(),
    ]
    .boxed()
}

/// Claims as they get into a session. Floats that serde_json itself does not read back exactly
/// are left out (see `known_float_claims_change_in_a_session_round_trip`).
fn claim_value() -> BoxedStrategy<Value> {
    json_value()
        .prop_filter("serde_json float round trip", |v| {
            serde_json::from_str::<Value>(&v.to_string()).ok().as_ref() == Some(v)
        })
        .boxed()
}

proptest! {
    #![proptest_config(cases(256, 1))]

    #[test]
    fn session_and_login_open_arbitrary_never_panic(
        host in host(),
        name in prop_oneof![text(), text().prop_map(|s| login_cookie_name(&s))],
        value in prop_oneof![text(), b64ish()],
        now in u64_edge(),
    ) {
        let ring = shared_ring();
        prop_assert!(matches!(Session::open(ring, &host, &value), Err(SessionError::Open(_))));
        prop_assert!(matches!(
            LoginState::open(ring, &host, &name, &value, now),
            Err(LoginCookieError::Open(_))
        ));
    }

    #[test]
    fn session_open_of_authentic_arbitrary_plaintext(
        host in host(),
        plaintext in plaintext_of(session_wire_like()),
        seed in any::<u64>(),
    ) {
        let ring = shared_ring();
        let sealed = ring
            .seal(Purpose::Session, &cookie_context(&host, SESSION_COOKIE), &plaintext, &mut Xorshift::new(seed))
            .unwrap();
        match Session::open(ring, &host, &sealed) {
            Ok((session, reseal)) => {
                prop_assert!(!reseal);
                let v: Value = serde_json::from_slice(&plaintext).unwrap();
                prop_assert_eq!(v["a"].as_str(), Some(session.access_token.expose()));
                prop_assert_eq!(v["s"].as_str(), Some(session.subject.as_str()));
                prop_assert_eq!(v["e"].as_u64(), Some(session.expires_at));
                // Usability is exactly "before both expiries".
                for now in [0, session.expires_at, session.max_expires_at, u64::MAX] {
                    prop_assert_eq!(
                        session.is_usable(now),
                        now < session.expires_at && now < session.max_expires_at
                    );
                }
            }
            Err(e) => prop_assert_eq!(e, SessionError::Format),
        }
        // The same value is refused on another host.
        let other = format!("{host}x");
        prop_assert!(matches!(Session::open(ring, &other, &sealed), Err(SessionError::Open(_))));
    }

    #[test]
    fn login_open_of_authentic_arbitrary_plaintext(
        host in host(),
        flow in prop_oneof!["[A-Za-z0-9_-]{1,16}", text()],
        plaintext in plaintext_of(login_wire_like()),
        now in u64_edge(),
        seed in any::<u64>(),
    ) {
        let ring = shared_ring();
        let name = login_cookie_name(&flow);
        let sealed = ring
            .seal(Purpose::Login, &cookie_context(&host, &name), &plaintext, &mut Xorshift::new(seed))
            .unwrap();
        match LoginState::open(ring, &host, &name, &sealed, now) {
            Ok(login) => {
                // Only attempts within the lifetime (and not from the far future) open.
                prop_assert!(now < login.created_at.saturating_add(LOGIN_TTL_SECS));
                prop_assert!(login.created_at <= now.saturating_add(LOGIN_TTL_SECS));
                let v: Value = serde_json::from_slice(&plaintext).unwrap();
                prop_assert_eq!(v["c"].as_u64(), Some(login.created_at));
                prop_assert_eq!(v["r"].as_str(), Some(login.return_to.as_str()));
            }
            Err(e) => prop_assert!(
                matches!(e, LoginCookieError::Format | LoginCookieError::Expired),
                "authentic value refused as {:?}", e
            ),
        }
        // Bound to the cookie name: the same value under another flow id is refused.
        let other = login_cookie_name(&format!("{flow}x"));
        prop_assert!(matches!(
            LoginState::open(ring, &host, &other, &sealed, now),
            Err(LoginCookieError::Open(_))
        ));
    }

    #[test]
    fn session_round_trip(
        host in host(),
        access in text(),
        id in prop::option::of(text()),
        refresh in prop::option::of(text()),
        expires_at in u64_edge(),
        subject in text(),
        created_at in u64_edge(),
        max_expires_at in u64_edge(),
        claims in prop::collection::btree_map(text(), claim_value(), 0..4),
        login_id in prop::option::of(text()),
        seed in any::<u64>(),
    ) {
        let ring = shared_ring();
        let s = Session {
            access_token: Secret::new(access),
            id_token: id.map(Secret::new),
            refresh_token: refresh.map(Secret::new),
            expires_at,
            tokens_at: created_at,
            subject,
            created_at,
            seen_at: 0,
            max_expires_at,
            login_id,
            claims: claims.into_iter().collect(),
        };
        let sealed = s.seal(ring, &host, &mut Xorshift::new(seed)).unwrap();
        let (back, reseal) = Session::open(ring, &host, &sealed).unwrap();
        prop_assert!(!reseal);
        prop_assert!(back == s, "session changed in a seal/open round trip");
    }

    #[test]
    fn login_round_trip(
        host in host(),
        flow in "[A-Za-z0-9_-]{1,16}",
        state in text(),
        nonce in text(),
        verifier in text(),
        return_to in text(),
        created_at in 0u64..u64::MAX - LOGIN_TTL_SECS,
        age in 0u64..LOGIN_TTL_SECS,
        seed in any::<u64>(),
    ) {
        let ring = shared_ring();
        let name = login_cookie_name(&flow);
        let l = LoginState {
            state: Secret::new(state.clone()),
            nonce: Secret::new(nonce.clone()),
            code_verifier: Secret::new(verifier.clone()),
            return_to: return_to.clone(),
            authority: host.clone(),
            created_at,
        };
        let sealed = l.seal(ring, &host, &name, &mut Xorshift::new(seed)).unwrap();
        let back = LoginState::open(ring, &host, &name, &sealed, created_at + age).unwrap();
        prop_assert!(back.state.ct_eq(&state) && back.nonce.ct_eq(&nonce));
        prop_assert!(back.code_verifier.ct_eq(&verifier));
        prop_assert_eq!(back.return_to, return_to);
        prop_assert_eq!(back.created_at, created_at);
        prop_assert_eq!(
            LoginState::open(ring, &host, &name, &sealed, created_at + LOGIN_TTL_SECS).unwrap_err(),
            LoginCookieError::Expired
        );
    }
}

// ------------------------------------------------------------------------------------------------
// http: query strings, cookies, skip paths, return targets
// ------------------------------------------------------------------------------------------------

fn query() -> BoxedStrategy<String> {
    let key = select(
        &[
            "state", "code", "iss", "error", "st%61te", "state+", "code%00", "", "x",
        ][..],
    );
    let pair = (key, prop::option::of(text())).prop_map(|(k, v)| match v {
        Some(v) => format!("{k}={v}"),
        None => k.to_string(),
    });
    prop_oneof![
        3 => prop::collection::vec(pair, 0..8).prop_map(|p| p.join("&")),
        1 => text(),
        1 => (0usize..64).prop_map(|n| format!("state={}", "a".repeat(MAX_QUERY_LEN - 6 + n))),
    ]
    .boxed()
}

fn cookie_header() -> BoxedStrategy<String> {
    let name = prop_oneof![
        select(
            &[
                SESSION_COOKIE,
                "__Host-oidc-gate-login-abc",
                "__Host-oidc-gate-x",
                " __Host-oidc-gate ",
                "__host-oidc-gate",
                "a",
                "",
                " ",
                "\"",
                "=",
            ][..]
        )
        .prop_map(str::to_string),
        text(),
    ];
    let pair = (name, prop::option::of(text())).prop_map(|(n, v)| match v {
        Some(v) => format!("{n}={v}"),
        None => n,
    });
    prop_oneof![
        3 => (prop::collection::vec(pair, 0..6), select(&["; ", ";", " ;", ";;"][..]))
            .prop_map(|(p, sep)| p.join(sep)),
        1 => text(),
    ]
    .boxed()
}

fn prefix() -> BoxedStrategy<String> {
    // What configuration validation lets through: plain absolute paths.
    "/[a-z0-9._-]{1,8}(/[a-z0-9._-]{1,8}){0,2}/?"
        .prop_filter("no dot segments", |p| {
            p.split('/').all(|s| s != "." && s != "..")
        })
        .boxed()
}

fn path() -> BoxedStrategy<String> {
    let segment = prop_oneof![
        3 => select(&[
            "public", "healthz", "api", "a.css", "..", ".", "", "%2e%2e", "%2E.", ".%2e", "%2f",
            "%2F", "%5c", "a..b", "..a", "\\", ";x", "x;y", "%20", "%00", "\t", "é", "%c3%a9",
            "a?b", "a#b", "?", "#", "%", "%zz", "~", "a%2fb", "%u002e%u002e", "%u002f", "%c0%ae",
            "%%32%66", "%252f", "\u{2025}", "\u{ff0f}", "\u{ff0e}\u{ff0e}",
        ][..]).prop_map(str::to_string),
        1 => text(),
    ];
    prop_oneof![
        4 => (prefix(), prop::collection::vec(segment, 0..5))
            .prop_map(|(p, segs)| format!("{p}{}", segs.join("/"))),
        1 => text(),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(cases(1024, 1))]

    #[test]
    fn strict_query_matches_form_urlencoded(q in query()) {
        match StrictQuery::parse(&q) {
            Err(QueryError::TooLong) => prop_assert!(q.len() > MAX_QUERY_LEN),
            Err(QueryError::TooMany) => {
                prop_assert!(q.len() <= MAX_QUERY_LEN);
                prop_assert!(form_urlencoded::parse(q.as_bytes()).count() > MAX_QUERY_PARAMS);
            }
            Err(QueryError::Duplicate(k)) => {
                prop_assert!(q.len() <= MAX_QUERY_LEN);
                let n = form_urlencoded::parse(q.as_bytes()).filter(|(key, _)| *key == k).count();
                prop_assert!(n >= 2, "`{}` reported duplicate but appears {} times", k, n);
            }
            Ok(parsed) => {
                prop_assert!(q.len() <= MAX_QUERY_LEN);
                let pairs: Vec<_> = form_urlencoded::parse(q.as_bytes()).collect();
                for (i, (k, v)) in pairs.iter().enumerate() {
                    prop_assert!(pairs[..i].iter().all(|(seen, _)| seen != k), "duplicate `{}` accepted", k);
                    prop_assert_eq!(parsed.get(k), Some(v.as_ref()));
                }
            }
        }
    }

    #[test]
    fn cookies_parse_and_strip_consistently(headers in prop::collection::vec(cookie_header(), 0..4)) {
        let refs: Vec<&str> = headers.iter().map(String::as_str).collect();
        let parsed = parse_cookies(refs.iter().copied());
        for (name, value) in &parsed {
            prop_assert!(!name.is_empty() && name.trim() == *name);
            prop_assert!(!name.contains(';') && !name.contains('=') && !value.contains(';'));
        }
        let stripped = cookie_header_without(&refs, is_own_cookie);
        match &stripped {
            None => prop_assert!(parsed.iter().all(|(n, _)| is_own_cookie(n))),
            Some(h) => {
                prop_assert!(!h.is_empty());
                // Exactly the other cookies survive, in order, with their values.
                let expected: Vec<_> = parsed.iter().filter(|(n, _)| !is_own_cookie(n)).copied().collect();
                prop_assert_eq!(parse_cookies([h.as_str()]), expected);
                // No pair of ours survives, with or without a value.
                for pair in h.split(';') {
                    let name = pair.split_once('=').map_or(pair, |(n, _)| n).trim();
                    prop_assert!(!is_own_cookie(name), "own cookie `{}` kept in {:?}", name, h);
                }
                // Idempotent.
                let again = cookie_header_without(&[h.as_str()], is_own_cookie);
                prop_assert_eq!(again.as_ref(), Some(h));
            }
        }
        // The one-pass list forwards the same cookies (it may keep the client's spelling when it
        // drops nothing, which is the same header to any reader).
        // The parser before the one-pass one (the cookie crate's), as the reference.
        let reference: Vec<(&str, &str)> = refs
            .iter()
            .flat_map(|h| cookie::Cookie::split_parse(*h))
            .filter_map(Result::ok)
            .filter_map(|c| Some((c.name_raw()?, c.value_raw()?.trim_matches('"'))))
            .collect();
        prop_assert_eq!(&parsed, &reference);
        let list = CookieList::parse(&refs);
        prop_assert_eq!(&list.pairs, &parsed);
        let fast = list.header_without(is_own_cookie);
        prop_assert_eq!(fast.is_some(), stripped.is_some(), "{:?} vs {:?}", fast, stripped);
        if let (Some(f), Some(s)) = (&fast, &stripped) {
            prop_assert_eq!(parse_cookies([f.as_str()]), parse_cookies([s.as_str()]));
            for pair in f.split(';') {
                let name = pair.split_once('=').map_or(pair, |(n, _)| n).trim();
                prop_assert!(!is_own_cookie(name), "own cookie `{}` kept in {:?}", name, f);
            }
        }
    }

    #[test]
    fn skip_paths_fail_closed(
        prefixes in prop::collection::vec(prefix(), 1..4),
        pick in any::<prop::sample::Index>(),
        // A path after a configured prefix: a random path alone almost never starts with one,
        // and the checks below would then never run.
        tail in prop_oneof![path(), "[/a.%;\\?#\t]{0,10}"],
    ) {
        let raw = format!("{}{tail}", prefixes[pick.index(prefixes.len())]);
        let matched = skip_path_matches(&raw, &prefixes);
        let (p, _) = split_path(&raw);
        if matched {
            let lower = p.to_ascii_lowercase();
            for bad in ["%2f", "%2e", "%5c", "\\", ";", "//"] {
                prop_assert!(!lower.contains(bad), "{:?} skipped login despite {:?}", raw, bad);
            }
            // No escape at all that a single decoding would change (a lone `%`, or `%u002e`,
            // is left alone: see `known_skip_path_accepts_percent_u_escapes`).
            let once = percent_encoding::percent_decode_str(p).decode_utf8_lossy();
            prop_assert_eq!(once.as_ref(), p);
            prop_assert!(p.split('/').all(|s| s != "." && s != ".."), "{:?} has a dot segment", raw);
            prop_assert!(!p.bytes().any(|b| b.is_ascii_control()));
            // Nothing an upstream could normalise as Unicode (U+2025 `..`, U+FF0F `/`).
            prop_assert!(p.is_ascii(), "{:?} skipped login with non-ASCII", raw);
            // The path an upstream resolves is the one that matched.
            let resolved = url::Url::parse("http://h/").unwrap().join(p).unwrap();
            let decoded = percent_encoding::percent_decode_str(resolved.path()).decode_utf8().unwrap();
            prop_assert_eq!(decoded.as_ref(), p);
            prop_assert!(prefixes.iter().any(|pre| oidc_filter::config::path_has_prefix(p, pre)));
        }
    }

    #[test]
    fn skip_paths_match_the_multi_pass_reference(
        prefixes in prop::collection::vec(prefix(), 1..4),
        pick in any::<prop::sample::Index>(),
        // Tails after a configured prefix, where every rule decides (a path matching no prefix
        // is refused by both whatever it holds).
        tail in prop_oneof![path(), "[/a.%;\\\\?#\t]{0,10}"],
    ) {
        let raw = format!("{}{tail}", prefixes[pick.index(prefixes.len())]);
        prop_assert_eq!(
            skip_path_matches(&raw, &prefixes),
            reference_skip_path_matches(&raw, &prefixes),
            "{:?}", raw
        );
    }

    #[test]
    fn skip_paths_with_arbitrary_prefixes_never_panic(
        raw in text(),
        prefixes in prop::collection::vec(text(), 0..3),
    ) {
        let _ = skip_path_matches(&raw, &prefixes);
    }

    #[test]
    fn return_target_stays_on_the_origin(p in prop_oneof![path(), text(), "//[ -~]{0,20}", "/[\\\\/%\t ]{0,4}[a-z.:@]{0,12}"]) {
        let t = same_origin_target("https", "app.example.com", &p);
        let u = url::Url::parse(&t).unwrap();
        prop_assert_eq!(u.scheme(), "https");
        prop_assert_eq!(u.host_str(), Some("app.example.com"));
        prop_assert_eq!(u.port(), None);
        prop_assert!(u.username().is_empty() && u.password().is_none());
        prop_assert!(t.starts_with("https://app.example.com/"), "{:?} -> {}", p, t);

        let s = sanitize_return_path(&p);
        prop_assert!(s == "/" || s == p);
        prop_assert!(s.starts_with('/') && !s.starts_with("//") && !s.contains('\\'));
        prop_assert!(!s.bytes().any(|b| b.is_ascii_control() || b == b' ' || b >= 0x80));
    }

    #[test]
    fn return_target_with_arbitrary_origin(
        scheme in prop_oneof![Just("https".to_string()), Just("http".to_string()), text()],
        authority in prop_oneof!["[a-z0-9.-]{1,20}(:[0-9]{1,5})?", text()],
        p in prop_oneof![path(), text()],
    ) {
        let (scheme, authority) = (defuse(&scheme), defuse(&authority));
        let t = same_origin_target(&scheme, &authority, &p);
        let origin = format!("{scheme}://{authority}");
        // The URL parser trims leading and trailing C0/space from the whole input, so an origin
        // like "https://. " parses while "https://. /" does not; Envoy never forwards such an
        // :authority, and the engine lowercases but does not trim it.
        // `parse_url` is the reference's parser too: `url` itself asserts (debug builds, with the
        // ASCII-only idna back end) on percent-encoded non-ASCII hosts, which it refuses.
        let plain = !authority.chars().any(|c| c <= ' ');
        if let (true, Ok(o)) = (plain, parse_url(&origin)) {
            if o.username().is_empty() && o.password().is_none() && matches!(o.scheme(), "http" | "https") {
                let u = parse_url(&t);
                prop_assert!(u.is_ok(), "{:?} -> unparsable {:?}", (&scheme, &authority, &p), t);
                prop_assert_eq!(u.unwrap().origin(), o.origin());
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// token: JWKS parsing and JWT verification
// ------------------------------------------------------------------------------------------------

const ISS: &str = "https://idp.example.com";
const CLIENT: &str = "gate";
const NONCE: &str = "n-0123456789";

fn idp(alg: SigningAlg) -> &'static Arc<IdpState> {
    static RS: OnceLock<Arc<IdpState>> = OnceLock::new();
    static ES: OnceLock<Arc<IdpState>> = OnceLock::new();
    let cell = match alg {
        SigningAlg::Rs256 => &RS,
        SigningAlg::Es256 => &ES,
    };
    cell.get_or_init(|| {
        IdpState::new(MockIdpConfig {
            signing_alg: alg,
            ..MockIdpConfig::default()
        })
    })
}

/// Both mock-idp keys (RS256 and ES256) in one JWKS.
fn jwks() -> &'static Jwks {
    static JWKS: OnceLock<Jwks> = OnceLock::new();
    JWKS.get_or_init(|| {
        let mut keys = Vec::new();
        for alg in [SigningAlg::Rs256, SigningAlg::Es256] {
            keys.extend(idp(alg).jwks()["keys"].as_array().unwrap().iter().cloned());
        }
        Jwks::parse(json!({ "keys": keys }).to_string().as_bytes()).unwrap()
    })
}

fn b64_of_len() -> BoxedStrategy<Value> {
    prop_oneof![
        bytes(300).prop_map(|b| json!(URL_SAFE_NO_PAD.encode(b))),
        bytes(64).prop_map(|b| json!(STANDARD.encode(b))),
        (0usize..600).prop_map(|n| json!("A".repeat(n))),
        Just(json!("AQAB")),
        Just(json!("")),
    ]
    .boxed()
}

fn jwk() -> BoxedStrategy<Value> {
    object_of(vec![
        ("kty", strs(&["RSA", "EC", "oct", "OKP", "rsa", ""])),
        (
            "alg",
            strs(&["RS256", "ES256", "HS256", "none", "PS256", "ES384"]),
        ),
        ("use", strs(&["sig", "enc", ""])),
        ("kid", json_text()),
        ("crv", strs(&["P-256", "P-384", "secp256k1"])),
        ("n", b64_of_len()),
        ("e", b64_of_len()),
        ("x", b64_of_len()),
        ("y", b64_of_len()),
    ])
}

/// A real JWKS with members of its keys replaced, removed or added.
fn mutated_real_jwks() -> BoxedStrategy<Value> {
    (
        prop::collection::vec(
            (
                any::<Index>(),
                any::<Index>(),
                prop::option::of(text()),
                prop::option::of(json_value()),
            ),
            1..4,
        ),
        prop::collection::vec(jwk(), 0..3),
    )
        .prop_map(|(edits, extra)| {
            let mut keys: Vec<Value> = Vec::new();
            for alg in [SigningAlg::Rs256, SigningAlg::Es256] {
                keys.extend(idp(alg).jwks()["keys"].as_array().unwrap().iter().cloned());
            }
            let names = ["kty", "alg", "use", "kid", "crv", "n", "e", "x", "y"];
            for (key, member, custom, v) in edits {
                let n = keys.len();
                let k = keys[key.index(n)].as_object_mut().unwrap();
                let name = custom.unwrap_or_else(|| names[member.index(names.len())].to_string());
                match v {
                    Some(v) => {
                        k.insert(name, v);
                    }
                    None => {
                        k.remove(&name);
                    }
                }
            }
            keys.extend(extra);
            json!({ "keys": keys })
        })
        .boxed()
}

fn time_claim(now: u64) -> BoxedStrategy<Value> {
    let n = now as i64;
    prop_oneof![
        6 => (-400i64..400).prop_map(move |d| json!(n + d)),
        2 => (-100_000_000i64..100_000_000).prop_map(move |d| json!(n + d)),
        1 => (-400i64..400, 0.0f64..1.0).prop_map(move |(d, f)| json!((n + d) as f64 + f)),
        1 => Just(json!(-1)),
        1 => Just(json!(u64::MAX)),
        1 => Just(json!(1u64 << 32)),
        1 => Just(json!(1.0e300)),
        1 => Just(json!(n.to_string())),
        1 => Just(Value::Null),
    ]
    .boxed()
}

fn random_claims(now: u64) -> BoxedStrategy<Value> {
    object_of(vec![
        ("iss", prop_oneof![
            4 => Just(json!(ISS)),
            1 => strs(&["https://idp.example.com/", "https://IDP.example.com", "", "https://evil.example"]),
            1 => Just(json!(7)),
        ].boxed()),
        ("aud", prop_oneof![
            3 => Just(json!(CLIENT)),
            2 => Just(json!([CLIENT])),
            2 => Just(json!([CLIENT, "other"])),
            1 => Just(json!(["other", CLIENT])),
            1 => Just(json!(["other"])),
            1 => Just(json!([CLIENT, 5])),
            1 => Just(json!([])),
            1 => Just(json!("other")),
            1 => Just(json!("api")),
        ].boxed()),
        ("azp", prop_oneof![Just(json!(CLIENT)), Just(json!("other")), Just(json!(1))].boxed()),
        ("sub", prop_oneof![4 => Just(json!("user-1")), 1 => Just(json!("")), 1 => Just(json!(5)), 1 => json_text()].boxed()),
        ("exp", time_claim(now)),
        ("iat", time_claim(now)),
        ("nbf", time_claim(now)),
        ("nonce", prop_oneof![4 => Just(json!(NONCE)), 1 => Just(json!("n-other")), 1 => Just(json!(1)), 1 => Just(json!(""))].boxed()),
        ("jti", json_text()),
    ])
}

fn random_header() -> BoxedStrategy<Value> {
    (
        prop::option::of(prop_oneof![
            4 => strs(&["RS256", "ES256"]),
            1 => strs(&["none", "None", "HS256", "rs256", "PS256", "ES256K", ""]),
            1 => Just(json!(1)),
            1 => Just(Value::Null),
        ]),
        prop::option::of(prop_oneof![
            json_text(),
            Just(Value::Null),
            Just(json!(5)),
            Just(json!("x".repeat(300)))
        ]),
        prop::option::of(select(
            &[
                "jku", "jwk", "x5u", "x5c", "crit", "b64", "typ", "cty", "zip",
            ][..],
        )),
        json_value(),
    )
        .prop_map(|(alg, kid, extra, extra_value)| {
            let mut h = Map::new();
            if let Some(a) = alg {
                h.insert("alg".into(), a);
            }
            if let Some(k) = kid {
                h.insert("kid".into(), k);
            }
            if let Some(name) = extra {
                // Present even when the generated value is null (null would remove it).
                let v = if extra_value.is_null() {
                    json!(false)
                } else {
                    extra_value
                };
                h.insert(name.into(), v);
            }
            Value::Object(h)
        })
        .boxed()
}

/// What every accepted token must satisfy, whatever the expectations.
fn check_accepted(
    v: &token::VerifiedToken,
    header: &Value,
    claims: &Value,
    expect: &Expectations<'_>,
) -> Result<(), TestCaseError> {
    let alg = header.get("alg").and_then(Value::as_str);
    prop_assert!(
        matches!(alg, Some("RS256" | "ES256") | None),
        "alg {:?} accepted",
        alg
    );
    for forbidden in ["jku", "jwk", "x5u", "x5c", "crit", "b64"] {
        prop_assert!(header.get(forbidden).is_none(), "{} accepted", forbidden);
    }
    prop_assert_eq!(claims["iss"].as_str(), Some(expect.issuer));
    let auds: Vec<&str> = match &claims["aud"] {
        Value::String(a) => vec![a.as_str()],
        Value::Array(list) => {
            let auds: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
            prop_assert_eq!(auds.len(), list.len(), "non-string audience accepted");
            auds
        }
        other => return Err(TestCaseError::fail(format!("aud {other:?} accepted"))),
    };
    prop_assert!(auds.iter().any(|a| expect.audiences.iter().any(|e| e == a)));
    let num = |name: &str| -> Option<u64> {
        claims
            .get(name)
            .and_then(|n| n.as_u64().or_else(|| n.as_f64().map(|f| f as u64)))
    };
    let exp = num("exp").ok_or_else(|| TestCaseError::fail("no exp"))?;
    prop_assert!(
        exp.saturating_add(expect.skew) >= expect.now,
        "expired token accepted"
    );
    prop_assert_eq!(v.expires_at, exp);
    let limit = expect.now.saturating_add(expect.skew);
    prop_assert!(num("iat").is_none_or(|t| t <= limit) && num("nbf").is_none_or(|t| t <= limit));
    if expect.require_iat {
        prop_assert!(num("iat").is_some());
    }
    if expect.require_sub {
        prop_assert!(claims["sub"].as_str().is_some_and(|s| !s.is_empty()));
        prop_assert_eq!(v.subject.as_deref(), claims["sub"].as_str());
    }
    if let Some(n) = expect.nonce {
        prop_assert_eq!(claims["nonce"].as_str(), Some(n));
    }
    if let Some(c) = expect.client_id {
        match claims.get("azp") {
            Some(azp) => prop_assert_eq!(azp.as_str(), Some(c)),
            None => prop_assert!(auds.len() <= 1, "several audiences without azp"),
        }
    }
    Ok(())
}

fn expectations() -> impl Strategy<Value = (bool, bool, bool, bool, bool, u64, u64)> {
    (
        any::<bool>(),                       // two accepted audiences
        any::<bool>(),                       // client id check
        any::<bool>(),                       // nonce check
        any::<bool>(),                       // require iat
        any::<bool>(),                       // require sub
        1_000_000_000u64..3_000_000_000,     // now
        prop_oneof![Just(60u64), 0u64..600], // skew
    )
}

proptest! {
    #![proptest_config(cases(256, 1))]

    #[test]
    fn jwks_parse_arbitrary_never_panics(
        body in prop_oneof![
            bytes(512),
            json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
            prop::collection::vec(jwk(), 0..4).prop_map(|k| serde_json::to_vec(&json!({"keys": k})).unwrap()),
        ],
    ) {
        if let Ok(j) = Jwks::parse(&body) {
            prop_assert!(!j.is_empty() && j.len() <= MAX_JWKS_KEYS);
        }
    }

    #[test]
    fn verify_arbitrary_tokens_never_accepts(
        token in prop_oneof![
            text(),
            (b64ish(), b64ish(), b64ish()).prop_map(|(a, b, c)| format!("{a}.{b}.{c}")),
            (json_value(), json_value(), b64ish()).prop_map(|(h, p, s)| format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(h.to_string()),
                URL_SAFE_NO_PAD.encode(p.to_string()),
                s
            )),
            (random_header(), random_claims(1_800_000_000), b64ish()).prop_map(|(h, p, s)| format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(h.to_string()),
                URL_SAFE_NO_PAD.encode(p.to_string()),
                s
            )),
        ],
        (two, cid, nonce, iat, sub, now, skew) in expectations(),
    ) {
        let audiences = if two { vec![CLIENT.to_string(), "api".to_string()] } else { vec![CLIENT.to_string()] };
        let expect = Expectations {
            exclusive_audiences: false,
            issuer: ISS,
            audiences: &audiences,
            client_id: cid.then_some(CLIENT),
            nonce: nonce.then_some(NONCE),
            require_iat: iat,
            require_sub: sub,
            now,
            skew,
        };
        prop_assert!(token::verify(&token, jwks(), &expect).is_err());
        let _ = token::header_kid(&token);
    }
}

// Each case signs with RSA or ECDSA: fewer of them.
#[test]
fn verify_signed_random_claims() {
    check(
        cases(128, 8),
        (
            any::<bool>(),
            random_header(),
            random_claims(1_800_000_000),
            expectations(),
            -500i64..500,
            prop::option::of((any::<Index>(), 1u8..=255)),
            prop::option::of(mutated_real_jwks()),
        ),
        |(
            es,
            header,
            claims,
            (two, cid, nonce, iat, sub, _now, skew),
            now_delta,
            tamper,
            jwks_body,
        )| {
            let idp = idp(if es {
                SigningAlg::Es256
            } else {
                SigningAlg::Rs256
            });
            let mut token = idp.sign_jwt(header.clone(), claims.clone());
            if let Some((at, xor)) = tamper {
                let mut raw = token.into_bytes();
                let i = at.index(raw.len());
                raw[i] ^= xor;
                token = String::from_utf8_lossy(&raw).into_owned();
            }
            let now = (1_800_000_000i64 + now_delta) as u64;
            let audiences = if two {
                vec![CLIENT.to_string(), "api".to_string()]
            } else {
                vec![CLIENT.to_string()]
            };
            let expect = Expectations {
                exclusive_audiences: false,
                issuer: ISS,
                audiences: &audiences,
                client_id: cid.then_some(CLIENT),
                nonce: nonce.then_some(NONCE),
                require_iat: iat,
                require_sub: sub,
                now,
                skew,
            };
            let parsed;
            let keys = match &jwks_body {
                Some(body) => match Jwks::parse(body.to_string().as_bytes()) {
                    Ok(j) => {
                        parsed = j;
                        &parsed
                    }
                    Err(_) => jwks(),
                },
                None => jwks(),
            };
            if let Ok(v) = token::verify(&token, keys, &expect) {
                // Judge by what the accepted token says (mock-idp merged our header over
                // {alg, kid, typ}; a tampered token says whatever the tampering made of it).
                let part = |i: usize| -> Value {
                    token
                        .split('.')
                        .nth(i)
                        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or(Value::Null)
                };
                let (signed_header, signed_claims) = (part(0), part(1));
                check_accepted(&v, &signed_header, &signed_claims, &expect)?;
                if tamper.is_some() {
                    // Only a change that leaves header and claims as they were can still verify.
                    prop_assert_eq!(
                        &signed_claims,
                        &claims,
                        "tampered claims accepted: {}",
                        token
                    );
                }
            }
            Ok(())
        },
    );
}

#[test]
fn verify_accepts_every_valid_token() {
    check(
        cases(128, 8),
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            "[ -~]{1,40}",
            prop_oneof![Just(60u64), 0u64..600],
            0i64..100_000,
            -100_000i64..=0,
            prop::option::of(-100_000i64..=0),
            any::<bool>(),
            // Registered claims keep their types (see `known_wrongly_typed_jti_is_reported_as_bad_signature`).
            prop::collection::btree_map("[a-z]{1,8}", json_value(), 0..3).prop_map(|mut m| {
                for registered in [
                    "iss", "sub", "aud", "exp", "nbf", "iat", "jti", "nonce", "azp",
                ] {
                    m.remove(registered);
                }
                m
            }),
        ),
        |(es, kid, two_aud, with_azp, sub, skew, exp_delta, iat_delta, nbf, exp_float, extra)| {
            let now = 1_800_000_000u64;
            let idp = idp(if es {
                SigningAlg::Es256
            } else {
                SigningAlg::Rs256
            });
            // exp may lie up to `skew` in the past; iat and nbf up to `skew` in the future.
            let s = skew as i64;
            let exp = now as i64 - s + exp_delta;
            let mut claims = Map::new();
            for (k, v) in extra {
                claims.insert(k, v);
            }
            claims.insert("iss".into(), json!(ISS));
            claims.insert(
                "aud".into(),
                if two_aud {
                    json!(["x", CLIENT])
                } else {
                    json!(CLIENT)
                },
            );
            if two_aud || with_azp {
                claims.insert("azp".into(), json!(CLIENT));
            }
            claims.insert("sub".into(), json!(sub));
            claims.insert(
                "exp".into(),
                if exp_float {
                    json!(exp as f64 + 0.5)
                } else {
                    json!(exp)
                },
            );
            claims.insert("iat".into(), json!(now as i64 + s + iat_delta));
            if let Some(d) = nbf {
                claims.insert("nbf".into(), json!(now as i64 + s + d));
            }
            claims.insert("nonce".into(), json!(NONCE));
            let header = if kid { json!({}) } else { json!({"kid": null}) };
            let token = idp.sign_jwt(header, Value::Object(claims.clone()));
            let audiences = vec![CLIENT.to_string()];
            let expect = Expectations {
                exclusive_audiences: false,
                issuer: ISS,
                audiences: &audiences,
                client_id: Some(CLIENT),
                nonce: Some(NONCE),
                require_iat: true,
                require_sub: true,
                now,
                skew,
            };
            match token::verify(&token, jwks(), &expect) {
                Ok(v) => {
                    prop_assert_eq!(v.expires_at, exp as u64);
                    prop_assert_eq!(v.subject.as_deref(), Some(sub.as_str()));
                }
                Err(e) => prop_assert!(
                    false,
                    "valid token refused: {:?}; claims {}",
                    e,
                    Value::Object(claims)
                ),
            }
            Ok(())
        },
    );
}

// ------------------------------------------------------------------------------------------------
// config::Config
// ------------------------------------------------------------------------------------------------

/// 32 bytes, standard base64.
const GOOD_SECRET: &str = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
/// Marker inside generated secrets: no error message may ever contain it.
const MARK: &str = "SEKRET";

fn env(name: &str) -> Option<String> {
    match name {
        "COOKIE_SECRET" => Some(format!(" {GOOD_SECRET}\n")),
        "CLIENT_SECRET" => Some(format!("{MARK}-from-env")),
        "SHORT_SECRET" => Some(STANDARD.encode([1u8; 31])),
        "BLANK" => Some("  ".into()),
        _ => None,
    }
}

fn config_path() -> BoxedStrategy<Value> {
    prop_oneof![
        3 => strs(&[
            "/oauth2/callback", "/oauth2/sign_out", "/", "/cb", "/logout", "/healthz", "/public/",
            "/oauth2/", "/oauth2", "x", "", "/a/../b", "/a/./b", "/a//b", "/a?b", "/a#b", "/a%2fb",
            "/a;b", "/a\\b", "/a b", "/\t",
        ]),
        1 => prefix().prop_map(Value::String),
        1 => json_text(),
    ]
    .boxed()
}

fn config_url() -> BoxedStrategy<Value> {
    prop_oneof![
        3 => strs(&[
            "https://app.example.com/oauth2/callback", "https://app.example.com/cb",
            "http://app.example.com:8080/oauth2/callback", "https://app.example.com/cb#frag",
            "https://app.example.com/bye", "urn:x:y", "https://", "javascript:alert(1)",
            "https://app.example.com/oauth2/callback?x=1", "file:///etc/passwd", "",
        ]),
        1 => json_text(),
    ]
    .boxed()
}

fn cookie_secret() -> BoxedStrategy<Value> {
    prop_oneof![
        3 => Just(json!(GOOD_SECRET)),
        2 => (bytes(64), 0usize..4).prop_map(|(b, engine)| json!(match engine {
            0 => STANDARD.encode(b),
            1 => URL_SAFE.encode(b),
            2 => URL_SAFE_NO_PAD.encode(b),
            _ => format!("{MARK}{}", STANDARD.encode(b)),
        })),
        1 => Just(json!(format!("{MARK}!!not-base64"))),
        1 => Just(json!("")),
    ]
    .boxed()
}

fn config_object() -> BoxedStrategy<Value> {
    object_of(vec![
        ("issuer", prop_oneof![
            4 => strs(&["https://idp.example.com", "http://idp.example.com:8080/realms/r"]),
            1 => strs(&["https://idp.example.com?x=1", "https://idp.example.com#f", "ftp://idp", "https://", "idp.example.com", "http://[::1]:9", ""]),
            1 => json_text(),
        ].boxed()),
        ("idp_cluster", prop_oneof![4 => strs(&["outbound|443||idp.example.com"]), 1 => strs(&["", " "]), 1 => json_text()].boxed()),
        ("idp_authority", prop_oneof![strs(&["idp.example.com", "idp:8443", "", "a/b", "a b", "u@h"]), json_text()].boxed()),
        ("client_id", prop_oneof![4 => strs(&["gate"]), 1 => strs(&[""]), 1 => json_text()].boxed()),
        ("client_secret", prop_oneof![
            4 => text().prop_map(|s| json!(format!("{MARK}{s}"))),
            1 => Just(json!("")),
        ].boxed()),
        ("client_secret_env", strs(&["CLIENT_SECRET", "MISSING", "BLANK"])),
        ("token_endpoint_auth_method", strs(&["client_secret_basic", "client_secret_post", "private_key_jwt", "CLIENT_SECRET_POST"])),
        ("cookie_secret", cookie_secret()),
        ("cookie_secret_env", strs(&["COOKIE_SECRET", "SHORT_SECRET", "BLANK", "MISSING"])),
        ("hosts", prop::collection::vec(prop_oneof![
            4 => strs(&["app.example.com", "*.apps.example.com", "APP.Example.com:8443", "app.example.com."]),
            1 => strs(&["*.", "*", "*.*.example.com", "a..b", "[::1]", "", "a*b.com", "-", "a_b", " app.example.com "]),
            1 => json_text(),
        ], 0..4).prop_map(Value::Array).boxed()),
        ("redirect_path", config_path()),
        ("redirect_uri", config_url()),
        ("logout_path", config_path()),
        ("post_logout_redirect_uri", config_url()),
        ("scopes", prop::collection::vec(prop_oneof![
            4 => strs(&["openid", "email", "profile", "groups", "offline_access"]),
            1 => strs(&["", "a b", "\"", "\\", "é"]),
            1 => json_text(),
        ], 0..5).prop_map(Value::Array).boxed()),
        ("upstream_authorization", strs(&["access_token", "id_token", "none", "bogus"])),
        ("skip_paths", prop::collection::vec(config_path(), 0..4).prop_map(Value::Array).boxed()),
        ("session_max_age", prop_oneof![
            Just(json!(600)), Just(json!(600.0)), Just(json!(60)), Just(json!(59)), Just(json!(0.5)),
            Just(json!(-1)), Just(json!(1.0e10)), Just(json!(1.0e9)), Just(json!("600")),
            Just(Value::Null), any::<u64>().prop_map(|n| json!(n)),
        ].boxed()),
        ("session_idle_timeout", prop_oneof![
            Just(json!(60)), Just(json!(59)), Just(json!(900.0)), Just(json!(599)), Just(json!(86_400)),
            Just(json!(-1)), Just(json!(0.5)), Just(Value::Null), any::<u64>().prop_map(|n| json!(n)),
        ].boxed()),
        ("refresh_skew", prop_oneof![
            Just(json!(60)), Just(json!(0)), Just(json!(3600)), Just(json!(3601)), Just(json!(30.0)),
            Just(json!(-5)), Just(json!(1.5)), any::<u32>().prop_map(|n| json!(n)),
        ].boxed()),
        ("api_paths", prop::collection::vec(config_path(), 0..3).prop_map(Value::Array).boxed()),
        ("pass_cors_preflight", prop_oneof![Just(json!(true)), Just(json!(false)), Just(json!("yes"))].boxed()),
        ("pass_access_token_headers", prop_oneof![Just(json!(true)), Just(json!(false)), Just(json!(1))].boxed()),
        ("bearer_tokens", prop_oneof![
            Just(json!({"audiences": ["api"]})), Just(json!({"audiences": []})), Just(json!({"audiences": [""]})),
            Just(json!({"audiences": ["api"], "issuer": "x"})), Just(json!({})), Just(json!(true)),
        ].boxed()),
        ("claims_to_headers", prop::collection::btree_map(
            prop_oneof![
                4 => select(&["X-User-Email", "x-groups", "x-sub", "X_Underscore", "Authorization", "cookie", "HOST", "x-request-id", ":path", "", "x y", "x\r\n", "é"][..]).prop_map(str::to_string),
                1 => text(),
            ],
            prop_oneof![4 => strs(&["email", "groups", "sub", ""]), 1 => json_value()],
            0..4,
        ).prop_map(|m| Value::Object(m.into_iter().collect())).boxed()),
        ("previous_cookie_secrets", prop::collection::vec(cookie_secret(), 0..3).prop_map(Value::Array).boxed()),
        ("previous_cookie_secrets_env", prop::collection::vec(
            strs(&["COOKIE_SECRET", "SHORT_SECRET", "BLANK", "MISSING"]), 0..3,
        ).prop_map(Value::Array).boxed()),
    ])
}

fn check_config(bytes: &[u8]) -> Result<Option<Config>, TestCaseError> {
    match Config::parse(bytes, &env) {
        Ok(c) => {
            prop_assert_eq!(c.scopes.first().map(String::as_str), Some("openid"));
            prop_assert!(c.session_max_age >= 60);
            prop_assert!(c.cookie_secret.expose().len() >= 32);
            prop_assert!(!c.hosts.is_empty() && !c.client_id.is_empty());
            prop_assert!(!c.client_secret.expose().is_empty());
            prop_assert!(c.redirect_path.starts_with('/') && c.logout_path.starts_with('/'));
            prop_assert_ne!(&c.redirect_path, &c.logout_path);
            for p in &c.skip_paths {
                prop_assert!(p.starts_with('/'));
                prop_assert!(!oidc_filter::config::path_has_prefix(&c.redirect_path, p));
                prop_assert!(!oidc_filter::config::path_has_prefix(&c.logout_path, p));
            }
            for h in &c.hosts {
                let s = match h {
                    HostPattern::Exact(s) => s.as_str(),
                    HostPattern::Suffix(s) => s.strip_prefix('.').unwrap_or("-"),
                };
                prop_assert!(!s.is_empty() && !s.contains(['*', ':', '/', ' ', '@']));
                prop_assert_eq!(s.to_ascii_lowercase(), s);
            }
            if let Some(u) = &c.redirect_uri {
                prop_assert_eq!(u.path(), c.redirect_path.as_str());
            }
            prop_assert!(c.refresh_skew <= 3600);
            if let Some(idle) = c.session_idle_timeout {
                prop_assert!((60..c.session_max_age).contains(&idle));
            }
            for p in &c.api_paths {
                prop_assert!(
                    p.starts_with('/')
                        && !p.contains(['?', '#', '%', ';', '\\'])
                        && !p.contains("//")
                );
            }
            if let Some(b) = &c.bearer_tokens {
                prop_assert!(!b.audiences.is_empty() && b.audiences.iter().all(|a| !a.is_empty()));
            }
            for (header, claim) in &c.claims_to_headers {
                prop_assert!(
                    !header.is_empty()
                        && header
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                    "header {:?}",
                    header
                );
                prop_assert!(![
                    "authorization",
                    "cookie",
                    "host",
                    "x-forwarded-for",
                    "x-forwarded-proto",
                    "x-request-id",
                    "content-length",
                    "transfer-encoding",
                    "x-forwarded-host",
                    "origin"
                ]
                .contains(&header.as_str()));
                prop_assert!(
                    !["x-envoy-", "proxy-", "sec-"]
                        .iter()
                        .any(|p| header.starts_with(p)),
                    "header {:?}",
                    header
                );
                prop_assert!(!claim.is_empty());
                // Whatever the configuration maps, a client can never send it in.
                prop_assert!(oidc_filter::headers::is_identity_header(
                    &c,
                    header.as_bytes()
                ));
            }
            for s in &c.previous_cookie_secrets {
                prop_assert!(s.expose().len() >= 32);
            }
            Ok(Some(c))
        }
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(msg.starts_with("invalid configuration: field `"), "{}", msg);
            // A backtick in an unknown key cuts the reported name short
            // (see `known_unknown_key_with_backtick_is_misreported`).
            prop_assert!(
                !e.field.is_empty() || e.reason == "unknown field",
                "{}",
                msg
            );
            prop_assert!(!msg.contains(MARK), "secret in error: {}", msg);
            Ok(None)
        }
    }
}

proptest! {
    #![proptest_config(cases(512, 1))]

    #[test]
    fn config_parse_arbitrary_bytes(
        body in prop_oneof![bytes(256), text().prop_map(String::into_bytes), json_value().prop_map(|v| serde_json::to_vec(&v).unwrap())],
    ) {
        check_config(&defuse_body(body))?;
    }

    #[test]
    fn config_parse_structured(cfg in config_object().prop_map(defuse_urls), pretty in any::<bool>()) {
        let body = if pretty { serde_json::to_vec_pretty(&cfg) } else { serde_json::to_vec(&cfg) }.unwrap();
        check_config(&body)?;
    }
}

// ------------------------------------------------------------------------------------------------
// discovery::ProviderMetadata and flow::parse_token_response
// ------------------------------------------------------------------------------------------------

fn endpoint() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => strs(&[
            "https://idp.example.com/token", "https://idp.example.com:443/keys",
            "http://idp.example.com:8080/realms/r/token", "https://idp.example.com.evil/x",
            "https://other.example.com/token", "http://idp.example.com/token", "https://IDP.example.com/x",
            "https://user@idp.example.com/x", "ftp://idp.example.com/x", "https:///x", "/relative", "",
            "https://idp.example.com:8443/x", "data:text/html,x",
        ]),
        1 => json_text(),
    ]
    .boxed()
}

fn configured_issuer() -> BoxedStrategy<String> {
    prop_oneof![
        4 => select(&["https://idp.example.com", "http://idp.example.com:8080/realms/r", "https://idp.example.com/"][..]).prop_map(str::to_string),
        1 => text(),
    ]
    .boxed()
}

fn discovery_doc(issuer: String) -> BoxedStrategy<Value> {
    object_of(vec![
        (
            "issuer",
            prop_oneof![4 => Just(json!(issuer)), 1 => endpoint()].boxed(),
        ),
        ("authorization_endpoint", endpoint()),
        ("token_endpoint", endpoint()),
        ("jwks_uri", endpoint()),
        ("end_session_endpoint", endpoint()),
        (
            "authorization_response_iss_parameter_supported",
            prop_oneof![Just(json!(true)), Just(json!(false)), Just(json!("true"))].boxed(),
        ),
        (
            "code_challenge_methods_supported",
            prop_oneof![
                Just(json!(["S256"])),
                Just(json!(["plain"])),
                Just(json!([])),
                Just(json!(["plain", "S256"])),
                Just(json!("S256")),
            ]
            .boxed(),
        ),
    ])
}

fn token_response() -> BoxedStrategy<Value> {
    object_of(vec![
        ("access_token", prop_oneof![
            4 => Just(json!(format!("at-{MARK}"))),
            1 => Just(json!("")),
            1 => Just(json!("a".repeat(MAX_TOKEN_LEN + 1))),
            1 => Just(json!("a".repeat(MAX_TOKEN_LEN))),
            1 => json_text(),
        ].boxed()),
        ("token_type", prop_oneof![
            4 => strs(&["Bearer", "bearer", "BEARER", "bEaReR"]),
            1 => strs(&["mac", "Bearer ", " Bearer", "", "Bearer\u{0}", "DPoP", "ｂearer", "beareR2", "N_A"]),
            1 => json_text(),
        ].boxed()),
        ("expires_in", prop_oneof![
            any::<u32>().prop_map(|n| json!(n)),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
            strs(&["300", "+300", "-1", "1e3", " 300", "", "18446744073709551615", "18446744073709551616", "315360001"]),
            Just(json!(315_360_000)), Just(json!(315_360_001)), Just(json!(315_360_000.5)),
            Just(Value::Null), Just(json!(true)),
        ].boxed()),
        ("refresh_token", prop_oneof![Just(json!("rt")), Just(json!(""))].boxed()),
        ("id_token", prop_oneof![4 => Just(json!("a.b.c")), 1 => Just(json!("")), 1 => Just(json!(3))].boxed()),
        ("error", strs(&["invalid_grant", "<script>", "a\u{0}b"])),
    ])
}

proptest! {
    #![proptest_config(cases(512, 1))]

    #[test]
    fn discovery_parse_never_panics(
        (issuer, doc) in configured_issuer()
            .prop_map(|i| defuse(&i))
            .prop_flat_map(|i| (Just(i.clone()), discovery_doc(i).prop_map(defuse_urls))),
        raw in prop::option::of(prop_oneof![bytes(256), json_value().prop_map(|v| serde_json::to_vec(&v).unwrap())]),
    ) {
        let body = defuse_body(raw.unwrap_or_else(|| serde_json::to_vec(&doc).unwrap()));
        if let Ok(m) = ProviderMetadata::parse(&body, &issuer) {
            prop_assert_eq!(&m.issuer, &issuer);
            let iss = url::Url::parse(&issuer).unwrap();
            for (name, u) in [("token", &m.token_endpoint), ("jwks", &m.jwks_uri)] {
                prop_assert_eq!(u.origin(), iss.origin(), "{} endpoint off origin", name);
            }
            let mut all = vec![&m.authorization_endpoint, &m.token_endpoint, &m.jwks_uri];
            all.extend(m.end_session_endpoint.as_ref());
            for u in all {
                prop_assert!(matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
                prop_assert!(!(iss.scheme() == "https" && u.scheme() == "http"));
            }
            if let Some(methods) = doc.get("code_challenge_methods_supported").and_then(Value::as_array) {
                if raw_is_doc(&body, &doc) {
                    prop_assert!(methods.iter().any(|m| m == "S256"));
                }
            }
        }
    }

    #[test]
    fn token_response_parse(
        status in prop_oneof![4 => Just(200u16), 1 => select(&[201u16, 204, 299, 300, 302, 400, 401, 500][..]), 1 => any::<u16>()],
        body in prop_oneof![
            4 => token_response().prop_map(|v| serde_json::to_vec(&v).unwrap()),
            1 => bytes(256),
            1 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        ],
        require_id_token in any::<bool>(),
    ) {
        match parse_token_response(status, &body, require_id_token) {
            Ok(t) => {
                prop_assert!((200..300).contains(&status));
                let v: Value = serde_json::from_slice(&body).unwrap();
                let tt = v["token_type"].as_str().unwrap();
                prop_assert!(tt.eq_ignore_ascii_case("bearer"), "token_type {:?} accepted", tt);
                let at = v["access_token"].as_str().unwrap();
                prop_assert!(!at.is_empty() && at.len() <= MAX_TOKEN_LEN);
                if require_id_token {
                    prop_assert!(v["id_token"].as_str().is_some_and(|t| !t.is_empty()));
                }
                // Debug output shows the lifetime and nothing secret.
                let dbg = format!("{t:?}");
                prop_assert!(!dbg.contains(MARK));
                let expires_in: u64 = dbg
                    .split("expires_in: ")
                    .nth(1)
                    .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|s| s.parse().ok())
                    .unwrap();
                prop_assert!(
                    expires_in <= 10 * 365 * 86400,
                    "expires_in {} accepted from {}", expires_in, v["expires_in"]
                );
                if let Value::String(s) = &v["expires_in"] {
                    // Digits only, read as they are.
                    prop_assert!(s.bytes().all(|b| b.is_ascii_digit()), "{:?} accepted", s);
                    prop_assert_eq!(Some(expires_in), s.parse::<u64>().ok());
                }
            }
            Err(oidc_filter::flow::TokenResponseError::Status { status: s, error }) => {
                prop_assert_eq!(s, status);
                prop_assert!(!(200..300).contains(&status));
                prop_assert!(error.len() <= 64 && error.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
            }
            Err(_) => prop_assert!((200..300).contains(&status)),
        }
    }
}

fn raw_is_doc(body: &[u8], doc: &Value) -> bool {
    serde_json::from_slice::<Value>(body).ok().as_ref() == Some(doc)
}

// ------------------------------------------------------------------------------------------------
// headers: identity header hygiene and claim values
// ------------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(512, 1))]

    #[test]
    fn claim_header_values_cannot_split_headers(v in json_value()) {
        if let Some(h) = oidc_filter::headers::claim_header_value(&v) {
            prop_assert!(!h.is_empty() && h.chars().count() <= 4096);
            prop_assert!(!h.chars().any(char::is_control), "{:?}", h);
        }
    }

    #[test]
    fn identity_headers_are_recognised_in_every_spelling(
        name in prop_oneof![
            select(&["x-auth-request-user", "x-forwarded-user", "x-forwarded-email", "x-forwarded-groups",
                "x-forwarded-preferred-username", "x-forwarded-access-token", "x-auth-request-access-token",
                "x-user-email", "x-groups", "x-sub"][..]).prop_map(str::to_string),
            "x-auth-request-[a-z-]{0,12}",
        ],
        spelling in prop::collection::vec(any::<bool>(), 64),
        full in any::<bool>(),
    ) {
        // Any mix of case and `-`/`_` is the same header to Envoy or to a CGI-style upstream.
        let variant: String = name
            .chars()
            .zip(spelling.iter().cycle())
            .map(|(c, flip)| match (c, flip) {
                ('-', true) => '_',
                (c, true) => c.to_ascii_uppercase(),
                (c, false) => c,
            })
            .collect();
        let config = gate_config(full);
        let configured = ["x-user-email", "x-groups", "x-sub"].contains(&name.as_str());
        if !configured || full {
            prop_assert!(oidc_filter::headers::is_identity_header(config, variant.as_bytes()), "{:?} not stripped", variant);
        }
        prop_assert_eq!(
            oidc_filter::headers::normalize_header_name(&variant),
            oidc_filter::headers::normalize_header_name(&name)
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Known findings: minimal reproductions of what the properties above found. Ignored until fixed in
// filter/src; remove the `#[ignore]` (and the matching carve-out in the property) with the fix.
// ------------------------------------------------------------------------------------------------

#[test]
fn known_expires_in_string_is_unbounded() {
    for s in ["18446744073709551615", "315360001", "+300"] {
        let body = json!({"access_token": "at", "token_type": "Bearer", "expires_in": s});
        let r = parse_token_response(200, body.to_string().as_bytes(), false);
        assert!(
            r.is_err(),
            "expires_in {s:?} accepted as {r:?}; the number 315360001 is refused"
        );
    }
}

#[test]
fn known_unknown_key_with_backtick_is_misreported() {
    let e = Config::parse(br#"{"a`b":1}"#, &env).unwrap_err();
    assert_eq!(e.field, "a`b", "{e}");
}

#[test]
#[ignore = "finding: serde_json without `float_roundtrip` changes some floats in session claims"]
fn known_float_claims_change_in_a_session_round_trip() {
    let ring = shared_ring();
    let mut claims = Map::new();
    claims.insert("groups".into(), json!([4.143480930813608e-177]));
    let s = Session {
        access_token: Secret::new("at"),
        id_token: None,
        refresh_token: None,
        expires_at: 1,
        tokens_at: 0,
        subject: "s".into(),
        created_at: 0,
        seen_at: 0,
        max_expires_at: 1,
        login_id: None,
        claims,
    };
    let sealed = s.seal(ring, "h", &mut Xorshift::new(1)).unwrap();
    let (back, _) = Session::open(ring, "h", &sealed).unwrap();
    assert_eq!(back.claims, s.claims);
}

// ------------------------------------------------------------------------------------------------
// flow::Gate: the whole decision engine
// ------------------------------------------------------------------------------------------------

/// A previous cookie secret (32 bytes of 0x01), accepted for decryption only.
fn old_secret() -> String {
    STANDARD.encode([1u8; 32])
}

/// A fresh engine (a `Gate` keeps a per-VM session cache, so it is neither shared between test
/// threads nor between cases).
fn new_gate(full: bool) -> Gate {
    Gate::new(gate_config(full).clone())
}

fn gate_config(full: bool) -> &'static Config {
    static FULL: OnceLock<Config> = OnceLock::new();
    static MINIMAL: OnceLock<Config> = OnceLock::new();
    let cell = if full { &FULL } else { &MINIMAL };
    cell.get_or_init(|| {
        let mut cfg = json!({
            "issuer": ISS,
            "idp_cluster": "outbound|443||idp.example.com",
            "client_id": CLIENT,
            "client_secret": "gate-secret",
            "cookie_secret": GOOD_SECRET,
            "hosts": ["app.example.com", "*.apps.example.com"],
            "skip_paths": ["/healthz", "/public/"],
        });
        if full {
            let extra = json!({
                "previous_cookie_secrets": [old_secret()],
                "api_paths": ["/api/"],
                "bearer_tokens": {"audiences": ["api"]},
                "claims_to_headers": {"X-User-Email": "email", "x-groups": "groups", "x-sub": "sub"},
                "pass_access_token_headers": true,
                "post_logout_redirect_uri": "https://app.example.com/bye",
                "token_endpoint_auth_method": "client_secret_post",
            });
            for (k, v) in extra.as_object().unwrap() {
                cfg[k] = v.clone();
            }
        }
        Config::parse(cfg.to_string().as_bytes(), &|_| None).unwrap()
    })
}

fn provider(iss_supported: bool) -> &'static ProviderMetadata {
    static WITH: OnceLock<ProviderMetadata> = OnceLock::new();
    static WITHOUT: OnceLock<ProviderMetadata> = OnceLock::new();
    let cell = if iss_supported { &WITH } else { &WITHOUT };
    cell.get_or_init(|| {
        let mut doc = json!({
            "issuer": ISS,
            "authorization_endpoint": "https://idp.example.com/authorize",
            "token_endpoint": "https://idp.example.com/token",
            "jwks_uri": "https://idp.example.com/keys",
            "authorization_response_iss_parameter_supported": iss_supported,
        });
        if iss_supported {
            doc["end_session_endpoint"] = json!("https://idp.example.com/logout");
        }
        ProviderMetadata::parse(doc.to_string().as_bytes(), ISS).unwrap()
    })
}

/// The keyrings a cookie can be sealed with: the gate's current key, its previous key (full gate
/// only), or a key it does not know.
fn sealing_ring(which: u8) -> &'static Keyring {
    static RINGS: OnceLock<[Keyring; 3]> = OnceLock::new();
    let rings = RINGS.get_or_init(|| {
        [
            Keyring::new(
                &SecretBytes::new(STANDARD.decode(GOOD_SECRET).unwrap()),
                &[],
                &key_scope(ISS, CLIENT),
            ),
            keyring(&[1u8; 32]),
            keyring(&[2u8; 32]),
        ]
    });
    &rings[usize::from(which % 3)]
}

/// Whether the test's own reading of the policy protects `authority` (hosts `app.example.com`
/// and `*.apps.example.com`, any case, anything from the first `:` on ignored (Envoy routes
/// `host:x` under Istio's `host:*` domain), one trailing dot ignored).
fn model_protects(authority: &str) -> bool {
    let lower = authority.to_ascii_lowercase();
    let host = if lower.starts_with('[') {
        match lower.find(']') {
            Some(end) => &lower[..=end],
            None => &lower[..],
        }
    } else {
        lower.split(':').next().unwrap_or(&lower)
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    const SUFFIX: &str = ".apps.example.com";
    host == "app.example.com" || (host.len() > SUFFIX.len() && host.ends_with(SUFFIX))
}

#[derive(Debug, Clone)]
struct SessionPlan {
    ring: u8,
    right_host: bool,
    access: String,
    expires_delta: i64,
    max_delta: i64,
    refresh: bool,
    id_token: bool,
    claims: Map<String, Value>,
    chunks: usize,
    chunk_damage: u8,
}

#[derive(Debug, Clone)]
struct LoginPlan {
    ring: u8,
    right_host: bool,
    flow: String,
    age: i64,
    state: u8,
    iss: u8,
    code: Option<String>,
    error: Option<String>,
    extra: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
struct Scenario {
    full: bool,
    method: String,
    scheme: String,
    authority: String,
    path: String,
    cookie_headers: Vec<String>,
    session: Option<SessionPlan>,
    login: Option<LoginPlan>,
    bearer: Option<(bool, Value, Value)>,
    authorization: Vec<String>,
    sec_fetch_mode: Option<String>,
    sec_fetch_site: Option<String>,
    has_sec_fetch: bool,
    has_body: bool,
    accept: Option<String>,
    request_id: Option<String>,
    origin: Option<String>,
    acrm: Option<String>,
    provider: Option<bool>,
    jwks: bool,
    may_refetch: bool,
    now: u64,
    seed: u64,
}

fn authority() -> BoxedStrategy<String> {
    prop_oneof![
        8 => select(&[
            "app.example.com", "APP.Example.com", "app.example.com:443", "app.example.com.",
            "x.apps.example.com", "a.b.apps.example.com:8443", "X.APPS.EXAMPLE.COM.",
        ][..]).prop_map(str::to_string),
        2 => select(&[
            "other.example.com", "apps.example.com", ".apps.example.com", "app.example.com.evil",
            "evil.com", "app.example.com:", "app.example.com:x", "[::1]:8080", "", "app.example.com..",
            "evil.com#.apps.example.com", "evil.com/.apps.example.com", "u@x.apps.example.com",
        ][..]).prop_map(str::to_string),
        1 => text(),
    ]
    .boxed()
}

fn session_plan() -> BoxedStrategy<SessionPlan> {
    (
        (
            prop_oneof![3 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
            prop::bool::weighted(0.8),
            "[A-Za-z0-9]{4,12}",
            -4000i64..4000,
            -100i64..100_000,
        ),
        (
            any::<bool>(),
            any::<bool>(),
            prop::collection::btree_map(
                select(&["email", "groups", "name", "sub", "x"][..]).prop_map(str::to_string),
                prop_oneof![
                    json_text(),
                    Just(json!(["a", "b\r\nx: y", 3])),
                    Just(json!(true)),
                    claim_value()
                ],
                0..3,
            ),
        ),
        (prop_oneof![4 => Just(1usize), 1 => 2usize..=4], 0u8..6),
    )
        .prop_map(
            |(
                (ring, right_host, access, expires_delta, max_delta),
                (refresh, id_token, claims),
                (chunks, chunk_damage),
            )| {
                SessionPlan {
                    ring,
                    right_host,
                    access: format!("AT-{access}"),
                    expires_delta,
                    max_delta,
                    refresh,
                    id_token,
                    claims: claims.into_iter().collect(),
                    chunks,
                    chunk_damage,
                }
            },
        )
        .boxed()
}

fn login_plan() -> BoxedStrategy<LoginPlan> {
    (
        (
            prop_oneof![3 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
            prop::bool::weighted(0.85),
            "[A-Za-z0-9_-]{1,16}",
            prop_oneof![4 => 0i64..600, 1 => -1000i64..1000],
        ),
        (prop_oneof![6 => Just(0u8), 1 => 1u8..4], 0u8..4),
        (
            prop::option::weighted(0.9, prop_oneof![4 => "[A-Za-z0-9._~-]{1,40}", 1 => text()]),
            prop::option::weighted(
                0.15,
                prop_oneof![
                    Just("access_denied".to_string()),
                    Just("<script>alert(1)</script>".to_string()),
                    text()
                ],
            ),
            prop::collection::vec(
                (
                    select(&["state", "code", "iss", "x", "error"][..]).prop_map(str::to_string),
                    text(),
                ),
                0..2,
            ),
        ),
    )
        .prop_map(
            |((ring, right_host, flow, age), (state, iss), (code, error, extra))| LoginPlan {
                ring,
                right_host,
                flow,
                age,
                state,
                iss,
                code,
                error,
                extra: if extra.is_empty() || state != 0 {
                    extra
                } else {
                    Vec::new()
                },
            },
        )
        .boxed()
}

/// Bearer claims: valid ones with at most one member taken from random claims, or random ones.
fn bearer_claims(now: u64) -> BoxedStrategy<Value> {
    let random_with_aud = (
        random_claims(now),
        prop_oneof![
            Just(json!("api")),
            Just(json!(["x", "api"])),
            Just(Value::Null)
        ],
    )
        .prop_map(|(mut c, aud)| {
            if !aud.is_null() {
                c["aud"] = aud;
            }
            c
        });
    let perturbed =
        (random_claims(now), any::<Index>(), any::<bool>()).prop_map(move |(r, at, perturb)| {
            let mut c =
                json!({"iss": ISS, "aud": "api", "exp": now + 300, "iat": now - 10, "sub": "svc"});
            let r = r.as_object().unwrap();
            if perturb && !r.is_empty() {
                let (k, v) = r.iter().nth(at.index(r.len())).unwrap();
                c[k.as_str()] = v.clone();
            }
            c
        });
    prop_oneof![perturbed, random_with_aud].boxed()
}

const NOW: u64 = 1_800_000_000;

fn scenario() -> BoxedStrategy<Scenario> {
    let request = (
        any::<bool>(),
        prop_oneof![4 => Just("GET".to_string()), 1 => Just("OPTIONS".to_string()), 1 => Just("POST".to_string()), 1 => text()],
        prop_oneof![4 => Just("https".to_string()), 1 => Just("http".to_string()), 1 => text()],
        authority(),
        prop_oneof![
            2 => query().prop_map(|q| format!("/oauth2/callback?{q}")),
            1 => select(&["/oauth2/sign_out", "/oauth2/callback", "/healthz", "/public/a.css", "/api/x", "/", "/app?x=1"][..])
                .prop_map(str::to_string),
            3 => path(),
            1 => text(),
        ],
        prop::collection::vec(cookie_header(), 0..3),
    );
    let identity = (
        prop::option::weighted(0.5, session_plan()),
        prop::option::weighted(0.3, login_plan()),
        prop::option::weighted(
            0.3,
            (
                any::<bool>(),
                prop_oneof![3 => Just(json!({})), 1 => random_header()],
                bearer_claims(NOW),
            ),
        ),
        prop::collection::vec(
            prop_oneof![
                Just("Bearer".to_string()),
                Just("Basic Zm9vOmJhcg==".to_string()),
                Just("bearer  ".to_string()),
                text().prop_map(|t| format!("Bearer {t}")),
                text(),
            ],
            0..2,
        ),
    );
    let headers = (
        prop::option::of(
            prop_oneof![4 => Just("navigate".to_string()), 1 => Just("cors".to_string()), 1 => text()],
        ),
        any::<bool>(),
        prop::option::of(prop_oneof![
            Just("text/html".to_string()),
            Just("application/json".to_string()),
            text()
        ]),
        prop::option::of(prop_oneof![Just("rid-1".to_string()), text()]),
        prop::option::of(prop_oneof![
            Just("https://app.example.com".to_string()),
            text()
        ]),
        prop::option::of(prop_oneof![Just("GET".to_string()), text()]),
        prop::option::of(prop_oneof![
            Just("same-origin".to_string()),
            Just("Same-Origin".to_string()),
            Just("same-site".to_string()),
            Just("cross-site".to_string()),
            Just("none".to_string()),
            text()
        ]),
    );
    let world = (
        prop::option::weighted(0.8, any::<bool>()),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![4 => Just(NOW), 1 => (NOW - 100_000)..(NOW + 100_000)],
        any::<u64>(),
        any::<bool>(),
    );
    (request, identity, headers, world)
        .prop_map(|(r, i, h, w)| Scenario {
            full: r.0,
            method: r.1,
            scheme: r.2,
            authority: r.3,
            path: r.4,
            cookie_headers: r.5,
            session: i.0,
            login: i.1,
            bearer: i.2,
            authorization: i.3,
            sec_fetch_mode: h.0,
            has_sec_fetch: h.1,
            accept: h.2,
            request_id: h.3,
            origin: h.4,
            acrm: h.5,
            sec_fetch_site: h.6,
            provider: w.0,
            jwks: w.1,
            may_refetch: w.2,
            now: w.3,
            seed: w.4,
            has_body: w.5,
        })
        .boxed()
}

/// What the scenario planted, to judge the decision by.
#[derive(Default)]
struct Planted {
    /// The session's access token and whether the gate must accept the session.
    session: Option<(String, bool, Session)>,
    /// The login state planted and whether the callback must reach the token exchange.
    login: Option<(LoginState, bool)>,
    /// The bearer token and its claims.
    bearer: Option<(String, Value, Value)>,
}

fn offset(now: u64, delta: i64) -> u64 {
    now.saturating_add_signed(delta)
}

/// Builds the request's cookie headers, authorization headers and path from the plan.
fn plant(sc: &mut Scenario) -> Planted {
    let mut planted = Planted::default();
    let req_host = oidc_filter::flow::Request {
        authority: &sc.authority,
        ..Default::default()
    }
    .host()
    .into_owned();
    let mut rng = Xorshift::new(sc.seed ^ 0x5eed);
    if let Some(p) = &sc.session {
        let session = Session {
            access_token: Secret::new(p.access.clone()),
            id_token: p.id_token.then(|| Secret::new("id.token.x")),
            refresh_token: p.refresh.then(|| Secret::new("rt-1")),
            expires_at: offset(sc.now, p.expires_delta),
            tokens_at: offset(sc.now, -100),
            subject: "user-1".into(),
            created_at: offset(sc.now, -100),
            seen_at: 0,
            max_expires_at: offset(sc.now, p.max_delta),
            login_id: Some("login-1".into()),
            claims: p.claims.clone(),
        };
        let host = if p.right_host {
            req_host.clone()
        } else {
            format!("{req_host}.other")
        };
        let sealed = session.seal(sealing_ring(p.ring), &host, &mut rng).unwrap();
        // Chunked as the gate writes it: "<count>.<first>" plus "__Host-oidc-gate-<i>" cookies.
        let mut pairs = Vec::new();
        let intact = p.chunks == 1 || p.chunk_damage >= 3;
        if p.chunks == 1 {
            pairs.push(format!("{SESSION_COOKIE}={sealed}"));
        } else {
            let size = sealed.len().div_ceil(p.chunks);
            let parts: Vec<&str> = sealed
                .as_bytes()
                .chunks(size)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            for (i, c) in parts.iter().enumerate() {
                match (i, p.chunk_damage) {
                    (0, _) => pairs.push(format!("{SESSION_COOKIE}={}.{c}", parts.len())),
                    (1, 0) => {} // missing chunk
                    (1, 1) => pairs.push(format!("{SESSION_COOKIE}-{i}={c}x")), // altered chunk
                    (1, 2) => pairs.push(format!(
                        "{SESSION_COOKIE}-{i}={c}; {SESSION_COOKIE}-{i}={c}"
                    )), // duplicate
                    _ => pairs.push(format!("{SESSION_COOKIE}-{i}={c}")),
                }
            }
        }
        let accepted = intact
            && p.right_host
            && (p.ring == 0 || (p.ring == 1 && sc.full))
            && sc.now < session.max_expires_at;
        planted.session = Some((p.access.clone(), accepted, session));
        sc.cookie_headers.push(pairs.join("; "));
    }
    if let Some(p) = &sc.login {
        let flow = p.flow.clone();
        let state = format!("{flow}.rest-of-state");
        let created_at = offset(sc.now, -p.age);
        let login = LoginState {
            state: Secret::new(state.clone()),
            nonce: Secret::new(NONCE),
            code_verifier: Secret::new("verifier-0123456789-0123456789-0123456789"),
            return_to: "/after?x=1".into(),
            // Empty: an old-format login cookie without the authority binding.
            authority: String::new(),
            created_at,
        };
        let name = login_cookie_name(&flow);
        let host = if p.right_host {
            req_host.clone()
        } else {
            format!("{req_host}.other")
        };
        let sealed = login
            .seal(sealing_ring(p.ring), &host, &name, &mut rng)
            .unwrap();
        sc.cookie_headers.push(format!("{name}={sealed}"));
        let sent_state = match p.state {
            0 => state.clone(),
            1 => format!("{state}x"),
            2 => format!("{flow}x.rest-of-state"),
            _ => String::new(),
        };
        let mut q: Vec<(String, String)> = Vec::new();
        if p.state != 3 {
            q.push(("state".into(), sent_state));
        }
        match p.iss {
            0 | 1 => q.push(("iss".into(), ISS.into())),
            2 => q.push(("iss".into(), format!("{ISS}/"))),
            _ => {}
        }
        if let Some(c) = &p.code {
            q.push(("code".into(), c.clone()));
        }
        if let Some(e) = &p.error {
            q.push(("error".into(), e.clone()));
        }
        q.extend(p.extra.iter().cloned());
        let pairs: Vec<(&str, &str)> = q.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        sc.path = format!(
            "/oauth2/callback?{}",
            oidc_filter::http::form_encode(&pairs)
        );
        let (ring_ok, in_time) = (
            p.ring == 0 || (p.ring == 1 && sc.full),
            sc.now < created_at.saturating_add(LOGIN_TTL_SECS)
                && created_at <= sc.now.saturating_add(LOGIN_TTL_SECS),
        );
        let keys: Vec<&str> = q.iter().map(|(k, _)| k.as_str()).collect();
        let distinct = keys.iter().enumerate().all(|(i, k)| !keys[..i].contains(k));
        let iss_ok = match p.iss {
            0 | 1 => true,
            2 => false,
            _ => sc.provider == Some(false),
        };
        let exchange = ring_ok
            && p.right_host
            && in_time
            && p.state == 0
            && distinct
            && iss_ok
            && p.error.is_none()
            && p.code
                .as_ref()
                .is_some_and(|c| !c.is_empty() && c.len() <= 4096);
        planted.login = Some((login, exchange));
    }
    if let Some((es, header, claims)) = &sc.bearer {
        let token = idp(if *es {
            SigningAlg::Es256
        } else {
            SigningAlg::Rs256
        })
        .sign_jwt(header.clone(), claims.clone());
        if sc.seed % 4 != 0 {
            // Mostly the bearer alone; sometimes beside other Authorization headers.
            sc.authorization.clear();
        }
        sc.authorization.insert(0, format!("Bearer {token}"));
        planted.bearer = Some((token, header.clone(), claims.clone()));
    }
    planted
}

fn no_header_injection(name: &str, value: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        !value.contains(['\r', '\n', '\0']) && !name.contains(['\r', '\n', '\0', ':']),
        "header {:?}: {:?}",
        name,
        value
    );
    Ok(())
}

fn check_set_cookie(c: &str) -> Result<(), TestCaseError> {
    no_header_injection("set-cookie", c)?;
    let name = c.split('=').next().unwrap_or("");
    prop_assert!(
        name.starts_with(SESSION_COOKIE),
        "foreign cookie set: {}",
        c
    );
    for attr in ["; Path=/", "; Secure", "; HttpOnly", "; SameSite=Lax"] {
        prop_assert!(c.contains(attr), "{} without {}", c, attr);
    }
    prop_assert!(!c.to_ascii_lowercase().contains("domain="));
    Ok(())
}

#[test]
fn gate_decide() {
    check(cases(256, 4), scenario(), |mut sc| {
        let planted = plant(&mut sc);
        let g = new_gate(sc.full);
        let req = oidc_filter::flow::Request {
            method: &sc.method,
            scheme: &sc.scheme,
            authority: &sc.authority,
            path: &sc.path,
            cookie_headers: sc.cookie_headers.iter().map(String::as_str).collect(),
            sec_fetch_mode: sc.sec_fetch_mode.as_deref(),
            sec_fetch_site: sc.sec_fetch_site.as_deref(),
            has_sec_fetch: sc.has_sec_fetch,
            has_body: sc.has_body,
            accept: sc.accept.as_deref(),
            request_id: sc.request_id.as_deref(),
            authorization: sc.authorization.iter().map(String::as_str).collect(),
            origin: sc.origin.as_deref(),
            access_control_request_method: sc.acrm.as_deref(),
        };
        let known = Known {
            provider: sc.provider.map(provider),
            jwks: sc.jwks.then(jwks),
            may_refetch_keys: sc.may_refetch,
        };
        let (decision, note) = g.decide(&req, known, sc.now, &mut Xorshift::new(sc.seed));
        // The session cache is invisible: the same request later gets the same decision from
        // this engine (which may answer from its cache) as from a fresh one.
        let later = sc.now.saturating_add(sc.seed % 4000).saturating_sub(300);
        let warm = g.decide(&req, known, later, &mut Xorshift::new(sc.seed ^ 1));
        // A login the first decision ended (a logout) is state every VM learns, not the cache:
        // the fresh engine learns it as another VM would.
        let fresh = new_gate(sc.full);
        let mut ended = oidc_filter::ended::EndedLogins::default();
        for e in g.take_unpublished_endings() {
            let _ = ended.insert(e, sc.now);
        }
        fresh.learn_endings(&ended.encode(), sc.now);
        let cold = fresh.decide(&req, known, later, &mut Xorshift::new(sc.seed ^ 1));
        prop_assert_eq!(
            format!("{warm:?}"),
            format!("{cold:?}"),
            "session cache changed the decision"
        );
        if let Some(log) = &note.log {
            for secret in ["gate-secret", "verifier-0123456789", "rt-1", MARK] {
                prop_assert!(!log.contains(secret), "secret in log: {}", log);
            }
            if let Some((at, _, _)) = &planted.session {
                prop_assert!(!log.contains(at.as_str()), "access token in log: {}", log);
            }
        }
        let protected = model_protects(&sc.authority);
        prop_assert_eq!(
            g.config().protects(&sc.authority),
            protected,
            "{:?}",
            sc.authority
        );
        if !protected {
            prop_assert!(
                matches!(decision, Decision::PassThrough),
                "{:?} for {:?}",
                decision,
                sc.authority
            );
            return Ok(());
        }
        // The test's own reading: a protected host with anything but `:` and 1-5 digits after
        // it is refused outright.
        let port = sc
            .authority
            .get(sc.authority.find(':').unwrap_or(sc.authority.len())..)
            .unwrap_or("");
        let port_ok = sc.authority.starts_with('[')
            || port.is_empty()
            || (port.len() >= 2
                && port.len() <= 6
                && port[1..].bytes().all(|b| b.is_ascii_digit()));
        if !port_ok {
            prop_assert!(
                matches!(&decision, Decision::Reply(r) if r.status == 400),
                "{:?} for {:?}",
                decision,
                sc.authority
            );
            return Ok(());
        }
        let (path_only, _) = split_path(&sc.path);
        let skipped = g.config().is_skipped(&sc.path)
                // CORS preflights pass without identity when `pass_cors_preflight` is on.
                || (g.config().pass_cors_preflight
                    && sc.method == "OPTIONS"
                    && sc.origin.is_some()
                    && sc.acrm.is_some()
                    && !sc.has_body);
        let special = path_only == "/oauth2/callback" || path_only == "/oauth2/sign_out";
        match &decision {
            Decision::PassThrough => {
                prop_assert!(false, "protected {:?} passed through", sc.authority)
            }
            Decision::Forward(f) => {
                if let Some(c) = &f.cookie {
                    // The rebuilt Cookie header holds only what the client sent (which Envoy
                    // has already checked for CR, LF and NUL).
                    if !sc
                        .cookie_headers
                        .iter()
                        .any(|h| h.contains(['\r', '\n', '\0']))
                    {
                        no_header_injection("cookie", c)?;
                    }
                    for (n, _) in parse_cookies([c.as_str()]) {
                        prop_assert!(!is_own_cookie(n), "own cookie {} forwarded", n);
                    }
                }
                for c in &f.response_cookies {
                    check_set_cookie(c)?;
                }
                for (n, v) in &f.set_headers {
                    no_header_injection(n, v)?;
                }
                prop_assert!(!special);
                let via_session = planted.session.as_ref().is_some_and(|(at, accepted, s)| {
                    *accepted
                        && f.authorization.as_deref() == Some(&format!("Bearer {at}"))
                        && sc.now < s.max_expires_at
                });
                let via_bearer = planted.bearer.as_ref().is_some_and(|(t, _, _)| {
                    f.authorization.as_deref() == Some(&format!("Bearer {t}"))
                });
                match &f.authorization {
                    None => prop_assert!(skipped, "forwarded without login: {:?}", sc.path),
                    Some(_) => prop_assert!(
                        via_session || via_bearer,
                        "forwarded with an Authorization nobody earned: {:?}",
                        f.authorization
                    ),
                }
                if via_bearer && !via_session {
                    let (t, _, claims) = planted.bearer.as_ref().unwrap();
                    let audiences = vec!["api".to_string()];
                    let expect = Expectations {
                        exclusive_audiences: false,
                        issuer: ISS,
                        audiences: &audiences,
                        client_id: None,
                        nonce: None,
                        require_iat: false,
                        require_sub: false,
                        now: sc.now,
                        skew: 60,
                    };
                    let v = token::verify(t, jwks(), &expect);
                    prop_assert!(v.is_ok(), "bearer forwarded but does not verify: {:?}", v);
                    let signed_header: Value = serde_json::from_slice(
                        &URL_SAFE_NO_PAD
                            .decode(t.split('.').next().unwrap())
                            .unwrap(),
                    )
                    .unwrap();
                    check_accepted(&v.unwrap(), &signed_header, claims, &expect)?;
                }
                if via_session {
                    let (_, _, s) = planted.session.as_ref().unwrap();
                    prop_assert!(sc.now < s.expires_at || s.refresh_token.is_some());
                    if sc.session.as_ref().is_some_and(|p| p.ring == 1) {
                        prop_assert!(
                            !f.response_cookies.is_empty(),
                            "session under the previous key not resealed"
                        );
                    }
                    if sc.full {
                        let sub = f
                            .set_headers
                            .iter()
                            .find(|(n, _)| n == "x-sub")
                            .map(|(_, v)| v.as_str());
                        prop_assert_eq!(sub, Some("user-1"));
                    }
                }
            }
            Decision::Reply(r) => {
                // Deleting the client's own login cookies echoes their names: CR, LF and NUL
                // can only come back if the client sent them, which Envoy refuses.
                let raw_client = sc
                    .cookie_headers
                    .iter()
                    .any(|h| h.contains(['\r', '\n', '\0']));
                for (n, v) in &r.headers {
                    if !raw_client {
                        no_header_injection(n, v)?;
                    }
                    if n == "set-cookie" {
                        prop_assert!(
                            v.split('=')
                                .next()
                                .unwrap_or("")
                                .starts_with(SESSION_COOKIE),
                            "{}",
                            v
                        );
                        if !raw_client {
                            check_set_cookie(v)?;
                        }
                    }
                }
                prop_assert!(
                    !r.body.contains("<script"),
                    "unescaped markup in {}",
                    r.body
                );
                // 200 only for the page that asks before a logout another site started.
                let logout_confirmation = path_only == "/oauth2/sign_out"
                    && !sc.sec_fetch_site.as_deref().is_none_or(|site| {
                        site.eq_ignore_ascii_case("same-origin")
                            || site.eq_ignore_ascii_case("none")
                    });
                let not_a_get = !matches!(sc.method.as_str(), "GET" | "HEAD");
                prop_assert!(
                    [302u16, 400, 401, 403, 500, 502, 503].contains(&r.status)
                        || (r.status == 200 && logout_confirmation)
                        || (r.status == 303 && not_a_get),
                    "status {}",
                    r.status
                );
                if r.status == 303 {
                    // A navigation that is not a GET comes back as one, on the same origin: a
                    // path, never a scheme, host or protocol-relative reference.
                    let loc = &r.headers.iter().find(|(n, _)| n == "location").unwrap().1;
                    let base = url::Url::parse("https://app.example.com/").unwrap();
                    prop_assert!(loc.starts_with('/') && !loc.starts_with("//"), "{}", loc);
                    prop_assert_eq!(base.join(loc).map(|u| u.origin()), Ok(base.origin()));
                    prop_assert!(!r.headers.iter().any(|(n, _)| n == "set-cookie"));
                }
                if r.status == 302 {
                    let loc = &r.headers.iter().find(|(n, _)| n == "location").unwrap().1;
                    if loc != "/" {
                        let u = url::Url::parse(loc).unwrap();
                        prop_assert_eq!(
                            u.host_str(),
                            Some("idp.example.com"),
                            "redirect to {}",
                            loc
                        );
                    }
                }
            }
            Decision::NeedProvider => prop_assert!(sc.provider.is_none()),
            Decision::NeedKeys => prop_assert!(!sc.jwks || sc.may_refetch),
            Decision::ExchangeCode { call, .. } => {
                prop_assert_eq!(path_only, "/oauth2/callback");
                let exchange = planted.login.as_ref().is_some_and(|(_, e)| *e);
                prop_assert!(
                    exchange,
                    "token exchange for a callback that should fail: {:?}",
                    sc.path
                );
                let body = String::from_utf8(call.body.clone()).unwrap();
                prop_assert!(body.contains("code_verifier=verifier-0123456789"));
                prop_assert_eq!(call.authority.as_str(), "idp.example.com");
            }
            Decision::Refresh { call, .. } => {
                let (_, accepted, s) = planted.session.as_ref().expect("refresh without a session");
                prop_assert!(*accepted && s.refresh_token.is_some() && sc.provider.is_some());
                prop_assert!(String::from_utf8_lossy(&call.body).contains("refresh_token=rt-1"));
            }
        }
        // A callback whose every check passes reaches the token exchange.
        if let Some((_, true)) = &planted.login {
            if sc.provider.is_some() {
                prop_assert!(
                    matches!(decision, Decision::ExchangeCode { .. }),
                    "valid callback refused: {:?} {:?}",
                    decision,
                    note
                );
            }
        }
        Ok(())
    });
}

/// A browser navigation.
fn nav<'a>(
    authority: &'a str,
    path: &'a str,
    cookies: Vec<&'a str>,
) -> oidc_filter::flow::Request<'a> {
    oidc_filter::flow::Request {
        method: "GET",
        scheme: "https",
        authority,
        path,
        cookie_headers: cookies,
        sec_fetch_mode: Some("navigate"),
        has_sec_fetch: true,
        accept: Some("text/html"),
        request_id: Some("rid"),
        ..Default::default()
    }
}

/// The sealed session value from a reply's `Set-Cookie` headers (single cookie or chunks).
fn session_from_set_cookies(set_cookies: &[&str]) -> Option<String> {
    let value_of = |name: &str| {
        set_cookies.iter().find_map(|c| {
            let pair = c.split(';').next()?;
            let (n, v) = pair.split_once('=')?;
            (n == name && !v.is_empty()).then(|| v.to_string())
        })
    };
    let first = value_of(SESSION_COOKIE)?;
    match first.split_once('.') {
        None => Some(first),
        Some((count, head)) => {
            let mut out = head.to_string();
            for i in 1..count.parse::<usize>().ok()? {
                out.push_str(&value_of(&format!("{SESSION_COOKIE}-{i}"))?);
            }
            Some(out)
        }
    }
}

// Each case signs an ID token and runs three engine steps: fewer of them.
#[test]
fn gate_login_round_trip() {
    check(
        cases(96, 16),
        (
            any::<bool>(),
            select(
                &[
                    "app.example.com",
                    "APP.example.com:443",
                    "x.apps.example.com",
                    "Y.Apps.Example.Com.",
                ][..],
            ),
            prop_oneof![
                path(),
                text(),
                Just("//evil.com/x".to_string()),
                "/[ -~]{0,30}"
            ],
            prop_oneof![4 => 0u64..600, 1 => 590u64..700],
            any::<bool>(),
            prop_oneof![4 => Just(json!({})), 1 => random_header()],
            (
                random_claims(NOW),
                any::<Index>(),
                prop::bool::weighted(0.4),
            ),
            token_response(),
            prop::bool::weighted(0.9),
            prop_oneof![6 => Just(200u16), 1 => any::<u16>()],
            (prop::bool::weighted(0.9), any::<bool>()),
            any::<u64>(),
        ),
        |(
            full,
            authority,
            return_path,
            callback_delay,
            es,
            header,
            perturbation,
            response,
            with_id_token,
            status,
            keys,
            seed,
        )| {
            let g = new_gate(full);
            let mut rng = Xorshift::new(seed);
            let known = Known {
                provider: Some(provider(true)),
                jwks: None,
                may_refetch_keys: false,
            };

            // 1. Login redirect.
            let (d, _) = g.decide(&nav(authority, &return_path, vec![]), known, NOW, &mut rng);
            let Decision::Reply(r) = d else {
                prop_assume!(false);
                unreachable!()
            };
            prop_assume!(r.status == 302);
            let location =
                url::Url::parse(&r.headers.iter().find(|(n, _)| n == "location").unwrap().1)
                    .unwrap();
            prop_assert_eq!(location.host_str(), Some("idp.example.com"));
            let q: std::collections::HashMap<String, String> =
                location.query_pairs().into_owned().collect();
            let host = oidc_filter::flow::Request {
                authority,
                ..Default::default()
            }
            .host()
            .into_owned();
            let lower_authority = authority.to_ascii_lowercase();
            prop_assert_eq!(
                &q["redirect_uri"],
                &format!("https://{lower_authority}/oauth2/callback")
            );
            prop_assert_eq!(q["code_challenge"].len(), 43);
            let login_cookie = r
                .headers
                .iter()
                .find(|(n, _)| n == "set-cookie")
                .unwrap()
                .1
                .split(';')
                .next()
                .unwrap()
                .to_string();
            prop_assert!(
                login_cookie.starts_with(&login_cookie_name(q["state"].split('.').next().unwrap()))
            );

            // 2. Callback.
            let now = NOW + callback_delay;
            let cb = format!(
                "/oauth2/callback?{}",
                oidc_filter::http::form_encode(&[
                    ("code", "the-code"),
                    ("state", &q["state"]),
                    ("iss", ISS)
                ])
            );
            let (d, note) = g.decide(
                &nav(authority, &cb, vec![&login_cookie]),
                known,
                now,
                &mut rng,
            );
            let pending = match d {
                Decision::ExchangeCode { call, pending } => {
                    prop_assert!(
                        callback_delay < LOGIN_TTL_SECS,
                        "expired login reached the token exchange"
                    );
                    let form: std::collections::HashMap<String, String> =
                        form_urlencoded::parse(&call.body).into_owned().collect();
                    use sha2::Digest as _;
                    let challenge = URL_SAFE_NO_PAD
                        .encode(sha2::Sha256::digest(form["code_verifier"].as_bytes()));
                    prop_assert_eq!(
                        &challenge,
                        &q["code_challenge"],
                        "PKCE verifier does not match the challenge"
                    );
                    prop_assert_eq!(form["code"].as_str(), "the-code");
                    prop_assert_eq!(&form["redirect_uri"], &q["redirect_uri"]);
                    pending
                }
                other => {
                    prop_assert!(
                        callback_delay >= LOGIN_TTL_SECS,
                        "valid callback refused: {:?} {:?}",
                        other,
                        note
                    );
                    return Ok(());
                }
            };

            // 3. Token response and ID token.
            let (random, at, perturb) = perturbation;
            let mut claims = json!({
                "iss": ISS, "aud": CLIENT, "sub": "user-1", "exp": now + 300, "iat": now - 5,
                "nonce": q["nonce"], "email": "u@example.com", "groups": ["a", "b"],
            });
            let random = random.as_object().unwrap();
            if perturb && !random.is_empty() {
                let (k, v) = random.iter().nth(at.index(random.len())).unwrap();
                claims[k.as_str()] = v.clone();
            }
            let id_token = idp(if es {
                SigningAlg::Es256
            } else {
                SigningAlg::Rs256
            })
            .sign_jwt(header, claims.clone());
            let mut response = response;
            if with_id_token {
                response["id_token"] = json!(id_token);
            }
            let body = serde_json::to_vec(&response).unwrap();
            let (jwks_present, may_refetch) = keys;
            let step_keys = oidc_filter::flow::Keys {
                jwks: jwks_present.then(jwks),
                may_refetch,
                fetched_for_it: !may_refetch,
            };
            let (step, _) = g.complete_login(&pending, status, &body, step_keys, now, &mut rng);
            match step {
                oidc_filter::flow::LoginStep::NeedKeys => {
                    prop_assert!(!jwks_present || may_refetch);
                }
                oidc_filter::flow::LoginStep::Done(r) => {
                    let set: Vec<&str> = r
                        .headers
                        .iter()
                        .filter(|(n, _)| n == "set-cookie")
                        .map(|(_, v)| v.as_str())
                        .collect();
                    for c in &set {
                        check_set_cookie(c)?;
                    }
                    for (n, v) in &r.headers {
                        no_header_injection(n, v)?;
                    }
                    // The login cookie is always deleted.
                    let deleted = format!("{}=;", login_cookie.split('=').next().unwrap());
                    prop_assert!(set
                        .iter()
                        .any(|c| c.starts_with(&deleted) && c.contains("Max-Age=0")));
                    let Some(sealed) = session_from_set_cookies(&set) else {
                        prop_assert!(r.status != 302, "redirect without a session");
                        return Ok(());
                    };
                    // A session was set: everything about the exchange and the ID token was right.
                    prop_assert_eq!(r.status, 302);
                    prop_assert!((200..300).contains(&status));
                    prop_assert!(response["token_type"]
                        .as_str()
                        .is_some_and(|t| t.eq_ignore_ascii_case("bearer")));
                    prop_assert!(response["id_token"].as_str() == Some(id_token.as_str()));
                    let audiences = vec![CLIENT.to_string()];
                    let expect = Expectations {
                        exclusive_audiences: false,
                        issuer: ISS,
                        audiences: &audiences,
                        client_id: Some(CLIENT),
                        nonce: Some(&q["nonce"]),
                        require_iat: true,
                        require_sub: true,
                        now,
                        skew: 60,
                    };
                    let v = token::verify(&id_token, jwks(), &expect);
                    prop_assert!(
                        v.is_ok(),
                        "session from an ID token that does not verify: {:?}",
                        v
                    );
                    let signed_header: Value = serde_json::from_slice(
                        &URL_SAFE_NO_PAD
                            .decode(id_token.split('.').next().unwrap())
                            .unwrap(),
                    )
                    .unwrap();
                    check_accepted(&v.unwrap(), &signed_header, &claims, &expect)?;
                    let (session, reseal) = Session::open(sealing_ring(0), &host, &sealed).unwrap();
                    prop_assert!(!reseal);
                    prop_assert_eq!(
                        Some(session.access_token.expose()),
                        response["access_token"].as_str()
                    );
                    prop_assert_eq!(session.subject.as_str(), claims["sub"].as_str().unwrap());
                    prop_assert!(session.max_expires_at <= now + g.config().session_max_age);
                    // Back to where the user started, on the same origin.
                    let loc = url::Url::parse(
                        &r.headers.iter().find(|(n, _)| n == "location").unwrap().1,
                    )
                    .unwrap();
                    prop_assert_eq!(loc.scheme(), "https");
                    prop_assert_eq!(
                        loc.host_str().map(|h| h.trim_end_matches('.')),
                        Some(host.as_str())
                    );
                }
            }
            Ok(())
        },
    );
}

#[test]
fn known_idna_stub_panics_on_mixed_case_unicode_hosts() {
    let discovery = json!({
        "issuer": ISS,
        "authorization_endpoint": "https://Aে/authorize",
        "token_endpoint": "https://idp.example.com/token",
        "jwks_uri": "https://idp.example.com/keys",
    })
    .to_string();
    let config = json!({
        "issuer": "https://Aে", "idp_cluster": "c", "client_id": "g", "client_secret": "s",
        "cookie_secret": GOOD_SECRET, "hosts": ["a.example.com"],
    })
    .to_string();
    type Case = Box<dyn Fn() + std::panic::RefUnwindSafe>;
    let cases: Vec<(&str, Case)> = vec![
        (
            "http::same_origin_target",
            Box::new(|| drop(same_origin_target("https", "Aে", "/"))),
        ),
        (
            "discovery::ProviderMetadata::parse",
            Box::new(move || drop(ProviderMetadata::parse(discovery.as_bytes(), ISS))),
        ),
        (
            "config::Config::parse",
            Box::new(move || drop(Config::parse(config.as_bytes(), &env))),
        ),
    ];
    let mut panicked = Vec::new();
    for (name, f) in &cases {
        if std::panic::catch_unwind(f).is_err() {
            panicked.push(*name);
        }
    }
    assert!(panicked.is_empty(), "panicked: {panicked:?}");
}

#[test]
fn verify_fails_closed_after_2106() {
    let now = 1u64 << 32;
    let claims = json!({"iss": ISS, "aud": CLIENT, "sub": "u", "exp": now + 300, "iat": now - 5});
    let token = idp(SigningAlg::Es256).sign_jwt(json!({}), claims);
    let audiences = vec![CLIENT.to_string()];
    let expect = Expectations {
        exclusive_audiences: false,
        issuer: ISS,
        audiences: &audiences,
        client_id: None,
        nonce: None,
        require_iat: true,
        require_sub: true,
        now,
        skew: 60,
    };
    let r =
        std::panic::catch_unwind(|| token::verify(&token, jwks(), &expect).map(|v| v.expires_at));
    // jwt-simple's clock cannot represent 2^32 s; the filter refuses instead of overflowing.
    assert!(
        matches!(r, Ok(Err(token::TokenError::Malformed(_)))),
        "at 2^32 s: {r:?}"
    );
}

#[test]
fn known_skip_path_accepts_percent_u_escapes() {
    let prefixes = vec!["/public/".to_string()];
    for path in [
        "/public/%u002e%u002e/admin",
        "/public/..%u002fadmin",
        "/public/%/x",
    ] {
        assert!(
            !skip_path_matches(path, &prefixes),
            "{path} skips login; an upstream that decodes %u sees /admin"
        );
    }
}

#[test]
fn known_wrongly_typed_jti_is_reported_as_bad_signature() {
    let now = 1_800_000_000u64;
    let claims = json!({"iss": ISS, "aud": CLIENT, "sub": "u", "exp": now + 300, "iat": now - 5, "jti": false});
    let token = idp(SigningAlg::Es256).sign_jwt(json!({}), claims);
    let audiences = vec![CLIENT.to_string()];
    let expect = Expectations {
        exclusive_audiences: false,
        issuer: ISS,
        audiences: &audiences,
        client_id: None,
        nonce: None,
        require_iat: true,
        require_sub: true,
        now,
        skew: 60,
    };
    let r = token::verify(&token, jwks(), &expect);
    assert!(
        !matches!(r, Err(oidc_filter::token::TokenError::BadSignature)),
        "a correctly signed token reported as {r:?}"
    );
}

#[test]
fn known_login_cookie_names_echoed_into_set_cookie() {
    let g = new_gate(false);
    let req = nav(
        "app.example.com",
        "/oauth2/sign_out",
        vec!["__Host-oidc-gate-login-a\u{0}b c=1"],
    );
    let known = Known {
        provider: Some(provider(true)),
        jwks: None,
        may_refetch_keys: false,
    };
    let (d, _) = g.decide(&req, known, NOW, &mut Xorshift::new(1));
    let Decision::Reply(r) = d else {
        panic!("expected a reply, got {d:?}")
    };
    for (n, v) in r.headers.iter().filter(|(n, _)| n == "set-cookie") {
        let name = v.split('=').next().unwrap_or("");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)),
            "{n}: {v:?}"
        );
    }
}

/// `skip_path_matches` as it was before its one-pass rewrite: one scan per rule.
fn reference_skip_path_matches(raw_path: &str, prefixes: &[String]) -> bool {
    let (path, _) = split_path(raw_path);
    if path.contains(['\\', ';'])
        || path.contains("//")
        || path.bytes().any(|b| b.is_ascii_control())
        || !path.is_ascii()
        || path.contains('%')
        || path.split('/').any(|seg| seg == "." || seg == "..")
    {
        return false;
    }
    prefixes
        .iter()
        .any(|p| oidc_filter::config::path_has_prefix(path, p))
}
