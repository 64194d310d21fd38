//! Rendezvous: every rank publishes where its transport listens and learns
//! where all the others do.
//!
//! Backends, as users of torchrun and Slurm expect them:
//! - `tcp://host:port`: rank 0 listens there; the others connect with
//!   backoff until the deadline. The exchange runs over an authenticated
//!   [`AuthStream`], so a process without the job key learns nothing and
//!   cannot inject an address.
//! - `file:///dir`: each rank writes `dir/<run id>/rank-<r>` (temporary file,
//!   fsync, rename) and polls until all are there: the shared filesystem of a
//!   cluster is the rendezvous. Files are not authenticated, but the transport
//!   handshake that follows is, so a forged address only costs a refused
//!   connection.
//! - `slurm`: the TCP protocol on the first host of the step's nodelist, at a
//!   port derived from the job and step ids, so no two steps collide and no
//!   one has to pick a port.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::{PeerInfo, World};
use crate::config::{hostlist, Rendezvous};
use crate::wire::{AuthStream, FrameKind, Hello, JobKey, StreamOptions, WireError};

/// A resolved rendezvous backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    File { dir: PathBuf },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Endpoint::File { dir } => write!(f, "file://{}", dir.display()),
        }
    }
}

/// Slurm steps rendezvous on ports in `SLURM_PORT_BASE .. SLURM_PORT_BASE + SLURM_PORT_SPAN`,
/// above the usual ephemeral range's low end and below common service ports.
const SLURM_PORT_BASE: u16 = 21000;
const SLURM_PORT_SPAN: u64 = 8000;

impl Endpoint {
    /// Turns the job file's choice into a concrete endpoint; `slurm` needs
    /// the step's nodelist and job id.
    pub fn resolve(
        spec: &Rendezvous,
        slurm_nodelist: Option<&str>,
        slurm_job: Option<(u64, u64)>,
    ) -> Result<Endpoint, RendezvousError> {
        match spec {
            Rendezvous::Tcp { host, port } => Ok(Endpoint::Tcp {
                host: host.clone(),
                port: *port,
            }),
            Rendezvous::File { dir } => Ok(Endpoint::File { dir: dir.clone() }),
            Rendezvous::Slurm => {
                let (Some(list), Some((job, step))) = (slurm_nodelist, slurm_job) else {
                    return Err(RendezvousError::NotUnderSlurm);
                };
                let hosts = hostlist::expand(list)
                    .map_err(|e| RendezvousError::BadNodelist(list.to_string(), e.to_string()))?;
                let host = hosts.into_iter().next().ok_or_else(|| {
                    RendezvousError::BadNodelist(list.to_string(), "empty".into())
                })?;
                Ok(Endpoint::Tcp {
                    host,
                    port: slurm_port(job, step),
                })
            }
        }
    }
}

/// The port a Slurm step rendezvouses on: a pure function of job and step,
/// so every rank of the step computes the same one.
pub fn slurm_port(job: u64, step: u64) -> u16 {
    let mixed = job.wrapping_mul(131).wrapping_add(step);
    SLURM_PORT_BASE + (mixed % SLURM_PORT_SPAN) as u16
}

#[derive(Debug, Error)]
pub enum RendezvousError {
    #[error("rendezvous `slurm` needs SLURM_STEP_NODELIST and SLURM_JOB_ID (run under srun)")]
    NotUnderSlurm,
    #[error("bad Slurm nodelist {0:?}: {1}")]
    BadNodelist(String, String),
    #[error("rendezvous port 0 means `pick one`, which only `swarmrun launch` can do; set a port")]
    PortZero,
    #[error(
        "cannot listen for rendezvous on {addr}: {source} (another job on this port? pass --rdzv)"
    )]
    Bind { addr: String, source: io::Error },
    #[error("cannot resolve rendezvous host {host:?}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("rendezvous at {endpoint} timed out after {waited:?}: {detail}")]
    Timeout {
        endpoint: String,
        waited: Duration,
        detail: String,
    },
    #[error("rendezvous with {peer}: {source}")]
    Wire { peer: String, source: WireError },
    #[error("rendezvous with {peer}: {reason}")]
    Protocol { peer: String, reason: String },
    #[error("rendezvous file {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("rendezvous with {peer}: {source}")]
    Io { peer: String, source: io::Error },
}

/// Everything a rank brings to the rendezvous.
#[derive(Debug, Clone)]
pub struct RendezvousOptions<'a> {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    pub site: &'a str,
    /// The port this rank's transport already listens on.
    pub listen_port: u16,
    pub key: &'a JobKey,
    pub job_name: &'a str,
    /// Keeps `file://` rendezvous of different runs apart.
    pub run_id: &'a str,
    pub timeout: Duration,
}

