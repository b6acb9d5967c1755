//! `/v1/sessions/{id}/subscribe`: a realtime subscriber's WebSocket. It gets the session's events
//! (and audio with `?audio=true`) through the session hub's bounded queue; a subscriber that lags
//! is disconnected with 1008 and its loss counted. Unknown sessions and sessions the token may
//! not watch get the same 404. Subscribers only listen: their inbound messages and frames are
//! capped at `SUBSCRIBER_MAX_MESSAGE` bytes, and any data message closes the socket with 1008.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use metrics::{counter, gauge};
use tokio::time::timeout;
use tracing::warn;
use voxgate_session::CloseCode;

use crate::auth::{bearer, Principal};
use crate::fanout::subscribers::{Hub, SubMessage, Subscription};
use crate::ingest::client::SEND_DEADLINE;
use crate::ingest::WS_READ_BUFFER;
use crate::metrics::{self as m, SESSIONS_REJECTED, SUBSCRIBERS_ACTIVE};
use crate::shared::Shared;

/// Largest message or frame a subscriber may send (it has nothing to send but control frames).
pub const SUBSCRIBER_MAX_MESSAGE: usize = 4096;

pub async fn subscribe(
    State(state): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let token = bearer(&headers).or_else(|| query.get("token").cloned());
    let principal = match state.auth.verify(token.as_deref()) {
        Ok(p) => p,
        Err(why) => {
            counter!(SESSIONS_REJECTED, "reason" => "unauthorized").increment(1);
            return (StatusCode::UNAUTHORIZED, why).into_response();
        }
    };
    let Some(hub) = watchable(&state, principal.as_ref(), &id) else {
        // Unknown and forbidden sessions get the same answer: subscribe reveals no ids.
        counter!(SESSIONS_REJECTED, "reason" => "unknown_session").increment(1);
        return (
            StatusCode::NOT_FOUND,
            format!("no live session {id:?} that this token may watch"),
        )
            .into_response();
    };
    let audio = matches!(query.get("audio").map(String::as_str), Some("true" | "1"));
    let sub = match hub.subscribe(audio) {
        Ok(sub) => sub,
        Err(full) => {
            counter!(SESSIONS_REJECTED, "reason" => "subscribers_full").increment(1);
            return (StatusCode::SERVICE_UNAVAILABLE, full.to_string()).into_response();
        }
    };
    drop(hub);
    let queue = state.cfg.subscribers.queue_messages;
    ws.read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(SUBSCRIBER_MAX_MESSAGE)
        .max_frame_size(SUBSCRIBER_MAX_MESSAGE)
        .on_upgrade(move |socket| {
            let tracker = state.tracker.clone();
            tracker.track_future(run_subscriber(socket, sub, queue))
        })
}

/// The hub of session `id` this caller may watch: without tokens, the one session with that id;
/// with a token, its user's own session `id`, else the session of that id the token names
/// (`sid`/`sessions`) in its grant owner's namespace (`owner` claim, default its user).
fn watchable(state: &Shared, principal: Option<&Principal>, id: &str) -> Option<Arc<Hub>> {
    let Some(p) = principal else {
        return state.sessions.hub("", id);
    };
    let own = state
        .sessions
        .hub(&p.user, id)
        .map(|hub| (p.user.as_str(), hub));
    let granted = || {
        p.names(id)
            .then(|| state.sessions.hub(p.grant_owner(), id))
            .flatten()
            .map(|hub| (p.grant_owner(), hub))
    };
    own.or_else(granted)
        .filter(|(owner, _)| p.may_watch(id, owner))
        .map(|(_, hub)| hub)
}

async fn run_subscriber(mut socket: WebSocket, mut sub: Subscription, queue: usize) {
    gauge!(SUBSCRIBERS_ACTIVE).increment(1.0);
    let (code, reason) = loop {
        tokio::select! {
            msg = sub.rx.recv() => match msg {
                Some(msg) => {
                    sub.taken(&msg);
                    let ws_msg = match msg {
                        SubMessage::Event(s) => Message::Text(s.as_ref().into()),
                        SubMessage::Audio(b) => Message::Binary(b),
                    };
                    // A subscriber that does not read for SEND_DEADLINE is dropped.
                    if !matches!(timeout(SEND_DEADLINE, socket.send(ws_msg)).await, Ok(Ok(()))) {
                        break (None, "");
                    }
                }
                None if sub.kicked.is_cancelled() => {
                    break (Some(CloseCode::Policy), "subscriber lagging: queue full; disconnected");
                }
                None => break (Some(CloseCode::Normal), "session ended"),
            },
            () = sub.kicked.cancelled() => {
                counter!(m::CLOSES, "code" => CloseCode::Policy.as_u16().to_string()).increment(1);
                warn!(queue, "disconnecting lagging subscriber");
                break (Some(CloseCode::Policy), "subscriber lagging: queue full; disconnected");
            }
            incoming = socket.recv() => match incoming {
                None | Some(Ok(Message::Close(_))) => break (None, ""),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                    counter!(m::CLOSES, "code" => CloseCode::Policy.as_u16().to_string()).increment(1);
                    break (Some(CloseCode::Policy), "subscribers may not send messages");
                }
                // Over the size limit, or a protocol error: say why if the socket still writes.
                Some(Err(_)) => {
                    counter!(m::CLOSES, "code" => CloseCode::Policy.as_u16().to_string()).increment(1);
                    break (Some(CloseCode::Policy), "subscriber message too large or malformed");
                }
            },
        }
    };
    sub.discard_rest();
    if let Some(code) = code {
        let close = Message::Close(Some(axum::extract::ws::CloseFrame {
            code: code.as_u16(),
            reason: reason.into(),
        }));
        let _ = timeout(SEND_DEADLINE, socket.send(close)).await;
    }
    gauge!(SUBSCRIBERS_ACTIVE).decrement(1.0);
}
