//! Hostile and damaged input: errors are classified, nothing panics, nothing stalls.

mod common;
use common::*;
use voxgate_media::demux::DemuxEvent;
use voxgate_media::ebml::{Class, ReadError, Reader, Schema};
use voxgate_media::webm::WebmDemuxer;
use voxgate_media::{Decoder, Limits, MediaError, MediaEvent, SourceFormat};

const CHROME: &str = "captures/chromium_short_250ms.webm";
/// Chromium's init segment: EBML header, Segment (unknown size), Info, Tracks (track 1, Opus).
const INIT_LEN: usize = 146;

fn packets(file: &str, n: usize) -> Vec<Vec<u8>> {
    let data = bytes(file);
    let mut d = WebmDemuxer::new(&Limits::default());
    let mut out = Vec::new();
    let mut rest = &data[..];
    while !rest.is_empty() && out.len() < n {
        let k = d.feed(rest);
        rest = &rest[k..];
        while let Some(ev) = d.poll().unwrap() {
            if let DemuxEvent::Packet { data, .. } = ev {
                out.push(data.to_vec());
            }
        }
    }
    out.truncate(n);
    out
}

/// A Cluster of unknown size with SimpleBlocks on `track` (Matroska §10, no lacing).
fn cluster(track: u8, blocks: &[Vec<u8>]) -> Vec<u8> {
    let mut c = vec![
        0x1F, 0x43, 0xB6, 0x75, 0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
    ];
    c.extend([0xE7, 0x81, 0x00]);
    for b in blocks {
        let size = (b.len() + 4) as u16;
        c.extend([
            0xA3,
            0x40 | (size >> 8) as u8,
            size as u8,
            0x80 | track,
            0,
            0,
            0x80,
        ]);
        c.extend_from_slice(b);
    }
    c
}

fn init() -> Vec<u8> {
    bytes(CHROME)[..INIT_LEN].to_vec()
}

fn push_all(d: &mut Decoder, data: &[u8]) -> Result<Vec<i16>, MediaError> {
    let mut pcm = Vec::new();
    for c in data.chunks(1000) {
        d.push(c, &mut pcm)?;
    }
    d.finish(&mut pcm)?;
    Ok(pcm)
}

fn auto() -> Decoder {
    Decoder::new(SourceFormat::Auto, Limits::default()).unwrap()
}

#[test]
fn random_bytes_are_unsupported() {
    let mut x = 0x1234_5678_9ABC_DEF1u64;
    for round in 0..200 {
        let data: Vec<u8> = (0..64 + round)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        if data.starts_with(&[0x1A, 0x45, 0xDF, 0xA3]) || data.starts_with(b"OggS") {
            continue;
        }
        let err = push_all(&mut auto(), &data).unwrap_err();
        assert!(matches!(&err, MediaError::Unsupported(_)), "{err}");
        assert_eq!(err.code(), "unsupported_format");
    }
    let err = push_all(&mut auto(), &[0x3f, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]).unwrap_err();
    assert_eq!(
        err,
        MediaError::Unsupported(
            "unrecognised bytes 3f 00 01 02 03 04 05 06 (expected WebM or Ogg Opus)".into()
        )
    );
    // Fewer bytes than detection needs, then end of stream: still refused, by name.
    let mut d = auto();
    d.push(&[0x3f, 0], &mut Vec::new()).unwrap();
    assert!(matches!(
        d.finish(&mut Vec::new()),
        Err(MediaError::Unsupported(_))
    ));
}

#[test]
fn mp4_is_refused_by_name() {
    let mut d = auto();
    let mut pcm = Vec::new();
    // Detection waits across chunks, and empty chunks are fine.
    d.push(&[], &mut pcm).unwrap();
    d.push(&[0, 0, 0, 0x24], &mut pcm).unwrap();
    let err = d.push(b"ftypisom\0\0\x02\0", &mut pcm).unwrap_err();
    assert!(
        matches!(&err, MediaError::Unsupported(m) if m.contains("MP4")),
        "{err}"
    );
    // The decoder stays failed.
    assert_eq!(d.push(&[1, 2, 3], &mut pcm).unwrap_err(), err);
}

#[test]
fn truncated_streams_never_panic() {
    for file in [
        CHROME,
        "reference/short.ffmpeg.webm",
        "reference/short.ffmpeg.ogg",
    ] {
        let data = bytes(file);
        let full = decode(SourceFormat::Auto, [&data[..]]).pcm.len();
        let cuts = (0..1200.min(data.len())).chain((1200..data.len()).step_by(173));
        for cut in cuts {
            let mut d = auto();
            let mut pcm = Vec::new();
            let pushed = d.push(&data[..cut], &mut pcm);
            let finished = d.finish(&mut pcm);
            if cut >= 1200 {
                pushed.unwrap();
                finished.unwrap();
                assert!(pcm.len() <= full + 320);
                assert!(
                    d.stats().decode_errors <= 1,
                    "{file} cut {cut}: {:?}",
                    d.stats()
                );
            }
        }
    }
}

