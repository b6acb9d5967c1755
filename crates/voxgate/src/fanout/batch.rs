//! Audio batching for audio-bytes webhooks: contiguous batches of exactly `size` 16 kHz
//! samples, sample-aligned to the session's timeline. A gap in the timeline (audio dropped
//! upstream) closes the open batch early, so a batch never spans a gap; the partial rest is
//! sent at close. `size` 0 sends every chunk as it comes.
//!
//! The in-process webhook worker and the bus publisher both batch with this type, so the bus
//! carries one message per request the in-process webhook would have made.

/// One batch: `pcm` starts at session sample `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub start: u64,
    pub pcm: Vec<i16>,
}

/// Cuts a session's audio into batches of `size` samples.
#[derive(Debug, Clone)]
pub struct Batcher {
    size: usize,
    /// The open batch (shorter than `size`), starting at `start`.
    pcm: Vec<i16>,
    start: u64,
}

impl Batcher {
    /// Batches of `size` samples (`0`: every chunk is its own batch).
    pub fn new(size: usize) -> Self {
        Self {
            size,
            // Grows with the audio held (capped by the consumer's byte cap), never to `size`
            // up front: a long `delay_seconds` must not cost its whole batch at session start.
            pcm: Vec::new(),
            start: 0,
        }
    }

    /// No batch is open.
    pub fn is_empty(&self) -> bool {
        self.pcm.is_empty()
    }

    /// Adds `pcm` starting at session sample `start`; returns the batches it completes, in
    /// order (a batch closed by a gap comes first).
    pub fn push(&mut self, start: u64, pcm: &[i16]) -> Vec<Batch> {
        let mut ready = Vec::new();
        if self.size == 0 {
            ready.push(Batch {
                start,
                pcm: pcm.to_vec(),
            });
            return ready;
        }
        if !self.pcm.is_empty() && start != self.start + self.pcm.len() as u64 {
            ready.extend(self.finish());
        }
        if self.pcm.is_empty() {
            self.start = start;
        }
        self.pcm.extend_from_slice(pcm);
        while self.pcm.len() >= self.size {
            let rest = self.pcm.split_off(self.size);
            let full = std::mem::replace(&mut self.pcm, rest);
            ready.push(Batch {
                start: self.start,
                pcm: full,
            });
            self.start += self.size as u64;
        }
        ready
    }

    /// Closes the open batch (the partial rest at close, or before a gap).
    pub fn finish(&mut self) -> Option<Batch> {
        if self.pcm.is_empty() {
            return None;
        }
        Some(Batch {
            start: self.start,
            pcm: std::mem::take(&mut self.pcm),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(from: i16, n: usize) -> Vec<i16> {
        (0..n).map(|i| from + i as i16).collect()
    }

    fn shape(batches: &[Batch]) -> Vec<(u64, usize)> {
        batches.iter().map(|b| (b.start, b.pcm.len())).collect()
    }

    #[test]
    fn batches_are_exactly_size_samples_and_contiguous() {
        let mut b = Batcher::new(100);
        assert!(b.push(0, &ramp(0, 60)).is_empty());
        let out = b.push(60, &ramp(60, 60));
        assert_eq!(shape(&out), [(0, 100)]);
        assert_eq!(out[0].pcm, ramp(0, 100), "samples in order, none lost");
        let out = b.push(120, &ramp(120, 250));
        assert_eq!(shape(&out), [(100, 100), (200, 100)]);
        assert_eq!(out[1].pcm, ramp(200, 100));
        let rest = b.finish().expect("the partial rest");
        assert_eq!((rest.start, rest.pcm), (300, ramp(300, 70)));
    }

    #[test]
    fn a_gap_closes_the_batch_and_the_rest_goes_at_close() {
        let mut b = Batcher::new(100);
        assert!(b.push(0, &ramp(0, 30)).is_empty());
        // 20 samples dropped upstream: the open batch ends at 30, the next one starts at 50.
        let out = b.push(50, &ramp(50, 120));
        assert_eq!(shape(&out), [(0, 30), (50, 100)]);
        assert_eq!(out[1].pcm, ramp(50, 100));
        assert!(!b.is_empty());
        let rest = b.finish().expect("a partial batch is open");
        assert_eq!((rest.start, rest.pcm), (150, ramp(150, 20)));
        assert!(b.is_empty());
        assert_eq!(b.finish(), None, "nothing twice");
    }

    #[test]
    fn size_zero_sends_every_chunk_as_it_comes() {
        let mut b = Batcher::new(0);
        assert_eq!(shape(&b.push(0, &ramp(0, 320))), [(0, 320)]);
        assert_eq!(shape(&b.push(900, &ramp(0, 7))), [(900, 7)]);
        assert!(b.is_empty());
        assert_eq!(b.finish(), None);
    }

    #[test]
    fn a_chunk_ending_on_a_boundary_leaves_nothing_open() {
        let mut b = Batcher::new(160);
        assert_eq!(
            shape(&b.push(1000, &ramp(0, 320))),
            [(1000, 160), (1160, 160)]
        );
        assert!(b.is_empty());
        assert_eq!(shape(&b.push(1320, &ramp(0, 10))), []);
        assert_eq!(b.finish().map(|r| r.start), Some(1320));
    }
}
