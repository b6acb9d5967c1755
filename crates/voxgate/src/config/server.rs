//! `[server]`, `[media]`, `[segmenter]` and `[subscribers]`: the sections that size and time
//! every session, their checks, and their values as `Duration`s and sample counts.
//!
//! The fields stay `*_seconds: f64` and `*_ms: u64` (TOML and `VOXGATE_*` compatibility); code
//! should read them through the typed accessors. Accessors built on `Duration::from_secs_f64`
//! are valid for values `validate` accepts.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use voxgate_media::Limits;
use voxgate_session::{SegmenterConfig, VadMode};

use super::{SAMPLES_PER_MS, SAMPLES_PER_SECOND};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:8080`.
    pub listen: String,
    /// Concurrent sessions; beyond it new connections are closed with 1013. Default 1000.
    pub max_sessions: usize,
    /// Largest WebSocket message accepted. Default 1 MiB.
    pub max_message_bytes: usize,
    /// Close a session that sends neither audio nor KeepAlive for this long. Default 10 s.
    pub idle_timeout_seconds: f64,
    /// Longest session (0 = unlimited). Default 4 h.
    pub max_session_seconds: f64,
    /// How long a closing session waits for its consumers to flush. Default 10 s.
    pub close_flush_seconds: f64,
    /// How long shutdown waits for sessions to flush. Default 15 s.
    pub shutdown_grace_seconds: f64,
    /// Events queued for a client socket before the session is closed as too slow. Default 256.
    pub client_queue_messages: usize,
    /// How long a resumable session (`?resumable=true`) waits for its client to reconnect
    /// after the socket drops (0 = resume off). Default 30 s.
    pub resume_grace_seconds: f64,
    /// Messages per second read from one connection (token bucket, burst twice that). A client
    /// that sends faster is paced: its socket is not read until the budget refills, so TCP slows
    /// it down. Ping and Pong frames count. Default 500.
    pub max_messages_per_second: f64,
    /// Shared by the instances of a deployment: lets a resumable session drained from one
    /// instance continue on another (`resume_state` in `Closed`). Unset: no handoff.
    pub resume_secret: Option<String>,
    /// How long a client may take to send a request's headers (also the idle limit of a
    /// keep-alive connection between requests); then the connection is closed. Default 10 s.
    pub header_read_timeout_seconds: f64,
    /// Open TCP connections (WebSockets included, for their whole life); beyond it a new
    /// connection gets a minimal 503 with `Retry-After` and is closed. Clamped, with a warning,
    /// to what the descriptor limit allows. Default 8192.
    pub max_connections: usize,
    /// Open TCP connections per client IP (IPv6: per /64); beyond it, 503 and close.
    /// Default 256.
    pub max_connections_per_ip: usize,
    /// Bytes per second read from one connection (token bucket, burst twice that); a faster
    /// client is paced like `max_messages_per_second`. Default 1 MiB/s (30x 16 kHz PCM16).
    pub max_bytes_per_second: f64,
    /// A connection held back by the message budget whose messages averaged fewer bytes than
    /// this since it was last held back (at least one burst of messages) is closed with 1008
    /// `message_flood`: pacing bounds its cost, but it carries almost no audio. 0 = never.
    /// Default 16.
    pub flood_min_message_bytes: usize,
    /// Proxies (IPs or CIDRs) whose `X-Forwarded-For` / `Forwarded: for=` name the client for
    /// the per-IP limits. Headers from any other peer are ignored. Default none.
    pub trusted_proxies: Vec<String>,
    /// TLS on the listener: a PEM certificate chain and its private key (both or neither).
    /// Default none (plain TCP; put TLS in front, or set these).
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    /// Log lines buffered for the log writer; beyond it lines are dropped (counted in
    /// `voxgate_log_lines_dropped_total`) so logging never stalls ingest. Default 10000.
    pub log_buffer_lines: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_sessions: 1000,
            max_message_bytes: 1 << 20,
            idle_timeout_seconds: 10.0,
            max_session_seconds: 4.0 * 3600.0,
            close_flush_seconds: 10.0,
            shutdown_grace_seconds: 15.0,
            client_queue_messages: 256,
            resume_grace_seconds: 30.0,
            max_messages_per_second: 500.0,
            resume_secret: None,
            header_read_timeout_seconds: 10.0,
            max_connections: 8192,
            max_connections_per_ip: 256,
            max_bytes_per_second: (1 << 20) as f64,
            flood_min_message_bytes: 16,
            trusted_proxies: Vec::new(),
            tls_cert_file: None,
            tls_key_file: None,
            log_buffer_lines: 10_000,
        }
    }
}

impl ServerConfig {
    pub(super) fn validate(&self, errors: &mut Vec<String>) {
        if self.listen.parse::<SocketAddr>().is_err() {
            errors.push(format!(
                "server.listen: {:?} is not an IP:port address",
                self.listen
            ));
        }
        if self.max_sessions == 0 {
            errors.push("server.max_sessions: must be > 0".into());
        }
        if !(1024..=64 << 20).contains(&self.max_message_bytes) {
            errors.push("server.max_message_bytes: must be in 1 KiB..=64 MiB".into());
        }
        for (name, v) in [
            ("idle_timeout_seconds", self.idle_timeout_seconds),
            ("close_flush_seconds", self.close_flush_seconds),
            ("shutdown_grace_seconds", self.shutdown_grace_seconds),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
                errors.push(format!("server.{name}: must be in (0, 86400]"));
            }
        }
        if !(self.max_session_seconds.is_finite() && self.max_session_seconds >= 0.0) {
            errors.push("server.max_session_seconds: must be >= 0 (0 = unlimited)".into());
        }
        if !(self.max_messages_per_second.is_finite() && self.max_messages_per_second >= 1.0) {
            errors.push("server.max_messages_per_second: must be >= 1".into());
        }
        if self.resume_secret.as_ref().is_some_and(|k| k.len() < 16) {
            errors.push("server.resume_secret: use at least 16 bytes".into());
        }
        if self.client_queue_messages == 0 {
            errors.push("server.client_queue_messages: must be > 0".into());
        }
        self.validate_connections(errors);
    }

    /// The connection-layer settings: header deadline, connection caps, pacing, proxies.
    fn validate_connections(&self, errors: &mut Vec<String>) {
        let h = self.header_read_timeout_seconds;
        if !(h.is_finite() && h > 0.0 && h <= 3600.0) {
            errors.push("server.header_read_timeout_seconds: must be in (0, 3600]".into());
        }
        if self.max_connections == 0 || self.max_connections_per_ip == 0 {
            errors.push("server.max_connections, max_connections_per_ip: must be > 0".into());
        }
        let b = self.max_bytes_per_second;
        if !(b.is_finite() && b >= 1024.0) {
            errors.push("server.max_bytes_per_second: must be >= 1024".into());
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            errors.push("server.tls_cert_file and server.tls_key_file: set both or neither".into());
        }
        for p in &self.trusted_proxies {
            if crate::proxy::parse_net(p).is_none() {
                errors.push(format!(
                    "server.trusted_proxies: {p:?} is not an IP address or CIDR"
                ));
            }
        }
        if self.log_buffer_lines == 0 {
            errors.push("server.log_buffer_lines: must be > 0".into());
        }
    }

    /// How long a client may take to send a request's headers.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.header_read_timeout_seconds)
    }

    /// Silence (no audio, no KeepAlive) after which a session is closed.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.idle_timeout_seconds)
    }

    /// Longest session; `None` when unlimited (`max_session_seconds = 0`).
    pub fn max_session(&self) -> Option<Duration> {
        (self.max_session_seconds > 0.0).then(|| Duration::from_secs_f64(self.max_session_seconds))
    }

    /// How long a closing session waits for its consumers to flush.
    pub fn close_flush(&self) -> Duration {
        Duration::from_secs_f64(self.close_flush_seconds)
    }

    /// How long shutdown waits for sessions to flush.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_grace_seconds)
    }

    /// How long a resumable session waits for its client; `None` when resume is off
    /// (`resume_grace_seconds = 0`).
    pub fn resume_grace(&self) -> Option<Duration> {
        (self.resume_grace_seconds > 0.0)
            .then(|| Duration::from_secs_f64(self.resume_grace_seconds))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// Unparsed container bytes held per session. Default 256 KiB.
    pub max_pending_bytes: usize,
    /// Largest container element buffered whole. Default 64 KiB.
    pub max_element_bytes: usize,
    /// Deepest EBML nesting. Default 8.
    pub max_depth: usize,
}

impl Default for MediaConfig {
    fn default() -> Self {
        let l = Limits::default();
        Self {
            max_pending_bytes: l.max_pending_bytes,
            max_element_bytes: l.max_element_bytes,
            max_depth: l.max_depth,
        }
    }
}

impl MediaConfig {
    pub(super) fn validate(&self, errors: &mut Vec<String>) {
        if self.max_element_bytes < 8 * 1024 || self.max_element_bytes > self.max_pending_bytes {
            errors.push(
                "media.max_element_bytes: must be >= 8 KiB and <= media.max_pending_bytes".into(),
            );
        }
        if self.max_pending_bytes > 64 << 20 {
            errors.push("media.max_pending_bytes: must be <= 64 MiB".into());
        }
        if !(2..=64).contains(&self.max_depth) {
            errors.push("media.max_depth: must be in 2..=64".into());
        }
    }

    /// The decoder limits of one session (the fields not configured keep their defaults).
    pub fn limits(&self) -> Limits {
        let mut l = Limits::default();
        l.max_pending_bytes = self.max_pending_bytes;
        l.max_element_bytes = self.max_element_bytes;
        l.max_depth = self.max_depth;
        l
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentConfig {
    /// VAD score at or above which a 16 ms frame is voice. Default 0.5.
    pub vad_threshold: f32,
    /// Voice needed to open an utterance. Default 48 ms.
    pub min_speech_ms: u64,
    /// Silence that ends an utterance. Default 800 ms.
    pub silence_ms: u64,
    /// Audio kept before the onset. Default 300 ms.
    pub pre_roll_ms: u64,
    /// Longest utterance before it is finalized (`utterance_limit_reached`). Default 60 s.
    pub max_utterance_seconds: f64,
    /// Where the neural voice detector runs: `"gated"` (default) only on frames whose energy
    /// leaves the decision open (about a quarter of them in speech, none in digital silence),
    /// `"always"` on every 16 ms frame.
    pub vad: VadMode,
}

impl Default for SegmentConfig {
    fn default() -> Self {
        Self {
            vad_threshold: 0.5,
            min_speech_ms: 48,
            silence_ms: 800,
            pre_roll_ms: 300,
            max_utterance_seconds: 60.0,
            vad: VadMode::Gated,
        }
    }
}

impl SegmentConfig {
    pub(super) fn validate(&self, errors: &mut Vec<String>) {
        if !(0.0..=1.0).contains(&self.vad_threshold) {
            errors.push("segmenter.vad_threshold: must be in 0..=1".into());
        }
        if !(self.max_utterance_seconds.is_finite()
            && self.max_utterance_seconds >= 1.0
            && self.max_utterance_seconds <= 3600.0)
        {
            errors.push("segmenter.max_utterance_seconds: must be in 1..=3600".into());
        }
    }

    /// The session segmenter's settings, in samples.
    pub fn segmenter(&self) -> SegmenterConfig {
        SegmenterConfig {
            threshold: self.vad_threshold,
            min_speech_samples: self.min_speech_samples(),
            silence_samples: self.silence_samples(),
            pre_roll_samples: self.pre_roll_samples(),
            max_utterance_samples: self.max_utterance_samples(),
            vad: self.vad,
        }
    }

    /// Voice needed to open an utterance.
    pub fn min_speech(&self) -> Duration {
        Duration::from_millis(self.min_speech_ms)
    }

    pub fn min_speech_samples(&self) -> u64 {
        self.min_speech_ms * SAMPLES_PER_MS
    }

    /// Silence that ends an utterance.
    pub fn silence(&self) -> Duration {
        Duration::from_millis(self.silence_ms)
    }

    pub fn silence_samples(&self) -> u64 {
        self.silence_ms * SAMPLES_PER_MS
    }

    /// Audio kept before the onset.
    pub fn pre_roll(&self) -> Duration {
        Duration::from_millis(self.pre_roll_ms)
    }

    pub fn pre_roll_samples(&self) -> u64 {
        self.pre_roll_ms * SAMPLES_PER_MS
    }

    /// Longest utterance before it is finalized.
    pub fn max_utterance(&self) -> Duration {
        Duration::from_secs_f64(self.max_utterance_seconds)
    }

    pub fn max_utterance_samples(&self) -> u64 {
        (self.max_utterance_seconds * SAMPLES_PER_SECOND) as u64
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubscriberConfig {
    /// Realtime subscribers per session; more are refused with 1013. Default 8.
    pub max_per_session: usize,
    /// Messages queued per subscriber; a subscriber that falls this far behind is disconnected
    /// (policy `disconnect`, counted). Default 256.
    pub queue_messages: usize,
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        Self {
            max_per_session: 8,
            queue_messages: 256,
        }
    }
}

impl SubscriberConfig {
    pub(super) fn validate(&self, errors: &mut Vec<String>) {
        if self.queue_messages == 0 {
            errors.push("subscribers.queue_messages: must be > 0".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_accessors_give_durations_and_zero_means_off() {
        let mut s = ServerConfig::default();
        assert_eq!(s.idle_timeout(), Duration::from_secs(10));
        assert_eq!(s.max_session(), Some(Duration::from_secs(4 * 3600)));
        assert_eq!(s.close_flush(), Duration::from_secs(10));
        assert_eq!(s.shutdown_grace(), Duration::from_secs(15));
        assert_eq!(s.resume_grace(), Some(Duration::from_secs(30)));
        s.max_session_seconds = 0.0;
        s.resume_grace_seconds = 0.0;
        s.close_flush_seconds = 0.25;
        assert_eq!(s.max_session(), None, "0 = unlimited");
        assert_eq!(s.resume_grace(), None, "0 = resume off");
        assert_eq!(s.close_flush(), Duration::from_millis(250));
    }

    #[test]
    fn segmenter_durations_become_16_khz_sample_counts() {
        let g = SegmentConfig::default();
        assert_eq!(g.min_speech(), Duration::from_millis(48));
        assert_eq!(g.silence(), Duration::from_millis(800));
        assert_eq!(g.pre_roll(), Duration::from_millis(300));
        assert_eq!(g.max_utterance(), Duration::from_secs(60));
        let s = g.segmenter();
        assert_eq!(s.threshold, 0.5);
        assert_eq!(s.min_speech_samples, 48 * 16);
        assert_eq!(s.silence_samples, 800 * 16);
        assert_eq!(s.pre_roll_samples, 300 * 16);
        assert_eq!(s.max_utterance_samples, 60 * 16_000);
    }
}
