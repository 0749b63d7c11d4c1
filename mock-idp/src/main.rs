//! `mock-idp` binary: see README.md for the flags.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use mock_idp::{ClientConfig, MockIdp, MockIdpConfig, SigningAlg, UserConfig};

const USAGE: &str = "\
usage: mock-idp [options]
  --addr HOST:PORT                 listen address (default 127.0.0.1:5556)
  --issuer URL                     issuer (default http://<addr>)
  --client ID:SECRET[:URI,...]     registered client, repeatable (default oidc-gate:oidc-gate-secret, any redirect URI)
  --post-logout-redirect-uri URI   allowed post-logout redirect URI for the last --client, repeatable
  --user USER:PASSWORD[:EMAIL]     user, repeatable (default admin:password:admin@example.com)
  --access-token-ttl SECS          (default 300)
  --id-token-ttl SECS              (default 300)
  --refresh-token-ttl SECS         (default 3600)
  --code-ttl SECS                  (default 60)
  --opaque-access-tokens           random opaque access tokens instead of JWTs
  --no-rotate-refresh-tokens       refresh tokens stay valid after use
  --access-token-audience AUD      aud of JWT access tokens (default api://oidc-gate-demo)
  --signing-alg RS256|ES256        (default RS256)
  -h, --help";

fn parse_args(args: Vec<String>) -> Result<MockIdpConfig, String> {
    let mut cfg = MockIdpConfig {
        addr: SocketAddr::from(([127, 0, 0, 1], 5556)),
        ..MockIdpConfig::default()
    };
    let mut clients: Vec<ClientConfig> = Vec::new();
    let mut users: Vec<UserConfig> = Vec::new();
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (flag, None),
        };
        let mut value = || -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let secs = |v: String| -> Result<Duration, String> {
            v.parse::<u64>()
                .map(Duration::from_secs)
                .map_err(|_| format!("{flag}: `{v}` is not a number of seconds"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--addr" => {
                let v = value()?;
                cfg.addr = v
                    .parse()
                    .map_err(|_| format!("--addr: `{v}` is not HOST:PORT"))?;
            }
            "--issuer" => cfg.issuer = Some(value()?),
            "--client" => {
                let v = value()?;
                let mut parts = v.splitn(3, ':');
                let id = parts.next().unwrap_or_default().to_string();
                let secret = parts
                    .next()
                    .ok_or("--client needs ID:SECRET[:REDIRECT_URI,...]")?
                    .to_string();
                if id.is_empty() {
                    return Err("--client: empty client id".into());
                }
                let redirect_uris = parts
                    .next()
                    .map(|u| {
                        u.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                clients.push(ClientConfig {
                    id,
                    secret,
                    redirect_uris,
                    post_logout_redirect_uris: Vec::new(),
                });
            }
            "--post-logout-redirect-uri" => {
                let v = value()?;
                if clients.is_empty() {
                    clients = cfg.clients.clone();
                }
                if let Some(c) = clients.last_mut() {
                    c.post_logout_redirect_uris.push(v);
                }
            }
            "--user" => {
                let v = value()?;
                let mut parts = v.splitn(3, ':');
                let username = parts.next().unwrap_or_default().to_string();
                let password = parts
                    .next()
                    .ok_or("--user needs USER:PASSWORD[:EMAIL]")?
                    .to_string();
                let email = parts
                    .next()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("{username}@example.com"));
                let groups = if username == "admin" {
                    vec!["admins".into(), "users".into()]
                } else {
                    vec!["users".into()]
                };
                let mut name = username.clone();
                if let Some(first) = name.get_mut(0..1) {
                    first.make_ascii_uppercase();
                }
                users.push(UserConfig {
                    username,
                    password,
                    email,
                    name,
                    groups,
                });
            }
            "--access-token-ttl" => cfg.access_token_ttl = secs(value()?)?,
            "--id-token-ttl" => cfg.id_token_ttl = secs(value()?)?,
            "--refresh-token-ttl" => cfg.refresh_token_ttl = secs(value()?)?,
            "--code-ttl" => cfg.code_ttl = secs(value()?)?,
            "--opaque-access-tokens" => cfg.opaque_access_tokens = true,
            "--no-rotate-refresh-tokens" => cfg.rotate_refresh_tokens = false,
            "--access-token-audience" => cfg.access_token_audience = value()?,
            "--signing-alg" => cfg.signing_alg = value()?.parse::<SigningAlg>()?,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if !clients.is_empty() {
        cfg.clients = clients;
    }
    if !users.is_empty() {
        cfg.users = users;
    }
    Ok(cfg)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cfg = match parse_args(std::env::args().skip(1).collect()) {
        Ok(cfg) => cfg,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("mock-idp: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let idp = match MockIdp::start(cfg).await {
        Ok(idp) => idp,
        Err(e) => {
            eprintln!("mock-idp: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "mock-idp listening on {}", idp.issuer());
        let _ = out.flush();
    }
    wait_for_signal().await;
    eprintln!("mock-idp: shutting down");
    idp.shutdown().await;
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_client_with_redirect_uris() {
        let cfg = parse_args(args(&[
            "--client",
            "app:s3cret:http://localhost:8080/cb,https://x.example/cb",
            "--user=bob:pw",
            "--signing-alg",
            "ES256",
            "--opaque-access-tokens",
        ]))
        .unwrap();
        assert_eq!(cfg.clients.len(), 1);
        assert_eq!(cfg.clients[0].id, "app");
        assert_eq!(cfg.clients[0].secret, "s3cret");
        assert_eq!(
            cfg.clients[0].redirect_uris,
            vec!["http://localhost:8080/cb", "https://x.example/cb"]
        );
        assert_eq!(cfg.users[0].email, "bob@example.com");
        assert_eq!(cfg.signing_alg, SigningAlg::Es256);
        assert!(cfg.opaque_access_tokens);
        assert_eq!(cfg.addr.port(), 5556);
    }

    #[test]
    fn defaults() {
        let cfg = parse_args(Vec::new()).unwrap();
        assert_eq!(cfg.clients[0].id, "oidc-gate");
        assert_eq!(cfg.users[0].username, "admin");
        assert!(parse_args(args(&["--bogus"])).is_err());
    }
}
