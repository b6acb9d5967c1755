//! One delivery attempt of `voxgate deliver`: the HTTP clients and breakers shared by a
//! worker's partitions, the webhook request a bus message stands for (built exactly as the
//! gateway would have made it in-process), the attempt's verdict (done, or retry after a
//! backoff delay), and dead letters.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use metrics::counter;
use tracing::{debug, warn};

use super::{header_u64, parse_subject, Bus, Kind, SessionRecord, H_SEQUENCE, H_START_SAMPLE};
use crate::config::Config;
use crate::fanout::contract::{audio_body, audio_request, json_request, AudioBatchInfo, Target};
use crate::fanout::http::{BreakerPolicy, Breakers, HttpOutcome};
use crate::fanout::retry::{Backoff, Jitter};
use crate::metrics::BUS_DELIVERIES;

/// What a worker's delivery attempts share.
pub(super) struct Shared {
    pub(super) bus: Bus,
    http: reqwest::Client,
    http_guarded: reqwest::Client,
    breakers: Breakers,
    /// The breakers' limits (the gateway's JSON webhooks use the same defaults).
    breaker_policy: BreakerPolicy,
    /// Redelivery delays: `backoff_initial_ms` doubling to `backoff_max_ms`, equal jitter.
    backoff: Backoff,
}

impl Shared {
    pub(super) fn new(cfg: &Config, bus: Bus) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let http_guarded = crate::policy::guarded(
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none()),
            &cfg.webhook_policy,
        )
        .build()?;
        let backoff = Backoff::with(
            Duration::from_millis(cfg.bus.backoff_initial_ms),
            Duration::from_millis(cfg.bus.backoff_max_ms),
            Jitter::Equal,
        );
        Ok(Self {
            bus,
            http,
            http_guarded,
            breakers: Breakers::new(cfg.webhook_policy.max_tracked_endpoints),
            breaker_policy: BreakerPolicy::default(),
            backoff,
        })
    }
}

