//! The shared segment: its byte layout and the only place that turns offsets
//! into pointers.
//!
//! Everything above this file works with typed views ([`Header`], [`Slot`],
//! [`RingView`]) whose offsets come from a [`SegmentLayout`] computed locally
//! from validated parameters, never from bytes read out of the segment. That is
//! what keeps a peer that scribbles over shared memory from steering us out of
//! bounds: the worst it can do is change the *values* we read, and every value
//! that becomes a length or an index is checked by the layer that reads it.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64};

use memmap2::{MmapOptions, MmapRaw};

/// First eight bytes of every segment; a file without them is not ours.
pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"swrmshm1");
/// Bumped whenever the layout below changes; a segment of another version is
/// treated as stale and replaced.
pub(crate) const VERSION: u32 = 2;

/// Two cache lines: adjacent-line prefetchers on x86 pull pairs of lines, so
/// fields written by different processes are kept this far apart.
const LINE: usize = 128;
const PAGE: usize = 4096;
const HEADER_LEN: usize = 2 * LINE;
const SLOT_LEN: usize = 2 * LINE;
const RING_HEADER_LEN: usize = 2 * LINE;

/// Bytes at the start of every segment whose place does not depend on the
/// layout parameters: the header and rank 0's slot. Enough to tell whether a
/// file is a live segment and who created it.
pub(crate) const PREFIX_LEN: usize = HEADER_LEN + SLOT_LEN;
/// Offset of rank 0's slot, the creator's identity.
pub(crate) const SLOT0_OFFSET: usize = HEADER_LEN;

// Header fields (offsets from the start of the segment).
pub(crate) const H_MAGIC: usize = 0;
pub(crate) const H_VERSION: usize = 8;
pub(crate) const H_STATE: usize = 12;
pub(crate) const H_SIZE: usize = 16;
pub(crate) const H_RING_CAPACITY: usize = 24;
pub(crate) const H_CHUNK_BYTES: usize = 32;
pub(crate) const H_NONCE: usize = 40;
pub(crate) const H_TOTAL_LEN: usize = 48;
const H_ARRIVALS: usize = LINE;

// Slot fields (offsets from the start of a slot).
pub(crate) const S_STATE: usize = 0;
pub(crate) const S_PID: usize = 4;
pub(crate) const S_START_TIME: usize = 8;
const S_EPOCH: usize = 16;
const S_OP_SEQ: usize = 24;
const S_OP_LEN: usize = 32;
const S_OP_ELEM: usize = 40;
const S_OP_PRINT: usize = 48;
const S_BELL: usize = LINE;
const S_BELL_WAITERS: usize = LINE + 4;

// Ring header fields: the producer's and the consumer's counters live on
// separate lines so that each side writes only its own.
const R_HEAD: usize = 0;
const R_TAIL: usize = LINE;

/// Scratch sets: the all-reduce pipeline has three chunks in flight (one
/// being copied in, one reduced, one copied out); see the `collective` module.
pub(crate) const SETS: usize = 3;

/// Header `state` once the creator has written every field.
pub(crate) const STATE_READY: u32 = 1;

/// Where everything lives in a segment for a given number of ranks, ring
/// capacity and collective chunk size.
///
/// ```text
/// header   256 B   magic, version, state, size, ring capacity, chunk bytes,
///                  run nonce, total length; barrier counter on its own line
/// slots    256 B per rank: state, pid, start time, barrier epoch,
///                  collective descriptor; doorbell on its own line
/// rings    one per ordered pair i -> j, i != j, in order (i, j):
///                  256 B header (head, tail on separate lines) + capacity
/// scratch  page aligned: SETS (3) sets x size regions x chunk bytes
/// ```
///
/// The layout is public so that tools (and tests playing a misbehaving peer)
/// can find a ring without going through a transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentLayout {
    size: usize,
    ring_capacity: usize,
    chunk_bytes: usize,
    rings_offset: usize,
    ring_stride: usize,
    scratch_offset: usize,
    total_len: usize,
}

