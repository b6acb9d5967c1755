//! `voxgate stream`: send a file as WebSocket messages, print every server event as a JSON line.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
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
    /// Carrier simulator: send the WAV FILE (8 or 16 kHz) as a call in this carrier's framing
    /// (`signalwire`, `telnyx`, `plivo`, `exotel`, `vonage`, `jambonz`, `audio_fork`, `sinch`, `asterisk`), to the
    /// URL's path, or `/v1/<carrier>` when the URL has none.
    #[arg(long, conflicts_with_all = ["encoding", "twilio"])]
    pub carrier: Option<String>,
    /// With `--carrier jambonz` or `audio_fork`: the agent's WAV (same rate as FILE, the
    /// caller's); the call is sent as stereo, caller left, agent right (an audio fork's URL
    /// gets `channels=2&sample_rate=R`).
    #[arg(long, requires = "carrier")]
    pub agent: Option<std::path::PathBuf>,
    /// Twilio customParameters, `key=value` (repeatable), e.g. `consumers=app1`.
    #[arg(long = "param")]
    pub params: Vec<String>,
    /// Open a resumable session: if the connection drops, reconnect with the resume token and
    /// resend from the last acknowledged byte (up to 10 attempts).
    #[arg(long, conflicts_with_all = ["twilio", "carrier"])]
    pub resumable: bool,
}

