//! Ring algorithms: n-1 steps, each rank sending one part to the next rank
//! while receiving one from the previous. Every link carries the same load
//! at every step, which makes the ring the bandwidth baseline for large
//! buffers (NCCL's default); its cost is 2(n-1) latencies per all-reduce.
//!
//! **Chunks go on as they arrive.** What a rank sends at step s+1 is the
//! part it merged at step s (in the all-reduce, its own finished part is
//! the first it sends in the all-gather), so each [`CHUNK_BYTES`] chunk is
//! handed to the sending thread the moment it is merged, not at the next
//! step: the kernel copies it out while it is still in this core's cache,
//! and no rank waits at a step's end for its slowest chunk. A chunk lent to
//! the sending thread comes back once sent, before anything is merged into
//! it again (the all-gather writes the parts the reduce-scatter sent).
//!
//! [`CHUNK_BYTES`]: super::CHUNK_BYTES

use std::ops::Range;
use std::sync::mpsc::{channel, Receiver};

use super::element::{finish, Element, ReduceOp};
use super::frame::{chunks, recv, recv_into, send, Merge};
use super::partition::Partition;
use super::{Call, CollectiveError};
use crate::transport::Transport;

/// Leaves part `rank` of `buf` reduced over all ranks (not yet finished for
/// `Avg`); other parts are left partly reduced.
///
/// Part `j` starts at rank j+1, and each rank after it adds its own values,
/// so the order of additions is fixed by the ring.
pub(crate) fn reduce_scatter<T: Transport + ?Sized, E: Element>(
    c: &Call<T>,
    buf: &mut [E],
    op: ReduceOp,
    part: &Partition,
) -> Result<(), CollectiveError> {
    let n = c.size();
    Ring { c, part, op }.run(None, buf, 0..n - 1, false)
}

/// Fills every part of `buf` from its owner, given that each rank holds its own part.
pub(crate) fn all_gather<T: Transport + ?Sized, E: Element>(
    c: &Call<T>,
    buf: &mut [E],
    part: &Partition,
) -> Result<(), CollectiveError> {
    let n = c.size();
    // The all-gather only copies: no op is applied.
    let op = ReduceOp::Sum;
    Ring { c, part, op }.run(None, buf, n - 1..2 * n - 2, false)
}

/// [`reduce_scatter`], [`finish`] of this rank's part, then [`all_gather`],
/// as one pipeline: each chunk of the finished part goes on as soon as it
/// is finished.
///
/// Out of place, with an `input` (this rank's contribution, as long as
/// `buf`): `buf` is written, never read before it is. The first part is
/// sent from `input` and every reduce-scatter step adds what it receives
/// to `input`'s elements, so nothing is copied into `buf` first (as NCCL
/// reads `sendbuff` and writes `recvbuff`); the part left unwritten there
/// is one the all-gather fills.
pub(crate) fn all_reduce<T: Transport + ?Sized, E: Element>(
    c: &Call<T>,
    input: Option<&[E]>,
    buf: &mut [E],
    op: ReduceOp,
    part: &Partition,
) -> Result<(), CollectiveError> {
    let n = c.size();
    Ring { c, part, op }.run(input, buf, 0..2 * n - 2, true)
}

struct Ring<'c, 't, T: ?Sized> {
    c: &'c Call<'t, T>,
    part: &'c Partition,
    op: ReduceOp,
}

