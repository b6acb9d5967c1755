//! Session events in Deepgram's live-API shapes (`Results`, `SpeechStarted`, `UtteranceEnd`,
//! `Metadata`, `Error`), for clients written against Deepgram. voxgate-only events (progress,
//! acknowledgements, resume, warnings) have no Deepgram counterpart and are not sent.
//!
//! A per-utterance backend answers after the utterance ended, so whether a final is
//! `speech_final` (the segmenter heard the speaker stop) or `from_finalize` (the client asked)
//! is known from the `UtteranceEnd` that came before it; the renderer remembers the last few.

use std::collections::VecDeque;
use std::time::SystemTime;

use serde_json::{json, Value};
use voxgate_session::{CloseSummary, ServerEvent, UtteranceReason};

/// Utterance endings remembered for the finals that follow them. A backend answers in order and
/// within its timeout, so a handful is plenty; older ones are forgotten (their late finals are
/// then sent without `speech_final`).
const REMEMBERED_ENDINGS: usize = 16;

/// What the client asked for in its connect query.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Deepgram's `request_id`: also the `dg-request-id` response header.
    pub request_id: String,
    /// The `model` the client asked for, echoed in `model_info.name`.
    pub model: String,
    /// The backend whose transcripts the client gets (a session may have others for its
    /// webhooks). `None`: no backend serves the session, so every utterance is answered with an
    /// empty final at its end (turn detection only).
    pub backend: Option<String>,
    /// `vad_events=true`: send `SpeechStarted`.
    pub vad_events: bool,
    /// `utterance_end_ms` given: send `UtteranceEnd` after each utterance's last final.
    pub utterance_end: bool,
    /// `interim_results=true`: pass non-final transcripts through.
    pub interim_results: bool,
}

/// How one utterance ended.
#[derive(Debug, Clone, Copy)]
struct Ending {
    utterance: u64,
    reason: UtteranceReason,
    start: f64,
    end: f64,
    /// A final was sent for it.
    answered: bool,
    /// A `Finalize` came after it ended and before its final: the final answers it.
    finalize_asked: bool,
}

impl Ending {
    /// Its final is the answer to a `Finalize`.
    fn answers_finalize(&self) -> bool {
        self.reason == UtteranceReason::Finalize || self.finalize_asked
    }
}

/// Renders one session's events for a Deepgram client.
#[derive(Debug)]
pub struct Renderer {
    opts: Options,
    endings: VecDeque<Ending>,
    /// Whether the segmenter is inside an utterance (a `Finalize` then ends it; otherwise the
    /// frontend answers with an empty final at once).
    speaking: bool,
    /// Media seconds decoded so far (where an empty `Finalize` answer is placed).
    media_seconds: f64,
}

impl Renderer {
    pub fn new(opts: Options) -> Self {
        Self {
            opts,
            endings: VecDeque::with_capacity(REMEMBERED_ENDINGS),
            speaking: false,
            media_seconds: 0.0,
        }
    }

    pub fn request_id(&self) -> &str {
        &self.opts.request_id
    }

    /// Whether an utterance is open (a `Finalize` will end it and its final will answer).
    pub fn speaking(&self) -> bool {
        self.speaking
    }

    /// The messages `event` becomes, in order (none for voxgate-only events).
    pub fn render(&mut self, event: &ServerEvent) -> Vec<String> {
        match event {
            ServerEvent::SpeechStarted { timestamp, .. } => {
                self.speaking = true;
                self.opts
                    .vad_events
                    .then(|| speech_started(*timestamp))
                    .into_iter()
                    .collect()
            }
            ServerEvent::UtteranceEnd {
                utterance,
                start,
                end,
                reason,
                ..
            } => {
                self.speaking = false;
                self.media_seconds = self.media_seconds.max(*end);
                let ending = Ending {
                    utterance: *utterance,
                    reason: *reason,
                    start: *start,
                    end: *end,
                    answered: false,
                    finalize_asked: false,
                };
                if self.opts.backend.is_none() {
                    return self.answer_empty(ending);
                }
                self.remember(ending);
                Vec::new()
            }
            ServerEvent::Transcript {
                utterance,
                text,
                is_final,
                start,
                end,
                backend,
                ..
            } if self.opts.backend.as_deref() == Some(backend) => {
                self.transcript(*utterance, text, *is_final, *start, *end)
            }
            ServerEvent::Progress {
                seconds_decoded, ..
            } => {
                self.media_seconds = *seconds_decoded;
                Vec::new()
            }
            // The backend gave up on some utterances: each gets an empty final, so a client
            // waiting for it is released (the loss is counted and logged).
            ServerEvent::Warning { code, message } if code == "stt_lost" => {
                self.release(&crate::fanout::stt::lost::lost_utterances(message))
            }
            ServerEvent::Closed { summary, .. } => vec![self.metadata(summary).to_string()],
            ServerEvent::Error { code, message } => vec![error(code, message).to_string()],
            _ => Vec::new(),
        }
    }

