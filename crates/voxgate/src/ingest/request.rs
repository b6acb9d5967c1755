//! What an upgrade request asks for, typed: `ConnectRequest`. Frontends set its fields from their
//! own wire protocol (Twilio's `start`, Omi's `sample_rate`); the ingest core reads only the typed
//! fields. The raw query is kept for the `on_connect` hook's body alone.

use std::collections::HashMap;
use std::net::SocketAddr;

use voxgate_media::SourceFormat;
use voxgate_session::SAMPLE_RATE;

/// The ingest endpoints (a closed set; `as_str` is the metric label and the hook's `endpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/listen`: voxgate's own protocol.
    Listen,
    /// `/v1/twilio`: Twilio Media Streams.
    Twilio,
    /// `/v1/trigger/listen`: Omi's pusher protocol.
    Omi,
    /// `/v1/listen` speaking Deepgram's live API (chosen per connection, see `deepgram`).
    Deepgram,
    /// `/v1/realtime`: OpenAI's Realtime API in transcription mode.
    Realtime,
    /// A phone carrier's or PBX's media stream (`/v1/<carrier>`, or the AudioSocket listener).
    Carrier(Carrier),
}

/// The phone carriers and PBXs voxgate takes call audio from besides Twilio (a closed set;
/// `as_str` is the metric label, the hook's `endpoint` and the path under `/v1/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// SignalWire `<Stream>`: Twilio-compatible JSON, mu-law 8 kHz.
    SignalWire,
    /// Telnyx media streaming: JSON, PCMU or PCMA 8 kHz, frames possibly out of order.
    Telnyx,
    /// Plivo audio streams: JSON, mu-law 8 kHz.
    Plivo,
    /// Exotel AgentStream/Voicebot: snake_case JSON, base64 PCM16 LE 8 kHz.
    Exotel,
    /// Vonage Voice API WebSocket: a JSON `websocket:connected`, then binary L16.
    Vonage,
    /// jambonz `listen`: subprotocol `audio.jambonz.org`, a JSON metadata message, binary L16.
    Jambonz,
    /// FreeSWITCH `mod_audio_fork`: subprotocol `audio.drachtio.org`, binary L16.
    AudioFork,
    /// Asterisk AudioSocket over TCP (its own listener).
    AudioSocket,
    /// Sinch Voice stream: a JSON `connect` request answered `answer`/`busy`/`reject`, then
    /// binary L16.
    Sinch,
    /// Asterisk's WebSocket channel driver (`chan_websocket`) dialing out: a `MEDIA_START`
    /// control event (plain text or JSON), then binary media in the channel's codec.
    Asterisk,
}

impl Carrier {
    /// Every carrier served on a WebSocket path (AudioSocket has its own TCP listener).
    pub const WEBSOCKET: [Carrier; 9] = [
        Self::SignalWire,
        Self::Telnyx,
        Self::Plivo,
        Self::Exotel,
        Self::Vonage,
        Self::Jambonz,
        Self::AudioFork,
        Self::Sinch,
        Self::Asterisk,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SignalWire => "signalwire",
            Self::Telnyx => "telnyx",
            Self::Plivo => "plivo",
            Self::Exotel => "exotel",
            Self::Vonage => "vonage",
            Self::Jambonz => "jambonz",
            Self::AudioFork => "audio_fork",
            Self::AudioSocket => "audiosocket",
            Self::Sinch => "sinch",
            Self::Asterisk => "asterisk",
        }
    }
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Listen => "listen",
            Self::Twilio => "twilio",
            Self::Omi => "omi",
            Self::Deepgram => "deepgram",
            Self::Realtime => "realtime",
            Self::Carrier(c) => c.as_str(),
        }
    }
}

/// One connection's request: who is asking and for what.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub endpoint: Endpoint,
    pub peer: SocketAddr,
    /// `Authorization: Bearer` or `?token=`.
    pub token: Option<String>,
    /// The query as the frontend saw it (mirrors what frontends set), for the `on_connect` body.
    pub raw_query: HashMap<String, String>,
    /// The audio format, or why the query's encoding is refused (reported after admission).
    pub source: Result<SourceFormat, String>,
    /// `session_id` as asked (validated by `identity`).
    pub session_id: Option<String>,
    /// `uid` as asked (a token's user wins).
    pub uid: Option<String>,
    /// `consumers=a,b`: audio webhooks by configured name.
    pub consumers: Option<Vec<String>>,
    /// `stt=a,b` (`stt=` for none).
    pub stt: Option<String>,
    /// `language=`, `model=`, `prompt=`, `keyterm=a,b`: speech-to-text options.
    pub stt_options: crate::config::SttOptions,
    /// `resumable=true`.
    pub resumable: bool,
    /// `fresh_recorder=true`: a continued session's client started a new recorder.
    pub fresh_recorder: bool,
    /// `resume_state=`: a drained session's signed state.
    pub resume_state: Option<String>,
    /// `resume=<id>&resume_token=&resume_from=`: reattach to a live resumable session.
    pub reattach: Option<ReattachRequest>,
    /// The session's segmenter, when its protocol tunes it (a Deepgram client's `endpointing`,
    /// an OpenAI client's `turn_detection`); `None`: `[segmenter]`.
    pub segmenter: Option<voxgate_session::SegmenterConfig>,
    /// The session's idle timeout, when its protocol has its own (`None`: the server's).
    pub idle_timeout: Option<std::time::Duration>,
}

