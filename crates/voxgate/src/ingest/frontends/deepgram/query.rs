//! A Deepgram client's connect query, read into what voxgate does with it: `model` selects a
//! backend (by name or alias), `language`/`keyterm`/`keywords` reach it when its config allows
//! them, `endpointing` sets the segmenter's silence (within bounds), and `interim_results`,
//! `vad_events`, `utterance_end_ms` shape the messages. Everything else is accepted and ignored.

use std::collections::HashMap;

use super::render::Options;
use crate::config::{Config, SttConfig, SttOptions, MAX_PROMPT_CHARS};
use crate::ingest::refusal::{Refusal, RefuseReason};
use crate::ingest::request::ConnectRequest;

/// What the query asks for, validated against the config.
#[derive(Debug, Clone, PartialEq)]
pub struct Asked {
    /// The backend whose transcripts the client gets (`None`: no backend serves the session).
    pub backend: Option<String>,
    /// `model=` as sent (echoed in `model_info.name`).
    pub model: String,
    pub options: SttOptions,
    pub silence_ms: Option<u64>,
    pub interim_results: bool,
    pub vad_events: bool,
    pub utterance_end: bool,
}

impl Asked {
    /// Reads the query; a malformed `endpointing` or `utterance_end_ms` is refused (400).
    pub fn parse(query: &HashMap<String, String>, cfg: &Config) -> Result<Self, Refusal> {
        let get = |k: &str| query.get(k).map(String::as_str);
        let flag = |k: &str| matches!(get(k), Some("true" | "1"));
        let model = get("model").unwrap_or("").to_owned();
        let backend = match get("stt") {
            // voxgate's own `stt=` (first name) wins for clients that know voxgate.
            Some(names) => names.split(',').next().filter(|n| !n.is_empty()),
            None => cfg.stt_for_model(&model).map(|s| s.name.as_str()),
        }
        .map(str::to_owned);
        let entry = backend
            .as_deref()
            .and_then(|b| cfg.stt.iter().find(|s| s.name == b));
        let utterance_end = match get("utterance_end_ms") {
            None => false,
            Some(v) => {
                v.parse::<u64>()
                    .map_err(|_| invalid("utterance_end_ms", v))?;
                true
            }
        };
        Ok(Self {
            options: entry.map(|e| options(query, e)).unwrap_or_default(),
            silence_ms: silence_ms(get("endpointing"), cfg)?,
            backend,
            model,
            interim_results: flag("interim_results"),
            vad_events: flag("vad_events"),
            utterance_end,
        })
    }

    /// Sets the request's typed fields (mirrored in the raw query for the `on_connect` hook)
    /// and returns the renderer's options.
    pub fn apply(self, req: &mut ConnectRequest, request_id: String, cfg: &Config) -> Options {
        req.stt = Some(self.backend.clone().unwrap_or_default());
        req.raw_query
            .insert("stt".into(), self.backend.clone().unwrap_or_default());
        req.stt_options = self.options;
        req.segmenter = self.silence_ms.map(|ms| {
            let mut seg = cfg.segmenter();
            seg.silence_samples = ms * u64::from(voxgate_session::SAMPLE_RATE) / 1000;
            seg
        });
        // Deepgram sessions do not resume (a Deepgram client would not know how).
        req.resumable = false;
        Options {
            request_id,
            model: self.model,
            backend: self.backend,
            vad_events: self.vad_events,
            utterance_end: self.utterance_end,
            interim_results: self.interim_results,
        }
    }
}

/// `endpointing`: ms of silence (raised to `deepgram.min_endpointing_ms`, at most the longest
/// utterance), or `false`: only `Finalize`, the utterance limit and the end cut utterances.
fn silence_ms(value: Option<&str>, cfg: &Config) -> Result<Option<u64>, Refusal> {
    let longest = (cfg.segmenter.max_utterance_seconds * 1000.0) as u64;
    match value {
        None => Ok(None),
        Some("false") => Ok(Some(longest)),
        Some("true") => Ok(None),
        Some(v) => {
            let ms: u64 = v.parse().map_err(|_| invalid("endpointing", v))?;
            Ok(Some(ms.clamp(cfg.deepgram.min_endpointing_ms, longest)))
        }
    }
}

