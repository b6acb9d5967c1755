//! `Connection`: one live connection, its session, consumers and client, driven by a short loop.
//!
//! The loop follows one rule (str0m's): after every input, drain the session's outputs
//! completely before waiting for the next wake. Methods come in this order:
//! - `on_*`: one per kind of wake; they feed the session or queue frontend actions and never
//!   wait for a consumer (the only await is handing a resumed socket to the client writer);
//! - `drain_outputs`: fans the session's outputs out to the consumers, the subscribers and the
//!   client, until the session has nothing left or has closed;
//! - `close`: the only long await: flushes consumers in order, sends `Closed`, says goodbye.

use std::sync::Arc;

use axum::extract::ws::Message;
use bytes::Bytes;
use futures_util::StreamExt;
use metrics::{counter, gauge};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::{info, warn};
use voxgate_session::{CloseCode, CloseSummary, Input, Output, ServerEvent, Session, SessionError};

use super::client::ClientIo;
use super::frontends::{Action, Frontend};
use super::handoff::HandoffState;
use super::log_budget::LogBudget;
use super::pacing::{Flood, Pacer};
use super::request::Endpoint;
use super::resume::{Reattach, ResumeCursor, ResumeFrom, ResumeSlot};
use crate::auth::UserSlot;
use crate::fanout::registry::{Consumers, Finished};
use crate::fanout::subscribers::Hub;
use crate::fanout::{Notice, NoticeRx};
use crate::metrics as m;
use crate::sessions::{ResumableEntry, SessionEntry};
use crate::shared::Shared;

/// What a connection holds only while it lives: released in `close` at fixed points (the id when
/// the session is over for subscribers, the resume slot when the loop ends, the permit and user
/// slot last).
pub struct Guards {
    pub session: SessionEntry,
    pub resumable: Option<ResumableEntry>,
    pub user_slot: Option<UserSlot>,
    pub permit: OwnedSemaphorePermit,
}

/// One live connection.
pub struct Connection {
    shared: Arc<Shared>,
    id: String,
    endpoint: Endpoint,
    session: Session,
    frontend: Box<dyn Frontend>,
    consumers: Consumers,
    client: ClientIo,
    /// What consumers send back (transcripts, backend trouble, close requests), bounded.
    notices: NoticeRx,
    resume: Option<ResumeSlot>,
    cursor: ResumeCursor,
    /// Read budget (messages and bytes per second): the socket is not read while it is spent.
    pacer: Pacer,
    /// Client-caused warnings: a few per interval at warn, the rest at debug.
    logs: LogBudget,
    meter: Meter,
    /// Frontend actions of the current wake (kept to reuse the allocation).
    actions: Vec<Action>,
    /// Rendered client messages (kept to reuse the allocation).
    rendered: Vec<Message>,
    guards: Guards,
}

/// Everything `prepare` built for a connection.
pub struct Parts {
    pub session: Session,
    pub consumers: Consumers,
    pub notices: NoticeRx,
    pub resume: Option<ResumeSlot>,
    pub guards: Guards,
}

/// Decoded audio counted into `voxgate_audio_seconds_total`, by detected format.
#[derive(Default)]
struct Meter {
    format: &'static str,
    counted: u64,
}

impl Meter {
    fn count(&mut self, decoded: u64) {
        if decoded > self.counted {
            m::add_audio_samples(self.format, decoded - self.counted);
            self.counted = decoded;
        }
    }
}

/// What woke the connection.
enum Wake {
    Binary(Bytes),
    Text(String),
    Gone,
    Broken(axum::Error),
    /// A Ping or Pong frame (answered by the socket layer) of this many payload bytes.
    Control(usize),
    /// The read budget refilled after the connection was paced.
    Paced,
    Timeout,
    Shutdown,
    Notice(Notice),
    Reattach(Box<Reattach>),
    /// A sustained flood of tiny messages (see `pacing`).
    Flood(Flood),
}

impl Wake {
    fn from_message(msg: Option<Result<Message, axum::Error>>) -> Self {
        match msg {
            Some(Ok(Message::Binary(data))) => Self::Binary(data),
            Some(Ok(Message::Text(text))) => Self::Text(text.as_str().to_owned()),
            Some(Ok(Message::Ping(p) | Message::Pong(p))) => Self::Control(p.len()),
            Some(Ok(Message::Close(_))) | None => Self::Gone,
            Some(Err(e)) => Self::Broken(e),
        }
    }
}

