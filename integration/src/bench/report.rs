//! The results: console table, JSON, Markdown and an SVG chart under `target/bench/`, and the
//! pass/fail of each target.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::extras::{mib, ExtrasResult};
use super::perf::{self, CpuSamples};
use super::stages::{self, StageTimes};
use super::{BenchOptions, Credentials, Scenario, ScenarioResult};

/// `.wasm` size target, bytes (600 KB, decimal).
pub const WASM_SIZE_TARGET: u64 = 600_000;

/// Chart geometry of [`Report::to_svg`] (pixels).
const SVG_WIDTH: f64 = 900.0;
const SVG_ROW_HEIGHT: f64 = 34.0;
const SVG_TOP: f64 = 40.0;

/// Everything one run measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Machine, Envoy and wrk facts.
    pub environment: Value,
    /// What was run.
    pub options: BenchOptions,
    /// The credentials used (sizes and cookie names only are reported).
    pub credentials: Credentials,
    /// Per scenario.
    pub throughput: Vec<ScenarioResult>,
    /// Per scenario whose module logs its stages (`make bench-stages`); empty otherwise.
    pub stage_timing: Vec<StageTimes>,
    /// The other measurements.
    pub extras: Option<ExtrasResult>,
}

/// One target and whether it was met (`None`: not measured in this run).
#[derive(Clone, Debug)]
pub struct Target {
    /// What.
    pub name: String,
    /// Measured against required.
    pub detail: String,
    /// Met?
    pub pass: Option<bool>,
}

impl Target {
    fn verdict(&self) -> &'static str {
        match self.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "n/a",
        }
    }
}

impl Report {
    /// A scenario's result.
    pub fn get(&self, s: Scenario) -> Option<&ScenarioResult> {
        self.throughput.iter().find(|r| r.scenario == s)
    }

    fn ratio(&self, s: &ScenarioResult, base: Scenario) -> Option<f64> {
        let b = self.get(base)?.rps();
        (b > 0.0).then(|| s.rps() / b)
    }

    /// Median over rounds of the per-round ratio `f(a) / f(b)`. Scenarios next to each other in
    /// [`Scenario::ALL`] also run next to each other in every round, so this ratio is less
    /// exposed to load that changes between rounds than the ratio of medians.
    pub fn paired_ratio(
        &self,
        a: Scenario,
        b: Scenario,
        f: impl Fn(&super::WrkResult) -> f64,
    ) -> Option<f64> {
        let (ra, rb) = (self.get(a)?, self.get(b)?);
        let ratios: Vec<f64> = ra
            .rounds
            .iter()
            .filter_map(|x| {
                let y = rb.rounds.iter().find(|y| y.round == x.round)?;
                let d = f(&y.wrk);
                (d > 0.0).then(|| f(&x.wrk) / d)
            })
            .collect();
        (!ratios.is_empty()).then(|| super::client::median(&ratios))
    }

    fn compare(&self, name: &str, a: Scenario, b: Scenario, factor: f64, p99: bool) -> Target {
        let (va, vb, unit) = if p99 {
            (
                self.get(a).map(|r| r.p99_us()),
                self.get(b).map(|r| r.p99_us()),
                "us",
            )
        } else {
            (
                self.get(a).map(|r| r.rps()),
                self.get(b).map(|r| r.rps()),
                "rps",
            )
        };
        let paired = if p99 {
            self.paired_ratio(a, b, |w| w.p99_us)
        } else {
            self.paired_ratio(a, b, |w| w.rps)
        };
        match (va, vb) {
            (Some(va), Some(vb)) if vb > 0.0 => Target {
                name: name.into(),
                detail: format!(
                    "{va:.0} {unit} {} {factor} x {vb:.0} {unit} = {:.0} (ratio {:.3}; paired per-round median {})",
                    if p99 { "<=" } else { ">=" },
                    factor * vb,
                    va / vb,
                    fmt_ratio(paired)
                ),
                pass: Some(if p99 {
                    va <= factor * vb
                } else {
                    va >= factor * vb
                }),
            },
            _ => Target {
                name: name.into(),
                detail: "not measured".into(),
                pass: None,
            },
        }
    }

