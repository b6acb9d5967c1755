//! WebM/Matroska audio demuxer on the push EBML reader.
//!
//! Finds the first Opus track (CodecID `A_OPUS`, whatever its TrackNumber), then yields its
//! packets in stream order from SimpleBlocks and BlockGroups (with DiscardPadding). A laced block
//! (Xiph, fixed-size or EBML lacing, Matroska §10.3) yields each of its frames as one packet, in
//! order; DiscardPadding trims the last frame of its Block only. Block timestamps are ignored on
//! purpose: Chromium's jump while its audio stays continuous, so media time comes from decoded
//! sample counts downstream. Header problems (before Tracks) are fatal; after that, corrupt bytes
//! make the reader resync at the next Cluster ID, and a malformed block is one frame error.
//! Never buffers more than one element body plus one block copy (a BlockGroup's Block or a laced
//! SimpleBlock); skipped elements are streamed past.

use crate::demux::{DemuxEvent, OpusHead};
use crate::ebml::{self, Class, Item, ReadError, Reader, Schema, Span};
use crate::{Limits, MediaError};

/// Matroska element IDs used here (marker bits kept).
pub mod id {
    #![allow(missing_docs)]
    pub const EBML: u32 = 0x1A45_DFA3;
    pub const DOC_TYPE: u32 = 0x4282;
    pub const SEGMENT: u32 = 0x1853_8067;
    pub const SEEK_HEAD: u32 = 0x114D_9B74;
    pub const INFO: u32 = 0x1549_A966;
    pub const TIMESTAMP_SCALE: u32 = 0x2A_D7B1;
    pub const TRACKS: u32 = 0x1654_AE6B;
    pub const TRACK_ENTRY: u32 = 0xAE;
    pub const TRACK_NUMBER: u32 = 0xD7;
    pub const CODEC_ID: u32 = 0x86;
    pub const CODEC_PRIVATE: u32 = 0x63A2;
    pub const CODEC_DELAY: u32 = 0x56AA;
    pub const CLUSTER: u32 = 0x1F43_B675;
    pub const TIMECODE: u32 = 0xE7;
    pub const SIMPLE_BLOCK: u32 = 0xA3;
    pub const BLOCK_GROUP: u32 = 0xA0;
    pub const BLOCK: u32 = 0xA1;
    pub const DISCARD_PADDING: u32 = 0x75A2;
    pub const CUES: u32 = 0x1C53_BB6B;
    pub const TAGS: u32 = 0x1254_C367;
    pub const CHAPTERS: u32 = 0x1043_A770;
    pub const ATTACHMENTS: u32 = 0x1941_A469;
    pub const VOID: u32 = 0xEC;
    pub const CRC32: u32 = 0xBF;
}

/// Bytes scanned for after corruption: the Cluster ID.
pub const CLUSTER_SYNC: [u8; 4] = [0x1F, 0x43, 0xB6, 0x75];

fn is_level1(x: u32) -> bool {
    use id::*;
    matches!(
        x,
        SEEK_HEAD | INFO | TRACKS | CLUSTER | CUES | TAGS | CHAPTERS | ATTACHMENTS | EBML
    )
}

/// Where each WebM ID may appear (Matroska spec, audio subset).
#[derive(Clone, Copy, Debug, Default)]
pub struct WebmSchema;

impl Schema for WebmSchema {
    fn classify(&self, parent: Option<u32>, x: u32) -> Class {
        use id::*;
        use Class::*;
        match parent {
            None => match x {
                EBML | SEGMENT => Master,
                _ => Invalid,
            },
            Some(_) if x == VOID || x == CRC32 => Skip,
            Some(EBML) => match x {
                DOC_TYPE => Leaf,
                _ => Skip,
            },
            Some(SEGMENT) => match x {
                INFO | TRACKS | CLUSTER => Master,
                // A new EBML header inside a live Segment: the recorder restarted.
                EBML => EndsParent,
                SEEK_HEAD | CUES | TAGS | CHAPTERS | ATTACHMENTS => Skip,
                // An unknown level-1 element (class D ID): skip it by its size.
                0x1000_0000..=0x1FFF_FFFF if x != SEGMENT => Skip,
                _ => Invalid,
            },
            Some(INFO) => match x {
                TIMESTAMP_SCALE => Leaf,
                _ => Skip,
            },
            Some(TRACKS) => match x {
                TRACK_ENTRY => Master,
                _ => Skip,
            },
            Some(TRACK_ENTRY) => match x {
                TRACK_NUMBER | CODEC_ID | CODEC_PRIVATE | CODEC_DELAY => Leaf,
                _ => Skip,
            },
            Some(CLUSTER) => match x {
                TIMECODE | SIMPLE_BLOCK => Leaf,
                BLOCK_GROUP => Master,
                // Position, PrevSize, SilentTracks, EncryptedBlock.
                0xA7 | 0xAB | 0x5854 | 0xAF => Skip,
                _ if is_level1(x) => EndsParent,
                _ => Invalid,
            },
            Some(BLOCK_GROUP) => match x {
                BLOCK | DISCARD_PADDING => Leaf,
                _ => Skip,
            },
            Some(_) => Skip,
        }
    }

