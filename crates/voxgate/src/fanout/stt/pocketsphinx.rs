//! Embedded, offline recognition with PocketSphinx (cargo feature `pocketsphinx`; Debian
//! `libpocketsphinx-dev` + `pocketsphinx-en-us`). Demo-grade: expect a word error rate of
//! 10-50 % on clean speech; use a Whisper server (openai backend) or a Deepgram-compatible
//! service for real work.
//!
//! A decoder is not thread-safe and loads a ~40 MB model, so each backend runs
//! `max_concurrency` dedicated threads, each owning one decoder created on its first job, fed
//! by a bounded queue. Each utterance is decoded whole (`process_raw(.., full_utt = true)`),
//! which is far more accurate than PocketSphinx's live mode.

use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::counter;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::config::SttConfig;
use crate::metrics::STT_REQUESTS;

const MODEL_DIR: &str = "/usr/share/pocketsphinx/model/en-us";

struct Job {
    pcm: Arc<[i16]>,
    reply: oneshot::Sender<Result<String, SphinxError>>,
}

/// Why PocketSphinx gave no text (the text is what `stt_unavailable` and `/readyz` say).
#[derive(Debug, thiserror::Error)]
pub enum SphinxError {
    #[error("decoder queue full")]
    QueueFull,
    #[error("decoder threads are gone")]
    ThreadsGone,
    #[error("decoding timed out")]
    Timeout,
    #[error("decoder thread failed")]
    ThreadFailed,
    #[error("PocketSphinx {what} {path} does not exist (install pocketsphinx-en-us)")]
    MissingModel { what: &'static str, path: String },
    #[error("PocketSphinx rejected its configuration")]
    Config,
    #[error("PocketSphinx could not load its model")]
    Load,
    /// One of the decoder calls (`start_utt`, `process_raw`, `end_utt`).
    #[error("{0} failed")]
    Decode(&'static str),
}

impl SphinxError {
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

/// Decoder threads of one backend and their bounded queue.
pub struct Pool {
    tx: SyncSender<Job>,
}

struct Models {
    hmm: String,
    lm: String,
    dict: String,
}

impl Pool {
    pub fn start(cfg: &SttConfig) -> Self {
        let models = Arc::new(Models {
            hmm: cfg
                .hmm
                .clone()
                .unwrap_or_else(|| format!("{MODEL_DIR}/en-us")),
            lm: cfg
                .lm
                .clone()
                .unwrap_or_else(|| format!("{MODEL_DIR}/en-us.lm.bin")),
            dict: cfg
                .dict
                .clone()
                .unwrap_or_else(|| format!("{MODEL_DIR}/cmudict-en-us.dict")),
        });
        // Callers hold one of `max_concurrency` permits while their job is queued or running,
        // so this queue only overflows after timeouts (a job abandoned but still running).
        let (tx, rx) = sync_channel::<Job>(cfg.max_concurrency);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..cfg.max_concurrency {
            let rx = rx.clone();
            let models = models.clone();
            let name = cfg.name.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("sphinx-{i}"))
                .spawn(move || decode_loop(&name, &rx, &models));
            if let Err(e) = spawned {
                warn!(stt = %cfg.name, error = %e, "could not start a PocketSphinx thread");
            }
        }
        Self { tx }
    }

    /// Decodes one utterance on a decoder thread, within the backend's timeout.
    pub async fn recognize(&self, cfg: &SttConfig, pcm: Arc<[i16]>) -> Result<String, SphinxError> {
        let (reply, answer) = oneshot::channel();
        let outcome = match self.tx.try_send(Job { pcm, reply }) {
            Err(TrySendError::Full(_)) => Err(SphinxError::QueueFull),
            Err(TrySendError::Disconnected(_)) => Err(SphinxError::ThreadsGone),
            Ok(()) => {
                match tokio::time::timeout(Duration::from_millis(cfg.timeout_ms), answer).await {
                    Err(_) => Err(SphinxError::Timeout),
                    Ok(Err(_)) => Err(SphinxError::ThreadFailed),
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

fn decode_loop(name: &str, rx: &Mutex<Receiver<Job>>, models: &Models) {
    let mut decoder: Option<pocketsphinx::PsDecoder> = None;
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
            let started = std::time::Instant::now();
            match load(models) {
                Ok(d) => {
                    info!(stt = %name, ms = started.elapsed().as_millis() as u64, "PocketSphinx decoder loaded");
                    decoder = Some(d);
                }
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                    continue;
                }
            }
        }
        let d = decoder.as_ref().expect("decoder was just loaded");
        let _ = job.reply.send(decode(d, &job.pcm));
    }
}

fn load(m: &Models) -> Result<pocketsphinx::PsDecoder, SphinxError> {
    for (what, path) in [("hmm", &m.hmm), ("lm", &m.lm), ("dict", &m.dict)] {
        if !Path::new(path).exists() {
            return Err(SphinxError::MissingModel {
                what,
                path: path.clone(),
            });
        }
    }
    let args = [
        "voxgate",
        "-hmm",
        &m.hmm,
        "-lm",
        &m.lm,
        "-dict",
        &m.dict,
        "-logfn",
        "/dev/null",
    ];
    let config = pocketsphinx::CmdLn::init(true, &args).map_err(|_| SphinxError::Config)?;
    // `PsDecoder::init` asserts on a model it cannot load; keep that panic on this thread.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pocketsphinx::PsDecoder::init(config)
    }))
    .map_err(|_| SphinxError::Load)
}

fn decode(d: &pocketsphinx::PsDecoder, pcm: &[i16]) -> Result<String, SphinxError> {
    d.start_utt(None)
        .map_err(|_| SphinxError::Decode("start_utt"))?;
    d.process_raw(pcm, false, true)
        .map_err(|_| SphinxError::Decode("process_raw"))?;
    d.end_utt().map_err(|_| SphinxError::Decode("end_utt"))?;
    Ok(d.get_hyp().map(|(text, _, _)| text).unwrap_or_default())
}
