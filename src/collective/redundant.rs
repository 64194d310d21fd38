//! Redundant all-reduce, for swarms where a rank may lie about its share of
//! the work: every slice is reduced by `copies` ranks (its owner and the
//! next `copies - 1`), each copy's blake3 digest goes to everyone, and the
//! result is distributed only if all copies agree.
//!
//! Each holder receives the slice straight from every rank and adds the
//! contributions in rank order, so honest copies are bit-identical whoever
//! computes them. The price is `copies` times the reduce-scatter traffic.

use super::all_gather::exchange_small;
use super::element::{finish, Element, ReduceOp};
use super::frame::{guarded, step, Merge};
use super::partition::Partition;
use super::{ring, Call, CollectiveError};
use crate::transport::Transport;

/// Called with each slice a rank has reduced (slice index, values) before
/// it is digested: the hook for tests and for faults that corrupt a result.
pub type SliceTamper<'a, E> = dyn Fn(usize, &mut [E]) + Sync + 'a;

/// [`all_reduce`](super::all_reduce) of `buf` over an equal partition, with
/// each slice reduced by `copies` ranks (1 ≤ copies ≤ world size) and
/// checked. On [`CollectiveError::SliceMismatch`], which every rank reports
/// alike, `buf` holds no result.
pub fn all_reduce_redundant<T: Transport + ?Sized, E: Element>(
    c: Call<'_, T>,
    buf: &mut [E],
    op: ReduceOp,
    copies: usize,
    tamper: Option<&SliceTamper<'_, E>>,
) -> Result<(), CollectiveError> {
    match all_reduce_redundant_checked(c, buf, op, copies, tamper)?.mismatch {
        Some((slice, ranks)) => Err(CollectiveError::SliceMismatch { slice, ranks }),
        None => Ok(()),
    }
}

/// What one rank knows after [`all_reduce_redundant_checked`]: enough for
/// an auditor to tell, by recomputing a slice from the contributions, which
/// holders reduced it wrong, including holders that agreed on a wrong copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceCopies {
    /// Each slice this rank reduced, ascending, and its copy's blake3 (of
    /// the elements' native bytes).
    pub held: Vec<(usize, blake3::Hash)>,
    /// The first slice whose copies differ, with the holders against the
    /// majority (all of them when there is none), as outer ranks. `None`:
    /// the copies agreed and the buffer holds the result.
    pub mismatch: Option<(usize, Vec<usize>)>,
}

/// [`all_reduce_redundant`] that reports a mismatch, with this rank's copy
/// digests, instead of failing on it: the caller decides who is believed.
/// On a mismatch `buf` is left as it was given (this rank's contribution).
pub fn all_reduce_redundant_checked<T: Transport + ?Sized, E: Element>(
    c: Call<'_, T>,
    buf: &mut [E],
    op: ReduceOp,
    copies: usize,
    tamper: Option<&SliceTamper<'_, E>>,
) -> Result<SliceCopies, CollectiveError> {
    all_reduce_redundant_moved(c, buf, (op, copies), tamper, &mut OverTransport)
}

/// How the slices of a redundant all-reduce move: over the call's
/// transport ([`OverTransport`]), or through another fabric (NCCL between
/// GPUs, `crate::gpu::nccl`). Digests, their comparison and the blame go
/// over the call's transport either way, so a mover only carries values.
pub trait SliceMover<E: Element> {
    /// Each slice in `held` (ascending) reduced over every rank's
    /// `data[part.range(j)]` with `op`, `how` being `(part, copies, op)`,
    /// the same bits on every holder; every
    /// rank of the call takes part for every slice, held or not.
    fn reduce_held<T: Transport + ?Sized>(
        &mut self,
        c: &Call<'_, T>,
        data: &[E],
        how: (&Partition, usize, ReduceOp),
        held: &[usize],
    ) -> Result<Vec<Vec<E>>, CollectiveError>;

    /// Every rank's slice `buf[part.range(rank)]` to every rank.
    fn all_gather<T: Transport + ?Sized>(
        &mut self,
        c: &Call<'_, T>,
        buf: &mut [E],
        part: &Partition,
    ) -> Result<(), CollectiveError>;
}

/// Slices over the call's transport: each holder receives its slices
/// straight from every rank and adds them in rank order.
pub struct OverTransport;

impl<E: Element> SliceMover<E> for OverTransport {
    fn reduce_held<T: Transport + ?Sized>(
        &mut self,
        c: &Call<'_, T>,
        data: &[E],
        (part, copies, op): (&Partition, usize, ReduceOp),
        held: &[usize],
    ) -> Result<Vec<Vec<E>>, CollectiveError> {
        std::thread::scope(|s| {
            let sender = s.spawn(|| send_slices(c, data, part, copies));
            let reduced: Result<Vec<Vec<E>>, _> = held
                .iter()
                .map(|&j| reduce_in_rank_order(c, data, part, j, op))
                .collect();
            let sent = sender
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            sent.and(reduced)
        })
    }

    fn all_gather<T: Transport + ?Sized>(
        &mut self,
        c: &Call<'_, T>,
        buf: &mut [E],
        part: &Partition,
    ) -> Result<(), CollectiveError> {
        ring::all_gather(c, buf, part)
    }
}

