//! Omi's pusher protocol on `/v1/trigger/listen`, end to end with a client speaking it.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use voxgate::config::WebhookConfig;

fn frame(op: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = op.to_le_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

fn audio(ts: f64, pcm: &[u8]) -> Vec<u8> {
    let mut p = ts.to_le_bytes().to_vec();
    p.extend_from_slice(pcm);
    frame(101, &p)
}

/// `seconds` of the medium speech at 16 kHz as 101 frames of `frame_bytes`.
fn audio_frames(seconds: f64, frame_bytes: usize) -> Vec<Vec<u8>> {
    let mut data = std::fs::read(corpus("reference/medium.s16le-16k-mono.pcm")).unwrap();
    data.truncate((seconds * 32_000.0) as usize);
    data.chunks(frame_bytes)
        .enumerate()
        .map(|(i, c)| audio(1_700_000_000.0 + (i * frame_bytes) as f64 / 32_000.0, c))
        .collect()
}

struct OmiRun {
    close_code: Option<u16>,
    close_reason: String,
    replies: Vec<serde_json::Value>,
}

async fn omi(url: &str, frames: Vec<Vec<u8>>, wait_replies: usize) -> OmiRun {
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    for f in frames {
        if tx.send(Message::Binary(f.into())).await.is_err() {
            break;
        }
    }
    let mut run = OmiRun {
        close_code: None,
        close_reason: String::new(),
        replies: Vec::new(),
    };
    if wait_replies == 0 {
        let _ = tx.send(Message::Close(None)).await;
    }
    let read = async {
        while let Some(Ok(msg)) = rx.next().await {
            match msg {
                Message::Binary(b) => {
                    assert_eq!(&b[..4], &201u32.to_le_bytes());
                    run.replies.push(serde_json::from_slice(&b[4..]).unwrap());
                    if run.replies.len() == wait_replies {
                        let _ = tx.send(Message::Close(None)).await;
                    }
                }
                Message::Close(f) => {
                    if let Some(f) = f {
                        run.close_code = Some(u16::from(f.code));
                        run.close_reason = f.reason.to_string();
                    }
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
async fn webhook_delays_and_audio_apps_get_every_sample() {
    let rx = Receiver::start(Mode::Ok).await;
    let mut cfg = test_config();
    cfg.webhooks
        .push(WebhookConfig::new("dev0", &rx.url("dev0"), Some(0.0)));
    cfg.webhooks
        .push(WebhookConfig::new("dev5", &rx.url("dev5"), Some(5.0)));
    cfg.omi.audio_apps.push(rx.url("app"));
    let gw = Gateway::start(cfg).await;
    let frames = audio_frames(12.0, 16_000);
    let n = frames.len();
    let run = omi(
        &gw.ws("/v1/trigger/listen?uid=u1&sample_rate=16000"),
        frames,
        0,
    )
    .await;
    assert_eq!(
        run.close_code, None,
        "client closed first: {}",
        run.close_reason
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = 12 * 16_000;
    let dev0 = rx.requests("dev0");
    assert_eq!(dev0.len(), n, "delay 0 posts every frame");
    assert_eq!(dev0.iter().map(|r| r.samples).sum::<u64>(), total);
    let dev5 = rx.requests("dev5");
    assert_eq!(
        dev5.iter().map(|r| r.samples).collect::<Vec<_>>(),
        vec![80_000, 80_000, 32_000]
    );
    let app = rx.requests("app");
    assert_eq!(
        app.iter().map(|r| r.samples).collect::<Vec<_>>(),
        vec![64_000, 64_000, 64_000]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcripts_and_conversation_events_are_forwarded() {
    let rx = Receiver::start(Mode::Ok).await;
    let mut cfg = test_config();
    cfg.omi.transcript_webhook = Some(rx.url("transcripts"));
    cfg.omi.conversation_webhook = Some(rx.url("conversations"));
    let gw = Gateway::start(cfg).await;
    let mut frames = vec![frame(100, b""), frame(103, b"conv-42")];
    frames.extend(audio_frames(1.0, 8000));
    frames.push(frame(
        102,
        br#"{"segments":[{"text":"hello there","speaker":"SPEAKER_0"}],"memory_id":"m1"}"#,
    ));
    frames.push(frame(105, br#"{"speaker_id":1,"url":"x"}"#));
    frames.push(frame(104, br#"{"reason":"user"}"#));
    let run = omi(&gw.ws("/v1/trigger/listen?uid=u2"), frames, 1).await;
    assert_eq!(run.replies.len(), 1);
    assert_eq!(run.replies[0]["conversation_id"], "conv-42");
    assert_eq!(run.replies[0]["success"], true);
    let t = rx.requests("transcripts");
    assert_eq!(t.len(), 1);
    let body: serde_json::Value = serde_json::from_slice(&t[0].body).unwrap();
    assert_eq!(body["segments"][0]["text"], "hello there");
    assert_eq!(body["conversation_id"], "conv-42");
    let c = rx.requests("conversations");
    let events: Vec<String> = c
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(events, vec!["speaker_sample", "finalize"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalize_is_answered_without_a_conversation_webhook() {
    let gw = Gateway::start(test_config()).await;
    let frames = vec![frame(103, b"c-1"), frame(104, b"{}")];
    let run = omi(&gw.ws("/v1/trigger/listen?uid=u3"), frames, 1).await;
    assert_eq!(run.replies[0]["conversation_id"], "c-1");
    assert_eq!(run.replies[0]["success"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_with_1003_and_others_are_unaffected() {
    let gw = Gateway::start(test_config()).await;
    // A healthy session runs alongside the bad ones.
    let good_url = gw.ws("/v1/trigger/listen?uid=good&sample_rate=16000");
    let good = tokio::spawn(async move { omi(&good_url, audio_frames(3.0, 3200), 0).await });
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![1, 2, 3], "no 4-byte opcode"),
        (frame(999, b"x"), "unknown opcode 999"),
        (audio(0.0, &[1, 2, 3]), "odd length"),
        (frame(102, b"{not json"), "not JSON"),
    ];
    for (bad, why) in cases {
        let run = omi(
            &gw.ws("/v1/trigger/listen?uid=bad"),
            vec![audio(0.0, &[0; 320]), bad],
            0,
        )
        .await;
        assert_eq!(run.close_code, Some(1003), "{why}");
        assert!(
            run.close_reason.contains(why),
            "{} vs {why}",
            run.close_reason
        );
    }
    let run = omi(&gw.ws("/v1/trigger/listen?uid=x&sample_rate=7"), vec![], 0).await;
    assert_eq!(run.close_code, Some(1008));
    assert!(run.close_reason.contains("sample_rate"));
    let run = omi(&gw.ws("/v1/trigger/listen"), vec![], 0).await;
    assert_eq!(run.close_code, Some(1008));
    let good = good.await.unwrap();
    assert_eq!(good.close_code, None, "{}", good.close_reason);
    let m = gw.metrics().await;
    assert!(metric_value(&m, "voxgate_ws_closes_total", "code=\"1003\"") >= 4.0);
}

/// `audio_timeline=2` as Omi's listen side speaks it: the 202 acknowledgement is the first
/// frame; then frames whose timestamps are the capture time of their first sample, with an
/// exact replay, a conflicting replay (same start, other bytes) and a replay of the last two
/// seconds that runs on. The recording holds the timeline exactly once, first data kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_timeline_2_acks_first_and_replays_are_stored_once() {
    let dir = std::env::temp_dir().join(format!("voxgate-omi-v2-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = test_config();
    cfg.recording.url = dir.to_str().unwrap().into();
    cfg.recording.default = true;
    let gw = Gateway::start(cfg).await;
    let url = gw.ws("/v1/trigger/listen?uid=u9&sample_rate=16000&audio_timeline=2&session_id=v2");
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    let first = rx.next().await.unwrap().unwrap().into_data();
    assert_eq!(&first[..4], &202u32.to_le_bytes(), "the ack comes first");
    let ack: serde_json::Value = serde_json::from_slice(&first[4..]).unwrap();
    assert_eq!(
        ack,
        serde_json::json!({"type": "audio_timeline_ack", "version": 2})
    );

    let mut pcm = std::fs::read(corpus("reference/medium.s16le-16k-mono.pcm")).unwrap();
    pcm.truncate(6 * 32_000);
    let t0 = 1_760_000_000.25;
    let at = |byte: usize| t0 + byte as f64 / 32_000.0;
    let mut frames: Vec<Vec<u8>> = pcm
        .chunks(16_000)
        .enumerate()
        .map(|(i, c)| audio(at(i * 16_000), c))
        .collect();
    // An exact replay of frame 3, a conflicting one of frame 4, and after frame 7 the last two
    // seconds again, running one second further than what was sent.
    frames.insert(4, frames[3].clone());
    frames.insert(6, audio(at(4 * 16_000), &vec![0x55; 16_000]));
    let mut replay = pcm[2 * 32_000..].to_vec();
    replay.truncate(3 * 32_000);
    frames.insert(10, audio(at(2 * 32_000), &replay));
    for f in frames {
        tx.send(Message::Binary(f.into())).await.unwrap();
    }
    tx.send(Message::Close(None)).await.unwrap();
    while let Some(Ok(m)) = rx.next().await {
        if m.is_close() {
            break;
        }
    }
    let base = format!("http://{}/v1/sessions/v2/recording", gw.addr);
    for _ in 0..50 {
        let r = reqwest::get(format!("{base}/events")).await.unwrap();
        if r.text().await.unwrap().contains("RecordingSummary") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wav = reqwest::get(&base).await.unwrap().bytes().await.unwrap();
    assert_eq!(
        &wav[44..],
        &pcm[..],
        "each sample once, the first data kept"
    );
    let m = gw.metrics().await;
    for outcome in ["exact", "conflict", "trimmed"] {
        let label = format!("outcome=\"{outcome}\"");
        assert!(
            metric_value(&m, "voxgate_omi_replays_total", &label) >= 1.0,
            "{outcome}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_audio_timeline_version_is_closed_with_1008() {
    let gw = Gateway::start(test_config()).await;
    let run = omi(
        &gw.ws("/v1/trigger/listen?uid=u&sample_rate=16000&audio_timeline=3"),
        vec![],
        0,
    )
    .await;
    assert_eq!(run.close_code, Some(1008), "{}", run.close_reason);
}

/// Omi's listen side reconnects mid-conversation: the new socket repeats the handshake and
/// the `103`, then replays its last 1.5 s before running on. The reconnect continues the
/// first socket's timeline and recording: the stored chunks cover the timeline exactly once,
/// contiguous, under the first socket's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_that_replays_its_last_seconds_is_stored_once() {
    let dir = std::env::temp_dir().join(format!("voxgate-omi-rc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = test_config();
    cfg.recording.url = dir.to_str().unwrap().into();
    cfg.recording.default = true;
    cfg.recording.chunk_seconds = 1.0;
    cfg.recording.max_buffer_seconds = 10.0;
    let gw = Gateway::start(cfg).await;
    let mut pcm = std::fs::read(corpus("reference/medium.s16le-16k-mono.pcm")).unwrap();
    pcm.truncate(7 * 32_000);
    let t0 = 1_760_000_100.5;
    // 0.1 s frames of bytes `from..to`, stamped with their capture time.
    let run = |from: usize, to: usize| -> Vec<Vec<u8>> {
        let mut frames = vec![frame(103, b"conv-7")];
        frames.extend((from..to).step_by(3200).map(|b| {
            let end = (b + 3200).min(to);
            audio(t0 + b as f64 / 32_000.0, &pcm[b..end])
        }));
        frames
    };
    let url = |sid: &str| {
        gw.ws(&format!(
            "/v1/trigger/listen?uid=u7&sample_rate=16000&audio_timeline=2&session_id={sid}"
        ))
    };
    let cut = 37 * 3200; // 3.7 s
    v2_socket(&url("first"), run(0, cut)).await;
    v2_socket(&url("again"), run(cut - 15 * 3200, pcm.len())).await;

    let summary = dir.join("_").join("first").join("summary.json");
    for _ in 0..100 {
        let s = std::fs::read_to_string(&summary).unwrap_or_default();
        if s.contains("\"session_id\":\"again\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut ranges: Vec<(u64, u64)> = std::fs::read_dir(dir.join("_").join("first").join("audio"))
        .unwrap()
        .map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            let (a, b) = name.strip_suffix(".pcm").unwrap().split_once('-').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    ranges.sort();
    let mut at = 0;
    for (start, end) in &ranges {
        assert_eq!(*start, at, "contiguous, no overlap: {ranges:?}");
        at = *end;
    }
    assert_eq!(at, 7 * 16_000, "{ranges:?}");
    assert!(
        !dir.join("_").join("again").join("audio").exists(),
        "the reconnect continued the first recording"
    );
    let wav = reqwest::get(format!("http://{}/v1/sessions/first/recording", gw.addr))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&wav[44..], &pcm[..], "each sample once");
    let m = gw.metrics().await;
    let continued = metric_value(&m, "voxgate_omi_timelines_total", "outcome=\"continued\"")
        + metric_value(&m, "voxgate_omi_timelines_total", "outcome=\"took_over\"");
    assert_eq!(continued, 1.0);
    assert!(metric_value(&m, "voxgate_omi_replays_total", "outcome=\"exact\"") >= 14.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An `audio_timeline=2` socket: the ack first, then `frames`, then a normal close.
async fn v2_socket(url: &str, frames: Vec<Vec<u8>>) {
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    let first = rx.next().await.unwrap().unwrap().into_data();
    assert_eq!(&first[..4], &202u32.to_le_bytes(), "the ack comes first");
    for f in frames {
        tx.send(Message::Binary(f.into())).await.unwrap();
    }
    tx.send(Message::Close(None)).await.unwrap();
    while let Some(Ok(m)) = rx.next().await {
        if m.is_close() {
            break;
        }
    }
}

/// `recording.layout = "omi"`: audio goes where Omi's private cloud sync puts it,
/// `chunks/{uid}/{conversation}/{first}-{last}.batch.bin` (capture times of the first and
/// last sample, PCM16 LE 16 kHz), one conversation's chunks under its id; a `103` switching
/// conversations closes the open chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_omi_layout_writes_chunks_per_user_and_conversation() {
    let dir = std::env::temp_dir().join(format!("voxgate-omi-layout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = test_config();
    cfg.recording.url = dir.to_str().unwrap().into();
    cfg.recording.default = true;
    cfg.recording.chunk_seconds = 1.0;
    cfg.recording.max_buffer_seconds = 10.0;
    cfg.recording.layout = voxgate::config::RecordingLayout::Omi;
    let gw = Gateway::start(cfg).await;
    let mut pcm = std::fs::read(corpus("reference/medium.s16le-16k-mono.pcm")).unwrap();
    pcm.truncate(4 * 32_000 + 16_000);
    let t0 = 1_760_000_200.0;
    let frames_of = |from: usize, to: usize| {
        (from..to)
            .step_by(3200)
            .map(|b| audio(t0 + b as f64 / 32_000.0, &pcm[b..(b + 3200).min(to)]))
            .collect::<Vec<_>>()
    };
    let mut frames = vec![frame(103, b"conv-a")];
    frames.extend(frames_of(0, 3 * 32_000 + 16_000));
    frames.push(frame(103, b"conv-b"));
    frames.extend(frames_of(3 * 32_000 + 16_000, pcm.len()));
    let url = "/v1/trigger/listen?uid=u8&sample_rate=16000&audio_timeline=2&session_id=lay";
    v2_socket(&gw.ws(url), frames).await;
    let summary = dir.join("_").join("lay").join("summary.json");
    for _ in 0..100 {
        if summary.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let chunks = |conv: &str| -> Vec<(String, Vec<u8>)> {
        let d = dir.join("chunks").join("u8").join(conv);
        let mut v: Vec<_> = std::fs::read_dir(&d)
            .unwrap_or_else(|e| panic!("{d:?}: {e}"))
            .map(|e| {
                let e = e.unwrap();
                let name = e.file_name().into_string().unwrap();
                (name, std::fs::read(e.path()).unwrap())
            })
            .collect();
        v.sort();
        v
    };
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|c| c.0.clone()).collect::<Vec<_>>();
    let a = chunks("conv-a");
    assert_eq!(
        names(&a),
        [
            "1760000200.000-1760000201.000.batch.bin",
            "1760000201.000-1760000202.000.batch.bin",
            "1760000202.000-1760000203.000.batch.bin",
            "1760000203.000-1760000203.500.batch.bin",
        ]
    );
    let b = chunks("conv-b");
    assert_eq!(
        names(&b),
        [
            "1760000203.500-1760000204.000.batch.bin",
            "1760000204.000-1760000204.500.batch.bin",
        ]
    );
    let stored: Vec<u8> = a.iter().chain(&b).flat_map(|c| c.1.clone()).collect();
    assert_eq!(stored, pcm, "each sample once, in order");
    assert!(!dir.join("_").join("lay").join("audio").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `recording.keys`: a user with a key has every audio object AES-256-GCM encrypted at rest
/// (`.pcm.enc`, not plaintext); the fetch decrypts with the configured key and returns the
/// identical samples; with a wrong key the fetch fails loudly (500, counted) instead of
/// returning noise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_recordings_are_not_plaintext_and_fetch_needs_the_right_key() {
    let dir = std::env::temp_dir().join(format!("voxgate-omi-enc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = |key: &str| {
        let mut cfg = test_config();
        cfg.recording.url = dir.to_str().unwrap().into();
        cfg.recording.default = true;
        cfg.recording.chunk_seconds = 1.0;
        cfg.recording.max_buffer_seconds = 10.0;
        cfg.recording.keys.insert("u5".into(), key.repeat(32));
        cfg
    };
    let gw = Gateway::start(config("a7")).await;
    let mut pcm = std::fs::read(corpus("reference/medium.s16le-16k-mono.pcm")).unwrap();
    pcm.truncate(2 * 32_000 + 8_000);
    let t0 = 1_760_000_300.0;
    let frames = (0..pcm.len())
        .step_by(3200)
        .map(|b| audio(t0 + b as f64 / 32_000.0, &pcm[b..(b + 3200).min(pcm.len())]))
        .collect();
    let url = "/v1/trigger/listen?uid=u5&sample_rate=16000&audio_timeline=2&session_id=enc";
    v2_socket(&gw.ws(url), frames).await;
    let root = dir.join("_").join("enc");
    for _ in 0..100 {
        if root.join("summary.json").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut names: Vec<String> = std::fs::read_dir(root.join("audio"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "000000000000-000000016000.pcm.enc",
            "000000016000-000000032000.pcm.enc",
            "000000032000-000000036000.pcm.enc",
        ]
    );
    let first = std::fs::read(root.join("audio").join(&names[0])).unwrap();
    assert_eq!(first.len(), 12 + 32_000 + 16, "nonce, ciphertext, tag");
    assert!(
        !first.windows(64).any(|w| w == &pcm[1000..1064]),
        "not plaintext"
    );
    let fetch = format!("http://{}/v1/sessions/enc/recording", gw.addr);
    let ok = reqwest::get(&fetch).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        &ok.bytes().await.unwrap()[44..],
        &pcm[..],
        "identical samples"
    );
    drop(gw);

    let wrong = Gateway::start(config("5c")).await;
    let url = format!("http://{}/v1/sessions/enc/recording", wrong.addr);
    let r = reqwest::get(&url).await.unwrap();
    assert_eq!(r.status(), 500);
    assert!(r.text().await.unwrap().contains("cannot decrypt"));
    let m = wrong.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "voxgate_recording_fetches_total",
            "outcome=\"decrypt_failed\""
        ),
        1.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Finalization result protocol 2: a `104` without `finalization_job_id` is answered at once
/// with the terminal `durable_job_required`; one with a job gets `201` success echoing its job id
/// and dispatch generation, so Omi's listen side matches the answer to its pending request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalization_protocol_2_answers_carry_the_job() {
    let gw = Gateway::start(test_config()).await;
    let frames = vec![
        frame(103, b"c-2"),
        frame(104, br#"{"finalization_result_protocol":2}"#),
        frame(
            104,
            br#"{"finalization_result_protocol":2,"finalization_job_id":"j1","dispatch_generation":3}"#,
        ),
    ];
    let run = omi(&gw.ws("/v1/trigger/listen?uid=u4"), frames, 2).await;
    assert_eq!(run.replies.len(), 2, "{}", run.close_reason);
    assert_eq!(run.replies[0]["error"], "durable_job_required");
    assert_eq!(run.replies[0]["terminal"], true);
    assert_eq!(run.replies[1]["success"], true);
    assert_eq!(run.replies[1]["finalization_job_id"], "j1");
    assert_eq!(run.replies[1]["dispatch_generation"], 3);
    assert_eq!(run.replies[1]["conversation_id"], "c-2");
}
