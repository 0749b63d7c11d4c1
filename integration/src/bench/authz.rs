//! The zero-work authorizer for the `ext_authz` scenario: an HTTP/1.1 server that answers
//! `200` with an empty body to every request, on its own thread with a single-threaded tokio
//! runtime (so it never waits behind the benchmark's own tasks).
//!
//! Why a hyper (axum) server and not a second Envoy with a `direct_response` listener: per
//! request hyper does less work than Envoy's HTTP connection manager, so this is the cheapest
//! authorizer there is: the `ext_authz` numbers are the best case of the oauth2-proxy design
//! (the real oauth2-proxy also decrypts and checks the session cookie).

use std::net::SocketAddr;
use std::thread::JoinHandle;

use axum::http::StatusCode;
use axum::Router;

/// A running authorizer; stopped on drop.
pub struct Authorizer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Authorizer {
    /// Bind 127.0.0.1:0 and serve on a new thread.
    pub fn start() -> std::io::Result<Authorizer> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-authz".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    let app = Router::new().fallback(|| async { StatusCode::OK });
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stopped.await;
                        })
                        .await;
                });
            })?;
        Ok(Authorizer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Authorizer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        // Graceful shutdown waits for open (keep-alive) connections; Envoy holds some, so do not
        // join here: the thread ends when they close.
        drop(self.thread.take());
    }
}
