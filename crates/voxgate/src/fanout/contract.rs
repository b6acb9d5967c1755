//! The outbound wire contract, in one place: what a webhook receives from voxgate, whether the
//! gateway sends it in-process or a `voxgate deliver` worker sends it from the bus.
//!
//! - Audio-bytes webhooks: `POST url?sample_rate=16000&session_id=..&uid=..`, body PCM16 LE
//!   (or a WAV of it), headers `x-voxgate-sequence`, `-start-sample`, `-samples`,
//!   `-sample-rate`, `-session-id`, `idempotency-key` (`<session>:<webhook>:<sequence>`) and,
//!   with a secret, `x-voxgate-timestamp` and `x-voxgate-signature` (`v1=` HMAC-SHA256 of the
//!   canonical string, `canonical_string`: method, path, query, every `x-voxgate-*` header and
//!   `idempotency-key`, body).
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
pub const H_TIMESTAMP: &str = "x-voxgate-timestamp";
/// Receivers should refuse signed requests whose timestamp is further than this from their
/// clock (what `voxgate sink` does by default).
pub const DEFAULT_MAX_SIGNATURE_AGE_SECONDS: u64 = 300;

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
    let query = [
        ("sample_rate", rate.as_str()),
        ("session_id", t.session_id.as_str()),
        ("uid", t.uid.as_str()),
    ];
    let mut req = client
        .post(&cfg.url)
        .query(&query)
        .timeout(Duration::from_millis(cfg.timeout_ms))
        .header("content-type", content_type)
        .header(H_SEQUENCE, batch.sequence.to_string())
        .header(H_START_SAMPLE, batch.start_sample.to_string())
        .header(H_SAMPLES, batch.samples.to_string())
        .header(H_SAMPLE_RATE, rate.as_str())
        .header(H_SESSION_ID, t.session_id.as_str())
        .header(H_IDEMPOTENCY_KEY, batch.idempotency_key);
    req = req.body(body);
    match &cfg.secret {
        Some(secret) => sign_request(req, secret),
        None => req,
    }
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
    let req = req
        .header("content-type", "application/json")
        .header(H_IDEMPOTENCY_KEY, idempotency_key)
        .body(body);
    match secret {
        Some(secret) => sign_request(req, secret),
        None => req,
    }
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
        party,
    } = event
    else {
        return None;
    };
    let mut doc = serde_json::json!({
        "session_id": session_id,
        "uid": uid,
        "backend": backend,
        "sequence": sequence,
        "utterance": utterance,
        "text": text,
        "is_final": is_final,
        "start": start,
        "end": end,
    });
    // Only a two-party session's transcripts say whose they are (others keep their shape).
    if let Some(party) = party {
        doc["party"] = party.as_str().into();
    }
    Some(doc)
}

/// Whether a header is covered by the signature: every `x-voxgate-*` header but the signature,
/// and `idempotency-key`.
fn signed_header(name: &str) -> bool {
    (name.starts_with("x-voxgate-") && name != H_SIGNATURE) || name == H_IDEMPOTENCY_KEY
}

