//! The root context: configuration, and one stream context per request.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use std::time::Duration;

use super::cache::{IdpCache, MAX_SHARED_REFRESH_RESULT_BYTES};
use super::ended::SharedEndings;
use super::metrics::Metrics;
use super::refresh::{
    has_root_work, needs_tick, on_root_callout, poll_remote, send_queued, settle_tick,
    RemoteWaiter, RootCalls, RootWake,
};
use super::stream::{Facts, Stream};
use super::timing::{self, Stage};
use crate::config::Config;
use crate::flow::{Gate, PendingRefresh, RefreshAnswer};
use crate::types::UnixSeconds;

/// A stream waiting for another stream's refresh of the same session.
pub struct Follower {
    /// Its context id.
    pub context_id: u32,
    /// Its own view of the pending refresh (its cookie header).
    pub pending: PendingRefresh,
    /// Its request, to decide again if the refresh fails.
    pub facts: Facts,
}

/// Refreshes in flight in this VM, keyed by a digest of the refresh token: concurrent requests
/// of one session share one refresh instead of a storm of them.
#[derive(Default)]
pub struct RefreshRegistry {
    inflight: HashMap<[u8; 16], Vec<Follower>>,
    /// `Set-Cookie` values for followers' responses, by context id.
    pub response_cookies: HashMap<u32, Vec<String>>,
    /// The IdP's recent answers to this VM's refreshes, by refresh-token digest: a request of
    /// the same session that comes later (its cookie sent before the refreshed one arrived)
    /// applies the answer even when another session took the shared slot since.
    answers: HashMap<[u8; 16], RefreshAnswer>,
}

/// Recent refresh answers a VM keeps (a few KB each).
const RECENT_ANSWERS: usize = 256;

impl RefreshRegistry {
    /// Registers a leader; false if a refresh for this key is already in flight.
    pub fn lead(&mut self, key: [u8; 16]) -> bool {
        if self.inflight.contains_key(&key) {
            return false;
        }
        self.inflight.insert(key, Vec::new());
        true
    }

    /// Adds a follower to an in-flight refresh.
    pub fn follow(&mut self, key: [u8; 16], follower: Follower) {
        self.inflight.entry(key).or_default().push(follower);
    }

    /// Ends a refresh; returns its followers.
    pub fn finish(&mut self, key: &[u8; 16]) -> Vec<Follower> {
        self.inflight.remove(key).unwrap_or_default()
    }

    /// Keeps an answer this VM got from the IdP (not one over 32 KB: tokens that large are not
    /// kept for other streams anywhere). As in shared data, a refusal or failure replaces new
    /// tokens for the same refresh token only when the refused session held them already
    /// (tokens up to `held_up_to`).
    pub fn remember(
        &mut self,
        key: [u8; 16],
        answer: &RefreshAnswer,
        held_up_to: UnixSeconds,
        now: UnixSeconds,
    ) {
        if answer.body.len() > MAX_SHARED_REFRESH_RESULT_BYTES {
            return;
        }
        self.answers.retain(|_, a| a.is_fresh(now));
        if let Some(held) = self.answers.get(&key) {
            if !held.stands_against(answer, true, held_up_to) {
                self.answers.insert(key, answer.clone());
            }
            return;
        }
        if self.answers.len() >= RECENT_ANSWERS {
            // The oldest goes, a refusal or failure before any tokens: a flood of refusals (a
            // client replaying revoked cookies) must not push out other sessions' new tokens.
            let evict = self
                .answers
                .iter()
                .min_by_key(|(_, a)| (a.status == 200, a.at))
                .map(|(k, a)| (*k, a.status));
            match evict {
                Some((_, 200)) if answer.status != 200 => return,
                Some((oldest, _)) => {
                    self.answers.remove(&oldest);
                }
                None => {}
            }
        }
        self.answers.insert(key, answer.clone());
    }

    /// A recent answer this VM got for this refresh token.
    pub fn recent(&self, key: &[u8; 16], now: UnixSeconds) -> Option<RefreshAnswer> {
        self.answers.get(key).filter(|a| a.is_fresh(now)).cloned()
    }

    /// Takes one follower out of an in-flight refresh, to be answered on its own.
    pub fn take(&mut self, key: &[u8; 16], context_id: u32) -> Option<Follower> {
        let followers = self.inflight.get_mut(key)?;
        let at = followers.iter().position(|f| f.context_id == context_id)?;
        Some(followers.swap_remove(at))
    }

    /// Forgets a follower whose stream ended.
    pub fn forget(&mut self, key: &[u8; 16], context_id: u32) {
        if let Some(f) = self.inflight.get_mut(key) {
            f.retain(|f| f.context_id != context_id);
        }
        self.response_cookies.remove(&context_id);
    }
}

/// What every stream of a VM shares.
pub struct Shared {
    /// The engine.
    pub gate: Rc<Gate>,
    /// IdP documents.
    pub cache: RefCell<IdpCache>,
    /// Metrics.
    pub metrics: Metrics,
    /// Refreshes in flight.
    pub refreshes: RefCell<RefreshRegistry>,
    /// Streams waiting for another VM's refresh.
    pub remote_waiters: RefCell<Vec<RemoteWaiter>>,
    /// Refreshes the root context sends.
    pub root_calls: RefCell<RootCalls>,
    /// How the root context is woken.
    pub wake: Rc<RootWake>,
    /// Ended logins shared with the other VMs.
    pub endings: SharedEndings,
}

