//! The audio-bytes webhook consumer (the seed pusher's contract, made exact).
//!
//! `delay_seconds` absent: no consumer at all. `0`: every decoded chunk is POSTed as it comes.
//! `N > 0`: exactly N seconds per POST, sample-aligned; the partial rest is sent at close.
//! Its buffer (queue + batch + in flight) is capped by `max_buffer_seconds`; past the cap new
//! audio is dropped (`drop_newest`) and counted. Retries use exponential backoff with full
//! jitter; each endpoint has a circuit breaker shared by all sessions.

use crate::fanout::join_until;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use metrics::counter;
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};
use voxgate_session::AudioChunk;

use super::retry::{retryable, with_retries, Attempt, RetryPolicy};
use super::{pcm_bytes, Consumer, ConsumerStats, Offer};
use crate::config::{BodyFormat, WebhookConfig};
use crate::metrics::{buffered, dropped, DELIVERED_BYTES, WEBHOOK_REQUESTS};

const KIND: &str = "webhook";
/// Items queued per webhook regardless of bytes (the byte cap is the real bound).
const QUEUE_ITEMS: usize = 4096;

/// Per-endpoint circuit breakers, shared by every session.
#[derive(Default)]
pub struct Breakers {
    map: Mutex<HashMap<String, Arc<Breaker>>>,
}

impl Breakers {
    pub fn get(&self, url: &str) -> Arc<Breaker> {
        let mut map = self.map.lock().expect("breaker map lock is never poisoned");
        map.entry(url.to_owned()).or_default().clone()
    }
}

/// Consecutive failures open the breaker for a cooldown; then one attempt probes it.
#[derive(Default)]
pub struct Breaker {
    failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
}

impl Breaker {
    pub(crate) fn allow(&self) -> bool {
        let guard = self
            .open_until
            .lock()
            .expect("breaker lock is never poisoned");
        guard.is_none_or(|t| Instant::now() >= t)
    }
    pub(crate) fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        *self
            .open_until
            .lock()
            .expect("breaker lock is never poisoned") = None;
    }
    pub(crate) fn failure(&self, threshold: u32, cooldown: Duration) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= threshold {
            *self
                .open_until
                .lock()
                .expect("breaker lock is never poisoned") = Some(Instant::now() + cooldown);
        }
    }
}

/// Who the audio belongs to, sent with every request.
#[derive(Debug, Clone)]
pub struct Target {
    pub session_id: String,
    pub uid: String,
}

/// The ingest side of one webhook consumer of one session.
pub struct WebhookHandle {
    cfg: Arc<WebhookConfig>,
    tx: Option<mpsc::Sender<AudioChunk>>,
    stats: Arc<ConsumerStats>,
    cap_bytes: u64,
    dropping: bool,
    task: JoinHandle<()>,
}

