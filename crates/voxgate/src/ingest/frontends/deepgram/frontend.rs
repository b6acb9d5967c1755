//! The Deepgram frontend of one connection: audio in as sent, Deepgram's control messages in
//! (`KeepAlive`, `Finalize`, `CloseStream`, and the legacy empty binary message for close),
//! session events out in Deepgram's shapes (`render`).

use axum::extract::ws::Message;
use bytes::Bytes;
use voxgate_session::{ClientControl, ServerEvent};

use super::render::{Options, Renderer};
use crate::ingest::admission::Admitted;
use crate::ingest::frontends::{Action, Frontend};

/// One Deepgram client's protocol state.
pub struct Deepgram {
    renderer: Renderer,
    /// Admitted at the handshake (so refusals were HTTP statuses); taken by `prepare`.
    admitted: Option<Admitted>,
}

impl Deepgram {
    pub fn new(opts: Options, admitted: Admitted) -> Self {
        Self {
            renderer: Renderer::new(opts),
            admitted: Some(admitted),
        }
    }

    pub fn request_id(&self) -> &str {
        self.renderer.request_id()
    }
}

impl Frontend for Deepgram {
    fn on_binary(&mut self, data: Bytes, out: &mut Vec<Action>) {
        // Older Deepgram SDKs close a stream with an empty binary message.
        if data.is_empty() {
            out.push(Action::Control(ClientControl::CloseStream));
        } else {
            out.push(Action::Audio(data));
        }
    }

    fn on_text(&mut self, text: &str, out: &mut Vec<Action>) {
        match ClientControl::parse(text) {
            // Nothing is open to finalize: the final still due answers it, else an empty one
            // at once, so a client waiting for `from_finalize` (Pipecat) is released.
            Ok(ClientControl::Finalize) if !self.renderer.speaking() => {
                if let Some(answer) = self.renderer.finalize_idle() {
                    out.push(Action::Reply(Message::Text(answer.into())));
                }
            }
            Ok(control) => out.push(Action::Control(control)),
            // The session reports a bad control message (counted, logged); Deepgram clients
            // are not shown voxgate's warnings.
            Err(_) => out.push(Action::ControlText(text.to_owned())),
        }
    }

    fn render(&mut self, event: &ServerEvent, out: &mut Vec<Message>) {
        out.extend(
            self.renderer
                .render(event)
                .into_iter()
                .map(|text| Message::Text(text.into())),
        );
    }

    fn render_refusal(&mut self, event: &ServerEvent) -> Message {
        let mut out = self.renderer.render(event);
        Message::Text(out.pop().unwrap_or_default().into())
    }

    fn take_admission(&mut self) -> Option<Admitted> {
        self.admitted.take()
    }
}
