//! The gateway side of the bus: a session's `bus` consumer.
//!
//! It batches audio per frozen audio webhook exactly as the in-process webhook would (one
//! message per request it would have made) and publishes batches, utterance ends and final
//! transcripts in order, one publish in flight per session, each with `Nats-Msg-Id` equal to the
//! in-process `Idempotency-Key` and reused on every retry. What it holds is capped
//! (`bus.max_buffer_seconds` per audio webhook): at half the client is warned (`bus_slow`), past
//! it audio is dropped, counted, and the session is closed with 1013 so the client retries.

use crate::fanout::join_until;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderMap;
use bytes::Bytes;
use metrics::counter;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};
use voxgate_session::{AudioChunk, ConsumerSummary, ServerEvent};

use super::{Bus, Kind, SessionRecord, Subjects, H_SEQUENCE, H_SESSION, H_START_SAMPLE};
use crate::fanout::{pcm_bytes, Consumer, ConsumerStats, Notifier, Offer};
use crate::metrics::{buffered, dropped, BUS_PUBLISHES, DELIVERED_BYTES};

const KIND: &str = "bus";
/// Items queued for the publisher (the byte cap is the real bound for audio).
const QUEUE_ITEMS: usize = 4096;
/// At most one `Persisted` event per this many samples (1 s).
const PERSISTED_EVERY: u64 = 16_000;

/// Where a session continues after another gateway published part of it.
#[derive(Debug, Clone, Default)]
pub struct Continuation {
    /// Per audio channel: (next sequence, first sample not yet published).
    pub audio: Vec<(u64, u64)>,
    /// Per transcript channel: next sequence.
    pub transcripts: Vec<u64>,
    /// Next utterance number.
    pub utterances: u64,
}

impl Continuation {
    /// The sample up to which every audio channel has published (where the session resumes).
    pub fn samples(&self) -> u64 {
        self.audio.iter().map(|(_, s)| *s).min().unwrap_or(0)
    }

    /// Reads what the stream holds for a session already started elsewhere.
    pub async fn read(
        bus: &Bus,
        subjects: &Subjects,
        rec: &SessionRecord,
    ) -> Result<Self, super::BusError> {
        let mut cont = Continuation::default();
        for (i, _) in rec.audio.iter().enumerate() {
            let last = bus.last(&subjects.subject(Kind::Audio, i)).await?;
            cont.audio.push(match last {
                Some(m) => (
                    m.sequence.map_or(0, |s| s + 1),
                    m.start_sample.unwrap_or(0) + (m.payload_len / 2) as u64,
                ),
                None => (0, 0),
            });
        }
        for (i, _) in rec.transcripts.iter().enumerate() {
            let last = bus.last(&subjects.subject(Kind::Transcript, i)).await?;
            cont.transcripts
                .push(last.and_then(|m| m.sequence).map_or(0, |s| s + 1));
        }
        let last = bus.last(&subjects.subject(Kind::Utterance, 0)).await?;
        cont.utterances = last.and_then(|m| m.sequence).map_or(0, |s| s + 1);
        Ok(cont)
    }
}

enum Item {
    Audio(AudioChunk),
    Message(Box<Outgoing>),
}

struct Outgoing {
    kind: Kind,
    channel: usize,
    id: String,
    headers: HeaderMap,
    payload: Bytes,
}

