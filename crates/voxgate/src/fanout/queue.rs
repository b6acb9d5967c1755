//! What every consumer handle shares: a bounded queue to its worker task with a byte cap, the
//! counters the handle and the task keep together (mirrored in the `voxgate_buffered_bytes`
//! gauge and the delivered/dropped counters under the consumer's kind), drop episodes (the
//! client is warned once per episode, not once per chunk) and the close by deadline.
//!
//! It never waits: `offer` and `send` are `try_send`; only `finish` awaits, bounded by the
//! session's close deadline, after which the task is aborted and what it held is counted as
//! dropped.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use metrics::counter;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use voxgate_session::ConsumerSummary;

use super::join_until;
use super::labels::{ConsumerKind, DropReason};
use crate::metrics::{buffered, dropped, DELIVERED_BYTES};

/// Counters shared between a consumer's handle (ingest side) and its task; every change of
/// held, delivered and dropped bytes is mirrored in the metrics under the consumer's kind.
#[derive(Debug)]
pub struct ConsumerStats {
    kind: ConsumerKind,
    delivered_bytes: AtomicU64,
    dropped_bytes: AtomicU64,
    requests: AtomicU64,
    /// Bytes accepted and not yet delivered or dropped.
    held_bytes: AtomicU64,
    /// Next request sequence number (webhooks, bus audio).
    next_seq: AtomicU64,
}

impl ConsumerStats {
    pub fn new(kind: ConsumerKind) -> Self {
        Self {
            kind,
            delivered_bytes: AtomicU64::new(0),
            dropped_bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            held_bytes: AtomicU64::new(0),
            next_seq: AtomicU64::new(0),
        }
    }

    pub fn kind(&self) -> ConsumerKind {
        self.kind
    }

    /// Bytes held now (accepted, neither delivered nor dropped yet).
    pub fn held(&self) -> u64 {
        self.held_bytes.load(Ordering::Relaxed)
    }

    /// Bytes accepted: held until released.
    pub fn hold(&self, bytes: u64) {
        if bytes > 0 {
            self.held_bytes.fetch_add(bytes, Ordering::Relaxed);
            buffered(self.kind.as_str(), bytes as i64);
        }
    }

    /// Held bytes that are no longer held (delivered, dropped or never needed).
    pub fn release(&self, bytes: u64) {
        if bytes > 0 {
            self.held_bytes.fetch_sub(bytes, Ordering::Relaxed);
            buffered(self.kind.as_str(), -(bytes as i64));
        }
    }

    pub fn delivered(&self, bytes: u64) {
        self.delivered_bytes.fetch_add(bytes, Ordering::Relaxed);
        if self.kind.delivers_audio() {
            counter!(DELIVERED_BYTES, "consumer" => self.kind.as_str()).increment(bytes);
        }
    }

    /// Counts bytes given up for `reason` (in the summary and `voxgate_dropped_bytes_total`).
    pub fn count_dropped(&self, reason: DropReason, bytes: u64) {
        if bytes > 0 {
            self.dropped_bytes.fetch_add(bytes, Ordering::Relaxed);
            dropped(self.kind.as_str(), reason.as_str(), bytes);
        }
    }

    /// One request made (an HTTP attempt, a transcription).
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_next_seq(&self, seq: u64) {
        self.next_seq.store(seq, Ordering::Relaxed);
    }

    /// At a close that timed out: counts every byte still held as dropped (`reason`) and takes
    /// it off the gauge. Returns the bytes.
    pub fn drop_held(&self, reason: DropReason) -> u64 {
        let held = self.forget_held();
        self.count_dropped(reason, held);
        held
    }

    /// Takes every byte still held off the gauge without counting it (the caller counted what
    /// was lost itself). Returns the bytes.
    pub fn forget_held(&self) -> u64 {
        let held = self.held_bytes.swap(0, Ordering::Relaxed);
        if held > 0 {
            buffered(self.kind.as_str(), -(held as i64));
        }
        held
    }

    pub fn summary(&self, name: &str) -> ConsumerSummary {
        ConsumerSummary {
            name: name.to_owned(),
            kind: self.kind.as_str().to_owned(),
            delivered_bytes: self.delivered_bytes.load(Ordering::Relaxed),
            dropped_bytes: self.dropped_bytes.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            next_seq: self.next_seq.load(Ordering::Relaxed),
        }
    }
}

