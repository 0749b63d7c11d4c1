//! IdP documents (discovery, JWKS) shared by every VM of the Envoy process.
//!
//! Each VM fetches nothing it can read from shared data: the first VM that fetches a document
//! stores the raw body with its fetch time; the others parse it once and keep the parsed form
//! until the shared entry changes (its CAS moves). Istio leaves `vm_id` empty, so all plugins of a
//! gateway share one namespace: keys carry a prefix derived from issuer and cluster (the IdP's
//! documents) or from issuer and client (refreshes, whose answers only that client can use).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use proxy_wasm::hostcalls;

use super::host::HostRandom;
use crate::discovery::ProviderMetadata;
use crate::flow::{idp_unavailable, Gate, RefreshAnswer};
use crate::token::Jwks;
use crate::types::UnixSeconds;

/// Discovery is refetched after this long.
pub const DISCOVERY_TTL_SECS: u64 = 3600;
/// JWKS is refetched after this long (Envoy jwt_authn's default cache duration).
pub const JWKS_TTL_SECS: u64 = 600;
/// A stale document may still be used this long when the IdP cannot be reached.
pub const MAX_STALENESS_SECS: u64 = 24 * 3600;
/// At most one JWKS refetch for an unknown `kid` per this many seconds, process-wide.
pub const JWKS_REFETCH_INTERVAL_SECS: u64 = 30;
/// The shared-data slot holding when the last JWKS refetch was claimed.
const JWKS_REFETCH_SLOT: &str = "jwks-refetch";
/// The same for a discovery document past its refresh time (same interval).
const DISCOVERY_REFETCH_SLOT: &str = "discovery-refetch";

struct Parsed<T> {
    value: Rc<T>,
    fetched_at: UnixSeconds,
    cas: Option<u32>,
}

/// How often a VM looks at shared data for a newer document while it holds one: reading shared
/// data copies the whole document, which the hot path must not pay on every request.
pub const SHARED_RECHECK_SECS: u64 = 5;

/// The per-VM view of the shared IdP documents.
pub struct IdpCache {
    prefix: String,
    /// The refresh slots' prefix: one client's, so that two policies with other clients of the
    /// same IdP never contend for a slot or a lock.
    refresh_prefix: String,
    /// The cross-worker refresh locks this VM holds: which of the session's two lock slots, and
    /// the lock's bytes. Only the holder releases a lock, and only while it is still there.
    held_locks: RefCell<HashMap<[u8; 16], HeldLock>>,
    /// Shared-data keys of the documents, made once: they are looked up on the request path.
    discovery_key: String,
    jwks_key: String,
    provider: Option<Parsed<ProviderMetadata>>,
    provider_checked: UnixSeconds,
    jwks: Option<Parsed<Jwks>>,
    jwks_checked: UnixSeconds,
}

/// A document and how old it is.
pub struct Fresh<T> {
    /// The parsed document.
    pub value: Rc<T>,
    /// Whether it is past its TTL (usable only while the IdP is unreachable).
    pub stale: bool,
}

/// `oidc-gate/<8 bytes of sha256(a, b)>`: Istio leaves `vm_id` empty, so every plugin on a
/// gateway shares one shared-data namespace, and keys name what they belong to.
pub fn shared_key_prefix(a: &str, b: &str) -> String {
    let digest = hmac_sha256::Hash::hash(format!("{a}\0{b}").as_bytes());
    let tag: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("oidc-gate/{tag}")
}

impl IdpCache {
    /// A cache for one issuer behind one cluster, for one client of it.
    pub fn new(issuer: &str, cluster: &str, client_id: &str) -> Self {
        let prefix = shared_key_prefix(issuer, cluster);
        Self {
            refresh_prefix: format!("{}/refresh", shared_key_prefix(issuer, client_id)),
            held_locks: RefCell::new(HashMap::new()),
            discovery_key: format!("{prefix}/discovery"),
            jwks_key: format!("{prefix}/jwks"),
            prefix,
            provider: None,
            provider_checked: 0,
            jwks: None,
            jwks_checked: 0,
        }
    }

