//! `/v1/listen` end to end: real captures, bad input, limits, subscribers and shutdown.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use voxgate::config::WebhookConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_chromium_capture_decodes_fully_with_limit_finalizations() {
    let rx = Receiver::start(Mode::Ok).await;
    let mut cfg = test_config();
    cfg.segmenter.max_utterance_seconds = 60.0;
    // Long enough hangover that the speech runs into the limit rather than pausing out.
    cfg.segmenter.silence_ms = 4000;
    cfg.webhooks
        .push(WebhookConfig::new("all", &rx.url("all"), Some(0.0)));
    let gw = Gateway::start(cfg).await;
    let msgs = capture_messages("chromium_long_250ms.webm");
    let run = stream(&gw.ws("/v1/listen"), msgs, Duration::ZERO).await;
    assert_eq!(run.close_code, Some(1000), "{:?}", run.close_reason);
    let summary = &run.closed()["summary"];
    let seconds = summary["seconds_decoded"].as_f64().unwrap();
    assert!((seconds - 151.80).abs() < 0.05, "decoded {seconds} s");
    assert_eq!(summary["decode_errors"], 0);
    assert_eq!(summary["resyncs"], 0);
    assert!(run
        .of_type("Warning")
        .iter()
        .all(|w| w["code"] == "utterance_limit_reached"));

    let ends = run.of_type("UtteranceEnd");
    let limits: Vec<_> = ends.iter().filter(|e| e["reason"] == "limit").collect();
    assert!(
        !limits.is_empty(),
        "expected a limit finalization: {ends:?}"
    );
    assert_eq!(
        run.of_type("Warning").len(),
        limits.len(),
        "one utterance_limit_reached warning per limit finalization"
    );
    for l in &limits {
        let len = l["end"].as_f64().unwrap() - l["start"].as_f64().unwrap();
        assert!((len - 60.0).abs() < 1e-6, "limit utterance lasts {len}");
        // The next utterance starts on the very sample where the limited one ended.
        let next = ends
            .iter()
            .find(|e| e["utterance"].as_u64() == Some(l["utterance"].as_u64().unwrap() + 1))
            .expect("an utterance follows a limit");
        assert_eq!(next["start"], l["end"], "no gap after a limit");
    }
    // Nothing lost: the webhook got every decoded sample.
    let total: u64 = rx.requests("all").iter().map(|r| r.samples).sum();
    assert_eq!(total, summary["samples_decoded"].as_u64().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firefox_ogg_with_empty_messages_decodes() {
    let gw = Gateway::start(test_config()).await;
    let msgs = capture_messages("firefox_medium_250ms_ogg.ogg");
    assert!(
        msgs.iter().any(Vec::is_empty),
        "the capture has empty messages"
    );
    let run = stream(&gw.ws("/v1/listen"), msgs, Duration::ZERO).await;
    assert_eq!(run.close_code, Some(1000));
    assert_eq!(run.of_type("Started")[0]["format"], "ogg");
    let seconds = run.closed()["summary"]["seconds_decoded"].as_f64().unwrap();
    assert!((seconds - 31.61).abs() < 0.05, "decoded {seconds}");
    assert!(!run.of_type("SpeechStarted").is_empty());
    assert!(!run.of_type("Progress").is_empty());
}

async fn expect_refused(gw: &Gateway, query: &str, messages: Vec<Vec<u8>>) -> ClientRun {
    stream(&gw.ws(query), messages, Duration::ZERO).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_an_error_and_the_server_keeps_serving() {
    let mut cfg = test_config();
    cfg.server.max_message_bytes = 64 * 1024;
    cfg.server.idle_timeout_seconds = 0.5;
    let gw = Gateway::start(cfg).await;

    // Random bytes: unsupported, named.
    let mut noise = vec![0u8; 4096];
    let mut x = 0x2545_f491_u32;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let run = expect_refused(&gw, "/v1/listen", vec![noise]).await;
    assert_eq!(run.close_code, Some(1003));
    assert_eq!(run.of_type("Error")[0]["code"], "unsupported_format");

    // MP4 (Safari-style MediaRecorder): unsupported, and the error says MP4.
    let mut mp4 = vec![0, 0, 0, 0x20];
    mp4.extend_from_slice(b"ftypisom\0\0\x02\0isomiso2mp41");
    mp4.resize(641, 0);
    let run = expect_refused(&gw, "/v1/listen", vec![mp4]).await;
    assert_eq!(run.close_code, Some(1003), "{run:?}");
    let msg = run.of_type("Error")[0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(msg.contains("MP4"), "{msg}");

    // Oversized message: 1009 with a reason.
    let run = expect_refused(
        &gw,
        "/v1/listen?encoding=linear16&sample_rate=16000",
        vec![vec![0u8; 100 * 1024]],
    )
    .await;
    // The transport refuses the frame before buffering it; the client is told why. (After the
    // refusal the socket's read side is dead, so the close frame itself may not get through.)
    let err = run.of_type("Error");
    assert_eq!(err[0]["code"], "message_too_large", "{run:?}");
    assert!(err[0]["message"]
        .as_str()
        .unwrap()
        .contains("max_message_bytes"));
    assert!(run.close_code.is_none_or(|c| c == 1009));

    // Unknown encoding: refused with 1003.
    let run = expect_refused(&gw, "/v1/listen?encoding=mp3", vec![]).await;
    assert_eq!(run.close_code, Some(1003));
    assert_eq!(run.of_type("Error")[0]["code"], "unsupported_encoding");

    // Unknown control message: an Error event, and the session goes on.
    let (ws, _) =
        tokio_tungstenite::connect_async(gw.ws("/v1/listen?encoding=linear16&sample_rate=16000"))
            .await
            .unwrap();
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::Text(r#"{"type":"Dance"}"#.into()))
        .await
        .unwrap();
    tx.send(Message::Binary(vec![0u8; 3200].into()))
        .await
        .unwrap();
    tx.send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
        .await
        .unwrap();
    let mut events = Vec::new();
    let mut code = None;
    while let Some(Ok(m)) = rx.next().await {
        match m {
            Message::Text(t) => events.push(serde_json::from_str::<serde_json::Value>(&t).unwrap()),
            Message::Close(f) => {
                code = f.map(|f| u16::from(f.code));
                break;
            }
            _ => {}
        }
    }
    assert_eq!(code, Some(1000));
    assert!(events
        .iter()
        .any(|e| e["type"] == "Error" && e["code"] == "bad_control_message"));
    let closed = events.iter().find(|e| e["type"] == "Closed").unwrap();
    assert_eq!(closed["summary"]["samples_decoded"], 1600);

    // No audio until the idle timeout: Error idle_timeout, close 1008.
    let (ws, _) = tokio_tungstenite::connect_async(gw.ws("/v1/listen"))
        .await
        .unwrap();
    let (_tx, mut rx) = ws.split();
    let mut saw_idle = false;
    let mut code = None;
    while let Some(Ok(m)) = rx.next().await {
        match m {
            Message::Text(t) => saw_idle |= t.contains("idle_timeout"),
            Message::Close(f) => {
                code = f.map(|f| u16::from(f.code));
                break;
            }
            _ => {}
        }
    }
    assert!(saw_idle);
    assert_eq!(code, Some(1008));

    // And a good session still works.
    let run = stream(
        &gw.ws("/v1/listen"),
        capture_messages("chromium_short_250ms.webm"),
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1000));
    assert_eq!(run.closed()["summary"]["decode_errors"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_is_capped_with_1013() {
    let mut cfg = test_config();
    cfg.server.max_sessions = 1;
    let gw = Gateway::start(cfg).await;
    let (first, _) = tokio_tungstenite::connect_async(gw.ws("/v1/listen"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let run = stream(&gw.ws("/v1/listen"), vec![], Duration::ZERO).await;
    assert_eq!(run.close_code, Some(1013));
    assert_eq!(run.of_type("Error")[0]["code"], "over_capacity");
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_gets_events_and_audio() {
    let gw = Gateway::start(test_config()).await;
    // Resumable, so that an `Ack` proves the first message was processed before subscribing.
    let url =
        gw.ws("/v1/listen?encoding=linear16&sample_rate=16000&session_id=watched&resumable=true");
    let msgs = pcm_messages("short", None);
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (mut tx, mut client_rx) = ws.split();
    tx.send(Message::Binary(msgs[0].clone().into()))
        .await
        .unwrap();
    // Wait until the session is live, then subscribe.
    loop {
        let msg = client_rx.next().await.unwrap().unwrap();
        if msg.to_text().unwrap().contains("\"Ack\"") {
            break;
        }
    }
    let (sub, _) =
        tokio_tungstenite::connect_async(gw.ws("/v1/sessions/watched/subscribe?audio=true"))
            .await
            .unwrap();
    let (_stx, mut srx) = sub.split();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for m in &msgs[1..] {
        tx.send(Message::Binary(m.clone().into())).await.unwrap();
    }
    tx.send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
        .await
        .unwrap();
    let mut audio_bytes = 0;
    let mut saw_closed = false;
    let mut code = None;
    while let Some(Ok(m)) = srx.next().await {
        match m {
            Message::Binary(b) => audio_bytes += b.len(),
            Message::Text(t) => saw_closed |= t.contains("\"Closed\""),
            Message::Close(f) => {
                code = f.map(|f| u16::from(f.code));
                break;
            }
            _ => {}
        }
    }
    assert!(saw_closed);
    assert_eq!(code, Some(1000));
    assert_eq!(
        audio_bytes,
        179_420 - 3200,
        "every message after subscribing"
    );
    // Unknown sessions are 404.
    assert!(
        tokio_tungstenite::connect_async(gw.ws("/v1/sessions/nope/subscribe"))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_sessions_and_webhooks() {
    let rx = Receiver::start(Mode::Ok).await;
    let mut cfg = test_config();
    cfg.webhooks
        .push(WebhookConfig::new("batch", &rx.url("batch"), Some(5.0)));
    let gw = Gateway::start(cfg).await;
    let (ws, _) =
        tokio_tungstenite::connect_async(gw.ws("/v1/listen?encoding=linear16&sample_rate=16000"))
            .await
            .unwrap();
    let (mut tx, mut crx) = ws.split();
    for m in pcm_messages("medium", Some(7.3)) {
        tx.send(Message::Binary(m.into())).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.shutdown.cancel();
    let mut closed = None;
    let mut code = None;
    let mut told_to_reconnect = false;
    while let Some(Ok(m)) = crx.next().await {
        match m {
            Message::Text(t) if t.contains("\"Reconnect\"") => told_to_reconnect = true,
            Message::Text(t) if t.contains("\"Closed\"") => {
                closed = Some(serde_json::from_str::<serde_json::Value>(&t).unwrap())
            }
            Message::Close(f) => {
                code = f.map(|f| u16::from(f.code));
                break;
            }
            _ => {}
        }
    }
    assert_eq!(code, Some(1001));
    assert!(
        told_to_reconnect,
        "a draining server tells clients to reconnect"
    );
    let closed = closed.expect("Closed event before the close frame");
    let total = closed["summary"]["samples_decoded"].as_u64().unwrap();
    assert_eq!(total, (7.3f64 * 16_000.0) as u64);
    let reqs = rx.requests("batch");
    assert_eq!(reqs.len(), 2, "one full 5 s batch and the partial rest");
    assert_eq!(reqs.iter().map(|r| r.samples).sum::<u64>(), total);
    tokio::time::timeout(Duration::from_secs(10), gw.task)
        .await
        .expect("server exits within the grace period")
        .unwrap()
        .unwrap();
}
