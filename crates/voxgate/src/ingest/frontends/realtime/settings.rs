//! A Realtime transcription session's settings: what `session.update` may set (the input
//! format, the transcription model, language and prompt, turn detection), read from OpenAI's GA
//! shape (`session.audio.input.*`), and shown back in `session.created` / `session.updated`.

use serde::Deserialize;
use serde_json::{json, Value};
use voxgate_media::SourceFormat;
use voxgate_session::SegmenterConfig;

use crate::config::{Config, SttOptions};

/// The input audio format (`audio.input.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `audio/pcm`: PCM16 little-endian mono at `rate` (OpenAI's is 24000).
    Pcm(u32),
    /// `audio/pcmu`: G.711 mu-law 8 kHz.
    Pcmu,
    /// `audio/pcma`: G.711 A-law 8 kHz.
    Pcma,
}

impl Format {
    pub fn source(self) -> SourceFormat {
        match self {
            Self::Pcm(sample_rate) => SourceFormat::Linear16 {
                sample_rate,
                channels: 1,
            },
            Self::Pcmu => SourceFormat::Mulaw {
                sample_rate: 8_000,
                channels: 1,
            },
            Self::Pcma => SourceFormat::Alaw {
                sample_rate: 8_000,
                channels: 1,
            },
        }
    }

    fn json(self) -> Value {
        match self {
            Self::Pcm(rate) => json!({"type": "audio/pcm", "rate": rate}),
            Self::Pcmu => json!({"type": "audio/pcmu"}),
            Self::Pcma => json!({"type": "audio/pcma"}),
        }
    }
}

/// `server_vad` turn detection (`semantic_vad` is served as `server_vad` on its defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Turn {
    pub threshold: f32,
    pub prefix_padding_ms: u64,
    pub silence_duration_ms: u64,
}

/// What the session uses now.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub format: Format,
    /// `transcription.model` as asked (a backend's name or alias selects it).
    pub model: String,
    /// The backend whose transcripts the client gets (`None`: none serves the session).
    pub backend: Option<String>,
    pub language: Option<String>,
    pub prompt: Option<String>,
    /// `None`: the client commits turns (`turn_detection: null`).
    pub turn: Option<Turn>,
}

impl Settings {
    /// The defaults: 24 kHz PCM, `server_vad` with voxgate's segmenter settings, the backend
    /// `model` (from the connect query) names, else the first default one.
    pub fn defaults(cfg: &Config, model: Option<&str>) -> Self {
        let seg = &cfg.segmenter;
        let mut s = Self {
            format: Format::Pcm(24_000),
            model: String::new(),
            backend: None,
            language: None,
            prompt: None,
            turn: Some(Turn {
                threshold: seg.vad_threshold,
                prefix_padding_ms: seg.pre_roll_ms,
                silence_duration_ms: seg.silence_ms,
            }),
        };
        s.select(cfg, model.unwrap_or(""));
        s
    }

    fn select(&mut self, cfg: &Config, model: &str) {
        self.model = model.to_owned();
        self.backend = cfg.stt_for_model(model).map(|s| s.name.clone());
    }

    /// The options the backend's config allows (others are dropped, as OpenAI clients always
    /// send a language and often a prompt).
    pub fn stt_options(&self, cfg: &Config) -> SttOptions {
        let entry = (self.backend.as_deref()).and_then(|b| cfg.stt.iter().find(|s| s.name == b));
        let Some(entry) = entry else {
            return SttOptions::default();
        };
        SttOptions {
            language: (self.language.clone()).filter(|l| entry.allowed_languages.contains(l)),
            model: None,
            prompt: (self.prompt.clone()).filter(|_| entry.allow_prompt),
            keyterms: Vec::new(),
        }
    }