    fn key(&self, what: &str) -> String {
        format!("{}/{what}", self.prefix)
    }

    fn refresh_key(&self, what: &str) -> String {
        format!("{}/{what}", self.refresh_prefix)
    }

    /// The provider metadata, if any VM fetched it within the staleness bound.
    pub fn provider(&mut self, issuer: &str, now: UnixSeconds) -> Option<Fresh<ProviderMetadata>> {
        if self.provider.is_none()
            || now >= self.provider_checked.saturating_add(SHARED_RECHECK_SECS)
        {
            refresh(&self.discovery_key, &mut self.provider, |body| {
                ProviderMetadata::parse(body, issuer).ok()
            });
            self.provider_checked = now;
        }
        fresh(&self.provider, DISCOVERY_TTL_SECS, now)
    }

    /// The JWKS, if any VM fetched it within the staleness bound.
    pub fn jwks(&mut self, now: UnixSeconds) -> Option<Fresh<Jwks>> {
        if self.jwks.is_none() || now >= self.jwks_checked.saturating_add(SHARED_RECHECK_SECS) {
            refresh(&self.jwks_key, &mut self.jwks, |body| {
                Jwks::parse(body).ok()
            });
            self.jwks_checked = now;
        }
        fresh(&self.jwks, JWKS_TTL_SECS, now)
    }

    /// Stores a freshly fetched, already validated discovery document.
    pub fn store_provider(
        &mut self,
        body: &[u8],
        value: ProviderMetadata,
        now: UnixSeconds,
    ) -> Rc<ProviderMetadata> {
        let value = Rc::new(value);
        let cas = store(&self.discovery_key, body, now);
        self.provider = Some(Parsed {
            value: value.clone(),
            fetched_at: now,
            cas,
        });
        value
    }

    /// Stores a freshly fetched, already validated JWKS.
    pub fn store_jwks(&mut self, body: &[u8], value: Jwks, now: UnixSeconds) -> Rc<Jwks> {
        let value = Rc::new(value);
        let cas = store(&self.jwks_key, body, now);
        self.jwks = Some(Parsed {
            value: value.clone(),
            fetched_at: now,
            cas,
        });
        value
    }

    /// Claims the process-wide right to refetch the JWKS for an unknown `kid`; false if another
    /// refetch happened too recently (a flood of random `kid`s must not become a flood of fetches).
    pub fn claim_jwks_refetch(&self, now: UnixSeconds) -> bool {
        self.claim_refetch(JWKS_REFETCH_SLOT, now)
    }

    /// Claims the process-wide right to refetch a discovery document past its refresh time;
    /// false if another VM asked the IdP too recently (the cached one is used meanwhile).
    pub fn claim_discovery_refetch(&self, now: UnixSeconds) -> bool {
        self.claim_refetch(DISCOVERY_REFETCH_SLOT, now)
    }

    fn claim_refetch(&self, slot: &str, now: UnixSeconds) -> bool {
        let key = self.key(slot);
        let (last, cas) = match hostcalls::get_shared_data(&key) {
            Ok((Some(bytes), cas)) => (read_u64(&bytes).unwrap_or(0), cas),
            Ok((None, cas)) => (0, cas),
            Err(_) => return false,
        };
        if now < last.saturating_add(JWKS_REFETCH_INTERVAL_SECS) {
            return false;
        }
        hostcalls::set_shared_data(&key, Some(&now.to_be_bytes()), cas).is_ok()
    }
}

fn read_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

fn store(key: &str, body: &[u8], now: UnixSeconds) -> Option<u32> {
    let mut value = Vec::with_capacity(8 + body.len());
    value.extend_from_slice(&now.to_be_bytes());
    value.extend_from_slice(body);
    // Last writer wins: every writer stores a validated document, so no CAS is needed.
    if hostcalls::set_shared_data(key, Some(&value), None).is_err() {
        return None;
    }
    hostcalls::get_shared_data(key)
        .ok()
        .and_then(|(_, cas)| cas)
}

