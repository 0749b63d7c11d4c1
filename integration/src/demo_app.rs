//! The `make demo` app: a header echo that shows a person what the gateway forwarded.
//!
//! - `GET /` (and any path asked for with `Accept: text/html`, or with `?format=html`): an HTML
//!   page with the decoded `Authorization: Bearer` JWT (header and payload, not verified), the
//!   claims that matter (`aud`, `iss`, `sub`, `scope`, `exp`, ...), whether it is the access token
//!   (`aud` ≠ client id) or an ID token, and every request header.
//! - `GET /headers`: httpbin-style JSON `{"headers": {...}}` for curl and tests (HTML only with
//!   `?format=html` or `Accept: text/html`).
//! - any other path: JSON `{"method", "path", "headers"}` like the harness's [`crate::upstream`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::upstream::SeenRequest;

/// What the app needs to know about the gateway in front of it.
#[derive(Clone, Debug)]
pub struct DemoAppConfig {
    /// The OAuth client id of the gateway: a token whose `aud` is this is an ID token.
    pub client_id: String,
    /// The gateway's sign-out path, linked from the page.
    pub logout_path: String,
}

impl Default for DemoAppConfig {
    fn default() -> Self {
        Self {
            client_id: "oidc-gate".into(),
            logout_path: "/oauth2/sign_out".into(),
        }
    }
}

/// The running app. Stops when dropped.
pub struct DemoApp {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl DemoApp {
    /// Bind `addr` (port 0 = any free port) and serve.
    pub async fn start(addr: SocketAddr, cfg: DemoAppConfig) -> std::io::Result<DemoApp> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = router(cfg);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(DemoApp { addr, task })
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop serving (also done on drop).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for DemoApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The app as an axum router (for in-process use).
pub fn router(cfg: DemoAppConfig) -> Router {
    Router::new().fallback(handle).with_state(Arc::new(cfg))
}

async fn handle(State(cfg): State<Arc<DemoAppConfig>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let seen = SeenRequest {
        body: Vec::new(),
        trailers: Vec::new(),
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| path.clone()),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    if path == "/favicon.ico" {
        return respond(StatusCode::NO_CONTENT, "text/plain", String::new());
    }
    let format = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "format")
        .map(|(_, v)| v.into_owned());
    let accepts_html = seen
        .header("accept")
        .is_some_and(|a| a.to_ascii_lowercase().contains("text/html"));
    let html = match format.as_deref() {
        Some("html") => true,
        Some("json") => false,
        _ => path == "/" || accepts_html,
    };
    if html {
        return respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            claims_page(&cfg, &seen, now_secs()),
        );
    }
    let body = if path == "/headers" {
        json!({ "headers": seen.headers_json() })
    } else {
        json!({ "method": seen.method, "path": seen.path, "headers": seen.headers_json() })
    };
    respond(StatusCode::OK, "application/json", body.to_string())
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from(body))
        .unwrap_or_default()
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A JWT split into its decoded header and payload (signature not checked).
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedJwt {
    /// JOSE header.
    pub header: Value,
    /// Claims.
    pub payload: Value,
}

/// Decode a compact JWS without verifying it; `None` when it is not a JWT (e.g. opaque).
pub fn decode_jwt(token: &str) -> Option<DecodedJwt> {
    let mut parts = token.split('.');
    let (h, p, _s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let part = |s: &str| -> Option<Value> {
        let bytes = URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()?;
        let v: Value = serde_json::from_slice(&bytes).ok()?;
        v.is_object().then_some(v)
    };
    Some(DecodedJwt {
        header: part(h)?,
        payload: part(p)?,
    })
}

/// Which token reached the app, judged from `aud` against the gateway's client id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// `aud` does not contain the client id: an access token for an API.
    Access,
    /// `aud` is the client id: an ID token (meant for the client, not for APIs).
    Id,
}

