//! WebM/Matroska audio demuxer on the push EBML reader.
//!
//! Finds the first Opus track (CodecID `A_OPUS`, whatever its TrackNumber), then yields its
//! packets in stream order from SimpleBlocks and BlockGroups (with DiscardPadding). Block
//! timestamps are ignored on purpose: Chromium's jump while its audio stays continuous, so media
//! time comes from decoded sample counts downstream. Header problems (before Tracks) are fatal;
//! after that, corrupt bytes make the reader resync at the next Cluster ID.
//! Never buffers more than one element body; skipped elements are streamed past.

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

#[derive(Debug, Default)]
struct Group {
    has_block: bool,
    discard_ns: i64,
}

/// What one reader item turned into; owns nothing borrowed, so the loop in `poll` can return.
enum Step {
    Continue,
    Event(DemuxEvent<'static>),
    Packet { span: Span, offset: usize },
    GroupPacket { trim_end: u64 },
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
    group: Group,
    group_block: Vec<u8>,
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
            group: Group::default(),
            group_block: Vec::new(),
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
                Ok(Step::GroupPacket { trim_end }) => {
                    let data = &self.group_block[..];
                    return Ok(Some(DemuxEvent::Packet { data, trim_end }));
                }
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
        self.group = Group::default();
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
            id::BLOCK_GROUP => self.group = Group::default(),
            _ => {}
        }
        Ok(Step::Continue)
    }

    fn on_end(&mut self, x: u32) -> Result<Step, ReadError> {
        match x {
            id::TRACK_ENTRY => self.end_entry(),
            id::TRACKS => return self.end_tracks(),
            id::BLOCK_GROUP if self.group.has_block => {
                let group = std::mem::take(&mut self.group);
                // DiscardPadding is in nanoseconds (Matroska); negative values trim the start,
                // which Opus already does with pre-skip.
                let ns = u64::try_from(group.discard_ns).unwrap_or(0);
                let trim_end = (u128::from(ns) * 48_000 / 1_000_000_000) as u64;
                return Ok(Step::GroupPacket { trim_end });
            }
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
            id::SIMPLE_BLOCK => return Ok(self.block(body, span)),
            id::BLOCK => {
                if let Step::Packet { offset, .. } = self.block(body, span) {
                    self.group_block.clear();
                    self.group_block.extend_from_slice(&body[offset..]);
                    self.group.has_block = true;
                }
            }
            id::DISCARD_PADDING => self.group.discard_ns = ebml::read_int(body).unwrap_or(0),
            _ => {}
        }
        Ok(Step::Continue)
    }

    /// Block layout (Matroska §10): track vint, 16-bit relative timestamp, flags, payload.
    fn block(&self, body: &[u8], span: Span) -> Step {
        let (track, n) = match ebml::read_vint(body) {
            ebml::Parse::Done((track, _), n) => (track, n),
            _ => return Step::Event(DemuxEvent::FrameError("block with an invalid track number")),
        };
        if Some(track) != self.track {
            return Step::Continue; // another track: skipped
        }
        let Some(&flags) = body.get(n + 2) else {
            return Step::Event(DemuxEvent::FrameError("block shorter than its header"));
        };
        if flags & 0x06 != 0 {
            return Step::Event(DemuxEvent::FrameError(
                "laced block (lacing is not supported)",
            ));
        }
        debug_assert!(body.len() <= self.max_element);
        Step::Packet {
            span,
            offset: n + 3,
        }
    }
}
