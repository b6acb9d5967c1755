//! The carriers that describe a call in JSON, then send binary 16-bit linear PCM (little
//! endian): Vonage (`websocket:connected` with `content-type: audio/l16;rate=N`), jambonz
//! `listen` (subprotocol `audio.jambonz.org`, a metadata message with `sampleRate` and
//! `mixType`) and FreeSWITCH `mod_audio_fork` (subprotocol `audio.drachtio.org`; its rate and
//! channels are the fork command's, given in the URL as `sample_rate`/`channels`, its optional
//! metadata message is forwarded), and Sinch (a `connect` request, answered with
//! `{"command":"answer"}`, or `busy`/`reject` when the call is refused). A stereo stream (jambonz `mixType: stereo`, an audio fork
//! with `channels=2`) is interleaved caller/callee: the session keeps each party apart besides
//! the mix (`carriers.max_parties`, `voxgate_session::Party`).
//!
//! Sources: developer.vonage.com/voice/voice-api/concepts/websockets; docs.jambonz.org
//! (verbs/listen: "audio.jambonz.org", the initial JSON text frame, L16 binary frames);
//! github.com/drachtio/drachtio-freeswitch-modules `mod_audio_fork` README (subprotocol
//! "audio.drachtio.org", `uuid_audio_fork <uuid> start <url> <mix-type> <rate> <metadata>`);
//! developers.sinch.com voice-2.0 api-reference stream (ConnectRequest `{command:"connect",
//! version, callId, applicationKey, codec:"PCM", sampleRate, callHeaders{}}`, ConnectResponse
//! `{command: answer|busy|reject}`, then binary 16-bit LE mono PCM frames).

use axum::extract::ws::Message;
use bytes::Bytes;
use voxgate_session::{ClientControl, CloseCode, ServerEvent};

use super::call::{self, telephony, CallStart};
use super::start::{self, BeforeStart};
use crate::fanout::subscribers::Hub;
use crate::ingest::admission::Admitted;
use crate::ingest::client::{WsSink, WsStream};
use crate::ingest::frontends::{Accept, Action, Frontend};
use crate::ingest::refusal::{Refusal, RefuseReason};
use crate::ingest::request::{Carrier, ConnectRequest};
use crate::shared::Shared;

/// The subprotocol a carrier offers (and voxgate echoes), if any.
pub fn subprotocol(carrier: Carrier) -> Option<&'static str> {
    match carrier {
        Carrier::Jambonz => Some("audio.jambonz.org"),
        Carrier::AudioFork => Some("audio.drachtio.org"),
        // `websocket_client.conf` `protocols = media`, when the client is configured so.
        Carrier::Asterisk => Some("media"),
        _ => None,
    }
}

/// Admits the connection; Vonage and jambonz describe the call in their first text message
/// (waited for), an audio fork in its URL.
pub async fn accept(
    shared: &Shared,
    sink: &mut WsSink,
    stream: &mut WsStream,
    req: ConnectRequest,
    carrier: Carrier,
) -> Accept {
    let admitted = match start::admit_connect(shared, &req) {
        Ok(a) => a,
        Err(refusal) => return Accept::Refuse(req, refusal),
    };
    let call = if carrier == Carrier::AudioFork {
        match fork_call(&req) {
            Ok(call) => call,
            Err(why) => return refuse_format(req, why),
        }
    } else {
        let what = match carrier {
            Carrier::Vonage => "websocket:connected message",
            Carrier::Sinch => "connect request",
            Carrier::Asterisk => "MEDIA_START event",
            _ => "metadata message",
        };
        let limits = call::start_limits(shared, what);
        let step = |msg, loud| before_start(carrier, msg, loud);
        match start::wait_for_start(shared, sink, stream, &limits, step).await {
            Ok(Some(call)) => call,
            Ok(None) => return Accept::Done,
            Err(refusal) => {
                let refused = Accept::Refuse(req, refusal);
                return answer_sinch(carrier, sink, refused).await;
            }
        }
    };
    let make =
        |call: &CallStart, admitted| Box::new(L16Carrier::new(call, admitted)) as Box<dyn Frontend>;
    let accepted = call::session_for(shared, req, admitted, call, make);
    answer_sinch(carrier, sink, accepted).await
}