/// The clock of the connection (tokio's, so paused-time tests see the same time).
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

impl Connection {
    pub fn new(
        shared: Arc<Shared>,
        endpoint: Endpoint,
        client: ClientIo,
        parts: Parts,
        frontend: Box<dyn Frontend>,
    ) -> Self {
        let pacer = Pacer::new(&shared.cfg.server, now());
        Self {
            id: parts.session.id().to_owned(),
            endpoint,
            session: parts.session,
            frontend,
            consumers: parts.consumers,
            client,
            notices: parts.notices,
            resume: parts.resume,
            cursor: ResumeCursor::default(),
            pacer,
            logs: LogBudget::new(now()),
            meter: Meter::default(),
            actions: Vec::new(),
            rendered: Vec::new(),
            guards: parts.guards,
            shared,
        }
    }

    /// Runs the session from start to close.
    pub async fn run(mut self) {
        self.start();
        self.frontend.on_start(&mut self.actions);
        self.apply_actions();
        let (code, reason, summary) = loop {
            if let Some(close) = self.drain_outputs() {
                break close;
            }
            if self.client.slow && !self.session.is_closed() {
                self.on_client_slow();
                continue;
            }
            let wake = self.next_wake().await;
            self.on_wake(wake).await;
            self.apply_actions();
        };
        self.close(code, reason, summary).await;
    }

    fn start(&mut self) {
        let endpoint = self.endpoint.as_str();
        gauge!(m::SESSIONS_ACTIVE).increment(1.0);
        counter!(m::SESSIONS_TOTAL, "endpoint" => endpoint).increment(1);
        info!(session = %self.id, endpoint, consumers = self.consumers.len(), "session started");
        self.session.start(now());
        if let Some(r) = &self.resume {
            let event = ServerEvent::Resumable {
                session_id: self.id.clone(),
                resume_token: r.token.clone(),
                grace_seconds: r.grace.as_secs_f64(),
            };
            // The client queue (capacity >= 1) is empty before the first event.
            self.frontend.render(&event, &mut self.rendered);
            for msg in self.rendered.drain(..) {
                self.client.send(msg);
            }
        }
    }

    /// Fans out every pending output; returns the close once the session has closed.
    fn drain_outputs(&mut self) -> Option<(CloseCode, String, CloseSummary)> {
        while let Some(out) = self.session.poll_output() {
            match out {
                Output::Event(event) => {
                    if let ServerEvent::Started { format, .. } = &event {
                        self.meter.format = self.session.format().map(|f| f.name()).unwrap_or("");
                        info!(session = %self.id, format = %format, "format detected");
                    }
                    self.consumers.on_event(&event);
                    self.dispatch(&event);
                }
                Output::Audio(chunk) => {
                    let mut dropping = Vec::new();
                    self.consumers
                        .on_audio(&chunk, |name| dropping.push(name.to_owned()));
                    for name in dropping {
                        self.dispatch(&ServerEvent::warning(
                            "consumer_dropping",
                            format!("consumer {name:?} is not keeping up; audio is being dropped"),
                        ));
                    }
                }
                Output::Close {
                    code,
                    reason,
                    summary,
                } => return Some((code, reason, summary)),
            }
        }
        // Decoded audio is counted whether or not any consumer takes it.
        self.meter.count(self.session.stats().samples);
        None
    }

    /// An event for the subscribers and, in its protocol's form, the client.
    fn dispatch(&mut self, event: &ServerEvent) {
        self.logs.event(now(), &self.id, event);
        dispatch(
            self.consumers.hub(),
            &mut *self.frontend,
            &mut self.client,
            event,
            &mut self.rendered,
        );
    }

    /// The writer queue is full: stop writing to the client, but flush the consumers.
    fn on_client_slow(&mut self) {
        self.client.slow = false;
        self.client.gone = true;
        warn!(session = %self.id, "client is not reading its events; closing");
        let result = self.violate(
            CloseCode::Policy,
            "client_too_slow",
            "client did not read its events; closing",
        );
        self.refused(result);
    }

