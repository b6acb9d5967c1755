//! Devices and telephony end to end: raw PCM, mu-law, device Opus packets (with and without
//! sequence numbers) and Twilio Media Streams, against the corpus speech.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use voxgate::cli::device;
use voxgate::config::WebhookConfig;

fn reference_pcm(name: &str) -> Vec<i16> {
    std::fs::read(corpus(&format!("reference/{name}.s16le-16k-mono.pcm")))
        .unwrap()
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

fn samples_of(reqs: &[Received]) -> Vec<i16> {
    reqs.iter()
        .flat_map(|r| {
            r.body
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]))
        })
        .collect()
}

/// Best SNR (dB) of `out` against `reference` over lags in -max..=max samples.
fn snr_db(reference: &[i16], out: &[i16], max_lag: i64) -> f64 {
    let mut best = f64::MIN;
    for lag in -max_lag..=max_lag {
        let (mut sig, mut err) = (0f64, 0f64);
        for (i, r) in reference.iter().enumerate() {
            let j = i as i64 + lag;
            if j < 0 || j >= out.len() as i64 {
                continue;
            }
            let r = f64::from(*r);
            let o = f64::from(out[j as usize]);
            sig += r * r;
            err += (r - o) * (r - o);
        }
        if err > 0.0 {
            best = best.max(10.0 * (sig / err).log10());
        } else if sig > 0.0 {
            return f64::INFINITY;
        }
    }
    best
}

