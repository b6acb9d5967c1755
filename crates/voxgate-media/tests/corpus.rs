//! Every corpus capture and reference file decodes to the reference length and content.

mod common;
use common::*;
use voxgate_media::SourceFormat;

const FRAME_16K: i64 = 320;

fn check_capture(name: &str, ext: &str) {
    let data = bytes(&format!("captures/{name}.{ext}"));
    let index = messages(name);
    let reference = wav(&format!("captures/{name}.decoded-16k.wav"));
    let by_msg = decode(SourceFormat::Auto, split_by_index(&data, &index));
    let whole = decode(SourceFormat::Auto, [&data[..]]);
    assert_eq!(by_msg.pcm, whole.pcm, "{name}: output depends on chunking");
    let delta = by_msg.pcm.len() as i64 - reference.len() as i64;
    let (snr, lag) = best_snr(&by_msg.pcm, &reference, 400);
    eprintln!(
        "{name}: samples {} vs ref {} (delta {delta}), SNR {snr:.1} dB at lag {lag}, stats {:?}",
        by_msg.pcm.len(),
        reference.len(),
        by_msg.stats
    );
    assert!(
        delta.abs() <= FRAME_16K,
        "{name}: sample count off by {delta}"
    );
    assert!(snr > 20.0, "{name}: SNR {snr:.1} dB");
    assert_eq!(by_msg.stats.decode_errors, 0);
    assert_eq!(by_msg.stats.resyncs, 0);
}

#[test]
fn chromium_short_250ms() {
    check_capture("chromium_short_250ms", "webm");
}

#[test]
fn chromium_short_100ms() {
    check_capture("chromium_short_100ms", "webm");
}

#[test]
fn chromium_medium_250ms() {
    check_capture("chromium_medium_250ms", "webm");
}

#[test]
fn chromium_long_250ms() {
    check_capture("chromium_long_250ms", "webm");
}

#[test]
fn firefox_medium_250ms_ogg() {
    check_capture("firefox_medium_250ms_ogg", "ogg");
}

/// ffmpeg-made files (known sizes, Cues, SeekHead, Void, Tags, DiscardPadding, pre-skip 312)
/// decode to the source length within one frame, fed whole and in 1-97-byte pieces.
fn check_reference(file: &str, source: &str) {
    let data = bytes(file);
    let source = pcm16(source);
    let whole = decode(SourceFormat::Auto, [&data[..]]);
    let mut chunks = Vec::new();
    let mut at = 0;
    let mut len = 1;
    while at < data.len() {
        let end = (at + len).min(data.len());
        chunks.push(&data[at..end]);
        at = end;
        len = len % 97 + 1;
    }
    let pieces = decode(SourceFormat::Auto, chunks);
    assert_eq!(whole.pcm, pieces.pcm, "{file}: output depends on chunking");
    let delta = whole.pcm.len() as i64 - source.len() as i64;
    let (snr, lag) = best_snr(&whole.pcm, &source, 400);
    eprintln!(
        "{file}: samples {} vs source {} (delta {delta}), SNR vs source {snr:.1} dB at lag {lag}",
        whole.pcm.len(),
        source.len()
    );
    assert!(
        delta.abs() <= FRAME_16K,
        "{file}: sample count off by {delta}"
    );
    assert!(snr > 10.0, "{file}: SNR vs source {snr:.1} dB");
    assert_eq!(whole.stats.decode_errors, 0);
}

#[test]
fn reference_short_webm() {
    check_reference(
        "reference/short.ffmpeg.webm",
        "reference/short.s16le-16k-mono.pcm",
    );
}

#[test]
fn reference_medium_webm() {
    check_reference(
        "reference/medium.ffmpeg.webm",
        "reference/medium.s16le-16k-mono.pcm",
    );
}

#[test]
fn reference_short_ogg() {
    check_reference(
        "reference/short.ffmpeg.ogg",
        "reference/short.s16le-16k-mono.pcm",
    );
}

#[test]
fn reference_medium_ogg() {
    check_reference(
        "reference/medium.ffmpeg.ogg",
        "reference/medium.s16le-16k-mono.pcm",
    );
}
