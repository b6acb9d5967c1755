//! Voice activity per 16 ms frame: the earshot neural detector, run only where the answer can
//! change a segmentation decision.
//!
//! earshot costs about 7-10 µs per frame (0.5 ms of CPU per second of audio, a third of what
//! decoding Opus costs). Most frames do not need it: digital or near silence while no utterance is
//! open cannot start one, and loud speech inside an open utterance cannot end it. The `Gated` mode
//! decides those frames from their energy alone and runs the detector on the rest: frames where
//! speech may start (energy above the floor while idle) or end (quiet frames inside an
//! utterance). Because earshot is recurrent, a run after skipped frames first replays the last few
//! frames from a small ring so its state has context again.

/// Samples per frame (earshot's frame: 16 ms at 16 kHz).
pub const FRAME: usize = 256;

/// Frames replayed into the detector after it skipped some (its recurrent state needs context).
const WARMUP: usize = 4;

/// Below this level (dBFS) a frame cannot open an utterance: it is not run while idle.
const QUIET_DBFS: f32 = -55.0;

/// At or above this level (dBFS) a frame inside an utterance counts as voice without the detector,
/// provided it is also `LOUD_OVER_NOISE_DB` above the tracked noise floor (so steady loud noise
/// still goes to the detector and can end the utterance).
const LOUD_DBFS: f32 = -35.0;
const LOUD_OVER_NOISE_DB: f32 = 20.0;

/// Inside an utterance, a pause shorter than this many frames counts as voice without the
/// detector: it cannot end the utterance (the silence needed is hundreds of milliseconds), and
/// at worst an utterance ends this much later than the detector alone would end it.
const SHORT_PAUSE_FRAMES: u32 = 4;

/// While idle, a frame less than this far above the noise floor is not run either.
const IDLE_OVER_NOISE_DB: f32 = 6.0;

/// The noise floor follows a quieter frame at once and rises by this much per frame otherwise
/// (about 3 dB per second).
const NOISE_RISE_DB: f32 = 0.05;

/// Which detector decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VadMode {
    /// earshot on every frame (the reference; about 0.5 ms of CPU per second of audio).
    Always,
    /// earshot only where a frame's energy leaves the decision open (default).
    #[default]
    Gated,
}

/// Counters of one detector, for benchmarks and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VadStats {
    pub frames: u64,
    /// Frames earshot ran on, replays included.
    pub predictions: u64,
}

/// One stream's voice activity detector.
pub struct Vad {
    mode: VadMode,
    detector: Box<earshot::Detector>,
    /// The last `WARMUP` frames, oldest first from `ring_next`.
    ring: [[i16; FRAME]; WARMUP],
    ring_next: usize,
    ring_len: usize,
    /// The detector ran on the previous frame (its state is current).
    in_step: bool,
    /// Consecutive frames inside an utterance that were not loud.
    quiet_run: u32,
    noise_dbfs: f32,
    last_score: f32,
    stats: VadStats,
}

impl Vad {
    pub fn new(mode: VadMode) -> Self {
        Self {
            mode,
            detector: earshot::Detector::default_boxed(),
            ring: [[0; FRAME]; WARMUP],
            ring_next: 0,
            ring_len: 0,
            in_step: false,
            quiet_run: 0,
            noise_dbfs: 0.0,
            last_score: 0.0,
            stats: VadStats::default(),
        }
    }

    pub fn stats(&self) -> VadStats {
        self.stats
    }

    /// The detector's most recent score (0..1), or 0/1 for frames decided by energy.
    pub fn last_score(&self) -> f32 {
        self.last_score
    }

    /// Whether `frame` is voice. `speaking`: an utterance is open (quiet frames may end it).
    pub fn is_voice(&mut self, frame: &[i16; FRAME], speaking: bool, threshold: f32) -> bool {
        self.stats.frames += 1;
        let voiced = match self.mode {
            VadMode::Always => self.predict(frame) >= threshold,
            VadMode::Gated => self.gated(frame, speaking, threshold),
        };
        self.remember(frame);
        voiced
    }

    fn gated(&mut self, frame: &[i16; FRAME], speaking: bool, threshold: f32) -> bool {
        let level = dbfs(frame);
        self.noise_dbfs = if level < self.noise_dbfs || self.stats.frames == 1 {
            level
        } else {
            self.noise_dbfs + NOISE_RISE_DB
        };
        if speaking {
            let loud = level >= LOUD_DBFS && level >= self.noise_dbfs + LOUD_OVER_NOISE_DB;
            self.quiet_run = if loud { 0 } else { self.quiet_run + 1 };
            if self.quiet_run <= SHORT_PAUSE_FRAMES {
                self.skip(1.0);
                return true;
            }
        } else {
            self.quiet_run = 0;
            if level < QUIET_DBFS || level < self.noise_dbfs + IDLE_OVER_NOISE_DB {
                self.skip(0.0);
                return false;
            }
        }
        if !self.in_step {
            self.warm_up();
        }
        self.predict(frame) >= threshold
    }

    fn skip(&mut self, score: f32) {
        self.in_step = false;
        self.last_score = score;
    }

    /// Resets the detector and replays the remembered frames so its state has recent context.
    fn warm_up(&mut self) {
        self.detector.reset();
        let first = (self.ring_next + WARMUP - self.ring_len) % WARMUP;
        for i in 0..self.ring_len {
            let frame = self.ring[(first + i) % WARMUP];
            self.stats.predictions += 1;
            self.detector.predict_i16(&frame);
        }
    }

    fn predict(&mut self, frame: &[i16; FRAME]) -> f32 {
        self.stats.predictions += 1;
        self.in_step = true;
        self.last_score = self.detector.predict_i16(frame);
        self.last_score
    }

    fn remember(&mut self, frame: &[i16; FRAME]) {
        self.ring[self.ring_next] = *frame;
        self.ring_next = (self.ring_next + 1) % WARMUP;
        self.ring_len = (self.ring_len + 1).min(WARMUP);
    }
}

/// Mean power of a frame in dB relative to full scale (-inf for digital silence is clamped).
fn dbfs(frame: &[i16; FRAME]) -> f32 {
    let energy: i64 = frame.iter().map(|&s| i64::from(s) * i64::from(s)).sum();
    let mean = energy as f32 / (FRAME as f32 * 32768.0 * 32768.0);
    10.0 * (mean + 1e-12).log10()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_of_full_scale_and_silence() {
        assert!(dbfs(&[i16::MAX; FRAME]).abs() < 0.01);
        assert!(dbfs(&[0; FRAME]) <= -119.0);
        let half: [i16; FRAME] = std::array::from_fn(|i| if i % 2 == 0 { 16384 } else { -16384 });
        assert!((dbfs(&half) + 6.02).abs() < 0.01);
    }

    #[test]
    fn silence_while_idle_never_runs_the_detector() {
        let mut vad = Vad::new(VadMode::Gated);
        for _ in 0..100 {
            assert!(!vad.is_voice(&[0; FRAME], false, 0.5));
        }
        assert_eq!(vad.stats().predictions, 0);
        let mut always = Vad::new(VadMode::Always);
        for _ in 0..100 {
            always.is_voice(&[0; FRAME], false, 0.5);
        }
        assert_eq!(always.stats().predictions, 100);
    }
}
