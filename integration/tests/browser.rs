//! Real-browser end-to-end tests: headless Chromium, driven over W3C WebDriver (chromedriver),
//! through the real stack (Envoy + the built filter + mock-idp + app).
//!
//! Needs Debian's `chromium` and `chromium-driver` (or `CHROME_BIN` / `CHROMEDRIVER`); without
//! them the tests FAIL (CI installs them). Every step saves a screenshot under
//! `<repo>/target/e2e/`.
//!
//! The test hosts (`app.example.com`, `*.apps.example.com`) are mapped to 127.0.0.1 with
//! Chromium's `--host-resolver-rules` (only the host is mapped, so URLs carry the gateway's
//! listener port); the gateway's self-signed certificate is accepted with
//! `--ignore-certificate-errors`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use integration::envoy::free_port;
use integration::stack::{jwt_payload, Stack, CLIENT_ID, LOGIN_COOKIE_PREFIX, SESSION_COOKIE};
use integration::{repo_root, StackOptions};
use serde_json::{json, Value};

/// W3C WebDriver's element reference key.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// WebDriver key code for Enter.
const ENTER: &str = "\u{E007}";
const WAIT: Duration = Duration::from_secs(20);

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// `$var`, else the first existing of `candidates` (absolute paths or names on `PATH`).
fn find_tool(var: &str, candidates: &[&str], what: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            is_executable(&p),
            "${var}={} is not an executable ({what} is needed: `apt-get install -y chromium \
             chromium-driver` on Debian)",
            p.display()
        );
        return p;
    }
    for c in candidates {
        let p = Path::new(c);
        if p.is_absolute() {
            if is_executable(p) {
                return p.to_path_buf();
            }
        } else if let Some(found) = which(c) {
            return found;
        }
    }
    panic!(
        "{what} not found (looked for ${var}, {candidates:?}). The real-browser tests need Chromium \
         and chromedriver: `apt-get install -y chromium chromium-driver` (Debian), or set \
         CHROME_BIN and CHROMEDRIVER."
    )
}

/// Screenshots of one test: `<repo>/target/e2e/<prefix>-<nn>-<step>.png`.
struct Shots {
    dir: PathBuf,
    prefix: String,
    n: u32,
}

impl Shots {
    fn new(prefix: &str) -> Shots {
        let dir = repo_root().join("target/e2e");
        std::fs::create_dir_all(&dir).expect("create target/e2e");
        Shots {
            dir,
            prefix: prefix.into(),
            n: 0,
        }
    }
}

/// chromedriver + one Chromium session. Dropping it ends the session (Chromium quits) and kills
/// chromedriver's process group.
struct Chrome {
    driver: Child,
    port: u16,
    session: String,
    http: reqwest::Client,
    shots: Shots,
    _profile: tempfile::TempDir,
}

