//! Raw PCM and G.711 sources, and the resampler.

mod common;
use common::*;
use voxgate_media::resample::Resampler;
use voxgate_media::{Decoder, DetectedFormat, Limits, MediaError, MediaEvent, SourceFormat};

fn run(format: SourceFormat, chunks: &[&[u8]]) -> Vec<i16> {
    decode(format, chunks.iter().copied()).pcm
}

fn le16(s: &[i16]) -> Vec<u8> {
    s.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn correlation(a: &[i16], b: &[i16]) -> f64 {
    let n = a.len().min(b.len());
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for i in 0..n {
        let (x, y) = (f64::from(a[i]), f64::from(b[i]));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa * bb).sqrt()
}

#[test]
fn mulaw_8k_matches_the_16k_source() {
    let data = bytes("reference/short.mulaw-8k-mono.raw");
    let source = pcm16("reference/short.s16le-16k-mono.pcm");
    let fmt = SourceFormat::Mulaw {
        sample_rate: 8000,
        channels: 1,
    };
    let out = run(fmt, &[&data]);
    let (snr, lag) = best_snr(&out, &source, 400);
    let corr = correlation(&out, &source);
    eprintln!(
        "mulaw: {} samples from {} bytes (source {}), SNR {snr:.1} dB at lag {lag}, corr {corr:.4}",
        out.len(),
        data.len(),
        source.len()
    );
    assert!((out.len() as i64 - 2 * data.len() as i64).abs() <= 2);
    assert!((out.len() as i64 - source.len() as i64).abs() <= 320);
    assert_eq!(lag, 0, "the resampler adds no delay");
    assert!(corr > 0.95, "corr {corr}");
    assert!(snr > 12.0, "SNR {snr}");
    // Any split gives the same samples.
    let split = run(fmt, &data.chunks(7).collect::<Vec<_>>());
    assert_eq!(split, out);
}

#[test]
fn mulaw_and_alaw_tables() {
    let mu = run(
        SourceFormat::Mulaw {
            sample_rate: 16_000,
            channels: 1,
        },
        &[&[0x00, 0x80, 0x7F, 0xFF]],
    );
    assert_eq!(mu, [-32124, 32124, 0, 0]);
    let a = run(
        SourceFormat::Alaw {
            sample_rate: 16_000,
            channels: 1,
        },
        &[&[0xD5, 0x55, 0xAA, 0x2A]],
    );
    assert_eq!(a, [8, -8, 32256, -32256]);
}

#[test]
fn linear16_16k_mono_is_bit_exact_at_any_split() {
    let data = bytes("reference/short.s16le-16k-mono.pcm");
    let source = pcm16("reference/short.s16le-16k-mono.pcm");
    let fmt = SourceFormat::Linear16 {
        sample_rate: 16_000,
        channels: 1,
    };
    assert_eq!(run(fmt, &[&data]), source);
    // Odd splits: a sample split across chunks is carried to the next push.
    let chunks: Vec<&[u8]> = data.chunks(333).collect();
    assert_eq!(run(fmt, &chunks), source);
    assert_eq!(run(fmt, &data.chunks(1).collect::<Vec<_>>()), source);
}

#[test]
fn stereo_and_multichannel_downmix() {
    let source = pcm16("reference/short.s16le-16k-mono.pcm");
    let stereo: Vec<i16> = source.iter().flat_map(|&x| [x, x]).collect();
    let fmt = SourceFormat::Linear16 {
        sample_rate: 16_000,
        channels: 2,
    };
    let bytes = le16(&stereo);
    assert_eq!(run(fmt, &[&bytes]), source);
    assert_eq!(run(fmt, &bytes.chunks(3).collect::<Vec<_>>()), source);
    let opposed: Vec<i16> = source
        .iter()
        .flat_map(|&x| [x, x.saturating_neg()])
        .collect();
    assert!(run(fmt, &[&le16(&opposed)]).iter().all(|&s| s.abs() <= 1));
    let six: Vec<i16> = source.iter().flat_map(|&x| [x; 6]).collect();
    let fmt6 = SourceFormat::Linear16 {
        sample_rate: 16_000,
        channels: 6,
    };
    assert_eq!(run(fmt6, &le16(&six).chunks(5).collect::<Vec<_>>()), source);
}

#[test]
fn float32_and_linear8() {
    let f: Vec<u8> = [0.5f32, -1.0, 2.0, f32::NAN]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let out = run(
        SourceFormat::Float32 {
            sample_rate: 16_000,
            channels: 1,
        },
        &[&f[..5], &f[5..]],
    );
    assert_eq!(out, [16384, -32768, 32767, 0]);
    let out = run(
        SourceFormat::Linear8 {
            sample_rate: 16_000,
            channels: 1,
        },
        &[&[128, 0, 255]],
    );
    assert_eq!(out, [0, -32768, 32512]);
}

#[test]
fn trailing_partial_sample_is_counted() {
    let run = decode(
        SourceFormat::Linear16 {
            sample_rate: 16_000,
            channels: 1,
        },
        [&[1u8, 0, 2][..]],
    );
    assert_eq!(run.pcm, [1]);
    assert_eq!(run.stats.decode_errors, 1);
}

#[test]
fn raw_parameters_are_checked() {
    let bad = [
        SourceFormat::Linear16 {
            sample_rate: 7_999,
            channels: 1,
        },
        SourceFormat::Linear16 {
            sample_rate: 48_001,
            channels: 1,
        },
        SourceFormat::Mulaw {
            sample_rate: 8_000,
            channels: 0,
        },
        SourceFormat::Float32 {
            sample_rate: 8_000,
            channels: 9,
        },
        SourceFormat::Opus {
            sample_rate: 44_100,
            channels: 1,
        },
        SourceFormat::Opus {
            sample_rate: 48_000,
            channels: 3,
        },
    ];
    for f in bad {
        assert!(
            matches!(
                Decoder::new(f, Limits::default()),
                Err(MediaError::Params(_))
            ),
            "{f:?}"
        );
    }
    let d = Decoder::new(
        SourceFormat::Mulaw {
            sample_rate: 8_000,
            channels: 1,
        },
        Limits::default(),
    )
    .unwrap();
    assert_eq!(
        d.format(),
        Some(DetectedFormat::Mulaw {
            sample_rate: 8_000,
            channels: 1
        })
    );
}

#[test]
fn raw_opus_packets_one_per_push() {
    let data = bytes("captures/chromium_short_250ms.webm");
    let container = decode(SourceFormat::Auto, [&data[..]]);
    // Re-feed the same packets as raw Opus (pre-skip is 0 in Chromium's stream).
    let mut demux = voxgate_media::webm::WebmDemuxer::new(&Limits::default());
    let mut packets = Vec::new();
    let mut rest = &data[..];
    while !rest.is_empty() {
        let n = demux.feed(rest);
        rest = &rest[n..];
        while let Some(ev) = demux.poll().unwrap() {
            if let voxgate_media::demux::DemuxEvent::Packet { data, .. } = ev {
                packets.push(data.to_vec());
            }
        }
    }
    let mut chunks: Vec<&[u8]> = packets.iter().map(|p| &p[..]).collect();
    chunks.insert(3, &[]);
    let raw = decode(
        SourceFormat::Opus {
            sample_rate: 48_000,
            channels: 1,
        },
        chunks,
    );
    assert_eq!(raw.pcm, container.pcm);
    assert_eq!(raw.stats.frames, packets.len() as u64);
    assert!(matches!(
        raw.events[0],
        MediaEvent::FormatDetected(DetectedFormat::Opus { .. })
    ));
}

fn sine(rate: u32, hz: f64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (10_000.0 * (2.0 * std::f64::consts::PI * hz * i as f64 / f64::from(rate)).sin()) as f32
        })
        .collect()
}

