//! The world of one job: who every rank is and where it listens.
//!
//! A rank learns its own identity from its launcher ([`detect()`]) and
//! everybody else's through a rendezvous ([`rendezvous()`]): afterwards every
//! rank holds the same [`World`], the address book the transport connects by.

pub mod detect;
pub mod door;
pub mod rendezvous;

use std::net::SocketAddr;

pub use detect::{detect, detect_from_process, DetectError, LauncherKind, RankEnv};
pub use door::{knock, Admission, Door, KnockOptions, Membership};
pub use rendezvous::{rendezvous, Endpoint, Formed, RendezvousError, RendezvousOptions};

/// One rank as the others see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub rank: usize,
    /// Where its transport listens.
    pub addr: SocketAddr,
    /// Its real host name (`gethostname`), which may differ from the job
    /// file's host label under `mpirun`.
    pub host: String,
    /// The site the job file places it in.
    pub site: String,
}

/// The same address book on every rank once rendezvous is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    /// Indexed by rank.
    pub peers: Vec<PeerInfo>,
}

impl World {
    pub fn me(&self) -> &PeerInfo {
        &self.peers[self.rank]
    }

    /// Transport addresses indexed by rank.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.peers.iter().map(|p| p.addr).collect()
    }
}

/// This machine's host name, or `localhost` where the kernel has none.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}
