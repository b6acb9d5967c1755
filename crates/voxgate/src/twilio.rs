//! `/v1/twilio`: Twilio Media Streams. Waits for `start`, then runs a mu-law 8 kHz session whose
//! consumers may be chosen by `customParameters` (as the query does on `/v1/listen`).

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use metrics::counter;
use tracing::warn;
use voxgate_session::ServerEvent;

use crate::connection::{drive, prepare, refuse, valid_session_id, ListenParams, Refusal};
use crate::frontend::Twilio;
use crate::metrics as m;
use crate::server::AppState;

fn warning(code: &str, message: String) -> Message {
    counter!(m::CLIENT_ERRORS, "code" => code.to_owned()).increment(1);
    warn!(code, %message, "twilio stream");
    Message::Text(ServerEvent::warning(code, message).to_json().into())
}

pub async fn run(state: Arc<AppState>, socket: WebSocket, mut params: ListenParams) {
    let (mut sink, mut stream) = socket.split();
    let idle = state.cfg.idle_timeout();
    let start = loop {
        let msg = match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(Ok(msg))) => msg,
            Ok(_) => return,
            Err(_) => {
                let _ = sink
                    .send(Message::Close(Some(CloseFrame {
                        code: 1008,
                        reason: "idle timeout: no start event".into(),
                    })))
                    .await;
                return;
            }
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => return,
            Message::Binary(_) => {
                let w = warning(
                    "unexpected_binary",
                    "Twilio Media Streams send JSON text; ignored".into(),
                );
                let _ = sink.send(w).await;
                continue;
            }
            _ => continue,
        };
        let v: serde_json::Value = match serde_json::from_str(text.as_str()) {
            Ok(v) => v,
            Err(e) => {
                let _ = sink
                    .send(warning("bad_message", format!("not JSON: {e}; ignored")))
                    .await;
                continue;
            }
        };
        match v["event"].as_str().unwrap_or_default() {
            "connected" => {}
            "start" => match Twilio::parse_start(&v) {
                Ok(start) => break start,
                Err(message) => {
                    let refusal = Refusal::new(1003, "unsupported_format", message);
                    return refuse(sink, stream, &params, refusal).await;
                }
            },
            "media" => {
                counter!(m::DROPPED_BYTES, "consumer" => "session", "reason" => "media_before_start")
                    .increment(1);
                let _ = sink
                    .send(warning(
                        "media_before_start",
                        "media event before start; dropped".into(),
                    ))
                    .await;
            }
            "stop" => return,
            other => {
                let _ = sink
                    .send(warning(
                        "unknown_event",
                        format!("unknown Twilio event {other:?}; ignored"),
                    ))
                    .await;
            }
        }
    };
    for (k, v) in &start.custom {
        if matches!(k.as_str(), "consumers" | "uid" | "session_id") {
            params.query.insert(k.clone(), v.clone());
        }
    }
    if !params.query.contains_key("session_id") && valid_session_id(&start.stream_sid) {
        params
            .query
            .insert("session_id".into(), start.stream_sid.clone());
    }
    params.query.insert("encoding".into(), "mulaw".into());
    params.query.insert("sample_rate".into(), "8000".into());
    params.query.insert("channels".into(), "1".into());
    match prepare(&state, &params).await {
        Ok(prepared) => {
            let event = ServerEvent::Telephony {
                event: "start".into(),
                detail: start.detail.clone(),
            };
            prepared.hub.publish_event(&event.to_json());
            let frontend = Box::new(Twilio::new(start.stream_sid.clone()));
            drive(state, sink, stream, prepared, frontend, "twilio").await
        }
        Err(refusal) => refuse(sink, stream, &params, refusal).await,
    }
}
