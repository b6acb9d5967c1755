//! Entry points for `cargo fuzz` (the `fuzz/` crate at the repository root; not a stable API).
//! Each feeds arbitrary messages through one frontend's framing, applies the actions to a real
//! session on a fake clock and checks what the frontends promise: no panic or overflow (fuzz
//! builds check arithmetic), audio synthesized for gaps within the session's budget, every
//! event serializable and renderable.
//!
//! Input layout: a sequence of messages, each `[clock step][length][body]`: the clock advances
//! by `step` milliseconds (one byte), `length` (one byte, scaled by `LENGTH_UNIT`) bytes of body
//! follow (fewer at the end of the input).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use voxgate_media::SourceFormat;
use voxgate_session::{Input, Output, ServerEvent, Session, SessionConfig, SAMPLE_RATE};

use crate::ingest::frontends::listen::Listen;
use crate::ingest::frontends::omi::Omi;
use crate::ingest::frontends::twilio::{self, Twilio};
use crate::ingest::frontends::{fill_gap, Action, Frontend};

/// A message body's length byte counts in these units (up to 2 KiB per message).
const LENGTH_UNIT: usize = 8;
/// Slack of the fuzzed sessions' gap budget (the default: 2 s).
const SLACK: u64 = 2 * SAMPLE_RATE as u64;

/// Splits fuzz input into `(clock step, body)` messages.
fn messages(mut data: &[u8]) -> Vec<(u64, &[u8])> {
    let mut out = Vec::new();
    while let [step, len, rest @ ..] = data {
        let n = (usize::from(*len) * LENGTH_UNIT).min(rest.len());
        out.push((u64::from(*step), &rest[..n]));
        data = &rest[n..];
    }
    out
}

/// Renders an event as the driver would (the messages are dropped: rendering must not panic).
fn render(frontend: &mut dyn Frontend, event: &ServerEvent) {
    let mut out = Vec::new();
    let _ = event.to_json();
    frontend.render(event, &mut out);
}

/// A session of `source` on a fake clock, fed with a frontend's actions.
struct Harness {
    session: Session,
    t0: Instant,
    now: Instant,
}

impl Harness {
    fn new(source: SourceFormat) -> Self {
        let mut cfg = SessionConfig::new("fuzz", source);
        cfg.gap_slack_samples = SLACK;
        cfg.wants_audio = true;
        let mut session = Session::new(cfg).expect("fuzz sources are valid");
        let t0 = Instant::now();
        session.start(t0);
        Self {
            session,
            t0,
            now: t0,
        }
    }

    fn step(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
    }

    /// Applies actions like the driver; false once the session closed.
    fn apply(&mut self, frontend: &mut dyn Frontend, actions: &mut Vec<Action>) -> bool {
        for action in actions.drain(..) {
            if self.session.is_closed() {
                return false;
            }
            let now = self.now;
            let result = match action {
                Action::Audio(data) => self.session.handle_input(Input::Audio { now, data: &data }),
                Action::Control(control) => {
                    self.session.handle_input(Input::Control { now, control })
                }
                Action::ControlText(text) => {
                    self.session.handle_input(Input::Text { now, text: &text })
                }
                Action::Silence(samples) => fill_gap(&mut self.session, now, samples),
                Action::Notice(event) => {
                    render(frontend, &event);
                    Ok(())
                }
                Action::Reply(_) => Ok(()),
                Action::SetSource(source) => self.session.set_source(source),
                Action::SetSegmenter(cfg) => {
                    self.session.set_segmenter(cfg);
                    Ok(())
                }
                Action::Violation {
                    code,
                    error,
                    message,
                } => self.session.handle_input(Input::Violation {
                    code,
                    error,
                    message: &message,
                }),
            };
            result.expect("the session is open");
            self.drain(frontend);
            self.check_budget();
        }
        !self.session.is_closed()
    }

    fn drain(&mut self, frontend: &mut dyn Frontend) {
        while let Some(out) = self.session.poll_output() {
            if let Output::Event(event) = out {
                render(frontend, &event);
            }
        }
    }

    /// Synthesized audio never exceeds the wall-clock age of the session plus the slack.
    fn check_budget(&self) {
        let ms = self.now.duration_since(self.t0).as_millis() as u64;
        let allowed = ms * u64::from(SAMPLE_RATE / 1000) + SLACK;
        assert!(self.session.stats().gap_samples <= allowed);
    }
}

