//! voxgate's sans-IO codec core.
//!
//! Fed `&[u8]` chunks split anywhere, it yields 16 kHz mono PCM16. No I/O, no clock, no tasks.
//! Memory per stream is bounded by [`Limits`], whatever the input and however long it runs.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::fmt;

mod buffer;
mod decoder;
pub mod demux;
pub mod detect;
pub mod ebml;
pub mod g711;
pub mod ogg;
pub mod opus_stage;
pub mod pcm;
pub mod resample;
pub mod webm;

pub use decoder::{memory_bound, Decoder, EVENT_QUEUE_CAP};

/// Output sample rate of every pipeline.
pub const OUTPUT_RATE: u32 = 16_000;

/// Ceilings applied to untrusted input. Defaults suit browser and device audio.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest element body buffered whole (an Opus SimpleBlock is at most a few KiB).
    pub max_element_bytes: usize, // default: 64 KiB
    /// Unparsed input held per stream before the peer is considered abusive.
    pub max_pending_bytes: usize, // default: 256 KiB
    /// Deepest EBML nesting accepted (audio-only WebM uses a handful of levels).
    pub max_depth: usize, // default: 8
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_element_bytes: 64 * 1024,
            max_pending_bytes: 256 * 1024,
            max_depth: 8,
        }
    }
}

#[allow(missing_docs)] // fields: rate in Hz, interleaved channel count, counters as named
/// What the client said it sends. `Auto` sniffs a container (WebM or Ogg).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    /// Container, detected from the first bytes: EBML magic -> WebM, `OggS` -> Ogg.
    Auto,
    /// One raw Opus packet per `push`.
    Opus { sample_rate: u32, channels: u8 },
    /// Signed 16-bit little-endian PCM, interleaved.
    Linear16 { sample_rate: u32, channels: u8 },
    /// 32-bit float little-endian PCM, interleaved.
    Float32 { sample_rate: u32, channels: u8 },
    /// Unsigned 8-bit PCM, interleaved.
    Linear8 { sample_rate: u32, channels: u8 },
    /// G.711 mu-law.
    Mulaw { sample_rate: u32, channels: u8 },
    /// G.711 A-law.
    Alaw { sample_rate: u32, channels: u8 },
}

#[allow(missing_docs)] // fields: rate in Hz, interleaved channel count, counters as named
/// The format a stream turned out to be. `name()` is a closed label set, fit for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetectedFormat {
    WebmOpus { channels: u8 },
    OggOpus { channels: u8 },
    Opus { sample_rate: u32, channels: u8 },
    Linear16 { sample_rate: u32, channels: u8 },
    Float32 { sample_rate: u32, channels: u8 },
    Linear8 { sample_rate: u32, channels: u8 },
    Mulaw { sample_rate: u32, channels: u8 },
    Alaw { sample_rate: u32, channels: u8 },
}

impl DetectedFormat {
    /// One of `webm`, `ogg`, `opus`, `linear16`, `float32`, `linear8`, `mulaw`, `alaw`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::WebmOpus { .. } => "webm",
            Self::OggOpus { .. } => "ogg",
            Self::Opus { .. } => "opus",
            Self::Linear16 { .. } => "linear16",
            Self::Float32 { .. } => "float32",
            Self::Linear8 { .. } => "linear8",
            Self::Mulaw { .. } => "mulaw",
            Self::Alaw { .. } => "alaw",
        }
    }
}

impl fmt::Display for DetectedFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[allow(missing_docs)] // fields: rate in Hz, interleaved channel count, counters as named
/// Errors of the codec core. Only fatal ones are returned from [`Decoder::push`]; frame-local
/// problems are counted in [`Stats`] and reported as [`MediaEvent`]s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    #[error("malformed input: {what}")]
    Malformed { what: &'static str },
    #[error("limit exceeded: {0}")]
    Limit(&'static str),
    #[error("unsupported input: {0}")]
    Unsupported(String),
    #[error("undecodable frame: {0}")]
    Frame(&'static str),
    #[error("invalid parameters: {0}")]
    Params(String),
}

impl MediaError {
    /// True when only the current frame is lost and the stream may continue.
    pub fn is_frame_local(&self) -> bool {
        matches!(self, Self::Frame(_))
    }
    /// A short stable code for clients and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed { .. } => "malformed_input",
            Self::Limit(_) => "limit_exceeded",
            Self::Unsupported(_) => "unsupported_format",
            Self::Frame(_) => "decode_error",
            Self::Params(_) => "invalid_parameters",
        }
    }
}

#[allow(missing_docs)] // fields: rate in Hz, interleaved channel count, counters as named
/// Things worth telling the client and the metrics about, drained with [`Decoder::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaEvent {
    /// The stream's format is known (sent once).
    FormatDetected(DetectedFormat),
    /// A frame could not be decoded and was skipped (counted in `Stats::decode_errors`).
    DecodeError { what: String },
    /// Sync was lost and regained at the next Cluster/page; `skipped_bytes` were discarded.
    Resynced { skipped_bytes: u64 },
    /// The stream ended inside an element; its `bytes` were discarded (a live stream cut between
    /// messages, not corruption). Counted in `Stats::truncated_bytes`.
    Truncated { bytes: u64 },
}

#[allow(missing_docs)] // fields: rate in Hz, interleaved channel count, counters as named
/// Counters of one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub bytes_in: u64,
    pub frames: u64,
    /// 16 kHz mono samples produced so far.
    pub samples_out: u64,
    pub decode_errors: u64,
    pub resyncs: u64,
    pub pending_bytes: usize,
    pub peak_pending_bytes: usize,
    /// Bytes of a trailing partial element discarded at end of stream.
    pub truncated_bytes: u64,
}
