//! `make bench`: oidc-gate's cost per request against bare Envoy, a no-op wasm filter, Envoy's
//! OAuth2 filter, `ext_authz` to a zero-work authorizer and `jwt_authn`, plus logins per second,
//! the refresh path, the module size, memory per 10,000 sessions and time to ready.
//!
//! Method (see [`run`]): every scenario gets its own Envoy (the same binary, `--concurrency 1`,
//! the Istio-shaped TLS gateway of [`crate::config`], route = `direct_response`, access log off,
//! log level `warn`), all started up front and idle while another is measured. Credentials come
//! from real logins against the in-process mock IdP; each scenario's request is checked once
//! (200 with credentials, not 200 without) before any load. Then, after a warm-up per scenario
//! (V8 tiers hot wasm code up in the background), rounds run the scenarios interleaved, in an
//! order rotated each round, each for the same `wrk` settings; every run is checked with the
//! Envoy's own counters (all responses 2xx, none 3xx/4xx/5xx). Medians over rounds are reported.

pub mod authz;
pub mod client;
pub mod extras;
pub mod perf;
pub mod report;
pub mod scenarios;
pub mod stages;
pub mod wrk;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use mock_idp::{MockIdp, MockIdpConfig};
use serde_json::{json, Value};

use crate::config::{write_atomic, GATEWAY_LISTENER};
use crate::envoy::{Envoy, EnvoyOptions};
use crate::stack::{APP_HOST, USERNAME};
use crate::tls::{self, CertFiles};
use crate::{random_bytes, repo_root};

pub use report::Report;
pub use scenarios::Scenario;
pub use wrk::{WrkRequest, WrkResult, WrkSettings};

use authz::Authorizer;
use client::median;
use scenarios::{ConfigInputs, ACCESS_TOKEN_AUDIENCE, BENCH_PATH, DIRECT_RESPONSE_BODY};

/// The wasm modules under test.
#[derive(Clone, Debug)]
pub struct WasmModules {
    /// oidc-gate (`make build`).
    pub oidc: PathBuf,
    /// The no-op filter (`integration/noop-filter`).
    pub noop: PathBuf,
    /// The no-op filter's configuration: extra work per request for calibration (`--noop-extra`).
    pub noop_extra: Option<String>,
    /// The other oidc-gate module of scenario (3b) (`--oidc-b`).
    pub oidc_b: Option<PathBuf>,
}

impl WasmModules {
    /// oidc-gate from [`crate::require_wasm`]; the no-op module built if needed
    /// ([`ensure_noop_wasm`]).
    pub fn locate() -> Result<WasmModules, String> {
        let oidc = crate::wasm_path();
        if !oidc.is_file() {
            return Err(format!(
                "filter module {} is missing: run `make build` first",
                oidc.display()
            ));
        }
        Ok(WasmModules {
            oidc,
            noop: ensure_noop_wasm()?,
            noop_extra: None,
            oidc_b: None,
        })
    }
}

