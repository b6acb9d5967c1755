//! Wire protocols in front of the session: each turns socket messages into session actions and
//! renders session events for its client. The connection driver is the same for all of them.

use axum::extract::ws::Message;
use base64::Engine;
use bytes::Bytes;
use voxgate_session::{CloseCode, ServerEvent};

/// What a socket message means for the session.
#[derive(Debug)]
pub enum Action {
    /// Audio bytes in the session's source format.
    Audio(Bytes),
    /// A control message (`KeepAlive`, `Finalize`, `CloseStream`).
    Control(&'static str),
    /// A text control message as received (parsed by the session, which reports bad ones).
    ControlText(String),
    /// 16 kHz samples known to be missing (filled with silence, counted).
    Silence(u64),
    /// Sent to the client only.
    Reply(Message),
    /// An event for the client (if its protocol shows events) and for subscribers.
    Notice(ServerEvent),
    /// The message breaks the protocol: tell the client, flush, close with `code`.
    Violation {
        code: CloseCode,
        error: &'static str,
        message: String,
    },
}

/// A wire protocol.
pub trait Frontend: Send + Sync {
    fn on_binary(&mut self, data: Bytes, out: &mut Vec<Action>);
    fn on_text(&mut self, text: &str, out: &mut Vec<Action>);
    /// How a session event reaches this protocol's client (`None`: it does not).
    fn render(&self, event: &ServerEvent) -> Option<Message>;
}

/// voxgate's own protocol on `/v1/listen`: binary audio, JSON control, JSON events.
/// With `seq_header`, each binary message starts with a big-endian u32 sequence number
/// (device Opus); a gap in the numbers is concealed with `frame_samples` per lost packet (Opus
/// packet-loss concealment from the decoder's state).
pub struct Listen {
    pub seq: Option<SeqHeader>,
}

/// Sequence-number framing for device packets.
pub struct SeqHeader {
    pub frame_samples: u64,
    pub next: Option<u32>,
}

/// Most packets concealed for one gap (a longer gap is a reset, not loss).
const MAX_LOST_PACKETS: u32 = 50;

impl Frontend for Listen {
    fn on_binary(&mut self, data: Bytes, out: &mut Vec<Action>) {
        let Some(seq) = &mut self.seq else {
            out.push(Action::Audio(data));
            return;
        };
        if data.is_empty() {
            return;
        }
        if data.len() < 4 {
            out.push(Action::Notice(ServerEvent::warning(
                "bad_packet",
                format!(
                    "a {}-byte message cannot hold the 4-byte sequence header; dropped",
                    data.len()
                ),
            )));
            return;
        }
        let n = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
        match seq.next {
            Some(expected) if n != expected => {
                let lost = n.wrapping_sub(expected);
                if lost > u32::MAX / 2 {
                    out.push(Action::Notice(ServerEvent::warning(
                        "late_packet",
                        format!("packet {n} arrived after {expected}; dropped"),
                    )));
                    return;
                }
                if lost <= MAX_LOST_PACKETS {
                    out.push(Action::Silence(u64::from(lost) * seq.frame_samples));
                }
                out.push(Action::Notice(ServerEvent::warning(
                    "packets_lost",
                    format!("{lost} packets lost before {n}; concealed"),
                )));
            }
            _ => {}
        }
        seq.next = Some(n.wrapping_add(1));
        out.push(Action::Audio(data.slice(4..)));
    }

    fn on_text(&mut self, text: &str, out: &mut Vec<Action>) {
        out.push(Action::ControlText(text.to_owned()));
    }

    fn render(&self, event: &ServerEvent) -> Option<Message> {
        Some(Message::Text(event.to_json().into()))
    }
}

/// Twilio Media Streams on `/v1/twilio`: JSON text events, base64 G.711 mu-law 8 kHz mono.
/// Only the inbound track is taken. Timestamps reveal gaps, which are filled with silence.
pub struct Twilio {
    started: bool,
    stream_sid: String,
    /// Media time received on the inbound track, in 8 kHz samples.
    received_8k: u64,
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
    pub fn new(stream_sid: String) -> Self {
        Self {
            started: true,
            stream_sid,
            received_8k: 0,
        }
    }

