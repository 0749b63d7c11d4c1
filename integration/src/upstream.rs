//! A header-echo upstream standing in for httpbin: it answers every path with
//! `{"method","path","headers":{...}}` (`/headers` answers httpbin-style `{"headers":{...}}`) and
//! records each request so tests can assert on what reached the app and how often.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::Router;
use serde_json::{json, Map, Value};

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    /// Method.
    pub method: String,
    /// Path and query as received.
    pub path: String,
    /// Headers in arrival order, names lowercase.
    pub headers: Vec<(String, String)>,
    /// The request body (up to 1 MiB).
    pub body: Vec<u8>,
    /// Trailers after the body (HTTP/2), names lowercase.
    pub trailers: Vec<(String, String)>,
}

impl SeenRequest {
    /// All values of a header (name case-insensitive).
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_all(name).into_iter().next()
    }

    /// Headers as `{name: value}` or `{name: [values]}` when repeated.
    pub fn headers_json(&self) -> Value {
        let mut m = Map::new();
        for (k, v) in &self.headers {
            match m.get_mut(k) {
                None => {
                    m.insert(k.clone(), Value::String(v.clone()));
                }
                Some(Value::Array(a)) => a.push(Value::String(v.clone())),
                Some(old) => {
                    let first = old.take();
                    *old = Value::Array(vec![first, Value::String(v.clone())]);
                }
            }
        }
        Value::Object(m)
    }
}

type Log = Arc<Mutex<Vec<SeenRequest>>>;

/// The running upstream. Stops when dropped.
pub struct Upstream {
    addr: SocketAddr,
    log: Log,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Bind 127.0.0.1:0 and serve.
    pub async fn start() -> std::io::Result<Upstream> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let log: Log = Arc::default();
        let app = Router::new().fallback(echo).with_state(log.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Upstream { addr, log, task })
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// How many requests arrived.
    pub fn count(&self) -> usize {
        self.log.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// The most recent request.
    pub fn last(&self) -> Option<SeenRequest> {
        self.log.lock().ok().and_then(|l| l.last().cloned())
    }

    /// Forget recorded requests.
    pub fn clear(&self) {
        if let Ok(mut l) = self.log.lock() {
            l.clear();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(State(log): State<Log>, req: Request) -> Response {
    use http_body_util::BodyExt;
    let (parts, body) = req.into_parts();
    let (body, trailers) = match http_body_util::Limited::new(body, 1 << 20).collect().await {
        Ok(collected) => {
            let trailers = collected
                .trailers()
                .map(|t| {
                    t.iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().to_string(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            (collected.to_bytes().to_vec(), trailers)
        }
        Err(_) => (Vec::new(), Vec::new()),
    };
    let req = Request::from_parts(parts, Body::empty());
    let seen = SeenRequest {
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| req.uri().path().to_string()),
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
        body,
        trailers,
    };
    let body = if req.uri().path() == "/headers" {
        json!({ "headers": seen.headers_json() })
    } else {
        json!({ "method": seen.method, "path": seen.path, "headers": seen.headers_json() })
    };
    if let Ok(mut l) = log.lock() {
        l.push(seen);
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}
