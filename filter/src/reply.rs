//! The filter's own answers. Every failure maps to HTTP here, in one place: a short page for
//! browsers, JSON for API clients, a request id, and never internals (detail goes to the log).

use crate::http::html_escape;

/// A response the filter sends itself instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Headers, `set-cookie` possibly repeated.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
}

impl Reply {
    /// A `302` to `location`, not cacheable.
    pub fn redirect(location: String, set_cookies: Vec<String>) -> Self {
        let mut headers = vec![
            ("location".to_string(), location),
            ("cache-control".to_string(), "no-store".to_string()),
        ];
        headers.extend(
            set_cookies
                .into_iter()
                .map(|c| ("set-cookie".to_string(), c)),
        );
        Self {
            status: 302,
            headers,
            body: String::new(),
        }
    }

    /// A page that asks before signing out, for a logout another site started: its button posts
    /// to `logout_path` from this origin. No script; it cannot be framed.
    pub fn logout_confirmation(logout_path: &str) -> Self {
        Self::page(
            "Sign out?",
            &format!(
                "<p>Another site sent you here to sign out.</p>\
                 <form method=\"post\" action=\"{}\"><button type=\"submit\">Sign out</button></form>\
                 <p><a href=\"/\">Stay signed in</a></p>",
                html_escape(logout_path)
            ),
        )
    }

    /// The page after a logout the IdP could not be told of: the user must know that the IdP
    /// still holds a session that would sign the next person at this browser in.
    pub fn signed_out_here_only() -> Self {
        Self::page(
            "Signed out of this site",
            "<p>You are signed out of this site.</p><p><strong>The sign-in provider could not \
             be asked to sign you out, so you may still be signed in there.</strong> On a shared computer, \
             close every browser window, or sign out at the provider once it is back.</p>",
        )
    }

    /// A short page of the filter's own, with no script, that cannot be framed.
    fn page(title: &str, inner_html: &str) -> Self {
        let body = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
             <title>{title}</title><style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem;color:#222}}\
             h1{{font-size:1.4rem}}</style></head><body><h1>{title}</h1>{inner_html}</body></html>"
        );
        Self {
            status: 200,
            headers: vec![
                ("cache-control".to_string(), "no-store".to_string()),
                (
                    "content-type".to_string(),
                    "text/html; charset=utf-8".to_string(),
                ),
                (
                    "content-security-policy".to_string(),
                    "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"
                        .to_string(),
                ),
                ("x-frame-options".to_string(), "DENY".to_string()),
                ("x-content-type-options".to_string(), "nosniff".to_string()),
            ],
            body,
        }
    }

    /// Adds `Set-Cookie` headers.
    pub fn with_cookies(mut self, cookies: Vec<String>) -> Self {
        self.headers
            .extend(cookies.into_iter().map(|c| ("set-cookie".to_string(), c)));
        self
    }
}

/// What went wrong, as far as the client may know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No valid session on a request that cannot be redirected (API, XHR).
    Unauthenticated,
    /// The callback is unusable: missing or wrong state, no login cookie, missing code.
    BadCallback(&'static str),
    /// The IdP answered the authorization request with an error (e.g. `access_denied`).
    LoginDenied(String),
    /// The IdP could not be reached or timed out.
    IdpUnavailable,
    /// The IdP answered, but not acceptably (bad token response, invalid ID token).
    IdpInvalid,
    /// The tokens cannot be stored in a cookie the browser would keep.
    SessionTooLarge,
    /// A host failure (no randomness): fail closed.
    Internal,
    /// A request the filter cannot make safe to forward (a header of ours it cannot remove).
    BadRequest,
}

impl Failure {
    fn parts(&self) -> (u16, &'static str, &'static str, String) {
        match self {
            Failure::Unauthenticated => (
                401,
                "unauthenticated",
                "Sign-in required",
                "This resource needs a signed-in session or a valid bearer token.".into(),
            ),
            Failure::BadCallback(why) => (
                400,
                "invalid_callback",
                "Sign-in could not be completed",
                format!("{why} Please start again from the page you wanted to open."),
            ),
            Failure::LoginDenied(code) => (
                403,
                "login_denied",
                "Sign-in was refused",
                format!(
                    "The identity provider refused the sign-in ({}).",
                    sanitize_error_code(code)
                ),
            ),
            Failure::IdpUnavailable => (
                503,
                "idp_unavailable",
                "Sign-in service unavailable",
                "The identity provider cannot be reached right now. Please try again shortly."
                    .into(),
            ),
            Failure::IdpInvalid => (
                502,
                "idp_error",
                "Sign-in failed",
                "The identity provider gave an answer that could not be accepted.".into(),
            ),
            Failure::SessionTooLarge => (
                502,
                "session_too_large",
                "Sign-in failed",
                "The session is too large to be stored in the browser.".into(),
            ),
            Failure::Internal => (
                500,
                "internal_error",
                "Something went wrong",
                "Please try again.".into(),
            ),
            Failure::BadRequest => (
                400,
                "bad_request",
                "Bad request",
                "The request carries a header this gateway does not accept.".into(),
            ),
        }
    }

    /// The reply for this failure: HTML for browsers, JSON otherwise.
    pub fn reply(&self, browser: bool, request_id: Option<&str>) -> Reply {
        let (status, code, title, message) = self.parts();
        let rid = request_id
            .filter(|r| r.len() <= 128 && r.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or("-");
        let mut headers = vec![("cache-control".to_string(), "no-store".to_string())];
        if status == 401 {
            headers.push(("www-authenticate".to_string(), "Bearer".to_string()));
        }
        if browser {
            headers.push((
                "content-type".to_string(),
                "text/html; charset=utf-8".to_string(),
            ));
            let body = format!(
                "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
                 <title>{title}</title><style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem;color:#222}}\
                 h1{{font-size:1.4rem}}code{{color:#666}}</style></head><body><h1>{title}</h1><p>{}</p>\
                 <p><a href=\"/\">Start again</a></p><p><small>Request id: <code>{}</code></small></p></body></html>",
                html_escape(&message),
                html_escape(rid)
            );
            Reply {
                status,
                headers,
                body,
            }
        } else {
            headers.push(("content-type".to_string(), "application/json".to_string()));
            let body = serde_json::json!({"error": code, "message": message, "request_id": rid})
                .to_string();
            Reply {
                status,
                headers,
                body,
            }
        }
    }
}

/// OAuth error codes are `%x20-21 / %x23-5B / %x5D-7E`; show only word characters, bounded.
fn sanitize_error_code(code: &str) -> String {
    let clean: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(64)
        .collect();
    if clean.is_empty() {
        "error".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browser_pages_escape_and_carry_request_id() {
        let r =
            Failure::LoginDenied("<script>alert(1)</script>".into()).reply(true, Some("abc-123"));
        assert_eq!(r.status, 403);
        assert!(!r.body.contains("<script>"));
        assert!(r.body.contains("abc-123"));
    }

    #[test]
    fn api_clients_get_json_and_bearer_challenge() {
        let r = Failure::Unauthenticated.reply(false, None);
        assert_eq!(r.status, 401);
        assert!(r
            .headers
            .contains(&("www-authenticate".into(), "Bearer".into())));
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"], "unauthenticated");
    }
}
