//! Omi reconnects: the `audio_timeline=2` timelines kept between sockets, so a listen side
//! that reconnects and replays its last seconds continues the same timeline (its replay checked
//! against what was received before) and the same recording instead of storing it twice.
//!
//! A timeline is keyed by (owner, uid, conversation id at the socket's first audio frame): the
//! owner is the token's user, so one user cannot continue another's. A session holds its
//! timeline while it runs (`Hold`); when it ends the timeline is released and may be taken by a
//! reconnect for `omi.reconnect_seconds`. A newer socket of the same key takes a timeline that
//! is still held (Omi's listen side has one socket per user; the older one is a dead socket
//! whose server side has not noticed yet): the older session's later frames are ignored
//! (counted). The ledger holds at most `omi.reconnect_timelines_max` timelines; when full,
//! expired ones are pruned, and if none had expired the new session keeps a private timeline
//! (`full`, counted) rather than forgetting another's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::timeline::Timeline;

/// (owner, uid, conversation id or empty).
pub type Key = (String, String, String);

/// One timeline between sockets.
#[derive(Debug)]
pub struct Slot {
    pub timeline: Timeline,
    /// The session id the recording is kept under (the first socket's).
    pub recording_id: String,
    /// Where the recording ends, in 16 kHz samples of its timeline.
    pub record_end: u64,
    /// The session holding it (its generation).
    holder: u64,
    /// When its holder released it (`None` while held).
    released: Option<Instant>,
}

/// What a checkout found (the `outcome` label of `voxgate_omi_timelines_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No timeline under the key (or only an expired one): a new one.
    Fresh,
    /// A released timeline continued by a reconnect.
    Continued,
    /// A timeline still held by an older socket, taken over.
    TookOver,
    /// The ledger is full of live timelines: a private one, not kept for reconnects.
    Full,
}

impl Outcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::Continued => "continued",
            Self::TookOver => "took_over",
            Self::Full => "full",
        }
    }
}

/// The timelines kept between sockets.
pub struct Ledger {
    max: usize,
    expiry: Duration,
    map: Mutex<HashMap<Key, Arc<Mutex<Slot>>>>,
    generation: AtomicU64,
}

/// A session's hold on its timeline; released on drop.
#[derive(Debug)]
pub struct Hold {
    slot: Arc<Mutex<Slot>>,
    generation: u64,
}

fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    slot.lock().expect("a timeline slot lock is never poisoned")
}

impl Ledger {
    pub fn new(max: usize, expiry: Duration) -> Self {
        Self {
            max,
            expiry,
            map: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(1),
        }
    }

    /// The timeline under `key` for a new session, or a new one from `fresh` (the recording id
    /// of a new timeline is `recording_id`). `None` with `Outcome::Full`.
    pub fn checkout(
        &self,
        key: Key,
        recording_id: &str,
        fresh: impl FnOnce() -> Timeline,
        now: Instant,
    ) -> (Option<Hold>, Outcome) {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let mut map = self.map.lock().expect("the ledger lock is never poisoned");
        let expired = |s: &Slot| s.released.is_some_and(|at| now >= at + self.expiry);
        if let Some(slot) = map.get(&key) {
            let mut s = lock(slot);
            if !expired(&s) {
                let outcome = match s.released {
                    Some(_) => Outcome::Continued,
                    None => Outcome::TookOver,
                };
                s.holder = generation;
                s.released = None;
                drop(s);
                let slot = slot.clone();
                return (Some(Hold { slot, generation }), outcome);
            }
        }
        map.retain(|_, s| !expired(&lock(s)));
        if map.len() >= self.max && !map.contains_key(&key) {
            return (None, Outcome::Full);
        }
        let slot = Arc::new(Mutex::new(Slot {
            timeline: fresh(),
            recording_id: recording_id.to_owned(),
            record_end: 0,
            holder: generation,
            released: None,
        }));
        map.insert(key, slot.clone());
        (Some(Hold { slot, generation }), Outcome::Fresh)
    }

