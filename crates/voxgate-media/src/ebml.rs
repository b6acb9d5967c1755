//! Push-based EBML reader (RFC 8794).
//!
//! Accepts arbitrary byte chunks and yields element boundaries and leaf bodies as soon as they
//! are complete. It holds only the unparsed tail of the input ([`PushBuffer`]), never re-reads
//! consumed bytes, streams past skipped elements without buffering them, and checks every
//! declared size against [`Limits`] before it buffers a body. It never allocates by a declared
//! size. What an ID means (master, leaf, skip, garbage) is the caller's [`Schema`].

use crate::buffer::PushBuffer;
use crate::Limits;

/// Result of parsing a variable-length integer or header from a prefix of the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parse<T> {
    /// Parsed, using this many bytes.
    Done(T, usize),
    /// The prefix is valid so far; more bytes are needed.
    NeedMore,
    /// No valid encoding starts here.
    Invalid,
}

/// Reads an element ID (RFC 8794 §5): 1-4 bytes, marker bits kept, so Cluster is `0x1F43B675`.
pub fn read_id(buf: &[u8]) -> Parse<u32> {
    let Some(&first) = buf.first() else {
        return Parse::NeedMore;
    };
    let len = first.leading_zeros() as usize + 1;
    if len > 4 {
        return Parse::Invalid;
    }
    if buf.len() < len {
        return Parse::NeedMore;
    }
    let id = buf[..len]
        .iter()
        .fold(0u32, |acc, &b| (acc << 8) | u32::from(b));
    Parse::Done(id, len)
}

/// Reads an element data size (RFC 8794 §6): 1-8 bytes, marker stripped. All VINT_DATA bits set
/// means "unknown size" and gives `None`. A zero first byte is invalid.
pub fn read_size(buf: &[u8]) -> Parse<Option<u64>> {
    match read_vint(buf) {
        Parse::Done((value, all_ones), len) => Parse::Done((!all_ones).then_some(value), len),
        Parse::NeedMore => Parse::NeedMore,
        Parse::Invalid => Parse::Invalid,
    }
}

/// Reads a vint with the marker stripped; also says whether all data bits were set.
pub fn read_vint(buf: &[u8]) -> Parse<(u64, bool)> {
    let Some(&first) = buf.first() else {
        return Parse::NeedMore;
    };
    if first == 0 {
        return Parse::Invalid;
    }
    let len = first.leading_zeros() as usize + 1;
    if buf.len() < len {
        return Parse::NeedMore;
    }
    let mut value = u64::from(first) & (0xFF >> len);
    for &b in &buf[1..len] {
        value = (value << 8) | u64::from(b);
    }
    let all_ones = value == (1u64 << (7 * len)) - 1;
    Parse::Done((value, all_ones), len)
}

/// An element header: ID, size (`None` = unknown, RFC 8794 §6.2) and encoded header length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Element ID with marker bits.
    pub id: u32,
    /// Data size; `None` when all VINT_DATA bits are set: the element ends where an element
    /// that belongs to an ancestor begins.
    pub size: Option<u64>,
    /// Bytes taken by the ID and size fields.
    pub len: usize,
}

/// Reads an element header from the start of `buf`.
pub fn read_header(buf: &[u8]) -> Parse<Header> {
    let (id, id_len) = match read_id(buf) {
        Parse::Done(id, n) => (id, n),
        Parse::NeedMore => return Parse::NeedMore,
        Parse::Invalid => return Parse::Invalid,
    };
    match read_size(&buf[id_len..]) {
        Parse::Done(size, n) => Parse::Done(
            Header {
                id,
                size,
                len: id_len + n,
            },
            id_len + n,
        ),
        Parse::NeedMore => Parse::NeedMore,
        Parse::Invalid => Parse::Invalid,
    }
}

/// Big-endian unsigned integer element body (0-8 bytes).
pub fn read_uint(body: &[u8]) -> Option<u64> {
    (body.len() <= 8).then(|| body.iter().fold(0u64, |a, &b| (a << 8) | u64::from(b)))
}

/// Big-endian signed integer element body (0-8 bytes).
pub fn read_int(body: &[u8]) -> Option<i64> {
    if body.is_empty() {
        return Some(0);
    }
    let u = read_uint(body)?;
    let shift = 64 - 8 * body.len() as u32;
    Some(((u << shift) as i64) >> shift)
}

/// What an element ID means where it was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Enter it and report its children.
    Master,
    /// Buffer its body (bounded by `max_element_bytes`) and hand it over.
    Leaf,
    /// Stream past it without buffering.
    Skip,
    /// Not a child of the (unknown-size) parent: the parent ends here (RFC 8794 §6.2).
    EndsParent,
    /// Cannot be valid here: the input is corrupt.
    Invalid,
}

