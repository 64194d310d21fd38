//! [`Transport`] over authenticated TCP: the path between hosts and sites.
//!
//! # Mesh
//!
//! Every pair of ranks shares one [`AuthStream`]. Rank `i` dials every rank
//! `j < i` (retrying with backoff until the connect timeout, since ranks
//! start at different times) and accepts every `j > i`, so each pair
//! connects exactly once and nobody waits on a cycle. The acceptor keeps
//! running after setup: a connection that fails the handshake (another key
//! or job, garbage) or claims a rank that is out of range or already
//! connected is logged to stderr with its address and the reason, closed,
//! and the job goes on.
//!
//! # Receiving
//!
//! One reader thread per peer verifies frames and files each message into a
//! per-(source, tag) queue, so `recv` on one tag never blocks behind another.
//! A receive of a message that is due within microseconds
//! ([`Transport::recv_due`], a collective's next step) reads small frames
//! already whole in the socket itself while it waits, and the reader
//! thread is not woken for them: the thread's wake-up, then the receive's,
//! were most of a small all-reduce's time.
//! A frame that breaks the protocol (bad MAC, oversized, bad magic, unknown
//! kind) ends that peer's link: the reason, naming its rank and address, is
//! logged and returned by every later `recv` from it as
//! [`TransportError::PeerLost`]; other peers carry on.
//!
//! # Sending
//!
//! Each link's writer sits behind its own mutex, held for a whole message.
//! A message larger than a frame ([`crate::wire::SEND_FRAME`], or
//! `max_frame` when that is smaller) goes as `DataMore` frames followed by
//! a final `Data` frame, and the reader joins them, so big tensors need no
//! big frame limit (which is also the most any single frame can make a
//! receiver allocate up front).
//!
//! # Shutdown
//!
//! [`TcpTransport::shutdown`] (also run on drop) sends each peer a `Close`
//! frame, so it sees a clean exit as `PeerLost` at once instead of a timeout,
//! waits briefly for peers to finish reading, then closes every socket and
//! joins every thread. A peer's goodbye is not logged, since every job ends
//! that way; any other loss of a peer is.

use std::fmt;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, TryLockError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::resource::{getrlimit, Resource};

use super::{Placed, Transport, TransportError};
use crate::wire::listener::{Listener, Stopper};
use crate::wire::{deadline_after, AuthStream, FrameKind, FrameWriter, Hello, JobKey, WireError};

mod accept;
mod lanes;
mod state;

use state::{lock, Loss, Shared};

/// First and largest pause between attempts to reach a rank that is not
/// listening yet: quick when it is a moment late, gentle when it is minutes.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// How long shutdown waits for peers to acknowledge our `Close` before
/// cutting the connections.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// [`TcpOptions::max_message`] unless a job says otherwise: larger than
/// any tensor slice a stage of a few billion parameters all-reduces, far
/// below what a rank can hold many of.
pub const DEFAULT_MAX_MESSAGE: usize = 16 << 30;

/// Limits and timeouts of a [`TcpTransport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOptions {
    /// Largest frame payload, in bytes; longer messages are split. At most
    /// `u32::MAX`, the wire's length field.
    pub max_frame: usize,
    /// Largest message, in bytes, a peer may send: what it can make this
    /// rank hold for one message (or one stripe of one).
    pub max_message: usize,
    /// How long [`TcpTransport::connect`] may take to build the whole mesh.
    pub connect_timeout: Duration,
    /// Deadline of [`Transport::recv`], and how long a send may make no
    /// progress before its peer is declared lost.
    pub default_timeout: Duration,
    /// How long one handshake may take; bounds how long a silent connection
    /// can occupy the acceptor.
    pub handshake_timeout: Duration,
    /// Whether ranks beyond the mesh's size may connect: ranks that joined
    /// a running job, with the id its door gave them (a training job's
    /// transport is joinable; a fixed job's refuses such ranks).
    pub joinable: bool,
    /// Connections per pair of ranks: above 1, messages of a MiB or more
    /// are striped over all of them (the private `lanes` module), for long fat pipes
    /// between sites. Both ends must agree.
    pub lanes: usize,
    /// Seal the frames between ranks of one host too (`[network]
    /// seal_loopback`); otherwise a loopback link sends them as they are
    /// after the handshake (`crate::wire`'s "Loopback links"). Both ends
    /// must agree.
    pub seal_loopback: bool,
}

