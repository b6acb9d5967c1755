//! `[omi]`: the consumers of Omi's pusher protocol (`/v1/trigger/listen`) that are not audio
//! webhooks, and their checks.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Consumers of Omi's pusher protocol that are not audio webhooks. Per-user values from the
/// `on_connect` hook replace these.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OmiConfig {
    /// Realtime transcript webhook: `POST ?uid=` with `{"segments":[...],"session_id":...}`.
    pub transcript_webhook: Option<String>,
    /// Receives `104` finalize and `105` speaker-sample events as JSON.
    pub conversation_webhook: Option<String>,
    /// Realtime audio apps: each gets `POST ?sample_rate=&uid=` of PCM every N seconds.
    pub audio_apps: Vec<String>,
    /// N for audio apps. Default 4.
    pub audio_app_delay_seconds: f64,
    /// Largest `102`/`104`/`105` JSON payload; a larger frame closes the session with 1009
    /// `json_too_large`. Default 64 KiB.
    pub max_json_bytes: usize,
    /// Bytes of documents each transcript or conversation webhook may hold (queued or in
    /// flight); beyond it documents are dropped (`buffer_full`). Default 2 MiB.
    pub json_queue_bytes: usize,
    /// With `audio_timeline=2`: seconds of the latest audio kept to check replays against (a
    /// replay reaching further back is dropped unverified). Default 10.
    pub replay_window_seconds: f64,
    /// With `audio_timeline=2`: seconds a session's timeline is kept after its socket closes,
    /// so a reconnect of the same user and conversation continues it (its replay checked, its
    /// recording continued). Default 60.
    pub reconnect_seconds: f64,
    /// Timelines kept for reconnects (held by live sessions or waiting); each holds up to
    /// `replay_window_seconds` of audio. When full, a new session keeps a private timeline
    /// (`voxgate_omi_timelines_total{outcome="full"}`). Default 256.
    pub reconnect_timelines_max: usize,
}

impl Default for OmiConfig {
    fn default() -> Self {
        Self {
            transcript_webhook: None,
            conversation_webhook: None,
            audio_apps: Vec::new(),
            audio_app_delay_seconds: 4.0,
            max_json_bytes: 64 << 10,
            json_queue_bytes: 2 << 20,
            replay_window_seconds: 10.0,
            reconnect_seconds: 60.0,
            reconnect_timelines_max: 256,
        }
    }
}

impl OmiConfig {
    pub(super) fn validate(&self, errors: &mut Vec<String>) {
        for (name, url) in [
            ("omi.transcript_webhook", self.transcript_webhook.as_ref()),
            (
                "omi.conversation_webhook",
                self.conversation_webhook.as_ref(),
            ),
        ]
        .into_iter()
        .chain(self.audio_apps.iter().map(|u| ("omi.audio_apps", Some(u))))
        {
            if let Some(url) = url {
                if url::Url::parse(url).is_err() {
                    errors.push(format!("{name}: {url:?} is not a URL"));
                }
            }
        }
        if !(self.audio_app_delay_seconds.is_finite() && self.audio_app_delay_seconds >= 0.0) {
            errors.push("omi.audio_app_delay_seconds: must be >= 0".into());
        }
        if !(256..=16 << 20).contains(&self.max_json_bytes) {
            errors.push("omi.max_json_bytes: must be in 256..=16 MiB".into());
        }
        let w = self.replay_window_seconds;
        if !(w.is_finite() && (0.0..=300.0).contains(&w)) {
            errors.push("omi.replay_window_seconds: must be in 0..=300".into());
        }
        let r = self.reconnect_seconds;
        if !(r.is_finite() && (0.0..=3600.0).contains(&r)) {
            errors.push("omi.reconnect_seconds: must be in 0..=3600".into());
        }
        if !(1..=1_000_000).contains(&self.reconnect_timelines_max) {
            errors.push("omi.reconnect_timelines_max: must be in 1..=1000000".into());
        }
        // A document wraps its payload: room for two keeps one always deliverable.
        if self.json_queue_bytes < 2 * self.max_json_bytes {
            errors.push("omi.json_queue_bytes: must be >= 2 x omi.max_json_bytes".into());
        }
    }

    pub fn reconnect(&self) -> Duration {
        Duration::from_secs_f64(self.reconnect_seconds)
    }

    /// Bytes of the replay window at `rate` (PCM16 mono).
    pub fn replay_window_bytes(&self, rate: u32) -> usize {
        (self.replay_window_seconds * f64::from(rate)) as usize * 2
    }

    /// Audio per POST to each audio app (valid after `validate`).
    pub fn audio_app_delay(&self) -> Duration {
        Duration::from_secs_f64(self.audio_app_delay_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn omi_urls_and_delay_are_checked() {
        let mut o = OmiConfig::default();
        assert_eq!(o.audio_app_delay(), Duration::from_secs(4));
        o.audio_apps.push("not a url".into());
        o.audio_app_delay_seconds = -1.0;
        let mut errors = Vec::new();
        o.validate(&mut errors);
        assert_eq!(
            errors,
            [
                r#"omi.audio_apps: "not a url" is not a URL"#,
                "omi.audio_app_delay_seconds: must be >= 0",
            ]
        );
    }

    #[test]
    fn reconnect_limits_are_checked() {
        let mut o = OmiConfig::default();
        assert_eq!(o.reconnect(), Duration::from_secs(60));
        o.reconnect_seconds = f64::NAN;
        o.reconnect_timelines_max = 0;
        let mut errors = Vec::new();
        o.validate(&mut errors);
        assert_eq!(
            errors,
            [
                "omi.reconnect_seconds: must be in 0..=3600",
                "omi.reconnect_timelines_max: must be in 1..=1000000",
            ]
        );
    }
}
