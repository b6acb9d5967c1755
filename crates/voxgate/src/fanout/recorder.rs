//! The recorder consumer: a session's 16 kHz audio and its events, written to object storage
//! as they arrive (layout in `recording`).
//!
//! Audio is cut at multiples of `recording.chunk_seconds` of the session's timeline (and at
//! gaps), one object per chunk keyed by its sample range, so a retried write, a resumed
//! session or one continued on another instance writes each range once under one key. Events
//! (one JSON line each) are flushed with every audio chunk and at close; a summary is written
//! last. Everything the recorder holds (queued, being cut, being written) is capped by
//! `recording.max_buffer_seconds`; past it new audio is dropped (`drop_newest`), counted under
//! `consumer="recorder"` and the client is warned once per episode. A write is retried with
//! backoff, each attempt bounded by `recording.timeout_ms`; one given up is counted
//! (`gave_up`). Ingest never waits for the store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use metrics::counter;
use object_store::{PutOptions, PutPayload};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};
use voxgate_session::{AudioChunk, CloseCode, ConsumerSummary, ServerEvent};

use super::batch::Batch;
use super::contract::pcm_bytes;
use super::queue::{ConsumerStats, QueueHandle};
use super::retry::{with_retries, Attempt, RetryPolicy};
use super::{Consumer, ConsumerKind, DropReason, Offer};
use crate::config::{RecordingConfig, RecordingLayout};
use crate::metrics::{RECORDING_EVENTS_DROPPED, RECORDING_WRITES};
use crate::recording::crypt::Key;
use crate::recording::layout::{omi_chunk, SessionKeys};
use crate::recording::Store;

/// The consumer's name in summaries and warnings.
pub const NAME: &str = "recorder";
/// Queue slots for events and close messages besides audio.
const EXTRA_ITEMS: usize = 1024;
/// Audio messages are at least this many bytes apart in the queue's item count (10 ms).
const MIN_CHUNK_BYTES: usize = 320;

enum Item {
    Audio(AudioChunk),
    Event(Bytes),
    /// The session's conversation changed (Omi's `103`): names audio objects in the Omi layout.
    Conversation(String),
    Close(CloseCode),
}

/// Cuts a session's audio at multiples of `size` samples of its timeline, and at gaps.
#[derive(Debug)]
pub struct Cutter {
    size: u64,
    start: u64,
    pcm: Vec<i16>,
}

impl Cutter {
    pub fn new(size: usize) -> Self {
        Self {
            size: size.max(1) as u64,
            start: 0,
            pcm: Vec::new(),
        }
    }

    /// Adds `pcm` at session sample `start`; returns the chunks it completes, in order.
    pub fn push(&mut self, start: u64, mut pcm: &[i16]) -> Vec<Batch> {
        let mut ready = Vec::new();
        if !self.pcm.is_empty() && start != self.start + self.pcm.len() as u64 {
            ready.extend(self.finish());
        }
        if self.pcm.is_empty() {
            self.start = start;
        }
        while !pcm.is_empty() {
            let end = self.start + self.pcm.len() as u64;
            let boundary = (end / self.size + 1) * self.size;
            let n = ((boundary - end) as usize).min(pcm.len());
            self.pcm.extend_from_slice(&pcm[..n]);
            pcm = &pcm[n..];
            if end + n as u64 == boundary {
                ready.extend(self.finish());
                self.start = boundary;
            }
        }
        ready
    }

    /// The open partial chunk (at close, or before a gap).
    pub fn finish(&mut self) -> Option<Batch> {
        if self.pcm.is_empty() {
            return None;
        }
        let pcm = std::mem::take(&mut self.pcm);
        let start = self.start;
        self.start += pcm.len() as u64;
        Some(Batch { start, pcm })
    }
}

/// The ingest side of one session's recorder.
pub struct Recorder {
    queue: QueueHandle<Item>,
    /// Event bytes queued or pending in the worker (capped by `max_event_bytes`).
    events_held: Arc<AtomicU64>,
    /// Events dropped on the ingest side (for the summary).
    events_dropped: Arc<AtomicU64>,
    max_event_bytes: u64,
}

/// Whose recording this is.
pub struct RecordingTarget {
    pub owner: String,
    pub session_id: String,
    pub uid: String,
    /// Set by the frontend before the session's first audio when the session continues another
    /// one's recording (an Omi reconnect); read by the recorder at its first audio.
    pub continuation: Option<Continuation>,
}

