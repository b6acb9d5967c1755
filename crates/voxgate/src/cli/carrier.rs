//! Carrier simulators: a WAV becomes the messages a phone carrier or PBX would send for a call
//! in its own framing (used by `voxgate stream --carrier NAME` and by the end-to-end tests).
//! The framings follow the providers' docs cited in `ingest::frontends::carrier::spec`.

use base64::Engine;
use serde_json::json;

use crate::ingest::request::Carrier;

/// One message of a simulated call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Text(String),
    Binary(Vec<u8>),
    /// The carrier hangs up by closing the socket (Vonage, jambonz, audio fork).
    Close,
}

/// A message and when to send it (ms after the first).
#[derive(Debug, Clone)]
pub struct Timed {
    pub at_ms: f64,
    pub frame: Frame,
}

/// A simulated call: its messages, and how many of them are the call's media.
#[derive(Debug, Clone)]
pub struct Call {
    pub frames: Vec<Timed>,
    /// The indexes of the media frames in `frames` (tests drop or swap some).
    pub media: Vec<usize>,
}

/// The carrier whose path or name is `name` (`telnyx`, `audio_fork`, ...).
pub fn carrier_named(name: &str) -> anyhow::Result<Carrier> {
    Carrier::WEBSOCKET
        .into_iter()
        .chain([Carrier::AudioSocket])
        .find(|c| c.as_str() == name)
        .ok_or_else(|| {
            let names: Vec<_> = Carrier::WEBSOCKET.iter().map(|c| c.as_str()).collect();
            anyhow::anyhow!(
                "unknown carrier {name:?}; one of {}, audiosocket",
                names.join(", ")
            )
        })
}

/// G.711 A-law encoding of one sample (segment search over the 13-bit magnitude).
pub fn alaw_encode(sample: i16) -> u8 {
    let (mask, magnitude) = if sample >= 0 {
        (0xD5u8, i32::from(sample) >> 3)
    } else {
        (0x55u8, -(i32::from(sample) >> 3) - 1)
    };
    // The segment is the number of bits above the 5 lowest, 0..=7.
    let segment = (32 - (magnitude | 0x1F).leading_zeros() as i32 - 5).clamp(0, 7);
    let shift = if segment < 2 { 1 } else { segment };
    let value = ((segment << 4) | ((magnitude >> shift) & 0x0F)) as u8;
    value ^ mask
}

/// Mono samples at 8 kHz (16 kHz input is halved after a 2-tap average).
pub fn to_8k(rate: u32, samples: &[i16]) -> anyhow::Result<Vec<i16>> {
    match rate {
        8_000 => Ok(samples.to_vec()),
        16_000 => Ok(samples
            .chunks(2)
            .map(|p| (p.iter().map(|s| i32::from(*s)).sum::<i32>() / p.len() as i32) as i16)
            .collect()),
        other => anyhow::bail!("the carrier simulators take 8 or 16 kHz WAV, not {other} Hz"),
    }
}

