//! Header hygiene: which incoming headers the filter owns, in every spelling.

use crate::config::Config;

/// Identity headers oauth2-proxy and similar gateways set; a client must never be able to supply
/// them, whether or not this configuration sets them.
const KNOWN_IDENTITY_HEADERS: [&str; 6] = [
    "x-forwarded-access-token",
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-auth-request-access-token",
];
/// Any header with this prefix is treated as identity (oauth2-proxy's `X-Auth-Request-*`).
const IDENTITY_PREFIX: &str = "x-auth-request-";

/// Lowercases and maps `_` to `-`: Envoy and many upstream frameworks (CGI, WSGI, Rack) treat
/// `X_Auth_Request_User` as `X-Auth-Request-User`, so both spellings must be stripped.
pub fn normalize_header_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c == '_' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// Whether an incoming header must be removed before the request goes upstream.
///
/// Runs for every header of every request, so it compares the host's bytes in place instead of
/// normalizing into a new string. A name with bytes that are not ASCII can still match (after
/// the `x-auth-request-` prefix).
pub fn is_identity_header(config: &Config, name: &[u8]) -> bool {
    starts_with_normalized(name, IDENTITY_PREFIX)
        || KNOWN_IDENTITY_HEADERS
            .iter()
            .any(|h| eq_normalized(name, h))
        || config
            .claims_to_headers
            .iter()
            .any(|(h, _)| eq_normalized(name, h))
}

fn normalized_byte(b: u8) -> u8 {
    if b == b'_' {
        b'-'
    } else {
        b.to_ascii_lowercase()
    }
}

/// `name` equals the lowercase `target` once `_` counts as `-` and case is ignored.
fn eq_normalized(name: &[u8], target: &str) -> bool {
    name.len() == target.len()
        && name
            .iter()
            .zip(target.bytes())
            .all(|(a, b)| normalized_byte(*a) == b)
}

fn starts_with_normalized(name: &[u8], prefix: &str) -> bool {
    name.len() >= prefix.len()
        && name
            .iter()
            .zip(prefix.bytes())
            .all(|(a, b)| normalized_byte(*a) == b)
}

/// A header value from a claim: strings as they are, integers printed, booleans as `true` or
/// `false`, arrays of strings and integers joined by commas. A value that cannot be passed on as
/// it is, unambiguously, is left out rather than altered, so the upstream may miss a header but
/// never reads another identity: a control character (it could split the header), surrounding
/// spaces (an HTTP/1 upstream strips them: `" alice"` would read as `alice`), an array element
/// with a comma, spaces around it or empty (`["viewers,admins"]` would read as two groups), any
/// other element (objects, booleans, nulls), a number that is not an integer (printing it may
/// round), or more than 4,096 bytes (a cut list could name fewer groups, a cut name another
/// user).
pub fn claim_header_value(value: &serde_json::Value) -> Option<String> {
    const MAX_LEN: usize = 4096;
    fn plain(s: &str) -> bool {
        !s.is_empty() && s.trim() == s
    }
    fn integer(n: &serde_json::Number) -> Option<String> {
        (n.is_i64() || n.is_u64()).then(|| n.to_string())
    }
    let raw = match value {
        serde_json::Value::String(s) if plain(s) => s.clone(),
        serde_json::Value::Number(n) => integer(n)?,
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Array(items) => {
            let mut parts = Vec::with_capacity(items.len());
            for item in items {
                parts.push(match item {
                    serde_json::Value::String(s) if plain(s) && !s.contains(',') => s.clone(),
                    serde_json::Value::Number(n) => integer(n)?,
                    _ => return None,
                });
            }
            parts.join(",")
        }
        _ => return None,
    };
    (!raw.is_empty() && raw.len() <= MAX_LEN && !raw.chars().any(char::is_control)).then_some(raw)
}

/// Claims that hold lists: RFC 9068 §2.2.3.1's `groups`, `roles` and `entitlements`, RFC 8176's
/// `amr`, AD FS's `group` and `role`, LDAP's `memberOf` and Cognito's `cognito:groups`. Some IdPs
/// send a single member as a plain string (AD FS, PingFederate): a comma in it would read as two
/// members, so it leaves the header out, as in an array.
const LIST_CLAIMS: [&str; 8] = [
    "groups",
    "roles",
    "entitlements",
    "amr",
    "group",
    "role",
    "memberOf",
    "cognito:groups",
];

/// [`claim_header_value`] for the claim named `claim`: a plain string in a list claim is a
/// one-member list.
pub fn named_claim_header_value(claim: &str, value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) if s.contains(',') && LIST_CLAIMS.contains(&claim) => None,
        _ => claim_header_value(value),
    }
}