impl WebhookHandle {
    pub fn spawn(
        cfg: Arc<WebhookConfig>,
        target: Target,
        client: reqwest::Client,
        breaker: Arc<Breaker>,
        first_seq: u64,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_ITEMS);
        let stats = Arc::new(ConsumerStats::default());
        stats.next_seq.store(first_seq, Ordering::Relaxed);
        let worker = Worker {
            cfg: cfg.clone(),
            target,
            client,
            breaker,
            stats: stats.clone(),
            seq: first_seq,
        };
        let task = tokio::spawn(worker.run(rx));
        Self {
            cap_bytes: cfg.max_buffer_bytes() as u64,
            cfg,
            tx: Some(tx),
            stats,
            dropping: false,
            task,
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Offers a chunk without waiting: accepted under the cap, otherwise dropped and counted.
    pub fn offer(&mut self, chunk: &AudioChunk) -> Offer {
        let bytes = chunk.pcm.len() as u64 * 2;
        let held = self.stats.held_bytes.load(Ordering::Relaxed);
        let reason = if held + bytes > self.cap_bytes {
            "buffer_full"
        } else {
            match self.tx.as_ref().map(|tx| tx.try_send(chunk.clone())) {
                Some(Ok(())) => {
                    self.stats.held_bytes.fetch_add(bytes, Ordering::Relaxed);
                    buffered(KIND, bytes as i64);
                    self.dropping = false;
                    return Offer::Accepted;
                }
                Some(Err(mpsc::error::TrySendError::Full(_))) => "queue_full",
                _ => "consumer_gone",
            }
        };
        self.stats.dropped_bytes.fetch_add(bytes, Ordering::Relaxed);
        dropped(KIND, reason, bytes);
        let first = !self.dropping;
        self.dropping = true;
        if first {
            warn!(webhook = %self.cfg.name, reason, "webhook consumer dropping audio");
        }
        Offer::Dropped { first }
    }

    /// Closes the queue, lets the worker send what it holds (the last partial batch included)
    /// until `deadline`, then gives up on the rest, counted as dropped.
    pub async fn finish(mut self, deadline: Instant) -> voxgate_session::ConsumerSummary {
        self.tx.take();
        if !join_until(&mut self.task, deadline).await {
            let held = self.stats.drop_held(KIND, "close_timeout");
            if held > 0 {
                warn!(webhook = %self.cfg.name, held, "webhook flush timed out; audio dropped");
            }
        }
        self.stats.summary(&self.cfg.name, KIND)
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
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = voxgate_session::ConsumerSummary> + Send>>
    {
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
        let batch_samples = self.cfg.batch_samples().unwrap_or(0) as usize;
        let mut batch: Vec<i16> = Vec::new();
        let mut batch_start = 0u64;
        while let Some(chunk) = rx.recv().await {
            if batch_samples == 0 {
                self.post(chunk.start, &chunk.pcm).await;
                continue;
            }
            // A gap (audio dropped upstream) ends the batch: batches stay contiguous.
            if !batch.is_empty() && chunk.start != batch_start + batch.len() as u64 {
                let taken = std::mem::take(&mut batch);
                self.post(batch_start, &taken).await;
            }
            if batch.is_empty() {
                batch_start = chunk.start;
            }
            batch.extend_from_slice(&chunk.pcm);
            while batch.len() >= batch_samples {
                let rest = batch.split_off(batch_samples);
                let full = std::mem::replace(&mut batch, rest);
                self.post(batch_start, &full).await;
                batch_start += batch_samples as u64;
            }
        }
        if !batch.is_empty() {
            self.post(batch_start, &batch).await;
        }
    }

    /// Sends one batch with retries; on return its bytes are delivered or counted as dropped.
    async fn post(&mut self, start: u64, pcm: &[i16]) {
        let bytes = pcm.len() as u64 * 2;
        let seq = self.seq;
        self.seq += 1;
        self.stats.next_seq.store(self.seq, Ordering::Relaxed);
        let outcome = self.attempts(seq, start, pcm).await;
        self.stats.held_bytes.fetch_sub(bytes, Ordering::Relaxed);
        buffered(KIND, -(bytes as i64));
        match outcome {
            Ok(()) => {
                self.stats
                    .delivered_bytes
                    .fetch_add(bytes, Ordering::Relaxed);
                counter!(DELIVERED_BYTES, "consumer" => KIND).increment(bytes);
            }
            Err(reason) => {
                warn!(webhook = %self.cfg.name, session = %self.target.session_id, seq, reason, "webhook batch given up");
                self.stats.dropped_bytes.fetch_add(bytes, Ordering::Relaxed);
                dropped(KIND, reason, bytes);
            }
        }
    }

    async fn attempts(&mut self, seq: u64, start: u64, pcm: &[i16]) -> Result<(), &'static str> {
        let body = match self.cfg.body {
            BodyFormat::Pcm => pcm_bytes(pcm),
            BodyFormat::Wav => wav_bytes(pcm),
        };
        let body = bytes::Bytes::from(body);
        let cooldown = Duration::from_secs_f64(self.cfg.breaker_cooldown_seconds);
        let policy = RetryPolicy::from_ms(
            self.cfg.max_retries,
            self.cfg.backoff_initial_ms,
            self.cfg.backoff_max_ms,
        );
        let this = &*self;
        let outcome = with_retries(&policy, |attempt| {
            let request = this.breaker.allow().then(|| {
                this.stats.requests.fetch_add(1, Ordering::Relaxed);
                this.request(seq, start, pcm.len(), body.clone())
            });
            async move {
                let Some(request) = request else {
                    counter!(WEBHOOK_REQUESTS, "outcome" => CIRCUIT_OPEN).increment(1);
                    return Attempt::Fatal(CIRCUIT_OPEN.into());
                };
                let outcome = http_attempt(request.send().await, &this.breaker, |b| {
                    b.failure(this.cfg.breaker_failures, cooldown)
                });
                if let Attempt::Retry(why) = &outcome {
                    debug!(webhook = %this.cfg.name, why, attempt, "webhook attempt failed");
                }
                outcome
            }
        })
        .await;
        match outcome {
            Ok(()) => Ok(()),
            Err(e) if e == CIRCUIT_OPEN => Err(CIRCUIT_OPEN),
            Err(e) if e == REJECTED => Err(REJECTED),
            Err(_) => Err("gave_up"),
        }
    }

    fn request(
        &self,
        seq: u64,
        start: u64,
        samples: usize,
        body: bytes::Bytes,
    ) -> reqwest::RequestBuilder {
        let t = &self.target;
        let key = format!("{}:{}:{}", t.session_id, self.cfg.name, seq);
        audio_request(&self.client, &self.cfg, t, &key, seq, start, samples, body)
    }
}

/// One audio-bytes webhook request: the contract shared by the in-process webhook and
/// `voxgate deliver` (same query, headers, `Idempotency-Key` and signature).
#[allow(clippy::too_many_arguments)]
pub fn audio_request(
    client: &reqwest::Client,
    cfg: &WebhookConfig,
    t: &Target,
    idempotency: &str,
    seq: u64,
    start: u64,
    samples: usize,
    body: bytes::Bytes,
) -> reqwest::RequestBuilder {
    let content_type = match cfg.body {
        BodyFormat::Pcm => "application/octet-stream",
        BodyFormat::Wav => "audio/wav",
    };
    let mut req = client
        .post(&cfg.url)
        .query(&[
            ("sample_rate", "16000"),
            ("session_id", t.session_id.as_str()),
            ("uid", t.uid.as_str()),
        ])
        .timeout(Duration::from_millis(cfg.timeout_ms))
        .header("content-type", content_type)
        .header("x-voxgate-sequence", seq.to_string())
        .header("x-voxgate-start-sample", start.to_string())
        .header("x-voxgate-samples", samples.to_string())
        .header("x-voxgate-sample-rate", "16000")
        .header("x-voxgate-session-id", t.session_id.as_str())
        .header("idempotency-key", idempotency);
    if let Some(secret) = &cfg.secret {
        req = req.header("x-voxgate-signature", sign(secret, idempotency, &body));
    }
    req.body(body)
}

/// The body of an audio webhook request for `pcm` (little-endian PCM16 bytes).
pub fn audio_body(format: &BodyFormat, pcm_le: &[u8]) -> Vec<u8> {
    match format {
        BodyFormat::Pcm => pcm_le.to_vec(),
        BodyFormat::Wav => {
            let mut out = wav_header(pcm_le.len() as u32);
            out.extend_from_slice(pcm_le);
            out
        }
    }
}

const CIRCUIT_OPEN: &str = "circuit_open";
const REJECTED: &str = "rejected";

/// One HTTP attempt of a webhook: counts it in `voxgate_webhook_requests_total{outcome}`, tells
/// the endpoint's breaker (`fail` on a retryable failure), and says whether to retry.
pub(crate) fn http_attempt(
    result: Result<reqwest::Response, reqwest::Error>,
    breaker: &Breaker,
    fail: impl Fn(&Breaker),
) -> Attempt<()> {
    let (label, attempt) = match result {
        Ok(resp) if resp.status().is_success() => {
            breaker.success();
            ("success", Attempt::Done(()))
        }
        Ok(resp) if retryable(resp.status()) => {
            fail(breaker);
            ("http_error", Attempt::Retry(resp.status().to_string()))
        }
        Ok(_) => {
            // The endpoint is up and refused this request: not a breaker failure.
            breaker.success();
            (REJECTED, Attempt::Fatal(REJECTED.into()))
        }
        Err(e) => {
            fail(breaker);
            let label = if e.is_timeout() {
                "timeout"
            } else {
                "transport_error"
            };
            (label, Attempt::Retry(e.to_string()))
        }
    };
    counter!(WEBHOOK_REQUESTS, "outcome" => label).increment(1);
    attempt
}

/// `sha256=<hex>` of HMAC-SHA256(secret, idempotency_key + "." + body).
pub fn sign(secret: &str, idempotency_key: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(idempotency_key.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A 16 kHz mono PCM16 WAV of `pcm`.
pub fn wav_bytes(pcm: &[i16]) -> Vec<u8> {
    let mut out = wav_header((pcm.len() * 2) as u32);
    out.extend_from_slice(&pcm_bytes(pcm));
    out
}

fn wav_header(data_len: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&16_000u32.to_le_bytes());
    out.extend_from_slice(&32_000u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    out
}
