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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use voxgate_media::{Decoder, Limits, SourceFormat};

use super::index;

#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Ingest WebSocket URL (add ?encoding=linear16&sample_rate=16000 for raw PCM). Repeat it to
    /// spread the sessions round-robin over several gateways (same query on every URL).
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/listen")]
    pub url: Vec<String>,
    /// Concurrent sessions.
    #[arg(long, default_value_t = 10)]
    pub sessions: usize,
    /// Seconds of full load after the ramp; then every session closes.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// The capture to stream.
    #[arg(long)]
    pub file: PathBuf,
    /// Capture index (capture-index/1): message boundaries and spacing.
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// Playback speed: 1 = real time, 10 = ten times faster, 0 = as fast as possible.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Seconds over which the sessions start (evenly spread).
    #[arg(long, default_value_t = 0.0)]
    pub ramp: f64,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A gateway process: its RSS (VmRSS) is sampled every second and its CPU time measured.
    /// Repeatable (one per gateway); the report's RSS figures are their sum.
    #[arg(long)]
    pub server_pid: Vec<u32>,
    /// Another process whose CPU time (and RSS) to measure over the full-load window: `PID` or
    /// `NAME=PID` (e.g. `nats1=1234`). Repeatable.
    #[arg(long)]
    pub cpu_pid: Vec<String>,
    /// Run an audio webhook receiver here (e.g. 127.0.0.1:18300; point the gateway's webhook at
    /// `http://ADDR/NAME`) and measure chunk-to-webhook latency, gaps and duplicates.
    #[arg(long)]
    pub sink_listen: Option<String>,
    /// With --sink-listen: seconds to wait after the last session closed for the sink to hold
    /// every sample sent.
    #[arg(long, default_value_t = 30.0)]
    pub sink_wait: f64,
    /// With --sink-listen: session ids are `PREFIX-<slot>-<connection>` (default `load-<random>`).
    #[arg(long)]
    pub session_prefix: Option<String>,
    /// Prometheus page to scrape (default: /metrics on the first URL's host; "none" to disable).
    #[arg(long)]
    pub metrics_url: Option<String>,
    /// Plot RSS and buffered bytes over time to this SVG.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Without an index: media milliseconds per message.
    #[arg(long, default_value_t = 100.0)]
    pub chunk_ms: f64,
    /// Seconds to wait for `Closed` after `CloseStream`.
    #[arg(long, default_value_t = 30.0)]
    pub close_timeout: f64,
    /// Idle sessions: connect, send only KeepAlive every 5 s, close at the deadline.
    #[arg(long)]
    pub idle: bool,
    /// Print nothing (the report is still returned / written).
    #[arg(long)]
    pub quiet: bool,
}

impl LoadArgs {
    /// Arguments with the CLI defaults, for library use.
    pub fn new(url: impl Into<String>, file: impl Into<PathBuf>) -> Self {
        Self {
            url: vec![url.into()],
            sessions: 10,
            duration: 10.0,
            file: file.into(),
            index: None,
            speed: 1.0,
            ramp: 0.0,
            json: None,
            server_pid: Vec::new(),
            cpu_pid: Vec::new(),
            sink_listen: None,
            sink_wait: 30.0,
            session_prefix: None,
            metrics_url: None,
            svg: None,
            chunk_ms: 100.0,
            close_timeout: 30.0,
            idle: false,
            quiet: true,
        }
    }
}

/// Percentiles of a set of milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(mut v: Vec<f32>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f32::total_cmp);
        let pct = |p: f64| {
            let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
            f64::from(v[i])
        };
        Self {
            count: v.len(),
            p50_ms: pct(0.50),
            p90_ms: pct(0.90),
            p99_ms: pct(0.99),
            max_ms: f64::from(v[v.len() - 1]),
        }
    }
}

/// One once-a-second sample.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t: f64,
    pub rss_bytes: Option<u64>,
    pub buffered_bytes: Option<f64>,
    pub server_sessions: Option<f64>,
    pub client_sessions: i64,
    /// Webhook requests the embedded sink has received so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink_requests: Option<u64>,
    /// Largest chunk-to-webhook latency among the batches received since the previous sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink_latency_max_ms: Option<f32>,
}

/// One measured process (`--server-pid`, `--cpu-pid`, and the load tool itself).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessReport {
    pub label: String,
    pub pid: u32,
    pub role: String,
    /// utime + stime consumed during the full-load window (after the ramp, until the deadline).
    pub cpu_seconds: Option<f64>,
    /// `cpu_seconds` divided by the window's length (1.0 = one core busy); for a process that
    /// exited, by the part of the window it was alive.
    pub cpu_per_second: Option<f64>,
    /// CPU seconds from the tool's start to its end (ramp and closing included).
    pub cpu_seconds_run: Option<f64>,
    pub rss_baseline_bytes: Option<u64>,
    pub rss_peak_bytes: Option<u64>,
    pub rss_end_bytes: Option<u64>,
    /// The process was gone before the end of the window (its CPU time is up to the last reading).
    pub exited: bool,
}

/// What the embedded webhook receiver saw of one connection (session).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SinkSession {
    pub session_id: String,
    /// 16 kHz samples the tool sent on this connection.
    pub sent_samples: u64,
    /// `Closed.summary.samples_decoded`, when the connection got `Closed`.
    pub closed_samples: Option<u64>,
    /// Distinct idempotency keys received.
    pub batches: u64,
    /// Requests repeating a key already received.
    pub duplicates: u64,
    /// Coverage of `0..sent_samples` by the distinct keys' ranges.
    #[serde(flatten)]
    pub coverage: Coverage,
}

/// How a session's distinct batches cover `0..sent`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Coverage {
    /// Samples of the distinct keys (overlaps counted twice).
    pub received_samples: u64,
    /// Samples of `0..sent` no batch covers.
    pub missing_samples: u64,
    /// Holes in the union of the ranges (a missing end counts as one).
    pub gaps: u64,
    /// Batches with a different key starting inside samples already covered.
    pub overlaps: u64,
    /// Samples received beyond what was sent.
    pub extra_samples: u64,
}

/// What the embedded webhook receiver (`--sink-listen`) measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SinkReport {
    pub listen: String,
    /// Every request received.
    pub requests: u64,
    /// Distinct idempotency keys (batches) of known sessions.
    pub batches: u64,
    /// Samples of those batches.
    pub samples: u64,
    /// Requests repeating a key already received (same range: a redelivery).
    pub duplicates: u64,
    /// Requests repeating a key with a different start or length.
    pub duplicate_mismatches: u64,
    pub overlaps: u64,
    pub gaps: u64,
    pub missing_samples: u64,
    pub extra_samples: u64,
    /// Requests without the sequence/sample headers, or whose body length disagrees.
    pub bad_requests: u64,
    /// Requests for a session id this run did not open.
    pub unknown_session_requests: u64,
    /// Connections tracked, and those whose samples all arrived (no gap, nothing missing).
    pub sessions: usize,
    pub sessions_complete: usize,
    /// Chunk-to-webhook latency of the first receipt of every batch; null when it cannot be
    /// measured (no local decode of the format).
    pub latency: Option<Latency>,
    /// The longest interval without any webhook request, between the first request and the end
    /// of the full-load window, and when it began (seconds from the tool's start).
    pub longest_silence_s: f64,
    pub longest_silence_at_s: f64,
    /// Seconds from the last session's end until the sink held everything (or `--sink-wait`).
    pub settle_seconds: f64,
    /// Missing samples per session id (only sessions missing some).
    pub missing_by_session: BTreeMap<String, u64>,
    pub per_session: Vec<SinkSession>,
}

