//! The instance's live sessions: (owner, session id) -> subscriber hub (for `subscribe` and to
//! refuse a second session with the same id), and (owner, session id) -> resume token and
//! reattach channel; and the drained-session states already spent (single use).
//! Entries are released by guards on drop; the driver drops them at exact points of its close.
//!
//! Ownership: with tokens, a session id lives in its creator's namespace (the owner is the
//! token's `sub`), so one user can neither take nor squat another's id; without tokens every
//! session has the empty owner and ids are instance-wide.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::WebSocket;
use tokio::sync::mpsc;

use crate::auth::constant_time_eq;
use crate::fanout::subscribers::Hub;

/// A reconnecting client's socket and the stream byte its first message starts at (`None`:
/// where the server is, as `Resumed` says).
pub type Reattach = (WebSocket, Option<u64>);

/// A resumable session's token, grace period and the channel that brings it a new socket.
pub struct ResumeSlot {
    pub token: String,
    pub grace: Duration,
    pub rx: mpsc::Receiver<Reattach>,
}

impl ResumeSlot {
    /// The next reconnecting client (pends forever without a slot).
    pub async fn recv(slot: &mut Option<Self>) -> Option<Reattach> {
        match slot {
            Some(r) => r.rx.recv().await,
            None => std::future::pending().await,
        }
    }
}

/// A live session's key: its owner (the token's user; empty without tokens) and its id.
pub type SessionKey = (String, String);

fn key(owner: &str, id: &str) -> SessionKey {
    (owner.to_owned(), id.to_owned())
}

/// Live sessions by owner and id (one entry per live session; bounded by `server.max_sessions`
/// permits).
#[derive(Default)]
pub struct SessionRegistry {
    map: Arc<Mutex<HashMap<SessionKey, Arc<Hub>>>>,
}

/// A session's entry in `SessionRegistry`, removed on drop.
pub struct SessionEntry {
    map: Arc<Mutex<HashMap<SessionKey, Arc<Hub>>>>,
    key: SessionKey,
}

impl SessionRegistry {
    /// Registers a live session of `owner`, or `None` if that owner's id is taken.
    pub fn register(&self, owner: &str, id: &str, hub: Arc<Hub>) -> Option<SessionEntry> {
        let mut map = self.map.lock().expect("session map lock is never poisoned");
        let key = key(owner, id);
        if map.contains_key(&key) {
            return None;
        }
        map.insert(key.clone(), hub);
        Some(SessionEntry {
            map: self.map.clone(),
            key,
        })
    }

    /// The hub of `owner`'s live session `id`.
    pub fn hub(&self, owner: &str, id: &str) -> Option<Arc<Hub>> {
        self.map
            .lock()
            .expect("session map lock is never poisoned")
            .get(&key(owner, id))
            .cloned()
    }
}

impl Drop for SessionEntry {
    fn drop(&mut self) {
        self.map
            .lock()
            .expect("session map lock is never poisoned")
            .remove(&self.key);
    }
}

type ResumableMap = HashMap<SessionKey, (String, mpsc::Sender<Reattach>)>;

/// Live resumable sessions: their resume token and the channel that hands them a new socket.
#[derive(Default)]
pub struct ResumableRegistry {
    map: Arc<Mutex<ResumableMap>>,
}

/// A session's entry in `ResumableRegistry`, removed on drop.
pub struct ResumableEntry {
    map: Arc<Mutex<ResumableMap>>,
    key: SessionKey,
}

impl ResumableRegistry {
    /// Registers a resumable session with a fresh token; the slot receives reconnecting clients.
    pub fn register(&self, owner: &str, id: &str, grace: Duration) -> (ResumableEntry, ResumeSlot) {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let (tx, rx) = mpsc::channel(1);
        self.map
            .lock()
            .expect("resumable map lock is never poisoned")
            .insert(key(owner, id), (token.clone(), tx));
        let entry = ResumableEntry {
            map: self.map.clone(),
            key: key(owner, id),
        };
        (entry, ResumeSlot { token, grace, rx })
    }