/// `<repo>/target/wasm32-wasip1/release/noop_filter.wasm`, built with
/// `cargo build -p noop-filter --target wasm32-wasip1 --release --target-dir <repo>/target`
/// (quick when up to date). `$NOOP_FILTER_WASM` names a prebuilt module instead.
pub fn ensure_noop_wasm() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("NOOP_FILTER_WASM").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let root = repo_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "-q",
            "-p",
            "noop-filter",
            "--target",
            "wasm32-wasip1",
        ])
        .args(["--release", "--target-dir"])
        .arg(root.join("target"))
        .current_dir(&root)
        .output()
        .map_err(|e| format!("cargo build -p noop-filter: {e}"))?;
    let wasm = root.join("target/wasm32-wasip1/release/noop_filter.wasm");
    if !out.status.success() || !wasm.is_file() {
        return Err(format!(
            "cargo build -p noop-filter --target wasm32-wasip1 --release failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(wasm)
}

/// Sizes and counts of the extra measurements.
#[derive(Clone, Debug)]
pub struct ExtrasOptions {
    /// Full logins to drive (oidc-gate and Envoy OAuth2 each).
    pub logins: usize,
    /// Concurrent logins.
    pub login_concurrency: usize,
    /// Requests that each trigger a refresh.
    pub refreshes: usize,
    /// Distinct sessions per memory batch (two batches).
    pub sessions: usize,
    /// Envoy starts per kind for the time to ready.
    pub ready_repeats: usize,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Interleaved rounds.
    pub rounds: usize,
    /// Warm-up per scenario before the rounds (not measured).
    pub warmup: Duration,
    /// wrk settings (the same for every scenario).
    pub wrk: WrkSettings,
    /// Scenarios measured.
    pub scenarios: Vec<Scenario>,
    /// Envoy `--concurrency` of the throughput scenarios.
    pub concurrency: u32,
    /// The other measurements, if any.
    pub extras: Option<ExtrasOptions>,
    /// The IdP issues JWT access tokens (session cookie about 2.6 KB) instead of opaque ones
    /// (about 1.5 KB, the default).
    pub jwt_access_tokens: bool,
    /// Extra work per request for the no-op filter, e.g. `clock_reads=100` (calibration of host
    /// call and wasm loop costs; see integration/README.md).
    pub noop_extra: Option<String>,
    /// The other oidc-gate module, measured as scenario (3b) next to (3) (`--oidc-b`).
    pub oidc_b: Option<PathBuf>,
    /// Sets of Envoys the rounds are spread over, each started afresh (`--processes`): two Envoy
    /// processes with the same module differed by 4% in requests per second in one run, close to
    /// the targets' 5%, so medians over rounds of one process can be one process's luck.
    pub processes: usize,
    /// Sample each scenario's Envoy with Linux `perf` during the rounds, for its CPU time per
    /// request by kind of code ([`perf`]).
    pub perf: bool,
}

impl BenchOptions {
    /// The default run: 6 rounds × 8 scenarios × 5 s over 3 sets of Envoys, and every extra
    /// (about 7 minutes).
    pub fn full() -> BenchOptions {
        BenchOptions {
            rounds: 6,
            warmup: Duration::from_secs(2),
            wrk: WrkSettings {
                threads: 1,
                connections: 16,
                duration: Duration::from_secs(5),
                timeout: Duration::from_secs(5),
            },
            scenarios: Scenario::ALL.to_vec(),
            concurrency: 1,
            extras: Some(ExtrasOptions {
                logins: 200,
                login_concurrency: 8,
                refreshes: 200,
                sessions: 10_000,
                ready_repeats: 5,
            }),
            jwt_access_tokens: false,
            noop_extra: None,
            oidc_b: None,
            processes: 3,
            perf: false,
        }
    }

    /// `--quick`: 1 round × 2 s, smaller extras (a smoke check, not a measurement).
    pub fn quick() -> BenchOptions {
        let mut o = BenchOptions::full();
        o.rounds = 1;
        o.processes = 1;
        o.warmup = Duration::from_secs(1);
        o.wrk.duration = Duration::from_secs(2);
        o.extras = Some(ExtrasOptions {
            logins: 24,
            login_concurrency: 8,
            refreshes: 24,
            sessions: 4_000,
            ready_repeats: 1,
        });
        o
    }
}

/// Mock IdP settings for the benchmark: tokens live `ttl` (long enough that no session needs a
/// refresh during a run, unless the refresh path is what is measured). `opaque`: opaque access
/// tokens (as Google or Okta's org server issue) instead of JWTs; the session cookie is then
/// about 1.5 KB instead of 2.6 KB.
pub fn idp_config(ttl: Duration, opaque: bool) -> MockIdpConfig {
    MockIdpConfig {
        access_token_ttl: ttl,
        opaque_access_tokens: opaque,
        id_token_ttl: ttl.max(Duration::from_secs(300)),
        refresh_token_ttl: Duration::from_secs(3 * 3600),
        ..MockIdpConfig::default()
    }
}

/// Envoy options for measurements: log level `warn` (Istio's default), no wasm debug logging.
pub fn envoy_options(concurrency: u32, wait_ready: bool) -> EnvoyOptions {
    EnvoyOptions {
        concurrency,
        component_log_level: "wasm:warn".into(),
        log_level: "warn".into(),
        wait_ready,
        listeners: vec![GATEWAY_LISTENER.into()],
    }
}

/// Directory, mock IdP, certificate, secrets and authorizer shared by a set of Envoys.
pub struct Fixture {
    /// The mock IdP.
    pub idp: MockIdp,
    /// The zero-work authorizer.
    pub authz: Authorizer,
    /// Serving certificate.
    pub cert: CertFiles,
    /// oidc-gate cookie secret (base64).
    pub cookie_secret: String,
    /// Envoy OAuth2 HMAC secret.
    pub hmac_secret: String,
    /// Modules.
    pub wasm: WasmModules,
    dir: tempfile::TempDir,
}

impl Fixture {
    /// Start the IdP (with `idp`) and the authorizer; write the certificate.
    pub async fn start(wasm: &WasmModules, idp: MockIdpConfig) -> Result<Fixture, String> {
        let dir = tempfile::Builder::new()
            .prefix("oidc-gate-bench-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let idp = MockIdp::start(idp)
            .await
            .map_err(|e| format!("mock-idp: {e}"))?;
        let authz = Authorizer::start().map_err(|e| format!("authorizer: {e}"))?;
        let cert = tls::write_self_signed(dir.path());
        Ok(Fixture {
            idp,
            authz,
            cert,
            cookie_secret: STANDARD.encode(random_bytes(32)),
            hmac_secret: STANDARD.encode(random_bytes(32)),
            wasm: wasm.clone(),
            dir,
        })
    }

    /// The working directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `<issuer>/authorize`.
    pub fn authorize_endpoint(&self) -> String {
        format!("{}/authorize", self.idp.issuer())
    }

    /// Write the scenario's bootstrap into `<dir>/<name>/envoy.json`; returns that directory.
    pub fn write_bootstrap(&self, s: Scenario, name: &str) -> Result<PathBuf, String> {
        let sub = self.dir().join(name);
        std::fs::create_dir_all(&sub).map_err(|e| e.to_string())?;
        let issuer = self.idp.issuer();
        let jwks = self.idp.jwks();
        let inputs = ConfigInputs {
            oidc_wasm: &self.wasm.oidc,
            oidc_b_wasm: self.wasm.oidc_b.as_deref(),
            noop_wasm: &self.wasm.noop,
            noop_extra: self.wasm.noop_extra.as_deref(),
            cert: &self.cert,
            issuer: &issuer,
            idp_port: self.idp.addr().port(),
            jwks: &jwks,
            cookie_secret: &self.cookie_secret,
            hmac_secret: &self.hmac_secret,
            authz_port: self.authz.addr().port(),
        };
        write_atomic(
            &sub.join("envoy.json"),
            &scenarios::bootstrap(s, &inputs, &sub),
        );
        Ok(sub)
    }

    /// Start an Envoy for `s` (directory `<dir>/<name>`).
    pub async fn start_envoy(
        &self,
        s: Scenario,
        name: &str,
        opts: &EnvoyOptions,
    ) -> Result<Envoy, String> {
        let sub = self.write_bootstrap(s, name)?;
        Envoy::start(&sub.join("envoy.json"), &sub, opts)
            .await
            .map_err(|e| format!("{s}: Envoy did not start: {e}"))
    }
}

/// The checks made on a scenario's request before it is measured.
#[derive(Clone, Debug, Default)]
pub struct Verification {
    /// Status of the request with credentials (must be 200 from `direct_response`).
    pub status: u16,
    /// The body was the `direct_response` body.
    pub direct_response: bool,
    /// Status of the same request without credentials (authenticating scenarios; must not be 200).
    pub unauthenticated_status: Option<u16>,
    /// `ext_authz`: checks the authorizer allowed during the request (Envoy's `ext_authz.ok`;
    /// must be 1).
    pub authorizer_calls: Option<u64>,
}

impl Verification {
    /// Whether the checks passed.
    pub fn ok(&self) -> bool {
        self.status == 200
            && self.direct_response
            && self.unauthenticated_status.is_none_or(|s| s != 200)
            && self.authorizer_calls.is_none_or(|n| n == 1)
    }
}

/// Credentials obtained for the scenarios.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// `Cookie` header after a real oidc-gate login.
    pub session_cookie: String,
    /// `Cookie` header after a real login through Envoy's OAuth2 filter.
    pub oauth2_cookie: Option<String>,
    /// Names of the OAuth2 filter's cookies.
    pub oauth2_cookie_names: Vec<String>,
    /// The machine client's JWT.
    pub bearer: String,
}

/// The throughput lab: one Envoy per scenario plus the credentials.
pub struct Lab {
    /// Envoys by scenario (the oidc-gate session Envoy is always there: it mints the cookie).
    pub envoys: BTreeMap<Scenario, Envoy>,
    /// Each scenario's request.
    pub requests: BTreeMap<Scenario, WrkRequest>,
    /// Each scenario's pre-load check.
    pub verified: BTreeMap<Scenario, Verification>,
    /// Credentials.
    pub creds: Credentials,
    /// Shared pieces (dropped last).
    pub fixture: Fixture,
}

impl Lab {
    /// Start the Envoys for `scenarios`, log in, build and check every request.
    pub async fn start(
        wasm: &WasmModules,
        scenarios: &[Scenario],
        concurrency: u32,
        jwt_access_tokens: bool,
    ) -> Result<Lab, String> {
        let fixture = Fixture::start(
            wasm,
            idp_config(Duration::from_secs(3600), !jwt_access_tokens),
        )
        .await?;
        let mut needed: Vec<Scenario> = scenarios.to_vec();
        if !needed.contains(&Scenario::OidcSession) {
            needed.push(Scenario::OidcSession);
        }
        let opts = envoy_options(concurrency, true);
        let mut envoys = BTreeMap::new();
        for s in needed {
            let e = fixture.start_envoy(s, s.id(), &opts).await?;
            envoys.insert(s, e);
        }
        let gw = |s: Scenario| -> Result<std::net::SocketAddr, String> {
            envoys
                .get(&s)
                .and_then(|e| e.listener(GATEWAY_LISTENER))
                .ok_or_else(|| format!("{s}: no gateway listener"))
        };
        let url = format!("https://{APP_HOST}{BENCH_PATH}");
        let authorize = fixture.authorize_endpoint();

        let mut creds = Credentials {
            session_cookie: client::browser_login(
                gw(Scenario::OidcSession)?,
                &url,
                &authorize,
                true,
            )
            .await
            .map_err(|e| format!("oidc-gate login: {e}"))?
            .cookie,
            bearer: fixture.idp.mint_access_token(
                &mock_idp::subject_for(USERNAME),
                ACCESS_TOKEN_AUDIENCE,
                Duration::from_secs(3600),
            ),
            ..Credentials::default()
        };
        if envoys.contains_key(&Scenario::EnvoyOAuth2) {
            let login = client::browser_login(gw(Scenario::EnvoyOAuth2)?, &url, &authorize, true)
                .await
                .map_err(|e| format!("Envoy OAuth2 login: {e}"))?;
            creds.oauth2_cookie_names = login
                .browser
                .jar()
                .for_host(APP_HOST)
                .into_iter()
                .map(|c| c.name)
                .collect();
            creds.oauth2_cookie = Some(login.cookie);
        }

        let mut requests = BTreeMap::new();
        let mut verified = BTreeMap::new();
        for &s in scenarios {
            let addr = gw(s)?;
            let credential: (String, String) = if s.uses_bearer() {
                ("Authorization".into(), format!("Bearer {}", creds.bearer))
            } else if s == Scenario::EnvoyOAuth2 {
                (
                    "Cookie".into(),
                    creds.oauth2_cookie.clone().unwrap_or_default(),
                )
            } else {
                ("Cookie".into(), creds.session_cookie.clone())
            };
            let req = WrkRequest {
                url: format!("https://127.0.0.1:{}{BENCH_PATH}", addr.port()),
                headers: vec![("Host".into(), APP_HOST.into()), credential.clone()],
            };
            let authz_ok = || async {
                match envoys.get(&s) {
                    Some(e) if s == Scenario::ExtAuthz => Some(e.stat(EXT_AUTHZ_OK).await),
                    _ => None,
                }
            };
            let before = authz_ok().await;
            let mut v = verify(addr, &url, &credential, s.authenticates()).await?;
            v.authorizer_calls = match (before, authz_ok().await) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            };
            if !v.ok() {
                return Err(format!("{s}: request check failed: {v:?}"));
            }
            requests.insert(s, req);
            verified.insert(s, v);
        }
        Ok(Lab {
            envoys,
            requests,
            verified,
            creds,
            fixture,
        })
    }
}

/// One request with the credential (must be answered by `direct_response`), and one without
/// (must not be 200 when the scenario authenticates).
async fn verify(
    gateway: std::net::SocketAddr,
    url: &str,
    credential: &(String, String),
    authenticates: bool,
) -> Result<Verification, String> {
    let c = client::plain_client(gateway);
    let with = client::get(&c, url, std::slice::from_ref(credential)).await?;
    let unauthenticated_status = if authenticates {
        Some(client::get(&c, url, &[]).await?.status)
    } else {
        None
    };
    Ok(Verification {
        status: with.status,
        direct_response: with.body == DIRECT_RESPONSE_BODY,
        unauthenticated_status,
        authorizer_calls: None,
    })
}

/// One measured run of one scenario.
#[derive(Clone, Debug)]
pub struct RoundResult {
    /// Round number (0-based).
    pub round: usize,
    /// Position within the round.
    pub position: usize,
    /// wrk's numbers.
    pub wrk: WrkResult,
    /// 2xx responses counted by Envoy during the run.
    pub envoy_2xx: u64,
    /// Other responses (1xx/3xx/4xx/5xx) counted by Envoy during the run.
    pub envoy_other: u64,
    /// Envoy's CPU time (all threads, user + system) per response during the run, µs; `None`
    /// when /proc could not be read.
    pub envoy_cpu_us_per_request: Option<f64>,
    /// The Envoy process that served the run.
    pub envoy_pid: Option<u32>,
}

/// All runs of one scenario, and their medians.
#[derive(Clone, Debug)]
pub struct ScenarioResult {
    /// The scenario.
    pub scenario: Scenario,
    /// Bytes of the request head.
    pub request_bytes: usize,
    /// Bytes of the credential header value (cookie or `Bearer …`).
    pub credential_bytes: usize,
    /// Pre-load check.
    pub verified: Verification,
    /// Each round.
    pub rounds: Vec<RoundResult>,
    /// Envoy's CPU samples over all rounds, by kind of code (with `--perf`).
    pub cpu_samples: Option<perf::CpuSamples>,
}

impl ScenarioResult {
    fn values(&self, f: impl Fn(&WrkResult) -> f64) -> Vec<f64> {
        self.rounds.iter().map(|r| f(&r.wrk)).collect()
    }
    /// Median requests per second.
    pub fn rps(&self) -> f64 {
        median(&self.values(|w| w.rps))
    }
    /// Median p50 latency, µs.
    pub fn p50_us(&self) -> f64 {
        median(&self.values(|w| w.p50_us))
    }
    /// Median p99 latency, µs.
    pub fn p99_us(&self) -> f64 {
        median(&self.values(|w| w.p99_us))
    }
    /// Median of Envoy's CPU time per request, µs: on a machine that wrk shares, a steadier
    /// measure of the filter's cost than requests per second.
    pub fn cpu_us_per_request(&self) -> Option<f64> {
        let v: Vec<f64> = self
            .rounds
            .iter()
            .filter_map(|r| r.envoy_cpu_us_per_request)
            .collect();
        (!v.is_empty()).then(|| median(&v))
    }
    /// Lowest and highest rps over rounds.
    pub fn rps_range(&self) -> (f64, f64) {
        let v = self.values(|w| w.rps);
        (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(0.0, f64::max),
        )
    }
    /// 2xx responses over all rounds (Envoy's count).
    pub fn ok_responses(&self) -> u64 {
        self.rounds.iter().map(|r| r.envoy_2xx).sum()
    }
    /// Non-2xx responses over all rounds (Envoy's count) plus wrk's socket errors.
    pub fn bad_responses(&self) -> u64 {
        self.rounds
            .iter()
            .map(|r| r.envoy_other + r.wrk.socket_errors + r.wrk.status_errors)
            .sum()
    }
}

/// Envoy's counter of requests the ext_authz server allowed.
const EXT_AUTHZ_OK: &str = "http.outbound_0.0.0.0_8443.ext_authz.ok";

const RQ_CLASSES: &str = r"^http\.outbound_0\.0\.0\.0_8443\.downstream_rq_[1-5]xx$";

async fn response_classes(envoy: &Envoy) -> (u64, u64) {
    let stats = envoy.stats(RQ_CLASSES).await;
    let ok = stats
        .iter()
        .filter(|(k, _)| k.ends_with("_2xx"))
        .map(|(_, v)| *v)
        .sum();
    let other = stats
        .iter()
        .filter(|(k, _)| !k.ends_with("_2xx"))
        .map(|(_, v)| *v)
        .sum();
    (ok, other)
}

/// CPU time (user + system, all threads) a process used so far, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`, asked once; 100 on Linux).
fn ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// One wrk run: wrk's numbers, Envoy's 2xx and other responses, Envoy's CPU µs per response.
pub type RunOnce = (WrkResult, u64, u64, Option<f64>);

/// Run wrk on a scenario once, with Envoy's response counters and CPU time around it.
pub async fn run_once(
    lab: &Lab,
    s: Scenario,
    wrk_bin: &Path,
    script: &Path,
    settings: &WrkSettings,
) -> Result<RunOnce, String> {
    let envoy = lab.envoys.get(&s).ok_or("no Envoy for scenario")?;
    let req = lab
        .requests
        .get(&s)
        .ok_or("no request for scenario")?
        .clone();
    let pid = extras::envoy_pid(envoy.base_id());
    let (ok0, other0) = response_classes(envoy).await;
    let cpu0 = pid.and_then(cpu_ticks);
    let (w, settings2, script2) = (
        wrk_bin.to_path_buf(),
        settings.clone(),
        script.to_path_buf(),
    );
    let result = tokio::task::spawn_blocking(move || wrk::run(&w, &script2, &settings2, &req))
        .await
        .map_err(|e| e.to_string())??;
    let cpu1 = pid.and_then(cpu_ticks);
    let (ok1, other1) = response_classes(envoy).await;
    let responses = (ok1 - ok0) + (other1 - other0);
    let cpu_us = match (cpu0, cpu1) {
        (Some(a), Some(b)) if responses > 0 && b >= a => {
            Some((b - a) as f64 / ticks_per_second() * 1e6 / responses as f64)
        }
        _ => None,
    };
    Ok((result, ok1 - ok0, other1 - other0, cpu_us))
}

/// `perf record` on the Envoy of `s` (process `pid`), attached.
async fn start_perf(lab: &Lab, s: Scenario, pid: Option<u32>) -> Result<perf::Recording, String> {
    let pid = pid.ok_or_else(|| format!("{s}: Envoy's process id is unknown"))?;
    perf::Recording::start(
        pid,
        &lab.fixture.dir().join(format!("perf-{}.data", s.id())),
    )
    .await
}

/// Warm up, then the interleaved rounds. `progress` receives one line per run.
pub async fn measure(
    lab: &Lab,
    opts: &BenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<ScenarioResult>, String> {
    let mut results = empty_results(lab, opts);
    measure_rounds(lab, opts, 0..opts.rounds, &mut results, progress).await?;
    Ok(results)
}

/// One result per scenario, no rounds yet.
fn empty_results(lab: &Lab, opts: &BenchOptions) -> Vec<ScenarioResult> {
    opts.scenarios
        .iter()
        .map(|&s| {
            let req = &lab.requests[&s];
            ScenarioResult {
                scenario: s,
                request_bytes: req.head_bytes(),
                credential_bytes: req.headers.get(1).map_or(0, |(_, v)| v.len()),
                verified: lab.verified[&s].clone(),
                rounds: Vec::new(),
                cpu_samples: opts.perf.then(perf::CpuSamples::default),
            }
        })
        .collect()
}

/// Warm up `lab`, then run `rounds` (numbered over the whole run), adding to `results`.
async fn measure_rounds(
    lab: &Lab,
    opts: &BenchOptions,
    rounds: std::ops::Range<usize>,
    results: &mut [ScenarioResult],
    progress: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let wrk_bin = wrk::find_wrk()?;
    let script = wrk::write_script(lab.fixture.dir()).map_err(|e| e.to_string())?;
    if !opts.warmup.is_zero() {
        let mut warm = opts.wrk.clone();
        warm.duration = opts.warmup;
        for &s in &opts.scenarios {
            let (w, _, other, _) = run_once(lab, s, &wrk_bin, &script, &warm).await?;
            progress(&format!(
                "warm-up {:<22} {:>9.0} rps{}",
                s.id(),
                w.rps,
                if other > 0 { "  (non-2xx!)" } else { "" }
            ));
        }
    }
    let n = opts.scenarios.len();
    for round in rounds {
        for position in 0..n {
            let idx = (position + round) % n;
            let s = opts.scenarios[idx];
            let envoy_pid = lab
                .envoys
                .get(&s)
                .and_then(|e| extras::envoy_pid(e.base_id()));
            let recording = match &results[idx].cpu_samples {
                Some(_) => Some(start_perf(lab, s, envoy_pid).await?),
                None => None,
            };
            let (w, ok, other, cpu) = run_once(lab, s, &wrk_bin, &script, &opts.wrk).await?;
            if let (Some(r), Some(samples)) = (recording, results[idx].cpu_samples.as_mut()) {
                samples.add(&r.finish()?, ok + other);
            }
            progress(&format!(
                "round {}/{} {:<22} {:>9.0} rps  p50 {:>7.2} ms  p99 {:>7.2} ms  cpu {:>6.1} us/req  2xx {:>7}  other {}",
                round + 1,
                opts.rounds,
                s.id(),
                w.rps,
                w.p50_us / 1000.0,
                w.p99_us / 1000.0,
                cpu.unwrap_or(f64::NAN),
                ok,
                other + w.socket_errors
            ));
            results[idx].rounds.push(RoundResult {
                round,
                position,
                wrk: w,
                envoy_2xx: ok,
                envoy_other: other,
                envoy_cpu_us_per_request: cpu,
                envoy_pid,
            });
        }
    }
    Ok(())
}

/// The rounds each set of Envoys runs when `rounds` are spread over `processes` sets: as even
/// as they divide, earlier sets taking the remainder, every set at least one round.
pub fn rounds_per_process(rounds: usize, processes: usize) -> Vec<std::ops::Range<usize>> {
    let processes = processes.clamp(1, rounds.max(1));
    let mut start = 0;
    (0..processes)
        .map(|p| {
            let n = rounds / processes + usize::from(p < rounds % processes);
            let r = start..start + n;
            start += n;
            r
        })
        .collect()
}

/// Facts about the run's environment.
pub fn environment() -> Value {
    let envoy = crate::envoy::find_envoy();
    let version = Command::new(&envoy[0])
        .args(&envoy[1..])
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.split_once("version: ").map(|(_, v)| v.trim().to_string()))
                .unwrap_or_default()
        })
        .unwrap_or_default();
    let wrk = wrk::find_wrk()
        .ok()
        .and_then(|w| Command::new(w).arg("--version").output().ok())
        .map(|o| {
            let s = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            let first = s.lines().next().unwrap_or_default();
            first.split(" [").next().unwrap_or(first).trim().to_string()
        })
        .unwrap_or_default();
    json!({
        "envoy": envoy.join(" "),
        "envoy_version": version,
        "wrk_version": wrk,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })
}