/// What the run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    /// The first URL (`urls` has them all).
    pub url: String,
    pub urls: Vec<String>,
    pub file: String,
    pub sessions: usize,
    pub duration_s: f64,
    pub speed: f64,
    pub ramp_s: f64,
    pub idle: bool,
    pub wall_seconds: f64,
    /// Session slots whose every connection ended with `Closed` and close code 1000.
    pub sessions_held: usize,
    pub sessions_failed: usize,
    pub connections: u64,
    pub connections_failed: u64,
    pub messages_sent: u64,
    pub bytes_sent: u64,
    /// Media seconds sent (16 kHz samples the server should decode, from the local decode).
    pub seconds_sent: f64,
    pub samples_sent: u64,
    /// Sum of `Closed.summary.samples_decoded` (and seconds).
    pub closed_samples_decoded: u64,
    pub closed_seconds_decoded: f64,
    /// Sum of the last `Progress.seconds_decoded` of every connection.
    pub progress_seconds: f64,
    pub closed_events: u64,
    pub delivered_bytes: u64,
    pub dropped_bytes: u64,
    pub decode_errors: u64,
    /// Progress event latency.
    pub latency: Latency,
    /// From `CloseStream` to `Closed`.
    pub close_latency: Latency,
    /// Error events by code, abnormal close codes (`close_NNNN`) and client-side failures.
    pub errors: BTreeMap<String, u64>,
    pub rss_baseline_bytes: Option<u64>,
    pub rss_peak_bytes: Option<u64>,
    /// Mean RSS over the samples taken during full load (after the ramp).
    pub rss_loaded_bytes: Option<u64>,
    pub rss_end_bytes: Option<u64>,
    /// (rss_loaded - rss_baseline) / sessions.
    pub rss_per_session_bytes: Option<f64>,
    pub buffered_peak_bytes: Option<f64>,
    pub buffered_end_bytes: Option<f64>,
    /// CPU and RSS per measured process.
    pub processes: Vec<ProcessReport>,
    /// The embedded webhook receiver's findings (with `--sink-listen`).
    pub sink: Option<SinkReport>,
    pub timeline: Vec<Sample>,
}

/// The capture as messages, with the samples the server will have decoded after each.
struct Capture {
    data: Vec<u8>,
    messages: Vec<index::Message>,
    /// Cumulative 16 kHz samples after message i (one pass), when the format decodes locally.
    cum: Option<Vec<u64>>,
    /// Samples produced by `finish` after a whole pass.
    tail: u64,
    /// Raw audio: loop the bytes on one connection.
    raw: bool,
    /// Media ms of one pass (pacing of the loop).
    pass_ms: f64,
}