    fn may_be_unknown_size(&self, x: u32) -> bool {
        x == id::SEGMENT || x == id::CLUSTER
    }
}

#[derive(Debug, Default)]
struct Entry {
    number: Option<u64>,
    opus: bool,
    codec: Option<String>,
    head: Option<Result<OpusHead, MediaError>>,
    codec_delay_ns: u64,
}

/// Most frames one laced block can hold: its frame count is stored minus one in a byte.
pub const MAX_LACED_FRAMES: usize = 256;

/// Splits a block's payload (the bytes after its flags) into frame sizes (Matroska §10.3).
/// `lacing` is `flags & 0x06`: 0 none, 0x02 Xiph, 0x04 fixed-size, 0x06 EBML. Fills `sizes`
/// (at most [`MAX_LACED_FRAMES`], each at most `payload.len()`, summing exactly to what follows
/// the lace header) and returns the lace header's length; the frames follow it back to back.
/// Reads only `payload`, allocates nothing beyond `sizes`, and never panics.
pub fn lace_sizes(
    lacing: u8,
    payload: &[u8],
    sizes: &mut Vec<usize>,
) -> Result<usize, &'static str> {
    sizes.clear();
    let lacing = lacing & 0x06;
    if lacing == 0 {
        sizes.push(payload.len());
        return Ok(0);
    }
    let Some(&count) = payload.first() else {
        return Err("laced block without a frame count");
    };
    let count = usize::from(count) + 1;
    let mut pos = 1;
    if lacing == 0x04 {
        let data = payload.len() - pos;
        let each = data / count;
        if each * count != data {
            return Err("fixed-size lacing does not divide the block");
        }
        sizes.extend(std::iter::repeat_n(each, count));
        return Ok(pos);
    }
    // Xiph and EBML code the sizes of all frames but the last, which takes the remainder.
    let mut total = 0usize;
    for i in 0..count - 1 {
        let size = if lacing == 0x02 {
            // Xiph: a run of 255s and the byte that ends it, summed.
            let mut size = 0usize;
            loop {
                let Some(&b) = payload.get(pos) else {
                    return Err("lace sizes run past the end of the block");
                };
                pos += 1;
                size += usize::from(b);
                if size > payload.len() {
                    return Err("laced frame larger than its block");
                }
                if b != 0xFF {
                    break size;
                }
            }
        } else {
            // EBML: the first size is a vint, the others signed vint differences from the
            // previous size (the raw value minus 2^(7n-1) - 1 for an n-byte vint).
            let (raw, n) = match ebml::read_vint(&payload[pos..]) {
                ebml::Parse::Done((raw, _), n) => (raw, n),
                ebml::Parse::NeedMore => return Err("lace sizes run past the end of the block"),
                ebml::Parse::Invalid => return Err("invalid EBML lace size"),
            };
            pos += n;
            let size = if i == 0 {
                i128::from(raw)
            } else {
                let bias = (1i128 << (7 * n - 1)) - 1;
                sizes[i - 1] as i128 + i128::from(raw) - bias
            };
            if size < 0 {
                return Err("negative EBML lace size");
            }
            if size > payload.len() as i128 {
                return Err("laced frame larger than its block");
            }
            size as usize
        };
        total += size;
        sizes.push(size);
    }
    // Each size is at most payload.len() and there are at most 255 of them: no overflow.
    let Some(last) = (payload.len() - pos).checked_sub(total) else {
        return Err("laced frame sizes exceed the block");
    };
    sizes.push(last);
    Ok(pos)
}

