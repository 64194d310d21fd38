//! The shared-memory fast path for collectives: a barrier and an all-reduce
//! that reads every rank's input straight out of shared memory.
//!
//! # Phases
//!
//! Scratch memory holds three *sets* of regions, one region per rank per
//! set, each [`ShmOptions::chunk_bytes`](super::ShmOptions) long. An
//! all-reduce moves its buffer through them one chunk at a time; each chunk is
//! one *phase*, numbered on from the previous collective, and phase `p` uses
//! set `p % 3`. A phase has three steps, separated by barriers:
//!
//! - **in**: each rank writes its input chunk into its own region (or, with
//!   [`SharedBuffer`], the caller has already written it there);
//! - **reduce**: each rank reduces its own slice of the chunk: it combines the
//!   slices of regions 1, 2, ... n-1 into that slice of region 0, in rank
//!   order, so every element is reduced in the same order whoever does it
//!   and the result is bit-identical on all ranks;
//! - **out**: each rank copies region 0 (the whole reduced chunk) out.
//!
//! Phases overlap: between two consecutive barriers a rank does *out* of
//! phase `p - 2`, *in* of phase `p` and *reduce* of phase `p - 1`, so a
//! buffer of `c` chunks takes `c + 1` barriers, not `2c`. The three steps in
//! flight touch three different sets. A set is reused by phase `p + 3`, whose
//! *in* comes after the barrier that follows *in* of phase `p + 2`, which every
//! rank reaches only after its *out* of phase `p`. So between two barriers
//! each region is either written by one rank (its own slice of region 0, or
//! its own input region) and read by none, or only read; that is the contract
//! [`Segment::region`](super::segment::Segment) asks of callers, and what each
//! SAFETY comment below relies on.
//!
//! Per rank and byte of the buffer this costs one copy in, 1/n of a
//! reduction, and one copy out; with [`SharedBuffer`] the copies disappear
//! and only the reduction remains.
//!
//! A buffer of at most [`WHOLE_REDUCE_BYTES`] takes one barrier instead of
//! two: after *in*, every rank reduces the whole chunk from all the regions,
//! in rank order, into its own buffer (for a [`SharedBuffer`], one of its
//! own that the [`Reduced`] result holds). That costs each rank n reads of the
//! buffer instead of one reduction of 1/n and a copy, nothing beside a
//! barrier when the buffer is small (waking three other processes is what a
//! small all-reduce spends its time on when ranks share cores). The sum is
//! folded in the same order as the slices are, so both paths give the same
//! bits. The set stays safe to reuse: a rank reads it before it leaves the
//! operation, and the set's next writer, three phases on, has passed a
//! barrier that every rank reached only after leaving it.
//!
//! Collectives are called by every rank in the same order (as in MPI). Each
//! rank publishes a descriptor (operation number, byte length, element size)
//! before the first barrier of an operation, and all ranks compare them after
//! it, so mismatched calls end in a [`TransportError::Protocol`] naming the
//! odd rank instead of a silently wrong result.
//!
//! After a timeout or a lost peer inside a collective the group's barrier
//! count is out of step; as with MPI, the job is expected to abort.

use std::ops::{Deref, Range};
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;
use std::time::Instant;

use super::futex;
use super::p2p::{lock, ShmTransport};
use super::segment::SETS;
use super::{CHECK_PERIOD, CONTROL_TAG};
use crate::data::rng::splitmix64;
use crate::transport::backoff::Backoff;
use crate::transport::TransportError;

/// Largest buffer that every rank reduces whole, after one barrier (see
/// the module docs): past it, reading every region costs more than the
/// second barrier saves.
pub const WHOLE_REDUCE_BYTES: usize = 32 << 10;

/// A reduction: `combine(dst, src)` folds `src` into `dst` elementwise; both
/// hold the same whole number of elements and start 64-byte aligned.
pub type Combine<'a> = &'a dyn Fn(&mut [u8], &[u8]);

/// This rank's place in the sequence of collectives; all ranks step through
/// the same values.
pub(crate) struct CollectiveState {
    barriers: u32,
    ops: u64,
    phase: u64,
}

impl CollectiveState {
    pub(crate) fn new() -> Self {
        Self {
            barriers: 0,
            ops: 0,
            phase: 0,
        }
    }

    fn set(&self) -> usize {
        (self.phase % SETS as u64) as usize
    }
}

impl ShmTransport {
    /// Waits until every rank has called `barrier` (or entered a barrier
    /// inside another collective) the same number of times.
    pub fn barrier(&self) -> Result<(), TransportError> {
        self.barrier_locked(&mut lock(&self.collective))
    }