    async fn next_wake(&mut self) -> Wake {
        let deadline = self.session.poll_timeout();
        let shutdown = &self.shared.shutdown;
        // While the read budget is spent the socket is not read: TCP pushes back on the client.
        let paced = self.pacer.ready_at(now());
        if let Some((_, budget)) = paced {
            counter!(m::PACED, "budget" => budget.as_str()).increment(1);
        }
        // Biased: input already waiting is read before an idle deadline can fire (an overloaded
        // server must not mistake its own lag for an idle client).
        let wake = tokio::select! {
            biased;
            () = shutdown.cancelled() => Wake::Shutdown,
            Some(event) = self.notices.recv() => Wake::Notice(event),
            Some(socket) = ResumeSlot::recv(&mut self.resume) => Wake::Reattach(Box::new(socket)),
            msg = self.client.stream.next(), if paced.is_none() => Wake::from_message(msg),
            () = sleep_until_opt(paced.map(|(at, _)| at)), if paced.is_some() => Wake::Paced,
            () = sleep_until_opt(deadline) => Wake::Timeout,
        };
        let wake = self.await_resume(wake).await;
        self.charge(wake)
    }

    /// A resumable session waits for its client instead of closing when the socket drops.
    async fn await_resume(&mut self, wake: Wake) -> Wake {
        let shutdown = &self.shared.shutdown;
        let (Wake::Gone | Wake::Broken(_), Some(r), false) =
            (&wake, self.resume.as_mut(), shutdown.is_cancelled())
        else {
            return wake;
        };
        info!(session = %self.id, grace = ?r.grace, "client disconnected; waiting for a resume");
        tokio::select! {
            Some(socket) = r.rx.recv() => Wake::Reattach(Box::new(socket)),
            () = tokio::time::sleep(r.grace) => Wake::Gone,
            () = shutdown.cancelled() => Wake::Shutdown,
        }
    }

    /// Charges what was read to the read budget (data messages and Ping/Pong frames alike).
    fn charge(&mut self, wake: Wake) -> Wake {
        let len = match &wake {
            Wake::Binary(data) => data.len(),
            Wake::Text(text) => text.len(),
            Wake::Control(len) => *len,
            _ => return wake,
        };
        match self.pacer.charge(len, now()) {
            Ok(()) => wake,
            Err(flood) => {
                counter!(m::SESSIONS_REJECTED, "reason" => "message_flood").increment(1);
                Wake::Flood(flood)
            }
        }
    }

    async fn on_wake(&mut self, wake: Wake) {
        let result = match wake {
            Wake::Flood(flood) => self.on_flood(flood),
            Wake::Binary(data) => {
                self.on_binary(data);
                Ok(())
            }
            Wake::Text(text) => {
                self.frontend.on_text(&text, &mut self.actions);
                Ok(())
            }
            Wake::Control(_) | Wake::Paced => Ok(()),
            Wake::Gone => {
                self.client.gone = true;
                self.session.handle_input(Input::PeerClosed)
            }
            Wake::Broken(e) => self.on_broken(e),
            Wake::Timeout => self.session.handle_input(Input::Timeout { now: now() }),
            Wake::Shutdown => self.session.handle_input(Input::Shutdown),
            Wake::Notice(event) => self.on_notice(event),
            Wake::Reattach(reattach) => {
                self.on_reattach(*reattach).await;
                Ok(())
            }
        };
        self.refused(result);
    }

    fn refused(&mut self, result: Result<(), SessionError>) {
        if let Err(e) = result {
            let detail = e.to_string();
            self.logs
                .warn(now(), &self.id, "session input refused", "refused", &detail);
        }
    }

    /// Tells the client `error`, flushes what was received, and closes with `code`.
    fn violate(&mut self, code: CloseCode, error: &str, message: &str) -> Result<(), SessionError> {
        self.session.handle_input(Input::Violation {
            code,
            error,
            message,
        })
    }

    fn on_flood(&mut self, flood: Flood) -> Result<(), SessionError> {
        let server = &self.shared.cfg.server;
        let message = format!(
            "a flood of tiny messages: {} bytes on average at more than {} messages per second \
             (server.flood_min_message_bytes = {})",
            flood.average_bytes, server.max_messages_per_second, server.flood_min_message_bytes
        );
        self.violate(CloseCode::Policy, "message_flood", &message)
    }

