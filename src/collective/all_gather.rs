//! All-gather: every rank ends with every rank's slice.

use super::element::Element;
use super::frame::{guarded, recv, send};
use super::partition::Partition;
use super::{ring, Call, CollectiveError};
use crate::transport::Transport;

/// Fills `buf` so that part `i` of `part` holds rank `i`'s part, given that
/// each rank holds its own. Parts may differ in size (`MPI_Allgatherv`).
pub fn all_gather<T: Transport + ?Sized, E: Element>(
    c: Call<'_, T>,
    buf: &mut [E],
    part: &Partition,
) -> Result<(), CollectiveError> {
    guarded(&c, || {
        part.check(c.size(), buf.len())?;
        ring::all_gather(&c, buf, part)
    })
}

/// Concatenates every rank's `mine` in rank order when the lengths are not
/// known in advance: exchanges the lengths first, then runs [`all_gather`]
/// under the same tag. Returns the buffer and its partition.
pub fn all_gather_varied<T: Transport + ?Sized, E: Element>(
    c: Call<'_, T>,
    mine: &[E],
) -> Result<(Vec<E>, Partition), CollectiveError> {
    let rank = c.rank();
    let (mut buf, part) = guarded(&c, || {
        let lens = exchange_small(&c, &(mine.len() as u64).to_le_bytes())?
            .into_iter()
            .enumerate()
            .map(|(from, len)| {
                <[u8; 8]>::try_from(len.as_slice())
                    .ok()
                    .and_then(|b| usize::try_from(u64::from_le_bytes(b)).ok())
                    .ok_or_else(|| CollectiveError::Protocol {
                        rank: c.outer(from),
                        reason: "length does not fit this host".into(),
                    })
            })
            .collect::<Result<Vec<usize>, _>>()?;
        let part = Partition::from_lens(&lens);
        // The total comes from the network: fail instead of aborting on a huge one.
        let mut buf = Vec::new();
        buf.try_reserve_exact(part.len()).map_err(|e| {
            CollectiveError::InvalidArgument(format!("gathering {} elements: {e}", part.len()))
        })?;
        buf.resize(part.len(), E::zeroed());
        buf[part.range(rank)].copy_from_slice(mine);
        Ok((buf, part))
    })?;
    all_gather(c, &mut buf, &part)?;
    Ok((buf, part))
}

/// Sends `mine` (a few bytes, the same length on every rank) to every other
/// rank and returns every rank's, own included, in rank order. One step
/// instead of the ring's n-1, for the small metadata that precedes a call.
pub(crate) fn exchange_small<T: Transport + ?Sized>(
    c: &Call<T>,
    mine: &[u8],
) -> Result<Vec<Vec<u8>>, CollectiveError> {
    let (rank, size) = (c.rank(), c.size());
    for to in (0..size).filter(|&to| to != rank) {
        send(c, to, mine)?;
    }
    (0..size)
        .map(|from| {
            if from == rank {
                Ok(mine.to_vec())
            } else {
                recv(c, from, mine.len())
            }
        })
        .collect()
}
