//! Deepgram's live API on `/v1/listen`, end to end over real sockets: the dialect rule, the
//! handshake (401, 503 + `Retry-After`, 400, the echoed subprotocol, `dg-request-id`), Deepgram's
//! message shapes, `Finalize`/`CloseStream`, `endpointing`, and voxgate's own consumers still
//! serving these sessions. Then Deepgram's official SDKs, unmodified (Python `deepgram-sdk` 7,
//! JS `@deepgram/sdk` 5 in Node; `scripts/deps dg`), stream corpus speech to a gateway backed
//! by a real faster-whisper-server (`scripts/deps fws`) and must get the sentence back.

mod common;
mod fws_support;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use voxgate::config::{SttBackend, SttConfig, WebhookConfig};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const QUERY: &str = "model=nova-3&encoding=linear16&sample_rate=16000&channels=1";

/// Connects to `path_and_query` with `headers`; the socket and the handshake's response
/// headers, or the refused handshake's error.
async fn connect(
    gw: &Gateway,
    path_and_query: &str,
    headers: &[(&'static str, &str)],
) -> Result<(Ws, tungstenite::http::HeaderMap), tungstenite::Error> {
    let mut req = gw.ws(path_and_query).into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut()
            .insert(*k, HeaderValue::from_str(v).unwrap());
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
    Ok((ws, resp.headers().clone()))
}

/// Everything the server sends until it closes: JSON messages and the close code.
async fn read_all(ws: &mut Ws) -> (Vec<Value>, Option<u16>) {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("the server closes within 60 s");
        match msg {
            Some(Ok(Message::Text(t))) => got.push(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(frame))) => return (got, frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (got, None),
        }
    }
}

async fn send_pcm(ws: &mut Ws, messages: &[Vec<u8>]) {
    for m in messages {
        ws.send(Message::Binary(m.clone().into())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.into())).await.unwrap();
}

fn of_type<'a>(got: &'a [Value], kind: &str) -> Vec<&'a Value> {
    got.iter().filter(|m| m["type"] == kind).collect()
}