    /// The segmenter for these settings: `server_vad`'s threshold, padding and silence (raised
    /// to `min_silence_ms`), or with client commits no silence ending at all.
    pub fn segmenter(&self, cfg: &Config) -> SegmenterConfig {
        let mut seg = cfg.segmenter();
        let per_ms = u64::from(voxgate_session::SAMPLE_RATE) / 1000;
        match self.turn {
            Some(t) => {
                seg.threshold = t.threshold.clamp(0.0, 1.0);
                seg.pre_roll_samples = t.prefix_padding_ms.min(2_000) * per_ms;
                let silence = t.silence_duration_ms.max(cfg.realtime.min_silence_ms);
                seg.silence_samples = silence.min(60_000) * per_ms;
            }
            None => seg.silence_samples = seg.max_utterance_samples,
        }
        seg
    }

    /// The session object of `session.created` / `session.updated`.
    pub fn json(&self, id: &str) -> Value {
        let turn = self.turn.map(|t| {
            json!({
                "type": "server_vad",
                "threshold": t.threshold,
                "prefix_padding_ms": t.prefix_padding_ms,
                "silence_duration_ms": t.silence_duration_ms,
            })
        });
        json!({
            "type": "transcription",
            "id": id,
            "object": "realtime.transcription_session",
            "audio": {"input": {
                "format": self.format.json(),
                "transcription": {"model": self.model, "language": self.language, "prompt": self.prompt},
                "turn_detection": turn,
                "noise_reduction": null,
            }},
            "include": null,
        })
    }

    /// Applies a `session.update`'s `session`; `started`: the session runs, so the backend and
    /// its options can no longer change. Errors name the offending parameter.
    pub fn update(&mut self, cfg: &Config, session: Value, started: bool) -> Result<(), Invalid> {
        let asked: SessionIn = serde_json::from_value(session)
            .map_err(|e| Invalid::new("session", format!("invalid session: {e}")))?;
        if let Some(kind) = asked.kind.as_deref().filter(|k| *k != "transcription") {
            return Err(Invalid::new(
                "session.type",
                format!("session.type {kind:?}: voxgate serves transcription sessions only"),
            ));
        }
        let Some(input) = asked.audio.and_then(|a| a.input) else {
            return Ok(());
        };
        let mut next = self.clone();
        if let Some(f) = input.format {
            next.format = format(&f)?;
        }
        if let Some(t) = input.transcription {
            if let Some(model) = t.model {
                next.select(cfg, &model);
            }
            next.language = t.language.or(next.language);
            next.prompt = t.prompt.or(next.prompt);
        }
        if let Some(turn) = input.turn_detection {
            next.turn = turn.map(|t| Turn {
                threshold: t.threshold.unwrap_or(0.5),
                prefix_padding_ms: t.prefix_padding_ms.unwrap_or(300),
                silence_duration_ms: t.silence_duration_ms.unwrap_or(500),
            });
        }
        let fixed = (
            next.backend.as_ref(),
            next.language.as_ref(),
            next.prompt.as_ref(),
        );
        if started
            && fixed
                != (
                    self.backend.as_ref(),
                    self.language.as_ref(),
                    self.prompt.as_ref(),
                )
        {
            return Err(Invalid::new(
                "session.audio.input.transcription",
                "the transcription model, language and prompt are fixed once audio flows; \
                 set them in the first session.update",
            ));
        }
        *self = next;
        Ok(())
    }
}

/// A client event voxgate refuses: the `error` event's `param` and `message`.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub param: &'static str,
    pub message: String,
}

impl Invalid {
    pub fn new(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param,
            message: message.into(),
        }
    }
}

fn format(f: &FormatIn) -> Result<Format, Invalid> {
    match f.kind.as_str() {
        "audio/pcm" => match f.rate.unwrap_or(24_000) {
            rate @ 8_000..=48_000 => Ok(Format::Pcm(rate)),
            rate => Err(Invalid::new(
                "session.audio.input.format.rate",
                format!("rate {rate}: use 8000-48000 (OpenAI's is 24000)"),
            )),
        },
        "audio/pcmu" => Ok(Format::Pcmu),
        "audio/pcma" => Ok(Format::Pcma),
        other => Err(Invalid::new(
            "session.audio.input.format.type",
            format!("format {other:?}: use audio/pcm, audio/pcmu or audio/pcma"),
        )),
    }
}

