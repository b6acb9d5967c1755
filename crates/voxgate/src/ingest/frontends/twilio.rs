//! `/v1/twilio`: Twilio Media Streams. `accept` waits for `start` (its `customParameters` choose
//! the session as the query does on `/v1/listen`), then the `Twilio` frontend takes JSON text
//! events with base64 G.711 mu-law 8 kHz mono.

use axum::extract::ws::Message;
use base64::Engine;
use bytes::Bytes;
use metrics::counter;
use voxgate_session::{ClientControl, ServerEvent, MAX_GAP_SAMPLES};

use super::carrier::start::{self, BeforeStart, StartLimits};
use super::{Accept, Action, Frontend};
use crate::fanout::subscribers::Hub;
use crate::ingest::admission::Admitted;
use crate::ingest::client::{WsSink, WsStream};
use crate::ingest::refusal::{Refusal, RefuseReason};
use crate::ingest::request::{valid_session_id, ConnectRequest};
use crate::metrics as m;
use crate::shared::Shared;

fn warning(code: &str, message: String, loud: bool) -> Message {
    start::warning("twilio", code, message, loud)
}

/// Admits the connection as any other before `start` (per-IP rate, permit and, when the URL
/// carries it, the token), waits for `start` (within `twilio.start_timeout_seconds` of the
/// connect), checks a token from `start.customParameters.token`, then describes the session.
pub async fn accept(
    shared: &Shared,
    sink: &mut WsSink,
    stream: &mut WsStream,
    mut req: ConnectRequest,
) -> Accept {
    let mut admitted = match start::admit_connect(shared, &req) {
        Ok(a) => a,
        Err(refusal) => return Accept::Refuse(req, refusal),
    };
    let limits = StartLimits {
        timeout: shared.cfg.twilio.start_timeout(),
        max_messages: shared.cfg.twilio.max_messages_before_start,
        section: "twilio",
        what: "start event",
    };
    let start = match start::wait_for_start(shared, sink, stream, &limits, before_start).await {
        Ok(Some(start)) => start,
        Ok(None) => return Accept::Done,
        Err(refusal) => return Accept::Refuse(req, refusal),
    };
    let token = start.custom.get("token").cloned();
    if let Err(refusal) = start::check_token(shared, &mut admitted, &mut req, token) {
        return Accept::Refuse(req, refusal);
    }
    for (k, v) in &start.custom {
        if matches!(k.as_str(), "consumers" | "uid" | "session_id") {
            req.raw_query.insert(k.clone(), v.clone());
        }
    }
    if !req.raw_query.contains_key("session_id") && valid_session_id(&start.stream_sid) {
        req.raw_query
            .insert("session_id".into(), start.stream_sid.clone());
    }
    // The typed fields follow the (mirrored) query, so the hook sees what the session uses.
    let mut typed = ConnectRequest::parse(req.endpoint, req.peer, req.token, req.raw_query);
    typed.set_source("mulaw", 8000);
    let mut twilio = Twilio::new(start);
    twilio.admitted = Some(admitted);
    Accept::Session(typed, Box::new(twilio))
}

/// Handles one message before `start`, with the warning (if any) to send back; `loud`: log
/// the warning at warn level.
fn before_start(msg: Message, loud: bool) -> (BeforeStart<TwilioStart>, Option<Message>) {
    let text = match msg {
        Message::Text(t) => t,
        Message::Close(_) => return (BeforeStart::Left, None),
        Message::Binary(_) => {
            let w = warning(
                "unexpected_binary",
                "Twilio Media Streams send JSON text; ignored".into(),
                loud,
            );
            return (BeforeStart::Wait, Some(w));
        }
        _ => return (BeforeStart::Wait, None),
    };
    let v: serde_json::Value = match serde_json::from_str(text.as_str()) {
        Ok(v) => v,
        Err(e) => {
            let w = warning("bad_message", format!("not JSON: {e}; ignored"), loud);
            return (BeforeStart::Wait, Some(w));
        }
    };
    match v["event"].as_str().unwrap_or_default() {
        "connected" => (BeforeStart::Wait, None),
        "start" => {
            let start = TwilioStart::parse(&v)
                .map_err(|message| Refusal::new(RefuseReason::UnsupportedFormat, message));
            (BeforeStart::Started(start), None)
        }
        "media" => {
            counter!(m::DROPPED_BYTES, "consumer" => "session", "reason" => "media_before_start")
                .increment(1);
            let w = warning(
                "media_before_start",
                "media event before start; dropped".into(),
                loud,
            );
            (BeforeStart::Wait, Some(w))
        }
        "stop" => (BeforeStart::Left, None),
        other => {
            let w = warning(
                "unknown_event",
                format!("unknown Twilio event {other:?}; ignored"),
                loud,
            );
            (BeforeStart::Wait, Some(w))
        }
    }
}