    /// The targets of issue 6, judged on the ratio of medians (the paired per-round ratio is
    /// shown next to it).
    pub fn targets(&self) -> Vec<Target> {
        let mut t = vec![
            self.compare(
                "(3) throughput >= 0.95 x (2)",
                Scenario::OidcSession,
                Scenario::NoopWasm,
                0.95,
                false,
            ),
            self.compare(
                "(3) p99 <= 1.1 x (2)",
                Scenario::OidcSession,
                Scenario::NoopWasm,
                1.1,
                true,
            ),
            self.compare(
                "(3) throughput >= 1.1 x (4) Envoy OAuth2",
                Scenario::OidcSession,
                Scenario::EnvoyOAuth2,
                1.1,
                false,
            ),
            self.compare(
                "(6a) bearer throughput >= 0.8 x (6b) jwt_authn",
                Scenario::OidcBearer,
                Scenario::JwtAuthn,
                0.8,
                false,
            ),
        ];
        match &self.extras {
            Some(x) => {
                t.push(Target {
                    name: ".wasm <= 600 KB".into(),
                    detail: format!(
                        "{} bytes ({:.0} KB) vs {} bytes",
                        x.wasm_bytes.0,
                        x.wasm_bytes.0 as f64 / 1000.0,
                        WASM_SIZE_TARGET
                    ),
                    pass: Some(x.wasm_bytes.0 <= WASM_SIZE_TARGET),
                });
                t.push(match x.memory.as_ref().and_then(|m| Some((m, m.rss_growth()?))) {
                    Some((m, [control, first, second])) => {
                        // Bounded: the second batch of new sessions grows RSS by no more than
                        // the same number of requests with one session did, plus 2 MiB; i.e.
                        // nothing is kept per session.
                        let bound = control.max(0) + (2 << 20);
                        Target {
                            name: format!("memory bounded ({} sessions per batch)", m.batch),
                            detail: format!(
                                "RSS {:+.1} MiB for {} requests with one session, {:+.1} MiB for the first {} distinct sessions, {:+.1} MiB for the next {} (bound {:.1} MiB); {} failed requests",
                                control as f64 / 1048576.0,
                                m.batch,
                                first as f64 / 1048576.0,
                                m.batch,
                                second as f64 / 1048576.0,
                                m.batch,
                                bound as f64 / 1048576.0,
                                m.failed
                            ),
                            pass: Some(second <= bound && m.failed == 0),
                        }
                    }
                    None => Target {
                        name: "memory bounded".into(),
                        detail: "not measured".into(),
                        pass: None,
                    },
                });
            }
            None => {
                for name in [".wasm <= 600 KB", "memory bounded"] {
                    t.push(Target {
                        name: name.into(),
                        detail: "not measured (extras off)".into(),
                        pass: None,
                    });
                }
            }
        }
        t
    }