/// One block's frames, copied out of the reader's buffer, handed out one per `poll`: the
/// frames of a laced SimpleBlock, or the Block of a BlockGroup (laced or not), held until the
/// group ends and its DiscardPadding is known. Cleared when a BlockGroup starts.
#[derive(Debug, Default)]
struct Frames {
    /// The frames back to back (lace header stripped); at most `max_element_bytes`.
    data: Vec<u8>,
    /// Frame sizes in order (at most [`MAX_LACED_FRAMES`]); empty when no block is held.
    sizes: Vec<usize>,
    /// Index of the next frame to hand out; `sizes.len()` when none is due.
    next: usize,
    /// Offset in `data` of that frame.
    at: usize,
    /// Samples at 48 kHz to trim from the end of the last frame (the BlockGroup's
    /// DiscardPadding, which may come before or after its Block).
    trim_end: u64,
}

impl Frames {
    /// Copies `payload` (the block after its flags) split by its lacing, held until `start`.
    /// On an error nothing is held.
    fn load(&mut self, lacing: u8, payload: &[u8]) -> Result<(), &'static str> {
        self.data.clear();
        self.at = 0;
        let header = lace_sizes(lacing, payload, &mut self.sizes).inspect_err(|_| {
            self.sizes.clear();
        })?;
        self.data.extend_from_slice(&payload[header..]);
        self.next = self.sizes.len();
        Ok(())
    }

    /// True when a block was loaded since the last `clear`.
    fn has_block(&self) -> bool {
        !self.sizes.is_empty()
    }

    /// Makes the loaded frames due, from the first.
    fn start(&mut self) {
        self.next = 0;
        self.at = 0;
    }

    /// The next due frame's range in `data` and its end trim.
    fn take(&mut self) -> Option<(std::ops::Range<usize>, u64)> {
        let size = *self.sizes.get(self.next)?;
        let range = self.at..self.at + size;
        self.at += size;
        self.next += 1;
        let last = self.next == self.sizes.len();
        Some((range, if last { self.trim_end } else { 0 }))
    }

    fn clear(&mut self) {
        self.data.clear();
        self.sizes.clear();
        self.next = 0;
        self.at = 0;
        self.trim_end = 0;
    }
}

/// What a block's header says about it.
enum BlockPayload {
    /// Another track's block: skipped.
    OtherTrack,
    /// A malformed block: one frame error.
    Bad(&'static str),
    /// The payload starts at `offset` in the body; `lacing` is `flags & 0x06`.
    Ours { offset: usize, lacing: u8 },
}

/// What one reader item turned into; owns nothing borrowed, so the loop in `poll` can return.
enum Step {
    Continue,
    Event(DemuxEvent<'static>),
    Packet { span: Span, offset: usize },
    Fatal(MediaError),
}

/// Push WebM demuxer: `feed` bytes, then `poll` until `Ok(None)`.
#[derive(Debug)]
pub struct WebmDemuxer {
    reader: Reader<WebmSchema>,
    in_header: bool,
    seen_ebml: bool,
    entry: Entry,
    candidate: Option<(u64, OpusHead)>,
    head_error: Option<MediaError>,
    codecs: Vec<String>,
    track: Option<u64>,
    frames: Frames,
    max_element: usize,
}

impl WebmDemuxer {
    /// A demuxer bounded by `limits`.
    pub fn new(limits: &Limits) -> Self {
        Self {
            reader: Reader::new(WebmSchema, limits, CLUSTER_SYNC),
            in_header: true,
            seen_ebml: false,
            entry: Entry::default(),
            candidate: None,
            head_error: None,
            codecs: Vec::new(),
            track: None,
            frames: Frames::default(),
            max_element: limits.max_element_bytes,
        }
    }

    /// Takes as much of `chunk` as fits (at most a few KiB); returns the count. Call `poll`
    /// until `Ok(None)` and feed the rest.
    pub fn feed(&mut self, chunk: &[u8]) -> usize {
        self.reader.feed(chunk)
    }

    /// Unparsed bytes held.
    pub fn pending_bytes(&self) -> usize {
        self.reader.pending_bytes()
    }

