//! The Realtime frontend of one connection: OpenAI client events in (`input_audio_buffer.*`,
//! `session.update`), session events out as OpenAI server events. Each utterance is one
//! conversation item: `speech_started` / `speech_stopped` (server VAD), `committed`, then the
//! transcription's `delta` and `completed` (or `failed` when the backend lost it).

use std::collections::VecDeque;

use axum::extract::ws::Message;
use base64::Engine;
use bytes::Bytes;
use metrics::counter;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::debug;
use voxgate_session::{ClientControl, ServerEvent, UtteranceReason};

use super::settings::{Invalid, Settings};
use crate::ingest::admission::Admitted;
use crate::ingest::frontends::{Action, Frontend};
use crate::metrics as m;
use crate::shared::Shared;

/// Items remembered for their transcripts (a backend answers in order and within its timeout).
const REMEMBERED_ITEMS: usize = 32;

/// One conversation item: an utterance.
#[derive(Debug, Clone)]
struct Item {
    utterance: u64,
    id: String,
    start: f64,
    /// Its transcript (or failure) was sent.
    answered: bool,
    /// `input_audio_buffer.clear` discarded it: nothing more is said about it.
    cleared: bool,
}

/// A client event, as far as voxgate reads it.
#[derive(Deserialize)]
struct ClientEvent {
    #[serde(rename = "type")]
    kind: String,
    event_id: Option<String>,
    audio: Option<String>,
    session: Option<Value>,
}

/// One OpenAI Realtime client's protocol state.
pub struct Realtime {
    pub(super) settings: Settings,
    pub(super) session_id: String,
    /// For the config (`[realtime]`, `[[stt]]`, `[segmenter]`) a `session.update` is read against.
    shared: std::sync::Arc<Shared>,
    admitted: Option<Admitted>,
    /// A first message read while the connection was accepted, fed to the session at start.
    pub(super) pending: Option<String>,
    started: bool,
    next_event: u64,
    items: VecDeque<Item>,
    previous_item: Option<String>,
    /// The open utterance.
    speaking: Option<u64>,
}

impl Realtime {
    pub fn new(shared: std::sync::Arc<Shared>, settings: Settings, admitted: Admitted) -> Self {
        Self {
            settings,
            session_id: format!("sess_{}", uuid::Uuid::new_v4().simple()),
            shared,
            admitted: Some(admitted),
            pending: None,
            started: false,
            next_event: 0,
            items: VecDeque::with_capacity(REMEMBERED_ITEMS),
            previous_item: None,
            speaking: None,
        }
    }

    pub(super) fn event(&mut self, kind: &str, mut body: Value) -> Message {
        self.next_event += 1;
        body["type"] = json!(kind);
        body["event_id"] = json!(format!("event_{}", self.next_event));
        Message::Text(body.to_string().into())
    }

    /// `session.created` / `session.updated`.
    pub(super) fn session_event(&mut self, kind: &str) -> Message {
        let session = self.settings.json(&self.session_id);
        self.event(kind, json!({ "session": session }))
    }

    /// An `error` event for a client event voxgate refuses (counted; the session goes on).
    pub(super) fn client_error(
        &mut self,
        code: &str,
        invalid: Invalid,
        event_id: Option<&str>,
    ) -> Message {
        counter!(m::CLIENT_ERRORS, "code" => code.to_owned()).increment(1);
        debug!(code, message = %invalid.message, "realtime client event refused");
        self.event(
            "error",
            json!({"error": {
                "type": "invalid_request_error",
                "code": code,
                "message": invalid.message,
                "param": invalid.param,
                "event_id": event_id,
            }}),
        )
    }

    fn item_id(&self, utterance: u64) -> String {
        format!("item_{}_{utterance}", &self.session_id[5..13])
    }

    fn item(&mut self, utterance: u64) -> Option<&mut Item> {
        self.items.iter_mut().find(|i| i.utterance == utterance)
    }

