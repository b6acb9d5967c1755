//! Puts numbered media frames back in order within a bounded window. A frame that comes early
//! is held until the frames before it arrive; when more than `window` frames are held, the
//! missing ones are given up (reported as lost, for the caller to fill with silence) and the
//! held run is released. A frame whose slot was already given up (or a duplicate) is late.

use std::collections::BTreeMap;

use bytes::Bytes;

/// What the window releases, in stream order.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The next frame.
    Frame(Bytes),
    /// This many frames are missing here (given up).
    Lost(u64),
}

/// How a pushed frame was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Released at once (it was the next one).
    InOrder,
    /// Held until the frames before it arrive.
    Held,
    /// Its slot was given up, or it was already received: dropped.
    Late,
}

/// The reorder window of one stream.
#[derive(Debug)]
pub struct Reorder {
    next: Option<u64>,
    held: BTreeMap<u64, Bytes>,
    window: usize,
}

impl Reorder {
    pub fn new(window: usize) -> Self {
        Self {
            next: None,
            held: BTreeMap::new(),
            window: window.max(1),
        }
    }

    /// Takes frame `seq`, appending what it releases to `out`. Numbering starts at 0 or 1 (a
    /// first frame numbered higher waits for the ones before it).
    pub fn push(&mut self, seq: u64, frame: Bytes, out: &mut Vec<Step>) -> Taken {
        let next = *self.next.get_or_insert(seq.min(1));
        if seq < next || self.held.contains_key(&seq) {
            return Taken::Late;
        }
        let taken = if seq == next {
            Taken::InOrder
        } else {
            Taken::Held
        };
        self.held.insert(seq, frame);
        self.release(out);
        if self.held.len() > self.window {
            self.give_up_one(out);
        }
        taken
    }

    /// Releases everything held, the missing frames between as lost (at the end of a stream).
    pub fn drain(&mut self, out: &mut Vec<Step>) {
        while !self.held.is_empty() {
            self.give_up_one(out);
        }
    }

    /// Frames held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Gives up the frames missing before the first held one, then releases the run after it.
    fn give_up_one(&mut self, out: &mut Vec<Step>) {
        let (Some(next), Some((&first, _))) = (self.next, self.held.first_key_value()) else {
            return;
        };
        if first > next {
            out.push(Step::Lost(first - next));
        }
        self.next = Some(first);
        self.release(out);
    }

    fn release(&mut self, out: &mut Vec<Step>) {
        while let Some(next) = self.next {
            let Some(frame) = self.held.remove(&next) else {
                return;
            };
            out.push(Step::Frame(frame));
            self.next = Some(next.saturating_add(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    fn frames(out: &[Step]) -> Vec<String> {
        out.iter()
            .map(|s| match s {
                Step::Frame(b) => b[0].to_string(),
                Step::Lost(n) => format!("lost{n}"),
            })
            .collect()
    }

    #[test]
    fn early_frames_wait_for_the_ones_before_them() {
        let mut r = Reorder::new(4);
        let mut out = Vec::new();
        assert_eq!(r.push(2, f(2), &mut out), Taken::Held);
        assert_eq!(r.push(1, f(1), &mut out), Taken::InOrder);
        assert_eq!(r.push(4, f(4), &mut out), Taken::Held);
        assert_eq!(r.push(3, f(3), &mut out), Taken::InOrder);
        assert_eq!(frames(&out), ["1", "2", "3", "4"]);
        assert_eq!(r.push(3, f(3), &mut out), Taken::Late, "a duplicate");
    }

    #[test]
    fn a_full_window_gives_up_the_missing_frame_and_a_late_one_is_dropped() {
        let mut r = Reorder::new(2);
        let mut out = Vec::new();
        r.push(1, f(1), &mut out);
        r.push(3, f(3), &mut out);
        r.push(4, f(4), &mut out);
        assert_eq!(r.held(), 2);
        r.push(5, f(5), &mut out); // three held: 2 is given up
        assert_eq!(frames(&out), ["1", "lost1", "3", "4", "5"]);
        assert_eq!(r.push(2, f(2), &mut out), Taken::Late);
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn drain_releases_what_is_held_with_its_gaps() {
        let mut r = Reorder::new(8);
        let mut out = Vec::new();
        r.push(0, f(0), &mut out);
        r.push(3, f(3), &mut out);
        r.push(6, f(6), &mut out);
        r.drain(&mut out);
        assert_eq!(frames(&out), ["0", "lost2", "3", "lost2", "6"]);
    }
}
