//! The single-producer/single-consumer byte stream of one ordered pair of
//! ranks, and the framing of messages on it.
//!
//! The ring carries an endless byte stream; `head` counts bytes the producer
//! has written since the segment was created, `tail` bytes the consumer has
//! read. Positions wrap with a mask, counters never wrap in practice (u64).
//! A message is a 16-byte frame header (tag, length; native endian, both
//! ends are on one host) followed by its bytes. Nothing else is framed: a
//! message larger than the ring simply streams through it, the producer
//! waiting for space and the consumer for data, so the ring size bounds
//! memory, not message size.
//!
//! Memory ordering, the two pairs that make this correct:
//! - producer: copy bytes, then `head.store(Release)`; consumer:
//!   `head.load(Acquire)`, then copy bytes out. The consumer never reads
//!   bytes before they are complete.
//! - consumer: copy bytes out, then `tail.store(Release)`; producer:
//!   `tail.load(Acquire)`, then overwrite. The producer never overwrites bytes
//!   still being read.
//!
//! Each side keeps its own counter in private memory and only publishes it,
//! so the only values taken from the segment are the other side's counter;
//! one that claims more than a ring's worth of bytes (or fewer than none) is
//! a protocol error, as is a frame length above the configured maximum.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;

use super::segment::RingView;

const FRAME_HEADER_LEN: usize = 16;

/// Producer side of one ring; lives behind the sender's per-destination lock.
pub(crate) struct TxState {
    head: u64,
    /// Set when a message was cut off midway (timeout, lost peer): the
    /// stream is then out of frame and nothing more can be sent on it.
    pub(crate) broken: Option<String>,
}

impl TxState {
    pub(crate) fn new() -> Self {
        Self {
            head: 0,
            broken: None,
        }
    }

    /// Writes as much of `bytes` as fits and publishes it; returns how many
    /// bytes went in, or a reason when the consumer's counter is garbage.
    pub(crate) fn write_some(
        &mut self,
        ring: &RingView<'_>,
        bytes: &[u8],
    ) -> Result<usize, String> {
        // Acquire: pairs with the consumer's Release store of `tail`, so its
        // reads of the bytes we are about to overwrite are complete.
        let tail = ring.tail.load(Ordering::Acquire);
        let used = self.head.wrapping_sub(tail);
        let cap = ring.capacity();
        if used > cap {
            return Err(format!(
                "consumer counter {tail} is inconsistent with producer counter {}",
                self.head
            ));
        }
        let n = bytes.len().min((cap - used) as usize);
        if n > 0 {
            ring.write_at(self.head, &bytes[..n]);
            self.head += n as u64;
            // Release: pairs with the consumer's Acquire load of `head`; the
            // bytes just copied are visible before the new count.
            ring.head.store(self.head, Ordering::Release);
        }
        Ok(n)
    }
}

/// The frame header for a message.
pub(crate) fn frame_header(tag: u64, len: usize) -> [u8; FRAME_HEADER_LEN] {
    let mut header = [0; FRAME_HEADER_LEN];
    header[..8].copy_from_slice(&tag.to_ne_bytes());
    header[8..].copy_from_slice(&(len as u64).to_ne_bytes());
    header
}

/// Consumer side of one ring plus the messages already taken off it, by tag;
/// lives behind the receiver's per-source lock.
pub(crate) struct RxState {
    tail: u64,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    partial: Option<Partial>,
    queues: HashMap<u64, VecDeque<Vec<u8>>>,
    /// Set once the peer broke the protocol: the stream cannot be re-framed,
    /// so every later receive from it fails with this reason.
    pub(crate) poisoned: Option<String>,
}

struct Partial {
    tag: u64,
    remaining: usize,
    bytes: Vec<u8>,
}

/// What one [`RxState::pump`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pumped {
    /// Bytes taken off the ring (the producer may want to hear about the space).
    pub(crate) consumed: bool,
    /// At least one whole message was queued.
    pub(crate) completed: bool,
}

impl RxState {
    pub(crate) fn new() -> Self {
        Self {
            tail: 0,
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            partial: None,
            queues: HashMap::new(),
            poisoned: None,
        }
    }

