//! Clients the benchmark drives from Rust (logins, refreshes, distinct sessions) and session
//! cookies sealed with the filter's own code.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use oidc_filter::crypto::{key_scope, Keyring};
use oidc_filter::session::{Session, SESSION_COOKIE};
use oidc_filter::types::{Random, RandomUnavailable, SecretBytes};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use url::Url;

use crate::browser::{install_crypto_provider, Browser, Mode};
use crate::stack::{APP_HOST, PASSWORD, USERNAME};
use crate::TEST_HOSTS;

/// An HTTP/1.1 client without cookie jar or redirects; `app.example.com` goes to `gateway`.
pub fn plain_client(gateway: SocketAddr) -> reqwest::Client {
    install_crypto_provider();
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .tls_danger_accept_invalid_certs(true)
        .http1_only()
        .timeout(Duration::from_secs(20))
        .pool_max_idle_per_host(64);
    for h in TEST_HOSTS {
        b = b.resolve(h, gateway);
    }
    b.build().expect("reqwest client")
}

/// An answer, fully read.
#[derive(Clone, Debug)]
pub struct Answer {
    /// Status.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body (lossy UTF-8).
    pub body: String,
    /// Time to the full body.
    pub latency: Duration,
}

impl Answer {
    /// Number of `Set-Cookie` headers.
    pub fn set_cookie_count(&self) -> usize {
        self.headers.get_all("set-cookie").iter().count()
    }
}

/// GET `url` with exactly these headers.
pub async fn get(
    client: &reqwest::Client,
    url: &str,
    headers: &[(String, String)],
) -> Result<Answer, String> {
    let mut hm = HeaderMap::new();
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| e.to_string())?;
        let value = HeaderValue::from_str(v).map_err(|e| e.to_string())?;
        hm.append(name, value);
    }
    let t = Instant::now();
    let r = client
        .get(url)
        .headers(hm)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.text().await.unwrap_or_default();
    Ok(Answer {
        status,
        headers,
        body,
        latency: t.elapsed(),
    })
}

/// A finished browser login.
pub struct Login {
    /// The browser, its jar holding the session cookies.
    pub browser: Browser,
    /// The `Cookie` header the browser now sends to `url`.
    pub cookie: String,
    /// Wall time from the first request to the callback's answer (or to landing).
    pub elapsed: Duration,
}

/// A real browser login through the gateway at `gateway`: GET `url` (302 to `authorize`), the
/// IdP's login page, the form POST, the gateway's callback (302); with `land`, also the
/// redirect back to `url` (must be 200). Each login is a new browser (own connections and jar).
pub async fn browser_login(
    gateway: SocketAddr,
    url: &str,
    authorize: &str,
    land: bool,
) -> Result<Login, String> {
    let browser = Browser::new(gateway, TEST_HOSTS, Mode::Navigation);
    let t = Instant::now();
    let start = browser.get(url).await;
    let to_idp = start.location().map(|l| l.to_string()).unwrap_or_default();
    if start.status != 302 || !to_idp.starts_with(authorize) {
        return Err(format!("login start: {}", start.describe()));
    }
    let page = browser.follow_one(&start).await;
    if page.status != 200 {
        return Err(format!("IdP login page: {}", page.describe()));
    }
    let idp = browser.submit_login(&page, USERNAME, PASSWORD).await;
    if idp.status != 302 {
        return Err(format!("IdP login POST: {}", idp.describe()));
    }
    let callback = browser.follow_one(&idp).await;
    if callback.status != 302 {
        return Err(format!("callback: {}", callback.describe()));
    }
    if land {
        let landed = browser.follow_one(&callback).await;
        if landed.status != 200 {
            return Err(format!("after login: {}", landed.describe()));
        }
    }
    let elapsed = t.elapsed();
    let parsed = Url::parse(url).map_err(|e| e.to_string())?;
    let cookie = browser
        .jar()
        .header_for(&parsed, &reqwest::Method::GET, false)
        .ok_or("no cookies after login")?;
    Ok(Login {
        browser,
        cookie,
        elapsed,
    })
}

/// Randomness for sealing, from the OS.
pub struct OsRandom;