#[test]
fn huge_declared_size_in_header_is_a_limit_error() {
    let mut data = init()[..48].to_vec(); // EBML header + Segment
    data.extend([
        0x15, 0x49, 0xA9, 0x66, 0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE,
    ]); // Info, 2^56-2
        // TimestampScale declaring 2^56 - 256 bytes.
    data.extend([
        0x2A, 0xD7, 0xB1, 0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00,
    ]);
    let mut d = auto();
    let err = push_all(&mut d, &data).unwrap_err();
    assert!(matches!(err, MediaError::Limit(_)), "{err}");
    assert!(d.stats().peak_pending_bytes < 4096);
}

#[test]
fn huge_block_inside_a_cluster_resyncs() {
    let pk = packets(CHROME, 20);
    let mut data = init();
    data.extend(cluster(1, &pk[..10]));
    data.extend([
        0xA3, 0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE, 0x81, 0, 0, 0x80,
    ]);
    data.extend(cluster(1, &pk[10..]));
    let mut d = auto();
    push_all(&mut d, &data).unwrap();
    assert_eq!(d.stats().frames, 20);
    assert_eq!(d.stats().resyncs, 1);
}

#[test]
fn nesting_deeper_than_the_cap() {
    // WebM stream: Segment > Tracks > TrackEntry is depth 3; a cap of 2 refuses it.
    let mut limits = Limits::default();
    limits.max_depth = 2;
    let mut d = Decoder::new(SourceFormat::Auto, limits).unwrap();
    let err = push_all(&mut d, &bytes(CHROME)).unwrap_err();
    assert!(matches!(err, MediaError::Limit(_)), "{err}");

    // The raw reader with a schema where every ID nests: fails at max_depth, not later.
    struct AllMasters;
    impl Schema for AllMasters {
        fn classify(&self, _: Option<u32>, _: u32) -> Class {
            Class::Master
        }
        fn may_be_unknown_size(&self, _: u32) -> bool {
            true
        }
    }
    let mut r = Reader::new(AllMasters, &Limits::default(), [0; 4]);
    let nested: Vec<u8> = std::iter::repeat_n([0xA0, 0xFF], 100).flatten().collect();
    r.feed(&nested);
    let mut depth = 0;
    let err = loop {
        match r.next_item() {
            Ok(Some(_)) => depth += 1,
            Ok(None) => panic!("no error"),
            Err(e) => break e,
        }
    };
    assert_eq!(depth, 8);
    assert!(matches!(err, ReadError::TooLarge(_)));
}

#[test]
fn blocks_on_unknown_tracks_are_skipped() {
    let pk = packets(CHROME, 30);
    let mut data = init();
    data.extend(cluster(1, &pk[..10]));
    data.extend(cluster(5, &pk[10..20]));
    data.extend(cluster(1, &pk[20..]));
    let mut d = auto();
    let pcm = push_all(&mut d, &data).unwrap();
    assert_eq!(d.stats().frames, 20);
    assert_eq!(d.stats().decode_errors, 0);
    assert_eq!(pcm.len(), 20 * 960);
}

#[test]
fn corrupt_opus_packets_are_frame_local() {
    let mut pk = packets(CHROME, 40);
    for i in [5, 17, 18, 30] {
        pk[i] = vec![0x03, 0x00, 0x11, 0x22]; // code 3 with zero frames: invalid (RFC 6716 §3.2.5)
    }
    let mut data = init();
    data.extend(cluster(1, &pk));
    let mut d = auto();
    let pcm = push_all(&mut d, &data).unwrap();
    assert_eq!(d.stats().decode_errors, 4);
    assert_eq!(d.stats().frames, 36);
    assert_eq!(pcm.len(), 36 * 960);
    let errors = std::iter::from_fn(|| d.poll_event())
        .filter(|e| matches!(e, MediaEvent::DecodeError { .. }))
        .count();
    assert_eq!(errors, 4);
}

