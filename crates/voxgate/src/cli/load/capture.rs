//! The capture every session streams: its bytes cut into WebSocket messages, the media time at
//! which each is sent, and (when the format decodes locally) how many 16 kHz samples the server
//! has decoded after each message, which is what lets the tool time `Progress` events and
//! webhook batches.

use std::collections::HashMap;
use std::path::PathBuf;

use voxgate_media::{Decoder, Limits, SourceFormat};

use super::args::LoadArgs;
use crate::cli::index;

/// Why the capture cannot be streamed.
#[derive(Debug, thiserror::Error)]
pub(super) enum CaptureError {
    #[error("{}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: empty file", .0.display())]
    Empty(PathBuf),
    #[error("--url is required")]
    NoUrl,
    #[error(transparent)]
    Url(#[from] url::ParseError),
    /// The gateway's own refusal of the URL's audio query.
    #[error("{0}")]
    Format(String),
    #[error("every --url must ask for the same audio format ({0})")]
    MixedFormats(String),
    #[error(transparent)]
    Index(anyhow::Error),
    #[error("a container capture needs --index (its message boundaries and timing)")]
    NeedsIndex,
}

/// The capture as messages, with the samples the server will have decoded after each.
pub(super) struct Capture {
    data: Vec<u8>,
    messages: Vec<index::Message>,
    /// Cumulative 16 kHz samples after message i (one pass), when the format decodes locally.
    cum: Option<Vec<u64>>,
    /// Samples produced by `finish` after a whole pass.
    pub(super) tail: u64,
    /// Raw audio: loop the bytes on one connection.
    pub(super) raw: bool,
    /// Media ms of one pass (pacing of the loop).
    pass_ms: f64,
    /// CPU ms to decode one second of this capture here (`decode_cost`), when it decodes locally.
    pub(super) decode_cpu_ms_per_audio_s: Option<f64>,
}

impl Capture {
    pub(super) fn load(args: &LoadArgs) -> Result<Self, CaptureError> {
        let data = std::fs::read(&args.file).map_err(|error| CaptureError::Read {
            path: args.file.clone(),
            error,
        })?;
        if data.is_empty() {
            return Err(CaptureError::Empty(args.file.clone()));
        }
        let format = url_format(&args.url)?;
        let raw = !matches!(format, SourceFormat::Auto);
        let mut messages = match &args.index {
            Some(p) => index::load(p, data.len()).map_err(CaptureError::Index)?,
            None => {
                let per_ms = raw_bytes_per_ms(&format).ok_or(CaptureError::NeedsIndex)?;
                index::fixed(data.len(), ((per_ms * args.chunk_ms) as usize).max(1))
            }
        };
        rebase_times(&mut messages, args.chunk_ms);
        let pass_ms = if raw {
            messages.len() as f64 * args.chunk_ms.max(1.0)
        } else {
            messages.last().and_then(|m| m.t_ms).unwrap_or(0.0)
        };
        let (cum, tail) = match local_decode(format, &data, &messages) {
            Some((c, t)) => (Some(c), t),
            None => (None, 0),
        };
        let decode_cpu_ms_per_audio_s = cum
            .as_ref()
            .and_then(|c| decode_cost(format, &data, &messages, c.last().copied()? + tail));
        Ok(Self {
            data,
            messages,
            cum,
            tail,
            raw,
            pass_ms,
            decode_cpu_ms_per_audio_s,
        })
    }

    /// Messages in one pass of the capture.
    pub(super) fn pass_len(&self) -> u64 {
        self.messages.len() as u64
    }

    /// The bytes of global message `k` (raw audio loops).
    pub(super) fn bytes(&self, k: u64) -> &[u8] {
        let m = self.messages[(k % self.pass_len()) as usize];
        &self.data[m.offset..m.offset + m.length]
    }

    /// The server's sample counts are known, so latencies can be matched to sends.
    pub(super) fn decodes_locally(&self) -> bool {
        self.cum.is_some()
    }

    /// Cumulative samples after global message `k` (raw audio loops).
    pub(super) fn cum_after(&self, k: u64) -> Option<u64> {
        let cum = self.cum.as_ref()?;
        let n = cum.len() as u64;
        let per_pass = cum[cum.len() - 1];
        Some((k / n) * per_pass + cum[(k % n) as usize])
    }

