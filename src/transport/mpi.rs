//! MPI as a transport (cargo feature `mpi`, system OpenMPI through rsmpi),
//! so our collectives and OpenMPI's own `MPI_Allreduce` run side by side
//! under the same `mpirun`.
//!
//! Our tags are 64-bit, MPI's are small ints (`MPI_TAG_UB` may be 32767), so
//! each message travels as two MPI messages: a header (our tag, length) and
//! the payload, which is received straight into its final buffer. A
//! per-peer send lock keeps header and payload adjacent, and a per-peer
//! receive lock keeps two threads from splitting a pair; MPI's
//! non-overtaking rule does the rest. Messages for other tags are queued,
//! as in the TCP transport.
//!
//! MPI itself ends the job when a process dies, so there is no `PeerLost`
//! here: what a surviving rank would see is `mpirun` aborting it. Deadlines
//! are honoured by polling with `MPI_Improbe`.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::point_to_point::{Destination, MatchedReceiveVec, Source};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::CommunicatorCollectives;
use mpi::Threading;

use super::{Transport, TransportError};

const TAG_HEADER: i32 = 1;
const TAG_PAYLOAD: i32 = 2;

/// Messages received while waiting for another tag, by (source, tag).
type Queued = HashMap<(usize, u64), VecDeque<Vec<u8>>>;

/// The world communicator of this process's `mpirun` job.
pub struct MpiTransport {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    default_timeout: Duration,
    send_locks: Vec<Mutex<()>>,
    recv_locks: Vec<Mutex<()>>,
    queued: Mutex<Queued>,
    // Dropped last: finalizes MPI.
    _universe: Universe,
}

// SAFETY: MPI was initialized with MPI_THREAD_MULTIPLE (checked in `init`),
// under which every MPI call may be made from any thread concurrently; the
// communicator handle is MPI_COMM_WORLD, valid until MPI_Finalize, which
// runs only when `_universe` drops with the transport.
unsafe impl Send for MpiTransport {}
// SAFETY: as for Send; our own shared state is behind mutexes.
unsafe impl Sync for MpiTransport {}

impl MpiTransport {
    /// Initializes MPI with full thread support; fails if MPI was
    /// initialized already or the library cannot give MPI_THREAD_MULTIPLE.
    pub fn init(default_timeout: Duration) -> Result<MpiTransport, TransportError> {
        let (universe, level) =
            mpi::initialize_with_threading(Threading::Multiple).ok_or_else(|| {
                TransportError::InvalidOptions("MPI is already initialized in this process".into())
            })?;
        if level != Threading::Multiple {
            return Err(TransportError::InvalidOptions(format!(
                "this MPI library grants {level:?} threading, not MPI_THREAD_MULTIPLE"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(MpiTransport {
            world,
            rank,
            size,
            default_timeout,
            send_locks: (0..size).map(|_| Mutex::new(())).collect(),
            recv_locks: (0..size).map(|_| Mutex::new(())).collect(),
            queued: Mutex::new(HashMap::new()),
            _universe: universe,
        })
    }

    /// OpenMPI's own all-reduce (`MPI_Allreduce`, sum) of `buf` in place:
    /// the reference our collectives are measured against.
    pub fn mpi_all_reduce_sum_f32(&self, send: &[f32], recv: &mut [f32]) {
        self.world
            .all_reduce_into(send, recv, mpi::collective::SystemOperation::sum());
    }

    /// `MPI_Barrier`.
    pub fn mpi_barrier(&self) {
        self.world.barrier();
    }

    fn check_rank(&self, rank: usize) -> Result<(), TransportError> {
        if rank < self.size {
            Ok(())
        } else {
            Err(TransportError::NoSuchRank {
                rank,
                size: self.size,
            })
        }
    }

    fn take_queued(&self, from: usize, tag: u64) -> Option<Vec<u8>> {
        let mut q = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        q.get_mut(&(from, tag)).and_then(VecDeque::pop_front)
    }

    /// Receives one (header, payload) pair from `from` if one is waiting.
    fn poll_one(&self, from: usize) -> Result<Option<(u64, Vec<u8>)>, TransportError> {
        let _guard = self.recv_locks[from]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let process = self.world.process_at_rank(from as i32);
        let Some(probed) = process.immediate_matched_probe_with_tag(TAG_HEADER) else {
            return Ok(None);
        };
        let (header, _) = probed.matched_receive_vec::<u64>();
        let [tag, len] = header[..] else {
            return Err(TransportError::Protocol {
                rank: from,
                reason: format!("MPI header of {} words, not 2", header.len()),
            });
        };
        let probed = process.matched_probe_with_tag(TAG_PAYLOAD);
        let count = probed.1.count(u8::equivalent_datatype()) as u64;
        if count != len {
            return Err(TransportError::Protocol {
                rank: from,
                reason: format!("header says {len} bytes, payload has {count}"),
            });
        }
        let (payload, _) = probed.matched_receive_vec::<u8>();
        Ok(Some((tag, payload)))
    }
}

impl Transport for MpiTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn send(&self, to: usize, tag: u64, payload: &[u8]) -> Result<(), TransportError> {
        self.check_rank(to)?;
        let _guard = self.send_locks[to]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let process = self.world.process_at_rank(to as i32);
        let header = [tag, payload.len() as u64];
        // Buffered-or-synchronous as MPI sees fit; both return once our
        // buffers may be reused, which is all `send` promises.
        process.send_with_tag(&header[..], TAG_HEADER);
        process.send_with_tag(payload, TAG_PAYLOAD);
        Ok(())
    }

    fn recv_deadline(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, TransportError> {
        self.check_rank(from)?;
        let mut idle = Duration::from_micros(1);
        loop {
            if let Some(m) = self.take_queued(from, tag) {
                return Ok(m);
            }
            match self.poll_one(from)? {
                Some((t, payload)) if t == tag => return Ok(payload),
                Some((t, payload)) => {
                    self.queued
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry((from, t))
                        .or_default()
                        .push_back(payload);
                    idle = Duration::from_micros(1);
                }
                None => {
                    if Instant::now() >= deadline {
                        return Err(TransportError::Timeout { rank: from, tag });
                    }
                    // Spin politely: ranks often outnumber cores.
                    std::thread::sleep(idle);
                    idle = (idle * 2).min(Duration::from_micros(200));
                }
            }
        }
    }

    fn default_timeout(&self) -> Duration {
        self.default_timeout
    }
}
