//! Reduce-scatter: each rank ends with its own part reduced over all ranks.

use std::ops::Range;

use super::all_reduce::{AllReduceAlgorithm, Chosen};
use super::butterfly::Butterfly;
use super::element::{finish, Element, ReduceOp};
use super::frame::guarded;
use super::partition::Partition;
use super::{ring, Call, CollectiveError};
use crate::transport::Transport;

/// Reduces part `rank` of `buf` over all ranks, in place, and returns its
/// range. The rest of `buf` is scratch afterwards: it holds partial sums.
pub fn reduce_scatter<T: Transport + ?Sized, E: Element>(
    c: Call<'_, T>,
    buf: &mut [E],
    op: ReduceOp,
    algorithm: AllReduceAlgorithm,
    part: &Partition,
) -> Result<Range<usize>, CollectiveError> {
    guarded(&c, || {
        part.check(c.size(), buf.len())?;
        let (rank, size) = (c.rank(), c.size());
        match algorithm.resolve(std::mem::size_of_val(buf)) {
            Chosen::Ring => ring::reduce_scatter(&c, buf, op, part)?,
            // Recursive halving is already log2(n) steps: the doubling's
            // whole-buffer swaps would only move more bytes.
            Chosen::Doubling | Chosen::Butterfly => {
                let butterfly = Butterfly::new(rank, size);
                butterfly.reduce_scatter(&c, None, buf, op, part)?;
                butterfly.return_parts(&c, buf, part)?;
            }
        }
        let mine = part.range(rank);
        finish(&mut buf[mine.clone()], op, size);
        Ok(mine)
    })
}