fn refresh<T>(key: &str, slot: &mut Option<Parsed<T>>, parse: impl Fn(&[u8]) -> Option<T>) {
    let Ok((Some(bytes), cas)) = hostcalls::get_shared_data(key) else {
        return;
    };
    if slot
        .as_ref()
        .is_some_and(|p| p.cas.is_some() && p.cas == cas)
    {
        return;
    }
    let Some(fetched_at) = read_u64(&bytes) else {
        return;
    };
    if slot.as_ref().is_some_and(|p| p.fetched_at > fetched_at) {
        return;
    }
    if let Some(value) = bytes.get(8..).and_then(parse) {
        *slot = Some(Parsed {
            value: Rc::new(value),
            fetched_at,
            cas,
        });
    }
}

fn fresh<T>(slot: &Option<Parsed<T>>, ttl: u64, now: UnixSeconds) -> Option<Fresh<T>> {
    let p = slot.as_ref()?;
    let age = now.saturating_sub(p.fetched_at);
    if age > MAX_STALENESS_SECS {
        return None;
    }
    Some(Fresh {
        value: p.value.clone(),
        stale: age > ttl,
    })
}

impl RefreshAnswer {
    /// Whether other streams may still apply it at `now`: an IdP that was down or busy may
    /// answer the next request ([`UNAVAILABLE_RESULT_TTL_SECS`]); anything else settles the
    /// refresh for [`REFRESH_RESULT_TTL_SECS`].
    pub fn is_fresh(&self, now: UnixSeconds) -> bool {
        let ttl = if idp_unavailable(self.status) {
            UNAVAILABLE_RESULT_TTL_SECS
        } else {
            REFRESH_RESULT_TTL_SECS
        };
        now <= self.at.saturating_add(ttl)
    }

    /// Whether these fresh tokens stay when `later`, a refusal or failure, comes: always for
    /// another refresh token (no client can evict other sessions' tokens by provoking refusals),
    /// for the same one until the refused session held them already (tokens up to
    /// `held_up_to`: an IdP that does not rotate refresh tokens answered it, then refused it).
    pub fn stands_against(&self, later: &Self, same_token: bool, held_up_to: UnixSeconds) -> bool {
        self.status == 200
            && later.status != 200
            && later.at <= self.at.saturating_add(REFRESH_RESULT_TTL_SECS)
            && (!same_token || self.at > held_up_to)
    }
}

/// Slots of the process-wide refresh lock and result rings (bounded: shared data has no
/// delete). An answer goes to the slot of the refresh-token digest's bytes 0-1 (modulo 1,024),
/// shared by every session whose refresh falls in it: at R refreshes per second a slot gets
/// another session's answer about every 1,024/R seconds. Fresh tokens give way to another
/// session's tokens, never to another session's refusal or failure (those reach their waiters
/// through the released lock slot), nor to their own session's unless the refused session held
/// them already. A lock takes the first of two slots (the digest's bytes 0-1 and 2-3, each
/// modulo 1,024; the opposite half of the ring when both name the same slot) that no other
/// session's live lock holds, one without a released verdict first, and a live lock is never taken over: only a session whose two lock
/// slots both hold other sessions' live locks refreshes without cross-worker coordination (with
/// refresh-token rotation, two workers may then both present the token and one of the requests
/// lose the session), a chance of about (L/1,024)² for L locks held at once. Each worker also
/// keeps its own recent answers.
const REFRESH_SLOTS: usize = 1024;

/// The result slot of a refresh-token digest, also its first lock slot.
fn refresh_slot_of(key: &[u8; 16]) -> usize {
    usize::from(u16::from_be_bytes([key[0], key[1]])) % REFRESH_SLOTS
}

