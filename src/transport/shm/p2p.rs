//! [`ShmTransport`]: opening, point-to-point messages, waiting, leaving.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::Instant;

use super::collective::CollectiveState;
use super::futex::{self, Doorbell};
use super::join;
use super::liveness::ProcessId;
use super::ring::{self, RxState, TxState};
use super::segment::{Segment, SegmentLayout};
use super::{ShmOptions, CHECK_PERIOD, SLOT_LEFT};
use crate::transport::backoff::Backoff;
use crate::transport::{Transport, TransportError};

/// The ranks of one host, talking through one shared-memory segment.
///
/// See the [module documentation](super) for the protocol. Dropping it tells
/// the peers that this rank has left (their receives from it then fail with
/// [`TransportError::PeerLost`] once its queued messages are consumed), and
/// local rank 0 removes the segment's name.
pub struct ShmTransport {
    pub(super) rank: usize,
    pub(super) size: usize,
    pub(super) opts: ShmOptions,
    pub(super) segment: Segment,
    path: PathBuf,
    file: File,
    nonce: u64,
    /// Identities read once all ranks had joined; cached so that a peer
    /// rewriting its slot later cannot make us check another process.
    peers: Vec<ProcessId>,
    /// When each peer's process was last found alive in `/proc`.
    alive_at: Vec<Mutex<Option<Instant>>>,
    /// Producer state per destination; the lock keeps one message's bytes
    /// together when several threads send to the same rank.
    tx: Vec<Mutex<TxState>>,
    /// Consumer state and by-tag queues per source.
    rx: Vec<Mutex<RxState>>,
    pub(super) collective: Mutex<CollectiveState>,
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every
/// critical section leaves it valid between steps).
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ShmTransport {
    /// Joins (local rank 0: creates) the segment `name` for `size` ranks as
    /// rank `rank`, and waits until every rank has joined.
    ///
    /// All ranks of the host pass the same `name` and `opts`. The name should
    /// be unique to the run (derive it from a job id): a segment of that name
    /// left by a crashed run is replaced, but one whose creator is still alive
    /// is refused. `name` may use `A-Z a-z 0-9 . _ -`.
    pub fn open(
        name: &str,
        rank: usize,
        size: usize,
        opts: ShmOptions,
    ) -> Result<Self, TransportError> {
        let path = join::segment_path(name)?;
        if rank >= size {
            return Err(TransportError::NoSuchRank { rank, size });
        }
        if size > super::MAX_RANKS {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{size} ranks on one host; at most {} are supported",
                    super::MAX_RANKS
                ),
            )
            .into());
        }
        let layout = SegmentLayout::new(size, opts.ring_capacity, opts.chunk_bytes)?;
        let deadline = Instant::now() + opts.join_timeout;
        let me = ProcessId::current();
        let (file, segment, nonce) = if rank == 0 {
            join::create(&path, &layout, me)?
        } else {
            join::join(&path, &layout, rank, me, deadline)?
        };
        let mut transport = Self {
            rank,
            size,
            opts,
            segment,
            path,
            file,
            nonce,
            peers: Vec::new(),
            alive_at: (0..size).map(|_| Mutex::new(None)).collect(),
            tx: (0..size).map(|_| Mutex::new(TxState::new())).collect(),
            rx: (0..size).map(|_| Mutex::new(RxState::new())).collect(),
            collective: Mutex::new(CollectiveState::new()),
        };
        // From here on a failure drops `transport`, which leaves the segment
        // properly (and, on rank 0, removes its name).
        transport.peers = join::wait_all_joined(&transport.segment, deadline)?;
        Ok(transport)
    }

    /// The random number rank 0 wrote when it created the segment; equal on
    /// all ranks of one run, different between runs.
    pub fn run_nonce(&self) -> u64 {
        self.nonce
    }

    /// The segment's layout.
    pub fn layout(&self) -> &SegmentLayout {
        self.segment.layout()
    }

    pub(super) fn doorbell(&self, rank: usize) -> Doorbell<'_> {
        let slot = self.segment.slot(rank);
        Doorbell {
            bell: slot.bell,
            waiters: slot.bell_waiters,
        }
    }

    /// Whether `rank` has dropped its transport: one atomic load, cheap
    /// enough for every wake-up (a leaving rank rings everyone's doorbell).
    pub(super) fn has_left(&self, rank: usize) -> bool {
        // Acquire: pairs with the Release store of LEFT in `drop`; whatever the
        // peer published before leaving is visible after this load.
        rank != self.rank && self.segment.slot(rank).state.load(Ordering::Acquire) == SLOT_LEFT
    }

    /// `Err(PeerLost)` when `rank` has left or its process is gone. Its
    /// process is looked up in `/proc` at most once a [`CHECK_PERIOD`]:
    /// a receive polled with a deadline already past (the default
    /// `recv_any`, a wait on ranks of two fabrics) asks at every look, and
    /// reading `/proc` at each was 7% of a core for an orchestrator of four
    /// miners.
    pub(super) fn peer_status(&self, rank: usize) -> Result<(), TransportError> {
        if rank == self.rank {
            return Ok(());
        }
        if self.has_left(rank) {
            return Err(TransportError::PeerLost {
                rank,
                reason: "it closed its transport".into(),
            });
        }
        let mut alive_at = lock(&self.alive_at[rank]);
        if alive_at.is_some_and(|at| at.elapsed() < CHECK_PERIOD) {
            return Ok(());
        }
        self.peers[rank]
            .check_alive()
            .map_err(|reason| TransportError::PeerLost { rank, reason })?;
        *alive_at = Some(Instant::now());
        Ok(())
    }

    /// Takes the next message from `from` with `tag` if one is there,
    /// draining the ring from `from` first and the other incoming rings
    /// after (see [`ShmTransport::pump_others`]).
    fn try_take(&self, from: usize, tag: u64) -> Result<Option<Vec<u8>>, TransportError> {
        let mut rx = lock(&self.rx[from]);
        if let Some(message) = rx.pop(tag) {
            return Ok(Some(message));
        }
        if from != self.rank {
            let pumped = rx
                .pump(
                    &self.segment.ring(from, self.rank),
                    self.opts.max_message_len,
                )
                .map_err(|reason| TransportError::Protocol { rank: from, reason })?;
            if pumped.consumed {
                self.doorbell(from).ring();
            }
            if let Some(message) = rx.pop(tag) {
                return Ok(Some(message));
            }
        }
        drop(rx);
        self.pump_others(from);
        Ok(None)
    }

    /// Moves whatever has arrived in the incoming rings (except `skip`'s) into
    /// the local queues, without waiting for any lock.
    ///
    /// A rank waiting to send or receive keeps draining its incoming rings,
    /// so that two ranks sending each other messages larger than a ring (or
    /// a cycle of them) cannot deadlock with full rings: the buffering is
    /// unbounded, as with TCP's receive buffers plus a reader thread, but
    /// every byte is still copied only once, ring to message buffer. A peer's
    /// protocol error found here is kept and reported by the next receive
    /// from that peer.
    fn pump_others(&self, skip: usize) {
        for from in (0..self.size).filter(|&r| r != self.rank && r != skip) {
            let mut rx = match self.rx[from].try_lock() {
                Ok(rx) => rx,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => continue,
            };
            let ring = self.segment.ring(from, self.rank);
            if let Ok(pumped) = rx.pump(&ring, self.opts.max_message_len) {
                if pumped.consumed {
                    self.doorbell(from).ring();
                }
            }
        }
    }

    /// Streams `parts` (a frame header and the payload) into the ring to `to`.
    /// Returns whether any byte went in, with the result, so that the caller
    /// can tell an untouched stream from one cut mid-message.
    fn stream(
        &self,
        tx: &mut TxState,
        to: usize,
        tag: u64,
        parts: [&[u8]; 2],
    ) -> (bool, Result<(), TransportError>) {
        let ring = self.segment.ring(self.rank, to);
        let mine = self.doorbell(self.rank);
        let theirs = self.doorbell(to);
        let mut wrote_any = false;
        // Bytes written since the receiver was last told: it hears once per
        // message, or when the ring is full, not once per piece.
        let mut unannounced = false;
        let mut deadline = Instant::now() + self.opts.timeout;
        let mut next_check = Instant::now() + CHECK_PERIOD;
        let mut backoff = Backoff::new();
        for part in parts {
            let mut done = 0;
            while done < part.len() {
                let ticket = backoff.should_sleep().then(|| mine.prepare());
                let n = match tx.write_some(&ring, &part[done..]) {
                    Ok(n) => n,
                    Err(reason) => {
                        return (
                            wrote_any,
                            Err(TransportError::Protocol { rank: to, reason }),
                        )
                    }
                };
                if n > 0 {
                    done += n;
                    wrote_any = true;
                    unannounced = true;
                    // The timeout bounds a stall, not a whole large message.
                    deadline = Instant::now() + self.opts.timeout;
                    backoff.reset();
                    continue;
                }
                if unannounced {
                    theirs.ring();
                    unannounced = false;
                }
                self.pump_others(self.rank);
                let now = Instant::now();
                if self.has_left(to) || now >= next_check || now >= deadline {
                    if let Err(lost) = self.peer_status(to) {
                        return (wrote_any, Err(lost));
                    }
                    if now >= deadline {
                        return (wrote_any, Err(TransportError::Timeout { rank: to, tag }));
                    }
                    next_check = now + CHECK_PERIOD;
                }
                match ticket {
                    Some(ticket) => ticket.sleep(CHECK_PERIOD.min(deadline - now)),
                    None => backoff.snooze(),
                }
            }
        }
        if unannounced {
            theirs.ring();
        }
        (wrote_any, Ok(()))
    }
}