/// The speech-to-text options the backend's config allows; the rest are dropped (a Deepgram
/// client always sends `language` and often key terms, and must not be refused for them).
fn options(query: &HashMap<String, String>, backend: &SttConfig) -> SttOptions {
    let language = query
        .get("language")
        .filter(|l| backend.allowed_languages.contains(l))
        .cloned();
    let mut keyterms = Vec::new();
    if backend.allow_prompt {
        let terms = (query.get("keyterm").into_iter())
            .chain(query.get("keywords"))
            .flat_map(|v| v.split(','))
            // `keywords=term:boost`: the boost means nothing to voxgate's backends.
            .map(|t| t.rsplit_once(':').map_or(t, |(term, _)| term).trim())
            .filter(|t| !t.is_empty());
        let mut chars = 0;
        for term in terms {
            chars += term.chars().count();
            if chars > MAX_PROMPT_CHARS {
                break;
            }
            keyterms.push(term.to_owned());
        }
    }
    SttOptions {
        language,
        model: None,
        prompt: None,
        keyterms,
    }
}

fn invalid(key: &str, value: &str) -> Refusal {
    let shown: String = value.chars().take(40).collect();
    Refusal::new(
        RefuseReason::InvalidParameters,
        format!("{key}={shown:?} is not valid"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SttBackend;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn cfg() -> Config {
        let mut cfg = Config::default();
        let mut a = SttConfig::new("whisper", SttBackend::Openai, "http://127.0.0.1:1");
        a.aliases = vec!["nova-3".into()];
        a.allowed_languages = vec!["en".into()];
        a.allow_prompt = true;
        let mut b = SttConfig::new("sphinx", SttBackend::Openai, "http://127.0.0.1:1");
        b.default = false;
        cfg.stt = vec![b, a];
        cfg
    }

    #[test]
    fn model_selects_a_backend_by_name_or_alias_else_the_default() {
        let cfg = cfg();
        let pick = |model: &str| Asked::parse(&q(&[("model", model)]), &cfg).unwrap().backend;
        assert_eq!(pick("sphinx").as_deref(), Some("sphinx"));
        assert_eq!(pick("nova-3").as_deref(), Some("whisper"));
        assert_eq!(
            pick("nova-2-general").as_deref(),
            Some("whisper"),
            "first default"
        );
        let none = Asked::parse(&q(&[("model", "x")]), &Config::default()).unwrap();
        assert_eq!(none.backend, None);
    }

    #[test]
    fn options_reach_the_backend_only_when_allowed() {
        let cfg = cfg();
        let query = q(&[
            ("model", "nova-3"),
            ("language", "en"),
            ("keywords", "voxgate:2,river"),
            ("keyterm", "bread"),
        ]);
        let a = Asked::parse(&query, &cfg).unwrap();
        assert_eq!(a.options.language.as_deref(), Some("en"));
        assert_eq!(a.options.keyterms, ["bread", "voxgate", "river"]);
        let fr = Asked::parse(
            &q(&[("model", "sphinx"), ("language", "fr"), ("keyterm", "x")]),
            &cfg,
        )
        .unwrap();
        assert_eq!(fr.options, SttOptions::default(), "sphinx allows neither");
    }

    #[test]
    fn endpointing_is_bounded_and_false_leaves_only_the_limit() {
        let cfg = cfg();
        let ms = |v: &str| Asked::parse(&q(&[("endpointing", v)]), &cfg).map(|a| a.silence_ms);
        assert_eq!(
            ms("10").unwrap(),
            Some(300),
            "raised to deepgram.min_endpointing_ms"
        );
        assert_eq!(ms("1200").unwrap(), Some(1200));
        assert_eq!(ms("false").unwrap(), Some(60_000));
        assert_eq!(ms("99999999").unwrap(), Some(60_000));
        let e = ms("soon").unwrap_err();
        assert_eq!(e.reason, RefuseReason::InvalidParameters);
        assert!(Asked::parse(&q(&[("utterance_end_ms", "x")]), &cfg).is_err());
        let a = Asked::parse(
            &q(&[
                ("utterance_end_ms", "1000"),
                ("vad_events", "true"),
                ("interim_results", "true"),
            ]),
            &cfg,
        )
        .unwrap();
        assert!(a.utterance_end && a.vad_events && a.interim_results);
    }
}