/// [`all_reduce_redundant_checked`] with the slices moved by `mover`.
pub fn all_reduce_redundant_moved<T: Transport + ?Sized, E: Element, M: SliceMover<E>>(
    c: Call<'_, T>,
    buf: &mut [E],
    (op, copies): (ReduceOp, usize),
    tamper: Option<&SliceTamper<'_, E>>,
    mover: &mut M,
) -> Result<SliceCopies, CollectiveError> {
    let (rank, n) = (c.rank(), c.size());
    guarded(&c, || {
        if copies == 0 || copies > n {
            return Err(CollectiveError::InvalidArgument(format!(
                "{copies} copies of each slice in a world of {n}"
            )));
        }
        let part = Partition::equal(buf.len(), n);
        let held = held_slices(rank, n, copies);
        let mut reduced = mover.reduce_held(&c, buf, (&part, copies, op), &held)?;
        let mut digests = Vec::with_capacity(blake3::OUT_LEN * held.len());
        let mut copy_digests = Vec::with_capacity(held.len());
        for (&j, slice) in held.iter().zip(&mut reduced) {
            finish(slice, op, n);
            if let Some(tamper) = tamper {
                tamper(j, slice);
            }
            let digest = blake3::hash(bytemuck::cast_slice(slice));
            digests.extend_from_slice(digest.as_bytes());
            copy_digests.push((j, digest));
        }
        let table = exchange_small(&c, &digests)?;
        let mismatch = first_mismatch(&table, n, copies)
            .map(|(slice, ranks)| (slice, ranks.into_iter().map(|r| c.outer(r)).collect()));
        if mismatch.is_none() {
            let own = held.iter().position(|&j| j == rank).unwrap_or_default();
            buf[part.range(rank)].copy_from_slice(&reduced[own]);
            mover.all_gather(&c, buf, &part)?;
        }
        Ok(SliceCopies {
            held: copy_digests,
            mismatch,
        })
    })
}

/// Ranks that reduce slice `j` of an [`all_reduce_redundant`] among `n`
/// ranks with `copies` copies: its owner `j` first, then the next ranks
/// around.
pub fn slice_holders(j: usize, n: usize, copies: usize) -> Vec<usize> {
    holders(j, n, copies).collect()
}

/// Ranks that reduce slice `j`: its owner first.
fn holders(j: usize, n: usize, copies: usize) -> impl Iterator<Item = usize> {
    (0..copies).map(move |k| (j + k) % n)
}

/// Slices `rank` reduces, ascending: the order in which every sender sends
/// them and so the order in which they arrive.
fn held_slices(rank: usize, n: usize, copies: usize) -> Vec<usize> {
    let mut held: Vec<usize> = (0..copies).map(|k| (rank + n - k) % n).collect();
    held.sort_unstable();
    held
}

fn send_slices<T: Transport + ?Sized, E: Element>(
    c: &Call<'_, T>,
    data: &[E],
    part: &Partition,
    copies: usize,
) -> Result<(), CollectiveError> {
    let (rank, n) = (c.rank(), c.size());
    for j in 0..n {
        for holder in holders(j, n, copies).filter(|&h| h != rank) {
            step(c, Some((holder, &data[part.range(j)])), None)?;
        }
    }
    Ok(())
}

/// Slice `j` summed as `((x0 + x1) + x2) + ...`, the same on every holder.
fn reduce_in_rank_order<T: Transport + ?Sized, E: Element>(
    c: &Call<'_, T>,
    data: &[E],
    part: &Partition,
    j: usize,
    op: ReduceOp,
) -> Result<Vec<E>, CollectiveError> {
    let mut acc = vec![E::zeroed(); part.range(j).len()];
    for k in 0..c.size() {
        let merge = if k == 0 {
            Merge::Copy
        } else {
            Merge::Reduce(op)
        };
        if k == c.rank() {
            merge.apply(&mut acc, bytemuck::cast_slice(&data[part.range(j)]));
        } else {
            step(c, None, Some((k, &mut acc[..], merge)))?;
        }
    }
    Ok(acc)
}

/// The first slice whose copies differ, with the holders that disagree with
/// the majority digest, or all its holders if no digest has a majority.
/// `table[r]` holds rank r's digests in [`held_slices`] order.
fn first_mismatch(table: &[Vec<u8>], n: usize, copies: usize) -> Option<(usize, Vec<usize>)> {
    (0..n).find_map(|j| {
        let votes: Vec<(usize, &[u8])> = holders(j, n, copies)
            .map(|h| {
                let at = held_slices(h, n, copies)
                    .iter()
                    .position(|&s| s == j)
                    .unwrap_or_default();
                (
                    h,
                    &table[h][at * blake3::OUT_LEN..(at + 1) * blake3::OUT_LEN],
                )
            })
            .collect();
        let count = |d: &[u8]| votes.iter().filter(|(_, e)| *e == d).count();
        let majority = votes
            .iter()
            .map(|(_, d)| *d)
            .find(|d| 2 * count(d) > copies);
        let mut dissent: Vec<usize> = votes
            .iter()
            .filter(|(_, d)| Some(*d) != majority)
            .map(|(h, _)| *h)
            .collect();
        dissent.sort_unstable();
        (!dissent.is_empty()).then_some((j, dissent))
    })
}