    /// Most bytes held at once.
    pub fn peak_pending_bytes(&self) -> usize {
        self.reader.peak_pending_bytes()
    }

    /// True when input ended inside an element or during a resync scan.
    pub fn is_truncated(&self) -> bool {
        self.reader.is_mid_element() || self.reader.is_resyncing()
    }

    /// Next demux event; `Ok(None)` when more input is needed. `Err` is fatal.
    pub fn poll(&mut self) -> Result<Option<DemuxEvent<'_>>, MediaError> {
        loop {
            // A copied block's due frames (laced, or a BlockGroup's) go out before the reader
            // moves on; being copies, they stay valid across a `feed`.
            if let Some((range, trim_end)) = self.frames.take() {
                let data = &self.frames.data[range];
                return Ok(Some(DemuxEvent::Packet { data, trim_end }));
            }
            let item = match self.reader.next_item() {
                Ok(Some(item)) => item,
                Ok(None) if self.reader.is_stuck() => {
                    return Err(MediaError::Limit(
                        "unparsed input exceeds max_pending_bytes",
                    ))
                }
                Ok(None) => return Ok(None),
                Err(e) => {
                    self.on_error(e)?;
                    continue;
                }
            };
            match self.on_item(item) {
                Ok(Step::Continue) => {}
                Ok(Step::Event(ev)) => return Ok(Some(ev)),
                Ok(Step::Packet { span, offset }) => {
                    let data = &self.reader.body(span)[offset..];
                    return Ok(Some(DemuxEvent::Packet { data, trim_end: 0 }));
                }
                Ok(Step::Fatal(e)) => return Err(e),
                Err(e) => self.on_error(e)?,
            }
        }
    }

    /// Header errors are fatal; later ones start a resync at the next Cluster.
    fn on_error(&mut self, e: ReadError) -> Result<(), MediaError> {
        if self.in_header {
            return Err(match e {
                ReadError::Corrupt(what) => MediaError::Malformed { what },
                ReadError::TooLarge(what) => MediaError::Limit(what),
            });
        }
        self.frames.clear();
        self.reader.resync(id::SEGMENT);
        Ok(())
    }

    fn on_item(&mut self, item: Item) -> Result<Step, ReadError> {
        match item {
            Item::Start { id, .. } => self.on_start(id),
            Item::End { id } => self.on_end(id),
            Item::Leaf { id, body } => self.on_leaf(id, body),
            Item::Resynced { skipped } => Ok(Step::Event(DemuxEvent::Resynced {
                skipped_bytes: skipped,
            })),
        }
    }

    fn on_start(&mut self, x: u32) -> Result<Step, ReadError> {
        match x {
            id::EBML => self.seen_ebml = true,
            id::SEGMENT if !self.seen_ebml => {
                return Err(ReadError::Corrupt("Segment before EBML header"))
            }
            id::TRACKS => {
                self.candidate = None;
                self.head_error = None;
                self.codecs.clear();
            }
            id::TRACK_ENTRY => self.entry = Entry::default(),
            id::CLUSTER if self.track.is_none() && self.in_header => {
                return Err(ReadError::Corrupt("Cluster before Tracks"))
            }
            id::BLOCK_GROUP => self.frames.clear(),
            _ => {}
        }
        Ok(Step::Continue)
    }

    fn on_end(&mut self, x: u32) -> Result<Step, ReadError> {
        match x {
            id::TRACK_ENTRY => self.end_entry(),
            id::TRACKS => return self.end_tracks(),
            // `poll` hands the Block's frames out from here.
            id::BLOCK_GROUP if self.frames.has_block() => self.frames.start(),
            _ => {}
        }
        Ok(Step::Continue)
    }

