//! Speech-to-text consumers: transcripts go back to the session (client and subscribers) as
//! `Transcript` events and, optionally, to a transcript webhook.
//!
//! Two shapes:
//! - per utterance (`openai`, `pocketsphinx`): the handle keeps the audio of the open utterance
//!   (plus a lookback of the segmenter's pre-roll while idle, because `SpeechStarted` is
//!   decided after its first samples went by); at `UtteranceEnd` the audio becomes a job for
//!   the session's worker, which transcribes jobs one after another, so results come back in
//!   order. Requests are limited per backend over all sessions by a semaphore.
//! - streaming (`deepgram`): audio is sent as it comes over a WebSocket; see `deepgram.rs`.
//!
//! Every buffer is capped by `max_buffer_seconds` (drop newest beyond it, counted); the consumer
//! methods never wait; a failing backend yields a `Warning` (`stt_unavailable`, `stt_dropping`).

pub mod deepgram;
pub mod openai;
#[cfg(feature = "pocketsphinx")]
pub mod pocketsphinx;

use crate::fanout::join_until;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{counter, histogram};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};
use voxgate_session::{AudioChunk, ConsumerSummary, ServerEvent};

use super::webhook::Target;
use super::{Consumer, ConsumerStats, Notifier, Offer};
use crate::config::{SttBackend, SttConfig};
use crate::metrics::{buffered, dropped, DELIVERED_BYTES, STT_LATENCY, TRANSCRIPT_DELIVERIES};

pub(crate) const KIND: &str = "stt";
/// Utterances waiting per session and backend (the byte cap is the real bound).
const JOB_QUEUE: usize = 64;
/// Transcripts waiting for the transcript webhook per session and backend.
const POST_QUEUE: usize = 256;
/// How long a worker waits for room in the session's notice queue before giving up an event.
const NOTIFY_WAIT: Duration = Duration::from_secs(2);

/// Every configured backend, shared by all sessions: its concurrency limit and health.
#[derive(Default)]
pub struct Registry {
    backends: Vec<Arc<Backend>>,
}

impl Registry {
    pub fn new(cfgs: &[SttConfig]) -> Self {
        Self {
            backends: cfgs
                .iter()
                .map(|c| Arc::new(Backend::new(c.clone())))
                .collect(),
        }
    }

    /// The backends of a session: `stt=a,b` (empty: none), else those with `default = true`.
    pub fn select(&self, query: Option<&String>) -> Result<Vec<Arc<Backend>>, String> {
        match query {
            None => Ok(self
                .backends
                .iter()
                .filter(|b| b.cfg.default)
                .cloned()
                .collect()),
            Some(names) => names
                .split(',')
                .filter(|n| !n.is_empty())
                .map(|name| {
                    self.backends
                        .iter()
                        .find(|b| b.cfg.name == name)
                        .cloned()
                        .ok_or_else(|| format!("no speech-to-text backend named {name:?}"))
                })
                .collect(),
        }
    }

    /// One line per backend for `/readyz`.
    pub fn health_lines(&self) -> Vec<String> {
        self.backends.iter().map(|b| b.health_line()).collect()
    }
}

/// One configured backend.
pub struct Backend {
    pub cfg: Arc<SttConfig>,
    permits: Arc<Semaphore>,
    health: Health,
    #[cfg(feature = "pocketsphinx")]
    sphinx: std::sync::OnceLock<pocketsphinx::Pool>,
}

/// Outcomes of a backend over all sessions.
#[derive(Default)]
struct Health {
    ok: AtomicU64,
    failed: AtomicU64,
    consecutive_failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Backend {
    fn new(cfg: SttConfig) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(cfg.max_concurrency)),
            cfg: Arc::new(cfg),
            health: Health::default(),
            #[cfg(feature = "pocketsphinx")]
            sphinx: std::sync::OnceLock::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub(crate) fn success(&self) {
        self.health.ok.fetch_add(1, Ordering::Relaxed);
        self.health.consecutive_failures.store(0, Ordering::Relaxed);
    }