/// The two lock slots of a refresh-token digest, always different.
fn refresh_lock_slots_of(key: &[u8; 16]) -> [usize; 2] {
    let first = refresh_slot_of(key);
    let second = usize::from(u16::from_be_bytes([key[2], key[3]])) % REFRESH_SLOTS;
    if second == first {
        [first, (first + REFRESH_SLOTS / 2) % REFRESH_SLOTS]
    } else {
        [first, second]
    }
}
/// Refresh answers longer than this are not shared if they carry tokens (a 200 without its body
/// would read as garbage and end the session elsewhere), and shared without their body otherwise
/// (the status decides), so the result ring stays within about 1,024 × 44 KB (a 32 KB body sealed
/// and in base64); real answers (2-4 KB) are far smaller.
pub const MAX_SHARED_REFRESH_RESULT_BYTES: usize = 32 * 1024;
/// How long a refresh's tokens or refusal may be applied by another worker holding the same old
/// refresh token.
pub const REFRESH_RESULT_TTL_SECS: u64 = 60;
/// How long "the IdP did not answer" is shared: long enough for the requests already waiting.
const UNAVAILABLE_RESULT_TTL_SECS: u64 = 10;

impl IdpCache {
    fn refresh_slot(&self, key: &[u8; 16]) -> String {
        // v3: sealed status and body, 1,024 slots. Builds that stored the body in the clear use
        // another name, so the two never read each other's answers during a rollout.
        self.refresh_key(&format!("refreshed/v3/{}", refresh_slot_of(key)))
    }

    /// Remembers the IdP's answer to a refresh from when it came, whatever it says: a request of
    /// the same session on another worker applies it instead of presenting the old (perhaps
    /// rotated) refresh token again, and requests waiting there get the same verdict as this
    /// worker's. Sealed by the gate: its tokens never sit in shared data in the clear. New tokens
    /// for a refresh token are not replaced by a later refusal or failure of the same one,
    /// unless the session refused already held them (tokens up to `held_up_to`): an IdP that
    /// does not rotate refresh tokens answered it, then refused it.
    pub fn store_refresh_result(
        &self,
        gate: &Gate,
        key: &[u8; 16],
        answer: &RefreshAnswer,
        held_up_to: UnixSeconds,
    ) {
        let body: &[u8] = if answer.status == 200
            && (answer.body.is_empty() || answer.body.len() > MAX_SHARED_REFRESH_RESULT_BYTES)
        {
            // Tokens that cannot be shared (too large, or unreadable here): a 200 without them
            // would read as garbage elsewhere and end the session there.
            return;
        } else if answer.body.len() > MAX_SHARED_REFRESH_RESULT_BYTES {
            &[]
        } else {
            &answer.body
        };
        let Some(value) = slot_value(gate, key, answer, body) else {
            return;
        };
        let slot = self.refresh_slot(key);
        // Compare-and-swap, read again on a race: a few rounds at most (one writer per refresh).
        for _ in 0..4 {
            let Ok((current, cas)) = hostcalls::get_shared_data(&slot) else {
                return;
            };
            // A refusal or failure kept out reaches the refused session's waiting requests
            // through its lock slot (release_refresh).
            let kept = current
                .as_deref()
                .and_then(|bytes| held_answer(gate, bytes))
                .is_some_and(|(held_key, held)| {
                    held.stands_against(answer, held_key == *key, held_up_to)
                });
            if kept {
                return;
            }
            if hostcalls::set_shared_data(&slot, Some(&value), cas).is_ok() {
                return;
            }
        }
    }

    /// A recent answer to a refresh with this refresh token, if another stream already got one.
    pub fn refresh_result(
        &self,
        gate: &Gate,
        key: &[u8; 16],
        now: UnixSeconds,
    ) -> Option<RefreshAnswer> {
        let Ok((Some(bytes), _)) = hostcalls::get_shared_data(&self.refresh_slot(key)) else {
            return None;
        };
        read_result(gate, key, &bytes).filter(|a| a.is_fresh(now))
    }
}

/// What a refresh slot holds for an answer: the refresh-token digest and when the answer came
/// in the clear (to find and age it), then the status and `body` sealed to both.
fn slot_value(gate: &Gate, key: &[u8; 16], answer: &RefreshAnswer, body: &[u8]) -> Option<Vec<u8>> {
    let sealed = gate.seal_refresh_result(key, answer.at, answer.status, body, &mut HostRandom)?;
    let mut value = Vec::with_capacity(LOCK_LEN + sealed.len());
    value.extend_from_slice(key);
    value.extend_from_slice(&answer.at.to_be_bytes());
    value.extend_from_slice(&sealed);
    Some(value)
}

