//! The whole test stack: mock IdP (in-process) + header-echo upstream + Envoy configured like an
//! Istio ingress gateway running the oidc-gate wasm module.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use mock_idp::{Fault, MockIdp, MockIdpConfig};
use serde_json::{json, Value};

use crate::browser::{Browser, Mode, Resp};
use crate::config::{self, Delivery, GatewayConfig, GATEWAY_LISTENER};
use crate::envoy::{Envoy, EnvoyOptions};
use crate::upstream::Upstream;
use crate::{random_bytes, require_wasm, tls, TEST_HOSTS};

/// The protected host used by default.
pub const APP_HOST: &str = "app.example.com";
/// A host the filter does not protect.
pub const OTHER_HOST: &str = "other.example.com";
/// Client credentials registered at the mock IdP by default.
pub const CLIENT_ID: &str = "oidc-gate";
/// See [`CLIENT_ID`].
pub const CLIENT_SECRET: &str = "oidc-gate-secret";
/// Mock IdP user.
pub const USERNAME: &str = "admin";
/// Mock IdP password.
pub const PASSWORD: &str = "password";
/// Session cookie name (docs/CONTRACT.md).
pub const SESSION_COOKIE: &str = "__Host-oidc-gate";
/// Login (per-flow) cookie prefix (docs/CONTRACT.md).
pub const LOGIN_COOKIE_PREFIX: &str = "__Host-oidc-gate-login-";

/// A hook to edit the generated gateway config before it is written.
pub type GatewayTweak = Arc<dyn Fn(&mut GatewayConfig) + Send + Sync>;

/// What to vary per test.
#[derive(Clone)]
pub struct StackOptions {
    /// JSON merge patch applied to the default filter config (`null` removes a key).
    pub config_patch: Value,
    /// Use this exact `configuration` string instead of the generated one (bad-config tests).
    pub raw_plugin_config: Option<String>,
    /// Pass numbers as doubles, as Istio does (default true).
    pub numbers_as_floats: bool,
    /// Inline (default) or ECDS delivery.
    pub delivery: Delivery,
    /// Envoy `--concurrency` (default 2).
    pub concurrency: u32,
    /// Mock IdP settings (`addr` is always 127.0.0.1:0).
    pub idp: MockIdpConfig,
    /// Fault set on the mock IdP before Envoy starts.
    pub idp_fault: Option<Fault>,
    /// Point the IdP cluster at a closed port (IdP unreachable).
    pub idp_unreachable: bool,
    /// Extra WASI env vars (merged over the defaults; an empty value removes one).
    pub env: BTreeMap<String, String>,
    /// Wait for Envoy's admin `/ready` and the listener (default true).
    pub wait_ready: bool,
    /// Edit the gateway config (extra clusters/listeners, failure policy, …).
    pub tweak: Option<GatewayTweak>,
    /// Put the wasm filter in the chain (default true; false = plain gateway, harness self-tests).
    pub with_filter: bool,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            config_patch: json!({}),
            raw_plugin_config: None,
            numbers_as_floats: true,
            delivery: Delivery::Inline,
            concurrency: 2,
            idp: MockIdpConfig::default(),
            idp_fault: None,
            idp_unreachable: false,
            env: BTreeMap::new(),
            wait_ready: true,
            tweak: None,
            with_filter: true,
        }
    }
}

impl StackOptions {
    /// Merge `patch` into the filter config.
    pub fn with_config(mut self, patch: Value) -> Self {
        config::merge(&mut self.config_patch, &patch);
        self
    }

    /// Deliver the filter over file ECDS.
    pub fn ecds(mut self) -> Self {
        self.delivery = Delivery::Ecds;
        self
    }
}

/// Steps of one browser login, as returned by [`Stack::login`].
#[derive(Clone, Debug)]
pub struct LoginFlow {
    /// The first, unauthenticated request (302 to the IdP).
    pub start: Resp,
    /// The IdP's login page.
    pub login_page: Resp,
    /// The IdP's answer to the form POST (302 to the callback).
    pub idp_redirect: Resp,
    /// The gateway's callback answer (302 back to the original URL).
    pub callback: Resp,
    /// The original URL, now authenticated (normally the upstream's 200).
    pub landed: Resp,
}