impl Transport for ShmTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn send(&self, to: usize, tag: u64, payload: &[u8]) -> Result<(), TransportError> {
        if to >= self.size {
            return Err(TransportError::NoSuchRank {
                rank: to,
                size: self.size(),
            });
        }
        if to == self.rank {
            lock(&self.rx[to]).push(tag, payload.to_vec());
            self.doorbell(to).ring();
            return Ok(());
        }
        let mut tx = lock(&self.tx[to]);
        if let Some(reason) = &tx.broken {
            return Err(TransportError::PeerLost {
                rank: to,
                reason: reason.clone(),
            });
        }
        if self.has_left(to) {
            return self.peer_status(to);
        }
        let header = ring::frame_header(tag, payload.len());
        let (wrote_any, result) = self.stream(&mut tx, to, tag, [&header, payload]);
        if let Err(e) = &result {
            if wrote_any {
                tx.broken = Some(format!("an earlier message was cut off: {e}"));
            }
        }
        result
    }

    fn recv_deadline(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, TransportError> {
        match self.recv_any(&[from], tag, deadline) {
            Ok((_, message)) => Ok(message),
            Err(TransportError::NoneArrived { .. }) => {
                Err(TransportError::Timeout { rank: from, tag })
            }
            Err(e) => Err(e),
        }
    }

    fn default_timeout(&self) -> std::time::Duration {
        self.opts.timeout
    }

    /// Every message to this rank rings its one doorbell, so a wait on
    /// many senders sleeps on it as a receive from one does.
    fn recv_any(
        &self,
        from: &[usize],
        tag: u64,
        deadline: Instant,
    ) -> Result<(usize, Vec<u8>), TransportError> {
        if let Some(&rank) = from.iter().find(|&&r| r >= self.size) {
            return Err(TransportError::NoSuchRank {
                rank,
                size: self.size,
            });
        }
        let take_any = || -> Result<Option<(usize, Vec<u8>)>, TransportError> {
            for &rank in from {
                if let Some(message) = self.try_take(rank, tag)? {
                    return Ok(Some((rank, message)));
                }
            }
            Ok(None)
        };
        let mine = self.doorbell(self.rank);
        let mut backoff = Backoff::new();
        let mut next_check = Instant::now() + CHECK_PERIOD;
        loop {
            let ticket = backoff.should_sleep().then(|| mine.prepare());
            if let Some(got) = take_any()? {
                return Ok(got);
            }
            let now = Instant::now();
            let left = from.iter().any(|&r| self.has_left(r));
            if left || now >= next_check || now >= deadline {
                // Status first, then one more look: whatever a peer sent
                // before leaving or dying is delivered before its loss.
                let lost = from.iter().find_map(|&r| self.peer_status(r).err());
                if let Some(got) = take_any()? {
                    return Ok(got);
                }
                if let Some(lost) = lost {
                    return Err(lost);
                }
                if now >= deadline {
                    return Err(TransportError::NoneArrived {
                        ranks: from.len(),
                        tag,
                    });
                }
                next_check = now + CHECK_PERIOD;
            }
            match ticket {
                Some(ticket) => ticket.sleep(CHECK_PERIOD.min(deadline - now)),
                None => backoff.snooze(),
            }
        }
    }
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        // Release: pairs with the Acquire load in `has_left`; everything
        // this rank wrote into rings before is visible to a peer that sees it
        // has left.
        self.segment
            .slot(self.rank)
            .state
            .store(SLOT_LEFT, Ordering::Release);
        for rank in (0..self.size).filter(|&r| r != self.rank) {
            self.doorbell(rank).ring();
        }
        futex::wake_all(self.segment.header().arrivals);
        if self.rank == 0 {
            // Only our own file: after a crash and restart the name may
            // already belong to a newer run.
            let ours = match (std::fs::metadata(&self.path), self.file.metadata()) {
                (Ok(named), Ok(mine)) => named.dev() == mine.dev() && named.ino() == mine.ino(),
                _ => false,
            };
            if ours {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}
