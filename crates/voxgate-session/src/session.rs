//! The per-connection state machine: `handle_input` in, `poll_output` out, `poll_timeout` for time.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use voxgate_media::{Decoder, DetectedFormat, Limits, MediaError, MediaEvent, SourceFormat};

use crate::protocol::{ClientControl, CloseSummary, Party, ServerEvent, UtteranceReason};
use crate::segmenter::{Segment, Segmenter, SegmenterConfig};
use crate::{seconds, SAMPLE_RATE};

mod close_code;
mod gap;
mod parties;

pub use close_code::CloseCode;

pub use parties::MAX_PARTIES;

/// Everything a session needs to know at start.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub session_id: String,
    pub source: SourceFormat,
    pub limits: Limits,
    pub segmenter: SegmenterConfig,
    /// Close when neither audio nor KeepAlive arrives for this long.
    pub idle_timeout: Duration,
    /// Close after this long whatever happens (`None`: no limit).
    pub max_duration: Option<Duration>,
    /// Whether any consumer takes audio; without one, no audio output is produced at all.
    pub wants_audio: bool,
    /// Media time between `Progress` events (0 = none). Default 1 s.
    pub progress_every_samples: u64,
    /// Acknowledge every audio message with an `Ack` event (for resumable clients).
    pub ack: bool,
    /// Continue a session that another instance drained: the client resends its stream from
    /// the start and the first `samples` decoded samples (already delivered) are discarded.
    pub continue_at: Option<ContinuePoint>,
    /// Synthesized audio (gap filling, concealment) a session may insert beyond the wall-clock
    /// time since it started, in 16 kHz samples. Default 2 s.
    pub gap_slack_samples: u64,
    /// Parties a raw stereo stream is split into (its channels in order: caller, agent), each
    /// with its own utterances and audio chunks besides the mix; 0 (the default) keeps only the
    /// mix. At most `MAX_PARTIES`.
    pub max_parties: u8,
}

/// Where a continued session picks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContinuePoint {
    pub samples: u64,
    pub utterances: u64,
    /// The client resends its stream from the start (discard `samples` decoded samples), as
    /// opposed to starting a fresh recorder whose audio is all new.
    pub resend_from_start: bool,
}

impl SessionConfig {
    pub fn new(session_id: impl Into<String>, source: SourceFormat) -> Self {
        Self {
            session_id: session_id.into(),
            source,
            limits: Limits::default(),
            segmenter: SegmenterConfig::default(),
            idle_timeout: Duration::from_secs(10),
            max_duration: None,
            wants_audio: false,
            progress_every_samples: u64::from(SAMPLE_RATE),
            ack: false,
            continue_at: None,
            gap_slack_samples: 2 * u64::from(SAMPLE_RATE),
            max_parties: 0,
        }
    }
}

/// One input to the session.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// A binary message: audio (may be empty).
    Audio { now: Instant, data: &'a [u8] },
    /// A text message: control.
    Text { now: Instant, text: &'a str },
    /// A control message a frontend already parsed (e.g. from its own wire protocol).
    Control {
        now: Instant,
        control: ClientControl,
    },
    /// Audio known to be missing (a gap in device sequence numbers or telephony timestamps):
    /// `samples` of 16 kHz silence keep media time continuous. Capped at `MAX_GAP_SAMPLES` per
    /// input and by the session's fill budget (see `Session::gap_budget`); the rest is dropped
    /// and counted in `SessionStats::gap_dropped_samples`.
    Silence { now: Instant, samples: u64 },
    /// The instant returned by `poll_timeout` has passed.
    Timeout { now: Instant },
    /// The client closed its socket or it broke: flush, then close.
    PeerClosed,
    /// The server is shutting down: flush, then close with 1001.
    Shutdown,
    /// The transport saw a violation (e.g. an oversized message): tell the client with an
    /// `Error` event carrying `error`, flush what was received, and close with `code`.
    Violation {
        code: CloseCode,
        error: &'a str,
        message: &'a str,
    },
}

/// Decoded audio for consumers: 16 kHz mono PCM16 starting at sample `start` of the session.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioChunk {
    pub start: u64,
    pub pcm: Arc<[i16]>,
    /// One party's channel of a two-party session; `None` for the mix (every other session).
    pub party: Option<Party>,
}

