//! Matroska lacing (Xiph, fixed-size, EBML): a corpus capture re-muxed into laced blocks decodes
//! to the same packets and PCM as the original, at every split; malformed lacing is one counted
//! decode error per block and never a panic.

mod common;
use common::*;
use proptest::prelude::*;
use voxgate_media::demux::DemuxEvent;
use voxgate_media::webm::WebmDemuxer;
use voxgate_media::{Limits, MediaEvent, SourceFormat};

const CHROME: &str = "captures/chromium_short_250ms.webm";
/// ffmpeg's file: pre-skip 312 and DiscardPadding on its last block.
const FFMPEG: &str = "reference/short.ffmpeg.webm";

// ---- A test-only WebM muxer ------------------------------------------------------------------

/// An EBML data size, in the shortest vint that is not the reserved all-ones value.
fn size_vint(n: u64) -> Vec<u8> {
    let len = (1..=8).find(|&l| n < (1u64 << (7 * l)) - 1).unwrap();
    let marked = n | (1u64 << (7 * len));
    marked.to_be_bytes()[8 - len..].to_vec()
}

/// A signed EBML lace size difference: the value plus 2^(7n-1) - 1, in the shortest n.
fn signed_vint(d: i64) -> Vec<u8> {
    let len = (1..=8)
        .find(|&l| d.unsigned_abs() < (1u64 << (7 * l - 1)) - 1 || d == 0)
        .unwrap();
    let raw = (d + ((1i64 << (7 * len - 1)) - 1)) as u64;
    let marked = raw | (1u64 << (7 * len));
    marked.to_be_bytes()[8 - len..].to_vec()
}

fn element(id: u32, body: &[u8]) -> Vec<u8> {
    let id = id.to_be_bytes();
    let skip = id.iter().position(|&b| b != 0).unwrap();
    [&id[skip..], &size_vint(body.len() as u64), body].concat()
}

