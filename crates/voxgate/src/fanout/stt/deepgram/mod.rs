//! Deepgram-compatible streaming recognition over a WebSocket:
//! `{url}/v1/listen?encoding=linear16&sample_rate=16000&channels=1&interim_results=true`
//! (+ `model`, `language`), `Authorization: Token KEY`. Binary PCM16 goes out as it is decoded;
//! `{"type":"KeepAlive"}` when no audio was sent for `keepalive_seconds`; `{"type":"Finalize"}`
//! at each utterance end; `{"type":"CloseStream"}` at session end. `Results` come back as
//! interim and final `Transcript` events.
//!
//! Reconnects with backoff. Audio not yet acknowledged by a final result (its `start +
//! duration`) is kept and resent on the next connection; while idle only the segmenter's
//! lookback is kept. Everything held is capped by `max_buffer_seconds`: audio already sent is
//! forgotten first; audio that cannot be sent (backend away) is dropped newest-first, counted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod conn;

use futures_util::SinkExt;
use metrics::counter;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};
use voxgate_session::{seconds, AudioChunk, ConsumerSummary, ServerEvent};

use self::conn::{next_frame, send_text, Conn, Results};
use super::ctx::{sample_at, Ctx};
use super::poster::Poster;
use crate::config::SttConfig;
use crate::fanout::queue::{QueueHandle, Refused};
use crate::fanout::retry::Backoff;
use crate::fanout::{pcm_bytes, Consumer, DropReason, Offer};
use crate::metrics::STT_REQUESTS;

/// Items queued from ingest to the connection task (the byte cap is the real bound).
const QUEUE_ITEMS: usize = 4096;
/// Utterances remembered to attribute results to.
const UTTERANCES_KEPT: usize = 32;

pub use self::conn::{listen_url, DeepgramError};

enum In {
    Audio(AudioChunk),
    Started { utterance: u64, start: u64 },
    Ended { utterance: u64, end: u64 },
}

/// The ingest side of a Deepgram-compatible backend for one session.
pub struct DeepgramHandle {
    ctx: Ctx,
    queue: QueueHandle<In>,
    /// Bytes accepted and never sent (dropped if the task is cut off).
    unsent: Arc<AtomicU64>,
}

impl DeepgramHandle {
    pub(crate) fn spawn(ctx: Ctx, lookback_samples: u64) -> Self {
        let unsent = Arc::new(AtomicU64::new(0));
        let cap_bytes = ctx.backend.cfg.max_buffer_bytes() as u64;
        let worker = Worker {
            ctx: ctx.clone(),
            cfg: ctx.backend.cfg.clone(),
            unsent: unsent.clone(),
            cap_bytes,
            lookback: lookback_samples,
            retained: VecDeque::new(),
            open: None,
            utterances: VecDeque::new(),
            pending: VecDeque::new(),
            failing: false,
            seq: 0,
            poster: Poster::spawn(&ctx),
        };
        let queue = QueueHandle::spawn(ctx.stats.clone(), QUEUE_ITEMS, cap_bytes, |rx| {
            worker.run(rx)
        });
        Self { ctx, queue, unsent }
    }
}

impl Consumer for DeepgramHandle {
    fn name(&self) -> &str {
        self.ctx.name()
    }

    fn on_audio(&mut self, chunk: &AudioChunk) -> Offer {
        let bytes = chunk.pcm.len() as u64 * 2;
        let reason = match self.queue.offer(In::Audio(chunk.clone()), bytes) {
            Ok(()) => {
                self.unsent.fetch_add(bytes, Ordering::Relaxed);
                return Offer::Accepted;
            }
            Err(Refused::OverCap) => DropReason::BufferFull,
            Err(Refused::Full | Refused::Closed) => DropReason::QueueFull,
        };
        if self.queue.dropped(reason, bytes) {
            warn!(stt = %self.ctx.name(), session = %self.ctx.target.session_id, %reason, "streaming speech-to-text dropping audio");
            self.ctx.warn_dropping(reason);
        }
        Offer::Dropped { first: false }
    }

    fn on_event(&mut self, event: &ServerEvent) {
        let item = match *event {
            ServerEvent::SpeechStarted {
                utterance,
                timestamp,
            } => In::Started {
                utterance,
                start: sample_at(timestamp),
            },
            ServerEvent::UtteranceEnd { utterance, end, .. } => In::Ended {
                utterance,
                end: sample_at(end),
            },
            _ => return,
        };
        if self.queue.send(item).is_err() {
            warn!(stt = %self.ctx.name(), "streaming speech-to-text queue full; utterance boundary lost");
        }
    }

