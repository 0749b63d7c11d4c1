//! Refreshes: sent by the root context, their answers applied to every stream waiting.
//!
//! Within a VM, concurrent requests of one session wait for one refresh ("local followers"),
//! the request that started it among them. The root context sends it (woken by a message on
//! its own shared queue, else by its tick) and applies the IdP's answer: a callout belongs to
//! the context whose callback sent it, and a stream's dies with its client, while the IdP may
//! have rotated the refresh token already. Across VMs (worker threads), a shared-data lock lets
//! one VM refresh while the others wait ("remote waiters", polled by the root context's tick)
//! for the answer it stores: with refresh-token rotation, a second refresh with the same token
//! would be refused and log the user out.

use std::cell::Cell;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use proxy_wasm::hostcalls;
use proxy_wasm::types::MapType;

use super::host::{self, unix_seconds, HostRandom};
use super::root::{Follower, Shared, REMOTE_POLL_TICK};
use crate::discovery::{ProviderMetadata, MAX_DOCUMENT_BYTES};
use crate::flow::{
    idp_unavailable, Callout, Decision, Keys, Known, Note, PendingRefresh, RefreshAnswer,
    RefreshStep, MAX_TOKEN_RESPONSE_BYTES,
};
use crate::reply::{Failure, Reply};
use crate::token::Jwks;
use crate::types::Random;

/// How long a request may wait for another worker's refresh.
pub const REMOTE_WAIT_SECS: u64 = 10;

/// How soon the root context sends a refresh a stream asked for.
const DISPATCH_TICK: Duration = Duration::from_millis(1);

/// What the root context's tick is for, slowest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tick {
    /// Nothing: no tick.
    #[default]
    Off,
    /// Polling for other workers' refreshes.
    Poll,
    /// Sending refreshes streams asked for.
    Dispatch,
}

impl Tick {
    fn period(self) -> Duration {
        match self {
            Self::Off => Duration::ZERO,
            Self::Poll => REMOTE_POLL_TICK,
            Self::Dispatch => DISPATCH_TICK,
        }
    }
}

/// A refresh the root context sends or waits on.
struct RootRefresh {
    key: [u8; 16],
    /// The stream that asked for it (it may have ended since).
    leader: u32,
    /// Its view of the refresh, to check the answer with.
    pending: PendingRefresh,
    /// When it was queued.
    queued_at: SystemTime,
    /// When its callout went out.
    started: SystemTime,
    /// Set once the IdP answered and keys to check the answer are being fetched.
    answer: Option<RefreshAnswer>,
}

/// How a root context is woken: its tick, and a shared queue only it reads. One per root
/// context, kept over its configurations (the host has one timer per root context).
#[derive(Default)]
pub struct RootWake {
    /// What the host's timer is set to.
    pub tick: Cell<Tick>,
    /// The queue, once registered.
    pub queue: Cell<Option<u32>>,
    /// Whether registering it was tried.
    pub queue_tried: Cell<bool>,
}

/// The refreshes the root context sends for one configuration.
#[derive(Default)]
pub struct RootCalls {
    queued: Vec<(Callout, RootRefresh)>,
    /// By callout token.
    inflight: HashMap<u32, RootRefresh>,
}

impl RootCalls {
    /// Whether the answer to callout `token` is awaited here.
    pub fn awaits(&self, token: u32) -> bool {
        self.inflight.contains_key(&token)
    }

    /// Queues a refresh the stream `leader` asked for at `at`, for the root to send when woken.
    pub fn queue(
        &mut self,
        call: Callout,
        key: [u8; 16],
        leader: u32,
        pending: PendingRefresh,
        at: SystemTime,
    ) {
        let refresh = RootRefresh {
            key,
            leader,
            pending,
            queued_at: at,
            started: at,
            answer: None,
        };
        self.queued.push((call, refresh));
    }

    /// How many refreshes wait for the root to send them.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// A refresh the stream `leader` asked for, as the root's tick sends it, with callout
    /// `token`.
    #[cfg(test)]
    pub fn sent(&mut self, token: u32, key: [u8; 16], leader: u32, pending: PendingRefresh) {
        self.queue(
            Callout {
                method: "POST",
                path: String::new(),
                authority: String::new(),
                headers: Vec::new(),
                body: Vec::new(),
            },
            key,
            leader,
            pending,
            SystemTime::UNIX_EPOCH,
        );
        if let Some((_, refresh)) = self.queued.pop() {
            self.inflight.insert(token, refresh);
        }
    }
}