impl Capture {
    fn load(args: &LoadArgs) -> anyhow::Result<Self> {
        let data = std::fs::read(&args.file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
        anyhow::ensure!(!data.is_empty(), "{}: empty file", args.file.display());
        let format_of = |u: &str| -> anyhow::Result<SourceFormat> {
            let query: HashMap<String, String> =
                url::Url::parse(u)?.query_pairs().into_owned().collect();
            crate::ingest::request::source_format(&query).map_err(|e| anyhow::anyhow!(e))
        };
        let first = args
            .url
            .first()
            .ok_or_else(|| anyhow::anyhow!("--url is required"))?;
        let format = format_of(first)?;
        for u in &args.url[1..] {
            anyhow::ensure!(
                format_of(u)? == format,
                "every --url must ask for the same audio format ({u})"
            );
        }
        let raw = !matches!(format, SourceFormat::Auto);
        let mut messages = match &args.index {
            Some(p) => index::load(p, data.len())?,
            None => {
                let chunk = match raw_bytes_per_ms(&format) {
                    Some(per_ms) => ((per_ms * args.chunk_ms) as usize).max(1),
                    None => anyhow::bail!(
                        "a container capture needs --index (its message boundaries and timing)"
                    ),
                };
                index::fixed(data.len(), chunk)
            }
        };
        let t0 = messages.first().and_then(|m| m.t_ms).unwrap_or(0.0);
        for (i, m) in messages.iter_mut().enumerate() {
            m.t_ms = Some(match m.t_ms {
                Some(t) => t - t0,
                None => i as f64 * args.chunk_ms,
            });
        }
        let last_t = messages.last().and_then(|m| m.t_ms).unwrap_or(0.0);
        let pass_ms = if raw {
            messages.len() as f64 * args.chunk_ms.max(1.0)
        } else {
            last_t
        };
        let (cum, tail) = match local_decode(format, &data, &messages) {
            Some((c, t)) => (Some(c), t),
            None => (None, 0),
        };
        Ok(Self {
            data,
            messages,
            cum,
            tail,
            raw,
            pass_ms,
        })
    }

    /// Cumulative samples after global message `k` (raw audio loops).
    fn cum_after(&self, k: u64) -> Option<u64> {
        let cum = self.cum.as_ref()?;
        let n = cum.len() as u64;
        let per_pass = cum[cum.len() - 1];
        Some((k / n) * per_pass + cum[(k % n) as usize])
    }

    /// Send offset of global message `k` from the connection start, in media ms.
    fn t_ms(&self, k: u64) -> f64 {
        let n = self.messages.len() as u64;
        let pass = (k / n) as f64;
        let t = self.messages[(k % n) as usize].t_ms.unwrap_or(0.0);
        if self.raw {
            pass * self.pass_ms + t
        } else {
            t
        }
    }
}

fn raw_bytes_per_ms(format: &SourceFormat) -> Option<f64> {
    let (rate, ch, width) = match *format {
        SourceFormat::Linear16 {
            sample_rate,
            channels,
        } => (sample_rate, channels, 2),
        SourceFormat::Float32 {
            sample_rate,
            channels,
        } => (sample_rate, channels, 4),
        SourceFormat::Linear8 {
            sample_rate,
            channels,
        }
        | SourceFormat::Mulaw {
            sample_rate,
            channels,
        }
        | SourceFormat::Alaw {
            sample_rate,
            channels,
        } => (sample_rate, channels, 1),
        _ => return None,
    };
    Some(f64::from(rate) * f64::from(ch) * f64::from(width) / 1000.0)
}

/// Decodes the capture as the server will, message by message.
fn local_decode(
    format: SourceFormat,
    data: &[u8],
    messages: &[index::Message],
) -> Option<(Vec<u64>, u64)> {
    let mut decoder = Decoder::new(format, Limits::default()).ok()?;
    let mut pcm = Vec::new();
    let mut total = 0u64;
    let mut cum = Vec::with_capacity(messages.len());
    for m in messages {
        pcm.clear();
        decoder
            .push(&data[m.offset..m.offset + m.length], &mut pcm)
            .ok()?;
        while decoder.poll_event().is_some() {}
        total += pcm.len() as u64;
        cum.push(total);
    }
    pcm.clear();
    decoder.finish(&mut pcm).ok()?;
    Some((cum, pcm.len() as u64))
}

/// Counters shared by every session.
#[derive(Default)]
struct Live {
    connected: AtomicI64,
    messages: AtomicU64,
    bytes: AtomicU64,
}

/// What one connection saw.
#[derive(Default)]
struct ConnResult {
    failed: bool,
    messages: u64,
    samples_sent: u64,
    closed: bool,
    closed_samples: u64,
    closed_seconds: f64,
    delivered: u64,
    dropped: u64,
    decode_errors: u64,
    last_progress: f64,
    latencies: Vec<f32>,
    close_latency: Option<f32>,
    errors: BTreeMap<String, u64>,
}

/// What one session slot saw over all its connections.
#[derive(Default)]
struct SlotResult {
    failed: bool,
    connections: u64,
    connections_failed: u64,
    samples_sent: u64,
    closed_events: u64,
    closed_samples: u64,
    closed_seconds: f64,
    progress_seconds: f64,
    delivered: u64,
    dropped: u64,
    decode_errors: u64,
    latencies: Vec<f32>,
    close_latencies: Vec<f32>,
    errors: BTreeMap<String, u64>,
}

impl SlotResult {
    fn add(&mut self, c: ConnResult) {
        self.connections += 1;
        if c.failed {
            self.connections_failed += 1;
            self.failed = true;
        }
        self.samples_sent += c.samples_sent;
        self.closed_events += u64::from(c.closed);
        self.closed_samples += c.closed_samples;
        self.closed_seconds += c.closed_seconds;
        self.progress_seconds += c.last_progress;
        self.delivered += c.delivered;
        self.dropped += c.dropped;
        self.decode_errors += c.decode_errors;
        self.latencies.extend(c.latencies);
        self.close_latencies.extend(c.close_latency);
        for (k, v) in c.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

struct Ctx {
    args: LoadArgs,
    capture: Capture,
    live: Live,
    /// The embedded webhook receiver, with `--sink-listen`.
    sink: Option<Arc<SinkShared>>,
    session_prefix: String,
}

/// A process to measure.
#[derive(Debug, Clone)]
struct Proc {
    label: String,
    pid: u32,
    role: &'static str,
}

fn processes(args: &LoadArgs) -> anyhow::Result<Vec<Proc>> {
    let mut out = Vec::new();
    for (i, &pid) in args.server_pid.iter().enumerate() {
        let label = if args.server_pid.len() == 1 {
            "server".to_owned()
        } else {
            format!("server{i}")
        };
        out.push(Proc {
            label,
            pid,
            role: "server",
        });
    }
    for spec in &args.cpu_pid {
        let (label, pid) = match spec.split_once('=') {
            Some((name, pid)) => (name.to_owned(), pid),
            None => (format!("pid{spec}"), spec.as_str()),
        };
        let pid: u32 = pid
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--cpu-pid {spec:?}: expected PID or NAME=PID"))?;
        out.push(Proc {
            label,
            pid,
            role: "cpu",
        });
    }
    out.push(Proc {
        label: "load".to_owned(),
        pid: std::process::id(),
        role: "load",
    });
    Ok(out)
}

/// Runs the load and returns its report (also written / printed as the arguments say).
pub async fn run(args: &LoadArgs) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(args.sessions > 0, "--sessions must be at least 1");
    anyhow::ensure!(
        args.duration > 0.0 && args.duration.is_finite(),
        "--duration must be positive"
    );
    anyhow::ensure!(
        args.speed >= 0.0 && args.ramp >= 0.0,
        "--speed and --ramp must not be negative"
    );
    anyhow::ensure!(
        args.sink_wait >= 0.0 && args.sink_wait.is_finite(),
        "--sink-wait must not be negative"
    );
    let capture = Capture::load(args)?;
    let procs = processes(args)?;
    let metrics_url = match args.metrics_url.as_deref() {
        Some("none") => None,
        Some(u) => Some(u.to_owned()),
        None => default_metrics_url(&args.url[0]),
    };
    let session_prefix = args
        .session_prefix
        .clone()
        .unwrap_or_else(|| format!("load-{:06x}", rand::random::<u32>() & 0xff_ffff));
    anyhow::ensure!(
        crate::ingest::request::valid_session_id(&format!(
            "{session_prefix}-{}-999999",
            args.sessions
        )),
        "--session-prefix: session ids must be at most 128 characters of A-Z a-z 0-9 - _ . :"
    );
    let start = Instant::now();
    let sink_stop = tokio_util::sync::CancellationToken::new();
    let (sink, sink_task) = match &args.sink_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("--sink-listen {addr}: {e}"))?;
            let shared = Arc::new(SinkShared::new(start));
            let app = axum::Router::new()
                .route("/{name}", axum::routing::post(sink_receive))
                .with_state(shared.clone());
            let stop = sink_stop.clone();
            let task = tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
            });
            (Some(shared), Some(task))
        }
        None => (None, None),
    };
    let ctx = Arc::new(Ctx {
        args: args.clone(),
        capture,
        live: Live::default(),
        sink,
        session_prefix,
    });
    let ramp = Duration::from_secs_f64(args.ramp);
    let deadline = start + ramp + Duration::from_secs_f64(args.duration);

    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn(sample_loop(
        ctx.clone(),
        metrics_url,
        procs.clone(),
        start,
        stop.clone(),
    ));
    // Let the sampler take its baseline before the first connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start_sessions = Instant::now();
    // CPU time of every process at the start and the end of the full-load window.
    let load_from = start_sessions + ramp;
    let pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();
    let cpu_window = tokio::spawn(async move {
        tokio::time::sleep_until(load_from).await;
        let a: Vec<Option<u64>> = pids.iter().map(|&p| cpu_ticks(p)).collect();
        let ta = Instant::now();
        tokio::time::sleep_until(deadline).await;
        let b: Vec<Option<u64>> = pids.iter().map(|&p| cpu_ticks(p)).collect();
        let window = Window {
            from: (ta - start).as_secs_f64(),
            to: start.elapsed().as_secs_f64(),
        };
        (a, b, window)
    });

    let mut tasks = Vec::with_capacity(args.sessions);
    for i in 0..args.sessions {
        let at = start_sessions + ramp.mul_f64(i as f64 / args.sessions as f64);
        tasks.push(tokio::spawn(slot(ctx.clone(), i, at, deadline)));
    }
    let mut slots = Vec::with_capacity(tasks.len());
    for t in tasks {
        slots.push(t.await.unwrap_or_else(|_| SlotResult {
            failed: true,
            ..SlotResult::default()
        }));
    }
    // With a sink: wait (bounded) until it holds every sample sent.
    let settle_from = Instant::now();
    let mut settle_seconds = 0.0;
    if let Some(sink) = &ctx.sink {
        let until = settle_from + Duration::from_secs_f64(args.sink_wait);
        while !sink.all_complete() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        settle_seconds = settle_from.elapsed().as_secs_f64();
    }
    // One last sample after everything closed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    let (timeline, series) = sampler.await.unwrap_or_default();
    let (cpu_a, cpu_b, window) = cpu_window.await?;
    let wall = start.elapsed().as_secs_f64();
    let sink_report = ctx.sink.as_ref().map(|s| {
        let listen = args.sink_listen.clone().unwrap_or_default();
        s.report(
            listen,
            (deadline - start).as_secs_f64(),
            settle_seconds,
            ctx.capture.cum.is_some(),
        )
    });
    if let Some(task) = sink_task {
        sink_stop.cancel();
        let mut task = task;
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }

    let mut r = LoadReport {
        url: args.url[0].clone(),
        urls: args.url.clone(),
        file: args.file.display().to_string(),
        sessions: args.sessions,
        duration_s: args.duration,
        speed: args.speed,
        ramp_s: args.ramp,
        idle: args.idle,
        wall_seconds: wall,
        messages_sent: ctx.live.messages.load(Ordering::Relaxed),
        bytes_sent: ctx.live.bytes.load(Ordering::Relaxed),
        sink: sink_report,
        ..LoadReport::default()
    };
    let mut lat = Vec::new();
    let mut close_lat = Vec::new();
    for s in slots {
        if s.failed {
            r.sessions_failed += 1;
        } else {
            r.sessions_held += 1;
        }
        r.connections += s.connections;
        r.connections_failed += s.connections_failed;
        r.samples_sent += s.samples_sent;
        r.closed_events += s.closed_events;
        r.closed_samples_decoded += s.closed_samples;
        r.closed_seconds_decoded += s.closed_seconds;
        r.progress_seconds += s.progress_seconds;
        r.delivered_bytes += s.delivered;
        r.dropped_bytes += s.dropped;
        r.decode_errors += s.decode_errors;
        lat.extend(s.latencies);
        close_lat.extend(s.close_latencies);
        for (k, v) in s.errors {
            *r.errors.entry(k).or_default() += v;
        }
    }
    r.seconds_sent = r.samples_sent as f64 / 16_000.0;
    r.latency = Latency::of(lat);
    r.close_latency = Latency::of(close_lat);
    summarize_timeline(
        &mut r,
        &timeline,
        args.ramp + 0.3,
        args.ramp + 0.3 + args.duration,
    );
    r.processes = procs
        .iter()
        .enumerate()
        .map(|(i, p)| process_report(p, &series[i], cpu_a[i], cpu_b[i], window))
        .collect();
    r.timeline = timeline;

    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&r)?)?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, svg(&r))?;
    }
    if !args.quiet {
        println!("{}", human(&r));
    }
    Ok(r)
}