/// The pre-`start` parser on one text message (for the fuzz targets): `Some` once `start`
/// arrived (or was refused).
#[doc(hidden)]
pub fn pre_start(text: &str) -> Option<Result<TwilioStart, Refusal>> {
    match before_start(Message::Text(text.into()), false).0 {
        BeforeStart::Started(start) => Some(start),
        BeforeStart::Wait | BeforeStart::Left => None,
    }
}

/// Twilio Media Streams on `/v1/twilio`: JSON text events, base64 G.711 mu-law 8 kHz mono.
/// Only the inbound track is taken. Timestamps reveal gaps, which are filled with silence.
pub struct Twilio {
    stream_sid: String,
    /// The `start` event's object, for subscribers once the session is registered.
    start_detail: Option<serde_json::Value>,
    /// Media time received on the inbound track, in 8 kHz samples.
    received_8k: u64,
    /// The admission made before `start`, for `prepare`.
    admitted: Option<Admitted>,
}

/// What a `start` event carried.
#[derive(Debug, Clone, Default)]
pub struct TwilioStart {
    pub stream_sid: String,
    pub call_sid: String,
    pub custom: std::collections::HashMap<String, String>,
    pub detail: serde_json::Value,
}

impl Twilio {
    pub fn new(start: TwilioStart) -> Self {
        Self {
            stream_sid: start.stream_sid,
            start_detail: Some(start.detail),
            received_8k: 0,
            admitted: None,
        }
    }
}

impl TwilioStart {
    /// Parses a `start` event (before the session exists). `Err` explains what was wrong.
    pub fn parse(v: &serde_json::Value) -> Result<Self, String> {
        let start = &v["start"];
        if !start.is_object() {
            return Err("start event without a start object".into());
        }
        let encoding = start["mediaFormat"]["encoding"]
            .as_str()
            .unwrap_or("audio/x-mulaw");
        let rate = start["mediaFormat"]["sampleRate"].as_u64().unwrap_or(8000);
        let channels = start["mediaFormat"]["channels"].as_u64().unwrap_or(1);
        if encoding != "audio/x-mulaw" || rate != 8000 || channels != 1 {
            return Err(format!(
                "unsupported mediaFormat {encoding} {rate} Hz {channels} ch; Twilio streams are audio/x-mulaw 8000 Hz mono"
            ));
        }
        let custom = start["customParameters"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            stream_sid: start["streamSid"]
                .as_str()
                .or(v["streamSid"].as_str())
                .unwrap_or_default()
                .to_owned(),
            call_sid: start["callSid"].as_str().unwrap_or_default().to_owned(),
            custom,
            detail: start.clone(),
        })
    }
}

impl Twilio {
    /// A `media` event: base64 mu-law of the inbound track; timestamps reveal gaps.
    fn on_media(&mut self, media: &serde_json::Value, out: &mut Vec<Action>) {
        let track = media["track"].as_str().unwrap_or("inbound");
        if track != "inbound" && track != "inbound_track" {
            out.push(Action::Control(ClientControl::KeepAlive));
            return;
        }
        let Some(payload) = media["payload"].as_str() else {
            out.push(Action::Notice(ServerEvent::warning(
                "bad_media",
                "media event without a payload; ignored",
            )));
            return;
        };
        let bytes = match base64::engine::general_purpose::STANDARD.decode(payload) {
            Ok(b) => b,
            Err(e) => {
                out.push(Action::Notice(ServerEvent::warning(
                    "bad_payload",
                    format!("media payload is not base64 ({e}); chunk dropped"),
                )));
                return;
            }
        };
        // Timestamps (ms since the stream started) reveal gaps; they never place audio.
        let ts = media["timestamp"]
            .as_str()
            .and_then(|t| t.parse::<u64>().ok())
            .or_else(|| media["timestamp"].as_u64());
        if let Some(ts) = ts {
            self.on_timestamp(ts, out);
        }
        self.received_8k = self.received_8k.saturating_add(bytes.len() as u64);
        out.push(Action::Audio(Bytes::from(bytes)));
    }
}

