//! Which utterances of a streaming session are done: every utterance ends with a final
//! transcript, an empty final (the backend covered it and said nothing) or a counted loss.
//!
//! An ended utterance is covered when a final result reaches its end, starts after it, answers
//! a `Finalize` (`from_finalize`), or the backend closed normally after `CloseStream` (it has
//! flushed everything). It is lost when none of that happens within `final_timeout` of its end
//! or of the backend's last progress (a final result reaching further than any before: a
//! backend that lags behind real time but keeps finalizing earlier audio is late, not losing),
//! when it is pushed out of the window of remembered utterances, or when the session's flush
//! deadline passes.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// One utterance of the session.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Utt {
    pub id: u64,
    pub start: u64,
    pub end: Option<u64>,
    pub ended_at: Option<Instant>,
    /// Final results with text that overlapped it.
    pub finals: u32,
    pub done: bool,
}

/// What became of an utterance.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Outcome {
    /// Covered, with final text: nothing more to say; the latency since its end is observed.
    Final { ended_at: Instant },
    /// Covered without any final text: the client gets an empty final transcript.
    Empty {
        id: u64,
        start: u64,
        end: u64,
        ended_at: Instant,
    },
    /// Never covered.
    Lost { id: u64 },
}

/// The utterances remembered to attribute results to and to account for.
pub(super) struct Tracker {
    list: VecDeque<Utt>,
    cap: usize,
    /// The furthest end of a final result so far, and when it came.
    progress: Option<(u64, Instant)>,
}

impl Tracker {
    pub fn new(cap: usize) -> Self {
        Self {
            list: VecDeque::new(),
            cap: cap.max(1),
            progress: None,
        }
    }

    /// A new utterance; an unfinished one pushed out of the window is lost.
    pub fn started(&mut self, id: u64, start: u64, out: &mut Vec<Outcome>) {
        self.list.push_back(Utt {
            id,
            start,
            end: None,
            ended_at: None,
            finals: 0,
            done: false,
        });
        while self.list.len() > self.cap {
            let old = self.list.pop_front().expect("longer than the cap");
            if !old.done {
                out.push(Outcome::Lost { id: old.id });
            }
        }
    }

    pub fn ended(&mut self, id: u64, end: u64, now: Instant) {
        if let Some(u) = self.list.iter_mut().find(|u| u.id == id && u.end.is_none()) {
            u.end = Some(end.max(u.start));
            u.ended_at = Some(now);
        }
    }

    /// Ended utterances still waiting for their final result (their audio stays retained).
    pub fn waiting(&self) -> bool {
        self.list.iter().any(|u| !u.done && u.end.is_some())
    }

    /// Unfinished utterances, ended or not.
    #[cfg(test)]
    pub fn unfinished(&self) -> bool {
        self.list.iter().any(|u| !u.done)
    }

    /// A final result with text over `[start, end)`: every utterance it overlaps has words.
    pub fn final_text(&mut self, start: u64, end: u64) {
        for u in self.list.iter_mut() {
            let u_end = u.end.unwrap_or(u64::MAX);
            if u.start < end.max(start + 1) && start < u_end {
                u.finals += 1;
            }
        }
    }

    /// A final result over `[start, end)` covers the ended utterances it reaches or passes.
    pub fn covered(&mut self, start: u64, end: u64, out: &mut Vec<Outcome>) {
        self.resolve(out, |u| u.end.is_some_and(|e| e <= end || e <= start));
    }

    /// A `Finalize` answer covers the oldest ended utterance waiting (and any before it).
    pub fn finalize_answered(&mut self, out: &mut Vec<Outcome>) {
        if let Some(first) = self.list.iter().find(|u| !u.done && u.end.is_some()) {
            let id = first.id;
            let mut seen = false;
            self.resolve(out, |u| {
                let hit = !seen && u.end.is_some();
                seen |= u.id == id;
                hit
            });
        }
    }

    /// The backend flushed everything after `CloseStream`: every ended utterance is covered.
    pub fn flushed(&mut self, out: &mut Vec<Outcome>) {
        self.resolve(out, |u| u.end.is_some());
    }

    /// The backend flushed a connection cut at an utterance end whose audio went up to session
    /// sample `until`: the ended utterances within it are covered (later ones are not: their
    /// audio goes to the next connection).
    pub fn flushed_until(&mut self, until: u64, out: &mut Vec<Outcome>) {
        self.resolve(out, |u| u.end.is_some_and(|e| e <= until));
    }

    /// A final result reaching session sample `end` came at `now`: progress when it reaches
    /// further than any before.
    pub fn progressed(&mut self, end: u64, now: Instant) {
        if self.progress.is_none_or(|(furthest, _)| end > furthest) {
            self.progress = Some((end, now));
        }
    }

    /// Ended utterances that waited longer than `timeout` since their end and since the
    /// backend's last progress are lost.
    pub fn expire(&mut self, timeout: Duration, now: Instant, out: &mut Vec<Outcome>) {
        let progress = self.progress.map(|(_, at)| at);
        for u in self.list.iter_mut().filter(|u| !u.done) {
            if u.ended_at
                .map(|at| progress.map_or(at, |p| p.max(at)))
                .is_some_and(|at| now.duration_since(at) > timeout)
            {
                u.done = true;
                out.push(Outcome::Lost { id: u.id });
            }
        }
    }

    /// The session is over: whatever is unfinished is lost.
    pub fn give_up(&mut self, out: &mut Vec<Outcome>) {
        for u in self.list.iter_mut().filter(|u| !u.done) {
            u.done = true;
            out.push(Outcome::Lost { id: u.id });
        }
    }