    /// Send offset of global message `k` from the connection start, in media ms.
    pub(super) fn t_ms(&self, k: u64) -> f64 {
        let n = self.pass_len();
        let pass = (k / n) as f64;
        let t = self.messages[(k % n) as usize].t_ms.unwrap_or(0.0);
        if self.raw {
            pass * self.pass_ms + t
        } else {
            t
        }
    }
}

/// The audio format the URLs ask for; every URL must ask for the same.
fn url_format(urls: &[String]) -> Result<SourceFormat, CaptureError> {
    let format_of = |u: &str| -> Result<SourceFormat, CaptureError> {
        let query: HashMap<String, String> =
            url::Url::parse(u)?.query_pairs().into_owned().collect();
        crate::ingest::request::source_format(&query).map_err(CaptureError::Format)
    };
    let (first, rest) = urls.split_first().ok_or(CaptureError::NoUrl)?;
    let format = format_of(first)?;
    for u in rest {
        if format_of(u)? != format {
            return Err(CaptureError::MixedFormats(u.clone()));
        }
    }
    Ok(format)
}

/// Times from the first message on; messages without one are `chunk_ms` apart.
fn rebase_times(messages: &mut [index::Message], chunk_ms: f64) {
    let t0 = messages.first().and_then(|m| m.t_ms).unwrap_or(0.0);
    for (i, m) in messages.iter_mut().enumerate() {
        m.t_ms = Some(match m.t_ms {
            Some(t) => t - t0,
            None => i as f64 * chunk_ms,
        });
    }
}

/// Bytes per millisecond of a raw format; `None` for a container.
fn raw_bytes_per_ms(format: &SourceFormat) -> Option<f64> {
    let (rate, ch, width) = match *format {
        SourceFormat::Linear16 {
            sample_rate,
            channels,
        } => (sample_rate, channels, 2),
        SourceFormat::Float32 {
            sample_rate,
            channels,
        } => (sample_rate, channels, 4),
        SourceFormat::Linear8 {
            sample_rate,
            channels,
        }
        | SourceFormat::Mulaw {
            sample_rate,
            channels,
        }
        | SourceFormat::Alaw {
            sample_rate,
            channels,
        } => (sample_rate, channels, 1),
        _ => return None,
    };
    Some(f64::from(rate) * f64::from(ch) * f64::from(width) / 1000.0)
}

/// Decodes the capture as the server will, message by message: cumulative samples after each
/// message, and the samples `finish` adds after the last.
fn local_decode(
    format: SourceFormat,
    data: &[u8],
    messages: &[index::Message],
) -> Option<(Vec<u64>, u64)> {
    let mut decoder = Decoder::new(format, Limits::default()).ok()?;
    let mut pcm = Vec::new();
    let mut total = 0u64;
    let mut cum = Vec::with_capacity(messages.len());
    for m in messages {
        pcm.clear();
        decoder
            .push(&data[m.offset..m.offset + m.length], &mut pcm)
            .ok()?;
        while decoder.poll_event().is_some() {}
        total += pcm.len() as u64;
        cum.push(total);
    }
    pcm.clear();
    decoder.finish(&mut pcm).ok()?;
    Some((cum, pcm.len() as u64))
}

/// CPU milliseconds this thread spends decoding one second of the capture's audio, decoding it
/// (as the server does, message by message) until at least half a CPU second was spent: the
/// floor a gateway stream cannot go under.
fn decode_cost(
    format: SourceFormat,
    data: &[u8],
    messages: &[index::Message],
    samples_per_pass: u64,
) -> Option<f64> {
    if samples_per_pass == 0 {
        return None;
    }
    let from = super::sampler::thread_cpu_seconds()?;
    let mut passes = 0u32;
    let mut spent = 0.0;
    while passes < 1_000 && (spent < 0.5 || passes < 3) {
        local_decode(format, data, messages)?;
        passes += 1;
        spent = super::sampler::thread_cpu_seconds()? - from;
    }
    let audio_s = f64::from(passes) * samples_per_pass as f64 / 16_000.0;
    Some(spent * 1e3 / audio_s)
}

/// For tests: 16 kHz mono PCM `data` cut into `chunk`-byte messages 100 ms apart, looping.
#[cfg(test)]
pub(super) fn pcm_fixture(data: Vec<u8>, chunk: usize) -> Capture {
    let mut messages = index::fixed(data.len(), chunk);
    rebase_times(&mut messages, 100.0);
    let format = SourceFormat::Linear16 {
        sample_rate: 16_000,
        channels: 1,
    };
    let (cum, tail) = local_decode(format, &data, &messages).expect("PCM decodes");
    Capture {
        pass_ms: messages.len() as f64 * 100.0,
        data,
        messages,
        cum: Some(cum),
        tail,
        raw: true,
        decode_cpu_ms_per_audio_s: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_rates() {
        let pcm = SourceFormat::Linear16 {
            sample_rate: 16_000,
            channels: 1,
        };
        assert_eq!(raw_bytes_per_ms(&pcm), Some(32.0));
        let mulaw = SourceFormat::Mulaw {
            sample_rate: 8_000,
            channels: 2,
        };
        assert_eq!(raw_bytes_per_ms(&mulaw), Some(16.0));
        assert_eq!(raw_bytes_per_ms(&SourceFormat::Auto), None);
    }

    #[test]
    fn raw_audio_loops_in_samples_and_time() {
        // 3 messages of 100 samples (200 bytes) each.
        let cap = pcm_fixture(vec![0u8; 600], 200);
        assert_eq!(cap.pass_len(), 3);
        assert_eq!(cap.cum_after(0), Some(100));
        assert_eq!(cap.cum_after(2), Some(300));
        assert_eq!(cap.cum_after(4), Some(500));
        assert_eq!(cap.t_ms(1), 100.0);
        assert_eq!(cap.t_ms(4), 400.0);
        assert_eq!(cap.bytes(4).len(), 200);
        assert_eq!(cap.tail, 0);
    }

    #[test]
    fn times_start_at_zero() {
        let mut m = index::fixed(30, 10);
        m[0].t_ms = Some(1000.0);
        m[1].t_ms = Some(1250.0);
        rebase_times(&mut m, 100.0);
        let t: Vec<_> = m.iter().map(|m| m.t_ms.unwrap()).collect();
        assert_eq!(t, [0.0, 250.0, 200.0]);
    }

    #[test]
    fn every_url_asks_for_one_format() {
        let pcm = "ws://h/v1/listen?encoding=linear16&sample_rate=16000".to_owned();
        let auto = "ws://h/v1/listen".to_owned();
        assert!(matches!(
            url_format(std::slice::from_ref(&auto)),
            Ok(SourceFormat::Auto)
        ));
        assert!(matches!(
            url_format(&[pcm.clone(), auto]),
            Err(CaptureError::MixedFormats(_))
        ));
        assert!(matches!(url_format(&[]), Err(CaptureError::NoUrl)));
        assert!(url_format(&[pcm]).is_ok());
    }
}
