//! The per-utterance speech-to-text consumer (`openai`, `pocketsphinx`): the handle keeps the
//! audio of the open utterance (plus a lookback of the segmenter's pre-roll while idle,
//! because `SpeechStarted` is decided after its first samples went by); at `UtteranceEnd` the
//! audio becomes a job for the session's worker, which transcribes jobs one after another, so
//! results come back in order.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};
use voxgate_session::{AudioChunk, ConsumerSummary, ServerEvent};

use super::ctx::{sample_at, Ctx};
use super::poster::Poster;
use crate::fanout::queue::QueueHandle;
use crate::fanout::{Consumer, DropReason, Offer};

/// Utterances waiting per session and backend (the byte cap is the real bound).
const JOB_QUEUE: usize = 64;

/// One finalized utterance waiting for a transcript.
struct Job {
    utterance: u64,
    start: u64,
    end: u64,
    pcm: Arc<[i16]>,
    ended: Instant,
}

/// The ingest side of a per-utterance backend for one session.
pub struct UtteranceHandle {
    ctx: Ctx,
    queue: QueueHandle<Job>,
    lookback: usize,
    /// Contiguous audio starting at `buf_start`: the lookback while idle, the utterance while open.
    buf: Vec<i16>,
    buf_start: u64,
    open: Option<(u64, u64)>,
    /// The open utterance lost audio to the cap; the rest of it is dropped too.
    truncated: bool,
}

impl UtteranceHandle {
    pub(crate) fn spawn(ctx: Ctx, lookback_samples: u64) -> Self {
        let cap_bytes = ctx.backend.cfg.max_buffer_bytes() as u64;
        let worker_ctx = ctx.clone();
        let queue = QueueHandle::spawn(ctx.stats.clone(), JOB_QUEUE, cap_bytes, |rx| {
            utterance_worker(worker_ctx, rx)
        });
        Self {
            ctx,
            queue,
            lookback: lookback_samples as usize,
            buf: Vec::new(),
            buf_start: 0,
            open: None,
            truncated: false,
        }
    }

    /// Forgets the samples before `from` (they are no longer held).
    fn cut_before(&mut self, from: u64) {
        if from > self.buf_start {
            let cut = ((from - self.buf_start) as usize).min(self.buf.len());
            self.buf.drain(..cut);
            self.buf_start += cut as u64;
            self.ctx.stats.release(cut as u64 * 2);
        }
    }

    /// Idle: keeps only the samples from `lookback` before `from` on.
    fn trim_idle(&mut self, from: u64) {
        self.cut_before(from.saturating_sub(self.lookback as u64));
    }

    fn drop_audio(&mut self, reason: DropReason, bytes: u64) -> Offer {
        if self.queue.dropped(reason, bytes) {
            warn!(stt = %self.ctx.name(), session = %self.ctx.target.session_id, %reason, "speech-to-text consumer dropping audio");
            self.ctx.warn_dropping(reason);
        }
        // The warning above is ours (`stt_dropping`), not the generic one.
        Offer::Dropped { first: false }
    }

    /// `UtteranceEnd`: the utterance's audio becomes a job.
    fn end_utterance(&mut self, utterance: u64, end: f64) {
        let Some((open, start)) = self.open.take() else {
            return;
        };
        if open != utterance {
            debug!(open, utterance, "utterance end for another utterance");
        }
        let end = sample_at(end);
        let take = (end.saturating_sub(self.buf_start) as usize).min(self.buf.len());
        let rest = self.buf.split_off(take);
        let pcm: Arc<[i16]> = Arc::from(std::mem::replace(&mut self.buf, rest));
        self.buf_start += take as u64;
        // What follows `end` may start the next utterance (a limit split).
        self.trim_idle(end);
        if pcm.is_empty() {
            // Its audio was dropped while it was spoken (buffer cap): no final will come.
            self.ctx
                .report_lost_now(&[utterance], "its audio was dropped (buffer full)");
            return;
        }
        let bytes = pcm.len() as u64 * 2;
        let job = Job {
            utterance,
            start,
            end: start + pcm.len() as u64,
            pcm,
            ended: Instant::now(),
        };
        if self.queue.send(job).is_err() {
            self.ctx.stats.release(bytes);
            self.drop_audio(DropReason::QueueFull, bytes);
            self.ctx
                .report_lost_now(&[utterance], "the backend's queue was full");
        }
    }
}