/// The verdict of one delivery attempt.
pub(super) enum Step {
    /// Handled (delivered, or given up and dead-lettered): the cursor moves on.
    Done(&'static str),
    /// Try again after this delay.
    Retry(Duration),
}

/// Why a message stands for no webhook request.
enum NoRequest {
    /// The record has no sink at the message's channel.
    UnknownChannel,
    /// A kind no sink takes.
    NoSink,
}

/// The webhook request a message stands for, and its URL (the breaker's key), built exactly
/// as the gateway would have made it in-process.
fn sink_request(
    shared: &Shared,
    rec: &SessionRecord,
    kind: Kind,
    channel: usize,
    msg: &jetstream::Message,
    id: &str,
) -> Result<(String, reqwest::RequestBuilder), NoRequest> {
    let client = if rec.from_hook {
        &shared.http_guarded
    } else {
        &shared.http
    };
    match kind {
        Kind::Audio => {
            let Some(w) = rec.audio.get(channel) else {
                return Err(NoRequest::UnknownChannel);
            };
            let target = Target {
                session_id: rec.session_id.clone(),
                uid: rec.uid.clone(),
            };
            let info = AudioBatchInfo {
                target: &target,
                idempotency_key: id,
                sequence: msg_u64(msg, H_SEQUENCE).unwrap_or(0),
                start_sample: msg_u64(msg, H_START_SAMPLE).unwrap_or(0),
                samples: msg.payload.len() / 2,
            };
            let body = Bytes::from(audio_body(&w.body, &msg.payload));
            Ok((w.url.clone(), audio_request(client, w, &info, body)))
        }
        Kind::Transcript => {
            let Some(t) = rec.transcripts.get(channel) else {
                return Err(NoRequest::UnknownChannel);
            };
            let req = client
                .post(&t.url)
                .timeout(Duration::from_millis(t.timeout_ms));
            Ok((
                t.url.clone(),
                json_request(req, id, None, msg.payload.clone()),
            ))
        }
        _ => Err(NoRequest::NoSink),
    }
}

/// Sends a message to its sink once (`attempt` counts from 1) and says what follows: the
/// cursor moves on, or the message is tried again after a backoff delay.
pub(super) async fn deliver(
    shared: &Shared,
    rec: &SessionRecord,
    kind: Kind,
    channel: usize,
    msg: &jetstream::Message,
    attempt: u32,
) -> Step {
    let id = message_id(msg).unwrap_or_default();
    let (url, request) = match sink_request(shared, rec, kind, channel, msg, &id) {
        Ok(sink) => sink,
        Err(NoRequest::UnknownChannel) => {
            dead(shared, msg, "unknown_channel", None).await;
            return Step::Done("dead");
        }
        Err(NoRequest::NoSink) => return Step::Done("no_sink"),
    };
    let breaker = shared.breakers.get(&url);
    let last_try = i64::from(attempt) >= shared.bus.cfg.max_deliver;
    // Retryable failures and an open breaker are retried; a rejection is final.
    let failure = match breaker.send(shared.breaker_policy, || request).await {
        HttpOutcome::Delivered => return Step::Done("delivered"),
        HttpOutcome::Rejected(status) => {
            warn!(session = %rec.session_id, %id, %status, "deliver: rejected by the sink; dead-lettered");
            dead(shared, msg, "rejected", Some(status.as_u16())).await;
            return Step::Done("rejected");
        }
        failure => failure,
    };
    if last_try {
        warn!(session = %rec.session_id, %id, attempt, %failure, "deliver: out of attempts; dead-lettered");
        dead(shared, msg, "max_deliver", None).await;
        return Step::Done("gave_up");
    }
    debug!(session = %rec.session_id, %id, attempt, %failure, "deliver: will retry");
    Step::Retry(shared.backoff.delay_for(attempt.saturating_sub(1)))
}

/// Terminates a message and records why on the dead-letter subject.
pub(super) async fn dead(
    shared: &Shared,
    msg: &jetstream::Message,
    reason: &str,
    status: Option<u16>,
) {
    let id = message_id(msg);
    let (tenant, token) = parse_subject(&msg.subject)
        .map(|p| (p.tenant.to_owned(), p.token.to_owned()))
        .unwrap_or_else(|| ("unknown".into(), "unknown".into()));
    // Only a message without a JetStream reply subject has no info; its fields are then null.
    let info = msg.info().ok();
    let event = serde_json::json!({
        "reason": reason,
        "status": status,
        "message_id": id,
        "subject": msg.subject.as_str(),
        "stream_sequence": info.as_ref().map(|i| i.stream_sequence),
        "delivered": info.as_ref().map(|i| i.delivered),
    });
    let subject = super::dead_subject(&shared.bus.cfg.subject_prefix, &tenant, &token);
    counter!(BUS_DELIVERIES, "kind" => "dead_letter", "outcome" => "published").increment(1);
    match shared
        .bus
        .js
        .publish(subject, Bytes::from(event.to_string()))
        .await
    {
        Ok(ack) => {
            if let Err(e) = ack.await {
                warn!(error = %e, "deliver: dead letter not acknowledged");
            }
        }
        Err(e) => warn!(error = %e, "deliver: dead letter not published"),
    }
    let _ = msg.ack_with(AckKind::Term).await;
}

/// A numeric header of a bus message.
pub(super) fn msg_u64(msg: &jetstream::Message, name: &str) -> Option<u64> {
    msg.headers.as_ref().and_then(|h| header_u64(h, name))
}

/// The message's `Nats-Msg-Id` (the sink's `Idempotency-Key`).
fn message_id(msg: &jetstream::Message) -> Option<String> {
    msg.headers
        .as_ref()?
        .get(async_nats::header::NATS_MESSAGE_ID)
        .map(|v| v.as_str().to_owned())
}