    /// A counting barrier. Arrivals are counted in one shared word that only
    /// ever grows (wrapping); barrier number `b` is complete when it reaches
    /// `b * size`. The target moving on with every barrier plays the role of
    /// the sense bit of a sense-reversing barrier: nobody resets the counter,
    /// so a fast rank entering the next barrier cannot be confused with a
    /// latecomer of this one. The last arrival wakes the sleepers.
    fn barrier_locked(&self, state: &mut CollectiveState) -> Result<(), TransportError> {
        state.barriers = state.barriers.wrapping_add(1);
        if self.size == 1 {
            return Ok(());
        }
        let target = state.barriers.wrapping_mul(self.size as u32);
        let reached = |count: u32| count.wrapping_sub(target) as i32 >= 0;
        // Only read to name latecomers in errors, so Relaxed.
        self.segment
            .slot(self.rank)
            .epoch
            .store(state.barriers, Ordering::Relaxed);
        let arrivals = self.segment.header().arrivals;
        // AcqRel: the Release half publishes everything this rank wrote
        // before arriving. Each arrival heads a release sequence that every
        // later arrival, being a read-modify-write, continues; so the Acquire
        // loads below that read the completing count (or a later one), and
        // the Acquire half here for the last arrival, synchronize with every
        // rank's arrival and see everything written before it.
        let before = arrivals.fetch_add(1, Ordering::AcqRel);
        if before.wrapping_add(1) == target {
            futex::wake_all(arrivals);
            return Ok(());
        }
        let deadline = Instant::now() + self.opts.timeout;
        let mut next_check = Instant::now() + CHECK_PERIOD;
        let mut backoff = Backoff::new();
        loop {
            let seen = arrivals.load(Ordering::Acquire);
            if reached(seen) {
                return Ok(());
            }
            let now = Instant::now();
            let someone_left = (0..self.size).any(|rank| self.has_left(rank));
            if someone_left || now >= next_check || now >= deadline {
                let late = self.latecomers(state.barriers);
                for &rank in &late {
                    self.peer_status(rank)?;
                }
                if now >= deadline {
                    return Err(TransportError::Timeout {
                        rank: late.first().copied().unwrap_or(self.rank),
                        tag: CONTROL_TAG,
                    });
                }
                next_check = now + CHECK_PERIOD;
            }
            if backoff.should_sleep() {
                futex::wait(arrivals, seen, CHECK_PERIOD.min(deadline - now));
            } else {
                backoff.snooze();
            }
        }
    }

    /// Ranks whose barrier count is behind ours.
    fn latecomers(&self, barriers: u32) -> Vec<usize> {
        (0..self.size)
            .filter(|&rank| {
                let theirs = self.segment.slot(rank).epoch.load(Ordering::Relaxed);
                (barriers.wrapping_sub(theirs) as i32) > 0
            })
            .collect()
    }

    /// Reduces `buf` elementwise across all ranks, in place: afterwards every
    /// rank's `buf` holds `x0 ⊕ x1 ⊕ ... ⊕ x(n-1)`, folded in rank order and
    /// bit-identical everywhere.
    ///
    /// `elem_size` is the byte size of one element; `buf.len()` must be a
    /// multiple of it and all ranks must pass the same length and element
    /// size. This layer knows nothing of data types: `combine` does the
    /// typed work (see [`Combine`]). Buffers larger than one chunk are
    /// reduced chunk by chunk, the copy-out of one chunk running back to back
    /// with the copy-in of the next.
    pub fn all_reduce_bytes(
        &self,
        buf: &mut [u8],
        elem_size: usize,
        combine: Combine<'_>,
    ) -> Result<(), TransportError> {
        self.all_reduce_from(None, buf, elem_size, combine)
    }

