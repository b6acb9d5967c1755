//! The embedded audio webhook receiver (`--sink-listen`): `POST /{name}` always answers 200 and
//! records, per session the tool opened, which sample ranges arrived under which idempotency
//! key and how long after the tool sent their last sample. At the end it reports coverage of
//! what was sent (gaps, missing, overlapping and extra samples), duplicates and latency.
//!
//! It reads the audio webhook's headers only; it never checks signatures (`voxgate sink` does).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::report::Latency;

/// The audio webhook's headers the receiver reads.
use crate::fanout::contract::{
    H_IDEMPOTENCY_KEY as IDEMPOTENCY_KEY, H_SAMPLES as SAMPLES, H_SESSION_ID as SESSION_ID,
    H_START_SAMPLE as START_SAMPLE,
};

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

impl SinkReport {
    /// Adds one session's findings to the totals.
    fn add(&mut self, s: SinkSession) {
        let cov = s.coverage;
        self.batches += s.batches;
        self.samples += cov.received_samples;
        self.duplicates += s.duplicates;
        self.overlaps += cov.overlaps;
        self.gaps += cov.gaps;
        self.missing_samples += cov.missing_samples;
        self.extra_samples += cov.extra_samples;
        if cov.missing_samples > 0 {
            self.missing_by_session
                .insert(s.session_id.clone(), cov.missing_samples);
        }
        if cov.missing_samples == 0 && cov.gaps == 0 {
            self.sessions_complete += 1;
        }
        self.per_session.push(s);
    }
}

/// The batch a webhook request announces in its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Batch<'a> {
    key: &'a str,
    start: u64,
    samples: u64,
}

impl<'a> Batch<'a> {
    fn from_headers(headers: &'a HeaderMap) -> Option<Self> {
        let num = |k: &str| header(headers, k).and_then(|v| v.parse::<u64>().ok());
        Some(Self {
            key: header(headers, IDEMPOTENCY_KEY)?,
            start: num(START_SAMPLE)?,
            samples: num(SAMPLES)?,
        })
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Bytes of PCM in a body: all of it, or all but a WAV's 44-byte header.
fn pcm_len(body: &[u8]) -> u64 {
    let wav = body.len() >= 44 && &body[..4] == b"RIFF" && &body[8..12] == b"WAVE";
    (if wav { body.len() - 44 } else { body.len() }) as u64
}

/// What a request with a well-formed batch turned out to be.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Receipt {
    /// For a session id this run did not open.
    UnknownSession,
    /// A key not seen before, with its chunk-to-webhook latency when a send matches it.
    First { latency_ms: Option<f32> },
    /// A key seen before; `mismatch` when its range differs from the first receipt's.
    Repeat { mismatch: bool },
}

/// What one connection's session looks like to the embedded sink.
#[derive(Default)]
pub(super) struct SessionTrack {
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
    /// The tool begins sending what brings the server to `cum` samples.
    pub(super) fn sending(&mut self, cum: u64, at: Instant) {
        self.sends.push((cum, at));
    }

    /// The socket has taken everything up to `cum` samples.
    pub(super) fn sent_up_to(&mut self, cum: u64) {
        self.sent = cum;
    }

    /// The connection ended, with `Closed`'s sample count when it got `Closed`.
    pub(super) fn end(&mut self, closed_samples: Option<u64>) {
        self.done = true;
        self.closed_samples = closed_samples;
    }

    fn coverage(&self) -> Coverage {
        let mut ranges: Vec<(u64, u64)> = self.keys.values().copied().collect();
        coverage(&mut ranges, self.sent)
    }

    fn record(&mut self, b: Batch<'_>, now: Instant) -> Receipt {
        if let Some(&prev) = self.keys.get(b.key) {
            self.duplicates += 1;
            return Receipt::Repeat {
                mismatch: prev != (b.start, b.samples),
            };
        }
        self.keys.insert(b.key.to_owned(), (b.start, b.samples));
        // The batch's last sample went out with the first message reaching its end.
        let end = b.start + b.samples;
        let i = self.sends.partition_point(|&(c, _)| c < end);
        let latency_ms = self
            .sends
            .get(i)
            .map(|&(_, at)| now.saturating_duration_since(at).as_secs_f32() * 1000.0);
        Receipt::First { latency_ms }
    }

