//! The seed pusher's chaos case: audio at 20x real time into a session with no consumers leaves
//! `voxgate_buffered_bytes` at 0 throughout; a hanging webhook stays under its cap and its drops
//! are counted. One test per process: the metrics are process-global.

mod common;

use std::time::Duration;

use common::*;
use voxgate::config::WebhookConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffers_stay_bounded_with_and_without_consumers() {
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

async fn stream_owned(url: String, msgs: Vec<Vec<u8>>, gap: Duration) -> ClientRun {
    stream(&url, msgs, gap).await
}
