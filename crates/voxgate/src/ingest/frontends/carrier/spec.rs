//! The Twilio-family carriers as data: each sends JSON text events (`start`, `media` with a
//! base64 payload, `dtmf`, `mark`, `stop`) and differs from the others only in field names,
//! encodings and how it reports an error. One row per carrier; `json.rs` reads them.
//!
//! Sources of the field names (checked against each provider's docs and Pipecat's serializers):
//! - SignalWire: developer.signalwire.com/compatibility-api/cxml/voice/stream (Twilio's shape).
//! - Telnyx: developers.telnyx.com/api-reference/websockets/stream-call-media-over-websocket
//!   (`stream_id`, `sequence_number`, `media.chunk`, `start.media_format.encoding` PCMU/PCMA;
//!   frame order is not guaranteed; errors as `{"event":"error","payload":{code,title,detail}}`).
//! - Plivo: plivo.com/docs/voice/xml/the-stream-element and Pipecat `serializers/plivo.py`
//!   (`streamId`, `callId`, `mediaFormat{encoding:"audio/x-mulaw",sampleRate:8000}`).
//! - Exotel: developer.exotel.com/docs/agentstream/websocket-protocol and Pipecat
//!   `serializers/exotel.py` (snake_case: `stream_sid`, `call_sid`, `custom_parameters`,
//!   `media_format{encoding:"base64",sample_rate:"8000",bit_rate:"16"}`, PCM16 LE).

use crate::ingest::request::Carrier;

/// How a carrier's client is told about a problem with its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorStyle {
    /// voxgate's own `Warning`/`Error` events (the carrier documents no error message).
    Voxgate,
    /// Telnyx's `{"event":"error","payload":{"code","title","detail"}}`.
    Telnyx,
}

/// One Twilio-family carrier's field names and formats.
#[derive(Debug)]
pub struct JsonSpec {
    pub carrier: Carrier,
    /// Where the stream id is: the key in the `start` object, then at the top level.
    pub stream_id: &'static str,
    /// The call id's key in the `start` object.
    pub call_id: &'static str,
    /// The key of the custom-parameters object in `start` (string values only).
    pub custom: &'static str,
    /// The media-format object's key in `start`, and its sample-rate key.
    pub media_format: &'static str,
    pub sample_rate: &'static str,
    /// The encoding when `start` names none.
    pub default_encoding: &'static str,
    pub errors: ErrorStyle,
}

impl JsonSpec {
    /// voxgate's encoding name for the carrier's `encoding` value, `None` when not taken.
    pub fn encoding(&self, name: &str) -> Option<&'static str> {
        match (self.carrier, name.to_ascii_lowercase().as_str()) {
            (Carrier::Exotel, "base64" | "audio/x-raw" | "pcm" | "pcm16") => Some("linear16"),
            (Carrier::Exotel, _) => None,
            (_, "audio/x-mulaw" | "pcmu" | "mulaw" | "ulaw") => Some("mulaw"),
            (Carrier::Telnyx, "pcma" | "audio/x-alaw") => Some("alaw"),
            _ => None,
        }
    }
}

/// The Twilio-family carriers served by `json.rs`.
pub static JSON_CARRIERS: [JsonSpec; 4] = [
    JsonSpec {
        carrier: Carrier::SignalWire,
        stream_id: "streamSid",
        call_id: "callSid",
        custom: "customParameters",
        media_format: "mediaFormat",
        sample_rate: "sampleRate",
        default_encoding: "audio/x-mulaw",
        errors: ErrorStyle::Voxgate,
    },
    JsonSpec {
        carrier: Carrier::Telnyx,
        stream_id: "stream_id",
        call_id: "call_control_id",
        custom: "custom_parameters",
        media_format: "media_format",
        sample_rate: "sample_rate",
        default_encoding: "PCMU",
        errors: ErrorStyle::Telnyx,
    },
    JsonSpec {
        carrier: Carrier::Plivo,
        stream_id: "streamId",
        call_id: "callId",
        custom: "extraHeaders",
        media_format: "mediaFormat",
        sample_rate: "sampleRate",
        default_encoding: "audio/x-mulaw",
        errors: ErrorStyle::Voxgate,
    },
    JsonSpec {
        carrier: Carrier::Exotel,
        stream_id: "stream_sid",
        call_id: "call_sid",
        custom: "custom_parameters",
        media_format: "media_format",
        sample_rate: "sample_rate",
        default_encoding: "base64",
        errors: ErrorStyle::Voxgate,
    },
];

/// The row of a Twilio-family carrier (`None` for the others).
pub fn json_spec(carrier: Carrier) -> Option<&'static JsonSpec> {
    JSON_CARRIERS.iter().find(|s| s.carrier == carrier)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_are_per_carrier() {
        let telnyx = json_spec(Carrier::Telnyx).unwrap();
        assert_eq!(telnyx.encoding("PCMA"), Some("alaw"));
        assert_eq!(telnyx.encoding("PCMU"), Some("mulaw"));
        assert_eq!(telnyx.encoding("G722"), None);
        let exotel = json_spec(Carrier::Exotel).unwrap();
        assert_eq!(exotel.encoding("base64"), Some("linear16"));
        assert_eq!(exotel.encoding("audio/x-mulaw"), None);
        assert_eq!(json_spec(Carrier::Plivo).unwrap().encoding("PCMA"), None);
        assert!(json_spec(Carrier::Vonage).is_none());
    }
}