/// Linux's USER_HZ: `/proc/PID/stat` times are in these ticks.
const CLOCK_TICKS: f64 = 100.0;

/// The full-load window, in seconds from the tool's start.
#[derive(Debug, Clone, Copy)]
struct Window {
    from: f64,
    to: f64,
}

fn process_report(
    p: &Proc,
    series: &ProcSeries,
    from: Option<u64>,
    to: Option<u64>,
    window: Window,
) -> ProcessReport {
    // A process gone before the end of the window: up to its last reading (per second of that).
    let (to, exited, until) = match to {
        Some(t) => (Some(t), false, window.to),
        None => (
            series.cpu_last.map(|(_, t)| t),
            true,
            series.cpu_last.map_or(window.from, |(at, _)| at),
        ),
    };
    let window = until - window.from;
    let cpu = match (from, to) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / CLOCK_TICKS),
        _ => None,
    };
    let run = match (series.cpu_first, series.cpu_last) {
        (Some((_, a)), Some((_, b))) => Some(b.saturating_sub(a) as f64 / CLOCK_TICKS),
        _ => None,
    };
    ProcessReport {
        label: p.label.clone(),
        pid: p.pid,
        role: p.role.to_owned(),
        cpu_seconds: cpu,
        cpu_per_second: cpu.filter(|_| window > 0.1).map(|c| c / window),
        cpu_seconds_run: run,
        rss_baseline_bytes: series.rss.first().map(|x| x.1),
        rss_peak_bytes: series.rss.iter().map(|x| x.1).max(),
        rss_end_bytes: series.rss.last().map(|x| x.1),
        exited,
    }
}

/// utime + stime of a process in clock ticks (`/proc/PID/stat` fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// What one connection's session looks like to the embedded sink.
#[derive(Default)]
struct SessionTrack {
    /// (cumulative samples after a message, when the tool began sending it), in send order.
    sends: Vec<(u64, Instant)>,
    /// Samples sent so far (acknowledged by the socket).
    sent: u64,
    /// The connection has ended.
    done: bool,
    closed_samples: Option<u64>,
    /// Distinct idempotency keys: (start, samples).
    keys: HashMap<String, (u64, u64)>,
    duplicates: u64,
}

impl SessionTrack {
    fn coverage(&self) -> Coverage {
        let mut ranges: Vec<(u64, u64)> = self.keys.values().copied().collect();
        coverage(&mut ranges, self.sent)
    }
}

#[derive(Default)]
struct SinkCounters {
    requests: u64,
    bad_requests: u64,
    unknown: u64,
    duplicate_mismatches: u64,
    /// Seconds from the tool's start of every request.
    receipts: Vec<f64>,
    latencies: Vec<f32>,
    /// Largest latency since the sampler last looked.
    interval_max: Option<f32>,
}

/// The embedded webhook receiver's state.
struct SinkShared {
    start: Instant,
    sessions: Mutex<HashMap<String, Arc<Mutex<SessionTrack>>>>,
    counters: Mutex<SinkCounters>,
}

impl SinkShared {
    fn new(start: Instant) -> Self {
        Self {
            start,
            sessions: Mutex::new(HashMap::new()),
            counters: Mutex::new(SinkCounters::default()),
        }
    }

    fn register(&self, session_id: &str) -> Arc<Mutex<SessionTrack>> {
        let track = Arc::new(Mutex::new(SessionTrack::default()));
        self.sessions
            .lock()
            .expect("not poisoned")
            .insert(session_id.to_owned(), track.clone());
        track
    }

    /// Records one webhook request received at `now`.
    fn receive(
        &self,
        now: Instant,
        query: &HashMap<String, String>,
        headers: &HeaderMap,
        body: &[u8],
    ) {
        let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
        let num = |k: &str| h(k).and_then(|v| v.parse::<u64>().ok());
        let session = query
            .get("session_id")
            .map(String::as_str)
            .or_else(|| h("x-voxgate-session-id"));
        let track =
            session.and_then(|s| self.sessions.lock().expect("not poisoned").get(s).cloned());
        // PCM body, or a WAV with a 44-byte header.
        let pcm_len = if body.len() >= 44 && &body[..4] == b"RIFF" && &body[8..12] == b"WAVE" {
            body.len() - 44
        } else {
            body.len()
        } as u64;
        let (mut unknown, mut mismatch, mut latency) = (false, false, None);
        let bad = match (
            h("idempotency-key"),
            num("x-voxgate-start-sample"),
            num("x-voxgate-samples"),
        ) {
            (Some(key), Some(start), Some(samples)) => {
                match track {
                    None => unknown = true,
                    Some(t) => {
                        let mut g = t.lock().expect("not poisoned");
                        match g.keys.get(key) {
                            Some(&prev) => {
                                g.duplicates += 1;
                                mismatch = prev != (start, samples);
                            }
                            None => {
                                g.keys.insert(key.to_owned(), (start, samples));
                                let end = start + samples;
                                let i = g.sends.partition_point(|&(c, _)| c < end);
                                latency = g.sends.get(i).map(|&(_, at)| {
                                    now.saturating_duration_since(at).as_secs_f32() * 1000.0
                                });
                            }
                        }
                    }
                }
                pcm_len != samples * 2
            }
            _ => true,
        };
        let mut c = self.counters.lock().expect("not poisoned");
        c.requests += 1;
        c.receipts
            .push(now.saturating_duration_since(self.start).as_secs_f64());
        c.bad_requests += u64::from(bad);
        c.unknown += u64::from(unknown);
        c.duplicate_mismatches += u64::from(mismatch);
        if let Some(l) = latency {
            c.latencies.push(l);
            c.interval_max = Some(c.interval_max.map_or(l, |m| m.max(l)));
        }
    }

