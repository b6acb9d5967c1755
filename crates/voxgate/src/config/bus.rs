//! `[bus]`: where delivery runs when it does not run in-process, its checks, and its values as
//! `Duration`s and byte caps.
//!
//! It checks the bus section alone; the rule that also needs the webhooks (a batch must fit in
//! one bus message, `MAX_BATCH_SECONDS`) is checked by `Config::validate`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Bytes per second of the PCM16 audio the bus carries.
const BYTES_PER_SECOND: f64 = (voxgate_session::SAMPLE_RATE * 2) as f64;

/// Largest audio batch a bus message carries (NATS' default max payload is 1 MiB).
pub const MAX_BATCH_SECONDS: f64 = 30.0;

/// `[bus]`: where delivery runs when it does not run in-process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// NATS server URLs, comma-separated (`nats://a:4222,nats://b:4222`). Unset: no bus, webhooks
    /// are called in-process (the embedded default).
    pub url: Option<String>,
    /// JetStream stream holding every session message. Default `VOX`.
    pub stream: String,
    /// First subject token. Default `vox`.
    pub subject_prefix: String,
    /// Partitions of the subject space; each `voxgate deliver` worker takes some of them.
    /// Default 8. Changing it moves sessions between partitions: only change it when drained.
    pub partitions: u32,
    /// The tenant token of this deployment's subjects. Default `default`.
    pub tenant: String,
    /// Stream and KV replicas (1 for one server, 3 for a three-node cluster). Default 1.
    pub replicas: usize,
    /// How long messages are kept: the window in which a worker may still deliver them.
    /// Default 86400 (a day).
    pub max_age_seconds: f64,
    /// Stream size cap; when full, publishes fail (discard `new`) and sessions see it as a slow
    /// bus rather than losing stored messages. Default 10 GiB.
    pub max_bytes: i64,
    /// JetStream de-duplication window for `Nats-Msg-Id`. Default 120 s.
    pub duplicate_window_seconds: f64,
    /// Session records (frozen consumer lists) and delivery cursors. Default `vox-sessions`.
    pub kv_bucket: String,
    /// Audio a session holds for the bus (per audio webhook) while publishes are slow or failing.
    /// At half of it the client gets a `bus_slow` warning; past it audio is dropped (counted) and
    /// the session is closed with 1013 (retry later). Default 30 s.
    pub max_buffer_seconds: f64,
    /// Wait for one publish acknowledgment. Default 2000 ms.
    pub publish_timeout_ms: u64,
    /// Client keepalive ping, so a dead server is noticed fast. Default 1500 ms.
    pub ping_interval_ms: u64,
    /// Connect timeout per server. Default 2000 ms.
    pub connect_timeout_ms: u64,
    /// Workers: how long a delivery may take before JetStream redelivers it. Default 30 s.
    pub ack_wait_seconds: f64,
    /// Workers: attempts (POSTs) of one message before it is given up (terminated and
    /// dead-lettered). Default 10.
    pub max_deliver: i64,
    /// Workers: messages outstanding per partition. Default 1000.
    pub max_ack_pending: i64,
    /// Workers: first redelivery delay after a 429/5xx/transport error; doubles per attempt with
    /// jitter up to `backoff_max_ms`. Default 500 ms.
    pub backoff_initial_ms: u64,
    /// Default 30000 ms.
    pub backoff_max_ms: u64,
    /// Workers: messages held per session channel while waiting for an earlier one. Default 64.
    pub reorder_window: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            url: None,
            stream: "VOX".into(),
            subject_prefix: "vox".into(),
            partitions: 8,
            tenant: "default".into(),
            replicas: 1,
            max_age_seconds: 86_400.0,
            max_bytes: 10 << 30,
            duplicate_window_seconds: 120.0,
            kv_bucket: "vox-sessions".into(),
            max_buffer_seconds: 30.0,
            publish_timeout_ms: 2000,
            ping_interval_ms: 1500,
            connect_timeout_ms: 2000,
            ack_wait_seconds: 30.0,
            max_deliver: 10,
            max_ack_pending: 1000,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
            reorder_window: 64,
        }
    }
}

impl BusConfig {
    /// Errors of the `[bus]` section; none when no bus is configured.
    pub fn validate(&self, errors: &mut Vec<String>) {
        let Some(url) = &self.url else { return };
        for u in url.split(',') {
            if u.trim().parse::<async_nats::ServerAddr>().is_err() {
                errors.push(format!("bus.url: {u:?} is not a NATS server address"));
            }
        }
        self.check_names(errors);
        if !(1..=1024).contains(&self.partitions) {
            errors.push("bus.partitions: must be in 1..=1024".into());
        }
        if !(1..=5).contains(&self.replicas) {
            errors.push("bus.replicas: must be in 1..=5".into());
        }
        self.check_durations(errors);
        if self.max_bytes < 1 << 20 {
            errors.push("bus.max_bytes: must be >= 1 MiB".into());
        }
        if self.max_deliver < 1 || self.max_ack_pending < 1 || self.reorder_window == 0 {
            errors.push(
                "bus.max_deliver, bus.max_ack_pending and bus.reorder_window must be > 0".into(),
            );
        }
        if self.publish_timeout_ms == 0
            || self.ping_interval_ms == 0
            || self.connect_timeout_ms == 0
        {
            errors.push("bus: timeouts and the ping interval must be > 0".into());
        }
    }

