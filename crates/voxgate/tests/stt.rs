//! Speech-to-text end to end over loopback: an OpenAI-compatible fixture that checks every
//! request strictly, a Deepgram-compatible WebSocket fixture, and backends that fail, hang or
//! drop the socket mid-utterance.

mod common;
mod stt_support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use common::*;
use futures_util::{SinkExt, StreamExt};
use stt_support::*;
use tokio_tungstenite::tungstenite::Message;
use voxgate::config::Config;

/// Metrics are process-wide; tests that read gauges run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// OpenAI-compatible fixture

#[derive(Clone, Copy, Debug, PartialEq)]
enum OaMode {
    Ok,
    Fail(u16),
    Hang,
}

/// One transcription request, as checked.
#[derive(Clone, Debug)]
struct OaRequest {
    samples: usize,
    model: String,
    language: Option<String>,
    prompt: Option<String>,
    auth: Option<String>,
}

#[derive(Clone)]
struct OpenAi {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<OaRequest>>>,
    attempts: Arc<Mutex<u64>>,
}

type OaState = (Arc<Mutex<Vec<OaRequest>>>, Arc<Mutex<u64>>, OaMode);

impl OpenAi {
    async fn start(mode: OaMode) -> Self {
        let got = Arc::new(Mutex::new(Vec::new()));
        let attempts = Arc::new(Mutex::new(0));
        let app = Router::new()
            .route("/v1/audio/transcriptions", post(transcribe))
            .with_state((got.clone(), attempts.clone(), mode));
        let addr = common::serve(app).await;
        Self {
            addr,
            got,
            attempts,
        }
    }
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    fn requests(&self) -> Vec<OaRequest> {
        self.got.lock().unwrap().clone()
    }
}

/// A multipart part: filename, content type, body.
type Part = (Option<String>, Option<String>, Vec<u8>);

