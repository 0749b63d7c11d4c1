//! Where Envoy's CPU time goes, by the code that runs (`--perf`, `make bench-cpu`): Envoy's own
//! C++ (with V8's runtime, which is linked into the binary), the machine code V8 compiled from the
//! wasm modules, the kernel, and the shared libraries.
//!
//! Stage timing (`make bench-stages`) sees the wall time inside a filter's callbacks; this sees
//! the CPU time everywhere, including work a filter causes outside its callbacks. Linux `perf`
//! samples each scenario's Envoy (every thread) on its CPU-time clock while wrk runs, one sample
//! per [`SAMPLE_PERIOD_NS`] of CPU, so samples × period is CPU time whatever the load.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::Scenario;

/// One sample per this much CPU time of a thread (`perf record -e cpu-clock -c`): about 4,000
/// samples per busy second, a fraction of a percent of its time.
pub const SAMPLE_PERIOD_NS: u64 = 250_000;

/// How long `perf record` gets to attach to every thread before wrk starts (samples taken
/// meanwhile are of an idle Envoy, which takes none).
const ATTACH_TIME: Duration = Duration::from_millis(300);

/// What a sample's code belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Code {
    /// The `envoy` binary: Envoy, BoringSSL, and V8's runtime and builtins.
    Envoy,
    /// Code V8 compiled at run time: the wasm modules (and V8's small call wrappers).
    Wasm,
    /// The kernel (system calls, the network stack, scheduling).
    Kernel,
    /// Shared libraries and the vDSO (libc, libm).
    Libraries,
    /// Anything perf could not place (`[unknown]`, anonymous memory that is not V8's).
    Other,
}

impl Code {
    /// Every kind, in the order of the report's columns.
    pub const ALL: [Code; 5] = [
        Code::Envoy,
        Code::Wasm,
        Code::Kernel,
        Code::Libraries,
        Code::Other,
    ];

    /// The kind of code `perf report --sort dso` names `dso`.
    pub fn of_dso(dso: &str) -> Code {
        if dso.starts_with("[JIT]") {
            Code::Wasm
        } else if dso.starts_with("[kernel") {
            Code::Kernel
        } else if dso
            .rsplit('/')
            .next()
            .is_some_and(|b| b.starts_with("envoy"))
        {
            // `envoy`, or a build named after it (`envoy-contrib`, `envoy-static`).
            Code::Envoy
        } else if dso == "[vdso]" || dso.contains(".so") {
            Code::Libraries
        } else {
            Code::Other
        }
    }

    /// Position in [`Code::ALL`] and in [`CpuSamples::samples`].
    fn index(self) -> usize {
        self as usize
    }

    /// Column heading.
    pub fn label(self) -> &'static str {
        match self {
            Code::Envoy => "envoy",
            Code::Wasm => "wasm (V8-compiled)",
            Code::Kernel => "kernel",
            Code::Libraries => "libc, vdso",
            Code::Other => "other",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Code::Envoy => "envoy",
            Code::Wasm => "wasm",
            Code::Kernel => "kernel",
            Code::Libraries => "libraries",
            Code::Other => "other",
        }
    }
}

/// Samples per kind of code, and the responses they were spent on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuSamples {
    /// Samples per kind, in [`Code::ALL`] order.
    pub samples: [u64; 5],
    /// Responses Envoy counted while the samples were taken.
    pub responses: u64,
}

impl CpuSamples {
    /// Adds one run's samples (`perf report` rows of dso and count) and responses.
    pub fn add(&mut self, rows: &[(String, u64)], responses: u64) {
        for (dso, n) in rows {
            self.samples[Code::of_dso(dso).index()] += n;
        }
        self.responses += responses;
    }

    /// CPU µs per response spent in `code`; `None` before any response.
    pub fn us_per_request(&self, code: Code) -> Option<f64> {
        (self.responses > 0).then(|| {
            self.samples[code.index()] as f64 * SAMPLE_PERIOD_NS as f64
                / 1000.0
                / self.responses as f64
        })
    }

    /// All CPU µs per response.
    pub fn total_us_per_request(&self) -> Option<f64> {
        Code::ALL
            .iter()
            .map(|c| self.us_per_request(*c))
            .sum::<Option<f64>>()
    }
}

