//! MPI-style collectives over any [`Transport`], one file per family as in
//! nccl-tests.
//!
//! Every collective is a function generic over `T: Transport + ?Sized` that
//! takes a [`Call`]: the transport, the tag that keeps this call's messages
//! apart from concurrent calls, and an optional deadline. All ranks of the
//! transport must make the same calls in the same order with the same tags
//! and agreeing arguments (same lengths, partitions, ops), as in MPI. A call
//! uses its tag and, for [`hierarchical_all_reduce`], the next one: space
//! concurrent calls [`TAGS_PER_CALL`] apart.
//!
//! ```
//! use swarmrun::collective::{all_reduce, AllReduceAlgorithm, Call, ReduceOp};
//! use swarmrun::transport::{LocalTransport, Transport};
//!
//! let sums = LocalTransport::run(LocalTransport::world(3), |t| {
//!     let mut grads = vec![t.rank() as f32; 4];
//!     all_reduce(Call::new(&t, 7), &mut grads, ReduceOp::Sum, AllReduceAlgorithm::Auto)?;
//!     Ok::<_, swarmrun::collective::CollectiveError>(grads)
//! });
//! assert!(sums.into_iter().all(|s| s.unwrap() == [3.0; 4]));
//! ```
//!
//! The calls, `c` being a [`Call`], `buf: &mut [E]` with `E:` [`Element`]:
//!
//! ```text
//! barrier(c)
//! broadcast(c, buf, root)
//! all_gather(c, buf, &Partition)                     parts may differ in size
//! all_gather_varied(c, &[E]) -> (Vec<E>, Partition)  sizes exchanged first
//! reduce_scatter(c, buf, op, algorithm, &Partition) -> Range<usize>
//! all_reduce(c, buf, op, algorithm)
//! all_reduce_partitioned(c, buf, op, algorithm, &Partition)
//! all_reduce_redundant(c, buf, op, copies, Option<&SliceTamper<E>>)
//! all_reduce_redundant_checked(c, buf, op, copies, tamper) -> SliceCopies
//! all_reduce_redundant_moved(c, buf, (op, copies), tamper, Handing, &mut impl SliceMover)
//! hierarchical_all_reduce(c, buf, op, sites: &[usize])
//! Group::new(&transport, members) / Group::without(&transport, &lost)
//! Partition::equal(len, n) / weighted(len, &[f64]) / from_lens(&[usize])
//! ```
//!
//! * [`AllReduceAlgorithm::Doubling`] swaps whole buffers in log2(n) steps
//!   (the fewest round trips); [`AllReduceAlgorithm::Butterfly`] is
//!   Rabenseifner's (recursive halving, then recursive doubling); both take
//!   any world size, extra ranks folded in as MPICH does;
//!   [`AllReduceAlgorithm::Ring`] is the bandwidth baseline; `Auto` picks
//!   the doubling below [`DOUBLING_MAX_BYTES`] and the ring from
//!   [`RING_MIN_BYTES`].
//! * [`all_reduce_redundant`] has each slice reduced by `copies` ranks and
//!   compares their blake3 digests before anyone uses the result.
//! * [`hierarchical_all_reduce`] reduces inside sites, then between site
//!   leaders, then broadcasts inside sites.
//! * [`Group`] is a subset of ranks renumbered densely, itself a transport:
//!   the survivors of a failure, or one site.
//!
//! Elements are `f32`, `bf16`, `f16`, `i32` and `i64`, reduced with a [`ReduceOp`].
//! Buffers are cut into [`CHUNK_BYTES`] messages; a step sends its chunks
//! from a second thread while the caller's thread receives and reduces,
//! so the two directions and the arithmetic overlap.
//!
//! **Determinism.** Which rank adds which values in which order is fixed by
//! the algorithm, world size and partition, never by arrival timing, and
//! each reduced slice is computed once and then copied to everyone: every
//! rank ends with identical bytes, and a repeated run gives them again.
//! Different algorithms (or the hierarchical one) add in different orders,
//! so float results may differ between algorithms in the last bits.
//!
//! **Failure.** A peer that dies, misses the deadline or sends a malformed
//! frame ends the call on every rank that depends on it with
//! [`CollectiveError::PeerLost`] naming it. A rank whose call fails sends
//! every other rank an abort frame naming the rank it gave up on, then
//! follows the others' abort frames to the rank at the end of the chain
//! (waiting [`BLAME_GRACE`] at most for each), so survivors learn promptly
//! and name the same rank even when they all time out at once. A failed
//! call leaves buffers half-reduced and stray frames under its tag: retry
//! on a [`Group`] of the survivors with a tag not used before. A rank that
//! dies after delivering everything its peers need may leave some
//! survivors finished and others failed; agreeing on that is the
//! membership layer's job, not this module's.

