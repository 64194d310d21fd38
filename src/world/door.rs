//! The door of a running job: where ranks that join later (another
//! cluster's allocation, a lab machine) get a rank id and the address book.
//!
//! Rank 0 keeps its TCP rendezvous listener once the job has formed and
//! hands it to a [`Door`]. A joiner [`knock`]s: it authenticates with the
//! job key (the rendezvous handshake, claiming rank [`JOINER`]), sends its
//! line (where its transport listens, its host, its site) and gets a rank
//! id never used before in this job, with the lines of every rank still
//! in it. It then dials them all: each has a lower id, which is the mesh's
//! rule for who dials whom. What the job does with a joiner is the
//! orchestrator's business; the door only numbers newcomers, and keeps
//! the book ([`Membership`]) that the orchestrator keeps current.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::rendezvous::{decode_line, encode_line, Blame};
use super::{Endpoint, PeerInfo, RendezvousError, World};
use crate::wire::listener::{Listener, Stopper};
use crate::wire::{AuthStream, FrameKind, Hello, JobKey, StreamOptions};

/// The rank a joiner claims in its handshake: it has none yet.
pub const JOINER: u32 = u32::MAX;

/// How long the door backs off after a failed accept (out of file
/// descriptors and the like), instead of spinning on the error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// Knocks answered at once; each ends within the handshake timeout.
const MAX_KNOCKS: usize = 16;

/// Who is in the job, as rank 0 knows it: the door adds joiners, the
/// orchestrator takes out whoever leaves. Shared between them.
#[derive(Debug)]
pub struct Membership {
    book: Mutex<Book>,
}

#[derive(Debug)]
struct Book {
    peers: BTreeMap<usize, PeerInfo>,
    /// The id the next joiner gets: one past every id ever given.
    next: usize,
}

