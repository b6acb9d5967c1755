//! `[on_connect]`: the hook asked whether (and with which consumers) a connection may start.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnConnectConfig {
    /// Receives `{token, query, endpoint}` as JSON; answers `{"allow":bool, "reason":..,
    /// "uid":.., "webhooks":[..]}`.
    pub url: String,
    #[serde(default = "default_hook_timeout")]
    pub timeout_ms: u64,
    /// Most audio webhooks (`webhooks` plus Omi `audio_apps`) an answer may list; an answer with
    /// more refuses the connection (1011 `on_connect_invalid`). Default 8.
    #[serde(default = "default_max_webhooks")]
    pub max_webhooks: usize,
}

fn default_hook_timeout() -> u64 {
    2000
}

fn default_max_webhooks() -> usize {
    8
}

impl OnConnectConfig {
    pub(super) fn validate(&self, errors: &mut Vec<String>) {
        if url::Url::parse(&self.url).is_err() {
            errors.push(format!("on_connect.url: {:?} is not a URL", self.url));
        }
        if self.timeout_ms == 0 {
            errors.push("on_connect.timeout_ms: must be > 0".into());
        }
        if !(1..=64).contains(&self.max_webhooks) {
            errors.push("on_connect.max_webhooks: must be in 1..=64".into());
        }
    }

    /// How long the hook may take to answer.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_timeout_defaults_to_two_seconds() {
        let hook: OnConnectConfig = serde_json::from_str(r#"{"url":"http://x"}"#).unwrap();
        assert_eq!(hook.timeout(), Duration::from_secs(2));
        assert_eq!(hook.max_webhooks, 8);
        let mut errors = Vec::new();
        hook.validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
    }
}
