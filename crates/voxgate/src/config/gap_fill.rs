//! `[gap_fill]`: the budget for audio a session synthesizes for gaps (device sequence numbers,
//! Twilio timestamps, Omi capture times).

use serde::{Deserialize, Serialize};

use super::SAMPLES_PER_SECOND;

/// Gap filling may insert at most the wall-clock time since the session started plus
/// `slack_seconds`; fills beyond are dropped and counted (`voxgate_gap_dropped_samples_total`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GapFillConfig {
    /// Synthesized audio allowed beyond the session's wall-clock age. Default 2 s.
    pub slack_seconds: f64,
}

impl Default for GapFillConfig {
    fn default() -> Self {
        Self { slack_seconds: 2.0 }
    }
}

impl GapFillConfig {
    pub(super) fn validate(&self, errors: &mut Vec<String>) {
        if !(self.slack_seconds.is_finite() && (0.0..=3600.0).contains(&self.slack_seconds)) {
            errors.push("gap_fill.slack_seconds: must be in 0..=3600".into());
        }
    }

    /// The slack in 16 kHz samples (valid after `validate`).
    pub fn slack_samples(&self) -> u64 {
        (self.slack_seconds * SAMPLES_PER_SECOND) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slack_is_checked_and_converted() {
        let mut g = GapFillConfig::default();
        assert_eq!(g.slack_samples(), 32_000);
        g.slack_seconds = f64::NAN;
        let mut errors = Vec::new();
        g.validate(&mut errors);
        assert_eq!(errors, ["gap_fill.slack_seconds: must be in 0..=3600"]);
    }
}
