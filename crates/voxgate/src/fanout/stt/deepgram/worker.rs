//! The connection task of one streaming session: sends audio and control messages, reads
//! results, reconnects, switches the finalize mode when the backend refuses `Finalize`, cuts the
//! connection at each utterance end when utterances are isolated (`isolate_utterances`: the
//! flush is awaited, then a new connection takes the audio from the cut on), and at the end
//! flushes with `CloseStream` until the flush deadline, accounting for every utterance.

use std::ops::ControlFlow;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{debug, info, warn};
use voxgate_session::{seconds, AudioChunk, ServerEvent};

use super::audio::Retained;
use super::conn::{next_frame, send_text, Conn, Results, CLOSE_STREAM, FINALIZE, KEEP_ALIVE};
use super::track::{Outcome, Tracker};
use crate::config::{FinalizeMode, SttConfig};
use crate::fanout::retry::Backoff;
use crate::fanout::stt::ctx::Ctx;
use crate::fanout::stt::poster::Poster;
use crate::metrics::{STT_FINALIZE_FALLBACKS, STT_REQUESTS};

/// What ingest hands the connection task.
pub(super) enum In {
    Audio(AudioChunk),
    Started {
        utterance: u64,
        start: u64,
    },
    Ended {
        utterance: u64,
        end: u64,
    },
    /// The session closes; the task must be done by `deadline`.
    Close {
        deadline: Instant,
    },
}

/// `isolate_utterances`: ends the connection at an utterance end with `CloseStream`; its flush
/// covers the utterances it carried (`Worker::on_flushed`).
async fn cut(c: &mut Conn) -> Result<(), ()> {
    c.close_sent = true;
    c.cut_at = Some(c.sent_until);
    send_text(c, CLOSE_STREAM).await
}

/// Utterances remembered to attribute results to and account for.
const UTTERANCES_KEPT: usize = 32;
/// Time kept before the session's close deadline to report what was lost.
const REPORT_MARGIN: Duration = Duration::from_millis(300);

/// The worker's side of the backend connection: the live one, if any, and when to try the
/// next.
struct Link {
    conn: Option<Conn>,
    backoff: Backoff,
    next_attempt: Instant,
}

pub(super) struct Worker {
    ctx: Ctx,
    cfg: Arc<SttConfig>,
    audio: Retained,
    open: Option<u64>,
    track: Tracker,
    failing: bool,
    seq: u64,
    poster: Option<Poster>,
    /// The session's close deadline, once known.
    session_deadline: Option<Instant>,
    /// The input ended: results are awaited until then.
    flush_by: Option<Instant>,
}

impl Worker {
    pub fn new(ctx: Ctx, unsent: Arc<AtomicU64>, cap_bytes: u64, lookback: u64) -> Self {
        Self {
            cfg: ctx.backend.cfg.clone(),
            audio: Retained::new(ctx.stats.clone(), unsent, cap_bytes, lookback),
            open: None,
            track: Tracker::new(UTTERANCES_KEPT),
            failing: false,
            seq: 0,
            poster: Poster::spawn(&ctx),
            session_deadline: None,
            flush_by: None,
            ctx,
        }
    }