/// Whether the claims vouch for the `email`: `email_verified` true (or `"true"`, as some IdPs
/// send it), or absent, as many IdPs (Entra ID among them) send no such claim. Anything else
/// (false, `"false"`, 0, null) does not.
pub fn email_vouched_for(claims: &serde_json::Map<String, serde_json::Value>) -> bool {
    match claims.get("email_verified") {
        None => true,
        Some(serde_json::Value::Bool(verified)) => *verified,
        Some(serde_json::Value::String(s)) => s.eq_ignore_ascii_case("true"),
        Some(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> Config {
        let cfg = json!({
            "issuer": "https://idp.example.com", "idp_cluster": "c", "client_id": "g", "client_secret": "s",
            "cookie_secret": "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=", "hosts": ["a.example.com"],
            "claims_to_headers": {"X-User-Email": "email", "x-groups": "groups"}
        });
        Config::parse(cfg.to_string().as_bytes(), &|_| None).unwrap()
    }

    #[test]
    fn strips_identity_headers_in_every_spelling() {
        let c = config();
        for name in [
            "x-auth-request-user",
            "X-Auth-Request-User",
            "x_auth_request_user",
            "X-Auth_Request-Email",
            "x-auth-request-anything",
            "x-forwarded-access-token",
            "X_FORWARDED_USER",
            "x-user-email",
            "x_user_email",
            "X-Groups",
        ] {
            assert!(is_identity_header(&c, name.as_bytes()), "{name}");
        }
        for name in [
            "accept",
            "x-request-id",
            "authorization",
            "x-forwarded-for",
            "cookie",
        ] {
            assert!(!is_identity_header(&c, name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn claim_values_are_flattened_or_left_out_never_altered() {
        assert_eq!(
            claim_header_value(&json!(["a", "b", 3])).as_deref(),
            Some("a,b,3")
        );
        assert_eq!(claim_header_value(&json!(true)).as_deref(), Some("true"));
        assert_eq!(
            claim_header_value(&json!("Ada Lovelace")).as_deref(),
            Some("Ada Lovelace")
        );
        for ambiguous in [
            json!("x\r\nSet-Cookie: y"),
            json!("admin\u{0}x"),
            json!(" alice"),
            json!("alice "),
            json!("   "),
            json!(["a", ""]),
            json!(["a", true]),
            json!(["a", null]),
            json!(["a", ["b"]]),
            json!(1.5),
            json!(12345678901234567890123.0),
            json!(["a", 2.5]),
            json!(["viewers,admins"]),
            json!(["viewers", " admins"]),
            json!(["viewers", "admins "]),
            json!("a".repeat(4097)),
            json!(vec!["group"; 1000]),
            json!({"a": 1}),
            json!(""),
        ] {
            assert_eq!(claim_header_value(&ambiguous), None, "{ambiguous}");
        }
        assert!(claim_header_value(&json!("a".repeat(4096))).is_some());
        assert_eq!(
            claim_header_value(&json!(12345678901234567890u64)).as_deref(),
            Some("12345678901234567890")
        );
        assert_eq!(claim_header_value(&json!(-3)).as_deref(), Some("-3"));
    }

    #[test]
    fn a_single_member_of_a_list_claim_sent_as_a_string_is_a_one_member_list() {
        // AD FS sends one group as a plain string: `Finance,Admins` would read as two groups.
        // AD FS's names (`group`, `role`) as well as RFC 9068's, LDAP's and Cognito's.
        let names = [
            "groups",
            "roles",
            "entitlements",
            "amr",
            "group",
            "role",
            "memberOf",
            "cognito:groups",
        ];
        for claim in names {
            assert_eq!(
                named_claim_header_value(claim, &json!("Finance,Admins")),
                None,
                "{claim}"
            );
            assert_eq!(
                named_claim_header_value(claim, &json!("Finance")).as_deref(),
                Some("Finance")
            );
            assert_eq!(
                named_claim_header_value(claim, &json!(["Finance", "Admins"])).as_deref(),
                Some("Finance,Admins")
            );
        }
        // Other claims are single values: a comma is part of them.
        assert_eq!(
            named_claim_header_value("name", &json!("Lovelace, Ada")).as_deref(),
            Some("Lovelace, Ada")
        );
    }

    #[test]
    fn an_email_is_vouched_for_when_verified_or_when_the_idp_says_nothing() {
        let claims = |v: serde_json::Value| v.as_object().cloned().unwrap();
        for vouched in [
            json!({"email_verified": true}),
            json!({"email_verified": "TRUE"}),
            // Many IdPs (Entra ID among them) send no such claim.
            json!({"email": "a@example.com"}),
        ] {
            assert!(email_vouched_for(&claims(vouched.clone())), "{vouched}");
        }
        for not in [
            json!({"email_verified": false}),
            json!({"email_verified": "False"}),
            json!({"email_verified": 0}),
            json!({"email_verified": 1}),
            json!({"email_verified": null}),
            json!({"email_verified": " true"}),
        ] {
            assert!(!email_vouched_for(&claims(not.clone())), "{not}");
        }
    }
}
