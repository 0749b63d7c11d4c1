//! Shared helpers of the attack suite (`hostile_idp.rs`, `hostile_client.rs`): a raw HTTP/1.1
//! client over TLS that sends request targets byte for byte (no URL normalisation), login steps,
//! and the assertions every hostile case makes (rejected, nothing upstream, no IdP call, no panic).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use integration::stack::{
    Stack, APP_HOST, LOGIN_COOKIE_PREFIX, PASSWORD, SESSION_COOKIE, USERNAME,
};
use integration::{Browser, Resp};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

// ------------------------------------------------------------------------------------------------
// Raw HTTP/1.1 over TLS
// ------------------------------------------------------------------------------------------------

#[derive(Debug)]
struct AcceptAnyCert(Vec<SignatureScheme>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.clone()
    }
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    integration::browser::install_crypto_provider();
    let provider = rustls::crypto::ring::default_provider();
    let schemes = provider
        .signature_verification_algorithms
        .supported_schemes();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(schemes)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// A response read by [`raw_request`].
#[derive(Clone, Debug, Default)]
pub struct RawResp {
    /// Status code (0 if the answer was not HTTP).
    pub status: u16,
    /// Headers in order, names lowercase.
    pub headers: Vec<(String, String)>,
    /// Body (lossy UTF-8, not de-chunked).
    pub body: String,
}

impl RawResp {
    /// First value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// All `Set-Cookie` values.
    pub fn set_cookies(&self) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == "set-cookie")
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// `(name, value)` of the first `Set-Cookie` whose name starts with `prefix` and has a value.
    pub fn set_cookie_with_prefix(&self, prefix: &str) -> Option<(String, String)> {
        self.set_cookies().into_iter().find_map(|c| {
            let pair = c.split(';').next()?;
            let (n, v) = pair.split_once('=')?;
            (n.starts_with(prefix) && !v.is_empty()).then(|| (n.to_string(), v.to_string()))
        })
    }

    /// One line for assertion messages.
    pub fn describe(&self) -> String {
        let body: String = self.body.chars().take(200).collect();
        format!(
            "{} location={:?} set-cookie={:?} body={body:?}",
            self.status,
            self.header("location"),
            self.set_cookies()
        )
    }
}

/// Send `request` (complete bytes) over TLS (SNI `sni`, ALPN http/1.1) to `addr` and read the
/// answer until the server closes (send `Connection: close`). Blocking; call via
/// [`raw_request`].
fn raw_request_blocking(addr: SocketAddr, sni: &str, request: &[u8]) -> std::io::Result<RawResp> {
    let server_name =
        ServerName::try_from(sni.to_string()).map_err(|e| std::io::Error::other(e.to_string()))?;
    let conn = rustls::ClientConnection::new(tls_config(), server_name)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    sock.set_write_timeout(Some(Duration::from_secs(20)))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(request)?;
    tls.flush()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match tls.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if response_complete(&buf) {
                    break;
                }
            }
            // Envoy may close without close_notify after `Connection: close`.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !buf.is_empty() => break,
            Err(e) => return Err(e),
        }
        if buf.len() > 64 * 1024 * 1024 {
            break;
        }
    }
    Ok(parse_response(&buf))
}

/// Whether `buf` holds a whole response (by `Content-Length` or the last chunk), so the reader
/// need not wait for Envoy's delayed close.
fn response_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let body = &buf[end + 4..];
    for line in head.split("\r\n") {
        if let Some(v) = line.strip_prefix("content-length:") {
            return v.trim().parse::<usize>().is_ok_and(|n| body.len() >= n);
        }
        if line.starts_with("transfer-encoding:") && line.contains("chunked") {
            return body.ends_with(b"0\r\n\r\n");
        }
    }
    false
}

