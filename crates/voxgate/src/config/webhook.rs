//! `[[webhooks]]`: named audio-bytes webhooks, their checks and what they mean in samples,
//! bytes and durations.
//!
//! `WebhookConfig` is also the `on_connect` hook's wire format and the bus session record's, so
//! its field names and serde attributes are an external format: they do not change here.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::outbound::{
    check_attempts, check_name, default_backoff_max_ms, default_backoff_ms, yes, Retry,
};
use super::{pcm_bytes, SAMPLES_PER_SECOND};

/// How a webhook's audio is encoded in the request body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BodyFormat {
    /// Raw PCM16LE mono 16 kHz.
    #[default]
    Pcm,
    /// The same samples in a WAV container.
    Wav,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub name: String,
    pub url: String,
    /// Absent: this webhook is off (no consumer, no buffer). `0`: POST every decoded chunk at
    /// once. `N > 0`: POST exactly N seconds of audio each time (the last partial batch at close).
    #[serde(default)]
    pub delay_seconds: Option<f64>,
    /// Part of the default consumer set. Default true.
    #[serde(default = "yes")]
    pub default: bool,
    /// HMAC-SHA256 secret; when set, requests carry `X-Voxgate-Signature`.
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub body: BodyFormat,
    /// Cap of audio held for this webhook per session (queue + batch + in flight); beyond it
    /// new audio is dropped (policy `drop_newest`, counted). Default 60 s.
    #[serde(default = "default_buffer_seconds")]
    pub max_buffer_seconds: f64,
    /// Per-request timeout. Default 5000 ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Retries after the first attempt. Default 3.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// First retry delay; doubles each retry, with full jitter. Default 200 ms.
    #[serde(default = "default_backoff_ms")]
    pub backoff_initial_ms: u64,
    /// Longest retry delay. Default 5000 ms.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Consecutive failures that open the endpoint's circuit breaker. Default 5.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker fails requests fast. Default 10 s.
    #[serde(default = "default_breaker_cooldown")]
    pub breaker_cooldown_seconds: f64,
}

fn default_buffer_seconds() -> f64 {
    60.0
}
fn default_timeout_ms() -> u64 {
    5000
}
fn default_retries() -> u32 {
    3
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown() -> f64 {
    10.0
}

impl WebhookConfig {
    /// A webhook with every default, for tests and the hook.
    pub fn new(name: &str, url: &str, delay_seconds: Option<f64>) -> Self {
        Self {
            name: name.into(),
            url: url.into(),
            delay_seconds,
            default: true,
            secret: None,
            body: BodyFormat::Pcm,
            max_buffer_seconds: default_buffer_seconds(),
            timeout_ms: default_timeout_ms(),
            max_retries: default_retries(),
            backoff_initial_ms: default_backoff_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            breaker_failures: default_breaker_failures(),
            breaker_cooldown_seconds: default_breaker_cooldown(),
        }
    }

    /// Errors of this entry, each prefixed with `prefix`. The rule that needs the bus
    /// (`delay_seconds` within one bus message) is checked by `Config::validate`.
    pub fn validate(&self, prefix: &str, errors: &mut Vec<String>) {
        check_name(prefix, &self.name, errors);
        match url::Url::parse(&self.url) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            Ok(u) => errors.push(format!(
                "{prefix}.url: scheme {:?} is not http or https",
                u.scheme()
            )),
            Err(e) => errors.push(format!("{prefix}.url: {e}")),
        }
        if let Some(d) = self.delay_seconds {
            if !(d.is_finite() && d >= 0.0) {
                errors.push(format!(
                    "{prefix}.delay_seconds: must be >= 0 (absent = off)"
                ));
            } else if d > self.max_buffer_seconds {
                errors.push(format!(
                    "{prefix}.delay_seconds: {d} exceeds max_buffer_seconds {}",
                    self.max_buffer_seconds
                ));
            }
        }
        if !(self.max_buffer_seconds.is_finite()
            && self.max_buffer_seconds > 0.0
            && self.max_buffer_seconds <= 3600.0)
        {
            errors.push(format!("{prefix}.max_buffer_seconds: must be in (0, 3600]"));
        }
        check_attempts(prefix, self.timeout(), &self.retry(), errors);
        if self.breaker_failures == 0 {
            errors.push(format!("{prefix}.breaker_failures: must be > 0"));
        }
        if !(self.breaker_cooldown_seconds.is_finite() && self.breaker_cooldown_seconds >= 0.0) {
            errors.push(format!("{prefix}.breaker_cooldown_seconds: must be >= 0"));
        }
    }

    /// Samples per POST (`0` = every chunk), or `None` when the webhook is off.
    pub fn batch_samples(&self) -> Option<u64> {
        self.delay_seconds
            .map(|d| (d * SAMPLES_PER_SECOND).round() as u64)
    }

    /// Audio per POST (zero = every chunk), or `None` when the webhook is off. Panics on a
    /// negative delay, which `validate` rejects.
    pub fn delay(&self) -> Option<Duration> {
        self.delay_seconds.map(Duration::from_secs_f64)
    }

    /// Cap of audio held per session, as a duration (valid after `validate`).
    pub fn max_buffer(&self) -> Duration {
        Duration::from_secs_f64(self.max_buffer_seconds)
    }

    /// Byte cap of this webhook's per-session buffer.
    pub fn max_buffer_bytes(&self) -> usize {
        pcm_bytes(self.max_buffer_seconds)
    }

    /// Per-request timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Retry count and backoff range.
    pub fn retry(&self) -> Retry {
        Retry::from_ms(
            self.max_retries,
            self.backoff_initial_ms,
            self.backoff_max_ms,
        )
    }

    /// How long an open breaker fails requests fast (valid after `validate`).
    pub fn breaker_cooldown(&self) -> Duration {
        Duration::from_secs_f64(self.breaker_cooldown_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_zero_is_not_off() {
        assert_eq!(
            WebhookConfig::new("a", "http://x", Some(0.0)).batch_samples(),
            Some(0)
        );
        assert_eq!(
            WebhookConfig::new("a", "http://x", None).batch_samples(),
            None
        );
        assert_eq!(
            WebhookConfig::new("a", "http://x", Some(5.0)).batch_samples(),
            Some(80_000)
        );
    }

    #[test]
    fn accessors_give_the_configured_durations_and_sizes() {
        let mut w = WebhookConfig::new("a", "http://x", Some(0.25));
        w.breaker_cooldown_seconds = 1.5;
        assert_eq!(w.delay(), Some(Duration::from_millis(250)));
        assert_eq!(WebhookConfig::new("a", "http://x", None).delay(), None);
        assert_eq!(w.max_buffer(), Duration::from_secs(60));
        assert_eq!(w.max_buffer_bytes(), 60 * 16_000 * 2);
        assert_eq!(w.timeout(), Duration::from_secs(5));
        assert_eq!(w.breaker_cooldown(), Duration::from_millis(1500));
        assert_eq!(
            w.retry(),
            Retry {
                max_retries: 3,
                backoff_initial: Duration::from_millis(200),
                backoff_max: Duration::from_secs(5),
            }
        );
    }
}
