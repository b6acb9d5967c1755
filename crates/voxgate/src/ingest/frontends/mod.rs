//! Wire protocols in front of the session, one adapter per file. Each adapter's `accept` turns an
//! upgraded socket into a typed `ConnectRequest` (or refuses it) and gives a `Frontend` that turns
//! socket messages into session actions and renders session events for its client. The ingest
//! core (admission, plan, driver) never knows which frontend it serves.

pub mod carrier;
pub mod deepgram;
pub mod listen;
pub mod omi;
mod omi_consumers;
mod omi_v2;
pub mod realtime;
pub mod twilio;

use std::sync::Arc;

use axum::extract::ws::Message;
use bytes::Bytes;
use metrics::counter;
use voxgate_session::{ClientControl, CloseCode, Input, ServerEvent, Session, SessionError};

use super::admission::Admitted;
use super::hook::HookAnswer;
use super::refusal::Refusal;
use super::request::ConnectRequest;
use crate::config::{Config, WebhookConfig};
use crate::fanout::registry::BuildCtx;
use crate::fanout::subscribers::Hub;
use crate::fanout::Consumer;
use crate::metrics as m;

/// What a frontend made of an upgraded socket.
pub enum Accept {
    /// A session to prepare with this frontend.
    Session(ConnectRequest, Box<dyn Frontend>),
    /// Refused before the session (told to the client).
    Refuse(ConnectRequest, Refusal),
    /// The client left before asking for a session.
    Done,
}

/// What a socket message means for the session.
#[derive(Debug)]
pub enum Action {
    /// Audio bytes in the session's source format.
    Audio(Bytes),
    /// A control message the frontend already understood.
    Control(ClientControl),
    /// A text control message as received (parsed by the session, which reports bad ones).
    ControlText(String),
    /// 16 kHz samples known to be missing (filled with silence, counted).
    Silence(u64),
    /// An event for the consumers, the client (if its protocol shows events) and subscribers.
    Notice(ServerEvent),
    /// A message for the client alone, in its protocol (an answer to a control message).
    Reply(Message),
    /// The client's audio format from now on (a protocol that sets it mid-connection).
    SetSource(voxgate_media::SourceFormat),
    /// The segmenter's thresholds from now on (a protocol whose client tunes turn detection).
    SetSegmenter(voxgate_session::SegmenterConfig),
    /// The message breaks the protocol: tell the client, flush, close with `code`.
    Violation {
        code: CloseCode,
        error: &'static str,
        message: String,
    },
}

/// A wire protocol. The per-message methods are synchronous and never block; the plan hooks are
/// called once while the connection is prepared.
pub trait Frontend: Send + Sync {
    fn on_binary(&mut self, data: Bytes, out: &mut Vec<Action>);
    fn on_text(&mut self, text: &str, out: &mut Vec<Action>);
    /// How a session event reaches this protocol's client: the messages it becomes, in order
    /// (none when the protocol does not show it).
    fn render(&mut self, event: &ServerEvent, out: &mut Vec<Message>);
    /// The message that tells this protocol's client why its connection is refused (voxgate's
    /// `Error` event unless the protocol has its own shape).
    fn render_refusal(&mut self, event: &ServerEvent) -> Message {
        Message::Text(event.to_json().into())
    }

    /// The session starts: actions the protocol's handshake left for it (a first message read
    /// while the connection was accepted).
    fn on_start(&mut self, _out: &mut Vec<Action>) {}

    /// Whether a client of this protocol can park and resume its session (`resumable=true`).
    fn supports_resume(&self) -> bool {
        false
    }
    /// Audio webhooks this protocol takes from the `on_connect` hook's answer, besides its
    /// `webhooks` (subject to the token's consumer list like them).
    fn hook_webhooks(&mut self, _answer: &HookAnswer, _cfg: &Config) -> Vec<Arc<WebhookConfig>> {
        Vec::new()
    }
    /// Audio webhooks this protocol adds from config when there is no `on_connect` hook.
    fn config_webhooks(&self, _cfg: &Config) -> Vec<Arc<WebhookConfig>> {
        Vec::new()
    }
    /// Consumers of this protocol's own events, built after the audio webhooks and before
    /// speech-to-text.
    fn extra_consumers(&mut self, _ctx: &BuildCtx<'_>) -> Vec<Box<dyn Consumer>> {
        Vec::new()
    }
    /// The session is registered (its subscribers may join from now on).
    fn on_registered(&mut self, _hub: &Hub) {}
    /// An admission the frontend made before its session was asked for (Twilio admits at
    /// connect, before `start`); `None`: `prepare` admits.
    fn take_admission(&mut self) -> Option<Admitted> {
        None
    }
    /// The session's owner (the token's user; empty without tokens), id and uid, before its
    /// consumers are built.
    fn on_session(&mut self, _owner: &str, _target: &crate::fanout::contract::Target) {}
    /// Set before the session's first audio when it continues another session's recording.
    fn recording_continuation(&self) -> Option<crate::fanout::recorder::Continuation> {
        None
    }
}

/// Applies an `Action::Silence`: the session fills what its budget allows; the samples actually
/// inserted are counted in `voxgate_gap_samples_total`, the rest in
/// `voxgate_gap_dropped_samples_total`.
pub fn fill_gap(
    session: &mut Session,
    now: std::time::Instant,
    samples: u64,
) -> Result<(), SessionError> {
    let (filled, dropped) = (
        session.stats().gap_samples,
        session.stats().gap_dropped_samples,
    );
    let result = session.handle_input(Input::Silence { now, samples });
    let stats = session.stats();
    counter!(m::GAP_SAMPLES).increment(stats.gap_samples - filled);
    counter!(m::GAP_DROPPED_SAMPLES).increment(stats.gap_dropped_samples - dropped);
    result
}