    /// [`all_reduce_bytes`](Self::all_reduce_bytes) out of place: reads
    /// `input` and writes the result to `output` (same length), sparing the
    /// caller a copy of the whole buffer into `output` first.
    pub fn all_reduce_bytes_into(
        &self,
        input: &[u8],
        output: &mut [u8],
        elem_size: usize,
        combine: Combine<'_>,
    ) -> Result<(), TransportError> {
        if input.len() != output.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "all-reduce input has {} bytes but output {}",
                    input.len(),
                    output.len()
                ),
            )
            .into());
        }
        self.all_reduce_from(Some(input), output, elem_size, combine)
    }

    /// The all-reduce, reading from `input` or, without one, from `buf`.
    fn all_reduce_from(
        &self,
        input: Option<&[u8]>,
        buf: &mut [u8],
        elem_size: usize,
        combine: Combine<'_>,
    ) -> Result<(), TransportError> {
        check_elements(buf.len(), elem_size, self.opts.chunk_bytes)?;
        if self.size == 1 {
            if let Some(input) = input {
                buf.copy_from_slice(input);
            }
            return Ok(());
        }
        let chunk = self.opts.chunk_bytes / elem_size * elem_size;
        let chunks = buf.len().div_ceil(chunk).max(1);
        let len = buf.len();
        let piece = |k: usize| k * chunk..len.min((k + 1) * chunk);
        let mut state = lock(&self.collective);
        self.publish_descriptor(&mut state, buf.len(), elem_size);
        if self.reduces_whole(len) {
            return self.reduce_whole(&mut state, input, buf, combine);
        }
        let first = state.phase;
        let set = |k: usize| ((first + k as u64) % SETS as u64) as usize;
        // Iteration k: in(k), reduce(k - 1), barrier, out(k - 1).
        for k in 0..=chunks {
            if k < chunks {
                let piece = piece(k);
                // SAFETY: *in*: our own region of this phase's set, which
                // nobody reads until the barrier (module docs, "Phases").
                let region = unsafe { self.segment.region_mut(set(k), self.rank, 0..piece.len()) };
                region.copy_from_slice(match input {
                    Some(input) => &input[piece],
                    None => &buf[piece],
                });
            }
            if k > 0 {
                self.reduce_slice(set(k - 1), piece(k - 1).len(), elem_size, combine);
            }
            self.barrier_locked(&mut state)?;
            if k == 0 {
                if let Err(mismatch) = self.compare_descriptors() {
                    state.phase = first + 1;
                    return Err(self.abandon(&mut state, mismatch));
                }
            } else {
                let piece = piece(k - 1);
                // SAFETY: *out*: region 0 of phase k - 1's set is only read
                // until after the next barrier.
                let reduced = unsafe { self.segment.region(set(k - 1), 0, 0..piece.len()) };
                buf[piece].copy_from_slice(reduced);
            }
        }
        state.phase = first + chunks as u64;
        Ok(())
    }

    /// Whether an all-reduce of `len` bytes takes the one-barrier path: the
    /// one decision both entries (a buffer of the caller's, a
    /// [`SharedBuffer`]) make, so that ranks calling either for the same
    /// operation meet at the same barriers.
    fn reduces_whole(&self, len: usize) -> bool {
        len <= WHOLE_REDUCE_BYTES.min(self.opts.chunk_bytes)
    }

    /// The whole all-reduce of a buffer of at most one chunk, after one
    /// barrier: in, barrier, every rank folds every region into `buf`.
    fn reduce_whole(
        &self,
        state: &mut CollectiveState,
        input: Option<&[u8]>,
        buf: &mut [u8],
        combine: Combine<'_>,
    ) -> Result<(), TransportError> {
        // SAFETY: *in*: our own region of this phase's set, which nobody
        // reads until the barrier (module docs).
        let region = unsafe {
            self.segment
                .region_mut(state.set(), self.rank, 0..buf.len())
        };
        region.copy_from_slice(input.unwrap_or(buf));
        self.fold_whole(state, buf, combine)
    }

    /// The rest of a one-barrier all-reduce, every rank's *in* done in
    /// this phase's set: barrier, then every region folded into `buf`.
    fn fold_whole(
        &self,
        state: &mut CollectiveState,
        buf: &mut [u8],
        combine: Combine<'_>,
    ) -> Result<(), TransportError> {
        let set = state.set();
        state.phase += 1;
        self.barrier_locked(state)?;
        if let Err(mismatch) = self.compare_descriptors() {
            return Err(self.abandon(state, mismatch));
        }
        for rank in 0..self.size {
            // SAFETY: every region of the set is only read from here until
            // each rank leaves the operation (module docs).
            let theirs = unsafe { self.segment.region(set, rank, 0..buf.len()) };
            match rank {
                0 => buf.copy_from_slice(theirs),
                _ => combine(buf, theirs),
            }
        }
        Ok(())
    }

    /// Borrows this rank's scratch region for the next collective, so that
    /// the input can be written straight into shared memory (say, gradients
    /// computed in place) and the result read straight out of it: the
    /// all-reduce then copies nothing (past `WHOLE_REDUCE_BYTES`; below,
    /// one barrier saved is worth more than a copy). `len` may be up to
    /// [`ShmTransport::max_shared_len`].
    ///
    /// Holding the buffer (or its [`Reduced`] result) keeps other threads of
    /// this rank out of collectives until it is dropped. Every rank must go on
    /// to call [`SharedBuffer::all_reduce`] (or [`ShmTransport::all_reduce_bytes`]
    /// with the same length), as with any collective.
    pub fn shared_buffer(&self, len: usize) -> Result<SharedBuffer<'_>, TransportError> {
        if len > self.max_shared_len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "shared buffer of {len} bytes asked for; chunks hold {}",
                    self.max_shared_len()
                ),
            )
            .into());
        }
        Ok(SharedBuffer {
            transport: self,
            state: lock(&self.collective),
            len,
        })
    }

    /// The largest [`ShmTransport::shared_buffer`]: one chunk.
    pub fn max_shared_len(&self) -> usize {
        self.opts.chunk_bytes
    }

    /// Writes this rank's descriptor of the operation it is starting; read
    /// by the others after the first barrier (which orders it).
    fn publish_descriptor(&self, state: &mut CollectiveState, len: usize, elem_size: usize) {
        let slot = self.segment.slot(self.rank);
        slot.op_seq.store(state.ops, Ordering::Relaxed);
        slot.op_len.store(len as u64, Ordering::Relaxed);
        slot.op_elem.store(elem_size as u64, Ordering::Relaxed);
        // Release: whoever reads this print sees the fields it stands for.
        let print = fingerprint((state.ops, len as u64, elem_size as u64));
        slot.op_print.store(print, Ordering::Release);
        state.ops += 1;
    }

    /// *reduce* for this rank's slice of a `len`-byte chunk in `set`.
    fn reduce_slice(&self, set: usize, len: usize, elem_size: usize, combine: Combine<'_>) {
        let slice = my_slice(len, elem_size, self.size, self.rank);
        if slice.is_empty() {
            return;
        }
        // SAFETY: *reduce*: this rank alone touches bytes `slice` of region
        // 0 until the next barrier, and region 0 is not among the sources.
        let dst = unsafe { self.segment.region_mut(set, 0, slice.clone()) };
        for rank in 1..self.size {
            // SAFETY: *reduce*: the other regions of the set are only read
            // until the next barrier.
            let src = unsafe { self.segment.region(set, rank, slice.clone()) };
            combine(dst, src);
        }
    }

    /// Ends an operation whose descriptors disagree. Every rank sees the
    /// mismatch after the first barrier; one more barrier keeps the
    /// descriptors in place until all have compared, and the group in step
    /// for whatever comes next.
    fn abandon(&self, state: &mut CollectiveState, mismatch: TransportError) -> TransportError {
        match self.barrier_locked(state) {
            Ok(()) => mismatch,
            Err(lost) => lost,
        }
    }

    fn compare_descriptors(&self) -> Result<(), TransportError> {
        let describe = |rank: usize| {
            let slot = self.segment.slot(rank);
            (
                slot.op_seq.load(Ordering::Relaxed),
                slot.op_len.load(Ordering::Relaxed),
                slot.op_elem.load(Ordering::Relaxed),
            )
        };
        let mine = describe(self.rank);
        // After a one-barrier all-reduce a fast rank may be publishing its
        // next descriptor while a slow one compares this one's, so a rank
        // is judged by its print, one word read whole. A rank already in
        // the next operation compared this one's descriptors and found
        // them equal, or it would have stayed for the abandoning barrier.
        let agrees = |rank: usize| {
            let slot = self.segment.slot(rank);
            // Acquire: a print of the next operation shows its op_seq.
            slot.op_print.load(Ordering::Acquire) == fingerprint(mine)
                || slot.op_seq.load(Ordering::Relaxed) == mine.0.wrapping_add(1)
        };
        match (0..self.size).find(|&rank| !agrees(rank)) {
            None => Ok(()),
            Some(rank) => {
                let theirs = describe(rank);
                Err(TransportError::Protocol {
                    rank,
                    reason: format!(
                        "collectives out of step: rank {rank} is in collective #{} over {} \
                         bytes of {}-byte elements, rank {} in #{} over {} bytes of {}-byte \
                         elements",
                        theirs.0, theirs.1, theirs.2, self.rank, mine.0, mine.1, mine.2
                    ),
                })
            }
        }
    }
}