impl Default for TcpOptions {
    fn default() -> TcpOptions {
        TcpOptions {
            max_frame: 8 << 20,
            max_message: DEFAULT_MAX_MESSAGE,
            connect_timeout: Duration::from_secs(60),
            default_timeout: Duration::from_secs(300),
            handshake_timeout: Duration::from_secs(10),
            joinable: false,
            lanes: 1,
            seal_loopback: false,
        }
    }
}

/// A full mesh of authenticated TCP connections between the ranks of a job.
pub struct TcpTransport {
    shared: Arc<Shared>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
    /// Ends the acceptor's blocked accept at shutdown.
    stop_accepting: Stopper,
}

/// Open files a link to a peer holds: its reader and writer, the handle it
/// is shut down by and its reader thread's epoll set; and each extra lane
/// its socket and the handle it is cut by.
const FILES_PER_LINK: u64 = 4;
const FILES_PER_EXTRA_LANE: u64 = 2;

/// Refuses links to `peers` peers over `lanes` lanes each that would take
/// more open files than this process may hold, counting those it holds
/// now (`/proc/self/fd`); says nothing where either cannot be read. Only
/// a certain failure is refused: what a rank opens besides (a handshake's
/// second handle while it lasts, a checkpoint) is left out of the count.
fn room_for_links(peers: usize, lanes: usize) -> Result<(), TransportError> {
    let Ok((limit, _)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return Ok(());
    };
    let Ok(open) = std::fs::read_dir("/proc/self/fd") else {
        return Ok(());
    };
    // Less the one the listing itself holds open.
    let open = open.count().saturating_sub(1) as u64;
    let per_peer = FILES_PER_LINK + FILES_PER_EXTRA_LANE * (lanes.max(1) as u64 - 1);
    let needed = open + per_peer * peers as u64;
    if needed > limit {
        return Err(TransportError::TooManyPeersForOpenFiles {
            peers,
            needed,
            limit,
        });
    }
    Ok(())
}

impl TcpTransport {
    /// Joins the mesh as `rank`. `listener` is this rank's bound listener and
    /// `peers[r]` the address rank `r` listens on (our own entry included,
    /// so every rank can be handed the same list). Returns once a link to
    /// every other rank is up, or fails after `opts.connect_timeout`.
    pub fn connect(
        rank: usize,
        listener: TcpListener,
        peers: &[SocketAddr],
        key: &JobKey,
        job_name: &str,
        opts: TcpOptions,
    ) -> Result<TcpTransport, TransportError> {
        let size = peers.len();
        if rank >= size {
            return Err(TransportError::NoSuchRank { rank, size });
        }
        room_for_links(size - 1, opts.lanes)?;
        let transport = TcpTransport::listen(rank, size, listener, key, job_name, opts)?;
        let deadline = deadline_after(opts.connect_timeout);
        for (to, addr) in peers.iter().enumerate().take(rank) {
            transport.dial(to, *addr, deadline)?;
        }
        let missing: Vec<usize> = (rank + 1..size)
            .filter(|&from| transport.shared.wait_connected(from, deadline))
            .collect();
        if !missing.is_empty() {
            return Err(TransportError::MissingPeers {
                ranks: missing,
                waited: opts.connect_timeout,
            });
        }
        Ok(transport)
    }

