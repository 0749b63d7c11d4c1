//! The load generator: `wrk` (HTTP/1.1 keep-alive over TLS), with a Lua `done` hook that prints
//! exact percentiles from wrk's full latency histogram.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

/// Marker of the line the Lua script prints.
const MARK: &str = "OIDC_GATE_BENCH";

/// The `done` hook: one line of `key=value` pairs (latencies in microseconds).
const SCRIPT: &str = r#"-- written by oidc-gate-bench
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "OIDC_GATE_BENCH requests=%.0f duration_us=%.0f bytes=%.0f connect=%.0f read=%.0f write=%.0f status=%.0f timeout=%.0f p50=%.0f p90=%.0f p99=%.0f p999=%.0f max=%.0f mean=%.1f\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"#;

/// The wrk binary: `$WRK_BIN`, else `wrk` on `PATH`.
pub fn find_wrk() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("WRK_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("wrk"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "wrk not found: `apt-get install wrk` (Debian) or set WRK_BIN (.ci/run installs it)"
                .to_string()
        })
}

/// Write the Lua script into `dir`; returns its path.
pub fn write_script(dir: &Path) -> std::io::Result<PathBuf> {
    let p = dir.join("bench.lua");
    std::fs::write(&p, SCRIPT)?;
    Ok(p)
}

/// Load settings, the same for every scenario.
#[derive(Clone, Debug)]
pub struct WrkSettings {
    /// `-t`.
    pub threads: u32,
    /// `-c` (keep-alive connections).
    pub connections: u32,
    /// `-d` (whole seconds: rounded up).
    pub duration: Duration,
    /// `--timeout`.
    pub timeout: Duration,
}

impl WrkSettings {
    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "tool": "wrk",
            "threads": self.threads,
            "connections": self.connections,
            "duration_s": self.duration.as_secs_f64(),
            "timeout_s": self.timeout.as_secs_f64(),
            "protocol": "HTTP/1.1 keep-alive over TLS",
        })
    }
}

/// One request shape: URL and headers.
#[derive(Clone, Debug)]
pub struct WrkRequest {
    /// `https://127.0.0.1:<port>/bench`.
    pub url: String,
    /// Extra headers (`Host` first).
    pub headers: Vec<(String, String)>,
}

impl WrkRequest {
    /// Bytes of the request head wrk sends (request line, headers, blank line), approximately.
    pub fn head_bytes(&self) -> usize {
        let path = self
            .url
            .split_once("://")
            .and_then(|(_, r)| r.find('/').map(|i| r.len() - i))
            .unwrap_or(1);
        "GET  HTTP/1.1\r\n\r\n".len()
            + path
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>()
    }
}

/// What one wrk run measured.
#[derive(Clone, Debug, Default)]
pub struct WrkResult {
    /// Completed requests.
    pub requests: u64,
    /// Measured duration in seconds.
    pub duration_s: f64,
    /// Requests per second.
    pub rps: f64,
    /// Latency percentiles, microseconds.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Maximum.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
    /// Response bytes read.
    pub bytes: u64,
    /// Socket errors: connect, read, write, timeout.
    pub socket_errors: u64,
    /// Responses with status >= 400 (as wrk counts them).
    pub status_errors: u64,
}

impl WrkResult {
    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "requests": self.requests,
            "duration_s": self.duration_s,
            "rps": self.rps,
            "p50_us": self.p50_us,
            "p90_us": self.p90_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "max_us": self.max_us,
            "mean_us": self.mean_us,
            "bytes": self.bytes,
            "socket_errors": self.socket_errors,
            "status_errors": self.status_errors,
        })
    }
}

/// Run wrk once (blocking).
pub fn run(
    wrk: &Path,
    script: &Path,
    settings: &WrkSettings,
    req: &WrkRequest,
) -> Result<WrkResult, String> {
    let mut cmd = Command::new(wrk);
    cmd.arg("-t")
        .arg(settings.threads.to_string())
        .arg("-c")
        .arg(settings.connections.to_string())
        .arg("-d")
        .arg(whole_seconds(settings.duration))
        .arg("--timeout")
        .arg(whole_seconds(settings.timeout))
        .arg("-s")
        .arg(script);
    for (k, v) in &req.headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    cmd.arg(&req.url).stdin(Stdio::null());
    let out = cmd
        .output()
        .map_err(|e| format!("spawn {}: {e}", wrk.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "wrk failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse(&stdout).ok_or_else(|| format!("no {MARK} line in wrk output:\n{stdout}"))
}

/// wrk takes whole seconds only (`2s`); rounds up, at least 1 s.
pub fn whole_seconds(d: Duration) -> String {
    format!("{}s", d.as_secs_f64().ceil().max(1.0) as u64)
}

/// Parse the script's line.
pub fn parse(output: &str) -> Option<WrkResult> {
    let line = output.lines().find(|l| l.starts_with(MARK))?;
    let get = |k: &str| -> Option<f64> {
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .find(|(name, _)| *name == k)
            .and_then(|(_, v)| v.parse().ok())
    };
    let requests = get("requests")? as u64;
    let duration_s = get("duration_us")? / 1e6;
    Some(WrkResult {
        requests,
        duration_s,
        rps: if duration_s > 0.0 {
            requests as f64 / duration_s
        } else {
            0.0
        },
        p50_us: get("p50")?,
        p90_us: get("p90")?,
        p99_us: get("p99")?,
        p999_us: get("p999")?,
        max_us: get("max")?,
        mean_us: get("mean")?,
        bytes: get("bytes")? as u64,
        socket_errors: (get("connect")? + get("read")? + get("write")? + get("timeout")?) as u64,
        status_errors: get("status")? as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_script_line() {
        let out = "Running 1s test\nOIDC_GATE_BENCH requests=1000 duration_us=2000000 bytes=5 \
                   connect=0 read=1 write=0 status=2 timeout=0 p50=100 p90=150 p99=300 p999=900 \
                   max=1200 mean=110.5\n";
        let r = parse(out).unwrap();
        assert_eq!(r.requests, 1000);
        assert_eq!(r.rps, 500.0);
        assert_eq!(r.p99_us, 300.0);
        assert_eq!(r.socket_errors, 1);
        assert_eq!(r.status_errors, 2);
    }

    #[test]
    fn head_bytes_counts_path_and_headers() {
        let r = WrkRequest {
            url: "https://127.0.0.1:1/bench".into(),
            headers: vec![("Host".into(), "a".into())],
        };
        assert_eq!(
            r.head_bytes(),
            "GET /bench HTTP/1.1\r\nHost: a\r\n\r\n".len()
        );
    }
}