    /// Marks the unfinished utterances `hit` selects as done, in order.
    fn resolve(&mut self, out: &mut Vec<Outcome>, mut hit: impl FnMut(&Utt) -> bool) {
        for u in self.list.iter_mut().filter(|u| !u.done) {
            if !hit(u) {
                continue;
            }
            u.done = true;
            let ended_at = u.ended_at.unwrap_or_else(Instant::now);
            out.push(if u.finals > 0 {
                Outcome::Final { ended_at }
            } else {
                Outcome::Empty {
                    id: u.id,
                    start: u.start,
                    end: u.end.unwrap_or(u.start),
                    ended_at,
                }
            });
        }
    }

    /// The utterance overlapping `[start, end)` most (else the last one, else 0).
    pub fn utterance_of(&self, start: u64, end: u64) -> u64 {
        let overlap = |u: &&Utt| {
            let e = u.end.unwrap_or(u64::MAX).min(end);
            e.saturating_sub(u.start.max(start))
        };
        self.list
            .iter()
            .filter(|u| overlap(u) > 0)
            .max_by_key(overlap)
            .or_else(|| self.list.back())
            .map_or(0, |u| u.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(out: &[Outcome]) -> Vec<String> {
        out.iter()
            .map(|o| match o {
                Outcome::Final { .. } => "final".to_owned(),
                Outcome::Empty { id, .. } => format!("empty {id}"),
                Outcome::Lost { id } => format!("lost {id}"),
            })
            .collect()
    }

    #[test]
    fn finals_cover_utterances_they_reach_or_pass() {
        let now = Instant::now();
        let mut t = Tracker::new(8);
        let mut out = Vec::new();
        t.started(0, 0, &mut out);
        t.ended(0, 100, now);
        t.started(1, 200, &mut out);
        t.ended(1, 300, now);
        t.final_text(0, 90);
        // Ends before utterance 0 does: nothing covered yet.
        t.covered(0, 90, &mut out);
        assert!(out.is_empty());
        // Starts after utterance 0 ended: 0 is covered (with words); 1 is not yet.
        t.covered(150, 190, &mut out);
        assert_eq!(ids(&out), ["final"]);
        assert!(t.waiting());
        t.flushed(&mut out);
        assert_eq!(ids(&out), ["final", "empty 1"], "no words for 1");
        assert!(!t.unfinished());
    }

    #[test]
    fn a_cut_connection_covers_only_the_utterances_it_carried() {
        let now = Instant::now();
        let mut t = Tracker::new(8);
        let mut out = Vec::new();
        for (id, s, e) in [(0, 0, 100), (1, 200, 300)] {
            t.started(id, s, &mut out);
            t.ended(id, e, now);
        }
        t.final_text(0, 100);
        t.flushed_until(150, &mut out);
        assert_eq!(ids(&out), ["final"]);
        assert!(t.waiting(), "1 ended after the cut");
        t.flushed_until(300, &mut out);
        assert_eq!(ids(&out), ["final", "empty 1"]);
    }

    #[test]
    fn a_finalize_answer_covers_the_oldest_waiting_utterance() {
        let now = Instant::now();
        let mut t = Tracker::new(8);
        let mut out = Vec::new();
        for (id, s, e) in [(0, 0, 100), (1, 200, 300)] {
            t.started(id, s, &mut out);
            t.ended(id, e, now);
        }
        t.finalize_answered(&mut out);
        assert_eq!(ids(&out), ["empty 0"]);
        t.finalize_answered(&mut out);
        assert_eq!(ids(&out), ["empty 0", "empty 1"]);
    }

    #[test]
    fn the_window_timeouts_and_the_end_count_losses() {
        let now = Instant::now();
        let mut t = Tracker::new(2);
        let mut out = Vec::new();
        t.started(0, 0, &mut out);
        t.started(1, 10, &mut out);
        t.started(2, 20, &mut out);
        assert_eq!(ids(&out), ["lost 0"], "pushed out of a window of 2");
        t.ended(1, 15, now);
        t.expire(
            Duration::from_secs(1),
            now + Duration::from_secs(2),
            &mut out,
        );
        assert_eq!(ids(&out), ["lost 0", "lost 1"]);
        t.give_up(&mut out);
        assert_eq!(ids(&out), ["lost 0", "lost 1", "lost 2"]);
        t.give_up(&mut out);
        assert_eq!(out.len(), 3, "each loss is counted once");
    }

    #[test]
    fn a_lagging_backend_that_keeps_finalizing_earlier_audio_loses_nothing() {
        let now = Instant::now();
        let s = Duration::from_secs;
        let mut t = Tracker::new(8);
        let mut out = Vec::new();
        t.started(0, 0, &mut out);
        t.ended(0, 16_000, now);
        // 20 s and 40 s after the end, finals for audio before it: the backend is behind.
        t.progressed(8_000, now + s(20));
        t.progressed(12_000, now + s(40));
        t.expire(s(30), now + s(60), &mut out);
        assert!(out.is_empty(), "still progressing: {:?}", ids(&out));
        // The same final again is no progress.
        t.progressed(12_000, now + s(65));
        t.expire(s(30), now + s(71), &mut out);
        assert_eq!(ids(&out), ["lost 0"], "no progress for 31 s");
    }

    #[test]
    fn results_go_to_the_utterance_they_overlap_most() {
        let mut t = Tracker::new(8);
        let mut out = Vec::new();
        t.started(4, 0, &mut out);
        t.ended(4, 100, Instant::now());
        t.started(5, 120, &mut out);
        assert_eq!(t.utterance_of(10, 90), 4);
        assert_eq!(t.utterance_of(90, 200), 5);
        assert_eq!(t.utterance_of(500, 600), 5, "open utterance runs on");
    }
}