    /// Timelines kept (held or released, not yet pruned).
    pub fn len(&self) -> usize {
        self.map
            .lock()
            .expect("the ledger lock is never poisoned")
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Hold {
    /// Runs `f` on the timeline while this session holds it; `None` once a newer socket took it.
    pub fn with<R>(&self, f: impl FnOnce(&mut Slot) -> R) -> Option<R> {
        let mut s = lock(&self.slot);
        (s.holder == self.generation).then(|| f(&mut s))
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut s = lock(&self.slot);
        if s.holder == self.generation {
            s.released = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(conv: &str) -> Key {
        ("ann".into(), "u1".into(), conv.into())
    }

    fn timeline() -> Timeline {
        Timeline::new(16_000, 1000)
    }

    #[test]
    fn a_released_timeline_is_continued_until_it_expires() {
        let ledger = Ledger::new(8, Duration::from_secs(60));
        let t0 = Instant::now();
        let (hold, outcome) = ledger.checkout(key("c"), "s1", timeline, t0);
        assert_eq!(outcome, Outcome::Fresh);
        hold.as_ref().unwrap().with(|s| s.record_end = 42).unwrap();
        drop(hold);
        let (hold, outcome) = ledger.checkout(key("c"), "s2", timeline, t0);
        assert_eq!(outcome, Outcome::Continued);
        let (id, end) = hold
            .as_ref()
            .unwrap()
            .with(|s| (s.recording_id.clone(), s.record_end))
            .unwrap();
        assert_eq!(
            (id.as_str(), end),
            ("s1", 42),
            "the first socket's recording"
        );
        // Another conversation, or another owner, is another timeline.
        assert_eq!(
            ledger.checkout(key("d"), "s3", timeline, t0).1,
            Outcome::Fresh
        );
        let other = ("bob".into(), "u1".into(), "c".into());
        assert_eq!(ledger.checkout(other, "s4", timeline, t0).1, Outcome::Fresh);
        drop(hold);
        let late = Instant::now() + Duration::from_secs(61);
        assert_eq!(
            ledger.checkout(key("c"), "s5", timeline, late).1,
            Outcome::Fresh
        );
    }

    #[test]
    fn a_newer_socket_takes_over_and_the_older_is_ignored() {
        let ledger = Ledger::new(8, Duration::from_secs(60));
        let now = Instant::now();
        let (old, _) = ledger.checkout(key("c"), "s1", timeline, now);
        let (new, outcome) = ledger.checkout(key("c"), "s2", timeline, now);
        assert_eq!(outcome, Outcome::TookOver);
        let old = old.unwrap();
        assert!(old.with(|_| ()).is_none(), "superseded");
        drop(old);
        assert!(
            new.unwrap().with(|_| ()).is_some(),
            "still held by the newer"
        );
    }

    #[test]
    fn the_ledger_is_bounded_and_prunes_expired_timelines() {
        let ledger = Ledger::new(2, Duration::from_secs(10));
        let now = Instant::now();
        let (a, _) = ledger.checkout(key("a"), "s", timeline, now);
        let (b, _) = ledger.checkout(key("b"), "s", timeline, now);
        let (c, outcome) = ledger.checkout(key("c"), "s", timeline, now);
        assert_eq!((c.is_none(), outcome), (true, Outcome::Full), "both held");
        drop((a, b));
        let (_c, outcome) = ledger.checkout(key("c"), "s", timeline, now);
        assert_eq!(outcome, Outcome::Full, "released but not expired");
        let later = Instant::now() + Duration::from_secs(11);
        let (_c, outcome) = ledger.checkout(key("c"), "s", timeline, later);
        assert_eq!(outcome, Outcome::Fresh);
        assert_eq!(ledger.len(), 1, "the expired two were pruned");
    }
}
