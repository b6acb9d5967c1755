//! The outbound wire contract, in one place: what a webhook receives from voxgate, whether the
//! gateway sends it in-process or a `voxgate deliver` worker sends it from the bus.
//!
//! - Audio-bytes webhooks: `POST url?sample_rate=16000&session_id=..&uid=..`, body PCM16 LE
//!   (or a WAV of it), headers `x-voxgate-sequence`, `-start-sample`, `-samples`,
//!   `-sample-rate`, `-session-id`, `idempotency-key` (`<session>:<webhook>:<sequence>`) and,
//!   with a secret, `x-voxgate-signature` (`sha256=` HMAC of key + "." + body).
//! - Transcript webhooks: one JSON document per final transcript (`transcript_doc`), with
//!   `idempotency-key` `<session>:<backend>:<sequence>`.
//! - JSON webhooks (Omi): a JSON body with `idempotency-key` and the optional signature.
//!
//! The checkers (`voxgate sink`, the load generator, the tests) read the same constants.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use voxgate_session::{ServerEvent, SAMPLE_RATE};

use crate::config::{BodyFormat, WebhookConfig};

pub const H_SEQUENCE: &str = "x-voxgate-sequence";
pub const H_START_SAMPLE: &str = "x-voxgate-start-sample";
pub const H_SAMPLES: &str = "x-voxgate-samples";
pub const H_SAMPLE_RATE: &str = "x-voxgate-sample-rate";
pub const H_SESSION_ID: &str = "x-voxgate-session-id";
pub const H_SIGNATURE: &str = "x-voxgate-signature";
pub const H_IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Bytes per second of the PCM16 mono audio voxgate sends.
pub const BYTES_PER_SECOND: u32 = SAMPLE_RATE * 2;

/// Who the audio belongs to, sent with every request.
#[derive(Debug, Clone)]
pub struct Target {
    pub session_id: String,
    pub uid: String,
}

/// The `Idempotency-Key` of request `seq` of sink `sink` (a webhook's or backend's name) in a
/// session; with a bus it is also the message's `Nats-Msg-Id`.
pub fn idempotency_key(session_id: &str, sink: &str, seq: u64) -> String {
    format!("{session_id}:{sink}:{seq}")
}

/// What the headers of one audio batch say about it.
#[derive(Debug, Clone, Copy)]
pub struct AudioBatchInfo<'a> {
    pub target: &'a Target,
    pub idempotency_key: &'a str,
    pub sequence: u64,
    pub start_sample: u64,
    pub samples: usize,
}

/// One audio-bytes webhook request (`body` from `audio_body`).
pub fn audio_request(
    client: &reqwest::Client,
    cfg: &WebhookConfig,
    batch: &AudioBatchInfo<'_>,
    body: bytes::Bytes,
) -> reqwest::RequestBuilder {
    let content_type = match cfg.body {
        BodyFormat::Pcm => "application/octet-stream",
        BodyFormat::Wav => "audio/wav",
    };
    let rate = SAMPLE_RATE.to_string();
    let t = batch.target;
    let mut req = client
        .post(&cfg.url)
        .query(&[
            ("sample_rate", rate.as_str()),
            ("session_id", t.session_id.as_str()),
            ("uid", t.uid.as_str()),
        ])
        .timeout(Duration::from_millis(cfg.timeout_ms))
        .header("content-type", content_type)
        .header(H_SEQUENCE, batch.sequence.to_string())
        .header(H_START_SAMPLE, batch.start_sample.to_string())
        .header(H_SAMPLES, batch.samples.to_string())
        .header(H_SAMPLE_RATE, rate.as_str())
        .header(H_SESSION_ID, t.session_id.as_str())
        .header(H_IDEMPOTENCY_KEY, batch.idempotency_key);
    if let Some(secret) = &cfg.secret {
        req = req.header(H_SIGNATURE, sign(secret, batch.idempotency_key, &body));
    }
    req.body(body)
}

/// The body of an audio webhook request for little-endian PCM16 bytes.
pub fn audio_body(format: &BodyFormat, pcm_le: &[u8]) -> Vec<u8> {
    match format {
        BodyFormat::Pcm => pcm_le.to_vec(),
        BodyFormat::Wav => {
            let mut out = wav_header(pcm_le.len() as u32);
            out.extend_from_slice(pcm_le);
            out
        }
    }
}

