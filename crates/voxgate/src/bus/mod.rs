//! The delivery bus: NATS JetStream between gateways and `voxgate deliver` workers.
//!
//! Off unless `[bus] url` is set (the embedded default keeps delivery in-process). With it, a
//! session's audio webhooks and transcript webhooks are not called by the gateway: the session
//! publishes one message per webhook request it would have made, and deliver workers make the
//! requests with the same bodies, headers and `Idempotency-Key` (the message's `Nats-Msg-Id`).
//!
//! Subjects: `<prefix>.<partition>.<kind>.<tenant>.<session>.<channel>` where `partition` is a
//! hash of tenant and session (so one worker sees all of a session's messages), `kind` is
//! `start | audio | utterance | transcript | end`, and `channel` is the index of the webhook or
//! speech-to-text backend in the session's frozen record (0 for the other kinds). Dead letters
//! go to `<prefix>.dead.<tenant>.<session>`, which no worker consumes.
//!
//! A session's consumer list is frozen at start in the KV bucket `<kv_bucket>` under
//! `<tenant>.<session>`; workers read it from there, and a gateway that picks the session up
//! after another one died continues from it and from the last message of each channel.

pub mod deliver;
pub mod publish;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::WebhookConfig;
use crate::fanout::retry::{Backoff, Jitter};

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

/// Largest audio batch a bus message carries (NATS' default max payload is 1 MiB).
pub const MAX_BATCH_SECONDS: f64 = 30.0;

impl BusConfig {
    pub fn validate(&self, webhooks: &[WebhookConfig], errors: &mut Vec<String>) {
        let Some(url) = &self.url else { return };
        for u in url.split(',') {
            if u.trim().parse::<async_nats::ServerAddr>().is_err() {
                errors.push(format!("bus.url: {u:?} is not a NATS server address"));
            }
        }
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
        if !(1..=1024).contains(&self.partitions) {
            errors.push("bus.partitions: must be in 1..=1024".into());
        }
        if !(1..=5).contains(&self.replicas) {
            errors.push("bus.replicas: must be in 1..=5".into());
        }
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
        for (i, w) in webhooks.iter().enumerate() {
            if w.delay_seconds.is_some_and(|d| d > MAX_BATCH_SECONDS) {
                errors.push(format!(
                    "webhooks[{i}].delay_seconds: must be <= {MAX_BATCH_SECONDS} with a bus (one batch is one message)"
                ));
            }
        }
    }

    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }
}

/// A speech-to-text backend's transcript webhook, frozen with its session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TranscriptTarget {
    pub backend: String,
    pub url: String,
    pub timeout_ms: u64,
}

/// What a session's sinks are, fixed when it starts (KV `<tenant>.<session>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    pub session_id: String,
    pub uid: String,
    pub tenant: String,
    /// Audio-bytes webhooks (channel = index).
    pub audio: Vec<WebhookConfig>,
    /// Transcript webhooks (channel = index).
    pub transcripts: Vec<TranscriptTarget>,
    /// Whether the hook supplied the URLs (the worker then uses the guarded HTTP client).
    #[serde(default)]
    pub from_hook: bool,
    /// Set when the session ended; a record that ended is not continued.
    #[serde(default)]
    pub ended: bool,
}

/// Message kinds (the third subject token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Start,
    Audio,
    Utterance,
    Transcript,
    End,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Start => "start",
            Kind::Audio => "audio",
            Kind::Utterance => "utterance",
            Kind::Transcript => "transcript",
            Kind::End => "end",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "start" => Kind::Start,
            "audio" => Kind::Audio,
            "utterance" => Kind::Utterance,
            "transcript" => Kind::Transcript,
            "end" => Kind::End,
            _ => return None,
        })
    }
}

/// Header names on bus messages.
pub const H_SEQUENCE: &str = "Vox-Sequence";
pub const H_START_SAMPLE: &str = "Vox-Start-Sample";
pub const H_SESSION: &str = "Vox-Session-Id";

/// A session id as one subject token and KV key part: as is when it is only `A-Z a-z 0-9 - _`,
/// else `=` + hex (`=` cannot appear in a session id, so the two forms never collide).
pub fn session_token(session_id: &str) -> String {
    if session_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        session_id.to_owned()
    } else {
        format!("={}", hex::encode(session_id))
    }
}

