//! HTML pages (inline CSS, no external assets).

pub(crate) fn escape(s: &str) -> String {
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

const STYLE: &str = "\
*{box-sizing:border-box}\
body{margin:0;min-height:100vh;display:flex;align-items:center;justify-content:center;\
font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;background:#f3f4f6;color:#111827}\
main{background:#fff;width:100%;max-width:380px;padding:32px;border-radius:12px;\
box-shadow:0 10px 30px rgba(0,0,0,.08)}\
h1{font-size:1.5rem;margin:0 0 4px}\
.sub{margin:0 0 24px;color:#6b7280}\
label{display:block;font-weight:600;font-size:.9rem;margin:16px 0 6px}\
input[type=text],input[type=password]{width:100%;padding:10px 12px;border:1px solid #d1d5db;\
border-radius:8px;font-size:1rem}\
input:focus{outline:2px solid #2563eb;border-color:#2563eb}\
button{margin-top:24px;width:100%;padding:11px;border:0;border-radius:8px;background:#2563eb;\
color:#fff;font-size:1rem;font-weight:600;cursor:pointer}\
button:hover{background:#1d4ed8}\
.error{background:#fef2f2;color:#b91c1c;border:1px solid #fecaca;border-radius:8px;padding:10px 12px;margin:0 0 8px}\
.foot{margin-top:24px;font-size:.8rem;color:#9ca3af;text-align:center}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{}</title><style>{STYLE}</style></head><body><main>{body}\
<p class=\"foot\">mock-idp &middot; development OpenID provider</p></main></body></html>\n",
        escape(title)
    )
}

/// The sign-in form. `hidden` are the authorization request parameters carried to the POST.
pub(crate) fn login_page(
    client_id: &str,
    hidden: &[(String, String)],
    username: &str,
    error: Option<&str>,
) -> String {
    let mut body = String::new();
    body.push_str("<h1>Sign in</h1>");
    body.push_str(&format!(
        "<p class=\"sub\">to continue to <strong id=\"app-name\">{}</strong></p>",
        escape(client_id)
    ));
    if let Some(e) = error {
        body.push_str(&format!(
            "<p id=\"error\" class=\"error\" role=\"alert\">{}</p>",
            escape(e)
        ));
    }
    body.push_str("<form method=\"post\" action=\"authorize\" id=\"login-form\">");
    for (k, v) in hidden {
        body.push_str(&format!(
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
            escape(k),
            escape(v)
        ));
    }
    body.push_str(&format!(
        "<label for=\"username\">Username</label>\
<input id=\"username\" name=\"username\" type=\"text\" autocomplete=\"username\" \
autocapitalize=\"none\" spellcheck=\"false\" required autofocus value=\"{}\">\
<label for=\"password\">Password</label>\
<input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required>\
<button id=\"submit\" type=\"submit\">Sign in</button></form>",
        escape(username)
    ));
    page("Sign in", &body)
}

pub(crate) fn error_page(title: &str, message: &str) -> String {
    page(
        title,
        &format!(
            "<h1>{}</h1><p id=\"error\" class=\"error\" role=\"alert\">{}</p>",
            escape(title),
            escape(message)
        ),
    )
}

pub(crate) fn signed_out_page() -> String {
    page(
        "Signed out",
        "<h1>You have been signed out</h1><p class=\"sub\" id=\"signed-out\">You can close this window.</p>",
    )
}