    /// Every connection has ended and the sink holds all it sent.
    fn all_complete(&self) -> bool {
        let sessions = self.sessions.lock().expect("not poisoned");
        sessions.values().all(|t| {
            let g = t.lock().expect("not poisoned");
            g.done && g.coverage().missing_samples == 0
        })
    }

    /// (requests so far, largest latency since the last call).
    fn tick(&self) -> (u64, Option<f32>) {
        let mut c = self.counters.lock().expect("not poisoned");
        (c.requests, c.interval_max.take())
    }

    fn report(&self, listen: String, until_s: f64, settle: f64, timed: bool) -> SinkReport {
        let mut r = SinkReport {
            listen,
            settle_seconds: settle,
            ..SinkReport::default()
        };
        let sessions = self.sessions.lock().expect("not poisoned");
        let mut ids: Vec<&String> = sessions.keys().collect();
        ids.sort();
        for id in ids {
            let g = sessions[id].lock().expect("not poisoned");
            let cov = g.coverage();
            let s = SinkSession {
                session_id: id.clone(),
                sent_samples: g.sent,
                closed_samples: g.closed_samples,
                batches: g.keys.len() as u64,
                duplicates: g.duplicates,
                coverage: cov,
            };
            r.batches += s.batches;
            r.samples += cov.received_samples;
            r.duplicates += s.duplicates;
            r.overlaps += cov.overlaps;
            r.gaps += cov.gaps;
            r.missing_samples += cov.missing_samples;
            r.extra_samples += cov.extra_samples;
            if cov.missing_samples > 0 {
                r.missing_by_session.insert(id.clone(), cov.missing_samples);
            }
            if cov.missing_samples == 0 && cov.gaps == 0 {
                r.sessions_complete += 1;
            }
            r.per_session.push(s);
        }
        r.sessions = sessions.len();
        drop(sessions);
        let mut c = self.counters.lock().expect("not poisoned");
        r.requests = c.requests;
        r.bad_requests = c.bad_requests;
        r.unknown_session_requests = c.unknown;
        r.duplicate_mismatches = c.duplicate_mismatches;
        r.latency = (timed && !c.latencies.is_empty()).then(|| Latency::of(c.latencies.clone()));
        (r.longest_silence_s, r.longest_silence_at_s) = longest_silence(&mut c.receipts, until_s);
        r
    }
}

/// How the distinct `(start, samples)` ranges of one session cover `0..sent`.
pub fn coverage(ranges: &mut [(u64, u64)], sent: u64) -> Coverage {
    ranges.sort_unstable();
    let mut c = Coverage::default();
    let mut covered = 0u64;
    for &(start, n) in ranges.iter().filter(|r| r.1 > 0) {
        let end = start + n;
        c.received_samples += n;
        if start > covered {
            c.gaps += 1;
            if covered < sent {
                c.missing_samples += start.min(sent) - covered;
            }
        } else if start < covered {
            c.overlaps += 1;
        }
        if end > sent {
            c.extra_samples += end - start.max(sent);
        }
        covered = covered.max(end);
    }
    if covered < sent {
        c.gaps += 1;
        c.missing_samples += sent - covered;
    }
    c
}

/// The longest interval between consecutive requests (or from the last one to `until`) that
/// begins before `until`, and when it began.
fn longest_silence(receipts: &mut [f64], until: f64) -> (f64, f64) {
    receipts.sort_by(f64::total_cmp);
    let mut best = (0.0, 0.0);
    for w in receipts.windows(2) {
        if w[0] >= until {
            break;
        }
        if w[1] - w[0] > best.0 {
            best = (w[1] - w[0], w[0]);
        }
    }
    if let Some(&last) = receipts.last() {
        if last < until && until - last > best.0 {
            best = (until - last, last);
        }
    }
    best
}

async fn sink_receive(
    State(sink): State<Arc<SinkShared>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    sink.receive(Instant::now(), &q, &headers, &body);
    StatusCode::OK
}

/// `url` with `session_id=id` (replacing one it had).
fn with_session_id(url: &str, id: &str) -> String {
    let Ok(mut u) = url::Url::parse(url) else {
        return url.to_owned();
    };
    let pairs: Vec<(String, String)> = u
        .query_pairs()
        .into_owned()
        .filter(|(k, _)| k != "session_id")
        .collect();
    u.query_pairs_mut()
        .clear()
        .extend_pairs(pairs)
        .append_pair("session_id", id);
    u.to_string()
}

fn default_metrics_url(ws: &str) -> Option<String> {
    let u = url::Url::parse(ws).ok()?;
    let scheme = if u.scheme() == "wss" { "https" } else { "http" };
    Some(format!(
        "{scheme}://{}:{}/metrics",
        u.host_str()?,
        u.port_or_known_default()?
    ))
}

