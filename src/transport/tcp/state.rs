//! State shared by a transport's caller threads, its acceptor and its
//! per-peer reader threads.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, TryLockError};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use super::lanes::Stripes;
use super::TcpOptions;
use crate::transport::backoff::Backoff;
use crate::transport::{Placed, TransportError};
use crate::wire::{
    Assembled, Assembly, AuthStream, Frame, FrameHeader, FrameKind, FrameReader, FrameWriter,
    Hello, JobKey, Queued, StreamOptions, SEND_FRAME,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

/// Rank ids a joinable mesh accepts: each costs an entry in the peer
/// table, so a key holder claiming rank 4 billion must not make us
/// allocate for it.
pub(super) const MAX_RANKS: usize = 1 << 16;

/// The largest frame a waiting receive reads from the socket itself
/// ([`Shared::read_queued`]): small messages, whose latency is the
/// reader thread's wake-up, not the copy. Larger frames are left to the
/// reader thread, which may lend its stream for their payload. With 32
/// KiB a 64 KiB all-reduce over TCP on 4 ranks took 253 us against 181-198
/// (the bench's doubling sends it as one frame); 64 KiB spans two
/// loopback segments, and a 256 KiB all-reduce looked 5-10% slower than
/// with the reader thread alone (572-621 us against 515-559), which six
/// runs each, 8 rounds, did not confirm (502-648 against 522-606).
const QUEUED_FRAME_MAX: usize = 64 << 10;

pub(super) struct Shared {
    pub(super) rank: usize,
    pub(super) key: JobKey,
    pub(super) hello: Hello,
    pub(super) opts: TcpOptions,
    /// Indexed by rank. Our own entry only ever holds loopback messages.
    /// It grows when a rank that joined the job later connects (see
    /// [`TcpOptions::joinable`]); entries are never removed, so a rank id
    /// is never reused.
    peers: RwLock<Vec<Arc<Peer>>>,
    pub(super) stopping: AtomicBool,
    readers: Mutex<Vec<JoinHandle<()>>>,
    /// Counts every message filed and every link that changed, on any
    /// peer, so [`Shared::take_any`] sleeps on one condition variable
    /// however many peers it listens to.
    arrivals: Mutex<u64>,
    arrived: Condvar,
    /// Where [`Shared::take_any`] starts looking, so that one busy peer
    /// cannot starve the others.
    cursor: AtomicUsize,
    /// Parts of striped messages waiting for their part 0.
    pub(super) stripes: Mutex<Stripes>,
    pub(super) stripe_filed: Condvar,
    /// Numbers the striped messages this rank sends.
    pub(super) next_message: AtomicU64,
}

pub(super) struct Peer {
    inbox: Mutex<Inbox>,
    /// The link's reading side, `None` before it is up and after it is
    /// lost. Its reader thread holds it while reading a frame; a receive
    /// waiting for this peer takes it, when free, to read frames already
    /// queued whole in the socket.
    pump: Mutex<Option<Pump>>,
    /// What the reader thread waits on; set once the link is up.
    watch: OnceLock<Watch>,
    /// Signalled when a message arrives or the link changes state.
    changed: Condvar,
    /// Held for a whole message, so chunks of two messages never interleave.
    pub(super) writer: Mutex<Option<FrameWriter>>,
    /// The extra lanes' writers, lane 1 first (see [`super::lanes`]).
    pub(super) lanes: Vec<Mutex<Option<FrameWriter>>>,
    /// Second handles on the lanes' sockets, to cut them when the peer goes.
    pub(super) lane_sockets: Mutex<Vec<TcpStream>>,
}

/// Where the frames of one link are read and put together.
struct Pump {
    reader: Box<FrameReader>,
    assembly: Assembly,
    /// Where [`FrameReader::queued_frame`] looks at queued bytes.
    scratch: Vec<u8>,
}

/// The link's socket as its reader thread waits on it. While a receive
/// reads frames itself ([`Claim`]) the socket's data does not wake the
/// reader thread: that wake-up, paid by the sender and competing for the
/// cores, would only find the frame read. A hang-up or error still does.
struct Watch {
    epoll: Epoll,
    /// A second handle on the link's socket, registered with `epoll`; also
    /// the one the link is shut down by while its reader or a writer is
    /// blocked on it.
    socket: TcpStream,
    /// Receives holding a [`Claim`].
    claims: AtomicUsize,
}

impl Watch {
    fn new(socket: TcpStream) -> nix::Result<Watch> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(&socket, EpollEvent::new(EpollFlags::EPOLLIN, 0))?;
        Ok(Watch {
            epoll,
            socket,
            claims: AtomicUsize::new(0),
        })
    }

    /// Blocks until the socket has data and no receive holds a claim, or
    /// it hung up or failed.
    fn wait(&self) {
        let mut events = [EpollEvent::empty()];
        while let Err(nix::errno::Errno::EINTR) = self.epoll.wait(&mut events, EpollTimeout::NONE) {
        }
    }

    /// Whether data wakes the reader thread. A watch that cannot be put
    /// back cuts the link, so its reader wakes to the hang-up instead of
    /// sleeping on data forever.
    fn wake_on_data(&self, wake: bool) {
        let flags = match wake {
            true => EpollFlags::EPOLLIN,
            false => EpollFlags::empty(),
        };
        if self
            .epoll
            .modify(&self.socket, &mut EpollEvent::new(flags, 0))
            .is_err()
            && wake
        {
            let _ = self.socket.shutdown(Shutdown::Both);
        }
    }

    fn claim(&self) -> Claim<'_> {
        if self.claims.fetch_add(1, Ordering::SeqCst) == 0 {
            self.wake_on_data(false);
        }
        Claim { watch: self }
    }
}

