//! `voxgate load`: a bounded load generator for a running gateway.
//!
//! N concurrent sessions each stream one capture. A container capture (WebM/Ogg) is streamed
//! once per connection and every further loop is a new connection; raw audio (a URL with
//! `encoding=...`) loops its bytes on one connection. Messages are paced by the capture index's
//! `t_recv_ms` (or `--chunk-ms` of media per message for raw audio), `--speed` times faster than
//! real time. At the deadline every session sends `CloseStream` and waits for `Closed`.
//!
//! Event latency: the capture is decoded locally once, which gives the exact number of 16 kHz
//! samples the server has decoded after each message. A `Progress { seconds_decoded }` event
//! is matched to the first sent message whose cumulative sample count reaches it; the latency is
//! the time from sending that message to receiving the event.
//!
//! While it runs, the server's RSS (`/proc/PID/status`, `--server-pid`) and the sum of
//! `voxgate_buffered_bytes` (from `/metrics`) are sampled every second.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use voxgate_media::{Decoder, Limits, SourceFormat};

use super::index;

#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Ingest WebSocket URL (add ?encoding=linear16&sample_rate=16000 for raw PCM).
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/listen")]
    pub url: String,
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
    /// Sample this process's RSS (VmRSS) every second.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Prometheus page to scrape (default: /metrics on the URL's host; "none" to disable).
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
            url: url.into(),
            sessions: 10,
            duration: 10.0,
            file: file.into(),
            index: None,
            speed: 1.0,
            ramp: 0.0,
            json: None,
            server_pid: None,
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
}

/// What the run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    pub url: String,
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
        let parsed = url::Url::parse(&args.url)?;
        let query: HashMap<String, String> = parsed.query_pairs().into_owned().collect();
        let format = crate::connection::source_format(&query).map_err(|e| anyhow::anyhow!(e))?;
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
    let capture = Capture::load(args)?;
    let metrics_url = match args.metrics_url.as_deref() {
        Some("none") => None,
        Some(u) => Some(u.to_owned()),
        None => default_metrics_url(&args.url),
    };
    let ctx = Arc::new(Ctx {
        args: args.clone(),
        capture,
        live: Live::default(),
    });
    let start = Instant::now();
    let ramp = Duration::from_secs_f64(args.ramp);
    let deadline = start + ramp + Duration::from_secs_f64(args.duration);

    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn(sample_loop(
        ctx.clone(),
        metrics_url,
        args.server_pid,
        start,
        stop.clone(),
    ));
    // Let the sampler take its baseline before the first connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start_sessions = Instant::now();

    let mut tasks = Vec::with_capacity(args.sessions);
    for i in 0..args.sessions {
        let at = start_sessions + ramp.mul_f64(i as f64 / args.sessions as f64);
        tasks.push(tokio::spawn(slot(ctx.clone(), at, deadline)));
    }
    let mut slots = Vec::with_capacity(tasks.len());
    for t in tasks {
        slots.push(t.await.unwrap_or_else(|_| SlotResult {
            failed: true,
            ..SlotResult::default()
        }));
    }
    // One last sample after everything closed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    let timeline = sampler.await.unwrap_or_default();
    let wall = start.elapsed().as_secs_f64();

    let mut r = LoadReport {
        url: args.url.clone(),
        file: args.file.display().to_string(),
        sessions: args.sessions,
        duration_s: args.duration,
        speed: args.speed,
        ramp_s: args.ramp,
        idle: args.idle,
        wall_seconds: wall,
        messages_sent: ctx.live.messages.load(Ordering::Relaxed),
        bytes_sent: ctx.live.bytes.load(Ordering::Relaxed),
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

fn default_metrics_url(ws: &str) -> Option<String> {
    let u = url::Url::parse(ws).ok()?;
    let scheme = if u.scheme() == "wss" { "https" } else { "http" };
    Some(format!(
        "{scheme}://{}:{}/metrics",
        u.host_str()?,
        u.port_or_known_default()?
    ))
}

async fn slot(ctx: Arc<Ctx>, at: Instant, deadline: Instant) -> SlotResult {
    tokio::time::sleep_until(at).await;
    let mut out = SlotResult::default();
    // A new connection is only worth starting with at least a second of streaming left.
    while out.connections == 0 || Instant::now() + Duration::from_secs(1) < deadline {
        let c = connection(&ctx, deadline).await;
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
async fn connection(ctx: &Ctx, deadline: Instant) -> ConnResult {
    let mut res = ConnResult::default();
    let connect = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(ctx.args.url.as_str()),
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
                tx.send(Message::Binary(bytes)).await?;
                let now = Instant::now();
                ctx.live.messages.fetch_add(1, Ordering::Relaxed);
                ctx.live.bytes.fetch_add(len, Ordering::Relaxed);
                if let Some(c) = cap.cum_after(k) {
                    samples = c;
                    sent.lock().expect("not poisoned").push_back((c, now));
                }
                k += 1;
            }
        }
        if whole_pass {
            samples += cap.tail;
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

async fn sample_loop(
    ctx: Arc<Ctx>,
    metrics_url: Option<String>,
    pid: Option<u32>,
    start: Instant,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<Sample> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok();
    let mut out = Vec::new();
    let mut next = start;
    loop {
        let (buffered, server_sessions) = match (&client, &metrics_url) {
            (Some(c), Some(u)) => match c.get(u).send().await {
                Ok(resp) => match resp.text().await {
                    Ok(text) => (
                        Some(metric_sum(&text, crate::metrics::BUFFERED_BYTES).unwrap_or(0.0)),
                        metric_sum(&text, crate::metrics::SESSIONS_ACTIVE),
                    ),
                    Err(_) => (None, None),
                },
                Err(_) => (None, None),
            },
            _ => (None, None),
        };
        out.push(Sample {
            t: start.elapsed().as_secs_f64(),
            rss_bytes: pid.and_then(rss_bytes),
            buffered_bytes: buffered,
            server_sessions,
            client_sessions: ctx.live.connected.load(Ordering::Relaxed),
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
    out
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
    fn metrics_url_from_ws() {
        assert_eq!(
            default_metrics_url("ws://127.0.0.1:8080/v1/listen?encoding=linear16").as_deref(),
            Some("http://127.0.0.1:8080/metrics")
        );
    }
}
