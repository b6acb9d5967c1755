//! `[twilio]`: what a `/v1/twilio` connection may do before its `start` event.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Limits of the phase before Twilio's `start` (the connection already holds a session permit
/// and passed the per-IP rate limit by then).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TwilioConfig {
    /// `start` must arrive within this long of the connect (other messages do not extend it);
    /// otherwise the socket is closed with 1008. Default 10 s.
    pub start_timeout_seconds: f64,
    /// Messages accepted before `start` (Twilio sends one, `connected`); beyond it the socket
    /// is closed with 1008 `message_flood`. Default 16.
    pub max_messages_before_start: u32,
}

impl Default for TwilioConfig {
    fn default() -> Self {
        Self {
            start_timeout_seconds: 10.0,
            max_messages_before_start: 16,
        }
    }
}

impl TwilioConfig {
    pub(super) fn validate(&self, errors: &mut Vec<String>) {
        let t = self.start_timeout_seconds;
        if !(t.is_finite() && t > 0.0 && t <= 600.0) {
            errors.push("twilio.start_timeout_seconds: must be in (0, 600]".into());
        }
        if self.max_messages_before_start == 0 {
            errors.push("twilio.max_messages_before_start: must be > 0".into());
        }
    }

    /// How long after the connect `start` may arrive (valid after `validate`).
    pub fn start_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.start_timeout_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twilio_limits_are_checked() {
        let mut t = TwilioConfig::default();
        assert_eq!(t.start_timeout(), Duration::from_secs(10));
        t.start_timeout_seconds = 0.0;
        t.max_messages_before_start = 0;
        let mut errors = Vec::new();
        t.validate(&mut errors);
        assert_eq!(
            errors,
            [
                "twilio.start_timeout_seconds: must be in (0, 600]",
                "twilio.max_messages_before_start: must be > 0"
            ]
        );
    }
}