    /// Parses a `start` event (before the session exists). `Err` explains what was wrong.
    pub fn parse_start(v: &serde_json::Value) -> Result<TwilioStart, String> {
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
        Ok(TwilioStart {
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
            "connected" => out.push(Action::Control("KeepAlive")),
            "start" => out.push(Action::Notice(ServerEvent::warning(
                "duplicate_start",
                "a second start event was ignored",
            ))),
            "media" => {
                let media = &v["media"];
                let track = media["track"].as_str().unwrap_or("inbound");
                if track != "inbound" && track != "inbound_track" {
                    out.push(Action::Control("KeepAlive"));
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
                    let expected_ms = self.received_8k / 8;
                    if ts > expected_ms + 40 {
                        let gap_8k = (ts - expected_ms) * 8;
                        self.received_8k += gap_8k;
                        out.push(Action::Silence(gap_8k * 2));
                        out.push(Action::Notice(ServerEvent::warning(
                            "media_gap",
                            format!(
                                "{} ms of audio missing before timestamp {ts}; filled with silence",
                                ts - expected_ms
                            ),
                        )));
                    }
                }
                self.received_8k += bytes.len() as u64;
                out.push(Action::Audio(Bytes::from(bytes)));
            }
            "mark" | "dtmf" => out.push(Action::Notice(ServerEvent::Telephony {
                event: event.to_owned(),
                detail: v.get(event).cloned().unwrap_or_default(),
            })),
            "stop" => {
                out.push(Action::Notice(ServerEvent::Telephony {
                    event: "stop".into(),
                    detail: v.get("stop").cloned().unwrap_or_default(),
                }));
                out.push(Action::Control("CloseStream"));
            }
            other => out.push(Action::Notice(ServerEvent::warning(
                "unknown_event",
                format!(
                    "unknown Twilio event {other:?} on stream {}; ignored",
                    self.stream_sid
                ),
            ))),
        }
        debug_assert!(self.started);
    }

    fn render(&self, event: &ServerEvent) -> Option<Message> {
        // Twilio ignores messages it does not know; only problems and the summary are sent
        // (for simulators and logs), the rest goes to subscribers.
        match event {
            ServerEvent::Warning { .. }
            | ServerEvent::Error { .. }
            | ServerEvent::Closed { .. } => Some(Message::Text(event.to_json().into())),
            _ => None,
        }
    }
}

/// Omi's pusher protocol on `/v1/trigger/listen`: binary frames of a little-endian u32 opcode and
/// a payload. Malformed frames and unknown opcodes close the session with 1003 and a reason.
pub struct Omi {
    rate: u32,
    conversation_id: Option<String>,
    /// Capture time of the first audio frame and samples received since (at `rate`).
    first_ts: Option<f64>,
    samples_in: u64,
}

/// A late capture timestamp beyond this many seconds counts as a gap (filled, counted).
const OMI_GAP_TOLERANCE: f64 = 0.5;

impl Omi {
    pub fn new(rate: u32) -> Self {
        Self {
            rate,
            conversation_id: None,
            first_ts: None,
            samples_in: 0,
        }
    }

    fn malformed(message: String) -> Action {
        Action::Violation {
            code: CloseCode::Unsupported,
            error: "malformed_frame",
            message,
        }
    }

    fn json(&self, op: u32, event: &str, payload: &[u8]) -> Action {
        match serde_json::from_slice(payload) {
            Ok(v) => self.conversation(event, v),
            Err(e) => Self::malformed(format!("opcode {op}: payload is not JSON: {e}")),
        }
    }

    fn conversation(&self, event: &str, data: serde_json::Value) -> Action {
        Action::Notice(ServerEvent::Conversation {
            event: event.to_owned(),
            conversation_id: self.conversation_id.clone(),
            data,
        })
    }
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
            100 => out.push(Action::Control("KeepAlive")),
            101 => {
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
                let rate = f64::from(self.rate);
                match self.first_ts {
                    None if ts.is_finite() => self.first_ts = Some(ts),
                    Some(first) if ts.is_finite() => {
                        let expected = first + self.samples_in as f64 / rate;
                        let gap = ts - expected;
                        if gap > OMI_GAP_TOLERANCE {
                            let gap_samples = (gap * rate) as u64;
                            self.samples_in += gap_samples;
                            out.push(Action::Silence((gap * 16_000.0) as u64));
                            out.push(Action::Notice(ServerEvent::warning(
                                "media_gap",
                                format!("{gap:.3} s of audio missing before capture time {ts:.3}; filled with silence"),
                            )));
                        }
                    }
                    _ => {}
                }
                self.samples_in += pcm.len() as u64 / 2;
                out.push(Action::Audio(pcm));
            }
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

    fn on_text(&mut self, _text: &str, out: &mut Vec<Action>) {
        out.push(Self::malformed(
            "text frames are not part of this protocol; send binary opcode frames".into(),
        ));
    }

    fn render(&self, event: &ServerEvent) -> Option<Message> {
        match event {
            ServerEvent::Conversation { event, data, .. } if event == "finalize_result" => {
                let mut frame = 201u32.to_le_bytes().to_vec();
                frame.extend_from_slice(data.to_string().as_bytes());
                Some(Message::Binary(frame.into()))
            }
            _ => None,
        }
    }
}
