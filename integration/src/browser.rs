//! A browser-like HTTP client: HTTPS to the gateway with the real host names, no automatic
//! redirects, and its own cookie jar that behaves like a browser's (RFC 6265bis subset) and that
//! tests can inspect and tamper with.
//!
//! Jar rules implemented: cookies are per host (host-only unless a matching `Domain` is given);
//! `Secure` cookies are only stored from and sent over https; `__Host-` cookies must be `Secure`,
//! `Path=/` and have no `Domain` (else dropped), `__Secure-` must be `Secure`; `Max-Age<=0` or an
//! `Expires` in the past deletes; `Max-Age` wins over `Expires`; default-path and path-match per
//! RFC 6265 §5.1.4; `SameSite=None` without `Secure` is rejected; `SameSite=Strict` cookies are not
//! sent on cross-site requests (including a redirect chain that crossed sites) and `Lax` cookies
//! only on cross-site top-level GET navigations. Every rejected `Set-Cookie` is kept in
//! [`CookieJar::rejected`] with the reason.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::Duration;

use cookie::time::{Duration as CookieDuration, OffsetDateTime};
use cookie::{Cookie, Expiration, SameSite};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Method;
use url::Url;

/// Default per-request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Browser navigation `Accept`.
const NAV_ACCEPT: &str =
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8";
const NAV_UA: &str = "Mozilla/5.0 (X11; Linux x86_64) oidc-gate-integration/1.0 Firefox/140.0";
const API_UA: &str = "oidc-gate-integration-api/1.0";

/// What kind of client to imitate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// A browser navigation: `Accept: text/html…`, `Sec-Fetch-Mode: navigate`, `Sec-Fetch-Dest: document`.
    #[default]
    Navigation,
    /// A script/API client: `Accept: application/json`, no `Sec-Fetch-*`.
    Api,
}

/// One stored cookie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCookie {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
    /// Host (host-only) or domain it belongs to, lowercase.
    pub domain: String,
    /// True unless the server gave a matching `Domain` attribute.
    pub host_only: bool,
    /// Path.
    pub path: String,
    /// `Secure`.
    pub secure: bool,
    /// `HttpOnly`.
    pub http_only: bool,
    /// `SameSite` as given (None = attribute absent).
    pub same_site: Option<SameSite>,
    /// Expiry; `None` = session cookie.
    pub expires: Option<OffsetDateTime>,
    /// The `Max-Age` attribute as given, in seconds.
    pub max_age: Option<i64>,
    /// The exact `Set-Cookie` line that created it (empty for [`CookieJar::set_raw`]).
    pub raw: String,
    creation: u64,
}

/// The jar. Access it through [`Browser::jar`].
#[derive(Debug, Default)]
pub struct CookieJar {
    cookies: Vec<StoredCookie>,
    seq: u64,
    /// `Set-Cookie` lines that were refused: (line, reason).
    pub rejected: Vec<(String, String)>,
    /// Every `Set-Cookie` line processed, with the request URL it came from.
    pub history: Vec<(String, String)>,
}

impl CookieJar {
    /// Process one `Set-Cookie` line received for a response to `url`.
    pub fn store(&mut self, url: &Url, line: &str) -> Result<(), String> {
        self.history.push((url.to_string(), line.to_string()));
        let r = self.store_inner(url, line);
        if let Err(why) = &r {
            self.rejected.push((line.to_string(), why.clone()));
        }
        r
    }