/// The caller's knowledge of the document type.
pub trait Schema {
    /// Meaning of `id` inside `parent` (`None` = top level).
    fn classify(&self, parent: Option<u32>, id: u32) -> Class;
    /// Whether a master with this ID may have an unknown size.
    fn may_be_unknown_size(&self, id: u32) -> bool;
}

/// Where a leaf body sits in the reader's buffer; read it with [`Reader::body`] before the next
/// [`Reader::feed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    start: usize,
    len: usize,
}

/// What the reader found next (`id` with marker bits; sizes in bytes).
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item {
    /// A master element was entered.
    Start { id: u32, size: Option<u64> },
    /// A master element ended (by its size, or by an element of an ancestor).
    End { id: u32 },
    /// A complete leaf element.
    Leaf { id: u32, body: Span },
    /// After [`Reader::resync`], the sync pattern was found; `skipped` bytes were dropped.
    Resynced { skipped: u64 },
}

/// Why the reader stopped. The caller decides whether to resync or fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadError {
    /// Bytes that cannot be a valid element here.
    Corrupt(&'static str),
    /// A declared size above a limit, or nesting deeper than `max_depth`.
    TooLarge(&'static str),
}

#[derive(Clone, Copy, Debug)]
struct Open {
    id: u32,
    /// Absolute stream offset where the element ends; `None` for unknown size.
    end: Option<u64>,
}

#[derive(Clone, Copy, Debug)]
enum State {
    Header,
    Body { id: u32, size: usize },
    Skip { remaining: u64 },
    Resync { skipped: u64 },
}

/// A resumable EBML reader over a bounded [`PushBuffer`].
#[derive(Debug)]
pub struct Reader<S> {
    input: PushBuffer,
    stack: Vec<Open>,
    state: State,
    schema: S,
    max_element: usize,
    max_depth: usize,
    sync: [u8; 4],
}

impl<S: Schema> Reader<S> {
    /// A reader that resyncs on `sync` (e.g. the Cluster ID bytes).
    pub fn new(schema: S, limits: &Limits, sync: [u8; 4]) -> Self {
        Self {
            input: PushBuffer::new(limits.max_pending_bytes),
            stack: Vec::new(),
            state: State::Header,
            schema,
            max_element: limits.max_element_bytes,
            max_depth: limits.max_depth,
            sync,
        }
    }

    /// Appends as much of `chunk` as fits and returns how many bytes were taken.
    pub fn feed(&mut self, chunk: &[u8]) -> usize {
        self.input.feed(chunk)
    }

    /// Unparsed bytes held.
    pub fn pending_bytes(&self) -> usize {
        self.input.pending()
    }

    /// Largest number of bytes held at once.
    pub fn peak_pending_bytes(&self) -> usize {
        self.input.peak()
    }

    /// IDs of the open masters, outermost first.
    pub fn open_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.stack.iter().map(|o| o.id)
    }

    /// True when input ended inside an element (a truncated trailing element).
    pub fn is_mid_element(&self) -> bool {
        self.input.pending() > 0 || matches!(self.state, State::Body { .. } | State::Skip { .. })
    }

    /// True while scanning for the sync pattern.
    pub fn is_resyncing(&self) -> bool {
        matches!(self.state, State::Resync { .. })
    }

    /// Bytes dropped so far by the current resync scan.
    pub fn resync_skipped(&self) -> u64 {
        match self.state {
            State::Resync { skipped } => skipped,
            _ => 0,
        }
    }

    /// Drops sync: keeps only the outermost master if it is `root` (else opens `root` with an
    /// unknown size) and scans forward for the sync pattern, starting one byte past the current
    /// position so the scan always progresses.
    pub fn resync(&mut self, root: u32) {
        match self.stack.first() {
            Some(o) if o.id == root => self.stack.truncate(1),
            _ => {
                self.stack.clear();
                self.stack.push(Open {
                    id: root,
                    end: None,
                });
            }
        }
        let dropped = self.input.consume_up_to(1) as u64;
        self.state = State::Resync { skipped: dropped };
    }

    /// Next item, `Ok(None)` when more input is needed. After an `Err`, call [`Self::resync`]
    /// or stop using the reader.
    pub fn next_item(&mut self) -> Result<Option<Item>, ReadError> {
        loop {
            if let Some(top) = self.stack.last() {
                if top.end.is_some_and(|end| self.input.offset() >= end) {
                    let id = top.id;
                    self.stack.pop();
                    return Ok(Some(Item::End { id }));
                }
            }
            match self.state {
                State::Resync { skipped } => return Ok(self.scan(skipped)),
                State::Skip { remaining } => {
                    let n = self
                        .input
                        .consume_up_to(remaining.min(usize::MAX as u64) as usize);
                    let remaining = remaining - n as u64;
                    if remaining > 0 {
                        self.state = State::Skip { remaining };
                        return Ok(None);
                    }
                    self.state = State::Header;
                }
                State::Body { id, size } => {
                    if self.input.available().len() < size {
                        return Ok(None);
                    }
                    self.state = State::Header;
                    let start = self.input.consume(size);
                    let body = Span { start, len: size };
                    return Ok(Some(Item::Leaf { id, body }));
                }
                State::Header => {
                    let header = match read_header(self.input.available()) {
                        Parse::Done(h, _) => h,
                        Parse::NeedMore => return Ok(None),
                        Parse::Invalid => return Err(ReadError::Corrupt("invalid EBML vint")),
                    };
                    if let Some(item) = self.on_header(header)? {
                        return Ok(Some(item));
                    }
                }
            }
        }
    }

    /// Decides what to do with a complete header at the current position.
    fn on_header(&mut self, h: Header) -> Result<Option<Item>, ReadError> {
        let parent = self.stack.last().copied();
        let class = self.schema.classify(parent.map(|p| p.id), h.id);
        if class == Class::EndsParent {
            return match parent {
                Some(p) if p.end.is_none() => {
                    self.stack.pop();
                    Ok(Some(Item::End { id: p.id }))
                }
                _ => Err(ReadError::Corrupt("element outside its parent")),
            };
        }
        if class == Class::Invalid {
            return Err(ReadError::Corrupt("unexpected element ID"));
        }
        let start = self.input.offset();
        let body_start = start + h.len as u64;
        if let (Some(size), Some(Open { end: Some(end), .. })) = (h.size, parent) {
            if body_start.checked_add(size).is_none_or(|e| e > end) {
                return Err(ReadError::Corrupt("element overruns its parent"));
            }
        }
        match class {
            Class::Master => {
                if h.size.is_none() && !self.schema.may_be_unknown_size(h.id) {
                    return Err(ReadError::Corrupt("unknown size not allowed here"));
                }
                if self.stack.len() >= self.max_depth {
                    return Err(ReadError::TooLarge("EBML nesting deeper than max_depth"));
                }
                self.input.consume(h.len);
                let end = h.size.map(|s| body_start + s);
                self.stack.push(Open { id: h.id, end });
                Ok(Some(Item::Start {
                    id: h.id,
                    size: h.size,
                }))
            }
            Class::Leaf => {
                let size = h.size.ok_or(ReadError::Corrupt("unknown-size leaf"))?;
                if size > self.max_element as u64 {
                    return Err(ReadError::TooLarge("element larger than max_element_bytes"));
                }
                self.input.consume(h.len);
                self.state = State::Body {
                    id: h.id,
                    size: size as usize,
                };
                Ok(None)
            }
            _ => {
                let size = h.size.ok_or(ReadError::Corrupt("unknown-size element"))?;
                self.input.consume(h.len);
                self.state = State::Skip { remaining: size };
                Ok(None)
            }
        }
    }

    /// Scans for the sync pattern, keeping at most 3 bytes between pushes.
    fn scan(&mut self, skipped: u64) -> Option<Item> {
        let avail = self.input.available();
        let found = avail.windows(4).position(|w| w == self.sync);
        let drop = match found {
            Some(i) => i,
            None => avail.len().saturating_sub(3),
        };
        self.input.consume(drop);
        let skipped = skipped + drop as u64;
        if found.is_some() {
            self.state = State::Header;
            Some(Item::Resynced { skipped })
        } else {
            self.state = State::Resync { skipped };
            None
        }
    }

    /// The body of a leaf returned by the last [`Self::next_item`] calls since the last feed.
    pub fn body(&self, span: Span) -> &[u8] {
        self.input.consumed_slice(span.start, span.len)
    }

    /// True when the buffer is full and the reader cannot progress without more room.
    pub fn is_stuck(&self) -> bool {
        self.input.is_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vints() {
        assert_eq!(
            read_id(&[0x1A, 0x45, 0xDF, 0xA3]),
            Parse::Done(0x1A45_DFA3, 4)
        );
        assert_eq!(read_id(&[0xA3]), Parse::Done(0xA3, 1));
        assert_eq!(read_id(&[0x1F, 0x43]), Parse::NeedMore);
        assert_eq!(read_id(&[0x08]), Parse::Invalid);
        assert_eq!(read_size(&[0x81]), Parse::Done(Some(1), 1));
        assert_eq!(read_size(&[0xFF]), Parse::Done(None, 1));
        assert_eq!(read_size(&[0x40, 0x02]), Parse::Done(Some(2), 2));
        assert_eq!(
            read_size(&[0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
            Parse::Done(None, 8)
        );
        assert_eq!(read_size(&[0x00]), Parse::Invalid);
        assert_eq!(read_size(&[0x01, 0]), Parse::NeedMore);
        assert_eq!(read_int(&[0xFF, 0xFE]), Some(-2));
        assert_eq!(read_uint(&[1, 0]), Some(256));
    }
}