impl Chrome {
    async fn start(shots_prefix: &str, width: u32, height: u32) -> Chrome {
        let chromium = find_tool(
            "CHROME_BIN",
            &[
                "/usr/bin/chromium",
                "chromium",
                "chromium-browser",
                "google-chrome",
            ],
            "Chromium",
        );
        let chromedriver = find_tool(
            "CHROMEDRIVER",
            &["/usr/bin/chromedriver", "chromedriver"],
            "chromedriver",
        );
        integration::browser::install_crypto_provider();
        let profile = tempfile::Builder::new()
            .prefix("oidc-gate-chromium-")
            .tempdir()
            .expect("profile dir");
        let port = free_port();
        let log = std::fs::File::create(profile.path().join("chromedriver.log")).expect("log");
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            // Its own process group, so Chromium goes with it on drop.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", chromedriver.display()));
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client");
        let mut chrome = Chrome {
            driver,
            port,
            session: String::new(),
            http,
            shots: Shots::new(shots_prefix),
            _profile: profile,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = chrome.driver.try_wait() {
                panic!("chromedriver exited ({status}): {}", chrome.driver_log());
            }
            let ready = chrome
                .raw("GET", "/status", None)
                .await
                .ok()
                .is_some_and(|v| v["ready"] == json!(true));
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let args =
            vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--no-default-browser-check".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--ignore-certificate-errors".into(),
            "--host-resolver-rules=MAP app.example.com 127.0.0.1,MAP *.apps.example.com 127.0.0.1"
                .into(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", chrome._profile.path().join("profile").display()),
        ];
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "pageLoadStrategy": "normal",
            "goog:chromeOptions": { "binary": chromium.to_string_lossy(), "args": args },
        } } });
        let v = chrome
            .raw("POST", "/session", Some(caps))
            .await
            .unwrap_or_else(|e| panic!("new session: {e}\n{}", chrome.driver_log()));
        chrome.session = v["sessionId"].as_str().expect("sessionId").to_string();
        chrome
    }

    fn driver_log(&self) -> String {
        std::fs::read_to_string(self._profile.path().join("chromedriver.log")).unwrap_or_default()
    }

    /// One WebDriver call; `Ok(value)` or `Err(error message)`.
    async fn raw(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("http://127.0.0.1:{}{}", self.port, path);
        let req = match method {
            "GET" => self.http.get(&url),
            "DELETE" => self.http.delete(&url),
            _ => self
                .http
                .post(&url)
                .header("content-type", "application/json")
                .body(body.unwrap_or_else(|| json!({})).to_string()),
        };
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        if !status.is_success() || v["value"]["error"].is_string() {
            return Err(format!(
                "{method} {path}: {status} {} {}",
                v["value"]["error"], v["value"]["message"]
            ));
        }
        Ok(v["value"].clone())
    }

    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let full = format!("/session/{}{}", self.session, path);
        self.raw(method, &full, body)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url }))).await;
    }

    async fn url(&self) -> String {
        self.cmd("GET", "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    async fn title(&self) -> String {
        self.cmd("GET", "/title", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    async fn exec(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    async fn try_find(&self, css: &str) -> Option<String> {
        let path = format!("/session/{}/element", self.session);
        let v = self
            .raw(
                "POST",
                &path,
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await
            .ok()?;
        v[ELEMENT_KEY].as_str().map(str::to_string)
    }

    /// Wait until `css` matches an element; returns its reference.
    async fn wait_for(&self, css: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(e) = self.try_find(css).await {
                return e;
            }
            if Instant::now() > deadline {
                let url = self.url().await;
                let body = self.body_text().await;
                panic!("no `{css}` after {WAIT:?} on {url}:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until the current URL satisfies `pred`.
    async fn wait_url(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let u = self.url().await;
            let complete = self.exec("return document.readyState", json!([])).await;
            if pred(&u) && complete == json!("complete") {
                return u;
            }
            if Instant::now() > deadline {
                let body = self.body_text().await;
                panic!("URL never became {what}; at {u}:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn type_into(&self, el: &str, text: &str) {
        self.cmd(
            "POST",
            &format!("/element/{el}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn clear(&self, el: &str) {
        self.cmd("POST", &format!("/element/{el}/clear"), None)
            .await;
    }

    async fn click(&self, el: &str) {
        self.cmd("POST", &format!("/element/{el}/click"), None)
            .await;
    }

    async fn active_id(&self) -> String {
        self.exec(
            "return document.activeElement ? document.activeElement.id : ''",
            json!([]),
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    async fn body_text(&self) -> String {
        let path = format!("/session/{}/execute/sync", self.session);
        self.raw(
            "POST",
            &path,
            Some(json!({ "script": "return document.body ? document.body.innerText : ''", "args": [] })),
        )
        .await
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
    }

    /// Text of the first element matching `css` (empty if none).
    async fn text(&self, css: &str) -> String {
        self.exec(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''",
            json!([css]),
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// Cookies visible to the current page (WebDriver "Get All Cookies").
    async fn cookies(&self) -> Vec<Value> {
        self.cmd("GET", "/cookie", None)
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Every cookie in the browser, all sites (CDP `Network.getAllCookies`).
    async fn all_cookies(&self) -> Vec<Value> {
        let v = self
            .cmd(
                "POST",
                "/goog/cdp/execute",
                Some(json!({ "cmd": "Network.getAllCookies", "params": {} })),
            )
            .await;
        v["cookies"].as_array().cloned().unwrap_or_default()
    }

    async fn refresh(&self) {
        self.cmd("POST", "/refresh", None).await;
    }

    async fn window_handle(&self) -> String {
        self.cmd("GET", "/window", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    async fn new_tab(&self) -> String {
        let v = self
            .cmd("POST", "/window/new", Some(json!({ "type": "tab" })))
            .await;
        v["handle"].as_str().expect("new tab handle").to_string()
    }

    async fn switch_to(&self, handle: &str) {
        self.cmd("POST", "/window", Some(json!({ "handle": handle })))
            .await;
    }

    /// Save a PNG of the viewport as `<repo>/target/e2e/<prefix>-<nn>-<step>.png`.
    async fn shot(&mut self, step: &str) -> PathBuf {
        use base64::Engine as _;
        let v = self.cmd("GET", "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .expect("screenshot base64");
        self.shots.n += 1;
        let path = self.shots.dir.join(format!(
            "{}-{:02}-{step}.png",
            self.shots.prefix, self.shots.n
        ));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    /// The sign-in form: fill both fields by keyboard and press Enter in the password field.
    async fn sign_in(&self, username: &str, password: &str) {
        let user = self.wait_for("#username").await;
        self.clear(&user).await;
        self.type_into(&user, username).await;
        let pass = self.wait_for("#password").await;
        self.type_into(&pass, &format!("{password}{ENTER}")).await;
    }
}

impl Drop for Chrome {
    fn drop(&mut self) {
        // Blocking DELETE /session/<id> (Chromium quits), then end chromedriver's process group.
        if !self.session.is_empty() {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = write!(
                    s,
                    "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
                    self.session, self.port
                );
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            }
        }
        let pgid = self.driver.id();
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn cookie<'a>(cookies: &'a [Value], name: &str) -> Option<&'a Value> {
    cookies.iter().find(|c| c["name"] == json!(name))
}

fn cookie_names(cookies: &[Value]) -> Vec<String> {
    cookies
        .iter()
        .map(|c| {
            format!(
                "{}@{}",
                c["name"].as_str().unwrap_or_default(),
                c["domain"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

/// The session cookie as the browser stored it: `__Host-` rules (Secure, Path=/, host-only),
/// HttpOnly, SameSite=Lax.
fn assert_session_cookie(cookies: &[Value], host: &str) {
    let c = cookie(cookies, SESSION_COOKIE)
        .unwrap_or_else(|| panic!("no {SESSION_COOKIE} in {:?}", cookie_names(cookies)));
    assert_eq!(c["secure"], json!(true), "Secure: {c}");
    assert_eq!(c["httpOnly"], json!(true), "HttpOnly: {c}");
    assert_eq!(c["sameSite"], json!("Lax"), "SameSite=Lax: {c}");
    assert_eq!(c["path"], json!("/"), "Path=/: {c}");
    assert_eq!(c["domain"], json!(host), "host-only (no Domain): {c}");
}

/// The JSON the harness upstream echoed, as Chromium shows it.
async fn echoed_json(chrome: &Chrome) -> Value {
    let text = chrome.text("pre").await;
    let text = if text.is_empty() {
        chrome.body_text().await
    } else {
        text
    };
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("page is not JSON ({e}): {text}"))
}

/// The bearer token the app received, from the echoed headers.
fn echoed_bearer(v: &Value) -> String {
    let auth = v["headers"]["authorization"]
        .as_str()
        .unwrap_or_else(|| panic!("one Authorization header upstream: {v}"));
    auth.strip_prefix("Bearer ")
        .unwrap_or_else(|| panic!("not Bearer: {auth}"))
        .to_string()
}

/// What reached the app, without the browser's favicon requests.
fn page_requests(stack: &Stack) -> Vec<integration::SeenRequest> {
    stack
        .upstream
        .requests()
        .into_iter()
        .filter(|r| r.path != "/favicon.ico")
        .collect()
}

fn assert_access_token(token: &str, issuer: &str) {
    let claims = jwt_payload(token);
    assert_eq!(claims["iss"], json!(issuer), "{claims}");
    assert_ne!(
        claims["aud"],
        json!(CLIENT_ID),
        "the access token (aud ≠ client id) goes upstream, not the ID token: {claims}"
    );
    assert_eq!(claims["aud"], json!("api://oidc-gate-demo"), "{claims}");
    assert!(
        claims["scope"]
            .as_str()
            .is_some_and(|s| s.split(' ').any(|x| x == "openid")),
        "{claims}"
    );
}

/// Login page, wrong password, keyboard sign-in, cookies, reload, logout, two tabs at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_login_reload_logout_and_two_tabs() {
    let stack = Stack::start(StackOptions::default()).await;
    let port = stack.gateway_addr().port();
    let issuer = stack.idp.issuer();
    let app = format!("https://app.example.com:{port}");
    let mut chrome = Chrome::start("login", 1000, 900).await;

    // 1. A protected URL shows the mock IdP's sign-in page.
    let wanted = format!("{app}/headers?step=1");
    chrome.goto(&wanted).await;
    chrome.wait_for("#username").await;
    let at = chrome.url().await;
    assert!(
        at.starts_with(&format!("{issuer}/authorize?")),
        "redirected to the IdP: {at}"
    );
    assert_eq!(chrome.title().await, "Sign in");
    assert_eq!(chrome.active_id().await, "username", "username autofocused");
    let labels = chrome
        .exec(
            "return ['username','password'].map(id => { const l = document.querySelector('label[for=' + id + ']'); return l ? l.innerText.trim() : null; })",
            json!([]),
        )
        .await;
    assert_eq!(labels, json!(["Username", "Password"]), "labelled fields");
    let outline = chrome
        .exec(
            "return getComputedStyle(document.activeElement).outlineStyle",
            json!([]),
        )
        .await;
    assert_ne!(
        outline,
        json!("none"),
        "visible focus style on the focused field"
    );
    chrome.shot("login-page").await;

    // 2. A wrong password: error on the sign-in page, username kept, password focused.
    chrome.sign_in("admin", "wrong-password").await;
    chrome.wait_for("#error").await;
    assert_eq!(
        chrome.text("#error").await.trim(),
        "Invalid username or password"
    );
    assert!(chrome.url().await.starts_with(&issuer), "still at the IdP");
    let kept = chrome
        .exec(
            "return document.getElementById('username').value",
            json!([]),
        )
        .await;
    assert_eq!(kept, json!("admin"), "username kept");
    assert_eq!(
        chrome.active_id().await,
        "password",
        "password field focused"
    );
    let field_state = chrome
        .exec(
            "const p = document.getElementById('password'); return [p.value, p.getAttribute('aria-invalid'), p.getAttribute('aria-describedby')]",
            json!([]),
        )
        .await;
    assert_eq!(field_state, json!(["", "true", "error"]), "password field");
    chrome.shot("wrong-password").await;
    assert_eq!(
        page_requests(&stack).len(),
        0,
        "nothing reached the app yet"
    );

    // 3. The right password (typed, Enter): back on the page asked for, with the access token.
    let pass = chrome.wait_for("#password").await;
    chrome.type_into(&pass, &format!("password{ENTER}")).await;
    chrome.wait_url("the page asked for", |u| u == wanted).await;
    let echoed = echoed_json(&chrome).await;
    assert_access_token(&echoed_bearer(&echoed), &issuer);
    let seen = page_requests(&stack)
        .pop()
        .expect("upstream saw the request");
    assert_eq!(seen.path, "/headers?step=1");
    assert!(
        seen.header("cookie")
            .is_none_or(|c| !c.contains("oidc-gate")),
        "filter cookies never reach the app: {:?}",
        seen.header("cookie")
    );
    chrome.shot("landed-with-access-token").await;

    // Cookies as the browser keeps them.
    let cookies = chrome.cookies().await;
    assert_session_cookie(&cookies, "app.example.com");
    assert!(
        !cookies.iter().any(|c| c["name"]
            .as_str()
            .is_some_and(|n| n.starts_with(LOGIN_COOKIE_PREFIX))),
        "the login cookie is gone after the callback: {:?}",
        cookie_names(&cookies)
    );
    let js_cookies = chrome.exec("return document.cookie", json!([])).await;
    assert!(
        !js_cookies
            .as_str()
            .unwrap_or_default()
            .contains("oidc-gate"),
        "HttpOnly: the session cookie is not readable from document.cookie: {js_cookies}"
    );
    let idp_cookies = chrome.all_cookies().await;
    let idp_session = idp_cookies
        .iter()
        .find(|c| c["name"] == json!("mock-idp-session"))
        .unwrap_or_else(|| panic!("mock-idp session: {:?}", cookie_names(&idp_cookies)));
    assert_eq!(idp_session["httpOnly"], json!(true));

    // 4. Reload keeps the session: straight to the app, no new login or token request.
    let before = (page_requests(&stack).len(), stack.idp.stats());
    chrome.refresh().await;
    chrome.wait_url("the same page", |u| u == wanted).await;
    assert_access_token(&echoed_bearer(&echoed_json(&chrome).await), &issuer);
    let after = stack.idp.stats();
    assert_eq!(
        page_requests(&stack).len(),
        before.0 + 1,
        "reload reached the app"
    );
    assert_eq!(after.authorize_get, before.1.authorize_get, "no new login");
    assert_eq!(after.token, before.1.token, "no new token request");
    chrome.shot("reloaded").await;

    // 5. Logout ends the session (gateway cookie and the IdP's).
    chrome.goto(&format!("{app}/oauth2/sign_out")).await;
    chrome.wait_for("#signed-out").await;
    assert_eq!(stack.idp.stats().end_session, 1);
    let all = chrome.all_cookies().await;
    assert!(
        !all.iter().any(|c| c["name"]
            .as_str()
            .is_some_and(|n| n.starts_with(SESSION_COOKIE))),
        "session cookie deleted: {:?}",
        cookie_names(&all)
    );
    chrome.shot("signed-out").await;
    let count = page_requests(&stack).len();
    chrome.goto(&format!("{app}/anything/a")).await;
    chrome.wait_for("#username").await;
    assert!(
        chrome.url().await.starts_with(&issuer),
        "must sign in again"
    );
    assert_eq!(
        page_requests(&stack).len(),
        count,
        "nothing reached the app"
    );

    // 6. Two tabs sign in at the same time: both login pages open, then both submitted.
    let tab_a = chrome.window_handle().await;
    let tab_b = chrome.new_tab().await;
    chrome.switch_to(&tab_b).await;
    chrome.goto(&format!("{app}/anything/b")).await;
    chrome.wait_for("#username").await;
    chrome.shot("tab-b-login").await;
    chrome.switch_to(&tab_a).await;
    chrome.sign_in("admin", "password").await;
    chrome.switch_to(&tab_b).await;
    chrome.sign_in("admin", "password").await;
    for (tab, path) in [(&tab_b, "/anything/b"), (&tab_a, "/anything/a")] {
        chrome.switch_to(tab).await;
        let want = format!("{app}{path}");
        chrome.wait_url(path, |u| u == want).await;
        let v = echoed_json(&chrome).await;
        assert_eq!(v["path"], json!(path));
        assert_access_token(&echoed_bearer(&v), &issuer);
        chrome.shot(&format!("tab-{}-landed", &path[10..])).await;
    }
    assert_session_cookie(&chrome.cookies().await, "app.example.com");
    let stats = stack.idp.stats();
    assert_eq!(stats.token_ok, 3, "one code exchange per login: {stats:?}");
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Direct children of `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may contain spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(str::to_string))
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

/// `make demo` as a person uses it: the demo binary, Chromium on http://localhost:8080, the
/// claims page, sign-out, then Ctrl-C (SIGINT) stops everything and frees the ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_binary_in_chromium_and_sigint() {
    // The demo's ports are fixed; give a previous run a moment to let go of them.
    for (port, what) in [(8080, "gateway"), (5556, "mock-idp")] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !port_free(port) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            port_free(port),
            "port {port} ({what}) is taken: the demo test needs it free \
             (stop whatever listens there, e.g. a running `make demo`)"
        );
    }
    integration::require_wasm();
    let bin = env!("CARGO_BIN_EXE_oidc-gate-demo");
    let mut demo = Command::new(bin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn oidc-gate-demo");
    let pid = demo.id();
    let (tx, rx) = mpsc::channel::<String>();
    let out = demo.stdout.take().expect("stdout");
    let err = demo.stderr.take().expect("stderr");
    let tx_err = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx_err.send(format!("[stderr] {line}"));
        }
    });
    // Guard: whatever happens below, the demo does not outlive the test: SIGINT (it stops its
    // Envoy), then SIGKILL, and its Envoy child by pid if still there.
    struct StopOnDrop(Option<Child>, Vec<u32>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            if let Some(mut c) = self.0.take() {
                let _ = Command::new("kill")
                    .args(["-INT", &c.id().to_string()])
                    .status();
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
            for p in &self.1 {
                if alive(*p) {
                    let _ = Command::new("kill")
                        .args(["-KILL", &p.to_string()])
                        .status();
                }
            }
        }
    }
    let mut guard = StopOnDrop(Some(demo), Vec::new());

    let mut output = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !output
        .iter()
        .any(|l: &String| l.contains("Press Ctrl-C to stop"))
    {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => output.push(l),
            Err(_) => {
                if let Some(c) = guard.0.as_mut() {
                    if let Ok(Some(st)) = c.try_wait() {
                        panic!(
                            "demo exited ({st}) before it was ready:\n{}",
                            output.join("\n")
                        );
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "demo not ready in 60 s:\n{}",
                    output.join("\n")
                );
            }
        }
    }
    let banner = output.join("\n");
    assert!(banner.contains("http://localhost:8080/"), "{banner}");
    assert!(banner.contains("admin / password"), "{banner}");
    let app_addr = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("App"))
        .and_then(|rest| rest.trim().strip_prefix("http://"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("app address in the banner:\n{banner}"));
    let envoy_pids = children_of(pid);
    assert!(!envoy_pids.is_empty(), "demo runs Envoy as a child");
    guard.1 = envoy_pids.clone();

    // The app itself keeps httpbin-style JSON at /headers.
    integration::browser::install_crypto_provider();
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let direct: Value = serde_json::from_str(
        &http
            .get(format!("http://{app_addr}/headers"))
            .header("x-probe", "1")
            .send()
            .await
            .expect("app /headers")
            .text()
            .await
            .expect("body"),
    )
    .expect("JSON");
    assert_eq!(direct["headers"]["x-probe"], json!("1"), "{direct}");

    {
        let mut chrome = Chrome::start("demo", 1100, 1300).await;
        chrome.goto("http://localhost:8080/").await;
        chrome.wait_for("#username").await;
        assert!(chrome
            .url()
            .await
            .starts_with("http://127.0.0.1:5556/authorize?"));
        chrome.shot("login-page").await;
        chrome.sign_in("admin", "password").await;
        chrome
            .wait_url("http://localhost:8080/", |u| u == "http://localhost:8080/")
            .await;
        chrome.wait_for("#token-kind").await;
        let kind = chrome.text("#token-kind").await;
        assert!(
            kind.contains("This is the access token (aud ≠ client id)"),
            "{kind}"
        );
        let claims = chrome
            .exec(
                "const o = {}; document.querySelectorAll('#claims tr[data-claim]').forEach(r => o[r.dataset.claim] = r.querySelector('td').innerText); return o",
                json!([]),
            )
            .await;
        let claim = |k: &str| claims[k].as_str().unwrap_or_default().to_string();
        assert!(claim("aud").starts_with("api://oidc-gate-demo"), "{claims}");
        assert!(
            claim("iss").starts_with("http://127.0.0.1:5556"),
            "{claims}"
        );
        assert!(claim("scope").contains("openid"), "{claims}");
        assert!(claim("exp").contains("UTC"), "{claims}");
        assert!(!claim("sub").is_empty(), "{claims}");
        assert_eq!(chrome.text("#who").await, "admin");
        chrome.shot("claims-page").await;

        // http://localhost is a secure context: the __Host-/Secure session cookie is kept.
        assert_eq!(
            chrome
                .exec("return window.isSecureContext", json!([]))
                .await,
            json!(true)
        );
        assert_session_cookie(&chrome.cookies().await, "localhost");

        // /headers in the browser is HTML; the same data stays JSON for curl (checked above).
        chrome.goto("http://localhost:8080/headers").await;
        chrome.wait_for("#token-kind").await;
        chrome
            .goto("http://localhost:8080/headers?format=json")
            .await;
        let v = echoed_json(&chrome).await;
        assert_access_token(&echoed_bearer(&v), "http://127.0.0.1:5556");

        chrome.goto("http://localhost:8080/").await;
        let out_link = chrome.wait_for("#sign-out").await;
        chrome.click(&out_link).await;
        chrome.wait_for("#signed-out").await;
        chrome.shot("signed-out").await;
    }

    // Ctrl-C: SIGINT to the demo only; it must stop Envoy, free the ports and exit 0.
    let st = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill -INT");
    assert!(st.success());
    let mut child = guard.0.take().expect("demo");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "demo did not exit after SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(300)) {
        output.push(l);
    }
    assert_eq!(
        status.code(),
        Some(0),
        "exit 0 on SIGINT:\n{}",
        output.join("\n")
    );
    assert!(
        output.iter().any(|l| l.contains("demo stopped")),
        "{}",
        output.join("\n")
    );
    for p in &envoy_pids {
        assert!(!alive(*p), "child {p} (Envoy) still running after SIGINT");
    }
    for port in [8080, 5556, app_addr.port()] {
        assert!(port_free(port), "port {port} still bound after SIGINT");
    }
}
