//! Typed configuration: embedded defaults, then a TOML file, then `VOXGATE_*` environment
//! variables (nested keys joined with `__`, e.g. `VOXGATE_SERVER__LISTEN`). Validated once at
//! start with every error reported. No `std::env::var` outside this file.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use voxgate_media::Limits;
use voxgate_session::SegmenterConfig;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub media: MediaConfig,
    pub segmenter: SegmentConfig,
    pub subscribers: SubscriberConfig,
    /// Named audio-bytes webhooks; those with `default = true` serve every session unless the
    /// connect query (`consumers=a,b`) or the `on_connect` hook says otherwise.
    pub webhooks: Vec<WebhookConfig>,
    pub on_connect: Option<OnConnectConfig>,
    /// Named speech-to-text backends; those with `default = true` serve every session unless
    /// the connect query (`stt=a,b`, or `stt=` for none) says otherwise.
    pub stt: Vec<SttConfig>,
    /// Omi pusher compatibility (`/v1/trigger/listen`).
    pub omi: OmiConfig,
    /// Tokens, per-user caps and connection rate limits.
    pub auth: crate::auth::AuthConfig,
    /// Where webhooks supplied by the `on_connect` hook may point.
    pub webhook_policy: crate::policy::WebhookPolicy,
    /// Delivery through NATS JetStream and `voxgate deliver` workers. Off by default.
    pub bus: crate::bus::BusConfig,
}

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
}

impl Default for OmiConfig {
    fn default() -> Self {
        Self {
            transcript_webhook: None,
            conversation_webhook: None,
            audio_apps: Vec::new(),
            audio_app_delay_seconds: 4.0,
        }
    }
}

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
    /// Messages per second one connection may send (token bucket, burst twice that); a flood
    /// beyond it closes the session with 1008. Default 500.
    pub max_messages_per_second: f64,
    /// Shared by the instances of a deployment: lets a resumable session drained from one
    /// instance continue on another (`resume_state` in `Closed`). Unset: no handoff.
    pub resume_secret: Option<String>,
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
        }
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
}

impl Default for SegmentConfig {
    fn default() -> Self {
        Self {
            vad_threshold: 0.5,
            min_speech_ms: 48,
            silence_ms: 800,
            pre_roll_ms: 300,
            max_utterance_seconds: 60.0,
        }
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

fn yes() -> bool {
    true
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
fn default_backoff_ms() -> u64 {
    200
}
fn default_backoff_max_ms() -> u64 {
    5000
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

    /// Errors of this entry, each prefixed with `prefix`.
    pub fn validate(&self, prefix: &str, errors: &mut Vec<String>) {
        if self.name.is_empty() || self.name.len() > 64 {
            errors.push(format!("{prefix}.name: must be 1-64 characters"));
        }
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
        if self.timeout_ms == 0 {
            errors.push(format!("{prefix}.timeout_ms: must be > 0"));
        }
        if self.max_retries > 20 {
            errors.push(format!("{prefix}.max_retries: must be <= 20"));
        }
        if self.backoff_initial_ms == 0 || self.backoff_max_ms < self.backoff_initial_ms {
            errors.push(format!(
                "{prefix}.backoff_*: need 0 < backoff_initial_ms <= backoff_max_ms"
            ));
        }
        if self.breaker_failures == 0 {
            errors.push(format!("{prefix}.breaker_failures: must be > 0"));
        }
        if !(self.breaker_cooldown_seconds.is_finite() && self.breaker_cooldown_seconds >= 0.0) {
            errors.push(format!("{prefix}.breaker_cooldown_seconds: must be >= 0"));
        }
    }

    /// Samples per POST at 16 kHz (`0` = every chunk), or `None` when the webhook is off.
    pub fn batch_samples(&self) -> Option<u64> {
        self.delay_seconds.map(|d| (d * 16_000.0).round() as u64)
    }

    /// Byte cap of this webhook's per-session buffer.
    pub fn max_buffer_bytes(&self) -> usize {
        (self.max_buffer_seconds * 16_000.0) as usize * 2
    }
}

/// Which speech-to-text protocol a backend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SttBackend {
    /// OpenAI-compatible `POST {url}/v1/audio/transcriptions`, one request per utterance
    /// (OpenAI, faster-whisper-server, whisper.cpp `--inference-path`, vLLM, ...).
    Openai,
    /// Deepgram-compatible streaming WebSocket `{url}/v1/listen`.
    Deepgram,
    /// Embedded PocketSphinx (cargo feature `pocketsphinx`; demo-grade accuracy).
    Pocketsphinx,
}

impl SttBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Deepgram => "deepgram",
            Self::Pocketsphinx => "pocketsphinx",
        }
    }
}

