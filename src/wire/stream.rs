//! Encrypted, authenticated, framed byte streams over TCP.
//!
//! # Handshake
//!
//! Noise `NNpsk0_25519_AESGCM_SHA256` (the `snow` crate), with the job key
//! as the pre-shared key and the preamble as prologue. Each Noise message
//! travels after a u16 LE length.
//!
//! 1. client -> server: magic, version, Noise message 1 (`psk, e`) carrying
//!    the client's [`Hello`].
//! 2. server -> client: magic, version, Noise message 2 (`e, ee`) carrying
//!    the server's [`Hello`]; or, when message 1 did not decrypt, an empty
//!    message, so the client can say "another key" instead of "hung up".
//! 3. client -> server: frame 0 of the client's direction, an empty
//!    `Control` frame: the key confirmation. Its tag says whether the
//!    client will seal the link's frames (0) or not (1, a loopback link,
//!    below); a server that decided otherwise refuses the link.
//!
//! Why this shape: message 1 decrypts only under the job key, so the
//! server knows the client holds it; but anyone who recorded message 1 can
//! replay it, so the server links a connection in only after frame 0,
//! which needs the client's fresh ephemeral key. Message 2 decrypts only
//! for a server holding the job key. The frame keys come from a fresh
//! Diffie-Hellman per connection: frames of one connection are garbage on
//! another, and a recorded run stays unreadable even to someone who later
//! learns the job key. A peer that says nothing is dropped after the
//! handshake timeout, so it cannot hold a connection slot.
//!
//! # Frames
//!
//! Each direction has its own key from Noise's split. A frame is the
//! header in clear ([`super::frame`]: kind, tag and length, so a hostile
//! length is refused before anything is allocated), the payload encrypted
//! with AES-256-GCM (ring), and the 16-byte GCM tag. The nonce is the
//! frame's sequence number in its direction, encoded as Noise's AESGCM
//! cipher encodes its counter, and the header is the associated data:
//! exactly Noise's `EncryptWithAd(header, payload)`, done outside snow only
//! because Noise caps a message at 64 KiB. A frame altered, dropped,
//! replayed, reordered or taken from another connection fails its tag.
//! ring's AES-GCM seals at several GB/s per core (8.6 GB/s on the 2-core
//! development VM, where BLAKE3, our earlier MAC, ran at 6.1), so
//! encryption costs links between hosts nothing measurable.
//!
//! # Loopback links
//!
//! Between two ranks of one host (both ends of the socket on a loopback
//! address) frames go as they are after the handshake: header and
//! payload, no tag. There the link is memory, not a network: sealing and
//! opening every byte was a quarter of the CPU of a 64 MiB all-reduce
//! over TCP on 4 ranks, and bought nothing, since only root can read or
//! alter a loopback connection another user's processes hold, and root can
//! read the ranks' memory too. The handshake still proves the job key, so
//! a stranger's process on the host cannot connect. `[network]
//! seal_loopback = true` ([`StreamOptions::seal_loopback`]) seals them as
//! any other link; both ends must agree (the key confirmation says which).
//!
//! After any error a stream is in an unknown state and must be dropped.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nix::sys::socket::{recv, setsockopt, sockopt, MsgFlags};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use super::frame::{Frame, FrameHeader, FrameKind, HEADER_LEN, MAC_LEN, MAGIC, VERSION};
use super::{deadline_after, JobKey, WireError};

/// Write buffer of a stream: large enough that a header, a modest payload
/// and its tag go out in one system call.
const WRITE_BUF: usize = 256 * 1024;

/// Read buffer of a stream: a header and a small frame arrive in one system
/// call, while the rest of a large payload is read straight into its own
/// buffer. Whatever the read buffer holds is copied once more, so a buffer
/// as large as a frame copied nearly every received byte twice (256 KiB
/// before: a 64 MiB all-reduce over TCP on 4 ranks took 1-11% more CPU).
const READ_BUF: usize = 16 * 1024;