/// Where a session's audio lands when it continues another session's recording.
#[derive(Debug, Clone, PartialEq)]
pub struct ContinueAt {
    /// The session id the recording is kept under.
    pub recording_id: String,
    /// The recording's 16 kHz sample this session's sample 0 is.
    pub start_sample: u64,
    /// Capture time (unix seconds) of the recording's sample 0, when the client tells it
    /// (Omi's `audio_timeline=2`); names objects in the Omi layout.
    pub origin_unix: Option<f64>,
}

/// Shared between a frontend (which sets it once) and the session's recorder.
pub type Continuation = Arc<OnceLock<ContinueAt>>;

impl Recorder {
    pub fn spawn(cfg: Arc<RecordingConfig>, store: Store, target: RecordingTarget) -> Self {
        let stats = Arc::new(ConsumerStats::new(ConsumerKind::Recorder));
        let events_held = Arc::new(AtomicU64::new(0));
        let events_dropped = Arc::new(AtomicU64::new(0));
        let cap_bytes = cfg.max_buffer_bytes();
        let worker = Worker {
            keys: SessionKeys::new(&store.prefix, &target.owner, &target.session_id),
            continuation: target.continuation.clone(),
            offset: None,
            origin_unix: 0.0,
            key: cfg
                .keys
                .get(&target.uid)
                .and_then(|k| Key::from_hex(k).ok()),
            conversation: None,
            cut: Cutter::new(cfg.chunk_samples()),
            store,
            stats: stats.clone(),
            events_held: events_held.clone(),
            events_dropped: events_dropped.clone(),
            writer: format!("{:08x}", rand::random::<u32>()),
            events: Vec::new(),
            event_seq: 0,
            summary: Summary::new(target),
            retries: AtomicU64::new(0),
            cfg: cfg.clone(),
        };
        let items = cap_bytes / MIN_CHUNK_BYTES + EXTRA_ITEMS;
        Self {
            queue: QueueHandle::spawn(stats, items, cap_bytes as u64, |rx| worker.run(rx)),
            events_held,
            events_dropped,
            max_event_bytes: cfg.max_event_bytes as u64,
        }
    }
}

impl Consumer for Recorder {
    fn name(&self) -> &str {
        NAME
    }

    fn on_audio(&mut self, chunk: &AudioChunk) -> Offer {
        let bytes = chunk.pcm.len() as u64 * 2;
        let Err(refused) = self.queue.offer(Item::Audio(chunk.clone()), bytes) else {
            return Offer::Accepted;
        };
        let reason = refused.reason();
        let first = self.queue.dropped(reason, bytes);
        if first {
            warn!(%reason, "recorder dropping audio");
        }
        Offer::Dropped { first }
    }

