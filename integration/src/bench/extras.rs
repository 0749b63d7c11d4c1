//! The measurements besides requests per second: completed logins per second, the refresh
//! path, the module sizes, Envoy's memory before and after many distinct sessions, and the time
//! until Envoy is ready with and without a filter.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::client::{self, median, percentile, plain_client, Sealer};
use super::scenarios::{Scenario, BENCH_PATH};
use super::{envoy_options, idp_config, ExtrasOptions, Fixture, Lab, WasmModules};
use crate::config::GATEWAY_LISTENER;
use crate::envoy::Envoy;
use crate::stack::{APP_HOST, CLIENT_ID};

/// Every extra measurement.
#[derive(Clone, Debug, Default)]
pub struct ExtrasResult {
    /// `.wasm` sizes in bytes: oidc-gate, no-op.
    pub wasm_bytes: (u64, u64),
    /// Completed logins per second, per filter.
    pub logins: Vec<LoginRate>,
    /// The refresh path.
    pub refresh: Option<RefreshResult>,
    /// Memory before and after distinct sessions.
    pub memory: Option<MemoryResult>,
    /// Time to ready per configuration.
    pub ready: Vec<ReadyResult>,
}

/// Full logins driven through one gateway.
#[derive(Clone, Debug, Default)]
pub struct LoginRate {
    /// Which filter.
    pub filter: String,
    /// Logins attempted.
    pub logins: usize,
    /// Logins that did not complete.
    pub failed: usize,
    /// Concurrent browsers.
    pub concurrency: usize,
    /// Wall time for all.
    pub wall_s: f64,
    /// Completed logins per second.
    pub per_s: f64,
    /// One login's duration (4 requests: gateway, IdP page, IdP POST, callback), median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}

/// Requests that each refresh the session, against requests that do not.
#[derive(Clone, Debug, Default)]
pub struct RefreshResult {
    /// Sequential requests with a session that needs no refresh.
    pub baseline_n: usize,
    /// Their median latency.
    pub baseline_p50_ms: f64,
    /// Sequential requests that each refresh.
    pub sequential_n: usize,
    /// Their median latency.
    pub sequential_p50_ms: f64,
    /// Their 99th percentile.
    pub sequential_p99_ms: f64,
    /// Concurrent requests that each refresh.
    pub concurrent_n: usize,
    /// Concurrency.
    pub concurrency: usize,
    /// Wall time.
    pub wall_s: f64,
    /// Refreshing requests per second.
    pub per_s: f64,
    /// Requests that were not a 200 with a new session cookie.
    pub failed: usize,
    /// Refresh grants the IdP served meanwhile (must equal the refreshing requests).
    pub idp_refreshes: u64,
}

/// One memory reading.
#[derive(Clone, Debug, Default)]
pub struct MemSample {
    /// When.
    pub label: String,
    /// Distinct sessions sent so far.
    pub sessions: usize,
    /// Admin `/memory` `allocated`.
    pub allocated: u64,
    /// Admin `/memory` `heap_size`.
    pub heap_size: u64,
    /// `VmRSS` of the Envoy process, bytes (includes V8 and wasm memory).
    pub rss: u64,
}

/// Memory with distinct sessions.
#[derive(Clone, Debug, Default)]
pub struct MemoryResult {
    /// Envoy workers.
    pub concurrency: u32,
    /// Distinct sessions per batch.
    pub batch: usize,
    /// Requests not answered 200.
    pub failed: usize,
    /// Readings: warm, after a same-session control batch, after one batch of distinct
    /// sessions, after two.
    pub samples: Vec<MemSample>,
}

impl MemoryResult {
    fn growth(&self, f: impl Fn(&MemSample) -> u64) -> Option<[i64; 3]> {
        let [w, c, d1, d2] = self.samples.as_slice() else {
            return None;
        };
        let g = |a: &MemSample, b: &MemSample| f(b) as i64 - f(a) as i64;
        Some([g(w, c), g(c, d1), g(d1, d2)])
    }