/// A running stack. Field drop order stops Envoy first.
pub struct Stack {
    /// Envoy.
    pub envoy: Envoy,
    /// The mock IdP.
    pub idp: MockIdp,
    /// The header-echo upstream.
    pub upstream: Upstream,
    /// The gateway config as written.
    pub gateway: GatewayConfig,
    /// The filter config (before Istio normalisation); `None` when a raw string was used.
    pub filter_config: Option<Value>,
    /// The exact plugin configuration string given to Envoy.
    pub plugin_config: String,
    /// The cookie secret given via `OIDC_COOKIE_SECRET`.
    pub cookie_secret: String,
    ecds_version: std::sync::atomic::AtomicU64,
    dir: Option<tempfile::TempDir>,
}

impl Stack {
    /// Start with default options.
    pub async fn start_default() -> Stack {
        Self::start(StackOptions::default()).await
    }

    /// Start mock IdP, upstream and Envoy. Panics with the Envoy log if Envoy does not come up.
    pub async fn start(opts: StackOptions) -> Stack {
        match Self::start_inner(opts, true).await {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`Stack::start`], but an Envoy that exits or never gets ready is an `Err` carrying
    /// the reason and the tail of its log (for tests that expect Envoy to refuse a config).
    pub async fn try_start(opts: StackOptions) -> Result<Stack, String> {
        Self::start_inner(opts, false).await
    }

    async fn start_inner(opts: StackOptions, keep_on_error: bool) -> Result<Stack, String> {
        let wasm = if opts.with_filter {
            require_wasm()
        } else {
            crate::wasm_path()
        };
        let dir = tempfile::Builder::new()
            .prefix("oidc-gate-integ-")
            .tempdir()
            .expect("temp dir");
        let mut idp_cfg = opts.idp.clone();
        idp_cfg.addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let idp = MockIdp::start(idp_cfg).await.expect("start mock-idp");
        if let Some(f) = &opts.idp_fault {
            idp.set_fault(f.clone());
        }
        let upstream = Upstream::start().await.expect("start upstream");
        let cert = tls::write_self_signed(dir.path());
        let mut gw = GatewayConfig::new(wasm, cert, upstream.addr().port(), idp.addr().port());
        gw.delivery = opts.delivery;
        gw.wasm_filter = opts.with_filter;
        if opts.idp_unreachable {
            gw.idp_endpoint_port = crate::envoy::free_port();
        }

        let cookie_secret = STANDARD.encode(random_bytes(32));
        gw.env
            .insert("OIDC_CLIENT_SECRET".into(), CLIENT_SECRET.into());
        gw.env
            .insert("OIDC_COOKIE_SECRET".into(), cookie_secret.clone());
        for (k, v) in &opts.env {
            if v.is_empty() {
                gw.env.remove(k);
            } else {
                gw.env.insert(k.clone(), v.clone());
            }
        }

        let (filter_config, plugin_config) = match &opts.raw_plugin_config {
            Some(raw) => (None, raw.clone()),
            None => {
                let mut c = default_filter_config(&idp.issuer(), &gw.idp_cluster());
                config::merge(&mut c, &opts.config_patch);
                let s = if opts.numbers_as_floats {
                    config::istio_plugin_json(&c)
                } else {
                    serde_json::to_string(&config::istio_normalize_keys_only(&c))
                        .expect("serialize")
                };
                (Some(c), s)
            }
        };
        gw.plugin_config = Some(plugin_config.clone());
        if let Some(t) = &opts.tweak {
            t(&mut gw);
        }

        let bootstrap = gw.write(dir.path());
        let eopts = EnvoyOptions {
            concurrency: opts.concurrency,
            wait_ready: opts.wait_ready,
            ..EnvoyOptions::default()
        };
        let envoy = match Envoy::start(&bootstrap, dir.path(), &eopts).await {
            Ok(e) => e,
            Err(e) if keep_on_error => {
                let kept = dir.keep();
                return Err(format!(
                    "Envoy did not start (files kept in {}): {e}",
                    kept.display()
                ));
            }
            Err(e) => return Err(format!("Envoy did not start: {e}")),
        };
        Ok(Stack {
            envoy,
            idp,
            upstream,
            gateway: gw,
            filter_config,
            plugin_config,
            cookie_secret,
            ecds_version: std::sync::atomic::AtomicU64::new(1),
            dir: Some(dir),
        })
    }

    /// The per-test directory (config, certificate, logs).
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("."))
    }

    /// Where the gateway listener is bound.
    pub fn gateway_addr(&self) -> SocketAddr {
        self.envoy
            .listener(GATEWAY_LISTENER)
            .expect("gateway listener bound")
    }

    /// A browser (navigation mode) resolving the test hosts to the gateway.
    pub fn browser(&self) -> Browser {
        Browser::new(self.gateway_addr(), TEST_HOSTS, Mode::Navigation)
    }

    /// A browser that speaks HTTP/1.1 only (ALPN `http/1.1`).
    pub fn browser_http1(&self) -> Browser {
        Browser::with_options(self.gateway_addr(), TEST_HOSTS, Mode::Navigation, true)
    }

    /// An API client (`Accept: application/json`, no `Sec-Fetch-*`).
    pub fn api_client(&self) -> Browser {
        Browser::new(self.gateway_addr(), TEST_HOSTS, Mode::Api)
    }

    /// `https://app.example.com<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("https://{APP_HOST}{path}")
    }

    /// `https://<host><path>`.
    pub fn url_for(&self, host: &str, path: &str) -> String {
        format!("https://{host}{path}")
    }

    /// The mock IdP's authorization endpoint URL.
    pub fn authorize_endpoint(&self) -> String {
        format!("{}/authorize", self.idp.issuer())
    }

    /// The mock IdP's end-session endpoint URL.
    pub fn logout_endpoint(&self) -> String {
        format!("{}/logout", self.idp.issuer())
    }

    /// Log in through the gateway: GET `url` (expects 302 to the IdP), load the login page, submit
    /// the default user, follow the callback and the redirect back. Asserts each step's status.
    pub async fn login(&self, browser: &Browser, url: &str) -> LoginFlow {
        let start = browser.get(url).await;
        assert_eq!(start.status, 302, "start: {}", start.describe());
        let loc = start.location().expect("location");
        assert!(
            loc.as_str().starts_with(&self.authorize_endpoint()),
            "start should redirect to the IdP: {}",
            start.describe()
        );
        self.login_from(browser, start).await
    }

    /// Continue a login from the gateway's 302 to the IdP.
    pub async fn login_from(&self, browser: &Browser, start: Resp) -> LoginFlow {
        let login_page = browser.follow_one(&start).await;
        assert_eq!(
            login_page.status,
            200,
            "login page: {}",
            login_page.describe()
        );
        let idp_redirect = browser.submit_login(&login_page, USERNAME, PASSWORD).await;
        assert_eq!(
            idp_redirect.status,
            302,
            "login POST: {}",
            idp_redirect.describe()
        );
        let callback = browser.follow_one(&idp_redirect).await;
        assert_eq!(callback.status, 302, "callback: {}", callback.describe());
        let landed = browser.follow_one(&callback).await;
        LoginFlow {
            start,
            login_page,
            idp_redirect,
            callback,
            landed,
        }
    }

    /// ECDS delivery only: write a new filter config (JSON merge patch over the current one, or a
    /// raw string) as the next ECDS version.
    pub fn push_plugin_config(&self, plugin_config: &str) -> u64 {
        assert_eq!(self.gateway.delivery, Delivery::Ecds, "needs ECDS delivery");
        let v = self
            .ecds_version
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let mut gw = self.gateway.clone();
        gw.plugin_config = Some(plugin_config.to_string());
        config::write_atomic(&self.dir().join("ecds.json"), &gw.ecds_resource(v));
        v
    }

    /// ECDS delivery only: replace the filter with any typed_config (e.g.
    /// [`GatewayConfig::rbac_deny_all`]).
    pub fn push_ecds_typed_config(&self, typed_config: Value) -> u64 {
        assert_eq!(self.gateway.delivery, Delivery::Ecds, "needs ECDS delivery");
        let v = self
            .ecds_version
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        config::write_atomic(
            &self.dir().join("ecds.json"),
            &self.gateway.ecds_resource_with(v, typed_config),
        );
        v
    }

    /// Path of the Envoy access log.
    pub fn access_log_path(&self) -> PathBuf {
        self.dir().join("access.log")
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("INTEG_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("test files kept in {}", d.keep().display());
            }
        }
    }
}

/// The default filter config for a running IdP.
pub fn default_filter_config(issuer: &str, idp_cluster: &str) -> Value {
    json!({
        "issuer": issuer,
        "idp_cluster": idp_cluster,
        "client_id": CLIENT_ID,
        "client_secret_env": "OIDC_CLIENT_SECRET",
        "cookie_secret_env": "OIDC_COOKIE_SECRET",
        "hosts": [APP_HOST, "*.apps.example.com"],
        "skip_paths": ["/healthz", "/public/"],
    })
}

/// Decode a JWT's payload (no verification).
pub fn jwt_payload(token: &str) -> Value {
    let part = token.split('.').nth(1).unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}
