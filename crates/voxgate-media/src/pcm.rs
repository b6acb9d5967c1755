//! Raw PCM and G.711 input: sample decoding, downmix to mono, resampling to 16 kHz.
//!
//! Chunks may split a sample or a multi-channel frame anywhere: the partial frame (at most
//! `channels * 4 - 1` bytes) is carried to the next push. 16 kHz mono s16le passes through
//! bit-exact; everything else goes through f32 and the [`Resampler`].

use crate::g711;
use crate::resample::{to_i16, Resampler};

/// Sample encodings of raw input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleFormat {
    /// Signed 16-bit little-endian.
    S16,
    /// 32-bit float little-endian, full scale ±1.0.
    F32,
    /// Unsigned 8-bit (128 = silence).
    U8,
    /// G.711 mu-law.
    Mulaw,
    /// G.711 A-law.
    Alaw,
}

impl SampleFormat {
    /// Bytes per sample.
    pub fn width(self) -> usize {
        match self {
            Self::S16 => 2,
            Self::F32 => 4,
            Self::U8 | Self::Mulaw | Self::Alaw => 1,
        }
    }

    /// One sample in i16 units (as f32 so f32 input keeps its resolution).
    fn sample(self, b: &[u8]) -> f32 {
        match self {
            Self::S16 => f32::from(i16::from_le_bytes([b[0], b[1]])),
            Self::F32 => {
                let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                if x.is_finite() {
                    x * 32768.0
                } else {
                    0.0
                }
            }
            Self::U8 => (f32::from(b[0]) - 128.0) * 256.0,
            Self::Mulaw => f32::from(g711::MULAW[usize::from(b[0])]),
            Self::Alaw => f32::from(g711::ALAW[usize::from(b[0])]),
        }
    }
}

/// Streaming raw-PCM pipeline.
#[derive(Debug)]
pub struct PcmStage {
    format: SampleFormat,
    channels: usize,
    carry: Vec<u8>,
    mono: Vec<f32>,
    resampler: Resampler,
}

impl PcmStage {
    /// A pipeline for `format` at `rate` Hz with `channels` interleaved channels (≥ 1).
    pub fn new(format: SampleFormat, rate: u32, channels: u8) -> Self {
        let channels = usize::from(channels.max(1));
        Self {
            format,
            channels,
            carry: Vec::with_capacity(format.width() * channels),
            mono: Vec::new(),
            resampler: Resampler::new(rate),
        }
    }

    /// Bytes of an incomplete frame carried to the next push.
    pub fn pending_bytes(&self) -> usize {
        self.carry.len()
    }

    /// Decodes `chunk`, appending 16 kHz mono samples to `out`; returns complete frames read.
    pub fn push(&mut self, mut chunk: &[u8], out: &mut Vec<i16>) -> u64 {
        let frame = self.format.width() * self.channels;
        let mut frames = 0;
        if !self.carry.is_empty() {
            let need = (frame - self.carry.len()).min(chunk.len());
            self.carry.extend_from_slice(&chunk[..need]);
            chunk = &chunk[need..];
            if self.carry.len() < frame {
                return 0;
            }
            let carry = std::mem::take(&mut self.carry);
            frames += self.frames(&carry, out);
            self.carry = carry;
            self.carry.clear();
        }
        let whole = chunk.len() / frame * frame;
        frames += self.frames(&chunk[..whole], out);
        self.carry.extend_from_slice(&chunk[whole..]);
        frames
    }

    fn frames(&mut self, bytes: &[u8], out: &mut Vec<i16>) -> u64 {
        let width = self.format.width();
        let frame = width * self.channels;
        if self.resampler.is_passthrough() && self.format == SampleFormat::S16 && self.channels == 1
        {
            out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| i16::from_le_bytes([b[0], b[1]])),
            );
            return (bytes.len() / frame) as u64;
        }
        let scale = 1.0 / self.channels as f32;
        // Blocks of 1024 frames keep the scratch buffer small whatever the chunk size.
        for block in bytes.chunks(frame * 1024) {
            self.mono.clear();
            self.mono.extend(block.chunks_exact(frame).map(|f| {
                let sum: f32 = f.chunks_exact(width).map(|s| self.format.sample(s)).sum();
                sum * scale
            }));
            if self.resampler.is_passthrough() {
                out.extend(self.mono.iter().map(|&x| to_i16(x)));
            } else {
                self.resampler.process(&self.mono, out);
            }
        }
        (bytes.len() / frame) as u64
    }

    /// Flushes the resampler. A partial trailing frame is dropped; returns its byte count.
    pub fn finish(&mut self, out: &mut Vec<i16>) -> usize {
        if !self.resampler.is_passthrough() {
            self.resampler.finish(out);
        }
        std::mem::take(&mut self.carry).len()
    }
}