/// `/v1/listen?resume=<session_id>&resume_token=<token>[&resume_from=<byte>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReattachRequest {
    pub session_id: String,
    pub token: String,
    /// The stream byte the client's first message starts at (`None`: where the server is).
    pub from: Option<u64>,
}

impl ConnectRequest {
    /// Reads the query of an upgrade request.
    pub fn parse(
        endpoint: Endpoint,
        peer: SocketAddr,
        token: Option<String>,
        query: HashMap<String, String>,
    ) -> Self {
        let get = |k: &str| query.get(k).cloned();
        let reattach = query.get("resume").map(|id| ReattachRequest {
            session_id: id.clone(),
            token: get("resume_token").unwrap_or_default(),
            from: query.get("resume_from").and_then(|v| v.parse().ok()),
        });
        Self {
            endpoint,
            peer,
            token,
            source: source_format(&query),
            session_id: get("session_id"),
            uid: get("uid"),
            consumers: query.get("consumers").map(|names| {
                names
                    .split(',')
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect()
            }),
            stt: get("stt"),
            stt_options: crate::config::SttOptions::from_query(&query),
            resumable: flag(&query, "resumable"),
            fresh_recorder: flag(&query, "fresh_recorder"),
            resume_state: get("resume_state"),
            reattach,
            segmenter: None,
            idle_timeout: None,
            raw_query: query,
        }
    }

    /// A request from `pairs` of query parameters, from a loopback peer without a token.
    #[cfg(test)]
    pub fn from_pairs(endpoint: Endpoint, pairs: &[(&str, &str)]) -> Self {
        let query = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::parse(
            endpoint,
            "127.0.0.1:9".parse().expect("an address"),
            None,
            query,
        )
    }

    /// Sets the source format a frontend's protocol fixes, mirrored in the raw query.
    pub fn set_source(&mut self, encoding: &str, sample_rate: u32) {
        for (k, v) in [
            ("encoding", encoding.to_owned()),
            ("sample_rate", sample_rate.to_string()),
            ("channels", "1".to_owned()),
        ] {
            self.raw_query.insert(k.into(), v);
        }
        self.source = source_format(&self.raw_query);
    }
}

/// `true`/`1` (anything else, or absent, is false).
fn flag(query: &HashMap<String, String>, key: &str) -> bool {
    matches!(query.get(key).map(String::as_str), Some("true" | "1"))
}

/// Maps the connect query to a source format. Containers are autodetected.
pub fn source_format(query: &HashMap<String, String>) -> Result<SourceFormat, String> {
    let num = |key: &str, default: u32| -> Result<u32, String> {
        match query.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse::<u32>()
                .map_err(|_| format!("{key}={v:?} is not a number")),
        }
    };
    let encoding = query.get("encoding").map(|s| s.to_ascii_lowercase());
    let channels = || -> Result<u8, String> {
        let c = num("channels", 1)?;
        u8::try_from(c).map_err(|_| format!("channels={c} is out of range"))
    };
    match encoding.as_deref() {
        None | Some("" | "auto" | "webm" | "ogg" | "opus_container") => Ok(SourceFormat::Auto),
        Some(name) => match RAW_ENCODINGS.iter().find(|e| e.names.contains(&name)) {
            Some(e) => Ok((e.make)(num("sample_rate", e.default_rate)?, channels()?)),
            None => Err(format!(
                "unsupported encoding {name:?}; use opus, linear16, float32, linear8, mulaw, alaw, or omit it for WebM/Ogg"
            )),
        },
    }
}

/// One raw encoding: the names a client may use, its default sample rate, and the format.
struct RawEncoding {
    names: &'static [&'static str],
    default_rate: u32,
    make: fn(u32, u8) -> SourceFormat,
}