/// The string a signature covers, one item per line: `v1`, the method, the path, the query as
/// sent (without `?`; empty if none), then each signed header as `name:value` (lowercase names,
/// sorted by name, then by value), an empty line, and the body bytes.
pub fn canonical_string(
    method: &str,
    path: &str,
    query: &str,
    headers: &reqwest::header::HeaderMap,
    body: &[u8],
) -> Vec<u8> {
    let mut signed: Vec<(&str, &[u8])> = headers
        .iter()
        .filter(|(name, _)| signed_header(name.as_str()))
        .map(|(name, value)| (name.as_str(), value.as_bytes()))
        .collect();
    signed.sort();
    let mut out = Vec::with_capacity(256 + body.len());
    for line in ["v1", method, path, query] {
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    for (name, value) in signed {
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out.push(b'\n');
    out.extend_from_slice(body);
    out
}

/// `v1=<hex>` of HMAC-SHA256(secret, canonical string).
pub fn sign(secret: &str, canonical: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(canonical);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Adds `x-voxgate-timestamp` (now) and `x-voxgate-signature` over the finished request, so
/// every retry and every bus delivery is signed when it is sent.
pub fn sign_request(builder: reqwest::RequestBuilder, secret: &str) -> reqwest::RequestBuilder {
    let (client, built) = builder.build_split();
    let mut req = match built {
        Ok(req) => req,
        Err(e) => {
            // Unreachable with validated URLs; the send reports it.
            tracing::warn!(error = %e, "webhook request could not be built for signing");
            return client.post("");
        }
    };
    let now = unix_now().to_string();
    req.headers_mut().insert(
        H_TIMESTAMP,
        reqwest::header::HeaderValue::from_str(&now).expect("digits are a header value"),
    );
    let body = req.body().and_then(|b| b.as_bytes()).unwrap_or_default();
    let url = req.url();
    let canonical = canonical_string(
        req.method().as_str(),
        url.path(),
        url.query().unwrap_or(""),
        req.headers(),
        body,
    );
    let signature = sign(secret, &canonical);
    req.headers_mut().insert(
        H_SIGNATURE,
        reqwest::header::HeaderValue::from_str(&signature).expect("hex is a header value"),
    );
    reqwest::RequestBuilder::from_parts(client, req)
}

/// Why a receiver refuses a request's signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("no signature or timestamp")]
    Missing,
    #[error("timestamp too far from now")]
    Stale,
    #[error("signature does not verify")]
    Mismatch,
}

/// A receiver's check: the signature over the canonical string, compared in constant time, and
/// a timestamp within `max_age_seconds` of `now` (either way).
pub fn verify(
    secret: &str,
    request: (&str, &str, &str),
    headers: &reqwest::header::HeaderMap,
    body: &[u8],
    now: u64,
    max_age_seconds: u64,
) -> Result<(), VerifyError> {
    let (method, path, query) = request;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(given), Some(ts)) = (header(H_SIGNATURE), header(H_TIMESTAMP)) else {
        return Err(VerifyError::Missing);
    };
    let ts: u64 = ts.parse().map_err(|_| VerifyError::Missing)?;
    let want = sign(
        secret,
        &canonical_string(method, path, query, headers, body),
    );
    if !crate::auth::constant_time_eq(want.as_bytes(), given.as_bytes()) {
        return Err(VerifyError::Mismatch);
    }
    if ts.abs_diff(now) > max_age_seconds {
        return Err(VerifyError::Stale);
    }
    Ok(())
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

    fn headers(pairs: &[(&'static str, &str)]) -> reqwest::header::HeaderMap {
        let mut h = reqwest::header::HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_canonical_string_covers_method_path_query_voxgate_headers_and_body() {
        let h = headers(&[
            ("x-voxgate-timestamp", "1700000000"),
            ("content-type", "application/octet-stream"),
            ("idempotency-key", "s:w:0"),
            ("x-voxgate-sequence", "0"),
            ("x-voxgate-signature", "v1=ignored"),
        ]);
        let c = canonical_string("POST", "/hook", "uid=u&session_id=s", &h, &[1, 0xff]);
        let mut want = b"v1\nPOST\n/hook\nuid=u&session_id=s\nidempotency-key:s:w:0\nx-voxgate-sequence:0\nx-voxgate-timestamp:1700000000\n\n".to_vec();
        want.extend_from_slice(&[1, 0xff]);
        assert_eq!(c, want);
        // Computed independently (Python's hmac module) over the same bytes.
        assert_eq!(
            sign("topsecret", &c),
            "v1=3e81fe3d53903f1e59e585dbf2f74755a5c292fec5397cf178207ab2fa5f31be"
        );
    }

    #[test]
    fn receivers_refuse_changed_requests_and_stale_timestamps() {
        let mut h = headers(&[
            ("x-voxgate-timestamp", "1000"),
            ("idempotency-key", "s:w:0"),
        ]);
        let sig = sign("k", &canonical_string("POST", "/p", "uid=a", &h, b"body"));
        h.insert("x-voxgate-signature", sig.parse().unwrap());
        let ok = |q: &str, h: &reqwest::header::HeaderMap, now: u64| {
            verify("k", ("POST", "/p", q), h, b"body", now, 300)
        };
        assert_eq!(ok("uid=a", &h, 1100), Ok(()));
        assert_eq!(
            ok("uid=b", &h, 1100),
            Err(VerifyError::Mismatch),
            "another uid"
        );
        assert_eq!(ok("uid=a", &h, 1301), Err(VerifyError::Stale));
        let mut other = h.clone();
        other.insert("x-voxgate-samples", "5".parse().unwrap());
        assert_eq!(
            ok("uid=a", &other, 1100),
            Err(VerifyError::Mismatch),
            "added header"
        );
        other = h.clone();
        other.insert("x-voxgate-timestamp", "1200".parse().unwrap());
        assert_eq!(
            ok("uid=a", &other, 1200),
            Err(VerifyError::Mismatch),
            "moved timestamp"
        );
        other.remove("x-voxgate-signature");
        assert_eq!(ok("uid=a", &other, 1200), Err(VerifyError::Missing));
    }

    #[test]
    fn the_transcript_document_has_the_documented_shape() {
        let event = ServerEvent::Transcript {
            utterance: 3,
            text: "hello there".into(),
            is_final: true,
            backend: "whisper".into(),
            party: None,
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
