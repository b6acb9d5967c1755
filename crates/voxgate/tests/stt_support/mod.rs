//! Speech-to-text test support shared by the `stt*` tests: a Deepgram-compatible WebSocket
//! fixture whose answers to `Finalize` and `CloseStream` (and its endpointing, its socket drops)
//! are chosen per test, and helpers to read a client's run.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message as AxMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use voxgate::config::{Config, SttBackend, SttConfig};

use crate::common::*;

/// The corpus short sentence `n` times with 1.5 s of silence after each: `n` utterances, as
/// 100 ms PCM16 messages.
pub fn sentences(n: usize) -> Vec<Vec<u8>> {
    let one: Vec<u8> = pcm_messages("short", None).concat();
    let mut all = Vec::new();
    for _ in 0..n {
        all.extend_from_slice(&one);
        all.extend(std::iter::repeat_n(0u8, 48_000));
    }
    all.chunks(3200).map(<[u8]>::to_vec).collect()
}

/// A gateway config whose segmenter splits the corpus speech at its sentence pauses.
pub fn stt_config() -> Config {
    let mut cfg = test_config();
    cfg.segmenter.silence_ms = 250;
    cfg
}

pub fn openai_cfg(name: &str, url: &str) -> SttConfig {
    let mut s = SttConfig::new(name, SttBackend::Openai, url);
    s.model = Some("whisper-test".into());
    s.language = Some("en".into());
    s.prompt = Some("North Wind".into());
    s.api_key = Some("sk-test".into());
    s.backoff_initial_ms = 20;
    s.backoff_max_ms = 100;
    s
}

/// Transcripts of one backend, by utterance.
pub fn transcripts<'a>(run: &'a ClientRun, backend: &str) -> Vec<&'a serde_json::Value> {
    run.of_type("Transcript")
        .into_iter()
        .filter(|t| t["backend"] == backend)
        .collect()
}

pub fn consumer<'a>(run: &'a ClientRun, name: &str) -> &'a serde_json::Value {
    run.closed()["summary"]["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no consumer {name} in {:?}", run.closed()))
}

pub fn warnings(run: &ClientRun, code: &str) -> usize {
    run.of_type("Warning")
        .iter()
        .filter(|w| w["code"] == code)
        .count()
}

// ---------------------------------------------------------------------------------------------
// Deepgram-compatible fixture

/// What one connection saw.
#[derive(Debug, Default, Clone)]
pub struct DgConn {
    pub query: HashMap<String, String>,
    pub auth: Option<String>,
    /// (time, "audio" | control type), in order.
    pub log: Vec<(Instant, String)>,
    pub samples: u64,
}

/// How the fixture answers `Finalize`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum OnFinalize {
    /// A final result with `from_finalize: true` and words (Deepgram).
    #[default]
    Answer,
    /// A final result with `from_finalize: true` and no words.
    AnswerEmpty,
    /// Nothing at all (Deepgram may not answer when little audio is buffered).
    Ignore,
    /// `{"type":"Error",...}` and a 4400 close (WhisperLiveKit).
    Refuse,
}

/// How the fixture answers `CloseStream`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum OnCloseStream {
    /// A final result for what is left, then a normal close.
    #[default]
    Flush,
    /// Nothing, and the socket stays open.
    Hang,
}

/// The fixture's behaviour.
#[derive(Debug, Clone, Copy, Default)]
pub struct DgBehavior {
    /// The first connection is dropped after this many samples (mid-utterance).
    pub drop_first_after: Option<u64>,
    /// Connections after the first are refused (HTTP 503).
    pub only_first: bool,
    pub finalize: OnFinalize,
    pub close_stream: OnCloseStream,
    /// Endpointing: a final result for the audio so far every this many samples.
    pub endpoint_every: Option<u64>,
    /// No interim results.
    pub no_interims: bool,
    /// A WebSocket ping before anything else (uvicorn pings every 20 s).
    pub ping_first: bool,
    /// The flush after `CloseStream` has no words when the audio since the last final result
    /// was all silence (zero samples), as a real recognizer hears it.
    pub silence_is_empty: bool,
}

#[derive(Clone)]
pub struct Deepgram {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<DgConn>>>,
}

#[derive(Clone)]
struct DgState {
    conns: Arc<Mutex<Vec<DgConn>>>,
    behavior: DgBehavior,
}

impl Deepgram {
    /// A Deepgram-like fixture; the first connection may be dropped after `drop_first_after`
    /// samples.
    pub async fn start(drop_first_after: Option<u64>) -> Self {
        Self::with(DgBehavior {
            drop_first_after,
            ..Default::default()
        })
        .await
    }

    pub async fn with(behavior: DgBehavior) -> Self {
        let conns = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route("/v1/listen", get(dg_listen))
            .with_state(DgState {
                conns: conns.clone(),
                behavior,
            });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, conns }
    }
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }
    pub fn conns(&self) -> Vec<DgConn> {
        self.conns.lock().unwrap().clone()
    }
    /// Control messages of `kind` over every connection.
    pub fn count(&self, kind: &str) -> usize {
        self.conns()
            .iter()
            .map(|c| c.log.iter().filter(|(_, k)| k == kind).count())
            .sum()
    }
}