fn uint_element(id: u32, v: u64) -> Vec<u8> {
    element(id, &v.to_be_bytes())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lacing {
    None,
    Xiph,
    Fixed,
    Ebml,
}

impl Lacing {
    fn bits(self) -> u8 {
        match self {
            Lacing::None => 0,
            Lacing::Xiph => 0x02,
            Lacing::Fixed => 0x04,
            Lacing::Ebml => 0x06,
        }
    }
}

/// The payload of a laced block (count byte, sizes, frames), Matroska §10.3.
fn lace(lacing: Lacing, frames: &[Vec<u8>]) -> Vec<u8> {
    if lacing == Lacing::None {
        assert_eq!(frames.len(), 1);
        return frames[0].clone();
    }
    assert!((1..=256).contains(&frames.len()));
    let mut p = vec![(frames.len() - 1) as u8];
    let coded = &frames[..frames.len() - 1];
    match lacing {
        Lacing::Xiph => {
            for f in coded {
                p.extend(std::iter::repeat_n(0xFF, f.len() / 255));
                p.push((f.len() % 255) as u8);
            }
        }
        Lacing::Fixed => assert!(frames.iter().all(|f| f.len() == frames[0].len())),
        Lacing::Ebml => {
            for (i, f) in coded.iter().enumerate() {
                if i == 0 {
                    p.extend(size_vint(f.len() as u64));
                } else {
                    p.extend(signed_vint(f.len() as i64 - coded[i - 1].len() as i64));
                }
            }
        }
        Lacing::None => unreachable!(),
    }
    for f in frames {
        p.extend_from_slice(f);
    }
    p
}

/// One block to write: a SimpleBlock, or a BlockGroup when `discard_ns` is set.
#[derive(Clone, Debug)]
struct Block {
    flags: u8,
    payload: Vec<u8>,
    discard_ns: Option<i64>,
}

impl Block {
    fn simple(lacing: Lacing, frames: &[Vec<u8>]) -> Self {
        Self {
            flags: 0x80 | lacing.bits(),
            payload: lace(lacing, frames),
            discard_ns: None,
        }
    }

    fn group(lacing: Lacing, frames: &[Vec<u8>], discard_ns: i64) -> Self {
        Self {
            flags: lacing.bits(),
            payload: lace(lacing, frames),
            discard_ns: Some(discard_ns),
        }
    }

    /// A block with these raw flags and payload bytes (for malformed lacing).
    fn raw(flags: u8, payload: &[u8]) -> Self {
        Self {
            flags,
            payload: payload.to_vec(),
            discard_ns: None,
        }
    }

    fn bytes(&self, timecode: i16) -> Vec<u8> {
        let t = timecode.to_be_bytes();
        let body = [&[0x81, t[0], t[1], self.flags][..], &self.payload].concat();
        match self.discard_ns {
            None => element(0xA3, &body),
            Some(ns) => {
                let mut g = element(0xA1, &body);
                if ns != 0 {
                    g.extend(element(0x75A2, &ns.to_be_bytes()));
                }
                element(0xA0, &g)
            }
        }
    }
}

/// A WebM file: EBML header, a Segment of unknown size, Info, Tracks with one Opus track
/// (TrackNumber 1, `codec_private` as CodecPrivate), then Clusters of known size, 8 blocks each.
fn mux(codec_private: &[u8], blocks: &[Block]) -> Vec<u8> {
    let mut out = element(
        0x1A45_DFA3,
        &[
            uint_element(0x4286, 1),
            uint_element(0x42F7, 1),
            uint_element(0x42F2, 4),
            uint_element(0x42F3, 8),
            element(0x4282, b"webm"),
            uint_element(0x4287, 4),
            uint_element(0x4285, 2),
        ]
        .concat(),
    );
    out.extend([
        0x18, 0x53, 0x80, 0x67, 0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
    ]);
    out.extend(element(0x1549_A966, &uint_element(0x2A_D7B1, 1_000_000)));
    let entry = [
        uint_element(0xD7, 1),
        uint_element(0x73C5, 0x1234_5678),
        uint_element(0x83, 2),
        element(0x86, b"A_OPUS"),
        element(0x63A2, codec_private),
        element(0xE1, &uint_element(0x9F, 1)),
    ]
    .concat();
    out.extend(element(0x1654_AE6B, &element(0xAE, &entry)));
    for (i, chunk) in blocks.chunks(8).enumerate() {
        let mut c = uint_element(0xE7, i as u64 * 1000);
        for (j, b) in chunk.iter().enumerate() {
            c.extend(b.bytes(j as i16 * 60));
        }
        out.extend(element(0x1F43_B675, &c));
    }
    out
}

// ---- Source packets ----------------------------------------------------------------------------

/// A corpus file's Opus packets with their end trims, by the crate's own demuxer, and the
/// CodecPrivate (OpusHead) copied from the file.
struct Source {
    head: Vec<u8>,
    packets: Vec<(Vec<u8>, u64)>,
}

fn source(file: &str) -> Source {
    let data = bytes(file);
    let at = data.windows(8).position(|w| w == b"OpusHead").unwrap();
    // CodecPrivate ID 0x63A2 and a one-byte size precede the OpusHead.
    assert_eq!(data[at - 3..at - 1], [0x63, 0xA2], "{file}");
    let len = usize::from(data[at - 1] & 0x7F);
    let head = data[at..at + len].to_vec();
    let packets = demux(&[&data])
        .into_iter()
        .map(|ev| match ev {
            Ev::Packet(p, trim) => (p, trim),
            other => panic!("{file}: unexpected {other:?}"),
        })
        .collect();
    Source { head, packets }
}

/// A demux event with owned data (the Head is left out).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    Packet(Vec<u8>, u64),
    Resynced(u64),
    FrameError(&'static str),
    EndAt(u64),
}

/// Demuxes `chunks` in order, feeding each until taken.
fn demux(chunks: &[&[u8]]) -> Vec<Ev> {
    let mut d = WebmDemuxer::new(&Limits::default());
    let mut out = Vec::new();
    for chunk in chunks {
        let mut c: &[u8] = chunk;
        loop {
            let n = d.feed(c);
            c = &c[n..];
            while let Some(ev) = d.poll().expect("demuxes") {
                out.push(match ev {
                    DemuxEvent::Head(_) => continue,
                    DemuxEvent::Packet { data, trim_end } => Ev::Packet(data.to_vec(), trim_end),
                    DemuxEvent::Resynced { skipped_bytes } => Ev::Resynced(skipped_bytes),
                    DemuxEvent::FrameError(w) => Ev::FrameError(w),
                    DemuxEvent::EndAt { granule } => Ev::EndAt(granule),
                });
            }
            if c.is_empty() {
                break;
            }
        }
    }
    out
}

/// Expected demux output for these packets.
fn packet_events(packets: &[(Vec<u8>, u64)]) -> Vec<Ev> {
    packets
        .iter()
        .map(|(p, t)| Ev::Packet(p.clone(), *t))
        .collect()
}

/// DiscardPadding in ns that converts back to `trim` samples at 48 kHz.
fn trim_to_ns(trim: u64) -> i64 {
    (trim * 1_000_000_000).div_ceil(48_000) as i64
}

/// Pads Opus packets (RFC 6716 §3.2.5 code 3 padding) to one length, for fixed-size lacing:
/// they decode to the same samples.
fn pad_to_same_length(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let target = frames.iter().map(Vec::len).max().unwrap() + 3;
    frames
        .iter()
        .map(|f| {
            let mut p = f.clone();
            p.resize(target, 0);
            opus::packet::pad(&mut p, f.len()).unwrap();
            p
        })
        .collect()
}

/// Groups of 2, 3 and 4 packets in turn; a packet with an end trim always ends its group.
fn groups(packets: &[(Vec<u8>, u64)]) -> Vec<&[(Vec<u8>, u64)]> {
    let mut out = Vec::new();
    let mut rest = packets;
    let mut want = 2;
    while !rest.is_empty() {
        let mut n = want.min(rest.len());
        if let Some(t) = rest[..n - 1].iter().position(|(_, trim)| *trim > 0) {
            n = t + 1;
        }
        out.push(&rest[..n]);
        rest = &rest[n..];
        want = want % 4 + 2;
    }
    out
}

/// The packets re-muxed into laced blocks of 2-4 frames; BlockGroups (with DiscardPadding on
/// the last frame's trim) when `in_groups` or when a group carries a trim. Also returns the
/// packets as the file holds them (padded for fixed lacing).
fn relaced(src: &Source, lacing: Lacing, in_groups: bool) -> (Vec<u8>, Vec<(Vec<u8>, u64)>) {
    let mut blocks = Vec::new();
    let mut held = Vec::new();
    for g in groups(&src.packets) {
        let mut frames: Vec<Vec<u8>> = g.iter().map(|(p, _)| p.clone()).collect();
        if lacing == Lacing::Fixed {
            frames = pad_to_same_length(&frames);
        }
        let trim = g.last().unwrap().1;
        blocks.push(if in_groups || trim > 0 {
            Block::group(lacing, &frames, trim_to_ns(trim))
        } else {
            Block::simple(lacing, &frames)
        });
        let last = frames.len() - 1;
        held.extend(
            frames
                .into_iter()
                .enumerate()
                .map(|(i, f)| (f, if i == last { trim } else { 0 })),
        );
    }
    (mux(&src.head, &blocks), held)
}

/// The packets re-muxed one per block, unlaced (a BlockGroup where a packet carries a trim).
fn unlaced(src: &Source) -> Vec<u8> {
    let blocks: Vec<Block> = src
        .packets
        .iter()
        .map(|(p, trim)| {
            if *trim > 0 {
                Block::group(Lacing::None, std::slice::from_ref(p), trim_to_ns(*trim))
            } else {
                Block::simple(Lacing::None, std::slice::from_ref(p))
            }
        })
        .collect();
    mux(&src.head, &blocks)
}

const KINDS: [Lacing; 3] = [Lacing::Xiph, Lacing::Fixed, Lacing::Ebml];

// ---- Laced files decode like the original -------------------------------------------------------

#[test]
fn muxer_round_trips_unlaced() {
    for file in [CHROME, FFMPEG] {
        let src = source(file);
        assert!(src.packets.len() > 100);
        let original = decode(SourceFormat::Auto, [&bytes(file)[..]]);
        let remuxed = unlaced(&src);
        assert_eq!(demux(&[&remuxed]), packet_events(&src.packets), "{file}");
        let run = decode(SourceFormat::Auto, [&remuxed[..]]);
        assert_eq!(run.pcm, original.pcm, "{file}");
        assert_eq!(run.stats.frames, original.stats.frames);
    }
}

#[test]
fn laced_files_decode_like_the_original() {
    for file in [CHROME, FFMPEG] {
        let src = source(file);
        let original = decode(SourceFormat::Auto, [&bytes(file)[..]]);
        assert_eq!(original.stats.decode_errors, 0);
        if file == FFMPEG {
            // Its trimmed packet ends a laced block of more than one frame.
            let trimmed = groups(&src.packets)
                .into_iter()
                .find(|g| g.iter().any(|(_, t)| *t > 0))
                .expect("the ffmpeg file trims a packet");
            assert!(trimmed.len() > 1 && trimmed.last().unwrap().1 > 0);
        }
        for lacing in KINDS {
            for in_groups in [false, true] {
                let (data, held) = relaced(&src, lacing, in_groups);
                let what = format!("{file} {lacing:?} in_groups={in_groups}");
                // Every frame is one packet, in order; the trim goes to the block's last frame.
                assert_eq!(demux(&[&data]), packet_events(&held), "{what}");
                if lacing != Lacing::Fixed {
                    assert_eq!(held, src.packets, "{what}");
                }
                let whole = decode(SourceFormat::Auto, [&data[..]]);
                assert_eq!(whole.pcm.len(), original.pcm.len(), "{what}: sample count");
                assert!(whole.pcm == original.pcm, "{what}: PCM differs");
                assert_eq!(whole.stats.frames, src.packets.len() as u64, "{what}");
                assert_eq!(whole.stats.decode_errors, 0, "{what}");
                assert_eq!(whole.stats.resyncs, 0, "{what}");
                eprintln!(
                    "{what}: {} bytes (original {}), {} packets, {} samples",
                    data.len(),
                    bytes(file).len(),
                    held.len(),
                    whole.pcm.len()
                );
            }
        }
    }
}

#[test]
fn laced_demux_identical_at_every_split() {
    for (file, in_groups) in [(CHROME, false), (FFMPEG, true)] {
        let src = source(file);
        for lacing in KINDS {
            let (data, held) = relaced(&src, lacing, in_groups);
            let expected = packet_events(&held);
            for cut in 1..data.len() {
                let got = demux(&[&data[..cut], &data[cut..]]);
                assert!(
                    got == expected,
                    "{file} {lacing:?}: demux differs when split at byte {cut}"
                );
            }
        }
    }
}

#[test]
fn laced_pcm_identical_at_sampled_splits_and_in_small_chunks() {
    for (file, in_groups) in [(CHROME, false), (FFMPEG, true)] {
        let src = source(file);
        let expected = decode(SourceFormat::Auto, [&bytes(file)[..]]).pcm;
        for lacing in KINDS {
            let (data, _) = relaced(&src, lacing, in_groups);
            for cut in (1..data.len()).step_by(211) {
                let got = decode(SourceFormat::Auto, [&data[..cut], &data[cut..]]).pcm;
                assert!(got == expected, "{file} {lacing:?}: PCM differs at {cut}");
            }
            for size in [1, 7, 97] {
                let got = decode(SourceFormat::Auto, data.chunks(size));
                assert!(got.pcm == expected, "{file} {lacing:?}: {size}-byte chunks");
                assert_eq!(got.stats.frames, src.packets.len() as u64);
            }
        }
    }
}

#[test]
fn discard_padding_trims_the_last_frame_of_a_laced_block_only() {
    let src = source(CHROME);
    let pk: Vec<Vec<u8>> = src.packets[..12].iter().map(|(p, _)| p.clone()).collect();
    let ns = 5_000_000; // 5 ms: 240 samples at 48 kHz, 80 at 16 kHz
    for lacing in KINDS {
        let mut frames = pk[3..6].to_vec();
        if lacing == Lacing::Fixed {
            frames = pad_to_same_length(&frames);
        }
        let mut blocks: Vec<Block> = pk[..3]
            .iter()
            .map(|p| Block::simple(Lacing::None, std::slice::from_ref(p)))
            .collect();
        blocks.push(Block::group(lacing, &frames, ns));
        blocks.extend(
            pk[6..]
                .iter()
                .map(|p| Block::simple(Lacing::None, std::slice::from_ref(p))),
        );
        let data = mux(&src.head, &blocks);
        let events = demux(&[&data]);
        let trims: Vec<u64> = events
            .iter()
            .map(|e| match e {
                Ev::Packet(_, t) => *t,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(trims, [0, 0, 0, 0, 0, 240, 0, 0, 0, 0, 0, 0], "{lacing:?}");

        // Same PCM as the unlaced stream with the padding on the third frame's own BlockGroup.
        let mut reference: Vec<Block> = pk
            .iter()
            .map(|p| Block::simple(Lacing::None, std::slice::from_ref(p)))
            .collect();
        reference[5] = Block::group(Lacing::None, &pk[5..6], ns);
        let expected = decode(SourceFormat::Auto, [&mux(&src.head, &reference)[..]]);
        let got = decode(SourceFormat::Auto, [&data[..]]);
        assert!(got.pcm == expected.pcm, "{lacing:?}");
        let full = decode(
            SourceFormat::Auto,
            [&mux(&src.head, &blocks_unlaced(&pk))[..]],
        );
        assert_eq!(got.pcm.len() + 80, full.pcm.len(), "{lacing:?}");
    }
}

fn blocks_unlaced(pk: &[Vec<u8>]) -> Vec<Block> {
    pk.iter()
        .map(|p| Block::simple(Lacing::None, std::slice::from_ref(p)))
        .collect()
}

// ---- Malformed lacing ---------------------------------------------------------------------------

/// Blocks whose lacing cannot be right, each with what the demuxer says about it.
fn malformed() -> Vec<(&'static str, Block)> {
    let data = |n: usize| (0..n).map(|i| i as u8 | 0x08).collect::<Vec<u8>>();
    vec![
        // Xiph: 3 frames whose two coded sizes (150 + 150) overrun a 200-byte payload.
        (
            "laced frame sizes exceed the block",
            Block::raw(0x82, &[&[0x02, 150, 150][..], &data(200)].concat()),
        ),
        // Xiph: a coded size larger than the whole block.
        (
            "laced frame larger than its block",
            Block::raw(0x82, &[&[0x01, 0xFF, 0xFF, 0x10][..], &data(40)].concat()),
        ),
        // Xiph: 3 frames, but the block ends after the first coded size.
        (
            "lace sizes run past the end of the block",
            Block::raw(0x82, &[0x02, 0x01]),
        ),
        // EBML: first size 50, then +60 (110): the total passes the 120-byte payload, the last
        // frame would be negative.
        (
            "laced frame sizes exceed the block",
            Block::raw(
                0x86,
                &[&[0x02, 0x80 | 50][..], &signed_vint(60), &data(120)].concat(),
            ),
        ),
        // EBML: first size 10, then -30: a negative size.
        (
            "negative EBML lace size",
            Block::raw(
                0x86,
                &[&[0x02, 0x80 | 10][..], &signed_vint(-30), &data(60)].concat(),
            ),
        ),
        // EBML: an invalid vint (zero first byte).
        (
            "invalid EBML lace size",
            Block::raw(0x86, &[&[0x01, 0x00][..], &data(30)].concat()),
        ),
        // Fixed: 3 frames over 100 bytes.
        (
            "fixed-size lacing does not divide the block",
            Block::raw(0x84, &[&[0x02][..], &data(100)].concat()),
        ),
        // Laced, but no frame count at all.
        ("laced block without a frame count", Block::raw(0x82, &[])),
    ]
}

#[test]
fn malformed_lacing_is_a_counted_decode_error() {
    let src = source(CHROME);
    let pk: Vec<Vec<u8>> = src.packets[..40].iter().map(|(p, _)| p.clone()).collect();
    let bad = malformed();
    for in_group in [false, true] {
        // Good laced and unlaced blocks around each malformed one.
        let mut blocks = Vec::new();
        let mut good = Vec::new();
        let mut expected_events = Vec::new();
        let mut it = pk.chunks(4).zip(KINDS.iter().cycle());
        for (what, b) in &bad {
            let (frames, &lacing) = it.next().unwrap();
            blocks.push(Block::simple(lacing, &pad_if_fixed(lacing, frames)));
            good.extend(pad_if_fixed(lacing, frames));
            expected_events.extend(
                pad_if_fixed(lacing, frames)
                    .into_iter()
                    .map(|f| Ev::Packet(f, 0)),
            );
            let mut b = b.clone();
            if in_group {
                b.flags &= 0x7F;
                b.discard_ns = Some(0);
            }
            blocks.push(b);
            expected_events.push(Ev::FrameError(what));
        }
        for (frames, &lacing) in it {
            blocks.push(Block::group(lacing, &pad_if_fixed(lacing, frames), 0));
            good.extend(pad_if_fixed(lacing, frames));
            expected_events.extend(
                pad_if_fixed(lacing, frames)
                    .into_iter()
                    .map(|f| Ev::Packet(f, 0)),
            );
        }
        let data = mux(&src.head, &blocks);
        let got = demux(&[&data]);
        assert!(
            got == expected_events,
            "in_group={in_group}: {:?}",
            brief(&got)
        );

        // The same decode as the good blocks alone, with one counted error per bad block.
        let clean = mux(&src.head, &blocks_unlaced(&good));
        let expected = decode(SourceFormat::Auto, [&clean[..]]);
        for chunks in [
            vec![&data[..]],
            data.chunks(1).collect(),
            data.chunks(61).collect(),
        ] {
            let run = decode(SourceFormat::Auto, chunks);
            assert!(run.pcm == expected.pcm, "in_group={in_group}");
            assert_eq!(run.stats.decode_errors, bad.len() as u64);
            assert_eq!(run.stats.frames, good.len() as u64);
            assert_eq!(run.stats.resyncs, 0);
            let errors: Vec<String> = run
                .events
                .iter()
                .filter_map(|e| match e {
                    MediaEvent::DecodeError { what } => Some(what.clone()),
                    _ => None,
                })
                .collect();
            let wanted: Vec<String> = bad.iter().map(|(w, _)| w.to_string()).collect();
            assert_eq!(errors, wanted);
        }
        // At every split, the demuxer says the same.
        for cut in 1..data.len() {
            assert!(
                demux(&[&data[..cut], &data[cut..]]) == expected_events,
                "in_group={in_group}: split at {cut}"
            );
        }
    }
}

/// Events with packets shown by length, for failure messages.
fn brief(events: &[Ev]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            Ev::Packet(p, t) => format!("packet {} bytes, trim {t}", p.len()),
            other => format!("{other:?}"),
        })
        .collect()
}

fn pad_if_fixed(lacing: Lacing, frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    if lacing == Lacing::Fixed {
        pad_to_same_length(frames)
    } else {
        frames.to_vec()
    }
}

#[test]
fn frame_counts_up_to_256() {
    // A count byte of 0xFF is 256 frames: fixed lacing of 256 one-byte frames, each an Opus
    // packet (TOC 0xF8: CELT fullband 20 ms, code 0, no payload: silence).
    let src = source(CHROME);
    let frames = vec![vec![0xF8u8]; 256];
    for lacing in KINDS {
        let data = mux(&src.head, &[Block::simple(lacing, &frames)]);
        let events = demux(&[&data]);
        assert_eq!(events, vec![Ev::Packet(vec![0xF8], 0); 256], "{lacing:?}");
        let run = decode(SourceFormat::Auto, [&data[..]]);
        assert_eq!(run.stats.frames, 256);
        assert_eq!(run.pcm.len(), 256 * 320);
    }
}

// ---- Random lacing never panics -----------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// A block with random lacing bits, count and bytes between good blocks: the demuxer
    /// either refuses it as one frame error or hands out exactly `count` frames that tile what
    /// follows the lace header; the good blocks around it always come through.
    #[test]
    fn random_laced_blocks(
        flags in 0u8..8,
        count in any::<u8>(),
        rest in proptest::collection::vec(
            prop_oneof![Just(0xFFu8), 0u8..8, 0x40u8..0x42, 0x80u8..0x84, any::<u8>()],
            0..700,
        ),
        in_group in any::<bool>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let src = source_cached();
        let payload = [&[count][..], &rest].concat();
        let lacing = flags & 0x06;
        let block = Block {
            flags: if in_group { flags } else { 0x80 | flags },
            payload: payload.clone(),
            discard_ns: in_group.then_some(0),
        };
        let pk = [src.packets[0].0.clone(), src.packets[1].0.clone()];
        let before = Block::simple(Lacing::None, &pk[..1]);
        let after = Block::simple(Lacing::None, &pk[1..]);
        let data = mux(&src.head, &[before, block, after]);
        let whole = demux(&[&data]);
        let cut = cut.index(data.len() - 1) + 1;
        prop_assert_eq!(&demux(&[&data[..cut], &data[cut..]]), &whole);
        prop_assert_eq!(&whole[0], &Ev::Packet(pk[0].clone(), 0));
        prop_assert_eq!(whole.last().unwrap(), &Ev::Packet(pk[1].clone(), 0));
        let middle = &whole[1..whole.len() - 1];
        if lacing == 0 {
            prop_assert_eq!(middle, &[Ev::Packet(payload, 0)][..]);
        } else if let [Ev::FrameError(_)] = middle {
        } else {
            prop_assert_eq!(middle.len(), usize::from(count) + 1);
            let mut joined = Vec::new();
            for ev in middle {
                match ev {
                    Ev::Packet(p, 0) => joined.extend_from_slice(p),
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            prop_assert!(payload.ends_with(&joined));
            prop_assert!(joined.len() < payload.len());
        }
        // Through the whole pipeline: never an Err, never a resync.
        let run = decode(SourceFormat::Auto, data.chunks(cut));
        prop_assert_eq!(run.stats.resyncs, 0);
        prop_assert!(run.stats.frames >= 2);
        prop_assert_eq!(
            run.stats.frames + run.stats.decode_errors,
            whole.len() as u64
        );
    }
}

fn source_cached() -> &'static Source {
    static SRC: std::sync::OnceLock<Source> = std::sync::OnceLock::new();
    SRC.get_or_init(|| {
        let mut s = source(CHROME);
        s.packets.truncate(2);
        s
    })
}
