//! Realtime subscribers: `GET /v1/sessions/{id}/subscribe` streams a session's events and, with
//! `audio=true`, its 16 kHz PCM16 audio. Each subscriber owns a bounded queue; one that falls a
//! full queue behind is disconnected with a reason (policy `disconnect`) and its loss counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::pcm_bytes;
use crate::metrics::{buffered, dropped};

const KIND: &str = "subscriber";

/// One message for a subscriber.
#[derive(Debug, Clone)]
pub enum SubMessage {
    Event(Arc<str>),
    Audio(Bytes),
}

impl SubMessage {
    pub fn len(&self) -> usize {
        match self {
            Self::Event(s) => s.len(),
            Self::Audio(b) => b.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Subscriber {
    id: u64,
    audio: bool,
    tx: mpsc::Sender<SubMessage>,
    kicked: CancellationToken,
}

/// The receiving side handed to the subscriber's socket task.
pub struct Subscription {
    pub rx: mpsc::Receiver<SubMessage>,
    /// Cancelled when the subscriber was dropped for lagging.
    pub kicked: CancellationToken,
}

impl Subscription {
    /// Call for every message taken from `rx` (keeps the buffered-bytes gauge exact).
    pub fn taken(&self, msg: &SubMessage) {
        buffered(KIND, -(msg.len() as i64));
    }

    /// Counts what is still queued as dropped (the socket went away).
    pub fn discard_rest(&mut self) {
        self.rx.close();
        while let Ok(msg) = self.rx.try_recv() {
            buffered(KIND, -(msg.len() as i64));
            if let SubMessage::Audio(b) = &msg {
                dropped(KIND, "subscriber_gone", b.len() as u64);
            }
        }
    }
}

/// A session's subscribers.
pub struct Hub {
    subs: Mutex<Vec<Subscriber>>,
    next_id: AtomicU64,
    max: usize,
    queue: usize,
    owner: String,
}

/// Why a subscription was refused.
#[derive(Debug, thiserror::Error)]
#[error("session has {0} subscribers already (subscribers.max_per_session)")]
pub struct HubFull(pub usize);

impl Hub {
    /// `owner` is the session's user, who may watch it.
    pub fn new(max: usize, queue: usize, owner: String) -> Self {
        Self {
            subs: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            max,
            queue,
            owner,
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Subscriber>> {
        self.subs
            .lock()
            .expect("subscriber list lock is never poisoned")
    }

    pub fn subscribe(&self, audio: bool) -> Result<Subscription, HubFull> {
        let mut subs = self.lock();
        if subs.len() >= self.max {
            return Err(HubFull(self.max));
        }
        let (tx, rx) = mpsc::channel(self.queue);
        let kicked = CancellationToken::new();
        subs.push(Subscriber {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            audio,
            tx,
            kicked: kicked.clone(),
        });
        Ok(Subscription { rx, kicked })
    }

    pub fn wants_audio(&self) -> bool {
        self.lock().iter().any(|s| s.audio)
    }

    pub fn publish_event(&self, json: &str) {
        let mut subs = self.lock();
        if subs.is_empty() {
            return;
        }
        let msg = SubMessage::Event(Arc::from(json));
        Self::offer_all(&mut subs, &msg, |_| true);
    }

    pub fn publish_audio(&self, pcm: &[i16]) {
        let mut subs = self.lock();
        if !subs.iter().any(|s| s.audio) {
            return;
        }
        let msg = SubMessage::Audio(Bytes::from(pcm_bytes(pcm)));
        Self::offer_all(&mut subs, &msg, |s| s.audio);
    }

    fn offer_all(
        subs: &mut Vec<Subscriber>,
        msg: &SubMessage,
        wants: impl Fn(&Subscriber) -> bool,
    ) {
        subs.retain(|s| {
            if !wants(s) {
                return true;
            }
            match s.tx.try_send(msg.clone()) {
                Ok(()) => {
                    buffered(KIND, msg.len() as i64);
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    warn!(subscriber = s.id, "subscriber lagging; disconnecting");
                    if let SubMessage::Audio(b) = msg {
                        dropped(KIND, "lagging", b.len() as u64);
                    }
                    s.kicked.cancel();
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// The session ended: subscribers get what is queued, then their socket closes.
    pub fn close(&self) {
        self.lock().clear();
    }
}
