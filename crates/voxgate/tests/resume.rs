//! Resumable sessions: the client's socket is killed at random points while it streams the long
//! Chromium capture; it reconnects with its resume token, resends from its last `Ack`, and the
//! webhook receives exactly the samples of the uninterrupted stream: no gap, no repeat.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use voxgate::config::WebhookConfig;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Reads events in the background, remembering the last acknowledged byte and every event.
fn reader(
    ws: Ws,
    acked: Arc<AtomicU64>,
    events: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) -> (
    futures_util::stream::SplitSink<Ws, Message>,
    tokio::task::JoinHandle<Option<u16>>,
) {
    let (tx, mut rx) = ws.split();
    let task = tokio::spawn(async move {
        while let Some(Ok(msg)) = rx.next().await {
            match msg {
                Message::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "Ack" {
                        acked.store(v["bytes"].as_u64().unwrap(), Ordering::SeqCst);
                    } else {
                        events.lock().unwrap().push(v);
                    }
                }
                Message::Close(f) => return f.map(|f| u16::from(f.code)),
                _ => {}
            }
        }
        None
    });
    (tx, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sockets_resume_with_no_gap_and_no_repeat() {
    let rx = Receiver::start(Mode::Ok).await;
    let mut cfg = test_config();
    cfg.server.resume_grace_seconds = 5.0;
    cfg.webhooks
        .push(WebhookConfig::new("all", &rx.url("all"), Some(0.0)));
    let gw = Gateway::start(cfg).await;

    let data = std::fs::read(corpus("captures/chromium_long_250ms.webm")).unwrap();
    let messages = capture_messages("chromium_long_250ms.webm");
    // Kill points (message indexes), spread over the stream; a seeded generator keeps it stable.
    let mut x = 0x9E37_79B9u32;
    let mut kills: Vec<usize> = (0..6)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            1 + (x as usize % (messages.len() - 2))
        })
        .collect();
    kills.sort_unstable();
    kills.dedup();

    let acked = Arc::new(AtomicU64::new(0));
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (ws, _) = tokio_tungstenite::connect_async(gw.ws("/v1/listen?resumable=true"))
        .await
        .unwrap();
    let (mut tx, mut task) = reader(ws, acked.clone(), events.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let resumable = events
        .lock()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "Resumable")
        .cloned()
        .expect("a Resumable event first");
    let sid = resumable["session_id"].as_str().unwrap().to_owned();
    let token = resumable["resume_token"].as_str().unwrap().to_owned();

    // Byte offset of the next message to send.
    let mut offset = 0usize;
    let mut sent_msgs = 0usize;
    let mut resumes = 0;
    while offset < data.len() {
        if kills.first() == Some(&sent_msgs) {
            kills.remove(0);
            // Kill the socket abruptly (no Close frame), wait a moment, resume from the last Ack.
            task.abort();
            drop(tx);
            tokio::time::sleep(Duration::from_millis(50)).await;
            // Resend from a little before the last Ack (as a client whose Ack arrived late
            // would): the server must drop those bytes as exact duplicates.
            let from = acked.load(Ordering::SeqCst).saturating_sub(3000);
            let url = gw.ws(&format!(
                "/v1/listen?resume={sid}&resume_token={token}&resume_from={from}"
            ));
            let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            (tx, task) = reader(ws, acked.clone(), events.clone());
            offset = from as usize;
            resumes += 1;
        }
        // Resend in the capture's own message boundaries from `offset` (the first piece may be
        // the tail of a message).
        let end = messages
            .iter()
            .scan(0usize, |pos, m| {
                *pos += m.len();
                Some(*pos)
            })
            .find(|&end| end > offset)
            .unwrap();
        tx.send(Message::Binary(data[offset..end].to_vec().into()))
            .await
            .unwrap();
        offset = end;
        sent_msgs += 1;
        if sent_msgs.is_multiple_of(25) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    tx.send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
        .await
        .unwrap();
    let code = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, Some(1000));
    assert!(resumes >= 4, "resumed {resumes} times");
    let events = events.lock().unwrap().clone();
    let closed = events.iter().find(|e| e["type"] == "Closed").unwrap();
    assert_eq!(closed["summary"]["decode_errors"], 0, "{closed}");
    assert_eq!(
        closed["summary"]["bytes_in"].as_u64().unwrap() as usize,
        data.len()
    );
    let resumed = events.iter().filter(|e| e["type"] == "Resumed").count();
    assert_eq!(resumed, resumes);

    // Exactly the uninterrupted stream: 151.80 s, contiguous, each sample once.
    let reqs = rx.requests("all");
    let mut next = 0;
    for r in &reqs {
        assert_eq!(r.start, next, "no gap and no repeat");
        next += r.samples;
    }
    assert_eq!(next, closed["summary"]["samples_decoded"].as_u64().unwrap());
    assert_eq!(next, 2_428_800, "151.8 s, as uninterrupted");
    let m = gw.metrics().await;
    let dups = metric_value(&m, "voxgate_resume_duplicate_bytes_total", "");
    assert!(
        dups >= 3000.0 * resumes as f64,
        "duplicates dropped: {dups}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_late_resumes_are_refused() {
    let mut cfg = test_config();
    cfg.server.resume_grace_seconds = 0.3;
    let gw = Gateway::start(cfg).await;
    let run = stream(
        &gw.ws("/v1/listen?resume=nope&resume_token=x"),
        vec![],
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1008));
    assert_eq!(run.of_type("Error")[0]["code"], "resume_failed");
    // A dropped client that does not come back within the grace: the session closes normally.
    let (ws, _) = tokio_tungstenite::connect_async(
        gw.ws("/v1/listen?resumable=true&encoding=linear16&sample_rate=16000&session_id=gone"),
    )
    .await
    .unwrap();
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::Binary(vec![0u8; 3200].into()))
        .await
        .unwrap();
    let first = rx.next().await.unwrap().unwrap();
    let token = serde_json::from_str::<serde_json::Value>(first.to_text().unwrap()).unwrap()
        ["resume_token"]
        .as_str()
        .unwrap()
        .to_owned();
    drop((tx, rx));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let run = stream(
        &gw.ws(&format!("/v1/listen?resume=gone&resume_token={token}")),
        vec![],
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1008), "the grace period is over");
}