    fn on_append(&mut self, audio: Option<String>, event_id: Option<&str>, out: &mut Vec<Action>) {
        let audio = audio.unwrap_or_default();
        let max = self.shared.cfg.realtime.max_append_bytes;
        if audio.len() / 4 * 3 > max {
            let why = Invalid::new(
                "audio",
                format!(
                    "an append of {} decoded bytes is over realtime.max_append_bytes ({max}); \
                     send smaller chunks (this one was dropped)",
                    audio.len() / 4 * 3
                ),
            );
            out.push(Action::Reply(self.client_error(
                "append_too_large",
                why,
                event_id,
            )));
            return;
        }
        match base64::engine::general_purpose::STANDARD.decode(audio.as_bytes()) {
            Ok(pcm) if !pcm.is_empty() => out.push(Action::Audio(Bytes::from(pcm))),
            Ok(_) => {}
            Err(e) => {
                let why = Invalid::new("audio", format!("audio is not base64: {e}"));
                out.push(Action::Reply(self.client_error(
                    "invalid_audio",
                    why,
                    event_id,
                )));
            }
        }
    }

    fn on_update(&mut self, session: Option<Value>, event_id: Option<&str>, out: &mut Vec<Action>) {
        let before = self.settings.clone();
        let shared = self.shared.clone();
        let cfg = &shared.cfg;
        match self
            .settings
            .update(cfg, session.unwrap_or(Value::Null), self.started)
        {
            Ok(()) => {
                if self.settings.format != before.format {
                    out.push(Action::SetSource(self.settings.format.source()));
                }
                if self.settings.turn != before.turn {
                    out.push(Action::SetSegmenter(self.settings.segmenter(cfg)));
                }
                out.push(Action::Reply(self.session_event("session.updated")));
            }
            Err(invalid) => out.push(Action::Reply(self.client_error(
                "invalid_value",
                invalid,
                event_id,
            ))),
        }
    }

    /// `commit` ends the open utterance (its item is then committed); `clear` also discards
    /// it. With nothing open, a commit is refused as OpenAI refuses an empty buffer.
    fn on_commit(&mut self, clear: bool, event_id: Option<&str>, out: &mut Vec<Action>) {
        match self.speaking {
            Some(utterance) => {
                if clear {
                    if let Some(item) = self.item(utterance) {
                        item.cleared = true;
                    }
                }
                out.push(Action::Control(ClientControl::Finalize));
            }
            None if !clear => {
                let why = Invalid::new("", "the input audio buffer holds no speech to commit");
                out.push(Action::Reply(self.client_error(
                    "input_audio_buffer_commit_empty",
                    why,
                    event_id,
                )));
            }
            None => {}
        }
        if clear {
            out.push(Action::Reply(
                self.event("input_audio_buffer.cleared", json!({})),
            ));
        }
    }

    fn speech_started(&mut self, utterance: u64, timestamp: f64, out: &mut Vec<Message>) {
        self.speaking = Some(utterance);
        if self.items.len() == REMEMBERED_ITEMS {
            self.items.pop_front();
        }
        let id = self.item_id(utterance);
        self.items.push_back(Item {
            utterance,
            id: id.clone(),
            start: timestamp,
            answered: false,
            cleared: false,
        });
        if self.settings.turn.is_some() {
            let ms = (timestamp * 1000.0).round() as u64;
            out.push(self.event(
                "input_audio_buffer.speech_started",
                json!({"audio_start_ms": ms, "item_id": id}),
            ));
        }
    }

    fn utterance_end(
        &mut self,
        utterance: u64,
        end: f64,
        reason: UtteranceReason,
        out: &mut Vec<Message>,
    ) {
        self.speaking = None;
        let Some(item) = self.item(utterance).cloned() else {
            return;
        };
        if item.cleared {
            return;
        }
        if self.settings.turn.is_some() && reason != UtteranceReason::Finalize {
            let ms = (end * 1000.0).round() as u64;
            out.push(self.event(
                "input_audio_buffer.speech_stopped",
                json!({"audio_end_ms": ms, "item_id": item.id}),
            ));
        }
        let previous = self.previous_item.replace(item.id.clone());
        out.push(self.event(
            "input_audio_buffer.committed",
            json!({"item_id": item.id, "previous_item_id": previous}),
        ));
        if self.settings.backend.is_none() {
            // No backend serves the session: the item is transcribed as nothing.
            self.completed(utterance, "", end, out);
        }
    }

