//! `voxgate deliver`: workers that turn bus messages into webhook requests.
//!
//! One durable pull consumer per partition (`deliver-<n>`, filter `<prefix>.<n>.>`, explicit
//! acks). A worker owns its partitions: run workers with disjoint `--partitions` sets (a second
//! worker on the same partition is safe for the sinks, which see keys they already have, but it
//! delays delivery). Per session and channel, messages are delivered strictly in sequence order:
//! a cursor (the next sequence to deliver) is kept in the session KV bucket; an earlier sequence
//! is a duplicate (acked, not sent), a later one waits in a bounded reorder window.
//!
//! Outcomes: 2xx → cursor advanced, acked. 429, 408, 5xx, transport errors → NAK with a delay
//! that doubles per attempt (with jitter), and whatever waits behind it is NAKed too; after
//! `max_deliver` attempts, or on another 4xx, the message is terminated and a dead-letter event
//! is published to `<prefix>.dead.<tenant>.<session>`, and delivery goes on after it. Attempts
//! are counted by the worker for the message at the head of its channel (the JetStream consumer
//! itself redelivers without limit), so messages NAKed while they wait never run out of
//! deliveries and leave a hole.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures_util::StreamExt;
use metrics::counter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{header_u64, parse_subject, Bus, Kind, SessionRecord, H_SEQUENCE, H_START_SAMPLE};
use crate::config::Config;
use crate::fanout::contract::{audio_body, audio_request, json_request, AudioBatchInfo, Target};
use crate::fanout::http::{BreakerPolicy, Breakers, HttpOutcome};
use crate::fanout::retry::{Backoff, Jitter};
use crate::metrics::BUS_DELIVERIES;

/// Messages queued per session task; the partition loop waits when it is full (bounded by
/// `max_ack_pending` overall).
const SESSION_QUEUE: usize = 256;
/// A session task with nothing to do for this long ends (its state reloads from KV).
const SESSION_IDLE: Duration = Duration::from_secs(60);

/// Runs workers for `partitions` until `shutdown`.
pub async fn run(
    cfg: Config,
    partitions: Vec<u32>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let bus = Bus::connect(&cfg.bus, "voxgate-deliver").await?;
    let shared = Arc::new(Shared::new(&cfg, bus)?);
    let mut tasks = Vec::new();
    for p in partitions {
        anyhow::ensure!(
            p < cfg.bus.partitions,
            "partition {p} is out of range (bus.partitions = {})",
            cfg.bus.partitions
        );
        tasks.push(tokio::spawn(partition_loop(
            shared.clone(),
            p,
            shutdown.clone(),
        )));
    }
    info!(partitions = tasks.len(), "deliver worker running");
    for t in tasks {
        t.await?;
    }
    Ok(())
}

struct Shared {
    bus: Bus,
    http: reqwest::Client,
    http_guarded: reqwest::Client,
    breakers: Breakers,
    /// The breakers' limits (the gateway's JSON webhooks use the same defaults).
    breaker_policy: BreakerPolicy,
    /// Redelivery delays: `backoff_initial_ms` doubling to `backoff_max_ms`, equal jitter.
    backoff: Backoff,
}

impl Shared {
    fn new(cfg: &Config, bus: Bus) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let http_guarded = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(crate::policy::GuardedResolver {
                policy: Arc::new(cfg.webhook_policy.clone()),
            }))
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
            breakers: Breakers::default(),
            breaker_policy: BreakerPolicy::default(),
            backoff,
        })
    }
}

