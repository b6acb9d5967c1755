//! The consumers of Omi's pusher protocol besides audio webhooks: its transcript webhook, its
//! conversation webhook (`104` finalize, answered with `201` once delivered, and `105` speaker
//! samples), or the automatic `104` answer when there is no conversation webhook.

use voxgate_session::ServerEvent;

use crate::fanout::contract::Target;
use crate::fanout::json_webhook::{JsonWebhook, JsonWebhookConfig, Post, Selector};
use crate::fanout::registry::BuildCtx;
use crate::fanout::{Consumer, ConsumerKind, Notifier, Offer};

/// Omi consumers besides audio webhooks, from the hook (per user) or the config.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OmiTargets {
    pub transcript_webhook: Option<String>,
    pub conversation_webhook: Option<String>,
}

/// Builds the transcript and conversation webhooks of an Omi session. Without a conversation
/// webhook, `104` is answered at once (it was delivered to subscribers).
pub fn consumers(ctx: &BuildCtx<'_>, targets: OmiTargets) -> Vec<Box<dyn Consumer>> {
    let BuildCtx {
        target,
        notifier,
        client,
        breakers,
        ..
    } = *ctx;
    let mut out: Vec<Box<dyn Consumer>> = Vec::new();
    // Both webhooks post to `url?uid=` through the endpoint's breaker.
    let spawn = |name: &str, url: &str, select: Selector| -> Box<dyn Consumer> {
        let mut cfg = JsonWebhookConfig::new(name, url);
        cfg.query = vec![("uid".into(), target.uid.clone())];
        cfg.max_buffer_bytes = ctx.cfg.omi.json_queue_bytes as u64;
        Box::new(JsonWebhook::spawn(
            cfg,
            select,
            client.clone(),
            breakers.get(url),
            notifier.clone(),
            target.session_id.clone(),
        ))
    };
    if let Some(url) = targets.transcript_webhook {
        out.push(spawn("transcript_webhook", &url, transcripts(target)));
    }
    match targets.conversation_webhook {
        Some(url) => out.push(spawn("conversation_webhook", &url, conversation(target))),
        None => out.push(Box::new(AutoReply {
            notifier: notifier.clone(),
        })),
    }
    out
}

/// Serializes a webhook document once: its queue holds bytes, not a JSON tree.
fn document(doc: &impl serde::Serialize) -> bytes::Bytes {
    bytes::Bytes::from(
        serde_json::to_vec(doc).expect("documents serialize: JSON values and strings"),
    )
}

/// Omi's realtime transcript webhook document (borrowing the event's data).
#[derive(serde::Serialize)]
struct TranscriptDoc<'a> {
    segments: &'a serde_json::Value,
    memory_id: &'a serde_json::Value,
    session_id: &'a str,
    conversation_id: &'a Option<String>,
}

/// `102` transcripts as Omi's realtime transcript webhook document.
fn transcripts(target: &Target) -> Selector {
    let session_id = target.session_id.clone();
    Box::new(move |e: &ServerEvent| match e {
        ServerEvent::Conversation {
            event,
            conversation_id,
            data,
        } if event == "transcript" => Some(Post {
            body: document(&TranscriptDoc {
                segments: data.get("segments").unwrap_or(&serde_json::Value::Null),
                memory_id: data.get("memory_id").unwrap_or(&serde_json::Value::Null),
                session_id: &session_id,
                conversation_id,
            }),
            reply: None,
        }),
        _ => None,
    })
}

/// A conversation webhook document (borrowing the event's data).
#[derive(serde::Serialize)]
struct ConversationDoc<'a> {
    event: &'a str,
    uid: &'a str,
    session_id: &'a str,
    conversation_id: &'a Option<String>,
    data: &'a serde_json::Value,
}

/// `104` finalize (answered with `201` once delivered) and `105` speaker samples.
fn conversation(target: &Target) -> Selector {
    let session_id = target.session_id.clone();
    let uid = target.uid.clone();
    Box::new(move |e: &ServerEvent| match e {
        ServerEvent::Conversation {
            event,
            conversation_id,
            data,
        } if event == "finalize" || event == "speaker_sample" => Some(Post {
            body: document(&ConversationDoc {
                event,
                uid: &uid,
                session_id: &session_id,
                conversation_id,
                data,
            }),
            reply: (event == "finalize").then(|| finalize_result(conversation_id, data)),
        }),
        _ => None,
    })
}

/// The `201` answer to a `104`. Under finalization result protocol 2 it echoes the request's
/// `finalization_job_id` and `dispatch_generation`, so the listen side matches it to its pending
/// request; voxgate answers each `104` once, after delivery, so the protocol's lease and fencing
/// answers never arise.
fn finalize_result(conversation_id: &Option<String>, request: &serde_json::Value) -> ServerEvent {
    let mut data = serde_json::json!({ "conversation_id": conversation_id, "success": true });
    for field in [
        "finalization_job_id",
        "dispatch_generation",
        "finalization_result_protocol",
    ] {
        if let Some(v) = request.get(field) {
            data[field] = v.clone();
        }
    }
    ServerEvent::Conversation {
        event: "finalize_result".into(),
        conversation_id: conversation_id.clone(),
        data,
    }
}

/// A `104` under finalization result protocol 2 without a `finalization_job_id`: answered at
/// once with `durable_job_required` (terminal), as Omi's pusher does, and not forwarded.
pub fn durable_job_required(
    conversation_id: &Option<String>,
    request: &serde_json::Value,
) -> Option<ServerEvent> {
    let v2 = request.get("finalization_result_protocol") == Some(&serde_json::json!(2));
    let has_job = request
        .get("finalization_job_id")
        .is_some_and(|j| !j.is_null());
    (v2 && !has_job).then(|| ServerEvent::Conversation {
        event: "finalize_result".into(),
        conversation_id: conversation_id.clone(),
        data: serde_json::json!({
            "conversation_id": conversation_id,
            "error": "durable_job_required",
            "terminal": true,
        }),
    })
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
            data,
        } = event
        {
            if event == "finalize" {
                self.notifier.offer(finalize_result(conversation_id, data));
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
                kind: ConsumerKind::Reply.as_str().into(),
                delivered_bytes: 0,
                dropped_bytes: 0,
                requests: 0,
                next_seq: 0,
            }
        })
    }
}