    /// An empty final for an utterance no transcript will come for.
    fn answer_empty(&self, e: Ending) -> Vec<String> {
        let mut out = vec![self
            .results(&ResultsFields {
                text: "",
                start: e.start,
                end: e.end,
                is_final: true,
                speech_final: matches!(e.reason, UtteranceReason::Silence | UtteranceReason::Close),
                from_finalize: e.answers_finalize(),
            })
            .to_string()];
        if self.opts.utterance_end {
            out.push(utterance_end(e.end).to_string());
        }
        out
    }

    fn release(&mut self, lost: &[u64]) -> Vec<String> {
        let mut out = Vec::new();
        let waiting: Vec<Ending> = self
            .endings
            .iter_mut()
            .filter(|e| !e.answered && lost.contains(&e.utterance))
            .map(|e| {
                e.answered = true;
                *e
            })
            .collect();
        for e in waiting {
            out.extend(self.answer_empty(e));
        }
        out
    }

    /// The answer to a `Finalize` when no utterance is open. Deepgram answers a `Finalize`
    /// after the results already due, so when the last utterance ended but its final has not
    /// come yet (a per-utterance backend answers after the end), that final is the answer
    /// (`from_finalize`, sent when it comes: `None` now); otherwise an empty final now, so that
    /// clients waiting for `from_finalize` are released.
    pub fn finalize_idle(&mut self) -> Option<String> {
        match self.endings.back_mut() {
            Some(last) if !last.answered => {
                last.finalize_asked = true;
                None
            }
            _ => Some(self.empty_finalize()),
        }
    }

    /// An empty `from_finalize` final at the media time reached.
    pub fn empty_finalize(&self) -> String {
        let at = self.media_seconds;
        self.results(&ResultsFields {
            text: "",
            start: at,
            end: at,
            is_final: true,
            speech_final: false,
            from_finalize: true,
        })
        .to_string()
    }

    fn remember(&mut self, ending: Ending) {
        if self.endings.len() == REMEMBERED_ENDINGS {
            self.endings.pop_front();
        }
        self.endings.push_back(ending);
    }

    fn transcript(
        &mut self,
        utt: u64,
        text: &str,
        is_final: bool,
        start: f64,
        end: f64,
    ) -> Vec<String> {
        if !is_final && !self.opts.interim_results {
            return Vec::new();
        }
        // The first final of an ending carries its flags; a late one after an empty release
        // is sent as a plain final.
        let ending = is_final
            .then(|| {
                let e = self
                    .endings
                    .iter_mut()
                    .find(|e| e.utterance == utt && !e.answered)?;
                e.answered = true;
                Some(*e)
            })
            .flatten();
        let reason = ending.map(|e| e.reason);
        let from_finalize = ending.is_some_and(|e| e.answers_finalize());
        let mut out = vec![self
            .results(&ResultsFields {
                text,
                start,
                end,
                is_final,
                speech_final: matches!(
                    reason,
                    Some(UtteranceReason::Silence | UtteranceReason::Close)
                ),
                from_finalize,
            })
            .to_string()];
        if let (Some(e), true) = (ending, self.opts.utterance_end) {
            out.push(utterance_end(e.end.max(end)).to_string());
        }
        out
    }

    fn results(&self, f: &ResultsFields<'_>) -> Value {
        json!({
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round3((f.end - f.start).max(0.0)),
            "start": round3(f.start),
            "is_final": f.is_final,
            "speech_final": f.speech_final,
            "from_finalize": f.from_finalize,
            "channel": {"alternatives": [{
                "transcript": f.text.trim(),
                // Backends behind voxgate give no confidence; 1.0 for text, 0.0 for silence.
                "confidence": if f.text.trim().is_empty() { 0.0 } else { 1.0 },
                // Word timings are not known (per-utterance backends give utterance bounds).
                "words": [],
            }]},
            "metadata": {
                "request_id": self.opts.request_id,
                "model_info": {"name": self.opts.model, "version": env!("CARGO_PKG_VERSION"), "arch": "voxgate"},
                "model_uuid": self.opts.request_id,
            },
        })
    }

