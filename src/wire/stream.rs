//! Authenticated, framed byte streams over TCP.
//!
//! # Handshake
//!
//! Both sides prove they hold the job key, without sending it, before either
//! sends or accepts a single frame:
//!
//! 1. client -> server: magic, version, 32-byte `nonce_c`, client [`Hello`]
//! 2. server -> client: magic, version, 32-byte `nonce_s`, server [`Hello`],
//!    `tag_s = MAC(key, "swarmrun server" || transcript)`
//! 3. client checks the job id and `tag_s`, then sends
//!    `tag_c = MAC(key, "swarmrun client" || transcript)`; the server checks it.
//!
//! The transcript is messages 1 and 2 up to (not including) `tag_s`; MAC is
//! keyed BLAKE3 and tags are compared in constant time. Fresh nonces on both
//! sides make every tag single-use, and the different labels stop a tag from
//! one role being reflected back as the other. A peer that says nothing is
//! dropped after the handshake timeout, so it cannot hold a connection slot.
//!
//! # Frames
//!
//! After the handshake each direction has its own session key,
//! `blake3::derive_key("swarmrun v2 c2s" / "swarmrun v2 s2c", key || nonce_c || nonce_s)`.
//! Each frame ([`super::frame`]) ends with the first 16 bytes of keyed BLAKE3
//! over (sequence number || header || payload), where the sequence number
//! counts frames in that direction from zero. A frame that was altered,
//! dropped, replayed or reordered therefore fails its MAC. Frames are not
//! encrypted: training data is not secret, but who may inject it is.
//!
//! After any error a stream is in an unknown state and must be dropped.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use constant_time_eq::constant_time_eq_n;

use super::frame::{Frame, FrameHeader, FrameKind, HEADER_LEN, MAC_LEN, MAGIC, VERSION};
use super::{deadline_after, JobKey, WireError};

/// Socket buffer size on each side: large enough that a header, a modest
/// payload and its MAC go out in one system call; payloads larger than this
/// bypass the buffer instead of being copied through it.
const BUF_CAPACITY: usize = 256 * 1024;

const NONCE_LEN: usize = 32;
const TAG_LEN: usize = 32;
const HELLO_LEN: usize = 14;
/// Magic and version, the part both sides must agree on before the rest can
/// even be parsed.
const PREAMBLE_LEN: usize = MAGIC.len() + 1;

const SERVER_LABEL: &[u8] = b"swarmrun server";
const CLIENT_LABEL: &[u8] = b"swarmrun client";
const C2S_CONTEXT: &str = "swarmrun v2 c2s";
const S2C_CONTEXT: &str = "swarmrun v2 s2c";

/// The identity each side announces in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub rank: u32,
    /// Which of the connections between two ranks this is: 0 for the main
    /// one, 1.. for the extra lanes large messages are striped over.
    pub lane: u16,
    /// [`job_id`] of the job name: lets two jobs share hosts and ports
    /// without their ranks ever talking to each other.
    pub job: [u8; 8],
}

impl Hello {
    pub fn new(rank: u32, job_name: &str) -> Hello {
        Hello {
            rank,
            lane: 0,
            job: job_id(job_name),
        }
    }

    /// This hello for lane `lane`.
    pub fn on_lane(self, lane: u16) -> Hello {
        Hello { lane, ..self }
    }

    fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[..4].copy_from_slice(&self.rank.to_le_bytes());
        out[4..6].copy_from_slice(&self.lane.to_le_bytes());
        out[6..].copy_from_slice(&self.job);
        out
    }

    fn decode(bytes: [u8; HELLO_LEN]) -> Hello {
        let [r0, r1, r2, r3, l0, l1, job @ ..] = bytes;
        Hello {
            rank: u32::from_le_bytes([r0, r1, r2, r3]),
            lane: u16::from_le_bytes([l0, l1]),
            job,
        }
    }
}

/// The first 8 bytes of BLAKE3 of the job name: short, fixed-size, and two
/// different names collide only by accident of 2^-64.
pub fn job_id(job_name: &str) -> [u8; 8] {
    let mut id = [0u8; 8];
    id.copy_from_slice(&blake3::hash(job_name.as_bytes()).as_bytes()[..8]);
    id
}