impl Membership {
    /// Everyone of a newly formed `world`.
    pub fn new(world: &World) -> Arc<Membership> {
        Arc::new(Membership {
            book: Mutex::new(Book {
                peers: world.peers.iter().map(|p| (p.rank, p.clone())).collect(),
                next: world.size,
            }),
        })
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `rank` has left the job: joiners no longer dial it.
    pub fn remove(&self, rank: usize) {
        self.book().peers.remove(&rank);
    }

    /// Everyone still in the job, by rank.
    pub fn live(&self) -> Vec<PeerInfo> {
        self.book().peers.values().cloned().collect()
    }

    pub fn peer(&self, rank: usize) -> Option<PeerInfo> {
        self.book().peers.get(&rank).cloned()
    }

    /// Numbers a newcomer and returns its id with the book, it included.
    fn admit(&self, mut info: PeerInfo) -> (usize, Vec<PeerInfo>) {
        let mut book = self.book();
        let rank = book.next;
        book.next += 1;
        info.rank = rank;
        book.peers.insert(rank, info);
        (rank, book.peers.values().cloned().collect())
    }
}

/// Rank 0's open door; closed when dropped.
pub struct Door {
    stop: Stopper,
    thread: Option<JoinHandle<()>>,
}

impl Door {
    /// Answers knocks on `listener` (rank 0's rendezvous listener) until
    /// dropped. A knock without the job key, of another job or garbled is
    /// refused and logged; the job never notices.
    pub fn open(
        listener: TcpListener,
        key: JobKey,
        job_name: String,
        membership: Arc<Membership>,
    ) -> io::Result<Door> {
        let (listener, stop) = Listener::new(listener)?;
        let thread = thread::Builder::new()
            .name("swarmrun-door".into())
            .spawn(move || {
                let mut knocks: Vec<JoinHandle<()>> = Vec::new();
                let say = |line: &str| tracing::warn!("swarmrun: join door: {line}");
                while let Some((stream, addr)) = listener.accept_or_back_off(ACCEPT_BACKOFF, say) {
                    knocks.retain(|k| !k.is_finished());
                    if knocks.len() >= MAX_KNOCKS {
                        tracing::warn!(
                            "swarmrun: join door: refused {addr}: too many knocks at once"
                        );
                        continue;
                    }
                    let (key, job_name, membership) =
                        (key.clone(), job_name.clone(), Arc::clone(&membership));
                    let answered =
                        thread::Builder::new()
                            .name("swarmrun-knock".into())
                            .spawn(move || {
                                if let Err(e) = answer(stream, &key, &job_name, &membership) {
                                    tracing::warn!("swarmrun: join door: refused {addr}: {e}");
                                }
                            });
                    match answered {
                        Ok(handle) => knocks.push(handle),
                        Err(e) => tracing::warn!("swarmrun: join door: refused {addr}: {e}"),
                    }
                }
                for k in knocks {
                    let _ = k.join();
                }
            })?;
        Ok(Door {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Door {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn stream_options() -> StreamOptions {
    StreamOptions {
        // The book: one line per rank.
        max_frame: 64 * 1024 * 1024,
        handshake_timeout: Duration::from_secs(10),
        // A few small control messages: sealed on every link.
        seal_loopback: true,
    }
}

/// One knock: handshake, the joiner's line, its id and the book back.
fn answer(
    stream: TcpStream,
    key: &JobKey,
    job_name: &str,
    membership: &Membership,
) -> Result<(), RendezvousError> {
    let blame = Blame(
        stream
            .peer_addr()
            .map_or_else(|_| "unknown peer".into(), |a| a.to_string()),
    );
    stream.set_nonblocking(false).map_err(|e| blame.io(e))?;
    let (mut s, hello) = AuthStream::server(stream, key, Hello::new(0, job_name), stream_options())
        .map_err(|e| blame.wire(e))?;
    if hello.rank != JOINER {
        return Err(blame.protocol(format!(
            "claims rank {} after the job formed; only joiners knock",
            hello.rank
        )));
    }
    let frame = s.recv().map_err(|e| blame.wire(e))?;
    let text = std::str::from_utf8(&frame.payload)
        .map_err(|_| blame.protocol("address line is not UTF-8".into()))?;
    let info = decode_line(text).map_err(|e| blame.protocol(e))?;
    let (rank, book) = membership.admit(info);
    let table: String = book.iter().map(encode_line).collect();
    s.send(FrameKind::Control, rank as u64, table.as_bytes())
        .map_err(|e| blame.wire(e))?;
    tracing::warn!(
        "swarmrun: join door: rank {rank} joins from {}",
        s.peer_addr()
    );
    Ok(())
}

/// What a joiner brings to the door.
#[derive(Debug, Clone)]
pub struct KnockOptions<'a> {
    pub key: &'a JobKey,
    pub job_name: &'a str,
    pub site: &'a str,
    /// The port this joiner's transport already listens on.
    pub listen_port: u16,
    /// How long to keep trying to reach the door.
    pub timeout: Duration,
}

/// A joiner's admission: its rank id, and everyone in the job (itself
/// included), by rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub rank: usize,
    pub peers: Vec<PeerInfo>,
}

/// Knocks on the door of the job at `endpoint` (its TCP rendezvous),
/// retrying while nobody answers, until `opts.timeout`.
pub fn knock(endpoint: &Endpoint, opts: &KnockOptions) -> Result<Admission, RendezvousError> {
    let Endpoint::Tcp { host, port } = endpoint else {
        return Err(RendezvousError::Protocol {
            peer: endpoint.to_string(),
            reason: "a running job is joined through its tcp:// rendezvous".into(),
        });
    };
    let door = format!("{host}:{port}");
    let deadline = Instant::now() + opts.timeout;
    let mut backoff = Duration::from_millis(10);
    let stream = loop {
        let addrs: Vec<SocketAddr> = door
            .to_socket_addrs()
            .map_err(|source| RendezvousError::Resolve {
                host: host.clone(),
                source,
            })?
            .collect();
        let mut last = String::from("no address");
        let found = addrs.iter().find_map(|a| {
            TcpStream::connect_timeout(a, Duration::from_secs(1))
                .map_err(|e| last = e.to_string())
                .ok()
        });
        if let Some(s) = found {
            break s;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(RendezvousError::Timeout {
                endpoint: format!("tcp://{door}"),
                waited: opts.timeout,
                detail: format!("the job's door never answered ({last})"),
            });
        }
        thread::sleep(backoff.min(deadline - now));
        backoff = (backoff * 2).min(Duration::from_millis(500));
    };
    let blame = Blame(format!("the door at {door}"));
    let local_ip: IpAddr = stream.local_addr().map_err(|e| blame.io(e))?.ip();
    let (mut s, _) = AuthStream::client(
        stream,
        opts.key,
        Hello::new(JOINER, opts.job_name),
        stream_options(),
    )
    .map_err(|e| blame.wire(e))?;
    let me = PeerInfo {
        rank: 0,
        addr: SocketAddr::new(local_ip, opts.listen_port),
        host: super::hostname(),
        site: opts.site.to_string(),
    };
    s.send(FrameKind::Control, 0, encode_line(&me).as_bytes())
        .map_err(|e| blame.wire(e))?;
    let frame = s.recv().map_err(|e| blame.wire(e))?;
    let rank = usize::try_from(frame.tag)
        .map_err(|_| blame.protocol(format!("gave rank {}", frame.tag)))?;
    let text = std::str::from_utf8(&frame.payload)
        .map_err(|_| blame.protocol("book is not UTF-8".into()))?;
    let peers = text
        .lines()
        .map(decode_line)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| blame.protocol(e))?;
    if !peers.iter().any(|p| p.rank == rank) {
        return Err(blame.protocol(format!("gave rank {rank} but left it out of the book")));
    }
    Ok(Admission { rank, peers })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(n: usize) -> World {
        World {
            rank: 0,
            size: n,
            local_rank: 0,
            peers: (0..n)
                .map(|rank| PeerInfo {
                    rank,
                    addr: SocketAddr::from(([127, 0, 0, 1], 5000 + rank as u16)),
                    host: "h".into(),
                    site: "a".into(),
                })
                .collect(),
        }
    }

    fn opts<'a>(key: &'a JobKey, port: u16) -> KnockOptions<'a> {
        KnockOptions {
            key,
            job_name: "job",
            site: "lab",
            listen_port: port,
            timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn joiners_get_new_ids_never_reused_and_the_book_without_the_departed() {
        let key = JobKey::generate().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let membership = Membership::new(&world(3));
        let _door = Door::open(listener, key.clone(), "job".into(), Arc::clone(&membership));
        let endpoint = Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let first = knock(&endpoint, &opts(&key, 7001)).unwrap();
        assert_eq!(first.rank, 3);
        let ranks: Vec<usize> = first.peers.iter().map(|p| p.rank).collect();
        assert_eq!(ranks, [0, 1, 2, 3]);
        assert_eq!(first.peers[3].site, "lab");
        assert_eq!(first.peers[3].addr.port(), 7001);

        // Rank 3 leaves: the next joiner gets 4, never 3, and is not told
        // to dial 3.
        membership.remove(3);
        let second = knock(&endpoint, &opts(&key, 7002)).unwrap();
        assert_eq!(second.rank, 4);
        let ranks: Vec<usize> = second.peers.iter().map(|p| p.rank).collect();
        assert_eq!(ranks, [0, 1, 2, 4]);
    }

    #[test]
    fn a_knock_with_the_wrong_key_is_refused_and_the_door_stays_open() {
        let key = JobKey::generate().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let membership = Membership::new(&world(2));
        let _door = Door::open(listener, key.clone(), "job".into(), Arc::clone(&membership));
        let endpoint = Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let stranger = JobKey::generate().unwrap();
        assert!(knock(&endpoint, &opts(&stranger, 7001)).is_err());
        assert_eq!(membership.live().len(), 2, "the stranger got no id");
        assert_eq!(knock(&endpoint, &opts(&key, 7002)).unwrap().rank, 2);
    }
}