/// The ingest side of a session's bus consumer.
pub struct BusPublisher {
    tx: Option<mpsc::Sender<Item>>,
    stats: Arc<ConsumerStats>,
    session_id: String,
    record: Arc<SessionRecord>,
    transcript_seq: Vec<u64>,
    cap_bytes: u64,
    dropping: bool,
    warned_slow: bool,
    /// The session was asked to close (1013) because the bus buffer overflowed.
    close_requested: bool,
    notifier: Notifier,
    /// Set at close unless the session is expected to continue elsewhere (1001 drain, 1013).
    ended: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl BusPublisher {
    pub fn spawn(
        bus: Bus,
        subjects: Subjects,
        record: Arc<SessionRecord>,
        cont: Continuation,
        notifier: Notifier,
        started: bool,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_ITEMS);
        let stats = Arc::new(ConsumerStats::default());
        let channels = record.audio.len() as u64;
        let cap_bytes = (bus.cfg.max_buffer_seconds * 32_000.0) as u64 * channels.max(1);
        let batchers = record
            .audio
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let (seq, from) = cont.audio.get(i).copied().unwrap_or((0, 0));
                Batcher {
                    channel: i,
                    name: w.name.clone(),
                    batch_samples: w.batch_samples().unwrap_or(0) as usize,
                    batch: Vec::new(),
                    batch_start: from,
                    seq,
                    published_to: from,
                }
            })
            .collect();
        let ended = Arc::new(AtomicBool::new(false));
        let key = subjects.record_key();
        let task = tokio::spawn(
            Publisher {
                ended: ended.clone(),
                record: record.clone(),
                key,
                bus,
                subjects,
                session_id: record.session_id.clone(),
                stats: stats.clone(),
                batchers,
                notifier: notifier.clone(),
                persisted: cont.samples(),
                failing: false,
            }
            .run(rx, started),
        );
        Self {
            tx: Some(tx),
            stats,
            session_id: record.session_id.clone(),
            transcript_seq: record
                .transcripts
                .iter()
                .enumerate()
                .map(|(i, _)| cont.transcripts.get(i).copied().unwrap_or(0))
                .collect(),
            record,
            cap_bytes,
            dropping: false,
            warned_slow: false,
            close_requested: false,
            notifier,
            ended,
            task,
        }
    }

    fn send(&mut self, out: Outgoing) {
        let bytes = out.payload.len() as u64;
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(Item::Message(Box::new(out))).is_ok());
        if !sent {
            self.stats.dropped_bytes.fetch_add(bytes, Ordering::Relaxed);
            dropped(KIND, "queue_full", bytes);
            warn!(session = %self.session_id, "bus queue full; message dropped");
        }
    }
}

