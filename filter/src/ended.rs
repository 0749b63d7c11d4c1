//! Logins that ended before their cookies expire.
//!
//! Sessions live in encrypted cookies, so a copy of a cookie outlives the browser's logout. A
//! login ends when its user logs out at this gateway. Each VM keeps the set of ended logins; the
//! glue shares it between VMs through shared data, and the engine refuses any session of an
//! ended login, cached or not.
//!
//! Records are digests of fixed size: the shared list has a bounded size per entry and holds no
//! subject identifiers in clear.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::session::Session;
use crate::types::UnixSeconds;

/// Digest naming one login.
pub type EndedId = [u8; 16];

/// Ended logins kept at most (32 bytes each in shared data: 128 KiB).
pub const MAX_ENDED: usize = 4096;

/// First byte of the shared encoding; another value is a format this build does not read.
const FORMAT: u8 = 1;
const RECORD_BYTES: usize = 32;

fn digest(kind: &[u8], parts: &[&[u8]]) -> EndedId {
    let mut h = Sha256::new();
    h.update(kind);
    for p in parts {
        // Length-prefixed, so no two different part lists hash the same input.
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let full = h.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&full[..16]);
    id
}

/// One login: its random id, subject and creation time (all kept through refreshes). Cookies
/// sealed before logins had an id are named by subject and creation second alone.
pub fn login_digest(session: &Session) -> EndedId {
    digest(
        b"oidc-gate ended login",
        &[
            session.login_id.as_deref().unwrap_or("").as_bytes(),
            session.subject.as_bytes(),
            &session.created_at.to_be_bytes(),
        ],
    )
}

/// What a session is looked up by; computed once per verified session and cached with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionIds {
    login: EndedId,
    created_at: UnixSeconds,
}

impl SessionIds {
    /// The ids of `session`.
    pub fn of(session: &Session) -> Self {
        Self {
            login: login_digest(session),
            created_at: session.created_at,
        }
    }
}

/// One ended login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ending {
    /// What ended.
    pub id: EndedId,
    /// When: sessions created later are not affected.
    pub ended_at: UnixSeconds,
    /// Until when the record matters: no session it matches can live longer.
    pub keep_until: UnixSeconds,
}

/// The ended logins a VM knows of.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EndedLogins {
    by_id: HashMap<EndedId, Ending>,
}

impl EndedLogins {
    /// Whether nothing ended (the request path then does no lookup).
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// How many records are kept.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether a session with these ids ended.
    pub fn ends(&self, ids: &SessionIds) -> bool {
        self.by_id
            .get(&ids.login)
            .is_some_and(|e| ids.created_at <= e.ended_at)
    }

    /// Adds a record; false when it changed nothing. When full, records past `keep_until` go
    /// first, then the one that expires first: memory stays bounded (SECURITY.md, I86c).
    pub fn insert(&mut self, e: Ending, now: UnixSeconds) -> bool {
        if e.keep_until <= now {
            return false;
        }
        if let Some(old) = self.by_id.get_mut(&e.id) {
            let merged = Ending {
                id: e.id,
                ended_at: old.ended_at.max(e.ended_at),
                keep_until: old.keep_until.max(e.keep_until),
            };
            let changed = merged != *old;
            *old = merged;
            return changed;
        }
        if self.by_id.len() >= MAX_ENDED {
            self.by_id.retain(|_, r| r.keep_until > now);
        }
        if self.by_id.len() >= MAX_ENDED {
            if let Some(first) = self
                .by_id
                .values()
                .min_by_key(|r| r.keep_until)
                .map(|r| r.id)
            {
                if self
                    .by_id
                    .get(&first)
                    .is_some_and(|r| r.keep_until >= e.keep_until)
                {
                    // The new record would be the first to go.
                    return false;
                }
                self.by_id.remove(&first);
            }
        }
        self.by_id.insert(e.id, e);
        true
    }

    /// Adds every record of `other`; true when anything changed.
    pub fn merge(&mut self, other: &EndedLogins, now: UnixSeconds) -> bool {
        let mut changed = false;
        for e in other.by_id.values() {
            changed |= self.insert(*e, now);
        }
        changed
    }