    fn on_event(&mut self, event: &ServerEvent) {
        let mut line = event.to_json().into_bytes();
        line.push(b'\n');
        let len = line.len() as u64;
        let over = self.events_held.load(Ordering::Relaxed) + len > self.max_event_bytes;
        if let ServerEvent::Conversation {
            conversation_id: Some(id),
            ..
        } = event
        {
            // Outside the byte cap (at most 256 bytes, once per conversation change).
            let _ = self.queue.send(Item::Conversation(id.clone()));
        }
        if over || self.queue.send(Item::Event(line.into())).is_err() {
            counter!(RECORDING_EVENTS_DROPPED).increment(1);
            self.events_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.events_held.fetch_add(len, Ordering::Relaxed);
    }

    fn on_close(&mut self, code: CloseCode) {
        // Outside the byte cap: without it the summary only lacks the code.
        let _ = self.queue.send(Item::Close(code));
    }

    fn finish(
        self: Box<Self>,
        deadline: Instant,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ConsumerSummary> + Send>> {
        let mut me = *self;
        Box::pin(async move {
            let held = me.queue.finish(deadline).await.dropped;
            if held > 0 {
                warn!(held, "recorder flush timed out; audio dropped");
            }
            me.queue.summary(NAME)
        })
    }
}

/// The closing summary object (`summary.json`).
#[derive(Debug, serde::Serialize)]
struct Summary {
    #[serde(rename = "type")]
    kind: &'static str,
    session_id: String,
    uid: String,
    owner: String,
    writer: String,
    close_code: Option<u16>,
    /// The session samples this writer saw: `[first_sample, end_sample)`.
    first_sample: Option<u64>,
    end_sample: u64,
    chunks_written: u64,
    samples_written: u64,
    /// Sample ranges given up (written nowhere).
    lost: Vec<(u64, u64)>,
    events_dropped: u64,
    /// Object writes that failed and were tried again.
    write_retries: u64,
}

impl Summary {
    fn new(t: RecordingTarget) -> Self {
        Self {
            kind: "RecordingSummary",
            session_id: t.session_id,
            uid: t.uid,
            owner: t.owner,
            writer: String::new(),
            close_code: None,
            first_sample: None,
            end_sample: 0,
            chunks_written: 0,
            samples_written: 0,
            lost: Vec::new(),
            events_dropped: 0,
            write_retries: 0,
        }
    }
}

struct Worker {
    cfg: Arc<RecordingConfig>,
    store: Store,
    keys: SessionKeys,
    stats: Arc<ConsumerStats>,
    events_held: Arc<AtomicU64>,
    events_dropped: Arc<AtomicU64>,
    cut: Cutter,
    /// Distinguishes this writer's event objects from another instance's (a continued session).
    writer: String,
    events: Vec<u8>,
    event_seq: u32,
    summary: Summary,
    retries: AtomicU64,
    continuation: Option<Continuation>,
    /// The recording sample of session sample 0, known at the first audio.
    offset: Option<u64>,
    /// The user's key when its audio is encrypted at rest (`recording.keys`).
    key: Option<Key>,
    /// Capture time of recording sample 0 (the client's, or the first audio's arrival).
    origin_unix: f64,
    /// The conversation the audio belongs to (Omi's `103`; else the session id).
    conversation: Option<String>,
}

/// Which object a write is (the `object` label).
#[derive(Debug, Clone, Copy)]
enum Object {
    Audio,
    Events,
    Summary,
}

impl Object {
    fn as_str(self) -> &'static str {
        match self {
            Self::Audio => "audio",
            Self::Events => "events",
            Self::Summary => "summary",
        }
    }
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Item>) {
        self.summary.writer = self.writer.clone();
        while let Some(item) = rx.recv().await {
            match item {
                Item::Audio(c) => {
                    let start = c.start + self.offset();
                    self.summary.first_sample.get_or_insert(start);
                    self.summary.end_sample = start + c.pcm.len() as u64;
                    for batch in self.cut.push(start, &c.pcm) {
                        self.write_audio(batch).await;
                        self.flush_events().await;
                    }
                }
                Item::Event(line) => self.events.extend_from_slice(&line),
                Item::Conversation(id) if self.conversation.as_ref() != Some(&id) => {
                    // Omi's conversation switch: the open chunk belongs to the old one.
                    if let Some(rest) = self.cut.finish() {
                        self.write_audio(rest).await;
                    }
                    self.conversation = Some(id);
                }
                Item::Conversation(_) => {}
                Item::Close(code) => self.summary.close_code = Some(code.as_u16()),
            }
        }
        if let Some(rest) = self.cut.finish() {
            self.write_audio(rest).await;
        }
        self.flush_events().await;
        self.summary.events_dropped += self.events_dropped.load(Ordering::Relaxed);
        self.summary.write_retries = self.retries.load(Ordering::Relaxed);
        let body = serde_json::to_vec(&self.summary).expect("the summary serializes");
        let path = self.keys.summary();
        let _ = self.put(Object::Summary, &path, body.into()).await;
    }

