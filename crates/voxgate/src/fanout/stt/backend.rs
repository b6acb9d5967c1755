//! The configured backends, shared by every session: each one's concurrency limit (a semaphore)
//! and health, and per-utterance transcription (`openai`, and the embedded `pocketsphinx` and
//! `whisper`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use super::error::{SttError, UnknownBackend};
#[cfg(any(feature = "pocketsphinx", feature = "whisper"))]
use super::local;
use super::openai;
use crate::config::{FinalizeMode, SessionStt, SttBackend, SttConfig, SttOptions};
use crate::fanout::retry::RetryPolicy;

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
    /// `finalize = "auto"`: the backend refused `Finalize` once; `none` from then on.
    refused_finalize: AtomicBool,
    /// An embedded recognizer's threads, started by the first utterance.
    #[cfg(any(feature = "pocketsphinx", feature = "whisper"))]
    local: std::sync::OnceLock<local::Pool>,
}

/// Outcomes of a backend over all sessions.
#[derive(Default)]
struct Health {
    ok: AtomicU64,
    failed: AtomicU64,
    consecutive_failures: AtomicU64,
    /// The class of the last failure (`SttError::kind`): `/readyz` is unauthenticated, so the
    /// backend's own words stay in the log.
    last_error: Mutex<Option<&'static str>>,
}

impl Backend {
    fn new(cfg: SttConfig) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(cfg.max_concurrency)),
            cfg: Arc::new(cfg),
            health: Health::default(),
            refused_finalize: AtomicBool::new(false),
            #[cfg(any(feature = "pocketsphinx", feature = "whisper"))]
            local: std::sync::OnceLock::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The finalize mode in effect now: `message` or `none` (`auto` resolved).
    pub fn finalize_mode(&self) -> FinalizeMode {
        match self.cfg.finalize {
            FinalizeMode::Auto if self.refused_finalize.load(Ordering::Relaxed) => {
                FinalizeMode::None
            }
            FinalizeMode::Auto => FinalizeMode::Message,
            mode => mode,
        }
    }

    /// `auto`: the backend refused `Finalize`; every session uses `none` from now on. True
    /// the first time (the caller logs and counts the switch).
    pub(crate) fn learn_finalize_refused(&self) -> bool {
        self.cfg.finalize == FinalizeMode::Auto
            && !self.refused_finalize.swap(true, Ordering::Relaxed)
    }

    /// The options this backend uses for a session asking `asked` (checked against the
    /// backend's allow-lists).
    pub fn session_options(&self, asked: &SttOptions) -> Result<SessionStt, String> {
        self.cfg.permit(asked)
    }

    pub(crate) fn success(&self) {
        self.health.ok.fetch_add(1, Ordering::Relaxed);
        self.health.consecutive_failures.store(0, Ordering::Relaxed);
    }

    pub(crate) fn failure(&self, kind: &'static str) {
        self.health.failed.fetch_add(1, Ordering::Relaxed);
        self.health
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed);
        *self
            .health
            .last_error
            .lock()
            .expect("health lock is never poisoned") = Some(kind);
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
            .as_ref()
        {
            line.push_str(&format!(" last_error={e:?}"));
        }
        line
    }

    /// Transcribes one utterance under the backend's concurrency limit, with retries.
    pub(crate) async fn transcribe(
        &self,
        client: &reqwest::Client,
        opts: &SessionStt,
        pcm: Arc<[i16]>,
    ) -> Result<String, SttError> {
        let _permit = self.permits.acquire().await.map_err(|_| SttError::Closed)?;
        match self.cfg.backend {
            SttBackend::Openai => openai::transcribe(client, &self.cfg, opts, &pcm).await,
            #[cfg(feature = "pocketsphinx")]
            SttBackend::Pocketsphinx => self.local::<super::pocketsphinx::Sphinx>(pcm).await,
            #[cfg(feature = "whisper")]
            SttBackend::Whisper => self.local::<super::whisper::Whisper>(pcm).await,
            other => Err(SttError::NotPerUtterance(other.as_str())),
        }
    }

    /// One utterance on this backend's embedded recognizer `E`.
    #[cfg(any(feature = "pocketsphinx", feature = "whisper"))]
    async fn local<E: local::Engine>(&self, pcm: Arc<[i16]>) -> Result<String, SttError> {
        let pool = self
            .local
            .get_or_init(|| local::Pool::start::<E>(&self.cfg));
        Ok(pool.recognize(&self.cfg, pcm).await?)
    }
}

impl SttConfig {
    /// This backend's retry policy.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::from_ms(
            self.max_retries,
            self.backoff_initial_ms,
            self.backoff_max_ms,
        )
    }
}