/// Largest payload of a frame this side sends (frames up to the stream's
/// `max_frame` are still accepted). One MiB is a collective's whole chunk
/// ([`crate::collective::CHUNK_BYTES`]), so a chunk goes as one frame and
/// the receiver joins no pieces, which cost a copy per piece and the
/// growing buffer's reallocations: with quarter-MiB frames a 64 MiB
/// all-reduce over TCP on 4 ranks took 4-8% more CPU. A frame is sealed
/// in a buffer of its size, one per link in use.
pub const SEND_FRAME: usize = 1024 * 1024;

/// Send buffer of a loopback link (the kernel doubles it for its own
/// bookkeeping), instead of the one autotuning grows to `tcp_wmem`'s
/// maximum (4 MiB by default). A loopback round trip takes microseconds,
/// so a megabyte covers it many times over, while a sender allowed 4 MiB
/// ahead of its reader leaves the socket's memory colder by the time the
/// reader copies it out. Links to other hosts keep autotuning, which a
/// long path needs. Measured with `bench allreduce --transport tcp`, 4
/// ranks on 2 cores (Intel Xeon VM), 64 MiB: 122-131 ms against 128-137
/// with autotuning; 2 MiB and 512 KiB gave about the same, fixing the
/// receive buffer too was slower (141-145 ms).
const LOOPBACK_SEND_BUF: usize = 1024 * 1024;

const HELLO_LEN: usize = 14;
/// Magic and version, the part both sides must agree on before the rest can
/// even be parsed; also the Noise prologue, so both are bound to the keys.
const PREAMBLE: [u8; 5] = [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], VERSION];
const PREAMBLE_LEN: usize = PREAMBLE.len();

