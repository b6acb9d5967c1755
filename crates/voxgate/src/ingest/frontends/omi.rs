//! `/v1/trigger/listen`: a drop-in for Omi's pusher. The transcription service sends binary
//! opcode frames (100 heartbeat, 101 audio, 102 transcript, 103 conversation id, 104 finalize,
//! 105 speaker sample); audio flows through the same sessions, consumers and metrics as any
//! other, and only the consumers a user has are built: its audio apps (audio webhooks), its
//! transcript webhook and its conversation webhook (or an automatic `104` answer).

use std::sync::Arc;

use axum::extract::ws::Message;
use bytes::Bytes;
use voxgate_session::{ClientControl, CloseCode, ServerEvent, MAX_GAP_SAMPLES, SAMPLE_RATE};

use super::omi_consumers::{consumers, durable_job_required, OmiTargets};
use super::omi_v2::V2;
use super::{Accept, Action, Frontend};
use crate::config::{Config, WebhookConfig};
use crate::fanout::registry::BuildCtx;
use crate::fanout::Consumer;
use crate::ingest::hook::HookAnswer;
use crate::ingest::refusal::{Refusal, RefuseReason};
use crate::ingest::request::ConnectRequest;
use crate::metrics::OMI_REPLAYS;
use crate::omi_timelines::ledger::Ledger;
use crate::omi_timelines::timeline::{Placed, Replay};
use metrics::counter;

/// The `audio_timeline` versions this pusher speaks.
const TIMELINE_VERSION: u32 = 2;

/// Checks `uid`, `sample_rate` (8000..=48000, default 8000: the audio is PCM16 mono) and
/// `audio_timeline` (absent: legacy; `2`; anything else is refused with 1008). While draining
/// the socket is accepted, then closed with 1001, as Omi's listen side expects. With `ledger`,
/// an `audio_timeline=2` socket continues the timeline a previous socket of the same user and
/// conversation left.
pub fn accept(
    cfg: &Config,
    draining: bool,
    ledger: Option<&Arc<Ledger>>,
    mut req: ConnectRequest,
) -> Accept {
    if draining {
        let why = "server is draining; reconnect to another instance";
        return Accept::Refuse(req, Refusal::new(RefuseReason::Draining, why));
    }
    let timeline = match req.raw_query.get("audio_timeline").map(String::as_str) {
        None => None,
        Some(v) if v.parse() == Ok(TIMELINE_VERSION) => Some(TIMELINE_VERSION),
        Some(v) => {
            let why = format!("audio_timeline={v:?} is not supported; this pusher speaks 2");
            return Accept::Refuse(req, Refusal::new(RefuseReason::InvalidParameters, why));
        }
    };
    let rate = match req.raw_query.get("sample_rate").map(|r| r.parse::<u32>()) {
        None => Ok(8000),
        Some(Ok(r)) if (8000..=48_000).contains(&r) => Ok(r),
        Some(_) => Err(Refusal::new(
            RefuseReason::InvalidSampleRate,
            "sample_rate must be 8000..=48000",
        )),
    };
    let uid_ok = req.uid.as_ref().is_some_and(|u| !u.is_empty());
    match (rate, uid_ok) {
        (Ok(rate), true) => {
            req.set_source("linear16", rate);
            let mut omi = Omi::new(rate, cfg.omi.max_json_bytes);
            if timeline.is_some() {
                let window = cfg.omi.replay_window_bytes(rate);
                omi.timeline = Some(V2::new(rate, window, ledger.cloned()));
            }
            Accept::Session(req, Box::new(omi))
        }
        (Err(e), _) => Accept::Refuse(req, e),
        (_, false) => Accept::Refuse(
            req,
            Refusal::new(RefuseReason::MissingUid, "uid is required"),
        ),
    }
}

/// An audio app: an audio webhook named `audio_app_<i>` with `omi.audio_app_delay_seconds`.
fn audio_apps(urls: &[String], cfg: &Config) -> Vec<Arc<WebhookConfig>> {
    urls.iter()
        .enumerate()
        .map(|(i, url)| {
            Arc::new(WebhookConfig::new(
                &format!("audio_app_{i}"),
                url,
                Some(cfg.omi.audio_app_delay_seconds),
            ))
        })
        .collect()
}