impl Consumer for BusPublisher {
    fn name(&self) -> &str {
        "bus"
    }
    fn wants_audio(&self) -> bool {
        !self.record.audio.is_empty()
    }
    fn on_audio(&mut self, chunk: &AudioChunk) -> Offer {
        let channels = self.record.audio.len() as u64;
        if channels == 0 {
            return Offer::Accepted;
        }
        let bytes = chunk.pcm.len() as u64 * 2 * channels;
        let held = self.stats.held_bytes.load(Ordering::Relaxed);
        if held + bytes <= self.cap_bytes {
            if let Some(Ok(())) = self
                .tx
                .as_ref()
                .map(|tx| tx.try_send(Item::Audio(chunk.clone())))
            {
                self.stats.held_bytes.fetch_add(bytes, Ordering::Relaxed);
                buffered(KIND, bytes as i64);
                self.dropping = false;
                if held + bytes > self.cap_bytes / 2 {
                    if !self.warned_slow {
                        // Not sent (the session's notice queue is full): tried again next chunk.
                        self.warned_slow = self
                            .notifier
                            .try_send(ServerEvent::warning(
                                "bus_slow",
                                "the delivery bus is not keeping up; audio is being held",
                            ))
                            .is_ok();
                    }
                } else {
                    self.warned_slow = false;
                }
                return Offer::Accepted;
            }
        }
        self.stats.dropped_bytes.fetch_add(bytes, Ordering::Relaxed);
        dropped(KIND, "bus_full", bytes);
        let first = !self.dropping;
        self.dropping = true;
        if first {
            warn!(session = %self.session_id, held, "bus buffer full; dropping audio and closing");
        }
        // The session closes with 1013 (the client should retry later). A request that finds
        // the session's notice queue full is made again with the next dropped chunk.
        if !self.close_requested {
            self.close_requested = self
                .notifier
                .try_send(ServerEvent::error(
                    "bus_unavailable",
                    "the delivery bus is unavailable and this session's buffer is full; retry later",
                ))
                .is_ok();
        }
        Offer::Dropped { first }
    }
    fn on_event(&mut self, event: &ServerEvent) {
        match event {
            ServerEvent::UtteranceEnd { utterance, .. } => {
                let mut headers = HeaderMap::new();
                headers.insert(H_SEQUENCE, utterance.to_string().as_str());
                headers.insert(H_SESSION, self.session_id.as_str());
                let out = Outgoing {
                    kind: Kind::Utterance,
                    channel: 0,
                    id: format!("{}:utterance:{utterance}", self.session_id),
                    headers,
                    payload: Bytes::from(event.to_json()),
                };
                self.send(out);
            }
            ServerEvent::Transcript {
                utterance,
                text,
                is_final: true,
                backend,
                start,
                end,
            } => {
                let Some(ch) = self
                    .record
                    .transcripts
                    .iter()
                    .position(|t| &t.backend == backend)
                else {
                    return;
                };
                let seq = self.transcript_seq[ch];
                self.transcript_seq[ch] += 1;
                // The in-process transcript webhook's document and key.
                let doc = serde_json::json!({
                    "session_id": self.session_id,
                    "uid": self.record.uid,
                    "backend": backend,
                    "sequence": seq,
                    "utterance": utterance,
                    "text": text,
                    "is_final": true,
                    "start": start,
                    "end": end,
                });
                let mut headers = HeaderMap::new();
                headers.insert(H_SEQUENCE, seq.to_string().as_str());
                headers.insert(H_SESSION, self.session_id.as_str());
                let out = Outgoing {
                    kind: Kind::Transcript,
                    channel: ch,
                    id: format!("{}:{backend}:{seq}", self.session_id),
                    headers,
                    payload: Bytes::from(doc.to_string()),
                };
                self.send(out);
            }
            _ => {}
        }
    }
    fn on_close(&mut self, code: u16) {
        self.ended
            .store(!matches!(code, 1001 | 1013), Ordering::Relaxed);
    }
    fn finish(
        mut self: Box<Self>,
        deadline: Instant,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ConsumerSummary> + Send>> {
        Box::pin(async move {
            self.tx.take();
            if !join_until(&mut self.task, deadline).await {
                let held = self.stats.drop_held(KIND, "close_timeout");
                warn!(session = %self.session_id, held, "bus publish did not finish before the deadline; the rest is dropped");
            }
            self.stats.summary("bus", KIND)
        })
    }
}

struct Batcher {
    channel: usize,
    name: String,
    batch_samples: usize,
    batch: Vec<i16>,
    batch_start: u64,
    seq: u64,
    /// First sample not yet published: audio below it (resent after a failover) is skipped.
    published_to: u64,
}

struct Publisher {
    ended: Arc<AtomicBool>,
    record: Arc<SessionRecord>,
    key: String,
    bus: Bus,
    subjects: Subjects,
    session_id: String,
    stats: Arc<ConsumerStats>,
    batchers: Vec<Batcher>,
    notifier: Notifier,
    /// Samples every audio channel has published (reported to the client as `Persisted`).
    persisted: u64,
    failing: bool,
}

impl Publisher {
    async fn run(mut self, mut rx: mpsc::Receiver<Item>, started: bool) {
        if started {
            let payload = Bytes::from(
                serde_json::json!({"session_id": self.session_id, "event": "start"}).to_string(),
            );
            self.publish(
                Kind::Start,
                0,
                format!("{}:start:0", self.session_id),
                HeaderMap::new(),
                payload,
            )
            .await;
        }
        while let Some(item) = rx.recv().await {
            match item {
                Item::Audio(chunk) => self.audio(&chunk).await,
                Item::Message(m) => {
                    self.publish(m.kind, m.channel, m.id, m.headers, m.payload)
                        .await;
                }
            }
        }
        // Close: the partial rest of each batch is sent, as in-process.
        for i in 0..self.batchers.len() {
            let b = &mut self.batchers[i];
            if !b.batch.is_empty() {
                let pcm = std::mem::take(&mut b.batch);
                let start = b.batch_start;
                self.publish_batch(i, start, pcm).await;
            }
        }
        self.report_persisted(true);
        if !self.ended.load(Ordering::Relaxed) {
            info!(session = %self.session_id, "bus session left open: it may continue on another gateway");
            return;
        }
        let ends: Vec<u64> = self.batchers.iter().map(|b| b.published_to).collect();
        let payload = Bytes::from(
            serde_json::json!({"session_id": self.session_id, "event": "end", "audio_end_samples": ends})
                .to_string(),
        );
        self.publish(
            Kind::End,
            0,
            format!("{}:end:0", self.session_id),
            HeaderMap::new(),
            payload,
        )
        .await;
        let mut rec = (*self.record).clone();
        rec.ended = true;
        if let Err(e) = self.bus.put_record(&self.key, &rec).await {
            warn!(session = %self.session_id, error = %e, "could not mark the bus session record ended");
        }
    }

    async fn audio(&mut self, chunk: &AudioChunk) {
        let len = chunk.pcm.len() as u64;
        for i in 0..self.batchers.len() {
            // Skip what an earlier gateway already published (a client resending after failover).
            let skip = {
                let b = &self.batchers[i];
                if b.batch.is_empty() {
                    b.published_to.saturating_sub(chunk.start).min(len)
                } else {
                    0
                }
            };
            if skip > 0 {
                self.release(skip * 2);
            }
            if skip == len {
                continue;
            }
            let pcm = &chunk.pcm[skip as usize..];
            let start = chunk.start + skip;
            if self.batchers[i].batch_samples == 0 {
                self.publish_batch(i, start, pcm.to_vec()).await;
                continue;
            }
            let ready = {
                let b = &mut self.batchers[i];
                let mut ready = Vec::new();
                // A gap (audio dropped upstream) ends the batch: batches stay contiguous.
                if !b.batch.is_empty() && start != b.batch_start + b.batch.len() as u64 {
                    ready.push((b.batch_start, std::mem::take(&mut b.batch)));
                }
                if b.batch.is_empty() {
                    b.batch_start = start;
                }
                b.batch.extend_from_slice(pcm);
                while b.batch.len() >= b.batch_samples {
                    let rest = b.batch.split_off(b.batch_samples);
                    let full = std::mem::replace(&mut b.batch, rest);
                    ready.push((b.batch_start, full));
                    b.batch_start += b.batch_samples as u64;
                }
                ready
            };
            for (start, pcm) in ready {
                self.publish_batch(i, start, pcm).await;
            }
        }
    }

