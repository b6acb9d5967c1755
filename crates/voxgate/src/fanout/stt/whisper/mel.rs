//! Whisper's front end: 80 mel bands of a 400-point STFT every 10 ms over a 30 s window,
//! computed as OpenAI's `log_mel_spectrogram` computes it: frames centred on their hop (the
//! signal reflected at its start), a periodic Hann window, the power of each bin, the mel
//! filter bank, log10 floored at 1e-10, clamped to 8 below the window's peak, then `(x+4)/4`.
//!
//! The filter bank follows librosa's Slaney mel scale with Slaney area normalisation, which
//! is how OpenAI made the `mel_filters.npz` Whisper ships (the `stt_whisper` test compares the
//! two).

use std::sync::Arc;

use rustfft::num_complex::Complex32;
use rustfft::{Fft, FftPlanner};

/// Samples in a window (30 s) and frames of its spectrogram.
pub const N_SAMPLES: usize = 480_000;
pub const N_FRAMES: usize = 3_000;
const HOP: usize = 160;

/// Whisper's sample rate and FFT size.
pub const SAMPLE_RATE: f64 = 16_000.0;
pub const N_FFT: usize = 400;

/// The Slaney mel scale: linear (`F_SP` Hz per mel) below 1 kHz, logarithmic above.
const F_SP: f64 = 200.0 / 3.0;
const MIN_LOG_HZ: f64 = 1000.0;
const MIN_LOG_MEL: f64 = MIN_LOG_HZ / F_SP;

/// Mels per natural-log step above 1 kHz.
fn logstep() -> f64 {
    6.4f64.ln() / 27.0
}

fn hz_to_mel(hz: f64) -> f64 {
    if hz >= MIN_LOG_HZ {
        MIN_LOG_MEL + (hz / MIN_LOG_HZ).ln() / logstep()
    } else {
        hz / F_SP
    }
}

fn mel_to_hz(mel: f64) -> f64 {
    if mel >= MIN_LOG_MEL {
        MIN_LOG_HZ * (logstep() * (mel - MIN_LOG_MEL)).exp()
    } else {
        mel * F_SP
    }
}

/// The filter bank, `n_mels` rows of `n_fft / 2 + 1` weights, row-major: triangles between
/// `n_mels + 2` points evenly spaced on the mel scale from 0 Hz to Nyquist, each scaled to
/// unit area (`2 / (upper - lower)`).
pub fn filters(n_mels: usize, n_fft: usize, sample_rate: f64) -> Vec<f32> {
    let bins = n_fft / 2 + 1;
    let top = hz_to_mel(sample_rate / 2.0);
    let points: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(top * i as f64 / (n_mels + 1) as f64))
        .collect();
    let mut out = Vec::with_capacity(n_mels * bins);
    for m in 0..n_mels {
        let (lower, centre, upper) = (points[m], points[m + 1], points[m + 2]);
        let norm = 2.0 / (upper - lower);
        for k in 0..bins {
            let f = sample_rate / 2.0 * k as f64 / (bins - 1) as f64;
            let rising = (f - lower) / (centre - lower);
            let falling = (upper - f) / (upper - centre);
            out.push((rising.min(falling).max(0.0) * norm) as f32);
        }
    }
    out
}

/// The front end: filters, window and FFT plan, made once per model.
pub struct Mel {
    n_mels: usize,
    filters: Vec<f32>,
    hann: Vec<f32>,
    fft: Arc<dyn Fft<f32>>,
}

impl Mel {
    pub fn new(n_mels: usize) -> Self {
        let hann = (0..N_FFT)
            .map(|i| {
                let x = 2.0 * std::f64::consts::PI * i as f64 / N_FFT as f64;
                (0.5 * (1.0 - x.cos())) as f32
            })
            .collect();
        Self {
            n_mels,
            filters: filters(n_mels, N_FFT, SAMPLE_RATE),
            hann,
            fft: FftPlanner::new().plan_fft_forward(N_FFT),
        }
    }