/// Sinch waits for a reply to its connect request: `answer` for a session, `busy` when voxgate
/// is over capacity or draining (try again later), `reject` for any other refusal (which then
/// closes as every carrier's does).
async fn answer_sinch(carrier: Carrier, sink: &mut WsSink, accept: Accept) -> Accept {
    use futures_util::SinkExt;
    if carrier != Carrier::Sinch {
        return accept;
    }
    let command = match &accept {
        Accept::Session(..) => "answer",
        Accept::Refuse(_, r) if r.reason.close_code() == CloseCode::TryAgainLater => "busy",
        Accept::Refuse(..) => "reject",
        Accept::Done => return accept,
    };
    let reply = serde_json::json!({ "command": command }).to_string();
    // A peer that cannot take the reply has gone: the close that follows tells the same.
    let _ = sink.send(Message::Text(reply.into())).await;
    accept
}

fn refuse_format(req: ConnectRequest, why: String) -> Accept {
    Accept::Refuse(req, Refusal::new(RefuseReason::UnsupportedFormat, why))
}

/// An audio fork's format from its URL (`sample_rate`, default 8000; `channels`, default 1).
fn fork_call(req: &ConnectRequest) -> Result<CallStart, String> {
    let get = |k: &str, d: u32| -> Result<u32, String> {
        req.raw_query.get(k).map_or(Ok(d), |v| {
            v.parse().map_err(|_| format!("{k}={v:?} is not a number"))
        })
    };
    let (rate, channels) = (get("sample_rate", 8000)?, get("channels", 1)?);
    check_format(Carrier::AudioFork, rate, channels)?;
    Ok(CallStart {
        carrier: Carrier::AudioFork,
        stream_id: String::new(),
        call_id: String::new(),
        custom: Default::default(),
        encoding: "linear16",
        sample_rate: rate,
        channels: channels as u8,
        detail: serde_json::json!({}),
    })
}

fn check_format(carrier: Carrier, rate: u32, channels: u32) -> Result<(), String> {
    if (8000..=48_000).contains(&rate) && (1..=2).contains(&channels) {
        return Ok(());
    }
    Err(format!(
        "unsupported {} audio: L16 {rate} Hz {channels} ch (8000-48000 Hz, mono or stereo)",
        carrier.as_str()
    ))
}

/// Handles one message before the call description.
fn before_start(
    carrier: Carrier,
    msg: Message,
    loud: bool,
) -> (BeforeStart<CallStart>, Option<Message>) {
    let name = carrier.as_str();
    let text = match msg {
        Message::Text(t) => t,
        Message::Close(_) => return (BeforeStart::Left, None),
        Message::Binary(_) => {
            let why = "audio before the call description; dropped".to_owned();
            let w = start::warning(name, "media_before_start", why, loud);
            return (BeforeStart::Wait, Some(w));
        }
        _ => return (BeforeStart::Wait, None),
    };
    let parsed = parse_control(carrier, text.as_str()).and_then(|v| match carrier {
        Carrier::Asterisk => super::asterisk_ws::describe(v),
        _ => parse_description(carrier, v),
    });
    match parsed {
        Ok(Some(call)) => (BeforeStart::Started(call), None),
        Ok(None) => (BeforeStart::Wait, None),
        Err(why) => (
            BeforeStart::Wait,
            Some(start::warning(name, "bad_message", why, loud)),
        ),
    }
}

