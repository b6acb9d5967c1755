//! Typed configuration: embedded defaults, then a TOML file, then `VOXGATE_*` environment
//! variables (nested keys joined with `__`, e.g. `VOXGATE_SERVER__LISTEN`). Validated once at
//! start with every error reported, each with its path. No `std::env::var` outside this folder.
//!
//! One file per section (`server`, `webhook`, `stt`, `omi`, `hook`, `bus`); `[auth]` and
//! `[webhook_policy]` live with their components. Each section checks itself; the rules that span
//! sections (unique names, a webhook batch within one bus message) are checked here.
//! `memory` derives the per-session memory bound from the whole tree.

mod bus;
mod carriers;
mod deepgram;
mod gap_fill;
mod hook;
mod memory;
mod omi;
mod outbound;
mod realtime;
mod recording;
mod server;
mod stt;
mod twilio;
mod webhook;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use voxgate_media::Limits;
use voxgate_session::SegmenterConfig;

pub use bus::{BusConfig, MAX_BATCH_SECONDS};
pub use carriers::CarriersConfig;
pub use deepgram::{DeepgramConfig, Dialect};
pub use gap_fill::GapFillConfig;
pub use hook::OnConnectConfig;
pub use memory::{CONNECTION_BYTES, MAX_REQUEST_HEAD_BYTES};
pub use omi::OmiConfig;
pub use outbound::Retry;
pub use realtime::RealtimeConfig;
pub use recording::{RecordingConfig, RecordingLayout};
pub use server::{MediaConfig, SegmentConfig, ServerConfig, SubscriberConfig};
pub use stt::{FinalizeMode, SessionStt, SttBackend, SttConfig, SttOptions, MAX_PROMPT_CHARS};
pub use twilio::TwilioConfig;
pub use webhook::{BodyFormat, WebhookConfig};

/// Samples per second of the mono audio every session carries (16 kHz).
const SAMPLES_PER_SECOND: f64 = voxgate_session::SAMPLE_RATE as f64;
/// Samples per millisecond (16).
const SAMPLES_PER_MS: u64 = voxgate_session::SAMPLE_RATE as u64 / 1000;