/// Why the queue refused an item (each consumer maps it to its own drop reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Holding it would exceed the byte cap.
    OverCap,
    /// The queue has no room.
    Full,
    /// The worker is gone (or the queue was closed for the finish).
    Closed,
}

impl Refused {
    /// The usual reading: `buffer_full`, `queue_full`, `consumer_gone`.
    pub fn reason(self) -> DropReason {
        match self {
            Self::OverCap => DropReason::BufferFull,
            Self::Full => DropReason::QueueFull,
            Self::Closed => DropReason::ConsumerGone,
        }
    }
}

impl<T> From<mpsc::error::TrySendError<T>> for Refused {
    fn from(e: mpsc::error::TrySendError<T>) -> Self {
        match e {
            mpsc::error::TrySendError::Full(_) => Self::Full,
            mpsc::error::TrySendError::Closed(_) => Self::Closed,
        }
    }
}

/// How a consumer's close went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// The worker finished before the deadline.
    pub in_time: bool,
    /// Bytes still held at the deadline, counted as dropped (`close_timeout`).
    pub dropped: u64,
}

/// The ingest side of a consumer: a bounded queue to its worker task, under a byte cap.
pub struct QueueHandle<T> {
    tx: Option<mpsc::Sender<T>>,
    stats: Arc<ConsumerStats>,
    cap_bytes: u64,
    /// Items have been dropped since the last accepted one.
    dropping: bool,
    task: JoinHandle<()>,
}

impl<T: Send + 'static> QueueHandle<T> {
    /// Spawns `worker` on the receiving end of a queue of `items` (at least 1); at most
    /// `cap_bytes` may be held at once.
    pub fn spawn<F, Fut>(stats: Arc<ConsumerStats>, items: usize, cap_bytes: u64, worker: F) -> Self
    where
        F: FnOnce(mpsc::Receiver<T>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(items.max(1));
        Self {
            tx: Some(tx),
            stats,
            cap_bytes,
            dropping: false,
            task: tokio::spawn(worker(rx)),
        }
    }
}

impl<T> QueueHandle<T> {
    pub fn stats(&self) -> &Arc<ConsumerStats> {
        &self.stats
    }

    pub fn cap_bytes(&self) -> u64 {
        self.cap_bytes
    }

    /// Queues `item` weighing `bytes` if that keeps what is held under the cap. Accepted bytes
    /// are held until the worker releases them, and end a drop episode.
    pub fn offer(&mut self, item: T, bytes: u64) -> Result<(), Refused> {
        if self.stats.held() + bytes > self.cap_bytes {
            return Err(Refused::OverCap);
        }
        self.send(item)?;
        self.stats.hold(bytes);
        self.dropping = false;
        Ok(())
    }

    /// Holds `bytes` kept on the ingest side (not queued) if that keeps what is held under the
    /// cap; ends a drop episode.
    pub fn reserve(&mut self, bytes: u64) -> Result<(), Refused> {
        if self.stats.held() + bytes > self.cap_bytes {
            return Err(Refused::OverCap);
        }
        self.stats.hold(bytes);
        self.dropping = false;
        Ok(())
    }

    /// Queues `item` outside the byte cap (messages, or audio whose bytes are already held).
    pub fn send(&self, item: T) -> Result<(), Refused> {
        match &self.tx {
            Some(tx) => Ok(tx.try_send(item)?),
            None => Err(Refused::Closed),
        }
    }

    /// Counts `bytes` dropped for `reason`; true when this drop starts an episode (the first
    /// since the last accepted item), which is when the client is told.
    pub fn dropped(&mut self, reason: DropReason, bytes: u64) -> bool {
        self.stats.count_dropped(reason, bytes);
        let first = !self.dropping;
        self.dropping = true;
        first
    }

    /// Closes the queue and lets the worker finish until `deadline`; past it the worker is
    /// aborted. Returns whether it finished in time. Held bytes are left to the caller.
    pub async fn close(&mut self, deadline: Instant) -> bool {
        self.tx.take();
        join_until(&mut self.task, deadline).await
    }