/// A Vonage `websocket:connected` or a jambonz metadata message; `Ok(None)` for another
/// message, `Ok(Some(Err))` for a format voxgate cannot take.
fn parse_description(
    carrier: Carrier,
    v: serde_json::Value,
) -> Result<Option<Result<CallStart, Refusal>>, String> {
    let mut custom = call::string_map(&v);
    let (rate, channels, stream_id, call_id) = match carrier {
        Carrier::Vonage => {
            if v["event"] != "websocket:connected" {
                return Ok(None);
            }
            let ctype = v["content-type"].as_str().unwrap_or_default();
            let rate = ctype
                .split(';')
                .find_map(|p| p.trim().strip_prefix("rate="))
                .and_then(|r| r.parse().ok());
            if !ctype.starts_with("audio/l16") || rate.is_none() {
                let why = format!("content-type {ctype:?} is not audio/l16;rate=N");
                return Ok(Some(Err(Refusal::new(
                    RefuseReason::UnsupportedFormat,
                    why,
                ))));
            }
            (
                rate.unwrap_or(0),
                1,
                text(&v, "uuid"),
                text(&v, "conversation_uuid"),
            )
        }
        Carrier::Sinch => {
            if v["command"] != "connect" {
                return Ok(None);
            }
            let codec = v["codec"].as_str().unwrap_or_default();
            let Some(rate) = v["sampleRate"].as_u64().filter(|_| codec == "PCM") else {
                let why = format!(
                    "codec {codec:?} at sampleRate {} is not PCM",
                    v["sampleRate"]
                );
                return Ok(Some(Err(Refusal::new(
                    RefuseReason::UnsupportedFormat,
                    why,
                ))));
            };
            // Custom data comes as call headers (`token`, `consumers`, ...).
            custom = call::string_map(&v["callHeaders"]);
            let app = text(&v, "applicationKey");
            (rate as u32, 1, text(&v, "callId"), app)
        }
        _ => {
            let Some(rate) = v["sampleRate"].as_u64() else {
                return Err("jambonz metadata without sampleRate".into());
            };
            let channels = if v["mixType"] == "stereo" { 2 } else { 1 };
            (
                rate as u32,
                channels,
                text(&v, "callSid"),
                text(&v, "callId"),
            )
        }
    };
    if let Err(why) = check_format(carrier, rate, channels) {
        return Ok(Some(Err(Refusal::new(
            RefuseReason::UnsupportedFormat,
            why,
        ))));
    }
    Ok(Some(Ok(CallStart {
        carrier,
        stream_id,
        call_id,
        custom,
        encoding: "linear16",
        sample_rate: rate,
        channels: channels as u8,
        detail: v,
    })))
}

/// A control message as JSON (Asterisk's may be plain text).
fn parse_control(carrier: Carrier, text: &str) -> Result<serde_json::Value, String> {
    match carrier {
        Carrier::Asterisk => super::asterisk_ws::control(text),
        _ => serde_json::from_str(text).map_err(|e| format!("not JSON: {e}; ignored")),
    }
}

fn text(v: &serde_json::Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_owned()
}

/// A call of binary L16 frames with JSON control messages between them.
pub struct L16Carrier {
    carrier: Carrier,
    start_detail: Option<serde_json::Value>,
    admitted: Option<Admitted>,
}

impl L16Carrier {
    pub fn new(call: &CallStart, admitted: Admitted) -> Self {
        Self {
            carrier: call.carrier,
            start_detail: Some(call.detail.clone()),
            admitted: Some(admitted),
        }
    }
}

/// The telephony event a control message names, in voxgate's words (`dtmf`, `clear`, ...).
fn control_event(carrier: Carrier, v: &serde_json::Value) -> Option<String> {
    // Sinch names its control messages by `command`.
    let event = v["event"]
        .as_str()
        .or(v["type"].as_str())
        .or(v["command"].as_str())?;
    match carrier {
        Carrier::Vonage => event.strip_prefix("websocket:").map(str::to_owned),
        _ => Some(event.to_owned()),
    }
}

impl Frontend for L16Carrier {
    fn on_binary(&mut self, data: Bytes, out: &mut Vec<Action>) {
        out.push(Action::Audio(data));
    }

    fn on_text(&mut self, text: &str, out: &mut Vec<Action>) {
        let v = match parse_control(self.carrier, text) {
            Ok(v) => v,
            Err(why) => {
                return out.push(Action::Notice(ServerEvent::warning("bad_message", why)));
            }
        };
        match control_event(self.carrier, &v) {
            Some(event) if event == "stop" || event == "hangup" => {
                out.push(telephony(&event, Some(&v)));
                out.push(Action::Control(ClientControl::CloseStream));
            }
            Some(event) => out.push(telephony(&event, Some(&v))),
            // An audio fork's metadata (any JSON) is for subscribers.
            None if self.carrier == Carrier::AudioFork => out.push(telephony("metadata", Some(&v))),
            None => {
                let why = "a control message without an event; ignored";
                out.push(Action::Notice(ServerEvent::warning("unknown_event", why)));
            }
        }
    }

    fn take_admission(&mut self) -> Option<Admitted> {
        self.admitted.take()
    }

    fn on_registered(&mut self, hub: &Hub) {
        if let Some(detail) = self.start_detail.take() {
            call::publish_start(hub, self.carrier, detail);
        }
    }

    fn render(&mut self, event: &ServerEvent, out: &mut Vec<Message>) {
        // These carriers ignore text they do not know; problems and the summary are sent for
        // simulators and logs, the rest goes to subscribers.
        if let ServerEvent::Warning { .. }
        | ServerEvent::Error { .. }
        | ServerEvent::Closed { .. } = event
        {
            out.push(Message::Text(event.to_json().into()));
        }
    }
}