impl SegmentLayout {
    /// Computes the layout; fails when a parameter is out of range or the
    /// segment would not fit in the address space.
    ///
    /// `ring_capacity` must be a power of two of at least 4 KiB (so offsets
    /// wrap with a mask and ring headers stay line aligned); `chunk_bytes` a
    /// positive multiple of 4 KiB (so each scratch region starts on a page).
    pub fn new(size: usize, ring_capacity: usize, chunk_bytes: usize) -> io::Result<Self> {
        if size == 0 {
            return Err(invalid("a job needs at least one rank"));
        }
        if !ring_capacity.is_power_of_two() || ring_capacity < PAGE {
            return Err(invalid(format!(
                "ring capacity {ring_capacity} is not a power of two of at least {PAGE}"
            )));
        }
        if chunk_bytes == 0 || !chunk_bytes.is_multiple_of(PAGE) {
            return Err(invalid(format!(
                "chunk size {chunk_bytes} is not a positive multiple of {PAGE}"
            )));
        }
        let too_big = || invalid("shared segment would exceed the address space");
        let rings_offset = size
            .checked_mul(SLOT_LEN)
            .and_then(|s| s.checked_add(HEADER_LEN))
            .ok_or_else(too_big)?;
        let ring_stride = ring_capacity
            .checked_add(RING_HEADER_LEN)
            .ok_or_else(too_big)?;
        let rings_len = size
            .checked_mul(size - 1)
            .and_then(|pairs| pairs.checked_mul(ring_stride))
            .ok_or_else(too_big)?;
        let scratch_offset = rings_offset
            .checked_add(rings_len)
            .and_then(|end| end.checked_next_multiple_of(PAGE))
            .ok_or_else(too_big)?;
        let total_len = size
            .checked_mul(chunk_bytes)
            .and_then(|per_set| per_set.checked_mul(SETS))
            .and_then(|scratch| scratch.checked_add(scratch_offset))
            .filter(|&len| isize::try_from(len).is_ok())
            .ok_or_else(too_big)?;
        Ok(Self {
            size,
            ring_capacity,
            chunk_bytes,
            rings_offset,
            ring_stride,
            scratch_offset,
            total_len,
        })
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Bytes of payload each ring holds.
    pub fn ring_capacity(&self) -> usize {
        self.ring_capacity
    }

    /// Bytes of each rank's scratch region, the unit collectives move at once.
    pub fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    /// Length of the whole segment file.
    pub fn total_len(&self) -> usize {
        self.total_len
    }

    /// Offset of the producer's counter (`u64`, bytes written so far) of the
    /// ring `from -> to`; `None` when there is no such ring.
    pub fn ring_head_offset(&self, from: usize, to: usize) -> Option<usize> {
        self.ring_offset(from, to).map(|r| r + R_HEAD)
    }

    /// Offset of the consumer's counter (`u64`, bytes read so far) of the
    /// ring `from -> to`.
    pub fn ring_tail_offset(&self, from: usize, to: usize) -> Option<usize> {
        self.ring_offset(from, to).map(|r| r + R_TAIL)
    }

    /// Offset of the first payload byte of the ring `from -> to`; byte
    /// number `p` of the stream lives at `p % ring_capacity` from here.
    pub fn ring_data_offset(&self, from: usize, to: usize) -> Option<usize> {
        self.ring_offset(from, to).map(|r| r + RING_HEADER_LEN)
    }

    /// Offset of `rank`'s slot.
    pub fn slot_offset(&self, rank: usize) -> Option<usize> {
        (rank < self.size).then(|| HEADER_LEN + rank * SLOT_LEN)
    }

    fn ring_offset(&self, from: usize, to: usize) -> Option<usize> {
        if from >= self.size || to >= self.size || from == to {
            return None;
        }
        // Rings of `from` skip the absent `from -> from` entry.
        let index = from * (self.size - 1) + if to < from { to } else { to - 1 };
        Some(self.rings_offset + index * self.ring_stride)
    }

    fn region_offset(&self, set: usize, rank: usize) -> usize {
        assert!(
            set < SETS && rank < self.size,
            "scratch region out of range"
        );
        self.scratch_offset + (set * self.size + rank) * self.chunk_bytes
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

/// A mapped segment whose length is at least its layout's `total_len`.
pub(crate) struct Segment {
    map: MmapRaw,
    layout: SegmentLayout,
}

impl Segment {
    /// Maps `file`, which must already be `layout.total_len()` bytes or longer
    /// (mapping past the end of a file turns accesses into SIGBUS).
    pub(crate) fn map(file: &File, layout: SegmentLayout) -> io::Result<Self> {
        let file_len = file.metadata()?.len();
        if file_len < layout.total_len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "segment has {file_len} bytes, its layout needs {}",
                    layout.total_len
                ),
            ));
        }
        // Populated at open (MAP_POPULATE): the page faults of a fresh
        // segment land here, once, not inside the first collectives.
        let map = MmapOptions::new()
            .len(layout.total_len)
            .populate()
            .map_raw(file)?;
        Ok(Self { map, layout })
    }

    pub(crate) fn layout(&self) -> &SegmentLayout {
        &self.layout
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        assert!(
            offset.is_multiple_of(4) && offset + 4 <= self.map.len(),
            "bad u32 offset {offset}"
        );
        // SAFETY: the offset is 4-aligned (and the mapping page-aligned) and
        // lies inside the mapping, which lives as long as `self`; AtomicU32 has
        // the layout of u32, and any bit pattern is a valid u32. Other
        // processes access these words only through atomics as well.
        unsafe { &*self.map.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        assert!(
            offset.is_multiple_of(8) && offset + 8 <= self.map.len(),
            "bad u64 offset {offset}"
        );
        // SAFETY: as in `u32_at`, with 8-byte alignment and AtomicU64.
        unsafe { &*self.map.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    pub(crate) fn header(&self) -> Header<'_> {
        Header {
            magic: self.u64_at(H_MAGIC),
            version: self.u32_at(H_VERSION),
            state: self.u32_at(H_STATE),
            size: self.u64_at(H_SIZE),
            ring_capacity: self.u64_at(H_RING_CAPACITY),
            chunk_bytes: self.u64_at(H_CHUNK_BYTES),
            nonce: self.u64_at(H_NONCE),
            total_len: self.u64_at(H_TOTAL_LEN),
            arrivals: self.u32_at(H_ARRIVALS),
        }
    }

    pub(crate) fn slot(&self, rank: usize) -> Slot<'_> {
        let base = self
            .layout
            .slot_offset(rank)
            .expect("slot of a rank in range");
        Slot {
            state: self.u32_at(base + S_STATE),
            pid: self.u32_at(base + S_PID),
            start_time: self.u64_at(base + S_START_TIME),
            epoch: self.u32_at(base + S_EPOCH),
            op_seq: self.u64_at(base + S_OP_SEQ),
            op_len: self.u64_at(base + S_OP_LEN),
            op_elem: self.u64_at(base + S_OP_ELEM),
            op_print: self.u64_at(base + S_OP_PRINT),
            bell: self.u32_at(base + S_BELL),
            bell_waiters: self.u32_at(base + S_BELL_WAITERS),
        }
    }

    pub(crate) fn ring(&self, from: usize, to: usize) -> RingView<'_> {
        let head = self
            .layout
            .ring_head_offset(from, to)
            .expect("ring between two ranks");
        let tail = self
            .layout
            .ring_tail_offset(from, to)
            .expect("ring between two ranks");
        let data = self
            .layout
            .ring_data_offset(from, to)
            .expect("ring between two ranks");
        RingView {
            head: self.u64_at(head),
            tail: self.u64_at(tail),
            segment: self,
            data,
        }
    }

    /// The bytes `range` of `rank`'s scratch region in `set`.
    ///
    /// # Safety
    /// No process may write these bytes while the returned slice lives. The
    /// collective protocol provides that: between two barriers a region is
    /// either written by its owner only or read by everyone.
    pub(crate) unsafe fn region(&self, set: usize, rank: usize, range: Range<usize>) -> &[u8] {
        let start = self.region_start(set, rank, &range);
        // SAFETY: `region_start` checked that the range lies inside the
        // region, which lies inside the mapping living as long as `self`;
        // the caller guarantees nobody writes it meanwhile.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(start), range.len()) }
    }

    /// The bytes `range` of `rank`'s scratch region in `set`, for writing.
    ///
    /// # Safety
    /// No process but this caller may read or write these bytes while the
    /// returned slice lives (see [`Segment::region`]), and the caller must
    /// not hold two overlapping slices at once.
    #[allow(clippy::mut_from_ref)] // the exclusivity is the caller's contract above
    pub(crate) unsafe fn region_mut(
        &self,
        set: usize,
        rank: usize,
        range: Range<usize>,
    ) -> &mut [u8] {
        let start = self.region_start(set, rank, &range);
        // SAFETY: as in `region`, plus the caller's exclusivity guarantee.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(start), range.len()) }
    }

    fn region_start(&self, set: usize, rank: usize, range: &Range<usize>) -> usize {
        assert!(
            range.start <= range.end && range.end <= self.layout.chunk_bytes,
            "scratch range {range:?} outside a {}-byte region",
            self.layout.chunk_bytes
        );
        self.layout.region_offset(set, rank) + range.start
    }
}