/// Has the root context send the refreshes about to be queued as soon as it can; call it before
/// queueing; false if nothing can wake it. A message on the root's own shared queue has the host
/// post its `on_queue_ready` to this worker's event loop, with the 100 ms poll standing by
/// should the message be lost. Without the queue, the 1 ms tick, whose first run comes a few
/// milliseconds later here (the host's timer).
pub fn wake_root(shared: &Shared) -> bool {
    if !shared.root_calls.borrow().queued.is_empty() {
        // Woken already for the refreshes queued before this one.
        return true;
    }
    match wake_queue(&shared.wake) {
        Some(queue) if hostcalls::enqueue_shared_queue(queue, Some(b"r")).is_ok() => {
            raise_tick(shared, Tick::Poll)
        }
        _ => raise_tick(shared, Tick::Dispatch),
    }
}

/// The root's queue, registered on first use: from a stream's callback the host ties it to the
/// stream's root context, and VMs that never see a request (the main thread's, the canary that
/// checks a new configuration) register none, since the host keeps a queue as long as any VM of
/// its plugin runs. The host delivers a queue's messages to the root that registered its name
/// last, and every worker's VM runs this same code: the name is random.
fn wake_queue(wake: &RootWake) -> Option<u32> {
    if !wake.queue_tried.replace(true) {
        let mut nonce = [0u8; 8];
        let queue = if HostRandom.fill(&mut nonce).is_ok() {
            let name = format!("oidc-gate/refresh-wake/{:016x}", u64::from_be_bytes(nonce));
            // SDK 0.2.5 aborts the VM if the host refuses; Envoy never does.
            hostcalls::register_shared_queue(&name).ok()
        } else {
            None
        };
        if queue.is_none() {
            log::warn!("oidc-gate: no refresh queue; refreshes go out on the root's tick");
        }
        wake.queue.set(queue);
    }
    wake.queue.get()
}

/// Makes the root's tick run at least as often as `want` needs; false if the host refuses.
/// Setting the period re-arms the host's timer, so it is set only when it must get faster:
/// requests arriving faster than the period would otherwise keep the tick from ever running.
pub fn raise_tick(shared: &Shared, want: Tick) -> bool {
    let tick = &shared.wake.tick;
    if tick.get() >= want {
        return true;
    }
    // From a stream's callback too: the host ties a stream's tick to its root context.
    match hostcalls::set_tick_period(want.period()) {
        Ok(()) => {
            tick.set(want);
            true
        }
        Err(status) => {
            log::error!("oidc-gate: cannot start the root context's tick ({status:?})");
            false
        }
    }
}

/// The tick one configuration's work needs: off when it has none.
pub fn needs_tick(shared: &Shared) -> Tick {
    if !shared.root_calls.borrow().queued.is_empty() {
        Tick::Dispatch
    } else if !shared.remote_waiters.borrow().is_empty() {
        Tick::Poll
    } else {
        Tick::Off
    }
}

/// Whether the root has anything to do for this configuration.
pub fn has_root_work(shared: &Shared) -> bool {
    let calls = shared.root_calls.borrow();
    !calls.queued.is_empty()
        || !calls.inflight.is_empty()
        || !shared.remote_waiters.borrow().is_empty()
}

/// After the root's work: its tick set to what the work left needs (`want`).
pub fn settle_tick(wake: &RootWake, want: Tick) {
    if wake.tick.get() == want {
        return;
    }
    match hostcalls::set_tick_period(want.period()) {
        Ok(()) => wake.tick.set(want),
        Err(status) => log::error!("oidc-gate: cannot change the root context's tick ({status:?})"),
    }
}

/// A refresh the poll sends this long after it was queued, though the root has its queue, was
/// not woken by the queue's message (counted).
const LATE_SEND: Duration = Duration::from_millis(50);

/// Sends the refreshes streams queued. Only from a root callback: the SDK hands a callout's
/// answer to the context whose callback sent it. `by_tick`: whether the root's tick woke it.
pub fn send_queued(shared: &Shared, at: SystemTime, root_id: u32, by_tick: bool) {
    let queued = std::mem::take(&mut shared.root_calls.borrow_mut().queued);
    for (call, refresh) in queued {
        let late = at
            .duration_since(refresh.queued_at)
            .is_ok_and(|waited| waited >= LATE_SEND);
        if by_tick && late && shared.wake.queue.get().is_some() {
            shared.metrics.count("refreshes_sent_by_tick");
        }
        match host::dispatch(&shared.gate, Some(&shared.metrics), &call, root_id) {
            Some(token) => {
                let refresh = RootRefresh {
                    started: at,
                    ..refresh
                };
                shared
                    .root_calls
                    .borrow_mut()
                    .inflight
                    .insert(token, refresh);
            }
            // The IdP was not asked: nothing to tell the other workers, and the streams waiting
            // go on as without an answer.
            None => give_up_refresh(shared, &refresh.key, unix_seconds(at), root_id),
        }
    }
}

