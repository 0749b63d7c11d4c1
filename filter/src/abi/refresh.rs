//! Completing a refresh for streams that did not send it themselves.
//!
//! Within a VM, concurrent requests of one session wait for the first one's refresh ("local
//! followers"). Across VMs (worker threads), a shared-data lock lets one VM refresh while the
//! others wait ("remote waiters", polled by the root context's tick) for the answer it stores:
//! with refresh-token rotation, a second refresh with the same token would be refused and log the
//! user out.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MapType;

use super::host::HostRandom;
use super::root::{Follower, Shared};
use crate::discovery::ProviderMetadata;
use crate::flow::{Decision, Keys, Known, RefreshAnswer, RefreshStep};
use crate::reply::{Failure, Reply};

/// How long a request may wait for another worker's refresh.
pub const REMOTE_WAIT_SECS: u64 = 10;

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
) {
    let jwks = shared.cache.borrow_mut().jwks(now).map(|f| f.value);
    let keys = Keys {
        jwks: jwks.as_deref(),
        may_refetch: false,
        fetched_for_it: false,
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
            let _ = hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                "authorization",
                fwd.authorization.as_deref(),
            );
            let _ = hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                "cookie",
                fwd.cookie.as_deref(),
            );
            for (name, value) in &fwd.set_headers {
                let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
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
    restore: u32,
) {
    let followers = shared.refreshes.borrow_mut().finish(key);
    for f in followers {
        if hostcalls::set_effective_context(f.context_id).is_ok() {
            complete_follower(shared, f, answer, now, provider);
        }
    }
    let _ = hostcalls::set_effective_context(restore);
}

/// Answers the streams waiting for a refresh whose leader went away without an answer.
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
            // The other worker let go with no answer to share (its client left before the IdP
            // answered, or the callout could not be made) or took too long: on the access
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
            complete_follower(shared, w.follower, &answer, now, provider.as_deref());
        }
        release_local(shared, &key, &answer, now, provider.as_deref(), root_id);
    }
    shared.remote_waiters.borrow_mut().extend(still);
    let _ = hostcalls::set_effective_context(root_id);
}