    /// Joins a running job's mesh as `rank`, the id its door gave: dials
    /// every rank of `peers` (all lower, the mesh's rule) at once, then
    /// accepts ranks that join later. A rank that cannot be reached is
    /// lost (it may have left since the door's book was read); rank 0, the
    /// job's coordinator, must answer.
    pub fn join(
        rank: usize,
        listener: TcpListener,
        peers: &[(usize, SocketAddr)],
        key: &JobKey,
        job_name: &str,
        opts: TcpOptions,
    ) -> Result<TcpTransport, TransportError> {
        if let Some(&(higher, _)) = peers.iter().find(|(r, _)| *r >= rank) {
            return Err(TransportError::InvalidOptions(format!(
                "joiner {rank} was told to dial rank {higher}; joiners dial lower ranks"
            )));
        }
        let opts = TcpOptions {
            joinable: true,
            ..opts
        };
        room_for_links(peers.len(), opts.lanes)?;
        let transport = TcpTransport::listen(rank, rank + 1, listener, key, job_name, opts)?;
        let deadline = deadline_after(opts.connect_timeout);
        let dialed: Vec<(usize, Result<(), TransportError>)> = thread::scope(|s| {
            let dials: Vec<_> = peers
                .iter()
                .map(|&(to, addr)| {
                    let t = &transport;
                    (to, s.spawn(move || t.dial(to, addr, deadline)))
                })
                .collect();
            dials
                .into_iter()
                .map(|(to, d)| {
                    let result = d.join().unwrap_or_else(|_| {
                        Err(TransportError::InvalidOptions(
                            "a dialing thread panicked".into(),
                        ))
                    });
                    (to, result)
                })
                .collect()
        });
        for (to, result) in dialed {
            match result {
                Ok(()) => {}
                Err(e) if to == 0 => return Err(e),
                Err(e) => {
                    transport.shared.grow_to(to);
                    transport.shared.mark_lost(to, Loss::Failure(e.to_string()));
                }
            }
        }
        Ok(transport)
    }

    /// The transport of `rank` in a mesh of `size`, its acceptor running on
    /// `listener`; nobody dialed yet.
    fn listen(
        rank: usize,
        size: usize,
        listener: TcpListener,
        key: &JobKey,
        job_name: &str,
        opts: TcpOptions,
    ) -> Result<TcpTransport, TransportError> {
        let wire_rank = u32::try_from(rank).map_err(|_| {
            TransportError::InvalidOptions(format!("rank {rank} does not fit in 32 bits"))
        })?;
        if opts.max_frame == 0 || u32::try_from(opts.max_frame).is_err() {
            return Err(TransportError::InvalidOptions(format!(
                "max_frame is {}, must be between 1 and {}",
                opts.max_frame,
                u32::MAX
            )));
        }
        if opts.default_timeout.is_zero() || opts.handshake_timeout.is_zero() {
            return Err(TransportError::InvalidOptions(
                "default_timeout and handshake_timeout must not be zero".into(),
            ));
        }
        if !(1..=u16::MAX as usize).contains(&opts.lanes) {
            return Err(TransportError::InvalidOptions(format!(
                "{} lanes per peer; 1 to {} make sense",
                opts.lanes,
                u16::MAX
            )));
        }
        let (listener, stop_accepting) =
            Listener::new(listener).map_err(|source| TransportError::Io {
                during: "setting up the listener",
                source,
            })?;
        let hello = Hello::new(wire_rank, job_name);
        let shared = Arc::new(Shared::new(rank, size, key.clone(), hello, opts));
        // Built before anything can fail, so that a failed connect shuts
        // down whatever it started, through Drop.
        let transport = TcpTransport {
            shared: Arc::clone(&shared),
            acceptor: Mutex::new(None),
            stop_accepting,
        };
        let acceptor = thread::Builder::new()
            .name("swarmrun-accept".into())
            .spawn(move || accept::accept_loop(shared, listener))
            .map_err(|source| TransportError::Io {
                during: "starting the acceptor thread",
                source,
            })?;
        *lock(&transport.acceptor) = Some(acceptor);
        Ok(transport)
    }