#[tokio::test]
async fn a_deepgram_client_gets_deepgram_messages_and_voxgate_still_serves_the_session() {
    let rx = Receiver::start(Mode::Ok).await;
    let mut cfg = test_config();
    cfg.webhooks
        .push(WebhookConfig::new("audio", &rx.url("audio"), Some(0.0)));
    let gw = Gateway::start(cfg).await;
    let q =
        format!("/v1/listen?{QUERY}&vad_events=true&utterance_end_ms=1000&punctuate=true&tag=x");
    let (mut ws, headers) = connect(&gw, &q, &[("authorization", "Token any-key")])
        .await
        .expect("a Deepgram client connects");
    let request_id = headers["dg-request-id"].to_str().unwrap().to_owned();
    let speech = pcm_messages("short", None);
    // One second into the sentence (speaking), the client asks for a final.
    send_pcm(&mut ws, &speech[..10]).await;
    send_text(&mut ws, r#"{"type":"Finalize"}"#).await;
    send_pcm(&mut ws, &speech[10..]).await;
    send_text(&mut ws, r#"{"type":"KeepAlive"}"#).await;
    send_text(&mut ws, r#"{"type":"CloseStream"}"#).await;
    let (got, code) = read_all(&mut ws).await;
    assert_eq!(code, Some(1000), "{got:#?}");
    let kinds: Vec<&str> = got.iter().map(|m| m["type"].as_str().unwrap()).collect();
    assert!(
        kinds
            .iter()
            .all(|k| ["Results", "SpeechStarted", "UtteranceEnd", "Metadata"].contains(k)),
        "only Deepgram's message types: {kinds:?}"
    );
    assert!(
        !of_type(&got, "SpeechStarted").is_empty(),
        "vad_events=true"
    );
    let results = of_type(&got, "Results");
    let finalized = results
        .iter()
        .filter(|r| r["from_finalize"] == true)
        .count();
    assert_eq!(finalized, 1, "the Finalize is answered once: {results:#?}");
    assert!(
        results.iter().any(|r| r["speech_final"] == true),
        "the end of speech is speech_final"
    );
    for r in &results {
        assert_eq!(r["metadata"]["request_id"], request_id.as_str());
        assert!(r["channel"]["alternatives"][0]["words"].is_array());
        assert_eq!(r["channel_index"], serde_json::json!([0, 1]));
    }
    assert!(
        !of_type(&got, "UtteranceEnd").is_empty(),
        "utterance_end_ms given"
    );
    let meta = got.last().unwrap();
    assert_eq!(meta["type"], "Metadata", "CloseStream ends with Metadata");
    assert_eq!(meta["request_id"], request_id.as_str());
    assert!(meta["duration"].as_f64().unwrap() > 5.0);
    // voxgate's consumers still serve the session: the audio webhook got the audio.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let samples: u64 = rx.requests("audio").iter().map(|r| r.samples).sum();
    assert!(samples >= 5 * 16_000, "audio webhook got {samples} samples");
    // (The metrics recorder is shared by the tests of this binary.)
    assert!(
        gw.metric("voxgate_sessions_total", "endpoint=\"deepgram\"")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn a_finalize_with_nothing_open_is_answered_at_once_and_voxgate_clients_keep_their_protocol()
{
    let gw = Gateway::start(test_config()).await;
    let (mut ws, _) = connect(
        &gw,
        &format!("/v1/listen?{QUERY}"),
        &[("x-deepgram-session-id", "s-1")],
    )
    .await
    .unwrap();
    send_text(&mut ws, r#"{"type":"Finalize"}"#).await;
    let first = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("answered at once")
        .unwrap()
        .unwrap();
    let v: Value = serde_json::from_str(first.to_text().unwrap()).unwrap();
    assert_eq!(v["type"], "Results");
    assert_eq!(v["from_finalize"], true);
    assert_eq!(v["is_final"], true);
    assert_eq!(v["channel"]["alternatives"][0]["transcript"], "");
    // The same path without Deepgram's credentials speaks voxgate's protocol.
    let (mut vox, headers) = connect(&gw, &format!("/v1/listen?{QUERY}"), &[])
        .await
        .unwrap();
    assert!(!headers.contains_key("dg-request-id"));
    send_pcm(&mut vox, &pcm_messages("short", Some(0.5))).await;
    send_text(&mut vox, r#"{"type":"CloseStream"}"#).await;
    let (got, _) = read_all(&mut vox).await;
    assert_eq!(got[0]["type"], "Started", "{got:?}");
    assert_eq!(got.last().unwrap()["type"], "Closed");
}

/// The refused handshake's status, headers and JSON body.
fn refused(e: tungstenite::Error) -> (u16, tungstenite::http::HeaderMap, Value) {
    match e {
        tungstenite::Error::Http(resp) => {
            let body = resp.body().clone().unwrap_or_default();
            (
                resp.status().as_u16(),
                resp.headers().clone(),
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            )
        }
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn handshakes_are_answered_the_way_deepgram_clients_expect() {
    let mut cfg = keyed_config("good-key");
    cfg.server.max_sessions = 1;
    let gw = Gateway::start(cfg).await;
    let path = format!("/v1/listen?{QUERY}");
    // A wrong key: 401 with a Deepgram-style body, before any upgrade.
    let e = connect(&gw, &path, &[("authorization", "Token bad-key")])
        .await
        .unwrap_err();
    let (status, headers, body) = refused(e);
    assert_eq!(status, 401);
    assert_eq!(body["err_code"], "INVALID_AUTH");
    assert!(headers.contains_key("dg-request-id"));
    // The browser form: the key in the subprotocol pair, and `token` echoed.
    let (mut ws, headers) = connect(&gw, &path, &[("sec-websocket-protocol", "token, good-key")])
        .await
        .expect("a configured key in the subprotocol is accepted");
    assert_eq!(headers["sec-websocket-protocol"], "token");
    // At capacity: 503 with Retry-After (a 4xx would make Pipecat give up for good).
    let e = connect(&gw, &path, &[("authorization", "Token good-key")])
        .await
        .unwrap_err();
    let (status, headers, _) = refused(e);
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    send_text(&mut ws, r#"{"type":"CloseStream"}"#).await;
    let (_, code) = read_all(&mut ws).await;
    assert_eq!(code, Some(1000));
    // A malformed parameter is the request's fault: 400.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let bad = format!("{path}&endpointing=soon");
    let e = connect(&gw, &bad, &[("authorization", "Token good-key")])
        .await
        .unwrap_err();
    assert_eq!(refused(e).0, 400);
    assert!(
        gw.metric("voxgate_sessions_rejected_total", "reason=\"unauthorized\"")
            .await
            >= 1.0
    );
}

/// Finals of a Deepgram session of two sentences 1.5 s apart, with `extra` query parameters.
async fn finals_of_two_sentences(extra: &str) -> Vec<Value> {
    let gw = Gateway::start(test_config()).await;
    let q = format!("/v1/listen?{QUERY}{extra}");
    let (mut ws, _) = connect(&gw, &q, &[("authorization", "Token k")])
        .await
        .unwrap();
    let mut speech = Vec::new();
    for _ in 0..2 {
        speech.extend(pcm_messages("short", None));
        speech.extend(std::iter::repeat_n(vec![0u8; 3200], 15));
    }
    send_pcm(&mut ws, &speech).await;
    send_text(&mut ws, r#"{"type":"CloseStream"}"#).await;
    let (got, _) = read_all(&mut ws).await;
    got.into_iter()
        .filter(|m| m["type"] == "Results" && m["is_final"] == true)
        .collect()
}

#[tokio::test]
async fn endpointing_sets_the_silence_that_ends_an_utterance() {
    let default = finals_of_two_sentences("").await;
    assert!(
        default.len() >= 2,
        "each sentence ends by silence: {default:#?}"
    );
    assert!(default.iter().all(|r| r["speech_final"] == true));
    // endpointing=false: only the end of the stream cuts the one utterance.
    let off = finals_of_two_sentences("&endpointing=false").await;
    assert_eq!(off.len(), 1, "{off:#?}");
    // 3 s is more than the pause (the sentence's own trailing quiet and 1.5 s): one again.
    let long = finals_of_two_sentences("&endpointing=3000").await;
    assert_eq!(long.len(), 1, "{long:#?}");
}

// ------------------------------------------------------------------ Deepgram's own SDKs

/// A gateway whose `nova-3` is a real faster-whisper-server; `None` when skipped.
async fn whisper_gateway() -> Option<(Gateway, fws_support::Fws)> {
    let sdks =
        tools("dg/bin/python").exists() && tools("dg-js/node_modules/@deepgram/sdk").exists();
    if !sdks {
        let optional = std::env::var("INTEROP_OPTIONAL").is_ok_and(|v| v == "1");
        assert!(
            optional,
            "Deepgram's SDKs are not installed: run `scripts/deps dg`"
        );
        eprintln!("\n*** SKIPPED: Deepgram SDKs not installed (scripts/deps dg); INTEROP_OPTIONAL=1 ***\n");
        return None;
    }
    let fws = fws_support::start_fws().await?;
    let mut cfg = keyed_config("sdk-key");
    // Whisper on shared CI cores may take a while for the last utterance.
    cfg.server.close_flush_seconds = 30.0;
    let mut s = SttConfig::new("whisper", SttBackend::Openai, &fws.url);
    s.aliases = vec!["nova-3".into()];
    s.timeout_ms = 60_000;
    cfg.stt.push(s);
    Some((Gateway::start(cfg).await, fws))
}

/// Runs an SDK client (`program args... URL KEY WAV FINALIZE_AT`) and returns its report.
async fn run_client(program: PathBuf, script: &str, gw: &Gateway) -> Value {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/deepgram");
    let out = tokio::process::Command::new(program)
        .arg(dir.join(script))
        .arg(format!("ws://{}", gw.addr))
        .arg("sdk-key")
        .arg(corpus("source/short.wav"))
        .arg("2.0")
        .env("DG_JS", tools("dg-js"))
        .output()
        .await
        .expect("the SDK client runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{script}: {e}: {stdout}"))
}

/// What both SDKs must have parsed: finals that carry the sentence, one `from_finalize`
/// final for the mid-stream `Finalize`, and `Metadata` for `CloseStream`.
fn check_sdk_report(script: &str, report: &Value) {
    let messages = report["messages"].as_array().unwrap();
    let finals: Vec<&Value> = messages
        .iter()
        .filter(|m| m["type"] == "Results" && m["is_final"] == true)
        .collect();
    let text: Vec<&str> = finals
        .iter()
        .filter_map(|m| m["transcript"].as_str())
        .collect();
    let text = text.join(" ");
    let reference = std::fs::read_to_string(corpus("source/short.txt")).unwrap();
    let wer = voxgate::cli::accuracy::wer::wer(&reference, &text);
    eprintln!("{script}: {text:?} (WER {wer:.3})");
    assert!(
        wer <= 0.4,
        "{script}: {text:?} against {reference:?}: WER {wer:.3}"
    );
    assert!(
        finals.iter().any(|m| m["from_finalize"] == true),
        "{script}: a from_finalize final: {messages:#?}"
    );
    assert_eq!(
        messages.last().unwrap()["type"],
        "Metadata",
        "{script}: {messages:#?}"
    );
}

/// Both SDKs in one test, one after the other, against one Whisper server (two servers at once
/// on two cores made the finals miss the close flush).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deepgram_sdks_stream_corpus_speech_and_get_the_sentence() {
    let Some((gw, _fws)) = whisper_gateway().await else {
        return;
    };
    let report = run_client(tools("dg/bin/python"), "sdk_client.py", &gw).await;
    assert_eq!(
        report["sdk_warnings"],
        serde_json::json!([]),
        "the SDK parsed every message"
    );
    check_sdk_report("deepgram-sdk (Python)", &report);
    let report = run_client(PathBuf::from("node"), "sdk_client.mjs", &gw).await;
    assert_eq!(report["close_code"], 1000);
    check_sdk_report("@deepgram/sdk (Node)", &report);
}