const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Longest handshake message either side accepts: ours are 62 bytes (an
/// ephemeral key, a hello, a tag).
const MAX_NOISE_MESSAGE: usize = 1024;

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

    fn decode(bytes: &[u8]) -> Option<Hello> {
        let bytes: [u8; HELLO_LEN] = bytes.try_into().ok()?;
        let [r0, r1, r2, r3, l0, l1, job @ ..] = bytes;
        Some(Hello {
            rank: u32::from_le_bytes([r0, r1, r2, r3]),
            lane: u16::from_le_bytes([l0, l1]),
            job,
        })
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
    /// Seal the frames of loopback links too (see the module's "Loopback
    /// links"); both ends of a link must agree.
    pub seal_loopback: bool,
}

/// An encrypted, authenticated connection to one peer.
#[derive(Debug)]
pub struct AuthStream {
    reader: FrameReader,
    writer: FrameWriter,
}

/// The receiving half of an [`AuthStream`].
#[derive(Debug)]
pub struct FrameReader {
    inner: BufReader<TcpStream>,
    session: Session,
}

/// The sending half of an [`AuthStream`].
#[derive(Debug)]
pub struct FrameWriter {
    inner: BufWriter<TcpStream>,
    session: Session,
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
        let mut noise = noise_builder(key)?
            .build_initiator()
            .map_err(WireError::Noise)?;
        let mut first = PREAMBLE.to_vec();
        first.extend(noise_write(&mut noise, &hello.encode())?);
        hs.write(&first, "sending the client hello")?;

        // A hang-up here stays `Closed`, which dialers retry: a busy server
        // drops connections beyond its handshake limit. Another key is told
        // apart by the server's explicit refusal below.
        let preamble = hs.read::<PREAMBLE_LEN>("waiting for the server hello")?;
        hs.check_preamble(preamble)?;
        let reply = hs.read_noise("reading the server hello")?;
        if reply.is_empty() {
            return Err(WireError::AuthFailed {
                peer: hs.peer,
                reason: "the server could not read our hello (it holds another job key)",
            });
        }
        let peer_hello = noise_read(&mut noise, &reply).ok_or(WireError::AuthFailed {
            peer: hs.peer,
            reason: "the server could not prove it holds our job key (it has another key)",
        })?;
        hs.check_job(&hello, &peer_hello)?;
        let (to_server, to_client) = noise.dangerously_get_raw_split();
        let unsealed = hs.unsealed();
        let mut stream = hs.finish(&to_client, &to_server, false)?;
        stream
            .writer
            .send(FrameKind::Control, u64::from(unsealed), &[])?;
        if unsealed {
            stream.unseal();
        }
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
                let _ = hs.write(&PREAMBLE, "sending our version");
            }
            return Err(e);
        }
        let mut noise = noise_builder(key)?
            .build_responder()
            .map_err(WireError::Noise)?;
        let first = hs.read_noise("reading the client hello")?;
        let Some(peer_hello) = noise_read(&mut noise, &first) else {
            let mut refusal = PREAMBLE.to_vec();
            refusal.extend_from_slice(&0u16.to_le_bytes());
            let _ = hs.write(&refusal, "refusing the client hello");
            return Err(WireError::AuthFailed {
                peer: hs.peer,
                reason: "the client could not prove it holds our job key (it has another key)",
            });
        };
        let mut reply = PREAMBLE.to_vec();
        reply.extend(noise_write(&mut noise, &hello.encode())?);
        // The reply goes out even to a client of another job, so that its
        // error names the mismatch too instead of a bare hang-up.
        hs.write(&reply, "sending the server hello")?;
        hs.check_job(&hello, &peer_hello)?;
        let (to_server, to_client) = noise.dangerously_get_raw_split();
        let peer = hs.peer;
        let unconfirmed = || WireError::AuthFailed {
            peer,
            reason: "the client did not confirm the handshake's keys (a replayed hello, \
                     or it hung up)",
        };
        let mut confirm = hs.confirmation(&to_server);
        let first_frame = confirm.read(&mut hs).map_err(|e| match e {
            WireError::BadMac { .. } | WireError::Closed { .. } => unconfirmed(),
            other => other,
        })?;
        if (first_frame.kind, first_frame.payload.len()) != (FrameKind::Control, 0)
            || first_frame.tag > 1
        {
            return Err(unconfirmed());
        }
        let unsealed = hs.unsealed();
        if first_frame.tag != u64::from(unsealed) {
            return Err(WireError::SealMismatch {
                peer,
                theirs_sealed: first_frame.tag == 0,
            });
        }
        let mut stream = hs.finish(&to_server, &to_client, unsealed)?;
        stream.reader.session.seq = confirm.seq;
        Ok((stream, peer_hello))
    }

    pub fn send(&mut self, kind: FrameKind, tag: u64, payload: &[u8]) -> Result<(), WireError> {
        self.writer.send(kind, tag, payload)
    }

    pub fn recv(&mut self) -> Result<Frame, WireError> {
        self.reader.recv()
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.reader.session.peer
    }

    /// Another handle on the socket, so a supervisor can shut the connection
    /// down (`TcpStream::shutdown`) or set timeouts while a reader or writer
    /// is blocked inside it.
    pub fn try_clone_socket(&self) -> Result<TcpStream, WireError> {
        self.reader
            .inner
            .get_ref()
            .try_clone()
            .map_err(|e| WireError::from_io(self.peer_addr(), "cloning the socket", e))
    }

    /// Whether this link's frames are sealed (not a loopback link, or one
    /// whose job asked to seal them).
    pub fn sealed(&self) -> bool {
        self.writer.session.cipher.is_some()
    }

    /// Both directions from now on unsealed: the client's, once its key
    /// confirmation (sealed) is out.
    fn unseal(&mut self) {
        self.reader.session.cipher = None;
        self.writer.session.cipher = None;
    }

    /// Splits the stream so one thread can read while others write.
    pub fn into_split(self) -> (FrameReader, FrameWriter) {
        (self.reader, self.writer)
    }
}