    fn summary(&self, session_id: &str) -> SinkSession {
        SinkSession {
            session_id: session_id.to_owned(),
            sent_samples: self.sent,
            closed_samples: self.closed_samples,
            batches: self.keys.len() as u64,
            duplicates: self.duplicates,
            coverage: self.coverage(),
        }
    }
}

/// Counts over every request.
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

impl SinkCounters {
    fn count(&mut self, at_s: f64, bad: bool, receipt: Option<Receipt>) {
        self.requests += 1;
        self.receipts.push(at_s);
        self.bad_requests += u64::from(bad);
        match receipt {
            Some(Receipt::UnknownSession) => self.unknown += 1,
            Some(Receipt::Repeat { mismatch }) => self.duplicate_mismatches += u64::from(mismatch),
            Some(Receipt::First {
                latency_ms: Some(l),
            }) => {
                self.latencies.push(l);
                self.interval_max = Some(self.interval_max.map_or(l, |m| m.max(l)));
            }
            Some(Receipt::First { latency_ms: None }) | None => {}
        }
    }

    fn fill(&mut self, r: &mut SinkReport, until_s: f64, timed: bool) {
        r.requests = self.requests;
        r.bad_requests = self.bad_requests;
        r.unknown_session_requests = self.unknown;
        r.duplicate_mismatches = self.duplicate_mismatches;
        r.latency =
            (timed && !self.latencies.is_empty()).then(|| Latency::of(self.latencies.clone()));
        (r.longest_silence_s, r.longest_silence_at_s) =
            longest_silence(&mut self.receipts, until_s);
    }
}

/// The embedded webhook receiver's state.
pub(super) struct SinkState {
    start: Instant,
    sessions: Mutex<HashMap<String, Arc<Mutex<SessionTrack>>>>,
    counters: Mutex<SinkCounters>,
}

impl SinkState {
    fn new(start: Instant) -> Self {
        Self {
            start,
            sessions: Mutex::new(HashMap::new()),
            counters: Mutex::new(SinkCounters::default()),
        }
    }

    /// Starts tracking a session id the tool is about to connect with.
    pub(super) fn register(&self, session_id: &str) -> Arc<Mutex<SessionTrack>> {
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
        let session = query
            .get("session_id")
            .map(String::as_str)
            .or_else(|| header(headers, SESSION_ID));
        let track =
            session.and_then(|s| self.sessions.lock().expect("not poisoned").get(s).cloned());
        let (bad, receipt) = match Batch::from_headers(headers) {
            Some(b) => {
                let receipt = match track {
                    None => Receipt::UnknownSession,
                    Some(t) => t.lock().expect("not poisoned").record(b, now),
                };
                // 16-bit PCM: two bytes per sample.
                (
                    b.samples.checked_mul(2) != Some(pcm_len(body)),
                    Some(receipt),
                )
            }
            None => (true, None),
        };
        let at_s = now.saturating_duration_since(self.start).as_secs_f64();
        self.counters
            .lock()
            .expect("not poisoned")
            .count(at_s, bad, receipt);
    }

    /// Every connection has ended and the sink holds all it sent.
    pub(super) fn all_complete(&self) -> bool {
        let sessions = self.sessions.lock().expect("not poisoned");
        sessions.values().all(|t| {
            let g = t.lock().expect("not poisoned");
            g.done && g.coverage().missing_samples == 0
        })
    }

    /// (requests so far, largest latency since the last call).
    pub(super) fn tick(&self) -> (u64, Option<f32>) {
        let mut c = self.counters.lock().expect("not poisoned");
        (c.requests, c.interval_max.take())
    }

