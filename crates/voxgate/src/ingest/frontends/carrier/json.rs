//! The Twilio-family carriers (SignalWire, Telnyx, Plivo, Exotel; one row each in `spec.rs`):
//! JSON text events with base64 audio. `accept` waits for `start` (its custom parameters choose
//! the session as the query does on `/v1/listen`); media frames are put back in order by their
//! `chunk` number within `carriers.reorder_window_frames`, and frames given up are filled with
//! silence within the session's gap budget.

use axum::extract::ws::Message;
use base64::Engine;
use bytes::Bytes;
use metrics::counter;
use voxgate_session::{ClientControl, ServerEvent, MAX_GAP_SAMPLES};

use super::call::{self, telephony, CallStart};
use super::reorder::{Reorder, Step, Taken};
use super::spec::{ErrorStyle, JsonSpec};
use super::start::{self, BeforeStart};
use crate::fanout::subscribers::Hub;
use crate::ingest::admission::Admitted;
use crate::ingest::client::{WsSink, WsStream};
use crate::ingest::frontends::{Accept, Action, Frontend};
use crate::ingest::refusal::{Refusal, RefuseReason};
use crate::ingest::request::ConnectRequest;
use crate::metrics as m;
use crate::shared::Shared;

/// Admits the connection, waits for `start`, checks a token from its custom parameters, then
/// describes the session.
pub async fn accept(
    shared: &Shared,
    sink: &mut WsSink,
    stream: &mut WsStream,
    req: ConnectRequest,
    spec: &'static JsonSpec,
) -> Accept {
    let admitted = match start::admit_connect(shared, &req) {
        Ok(a) => a,
        Err(refusal) => return Accept::Refuse(req, refusal),
    };
    let limits = call::start_limits(shared, "start event");
    let step = |msg, loud| before_start(spec, msg, loud);
    let call = match start::wait_for_start(shared, sink, stream, &limits, step).await {
        Ok(Some(call)) => call,
        Ok(None) => return Accept::Done,
        Err(refusal) => return Accept::Refuse(req, refusal),
    };
    let window = shared.cfg.carriers.reorder_window_frames;
    let session = |call: &CallStart, admitted| {
        Box::new(JsonCarrier::new(spec, call, window, admitted)) as Box<dyn Frontend>
    };
    call::session_for(shared, req, admitted, call, session)
}

/// Handles one message before `start`.
fn before_start(
    spec: &JsonSpec,
    msg: Message,
    loud: bool,
) -> (BeforeStart<CallStart>, Option<Message>) {
    let name = spec.carrier.as_str();
    let text = match msg {
        Message::Text(t) => t,
        Message::Close(_) => return (BeforeStart::Left, None),
        Message::Binary(_) => {
            let why = format!("{name} streams send JSON text; binary message ignored");
            return (
                BeforeStart::Wait,
                Some(start::warning(name, "unexpected_binary", why, loud)),
            );
        }
        _ => return (BeforeStart::Wait, None),
    };
    let v: serde_json::Value = match serde_json::from_str(text.as_str()) {
        Ok(v) => v,
        Err(e) => {
            let w = start::warning(name, "bad_message", format!("not JSON: {e}; ignored"), loud);
            return (BeforeStart::Wait, Some(w));
        }
    };
    match v["event"].as_str().unwrap_or_default() {
        "connected" => (BeforeStart::Wait, None),
        "start" => {
            let call = parse_start(spec, &v)
                .map_err(|message| Refusal::new(RefuseReason::UnsupportedFormat, message));
            (BeforeStart::Started(call), None)
        }
        "stop" => (BeforeStart::Left, None),
        "media" => {
            counter!(m::DROPPED_BYTES, "consumer" => "session", "reason" => "media_before_start")
                .increment(1);
            let why = "media event before start; dropped".to_owned();
            let w = start::warning(name, "media_before_start", why, loud);
            (BeforeStart::Wait, Some(w))
        }
        other => {
            let why = format!("unknown {name} event {other:?} before start; ignored");
            let w = start::warning(name, "unknown_event", why, loud);
            (BeforeStart::Wait, Some(w))
        }
    }
}