fn parse_response(buf: &[u8]) -> RawResp {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    RawResp {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Send raw request bytes to the gateway over TLS with HTTP/1.1.
pub async fn raw_request(stack: &Stack, sni: &str, request: Vec<u8>) -> RawResp {
    let addr = stack.gateway_addr();
    let sni = sni.to_string();
    tokio::task::spawn_blocking(move || raw_request_blocking(addr, &sni, &request))
        .await
        .expect("raw request task")
        .unwrap_or_else(|e| panic!("raw request failed: {e}"))
}

/// `GET <target> HTTP/1.1` to the gateway with `Host: app.example.com`, browser navigation
/// headers, `extra` header lines (already formatted `Name: value`, any bytes) and
/// `Connection: close`.
pub async fn raw_get(stack: &Stack, target: &[u8], extra: &[&str]) -> RawResp {
    raw_get_host(stack, APP_HOST, target, extra).await
}

/// Like [`raw_get`] with header lines that need not be UTF-8.
pub async fn raw_get_bytes(stack: &Stack, target: &[u8], extra: &[&[u8]]) -> RawResp {
    raw_get_host_bytes(stack, APP_HOST, target, extra).await
}

/// Like [`raw_get`] with another `Host`.
pub async fn raw_get_host(stack: &Stack, host: &str, target: &[u8], extra: &[&str]) -> RawResp {
    let extra: Vec<&[u8]> = extra.iter().map(|h| h.as_bytes()).collect();
    raw_get_host_bytes(stack, host, target, &extra).await
}

async fn raw_get_host_bytes(stack: &Stack, host: &str, target: &[u8], extra: &[&[u8]]) -> RawResp {
    let mut req = Vec::new();
    req.extend_from_slice(b"GET ");
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(
        b"\r\nAccept: text/html,application/xhtml+xml\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-Dest: document\r\n",
    );
    for h in extra {
        req.extend_from_slice(h);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"Connection: close\r\n\r\n");
    let sni = host.split(':').next().unwrap_or(host).to_ascii_lowercase();
    let sni = if integration::TEST_HOSTS.contains(&sni.as_str()) {
        sni
    } else {
        APP_HOST.to_string()
    };
    raw_request(stack, &sni, req).await
}

// ------------------------------------------------------------------------------------------------
// Login steps
// ------------------------------------------------------------------------------------------------

/// Whether `r` is the filter's 302 to the IdP's authorization endpoint.
pub fn is_login_redirect(stack: &Stack, r: &Resp) -> bool {
    r.status == 302
        && r.location()
            .is_some_and(|l| l.as_str().starts_with(&stack.authorize_endpoint()))
}

/// Same as [`is_login_redirect`] for a raw answer.
pub fn raw_is_login_redirect(stack: &Stack, r: &RawResp) -> bool {
    r.status == 302
        && r.header("location")
            .is_some_and(|l| l.starts_with(&stack.authorize_endpoint()))
}

/// GET `path` on the app host: must be the login redirect.
pub async fn start(stack: &Stack, b: &Browser, path: &str) -> Resp {
    let r = b.get(&stack.url(path)).await;
    assert!(
        is_login_redirect(stack, &r),
        "login start: {}",
        r.describe()
    );
    r
}

/// From the gateway's 302 to the IdP: sign in at the IdP; returns the IdP's 302 to the callback
/// (not followed).
pub async fn sign_in(b: &Browser, start: &Resp) -> Resp {
    let page = b.follow_one(start).await;
    let r = if page.status == 302 {
        page // the IdP remembered the browser's login session
    } else {
        assert_eq!(page.status, 200, "IdP login page: {}", page.describe());
        b.submit_login(&page, USERNAME, PASSWORD).await
    };
    assert_eq!(
        r.status,
        302,
        "IdP redirect to the callback: {}",
        r.describe()
    );
    r
}

/// Start a login for `path` and sign in at the IdP; returns (start, IdP redirect to callback).
pub async fn to_callback(stack: &Stack, b: &Browser, path: &str) -> (Resp, Resp) {
    let s = start(stack, b, path).await;
    let cb = sign_in(b, &s).await;
    (s, cb)
}

/// Value of a query parameter of a URL.
pub fn param(url: &url::Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Whether the response sets a live (non-deleting) session cookie.
pub fn sets_session(r: &Resp) -> bool {
    r.set_cookies().iter().any(|c| {
        c.starts_with(&format!("{SESSION_COOKIE}="))
            && !c.starts_with(&format!("{SESSION_COOKIE}=;"))
            && !c.contains("Max-Age=0")
    })
}

/// Whether the response deletes the cookie `name`.
pub fn deletes(r: &Resp, name: &str) -> bool {
    r.set_cookies()
        .iter()
        .any(|c| c.starts_with(&format!("{name}=;")) && c.contains("Max-Age=0"))
}

/// Whether the response sets any live login cookie.
pub fn sets_login_cookie(r: &Resp) -> bool {
    r.set_cookies()
        .iter()
        .any(|c| c.starts_with(LOGIN_COOKIE_PREFIX) && !c.contains("Max-Age=0"))
}

// ------------------------------------------------------------------------------------------------
// The outcome of every hostile case
// ------------------------------------------------------------------------------------------------

/// Counters before a case, to assert what the case caused.
#[derive(Clone, Copy, Debug)]
pub struct Before {
    pub upstream: usize,
    pub token: u64,
    pub jwks: u64,
    pub discovery: u64,
}

/// Snapshot the counters.
pub fn snapshot(stack: &Stack) -> Before {
    let st = stack.idp.stats();
    Before {
        upstream: stack.upstream.count(),
        token: st.token,
        jwks: st.jwks,
        discovery: st.discovery,
    }
}

/// The case was refused with `status`: no session cookie, nothing upstream, exactly
/// `token_calls` token endpoint calls since `b`.
pub fn assert_refused(
    stack: &Stack,
    what: &str,
    r: &Resp,
    status: u16,
    b: Before,
    token_calls: u64,
) {
    assert_eq!(r.status, status, "{what}: {}", r.describe());
    assert!(
        !sets_session(r),
        "{what}: no session cookie: {}",
        r.describe()
    );
    assert_eq!(
        stack.upstream.count(),
        b.upstream,
        "{what}: nothing reached the upstream"
    );
    assert_eq!(
        stack.idp.stats().token - b.token,
        token_calls,
        "{what}: token endpoint calls"
    );
}

/// Envoy's log shows no panic or wasm trap (the filter never crashed).
pub fn assert_no_crash(stack: &Stack) {
    let log = stack.envoy.log();
    for line in log.lines() {
        let bad = line.contains("panicked")
            || line.contains("wasm trap")
            || line.contains("RuntimeError")
            || (line.contains("Function: ") && line.contains(" failed"));
        assert!(!bad, "the filter crashed: {line}");
    }
}

/// Envoy's heap as reported by admin `/memory`: (allocated, heap_size) in bytes.
pub async fn envoy_memory(stack: &Stack) -> (u64, u64) {
    let (_, body) = stack
        .envoy
        .admin_get("/memory")
        .await
        .expect("admin /memory");
    let v: serde_json::Value = serde_json::from_str(&body).expect("memory JSON");
    let num = |k: &str| {
        v[k].as_str()
            .and_then(|s| s.parse().ok())
            .or_else(|| v[k].as_u64())
            .unwrap_or(0)
    };
    (num("allocated"), num("heap_size"))
}

// ------------------------------------------------------------------------------------------------
// A proxy in front of the mock IdP: token-endpoint faults below HTTP (slow body, TCP reset) and a
// log of every request Envoy sent to the IdP cluster.
// ------------------------------------------------------------------------------------------------

/// What the proxy does with `POST .../token`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward to the mock IdP.
    Pass,
    /// Answer `200` at once with a large `Content-Length`, then one body byte per interval.
    DribbleToken(Duration),
    /// Reset the TCP connection (RST) when the token request arrives.
    ResetToken,
}

struct ProxyState {
    target: Option<SocketAddr>,
    mode: ProxyMode,
    /// Request heads (request line + headers) in arrival order.
    log: Vec<String>,
}

/// A tiny HTTP/1.1 proxy between Envoy's IdP cluster and the mock IdP. Start it before the stack
/// ([`IdpProxy::start`]), point the cluster at it with [`IdpProxy::tweak`], then
/// [`IdpProxy::set_target`] the mock IdP once the stack is up.
#[derive(Clone)]
pub struct IdpProxy {
    port: u16,
    state: Arc<std::sync::Mutex<ProxyState>>,
}

impl IdpProxy {
    /// Listen on 127.0.0.1:0.
    pub async fn start() -> IdpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let state = Arc::new(std::sync::Mutex::new(ProxyState {
            target: None,
            mode: ProxyMode::Pass,
            log: Vec::new(),
        }));
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = proxy_connection(sock, st).await;
                });
            }
        });
        IdpProxy { port, state }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProxyState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A [`integration::stack::StackOptions::tweak`] that points the IdP cluster at the proxy.
    pub fn tweak(&self) -> integration::stack::GatewayTweak {
        let port = self.port;
        Arc::new(move |gw: &mut integration::GatewayConfig| gw.idp_endpoint_port = port)
    }

    /// Where to forward (the mock IdP).
    pub fn set_target(&self, addr: SocketAddr) {
        self.lock().target = Some(addr);
    }

    /// Token request handling.
    pub fn set_mode(&self, mode: ProxyMode) {
        self.lock().mode = mode;
    }

    /// Request heads seen so far.
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    /// Request lines (`METHOD path HTTP/1.1`) seen so far.
    pub fn request_lines(&self) -> Vec<String> {
        self.log()
            .iter()
            .map(|h| h.lines().next().unwrap_or_default().to_string())
            .collect()
    }
}

