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
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod conn;

use futures_util::SinkExt;
use metrics::counter;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
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

/// The worker's side of the backend connection: the live one, if any, and when to try the
/// next.
struct Link {
    conn: Option<Conn>,
    backoff: Backoff,
    next_attempt: Instant,
}

impl Link {
    /// Sends `CloseStream` once; `false` when that lost the connection.
    async fn close_stream(&mut self) -> bool {
        let Some(c) = self.conn.as_mut() else {
            return true;
        };
        if c.close_sent {
            return true;
        }
        c.close_sent = true;
        if send_text(c, r#"{"type":"CloseStream"}"#).await.is_err() {
            self.conn = None;
            return false;
        }
        true
    }
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
        let mut link = Link {
            conn: None,
            backoff: Backoff::new(&self.cfg.retry_policy()),
            next_attempt: Instant::now(),
        };
        let mut input_open = true;
        loop {
            if !input_open && link.conn.is_none() && self.nothing_to_wait_for() {
                break;
            }
            if link.conn.is_none() && Instant::now() >= link.next_attempt {
                self.reconnect(&mut link).await;
            }
            // The input ended: the backend is asked to finish; losing the connection while
            // asking goes round again (reconnect, resend, ask again).
            if !input_open && !link.close_stream().await {
                continue;
            }
            tokio::select! {
                item = rx.recv(), if input_open => match item {
                    Some(item) => {
                        if let Err(()) = self.input(item, link.conn.as_mut()).await {
                            self.retry_later(&mut link, "connection lost while sending");
                        }
                    }
                    None => input_open = false,
                },
                frame = next_frame(&mut link.conn) => {
                    if self.on_frame(frame, &mut link).await.is_break() {
                        break;
                    }
                },
                _ = tick.tick() => self.on_tick(&mut link, keepalive).await,
                () = tokio::time::sleep_until(link.next_attempt), if link.conn.is_none() => {}
            }
        }
        self.wind_down().await;
    }

    /// Whether the task may end once input and connection are gone: no unsent audio (or none
    /// retained) and no Finalize waiting for its answer.
    fn nothing_to_wait_for(&self) -> bool {
        (self.unsent.load(Ordering::Relaxed) == 0 || self.retained.is_empty())
            && self.pending.is_empty()
    }

    /// Connects and resends what is retained; on failure the next attempt waits for the backoff.
    async fn reconnect(&mut self, link: &mut Link) {
        match self.connect().await {
            Ok(mut c) => {
                link.backoff = Backoff::new(&self.cfg.retry_policy());
                if self.resend(&mut c).await.is_ok() {
                    link.conn = Some(c);
                } else {
                    self.retry_later(link, "connection lost while resending");
                }
            }
            Err(e) => {
                counter!(STT_REQUESTS, "backend" => self.cfg.name.clone(), "outcome" => "connect_error").increment(1);
                self.retry_later(link, e);
            }
        }
    }

    /// A frame from the backend; `Break` when the connection closed after `CloseStream` (the
    /// backend has answered everything).
    async fn on_frame(
        &mut self,
        frame: Option<Result<Message, WsError>>,
        link: &mut Link,
    ) -> ControlFlow<()> {
        match frame {
            Some(Ok(Message::Text(text))) => {
                if let Some(c) = link.conn.as_ref() {
                    self.on_text(c, text.as_str()).await;
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                if link.conn.as_ref().is_some_and(|c| c.close_sent) {
                    link.conn = None;
                    return ControlFlow::Break(());
                }
                self.retry_later(link, "connection closed by the backend");
            }
            Some(Ok(_)) => {}
        }
        ControlFlow::Continue(())
    }

    /// Periodic work: a KeepAlive on a quiet connection, Finalize answers given up on, trim.
    async fn on_tick(&mut self, link: &mut Link, keepalive: Duration) {
        if let Some(c) = link.conn.as_mut() {
            if !c.close_sent
                && c.last_send.elapsed() >= keepalive
                && send_text(c, r#"{"type":"KeepAlive"}"#).await.is_err()
            {
                self.retry_later(link, "connection lost while idle");
            }
        }
        // A Finalize that never got its answer does not pin audio forever.
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        while self
            .pending
            .front()
            .is_some_and(|p| p.at.elapsed() > timeout)
        {
            let p = self.pending.pop_front().expect("front exists");
            debug!(stt = %self.cfg.name, utterance = p.utterance, "no final result after Finalize");
        }
        self.trim();
    }

    /// Drops the connection, reports the trouble and schedules the next attempt.
    fn retry_later(&mut self, link: &mut Link, why: impl std::fmt::Display) {
        link.conn = None;
        self.trouble(why);
        link.next_attempt = Instant::now() + link.backoff.delay();
    }

    /// At the end: what was never sent is dropped, the rest was delivered; the poster flushes.
    async fn wind_down(mut self) {
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
        self.ctx.backend.failure("unavailable");
        if !self.failing {
            self.failing = true;
            warn!(stt = %self.cfg.name, session = %self.ctx.target.session_id, %error, "streaming speech-to-text unavailable; reconnecting");
            self.ctx.notifier.offer(ServerEvent::warning(
                "stt_unavailable",
                format!(
                    "speech-to-text backend {:?} unavailable; reconnecting, unacknowledged audio will be resent (details are in the gateway log)",
                    self.cfg.name
                ),
            ));
        }
    }
}