/// A number sent as a JSON number or a decimal string.
fn number(v: &serde_json::Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// Parses a `start` event by the carrier's field names. `Err` explains what was refused.
pub fn parse_start(spec: &JsonSpec, v: &serde_json::Value) -> Result<CallStart, String> {
    let name = spec.carrier.as_str();
    let start = &v["start"];
    if !start.is_object() {
        return Err(format!("{name} start event without a start object"));
    }
    let format = &start[spec.media_format];
    let asked = format["encoding"].as_str().unwrap_or(spec.default_encoding);
    let rate = number(&format[spec.sample_rate]).unwrap_or(8000);
    let channels = number(&format["channels"]).unwrap_or(1);
    let encoding = spec.encoding(asked).filter(|e| {
        let rates: &[u64] = if *e == "linear16" {
            &[8000, 16000, 24000]
        } else {
            &[8000]
        };
        channels == 1 && rates.contains(&rate)
    });
    let Some(encoding) = encoding else {
        return Err(format!(
            "unsupported {name} media format {asked} {rate} Hz {channels} ch (see the README's carrier table)"
        ));
    };
    let text = |key: &str| {
        (start[key].as_str().or(v[key].as_str()))
            .unwrap_or_default()
            .to_owned()
    };
    Ok(CallStart {
        carrier: spec.carrier,
        stream_id: text(spec.stream_id),
        call_id: text(spec.call_id),
        custom: call::string_map(&start[spec.custom]),
        encoding,
        sample_rate: rate as u32,
        channels: 1,
        detail: start.clone(),
    })
}

/// A Twilio-family carrier's stream once `start` arrived.
pub struct JsonCarrier {
    spec: &'static JsonSpec,
    stream_id: String,
    start_detail: Option<serde_json::Value>,
    reorder: Reorder,
    /// 16 kHz samples per source byte, times 1,000 (for the silence of lost frames).
    samples_per_kbyte: u64,
    /// The size of the last frame released (a lost frame is taken to be as long).
    last_frame: u64,
    admitted: Option<Admitted>,
}

impl JsonCarrier {
    pub fn new(
        spec: &'static JsonSpec,
        call: &CallStart,
        window: usize,
        admitted: Admitted,
    ) -> Self {
        let width = if call.encoding == "linear16" { 2 } else { 1 };
        Self {
            spec,
            stream_id: call.stream_id.clone(),
            start_detail: Some(call.detail.clone()),
            reorder: Reorder::new(window),
            samples_per_kbyte: 16_000_000 / (u64::from(call.sample_rate) * width),
            last_frame: u64::from(call.sample_rate) / 50 * width,
            admitted: Some(admitted),
        }
    }

    fn count(&self, outcome: &'static str, n: u64) {
        let carrier = self.spec.carrier.as_str();
        counter!(m::CARRIER_FRAMES, "carrier" => carrier, "outcome" => outcome).increment(n);
    }

    /// A `media` event: base64 audio of the inbound track, placed by its `chunk` number.
    fn on_media(&mut self, v: &serde_json::Value, out: &mut Vec<Action>) {
        let media = &v["media"];
        if matches!(media["track"].as_str(), Some(t) if t.starts_with("outbound")) {
            out.push(Action::Control(ClientControl::KeepAlive));
            return;
        }
        let Some(payload) = media["payload"].as_str() else {
            out.push(warn("bad_media", "media event without a payload; ignored"));
            return;
        };
        let bytes = match base64::engine::general_purpose::STANDARD.decode(payload) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                let why = format!("media payload is not base64 ({e}); frame dropped");
                out.push(warn("bad_payload", &why));
                return;
            }
        };
        let Some(seq) = number(&media["chunk"]) else {
            out.push(Action::Audio(bytes));
            return;
        };
        let mut steps = Vec::new();
        match self.reorder.push(seq, bytes, &mut steps) {
            Taken::InOrder => {}
            Taken::Held => self.count("reordered", 1),
            Taken::Late => {
                self.count("late", 1);
                let why = format!("media chunk {seq} came after its place was given up; dropped");
                out.push(warn("late_media", &why));
            }
        }
        self.release(steps, out);
    }

    /// Turns released frames into audio and lost frames into silence (within the budget).
    fn release(&mut self, steps: Vec<Step>, out: &mut Vec<Action>) {
        for step in steps {
            match step {
                Step::Frame(bytes) => {
                    self.last_frame = bytes.len() as u64;
                    out.push(Action::Audio(bytes));
                }
                Step::Lost(frames) => {
                    self.count("lost", frames);
                    let bytes = frames.saturating_mul(self.last_frame);
                    let samples = bytes.saturating_mul(self.samples_per_kbyte) / 1000;
                    if samples > MAX_GAP_SAMPLES {
                        let why = format!(
                            "{frames} media frames missing; a gap of more than {} s is not filled",
                            MAX_GAP_SAMPLES / 16_000
                        );
                        out.push(warn("media_jump", &why));
                        continue;
                    }
                    out.push(Action::Silence(samples));
                    let why = format!("{frames} media frames missing; filled with silence");
                    out.push(warn("media_gap", &why));
                }
            }
        }
    }
}

