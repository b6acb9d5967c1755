//! The bounded input buffer shared by the push demuxers.
//!
//! Holds only the unparsed tail of the stream. Consumed bytes are dropped (compacted) on the next
//! feed, so each input byte is copied in once and moved at most once more. It never holds more
//! than its capacity (`Limits::max_pending_bytes`): `feed` takes only what fits, in slices of at
//! most [`FEED_SLICE`] bytes, so a caller that feeds a 2 MiB chunk still holds a few KiB.

/// Largest slice appended per `feed`: keeps the held bytes small when a big chunk arrives.
pub const FEED_SLICE: usize = 4096;

/// A bounded byte queue with an absolute stream offset.
#[derive(Debug, Default)]
pub struct PushBuffer {
    buf: Vec<u8>,
    pos: usize,
    /// Stream offset of `buf[pos]`.
    offset: u64,
    cap: usize,
    peak: usize,
}

impl PushBuffer {
    /// An empty buffer that will never hold more than `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            ..Self::default()
        }
    }

    /// Appends up to [`FEED_SLICE`] bytes of `chunk` that fit; returns how many were taken.
    pub fn feed(&mut self, chunk: &[u8]) -> usize {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() == 0 {
            // Room for a slice plus a typical unparsed tail at once, so a steady stream never
            // grows the buffer message by message (reserved on the first bytes: an idle session
            // holds none).
            self.buf.reserve_exact((2 * FEED_SLICE).min(self.cap));
        }
        let take = chunk.len().min(self.cap - self.buf.len()).min(FEED_SLICE);
        self.buf.extend_from_slice(&chunk[..take]);
        self.peak = self.peak.max(self.buf.len());
        take
    }

    /// Unparsed bytes.
    pub fn available(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Marks `n` available bytes consumed; returns the index where they start (for
    /// [`Self::consumed_slice`], valid until the next `feed`).
    pub fn consume(&mut self, n: usize) -> usize {
        debug_assert!(n <= self.buf.len() - self.pos, "consume past available");
        let start = self.pos;
        self.pos += n;
        self.offset += n as u64;
        start
    }

    /// Consumes up to `n` bytes; returns how many.
    pub fn consume_up_to(&mut self, n: usize) -> usize {
        let n = n.min(self.buf.len() - self.pos);
        self.consume(n);
        n
    }

    /// Bytes consumed by the last `consume` (still present until the next `feed`).
    pub fn consumed_slice(&self, start: usize, len: usize) -> &[u8] {
        &self.buf[start..start + len]
    }

    /// Absolute stream offset of the first unparsed byte.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Unparsed bytes held.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Most bytes held at once (including consumed bytes not yet compacted).
    pub fn peak(&self) -> usize {
        self.peak
    }

    /// True when no more bytes can be fed before some are consumed.
    pub fn is_full(&self) -> bool {
        self.pending() >= self.cap
    }
}