impl Twilio {
    /// A timestamp ahead of the media received is a gap: up to `MAX_GAP_SAMPLES` it is filled
    /// (within the session's budget); a longer jump is a discontinuity, followed but not filled.
    /// Timestamps are untrusted: every step saturates.
    fn on_timestamp(&mut self, ts: u64, out: &mut Vec<Action>) {
        let expected_ms = self.received_8k / 8;
        if ts <= expected_ms.saturating_add(40) {
            return;
        }
        let gap_ms = ts - expected_ms;
        let gap_8k = gap_ms.saturating_mul(8);
        self.received_8k = self.received_8k.saturating_add(gap_8k);
        let samples = gap_8k.saturating_mul(2);
        if samples > MAX_GAP_SAMPLES {
            out.push(Action::Notice(ServerEvent::warning(
                "timestamp_jump",
                format!(
                    "timestamp {ts} is {gap_ms} ms ahead of the audio received; a jump of more than {} s is not filled",
                    MAX_GAP_SAMPLES / 16_000
                ),
            )));
            return;
        }
        out.push(Action::Silence(samples));
        out.push(Action::Notice(ServerEvent::warning(
            "media_gap",
            format!("{gap_ms} ms of audio missing before timestamp {ts}; filled with silence"),
        )));
    }
}

impl Frontend for Twilio {
    fn on_binary(&mut self, _data: Bytes, out: &mut Vec<Action>) {
        out.push(Action::Notice(ServerEvent::warning(
            "unexpected_binary",
            "Twilio Media Streams send JSON text messages; binary message ignored",
        )));
    }

