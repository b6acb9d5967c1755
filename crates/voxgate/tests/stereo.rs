//! Stereo calls as two parties, end to end over real sockets with the embedded Whisper
//! recognizer: two different corpus sentences spoken at once, one on each channel of a jambonz
//! `mixType=stereo` call (and of a FreeSWITCH audio fork with `channels=2`), come out as two
//! parties, and a per-party speech-to-text consumer (`parties=caller,agent`) transcribes each
//! with the right `party` label, while the audio webhook still receives the mix.
//! Needs `--features whisper` and `scripts/deps whisper` (the tiny.en model).
#![cfg(feature = "whisper")]

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use voxgate::cli::carrier::{self, Frame};
use voxgate::cli::device;
use voxgate::config::{SttBackend, SttConfig, WebhookConfig};
use voxgate::ingest::request::Carrier;

/// The corpus short sentence at 16 kHz, in samples (the longer of the two parties).
const SHORT_16K_WAV: u64 = 89_710;

/// A gateway with the embedded Whisper backend (its final transcripts posted to `transcripts`)
/// and an audio webhook `calls`.
async fn gateway() -> (Gateway, Receiver) {
    let rx = Receiver::start(Mode::Ok).await;
    let mut cfg = test_config();
    // Both parties' utterances end at the hang-up; the close waits for their transcripts
    // (Whisper on a loaded test machine takes seconds per utterance).
    cfg.server.close_flush_seconds = 120.0;
    let mut s = SttConfig::new("whisper", SttBackend::Whisper, "");
    let dir = tools("whisper/tiny.en");
    assert!(dir.join("model.bin").exists(), "run scripts/deps whisper");
    s.model_dir = Some(dir.display().to_string());
    s.timeout_ms = 120_000;
    s.transcript_webhook = Some(rx.url("transcripts"));
    cfg.stt.push(s);
    let mut w = WebhookConfig::new("calls", &rx.url("calls"), Some(5.0));
    w.default = false;
    cfg.webhooks.push(w);
    (Gateway::start(cfg).await, rx)
}

/// The caller says the short sentence; the agent, at the same time, the start of the medium
/// text ("The North Wind and the Sun were disputing which was the stronger, ...") for as long.
fn two_parties() -> (u32, Vec<i16>, Vec<i16>) {
    let (rate, caller) = device::read_wav(&corpus("source/short.wav")).unwrap();
    let (_, mut agent) = device::read_wav(&corpus("source/medium.wav")).unwrap();
    agent.truncate(caller.len());
    (rate, caller, agent)
}

/// Sends the frames offering `protocol` (the last one the carrier's close), then reads until the
/// gateway closes too; returns the gateway's warnings and errors.
async fn replay(url: &str, protocol: &str, frames: Vec<Frame>) -> Vec<String> {
    let mut request = url.into_client_request().unwrap();
    let offered = protocol.parse().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", offered);
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    for f in frames {
        let msg = match f {
            Frame::Text(t) => Message::Text(t.into()),
            Frame::Binary(b) => Message::Binary(b.into()),
            Frame::Close => Message::Close(None),
        };
        tx.send(msg).await.unwrap();
    }
    let read = async {
        let mut problems = Vec::new();
        while let Some(Ok(msg)) = rx.next().await {
            match msg {
                Message::Text(t) if !t.contains(r#""type":"Closed""#) => {
                    problems.push(t.to_string())
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        problems
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .unwrap()
}

/// The final transcripts of session `id` once both parties have one (or the wait ran out).
async fn transcripts(rx: &Receiver, id: &str) -> Vec<serde_json::Value> {
    let docs = || -> Vec<serde_json::Value> {
        rx.requests("transcripts")
            .iter()
            .map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap())
            .filter(|d| d["session_id"] == id)
            .collect()
    };
    for _ in 0..600 {
        let got = docs();
        let has = |p: &str| got.iter().any(|d| d["party"] == p);
        if has("caller") && has("agent") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    docs()
}

/// The words one party's transcripts hold, lowercased.
fn words_of(docs: &[serde_json::Value], party: &str) -> Vec<String> {
    let text: Vec<&str> = docs
        .iter()
        .filter(|d| d["party"] == party)
        .filter_map(|d| d["text"].as_str())
        .collect();
    text.join(" ")
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn stereo_call_is_two_parties(c: Carrier, protocol: &str, query: &str) {
    let (gw, rx) = gateway().await;
    let (rate, caller, agent) = two_parties();
    let id = format!("stereo-{}", c.as_str());
    let url = gw.ws(&format!(
        "/v1/{}?stt=whisper&parties=caller,agent&consumers=calls&session_id={id}{query}",
        c.as_str()
    ));
    let call = carrier::stereo_call(c, rate, &caller, &agent, &[]).unwrap();
    let frames = call.frames.into_iter().map(|t| t.frame).collect();
    let problems = replay(&url, protocol, frames).await;
    assert!(problems.is_empty(), "{problems:?}");
    let docs = transcripts(&rx, &id).await;
    eprintln!("{} transcripts: {docs:?}", c.as_str());
    let (heard_caller, heard_agent) = (words_of(&docs, "caller"), words_of(&docs, "agent"));
    let has = |words: &[String], w: &str| words.iter().any(|x| x == w);
    assert!(
        ["fox", "dog", "river"]
            .iter()
            .any(|w| has(&heard_caller, w)),
        "the caller's sentence in the caller's transcripts: {heard_caller:?}"
    );
    assert!(
        ["north", "wind", "sun"]
            .iter()
            .any(|w| has(&heard_agent, w)),
        "the agent's sentence in the agent's transcripts: {heard_agent:?}"
    );
    assert!(
        !["north", "wind"].iter().any(|w| has(&heard_caller, w)),
        "the agent is not in the caller's transcripts: {heard_caller:?}"
    );
    assert!(
        !["fox", "dog"].iter().any(|w| has(&heard_agent, w)),
        "the caller is not in the agent's transcripts: {heard_agent:?}"
    );
    assert!(
        docs.iter().all(|d| d["party"].is_string()),
        "only the parties were asked for: {docs:?}"
    );
    // The audio webhook still takes the mix, whole.
    for _ in 0..100 {
        let samples: u64 = rx.requests("calls").iter().map(|r| r.samples).sum();
        if samples >= SHORT_16K_WAV {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mix: u64 = rx.requests("calls").iter().map(|r| r.samples).sum();
    assert_eq!(mix, SHORT_16K_WAV, "the mix reaches the audio webhook");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jambonz_stereo_call_is_transcribed_per_party() {
    // docs.jambonz.org verbs/listen: `mixType: "stereo"` sends the caller's audio on the left
    // channel and the called party's on the right, interleaved L16, after the metadata frame.
    stereo_call_is_two_parties(Carrier::Jambonz, "audio.jambonz.org", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_fork_stereo_call_is_transcribed_per_party() {
    // drachtio-freeswitch-modules mod_audio_fork README: mix-type `stereo` forks the caller
    // (read) and callee (write) as two interleaved L16 channels; the rate and channel count are
    // the fork command's, given here in the URL.
    let query = "&sample_rate=16000&channels=2";
    stereo_call_is_two_parties(Carrier::AudioFork, "audio.drachtio.org", query).await;
}