    fn store_inner(&mut self, url: &Url, line: &str) -> Result<(), String> {
        let c = Cookie::parse(line.to_string()).map_err(|e| format!("unparsable: {e}"))?;
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        let https = url.scheme() == "https";
        let name = c.name().to_string();
        if name.is_empty() {
            return Err("empty name".into());
        }
        let secure = c.secure().unwrap_or(false);
        if secure && !https {
            return Err("Secure cookie from an insecure origin".into());
        }
        let (domain, host_only) = match c.domain().map(|d| d.trim_start_matches('.')) {
            Some(d) if !d.is_empty() => {
                let d = d.to_ascii_lowercase();
                if !domain_match(&host, &d) {
                    return Err(format!("Domain={d} does not match host {host}"));
                }
                (d, false)
            }
            _ => (host.clone(), true),
        };
        let path = match c.path() {
            Some(p) if p.starts_with('/') => p.to_string(),
            _ => default_path(url.path()),
        };
        if name.starts_with("__Secure-") && !secure {
            return Err("__Secure- cookie without Secure".into());
        }
        if name.starts_with("__Host-") {
            if !secure {
                return Err("__Host- cookie without Secure".into());
            }
            if c.domain().is_some() {
                return Err("__Host- cookie with Domain".into());
            }
            if c.path() != Some("/") {
                return Err("__Host- cookie without Path=/".into());
            }
        }
        let same_site = c.same_site();
        if same_site == Some(SameSite::None) && !secure {
            return Err("SameSite=None without Secure".into());
        }
        let now = OffsetDateTime::now_utc();
        let max_age = c.max_age().map(|d| d.whole_seconds());
        let expires = match (max_age, c.expires()) {
            (Some(s), _) => Some(if s <= 0 {
                OffsetDateTime::UNIX_EPOCH
            } else {
                now + CookieDuration::seconds(s)
            }),
            (None, Some(Expiration::DateTime(t))) => Some(t),
            _ => None,
        };
        // Replace an existing cookie with the same (name, domain, path).
        let old = self
            .cookies
            .iter()
            .position(|k| k.name == name && k.domain == domain && k.path == path);
        let creation = match old {
            Some(i) => self.cookies.remove(i).creation,
            None => {
                self.seq += 1;
                self.seq
            }
        };
        if expires.is_some_and(|t| t <= now) {
            return Ok(()); // deletion
        }
        self.cookies.push(StoredCookie {
            name,
            value: c.value().to_string(),
            domain,
            host_only,
            path,
            secure,
            http_only: c.http_only().unwrap_or(false),
            same_site,
            expires,
            max_age,
            raw: line.to_string(),
            creation,
        });
        Ok(())
    }

    /// The `Cookie` header a browser would send to `url`.
    /// `cross_site`: the request is cross-site (drops `Strict`, and `Lax` unless a top-level GET).
    pub fn header_for(&self, url: &Url, method: &Method, cross_site: bool) -> Option<String> {
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        let https = url.scheme() == "https";
        let now = OffsetDateTime::now_utc();
        let mut matching: Vec<&StoredCookie> = self
            .cookies
            .iter()
            .filter(|c| {
                if c.host_only {
                    c.domain == host
                } else {
                    domain_match(&host, &c.domain)
                }
            })
            .filter(|c| path_match(url.path(), &c.path))
            .filter(|c| https || !c.secure)
            .filter(|c| c.expires.is_none_or(|t| t > now))
            .filter(|c| match (cross_site, c.same_site) {
                (false, _) => true,
                (true, Some(SameSite::Strict)) => false,
                (true, Some(SameSite::Lax)) => *method == Method::GET || *method == Method::HEAD,
                (true, _) => true,
            })
            .collect();
        matching.sort_by(|a, b| {
            b.path
                .len()
                .cmp(&a.path.len())
                .then(a.creation.cmp(&b.creation))
        });
        if matching.is_empty() {
            return None;
        }
        Some(
            matching
                .iter()
                .map(|c| format!("{}={}", c.name, c.value))
                .collect::<Vec<_>>()
                .join("; "),
        )
    }

    /// All live cookies.
    pub fn all(&self) -> Vec<StoredCookie> {
        let now = OffsetDateTime::now_utc();
        self.cookies
            .iter()
            .filter(|c| c.expires.is_none_or(|t| t > now))
            .cloned()
            .collect()
    }

    /// Live cookies stored for exactly this host (host-only) or a domain covering it.
    pub fn for_host(&self, host: &str) -> Vec<StoredCookie> {
        let host = host.to_ascii_lowercase();
        self.all()
            .into_iter()
            .filter(|c| {
                if c.host_only {
                    c.domain == host
                } else {
                    domain_match(&host, &c.domain)
                }
            })
            .collect()
    }

    /// A live cookie by host and name.
    pub fn get(&self, host: &str, name: &str) -> Option<StoredCookie> {
        self.for_host(host).into_iter().find(|c| c.name == name)
    }

