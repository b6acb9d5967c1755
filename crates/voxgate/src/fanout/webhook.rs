//! The audio-bytes webhook consumer (the seed pusher's contract, made exact; the wire format
//! is in `contract.rs`).
//!
//! `delay_seconds` absent: no consumer at all. `0`: every decoded chunk is POSTed as it comes.
//! `N > 0`: exactly N seconds per POST, sample-aligned; the partial rest is sent at close.
//! Its buffer (queue + batch + in flight) is capped by `max_buffer_seconds`; past the cap new
//! audio is dropped (`drop_newest`) and counted. Retries use exponential backoff with full
//! jitter; each endpoint has a circuit breaker shared by all sessions.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};
use voxgate_session::{AudioChunk, ConsumerSummary};

use super::batch::{Batch, Batcher};
use super::contract::{audio_request, idempotency_key, pcm_bytes, wav_bytes, AudioBatchInfo};
use super::http::{webhook_attempt, BreakerPolicy, HttpError};
use super::queue::{ConsumerStats, QueueHandle};
use super::retry::{with_retries, Attempt, RetryPolicy};
use super::{Consumer, ConsumerKind, Offer};
use crate::config::{BodyFormat, WebhookConfig};

// The contract's signature and target, and the breakers, at the paths they had before they got
// their own modules (integration tests use `consumers::webhook::sign`).
pub use super::contract::{sign, Target};
pub use super::http::{Breaker, Breakers};

/// Items queued per webhook regardless of bytes (the byte cap is the real bound).
const QUEUE_ITEMS: usize = 4096;

/// The ingest side of one webhook consumer of one session.
pub struct WebhookHandle {
    cfg: Arc<WebhookConfig>,
    queue: QueueHandle<AudioChunk>,
}

impl WebhookHandle {
    pub fn spawn(
        cfg: Arc<WebhookConfig>,
        target: Target,
        client: reqwest::Client,
        breaker: Arc<Breaker>,
        first_seq: u64,
    ) -> Self {
        let stats = Arc::new(ConsumerStats::new(ConsumerKind::Webhook));
        stats.set_next_seq(first_seq);
        let worker = Worker {
            cfg: cfg.clone(),
            target,
            client,
            breaker,
            stats: stats.clone(),
            seq: first_seq,
        };
        let cap_bytes = cfg.max_buffer_bytes() as u64;
        Self {
            cfg,
            queue: QueueHandle::spawn(stats, QUEUE_ITEMS, cap_bytes, |rx| worker.run(rx)),
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Offers a chunk without waiting: accepted under the cap, otherwise dropped and counted.
    pub fn offer(&mut self, chunk: &AudioChunk) -> Offer {
        let bytes = chunk.pcm.len() as u64 * 2;
        let Err(refused) = self.queue.offer(chunk.clone(), bytes) else {
            return Offer::Accepted;
        };
        let reason = refused.reason();
        let first = self.queue.dropped(reason, bytes);
        if first {
            warn!(webhook = %self.cfg.name, %reason, "webhook consumer dropping audio");
        }
        Offer::Dropped { first }
    }

    /// Closes the queue, lets the worker send what it holds (the last partial batch included)
    /// until `deadline`, then gives up on the rest, counted as dropped.
    pub async fn finish(mut self, deadline: Instant) -> ConsumerSummary {
        let held = self.queue.finish(deadline).await.dropped;
        if held > 0 {
            warn!(webhook = %self.cfg.name, held, "webhook flush timed out; audio dropped");
        }
        self.queue.summary(&self.cfg.name)
    }
}

impl Consumer for WebhookHandle {
    fn name(&self) -> &str {
        &self.cfg.name
    }
    fn on_audio(&mut self, chunk: &AudioChunk) -> Offer {
        self.offer(chunk)
    }
    fn finish(
        self: Box<Self>,
        deadline: Instant,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ConsumerSummary> + Send>> {
        Box::pin(WebhookHandle::finish(*self, deadline))
    }
}

struct Worker {
    cfg: Arc<WebhookConfig>,
    target: Target,
    client: reqwest::Client,
    breaker: Arc<Breaker>,
    stats: Arc<ConsumerStats>,
    seq: u64,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<AudioChunk>) {
        let mut batcher = Batcher::new(self.cfg.batch_samples().unwrap_or(0) as usize);
        while let Some(chunk) = rx.recv().await {
            for batch in batcher.push(chunk.start, &chunk.pcm) {
                self.post(batch).await;
            }
        }
        if let Some(rest) = batcher.finish() {
            self.post(rest).await;
        }
    }

    /// Sends one batch with retries; on return its bytes are delivered or counted as dropped.
    async fn post(&mut self, batch: Batch) {
        let bytes = batch.pcm.len() as u64 * 2;
        let seq = self.seq;
        self.seq += 1;
        self.stats.set_next_seq(self.seq);
        let outcome = self.attempts(seq, &batch).await;
        self.stats.release(bytes);
        match outcome {
            Ok(()) => self.stats.delivered(bytes),
            Err(e) => {
                let reason = e.drop_reason();
                warn!(webhook = %self.cfg.name, session = %self.target.session_id, seq, %reason, "webhook batch given up");
                self.stats.count_dropped(reason, bytes);
            }
        }
    }

    async fn attempts(&self, seq: u64, batch: &Batch) -> Result<(), HttpError> {
        let body = bytes::Bytes::from(match self.cfg.body {
            BodyFormat::Pcm => pcm_bytes(&batch.pcm),
            BodyFormat::Wav => wav_bytes(&batch.pcm),
        });
        let key = idempotency_key(&self.target.session_id, &self.cfg.name, seq);
        let info = AudioBatchInfo {
            target: &self.target,
            idempotency_key: &key,
            sequence: seq,
            start_sample: batch.start,
            samples: batch.pcm.len(),
        };
        let breaker_policy = BreakerPolicy::from(&*self.cfg);
        let policy = RetryPolicy::from_ms(
            self.cfg.max_retries,
            self.cfg.backoff_initial_ms,
            self.cfg.backoff_max_ms,
        );
        let (info, body) = (&info, &body);
        with_retries(&policy, move |attempt| {
            let request = move || {
                self.stats.request();
                audio_request(&self.client, &self.cfg, info, body.clone())
            };
            async move {
                let outcome = webhook_attempt(&self.breaker, breaker_policy, request).await;
                if let Attempt::Retry(why) = &outcome {
                    debug!(webhook = %self.cfg.name, %why, attempt, "webhook attempt failed");
                }
                outcome
            }
        })
        .await
    }
}