    /// `close`, then what is still held past the deadline is counted as dropped
    /// (`close_timeout`).
    pub async fn finish(&mut self, deadline: Instant) -> Finished {
        let in_time = self.close(deadline).await;
        let dropped = if in_time {
            0
        } else {
            self.stats.drop_held(DropReason::CloseTimeout)
        };
        Finished { in_time, dropped }
    }

    pub fn summary(&self, name: &str) -> ConsumerSummary {
        self.stats.summary(name)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A worker that takes one item, then stalls (a backend that stopped answering).
    fn stalled(stats: &Arc<ConsumerStats>, items: usize, cap: u64) -> QueueHandle<u64> {
        QueueHandle::spawn(stats.clone(), items, cap, |mut rx| async move {
            let _ = rx.recv().await;
            std::future::pending::<()>().await;
        })
    }

    #[tokio::test(start_paused = true)]
    async fn the_byte_cap_refuses_what_would_exceed_it() {
        let stats = Arc::new(ConsumerStats::new(ConsumerKind::Webhook));
        let mut q = stalled(&stats, 16, 100);
        assert_eq!(q.offer(1, 60), Ok(()));
        assert_eq!(q.offer(2, 40), Ok(()), "exactly at the cap is accepted");
        assert_eq!(q.offer(3, 1), Err(Refused::OverCap));
        assert_eq!(stats.held(), 100);
        stats.release(50);
        assert_eq!(q.offer(4, 50), Ok(()));
        assert_eq!(q.reserve(1), Err(Refused::OverCap));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_and_a_drop_episode_is_first_once() {
        let stats = Arc::new(ConsumerStats::new(ConsumerKind::Stt));
        let mut q = QueueHandle::spawn(stats.clone(), 1, 1000, |rx| async move {
            let _rx = rx; // never reads
            std::future::pending::<()>().await;
        });
        assert_eq!(q.offer(1, 10), Ok(()));
        assert_eq!(q.offer(2, 10), Err(Refused::Full));
        assert_eq!(stats.held(), 10, "a refused item is not held");
        assert!(
            q.dropped(DropReason::QueueFull, 10),
            "the first drop starts an episode"
        );
        assert!(!q.dropped(DropReason::QueueFull, 10));
        assert!(!q.dropped(DropReason::BufferFull, 10));
        assert!(q.reserve(5).is_ok(), "accepting ends the episode");
        assert!(q.dropped(DropReason::QueueFull, 10));
        assert_eq!(q.summary("s").dropped_bytes, 40);
        assert_eq!(q.summary("s").kind, "stt");
    }

    #[tokio::test(start_paused = true)]
    async fn finish_past_the_deadline_counts_what_is_held_as_dropped() {
        let stats = Arc::new(ConsumerStats::new(ConsumerKind::Webhook));
        let mut q = stalled(&stats, 16, 1000);
        q.offer(1, 300).unwrap();
        q.offer(2, 200).unwrap();
        let done = q.finish(Instant::now() + Duration::from_secs(5)).await;
        assert_eq!(
            done,
            Finished {
                in_time: false,
                dropped: 500
            }
        );
        assert_eq!(stats.held(), 0);
        let s = q.summary("w");
        assert_eq!((s.dropped_bytes, s.delivered_bytes), (500, 0));
        assert_eq!(q.send(3), Err(Refused::Closed), "closed after finish");
    }

    #[tokio::test(start_paused = true)]
    async fn finish_in_time_leaves_the_counts_to_the_worker() {
        let stats = Arc::new(ConsumerStats::new(ConsumerKind::Bus));
        let worker_stats = stats.clone();
        let mut q = QueueHandle::spawn(stats.clone(), 4, 1000, |mut rx| async move {
            while let Some(bytes) = rx.recv().await {
                worker_stats.release(bytes);
                worker_stats.delivered(bytes);
            }
        });
        q.offer(100, 100).unwrap();
        let done = q.finish(Instant::now() + Duration::from_secs(1)).await;
        assert_eq!(
            done,
            Finished {
                in_time: true,
                dropped: 0
            }
        );
        let s = q.summary("bus");
        assert_eq!(
            (s.delivered_bytes, s.dropped_bytes, s.kind.as_str()),
            (100, 0, "bus")
        );
    }
}
