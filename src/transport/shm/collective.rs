//! The shared-memory fast path for collectives: a barrier and an all-reduce
//! that reads every rank's input straight out of shared memory.
//!
//! # Phases
//!
//! Scratch memory holds two *sets* of regions, one region per rank per set,
//! each [`ShmOptions::chunk_bytes`](super::ShmOptions) long. An all-reduce
//! moves its buffer through them one chunk at a time; each chunk is one
//! *phase*, and phase `p` uses set `p % 2`:
//!
//! 1. each rank writes its input chunk into its own region (or, with
//!    [`SharedBuffer`], the caller has already written it there);
//! 2. barrier;
//! 3. each rank reduces its own slice of the chunk: it combines the slices of
//!    regions 1, 2, ... n-1 into that slice of region 0, in rank order, so
//!    every element is reduced in the same order whoever does it, and the
//!    result is bit-identical on all ranks;
//! 4. barrier;
//! 5. each rank copies region 0 (the whole reduced chunk) out.
//!
//! Step 5 of phase `p` and step 1 of phase `p + 1` follow each other with no
//! barrier between them, which is safe because they use different sets; set
//! `p % 2` is written again only in phase `p + 2`, after the barrier of phase
//! `p + 1`'s step 2, which no rank reaches before finishing its own step 5
//! of phase `p`. So each region is, between two barriers, either written by
//! one rank and read by none, or read by any; that is the contract
//! [`Segment::region`](super::segment::Segment) asks of callers, and what
//! each SAFETY comment below relies on.
//!
//! Per rank and byte of the buffer this costs one copy in, 1/n of a
//! reduction, and one copy out; with [`SharedBuffer`] the copies disappear
//! and only the reduction remains.
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

use super::futex::{self, Backoff};
use super::p2p::{lock, ShmTransport};
use super::{CHECK_PERIOD, CONTROL_TAG};
use crate::transport::TransportError;

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
        (self.phase % 2) as usize
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
        // before arriving; every arrival is a read-modify-write, so the count
        // that completes the barrier heads a release sequence containing all
        // of them, and the Acquire loads below (or the Acquire half here, for
        // the last arrival) synchronize with every rank's writes.
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
            if now >= next_check || now >= deadline {
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
        check_elements(buf.len(), elem_size, self.opts.chunk_bytes)?;
        if self.size == 1 {
            return Ok(());
        }
        let chunk = self.opts.chunk_bytes / elem_size * elem_size;
        let mut state = lock(&self.collective);
        self.publish_descriptor(&mut state, buf.len(), elem_size);
        let mut offset = 0;
        let mut first = true;
        loop {
            let piece = offset..buf.len().min(offset + chunk);
            let set = state.set();
            // SAFETY: step 1 of a phase: our own region of this phase's set,
            // which nobody reads until the barrier (module docs, "Phases").
            let region = unsafe { self.segment.region_mut(set, self.rank, 0..piece.len()) };
            region.copy_from_slice(&buf[piece.clone()]);
            self.reduce_phase(&mut state, piece.len(), elem_size, combine, first)?;
            // SAFETY: step 5: region 0 is only read until the next phase
            // that uses this set, see the module docs.
            let reduced = unsafe { self.segment.region(set, 0, 0..piece.len()) };
            buf[piece.clone()].copy_from_slice(reduced);
            offset = piece.end;
            first = false;
            if offset == buf.len() {
                return Ok(());
            }
        }
    }

    /// Borrows this rank's scratch region for the next collective, so that
    /// the input can be written straight into shared memory (say, gradients
    /// computed in place) and the result read straight out of it: the
    /// all-reduce then copies nothing. `len` may be up to
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
        state.ops += 1;
    }

    /// Steps 2 to 4 of a phase: barrier, (on an operation's first phase)
    /// descriptor check, reduction of this rank's slice, barrier.
    fn reduce_phase(
        &self,
        state: &mut CollectiveState,
        len: usize,
        elem_size: usize,
        combine: Combine<'_>,
        check_descriptors: bool,
    ) -> Result<(), TransportError> {
        let set = state.set();
        state.phase += 1;
        self.barrier_locked(state)?;
        if check_descriptors {
            if let Err(mismatch) = self.compare_descriptors() {
                // Everyone sees the mismatch; the second barrier keeps the
                // descriptors in place until all have compared, and the
                // group in step for whatever comes next.
                self.barrier_locked(state)?;
                return Err(mismatch);
            }
        }
        let slice = my_slice(len, elem_size, self.size, self.rank);
        if !slice.is_empty() {
            // SAFETY: step 3: this rank alone touches bytes `slice` of region 0
            // until the next barrier, and region 0 is not among the sources.
            let dst = unsafe { self.segment.region_mut(set, 0, slice.clone()) };
            for rank in 1..self.size {
                // SAFETY: step 3: the other regions are only read until the
                // next barrier.
                let src = unsafe { self.segment.region(set, rank, slice.clone()) };
                combine(dst, src);
            }
        }
        self.barrier_locked(state)
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
        match (0..self.size).find(|&rank| describe(rank) != mine) {
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

fn check_elements(len: usize, elem_size: usize, chunk_bytes: usize) -> Result<(), TransportError> {
    if elem_size == 0 || elem_size > chunk_bytes || len % elem_size != 0 {
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
        // SAFETY: step 1 of the phase this buffer will run: our own region of
        // its set, which nobody reads until its first barrier; the `&mut self`
        // borrow ends before `all_reduce` can start that barrier.
        unsafe {
            self.transport
                .segment
                .region_mut(self.state.set(), self.transport.rank, 0..self.len)
        }
    }

    /// Reduces the buffers of all ranks as [`ShmTransport::all_reduce_bytes`]
    /// does and returns the result, still in shared memory.
    pub fn all_reduce(
        mut self,
        elem_size: usize,
        combine: Combine<'_>,
    ) -> Result<Reduced<'a>, TransportError> {
        let transport = self.transport;
        check_elements(self.len, elem_size, transport.opts.chunk_bytes)?;
        let set = self.state.set();
        if transport.size > 1 {
            transport.publish_descriptor(&mut self.state, self.len, elem_size);
            transport.reduce_phase(&mut self.state, self.len, elem_size, combine, true)?;
        }
        Ok(Reduced {
            transport,
            _state: self.state,
            set,
            len: self.len,
        })
    }
}

/// The result of [`SharedBuffer::all_reduce`]; read it in place, and drop it
/// to let this rank's next collective start.
pub struct Reduced<'a> {
    transport: &'a ShmTransport,
    /// Held so that no later phase (which would reuse the other set, and
    /// then ours) starts on this rank while the result is borrowed.
    _state: MutexGuard<'a, CollectiveState>,
    set: usize,
    len: usize,
}

impl Deref for Reduced<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: step 5 of the finished phase: region 0 of its set is only
        // read until phase + 2, which no rank can reach while this rank holds
        // its collective lock and so stays out of phase + 1.
        unsafe { self.transport.segment.region(self.set, 0, 0..self.len) }
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
                    assert!(slice.is_empty() || slice.start % 64 == 0);
                    assert_eq!(slice.len() % elem, 0);
                    next = slice.end;
                }
                assert_eq!(next, len);
            }
        }
    }
}
