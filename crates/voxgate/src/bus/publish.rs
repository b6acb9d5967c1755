//! The gateway side of the bus: a session's `bus` consumer.
//!
//! It batches audio per frozen audio webhook exactly as the in-process webhook would (one
//! message per request it would have made) and publishes batches, utterance ends and final
//! transcripts in order, one publish in flight per session, each with `Nats-Msg-Id` equal to the
//! in-process `Idempotency-Key` and reused on every retry. What it holds is capped
//! (`bus.max_buffer_seconds` per audio webhook): at half the client is warned (`bus_slow`), past
//! it audio is dropped, counted, and the session is closed with 1013 so the client retries.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::HeaderMap;
use bytes::Bytes;
use metrics::counter;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};
use voxgate_session::{AudioChunk, CloseCode, ConsumerSummary, ServerEvent, SAMPLE_RATE};

use super::{Bus, Kind, SessionRecord, Subjects, H_SEQUENCE, H_SESSION, H_START_SAMPLE};
use crate::fanout::batch::{Batch, Batcher};
use crate::fanout::contract::{idempotency_key, pcm_bytes, transcript_doc, BYTES_PER_SECOND};
use crate::fanout::queue::{ConsumerStats, QueueHandle};
use crate::fanout::{Consumer, ConsumerKind, DropReason, Notifier, Offer};
use crate::metrics::BUS_PUBLISHES;