/// Omi's pusher protocol on `/v1/trigger/listen`: binary frames of a little-endian u32 opcode and
/// a payload. Malformed frames and unknown opcodes close the session with 1003 and a reason.
pub struct Omi {
    rate: u32,
    /// Largest `102`/`104`/`105` JSON payload (`omi.max_json_bytes`).
    max_json: usize,
    /// `None` until the plan is made: then the hook's answer or the config's.
    targets: Option<OmiTargets>,
    conversation_id: Option<String>,
    /// Capture time of the first audio frame and samples received since (at `rate`).
    first_ts: Option<f64>,
    samples_in: u64,
    /// With `audio_timeline=2`: where each frame goes, and the replay rules.
    timeline: Option<V2>,
}

/// A late capture timestamp beyond this many seconds counts as a gap (filled, counted).
const OMI_GAP_TOLERANCE: f64 = 0.5;

impl Omi {
    pub fn new(rate: u32, max_json: usize) -> Self {
        Self {
            rate,
            max_json,
            targets: None,
            conversation_id: None,
            first_ts: None,
            samples_in: 0,
            timeline: None,
        }
    }

    fn malformed(message: String) -> Action {
        Action::Violation {
            code: CloseCode::Unsupported,
            error: "malformed_frame",
            message,
        }
    }

    /// A JSON opcode: refused with 1009 over `omi.max_json_bytes` (before any parsing), 1003
    /// when it is not JSON. The parsed tree lives only while the event is dispatched; webhooks
    /// queue it serialized.
    fn json(&self, op: u32, event: &str, payload: &[u8]) -> Action {
        if payload.len() > self.max_json {
            return Action::Violation {
                code: CloseCode::TooBig,
                error: "json_too_large",
                message: format!(
                    "opcode {op}: {} bytes of JSON; the limit is {} (omi.max_json_bytes)",
                    payload.len(),
                    self.max_json
                ),
            };
        }
        match serde_json::from_slice(payload) {
            Ok(v) => self.conversation(event, v),
            Err(e) => Self::malformed(format!("opcode {op}: payload is not JSON: {e}")),
        }
    }

    fn conversation(&self, event: &str, data: serde_json::Value) -> Action {
        if event == "finalize" {
            if let Some(answer) = durable_job_required(&self.conversation_id, &data) {
                return Action::Notice(answer);
            }
        }
        Action::Notice(ServerEvent::Conversation {
            event: event.to_owned(),
            conversation_id: self.conversation_id.clone(),
            data,
        })
    }
}

impl Omi {
    /// Opcode 101: an 8-byte capture time, then PCM16; a late capture time is a gap.
    fn on_audio(&mut self, payload: &Bytes, out: &mut Vec<Action>) {
        if payload.len() < 8 {
            out.push(Self::malformed(
                "opcode 101: audio frame shorter than its 8-byte timestamp".into(),
            ));
            return;
        }
        let ts = f64::from_le_bytes(payload[..8].try_into().expect("8 bytes checked"));
        let pcm = payload.slice(8..);
        if !pcm.len().is_multiple_of(2) {
            out.push(Self::malformed(format!(
                "opcode 101: PCM16 payload of odd length {}",
                pcm.len()
            )));
            return;
        }
        if let Some(timeline) = self.timeline.as_mut() {
            if !ts.is_finite() {
                out.push(Self::malformed(
                    "opcode 101: audio_timeline=2 needs a finite capture time".into(),
                ));
                return;
            }
            let conversation = self.conversation_id.as_deref();
            if let Some(placed) = timeline.place(conversation, ts, pcm) {
                self.on_placed(ts, placed, out);
            }
            return;
        }
        match self.first_ts {
            None if ts.is_finite() => self.first_ts = Some(ts),
            Some(first) if ts.is_finite() => self.on_capture_time(first, ts, out),
            _ => {}
        }
        self.samples_in = self.samples_in.saturating_add(pcm.len() as u64 / 2);
        out.push(Action::Audio(pcm));
    }
}