/// The messages to send with their send times in ms, and the final URL.
pub fn plan(args: &StreamArgs) -> anyhow::Result<(String, Vec<(f64, Message)>)> {
    let mut url = url::Url::parse(&args.url)?;
    if let Some(name) = &args.carrier {
        return carrier_plan(args, name, url);
    }
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

/// A carrier simulator's messages: the URL's path becomes `/v1/<carrier>` unless it names one.
fn carrier_plan(
    args: &StreamArgs,
    name: &str,
    mut url: url::Url,
) -> anyhow::Result<(String, Vec<(f64, Message)>)> {
    let carrier = super::carrier::carrier_named(name)?;
    let (rate, samples) = super::device::read_wav(&args.file)?;
    let params: Vec<(String, String)> = args
        .params
        .iter()
        .filter_map(|p| p.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    let call = match &args.agent {
        Some(agent_file) => {
            let (agent_rate, agent) = super::device::read_wav(agent_file)?;
            anyhow::ensure!(
                agent_rate == rate,
                "--agent is {agent_rate} Hz, FILE {rate} Hz"
            );
            if carrier == crate::ingest::request::Carrier::AudioFork {
                url.query_pairs_mut()
                    .append_pair("channels", "2")
                    .append_pair("sample_rate", &rate.to_string());
            }
            super::carrier::stereo_call(carrier, rate, &samples, &agent, &params)?
        }
        None => super::carrier::call(carrier, rate, &samples, &params)?,
    };
    if url.path() == "/" || url.path().is_empty() {
        url.set_path(&format!("/v1/{}", carrier.as_str()));
    }
    let timed = call
        .frames
        .into_iter()
        .map(|t| {
            let msg = match t.frame {
                super::carrier::Frame::Text(s) => Message::Text(s.into()),
                super::carrier::Frame::Binary(b) => Message::Binary(b.into()),
                super::carrier::Frame::Close => Message::Close(None),
            };
            (t.at_ms, msg)
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
    if args.resumable {
        return run_resumable(args).await;
    }
    let (url, timed) = plan(args)?;
    // Telephony streams end with their own stop message, not voxgate's CloseStream.
    let twilio = args.twilio || args.carrier.is_some();
    let mut request = url.as_str().into_client_request()?;
    let carrier = args.carrier.as_deref().map(super::carrier::carrier_named);
    if let Some(Ok(c)) = carrier {
        if let Some(p) = crate::ingest::frontends::carrier::l16::subprotocol(c) {
            request
                .headers_mut()
                .insert("sec-websocket-protocol", p.parse()?);
        }
    }
    let (ws, _) = tokio_tungstenite::connect_async(request).await?;
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

/// What the event reader of one connection learned.
#[derive(Default)]
struct Shared {
    acked: std::sync::atomic::AtomicU64,
    saw_error: std::sync::atomic::AtomicBool,
    resume: std::sync::Mutex<Option<(String, String)>>,
}

/// Prints events; returns the close code, or `None` when the connection broke without one.
async fn read_events(
    mut rx: futures_util::stream::SplitStream<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    >,
    shared: std::sync::Arc<Shared>,
) -> Option<u16> {
    use std::sync::atomic::Ordering;
    while let Some(Ok(msg)) = rx.next().await {
        match msg {
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                match v["type"].as_str() {
                    Some("Ack") => {
                        let b = v["bytes"].as_u64().unwrap_or(0);
                        shared.acked.fetch_max(b, Ordering::SeqCst);
                        continue; // one per message: not printed
                    }
                    Some("Resumable") => {
                        let sid = v["session_id"].as_str().unwrap_or_default().to_owned();
                        let tok = v["resume_token"].as_str().unwrap_or_default().to_owned();
                        *shared.resume.lock().expect("not poisoned") = Some((sid, tok));
                    }
                    Some("Error") => shared.saw_error.store(true, Ordering::SeqCst),
                    _ => {}
                }
                println!("{t}");
            }
            Message::Close(frame) => return Some(frame.map_or(1005, |f| u16::from(f.code))),
            _ => {}
        }
    }
    None
}

/// `--resumable`: the byte stream survives dropped connections.
async fn run_resumable(args: &StreamArgs) -> anyhow::Result<i32> {
    use std::sync::atomic::Ordering;
    let (url, timed) = plan(args)?;
    let mut data = Vec::new();
    let mut msgs = Vec::new(); // (send time ms, start, end)
    for (t, m) in timed {
        if let Message::Binary(b) = m {
            let start = data.len();
            data.extend_from_slice(&b);
            msgs.push((t, start, data.len()));
        }
    }
    let mut base = url::Url::parse(&url)?;
    let first = {
        let mut u = base.clone();
        u.query_pairs_mut().append_pair("resumable", "true");
        u
    };
    base.set_query(None);
    let shared = std::sync::Arc::new(Shared::default());
    let clock = Instant::now();
    let (mut pos, mut idx, mut attempts) = (0usize, 0usize, 0u32);
    loop {
        let resume = shared.resume.lock().expect("not poisoned").clone();
        let target = match (&resume, attempts) {
            (_, 0) => first.to_string(),
            (Some((sid, tok)), _) => {
                let mut u = base.clone();
                u.query_pairs_mut()
                    .append_pair("resume", sid)
                    .append_pair("resume_token", tok)
                    .append_pair("resume_from", &pos.to_string());
                u.to_string()
            }
            (None, _) => anyhow::bail!("connection lost before the session said it was resumable"),
        };
        let ws = match tokio_tungstenite::connect_async(target.as_str()).await {
            Ok((ws, _)) => ws,
            Err(e) if attempts > 0 && attempts < 10 => {
                eprintln!("reconnect failed ({e}); retrying");
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempts))).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let (mut tx, rx) = ws.split();
        let mut reader = tokio::spawn(read_events(rx, shared.clone()));
        let mut broken = false;
        while idx < msgs.len() {
            let (t, start, end) = msgs[idx];
            if args.speed > 0.0 {
                let at = Duration::from_secs_f64((t / args.speed / 1000.0).max(0.0));
                tokio::time::sleep_until(clock + at).await;
            }
            let from = pos.max(start);
            if reader.is_finished()
                || tx
                    .send(Message::Binary(data[from..end].to_vec().into()))
                    .await
                    .is_err()
            {
                broken = true;
                break;
            }
            pos = end;
            idx += 1;
        }
        if !broken
            && tx
                .send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
                .await
                .is_ok()
        {
            match tokio::time::timeout(Duration::from_secs(60), &mut reader).await {
                Ok(Ok(Some(code))) => {
                    if code != 1000 {
                        eprintln!("closed: {code}");
                        return Ok(1);
                    }
                    return Ok(i32::from(shared.saw_error.load(Ordering::SeqCst)));
                }
                Ok(_) => {}
                Err(_) => anyhow::bail!("server did not close within 60 s of CloseStream"),
            }
        }
        if broken {
            if reader.is_finished() {
                if let Ok(Some(code)) = reader.await {
                    // The server ended the session on purpose: not a dropped connection.
                    eprintln!("closed: {code}");
                    return Ok(1);
                }
            } else {
                reader.abort();
            }
        }
        attempts += 1;
        anyhow::ensure!(attempts <= 10, "gave up after 10 reconnects");
        // Resend from the last acknowledged byte; the server drops what it already has.
        pos = shared.acked.load(Ordering::SeqCst) as usize;
        idx = msgs
            .iter()
            .position(|&(_, _, end)| end > pos)
            .unwrap_or(msgs.len());
        eprintln!("connection lost; resuming from byte {pos}");
    }
}