#[test]
fn garbage_between_clusters_resyncs() {
    let pk = packets(CHROME, 30);
    let garbage: &[u8] = b"\x00\x13\x37 this is not an EBML element \xff\xfe\x1f\x43\xb6";
    let mut data = init();
    data.extend(cluster(1, &pk[..15]));
    data.extend(garbage);
    data.extend(cluster(1, &pk[15..]));
    let whole = decode(SourceFormat::Auto, [&data[..]]);
    assert_eq!(whole.stats.resyncs, 1);
    assert_eq!(whole.stats.frames, 30);
    assert!(whole.events.contains(&MediaEvent::Resynced {
        skipped_bytes: garbage.len() as u64
    }));
    // Same result in 1-byte chunks (the scan keeps a 3-byte tail between pushes).
    let small = decode(SourceFormat::Auto, data.chunks(1));
    assert_eq!(small.pcm, whole.pcm);
    assert_eq!(small.events, whole.events);
}

#[test]
fn ogg_bad_crc_resyncs_at_next_page() {
    let mut data = bytes("captures/firefox_medium_250ms_ogg.ogg");
    let clean = decode(SourceFormat::Auto, [&data[..]]);
    let mid = data.len() / 2;
    data[mid] ^= 0x5A;
    let run = decode(SourceFormat::Auto, [&data[..]]);
    assert_eq!(run.stats.resyncs, 1);
    assert!(run.stats.frames < clean.stats.frames);
    assert!(
        run.stats.frames + 20 > clean.stats.frames,
        "{:?}",
        run.stats
    );
}

#[test]
fn header_errors_are_fatal_and_named() {
    let mut data = bytes(CHROME);
    let at = data.windows(4).position(|w| w == b"webm").unwrap();
    data[at..at + 4].copy_from_slice(b"mkv3");
    let err = push_all(&mut auto(), &data).unwrap_err();
    assert!(matches!(err, MediaError::Malformed { .. }), "{err}");

    let mut data = bytes(CHROME);
    let at = data.windows(6).position(|w| w == b"A_OPUS").unwrap();
    data[at..at + 6].copy_from_slice(b"A_VORB");
    let err = push_all(&mut auto(), &data).unwrap_err();
    assert!(
        matches!(&err, MediaError::Unsupported(m) if m.contains("A_VORB")),
        "{err}"
    );
}

#[test]
fn oversized_pending_input_is_a_limit_not_a_stall() {
    let mut limits = Limits::default();
    limits.max_pending_bytes = 1024;
    let pk = packets(CHROME, 40);
    let mut data = init();
    data.extend(cluster(1, &pk));
    let mut d = Decoder::new(SourceFormat::Auto, limits).unwrap();
    let result = push_all(&mut d, &data);
    // Chromium's speech packets exceed 1 KiB: refused with a limit error, never buffered.
    assert!(matches!(result, Err(MediaError::Limit(_))), "{result:?}");
    assert!(d.stats().peak_pending_bytes <= 1024);
}

#[test]
fn a_block_mislabelled_as_laced_is_one_counted_error() {
    // Laced blocks decode (tests/lacing.rs); an unlaced Opus packet whose flags claim Xiph
    // lacing is refused whole: its TOC byte (0xFB) reads as 252 frames, its next bytes as sizes
    // larger than the block.
    let pk = packets(CHROME, 10);
    assert_eq!(pk[0][0], 0xFB);
    let mut data = init();
    let mut c = cluster(1, &pk);
    // Turn the first block's flags into Xiph lacing (flags byte follows track and timestamp).
    let first = c.windows(3).position(|w| w == [0x81, 0, 0]).unwrap();
    c[first + 3] = 0x82;
    data.extend(c);
    let mut d = auto();
    let pcm = push_all(&mut d, &data).unwrap();
    assert_eq!(d.stats().decode_errors, 1);
    assert_eq!(d.stats().frames, 9);
    assert_eq!(pcm.len(), 9 * 960);
    let errors: Vec<MediaEvent> = std::iter::from_fn(|| d.poll_event())
        .filter(|e| matches!(e, MediaEvent::DecodeError { .. }))
        .collect();
    assert_eq!(errors.len(), 1);
    assert!(
        matches!(&errors[0], MediaEvent::DecodeError { what } if what == "laced frame larger than its block"),
        "{errors:?}"
    );
}

#[test]
fn a_restarted_recorder_on_the_same_stream_decodes_both() {
    let one = bytes(CHROME);
    let single = decode(SourceFormat::Auto, [&one[..]]);
    let twice = [one.clone(), one].concat();
    let run = decode(SourceFormat::Auto, twice.chunks(4096));
    assert_eq!(run.pcm, [single.pcm.clone(), single.pcm].concat());
    assert_eq!(run.stats.resyncs, 0);
    assert_eq!(run.stats.decode_errors, 0);
}