/// Splits a multipart/form-data body strictly: every part has a name; returns
/// name -> (filename, content-type, body).
fn multipart(content_type: &str, body: &[u8]) -> HashMap<String, Part> {
    let boundary = content_type
        .strip_prefix("multipart/form-data; boundary=")
        .unwrap_or_else(|| panic!("not multipart/form-data: {content_type}"));
    let delim = format!("--{boundary}");
    let text = body;
    let mut parts = HashMap::new();
    let find = |hay: &[u8], needle: &[u8], from: usize| {
        hay[from..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
    };
    let mut pos = find(text, delim.as_bytes(), 0).expect("first boundary");
    loop {
        pos += delim.len();
        if text[pos..].starts_with(b"--") {
            break; // closing boundary
        }
        assert!(text[pos..].starts_with(b"\r\n"), "CRLF after boundary");
        pos += 2;
        let head_end = find(text, b"\r\n\r\n", pos).expect("part headers end");
        let head = std::str::from_utf8(&text[pos..head_end]).unwrap();
        let next = find(text, format!("\r\n{delim}").as_bytes(), head_end).expect("next boundary");
        let data = text[head_end + 4..next].to_vec();
        let mut name = None;
        let mut filename = None;
        let mut ctype = None;
        for line in head.split("\r\n") {
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("content-disposition:") {
                for attr in line.split(';').map(str::trim) {
                    if let Some(v) = attr.strip_prefix("name=") {
                        name = Some(v.trim_matches('"').to_owned());
                    }
                    if let Some(v) = attr.strip_prefix("filename=") {
                        filename = Some(v.trim_matches('"').to_owned());
                    }
                }
            } else if lower.starts_with("content-type:") {
                ctype = Some(line[13..].trim().to_owned());
            }
        }
        let name = name.expect("every part is named");
        assert!(
            parts
                .insert(name.clone(), (filename, ctype, data))
                .is_none(),
            "duplicate part {name}"
        );
        pos = next + 2;
    }
    parts
}

/// Checks a WAV strictly and returns its sample count.
fn check_wav(wav: &[u8]) -> usize {
    assert!(wav.len() >= 44, "WAV too short");
    assert_eq!(&wav[0..4], b"RIFF");
    assert_eq!(
        u32::from_le_bytes(wav[4..8].try_into().unwrap()) as usize,
        wav.len() - 8,
        "RIFF size"
    );
    assert_eq!(&wav[8..16], b"WAVEfmt ");
    let u16_at = |i: usize| u16::from_le_bytes(wav[i..i + 2].try_into().unwrap());
    let u32_at = |i: usize| u32::from_le_bytes(wav[i..i + 4].try_into().unwrap());
    assert_eq!(u32_at(16), 16, "fmt chunk size");
    assert_eq!(u16_at(20), 1, "PCM");
    assert_eq!(u16_at(22), 1, "mono");
    assert_eq!(u32_at(24), 16_000, "16 kHz");
    assert_eq!(u32_at(28), 32_000, "byte rate");
    assert_eq!(u16_at(32), 2, "block align");
    assert_eq!(u16_at(34), 16, "16-bit");
    assert_eq!(&wav[36..40], b"data");
    let data = u32_at(40) as usize;
    assert_eq!(data, wav.len() - 44, "data length matches the file");
    assert_eq!(data % 2, 0);
    data / 2
}

async fn transcribe(
    State((got, attempts, mode)): State<OaState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    *attempts.lock().unwrap() += 1;
    match mode {
        OaMode::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return StatusCode::OK.into_response();
        }
        OaMode::Fail(code) => return StatusCode::from_u16(code).unwrap().into_response(),
        OaMode::Ok => {}
    }
    let ct = headers["content-type"].to_str().unwrap();
    let parts = multipart(ct, &body);
    let (filename, ftype, wav) = parts.get("file").expect("file part");
    assert!(filename.as_deref().unwrap().ends_with(".wav"));
    assert_eq!(ftype.as_deref(), Some("audio/wav"));
    let samples = check_wav(wav);
    let text = |k: &str| {
        parts.get(k).map(|(f, _, v)| {
            assert!(f.is_none(), "{k} is a plain field");
            String::from_utf8(v.clone()).unwrap()
        })
    };
    assert_eq!(text("response_format").as_deref(), Some("json"));
    for k in parts.keys() {
        assert!(
            ["file", "model", "language", "prompt", "response_format"].contains(&k.as_str()),
            "unexpected part {k}"
        );
    }
    let req = OaRequest {
        samples,
        model: text("model").expect("model part"),
        language: text("language"),
        prompt: text("prompt"),
        auth: headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned()),
    };
    got.lock().unwrap().push(req);
    axum::Json(serde_json::json!({ "text": format!(" samples {samples} ") })).into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_backend_transcribes_every_utterance_in_order() {
    let _serial = SERIAL.lock().await;
    let oa = OpenAi::start(OaMode::Ok).await;
    let mut cfg = stt_config();
    let hook_rx = Receiver::start(Mode::Ok).await;
    let mut s = openai_cfg("whisper", &oa.url());
    s.transcript_webhook = Some(hook_rx.url("transcripts"));
    cfg.stt.push(s);
    let gw = Gateway::start(cfg).await;
    let run = stream(
        &gw.ws("/v1/listen?encoding=linear16&sample_rate=16000"),
        sentences(3),
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1000), "{:?}", run.close_reason);
    let ends = run.of_type("UtteranceEnd");
    assert!(
        ends.len() >= 2,
        "the medium speech has several utterances: {ends:?}"
    );
    let ts = transcripts(&run, "whisper");
    assert_eq!(ts.len(), ends.len(), "one final transcript per utterance");
    for (t, e) in ts.iter().zip(&ends) {
        assert_eq!(t["utterance"], e["utterance"], "in order");
        assert_eq!(t["is_final"], true);
        assert_eq!(t["start"], e["start"]);
        assert_eq!(t["end"], e["end"]);
        let len = e["end"].as_f64().unwrap() - e["start"].as_f64().unwrap();
        let expect = (len * 16_000.0).round() as u64;
        assert_eq!(
            t["text"],
            format!("samples {expect}"),
            "the WAV holds the utterance exactly"
        );
    }
    let reqs = oa.requests();
    assert_eq!(reqs.len(), ends.len());
    for r in &reqs {
        assert_eq!(r.model, "whisper-test");
        assert_eq!(r.language.as_deref(), Some("en"));
        assert_eq!(r.prompt.as_deref(), Some("North Wind"));
        assert_eq!(r.auth.as_deref(), Some("Bearer sk-test"));
    }
    let c = consumer(&run, "whisper");
    assert_eq!(c["kind"], "stt");
    assert_eq!(c["dropped_bytes"], 0);
    let delivered: u64 = reqs.iter().map(|r| r.samples as u64 * 2).sum();
    assert_eq!(c["delivered_bytes"].as_u64().unwrap(), delivered);
    // The transcript webhook got every final transcript.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let posted = hook_rx.got.lock().unwrap().clone();
    assert_eq!(posted.len(), ts.len());
    let mut seqs: Vec<u64> = posted
        .iter()
        .map(|p| {
            let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
            assert_eq!(v["backend"], "whisper");
            assert!(v["text"].as_str().unwrap().starts_with("samples "));
            v["sequence"].as_u64().unwrap()
        })
        .collect();
    seqs.sort();
    assert_eq!(seqs, (0..ts.len() as u64).collect::<Vec<_>>());
    let m = gw.metrics().await;
    assert!(
        metric_value(&m, "voxgate_stt_requests_total", "outcome=\"success\"") >= ends.len() as f64
    );
    assert!(
        m.contains("voxgate_stt_latency_seconds_bucket"),
        "latency histogram"
    );
    let ready = reqwest::get(format!("http://{}/readyz", gw.addr))
        .await
        .unwrap();
    assert!(ready.status().is_success());
    let text = ready.text().await.unwrap();
    assert!(text.contains("stt whisper (openai): ok"), "{text}");
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_and_client_finalize_yield_transcripts() {
    let _serial = SERIAL.lock().await;
    let oa = OpenAi::start(OaMode::Ok).await;
    let mut cfg = stt_config();
    cfg.segmenter.max_utterance_seconds = 2.0;
    cfg.stt.push(openai_cfg("whisper", &oa.url()));
    let gw = Gateway::start(cfg).await;
    let (ws, _) = tokio_tungstenite::connect_async(gw.ws("/v1/listen?encoding=linear16"))
        .await
        .unwrap();
    let (mut tx, mut rx) = ws.split();
    let msgs = pcm_messages("medium", Some(5.0));
    for m in &msgs[..30] {
        tx.send(Message::Binary(m.clone().into())).await.unwrap();
    }
    // Mid-speech: the client finalizes what it said so far.
    tx.send(Message::Text(r#"{"type":"Finalize"}"#.into()))
        .await
        .unwrap();
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Wait for the finalize transcript before closing.
    let mut finalized = None;
    while Instant::now() < deadline {
        let Some(Ok(Message::Text(t))) = rx.next().await else {
            break;
        };
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        if v["type"] == "UtteranceEnd" && v["reason"] == "finalize" {
            finalized = v["utterance"].as_u64();
        }
        let done = v["type"] == "Transcript" && v["utterance"].as_u64() == finalized;
        events.push(v);
        if done {
            break;
        }
    }
    tx.send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
        .await
        .unwrap();
    while let Some(Ok(Message::Text(t))) = rx.next().await {
        events.push(serde_json::from_str(&t).unwrap());
    }
    let ends: Vec<_> = events
        .iter()
        .filter(|e| e["type"] == "UtteranceEnd")
        .collect();
    let ts: Vec<_> = events
        .iter()
        .filter(|e| e["type"] == "Transcript")
        .collect();
    assert!(
        ends.iter().any(|e| e["reason"] == "limit"),
        "a 2 s limit finalization: {ends:?}"
    );
    assert!(ends.iter().any(|e| e["reason"] == "finalize"), "{ends:?}");
    for e in &ends {
        let t = ts
            .iter()
            .find(|t| t["utterance"] == e["utterance"])
            .unwrap_or_else(|| panic!("no transcript for {e}"));
        assert_eq!(t["is_final"], true);
        assert_eq!(t["start"], e["start"]);
        assert_eq!(t["end"], e["end"]);
    }
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_and_hanging_backends_warn_count_and_spare_other_sessions() {
    let _serial = SERIAL.lock().await;
    let good = OpenAi::start(OaMode::Ok).await;
    let bad = OpenAi::start(OaMode::Fail(500)).await;
    let hang = OpenAi::start(OaMode::Hang).await;
    let mut cfg = stt_config();
    let mut g = openai_cfg("good", &good.url());
    g.default = false;
    let mut b = openai_cfg("bad", &bad.url());
    b.default = false;
    b.max_retries = 2;
    let mut h = openai_cfg("hang", &hang.url());
    h.default = false;
    h.timeout_ms = 300;
    h.max_retries = 0;
    h.max_concurrency = 1;
    // Less than the speech: the hung backend's queue fills and audio is dropped, counted.
    h.max_buffer_seconds = 4.0;
    cfg.stt.extend([g, b, h]);
    let gw = Gateway::start(cfg).await;
    let msgs = sentences(4);
    let before = gw
        .metric("voxgate_dropped_bytes_total", "consumer=\"stt\"")
        .await;
    let url = |n: &str| gw.ws(&format!("/v1/listen?encoding=linear16&stt={n}"));
    let (url_good, url_bad, url_hang) = (url("good"), url("bad"), url("hang"));
    let (r_good, r_bad, r_hang) = tokio::join!(
        stream(&url_good, msgs.clone(), Duration::from_millis(5)),
        stream(&url_bad, msgs.clone(), Duration::from_millis(5)),
        stream(&url_hang, msgs.clone(), Duration::from_millis(5)),
    );
    for r in [&r_good, &r_bad, &r_hang] {
        assert_eq!(r.close_code, Some(1000), "{:?}", r.close_reason);
    }
    // The healthy session is unaffected.
    let ends = r_good.of_type("UtteranceEnd").len();
    assert_eq!(transcripts(&r_good, "good").len(), ends);
    assert_eq!(warnings(&r_good, "stt_unavailable"), 0);
    assert_eq!(consumer(&r_good, "good")["dropped_bytes"], 0);

    // 500: retried, then given up, warned once per outage, counted.
    assert!(transcripts(&r_bad, "bad").is_empty());
    assert_eq!(warnings(&r_bad, "stt_unavailable"), 1);
    let bad_ends = r_bad.of_type("UtteranceEnd").len() as u64;
    assert_eq!(
        *bad.attempts.lock().unwrap(),
        bad_ends * 3,
        "1 + 2 retries each"
    );
    assert!(consumer(&r_bad, "bad")["dropped_bytes"].as_u64().unwrap() > 0);
    assert_eq!(consumer(&r_bad, "bad")["delivered_bytes"], 0);

    // Hang: timeouts; the cap drops what cannot be held; ingest went on regardless.
    assert!(transcripts(&r_hang, "hang").is_empty());
    assert!(warnings(&r_hang, "stt_unavailable") >= 1);
    assert!(
        warnings(&r_hang, "stt_dropping") >= 1,
        "{:?}",
        r_hang.of_type("Warning")
    );
    assert!(consumer(&r_hang, "hang")["dropped_bytes"].as_u64().unwrap() > 0);
    // No utterance ends silently: each one dropped or timed out is named in an stt_lost.
    assert_all_lost(&r_hang);
    let decoded = r_hang.closed()["summary"]["seconds_decoded"]
        .as_f64()
        .unwrap();
    assert!(
        decoded > 25.0,
        "ingest never waited for the backend: {decoded}"
    );

    let after = gw
        .metric("voxgate_dropped_bytes_total", "consumer=\"stt\"")
        .await;
    assert!(after > before);
    assert_eq!(
        gw.metric("voxgate_buffered_bytes", "consumer=\"stt\"")
            .await,
        0.0,
        "memory released"
    );
    let text = reqwest::get(format!("http://{}/readyz", gw.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("stt bad (openai): failing"), "{text}");
    assert!(text.contains("last_error="), "{text}");
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_stt_name_is_refused() {
    let _serial = SERIAL.lock().await;
    let mut cfg = stt_config();
    cfg.stt.push(openai_cfg("whisper", "http://127.0.0.1:9"));
    let gw = Gateway::start(cfg).await;
    let run = stream(&gw.ws("/v1/listen?stt=nope"), vec![], Duration::ZERO).await;
    assert_eq!(run.close_code, Some(1008));
    assert_eq!(run.of_type("Error")[0]["code"], "unknown_stt");
    // `stt=` (empty) means none: no consumer at all.
    let run = stream(
        &gw.ws("/v1/listen?encoding=linear16&stt="),
        pcm_messages("short", Some(1.0)),
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1000));
    assert!(run.closed()["summary"]["consumers"]
        .as_array()
        .unwrap()
        .is_empty());
    gw.shutdown.cancel();
}

/// Sends `messages` paced by `gap`, with a silent pause (only client KeepAlives) after `pause_at`.
async fn stream_with_pause(
    url: &str,
    messages: Vec<Vec<u8>>,
    gap: Duration,
    pause_at: usize,
    pause: Duration,
) -> ClientRun {
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    let reader = tokio::spawn(async move {
        let mut run = ClientRun::default();
        while let Some(Ok(msg)) = rx.next().await {
            match msg {
                Message::Text(t) => run.events.push(serde_json::from_str(&t).unwrap()),
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
        run
    });
    for (i, m) in messages.into_iter().enumerate() {
        if i == pause_at {
            tokio::time::sleep(pause).await;
        }
        tx.send(Message::Binary(m.into())).await.unwrap();
        tokio::time::sleep(gap).await;
    }
    tx.send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .unwrap()
        .unwrap()
}

fn control_times(conn: &DgConn, kind: &str) -> Vec<Instant> {
    conn.log
        .iter()
        .filter(|(_, k)| k == kind)
        .map(|(t, _)| *t)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deepgram_backend_streams_keeps_alive_finalizes_and_closes() {
    let _serial = SERIAL.lock().await;
    let dg = Deepgram::start(None).await;
    let mut cfg = stt_config();
    let mut s = deepgram_cfg("dg", &dg.url());
    s.keepalive_seconds = 0.4;
    cfg.stt.push(s);
    let gw = Gateway::start(cfg).await;
    // 8 s of speech in real time (4x faster), with a 2 s pause of no audio in the middle.
    let msgs = pcm_messages("medium", Some(8.0));
    let run = stream_with_pause(
        &gw.ws("/v1/listen?encoding=linear16"),
        msgs,
        Duration::from_millis(25),
        40,
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(run.close_code, Some(1000), "{:?}", run.close_reason);
    let conns = dg.conns();
    assert_eq!(conns.len(), 1, "one connection, no reconnect");
    let c = &conns[0];
    for (k, v) in [
        ("encoding", "linear16"),
        ("sample_rate", "16000"),
        ("channels", "1"),
        ("interim_results", "true"),
        ("model", "nova-test"),
        ("language", "en-US"),
    ] {
        assert_eq!(c.query.get(k).map(String::as_str), Some(v), "query {k}");
    }
    assert_eq!(c.auth.as_deref(), Some("Token dg-key"));
    let decoded = run.closed()["summary"]["samples_decoded"].as_u64().unwrap();
    assert_eq!(c.samples, decoded, "every sample streamed once");

    // KeepAlive: only while no audio flows, about every keepalive_seconds.
    let ka = control_times(c, "KeepAlive");
    assert!(
        ka.len() >= 3,
        "KeepAlives during the 2 s pause: {}",
        ka.len()
    );
    for w in ka.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(350) && gap <= Duration::from_millis(900),
            "KeepAlive cadence {gap:?}"
        );
    }
    for t in &ka {
        let last_audio = c
            .log
            .iter()
            .rev()
            .filter(|(at, k)| k == "audio" && at < t)
            .map(|(at, _)| *at)
            .next()
            .unwrap();
        assert!(
            *t - last_audio >= Duration::from_millis(350),
            "KeepAlive while audio flowed"
        );
    }
    // A Finalize after each utterance end; CloseStream last.
    let ends = run.of_type("UtteranceEnd");
    assert!(!ends.is_empty());
    assert_eq!(control_times(c, "Finalize").len(), ends.len());
    assert_eq!(c.log.last().unwrap().1, "CloseStream");

    // Interim and final transcripts, attributed to utterances, in media time.
    let ts = transcripts(&run, "dg");
    assert!(ts
        .iter()
        .any(|t| t["is_final"] == false && t["text"] == "partial words"));
    let finals: Vec<_> = ts.iter().filter(|t| t["is_final"] == true).collect();
    assert!(finals.len() >= ends.len(), "{finals:?}");
    for e in &ends {
        assert!(
            finals.iter().any(|t| t["utterance"] == e["utterance"]),
            "a final transcript for utterance {}",
            e["utterance"]
        );
    }
    for t in &ts {
        let (s, e) = (t["start"].as_f64().unwrap(), t["end"].as_f64().unwrap());
        assert!(s <= e && e <= decoded as f64 / 16_000.0 + 1e-6, "{t}");
    }
    let cons = consumer(&run, "dg");
    assert_eq!(cons["dropped_bytes"], 0);
    assert_eq!(cons["delivered_bytes"].as_u64().unwrap(), decoded * 2);
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deepgram_socket_drop_mid_utterance_reconnects_and_resends() {
    let _serial = SERIAL.lock().await;
    // The first connection dies 1.5 s into the audio (inside the first utterance).
    let dg = Deepgram::start(Some(24_000)).await;
    let other = Deepgram::start(None).await;
    let mut cfg = stt_config();
    let mut a = deepgram_cfg("flaky", &dg.url());
    a.default = false;
    let mut b = deepgram_cfg("steady", &other.url());
    b.default = false;
    cfg.stt.extend([a, b]);
    let gw = Gateway::start(cfg).await;
    let msgs = pcm_messages("medium", Some(8.0));
    let url = |n: &str| gw.ws(&format!("/v1/listen?encoding=linear16&stt={n}"));
    let (url_flaky, url_steady) = (url("flaky"), url("steady"));
    let (run, run_other) = tokio::join!(
        stream(&url_flaky, msgs.clone(), Duration::from_millis(20)),
        stream(&url_steady, msgs, Duration::from_millis(20)),
    );
    assert_eq!(run.close_code, Some(1000), "{:?}", run.close_reason);
    let conns = dg.conns();
    assert!(conns.len() >= 2, "reconnected: {} connections", conns.len());
    assert_eq!(
        warnings(&run, "stt_unavailable"),
        1,
        "{:?}",
        run.of_type("Warning")
    );
    let decoded = run.closed()["summary"]["samples_decoded"].as_u64().unwrap();
    let streamed: u64 = conns.iter().map(|c| c.samples).sum();
    assert!(
        streamed > decoded,
        "unacknowledged audio was resent: {streamed} streamed of {decoded}"
    );
    // The second connection started with the audio of the interrupted utterance.
    let first_utt_start = run.of_type("SpeechStarted")[0]["timestamp"]
        .as_f64()
        .unwrap();
    let resent_from = decoded - conns[1..].iter().map(|c| c.samples).sum::<u64>();
    assert!(
        resent_from as f64 / 16_000.0 <= first_utt_start + 0.05 + 0.35,
        "resend starts near the utterance start ({resent_from} samples vs {first_utt_start} s)"
    );
    let ends = run.of_type("UtteranceEnd");
    let finals: Vec<_> = transcripts(&run, "flaky")
        .into_iter()
        .filter(|t| t["is_final"] == true)
        .collect();
    for e in &ends {
        assert!(
            finals.iter().any(|t| t["utterance"] == e["utterance"]),
            "a final transcript for utterance {} after the reconnect",
            e["utterance"]
        );
    }
    assert_eq!(
        consumer(&run, "flaky")["dropped_bytes"],
        0,
        "nothing lost within the cap"
    );
    // The other session never noticed.
    assert_eq!(warnings(&run_other, "stt_unavailable"), 0);
    assert_eq!(other.conns().len(), 1);
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deepgram_unreachable_drops_past_the_cap_and_counts() {
    let _serial = SERIAL.lock().await;
    // Nothing listens there: every connection attempt fails.
    let mut cfg: Config = stt_config();
    let mut s = deepgram_cfg("gone", "ws://127.0.0.1:9");
    s.max_buffer_seconds = 2.0;
    cfg.stt.push(s);
    cfg.server.close_flush_seconds = 1.0;
    let gw = Gateway::start(cfg).await;
    let run = stream(
        &gw.ws("/v1/listen?encoding=linear16"),
        pcm_messages("medium", Some(10.0)),
        Duration::from_millis(5),
    )
    .await;
    assert_eq!(run.close_code, Some(1000), "{:?}", run.close_reason);
    assert_eq!(warnings(&run, "stt_unavailable"), 1);
    let c = consumer(&run, "gone");
    assert_eq!(c["delivered_bytes"], 0);
    let decoded = run.closed()["summary"]["samples_decoded"].as_u64().unwrap();
    assert_eq!(
        c["dropped_bytes"].as_u64().unwrap(),
        decoded * 2,
        "all of it, counted"
    );
    assert_eq!(
        gw.metric("voxgate_buffered_bytes", "consumer=\"stt\"")
            .await,
        0.0
    );
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_on_connect_hook_chooses_the_speech_to_text_backends() {
    let _serial = SERIAL.lock().await;
    let oa_a = OpenAi::start(OaMode::Ok).await;
    let oa_b = OpenAi::start(OaMode::Ok).await;
    // The hook picks backends by the connect query's `pick` (a stand-in for a user's plan).
    let hook = Router::new().route(
        "/connect",
        post(
            |axum::Json(req): axum::Json<serde_json::Value>| async move {
                let pick = req["query"]["pick"].as_str().unwrap_or("").to_owned();
                let stt: Vec<&str> = pick.split(',').filter(|p| !p.is_empty()).collect();
                axum::Json(serde_json::json!({"allow": true, "stt": stt}))
            },
        ),
    );
    let hook_addr = common::serve(hook).await;
    let mut cfg = stt_config();
    cfg.stt.push(openai_cfg("a", &oa_a.url()));
    let mut b = openai_cfg("b", &oa_b.url());
    b.default = false;
    cfg.stt.push(b);
    cfg.on_connect = Some(voxgate::config::OnConnectConfig {
        url: format!("http://{hook_addr}/connect"),
        timeout_ms: 2000,
        max_webhooks: 8,
    });
    let gw = Gateway::start(cfg).await;
    let base = "/v1/listen?encoding=linear16&sample_rate=16000";
    // The hook's `b` wins over the query's `stt=a` and the default `a`.
    let run = stream(
        &gw.ws(&format!("{base}&pick=b&stt=a")),
        sentences(1),
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1000), "{}", run.close_reason);
    assert!(!transcripts(&run, "b").is_empty(), "b transcribed");
    assert!(transcripts(&run, "a").is_empty(), "a was not chosen");
    assert!(oa_a.requests().is_empty());
    // `[]`: no speech-to-text at all.
    let run = stream(
        &gw.ws(&format!("{base}&pick=")),
        sentences(1),
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1000));
    assert!(run.of_type("Transcript").is_empty());
    // A name that is not configured is refused.
    let run = stream(&gw.ws(&format!("{base}&pick=nope")), vec![], Duration::ZERO).await;
    assert_eq!(run.close_code, Some(1008));
    assert_eq!(run.of_type("Error")[0]["code"], "unknown_stt");
    assert!(oa_a.requests().is_empty());
    gw.shutdown.cancel();
}

/// Every utterance of a run whose backend never answers is named in an `stt_lost` warning.
fn assert_all_lost(run: &ClientRun) {
    let mut lost: Vec<u64> = run
        .of_type("Warning")
        .iter()
        .filter(|w| w["code"] == "stt_lost")
        .flat_map(|w| voxgate::fanout::stt::lost::lost_utterances(w["message"].as_str().unwrap()))
        .collect();
    lost.sort_unstable();
    let ended: Vec<u64> = run
        .of_type("UtteranceEnd")
        .iter()
        .map(|e| e["utterance"].as_u64().unwrap())
        .collect();
    assert_eq!(lost, ended, "every utterance is counted as lost");
}

/// Utterances still queued for a backend that never answers when the close flush ends are
/// counted and told as lost, not dropped silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn utterances_queued_at_the_end_of_the_flush_are_reported_lost() {
    let hang = OpenAi::start(OaMode::Hang).await;
    let mut cfg = stt_config();
    let mut h = openai_cfg("tiny", &hang.url());
    h.timeout_ms = 60_000;
    h.max_retries = 0;
    h.max_concurrency = 1;
    cfg.stt.push(h);
    cfg.server.close_flush_seconds = 1.0;
    let gw = Gateway::start(cfg).await;
    let run = stream(
        &gw.ws("/v1/listen?encoding=linear16&stt=tiny"),
        sentences(4),
        Duration::from_millis(5),
    )
    .await;
    assert_eq!(run.of_type("UtteranceEnd").len(), 4);
    let lost: Vec<String> = run
        .of_type("Warning")
        .iter()
        .filter(|w| w["code"] == "stt_lost")
        .map(|w| w["message"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        lost.iter().any(|m| m.contains("were not transcribed")),
        "one in flight, three queued, none answered: {lost:?}"
    );
}