/// The rows of `perf report -n --sort dso --stdio`: (dso, samples). Lines that are not rows
/// (comments, blanks, a header) are skipped.
pub fn parse_report(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let share = words.next()?;
            share.strip_suffix('%')?.parse::<f64>().ok()?;
            let samples = words.next()?.parse::<u64>().ok()?;
            let dso = words.collect::<Vec<_>>().join(" ");
            (!dso.is_empty()).then_some((dso, samples))
        })
        .collect()
}

/// Whether `perf record` works here (installed, and allowed to sample this user's processes).
pub fn available() -> Result<(), String> {
    let data =
        std::env::temp_dir().join(format!("oidc-gate-perf-check-{}.data", std::process::id()));
    let out = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-o"])
        .arg(&data)
        .args(["--", "true"])
        .output()
        .map_err(|e| format!("perf: {e} (apt-get install linux-perf)"))?;
    let _ = std::fs::remove_file(&data);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "perf record failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A `perf record` attached to one process; stopped when dropped, if not finished.
pub struct Recording {
    child: Option<Child>,
    data: PathBuf,
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let _ = stop(child);
            let _ = std::fs::remove_file(&self.data);
        }
    }
}

/// Interrupts `perf record`, which then writes its data, as on Ctrl-C, and waits for it.
fn stop(mut child: Child) -> Result<(), String> {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    child
        .wait()
        .map(|_| ())
        .map_err(|e| format!("waiting for perf record: {e}"))
}

