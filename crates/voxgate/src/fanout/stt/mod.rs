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

mod backend;
mod ctx;
pub mod deepgram;
mod error;
pub mod openai;
#[cfg(feature = "pocketsphinx")]
pub mod pocketsphinx;
mod poster;
mod utterance;

use std::sync::Arc;

use super::contract::Target;
use super::queue::ConsumerStats;
use super::{Consumer, ConsumerKind, Notifier};
use crate::config::SttBackend;

pub use backend::{Backend, Registry};
pub use error::{SttError, UnknownBackend};
pub use utterance::UtteranceHandle;

use ctx::Ctx;

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
