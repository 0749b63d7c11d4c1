//! `make bench`'s code path, briefly: scenarios 1–3 (bare Envoy, the no-op wasm filter and its
//! host-call floor variant, oidc-gate with a session cookie) each measure a non-zero rate of 2xx
//! answers, and scenario 3's requests really are authenticated requests.

use std::time::Duration;

use integration::bench::perf::Code;
use integration::bench::{self, BenchOptions, Lab, Scenario, WasmModules};
use integration::browser::{Browser, Mode};
use integration::config::GATEWAY_LISTENER;
use integration::TEST_HOSTS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_scenarios_1_to_3_measure_authenticated_requests() {
    bench::wrk::find_wrk().expect("the benchmark needs wrk");
    let wasm = WasmModules::locate().expect("wasm modules");
    let mut opts = BenchOptions::quick();
    opts.scenarios = vec![
        Scenario::Bare,
        Scenario::NoopWasm,
        Scenario::HostCallFloor,
        Scenario::OidcSession,
    ];
    opts.rounds = 1;
    opts.warmup = Duration::ZERO;
    opts.wrk.duration = Duration::from_secs(1);
    opts.wrk.connections = 4;
    opts.extras = None;
    // linux-perf is on the machines `make test` runs on (.ci/run installs it): in CI it must
    // work; elsewhere a machine that cannot sample says so.
    match bench::perf::available() {
        Ok(()) => opts.perf = true,
        Err(why) if std::env::var_os("CI").is_some() => panic!("perf cannot sample in CI: {why}"),
        Err(why) => eprintln!("not checking --perf: {why}"),
    }

    let lab = Lab::start(&wasm, &opts.scenarios, 1, false)
        .await
        .expect("bench lab");

    // Scenario 3 sends the session cookie of a real login, and that exact request is answered by
    // the route's direct_response (checked by Lab::start); without the cookie the filter refuses
    // it, and a browser navigation is sent to the IdP.
    let req = &lab.requests[&Scenario::OidcSession];
    assert!(
        req.headers
            .iter()
            .any(|(k, v)| k == "Cookie" && v.starts_with("__Host-oidc-gate=")),
        "scenario 3 must send the session cookie: {:?}",
        req.headers
    );
    let v = &lab.verified[&Scenario::OidcSession];
    assert_eq!(v.status, 200, "{v:?}");
    assert!(v.direct_response, "{v:?}");
    assert!(
        matches!(v.unauthenticated_status, Some(s) if s != 200),
        "{v:?}"
    );
    let gw = lab.envoys[&Scenario::OidcSession]
        .listener(GATEWAY_LISTENER)
        .expect("listener");
    let nav = Browser::new(gw, TEST_HOSTS, Mode::Navigation)
        .get(&format!(
            "https://app.example.com{}",
            bench::scenarios::BENCH_PATH
        ))
        .await;
    assert_eq!(nav.status, 302, "{}", nav.describe());
    // The host-call floor is the no-op filter in its other mode: it answers the session cookie's
    // request from the route and refuses one without a cookie itself.
    let v = &lab.verified[&Scenario::HostCallFloor];
    assert_eq!(v.status, 200, "{v:?}");
    assert!(v.direct_response, "{v:?}");
    assert_eq!(v.unauthenticated_status, Some(401), "{v:?}");

    let results = bench::measure(&lab, &opts, &mut |l| eprintln!("{l}"))
        .await
        .expect("measure");
    assert_eq!(results.len(), 4);
    for r in &results {
        assert_eq!(r.rounds.len(), 1, "{}", r.scenario);
        assert!(r.rps() > 0.0, "{}: no requests/s", r.scenario);
        assert!(r.ok_responses() > 0, "{}: no 2xx", r.scenario);
        assert_eq!(
            r.bad_responses(),
            0,
            "{}: non-2xx answers or socket errors during the run",
            r.scenario
        );
        // wrk's count and Envoy's own count of 2xx answers agree (in-flight requests at the end
        // of the run may be counted by Envoy only).
        let w = &r.rounds[0];
        assert!(
            w.envoy_2xx >= w.wrk.requests && w.envoy_2xx <= w.wrk.requests + 64,
            "{}: wrk {} vs Envoy 2xx {}",
            r.scenario,
            w.wrk.requests,
            w.envoy_2xx
        );
    }

    if opts.perf {
        let cpu = |s: Scenario| {
            let r = results.iter().find(|r| r.scenario == s).expect("scenario");
            let samples = r.cpu_samples.clone().expect("perf samples");
            // The responses of the measured run (wrk's count; Envoy may count a few in flight).
            let wrk = r.rounds[0].wrk.requests;
            assert!(
                samples.responses >= wrk && samples.responses <= wrk + 64,
                "{s}: perf's responses {} vs wrk's {wrk}",
                samples.responses
            );
            // perf's CPU time and /proc's agree (the attach time and perf's own cost aside).
            let total = samples.total_us_per_request().expect("responses");
            let proc = r.cpu_us_per_request().expect("/proc CPU");
            assert!(
                total > 0.7 * proc && total < 1.5 * proc,
                "{s}: perf {total:.1} µs vs /proc {proc:.1} µs per request"
            );
            assert!(samples.us_per_request(Code::Envoy) > Some(0.0), "{s}");
            samples.us_per_request(Code::Wasm).expect("responses")
        };
        assert_eq!(cpu(Scenario::Bare), 0.0, "bare Envoy runs no wasm");
        assert!(cpu(Scenario::NoopWasm) > 0.0);
        assert!(cpu(Scenario::HostCallFloor) > 0.0);
        assert!(cpu(Scenario::OidcSession) > 0.0);
    }

    // The shipped modules carry no stage timing: it is a build of its own (`make bench-stages`),
    // which says so when configured.
    for (s, envoy) in &lab.envoys {
        assert!(
            !envoy.log().contains(oidc_filter::abi::timing::LINE_PREFIX),
            "{s}: the module times its stages"
        );
    }

    // The report's files, the chart also as PNG (Chromium is installed wherever `make test` runs
    // the browser tests).
    let report = bench::report::Report {
        environment: serde_json::Value::Null,
        options: opts.clone(),
        credentials: lab.creds.clone(),
        throughput: results,
        stage_timing: Vec::new(),
        extras: None,
    };
    let floor = report.host_call_floor().expect("(2f) against (2) and (3)");
    assert!(floor.contains("oidc-gate (3):"), "{floor}");
    assert!(report.console_targets().contains(&floor));
    assert!(report.to_markdown().contains(&floor));
    let out = tempfile::tempdir().expect("temp dir");
    let files = report.write(out.path()).expect("report files");
    assert_eq!(files.len(), 3);
    let png = report.write_png(out.path()).expect("rps.png");
    let bytes = std::fs::read(&png).expect("read rps.png");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        bytes.len() > 2_000,
        "an empty picture: {} bytes",
        bytes.len()
    );
}