async fn partition_loop(shared: Arc<Shared>, partition: u32, shutdown: CancellationToken) {
    let cfg = shared.bus.cfg.clone();
    let name = format!("deliver-{partition}");
    let mut sessions: HashMap<String, mpsc::Sender<jetstream::Message>> = HashMap::new();
    let mut handled = 0u64;
    'outer: while !shutdown.is_cancelled() {
        let consumer = async {
            let stream = shared.bus.js.get_stream_no_info(&cfg.stream).await?;
            let consumer: jetstream::consumer::PullConsumer = stream
                .get_or_create_consumer(
                    &name,
                    pull::Config {
                        durable_name: Some(name.clone()),
                        filter_subject: format!("{}.{partition}.>", cfg.subject_prefix),
                        ack_policy: AckPolicy::Explicit,
                        ack_wait: Duration::from_secs_f64(cfg.ack_wait_seconds),
                        // Attempts are bounded by the worker (`bus.max_deliver` real POSTs of
                        // the message at the head of its channel): messages NAKed while they
                        // wait behind it must not run out of deliveries and leave a hole.
                        max_deliver: -1,
                        max_ack_pending: cfg.max_ack_pending,
                        num_replicas: cfg.replicas,
                        ..Default::default()
                    },
                )
                .await?;
            consumer
                .messages()
                .await
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })
        }
        .await;
        let mut messages = match consumer {
            Ok(m) => m,
            Err(e) => {
                warn!(partition, error = %e, "deliver: consumer not ready; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = shutdown.cancelled() => break,
                }
            }
        };
        info!(partition, "deliver: consuming");
        loop {
            let next = tokio::select! {
                m = messages.next() => m,
                () = shutdown.cancelled() => break 'outer,
            };
            let msg = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    // Pulls would otherwise only resume after the missed-heartbeat timeout
                    // (e.g. a first pull that raced the consumer's leader election): subscribe
                    // anew. Unacked messages are redelivered, so nothing is skipped.
                    warn!(partition, error = %e, "deliver: message stream error; re-subscribing");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(250)) => continue 'outer,
                        () = shutdown.cancelled() => break 'outer,
                    }
                }
                None => {
                    warn!(partition, "deliver: message stream ended; re-subscribing");
                    continue 'outer;
                }
            };
            let Some(parsed) = parse_subject(&msg.subject) else {
                warn!(subject = %msg.subject, "deliver: not a session subject; terminated");
                let _ = msg.ack_with(AckKind::Term).await;
                continue;
            };
            let key = format!("{}.{}", parsed.tenant, parsed.token);
            let mut msg = msg;
            loop {
                let tx = sessions.entry(key.clone()).or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(SESSION_QUEUE);
                    tokio::spawn(session_task(shared.clone(), key.clone(), rx));
                    tx
                });
                match tx.try_send(msg) {
                    Ok(()) => break,
                    Err(mpsc::error::TrySendError::Closed(back)) => {
                        // The task ended while idle: start a new one.
                        sessions.remove(&key);
                        msg = back;
                    }
                    Err(mpsc::error::TrySendError::Full(back)) => {
                        // One slow sink must not stall the partition: this session's message
                        // comes back later (its order is kept by the session's cursor).
                        counter!(BUS_DELIVERIES, "kind" => "any", "outcome" => "session_busy")
                            .increment(1);
                        let _ = back
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                        break;
                    }
                }
            }
            handled += 1;
            if handled.is_multiple_of(1024) {
                sessions.retain(|_, tx| !tx.is_closed());
            }
        }
    }
    info!(partition, "deliver: stopped");
}

/// Ordering state of one session channel.
struct Channel {
    next: u64,
    held: BTreeMap<u64, jetstream::Message>,
    /// Failed attempts of the message at `next`.
    attempts: u32,
}

