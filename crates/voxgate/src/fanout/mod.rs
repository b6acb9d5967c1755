//! Consumers: each owns its bounded queue, its overflow policy and its counters. A session builds
//! only the consumers it has, so a session without any holds no audio for them.

pub mod json_webhook;
pub mod registry;
pub mod retry;
pub mod stt;
pub mod subscribers;
pub mod webhook;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;
use voxgate_session::{AudioChunk, ConsumerSummary, ServerEvent};

/// A session's consumer. The connection task calls these without awaiting (ingest never waits
/// for a consumer); each consumer owns a bounded queue and counts what it drops.
pub trait Consumer: Send + Sync {
    fn name(&self) -> &str;
    /// Whether it takes audio (only then does the session produce audio outputs).
    fn wants_audio(&self) -> bool {
        true
    }
    /// Offers decoded 16 kHz audio. Must not block.
    fn on_audio(&mut self, chunk: &AudioChunk) -> Offer;
    /// Sees every session event (utterance boundaries drive per-utterance consumers).
    fn on_event(&mut self, _event: &ServerEvent) {}
    /// The session closed with this WebSocket close code (called before `finish`).
    fn on_close(&mut self, _code: u16) {}
    /// Closes the queue and flushes until `deadline`; what is left is counted as dropped.
    fn finish(
        self: Box<Self>,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = ConsumerSummary> + Send>>;
}

/// Lets a consumer's task finish until `deadline`; past it the task is aborted (and reaped).
/// Returns whether it finished in time.
pub async fn join_until(task: &mut tokio::task::JoinHandle<()>, deadline: Instant) -> bool {
    if tokio::time::timeout_at(deadline, &mut *task).await.is_ok() {
        return true;
    }
    task.abort();
    let _ = task.await; // the abort's JoinError: nothing else to learn from it
    false
}

/// Events a consumer sends back to its session (e.g. transcripts, backend warnings).
pub type Notifier = tokio::sync::mpsc::Sender<ServerEvent>;

/// Counters shared between a consumer's handle (ingest side) and its task.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    pub delivered_bytes: AtomicU64,
    pub dropped_bytes: AtomicU64,
    pub requests: AtomicU64,
    /// Bytes accepted and not yet delivered or dropped.
    pub held_bytes: AtomicU64,
    /// Next request sequence number (webhooks).
    pub next_seq: AtomicU64,
}

impl ConsumerStats {
    /// At a close that timed out: counts every byte still held as dropped (`reason`) and takes
    /// it off the `voxgate_buffered_bytes` gauge. Returns the bytes.
    pub fn drop_held(&self, kind: &'static str, reason: &'static str) -> u64 {
        let held = self.held_bytes.swap(0, Ordering::Relaxed);
        if held > 0 {
            self.dropped_bytes.fetch_add(held, Ordering::Relaxed);
            crate::metrics::dropped(kind, reason, held);
            crate::metrics::buffered(kind, -(held as i64));
        }
        held
    }

    pub fn summary(&self, name: &str, kind: &str) -> ConsumerSummary {
        ConsumerSummary {
            name: name.to_owned(),
            kind: kind.to_owned(),
            delivered_bytes: self.delivered_bytes.load(Ordering::Relaxed),
            dropped_bytes: self.dropped_bytes.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            next_seq: self.next_seq.load(Ordering::Relaxed),
        }
    }
}

/// What happened to an offered item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Accepted,
    /// Dropped (counted); `first` is true for the first drop after an accepted item, so the
    /// client is warned once per episode rather than once per chunk.
    Dropped {
        first: bool,
    },
}

/// PCM16 samples as little-endian bytes.
pub fn pcm_bytes(pcm: &[i16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(pcm.len() * 2);
    for s in pcm {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}
