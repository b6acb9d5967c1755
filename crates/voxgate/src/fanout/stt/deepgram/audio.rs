//! The audio a streaming session keeps for (re)sending: sent or not, capped, trimmed to the
//! lookback while idle, forgotten once a final result covers it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::SinkExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use voxgate_session::AudioChunk;

use super::conn::Conn;
use crate::fanout::queue::ConsumerStats;
use crate::fanout::{pcm_bytes, DropReason};

/// Audio kept for (re)sending.
struct Held {
    chunk: AudioChunk,
    /// Sent on some connection (counted as delivered once).
    sent: bool,
}

/// The retained audio of one session and backend.
pub(super) struct Retained {
    held: VecDeque<Held>,
    stats: Arc<ConsumerStats>,
    /// Bytes accepted by the handle and not yet sent (shared with it).
    unsent: Arc<AtomicU64>,
    cap_bytes: u64,
    lookback: u64,
}

impl Retained {
    pub fn new(
        stats: Arc<ConsumerStats>,
        unsent: Arc<AtomicU64>,
        cap_bytes: u64,
        lookback: u64,
    ) -> Self {
        Self {
            held: VecDeque::new(),
            stats,
            unsent,
            cap_bytes,
            lookback,
        }
    }

    pub fn push(&mut self, chunk: AudioChunk) {
        self.held.push_back(Held { chunk, sent: false });
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether audio was accepted that was never sent.
    pub fn has_unsent(&self) -> bool {
        self.unsent.load(Ordering::Relaxed) > 0 && !self.held.is_empty()
    }

    /// Sends held chunk `i` on `c`; `Err` when the connection is lost.
    pub async fn send(&mut self, c: &mut Conn, i: usize) -> Result<(), ()> {
        let held = &mut self.held[i];
        let chunk = &held.chunk;
        if c.next_session != Some(chunk.start) {
            c.map.push((c.pos, chunk.start));
            if c.map.len() > 256 {
                c.map.remove(0);
            }
        }
        c.sink
            .send(Message::Binary(pcm_bytes(&chunk.pcm).into()))
            .await
            .map_err(|_| ())?;
        c.pos += chunk.pcm.len() as u64;
        c.next_session = Some(chunk.start + chunk.pcm.len() as u64);
        c.sent_until = chunk.start + chunk.pcm.len() as u64;
        c.last_send = Instant::now();
        if !held.sent {
            held.sent = true;
            let bytes = chunk.pcm.len() as u64 * 2;
            self.unsent.fetch_sub(bytes, Ordering::Relaxed);
            self.stats.delivered(bytes);
        }
        Ok(())
    }

    /// Sends everything held on a new connection.
    pub async fn resend(&mut self, c: &mut Conn) -> Result<(), ()> {
        for i in 0..self.held.len() {
            self.send(c, i).await?;
        }
        Ok(())
    }

    /// Keeps memory within bounds: idle, only the lookback; always, within the cap (sent audio
    /// is forgotten first, then unsent audio is dropped, counted).
    pub fn trim(&mut self, idle: bool) {
        let mut total: u64 = self.held.iter().map(|h| h.chunk.pcm.len() as u64).sum();
        // A `SpeechStarted` decided in the newest chunk reaches back at most `lookback` before it.
        let last = self.held.back().map_or(0, |h| h.chunk.pcm.len() as u64);
        while let Some(front) = self.held.front() {
            let len = front.chunk.pcm.len() as u64;
            let over_lookback = idle && self.held.len() > 1 && total - len - last >= self.lookback;
            let over_cap =
                total * 2 > self.cap_bytes * 3 / 4 && (front.sent || total * 2 > self.cap_bytes);
            if !(over_lookback || over_cap) {
                break;
            }
            let h = self.held.pop_front().expect("front exists");
            total -= len;
            let bytes = len * 2;
            if !h.sent {
                self.unsent.fetch_sub(bytes, Ordering::Relaxed);
                self.stats
                    .count_dropped(DropReason::BackendUnavailable, bytes);
            }
            self.stats.release(bytes);
        }
    }

    /// Forgets retained audio that a final result covered (up to session sample `end`).
    pub fn acknowledge(&mut self, end: u64) {
        while let Some(front) = self.held.front() {
            if !front.sent || front.chunk.start + front.chunk.pcm.len() as u64 > end {
                break;
            }
            let h = self.held.pop_front().expect("front exists");
            self.stats.release(h.chunk.pcm.len() as u64 * 2);
        }
    }

    /// At the end: what was never sent is dropped (counted), the rest was delivered.
    pub fn clear(&mut self) {
        let bytes = |h: &Held| h.chunk.pcm.len() as u64 * 2;
        let unsent: u64 = self.held.iter().filter(|h| !h.sent).map(bytes).sum();
        let held: u64 = self.held.iter().map(bytes).sum();
        self.held.clear();
        self.unsent.fetch_sub(unsent, Ordering::Relaxed);
        self.stats.count_dropped(DropReason::NotSent, unsent);
        self.stats.release(held);
    }
}