    pub(crate) fn failure(&self, error: &str) {
        self.health.failed.fetch_add(1, Ordering::Relaxed);
        self.health
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed);
        *self
            .health
            .last_error
            .lock()
            .expect("health lock is never poisoned") = Some(error.to_owned());
    }

    fn health_line(&self) -> String {
        let h = &self.health;
        let consecutive = h.consecutive_failures.load(Ordering::Relaxed);
        let status = match consecutive {
            0 => "ok",
            1..=2 => "degraded",
            _ => "failing",
        };
        let in_flight = self.cfg.max_concurrency - self.permits.available_permits();
        let mut line = format!(
            "stt {} ({}): {status} ok={} failed={} consecutive_failures={consecutive} in_flight={in_flight}/{}",
            self.cfg.name,
            self.cfg.backend.as_str(),
            h.ok.load(Ordering::Relaxed),
            h.failed.load(Ordering::Relaxed),
            self.cfg.max_concurrency,
        );
        if let Some(e) = h
            .last_error
            .lock()
            .expect("health lock is never poisoned")
            .as_deref()
        {
            line.push_str(&format!(" last_error={e:?}"));
        }
        line
    }

    /// Transcribes one utterance under the backend's concurrency limit, with retries.
    async fn transcribe(
        &self,
        client: &reqwest::Client,
        pcm: Arc<[i16]>,
    ) -> Result<String, String> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| "backend closed".to_owned())?;
        match self.cfg.backend {
            SttBackend::Openai => openai::transcribe(client, &self.cfg, &pcm).await,
            #[cfg(feature = "pocketsphinx")]
            SttBackend::Pocketsphinx => {
                let pool = self
                    .sphinx
                    .get_or_init(|| pocketsphinx::Pool::start(&self.cfg));
                pool.recognize(&self.cfg, pcm).await
            }
            other => Err(format!("{} is not a per-utterance backend", other.as_str())),
        }
    }
}

/// Builds the session's speech-to-text consumers.
pub fn build(
    backends: Vec<Arc<Backend>>,
    http: &reqwest::Client,
    lookback_samples: u64,
    target: &Target,
    notifier: &Notifier,
    transcripts_via_bus: bool,
    consumers: &mut Vec<Box<dyn Consumer>>,
) {
    for backend in backends {
        let ctx = Ctx {
            transcripts_via_bus,
            backend: backend.clone(),
            http: http.clone(),
            target: target.clone(),
            notifier: notifier.clone(),
            stats: Arc::new(ConsumerStats::default()),
        };
        match backend.cfg.backend {
            SttBackend::Deepgram => consumers.push(Box::new(deepgram::DeepgramHandle::spawn(
                ctx,
                lookback_samples,
            ))),
            _ => consumers.push(Box::new(UtteranceHandle::spawn(ctx, lookback_samples))),
        }
    }
}

/// What every STT consumer of a session shares with its task.
#[derive(Clone)]
pub(crate) struct Ctx {
    /// The bus publishes final transcripts for `voxgate deliver`; no in-process poster.
    pub transcripts_via_bus: bool,
    pub backend: Arc<Backend>,
    pub http: reqwest::Client,
    pub target: Target,
    pub notifier: Notifier,
    pub stats: Arc<ConsumerStats>,
}

impl Ctx {
    pub fn name(&self) -> &str {
        &self.backend.cfg.name
    }

    /// Sends an event to the session from a task (waits briefly for room, never forever).
    pub async fn notify(&self, event: ServerEvent) {
        if tokio::time::timeout(NOTIFY_WAIT, self.notifier.send(event))
            .await
            .is_err()
        {
            warn!(stt = %self.name(), "session notice queue full; event dropped");
        }
    }

    pub fn transcript(
        &self,
        utterance: u64,
        text: String,
        is_final: bool,
        start: f64,
        end: f64,
    ) -> ServerEvent {
        ServerEvent::Transcript {
            utterance,
            text,
            is_final,
            backend: self.name().to_owned(),
            start,
            end,
        }
    }