    fn release(&self, bytes: u64) {
        self.stats.held_bytes.fetch_sub(bytes, Ordering::Relaxed);
        buffered(KIND, -(bytes as i64));
    }

    async fn publish_batch(&mut self, i: usize, start: u64, pcm: Vec<i16>) {
        let b = &mut self.batchers[i];
        let seq = b.seq;
        b.seq += 1;
        let id = format!("{}:{}:{seq}", self.session_id, b.name);
        let channel = b.channel;
        let mut headers = HeaderMap::new();
        headers.insert(H_SEQUENCE, seq.to_string().as_str());
        headers.insert(H_START_SAMPLE, start.to_string().as_str());
        headers.insert(H_SESSION, self.session_id.as_str());
        let bytes = pcm.len() as u64 * 2;
        let end = start + pcm.len() as u64;
        let stored = self
            .publish(
                Kind::Audio,
                channel,
                id,
                headers,
                Bytes::from(pcm_bytes(&pcm)),
            )
            .await;
        self.batchers[i].published_to = end;
        self.release(bytes);
        self.stats.next_seq.store(seq + 1, Ordering::Relaxed);
        if stored {
            self.stats
                .delivered_bytes
                .fetch_add(bytes, Ordering::Relaxed);
            counter!(DELIVERED_BYTES, "consumer" => KIND).increment(bytes);
        }
        self.report_persisted(false);
    }

    fn report_persisted(&mut self, last: bool) {
        let now = self
            .batchers
            .iter()
            .map(|b| b.published_to)
            .min()
            .unwrap_or(0);
        if now > self.persisted && (last || now >= self.persisted + PERSISTED_EVERY) {
            self.persisted = now;
            let _ = self
                .notifier
                .try_send(ServerEvent::Persisted { samples: now });
        }
    }

    /// Publishes until JetStream acknowledges it (same `Nats-Msg-Id` on every try); `false`
    /// when the server can never take it (over its max payload: dropped and counted). Only the
    /// consumer's finish deadline stops it (what is then unpublished is counted as dropped).
    async fn publish(
        &mut self,
        kind: Kind,
        channel: usize,
        id: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> bool {
        let subject = self.subjects.subject(kind, channel);
        let timeout = self.bus.cfg.publish_timeout();
        let mut backoff = Duration::from_millis(50);
        let mut tries = 0u32;
        loop {
            tries += 1;
            let msg = PublishMessage::build()
                .headers(headers.clone())
                .message_id(&id)
                .payload(payload.clone());
            let result = tokio::time::timeout(timeout, async {
                let ack = self.bus.js.send_publish(subject.clone(), msg).await?;
                ack.await
            })
            .await;
            let error = match result {
                Ok(Ok(ack)) => {
                    let outcome = if ack.duplicate { "duplicate" } else { "ok" };
                    counter!(BUS_PUBLISHES, "outcome" => outcome).increment(1);
                    if self.failing {
                        self.failing = false;
                        info!(session = %self.session_id, tries, "bus publishing again");
                    }
                    return true;
                }
                Ok(Err(e)) => {
                    if e.kind() == PublishErrorKind::MaxPayloadExceeded {
                        counter!(BUS_PUBLISHES, "outcome" => "too_large").increment(1);
                        warn!(session = %self.session_id, %id, "bus message over the server's max payload; dropped");
                        self.stats
                            .dropped_bytes
                            .fetch_add(payload.len() as u64, Ordering::Relaxed);
                        dropped(KIND, "too_large", payload.len() as u64);
                        return false;
                    }
                    e.to_string()
                }
                Err(_) => "publish acknowledgment timed out".to_owned(),
            };
            counter!(BUS_PUBLISHES, "outcome" => "error").increment(1);
            if !self.failing {
                self.failing = true;
                warn!(session = %self.session_id, %id, %error, "bus publish failed; retrying with the same message id");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}