async fn slot(ctx: Arc<Ctx>, index: usize, at: Instant, deadline: Instant) -> SlotResult {
    tokio::time::sleep_until(at).await;
    let mut out = SlotResult::default();
    let url = &ctx.args.url[index % ctx.args.url.len()];
    // A new connection is only worth starting with at least a second of streaming left.
    while out.connections == 0 || Instant::now() + Duration::from_secs(1) < deadline {
        let c = match &ctx.sink {
            Some(sink) => {
                let id = format!("{}-{index}-{}", ctx.session_prefix, out.connections);
                let track = sink.register(&id);
                let c = connection(&ctx, deadline, &with_session_id(url, &id), Some(&track)).await;
                let mut g = track.lock().expect("not poisoned");
                g.done = true;
                g.closed_samples = c.closed.then_some(c.closed_samples);
                c
            }
            None => connection(&ctx, deadline, url, None).await,
        };
        let failed = c.failed;
        out.add(c);
        if failed {
            // Back off before reconnecting (the server may be over capacity).
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if ctx.args.idle {
            break;
        }
    }
    out
}

fn bump(errors: &mut BTreeMap<String, u64>, code: &str) {
    *errors.entry(code.to_owned()).or_default() += 1;
}

/// One WebSocket connection: stream (one pass of a container, raw audio until the deadline),
/// `CloseStream`, wait for `Closed`.
async fn connection(
    ctx: &Ctx,
    deadline: Instant,
    url: &str,
    track: Option<&Arc<Mutex<SessionTrack>>>,
) -> ConnResult {
    let mut res = ConnResult::default();
    let connect = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await;
    let ws = match connect {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => {
            res.failed = true;
            let code = match &e {
                tokio_tungstenite::tungstenite::Error::Http(r) => {
                    format!("http_{}", r.status().as_u16())
                }
                _ => "connect".to_owned(),
            };
            bump(&mut res.errors, &code);
            return res;
        }
        Err(_) => {
            res.failed = true;
            bump(&mut res.errors, "connect_timeout");
            return res;
        }
    };
    ctx.live.connected.fetch_add(1, Ordering::Relaxed);
    let (mut tx, mut rx) = ws.split();
    let cap = &ctx.capture;
    let speed = ctx.args.speed;
    // (cumulative samples after the message, when it was sent), oldest first.
    let sent: Mutex<VecDeque<(u64, Instant)>> = Mutex::new(VecDeque::new());
    let close_sent: Mutex<Option<Instant>> = Mutex::new(None);

    let sender = async {
        let start = Instant::now();
        let mut k: u64 = 0;
        let mut samples = 0u64;
        let mut whole_pass = false;
        if ctx.args.idle {
            let mut tick = start;
            loop {
                tick += Duration::from_secs(5);
                if tick >= deadline {
                    tokio::time::sleep_until(deadline).await;
                    break;
                }
                tokio::time::sleep_until(tick).await;
                tx.send(Message::Text(r#"{"type":"KeepAlive"}"#.into()))
                    .await?;
            }
        } else {
            let n = cap.messages.len() as u64;
            loop {
                if !cap.raw && k == n {
                    whole_pass = true;
                    break;
                }
                if speed > 0.0 {
                    let at = start + Duration::from_secs_f64(cap.t_ms(k) / speed / 1000.0);
                    if at >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(at).await;
                } else if Instant::now() >= deadline {
                    break;
                }
                let m = cap.messages[(k % n) as usize];
                let bytes = bytes::Bytes::copy_from_slice(&cap.data[m.offset..m.offset + m.length]);
                let len = bytes.len() as u64;
                let cum = cap.cum_after(k);
                // The sink's clock starts before the send: a webhook cannot beat it.
                if let (Some(t), Some(c)) = (track, cum) {
                    t.lock()
                        .expect("not poisoned")
                        .sends
                        .push((c, Instant::now()));
                }
                tx.send(Message::Binary(bytes)).await?;
                let now = Instant::now();
                ctx.live.messages.fetch_add(1, Ordering::Relaxed);
                ctx.live.bytes.fetch_add(len, Ordering::Relaxed);
                if let Some(c) = cum {
                    samples = c;
                    sent.lock().expect("not poisoned").push_back((c, now));
                    if let Some(t) = track {
                        t.lock().expect("not poisoned").sent = c;
                    }
                }
                k += 1;
            }
        }
        if whole_pass {
            samples += cap.tail;
            // The decoder's tail comes out at close: it is "sent" with `CloseStream`.
            if let Some(t) = track {
                let mut g = t.lock().expect("not poisoned");
                g.sends.push((samples, Instant::now()));
                g.sent = samples;
            }
        }
        tx.send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
            .await?;
        *close_sent.lock().expect("not poisoned") = Some(Instant::now());
        anyhow::Ok((k, samples, tx))
    };

    let receiver = async {
        let mut r = RecvState::default();
        while let Some(msg) = rx.next().await {
            let msg = match msg {
                Ok(m) => m,
                Err(_) => {
                    r.io_error = true;
                    break;
                }
            };
            match msg {
                Message::Text(t) => {
                    let now = Instant::now();
                    let Ok(ev) = serde_json::from_str::<serde_json::Value>(&t) else {
                        continue;
                    };
                    match ev["type"].as_str() {
                        Some("Progress") => {
                            let secs = ev["seconds_decoded"].as_f64().unwrap_or(0.0);
                            r.last_progress = secs;
                            let target = (secs * 16_000.0).round() as u64;
                            let mut q = sent.lock().expect("not poisoned");
                            while q.front().is_some_and(|&(c, _)| c < target) {
                                q.pop_front();
                            }
                            if let Some(&(_, at)) = q.front() {
                                r.latencies.push((now - at).as_secs_f32() * 1000.0);
                            }
                        }
                        Some("Error") => {
                            let code = ev["code"].as_str().unwrap_or("unknown");
                            bump(&mut r.errors, code);
                        }
                        Some("Closed") => {
                            let s = &ev["summary"];
                            r.closed = true;
                            r.closed_samples = s["samples_decoded"].as_u64().unwrap_or(0);
                            r.closed_seconds = s["seconds_decoded"].as_f64().unwrap_or(0.0);
                            r.decode_errors = s["decode_errors"].as_u64().unwrap_or(0);
                            for c in s["consumers"].as_array().into_iter().flatten() {
                                r.delivered += c["delivered_bytes"].as_u64().unwrap_or(0);
                                r.dropped += c["dropped_bytes"].as_u64().unwrap_or(0);
                            }
                            if let Some(at) = *close_sent.lock().expect("not poisoned") {
                                r.close_latency = Some((now - at).as_secs_f32() * 1000.0);
                            }
                        }
                        _ => {}
                    }
                }
                Message::Close(frame) => {
                    r.close_code = Some(frame.map_or(1005, |f| u16::from(f.code)));
                    break;
                }
                _ => {}
            }
        }
        r
    };
    tokio::pin!(receiver);
    let close_timeout = Duration::from_secs_f64(ctx.args.close_timeout);
    let recv = tokio::select! {
        sent_result = sender => {
            match sent_result {
                Ok((k, samples, mut tx)) => {
                    res.messages = k;
                    res.samples_sent = samples;
                    let r = match tokio::time::timeout(close_timeout, &mut receiver).await {
                        Ok(r) => r,
                        Err(_) => {
                            bump(&mut res.errors, "closed_timeout");
                            res.failed = true;
                            RecvState::default()
                        }
                    };
                    let _ = tx.close().await;
                    r
                }
                Err(_) => {
                    bump(&mut res.errors, "send");
                    res.failed = true;
                    // The server closed on us; collect what it said.
                    tokio::time::timeout(close_timeout, &mut receiver).await.unwrap_or_default()
                }
            }
        }
        r = &mut receiver => {
            // The server ended the session before we finished sending.
            if r.close_code == Some(1000) && !r.io_error {
                bump(&mut res.errors, "closed_early");
            }
            res.failed = true;
            r
        }
    };
    ctx.live.connected.fetch_sub(1, Ordering::Relaxed);
    if recv.io_error {
        bump(&mut res.errors, "io");
        res.failed = true;
    }
    match recv.close_code {
        Some(1000) => {}
        Some(c) => {
            bump(&mut res.errors, &format!("close_{c}"));
            res.failed = true;
        }
        None => {
            if !res.failed {
                bump(&mut res.errors, "no_close_frame");
                res.failed = true;
            }
        }
    }
    if !recv.closed && !res.failed {
        bump(&mut res.errors, "no_closed_event");
        res.failed = true;
    }
    if !recv.errors.is_empty() {
        res.failed = true;
    }
    for (k, v) in recv.errors {
        *res.errors.entry(k).or_default() += v;
    }
    res.closed = recv.closed;
    res.closed_samples = recv.closed_samples;
    res.closed_seconds = recv.closed_seconds;
    res.delivered = recv.delivered;
    res.dropped = recv.dropped;
    res.decode_errors = recv.decode_errors;
    res.last_progress = recv.last_progress;
    res.latencies = recv.latencies;
    res.close_latency = recv.close_latency;
    res
}

#[derive(Default)]
struct RecvState {
    io_error: bool,
    close_code: Option<u16>,
    closed: bool,
    closed_samples: u64,
    closed_seconds: f64,
    delivered: u64,
    dropped: u64,
    decode_errors: u64,
    last_progress: f64,
    latencies: Vec<f32>,
    close_latency: Option<f32>,
    errors: BTreeMap<String, u64>,
}

/// VmRSS of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Sum of every series of a metric in a Prometheus text page.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        if l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' ')) {
            if let Some(v) = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                *found.get_or_insert(0.0) += v;
            }
        }
    }
    found
}