/// What the sending thread sends, in order.
enum Out<'b, E> {
    /// A chunk of the caller's input.
    Input(&'b [E]),
    /// Chunk `.0` of `buf`, handed back once sent.
    Lent(usize, &'b mut [E]),
}

impl<T: Transport + ?Sized> Ring<'_, '_, T> {
    /// The part the `k`-th receive of the whole all-reduce fills: receives
    /// 0..n-1 are the reduce-scatter's, adding into part r-k-2 (mod n),
    /// and the all-gather's n-1..2n-2 copy into the parts after, which
    /// continue the same sequence.
    fn part_of(&self, k: usize) -> usize {
        let (r, n) = (self.c.rank(), self.c.size());
        (r + 2 * n - k % n - 2) % n
    }

    /// Runs the receives `receives` of the all-reduce's sequence (see
    /// [`Ring::part_of`]), after sending the part the first of them
    /// follows; every received part but the last is sent on. `finish_own`:
    /// this rank's part is finished as it completes, before it goes on.
    fn run<E: Element>(
        &self,
        input: Option<&[E]>,
        buf: &mut [E],
        receives: Range<usize>,
        finish_own: bool,
    ) -> Result<(), CollectiveError> {
        let (c, r, n) = (self.c, self.c.rank(), self.c.size());
        // `input` is what the first send reads, and only the whole
        // sequence starts from it.
        debug_assert!(input.is_none() || receives.start == 0);
        if n == 1 {
            // One rank takes no step to read `input` in: its part is all of it.
            if let Some(input) = input {
                buf.copy_from_slice(input);
            }
            if finish_own {
                finish(buf, self.op, n);
            }
            return Ok(());
        }
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let mut chunks = Chunks::new(buf, self.part);
        std::thread::scope(|s| {
            let (outbox, to_send) = channel::<Out<E>>();
            let (hand_back, returned) = channel();
            let sender = s.spawn(move || {
                // After a failed send the rest are not attempted, but lent
                // chunks still come back, so the receiving side never
                // waits for one: its own receives end the call.
                let mut sent = Ok(());
                let mut send_on = |values: &[E]| {
                    if sent.is_ok() {
                        sent = send(c, next, bytemuck::cast_slice(values));
                    }
                };
                for out in to_send {
                    match out {
                        Out::Input(values) => send_on(values),
                        Out::Lent(id, values) => {
                            send_on(values);
                            // The receiving side has gone only if it failed.
                            let _ = hand_back.send((id, values));
                        }
                    }
                }
                sent
            });
            let first = (r + 2 * n - receives.start - 1) % n;
            for id in chunks.of_part(first) {
                let out = match input {
                    Some(input) => Out::Input(&input[chunks.range(id)]),
                    None => Out::Lent(id, chunks.take(id, &returned)),
                };
                // The sending thread ends only after this side drops `outbox`.
                let _ = outbox.send(out);
            }
            let last = receives.end - 1;
            let received = receives.clone().try_for_each(|k| {
                let p = self.part_of(k);
                for id in chunks.of_part(p) {
                    let at = chunks.range(id);
                    let dst = chunks.take(id, &returned);
                    if k >= n - 1 {
                        // The all-gather only copies: the transport places
                        // the frame straight into the chunk.
                        recv_into(c, prev, bytemuck::cast_slice_mut(dst))?;
                    } else {
                        let frame = recv(c, prev, std::mem::size_of_val(dst))?;
                        let merge = match input {
                            Some(input) => Merge::ReduceOnto(self.op, &input[at]),
                            None => Merge::Reduce(self.op),
                        };
                        merge.apply(dst, 0..dst.len(), &frame);
                    }
                    if finish_own && p == r {
                        finish(dst, self.op, n);
                    }
                    if k == last {
                        chunks.put(id, dst);
                    } else {
                        let _ = outbox.send(Out::Lent(id, dst));
                    }
                }
                Ok(())
            });
            drop(outbox);
            let sent = sender
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            received.and(sent)
        })
    }
}

/// `buf` cut into every part's [`chunks`], each a slice of its own that
/// can be lent to the sending thread and taken back.
struct Chunks<'b, E> {
    slots: Vec<Option<&'b mut [E]>>,
    /// Each chunk's range in `buf`.
    ranges: Vec<Range<usize>>,
    /// Chunk ids of part `p`: `first[p]..first[p + 1]`.
    first: Vec<usize>,
}

impl<'b, E: Element> Chunks<'b, E> {
    fn new(buf: &'b mut [E], part: &Partition) -> Self {
        let mut ranges = Vec::new();
        let mut first = vec![0];
        for p in 0..part.parts() {
            let span = part.range(p);
            ranges
                .extend(chunks::<E>(span.len()).map(|r| span.start + r.start..span.start + r.end));
            first.push(ranges.len());
        }
        let mut slots = Vec::with_capacity(ranges.len());
        let mut rest = buf;
        for r in &ranges {
            let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(r.len());
            slots.push(Some(chunk));
            rest = tail;
        }
        Chunks {
            slots,
            ranges,
            first,
        }
    }

    fn of_part(&self, p: usize) -> Range<usize> {
        self.first[p]..self.first[p + 1]
    }

    fn range(&self, id: usize) -> Range<usize> {
        self.ranges[id].clone()
    }

    /// Chunk `id`, waiting for the sending thread to hand it back if it is
    /// lent. Only the all-gather takes lent chunks (a reduce-scatter
    /// merges each part before it first sends it), and they were lent in
    /// the reduce-scatter. No rank waits here during its reduce-scatter,
    /// so every rank reads all of its predecessor's reduce-scatter frames,
    /// and each wait ends once the next rank has read the lent chunk.
    fn take(&mut self, id: usize, returned: &Receiver<(usize, &'b mut [E])>) -> &'b mut [E] {
        while self.slots[id].is_none() {
            match returned.recv() {
                Ok((back, chunk)) => self.slots[back] = Some(chunk),
                // Unreachable while this side holds the sending thread's
                // channel: it hands every chunk back before it ends.
                Err(_) => break,
            }
        }
        self.slots[id].take().unwrap_or_default()
    }

    fn put(&mut self, id: usize, chunk: &'b mut [E]) {
        self.slots[id] = Some(chunk);
    }
}