/// The segment header's fields.
pub(crate) struct Header<'a> {
    pub(crate) magic: &'a AtomicU64,
    pub(crate) version: &'a AtomicU32,
    pub(crate) state: &'a AtomicU32,
    pub(crate) size: &'a AtomicU64,
    pub(crate) ring_capacity: &'a AtomicU64,
    pub(crate) chunk_bytes: &'a AtomicU64,
    pub(crate) nonce: &'a AtomicU64,
    pub(crate) total_len: &'a AtomicU64,
    /// Barrier arrivals since the segment was created (wrapping).
    pub(crate) arrivals: &'a AtomicU32,
}

/// One rank's slot.
pub(crate) struct Slot<'a> {
    pub(crate) state: &'a AtomicU32,
    pub(crate) pid: &'a AtomicU32,
    pub(crate) start_time: &'a AtomicU64,
    /// Barriers this rank has entered (wrapping); names latecomers in errors.
    pub(crate) epoch: &'a AtomicU32,
    pub(crate) op_seq: &'a AtomicU64,
    pub(crate) op_len: &'a AtomicU64,
    pub(crate) op_elem: &'a AtomicU64,
    /// One word standing for the three above, written after them: what
    /// ranks compare, since a peer may be rewriting the three for its next
    /// operation while they are read.
    pub(crate) op_print: &'a AtomicU64,
    /// Futex word bumped by whoever has news for this rank.
    pub(crate) bell: &'a AtomicU32,
    pub(crate) bell_waiters: &'a AtomicU32,
}

