//! The seed pusher's chaos case: audio at 20x real time into a session with no consumers leaves
//! `voxgate_buffered_bytes` at 0 throughout; a hanging webhook stays under its cap and its drops
//! are counted. One test function per process: the metrics are process-global.

mod common;

use std::time::Duration;

use common::*;
use voxgate::config::WebhookConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffers_stay_bounded_with_and_without_consumers() {
    // 0. The seed's case on its own protocol (phases run in order: the gauges are global).
    omi_chaos_case_buffers_nothing().await;
    // 1. No consumers: nothing is buffered, ever.
    let gw = Gateway::start(test_config()).await;
    let url = gw.ws("/v1/listen?encoding=linear16&sample_rate=16000");
    let msgs = pcm_messages("medium", Some(30.0));
    let client = tokio::spawn(stream_owned(url, msgs, Duration::from_millis(5)));
    let mut samples = 0;
    while !client.is_finished() {
        let m = gw.metrics().await;
        assert_eq!(
            metric_value(&m, "voxgate_buffered_bytes", "consumer=\"webhook\""),
            0.0
        );
        assert_eq!(
            metric_value(&m, "voxgate_buffered_bytes", "consumer=\"subscriber\""),
            0.0
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let run = client.await.unwrap();
    assert!(samples >= 10, "sampled the gauge {samples} times");
    assert_eq!(run.closed()["summary"]["samples_decoded"], 480_000);

    // 2. A webhook whose endpoint hangs: held audio stays under the cap; the rest is dropped and
    //    counted, and everything is accounted for at close.
    let rx = Receiver::start(Mode::Hang).await;
    let mut cfg = test_config();
    cfg.server.close_flush_seconds = 1.0;
    let mut w = WebhookConfig::new("hang", &rx.url("hang"), Some(1.0));
    w.max_buffer_seconds = 2.0;
    w.timeout_ms = 60_000;
    cfg.webhooks.push(w);
    let gw = Gateway::start(cfg).await;
    let url = gw.ws("/v1/listen?encoding=linear16&sample_rate=16000");
    let msgs = pcm_messages("medium", Some(30.0));
    let client = tokio::spawn(stream_owned(url, msgs, Duration::from_millis(5)));
    let cap = 2.0 * 32_000.0;
    let mut peak: f64 = 0.0;
    while !client.is_finished() {
        let held = gw
            .metric("voxgate_buffered_bytes", "consumer=\"webhook\"")
            .await;
        assert!(held <= cap, "held {held} > cap {cap}");
        peak = peak.max(held);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let run = client.await.unwrap();
    assert!(peak > 0.0, "the webhook did hold audio");
    let c = &run.closed()["summary"]["consumers"][0];
    let delivered = c["delivered_bytes"].as_u64().unwrap();
    let dropped = c["dropped_bytes"].as_u64().unwrap();
    assert_eq!(delivered, 0);
    assert_eq!(
        dropped, 960_000,
        "every byte is delivered or counted as dropped"
    );
    assert!(run
        .of_type("Warning")
        .iter()
        .any(|w| w["code"] == "consumer_dropping"));
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(&m, "voxgate_buffered_bytes", "consumer=\"webhook\""),
        0.0
    );
    assert!(metric_value(&m, "voxgate_dropped_bytes_total", "consumer=\"webhook\"") >= 960_000.0);
}

/// The seed's own chaos case on its own protocol: 16,000-byte `101` frames for a user with no
/// audio app and no webhook. Nothing is buffered; all the audio is counted as decoded.
async fn omi_chaos_case_buffers_nothing() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let gw = Gateway::start(test_config()).await;
    let before = gw
        .metric("voxgate_audio_seconds_total", "format=\"linear16\"")
        .await;
    let (ws, _) =
        tokio_tungstenite::connect_async(gw.ws("/v1/trigger/listen?uid=nobody&sample_rate=8000"))
            .await
            .unwrap();
    let (mut tx, _rx) = futures_util::StreamExt::split(ws);
    let pcm = vec![0x11u8; 16_000];
    for i in 0..600u32 {
        let mut f = 101u32.to_le_bytes().to_vec();
        f.extend_from_slice(&(f64::from(i)).to_le_bytes());
        f.extend_from_slice(&pcm);
        tx.send(Message::Binary(f.into())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        if i % 10 == 0 {
            let m = gw.metrics().await;
            assert_eq!(
                metric_value(&m, "voxgate_buffered_bytes", ""),
                0.0,
                "frame {i}"
            );
        }
    }
    tx.send(Message::Close(None)).await.unwrap();
    // 600 frames of 8,000 samples at 8 kHz: 600 s of audio, all counted.
    let mut after = 0.0;
    for _ in 0..50 {
        after = gw
            .metric("voxgate_audio_seconds_total", "format=\"linear16\"")
            .await;
        if after - before >= 600.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!((after - before - 600.0).abs() < 0.01, "{after} - {before}");
}

async fn stream_owned(url: String, msgs: Vec<Vec<u8>>, gap: Duration) -> ClientRun {
    stream(&url, msgs, gap).await
}