impl Recording {
    /// Starts sampling every thread of `pid` into `data`, and gives it [`ATTACH_TIME`] to attach
    /// (perf says nothing when it has).
    pub async fn start(pid: u32, data: &Path) -> Result<Recording, String> {
        let mut child = Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-c"])
            .arg(SAMPLE_PERIOD_NS.to_string())
            .arg("-p")
            .arg(pid.to_string())
            .arg("-o")
            .arg(data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("perf record: {e} (apt-get install linux-perf)"))?;
        tokio::time::sleep(ATTACH_TIME).await;
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return Err(format!(
                "perf record -p {pid} stopped at once ({status}): {}",
                err.trim()
            ));
        }
        Ok(Recording {
            child: Some(child),
            data: data.to_path_buf(),
        })
    }

    /// Stops sampling and returns the samples per dso. No kernel samples at all means perf was
    /// only allowed to see user space (`perf_event_paranoid`): an error, not a split without
    /// the kernel.
    pub fn finish(mut self) -> Result<Vec<(String, u64)>, String> {
        if let Some(child) = self.child.take() {
            stop(child)?;
        }
        let out = Command::new("perf")
            .args(["report", "-n", "--sort", "dso", "--stdio", "-i"])
            .arg(&self.data)
            .output()
            .map_err(|e| format!("perf report: {e}"))?;
        let _ = std::fs::remove_file(&self.data);
        if !out.status.success() {
            return Err(format!(
                "perf report failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let rows = parse_report(&String::from_utf8_lossy(&out.stdout));
        if !rows.is_empty() && !rows.iter().any(|(d, _)| Code::of_dso(d) == Code::Kernel) {
            return Err(
                "perf recorded no kernel samples (is /proc/sys/kernel/perf_event_paranoid > 1?)"
                    .into(),
            );
        }
        Ok(rows)
    }
}

/// The split as a table: one row per scenario, CPU µs per request per kind of code.
pub fn table(rows: &[(Scenario, &CpuSamples)], markdown: bool) -> String {
    let mut heads = vec!["CPU µs per request (perf)".to_string()];
    heads.extend(Code::ALL.iter().map(|c| c.label().to_string()));
    heads.push("total".into());
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let line = |cells: &[String]| {
        if markdown {
            format!("| {} |\n", cells.join(" | "))
        } else {
            let rest: String = cells[1..].iter().map(|c| format!(" {c:>18}")).collect();
            format!("{:<26}{rest}\n", cells[0])
        }
    };
    let mut s = line(&heads);
    if markdown {
        s.push_str(&format!("|---|{}\n", "---:|".repeat(heads.len() - 1)));
    }
    for (scenario, samples) in rows {
        let mut cells = vec![scenario.id().to_string()];
        cells.extend(Code::ALL.iter().map(|c| fmt(samples.us_per_request(*c))));
        cells.push(fmt(samples.total_us_per_request()));
        s.push_str(&line(&cells));
    }
    s
}

/// `{scenario id: {responses, samples, us_per_request: {envoy, wasm, kernel, libraries}}}`.
pub fn to_json(rows: &[(Scenario, &CpuSamples)]) -> Value {
    let mut out = Map::new();
    for (scenario, samples) in rows {
        let us: Map<String, Value> = Code::ALL
            .iter()
            .map(|c| (c.key().to_string(), json!(samples.us_per_request(*c))))
            .collect();
        out.insert(
            scenario.id().to_string(),
            json!({
                "responses": samples.responses,
                "samples": samples.samples.iter().sum::<u64>(),
                "sample_period_ns": SAMPLE_PERIOD_NS,
                "us_per_request": us,
            }),
        );
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "\
# To display the perf.data header info, please use --header/--header-only options.
#
#
# Total Lost Samples: 0
#
# Samples: 39K of event 'cpu-clock'
# Event count (approx.): 9902500000
#
# Overhead       Samples  Shared Object
# ........  ............  ...................
#
    69.51%         27534  envoy
    25.97%         10287  [kernel.kallsyms]
     2.32%           917  libc.so.6
     1.54%           610  [JIT] tid 8661
     0.64%           255  [vdso]
     0.02%             7  libm.so.6


#
# (Tip: For a higher level overview, try: perf report --sort comm,dso)
#
";

    #[test]
    fn samples_are_split_by_the_code_they_hit_and_priced_per_request() {
        let rows = parse_report(REPORT);
        assert_eq!(rows.len(), 6);
        assert_eq!(rows[0], ("envoy".to_string(), 27534));
        assert_eq!(rows[3], ("[JIT] tid 8661".to_string(), 610));
        assert_eq!(Code::of_dso("[JIT] tid 8661"), Code::Wasm);
        assert_eq!(Code::of_dso("[kernel.kallsyms]"), Code::Kernel);
        assert_eq!(Code::of_dso("/usr/local/bin/envoy"), Code::Envoy);
        assert_eq!(Code::of_dso("[vdso]"), Code::Libraries);
        assert_eq!(Code::of_dso("libc.so.6"), Code::Libraries);
        assert_eq!(Code::of_dso("envoy-contrib"), Code::Envoy);
        assert_eq!(Code::of_dso("[unknown]"), Code::Other);
        assert_eq!(Code::of_dso("//anon"), Code::Other);
        for (i, c) in Code::ALL.iter().enumerate() {
            assert_eq!(c.index(), i, "{c:?}");
        }

        let mut s = CpuSamples::default();
        assert_eq!(s.us_per_request(Code::Envoy), None);
        s.add(&rows, 100_000);
        s.add(&[("[JIT] tid 9".to_string(), 400)], 100_000);
        assert_eq!(s.samples, [27534, 1010, 10287, 917 + 255 + 7, 0]);
        assert_eq!(s.responses, 200_000);
        // 1010 samples × 250 µs over 200,000 responses.
        assert_eq!(s.us_per_request(Code::Wasm), Some(1.2625));
        let total = s.total_us_per_request().unwrap();
        assert!(
            (total - 40_010.0 * 250.0 / 200_000.0).abs() < 1e-9,
            "{total}"
        );

        let md = table(&[(Scenario::NoopWasm, &s)], true);
        assert!(
            md.starts_with("| CPU µs per request (perf) | envoy | wasm (V8-compiled) | kernel | libc, vdso | other | total |\n|---|---:|---:|---:|---:|---:|---:|\n"),
            "{md}"
        );
        assert!(
            md.contains("| 2-noop-wasm | 34.4 | 1.3 | 12.9 | 1.5 | 0.0 | 50.0 |"),
            "{md}"
        );
        let j = to_json(&[(Scenario::NoopWasm, &s)]);
        assert_eq!(j["2-noop-wasm"]["us_per_request"]["wasm"], json!(1.2625));
        assert_eq!(j["2-noop-wasm"]["samples"], json!(40_010));
    }

    #[test]
    fn lines_that_are_not_rows_are_skipped() {
        assert!(parse_report("").is_empty());
        assert!(parse_report("# 50.00%  10  envoy\nno numbers here\n12.5% x envoy\n").is_empty());
        assert_eq!(
            parse_report(" 100.00%  3  [JIT] tid 1\n"),
            vec![("[JIT] tid 1".to_string(), 3)]
        );
    }
}
