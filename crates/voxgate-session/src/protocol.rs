//! The client protocol: control messages in, JSON events out (Deepgram's names where they exist).

use serde::{Deserialize, Serialize};

/// A text control message from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(tag = "type")]
pub enum ClientControl {
    KeepAlive,
    Finalize,
    CloseStream,
}

impl ClientControl {
    /// Parses a control message; the error text says what was wrong, for the client.
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| {
            let shown: String = text.chars().take(64).collect();
            // serde's text quotes the client's input: escaped, so it cannot forge a log line.
            let why = e.to_string();
            format!("unknown or malformed control message {shown:?}: {why:?}; expected {{\"type\":\"KeepAlive\"|\"Finalize\"|\"CloseStream\"}}")
        })
    }
}

/// Why an utterance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UtteranceReason {
    /// The VAD heard enough silence.
    Silence,
    /// `max_utterance_seconds` was reached; the next utterance starts at the same sample.
    Limit,
    /// The client sent `Finalize`.
    Finalize,
    /// The stream closed (client, idle timeout or shutdown).
    Close,
}

/// Which party of a two-party call an utterance or transcript is from: a stereo carrier stream
/// (jambonz `mixType=stereo`, an audio fork with two channels) carries the caller on its first
/// channel and the called party (the agent) on its second. Events of a mono session carry none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Party {
    Caller,
    Agent,
}

impl Party {
    /// The parties in channel order (channel 0 is the caller).
    pub const ALL: [Party; 2] = [Party::Caller, Party::Agent];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Caller => "caller",
            Self::Agent => "agent",
        }
    }

    /// `caller`/`agent`, as a query or config names them.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

/// Per-consumer delivery counts, as reported in `Closed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsumerSummary {
    pub name: String,
    pub kind: String,
    pub delivered_bytes: u64,
    pub dropped_bytes: u64,
    pub requests: u64,
    /// Sequence number the next request would carry (webhooks), so that a session continued on
    /// another instance keeps numbering.
    #[serde(default)]
    pub next_seq: u64,
}

/// The summary sent in `Closed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloseSummary {
    pub bytes_in: u64,
    pub messages_in: u64,
    pub seconds_decoded: f64,
    pub samples_decoded: u64,
    pub utterances: u64,
    pub decode_errors: u64,
    pub resyncs: u64,
    /// 16 kHz samples synthesized for gaps (device sequence numbers, timestamps).
    #[serde(default)]
    pub gap_samples: u64,
    /// Samples of gaps not filled (over the per-message cap or the session's fill budget).
    #[serde(default)]
    pub gap_dropped_samples: u64,
    pub consumers: Vec<ConsumerSummary>,
}

/// A server event, sent to the client as one JSON text message (and to subscribers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ServerEvent {
    /// The session is live and its format known.
    Started {
        session_id: String,
        format: String,
        channels: u8,
        sample_rate: u32,
    },
    /// Media time advanced (sent about once per second of decoded audio).
    Progress {
        seconds_decoded: f64,
        speaking: bool,
    },
    SpeechStarted {
        utterance: u64,
        timestamp: f64,
        /// The party who spoke, in a two-party session; absent otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        party: Option<Party>,
    },
    UtteranceEnd {
        utterance: u64,
        start: f64,
        end: f64,
        reason: UtteranceReason,
        /// The party who spoke, in a two-party session; absent otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        party: Option<Party>,
    },
    /// A transcript from a speech-to-text consumer. `start`/`end` are media seconds: the
    /// utterance's bounds for per-utterance backends, the recognized segment's for streaming ones.
    Transcript {
        utterance: u64,
        text: String,
        is_final: bool,
        backend: String,
        #[serde(default)]
        start: f64,
        #[serde(default)]
        end: f64,
        /// The party who spoke, in a two-party session; absent otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        party: Option<Party>,
    },
    /// Audio stored durably on the delivery bus (every audio webhook's messages acknowledged by
    /// JetStream) up to `samples`; sent at most once a second and at close.
    Persisted {
        samples: u64,
    },
    /// Audio accepted so far (sent after every audio message when the session is resumable).
    Ack {
        bytes: u64,
        samples: u64,
    },
    /// The session can be resumed within `grace_seconds` of a disconnect with
    /// `?resume=<session_id>&resume_token=<token>`.
    Resumable {
        session_id: String,
        resume_token: String,
        grace_seconds: f64,
    },
    /// A reconnecting client took the session over; continue sending from byte `bytes` of the
    /// stream (or start a new recorder: a new container header restarts decoding).
    Resumed {
        session_id: String,
        bytes: u64,
        samples: u64,
    },
    /// The server is draining: reconnect (to another instance) to continue.
    Reconnect {
        reason: String,
    },
    /// A conversation event relayed from an upstream service (Omi's pusher protocol):
    /// `conversation_id`, `transcript`, `finalize`, `speaker_sample`, `finalize_result`.
    Conversation {
        event: String,
        conversation_id: Option<String>,
        data: serde_json::Value,
    },
    /// A telephony stream event (Twilio `start`, `dtmf`, `mark`, `stop`), for subscribers.
    Telephony {
        event: String,
        detail: serde_json::Value,
    },
    Warning {
        code: String,
        message: String,
    },
    Error {
        code: String,
        message: String,
    },
    Closed {
        session_id: String,
        code: u16,
        reason: String,
        summary: CloseSummary,
        /// On a drain, a signed state to continue the session on another instance
        /// (`/v1/listen?resume_state=...`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_state: Option<String>,
    },
}

impl ServerEvent {
    pub fn warning(code: &str, message: impl Into<String>) -> Self {
        Self::Warning {
            code: code.to_owned(),
            message: message.into(),
        }
    }
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        Self::Error {
            code: code.to_owned(),
            message: message.into(),
        }
    }
    /// For an utterance boundary (`SpeechStarted`, `UtteranceEnd`): whose utterance it is
    /// (`Some(None)` for the mix); `None` for every other event.
    pub fn boundary_party(&self) -> Option<Option<Party>> {
        match self {
            Self::SpeechStarted { party, .. } | Self::UtteranceEnd { party, .. } => Some(*party),
            _ => None,
        }
    }

    /// The JSON text sent on the wire.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("events serialize: only strings and numbers")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_control_messages() {
        assert_eq!(
            ClientControl::parse(r#"{"type":"KeepAlive"}"#),
            Ok(ClientControl::KeepAlive)
        );
        assert_eq!(
            ClientControl::parse(r#"{"type":"Finalize","extra":1}"#),
            Ok(ClientControl::Finalize)
        );
        let err = ClientControl::parse(r#"{"type":"Dance"}"#).unwrap_err();
        assert!(err.contains("Dance"), "{err}");
        assert!(ClientControl::parse("not json").is_err());
    }

    #[test]
    fn events_are_tagged_json() {
        let e = ServerEvent::UtteranceEnd {
            utterance: 2,
            start: 1.5,
            end: 3.0,
            reason: UtteranceReason::Limit,
            party: None,
        };
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["type"], "UtteranceEnd");
        assert_eq!(v["reason"], "limit");
        assert_eq!(v["end"], 3.0);
        assert!(
            v.get("party").is_none(),
            "a mono session's events carry no party"
        );
        let e = ServerEvent::SpeechStarted {
            utterance: 0,
            timestamp: 0.5,
            party: Some(Party::Agent),
        };
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["party"], "agent");
        assert_eq!(e.boundary_party(), Some(Some(Party::Agent)));
    }
}
