//! Ring algorithms: n-1 steps, each rank sending one part to the next rank
//! while receiving one from the previous. Every link carries the same load
//! at every step, which makes the ring the bandwidth baseline for large
//! buffers (NCCL's default); its cost is 2(n-1) latencies per all-reduce.

use super::element::{Element, ReduceOp};
use super::frame::{split, step, Merge};
use super::partition::Partition;
use super::{Call, CollectiveError};
use crate::transport::Transport;

/// Leaves part `rank` of `buf` reduced over all ranks (not yet finished for
/// `Avg`); other parts are left partly reduced.
///
/// Part `j` starts at rank j+1, and each rank after it adds its own values,
/// so the order of additions is fixed by the ring.
///
/// Out of place, with an `input` (this rank's contribution, as long as
/// `buf`): `buf` is written, never read before it is. The first step sends
/// from `input` and every step adds what it receives to `input`'s
/// elements, so nothing is copied into `buf` first (as NCCL reads
/// `sendbuff` and writes `recvbuff`); the part left unwritten is one an
/// all-gather fills.
pub(crate) fn reduce_scatter<T: Transport + ?Sized, E: Element>(
    c: &Call<T>,
    input: Option<&[E]>,
    buf: &mut [E],
    op: ReduceOp,
    part: &Partition,
) -> Result<(), CollectiveError> {
    match input {
        // One rank takes no step to read `input` in: its part is all of it.
        Some(input) if c.size() == 1 => {
            buf.copy_from_slice(input);
            Ok(())
        }
        _ => run(c, buf, input, part, 1, Some(op)),
    }
}

/// Fills every part of `buf` from its owner, given that each rank holds its own part.
pub(crate) fn all_gather<T: Transport + ?Sized, E: Element>(
    c: &Call<T>,
    buf: &mut [E],
    part: &Partition,
) -> Result<(), CollectiveError> {
    run(c, buf, None, part, 0, None)
}

/// At step s rank r sends part r-s-lag to r+1 and merges part r-s-lag-1
/// from r-1 (reducing with `op`, or copying without): with lag 1 the last
/// part merged is r's own (reduce-scatter), with lag 0 the first part
/// sent is (all-gather). With an `input`, the part merged into at each
/// step is one not written before, so it is reduced onto `input`'s
/// elements, and the first part sent is `input`'s.
fn run<T: Transport + ?Sized, E: Element>(
    c: &Call<T>,
    buf: &mut [E],
    input: Option<&[E]>,
    part: &Partition,
    lag: usize,
    op: Option<ReduceOp>,
) -> Result<(), CollectiveError> {
    let (rank, n) = (c.rank(), c.size());
    let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
    for s in 0..n - 1 {
        let (out, into) = (
            (rank + 2 * n - s - lag) % n,
            (rank + 2 * n - s - lag - 1) % n,
        );
        let merge = match (op, input) {
            (None, _) => Merge::Copy,
            (Some(op), None) => Merge::Reduce(op),
            (Some(op), Some(input)) => Merge::ReduceOnto(op, &input[part.range(into)]),
        };
        match input.filter(|_| s == 0) {
            Some(input) => step(
                c,
                Some((next, &input[part.range(out)])),
                Some((prev, &mut buf[part.range(into)], merge)),
            )?,
            None => {
                let (out, into) = split(buf, part.range(out), part.range(into));
                step(c, Some((next, out)), Some((prev, into, merge)))?;
            }
        }
    }
    Ok(())
}