mod all_gather;
mod all_reduce;
mod bandwidth;
mod barrier;
mod broadcast;
mod butterfly;
mod element;
mod fixed_point;
mod frame;
mod group;
mod hierarchical;
mod partition;
mod reduce_scatter;
mod redundant;
mod ring;
#[cfg(target_os = "linux")]
mod shm;

pub use all_gather::{all_gather, all_gather_varied};
pub use all_reduce::{
    all_reduce, all_reduce_into, all_reduce_partitioned, AllReduceAlgorithm, DOUBLING_MAX_BYTES,
    RING_MIN_BYTES,
};
pub use bandwidth::measure_bandwidth;
pub use barrier::barrier;
pub use broadcast::broadcast;
pub use element::{Element, ReduceOp};
pub use fixed_point::{
    all_reduce_fixed_point, scales_for, segment_maxes, FixedPoint, MAX_CONTRIBUTIONS,
};
pub use frame::{BLAME_GRACE, CHUNK_BYTES};
pub use group::Group;
pub use hierarchical::{
    hierarchical_all_reduce, hierarchical_all_reduce_redundant_checked, PartialTamper, SitesCopies,
    Tampers,
};
pub use partition::Partition;
pub use reduce_scatter::reduce_scatter;
pub use redundant::{
    all_reduce_redundant, all_reduce_redundant_checked, all_reduce_redundant_moved, slice_holders,
    Handing, OverTransport, Signing, SliceCopies, SliceMover, SliceTamper, WrongSlice,
};
#[cfg(target_os = "linux")]
pub use shm::{all_reduce_shared, all_reduce_shm, all_reduce_shm_into};

use std::time::{Duration, Instant};

use crate::transport::{Transport, TransportError};

/// How many consecutive tags one call may use, starting at [`Call::tag`]:
/// give concurrent calls tags at least this far apart.
pub const TAGS_PER_CALL: u64 = 2;

/// One collective call's context: where it runs, under which tag, and until when.
pub struct Call<'a, T: ?Sized> {
    pub transport: &'a T,
    pub tag: u64,
    /// `None` waits as long as the transport's default timeout, per message.
    pub deadline: Option<Instant>,
    /// How long a failing rank waits for each peer's abort frame while
    /// following blame (see the module docs); [`BLAME_GRACE`] unless
    /// [`Call::blame_grace`] says otherwise.
    pub grace: Duration,
    /// Outer rank of each of `transport`'s ranks, when this call runs a phase
    /// of a bigger call on a [`Group`]: errors and abort frames then name
    /// ranks as the bigger call's caller knows them, whichever phase a rank
    /// is in when it hears of a failure.
    names: Option<&'a [usize]>,
}

impl<'a, T: Transport + ?Sized> Call<'a, T> {
    pub fn new(transport: &'a T, tag: u64) -> Self {
        Call {
            transport,
            tag,
            deadline: None,
            grace: BLAME_GRACE,
            names: None,
        }
    }

    /// The whole call must finish by `deadline`; a peer that has not sent
    /// what is awaited by then is reported lost.
    pub fn until(self, deadline: Instant) -> Self {
        Call {
            deadline: Some(deadline),
            ..self
        }
    }