impl Random for OsRandom {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RandomUnavailable> {
        getrandom::getrandom(buf).map_err(|_| RandomUnavailable)
    }
}

/// Opens and seals oidc-gate session cookies with the gateway's cookie secret, using the
/// filter's own code (`oidc_filter::session`), for `app.example.com`.
pub struct Sealer {
    keys: Keyring,
}

/// Separates the chunk count from the first chunk in a chunked session cookie (see
/// `oidc_filter::flow`).
const CHUNK_MARK: char = '.';

impl Sealer {
    /// From the base64 cookie secret given to the filter, for its issuer and client.
    pub fn new(cookie_secret_b64: &str, issuer: &str, client_id: &str) -> Result<Sealer, String> {
        let secret = STANDARD
            .decode(cookie_secret_b64)
            .map_err(|e| format!("cookie secret: {e}"))?;
        Ok(Sealer {
            keys: Keyring::new(
                &SecretBytes::new(secret),
                &[],
                &key_scope(issuer, client_id),
            ),
        })
    }

    /// The session in a `Cookie` header (single or chunked session cookie).
    pub fn open(&self, cookie_header: &str) -> Result<Session, String> {
        let pairs: Vec<(&str, &str)> = cookie_header
            .split(';')
            .filter_map(|p| p.trim().split_once('='))
            .collect();
        let get = |n: &str| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| *v);
        let first = get(SESSION_COOKIE).ok_or("no session cookie")?;
        let sealed = match first.split_once(CHUNK_MARK) {
            None => first.to_string(),
            Some((count, head)) => {
                let count: usize = count.parse().map_err(|_| "bad chunk count")?;
                let mut v = head.to_string();
                for i in 1..count {
                    v.push_str(
                        get(&format!("{SESSION_COOKIE}-{i}")).ok_or("missing session chunk")?,
                    );
                }
                v
            }
        };
        Session::open(&self.keys, APP_HOST, &sealed)
            .map(|(s, _)| s)
            .map_err(|e| format!("session cookie: {e}"))
    }

    /// A `Cookie` header carrying `session` (chunked as the filter chunks it).
    pub fn cookie_header(&self, session: &Session) -> Result<String, String> {
        let sealed = session
            .seal(&self.keys, APP_HOST, &mut OsRandom)
            .map_err(|e| format!("seal: {e}"))?;
        let size = oidc_filter::flow::CHUNK_BYTES;
        if sealed.len() <= size {
            return Ok(format!("{SESSION_COOKIE}={sealed}"));
        }
        let chunks: Vec<&str> = sealed
            .as_bytes()
            .chunks(size)
            .filter_map(|c| std::str::from_utf8(c).ok())
            .collect();
        let mut parts = vec![format!(
            "{SESSION_COOKIE}={}{CHUNK_MARK}{}",
            chunks.len(),
            chunks[0]
        )];
        for (i, c) in chunks.iter().enumerate().skip(1) {
            parts.push(format!("{SESSION_COOKIE}-{i}={c}"));
        }
        Ok(parts.join("; "))
    }
}

/// Median of a slice (sorted copy); 0 for an empty slice.
pub fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// Nearest-rank percentile of a slice; 0 for an empty slice.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if p == 50.0 && s.len() % 2 == 0 {
        let m = s.len() / 2;
        return (s[m - 1] + s[m]) / 2.0;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 99.0), 5.0);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn seal_and_open_round_trip_chunked_or_not() {
        let sealer = Sealer::new(&STANDARD.encode([7u8; 32]), "https://idp", "gate").unwrap();
        for len in [100, 9000] {
            let s = Session {
                access_token: oidc_filter::types::Secret::new("a".repeat(len)),
                id_token: None,
                refresh_token: None,
                expires_at: 10,
                tokens_at: 1,
                subject: "s".into(),
                created_at: 1,
                seen_at: 1,
                max_expires_at: 20,
                login_id: None,
                claims: Default::default(),
            };
            let h = sealer.cookie_header(&s).unwrap();
            assert_eq!(sealer.open(&h).unwrap(), s);
        }
    }
}