/// A receive reading frames from the link itself while it waits (see
/// [`Shared::read_queued`]); dropped when it stops, the reader thread
/// waking on data again once no receive holds one.
struct Claim<'w> {
    watch: &'w Watch,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.watch.claims.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.watch.wake_on_data(true);
        }
    }
}

/// What [`Shared::read_queued`] did.
enum ReadQueued {
    /// Read and filed frames.
    Filed,
    /// Found nothing whole to read yet.
    Nothing,
    /// Found what the reader thread must read, or ended the link.
    LeftToReader,
}

struct Inbox {
    queues: HashMap<u64, VecDeque<Vec<u8>>>,
    link: Link,
    handoff: Handoff,
}

/// A receive that reads payloads straight into its own buffer
/// ([`Shared::take_into`]): the reader thread, having read the header of
/// the message a receive waits for, lends it its stream for the payload
/// and waits to get it back. At most one receive per peer at a time, and
/// on one tag at most one receive; the others wait for their messages as
/// [`Shared::take`] does.
enum Handoff {
    Idle,
    /// A receive waits for its next message, one of `len` bytes on `tag`.
    Posted {
        tag: u64,
        len: usize,
    },
    /// The reader read the header of that message and waits.
    Lent(Box<FrameReader>, FrameHeader),
    /// The receive is reading the payload.
    Reading,
    /// Back with the reader: whether the receive read the payload (or
    /// left the stream broken, having marked the link lost), or declined
    /// it, leaving it to be read and queued as usual; and the posting of
    /// the receive's next message, if it waits for another.
    Returned(Box<FrameReader>, bool, Option<(u64, usize)>),
}

enum Link {
    /// Not connected yet (and, for our own rank, never).
    Waiting,
    /// Connected (the peer's [`Watch`] holds the handle it is shut down by).
    Up { addr: SocketAddr },
    /// Gone for good, and why.
    Down(String),
}

impl Peer {
    fn new(extra_lanes: usize) -> Peer {
        Peer {
            inbox: Mutex::new(Inbox {
                queues: HashMap::new(),
                link: Link::Waiting,
                handoff: Handoff::Idle,
            }),
            changed: Condvar::new(),
            pump: Mutex::new(None),
            watch: OnceLock::new(),
            writer: Mutex::new(None),
            lanes: (0..extra_lanes).map(|_| Mutex::new(None)).collect(),
            lane_sockets: Mutex::new(Vec::new()),
        }
    }
}

/// Whether `header` starts the message a receive posted for `len` bytes
/// on `tag` waits for.
fn announces(header: &FrameHeader, tag: u64, len: usize) -> bool {
    header.tag == tag && header.len as usize == len
}

impl Inbox {
    /// Moves the posting of a receive that just got its message of `len`
    /// bytes on `tag` from the queue on to its `next` message, or withdraws
    /// it (no next: done, or leaving at its deadline). A stream lent to it
    /// meanwhile stays lent if it holds that next message, and otherwise
    /// goes back unread, its payload to be read and queued as usual, in
    /// order: a posting or a lent stream left behind would wait for nobody.
    fn repost(&mut self, tag: u64, len: usize, next: Option<usize>, changed: &Condvar) {
        match std::mem::replace(&mut self.handoff, Handoff::Idle) {
            Handoff::Posted { tag: t, len: l } if t == tag && l == len => {
                if let Some(len) = next {
                    self.handoff = Handoff::Posted { tag, len };
                }
            }
            Handoff::Lent(reader, header) if announces(&header, tag, len) => {
                if next == Some(len) {
                    self.handoff = Handoff::Lent(reader, header);
                } else {
                    self.handoff = Handoff::Returned(reader, false, None);
                    changed.notify_all();
                }
            }
            other => self.handoff = other,
        }
    }

    /// The next message from `src` with `tag`, or its loss once nothing
    /// is left; `None` while the link is waiting or up and nothing came.
    fn take(&mut self, src: usize, tag: u64) -> Option<Result<Vec<u8>, TransportError>> {
        if let Some(queue) = self.queues.get_mut(&tag) {
            let message = queue.pop_front();
            if queue.is_empty() {
                // Tags are often per step; do not keep one empty queue per
                // step forever.
                self.queues.remove(&tag);
            }
            if let Some(message) = message {
                return Some(Ok(message));
            }
        }
        match &self.link {
            Link::Down(reason) => Some(Err(TransportError::PeerLost {
                rank: src,
                reason: reason.clone(),
            })),
            Link::Waiting | Link::Up { .. } => None,
        }
    }
}

/// Why a link went down.
pub(super) enum Loss {
    /// The peer said goodbye. Every job ends this way, so it is not logged.
    Goodbye(String),
    /// Anything else; logged, since it is news to whoever reads stderr.
    Failure(String),
}