/// `--noop-extra` reaches the no-op filter as its plugin configuration: calibration work is
/// accepted and the scenario still answers 200; a configuration the filter does not understand
/// keeps the lab from starting (a calibration run can never silently measure the plain filter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noop_extra_work_reaches_the_noop_filter() {
    let mut wasm = WasmModules::locate().expect("wasm modules");
    wasm.noop_extra = Some("clock_reads=2 header_writes=3 cookie_byte_passes=1".into());
    let lab = Lab::start(&wasm, &[Scenario::NoopWasm], 1, false)
        .await
        .expect("bench lab with calibration work");
    let v = &lab.verified[&Scenario::NoopWasm];
    assert_eq!(v.status, 200, "{v:?}");
    drop(lab);

    wasm.noop_extra = Some("sleep_ms=5".into());
    assert!(
        Lab::start(&wasm, &[Scenario::NoopWasm], 1, false)
            .await
            .is_err(),
        "an unknown calibration word must fail the lab"
    );
}

/// `--processes`: the rounds run on fresh sets of Envoys, one set at a time, numbered over the
/// whole run, and the report keeps every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_spread_over_fresh_envoys() {
    bench::wrk::find_wrk().expect("the benchmark needs wrk");
    let mut opts = BenchOptions::quick();
    opts.scenarios = vec![Scenario::NoopWasm, Scenario::OidcSession];
    opts.rounds = 2;
    opts.processes = 2;
    opts.warmup = Duration::ZERO;
    opts.wrk.duration = Duration::from_millis(500);
    opts.wrk.connections = 2;
    opts.extras = None;
    let report = bench::run(&opts, &mut |l| eprintln!("{l}"))
        .await
        .expect("bench run");
    for r in &report.throughput {
        let rounds: Vec<usize> = r.rounds.iter().map(|x| x.round).collect();
        assert_eq!(rounds, vec![0, 1], "{}", r.scenario);
        assert!(
            r.ok_responses() > 0 && r.bad_responses() == 0,
            "{}",
            r.scenario
        );
        let pids: Vec<u32> = r
            .rounds
            .iter()
            .map(|x| x.envoy_pid.expect("Envoy's pid"))
            .collect();
        assert_ne!(pids[0], pids[1], "{}: both rounds on one Envoy", r.scenario);
    }
    assert!(report
        .to_markdown()
        .contains("2 interleaved round(s) (order rotated each round) over 2 set(s) of Envoys"));
}
