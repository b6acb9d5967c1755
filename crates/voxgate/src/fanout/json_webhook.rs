//! A webhook of JSON documents (transcripts, conversation events): a bounded queue, retries with
//! backoff and jitter, the endpoint's circuit breaker, counted drops. What it posts and when is
//! decided by a `Selector` over session events.

use crate::fanout::join_until;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::warn;
use voxgate_session::{AudioChunk, ConsumerSummary, ServerEvent};

use super::retry::{with_retries, Attempt, RetryPolicy};
use super::webhook::{http_attempt, sign, Breaker};
use super::{Consumer, ConsumerStats, Notifier, Offer};
use crate::metrics::{dropped, WEBHOOK_REQUESTS};

const KIND: &str = "json_webhook";

/// Turns a session event into a document to post (or nothing).
pub type Selector = Box<dyn Fn(&ServerEvent) -> Option<Post> + Send + Sync>;

/// One document to post.
#[derive(Debug, Clone)]
pub struct Post {
    pub body: serde_json::Value,
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
        }
    }
}

pub struct JsonWebhook {
    name: String,
    select: Selector,
    tx: Option<mpsc::Sender<Post>>,
    stats: Arc<ConsumerStats>,
    notifier: Notifier,
    task: JoinHandle<()>,
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
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let stats = Arc::new(ConsumerStats::default());
        let name = cfg.name.clone();
        let task = tokio::spawn(run(
            cfg,
            rx,
            client,
            breaker,
            stats.clone(),
            notifier.clone(),
            session_id,
        ));
        Self {
            name,
            select,
            tx: Some(tx),
            stats,
            notifier,
            task,
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
        let bytes = post.body.to_string().len() as u64;
        let reply = post.reply.clone();
        let sent = match &self.tx {
            Some(tx) => tx.try_send(post).is_ok(),
            None => false,
        };
        if !sent {
            self.stats.dropped_bytes.fetch_add(bytes, Ordering::Relaxed);
            dropped(KIND, "queue_full", bytes);
            warn!(webhook = %self.name, "JSON webhook queue full; document dropped");
            if let Some(reply) = reply {
                let _ = self
                    .notifier
                    .try_send(with_success(reply, false, "queue full"));
            }
        }
    }
    fn finish(
        mut self: Box<Self>,
        deadline: Instant,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ConsumerSummary> + Send>> {
        Box::pin(async move {
            self.tx.take();
            if !join_until(&mut self.task, deadline).await {
                warn!(webhook = %self.name, "JSON webhook flush timed out");
            }
            self.stats.summary(&self.name, KIND)
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

async fn run(
    cfg: JsonWebhookConfig,
    mut rx: mpsc::Receiver<Post>,
    client: reqwest::Client,
    breaker: Arc<Breaker>,
    stats: Arc<ConsumerStats>,
    notifier: Notifier,
    session_id: String,
) {
    let mut seq = 0u64;
    while let Some(post) = rx.recv().await {
        let body = post.body.to_string();
        let bytes = body.len() as u64;
        let key = format!("{session_id}:{}:{seq}", cfg.name);
        seq += 1;
        let policy = RetryPolicy {
            max_retries: cfg.max_retries,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
        };
        let result = with_retries(&policy, |_| {
            let request = breaker.allow().then(|| {
                stats.requests.fetch_add(1, Ordering::Relaxed);
                let mut req = client
                    .post(&cfg.url)
                    .query(&cfg.query)
                    .timeout(cfg.timeout)
                    .header("content-type", "application/json")
                    .header("idempotency-key", key.as_str());
                if let Some(secret) = &cfg.secret {
                    req = req.header("x-voxgate-signature", sign(secret, &key, body.as_bytes()));
                }
                req.body(body.clone())
            });
            let breaker = &breaker;
            async move {
                match request {
                    None => {
                        counter!(WEBHOOK_REQUESTS, "outcome" => "circuit_open").increment(1);
                        Attempt::Fatal("circuit_open".into())
                    }
                    Some(req) => http_attempt(req.send().await, breaker, |b| {
                        b.failure(5, Duration::from_secs(10))
                    }),
                }
            }
        })
        .await;
        let outcome: Result<(), &'static str> = match result {
            Ok(()) => Ok(()),
            Err(e) if e == "circuit_open" => Err("circuit_open"),
            Err(e) if e == "rejected" => Err("rejected"),
            Err(_) => Err("gave_up"),
        };
        match outcome {
            Ok(()) => {
                stats.delivered_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(reason) => {
                warn!(webhook = %cfg.name, reason, "JSON webhook document given up");
                stats.dropped_bytes.fetch_add(bytes, Ordering::Relaxed);
                dropped(KIND, reason, bytes);
            }
        }
        if let Some(reply) = post.reply {
            let (ok, err) = match outcome {
                Ok(()) => (true, ""),
                Err(reason) => (false, reason),
            };
            let _ = notifier.try_send(with_success(reply, ok, err));
        }
    }
}