/// Items queued for the publisher (the byte cap is the real bound for audio).
const QUEUE_ITEMS: usize = 4096;
/// At most one `Persisted` event per this many samples (1 s).
const PERSISTED_EVERY: u64 = SAMPLE_RATE as u64;

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
    queue: QueueHandle<Item>,
    session_id: String,
    record: Arc<SessionRecord>,
    transcript_seq: Vec<u64>,
    warned_slow: bool,
    /// The session was asked to close (1013) because the bus buffer overflowed.
    close_requested: bool,
    notifier: Notifier,
    /// Set at close unless the session is expected to continue elsewhere (1001 drain, 1013).
    ended: Arc<AtomicBool>,
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
        let stats = Arc::new(ConsumerStats::new(ConsumerKind::Bus));
        let channels = record.audio.len() as u64;
        let cap_bytes =
            (bus.cfg.max_buffer_seconds * f64::from(BYTES_PER_SECOND)) as u64 * channels.max(1);
        let audio = record
            .audio
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let (seq, from) = cont.audio.get(i).copied().unwrap_or((0, 0));
                AudioChannel {
                    channel: i,
                    name: w.name.clone(),
                    batcher: Batcher::new(w.batch_samples().unwrap_or(0) as usize),
                    seq,
                    published_to: from,
                }
            })
            .collect();
        let ended = Arc::new(AtomicBool::new(false));
        let publisher = Publisher {
            ended: ended.clone(),
            record: record.clone(),
            key: subjects.record_key(),
            bus,
            subjects,
            session_id: record.session_id.clone(),
            stats: stats.clone(),
            audio,
            notifier: notifier.clone(),
            persisted: cont.samples(),
            failing: false,
        };
        Self {
            queue: QueueHandle::spawn(stats, QUEUE_ITEMS, cap_bytes, move |rx| {
                publisher.run(rx, started)
            }),
            session_id: record.session_id.clone(),
            transcript_seq: record
                .transcripts
                .iter()
                .enumerate()
                .map(|(i, _)| cont.transcripts.get(i).copied().unwrap_or(0))
                .collect(),
            record,
            warned_slow: false,
            close_requested: false,
            notifier,
            ended,
        }
    }

    fn send(&mut self, out: Outgoing) {
        let bytes = out.payload.len() as u64;
        if self.queue.send(Item::Message(Box::new(out))).is_err() {
            self.queue
                .stats()
                .count_dropped(DropReason::QueueFull, bytes);
            warn!(session = %self.session_id, "bus queue full; message dropped");
        }
    }

    /// Past half the cap the client is warned (`bus_slow`) once, until it drains below half.
    fn warn_if_slow(&mut self, held: u64) {
        if held <= self.queue.cap_bytes() / 2 {
            self.warned_slow = false;
        } else if !self.warned_slow {
            // Not sent (the session's notice queue is full): tried again next chunk.
            self.warned_slow = self.notifier.offer(ServerEvent::warning(
                "bus_slow",
                "the delivery bus is not keeping up; audio is being held",
            ));
        }
    }

    /// The final transcript message of backend channel `ch`: the in-process transcript
    /// webhook's document and key.
    fn transcript(&mut self, ch: usize, event: &ServerEvent) -> Option<Outgoing> {
        let seq = self.transcript_seq[ch];
        let doc = transcript_doc(&self.session_id, &self.record.uid, seq, event)?;
        self.transcript_seq[ch] += 1;
        let backend = &self.record.transcripts[ch].backend;
        let mut headers = HeaderMap::new();
        headers.insert(H_SEQUENCE, seq.to_string().as_str());
        headers.insert(H_SESSION, self.session_id.as_str());
        Some(Outgoing {
            kind: Kind::Transcript,
            channel: ch,
            id: idempotency_key(&self.session_id, backend, seq),
            headers,
            payload: Bytes::from(doc.to_string()),
        })
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
        let held = self.queue.stats().held();
        if self.queue.offer(Item::Audio(chunk.clone()), bytes).is_ok() {
            self.warn_if_slow(held + bytes);
            return Offer::Accepted;
        }
        let first = self.queue.dropped(DropReason::BusFull, bytes);
        if first {
            warn!(session = %self.session_id, held, "bus buffer full; dropping audio and closing");
        }
        // The session closes with 1013 (the client should retry later). A request that finds
        // the session's notice queue full is made again with the next dropped chunk.
        if !self.close_requested {
            self.close_requested = self.notifier.close(
                CloseCode::TryAgainLater,
                "bus_unavailable",
                "the delivery bus is unavailable and this session's buffer is full; retry later",
            );
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
                is_final: true,
                backend,
                ..
            } => {
                let channel = self
                    .record
                    .transcripts
                    .iter()
                    .position(|t| &t.backend == backend);
                if let Some(out) = channel.and_then(|ch| self.transcript(ch, event)) {
                    self.send(out);
                }
            }
            _ => {}
        }
    }
    fn on_close(&mut self, code: CloseCode) {
        // A drain (1001) or a bus overflow (1013) leaves the session to continue elsewhere.
        let continues = matches!(code, CloseCode::GoingAway | CloseCode::TryAgainLater);
        self.ended.store(!continues, Ordering::Relaxed);
    }
    fn finish(
        mut self: Box<Self>,
        deadline: Instant,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ConsumerSummary> + Send>> {
        Box::pin(async move {
            let done = self.queue.finish(deadline).await;
            if !done.in_time {
                warn!(session = %self.session_id, held = done.dropped, "bus publish did not finish before the deadline; the rest is dropped");
            }
            self.queue.summary("bus")
        })
    }
}

/// One audio webhook of the session's record: its batches and where they stand.
struct AudioChannel {
    channel: usize,
    name: String,
    batcher: Batcher,
    seq: u64,
    /// First sample not yet published: audio below it (resent after a failover) is skipped.
    published_to: u64,
}

/// Why one publish attempt failed.
#[derive(Debug, thiserror::Error)]
enum PublishFailure {
    #[error("{0}")]
    Nats(#[from] PublishError),
    #[error("publish acknowledgment timed out")]
    AckTimeout,
}

struct Publisher {
    ended: Arc<AtomicBool>,
    record: Arc<SessionRecord>,
    key: String,
    bus: Bus,
    subjects: Subjects,
    session_id: String,
    stats: Arc<ConsumerStats>,
    audio: Vec<AudioChannel>,
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
        for i in 0..self.audio.len() {
            if let Some(rest) = self.audio[i].batcher.finish() {
                self.publish_batch(i, rest).await;
            }
        }
        self.report_persisted(true);
        if !self.ended.load(Ordering::Relaxed) {
            info!(session = %self.session_id, "bus session left open: it may continue on another gateway");
            return;
        }
        self.end().await;
    }