    /// RSS growth in bytes (may be negative) over: the same-session control batch, the first
    /// batch of distinct sessions, the second.
    pub fn rss_growth(&self) -> Option<[i64; 3]> {
        self.growth(|s| s.rss)
    }

    /// Same for admin `allocated`.
    pub fn allocated_growth(&self) -> Option<[i64; 3]> {
        self.growth(|s| s.allocated)
    }
}

/// Start → admin `/ready` LIVE.
#[derive(Clone, Debug, Default)]
pub struct ReadyResult {
    /// Which configuration.
    pub scenario: String,
    /// Envoy workers.
    pub concurrency: u32,
    /// Each start, ms.
    pub samples_ms: Vec<f64>,
}

impl ReadyResult {
    /// Median, ms.
    pub fn median_ms(&self) -> f64 {
        median(&self.samples_ms)
    }
}

impl ExtrasResult {
    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "wasm_bytes": { "oidc_filter": self.wasm_bytes.0, "noop_filter": self.wasm_bytes.1 },
            "logins": self.logins.iter().map(|l| json!({
                "filter": l.filter, "logins": l.logins, "failed": l.failed,
                "concurrency": l.concurrency, "wall_s": l.wall_s, "per_s": l.per_s,
                "login_p50_ms": l.p50_ms, "login_p99_ms": l.p99_ms,
            })).collect::<Vec<_>>(),
            "refresh": self.refresh.as_ref().map(|r| json!({
                "baseline_n": r.baseline_n, "baseline_p50_ms": r.baseline_p50_ms,
                "sequential_n": r.sequential_n, "sequential_p50_ms": r.sequential_p50_ms,
                "sequential_p99_ms": r.sequential_p99_ms,
                "concurrent_n": r.concurrent_n, "concurrency": r.concurrency,
                "wall_s": r.wall_s, "per_s": r.per_s, "failed": r.failed,
                "idp_refresh_grants": r.idp_refreshes,
            })),
            "memory": self.memory.as_ref().map(|m| json!({
                "concurrency": m.concurrency, "sessions_per_batch": m.batch, "failed": m.failed,
                "samples": m.samples.iter().map(|s| json!({
                    "label": s.label, "sessions": s.sessions, "allocated": s.allocated,
                    "heap_size": s.heap_size, "rss": s.rss,
                })).collect::<Vec<_>>(),
                "rss_growth_control_batch1_batch2": m.rss_growth(),
                "allocated_growth_control_batch1_batch2": m.allocated_growth(),
            })),
            "ready": self.ready.iter().map(|r| json!({
                "scenario": r.scenario, "concurrency": r.concurrency,
                "median_ms": r.median_ms(), "samples_ms": r.samples_ms,
            })).collect::<Vec<_>>(),
        })
    }
}

fn gateway(e: &Envoy) -> Result<SocketAddr, String> {
    e.listener(GATEWAY_LISTENER)
        .ok_or_else(|| "no gateway listener".to_string())
}

fn bench_url() -> String {
    format!("https://{APP_HOST}{BENCH_PATH}")
}

