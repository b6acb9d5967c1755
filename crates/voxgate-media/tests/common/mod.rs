//! Corpus loaders and signal comparison shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use voxgate_media::{Decoder, Limits, MediaEvent, SourceFormat, Stats};

pub fn corpus(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/corpus")
        .join(rel)
}

pub fn bytes(rel: &str) -> Vec<u8> {
    std::fs::read(corpus(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Message boundaries from `captures/<name>.index.json`.
pub fn messages(name: &str) -> Vec<(usize, usize)> {
    let text = std::fs::read_to_string(corpus(&format!("captures/{name}.index.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["offset"].as_u64().unwrap() as usize,
                m["length"].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

pub fn wav(rel: &str) -> Vec<i16> {
    let mut r = hound::WavReader::open(corpus(rel)).unwrap();
    assert_eq!(r.spec().sample_rate, 16_000);
    r.samples::<i16>().map(|s| s.unwrap()).collect()
}

pub fn pcm16(rel: &str) -> Vec<i16> {
    bytes(rel)
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

pub struct Run {
    pub pcm: Vec<i16>,
    pub stats: Stats,
    pub events: Vec<MediaEvent>,
}

/// Decodes `chunks` in order with `SourceFormat::Auto` (or `format`), then finishes.
pub fn decode<'a>(format: SourceFormat, chunks: impl IntoIterator<Item = &'a [u8]>) -> Run {
    let mut d = Decoder::new(format, Limits::default()).unwrap();
    let mut pcm = Vec::new();
    for c in chunks {
        d.push(c, &mut pcm).unwrap();
    }
    d.finish(&mut pcm).unwrap();
    let mut events = Vec::new();
    while let Some(e) = d.poll_event() {
        events.push(e);
    }
    Run {
        pcm,
        stats: d.stats().clone(),
        events,
    }
}

pub fn split_by_index<'a>(data: &'a [u8], index: &[(usize, usize)]) -> Vec<&'a [u8]> {
    index.iter().map(|&(o, l)| &data[o..o + l]).collect()
}

fn at(x: &[i16], j: i64) -> f64 {
    if j < 0 {
        0.0
    } else {
        x.get(j as usize).map_or(0.0, |&v| f64::from(v))
    }
}

/// SNR in dB of `ours` against `reference` at the best lag in -max_lag..=max_lag (our sample
/// `i + lag` compared with reference sample `i`). The lag is found by cross-correlation over a
/// 3 s window from a quarter into the signal; the SNR is computed over the whole reference.
pub fn best_snr(ours: &[i16], reference: &[i16], max_lag: i64) -> (f64, i64) {
    let from = reference.len() / 4;
    let window = &reference[from..reference.len().min(from + 48_000)];
    let (_, lag) = (-max_lag..=max_lag)
        .map(|lag| {
            let xy: f64 = window
                .iter()
                .enumerate()
                .map(|(i, &r)| f64::from(r) * at(ours, (from + i) as i64 + lag))
                .sum();
            (xy, lag)
        })
        .fold((f64::MIN, 0), |best, c| if c.0 > best.0 { c } else { best });
    let (sig, err) = reference
        .iter()
        .enumerate()
        .fold((0.0, 0.0), |(s, e), (i, &r)| {
            let r = f64::from(r);
            let d = r - at(ours, i as i64 + lag);
            (s + r * r, e + d * d)
        });
    (10.0 * (sig / f64::max(err, 1e-9)).log10(), lag)
}
