//! `[recording]`: where sessions are recorded (an `object_store` URL: a local directory by
//! default, `s3://bucket/prefix` for S3-compatible stores), how the audio is cut into objects,
//! how much a session may hold while the store is slow or down, and who is recorded.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::pcm_bytes;
use super::SAMPLES_PER_SECOND;

/// The recorder consumer. A session is recorded when `default` is true, or when the
/// `on_connect` hook answers `"record": true` or its token carries the `record: true` claim; a
/// `record: false` from the token or the hook wins over the default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordingConfig {
    /// Where recordings go: `file:///abs/dir`, a plain path (relative to the working
    /// directory), or `s3://bucket[/prefix]` (also `gs://`, `az://` per `object_store`).
    /// Default `recordings` (a local directory).
    pub url: String,
    /// Store options passed to `object_store` (for S3: `aws_endpoint`, `aws_region`,
    /// `aws_access_key_id`, `aws_secret_access_key`, `aws_allow_http`, ...). Values may also come
    /// from `AWS_*` variables.
    pub options: BTreeMap<String, String>,
    /// Record every session unless its token or hook says no. Default false.
    pub default: bool,
    /// Seconds of 16 kHz audio per audio object: a crash loses at most this much plus what is
    /// buffered. Default 10.
    pub chunk_seconds: f64,
    /// Audio a session's recorder may hold (queued, batching, in flight) while the store is slow
    /// or down; past it new audio is dropped (`drop_newest`, counted, the client warned once
    /// per episode). Default 60.
    pub max_buffer_seconds: f64,
    /// Bytes of events (JSON lines) a session's recorder may hold before further events are
    /// dropped (counted). Default 256 KiB.
    pub max_event_bytes: usize,
    /// Retries of one object write before it is given up (counted). Default 8.
    pub max_retries: u32,
    pub backoff_initial_ms: u64,
    /// Ceiling of one retry delay. Default 2000.
    pub backoff_max_ms: u64,
    /// Time limit of one object write. Default 10000.
    pub timeout_ms: u64,
    /// Where audio objects go: `voxgate` (per session, sample-range keys; fetchable) or `omi`
    /// (Omi's private cloud sync layout, `chunks/{uid}/{conversation}/{first}-{last}.batch.bin`,
    /// for Omi's own readers). Events and the summary stay in the voxgate layout. Default
    /// `voxgate`.
    pub layout: RecordingLayout,
    /// Per-user encryption at rest: uid -> AES-256 key (64 hex digits). A user with a key has
    /// each audio object AES-256-GCM encrypted (`.pcm.enc`, `.batch.enc` in the Omi layout);
    /// fetching decrypts with the same key. Default none.
    pub keys: BTreeMap<String, String>,
}

/// Object layout of recorded audio (`recording.layout`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordingLayout {
    #[default]
    Voxgate,
    Omi,
}

impl Default for RecordingConfig {
    fn default() -> Self {
        Self {
            url: "recordings".into(),
            options: BTreeMap::new(),
            default: false,
            chunk_seconds: 10.0,
            max_buffer_seconds: 60.0,
            max_event_bytes: 256 << 10,
            max_retries: 8,
            backoff_initial_ms: 200,
            backoff_max_ms: 2000,
            timeout_ms: 10_000,
            layout: RecordingLayout::Voxgate,
            keys: BTreeMap::new(),
        }
    }
}

impl RecordingConfig {
    pub(super) fn validate(&self, errors: &mut Vec<String>) {
        if self.url.trim().is_empty() {
            errors.push("recording.url: must not be empty".into());
        }
        let chunk_ok =
            self.chunk_seconds.is_finite() && (0.1..=600.0).contains(&self.chunk_seconds);
        if !chunk_ok {
            errors.push("recording.chunk_seconds: must be in 0.1..=600".into());
        }
        let buf = self.max_buffer_seconds;
        if !(buf.is_finite() && buf <= 3600.0 && (!chunk_ok || buf >= 2.0 * self.chunk_seconds)) {
            errors.push(
                "recording.max_buffer_seconds: must be >= 2 x chunk_seconds and <= 3600".into(),
            );
        }
        if !(4096..=64 << 20).contains(&self.max_event_bytes) {
            errors.push("recording.max_event_bytes: must be in 4096..=64 MiB".into());
        }
        for (uid, key) in &self.keys {
            let hex = key.trim();
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                errors.push(format!(
                    "recording.keys.{uid}: must be 64 hex digits (AES-256)"
                ));
            }
        }
        if self.timeout_ms == 0 || self.backoff_initial_ms > self.backoff_max_ms {
            errors.push(
                "recording: timeout_ms must be > 0 and backoff_initial_ms <= backoff_max_ms".into(),
            );
        }
    }

    /// Samples per audio object (valid after `validate`).
    pub fn chunk_samples(&self) -> usize {
        (self.chunk_seconds * SAMPLES_PER_SECOND) as usize
    }

    /// Byte cap of a session's audio buffer.
    pub fn max_buffer_bytes(&self) -> usize {
        pcm_bytes(self.max_buffer_seconds)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_limits_are_checked() {
        let mut errors = Vec::new();
        let mut r = RecordingConfig::default();
        r.validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(r.chunk_samples(), 160_000);
        assert_eq!(r.max_buffer_bytes(), 1_920_000);
        r.chunk_seconds = 40.0;
        r.max_event_bytes = 1;
        r.url = " ".into();
        r.keys.insert("u1".into(), "ab".repeat(32));
        r.keys.insert("u2".into(), "xyz".into());
        r.validate(&mut errors);
        assert_eq!(
            errors,
            [
                "recording.url: must not be empty",
                "recording.max_buffer_seconds: must be >= 2 x chunk_seconds and <= 3600",
                "recording.max_event_bytes: must be in 4096..=64 MiB",
                "recording.keys.u2: must be 64 hex digits (AES-256)",
            ]
        );
    }
}