/// RSS and CPU readings of one process.
#[derive(Debug, Clone, Default)]
struct ProcSeries {
    rss: Vec<(f64, u64)>,
    cpu_first: Option<(f64, u64)>,
    cpu_last: Option<(f64, u64)>,
}

async fn sample_loop(
    ctx: Arc<Ctx>,
    metrics_url: Option<String>,
    procs: Vec<Proc>,
    start: Instant,
    stop: tokio_util::sync::CancellationToken,
) -> (Vec<Sample>, Vec<ProcSeries>) {
    let mut series = vec![ProcSeries::default(); procs.len()];
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
    {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("voxgate load: no HTTP client for the metrics scrape ({e}); buffered bytes and server sessions will be missing");
            None
        }
    };
    let mut scrape_failed = false;
    let mut out = Vec::new();
    let mut next = start;
    loop {
        let scraped = match (&client, &metrics_url) {
            (Some(c), Some(u)) => Some(match c.get(u).send().await {
                Ok(resp) => resp.text().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }),
            _ => None,
        };
        let (buffered, server_sessions) = match scraped {
            Some(Ok(text)) => (
                Some(metric_sum(&text, crate::metrics::BUFFERED_BYTES).unwrap_or(0.0)),
                metric_sum(&text, crate::metrics::SESSIONS_ACTIVE),
            ),
            Some(Err(e)) => {
                if !std::mem::replace(&mut scrape_failed, true) {
                    eprintln!("voxgate load: metrics scrape failed ({e}); samples without it are marked missing");
                }
                (None, None)
            }
            None => (None, None),
        };
        let t = start.elapsed().as_secs_f64();
        let mut server_rss = None;
        for (p, s) in procs.iter().zip(series.iter_mut()) {
            if let Some(rss) = rss_bytes(p.pid) {
                s.rss.push((t, rss));
                if p.role == "server" {
                    *server_rss.get_or_insert(0) += rss;
                }
            }
            if let Some(ticks) = cpu_ticks(p.pid) {
                s.cpu_first.get_or_insert((t, ticks));
                s.cpu_last = Some((t, ticks));
            }
        }
        let (sink_requests, sink_latency_max_ms) = match &ctx.sink {
            Some(sink) => {
                let (n, max) = sink.tick();
                (Some(n), max)
            }
            None => (None, None),
        };
        out.push(Sample {
            t,
            rss_bytes: server_rss,
            buffered_bytes: buffered,
            server_sessions,
            client_sessions: ctx.live.connected.load(Ordering::Relaxed),
            sink_requests,
            sink_latency_max_ms,
        });
        if stop.is_cancelled() {
            break;
        }
        next += Duration::from_secs(1);
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.cancelled() => {}
        }
    }
    (out, series)
}

