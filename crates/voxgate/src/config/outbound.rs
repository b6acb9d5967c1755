//! What every outbound endpoint (an audio webhook, a speech-to-text backend) shares in config:
//! a name, a per-request timeout, a retry count and a backoff range. Their serde defaults and
//! their checks live here once, so that the two sections cannot drift apart.

use std::time::Duration;

/// How an outbound endpoint retries a failed request: `1 + max_retries` attempts, each delay
/// drawn with full jitter below a ceiling that starts at `backoff_initial` and doubles up to
/// `backoff_max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Ceiling of the first retry delay.
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
}

impl Retry {
    /// From the flat `max_retries`, `backoff_initial_ms` and `backoff_max_ms` fields.
    pub fn from_ms(max_retries: u32, backoff_initial_ms: u64, backoff_max_ms: u64) -> Self {
        Self {
            max_retries,
            backoff_initial: Duration::from_millis(backoff_initial_ms),
            backoff_max: Duration::from_millis(backoff_max_ms),
        }
    }
}

// Serde defaults shared by `[[webhooks]]` and `[[stt]]`.
pub(super) fn yes() -> bool {
    true
}
pub(super) fn default_backoff_ms() -> u64 {
    200
}
pub(super) fn default_backoff_max_ms() -> u64 {
    5000
}

/// The name rule of `[[webhooks]]` and `[[stt]]` entries.
pub(super) fn check_name(prefix: &str, name: &str, errors: &mut Vec<String>) {
    if name.is_empty() || name.len() > 64 {
        errors.push(format!("{prefix}.name: must be 1-64 characters"));
    }
}

/// The timeout, retry and backoff rules of `[[webhooks]]` and `[[stt]]` entries. The messages
/// name the configured fields (`timeout_ms`, `backoff_initial_ms`, ...), not these types.
pub(super) fn check_attempts(
    prefix: &str,
    timeout: Duration,
    retry: &Retry,
    errors: &mut Vec<String>,
) {
    if timeout.is_zero() {
        errors.push(format!("{prefix}.timeout_ms: must be > 0"));
    }
    if retry.max_retries > 20 {
        errors.push(format!("{prefix}.max_retries: must be <= 20"));
    }
    if retry.backoff_initial.is_zero() || retry.backoff_max < retry.backoff_initial {
        errors.push(format!(
            "{prefix}.backoff_*: need 0 < backoff_initial_ms <= backoff_max_ms"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_are_checked_by_their_configured_names() {
        let mut errors = Vec::new();
        check_attempts("x", Duration::ZERO, &Retry::from_ms(21, 10, 5), &mut errors);
        assert_eq!(
            errors,
            [
                "x.timeout_ms: must be > 0",
                "x.max_retries: must be <= 20",
                "x.backoff_*: need 0 < backoff_initial_ms <= backoff_max_ms",
            ]
        );
        errors.clear();
        check_attempts(
            "x",
            Duration::from_millis(1),
            &Retry::from_ms(20, 5, 5),
            &mut errors,
        );
        check_name("x", "a", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        check_name("x", &"n".repeat(65), &mut errors);
        assert_eq!(errors, ["x.name: must be 1-64 characters"]);
    }
}