/// The answer in a result slot's bytes, whichever refresh token it answers, with that token's
/// digest (another policy's answers do not open and read as nothing).
fn held_answer(gate: &Gate, bytes: &[u8]) -> Option<([u8; 16], RefreshAnswer)> {
    let key: [u8; 16] = bytes.get(..16)?.try_into().ok()?;
    read_result(gate, &key, bytes).map(|answer| (key, answer))
}

/// The answer in a result slot's bytes, if it is for `key` and opens.
fn read_result(gate: &Gate, key: &[u8; 16], bytes: &[u8]) -> Option<RefreshAnswer> {
    if bytes.get(..16)? != key.as_slice() {
        return None;
    }
    let at = read_u64(bytes.get(16..24)?)?;
    let (status, body) = gate.open_refresh_result(key, at, bytes.get(24..)?)?;
    Some(RefreshAnswer { status, body, at })
}

/// A cross-VM refresh lock expires after this long (a refresh callout times out after 5 s).
pub const REFRESH_LOCK_SECS: u64 = 10;
/// A lock: the refresh-token digest and when it was taken. Anything longer in a lock slot is a
/// released lock's verdict.
const LOCK_LEN: usize = 24;
/// Refusal bodies (an OAuth error object) kept in a lock slot; longer ones keep their status only.
const MAX_LOCK_VERDICT_BODY_BYTES: usize = 4 * 1024;

/// A lock this VM took: which of the session's two lock slots, and the lock's bytes.
type HeldLock = (usize, [u8; LOCK_LEN]);

/// Whether a lock slot's bytes are a lock taken less than [`REFRESH_LOCK_SECS`] ago. One stamped
/// later than that from now was taken before the host clock was set back: stale, or a lock whose
/// holder died would hold the session's refreshes for as long as the clock went back.
fn is_live_lock(bytes: &[u8], now: UnixSeconds) -> bool {
    bytes.len() == LOCK_LEN
        && bytes.get(16..24).and_then(read_u64).is_some_and(|t| {
            now < t.saturating_add(REFRESH_LOCK_SECS) && t <= now.saturating_add(REFRESH_LOCK_SECS)
        })
}

impl IdpCache {
    fn refresh_lock_slots(&self, key: &[u8; 16]) -> [String; 2] {
        refresh_lock_slots_of(key).map(|slot| self.refresh_key(&format!("refreshing/v3/{slot}")))
    }

    /// Creates the slots written by compare-and-swap (the refresh lock and result slots, the JWKS
    /// refetch claim): a slot that does not exist yet has no CAS to compare, so two VMs creating
    /// it at once would both win.
    pub fn init_shared_slots(&self) {
        let locks =
            (0..REFRESH_SLOTS).map(|slot| self.refresh_key(&format!("refreshing/v3/{slot}")));
        let results =
            (0..REFRESH_SLOTS).map(|slot| self.refresh_key(&format!("refreshed/v3/{slot}")));
        for name in locks
            .chain(results)
            .chain([JWKS_REFETCH_SLOT, DISCOVERY_REFETCH_SLOT].map(|slot| self.key(slot)))
        {
            // Only a key that does not exist reads (None, None): Envoy hands an empty value
            // over as no bytes with a CAS, and writing over it without one could erase a lock
            // another VM took in between.
            if let Ok((None, None)) = hostcalls::get_shared_data(&name) {
                let _ = hostcalls::set_shared_data(&name, Some(&[]), None);
            }
        }
    }

    /// Whether another VM is refreshing this session right now.
    pub fn refresh_locked(&self, key: &[u8; 16], now: UnixSeconds) -> bool {
        self.refresh_lock_slots(key).iter().any(|slot| {
            matches!(hostcalls::get_shared_data(slot), Ok((Some(bytes), _))
                if bytes.get(..16) == Some(key.as_slice()) && is_live_lock(&bytes, now))
        })
    }