/// FNV-1a over tenant and session: the partition every message of the session goes to.
pub fn partition(tenant: &str, session_id: &str, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in tenant.bytes().chain([0u8]).chain(session_id.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}

/// Subjects and keys of one session.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
    partition: u32,
    tenant: String,
    token: String,
}

impl Subjects {
    pub fn new(cfg: &BusConfig, session_id: &str) -> Self {
        Self {
            prefix: cfg.subject_prefix.clone(),
            partition: partition(&cfg.tenant, session_id, cfg.partitions),
            tenant: cfg.tenant.clone(),
            token: session_token(session_id),
        }
    }
    pub fn subject(&self, kind: Kind, channel: usize) -> String {
        format!(
            "{}.{}.{}.{}.{}.{}",
            self.prefix,
            self.partition,
            kind.as_str(),
            self.tenant,
            self.token,
            channel
        )
    }
    pub fn record_key(&self) -> String {
        format!("{}.{}", self.tenant, self.token)
    }
}

/// Where dead letters of a session go (outside every partition, so no worker consumes them).
pub fn dead_subject(prefix: &str, tenant: &str, token: &str) -> String {
    format!("{prefix}.dead.{tenant}.{token}")
}

/// A parsed session subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub kind: Kind,
    pub tenant: &'a str,
    pub token: &'a str,
    pub channel: usize,
}

pub fn parse_subject(subject: &str) -> Option<Parsed<'_>> {
    let mut it = subject.split('.');
    let (_prefix, _part) = (it.next()?, it.next()?);
    let kind = Kind::parse(it.next()?)?;
    let tenant = it.next()?;
    let token = it.next()?;
    let channel = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some(Parsed {
        kind,
        tenant,
        token,
        channel,
    })
}

/// A connected bus: the JetStream context, the stream and the session KV bucket, all ensured.
#[derive(Clone)]
pub struct Bus {
    pub cfg: Arc<BusConfig>,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub records: kv::Store,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus: {0}")]
    Nats(String),
    #[error("bus.url is not set")]
    NotConfigured,
}

/// How a gateway retries toward the bus (publishes, reconnects): 50 ms doubling to 1 s, no
/// jitter; it is one client retrying its own messages, not many clients of one endpoint.
pub(crate) fn retry_backoff() -> Backoff {
    Backoff::with(
        Duration::from_millis(50),
        Duration::from_secs(1),
        Jitter::None,
    )
}

fn nats_err(e: impl std::fmt::Display) -> BusError {
    BusError::Nats(e.to_string())
}

impl Bus {
    /// Connects and creates (or checks) the stream and the KV bucket. Reconnects forever in the
    /// background afterwards; publishes fail fast (`publish_timeout_ms`) while it is down.
    pub async fn connect(cfg: &BusConfig, name: &str) -> Result<Self, BusError> {
        let url = cfg.url.as_ref().ok_or(BusError::NotConfigured)?;
        let addrs: Vec<async_nats::ServerAddr> = url
            .split(',')
            .map(|u| u.trim().parse().map_err(nats_err))
            .collect::<Result<_, _>>()?;
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .ping_interval(Duration::from_millis(cfg.ping_interval_ms))
            .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .request_timeout(Some(cfg.publish_timeout()))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempt| {
                retry_backoff().delay_for(u32::try_from(attempt).unwrap_or(u32::MAX))
            })
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("bus connected"),
                    async_nats::Event::Disconnected => tracing::warn!("bus disconnected"),
                    other => tracing::debug!(event = %other, "bus event"),
                }
            })
            .connect(addrs)
            .await
            .map_err(nats_err)?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(cfg.publish_timeout());
        let max_age = Duration::from_secs_f64(cfg.max_age_seconds);
        let want = stream::Config {
            name: cfg.stream.clone(),
            subjects: vec![format!("{}.>", cfg.subject_prefix)],
            max_age,
            max_bytes: cfg.max_bytes,
            discard: stream::DiscardPolicy::New,
            duplicate_window: Duration::from_secs_f64(cfg.duplicate_window_seconds),
            num_replicas: cfg.replicas,
            storage: stream::StorageType::File,
            allow_direct: true,
            ..Default::default()
        };
        // The first connect may race a cluster electing its leader: retry for a while.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match js.get_or_create_stream(want.clone()).await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "bus: stream not ready; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(nats_err(e)),
            }
        }
        let records = match js.get_key_value(&cfg.kv_bucket).await {
            Ok(store) => store,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: cfg.kv_bucket.clone(),
                    history: 1,
                    max_age,
                    num_replicas: cfg.replicas,
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(nats_err)?,
        };
        Ok(Self {
            cfg: Arc::new(cfg.clone()),
            client,
            js,
            records,
        })
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    pub async fn record(&self, key: &str) -> Result<Option<SessionRecord>, BusError> {
        match self.records.get(key).await.map_err(nats_err)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(nats_err),
        }
    }

    /// Creates the record; `Ok(false)` when one already exists.
    pub async fn create_record(&self, key: &str, rec: &SessionRecord) -> Result<bool, BusError> {
        let body = Bytes::from(serde_json::to_vec(rec).map_err(nats_err)?);
        match self.records.create(key, body).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(nats_err(e)),
        }
    }

    pub async fn put_record(&self, key: &str, rec: &SessionRecord) -> Result<(), BusError> {
        let body = Bytes::from(serde_json::to_vec(rec).map_err(nats_err)?);
        self.records.put(key, body).await.map_err(nats_err)?;
        Ok(())
    }

    /// The last stored message on `subject`, if any.
    pub async fn last(&self, subject: &str) -> Result<Option<LastMessage>, BusError> {
        let stream = self
            .js
            .get_stream_no_info(&self.cfg.stream)
            .await
            .map_err(nats_err)?;
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(Some(LastMessage {
                sequence: header_u64(&m.headers, H_SEQUENCE),
                start_sample: header_u64(&m.headers, H_START_SAMPLE),
                payload_len: m.payload.len(),
            })),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(nats_err(e)),
        }
    }
}

