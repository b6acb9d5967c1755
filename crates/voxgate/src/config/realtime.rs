//! `[realtime]`: OpenAI's Realtime API in transcription mode on `/v1/realtime` (the bounds on
//! what its clients may send and ask of the segmenter).

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RealtimeConfig {
    /// Decoded audio bytes one `input_audio_buffer.append` may carry; a larger one is answered
    /// with an `error` event (`append_too_large`), dropped and counted, and the session goes
    /// on. Default 262144 (5.4 s of 24 kHz PCM16).
    pub max_append_bytes: usize,
    /// The shortest `server_vad` `silence_duration_ms`; a shorter one is raised to it (every
    /// pause between words would otherwise cost a backend request). Default 200.
    pub min_silence_ms: u64,
    /// How long a new connection waits for the client's first `session.update` (after
    /// `session.created`) before its session starts on the defaults. Default 2000.
    pub update_wait_ms: u64,
    /// A Realtime session with no client event for this long is closed (idle_timeout). OpenAI
    /// clients send no keepalive and wait for transcripts after their last append, so this is
    /// longer than `server.idle_timeout_seconds`. Default 60.
    pub idle_timeout_seconds: f64,
}

impl Default for RealtimeConfig {
    fn default() -> Self {
        Self {
            max_append_bytes: 262_144,
            min_silence_ms: 200,
            update_wait_ms: 2_000,
            idle_timeout_seconds: 60.0,
        }
    }
}

impl RealtimeConfig {
    pub(super) fn validate(&self, errors: &mut Vec<String>) {
        if self.max_append_bytes == 0 {
            errors.push("realtime.max_append_bytes: must be > 0".into());
        }
        if !(10..=10_000).contains(&self.min_silence_ms) {
            errors.push("realtime.min_silence_ms: must be in [10, 10000]".into());
        }
        let idle = self.idle_timeout_seconds;
        if !(idle.is_finite() && idle > 0.0 && idle <= 3600.0) {
            errors.push("realtime.idle_timeout_seconds: must be in (0, 3600]".into());
        }
        if self.update_wait_ms > 60_000 {
            errors.push("realtime.update_wait_ms: must be at most 60000".into());
        }
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.idle_timeout_seconds)
    }

    pub fn update_wait(&self) -> Duration {
        Duration::from_millis(self.update_wait_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realtime_limits_are_checked() {
        let mut r = RealtimeConfig::default();
        let mut errors = Vec::new();
        r.validate(&mut errors);
        assert!(errors.is_empty());
        r.max_append_bytes = 0;
        r.min_silence_ms = 5;
        r.validate(&mut errors);
        assert_eq!(errors.len(), 2, "{errors:?}");
    }
}