    /// The log-mel input of one window: `pcm` ([-1, 1], at most 30 s) then silence, as
    /// Whisper was trained. `n_mels` rows of `N_FRAMES` values, row-major.
    pub fn window(&self, pcm: &[f32]) -> Vec<f32> {
        let pcm = &pcm[..pcm.len().min(N_SAMPLES)];
        let bins = N_FFT / 2 + 1;
        let half = N_FFT / 2;
        let sample = |i: isize| -> f32 {
            let i = i.unsigned_abs(); // reflected at the start
            pcm.get(i).copied().unwrap_or(0.0)
        };
        let mut out = vec![0f32; self.n_mels * N_FRAMES];
        let mut buf = vec![Complex32::default(); N_FFT];
        let mut power = vec![0f32; bins];
        // Frames wholly past the audio are silence: their value is the floor (set below).
        let sounding = ((pcm.len() + half) / HOP + 1).min(N_FRAMES);
        for frame in 0..sounding {
            let start = (frame * HOP) as isize - half as isize;
            for (j, c) in buf.iter_mut().enumerate() {
                *c = Complex32::new(self.hann[j] * sample(start + j as isize), 0.0);
            }
            self.fft.process(&mut buf);
            for (p, c) in power.iter_mut().zip(&buf) {
                *p = c.norm_sqr();
            }
            for (m, row) in self.filters.chunks_exact(bins).enumerate() {
                let e: f32 = row.iter().zip(&power).map(|(w, p)| w * p).sum();
                out[m * N_FRAMES + frame] = e.max(1e-10).log10();
            }
        }
        let silent = (1e-10f32).log10();
        for m in 0..self.n_mels {
            out[m * N_FRAMES + sounding..(m + 1) * N_FRAMES].fill(silent);
        }
        let floor = out.iter().copied().fold(f32::NEG_INFINITY, f32::max) - 8.0;
        for v in &mut out {
            *v = (v.max(floor) + 4.0) / 4.0;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slaney_scale_round_trips_and_bends_at_one_kilohertz() {
        for hz in [0.0, 300.0, 999.0, 1000.0, 4321.0, 8000.0] {
            assert!((mel_to_hz(hz_to_mel(hz)) - hz).abs() < 1e-6, "{hz}");
        }
        assert!((hz_to_mel(1000.0) - 15.0).abs() < 1e-9);
    }

    #[test]
    fn silence_sits_at_the_floor_and_a_tone_lights_its_band() {
        let mel = Mel::new(80);
        let quiet = mel.window(&[]);
        assert!(quiet.iter().all(|&v| v == quiet[0]));
        // 1 s of 1 kHz: the band around 1 kHz (mel 15 of 0..45) is the loudest, and only
        // while the tone sounds.
        let tone: Vec<f32> = (0..16_000)
            .map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 16_000.0).sin() * 0.5)
            .collect();
        let out = mel.window(&tone);
        let band = |m: usize, frame: usize| out[m * N_FRAMES + frame];
        let loudest = (0..80)
            .max_by(|&a, &b| band(a, 50).total_cmp(&band(b, 50)))
            .unwrap();
        assert!((25..=29).contains(&loudest), "band {loudest}");
        assert!(band(loudest, 50) > band(loudest, 200) + 1.0);
    }

    #[test]
    fn each_filter_is_a_unit_area_triangle() {
        let f = filters(80, N_FFT, SAMPLE_RATE);
        assert_eq!(f.len(), 80 * 201);
        // Every band has weight somewhere, and each row's peak comes after the previous one's.
        let peaks: Vec<usize> = f
            .chunks(201)
            .map(|row| (0..201).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap())
            .collect();
        assert!(f.chunks(201).all(|row| row.iter().any(|&w| w > 0.0)));
        assert!(peaks.windows(2).all(|p| p[0] <= p[1]));
    }
}
