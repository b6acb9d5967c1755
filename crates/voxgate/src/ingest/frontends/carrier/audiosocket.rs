//! Asterisk AudioSocket (its own TCP listener, see `ingest::audiosocket`): frames of a kind
//! byte, a big-endian u16 payload length and the payload. The call's first frame is its UUID
//! (kind 0x01, 16 bytes); then signed linear 16-bit LE mono audio (0x10 8 kHz, 0x11 12 kHz,
//! 0x12 16 kHz, 0x13 24 kHz, 0x14 32 kHz, 0x15 44.1 kHz, 0x16 48 kHz), DTMF (0x03, one ASCII
//! digit), errors (0xff) and hangup (0x00).
//!
//! Source: docs.asterisk.org "AudioSocket" protocol and github.com/CyCoreSystems/audiosocket
//! (`message.go`: the kind constants and the 3-byte header).

use axum::extract::ws::Message;
use bytes::Bytes;
use voxgate_media::SourceFormat;
use voxgate_session::{ClientControl, CloseCode, ServerEvent};

use super::call::{self, telephony, CallStart};
use super::start::{self, BeforeStart};
use crate::fanout::subscribers::Hub;
use crate::ingest::admission::{self, Admitted};
use crate::ingest::client::{WsSink, WsStream};
use crate::ingest::frontends::{Accept, Action, Frontend};
use crate::ingest::request::{Carrier, ConnectRequest};
use crate::shared::Shared;

pub const KIND_HANGUP: u8 = 0x00;
pub const KIND_UUID: u8 = 0x01;
pub const KIND_DTMF: u8 = 0x03;
pub const KIND_ERROR: u8 = 0xff;
/// Not on the wire: the reader's note that a frame's length was over the cap (the payload is
/// the length, big-endian u32); the call ends.
pub const KIND_TOO_LARGE: u8 = 0xfe;

/// The sample rate of an audio kind.
pub fn audio_rate(kind: u8) -> Option<u32> {
    match kind {
        0x10 => Some(8000),
        0x11 => Some(12_000),
        0x12 => Some(16_000),
        0x13 => Some(24_000),
        0x14 => Some(32_000),
        0x15 => Some(44_100),
        0x16 => Some(48_000),
        _ => None,
    }
}

/// Admits the connection (AudioSocket carries no credentials: the listener's network is the
/// trust boundary, so no token is asked) and waits for the UUID frame.
pub async fn accept(
    shared: &Shared,
    sink: &mut WsSink,
    stream: &mut WsStream,
    req: ConnectRequest,
) -> Accept {
    let admitted = match admit(shared, &req) {
        Ok(a) => a,
        Err(refusal) => return Accept::Refuse(req, refusal),
    };
    let limits = call::start_limits(shared, "UUID frame");
    let call = match start::wait_for_start(shared, sink, stream, &limits, before_uuid).await {
        Ok(Some(call)) => call,
        Ok(None) => return Accept::Done,
        Err(refusal) => return Accept::Refuse(req, refusal),
    };
    let make = |call: &CallStart, admitted| {
        Box::new(AudioSocket::new(call, admitted)) as Box<dyn Frontend>
    };
    call::session_for(shared, req, admitted, call, make)
}

fn admit(
    shared: &Shared,
    req: &ConnectRequest,
) -> Result<Admitted, crate::ingest::refusal::Refusal> {
    admission::open(shared)?;
    admission::rate(shared, req)?;
    Ok(Admitted {
        principal: None,
        permit: admission::permit(shared)?,
    })
}

/// Splits a frame the reader passed on: (kind, payload).
fn frame(data: &[u8]) -> (u8, &[u8]) {
    match data {
        [kind, _, _, payload @ ..] => (*kind, payload),
        _ => (KIND_ERROR, &[]),
    }
}

fn before_uuid(msg: Message, loud: bool) -> (BeforeStart<CallStart>, Option<Message>) {
    let Message::Binary(data) = msg else {
        return (BeforeStart::Left, None);
    };
    match frame(&data) {
        (KIND_UUID, id) if id.len() == 16 => {
            let uuid = uuid::Uuid::from_slice(id).unwrap_or_default().to_string();
            let call = CallStart {
                carrier: Carrier::AudioSocket,
                stream_id: uuid.clone(),
                call_id: uuid.clone(),
                custom: Default::default(),
                encoding: "linear16",
                sample_rate: 8000,
                channels: 1,
                detail: serde_json::json!({ "uuid": uuid }),
            };
            (BeforeStart::Started(Ok(call)), None)
        }
        (KIND_HANGUP | KIND_TOO_LARGE, _) => (BeforeStart::Left, None),
        (kind, _) => {
            let why = format!("frame kind {kind:#04x} before the UUID frame; dropped");
            let w = start::warning("audiosocket", "media_before_start", why, loud);
            (BeforeStart::Wait, Some(w))
        }
    }
}

/// One AudioSocket call after its UUID.
pub struct AudioSocket {
    rate: u32,
    start_detail: Option<serde_json::Value>,
    admitted: Option<Admitted>,
}

impl AudioSocket {
    pub fn new(call: &CallStart, admitted: Admitted) -> Self {
        Self {
            rate: call.sample_rate,
            start_detail: Some(call.detail.clone()),
            admitted: Some(admitted),
        }
    }
}

impl Frontend for AudioSocket {
    fn on_binary(&mut self, data: Bytes, out: &mut Vec<Action>) {
        let (kind, payload) = frame(&data);
        if let Some(rate) = audio_rate(kind) {
            if rate != self.rate {
                self.rate = rate;
                out.push(Action::SetSource(SourceFormat::Linear16 {
                    sample_rate: rate,
                    channels: 1,
                }));
            }
            return out.push(Action::Audio(data.slice(3..)));
        }
        match kind {
            KIND_DTMF => {
                let digit = String::from_utf8_lossy(payload).into_owned();
                out.push(telephony(
                    "dtmf",
                    Some(&serde_json::json!({ "digit": digit })),
                ));
            }
            KIND_HANGUP => {
                out.push(telephony("hangup", None));
                out.push(Action::Control(ClientControl::CloseStream));
            }
            KIND_ERROR => {
                let code = payload.first().copied().unwrap_or_default();
                out.push(telephony(
                    "error",
                    Some(&serde_json::json!({ "code": code })),
                ));
            }
            KIND_TOO_LARGE => out.push(Action::Violation {
                code: CloseCode::TooBig,
                error: "frame_too_large",
                message: format!(
                    "an AudioSocket frame of {} bytes is over carriers.audiosocket_max_frame_bytes",
                    payload.iter().fold(0u32, |n, b| n << 8 | u32::from(*b))
                ),
            }),
            other => {
                let why = format!("unknown AudioSocket frame kind {other:#04x}; ignored");
                out.push(Action::Notice(ServerEvent::warning("unknown_event", why)));
            }
        }
    }

    fn on_text(&mut self, _text: &str, _out: &mut Vec<Action>) {}

    fn take_admission(&mut self) -> Option<Admitted> {
        self.admitted.take()
    }

    fn on_registered(&mut self, hub: &Hub) {
        if let Some(detail) = self.start_detail.take() {
            call::publish_start(hub, Carrier::AudioSocket, detail);
        }
    }

    /// AudioSocket has no text: events reach subscribers, logs and metrics only.
    fn render(&mut self, _event: &ServerEvent, _out: &mut Vec<Message>) {}
}
