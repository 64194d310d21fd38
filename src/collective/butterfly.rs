//! Rabenseifner's algorithm: reduce-scatter by recursive halving, then
//! all-gather by recursive doubling, among a power-of-two number of ranks.
//! log2(n) steps each way and every byte of the buffer crosses the network
//! about twice, so it serves small (latency-bound) and large buffers alike.
//!
//! Other world sizes are folded onto p, the largest power of two not above
//! n, as MPICH does: of the first 2(n-p) ranks, each even one hands its
//! whole buffer to the odd one after it and sits out, and gets the result
//! back at the end. The p remaining ranks are the *virtual* ranks 0..p; a
//! virtual rank that stands for a pair owns both partners' parts, which are
//! adjacent, so the halving always splits at part boundaries and any
//! [`Partition`], weighted ones included, is honoured.

use std::ops::Range;

use super::element::{Element, ReduceOp};
use super::frame::{split, step, Merge};
use super::partition::Partition;
use super::{Call, CollectiveError};
use crate::transport::Transport;

/// The fold of one world: who sits out and who stands for whom.
pub(crate) struct Butterfly {
    rank: usize,
    /// Ranks left after folding: the largest power of two ≤ the world size.
    p: usize,
    /// Number of folded pairs: the world size minus `p`.
    extra: usize,
}

impl Butterfly {
    pub(crate) fn new(rank: usize, size: usize) -> Self {
        let p = 1 << size.ilog2();
        Butterfly {
            rank,
            p,
            extra: size - p,
        }
    }

    /// This rank's virtual rank, or `None` if it sits out.
    fn virtual_rank(&self) -> Option<usize> {
        match self.rank {
            r if r >= 2 * self.extra => Some(r - self.extra),
            r if r % 2 == 1 => Some(r / 2),
            _ => None,
        }
    }

    /// The real rank that does virtual rank `v`'s work.
    fn real(&self, v: usize) -> usize {
        if v < self.extra {
            2 * v + 1
        } else {
            v + self.extra
        }
    }

    /// Elements owned by virtual ranks `v`: from the first part of the first
    /// to the last part of the last. Virtual rank `p` maps to part `n`, the end.
    fn span(&self, part: &Partition, v: Range<usize>) -> Range<usize> {
        let first_part = |v: usize| {
            if v < self.extra {
                2 * v
            } else {
                v + self.extra
            }
        };
        part.span(first_part(v.start)..first_part(v.end))
    }

    /// The partner of this rank in the fold, if it has one, and whether it
    /// is the one that sits out.
    fn fold_partner(&self) -> Option<(usize, bool)> {
        (self.rank < 2 * self.extra).then(|| {
            let sits_out = self.rank.is_multiple_of(2);
            (self.rank ^ 1, sits_out)
        })
    }

    /// Leaves each virtual rank's span of `buf` reduced over all ranks (not
    /// finished for `Avg`).
    ///
    /// Out of place, with an `input` as long as `buf`: the first step reads
    /// this rank's values from `input` and writes `buf` (see [`swap`]), so
    /// nothing is copied in first: without that copy a 256-512 KiB
    /// all-reduce over TCP on 4 ranks took ~25% less time. The spans left
    /// unwritten are the ones an all-gather fills.
    pub(crate) fn reduce_scatter<T: Transport + ?Sized, E: Element>(
        &self,
        c: &Call<T>,
        mut input: Option<&[E]>,
        buf: &mut [E],
        op: ReduceOp,
        part: &Partition,
    ) -> Result<(), CollectiveError> {
        self.fold_in(c, &mut input, buf, op)?;
        let Some(v) = self.virtual_rank() else {
            return Ok(());
        };
        let (mut lo, mut hi) = (0, self.p);
        let mut mask = self.p / 2;
        while mask > 0 {
            let mid = lo + mask;
            let (keep, give) = if v < mid {
                (lo..mid, mid..hi)
            } else {
                (mid..hi, lo..mid)
            };
            let partner = self.real(v ^ mask);
            let (give, keep_span) = (self.span(part, give), self.span(part, keep.clone()));
            swap(c, partner, &mut input, buf, give, keep_span, op)?;
            (lo, hi) = (keep.start, keep.end);
            mask /= 2;
        }
        // One rank alone takes no step that reads `input`.
        if let Some(input) = input {
            buf.copy_from_slice(input);
        }
        Ok(())
    }

    /// The fold's first half: a rank that sits out hands its whole buffer
    /// (or `input`) to its partner, which adds it in; either way `input`
    /// is read.
    fn fold_in<T: Transport + ?Sized, E: Element>(
        &self,
        c: &Call<T>,
        input: &mut Option<&[E]>,
        buf: &mut [E],
        op: ReduceOp,
    ) -> Result<(), CollectiveError> {
        match (self.fold_partner(), input.take()) {
            (Some((partner, true)), mine) => step(c, Some((partner, mine.unwrap_or(buf))), None),
            (Some((partner, false)), mine) => {
                let merge = mine.map_or(Merge::Reduce(op), |mine| Merge::ReduceOnto(op, mine));
                step(c, None, Some((partner, buf, merge)))
            }
            (None, mine) => {
                *input = mine;
                Ok(())
            }
        }
    }

