//! `[carriers]`: the phone carriers and PBXs besides Twilio (`/v1/<carrier>` and the Asterisk
//! AudioSocket listener): how long a call may take to describe itself, how far frames may
//! arrive out of order, and AudioSocket's own listener and frame cap.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Limits shared by every carrier frontend (the connection already holds a session permit and
/// passed the per-IP rate limit while they apply).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CarriersConfig {
    /// The carrier's call description (`start`, `websocket:connected`, jambonz's metadata) must
    /// arrive within this long of the connect; otherwise the socket is closed with 1008.
    /// Default 10 s.
    pub start_timeout_seconds: f64,
    /// Messages accepted before the call description; beyond it the socket is closed with 1008
    /// `message_flood`. Default 16.
    pub max_messages_before_start: u32,
    /// Media frames held while an earlier one is missing (Telnyx does not guarantee order).
    /// When more are held, the missing frames are given up: filled with silence within the gap
    /// budget, counted in `voxgate_carrier_frames_total{outcome="lost"}`, and a frame that comes
    /// after its slot was given up is dropped (`outcome="late"`). Default 16 (320 ms of 20 ms
    /// frames).
    pub reorder_window_frames: usize,
    /// `host:port` of the Asterisk AudioSocket listener (TCP); unset: no listener. Default unset.
    pub audiosocket_listen: Option<String>,
    /// The largest AudioSocket payload accepted (the header's length field); a bigger frame
    /// ends that call with an error frame. Default 8192 bytes (slin48 sends 1,920 per 20 ms).
    pub audiosocket_max_frame_bytes: usize,
    /// Parties a stereo call is kept apart as (jambonz `mixType=stereo`, an audio fork with
    /// `channels=2`: the caller on the first channel, the agent on the second), each with its
    /// own utterances (`party` in events) for `parties=caller,agent` speech-to-text; the mix
    /// goes on as before. 0 mixes only; at most 2. Default 2.
    pub max_parties: u8,
}

impl Default for CarriersConfig {
    fn default() -> Self {
        Self {
            start_timeout_seconds: 10.0,
            max_messages_before_start: 16,
            reorder_window_frames: 16,
            audiosocket_listen: None,
            audiosocket_max_frame_bytes: 8192,
            max_parties: 2,
        }
    }
}

impl CarriersConfig {
    pub(super) fn validate(&self, errors: &mut Vec<String>) {
        let t = self.start_timeout_seconds;
        if !(t.is_finite() && t > 0.0 && t <= 600.0) {
            errors.push("carriers.start_timeout_seconds: must be in (0, 600]".into());
        }
        if self.max_messages_before_start == 0 {
            errors.push("carriers.max_messages_before_start: must be > 0".into());
        }
        if !(1..=1024).contains(&self.reorder_window_frames) {
            errors.push("carriers.reorder_window_frames: must be in 1..=1024".into());
        }
        if !(320..=65_535).contains(&self.audiosocket_max_frame_bytes) {
            errors.push("carriers.audiosocket_max_frame_bytes: must be in 320..=65535".into());
        }
        if self.max_parties > voxgate_session::MAX_PARTIES {
            errors.push("carriers.max_parties: must be in 0..=2".into());
        }
        if let Some(addr) = &self.audiosocket_listen {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                errors.push(format!(
                    "carriers.audiosocket_listen: {addr:?} is not host:port"
                ));
            }
        }
    }

    /// How long after the connect the call description may arrive (valid after `validate`).
    pub fn start_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.start_timeout_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carrier_limits_are_checked() {
        let mut c = CarriersConfig::default();
        assert_eq!(c.start_timeout(), Duration::from_secs(10));
        let mut errors = Vec::new();
        c.validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        c.start_timeout_seconds = -1.0;
        c.max_messages_before_start = 0;
        c.reorder_window_frames = 0;
        c.audiosocket_max_frame_bytes = 70_000;
        c.max_parties = 3;
        c.audiosocket_listen = Some("nowhere".into());
        c.validate(&mut errors);
        assert_eq!(errors.len(), 6, "{errors:?}");
        assert!(errors[4].contains("max_parties"), "{errors:?}");
        assert!(errors[5].contains("audiosocket_listen"), "{errors:?}");
    }
}