/// Run every extra.
pub async fn run(
    lab: &Lab,
    wasm: &WasmModules,
    x: &ExtrasOptions,
    opaque_access_tokens: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<ExtrasResult, String> {
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut out = ExtrasResult {
        wasm_bytes: (size(&wasm.oidc), size(&wasm.noop)),
        ..ExtrasResult::default()
    };
    progress(&format!(
        "wasm: oidc_filter.wasm {} bytes, noop_filter.wasm {} bytes",
        out.wasm_bytes.0, out.wasm_bytes.1
    ));

    for (s, name) in [
        (Scenario::OidcSession, "oidc-gate"),
        (Scenario::EnvoyOAuth2, "envoy-oauth2"),
    ] {
        let Some(e) = lab.envoys.get(&s) else {
            continue;
        };
        let r = login_rate(
            name,
            gateway(e)?,
            &lab.fixture.authorize_endpoint(),
            x.logins,
            x.login_concurrency,
        )
        .await;
        progress(&format!(
            "logins {name}: {} in {:.2} s = {:.1}/s (concurrency {}, {} failed), one login p50 {:.1} ms",
            r.logins, r.wall_s, r.per_s, r.concurrency, r.failed, r.p50_ms
        ));
        out.logins.push(r);
    }

    let r = refresh(wasm, x.refreshes, x.login_concurrency, opaque_access_tokens).await?;
    progress(&format!(
        "refresh: {:.1} refreshing requests/s (concurrency {}), sequential p50 {:.2} ms vs {:.2} ms without refresh; IdP refresh grants {} for {} requests, {} failed",
        r.per_s,
        r.concurrency,
        r.sequential_p50_ms,
        r.baseline_p50_ms,
        r.idp_refreshes,
        r.sequential_n + r.concurrent_n,
        r.failed
    ));
    out.refresh = Some(r);

    let m = memory(lab, x.sessions).await?;
    for s in &m.samples {
        progress(&format!(
            "memory ({} workers) {:<26} allocated {:>6.1} MiB  heap {:>6.1} MiB  RSS {:>6.1} MiB",
            m.concurrency,
            s.label,
            mib(s.allocated),
            mib(s.heap_size),
            mib(s.rss)
        ));
    }
    out.memory = Some(m);

    for s in [Scenario::Bare, Scenario::NoopWasm, Scenario::OidcSession] {
        let r = ready(&lab.fixture, s, 2, x.ready_repeats).await?;
        progress(&format!(
            "ready {:<22} median {:.0} ms over {} starts (--concurrency {})",
            s.id(),
            r.median_ms(),
            r.samples_ms.len(),
            r.concurrency
        ));
        out.ready.push(r);
    }
    Ok(out)
}

/// Bytes as MiB.
pub fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// `n` full logins, `concurrency` at a time, each a new browser.
pub async fn login_rate(
    name: &str,
    gateway: SocketAddr,
    authorize: &str,
    n: usize,
    concurrency: usize,
) -> LoginRate {
    let url = bench_url();
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut set = tokio::task::JoinSet::new();
    let t = Instant::now();
    for _ in 0..n {
        let (sem, url, authorize) = (sem.clone(), url.clone(), authorize.to_string());
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            client::browser_login(gateway, &url, &authorize, true)
                .await
                .map(|l| l.elapsed)
        });
    }
    let mut times = Vec::new();
    let mut failed = 0;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(d)) => times.push(d.as_secs_f64() * 1000.0),
            _ => failed += 1,
        }
    }
    let wall = t.elapsed().as_secs_f64();
    LoginRate {
        filter: name.into(),
        logins: n,
        failed,
        concurrency,
        wall_s: wall,
        per_s: times.len() as f64 / wall,
        p50_ms: median(&times),
        p99_ms: percentile(&times, 99.0),
    }
}

/// Send each header set once, `concurrency` at a time, on one HTTP/1.1 client.
async fn drive(
    gateway: SocketAddr,
    requests: Vec<Vec<(String, String)>>,
    concurrency: usize,
) -> (Vec<Result<client::Answer, String>>, Duration) {
    let c = plain_client(gateway);
    let url = bench_url();
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    let t = Instant::now();
    for _ in 0..concurrency.max(1) {
        let (c, url, requests, next) = (c.clone(), url.clone(), requests.clone(), next.clone());
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(h) = requests.get(i) else { break };
                out.push(client::get(&c, &url, h).await);
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(v) => all.extend(v),
            Err(e) => all.push(Err(e.to_string())),
        }
    }
    (all, t.elapsed())
}

