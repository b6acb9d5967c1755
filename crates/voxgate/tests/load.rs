//! The load generator and the webhook sink as libraries, against an in-process gateway: many
//! concurrent sessions, zero loss end to end (samples sent = samples the server decoded =
//! samples the sink received), no gaps, duplicates or reordering. Each test runs a few seconds.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use voxgate::cli::load::{self, LoadArgs, LoadReport};
use voxgate::cli::sink::{self, Sink, SinkConfig, SinkStats};
use voxgate::config::WebhookConfig;

const SECRET: &str = "load-test-secret";

struct Bench {
    gw: Gateway,
    sink: Arc<Sink>,
    sink_stop: CancellationToken,
}

async fn start(sink_cfg: SinkConfig, hook: impl FnOnce(&mut WebhookConfig)) -> Bench {
    let sink = Sink::new(sink_cfg);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sink_stop = CancellationToken::new();
    tokio::spawn(sink::serve(sink.clone(), listener, sink_stop.clone()));
    let mut cfg = test_config();
    let mut w = WebhookConfig::new("sink", &format!("http://{addr}/hook"), Some(0.0));
    w.secret = Some(SECRET.into());
    hook(&mut w);
    cfg.webhooks.push(w);
    Bench {
        gw: Gateway::start(cfg).await,
        sink,
        sink_stop,
    }
}

