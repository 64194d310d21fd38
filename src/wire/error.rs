//! Errors of the wire layer.
//!
//! Every network variant names the peer's address, because the person reading
//! the message is usually looking at a swarm of dozens of hosts and needs to
//! know which one misbehaved, not just that something did.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// What went wrong on an authenticated stream, or with the job key behind it.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer does not speak the swarmrun protocol at all (a port scanner,
    /// an HTTP client, a stray connection to the wrong port).
    #[error("{peer}: not a swarmrun peer (bad magic \"{}\")", got.escape_ascii())]
    BadMagic { peer: SocketAddr, got: [u8; 4] },

    /// The peer speaks another version of the wire protocol.
    #[error("{peer}: speaks swarmrun wire protocol version {got}, this build speaks {ours}")]
    UnsupportedVersion { peer: SocketAddr, got: u8, ours: u8 },

    /// A frame header carried a kind this build does not know.
    #[error("{peer}: sent a frame of unknown kind {kind}")]
    UnknownKind { peer: SocketAddr, kind: u8 },

    /// A frame is longer than the stream's limit; rejected before any of its
    /// payload is read or allocated.
    #[error("{peer}: frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        peer: SocketAddr,
        len: u64,
        max: usize,
    },

    /// A frame's authentication tag did not verify: it was corrupted,
    /// forged, replayed or reordered in transit, or comes from another
    /// connection.
    #[error("{peer}: frame failed its integrity check (forged, replayed, reordered or corrupted)")]
    BadMac { peer: SocketAddr },

    /// The two ends of a loopback link disagree on sealing its frames:
    /// their job files differ in `[network] seal_loopback`.
    #[error(
        "{peer}: {} loopback frames and we do not: `[network] seal_loopback` differs between \
         our job files",
        if *theirs_sealed { "seals" } else { "does not seal" }
    )]
    SealMismatch {
        peer: SocketAddr,
        theirs_sealed: bool,
    },

    /// The handshake showed that the peer does not hold our job key.
    #[error("{peer}: authentication failed: {reason}")]
    AuthFailed {
        peer: SocketAddr,
        reason: &'static str,
    },

    /// The peer belongs to another job (another job using the same port, or a
    /// host file pointing at the wrong job's ranks).
    #[error(
        "{peer}: belongs to another job (its job id {}, ours {})",
        hex::encode(theirs),
        hex::encode(ours)
    )]
    JobMismatch {
        peer: SocketAddr,
        ours: [u8; 8],
        theirs: [u8; 8],
    },

    /// The peer did not answer in time.
    #[error("{peer}: timed out {during}")]
    Timeout {
        peer: SocketAddr,
        during: &'static str,
    },

    /// The socket failed.
    #[error("{peer}: I/O error {during}: {source}")]
    Io {
        peer: SocketAddr,
        during: &'static str,
        source: io::Error,
    },

    /// The peer closed the connection.
    #[error("{peer}: connection closed {during}")]
    Closed {
        peer: SocketAddr,
        during: &'static str,
    },

    /// A fresh connection had no peer address (it was reset right after it
    /// was accepted), so there is no one to name in the other variants.
    #[error("cannot read the peer address of a new connection: {0}")]
    PeerAddr(#[source] io::Error),

    /// The Noise library refused to build or run a handshake state; a bug
    /// of ours rather than of the peer, since the peer's bytes only ever
    /// fail to decrypt.
    #[error("Noise handshake: {0}")]
    Noise(snow::Error),

    /// The operating system could not supply random bytes for a key or nonce.
    #[error("cannot get random bytes from the operating system: {0}")]
    Random(getrandom::Error),

    /// Neither SWARMRUN_JOB_KEY nor a key file was given.
    #[error("no job key: run `swarmrun keygen` to create a key file, or set SWARMRUN_JOB_KEY")]
    NoKey,

    /// A key was given but is not 64 hex digits.
    #[error("invalid job key in {origin}: {reason}")]
    BadKey { origin: String, reason: String },

    /// `write_new` found a file already there; keys are never overwritten,
    /// because a running job may still be using the old one.
    #[error("refusing to overwrite existing key file {}", path.display())]
    KeyFileExists { path: PathBuf },

    /// A key file could not be read or written.
    #[error("cannot {action} key file {}: {source}", path.display())]
    KeyFile {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
}

impl WireError {
    /// Whether trying again later may succeed: the peer was slow, not ready,
    /// or the connection broke, as opposed to the peer being the wrong one.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            WireError::Timeout { .. } | WireError::Io { .. } | WireError::Closed { .. }
        )
    }

    /// Turns a socket error into `Timeout`, `Closed` or `Io`, so that callers
    /// see what happened rather than "Resource temporarily unavailable".
    pub(crate) fn from_io(peer: SocketAddr, during: &'static str, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                WireError::Timeout { peer, during }
            }
            io::ErrorKind::UnexpectedEof => WireError::Closed { peer, during },
            _ => WireError::Io {
                peer,
                during,
                source,
            },
        }
    }
}