    /// The fold's second half: the partner hands the whole result back to
    /// the rank that sat out.
    fn fold_out<T: Transport + ?Sized, E: Element>(
        &self,
        c: &Call<T>,
        buf: &mut [E],
    ) -> Result<(), CollectiveError> {
        match self.fold_partner() {
            Some((partner, true)) => step(c, None, Some((partner, buf, Merge::Copy))),
            Some((partner, false)) => step(c, Some((partner, &*buf)), None),
            None => Ok(()),
        }
    }

    /// This rank's span after [`Butterfly::reduce_scatter`]; empty if it sits out.
    pub(crate) fn owned(&self, part: &Partition) -> Range<usize> {
        self.virtual_rank()
            .map_or(0..0, |v| self.span(part, v..v + 1))
    }

    /// After [`Butterfly::reduce_scatter`]: hands the partner that sat out
    /// its own part, so every rank owns part `rank` as in any reduce-scatter.
    pub(crate) fn return_parts<T: Transport + ?Sized, E: Element>(
        &self,
        c: &Call<T>,
        buf: &mut [E],
        part: &Partition,
    ) -> Result<(), CollectiveError> {
        match self.fold_partner() {
            Some((partner, true)) => step(
                c,
                None,
                Some((partner, &mut buf[part.range(self.rank)], Merge::Copy)),
            ),
            Some((partner, false)) => step(c, Some((partner, &buf[part.range(partner)])), None),
            None => Ok(()),
        }
    }

    /// Reduces the whole of `buf` over all ranks by recursive doubling:
    /// at each of log2(p) steps a virtual rank swaps its whole buffer with
    /// a partner and adds the two, the fewest round trips of any
    /// algorithm, for buffers where latency, not bytes, is the cost. Both
    /// partners add the same two values (`op` is commutative), so every
    /// rank ends with the same bits. Not finished for `Avg`.
    pub(crate) fn doubling<T: Transport + ?Sized, E: Element>(
        &self,
        c: &Call<T>,
        mut input: Option<&[E]>,
        buf: &mut [E],
        op: ReduceOp,
    ) -> Result<(), CollectiveError> {
        self.fold_in(c, &mut input, buf, op)?;
        if let Some(v) = self.virtual_rank() {
            let mut mask = 1;
            while mask < self.p {
                let partner = self.real(v ^ mask);
                swap(c, partner, &mut input, buf, 0..buf.len(), 0..buf.len(), op)?;
                mask *= 2;
            }
            if let Some(input) = input {
                buf.copy_from_slice(input);
            }
        }
        self.fold_out(c, buf)
    }

    /// Given each virtual rank's span reduced, gives every rank the whole
    /// buffer: recursive doubling, then the result to the partners that sat out.
    pub(crate) fn all_gather<T: Transport + ?Sized, E: Element>(
        &self,
        c: &Call<T>,
        buf: &mut [E],
        part: &Partition,
    ) -> Result<(), CollectiveError> {
        if let Some(v) = self.virtual_rank() {
            let mut mask = 1;
            while mask < self.p {
                let lo = v & !(mask - 1);
                let other = lo ^ mask;
                let (out, into) = split(
                    buf,
                    self.span(part, lo..lo + mask),
                    self.span(part, other..other + mask),
                );
                let partner = self.real(v ^ mask);
                step(c, Some((partner, out)), Some((partner, into, Merge::Copy)))?;
                mask *= 2;
            }
        }
        self.fold_out(c, buf)
    }
}

/// One exchange with `partner`: sends this rank's values in `give` while
/// reducing the partner's into `keep` of `buf`. The values are read from
/// an out-of-place call's `input` while it is unread (the reduction then
/// writes `buf[keep]` from `input[keep]` and what arrives, and `input` is
/// used up), else from `buf`, copied first where `give` and `keep` overlap.
fn swap<T: Transport + ?Sized, E: Element>(
    c: &Call<T>,
    partner: usize,
    input: &mut Option<&[E]>,
    buf: &mut [E],
    give: Range<usize>,
    keep: Range<usize>,
    op: ReduceOp,
) -> Result<(), CollectiveError> {
    let overlap = give.start < keep.end && keep.start < give.end;
    match input.take() {
        Some(mine) => {
            let merge = Merge::ReduceOnto(op, &mine[keep.clone()]);
            step(
                c,
                Some((partner, &mine[give])),
                Some((partner, &mut buf[keep], merge)),
            )
        }
        None if overlap => {
            let mine = buf[give].to_vec();
            step(
                c,
                Some((partner, &mine)),
                Some((partner, &mut buf[keep], Merge::Reduce(op))),
            )
        }
        None => {
            let (out, into) = split(buf, give, keep);
            step(
                c,
                Some((partner, out)),
                Some((partner, into, Merge::Reduce(op))),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_world_covers_every_part_once() {
        for n in 1..=13 {
            let part = Partition::equal(100, n);
            let mut owned: Vec<Range<usize>> = (0..n)
                .map(|r| Butterfly::new(r, n).owned(&part))
                .filter(|r| !r.is_empty())
                .collect();
            owned.sort_by_key(|r| r.start);
            let ends: Vec<usize> = owned.iter().map(|r| r.end).collect();
            let starts: Vec<usize> = owned.iter().map(|r| r.start).skip(1).collect();
            assert_eq!(owned[0].start, 0, "n {n}");
            assert_eq!(&ends[..ends.len() - 1], &starts[..], "n {n}");
            assert_eq!(*ends.last().unwrap(), 100, "n {n}");
        }
    }
}
