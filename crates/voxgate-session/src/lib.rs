//! voxgate's sans-IO per-connection state machine.
//!
//! A [`Session`] is fed [`Input`]s (audio bytes, control text, time) and yields [`Output`]s (client
//! events, decoded audio for consumers, the close decision). It owns no socket, no task and no
//! clock: the server's connection task drives it, and tests drive it with plain values.

mod protocol;
mod segmenter;
mod session;
mod vad;

pub use protocol::{
    ClientControl, CloseSummary, ConsumerSummary, Party, ServerEvent, UtteranceReason,
};
pub use segmenter::{Segment, Segmenter, SegmenterConfig};
pub use session::{
    AudioChunk, CloseCode, ContinuePoint, Input, Output, Session, SessionConfig, SessionError,
    SessionStats, MAX_GAP_SAMPLES, MAX_PARTIES,
};
pub use vad::{VadMode, VadStats};

/// Output sample rate of every session (16 kHz mono PCM16).
pub const SAMPLE_RATE: u32 = voxgate_media::OUTPUT_RATE;

/// Seconds of media time for a sample count at 16 kHz.
pub fn seconds(samples: u64) -> f64 {
    samples as f64 / f64::from(SAMPLE_RATE)
}
