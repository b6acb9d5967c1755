//! The load's clients: a session slot keeps one session going from its start until the deadline,
//! a connection at a time; a connection streams the capture (one pass of a container, raw audio
//! until the deadline), sends `CloseStream` and waits for `Closed`, while its receive half times
//! `Progress` events and collects what the server said.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::sink::SessionTrack;
use super::Ctx;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type WsTx = SplitSink<Ws, Message>;
type WsRx = SplitStream<Ws>;

/// Samples per second of the audio the gateway decodes to (`Progress.seconds_decoded` scale).
const SAMPLE_RATE: f64 = 16_000.0;
/// The normal WebSocket close code; anything else fails the connection.
const CLOSE_NORMAL: u16 = 1000;
/// What a close frame without a code counts as (RFC 6455 "no status received").
const CLOSE_NO_STATUS: u16 = 1005;

/// A client-side reason a connection failed, counted in the report's `errors` by its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The upgrade was refused with this HTTP status.
    Http(u16),
    /// The connection could not be opened.
    Connect,
    ConnectTimeout,
    /// A message could not be sent (the server closed on us).
    Send,
    /// No close within `--close-timeout` of `CloseStream`.
    ClosedTimeout,
    /// A normal close before the tool finished sending.
    ClosedEarly,
    /// The socket failed while reading.
    Io,
    /// A close with a code other than 1000.
    Close(u16),
    /// The socket ended without a close frame.
    NoCloseFrame,
    /// A normal close without a `Closed` event before it.
    NoClosedEvent,
}

impl Failure {
    fn key(self) -> String {
        match self {
            Self::Http(status) => format!("http_{status}"),
            Self::Close(code) => format!("close_{code}"),
            Self::Connect => "connect".into(),
            Self::ConnectTimeout => "connect_timeout".into(),
            Self::Send => "send".into(),
            Self::ClosedTimeout => "closed_timeout".into(),
            Self::ClosedEarly => "closed_early".into(),
            Self::Io => "io".into(),
            Self::NoCloseFrame => "no_close_frame".into(),
            Self::NoClosedEvent => "no_closed_event".into(),
        }
    }
}

/// What the server said on one connection.
#[derive(Default)]
struct Heard {
    closed: bool,
    closed_samples: u64,
    closed_seconds: f64,
    delivered: u64,
    dropped: u64,
    decode_errors: u64,
    last_progress: f64,
    latencies: Vec<f32>,
    close_latency: Option<f32>,
    /// `Error` events by code.
    errors: BTreeMap<String, u64>,
}

/// How the receive half ended, and what it heard.
#[derive(Default)]
struct Received {
    io_error: bool,
    close_code: Option<u16>,
    heard: Heard,
}

/// What one connection saw.
#[derive(Default)]
struct ConnResult {
    failed: bool,
    samples_sent: u64,
    heard: Heard,
    /// Client-side failures and abnormal closes (`close_NNNN`).
    errors: BTreeMap<String, u64>,
}

impl ConnResult {
    fn fail(&mut self, why: Failure) {
        *self.errors.entry(why.key()).or_default() += 1;
        self.failed = true;
    }

    /// Judges how the connection ended and keeps what the server said.
    fn conclude(&mut self, recv: Received) {
        if recv.io_error {
            self.fail(Failure::Io);
        }
        match recv.close_code {
            Some(CLOSE_NORMAL) => {}
            Some(c) => self.fail(Failure::Close(c)),
            None if !self.failed => self.fail(Failure::NoCloseFrame),
            None => {}
        }
        if !recv.heard.closed && !self.failed {
            self.fail(Failure::NoClosedEvent);
        }
        if !recv.heard.errors.is_empty() {
            self.failed = true;
        }
        self.heard = recv.heard;
    }
}

/// What one session slot saw over all its connections.
#[derive(Default)]
pub(super) struct SlotResult {
    pub(super) failed: bool,
    pub(super) connections: u64,
    pub(super) connections_failed: u64,
    pub(super) samples_sent: u64,
    pub(super) closed_events: u64,
    pub(super) closed_samples: u64,
    pub(super) closed_seconds: f64,
    pub(super) progress_seconds: f64,
    pub(super) delivered: u64,
    pub(super) dropped: u64,
    pub(super) decode_errors: u64,
    pub(super) latencies: Vec<f32>,
    pub(super) close_latencies: Vec<f32>,
    pub(super) errors: BTreeMap<String, u64>,
}

