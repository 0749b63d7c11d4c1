//! Host services: randomness and time for the core, and callouts to the IdP.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::types::BufferType;

use super::header_map::HeaderMapBytes;
use super::metrics::Metrics;
use crate::flow::{Callout, Gate};
use crate::types::{Random, RandomUnavailable, UnixSeconds};

/// Timeout of every IdP callout.
pub const CALLOUT_TIMEOUT: Duration = Duration::from_secs(5);

/// Randomness from the host (WASI `random_get`, which Envoy implements).
pub struct HostRandom;

impl Random for HostRandom {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RandomUnavailable> {
        getrandom::getrandom(buf).map_err(|_| RandomUnavailable)
    }
}

/// Converts the host's time to Unix seconds (0 if the host clock is before 1970).
pub fn unix_seconds(t: SystemTime) -> UnixSeconds {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sends `call` to the IdP cluster as the context whose callback is running. Envoy ties every
/// callout to the VM's root context, but the SDK hands the answer to the context that sent it,
/// and drops it if that context has ended. `None` if the host refuses (logged and counted).
pub fn dispatch(
    gate: &Gate,
    metrics: Option<&Metrics>,
    call: &Callout,
    context_id: u32,
) -> Option<u32> {
    let mut headers: Vec<(&str, &str)> = vec![
        (":method", call.method),
        (":path", &call.path),
        (":authority", &call.authority),
    ];
    headers.extend(call.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let body = if call.body.is_empty() {
        None
    } else {
        Some(call.body.as_slice())
    };
    match hostcalls::dispatch_http_call(
        &gate.config().idp_cluster,
        headers,
        body,
        vec![],
        CALLOUT_TIMEOUT,
    ) {
        Ok(token) => Some(token),
        Err(status) => {
            log::error!(
                "oidc-gate #{context_id}: callout to cluster `{}` refused by the host ({status:?}): the cluster is unknown to Envoy or has no endpoints yet (check idp_cluster, and DNS for STRICT_DNS clusters)",
                gate.config().idp_cluster
            );
            if let Some(m) = metrics {
                m.count("callout_errors");
            }
            None
        }
    }
}

/// The answer to a callout: its status, and its body unless it is over `limit` bytes. `None`
/// when there is no answer (timed out, reset; counted). `elapsed` is recorded as its latency.
pub fn call_response(
    metrics: Option<&Metrics>,
    body_size: usize,
    limit: usize,
    elapsed: Option<Duration>,
) -> Option<(u16, Option<Vec<u8>>)> {
    if let (Some(m), Some(elapsed)) = (metrics, elapsed) {
        m.record(
            "callout_latency_ms",
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        );
    }
    // Read in place: the SDK's reader panics on a header value that is not UTF-8, and the
    // IdP's answer is untrusted input.
    let status = HeaderMapBytes::call_response().and_then(|m| {
        m.pairs()
            .find(|(k, _)| *k == b":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<u16>().ok())
    });
    let Some(status) = status else {
        if let Some(m) = metrics {
            m.count("callout_errors");
        }
        return None;
    };
    if body_size > limit {
        return Some((status, None));
    }
    let body = if body_size == 0 {
        Vec::new()
    } else {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default()
    };
    Some((status, Some(body)))
}