/// A formed world, and on rank 0 of a TCP rendezvous the listener it
/// served on: the door ([`super::Door`]) of a job that admits joiners.
#[derive(Debug)]
pub struct Formed {
    pub world: World,
    pub listener: Option<TcpListener>,
}

/// Blocks until every rank has published its address, or the deadline.
pub fn rendezvous(
    endpoint: &Endpoint,
    opts: &RendezvousOptions,
) -> Result<Formed, RendezvousError> {
    let deadline = Instant::now() + opts.timeout;
    let (peers, listener) = match endpoint {
        Endpoint::Tcp { host, port } => {
            if *port == 0 {
                return Err(RendezvousError::PortZero);
            }
            if opts.rank == 0 {
                let (peers, listener) = tcp_serve(host, *port, opts, deadline)?;
                (peers, Some(listener))
            } else {
                (tcp_join(host, *port, opts, deadline)?, None)
            }
        }
        Endpoint::File { dir } => (file_exchange(dir, opts, deadline)?, None),
    };
    Ok(Formed {
        world: World {
            rank: opts.rank,
            size: opts.size,
            local_rank: opts.local_rank,
            peers,
        },
        listener,
    })
}

fn stream_options(opts: &RendezvousOptions) -> StreamOptions {
    StreamOptions {
        // One line per rank; 64 KiB covers a world of a few hundred ranks with
        // long host names, and a million-rank table still fits in 64 MiB.
        max_frame: 64 * 1024 * 1024,
        handshake_timeout: Duration::from_secs(10).min(opts.timeout),
        // A few small control messages: sealed on every link.
        seal_loopback: true,
    }
}