/// One word for an operation's descriptor (number, byte length, element
/// size), mixed so that different descriptors differ.
fn fingerprint((seq, len, elem): (u64, u64, u64)) -> u64 {
    splitmix64(splitmix64(splitmix64(seq) ^ len) ^ elem)
}

fn check_elements(len: usize, elem_size: usize, chunk_bytes: usize) -> Result<(), TransportError> {
    if elem_size == 0 || elem_size > chunk_bytes || !len.is_multiple_of(elem_size) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{len} bytes are not a whole number of {elem_size}-byte elements \
                 (at most {chunk_bytes} bytes each)"
            ),
        )
        .into());
    }
    Ok(())
}

/// The bytes of a `len`-byte chunk that `rank` reduces: an equal share of
/// whole elements, rounded so that every slice starts 64-byte aligned (no
/// two ranks write one cache line, and typed `combine`s see aligned data).
fn my_slice(len: usize, elem_size: usize, size: usize, rank: usize) -> Range<usize> {
    let elems = len / elem_size;
    let align = 64 / gcd(64, elem_size);
    let per_rank = elems.div_ceil(size).next_multiple_of(align);
    let lo = (rank * per_rank).min(elems);
    let hi = ((rank + 1) * per_rank).min(elems);
    lo * elem_size..hi * elem_size
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// This rank's scratch region, borrowed for one all-reduce; see
/// [`ShmTransport::shared_buffer`].
pub struct SharedBuffer<'a> {
    transport: &'a ShmTransport,
    state: MutexGuard<'a, CollectiveState>,
    len: usize,
}