#[test]
fn resampler_output_does_not_depend_on_the_split() {
    let mut x = 0x9E37_79B9u32;
    for rate in [
        8_000, 11_025, 22_050, 24_000, 32_000, 44_100, 48_000, 47_999,
    ] {
        let input = sine(rate, 440.0, rate as usize / 2 + 17);
        let mut whole = Vec::new();
        let mut r = Resampler::new(rate);
        r.process(&input, &mut whole);
        r.finish(&mut whole);
        let expected_len = (input.len() as u64 * 16_000).div_ceil(u64::from(rate));
        assert_eq!(whole.len() as u64, expected_len, "rate {rate}");
        for _ in 0..5 {
            let mut r = Resampler::new(rate);
            let mut out = Vec::new();
            let mut rest = &input[..];
            while !rest.is_empty() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let n = (x as usize % 500).min(rest.len());
                r.process(&rest[..n], &mut out);
                rest = &rest[n..];
            }
            r.finish(&mut out);
            assert_eq!(out, whole, "rate {rate}");
        }
    }
}

#[test]
fn resampler_keeps_level_and_alignment() {
    for rate in [8_000, 44_100, 48_000] {
        let input = sine(rate, 1000.0, rate as usize);
        let mut out = Vec::new();
        let mut r = Resampler::new(rate);
        r.process(&input, &mut out);
        r.finish(&mut out);
        let expected: Vec<f32> = sine(16_000, 1000.0, out.len());
        // Compare away from the edges: same phase (no delay), same level.
        let err: f64 = (200..out.len() - 200)
            .map(|i| (f64::from(out[i]) - f64::from(expected[i])).powi(2))
            .sum::<f64>()
            / (out.len() - 400) as f64;
        let rms_err = err.sqrt();
        assert!(rms_err < 10.0, "rate {rate}: rms error {rms_err}");
    }
}