/// The answer to one of the root's callouts: the IdP's to a refresh, or the keys to check it.
pub fn on_root_callout(
    shared: &Shared,
    token: u32,
    body_size: usize,
    at: SystemTime,
    root_id: u32,
) {
    let Some(mut call) = shared.root_calls.borrow_mut().inflight.remove(&token) else {
        log::warn!("oidc-gate #{root_id}: ignoring an unexpected callout answer");
        return;
    };
    let now = unix_seconds(at);
    let elapsed = at.duration_since(call.started).ok();
    match call.answer.take() {
        None => {
            // An answer too large to read is still the IdP's answer: its status decides (a
            // refusal ends the session, a 200 without a readable body too), never "no
            // answer", which would keep the session as an outage does. Timed out or reset:
            // the IdP's failure, the same for every worker.
            let (status, body) = match host::call_response(
                Some(&shared.metrics),
                body_size,
                MAX_TOKEN_RESPONSE_BYTES,
                elapsed,
            ) {
                Some((status, body)) => (status, body.unwrap_or_default()),
                None => (503, Vec::new()),
            };
            let answer = RefreshAnswer {
                status,
                body,
                at: now,
            };
            answer_refresh(shared, call, answer, at, root_id);
        }
        Some(answer) => {
            let fetched = host::call_response(
                Some(&shared.metrics),
                body_size,
                MAX_DOCUMENT_BYTES,
                elapsed,
            );
            let stored = store_fetched_jwks(shared, fetched, now, root_id);
            complete_refresh(shared, call, answer, Some(stored), at, root_id);
        }
    }
}

/// The IdP's answer to a refresh the root sent: shared with the other workers before it is
/// checked, whatever it says (the workers waiting get this verdict, a refusal too, and a new
/// refresh token survives while keys are fetched), then applied to every stream waiting.
fn answer_refresh(
    shared: &Shared,
    call: RootRefresh,
    answer: RefreshAnswer,
    at: SystemTime,
    root_id: u32,
) {
    let now = unix_seconds(at);
    let (key, pending) = (call.key, &call.pending);
    // Refused: another worker may have rotated the refresh token a moment ago; its answer is
    // shared already.
    let rotated_elsewhere = (answer.status != 200)
        .then(|| recent_answer(shared, pending, &key, now))
        .flatten()
        .filter(|elsewhere| elsewhere.status == 200);
    let answer = match rotated_elsewhere {
        Some(elsewhere) => elsewhere,
        None => {
            shared.cache.borrow().store_refresh_result(
                &shared.gate,
                &key,
                &answer,
                pending.tokens_at(),
            );
            shared
                .refreshes
                .borrow_mut()
                .remember(key, &answer, pending.tokens_at(), now);
            answer
        }
    };
    complete_refresh(shared, call, answer, None, at, root_id);
}

