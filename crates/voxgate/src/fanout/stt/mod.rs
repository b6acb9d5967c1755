//! Speech-to-text consumers: transcripts go back to the session (client and subscribers) as
//! `Transcript` events and, optionally, to a transcript webhook.
//!
//! Two shapes:
//! - per utterance (`openai`, `pocketsphinx`, `whisper`): the handle keeps the audio of the open utterance
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
#[cfg(any(feature = "pocketsphinx", feature = "whisper"))]
mod local;
pub mod lost;
pub mod openai;
#[cfg(feature = "pocketsphinx")]
mod pocketsphinx;
mod poster;
mod utterance;
#[cfg(feature = "whisper")]
pub mod whisper;

use std::sync::Arc;

use super::contract::Target;
use super::queue::ConsumerStats;
use super::{Consumer, ConsumerKind, Notifier};
use crate::config::{SttBackend, SttOptions};
use voxgate_session::Party;

pub use backend::{Backend, Registry};
pub use error::{SttError, UnknownBackend};
pub use utterance::UtteranceHandle;

use ctx::Ctx;

/// Checks what a session asks (`language`, `model`, `prompt`, `keyterm`) against every chosen
/// backend's allow-lists; the error says which option a backend refuses.
pub fn check_options(backends: &[Arc<Backend>], asked: &SttOptions) -> Result<(), String> {
    backends
        .iter()
        .try_for_each(|b| b.session_options(asked).map(drop))
}

/// What a session asks: field by field, the token's claim wins over the `on_connect` answer,
/// which wins over the connect query.
pub fn asked_options(
    claim: Option<&SttOptions>,
    hook: Option<&SttOptions>,
    query: &SttOptions,
) -> SttOptions {
    let none = SttOptions::default();
    claim
        .cloned()
        .unwrap_or_default()
        .or(hook.unwrap_or(&none))
        .or(query)
}

/// The backends a session chose and what it asks of them.
pub struct Selection<'a> {
    pub backends: Vec<Arc<Backend>>,
    pub asked: &'a SttOptions,
    /// Whose speech each backend transcribes, one consumer per entry (`None`: the mix).
    pub parties: &'a [Option<Party>],
}

/// What `parties=caller,agent,mix` asks, for a session split into `split` parties (caller
/// first). Unset: the mix. A party the session does not have is transcribed from the mix (a
/// mono call's one voice is the whole call), once.
pub fn parties(asked: Option<&String>, split: u8) -> Result<Vec<Option<Party>>, String> {
    let Some(list) = asked else {
        return Ok(vec![None]);
    };
    let mut chosen = Vec::new();
    for name in list.split(',').filter(|n| !n.is_empty()) {
        let party = match name {
            "mix" => None,
            _ => Some(Party::parse(name).ok_or_else(|| {
                format!("parties: unknown party {name:?} (caller, agent or mix)")
            })?),
        };
        let have = party.is_none_or(|p| Party::ALL[..usize::from(split)].contains(&p));
        let party = if have { party } else { None };
        if !chosen.contains(&party) {
            chosen.push(party);
        }
    }
    if chosen.is_empty() {
        return Err("parties: empty (caller, agent or mix)".into());
    }
    Ok(chosen)
}

/// Builds the session's speech-to-text consumers.
pub fn build(
    chosen: Selection<'_>,
    http: &reqwest::Client,
    lookback_samples: u64,
    target: &Target,
    notifier: &Notifier,
    transcripts_via_bus: bool,
    consumers: &mut Vec<Box<dyn Consumer>>,
) {
    let asked = chosen.asked;
    let targets = chosen
        .backends
        .iter()
        .flat_map(|b| chosen.parties.iter().map(move |p| (b.clone(), *p)));
    for (backend, party) in targets {
        // The plan checked `asked` against every chosen backend (`check_options`).
        let opts = backend
            .session_options(asked)
            .or_else(|_| backend.session_options(&SttOptions::default()))
            .unwrap_or_default();
        let ctx = Ctx {
            opts: Arc::new(opts),
            transcripts_via_bus,
            backend: backend.clone(),
            http: http.clone(),
            target: target.clone(),
            notifier: notifier.clone(),
            stats: Arc::new(ConsumerStats::new(ConsumerKind::Stt)),
            party,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parties_are_asked_by_name_and_fall_back_to_the_mix() {
        let ask = |list: &str, split| parties(Some(&list.to_owned()), split);
        assert_eq!(parties(None, 2), Ok(vec![None]));
        assert_eq!(
            ask("caller,agent,mix", 2),
            Ok(vec![Some(Party::Caller), Some(Party::Agent), None])
        );
        // A mono call's one voice is the mix, transcribed once.
        assert_eq!(ask("caller,agent", 0), Ok(vec![None]));
        assert_eq!(ask("agent,mix", 1), Ok(vec![None]));
        assert!(ask("callee", 2).unwrap_err().contains("callee"));
        assert!(ask(",", 2).is_err());
    }
}