    /// Names of the live cookies for a host, those starting with `prefix`.
    pub fn names_with_prefix(&self, host: &str, prefix: &str) -> Vec<String> {
        self.for_host(host)
            .into_iter()
            .filter(|c| c.name.starts_with(prefix))
            .map(|c| c.name)
            .collect()
    }

    /// Set a cookie's value directly (tampering): replaces the value of the host's cookie with
    /// that name, keeping its attributes, or adds a host-only `Secure; Path=/` cookie.
    pub fn set_raw(&mut self, host: &str, name: &str, value: &str) {
        let host = host.to_ascii_lowercase();
        if let Some(c) = self
            .cookies
            .iter_mut()
            .find(|c| c.name == name && c.domain == host)
        {
            c.value = value.to_string();
            return;
        }
        self.seq += 1;
        self.cookies.push(StoredCookie {
            name: name.to_string(),
            value: value.to_string(),
            domain: host,
            host_only: true,
            path: "/".into(),
            secure: true,
            http_only: true,
            same_site: Some(SameSite::Lax),
            expires: None,
            max_age: None,
            raw: String::new(),
            creation: self.seq,
        });
    }

    /// Remove cookies by host and name.
    pub fn remove(&mut self, host: &str, name: &str) {
        let host = host.to_ascii_lowercase();
        self.cookies
            .retain(|c| !(c.name == name && c.domain == host));
    }

    /// Drop everything.
    pub fn clear(&mut self) {
        self.cookies.clear();
    }
}

/// RFC 6265 §5.1.3 domain-match (IP addresses only match exactly).
fn domain_match(host: &str, domain: &str) -> bool {
    if host == domain {
        return true;
    }
    host.parse::<std::net::IpAddr>().is_err()
        && host.ends_with(domain)
        && host.as_bytes().get(host.len() - domain.len() - 1) == Some(&b'.')
}

/// RFC 6265 §5.1.4 default-path.
fn default_path(path: &str) -> String {
    if !path.starts_with('/') {
        return "/".into();
    }
    match path.rfind('/') {
        Some(0) | None => "/".into(),
        Some(i) => path[..i].to_string(),
    }
}

/// RFC 6265 §5.1.4 path-match.
fn path_match(req: &str, cookie: &str) -> bool {
    req == cookie
        || (req.starts_with(cookie)
            && (cookie.ends_with('/') || req.as_bytes().get(cookie.len()) == Some(&b'/')))
}

/// The "site" of a host (registrable domain approximation: the last two labels; IPs and single
/// labels are their own site).
pub fn site_of(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let scheme = url.scheme();
    if host.parse::<std::net::IpAddr>().is_ok() || host.trim_matches(['[', ']']).contains(':') {
        return format!("{scheme}://{host}");
    }
    let labels: Vec<&str> = host.split('.').collect();
    let n = labels.len();
    let reg = if n >= 2 {
        labels[n - 2..].join(".")
    } else {
        host.clone()
    };
    format!("{scheme}://{reg}")
}

fn origin_of(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// The site of a navigation's initiator, given as an origin (a page's) or as a site.
fn initiator_site(initiator: &str) -> String {
    Url::parse(initiator)
        .map(|u| site_of(&u))
        .unwrap_or_else(|_| initiator.to_string())
}

/// A response, fully read.
#[derive(Clone, Debug)]
pub struct Resp {
    /// Request method.
    pub method: String,
    /// Request URL.
    pub url: Url,
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// Body as text (lossy UTF-8).
    pub body: String,
    /// The origin that initiated the navigation (None = typed by the user).
    pub initiator: Option<String>,
    /// Whether this request was cross-site (for SameSite).
    pub cross_site: bool,
    /// Whether some URL of the navigation so far, this one included, had an origin other than
    /// the initiator's: later hops are then at most `same-site` (Fetch Metadata's URL-list rule).
    pub left_origin: bool,
    /// HTTP version used.
    pub version: String,
}

impl Resp {
    /// First value of a response header.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// Whether the status is a redirect with a `Location`.
    pub fn is_redirect(&self) -> bool {
        (300..400).contains(&self.status) && self.headers.contains_key("location")
    }

    /// `Location` resolved against the request URL.
    pub fn location(&self) -> Option<Url> {
        let l = self.header("location")?;
        self.url.join(&l).ok()
    }

    /// Query parameters of the `Location` (first value per name).
    pub fn location_param(&self, name: &str) -> Option<String> {
        self.location()?
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// All `Set-Cookie` lines.
    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    /// The parsed `Set-Cookie` with this name (the last one if repeated).
    pub fn set_cookie(&self, name: &str) -> Option<Cookie<'static>> {
        self.set_cookies()
            .into_iter()
            .filter_map(|l| Cookie::parse(l).ok())
            .rfind(|c| c.name() == name)
    }

    /// Parsed `Set-Cookie`s whose name starts with `prefix`.
    pub fn set_cookies_with_prefix(&self, prefix: &str) -> Vec<Cookie<'static>> {
        self.set_cookies()
            .into_iter()
            .filter_map(|l| Cookie::parse(l).ok())
            .filter(|c| c.name().starts_with(prefix))
            .collect()
    }

    /// Body parsed as JSON (`Null` if not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// A one-line description for assertion messages.
    pub fn describe(&self) -> String {
        let body: String = self.body.chars().take(300).collect();
        format!(
            "{} {} -> {} location={:?} set-cookie={:?} body={:?}",
            self.method,
            self.url,
            self.status,
            self.header("location"),
            self.set_cookies(),
            body
        )
    }
}

