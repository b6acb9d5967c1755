//! One Omi `audio_timeline=2` session's timeline: at its first audio frame it is taken from
//! the ledger (`omi_timelines::ledger`) under (owner, uid, conversation), so a reconnect continues the
//! timeline the previous socket left (replays checked against it) and the recording it wrote
//! (the recorder is told where via the session's `Continuation`). Without a ledger (unit
//! tests, fuzzing) or with a full one, the timeline is private to the socket.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use metrics::counter;
use tracing::{info, warn};
use voxgate_session::SAMPLE_RATE;

use crate::fanout::recorder::{Continuation, ContinueAt};
use crate::metrics::{OMI_SUPERSEDED_FRAMES, OMI_TIMELINES};
use crate::omi_timelines::ledger::{Hold, Ledger, Outcome};
use crate::omi_timelines::timeline::{Placed, Timeline};

/// Whose session this is (owner, session id, uid), from `Frontend::on_session`.
type Who = (String, String, String);

enum Placement {
    /// Before the first audio frame.
    Pending,
    Private(Timeline),
    Held(Hold),
}

/// The timeline of one `audio_timeline=2` socket.
pub struct V2 {
    rate: u32,
    window_bytes: usize,
    ledger: Option<Arc<Ledger>>,
    who: Option<Who>,
    place: Placement,
    /// The recording's 16 kHz sample this session's sample 0 is.
    base: u64,
    /// Samples this session passed on: audio at the client's rate, filled gaps at 16 kHz.
    audio: u64,
    silence: u64,
    pub continuation: Continuation,
    /// Where this session's audio lands, told at its first placed frame.
    pending: Option<ContinueAt>,
}

impl V2 {
    pub fn new(rate: u32, window_bytes: usize, ledger: Option<Arc<Ledger>>) -> Self {
        Self {
            rate,
            window_bytes,
            ledger,
            who: None,
            place: Placement::Pending,
            base: 0,
            audio: 0,
            silence: 0,
            continuation: Continuation::default(),
            pending: None,
        }
    }

    pub fn on_session(&mut self, owner: &str, session_id: &str, uid: &str) {
        self.who = Some((owner.into(), session_id.into(), uid.into()));
    }

    /// Places a frame whose first sample was captured at `ts`; `None` when a newer socket of
    /// the same user and conversation took the timeline (the frame is ignored, counted).
    pub fn place(&mut self, conversation: Option<&str>, ts: f64, pcm: Bytes) -> Option<Placed> {
        if matches!(self.place, Placement::Pending) {
            self.place = self.checkout(conversation.unwrap_or_default());
        }
        let placed = match &mut self.place {
            Placement::Private(t) => Some((t.place(ts, pcm), t.origin())),
            Placement::Held(hold) => {
                hold.with(|s| (s.timeline.place(ts, pcm), s.timeline.origin()))
            }
            Placement::Pending => unreachable!("checked out above"),
        };
        let placed = placed.map(|(placed, origin)| {
            if let Some(mut at) = self.pending.take() {
                // Before the frame's audio reaches the session, so before its recorder. The
                // timeline's sample 0 is the recording's (a reconnect continues both).
                at.origin_unix = origin;
                let _ = self.continuation.set(at);
            }
            placed
        });
        if placed.is_none() {
            counter!(OMI_SUPERSEDED_FRAMES).increment(1);
        }
        placed
    }

    /// `audio` samples (at the client's rate) and `silence` 16 kHz samples were passed on to
    /// the session; the recording now ends that much further.
    pub fn passed_on(&mut self, audio: u64, silence: u64) {
        self.audio += audio;
        self.silence += silence;
        if let Placement::Held(hold) = &self.place {
            // Converted in total, so rates that do not divide 16 kHz do not drift per frame.
            let audio = self.audio * u64::from(SAMPLE_RATE) / u64::from(self.rate);
            let end = self.base + audio + self.silence;
            hold.with(|s| s.record_end = end);
        }
    }

    /// The timeline under this session's key, or a private one.
    fn checkout(&mut self, conversation: &str) -> Placement {
        let fresh = || Timeline::new(self.rate, self.window_bytes);
        let (Some(ledger), Some((owner, session_id, uid))) = (&self.ledger, &self.who) else {
            self.pending = Some(ContinueAt {
                recording_id: self.who.as_ref().map(|w| w.1.clone()).unwrap_or_default(),
                start_sample: 0,
                origin_unix: None,
            });
            return Placement::Private(fresh());
        };
        let key = (owner.clone(), uid.clone(), conversation.to_owned());
        let (hold, outcome) = ledger.checkout(key, session_id, fresh, Instant::now());
        counter!(OMI_TIMELINES, "outcome" => outcome.as_str()).increment(1);
        let Some(hold) = hold else {
            warn!(%uid, "omi reconnect ledger full (omi.reconnect_timelines_max); this socket's timeline is private");
            self.pending = Some(ContinueAt {
                recording_id: session_id.clone(),
                start_sample: 0,
                origin_unix: None,
            });
            return Placement::Private(fresh());
        };
        let Some(at) = hold.with(|s| ContinueAt {
            recording_id: s.recording_id.clone(),
            start_sample: s.record_end,
            origin_unix: None,
        }) else {
            // Taken over by a yet newer socket between the checkout and now.
            return Placement::Held(hold);
        };
        if outcome != Outcome::Fresh {
            info!(%uid, conversation, outcome = outcome.as_str(), recording = %at.recording_id,
                at = at.start_sample, "omi timeline continued after a reconnect");
        }
        self.base = at.start_sample;
        self.pending = Some(at);
        Placement::Held(hold)
    }
}