impl<'a> SharedBuffer<'a> {
    /// This rank's input, in shared memory; its contents before writing are
    /// whatever an earlier collective left there.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: *in* of the phase this buffer will run: our own region of
        // its set, which nobody reads until its first barrier; the `&mut self`
        // borrow ends before `all_reduce` can start that barrier.
        unsafe {
            self.transport
                .segment
                .region_mut(self.state.set(), self.transport.rank, 0..self.len)
        }
    }

    /// Reduces the buffers of all ranks as [`ShmTransport::all_reduce_bytes`]
    /// does and returns the result, still in shared memory; a buffer of at
    /// most `WHOLE_REDUCE_BYTES` is reduced after one barrier into memory
    /// of this rank's, as there.
    pub fn all_reduce(
        mut self,
        elem_size: usize,
        combine: Combine<'_>,
    ) -> Result<Reduced<'a>, TransportError> {
        let transport = self.transport;
        check_elements(self.len, elem_size, transport.opts.chunk_bytes)?;
        let set = self.state.set();
        if transport.size > 1 {
            let state = &mut *self.state;
            transport.publish_descriptor(state, self.len, elem_size);
            if transport.reduces_whole(self.len) {
                let mut own = vec![0; self.len];
                transport.fold_whole(state, &mut own, combine)?;
                return Ok(Reduced {
                    transport,
                    _state: self.state,
                    at: Place::Own(own),
                });
            }
            // One phase: the caller did *in*; barrier, *reduce*, barrier.
            state.phase += 1;
            transport.barrier_locked(state)?;
            if let Err(mismatch) = transport.compare_descriptors() {
                return Err(transport.abandon(state, mismatch));
            }
            transport.reduce_slice(set, self.len, elem_size, combine);
            transport.barrier_locked(state)?;
        }
        Ok(Reduced {
            transport,
            _state: self.state,
            at: Place::Shared { set, len: self.len },
        })
    }
}

/// The result of [`SharedBuffer::all_reduce`]; read it in place, and drop it
/// to let this rank's next collective start.
pub struct Reduced<'a> {
    transport: &'a ShmTransport,
    /// Held so that no later phase starts on this rank (and so on none)
    /// while the result is borrowed.
    _state: MutexGuard<'a, CollectiveState>,
    at: Place,
}

/// Where a [`Reduced`] result is.
enum Place {
    /// Region 0 of a set, `len` bytes.
    Shared { set: usize, len: usize },
    /// This rank's own memory (a one-barrier all-reduce).
    Own(Vec<u8>),
}

impl Deref for Reduced<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.at {
            // SAFETY: *out* of the finished phase p: region 0 of its set is
            // written again only in phase p + 3, and no rank gets past phase
            // p + 1's first barrier while this rank holds its collective lock
            // and so stays out of phase p + 1.
            Place::Shared { set, len } => unsafe {
                self.transport.segment.region(*set, 0, 0..*len)
            },
            Place::Own(own) => own,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_chunk_exactly_once_and_start_aligned() {
        for (len, elem) in [
            (0, 4),
            (4, 4),
            (1009 * 4, 4),
            (3 << 20, 4),
            (12 * 777, 12),
            (5, 1),
        ] {
            for size in 1..=5 {
                let mut next = 0;
                for rank in 0..size {
                    let slice = my_slice(len, elem, size, rank);
                    assert_eq!(slice.start, next, "len {len} elem {elem} size {size}");
                    assert!(slice.is_empty() || slice.start.is_multiple_of(64));
                    assert_eq!(slice.len() % elem, 0);
                    next = slice.end;
                }
                assert_eq!(next, len);
            }
        }
    }
}