/// The whole benchmark: the lab, the rounds, then the extras. `progress` gets one line per step.
pub async fn run(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<Report, String> {
    let mut wasm = WasmModules::locate()?;
    wasm.noop_extra = opts.noop_extra.clone();
    wasm.oidc_b = opts.oidc_b.clone();
    if opts.scenarios.contains(&Scenario::OidcSessionB) != wasm.oidc_b.is_some() {
        return Err("scenario 3b and --oidc-b go together".into());
    }
    let env_start = environment();
    progress(&format!(
        "starting {} Envoys (--concurrency {}), logging in",
        opts.scenarios.len(),
        opts.concurrency
    ));
    let batches = rounds_per_process(opts.rounds, opts.processes);
    let mut throughput: Vec<ScenarioResult> = Vec::new();
    let mut stage_timing: Vec<Vec<stages::StageTimes>> = Vec::new();
    let mut last_lab = None;
    for (p, rounds) in batches.iter().enumerate() {
        if p > 0 {
            // The previous set of Envoys goes before the next starts: one set runs at a time.
            drop(last_lab.take());
            progress(&format!(
                "starting Envoy set {}/{} for rounds {}-{}",
                p + 1,
                batches.len(),
                rounds.start + 1,
                rounds.end
            ));
        }
        let lab = start_lab(&wasm, opts, progress).await?;
        if throughput.is_empty() {
            throughput = empty_results(&lab, opts);
        }
        measure_rounds(&lab, opts, rounds.clone(), &mut throughput, progress).await?;
        // Read before the extras start more streams through the same Envoys.
        stage_timing.push(
            opts.scenarios
                .iter()
                .filter_map(|s| stages::parse(*s, &lab.envoys.get(s)?.log()))
                .collect(),
        );
        last_lab = Some(lab);
    }
    let lab = last_lab.ok_or("no rounds to run")?;
    let stage_timing = stages::merge(stage_timing);
    let extras = match &opts.extras {
        Some(x) => Some(extras::run(&lab, &wasm, x, !opts.jwt_access_tokens, progress).await?),
        None => None,
    };
    let mut env = env_start;
    env["loadavg_end"] = json!(std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim());
    Ok(Report {
        environment: env,
        options: opts.clone(),
        credentials: lab.creds.clone(),
        throughput,
        stage_timing,
        extras,
    })
}

/// One set of Envoys, logged in and checked, as the progress lines report it.
async fn start_lab(
    wasm: &WasmModules,
    opts: &BenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Lab, String> {
    let lab = Lab::start(
        wasm,
        &opts.scenarios,
        opts.concurrency,
        opts.jwt_access_tokens,
    )
    .await?;
    for (s, v) in &lab.verified {
        progress(&format!(
            "checked {:<22} with credentials: {} ({}), without: {}",
            s.id(),
            v.status,
            if v.direct_response {
                "direct_response"
            } else {
                "other body"
            },
            match (v.unauthenticated_status, v.authorizer_calls) {
                (Some(st), _) => st.to_string(),
                (None, Some(n)) => format!("n/a (authorizer allows all; it allowed {n} check)"),
                (None, None) => "n/a".into(),
            }
        ));
    }
    Ok(lab)
}

#[cfg(test)]
mod tests {
    use super::{rounds_per_process, Scenario};

    #[test]
    fn the_second_module_runs_next_to_the_first() {
        let mut v = vec![
            Scenario::JwtAuthnCached,
            Scenario::OidcSessionB,
            Scenario::NoopWasm,
            Scenario::OidcSession,
        ];
        v.sort();
        assert_eq!(
            v,
            [
                Scenario::NoopWasm,
                Scenario::OidcSession,
                Scenario::OidcSessionB,
                Scenario::JwtAuthnCached
            ]
        );
        assert_eq!(Scenario::parse("3b"), Some(Scenario::OidcSessionB));
        assert!(!Scenario::ALL.contains(&Scenario::OidcSessionB));
    }

    #[test]
    fn the_host_call_floor_runs_next_to_the_noop_filter_in_every_full_run() {
        let mut v = vec![
            Scenario::OidcSession,
            Scenario::HostCallFloor,
            Scenario::NoopWasm,
        ];
        v.sort();
        assert_eq!(
            v,
            [
                Scenario::NoopWasm,
                Scenario::HostCallFloor,
                Scenario::OidcSession
            ]
        );
        assert_eq!(Scenario::parse("2f"), Some(Scenario::HostCallFloor));
        assert_eq!(
            Scenario::parse("host-call-floor"),
            Some(Scenario::HostCallFloor)
        );
        assert!(Scenario::ALL.contains(&Scenario::HostCallFloor));
        assert!(Scenario::HostCallFloor.uses_session_cookie());
        assert!(Scenario::HostCallFloor.authenticates());
    }

    #[test]
    fn rounds_are_spread_over_the_sets_of_envoys_without_gaps() {
        assert_eq!(rounds_per_process(6, 3), vec![0..2, 2..4, 4..6]);
        assert_eq!(rounds_per_process(5, 3), vec![0..2, 2..4, 4..5]);
        assert_eq!(rounds_per_process(5, 1), vec![0..5]);
        // Never a set without a round, nor none at all.
        assert_eq!(rounds_per_process(2, 5), vec![0..1, 1..2]);
        assert_eq!(rounds_per_process(1, 0), vec![0..1]);
        assert_eq!(rounds_per_process(0, 3), vec![0..0]);
    }
}
