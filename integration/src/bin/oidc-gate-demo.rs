//! `make demo`: the oidc-gate filter in a real Envoy configured like an Istio ingress gateway,
//! in front of a demo app that shows the forwarded token's claims, with the mock IdP (or an
//! external OpenID provider). See `HELP`.

use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use integration::config::{self, GatewayConfig};
use integration::demo_app::{DemoApp, DemoAppConfig};
use integration::envoy::{Envoy, EnvoyOptions};
use integration::{random_bytes, tls, wasm_path};
use mock_idp::{ClientConfig, MockIdp, MockIdpConfig};
use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};
use url::Url;

/// Where the gateway listens (plain HTTP: browsers treat http://localhost as a secure context,
/// so the filter's `__Host-`/`Secure` cookies work there).
const GATEWAY_PORT: u16 = 8080;
/// Where the mock IdP listens.
const IDP_PORT: u16 = 5556;
/// Istio's listener name for a gateway's HTTP port 8080.
const LISTENER: &str = "0.0.0.0_8080";
/// Default client of the mock IdP.
const DEFAULT_CLIENT_ID: &str = "oidc-gate";
const MOCK_CLIENT_SECRET: &str = "oidc-gate-secret";
/// System CA bundle (Debian/Ubuntu) used to verify an external IdP.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
const CALLBACK_PATH: &str = "/oauth2/callback";
const LOGOUT_PATH: &str = "/oauth2/sign_out";

const HELP: &str = "\
oidc-gate-demo: the oidc-gate filter in Envoy, configured like an Istio ingress gateway,
in front of a demo app that shows the claims of the token it receives.

USAGE:
    make demo                                   (= cargo run -p integration --bin oidc-gate-demo)
    make demo ISSUER=https://idp.example.com/realms/x CLIENT_ID=my-client
    oidc-gate-demo [--issuer URL] [--client-id ID]

Without --issuer it starts:
    mock-idp      http://127.0.0.1:5556 (issuer), client oidc-gate / oidc-gate-secret,
                  user admin / password
    demo app      127.0.0.1:<free port>: `/` shows the decoded Authorization token,
                  `/headers` echoes the request headers as JSON
    Envoy         http://localhost:8080 with the wasm filter (hosts: [\"localhost\"])
Then open http://localhost:8080/ and sign in as admin / password.
Sign out at http://localhost:8080/oauth2/sign_out.

OPTIONS:
    --issuer URL      Use this external OpenID provider instead of mock-idp (mock-idp is not
                      started). Its discovery document must be at URL/.well-known/openid-configuration.
                      The gateway gets a STRICT_DNS cluster named like Istio's,
                      `outbound|<port>||<issuer host>`, with TLS (auto_sni, SAN check, CA bundle
                      /etc/ssl/certs/ca-certificates.crt) for https issuers.
                      The client secret is read from the environment variable OIDC_CLIENT_SECRET
                      (required). Register the redirect URI http://localhost:8080/oauth2/callback
                      (and, for RP-initiated logout, any post-logout URI) with the IdP.
    --client-id ID    OAuth client id (default oidc-gate). Without --issuer the mock IdP
                      registers this client with the secret $OIDC_CLIENT_SECRET or oidc-gate-secret.
    -h, --help        This text.

Ports 8080 (gateway) and 5556 (mock-idp) are fixed; the demo stops with a message if either is
taken. Ctrl-C (SIGINT) or SIGTERM stops Envoy and everything else and exits 0.
Requires the built filter (make build) and an Envoy (make envoy; see integration/README.md).
";

#[derive(Debug, Default)]
struct Args {
    issuer: Option<String>,
    client_id: Option<String>,
}

enum Parsed {
    Run(Args),
    Help,
}

