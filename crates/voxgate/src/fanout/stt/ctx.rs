//! What every speech-to-text consumer of a session shares with its task, and the sample
//! arithmetic of session events.

use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, histogram};
use tokio::time::Instant;
use tracing::warn;
use voxgate_session::{Party, ServerEvent, SAMPLE_RATE};

use super::backend::Backend;
use crate::config::SessionStt;
use crate::fanout::contract::Target;
use crate::fanout::queue::ConsumerStats;
use crate::fanout::{DropReason, Notifier};
use crate::metrics::{STT_LATENCY, STT_LOST};

/// How long a worker waits for room in the session's notice queue before giving up an event.
const NOTIFY_WAIT: Duration = Duration::from_secs(2);

/// The session sample at `seconds` of media time (session events carry seconds).
pub(crate) fn sample_at(seconds: f64) -> u64 {
    (seconds * f64::from(SAMPLE_RATE)).round() as u64
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
    /// The language, model and hints this session uses with this backend.
    pub opts: Arc<SessionStt>,
    /// The party this consumer transcribes in a two-party session (`None`: the mix).
    pub party: Option<Party>,
}

impl Ctx {
    pub fn name(&self) -> &str {
        &self.backend.cfg.name
    }

    /// Sends an event to the session from a task (waits briefly for room, never forever).
    pub async fn notify(&self, event: ServerEvent) {
        if !self.notifier.send_within(event, NOTIFY_WAIT).await {
            warn!(stt = %self.name(), "transcript event not delivered to the session");
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
            party: self.party,
        }
    }

    /// Tells the client that this backend is dropping audio (`stt_dropping`); called once per
    /// drop episode. A full notice queue loses the warning: the drops themselves are counted.
    pub fn warn_dropping(&self, reason: DropReason) {
        self.notifier.offer(ServerEvent::warning(
            "stt_dropping",
            format!(
                "speech-to-text backend {:?} is not keeping up ({reason}); audio is being dropped",
                self.name()
            ),
        ));
    }

    /// `report_lost` from a synchronous path (the ingest side of a consumer): the warning is
    /// offered to the bounded notice queue (a full queue loses the warning; the loss itself is
    /// counted and logged).
    pub fn report_lost_now(&self, utterances: &[u64], why: &str) {
        counter!(STT_LOST, "backend" => self.name().to_owned()).increment(utterances.len() as u64);
        warn!(stt = %self.name(), session = %self.target.session_id, ?utterances, why, "speech-to-text results lost");
        self.notifier.offer(ServerEvent::warning(
            "stt_lost",
            super::lost::lost_message(self.name(), utterances, why),
        ));
    }

    /// The close flush ended before the backend finished: the utterances its worker still held
    /// (their audio counted as dropped, `close_timeout`, by bytes; the queue keeps no ids) are
    /// logged and told to the client in one `stt_lost` warning.
    pub fn report_unfinished(&self, held_bytes: u64) {
        let why = format!(
            "the close flush ended before the backend answered; {held_bytes} bytes of queued utterance audio were not transcribed"
        );
        warn!(stt = %self.name(), session = %self.target.session_id, held_bytes, "speech-to-text flush timed out; utterances lost");
        self.notifier.offer(ServerEvent::warning(
            "stt_lost",
            super::lost::lost_message(self.name(), &[], &why),
        ));
    }

    /// Utterances of this session that got no final result: counted, logged and told to the
    /// client (`stt_lost`) in one warning.
    pub async fn report_lost(&self, utterances: &[u64], why: &str) {
        if utterances.is_empty() {
            return;
        }
        counter!(STT_LOST, "backend" => self.name().to_owned()).increment(utterances.len() as u64);
        warn!(stt = %self.name(), session = %self.target.session_id, ?utterances, why, "speech-to-text results lost");
        self.notify(ServerEvent::warning(
            "stt_lost",
            super::lost::lost_message(self.name(), utterances, why),
        ))
        .await;
    }

    pub fn observe_latency(&self, since: Instant) {
        histogram!(STT_LATENCY, "backend" => self.name().to_owned())
            .record(since.elapsed().as_secs_f64());
    }
}