    pub fn observe_latency(&self, since: Instant) {
        histogram!(STT_LATENCY, "backend" => self.name().to_owned())
            .record(since.elapsed().as_secs_f64());
    }

    /// Audio accepted for this consumer (held until delivered or dropped).
    pub fn hold(&self, bytes: u64) {
        self.stats.held_bytes.fetch_add(bytes, Ordering::Relaxed);
        buffered(KIND, bytes as i64);
    }

    pub fn release(&self, bytes: u64) {
        if bytes > 0 {
            self.stats.held_bytes.fetch_sub(bytes, Ordering::Relaxed);
            buffered(KIND, -(bytes as i64));
        }
    }

    pub fn delivered(&self, bytes: u64) {
        self.stats
            .delivered_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        counter!(DELIVERED_BYTES, "consumer" => KIND).increment(bytes);
    }

    pub fn dropped(&self, reason: &'static str, bytes: u64) {
        if bytes > 0 {
            self.stats.dropped_bytes.fetch_add(bytes, Ordering::Relaxed);
            dropped(KIND, reason, bytes);
        }
    }
}

pub(crate) use super::retry::{retryable, with_retries, Attempt, Backoff};

impl SttConfig {
    /// This backend's retry policy.
    pub fn retry_policy(&self) -> super::retry::RetryPolicy {
        super::retry::RetryPolicy::from_ms(
            self.max_retries,
            self.backoff_initial_ms,
            self.backoff_max_ms,
        )
    }
}

/// Posts final transcripts as JSON to `transcript_webhook`: a bounded queue, retries with
/// backoff, counted drops (`voxgate_transcript_webhook_total{outcome}`).
pub(crate) struct Poster {
    tx: mpsc::Sender<serde_json::Value>,
    task: JoinHandle<()>,
}

impl Poster {
    pub fn spawn(ctx: &Ctx) -> Option<Self> {
        if ctx.transcripts_via_bus {
            return None;
        }
        let url = ctx.backend.cfg.transcript_webhook.clone()?;
        let (tx, mut rx) = mpsc::channel::<serde_json::Value>(POST_QUEUE);
        let cfg = ctx.backend.cfg.clone();
        let client = ctx.http.clone();
        let session_id = ctx.target.session_id.clone();
        let task = tokio::spawn(async move {
            while let Some(doc) = rx.recv().await {
                let key = format!("{}:{}:{}", session_id, cfg.name, doc["sequence"]);
                let outcome = with_retries(&cfg.retry_policy(), |_| {
                    let req = client
                        .post(&url)
                        .timeout(Duration::from_millis(cfg.timeout_ms))
                        .header("idempotency-key", key.as_str())
                        .json(&doc);
                    async move {
                        match req.send().await {
                            Ok(r) if r.status().is_success() => Attempt::Done(()),
                            Ok(r) if retryable(r.status()) => {
                                Attempt::Retry(r.status().to_string())
                            }
                            Ok(r) => Attempt::Fatal(r.status().to_string()),
                            Err(e) => Attempt::Retry(e.to_string()),
                        }
                    }
                })
                .await;
                let label = match outcome {
                    Ok(()) => "delivered",
                    Err(e) => {
                        warn!(stt = %cfg.name, session = %session_id, error = %e, "transcript webhook gave up");
                        "gave_up"
                    }
                };
                counter!(TRANSCRIPT_DELIVERIES, "outcome" => label).increment(1);
            }
        });
        Some(Self { tx, task })
    }

    /// Queues a final transcript without waiting; a full queue drops it, counted.
    pub fn offer(&self, ctx: &Ctx, seq: u64, event: &ServerEvent) {
        let ServerEvent::Transcript {
            utterance,
            text,
            is_final,
            start,
            end,
            ..
        } = event
        else {
            return;
        };
        let doc = serde_json::json!({
            "session_id": ctx.target.session_id,
            "uid": ctx.target.uid,
            "backend": ctx.name(),
            "sequence": seq,
            "utterance": utterance,
            "text": text,
            "is_final": is_final,
            "start": start,
            "end": end,
        });
        if self.tx.try_send(doc).is_err() {
            counter!(TRANSCRIPT_DELIVERIES, "outcome" => "queue_full").increment(1);
            warn!(stt = %ctx.name(), "transcript webhook queue full; transcript dropped");
        }
    }

