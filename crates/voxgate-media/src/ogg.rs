//! Push Ogg/Opus demuxer (RFC 3533 pages, RFC 7845 Opus mapping).
//!
//! Holds at most one page (≤ 65 307 bytes) plus one packet continued across pages (bounded by
//! `max_element_bytes`). Checks every page CRC; a bad page makes it resync at the next `OggS`
//! (counted). Locks onto the first Opus logical stream; other streams are skipped. Reports the
//! EOS granule position so the decoder can trim the end exactly.

use crate::buffer::PushBuffer;
use crate::demux::{DemuxEvent, OpusHead};
use crate::{Limits, MediaError};

const CAPTURE: [u8; 4] = *b"OggS";
const HEADER_LEN: usize = 27;

/// CRC-32 of Ogg (polynomial 0x04C11DB7, no reflection, zero init), as a 256-entry table.
const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut r = (i as u32) << 24;
        let mut k = 0;
        while k < 8 {
            r = if r & 0x8000_0000 != 0 {
                (r << 1) ^ 0x04C1_1DB7
            } else {
                r << 1
            };
            k += 1;
        }
        t[i] = r;
        i += 1;
    }
    t
};

fn crc_update(mut crc: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        crc = (crc << 8) ^ CRC_TABLE[((crc >> 24) as u8 ^ b) as usize];
    }
    crc
}

/// CRC of a whole page, computed with its checksum field taken as zero.
pub fn page_crc(page: &[u8]) -> u32 {
    let crc = crc_update(0, &page[..22]);
    let crc = crc_update(crc, &[0; 4]);
    crc_update(crc, &page[26..])
}

/// The page being handed out packet by packet (indices relative to the unparsed input).
#[derive(Debug, Clone, Copy)]
struct Cursor {
    len: usize,
    segs: usize,
    seg: usize,
    data: usize,
    ours: bool,
    /// Drop segments until the end of a packet begun on a lost page.
    skip_continued: bool,
}

