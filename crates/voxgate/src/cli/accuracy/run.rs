//! Streams a corpus item through a gateway to one backend, and gives the same speech to the
//! backend directly; both answers are joined into one text.

use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::corpus::{Feed, Item};
use crate::config::{SttBackend, SttConfig, SttOptions};
use crate::fanout::stt::{deepgram, openai, Registry};

/// Longest wait for a session (or a direct stream) to close after the last message.
const CLOSE_WAIT: Duration = Duration::from_secs(300);
/// Samples per raw PCM message (100 ms).
const PCM_CHUNK: usize = 1600;

/// The final transcripts of `item` streamed through the gateway at `base` (`ws://host:port`)
/// to backend `name`, joined in utterance order; `speed` 1 = real time, 0 = unpaced.
pub async fn via_gateway(
    base: &str,
    name: &str,
    item: &Item,
    speed: f64,
) -> anyhow::Result<String> {
    let mut url = format!("{base}/v1/listen?stt={name}");
    let messages: Vec<(f64, Vec<u8>)> = match &item.feed {
        Feed::Capture(m) => m.clone(),
        Feed::Pcm(pcm) => {
            url.push_str("&encoding=linear16&sample_rate=16000");
            pcm_messages(pcm)
        }
    };
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let (mut tx, mut rx) = ws.split();
    let reader = tokio::spawn(async move {
        let mut finals: Vec<(u64, f64, String)> = Vec::new();
        while let Some(Ok(msg)) = rx.next().await {
            let Message::Text(t) = msg else { continue };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) else {
                continue;
            };
            if v["type"] == "Transcript" && v["is_final"] == true {
                finals.push((
                    v["utterance"].as_u64().unwrap_or(0),
                    v["start"].as_f64().unwrap_or(0.0),
                    v["text"].as_str().unwrap_or("").to_owned(),
                ));
            }
        }
        finals.sort_by(|a, b| (a.0, a.1).partial_cmp(&(b.0, b.1)).expect("no NaN times"));
        join(finals.into_iter().map(|f| f.2))
    });
    paced_send(&mut tx, messages, speed).await?;
    tx.send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
        .await?;
    Ok(tokio::time::timeout(CLOSE_WAIT, reader)
        .await
        .context("the gateway did not close the session")??)
}

/// The backend's own transcript of the item's WAV: one request (openai), or the whole audio
/// streamed and closed with `CloseStream` (deepgram), or one job (the embedded recognizers).
pub async fn direct(cfg: &SttConfig, item: &Item, speed: f64) -> anyhow::Result<String> {
    let opts = cfg
        .permit(&SttOptions::default())
        .map_err(anyhow::Error::msg)?;
    match cfg.backend {
        SttBackend::Openai => {
            let client = reqwest::Client::new();
            Ok(openai::transcribe(&client, cfg, &opts, &item.wav).await?)
        }
        SttBackend::Deepgram => {
            let mut req = deepgram::listen_url(cfg, &opts)?
                .as_str()
                .into_client_request()?;
            if let Some(key) = &cfg.api_key {
                req.headers_mut()
                    .insert("authorization", format!("Token {key}").parse()?);
            }
            let (ws, _) = tokio_tungstenite::connect_async(req).await?;
            let (mut tx, mut rx) = ws.split();
            let reader = tokio::spawn(async move {
                let mut finals = Vec::new();
                // Reads until the close: pings (servers send them during long streams) must be
                // read for their pongs to go out, or the server drops the stream mid-item.
                while let Some(Ok(msg)) = rx.next().await {
                    let Message::Text(t) = msg else { continue };
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) else {
                        continue;
                    };
                    if v["type"] == "Results" && v["is_final"] == true {
                        let text = &v["channel"]["alternatives"][0]["transcript"];
                        finals.push(text.as_str().unwrap_or("").to_owned());
                    }
                }
                join(finals.into_iter())
            });
            paced_send(&mut tx, pcm_messages(&item.wav), speed).await?;
            tx.send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
                .await?;
            Ok(tokio::time::timeout(CLOSE_WAIT, reader)
                .await
                .context("the backend did not close the stream")??)
        }
        // Embedded recognizers: the whole WAV as one job (Whisper reads it in 30 s windows).
        SttBackend::Pocketsphinx | SttBackend::Whisper => {
            let backends = Registry::new(std::slice::from_ref(cfg)).select(Some(&cfg.name))?;
            let backend = backends.first().context("no backend")?;
            let pcm: std::sync::Arc<[i16]> = item.wav.clone().into();
            Ok(backend
                .transcribe(&reqwest::Client::new(), &opts, pcm)
                .await?)
        }
    }
}

fn join(texts: impl Iterator<Item = String>) -> String {
    texts
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// 100 ms PCM16 messages with their send times (ms).
fn pcm_messages(pcm: &[i16]) -> Vec<(f64, Vec<u8>)> {
    pcm.chunks(PCM_CHUNK)
        .enumerate()
        .map(|(i, c)| {
            let bytes = c.iter().flat_map(|s| s.to_le_bytes()).collect();
            (i as f64 * 100.0, bytes)
        })
        .collect()
}

/// Sends binary messages at their times divided by `speed` (0: as fast as possible).
async fn paced_send<S>(tx: &mut S, messages: Vec<(f64, Vec<u8>)>, speed: f64) -> anyhow::Result<()>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let start = tokio::time::Instant::now();
    let first = messages.first().map_or(0.0, |m| m.0);
    for (at, bytes) in messages {
        if speed > 0.0 {
            let due = Duration::from_secs_f64(((at - first) / speed).max(0.0) / 1000.0);
            tokio::time::sleep_until(start + due).await;
        }
        tx.send(Message::Binary(bytes.into())).await?;
    }
    Ok(())
}
