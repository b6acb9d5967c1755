//! Utterance segmentation in media time: voice activity on 16 ms frames (see `vad`), with onset,
//! pre-roll, hangover and a hard `max_utterance` limit. Positions are 16 kHz sample counts, never
//! wall time.

use crate::protocol::UtteranceReason;
use crate::vad::{Vad, VadMode, VadStats, FRAME};

/// Segmentation settings, in samples at 16 kHz.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmenterConfig {
    /// VAD score (0..1) at or above which a frame counts as voice. Default 0.5.
    pub threshold: f32,
    /// Consecutive voiced audio needed to open an utterance. Default 48 ms.
    pub min_speech_samples: u64,
    /// Silence that closes an utterance (hangover). Default 800 ms.
    pub silence_samples: u64,
    /// Audio before the detected onset included in the utterance. Default 300 ms.
    pub pre_roll_samples: u64,
    /// Longest utterance; at the limit it is finalized and a new one starts at the same sample.
    /// Default 60 s.
    pub max_utterance_samples: u64,
    /// Where the neural detector runs (default: only where a frame's energy leaves it open).
    pub vad: VadMode,
}

impl Default for SegmenterConfig {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            min_speech_samples: 768,
            silence_samples: 12_800,
            pre_roll_samples: 4_800,
            max_utterance_samples: 60 * 16_000,
            vad: VadMode::default(),
        }
    }
}

/// What the segmenter decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    Started {
        utterance: u64,
        /// First sample of the utterance (pre-roll included).
        start: u64,
    },
    Ended {
        utterance: u64,
        start: u64,
        /// One past the last sample of the utterance.
        end: u64,
        reason: UtteranceReason,
    },
}

#[derive(Debug, Clone, Copy)]
enum State {
    Idle,
    Speaking {
        utterance: u64,
        start: u64,
        last_voice_end: u64,
    },
}

/// The segmenter: constant memory (one VAD state and one frame).
pub struct Segmenter {
    cfg: SegmenterConfig,
    vad: Vad,
    frame: [i16; FRAME],
    fill: usize,
    /// Samples run through the VAD (a multiple of `FRAME`).
    framed: u64,
    /// End of the last utterance; the next one's pre-roll never reaches before it.
    last_end: u64,
    voiced_run: u64,
    next_utterance: u64,
    state: State,
}

impl Segmenter {
    /// New thresholds from now on; an open utterance stays open (and ends by the new rules).
    pub fn reconfigure(&mut self, cfg: SegmenterConfig) {
        self.cfg = cfg;
    }

    pub fn new(cfg: SegmenterConfig) -> Self {
        Self {
            vad: Vad::new(cfg.vad),
            cfg,
            frame: [0; FRAME],
            fill: 0,
            framed: 0,
            last_end: 0,
            voiced_run: 0,
            next_utterance: 0,
            state: State::Idle,
        }
    }

    /// A segmenter that continues a stream at sample `position` with utterance number
    /// `next_utterance` (a session resumed on another instance).
    pub fn starting_at(cfg: SegmenterConfig, position: u64, next_utterance: u64) -> Self {
        let mut s = Self::new(cfg);
        s.framed = position;
        s.last_end = position;
        s.next_utterance = next_utterance;
        s
    }

    /// Samples pushed so far (media time in samples).
    pub fn position(&self) -> u64 {
        self.framed + self.fill as u64
    }

    pub fn is_speaking(&self) -> bool {
        matches!(self.state, State::Speaking { .. })
    }

    /// Utterances started so far.
    pub fn utterances(&self) -> u64 {
        self.next_utterance
    }

    /// Most recent VAD score, for level/activity displays.
    pub fn last_score(&self) -> f32 {
        self.vad.last_score()
    }

    /// Frames seen and frames the neural detector ran on.
    pub fn vad_stats(&self) -> VadStats {
        self.vad.stats()
    }

    /// Feeds decoded 16 kHz mono samples; decisions are appended to `out`.
    pub fn push(&mut self, mut pcm: &[i16], out: &mut Vec<Segment>) {
        while !pcm.is_empty() {
            let take = (FRAME - self.fill).min(pcm.len());
            self.frame[self.fill..self.fill + take].copy_from_slice(&pcm[..take]);
            self.fill += take;
            pcm = &pcm[take..];
            if self.fill == FRAME {
                self.fill = 0;
                let voiced = self
                    .vad
                    .is_voice(&self.frame, self.is_speaking(), self.cfg.threshold);
                self.on_frame(voiced, out);
            }
        }
    }

    fn on_frame(&mut self, voiced: bool, out: &mut Vec<Segment>) {
        let frame_start = self.framed;
        self.framed += FRAME as u64;
        let now = self.framed;
        match self.state {
            State::Idle => {
                if voiced {
                    self.voiced_run += FRAME as u64;
                    if self.voiced_run >= self.cfg.min_speech_samples {
                        let onset = frame_start + FRAME as u64 - self.voiced_run;
                        let start = onset
                            .saturating_sub(self.cfg.pre_roll_samples)
                            .max(self.last_end);
                        self.open(start, now, out);
                    }
                } else {
                    self.voiced_run = 0;
                }
            }
            State::Speaking {
                utterance,
                start,
                last_voice_end,
            } => {
                let last_voice_end = if voiced { now } else { last_voice_end };
                self.state = State::Speaking {
                    utterance,
                    start,
                    last_voice_end,
                };
                if now - last_voice_end >= self.cfg.silence_samples {
                    self.close(now, UtteranceReason::Silence, out);
                } else if now - start >= self.cfg.max_utterance_samples {
                    let end = start + self.cfg.max_utterance_samples;
                    self.close(end, UtteranceReason::Limit, out);
                    // The stream goes on: the next utterance begins at the very next sample.
                    self.open(end, now, out);
                }
            }
        }
    }