/// Checks the answer to `call` and applies it to the streams waiting, after fetching keys for
/// it first when it needs them. `fetched`: whether keys were fetched for it (and stored), `None`
/// if not tried.
fn complete_refresh(
    shared: &Shared,
    call: RootRefresh,
    answer: RefreshAnswer,
    fetched: Option<bool>,
    at: SystemTime,
    root_id: u32,
) {
    let now = unix_seconds(at);
    let jwks = shared.cache.borrow_mut().jwks(now).map(|f| f.value);
    let check = |may_refetch: bool| {
        let keys = Keys {
            jwks: jwks.as_deref(),
            may_refetch,
            fetched_for_it: fetched == Some(true),
        };
        shared
            .gate
            .complete_answered_refresh(&call.pending, &answer, keys, now, &mut HostRandom)
    };
    let (mut step, mut note) = check(fetched.is_none());
    if matches!(step, RefreshStep::NeedKeys) && fetched.is_none() {
        // Keys at hand whose refetch another request claimed in the last 30 s: decided on
        // those, as a stream would.
        if jwks.is_some() && !shared.cache.borrow().claim_jwks_refetch(now) {
            (step, note) = check(false);
        } else if let Some(token) = fetch_keys(shared, now, root_id) {
            let call = RootRefresh {
                started: at,
                answer: Some(answer),
                ..call
            };
            shared.root_calls.borrow_mut().inflight.insert(token, call);
            return;
        }
    }
    record(shared, note, root_id);
    let provider = shared
        .cache
        .borrow_mut()
        .provider(&shared.gate.config().issuer, now)
        .map(|f| f.value);
    match step {
        RefreshStep::Forward(_) | RefreshStep::Ended(_) => {
            shared
                .cache
                .borrow()
                .release_refresh(&shared.gate, &call.key, &answer);
            // The stream that asked, if still waiting, gets the step just decided for it: the
            // ID token check and the new cookie cost milliseconds in wasm, not to be paid twice.
            let leader = shared.refreshes.borrow_mut().take(&call.key, call.leader);
            if let Some(leader) = leader {
                if hostcalls::set_effective_context(leader.context_id).is_ok() {
                    apply(shared, leader, step, now, provider.as_deref());
                }
            }
            release_local(
                shared,
                &call.key,
                &answer,
                now,
                provider.as_deref(),
                fetched == Some(true),
                root_id,
            );
        }
        // No keys to check it with, or an IdP that did not answer: the streams waiting go on
        // as without an answer (the answer stays shared for a request that can check it).
        RefreshStep::NeedKeys | RefreshStep::Unavailable => {
            give_up_refresh(shared, &call.key, now, root_id)
        }
    }
}

/// Sends the root's JWKS fetch; `None` without a discovery document or if the host refuses.
fn fetch_keys(shared: &Shared, now: u64, root_id: u32) -> Option<u32> {
    let provider = shared
        .cache
        .borrow_mut()
        .provider(&shared.gate.config().issuer, now)
        .map(|f| f.value)?;
    let call = shared.gate.document_request(&provider.jwks_uri);
    host::dispatch(&shared.gate, Some(&shared.metrics), &call, root_id)
}

/// Stores a fetched JWKS; whether one was stored. A broken or empty JWKS never replaces a good
/// one: verification goes on with the last good set, or fails closed when there is none.
pub fn store_fetched_jwks(
    shared: &Shared,
    fetched: Option<(u16, Option<Vec<u8>>)>,
    now: u64,
    context_id: u32,
) -> bool {
    match fetched {
        Some((200, Some(body))) => match Jwks::parse(&body) {
            Ok(jwks) => {
                log::info!(
                    "oidc-gate #{context_id}: JWKS fetched ({} usable keys)",
                    jwks.len()
                );
                shared.cache.borrow_mut().store_jwks(&body, jwks, now);
                true
            }
            Err(e) => {
                log::error!("oidc-gate #{context_id}: JWKS refused: {e}");
                false
            }
        },
        Some((status, _)) => {
            log::error!("oidc-gate #{context_id}: JWKS answered HTTP {status} (or too large)");
            false
        }
        None => {
            log::error!(
                "oidc-gate #{context_id}: JWKS callout failed (IdP unreachable or timed out)"
            );
            false
        }
    }
}

/// Counts a note's event and logs its line.
pub fn record(shared: &Shared, note: Note, context_id: u32) {
    if let Some(event) = note.event {
        shared.metrics.event(event);
    }
    if let Some(line) = note.log {
        log::info!("oidc-gate #{context_id}: {line}");
    }
}

/// A stream waiting for another VM's refresh of the same session.
pub struct RemoteWaiter {
    /// The stream and its request.
    pub follower: Follower,
    /// The refresh-token digest.
    pub key: [u8; 16],
    /// When to stop waiting (a retryable 503).
    pub deadline: u64,
}

fn send(reply: &Reply) {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let _ = hostcalls::send_http_response(
        u32::from(reply.status),
        headers,
        Some(reply.body.as_bytes()),
    );
}

/// Applies a refresh answer to a waiting stream. The caller has made it the effective context.
pub fn complete_follower(
    shared: &Shared,
    f: Follower,
    answer: &RefreshAnswer,
    now: u64,
    provider: Option<&ProviderMetadata>,
    fetched_for_it: bool,
) {
    let jwks = shared.cache.borrow_mut().jwks(now).map(|f| f.value);
    let keys = Keys {
        jwks: jwks.as_deref(),
        may_refetch: false,
        fetched_for_it,
    };
    let (step, _) =
        shared
            .gate
            .complete_answered_refresh(&f.pending, answer, keys, now, &mut HostRandom);
    apply(shared, f, step, now, provider);
}

