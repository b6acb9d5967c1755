//! `voxgate decode`: the ingest pipeline on a file, fed in capture-message or fixed chunks.

use std::path::PathBuf;

use serde::Serialize;
use voxgate_media::{Decoder, Limits, SourceFormat};

use super::index;

#[derive(Debug, clap::Args)]
pub struct DecodeArgs {
    /// Input file (WebM, Ogg, or raw audio with --encoding).
    pub input: PathBuf,
    /// Feed the chunks of this capture index (capture-index/1 JSON).
    #[arg(long, conflicts_with = "chunk_bytes")]
    pub index: Option<PathBuf>,
    /// Feed fixed-size chunks of this many bytes (default 4096).
    #[arg(long)]
    pub chunk_bytes: Option<usize>,
    /// Raw encoding (opus packets are not supported from a file): linear16, float32, linear8, mulaw, alaw.
    #[arg(long)]
    pub encoding: Option<String>,
    #[arg(long)]
    pub sample_rate: Option<u32>,
    #[arg(long)]
    pub channels: Option<u8>,
    /// Output WAV (16 kHz mono PCM16).
    #[arg(short = 'o', long)]
    pub output: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct DecodeReport {
    pub format: Option<String>,
    pub samples: u64,
    pub seconds: f64,
    pub frames: u64,
    pub decode_errors: u64,
    pub resyncs: u64,
    pub peak_pending_bytes: usize,
}

pub fn run(args: &DecodeArgs) -> anyhow::Result<DecodeReport> {
    let data =
        std::fs::read(&args.input).map_err(|e| anyhow::anyhow!("{}: {e}", args.input.display()))?;
    let mut query = std::collections::HashMap::new();
    if let Some(e) = &args.encoding {
        query.insert("encoding".to_owned(), e.clone());
    }
    if let Some(r) = args.sample_rate {
        query.insert("sample_rate".to_owned(), r.to_string());
    }
    if let Some(c) = args.channels {
        query.insert("channels".to_owned(), c.to_string());
    }
    let format = crate::ingest::request::source_format(&query).map_err(|e| anyhow::anyhow!(e))?;
    anyhow::ensure!(
        !matches!(format, SourceFormat::Opus { .. }),
        "raw Opus packets need message boundaries; decode a WebM or Ogg file instead"
    );
    let chunks = match &args.index {
        Some(path) => index::load(path, data.len())?,
        None => index::fixed(data.len(), args.chunk_bytes.unwrap_or(4096)),
    };
    let mut decoder = Decoder::new(format, Limits::default())?;
    let mut pcm = Vec::new();
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut wav = hound::WavWriter::create(&args.output, spec)?;
    for c in &chunks {
        pcm.clear();
        decoder.push(&data[c.offset..c.offset + c.length], &mut pcm)?;
        for s in &pcm {
            wav.write_sample(*s)?;
        }
        while decoder.poll_event().is_some() {}
    }
    pcm.clear();
    decoder.finish(&mut pcm)?;
    for s in &pcm {
        wav.write_sample(*s)?;
    }
    wav.finalize()?;
    let st = decoder.stats();
    Ok(DecodeReport {
        format: decoder.format().map(|f| f.name().to_owned()),
        samples: st.samples_out,
        seconds: st.samples_out as f64 / 16_000.0,
        frames: st.frames,
        decode_errors: st.decode_errors,
        resyncs: st.resyncs,
        peak_pending_bytes: st.peak_pending_bytes,
    })
}
