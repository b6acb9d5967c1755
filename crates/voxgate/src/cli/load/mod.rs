//! `voxgate load`: a bounded load generator for a running gateway.
//!
//! N concurrent sessions each stream one capture. A container capture (WebM/Ogg) is streamed
//! once per connection and every further loop is a new connection; raw audio (a URL with
//! `encoding=...`) loops its bytes on one connection. Messages are paced by the capture index's
//! `t_recv_ms` (or `--chunk-ms` of media per message for raw audio), `--speed` times faster than
//! real time. At the deadline every session sends `CloseStream` and waits for `Closed`. With
//! several `--url`s (several gateways) session slots are spread over them round-robin.
//!
//! Event latency: the capture is decoded locally once, which gives the exact number of 16 kHz
//! samples the server has decoded after each message. A `Progress { seconds_decoded }` event
//! is matched to the first sent message whose cumulative sample count reaches it; the latency is
//! the time from sending that message to receiving the event.
//!
//! Webhook latency (`--sink-listen ADDR`): the tool runs an audio webhook receiver at
//! `POST http://ADDR/{name}` (always answering 200) and names every connection's session itself
//! (`session_id=<prefix>-<slot>-<connection>` in the connect URL). For each batch received, the
//! chunk-to-webhook latency is the receive instant minus the instant the tool sent the message
//! holding the batch's last sample (exact for raw PCM, where sample offsets are byte offsets).
//! Per session the distinct idempotency keys' `[start, start + samples)` ranges must cover
//! `0..samples sent` without holes: gaps, missing samples, overlaps and duplicate keys are counted.
//!
//! While it runs, the RSS (`/proc/PID/status`) of each `--server-pid` and the sum of
//! `voxgate_buffered_bytes` (from `/metrics` of the first URL) are sampled every second; the CPU
//! time (`/proc/PID/stat` utime + stime) of every `--server-pid`, every `--cpu-pid` and the tool
//! itself is read at the start and the end of the full-load window.
//!
//! One concern a file: `args` (flags), `capture` (what is streamed), `client` (session slots
//! and their WebSocket connections), `sink` (the embedded webhook receiver), `sampler` (`/proc`
//! and `/metrics`), `report` (the totals and the human summary), `svg` (the plot). This file runs
//! them in order.

mod args;
mod capture;
mod client;
mod report;
mod sampler;
mod sink;
mod svg;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use args::LoadArgs;
pub use report::{human, Latency, LoadReport};
pub use sampler::{cpu_ticks, metric_sum, rss_bytes, ProcessReport, Sample};
pub use sink::{coverage, Coverage, SinkReport, SinkSession};
pub use svg::svg;

use capture::Capture;
use report::Collected;
use sink::{SinkServer, SinkState};

/// How long the sampler runs before the first session starts, for its baseline.
const BASELINE_LEAD: Duration = Duration::from_millis(300);
/// How long after everything closed the last sample is taken.
const FINAL_SAMPLE_DELAY: Duration = Duration::from_millis(200);

/// Counters shared by every session.
#[derive(Default)]
struct Live {
    connected: AtomicI64,
    messages: AtomicU64,
    bytes: AtomicU64,
}

/// What every session slot and the sampler share.
struct Ctx {
    args: LoadArgs,
    capture: Capture,
    live: Live,
    /// The embedded webhook receiver, with `--sink-listen`.
    sink: Option<Arc<SinkState>>,
    session_prefix: String,
}

/// Runs the load and returns its report (also written / printed as the arguments say).
pub async fn run(args: &LoadArgs) -> anyhow::Result<LoadReport> {
    args.validate()?;
    let capture = Capture::load(args)?;
    let procs = sampler::processes(args)?;
    let metrics_url = args.metrics_url();
    let session_prefix = args.session_prefix()?;
    let start = Instant::now();
    let sink = match &args.sink_listen {
        Some(addr) => Some(SinkServer::start(addr, start).await?),
        None => None,
    };
    let ctx = Arc::new(Ctx {
        args: args.clone(),
        capture,
        live: Live::default(),
        sink: sink.as_ref().map(|s| s.state().clone()),
        session_prefix,
    });
    let collected = drive(&ctx, start, sink, procs, metrics_url).await?;
    let report = LoadReport::build(args, collected);
    report::write(&report, args)?;
    Ok(report)
}

/// Runs the session slots from `start` (after the sampler's baseline) until the deadline, with
/// the sampler, the CPU window and the sink around them; stops them and collects what they
/// measured.
async fn drive(
    ctx: &Arc<Ctx>,
    start: Instant,
    sink: Option<SinkServer>,
    procs: Vec<sampler::Proc>,
    metrics_url: Option<String>,
) -> Result<Collected, JoinError> {
    let args = &ctx.args;
    let ramp = Duration::from_secs_f64(args.ramp);
    let deadline = start + ramp + Duration::from_secs_f64(args.duration);
    let stop = CancellationToken::new();
    let pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();
    let sampler = tokio::spawn(sampler::sample_loop(
        ctx.clone(),
        metrics_url,
        procs.clone(),
        start,
        stop.clone(),
    ));
    tokio::time::sleep(BASELINE_LEAD).await;
    let start_sessions = Instant::now();
    let cpu_window = tokio::spawn(sampler::cpu_window(
        pids,
        start,
        start_sessions + ramp,
        deadline,
    ));
    let slots = client::run_slots(ctx, start_sessions, ramp, deadline).await;
    let settle_seconds = settle(ctx, args.sink_wait).await;
    tokio::time::sleep(FINAL_SAMPLE_DELAY).await;
    stop.cancel();
    let (timeline, series) = sampler.await.unwrap_or_default();
    let cpu = cpu_window.await?;
    let wall_seconds = start.elapsed().as_secs_f64();
    let sink_report = sink.as_ref().map(|s| {
        let until_s = (deadline - start).as_secs_f64();
        s.report(until_s, settle_seconds, ctx.capture.decodes_locally())
    });
    if let Some(s) = sink {
        s.stop().await;
    }
    Ok(Collected {
        slots,
        processes: sampler::process_reports(&procs, &series, &cpu),
        timeline,
        sink: sink_report,
        wall_seconds,
        messages_sent: ctx.live.messages.load(Ordering::Relaxed),
        bytes_sent: ctx.live.bytes.load(Ordering::Relaxed),
        lead_in_s: BASELINE_LEAD.as_secs_f64(),
        decode_cpu_ms_per_audio_s: ctx.capture.decode_cpu_ms_per_audio_s,
    })
}

/// With a sink: waits (at most `wait` seconds) until it holds every sample sent; returns the
/// seconds waited.
async fn settle(ctx: &Ctx, wait: f64) -> f64 {
    let Some(sink) = &ctx.sink else {
        return 0.0;
    };
    let from = Instant::now();
    let until = from + Duration::from_secs_f64(wait);
    while !sink.all_complete() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    from.elapsed().as_secs_f64()
}
