//! What the container demuxers ([`crate::webm`], [`crate::ogg`]) hand to the Opus stage.
//!
//! Owns the `OpusHead` parser (RFC 7845 §5.1) shared by both containers. Holds no audio.

use crate::MediaError;

/// The Opus identification header (RFC 7845 §5.1), as far as decoding needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpusHead {
    /// Output channel count (1..=2 for mapping family 0).
    pub channels: u8,
    /// Samples at 48 kHz to drop from the start of the decoded stream.
    pub pre_skip: u16,
    /// The encoder's input rate (informational only; Opus always decodes at 48 kHz or below).
    pub input_rate: u32,
}

impl OpusHead {
    /// Parses an `OpusHead` packet or Matroska `CodecPrivate`.
    pub fn parse(b: &[u8]) -> Result<Self, MediaError> {
        if b.len() < 19 || &b[..8] != b"OpusHead" {
            return Err(MediaError::Malformed {
                what: "OpusHead missing or shorter than 19 bytes",
            });
        }
        if b[8] >> 4 != 0 {
            return Err(MediaError::Unsupported(format!(
                "OpusHead version {} (only major version 0 is defined)",
                b[8]
            )));
        }
        let channels = b[9];
        let family = b[18];
        if family != 0 {
            return Err(MediaError::Unsupported(format!(
                "multichannel Opus (channel mapping family {family}, {channels} channels)"
            )));
        }
        if !(1..=2).contains(&channels) {
            return Err(MediaError::Malformed {
                what: "OpusHead channel count not 1 or 2 for mapping family 0",
            });
        }
        Ok(Self {
            channels,
            pre_skip: u16::from_le_bytes([b[10], b[11]]),
            input_rate: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        })
    }
}

/// One step of demuxer output.
#[derive(Debug, PartialEq, Eq)]
pub enum DemuxEvent<'a> {
    /// The codec header: sent once, before any packet.
    Head(OpusHead),
    /// One Opus packet, in stream order.
    Packet {
        /// The packet bytes (valid until the next `feed`).
        data: &'a [u8],
        /// Samples at 48 kHz to drop from the end of this packet's output (WebM DiscardPadding).
        trim_end: u64,
    },
    /// The stream ends at this granule position (48 kHz samples from the start of the stream,
    /// pre-skip included; Ogg EOS page). Output beyond it is dropped.
    EndAt {
        /// Granule position of the last page.
        granule: u64,
    },
    /// Sync was lost and regained; `skipped_bytes` were discarded.
    Resynced {
        /// Bytes discarded while scanning.
        skipped_bytes: u64,
    },
    /// A frame-local problem: one packet was dropped.
    FrameError(&'static str),
}