impl SlotResult {
    fn add(&mut self, c: ConnResult) {
        self.connections += 1;
        if c.failed {
            self.connections_failed += 1;
            self.failed = true;
        }
        self.samples_sent += c.samples_sent;
        let h = c.heard;
        self.closed_events += u64::from(h.closed);
        self.closed_samples += h.closed_samples;
        self.closed_seconds += h.closed_seconds;
        self.progress_seconds += h.last_progress;
        self.delivered += h.delivered;
        self.dropped += h.dropped;
        self.decode_errors += h.decode_errors;
        self.latencies.extend(h.latencies);
        self.close_latencies.extend(h.close_latency);
        for (k, v) in c.errors.into_iter().chain(h.errors) {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

/// Runs every session slot, started evenly over `ramp` from `from`, until `deadline`.
pub(super) async fn run_slots(
    ctx: &Arc<Ctx>,
    from: Instant,
    ramp: Duration,
    deadline: Instant,
) -> Vec<SlotResult> {
    let n = ctx.args.sessions;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let at = from + ramp.mul_f64(i as f64 / n as f64);
            tokio::spawn(slot(ctx.clone(), i, at, deadline))
        })
        .collect();
    let mut slots = Vec::with_capacity(n);
    for t in tasks {
        slots.push(t.await.unwrap_or_else(|_| SlotResult {
            failed: true,
            ..SlotResult::default()
        }));
    }
    slots
}

/// Session slot `index`: from `at`, one connection after another until the deadline (one only
/// when idle).
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
                let closed = c.heard.closed.then_some(c.heard.closed_samples);
                track.lock().expect("not poisoned").end(closed);
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

/// Opens the WebSocket within 10 s.
async fn connect(url: &str) -> Result<Ws, Failure> {
    match tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tungstenite::Error::Http(r))) => Err(Failure::Http(r.status().as_u16())),
        Ok(Err(_)) => Err(Failure::Connect),
        Err(_) => Err(Failure::ConnectTimeout),
    }
}

/// What the two halves of a connection share.
#[derive(Default)]
struct Sends {
    /// (cumulative samples after the message, when it was sent), oldest first.
    sent: Mutex<VecDeque<(u64, Instant)>>,
    /// When `CloseStream` went out.
    close_sent: Mutex<Option<Instant>>,
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
    let ws = match connect(url).await {
        Ok(ws) => ws,
        Err(why) => {
            res.fail(why);
            return res;
        }
    };
    ctx.live.connected.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = ws.split();
    let sends = Sends::default();
    let sender = Sender {
        ctx,
        deadline,
        track,
        sends: &sends,
        tx,
        k: 0,
        samples: 0,
    };
    let receiver = receive(rx, &sends);
    tokio::pin!(receiver);
    let close_timeout = Duration::from_secs_f64(ctx.args.close_timeout);
    let recv = tokio::select! {
        sent = sender.run() => after_sending(&mut res, sent, receiver.as_mut(), close_timeout).await,
        r = &mut receiver => {
            // The server ended the session before we finished sending.
            if r.close_code == Some(CLOSE_NORMAL) && !r.io_error {
                res.fail(Failure::ClosedEarly);
            }
            res.failed = true;
            r
        }
    };
    ctx.live.connected.fetch_sub(1, Ordering::Relaxed);
    res.conclude(recv);
    res
}

/// The sender is done: waits up to `close_timeout` for the server's `Closed` and close frame,
/// then closes the send half too.
async fn after_sending(
    res: &mut ConnResult,
    sent: Result<(u64, WsTx), tungstenite::Error>,
    receiver: Pin<&mut impl Future<Output = Received>>,
    close_timeout: Duration,
) -> Received {
    match sent {
        Ok((samples, mut tx)) => {
            res.samples_sent = samples;
            let r = match tokio::time::timeout(close_timeout, receiver).await {
                Ok(r) => r,
                Err(_) => {
                    res.fail(Failure::ClosedTimeout);
                    Received::default()
                }
            };
            // The outcome is already known; a close that fails changes nothing in it.
            let _ = tx.close().await;
            r
        }
        Err(_) => {
            res.fail(Failure::Send);
            // The server closed on us; collect what it said.
            tokio::time::timeout(close_timeout, receiver)
                .await
                .unwrap_or_default()
        }
    }
}

