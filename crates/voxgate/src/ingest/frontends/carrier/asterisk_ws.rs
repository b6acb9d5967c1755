//! Asterisk's WebSocket channel driver (`chan_websocket`, Asterisk 20.16 / 21.11 / 22.6 / 23.0
//! and later) dialing out to voxgate: `Dial(WebSocket/<client>/c(slin16))` with a
//! `websocket_client.conf` client whose `uri` is `wss://HOST/v1/asterisk`. Binary frames carry
//! the media in the channel's codec; text frames carry control events, either plain text
//! (`MEDIA_START connection_id:<id> channel:<name> format:<codec> optimal_frame_size:<n>
//! ptime:<ms>`, the default) or JSON (`control_message_format = json`, since 20.18 / 22.8 /
//! 23.2: `{"event":"MEDIA_START","connection_id","channel","channel_id","format",
//! "optimal_frame_size","ptime","channel_variables":{..}}`). Later events (`DTMF_END`,
//! `MEDIA_XOFF`, `STATUS`, ...) go to subscribers; the call ends when Asterisk closes.
//!
//! Sources: docs.asterisk.org Configuration/Channel-Drivers/WebSocket; asterisk
//! `channels/chan_websocket_doc.xml` and the commit "chan_websocket: Add capability for JSON
//! control messages and events" (the JSON `MEDIA_START` shape).

use serde_json::{Map, Value};

use super::call::{self, CallStart};
use crate::ingest::refusal::{Refusal, RefuseReason};
use crate::ingest::request::Carrier;

/// A control message as JSON: JSON as sent, or a plain-text `EVENT key:value ...` line as
/// `{"event":"EVENT","key":"value",...}`. `Err` for text that is neither.
pub fn control(text: &str) -> Result<Value, String> {
    if text.trim_start().starts_with('{') {
        return serde_json::from_str(text).map_err(|e| format!("not JSON: {e}; ignored"));
    }
    let mut words = text.split_whitespace();
    let event = words.next().unwrap_or_default();
    let named = !event.is_empty()
        && event
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if !named {
        let shown: String = text.chars().take(40).collect();
        return Err(format!(
            "{shown:?} is not an Asterisk control event; ignored"
        ));
    }
    let mut obj = Map::new();
    obj.insert("event".into(), event.into());
    for word in words {
        if let Some((k, v)) = word.split_once(':') {
            obj.insert(k.to_owned(), v.into());
        }
    }
    Ok(Value::Object(obj))
}

/// voxgate's encoding and rate for an Asterisk format name (`slin` is host order: little
/// endian on the platforms Asterisk ships for); `None` for a codec voxgate does not decode.
fn codec(format: &str) -> Option<(&'static str, u32)> {
    let rate = match format {
        "ulaw" => return Some(("mulaw", 8000)),
        "alaw" => return Some(("alaw", 8000)),
        "slin" => 8000,
        "slin12" => 12_000,
        "slin16" => 16_000,
        "slin24" => 24_000,
        "slin32" => 32_000,
        "slin44" => 44_100,
        "slin48" => 48_000,
        _ => return None,
    };
    Some(("linear16", rate))
}

/// The call a `MEDIA_START` describes; `Ok(None)` for another message, `Ok(Some(Err))` for a
/// codec voxgate cannot take.
pub fn describe(v: Value) -> Result<Option<Result<CallStart, Refusal>>, String> {
    if v["event"] != "MEDIA_START" {
        return Ok(None);
    }
    let format = v["format"].as_str().unwrap_or_default();
    let Some((encoding, rate)) = codec(format) else {
        let why = format!(
            "asterisk format {format:?} is not taken (ulaw, alaw, slin, slin12-slin48; passthrough codecs are not decoded)"
        );
        return Ok(Some(Err(Refusal::new(
            RefuseReason::UnsupportedFormat,
            why,
        ))));
    };
    let text = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let call_id = match text("channel_id") {
        id if id.is_empty() => text("channel"),
        id => id,
    };
    Ok(Some(Ok(CallStart {
        carrier: Carrier::Asterisk,
        stream_id: text("connection_id"),
        call_id,
        // Channel variables (JSON format only) may choose the session like custom parameters.
        custom: call::string_map(&v["channel_variables"]),
        encoding,
        sample_rate: rate,
        channels: 1,
        detail: v,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_control_formats_describe_the_call() {
        let plain = "MEDIA_START connection_id:c1 channel:WebSocket/c1/0x1 format:slin16 optimal_frame_size:640 ptime:20";
        let call = describe(control(plain).unwrap()).unwrap().unwrap().unwrap();
        assert_eq!((call.encoding, call.sample_rate), ("linear16", 16_000));
        assert_eq!(
            (call.stream_id.as_str(), call.call_id.as_str()),
            ("c1", "WebSocket/c1/0x1")
        );
        let json = r#"{"event":"MEDIA_START","connection_id":"c2","channel":"WebSocket/c2/0x2","channel_id":"1761245643.1","format":"ulaw","optimal_frame_size":160,"ptime":20,"channel_variables":{"consumers":"app1"}}"#;
        let call = describe(control(json).unwrap()).unwrap().unwrap().unwrap();
        assert_eq!((call.encoding, call.sample_rate), ("mulaw", 8000));
        assert_eq!(call.call_id, "1761245643.1");
        assert_eq!(call.custom["consumers"], "app1");
        let opus = control("MEDIA_START connection_id:c3 format:opus").unwrap();
        assert!(describe(opus).unwrap().unwrap().is_err());
        assert!(describe(control("MEDIA_XOFF").unwrap()).unwrap().is_none());
        assert!(control("{oops").is_err());
        assert!(control("hello there").is_err());
        assert_eq!(control("DTMF_END digit:5").unwrap()["digit"], "5");
    }
}