/// Rank 0: accept the other ranks, collect their lines, answer with the
/// table; returns it and the listener.
fn tcp_serve(
    host: &str,
    port: u16,
    opts: &RendezvousOptions,
    deadline: Instant,
) -> Result<(Vec<PeerInfo>, TcpListener), RendezvousError> {
    let bind_addr = format!("{host}:{port}");
    let listener = TcpListener::bind(&bind_addr).map_err(|source| RendezvousError::Bind {
        addr: bind_addr.clone(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| RendezvousError::Bind {
            addr: bind_addr.clone(),
            source,
        })?;
    let mut slots: Vec<Option<PeerInfo>> = vec![None; opts.size];
    let mut streams: Vec<AuthStream> = Vec::with_capacity(opts.size.saturating_sub(1));
    // Where the others reach rank 0 is where they connected to.
    let mut my_ip: Option<IpAddr> = None;
    while streams.len() + 1 < opts.size {
        let (stream, peer_addr) = match listener.accept() {
            Ok(pair) => pair,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (1..opts.size)
                        .filter(|r| slots[*r].is_none())
                        .map(|r| r.to_string())
                        .collect();
                    return Err(RendezvousError::Timeout {
                        endpoint: format!("tcp://{bind_addr}"),
                        waited: opts.timeout,
                        detail: format!("ranks never arrived: {}", abbreviate(&missing)),
                    });
                }
                thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(source) => {
                return Err(RendezvousError::Bind {
                    addr: bind_addr,
                    source,
                })
            }
        };
        // A stranger (wrong key, garbage, another job) is refused and the
        // rendezvous goes on: it must not be able to stop the job.
        match admit(stream, opts, &slots) {
            Ok((s, info, local_ip)) => {
                my_ip.get_or_insert(local_ip);
                let r = info.rank;
                slots[r] = Some(info);
                streams.push(s);
            }
            Err(e) => tracing::warn!("swarmrun: rendezvous refused {peer_addr}: {e}"),
        }
    }
    let ip = my_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    slots[0] = Some(PeerInfo {
        rank: 0,
        addr: SocketAddr::new(ip, opts.listen_port),
        host: super::hostname(),
        site: opts.site.to_string(),
    });
    let peers: Vec<PeerInfo> = slots.into_iter().flatten().collect();
    let table = encode_table(&peers);
    for mut s in streams {
        let peer = s.peer_addr().to_string();
        s.send(FrameKind::Control, 0, table.as_bytes())
            .map_err(|source| RendezvousError::Wire { peer, source })?;
    }
    Ok((peers, listener))
}

/// Handshake with one connecting rank and read its line.
fn admit(
    stream: TcpStream,
    opts: &RendezvousOptions,
    slots: &[Option<PeerInfo>],
) -> Result<(AuthStream, PeerInfo, IpAddr), RendezvousError> {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown peer".into());
    let blame = Blame(peer);
    let (wire, io) = (|e| blame.wire(e), |e| blame.io(e));
    stream.set_nonblocking(false).map_err(io)?;
    let local_ip = stream.local_addr().map_err(io)?.ip();
    let hello = Hello::new(0, opts.job_name);
    let (mut s, their_hello) =
        AuthStream::server(stream, opts.key, hello, stream_options(opts)).map_err(wire)?;
    let frame = s.recv().map_err(wire)?;
    let protocol = |reason: String| blame.protocol(reason);
    let text = std::str::from_utf8(&frame.payload)
        .map_err(|_| protocol("address line is not UTF-8".into()))?;
    let info = decode_line(text).map_err(protocol)?;
    if info.rank as u32 != their_hello.rank {
        return Err(protocol(format!(
            "handshake says rank {} but line says rank {}",
            their_hello.rank, info.rank
        )));
    }
    if info.rank == 0 || info.rank >= opts.size {
        return Err(protocol(format!(
            "rank {} outside 1..{}",
            info.rank, opts.size
        )));
    }
    if slots[info.rank].is_some() {
        return Err(protocol(format!("rank {} arrived twice", info.rank)));
    }
    Ok((s, info, local_ip))
}

/// Ranks other than 0: connect with backoff, send our line, read the table.
fn tcp_join(
    host: &str,
    port: u16,
    opts: &RendezvousOptions,
    deadline: Instant,
) -> Result<Vec<PeerInfo>, RendezvousError> {
    let endpoint = format!("{host}:{port}");
    let mut backoff = Duration::from_millis(10);
    let mut last_error = String::from("never tried");
    let stream = loop {
        let addrs: Vec<SocketAddr> = endpoint
            .to_socket_addrs()
            .map_err(|source| RendezvousError::Resolve {
                host: host.to_string(),
                source,
            })?
            .collect();
        let attempt = addrs.iter().find_map(|a| {
            TcpStream::connect_timeout(a, Duration::from_secs(1))
                .map_err(|e| last_error = e.to_string())
                .ok()
        });
        if let Some(s) = attempt {
            break s;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(RendezvousError::Timeout {
                endpoint: format!("tcp://{endpoint}"),
                waited: opts.timeout,
                detail: format!("rank 0 never answered ({last_error})"),
            });
        }
        thread::sleep(backoff.min(deadline - now));
        backoff = (backoff * 2).min(Duration::from_millis(500));
    };
    let blame = Blame(format!("rank 0 at {endpoint}"));
    let (wire, io) = (|e| blame.wire(e), |e| blame.io(e));
    let local_ip = stream.local_addr().map_err(io)?.ip();
    let hello = Hello::new(opts.rank as u32, opts.job_name);
    let (mut s, _) =
        AuthStream::client(stream, opts.key, hello, stream_options(opts)).map_err(wire)?;
    let me = PeerInfo {
        rank: opts.rank,
        addr: SocketAddr::new(local_ip, opts.listen_port),
        host: super::hostname(),
        site: opts.site.to_string(),
    };
    s.send(FrameKind::Control, 0, encode_line(&me).as_bytes())
        .map_err(wire)?;
    // The table comes once every rank has arrived, which may take until the
    // deadline, longer than the handshake's read timeout.
    let left = deadline.saturating_duration_since(Instant::now());
    s.try_clone_socket()
        .map_err(wire)?
        .set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .map_err(io)?;
    let frame = s.recv().map_err(wire)?;
    let protocol = |reason: String| blame.protocol(reason);
    let text =
        std::str::from_utf8(&frame.payload).map_err(|_| protocol("table is not UTF-8".into()))?;
    decode_table(text, opts.size).map_err(protocol)
}

/// Errors that name one peer.
pub(super) struct Blame(pub(super) String);

impl Blame {
    pub(super) fn wire(&self, source: WireError) -> RendezvousError {
        RendezvousError::Wire {
            peer: self.0.clone(),
            source,
        }
    }

    pub(super) fn io(&self, source: io::Error) -> RendezvousError {
        RendezvousError::Io {
            peer: self.0.clone(),
            source,
        }
    }

    pub(super) fn protocol(&self, reason: String) -> RendezvousError {
        RendezvousError::Protocol {
            peer: self.0.clone(),
            reason,
        }
    }
}

/// `file://`: write our line, then wait for everybody's.
fn file_exchange(
    dir: &Path,
    opts: &RendezvousOptions,
    deadline: Instant,
) -> Result<Vec<PeerInfo>, RendezvousError> {
    let run_dir = dir.join(sanitize(opts.run_id));
    let file_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RendezvousError::File { path, source }
    };
    std::fs::create_dir_all(&run_dir).map_err(file_err(&run_dir))?;
    let me = PeerInfo {
        rank: opts.rank,
        addr: SocketAddr::new(advertised_ip(), opts.listen_port),
        host: super::hostname(),
        site: opts.site.to_string(),
    };
    let mine = run_dir.join(format!("rank-{}", opts.rank));
    crate::fsutil::write_atomic(&mine, encode_line(&me).as_bytes()).map_err(file_err(&mine))?;

    let mut peers: Vec<Option<PeerInfo>> = vec![None; opts.size];
    loop {
        for (r, slot) in peers.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let path = run_dir.join(format!("rank-{r}"));
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let blame = Blame(path.display().to_string());
                    let info = decode_line(&text).map_err(|e| blame.protocol(e))?;
                    if info.rank != r {
                        return Err(blame.protocol(format!("file names rank {}", info.rank)));
                    }
                    *slot = Some(info);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(RendezvousError::File { path, source }),
            }
        }
        if peers.iter().all(Option::is_some) {
            return Ok(peers.into_iter().flatten().collect());
        }
        if Instant::now() >= deadline {
            let missing: Vec<String> = peers
                .iter()
                .enumerate()
                .filter(|(_, p)| p.is_none())
                .map(|(r, _)| r.to_string())
                .collect();
            return Err(RendezvousError::Timeout {
                endpoint: format!("file://{}", run_dir.display()),
                waited: opts.timeout,
                detail: format!("no file from ranks {}", abbreviate(&missing)),
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The address other hosts reach us at when no connection tells us:
/// SWARMRUN_ADVERTISE_ADDR, else the first non-loopback address our host
/// name resolves to, else loopback (one host).
fn advertised_ip() -> IpAddr {
    if let Some(ip) = std::env::var("SWARMRUN_ADVERTISE_ADDR")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return ip;
    }
    (super::hostname().as_str(), 0)
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.find(|a| !a.ip().is_loopback()))
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn abbreviate(items: &[String]) -> String {
    const SHOWN: usize = 8;
    if items.len() <= SHOWN {
        items.join(", ")
    } else {
        format!(
            "{} and {} more",
            items[..SHOWN].join(", "),
            items.len() - SHOWN
        )
    }
}

/// One rank as one line: `rank<TAB>addr<TAB>host<TAB>site`.
pub(super) fn encode_line(p: &PeerInfo) -> String {
    format!("{}\t{}\t{}\t{}\n", p.rank, p.addr, p.host, p.site)
}

pub(super) fn decode_line(line: &str) -> Result<PeerInfo, String> {
    let line = line.trim_end_matches('\n');
    let fields: Vec<&str> = line.split('\t').collect();
    let [rank, addr, host, site] = fields[..] else {
        return Err(format!("expected 4 tab-separated fields, got {line:?}"));
    };
    Ok(PeerInfo {
        rank: rank.parse().map_err(|_| format!("bad rank {rank:?}"))?,
        addr: addr.parse().map_err(|_| format!("bad address {addr:?}"))?,
        host: host.to_string(),
        site: site.to_string(),
    })
}

fn encode_table(peers: &[PeerInfo]) -> String {
    peers.iter().map(encode_line).collect()
}

fn decode_table(text: &str, size: usize) -> Result<Vec<PeerInfo>, String> {
    let peers = text
        .lines()
        .map(decode_line)
        .collect::<Result<Vec<_>, _>>()?;
    if peers.len() != size || peers.iter().enumerate().any(|(i, p)| p.rank != i) {
        return Err(format!(
            "table has {} ranks, not the {size} ranks 0..{size} in order",
            peers.len()
        ));
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_port_is_stable_and_in_range() {
        let p = slurm_port(4242, 0);
        assert_eq!(p, slurm_port(4242, 0));
        assert_ne!(p, slurm_port(4242, 1));
        assert!((SLURM_PORT_BASE..SLURM_PORT_BASE + SLURM_PORT_SPAN as u16).contains(&p));
    }

    #[test]
    fn slurm_endpoint_is_the_first_host_of_the_nodelist() {
        let e =
            Endpoint::resolve(&Rendezvous::Slurm, Some("node[07-09],gpu1"), Some((77, 2))).unwrap();
        assert_eq!(
            e,
            Endpoint::Tcp {
                host: "node07".into(),
                port: slurm_port(77, 2)
            }
        );
        assert!(matches!(
            Endpoint::resolve(&Rendezvous::Slurm, None, None),
            Err(RendezvousError::NotUnderSlurm)
        ));
    }

    #[test]
    fn table_lines_round_trip() {
        let peers = vec![
            PeerInfo {
                rank: 0,
                addr: "127.0.0.1:4000".parse().unwrap(),
                host: "a".into(),
                site: "s".into(),
            },
            PeerInfo {
                rank: 1,
                addr: "[::1]:4001".parse().unwrap(),
                host: "b".into(),
                site: "t".into(),
            },
        ];
        assert_eq!(decode_table(&encode_table(&peers), 2).unwrap(), peers);
        assert!(decode_table(&encode_table(&peers), 3).is_err());
        assert!(decode_line("0\tnot-an-addr\th\ts").is_err());
    }
}