    fn on_binary(&mut self, mut data: Bytes) {
        counter!(m::BYTES_IN).increment(data.len() as u64);
        // Exact duplicates of what was received before a reconnect.
        let dup = self.cursor.duplicates(data.len());
        if dup > 0 {
            counter!(m::RESUME_DUPLICATES).increment(dup as u64);
            data = data.slice(dup..);
            if data.is_empty() {
                return;
            }
        }
        if self.cursor.restarts_recorder(&data) && self.session.format().is_some() {
            info!(session = %self.id, "resumed client restarted its recorder; decoding afresh");
            if let Err(e) = self.session.restart_stream() {
                warn!(session = %self.id, error = %e, "could not restart the decoder");
            }
        }
        self.frontend.on_binary(data, &mut self.actions);
    }

    fn on_broken(&mut self, e: axum::Error) -> Result<(), SessionError> {
        let (code, error, message) = match ws_error(e) {
            WsError::TooBig => (
                CloseCode::TooBig,
                "message_too_large",
                format!(
                    "message larger than server.max_message_bytes ({} bytes)",
                    self.shared.cfg.server.max_message_bytes
                ),
            ),
            WsError::Protocol(text) => (
                CloseCode::Policy,
                "protocol_error",
                format!("WebSocket protocol error: {text}"),
            ),
        };
        self.violate(code, error, &message)
    }

    fn on_notice(&mut self, notice: Notice) -> Result<(), SessionError> {
        match notice {
            Notice::Event(event) => {
                self.actions.push(Action::Notice(event));
                Ok(())
            }
            // e.g. the bus consumer's buffer overflowed: close with 1013 so the client retries.
            Notice::Close {
                code,
                error,
                message,
            } => self.violate(code, error, &message),
        }
    }

    async fn on_reattach(&mut self, (socket, from): Reattach) {
        let have = self.session.bytes_in();
        if let ResumeFrom::Gap(missing) = self.cursor.resumed(from, have) {
            self.actions.push(Action::Notice(ServerEvent::warning(
                "resume_gap",
                format!(
                    "resume_from {} is past the {have} bytes received; {missing} bytes are missing",
                    have + missing
                ),
            )));
        }
        if !self.client.reattach(socket).await {
            warn!(session = %self.id, "client writer ended; the resumed socket gets no events");
        }
        counter!(m::SESSIONS_TOTAL, "endpoint" => "resume").increment(1);
        info!(session = %self.id, bytes = have, "session resumed");
        self.actions.push(Action::Notice(ServerEvent::Resumed {
            session_id: self.id.clone(),
            bytes: have,
            samples: self.session.stats().samples,
        }));
    }

    /// Applies the frontend's actions of this wake to the session.
    fn apply_actions(&mut self) {
        if self.actions.is_empty() {
            return;
        }
        // A subscriber that wants audio may have joined since the last message.
        self.session.set_wants_audio(self.consumers.wants_audio());
        let mut actions = std::mem::take(&mut self.actions);
        for action in actions.drain(..) {
            if self.session.is_closed() {
                break;
            }
            let result = self.apply(action);
            self.refused(result);
        }
        self.actions = actions;
    }

    fn apply(&mut self, action: Action) -> Result<(), SessionError> {
        let now = now();
        match action {
            Action::Audio(data) => self.session.handle_input(Input::Audio { now, data: &data }),
            Action::Control(control) => self.session.handle_input(Input::Control { now, control }),
            Action::ControlText(text) => {
                self.session.handle_input(Input::Text { now, text: &text })
            }
            Action::Silence(samples) => super::frontends::fill_gap(&mut self.session, now, samples),
            Action::Notice(event) => {
                self.consumers.on_event(&event);
                self.dispatch(&event);
                Ok(())
            }
            Action::Reply(msg) => {
                self.client.send(msg);
                Ok(())
            }
            Action::SetSource(source) => self.session.set_source(source),
            Action::SetSegmenter(cfg) => {
                self.session.set_segmenter(cfg);
                Ok(())
            }
            Action::Violation {
                code,
                error,
                message,
            } => self.violate(code, error, &message),
        }
    }

