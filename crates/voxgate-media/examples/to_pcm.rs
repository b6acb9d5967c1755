//! Decodes a WebM/Ogg Opus file (fed in 4 KiB chunks) to raw 16 kHz mono s16le on stdout.
//!
//! `cargo run --release -p voxgate-media --example to_pcm -- FILE > out.pcm`

use std::io::Write;

use voxgate_media::{Decoder, Limits, SourceFormat};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: to_pcm FILE")?;
    let data = std::fs::read(path)?;
    let mut d = Decoder::new(SourceFormat::Auto, Limits::default())?;
    let mut pcm = Vec::new();
    for chunk in data.chunks(4096) {
        d.push(chunk, &mut pcm)?;
    }
    d.finish(&mut pcm)?;
    let bytes: Vec<u8> = pcm.iter().flat_map(|s| s.to_le_bytes()).collect();
    std::io::stdout().write_all(&bytes)?;
    eprintln!("{:?}", d.stats());
    Ok(())
}
