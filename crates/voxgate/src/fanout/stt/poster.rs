//! The transcript webhook of one speech-to-text consumer: final transcripts POSTed as the
//! contract's transcript document (`contract::transcript_doc`), one after another, from a
//! bounded queue, with retries and backoff. Outcomes are counted in
//! `voxgate_transcript_webhook_total{outcome}` (`delivered`, `gave_up`, `queue_full`).
//!
//! With a bus the poster does not exist: the bus publisher carries the same document and a
//! deliver worker posts it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use metrics::counter;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;
use voxgate_session::ServerEvent;

use super::ctx::Ctx;
use crate::config::SttConfig;
use crate::fanout::contract::{idempotency_key, json_request, transcript_doc};
use crate::fanout::http::{classify, HttpError};
use crate::fanout::retry::{with_retries, Attempt};
use crate::metrics::TRANSCRIPT_DELIVERIES;

/// Transcripts waiting for the transcript webhook per session and backend.
const POST_QUEUE: usize = 256;

/// One document and its idempotency key.
struct Outgoing {
    key: String,
    body: Bytes,
}

/// Posts final transcripts to `transcript_webhook`.
pub(crate) struct Poster {
    tx: mpsc::Sender<Outgoing>,
    task: JoinHandle<()>,
}

impl Poster {
    /// The poster of a backend with a transcript webhook (none when the bus carries them).
    pub fn spawn(ctx: &Ctx) -> Option<Self> {
        if ctx.transcripts_via_bus {
            return None;
        }
        let url = ctx.backend.cfg.transcript_webhook.clone()?;
        let (tx, rx) = mpsc::channel(POST_QUEUE);
        let task = tokio::spawn(run(
            ctx.backend.cfg.clone(),
            ctx.http.clone(),
            ctx.target.session_id.clone(),
            url,
            rx,
        ));
        Some(Self { tx, task })
    }

    /// Queues a final transcript without waiting; a full queue drops it, counted.
    pub fn offer(&self, ctx: &Ctx, seq: u64, event: &ServerEvent) {
        let target = &ctx.target;
        let Some(doc) = transcript_doc(&target.session_id, &target.uid, seq, event) else {
            return;
        };
        // Each party's transcripts are numbered apart: its own key space.
        let sink = match ctx.party {
            Some(party) => format!("{}.{}", ctx.name(), party.as_str()),
            None => ctx.name().to_owned(),
        };
        let out = Outgoing {
            key: idempotency_key(&target.session_id, &sink, seq),
            body: Bytes::from(doc.to_string()),
        };
        if self.tx.try_send(out).is_err() {
            counter!(TRANSCRIPT_DELIVERIES, "outcome" => "queue_full").increment(1);
            warn!(stt = %ctx.name(), "transcript webhook queue full; transcript dropped");
        }
    }

    /// Lets the queue drain (the caller bounds this with its deadline).
    pub async fn close(self) {
        drop(self.tx);
        let _ = self.task.await; // a panicked poster has nothing left to deliver
    }
}

async fn run(
    cfg: Arc<SttConfig>,
    client: reqwest::Client,
    session_id: String,
    url: String,
    mut rx: mpsc::Receiver<Outgoing>,
) {
    let timeout = Duration::from_millis(cfg.timeout_ms);
    while let Some(out) = rx.recv().await {
        let (client, url, out) = (&client, url.as_str(), &out);
        let outcome: Result<(), HttpError> = with_retries(&cfg.retry_policy(), move |_| {
            let req = client.post(url).timeout(timeout);
            let req = json_request(req, &out.key, None, out.body.clone());
            async move { Attempt::from(classify(req.send().await.map(|r| r.status()))) }
        })
        .await;
        let label = match outcome {
            Ok(()) => "delivered",
            Err(e) => {
                warn!(stt = %cfg.name, session = %session_id, error = %e, "transcript webhook gave up");
                "gave_up"
            }
        };
        counter!(TRANSCRIPT_DELIVERIES, "outcome" => label).increment(1);
    }
}
