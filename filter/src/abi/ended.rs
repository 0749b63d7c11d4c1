//! Ended logins shared between the VMs of one Envoy (one per worker thread), through shared data.
//!
//! A logout is recorded in the VM that saw it at once; the other VMs read the shared set at most
//! once a second on their request path, so a copy of a logged-out cookie is refused everywhere
//! in this Envoy within a second. Other gateway replicas do not see it (SECURITY.md, I86c).

use std::cell::Cell;

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;
use sha2::{Digest, Sha256};

use crate::ended::EndedLogins;
use crate::flow::Gate;
use crate::types::UnixSeconds;

/// Attempts at a compare-and-swap update before giving up (another VM keeps winning).
const PUBLISH_ATTEMPTS: usize = 8;

/// The shared set of one client of one issuer, and this VM's view of it.
pub struct SharedEndings {
    key: String,
    /// The second the shared set was last read (the request path reads it once a second).
    read_at: Cell<UnixSeconds>,
    /// The version of the shared set last merged.
    cas: Cell<Option<u32>>,
}

impl SharedEndings {
    /// The set of `client_id` at `issuer`: two policies for different clients of one IdP
    /// never end each other's sessions.
    pub fn new(issuer: &str, client_id: &str) -> Self {
        let digest = Sha256::digest(format!("{issuer}\0{client_id}").as_bytes());
        let tag: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Self {
            key: format!("oidc-gate/{tag}/ended-logins/v1"),
            read_at: Cell::new(0),
            cas: Cell::new(None),
        }
    }

    /// Creates the shared value when no VM did yet: every later write is then a compare-and-swap
    /// (writing over a missing key cannot be one, and two first writers would lose an ending).
    pub fn init(&self) {
        if let Ok((None, _)) = hostcalls::get_shared_data(&self.key) {
            let _ =
                hostcalls::set_shared_data(&self.key, Some(&EndedLogins::default().encode()), None);
        }
    }

    /// Merges what other VMs shared into `gate`, at most once per second.
    pub fn learn(&self, gate: &Gate, now: UnixSeconds) {
        if self.read_at.get() == now {
            return;
        }
        self.read_at.set(now);
        if let Ok((Some(bytes), cas)) = hostcalls::get_shared_data(&self.key) {
            if cas.is_none() || cas != self.cas.get() {
                gate.learn_endings(&bytes, now);
                self.cas.set(cas);
            }
        }
    }

    /// Adds the endings `gate` decided to the shared set. On failure this VM still refuses
    /// them; the others do not, which is logged.
    pub fn publish(&self, gate: &Gate, now: UnixSeconds) {
        let endings = gate.take_unpublished_endings();
        if endings.is_empty() {
            return;
        }
        for _ in 0..PUBLISH_ATTEMPTS {
            let (mut set, cas) = match hostcalls::get_shared_data(&self.key) {
                Ok((bytes, cas)) => (
                    bytes
                        .and_then(|b| EndedLogins::decode(&b, now))
                        .unwrap_or_default(),
                    cas,
                ),
                Err(_) => (EndedLogins::default(), None),
            };
            for e in &endings {
                set.insert(*e, now);
            }
            let encoded = set.encode();
            match hostcalls::set_shared_data(&self.key, Some(&encoded), cas) {
                Ok(()) => {
                    // Take the others' endings now rather than at the next second.
                    gate.learn_endings(&encoded, now);
                    return;
                }
                Err(Status::CasMismatch) => continue,
                Err(_) => break,
            }
        }
        log::error!(
            "oidc-gate: could not share {} ended login(s) with the other workers; only this \
             worker refuses them",
            endings.len()
        );
    }
}