#[derive(Deserialize)]
struct SessionIn {
    #[serde(rename = "type")]
    kind: Option<String>,
    audio: Option<AudioIn>,
}

#[derive(Deserialize)]
struct AudioIn {
    input: Option<InputIn>,
}

#[derive(Deserialize)]
struct InputIn {
    format: Option<FormatIn>,
    transcription: Option<TranscriptionIn>,
    /// Absent: unchanged; `null`: the client commits turns.
    #[serde(default, deserialize_with = "present")]
    turn_detection: Option<Option<TurnIn>>,
}

#[derive(Deserialize)]
struct FormatIn {
    #[serde(rename = "type")]
    kind: String,
    rate: Option<u32>,
}

#[derive(Deserialize)]
struct TranscriptionIn {
    model: Option<String>,
    language: Option<String>,
    prompt: Option<String>,
}

#[derive(Deserialize)]
struct TurnIn {
    threshold: Option<f32>,
    prefix_padding_ms: Option<u64>,
    silence_duration_ms: Option<u64>,
}

/// A field that is present (even `null`) becomes `Some`.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SttBackend, SttConfig};

    fn cfg() -> Config {
        let mut cfg = Config::default();
        let mut w = SttConfig::new("whisper", SttBackend::Openai, "http://127.0.0.1:1");
        w.aliases = vec!["gpt-4o-transcribe".into()];
        w.allowed_languages = vec!["en".into()];
        let mut other = SttConfig::new("other", SttBackend::Openai, "http://127.0.0.1:1");
        other.default = false;
        cfg.stt = vec![w, other];
        cfg
    }

    #[test]
    fn an_update_sets_format_model_and_turn_detection() {
        let cfg = cfg();
        let mut s = Settings::defaults(&cfg, None);
        assert_eq!(s.format, Format::Pcm(24_000));
        assert_eq!(s.backend.as_deref(), Some("whisper"));
        let update = json!({"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcmu"},
            "transcription": {"model": "other", "language": "en", "prompt": "names"},
            "turn_detection": null,
        }}});
        s.update(&cfg, update, false).unwrap();
        assert_eq!(s.format, Format::Pcmu);
        assert_eq!(s.backend.as_deref(), Some("other"));
        assert_eq!(s.turn, None, "null: the client commits");
        let seg = s.segmenter(&cfg);
        assert_eq!(seg.silence_samples, seg.max_utterance_samples);
        let vad = json!({"audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 50}}}});
        s.update(&cfg, vad, false).unwrap();
        assert_eq!(
            s.segmenter(&cfg).silence_samples,
            200 * 16,
            "raised to min_silence_ms"
        );
        assert_eq!(
            s.json("x")["audio"]["input"]["format"]["type"],
            "audio/pcmu"
        );
    }

    #[test]
    fn bad_updates_name_their_parameter_and_change_nothing() {
        let cfg = cfg();
        let mut s = Settings::defaults(&cfg, Some("gpt-4o-transcribe"));
        let before = s.clone();
        let bad = json!({"audio": {"input": {"format": {"type": "audio/flac"}}}});
        assert_eq!(
            s.update(&cfg, bad, false).unwrap_err().param,
            "session.audio.input.format.type"
        );
        let realtime = json!({"type": "realtime"});
        assert_eq!(
            s.update(&cfg, realtime, false).unwrap_err().param,
            "session.type"
        );
        let late = json!({"audio": {"input": {"transcription": {"model": "other"}}}});
        assert!(
            s.update(&cfg, late, true).is_err(),
            "the backend is fixed once started"
        );
        assert_eq!(s, before);
        assert!(s.update(&cfg, json!({"audio": 5}), false).is_err());
    }

    #[test]
    fn options_reach_the_backend_only_when_allowed() {
        let cfg = cfg();
        let mut s = Settings::defaults(&cfg, None);
        s.language = Some("en".into());
        s.prompt = Some("p".into());
        let o = s.stt_options(&cfg);
        assert_eq!(o.language.as_deref(), Some("en"));
        assert_eq!(o.prompt, None, "allow_prompt is off");
    }
}
