//! The fan-out layer: a session's consumers. Each owns its bounded queue, its overflow policy
//! and its counters (`queue.rs`); a session builds only the consumers it has, so a session
//! without any holds no audio for them.
//!
//! Shared parts: `queue` (the handle every consumer keeps), `batch` (audio batches), `http`
//! (outcome classification and circuit breakers), `retry` (the retry loop and backoff),
//! `contract` (what webhooks receive) and `labels` (consumer kinds and drop reasons).

pub mod batch;
pub mod contract;
pub mod http;
pub mod json_webhook;
pub mod labels;
pub mod notice;
pub mod queue;
pub mod recorder;
pub mod registry;
pub mod retry;
pub mod stt;
pub mod subscribers;
pub mod webhook;

use std::future::Future;
use std::pin::Pin;

use tokio::time::Instant;
use voxgate_session::{AudioChunk, CloseCode, ConsumerSummary, Party, ServerEvent};

pub use contract::pcm_bytes;
pub use labels::{ConsumerKind, DropReason};
pub use queue::ConsumerStats;

/// A session's consumer. The connection task calls these without awaiting (ingest never waits
/// for a consumer); each consumer owns a bounded queue and counts what it drops.
pub trait Consumer: Send + Sync {
    fn name(&self) -> &str;
    /// Whether it takes audio (only then does the session produce audio outputs).
    fn wants_audio(&self) -> bool {
        true
    }
    /// The party whose audio and utterances it takes in a two-party session; `None` (the
    /// default): the mix, as in every other session.
    fn party(&self) -> Option<Party> {
        None
    }
    /// Offers decoded 16 kHz audio. Must not block.
    fn on_audio(&mut self, chunk: &AudioChunk) -> Offer;
    /// Sees every session event (utterance boundaries drive per-utterance consumers).
    fn on_event(&mut self, _event: &ServerEvent) {}
    /// The session closed with this close code (called before `finish`).
    fn on_close(&mut self, _code: CloseCode) {}
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

pub use notice::{Notice, NoticeRx, Notifier};

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