impl Omi {
    /// A capture time later than the audio received is a gap: up to `MAX_GAP_SAMPLES` it is
    /// filled (within the session's budget); a longer jump is followed but not filled. Capture
    /// times are untrusted floats: casts saturate and counters saturate.
    fn on_capture_time(&mut self, first: f64, ts: f64, out: &mut Vec<Action>) {
        let rate = f64::from(self.rate);
        let gap = ts - (first + self.samples_in as f64 / rate);
        if gap.is_nan() || gap <= OMI_GAP_TOLERANCE {
            return;
        }
        self.samples_in = self.samples_in.saturating_add((gap * rate) as u64);
        gap_actions(gap, ts, out);
    }

    /// An `audio_timeline=2` frame placed on the timeline: its gap filled, its replay counted
    /// (and told once per kind, as a warning), its new audio passed on.
    fn on_placed(&mut self, ts: f64, placed: Placed, out: &mut Vec<Action>) {
        let mut silence = 0;
        if placed.gap > 0 {
            silence = gap_actions(placed.gap as f64 / f64::from(self.rate), ts, out);
        }
        let audio = placed.pcm.len() as u64 / 2;
        if let Some(timeline) = self.timeline.as_mut() {
            timeline.passed_on(audio, silence);
        }
        if let Some(replay) = placed.replay {
            counter!(OMI_REPLAYS, "outcome" => replay.as_str()).increment(1);
            if matches!(replay, Replay::Conflict | Replay::Unverifiable) {
                out.push(Action::Notice(ServerEvent::warning(
                    "replay_conflict",
                    format!(
                        "audio at capture time {ts:.3} overlaps audio already received ({}); the first data is kept",
                        replay.as_str()
                    ),
                )));
            }
        }
        if !placed.pcm.is_empty() {
            out.push(Action::Audio(placed.pcm));
        }
    }
}

/// `gap` seconds missing before capture time `ts`: up to `MAX_GAP_SAMPLES` filled (within the
/// session's budget); a longer jump is followed but not filled. Returns the samples asked for.
fn gap_actions(gap: f64, ts: f64, out: &mut Vec<Action>) -> u64 {
    let samples = (gap * f64::from(SAMPLE_RATE)) as u64;
    if samples > MAX_GAP_SAMPLES {
        out.push(Action::Notice(ServerEvent::warning(
            "timestamp_jump",
            format!(
                "capture time {ts:e} is more than {} s ahead of the audio received; not filled",
                MAX_GAP_SAMPLES / u64::from(SAMPLE_RATE)
            ),
        )));
        return 0;
    }
    out.push(Action::Silence(samples));
    out.push(Action::Notice(ServerEvent::warning(
        "media_gap",
        format!("{gap:.3} s of audio missing before capture time {ts:.3}; filled with silence"),
    )));
    samples
}

impl Frontend for Omi {
    fn on_binary(&mut self, data: Bytes, out: &mut Vec<Action>) {
        if data.len() < 4 {
            out.push(Self::malformed(format!(
                "a {}-byte frame has no 4-byte opcode",
                data.len()
            )));
            return;
        }
        let op = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let payload = data.slice(4..);
        match op {
            100 => out.push(Action::Control(ClientControl::KeepAlive)),
            101 => self.on_audio(&payload, out),
            102 => out.push(self.json(op, "transcript", &payload)),
            103 => match std::str::from_utf8(&payload) {
                Ok(id) if !id.is_empty() && id.len() <= 256 => {
                    self.conversation_id = Some(id.to_owned());
                    out.push(self.conversation("conversation_id", serde_json::Value::Null));
                }
                _ => out.push(Self::malformed(
                    "opcode 103: conversation id must be 1-256 bytes of UTF-8".into(),
                )),
            },
            104 => out.push(self.json(op, "finalize", &payload)),
            105 => out.push(self.json(op, "speaker_sample", &payload)),
            other => out.push(Action::Violation {
                code: CloseCode::Unsupported,
                error: "unknown_opcode",
                message: format!("unknown opcode {other}"),
            }),
        }
    }

    /// `audio_timeline=2`: the acknowledgement is the first frame the listen side gets.
    fn on_start(&mut self, out: &mut Vec<Action>) {
        if self.timeline.is_some() {
            let mut frame = 202u32.to_le_bytes().to_vec();
            let ack =
                serde_json::json!({"type": "audio_timeline_ack", "version": TIMELINE_VERSION});
            frame.extend_from_slice(ack.to_string().as_bytes());
            out.push(Action::Reply(Message::Binary(frame.into())));
        }
    }

