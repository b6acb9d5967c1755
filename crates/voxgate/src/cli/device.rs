//! Device and telephony simulators: turn a WAV into the messages a wearable or Twilio would send.

use std::path::Path;

use base64::Engine;

/// Reads a mono (or first-channel) 16-bit WAV: (sample_rate, samples).
pub fn read_wav(path: &Path) -> anyhow::Result<(u32, Vec<i16>)> {
    let mut reader =
        hound::WavReader::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let spec = reader.spec();
    anyhow::ensure!(
        spec.bits_per_sample == 16 && spec.sample_format == hound::SampleFormat::Int,
        "{}: need 16-bit PCM WAV",
        path.display()
    );
    let ch = usize::from(spec.channels.max(1));
    let all: Vec<i16> = reader.samples::<i16>().collect::<Result<_, _>>()?;
    Ok((spec.sample_rate, all.iter().step_by(ch).copied().collect()))
}

/// Encodes samples with libopus into packets of `frame_ms`, one per device message. With `seq`,
/// each packet is prefixed by its big-endian u32 sequence number.
pub fn opus_packets(
    rate: u32,
    samples: &[i16],
    frame_ms: u32,
    seq: bool,
) -> anyhow::Result<Vec<Vec<u8>>> {
    anyhow::ensure!(
        [8_000, 12_000, 16_000, 24_000, 48_000].contains(&rate),
        "Opus needs 8, 12, 16, 24 or 48 kHz input, not {rate}"
    );
    anyhow::ensure!(
        [10, 20, 40, 60].contains(&frame_ms),
        "frame_ms must be 10, 20, 40 or 60"
    );
    let mut enc = opus::Encoder::new(rate, opus::Channels::Mono, opus::Application::Voip)?;
    let frame = (rate * frame_ms / 1000) as usize;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4000];
    for (i, chunk) in samples.chunks(frame).enumerate() {
        let mut pcm = chunk.to_vec();
        pcm.resize(frame, 0);
        let n = enc.encode(&pcm, &mut buf)?;
        let mut msg = Vec::with_capacity(n + 4);
        if seq {
            msg.extend_from_slice(&(i as u32).to_be_bytes());
        }
        msg.extend_from_slice(&buf[..n]);
        out.push(msg);
    }
    Ok(out)
}

/// G.711 mu-law encoding of one sample (the inverse of the standard table).
pub fn mulaw_encode(sample: i16) -> u8 {
    const BIAS: i32 = 0x84;
    const CLIP: i32 = 32_635;
    let mut s = i32::from(sample);
    let sign = if s < 0 {
        s = -s;
        0x80
    } else {
        0
    };
    s = s.min(CLIP) + BIAS;
    // `s` is in 0x84..0x8000: its top set bit is bit 7 + exponent.
    let exponent = (31 - s.leading_zeros()) as i32 - 7;
    let mantissa = (s >> (exponent + 3)) & 0x0F;
    !(sign | (exponent << 4) as u8 | mantissa as u8)
}

/// Mono samples to 8 kHz mu-law bytes (16 kHz input is halved after a 2-tap average).
pub fn to_mulaw_8k(rate: u32, samples: &[i16]) -> anyhow::Result<Vec<u8>> {
    match rate {
        8_000 => Ok(samples.iter().map(|s| mulaw_encode(*s)).collect()),
        16_000 => Ok(samples
            .chunks(2)
            .map(|p| {
                let avg = p.iter().map(|s| i32::from(*s)).sum::<i32>() / p.len() as i32;
                mulaw_encode(avg as i16)
            })
            .collect()),
        other => anyhow::bail!("the Twilio simulator takes 8 or 16 kHz WAV, not {other} Hz"),
    }
}

/// A Twilio Media Stream for `mulaw` (8 kHz): connected, start, 20 ms media events, stop.
pub fn twilio_messages(mulaw: &[u8], stream_sid: &str, custom: &[(String, String)]) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let params: serde_json::Map<String, serde_json::Value> = custom
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let mut out = vec![
        serde_json::json!({"event":"connected","protocol":"Call","version":"1.0.0"}).to_string(),
        serde_json::json!({
            "event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
            "start": {
                "streamSid": stream_sid, "accountSid": "AC0", "callSid": "CA0",
                "tracks": ["inbound"], "customParameters": params,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
            }
        })
        .to_string(),
    ];
    for (i, chunk) in mulaw.chunks(160).enumerate() {
        out.push(
            serde_json::json!({
                "event": "media", "sequenceNumber": (i + 2).to_string(), "streamSid": stream_sid,
                "media": {"track": "inbound", "chunk": (i + 1).to_string(),
                          "timestamp": (i * 20).to_string(), "payload": b64.encode(chunk)}
            })
            .to_string(),
        );
    }
    out.push(
        serde_json::json!({"event":"stop","streamSid":stream_sid,"stop":{"callSid":"CA0"}})
            .to_string(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mulaw_round_trips_through_the_decoder_table() {
        let mut dec = voxgate_media::Decoder::new(
            voxgate_media::SourceFormat::Mulaw {
                sample_rate: 16_000,
                channels: 1,
            },
            voxgate_media::Limits::default(),
        )
        .unwrap();
        let input: Vec<i16> = (-32768..32767).step_by(97).map(|s| s as i16).collect();
        let bytes: Vec<u8> = input.iter().map(|s| mulaw_encode(*s)).collect();
        let mut out = Vec::new();
        dec.push(&bytes, &mut out).unwrap();
        dec.finish(&mut out).unwrap();
        assert_eq!(out.len(), input.len());
        for (a, b) in input.iter().zip(&out) {
            let err = (i32::from(*a) - i32::from(*b)).abs();
            // mu-law quantisation error grows with magnitude: at most ~1/32 of the value.
            assert!(err <= i32::from(a.unsigned_abs() / 16) + 16, "{a} -> {b}");
        }
    }
}