#[rustfmt::skip]
const RAW_ENCODINGS: &[RawEncoding] = &[
    RawEncoding { names: &["opus"], default_rate: 48_000,
        make: |sample_rate, channels| SourceFormat::Opus { sample_rate, channels } },
    RawEncoding { names: &["linear16", "pcm_s16le", "pcm16"], default_rate: SAMPLE_RATE,
        make: |sample_rate, channels| SourceFormat::Linear16 { sample_rate, channels } },
    RawEncoding { names: &["float32", "linear32", "pcm_f32le"], default_rate: SAMPLE_RATE,
        make: |sample_rate, channels| SourceFormat::Float32 { sample_rate, channels } },
    RawEncoding { names: &["linear8", "pcm8", "pcm_u8"], default_rate: 8_000,
        make: |sample_rate, channels| SourceFormat::Linear8 { sample_rate, channels } },
    RawEncoding { names: &["mulaw", "ulaw", "pcm_mulaw"], default_rate: 8_000,
        make: |sample_rate, channels| SourceFormat::Mulaw { sample_rate, channels } },
    RawEncoding { names: &["alaw", "pcm_alaw"], default_rate: 8_000,
        make: |sample_rate, channels| SourceFormat::Alaw { sample_rate, channels } },
];

/// A session id a client may choose: 1-128 characters of `A-Z a-z 0-9 - _ . :`.
pub fn valid_session_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    #[test]
    fn encodings_map_to_formats_with_their_default_rates() {
        assert!(matches!(source_format(&q(&[])), Ok(SourceFormat::Auto)));
        assert!(matches!(
            source_format(&q(&[("encoding", "WEBM")])),
            Ok(SourceFormat::Auto)
        ));
        assert!(matches!(
            source_format(&q(&[("encoding", "opus")])),
            Ok(SourceFormat::Opus {
                sample_rate: 48_000,
                channels: 1
            })
        ));
        assert!(matches!(
            source_format(&q(&[("encoding", "pcm16"), ("channels", "2")])),
            Ok(SourceFormat::Linear16 {
                sample_rate: 16_000,
                channels: 2
            })
        ));
        assert!(matches!(
            source_format(&q(&[("encoding", "ulaw"), ("sample_rate", "16000")])),
            Ok(SourceFormat::Mulaw {
                sample_rate: 16_000,
                channels: 1
            })
        ));
        assert!(matches!(
            source_format(&q(&[("encoding", "pcm_alaw")])),
            Ok(SourceFormat::Alaw {
                sample_rate: 8_000,
                ..
            })
        ));
        let err = source_format(&q(&[("encoding", "mp3")])).unwrap_err();
        assert!(err.contains("unsupported encoding \"mp3\""), "{err}");
        let err = source_format(&q(&[("encoding", "linear16"), ("channels", "300")])).unwrap_err();
        assert!(err.contains("channels=300"), "{err}");
        let err =
            source_format(&q(&[("encoding", "linear16"), ("sample_rate", "fast")])).unwrap_err();
        assert!(err.contains("sample_rate"), "{err}");
    }

    #[test]
    fn the_query_becomes_typed_fields() {
        let r = ConnectRequest::parse(
            Endpoint::Listen,
            peer(),
            None,
            q(&[
                ("consumers", "a,,b"),
                ("stt", ""),
                ("resumable", "1"),
                ("fresh_recorder", "yes"),
                ("session_id", "s-1"),
                ("uid", "alice"),
            ]),
        );
        assert_eq!(r.consumers, Some(vec!["a".to_owned(), "b".to_owned()]));
        assert_eq!(r.stt.as_deref(), Some(""));
        assert!(r.resumable);
        assert!(!r.fresh_recorder, "only true and 1 are flags");
        assert_eq!(r.session_id.as_deref(), Some("s-1"));
        assert_eq!(r.uid.as_deref(), Some("alice"));
        assert!(r.reattach.is_none());
        assert!(matches!(r.source, Ok(SourceFormat::Auto)));

        let r = ConnectRequest::parse(
            Endpoint::Listen,
            peer(),
            None,
            q(&[
                ("resume", "s-1"),
                ("resume_token", "t"),
                ("resume_from", "12"),
            ]),
        );
        assert_eq!(
            r.reattach,
            Some(ReattachRequest {
                session_id: "s-1".into(),
                token: "t".into(),
                from: Some(12)
            })
        );
    }

    #[test]
    fn a_frontend_fixed_source_is_mirrored_in_the_raw_query() {
        let mut r = ConnectRequest::parse(Endpoint::Omi, peer(), None, q(&[("uid", "u")]));
        r.set_source("linear16", 8000);
        assert!(matches!(
            r.source,
            Ok(SourceFormat::Linear16 {
                sample_rate: 8000,
                channels: 1
            })
        ));
        assert_eq!(r.raw_query["encoding"], "linear16");
        assert_eq!(r.raw_query["sample_rate"], "8000");
        assert_eq!(r.raw_query["channels"], "1");
    }

    #[test]
    fn session_ids_are_bounded_and_plain() {
        assert!(valid_session_id("a-b_c.d:1"));
        assert!(!valid_session_id(""));
        assert!(!valid_session_id(&"x".repeat(129)));
        assert!(!valid_session_id("a/b"));
    }
}