/// Answers a waiting stream whose refresh ended without an answer: on its access token while
/// valid, a retryable 503 after. The caller has made it the effective context.
fn complete_without_answer(shared: &Shared, f: Follower, now: u64) {
    let step = shared.gate.refresh_without_answer(&f.pending, now);
    apply(shared, f, step, now, None);
}

/// Resumes a waiting stream, or answers it, as a refresh step says.
fn apply(
    shared: &Shared,
    f: Follower,
    step: RefreshStep,
    now: u64,
    provider: Option<&ProviderMetadata>,
) {
    match step {
        RefreshStep::Forward(fwd) => {
            let set = |name: &str, value: Option<&str>| {
                hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value).is_ok()
            };
            let mut all_set = set("authorization", fwd.authorization.as_deref())
                & set("cookie", fwd.cookie.as_deref());
            for (name, value) in &fwd.set_headers {
                all_set &= set(name, Some(value));
            }
            if !all_set {
                // The client's own cookie or `Authorization` may still be there: never resumed.
                // (SDK 0.2.5 aborts the VM on a refused write instead, which is as closed.)
                log::error!(
                    "oidc-gate #{}: the host would not set a request header; the request is refused",
                    f.context_id
                );
                send(&Failure::Internal.reply(f.facts.browser(), f.facts.request_id()));
                return;
            }
            shared
                .refreshes
                .borrow_mut()
                .response_cookies
                .insert(f.context_id, fwd.response_cookies);
            let _ = hostcalls::resume_http_request();
        }
        // No keys here to check the refreshed ID token with: as without an answer (the answer
        // stays in shared data for a request that can fetch them).
        RefreshStep::NeedKeys => {
            let step = shared.gate.refresh_without_answer(&f.pending, now);
            apply(shared, f, step, now, provider);
        }
        RefreshStep::Unavailable => {
            send(&Failure::IdpUnavailable.reply(f.facts.browser(), f.facts.request_id()));
        }
        RefreshStep::Ended(clear) => {
            // Decide again without the session: a login redirect for browsers, 401 for APIs.
            let facts = f.facts.without_session();
            // The keys at hand, so that a request also carrying a valid bearer token passes on
            // it, as it would have had it led the refresh. Only a set within its refresh time:
            // from here no refetch can be tried first, and a stale one may still hold a key the
            // IdP withdrew (a 503 then, as before).
            let jwks = shared
                .cache
                .borrow_mut()
                .jwks(now)
                .filter(|f| !f.stale)
                .map(|f| f.value);
            let known = Known {
                provider,
                jwks: jwks.as_deref(),
                may_refetch_keys: false,
            };
            let (decision, note) =
                shared
                    .gate
                    .decide(&facts.request(), known, now, &mut HostRandom);
            if let Some(event) = note.event {
                shared.metrics.event(event);
            }
            match decision {
                Decision::Reply(r) => send(&r.with_cookies(clear)),
                Decision::Forward(mut fwd) => {
                    fwd.response_cookies.extend(clear);
                    apply(shared, f, RefreshStep::Forward(fwd), now, provider);
                }
                _ => send(
                    &Failure::IdpUnavailable
                        .reply(facts.browser(), facts.request_id())
                        .with_cookies(clear),
                ),
            }
        }
    }
}

/// Completes every local follower of `key`, then makes `restore` the effective context again.
pub fn release_local(
    shared: &Shared,
    key: &[u8; 16],
    answer: &RefreshAnswer,
    now: u64,
    provider: Option<&ProviderMetadata>,
    fetched_for_it: bool,
    restore: u32,
) {
    let followers = shared.refreshes.borrow_mut().finish(key);
    for f in followers {
        if hostcalls::set_effective_context(f.context_id).is_ok() {
            complete_follower(shared, f, answer, now, provider, fetched_for_it);
        }
    }
    let _ = hostcalls::set_effective_context(restore);
}

/// Answers the streams waiting for a refresh that ends with no answer to apply (the IdP was not
/// asked, or its answer cannot be checked here).
pub fn abandon_local(shared: &Shared, key: &[u8; 16], now: u64, restore: u32) {
    let followers = shared.refreshes.borrow_mut().finish(key);
    for f in followers {
        if hostcalls::set_effective_context(f.context_id).is_ok() {
            complete_without_answer(shared, f, now);
        }
    }
    let _ = hostcalls::set_effective_context(restore);
}

