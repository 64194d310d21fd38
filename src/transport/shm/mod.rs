//! Shared-memory transport for the ranks of one host.
//!
//! Ranks are separate processes on one host that map one POSIX shared-memory
//! segment, a file under `/dev/shm` whose name the caller derives from the
//! job (all ranks of the host pass the same one). It carries:
//!
//! - point-to-point messages ([`ShmTransport`] implements
//!   [`Transport`](crate::transport::Transport)): one single-producer,
//!   single-consumer ring per ordered pair of ranks, messages framed as
//!   (tag, length, bytes) and streamed through the ring in pieces, so a
//!   message may be larger than the ring. Receivers keep messages with other
//!   tags in per-(source, tag) queues; order per (source, tag) is preserved.
//! - the fast path for collectives: [`ShmTransport::all_reduce_bytes`]
//!   reads every rank's input directly from shared memory (each byte is copied
//!   in once, reduced once by one rank, copied out once), and
//!   [`ShmTransport::shared_buffer`] lets callers write their input straight
//!   into shared memory and read the result from there, which removes even
//!   those copies; [`ShmTransport::barrier`] synchronizes the ranks.
//!
//! ```no_run
//! use swarmrun::transport::shm::{ShmOptions, ShmTransport};
//! use swarmrun::transport::Transport;
//!
//! # fn main() -> Result<(), swarmrun::transport::TransportError> {
//! let shm = ShmTransport::open("swarmrun-job42", 1, 4, ShmOptions::default())?;
//! shm.send(2, 7, b"hello")?;
//! let reply = shm.recv(2, 7)?;
//!
//! // f32 sum; the transport stays dtype-agnostic, the caller reduces.
//! let sum = |dst: &mut [u8], src: &[u8]| {
//!     for (d, s) in dst.chunks_exact_mut(4).zip(src.chunks_exact(4)) {
//!         let v = f32::from_ne_bytes(d.try_into().unwrap()) + f32::from_ne_bytes(s.try_into().unwrap());
//!         d.copy_from_slice(&v.to_ne_bytes());
//!     }
//! };
//! let mut grads = vec![0u8; 4 * 1024];
//! shm.all_reduce_bytes(&mut grads, 4, &sum)?;
//!
//! let mut shared = shm.shared_buffer(4 * 1024)?;
//! shared.as_mut_slice().fill(0); // compute the input here instead
//! let reduced = shared.all_reduce(4, &sum)?;
//! # let _ = (reply, &*reduced);
//! # Ok(()) }
//! ```
//!
//! Entry points: [`ShmTransport::open`] with [`ShmOptions`]; the
//! [`Transport`](crate::transport::Transport) methods; [`ShmTransport::barrier`],
//! [`ShmTransport::all_reduce_bytes`] (a [`Combine`] does the typed
//! reduction), [`ShmTransport::shared_buffer`] → [`SharedBuffer::all_reduce`]
//! → [`Reduced`]; [`ShmTransport::run_nonce`] and [`ShmTransport::layout`]
//! ([`SegmentLayout`]) for tools and tests.
//!
//! Measured on a 2-core EPYC VM (32 MiB L3), 64 MiB of f32 over 4 processes:
//! `all_reduce_bytes` about 3.5 to 4 GB/s busbw, `shared_buffer` about 8.5,
//! where single-thread memcpy of the buffer runs at 7 to 10 GB/s and
//! OpenMPI's shared-memory `MPI_Allreduce` at about 1.1 GB/s busbw
//! (`timing_all_reduce_64mib_f32_four_processes` in
//! `tests/transport_shm_processes.rs` prints these).
//!
//! # Lifecycle and stale segments
//!
//! Local rank 0 creates the segment fully (header with magic, version, sizes
//! and a random run nonce; its own pid and start time in slot 0) under a
//! temporary name and then links it under the public name; the other ranks
//! wait for a file whose creator is alive, claim their slot (pid, start
//! time) and wait, like rank 0, until all ranks have joined, within
//! [`ShmOptions::join_timeout`]. A file left by a crashed run (creator dead,
//! or not a segment of this version) is replaced, never trusted; a file whose
//! creator is alive is refused. Rank 0 removes the name when it drops the
//! transport; every rank marks its slot as left. The file is created with
//! mode 0600, so all ranks run as one user, and liveness checks use pids, so
//! all ranks live in one pid namespace (as ranks sharing `/dev/shm` on one
//! host normally do).
//!
//! # Waiting and lost peers
//!
//! Waiters yield a few times, then sleep on a futex in the segment (see
//! the `futex` module for why: four ranks on two cores cannot afford to
//! spin). Sleeps last at most [`CHECK_PERIOD`], after which the waiter checks
//! that the peer it waits for is alive (pid and start time, zombies count as
//! dead) and has not left, so a dead peer gives
//! [`TransportError::PeerLost`](crate::transport::TransportError) within a
//! fraction of a second (at once if it dropped its transport), and a
//! deadline gives `Timeout`. As on TCP, a send that fits into the ring
//! succeeds even if the receiver has just died; the loss shows on the next
//! wait for that peer.
//!
//! # Trust
//!
//! A peer may write garbage into the segment. Offsets are never read from
//! it: the layout is computed locally from validated parameters, ring
//! positions are masked, and every counter or length read from shared
//! memory is checked against the ring size or [`ShmOptions::max_message_len`]
//! before use. A violation is a `Protocol` error naming the peer, and the
//! stream from that peer stays refused (it cannot be re-framed). What no
//! check can prevent: a peer that truncates the segment file makes our next
//! access to it raise SIGBUS, and a peer can corrupt the values of a
//! collective (but not our memory safety).
//!
//! The segment layout is described at [`SegmentLayout`]; memory-ordering
//! arguments are next to each atomic access (rings in the `ring` module,
//! barrier and phases in the `collective` module).