    /// The throughput table as aligned text.
    pub fn console_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<22} {:>9} {:>17} {:>6} {:>6} {:>8} {:>8} {:>8} {:>9} {:>7} {:>9}",
            "scenario",
            "rps",
            "rps min-max",
            "x(1)",
            "x(2)",
            "p50 ms",
            "p99 ms",
            "p99/(2)",
            "cpu us/rq",
            "cred B",
            "non-2xx"
        );
        let p99_2 = self.get(Scenario::NoopWasm).map(|r| r.p99_us());
        for r in &self.throughput {
            let (lo, hi) = r.rps_range();
            let _ = writeln!(
                s,
                "{:<22} {:>9.0} {:>17} {:>6} {:>6} {:>8.2} {:>8.2} {:>8} {:>9} {:>7} {:>9}",
                r.scenario.id(),
                r.rps(),
                format!("{lo:.0}-{hi:.0}"),
                fmt_ratio(self.ratio(r, Scenario::Bare)),
                fmt_ratio(self.ratio(r, Scenario::NoopWasm)),
                r.p50_us() / 1000.0,
                r.p99_us() / 1000.0,
                fmt_ratio(p99_2.filter(|b| *b > 0.0).map(|b| r.p99_us() / b)),
                fmt_cpu(r.cpu_us_per_request()),
                r.credential_bytes,
                r.bad_responses()
            );
        }
        s
    }

    /// The stage timing as aligned text (empty without instrumented modules).
    pub fn console_stages(&self) -> String {
        if self.stage_timing.is_empty() {
            return String::new();
        }
        stages::table(&self.stage_timing, false)
    }

    /// Scenarios sampled with `--perf`, and their samples.
    fn cpu_split(&self) -> Vec<(Scenario, &CpuSamples)> {
        self.throughput
            .iter()
            .filter_map(|r| Some((r.scenario, r.cpu_samples.as_ref()?)))
            .collect()
    }

    /// Envoy's CPU per request by kind of code as aligned text (empty without `--perf`).
    pub fn console_cpu_split(&self) -> String {
        let rows = self.cpu_split();
        if rows.is_empty() {
            return String::new();
        }
        perf::table(&rows, false)
    }

    /// Targets as text lines, then the comparison of two oidc-gate modules, if any.
    pub fn console_targets(&self) -> String {
        let mut s = String::new();
        for t in self.targets() {
            let _ = writeln!(s, "{:<4} {:<46} {}", t.verdict(), t.name, t.detail);
        }
        if let Some(floor) = self.host_call_floor() {
            let _ = writeln!(s, "\n{floor}");
        }
        if let Some(ab) = self.module_b_vs_a() {
            let _ = writeln!(s, "\n{ab}");
        }
        s
    }

    /// (2f) against (2), and (3) against (2f): how much of the session path's distance from the
    /// no-op filter its host calls alone take, and how much is oidc-gate's own code.
    pub fn host_call_floor(&self) -> Option<String> {
        let (noop, floor, oidc) = (
            self.get(Scenario::NoopWasm)?,
            self.get(Scenario::HostCallFloor)?,
            self.get(Scenario::OidcSession),
        );
        let cpu = |r: &ScenarioResult| {
            r.cpu_us_per_request()
                .map_or("-".into(), |c| format!("{c:.1}"))
        };
        let mut line = format!(
            "host-call floor (2f), oidc-gate's host calls and no code: {} x (2) (paired per-round median {}); Envoy CPU µs/request {} vs {}",
            fmt_ratio(self.ratio(floor, Scenario::NoopWasm)),
            fmt_ratio(self.paired_ratio(Scenario::HostCallFloor, Scenario::NoopWasm, |w| w.rps)),
            cpu(floor),
            cpu(noop),
        );
        if let Some(oidc) = oidc {
            let _ = write!(
                line,
                "; oidc-gate (3): {} x (2f) (paired {}), Envoy CPU µs/request {}",
                fmt_ratio(self.ratio(oidc, Scenario::HostCallFloor)),
                fmt_ratio(
                    self.paired_ratio(Scenario::OidcSession, Scenario::HostCallFloor, |w| w.rps)
                ),
                cpu(oidc),
            );
        }
        Some(line)
    }

    /// (3b) against (3): two oidc-gate modules in one run (`--oidc-b`).
    pub fn module_b_vs_a(&self) -> Option<String> {
        let (a, b) = (
            self.get(Scenario::OidcSession)?,
            self.get(Scenario::OidcSessionB)?,
        );
        let cpu = |r: &ScenarioResult| {
            r.cpu_us_per_request()
                .map_or("-".into(), |c| format!("{c:.1}"))
        };
        let wasm = |r: &ScenarioResult| {
            r.cpu_samples
                .as_ref()
                .and_then(|c| c.us_per_request(perf::Code::Wasm))
                .map_or("-".into(), |c| format!("{c:.2}"))
        };
        Some(format!(
            "module B (3b) vs A (3): rps {:.0} vs {:.0} (ratio {}; paired per-round median {}); Envoy CPU µs/request {} vs {}; wasm µs/request (perf) {} vs {}",
            b.rps(),
            a.rps(),
            fmt_ratio((a.rps() > 0.0).then(|| b.rps() / a.rps())),
            fmt_ratio(self.paired_ratio(Scenario::OidcSessionB, Scenario::OidcSession, |w| w.rps)),
            cpu(b),
            cpu(a),
            wasm(b),
            wasm(a),
        ))
    }

    /// Everything as JSON.
    pub fn to_json(&self) -> Value {
        let p99_2 = self.get(Scenario::NoopWasm).map(|r| r.p99_us());
        json!({
            "environment": self.environment,
            "settings": {
                "rounds": self.options.rounds,
                "envoy_sets": super::rounds_per_process(self.options.rounds, self.options.processes).len(),
                "warmup_s": self.options.warmup.as_secs_f64(),
                "envoy_concurrency": self.options.concurrency,
                "wrk": self.options.wrk.to_json(),
                "route": "direct_response 200 (all scenarios)",
                "noop_extra_work": self.options.noop_extra,
            },
            "credentials": {
                "session_cookie_bytes": self.credentials.session_cookie.len(),
                "oauth2_cookie_bytes": self.credentials.oauth2_cookie.as_ref().map(String::len),
                "oauth2_cookie_names": self.credentials.oauth2_cookie_names,
                "bearer_jwt_bytes": self.credentials.bearer.len(),
            },
            "scenarios": self.throughput.iter().map(|r| {
                let (lo, hi) = r.rps_range();
                json!({
                    "id": r.scenario.id(),
                    "label": r.scenario.label(),
                    "rps_median": r.rps(),
                    "rps_min": lo,
                    "rps_max": hi,
                    "p50_us_median": r.p50_us(),
                    "p99_us_median": r.p99_us(),
                    "ratio_rps_to_1": self.ratio(r, Scenario::Bare),
                    "ratio_rps_to_2": self.ratio(r, Scenario::NoopWasm),
                    "ratio_p99_to_2": p99_2.filter(|b| *b > 0.0).map(|b| r.p99_us() / b),
                    "envoy_cpu_us_per_request_median": r.cpu_us_per_request(),
                    "request_head_bytes": r.request_bytes,
                    "credential_bytes": r.credential_bytes,
                    "check": {
                        "status_with_credentials": r.verified.status,
                        "direct_response_body": r.verified.direct_response,
                        "status_without_credentials": r.verified.unauthenticated_status,
                    },
                    "responses_2xx": r.ok_responses(),
                    "responses_bad": r.bad_responses(),
                    "rounds": r.rounds.iter().map(|x| {
                        let mut w = x.wrk.to_json();
                        w["round"] = json!(x.round);
                        w["position"] = json!(x.position);
                        w["envoy_2xx"] = json!(x.envoy_2xx);
                        w["envoy_other"] = json!(x.envoy_other);
                        w["envoy_pid"] = json!(x.envoy_pid);
                        w
                    }).collect::<Vec<_>>(),
                })
            }).collect::<Vec<_>>(),
            "targets": self.targets().iter().map(|t| json!({
                "name": t.name, "detail": t.detail, "pass": t.pass,
            })).collect::<Vec<_>>(),
            "stage_timing": stages::to_json(&self.stage_timing),
            "cpu_by_code": perf::to_json(&self.cpu_split()),
            "extras": self.extras.as_ref().map(ExtrasResult::to_json),
        })
    }

    /// Markdown summary.
    pub fn to_markdown(&self) -> String {
        let e = &self.environment;
        let o = &self.options;
        let mut s = String::new();
        let _ = writeln!(s, "# oidc-gate benchmark\n");
        let _ = writeln!(
            s,
            "- Envoy: `{}` ({}), `--concurrency {}`, TLS listener, route `direct_response` 200, access log off, log level warn",
            e["envoy_version"].as_str().unwrap_or("?"),
            e["envoy"].as_str().unwrap_or("?"),
            o.concurrency
        );
        let _ = writeln!(
            s,
            "- Load: {} `-t{} -c{} -d{:.0}s` (HTTP/1.1 keep-alive over TLS, 127.0.0.1), {} interleaved round(s) (order rotated each round) over {} set(s) of Envoys, each started afresh and warmed up for {:.1} s per scenario; medians over rounds",
            e["wrk_version"].as_str().unwrap_or("wrk"),
            o.wrk.threads,
            o.wrk.connections,
            o.wrk.duration.as_secs_f64(),
            o.rounds,
            super::rounds_per_process(o.rounds, o.processes).len(),
            o.warmup.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "- Machine: {} CPUs, load average at start `{}`, at end `{}` (wrk, Envoy and the mock IdP share these CPUs; numbers from a shared machine are noisy)",
            e["cpus"],
            e["loadavg"].as_str().unwrap_or(""),
            e["loadavg_end"].as_str().unwrap_or("")
        );
        let oauth2 = match &self.credentials.oauth2_cookie {
            Some(c) => format!(
                "; Envoy OAuth2 cookies {} bytes ({}, real login)",
                c.len(),
                self.credentials.oauth2_cookie_names.join(", ")
            ),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "- Credentials (`Cookie`/`Authorization` header values): oidc-gate session cookie {} bytes (real login, {} access tokens){oauth2}; bearer JWT {} bytes (RS256, minted by the mock IdP)\n",
            self.credentials.session_cookie.len(),
            if self.options.jwt_access_tokens { "JWT" } else { "opaque" },
            self.credentials.bearer.len() + "Bearer ".len()
        );
        if let Some(extra) = &self.options.noop_extra {
            let _ = writeln!(
                s,
                "- **Calibration run**: the no-op filter (2) does extra work per request: `{extra}`\n"
            );
        }
        let _ = writeln!(s, "## Requests per second and latency\n");
        let _ = writeln!(
            s,
            "| scenario | rps (median) | min–max | ×(1) | ×(2) | p50 ms | p99 ms | p99 ÷ p99(2) | Envoy CPU µs/request | credential bytes | non-2xx |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let p99_2 = self.get(Scenario::NoopWasm).map(|r| r.p99_us());
        for r in &self.throughput {
            let (lo, hi) = r.rps_range();
            let _ = writeln!(
                s,
                "| ({}) {} | {:.0} | {:.0}–{:.0} | {} | {} | {:.2} | {:.2} | {} | {} | {} | {} |",
                r.scenario.id().split('-').next().unwrap_or(""),
                r.scenario.label(),
                r.rps(),
                lo,
                hi,
                fmt_ratio(self.ratio(r, Scenario::Bare)),
                fmt_ratio(self.ratio(r, Scenario::NoopWasm)),
                r.p50_us() / 1000.0,
                r.p99_us() / 1000.0,
                fmt_ratio(p99_2.filter(|b| *b > 0.0).map(|b| r.p99_us() / b)),
                fmt_cpu(r.cpu_us_per_request()),
                r.credential_bytes,
                r.bad_responses()
            );
        }
        let _ = writeln!(
            s,
            "\nEvery scenario's request was checked before loading (200 from `direct_response` with the credential; without it: {}; ext_authz: Envoy counted the authorizer's allow), and every run was checked with the Envoy's own counters (non-2xx column: Envoy non-2xx + wrk errors). The ext_authz authorizer is an in-process hyper (axum) server on its own thread answering 200 with no work (cheaper per request than a second Envoy), so (5) is the best case of the oauth2-proxy design. Envoy's OAuth2 filter does not verify the ID token (envoy#40944); oidc-gate does at login and refresh.\n",
            self.throughput
                .iter()
                .filter_map(|r| r
                    .verified
                    .unauthenticated_status
                    .map(|st| format!("{} → {st}", r.scenario.id())))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(s, "## Targets\n");
        let _ = writeln!(s, "| | target | measured |");
        let _ = writeln!(s, "|---|---|---|");
        for t in self.targets() {
            let _ = writeln!(s, "| {} | {} | {} |", t.verdict(), t.name, t.detail);
        }
        if let Some(floor) = self.host_call_floor() {
            let _ = writeln!(s, "\n{floor}");
        }
        if let Some(ab) = self.module_b_vs_a() {
            let _ = writeln!(s, "\n{ab}");
        }
        if !self.stage_timing.is_empty() {
            let _ = writeln!(s, "\n## Stage timing\n");
            let _ = writeln!(
                s,
                "Wall time per stream inside Envoy, from modules built with `stage-timing` (each worker logs the mean over {} streams and, in the `max:` rows, the longest single occurrence; medians of those lines, each worker's first left out). Every mark is a clock read (a host call), counted in the stage it ends: compare filters and builds, not totals with uninstrumented runs.\n",
                oidc_filter::abi::timing::REQUESTS_PER_LINE
            );
            s.push_str(&stages::table(&self.stage_timing, true));
        }
        let cpu = self.cpu_split();
        if !cpu.is_empty() {
            let _ = writeln!(s, "\n## Envoy's CPU by code\n");
            let _ = writeln!(
                s,
                "Linux `perf` sampled each scenario's Envoy (all threads) during the rounds, one sample per {} µs of CPU time; samples over all rounds, divided by the responses Envoy counted. `envoy` is the binary: Envoy, BoringSSL and V8's runtime and builtins (the host side of every proxy-wasm call runs here); `wasm` is the machine code V8 compiled from the modules.\n",
                perf::SAMPLE_PERIOD_NS / 1000
            );
            s.push_str(&perf::table(&cpu, true));
        }
        if let Some(x) = &self.extras {
            let _ = writeln!(s, "\n## Other measurements\n");
            let _ = writeln!(
                s,
                "- `.wasm`: oidc_filter {} bytes, noop_filter {} bytes",
                x.wasm_bytes.0, x.wasm_bytes.1
            );
            for l in &x.logins {
                let _ = writeln!(
                    s,
                    "- Logins, {}: {} full logins (gateway redirect, IdP page, IdP POST, callback with code exchange, landing), {} concurrent browsers: {:.2} s = **{:.1} logins/s**; one login p50 {:.1} ms, p99 {:.1} ms; {} failed (mock IdP signs 2 RS256 tokens per login in-process, sharing the CPUs)",
                    l.filter, l.logins, l.concurrency, l.wall_s, l.per_s, l.p50_ms, l.p99_ms, l.failed
                );
            }
            if let Some(r) = &x.refresh {
                let _ = writeln!(
                    s,
                    "- Refresh (oidc-gate, sessions whose 30 s access token is due: resealed as issued an hour ago): one request that refreshes p50 {:.2} ms (p99 {:.2} ms, {} sequential) vs {:.2} ms without refresh ({} sequential); **{:.1} refreshing requests/s** at concurrency {} ({} requests in {:.2} s); IdP refresh grants {} for {} refreshing requests; {} failed",
                    r.sequential_p50_ms,
                    r.sequential_p99_ms,
                    r.sequential_n,
                    r.baseline_p50_ms,
                    r.baseline_n,
                    r.per_s,
                    r.concurrency,
                    r.concurrent_n,
                    r.wall_s,
                    r.idp_refreshes,
                    r.sequential_n + r.concurrent_n,
                    r.failed
                );
            }
            if let Some(m) = &x.memory {
                let _ = writeln!(
                    s,
                    "- Memory, Envoy `--concurrency {}` with oidc-gate, distinct sessions (sealed with the gateway's cookie secret by the filter's own code, one request each):\n",
                    m.concurrency
                );
                let _ = writeln!(
                    s,
                    "  | when | admin allocated MiB | admin heap MiB | RSS MiB |"
                );
                let _ = writeln!(s, "  |---|---:|---:|---:|");
                for m in &m.samples {
                    let _ = writeln!(
                        s,
                        "  | {} | {:.1} | {:.1} | {:.1} |",
                        m.label,
                        mib(m.allocated),
                        mib(m.heap_size),
                        mib(m.rss)
                    );
                }
                let _ = writeln!(s);
            }
            if !x.ready.is_empty() {
                let bare = x.ready.first().map_or(0.0, |r| r.median_ms());
                let list: Vec<String> = x
                    .ready
                    .iter()
                    .map(|r| {
                        format!(
                            "{} {:.0} ms (+{:.0} ms)",
                            r.scenario,
                            r.median_ms(),
                            r.median_ms() - bare
                        )
                    })
                    .collect();
                let _ = writeln!(
                    s,
                    "- Start → admin `/ready` LIVE (median of {}, `--concurrency {}`, admin address polled every 25 ms then `/ready` every 2 ms): {}",
                    x.ready.first().map_or(0, |r| r.samples_ms.len()),
                    x.ready.first().map_or(0, |r| r.concurrency),
                    list.join("; ")
                );
            }
        }
        let _ = writeln!(
            s,
            "\nReproduce: `make bench` (or `cargo run -q --release -p integration --bin oidc-gate-bench -- --help`). Raw per-round numbers: `results.json`."
        );
        s
    }

    /// A horizontal bar chart of median rps (whiskers: min–max over rounds).
    pub fn to_svg(&self) -> String {
        let rows = &self.throughput;
        let (left, right) = (300.0, 150.0);
        let (w, h) = self.svg_size();
        let (row_h, top) = (SVG_ROW_HEIGHT, SVG_TOP);
        let max = rows.iter().map(|r| r.rps_range().1).fold(1.0_f64, f64::max);
        let scale = (w - left - right) / max;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="13">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="10" y="22" font-size="15" font-weight="bold">oidc-gate benchmark: requests/s (median of {} round(s), wrk -c{}, Envoy --concurrency {})</text>"#,
            self.options.rounds, self.options.wrk.connections, self.options.concurrency
        );
        for (i, r) in rows.iter().enumerate() {
            let y = top + row_h * i as f64;
            let (lo, hi) = r.rps_range();
            let color = match r.scenario {
                Scenario::OidcSession | Scenario::OidcBearer => "#2b7bba",
                Scenario::Bare | Scenario::NoopWasm => "#999999",
                _ => "#e08a2c",
            };
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">({}) {}</text>"#,
                left - 8.0,
                y + row_h * 0.6,
                r.scenario.id().split('-').next().unwrap_or(""),
                xml_escape(r.scenario.label())
            );
            let _ = writeln!(
                s,
                r#"<rect x="{left}" y="{}" width="{:.1}" height="{}" fill="{color}"/>"#,
                y + 6.0,
                r.rps() * scale,
                row_h - 12.0
            );
            let _ = writeln!(
                s,
                r#"<line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/>"#,
                left + lo * scale,
                left + hi * scale,
                y + row_h / 2.0,
                y + row_h / 2.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}">{:.0} ({})</text>"#,
                left + hi * scale + 6.0,
                y + row_h * 0.6,
                r.rps(),
                self.ratio(r, Scenario::NoopWasm)
                    .map_or("-".into(), |x| format!("{x:.2}× (2)"))
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="10" y="{}" font-size="11" fill="#555">bars: median; whiskers: min–max over rounds; ratio to (2) the no-op wasm filter</text>"##,
            h - 10.0
        );
        let _ = writeln!(s, "</svg>");
        s
    }

    /// Width and height of [`Report::to_svg`]'s chart, in pixels.
    pub fn svg_size(&self) -> (f64, f64) {
        (
            SVG_WIDTH,
            SVG_TOP + SVG_ROW_HEIGHT * self.throughput.len() as f64 + 30.0,
        )
    }

    /// Renders `dir/rps.svg` (from [`Report::write`]) as `dir/rps.png` with headless Chromium
    /// (`CHROME_BIN`, else `chromium` or `chromium-browser` on PATH); an error says why not.
    pub fn write_png(&self, dir: &Path) -> Result<PathBuf, String> {
        let svg = dir.join("rps.svg");
        let png = dir.join("rps.png");
        let chromium = std::env::var_os("CHROME_BIN")
            .map(PathBuf::from)
            .or_else(|| {
                ["chromium", "chromium-browser"]
                    .iter()
                    .find_map(|name| crate::envoy::which(name))
            })
            .ok_or("no Chromium (apt-get install chromium, or CHROME_BIN)")?;
        let svg = svg
            .canonicalize()
            .map_err(|e| format!("{}: {e}", svg.display()))?;
        let (w, h) = self.svg_size();
        let _ = std::fs::remove_file(&png);
        let mut child = std::process::Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                &format!("--screenshot={}", png.display()),
                &format!("--window-size={},{}", w.ceil(), h.ceil()),
                &format!("file://{}", svg.display()),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", chromium.display()))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err("Chromium did not finish within 30 s".into());
                }
            }
        }
        if png.is_file() {
            Ok(png)
        } else {
            Err("Chromium wrote no screenshot".into())
        }
    }

    /// Write `results.json`, `results.md` and `rps.svg` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir)?;
        let files = [
            (
                dir.join("results.json"),
                serde_json::to_string_pretty(&self.to_json()).unwrap_or_default(),
            ),
            (dir.join("results.md"), self.to_markdown()),
            (dir.join("rps.svg"), self.to_svg()),
        ];
        let mut out = Vec::new();
        for (p, content) in files {
            std::fs::write(&p, content)?;
            out.push(p);
        }
        Ok(out)
    }
}

fn fmt_cpu(us: Option<f64>) -> String {
    us.map_or_else(|| "-".into(), |u| format!("{u:.1}"))
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}"))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