    /// The shared-data encoding: a format byte, then 16-byte id, `ended_at` and `keep_until`
    /// (big-endian) per record.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.by_id.len() * RECORD_BYTES);
        out.push(FORMAT);
        for e in self.by_id.values() {
            out.extend_from_slice(&e.id);
            out.extend_from_slice(&e.ended_at.to_be_bytes());
            out.extend_from_slice(&e.keep_until.to_be_bytes());
        }
        out
    }

    /// Reads [`EndedLogins::encode`]'s output; `None` for anything else (the caller keeps what it
    /// had, so a bad shared value never forgets an ending).
    pub fn decode(bytes: &[u8], now: UnixSeconds) -> Option<Self> {
        let (&format, records) = bytes.split_first()?;
        if format != FORMAT || records.len() % RECORD_BYTES != 0 {
            return None;
        }
        let mut out = Self::default();
        for r in records.chunks_exact(RECORD_BYTES) {
            let (id, times) = r.split_at(16);
            let (ended_at, keep_until) = times.split_at(8);
            out.insert(
                Ending {
                    id: id.try_into().ok()?,
                    ended_at: u64::from_be_bytes(ended_at.try_into().ok()?),
                    keep_until: u64::from_be_bytes(keep_until.try_into().ok()?),
                },
                now,
            );
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Secret;

    fn login(sub: &str, created_at: u64, login_id: Option<&str>) -> Session {
        Session {
            access_token: Secret::new("at"),
            id_token: None,
            refresh_token: None,
            expires_at: created_at + 300,
            subject: sub.into(),
            created_at,
            max_expires_at: created_at + 3600,
            login_id: login_id.map(str::to_string),
            claims: Default::default(),
        }
    }

    /// A login sealed before logins had a random id.
    fn session(sub: &str, created_at: u64) -> Session {
        login(sub, created_at, None)
    }

    fn login_id(sub: &str, created_at: u64) -> EndedId {
        login_digest(&session(sub, created_at))
    }

    fn ending(id: EndedId, ended_at: u64) -> Ending {
        Ending {
            id,
            ended_at,
            keep_until: ended_at + 3600,
        }
    }

    #[test]
    fn a_logged_out_login_ends_and_only_that_login() {
        let mut ended = EndedLogins::default();
        let out = session("alice", 100);
        ended.insert(ending(login_id("alice", 100), 150), 150);
        assert!(ended.ends(&SessionIds::of(&out)));
        // Alice's other login (another browser) and Bob are untouched.
        assert!(!ended.ends(&SessionIds::of(&session("alice", 101))));
        assert!(!ended.ends(&SessionIds::of(&session("bob", 100))));
    }

    #[test]
    fn ids_of_different_logins_never_collide() {
        assert_ne!(login_id("a", 1), login_id("a", 256));
        assert_ne!(login_id("a1", 0), login_id("a", 1));
        // Logging out and in again within the same second is another login.
        assert_ne!(
            login_digest(&login("a", 1, Some("x"))),
            login_digest(&login("a", 1, Some("y")))
        );
        assert_ne!(login_digest(&login("a", 1, Some("x"))), login_id("a", 1));
    }

    #[test]
    fn a_login_keeps_its_id_through_refreshes() {
        let first = login("a", 1, Some("x"));
        let refreshed = Session {
            access_token: Secret::new("at-2"),
            expires_at: 900,
            ..first.clone()
        };
        assert_eq!(SessionIds::of(&first), SessionIds::of(&refreshed));
    }

    #[test]
    fn encoding_round_trips_and_refuses_other_bytes() {
        let mut ended = EndedLogins::default();
        ended.insert(ending(login_id("a", 1), 10), 10);
        ended.insert(ending(login_id("b", 1), 11), 10);
        let bytes = ended.encode();
        assert_eq!(bytes.len(), 1 + 2 * RECORD_BYTES);
        assert_eq!(EndedLogins::decode(&bytes, 10), Some(ended));
        assert_eq!(EndedLogins::decode(&bytes[..bytes.len() - 1], 10), None);
        assert_eq!(EndedLogins::decode(&[], 10), None);
        let mut other_format = bytes.clone();
        other_format[0] = 2;
        assert_eq!(EndedLogins::decode(&other_format, 10), None);
    }

    #[test]
    fn records_past_their_use_are_dropped() {
        let mut ended = EndedLogins::default();
        assert!(!ended.insert(ending(login_id("a", 1), 10), 10 + 3600));
        ended.insert(ending(login_id("a", 1), 10), 10);
        let decoded = EndedLogins::decode(&ended.encode(), 10 + 3600);
        assert_eq!(decoded.map(|d| d.len()), Some(0));
    }

    #[test]
    fn merging_keeps_the_latest_end_and_reports_change() {
        let mut a = EndedLogins::default();
        a.insert(ending(login_id("a", 1), 10), 10);
        let mut b = EndedLogins::default();
        b.insert(ending(login_id("a", 1), 20), 10);
        assert!(a.merge(&b, 20));
        assert!(!a.merge(&b, 20));
        assert!(a.ends(&SessionIds::of(&session("a", 1))));
    }

    #[test]
    fn a_full_set_stays_bounded_and_drops_what_expires_first() {
        let mut ended = EndedLogins::default();
        for i in 0..MAX_ENDED as u64 {
            ended.insert(
                Ending {
                    id: login_id(&i.to_string(), 1),
                    ended_at: 1,
                    keep_until: 1000 + i,
                },
                1,
            );
        }
        assert_eq!(ended.len(), MAX_ENDED);
        assert!(ended.insert(ending(login_id("new", 1), 1), 1));
        assert_eq!(ended.len(), MAX_ENDED);
        assert!(ended.ends(&SessionIds::of(&session("new", 1))));
        // The record that expired first (keep_until 1000) made room.
        assert!(!ended.ends(&SessionIds::of(&session("0", 1))));
        assert!(ended.ends(&SessionIds::of(&session("1", 1))));
        // A record that would expire before all others is not worth an eviction.
        assert!(!ended.insert(
            Ending {
                id: login_id("short", 1),
                ended_at: 1,
                keep_until: 2,
            },
            1
        ));
    }
}