fn summarize_timeline(r: &mut LoadReport, t: &[Sample], loaded_from: f64, loaded_to: f64) {
    let rss: Vec<(f64, u64)> = t.iter().filter_map(|s| Some((s.t, s.rss_bytes?))).collect();
    r.rss_baseline_bytes = rss.first().map(|x| x.1);
    r.rss_peak_bytes = rss.iter().map(|x| x.1).max();
    r.rss_end_bytes = rss.last().map(|x| x.1);
    let loaded: Vec<u64> = rss
        .iter()
        .filter(|(ts, _)| *ts >= loaded_from + 1.0 && *ts <= loaded_to)
        .map(|x| x.1)
        .collect();
    if !loaded.is_empty() {
        let mean = loaded.iter().sum::<u64>() / loaded.len() as u64;
        r.rss_loaded_bytes = Some(mean);
        if let Some(base) = r.rss_baseline_bytes {
            r.rss_per_session_bytes = Some((mean as f64 - base as f64) / r.sessions as f64);
        }
    }
    let buf: Vec<f64> = t.iter().filter_map(|s| s.buffered_bytes).collect();
    r.buffered_peak_bytes = buf.iter().copied().reduce(f64::max);
    r.buffered_end_bytes = buf.last().copied();
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// The human summary.
pub fn human(r: &LoadReport) -> String {
    let mut s = String::new();
    use std::fmt::Write;
    let _ = writeln!(
        s,
        "voxgate load: {} sessions x {:.0} s at {}x ({}), wall {:.1} s",
        r.sessions,
        r.duration_s,
        r.speed,
        if r.idle { "idle" } else { "streaming" },
        r.wall_seconds
    );
    let _ = writeln!(
        s,
        "  sessions held {} failed {}; connections {} failed {}",
        r.sessions_held, r.sessions_failed, r.connections, r.connections_failed
    );
    let _ = writeln!(
        s,
        "  sent {} messages, {:.1} MB, {:.1} media s; server decoded {:.1} s (Closed), {:.1} s (last Progress)",
        r.messages_sent,
        r.bytes_sent as f64 / 1e6,
        r.seconds_sent,
        r.closed_seconds_decoded,
        r.progress_seconds
    );
    let _ = writeln!(
        s,
        "  samples sent {} decoded {} ({} Closed events); consumers delivered {} B dropped {} B",
        r.samples_sent,
        r.closed_samples_decoded,
        r.closed_events,
        r.delivered_bytes,
        r.dropped_bytes
    );
    let _ = writeln!(
        s,
        "  event latency p50 {:.1} ms p90 {:.1} ms p99 {:.1} ms max {:.1} ms (n={}); close p50 {:.1} ms p99 {:.1} ms",
        r.latency.p50_ms,
        r.latency.p90_ms,
        r.latency.p99_ms,
        r.latency.max_ms,
        r.latency.count,
        r.close_latency.p50_ms,
        r.close_latency.p99_ms
    );
    if let (Some(b), Some(p), Some(e)) = (r.rss_baseline_bytes, r.rss_peak_bytes, r.rss_end_bytes) {
        let _ = writeln!(
            s,
            "  server RSS baseline {:.1} MiB, loaded {:.1} MiB, peak {:.1} MiB, end {:.1} MiB; per session {:.1} KiB",
            mib(b),
            mib(r.rss_loaded_bytes.unwrap_or(0)),
            mib(p),
            mib(e),
            r.rss_per_session_bytes.unwrap_or(0.0) / 1024.0
        );
    }
    if let Some(p) = r.buffered_peak_bytes {
        let _ = writeln!(
            s,
            "  buffered bytes peak {:.0}, end {:.0}",
            p,
            r.buffered_end_bytes.unwrap_or(0.0)
        );
    }
    if let Some(k) = &r.sink {
        let _ = writeln!(
            s,
            "  sink {}: {} requests, {} batches, {} samples; duplicates {} (mismatched {}), gaps {}, missing {} samples, overlaps {}, extra {}, bad {}, unknown session {}; sessions complete {}/{} (settled in {:.1} s)",
            k.listen,
            k.requests,
            k.batches,
            k.samples,
            k.duplicates,
            k.duplicate_mismatches,
            k.gaps,
            k.missing_samples,
            k.overlaps,
            k.extra_samples,
            k.bad_requests,
            k.unknown_session_requests,
            k.sessions_complete,
            k.sessions,
            k.settle_seconds
        );
        match &k.latency {
            Some(l) => {
                let _ = writeln!(
                    s,
                    "  chunk-to-webhook latency p50 {:.1} ms p90 {:.1} ms p99 {:.1} ms max {:.1} ms (n={}); longest silence {:.2} s at t={:.1} s",
                    l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.count, k.longest_silence_s, k.longest_silence_at_s
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "  chunk-to-webhook latency: not measured; longest silence {:.2} s at t={:.1} s",
                    k.longest_silence_s, k.longest_silence_at_s
                );
            }
        }
    }
    for p in &r.processes {
        let _ = writeln!(
            s,
            "  {} {} (pid {}): CPU {} s under full load ({} s/s), {} s over the run; RSS peak {}{}",
            p.role,
            p.label,
            p.pid,
            p.cpu_seconds.map_or("-".into(), |c| format!("{c:.2}")),
            p.cpu_per_second.map_or("-".into(), |c| format!("{c:.3}")),
            p.cpu_seconds_run.map_or("-".into(), |c| format!("{c:.2}")),
            p.rss_peak_bytes
                .map_or("-".into(), |b| format!("{:.1} MiB", mib(b))),
            if p.exited { " (exited)" } else { "" }
        );
    }
    if r.errors.is_empty() {
        let _ = write!(s, "  errors: none");
    } else {
        let list: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = write!(s, "  errors: {}", list.join(" "));
    }
    s
}

/// A plot of server RSS (MiB, left axis) and buffered bytes (KiB, right axis) over time.
pub fn svg(r: &LoadReport) -> String {
    let (w, h, ml, mr, mt, mb) = (800.0, 360.0, 70.0, 80.0, 30.0, 40.0);
    let pw = w - ml - mr;
    let ph = h - mt - mb;
    let tmax = r.timeline.last().map_or(1.0, |s| s.t).max(1.0);
    let rss: Vec<(f64, f64)> = r
        .timeline
        .iter()
        .filter_map(|s| Some((s.t, mib(s.rss_bytes?))))
        .collect();
    let buf: Vec<(f64, f64)> = r
        .timeline
        .iter()
        .filter_map(|s| Some((s.t, s.buffered_bytes? / 1024.0)))
        .collect();
    let top = |v: &[(f64, f64)]| {
        let m = v.iter().map(|p| p.1).fold(0.0, f64::max);
        if m > 0.0 {
            m * 1.1
        } else {
            1.0
        }
    };
    let (rmax, bmax) = (top(&rss), top(&buf));
    let line = |v: &[(f64, f64)], max: f64| -> String {
        v.iter()
            .map(|(t, y)| {
                format!(
                    "{:.1},{:.1}",
                    ml + t / tmax * pw,
                    mt + ph - (y / max).min(1.0) * ph
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut s = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="{w}" height="{h}" fill="white"/>
<text x="{ml}" y="18">voxgate load: {} sessions, {:.0} s at {}x - server RSS (blue, MiB) and buffered bytes (orange, KiB)</text>
<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>
"##,
        r.sessions, r.duration_s, r.speed
    );
    for i in 0..=4 {
        let f = f64::from(i) / 4.0;
        let y = mt + ph - f * ph;
        s += &format!(
            "<line x1=\"{ml}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\n",
            ml + pw
        );
        s += &format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#1f77b4\">{:.1}</text>\n",
            ml - 6.0,
            y + 4.0,
            rmax * f
        );
        s += &format!(
            "<text x=\"{}\" y=\"{:.1}\" fill=\"#ff7f0e\">{:.1}</text>\n",
            ml + pw + 6.0,
            y + 4.0,
            bmax * f
        );
        let x = ml + f * pw;
        s += &format!(
            "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{:.0} s</text>\n",
            mt + ph + 18.0,
            tmax * f
        );
    }
    if !rss.is_empty() {
        s += &format!(
            "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>\n",
            line(&rss, rmax)
        );
    }
    if !buf.is_empty() {
        s += &format!(
            "<polyline fill=\"none\" stroke=\"#ff7f0e\" stroke-width=\"2\" points=\"{}\"/>\n",
            line(&buf, bmax)
        );
    }
    s += "</svg>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let l = Latency::of((1..=100).map(|x| x as f32).collect());
        assert_eq!(l.p50_ms, 50.0);
        assert_eq!(l.p99_ms, 99.0);
        assert_eq!(l.max_ms, 100.0);
        assert_eq!(Latency::of(vec![]).count, 0);
    }

    #[test]
    fn metric_sums_labels() {
        let text = "# HELP x\nvoxgate_buffered_bytes{consumer=\"webhook\"} 10\nvoxgate_buffered_bytes{consumer=\"subscriber\"} 5\nvoxgate_buffered_bytes_other 7\n";
        assert_eq!(metric_sum(text, "voxgate_buffered_bytes"), Some(15.0));
        assert_eq!(metric_sum(text, "voxgate_sessions_active"), None);
    }

    #[test]
    fn coverage_counts_holes_overlaps_and_extra() {
        let cov = |mut v: Vec<(u64, u64)>, sent| coverage(&mut v, sent);
        assert_eq!(
            cov(vec![(100, 100), (0, 100)], 200),
            Coverage {
                received_samples: 200,
                ..Coverage::default()
            }
        );
        // A hole in the middle and a missing end.
        let c = cov(vec![(0, 100), (150, 50)], 300);
        assert_eq!((c.gaps, c.missing_samples), (2, 150));
        // Two keys over the same samples; a batch past what was sent.
        let c = cov(vec![(0, 100), (50, 100), (150, 10)], 150);
        assert_eq!((c.overlaps, c.extra_samples, c.gaps), (1, 10, 0));
        let c = cov(vec![], 10);
        assert_eq!((c.gaps, c.missing_samples), (1, 10));
        assert_eq!(cov(vec![], 0), Coverage::default());
    }

    #[test]
    fn silence_is_the_longest_pause_before_the_end() {
        let mut t = vec![1.0, 1.5, 4.0, 4.1, 20.0];
        assert_eq!(longest_silence(&mut t, 10.0), (15.9, 4.1));
        let mut t = vec![1.0, 1.5, 4.0, 4.1];
        assert_eq!(longest_silence(&mut t, 5.0), (2.5, 1.5));
        assert_eq!(longest_silence(&mut [], 5.0), (0.0, 0.0));
    }

    #[test]
    fn session_id_replaces_the_urls() {
        assert_eq!(
            with_session_id(
                "ws://h:1/v1/listen?encoding=linear16&session_id=x",
                "load-1-0"
            ),
            "ws://h:1/v1/listen?encoding=linear16&session_id=load-1-0"
        );
        assert_eq!(
            with_session_id("ws://h:1/v1/listen", "a"),
            "ws://h:1/v1/listen?session_id=a"
        );
    }

    #[test]
    fn cpu_ticks_of_self() {
        assert!(cpu_ticks(std::process::id()).is_some());
    }

    #[test]
    fn metrics_url_from_ws() {
        assert_eq!(
            default_metrics_url("ws://127.0.0.1:8080/v1/listen?encoding=linear16").as_deref(),
            Some("http://127.0.0.1:8080/metrics")
        );
    }
}