impl Consumer for UtteranceHandle {
    fn name(&self) -> &str {
        self.ctx.name()
    }

    fn party(&self) -> Option<voxgate_session::Party> {
        self.ctx.party
    }

    fn on_audio(&mut self, chunk: &AudioChunk) -> Offer {
        let bytes = chunk.pcm.len() as u64 * 2;
        if self.open.is_none() {
            // Idle: only what a `SpeechStarted` decided inside this chunk may reach back to
            // (the chunk itself and the lookback before it).
            if chunk.start != self.buf_start + self.buf.len() as u64 {
                self.ctx.stats.release(self.buf.len() as u64 * 2);
                self.buf.clear();
                self.buf_start = chunk.start;
            }
            self.buf.extend_from_slice(&chunk.pcm);
            self.ctx.stats.hold(bytes);
            self.trim_idle(chunk.start);
            return Offer::Accepted;
        }
        if self.truncated || self.queue.reserve(bytes).is_err() {
            self.truncated = true;
            return self.drop_audio(DropReason::BufferFull, bytes);
        }
        self.buf.extend_from_slice(&chunk.pcm);
        Offer::Accepted
    }

    fn on_event(&mut self, event: &ServerEvent) {
        match *event {
            ServerEvent::SpeechStarted {
                utterance,
                timestamp,
                ..
            } => {
                let start = sample_at(timestamp);
                self.cut_before(start);
                self.open = Some((utterance, self.buf_start.max(start)));
                self.truncated = false;
            }
            ServerEvent::UtteranceEnd { utterance, end, .. } => self.end_utterance(utterance, end),
            _ => {}
        }
    }

    fn finish(
        mut self: Box<Self>,
        deadline: Instant,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ConsumerSummary> + Send>> {
        Box::pin(async move {
            // An utterance still open was ended by the session before it closed; what is left
            // here is lookback audio, never sent by design.
            self.ctx.stats.release(self.buf.len() as u64 * 2);
            self.buf = Vec::new();
            let finished = self.queue.finish(deadline).await;
            if !finished.in_time {
                // The close flush ended first: what the worker held is dropped (counted in
                // bytes, `close_timeout`) and the client is told its utterances were lost.
                self.ctx.report_unfinished(finished.dropped);
            }
            self.queue.summary(self.ctx.name())
        })
    }
}

/// Transcribes a session's utterances in order.
async fn utterance_worker(ctx: Ctx, mut rx: mpsc::Receiver<Job>) {
    let poster = Poster::spawn(&ctx);
    let mut seq = 0u64;
    let mut failing = false;
    while let Some(job) = rx.recv().await {
        let bytes = job.pcm.len() as u64 * 2;
        ctx.stats.request();
        let outcome = ctx
            .backend
            .transcribe(&ctx.http, &ctx.opts, job.pcm.clone())
            .await;
        ctx.stats.release(bytes);
        match outcome {
            Ok(text) => {
                ctx.backend.success();
                ctx.stats.delivered(bytes);
                ctx.observe_latency(job.ended);
                failing = false;
                let event = ctx.transcript(
                    job.utterance,
                    text,
                    true,
                    voxgate_session::seconds(job.start),
                    voxgate_session::seconds(job.end),
                );
                if let Some(p) = &poster {
                    p.offer(&ctx, seq, &event);
                }
                seq += 1;
                ctx.notify(event).await;
            }
            Err(error) => {
                ctx.backend.failure(error.kind());
                ctx.stats.count_dropped(DropReason::SttFailed, bytes);
                warn!(stt = %ctx.name(), session = %ctx.target.session_id, utterance = job.utterance, %error, "utterance given up");
                ctx.report_lost(&[job.utterance], &error.to_string()).await;
                if !failing {
                    failing = true;
                    ctx.notify(ServerEvent::warning(
                        "stt_unavailable",
                        format!(
                            "speech-to-text backend {:?} failed for utterance {} ({}); details are in the gateway log",
                            ctx.name(),
                            job.utterance,
                            error.kind()
                        ),
                    ))
                    .await;
                }
            }
        }
    }
    if let Some(p) = poster {
        p.close().await;
    }
}
