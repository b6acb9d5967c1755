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
            ..SinkConfig::default()
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
        let req = http
            .post(format!(
                "http://{addr}/hook?sample_rate=16000&session_id=s1"
            ))
            .header("x-voxgate-sequence", seq)
            .header("x-voxgate-start-sample", start)
            .header("x-voxgate-samples", samples)
            .header("x-voxgate-session-id", "s1")
            .header("idempotency-key", key)
            .body(body);
        voxgate::consumers::contract::sign_request(req, if good_sig { SECRET } else { "wrong" })
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

/// `--sink-listen`: the load tool's own webhook receiver, fed by a plain in-process webhook (no
/// bus) of two gateways the sessions are spread over. Besides the real batches, the test posts a
/// redelivery (same key, same range), a conflicting duplicate (same key, other range), a batch of
/// an unknown session and one far past the end of a session: each is counted where it belongs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_sink_measures_webhook_latency_and_contiguity() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sink_addr = format!("127.0.0.1:{port}");
    let mut cfg = test_config();
    cfg.webhooks.push(WebhookConfig::new(
        "audio",
        &format!("http://{sink_addr}/audio"),
        Some(1.0),
    ));
    let gw1 = Gateway::start(cfg.clone()).await;
    let gw2 = Gateway::start(cfg).await;
    let query = "/v1/listen?encoding=linear16&sample_rate=16000";
    let mut args = LoadArgs::new(gw1.ws(query), corpus("reference/short.s16le-16k-mono.pcm"));
    args.url.push(gw2.ws(query));
    args.sessions = 10;
    args.speed = 10.0;
    args.duration = 3.0;
    args.sink_listen = Some(sink_addr.clone());
    args.sink_wait = 10.0;
    args.session_prefix = Some("t".into());
    args.server_pid = vec![std::process::id()];
    let load = tokio::spawn(async move { load::run(&args).await });

    // Real batches of t-0-0 and t-1-0 (16,000 samples each at 10x) are in by now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let http = reqwest::Client::new();
    let post = |session: &str, key: &str, start: u64, samples: u64| {
        http.post(format!(
            "http://{sink_addr}/audio?sample_rate=16000&session_id={session}"
        ))
        .header("x-voxgate-sequence", 0)
        .header("x-voxgate-start-sample", start)
        .header("x-voxgate-samples", samples)
        .header("idempotency-key", key)
        .body(vec![0u8; samples as usize * 2])
        .send()
    };
    for (session, key, start, samples) in [
        ("t-0-0", "t-0-0:audio:0", 0, 16_000),
        ("t-1-0", "t-1-0:audio:0", 0, 100),
        ("nobody", "nobody:audio:0", 0, 100),
        ("t-2-0", "t-2-0:audio:999999", 1 << 40, 10),
    ] {
        let resp = post(session, key, start, samples).await.unwrap();
        assert_eq!(resp.status(), 200);
    }

    let r = load.await.unwrap().unwrap();
    assert_eq!(r.sessions_failed, 0, "errors: {:?}", r.errors);
    assert_eq!(r.urls.len(), 2);
    assert_eq!(r.closed_samples_decoded, r.samples_sent);
    let k = r.sink.as_ref().expect("a sink report");
    assert_eq!(k.sessions as u64, r.connections);
    assert_eq!(k.per_session.len(), k.sessions);
    assert!(k.per_session.iter().all(|s| s.session_id.starts_with("t-")));
    assert_eq!(k.duplicates, 2, "{k:?}");
    assert_eq!(k.duplicate_mismatches, 1);
    assert_eq!(k.unknown_session_requests, 1);
    assert_eq!(k.bad_requests, 0);
    assert_eq!(k.requests, k.batches + k.duplicates + 1);
    // Every sample sent arrived once; the stray batch is a hole plus extra samples.
    assert_eq!(k.missing_samples, 0, "{:?}", k.missing_by_session);
    assert!(k.missing_by_session.is_empty());
    assert_eq!(k.samples, r.samples_sent + 10);
    assert_eq!((k.gaps, k.extra_samples, k.overlaps), (1, 10, 0));
    assert_eq!(k.sessions_complete, k.sessions - 1);
    assert!(k.settle_seconds < 10.0, "settled: {}", k.settle_seconds);
    // Latency of every real batch (the stray one matches no sent message).
    let lat = k.latency.as_ref().expect("PCM latency is measured");
    assert_eq!(lat.count as u64, k.batches - 1);
    assert!(lat.p50_ms > 0.0 && lat.max_ms < 5000.0, "{lat:?}");
    assert!(k.longest_silence_s < 3.0, "{}", k.longest_silence_s);
    assert!(r.timeline.iter().any(|s| s.sink_requests.unwrap_or(0) > 0));
    let me = r.processes.iter().find(|p| p.role == "server").unwrap();
    assert!(
        me.cpu_seconds.unwrap() > 0.0 && me.rss_peak_bytes.is_some(),
        "{me:?}"
    );
    assert!(r.processes.iter().any(|p| p.role == "load"));
    gw1.shutdown.cancel();
    gw2.shutdown.cancel();
}
