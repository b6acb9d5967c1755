//! OpenAI's Realtime API (transcription) on `/v1/realtime`, end to end over real sockets: the
//! handshake (401 with OpenAI's error body, the echoed `realtime` subprotocol and the browser's
//! key subprotocol), `session.created` / `session.updated`, server-VAD turns and client commits,
//! errors for malformed events with the session going on. Then OpenAI's official SDKs,
//! unmodified (Python `openai` 3 realtime client, Node `openai` 7 `OpenAIRealtimeWS`, which only
//! speaks `wss://`, so voxgate serves TLS), stream corpus speech to a gateway backed by a real
//! faster-whisper-server and must get the sentence back, with both kinds of turns.

mod common;
mod fws_support;

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use voxgate::config::{SttBackend, SttConfig};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(
    gw: &Gateway,
    headers: &[(&'static str, &str)],
) -> Result<(Ws, tungstenite::http::HeaderMap), tungstenite::Error> {
    let mut req = gw
        .ws("/v1/realtime?intent=transcription")
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        req.headers_mut()
            .insert(*k, HeaderValue::from_str(v).unwrap());
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
    Ok((ws, resp.headers().clone()))
}

/// The next server event (within 30 s).
async fn next(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("an event within 30 s")
            .expect("the socket is open")
            .unwrap();
        if let Message::Text(t) = msg {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// Events until one of type `kind` (included).
async fn until(ws: &mut Ws, kind: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let e = next(ws).await;
        let done = e["type"] == kind;
        seen.push(e);
        if done {
            return seen;
        }
    }
}

async fn send(ws: &mut Ws, event: Value) {
    ws.send(Message::Text(event.to_string().into()))
        .await
        .unwrap();
}

/// Appends 16 kHz PCM (`format.rate = 16000`) in 100 ms events.
async fn append(ws: &mut Ws, messages: &[Vec<u8>]) {
    for m in messages {
        let audio = base64::engine::general_purpose::STANDARD.encode(m);
        send(
            ws,
            json!({"type": "input_audio_buffer.append", "audio": audio}),
        )
        .await;
    }
}

fn update(turn_detection: Value) -> Value {
    json!({"type": "session.update", "event_id": "ev-1", "session": {
        "type": "transcription",
        "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 16000},
            "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
            "turn_detection": turn_detection,
        }},
    }})
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn server_vad_turns_become_committed_items() {
    let gw = Gateway::start(test_config()).await;
    let (mut ws, headers) = connect(&gw, &[("authorization", "Bearer k")])
        .await
        .unwrap();
    assert!(
        !headers.contains_key("sec-websocket-protocol"),
        "none offered"
    );
    let created = next(&mut ws).await;
    assert_eq!(created["type"], "session.created");
    assert_eq!(created["session"]["type"], "transcription");
    send(
        &mut ws,
        update(json!({"type": "server_vad", "silence_duration_ms": 500})),
    )
    .await;
    let updated = next(&mut ws).await;
    assert_eq!(updated["type"], "session.updated", "{updated}");
    assert_eq!(
        updated["session"]["audio"]["input"]["format"]["rate"],
        16000
    );
    let mut speech = pcm_messages("short", None);
    speech.extend(std::iter::repeat_n(vec![0u8; 3200], 15));
    append(&mut ws, &speech).await;
    // No backend here: each item completes with an empty transcript.
    let events = until(
        &mut ws,
        "conversation.item.input_audio_transcription.completed",
    )
    .await;
    assert_eq!(
        types(&events),
        [
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            "conversation.item.input_audio_transcription.completed",
        ]
    );
    let item = events[0]["item_id"].as_str().unwrap();
    assert!(events.iter().all(|e| e["item_id"] == item));
    assert!(events[0]["audio_start_ms"].as_u64().unwrap() < 500);
    assert!(events[1]["audio_end_ms"].as_u64().unwrap() > 4_000);
    assert_eq!(events[2]["previous_item_id"], Value::Null);
    assert_eq!(events[3]["usage"]["type"], "duration");
}

#[tokio::test]
async fn client_commits_and_malformed_events_get_errors_while_the_session_goes_on() {
    let mut cfg = test_config();
    cfg.realtime.max_append_bytes = 4_000;
    let gw = Gateway::start(cfg).await;
    let (mut ws, _) = connect(&gw, &[("authorization", "Bearer k")])
        .await
        .unwrap();
    until(&mut ws, "session.created").await;
    send(&mut ws, update(Value::Null)).await;
    until(&mut ws, "session.updated").await;
    // Nothing to commit yet: OpenAI's error, with the client's event id.
    send(
        &mut ws,
        json!({"type": "input_audio_buffer.commit", "event_id": "c-0"}),
    )
    .await;
    let e = next(&mut ws).await;
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["code"], "input_audio_buffer_commit_empty");
    assert_eq!(e["error"]["event_id"], "c-0");
    // Garbage, unknown events and oversized appends: each an error event, nothing closes.
    ws.send(Message::Text("{not json".into())).await.unwrap();
    send(
        &mut ws,
        json!({"type": "response.create", "event_id": "r-1"}),
    )
    .await;
    let big = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 6_000]);
    send(
        &mut ws,
        json!({"type": "input_audio_buffer.append", "audio": big}),
    )
    .await;
    send(
        &mut ws,
        json!({"type": "input_audio_buffer.append", "audio": "%%%"}),
    )
    .await;
    let bad = json!({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/flac"}}}}});
    send(&mut ws, bad).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        let e = next(&mut ws).await;
        assert_eq!(e["type"], "error", "{e}");
        got.push(e["error"]["code"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        got,
        [
            "invalid_json",
            "unknown_event",
            "append_too_large",
            "invalid_audio",
            "invalid_value"
        ]
    );
    // The session went on: speech, then a commit, makes a committed item.
    append(&mut ws, &pcm_messages("short", Some(2.0))).await;
    send(&mut ws, json!({"type": "input_audio_buffer.commit"})).await;
    let events = until(
        &mut ws,
        "conversation.item.input_audio_transcription.completed",
    )
    .await;
    assert_eq!(
        types(&events),
        [
            "input_audio_buffer.committed",
            "conversation.item.input_audio_transcription.completed"
        ],
        "client turns have no speech_started/stopped"
    );
    assert!(
        gw.metric("voxgate_client_errors_total", "code=\"append_too_large\"")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn keys_come_from_the_bearer_header_or_the_browser_subprotocol() {
    let gw = Gateway::start(keyed_config("good")).await;
    match connect(&gw, &[("authorization", "Bearer bad")]).await {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401);
            let body: Value = serde_json::from_slice(&resp.body().clone().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "invalid_api_key");
        }
        other => panic!("expected 401, got {other:?}"),
    }
    let offered = "realtime, openai-insecure-api-key.good, openai-beta.realtime-v1";
    let (mut ws, headers) = connect(&gw, &[("sec-websocket-protocol", offered)])
        .await
        .expect("the browser's key subprotocol is accepted");
    assert_eq!(headers["sec-websocket-protocol"], "realtime");
    assert_eq!(next(&mut ws).await["type"], "session.created");
}

// ------------------------------------------------------------------ OpenAI's own SDKs

/// A self-signed certificate for 127.0.0.1 (cert, key), written to `dir`.
fn certificate(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
    (c, k)
}

/// Runs an SDK client (`program script BASE KEY WAV MODE 2.0`) and returns its report.
async fn run_client(program: PathBuf, script: &str, base: &str, mode: &str, ca: &PathBuf) -> Value {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/realtime");
    let out = tokio::process::Command::new(program)
        .arg(dir.join(script))
        .args([base, "sdk-key"])
        .arg(corpus("source/short.wav"))
        .args([mode, "2.0"])
        .env("OAI_JS", tools("oai-js"))
        .env("NODE_EXTRA_CA_CERTS", ca)
        .output()
        .await
        .expect("the SDK client runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} {mode}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{script}: {e}: {stdout}"))
}

/// Every committed item completed, together the sentence, no error event.
fn check(client: &str, report: &Value, items: usize) {
    let completed = report["completed"].as_array().unwrap();
    let text: Vec<&str> = completed
        .iter()
        .map(|c| c["transcript"].as_str().unwrap())
        .collect();
    let text = text.join(" ");
    let reference = std::fs::read_to_string(corpus("source/short.txt")).unwrap();
    let wer = voxgate::cli::accuracy::wer::wer(&reference, &text);
    eprintln!("{client}: {text:?} (WER {wer:.3})");
    assert_eq!(
        report["committed"].as_array().unwrap().len(),
        items,
        "{client}: {report}"
    );
    assert_eq!(completed.len(), items, "{client}: {report}");
    assert!(wer <= 0.4, "{client}: {text:?}: WER {wer:.3}");
    let events: Vec<&str> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(
        !events.iter().any(|e| e.starts_with("error")),
        "{client}: {events:?}"
    );
}

/// Both SDKs, both kinds of turns, one after the other against one Whisper server (behind
/// TLS, which the Node client requires; the Python one goes plain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdks_stream_corpus_speech_and_get_the_sentence() {
    let installed =
        tools("oai/bin/python").exists() && tools("oai-js/node_modules/openai").exists();
    if !installed {
        let optional = std::env::var("INTEROP_OPTIONAL").is_ok_and(|v| v == "1");
        assert!(
            optional,
            "OpenAI's SDKs are not installed: run `scripts/deps oai`"
        );
        eprintln!(
            "\n*** SKIPPED: OpenAI SDKs not installed (scripts/deps oai); INTEROP_OPTIONAL=1 ***\n"
        );
        return;
    }
    let Some(fws) = fws_support::start_fws().await else {
        return;
    };
    let dir = tempfile_dir();
    let (cert, key) = certificate(&dir);
    let mut cfg = keyed_config("sdk-key");
    cfg.server.close_flush_seconds = 30.0;
    let mut s = SttConfig::new("whisper", SttBackend::Openai, &fws.url);
    s.aliases = vec!["gpt-4o-transcribe".into()];
    s.timeout_ms = 60_000;
    cfg.stt.push(s);
    let plain = Gateway::start(cfg.clone()).await;
    cfg.server.tls_cert_file = Some(cert.display().to_string());
    cfg.server.tls_key_file = Some(key.display().to_string());
    let tls = Gateway::start(cfg).await;
    let py = tools("oai/bin/python");
    let base = format!("http://{}", plain.addr);
    let report = run_client(py.clone(), "sdk_client.py", &base, "vad", &cert).await;
    check("openai (Python), server_vad", &report, 1);
    let report = run_client(py, "sdk_client.py", &base, "commit", &cert).await;
    check("openai (Python), commits", &report, 2);
    let base = format!("https://{}", tls.addr);
    let node = PathBuf::from("node");
    let report = run_client(node.clone(), "sdk_client.mjs", &base, "vad", &cert).await;
    check("openai (Node, wss), server_vad", &report, 1);
    let report = run_client(node, "sdk_client.mjs", &base, "commit", &cert).await;
    check("openai (Node, wss), commits", &report, 2);
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("voxgate-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