    /// Queues a message directly (messages a rank sends to itself skip the
    /// rings, so that a large one cannot wait for space only its own sender
    /// could free).
    pub(crate) fn push(&mut self, tag: u64, bytes: Vec<u8>) {
        self.queues.entry(tag).or_default().push_back(bytes);
    }

    /// Takes the oldest queued message with `tag`.
    pub(crate) fn pop(&mut self, tag: u64) -> Option<Vec<u8>> {
        let queue = self.queues.get_mut(&tag)?;
        let message = queue.pop_front();
        if queue.is_empty() {
            self.queues.remove(&tag);
        }
        message
    }

    /// Moves everything the producer has published so far into the queues,
    /// without waiting. On a protocol violation the state is poisoned and the
    /// reason returned (also on every later call).
    pub(crate) fn pump(
        &mut self,
        ring: &RingView<'_>,
        max_message_len: usize,
    ) -> Result<Pumped, String> {
        if let Some(reason) = &self.poisoned {
            return Err(reason.clone());
        }
        let result = self.pump_inner(ring, max_message_len);
        if let Err(reason) = &result {
            self.poisoned = Some(reason.clone());
        }
        result
    }

    fn pump_inner(
        &mut self,
        ring: &RingView<'_>,
        max_message_len: usize,
    ) -> Result<Pumped, String> {
        let mut pumped = Pumped {
            consumed: false,
            completed: false,
        };
        loop {
            // Acquire: pairs with the producer's Release store of `head`.
            let head = ring.head.load(Ordering::Acquire);
            let available = head.wrapping_sub(self.tail);
            if available > ring.capacity() {
                return Err(format!(
                    "producer counter {head} is inconsistent with consumer counter {} \
                     in a ring of {} bytes",
                    self.tail,
                    ring.capacity()
                ));
            }
            if available == 0 {
                return Ok(pumped);
            }
            let available = available as usize;
            let taken = match &mut self.partial {
                Some(partial) => {
                    let n = available.min(partial.remaining);
                    ring.append_to(self.tail, n, &mut partial.bytes);
                    partial.remaining -= n;
                    n
                }
                None => {
                    let n = available.min(FRAME_HEADER_LEN - self.header_len);
                    ring.read_at(
                        self.tail,
                        &mut self.header[self.header_len..self.header_len + n],
                    );
                    self.header_len += n;
                    n
                }
            };
            self.tail += taken as u64;
            // Release: pairs with the producer's Acquire load of `tail`; our
            // copies out of these bytes are complete before it reuses them.
            ring.tail.store(self.tail, Ordering::Release);
            pumped.consumed = true;
            if self.header_len == FRAME_HEADER_LEN {
                self.header_len = 0;
                self.partial = Some(self.start_message(max_message_len)?);
            }
            if self.partial.as_ref().is_some_and(|p| p.remaining == 0) {
                if let Some(done) = self.partial.take() {
                    self.push(done.tag, done.bytes);
                    pumped.completed = true;
                }
            }
        }
    }

    fn start_message(&self, max_message_len: usize) -> Result<Partial, String> {
        let word = |i: usize| {
            let mut bytes = [0; 8];
            bytes.copy_from_slice(&self.header[i * 8..i * 8 + 8]);
            u64::from_ne_bytes(bytes)
        };
        let (tag, len) = (word(0), word(1));
        let len = usize::try_from(len)
            .ok()
            .filter(|&len| len <= max_message_len)
            .ok_or_else(|| {
                format!(
                    "frame with tag {tag:#x} claims {len} bytes, above the limit of \
                     {max_message_len}"
                )
            })?;
        // The whole message is reserved at once, so that it is copied once,
        // ring to buffer, with no reallocation on the way. Reserving costs
        // address space, not memory, until bytes arrive; a garbage length
        // within the limit costs a wait, and one the allocator cannot satisfy
        // an error rather than an abort.
        let mut bytes = Vec::new();
        bytes.try_reserve_exact(len).map_err(|e| {
            format!("frame with tag {tag:#x} claims {len} bytes, which cannot be allocated: {e}")
        })?;
        Ok(Partial {
            tag,
            remaining: len,
            bytes,
        })
    }
}