fn parse_args(argv: impl IntoIterator<Item = String>) -> Result<Parsed, String> {
    let mut args = Args::default();
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            match inline.clone().or_else(|| it.next()) {
                Some(v) if !v.is_empty() => Ok(v),
                _ => Err(format!("{name} needs a value (see --help)")),
            }
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "--issuer" => args.issuer = Some(value("--issuer")?),
            "--client-id" => args.client_id = Some(value("--client-id")?),
            other => return Err(format!("unknown argument `{other}` (see --help)")),
        }
    }
    Ok(Parsed::Run(args))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let parsed = match parse_args(std::env::args().skip(1)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("oidc-gate-demo: {e}");
            return ExitCode::from(2);
        }
    };
    let args = match parsed {
        Parsed::Help => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Parsed::Run(a) => a,
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("oidc-gate-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where the IdP is and how Envoy reaches it.
struct IdpTarget {
    issuer: String,
    cluster_name: String,
    /// The cluster to add (external IdP); `None` = the harness's static IdP cluster.
    cluster: Option<Value>,
    client_secret: String,
    /// Pass the secret from Envoy's own environment (`host_env_keys`) instead of writing it
    /// into the bootstrap.
    secret_from_host_env: bool,
}

fn ensure_port_free(port: u16, what: &str) -> Result<(), String> {
    TcpListener::bind(("127.0.0.1", port))
        .map(drop)
        .map_err(|e| {
            format!(
            "port {port} ({what}) is not free on 127.0.0.1: {e}. Is another `make demo` running? \
             Stop whatever listens there (`ss -ltnp 'sport = :{port}'`) and try again."
        )
        })
}

/// Turn the harness's TLS gateway listener into Istio's plain-HTTP `0.0.0.0_8080` on `port`.
fn make_plaintext_listener(bootstrap: &mut Value, port: u16) {
    let l = &mut bootstrap["static_resources"]["listeners"][0];
    l["name"] = json!(LISTENER);
    l["address"]["socket_address"]["port_value"] = json!(port);
    if let Some(m) = l.as_object_mut() {
        m.remove("listener_filters");
    }
    let chain = &mut l["filter_chains"][0];
    if let Some(m) = chain.as_object_mut() {
        m.remove("transport_socket");
    }
    let hcm = &mut chain["filters"][0]["typed_config"];
    hcm["stat_prefix"] = json!(format!("outbound_{LISTENER}"));
    if let Some(m) = hcm.as_object_mut() {
        m.remove("forward_client_cert_details");
        m.remove("set_current_client_cert_details");
    }
    hcm["route_config"]["name"] = json!(format!("http.{port}"));
    hcm["route_config"]["virtual_hosts"][0]["name"] = json!(format!("*:{port}"));
}

async fn run(args: Args) -> Result<(), String> {
    let wasm = wasm_path();
    if !wasm.is_file() {
        return Err(format!(
            "filter module {} is missing: run `make build` (or `make demo`, which builds it)",
            wasm.display()
        ));
    }
    // Handle Ctrl-C from here on: the cleanup below runs instead of dying half-started.
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;

    ensure_port_free(GATEWAY_PORT, "gateway")?;
    let client_id = args
        .client_id
        .clone()
        .unwrap_or_else(|| DEFAULT_CLIENT_ID.into());
    let env_secret = std::env::var("OIDC_CLIENT_SECRET")
        .ok()
        .filter(|s| !s.is_empty());

    // The IdP: mock-idp in-process, or an external one.
    let mut idp: Option<MockIdp> = None;
    let target = match &args.issuer {
        None => {
            ensure_port_free(IDP_PORT, "mock-idp")?;
            let issuer = format!("http://127.0.0.1:{IDP_PORT}");
            let secret = env_secret.unwrap_or_else(|| MOCK_CLIENT_SECRET.into());
            let cfg = MockIdpConfig {
                issuer: Some(issuer.clone()),
                addr: SocketAddr::from(([127, 0, 0, 1], IDP_PORT)),
                clients: vec![ClientConfig {
                    id: client_id.clone(),
                    secret: secret.clone(),
                    redirect_uris: vec![format!("http://localhost:{GATEWAY_PORT}{CALLBACK_PATH}")],
                    post_logout_redirect_uris: Vec::new(),
                }],
                ..MockIdpConfig::default()
            };
            let started = MockIdp::start(cfg)
                .await
                .map_err(|e| format!("mock-idp could not listen on 127.0.0.1:{IDP_PORT}: {e}"))?;
            idp = Some(started);
            IdpTarget {
                issuer,
                cluster_name: config::idp_cluster_name(IDP_PORT),
                cluster: None,
                client_secret: secret,
                secret_from_host_env: false,
            }
        }
        Some(raw) => {
            let url = Url::parse(raw).map_err(|e| format!("--issuer `{raw}`: {e}"))?;
            if !matches!(url.scheme(), "https" | "http") {
                return Err(format!("--issuer `{raw}` must be an https URL"));
            }
            let secret = env_secret.ok_or(
                "--issuer needs the client secret in the environment variable OIDC_CLIENT_SECRET",
            )?;
            let (cluster_name, cluster) = config::external_issuer_cluster(&url, CA_BUNDLE)?;
            IdpTarget {
                issuer: raw.clone(),
                cluster_name,
                cluster: Some(cluster),
                client_secret: secret,
                secret_from_host_env: true,
            }
        }
    };

    let app = DemoApp::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        DemoAppConfig {
            client_id: client_id.clone(),
            logout_path: LOGOUT_PATH.into(),
        },
    )
    .await
    .map_err(|e| format!("demo app: {e}"))?;

    let dir = tempfile::Builder::new()
        .prefix("oidc-gate-demo-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    // The harness's config writer wants a serving certificate; the demo listener is plain HTTP.
    let cert = tls::write_self_signed(dir.path());
    let mut gw = GatewayConfig::new(wasm, cert, app.addr().port(), IDP_PORT);
    gw.env.insert(
        "OIDC_COOKIE_SECRET".into(),
        STANDARD.encode(random_bytes(32)),
    );
    if target.secret_from_host_env {
        gw.host_env_keys.push("OIDC_CLIENT_SECRET".into());
    } else {
        gw.env
            .insert("OIDC_CLIENT_SECRET".into(), target.client_secret.clone());
    }
    let filter_config = json!({
        "issuer": target.issuer,
        "idp_cluster": target.cluster_name,
        "client_id": client_id,
        "client_secret_env": "OIDC_CLIENT_SECRET",
        "cookie_secret_env": "OIDC_COOKIE_SECRET",
        "hosts": ["localhost"],
        "skip_paths": ["/healthz"],
        "claims_to_headers": {
            "x-auth-request-user": "sub",
            "x-auth-request-email": "email",
            "x-auth-request-preferred-username": "preferred_username",
        },
    });
    gw.plugin_config = Some(config::istio_plugin_json(&filter_config));

    let mut bootstrap = gw.bootstrap(None, &dir.path().join("access.log"));
    make_plaintext_listener(&mut bootstrap, GATEWAY_PORT);
    if let Some(cluster) = &target.cluster {
        let idp_static = gw.idp_cluster();
        if let Some(clusters) = bootstrap["static_resources"]["clusters"].as_array_mut() {
            clusters.retain(|c| c["name"] != json!(idp_static));
            clusters.push(cluster.clone());
        }
    }
    let bootstrap_path = dir.path().join("envoy.json");
    config::write_atomic(&bootstrap_path, &bootstrap);

    let opts = EnvoyOptions {
        listeners: vec![LISTENER.into()],
        ..EnvoyOptions::default()
    };
    let start = Envoy::start(&bootstrap_path, dir.path(), &opts);
    let mut envoy = tokio::select! {
        r = start => match r {
            Ok(e) => e,
            Err(e) => {
                let kept = dir.keep();
                return Err(format!(
                    "Envoy did not start (files kept in {}): {e}",
                    kept.display()
                ));
            }
        },
        _ = sigint.recv() => return Ok(()),
        _ = sigterm.recv() => return Ok(()),
    };

    let url = format!("http://localhost:{GATEWAY_PORT}/");
    match &idp {
        Some(_) => println!(
            "\noidc-gate demo is running.\n\n  \
             Open      {url}\n  \
             Sign in   admin / password\n  \
             IdP       mock-idp, issuer {} (client {client_id})\n",
            target.issuer
        ),
        None => println!(
            "\noidc-gate demo is running.\n\n  \
             Open      {url}\n  \
             Sign in   with your account at {}\n  \
             Client    {client_id} (redirect URI http://localhost:{GATEWAY_PORT}{CALLBACK_PATH})\n  \
             Cluster   {}\n",
            target.issuer, target.cluster_name
        ),
    }
    println!(
        "  Sign out  http://localhost:{GATEWAY_PORT}{LOGOUT_PATH}\n  \
         App       http://{} (the upstream; `/headers` = JSON)\n  \
         Envoy     admin http://{}, logs in {}\n\n\
         Press Ctrl-C to stop.",
        app.addr(),
        envoy.admin_addr(),
        dir.path().display()
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();

    let outcome = loop {
        tokio::select! {
            _ = sigint.recv() => break Ok("SIGINT"),
            _ = sigterm.recv() => break Ok("SIGTERM"),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if !envoy.is_running() {
                    break Err(format!("Envoy exited unexpectedly:\n{}", envoy.log_tail(40)));
                }
            }
        }
    };
    envoy.kill();
    drop(envoy);
    app.stop();
    if let Some(idp) = idp {
        idp.shutdown().await;
    }
    match outcome {
        Ok(sig) => {
            println!("\noidc-gate demo stopped ({sig}).");
            Ok(())
        }
        Err(e) => {
            let kept = dir.keep();
            Err(format!("{e}\n(files kept in {})", kept.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Parsed, String> {
        parse_args(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_flags() {
        match args(&["--issuer", "https://idp.example.com", "--client-id=x"]) {
            Ok(Parsed::Run(a)) => {
                assert_eq!(a.issuer.as_deref(), Some("https://idp.example.com"));
                assert_eq!(a.client_id.as_deref(), Some("x"));
            }
            _ => panic!("parse"),
        }
        assert!(matches!(args(&["-h"]), Ok(Parsed::Help)));
        assert!(args(&["--issuer"]).is_err());
        assert!(args(&["--bogus"]).is_err());
    }

    #[test]
    fn external_cluster_is_istio_named_with_tls() {
        let (name, c) = config::external_issuer_cluster(
            &Url::parse("https://idp.example.com/realms/x").unwrap(),
            CA_BUNDLE,
        )
        .expect("cluster");
        assert_eq!(name, "outbound|443||idp.example.com");
        assert_eq!(c["type"], "STRICT_DNS");
        assert_eq!(
            c["typed_extension_protocol_options"]
                ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
                ["upstream_http_protocol_options"]["auto_sni"],
            true
        );
        assert_eq!(
            c["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
                ["trusted_ca"]["filename"],
            CA_BUNDLE
        );
        let (name, c) = config::external_issuer_cluster(
            &Url::parse("http://127.0.0.1:5557").unwrap(),
            CA_BUNDLE,
        )
        .unwrap();
        assert_eq!(name, "outbound|5557||127.0.0.1");
        assert!(c.get("transport_socket").is_none());
    }
}