/// An HTML form found in a page.
#[derive(Clone, Debug, Default)]
pub struct Form {
    /// Resolved action URL.
    pub action: Option<Url>,
    /// Method (lowercase), default `get`.
    pub method: String,
    /// Named inputs with their values (hidden and visible).
    pub inputs: Vec<(String, String)>,
}

impl Form {
    /// Parse the first `<form>` in `html`; the action is resolved against `base`.
    pub fn parse(html: &str, base: &Url) -> Option<Form> {
        let lower = html.to_ascii_lowercase();
        let start = lower.find("<form")?;
        let end = lower[start..]
            .find("</form")
            .map(|e| start + e)
            .unwrap_or(html.len());
        let tag_end = start + lower[start..].find('>')?;
        let form_tag = &html[start..=tag_end];
        let action = attr(form_tag, "action").unwrap_or_default();
        let action = base.join(&action).ok();
        let method = attr(form_tag, "method")
            .unwrap_or_else(|| "get".into())
            .to_ascii_lowercase();
        let mut inputs = Vec::new();
        let body = &html[tag_end..end];
        let lbody = &lower[tag_end..end];
        let mut pos = 0;
        while let Some(i) = lbody[pos..].find("<input") {
            let s = pos + i;
            let e = s + lbody[s..].find('>').unwrap_or(lbody.len() - s - 1);
            let tag = &body[s..=e.min(body.len() - 1)];
            if let Some(name) = attr(tag, "name") {
                let ty = attr(tag, "type").unwrap_or_default().to_ascii_lowercase();
                if ty != "submit" && ty != "button" {
                    inputs.push((name, attr(tag, "value").unwrap_or_default()));
                }
            }
            pos = e + 1;
        }
        Some(Form {
            action,
            method,
            inputs,
        })
    }

    /// Set (or add) a field.
    pub fn set(&mut self, name: &str, value: &str) {
        match self.inputs.iter_mut().find(|(k, _)| k == name) {
            Some(f) => f.1 = value.to_string(),
            None => self.inputs.push((name.to_string(), value.to_string())),
        }
    }
}

/// Value of an HTML attribute in a tag (quoted or bare), entity-decoded.
fn attr(tag: &str, name: &str) -> Option<String> {
    let lower = tag.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = lower[from..].find(name) {
        let s = from + i;
        from = s + name.len();
        let before_ok = s == 0
            || lower.as_bytes()[s - 1].is_ascii_whitespace()
            || lower.as_bytes()[s - 1] == b'<';
        let rest = lower[from..].trim_start();
        if !before_ok || !rest.starts_with('=') {
            continue;
        }
        let vstart = from + (lower[from..].len() - rest.len()) + 1;
        let raw = tag[vstart..].trim_start();
        let value = if let Some(r) = raw.strip_prefix('"') {
            r.split('"').next().unwrap_or_default()
        } else if let Some(r) = raw.strip_prefix('\'') {
            r.split('\'').next().unwrap_or_default()
        } else {
            raw.split(|c: char| c.is_whitespace() || c == '>' || c == '/')
                .next()
                .unwrap_or_default()
        };
        return Some(html_unescape(value));
    }
    None
}

