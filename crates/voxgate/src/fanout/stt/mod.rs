//! Speech-to-text consumers: transcripts go back to the session (client and subscribers) as
//! `Transcript` events and, optionally, to a transcript webhook.
//!
//! Two shapes:
//! - per utterance (`openai`, `pocketsphinx`): the handle keeps the audio of the open utterance
//!   (plus a lookback of the segmenter's pre-roll while idle, because `SpeechStarted` is
//!   decided after its first samples went by); at `UtteranceEnd` the audio becomes a job for
//!   the session's worker, which transcribes jobs one after another, so results come back in
//!   order. Requests are limited per backend over all sessions by a semaphore.
//! - streaming (`deepgram`): audio is sent as it comes over a WebSocket; see `deepgram/`.
//!
//! Every buffer is capped by `max_buffer_seconds` (drop newest beyond it, counted); the consumer
//! methods never wait; a failing backend yields a `Warning` (`stt_unavailable`, `stt_dropping`).

pub mod deepgram;
pub mod openai;
#[cfg(feature = "pocketsphinx")]
pub mod pocketsphinx;
mod poster;
mod utterance;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::histogram;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::warn;
use voxgate_session::{ServerEvent, SAMPLE_RATE};

use super::contract::Target;
use super::queue::ConsumerStats;
use super::{Consumer, ConsumerKind, DropReason, Notifier};
use crate::config::{SttBackend, SttConfig};
use crate::metrics::STT_LATENCY;

pub(crate) use poster::Poster;
pub use utterance::UtteranceHandle;

/// How long a worker waits for room in the session's notice queue before giving up an event.
const NOTIFY_WAIT: Duration = Duration::from_secs(2);

/// The session sample at `seconds` of media time (session events carry seconds).
pub(crate) fn sample_at(seconds: f64) -> u64 {
    (seconds * f64::from(SAMPLE_RATE)).round() as u64
}

/// A session asked for a backend that is not configured.
#[derive(Debug, thiserror::Error)]
#[error("no speech-to-text backend named {0:?}")]
pub struct UnknownBackend(pub String);

/// The refusal message the client reads (`unknown_stt`).
impl From<UnknownBackend> for String {
    fn from(e: UnknownBackend) -> Self {
        e.to_string()
    }
}

/// Why an utterance got no transcript (the text is what `stt_unavailable` and `/readyz` say).
#[derive(Debug, thiserror::Error)]
pub enum SttError {
    #[error("unreadable answer: {0}")]
    BadAnswer(reqwest::Error),
    #[error("HTTP {status}: {body}")]
    Status {
        status: reqwest::StatusCode,
        /// The start of the answer's body.
        body: String,
    },
    #[error("request timed out")]
    Timeout,
    #[error("transport error: {0}")]
    Transport(reqwest::Error),
    #[error("backend closed")]
    Closed,
    #[error("{0} is not a per-utterance backend")]
    NotPerUtterance(&'static str),
    #[cfg(feature = "pocketsphinx")]
    #[error(transparent)]
    Sphinx(#[from] pocketsphinx::SphinxError),
}

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
    pub fn select(&self, query: Option<&String>) -> Result<Vec<Arc<Backend>>, UnknownBackend> {
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
                        .ok_or_else(|| UnknownBackend(name.to_owned()))
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
    ) -> Result<String, SttError> {
        let _permit = self.permits.acquire().await.map_err(|_| SttError::Closed)?;
        match self.cfg.backend {
            SttBackend::Openai => openai::transcribe(client, &self.cfg, &pcm).await,
            #[cfg(feature = "pocketsphinx")]
            SttBackend::Pocketsphinx => {
                let pool = self
                    .sphinx
                    .get_or_init(|| pocketsphinx::Pool::start(&self.cfg));
                Ok(pool.recognize(&self.cfg, pcm).await?)
            }
            other => Err(SttError::NotPerUtterance(other.as_str())),
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
            stats: Arc::new(ConsumerStats::new(ConsumerKind::Stt)),
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

    /// Tells the client that this backend is dropping audio (`stt_dropping`); called once per
    /// drop episode. A full notice queue loses the warning: the drops themselves are counted.
    pub fn warn_dropping(&self, reason: DropReason) {
        let _ = self.notifier.try_send(ServerEvent::warning(
            "stt_dropping",
            format!(
                "speech-to-text backend {:?} is not keeping up ({reason}); audio is being dropped",
                self.name()
            ),
        ));
    }

    pub fn observe_latency(&self, since: Instant) {
        histogram!(STT_LATENCY, "backend" => self.name().to_owned())
            .record(since.elapsed().as_secs_f64());
    }
}

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