    /// The verdict the leader of this session's last refresh left in its lock slot (a refusal
    /// or failure, which the result slot may not have kept), for the requests that waited.
    pub fn refresh_verdict(
        &self,
        gate: &Gate,
        key: &[u8; 16],
        now: UnixSeconds,
    ) -> Option<RefreshAnswer> {
        self.refresh_lock_slots(key).iter().find_map(|slot| {
            let Ok((Some(bytes), _)) = hostcalls::get_shared_data(slot) else {
                return None;
            };
            if bytes.len() <= LOCK_LEN {
                return None;
            }
            read_result(gate, key, &bytes).filter(|a| a.is_fresh(now))
        })
    }

    /// Takes the process-wide right to refresh this session; false if another VM holds it (or
    /// after two compare-and-swaps lost to other writers, when the request waits one poll). Live
    /// locks of other sessions in both of the session's lock slots are left to them: this
    /// refresh then goes on without cross-worker coordination (true, nothing written).
    pub fn try_lock_refresh(&self, key: &[u8; 16], now: UnixSeconds) -> bool {
        let slots = self.refresh_lock_slots(key);
        // A compare-and-swap lost to another session's write is tried once more with fresh
        // reads: returning false would make this request wait for a refresh nobody leads.
        for _ in 0..2 {
            // Both slots are read before either is taken: another VM may hold this session's
            // lock in the second while the first is free again.
            // (slot, its CAS, whether it holds a released lock's verdict): a slot without one is
            // taken first, so that another session's waiters still find their verdict.
            let mut free: Option<(usize, Option<u32>, bool)> = None;
            for (index, slot) in slots.iter().enumerate() {
                let Ok((bytes, cas)) = hostcalls::get_shared_data(slot) else {
                    continue;
                };
                match bytes {
                    Some(b) if is_live_lock(&b, now) => {
                        if b.get(..16) == Some(key.as_slice()) {
                            return false;
                        }
                    }
                    bytes => {
                        let holds_verdict = bytes.is_some_and(|b| b.len() > LOCK_LEN);
                        if free.is_none_or(|(_, _, verdict)| verdict && !holds_verdict) {
                            free = Some((index, cas, holds_verdict));
                        }
                    }
                }
            }
            let Some((index, cas, _)) = free else {
                return true;
            };
            let mut lock = [0u8; LOCK_LEN];
            lock[..16].copy_from_slice(key);
            lock[16..].copy_from_slice(&now.to_be_bytes());
            if hostcalls::set_shared_data(&slots[index], Some(&lock), cas).is_err() {
                continue;
            }
            if self.back_off_if_locked_elsewhere(key, &slots, index, &lock, now) {
                return false;
            }
            let mut held = self.held_locks.borrow_mut();
            if held.len() >= REFRESH_SLOTS {
                // Leaders release what they hold; this only bounds what a lost release leaves.
                held.retain(|_, (_, l)| is_live_lock(l, now));
            }
            held.insert(*key, (index, lock));
            return true;
        }
        false
    }

    /// After taking `lock` in slot `taken`: another VM may have taken the session's other slot
    /// between this VM's reads and its write (the first slot freed meanwhile). Each writes before
    /// it looks, so at least the one that looks last sees the other's lock and gives its own back
    /// (if both do, their requests go on as without an answer); true if this VM backed off.
    fn back_off_if_locked_elsewhere(
        &self,
        key: &[u8; 16],
        slots: &[String; 2],
        taken: usize,
        lock: &[u8; LOCK_LEN],
        now: UnixSeconds,
    ) -> bool {
        let other = &slots[1 - taken];
        let locked_elsewhere = matches!(hostcalls::get_shared_data(other), Ok((Some(b), _))
            if b.get(..16) == Some(key.as_slice()) && is_live_lock(&b, now));
        if locked_elsewhere {
            if let Ok((Some(b), cas)) = hostcalls::get_shared_data(&slots[taken]) {
                if b == lock {
                    let _ = hostcalls::set_shared_data(&slots[taken], Some(&[]), cas);
                }
            }
        }
        locked_elsewhere
    }

