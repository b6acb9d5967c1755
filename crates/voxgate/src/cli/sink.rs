//! `voxgate sink`: an audio-bytes webhook receiver that checks what it is given.
//!
//! It accepts POSTs on any path, verifies `x-voxgate-signature` when it has the secret (over the
//! canonical string, in constant time, refusing timestamps more than `--max-age-seconds` from
//! its clock), and per
//! session and path checks that sequence numbers run 0, 1, 2, ... and that every request starts
//! where the previous one ended (`x-voxgate-start-sample`). It counts gaps, duplicates (an
//! `idempotency-key` seen before), out-of-order arrivals, and bytes and samples per session.
//! It can be slow (`--delay-ms`) or fail on purpose (`--fail-rate`, answering 503). `GET /stats`
//! returns the counters as JSON (`?sessions=1` adds the per-session table).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::fanout::contract::{
    verify, DEFAULT_MAX_SIGNATURE_AGE_SECONDS, H_IDEMPOTENCY_KEY, H_SAMPLES, H_SEQUENCE,
    H_SESSION_ID, H_START_SAMPLE,
};

#[derive(Debug, Clone, clap::Args)]
pub struct SinkArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub listen: String,
    /// Wait this long before answering each request.
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Probability (0..1) of answering 503 instead of accepting a request.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// HMAC secret: requests without a valid signature are refused (401) and counted.
    #[arg(long)]
    pub secret: Option<String>,
    /// Signed requests whose `x-voxgate-timestamp` is further than this from now are refused.
    #[arg(long, default_value_t = DEFAULT_MAX_SIGNATURE_AGE_SECONDS)]
    pub max_age_seconds: u64,
    /// Print a one-line summary every this many seconds (0 = never).
    #[arg(long, default_value_t = 0.0)]
    pub report_every: f64,
}

/// How the sink behaves.
#[derive(Debug, Clone, Default)]
pub struct SinkConfig {
    pub delay: Duration,
    pub fail_rate: f64,
    pub secret: Option<String>,
    /// Oldest (or furthest ahead) signature timestamp accepted, in seconds (0: the default).
    pub max_age_seconds: u64,
}

/// One (session, path) stream of requests.
#[derive(Debug, Default)]
struct Stream {
    /// Every sequence number below this one has been received.
    next_seq: u64,
    /// The start sample the request `next_seq` must carry.
    next_start: u64,
    /// Received above `next_seq` (out of order): seq -> (start, samples).
    ahead: BTreeMap<u64, (u64, u64)>,
}

/// Counts per session.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SessionCounts {
    pub requests: u64,
    pub bytes: u64,
    pub samples: u64,
}

#[derive(Debug, Default)]
struct Inner {
    requests: u64,
    accepted: u64,
    failed_on_purpose: u64,
    bad_signature: u64,
    bad_request: u64,
    duplicates: u64,
    duplicate_samples: u64,
    out_of_order: u64,
    start_gaps: u64,
    bad_length: u64,
    bytes: u64,
    samples: u64,
    streams: HashMap<(String, String), Stream>,
    sessions: HashMap<String, SessionCounts>,
}

/// What the sink has seen.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SinkStats {
    /// Every request, whatever the answer.
    pub requests: u64,
    /// Answered 200 (duplicates included).
    pub accepted: u64,
    /// Answered 503 by `--fail-rate`.
    pub failed_on_purpose: u64,
    pub bad_signature: u64,
    /// Missing or malformed headers.
    pub bad_request: u64,
    /// A sequence number (idempotency key) already received; its samples are not counted again.
    pub duplicates: u64,
    pub duplicate_samples: u64,
    /// Arrived before a lower sequence number of its stream.
    pub out_of_order: u64,
    /// Sequence numbers still missing below the highest one received.
    pub seq_gaps: u64,
    /// Requests that did not start where the previous one ended.
    pub start_gaps: u64,
    /// `x-voxgate-samples` disagreeing with the body length.
    pub bad_length: u64,
    /// Audio bytes and samples accepted once.
    pub bytes: u64,
    pub samples: u64,
    pub sessions: usize,
    pub streams: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_session: Option<BTreeMap<String, SessionCounts>>,
}