async fn read_head<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<usize>> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(end + 4));
        }
        let mut chunk = [0u8; 8192];
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn read_message<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    let Some(head_len) = read_head(r, buf).await? else {
        return Ok(None);
    };
    let total = head_len + content_length(&buf[..head_len]);
    while buf.len() < total {
        let mut chunk = [0u8; 8192];
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let rest = buf.split_off(total);
    Ok(Some(std::mem::replace(buf, rest)))
}

async fn proxy_connection(
    mut sock: tokio::net::TcpStream,
    st: Arc<std::sync::Mutex<ProxyState>>,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut buf = Vec::new();
    loop {
        let Some(req) = read_message(&mut sock, &mut buf).await? else {
            return Ok(());
        };
        let head_end = req
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(req.len());
        let head = String::from_utf8_lossy(&req[..head_end]).into_owned();
        let line = head.lines().next().unwrap_or_default().to_string();
        let is_token = line.starts_with("POST ")
            && line
                .split(' ')
                .nth(1)
                .is_some_and(|p| p.split('?').next().unwrap_or("").ends_with("/token"));
        let (mode, target) = {
            let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
            s.log.push(head);
            (s.mode, s.target)
        };
        match (is_token, mode) {
            (true, ProxyMode::ResetToken) => {
                #[allow(deprecated)]
                let _ = sock.set_linger(Some(Duration::ZERO));
                return Ok(());
            }
            (true, ProxyMode::DribbleToken(every)) => {
                sock.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{",
                )
                .await?;
                for _ in 0..100_000 {
                    tokio::time::sleep(every).await;
                    sock.write_all(b" ").await?;
                }
                return Ok(());
            }
            _ => {}
        }
        let Some(target) = target else {
            sock.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                .await?;
            continue;
        };
        let mut up = tokio::net::TcpStream::connect(target).await?;
        up.write_all(&req).await?;
        let mut ubuf = Vec::new();
        let Some(resp) = read_message(&mut up, &mut ubuf).await? else {
            return Ok(());
        };
        sock.write_all(&resp).await?;
    }
}

