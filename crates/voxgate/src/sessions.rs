//! The instance's live sessions: session id -> subscriber hub (for `subscribe` and to
//! refuse a second session with the same id), and session id -> resume token and reattach channel.
//! Entries are released by guards on drop; the driver drops them at exact points of its close.

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

/// Live sessions by id (one entry per live session; bounded by `server.max_sessions` permits).
#[derive(Default)]
pub struct SessionRegistry {
    map: Arc<Mutex<HashMap<String, Arc<Hub>>>>,
}

/// A session's entry in `SessionRegistry`, removed on drop.
pub struct SessionEntry {
    map: Arc<Mutex<HashMap<String, Arc<Hub>>>>,
    id: String,
}

impl SessionRegistry {
    /// Registers a live session, or `None` if the id is taken.
    pub fn register(&self, id: &str, hub: Arc<Hub>) -> Option<SessionEntry> {
        let mut map = self.map.lock().expect("session map lock is never poisoned");
        if map.contains_key(id) {
            return None;
        }
        map.insert(id.to_owned(), hub);
        Some(SessionEntry {
            map: self.map.clone(),
            id: id.to_owned(),
        })
    }

    /// The hub of a live session.
    pub fn hub(&self, id: &str) -> Option<Arc<Hub>> {
        self.map
            .lock()
            .expect("session map lock is never poisoned")
            .get(id)
            .cloned()
    }
}

impl Drop for SessionEntry {
    fn drop(&mut self) {
        self.map
            .lock()
            .expect("session map lock is never poisoned")
            .remove(&self.id);
    }
}

type ResumableMap = HashMap<String, (String, mpsc::Sender<Reattach>)>;

/// Live resumable sessions: their resume token and the channel that hands them a new socket.
#[derive(Default)]
pub struct ResumableRegistry {
    map: Arc<Mutex<ResumableMap>>,
}

/// A session's entry in `ResumableRegistry`, removed on drop.
pub struct ResumableEntry {
    map: Arc<Mutex<ResumableMap>>,
    id: String,
}

impl ResumableRegistry {
    /// Registers a resumable session with a fresh token; the slot receives reconnecting clients.
    pub fn register(&self, id: &str, grace: Duration) -> (ResumableEntry, ResumeSlot) {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let (tx, rx) = mpsc::channel(1);
        self.map
            .lock()
            .expect("resumable map lock is never poisoned")
            .insert(id.to_owned(), (token.clone(), tx));
        let entry = ResumableEntry {
            map: self.map.clone(),
            id: id.to_owned(),
        };
        (entry, ResumeSlot { token, grace, rx })
    }

    /// The channel to a live resumable session, if `token` is its token (compared in constant
    /// time).
    pub fn sender(&self, id: &str, token: &str) -> Option<mpsc::Sender<Reattach>> {
        let map = self
            .map
            .lock()
            .expect("resumable map lock is never poisoned");
        map.get(id)
            .filter(|(t, _)| constant_time_eq(t.as_bytes(), token.as_bytes()))
            .map(|(_, tx)| tx.clone())
    }
}

impl Drop for ResumableEntry {
    fn drop(&mut self) {
        self.map
            .lock()
            .expect("resumable map lock is never poisoned")
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_taken_until_its_entry_drops() {
        let reg = SessionRegistry::default();
        let hub = || Arc::new(Hub::new(1, 1, "u".into()));
        let entry = reg.register("a", hub()).expect("free");
        assert!(reg.register("a", hub()).is_none());
        assert!(reg.hub("a").is_some());
        drop(entry);
        assert!(reg.hub("a").is_none());
        assert!(reg.register("a", hub()).is_some());
    }

    #[test]
    fn only_the_right_token_reaches_a_resumable_session() {
        let reg = ResumableRegistry::default();
        let (entry, slot) = reg.register("a", Duration::from_secs(1));
        assert!(reg.sender("a", &slot.token).is_some());
        assert!(reg.sender("a", "wrong").is_none());
        assert!(reg.sender("b", &slot.token).is_none());
        drop(entry);
        assert!(reg.sender("a", &slot.token).is_none());
    }
}