fn le_bytes(samples: &[i16]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// A simulated call of `samples` (at `rate`) in `carrier`'s framing. `params` are the call's
/// custom parameters (`consumers=...`); `encoding=PCMA` picks A-law on Telnyx.
pub fn call(
    carrier: Carrier,
    rate: u32,
    samples: &[i16],
    params: &[(String, String)],
) -> anyhow::Result<Call> {
    let pcm8 = to_8k(rate, samples)?;
    let id = format!("{}-{}", carrier.as_str(), uuid::Uuid::new_v4().simple());
    match carrier {
        Carrier::SignalWire | Carrier::Telnyx | Carrier::Plivo | Carrier::Exotel => {
            Ok(json_call(carrier, &pcm8, &id, params))
        }
        Carrier::Vonage
        | Carrier::Jambonz
        | Carrier::AudioFork
        | Carrier::Sinch
        | Carrier::Asterisk => Ok(l16_call(carrier, rate, samples, 1, &id, params)),
        other => anyhow::bail!("no simulator for {} yet", other.as_str()),
    }
}

/// A two-party call in a stereo carrier's framing: `caller` on the first channel, `agent` on
/// the second (the shorter padded with silence), as jambonz `listen` with `mixType: stereo`
/// and FreeSWITCH `uuid_audio_fork ... stereo` send it (an audio fork's URL must then say
/// `channels=2`).
pub fn stereo_call(
    carrier: Carrier,
    rate: u32,
    caller: &[i16],
    agent: &[i16],
    params: &[(String, String)],
) -> anyhow::Result<Call> {
    if !matches!(carrier, Carrier::Jambonz | Carrier::AudioFork) {
        anyhow::bail!("{} sends one mixed channel", carrier.as_str());
    }
    let at = |s: &[i16], i: usize| s.get(i).copied().unwrap_or(0);
    let interleaved: Vec<i16> = (0..caller.len().max(agent.len()))
        .flat_map(|i| [at(caller, i), at(agent, i)])
        .collect();
    let id = format!("{}-{}", carrier.as_str(), uuid::Uuid::new_v4().simple());
    Ok(l16_call(carrier, rate, &interleaved, 2, &id, params))
}

/// The JSON-then-binary framing: the carrier's description (none for an audio fork, whose
/// format is in its URL), 20 ms binary L16 frames at the WAV's rate (`samples` interleaved
/// when `channels` is 2), then the close.
fn l16_call(
    carrier: Carrier,
    rate: u32,
    samples: &[i16],
    channels: usize,
    id: &str,
    params: &[(String, String)],
) -> Call {
    let mut meta: serde_json::Map<String, serde_json::Value> = params
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    let description = match carrier {
        Carrier::Vonage => {
            meta.insert("event".into(), "websocket:connected".into());
            meta.insert(
                "content-type".into(),
                format!("audio/l16;rate={rate}").into(),
            );
            meta.insert("uuid".into(), id.into());
            Some(meta)
        }
        Carrier::Jambonz => {
            for (k, v) in [
                ("callSid", json!(id)),
                ("from", json!("+15550100")),
                ("to", json!("+15550199")),
                ("sampleRate", json!(rate)),
                (
                    "mixType",
                    json!(if channels == 2 { "stereo" } else { "mono" }),
                ),
            ] {
                meta.insert(k.into(), v);
            }
            Some(meta)
        }
        Carrier::Sinch => {
            let headers = serde_json::Value::Object(std::mem::take(&mut meta));
            for (k, v) in [
                ("command", json!("connect")),
                ("version", json!(1)),
                ("callId", json!(id)),
                ("applicationKey", json!("voxgate-simulator")),
                ("codec", json!("PCM")),
                ("sampleRate", json!(rate)),
                ("callHeaders", headers),
            ] {
                meta.insert(k.into(), v);
            }
            Some(meta)
        }
        _ => None,
    };
    let mut frames: Vec<Timed> = description
        .map(|d| text(0.0, serde_json::Value::Object(d)))
        .into_iter()
        .collect();
    if carrier == Carrier::Asterisk {
        // chan_websocket's default plain-text control format; its session is chosen in the URL.
        let format = if rate == 8000 {
            "slin".to_owned()
        } else {
            format!("slin{}", rate / 1000)
        };
        let start = format!(
            "MEDIA_START connection_id:{id} channel:WebSocket/{id}/0x1 format:{format} optimal_frame_size:{} ptime:20",
            rate / 50 * 2
        );
        frames.push(Timed {
            at_ms: 0.0,
            frame: Frame::Text(start),
        });
    }
    let mut media = Vec::new();
    let per_frame = (rate / 50) as usize * channels;
    for (i, chunk) in samples.chunks(per_frame).enumerate() {
        media.push(frames.len());
        frames.push(Timed {
            at_ms: (i * 20) as f64,
            frame: Frame::Binary(le_bytes(chunk)),
        });
    }
    let end = (samples.len() / channels) as f64 * 1000.0 / f64::from(rate);
    frames.push(Timed {
        at_ms: end,
        frame: Frame::Close,
    });
    Call { frames, media }
}

/// The Twilio-family framing: `connected`, `start`, `media` (base64) every 20 ms (100 ms for
/// Exotel), `stop`.
fn json_call(carrier: Carrier, pcm8: &[i16], id: &str, params: &[(String, String)]) -> Call {
    let b64 = base64::engine::general_purpose::STANDARD;
    let custom: serde_json::Map<String, serde_json::Value> = params
        .iter()
        .filter(|(k, _)| k != "encoding")
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    let alaw = params.iter().any(|(k, v)| k == "encoding" && v == "PCMA");
    let (start, frame_ms) = match carrier {
        Carrier::Telnyx => (
            json!({"event": "start", "sequence_number": "1", "stream_id": id,
                "start": {"user_id": "u0", "call_control_id": "v3:cc0", "call_session_id": "cs0",
                    "from": "+15550100", "to": "+15550199", "custom_parameters": custom,
                    "media_format": {"encoding": if alaw {"PCMA"} else {"PCMU"},
                        "sample_rate": 8000, "channels": 1}}}),
            20,
        ),
        Carrier::Plivo => (
            json!({"event": "start", "sequenceNumber": 0,
                "start": {"callId": "c0", "streamId": id, "accountId": "a0",
                    "tracks": ["inbound"], "extraHeaders": custom,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}}}),
            20,
        ),
        Carrier::Exotel => (
            json!({"event": "start", "sequence_number": 1, "stream_sid": id,
                "start": {"stream_sid": id, "call_sid": "c0", "account_sid": "a0",
                    "from": "09000000000", "to": "08000000000", "custom_parameters": custom,
                    "media_format": {"encoding": "base64", "sample_rate": "8000", "bit_rate": "16"}}}),
            100,
        ),
        _ => (
            json!({"event": "start", "sequenceNumber": "1", "streamSid": id,
                "start": {"streamSid": id, "accountSid": "AC0", "callSid": "CA0",
                    "tracks": ["inbound"], "customParameters": custom,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}),
            20,
        ),
    };
    let connected = match carrier {
        Carrier::Telnyx => json!({"event": "connected", "version": "1.0.0"}),
        _ => json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
    };
    let mut frames = vec![text(0.0, connected), text(0.0, start)];
    let mut media = Vec::new();
    let per_frame = 8 * frame_ms;
    for (i, chunk) in pcm8.chunks(per_frame).enumerate() {
        let payload: Vec<u8> = match carrier {
            Carrier::Exotel => le_bytes(chunk),
            Carrier::Telnyx if alaw => chunk.iter().map(|s| alaw_encode(*s)).collect(),
            _ => chunk
                .iter()
                .map(|s| super::device::mulaw_encode(*s))
                .collect(),
        };
        let (n, ts) = (i + 1, (i * frame_ms).to_string());
        let payload = b64.encode(payload);
        let event = match carrier {
            Carrier::Telnyx => json!({"event": "media", "sequence_number": (n + 1).to_string(),
                "stream_id": id, "media": {"track": "inbound", "chunk": n.to_string(),
                "timestamp": ts, "payload": payload}}),
            Carrier::Plivo => json!({"event": "media", "sequenceNumber": n, "streamId": id,
                "media": {"track": "inbound", "timestamp": ts, "chunk": n, "payload": payload}}),
            Carrier::Exotel => json!({"event": "media", "sequence_number": n + 1, "stream_sid": id,
                "media": {"chunk": n, "timestamp": ts, "payload": payload}}),
            _ => json!({"event": "media", "sequenceNumber": (n + 1).to_string(), "streamSid": id,
                "media": {"track": "inbound", "chunk": n.to_string(), "timestamp": ts,
                "payload": payload}}),
        };
        media.push(frames.len());
        frames.push(text((i * frame_ms) as f64, event));
    }
    let end = (pcm8.len() / 8) as f64;
    frames.push(text(
        end,
        json!({"event": "stop", "sequence_number": 0, "stop": {"reason": "hangup"}}),
    ));
    Call { frames, media }
}

fn text(at_ms: f64, v: serde_json::Value) -> Timed {
    Timed {
        at_ms,
        frame: Frame::Text(v.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alaw_round_trips_through_the_decoder_table() {
        for s in (-32768..32767).step_by(61) {
            let s = s as i16;
            let back = voxgate_media::g711::alaw_to_linear(alaw_encode(s));
            let err = (i32::from(s) - i32::from(back)).abs();
            assert!(
                err <= i32::from(s.unsigned_abs() / 16) + 16,
                "{s} -> {back}"
            );
        }
    }

    #[test]
    fn every_json_carrier_frames_its_media() {
        let samples = vec![100i16; 16_000];
        for c in [
            Carrier::SignalWire,
            Carrier::Telnyx,
            Carrier::Plivo,
            Carrier::Exotel,
        ] {
            let call = call(c, 16_000, &samples, &[]).unwrap();
            let per = if c == Carrier::Exotel { 10 } else { 50 };
            assert_eq!(call.media.len(), per, "{c:?}");
        }
        for c in [
            Carrier::Vonage,
            Carrier::Jambonz,
            Carrier::AudioFork,
            Carrier::Sinch,
        ] {
            let call = call(c, 16_000, &samples, &[]).unwrap();
            assert_eq!(call.media.len(), 50, "{c:?}");
            assert_eq!(call.frames.last().unwrap().frame, Frame::Close);
        }
        assert!(carrier_named("nope").is_err());
        assert_eq!(carrier_named("audio_fork").unwrap(), Carrier::AudioFork);
    }

    #[test]
    fn a_stereo_call_interleaves_the_caller_first() {
        let (caller, agent) = (vec![1i16; 16_000], vec![2i16; 8_000]);
        let call = stereo_call(Carrier::Jambonz, 16_000, &caller, &agent, &[]).unwrap();
        assert!(
            matches!(&call.frames[0].frame, Frame::Text(t) if t.contains(r#""mixType":"stereo""#))
        );
        assert_eq!(call.media.len(), 50, "20 ms frames of both channels");
        let Frame::Binary(first) = &call.frames[call.media[0]].frame else {
            panic!("binary media");
        };
        assert_eq!(first.len(), 320 * 2 * 2);
        assert_eq!(&first[..4], &[1, 0, 2, 0]);
        let Frame::Binary(last) = &call.frames[*call.media.last().unwrap()].frame else {
            panic!("binary media");
        };
        assert_eq!(
            &last[..4],
            &[1, 0, 0, 0],
            "the shorter party is padded with silence"
        );
        assert!(stereo_call(Carrier::Vonage, 16_000, &caller, &agent, &[]).is_err());
    }
}