/// One speech-to-text backend. Transcripts go back to the client (and subscribers) as
/// `Transcript` events and, with `transcript_webhook`, are POSTed as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SttConfig {
    pub name: String,
    pub backend: SttBackend,
    /// Base URL (`http(s)://` for openai; `ws(s)://` or `http(s)://` for deepgram). Unused by
    /// pocketsphinx.
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub language: Option<String>,
    /// OpenAI `prompt` (vocabulary hints).
    #[serde(default)]
    pub prompt: Option<String>,
    /// Sent as `Authorization: Bearer KEY` (openai) or `Authorization: Token KEY` (deepgram).
    #[serde(default)]
    pub api_key: Option<String>,
    /// Part of the default set. Default true.
    #[serde(default = "yes")]
    pub default: bool,
    /// Per request (openai, pocketsphinx) or per connection attempt (deepgram). Default 30000.
    #[serde(default = "default_stt_timeout_ms")]
    pub timeout_ms: u64,
    /// Retries after the first attempt of an utterance. Default 2.
    #[serde(default = "default_stt_retries")]
    pub max_retries: u32,
    /// First retry / reconnect delay; doubles, with full jitter. Default 200 ms.
    #[serde(default = "default_backoff_ms")]
    pub backoff_initial_ms: u64,
    /// Longest retry / reconnect delay. Default 5000 ms.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Requests (or decoder threads) in flight for this backend over all sessions. Default 4.
    #[serde(default = "default_stt_concurrency")]
    pub max_concurrency: usize,
    /// Cap of audio held per session for this backend (open utterance + utterances waiting,
    /// or unacknowledged streaming audio); beyond it new audio is dropped, counted. Default 90.
    #[serde(default = "default_stt_buffer_seconds")]
    pub max_buffer_seconds: f64,
    /// Deepgram: send `{"type":"KeepAlive"}` when no audio was sent for this long. Default 3.
    #[serde(default = "default_keepalive_seconds")]
    pub keepalive_seconds: f64,
    /// Final transcripts are POSTed here as JSON (retries with backoff, counted drops).
    #[serde(default)]
    pub transcript_webhook: Option<String>,
    /// PocketSphinx acoustic model directory. Default the Debian `pocketsphinx-en-us` one.
    #[serde(default)]
    pub hmm: Option<String>,
    /// PocketSphinx language model. Default Debian `en-us.lm.bin`.
    #[serde(default)]
    pub lm: Option<String>,
    /// PocketSphinx pronunciation dictionary. Default Debian `cmudict-en-us.dict`.
    #[serde(default)]
    pub dict: Option<String>,
}

fn default_stt_timeout_ms() -> u64 {
    30_000
}
fn default_stt_retries() -> u32 {
    2
}
fn default_stt_concurrency() -> usize {
    4
}
fn default_stt_buffer_seconds() -> f64 {
    90.0
}
fn default_keepalive_seconds() -> f64 {
    3.0
}

impl SttConfig {
    /// A backend with every default, for tests.
    pub fn new(name: &str, backend: SttBackend, url: &str) -> Self {
        Self {
            name: name.into(),
            backend,
            url: url.into(),
            model: None,
            language: None,
            prompt: None,
            api_key: None,
            default: true,
            timeout_ms: default_stt_timeout_ms(),
            max_retries: default_stt_retries(),
            backoff_initial_ms: default_backoff_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            max_concurrency: default_stt_concurrency(),
            max_buffer_seconds: default_stt_buffer_seconds(),
            keepalive_seconds: default_keepalive_seconds(),
            transcript_webhook: None,
            hmm: None,
            lm: None,
            dict: None,
        }
    }