/// Limits of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    /// Largest payload accepted or sent in one frame.
    pub max_frame: usize,
    /// How long the whole handshake may take.
    pub handshake_timeout: Duration,
}

/// An authenticated connection to one peer.
#[derive(Debug)]
pub struct AuthStream {
    reader: FrameReader,
    writer: FrameWriter,
}

/// The receiving half of an [`AuthStream`].
#[derive(Debug)]
pub struct FrameReader {
    inner: BufReader<TcpStream>,
    key: [u8; 32],
    seq: u64,
    max_frame: usize,
    peer: SocketAddr,
}

/// The sending half of an [`AuthStream`].
#[derive(Debug)]
pub struct FrameWriter {
    inner: BufWriter<TcpStream>,
    key: [u8; 32],
    seq: u64,
    max_frame: usize,
    peer: SocketAddr,
}

impl AuthStream {
    /// Runs the client side of the handshake on a connected socket. Returns
    /// the stream and the server's [`Hello`].
    pub fn client(
        stream: TcpStream,
        key: &JobKey,
        hello: Hello,
        opts: StreamOptions,
    ) -> Result<(AuthStream, Hello), WireError> {
        let mut hs = Handshake::start(stream, opts)?;
        let nonce_c = nonce()?;
        let mut transcript = Vec::with_capacity(2 * (PREAMBLE_LEN + NONCE_LEN + HELLO_LEN));
        transcript.extend_from_slice(&MAGIC);
        transcript.push(VERSION);
        transcript.extend_from_slice(&nonce_c);
        transcript.extend_from_slice(&hello.encode());
        hs.write(&transcript, "sending the client hello")?;

        let preamble = hs.read::<PREAMBLE_LEN>("waiting for the server hello")?;
        hs.check_preamble(preamble)?;
        transcript.extend_from_slice(&preamble);
        let nonce_s = hs.read::<NONCE_LEN>("reading the server hello")?;
        transcript.extend_from_slice(&nonce_s);
        let peer_hello = Hello::decode(hs.read("reading the server hello")?);
        transcript.extend_from_slice(&peer_hello.encode());
        let tag_s = hs.read::<TAG_LEN>("reading the server's key proof")?;

        hs.check_job(&hello, &peer_hello)?;
        if !constant_time_eq_n(&tag_s, &handshake_tag(key, SERVER_LABEL, &transcript)) {
            return Err(WireError::AuthFailed {
                peer: hs.peer,
                reason: "the server could not prove it holds our job key (it has another key)",
            });
        }
        hs.write(
            &handshake_tag(key, CLIENT_LABEL, &transcript),
            "sending the client's key proof",
        )?;
        let stream = hs.finish(key, &nonce_c, &nonce_s, Side::Client)?;
        Ok((stream, peer_hello))
    }