/// Locks a mutex whose holder panicked: every critical section here leaves
/// the data consistent (a push, a pop, a state swap), so the data is usable.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub(super) fn new(
        rank: usize,
        size: usize,
        key: JobKey,
        hello: Hello,
        opts: TcpOptions,
    ) -> Shared {
        Shared {
            rank,
            key,
            hello,
            opts,
            peers: RwLock::new(
                (0..size)
                    .map(|_| Arc::new(Peer::new(opts.lanes.saturating_sub(1))))
                    .collect(),
            ),
            stopping: AtomicBool::new(false),
            readers: Mutex::new(Vec::new()),
            arrivals: Mutex::new(0),
            arrived: Condvar::new(),
            cursor: AtomicUsize::new(0),
            stripes: Mutex::new(Stripes::default()),
            stripe_filed: Condvar::new(),
            next_message: AtomicU64::new(0),
        }
    }

    /// Rank ids known so far: the mesh's size, plus joiners.
    pub(super) fn size(&self) -> usize {
        self.peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Makes room for rank `rank`, a joiner: every id up to it gets an
    /// entry that waits for its connection.
    pub(super) fn grow_to(&self, rank: usize) {
        let mut peers = self.peers.write().unwrap_or_else(PoisonError::into_inner);
        while peers.len() <= rank {
            peers.push(Arc::new(Peer::new(self.opts.lanes.saturating_sub(1))));
        }
    }

    /// Wakes [`Shared::take_any`]: something happened on some link.
    fn signal_arrival(&self) {
        *lock(&self.arrivals) += 1;
        self.arrived.notify_all();
    }

    pub(super) fn stream_options(&self) -> StreamOptions {
        StreamOptions {
            max_frame: self.opts.max_frame,
            handshake_timeout: self.opts.handshake_timeout,
            seal_loopback: self.opts.seal_loopback,
        }
    }

    /// Payload bytes of the frames this rank sends: what the peer accepts,
    /// and no more than one sealing buffer's worth.
    pub(super) fn send_frame(&self) -> usize {
        self.opts.max_frame.min(SEND_FRAME)
    }

    pub(super) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub(super) fn log(&self, message: fmt::Arguments<'_>) {
        tracing::warn!("swarmrun rank {}: {message}", self.rank);
    }

    /// The peer `rank`; in a joinable mesh, a rank id beyond those known
    /// is a joiner whose connection may still be on its way, and gets an
    /// entry to wait on.
    pub(super) fn peer_or_newcomer(&self, rank: usize) -> Result<Arc<Peer>, TransportError> {
        if self.opts.joinable && rank < MAX_RANKS {
            self.grow_to(rank);
        }
        self.peer(rank)
    }

    pub(super) fn peer(&self, rank: usize) -> Result<Arc<Peer>, TransportError> {
        let peers = self.peers.read().unwrap_or_else(PoisonError::into_inner);
        peers.get(rank).cloned().ok_or(TransportError::NoSuchRank {
            rank,
            size: peers.len(),
        })
    }

    /// Makes `stream` the link to rank `src` and starts its reader thread.
    /// Refuses (with the reason) a rank that is already connected or lost:
    /// a second connection claiming a live rank is an impostor or a bug.
    pub(super) fn install(self: &Arc<Self>, src: usize, stream: AuthStream) -> Result<(), String> {
        let addr = stream.peer_addr();
        let socket = stream.try_clone_socket().map_err(|e| e.to_string())?;
        // A peer that stops reading for this long is treated as dead rather
        // than blocking our senders forever.
        socket
            .set_write_timeout(Some(self.opts.default_timeout))
            .map_err(|e| format!("{addr}: cannot set the send timeout: {e}"))?;
        let watch =
            Watch::new(socket).map_err(|e| format!("{addr}: cannot watch the socket: {e}"))?;
        let (reader, writer) = stream.into_split();
        if self.opts.joinable {
            self.grow_to(src);
        }
        let peer = self.peer(src).map_err(|e| e.to_string())?;
        {
            let mut inbox = lock(&peer.inbox);
            if self.stopping() {
                return Err(format!("{addr}: this transport is shutting down"));
            }
            match &inbox.link {
                Link::Waiting => {}
                Link::Up { addr: current, .. } => {
                    return Err(format!(
                        "{addr}: claims rank {src}, which is already connected from {current}"
                    ))
                }
                Link::Down(_) => {
                    return Err(format!(
                        "{addr}: claims rank {src}, which was lost; rejoining is not supported"
                    ))
                }
            }
            *lock(&peer.writer) = Some(writer);
            // Set once: `Link::Waiting` above means never installed before.
            let _ = peer.watch.set(watch);
            *lock(&peer.pump) = Some(Pump {
                reader: Box::new(reader),
                assembly: Assembly::new(self.opts.max_message),
                scratch: Vec::new(),
            });
            inbox.link = Link::Up { addr };
            peer.changed.notify_all();
        }
        self.signal_arrival();
        let shared = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name(format!("swarmrun-recv-{src}"))
            .spawn(move || shared.read_loop(src));
        match spawned {
            Ok(handle) => {
                lock(&self.readers).push(handle);
                Ok(())
            }
            Err(e) => {
                let reason = format!("{addr}: cannot start its reader thread: {e}");
                Err(self.mark_lost(src, Loss::Failure(reason)))
            }
        }
    }

    /// Takes the link to `src` down (unless it already is) and wakes everyone
    /// waiting on it. Returns the reason that stands: the first one, which is
    /// the cause rather than a consequence.
    pub(super) fn mark_lost(&self, src: usize, loss: Loss) -> String {
        let (reason, news) = match loss {
            Loss::Goodbye(reason) => (reason, false),
            Loss::Failure(reason) => (reason, true),
        };
        let Ok(peer) = self.peer(src) else {
            return reason;
        };
        let mut inbox = lock(&peer.inbox);
        if let Link::Down(first) = &inbox.link {
            return first.clone();
        }
        if let (Link::Up { .. }, Some(watch)) = (&inbox.link, peer.watch.get()) {
            // Already-broken sockets refuse this too; either way it is closed.
            let _ = watch.socket.shutdown(Shutdown::Both);
        }
        for lane in lock(&peer.lane_sockets).iter() {
            let _ = lane.shutdown(Shutdown::Both);
        }
        if news && !self.stopping() {
            self.log(format_args!("lost rank {src}: {reason}"));
        }
        inbox.link = Link::Down(reason.clone());
        peer.changed.notify_all();
        drop(inbox);
        self.signal_arrival();
        // A part 0 waiting for the other parts gives up now.
        let _stripes = lock(&self.stripes);
        self.stripe_filed.notify_all();
        reason
    }

    /// The reason `src` was lost, if it was.
    pub(super) fn lost_reason(&self, src: usize) -> Option<String> {
        let peer = self.peer(src).ok()?;
        let link = &lock(&peer.inbox).link;
        match link {
            Link::Down(reason) => Some(reason.clone()),
            Link::Waiting | Link::Up { .. } => None,
        }
    }

    /// Half-closes an up link after our goodbye: the peer reads everything we
    /// sent, then answers with its own close, which ends our reader.
    pub(super) fn half_close(&self, src: usize) {
        if let Ok(peer) = self.peer(src) {
            let up = matches!(lock(&peer.inbox).link, Link::Up { .. });
            if let (true, Some(watch)) = (up, peer.watch.get()) {
                let _ = watch.socket.shutdown(Shutdown::Write);
            }
        }
    }

    /// Waits until the link to `src` is no longer up, or `deadline`.
    pub(super) fn wait_not_up(&self, src: usize, deadline: Instant) {
        self.wait_for(src, deadline, |inbox| {
            (!matches!(inbox.link, Link::Up { .. })).then_some(())
        });
    }

    /// Waits until `src` has connected (or was lost), or `deadline`; returns
    /// whether it is still missing.
    pub(super) fn wait_connected(&self, src: usize, deadline: Instant) -> bool {
        self.wait_for(src, deadline, |inbox| {
            (!matches!(inbox.link, Link::Waiting)).then_some(())
        })
        .is_none()
    }

    pub(super) fn deliver(&self, src: usize, tag: u64, message: Vec<u8>) {
        if let Ok(peer) = self.peer(src) {
            let mut inbox = lock(&peer.inbox);
            inbox.queues.entry(tag).or_default().push_back(message);
            peer.changed.notify_all();
            drop(inbox);
            self.signal_arrival();
        }
    }

    /// Takes the next message from `src` with `tag`. Messages that arrived
    /// before a link went down are still handed out; only then does the
    /// loss show.
    ///
    /// A receive of a message that is `due` (see
    /// [`crate::transport::Transport::recv_due`]) stays awake longer and
    /// reads the link itself meanwhile ([`Shared::read_queued`]); others
    /// leave the link to the reader thread, as waits for orders do, whose
    /// messages are milliseconds away: reading there too cost the
    /// quickstart's miners 2-3% more CPU (`bench train`, pipeline 0.73 and
    /// 0.76 of one process against 0.76 and 0.78).
    pub(super) fn take(
        &self,
        src: usize,
        tag: u64,
        deadline: Instant,
        due: bool,
    ) -> Result<Vec<u8>, TransportError> {
        self.peer_or_newcomer(src)?;
        let reading = due.then(Backoff::due);
        self.wait_reading(src, deadline, reading, |inbox| inbox.take(src, tag))
            .unwrap_or(Err(TransportError::Timeout { rank: src, tag }))
    }

    /// [`Shared::take`] of the messages that fill `into`, `chunk` bytes
    /// each (see [`crate::transport::Transport::recv_into`]). The receive
    /// stays posted for the next of them, so the reader lends it the
    /// stream on that message's header and the payload is read straight
    /// into `into` instead of a buffer of its own and copied (that copy was
    /// 7-9% of the CPU of a 64 MiB all-reduce over TCP on 4 ranks); a
    /// sealed one is opened there too. A payload cut off at `deadline`
    /// leaves the stream mid-frame, so that ends the link, as does one
    /// failing its MAC.
    pub(super) fn take_into(
        &self,
        src: usize,
        tag: u64,
        deadline: Instant,
        into: &mut [u8],
        chunk: usize,
    ) -> Result<Placed, TransportError> {
        enum Got {
            Message(Result<Vec<u8>, TransportError>),
            Lent(Box<FrameReader>, FrameHeader),
        }
        let peer = self.peer_or_newcomer(src)?;
        let total = into.len();
        let chunk = chunk.max(1);
        // The length of the message for offset `at`, if one is still due
        // there (an empty `into` is one empty message).
        let due = |at: usize| (at < total || at == 0).then(|| (total - at).min(chunk));
        let mut at = 0;
        while let Some(len) = due(at) {
            let next = due(at + len.max(1));
            let got = self.wait_for(src, deadline, |inbox| {
                if let Some(taken) = inbox.take(src, tag) {
                    let keep = taken.as_ref().is_ok_and(|m| m.len() == len);
                    inbox.repost(tag, len, next.filter(|_| keep), &peer.changed);
                    return Some(Got::Message(taken));
                }
                match std::mem::replace(&mut inbox.handoff, Handoff::Idle) {
                    Handoff::Lent(reader, header) if announces(&header, tag, len) => {
                        inbox.handoff = Handoff::Reading;
                        return Some(Got::Lent(reader, header));
                    }
                    Handoff::Idle => inbox.handoff = Handoff::Posted { tag, len },
                    other => inbox.handoff = other,
                }
                None
            });
            let (mut reader, header) = match got {
                Some(Got::Message(Ok(message))) if message.len() == len => {
                    into[at..at + len].copy_from_slice(&message);
                    at += len.max(1);
                    continue;
                }
                Some(Got::Message(taken)) => return taken.map(|message| Some((at, message))),
                Some(Got::Lent(reader, header)) => (reader, header),
                None => {
                    lock(&peer.inbox).repost(tag, len, None, &peer.changed);
                    return Err(TransportError::Timeout { rank: src, tag });
                }
            };
            let read = reader.recv_payload_into(&header, &mut into[at..at + len], deadline);
            let lost = read
                .err()
                .map(|e| self.mark_lost(src, Loss::Failure(e.to_string())));
            let next = next.filter(|_| lost.is_none()).map(|len| (tag, len));
            lock(&peer.inbox).handoff = Handoff::Returned(reader, true, next);
            peer.changed.notify_all();
            if let Some(reason) = lost {
                return Err(TransportError::PeerLost { rank: src, reason });
            }
            at += len.max(1);
        }
        Ok(None)
    }

    /// Lends `reader`, which just read `header`, to the receive posted for
    /// that message, if there is one, and waits for it back: `Ok` once the
    /// payload was read, `Err` with the payload still to read.
    fn lend(
        &self,
        src: usize,
        header: FrameHeader,
        reader: Box<FrameReader>,
    ) -> Result<Box<FrameReader>, Box<FrameReader>> {
        let Ok(peer) = self.peer(src) else {
            return Err(reader);
        };
        let mut inbox = lock(&peer.inbox);
        let wanted =
            matches!(inbox.handoff, Handoff::Posted { tag, len } if announces(&header, tag, len));
        if !wanted {
            return Err(reader);
        }
        inbox.handoff = Handoff::Lent(reader, header);
        peer.changed.notify_all();
        loop {
            match std::mem::replace(&mut inbox.handoff, Handoff::Idle) {
                Handoff::Returned(reader, true, next) => {
                    if let Some((tag, len)) = next {
                        inbox.handoff = Handoff::Posted { tag, len };
                    }
                    return Ok(reader);
                }
                Handoff::Returned(reader, false, _) => return Err(reader),
                other => inbox.handoff = other,
            }
            inbox = peer
                .changed
                .wait(inbox)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The next message with `tag` from any rank of `from`, looking at
    /// them from a rotating start; see [`crate::transport::Transport::recv_any`].
    pub(super) fn take_any(
        &self,
        from: &[usize],
        tag: u64,
        deadline: Instant,
    ) -> Result<(usize, Vec<u8>), TransportError> {
        let peers: Vec<Arc<Peer>> = from
            .iter()
            .map(|&r| self.peer_or_newcomer(r))
            .collect::<Result<_, _>>()?;
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let mut arrivals = lock(&self.arrivals);
        loop {
            // Whoever files a message signals under this lock afterwards,
            // so a message filed after the look wakes the wait below.
            for k in 0..from.len() {
                let i = (start + k) % from.len();
                if let Some(taken) = lock(&peers[i].inbox).take(from[i], tag) {
                    return taken.map(|message| (from[i], message));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::NoneArrived {
                    ranks: from.len(),
                    tag,
                });
            }
            arrivals = self
                .arrived
                .wait_timeout(arrivals, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits on `src`'s inbox until `ready` returns something, or `deadline`.
    fn wait_for<R>(
        &self,
        src: usize,
        deadline: Instant,
        ready: impl FnMut(&mut Inbox) -> Option<R>,
    ) -> Option<R> {
        self.wait_reading(src, deadline, None, ready)
    }

    /// [`Shared::wait_for`]; given a `reading` backoff, the wait also
    /// reads the frames queued whole in the link's socket until that
    /// backoff sends it to sleep ([`Shared::read_queued`]).
    fn wait_reading<R>(
        &self,
        src: usize,
        deadline: Instant,
        reading: Option<Backoff>,
        mut ready: impl FnMut(&mut Inbox) -> Option<R>,
    ) -> Option<R> {
        let peer = self.peer(src).ok()?;
        let mut inbox = lock(&peer.inbox);
        let reads = reading.is_some();
        let mut backoff = reading.unwrap_or_else(Backoff::new);
        let mut claim = None;
        // Until it meets a frame that only the reader thread reads.
        let mut awake = true;
        loop {
            if let Some(result) = ready(&mut inbox) {
                return Some(result);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            if awake && !backoff.should_sleep() {
                drop(inbox);
                if reads && claim.is_none() {
                    claim = peer.watch.get().map(Watch::claim);
                }
                let read = match claim {
                    Some(_) => self.read_queued(src, &peer),
                    None => ReadQueued::Nothing,
                };
                match read {
                    ReadQueued::Filed => {}
                    ReadQueued::Nothing => backoff.snooze(),
                    // What is ahead in the link comes through the reader
                    // thread, which wakes this wait when it files it.
                    ReadQueued::LeftToReader => awake = false,
                }
                inbox = lock(&peer.inbox);
                continue;
            }
            // Asleep, it leaves the link to the reader thread.
            claim = None;
            inbox = peer
                .changed
                .wait_timeout(inbox, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Keeps a reader thread for joining at shutdown.
    pub(super) fn add_reader(&self, reader: JoinHandle<()>) {
        lock(&self.readers).push(reader);
    }

    /// Every reader thread started so far, for joining at shutdown.
    pub(super) fn take_readers(&self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut *lock(&self.readers))
    }

    /// The reader thread of `src`'s link: waits on its [`Watch`] without
    /// holding the link, then reads and files what came
    /// ([`Shared::pump_one`]) unless a waiting receive read it first;
    /// until the link ends.
    fn read_loop(&self, src: usize) {
        let Ok(peer) = self.peer(src) else {
            return;
        };
        let Some(watch) = peer.watch.get() else {
            return;
        };
        // Whether the reader holds bytes it read ahead, which the socket
        // no longer signals. It changes only in this thread's turns (a
        // stream lent to a receive comes back before `pump_one` returns;
        // a receive reading a queued frame reads the socket itself, not
        // this buffer), so it is looked at once a turn; the handshake may
        // have left some before the first.
        let mut buffered = true;
        loop {
            if !buffered {
                watch.wait();
            }
            let mut held = lock(&peer.pump);
            // None: a receive reading the link ended it.
            let Some(pump) = held.take() else {
                return;
            };
            buffered = pump.reader.has_buffered();
            if !buffered && !readable(&watch.socket) {
                *held = Some(pump);
                continue;
            }
            match self.pump_one(src, pump) {
                Ok(pump) => {
                    buffered = pump.reader.has_buffered();
                    *held = Some(pump);
                }
                Err(loss) => {
                    drop(held);
                    self.mark_lost(src, loss);
                    return;
                }
            }
        }
    }

    /// Reads one frame from `src`'s link and files it, or lends the
    /// stream to the receive waiting for it; blocks until the frame is in.
    fn pump_one(&self, src: usize, mut pump: Pump) -> Result<Pump, Loss> {
        let header = pump
            .reader
            .recv_header()
            .map_err(|e| Loss::Failure(e.to_string()))?;
        if header.kind == FrameKind::Data && pump.assembly.idle() {
            match self.lend(src, header, pump.reader) {
                Ok(back) => {
                    pump.reader = back;
                    return Ok(pump);
                }
                Err(back) => pump.reader = back,
            }
        }
        let frame = pump
            .reader
            .recv_payload(header)
            .map_err(|e| Loss::Failure(e.to_string()))?;
        let addr = pump.reader.peer_addr();
        self.file(src, &mut pump.assembly, frame, addr)?;
        Ok(pump)
    }

    /// Reads and files the frames from `src` that are already queued whole
    /// in its socket, when no one else is reading the link. A receive
    /// waiting for a message microseconds away takes it this way instead
    /// of waiting for the reader thread to be woken and file it: a 1 KiB
    /// all-reduce on 2 ranks over loopback took 38 us waiting for the
    /// reader thread, 11-15 us reading itself (OpenMPI: 6.5 us). Only small
    /// `Data` frames (see
    /// [`QUEUED_FRAME_MAX`]), which never wait for another lane, and only
    /// whole ones, so that no peer stalling mid-frame holds a receive past
    /// its deadline.
    fn read_queued(&self, src: usize, peer: &Peer) -> ReadQueued {
        let mut held = match peer.pump.try_lock() {
            Ok(held) => held,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return ReadQueued::Nothing,
        };
        let mut read = ReadQueued::Nothing;
        while let Some(pump) = held.as_mut() {
            match pump
                .reader
                .queued_frame(QUEUED_FRAME_MAX, &mut pump.scratch)
            {
                Queued::Whole(header)
                    if matches!(header.kind, FrameKind::Data | FrameKind::DataMore) => {}
                Queued::Nothing => return read,
                Queued::Whole(_) | Queued::Other => return ReadQueued::LeftToReader,
            }
            let addr = pump.reader.peer_addr();
            let filed = pump
                .reader
                .recv_queued()
                .map_err(|e| Loss::Failure(e.to_string()))
                .and_then(|frame| self.file(src, &mut pump.assembly, frame, addr));
            if let Err(loss) = filed {
                *held = None;
                drop(held);
                self.mark_lost(src, loss);
                return ReadQueued::LeftToReader;
            }
            read = ReadQueued::Filed;
        }
        ReadQueued::LeftToReader
    }

    /// Puts `frame` from `src` into the message it belongs to, and
    /// delivers that message once whole.
    fn file(
        &self,
        src: usize,
        assembly: &mut Assembly,
        frame: Frame,
        addr: SocketAddr,
    ) -> Result<(), Loss> {
        match assembly.take(frame) {
            Ok(Assembled::Pending) => Ok(()),
            Ok(Assembled::Message { tag, payload }) => {
                self.deliver(src, tag, payload);
                Ok(())
            }
            Ok(Assembled::Striped { tag, head, part }) => {
                let message = self.join_parts(src, head, part)?;
                self.deliver(src, tag, message);
                Ok(())
            }
            Ok(Assembled::Closed) => Err(Loss::Goodbye(format!("{addr}: closed its transport"))),
            Err(reason) => Err(Loss::Failure(format!("{addr}: {reason}"))),
        }
    }
}

/// Whether `socket` has something to read now (or has failed, which a
/// read then reports).
fn readable(socket: &TcpStream) -> bool {
    loop {
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) => return n > 0,
            Err(nix::errno::Errno::EINTR) => continue,
            // Let the read that follows report it.
            Err(_) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpListener;
    use std::time::Duration;

    use super::*;
    use crate::wire::deadline_after;

    const JOB: &str = "handoff-test";
    const PATIENCE: Duration = Duration::from_secs(30);

    /// Rank 0's state with rank 1 installed over a real loopback link,
    /// sealed or not, and rank 1's end of it.
    fn linked(seal_loopback: bool) -> (Arc<Shared>, AuthStream) {
        let key = JobKey::generate().unwrap();
        let opts = TcpOptions {
            seal_loopback,
            ..TcpOptions::default()
        };
        let shared = Arc::new(Shared::new(0, 2, key.clone(), Hello::new(0, JOB), opts));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stream_opts = shared.stream_options();
        let server = thread::spawn(move || {
            let (socket, _) = listener.accept().unwrap();
            AuthStream::server(socket, &key, Hello::new(0, JOB), stream_opts)
                .unwrap()
                .0
        });
        let socket = TcpStream::connect(addr).unwrap();
        let client_key = shared.key.clone();
        let (client, _) =
            AuthStream::client(socket, &client_key, Hello::new(1, JOB), stream_opts).unwrap();
        shared.install(1, server.join().unwrap()).unwrap();
        (shared, client)
    }

    /// Posts a receive of `len` bytes on `tag` as `take_into` does, before
    /// anything is sent, so that the reader meets it on the frame's header
    /// whenever it runs.
    fn post(shared: &Shared, tag: u64, len: usize) {
        lock(&shared.peer(1).unwrap().inbox).handoff = Handoff::Posted { tag, len };
    }

    /// `queued` on tag 5 as if the reader had read it before a receive of
    /// its length was posted, then `sent` by rank 1, once the reader has
    /// lent its stream on the first of them.
    fn queued_then_lent(shared: &Shared, rank1: &mut AuthStream, queued: &[u8], sent: &[&[u8]]) {
        shared.deliver(1, 5, queued.to_vec());
        post(shared, 5, queued.len());
        for message in sent {
            rank1.send(FrameKind::Data, 5, message).unwrap();
        }
        let peer = shared.peer(1).unwrap();
        let started = Instant::now();
        while !matches!(lock(&peer.inbox).handoff, Handoff::Lent(..)) {
            assert!(
                started.elapsed() < PATIENCE,
                "the reader never lent its stream"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_posted_receive_reads_the_payload_itself_and_the_reader_goes_on_after_it() {
        for sealed in [false, true] {
            let (shared, mut rank1) = linked(sealed);
            post(&shared, 5, 6);
            rank1.send(FrameKind::Data, 5, b"placed").unwrap();
            rank1.send(FrameKind::Data, 5, b"queued as usual").unwrap();
            let mut into = [0u8; 6];
            let got = shared.take_into(1, 5, deadline_after(PATIENCE), &mut into, 6);
            assert_eq!(got.unwrap(), None, "sealed: {sealed}");
            assert_eq!(&into, b"placed");
            let next = shared.take(1, 5, deadline_after(PATIENCE), false).unwrap();
            assert_eq!(next, b"queued as usual");
            let peer = shared.peer(1).unwrap();
            assert!(matches!(lock(&peer.inbox).handoff, Handoff::Idle));
        }
    }

    /// Posts a receive of `len` bytes on tag 5, has rank 1 write the
    /// header of such a frame and then `body` raw on a link sealed or not,
    /// and returns rank 0's state and what the receive got by `wait`.
    fn raw_frame_to_a_posted_receive(
        sealed: bool,
        len: u32,
        body: &[u8],
        wait: Duration,
    ) -> (Arc<Shared>, Result<Placed, TransportError>) {
        let (shared, rank1) = linked(sealed);
        post(&shared, 5, len as usize);
        let mut raw = rank1.try_clone_socket().unwrap();
        let header = FrameHeader {
            kind: FrameKind::Data,
            tag: 5,
            len,
        };
        raw.write_all(&header.encode()).unwrap();
        raw.write_all(body).unwrap();
        let mut into = vec![0u8; len as usize];
        let got = shared.take_into(1, 5, deadline_after(wait), &mut into, len as usize);
        drop(rank1);
        (shared, got)
    }

    #[test]
    fn a_sealed_payload_failing_its_mac_where_it_was_read_ends_the_link() {
        let body: Vec<u8> = b"abc"
            .iter()
            .copied()
            .chain([0; crate::wire::MAC_LEN])
            .collect();
        match raw_frame_to_a_posted_receive(true, 3, &body, PATIENCE).1 {
            Err(TransportError::PeerLost { rank: 1, reason }) => {
                assert!(reason.contains("integrity check"), "{reason}")
            }
            other => panic!("expected rank 1 lost for its MAC, got {other:?}"),
        }
    }

    #[test]
    fn a_receive_that_takes_a_queued_message_gives_back_the_stream_lent_to_it_unread() {
        let (shared, mut rank1) = linked(false);
        queued_then_lent(&shared, &mut rank1, b"first!", &[b"second"]);
        let mut into = [0u8; 6];
        let got = shared.take_into(1, 5, deadline_after(PATIENCE), &mut into, 6);
        assert_eq!(got.unwrap(), None);
        assert_eq!(&into, b"first!");
        // A plain receive, which never reads a lent stream, gets the next.
        let next = shared.take(1, 5, deadline_after(PATIENCE), false).unwrap();
        assert_eq!(next, b"second");
    }

    #[test]
    fn a_receive_of_several_messages_stays_posted_for_each_next_one() {
        let (shared, mut rank1) = linked(false);
        queued_then_lent(&shared, &mut rank1, b"aa", &[b"bb", b"c", b"after"]);
        let peer = shared.peer(1).unwrap();
        // "aa" from the queue, "bb" from the stream lent meanwhile, and
        // "c" from the stream lent again, on the posting for it.
        let mut into = [0u8; 5];
        let got = shared.take_into(1, 5, deadline_after(PATIENCE), &mut into, 2);
        assert_eq!(got.unwrap(), None);
        assert_eq!(&into, b"aabbc");
        let next = shared.take(1, 5, deadline_after(PATIENCE), false).unwrap();
        assert_eq!(next, b"after");
        assert!(matches!(lock(&peer.inbox).handoff, Handoff::Idle));
    }

    /// Waits until rank 1's bytes are queued in rank 0's socket.
    fn queued(shared: &Shared) {
        let peer = shared.peer(1).unwrap();
        let started = Instant::now();
        while !readable(&peer.watch.get().unwrap().socket) {
            assert!(started.elapsed() < PATIENCE, "nothing reached the socket");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_waiting_receive_reads_a_queued_message_while_the_reader_thread_sleeps() {
        for sealed in [false, true] {
            let (shared, mut rank1) = linked(sealed);
            let peer = shared.peer(1).unwrap();
            // As a receive that reads the link holds it: data does not
            // wake the reader thread, so only the receive can read this.
            let claim = peer.watch.get().unwrap().claim();
            rank1
                .send(FrameKind::Data, 5, b"read by the receive")
                .unwrap();
            queued(&shared);
            let got = shared.take(1, 5, deadline_after(PATIENCE), true);
            assert_eq!(got.unwrap(), b"read by the receive", "sealed: {sealed}");
            drop(claim);
            // No claim left: the reader thread files what comes for a
            // receive that never reads the link.
            rank1
                .send(FrameKind::Data, 6, b"filed by the reader")
                .unwrap();
            let (from, got) = shared.take_any(&[1], 6, deadline_after(PATIENCE)).unwrap();
            assert_eq!((from, &got[..]), (1, &b"filed by the reader"[..]));
        }
    }

    #[test]
    fn a_receive_gives_up_at_its_deadline_on_a_frame_still_arriving_and_the_link_stays_up() {
        let (shared, rank1) = linked(false);
        let mut raw = rank1.try_clone_socket().unwrap();
        let header = FrameHeader {
            kind: FrameKind::Data,
            tag: 5,
            len: 100,
        };
        raw.write_all(&header.encode()).unwrap();
        raw.write_all(&[7u8; 10]).unwrap();
        let (gave_up, wait) = std::sync::mpsc::channel::<()>();
        let rest = thread::spawn(move || {
            // Once the receive gave up (or, if it never does, after long).
            let _ = wait.recv_timeout(PATIENCE);
            raw.write_all(&[7u8; 90]).unwrap();
        });
        let soon = deadline_after(Duration::from_millis(100));
        let early = shared.take(1, 5, soon, true);
        gave_up.send(()).unwrap();
        assert!(
            matches!(early, Err(TransportError::Timeout { rank: 1, tag: 5 })),
            "{early:?}"
        );
        rest.join().unwrap();
        let got = shared.take(1, 5, deadline_after(PATIENCE), true);
        assert_eq!(got.unwrap(), vec![7u8; 100]);
        assert!(shared.lost_reason(1).is_none());
    }

    #[test]
    fn a_payload_cut_off_at_the_receives_deadline_ends_the_link() {
        // Long beside the reader meeting the header, which it has read long
        // before on any host; the receive then waits this long for the rest.
        let wait = Duration::from_secs(5);
        let (shared, got) = raw_frame_to_a_posted_receive(false, 100, &[7u8; 10], wait);
        match got {
            Err(TransportError::PeerLost { rank: 1, reason }) => {
                assert!(reason.contains("timed out reading a frame"), "{reason}")
            }
            other => panic!("expected rank 1 lost mid-message, got {other:?}"),
        }
        assert!(shared.lost_reason(1).is_some());
    }
}
