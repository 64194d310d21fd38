//! All-reduce: reduce-scatter, finish each reduced part once, all-gather.

use super::butterfly::Butterfly;
use super::element::{finish, Element, ReduceOp};
use super::frame::guarded;
use super::partition::Partition;
use super::{ring, Call, CollectiveError};
use crate::transport::Transport;

/// Which algorithm a reduce-scatter or all-reduce uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AllReduceAlgorithm {
    /// Butterfly, except [`Ring`](AllReduceAlgorithm::Ring) for buffers of at
    /// least [`RING_MIN_BYTES`] on worlds whose size is not a power of two.
    #[default]
    Auto,
    /// Rabenseifner: recursive halving then doubling, log2(n) steps each.
    Butterfly,
    /// Ring: 2(n-1) steps, the bandwidth baseline.
    Ring,
}

/// From this many bytes, `Auto` prefers the ring on worlds that are not a
/// power of two, where the butterfly's fold sends the whole buffer twice
/// more between the folded pairs. A first guess, to be set from
/// `swarmrun bench` measurements over TCP.
pub const RING_MIN_BYTES: usize = 1 << 20;

/// The algorithm a call actually runs.
pub(crate) enum Chosen {
    Butterfly,
    Ring,
}

impl AllReduceAlgorithm {
    pub(crate) fn resolve(self, bytes: usize, size: usize) -> Chosen {
        match self {
            Self::Auto if bytes >= RING_MIN_BYTES && !size.is_power_of_two() => Chosen::Ring,
            Self::Auto | Self::Butterfly => Chosen::Butterfly,
            Self::Ring => Chosen::Ring,
        }
    }
}

/// Reduces `buf` over all ranks with `op`, in place, splitting the work
/// equally.
pub fn all_reduce<T: Transport + ?Sized, E: Element>(
    c: Call<'_, T>,
    buf: &mut [E],
    op: ReduceOp,
    algorithm: AllReduceAlgorithm,
) -> Result<(), CollectiveError> {
    all_reduce_partitioned(
        c,
        buf,
        op,
        algorithm,
        &Partition::equal(buf.len(), c.size()),
    )
}

/// [`all_reduce`] where rank `i` reduces part `i` of `part`, e.g. a
/// [`Partition::weighted`] one that gives a slow rank a small part. With the
/// butterfly a rank's part sets only its last halving step; with the ring
/// every rank handles every part in turn, so weights balance the final
/// reduction work, not all traffic.
pub fn all_reduce_partitioned<T: Transport + ?Sized, E: Element>(
    c: Call<'_, T>,
    buf: &mut [E],
    op: ReduceOp,
    algorithm: AllReduceAlgorithm,
    part: &Partition,
) -> Result<(), CollectiveError> {
    guarded(&c, || {
        part.check(c.size(), buf.len())?;
        let (rank, size) = (c.rank(), c.size());
        match algorithm.resolve(std::mem::size_of_val(buf), size) {
            Chosen::Ring => {
                ring::reduce_scatter(&c, buf, op, part)?;
                finish(&mut buf[part.range(rank)], op, size);
                ring::all_gather(&c, buf, part)
            }
            Chosen::Butterfly => {
                let butterfly = Butterfly::new(rank, size);
                butterfly.reduce_scatter(&c, buf, op, part)?;
                finish(&mut buf[butterfly.owned(part)], op, size);
                butterfly.all_gather(&c, buf, part)
            }
        }
    })
}
