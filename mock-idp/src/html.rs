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
html{-webkit-text-size-adjust:100%}\
body{margin:0;min-height:100vh;display:flex;flex-direction:column;align-items:center;justify-content:center;\
padding:24px 16px;font-family:system-ui,-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif;\
background:#eef2f7 linear-gradient(160deg,#e0e7ff 0%,#f1f5f9 45%,#f8fafc 100%);color:#0f172a;line-height:1.5}\
main{background:#fff;width:100%;max-width:400px;padding:36px 36px 28px;border-radius:16px;\
border:1px solid #e2e8f0;box-shadow:0 1px 2px rgba(15,23,42,.04),0 12px 32px rgba(15,23,42,.08)}\
.brand{display:flex;align-items:center;gap:10px;margin:0 0 28px;color:#334155;font-weight:600;font-size:.95rem}\
.brand svg{flex:none}\
h1{font-size:1.6rem;line-height:1.25;margin:0 0 6px;letter-spacing:-.01em}\
.sub{margin:0 0 24px;color:#64748b}\
.sub strong{color:#0f172a}\
label{display:block;font-weight:600;font-size:.9rem;margin:18px 0 6px;color:#1e293b}\
input[type=text],input[type=password]{display:block;width:100%;height:44px;padding:0 12px;\
border:1px solid #cbd5e1;border-radius:8px;background:#fff;color:#0f172a;font:inherit;font-size:1rem;\
transition:border-color .15s,box-shadow .15s}\
input[type=text]:hover,input[type=password]:hover{border-color:#94a3b8}\
input:focus,input:focus-visible{outline:2px solid #2563eb;outline-offset:1px;border-color:#2563eb;\
box-shadow:0 0 0 4px rgba(37,99,235,.15)}\
input[aria-invalid=true]{border-color:#dc2626}\
input[aria-invalid=true]:focus{outline-color:#dc2626;box-shadow:0 0 0 4px rgba(220,38,38,.15)}\
button{display:block;margin-top:28px;width:100%;height:46px;border:0;border-radius:8px;background:#2563eb;\
color:#fff;font:inherit;font-size:1rem;font-weight:600;cursor:pointer;transition:background .15s}\
button:hover{background:#1d4ed8}\
button:active{background:#1e40af}\
button:focus-visible{outline:3px solid #93c5fd;outline-offset:2px}\
.error{display:flex;gap:10px;align-items:flex-start;background:#fef2f2;color:#b91c1c;border:1px solid #fecaca;\
border-radius:8px;padding:10px 12px;margin:0 0 8px;font-size:.95rem}\
.error svg{flex:none;margin-top:2px}\
.error p,.ok p{margin:0}\
h1+.error,h1+.ok{margin-top:18px}\
.ok{display:flex;gap:10px;align-items:center;color:#166534;background:#f0fdf4;border:1px solid #bbf7d0;\
border-radius:8px;padding:10px 12px;margin:0 0 8px}\
.foot{margin:28px 0 0;padding-top:16px;border-top:1px solid #f1f5f9;font-size:.8rem;color:#94a3b8;text-align:center}\
@media (prefers-color-scheme:dark){\
body{background:#0b1120;color:#e2e8f0}\
main{background:#111827;border-color:#1f2937;box-shadow:none}\
.brand,label{color:#cbd5e1}.sub{color:#94a3b8}.sub strong{color:#f8fafc}\
input[type=text],input[type=password]{background:#0b1120;border-color:#334155;color:#f8fafc}\
.error{background:#2a1215;border-color:#7f1d1d;color:#fca5a5}\
.ok{background:#052e16;border-color:#166534;color:#86efac}\
.foot{border-color:#1f2937;color:#64748b}}\
@media (prefers-reduced-motion:reduce){*{transition:none!important}}";

/// The mock-idp mark: a key in a rounded square.
const LOGO: &str = "<svg width=\"32\" height=\"32\" viewBox=\"0 0 32 32\" aria-hidden=\"true\">\
<rect width=\"32\" height=\"32\" rx=\"8\" fill=\"#2563eb\"/>\
<circle cx=\"12\" cy=\"16\" r=\"5\" fill=\"none\" stroke=\"#fff\" stroke-width=\"2.5\"/>\
<path d=\"M17 16h9m-3 0v4m-3-4v3\" stroke=\"#fff\" stroke-width=\"2.5\" stroke-linecap=\"round\"/></svg>";

const ALERT_ICON: &str =
    "<svg width=\"18\" height=\"18\" viewBox=\"0 0 20 20\" aria-hidden=\"true\">\
<circle cx=\"10\" cy=\"10\" r=\"9\" fill=\"currentColor\" opacity=\".15\"/>\
<path d=\"M10 5.5v5.5\" stroke=\"currentColor\" stroke-width=\"2\" stroke-linecap=\"round\"/>\
<circle cx=\"10\" cy=\"14.3\" r=\"1.2\" fill=\"currentColor\"/></svg>";

const CHECK_ICON: &str =
    "<svg width=\"18\" height=\"18\" viewBox=\"0 0 20 20\" aria-hidden=\"true\">\
<circle cx=\"10\" cy=\"10\" r=\"9\" fill=\"currentColor\" opacity=\".15\"/>\
<path d=\"M6 10.5l2.5 2.5L14 7.5\" fill=\"none\" stroke=\"currentColor\" stroke-width=\"2\" \
stroke-linecap=\"round\" stroke-linejoin=\"round\"/></svg>";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<meta name=\"color-scheme\" content=\"light dark\">\
<title>{}</title><style>{STYLE}</style></head><body><main>\
<div class=\"brand\">{LOGO}<span>mock-idp</span></div>{body}\
<p class=\"foot\">mock-idp &middot; development OpenID provider</p></main></body></html>\n",
        escape(title)
    )
}

fn error_box(message: &str) -> String {
    format!(
        "<div class=\"error\" role=\"alert\">{ALERT_ICON}<p id=\"error\">{}</p></div>",
        escape(message)
    )
}

/// The sign-in form. `hidden` are the authorization request parameters carried to the POST.
///
/// Keyboard: the username field has focus (the password field after a failed attempt, the
/// username being kept), Enter in either field submits, Tab order is username, password, button.
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
        body.push_str(&error_box(e));
    }
    body.push_str("<form method=\"post\" action=\"authorize\" id=\"login-form\">");
    for (k, v) in hidden {
        body.push_str(&format!(
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
            escape(k),
            escape(v)
        ));
    }
    // After a failed attempt with a username, the password is what needs typing.
    let focus_password = error.is_some() && !username.is_empty();
    let (user_focus, pass_focus) = if focus_password {
        ("", " autofocus")
    } else {
        (" autofocus", "")
    };
    let invalid = if error.is_some() {
        " aria-invalid=\"true\" aria-describedby=\"error\""
    } else {
        ""
    };
    body.push_str(&format!(
        "<label for=\"username\">Username</label>\
<input id=\"username\" name=\"username\" type=\"text\" autocomplete=\"username\" \
autocapitalize=\"none\" spellcheck=\"false\" required{user_focus} value=\"{}\">\
<label for=\"password\">Password</label>\
<input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" \
required{pass_focus}{invalid}>\
<button id=\"submit\" type=\"submit\">Sign in</button></form>",
        escape(username)
    ));
    page("Sign in", &body)
}

pub(crate) fn error_page(title: &str, message: &str) -> String {
    page(
        title,
        &format!("<h1>{}</h1>{}", escape(title), error_box(message)),
    )
}

pub(crate) fn signed_out_page() -> String {
    page(
        "Signed out",
        &format!(
            "<h1>You have been signed out</h1><div class=\"ok\" role=\"status\">{CHECK_ICON}\
<p id=\"signed-out\">You can close this window.</p></div>"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_page_focus_moves_to_password_after_an_error() {
        let fresh = login_page("c", &[], "", None);
        assert!(fresh.contains("required autofocus value=\"\""));
        assert!(!fresh.contains("id=\"error\""));
        let failed = login_page("c", &[], "admin", Some("Invalid username or password"));
        assert!(failed.contains("value=\"admin\""));
        assert!(
            failed.contains("required autofocus aria-invalid=\"true\" aria-describedby=\"error\"")
        );
        assert!(failed.contains("<p id=\"error\""));
        assert_eq!(failed.matches("autofocus").count(), 1);
    }

    #[test]
    fn everything_is_escaped() {
        let p = login_page("<c>", &[("a\"".into(), "<v>".into())], "<u>", Some("<e>"));
        assert!(
            !p.contains("<c>") && !p.contains("<v>") && !p.contains("<u>") && !p.contains("<e>")
        );
    }
}