    /// Connects to lower rank `to`, retrying while it is not up yet. A peer
    /// that answers but fails the handshake is not retried: another key or
    /// job will not fix itself.
    /// Connects to lower rank `to`, then its extra lanes. A lane that
    /// cannot be set up is left out: messages stripe over the rest.
    fn dial(&self, to: usize, addr: SocketAddr, deadline: Instant) -> Result<(), TransportError> {
        let stream = self.handshake(to, addr, 0, deadline)?;
        self.shared
            .install(to, stream)
            .map_err(|reason| TransportError::Protocol { rank: to, reason })?;
        for lane in 1..self.shared.opts.lanes as u16 {
            let set_up = self
                .handshake(to, addr, lane, deadline)
                .map_err(|e| e.to_string())
                .and_then(|stream| self.shared.install_lane(to, lane, stream));
            if let Err(reason) = set_up {
                self.shared.log(format_args!(
                    "lane {lane} to rank {to} not set up ({reason}); striping over the others"
                ));
            }
        }
        Ok(())
    }

    /// An authenticated connection to `to` for lane `lane`, retrying while
    /// it is not listening yet.
    fn handshake(
        &self,
        to: usize,
        addr: SocketAddr,
        lane: u16,
        deadline: Instant,
    ) -> Result<AuthStream, TransportError> {
        let shared = &self.shared;
        let hello = shared.hello.on_lane(lane);
        let mut backoff = FIRST_BACKOFF;
        let mut last_error = String::from("connect timeout elapsed before the first attempt");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Unreachable {
                    rank: to,
                    addr,
                    reason: last_error,
                });
            }
            let handshake = TcpStream::connect_timeout(&addr, left)
                .map_err(|e| WireError::from_io(addr, "connecting", e))
                .and_then(|stream| {
                    AuthStream::client(stream, &shared.key, hello, shared.stream_options())
                });
            match handshake {
                Ok((stream, hello)) if usize::try_from(hello.rank) == Ok(to) => return Ok(stream),
                Ok((_, hello)) => {
                    return Err(TransportError::Protocol {
                        rank: to,
                        reason: format!("{addr}: answered as rank {}", hello.rank),
                    })
                }
                Err(e) if e.is_transient() => last_error = e.to_string(),
                Err(e) => {
                    return Err(TransportError::Protocol {
                        rank: to,
                        reason: e.to_string(),
                    })
                }
            }
            thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// The extra lanes connected to `rank` now (0 without lanes).
    pub fn lanes_up(&self, rank: usize) -> usize {
        self.shared
            .peer(rank)
            .map_or(0, |p| p.lanes.iter().filter(|l| lock(l).is_some()).count())
    }

    /// Says goodbye to every peer, closes every connection and joins every
    /// thread. Idempotent; also run on drop. Waits at most about a second
    /// for peers to acknowledge, so a hung peer cannot hang us.
    pub fn shutdown(&self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // The acceptor first, so no new link appears behind our back.
        self.stop_accepting.stop();
        if let Some(acceptor) = lock(&self.acceptor).take() {
            let _ = acceptor.join();
        }
        let size = self.shared.size();
        let remote = || (0..size).filter(|&r| r != self.shared.rank);
        for rank in remote() {
            self.say_goodbye(rank);
        }
        let grace = Instant::now() + CLOSE_GRACE;
        for rank in remote() {
            self.shared.wait_not_up(rank, grace);
        }
        for rank in remote() {
            let reason = "this transport was shut down".to_string();
            self.shared.mark_lost(rank, Loss::Goodbye(reason));
        }
        for reader in self.shared.take_readers() {
            let _ = reader.join();
        }
    }

    /// Sends `Close` unless a sender is busy on the link (then the peer
    /// learns of our exit from the closed socket instead), and half-closes.
    fn say_goodbye(&self, rank: usize) {
        if self.shared.lost_reason(rank).is_some() {
            return;
        }
        let Ok(peer) = self.shared.peer(rank) else {
            return;
        };
        let mut writer = match peer.writer.try_lock() {
            Ok(writer) => Some(writer),
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        if let Some(writer) = writer.as_mut().and_then(|w| w.as_mut()) {
            let _ = writer.send(FrameKind::Close, 0, &[]);
        }
        for lane in &peer.lanes {
            if let Ok(mut lane) = lane.try_lock() {
                if let Some(writer) = lane.as_mut() {
                    let _ = writer.send(FrameKind::Close, 0, &[]);
                }
            }
        }
        self.shared.half_close(rank);
    }
}