/// The send half of a connection.
struct Sender<'a> {
    ctx: &'a Ctx,
    deadline: Instant,
    track: Option<&'a Arc<Mutex<SessionTrack>>>,
    sends: &'a Sends,
    tx: WsTx,
    /// Messages sent (global index: raw audio loops).
    k: u64,
    /// Samples the server will have decoded from what was sent.
    samples: u64,
}

impl Sender<'_> {
    /// Sends everything, then `CloseStream`; returns the samples sent and the send half.
    async fn run(mut self) -> Result<(u64, WsTx), tungstenite::Error> {
        let start = Instant::now();
        if self.ctx.args.idle {
            self.keep_alive(start).await?;
        } else if self.stream(start).await? {
            self.tail();
        }
        self.tx
            .send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
            .await?;
        *self.sends.close_sent.lock().expect("not poisoned") = Some(Instant::now());
        Ok((self.samples, self.tx))
    }

    /// Idle: a `KeepAlive` every 5 s until the deadline.
    async fn keep_alive(&mut self, start: Instant) -> Result<(), tungstenite::Error> {
        let mut tick = start;
        loop {
            tick += Duration::from_secs(5);
            if tick >= self.deadline {
                tokio::time::sleep_until(self.deadline).await;
                return Ok(());
            }
            tokio::time::sleep_until(tick).await;
            self.tx
                .send(Message::Text(r#"{"type":"KeepAlive"}"#.into()))
                .await?;
        }
    }

    /// Sends the capture's messages on their schedule until the deadline (or, for a container,
    /// the end of one pass); true when a whole pass went out.
    async fn stream(&mut self, start: Instant) -> Result<bool, tungstenite::Error> {
        let cap = &self.ctx.capture;
        let speed = self.ctx.args.speed;
        loop {
            if !cap.raw && self.k == cap.pass_len() {
                return Ok(true);
            }
            if speed > 0.0 {
                let at = start + Duration::from_secs_f64(cap.t_ms(self.k) / speed / 1000.0);
                if at >= self.deadline {
                    return Ok(false);
                }
                tokio::time::sleep_until(at).await;
            } else if Instant::now() >= self.deadline {
                return Ok(false);
            }
            self.send_message().await?;
        }
    }

    /// Sends message `k` and notes when, for the latencies.
    async fn send_message(&mut self) -> Result<(), tungstenite::Error> {
        let cap = &self.ctx.capture;
        let bytes = bytes::Bytes::copy_from_slice(cap.bytes(self.k));
        let len = bytes.len() as u64;
        let cum = cap.cum_after(self.k);
        // The sink's clock starts before the send: a webhook cannot beat it.
        if let (Some(t), Some(c)) = (self.track, cum) {
            t.lock().expect("not poisoned").sending(c, Instant::now());
        }
        self.tx.send(Message::Binary(bytes)).await?;
        let now = Instant::now();
        let live = &self.ctx.live;
        live.messages.fetch_add(1, Ordering::Relaxed);
        live.bytes.fetch_add(len, Ordering::Relaxed);
        if let Some(c) = cum {
            self.samples = c;
            self.sends
                .sent
                .lock()
                .expect("not poisoned")
                .push_back((c, now));
            if let Some(t) = self.track {
                t.lock().expect("not poisoned").sent_up_to(c);
            }
        }
        self.k += 1;
        Ok(())
    }

    /// After a whole pass: the decoder's tail comes out at close, so it is "sent" with
    /// `CloseStream`.
    fn tail(&mut self) {
        self.samples += self.ctx.capture.tail;
        if let Some(t) = self.track {
            let mut g = t.lock().expect("not poisoned");
            g.sending(self.samples, Instant::now());
            g.sent_up_to(self.samples);
        }
    }
}

/// The receive half: reads events until the close frame or the socket's end.
async fn receive(mut rx: WsRx, sends: &Sends) -> Received {
    let mut r = Received::default();
    while let Some(msg) = rx.next().await {
        match msg {
            Ok(Message::Text(t)) => {
                let now = Instant::now();
                if let Ok(ev) = serde_json::from_str::<serde_json::Value>(&t) {
                    r.heard.on_event(&ev, now, sends);
                }
            }
            Ok(Message::Close(frame)) => {
                r.close_code = Some(frame.map_or(CLOSE_NO_STATUS, |f| u16::from(f.code)));
                break;
            }
            Ok(_) => {}
            Err(_) => {
                r.io_error = true;
                break;
            }
        }
    }
    r
}

impl Heard {
    /// One JSON event from the server, received at `now`.
    fn on_event(&mut self, ev: &serde_json::Value, now: Instant, sends: &Sends) {
        match ev["type"].as_str() {
            Some("Progress") => self.on_progress(ev, now, sends),
            Some("Error") => {
                let code = ev["code"].as_str().unwrap_or("unknown");
                *self.errors.entry(code.to_owned()).or_default() += 1;
            }
            Some("Closed") => self.on_closed(&ev["summary"], now, sends),
            _ => {}
        }
    }

    /// The latency is from sending the first message whose samples reach the progress.
    fn on_progress(&mut self, ev: &serde_json::Value, now: Instant, sends: &Sends) {
        let secs = ev["seconds_decoded"].as_f64().unwrap_or(0.0);
        self.last_progress = secs;
        let target = (secs * SAMPLE_RATE).round() as u64;
        let mut q = sends.sent.lock().expect("not poisoned");
        while q.front().is_some_and(|&(c, _)| c < target) {
            q.pop_front();
        }
        if let Some(&(_, at)) = q.front() {
            self.latencies.push((now - at).as_secs_f32() * 1000.0);
        }
    }

    fn on_closed(&mut self, s: &serde_json::Value, now: Instant, sends: &Sends) {
        self.closed = true;
        self.closed_samples = s["samples_decoded"].as_u64().unwrap_or(0);
        self.closed_seconds = s["seconds_decoded"].as_f64().unwrap_or(0.0);
        self.decode_errors = s["decode_errors"].as_u64().unwrap_or(0);
        for c in s["consumers"].as_array().into_iter().flatten() {
            self.delivered += c["delivered_bytes"].as_u64().unwrap_or(0);
            self.dropped += c["dropped_bytes"].as_u64().unwrap_or(0);
        }
        if let Some(at) = *sends.close_sent.lock().expect("not poisoned") {
            self.close_latency = Some((now - at).as_secs_f32() * 1000.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

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
    fn events_fill_what_was_heard() {
        let t0 = Instant::now();
        let sends = Sends::default();
        sends
            .sent
            .lock()
            .unwrap()
            .extend([(16_000, t0), (32_000, t0 + Duration::from_millis(100))]);
        *sends.close_sent.lock().unwrap() = Some(t0 + Duration::from_millis(200));
        let mut h = Heard::default();
        let now = t0 + Duration::from_millis(250);
        // 1.5 s decoded: reached by the second message, sent 150 ms before.
        h.on_event(
            &json!({"type": "Progress", "seconds_decoded": 1.5}),
            now,
            &sends,
        );
        h.on_event(&json!({"type": "Error", "code": "slow"}), now, &sends);
        h.on_event(&json!({"type": "Error"}), now, &sends);
        h.on_event(
            &json!({"type": "Closed", "summary": {"samples_decoded": 32_000, "seconds_decoded": 2.0,
                "consumers": [{"delivered_bytes": 10, "dropped_bytes": 1}, {"delivered_bytes": 5}]}}),
            now,
            &sends,
        );
        assert_eq!(h.latencies, [150.0]);
        assert_eq!(h.last_progress, 1.5);
        assert_eq!(h.errors["slow"], 1);
        assert_eq!(h.errors["unknown"], 1);
        assert!(h.closed);
        assert_eq!((h.closed_samples, h.delivered, h.dropped), (32_000, 15, 1));
        assert_eq!(h.close_latency, Some(50.0));
    }

    #[test]
    fn a_connection_fails_unless_it_closes_normally_after_closed() {
        let judge = |close_code, closed, errors: &[&str]| {
            let mut res = ConnResult::default();
            let mut heard = Heard {
                closed,
                ..Heard::default()
            };
            for e in errors {
                heard.errors.insert((*e).to_owned(), 1);
            }
            res.conclude(Received {
                io_error: false,
                close_code,
                heard,
            });
            let mut codes: Vec<String> = res.errors.into_keys().collect();
            codes.extend(res.heard.errors.into_keys());
            (res.failed, codes)
        };
        assert_eq!(judge(Some(1000), true, &[]), (false, vec![]));
        assert_eq!(
            judge(Some(1011), true, &[]),
            (true, vec!["close_1011".into()])
        );
        assert_eq!(
            judge(None, true, &[]),
            (true, vec!["no_close_frame".into()])
        );
        assert_eq!(
            judge(Some(1000), false, &[]),
            (true, vec!["no_closed_event".into()])
        );
        assert_eq!(
            judge(Some(1000), true, &["slow"]),
            (true, vec!["slow".into()])
        );
    }
}
