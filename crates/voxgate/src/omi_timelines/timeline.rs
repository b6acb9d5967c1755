//! Omi's `audio_timeline=2`: each `101` frame's timestamp is the capture time of its first
//! sample, and the listen side replays audio after a reconnect or a retry. `Timeline` places
//! each frame on the session's timeline (at the client's rate) and applies Omi's replay rules:
//! an exact replay is ignored, an overlap whose bytes match what was received is trimmed (the
//! new tail continues the run), an overlap whose bytes differ keeps the first data (fail
//! closed), and an overlap reaching before what is remembered cannot be verified: the overlap
//! is dropped and the new tail kept. What is remembered is the last `window` bytes received
//! (`omi.replay_window_seconds`): a bounded buffer, oldest bytes dropped first. Pure: no I/O.

use std::collections::VecDeque;

use bytes::Bytes;

/// What an overlapping frame was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Every sample was received already, with the same bytes.
    Exact,
    /// Its start was received with the same bytes; the rest is new.
    Trimmed,
    /// Its overlap differs from what was received: the first data is kept.
    Conflict,
    /// Its overlap reaches before what is remembered: dropped unverified.
    Unverifiable,
}

impl Replay {
    /// The `outcome` label of `voxgate_omi_replays_total`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Trimmed => "trimmed",
            Self::Conflict => "conflict",
            Self::Unverifiable => "unverifiable",
        }
    }
}

/// Where a frame went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// Samples (at the client's rate) missing before the new audio.
    pub gap: u64,
    /// The new audio to pass on (possibly empty).
    pub pcm: Bytes,
    /// Set when the frame overlapped what was received.
    pub replay: Option<Replay>,
}

/// The session's audio timeline in capture time.
#[derive(Debug)]
pub struct Timeline {
    rate: u32,
    /// Capture time of sample 0.
    origin: Option<f64>,
    /// Samples placed so far (received and gaps).
    end: u64,
    /// The last bytes received, contiguous up to `end`.
    window: VecDeque<u8>,
    cap: usize,
}

impl Timeline {
    /// A timeline at `rate` remembering the last `window_bytes` bytes.
    pub fn new(rate: u32, window_bytes: usize) -> Self {
        Self {
            rate,
            origin: None,
            end: 0,
            window: VecDeque::new(),
            cap: window_bytes,
        }
    }

    /// Runs closer than this are contiguous (Omi merges runs within 1 ms).
    fn tolerance(&self) -> u64 {
        u64::from(self.rate / 1000).max(1)
    }

    /// Places a frame of PCM16 `pcm` whose first sample was captured at `ts` (finite).
    pub fn place(&mut self, ts: f64, pcm: Bytes) -> Placed {
        let origin = *self.origin.get_or_insert(ts);
        // Untrusted floats: the cast saturates (a time before the origin is sample 0).
        let start = ((ts - origin) * f64::from(self.rate)).round().max(0.0) as u64;
        let tol = self.tolerance();
        if start + tol >= self.end {
            let gap = start.saturating_sub(self.end);
            let gap = if gap <= tol { 0 } else { gap };
            if gap > 0 {
                // Positions before a gap are no longer contiguous with what comes next.
                self.window.clear();
            }
            self.end += gap;
            self.accept(&pcm);
            return Placed {
                gap,
                pcm,
                replay: None,
            };
        }
        let overlap = ((self.end - start) as usize * 2).min(pcm.len());
        let remembered = (self.window.len() / 2) as u64;
        let replay = if start < self.end - remembered {
            Replay::Unverifiable
        } else {
            let at = (start - (self.end - remembered)) as usize * 2;
            let same = self
                .window
                .range(at..at + overlap)
                .eq(pcm[..overlap].iter());
            match (same, overlap == pcm.len()) {
                (true, true) => Replay::Exact,
                (true, false) => Replay::Trimmed,
                (false, _) => Replay::Conflict,
            }
        };
        let tail = pcm.slice(overlap..);
        self.accept(&tail);
        Placed {
            gap: 0,
            pcm: tail,
            replay: Some(replay),
        }
    }

    /// Capture time (unix seconds) of timeline sample 0, once a frame was placed.
    pub fn origin(&self) -> Option<f64> {
        self.origin
    }

    fn accept(&mut self, pcm: &[u8]) {
        self.end += pcm.len() as u64 / 2;
        self.window.extend(pcm);
        let over = self.window.len().saturating_sub(self.cap);
        // Whole samples only, so positions stay aligned.
        self.window.drain(..over + over % 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcm(from: u16, samples: u16) -> Bytes {
        (from..from + samples).flat_map(u16::to_le_bytes).collect()
    }

    const T0: f64 = 1_700_000_000.0;

    fn at(sample: u64) -> f64 {
        T0 + sample as f64 / 16_000.0
    }

    #[test]
    fn contiguous_frames_pass_and_a_late_one_is_a_gap() {
        let mut t = Timeline::new(16_000, 64_000);
        assert_eq!(t.place(T0, pcm(0, 1600)).gap, 0);
        // Within 1 ms of the end: contiguous.
        let p = t.place(at(1600) + 0.0005, pcm(1600, 1600));
        assert_eq!((p.gap, p.pcm.len(), p.replay), (0, 3200, None));
        let p = t.place(at(4000), pcm(4000, 100));
        assert_eq!(p.gap, 800);
    }

    #[test]
    fn replays_follow_omis_rules() {
        let mut t = Timeline::new(16_000, 64_000);
        t.place(T0, pcm(0, 3200));
        // The same frame again.
        let p = t.place(at(1600), pcm(1600, 1600));
        assert_eq!((p.replay, p.pcm.len()), (Some(Replay::Exact), 0));
        // A replay of the last 0.1 s that continues: the prefix is trimmed.
        let p = t.place(at(1600), pcm(1600, 3200));
        assert_eq!(p.replay, Some(Replay::Trimmed));
        assert_eq!(p.pcm, pcm(3200, 1600), "only the new tail");
        // Same start, different bytes: the first data is kept, the tail continues.
        let p = t.place(at(4000), pcm(9, 1000));
        assert_eq!(p.replay, Some(Replay::Conflict));
        assert_eq!(p.pcm.len(), 200 * 2);
        assert_eq!(t.end, 5000);
    }

    #[test]
    fn an_overlap_before_the_window_is_unverifiable_and_the_window_is_bounded() {
        let mut t = Timeline::new(16_000, 2000);
        t.place(T0, pcm(0, 3000));
        assert_eq!(t.window.len(), 2000);
        let p = t.place(at(1000), pcm(1000, 2500));
        assert_eq!(p.replay, Some(Replay::Unverifiable));
        assert_eq!(p.pcm, pcm(3000, 500), "the new tail is kept");
        // Inside the window it is verified again.
        let p = t.place(at(3000), pcm(3000, 500));
        assert_eq!(p.replay, Some(Replay::Exact));
    }
}
