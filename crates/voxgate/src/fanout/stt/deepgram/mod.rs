//! Deepgram-compatible streaming recognition over a WebSocket:
//! `{url}/v1/listen?encoding=linear16&sample_rate=16000&channels=1&interim_results=true`
//! (+ `model`, `language`, `keyterm`), `Authorization: Token KEY`. Binary PCM16 goes out as it
//! is decoded; `{"type":"KeepAlive"}` when no audio was sent for `keepalive_seconds`; at each
//! utterance end `{"type":"Finalize"}` (finalize mode `message`) or nothing (`none`: the
//! backend's endpointing decides; `auto` switches to it, remembered per backend, when the
//! backend refuses `Finalize`; with `isolate_utterances` a `CloseStream` cuts the connection at
//! each utterance end, its flush is awaited and a new connection carries on);
//! `{"type":"CloseStream"}` at session end, then the backend's flush is awaited up to
//! `flush_timeout_ms`. `Results` come back as interim and final
//! `Transcript` events; every utterance ends with a final transcript, an empty final, or a
//! counted loss (`stt_lost`, see `track`).
//!
//! Reconnects with backoff. Audio not yet acknowledged by a final result (its `start +
//! duration`) is kept and resent on the next connection; while idle only the segmenter's
//! lookback is kept. Everything held is capped by `max_buffer_seconds`: audio already sent is
//! forgotten first; audio that cannot be sent (backend away) is dropped newest-first, counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

mod audio;
mod conn;
mod track;
mod worker;

use tokio::time::Instant;
use tracing::warn;
use voxgate_session::{AudioChunk, ConsumerSummary, ServerEvent};

use super::ctx::{sample_at, Ctx};
use crate::fanout::queue::{QueueHandle, Refused};
use crate::fanout::{Consumer, DropReason, Offer};

/// Items queued from ingest to the connection task (the byte cap is the real bound).
const QUEUE_ITEMS: usize = 4096;

pub use self::conn::{listen_url, DeepgramError};
use self::worker::In;

/// The ingest side of a Deepgram-compatible backend for one session.
pub struct DeepgramHandle {
    ctx: Ctx,
    queue: QueueHandle<In>,
    /// Bytes accepted and never sent (dropped if the task is cut off).
    unsent: Arc<AtomicU64>,
}

impl DeepgramHandle {
    pub(crate) fn spawn(ctx: Ctx, lookback_samples: u64) -> Self {
        let unsent = Arc::new(AtomicU64::new(0));
        let cap_bytes = ctx.backend.cfg.max_buffer_bytes() as u64;
        let worker = worker::Worker::new(ctx.clone(), unsent.clone(), cap_bytes, lookback_samples);
        let queue = QueueHandle::spawn(ctx.stats.clone(), QUEUE_ITEMS, cap_bytes, |rx| {
            worker.run(rx)
        });
        Self { ctx, queue, unsent }
    }
}

impl Consumer for DeepgramHandle {
    fn name(&self) -> &str {
        self.ctx.name()
    }

    fn party(&self) -> Option<voxgate_session::Party> {
        self.ctx.party
    }

    fn on_audio(&mut self, chunk: &AudioChunk) -> Offer {
        let bytes = chunk.pcm.len() as u64 * 2;
        let reason = match self.queue.offer(In::Audio(chunk.clone()), bytes) {
            Ok(()) => {
                self.unsent.fetch_add(bytes, Ordering::Relaxed);
                return Offer::Accepted;
            }
            Err(Refused::OverCap) => DropReason::BufferFull,
            Err(Refused::Full | Refused::Closed) => DropReason::QueueFull,
        };
        if self.queue.dropped(reason, bytes) {
            warn!(stt = %self.ctx.name(), session = %self.ctx.target.session_id, %reason, "streaming speech-to-text dropping audio");
            self.ctx.warn_dropping(reason);
        }
        Offer::Dropped { first: false }
    }

    fn on_event(&mut self, event: &ServerEvent) {
        let item = match *event {
            ServerEvent::SpeechStarted {
                utterance,
                timestamp,
                ..
            } => In::Started {
                utterance,
                start: sample_at(timestamp),
            },
            ServerEvent::UtteranceEnd { utterance, end, .. } => In::Ended {
                utterance,
                end: sample_at(end),
            },
            _ => return,
        };
        if self.queue.send(item).is_err() {
            warn!(stt = %self.ctx.name(), "streaming speech-to-text queue full; utterance boundary lost");
        }
    }

    fn finish(
        mut self: Box<Self>,
        deadline: Instant,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ConsumerSummary> + Send>> {
        Box::pin(async move {
            // A full queue leaves the task its own flush timeout (then it is cut off).
            if self.queue.send(In::Close { deadline }).is_err() {
                warn!(stt = %self.ctx.name(), "streaming speech-to-text queue full; close deadline not passed on");
            }
            if !self.queue.close(deadline).await {
                // Only what was never sent is lost; what was sent is off the gauge either way.
                let unsent = self.unsent.swap(0, Ordering::Relaxed);
                if unsent > 0 {
                    warn!(stt = %self.ctx.name(), unsent, "streaming speech-to-text flush timed out; audio dropped");
                    self.ctx
                        .stats
                        .count_dropped(DropReason::CloseTimeout, unsent);
                }
                self.ctx.stats.forget_held();
            }
            self.queue.summary(self.ctx.name())
        })
    }
}
