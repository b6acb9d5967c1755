//! Feeds arbitrary bytes to a `Decoder` in arbitrary chunks. Asserts: no panic, the held input
//! never exceeds `max_pending_bytes`, and `finish` always returns.
//!
//! Input layout: byte 0 picks the source format and limits, byte 1 seeds the chunk sizes, the
//! rest is the stream. Seeds: `fuzz/seeds/` (corpus files with a 2-byte prefix).
#![no_main]

use libfuzzer_sys::fuzz_target;
use voxgate_media::{Decoder, Limits, SourceFormat};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (mode, seed, stream) = (data[0], data[1], &data[2..]);
    let mut limits = Limits::default();
    if mode & 0x80 != 0 {
        limits.max_pending_bytes = 2048;
        limits.max_element_bytes = 1024;
        limits.max_depth = 4;
    }
    let format = match mode & 0x07 {
        0..=3 => SourceFormat::Auto,
        4 => SourceFormat::Opus { sample_rate: 48_000, channels: 2 },
        5 => SourceFormat::Linear16 { sample_rate: 44_100, channels: 2 },
        6 => SourceFormat::Float32 { sample_rate: 8_000, channels: 3 },
        _ => SourceFormat::Mulaw { sample_rate: 8_000, channels: 1 },
    };
    let Ok(mut d) = Decoder::new(format, limits.clone()) else {
        return;
    };
    let mut out = Vec::new();
    let mut x = u32::from(seed) | 1;
    let mut rest = stream;
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let n = (x as usize % 700).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let failed = d.push(chunk, &mut out).is_err();
        assert!(d.stats().pending_bytes <= limits.max_pending_bytes);
        assert!(d.stats().peak_pending_bytes <= limits.max_pending_bytes.max(16));
        while d.poll_event().is_some() {}
        if failed {
            return;
        }
        out.clear();
    }
    let _ = d.finish(&mut out);
});
