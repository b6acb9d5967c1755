//! One connection to a Deepgram-compatible backend: the listen URL, the WebSocket handshake,
//! the mapping of the connection's result times back to session samples, and the `Results`
//! messages it answers with.

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use voxgate_session::SAMPLE_RATE;

use super::super::ctx::sample_at;
use crate::config::{SessionStt, SttConfig};

pub(super) const FINALIZE: &str = r#"{"type":"Finalize"}"#;
pub(super) const CLOSE_STREAM: &str = r#"{"type":"CloseStream"}"#;
pub(super) const KEEP_ALIVE: &str = r#"{"type":"KeepAlive"}"#;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a connection to the backend could not be made (the text is what `stt_unavailable` and
/// `/readyz` say).
#[derive(Debug, thiserror::Error)]
pub enum DeepgramError {
    #[error("{0}")]
    Url(#[from] url::ParseError),
    #[error("cannot use scheme {0}")]
    Scheme(String),
    #[error("{0}")]
    Request(tokio_tungstenite::tungstenite::Error),
    #[error("api_key is not a valid header value")]
    ApiKey,
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("connect failed: {0}")]
    Connect(tokio_tungstenite::tungstenite::Error),
}

/// The listen URL for a base URL (`http(s)` becomes `ws(s)`; a URL ending in `/v1/listen` is
/// kept as it is), with the session's model, language and key terms.
pub fn listen_url(cfg: &SttConfig, opts: &SessionStt) -> Result<url::Url, DeepgramError> {
    let mut url = url::Url::parse(&cfg.url)?;
    let scheme = match url.scheme() {
        "http" => "ws",
        "https" => "wss",
        s => s,
    }
    .to_owned();
    url.set_scheme(&scheme)
        .map_err(|()| DeepgramError::Scheme(scheme.clone()))?;
    if !url.path().trim_end_matches('/').ends_with("/v1/listen") {
        let path = format!("{}/v1/listen", url.path().trim_end_matches('/'));
        url.set_path(&path);
    }
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("encoding", "linear16")
            .append_pair("sample_rate", &SAMPLE_RATE.to_string())
            .append_pair("channels", "1")
            .append_pair("interim_results", "true");
        if let Some(m) = &opts.model {
            q.append_pair("model", m);
        }
        if let Some(l) = &opts.language {
            q.append_pair("language", l);
        }
        for term in &opts.keyterms {
            q.append_pair("keyterm", term);
        }
    }
    Ok(url)
}

/// One live connection.
pub(super) struct Conn {
    pub(super) sink: SplitSink<Ws, Message>,
    pub(super) stream: SplitStream<Ws>,
    /// (connection sample, session sample) where sent audio jumped; maps result times back.
    pub(super) map: Vec<(u64, u64)>,
    /// Samples sent on this connection.
    pub(super) pos: u64,
    pub(super) next_session: Option<u64>,
    /// Session sample up to which retained audio was sent on this connection.
    pub(super) sent_until: u64,
    pub(super) last_send: Instant,
    pub(super) close_sent: bool,
    /// `Finalize` messages sent on this connection and not yet answered.
    pub(super) finalizes_out: u32,
    /// The backend refused `Finalize` on this connection (its close that follows is expected).
    pub(super) refused_finalize: bool,
    /// `isolate_utterances`: `CloseStream` was sent at an utterance end, when this
    /// connection's audio reached this session sample.
    pub(super) cut_at: Option<u64>,
}

impl Conn {
    /// Connects (within the backend's timeout) with the backend's key.
    pub(super) async fn open(cfg: &SttConfig, opts: &SessionStt) -> Result<Self, DeepgramError> {
        let url = listen_url(cfg, opts)?;
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(DeepgramError::Request)?;
        if let Some(key) = &cfg.api_key {
            let value = format!("Token {key}")
                .parse()
                .map_err(|_| DeepgramError::ApiKey)?;
            req.headers_mut().insert("authorization", value);
        }
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let (ws, _) = tokio::time::timeout(timeout, tokio_tungstenite::connect_async(req))
            .await
            .map_err(|_| DeepgramError::ConnectTimeout)?
            .map_err(DeepgramError::Connect)?;
        let (sink, stream) = ws.split();
        Ok(Self {
            sink,
            stream,
            map: Vec::new(),
            pos: 0,
            next_session: None,
            sent_until: 0,
            last_send: Instant::now(),
            close_sent: false,
            finalizes_out: 0,
            refused_finalize: false,
            cut_at: None,
        })
    }

    pub(super) fn to_session(&self, t: f64) -> u64 {
        let s = sample_at(t.max(0.0));
        match self.map.iter().rev().find(|(c, _)| *c <= s) {
            Some((c, sess)) => sess + (s - c),
            None => s,
        }
    }
}

/// A message from the backend (`Results` and `Error` are read; others are ignored).
#[derive(serde::Deserialize)]
pub(super) struct Results {
    #[serde(rename = "type")]
    pub(super) kind: String,
    #[serde(default)]
    pub(super) start: f64,
    #[serde(default)]
    pub(super) duration: f64,
    #[serde(default)]
    pub(super) is_final: bool,
    #[serde(default)]
    pub(super) from_finalize: bool,
    #[serde(default)]
    pub(super) channel: Option<Channel>,
    /// `Error` messages: what went wrong.
    #[serde(default)]
    pub(super) description: Option<String>,
}

#[derive(serde::Deserialize)]
pub(super) struct Channel {
    pub(super) alternatives: Vec<Alternative>,
}

#[derive(serde::Deserialize)]
pub(super) struct Alternative {
    #[serde(default)]
    pub(super) transcript: String,
}

/// Sends a control message (`KeepAlive`, `Finalize`, `CloseStream`); `Err` when the
/// connection is lost.
pub(super) async fn send_text(c: &mut Conn, text: &'static str) -> Result<(), ()> {
    c.last_send = Instant::now();
    if text == FINALIZE {
        c.finalizes_out += 1;
    }
    c.sink
        .send(Message::Text(text.into()))
        .await
        .map_err(|_| ())
}

/// The next frame of the connection, if there is one (never resolves without a connection).
pub(super) async fn next_frame(
    conn: &mut Option<Conn>,
) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
    match conn {
        Some(c) => c.stream.next().await,
        None => std::future::pending().await,
    }
}