enum Step {
    Continue,
    NeedMore,
    Event(DemuxEvent<'static>),
    InPage { start: usize, len: usize },
    Assembled,
    Bad(&'static str),
}

/// Push Ogg/Opus demuxer: `feed` bytes, then `poll` until `Ok(None)`.
#[derive(Debug)]
pub struct OggDemuxer {
    input: PushBuffer,
    page: Option<Cursor>,
    serial: Option<u32>,
    /// Packets seen on the locked stream (0 = OpusHead, 1 = OpusTags, then audio).
    packets: u64,
    partial: Vec<u8>,
    partial_oversized: bool,
    expected_seq: Option<u32>,
    resync: Option<u64>,
    other_codec: Option<String>,
    /// The locked stream's EOS page was seen.
    ended: bool,
    /// `partial` was handed out by the last `poll` and must be cleared before reuse.
    partial_lent: bool,
    max_element: usize,
}

impl OggDemuxer {
    /// A demuxer bounded by `limits`.
    pub fn new(limits: &Limits) -> Self {
        Self {
            input: PushBuffer::new(limits.max_pending_bytes),
            page: None,
            serial: None,
            packets: 0,
            partial: Vec::new(),
            partial_oversized: false,
            expected_seq: None,
            resync: None,
            other_codec: None,
            ended: false,
            partial_lent: false,
            max_element: limits.max_element_bytes,
        }
    }

    /// Takes as much of `chunk` as fits; returns the count. Call `poll` until `Ok(None)`.
    pub fn feed(&mut self, chunk: &[u8]) -> usize {
        self.input.feed(chunk)
    }

    /// Unparsed bytes held.
    pub fn pending_bytes(&self) -> usize {
        self.input.pending()
    }

    /// Most bytes held at once.
    pub fn peak_pending_bytes(&self) -> usize {
        self.input.peak()
    }

    /// True when input ended inside a page, a packet or a resync scan.
    pub fn is_truncated(&self) -> bool {
        self.input.pending() > 0
            || (!self.partial.is_empty() && !self.partial_lent)
            || self.resync.is_some()
    }

    /// Next demux event; `Ok(None)` when more input is needed. `Err` is fatal.
    pub fn poll(&mut self) -> Result<Option<DemuxEvent<'_>>, MediaError> {
        if std::mem::take(&mut self.partial_lent) {
            self.partial.clear();
        }
        loop {
            let step = if self.page.is_some() {
                self.next_segment()?
            } else if let Some(skipped) = self.resync {
                self.scan(skipped)
            } else {
                self.next_page()?
            };
            match step {
                Step::Continue => {}
                Step::NeedMore if self.input.is_full() => {
                    return Err(MediaError::Limit(
                        "unparsed input exceeds max_pending_bytes",
                    ))
                }
                Step::NeedMore => return Ok(None),
                Step::Event(ev) => return Ok(Some(ev)),
                Step::InPage { start, len } => {
                    let data = &self.input.available()[start..start + len];
                    return Ok(Some(DemuxEvent::Packet { data, trim_end: 0 }));
                }
                Step::Assembled => {
                    self.partial_lent = true;
                    return Ok(Some(DemuxEvent::Packet {
                        data: &self.partial,
                        trim_end: 0,
                    }));
                }
                Step::Bad(what) => {
                    if self.packets == 0 {
                        return Err(MediaError::Malformed { what });
                    }
                    self.input.consume_up_to(1);
                    self.resync = Some(1);
                    self.partial.clear();
                    self.expected_seq = None;
                }
            }
        }
    }

    fn scan(&mut self, skipped: u64) -> Step {
        let avail = self.input.available();
        let found = avail.windows(4).position(|w| w == CAPTURE);
        let drop = found.unwrap_or(avail.len().saturating_sub(3));
        self.input.consume(drop);
        let skipped = skipped + drop as u64;
        if found.is_some() {
            self.resync = None;
            Step::Event(DemuxEvent::Resynced {
                skipped_bytes: skipped,
            })
        } else {
            self.resync = Some(skipped);
            Step::NeedMore
        }
    }

    /// Validates the next page (capture pattern, version, CRC) and opens a cursor on it.
    fn next_page(&mut self) -> Result<Step, MediaError> {
        let avail = self.input.available();
        if avail.len() < HEADER_LEN {
            if !avail.is_empty() && !CAPTURE.starts_with(&avail[..avail.len().min(4)]) {
                return Ok(Step::Bad("missing OggS capture pattern"));
            }
            return Ok(Step::NeedMore);
        }
        if avail[..4] != CAPTURE || avail[4] != 0 {
            return Ok(Step::Bad("missing OggS capture pattern or unknown version"));
        }
        let segs = usize::from(avail[26]);
        if avail.len() < HEADER_LEN + segs {
            return Ok(Step::NeedMore);
        }
        let body: usize = avail[HEADER_LEN..HEADER_LEN + segs]
            .iter()
            .map(|&l| usize::from(l))
            .sum();
        let len = HEADER_LEN + segs + body;
        if avail.len() < len {
            return Ok(Step::NeedMore);
        }
        let stored = u32::from_le_bytes([avail[22], avail[23], avail[24], avail[25]]);
        if page_crc(&avail[..len]) != stored {
            return Ok(Step::Bad("Ogg page CRC mismatch"));
        }
        let flags = avail[5];
        let granule = u64::from_le_bytes(avail[6..14].try_into().expect("8 bytes"));
        let serial = u32::from_le_bytes(avail[14..18].try_into().expect("4 bytes"));
        let seq = u32::from_le_bytes(avail[18..22].try_into().expect("4 bytes"));
        let bos = flags & 0x02 != 0;
        let opus_bos = bos && avail[HEADER_LEN + segs..len].starts_with(b"OpusHead");
        if opus_bos && (self.serial.is_none() || self.ended) {
            // The first Opus stream, or the next link of a chained stream.
            self.serial = Some(serial);
            self.ended = false;
            self.packets = 0;
            self.partial.clear();
            self.expected_seq = None;
        } else if bos && self.serial.is_none() && self.other_codec.is_none() {
            let first = &avail[HEADER_LEN + segs..len];
            let name = String::from_utf8_lossy(&first[..first.len().min(8)]).into_owned();
            self.other_codec = Some(name);
        }
        let ours = self.serial == Some(serial);
        if self.serial.is_none() && !bos {
            let seen = self
                .other_codec
                .take()
                .unwrap_or_else(|| "no BOS page".into());
            return Err(MediaError::Unsupported(format!(
                "Ogg stream is not Opus (first packet {seen:?}); send Ogg Opus"
            )));
        }
        let mut cursor = Cursor {
            len,
            segs,
            seg: 0,
            data: HEADER_LEN + segs,
            ours,
            skip_continued: false,
        };
        let mut step = Step::Continue;
        if ours {
            let continued = flags & 0x01 != 0;
            let gap = self.expected_seq.is_some_and(|s| s != seq);
            self.expected_seq = Some(seq.wrapping_add(1));
            if (!continued || gap) && !self.partial.is_empty() {
                self.partial.clear();
                step = Step::Event(DemuxEvent::FrameError("Ogg packet lost at a page boundary"));
            }
            cursor.skip_continued = continued && self.partial.is_empty() && !self.partial_oversized;
            self.ended = flags & 0x04 != 0;
            if self.ended && granule != u64::MAX && self.packets >= 2 {
                step = Step::Event(DemuxEvent::EndAt { granule });
            }
        }
        self.page = Some(cursor);
        Ok(step)
    }

    /// Hands out the next packet of the current page, or consumes the page when done.
    fn next_segment(&mut self) -> Result<Step, MediaError> {
        let cur = self.page.as_mut().expect("next_segment needs an open page");
        let avail = self.input.available();
        while cur.seg < cur.segs {
            let lace = usize::from(avail[HEADER_LEN + cur.seg]);
            let start = cur.data;
            cur.seg += 1;
            cur.data += lace;
            let ends = lace < 255;
            if !cur.ours {
                continue;
            }
            if cur.skip_continued {
                cur.skip_continued = !ends;
                continue;
            }
            if ends && self.partial.is_empty() && !self.partial_oversized {
                return self.on_packet(start, lace);
            }
            if self.partial.len() + lace > self.max_element {
                self.partial.clear();
                self.partial_oversized = true;
            }
            if !self.partial_oversized {
                self.partial.extend_from_slice(&avail[start..start + lace]);
            }
            if ends {
                if std::mem::take(&mut self.partial_oversized) {
                    self.packets += 1;
                    if self.packets > 2 {
                        return Ok(Step::Event(DemuxEvent::FrameError(
                            "Ogg packet larger than max_element_bytes",
                        )));
                    }
                    continue;
                }
                return self.on_packet(usize::MAX, self.partial.len());
            }
        }
        let len = cur.len;
        self.page = None;
        self.input.consume(len);
        Ok(Step::Continue)
    }

    /// A complete packet, in the page (`start`) or assembled (`start == usize::MAX`).
    fn on_packet(&mut self, start: usize, len: usize) -> Result<Step, MediaError> {
        self.packets += 1;
        let assembled = start == usize::MAX;
        match self.packets {
            1 => {
                let data = if assembled {
                    &self.partial[..]
                } else {
                    &self.input.available()[start..start + len]
                };
                let head = OpusHead::parse(data)?;
                self.partial.clear();
                Ok(Step::Event(DemuxEvent::Head(head)))
            }
            2 => {
                self.partial.clear();
                Ok(Step::Continue) // OpusTags: not needed
            }
            _ if assembled => Ok(Step::Assembled),
            _ => Ok(Step::InPage { start, len }),
        }
    }
}