    /// Lets the queue drain (the caller bounds this with its deadline).
    pub async fn close(self) {
        drop(self.tx);
        let _ = self.task.await;
    }
}

/// One finalized utterance waiting for a transcript.
struct Job {
    utterance: u64,
    start: u64,
    end: u64,
    pcm: Arc<[i16]>,
    ended: Instant,
}

/// The ingest side of a per-utterance backend (openai, pocketsphinx) for one session.
pub struct UtteranceHandle {
    ctx: Ctx,
    cap_bytes: u64,
    lookback: usize,
    /// Contiguous audio starting at `buf_start`: the lookback while idle, the utterance while open.
    buf: Vec<i16>,
    buf_start: u64,
    open: Option<(u64, u64)>,
    /// The open utterance lost audio to the cap; the rest of it is dropped too.
    truncated: bool,
    dropping: bool,
    tx: Option<mpsc::Sender<Job>>,
    task: JoinHandle<()>,
}

impl UtteranceHandle {
    fn spawn(ctx: Ctx, lookback_samples: u64) -> Self {
        let (tx, rx) = mpsc::channel(JOB_QUEUE);
        let task = tokio::spawn(utterance_worker(ctx.clone(), rx));
        Self {
            cap_bytes: ctx.backend.cfg.max_buffer_bytes() as u64,
            ctx,
            lookback: lookback_samples as usize,
            buf: Vec::new(),
            buf_start: 0,
            open: None,
            truncated: false,
            dropping: false,
            tx: Some(tx),
            task,
        }
    }

    /// Idle: keeps only the samples from `lookback` before `from` on.
    fn trim_idle(&mut self, from: u64) {
        let keep_from = from.saturating_sub(self.lookback as u64);
        if keep_from > self.buf_start {
            let cut = ((keep_from - self.buf_start) as usize).min(self.buf.len());
            self.buf.drain(..cut);
            self.buf_start += cut as u64;
            self.ctx.release(cut as u64 * 2);
        }
    }

    fn drop_audio(&mut self, reason: &'static str, bytes: u64) -> Offer {
        self.ctx.dropped(reason, bytes);
        let first = !self.dropping;
        self.dropping = true;
        if first {
            warn!(stt = %self.ctx.name(), session = %self.ctx.target.session_id, reason, "speech-to-text consumer dropping audio");
            let _ = self.ctx.notifier.try_send(ServerEvent::warning(
                "stt_dropping",
                format!(
                    "speech-to-text backend {:?} is not keeping up ({reason}); audio is being dropped",
                    self.ctx.name()
                ),
            ));
        }
        // The warning above is ours (`stt_dropping`), not the generic one.
        Offer::Dropped { first: false }
    }
}

impl Consumer for UtteranceHandle {
    fn name(&self) -> &str {
        self.ctx.name()
    }

    fn on_audio(&mut self, chunk: &AudioChunk) -> Offer {
        let bytes = chunk.pcm.len() as u64 * 2;
        if self.open.is_none() {
            // Idle: only what a `SpeechStarted` decided inside this chunk may reach back to
            // (the chunk itself and the lookback before it).
            if chunk.start != self.buf_start + self.buf.len() as u64 {
                self.ctx.release(self.buf.len() as u64 * 2);
                self.buf.clear();
                self.buf_start = chunk.start;
            }
            self.buf.extend_from_slice(&chunk.pcm);
            self.ctx.hold(bytes);
            self.trim_idle(chunk.start);
            return Offer::Accepted;
        }
        let held = self.ctx.stats.held_bytes.load(Ordering::Relaxed);
        if self.truncated || held + bytes > self.cap_bytes {
            self.truncated = true;
            return self.drop_audio("buffer_full", bytes);
        }
        self.buf.extend_from_slice(&chunk.pcm);
        self.ctx.hold(bytes);
        self.dropping = false;
        Offer::Accepted
    }