    fn metadata(&self, summary: &CloseSummary) -> Value {
        json!({
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.opts.request_id,
            "sha256": "",
            "created": rfc3339(SystemTime::now()),
            "duration": round3(summary.seconds_decoded),
            "channels": 1,
            "models": [self.opts.request_id],
            "model_info": {self.opts.request_id.clone(): {
                "name": self.opts.model, "version": env!("CARGO_PKG_VERSION"), "arch": "voxgate",
            }},
        })
    }
}

struct ResultsFields<'a> {
    text: &'a str,
    start: f64,
    end: f64,
    is_final: bool,
    speech_final: bool,
    from_finalize: bool,
}

fn speech_started(timestamp: f64) -> String {
    json!({"type": "SpeechStarted", "channel": [0, 1], "timestamp": round3(timestamp)}).to_string()
}

fn utterance_end(last_word_end: f64) -> Value {
    json!({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": round3(last_word_end)})
}

fn error(code: &str, message: &str) -> Value {
    json!({"type": "Error", "variant": code, "description": message, "message": message})
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `2026-12-02T07:15:02.123456789Z` (UTC).
fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn renderer(utterance_end: bool) -> Renderer {
        Renderer::new(Options {
            request_id: "r-1".into(),
            model: "nova-3".into(),
            backend: Some("b".into()),
            vad_events: true,
            utterance_end,
            interim_results: false,
        })
    }

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    fn transcript(utterance: u64, text: &str, is_final: bool) -> ServerEvent {
        ServerEvent::Transcript {
            utterance,
            text: text.into(),
            is_final,
            backend: "b".into(),
            start: 1.0,
            end: 2.5,
            party: None,
        }
    }

    fn ended(utterance: u64, reason: UtteranceReason) -> ServerEvent {
        ServerEvent::UtteranceEnd {
            utterance,
            start: 1.0,
            end: 2.6,
            reason,
            party: None,
        }
    }

    #[test]
    fn a_final_after_a_silence_ending_is_speech_final_and_followed_by_utterance_end() {
        let mut r = renderer(true);
        assert!(
            r.render(&ServerEvent::SpeechStarted {
                utterance: 0,
                timestamp: 1.0,
                party: None,
            })
            .len()
                == 1
        );
        assert!(r.speaking());
        assert!(r.render(&ended(0, UtteranceReason::Silence)).is_empty());
        let out = r.render(&transcript(0, " hello there ", true));
        assert_eq!(out.len(), 2);
        let v = parse(&out[0]);
        assert_eq!(v["type"], "Results");
        assert_eq!(v["is_final"], true);
        assert_eq!(v["speech_final"], true);
        assert_eq!(v["from_finalize"], false);
        assert_eq!(v["start"], 1.0);
        assert_eq!(v["duration"], 1.5);
        assert_eq!(v["channel"]["alternatives"][0]["transcript"], "hello there");
        assert!(v["channel"]["alternatives"][0]["words"].is_array());
        assert_eq!(v["metadata"]["request_id"], "r-1");
        assert_eq!(v["metadata"]["model_info"]["name"], "nova-3");
        let u = parse(&out[1]);
        assert_eq!(u["type"], "UtteranceEnd");
        assert_eq!(u["last_word_end"], 2.6);
    }

    #[test]
    fn finalize_and_limit_endings_are_final_without_speech_final() {
        let mut r = renderer(false);
        r.render(&ended(0, UtteranceReason::Finalize));
        r.render(&ended(1, UtteranceReason::Limit));
        let f = parse(&r.render(&transcript(0, "a", true))[0]);
        assert_eq!(
            (f["speech_final"].as_bool(), f["from_finalize"].as_bool()),
            (Some(false), Some(true))
        );
        let l = parse(&r.render(&transcript(1, "b", true))[0]);
        assert_eq!(
            (l["speech_final"].as_bool(), l["from_finalize"].as_bool()),
            (Some(false), Some(false))
        );
    }

    #[test]
    fn interims_pass_only_when_asked_and_voxgate_events_not_at_all() {
        let mut r = renderer(false);
        assert!(r.render(&transcript(0, "a", false)).is_empty());
        r.opts.interim_results = true;
        assert_eq!(
            parse(&r.render(&transcript(0, "a", false))[0])["is_final"],
            false
        );
        let quiet = [
            ServerEvent::Progress {
                seconds_decoded: 1.0,
                speaking: true,
            },
            ServerEvent::warning("x", "y"),
            ServerEvent::Persisted { samples: 1 },
        ];
        assert!(quiet.iter().all(|e| r.render(e).is_empty()));
    }

    #[test]
    fn an_empty_finalize_answer_releases_waiting_clients() {
        let v = parse(&renderer(false).empty_finalize());
        assert_eq!(v["is_final"], true);
        assert_eq!(v["from_finalize"], true);
        assert_eq!(v["channel"]["alternatives"][0]["transcript"], "");
    }

    #[test]
    fn a_finalize_after_the_end_is_answered_by_the_final_still_due() {
        let mut r = renderer(false);
        r.render(&ended(0, UtteranceReason::Silence));
        assert_eq!(r.finalize_idle(), None, "the pending final answers it");
        let v = parse(&r.render(&transcript(0, "hello", true))[0]);
        assert_eq!(
            (v["speech_final"].as_bool(), v["from_finalize"].as_bool()),
            (Some(true), Some(true))
        );
        // Nothing due any more: answered at once, empty.
        let now = parse(&r.finalize_idle().expect("an empty answer"));
        assert_eq!(now["from_finalize"], true);
        assert_eq!(now["channel"]["alternatives"][0]["transcript"], "");
    }

    #[test]
    fn a_finalize_waiting_on_a_lost_final_is_released_by_its_empty_final() {
        let mut r = renderer(false);
        r.render(&ended(0, UtteranceReason::Silence));
        assert_eq!(r.finalize_idle(), None);
        let lost = crate::fanout::stt::lost::lost_message("b", &[0], "x");
        let out = r.render(&ServerEvent::warning("stt_lost", lost));
        assert_eq!(out.len(), 1);
        assert_eq!(parse(&out[0])["from_finalize"], true);
    }

    #[test]
    fn endings_are_bounded() {
        let mut r = renderer(false);
        for u in 0..100 {
            r.render(&ended(u, UtteranceReason::Silence));
        }
        assert_eq!(r.endings.len(), REMEMBERED_ENDINGS);
    }

    #[test]
    fn created_is_rfc3339_utc() {
        let t = std::time::UNIX_EPOCH + Duration::from_millis(1_796_195_702_123);
        assert_eq!(rfc3339(t), "2026-12-02T07:15:02.123Z");
    }

    #[test]
    fn other_backends_are_not_shown_and_without_a_backend_endings_answer_themselves() {
        let mut r = renderer(false);
        let other = ServerEvent::Transcript {
            utterance: 0,
            text: "x".into(),
            is_final: true,
            backend: "webhook-only".into(),
            start: 0.0,
            end: 1.0,
            party: None,
        };
        assert!(r.render(&other).is_empty());
        r.opts.backend = None;
        let v = parse(&r.render(&ended(0, UtteranceReason::Finalize))[0]);
        assert_eq!(
            (v["is_final"].as_bool(), v["from_finalize"].as_bool()),
            (Some(true), Some(true))
        );
    }

    #[test]
    fn a_lost_utterance_is_answered_empty_once() {
        let mut r = renderer(false);
        r.render(&ended(0, UtteranceReason::Finalize));
        r.render(&ended(1, UtteranceReason::Silence));
        let lost = |u: &[u64]| crate::fanout::stt::lost::lost_message("b", u, "x");
        let out = r.render(&ServerEvent::warning("stt_lost", lost(&[0])));
        assert_eq!(out.len(), 1, "only utterance 0 was lost");
        assert_eq!(parse(&out[0])["from_finalize"], true);
        assert!(r
            .render(&ServerEvent::warning("stt_lost", lost(&[0])))
            .is_empty());
        let late = parse(&r.render(&transcript(0, "late", true))[0]);
        assert_eq!(
            late["from_finalize"], false,
            "a late final is a plain final"
        );
    }
}
