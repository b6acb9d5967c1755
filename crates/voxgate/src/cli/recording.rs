//! `voxgate recording`: a recorded session read straight from the store as one WAV (streamed
//! chunk by chunk, never loaded whole) and, with `--events`, its events as JSON lines. Prints
//! one JSON line: the samples written and where.

use std::path::PathBuf;

use anyhow::Context;
use futures_util::TryStreamExt;
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::config::Config;
use crate::recording::assemble;
use crate::recording::layout::SessionKeys;
use crate::recording::Store;

#[derive(Debug, clap::Args)]
pub struct RecordingArgs {
    /// The session id.
    pub session: String,
    /// The gateway's config file (its `[recording]` section says where recordings are).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The store URL instead of the config's `recording.url`.
    #[arg(long)]
    pub url: Option<String>,
    /// The session's owner (the token's user; absent: sessions recorded without tokens).
    #[arg(long, default_value = "")]
    pub owner: String,
    /// Output WAV (16 kHz mono PCM16).
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Also write the events (JSON lines, the summary last) here.
    #[arg(long)]
    pub events: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct RecordingReport {
    pub samples: u64,
    pub seconds: f64,
    pub output: PathBuf,
    pub events: Option<PathBuf>,
}

pub async fn run(args: &RecordingArgs) -> anyhow::Result<RecordingReport> {
    let mut cfg = Config::load(args.config.as_deref())?;
    if let Some(url) = &args.url {
        cfg.recording.url = url.clone();
    }
    let store = Store::open(&cfg.recording)?;
    let keys = SessionKeys::new(&store.prefix, &args.owner, &args.session);
    // Encrypted audio opens with its user's key from `recording.keys` in the config.
    let key = assemble::user_key(&store, &keys, &cfg.recording.keys).await;
    let wav = assemble::wav(&store, &keys, key)
        .await
        .with_context(|| format!("session {:?}", args.session))?;
    let mut out = tokio::fs::File::create(&args.output)
        .await
        .with_context(|| format!("creating {}", args.output.display()))?;
    let mut body = wav.body;
    while let Some(bytes) = body.try_next().await? {
        out.write_all(&bytes).await?;
    }
    out.flush().await?;
    if let Some(path) = &args.events {
        let lines = assemble::events(&store, &keys).await?;
        tokio::fs::write(path, lines).await?;
    }
    let samples = (wav.bytes - 44) / 2;
    Ok(RecordingReport {
        samples,
        seconds: samples as f64 / f64::from(voxgate_session::SAMPLE_RATE),
        output: args.output.clone(),
        events: args.events.clone(),
    })
}
