//! Ended logins shared between the VMs of one Envoy (one per worker thread), through shared data.
//!
//! A logout is recorded in the VM that saw it at once; the other VMs look at the shared set at
//! most once a second on their request path, so a copy of a logged-out cookie is refused
//! everywhere in this Envoy within a second. Other gateway replicas do not see it (SECURITY.md,
//! I86c).

use std::cell::Cell;

use super::cache::shared_key_prefix;
use crate::ended::EndedLogins;
use crate::flow::Gate;
use crate::types::UnixSeconds;
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

/// Attempts at a compare-and-swap update before leaving the endings for the next request.
const PUBLISH_ATTEMPTS: usize = 8;

/// The shared set of one client of one issuer, and this VM's view of it.
pub struct SharedEndings {
    /// The set (up to 192 KiB).
    key: String,
    /// Written after every change of the set: its version (the host's compare-and-swap counter)
    /// is all a VM reads each second, so the set is copied only when it changed.
    version_key: String,
    /// The second the version was last read.
    read_at: Cell<UnixSeconds>,
    /// The version of the set last merged.
    version: Cell<Option<u32>>,
    /// The second a failed write was last logged (at most one line a second).
    warned_at: Cell<UnixSeconds>,
}

impl SharedEndings {
    /// The set of `client_id` at `issuer`: two policies for different clients of one IdP
    /// never end each other's sessions.
    pub fn new(issuer: &str, client_id: &str) -> Self {
        let key = format!("{}/ended-logins/v1", shared_key_prefix(issuer, client_id));
        Self {
            version_key: format!("{key}/version"),
            key,
            read_at: Cell::new(0),
            version: Cell::new(None),
            warned_at: Cell::new(0),
        }
    }

    /// Creates the shared set when no VM did yet, so that later writes are compare-and-swaps.
    /// (Envoy has no create-if-absent: VMs configuring at the same moment may each create it,
    /// which is harmless while it is empty.)
    pub fn init(&self) {
        // Only a missing key reads (None, None); an empty set reads (None, Some(cas)), and
        // writing over it without a CAS could erase endings another VM just published.
        if let Ok((None, None)) = hostcalls::get_shared_data(&self.key) {
            let _ = hostcalls::set_shared_data(&self.key, Some(&[]), None);
        }
    }

    /// Merges what other VMs shared into `gate`, at most once per second.
    pub fn learn(&self, gate: &Gate, now: UnixSeconds) {
        if self.read_at.get() == now {
            return;
        }
        self.read_at.set(now);
        let Ok((_, version)) = hostcalls::get_shared_data(&self.version_key) else {
            return;
        };
        if version.is_none() || version == self.version.get() {
            return;
        }
        // Read after the version: a write between the two reads is merged now and merged again
        // (idempotently) at the next second.
        if let Ok((Some(bytes), _)) = hostcalls::get_shared_data(&self.key) {
            gate.learn_endings(&bytes, now);
            self.version.set(version);
        }
    }

    /// Adds the endings `gate` decided to the shared set. What cannot be written now is given
    /// back to `gate` for the next request; this VM refuses those logins meanwhile.
    pub fn publish(&self, gate: &Gate, now: UnixSeconds) {
        let endings = gate.take_unpublished_endings();
        if endings.is_empty() {
            return;
        }
        for _ in 0..PUBLISH_ATTEMPTS {
            let Ok((bytes, cas)) = hostcalls::get_shared_data(&self.key) else {
                break;
            };
            // Only garbage fails to decode (the key names the format): replacing it loses
            // nothing that was readable.
            let mut set = bytes
                .and_then(|b| EndedLogins::decode(&b, now))
                .unwrap_or_default();
            for e in &endings {
                set.insert(*e, now);
            }
            match hostcalls::set_shared_data(&self.key, Some(&set.encode()), cas) {
                Ok(()) => {
                    let _ = hostcalls::set_shared_data(&self.version_key, Some(&[]), None);
                    gate.learn_ended(&set, now);
                    return;
                }
                Err(Status::CasMismatch) => continue,
                Err(_) => break,
            }
        }
        if self.warned_at.get() != now {
            self.warned_at.set(now);
            log::warn!(
                "oidc-gate: could not share {} ended login(s) with the other workers yet; \
                 retrying with the next request",
                endings.len()
            );
        }
        gate.queue_endings(endings);
    }
}