    /// Errors of this entry, each prefixed with `prefix`.
    pub fn validate(&self, prefix: &str, errors: &mut Vec<String>) {
        if self.name.is_empty() || self.name.len() > 64 {
            errors.push(format!("{prefix}.name: must be 1-64 characters"));
        }
        let schemes: &[&str] = match self.backend {
            SttBackend::Openai => &["http", "https"],
            SttBackend::Deepgram => &["ws", "wss", "http", "https"],
            SttBackend::Pocketsphinx => &[],
        };
        if !schemes.is_empty() {
            match url::Url::parse(&self.url) {
                Ok(u) if schemes.contains(&u.scheme()) => {}
                Ok(u) => errors.push(format!(
                    "{prefix}.url: scheme {:?} is not one of {schemes:?}",
                    u.scheme()
                )),
                Err(e) => errors.push(format!("{prefix}.url: {:?}: {e}", self.url)),
            }
        }
        if self.backend == SttBackend::Pocketsphinx && !cfg!(feature = "pocketsphinx") {
            errors.push(format!(
                "{prefix}.backend: this voxgate was built without the `pocketsphinx` cargo feature"
            ));
        }
        if self.timeout_ms == 0 {
            errors.push(format!("{prefix}.timeout_ms: must be > 0"));
        }
        if self.max_retries > 20 {
            errors.push(format!("{prefix}.max_retries: must be <= 20"));
        }
        if self.backoff_initial_ms == 0 || self.backoff_max_ms < self.backoff_initial_ms {
            errors.push(format!(
                "{prefix}.backoff_*: need 0 < backoff_initial_ms <= backoff_max_ms"
            ));
        }
        if !(1..=1024).contains(&self.max_concurrency) {
            errors.push(format!("{prefix}.max_concurrency: must be in 1..=1024"));
        }
        if !(self.max_buffer_seconds.is_finite()
            && self.max_buffer_seconds >= 1.0
            && self.max_buffer_seconds <= 3600.0)
        {
            errors.push(format!("{prefix}.max_buffer_seconds: must be in [1, 3600]"));
        }
        if !(self.keepalive_seconds.is_finite()
            && self.keepalive_seconds > 0.0
            && self.keepalive_seconds <= 60.0)
        {
            errors.push(format!("{prefix}.keepalive_seconds: must be in (0, 60]"));
        }
        if let Some(hook) = &self.transcript_webhook {
            match url::Url::parse(hook) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                _ => errors.push(format!(
                    "{prefix}.transcript_webhook: {hook:?} is not an http(s) URL"
                )),
            }
        }
    }

    /// Byte cap of this backend's per-session buffer.
    pub fn max_buffer_bytes(&self) -> usize {
        (self.max_buffer_seconds * 16_000.0) as usize * 2
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnConnectConfig {
    /// Receives `{token, query, endpoint}` as JSON; answers `{"allow":bool, "reason":..,
    /// "uid":.., "webhooks":[..]}`.
    pub url: String,
    #[serde(default = "default_hook_timeout")]
    pub timeout_ms: u64,
}

fn default_hook_timeout() -> u64 {
    2000
}

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigErrors(pub Vec<String>);

impl Config {
    /// Defaults, then `file` (if given; it must exist), then `VOXGATE_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigErrors> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigErrors(vec![format!(
                    "config file {} does not exist",
                    path.display()
                )]));
            }
            fig = fig.merge(Toml::file(path));
        }
        fig = fig.merge(Env::prefixed("VOXGATE_").ignore(&["LOG"]).split("__"));
        let cfg: Config = fig
            .extract()
            .map_err(|e| ConfigErrors(e.into_iter().map(|e| e.to_string()).collect()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every field; reports all problems at once.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let s = &self.server;
        if s.listen.parse::<SocketAddr>().is_err() {
            errors.push(format!(
                "server.listen: {:?} is not an IP:port address",
                s.listen
            ));
        }
        if s.max_sessions == 0 {
            errors.push("server.max_sessions: must be > 0".into());
        }
        if !(1024..=64 << 20).contains(&s.max_message_bytes) {
            errors.push("server.max_message_bytes: must be in 1 KiB..=64 MiB".into());
        }
        for (name, v) in [
            ("idle_timeout_seconds", s.idle_timeout_seconds),
            ("close_flush_seconds", s.close_flush_seconds),
            ("shutdown_grace_seconds", s.shutdown_grace_seconds),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
                errors.push(format!("server.{name}: must be in (0, 86400]"));
            }
        }
        if !(s.max_session_seconds.is_finite() && s.max_session_seconds >= 0.0) {
            errors.push("server.max_session_seconds: must be >= 0 (0 = unlimited)".into());
        }
        if !(s.max_messages_per_second.is_finite() && s.max_messages_per_second >= 1.0) {
            errors.push("server.max_messages_per_second: must be >= 1".into());
        }
        if s.resume_secret.as_ref().is_some_and(|k| k.len() < 16) {
            errors.push("server.resume_secret: use at least 16 bytes".into());
        }
        if s.client_queue_messages == 0 {
            errors.push("server.client_queue_messages: must be > 0".into());
        }
        let m = &self.media;
        if m.max_element_bytes < 8 * 1024 || m.max_element_bytes > m.max_pending_bytes {
            errors.push(
                "media.max_element_bytes: must be >= 8 KiB and <= media.max_pending_bytes".into(),
            );
        }
        if m.max_pending_bytes > 64 << 20 {
            errors.push("media.max_pending_bytes: must be <= 64 MiB".into());
        }
        if !(2..=64).contains(&m.max_depth) {
            errors.push("media.max_depth: must be in 2..=64".into());
        }
        let g = &self.segmenter;
        if !(0.0..=1.0).contains(&g.vad_threshold) {
            errors.push("segmenter.vad_threshold: must be in 0..=1".into());
        }
        if !(g.max_utterance_seconds.is_finite()
            && g.max_utterance_seconds >= 1.0
            && g.max_utterance_seconds <= 3600.0)
        {
            errors.push("segmenter.max_utterance_seconds: must be in 1..=3600".into());
        }
        if self.subscribers.queue_messages == 0 {
            errors.push("subscribers.queue_messages: must be > 0".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, w) in self.webhooks.iter().enumerate() {
            w.validate(&format!("webhooks[{i}]"), &mut errors);
            if !names.insert(w.name.as_str()) {
                errors.push(format!("webhooks[{i}].name: duplicate name {:?}", w.name));
            }
        }
        let mut stt_names = std::collections::HashSet::new();
        for (i, s) in self.stt.iter().enumerate() {
            s.validate(&format!("stt[{i}]"), &mut errors);
            if !stt_names.insert(s.name.as_str()) {
                errors.push(format!("stt[{i}].name: duplicate name {:?}", s.name));
            }
        }
        if let Some(hook) = &self.on_connect {
            if url::Url::parse(&hook.url).is_err() {
                errors.push(format!("on_connect.url: {:?} is not a URL", hook.url));
            }
            if hook.timeout_ms == 0 {
                errors.push("on_connect.timeout_ms: must be > 0".into());
            }
        }
        self.auth.validate(&s.listen, &mut errors);
        self.bus.validate(&self.webhooks, &mut errors);
        let o = &self.omi;
        for (name, url) in [
            ("omi.transcript_webhook", o.transcript_webhook.as_ref()),
            ("omi.conversation_webhook", o.conversation_webhook.as_ref()),
        ]
        .into_iter()
        .chain(o.audio_apps.iter().map(|u| ("omi.audio_apps", Some(u))))
        {
            if let Some(url) = url {
                if url::Url::parse(url).is_err() {
                    errors.push(format!("{name}: {url:?} is not a URL"));
                }
            }
        }
        if !(o.audio_app_delay_seconds.is_finite() && o.audio_app_delay_seconds >= 0.0) {
            errors.push("omi.audio_app_delay_seconds: must be >= 0".into());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    pub fn limits(&self) -> Limits {
        let mut l = Limits::default();
        l.max_pending_bytes = self.media.max_pending_bytes;
        l.max_element_bytes = self.media.max_element_bytes;
        l.max_depth = self.media.max_depth;
        l
    }

    pub fn segmenter(&self) -> SegmenterConfig {
        let g = &self.segmenter;
        let ms = |v: u64| v * 16;
        SegmenterConfig {
            threshold: g.vad_threshold,
            min_speech_samples: ms(g.min_speech_ms),
            silence_samples: ms(g.silence_ms),
            pre_roll_samples: ms(g.pre_roll_ms),
            max_utterance_samples: (g.max_utterance_seconds * 16_000.0) as u64,
        }
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.server.idle_timeout_seconds)
    }

    pub fn max_session(&self) -> Option<Duration> {
        (self.server.max_session_seconds > 0.0)
            .then(|| Duration::from_secs_f64(self.server.max_session_seconds))
    }

    /// Worst-case bytes one session may hold, by formula: the largest WebSocket message, the
    /// decoder's bound, the segmenter window, the client event queue, and every consumer cap.
    pub fn session_memory_bound(&self) -> usize {
        const SEGMENTER: usize = 16 * 1024; // earshot state (~8 KiB) + one frame
        const EVENT: usize = 512; // a JSON event is a few hundred bytes at most
                                  // With a bus, a session's audio webhooks are served by its bus publisher, which holds
                                  // at most `bus.max_buffer_seconds` of audio per webhook instead of the webhook's own cap.
        let bus_cap = (self.bus.max_buffer_seconds * 32_000.0) as usize;
        let webhooks: usize = self
            .webhooks
            .iter()
            .filter(|w| w.delay_seconds.is_some())
            .map(|w| match self.bus.url {
                Some(_) => bus_cap,
                None => w.max_buffer_bytes(),
            })
            .sum();
        // Any backend may be selected by the connect query.
        let stt: usize = self.stt.iter().map(SttConfig::max_buffer_bytes).sum();
        // A subscriber queue holds at most `queue_messages` items, each at most one decoded
        // message (a max-size message of 8 kHz u8 PCM doubles at 16 kHz PCM16: x4 bound).
        let subscriber = self.subscribers.queue_messages * self.server.max_message_bytes * 4;
        self.server.max_message_bytes * 5 // message + decoded PCM of it (<= x4)
            + self.media.max_pending_bytes
            + self.media.max_element_bytes
            + SEGMENTER
            + self.server.client_queue_messages * EVENT
            + webhooks
            + stt
            + subscriber * self.subscribers.max_per_session
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn every_error_is_reported() {
        let mut cfg = Config::default();
        cfg.server.listen = "nowhere".into();
        cfg.server.max_message_bytes = 1;
        cfg.webhooks
            .push(WebhookConfig::new("a", "ftp://x", Some(-1.0)));
        cfg.webhooks
            .push(WebhookConfig::new("a", "http://x", Some(120.0)));
        let err = cfg.validate().unwrap_err();
        let text = err.to_string();
        for needle in [
            "server.listen",
            "max_message_bytes",
            "webhooks[0].url",
            "webhooks[0].delay_seconds",
            "webhooks[1].name: duplicate",
            "webhooks[1].delay_seconds: 120 exceeds",
        ] {
            assert!(text.contains(needle), "missing {needle} in {text}");
        }
    }

    #[test]
    fn stt_entries_are_validated() {
        let mut cfg = Config::default();
        cfg.stt
            .push(SttConfig::new("a", SttBackend::Openai, "ws://x"));
        let mut dup = SttConfig::new("a", SttBackend::Deepgram, "wss://x");
        dup.max_concurrency = 0;
        dup.transcript_webhook = Some("nope".into());
        cfg.stt.push(dup);
        let text = cfg.validate().unwrap_err().to_string();
        for needle in [
            "stt[0].url",
            "stt[1].name: duplicate",
            "stt[1].max_concurrency",
            "stt[1].transcript_webhook",
        ] {
            assert!(text.contains(needle), "missing {needle} in {text}");
        }
        let toml = r#"
            [[stt]]
            name = "whisper"
            backend = "openai"
            url = "http://127.0.0.1:8000"
            model = "Systran/faster-whisper-small"
        "#;
        let parsed: Config = figment::Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(toml))
            .extract()
            .unwrap();
        parsed.validate().unwrap();
        assert_eq!(parsed.stt[0].backend, SttBackend::Openai);
        assert!(parsed.stt[0].default);
    }

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
}