/// What a socket holds of a stream's next frame, as
/// [`FrameReader::queued_frame`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// Nothing, or the start of a frame whose rest is on its way.
    Nothing,
    /// All of the frame with this header: reading it does not block.
    Whole(FrameHeader),
    /// Something a [`FrameReader::recv`] must read: a frame too large to
    /// look at, bytes already in the reader's buffer, a header that does
    /// not parse, the stream's end or an error.
    Other,
}

impl FrameReader {
    /// Reads, verifies and decrypts the next frame, blocking until it
    /// arrives.
    pub fn recv(&mut self) -> Result<Frame, WireError> {
        self.session.read(&mut self.inner)
    }

    /// The next frame's header, blocking until it arrives; read its
    /// payload next with [`FrameReader::recv_payload`] or
    /// [`FrameReader::recv_payload_into`].
    pub fn recv_header(&mut self) -> Result<FrameHeader, WireError> {
        self.session.read_header(&mut self.inner)
    }

    /// See [`Session::read_payload`].
    pub fn recv_payload(&mut self, header: FrameHeader) -> Result<Frame, WireError> {
        self.session.read_payload(&mut self.inner, header)
    }

    /// [`Session::read_payload_into`], giving up at `deadline`: the stream
    /// is then mid-frame and no longer usable, which the caller must treat
    /// as the link's end.
    pub fn recv_payload_into(
        &mut self,
        header: &FrameHeader,
        into: &mut [u8],
        deadline: Instant,
    ) -> Result<(), WireError> {
        let peer = self.session.peer;
        let socket = self.inner.get_ref();
        let left = deadline.saturating_duration_since(Instant::now());
        // A zero timeout would mean none at all.
        let timeout = |d: Duration| socket.set_read_timeout(Some(d.max(Duration::from_micros(1))));
        timeout(left).map_err(|e| WireError::from_io(peer, "setting a read deadline", e))?;
        let read = self
            .session
            .read_payload_into(&mut self.inner, header, into);
        self.inner
            .get_ref()
            .set_read_timeout(None)
            .map_err(|e| WireError::from_io(peer, "clearing a read deadline", e))?;
        read
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.session.peer
    }

    /// What the socket holds of the next frame (see [`Queued`]), looked at
    /// without consuming it; a frame of more than `at_most` payload bytes
    /// counts as [`Queued::Other`]. `scratch` is where the bytes are
    /// looked at, kept by the caller between calls.
    pub fn queued_frame(&self, at_most: usize, scratch: &mut Vec<u8>) -> Queued {
        if !self.inner.buffer().is_empty() {
            return Queued::Other;
        }
        let socket = self.inner.get_ref();
        let peek = |into: &mut [u8]| {
            let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
            recv(socket.as_raw_fd(), into, flags)
        };
        let mut header = [0u8; HEADER_LEN];
        match peek(&mut header) {
            Ok(n) if n == HEADER_LEN => {}
            // The end of the stream, which a read reports.
            Ok(0) => return Queued::Other,
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => return Queued::Nothing,
            Err(_) => return Queued::Other,
        }
        // A header that does not parse is left to a read, which reports it.
        let Ok(header) = FrameHeader::decode(header, self.session.max_frame, self.session.peer)
        else {
            return Queued::Other;
        };
        let len = header.len as usize;
        if len > at_most {
            return Queued::Other;
        }
        let mac = if self.session.cipher.is_some() {
            MAC_LEN
        } else {
            0
        };
        scratch.resize(HEADER_LEN + len + mac, 0);
        match peek(scratch) {
            Ok(n) if n == scratch.len() => Queued::Whole(header),
            _ => Queued::Nothing,
        }
    }