/// Device Opus with sequence headers on `/v1/listen?seq=1`: the first byte picks `frame_ms`.
pub fn device_opus(data: &[u8]) {
    let Some((&frame, data)) = data.split_first() else {
        return;
    };
    let frame_ms = [2.5f64, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0][usize::from(frame) % 7];
    let query: HashMap<String, String> = [
        ("seq".to_owned(), "1".to_owned()),
        ("frame_ms".to_owned(), (frame_ms as u64).to_string()),
    ]
    .into();
    let mut frontend = Listen::new(&query);
    let mut h = Harness::new(SourceFormat::Opus {
        sample_rate: 16_000,
        channels: 1,
    });
    let mut actions = Vec::new();
    for (step, body) in messages(data) {
        h.step(step);
        frontend.on_binary(Bytes::copy_from_slice(body), &mut actions);
        if !h.apply(&mut frontend, &mut actions) {
            return;
        }
    }
}

/// Omi's pusher frames (binary opcode frames; a body starting with `T` is sent as text).
pub fn omi(data: &[u8]) {
    let Some((&rate, data)) = data.split_first() else {
        return;
    };
    let rate = [8_000, 16_000, 44_100, 48_000][usize::from(rate) % 4];
    let mut frontend = Omi::new(rate, 4096);
    let mut h = Harness::new(SourceFormat::Linear16 {
        sample_rate: rate,
        channels: 1,
    });
    let mut actions = Vec::new();
    for (step, body) in messages(data) {
        h.step(step);
        match body {
            [b'T', text @ ..] => frontend.on_text(&String::from_utf8_lossy(text), &mut actions),
            _ => frontend.on_binary(Bytes::copy_from_slice(body), &mut actions),
        }
        if !h.apply(&mut frontend, &mut actions) {
            return;
        }
    }
}

/// Twilio Media Streams: each body is a text message. Before `start` they go through the
/// pre-start parser; a body starting with `M` becomes a `media` event whose timestamp and
/// payload come from the rest (so timestamps are explored without guessing JSON).
pub fn twilio(data: &[u8]) {
    let mut frontend: Option<Twilio> = None;
    let mut h = Harness::new(SourceFormat::Mulaw {
        sample_rate: 8000,
        channels: 1,
    });
    let mut actions = Vec::new();
    for (step, body) in messages(data) {
        h.step(step);
        let text = twilio_text(body);
        let Some(t) = &mut frontend else {
            match twilio::pre_start(&text) {
                Some(Ok(start)) => frontend = Some(Twilio::new(start)),
                Some(Err(_)) => return,
                None => {}
            }
            continue;
        };
        t.on_text(&text, &mut actions);
        if !h.apply(t, &mut actions) {
            return;
        }
    }
}

/// A Twilio message from fuzz bytes: `M` + 8-byte timestamp + flag + payload builds a media
/// event; `S` a valid start; anything else is taken as text.
fn twilio_text(body: &[u8]) -> String {
    use base64::Engine;
    match body {
        [b'M', ts @ .., ] if ts.len() >= 9 => {
            let t = u64::from_le_bytes(ts[..8].try_into().expect("8 bytes"));
            let payload = base64::engine::general_purpose::STANDARD.encode(&ts[9..]);
            let stamp = if ts[8] & 1 == 0 {
                serde_json::json!(t)
            } else {
                serde_json::json!(t.to_string())
            };
            serde_json::json!({"event": "media", "media": {"track": "inbound", "timestamp": stamp, "payload": payload}})
                .to_string()
        }
        [b'S', ..] => {
            r#"{"event":"start","start":{"streamSid":"MZfuzz","mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1},"customParameters":{"token":"t"}}}"#.to_owned()
        }
        _ => String::from_utf8_lossy(body).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entry_points_survive_the_review_attacks() {
        // Twilio: start, then media with u64::MAX and +10 s timestamps, no clock advance.
        let mut t = vec![0, 1, b'S', 0, 0, 0, 0, 0, 0, 0];
        for ts in [u64::MAX, 10_000, 20_000, 30_000] {
            let mut body = vec![b'M'];
            body.extend_from_slice(&ts.to_le_bytes());
            body.push(1);
            body.extend_from_slice(&[0xFF; 6]);
            t.extend_from_slice(&[0, 2]);
            t.extend_from_slice(&body);
        }
        twilio(&t);
        let mut o = vec![1];
        for ts in [1.0f64, f64::NAN, 1e300, 12.0, 23.0] {
            let mut body = 101u32.to_le_bytes().to_vec();
            body.extend_from_slice(&ts.to_le_bytes());
            body.extend_from_slice(&[0; 4]);
            o.extend_from_slice(&[0, 2]);
            o.extend_from_slice(&body);
        }
        omi(&o);
        let mut d = vec![6];
        for seq in [1u32, 52, 103, 0, u32::MAX] {
            let mut body = seq.to_be_bytes().to_vec();
            body.extend_from_slice(&[0xF8, 0xFF, 0xFE, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            d.extend_from_slice(&[0, 2]);
            d.extend_from_slice(&body);
        }
        device_opus(&d);
    }
}