    /// Stream, subject and KV names are single NATS tokens.
    fn check_names(&self, errors: &mut Vec<String>) {
        for (name, v) in [
            ("stream", &self.stream),
            ("subject_prefix", &self.subject_prefix),
            ("tenant", &self.tenant),
            ("kv_bucket", &self.kv_bucket),
        ] {
            if v.is_empty()
                || v.len() > 64
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                errors.push(format!(
                    "bus.{name}: must be 1-64 characters of A-Z a-z 0-9 - _"
                ));
            }
        }
    }

    fn check_durations(&self, errors: &mut Vec<String>) {
        for (name, v, max) in [
            ("max_age_seconds", self.max_age_seconds, 365.0 * 86_400.0),
            (
                "duplicate_window_seconds",
                self.duplicate_window_seconds,
                86_400.0,
            ),
            ("max_buffer_seconds", self.max_buffer_seconds, 3600.0),
            ("ack_wait_seconds", self.ack_wait_seconds, 3600.0),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= max) {
                errors.push(format!("bus.{name}: must be in (0, {max}]"));
            }
        }
        if self.duplicate_window_seconds > self.max_age_seconds {
            errors.push("bus.duplicate_window_seconds: must be <= bus.max_age_seconds".into());
        }
    }

    /// Wait for one publish acknowledgment.
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    /// Client keepalive ping interval.
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }

    /// Connect timeout per server.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// How long messages (and session records) are kept (valid after `validate`).
    pub fn max_age(&self) -> Duration {
        Duration::from_secs_f64(self.max_age_seconds)
    }

    /// JetStream de-duplication window (valid after `validate`).
    pub fn duplicate_window(&self) -> Duration {
        Duration::from_secs_f64(self.duplicate_window_seconds)
    }

    /// Workers: how long a delivery may take before it is redelivered (valid after `validate`).
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs_f64(self.ack_wait_seconds)
    }

    /// Workers: the first redelivery delay.
    pub fn backoff_initial(&self) -> Duration {
        Duration::from_millis(self.backoff_initial_ms)
    }

    /// Workers: the longest redelivery delay.
    pub fn backoff_max(&self) -> Duration {
        Duration::from_millis(self.backoff_max_ms)
    }

    /// Audio a session holds for the bus per audio webhook (valid after `validate`).
    pub fn max_buffer(&self) -> Duration {
        Duration::from_secs_f64(self.max_buffer_seconds)
    }

    /// Byte cap of what a session holds for the bus per audio webhook.
    pub fn max_buffer_bytes(&self) -> usize {
        (self.max_buffer_seconds * BYTES_PER_SECOND) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_errors_are_reported_with_their_paths_and_only_with_a_url() {
        let mut cfg = BusConfig {
            partitions: 0,
            tenant: "a.b".into(),
            ..BusConfig::default()
        };
        let mut errors = Vec::new();
        cfg.validate(&mut errors);
        assert!(errors.is_empty(), "no url, no bus: {errors:?}");
        cfg.url = Some("nats://127.0.0.1:4222,nats://[bad".into());
        cfg.validate(&mut errors);
        assert_eq!(
            errors,
            [
                r#"bus.url: "nats://[bad" is not a NATS server address"#,
                "bus.tenant: must be 1-64 characters of A-Z a-z 0-9 - _",
                "bus.partitions: must be in 1..=1024",
            ]
        );
        errors.clear();
        cfg = BusConfig {
            url: Some("nats://127.0.0.1:4222".into()),
            max_age_seconds: 60.0,
            ack_wait_seconds: 0.0,
            ..BusConfig::default()
        };
        cfg.validate(&mut errors);
        assert_eq!(
            errors,
            [
                "bus.ack_wait_seconds: must be in (0, 3600]",
                "bus.duplicate_window_seconds: must be <= bus.max_age_seconds",
            ]
        );
    }

    #[test]
    fn accessors_give_the_configured_durations_and_sizes() {
        let b = BusConfig::default();
        assert_eq!(b.publish_timeout(), Duration::from_secs(2));
        assert_eq!(b.ping_interval(), Duration::from_millis(1500));
        assert_eq!(b.connect_timeout(), Duration::from_secs(2));
        assert_eq!(b.max_age(), Duration::from_secs(86_400));
        assert_eq!(b.duplicate_window(), Duration::from_secs(120));
        assert_eq!(b.ack_wait(), Duration::from_secs(30));
        assert_eq!(b.backoff_initial(), Duration::from_millis(500));
        assert_eq!(b.backoff_max(), Duration::from_secs(30));
        assert_eq!(b.max_buffer(), Duration::from_secs(30));
        assert_eq!(b.max_buffer_bytes(), 30 * 32_000);
    }
}