    fn completed(&mut self, utterance: u64, text: &str, end: f64, out: &mut Vec<Message>) {
        let Some(item) = self.item(utterance) else {
            return;
        };
        if item.answered || item.cleared {
            return;
        }
        item.answered = true;
        let (id, seconds) = (item.id.clone(), (end - item.start).max(0.0));
        let text = text.trim();
        if !text.is_empty() {
            out.push(self.event(
                "conversation.item.input_audio_transcription.delta",
                json!({"item_id": id, "content_index": 0, "delta": text}),
            ));
        }
        out.push(self.event(
            "conversation.item.input_audio_transcription.completed",
            json!({
                "item_id": id, "content_index": 0, "transcript": text,
                "usage": {"type": "duration", "seconds": (seconds * 1000.0).round() / 1000.0},
            }),
        ));
    }

    fn failed(&mut self, lost: &[u64], message: &str, out: &mut Vec<Message>) {
        let ids: Vec<String> = self
            .items
            .iter_mut()
            .filter(|i| lost.contains(&i.utterance) && !i.answered && !i.cleared)
            .map(|i| {
                i.answered = true;
                i.id.clone()
            })
            .collect();
        for id in ids {
            out.push(self.event(
                "conversation.item.input_audio_transcription.failed",
                json!({"item_id": id, "content_index": 0, "error": {
                    "type": "transcription_error", "code": "stt_lost", "message": message,
                }}),
            ));
        }
    }
}

impl Frontend for Realtime {
    fn on_binary(&mut self, _data: Bytes, out: &mut Vec<Action>) {
        let why = Invalid::new(
            "",
            "binary messages are not part of the Realtime API; send input_audio_buffer.append",
        );
        out.push(Action::Reply(self.client_error("invalid_event", why, None)));
    }

    fn on_text(&mut self, text: &str, out: &mut Vec<Action>) {
        let event: ClientEvent = match serde_json::from_str(text) {
            Ok(e) => e,
            Err(e) => {
                let why = Invalid::new("", format!("not a client event: {e}"));
                out.push(Action::Reply(self.client_error("invalid_json", why, None)));
                return;
            }
        };
        let id = event.event_id.as_deref();
        match event.kind.as_str() {
            "input_audio_buffer.append" => self.on_append(event.audio, id, out),
            "input_audio_buffer.commit" => self.on_commit(false, id, out),
            "input_audio_buffer.clear" => self.on_commit(true, id, out),
            "session.update" => self.on_update(event.session, id, out),
            other => {
                let shown: String = other.chars().take(64).collect();
                let why = Invalid::new(
                    "type",
                    format!("event type {shown:?} is not served (a transcription session takes input_audio_buffer.append/commit/clear and session.update)"),
                );
                out.push(Action::Reply(self.client_error("unknown_event", why, id)));
            }
        }
    }

    fn render(&mut self, event: &ServerEvent, out: &mut Vec<Message>) {
        match event {
            ServerEvent::SpeechStarted {
                utterance,
                timestamp,
                ..
            } => {
                self.speech_started(*utterance, *timestamp, out);
            }
            ServerEvent::UtteranceEnd {
                utterance,
                end,
                reason,
                ..
            } => self.utterance_end(*utterance, *end, *reason, out),
            ServerEvent::Transcript {
                utterance,
                text,
                is_final: true,
                backend,
                end,
                ..
            } if self.settings.backend.as_deref() == Some(backend) => {
                self.completed(*utterance, text, *end, out);
            }
            ServerEvent::Warning { code, message } if code == "stt_lost" => {
                self.failed(
                    &crate::fanout::stt::lost::lost_utterances(message),
                    message,
                    out,
                );
            }
            ServerEvent::Error { code, message } => {
                let body = json!({"error": {"type": "server_error", "code": code, "message": message, "param": null, "event_id": null}});
                out.push(self.event("error", body));
            }
            _ => {}
        }
    }

    fn render_refusal(&mut self, event: &ServerEvent) -> Message {
        let mut out = Vec::new();
        self.render(event, &mut out);
        out.pop()
            .unwrap_or_else(|| Message::Text(event.to_json().into()))
    }

    fn on_start(&mut self, out: &mut Vec<Action>) {
        self.started = true;
        if let Some(first) = self.pending.take() {
            self.on_text(&first, out);
        }
    }

    fn take_admission(&mut self) -> Option<Admitted> {
        self.admitted.take()
    }
}