/// Runs a session with a delay-0 webhook; returns the client run and the webhook's samples.
async fn run_with_webhook(query: &str, messages: Vec<Vec<u8>>) -> (ClientRun, Vec<i16>) {
    let rx = Receiver::start(Mode::Ok).await;
    let mut cfg = test_config();
    cfg.webhooks
        .push(WebhookConfig::new("all", &rx.url("all"), Some(0.0)));
    let gw = Gateway::start(cfg).await;
    let run = stream(
        &gw.ws(&format!("/v1/listen?{query}")),
        messages,
        Duration::ZERO,
    )
    .await;
    let pcm = samples_of(&rx.requests("all"));
    (run, pcm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linear16_with_odd_splits_is_bit_exact() {
    let data = std::fs::read(corpus("reference/short.s16le-16k-mono.pcm")).unwrap();
    let msgs: Vec<Vec<u8>> = data.chunks(333).map(<[u8]>::to_vec).collect();
    let (run, pcm) = run_with_webhook("encoding=linear16&sample_rate=16000", msgs).await;
    assert_eq!(run.close_code, Some(1000));
    assert_eq!(
        pcm,
        reference_pcm("short"),
        "16 kHz PCM passes through unchanged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mulaw_8k_matches_the_reference() {
    let data = std::fs::read(corpus("reference/short.mulaw-8k-mono.raw")).unwrap();
    let msgs: Vec<Vec<u8>> = data.chunks(160).map(<[u8]>::to_vec).collect();
    let (run, pcm) = run_with_webhook("encoding=mulaw&sample_rate=8000", msgs).await;
    let secs = run.closed()["summary"]["seconds_decoded"].as_f64().unwrap();
    assert!((secs - 44_855.0 / 8000.0).abs() < 0.01, "{secs}");
    assert_eq!(
        pcm.len() as u64,
        run.closed()["summary"]["samples_decoded"].as_u64().unwrap()
    );
    // Band-limited to 4 kHz and mu-law quantised: well correlated with the 16 kHz original.
    let snr = snr_db(&reference_pcm("short"), &pcm, 64);
    assert!(snr > 10.0, "mu-law SNR {snr:.1} dB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_opus_packets_decode() {
    let (rate, samples) = device::read_wav(&corpus("source/short.wav")).unwrap();
    for frame_ms in [10, 20] {
        let packets = device::opus_packets(rate, &samples, frame_ms, false).unwrap();
        let n = packets.len();
        let q = format!("encoding=opus&sample_rate=16000&frame_ms={frame_ms}");
        let (run, pcm) = run_with_webhook(&q, packets).await;
        assert_eq!(run.closed()["summary"]["decode_errors"], 0);
        let expected = n * frame_ms as usize * 16;
        assert_eq!(pcm.len(), expected, "every packet decodes to its frame");
        let snr = snr_db(&samples, &pcm, 400);
        assert!(snr > 8.0, "opus {frame_ms} ms SNR {snr:.1} dB");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_device_packets_are_concealed_and_counted() {
    let (rate, samples) = device::read_wav(&corpus("source/short.wav")).unwrap();
    let mut packets = device::opus_packets(rate, &samples, 20, true).unwrap();
    let n = packets.len();
    packets.remove(100);
    packets.remove(100);
    packets.remove(200);
    let (run, pcm) =
        run_with_webhook("encoding=opus&sample_rate=16000&frame_ms=20&seq=1", packets).await;
    assert_eq!(
        pcm.len(),
        n * 320,
        "media time stays continuous across the gaps"
    );
    let lost: Vec<_> = run
        .of_type("Warning")
        .into_iter()
        .filter(|w| w["code"] == "packets_lost")
        .collect();
    assert_eq!(lost.len(), 2, "{lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_device_input_is_reported_and_survived() {
    let gw = Gateway::start(test_config()).await;
    // Opus packets of 0 and 2,000 bytes around good ones.
    let (rate, samples) = device::read_wav(&corpus("source/short.wav")).unwrap();
    let mut packets = device::opus_packets(rate, &samples[..16_000], 20, false).unwrap();
    packets.insert(10, vec![]);
    packets.insert(20, vec![0xFF; 2000]);
    let run = stream(
        &gw.ws("/v1/listen?encoding=opus&sample_rate=16000"),
        packets,
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1000));
    let summary = &run.closed()["summary"];
    assert_eq!(
        summary["decode_errors"], 1,
        "the 2,000-byte packet is one decode error"
    );
    assert_eq!(summary["samples_decoded"], 16_000);
    assert!(run
        .of_type("Warning")
        .iter()
        .any(|w| w["code"] == "decode_error"));

    // A one-byte PCM message: carried to the next one, no panic, nothing lost.
    let msgs = vec![vec![0x01], vec![0x00, 0x02, 0x00], vec![]];
    let run = stream(
        &gw.ws("/v1/listen?encoding=linear16&sample_rate=16000"),
        msgs,
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.closed()["summary"]["samples_decoded"], 2);

    // Bad parameters are refused before any audio.
    let run = stream(
        &gw.ws("/v1/listen?encoding=opus&sample_rate=44100"),
        vec![],
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1008));
    assert_eq!(run.of_type("Error")[0]["code"], "invalid_parameters");
}

/// Sends Twilio text messages and collects what comes back.
async fn twilio(url: &str, messages: Vec<String>) -> ClientRun {
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    for m in messages {
        tx.send(Message::Text(m.into())).await.unwrap();
    }
    let mut run = ClientRun::default();
    let read = async {
        while let Some(Ok(msg)) = rx.next().await {
            match msg {
                Message::Text(t) => run.events.push(serde_json::from_str(&t).unwrap()),
                Message::Close(f) => {
                    run.close_code = f.map(|f| u16::from(f.code));
                    break;
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .unwrap();
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_media_stream_matches_the_mulaw_path() {
    let rx = Receiver::start(Mode::Ok).await;
    let mut cfg = test_config();
    let mut w = WebhookConfig::new("calls", &rx.url("calls"), Some(5.0));
    w.default = false; // only sessions that ask for it
    cfg.webhooks.push(w);
    let gw = Gateway::start(cfg).await;
    let mulaw = std::fs::read(corpus("reference/short.mulaw-8k-mono.raw")).unwrap();
    let custom = vec![("consumers".to_owned(), "calls".to_owned())];
    let mut msgs = device::twilio_messages(&mulaw, "MZ123", &custom);
    // Noise a telephony peer may send: unknown events, bad base64, a mark, a dtmf.
    msgs.insert(3, r#"{"event":"mystery"}"#.to_owned());
    msgs.insert(
        4,
        r#"{"event":"media","media":{"track":"inbound","payload":"***"}}"#.to_owned(),
    );
    msgs.insert(
        5,
        r#"{"event":"dtmf","dtmf":{"digit":"5","track":"inbound_track"}}"#.to_owned(),
    );
    let run = twilio(&gw.ws("/v1/twilio"), msgs).await;
    assert_eq!(run.close_code, Some(1000));
    let codes: Vec<_> = run
        .of_type("Warning")
        .iter()
        .map(|w| w["code"].clone())
        .collect();
    assert!(codes.contains(&"unknown_event".into()), "{codes:?}");
    assert!(codes.contains(&"bad_payload".into()), "{codes:?}");
    let closed = run.closed();
    assert_eq!(closed["session_id"], "MZ123");
    let total = closed["summary"]["samples_decoded"].as_u64().unwrap();
    assert_eq!(
        total,
        44_855 * 2,
        "same sample count as the raw mu-law path"
    );
    let reqs = rx.requests("calls");
    assert_eq!(
        reqs.iter().map(|r| r.samples).sum::<u64>(),
        total,
        "{closed}"
    );
    assert!(reqs[..reqs.len() - 1].iter().all(|r| r.samples == 80_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_gaps_and_bad_order_are_handled() {
    let gw = Gateway::start(test_config()).await;
    let mulaw = vec![0xFFu8; 8000];
    let mut msgs = device::twilio_messages(&mulaw, "MZgap", &[]);
    // A media event before start is dropped with a warning.
    msgs.insert(1, msgs[3].clone());
    // Drop 10 media events (200 ms): the timestamps reveal the gap, filled with silence.
    msgs.drain(10..20);
    let run = twilio(&gw.ws("/v1/twilio"), msgs).await;
    let codes: Vec<_> = run
        .of_type("Warning")
        .iter()
        .map(|w| w["code"].clone())
        .collect();
    assert!(codes.contains(&"media_before_start".into()), "{codes:?}");
    assert!(codes.contains(&"media_gap".into()), "{codes:?}");
    assert_eq!(run.closed()["summary"]["samples_decoded"], 16_000);

    // A start with a media format we cannot take is refused with 1003.
    let start = r#"{"event":"start","start":{"streamSid":"MZx","mediaFormat":{"encoding":"audio/x-l16","sampleRate":16000,"channels":1}}}"#;
    let run = twilio(&gw.ws("/v1/twilio"), vec![start.to_owned()]).await;
    assert_eq!(run.close_code, Some(1003));
}
