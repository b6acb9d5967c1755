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

use super::attempt::{dead, deliver, msg_u64, Shared, Step};
use super::{parse_subject, Bus, Kind, SessionRecord, H_SEQUENCE};
use crate::config::Config;
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

/// Reads one partition until shutdown, subscribing anew whenever its message stream fails or
/// ends (the session tasks it started live on across subscriptions).
async fn partition_loop(shared: Arc<Shared>, partition: u32, shutdown: CancellationToken) {
    let mut worker = Partition {
        shared,
        number: partition,
        sessions: HashMap::new(),
        handled: 0,
    };
    while !shutdown.is_cancelled() {
        let messages = match worker.subscribe().await {
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
        if let Consumed::Stopped = worker.consume(messages, &shutdown).await {
            break;
        }
    }
    info!(partition, "deliver: stopped");
}

/// Why a partition stopped reading its message stream.
enum Consumed {
    /// The stream failed or ended: subscribe anew.
    Resubscribe,
    /// Shutdown.
    Stopped,
}

/// One partition's worker: its durable consumer and the session tasks it feeds.
struct Partition {
    shared: Arc<Shared>,
    number: u32,
    /// Queues of the session tasks, by `<tenant>.<token>`.
    sessions: HashMap<String, mpsc::Sender<jetstream::Message>>,
    /// Messages handed to session tasks (closed queues are swept every 1024).
    handled: u64,
}

impl Partition {
    /// Creates (or finds) the partition's durable consumer and subscribes to its messages.
    async fn subscribe(&self) -> Result<pull::Stream, Box<dyn std::error::Error + Send + Sync>> {
        let cfg = &self.shared.bus.cfg;
        let name = format!("deliver-{}", self.number);
        let stream = self.shared.bus.js.get_stream_no_info(&cfg.stream).await?;
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: format!("{}.{}.>", cfg.subject_prefix, self.number),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: Duration::from_secs_f64(cfg.ack_wait_seconds),
                    // Attempts are bounded by the worker (`bus.max_deliver` real POSTs of the
                    // message at the head of its channel): messages NAKed while they wait
                    // behind it must not run out of deliveries and leave a hole.
                    max_deliver: -1,
                    max_ack_pending: cfg.max_ack_pending,
                    num_replicas: cfg.replicas,
                    ..Default::default()
                },
            )
            .await?;
        Ok(consumer.messages().await?)
    }

    /// Hands each message to its session's task until the stream fails or ends, or shutdown.
    async fn consume(
        &mut self,
        mut messages: pull::Stream,
        shutdown: &CancellationToken,
    ) -> Consumed {
        let partition = self.number;
        loop {
            let next = tokio::select! {
                m = messages.next() => m,
                () = shutdown.cancelled() => return Consumed::Stopped,
            };
            let msg = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    // Pulls would otherwise only resume after the missed-heartbeat timeout
                    // (e.g. a first pull that raced the consumer's leader election): subscribe
                    // anew. Unacked messages are redelivered, so nothing is skipped.
                    warn!(partition, error = %e, "deliver: message stream error; re-subscribing");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(250)) => return Consumed::Resubscribe,
                        () = shutdown.cancelled() => return Consumed::Stopped,
                    }
                }
                None => {
                    warn!(partition, "deliver: message stream ended; re-subscribing");
                    return Consumed::Resubscribe;
                }
            };
            let Some(parsed) = parse_subject(&msg.subject) else {
                warn!(subject = %msg.subject, "deliver: not a session subject; terminated");
                let _ = msg.ack_with(AckKind::Term).await;
                continue;
            };
            let key = format!("{}.{}", parsed.tenant, parsed.token);
            self.dispatch(key, msg).await;
        }
    }

    /// Queues a message on its session's task, starting one if there is none.
    async fn dispatch(&mut self, key: String, mut msg: jetstream::Message) {
        loop {
            let tx = self.sessions.entry(key.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(SESSION_QUEUE);
                tokio::spawn(session_task(self.shared.clone(), key.clone(), rx));
                tx
            });
            match tx.try_send(msg) {
                Ok(()) => break,
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    // The task ended while idle: start a new one.
                    self.sessions.remove(&key);
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
        self.handled += 1;
        if self.handled.is_multiple_of(1024) {
            self.sessions.retain(|_, tx| !tx.is_closed());
        }
    }
}

/// Ordering state of one session channel.
struct Channel {
    next: u64,
    held: BTreeMap<u64, jetstream::Message>,
    /// Failed attempts of the message at `next`.
    attempts: u32,
}

/// Delivers one session's messages in order until its queue closes or it is idle for
/// `SESSION_IDLE`.
async fn session_task(
    shared: Arc<Shared>,
    key: String,
    mut rx: mpsc::Receiver<jetstream::Message>,
) {
    let mut session = Session {
        shared,
        key,
        record: None,
        channels: HashMap::new(),
    };
    while let Ok(Some(msg)) = tokio::time::timeout(SESSION_IDLE, rx.recv()).await {
        session.handle(msg).await;
    }
    // Held messages are not acked: JetStream redelivers them after ack_wait.
    debug!(session = %session.key, "deliver: session task idle; ending");
}