/// How often the root context looks for refreshes finished by other VMs, while a stream waits
/// for one. The tick runs only while there is such work (or a refresh to send): an idle worker
/// is not woken ten times a second for nothing.
pub const REMOTE_POLL_TICK: Duration = Duration::from_millis(100);

/// The per-VM root context.
pub struct Root {
    id: u32,
    shared: Option<Rc<Shared>>,
    /// Earlier configurations' state while streams hold it or the root has work for them.
    retired: Vec<Rc<Shared>>,
    wake: Rc<RootWake>,
    /// The host asked the root to finish (its plugin is going away).
    closing: bool,
}

/// Whether a replaced configuration must still be served: its streams may still queue refreshes
/// or wait on other workers, and the root may still have refreshes to send or answer for it.
fn still_needed(shared: &Rc<Shared>) -> bool {
    Rc::strong_count(shared) > 1 || has_root_work(shared)
}

impl Root {
    /// The root context with the id the host gave it.
    pub fn new(id: u32) -> Self {
        Self {
            id,
            shared: None,
            retired: Vec::new(),
            wake: Rc::new(RootWake::default()),
            closing: false,
        }
    }

    /// A root serving `shared` (built with this root's `wake`), for tests.
    #[cfg(test)]
    pub fn serving(id: u32, shared: Rc<Shared>) -> Self {
        let mut root = Self::new(id);
        root.wake = shared.wake.clone();
        root.shared = Some(shared);
        root
    }

    /// The wake state every configuration of this root shares.
    #[cfg(test)]
    pub fn wake(&self) -> Rc<RootWake> {
        self.wake.clone()
    }

    /// Makes `shared` the configuration new streams get. The one it replaces is kept while its
    /// streams hold it or the root has refreshes to send, answers to apply or polls to run for it.
    pub fn install(&mut self, shared: Option<Rc<Shared>>) {
        if let Some(old) = std::mem::replace(&mut self.shared, shared) {
            self.retired.push(old);
        }
        self.retired.retain(still_needed);
    }

    /// Whether the root has work left for any configuration.
    fn has_work(&self) -> bool {
        self.shared
            .iter()
            .chain(&self.retired)
            .any(|s| has_root_work(s))
    }

    /// After the root's work: lets retired configurations go once unneeded, and tells the host
    /// the root is done if it asked and nothing is left.
    fn tidy(&mut self) {
        self.retired.retain(still_needed);
        if self.closing && !self.has_work() {
            self.closing = false;
            let _ = hostcalls::done();
        }
    }

    /// Every configuration the root works for: the current one first.
    fn serving_all(&self) -> Vec<Rc<Shared>> {
        self.shared
            .iter()
            .chain(self.retired.iter())
            .cloned()
            .collect()
    }

    /// Sends what streams queued, polls for other workers' refreshes, lets retired configurations
    /// go once done, and sets the tick to what is left.
    fn work(&mut self, from_tick: bool) {
        let at = self.get_current_time();
        let now = super::host::unix_seconds(at);
        let mut want = super::refresh::Tick::Off;
        for shared in self.serving_all() {
            send_queued(&shared, at, self.id, from_tick);
            if from_tick {
                poll_remote(&shared, now, self.id);
            }
            want = want.max(needs_tick(&shared));
        }
        settle_tick(&self.wake, want);
        self.tidy();
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let serving = self.serving_all();
        let shared = serving
            .iter()
            .find(|s| s.root_calls.borrow().awaits(token_id))
            .or(serving.first());
        if let Some(shared) = shared {
            on_root_callout(
                shared,
                token_id,
                body_size,
                self.get_current_time(),
                self.id,
            );
        }
        drop(serving);
        self.tidy();
    }

    fn on_done(&mut self) -> bool {
        // The plugin is going away, perhaps while a refresh is in flight for a request whose
        // client left: its answer is still shared before the root goes (`tidy`).
        self.closing = self.has_work();
        !self.closing
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match Config::parse(&bytes, &|name| std::env::var(name).ok()) {
            Ok(config) => {
                log::info!(
                    "oidc-gate: configured for issuer {} via cluster {} ({} host patterns)",
                    config.issuer,
                    config.idp_cluster,
                    config.hosts.len()
                );
                for warning in config.warnings() {
                    log::warn!("oidc-gate: {warning}");
                }
                let shared = Rc::new(Shared {
                    endings: SharedEndings::new(&config.issuer, &config.client_id),
                    cache: RefCell::new(IdpCache::new(
                        &config.issuer,
                        &config.idp_cluster,
                        &config.client_id,
                    )),
                    gate: Rc::new(Gate::new(config)),
                    metrics: Metrics::default(),
                    refreshes: RefCell::new(RefreshRegistry::default()),
                    remote_waiters: RefCell::new(Vec::new()),
                    root_calls: RefCell::new(RootCalls::default()),
                    wake: self.wake.clone(),
                });
                shared.cache.borrow().init_shared_slots();
                shared.endings.init();
                self.install(Some(shared));
                timing::announce();
                true
            }
            Err(e) => {
                log::error!("oidc-gate: {e}");
                self.install(None);
                false
            }
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        // The messages only wake the root: the refreshes to send are in `root_calls`.
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
        self.work(false);
    }

    fn on_tick(&mut self) {
        self.work(true);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Without a valid configuration every stream fails closed (Stream answers 500).
        timing::start();
        let stream = Stream::new(context_id, self.shared.clone());
        timing::end(Stage::Create);
        Some(Box::new(stream))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