impl fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpTransport")
            .field("rank", &self.shared.rank)
            .field("size", &self.shared.size())
            .finish_non_exhaustive()
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Transport for TcpTransport {
    fn rank(&self) -> usize {
        self.shared.rank
    }

    fn size(&self) -> usize {
        self.shared.size()
    }

    /// A joiner that has not finished connecting to us yet (it told the
    /// job it is here while our side of its handshake was still running)
    /// is waited for, up to the default timeout.
    fn send(&self, to: usize, tag: u64, payload: &[u8]) -> Result<(), TransportError> {
        let peer = self.shared.peer_or_newcomer(to)?;
        if to == self.shared.rank {
            self.shared.deliver(to, tag, payload.to_vec());
            return Ok(());
        }
        let lost = |reason| TransportError::PeerLost { rank: to, reason };
        let timeout = self.shared.opts.default_timeout;
        if self.shared.wait_connected(to, deadline_after(timeout)) {
            return Err(lost(format!("never connected within {timeout:?}")));
        }
        if let Some(reason) = self.shared.lost_reason(to) {
            return Err(lost(reason));
        }
        let mut writer = lock(&peer.writer);
        let Some(writer) = writer.as_mut() else {
            return Err(lost("not connected".into()));
        };
        lanes::send_striped(&self.shared, &peer, writer, tag, payload)
            .and_then(|striped| match striped {
                true => Ok(()),
                false => send_message(writer, tag, payload, self.shared.send_frame()),
            })
            .map_err(|e| lost(self.shared.mark_lost(to, Loss::Failure(e.to_string()))))
    }

    fn recv_deadline(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, TransportError> {
        self.shared.take(from, tag, deadline, false)
    }

    fn recv_due(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, TransportError> {
        self.shared.take(from, tag, deadline, true)
    }

    fn recv_into(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
        into: &mut [u8],
        chunk: usize,
    ) -> Result<Placed, TransportError> {
        self.shared.take_into(from, tag, deadline, into, chunk)
    }

    fn default_timeout(&self) -> Duration {
        self.shared.opts.default_timeout
    }

    fn recv_any(
        &self,
        from: &[usize],
        tag: u64,
        deadline: Instant,
    ) -> Result<(usize, Vec<u8>), TransportError> {
        self.shared.take_any(from, tag, deadline)
    }
}

/// Sends `payload` as one `Data` frame, or as `DataMore` frames of
/// `max_frame` bytes followed by a final `Data` frame.
fn send_message(
    writer: &mut FrameWriter,
    tag: u64,
    payload: &[u8],
    max_frame: usize,
) -> Result<(), WireError> {
    let mut chunks = payload.chunks(max_frame).peekable();
    if chunks.peek().is_none() {
        return writer.send(FrameKind::Data, tag, &[]);
    }
    while let Some(chunk) = chunks.next() {
        let kind = if chunks.peek().is_some() {
            FrameKind::DataMore
        } else {
            FrameKind::Data
        };
        writer.send(kind, tag, chunk)?;
    }
    Ok(())
}
