//! Consumers: each owns its bounded queue, its overflow policy and its counters. A session builds
//! only the consumers it has, so a session without any holds no audio for them.

pub mod subscribers;
pub mod webhook;

use std::sync::atomic::{AtomicU64, Ordering};

use voxgate_session::ConsumerSummary;

/// Counters shared between a consumer's handle (ingest side) and its task.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    pub delivered_bytes: AtomicU64,
    pub dropped_bytes: AtomicU64,
    pub requests: AtomicU64,
    /// Bytes accepted and not yet delivered or dropped.
    pub held_bytes: AtomicU64,
}

impl ConsumerStats {
    pub fn summary(&self, name: &str, kind: &str) -> ConsumerSummary {
        ConsumerSummary {
            name: name.to_owned(),
            kind: kind.to_owned(),
            delivered_bytes: self.delivered_bytes.load(Ordering::Relaxed),
            dropped_bytes: self.dropped_bytes.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
        }
    }
}

/// What happened to an offered item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Accepted,
    /// Dropped (counted); `first` is true for the first drop after an accepted item, so the
    /// client is warned once per episode rather than once per chunk.
    Dropped {
        first: bool,
    },
}

/// PCM16 samples as little-endian bytes.
pub fn pcm_bytes(pcm: &[i16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(pcm.len() * 2);
    for s in pcm {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}
