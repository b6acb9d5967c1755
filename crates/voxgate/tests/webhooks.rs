//! The seed pusher's webhook matrix, end to end: a real gateway, a real WS client and a real
//! HTTP receiver on 127.0.0.1. delay absent / 0 / 5 s, with and without a second app webhook.

mod common;

use std::time::Duration;

use common::*;
use voxgate::config::WebhookConfig;

/// Streams `messages` into a session whose webhooks have `delays`; returns the run and requests.
async fn run_matrix(
    delays: &[Option<f64>],
    messages: Vec<Vec<u8>>,
    query: &str,
) -> (ClientRun, Vec<Vec<Received>>) {
    let rx = Receiver::start(Mode::Ok).await;
    let mut cfg = test_config();
    for (i, d) in delays.iter().enumerate() {
        cfg.webhooks.push(WebhookConfig::new(
            &format!("app{i}"),
            &rx.url(&format!("app{i}")),
            *d,
        ));
    }
    let gw = Gateway::start(cfg).await;
    let run = stream(
        &gw.ws(&format!("/v1/listen?{query}")),
        messages,
        Duration::ZERO,
    )
    .await;
    let reqs = (0..delays.len())
        .map(|i| rx.requests(&format!("app{i}")))
        .collect();
    (run, reqs)
}

fn samples_decoded(run: &ClientRun) -> u64 {
    run.closed()["summary"]["samples_decoded"].as_u64().unwrap()
}

/// Requests are contiguous in sequence and sample offset and carry exactly the decoded audio.
fn assert_contiguous(reqs: &[Received], total: u64) {
    let mut next = 0;
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(r.seq, i as u64, "sequence numbers are contiguous");
        assert_eq!(r.start, next, "request {i} starts where the previous ended");
        assert_eq!(
            r.body.len() as u64,
            r.samples * 2,
            "body is PCM16 of the declared samples"
        );
        next += r.samples;
    }
    assert_eq!(
        next, total,
        "total samples delivered equal total samples decoded"
    );
}

const PCM: &str = "encoding=linear16&sample_rate=16000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_absent_means_no_webhook_and_no_requests() {
    let msgs = pcm_messages("medium", None);
    let (run, reqs) = run_matrix(&[None], msgs, PCM).await;
    assert_eq!(run.close_code, Some(1000));
    assert!(samples_decoded(&run) > 16_000 * 30);
    assert!(reqs[0].is_empty(), "absent delay must send nothing");
    let consumers = run.closed()["summary"]["consumers"].as_array().unwrap();
    assert!(consumers.is_empty(), "no consumer is built: {consumers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_zero_posts_every_chunk_at_once() {
    let msgs = pcm_messages("medium", None);
    let n = msgs.len();
    let (run, reqs) = run_matrix(&[Some(0.0)], msgs, PCM).await;
    let total = samples_decoded(&run);
    assert_eq!(total, 1_001_882 / 2);
    assert_eq!(reqs[0].len(), n, "one request per audio message");
    assert_contiguous(&reqs[0], total);
    let c = &run.closed()["summary"]["consumers"][0];
    assert_eq!(c["delivered_bytes"].as_u64(), Some(total * 2));
    assert_eq!(c["dropped_bytes"].as_u64(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_five_posts_exactly_five_seconds_and_the_rest_at_close() {
    let msgs = pcm_messages("medium", None);
    let (run, reqs) = run_matrix(&[Some(5.0)], msgs, PCM).await;
    let total = samples_decoded(&run);
    let reqs = &reqs[0];
    assert_eq!(reqs.len() as u64, total.div_ceil(80_000));
    for r in &reqs[..reqs.len() - 1] {
        assert_eq!(
            r.samples, 80_000,
            "every request but the last carries exactly 5 s"
        );
    }
    assert!(reqs.last().unwrap().samples > 0);
    assert_contiguous(reqs, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_app_webhooks_each_get_every_sample() {
    for delays in [
        [Some(0.0), Some(5.0)],
        [Some(5.0), Some(2.0)],
        [None, Some(0.0)],
    ] {
        let msgs = pcm_messages("medium", Some(12.3));
        let (run, reqs) = run_matrix(&delays, msgs, PCM).await;
        let total = samples_decoded(&run);
        assert_eq!(total, (12.3f64 * 16_000.0) as u64);
        for (d, r) in delays.iter().zip(&reqs) {
            match d {
                None => assert!(r.is_empty()),
                Some(secs) => {
                    assert_contiguous(r, total);
                    let batch = (secs * 16_000.0) as u64;
                    if batch > 0 {
                        assert!(r[..r.len() - 1].iter().all(|x| x.samples == batch));
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webm_capture_delivers_every_decoded_sample() {
    let msgs = capture_messages("chromium_medium_250ms.webm");
    let (run, reqs) = run_matrix(&[Some(5.0), Some(0.0)], msgs, "").await;
    let total = samples_decoded(&run);
    assert!(
        (total as f64 / 16_000.0 - 32.82).abs() < 0.1,
        "decoded {total}"
    );
    assert_eq!(run.closed()["summary"]["decode_errors"], 0);
    assert_contiguous(&reqs[0], total);
    assert_contiguous(&reqs[1], total);
    let started = run.of_type("Started");
    assert_eq!(started.len(), 1);
    assert_eq!(started[0]["format"], "webm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_signed_and_idempotent() {
    let rx = Receiver::start(Mode::Ok).await;
    let mut cfg = test_config();
    let mut w = WebhookConfig::new("signed", &rx.url("signed"), Some(1.0));
    w.secret = Some("s3cret".into());
    cfg.webhooks.push(w);
    let gw = Gateway::start(cfg).await;
    let run = stream(
        &gw.ws(&format!("/v1/listen?{PCM}&session_id=sig-1&uid=user-7")),
        pcm_messages("short", None),
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1000));
    let reqs = rx.requests("signed");
    assert!(reqs.len() >= 5);
    for r in &reqs {
        assert_eq!(r.session_id, "sig-1");
        assert_eq!(r.idempotency_key, format!("sig-1:signed:{}", r.seq));
        assert!(r.signature.as_deref().is_some_and(|s| s.starts_with("v1=")));
        assert_eq!(r.verify("s3cret"), Ok(()));
        assert_eq!(
            r.verify("another-secret"),
            Err(voxgate::consumers::contract::VerifyError::Mismatch)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoint_is_retried_then_counted_as_dropped() {
    let rx = Receiver::start(Mode::Fail(503)).await;
    let mut cfg = test_config();
    let mut w = WebhookConfig::new("flaky", &rx.url("flaky"), Some(0.0));
    w.max_retries = 1;
    w.backoff_initial_ms = 1;
    w.backoff_max_ms = 2;
    w.breaker_failures = 1000;
    cfg.webhooks.push(w);
    let gw = Gateway::start(cfg).await;
    let run = stream(
        &gw.ws(&format!("/v1/listen?{PCM}")),
        pcm_messages("short", Some(1.0)),
        Duration::ZERO,
    )
    .await;
    let c = &run.closed()["summary"]["consumers"][0];
    assert_eq!(c["delivered_bytes"], 0);
    assert_eq!(c["dropped_bytes"].as_u64(), Some(32_000));
    assert_eq!(
        c["requests"].as_u64(),
        Some(20),
        "10 chunks x (1 try + 1 retry)"
    );
    let m = gw.metrics().await;
    assert!(metric_value(&m, "voxgate_dropped_bytes_total", "reason=\"gave_up\"") >= 32_000.0);
}