/// One output of the session. Drain with `poll_output` after every input.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send to the client (and subscribers).
    Event(ServerEvent),
    /// Offer to the audio consumers (only produced when `wants_audio`).
    Audio(AudioChunk),
    /// Everything received has been flushed; close with this code. The driver completes the
    /// summary with its consumers' counts and sends `Closed`. Always the last output.
    Close {
        code: CloseCode,
        reason: String,
        summary: CloseSummary,
    },
}

/// Misuse of the session by its driver (never caused by client input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("input after the session closed")]
    Closed,
    #[error("invalid session parameters: {0}")]
    Params(String),
}

/// Counters of one session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub bytes_in: u64,
    pub messages_in: u64,
    pub samples: u64,
    pub utterances: u64,
    pub limit_finalizations: u64,
    pub decode_errors: u64,
    pub resyncs: u64,
    pub control_errors: u64,
    /// Samples of silence inserted for known gaps.
    pub gap_samples: u64,
    /// Samples of gaps not filled: beyond `MAX_GAP_SAMPLES` or the session's fill budget.
    pub gap_dropped_samples: u64,
}

/// Longest gap filled at once (10 s at 16 kHz); longer gaps are filled only up to this.
pub const MAX_GAP_SAMPLES: u64 = 160_000;

/// The state machine of one connection.
pub struct Session {
    cfg: SessionConfig,
    decoder: Decoder,
    segmenter: Segmenter,
    pcm: Vec<i16>,
    segments: Vec<Segment>,
    outputs: VecDeque<Output>,
    stats: SessionStats,
    started_at: Option<Instant>,
    last_activity: Option<Instant>,
    next_progress: u64,
    format: Option<DetectedFormat>,
    closed: bool,
    /// Counters of decoders replaced by `restart_stream`.
    carried_decode_errors: u64,
    carried_resyncs: u64,
    /// Decoded samples still to discard (a continued session re-decoding delivered audio).
    skip_samples: u64,
    /// Gap fills are being cut by the budget (the client was warned once for this episode).
    gap_over_budget: bool,
    /// The per-party lanes of a two-party session.
    parties: Option<parties::Parties>,
}

impl Session {
    /// Builds a session. Bad raw-format parameters are refused here, before any audio.
    pub fn new(cfg: SessionConfig) -> Result<Self, SessionError> {
        let decoder = Decoder::new(cfg.source, cfg.limits.clone())
            .map_err(|e| SessionError::Params(e.to_string()))?;
        let (start, utterances) = cfg
            .continue_at
            .map_or((0, 0), |c| (c.samples, c.utterances));
        let mut session = Self {
            segmenter: Segmenter::starting_at(cfg.segmenter.clone(), start, utterances),
            skip_samples: cfg
                .continue_at
                .filter(|c| c.resend_from_start)
                .map_or(0, |c| c.samples),
            next_progress: start + cfg.progress_every_samples,
            cfg,
            decoder,
            // Sized once for a typical message (a second of audio, a handful of events), so a
            // steady stream does not allocate per message (tests/alloc.rs).
            pcm: Vec::with_capacity(SAMPLE_RATE as usize),
            segments: Vec::with_capacity(8),
            outputs: VecDeque::with_capacity(32),
            stats: SessionStats {
                samples: start,
                utterances,
                ..SessionStats::default()
            },
            started_at: None,
            last_activity: None,
            format: None,
            closed: false,
            carried_decode_errors: 0,
            carried_resyncs: 0,
            gap_over_budget: false,
            parties: None,
        };
        session.parties = parties::Parties::new(&session.cfg);
        session.drain_media_events();
        Ok(session)
    }