    /// Runs the server side of the handshake on an accepted socket. Returns
    /// the stream and the client's [`Hello`].
    pub fn server(
        stream: TcpStream,
        key: &JobKey,
        hello: Hello,
        opts: StreamOptions,
    ) -> Result<(AuthStream, Hello), WireError> {
        let mut hs = Handshake::start(stream, opts)?;
        let preamble = hs.read::<PREAMBLE_LEN>("waiting for the client hello")?;
        if let Err(e) = hs.check_preamble(preamble) {
            if matches!(e, WireError::UnsupportedVersion { .. }) {
                // Tell a client of another version which one we speak, so
                // its error can say so; it is closing either way.
                let mut ours = MAGIC.to_vec();
                ours.push(VERSION);
                let _ = hs.write(&ours, "sending our version");
            }
            return Err(e);
        }
        let mut transcript = preamble.to_vec();
        let nonce_c = hs.read::<NONCE_LEN>("reading the client hello")?;
        transcript.extend_from_slice(&nonce_c);
        let peer_hello = Hello::decode(hs.read("reading the client hello")?);
        transcript.extend_from_slice(&peer_hello.encode());

        let nonce_s = nonce()?;
        let mut reply = MAGIC.to_vec();
        reply.push(VERSION);
        reply.extend_from_slice(&nonce_s);
        reply.extend_from_slice(&hello.encode());
        transcript.extend_from_slice(&reply);
        reply.extend_from_slice(&handshake_tag(key, SERVER_LABEL, &transcript));
        // The reply goes out even to a client of another job, so that its
        // error names the mismatch too instead of a bare hang-up.
        hs.write(&reply, "sending the server hello")?;
        hs.check_job(&hello, &peer_hello)?;

        let tag_c = hs
            .read::<TAG_LEN>("waiting for the client's key proof")
            .map_err(|e| match e {
                WireError::Closed { peer, .. } => WireError::AuthFailed {
                    peer,
                    reason: "the client hung up instead of proving it holds our job key \
                             (it has another key)",
                },
                other => other,
            })?;
        if !constant_time_eq_n(&tag_c, &handshake_tag(key, CLIENT_LABEL, &transcript)) {
            return Err(WireError::AuthFailed {
                peer: hs.peer,
                reason: "the client could not prove it holds our job key (it has another key)",
            });
        }
        let stream = hs.finish(key, &nonce_c, &nonce_s, Side::Server)?;
        Ok((stream, peer_hello))
    }

    pub fn send(&mut self, kind: FrameKind, tag: u64, payload: &[u8]) -> Result<(), WireError> {
        self.writer.send(kind, tag, payload)
    }

    pub fn recv(&mut self) -> Result<Frame, WireError> {
        self.reader.recv()
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.reader.peer
    }

    /// Another handle on the socket, so a supervisor can shut the connection
    /// down (`TcpStream::shutdown`) or set timeouts while a reader or writer
    /// is blocked inside it.
    pub fn try_clone_socket(&self) -> Result<TcpStream, WireError> {
        self.reader
            .inner
            .get_ref()
            .try_clone()
            .map_err(|e| WireError::from_io(self.reader.peer, "cloning the socket", e))
    }

    /// Splits the stream so one thread can read while others write.
    pub fn into_split(self) -> (FrameReader, FrameWriter) {
        (self.reader, self.writer)
    }
}

impl FrameReader {
    /// Reads and verifies the next frame, blocking until it arrives.
    pub fn recv(&mut self) -> Result<Frame, WireError> {
        let frame = self.session().read(&mut self.inner)?;
        self.seq += 1;
        Ok(frame)
    }

    fn session(&self) -> Session {
        Session {
            key: self.key,
            seq: self.seq,
            max_frame: self.max_frame,
            peer: self.peer,
        }
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }
}

impl FrameWriter {
    /// Sends one frame and flushes it. A payload over the frame limit is
    /// refused here, since the peer would drop the connection for it.
    pub fn send(&mut self, kind: FrameKind, tag: u64, payload: &[u8]) -> Result<(), WireError> {
        let session = Session {
            key: self.key,
            seq: self.seq,
            max_frame: self.max_frame,
            peer: self.peer,
        };
        session.write(&mut self.inner, kind, tag, payload)?;
        self.seq += 1;
        self.inner
            .flush()
            .map_err(|e| WireError::from_io(self.peer, "sending a frame", e))
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }
}

/// One direction of a stream at one frame: its session key, the frame's
/// sequence number, the frame limit and the peer (for errors). Reading
/// and writing frames needs nothing else, so it works on any byte stream:
/// the socket, or a buffer in a test or a fuzz target.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    pub key: [u8; 32],
    pub seq: u64,
    pub max_frame: usize,
    pub peer: SocketAddr,
}

