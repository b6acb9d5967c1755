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
    reply: oneshot::Sender<Result<String, String>>,
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
    pub async fn recognize(&self, cfg: &SttConfig, pcm: Arc<[i16]>) -> Result<String, String> {
        let (reply, answer) = oneshot::channel();
        let outcome = match self.tx.try_send(Job { pcm, reply }) {
            Err(TrySendError::Full(_)) => Err(("queue_full", "decoder queue full".to_owned())),
            Err(TrySendError::Disconnected(_)) => {
                Err(("unavailable", "decoder threads are gone".to_owned()))
            }
            Ok(()) => {
                match tokio::time::timeout(Duration::from_millis(cfg.timeout_ms), answer).await {
                    Err(_) => Err(("timeout", "decoding timed out".to_owned())),
                    Ok(Err(_)) => Err(("unavailable", "decoder thread failed".to_owned())),
                    Ok(Ok(Err(e))) => Err(("error", e)),
                    Ok(Ok(Ok(text))) => Ok(text),
                }
            }
        };
        let label: &'static str = match &outcome {
            Ok(_) => "success",
            Err((label, _)) => label,
        };
        counter!(STT_REQUESTS, "backend" => cfg.name.clone(), "outcome" => label).increment(1);
        outcome.map_err(|(_, e)| e)
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

fn load(m: &Models) -> Result<pocketsphinx::PsDecoder, String> {
    for (what, path) in [("hmm", &m.hmm), ("lm", &m.lm), ("dict", &m.dict)] {
        if !Path::new(path).exists() {
            return Err(format!(
                "PocketSphinx {what} {path} does not exist (install pocketsphinx-en-us)"
            ));
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
    let config = pocketsphinx::CmdLn::init(true, &args)
        .map_err(|_| "PocketSphinx rejected its configuration".to_owned())?;
    // `PsDecoder::init` asserts on a model it cannot load; keep that panic on this thread.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pocketsphinx::PsDecoder::init(config)
    }))
    .map_err(|_| "PocketSphinx could not load its model".to_owned())
}

fn decode(d: &pocketsphinx::PsDecoder, pcm: &[i16]) -> Result<String, String> {
    d.start_utt(None)
        .map_err(|_| "start_utt failed".to_owned())?;
    d.process_raw(pcm, false, true)
        .map_err(|_| "process_raw failed".to_owned())?;
    d.end_utt().map_err(|_| "end_utt failed".to_owned())?;
    Ok(d.get_hyp().map(|(text, _, _)| text).unwrap_or_default())
}
