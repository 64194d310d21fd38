//! Point-to-point messaging between the ranks of a job.
//!
//! [`Transport`] is the communicator the collectives are generic over, the
//! way rsmpi's collectives are generic over a communicator: tagged,
//! ordered, reliable messages between dense ranks `0..size`, with deadlines,
//! because on unreliable machines a wait without one is a hang. Sending to
//! one's own rank works like sending to any other, so collectives need no
//! special case for it.
//!
//! [`TcpTransport`] is the implementation between hosts and sites: a full
//! mesh of [`crate::wire::AuthStream`]s. [`LocalTransport`] runs a world of
//! threads inside one process (the test bed of the collectives).

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

mod backoff;
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(target_os = "linux")]
pub mod shm;
mod sites;
mod tcp;

pub use local::LocalTransport;
pub use sites::SiteTransport;
pub use tcp::{TcpOptions, TcpTransport, DEFAULT_MAX_MESSAGE};

/// Tagged point-to-point messages between the ranks of one job.
pub trait Transport: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Sends one message; messages between one pair with one tag arrive in order.
    fn send(&self, to: usize, tag: u64, payload: &[u8]) -> Result<(), TransportError>;
    /// Waits for the next message from `from` with `tag` until `deadline`.
    fn recv_deadline(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, TransportError>;
    /// [`recv_deadline`](Transport::recv_deadline) of a message that is
    /// due within microseconds, as a collective's next step is: the wait
    /// may stay awake longer before it sleeps, which over TCP lets it read
    /// the message from the socket itself. A wait for a message that may
    /// be milliseconds away (an order, a boundary tensor) calls
    /// `recv_deadline`, which gives its core away sooner. This default is
    /// `recv_deadline`.
    fn recv_due(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, TransportError> {
        self.recv_deadline(from, tag, deadline)
    }
    /// [`recv_deadline`](Transport::recv_deadline) of the messages that
    /// fill `into`, in order, for a receiver that knows where they go: `chunk`
    /// bytes each, the last one shorter (an empty `into` is one empty
    /// message). `None` once all arrived; a message of another length ends
    /// the receive and comes back as it is, with the offset it would have
    /// gone to. This default copies each message into place; a transport
    /// that can read them straight into `into` overrides it (TCP, where
    /// a sealed payload is also opened in place), saving the copy a
    /// collective's all-gather made of every byte it received.
    fn recv_into(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
        into: &mut [u8],
        chunk: usize,
    ) -> Result<Placed, TransportError> {
        copy_each_into(self, from, tag, deadline, into, chunk)
    }
    /// How long [`recv`](Transport::recv) waits.
    fn default_timeout(&self) -> Duration;
    /// The next message with `tag` from any rank of `from`, and who sent
    /// it, or [`TransportError::NoneArrived`] at `deadline`. A rank of
    /// `from` that is gone, with nothing left queued, comes back as
    /// [`TransportError::PeerLost`]: leave it out of `from` and call again.
    ///
    /// This default looks at each rank in turn and sleeps a millisecond
    /// between sweeps; transports with one wake-up for every peer override
    /// it, so an orchestrator of thousands of miners sleeps until one of
    /// them speaks.
    fn recv_any(
        &self,
        from: &[usize],
        tag: u64,
        deadline: Instant,
    ) -> Result<(usize, Vec<u8>), TransportError> {
        loop {
            for &rank in from {
                match self.recv_deadline(rank, tag, Instant::now()) {
                    Ok(message) => return Ok((rank, message)),
                    Err(TransportError::Timeout { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TransportError::NoneArrived {
                    ranks: from.len(),
                    tag,
                });
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(1)));
        }
    }
    /// [`recv_deadline`](Transport::recv_deadline) with the transport's
    /// default timeout.
    fn recv(&self, from: usize, tag: u64) -> Result<Vec<u8>, TransportError> {
        self.recv_deadline(
            from,
            tag,
            crate::wire::deadline_after(self.default_timeout()),
        )
    }
}

/// What [`Transport::recv_into`] got: `None` once every message is in
/// place, or the message of another length that ended it, with the offset
/// it would have gone to.
pub type Placed = Option<(usize, Vec<u8>)>;

/// [`Transport::recv_into`] by [`Transport::recv_deadline`] and a copy of
/// each message into place.
pub(crate) fn copy_each_into<T: Transport + ?Sized>(
    t: &T,
    from: usize,
    tag: u64,
    deadline: Instant,
    into: &mut [u8],
    chunk: usize,
) -> Result<Placed, TransportError> {
    for (at, piece) in chunks_of(into, chunk) {
        let message = t.recv_deadline(from, tag, deadline)?;
        if message.len() != piece.len() {
            return Ok(Some((at, message)));
        }
        piece.copy_from_slice(&message);
    }
    Ok(None)
}

/// The pieces [`Transport::recv_into`] fills, each with its offset:
/// `chunk` bytes each, the last one shorter, and one empty piece for an
/// empty `into`.
fn chunks_of(into: &mut [u8], chunk: usize) -> impl Iterator<Item = (usize, &mut [u8])> {
    let chunk = chunk.max(1);
    let empty = into.is_empty();
    let pieces = into.chunks_mut(chunk).enumerate();
    let pieces = pieces.map(move |(i, piece)| (i * chunk, piece));
    let none: &mut [u8] = &mut [];
    pieces.chain(empty.then_some((0, none)))
}

/// Why a message could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The connection to `rank` is gone: it closed or reset, or was dropped
    /// for breaking the protocol (bad MAC, oversized frame, ...). `reason`
    /// names the peer's address and what happened. Messages that arrived
    /// before the loss are still delivered.
    #[error("lost rank {rank}: {reason}")]
    PeerLost { rank: usize, reason: String },

    /// Nothing arrived from `rank` with `tag` before the deadline; the
    /// connection itself is still up.
    #[error("timed out waiting for a message from rank {rank} with tag {tag}")]
    Timeout { rank: usize, tag: u64 },

    /// [`Transport::recv_any`]: nothing with `tag` came from any of the
    /// `ranks` it waited on before the deadline.
    #[error("timed out waiting for a message with tag {tag} from any of {ranks} ranks")]
    NoneArrived { ranks: usize, tag: u64 },

    /// While setting up the mesh, `rank` answered but was not acceptable
    /// (another key or job, or not the rank its address belongs to).
    #[error("rank {rank} failed the handshake: {reason}")]
    Protocol { rank: usize, reason: String },

    #[error("rank {rank} does not exist (the job has {size} ranks)")]
    NoSuchRank { rank: usize, size: usize },

    /// Connecting to `rank` kept failing until the connect timeout.
    #[error("cannot reach rank {rank} at {addr}: {reason}")]
    Unreachable {
        rank: usize,
        addr: SocketAddr,
        reason: String,
    },

    /// These ranks never connected to us within the connect timeout.
    #[error("ranks {ranks:?} did not connect within {waited:?}")]
    MissingPeers { ranks: Vec<usize>, waited: Duration },

    #[error("invalid transport options: {0}")]
    InvalidOptions(String),

    /// A link to every peer would take more open files than this process
    /// may hold: refused before dialing, where running out halfway failed
    /// handshakes on both sides and left the job waiting for its connect
    /// timeout.
    #[error(
        "links to {peers} peers take about {needed} open files, and this process may hold \
         {limit}: raise the limit on open files (`ulimit -n`, and the hard limit, `ulimit -Hn`, \
         where it is lower)"
    )]
    TooManyPeersForOpenFiles {
        peers: usize,
        needed: u64,
        limit: u64,
    },

    /// Local resources failed (the listener, spawning a thread, a shared
    /// memory segment).
    #[error("{during}: {source}")]
    Io {
        during: &'static str,
        source: io::Error,
    },
}

impl From<io::Error> for TransportError {
    /// Local failures of the shared-memory transport, whose errors already
    /// say what was being done.
    fn from(source: io::Error) -> Self {
        TransportError::Io {
            during: "shared memory",
            source,
        }
    }
}
