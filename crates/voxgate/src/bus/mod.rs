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

mod attempt;
pub mod deliver;
pub mod publish;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::WebhookConfig;
use crate::fanout::retry::{Backoff, Jitter};

pub use crate::config::{BusConfig, MAX_BATCH_SECONDS};

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

/// The NATS client for `bus.url` (comma-separated servers), retrying its first connect and
/// reconnecting forever with `retry_backoff`.
async fn open_client(cfg: &BusConfig, name: &str) -> Result<async_nats::Client, BusError> {
    let url = cfg.url.as_ref().ok_or(BusError::NotConfigured)?;
    let addrs: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(|u| u.trim().parse().map_err(nats_err))
        .collect::<Result<_, _>>()?;
    async_nats::ConnectOptions::new()
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
        .map_err(nats_err)
}

/// Creates the stream (or checks it is there).
async fn ensure_stream(js: &jetstream::Context, cfg: &BusConfig) -> Result<(), BusError> {
    let want = stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![format!("{}.>", cfg.subject_prefix)],
        max_age: Duration::from_secs_f64(cfg.max_age_seconds),
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
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "bus: stream not ready; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(nats_err(e)),
        }
    }
}

/// The session KV bucket, created if it is not there (its entries live as long as messages).
async fn ensure_records(js: &jetstream::Context, cfg: &BusConfig) -> Result<kv::Store, BusError> {
    match js.get_key_value(&cfg.kv_bucket).await {
        Ok(store) => Ok(store),
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: cfg.kv_bucket.clone(),
                history: 1,
                max_age: Duration::from_secs_f64(cfg.max_age_seconds),
                num_replicas: cfg.replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(nats_err),
    }
}

impl Bus {
    /// Connects and creates (or checks) the stream and the KV bucket. Reconnects forever in the
    /// background afterwards; publishes fail fast (`publish_timeout_ms`) while it is down.
    pub async fn connect(cfg: &BusConfig, name: &str) -> Result<Self, BusError> {
        let client = open_client(cfg, name).await?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(cfg.publish_timeout());
        ensure_stream(&js, cfg).await?;
        let records = ensure_records(&js, cfg).await?;
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

    /// Marks `key` used, deployment-wide: `Ok(true)` the first time, `Ok(false)` after (the key
    /// lives in the records bucket, so it expires with `bus.max_age_seconds`).
    pub async fn spend_once(&self, key: &str) -> Result<bool, BusError> {
        match self.records.create(key, Bytes::new()).await {
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
