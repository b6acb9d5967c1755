//! A webhook of JSON documents (transcripts, conversation events): a bounded queue under a byte
//! cap (documents are serialized once and queued as bytes), retries with backoff and jitter,
//! the endpoint's circuit breaker, counted drops (the client is warned once per drop episode).
//! What it posts and when is decided by a `Selector` over session events.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::warn;
use voxgate_session::{AudioChunk, ConsumerSummary, ServerEvent};

use super::contract::{idempotency_key, json_request};
use super::http::{webhook_attempt, Breaker, BreakerPolicy, HttpError};
use super::queue::{ConsumerStats, QueueHandle};
use super::retry::{with_retries, RetryPolicy};
use super::{Consumer, ConsumerKind, Notifier, Offer};

/// Turns a session event into a document to post (or nothing).
pub type Selector = Box<dyn Fn(&ServerEvent) -> Option<Post> + Send + Sync>;

/// One document to post, serialized.
#[derive(Debug, Clone)]
pub struct Post {
    pub body: bytes::Bytes,
    /// When set, the outcome is told back to the session as this event with `success` filled in.
    pub reply: Option<ServerEvent>,
}

/// Settings of one JSON webhook.
#[derive(Debug, Clone)]
pub struct JsonWebhookConfig {
    pub name: String,
    pub url: String,
    pub query: Vec<(String, String)>,
    pub secret: Option<String>,
    pub timeout: Duration,
    pub max_retries: u32,
    /// Documents queued; beyond it new ones are dropped (counted). Default 256.
    pub queue: usize,
    /// Bytes of documents held (queued or in flight); beyond it new ones are dropped
    /// (`buffer_full`, counted). Default 2 MiB.
    pub max_buffer_bytes: u64,
    /// The endpoint's breaker (shared with every consumer posting to the same URL).
    pub breaker: BreakerPolicy,
}

impl JsonWebhookConfig {
    pub fn new(name: &str, url: &str) -> Self {
        Self {
            name: name.into(),
            url: url.into(),
            query: Vec::new(),
            secret: None,
            timeout: Duration::from_secs(5),
            max_retries: 3,
            queue: 256,
            max_buffer_bytes: 2 << 20,
            breaker: BreakerPolicy::default(),
        }
    }
}

/// The ingest side of one JSON webhook of one session.
pub struct JsonWebhook {
    name: String,
    select: Selector,
    queue: QueueHandle<Post>,
    notifier: Notifier,
}

impl JsonWebhook {
    pub fn spawn(
        cfg: JsonWebhookConfig,
        select: Selector,
        client: reqwest::Client,
        breaker: Arc<Breaker>,
        notifier: Notifier,
        session_id: String,
    ) -> Self {
        let stats = Arc::new(ConsumerStats::new(ConsumerKind::JsonWebhook));
        let name = cfg.name.clone();
        let (items, cap_bytes) = (cfg.queue, cfg.max_buffer_bytes);
        let worker = Worker {
            cfg,
            client,
            breaker,
            stats: stats.clone(),
            notifier: notifier.clone(),
            session_id,
        };
        Self {
            name,
            select,
            queue: QueueHandle::spawn(stats, items, cap_bytes, |rx| worker.run(rx)),
            notifier,
        }
    }
}

impl Consumer for JsonWebhook {
    fn name(&self) -> &str {
        &self.name
    }
    fn wants_audio(&self) -> bool {
        false
    }
    fn on_audio(&mut self, _chunk: &AudioChunk) -> Offer {
        Offer::Accepted
    }
    fn on_event(&mut self, event: &ServerEvent) {
        let Some(post) = (self.select)(event) else {
            return;
        };
        let bytes = post.body.len() as u64;
        let reply = post.reply.clone();
        let Err(refused) = self.queue.offer(post, bytes) else {
            return;
        };
        let reason = refused.reason();
        if self.queue.dropped(reason, bytes) {
            warn!(webhook = %self.name, %reason, "JSON webhook dropping documents");
            self.notifier.offer(ServerEvent::warning(
                "consumer_dropping",
                format!(
                    "consumer {:?} is not keeping up; documents are being dropped ({reason})",
                    self.name
                ),
            ));
        }
        if let Some(reply) = reply {
            self.notifier
                .offer(with_success(reply, false, reason.as_str()));
        }
    }
    fn finish(
        mut self: Box<Self>,
        deadline: Instant,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ConsumerSummary> + Send>> {
        Box::pin(async move {
            if !self.queue.finish(deadline).await.in_time {
                warn!(webhook = %self.name, "JSON webhook flush timed out");
            }
            self.queue.summary(&self.name)
        })
    }
}

/// Fills `success` (and `error`) into a reply event's data.
fn with_success(mut reply: ServerEvent, success: bool, error: &str) -> ServerEvent {
    if let ServerEvent::Conversation { data, .. } = &mut reply {
        data["success"] = serde_json::Value::Bool(success);
        if !success {
            data["error"] = serde_json::Value::String(error.to_owned());
        }
    }
    reply
}

/// Posts a session's documents one after another.
struct Worker {
    cfg: JsonWebhookConfig,
    client: reqwest::Client,
    breaker: Arc<Breaker>,
    stats: Arc<ConsumerStats>,
    notifier: Notifier,
    session_id: String,
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<Post>) {
        let mut seq = 0u64;
        while let Some(post) = rx.recv().await {
            let bytes = post.body.len() as u64;
            let key = idempotency_key(&self.session_id, &self.cfg.name, seq);
            seq += 1;
            let outcome = self.post(&key, post.body).await;
            self.stats.release(bytes);
            match &outcome {
                Ok(()) => self.stats.delivered(bytes),
                Err(e) => {
                    let reason = e.drop_reason();
                    warn!(webhook = %self.cfg.name, %reason, "JSON webhook document given up");
                    self.stats.count_dropped(reason, bytes);
                }
            }
            if let Some(reply) = post.reply {
                let reply = match outcome {
                    Ok(()) => with_success(reply, true, ""),
                    Err(e) => with_success(reply, false, e.drop_reason().as_str()),
                };
                self.notifier.offer(reply);
            }
        }
    }

    /// One document with retries through the endpoint's breaker.
    async fn post(&self, key: &str, body: bytes::Bytes) -> Result<(), HttpError> {
        let policy = RetryPolicy {
            max_retries: self.cfg.max_retries,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
        };
        let body = &body;
        with_retries(&policy, move |_| {
            let request = move || {
                self.stats.request();
                let req = self
                    .client
                    .post(&self.cfg.url)
                    .query(&self.cfg.query)
                    .timeout(self.cfg.timeout);
                json_request(req, key, self.cfg.secret.as_deref(), body.clone())
            };
            webhook_attempt(&self.breaker, self.cfg.breaker, request)
        })
        .await
    }
}