/// A leader that stops before its refresh finished: the cross-worker lock goes, and this
/// worker's streams waiting for the refresh go on (or get a retryable 503) instead of waiting
/// forever.
pub fn give_up_refresh(shared: &Shared, key: &[u8; 16], now: u64, restore: u32) {
    shared.cache.borrow().unlock_refresh(key);
    abandon_local(shared, key, now, restore);
}

/// Root tick: completes remote waiters whose refresh finished elsewhere (or gave up).
pub fn poll_remote(shared: &Shared, now: u64, root_id: u32) {
    if shared.remote_waiters.borrow().is_empty() {
        return;
    }
    let waiters = std::mem::take(&mut *shared.remote_waiters.borrow_mut());
    let provider = shared
        .cache
        .borrow_mut()
        .provider(&shared.gate.config().issuer, now)
        .map(|f| f.value);
    let mut still = Vec::new();
    for w in waiters {
        // Not one the waiting session already holds (an IdP that does not rotate refresh
        // tokens is answered for the same token again and again): wait for the new one.
        // The lock first: read after the answer, a leader that stored its answer and unlocked
        // in between would look like one that let go without an answer.
        let locked = shared.cache.borrow().refresh_locked(&w.key, now);
        // The result slot, else the verdict the leader left in its lock slot (a refusal that
        // another session's fresh tokens kept out of the result slot).
        let news = |a: &RefreshAnswer| !w.follower.pending.already_reflects(a.at);
        let result = shared
            .cache
            .borrow()
            .refresh_result(&shared.gate, &w.key, now)
            .filter(news)
            .or_else(|| {
                (!locked)
                    .then(|| {
                        shared
                            .cache
                            .borrow()
                            .refresh_verdict(&shared.gate, &w.key, now)
                    })
                    .flatten()
                    .filter(news)
            });
        let answer = match result {
            Some(answer) => answer,
            // A deadline further away than two whole waits: the host clock was set back by
            // more than a wait (a second or two back is no reason to stop waiting).
            None if locked && now < w.deadline && w.deadline <= now + 2 * REMOTE_WAIT_SECS => {
                still.push(w);
                continue;
            }
            // The other worker let go with no answer to share (the callout could not be made, no
            // keys could be had to check the answer, or the request applying an answer from
            // shared data left while fetching keys) or took too long: on the access
            // token while it is valid, a retryable 503 after, as the streams waiting on that
            // worker get. A verdict the IdP gave is in the result slot or the leader's lock slot,
            // so this is rarely one (a collision overwrote both within the poll's 100 ms). The
            // next request refreshes here and meets the IdP's own verdict.
            None => {
                let key = w.key;
                if hostcalls::set_effective_context(w.follower.context_id).is_ok() {
                    complete_without_answer(shared, w.follower, now);
                }
                abandon_local(shared, &key, now, root_id);
                continue;
            }
        };
        let key = w.key;
        let context_id = w.follower.context_id;
        if hostcalls::set_effective_context(context_id).is_ok() {
            complete_follower(shared, w.follower, &answer, now, provider.as_deref(), false);
        }
        release_local(
            shared,
            &key,
            &answer,
            now,
            provider.as_deref(),
            false,
            root_id,
        );
    }
    shared.remote_waiters.borrow_mut().extend(still);
    let _ = hostcalls::set_effective_context(root_id);
}

/// A recent answer to a refresh with this refresh token that the session does not hold yet:
/// new tokens from this VM or another first (this VM's own refusal must not hide another's
/// tokens), then a refusal, then a failure.
pub fn recent_answer(
    shared: &Shared,
    pending: &PendingRefresh,
    key: &[u8; 16],
    now: u64,
) -> Option<RefreshAnswer> {
    let news = |a: &RefreshAnswer| !pending.already_reflects(a.at);
    let own = shared.refreshes.borrow().recent(key, now);
    let cache = shared.cache.borrow();
    let elsewhere = cache.refresh_result(&shared.gate, key, now);
    // A refusal or failure another session's tokens kept out of the result slot, left by its
    // leader in the lock slot.
    let verdict = cache.refresh_verdict(&shared.gate, key, now);
    // New tokens first, then a refusal, then "did not answer"; this VM's own first among equals.
    let rank = |a: &RefreshAnswer| match a.status {
        200 => 0,
        s if idp_unavailable(s) => 2,
        _ => 1,
    };
    [own, elsewhere, verdict]
        .into_iter()
        .flatten()
        .filter(news)
        .min_by_key(rank)
}