mod collective;
mod futex;
mod join;
mod liveness;
mod p2p;
mod ring;
mod segment;

use std::time::Duration;

pub use collective::{Combine, Reduced, SharedBuffer};
pub use p2p::ShmTransport;
pub use segment::SegmentLayout;

/// The tag named in [`Timeout`](crate::transport::TransportError::Timeout)
/// errors of waits that belong to no message: joining the segment and
/// barriers inside collectives.
pub const CONTROL_TAG: u64 = u64::MAX;

/// Longest a waiter sleeps before checking that its peer is still alive.
pub const CHECK_PERIOD: Duration = Duration::from_millis(50);

/// Most ranks one segment serves (its rings grow with the square).
pub const MAX_RANKS: usize = 1024;

/// Slot state of a rank that has joined.
const SLOT_JOINED: u32 = 2;
/// Slot state of a rank that has dropped its transport.
const SLOT_LEFT: u32 = 3;

/// Settings of a segment; all ranks of a host must pass the same sizes.
#[derive(Debug, Clone)]
pub struct ShmOptions {
    /// Bytes per ring, one ring per ordered pair of ranks: a power of two,
    /// at least 4 KiB. Larger rings mean fewer hand-overs per large message.
    pub ring_capacity: usize,
    /// Bytes of each rank's scratch region (three per rank), the piece a
    /// collective reduces at once and the largest shared buffer; a multiple
    /// of 4 KiB.
    pub chunk_bytes: usize,
    /// Default receive timeout, and how long a send or a barrier may make
    /// no progress before giving up.
    pub timeout: Duration,
    /// How long `open` waits for the segment and for every rank to join.
    pub join_timeout: Duration,
    /// Largest message accepted from a peer; a frame claiming more is a
    /// protocol error.
    pub max_message_len: usize,
}

impl Default for ShmOptions {
    /// 256 KiB rings and 1 MiB chunks: for 4 ranks, 3 MiB of rings and
    /// 12 MiB of scratch, well within a container's default 64 MiB
    /// `/dev/shm`. Chunks this size keep an all-reduce's working set (three
    /// sets of one region per rank) in the last-level cache: on a 2-core EPYC
    /// with 32 MiB L3, 64 MiB of f32 over 4 ranks reached about 4 GB/s busbw
    /// with 1 MiB chunks against 2.4 with 4 MiB. Larger chunks mean fewer
    /// barriers, which pays when other processes compete for the cores (there,
    /// with two busy loops beside the 4 ranks, 4 MiB chunks gave 1.3 GB/s and
    /// 1 MiB chunks 0.5). Raise `chunk_bytes` for larger shared buffers too.
    fn default() -> Self {
        Self {
            ring_capacity: 256 << 10,
            chunk_bytes: 1 << 20,
            timeout: Duration::from_secs(60),
            join_timeout: Duration::from_secs(60),
            max_message_len: 1 << 30,
        }
    }
}
