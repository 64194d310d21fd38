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
    /// Doubling below [`DOUBLING_MAX_BYTES`], butterfly below
    /// [`RING_MIN_BYTES`], ring from there on.
    #[default]
    Auto,
    /// Recursive doubling: log2(n) steps, each swapping the whole buffer;
    /// the fewest round trips, for small buffers (a reduce-scatter runs
    /// the butterfly's halving instead, already log2(n) steps).
    Doubling,
    /// Rabenseifner: recursive halving then doubling, log2(n) steps each.
    Butterfly,
    /// Ring: 2(n-1) steps, the bandwidth baseline.
    Ring,
}

/// From this many bytes `Auto` picks the ring. Measured in one process
/// (`LocalTransport`, 3 to 8 ranks on 2 cores, release build): the
/// butterfly is ahead up to 1-2 MiB, the ring from about 4 MiB (16 MiB:
/// 11-24 ms against 15-31 ms), worst for the butterfly on worlds that are
/// not a power of two, where its fold moves the whole buffer twice more.
/// Over a WAN the ring's 2(n-1) latencies weigh more: re-measure with
/// `swarmrun bench` on the real transport.
pub const RING_MIN_BYTES: usize = 4 << 20;

/// Below this many bytes `Auto` picks recursive doubling. Measured over
/// TCP on loopback (`bench allreduce -n 4 --transport tcp --algorithm
/// doubling`, then `butterfly`, the 2-core AMD EPYC VM): 1 KiB 82 us
/// against 146, 16 KiB 102 against 152, 64 KiB 189 against 197, 128 KiB
/// 242 against 248, 256 KiB 428 against 359.
pub const DOUBLING_MAX_BYTES: usize = 128 << 10;

/// The algorithm a call actually runs.
pub(crate) enum Chosen {
    Doubling,
    Butterfly,
    Ring,
}

impl AllReduceAlgorithm {
    /// Every algorithm `Auto` chooses among: for tests and benchmarks that
    /// try each.
    pub const CHOSEN: [AllReduceAlgorithm; 3] = [Self::Doubling, Self::Butterfly, Self::Ring];

    pub(crate) fn resolve(self, bytes: usize) -> Chosen {
        match self {
            Self::Auto if bytes < DOUBLING_MAX_BYTES => Chosen::Doubling,
            Self::Auto if bytes >= RING_MIN_BYTES => Chosen::Ring,
            Self::Auto | Self::Butterfly => Chosen::Butterfly,
            Self::Doubling => Chosen::Doubling,
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

/// [`all_reduce`] where rank `i` owns part `i` of `part`, e.g. a
/// [`Partition::weighted`] one that gives a slow rank a small part.
///
/// The owner of a part finishes it (the last addition and the `Avg`
/// division) and is its source in the all-gather; how much a rank sends
/// and adds before that depends on the algorithm: with the butterfly the
/// halves exchanged at each step are sized by the weights of the ranks on
/// each side, while the ring has every rank add into every part but one.
pub fn all_reduce_partitioned<T: Transport + ?Sized, E: Element>(
    c: Call<'_, T>,
    buf: &mut [E],
    op: ReduceOp,
    algorithm: AllReduceAlgorithm,
    part: &Partition,
) -> Result<(), CollectiveError> {
    guarded(&c, || {
        part.check(c.size(), buf.len())?;
        reduce(&c, None, buf, op, algorithm, part)
    })
}

/// Reduces `input` over all ranks with `op` into `output`, as long:
/// [`all_reduce`] out of place. Every algorithm reads `input` where the
/// in-place call would have read a copy of it, so an out-of-place call
/// costs no more than an in-place one.
pub fn all_reduce_into<T: Transport + ?Sized, E: Element>(
    c: Call<'_, T>,
    input: &[E],
    output: &mut [E],
    op: ReduceOp,
    algorithm: AllReduceAlgorithm,
) -> Result<(), CollectiveError> {
    let part = Partition::equal(output.len(), c.size());
    guarded(&c, || {
        if input.len() != output.len() {
            return Err(CollectiveError::InvalidArgument(format!(
                "an all-reduce of {} elements into {}",
                input.len(),
                output.len()
            )));
        }
        reduce(&c, Some(input), output, op, algorithm, &part)
    })
}

/// Reduces into `buf`: in place, or from `input` (as long) when given.
fn reduce<T: Transport + ?Sized, E: Element>(
    c: &Call<'_, T>,
    input: Option<&[E]>,
    buf: &mut [E],
    op: ReduceOp,
    algorithm: AllReduceAlgorithm,
    part: &Partition,
) -> Result<(), CollectiveError> {
    let (rank, size) = (c.rank(), c.size());
    match algorithm.resolve(std::mem::size_of_val(buf)) {
        Chosen::Ring => ring::all_reduce(c, input, buf, op, part),
        Chosen::Doubling => {
            Butterfly::new(rank, size).doubling(c, input, buf, op)?;
            finish(buf, op, size);
            Ok(())
        }
        Chosen::Butterfly => {
            let butterfly = Butterfly::new(rank, size);
            butterfly.reduce_scatter(c, input, buf, op, part)?;
            finish(&mut buf[butterfly.owned(part)], op, size);
            butterfly.all_gather(c, buf, part)
        }
    }
}