/// A JSON document POST (`content-type: application/json`) with its idempotency key, signed
/// when there is a secret.
pub fn json_request(
    req: reqwest::RequestBuilder,
    idempotency_key: &str,
    secret: Option<&str>,
    body: bytes::Bytes,
) -> reqwest::RequestBuilder {
    let mut req = req
        .header("content-type", "application/json")
        .header(H_IDEMPOTENCY_KEY, idempotency_key);
    if let Some(secret) = secret {
        req = req.header(H_SIGNATURE, sign(secret, idempotency_key, &body));
    }
    req.body(body)
}

/// The transcript webhook document of a final transcript (`None` for other events): the same
/// whether the in-process poster sends it or a deliver worker does from the bus.
pub fn transcript_doc(
    session_id: &str,
    uid: &str,
    sequence: u64,
    event: &ServerEvent,
) -> Option<serde_json::Value> {
    let ServerEvent::Transcript {
        utterance,
        text,
        is_final,
        backend,
        start,
        end,
    } = event
    else {
        return None;
    };
    Some(serde_json::json!({
        "session_id": session_id,
        "uid": uid,
        "backend": backend,
        "sequence": sequence,
        "utterance": utterance,
        "text": text,
        "is_final": is_final,
        "start": start,
        "end": end,
    }))
}

/// `sha256=<hex>` of HMAC-SHA256(secret, idempotency_key + "." + body).
pub fn sign(secret: &str, idempotency_key: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(idempotency_key.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// PCM16 samples as little-endian bytes.
pub fn pcm_bytes(pcm: &[i16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(pcm.len() * 2);
    for s in pcm {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

/// A 16 kHz mono PCM16 WAV of `pcm`.
pub fn wav_bytes(pcm: &[i16]) -> Vec<u8> {
    let mut out = wav_header((pcm.len() * 2) as u32);
    out.extend_from_slice(&pcm_bytes(pcm));
    out
}

/// The 44-byte RIFF header of a 16 kHz mono PCM16 WAV with `data_len` bytes of samples.
fn wav_header(data_len: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes()); // fmt chunk size
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&SAMPLE_RATE.to_le_bytes());
    out.extend_from_slice(&BYTES_PER_SECOND.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes()); // block align
    out.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_is_hmac_sha256_of_key_dot_body() {
        // Computed independently (Python's hmac module) over b"sess-1:hook:0." + body.
        assert_eq!(
            sign("topsecret", "sess-1:hook:0", &[1, 0, 0xfe, 0xff]),
            "sha256=236278e5f8c3b2bb140d35b44d3f8ba5c74c9eca73d686432999e843735d63e5"
        );
    }

    #[test]
    fn the_transcript_document_has_the_documented_shape() {
        let event = ServerEvent::Transcript {
            utterance: 3,
            text: "hello there".into(),
            is_final: true,
            backend: "whisper".into(),
            start: 1.5,
            end: 2.25,
        };
        let doc = transcript_doc("s-1", "u-9", 7, &event).expect("a transcript");
        assert_eq!(
            doc,
            serde_json::json!({
                "session_id": "s-1", "uid": "u-9", "backend": "whisper", "sequence": 7,
                "utterance": 3, "text": "hello there", "is_final": true,
                "start": 1.5, "end": 2.25,
            })
        );
        assert!(transcript_doc("s", "u", 0, &ServerEvent::warning("x", "y")).is_none());
        assert_eq!(idempotency_key("s-1", "whisper", 7), "s-1:whisper:7");
    }

    #[test]
    fn wav_is_a_16_khz_mono_pcm16_riff() {
        let wav = wav_bytes(&[1, -2]);
        assert_eq!(wav.len(), 44 + 4);
        assert_eq!(&wav[..4], b"RIFF");
        assert_eq!(&wav[8..16], b"WAVEfmt ");
        assert_eq!(u32::from_le_bytes(wav[24..28].try_into().unwrap()), 16_000);
        assert_eq!(u32::from_le_bytes(wav[28..32].try_into().unwrap()), 32_000);
        assert_eq!(&wav[44..], &[1, 0, 0xfe, 0xff]);
        assert_eq!(audio_body(&BodyFormat::Wav, &wav[44..]), wav);
        assert_eq!(audio_body(&BodyFormat::Pcm, &[1, 2]), vec![1, 2]);
    }
}
