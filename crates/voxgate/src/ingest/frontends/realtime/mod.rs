//! OpenAI's Realtime API in transcription mode on `/v1/realtime`, for clients written against
//! it (the `openai` SDKs' realtime clients, in Python, Node and browsers): base64 audio in
//! `input_audio_buffer.append`, turns by server VAD (voxgate's segmenter) or client commits,
//! transcripts as conversation-item events, with any voxgate backend behind it.
//!
//! The handshake admits the connection (401, 503 + `Retry-After`, 400), echoes the `realtime`
//! subprotocol and takes the key from `Authorization: Bearer` or the browser subprotocol
//! `openai-insecure-api-key.<key>`. `accept` sends `session.created`, then waits briefly for the
//! client's first `session.update`, whose format, model and turn detection the session starts
//! with.

pub mod frontend;
pub mod settings;

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::extract::ws::Message;
use axum::http::{header, HeaderMap};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::time::Instant;

use self::frontend::Realtime;
use self::settings::Settings;
use super::Accept;
use crate::ingest::admission;
use crate::ingest::client::{WsSink, WsStream};
use crate::ingest::refusal::{self, Refusal, RefuseReason};
use crate::ingest::request::{ConnectRequest, Endpoint};
use crate::shared::Shared;

/// The subprotocol OpenAI's browser client offers first (echoed).
pub const SUBPROTOCOL: &str = "realtime";
/// The browser client's key rides in a subprotocol named with this prefix.
const KEY_PROTOCOL: &str = "openai-insecure-api-key.";

/// The key: `Authorization: Bearer <key>`, the subprotocol `openai-insecure-api-key.<key>`, or
/// `?token=`.
pub fn credentials(headers: &HeaderMap, query: &HashMap<String, String>) -> Option<String> {
    crate::auth::bearer(headers)
        .or_else(|| {
            let offered = headers.get(header::SEC_WEBSOCKET_PROTOCOL)?.to_str().ok()?;
            offered
                .split(',')
                .map(str::trim)
                .find_map(|p| p.strip_prefix(KEY_PROTOCOL))
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
        })
        .or_else(|| query.get("token").cloned())
}

/// Admits a Realtime connection before the upgrade (refusals are HTTP statuses with OpenAI's
/// error body) and builds its frontend on the default settings.
pub fn handshake(
    shared: &std::sync::Arc<Shared>,
    peer: SocketAddr,
    headers: &HeaderMap,
    query: HashMap<String, String>,
) -> Result<(ConnectRequest, Realtime), Box<Response>> {
    let token = credentials(headers, &query);
    let model = query.get("model").cloned();
    let mut req = ConnectRequest::parse(Endpoint::Realtime, peer, token, query);
    req.resumable = false;
    let admitted = admission::admit(shared, &req).map_err(|r| Box::new(http_refusal(peer, r)))?;
    let settings = Settings::defaults(&shared.cfg, model.as_deref());
    Ok((req, Realtime::new(shared.clone(), settings, admitted)))
}

fn http_refusal(peer: SocketAddr, refusal: Refusal) -> Response {
    let kind = match refusal.reason {
        RefuseReason::Unauthorized => "invalid_api_key",
        _ => refusal.reason.code(),
    };
    let body = json!({"error": {
        "message": refusal.message, "type": "invalid_request_error", "code": kind, "param": null,
    }});
    refusal::http_refusal(peer, &refusal, body, &[])
}

/// Sends `session.created`, waits up to `realtime.update_wait_ms` for the first client message:
/// a `session.update` sets what the session starts with (answered with `session.updated`, or an
/// `error` and the defaults); anything else is kept for the session. Then the request is fixed.
pub async fn accept(
    shared: &Shared,
    sink: &mut WsSink,
    stream: &mut WsStream,
    mut req: ConnectRequest,
    mut rt: Realtime,
) -> Accept {
    let deadline = Instant::now() + shared.cfg.realtime.update_wait();
    let created = rt.session_event("session.created");
    if !send_by(sink, created, deadline).await {
        return Accept::Done;
    }
    let first = tokio::select! {
        () = shared.shutdown.cancelled() => None,
        next = tokio::time::timeout_at(deadline, stream.next()) => match next {
            Ok(Some(Ok(Message::Text(text)))) => Some(text.as_str().to_owned()),
            Ok(Some(Ok(Message::Binary(_) | Message::Ping(_) | Message::Pong(_)))) | Err(_) => None,
            Ok(_) => return Accept::Done,
        },
    };
    if let Some(text) = first {
        match session_update(&text) {
            Some((session, event_id)) => {
                let reply = match rt.settings.update(&shared.cfg, session, false) {
                    Ok(()) => rt.session_event("session.updated"),
                    Err(invalid) => rt.client_error("invalid_value", invalid, event_id.as_deref()),
                };
                if !send_by(sink, reply, deadline + std::time::Duration::from_secs(5)).await {
                    return Accept::Done;
                }
            }
            None => rt.pending = Some(text),
        }
    }
    fix_request(shared, &mut req, &rt);
    Accept::Session(req, Box::new(rt))
}

/// The session's typed fields from the settings, mirrored in the raw query for the hook.
fn fix_request(shared: &Shared, req: &mut ConnectRequest, rt: &Realtime) {
    let s = &rt.settings;
    let (encoding, rate) = match s.format {
        settings::Format::Pcm(rate) => ("linear16", rate),
        settings::Format::Pcmu => ("mulaw", 8_000),
        settings::Format::Pcma => ("alaw", 8_000),
    };
    req.set_source(encoding, rate);
    let backend = s.backend.clone().unwrap_or_default();
    req.raw_query.insert("stt".into(), backend.clone());
    req.stt = Some(backend);
    req.stt_options = s.stt_options(&shared.cfg);
    req.segmenter = Some(s.segmenter(&shared.cfg));
    req.idle_timeout = Some(shared.cfg.realtime.idle_timeout());
}

/// A `session.update`'s `session` and `event_id`, if `text` is one.
fn session_update(text: &str) -> Option<(Value, Option<String>)> {
    let mut v: Value = serde_json::from_str(text).ok()?;
    if v["type"] != "session.update" {
        return None;
    }
    let id = v["event_id"].as_str().map(str::to_owned);
    Some((v["session"].take(), id))
}

/// Sends within the deadline (a client that does not read cannot hold the task).
async fn send_by(sink: &mut WsSink, msg: Message, deadline: Instant) -> bool {
    matches!(
        tokio::time::timeout_at(deadline, sink.send(msg)).await,
        Ok(Ok(()))
    )
}
