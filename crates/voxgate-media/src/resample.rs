//! Streaming polyphase resampler to 16 kHz mono (windowed-sinc FIR, Kaiser window).
//!
//! Output sample `k` sits at input time `k * rate / 16000`, so the output is aligned with the
//! input (no added delay) and its length is `ceil(n * 16000 / rate)` after [`Resampler::finish`].
//! The output depends only on the input samples, never on how they were split into pushes.
//! Holds one filter's worth of history (≤ 2 × 48 input samples at 48 kHz).

use crate::OUTPUT_RATE;

/// Filter half-width in zero crossings of the lower of the two rates (as ffmpeg swr's 32-tap
/// default).
const ZERO_CROSSINGS: usize = 16;
/// Passband edge as a fraction of the lower Nyquist frequency.
const CUTOFF: f64 = 0.92;
/// Kaiser window shape: about 80 dB stopband.
const KAISER_BETA: f64 = 8.0;
/// Phase table size cap; rates whose ratio needs more phases round to the nearest phase.
const MAX_PHASES: u64 = 1024;

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Modified Bessel function of the first kind, order 0 (series), for the Kaiser window.
fn bessel_i0(x: f64) -> f64 {
    let (mut sum, mut term, mut k) = (1.0, 1.0, 1.0);
    while term > sum * 1e-12 {
        term *= (x / (2.0 * k)) * (x / (2.0 * k));
        sum += term;
        k += 1.0;
    }
    sum
}

/// Rate converter from one input rate to [`OUTPUT_RATE`], fed f32 mono samples.
#[derive(Debug)]
pub struct Resampler {
    /// Output step per input step as the fraction `up / down`.
    up: u64,
    down: u64,
    phases: u64,
    half: usize,
    /// `phases` rows of `2 * half` taps.
    taps: Vec<f32>,
    /// Input history; `hist[0]` is input index `base` (negative while the zero pre-pad is held).
    hist: Vec<f32>,
    base: i64,
    /// Input samples received.
    received: u64,
    /// Next output index.
    next: u64,
}

impl Resampler {
    /// A converter from `rate` Hz (any rate ≥ 1) to 16 kHz.
    pub fn new(rate: u32) -> Self {
        let g = gcd(u64::from(OUTPUT_RATE), u64::from(rate));
        let (up, down) = (u64::from(OUTPUT_RATE) / g, u64::from(rate) / g);
        let scale = (up as f64 / down as f64).min(1.0); // lower Nyquist / input Nyquist
        let half = (ZERO_CROSSINGS as f64 / scale).ceil() as usize;
        let phases = up.min(MAX_PHASES);
        let fc = CUTOFF * scale;
        let mut taps = Vec::with_capacity(phases as usize * 2 * half);
        for p in 0..phases {
            let frac = p as f64 / phases as f64;
            let row: Vec<f64> = (0..2 * half)
                .map(|j| {
                    // Tap j multiplies input index n - half + 1 + j; the output sits at n + frac.
                    let x = j as f64 - half as f64 + 1.0 - frac;
                    let sinc = if x == 0.0 {
                        1.0
                    } else {
                        (std::f64::consts::PI * fc * x).sin() / (std::f64::consts::PI * fc * x)
                    };
                    let r = x / half as f64;
                    let w = if r.abs() >= 1.0 {
                        0.0
                    } else {
                        bessel_i0(KAISER_BETA * (1.0 - r * r).sqrt()) / bessel_i0(KAISER_BETA)
                    };
                    fc * sinc * w
                })
                .collect();
            let sum: f64 = row.iter().sum();
            taps.extend(row.iter().map(|t| (t / sum) as f32));
        }
        let half_i = half as i64;
        Self {
            up,
            down,
            phases,
            half,
            taps,
            hist: vec![0.0; half - 1],
            base: -(half_i - 1),
            received: 0,
            next: 0,
        }
    }

    /// True when the rate is already 16 kHz (callers may bypass the filter).
    pub fn is_passthrough(&self) -> bool {
        self.up == self.down
    }

    /// Feeds input samples and appends every output sample that is now computable.
    pub fn process(&mut self, input: &[f32], out: &mut Vec<i16>) {
        self.hist.extend_from_slice(input);
        self.received += input.len() as u64;
        self.drain(self.received as i64, out);
    }

    /// Flushes: pads with zeros and emits the outputs up to `ceil(n * 16000 / rate)`.
    pub fn finish(&mut self, out: &mut Vec<i16>) {
        self.hist.extend(std::iter::repeat_n(0.0, self.half));
        self.drain(self.received as i64 + self.half as i64, out);
    }

    /// Emits outputs whose taps lie below input index `avail` and whose time is before the end.
    fn drain(&mut self, avail: i64, out: &mut Vec<i16>) {
        let taps_len = 2 * self.half;
        loop {
            let k = self.next;
            // Output k covers input time k * down / up; emit only times inside the input.
            if k * self.down >= self.received * self.up {
                break;
            }
            let n = (k * self.down / self.up) as i64;
            let rem = (k * self.down) % self.up;
            let (mut n, mut phase) = (n, rem * self.phases / self.up);
            if self.phases != self.up {
                phase = (rem * self.phases + self.up / 2) / self.up;
                if phase == self.phases {
                    phase = 0;
                    n += 1;
                }
            }
            let first = n - self.half as i64 + 1;
            if first + taps_len as i64 > avail {
                break;
            }
            let at = (first - self.base) as usize;
            let x = &self.hist[at..at + taps_len];
            let row = &self.taps[phase as usize * taps_len..(phase as usize + 1) * taps_len];
            let acc: f32 = x.iter().zip(row).map(|(a, b)| a * b).sum();
            out.push(to_i16(acc));
            self.next += 1;
        }
        // Keep only what the next output can still need.
        let n_next = (self.next * self.down / self.up) as i64;
        let keep_from = n_next - self.half as i64 + 1;
        let drop = (keep_from - self.base).clamp(0, self.hist.len() as i64) as usize;
        if drop > 0 {
            self.hist.drain(..drop);
            self.base += drop as i64;
        }
    }
}

/// Rounds and saturates a sample in i16 units.
pub fn to_i16(x: f32) -> i16 {
    x.round().clamp(-32768.0, 32767.0) as i16
}