    fn open(&mut self, start: u64, last_voice_end: u64, out: &mut Vec<Segment>) {
        let utterance = self.next_utterance;
        self.next_utterance += 1;
        self.state = State::Speaking {
            utterance,
            start,
            last_voice_end,
        };
        out.push(Segment::Started { utterance, start });
    }

    fn close(&mut self, end: u64, reason: UtteranceReason, out: &mut Vec<Segment>) {
        if let State::Speaking {
            utterance, start, ..
        } = self.state
        {
            out.push(Segment::Ended {
                utterance,
                start,
                end,
                reason,
            });
            self.last_end = end;
        }
        self.state = State::Idle;
        self.voiced_run = 0;
    }

    /// Ends the open utterance (if any) at the current position, e.g. on client `Finalize` or at
    /// close. Returns whether an utterance was open.
    pub fn finalize(&mut self, reason: UtteranceReason, out: &mut Vec<Segment>) -> bool {
        let open = self.is_speaking();
        let end = self.position();
        self.close(end, reason, out);
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A voiced-looking signal: a harmonic tone with a syllable-like envelope.
    fn tone(samples: usize, offset: usize) -> Vec<i16> {
        (0..samples)
            .map(|i| {
                let t = (i + offset) as f32 / 16_000.0;
                let env = 0.6 + 0.4 * (t * 2.0 * std::f32::consts::PI * 4.0).sin();
                let s = (t * 2.0 * std::f32::consts::PI * 180.0).sin()
                    + 0.5 * (t * 2.0 * std::f32::consts::PI * 360.0).sin()
                    + 0.3 * (t * 2.0 * std::f32::consts::PI * 720.0).sin();
                (s * env * 8000.0) as i16
            })
            .collect()
    }

    #[test]
    fn silence_opens_nothing() {
        let mut seg = Segmenter::new(SegmenterConfig::default());
        let mut out = Vec::new();
        seg.push(&vec![0; 16_000 * 5], &mut out);
        assert!(out.is_empty());
        assert_eq!(seg.position(), 80_000);
        assert!(!seg.finalize(UtteranceReason::Close, &mut out));
        assert!(out.is_empty());
    }

    #[test]
    fn limit_tiles_utterances_with_no_gap() {
        // Force every frame to count as voice so the limit is what ends utterances.
        let cfg = SegmenterConfig {
            threshold: -0.5,
            max_utterance_samples: 16_000,
            ..SegmenterConfig::default()
        };
        let mut seg = Segmenter::new(cfg);
        let mut out = Vec::new();
        for chunk in tone(16_000 * 5 + 123, 0).chunks(999) {
            seg.push(chunk, &mut out);
        }
        seg.finalize(UtteranceReason::Close, &mut out);
        let ends: Vec<_> = out
            .iter()
            .filter_map(|s| match *s {
                Segment::Ended {
                    start, end, reason, ..
                } => Some((start, end, reason)),
                _ => None,
            })
            .collect();
        assert!(ends.len() >= 5, "{ends:?}");
        for w in ends.windows(2) {
            assert_eq!(w[0].1, w[1].0, "utterances must tile: {ends:?}");
            assert_eq!(w[0].2, UtteranceReason::Limit);
            assert_eq!(w[0].1 - w[0].0, 16_000);
        }
        assert_eq!(ends.last().unwrap().1, 16_000 * 5 + 123);
        assert_eq!(ends.last().unwrap().2, UtteranceReason::Close);
    }

    #[test]
    fn output_is_independent_of_chunking() {
        let mut signal = vec![0i16; 16_000];
        signal.extend(tone(32_000, 0));
        signal.extend(vec![0i16; 32_000]);
        let run = |chunk: usize| {
            let mut seg = Segmenter::new(SegmenterConfig::default());
            let mut out = Vec::new();
            for c in signal.chunks(chunk) {
                seg.push(c, &mut out);
            }
            seg.finalize(UtteranceReason::Close, &mut out);
            out
        };
        let a = run(1);
        assert_eq!(a, run(320));
        assert_eq!(a, run(4096));
    }

    #[test]
    fn gated_detector_segments_like_the_full_one_for_a_fraction_of_the_runs() {
        let mut signal = vec![0i16; 16_000];
        for _ in 0..3 {
            signal.extend(tone(24_000, 0));
            signal.extend(vec![0i16; 20_000]);
        }
        let run = |vad: VadMode| {
            let mut seg = Segmenter::new(SegmenterConfig {
                vad,
                ..SegmenterConfig::default()
            });
            let mut out = Vec::new();
            for c in signal.chunks(640) {
                seg.push(c, &mut out);
            }
            seg.finalize(UtteranceReason::Close, &mut out);
            (out, seg.vad_stats())
        };
        let (always, full) = run(VadMode::Always);
        let (gated, cheap) = run(VadMode::Gated);
        assert_eq!(always.len(), 6, "{always:?}");
        assert_eq!(gated.len(), always.len(), "{gated:?} vs {always:?}");
        for (a, b) in always.iter().zip(&gated) {
            let (sa, sb) = match (a, b) {
                (Segment::Started { start: x, .. }, Segment::Started { start: y, .. }) => (*x, *y),
                (Segment::Ended { end: x, .. }, Segment::Ended { end: y, .. }) => (*x, *y),
                _ => panic!("{a:?} vs {b:?}"),
            };
            assert!(sa.abs_diff(sb) <= 4 * FRAME as u64, "{a:?} vs {b:?}");
        }
        assert_eq!(full.predictions, full.frames);
        assert!(cheap.predictions * 2 < cheap.frames, "{cheap:?}");
    }
}