    fn on_text(&mut self, _text: &str, out: &mut Vec<Action>) {
        out.push(Self::malformed(
            "text frames are not part of this protocol; send binary opcode frames".into(),
        ));
    }

    fn hook_webhooks(&mut self, answer: &HookAnswer, cfg: &Config) -> Vec<Arc<WebhookConfig>> {
        self.targets = Some(OmiTargets {
            transcript_webhook: answer.transcript_webhook.clone(),
            conversation_webhook: answer.conversation_webhook.clone(),
        });
        audio_apps(&answer.audio_apps, cfg)
    }

    fn config_webhooks(&self, cfg: &Config) -> Vec<Arc<WebhookConfig>> {
        audio_apps(&cfg.omi.audio_apps, cfg)
    }

    fn extra_consumers(&mut self, ctx: &BuildCtx<'_>) -> Vec<Box<dyn Consumer>> {
        let targets = self.targets.take().unwrap_or_else(|| OmiTargets {
            transcript_webhook: ctx.cfg.omi.transcript_webhook.clone(),
            conversation_webhook: ctx.cfg.omi.conversation_webhook.clone(),
        });
        consumers(ctx, targets)
    }

    fn on_session(&mut self, owner: &str, target: &crate::fanout::contract::Target) {
        if let Some(timeline) = self.timeline.as_mut() {
            timeline.on_session(owner, &target.session_id, &target.uid);
        }
    }

    fn recording_continuation(&self) -> Option<crate::fanout::recorder::Continuation> {
        self.timeline.as_ref().map(|t| t.continuation.clone())
    }

