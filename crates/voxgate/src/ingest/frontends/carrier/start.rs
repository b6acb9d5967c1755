//! The phase before a telephony stream describes its call (Twilio's `start`, Vonage's
//! `websocket:connected`, jambonz's metadata): the connection is admitted as any other (its
//! token may only come with the description), then messages are read until the description
//! arrives, within a deadline and a message count.

use std::time::Duration;

use axum::extract::ws::Message;
use futures_util::{SinkExt, StreamExt};
use metrics::counter;
use tokio::time::Instant;
use tracing::{debug, warn};
use voxgate_session::ServerEvent;

use crate::ingest::admission::{self, Admitted};
use crate::ingest::client::{WsSink, WsStream};
use crate::ingest::refusal::{Refusal, RefuseReason};
use crate::ingest::request::ConnectRequest;
use crate::metrics as m;
use crate::shared::Shared;

/// The admission of a connection whose token may only come with its call description: with a
/// token in the URL (or auth off) the whole `admission::admit`; otherwise its other checks
/// (shutdown, per-IP rate, session permit) now, and the token later (`check_token`).
pub fn admit_connect(shared: &Shared, req: &ConnectRequest) -> Result<Admitted, Refusal> {
    if req.token.is_some() || !shared.auth.required() {
        return admission::admit(shared, req);
    }
    admission::open(shared)?;
    admission::rate(shared, req)?;
    Ok(Admitted {
        principal: None,
        permit: admission::permit(shared)?,
    })
}

/// Verifies a token that came with the call description (`token`, when the URL had none).
pub fn check_token(
    shared: &Shared,
    admitted: &mut Admitted,
    req: &mut ConnectRequest,
    token: Option<String>,
) -> Result<(), Refusal> {
    if admitted.principal.is_some() || !shared.auth.required() {
        return Ok(());
    }
    req.token = req.token.take().or(token);
    match shared.auth.verify(req.token.as_deref()) {
        Ok(principal) => {
            admitted.principal = principal;
            Ok(())
        }
        Err(why) => Err(Refusal::new(RefuseReason::Unauthorized, why)),
    }
}

/// A warning for the client before its call is described, counted; logged at warn once per
/// connection (then at debug, so a client cannot flood the log).
pub fn warning(protocol: &str, code: &str, message: String, loud: bool) -> Message {
    counter!(m::CLIENT_ERRORS, "code" => code.to_owned()).increment(1);
    if loud {
        warn!(protocol, code, %message, "telephony stream (further warnings at debug)");
    } else {
        debug!(protocol, code, %message, "telephony stream");
    }
    Message::Text(ServerEvent::warning(code, message).to_json().into())
}

/// What a message before the call description means.
pub enum BeforeStart<S> {
    /// Keep waiting.
    Wait,
    /// The description arrived (or was refused).
    Started(Result<S, Refusal>),
    /// The client closed or stopped.
    Left,
}

/// The deadline and message cap of the phase, and the config section that sets them.
pub struct StartLimits {
    pub timeout: Duration,
    pub max_messages: u32,
    pub section: &'static str,
    /// What the description is called in errors (`start`, `websocket:connected`).
    pub what: &'static str,
}

/// Reads until `step` says the call is described: `Ok(None)` when the client left first.
/// Refused when the description does not come within the deadline (from the connect; messages
/// do not extend it), when more than `max_messages` messages come first, or at shutdown.
/// `step(message, first)` answers each message, with a reply (a warning) to send back.
pub async fn wait_for_start<S>(
    shared: &Shared,
    sink: &mut WsSink,
    stream: &mut WsStream,
    limits: &StartLimits,
    mut step: impl FnMut(Message, bool) -> (BeforeStart<S>, Option<Message>),
) -> Result<Option<S>, Refusal> {
    let deadline = Instant::now() + limits.timeout;
    let mut seen = 0u32;
    loop {
        let next = tokio::select! {
            () = shared.shutdown.cancelled() => return Err(Refusal::new(
                RefuseReason::ShuttingDown,
                "server is shutting down; retry on another instance",
            )),
            next = tokio::time::timeout_at(deadline, stream.next()) => next,
        };
        let msg = match next {
            Ok(Some(Ok(msg))) => msg,
            Ok(_) => return Ok(None),
            Err(_) => {
                return Err(Refusal::new(
                    RefuseReason::StartTimeout,
                    format!(
                        "no {} within {} s of the connect ({}.start_timeout_seconds)",
                        limits.what,
                        limits.timeout.as_secs_f64(),
                        limits.section
                    ),
                ))
            }
        };
        seen += 1;
        if seen > limits.max_messages {
            return Err(Refusal::new(
                RefuseReason::MessageFlood,
                format!(
                    "more than {} messages before {} ({}.max_messages_before_start)",
                    limits.max_messages, limits.what, limits.section
                ),
            ));
        }
        let (next_step, reply) = step(msg, seen == 1);
        if let Some(reply) = reply {
            // A client that does not read cannot hold the task past the deadline.
            if !matches!(
                tokio::time::timeout_at(deadline, sink.send(reply)).await,
                Ok(Ok(()))
            ) {
                return Ok(None);
            }
        }
        match next_step {
            BeforeStart::Wait => {}
            BeforeStart::Started(start) => return start.map(Some),
            BeforeStart::Left => return Ok(None),
        }
    }
}