/// `voxgate stream --resumable` end to end (the happy path; the drop path is the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_cli_opens_a_resumable_session() {
    let gw = Gateway::start(test_config()).await;
    let url = gw.ws("/v1/listen");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_voxgate"))
        .args(["stream", &url])
        .arg(corpus("captures/chromium_short_250ms.webm"))
        .arg("--index")
        .arg(corpus("captures/chromium_short_250ms.index.json"))
        .args(["--speed", "0", "--resumable"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"Resumable\""), "{stdout}");
    assert!(!stdout.contains("\"Ack\""), "acks are not printed");
    let closed: serde_json::Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["type"] == "Closed")
        .unwrap();
    assert_eq!(closed["summary"]["bytes_in"], 76_507);
}

/// A drained instance hands a resumable session to another: the client resends its stream from
/// the start to the second instance, which discards what was delivered and continues media time
/// and webhook sequence numbers. The webhook sees one uninterrupted stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_session_continues_on_another_instance() {
    let rx = Receiver::start(Mode::Ok).await;
    let config = || {
        let mut cfg = test_config();
        cfg.server.resume_secret = Some("shared-deployment-secret".into());
        cfg.webhooks
            .push(WebhookConfig::new("all", &rx.url("all"), Some(1.0)));
        cfg
    };
    let a = Gateway::start(config()).await;
    let b = Gateway::start(config()).await;
    let messages = capture_messages("chromium_long_250ms.webm");

    // First half to instance A, then A drains.
    let (ws, _) = tokio_tungstenite::connect_async(a.ws("/v1/listen?resumable=true"))
        .await
        .unwrap();
    let (mut tx, mut events) = ws.split();
    for m in &messages[..250] {
        tx.send(Message::Binary(m.clone().into())).await.unwrap();
    }
    // Wait until A has taken all of it (the last Ack), then drain A.
    let sent: u64 = messages[..250].iter().map(|m| m.len() as u64).sum();
    loop {
        let m = events.next().await.unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
        if v["type"] == "Ack" && v["bytes"] == sent {
            break;
        }
    }
    a.shutdown.cancel();
    let mut state = None;
    let mut saw_reconnect = false;
    while let Some(Ok(m)) = events.next().await {
        if let Message::Text(t) = m {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            saw_reconnect |= v["type"] == "Reconnect";
            if v["type"] == "Closed" {
                assert_eq!(v["code"], 1001);
                state = Some(
                    v["resume_state"]
                        .as_str()
                        .expect("a resume_state")
                        .to_owned(),
                );
                break;
            }
        }
    }
    assert!(saw_reconnect);
    let state = state.unwrap();
    drop((tx, events));

    // Everything, from the start, to instance B.
    let run = stream(
        &b.ws(&format!("/v1/listen?resumable=true&resume_state={state}")),
        messages,
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1000), "{:?}", run.close_reason);
    let closed = run.closed();
    assert_eq!(closed["summary"]["decode_errors"], 0);
    assert_eq!(
        closed["summary"]["samples_decoded"], 2_428_800,
        "media time continued"
    );

    let reqs = rx.requests("all");
    let mut next = 0;
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(
            r.seq, i as u64,
            "sequence numbers continue across instances"
        );
        assert_eq!(r.start, next, "no gap and no repeat");
        next += r.samples;
    }
    assert_eq!(next, 2_428_800, "exactly the uninterrupted stream");
    assert_eq!(
        reqs.iter()
            .map(|r| &r.session_id)
            .collect::<std::collections::HashSet<_>>()
            .len(),
        1
    );

    // A forged or foreign state is refused.
    let run = stream(
        &b.ws("/v1/listen?resume_state=e30.deadbeef"),
        vec![],
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1008));
    assert_eq!(run.of_type("Error")[0]["code"], "resume_failed");
}