    /// Releases the lock if this VM took it and it is still there.
    pub fn unlock_refresh(&self, key: &[u8; 16]) {
        self.write_released(key, &[]);
    }

    /// Releases the lock if this VM took it and it is still there, leaving a refusal or failure in its
    /// place for the requests that waited on other workers: the result slot may be kept by
    /// another session's fresh tokens.
    pub fn release_refresh(&self, gate: &Gate, key: &[u8; 16], answer: &RefreshAnswer) {
        if answer.status == 200 {
            return self.unlock_refresh(key);
        }
        let body: &[u8] = if answer.body.len() <= MAX_LOCK_VERDICT_BODY_BYTES {
            &answer.body
        } else {
            &[]
        };
        match slot_value(gate, key, answer, body) {
            Some(value) => self.write_released(key, &value),
            None => self.unlock_refresh(key),
        }
    }

    fn write_released(&self, key: &[u8; 16], value: &[u8]) {
        // A refresh that went on without coordination holds nothing: a lock of its session in
        // either slot is another VM's.
        let Some((index, lock)) = self.held_locks.borrow_mut().remove(key) else {
            return;
        };
        let slot = &self.refresh_lock_slots(key)[index];
        if let Ok((Some(b), cas)) = hostcalls::get_shared_data(slot) {
            // Only the lock this VM took, never a verdict or a lock taken since.
            if b == lock {
                let _ = hostcalls::set_shared_data(slot, Some(value), cas);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(fetched_at: UnixSeconds) -> Option<Parsed<u8>> {
        Some(Parsed {
            value: Rc::new(1),
            fetched_at,
            cas: None,
        })
    }

    // Found in review: reading both lock slots before taking one does not make the choice
    // atomic. Worker two read the first slot still held by another session and took the
    // second; worker one read the first freed and took it: two leaders of one session.
    #[test]
    fn of_two_workers_that_lock_a_session_in_both_slots_the_later_backs_off() {
        let worker = || {
            let cache = IdpCache::new("https://idp.example.com", "idp", "gate");
            cache.init_shared_slots();
            cache
        };
        let (one, two) = (worker(), worker());
        let key = [5u8; 16];
        let slots = one.refresh_lock_slots(&key);
        assert!(one.try_lock_refresh(&key, 4_000));
        // Worker two's write lands in the second slot after worker one took the first.
        let mut lock = [0u8; LOCK_LEN];
        lock[..16].copy_from_slice(&key);
        lock[16..].copy_from_slice(&4_000u64.to_be_bytes());
        assert!(hostcalls::set_shared_data(&slots[1], Some(&lock), None).is_ok());
        assert!(two.back_off_if_locked_elsewhere(&key, &slots, 1, &lock, 4_000));
        assert!(
            matches!(hostcalls::get_shared_data(&slots[1]), Ok((None, Some(_)))),
            "worker two gave its slot back"
        );
        assert!(!one.back_off_if_locked_elsewhere(&key, &slots, 0, &lock, 4_000));
        assert!(one.refresh_locked(&key, 4_000), "worker one leads");
        assert!(!two.try_lock_refresh(&key, 4_000));
    }

    #[test]
    fn documents_go_stale_after_their_ttl_and_are_dropped_after_the_staleness_bound() {
        let s = slot(1_000);
        let at = |now| fresh(&s, JWKS_TTL_SECS, now).map(|f| f.stale);
        assert_eq!(at(1_000 + JWKS_TTL_SECS), Some(false));
        assert_eq!(
            at(1_000 + JWKS_TTL_SECS + 1),
            Some(true),
            "stale: refetch, usable only while the IdP is down"
        );
        assert_eq!(at(1_000 + MAX_STALENESS_SECS), Some(true));
        assert_eq!(
            at(1_000 + MAX_STALENESS_SECS + 1),
            None,
            "past the bound: fail closed"
        );
        assert!(fresh::<u8>(&None, JWKS_TTL_SECS, 0).is_none());
    }
}
