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

use crate::session::Session;
use crate::types::UnixSeconds;

/// Digest naming one login.
pub type EndedId = [u8; 16];

/// Ended logins kept at most: 8,192 logouts per `session_max_age` in one Envoy (24 bytes each
/// in shared data: 192 KiB).
pub const MAX_ENDED: usize = 8192;

const RECORD_BYTES: usize = 24;

fn digest(kind: &[u8], parts: &[&[u8]]) -> EndedId {
    let mut h = hmac_sha256::Hash::new();
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

/// A login by its random id (sealed in the session, kept through refreshes), subject and
/// creation time.
fn login_digest(login_id: &str, session: &Session) -> EndedId {
    digest(
        b"oidc-gate ended login",
        &[
            login_id.as_bytes(),
            session.subject.as_bytes(),
            &session.created_at.to_be_bytes(),
        ],
    )
}

/// A session without a login id, named by subject and creation second alone. No build that
/// can open today's cookies seals one (login ids came before the key derivation that made older
/// cookies unreadable), so this only keeps an id-less session refusable rather than unnamed.
fn legacy_digest(session: &Session) -> EndedId {
    digest(
        b"oidc-gate ended legacy login",
        &[
            session.subject.as_bytes(),
            &session.created_at.to_be_bytes(),
        ],
    )
}

/// What a session is looked up by; computed once per verified session and cached with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionIds {
    id: EndedId,
}

impl SessionIds {
    /// The id of `session`: by its login id, or the legacy name when it has none. A session with
    /// an id is never looked up by the legacy name, so logging in again within the second of a
    /// logout is a new login.
    pub fn of(session: &Session) -> Self {
        Self {
            id: match &session.login_id {
                Some(l) => login_digest(l, session),
                None => legacy_digest(session),
            },
        }
    }
}

/// What a logout of `session` ends: its login, under the one id its copies are looked up by.
/// One record per logout, so the list holds as many logouts as it has records, and evicting a
/// record never leaves half of a logout behind.
pub fn ending_of(session: &Session, keep_until: UnixSeconds) -> Ending {
    Ending {
        id: SessionIds::of(session).id,
        keep_until,
    }
}

/// One ended login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ending {
    /// What ended.
    pub id: EndedId,
    /// Until when the record matters: no session it names can live longer.
    pub keep_until: UnixSeconds,
}

/// What [`EndedLogins::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// The record is new or lasts longer now.
    Changed,
    /// It was known already.
    Unchanged,
    /// The set was full of live records: the one expiring first (maybe the new one) was dropped.
    Evicted,
}

/// The ended logins a VM knows of.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EndedLogins {
    keep_until: HashMap<EndedId, UnixSeconds>,
}

impl EndedLogins {
    /// Whether nothing ended (the request path then does no lookup).
    pub fn is_empty(&self) -> bool {
        self.keep_until.is_empty()
    }

    /// How many records are kept.
    pub fn len(&self) -> usize {
        self.keep_until.len()
    }

    /// Whether a session with these ids ended.
    pub fn ends(&self, ids: &SessionIds) -> bool {
        self.keep_until.contains_key(&ids.id)
    }

