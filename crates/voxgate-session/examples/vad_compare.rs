//! Segmentation quality and cost of the two detector modes on decoded captures, against the
//! pauses of the clean source speech they were recorded from.
//!
//! `cargo run --release -p voxgate-session --example vad_compare -- SILENCE_MS SOURCE.wav
//! CAPTURE.wav [SOURCE.wav CAPTURE.wav ...]` (16 kHz mono WAVs on the same timeline, as the
//! corpus's `source/*.wav` and `captures/*.decoded-16k.wav` are).
//!
//! A reference pause is a run of source frames under -50 dBFS at least `SILENCE_MS` long: the
//! segmenter should end an utterance in each one (recall) and nowhere else (precision), and every
//! source frame above -50 dBFS must lie inside some utterance (speech kept). With `NOISE_DBFS=N`
//! in the environment, white noise at N dBFS is added to each capture first.

use std::time::Instant;

use voxgate_session::{Segment, Segmenter, SegmenterConfig, UtteranceReason, VadMode};

const FRAME: usize = 256;
const RATE: f64 = 16_000.0;

fn read(path: &str) -> Vec<i16> {
    let mut reader = hound::WavReader::open(path).expect("a 16 kHz mono WAV");
    reader.samples::<i16>().map(Result::unwrap).collect()
}

fn quiet(frame: &[i16]) -> bool {
    let energy: f64 = frame.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    10.0 * (energy / (FRAME as f64 * 32768.0 * 32768.0) + 1e-12).log10() < -50.0
}

/// Reference pauses (start, end) in samples, inner ones only (not the lead-in or the tail).
fn pauses(source: &[i16], min_samples: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut run: Option<usize> = None;
    for (i, frame) in source.chunks_exact(FRAME).enumerate() {
        match (quiet(frame), run) {
            (true, None) => run = Some(i * FRAME),
            (false, Some(start)) => {
                if start > 0 && i * FRAME - start >= min_samples {
                    out.push((start, i * FRAME));
                }
                run = None;
            }
            _ => {}
        }
    }
    out
}

struct Run {
    utterances: Vec<(usize, usize)>,
    frames: u64,
    predictions: u64,
    cpu_ms_per_s: f64,
}

fn segment(pcm: &[i16], mode: VadMode, silence_samples: u64) -> Run {
    let cfg = SegmenterConfig {
        vad: mode,
        silence_samples,
        ..SegmenterConfig::default()
    };
    let mut seg = Segmenter::new(cfg);
    let mut out = Vec::new();
    // A benchmark measures wall time itself; the session code never reads the clock.
    #[allow(clippy::disallowed_methods)]
    let t0 = Instant::now();
    for chunk in pcm.chunks(4000) {
        seg.push(chunk, &mut out);
    }
    seg.finalize(UtteranceReason::Close, &mut out);
    let cpu_ms_per_s = t0.elapsed().as_secs_f64() * 1e3 / (pcm.len() as f64 / RATE);
    let utterances = out
        .iter()
        .filter_map(|s| match *s {
            Segment::Ended { start, end, .. } => Some((start as usize, end as usize)),
            Segment::Started { .. } => None,
        })
        .collect();
    let stats = seg.vad_stats();
    Run {
        utterances,
        frames: stats.frames,
        predictions: stats.predictions,
        cpu_ms_per_s,
    }
}

fn report(mode: VadMode, run: &Run, source: &[i16], reference: &[(usize, usize)], silence: usize) {
    // An utterance end "hits" a pause when it falls inside it or within one silence length after
    // it (the segmenter needs that much silence before it can decide).
    let hits = |end: usize| {
        reference
            .iter()
            .any(|&(s, e)| end >= s && end <= e + silence)
    };
    let inner_ends: Vec<usize> = run
        .utterances
        .iter()
        .map(|u| u.1)
        .filter(|&e| e + silence * 2 < source.len())
        .collect();
    let found = reference
        .iter()
        .filter(|&&(s, e)| inner_ends.iter().any(|&end| end >= s && end <= e + silence))
        .count();
    let precise = inner_ends.iter().filter(|&&e| hits(e)).count();
    let speech: Vec<usize> = source
        .chunks_exact(FRAME)
        .enumerate()
        .filter(|(_, f)| !quiet(f))
        .map(|(i, _)| i * FRAME)
        .collect();
    let kept = speech
        .iter()
        .filter(|&&at| {
            run.utterances
                .iter()
                .any(|&(s, e)| at >= s && at + FRAME <= e)
        })
        .count();
    println!(
        "  {mode:?}: {} utterances; pauses found {found}/{}; ends in a pause {precise}/{}; speech frames kept {kept}/{}; detector on {} of {} frames; {:.3} ms CPU per audio second",
        run.utterances.len(),
        reference.len(),
        inner_ends.len(),
        speech.len(),
        run.predictions,
        run.frames,
        run.cpu_ms_per_s
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let silence_ms: usize = args[0].parse().expect("SILENCE_MS");
    let silence = silence_ms * 16;
    for pair in args[1..].chunks(2) {
        let (source, mut capture) = (read(&pair[0]), read(&pair[1]));
        if let Ok(level) = std::env::var("NOISE_DBFS") {
            add_noise(&mut capture, level.parse().expect("NOISE_DBFS in dB"));
        }
        let reference = pauses(&source, silence);
        println!(
            "{} ({:.1} s, {} reference pauses)",
            pair[1],
            capture.len() as f64 / RATE,
            reference.len()
        );
        for mode in [VadMode::Always, VadMode::Gated] {
            report(
                mode,
                &segment(&capture, mode, silence as u64),
                &source,
                &reference,
                silence,
            );
        }
    }
}

/// Adds uniform white noise at `dbfs` (a fixed-seed generator, so runs repeat).
fn add_noise(pcm: &mut [i16], dbfs: f64) {
    // Uniform in [-a, a] has power a^2 / 3.
    let amplitude = 32768.0 * 10f64.powf(dbfs / 20.0) * 3f64.sqrt();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    for sample in pcm {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let unit = (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
        *sample = (f64::from(*sample) + unit * amplitude).clamp(-32768.0, 32767.0) as i16;
    }
}
