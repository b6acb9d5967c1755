//! Hostile clients on every frontend (issue 15): gap-fill amplification (device Opus sequence
//! numbers, Twilio timestamps, Omi capture times) bounded by the session's budget, Omi JSON
//! frames capped and queued under a byte cap, and Twilio's phase before `start` admitted like
//! any session (rate, permit, token, deadline, flood guard).

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use voxgate::cli::device;

/// What a raw client saw: events (text), the close, and how long the connection lasted.
#[derive(Debug, Default)]
struct Seen {
    events: Vec<serde_json::Value>,
    close_code: Option<u16>,
    close_reason: String,
    elapsed: Duration,
}

impl Seen {
    fn codes(&self, ty: &str) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["type"] == ty)
            .map(|e| e["code"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
    fn summary(&self) -> &serde_json::Value {
        let closed = self.events.iter().rfind(|e| e["type"] == "Closed");
        &closed.unwrap_or_else(|| panic!("no Closed in {:?}", self.events))["summary"]
    }
    /// One line of what a session synthesized (shown with `--nocapture`).
    fn report(&self, what: &str) {
        let s = self.summary();
        eprintln!(
            "{what}: {} messages in {:?}: decoded {} samples, filled {}, not filled {}",
            s["messages_in"],
            self.elapsed,
            s["samples_decoded"],
            s["gap_samples"],
            s["gap_dropped_samples"]
        );
    }

    fn summary_u64(&self, key: &str) -> u64 {
        let v = &self.summary()[key];
        v.as_u64()
            .unwrap_or_else(|| panic!("summary has no {key}: {v}"))
    }
}

/// Sends `msgs` (pacing `gap`), then reads until the server closes (at most `wait`).
async fn run(url: &str, msgs: Vec<Message>, gap: Duration, wait: Duration) -> Seen {
    let t0 = Instant::now();
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    let reader = tokio::spawn(async move {
        let mut seen = Seen::default();
        let read = async {
            while let Some(Ok(msg)) = rx.next().await {
                match msg {
                    Message::Text(t) => seen.events.push(serde_json::from_str(&t).unwrap()),
                    Message::Close(f) => {
                        if let Some(f) = f {
                            seen.close_code = Some(u16::from(f.code));
                            seen.close_reason = f.reason.to_string();
                        }
                        break;
                    }
                    _ => {}
                }
            }
        };
        let _ = tokio::time::timeout(wait, read).await;
        seen.elapsed = t0.elapsed();
        seen
    });
    for m in msgs {
        if tx.send(m).await.is_err() {
            break;
        }
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
    }
    let seen = reader.await.unwrap();
    drop(tx);
    seen
}

/// Synthesized samples a session of this wall-clock age may hold (the default 2 s slack).
fn budget(elapsed: Duration) -> u64 {
    (elapsed.as_secs_f64() * 16_000.0) as u64 + 32_000
}

fn bin(v: Vec<u8>) -> Message {
    Message::Binary(v.into())
}

fn text(s: impl Into<String>) -> Message {
    Message::Text(s.into().into())
}

fn twilio_start(sid: &str, custom: serde_json::Value) -> Message {
    text(
        serde_json::json!({"event": "start", "streamSid": sid, "start": {
            "streamSid": sid, "callSid": "CA0", "customParameters": custom,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})
        .to_string(),
    )
}

fn twilio_media(ts: u64, payload: &[u8]) -> Message {
    let b64 = base64::engine::general_purpose::STANDARD.encode(payload);
    text(
        serde_json::json!({"event": "media", "media": {"track": "inbound",
            "timestamp": ts.to_string(), "payload": b64}})
        .to_string(),
    )
}

fn omi_frame(op: u32, payload: &[u8]) -> Message {
    let mut f = op.to_le_bytes().to_vec();
    f.extend_from_slice(payload);
    bin(f)
}

fn omi_audio(ts: f64, pcm_bytes: usize) -> Message {
    let mut p = ts.to_le_bytes().to_vec();
    p.resize(8 + pcm_bytes, 0);
    omi_frame(101, &p)
}

const WAIT: Duration = Duration::from_secs(30);
const STOP: &str = r#"{"event":"stop","stop":{}}"#;

/// The review's amplification attacks, one session each, as fast as the client can send: the
/// audio synthesized stays within wall-clock age + 2 s, the client is warned once, and
/// `voxgate_gap_samples_total` counts the samples actually inserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_fill_amplification_is_bounded_by_the_session_budget() {
    let gw = Gateway::start(test_config()).await;
    let before = gw.metric("voxgate_gap_samples_total", "").await;

    // Device Opus, 120 ms frames: 60 seven-byte silence packets, sequence +51 each (old: 361 s).
    let mut msgs = Vec::new();
    for i in 0..60u32 {
        let mut p = (1 + i * 51).to_be_bytes().to_vec();
        p.extend_from_slice(&[0xF8, 0xFF, 0xFE]);
        msgs.push(bin(p));
    }
    msgs.push(text(r#"{"type":"CloseStream"}"#));
    let url = "/v1/listen?encoding=opus&sample_rate=16000&seq=1&frame_ms=120";
    let device = run(&gw.ws(url), msgs, Duration::ZERO, WAIT).await;
    assert_eq!(device.close_code, Some(1000), "{}", device.close_reason);
    device.report("device opus seq +51");
    let filled = device.summary_u64("gap_samples");
    assert!(
        filled <= budget(device.elapsed),
        "{filled} in {:?}",
        device.elapsed
    );
    assert!(device.summary_u64("gap_dropped_samples") > 0);
    assert!(device.summary_u64("samples_decoded") <= filled + 60 * 1920);
    let warned = device.codes("Warning");
    assert_eq!(
        warned.iter().filter(|c| *c == "gap_fill_budget").count(),
        1,
        "{warned:?}"
    );

    // Twilio: 100 media events of 3 bytes, timestamp +10 s each (old: 1,000 s), then u64::MAX.
    let mut msgs = vec![twilio_start("MZamp", serde_json::json!({}))];
    for i in 1..=100u64 {
        msgs.push(twilio_media(i * 10_000, &[0xFF; 3]));
    }
    msgs.push(twilio_media(u64::MAX, &[0xFF; 3]));
    msgs.push(text(STOP));
    let twilio = run(&gw.ws("/v1/twilio"), msgs, Duration::ZERO, WAIT).await;
    assert_eq!(twilio.close_code, Some(1000), "{}", twilio.close_reason);
    twilio.report("twilio +10 s");
    let t_filled = twilio.summary_u64("gap_samples");
    assert!(
        t_filled <= budget(twilio.elapsed),
        "{t_filled} in {:?}",
        twilio.elapsed
    );
    assert!(twilio.summary_u64("gap_dropped_samples") > 0);
    let warned = twilio.codes("Warning");
    assert_eq!(warned.iter().filter(|c| *c == "gap_fill_budget").count(), 1);
    assert!(
        warned.contains(&"timestamp_jump".to_owned()),
        "u64::MAX is a jump, not a gap"
    );
    assert!(twilio.summary_u64("samples_decoded") <= t_filled + 101 * 3 * 2);

    // Omi: 16-byte audio frames, capture time +9 s (filled) then +11 s (a jump) each.
    let omi_before = gw.metric("voxgate_gap_samples_total", "").await;
    let mut msgs = Vec::new();
    let mut ts = 1_700_000_000.0;
    for i in 0..50 {
        ts += if i < 25 { 9.0 } else { 11.0 };
        msgs.push(omi_audio(ts, 8));
    }
    let omi = run(
        &gw.ws("/v1/trigger/listen?uid=u&sample_rate=16000"),
        msgs,
        Duration::ZERO,
        Duration::from_millis(300),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = gw.metric("voxgate_gap_samples_total", "").await;
    let o_filled = (after - omi_before) as u64;
    assert!(
        o_filled <= budget(omi.elapsed),
        "{o_filled} in {:?}",
        omi.elapsed
    );
    assert_eq!(
        (omi_before - before) as u64,
        filled + t_filled,
        "the metric counts the samples inserted, not those asked for"
    );
    assert!(gw.metric("voxgate_gap_dropped_samples_total", "").await > 0.0);
}

/// The budget is for synthesized audio only: a contiguous Twilio stream at 5x real time, and
/// device Opus sent unpaced with a few lost packets, decode completely.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_faster_than_real_time_is_not_budgeted() {
    let gw = Gateway::start(test_config()).await;
    let mulaw = vec![0xFFu8; 8000 * 20]; // 20 s, 1,000 media events of 20 ms
    let msgs: Vec<Message> = device::twilio_messages(&mulaw, "MZfast", &[])
        .into_iter()
        .map(text)
        .collect();
    let fast = run(&gw.ws("/v1/twilio"), msgs, Duration::from_millis(4), WAIT).await;
    assert_eq!(fast.close_code, Some(1000), "{}", fast.close_reason);
    assert!(
        fast.elapsed < Duration::from_secs(15),
        "sent faster than real time"
    );
    assert_eq!(fast.summary_u64("samples_decoded"), 20 * 16_000);
    assert_eq!(fast.summary_u64("gap_dropped_samples"), 0);

    let (rate, samples) = device::read_wav(&corpus("source/short.wav")).unwrap();
    let mut packets = device::opus_packets(rate, &samples, 20, true).unwrap();
    let n = packets.len() as u64;
    packets.drain(100..103);
    let msgs = packets
        .into_iter()
        .map(bin)
        .chain([text(r#"{"type":"CloseStream"}"#)]);
    let url = "/v1/listen?encoding=opus&sample_rate=16000&frame_ms=20&seq=1";
    let device = run(&gw.ws(url), msgs.collect(), Duration::ZERO, WAIT).await;
    assert_eq!(device.summary_u64("samples_decoded"), n * 320);
    assert_eq!(device.summary_u64("gap_samples"), 3 * 320);
    assert_eq!(device.summary_u64("gap_dropped_samples"), 0);
}

/// Omi JSON: a 1 MB `102` frame is refused with 1009; frames under the cap against a webhook
/// that never answers are dropped past the queue's byte cap (counted), not held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn omi_json_is_capped_and_its_webhook_queue_bounded_by_bytes() {
    let hook = Receiver::start(Mode::Hang).await;
    let mut cfg = test_config();
    cfg.server.close_flush_seconds = 1.0;
    // The subject is the queue's byte cap: read the 6 MB at once instead of pacing it at the
    // default 1 MiB/s.
    cfg.server.max_bytes_per_second = 64.0 * 1024.0 * 1024.0;
    cfg.omi.transcript_webhook = Some(hook.url("t"));
    let gw = Gateway::start(cfg).await;
    let url = gw.ws("/v1/trigger/listen?uid=u&sample_rate=16000");

    let big = format!(r#"{{"segments":[{{"text":"{}"}}]}}"#, "x".repeat(1_000_000));
    let seen = run(
        &url,
        vec![omi_frame(102, big.as_bytes())],
        Duration::ZERO,
        WAIT,
    )
    .await;
    assert_eq!(seen.close_code, Some(1009), "{}", seen.close_reason);
    assert!(
        seen.close_reason.contains("omi.max_json_bytes"),
        "{}",
        seen.close_reason
    );

    // 100 frames of 60 KB (6 MB) against a 2 MiB queue cap.
    let doc = format!(r#"{{"segments":[{{"text":"{}"}}]}}"#, "y".repeat(60_000));
    let msgs = (0..100).map(|_| omi_frame(102, doc.as_bytes())).collect();
    let seen = run(&url, msgs, Duration::ZERO, Duration::from_millis(500)).await;
    assert_eq!(seen.close_code, None, "frames under the cap are accepted");
    let held = gw
        .metric("voxgate_buffered_bytes", "consumer=\"json_webhook\"")
        .await;
    assert!(held <= (2 << 20) as f64, "held {held}");
    let dropped = gw
        .metric("voxgate_dropped_bytes_total", "reason=\"buffer_full\"")
        .await;
    assert!(
        dropped >= 6_000_000.0 - (2 << 20) as f64,
        "dropped {dropped}"
    );
}

fn auth_config() -> voxgate::config::Config {
    let mut cfg = test_config();
    cfg.auth.mode = voxgate::auth::AuthMode::Jwt;
    cfg.auth.hs256_secret = Some("0123456789abcdef-test-secret".into());
    cfg
}

fn jwt(sub: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({"sub": sub, "exp": now + 600, "aud": "voxgate"});
    let key = jsonwebtoken::EncodingKey::from_secret(b"0123456789abcdef-test-secret");
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
}

/// Twilio before `start`: messages do not extend the deadline, and a flood is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_waits_for_start_by_a_deadline_and_a_message_cap() {
    let mut cfg = auth_config();
    cfg.twilio.start_timeout_seconds = 1.0;
    let gw = Gateway::start(cfg).await;
    let connected = r#"{"event":"connected","protocol":"Call"}"#;
    let msgs = (0..20).map(|_| text(connected)).collect();
    let seen = run(&gw.ws("/v1/twilio"), msgs, Duration::from_millis(200), WAIT).await;
    assert_eq!(seen.close_code, Some(1008), "{seen:?}");
    assert_eq!(seen.codes("Error"), ["start_timeout"]);
    assert!(seen.elapsed < Duration::from_secs(3), "{:?}", seen.elapsed);

    let msgs = (0..100).map(|_| text(r#"{"event":"mystery"}"#)).collect();
    let seen = run(&gw.ws("/v1/twilio"), msgs, Duration::ZERO, WAIT).await;
    assert_eq!(seen.close_code, Some(1008), "{seen:?}");
    assert_eq!(seen.codes("Error"), ["message_flood"]);
    assert!(seen.codes("Warning").len() <= 16);
}

/// Twilio's token: from `start.customParameters.token` (or the URL), checked before the
/// session starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_takes_its_token_from_custom_parameters() {
    let gw = Gateway::start(auth_config()).await;
    let media = twilio_media(0, &[0xFF; 160]);
    let good = serde_json::json!({"token": jwt("tel")});
    let seen = run(
        &gw.ws("/v1/twilio"),
        vec![twilio_start("MZtok", good), media.clone(), text(STOP)],
        Duration::ZERO,
        WAIT,
    )
    .await;
    assert_eq!(seen.close_code, Some(1000), "{seen:?}");
    assert_eq!(seen.summary_u64("samples_decoded"), 320);

    let url = gw.ws(&format!("/v1/twilio?token={}", jwt("tel")));
    let msgs = vec![
        twilio_start("MZurl", serde_json::json!({})),
        media,
        text(STOP),
    ];
    let seen = run(&url, msgs, Duration::ZERO, WAIT).await;
    assert_eq!(seen.close_code, Some(1000), "{seen:?}");

    let bad = serde_json::json!({"token": "not.a.jwt"});
    let seen = run(
        &gw.ws("/v1/twilio"),
        vec![twilio_start("MZbad", bad)],
        Duration::ZERO,
        WAIT,
    )
    .await;
    assert_eq!(seen.close_code, Some(1008));
    assert_eq!(seen.codes("Error"), ["unauthorized"]);
}

/// A Twilio socket takes its session permit and rate-limit token at connect: sockets that
/// never send `start` cannot pile up past `max_sessions`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_is_admitted_at_connect() {
    let mut cfg = auth_config();
    cfg.server.max_sessions = 1;
    let gw = Gateway::start(cfg).await;
    let (_holder, _) = tokio_tungstenite::connect_async(gw.ws("/v1/twilio"))
        .await
        .unwrap();
    // The holder's permit is taken by its upgraded task, just after the 101 (a loaded machine
    // may run the next connect's task first).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = run(&gw.ws("/v1/twilio"), vec![], Duration::ZERO, WAIT).await;
    assert_eq!(seen.close_code, Some(1013), "{seen:?}");
    assert_eq!(seen.codes("Error"), ["over_capacity"]);

    let mut cfg = auth_config();
    cfg.auth.connections_per_ip_per_second = 1.0;
    let gw = Gateway::start(cfg).await;
    let mut refused = 0;
    let mut held = Vec::new();
    for _ in 0..5 {
        let (ws, _) = tokio_tungstenite::connect_async(gw.ws("/v1/twilio"))
            .await
            .unwrap();
        held.push(ws);
    }
    for ws in &mut held {
        if let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_millis(500), ws.next()).await
        {
            refused += usize::from(t.contains("rate_limited"));
        }
    }
    assert_eq!(refused, 3, "a burst of 2, then refused before start");
}

/// An `on_connect` answer may list at most `on_connect.max_webhooks` audio webhooks (so the
/// session memory bound holds); a longer list refuses the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_answer_with_too_many_webhooks_is_refused() {
    async fn hook() -> axum::Json<serde_json::Value> {
        let webhooks: Vec<_> = (0..9)
            .map(|i| serde_json::json!({"name": format!("w{i}"), "url": "http://192.0.2.1/", "delay_seconds": 3600}))
            .collect();
        axum::Json(serde_json::json!({"allow": true, "uid": "u", "webhooks": webhooks}))
    }
    let app = axum::Router::new().route("/connect", axum::routing::post(hook));
    let addr = common::serve(app).await;
    let mut cfg = test_config();
    cfg.on_connect = Some(voxgate::config::OnConnectConfig {
        url: format!("http://{addr}/connect"),
        timeout_ms: 2000,
        max_webhooks: 8,
    });
    let gw = Gateway::start(cfg).await;
    let url = gw.ws("/v1/listen?encoding=linear16&sample_rate=16000");
    let seen = run(&url, vec![], Duration::ZERO, WAIT).await;
    assert_eq!(seen.close_code, Some(1011), "{seen:?}");
    assert_eq!(seen.codes("Error"), ["on_connect_invalid"]);
    assert!(
        seen.close_reason.contains("on_connect.max_webhooks"),
        "{}",
        seen.close_reason
    );
}
