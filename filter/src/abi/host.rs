//! Host services for the core: randomness and time.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::types::{Random, RandomUnavailable, UnixSeconds};

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