async fn session_task(
    shared: Arc<Shared>,
    key: String,
    mut rx: mpsc::Receiver<jetstream::Message>,
) {
    let mut record: Option<Arc<SessionRecord>> = None;
    let mut channels: HashMap<(Kind, usize), Channel> = HashMap::new();
    loop {
        let msg = match tokio::time::timeout(SESSION_IDLE, rx.recv()).await {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => break,
        };
        let Some(parsed) = parse_subject(&msg.subject) else {
            continue;
        };
        let (kind, channel) = (parsed.kind, parsed.channel);
        if !matches!(kind, Kind::Audio | Kind::Transcript) {
            // Start, utterance and end events are for other bus readers; nothing to send.
            counter!(BUS_DELIVERIES, "kind" => kind.as_str(), "outcome" => "no_sink").increment(1);
            let _ = msg.ack().await;
            continue;
        }
        if record.is_none() {
            match shared.bus.record(&key).await {
                Ok(Some(r)) => record = Some(Arc::new(r)),
                Ok(None) => {
                    dead(&shared, &msg, "no_session_record", None).await;
                    continue;
                }
                Err(e) => {
                    warn!(session = %key, error = %e, "deliver: session record unavailable");
                    let _ = msg
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                    continue;
                }
            }
        }
        let rec = record.clone().expect("loaded above");
        let Some(seq) = msg_u64(&msg, H_SEQUENCE) else {
            dead(&shared, &msg, "malformed", None).await;
            continue;
        };
        let ch = match channels.entry((kind, channel)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                match load_cursor(&shared.bus, &cursor_key(&key, kind, channel)).await {
                    Ok(next) => v.insert(Channel {
                        next,
                        attempts: 0,
                        held: BTreeMap::new(),
                    }),
                    Err(e) => {
                        warn!(session = %key, error = %e, "deliver: cursor unavailable");
                        let _ = msg
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                        continue;
                    }
                }
            }
        };
        if seq < ch.next {
            counter!(BUS_DELIVERIES, "kind" => kind.as_str(), "outcome" => "duplicate")
                .increment(1);
            let _ = msg.ack().await;
            continue;
        }
        if seq > ch.next {
            counter!(BUS_DELIVERIES, "kind" => kind.as_str(), "outcome" => "held").increment(1);
            if let Some(old) = ch.held.insert(seq, msg) {
                let _ = old.ack_with(AckKind::Progress).await; // a redelivered copy replaces it
            }
            if ch.held.len() > shared.bus.cfg.reorder_window {
                if let Some((_, newest)) = ch.held.pop_last() {
                    let _ = newest
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                }
            }
            continue;
        }
        // seq == next: deliver it and whatever waited behind it.
        let ckey = cursor_key(&key, kind, channel);
        let mut current = Some(msg);
        while let Some(m) = current.take() {
            match deliver(&shared, &rec, kind, channel, &m, ch.attempts + 1).await {
                Step::Done(outcome) => {
                    ch.next += 1;
                    ch.attempts = 0;
                    if let Err(e) = store_cursor(&shared.bus, &ckey, ch.next).await {
                        // Not acked: a redelivery re-sends it with the same key.
                        warn!(session = %key, error = %e, "deliver: cursor not stored");
                        break;
                    }
                    let _ = m.double_ack().await;
                    counter!(BUS_DELIVERIES, "kind" => kind.as_str(), "outcome" => outcome)
                        .increment(1);
                    let next = ch.next;
                    current = ch.held.remove(&next);
                }
                Step::Retry(delay) => {
                    ch.attempts += 1;
                    counter!(BUS_DELIVERIES, "kind" => kind.as_str(), "outcome" => "retry")
                        .increment(1);
                    let _ = m.ack_with(AckKind::Nak(Some(delay))).await;
                    // What waits behind it comes back after it.
                    for (_, h) in std::mem::take(&mut ch.held) {
                        let _ = h
                            .ack_with(AckKind::Nak(Some(delay + Duration::from_millis(100))))
                            .await;
                    }
                }
            }
        }
    }
    // Held messages are not acked: JetStream redelivers them after ack_wait.
    debug!(session = %key, "deliver: session task idle; ending");
}

enum Step {
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

async fn deliver(
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
async fn dead(shared: &Shared, msg: &jetstream::Message, reason: &str, status: Option<u16>) {
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
fn msg_u64(msg: &jetstream::Message, name: &str) -> Option<u64> {
    msg.headers.as_ref().and_then(|h| header_u64(h, name))
}

/// The message's `Nats-Msg-Id` (the sink's `Idempotency-Key`).
fn message_id(msg: &jetstream::Message) -> Option<String> {
    msg.headers
        .as_ref()?
        .get(async_nats::header::NATS_MESSAGE_ID)
        .map(|v| v.as_str().to_owned())
}

fn cursor_key(session_key: &str, kind: Kind, channel: usize) -> String {
    format!("cursor.{session_key}.{}.{channel}", kind.as_str())
}

async fn load_cursor(bus: &Bus, key: &str) -> Result<u64, super::BusError> {
    match bus
        .records
        .get(key)
        .await
        .map_err(|e| super::BusError::Nats(e.to_string()))?
    {
        None => Ok(0),
        Some(v) => std::str::from_utf8(&v)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| super::BusError::Nats(format!("cursor {key} is not a number"))),
    }
}

async fn store_cursor(bus: &Bus, key: &str, next: u64) -> Result<(), super::BusError> {
    bus.records
        .put(key, Bytes::from(next.to_string()))
        .await
        .map_err(|e| super::BusError::Nats(e.to_string()))?;
    Ok(())
}