#[test]
fn lost_opus_packets_are_concealed_from_the_decoder_state_not_silenced() {
    let data = bytes("captures/chromium_short_250ms.webm");
    let mut demux = voxgate_media::webm::WebmDemuxer::new(&Limits::default());
    let mut packets = Vec::new();
    let mut rest = &data[..];
    while !rest.is_empty() {
        let n = demux.feed(rest);
        rest = &rest[n..];
        while let Some(ev) = demux.poll().unwrap() {
            if let voxgate_media::demux::DemuxEvent::Packet { data, .. } = ev {
                packets.push(data.to_vec());
            }
        }
    }
    let format = SourceFormat::Opus {
        sample_rate: 48_000,
        channels: 1,
    };
    let whole = run(format, &packets.iter().map(|p| &p[..]).collect::<Vec<_>>());
    // Find the packet with the most energy (speech), and lose it.
    let mut dec = Decoder::new(format, Limits::default()).unwrap();
    let mut starts = Vec::new();
    let mut out = Vec::new();
    for p in &packets {
        starts.push(out.len());
        dec.push(p, &mut out).unwrap();
    }
    starts.push(out.len());
    let rms = |s: &[i16]| {
        (s.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / s.len().max(1) as f64).sqrt()
    };
    let lost = (1..packets.len() - 1)
        .max_by(|&a, &b| {
            rms(&whole[starts[a]..starts[a + 1]]).total_cmp(&rms(&whole[starts[b]..starts[b + 1]]))
        })
        .unwrap();
    let lost_len = (starts[lost + 1] - starts[lost]) as u64;

    let mut dec = Decoder::new(format, Limits::default()).unwrap();
    assert_eq!(
        dec.conceal(320, &mut Vec::new()),
        0,
        "nothing to continue from yet"
    );
    let mut out = Vec::new();
    for (i, p) in packets.iter().enumerate() {
        if i == lost {
            let got = dec.conceal(lost_len, &mut out);
            assert_eq!(got, lost_len, "a 2.5 ms multiple is concealed whole");
        } else {
            dec.push(p, &mut out).unwrap();
        }
    }
    assert_eq!(out.len(), whole.len(), "concealment keeps the timeline");
    // However long the gap, at most 120 ms (1,920 samples) is concealed; the rest is the
    // caller's silence.
    let capped = dec.conceal(u64::MAX, &mut Vec::new());
    assert!((1800..=1940).contains(&capped), "{capped}");
    let original = rms(&whole[starts[lost]..starts[lost + 1]]);
    let concealed = rms(&out[starts[lost]..starts[lost + 1]]);
    assert!(
        concealed > original * 0.1,
        "the gap carries the signal on (rms {concealed:.0} vs {original:.0}), not silence"
    );
    // Other formats leave concealment to the caller.
    let mut pcm = Decoder::new(
        SourceFormat::Linear16 {
            sample_rate: 16_000,
            channels: 1,
        },
        Limits::default(),
    )
    .unwrap();
    pcm.push(&[0, 0, 0, 0], &mut Vec::new()).unwrap();
    assert_eq!(pcm.conceal(320, &mut Vec::new()), 0);
}