    /// Reads the frame [`FrameReader::queued_frame`] found whole, straight
    /// from the socket: nothing is read ahead into this reader's buffer, so
    /// whoever waits on the socket for the frames after it still sees them
    /// there.
    pub fn recv_queued(&mut self) -> Result<Frame, WireError> {
        self.session.read(self.inner.get_mut())
    }

    /// Whether this reader holds bytes already read from the socket: the
    /// next frame may start there, with nothing queued in the socket.
    pub fn has_buffered(&self) -> bool {
        !self.inner.buffer().is_empty()
    }
}

impl FrameWriter {
    /// Encrypts and sends one frame and flushes it. A payload over the
    /// frame limit is refused here, since the peer would drop the
    /// connection for it.
    pub fn send(&mut self, kind: FrameKind, tag: u64, payload: &[u8]) -> Result<(), WireError> {
        self.send_gather(kind, tag, &[payload])
    }

    /// [`FrameWriter::send`] of the concatenation of `parts`, without
    /// joining them first.
    pub fn send_gather(
        &mut self,
        kind: FrameKind,
        tag: u64,
        parts: &[&[u8]],
    ) -> Result<(), WireError> {
        self.session.write(&mut self.inner, kind, tag, parts)?;
        self.inner
            .flush()
            .map_err(|e| WireError::from_io(self.session.peer, "sending a frame", e))
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.session.peer
    }
}

/// One direction of a stream: its cipher, the next frame's sequence
/// number, the frame limit and the peer (for errors). Reading and writing
/// frames needs nothing else, so it works on any byte stream: the socket,
/// or a buffer in a test or a fuzz target.
pub struct Session {
    /// `None` on an unsealed loopback link (see the module's "Loopback
    /// links").
    cipher: Option<LessSafeKey>,
    seq: u64,
    max_frame: usize,
    peer: SocketAddr,
    /// Where a frame is sealed before it is written: header, ciphertext,
    /// tag, so that each frame is one write.
    sealed: Vec<u8>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("seq", &self.seq)
            .field("max_frame", &self.max_frame)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// The direction keyed by `key`, at frame 0.
    pub fn new(key: &[u8; 32], max_frame: usize, peer: SocketAddr) -> Session {
        let cipher = UnboundKey::new(&AES_256_GCM, key)
            .map(LessSafeKey::new)
            // A 32-byte key is AES-256's length; ring refuses only others.
            .unwrap_or_else(|_| unreachable!("AES-256 takes 32-byte keys"));
        Session {
            cipher: Some(cipher),
            seq: 0,
            max_frame,
            peer,
            sealed: Vec::new(),
        }
    }

    /// A direction whose frames go as they are: header and payload.
    pub fn unsealed(max_frame: usize, peer: SocketAddr) -> Session {
        Session {
            cipher: None,
            seq: 0,
            max_frame,
            peer,
            sealed: Vec::new(),
        }
    }

    /// Reads the next frame from `r`, verifies and decrypts it (when
    /// sealed).
    pub fn read(&mut self, r: &mut impl Read) -> Result<Frame, WireError> {
        let header = self.read_header(r)?;
        self.read_payload(r, header)
    }

    /// Reads and checks the next frame's header; its payload, which must be
    /// read next, with [`Session::read_payload`] or
    /// [`Session::read_payload_into`], is not verified yet.
    pub fn read_header(&mut self, r: &mut impl Read) -> Result<FrameHeader, WireError> {
        let mut header = [0u8; HEADER_LEN];
        r.read_exact(&mut header)
            .map_err(|e| WireError::from_io(self.peer, "reading a frame header", e))?;
        FrameHeader::decode(header, self.max_frame, self.peer)
    }