    fn report(&self, listen: String, until_s: f64, settle: f64, timed: bool) -> SinkReport {
        let mut r = SinkReport {
            listen,
            settle_seconds: settle,
            ..SinkReport::default()
        };
        {
            let sessions = self.sessions.lock().expect("not poisoned");
            let mut ids: Vec<&String> = sessions.keys().collect();
            ids.sort();
            for id in ids {
                r.add(sessions[id].lock().expect("not poisoned").summary(id));
            }
            r.sessions = sessions.len();
        }
        self.counters
            .lock()
            .expect("not poisoned")
            .fill(&mut r, until_s, timed);
        r
    }
}

/// The receiver could not listen.
#[derive(Debug, thiserror::Error)]
#[error("--sink-listen {addr}: {error}")]
pub(super) struct SinkError {
    addr: String,
    error: std::io::Error,
}

/// The running receiver: its state and its HTTP server task.
pub(super) struct SinkServer {
    listen: String,
    state: Arc<SinkState>,
    task: JoinHandle<std::io::Result<()>>,
    stop: CancellationToken,
}

impl SinkServer {
    /// Listens on `addr`; receipt times count from `start`.
    pub(super) async fn start(addr: &str, start: Instant) -> Result<Self, SinkError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|error| SinkError {
                addr: addr.to_owned(),
                error,
            })?;
        let state = Arc::new(SinkState::new(start));
        let app = axum::Router::new()
            .route("/{name}", axum::routing::post(receive))
            .with_state(state.clone());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await
        });
        Ok(Self {
            listen: addr.to_owned(),
            state,
            task,
            stop,
        })
    }

    pub(super) fn state(&self) -> &Arc<SinkState> {
        &self.state
    }

    /// What it measured; silences count until `until_s` (seconds from the start); `timed` when
    /// sends carry sample counts, so latencies mean something.
    pub(super) fn report(&self, until_s: f64, settle: f64, timed: bool) -> SinkReport {
        self.state
            .report(self.listen.clone(), until_s, settle, timed)
    }

    /// Stops the server: gracefully within 2 s, else aborted.
    pub(super) async fn stop(mut self) {
        self.stop.cancel();
        if tokio::time::timeout(Duration::from_secs(2), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

async fn receive(
    State(sink): State<Arc<SinkState>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    sink.receive(Instant::now(), &q, &headers, &body);
    StatusCode::OK
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

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

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

    fn headers(key: &str, start: u64, samples: u64) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(IDEMPOTENCY_KEY, HeaderValue::from_str(key).unwrap());
        h.insert(START_SAMPLE, start.into());
        h.insert(SAMPLES, samples.into());
        h
    }

    #[test]
    fn batches_need_all_three_headers_and_wav_bodies_count_without_their_header() {
        let h = headers("s:audio:0", 10, 20);
        let b = Batch::from_headers(&h).unwrap();
        assert_eq!((b.key, b.start, b.samples), ("s:audio:0", 10, 20));
        let mut h = headers("s:audio:0", 10, 20);
        h.remove(SAMPLES);
        assert_eq!(Batch::from_headers(&h), None);
        let mut wav = b"RIFF\0\0\0\0WAVE".to_vec();
        wav.resize(44 + 40, 0);
        assert_eq!(pcm_len(&wav), 40);
        assert_eq!(pcm_len(&[0; 40]), 40);
    }

    #[test]
    fn a_session_sees_latency_repeats_and_mismatches() {
        let t0 = Instant::now();
        let mut s = SessionTrack::default();
        s.sending(100, t0);
        s.sending(200, t0 + Duration::from_millis(10));
        s.sent_up_to(200);
        let b = |key, start, samples| Batch {
            key,
            start,
            samples,
        };
        let later = t0 + Duration::from_millis(35);
        // Samples 100..200 went out with the second message, 25 ms before.
        assert_eq!(
            s.record(b("k1", 100, 100), later),
            Receipt::First {
                latency_ms: Some(25.0)
            }
        );
        assert_eq!(
            s.record(b("k1", 100, 100), later),
            Receipt::Repeat { mismatch: false }
        );
        assert_eq!(
            s.record(b("k1", 0, 100), later),
            Receipt::Repeat { mismatch: true }
        );
        assert_eq!(
            s.record(b("k9", 900, 100), later),
            Receipt::First { latency_ms: None }
        );
        let sum = s.summary("x");
        assert_eq!((sum.batches, sum.duplicates), (2, 2));
        assert_eq!(sum.coverage.missing_samples, 100);
    }

    #[test]
    fn the_state_counts_every_kind_of_request() {
        let t0 = Instant::now();
        let state = SinkState::new(t0);
        let track = state.register("a");
        track.lock().unwrap().sent_up_to(100);
        let q = |id: &str| HashMap::from([("session_id".to_owned(), id.to_owned())]);
        let pcm = vec![0u8; 200];
        state.receive(t0, &q("a"), &headers("a:0", 0, 100), &pcm);
        state.receive(t0, &q("a"), &headers("a:0", 0, 50), &pcm);
        state.receive(t0, &q("b"), &headers("b:0", 0, 100), &pcm);
        state.receive(t0, &q("a"), &HeaderMap::new(), &pcm);
        assert!(!state.all_complete(), "the connection has not ended");
        track.lock().unwrap().end(Some(100));
        assert!(state.all_complete());
        let r = state.report("x".into(), 1.0, 0.5, false);
        assert_eq!(r.requests, 4);
        assert_eq!(
            (
                r.duplicates,
                r.duplicate_mismatches,
                r.unknown_session_requests
            ),
            (1, 1, 1)
        );
        // The missing headers and the 50-sample claim on a 100-sample body.
        assert_eq!(r.bad_requests, 2);
        assert_eq!((r.sessions, r.sessions_complete, r.samples), (1, 1, 100));
        assert!(r.latency.is_none(), "untimed");
        assert_eq!(state.tick(), (4, None));
    }
}