/// [`TokenKind`] of a decoded token.
pub fn token_kind(jwt: &DecodedJwt, client_id: &str) -> TokenKind {
    let aud_has_client = match &jwt.payload["aud"] {
        Value::String(s) => s == client_id,
        Value::Array(a) => a.iter().any(|v| v.as_str() == Some(client_id)),
        _ => false,
    };
    if aud_has_client {
        TokenKind::Id
    } else {
        TokenKind::Access
    }
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn claim_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

/// `2025-01-31 12:34:56 UTC` for a Unix time.
pub fn utc_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn relative(secs: i64) -> String {
    let a = secs.unsigned_abs();
    let text = if a >= 3600 {
        format!("{} h {} min", a / 3600, a % 3600 / 60)
    } else if a >= 60 {
        format!("{} min {} s", a / 60, a % 60)
    } else {
        format!("{a} s")
    };
    if a == 0 {
        return "now".into();
    }
    if secs > 0 {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// Shorten a long value for display: the first and last characters.
fn abbreviate(s: &str, keep: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= keep * 2 + 3 {
        return s.to_string();
    }
    let head: String = chars[..keep].iter().collect();
    let tail: String = chars[chars.len() - keep..].iter().collect();
    format!("{head}…{tail} ({} chars)", chars.len())
}

const STYLE: &str = "\
*{box-sizing:border-box}\
body{margin:0;font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;background:#f3f4f6;color:#111827;line-height:1.45}\
header{background:#111827;color:#f9fafb;padding:14px 24px;display:flex;align-items:center;justify-content:space-between;gap:16px}\
header .brand{font-weight:700;letter-spacing:.2px}\
header .brand span{color:#93c5fd;font-weight:500}\
header nav a{color:#e5e7eb;margin-left:16px;text-decoration:none;font-size:.95rem}\
header nav a:hover,header nav a:focus-visible{color:#fff;text-decoration:underline}\
a:focus-visible{outline:2px solid #93c5fd;outline-offset:2px;border-radius:3px}\
main{max-width:960px;margin:24px auto;padding:0 16px}\
h1{font-size:1.6rem;margin:8px 0 4px}\
.lead{color:#4b5563;margin:0 0 20px}\
section{background:#fff;border-radius:12px;box-shadow:0 1px 3px rgba(0,0,0,.06),0 6px 20px rgba(0,0,0,.04);padding:20px 24px;margin:0 0 20px}\
h2{font-size:1.1rem;margin:0 0 12px}\
.note{border-radius:8px;padding:12px 14px;margin:0 0 16px;font-weight:600}\
.note small{display:block;font-weight:400;margin-top:4px;color:inherit;opacity:.85}\
.note.access{background:#ecfdf5;border:1px solid #a7f3d0;color:#065f46}\
.note.id{background:#fffbeb;border:1px solid #fde68a;color:#92400e}\
.note.none{background:#fef2f2;border:1px solid #fecaca;color:#991b1b}\
table{border-collapse:collapse;width:100%;font-size:.92rem}\
th,td{text-align:left;vertical-align:top;padding:7px 10px;border-bottom:1px solid #f3f4f6}\
th{width:190px;color:#374151;font-weight:600;white-space:nowrap}\
td{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;word-break:break-all}\
td .hint{font-family:system-ui,sans-serif;color:#6b7280;margin-left:8px;word-break:normal}\
.cols{display:grid;grid-template-columns:1fr 2fr;gap:16px}\
@media (max-width:720px){.cols{grid-template-columns:1fr}}\
h3{font-size:.85rem;text-transform:uppercase;letter-spacing:.06em;color:#6b7280;margin:0 0 6px}\
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.88em;background:rgba(15,23,42,.06);padding:1px 5px;border-radius:4px}\
.foot a{color:#6b7280}\
pre{margin:0;background:#0f172a;color:#e2e8f0;padding:12px 14px;border-radius:8px;overflow:auto;font-size:.85rem}\
.foot{color:#9ca3af;font-size:.8rem;text-align:center;margin:8px 0 32px}";

/// The HTML claims page for one request, at time `now` (Unix seconds).
pub fn claims_page(cfg: &DemoAppConfig, seen: &SeenRequest, now: i64) -> String {
    let mut body = String::new();
    let auth = seen.header_all("authorization");
    let bearer = auth.first().and_then(|a| {
        a.strip_prefix("Bearer ")
            .or_else(|| a.strip_prefix("bearer "))
    });
    let decoded = bearer.and_then(decode_jwt);
    // The gateway's identity headers (claims of the ID token) first: access tokens often carry
    // only `sub`.
    let who = ["x-auth-request-preferred-username", "x-auth-request-email"]
        .iter()
        .find_map(|h| seen.header(h).map(str::to_string))
        .or_else(|| {
            decoded.as_ref().and_then(|d| {
                ["preferred_username", "email", "sub"]
                    .iter()
                    .find_map(|k| d.payload[*k].as_str().map(str::to_string))
            })
        })
        .or_else(|| seen.header("x-auth-request-user").map(str::to_string));

    body.push_str("<main>");
    match &who {
        Some(w) => body.push_str(&format!(
            "<h1>Signed in as <span id=\"who\">{}</span></h1>",
            esc(w)
        )),
        None => body.push_str("<h1>Hello from the demo app</h1>"),
    }
    body.push_str(&format!(
        "<p class=\"lead\">This page is the app behind the gateway. It shows what oidc-gate forwarded \
         with <code>{} {}</code>: the token in <code>Authorization</code>, decoded here without \
         checking its signature (the gateway already did).</p>",
        esc(&seen.method),
        esc(&seen.path)
    ));

    // The token.
    body.push_str("<section id=\"token\"><h2>Authorization: Bearer token</h2>");
    match (bearer, &decoded) {
        (None, _) => body.push_str(
            "<p class=\"note none\" id=\"token-kind\">No bearer token reached the app\
             <small>Open this page through the gateway, http://localhost:8080/ (the protected host is \
             <code>localhost</code>), not the app's own port.</small></p>",
        ),
        (Some(t), None) => body.push_str(&format!(
            "<p class=\"note access\" id=\"token-kind\">An opaque token (not a JWT)\
             <small>The IdP issues access tokens the app cannot read; it would ask the IdP's userinfo or \
             introspection endpoint. Token: <code>{}</code></small></p>",
            esc(&abbreviate(t, 8))
        )),
        (Some(_), Some(jwt)) => {
            let aud = claim_text(&jwt.payload["aud"]);
            match token_kind(jwt, &cfg.client_id) {
                TokenKind::Access => body.push_str(&format!(
                    "<p class=\"note access\" id=\"token-kind\">This is the access token (aud ≠ client id)\
                     <small><code>aud</code> is <code>{}</code>, the API it was issued for; the gateway's \
                     client id is <code>{}</code>. The ID token (aud = client id) stays in the gateway's \
                     session cookie and is never sent upstream.</small></p>",
                    esc(&aud),
                    esc(&cfg.client_id)
                )),
                TokenKind::Id => body.push_str(&format!(
                    "<p class=\"note id\" id=\"token-kind\">This is an ID token (aud = client id)\
                     <small><code>aud</code> is the gateway's client id <code>{}</code>: the filter is \
                     configured with <code>upstream_authorization: id_token</code>. APIs should get the \
                     access token instead.</small></p>",
                    esc(&cfg.client_id)
                )),
            }
            body.push_str("<table id=\"claims\">");
            let keys = [
                ("aud", "audience: who the token is for"),
                ("iss", "issuer"),
                ("sub", "subject: the user's stable id"),
                ("scope", "granted scopes"),
                ("client_id", "client that asked for it"),
                ("azp", "authorized party"),
                ("exp", "expires"),
                ("iat", "issued"),
                ("auth_time", "signed in"),
                ("jti", "token id"),
                ("email", ""),
                ("preferred_username", ""),
                ("groups", ""),
            ];
            for (k, hint) in keys {
                let v = &jwt.payload[k];
                if v.is_null() {
                    continue;
                }
                let mut cell = esc(&claim_text(v));
                if matches!(k, "exp" | "iat" | "auth_time") {
                    if let Some(t) = v.as_i64() {
                        cell.push_str(&format!(
                            "<span class=\"hint\">{} ({})</span>",
                            esc(&utc_time(t)),
                            esc(&relative(t - now))
                        ));
                    }
                } else if !hint.is_empty() {
                    cell.push_str(&format!("<span class=\"hint\">{}</span>", esc(hint)));
                }
                body.push_str(&format!(
                    "<tr data-claim=\"{k}\"><th>{k}</th><td>{cell}</td></tr>"
                ));
            }
            body.push_str("</table>");
            let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
            body.push_str(&format!(
                "<div class=\"cols\" style=\"margin-top:16px\"><div><h3>Header</h3><pre id=\"jwt-header\">{}</pre></div>\
                 <div><h3>Payload</h3><pre id=\"jwt-payload\">{}</pre></div></div>",
                esc(&pretty(&jwt.header)),
                esc(&pretty(&jwt.payload))
            ));
        }
    }
    body.push_str("</section>");

    // Every header.
    body.push_str("<section id=\"headers\"><h2>Request headers the app received</h2><table>");
    for (k, v) in &seen.headers {
        let shown = if k == "authorization" {
            abbreviate(v, 24)
        } else {
            v.clone()
        };
        body.push_str(&format!(
            "<tr><th>{}</th><td>{}</td></tr>",
            esc(k),
            esc(&shown)
        ));
    }
    body.push_str("</table></section>");
    body.push_str(
        "<p class=\"foot\">oidc-gate demo app &middot; <a href=\"/headers\">/headers</a> as JSON</p></main>",
    );

    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>oidc-gate demo app</title><style>{STYLE}</style></head><body>\
<header><div class=\"brand\">oidc-gate <span>demo app</span></div>\
<nav><a href=\"/\">Claims</a><a href=\"/headers\">Headers (JSON)</a>\
<a id=\"sign-out\" href=\"{}\">Sign out</a></nav></header>{body}</body></html>\n",
        esc(&cfg.logout_path)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn seen_with(auth: Option<&str>) -> SeenRequest {
        let mut headers = vec![("host".to_string(), "localhost:8080".to_string())];
        if let Some(a) = auth {
            headers.push(("authorization".into(), a.into()));
        }
        SeenRequest {
            body: Vec::new(),
            trailers: Vec::new(),
            method: "GET".into(),
            path: "/".into(),
            headers,
        }
    }

    #[test]
    fn access_token_is_recognised_and_claims_shown() {
        let t = format!(
            "{}.{}.sig",
            b64(&json!({"alg": "RS256", "typ": "at+jwt"})),
            b64(&json!({"aud": "api://x", "iss": "http://idp", "sub": "u1",
                        "scope": "openid email", "exp": 1_700_000_300, "client_id": "oidc-gate"}))
        );
        let page = claims_page(
            &DemoAppConfig::default(),
            &seen_with(Some(&format!("Bearer {t}"))),
            1_700_000_000,
        );
        assert!(page.contains("This is the access token (aud ≠ client id)"));
        assert!(page.contains("api://x"));
        assert!(
            page.contains("2023-11-14 22:18:20 UTC (in 5 min 0 s)"),
            "{page}"
        );
        assert!(page.contains("openid email"));
    }

    #[test]
    fn id_token_and_missing_token() {
        let t = format!(
            "{}.{}.sig",
            b64(&json!({"alg": "RS256"})),
            b64(&json!({"aud": ["oidc-gate"], "sub": "u1"}))
        );
        let page = claims_page(
            &DemoAppConfig::default(),
            &seen_with(Some(&format!("Bearer {t}"))),
            0,
        );
        assert!(page.contains("This is an ID token (aud = client id)"));
        let page = claims_page(&DemoAppConfig::default(), &seen_with(None), 0);
        assert!(page.contains("No bearer token reached the app"));
        assert_eq!(decode_jwt("opaque-token"), None);
    }

    #[test]
    fn html_is_escaped() {
        let t = format!(
            "{}.{}.sig",
            b64(&json!({"alg": "RS256"})),
            b64(&json!({"aud": "<script>", "sub": "<b>"}))
        );
        let page = claims_page(
            &DemoAppConfig::default(),
            &seen_with(Some(&format!("Bearer {t}"))),
            0,
        );
        assert!(!page.contains("<script>"));
        assert!(!page.contains("<b>"));
    }

    #[test]
    fn utc_time_formats() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00 UTC");
    }
}