    fn finish(
        mut self: Box<Self>,
        deadline: Instant,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ConsumerSummary> + Send>> {
        Box::pin(async move {
            if !self.queue.close(deadline).await {
                // Only what was never sent is lost; what was sent is off the gauge either way.
                let unsent = self.unsent.swap(0, Ordering::Relaxed);
                if unsent > 0 {
                    warn!(stt = %self.ctx.name(), unsent, "streaming speech-to-text flush timed out; audio dropped");
                    self.ctx
                        .stats
                        .count_dropped(DropReason::CloseTimeout, unsent);
                }
                self.ctx.stats.forget_held();
            }
            self.queue.summary(self.ctx.name())
        })
    }
}

/// Audio kept for (re)sending.
struct Held {
    chunk: AudioChunk,
    /// Sent on some connection (counted as delivered once).
    sent: bool,
}

/// An utterance end waiting for its `from_finalize` result.
struct Pending {
    utterance: u64,
    end: u64,
    at: Instant,
}

struct Worker {
    ctx: Ctx,
    cfg: Arc<SttConfig>,
    unsent: Arc<AtomicU64>,
    cap_bytes: u64,
    lookback: u64,
    retained: VecDeque<Held>,
    open: Option<u64>,
    /// (utterance, start, end) of recent utterances.
    utterances: VecDeque<(u64, u64, Option<u64>)>,
    pending: VecDeque<Pending>,
    failing: bool,
    seq: u64,
    poster: Option<Poster>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<In>) {
        let keepalive = Duration::from_secs_f64(self.cfg.keepalive_seconds);
        let mut tick = tokio::time::interval(keepalive / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = Backoff::new(&self.cfg.retry_policy());
        let mut next_attempt = Instant::now();
        let mut conn: Option<Conn> = None;
        let mut input_open = true;
        loop {
            if !input_open
                && conn.is_none()
                && (self.unsent.load(Ordering::Relaxed) == 0 || self.retained.is_empty())
                && self.pending.is_empty()
            {
                break;
            }
            if conn.is_none() && Instant::now() >= next_attempt {
                match self.connect().await {
                    Ok(c) => {
                        backoff = Backoff::new(&self.cfg.retry_policy());
                        let mut c = c;
                        if self.resend(&mut c).await.is_ok() {
                            conn = Some(c);
                        } else {
                            self.trouble("connection lost while resending");
                            next_attempt = Instant::now() + backoff.delay();
                        }
                    }
                    Err(e) => {
                        counter!(STT_REQUESTS, "backend" => self.cfg.name.clone(), "outcome" => "connect_error").increment(1);
                        self.trouble(e);
                        next_attempt = Instant::now() + backoff.delay();
                    }
                }
            }
            if !input_open {
                if let Some(c) = conn.as_mut() {
                    if !c.close_sent {
                        c.close_sent = true;
                        if send_text(c, r#"{"type":"CloseStream"}"#).await.is_err() {
                            conn = None;
                            continue;
                        }
                    }
                }
            }
            tokio::select! {
                item = rx.recv(), if input_open => match item {
                    Some(item) => {
                        if let Err(()) = self.input(item, conn.as_mut()).await {
                            self.trouble("connection lost while sending");
                            conn = None;
                            next_attempt = Instant::now() + backoff.delay();
                        }
                    }
                    None => input_open = false,
                },
                frame = next_frame(&mut conn) => match frame {
                    Some(Ok(Message::Text(text))) => {
                        if let Some(c) = conn.as_ref() {
                            self.on_text(c, text.as_str()).await;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        let closing = conn.as_ref().is_some_and(|c| c.close_sent);
                        conn = None;
                        if closing {
                            break;
                        }
                        self.trouble("connection closed by the backend");
                        next_attempt = Instant::now() + backoff.delay();
                    }
                    Some(Ok(_)) => {}
                },
                _ = tick.tick() => {
                    if let Some(c) = conn.as_mut() {
                        if !c.close_sent && c.last_send.elapsed() >= keepalive
                            && send_text(c, r#"{"type":"KeepAlive"}"#).await.is_err()
                        {
                            conn = None;
                            self.trouble("connection lost while idle");
                            next_attempt = Instant::now() + backoff.delay();
                        }
                    }
                    // A Finalize that never got its answer does not pin audio forever.
                    let timeout = Duration::from_millis(self.cfg.timeout_ms);
                    while self.pending.front().is_some_and(|p| p.at.elapsed() > timeout) {
                        let p = self.pending.pop_front().expect("front exists");
                        debug!(stt = %self.cfg.name, utterance = p.utterance, "no final result after Finalize");
                    }
                    self.trim();
                },
                () = tokio::time::sleep_until(next_attempt), if conn.is_none() => {}
            }
        }
        // What was never sent is dropped; the rest was delivered.
        let unsent: u64 = self
            .retained
            .iter()
            .filter(|h| !h.sent)
            .map(|h| h.chunk.pcm.len() as u64 * 2)
            .sum();
        let held: u64 = self
            .retained
            .iter()
            .map(|h| h.chunk.pcm.len() as u64 * 2)
            .sum();
        self.retained.clear();
        self.unsent.fetch_sub(unsent, Ordering::Relaxed);
        self.ctx.stats.count_dropped(DropReason::NotSent, unsent);
        self.ctx.stats.release(held);
        if let Some(p) = self.poster.take() {
            p.close().await;
        }
    }

    async fn connect(&self) -> Result<Conn, DeepgramError> {
        let conn = Conn::open(&self.cfg).await?;
        counter!(STT_REQUESTS, "backend" => self.cfg.name.clone(), "outcome" => "connected")
            .increment(1);
        info!(stt = %self.cfg.name, session = %self.ctx.target.session_id, "streaming speech-to-text connected");
        Ok(conn)
    }

    /// Sends everything retained (unacknowledged) on a new connection, then the Finalize of
    /// utterances still waiting for their final result.
    async fn resend(&mut self, c: &mut Conn) -> Result<(), ()> {
        for i in 0..self.retained.len() {
            self.send_audio(c, i).await?;
        }
        if !self.pending.is_empty() {
            send_text(c, r#"{"type":"Finalize"}"#).await?;
        }
        Ok(())
    }

    async fn send_audio(&mut self, c: &mut Conn, i: usize) -> Result<(), ()> {
        let held = &mut self.retained[i];
        let chunk = &held.chunk;
        if c.next_session != Some(chunk.start) {
            c.map.push((c.pos, chunk.start));
            if c.map.len() > 256 {
                c.map.remove(0);
            }
        }
        c.sink
            .send(Message::Binary(pcm_bytes(&chunk.pcm).into()))
            .await
            .map_err(|_| ())?;
        c.pos += chunk.pcm.len() as u64;
        c.next_session = Some(chunk.start + chunk.pcm.len() as u64);
        c.sent_until = chunk.start + chunk.pcm.len() as u64;
        c.last_send = Instant::now();
        if !held.sent {
            held.sent = true;
            let bytes = chunk.pcm.len() as u64 * 2;
            self.unsent.fetch_sub(bytes, Ordering::Relaxed);
            self.ctx.stats.delivered(bytes);
        }
        Ok(())
    }

    async fn input(&mut self, item: In, conn: Option<&mut Conn>) -> Result<(), ()> {
        match item {
            In::Audio(chunk) => {
                self.retained.push_back(Held { chunk, sent: false });
                let result = match conn {
                    Some(c) => self.send_audio(c, self.retained.len() - 1).await,
                    None => Ok(()),
                };
                self.trim();
                result
            }
            In::Started { utterance, start } => {
                self.open = Some(utterance);
                self.utterances.push_back((utterance, start, None));
                if self.utterances.len() > UTTERANCES_KEPT {
                    self.utterances.pop_front();
                }
                Ok(())
            }
            In::Ended { utterance, end } => {
                self.open = None;
                if let Some(u) = self.utterances.iter_mut().find(|u| u.0 == utterance) {
                    u.2 = Some(end);
                }
                self.pending.push_back(Pending {
                    utterance,
                    end,
                    at: Instant::now(),
                });
                match conn {
                    Some(c) => send_text(c, r#"{"type":"Finalize"}"#).await,
                    None => Ok(()),
                }
            }
        }
    }

    /// Keeps memory within bounds: idle, only the lookback; always, within the cap (sent audio
    /// is forgotten first, then unsent audio is dropped, counted).
    fn trim(&mut self) {
        let idle = self.open.is_none() && self.pending.is_empty();
        let mut total: u64 = self.retained.iter().map(|h| h.chunk.pcm.len() as u64).sum();
        // A `SpeechStarted` decided in the newest chunk reaches back at most `lookback` before it.
        let last = self.retained.back().map_or(0, |h| h.chunk.pcm.len() as u64);
        while let Some(front) = self.retained.front() {
            let len = front.chunk.pcm.len() as u64;
            let over_lookback =
                idle && self.retained.len() > 1 && total - len - last >= self.lookback;
            let over_cap =
                total * 2 > self.cap_bytes * 3 / 4 && (front.sent || total * 2 > self.cap_bytes);
            if !(over_lookback || over_cap) {
                break;
            }
            let h = self.retained.pop_front().expect("front exists");
            total -= len;
            let bytes = len * 2;
            if !h.sent {
                self.unsent.fetch_sub(bytes, Ordering::Relaxed);
                self.ctx
                    .stats
                    .count_dropped(DropReason::BackendUnavailable, bytes);
            }
            self.ctx.stats.release(bytes);
        }
    }

    /// Forgets retained audio that a final result covered (up to session sample `end`).
    fn acknowledge(&mut self, end: u64) {
        while let Some(front) = self.retained.front() {
            if !front.sent || front.chunk.start + front.chunk.pcm.len() as u64 > end {
                break;
            }
            let h = self.retained.pop_front().expect("front exists");
            self.ctx.stats.release(h.chunk.pcm.len() as u64 * 2);
        }
    }

    async fn on_text(&mut self, c: &Conn, text: &str) {
        let Ok(r) = serde_json::from_str::<Results>(text) else {
            debug!(stt = %self.cfg.name, "unparsed message from the backend");
            return;
        };
        if r.kind != "Results" {
            return;
        }
        counter!(STT_REQUESTS, "backend" => self.cfg.name.clone(), "outcome" => "result")
            .increment(1);
        self.ctx.backend.success();
        if self.failing {
            self.failing = false;
            info!(stt = %self.cfg.name, session = %self.ctx.target.session_id, "streaming speech-to-text recovered");
        }
        let start = c.to_session(r.start);
        let end = c.to_session(r.start + r.duration).max(start);
        let text = r
            .channel
            .and_then(|ch| ch.alternatives.into_iter().next())
            .map(|a| a.transcript)
            .unwrap_or_default();
        if r.is_final {
            self.acknowledge(end);
        }
        let utterance = self.utterance_of(start, end);
        if r.from_finalize || (r.speech_final && self.pending.front().is_some_and(|p| end >= p.end))
        {
            if let Some(p) = self.pending.pop_front() {
                self.ctx.observe_latency(p.at);
            }
        }
        self.trim();
        if text.trim().is_empty() {
            return;
        }
        let event = self
            .ctx
            .transcript(utterance, text, r.is_final, seconds(start), seconds(end));
        if r.is_final {
            if let Some(p) = &self.poster {
                p.offer(&self.ctx, self.seq, &event);
            }
            self.seq += 1;
        }
        self.ctx.notify(event).await;
    }

    /// The utterance overlapping `[start, end)` most (else the open or the last one).
    fn utterance_of(&self, start: u64, end: u64) -> u64 {
        let overlap = |u: &(u64, u64, Option<u64>)| {
            let e = u.2.unwrap_or(u64::MAX).min(end);
            e.saturating_sub(u.1.max(start))
        };
        self.utterances
            .iter()
            .filter(|u| overlap(u) > 0)
            .max_by_key(|u| overlap(u))
            .or_else(|| self.utterances.back())
            .map(|u| u.0)
            .or(self.open)
            .unwrap_or(0)
    }

    /// A connection problem: counted, warned once per outage.
    fn trouble(&mut self, error: impl std::fmt::Display) {
        let error = error.to_string();
        self.ctx.backend.failure(&error);
        if !self.failing {
            self.failing = true;
            warn!(stt = %self.cfg.name, session = %self.ctx.target.session_id, %error, "streaming speech-to-text unavailable; reconnecting");
            self.ctx.notifier.offer(ServerEvent::warning(
                "stt_unavailable",
                format!(
                    "speech-to-text backend {:?} unavailable ({error}); reconnecting, unacknowledged audio will be resent",
                    self.cfg.name
                ),
            ));
        }
    }
}
