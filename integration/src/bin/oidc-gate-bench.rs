//! `make bench`: see `integration::bench` for the method. Writes `target/bench/results.{json,md}`
//! and `target/bench/rps.svg`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use integration::bench::{self, BenchOptions, Scenario};

const USAGE: &str = "\
oidc-gate-bench: oidc-gate against bare Envoy, a no-op wasm filter, Envoy's OAuth2 filter,
ext_authz to a zero-work authorizer and jwt_authn; plus logins/s, refresh, .wasm size, memory
per 10,000 sessions and time to ready.

usage: oidc-gate-bench [options]
  --quick              1 round x 2 s, small extras (smoke check, not a measurement)
  --rounds N           interleaved rounds (default 6)
  --processes N        spread the rounds over N sets of Envoys, each started afresh (default 3;
                       one Envoy process runs a filter faster or slower than the next)
  --duration SECS      wrk duration per scenario per round (default 5)
  --warmup SECS        warm-up per scenario (default 2)
  --connections N      wrk -c (default 16)
  --threads N          wrk -t (default 1)
  --scenarios LIST     comma-separated ids, e.g. 1,2,3 or bare,noop-wasm (default all:
                       1-bare 2-noop-wasm 2f-host-call-floor 3-oidc-gate-session
                       4-envoy-oauth2 5-ext-authz
                       6a-oidc-gate-bearer 6b-jwt-authn 6c-jwt-authn-cached)
  --no-extras          only requests/s and latency
  --jwt-access-tokens  the IdP issues JWT access tokens (session cookie ~2.6 KB) instead of
                       opaque ones (~1.5 KB, default)
  --noop-extra WORK    extra work per request for the no-op filter (2), to calibrate host-call
                       and wasm costs against plain (2): `clock_reads=N header_writes=N
                       cookie_byte_passes=N` (integration/README.md)
  --oidc-b WASM        add scenario (3b): (3) with another oidc-gate module, to compare two
                       builds in one run (the report adds the paired ratio 3b/3)
  --perf               sample each Envoy with Linux perf during the rounds: CPU per request
                       in Envoy's code, the wasm V8 compiled, the kernel and libc
                       (apt-get install linux-perf; make bench-cpu)
  --out DIR            where to write results (default <repo>/target/bench)

Needs: make build (target/wasm32-wasip1/release/oidc_filter.wasm), an Envoy (see
integration/README.md), wrk (apt-get install wrk, or WRK_BIN).";

fn parse_args() -> Result<(BenchOptions, PathBuf), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts = if args.iter().any(|a| a == "--quick") {
        BenchOptions::quick()
    } else {
        BenchOptions::full()
    };
    let mut out = integration::repo_root().join("target/bench");
    let mut it = args.into_iter();
    let secs = |v: Option<String>, name: &str| -> Result<Duration, String> {
        v.and_then(|v| v.parse::<f64>().ok())
            .filter(|s| *s > 0.0 && s.is_finite())
            .map(Duration::from_secs_f64)
            .ok_or_else(|| format!("{name} needs a positive number of seconds"))
    };
    let num = |v: Option<String>, name: &str| -> Result<u32, String> {
        v.and_then(|v| v.parse::<u32>().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{name} needs a positive integer"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => {}
            "-h" | "--help" => return Err(String::new()),
            "--rounds" => opts.rounds = num(it.next(), "--rounds")? as usize,
            "--processes" => opts.processes = num(it.next(), "--processes")? as usize,
            "--duration" => opts.wrk.duration = secs(it.next(), "--duration")?,
            "--warmup" => opts.warmup = secs(it.next(), "--warmup")?,
            "--connections" => opts.wrk.connections = num(it.next(), "--connections")?,
            "--threads" => opts.wrk.threads = num(it.next(), "--threads")?,
            "--no-extras" => opts.extras = None,
            "--jwt-access-tokens" => opts.jwt_access_tokens = true,
            "--perf" => opts.perf = true,
            "--oidc-b" => {
                let wasm = PathBuf::from(it.next().ok_or("--oidc-b needs a .wasm file")?);
                if !wasm.is_file() {
                    return Err(format!("--oidc-b: {} is not a file", wasm.display()));
                }
                opts.oidc_b = Some(wasm);
            }
            "--noop-extra" => {
                opts.noop_extra = Some(it.next().ok_or("--noop-extra needs `name=count ...`")?)
            }
            "--out" => out = PathBuf::from(it.next().ok_or("--out needs a directory")?),
            "--scenarios" => {
                let list = it.next().ok_or("--scenarios needs a list")?;
                let mut v = Vec::new();
                for s in list.split(',').filter(|s| !s.trim().is_empty()) {
                    v.push(Scenario::parse(s).ok_or_else(|| format!("unknown scenario `{s}`"))?);
                }
                v.sort();
                v.dedup();
                opts.scenarios = v;
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if opts.oidc_b.is_some() && !opts.scenarios.contains(&Scenario::OidcSessionB) {
        opts.scenarios.push(Scenario::OidcSessionB);
        opts.scenarios.sort();
    }
    if opts.scenarios.is_empty() {
        return Err("no scenarios".into());
    }
    Ok((opts, out))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let (opts, out) = match parse_args() {
        Ok(x) => x,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("oidc-gate-bench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let per_round = opts.wrk.duration.as_secs_f64() * opts.scenarios.len() as f64;
    println!(
        "oidc-gate-bench: {} scenario(s) x {} round(s) x {:.1} s (wrk -t{} -c{}), about {:.0} s of load{}",
        opts.scenarios.len(),
        opts.rounds,
        opts.wrk.duration.as_secs_f64(),
        opts.wrk.threads,
        opts.wrk.connections,
        per_round * opts.rounds as f64,
        if opts.extras.is_some() { " plus extras" } else { "" }
    );
    let started = std::time::Instant::now();
    let report = match bench::run(&opts, &mut |line| println!("  {line}")).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("oidc-gate-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("\n{}", report.console_table());
    println!("{}", report.console_stages());
    println!("{}", report.console_cpu_split());
    println!("{}", report.console_targets());
    match report.write(&out) {
        Ok(files) => {
            for f in files {
                println!("wrote {}", f.display());
            }
            match report.write_png(&out) {
                Ok(png) => println!("wrote {}", png.display()),
                Err(why) => println!("rps.png not written: {why}"),
            }
        }
        Err(e) => {
            eprintln!("oidc-gate-bench: writing {}: {e}", out.display());
            return ExitCode::FAILURE;
        }
    }
    println!("total {:.0} s", started.elapsed().as_secs_f64());
    ExitCode::SUCCESS
}
