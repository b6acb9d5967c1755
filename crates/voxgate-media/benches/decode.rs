//! WebM/Opus -> 16 kHz PCM throughput on the real Chromium capture, fed by its WebSocket message
//! boundaries, in x-real-time on one core. Also compares decoding Opus straight at 16 kHz with
//! decoding at 48 kHz and resampling.
//!
//! `cargo bench -p voxgate-media --bench decode`

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use voxgate_media::demux::DemuxEvent;
use voxgate_media::opus_stage::OpusStage;
use voxgate_media::webm::WebmDemuxer;
use voxgate_media::{Decoder, Limits, SourceFormat};

const NAME: &str = "chromium_long_250ms";

fn corpus(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/corpus")
        .join(rel)
}

fn messages(data: &[u8]) -> Vec<&[u8]> {
    let text = std::fs::read_to_string(corpus(&format!("captures/{NAME}.index.json"))).unwrap();
    // Minimal scan of `"offset": N, "length": M` pairs (no JSON dependency in benches).
    let nums = |key: &str| -> Vec<usize> {
        text.match_indices(key)
            .map(|(i, _)| {
                let rest = &text[i + key.len()..];
                let rest = rest.trim_start_matches([':', ' ']);
                let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap();
                rest[..end].parse().unwrap()
            })
            .collect()
    };
    let (offsets, lengths) = (nums("\"offset\""), nums("\"length\""));
    offsets
        .iter()
        .zip(&lengths)
        .map(|(&o, &l)| &data[o..o + l])
        .collect()
}

/// Best of `rounds` wall times (least disturbed by other load).
#[allow(clippy::disallowed_methods)] // a benchmark is the one place that reads the clock
fn best<T>(rounds: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..rounds {
        let t = Instant::now();
        let r = black_box(f());
        best = best.min(t.elapsed());
        last = Some(r);
    }
    (best, last.expect("rounds > 0"))
}

fn report(what: &str, audio_s: f64, took: Duration) {
    println!(
        "{what:<44} {:>8.1} ms  {:>7.0}x real time",
        took.as_secs_f64() * 1e3,
        audio_s / took.as_secs_f64()
    );
}

fn main() {
    let data = std::fs::read(corpus(&format!("captures/{NAME}.webm"))).unwrap();
    let chunks = messages(&data);
    let rounds = 7;

    let (took, samples) = best(rounds, || {
        let mut d = Decoder::new(SourceFormat::Auto, Limits::default()).unwrap();
        let mut out = Vec::with_capacity(2_500_000);
        for c in &chunks {
            d.push(c, &mut out).unwrap();
        }
        d.finish(&mut out).unwrap();
        out.len()
    });
    let audio_s = samples as f64 / 16_000.0;
    println!(
        "{NAME}: {} bytes, {} messages, {audio_s:.2} s of audio",
        data.len(),
        chunks.len()
    );
    report("Decoder (WebM demux + Opus@16k), by message", audio_s, took);

    let (took, packets) = best(rounds, || {
        let mut demux = WebmDemuxer::new(&Limits::default());
        let mut packets: Vec<Vec<u8>> = Vec::new();
        for c in &chunks {
            let mut c: &[u8] = c;
            while !c.is_empty() {
                let n = demux.feed(c);
                c = &c[n..];
                while let Some(ev) = demux.poll().unwrap() {
                    if let DemuxEvent::Packet { data, .. } = ev {
                        packets.push(data.to_vec());
                    }
                }
            }
        }
        packets
    });
    report("WebM demux only", audio_s, took);

    for rate in [16_000, 48_000] {
        let (took, n) = best(rounds, || {
            let mut stage = OpusStage::new(rate, 0).unwrap();
            let mut out = Vec::with_capacity(2_500_000);
            for p in &packets {
                stage.decode(p, 0, &mut out).unwrap();
            }
            stage.finish(&mut out);
            out.len()
        });
        let label = if rate == 16_000 {
            "Opus decode at 16 kHz (no resampler)".to_owned()
        } else {
            format!("Opus decode at {} kHz + resample to 16 kHz", rate / 1000)
        };
        report(&label, n as f64 / 16_000.0, took);
    }
}