    /// Reads the payload of the frame `header` announced straight into
    /// `into`, which is `header.len` bytes long, and verifies and decrypts
    /// it there when sealed (the MAC read apart): a receiver that knows
    /// where the bytes go skips the buffer of their own and the copy out
    /// of it. On a bad MAC `into` holds no plaintext worth keeping.
    ///
    /// # Panics
    /// On an `into` of another length: the caller checks first, since
    /// reading another number of bytes would lose the stream's place.
    pub fn read_payload_into(
        &mut self,
        r: &mut impl Read,
        header: &FrameHeader,
        into: &mut [u8],
    ) -> Result<(), WireError> {
        assert_eq!(
            into.len(),
            header.len as usize,
            "a payload read in place into a slice of another length"
        );
        let peer = self.peer;
        let reading = |e| WireError::from_io(peer, "reading a frame", e);
        r.read_exact(into).map_err(reading)?;
        let Some(cipher) = &self.cipher else {
            return Ok(());
        };
        let mut mac = [0u8; MAC_LEN];
        r.read_exact(&mut mac).map_err(reading)?;
        let nonce = next_nonce(&mut self.seq);
        cipher
            .open_in_place_separate_tag(nonce, Aad::from(&header.encode()), mac.into(), into, 0..)
            .map(|_| ())
            .map_err(|_| WireError::BadMac { peer })
    }

    /// Reads, verifies and decrypts (when sealed) the payload of the frame
    /// `header` announced.
    pub fn read_payload(
        &mut self,
        r: &mut impl Read,
        parsed: FrameHeader,
    ) -> Result<Frame, WireError> {
        let peer = self.peer;
        let header = parsed.encode();
        // Cannot truncate: decode bounded `len` by `max_frame`, a usize.
        let len = parsed.len as usize;
        let want = len + if self.cipher.is_some() { MAC_LEN } else { 0 };
        // Read into fresh capacity: a `TcpStream` (through its `BufReader`)
        // fills it without zeroing it first, which for 1 MiB frames was a
        // memset of every byte received (5.6% of the CPU of a 64 MiB
        // all-reduce over TCP on 4 ranks).
        let mut payload = Vec::with_capacity(want);
        let got = r
            .take(want as u64)
            .read_to_end(&mut payload)
            .map_err(|e| WireError::from_io(peer, "reading a frame", e))?;
        if got < want {
            return Err(WireError::Closed {
                peer,
                during: "reading a frame",
            });
        }
        if let Some(cipher) = &self.cipher {
            cipher
                .open_in_place(next_nonce(&mut self.seq), Aad::from(&header), &mut payload)
                .map_err(|_| WireError::BadMac { peer })?;
            payload.truncate(len);
        }
        Ok(Frame {
            kind: parsed.kind,
            tag: parsed.tag,
            payload,
        })
    }

    /// Encrypts the concatenation of `parts` as the next frame and writes
    /// it to `w` (without flushing); unsealed, writes the header and the
    /// parts as they are, copying nothing.
    pub fn write(
        &mut self,
        w: &mut impl Write,
        kind: FrameKind,
        tag: u64,
        parts: &[&[u8]],
    ) -> Result<(), WireError> {
        let (peer, max) = (self.peer, self.max_frame);
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let too_large = || WireError::FrameTooLarge {
            peer,
            len: total as u64,
            max,
        };
        if total > max {
            return Err(too_large());
        }
        let len = u32::try_from(total).map_err(|_| too_large())?;
        let header = FrameHeader { kind, tag, len }.encode();
        let sending = |e| WireError::from_io(peer, "sending a frame", e);
        let Some(cipher) = &self.cipher else {
            return std::iter::once(&header[..])
                .chain(parts.iter().copied())
                .try_for_each(|bytes| w.write_all(bytes))
                .map_err(sending);
        };
        self.sealed.clear();
        self.sealed.extend_from_slice(&header);
        parts.iter().for_each(|p| self.sealed.extend_from_slice(p));
        let nonce = next_nonce(&mut self.seq);
        let body = &mut self.sealed[HEADER_LEN..];
        let sealed_tag = cipher
            .seal_in_place_separate_tag(nonce, Aad::from(&header), body)
            .map_err(|_| too_large())?;
        self.sealed.extend_from_slice(sealed_tag.as_ref());
        let written = w.write_all(&self.sealed).map_err(sending);
        // A big frame's buffer is not kept for the small ones after it.
        if self.sealed.capacity() > 2 * SEND_FRAME {
            self.sealed = Vec::new();
        }
        written
    }
}