/// A TCP listener that only counts connections (a `jku`/`x5u` target that must never be
/// contacted).
pub struct Tripwire {
    pub addr: SocketAddr,
    hits: Arc<std::sync::atomic::AtomicUsize>,
}

impl Tripwire {
    pub async fn start() -> Tripwire {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind tripwire");
        let addr = listener.local_addr().expect("tripwire addr");
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        tokio::spawn(async move {
            while let Ok((_sock, _)) = listener.accept().await {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        Tripwire { addr, hits }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Send `GET <target>` (like [`raw_get`]) and close the connection after `wait` without reading
/// the answer: a client that goes away mid-request.
pub async fn raw_get_and_leave(stack: &Stack, target: &[u8], extra: &[&str], wait: Duration) {
    let mut req = Vec::new();
    req.extend_from_slice(b"GET ");
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    req.extend_from_slice(APP_HOST.as_bytes());
    req.extend_from_slice(b"\r\nAccept: text/html\r\nSec-Fetch-Mode: navigate\r\n");
    for h in extra {
        req.extend_from_slice(h.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    let addr = stack.gateway_addr();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let server_name = ServerName::try_from(APP_HOST.to_string())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let conn = rustls::ClientConnection::new(tls_config(), server_name)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        tls.write_all(&req)?;
        tls.flush()?;
        std::thread::sleep(wait);
        let _ = tls.sock.shutdown(std::net::Shutdown::Both);
        Ok(())
    })
    .await
    .expect("leaver task")
    .expect("leaver request");
}