/// One ring's counters and payload area.
pub(crate) struct RingView<'a> {
    pub(crate) head: &'a AtomicU64,
    pub(crate) tail: &'a AtomicU64,
    segment: &'a Segment,
    data: usize,
}

impl RingView<'_> {
    pub(crate) fn capacity(&self) -> u64 {
        self.segment.layout.ring_capacity as u64
    }

    /// Splits `len` bytes from stream position `pos` into at most two
    /// in-bounds (offset, len) pieces. The mask keeps every offset below the
    /// capacity whatever `pos` is, so a garbage counter cannot reach outside
    /// the ring; `len` is checked here as well.
    fn pieces(&self, pos: u64, len: usize) -> [(usize, usize); 2] {
        let cap = self.segment.layout.ring_capacity;
        assert!(
            len <= cap,
            "ring access of {len} bytes exceeds capacity {cap}"
        );
        let at = (pos & (cap as u64 - 1)) as usize;
        let first = len.min(cap - at);
        [(self.data + at, first), (self.data, len - first)]
    }

    /// Copies `src` into the ring at stream position `pos`.
    ///
    /// The caller (the ring's only producer) has checked that the consumer is
    /// done with those bytes.
    pub(crate) fn write_at(&self, pos: u64, src: &[u8]) {
        let mut done = 0;
        for (offset, len) in self.pieces(pos, src.len()) {
            // SAFETY: `pieces` keeps [offset, offset + len) inside this ring's
            // payload area, inside the mapping; `src` is ordinary memory that
            // cannot overlap the mapping's shared pages through a &[u8] we
            // also write. Raw copies make no aliasing claim about the shared
            // bytes, which a misbehaving peer may be touching concurrently.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.as_ptr().add(done),
                    self.segment.map.as_mut_ptr().add(offset),
                    len,
                )
            };
            done += len;
        }
    }

    /// Copies `dst.len()` bytes at stream position `pos` out of the ring.
    pub(crate) fn read_at(&self, pos: u64, dst: &mut [u8]) {
        let mut done = 0;
        for (offset, len) in self.pieces(pos, dst.len()) {
            // SAFETY: as in `write_at`, in the other direction; `dst` is a
            // unique borrow of private memory.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.segment.map.as_ptr().add(offset),
                    dst.as_mut_ptr().add(done),
                    len,
                )
            };
            done += len;
        }
    }

    /// Appends `len` bytes at stream position `pos` to `dst` without first
    /// zero-filling them: large messages are copied exactly once, ring to
    /// the receiver's buffer.
    pub(crate) fn append_to(&self, pos: u64, len: usize, dst: &mut Vec<u8>) {
        dst.reserve(len);
        let spare = &mut dst.spare_capacity_mut()[..len];
        let mut done = 0;
        for (offset, piece) in self.pieces(pos, len) {
            // SAFETY: the source is in bounds as in `read_at`; the
            // destination is `dst`'s reserved spare capacity, of at least
            // `len` bytes, which we own exclusively.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.segment.map.as_ptr().add(offset),
                    spare.as_mut_ptr().add(done).cast::<u8>(),
                    piece,
                )
            };
            done += piece;
        }
        let new_len = dst.len() + len;
        // SAFETY: the `len` bytes after the old length were initialized by
        // the copies above and lie within the reserved capacity.
        unsafe { dst.set_len(new_len) };
    }
}