    /// Waits up to `grace` for each peer's abort frame when the call fails:
    /// longer than the default on links whose round trip is a good part of
    /// [`BLAME_GRACE`], or on hosts so busy that a live peer may take that
    /// long to notice the same failure; a longer grace costs time only when
    /// a peer is silent, never when it is fine or gone.
    pub fn blame_grace(self, grace: Duration) -> Self {
        Call { grace, ..self }
    }

    /// A phase of this call run on `group` (of this call's transport) under
    /// `tag`, naming ranks in this call's numbering.
    pub(crate) fn within<'b, 'g>(
        &self,
        group: &'b Group<'g, T>,
        tag: u64,
    ) -> Call<'b, Group<'g, T>> {
        Call {
            transport: group,
            tag,
            deadline: self.deadline,
            grace: self.grace,
            names: Some(group.members()),
        }
    }

    /// This rank in the call's transport.
    pub fn rank(&self) -> usize {
        self.transport.rank()
    }

    pub fn size(&self) -> usize {
        self.transport.size()
    }

    /// The name errors and abort frames use for this transport's `rank`.
    pub fn outer(&self, rank: usize) -> usize {
        self.names
            .and_then(|n| n.get(rank).copied())
            .unwrap_or(rank)
    }

    /// This transport's number for the outer rank `rank`, if it is a member.
    fn inner(&self, rank: usize) -> Option<usize> {
        match self.names {
            Some(names) => names.iter().position(|&r| r == rank),
            None => (rank < self.size()).then_some(rank),
        }
    }
}

impl<T: ?Sized> Clone for Call<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T: ?Sized> Copy for Call<'_, T> {}

/// Why a collective failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// The rank died, missed the deadline, or was blamed by another rank's
    /// failed call. Ranks are numbered as in the call's transport.
    #[error("rank {rank} lost")]
    PeerLost { rank: usize },
    /// The rank sent something this rank's arguments do not allow (wrong
    /// length, bad abort frame): a bug or a mismatch in call arguments.
    #[error("protocol error from rank {rank}: {reason}")]
    Protocol { rank: usize, reason: String },
    /// The copies of one slice reduced by different ranks differ; `ranks`
    /// disagree with the majority (all holders when there is none).
    #[error("slice {slice} reduced differently by ranks {ranks:?}")]
    SliceMismatch { slice: usize, ranks: Vec<usize> },
    /// `rank` handed this rank `slice` other than the copy its holders
    /// agreed on, and no signature of its proves it: its word against this
    /// rank's (see `all_reduce_redundant_moved`).
    #[error("rank {rank} handed out slice {slice} other than the copy its holders agreed on")]
    UnprovedSlice { rank: usize, slice: usize },
    /// A NaN or infinity in `segment` of a fixed-point sum's input, seen by
    /// every rank of the call.
    #[error("non-finite value in segment {segment}")]
    NonFinite { segment: usize },
    /// This rank's own arguments are unusable; peers see it as lost.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A transport failure that names no peer (local I/O, unknown rank).
    #[error(transparent)]
    Transport(TransportError),
}

impl From<TransportError> for CollectiveError {
    /// A timeout is a loss: a collective cannot tell a dead peer from one
    /// too slow to matter, and both are dealt with by shrinking the world.
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::PeerLost { rank, .. } | TransportError::Timeout { rank, .. } => {
                CollectiveError::PeerLost { rank }
            }
            TransportError::Protocol { rank, reason } => CollectiveError::Protocol { rank, reason },
            other => CollectiveError::Transport(other),
        }
    }
}

impl CollectiveError {
    /// The same error with the peer it names renamed by `f`.
    fn renamed(self, f: impl Fn(usize) -> usize) -> Self {
        match self {
            CollectiveError::PeerLost { rank } => CollectiveError::PeerLost { rank: f(rank) },
            CollectiveError::Protocol { rank, reason } => CollectiveError::Protocol {
                rank: f(rank),
                reason,
            },
            CollectiveError::UnprovedSlice { rank, slice } => CollectiveError::UnprovedSlice {
                rank: f(rank),
                slice,
            },
            other => other,
        }
    }
}