    fn on_event(&mut self, event: &ServerEvent) {
        match *event {
            ServerEvent::SpeechStarted {
                utterance,
                timestamp,
            } => {
                let start = (timestamp * 16_000.0).round() as u64;
                if start > self.buf_start {
                    let cut = ((start - self.buf_start) as usize).min(self.buf.len());
                    self.buf.drain(..cut);
                    self.buf_start += cut as u64;
                    self.ctx.release(cut as u64 * 2);
                }
                self.open = Some((utterance, self.buf_start.max(start)));
                self.truncated = false;
            }
            ServerEvent::UtteranceEnd { utterance, end, .. } => {
                let Some((open, start)) = self.open.take() else {
                    return;
                };
                if open != utterance {
                    debug!(open, utterance, "utterance end for another utterance");
                }
                let end = (end * 16_000.0).round() as u64;
                let take = (end.saturating_sub(self.buf_start) as usize).min(self.buf.len());
                let rest = self.buf.split_off(take);
                let pcm: Arc<[i16]> = Arc::from(std::mem::replace(&mut self.buf, rest));
                self.buf_start += take as u64;
                // What follows `end` may start the next utterance (a limit split).
                self.trim_idle(end);
                if pcm.is_empty() {
                    return;
                }
                let bytes = pcm.len() as u64 * 2;
                let job = Job {
                    utterance,
                    start,
                    end: start + pcm.len() as u64,
                    pcm,
                    ended: Instant::now(),
                };
                match self.tx.as_ref().map(|tx| tx.try_send(job)) {
                    Some(Ok(())) => {}
                    _ => {
                        self.ctx.release(bytes);
                        self.drop_audio("queue_full", bytes);
                    }
                }
            }
            _ => {}
        }
    }

    fn finish(
        mut self: Box<Self>,
        deadline: Instant,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ConsumerSummary> + Send>> {
        Box::pin(async move {
            // An utterance still open was ended by the session before it closed; what is left
            // here is lookback audio, never sent by design.
            self.ctx.release(self.buf.len() as u64 * 2);
            self.buf = Vec::new();
            self.tx.take();
            if !join_until(&mut self.task, deadline).await {
                let held = self.ctx.stats.drop_held(KIND, "close_timeout");
                if held > 0 {
                    warn!(stt = %self.ctx.name(), held, "speech-to-text flush timed out; utterances dropped");
                }
            }
            self.ctx.stats.summary(self.ctx.name(), KIND)
        })
    }
}

/// Transcribes a session's utterances in order.
async fn utterance_worker(ctx: Ctx, mut rx: mpsc::Receiver<Job>) {
    let poster = Poster::spawn(&ctx);
    let mut seq = 0u64;
    let mut failing = false;
    while let Some(job) = rx.recv().await {
        let bytes = job.pcm.len() as u64 * 2;
        ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
        let outcome = ctx.backend.transcribe(&ctx.http, job.pcm.clone()).await;
        ctx.release(bytes);
        match outcome {
            Ok(text) => {
                ctx.backend.success();
                ctx.delivered(bytes);
                ctx.observe_latency(job.ended);
                failing = false;
                let event = ctx.transcript(
                    job.utterance,
                    text,
                    true,
                    voxgate_session::seconds(job.start),
                    voxgate_session::seconds(job.end),
                );
                if let Some(p) = &poster {
                    p.offer(&ctx, seq, &event);
                }
                seq += 1;
                ctx.notify(event).await;
            }
            Err(error) => {
                ctx.backend.failure(&error);
                ctx.dropped("stt_failed", bytes);
                warn!(stt = %ctx.name(), session = %ctx.target.session_id, utterance = job.utterance, %error, "utterance given up");
                if !failing {
                    failing = true;
                    ctx.notify(ServerEvent::warning(
                        "stt_unavailable",
                        format!(
                            "speech-to-text backend {:?} failed for utterance {}: {error}",
                            ctx.name(),
                            job.utterance
                        ),
                    ))
                    .await;
                }
            }
        }
    }
    if let Some(p) = poster {
        p.close().await;
    }
}