/// One session's delivery state: its record (loaded once) and its channels' ordering.
struct Session {
    shared: Arc<Shared>,
    /// `<tenant>.<token>`, the record's KV key.
    key: String,
    record: Option<Arc<SessionRecord>>,
    channels: HashMap<(Kind, usize), Channel>,
}

impl Session {
    /// Delivers, holds, acks or dead-letters one message of the session.
    async fn handle(&mut self, msg: jetstream::Message) {
        let Some(parsed) = parse_subject(&msg.subject) else {
            return;
        };
        let (kind, channel) = (parsed.kind, parsed.channel);
        if !matches!(kind, Kind::Audio | Kind::Transcript) {
            // Start, utterance and end events are for other bus readers; nothing to send.
            counter!(BUS_DELIVERIES, "kind" => kind.as_str(), "outcome" => "no_sink").increment(1);
            let _ = msg.ack().await;
            return;
        }
        let Some(rec) = self.record(&msg).await else {
            return;
        };
        let Some(seq) = msg_u64(&msg, H_SEQUENCE) else {
            dead(&self.shared, &msg, "malformed", None).await;
            return;
        };
        let Some(ch) = open_channel(
            &mut self.channels,
            &self.shared.bus,
            &self.key,
            (kind, channel),
            &msg,
        )
        .await
        else {
            return;
        };
        if seq < ch.next {
            counter!(BUS_DELIVERIES, "kind" => kind.as_str(), "outcome" => "duplicate")
                .increment(1);
            let _ = msg.ack().await;
            return;
        }
        if seq > ch.next {
            counter!(BUS_DELIVERIES, "kind" => kind.as_str(), "outcome" => "held").increment(1);
            ch.hold(seq, msg, self.shared.bus.cfg.reorder_window).await;
            return;
        }
        // seq == next: deliver it and whatever waited behind it.
        let lane = Lane {
            shared: &self.shared,
            key: &self.key,
            rec: &rec,
            kind,
            channel,
        };
        lane.deliver_in_order(ch, msg).await;
    }

    /// The session's record, loaded on first use; `None` when the message was dealt with
    /// (dead-lettered without a record, NAKed while the bucket is unavailable).
    async fn record(&mut self, msg: &jetstream::Message) -> Option<Arc<SessionRecord>> {
        if let Some(rec) = &self.record {
            return Some(rec.clone());
        }
        match self.shared.bus.record(&self.key).await {
            Ok(Some(r)) => {
                let rec = Arc::new(r);
                self.record = Some(rec.clone());
                Some(rec)
            }
            Ok(None) => {
                dead(&self.shared, msg, "no_session_record", None).await;
                None
            }
            Err(e) => {
                warn!(session = %self.key, error = %e, "deliver: session record unavailable");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                None
            }
        }
    }
}

/// A channel's ordering state, its cursor loaded from KV on first use; `None` when the cursor
/// is unavailable (the message is then NAKed).
async fn open_channel<'a>(
    channels: &'a mut HashMap<(Kind, usize), Channel>,
    bus: &Bus,
    session_key: &str,
    (kind, channel): (Kind, usize),
    msg: &jetstream::Message,
) -> Option<&'a mut Channel> {
    match channels.entry((kind, channel)) {
        std::collections::hash_map::Entry::Occupied(e) => Some(e.into_mut()),
        std::collections::hash_map::Entry::Vacant(v) => {
            match load_cursor(bus, &cursor_key(session_key, kind, channel)).await {
                Ok(next) => Some(v.insert(Channel {
                    next,
                    attempts: 0,
                    held: BTreeMap::new(),
                })),
                Err(e) => {
                    warn!(session = %session_key, error = %e, "deliver: cursor unavailable");
                    let _ = msg
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                    None
                }
            }
        }
    }
}

impl Channel {
    /// Keeps a message that came before its turn, within the reorder window (beyond it, the
    /// newest held message is NAKed).
    async fn hold(&mut self, seq: u64, msg: jetstream::Message, window: usize) {
        if let Some(old) = self.held.insert(seq, msg) {
            let _ = old.ack_with(AckKind::Progress).await; // a redelivered copy replaces it
        }
        if self.held.len() > window {
            if let Some((_, newest)) = self.held.pop_last() {
                let _ = newest
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }
}

/// One session channel's sink, as delivery sees it.
struct Lane<'a> {
    shared: &'a Shared,
    /// The session's record key.
    key: &'a str,
    rec: &'a SessionRecord,
    kind: Kind,
    channel: usize,
}

impl Lane<'_> {
    /// Delivers the message at the channel's cursor, then each held message that is next in
    /// turn; a retry NAKs it and everything held behind it.
    async fn deliver_in_order(&self, ch: &mut Channel, msg: jetstream::Message) {
        let (shared, key, kind) = (self.shared, self.key, self.kind);
        let ckey = cursor_key(key, kind, self.channel);
        let mut current = Some(msg);
        while let Some(m) = current.take() {
            match deliver(shared, self.rec, kind, self.channel, &m, ch.attempts + 1).await {
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