/// What a continuing gateway needs from a channel's last message.
#[derive(Debug, Clone, Copy)]
pub struct LastMessage {
    pub sequence: Option<u64>,
    pub start_sample: Option<u64>,
    pub payload_len: usize,
}

pub fn header_u64(headers: &async_nats::HeaderMap, name: &str) -> Option<u64> {
    headers.get(name).and_then(|v| v.as_str().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip_and_dotted_ids_are_one_token() {
        let cfg = BusConfig::default();
        let s = Subjects::new(&cfg, "a.b:c");
        let subject = s.subject(Kind::Audio, 2);
        let p = parse_subject(&subject).expect("parses");
        assert_eq!(p.kind, Kind::Audio);
        assert_eq!(p.channel, 2);
        assert_eq!(p.token, format!("={}", hex::encode("a.b:c")));
        assert_eq!(subject.split('.').count(), 6);
        assert!(parse_subject("vox.1.bogus.t.s.0").is_none());
        assert!(parse_subject("vox.1.audio.t.s").is_none());
    }

    #[test]
    fn bus_settings_are_validated_with_every_error_reported() {
        let mut cfg = crate::config::Config::default();
        assert!(cfg.validate().is_ok(), "no bus by default");
        cfg.bus.url = Some("nats://127.0.0.1:4222,nats://[bad".into());
        cfg.bus.partitions = 0;
        cfg.bus.tenant = "a.b".into();
        cfg.webhooks
            .push(WebhookConfig::new("w", "http://127.0.0.1:9/", Some(60.0)));
        let err = cfg.validate().unwrap_err().to_string();
        for want in [
            "bus.url",
            "bus.partitions",
            "bus.tenant",
            "webhooks[0].delay_seconds",
        ] {
            assert!(err.contains(want), "{want} missing in {err}");
        }
    }

    #[test]
    fn the_memory_bound_counts_the_bus_buffer_instead_of_the_webhook_cap() {
        let mut cfg = crate::config::Config::default();
        let mut w = WebhookConfig::new("w", "http://127.0.0.1:9/", Some(1.0));
        w.max_buffer_seconds = 60.0;
        cfg.webhooks.push(w);
        let in_process = cfg.session_memory_bound();
        cfg.bus.url = Some("nats://127.0.0.1:4222".into());
        cfg.bus.max_buffer_seconds = 30.0;
        assert_eq!(in_process - cfg.session_memory_bound(), 30 * 32_000);
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        let p = partition("default", "session-1", 8);
        assert_eq!(p, partition("default", "session-1", 8));
        assert!(p < 8);
        let spread: std::collections::HashSet<u32> = (0..200)
            .map(|i| partition("default", &format!("s{i}"), 8))
            .collect();
        assert_eq!(spread.len(), 8, "200 sessions reach every partition");
    }
}