    /// The channel to `owner`'s live resumable session `id`, if `token` is its token (compared
    /// in constant time).
    pub fn sender(&self, owner: &str, id: &str, token: &str) -> Option<mpsc::Sender<Reattach>> {
        let map = self
            .map
            .lock()
            .expect("resumable map lock is never poisoned");
        map.get(&key(owner, id))
            .filter(|(t, _)| constant_time_eq(t.as_bytes(), token.as_bytes()))
            .map(|(_, tx)| tx.clone())
    }
}

impl Drop for ResumableEntry {
    fn drop(&mut self) {
        self.map
            .lock()
            .expect("resumable map lock is never poisoned")
            .remove(&self.key);
    }
}

/// Why a drained session's state cannot be spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SpendError {
    #[error("resume_state already used")]
    Replayed,
    #[error("too many drained sessions continuing at once; retry shortly")]
    Full,
}

/// Drained-session states already continued on this instance (by their `jti`) until they
/// expire: each state continues one session. Bounded by `auth.spent_resume_states_max`; when
/// full, expired entries are pruned, and if none had expired the new state is refused (fail
/// closed: forgetting a live entry would allow its replay). Per instance: used without the bus
/// (which spends states deployment-wide instead), so a state could be continued once on each instance, by its
/// owner alone when tokens are on.
pub struct SpentStates {
    max: usize,
    map: Mutex<HashMap<String, u64>>,
}

impl SpentStates {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Marks state `jti` (valid until unix second `expires`) spent at unix second `now`.
    pub fn spend(&self, jti: &str, expires: u64, now: u64) -> Result<(), SpendError> {
        let mut map = self.map.lock().expect("spent map lock is never poisoned");
        if map.contains_key(jti) {
            return Err(SpendError::Replayed);
        }
        if map.len() >= self.max {
            map.retain(|_, exp| *exp >= now);
            if map.len() >= self.max {
                return Err(SpendError::Full);
            }
        }
        map.insert(jti.to_owned(), expires);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_taken_until_its_entry_drops() {
        let reg = SessionRegistry::default();
        let hub = || Arc::new(Hub::new(1, 1, "u".into()));
        let entry = reg.register("ann", "a", hub()).expect("free");
        assert!(reg.register("ann", "a", hub()).is_none());
        assert!(reg.hub("ann", "a").is_some());
        let bobs = reg
            .register("bob", "a", hub())
            .expect("another owner's namespace");
        assert!(reg.hub("carl", "a").is_none());
        drop((entry, bobs));
        assert!(reg.hub("ann", "a").is_none());
        assert!(reg.register("ann", "a", hub()).is_some());
    }

    #[test]
    fn a_state_is_spent_once_and_the_set_is_bounded() {
        let spent = SpentStates::new(2);
        spent.spend("a", 100, 0).unwrap();
        assert_eq!(spent.spend("a", 100, 0), Err(SpendError::Replayed));
        spent.spend("b", 50, 0).unwrap();
        assert_eq!(
            spent.spend("c", 100, 10),
            Err(SpendError::Full),
            "none expired"
        );
        spent.spend("c", 100, 60).unwrap();
        assert_eq!(
            spent.spend("a", 100, 60),
            Err(SpendError::Replayed),
            "a lives on"
        );
    }

    #[test]
    fn only_the_right_token_reaches_a_resumable_session() {
        let reg = ResumableRegistry::default();
        let (entry, slot) = reg.register("ann", "a", Duration::from_secs(1));
        assert!(reg.sender("ann", "a", &slot.token).is_some());
        assert!(reg.sender("ann", "a", "wrong").is_none());
        assert!(reg.sender("ann", "b", &slot.token).is_none());
        assert!(reg.sender("bob", "a", &slot.token).is_none());
        drop(entry);
        assert!(reg.sender("ann", "a", &slot.token).is_none());
    }
}