    fn on_text(&mut self, text: &str, out: &mut Vec<Action>) {
        let v: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                out.push(Action::Notice(ServerEvent::warning(
                    "bad_message",
                    format!("not JSON: {e}; ignored"),
                )));
                return;
            }
        };
        let event = v["event"].as_str().unwrap_or_default();
        match event {
            "connected" => out.push(Action::Control(ClientControl::KeepAlive)),
            "start" => out.push(Action::Notice(ServerEvent::warning(
                "duplicate_start",
                "a second start event was ignored",
            ))),
            "media" => self.on_media(&v["media"], out),
            "mark" | "dtmf" => out.push(Action::Notice(ServerEvent::Telephony {
                event: event.to_owned(),
                detail: v.get(event).cloned().unwrap_or_default(),
            })),
            "stop" => {
                out.push(Action::Notice(ServerEvent::Telephony {
                    event: "stop".into(),
                    detail: v.get("stop").cloned().unwrap_or_default(),
                }));
                out.push(Action::Control(ClientControl::CloseStream));
            }
            other => out.push(Action::Notice(ServerEvent::warning(
                "unknown_event",
                format!(
                    "unknown Twilio event {other:?} on stream {}; ignored",
                    self.stream_sid
                ),
            ))),
        }
    }

    fn take_admission(&mut self) -> Option<Admitted> {
        self.admitted.take()
    }

    fn on_registered(&mut self, hub: &Hub) {
        if let Some(detail) = self.start_detail.take() {
            let event = ServerEvent::Telephony {
                event: "start".into(),
                detail,
            };
            hub.publish_event(&event.to_json());
        }
    }

    fn render(&mut self, event: &ServerEvent, out: &mut Vec<Message>) {
        // Twilio ignores messages it does not know; only problems and the summary are sent
        // (for simulators and logs), the rest goes to subscribers.
        if let ServerEvent::Warning { .. }
        | ServerEvent::Error { .. }
        | ServerEvent::Closed { .. } = event
        {
            out.push(Message::Text(event.to_json().into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn start() -> TwilioStart {
        TwilioStart::parse(&json!({
            "event": "start",
            "start": {
                "streamSid": "MZ1", "callSid": "CA1",
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": {"consumers": "a", "n": 5}
            }
        }))
        .unwrap()
    }

    fn media(ts: u64, payload: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(payload);
        json!({"event": "media", "media": {"track": "inbound", "timestamp": ts.to_string(), "payload": b64}})
            .to_string()
    }

    fn warnings(out: &[Action]) -> Vec<&str> {
        out.iter()
            .filter_map(|a| match a {
                Action::Notice(ServerEvent::Warning { code, .. }) => Some(code.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn start_gives_the_stream_and_its_string_parameters() {
        let s = start();
        assert_eq!((s.stream_sid.as_str(), s.call_sid.as_str()), ("MZ1", "CA1"));
        assert_eq!(s.custom.get("consumers").map(String::as_str), Some("a"));
        assert!(!s.custom.contains_key("n"), "only string parameters");
        let err = TwilioStart::parse(&json!({"event": "start", "start": {
            "mediaFormat": {"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1}}}))
        .unwrap_err();
        assert!(err.contains("unsupported mediaFormat"), "{err}");
        assert!(TwilioStart::parse(&json!({"event": "start"})).is_err());
    }

    #[test]
    fn media_is_decoded_and_timestamp_gaps_are_filled() {
        let mut t = Twilio::new(start());
        let mut out = Vec::new();
        t.on_text(&media(0, &[0xFF; 160]), &mut out); // 20 ms
        t.on_text(&media(20, &[0xFF; 160]), &mut out); // on time
        t.on_text(&media(140, &[0xFF; 160]), &mut out); // 100 ms late
        let audio = out
            .iter()
            .filter(|a| matches!(a, Action::Audio(b) if b.len() == 160));
        assert_eq!(audio.count(), 3);
        // 100 ms at 8 kHz = 800 samples, 1,600 at 16 kHz.
        assert!(
            out.iter().any(|a| matches!(a, Action::Silence(1600))),
            "{out:?}"
        );
        assert_eq!(warnings(&out), ["media_gap"]);
    }

    #[test]
    fn events_map_to_controls_telephony_and_warnings() {
        let mut t = Twilio::new(start());
        let mut out = Vec::new();
        t.on_text(r#"{"event":"connected"}"#, &mut out);
        t.on_text(r#"{"event":"dtmf","dtmf":{"digit":"5"}}"#, &mut out);
        t.on_text(
            r#"{"event":"media","media":{"track":"outbound","payload":"AA=="}}"#,
            &mut out,
        );
        t.on_text(r#"{"event":"media","media":{"payload":"%%%"}}"#, &mut out);
        t.on_text("not json", &mut out);
        t.on_text(r#"{"event":"start"}"#, &mut out);
        t.on_text(r#"{"event":"nope"}"#, &mut out);
        t.on_text(r#"{"event":"stop","stop":{}}"#, &mut out);
        assert!(matches!(out[0], Action::Control(ClientControl::KeepAlive)));
        assert!(
            matches!(&out[1], Action::Notice(ServerEvent::Telephony { event, detail }) if event == "dtmf" && detail["digit"] == "5")
        );
        assert!(
            matches!(out[2], Action::Control(ClientControl::KeepAlive)),
            "outbound track skipped"
        );
        assert_eq!(
            warnings(&out),
            [
                "bad_payload",
                "bad_message",
                "duplicate_start",
                "unknown_event"
            ]
        );
        assert!(matches!(
            out.last(),
            Some(Action::Control(ClientControl::CloseStream))
        ));
    }

    #[test]
    fn only_problems_and_the_summary_are_rendered_for_twilio() {
        let mut t = Twilio::new(start());
        let mut out = Vec::new();
        t.render(&ServerEvent::warning("w", "m"), &mut out);
        assert_eq!(out.len(), 1);
        let mark = ServerEvent::Telephony {
            event: "mark".into(),
            detail: json!({}),
        };
        t.render(&mark, &mut out);
        assert_eq!(out.len(), 1, "a mark is for subscribers only");
    }
}
