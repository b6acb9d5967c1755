//! Embedded recognizers (PocketSphinx, Whisper) run on dedicated threads, never on the async
//! runtime: a recognizer holds a model of tens of megabytes and takes a second or more per
//! utterance. Each backend runs `max_concurrency` threads fed by a bounded queue; what every
//! thread shares (a loaded model) is loaded once, on the first utterance, and each thread then
//! makes its own decoder from it.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::counter;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::config::SttConfig;
use crate::metrics::STT_REQUESTS;

/// One embedded recognizer.
pub trait Engine: Sized + 'static {
    /// What threads share: the loaded model. Loaded once per backend.
    type Shared: Send + Sync + 'static;
    /// The recognizer's name in logs ("PocketSphinx").
    const NAME: &'static str;
    fn load_shared(cfg: &SttConfig) -> Result<Self::Shared, LocalError>;
    /// One thread's decoder (a decoder is used by one thread at a time).
    fn new(shared: &Arc<Self::Shared>) -> Result<Self, LocalError>;
    /// The text of one whole utterance of 16 kHz mono PCM.
    fn decode(&mut self, pcm: &[i16]) -> Result<String, LocalError>;
}

/// Why an embedded recognizer gave no text (the text is what the log says; clients and
/// `/readyz` get the `SttError` kind).
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("decoder queue full")]
    QueueFull,
    #[error("decoder threads are gone")]
    ThreadsGone,
    #[error("decoding timed out")]
    Timeout,
    #[error("decoder thread failed")]
    ThreadFailed,
    #[error("{what} {path} does not exist ({hint})")]
    MissingModel {
        what: &'static str,
        path: String,
        hint: &'static str,
    },
    #[error("could not load the model: {0}")]
    Load(String),
    /// A decoder call failed.
    #[error("decoding failed: {0}")]
    Decode(String),
}

impl LocalError {
    /// The `outcome` label of `voxgate_stt_requests_total`.
    fn label(&self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::ThreadsGone | Self::ThreadFailed => "unavailable",
            Self::Timeout => "timeout",
            _ => "error",
        }
    }
}

struct Job {
    pcm: Arc<[i16]>,
    reply: oneshot::Sender<Result<String, LocalError>>,
}

/// Decoder threads of one backend and their bounded queue.
pub struct Pool {
    tx: SyncSender<Job>,
}

impl Pool {
    pub fn start<E: Engine>(cfg: &SttConfig) -> Self {
        // Callers hold one of `max_concurrency` permits while their job is queued or running,
        // so this queue only overflows after timeouts (a job abandoned but still running).
        let (tx, rx) = sync_channel::<Job>(cfg.max_concurrency);
        let rx = Arc::new(Mutex::new(rx));
        let shared = Arc::new(SharedModel::<E> {
            cfg: cfg.clone(),
            loaded: Mutex::new(None),
        });
        for i in 0..cfg.max_concurrency {
            let rx = rx.clone();
            let shared = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("stt-{}-{i}", cfg.name))
                .spawn(move || decode_loop::<E>(&rx, &shared));
            if let Err(e) = spawned {
                warn!(stt = %cfg.name, error = %e, "could not start a {} thread", E::NAME);
            }
        }
        Self { tx }
    }

    /// Decodes one utterance on a decoder thread, within the backend's timeout.
    pub async fn recognize(&self, cfg: &SttConfig, pcm: Arc<[i16]>) -> Result<String, LocalError> {
        let (reply, answer) = oneshot::channel();
        let outcome = match self.tx.try_send(Job { pcm, reply }) {
            Err(TrySendError::Full(_)) => Err(LocalError::QueueFull),
            Err(TrySendError::Disconnected(_)) => Err(LocalError::ThreadsGone),
            Ok(()) => {
                match tokio::time::timeout(Duration::from_millis(cfg.timeout_ms), answer).await {
                    Err(_) => Err(LocalError::Timeout),
                    Ok(Err(_)) => Err(LocalError::ThreadFailed),
                    Ok(Ok(result)) => result,
                }
            }
        };
        let label = match &outcome {
            Ok(_) => "success",
            Err(e) => e.label(),
        };
        counter!(STT_REQUESTS, "backend" => cfg.name.clone(), "outcome" => label).increment(1);
        outcome
    }
}

/// The model every thread of a backend shares, loaded by the first job that needs it (a
/// failed load is tried again by the next job: the model may have been installed since).
struct SharedModel<E: Engine> {
    cfg: SttConfig,
    loaded: Mutex<Option<Arc<E::Shared>>>,
}

impl<E: Engine> SharedModel<E> {
    fn get(&self) -> Result<Arc<E::Shared>, LocalError> {
        let mut loaded = self.loaded.lock().expect("model lock is never poisoned");
        if let Some(shared) = loaded.as_ref() {
            return Ok(shared.clone());
        }
        let started = Instant::now();
        let shared = Arc::new(E::load_shared(&self.cfg)?);
        info!(stt = %self.cfg.name, ms = started.elapsed().as_millis() as u64, "{} model loaded", E::NAME);
        *loaded = Some(shared.clone());
        Ok(shared)
    }
}

fn decode_loop<E: Engine>(rx: &Mutex<Receiver<Job>>, shared: &SharedModel<E>) {
    let mut decoder: Option<E> = None;
    loop {
        let job = {
            let rx = rx.lock().expect("queue lock is never poisoned");
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return, // the backend is gone
            }
        };
        if job.reply.is_closed() {
            continue; // the caller gave up while it waited
        }
        if decoder.is_none() {
            match shared.get().and_then(|s| E::new(&s)) {
                Ok(d) => decoder = Some(d),
                Err(e) => {
                    // A closed reply means the caller timed out, which it counted already.
                    let _ = job.reply.send(Err(e));
                    continue;
                }
            }
        }
        if job.reply.is_closed() {
            continue; // the caller gave up while the model loaded
        }
        let d = decoder.as_mut().expect("decoder was just made");
        // As above: a caller that stopped waiting counted its timeout.
        let _ = job.reply.send(d.decode(&job.pcm));
    }
}
