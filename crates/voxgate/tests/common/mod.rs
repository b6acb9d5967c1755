//! Test support: a gateway on 127.0.0.1:0, a real HTTP webhook receiver, a real WS client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use voxgate::config::Config;

pub fn corpus(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/corpus")
        .join(rel)
}

/// A running gateway.
pub struct Gateway {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Gateway {
    pub async fn start(cfg: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(voxgate::server::run(cfg, listener, shutdown.clone()));
        Self {
            addr,
            shutdown,
            task,
        }
    }

    pub fn ws(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }

    /// The body of an operator page (`/metrics`, `/readyz`), whatever its status.
    pub async fn page(&self, path: &str) -> String {
        reqwest::get(format!("http://{}{path}", self.addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn metrics(&self) -> String {
        self.page("/metrics").await
    }

    /// Sum of every series of `name` whose labels contain `label` (e.g. `consumer="webhook"`).
    pub async fn metric(&self, name: &str, label: &str) -> f64 {
        metric_value(&self.metrics().await, name, label)
    }
}

pub fn metric_value(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name)
                && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' '))
                && l.contains(label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How the receiver answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Ok,
    /// Never answers (until the client gives up).
    Hang,
    Fail(u16),
    /// Records the request, then answers 200 after this many milliseconds (a request cut off
    /// meanwhile was seen by the sink but never acknowledged to its sender).
    Slow(u64),
}

/// One request the receiver saw.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub seq: u64,
    pub start: u64,
    pub samples: u64,
    pub session_id: String,
    pub idempotency_key: String,
    pub signature: Option<String>,
    pub body: Bytes,
    /// The query as sent (without `?`) and every header, to verify the signature.
    pub query: String,
    pub headers: HeaderMap,
}

impl Received {
    /// Checks the request's signature as a receiver would (5 minutes of clock skew).
    pub fn verify(&self, secret: &str) -> Result<(), voxgate::consumers::contract::VerifyError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let path = format!("/{}", self.path);
        voxgate::consumers::contract::verify(
            secret,
            ("POST", &path, &self.query),
            &self.headers,
            &self.body,
            now,
            voxgate::consumers::contract::DEFAULT_MAX_SIGNATURE_AGE_SECONDS,
        )
    }
}

#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    pub got: Arc<Mutex<Vec<Received>>>,
    mode: Arc<Mutex<Mode>>,
}

impl Receiver {
    pub async fn start(mode: Mode) -> Self {
        let got = Arc::new(Mutex::new(Vec::new()));
        let mode = Arc::new(Mutex::new(mode));
        let state = (got.clone(), mode.clone());
        let app = Router::new()
            .route("/{name}", post(receive))
            .with_state(state);
        let addr = serve(app).await;
        Self { addr, got, mode }
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{}", self.addr, name)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Requests received on `/name`, ordered by sequence number.
    pub fn requests(&self, name: &str) -> Vec<Received> {
        let mut v: Vec<_> = self
            .got
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == name)
            .cloned()
            .collect();
        v.sort_by_key(|r| r.seq);
        v
    }
}

type RecvState = (Arc<Mutex<Vec<Received>>>, Arc<Mutex<Mode>>);

async fn receive(
    State((got, mode)): State<RecvState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    axum::extract::RawQuery(raw_query): axum::extract::RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let mode = *mode.lock().unwrap();
    match mode {
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return StatusCode::OK;
        }
        Mode::Fail(code) => return StatusCode::from_u16(code).unwrap(),
        Mode::Ok | Mode::Slow(_) => {}
    }
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let num = |k: &str| h(k).and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
    if h("content-type").as_deref() == Some("application/octet-stream") {
        assert_eq!(q.get("sample_rate").map(String::as_str), Some("16000"));
    }
    got.lock().unwrap().push(Received {
        path: name,
        seq: num("x-voxgate-sequence"),
        start: num("x-voxgate-start-sample"),
        samples: num("x-voxgate-samples"),
        session_id: q.get("session_id").cloned().unwrap_or_default(),
        idempotency_key: h("idempotency-key").unwrap_or_default(),
        signature: h("x-voxgate-signature"),
        body,
        query: raw_query.unwrap_or_default(),
        headers: headers.clone(),
    });
    if let Mode::Slow(ms) = mode {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    StatusCode::OK
}

/// What a client saw of a session.
#[derive(Debug, Default)]
pub struct ClientRun {
    pub events: Vec<serde_json::Value>,
    pub close_code: Option<u16>,
    pub close_reason: String,
}

impl ClientRun {
    pub fn of_type(&self, t: &str) -> Vec<&serde_json::Value> {
        self.events.iter().filter(|e| e["type"] == t).collect()
    }
    pub fn closed(&self) -> &serde_json::Value {
        self.of_type("Closed")
            .last()
            .copied()
            .unwrap_or_else(|| panic!("no Closed event in {:?}", self.events))
    }
}

/// Sends `messages` (binary), then `CloseStream`, pacing `gap` between messages, and collects
/// every event until the server closes.
pub async fn stream(url: &str, messages: Vec<Vec<u8>>, gap: Duration) -> ClientRun {
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
    for m in messages {
        if tx.send(Message::Binary(m.into())).await.is_err() {
            break;
        }
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
    }
    let _ = tx
        .send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
        .await;
    tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("server closes within 60 s")
        .unwrap()
}

/// A capture's messages as the browser sent them.
pub fn capture_messages(name: &str) -> Vec<Vec<u8>> {
    let data = std::fs::read(corpus(&format!("captures/{name}"))).unwrap();
    let stem = name.rsplit_once('.').unwrap().0;
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(corpus(&format!("captures/{stem}.index.json"))).unwrap(),
    )
    .unwrap();
    index["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let o = m["offset"].as_u64().unwrap() as usize;
            let l = m["length"].as_u64().unwrap() as usize;
            data[o..o + l].to_vec()
        })
        .collect()
}

/// Raw PCM16 16 kHz mono reference speech cut into 100 ms messages.
pub fn pcm_messages(name: &str, seconds: Option<f64>) -> Vec<Vec<u8>> {
    let mut data = std::fs::read(corpus(&format!("reference/{name}.s16le-16k-mono.pcm"))).unwrap();
    if let Some(s) = seconds {
        data.truncate((s * 32_000.0) as usize);
    }
    data.chunks(3200).map(<[u8]>::to_vec).collect()
}

pub fn test_config() -> Config {
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.server.close_flush_seconds = 10.0;
    // Tests open many connections from one address; the rate limit has its own test.
    cfg.auth.connections_per_ip_per_second = 10_000.0;
    cfg.server.max_connections_per_ip = 10_000;
    cfg
}

/// `test_config` with auth on and one API key (`[[auth.api_keys]]`, user `ann`).
pub fn keyed_config(key: &str) -> Config {
    use sha2::Digest;
    let mut cfg = test_config();
    cfg.auth.mode = voxgate::auth::AuthMode::Jwt;
    cfg.auth.api_keys = vec![voxgate::auth::ApiKey {
        user: "ann".into(),
        sha256: hex::encode(sha2::Sha256::digest(key.as_bytes())),
    }];
    cfg
}

/// Where `scripts/deps` installs third-party programs (`target/tools/NAME`).
pub fn tools(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/tools")
        .join(name)
}

/// Serves `app` on an ephemeral 127.0.0.1 port until the test ends; its address.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}