/// The live-microphone variant: after a drain the client starts a fresh recorder on the other
/// instance (`fresh_recorder=true`), so nothing is discarded and numbering carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_recorder_continues_a_drained_session() {
    let rx = Receiver::start(Mode::Ok).await;
    let config = || {
        let mut cfg = test_config();
        cfg.server.resume_secret = Some("shared-deployment-secret".into());
        cfg.webhooks
            .push(WebhookConfig::new("all", &rx.url("all"), Some(0.0)));
        cfg
    };
    let a = Gateway::start(config()).await;
    let b = Gateway::start(config()).await;
    let pcm = pcm_messages("medium", Some(15.0));
    let q = "encoding=linear16&sample_rate=16000&resumable=true";
    let (ws, _) = tokio_tungstenite::connect_async(a.ws(&format!("/v1/listen?{q}")))
        .await
        .unwrap();
    let (mut tx, mut events) = ws.split();
    for m in &pcm[..100] {
        tx.send(Message::Binary(m.clone().into())).await.unwrap();
    }
    loop {
        let m = events.next().await.unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
        if v["type"] == "Ack" && v["samples"] == 160_000 {
            break;
        }
    }
    a.shutdown.cancel();
    let mut state = None;
    while let Some(Ok(m)) = events.next().await {
        if let Message::Text(t) = m {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "Closed" {
                state = v["resume_state"].as_str().map(str::to_owned);
                break;
            }
        }
    }
    let url = b.ws(&format!(
        "/v1/listen?{q}&fresh_recorder=true&resume_state={}",
        state.expect("resume_state")
    ));
    let run = stream(&url, pcm[100..].to_vec(), Duration::ZERO).await;
    assert_eq!(run.closed()["summary"]["samples_decoded"], 240_000);
    let reqs = rx.requests("all");
    let mut next = 0;
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!((r.seq, r.start), (i as u64, next), "continuous numbering");
        next += r.samples;
    }
    assert_eq!(next, 240_000);
}