    pub fn id(&self) -> &str {
        &self.cfg.session_id
    }

    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    pub fn format(&self) -> Option<DetectedFormat> {
        self.format
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    pub fn is_speaking(&self) -> bool {
        self.segmenter.is_speaking()
    }

    /// Turns audio output on or off (a consumer that takes audio joined or left).
    pub fn set_wants_audio(&mut self, wants: bool) {
        self.cfg.wants_audio = wants;
    }

    /// Bytes of audio accepted so far (a resuming client continues from here).
    pub fn bytes_in(&self) -> u64 {
        self.stats.bytes_in
    }

    /// The client restarted its recorder (a new container header after a resume): decoding
    /// starts afresh while media time, utterances and counters continue. What the old demuxer
    /// held of an unfinished element is discarded (and reported as `stream_truncated`).
    pub fn restart_stream(&mut self) -> Result<(), SessionError> {
        let fresh = Decoder::new(self.cfg.source, self.cfg.limits.clone())
            .map_err(|e| SessionError::Params(e.to_string()))?;
        self.pcm.clear();
        let _ = self.decoder.finish(&mut self.pcm);
        self.drain_media_events();
        self.route_pcm();
        let old = std::mem::replace(&mut self.decoder, fresh);
        self.carried_decode_errors += old.stats().decode_errors;
        self.carried_resyncs += old.stats().resyncs;
        self.format = None;
        self.drain_media_events();
        Ok(())
    }

    /// The client's audio format changed (a protocol that sets it mid-connection, like OpenAI's
    /// `session.update`): decoding continues in `source`, media time and utterances go on.
    /// A two-party split ends here (its lanes were built for the old format).
    pub fn set_source(&mut self, source: SourceFormat) -> Result<(), SessionError> {
        let previous = std::mem::replace(&mut self.cfg.source, source);
        if let Err(e) = self.restart_stream() {
            self.cfg.source = previous;
            return Err(e);
        }
        if let Some(mut lanes) = self.parties.take() {
            lanes.finalize(UtteranceReason::Close, &mut self.outputs);
        }
        Ok(())
    }

    /// New segmenter thresholds from now on (an open utterance stays open).
    pub fn set_segmenter(&mut self, cfg: SegmenterConfig) {
        self.cfg.segmenter = cfg.clone();
        if let Some(lanes) = &mut self.parties {
            lanes.reconfigure(&cfg);
        }
        self.segmenter.reconfigure(cfg);
    }

    /// Unparsed bytes the decoder holds right now.
    pub fn pending_bytes(&self) -> usize {
        self.decoder.stats().pending_bytes
    }

    fn control(&mut self, control: ClientControl) {
        match control {
            ClientControl::KeepAlive => {}
            ClientControl::Finalize => {
                self.segmenter
                    .finalize(UtteranceReason::Finalize, &mut self.segments);
                self.route_segments();
                if let Some(lanes) = &mut self.parties {
                    lanes.finalize(UtteranceReason::Finalize, &mut self.outputs);
                }
            }
            ClientControl::CloseStream => {
                self.close(CloseCode::Normal, "CloseStream received".into());
            }
        }
    }

    /// Feeds one input. Call `poll_output` until it returns `None` before the next input.
    pub fn handle_input(&mut self, input: Input<'_>) -> Result<(), SessionError> {
        if self.closed {
            return Err(SessionError::Closed);
        }
        match input {
            Input::Audio { now, data } => {
                self.touch(now);
                self.stats.bytes_in += data.len() as u64;
                self.stats.messages_in += 1;
                self.pcm.clear();
                let result = self.decoder.push(data, &mut self.pcm);
                self.drain_media_events();
                self.route_pcm();
                if let Some(lanes) = &mut self.parties {
                    lanes.push(data, self.cfg.wants_audio, &mut self.outputs);
                }
                if let Err(e) = result {
                    self.fail(&e);
                } else if self.cfg.ack {
                    self.emit(ServerEvent::Ack {
                        bytes: self.stats.bytes_in,
                        samples: self.stats.samples,
                    });
                }
            }
            Input::Silence { now, samples } => self.fill_gap(now, samples),
            Input::Text { now, text } => {
                self.touch(now);
                match ClientControl::parse(text) {
                    Ok(control) => self.control(control),
                    Err(message) => {
                        self.stats.control_errors += 1;
                        self.emit(ServerEvent::error("bad_control_message", message));
                    }
                }
            }
            Input::Control { now, control } => {
                self.touch(now);
                self.control(control);
            }
            Input::Timeout { now } => {
                if let Some(deadline) = self.idle_deadline() {
                    if now >= deadline {
                        let secs = self.cfg.idle_timeout.as_secs_f64();
                        let msg = format!("idle timeout: no audio or KeepAlive for {secs} s");
                        self.emit(ServerEvent::error("idle_timeout", msg.clone()));
                        self.close(CloseCode::Policy, msg);
                        return Ok(());
                    }
                }
                if let Some(deadline) = self.duration_deadline() {
                    if now >= deadline {
                        let msg = "maximum session duration reached".to_owned();
                        self.emit(ServerEvent::error("max_duration", msg.clone()));
                        self.close(CloseCode::Policy, msg);
                    }
                }
            }
            Input::PeerClosed => self.close(CloseCode::Normal, "client closed".into()),
            Input::Shutdown => {
                self.emit(ServerEvent::Reconnect {
                    reason: "server draining; reconnect to continue".into(),
                });
                self.close(CloseCode::GoingAway, "server shutting down".into());
            }
            Input::Violation {
                code,
                error,
                message,
            } => {
                self.emit(ServerEvent::error(error, message));
                self.close(code, message.to_owned());
            }
        }
        Ok(())
    }

    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Earliest instant at which `Input::Timeout` must be fed; `None` if nothing is armed.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        match (self.idle_deadline(), self.duration_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Starts the clocks; the driver calls it once when the connection is accepted.
    pub fn start(&mut self, now: Instant) {
        self.started_at.get_or_insert(now);
        self.last_activity.get_or_insert(now);
    }

    fn touch(&mut self, now: Instant) {
        self.started_at.get_or_insert(now);
        self.last_activity = Some(now);
    }

    fn idle_deadline(&self) -> Option<Instant> {
        self.last_activity.map(|t| t + self.cfg.idle_timeout)
    }

    fn duration_deadline(&self) -> Option<Instant> {
        Some(self.started_at? + self.cfg.max_duration?)
    }

    fn emit(&mut self, event: ServerEvent) {
        self.outputs.push_back(Output::Event(event));
    }

    fn drain_media_events(&mut self) {
        while let Some(event) = self.decoder.poll_event() {
            match event {
                MediaEvent::FormatDetected(format) => {
                    self.format = Some(format);
                    let channels = channels_of(format);
                    self.emit(ServerEvent::Started {
                        session_id: self.cfg.session_id.clone(),
                        format: format.name().to_owned(),
                        channels,
                        sample_rate: SAMPLE_RATE,
                    });
                }
                MediaEvent::DecodeError { what } => {
                    self.stats.decode_errors += 1;
                    self.emit(ServerEvent::warning(
                        "decode_error",
                        format!("a frame could not be decoded and was skipped: {what}"),
                    ));
                }
                MediaEvent::Truncated { bytes } => {
                    self.emit(ServerEvent::warning(
                        "stream_truncated",
                        format!("the stream ended inside a container element; {bytes} trailing bytes discarded"),
                    ));
                }
                MediaEvent::Resynced { skipped_bytes } => {
                    self.stats.resyncs += 1;
                    self.emit(ServerEvent::warning(
                        "decode_resynced",
                        format!("lost sync; skipped {skipped_bytes} bytes and resumed at the next cluster/page"),
                    ));
                }
            }
        }
    }

    fn route_pcm(&mut self) {
        if self.skip_samples > 0 {
            let n = (self.skip_samples as usize).min(self.pcm.len());
            self.pcm.drain(..n);
            self.skip_samples -= n as u64;
        }
        if self.pcm.is_empty() {
            return;
        }
        let start = self.stats.samples;
        self.stats.samples += self.pcm.len() as u64;
        if self.cfg.wants_audio {
            self.outputs.push_back(Output::Audio(AudioChunk {
                start,
                pcm: Arc::from(self.pcm.as_slice()),
                party: None,
            }));
        }
        self.segmenter.push(&self.pcm, &mut self.segments);
        self.route_segments();
        if self.cfg.progress_every_samples > 0 && self.stats.samples >= self.next_progress {
            while self.next_progress <= self.stats.samples {
                self.next_progress += self.cfg.progress_every_samples;
            }
            self.emit(ServerEvent::Progress {
                seconds_decoded: seconds(self.stats.samples),
                speaking: self.segmenter.is_speaking(),
            });
        }
    }

    fn route_segments(&mut self) {
        // Taken and put back so its capacity is reused (no allocation per utterance).
        let mut segments = std::mem::take(&mut self.segments);
        for segment in segments.drain(..) {
            match segment {
                Segment::Started { utterance, start } => {
                    self.stats.utterances += 1;
                    self.emit(ServerEvent::SpeechStarted {
                        utterance,
                        timestamp: seconds(start),
                        party: None,
                    });
                }
                Segment::Ended {
                    utterance,
                    start,
                    end,
                    reason,
                } => {
                    if reason == UtteranceReason::Limit {
                        self.stats.limit_finalizations += 1;
                        let max = seconds(self.cfg.segmenter.max_utterance_samples);
                        self.emit(ServerEvent::warning(
                            "utterance_limit_reached",
                            format!("utterance {utterance} reached {max} s and was finalized; the stream continues"),
                        ));
                    }
                    self.emit(ServerEvent::UtteranceEnd {
                        utterance,
                        start: seconds(start),
                        end: seconds(end),
                        reason,
                        party: None,
                    });
                }
            }
        }
        self.segments = segments;
    }

    fn fail(&mut self, error: &MediaError) {
        let code = match error {
            MediaError::Unsupported(_) | MediaError::Malformed { .. } => CloseCode::Unsupported,
            MediaError::Limit(_) => CloseCode::TooBig,
            _ => CloseCode::Policy,
        };
        self.emit(ServerEvent::error(error.code(), error.to_string()));
        self.close_inner(code, error.to_string(), false);
    }

    fn close(&mut self, code: CloseCode, reason: String) {
        self.close_inner(code, reason, true);
    }

    fn close_inner(&mut self, code: CloseCode, reason: String, flush_decoder: bool) {
        if flush_decoder {
            self.pcm.clear();
            let result = self.decoder.finish(&mut self.pcm);
            self.drain_media_events();
            self.route_pcm();
            if let Err(e) = result {
                self.emit(ServerEvent::error(e.code(), e.to_string()));
            }
            if let Some(lanes) = &mut self.parties {
                lanes.flush(self.cfg.wants_audio, &mut self.outputs);
            }
        }
        self.segmenter
            .finalize(UtteranceReason::Close, &mut self.segments);
        self.route_segments();
        if let Some(lanes) = &mut self.parties {
            lanes.finalize(UtteranceReason::Close, &mut self.outputs);
        }
        let summary = self.summary();
        self.outputs.push_back(Output::Close {
            code,
            reason,
            summary,
        });
        self.closed = true;
    }

    /// The session's part of the `Closed` summary (consumers are added by the driver).
    pub fn summary(&self) -> CloseSummary {
        let media = self.decoder.stats();
        CloseSummary {
            bytes_in: self.stats.bytes_in,
            messages_in: self.stats.messages_in,
            seconds_decoded: seconds(self.stats.samples),
            samples_decoded: self.stats.samples,
            utterances: self.stats.utterances,
            decode_errors: media.decode_errors + self.carried_decode_errors,
            resyncs: media.resyncs + self.carried_resyncs,
            gap_samples: self.stats.gap_samples,
            gap_dropped_samples: self.stats.gap_dropped_samples,
            consumers: Vec::new(),
        }
    }
}

fn channels_of(format: DetectedFormat) -> u8 {
    match format {
        DetectedFormat::WebmOpus { channels } | DetectedFormat::OggOpus { channels } => channels,
        DetectedFormat::Opus { channels, .. }
        | DetectedFormat::Linear16 { channels, .. }
        | DetectedFormat::Float32 { channels, .. }
        | DetectedFormat::Linear8 { channels, .. }
        | DetectedFormat::Mulaw { channels, .. }
        | DetectedFormat::Alaw { channels, .. } => channels,
    }
}