fn warn(code: &str, message: &str) -> Action {
    Action::Notice(ServerEvent::warning(code, message))
}

impl Frontend for JsonCarrier {
    fn on_binary(&mut self, _data: Bytes, out: &mut Vec<Action>) {
        let why = format!(
            "{} streams send JSON text messages; binary message ignored",
            self.spec.carrier.as_str()
        );
        out.push(warn("unexpected_binary", &why));
    }

    fn on_text(&mut self, text: &str, out: &mut Vec<Action>) {
        let v: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return out.push(warn("bad_message", &format!("not JSON: {e}; ignored"))),
        };
        let event = v["event"].as_str().unwrap_or_default();
        match event {
            "connected" => out.push(Action::Control(ClientControl::KeepAlive)),
            "start" => out.push(warn("duplicate_start", "a second start event was ignored")),
            "media" => self.on_media(&v, out),
            "dtmf" | "mark" | "clear" | "error" => {
                out.push(telephony(event, v.get(event).or(v.get("payload"))))
            }
            "stop" => {
                let mut steps = Vec::new();
                self.reorder.drain(&mut steps);
                self.release(steps, out);
                out.push(telephony("stop", v.get("stop")));
                out.push(Action::Control(ClientControl::CloseStream));
            }
            other => {
                let why = format!(
                    "unknown {} event {other:?} on stream {}; ignored",
                    self.spec.carrier.as_str(),
                    self.stream_id
                );
                out.push(warn("unknown_event", &why));
            }
        }
    }

    fn take_admission(&mut self) -> Option<Admitted> {
        self.admitted.take()
    }

    fn on_registered(&mut self, hub: &Hub) {
        if let Some(detail) = self.start_detail.take() {
            call::publish_start(hub, self.spec.carrier, detail);
        }
    }

    fn render(&mut self, event: &ServerEvent, out: &mut Vec<Message>) {
        match (self.spec.errors, event) {
            (ErrorStyle::Telnyx, ServerEvent::Warning { code, message })
            | (ErrorStyle::Telnyx, ServerEvent::Error { code, message }) => {
                let error = serde_json::json!({
                    "event": "error",
                    "stream_id": self.stream_id,
                    "payload": {"code": code, "title": code, "detail": message},
                });
                out.push(Message::Text(error.to_string().into()));
            }
            (_, ServerEvent::Warning { .. } | ServerEvent::Error { .. })
            | (_, ServerEvent::Closed { .. }) => out.push(Message::Text(event.to_json().into())),
            _ => {}
        }
    }
}