impl SinkStats {
    /// No gap, duplicate, reordering, bad signature or bad length.
    pub fn clean(&self) -> bool {
        self.duplicates == 0
            && self.out_of_order == 0
            && self.seq_gaps == 0
            && self.start_gaps == 0
            && self.bad_signature == 0
            && self.bad_request == 0
            && self.bad_length == 0
    }
}

/// The sink's shared state.
pub struct Sink {
    cfg: SinkConfig,
    inner: Mutex<Inner>,
}

impl Sink {
    pub fn new(cfg: SinkConfig) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            inner: Mutex::new(Inner::default()),
        })
    }

    pub fn stats(&self, per_session: bool) -> SinkStats {
        let g = self.inner.lock().expect("sink lock is never poisoned");
        let seq_gaps = g
            .streams
            .values()
            .map(|s| match s.ahead.keys().next_back() {
                Some(&max) => max + 1 - s.next_seq - s.ahead.len() as u64,
                None => 0,
            })
            .sum();
        SinkStats {
            requests: g.requests,
            accepted: g.accepted,
            failed_on_purpose: g.failed_on_purpose,
            bad_signature: g.bad_signature,
            bad_request: g.bad_request,
            duplicates: g.duplicates,
            duplicate_samples: g.duplicate_samples,
            out_of_order: g.out_of_order,
            seq_gaps,
            start_gaps: g.start_gaps,
            bad_length: g.bad_length,
            bytes: g.bytes,
            samples: g.samples,
            sessions: g.sessions.len(),
            streams: g.streams.len(),
            per_session: per_session.then(|| {
                g.sessions
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            }),
        }
    }

    /// Records one request; returns the status to answer.
    fn record(
        &self,
        uri: &Uri,
        query: &HashMap<String, String>,
        headers: &HeaderMap,
        body: &[u8],
    ) -> StatusCode {
        let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
        let num = |k: &str| h(k).and_then(|v| v.parse::<u64>().ok());
        {
            let mut g = self.inner.lock().expect("sink lock is never poisoned");
            g.requests += 1;
        }
        if self.cfg.fail_rate > 0.0 && rand::random::<f64>() < self.cfg.fail_rate {
            self.inner.lock().expect("not poisoned").failed_on_purpose += 1;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        let key = h(H_IDEMPOTENCY_KEY).unwrap_or("");
        let path = uri.path();
        if let Some(secret) = &self.cfg.secret {
            let max_age = match self.cfg.max_age_seconds {
                0 => DEFAULT_MAX_SIGNATURE_AGE_SECONDS,
                n => n,
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let request = ("POST", path, uri.query().unwrap_or(""));
            if verify(secret, request, headers, body, now, max_age).is_err() {
                self.inner.lock().expect("not poisoned").bad_signature += 1;
                return StatusCode::UNAUTHORIZED;
            }
        }
        let session = h(H_SESSION_ID)
            .map(str::to_owned)
            .or_else(|| query.get("session_id").cloned());
        let (Some(session), Some(seq), Some(start), Some(samples)) = (
            session,
            num(H_SEQUENCE),
            num(H_START_SAMPLE),
            num(H_SAMPLES),
        ) else {
            self.inner.lock().expect("not poisoned").bad_request += 1;
            return StatusCode::BAD_REQUEST;
        };
        // PCM body, or a WAV with a 44-byte header.
        let pcm_len = if body.len() >= 44 && &body[..4] == b"RIFF" && &body[8..12] == b"WAVE" {
            body.len() - 44
        } else {
            body.len()
        } as u64;
        let mut g = self.inner.lock().expect("sink lock is never poisoned");
        let g = &mut *g;
        g.accepted += 1;
        if pcm_len != samples * 2 || !key.ends_with(&format!(":{seq}")) {
            g.bad_length += u64::from(pcm_len != samples * 2);
            g.bad_request += u64::from(!key.ends_with(&format!(":{seq}")));
        }
        let stream = g
            .streams
            .entry((session.clone(), path.to_owned()))
            .or_default();
        if seq < stream.next_seq || stream.ahead.contains_key(&seq) {
            g.duplicates += 1;
            g.duplicate_samples += samples;
            return StatusCode::OK;
        }
        if seq > stream.next_seq {
            stream.ahead.insert(seq, (start, samples));
            g.out_of_order += 1;
        } else {
            if start != stream.next_start {
                g.start_gaps += 1;
            }
            stream.next_seq = seq + 1;
            stream.next_start = start + samples;
            while let Some((s, n)) = stream.ahead.remove(&stream.next_seq) {
                if s != stream.next_start {
                    g.start_gaps += 1;
                }
                stream.next_seq += 1;
                stream.next_start = s + n;
            }
        }
        g.bytes += pcm_len;
        g.samples += samples;
        let c = g.sessions.entry(session).or_default();
        c.requests += 1;
        c.bytes += pcm_len;
        c.samples += samples;
        StatusCode::OK
    }
}

/// The sink's routes: `GET /stats`, and POST on any other path.
pub fn router(sink: Arc<Sink>) -> Router {
    Router::new()
        .route("/stats", get(stats))
        .fallback(receive)
        .with_state(sink)
}

async fn stats(
    State(sink): State<Arc<Sink>>,
    Query(q): Query<HashMap<String, String>>,
) -> Json<SinkStats> {
    let per = q.get("sessions").is_some_and(|v| v == "1" || v == "true");
    Json(sink.stats(per))
}

async fn receive(
    State(sink): State<Arc<Sink>>,
    method: Method,
    uri: Uri,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    if !sink.cfg.delay.is_zero() {
        tokio::time::sleep(sink.cfg.delay).await;
    }
    sink.record(&uri, &q, &headers, &body).into_response()
}

/// Serves `sink` on `listener` until `stop` is cancelled.
pub async fn serve(
    sink: Arc<Sink>,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(sink))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

/// One-line summary.
pub fn summary_line(s: &SinkStats) -> String {
    format!(
        "sink: {} requests, {} accepted, {} failed on purpose, {} bad signatures; {} sessions, {} samples ({:.1} s), {} bytes; gaps seq {} start {}, duplicates {}, out of order {}, bad length {}, bad request {}",
        s.requests,
        s.accepted,
        s.failed_on_purpose,
        s.bad_signature,
        s.sessions,
        s.samples,
        s.samples as f64 / 16_000.0,
        s.bytes,
        s.seq_gaps,
        s.start_gaps,
        s.duplicates,
        s.out_of_order,
        s.bad_length,
        s.bad_request
    )
}

/// `voxgate sink`: serve until SIGINT/SIGTERM, then print the summary (JSON on stdout).
pub async fn run(args: &SinkArgs) -> anyhow::Result<SinkStats> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.fail_rate),
        "--fail-rate must be between 0 and 1"
    );
    let sink = Sink::new(SinkConfig {
        delay: Duration::from_millis(args.delay_ms),
        fail_rate: args.fail_rate,
        secret: args.secret.clone(),
        max_age_seconds: args.max_age_seconds,
    });
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    eprintln!("voxgate sink listening on {}", listener.local_addr()?);
    let stop = crate::shutdown::on_signal("signal received; stopping the sink");
    if args.report_every > 0.0 {
        let sink = sink.clone();
        let stop = stop.clone();
        let every = Duration::from_secs_f64(args.report_every);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => eprintln!("{}", summary_line(&sink.stats(false))),
                    _ = stop.cancelled() => break,
                }
            }
        });
    }
    let server = serve(sink.clone(), listener, stop.clone());
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r?,
        _ = stop.cancelled() => {
            // Give open requests a moment, then report regardless of idle keep-alive clients.
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut server).await;
        }
    }
    let s = sink.stats(false);
    eprintln!("{}", summary_line(&s));
    Ok(s)
}