fn html_unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#34;", "\"")
        .replace("&#39;", "'")
        .replace("&#x27;", "'")
        .replace("&#x2F;", "/")
        .replace("&#47;", "/")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// A browser. Cheap to share by reference; all methods take `&self`.
pub struct Browser {
    client: reqwest::Client,
    jar: Arc<Mutex<CookieJar>>,
    mode: Mode,
}

/// Install rustls's ring provider as the process default (reqwest is built without one).
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Browser {
    /// A browser whose DNS sends each of `hosts` to `gateway` (any port in the URL is ignored for
    /// those hosts: `https://app.example.com/` goes to the gateway listener, `:authority` stays
    /// `app.example.com`). Other hosts (e.g. the mock IdP on 127.0.0.1) are reached directly.
    pub fn new(gateway: SocketAddr, hosts: &[&str], mode: Mode) -> Browser {
        Self::with_options(gateway, hosts, mode, false)
    }

    /// Like [`Browser::new`]; `http1_only` disables HTTP/2 (ALPN offers only http/1.1).
    pub fn with_options(
        gateway: SocketAddr,
        hosts: &[&str],
        mode: Mode,
        http1_only: bool,
    ) -> Browser {
        let routes: Vec<(&str, SocketAddr)> = hosts.iter().map(|h| (*h, gateway)).collect();
        Self::with_routes(&routes, mode, http1_only)
    }

    /// A browser whose DNS sends each host to its own address (e.g. the test hosts to the
    /// gateway and an IdP's name to the listener that serves it).
    pub fn with_routes(routes: &[(&str, SocketAddr)], mode: Mode, http1_only: bool) -> Browser {
        install_crypto_provider();
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .tls_danger_accept_invalid_certs(true)
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(4);
        if http1_only {
            b = b.http1_only();
        }
        for (host, addr) in routes {
            b = b.resolve(host, *addr);
        }
        Browser {
            client: b.build().expect("reqwest client"),
            jar: Arc::default(),
            mode,
        }
    }

    /// The same cookie jar with another client mode (shares cookies, new connections).
    pub fn with_mode(&self, gateway: SocketAddr, hosts: &[&str], mode: Mode) -> Browser {
        let mut b = Browser::new(gateway, hosts, mode);
        b.jar = self.jar.clone();
        b
    }

    /// The cookie jar (locked while the guard lives; don't hold it across requests).
    pub fn jar(&self) -> MutexGuard<'_, CookieJar> {
        self.jar.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tamper: set a cookie value directly (see [`CookieJar::set_raw`]).
    pub fn set_cookie_raw(&self, host: &str, name: &str, value: &str) {
        self.jar().set_raw(host, name, value);
    }

    /// A typed-in navigation (GET, no initiator).
    pub async fn get(&self, url: &str) -> Resp {
        self.get_with(url, &[]).await
    }

    /// GET with extra headers (added after the defaults; `cookie` is added as another header).
    pub async fn get_with(&self, url: &str, headers: &[(&str, &str)]) -> Resp {
        let url = Url::parse(url).expect("valid URL");
        self.send(Method::GET, url, headers, None, None, false)
            .await
    }

    /// POST a urlencoded form, as submitted from a page of the same origin.
    pub async fn post_form(&self, url: &str, fields: &[(&str, &str)]) -> Resp {
        let url = Url::parse(url).expect("valid URL");
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let initiator = Some(origin_of(&url));
        self.send(Method::POST, url, &[], Some(fields), initiator, false)
            .await
    }

    /// Submit `form` as found on `page` (initiator = the page's origin).
    pub async fn submit(&self, page: &Resp, form: &Form) -> Resp {
        let action = form.action.clone().unwrap_or_else(|| page.url.clone());
        let initiator = Some(origin_of(&page.url));
        let cross = site_of(&page.url) != site_of(&action);
        if form.method == "post" {
            self.send(
                Method::POST,
                action,
                &[],
                Some(form.inputs.clone()),
                initiator,
                cross,
            )
            .await
        } else {
            let mut u = action;
            u.query_pairs_mut().clear().extend_pairs(form.inputs.iter());
            self.send(Method::GET, u, &[], None, initiator, cross).await
        }
    }

    /// Follow one redirect (GET to the `Location`, keeping the navigation's initiator; the chain is
    /// cross-site once any hop crossed sites). Panics if `resp` is not a redirect.
    pub async fn follow_one(&self, resp: &Resp) -> Resp {
        let next = resp
            .location()
            .unwrap_or_else(|| panic!("not a redirect: {}", resp.describe()));
        let mut cross = resp.cross_site || site_of(&resp.url) != site_of(&next);
        if let Some(i) = &resp.initiator {
            cross |= initiator_site(i) != site_of(&next);
        }
        // 301/302/303 turn a POST into a GET; 307/308 would keep it, not needed here.
        self.send_hop(
            Method::GET,
            next,
            &[],
            None,
            resp.initiator
                .clone()
                .or_else(|| Some(origin_of(&resp.url))),
            cross,
            resp.left_origin,
        )
        .await
    }

    /// Follow redirects up to `max_hops`; returns the chain of responses after `resp` (the last
    /// element is where it stopped; empty if `resp` is not a redirect).
    pub async fn follow_chain(&self, resp: &Resp, max_hops: usize) -> Vec<Resp> {
        let mut chain: Vec<Resp> = Vec::new();
        let mut cur = resp.clone();
        for _ in 0..max_hops {
            if !cur.is_redirect() {
                break;
            }
            cur = self.follow_one(&cur).await;
            chain.push(cur.clone());
        }
        chain
    }

    /// Follow redirects up to `max_hops`; returns the final response (or `resp` itself).
    pub async fn follow(&self, resp: &Resp, max_hops: usize) -> Resp {
        self.follow_chain(resp, max_hops)
            .await
            .pop()
            .unwrap_or_else(|| resp.clone())
    }

    /// At a login page (`page` = the IdP's HTML form response), fill `username`/`password` and
    /// submit; returns the IdP's answer (normally 302 to the callback).
    pub async fn submit_login(&self, page: &Resp, username: &str, password: &str) -> Resp {
        let mut form = Form::parse(&page.body, &page.url)
            .unwrap_or_else(|| panic!("no login form: {}", page.describe()));
        form.set("username", username);
        form.set("password", password);
        self.submit(page, &form).await
    }

    /// The general request.
    pub async fn send(
        &self,
        method: Method,
        url: Url,
        headers: &[(&str, &str)],
        form: Option<Vec<(String, String)>>,
        initiator: Option<String>,
        cross_site: bool,
    ) -> Resp {
        self.send_hop(method, url, headers, form, initiator, cross_site, false)
            .await
    }

    /// One request of a navigation; `left_origin`: an earlier URL of it had an origin other
    /// than the initiator's.
    #[allow(clippy::too_many_arguments)]
    async fn send_hop(
        &self,
        method: Method,
        url: Url,
        headers: &[(&str, &str)],
        form: Option<Vec<(String, String)>>,
        initiator: Option<String>,
        cross_site: bool,
        left_origin: bool,
    ) -> Resp {
        let left_origin = left_origin || initiator.as_ref().is_some_and(|i| *i != origin_of(&url));
        let mut rb = self.client.request(method.clone(), url.clone());
        let mut hm = HeaderMap::new();
        match self.mode {
            Mode::Navigation => {
                hm.insert("accept", HeaderValue::from_static(NAV_ACCEPT));
                hm.insert(
                    "accept-language",
                    HeaderValue::from_static("en-US,en;q=0.5"),
                );
                hm.insert("user-agent", HeaderValue::from_static(NAV_UA));
                hm.insert("upgrade-insecure-requests", HeaderValue::from_static("1"));
                hm.insert("sec-fetch-dest", HeaderValue::from_static("document"));
                hm.insert("sec-fetch-mode", HeaderValue::from_static("navigate"));
                let sfs = match &initiator {
                    None => "none",
                    Some(_) if cross_site => "cross-site",
                    Some(_) if !left_origin => "same-origin",
                    Some(i) if initiator_site(i) == site_of(&url) => "same-site",
                    Some(_) => "cross-site",
                };
                hm.insert("sec-fetch-site", HeaderValue::from_static(sfs));
                hm.insert("sec-fetch-user", HeaderValue::from_static("?1"));
            }
            Mode::Api => {
                hm.insert("accept", HeaderValue::from_static("application/json"));
                hm.insert("user-agent", HeaderValue::from_static(API_UA));
            }
        }
        let cookie = self.jar().header_for(&url, &method, cross_site);
        if let Some(c) = cookie {
            hm.insert(
                "cookie",
                HeaderValue::from_str(&c).expect("cookie header value"),
            );
        }
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.as_bytes()).expect("header name");
            let value = HeaderValue::from_str(v).expect("header value");
            hm.append(name, value);
        }
        rb = rb.headers(hm);
        if let Some(f) = form {
            rb = rb.form(&f);
        }
        let r = rb
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e:?}"));
        self.read_response(method, url, r, initiator, cross_site, left_origin)
            .await
    }

    /// A `POST` whose body is followed by trailers (HTTP/2), with this client's cookies and no
    /// navigation headers.
    pub async fn post_with_trailers(
        &self,
        url: &str,
        body: &[u8],
        trailers: &[(&str, &str)],
    ) -> Resp {
        use http_body_util::{BodyExt, Full};
        let url = Url::parse(url).expect("url");
        let mut trailer_map = HeaderMap::new();
        for (k, v) in trailers {
            trailer_map.append(
                HeaderName::from_bytes(k.as_bytes()).expect("trailer name"),
                HeaderValue::from_str(v).expect("trailer value"),
            );
        }
        let body = Full::new(bytes::Bytes::copy_from_slice(body))
            .with_trailers(std::future::ready(Some(Ok(trailer_map))));
        let mut rb = self
            .client
            .post(url.clone())
            .body(reqwest::Body::wrap(body));
        if let Some(c) = self.jar().header_for(&url, &Method::POST, false) {
            rb = rb.header("cookie", c);
        }
        let r = rb
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e:?}"));
        self.read_response(Method::POST, url, r, None, false, false)
            .await
    }

    /// The answer as a [`Resp`]; its cookies go into the jar.
    async fn read_response(
        &self,
        method: Method,
        url: Url,
        r: reqwest::Response,
        initiator: Option<String>,
        cross_site: bool,
        left_origin: bool,
    ) -> Resp {
        let status = r.status().as_u16();
        let version = format!("{:?}", r.version());
        let headers = r.headers().clone();
        let body = r.text().await.unwrap_or_default();
        {
            let mut jar = self.jar();
            for v in headers.get_all("set-cookie") {
                let _ = jar.store(&url, &String::from_utf8_lossy(v.as_bytes()));
            }
        }
        Resp {
            method: method.to_string(),
            url,
            status,
            headers,
            body,
            initiator,
            cross_site,
            left_origin,
            version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn host_prefix_rules() {
        let mut j = CookieJar::default();
        let url = u("https://app.example.com/a/b");
        assert!(j
            .store(&url, "__Host-a=1; Secure; Path=/; HttpOnly; SameSite=Lax")
            .is_ok());
        assert!(j.store(&url, "__Host-b=1; Path=/").is_err());
        assert!(j.store(&url, "__Host-c=1; Secure").is_err());
        assert!(j
            .store(&url, "__Host-d=1; Secure; Path=/; Domain=example.com")
            .is_err());
        assert!(j
            .store(&u("http://app.example.com/"), "s=1; Secure; Path=/")
            .is_err());
        let c = j.get("app.example.com", "__Host-a").unwrap();
        assert!(c.secure && c.http_only && c.same_site == Some(SameSite::Lax));
        assert!(j.get("other.example.com", "__Host-a").is_none());
    }

    #[test]
    fn deletion_and_paths() {
        let mut j = CookieJar::default();
        let url = u("https://app.example.com/x/y");
        j.store(&url, "a=1").unwrap();
        assert_eq!(j.get("app.example.com", "a").unwrap().path, "/x");
        j.store(&url, "b=2; Path=/").unwrap();
        assert_eq!(
            j.header_for(&u("https://app.example.com/x/z"), &Method::GET, false)
                .as_deref(),
            Some("a=1; b=2")
        );
        assert_eq!(
            j.header_for(&u("https://app.example.com/xy"), &Method::GET, false)
                .as_deref(),
            Some("b=2")
        );
        j.store(&url, "b=; Path=/; Max-Age=0").unwrap();
        j.store(&url, "a=; Path=/x; Expires=Thu, 01 Jan 1970 00:00:00 GMT")
            .unwrap();
        assert!(j.all().is_empty());
    }

    #[test]
    fn same_site_on_cross_site_requests() {
        let mut j = CookieJar::default();
        let url = u("https://app.example.com/");
        j.store(&url, "l=1; Secure; Path=/; SameSite=Lax").unwrap();
        j.store(&url, "s=1; Secure; Path=/; SameSite=Strict")
            .unwrap();
        assert_eq!(
            j.header_for(&url, &Method::GET, true).as_deref(),
            Some("l=1")
        );
        assert_eq!(j.header_for(&url, &Method::POST, true), None);
        assert_eq!(
            j.header_for(&url, &Method::POST, false).as_deref(),
            Some("l=1; s=1")
        );
    }

    #[test]
    fn parses_login_form() {
        let html = r#"<html><form method="post" action="/authorize">
            <input type="hidden" name="state" value="a&amp;b">
            <input name='username'><input type=password name=password>
            <input type="submit" value="Log in"></form>"#;
        let f = Form::parse(html, &u("http://127.0.0.1:5/authorize?x=1")).unwrap();
        assert_eq!(f.method, "post");
        assert_eq!(f.action.unwrap().as_str(), "http://127.0.0.1:5/authorize");
        assert_eq!(
            f.inputs,
            vec![
                ("state".to_string(), "a&b".to_string()),
                ("username".to_string(), String::new()),
                ("password".to_string(), String::new())
            ]
        );
    }

    /// Two origins of one site (ports of 127.0.0.1): `/to-other` on the first redirects to the
    /// second's `/back`, which redirects to the first's `/echo`; `/to-echo` goes to `/echo`
    /// directly. `/echo` answers with the request's `Sec-Fetch-Site`.
    async fn two_origins_of_one_site() -> (String, String) {
        use axum::{extract::State, http::HeaderMap as Headers, response::Redirect, Router};
        let first = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let second = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let first_origin = format!("http://{}", first.local_addr().unwrap());
        let second_origin = format!("http://{}", second.local_addr().unwrap());
        let first_app = Router::new()
            .route(
                "/to-other",
                axum::routing::get(|State(other): State<String>| async move {
                    Redirect::to(&format!("{other}/back"))
                }),
            )
            .route(
                "/to-echo",
                axum::routing::get(|| async { Redirect::to("/echo") }),
            )
            .route(
                "/echo",
                axum::routing::get(|headers: Headers| async move {
                    headers
                        .get("sec-fetch-site")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("absent")
                        .to_string()
                }),
            )
            .with_state(second_origin.clone());
        let second_app = Router::new()
            .route(
                "/back",
                axum::routing::get(|State(first): State<String>| async move {
                    Redirect::to(&format!("{first}/echo"))
                }),
            )
            .with_state(first_origin.clone());
        tokio::spawn(async move { axum::serve(first, first_app).await });
        tokio::spawn(async move { axum::serve(second, second_app).await });
        (first_origin, second_origin)
    }

    #[tokio::test]
    async fn a_redirect_through_another_origin_of_the_site_makes_the_chain_same_site() {
        let (first, _second) = two_origins_of_one_site().await;
        let browser = Browser::new("127.0.0.1:9".parse().unwrap(), &[], Mode::Navigation);
        let navigate = |path: &str| {
            browser.send(
                Method::GET,
                u(&format!("{first}{path}")),
                &[],
                None,
                Some(first.clone()),
                false,
            )
        };

        let direct = navigate("/to-echo").await;
        let landed = browser.follow(&direct, 3).await;
        assert_eq!(landed.body, "same-origin", "{}", landed.describe());

        let through_other = navigate("/to-other").await;
        let landed = browser.follow(&through_other, 3).await;
        assert_eq!(landed.url.as_str(), format!("{first}/echo"));
        assert_eq!(landed.body, "same-site", "{}", landed.describe());
    }
}
