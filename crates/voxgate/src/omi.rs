//! `/v1/trigger/listen`: a drop-in for Omi's pusher. The transcription service sends binary
//! opcode frames (100 heartbeat, 101 audio, 102 transcript, 103 conversation id, 104 finalize,
//! 105 speaker sample); audio flows through the same sessions, consumers and metrics as any
//! other, and only the consumers a user has are built.

use std::sync::Arc;

use axum::extract::ws::WebSocket;
use futures_util::StreamExt;
use voxgate_session::ServerEvent;

use crate::connection::{drive, prepare, refuse, ListenParams, Refusal};
use crate::fanout::json_webhook::{JsonWebhook, JsonWebhookConfig, Post, Selector};
use crate::fanout::webhook::Target;
use crate::fanout::{Consumer, Notifier, Offer};
use crate::frontend::Omi;
use crate::server::AppState;

pub async fn run(state: Arc<AppState>, socket: WebSocket, mut params: ListenParams) {
    let (sink, stream) = socket.split();
    let rate = match params.query.get("sample_rate").map(|r| r.parse::<u32>()) {
        None => Ok(8000),
        Some(Ok(r)) if (8000..=48_000).contains(&r) => Ok(r),
        Some(_) => Err(Refusal::new(
            1008,
            "invalid_sample_rate",
            "sample_rate must be 8000..=48000",
        )),
    };
    let uid_ok = params.query.get("uid").is_some_and(|u| !u.is_empty());
    let checked = match (rate, uid_ok) {
        (Ok(rate), true) => Ok(rate),
        (Err(e), _) => Err(e),
        (_, false) => Err(Refusal::new(1008, "missing_uid", "uid is required")),
    };
    let rate = match checked {
        Ok(rate) => rate,
        Err(refusal) => return refuse(sink, stream, &params, refusal).await,
    };
    params.query.insert("encoding".into(), "linear16".into());
    params.query.insert("sample_rate".into(), rate.to_string());
    params.query.insert("channels".into(), "1".into());
    match prepare(&state, &params).await {
        Ok(prepared) => {
            drive(
                state,
                sink,
                stream,
                prepared,
                Box::new(Omi::new(rate)),
                "omi",
            )
            .await
        }
        Err(refusal) => refuse(sink, stream, &params, refusal).await,
    }
}

/// Builds the transcript and conversation webhooks of an Omi session. Without a conversation
/// webhook, `104` is answered at once (it was delivered to subscribers).
pub(crate) fn consumers(
    state: &AppState,
    target: &Target,
    transcript_webhook: Option<String>,
    conversation_webhook: Option<String>,
    notifier: &Notifier,
    client: &reqwest::Client,
    out: &mut Vec<Box<dyn Consumer>>,
) {
    // Both webhooks post to `url?uid=` through the endpoint's breaker.
    let spawn = |name: &str, url: &str, select: Selector| -> Box<dyn Consumer> {
        let mut cfg = JsonWebhookConfig::new(name, url);
        cfg.query = vec![("uid".into(), target.uid.clone())];
        Box::new(JsonWebhook::spawn(
            cfg,
            select,
            client.clone(),
            state.breakers.get(url),
            notifier.clone(),
            target.session_id.clone(),
        ))
    };
    if let Some(url) = transcript_webhook {
        let session_id = target.session_id.clone();
        let select = Box::new(move |e: &ServerEvent| match e {
            ServerEvent::Conversation {
                event,
                conversation_id,
                data,
            } if event == "transcript" => Some(Post {
                body: serde_json::json!({
                    "segments": data.get("segments").cloned().unwrap_or_default(),
                    "memory_id": data.get("memory_id").cloned().unwrap_or_default(),
                    "session_id": session_id,
                    "conversation_id": conversation_id,
                }),
                reply: None,
            }),
            _ => None,
        });
        out.push(spawn("transcript_webhook", &url, select));
    }
    match conversation_webhook {
        Some(url) => {
            let session_id = target.session_id.clone();
            let uid = target.uid.clone();
            let select = Box::new(move |e: &ServerEvent| match e {
                ServerEvent::Conversation {
                    event,
                    conversation_id,
                    data,
                } if event == "finalize" || event == "speaker_sample" => Some(Post {
                    body: serde_json::json!({
                        "event": event, "uid": uid, "session_id": session_id,
                        "conversation_id": conversation_id, "data": data,
                    }),
                    reply: (event == "finalize").then(|| finalize_result(conversation_id)),
                }),
                _ => None,
            });
            out.push(spawn("conversation_webhook", &url, select));
        }
        None => out.push(Box::new(AutoReply {
            notifier: notifier.clone(),
        })),
    }
}

fn finalize_result(conversation_id: &Option<String>) -> ServerEvent {
    ServerEvent::Conversation {
        event: "finalize_result".into(),
        conversation_id: conversation_id.clone(),
        data: serde_json::json!({ "conversation_id": conversation_id, "success": true }),
    }
}

/// Answers `104` when there is no conversation webhook to deliver it to.
struct AutoReply {
    notifier: Notifier,
}

impl Consumer for AutoReply {
    fn name(&self) -> &str {
        "finalize_reply"
    }
    fn wants_audio(&self) -> bool {
        false
    }
    fn on_audio(&mut self, _chunk: &voxgate_session::AudioChunk) -> Offer {
        Offer::Accepted
    }
    fn on_event(&mut self, event: &ServerEvent) {
        if let ServerEvent::Conversation {
            event,
            conversation_id,
            ..
        } = event
        {
            if event == "finalize" {
                let _ = self.notifier.try_send(finalize_result(conversation_id));
            }
        }
    }
    fn finish(
        self: Box<Self>,
        _deadline: tokio::time::Instant,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = voxgate_session::ConsumerSummary> + Send>>
    {
        Box::pin(async {
            voxgate_session::ConsumerSummary {
                name: "finalize_reply".into(),
                kind: "reply".into(),
                delivered_bytes: 0,
                dropped_bytes: 0,
                requests: 0,
                next_seq: 0,
            }
        })
    }
}