    pub async fn run(mut self, mut rx: mpsc::Receiver<In>) {
        let keepalive = self.cfg.keepalive();
        let mut tick = tokio::time::interval(keepalive.min(Duration::from_secs(1)) / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut link = Link {
            conn: None,
            backoff: Backoff::new(&self.cfg.retry_policy()),
            next_attempt: Instant::now(),
        };
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        loop {
            if let Some(by) = self.flush_by {
                if Instant::now() >= by {
                    self.settle(Vec::new(), "").await;
                    break;
                }
                if link.conn.is_none() && !self.track.waiting() && !self.audio.has_unsent() {
                    break;
                }
            }
            if link.conn.is_none() && Instant::now() >= link.next_attempt {
                self.reconnect(&mut link).await;
            }
            // The input ended: the backend is asked to flush; losing the connection while
            // asking goes round again (reconnect, resend, ask again).
            if self.flush_by.is_some() {
                self.close_stream(&mut link).await;
            }
            tokio::select! {
                item = rx.recv(), if self.flush_by.is_none() => match item {
                    Some(In::Close { deadline }) => self.session_deadline = Some(deadline),
                    Some(item) => {
                        if let Err(()) = self.input(item, link.conn.as_mut()).await {
                            self.retry_later(&mut link, "connection lost while sending");
                        }
                    }
                    None => self.flush_by = Some(self.flush_deadline()),
                },
                frame = next_frame(&mut link.conn) => {
                    if self.on_frame(frame, &mut link).await.is_break() {
                        break;
                    }
                },
                _ = tick.tick() => self.on_tick(&mut link, keepalive).await,
                () = tokio::time::sleep_until(link.next_attempt), if link.conn.is_none() => {}
                () = tokio::time::sleep_until(self.flush_by.unwrap_or(far)), if self.flush_by.is_some() => {}
            }
        }
        self.wind_down().await;
    }

    /// When the wait for the last results ends: `flush_timeout_ms` from now, and early enough
    /// before the session's close deadline to report what was lost.
    fn flush_deadline(&self) -> Instant {
        let now = Instant::now();
        let own = now + self.cfg.flush_timeout();
        match self.session_deadline {
            Some(d) => own.min(d.checked_sub(REPORT_MARGIN).unwrap_or(now).max(now)),
            None => own,
        }
    }

    /// Sends `CloseStream` once per connection.
    async fn close_stream(&mut self, link: &mut Link) {
        let Some(c) = link.conn.as_mut() else { return };
        if c.close_sent {
            return;
        }
        c.close_sent = true;
        if send_text(c, CLOSE_STREAM).await.is_err() {
            self.retry_later(link, "connection lost while closing the stream");
        }
    }

    /// Connects and resends what is retained; on failure the next attempt waits for the backoff.
    async fn reconnect(&mut self, link: &mut Link) {
        match Conn::open(&self.cfg, &self.ctx.opts).await {
            Ok(mut c) => {
                counter!(STT_REQUESTS, "backend" => self.cfg.name.clone(), "outcome" => "connected")
                    .increment(1);
                info!(stt = %self.cfg.name, session = %self.ctx.target.session_id, "streaming speech-to-text connected");
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

    /// Sends everything retained (unacknowledged) on a new connection, then, for utterances
    /// still waiting for their final result, `Finalize` (mode `message`) or the cut that
    /// isolates them.
    async fn resend(&mut self, c: &mut Conn) -> Result<(), ()> {
        self.audio.resend(c).await?;
        if !self.track.waiting() {
            return Ok(());
        }
        match self.ctx.backend.finalize_mode() {
            FinalizeMode::Message => send_text(c, FINALIZE).await,
            _ if self.isolating() => cut(c).await,
            _ => Ok(()),
        }
    }

    /// Whether each utterance gets its own connection (`isolate_utterances` in mode `none`).
    fn isolating(&self) -> bool {
        self.cfg.isolate_utterances && self.ctx.backend.finalize_mode() == FinalizeMode::None
    }

    async fn input(&mut self, item: In, conn: Option<&mut Conn>) -> Result<(), ()> {
        match item {
            In::Audio(chunk) => {
                self.audio.push(chunk);
                // A connection that was sent `CloseStream` takes no more audio.
                let result = match conn {
                    Some(c) if !c.close_sent => self.audio.send(c, self.audio.len() - 1).await,
                    _ => Ok(()),
                };
                self.trim();
                result
            }
            In::Started { utterance, start } => {
                self.open = Some(utterance);
                let mut out = Vec::new();
                self.track.started(utterance, start, &mut out);
                self.settle(out, "too many utterances waiting for results")
                    .await;
                Ok(())
            }
            In::Ended { utterance, end } => {
                self.open = None;
                self.track.ended(utterance, end, Instant::now());
                match conn {
                    // Being cut already: the next connection's resend cuts after this one.
                    Some(c) if c.close_sent => Ok(()),
                    Some(c) if self.ctx.backend.finalize_mode() == FinalizeMode::Message => {
                        send_text(c, FINALIZE).await
                    }
                    Some(c) if self.isolating() => cut(c).await,
                    _ => Ok(()),
                }
            }
            In::Close { deadline } => {
                self.session_deadline = Some(deadline);
                Ok(())
            }
        }
    }

    fn trim(&mut self) {
        let idle = self.open.is_none() && !self.track.waiting();
        self.audio.trim(idle);
    }

    /// A frame from the backend; `Break` when the backend closed normally after the session's
    /// `CloseStream` (it has flushed everything).
    async fn on_frame(
        &mut self,
        frame: Option<Result<Message, WsError>>,
        link: &mut Link,
    ) -> ControlFlow<()> {
        let code = match frame {
            Some(Ok(Message::Text(text))) => {
                if let Some(c) = link.conn.as_mut() {
                    self.on_text(c, text.as_str()).await;
                }
                return ControlFlow::Continue(());
            }
            Some(Ok(Message::Close(frame))) => Some(frame.map_or(1005, |f| u16::from(f.code))),
            None | Some(Err(_)) => None,
            Some(Ok(_)) => return ControlFlow::Continue(()),
        };
        let Some(c) = link.conn.take() else {
            return ControlFlow::Continue(());
        };
        let clean = matches!(code, Some(1000 | 1005));
        if c.close_sent && clean {
            return self.on_flushed(&c, link).await;
        }
        let refused = c.refused_finalize
            || (code.is_some_and(|k| (4000..5000).contains(&k))
                && c.finalizes_out > 0
                && self.refuse_finalize(code.map(|k| k.to_string())));
        if refused {
            // Not an outage: the next connection works without `Finalize`.
            link.next_attempt = Instant::now();
            return ControlFlow::Continue(());
        }
        let why = match code {
            Some(k) => format!("connection closed by the backend ({k})"),
            None => "connection lost".to_owned(),
        };
        self.retry_later(link, why);
        ControlFlow::Continue(())
    }

    /// The backend closed normally after `CloseStream`: what the connection carried is
    /// covered. After a cut that isolates an utterance, a new connection takes the audio from
    /// the cut on (at once: audio keeps flowing); `Break` when the session is over and nothing
    /// is left to send or to wait for.
    async fn on_flushed(&mut self, c: &Conn, link: &mut Link) -> ControlFlow<()> {
        let mut out = Vec::new();
        match c.cut_at {
            Some(at) => {
                self.track.flushed_until(at, &mut out);
                self.audio.acknowledge(at);
            }
            None => self.track.flushed(&mut out),
        }
        self.settle(out, "").await;
        let more = self.track.waiting() || self.audio.has_unsent();
        if c.cut_at.is_none() || (self.flush_by.is_some() && !more) {
            return ControlFlow::Break(());
        }
        self.reconnect(link).await;
        ControlFlow::Continue(())
    }

    /// `finalize = "auto"`: the backend refused `Finalize`; this backend uses `none` from now
    /// on (logged and counted once per process). False when the mode is not `auto`.
    fn refuse_finalize(&mut self, why: Option<String>) -> bool {
        if self.cfg.finalize != FinalizeMode::Auto {
            return false;
        }
        if self.ctx.backend.learn_finalize_refused() {
            counter!(STT_FINALIZE_FALLBACKS, "backend" => self.cfg.name.clone()).increment(1);
            info!(stt = %self.cfg.name, why = why.as_deref().unwrap_or(""), "backend refuses Finalize; finalize mode auto switches to none (endpointing) for this backend");
        }
        true
    }

    /// Periodic work: a KeepAlive on a quiet connection, utterances given up on, trim.
    async fn on_tick(&mut self, link: &mut Link, keepalive: Duration) {
        if let Some(c) = link.conn.as_mut() {
            if !c.close_sent
                && c.last_send.elapsed() >= keepalive
                && send_text(c, KEEP_ALIVE).await.is_err()
            {
                self.retry_later(link, "connection lost while idle");
            }
        }
        let mut out = Vec::new();
        self.track
            .expire(self.cfg.final_timeout(), Instant::now(), &mut out);
        self.settle(out, "no final result within final_timeout_ms")
            .await;
        self.trim();
    }

    /// Drops the connection, reports the trouble and schedules the next attempt.
    fn retry_later(&mut self, link: &mut Link, why: impl std::fmt::Display) {
        link.conn = None;
        self.trouble(why);
        link.next_attempt = Instant::now() + link.backoff.delay();
    }

    /// At the end: unfinished utterances are lost; what was never sent is dropped; the poster
    /// flushes.
    async fn wind_down(mut self) {
        let mut out = Vec::new();
        self.track.give_up(&mut out);
        self.settle(out, "no final result before the session closed")
            .await;
        self.audio.clear();
        if let Some(p) = self.poster.take() {
            p.close().await;
        }
    }

    async fn on_text(&mut self, c: &mut Conn, text: &str) {
        let Ok(r) = serde_json::from_str::<Results>(text) else {
            debug!(stt = %self.cfg.name, "unparsed message from the backend");
            return;
        };
        match r.kind.as_str() {
            "Results" => self.on_results(c, r).await,
            "Error" => {
                let what = r.description.unwrap_or_default();
                counter!(STT_REQUESTS, "backend" => self.cfg.name.clone(), "outcome" => "backend_error").increment(1);
                warn!(stt = %self.cfg.name, session = %self.ctx.target.session_id, error = %what, "speech-to-text backend sent an error");
                if c.finalizes_out > 0 && self.refuse_finalize(Some(what)) {
                    c.refused_finalize = true;
                }
            }
            _ => {}
        }
    }

    async fn on_results(&mut self, c: &mut Conn, r: Results) {
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
        let utterance = self.track.utterance_of(start, end);
        let mut out = Vec::new();
        if r.is_final {
            self.track.progressed(end, Instant::now());
            self.audio.acknowledge(end);
            if !text.trim().is_empty() {
                self.track.final_text(start, end);
            }
            if r.from_finalize {
                c.finalizes_out = c.finalizes_out.saturating_sub(1);
                self.track.finalize_answered(&mut out);
            }
            self.track.covered(start, end, &mut out);
        }
        self.trim();
        if !text.trim().is_empty() {
            let event =
                self.ctx
                    .transcript(utterance, text, r.is_final, seconds(start), seconds(end));
            if r.is_final {
                if let Some(p) = &self.poster {
                    p.offer(&self.ctx, self.seq, &event);
                }
                self.seq += 1;
            }
            self.ctx.notify(event).await;
        }
        self.settle(out, "").await;
    }

    /// Acts on what became of utterances: latency for the covered, an empty final for those
    /// covered without words, one `stt_lost` report for the lost.
    async fn settle(&mut self, out: Vec<Outcome>, why: &str) {
        let mut lost = Vec::new();
        for o in out {
            match o {
                Outcome::Final { ended_at } => self.ctx.observe_latency(ended_at),
                Outcome::Empty {
                    id,
                    start,
                    end,
                    ended_at,
                } => {
                    self.ctx.observe_latency(ended_at);
                    let event =
                        self.ctx
                            .transcript(id, String::new(), true, seconds(start), seconds(end));
                    self.ctx.notify(event).await;
                }
                Outcome::Lost { id } => lost.push(id),
            }
        }
        self.ctx.report_lost(&lost, why).await;
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