    /// The session ended here: its end event, and its record marked ended.
    async fn end(&mut self) {
        let ends: Vec<u64> = self.audio.iter().map(|c| c.published_to).collect();
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
        for i in 0..self.audio.len() {
            // Skip what an earlier gateway already published (a client resending after failover).
            let c = &self.audio[i];
            let skip = if c.batcher.is_empty() {
                c.published_to.saturating_sub(chunk.start).min(len)
            } else {
                0
            };
            self.stats.release(skip * 2);
            if skip == len {
                continue;
            }
            let ready = self.audio[i]
                .batcher
                .push(chunk.start + skip, &chunk.pcm[skip as usize..]);
            for batch in ready {
                self.publish_batch(i, batch).await;
            }
        }
    }

    async fn publish_batch(&mut self, i: usize, batch: Batch) {
        let c = &mut self.audio[i];
        let seq = c.seq;
        c.seq += 1;
        let id = idempotency_key(&self.session_id, &c.name, seq);
        let channel = c.channel;
        let mut headers = HeaderMap::new();
        headers.insert(H_SEQUENCE, seq.to_string().as_str());
        headers.insert(H_START_SAMPLE, batch.start.to_string().as_str());
        headers.insert(H_SESSION, self.session_id.as_str());
        let bytes = batch.pcm.len() as u64 * 2;
        let end = batch.start + batch.pcm.len() as u64;
        let payload = Bytes::from(pcm_bytes(&batch.pcm));
        let stored = self
            .publish(Kind::Audio, channel, id, headers, payload)
            .await;
        self.audio[i].published_to = end;
        self.stats.release(bytes);
        self.stats.set_next_seq(seq + 1);
        if stored {
            self.stats.delivered(bytes);
        }
        self.report_persisted(false);
    }

    fn report_persisted(&mut self, last: bool) {
        let now = self.audio.iter().map(|c| c.published_to).min().unwrap_or(0);
        if now > self.persisted && (last || now >= self.persisted + PERSISTED_EVERY) {
            self.persisted = now;
            // Progress only: a later report (at the latest the last one) says as much.
            self.notifier.offer(ServerEvent::Persisted { samples: now });
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
        let mut backoff = super::retry_backoff();
        let mut tries = 0u32;
        loop {
            tries += 1;
            let error = match self.try_publish(&subject, &id, &headers, &payload).await {
                Ok(ack) => {
                    let outcome = if ack.duplicate { "duplicate" } else { "ok" };
                    counter!(BUS_PUBLISHES, "outcome" => outcome).increment(1);
                    if self.failing {
                        self.failing = false;
                        info!(session = %self.session_id, tries, "bus publishing again");
                    }
                    return true;
                }
                Err(PublishFailure::Nats(e))
                    if e.kind() == PublishErrorKind::MaxPayloadExceeded =>
                {
                    counter!(BUS_PUBLISHES, "outcome" => "too_large").increment(1);
                    warn!(session = %self.session_id, %id, "bus message over the server's max payload; dropped");
                    self.stats
                        .count_dropped(DropReason::TooLarge, payload.len() as u64);
                    return false;
                }
                Err(e) => e,
            };
            counter!(BUS_PUBLISHES, "outcome" => "error").increment(1);
            if !self.failing {
                self.failing = true;
                warn!(session = %self.session_id, %id, %error, "bus publish failed; retrying with the same message id");
            }
            tokio::time::sleep(backoff.delay()).await;
        }
    }

    /// One publish and its acknowledgment, within `publish_timeout_ms`.
    async fn try_publish(
        &self,
        subject: &str,
        id: &str,
        headers: &HeaderMap,
        payload: &Bytes,
    ) -> Result<PublishAck, PublishFailure> {
        let msg = PublishMessage::build()
            .headers(headers.clone())
            .message_id(id)
            .payload(payload.clone());
        let attempt = async {
            let ack = self.bus.js.send_publish(subject.to_owned(), msg).await?;
            Ok(ack.await?)
        };
        tokio::time::timeout(self.bus.cfg.publish_timeout(), attempt)
            .await
            .map_err(|_| PublishFailure::AckTimeout)?
    }
}