impl Session {
    /// Reads frame number `seq` from `r` and verifies its MAC.
    pub fn read(&self, r: &mut impl Read) -> Result<Frame, WireError> {
        let peer = self.peer;
        let mut header = [0u8; HEADER_LEN];
        r.read_exact(&mut header)
            .map_err(|e| WireError::from_io(peer, "reading a frame header", e))?;
        let parsed = FrameHeader::decode(header, self.max_frame, peer)?;
        // Cannot truncate: decode bounded `len` by `max_frame`, a usize.
        let mut payload = vec![0u8; parsed.len as usize];
        let mut mac = [0u8; MAC_LEN];
        r.read_exact(&mut payload)
            .and_then(|()| r.read_exact(&mut mac))
            .map_err(|e| WireError::from_io(peer, "reading a frame", e))?;
        if !constant_time_eq_n(&mac, &frame_mac(&self.key, self.seq, &header, &payload)) {
            return Err(WireError::BadMac { peer });
        }
        Ok(Frame {
            kind: parsed.kind,
            tag: parsed.tag,
            payload,
        })
    }

    /// Writes frame number `seq` to `w` (without flushing).
    pub fn write(
        &self,
        w: &mut impl Write,
        kind: FrameKind,
        tag: u64,
        payload: &[u8],
    ) -> Result<(), WireError> {
        let peer = self.peer;
        let too_large = || WireError::FrameTooLarge {
            peer,
            len: payload.len() as u64,
            max: self.max_frame,
        };
        if payload.len() > self.max_frame {
            return Err(too_large());
        }
        let len = u32::try_from(payload.len()).map_err(|_| too_large())?;
        let header = FrameHeader { kind, tag, len }.encode();
        let mac = frame_mac(&self.key, self.seq, &header, payload);
        w.write_all(&header)
            .and_then(|()| w.write_all(payload))
            .and_then(|()| w.write_all(&mac))
            .map_err(|e| WireError::from_io(peer, "sending a frame", e))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// A connection in the middle of its handshake: every read and write is
/// bounded by one overall deadline, so a peer trickling a byte at a time
/// cannot stretch it.
struct Handshake {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    peer: SocketAddr,
    deadline: Instant,
    opts: StreamOptions,
}

impl Handshake {
    fn start(stream: TcpStream, opts: StreamOptions) -> Result<Handshake, WireError> {
        let deadline = deadline_after(opts.handshake_timeout);
        let peer = stream.peer_addr().map_err(WireError::PeerAddr)?;
        let setup = |e| WireError::from_io(peer, "setting up the socket", e);
        // Small frames (barriers, receipts) must not wait for Nagle's timer.
        stream.set_nodelay(true).map_err(setup)?;
        let write_half = stream.try_clone().map_err(setup)?;
        Ok(Handshake {
            reader: BufReader::with_capacity(BUF_CAPACITY, stream),
            writer: BufWriter::with_capacity(BUF_CAPACITY, write_half),
            peer,
            deadline,
            opts,
        })
    }

    fn remaining(&self, during: &'static str) -> Result<Duration, WireError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(WireError::Timeout {
                peer: self.peer,
                during,
            });
        }
        Ok(left)
    }

    fn read<const N: usize>(&mut self, during: &'static str) -> Result<[u8; N], WireError> {
        let mut buf = [0u8; N];
        let mut filled = 0;
        while let Some(rest) = buf.get_mut(filled..).filter(|rest| !rest.is_empty()) {
            let left = self.remaining(during)?;
            let io = |e| WireError::from_io(self.peer, during, e);
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(io)?;
            match self.reader.read(rest) {
                Ok(0) => {
                    return Err(WireError::Closed {
                        peer: self.peer,
                        during,
                    })
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        }
        Ok(buf)
    }

    fn write(&mut self, bytes: &[u8], during: &'static str) -> Result<(), WireError> {
        let left = self.remaining(during)?;
        let io = |e| WireError::from_io(self.peer, during, e);
        self.writer
            .get_ref()
            .set_write_timeout(Some(left))
            .map_err(io)?;
        self.writer
            .write_all(bytes)
            .and_then(|()| self.writer.flush())
            .map_err(io)
    }

    fn check_preamble(&self, preamble: [u8; PREAMBLE_LEN]) -> Result<(), WireError> {
        let [m0, m1, m2, m3, version] = preamble;
        let magic = [m0, m1, m2, m3];
        if magic != MAGIC {
            return Err(WireError::BadMagic {
                peer: self.peer,
                got: magic,
            });
        }
        if version != VERSION {
            return Err(WireError::UnsupportedVersion {
                peer: self.peer,
                got: version,
                ours: VERSION,
            });
        }
        Ok(())
    }

    fn check_job(&self, ours: &Hello, theirs: &Hello) -> Result<(), WireError> {
        if ours.job != theirs.job {
            return Err(WireError::JobMismatch {
                peer: self.peer,
                ours: ours.job,
                theirs: theirs.job,
            });
        }
        Ok(())
    }

    /// Derives the session keys and lifts the handshake timeouts: from now
    /// on, waiting for the next frame is the caller's business.
    fn finish(
        self,
        key: &JobKey,
        nonce_c: &[u8; NONCE_LEN],
        nonce_s: &[u8; NONCE_LEN],
        side: Side,
    ) -> Result<AuthStream, WireError> {
        let peer = self.peer;
        let socket = self.reader.get_ref();
        socket
            .set_read_timeout(None)
            .and_then(|()| socket.set_write_timeout(None))
            .map_err(|e| WireError::from_io(peer, "setting up the socket", e))?;
        let material = [key.as_bytes().as_slice(), nonce_c, nonce_s].concat();
        let c2s = blake3::derive_key(C2S_CONTEXT, &material);
        let s2c = blake3::derive_key(S2C_CONTEXT, &material);
        let (recv_key, send_key) = match side {
            Side::Client => (s2c, c2s),
            Side::Server => (c2s, s2c),
        };
        Ok(AuthStream {
            reader: FrameReader {
                inner: self.reader,
                key: recv_key,
                seq: 0,
                max_frame: self.opts.max_frame,
                peer,
            },
            writer: FrameWriter {
                inner: self.writer,
                key: send_key,
                seq: 0,
                max_frame: self.opts.max_frame,
                peer,
            },
        })
    }
}

fn nonce() -> Result<[u8; NONCE_LEN], WireError> {
    let mut bytes = [0u8; NONCE_LEN];
    getrandom::fill(&mut bytes).map_err(WireError::Random)?;
    Ok(bytes)
}

fn handshake_tag(key: &JobKey, label: &[u8], transcript: &[u8]) -> [u8; TAG_LEN] {
    let mut hasher = blake3::Hasher::new_keyed(key.as_bytes());
    hasher.update(label);
    hasher.update(transcript);
    *hasher.finalize().as_bytes()
}

fn frame_mac(key: &[u8; 32], seq: u64, header: &[u8; HEADER_LEN], payload: &[u8]) -> [u8; MAC_LEN] {
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(&seq.to_le_bytes());
    hasher.update(header);
    hasher.update(payload);
    // The first bytes of BLAKE3's extendable output are its ordinary hash,
    // so this is the hash truncated to 16 bytes.
    let mut mac = [0u8; MAC_LEN];
    hasher.finalize_xof().fill(&mut mac);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    /// Handshakes that must succeed get all the time a busy host needs.
    const OPTS: StreamOptions = StreamOptions {
        max_frame: 1024,
        handshake_timeout: Duration::from_secs(30),
    };

    type Outcome = Result<(AuthStream, Hello), WireError>;

    /// Runs a server handshake in a thread and a client handshake here.
    fn handshake(server: (&JobKey, Hello), client: (&JobKey, Hello)) -> (Outcome, Outcome) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (server_key, server_hello) = (server.0.clone(), server.1);
        let accept = thread::spawn(move || {
            let (socket, _) = listener.accept().unwrap();
            AuthStream::server(socket, &server_key, server_hello, OPTS)
        });
        let client =
            AuthStream::client(TcpStream::connect(addr).unwrap(), client.0, client.1, OPTS);
        (accept.join().unwrap(), client)
    }

    #[test]
    fn matching_keys_authenticate_and_carry_frames_both_ways() {
        let key = JobKey::generate().unwrap();
        let (server, client) =
            handshake((&key, Hello::new(0, "job")), (&key, Hello::new(3, "job")));
        let (mut server, seen_by_server) = server.unwrap();
        let (client, seen_by_client) = client.unwrap();
        assert_eq!(seen_by_server, Hello::new(3, "job"));
        assert_eq!(seen_by_client, Hello::new(0, "job"));

        let (mut client_reader, mut client_writer) = client.into_split();
        client_writer.send(FrameKind::Data, 7, b"up").unwrap();
        client_writer.send(FrameKind::Control, 8, &[]).unwrap();
        server.send(FrameKind::Data, 9, b"down").unwrap();
        assert_eq!(
            server.recv().unwrap(),
            Frame {
                kind: FrameKind::Data,
                tag: 7,
                payload: b"up".to_vec()
            }
        );
        assert_eq!(server.recv().unwrap().kind, FrameKind::Control);
        assert_eq!(client_reader.recv().unwrap().payload, b"down");
    }

    #[test]
    fn wrong_key_fails_on_both_sides() {
        let (ours, theirs) = (JobKey::generate().unwrap(), JobKey::generate().unwrap());
        let (server, client) = handshake(
            (&ours, Hello::new(0, "job")),
            (&theirs, Hello::new(1, "job")),
        );
        assert!(
            matches!(client, Err(WireError::AuthFailed { .. })),
            "{client:?}"
        );
        assert!(
            matches!(server, Err(WireError::AuthFailed { .. })),
            "{server:?}"
        );
    }

    #[test]
    fn other_job_is_rejected_on_both_sides() {
        let key = JobKey::generate().unwrap();
        let (server, client) = handshake((&key, Hello::new(0, "a")), (&key, Hello::new(1, "b")));
        assert!(
            matches!(client, Err(WireError::JobMismatch { .. })),
            "{client:?}"
        );
        assert!(
            matches!(server, Err(WireError::JobMismatch { .. })),
            "{server:?}"
        );
    }

    #[test]
    fn silent_client_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _silent = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (socket, _) = listener.accept().unwrap();
        let opts = StreamOptions {
            handshake_timeout: Duration::from_millis(100),
            ..OPTS
        };
        let key = JobKey::generate().unwrap();
        let started = Instant::now();
        let result = AuthStream::server(socket, &key, Hello::new(0, "job"), opts);
        assert!(
            matches!(result, Err(WireError::Timeout { .. })),
            "{result:?}"
        );
        // Its own timeout, not the 30 s of handshakes that must succeed.
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(100) && waited < OPTS.handshake_timeout / 2);
    }

    #[test]
    fn other_protocol_version_is_named_to_the_client() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (socket, _) = listener.accept().unwrap();
        // A peer of the version before this one.
        client.write_all(b"SWRM\x01").unwrap();
        let key = JobKey::generate().unwrap();
        let result = AuthStream::server(socket, &key, Hello::new(0, "job"), OPTS);
        assert!(
            matches!(result, Err(WireError::UnsupportedVersion { got: 1, .. })),
            "{result:?}"
        );
        let mut reply = [0u8; PREAMBLE_LEN];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(reply, [b'S', b'W', b'R', b'M', VERSION]);
    }

    #[test]
    fn tampered_frame_fails_its_mac() {
        let key = JobKey::generate().unwrap();
        let (server, client) =
            handshake((&key, Hello::new(0, "job")), (&key, Hello::new(1, "job")));
        let (mut server, _) = server.unwrap();
        let (client, _) = client.unwrap();
        let mut raw = client.try_clone_socket().unwrap();
        let header = FrameHeader {
            kind: FrameKind::Data,
            tag: 1,
            len: 3,
        }
        .encode();
        raw.write_all(&header).unwrap();
        raw.write_all(b"abc").unwrap();
        raw.write_all(&[0u8; MAC_LEN]).unwrap();
        let result = server.recv();
        assert!(
            matches!(result, Err(WireError::BadMac { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn oversized_send_is_refused_locally() {
        let key = JobKey::generate().unwrap();
        let (_server, client) =
            handshake((&key, Hello::new(0, "job")), (&key, Hello::new(1, "job")));
        let (mut client, _) = client.unwrap();
        let result = client.send(FrameKind::Data, 0, &[0u8; 1025]);
        assert!(matches!(
            result,
            Err(WireError::FrameTooLarge {
                len: 1025,
                max: 1024,
                ..
            })
        ));
    }
}
