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
    /// Device simulator: `opus` encodes the WAV FILE with libopus, one packet per message
    /// (`encoding=opus&sample_rate=R&frame_ms=N` is added to the URL).
    #[arg(long)]
    pub encoding: Option<String>,
    /// Opus frame length in ms for `--encoding opus` (10, 20, 40, 60).
    #[arg(long, default_value_t = 20)]
    pub frame_ms: u32,
    /// With `--encoding opus`: prefix each packet with a 4-byte sequence number (`seq=1`).
    #[arg(long)]
    pub seq: bool,
    /// Telephony simulator: send the WAV FILE (8 or 16 kHz) as a Twilio Media Stream of mu-law.
    #[arg(long, conflicts_with = "encoding")]
    pub twilio: bool,
    /// Twilio customParameters, `key=value` (repeatable), e.g. `consumers=app1`.
    #[arg(long = "param")]
    pub params: Vec<String>,
}

/// The messages to send with their send times in ms, and the final URL.
pub fn plan(args: &StreamArgs) -> anyhow::Result<(String, Vec<(f64, Message)>)> {
    let mut url = url::Url::parse(&args.url)?;
    if args.twilio {
        let (rate, samples) = super::device::read_wav(&args.file)?;
        let mulaw = super::device::to_mulaw_8k(rate, &samples)?;
        let custom: Vec<(String, String)> = args
            .params
            .iter()
            .filter_map(|p| p.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect();
        let sid = format!("MZ{}", uuid::Uuid::new_v4().simple());
        let msgs = super::device::twilio_messages(&mulaw, &sid, &custom);
        let timed = msgs
            .into_iter()
            .enumerate()
            .map(|(i, m)| ((i.saturating_sub(2) as f64) * 20.0, Message::Text(m.into())))
            .collect();
        return Ok((url.to_string(), timed));
    }
    if let Some(enc) = &args.encoding {
        anyhow::ensure!(
            enc == "opus",
            "--encoding supports only opus (send raw PCM files as they are, with ?encoding= in the URL)"
        );
        let (rate, samples) = super::device::read_wav(&args.file)?;
        let packets = super::device::opus_packets(rate, &samples, args.frame_ms, args.seq)?;
        url.query_pairs_mut()
            .append_pair("encoding", "opus")
            .append_pair("sample_rate", &rate.to_string())
            .append_pair("frame_ms", &args.frame_ms.to_string());
        if args.seq {
            url.query_pairs_mut().append_pair("seq", "1");
        }
        let timed = packets
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    i as f64 * f64::from(args.frame_ms),
                    Message::Binary(p.into()),
                )
            })
            .collect();
        return Ok((url.to_string(), timed));
    }
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
    let t0 = messages.first().and_then(|m| m.t_ms).unwrap_or(0.0);
    let timed = messages
        .iter()
        .map(|m| {
            let bytes = data[m.offset..m.offset + m.length].to_vec();
            (m.t_ms.unwrap_or(t0) - t0, Message::Binary(bytes.into()))
        })
        .collect();
    Ok((url.to_string(), timed))
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
    let (url, timed) = plan(args)?;
    let twilio = args.twilio;
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
    let (mut tx, mut rx) = ws.split();
    let speed = args.speed;
    let sender = async move {
        let start = Instant::now();
        for (t, msg) in timed {
            if speed > 0.0 {
                let at = Duration::from_secs_f64((t / speed / 1000.0).max(0.0));
                tokio::time::sleep_until(start + at).await;
            }
            tx.send(msg).await?;
        }
        if !twilio {
            tx.send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
                .await?;
        }
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