/// The nonce of the frame numbered `seq`, which it counts on, as Noise's
/// AESGCM cipher encodes its counter (4 zero bytes, 8 bytes big-endian);
/// each is used once, since the count only rises and every connection has
/// its own keys.
fn next_nonce(seq: &mut u64) -> Nonce {
    let mut nonce = [0u8; aead::NONCE_LEN];
    nonce[4..].copy_from_slice(&seq.to_be_bytes());
    *seq += 1;
    Nonce::assume_unique_for_key(nonce)
}

fn noise_builder(key: &JobKey) -> Result<snow::Builder<'_>, WireError> {
    let params = NOISE_PARAMS.parse().map_err(WireError::Noise)?;
    snow::Builder::new(params)
        .prologue(&PREAMBLE)
        .and_then(|b| b.psk(0, key.as_bytes()))
        .map_err(WireError::Noise)
}

/// The next handshake message carrying `payload`, with its length before it.
fn noise_write(noise: &mut snow::HandshakeState, payload: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut message = [0u8; MAX_NOISE_MESSAGE];
    let n = noise
        .write_message(payload, &mut message)
        .map_err(WireError::Noise)?;
    // n <= MAX_NOISE_MESSAGE, far below u16::MAX.
    let mut out = (n as u16).to_le_bytes().to_vec();
    out.extend_from_slice(&message[..n]);
    Ok(out)
}

/// The hello in a handshake message from the peer, or `None` when it does
/// not decrypt under our key or holds no hello.
fn noise_read(noise: &mut snow::HandshakeState, message: &[u8]) -> Option<Hello> {
    let mut payload = [0u8; MAX_NOISE_MESSAGE];
    let n = noise.read_message(message, &mut payload).ok()?;
    Hello::decode(&payload[..n])
}

/// A connection in the middle of its handshake: every read and write is
/// bounded by one overall deadline, so a peer trickling a byte at a time
/// cannot stretch it.
struct Handshake {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    peer: SocketAddr,
    local: SocketAddr,
    deadline: Instant,
    opts: StreamOptions,
}