fn cookie(h: &str) -> Vec<(String, String)> {
    vec![("Cookie".to_string(), h.to_string())]
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The refresh path: `n` logins stop at the callback, so each session cookie is fresh and holds
/// its own refresh token (no coalescing); each is then resealed as if its 30 s access token had
/// been issued an hour ago (a token is not refreshed in the first half of its life), so every
/// session wants a refresh at once. A quarter of them are sent one at a time (latency), the rest
/// `concurrency` at a time (rate).
pub async fn refresh(
    wasm: &WasmModules,
    n: usize,
    concurrency: usize,
    opaque_access_tokens: bool,
) -> Result<RefreshResult, String> {
    let n = n.max(2);
    let fx = Fixture::start(
        wasm,
        idp_config(Duration::from_secs(30), opaque_access_tokens),
    )
    .await?;
    let envoy = fx
        .start_envoy(Scenario::OidcSession, "refresh", &envoy_options(1, true))
        .await?;
    let gw = gateway(&envoy)?;
    let url = bench_url();
    let authorize = fx.authorize_endpoint();
    // n + 1 sessions: one becomes the no-refresh baseline.
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..=n {
        let (sem, url, authorize) = (sem.clone(), url.clone(), authorize.clone());
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            client::browser_login(gw, &url, &authorize, false)
                .await
                .map(|l| l.cookie)
        });
    }
    let mut cookies = Vec::new();
    while let Some(r) = set.join_next().await {
        cookies.push(
            r.map_err(|e| e.to_string())?
                .map_err(|e| format!("refresh login: {e}"))?,
        );
    }
    let sealer = Sealer::new(&fx.cookie_secret, &fx.idp.issuer(), CLIENT_ID)?;
    let cookies = cookies
        .iter()
        .map(|c| {
            let mut s = sealer.open(c)?;
            s.tokens_at = s.expires_at.saturating_sub(3600);
            sealer.cookie_header(&s)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut base = sealer.open(&cookies[0])?;
    base.expires_at = unix_now() + 3600;
    let base_cookie = sealer.cookie_header(&base)?;
    let (answers, _) = drive(gw, vec![cookie(&base_cookie); 50], 1).await;
    let mut baseline = Vec::new();
    for a in answers {
        let a = a?;
        if a.status != 200 || a.set_cookie_count() != 0 {
            return Err(format!(
                "refresh baseline: status {} with {} Set-Cookie (expected 200, none)",
                a.status,
                a.set_cookie_count()
            ));
        }
        baseline.push(a.latency.as_secs_f64() * 1000.0);
    }

    let grants0 = fx.idp.stats().refresh;
    let seq_n = (n / 4).max(1);
    let refreshed = |a: &Result<client::Answer, String>| {
        a.as_ref()
            .is_ok_and(|a| a.status == 200 && a.set_cookie_count() > 0)
    };
    let (seq, _) = drive(
        gw,
        cookies[1..=seq_n].iter().map(|c| cookie(c)).collect(),
        1,
    )
    .await;
    let mut failed = seq.iter().filter(|a| !refreshed(a)).count();
    let seq_ms: Vec<f64> = seq
        .iter()
        .filter_map(|a| a.as_ref().ok())
        .map(|a| a.latency.as_secs_f64() * 1000.0)
        .collect();
    let rest: Vec<_> = cookies[seq_n + 1..].iter().map(|c| cookie(c)).collect();
    let conc_n = rest.len();
    let (conc, wall) = drive(gw, rest, concurrency).await;
    failed += conc.iter().filter(|a| !refreshed(a)).count();
    let ok = conc.iter().filter(|a| refreshed(a)).count();
    let grants = fx.idp.stats().refresh - grants0;
    Ok(RefreshResult {
        baseline_n: baseline.len(),
        baseline_p50_ms: median(&baseline),
        sequential_n: seq_n,
        sequential_p50_ms: median(&seq_ms),
        sequential_p99_ms: percentile(&seq_ms, 99.0),
        concurrent_n: conc_n,
        concurrency,
        wall_s: wall.as_secs_f64(),
        per_s: ok as f64 / wall.as_secs_f64(),
        failed,
        idp_refreshes: grants,
    })
}

/// The pid of the Envoy started with `--base-id <base_id>` (the process named `envoy`).
pub fn envoy_pid(base_id: u32) -> Option<u32> {
    let want = base_id.to_string();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if !args
            .windows(2)
            .any(|w| w[0] == b"--base-id" && w[1] == want.as_bytes())
        {
            continue;
        }
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with("envoy") {
            return Some(pid);
        }
    }
    None
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

async fn mem_sample(envoy: &Envoy, pid: u32, label: &str, sessions: usize) -> MemSample {
    let (_, body) = envoy.admin_get("/memory").await.unwrap_or_default();
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let num = |k: &str| -> u64 {
        match &v[k] {
            Value::String(s) => s.parse().unwrap_or(0),
            Value::Number(n) => n.as_u64().unwrap_or(0),
            _ => 0,
        }
    };
    MemSample {
        label: label.into(),
        sessions,
        allocated: num("allocated"),
        heap_size: num("heap_size"),
        rss: rss_bytes(pid),
    }
}

/// Envoy with 2 workers and oidc-gate: memory after warm-up, after `batch` requests with the
/// same session (control), after `batch` distinct sessions (cookies sealed with the gateway's
/// secret by the filter's own code from a real login's session, each with its own subject) and
/// after `batch` more.
pub async fn memory(lab: &Lab, batch: usize) -> Result<MemoryResult, String> {
    let concurrency = 2;
    let envoy = lab
        .fixture
        .start_envoy(
            Scenario::OidcSession,
            "memory",
            &envoy_options(concurrency, true),
        )
        .await?;
    let gw = gateway(&envoy)?;
    let pid = envoy_pid(envoy.base_id()).ok_or("Envoy pid not found in /proc")?;
    let sealer = Sealer::new(
        &lab.fixture.cookie_secret,
        &lab.fixture.idp.issuer(),
        CLIENT_ID,
    )?;
    let session = sealer.open(&lab.creds.session_cookie)?;
    let not_ok = |answers: &[Result<client::Answer, String>]| {
        answers
            .iter()
            .filter(|a| a.as_ref().map_or(true, |a| a.status != 200))
            .count()
    };
    // Warm-up (V8 compiles hot wasm functions again in the background), then a control batch:
    // as many requests, all with the one session, to tell per-session memory from the rest.
    let (answers, _) = drive(gw, vec![cookie(&lab.creds.session_cookie); 3000], 16).await;
    let mut failed = not_ok(&answers);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut samples = vec![mem_sample(&envoy, pid, "warm", 0).await];
    let (answers, _) = drive(gw, vec![cookie(&lab.creds.session_cookie); batch], 16).await;
    failed += not_ok(&answers);
    samples.push(mem_sample(&envoy, pid, &format!("+{batch} requests, same session"), 0).await);
    for b in 1..=2 {
        let mut reqs = Vec::with_capacity(batch);
        for i in 0..batch {
            let mut s = session.clone();
            s.subject = format!("bench-session-{b}-{i}");
            s.created_at = unix_now();
            reqs.push(cookie(&sealer.cookie_header(&s)?));
        }
        let (answers, _) = drive(gw, reqs, 16).await;
        failed += not_ok(&answers);
        samples.push(
            mem_sample(
                &envoy,
                pid,
                &format!("+{} distinct sessions", b * batch),
                b * batch,
            )
            .await,
        );
    }
    Ok(MemoryResult {
        concurrency,
        batch,
        failed,
        samples,
    })
}

/// Start Envoy `repeats` times for `s` and time start → admin `/ready` answering 200 (polled
/// every 2 ms once the admin endpoint is up).
pub async fn ready(
    fx: &Fixture,
    s: Scenario,
    concurrency: u32,
    repeats: usize,
) -> Result<ReadyResult, String> {
    let mut samples = Vec::new();
    for i in 0..repeats.max(1) {
        let dir = fx.write_bootstrap(s, &format!("ready-{}-{i}", s.id()))?;
        let t = Instant::now();
        let mut envoy = Envoy::start(
            &dir.join("envoy.json"),
            &dir,
            &envoy_options(concurrency, false),
        )
        .await
        .map_err(|e| format!("{s}: {e}"))?;
        loop {
            if envoy.admin_get("/ready").await.map(|(st, _)| st) == Ok(200) {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                return Err(format!("{s}: not ready after 60 s"));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
        envoy.kill();
    }
    Ok(ReadyResult {
        scenario: s.id().into(),
        concurrency,
        samples_ms: samples,
    })
}