/// Bytes of `seconds` of PCM16 audio, as buffer caps count them (whole samples).
fn pcm_bytes(seconds: f64) -> usize {
    (seconds * SAMPLES_PER_SECOND) as usize * 2
}

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
    pub bus: BusConfig,
    /// The budget for audio synthesized for gaps.
    pub gap_fill: GapFillConfig,
    /// Twilio Media Streams (`/v1/twilio`) before `start`.
    pub twilio: TwilioConfig,
    /// Deepgram's live API on `/v1/listen`.
    pub deepgram: DeepgramConfig,
    /// OpenAI's Realtime API (transcription) on `/v1/realtime`.
    pub realtime: RealtimeConfig,
    /// Phone carriers and PBXs besides Twilio (`/v1/<carrier>`, the AudioSocket listener).
    pub carriers: CarriersConfig,
    /// The recorder: session audio and events to object storage. Off unless asked for.
    pub recording: RecordingConfig,
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

    /// Checks every field; reports all problems at once, in section order.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        self.server.validate(&mut errors);
        self.media.validate(&mut errors);
        self.segmenter.validate(&mut errors);
        self.subscribers.validate(&mut errors);
        let mut names = HashSet::new();
        for (i, w) in self.webhooks.iter().enumerate() {
            w.validate(&format!("webhooks[{i}]"), &mut errors);
            if !names.insert(w.name.as_str()) {
                errors.push(format!("webhooks[{i}].name: duplicate name {:?}", w.name));
            }
        }
        let mut stt_names = HashSet::new();
        for (i, s) in self.stt.iter().enumerate() {
            s.validate(&format!("stt[{i}]"), &mut errors);
            if !stt_names.insert(s.name.as_str()) {
                errors.push(format!("stt[{i}].name: duplicate name {:?}", s.name));
            }
        }
        if let Some(hook) = &self.on_connect {
            hook.validate(&mut errors);
        }
        self.auth.validate(&self.server.listen, &mut errors);
        self.webhook_policy.validate(&mut errors);
        self.bus.validate(&mut errors);
        self.check_bus_batches(&mut errors);
        self.omi.validate(&mut errors);
        self.gap_fill.validate(&mut errors);
        self.twilio.validate(&mut errors);
        self.deepgram.validate(&mut errors);
        self.realtime.validate(&mut errors);
        self.carriers.validate(&mut errors);
        self.check_stt_aliases(&mut errors);
        self.recording.validate(&mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The backend a Deepgram or OpenAI client's `model` selects: the one it names (by `name` or
    /// `aliases`), else the first default one.
    pub fn stt_for_model(&self, model: &str) -> Option<&SttConfig> {
        (self.stt.iter().find(|s| s.answers_to(model)))
            .or_else(|| self.stt.iter().find(|s| s.default))
    }

    /// A `model=` selects one backend: names and aliases are unique across `[[stt]]`.
    fn check_stt_aliases(&self, errors: &mut Vec<String>) {
        let mut seen = HashSet::new();
        for s in &self.stt {
            seen.insert(s.name.as_str());
        }
        for (i, s) in self.stt.iter().enumerate() {
            for alias in &s.aliases {
                if !seen.insert(alias.as_str()) {
                    errors.push(format!(
                        "stt[{i}].aliases: {alias:?} already names a backend"
                    ));
                }
            }
        }
    }

    /// With a bus, one audio batch is one bus message, so no webhook may batch more than
    /// `MAX_BATCH_SECONDS` of audio.
    fn check_bus_batches(&self, errors: &mut Vec<String>) {
        if self.bus.url.is_none() {
            return;
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            if w.delay_seconds.is_some_and(|d| d > MAX_BATCH_SECONDS) {
                errors.push(format!(
                    "webhooks[{i}].delay_seconds: must be <= {MAX_BATCH_SECONDS} with a bus (one batch is one message)"
                ));
            }
        }
    }

    /// The decoder limits of a session.
    pub fn limits(&self) -> Limits {
        self.media.limits()
    }

    /// The segmenter settings of a session, in samples.
    pub fn segmenter(&self) -> SegmenterConfig {
        self.segmenter.segmenter()
    }

    /// Same as `ServerConfig::idle_timeout`.
    pub fn idle_timeout(&self) -> Duration {
        self.server.idle_timeout()
    }

    /// Same as `ServerConfig::max_session`.
    pub fn max_session(&self) -> Option<Duration> {
        self.server.max_session()
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
    fn bus_settings_are_validated_with_every_error_reported() {
        let mut cfg = Config::default();
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

    /// The batch rule spans `[bus]` and `[[webhooks]]`: it is checked by `Config`, after the bus
    /// section's own errors and before `[omi]`'s, with the webhook's path and the same text.
    #[test]
    fn a_webhook_batch_must_fit_in_one_bus_message() {
        let mut cfg = Config::default();
        cfg.webhooks
            .push(WebhookConfig::new("ok", "http://127.0.0.1:9/", Some(30.0)));
        cfg.webhooks
            .push(WebhookConfig::new("big", "http://127.0.0.1:9/", Some(31.0)));
        cfg.validate().expect("no bus: any delay within the buffer");
        cfg.bus.url = Some("nats://127.0.0.1:4222".into());
        cfg.bus.partitions = 0;
        cfg.omi.audio_app_delay_seconds = -1.0;
        let ConfigErrors(errors) = cfg.validate().unwrap_err();
        assert_eq!(
            errors,
            [
                "bus.partitions: must be in 1..=1024",
                "webhooks[1].delay_seconds: must be <= 30 with a bus (one batch is one message)",
                "omi.audio_app_delay_seconds: must be >= 0",
            ]
        );
        let mut bus_only = Vec::new();
        cfg.bus.validate(&mut bus_only);
        assert_eq!(bus_only, ["bus.partitions: must be in 1..=1024"]);
    }

    /// `Config::load` is what `voxgate serve` calls: any error from it exits 2.
    #[test]
    fn loading_a_file_reports_the_bus_batch_rule() {
        let dir = std::env::temp_dir().join(format!("voxgate-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bus.toml");
        std::fs::write(
            &path,
            "[bus]\nurl = \"nats://127.0.0.1:4222\"\n[[webhooks]]\nname = \"w\"\nurl = \"http://127.0.0.1:9/\"\ndelay_seconds = 45\n",
        )
        .unwrap();
        let err = Config::load(Some(&path)).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            err,
            "invalid configuration:\n  webhooks[0].delay_seconds: must be <= 30 with a bus (one batch is one message)"
        );
    }
}