    /// The recording sample of session sample 0, fixed at the first audio: 0, or where the
    /// session continues another's recording (which then also names the keys).
    fn offset(&mut self) -> u64 {
        if let Some(offset) = self.offset {
            return offset;
        }
        let at = self.continuation.as_ref().and_then(|c| c.get());
        let offset = at.map_or(0, |at| at.start_sample);
        self.origin_unix = at.and_then(|at| at.origin_unix).unwrap_or_else(|| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            now.map_or(0.0, |d| d.as_secs_f64())
        });
        if let Some(at) = at.filter(|at| at.recording_id != self.summary.session_id) {
            let prefix = &self.store.prefix;
            self.keys = SessionKeys::new(prefix, &self.summary.owner, &at.recording_id);
            debug!(recording = %at.recording_id, offset, "continuing a recording");
        }
        self.offset = Some(offset);
        offset
    }

    /// Writes one chunk; on return its bytes are delivered or counted as dropped.
    async fn write_audio(&mut self, batch: Batch) {
        let samples = batch.pcm.len() as u64;
        let end = batch.start + samples;
        let path = self.audio_key(batch.start, end);
        let mut body = Bytes::from(pcm_bytes(&batch.pcm));
        if let Some(key) = &self.key {
            body = key.seal(&body).into();
        }
        drop(batch);
        let ok = self.put(Object::Audio, &path, body).await;
        self.stats.release(samples * 2);
        if ok {
            self.stats.delivered(samples * 2);
            self.summary.chunks_written += 1;
            self.summary.samples_written += samples;
        } else {
            self.stats.count_dropped(DropReason::GaveUp, samples * 2);
            self.summary.lost.push((end - samples, end));
        }
    }

    /// The key of recording samples `[start, end)` in the configured layout.
    fn audio_key(&self, start: u64, end: u64) -> object_store::path::Path {
        match self.cfg.layout {
            RecordingLayout::Voxgate if self.key.is_some() => self.keys.audio_enc(start, end),
            RecordingLayout::Voxgate => self.keys.audio(start, end),
            RecordingLayout::Omi => {
                let rate = f64::from(voxgate_session::SAMPLE_RATE);
                let at = |sample: u64| self.origin_unix + sample as f64 / rate;
                let conversation = self.conversation.as_ref();
                let conversation = conversation.unwrap_or(&self.summary.session_id);
                let uid = &self.summary.uid;
                let span = (at(start), at(end));
                omi_chunk(
                    &self.store.prefix,
                    uid,
                    conversation,
                    span,
                    self.key.is_some(),
                )
            }
        }
    }

    /// Writes the events gathered since the last flush as one object.
    async fn flush_events(&mut self) {
        if self.events.is_empty() {
            return;
        }
        let lines = std::mem::take(&mut self.events);
        let len = lines.len() as u64;
        let count = lines.iter().filter(|&&b| b == b'\n').count() as u64;
        let path = self
            .keys
            .events(self.summary.end_sample, &self.writer, self.event_seq);
        self.event_seq += 1;
        if !self.put(Object::Events, &path, lines.into()).await {
            counter!(RECORDING_EVENTS_DROPPED).increment(count);
            self.summary.events_dropped += count;
        }
        self.events_held.fetch_sub(len, Ordering::Relaxed);
    }

    /// One object write with retries; true when it was stored.
    async fn put(&self, object: Object, path: &object_store::path::Path, body: Bytes) -> bool {
        let policy = RetryPolicy::from_ms(
            self.cfg.max_retries,
            self.cfg.backoff_initial_ms,
            self.cfg.backoff_max_ms,
        );
        let (store, timeout, retries) = (&self.store.inner, self.cfg.timeout(), &self.retries);
        let result = with_retries(&policy, |attempt| {
            let payload = PutPayload::from(body.clone());
            self.stats.request();
            async move {
                let put = store.put_opts(path, payload, PutOptions::default());
                let why = match tokio::time::timeout(timeout, put).await {
                    Ok(Ok(_)) => return Attempt::Done(()),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timed out".to_owned(),
                };
                counter!(RECORDING_WRITES, "object" => object.as_str(), "outcome" => "retry")
                    .increment(1);
                retries.fetch_add(1, Ordering::Relaxed);
                debug!(%path, attempt, %why, "recording write failed");
                Attempt::Retry(why)
            }
        })
        .await;
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        counter!(RECORDING_WRITES, "object" => object.as_str(), "outcome" => outcome).increment(1);
        if let Err(why) = &result {
            warn!(%path, %why, "recording write given up");
        }
        result.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(b: &[Batch]) -> Vec<(u64, usize)> {
        b.iter().map(|b| (b.start, b.pcm.len())).collect()
    }

    #[test]
    fn chunks_are_cut_at_multiples_of_the_size_and_at_gaps() {
        let mut c = Cutter::new(100);
        assert!(c.push(0, &[1; 60]).is_empty());
        assert_eq!(
            shape(&c.push(60, &[1; 250])),
            [(0, 100), (100, 100), (200, 100)]
        );
        // A gap at 310..350: the open 300..310 is closed, the next chunk ends at 400.
        assert_eq!(shape(&c.push(350, &[1; 60])), [(300, 10), (350, 50)]);
        assert_eq!(
            shape(&c.finish().into_iter().collect::<Vec<_>>()),
            [(400, 10)]
        );
        // A continuation on another instance at 410 cuts at the same boundaries.
        let mut d = Cutter::new(100);
        assert_eq!(shape(&d.push(410, &[1; 200])), [(410, 90), (500, 100)]);
    }
}
