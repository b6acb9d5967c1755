//! Output does not depend on how the input is split into chunks.

mod common;
use common::*;
use voxgate_media::demux::DemuxEvent;
use voxgate_media::ogg::OggDemuxer;
use voxgate_media::webm::WebmDemuxer;
use voxgate_media::{Limits, SourceFormat};

/// A demux event with owned data, for comparison.
#[derive(Debug, PartialEq, Eq)]
enum Owned {
    Head(u8, u16),
    Packet(Vec<u8>, u64),
    EndAt(u64),
    Resynced(u64),
    FrameError(&'static str),
}

fn own(ev: DemuxEvent<'_>) -> Owned {
    match ev {
        DemuxEvent::Head(h) => Owned::Head(h.channels, h.pre_skip),
        DemuxEvent::Packet { data, trim_end } => Owned::Packet(data.to_vec(), trim_end),
        DemuxEvent::EndAt { granule } => Owned::EndAt(granule),
        DemuxEvent::Resynced { skipped_bytes } => Owned::Resynced(skipped_bytes),
        DemuxEvent::FrameError(w) => Owned::FrameError(w),
    }
}

macro_rules! demux_all {
    ($demux:expr, $chunks:expr) => {{
        let mut d = $demux;
        let mut out = Vec::new();
        for chunk in $chunks {
            let mut c: &[u8] = chunk;
            loop {
                let n = d.feed(c);
                c = &c[n..];
                while let Some(ev) = d.poll().expect("corpus demuxes") {
                    out.push(own(ev));
                }
                if c.is_empty() {
                    break;
                }
            }
        }
        out
    }};
}

fn webm(chunks: &[&[u8]]) -> Vec<Owned> {
    demux_all!(WebmDemuxer::new(&Limits::default()), chunks.iter().copied())
}

fn ogg(chunks: &[&[u8]]) -> Vec<Owned> {
    demux_all!(OggDemuxer::new(&Limits::default()), chunks.iter().copied())
}

fn every_split(file: &str, demux: fn(&[&[u8]]) -> Vec<Owned>) {
    let data = bytes(file);
    let expected = demux(&[&data]);
    assert!(
        expected
            .iter()
            .filter(|e| matches!(e, Owned::Packet(..)))
            .count()
            > 100
    );
    for cut in 1..data.len() {
        let got = demux(&[&data[..cut], &data[cut..]]);
        assert!(
            got == expected,
            "{file}: demux differs when split at byte {cut}"
        );
    }
}

#[test]
fn webm_demux_identical_at_every_split_short_capture() {
    every_split("captures/chromium_short_250ms.webm", webm);
}

#[test]
fn webm_demux_identical_at_every_split_ffmpeg_file() {
    every_split("reference/short.ffmpeg.webm", webm);
}

#[test]
fn ogg_demux_identical_at_every_split_ffmpeg_file() {
    every_split("reference/short.ffmpeg.ogg", ogg);
}

#[test]
fn pcm_identical_at_sampled_splits_short_capture() {
    let data = bytes("captures/chromium_short_250ms.webm");
    let expected = decode(SourceFormat::Auto, [&data[..]]).pcm;
    for cut in (1..data.len()).step_by(211) {
        let got = decode(SourceFormat::Auto, [&data[..cut], &data[cut..]]).pcm;
        assert!(got == expected, "PCM differs when split at byte {cut}");
    }
}

#[test]
fn one_byte_chunks() {
    for file in [
        "captures/chromium_short_250ms.webm",
        "reference/short.ffmpeg.ogg",
    ] {
        let data = bytes(file);
        let expected = decode(SourceFormat::Auto, [&data[..]]);
        let got = decode(SourceFormat::Auto, data.chunks(1));
        assert_eq!(got.pcm, expected.pcm, "{file}");
        assert_eq!(got.stats.frames, expected.stats.frames);
    }
}

/// xorshift64*: deterministic cut points without a dependency.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n as u64) as usize
    }
}

fn random_splits<'a>(data: &'a [u8], rng: &mut Rng) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = (0..rng.below(400) + 1)
        .map(|_| rng.below(data.len()))
        .collect();
    cuts.extend([0, data.len()]);
    cuts.sort_unstable();
    cuts.windows(2).map(|w| &data[w[0]..w[1]]).collect()
}

#[test]
fn random_multi_splits_long_captures() {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    for (file, rounds) in [
        ("captures/chromium_long_250ms.webm", 3),
        ("captures/firefox_medium_250ms_ogg.ogg", 4),
        ("captures/chromium_medium_250ms.webm", 4),
    ] {
        let data = bytes(file);
        let expected = decode(SourceFormat::Auto, [&data[..]]).pcm;
        for round in 0..rounds {
            let chunks = random_splits(&data, &mut rng);
            let got = decode(SourceFormat::Auto, chunks.iter().copied()).pcm;
            assert!(got == expected, "{file}: round {round} differs");
        }
    }
}

#[test]
fn long_capture_pending_bytes_stay_small() {
    let data = bytes("captures/chromium_long_250ms.webm");
    let index = messages("chromium_long_250ms");
    let run = decode(SourceFormat::Auto, split_by_index(&data, &index));
    eprintln!(
        "chromium_long_250ms peak_pending_bytes = {}",
        run.stats.peak_pending_bytes
    );
    assert!(run.stats.peak_pending_bytes < 8 * 1024, "{:?}", run.stats);
    assert_eq!(run.stats.bytes_in, data.len() as u64);
}