    /// Flushes the consumers (everything accepted is delivered or counted as dropped), sends
    /// `Closed` (with a handoff state when a resumable session drains), and closes the socket.
    async fn close(self, code: CloseCode, reason: String, mut summary: CloseSummary) {
        let Connection {
            shared,
            id,
            mut frontend,
            consumers,
            mut rendered,
            mut client,
            mut notices,
            resume,
            mut meter,
            mut logs,
            guards,
            ..
        } = self;
        drop(guards.resumable);
        meter.count(summary.samples_decoded);
        let server = &shared.cfg.server;
        // While draining, consumers get most of the shutdown grace period.
        let flush = if shared.shutdown.is_cancelled() {
            server.shutdown_grace().mul_f64(0.8)
        } else {
            server.close_flush()
        };
        let hub = consumers.hub().clone();
        let Finished {
            summaries,
            last_words,
        } = consumers
            .finish_in_order(code, Instant::now() + flush, &mut notices)
            .await;
        for event in &last_words {
            logs.event(now(), &id, event);
            dispatch(&hub, &mut *frontend, &mut client, event, &mut rendered);
        }
        summary.consumers = summaries;
        let closed = ServerEvent::Closed {
            session_id: id.clone(),
            code: code.as_u16(),
            reason: reason.clone(),
            summary: summary.clone(),
            resume_state: None,
        };
        // Subscribers never get the resume state: it is the client's capability alone.
        hub.publish_event(&closed.to_json());
        let closed = match closed {
            ServerEvent::Closed {
                session_id,
                code: c,
                reason: r,
                summary: s,
                ..
            } => ServerEvent::Closed {
                session_id,
                code: c,
                reason: r,
                summary: s,
                resume_state: handoff(&shared, code, resume.as_ref(), &id, &hub, &summary),
            },
            other => other,
        };
        hub.close();
        drop(guards.session);
        rendered.clear();
        if !client.gone {
            frontend.render(&closed, &mut rendered);
        }
        client.goodbye(rendered, code.as_u16(), &reason, &id).await;
        counter!(m::CLOSES, "code" => code.as_u16().to_string()).increment(1);
        gauge!(m::SESSIONS_ACTIVE).decrement(1.0);
        info!(session = %id, code = code.as_u16(), reason = ?reason, seconds = summary.seconds_decoded,
            decode_errors = summary.decode_errors, resyncs = summary.resyncs, "session closed");
        drop((guards.user_slot, guards.permit));
    }
}

/// A drained resumable session can continue on another instance of the deployment: its signed
/// state for `Closed`.
fn handoff(
    shared: &Shared,
    code: CloseCode,
    resume: Option<&ResumeSlot>,
    id: &str,
    hub: &Hub,
    summary: &CloseSummary,
) -> Option<String> {
    match (&shared.cfg.server.resume_secret, resume) {
        (Some(secret), Some(r)) if code == CloseCode::GoingAway => {
            Some(HandoffState::from_summary(id, hub.owner(), summary, r.grace).sign(secret))
        }
        _ => None,
    }
}

/// An event for the subscribers and, in its protocol's form, the client.
fn dispatch(
    hub: &Hub,
    frontend: &mut dyn Frontend,
    client: &mut ClientIo,
    event: &ServerEvent,
    rendered: &mut Vec<Message>,
) {
    m::observe_event(event);
    hub.publish_event(&event.to_json());
    frontend.render(event, rendered);
    for msg in rendered.drain(..) {
        client.send(msg);
    }
}

/// How a broken WebSocket read is reported.
enum WsError {
    /// A message or frame over the configured limits.
    TooBig,
    Protocol(String),
}

fn ws_error(e: axum::Error) -> WsError {
    use tokio_tungstenite::tungstenite::error::{Error, ProtocolError};
    let text = e.to_string();
    match e.into_inner().downcast::<Error>().map(|e| *e) {
        Ok(Error::Capacity(_) | Error::Protocol(ProtocolError::ControlFrameTooBig)) => {
            WsError::TooBig
        }
        _ => WsError::Protocol(text),
    }
}

async fn sleep_until_opt(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
