//! `voxgate stream`: send a file as WebSocket messages, print every server event as a JSON line.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::index;

#[derive(Debug, clap::Args)]
pub struct StreamArgs {
    /// WebSocket URL, e.g. ws://127.0.0.1:8080/v1/listen (add ?encoding=... for raw audio).
    pub url: String,
    /// The file to send.
    pub file: PathBuf,
    /// Send the messages of this capture index (capture-index/1), at their recorded spacing.
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// Playback speed: 1 = real time, 10 = ten times faster, 0 = as fast as possible.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Without an index: bytes per message (default: 100 ms at the URL's raw rate, else 4000).
    #[arg(long)]
    pub chunk_bytes: Option<usize>,
    /// Without an index: media milliseconds per message, for pacing (default 100).
    #[arg(long, default_value_t = 100.0)]
    pub chunk_ms: f64,
}

/// Bytes per 100 ms for a raw-audio URL, when the query says enough.
fn raw_chunk(url: &str) -> Option<usize> {
    let parsed = url::Url::parse(url).ok()?;
    let q: std::collections::HashMap<_, _> = parsed.query_pairs().into_owned().collect();
    let width = match q.get("encoding")?.as_str() {
        "linear16" | "pcm_s16le" | "pcm16" => 2,
        "float32" | "linear32" | "pcm_f32le" => 4,
        "linear8" | "pcm8" | "pcm_u8" | "mulaw" | "ulaw" | "alaw" => 1,
        _ => return None,
    };
    let rate: usize = q.get("sample_rate")?.parse().ok()?;
    let ch: usize = q.get("channels").and_then(|c| c.parse().ok()).unwrap_or(1);
    Some(rate / 10 * width * ch)
}

/// Runs the client; returns the process exit code (non-zero after an `Error` event).
pub async fn run(args: &StreamArgs) -> anyhow::Result<i32> {
    let data =
        std::fs::read(&args.file).map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    let messages = match &args.index {
        Some(p) => index::load(p, data.len())?,
        None => {
            let chunk = args
                .chunk_bytes
                .or_else(|| raw_chunk(&args.url))
                .unwrap_or(4000);
            let mut m = index::fixed(data.len(), chunk);
            for (i, msg) in m.iter_mut().enumerate() {
                msg.t_ms = Some(i as f64 * args.chunk_ms);
            }
            m
        }
    };
    let (ws, _) = tokio_tungstenite::connect_async(args.url.as_str()).await?;
    let (mut tx, mut rx) = ws.split();
    let speed = args.speed;
    let sender = async move {
        let start = Instant::now();
        let t0 = messages.first().and_then(|m| m.t_ms).unwrap_or(0.0);
        for m in &messages {
            if speed > 0.0 {
                if let Some(t) = m.t_ms {
                    let at = Duration::from_secs_f64(((t - t0) / speed / 1000.0).max(0.0));
                    tokio::time::sleep_until(start + at).await;
                }
            }
            let bytes = data[m.offset..m.offset + m.length].to_vec();
            tx.send(Message::Binary(bytes.into())).await?;
        }
        tx.send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
            .await?;
        anyhow::Ok(tx)
    };
    let receiver = async move {
        let mut code = 0;
        while let Some(msg) = rx.next().await {
            match msg? {
                Message::Text(t) => {
                    println!("{t}");
                    if t.contains(r#""type":"Error""#) {
                        code = 1;
                    }
                }
                Message::Close(frame) => {
                    if let Some(f) = frame {
                        let c = u16::from(f.code);
                        if c != 1000 {
                            eprintln!("closed: {c} {}", f.reason);
                            code = code.max(1);
                        }
                    }
                    break;
                }
                _ => {}
            }
        }
        anyhow::Ok(code)
    };
    tokio::pin!(receiver);
    tokio::select! {
        sent = sender => {
            let _tx = sent?;
            // Wait for the server to flush and close.
            match tokio::time::timeout(Duration::from_secs(60), &mut receiver).await {
                Ok(code) => code,
                Err(_) => anyhow::bail!("server did not close within 60 s of CloseStream"),
            }
        }
        code = &mut receiver => code,
    }
}