    fn render(&mut self, event: &ServerEvent, out: &mut Vec<Message>) {
        if let ServerEvent::Conversation { event, data, .. } = event {
            if event == "finalize_result" {
                let mut frame = 201u32.to_le_bytes().to_vec();
                frame.extend_from_slice(data.to_string().as_bytes());
                out.push(Message::Binary(frame.into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(op: u32, payload: &[u8]) -> Bytes {
        let mut v = op.to_le_bytes().to_vec();
        v.extend_from_slice(payload);
        Bytes::from(v)
    }

    fn audio(ts: f64, samples: usize) -> Bytes {
        let mut p = ts.to_le_bytes().to_vec();
        p.extend(std::iter::repeat_n(0u8, samples * 2));
        frame(101, &p)
    }

    fn violation(out: &[Action]) -> Option<&'static str> {
        out.iter().find_map(|a| match a {
            Action::Violation { error, .. } => Some(*error),
            _ => None,
        })
    }

    fn request(pairs: &[(&str, &str)]) -> ConnectRequest {
        ConnectRequest::from_pairs(crate::ingest::request::Endpoint::Omi, pairs)
    }

    #[test]
    fn accept_needs_a_uid_and_a_sane_rate() {
        assert!(
            matches!(accept(&Config::default(), false, None, request(&[("uid", "u")])), Accept::Session(r, _)
            if matches!(r.source, Ok(voxgate_media::SourceFormat::Linear16 { sample_rate: 8000, channels: 1 })))
        );
        assert!(
            matches!(accept(&Config::default(), false, None, request(&[])), Accept::Refuse(_, r) if r.reason == RefuseReason::MissingUid)
        );
        assert!(
            matches!(accept(&Config::default(), false, None, request(&[("uid", "u"), ("sample_rate", "4000")])),
            Accept::Refuse(_, r) if r.reason == RefuseReason::InvalidSampleRate)
        );
    }

    #[test]
    fn the_timeline_version_is_negotiated_and_draining_is_told_after_accept() {
        let cfg = Config::default();
        let v = |v: &str| {
            accept(
                &cfg,
                false,
                None,
                request(&[("uid", "u"), ("audio_timeline", v)]),
            )
        };
        assert!(matches!(v("2"), Accept::Session(..)));
        for bad in ["3", "1", "two", ""] {
            assert!(
                matches!(v(bad), Accept::Refuse(_, r) if r.reason.close_code() == CloseCode::Policy),
                "audio_timeline={bad}"
            );
        }
        let draining = accept(&cfg, true, None, request(&[("uid", "u")]));
        assert!(
            matches!(draining, Accept::Refuse(_, r) if r.reason.close_code() == CloseCode::GoingAway)
        );
        // The acknowledgement comes first, and only with the parameter.
        let Accept::Session(_, mut omi) = v("2") else {
            unreachable!()
        };
        let mut out = Vec::new();
        omi.on_start(&mut out);
        let Some(Action::Reply(Message::Binary(ack))) = out.first() else {
            panic!("{out:?}")
        };
        assert_eq!(&ack[..4], &202u32.to_le_bytes());
        let body: serde_json::Value = serde_json::from_slice(&ack[4..]).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"type": "audio_timeline_ack", "version": 2})
        );
        let Accept::Session(_, mut legacy) = accept(&cfg, false, None, request(&[("uid", "u")]))
        else {
            unreachable!()
        };
        let mut out = Vec::new();
        legacy.on_start(&mut out);
        assert!(out.is_empty(), "no ack without the parameter");
    }

    #[test]
    fn audio_frames_carry_pcm_and_late_capture_times_fill_gaps() {
        let mut omi = Omi::new(16_000, 4096);
        let mut out = Vec::new();
        omi.on_binary(audio(100.0, 1600), &mut out); // 0.1 s
        omi.on_binary(audio(100.1, 1600), &mut out); // on time
        omi.on_binary(audio(101.2, 1600), &mut out); // 1 s late
        let pcm: Vec<_> = out
            .iter()
            .filter_map(|a| match a {
                Action::Audio(b) => Some(b.len()),
                _ => None,
            })
            .collect();
        assert_eq!(pcm, [3200, 3200, 3200]);
        let filled: u64 = out
            .iter()
            .filter_map(|a| match a {
                Action::Silence(n) => Some(*n),
                _ => None,
            })
            .sum();
        assert!((15_900..=16_100).contains(&filled), "{filled}");
    }

    #[test]
    fn control_and_conversation_opcodes() {
        let mut omi = Omi::new(8000, 4096);
        let mut out = Vec::new();
        omi.on_binary(frame(100, b""), &mut out);
        omi.on_binary(frame(103, b"conv-1"), &mut out);
        omi.on_binary(frame(104, br#"{"x":1}"#), &mut out);
        assert!(matches!(out[0], Action::Control(ClientControl::KeepAlive)));
        assert!(
            matches!(&out[2], Action::Notice(ServerEvent::Conversation { event, conversation_id, .. })
            if event == "finalize" && conversation_id.as_deref() == Some("conv-1"))
        );
    }

    #[test]
    fn malformed_frames_are_violations() {
        for (bytes, error) in [
            (Bytes::from_static(b"\x01"), "malformed_frame"),
            (frame(101, b"\x00\x01"), "malformed_frame"),
            (frame(101, &[0u8; 9]), "malformed_frame"),
            (frame(102, b"{not json"), "malformed_frame"),
            (frame(103, b""), "malformed_frame"),
            (frame(999, b""), "unknown_opcode"),
        ] {
            let mut out = Vec::new();
            Omi::new(8000, 4096).on_binary(bytes, &mut out);
            assert_eq!(violation(&out), Some(error));
        }
        let mut out = Vec::new();
        Omi::new(8000, 4096).on_text("hi", &mut out);
        assert_eq!(violation(&out), Some("malformed_frame"));
    }

    #[test]
    fn the_hook_answer_names_the_users_targets() {
        let cfg = Config::default();
        let answer: HookAnswer = serde_json::from_value(serde_json::json!({
            "allow": true, "audio_apps": ["http://a/1", "http://a/2"],
            "transcript_webhook": "http://t"
        }))
        .unwrap();
        let mut omi = Omi::new(8000, 4096);
        let apps = omi.hook_webhooks(&answer, &cfg);
        let names: Vec<_> = apps.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["audio_app_0", "audio_app_1"]);
        assert_eq!(
            omi.targets.as_ref().unwrap().transcript_webhook.as_deref(),
            Some("http://t")
        );
        assert!(omi.config_webhooks(&cfg).is_empty());
    }
}