    fn end_entry(&mut self) {
        let entry = std::mem::take(&mut self.entry);
        if let Some(codec) = entry.codec {
            if self.codecs.len() < 8 {
                self.codecs.push(codec);
            }
        }
        if !entry.opus || self.candidate.is_some() {
            return;
        }
        let Some(number) = entry.number else {
            return;
        };
        let mut head = match entry.head {
            Some(Ok(head)) => head,
            Some(Err(e)) => {
                self.head_error.get_or_insert(e);
                return;
            }
            // No CodecPrivate: decode as mono (libopus downmixes) with CodecDelay as pre-skip.
            None => OpusHead {
                channels: 1,
                pre_skip: 0,
                input_rate: 48_000,
            },
        };
        if head.pre_skip == 0 && entry.codec_delay_ns > 0 {
            // CodecDelay (ns) carries the same information as pre-skip when the head lacks it.
            let samples = u128::from(entry.codec_delay_ns) * 48_000 / 1_000_000_000;
            head.pre_skip = u16::try_from(samples).unwrap_or(u16::MAX);
        }
        self.candidate = Some((number, head));
    }

    fn end_tracks(&mut self) -> Result<Step, ReadError> {
        match self.candidate.take() {
            Some((number, head)) => {
                self.track = Some(number);
                self.in_header = false;
                Ok(Step::Event(DemuxEvent::Head(head)))
            }
            None if self.in_header => {
                Ok(Step::Fatal(self.head_error.take().unwrap_or_else(|| {
                    MediaError::Unsupported(format!(
                        "no Opus audio track in WebM (codecs: {}); send Opus audio",
                        if self.codecs.is_empty() {
                            "none".to_owned()
                        } else {
                            self.codecs.join(", ")
                        }
                    ))
                })))
            }
            None => Ok(Step::Continue),
        }
    }

    fn on_leaf(&mut self, x: u32, span: Span) -> Result<Step, ReadError> {
        let body = self.reader.body(span);
        match x {
            id::DOC_TYPE => {
                let doc = body.split(|&b| b == 0).next().unwrap_or_default();
                if doc != b"webm" && doc != b"matroska" {
                    return Err(ReadError::Corrupt("EBML DocType is not webm or matroska"));
                }
            }
            id::TRACK_NUMBER => self.entry.number = ebml::read_uint(body),
            id::CODEC_ID => {
                let codec = String::from_utf8_lossy(&body[..body.len().min(32)]);
                let codec = codec.trim_end_matches('\0').to_owned();
                self.entry.opus = codec == "A_OPUS";
                self.entry.codec = Some(codec);
            }
            id::CODEC_PRIVATE => self.entry.head = Some(OpusHead::parse(body)),
            id::CODEC_DELAY => self.entry.codec_delay_ns = ebml::read_uint(body).unwrap_or(0),
            id::SIMPLE_BLOCK => {
                return Ok(match self.block(body) {
                    BlockPayload::OtherTrack => Step::Continue,
                    BlockPayload::Bad(what) => Step::Event(DemuxEvent::FrameError(what)),
                    // Unlaced: handed out straight from the reader's buffer.
                    BlockPayload::Ours { offset, lacing: 0 } => Step::Packet { span, offset },
                    BlockPayload::Ours { offset, lacing } => {
                        match self.frames.load(lacing, &body[offset..]) {
                            Ok(()) => {
                                self.frames.trim_end = 0;
                                self.frames.start();
                                Step::Continue
                            }
                            Err(what) => Step::Event(DemuxEvent::FrameError(what)),
                        }
                    }
                });
            }
            // Held until the group ends, when its DiscardPadding is known.
            id::BLOCK => match self.block(body) {
                BlockPayload::OtherTrack => {}
                BlockPayload::Bad(what) => return Ok(Step::Event(DemuxEvent::FrameError(what))),
                BlockPayload::Ours { offset, lacing } => {
                    if let Err(what) = self.frames.load(lacing, &body[offset..]) {
                        return Ok(Step::Event(DemuxEvent::FrameError(what)));
                    }
                }
            },
            id::DISCARD_PADDING => {
                // Nanoseconds (Matroska); negative values trim the start, which Opus already
                // does with pre-skip. It trims the Block's last frame.
                let ns = u64::try_from(ebml::read_int(body).unwrap_or(0)).unwrap_or(0);
                self.frames.trim_end = (u128::from(ns) * 48_000 / 1_000_000_000) as u64;
            }
            _ => {}
        }
        Ok(Step::Continue)
    }