    /// Adds a record. Records past `keep_until` make room first; when the set is still full, the
    /// record that expires first goes, so memory stays bounded (SECURITY.md, I86c).
    pub fn insert(&mut self, e: Ending, now: UnixSeconds) -> Inserted {
        if e.keep_until <= now {
            return Inserted::Unchanged;
        }
        if let Some(old) = self.keep_until.get_mut(&e.id) {
            if e.keep_until <= *old {
                return Inserted::Unchanged;
            }
            *old = e.keep_until;
            return Inserted::Changed;
        }
        if self.keep_until.len() >= MAX_ENDED {
            self.keep_until.retain(|_, until| *until > now);
        }
        if self.keep_until.len() >= MAX_ENDED {
            let first = self
                .keep_until
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(id, until)| (*id, *until));
            if let Some((id, until)) = first {
                if until >= e.keep_until {
                    return Inserted::Evicted;
                }
                self.keep_until.remove(&id);
            }
            self.keep_until.insert(e.id, e.keep_until);
            return Inserted::Evicted;
        }
        self.keep_until.insert(e.id, e.keep_until);
        Inserted::Changed
    }

    /// Adds every record of `other`.
    pub fn merge(&mut self, other: &EndedLogins, now: UnixSeconds) {
        for (id, until) in &other.keep_until {
            self.insert(
                Ending {
                    id: *id,
                    keep_until: *until,
                },
                now,
            );
        }
    }

    /// The shared-data encoding: per record, the 16-byte id and `keep_until` (big-endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.keep_until.len() * RECORD_BYTES);
        for (id, until) in &self.keep_until {
            out.extend_from_slice(id);
            out.extend_from_slice(&until.to_be_bytes());
        }
        out
    }

    /// Reads [`EndedLogins::encode`]'s output, dropping records past their use; `None` for
    /// anything else.
    pub fn decode(bytes: &[u8], now: UnixSeconds) -> Option<Self> {
        if bytes.len() % RECORD_BYTES != 0 {
            return None;
        }
        let mut out = Self::default();
        for r in bytes.chunks_exact(RECORD_BYTES) {
            let (id, until) = r.split_at(16);
            out.insert(
                Ending {
                    id: id.try_into().ok()?,
                    keep_until: u64::from_be_bytes(until.try_into().ok()?),
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
            tokens_at: created_at,
            subject: sub.into(),
            created_at,
            seen_at: 0,
            max_expires_at: created_at + 3600,
            login_id: login_id.map(str::to_string),
            claims: Default::default(),
        }
    }

    fn ended_by_logout_of(s: &Session, now: u64) -> EndedLogins {
        let mut ended = EndedLogins::default();
        ended.insert(ending_of(s, now + 3600), now);
        ended
    }

    fn ends(ended: &EndedLogins, s: &Session) -> bool {
        ended.ends(&SessionIds::of(s))
    }

    #[test]
    fn a_logged_out_login_ends_and_only_that_login() {
        let out = login("alice", 100, Some("l1"));
        let ended = ended_by_logout_of(&out, 150);
        assert!(ends(&ended, &out));
        // Alice's other logins, even one made in the same second, and Bob are untouched.
        assert!(!ends(&ended, &login("alice", 100, Some("l2"))));
        assert!(!ends(&ended, &login("alice", 101, Some("l1"))));
        assert!(!ends(&ended, &login("bob", 100, Some("l1"))));
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
    fn a_logout_is_one_record_under_the_id_its_copies_are_looked_up_by() {
        let with_id = login("a", 1, Some("x"));
        let ended = ended_by_logout_of(&with_id, 5);
        assert_eq!(ended.len(), 1);
        assert!(ends(&ended, &with_id));
        // Sessions with an id are named by it alone; an id-less one by subject and second.
        let without = login("a", 1, None);
        assert!(!ends(&ended, &without));
        let ended = ended_by_logout_of(&without, 5);
        assert_eq!(ended.len(), 1);
        assert!(ends(&ended, &without));
        assert!(!ends(&ended, &with_id));
    }

    #[test]
    fn encoding_round_trips_and_refuses_other_bytes() {
        let ended = ended_by_logout_of(&login("a", 1, Some("x")), 10);
        let bytes = ended.encode();
        assert_eq!(bytes.len(), RECORD_BYTES);
        assert_eq!(EndedLogins::decode(&bytes, 10), Some(ended));
        assert_eq!(EndedLogins::decode(&bytes[..bytes.len() - 1], 10), None);
        assert_eq!(EndedLogins::decode(&[], 10), Some(EndedLogins::default()));
    }

    #[test]
    fn records_past_their_use_are_dropped() {
        let id = [7u8; 16];
        let mut ended = EndedLogins::default();
        let e = Ending {
            id,
            keep_until: 100,
        };
        assert_eq!(ended.insert(e, 100), Inserted::Unchanged);
        assert_eq!(ended.insert(e, 99), Inserted::Changed);
        assert_eq!(ended.insert(e, 99), Inserted::Unchanged);
        let decoded = EndedLogins::decode(&ended.encode(), 100);
        assert_eq!(decoded.map(|d| d.len()), Some(0));
    }

    #[test]
    fn merging_keeps_the_longest_lasting_record() {
        let id = [1u8; 16];
        let mut a = EndedLogins::default();
        a.insert(Ending { id, keep_until: 50 }, 10);
        let mut b = EndedLogins::default();
        b.insert(Ending { id, keep_until: 80 }, 10);
        b.insert(
            Ending {
                id: [2u8; 16],
                keep_until: 60,
            },
            10,
        );
        a.merge(&b, 10);
        assert_eq!(a.len(), 2);
        // The merged record lasts until 80: at 70 it is still there.
        let at_70 = EndedLogins::decode(&a.encode(), 70).unwrap();
        assert_eq!(at_70.len(), 1);
        assert_eq!(at_70.keep_until.get(&id), Some(&80));
    }

    #[test]
    fn a_full_set_stays_bounded_and_drops_what_expires_first() {
        let id = |i: u64| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&i.to_be_bytes());
            id
        };
        let mut ended = EndedLogins::default();
        for i in 0..MAX_ENDED as u64 {
            ended.insert(
                Ending {
                    id: id(i),
                    keep_until: 1000 + i,
                },
                1,
            );
        }
        assert_eq!(ended.len(), MAX_ENDED);
        let new = Ending {
            id: id(u64::MAX),
            keep_until: 5000,
        };
        assert_eq!(ended.insert(new, 1), Inserted::Evicted);
        assert_eq!(ended.len(), MAX_ENDED);
        assert!(ended.keep_until.contains_key(&new.id));
        // The record that expired first (keep_until 1000) made room.
        assert!(!ended.keep_until.contains_key(&id(0)));
        assert!(ended.keep_until.contains_key(&id(1)));
        // A record that would expire before all others is the one dropped.
        let short = Ending {
            id: id(u64::MAX - 1),
            keep_until: 2,
        };
        assert_eq!(ended.insert(short, 1), Inserted::Evicted);
        assert!(!ended.keep_until.contains_key(&short.id));
        // Once records expire they make room without evicting anything live.
        let later = Ending {
            id: id(u64::MAX - 2),
            keep_until: 9000,
        };
        assert_eq!(ended.insert(later, 1500), Inserted::Changed);
        assert!(ended.len() < MAX_ENDED);
    }
}