impl Handshake {
    fn start(stream: TcpStream, opts: StreamOptions) -> Result<Handshake, WireError> {
        let deadline = deadline_after(opts.handshake_timeout);
        let peer = stream.peer_addr().map_err(WireError::PeerAddr)?;
        let setup = |e| WireError::from_io(peer, "setting up the socket", e);
        let local = stream.local_addr().map_err(setup)?;
        // Small frames (barriers, receipts) must not wait for Nagle's timer.
        stream.set_nodelay(true).map_err(setup)?;
        if peer.ip().is_loopback() {
            setsockopt(&stream, sockopt::SndBuf, &LOOPBACK_SEND_BUF)
                .map_err(|e| setup(e.into()))?;
        }
        let write_half = stream.try_clone().map_err(setup)?;
        Ok(Handshake {
            reader: BufReader::with_capacity(READ_BUF, stream),
            writer: BufWriter::with_capacity(WRITE_BUF, write_half),
            peer,
            local,
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
        self.read_exact_within(&mut buf, during)?;
        Ok(buf)
    }

    /// A length-prefixed Noise message.
    fn read_noise(&mut self, during: &'static str) -> Result<Vec<u8>, WireError> {
        let len = usize::from(u16::from_le_bytes(self.read::<2>(during)?));
        if len > MAX_NOISE_MESSAGE {
            return Err(WireError::AuthFailed {
                peer: self.peer,
                reason: "a handshake message longer than any we send",
            });
        }
        let mut message = vec![0u8; len];
        self.read_exact_within(&mut message, during)?;
        Ok(message)
    }

    fn read_exact_within(&mut self, buf: &mut [u8], during: &'static str) -> Result<(), WireError> {
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
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        }
        Ok(())
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

    /// Whether the link's frames go unsealed: both ends on loopback, and
    /// not asked to seal them. Each end decides from its own socket, which
    /// on loopback sees the same; the key confirmation checks it.
    fn unsealed(&self) -> bool {
        !self.opts.seal_loopback && self.peer.ip().is_loopback() && self.local.ip().is_loopback()
    }

    /// The session the client's key confirmation (its frame 0) arrives in.
    fn confirmation(&self, recv_key: &[u8; 32]) -> Session {
        Session::new(recv_key, 0, self.peer)
    }

    /// The stream keyed by Noise's split (or `unsealed`), its handshake
    /// timeouts lifted: from now on, waiting for the next frame is the
    /// caller's business.
    fn finish(
        self,
        recv_key: &[u8; 32],
        send_key: &[u8; 32],
        unsealed: bool,
    ) -> Result<AuthStream, WireError> {
        let peer = self.peer;
        let socket = self.reader.get_ref();
        socket
            .set_read_timeout(None)
            .and_then(|()| socket.set_write_timeout(None))
            .map_err(|e| WireError::from_io(peer, "setting up the socket", e))?;
        let max_frame = self.opts.max_frame;
        let session = |key| match unsealed {
            true => Session::unsealed(max_frame, peer),
            false => Session::new(key, max_frame, peer),
        };
        Ok(AuthStream {
            reader: FrameReader {
                inner: self.reader,
                session: session(recv_key),
            },
            writer: FrameWriter {
                inner: self.writer,
                session: session(send_key),
            },
        })
    }
}

/// Reads of the handshake's key confirmation, within its deadline.
impl Read for Handshake {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.reader.get_ref().set_read_timeout(Some(left))?;
        self.reader.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    /// Handshakes that must succeed get all the time a busy host needs;
    /// the frames are sealed as between hosts (`tests/wire_encryption.rs`
    /// has loopback's unsealed ones).
    const OPTS: StreamOptions = StreamOptions {
        max_frame: 1024,
        handshake_timeout: Duration::from_secs(30),
        seal_loopback: true,
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

    /// An authenticated link whose client wrote, past the cipher, the
    /// header of a data frame of `len` bytes and then `body`: the server
    /// end, the client end, and the client's raw socket.
    fn raw_frame(len: u32, body: &[u8]) -> (AuthStream, AuthStream, TcpStream) {
        let key = JobKey::generate().unwrap();
        let (server, client) =
            handshake((&key, Hello::new(0, "job")), (&key, Hello::new(1, "job")));
        let (server, _) = server.unwrap();
        let (client, _) = client.unwrap();
        let mut raw = client.try_clone_socket().unwrap();
        let header = FrameHeader {
            kind: FrameKind::Data,
            tag: 1,
            len,
        }
        .encode();
        raw.write_all(&header).unwrap();
        raw.write_all(body).unwrap();
        (server, client, raw)
    }

    #[test]
    fn tampered_frame_fails_its_mac() {
        let body: Vec<u8> = b"abc".iter().copied().chain([0u8; MAC_LEN]).collect();
        let (mut server, _client, _raw) = raw_frame(3, &body);
        let result = server.recv();
        assert!(
            matches!(result, Err(WireError::BadMac { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn a_frame_cut_short_by_its_peer_closing_is_a_closed_link() {
        let (mut server, client, raw) = raw_frame(100, &[7u8; 40]);
        raw.shutdown(std::net::Shutdown::Both).unwrap();
        drop(client);
        let result = server.recv();
        assert!(
            matches!(
                result,
                Err(WireError::Closed {
                    during: "reading a frame",
                    ..
                })
            ),
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