fn assert_zero_loss(r: &LoadReport, s: &SinkStats) {
    assert_eq!(r.sessions_failed, 0, "failed sessions: {:?}", r.errors);
    assert_eq!(r.sessions_held, r.sessions);
    assert!(r.errors.is_empty(), "errors: {:?}", r.errors);
    assert_eq!(
        r.closed_events, r.connections,
        "every connection got Closed"
    );
    assert!(r.samples_sent > 0);
    assert_eq!(
        r.closed_samples_decoded, r.samples_sent,
        "the server decoded every sample sent"
    );
    assert_eq!(
        s.samples, r.closed_samples_decoded,
        "the sink got every sample decoded: {s:?}"
    );
    assert_eq!(r.delivered_bytes, 2 * s.samples);
    assert_eq!(r.dropped_bytes, 0);
    assert!(s.clean(), "sink saw gaps/duplicates/bad signatures: {s:?}");
    assert_eq!(s.sessions as u64, r.connections);
    assert!(r.latency.count > 0, "Progress latencies were measured");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pcm_sessions_at_10x_lose_nothing() {
    let b = start(
        SinkConfig {
            secret: Some(SECRET.into()),
            ..SinkConfig::default()
        },
        |_| {},
    )
    .await;
    let mut args = LoadArgs::new(
        b.gw.ws("/v1/listen?encoding=linear16&sample_rate=16000"),
        corpus("reference/short.s16le-16k-mono.pcm"),
    );
    args.sessions = 20;
    args.speed = 10.0;
    args.duration = 3.0;
    args.ramp = 0.5;
    let r = load::run(&args).await.unwrap();
    let s = b.sink.stats(true);
    assert_zero_loss(&r, &s);
    // Raw audio loops on one connection per session: 3 s at 10x is ~30 media seconds each.
    assert_eq!(r.connections, 20);
    assert!(r.seconds_sent > 20.0 * 25.0, "{}", r.seconds_sent);
    assert!(r.buffered_peak_bytes.is_some(), "metrics were scraped");
    assert_eq!(
        r.samples_sent * 2,
        r.bytes_sent,
        "PCM16 mono: 2 bytes per sample"
    );
    b.sink_stop.cancel();
    b.gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webm_sessions_reconnect_per_pass_and_lose_nothing() {
    let b = start(
        SinkConfig {
            secret: Some(SECRET.into()),
            ..SinkConfig::default()
        },
        |_| {},
    )
    .await;
    let mut args = LoadArgs::new(
        b.gw.ws("/v1/listen"),
        corpus("captures/chromium_short_250ms.webm"),
    );
    args.index = Some(corpus("captures/chromium_short_250ms.index.json"));
    args.sessions = 5;
    args.speed = 4.0;
    args.duration = 4.0;
    let r = load::run(&args).await.unwrap();
    let s = b.sink.stats(false);
    assert_zero_loss(&r, &s);
    // The capture is ~7 s: at 4x each pass takes ~1.8 s, so each session reconnects.
    assert!(r.connections >= 10, "{} connections", r.connections);
    b.sink_stop.cancel();
    b.gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_webhook_with_a_slow_flaky_sink_loses_nothing() {
    let b = start(
        SinkConfig {
            delay: Duration::from_millis(5),
            fail_rate: 0.05,
            secret: Some(SECRET.into()),
        },
        |w| {
            w.delay_seconds = Some(1.0);
            w.max_retries = 6;
            w.backoff_initial_ms = 10;
            w.backoff_max_ms = 100;
            w.breaker_failures = 1000;
        },
    )
    .await;
    let mut args = LoadArgs::new(
        b.gw.ws("/v1/listen?encoding=linear16&sample_rate=16000"),
        corpus("reference/medium.s16le-16k-mono.pcm"),
    );
    args.sessions = 10;
    args.speed = 10.0;
    args.duration = 3.0;
    let r = load::run(&args).await.unwrap();
    let s = b.sink.stats(false);
    assert_zero_loss(&r, &s);
    assert!(s.failed_on_purpose > 0, "the sink did fail some requests");
    b.sink_stop.cancel();
    b.gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_counts_gaps_duplicates_reordering_and_bad_signatures() {
    let sink = Sink::new(SinkConfig {
        secret: Some(SECRET.into()),
        ..SinkConfig::default()
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(sink::serve(sink.clone(), listener, stop.clone()));
    let http = reqwest::Client::new();
    let post = |seq: u64, start: u64, samples: u64, good_sig: bool| {
        let body = vec![0u8; samples as usize * 2];
        let key = format!("s1:sink:{seq}");
        let sig =
            voxgate::consumers::webhook::sign(if good_sig { SECRET } else { "wrong" }, &key, &body);
        http.post(format!(
            "http://{addr}/hook?sample_rate=16000&session_id=s1"
        ))
        .header("x-voxgate-sequence", seq)
        .header("x-voxgate-start-sample", start)
        .header("x-voxgate-samples", samples)
        .header("x-voxgate-session-id", "s1")
        .header("idempotency-key", key)
        .header("x-voxgate-signature", sig)
        .body(body)
        .send()
    };
    assert_eq!(post(0, 0, 100, true).await.unwrap().status(), 200);
    assert_eq!(post(0, 0, 100, true).await.unwrap().status(), 200); // duplicate
    assert_eq!(post(2, 200, 100, true).await.unwrap().status(), 200); // ahead of 1
    assert_eq!(post(5, 900, 100, false).await.unwrap().status(), 401);
    let s = sink.stats(true);
    assert_eq!(s.duplicates, 1);
    assert_eq!(s.out_of_order, 1);
    assert_eq!(s.seq_gaps, 1, "seq 1 is missing");
    assert_eq!(s.bad_signature, 1);
    assert_eq!(s.samples, 200);
    assert!(!s.clean());
    // The missing request arrives; then a request that does not continue the samples.
    assert_eq!(post(1, 100, 100, true).await.unwrap().status(), 200);
    assert_eq!(post(3, 999, 100, true).await.unwrap().status(), 200);
    let s = sink.stats(true);
    assert_eq!(s.seq_gaps, 0);
    assert_eq!(s.start_gaps, 1);
    assert_eq!(s.samples, 400);
    assert_eq!(s.per_session.unwrap()["s1"].requests, 4);
    let stats: serde_json::Value = http
        .get(format!("http://{addr}/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["samples"], 400);
    stop.cancel();
}