    /// Block layout (Matroska §10): track vint, 16-bit relative timestamp, flags, payload (with
    /// a lace header when `flags & 0x06` is set).
    fn block(&self, body: &[u8]) -> BlockPayload {
        let (track, n) = match ebml::read_vint(body) {
            ebml::Parse::Done((track, _), n) => (track, n),
            _ => return BlockPayload::Bad("block with an invalid track number"),
        };
        if Some(track) != self.track {
            return BlockPayload::OtherTrack;
        }
        let Some(&flags) = body.get(n + 2) else {
            return BlockPayload::Bad("block shorter than its header");
        };
        debug_assert!(body.len() <= self.max_element);
        BlockPayload::Ours {
            offset: n + 3,
            lacing: flags & 0x06,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lacing examples of RFC 9559 §10.4: frames of 800, 500 and 1000 bytes.
    #[test]
    fn rfc_lacing_examples() {
        let mut sizes = Vec::new();
        let frames = |header: &[u8], data: usize| [header, &vec![0u8; data][..]].concat();

        let xiph = frames(&[0x02, 0xFF, 0xFF, 0xFF, 0x23, 0xFF, 0xF5], 2300);
        assert_eq!(lace_sizes(0x02, &xiph, &mut sizes), Ok(7));
        assert_eq!(sizes, [800, 500, 1000]);

        let ebml = frames(&[0x02, 0x43, 0x20, 0x5E, 0xD3], 2300);
        assert_eq!(lace_sizes(0x06, &ebml, &mut sizes), Ok(5));
        assert_eq!(sizes, [800, 500, 1000]);

        let fixed = frames(&[0x02], 2400);
        assert_eq!(lace_sizes(0x04, &fixed, &mut sizes), Ok(1));
        assert_eq!(sizes, [800, 800, 800]);

        assert_eq!(lace_sizes(0x00, &fixed, &mut sizes), Ok(0));
        assert_eq!(sizes, [2401]);
    }

    #[test]
    fn malformed_lacing_is_refused() {
        let mut sizes = Vec::new();
        // No frame count.
        for lacing in [0x02, 0x04, 0x06] {
            assert!(lace_sizes(lacing, &[], &mut sizes).is_err());
        }
        // Xiph: a size larger than the block, a 255-run past its end, sizes summing past it.
        assert!(lace_sizes(0x02, &[0x01, 0x10, 1, 2, 3], &mut sizes).is_err());
        assert!(lace_sizes(0x02, &[0x01, 0xFF, 0xFF], &mut sizes).is_err());
        assert!(lace_sizes(0x02, &[0x02, 0x02, 0x02, 1, 2, 3], &mut sizes).is_err());
        // EBML: a negative difference, sizes whose total passes the block, a truncated vint.
        assert!(lace_sizes(0x06, &[0x02, 0x82, 0x80 | 60, 1, 2, 3, 4], &mut sizes).is_err());
        assert!(lace_sizes(0x06, &[0x02, 0x83, 0xC0, 1, 2, 3, 4], &mut sizes).is_err());
        assert!(lace_sizes(0x06, &[0x01, 0x40], &mut sizes).is_err());
        assert!(lace_sizes(0x06, &[0x01, 0x00, 1], &mut sizes).is_err());
        // Fixed: does not divide.
        assert!(lace_sizes(0x04, &[0x02, 1, 2, 3, 4], &mut sizes).is_err());
        // 256 frames: the most a count byte can say.
        assert_eq!(lace_sizes(0x04, &[0xFF; 257], &mut sizes), Ok(1));
        assert_eq!(sizes.len(), MAX_LACED_FRAMES);
    }

    #[test]
    fn lace_sizes_never_panic_and_stay_consistent() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut sizes = Vec::new();
        for round in 0..20_000 {
            let len = round % 300;
            let payload: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Small bytes, 0xFF and vint markers come up often.
                    match x % 5 {
                        0 => 0xFF,
                        1 => (x >> 8) as u8 & 0x07,
                        _ => (x >> 16) as u8,
                    }
                })
                .collect();
            for lacing in [0x02, 0x04, 0x06] {
                if let Ok(header) = lace_sizes(lacing, &payload, &mut sizes) {
                    assert!(header <= payload.len());
                    assert!(!sizes.is_empty() && sizes.len() <= MAX_LACED_FRAMES);
                    assert_eq!(sizes.len(), usize::from(payload[0]) + 1);
                    assert_eq!(sizes.iter().sum::<usize>(), payload.len() - header);
                }
            }
        }
    }
}