async fn dg_listen(
    State(st): State<DgState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let auth = headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_owned());
    let index = {
        let mut conns = st.conns.lock().unwrap();
        if st.behavior.only_first && !conns.is_empty() {
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        conns.push(DgConn {
            query,
            auth,
            ..Default::default()
        });
        conns.len() - 1
    };
    let mut behavior = st.behavior;
    if index > 0 {
        behavior.drop_first_after = None;
    }
    ws.on_upgrade(move |socket| dg_session(socket, st.conns, index, behavior))
}

pub fn results(start: f64, end: f64, text: &str, is_final: bool, from_finalize: bool) -> AxMessage {
    AxMessage::Text(
        serde_json::json!({
            "type": "Results",
            "channel_index": [0, 1],
            "start": start,
            "duration": end - start,
            "is_final": is_final,
            "speech_final": from_finalize,
            "from_finalize": from_finalize,
            "channel": {"alternatives": [{"transcript": text, "confidence": 0.9}]},
        })
        .to_string()
        .into(),
    )
}

/// One connection's state.
struct DgSession {
    samples: u64,
    final_end: u64,
    next_interim: u64,
    finals: u32,
    /// A non-zero sample arrived since the last final result.
    heard: bool,
}

fn secs(s: u64) -> f64 {
    s as f64 / 16_000.0
}

impl DgSession {
    /// A final result for the audio since the last one.
    fn final_result(&mut self, text: &str, from_finalize: bool) -> AxMessage {
        self.finals += 1;
        let text = text.replace('#', &self.finals.to_string());
        let m = results(
            secs(self.final_end),
            secs(self.samples),
            &text,
            true,
            from_finalize,
        );
        self.final_end = self.samples;
        self.heard = false;
        m
    }

    /// What to answer `n` bytes of audio with.
    fn on_audio(&mut self, n: usize, b: &DgBehavior) -> Option<AxMessage> {
        self.samples += n as u64 / 2;
        if b.endpoint_every
            .is_some_and(|e| self.samples - self.final_end >= e)
        {
            return Some(self.final_result("words #", false));
        }
        if !b.no_interims && self.samples >= self.next_interim {
            self.next_interim += 8_000;
            return Some(results(
                secs(self.final_end),
                secs(self.samples),
                "partial words",
                false,
                false,
            ));
        }
        None
    }
}

async fn dg_session(
    mut socket: WebSocket,
    conns: Arc<Mutex<Vec<DgConn>>>,
    index: usize,
    b: DgBehavior,
) {
    let mut s = DgSession {
        samples: 0,
        final_end: 0,
        next_interim: 8_000,
        finals: 0,
        heard: false,
    };
    if b.ping_first
        && socket
            .send(AxMessage::Ping(b"ping"[..].into()))
            .await
            .is_err()
    {
        return;
    }
    while let Some(Ok(msg)) = socket.recv().await {
        let now = Instant::now();
        let answer = match msg {
            AxMessage::Binary(bytes) => {
                assert_eq!(bytes.len() % 2, 0, "whole PCM16 samples");
                s.heard |= bytes.iter().any(|&x| x != 0);
                let answer = s.on_audio(bytes.len(), &b);
                {
                    let mut c = conns.lock().unwrap();
                    c[index].log.push((now, "audio".into()));
                    c[index].samples = s.samples;
                }
                if b.drop_first_after.is_some_and(|n| s.samples >= n) {
                    return; // drop the socket mid-utterance, no close frame
                }
                answer
            }
            AxMessage::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                let kind = v["type"].as_str().unwrap().to_owned();
                conns.lock().unwrap()[index].log.push((now, kind.clone()));
                match (kind.as_str(), b.finalize, b.close_stream) {
                    ("KeepAlive", ..) => None,
                    ("Finalize", OnFinalize::Answer, _) => Some(s.final_result("final #", true)),
                    ("Finalize", OnFinalize::AnswerEmpty, _) => Some(s.final_result("", true)),
                    ("Finalize", OnFinalize::Ignore, _) => None,
                    ("Finalize", OnFinalize::Refuse, _) => {
                        let error = serde_json::json!({"type": "Error", "description": "Finalize is not supported"});
                        let _ = socket.send(AxMessage::Text(error.to_string().into())).await;
                        let close = CloseFrame {
                            code: 4400,
                            reason: "Finalize is unsupported".into(),
                        };
                        let _ = socket.send(AxMessage::Close(Some(close))).await;
                        return;
                    }
                    ("CloseStream", _, OnCloseStream::Hang) => None,
                    ("CloseStream", finalize, OnCloseStream::Flush) => {
                        if s.samples > s.final_end {
                            let text = if finalize == OnFinalize::AnswerEmpty
                                || (b.silence_is_empty && !s.heard)
                            {
                                ""
                            } else {
                                "tail"
                            };
                            let _ = socket.send(s.final_result(text, false)).await;
                        }
                        let _ = socket.send(AxMessage::Close(None)).await;
                        return;
                    }
                    (other, ..) => panic!("unexpected control message {other}"),
                }
            }
            AxMessage::Close(_) => return,
            _ => None,
        };
        if let Some(m) = answer {
            if socket.send(m).await.is_err() {
                return;
            }
        }
    }
}

pub fn deepgram_cfg(name: &str, url: &str) -> SttConfig {
    let mut s = SttConfig::new(name, SttBackend::Deepgram, url);
    s.model = Some("nova-test".into());
    s.language = Some("en-US".into());
    s.api_key = Some("dg-key".into());
    s.backoff_initial_ms = 20;
    s.backoff_max_ms = 200;
    s
}
