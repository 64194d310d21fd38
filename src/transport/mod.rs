//! Point-to-point message transports between the ranks of a job.
//!
//! Collectives are generic over [`Transport`], the way rsmpi's collectives are
//! generic over a communicator; each fabric (TCP between hosts, shared memory
//! inside one host) implements it.

#[cfg(target_os = "linux")]
pub mod shm;

pub trait Transport: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Sends one message; messages between one pair with one tag arrive in order. Sending to self works.
    fn send(&self, to: usize, tag: u64, payload: &[u8]) -> Result<(), TransportError>;
    /// Waits for the next message from `from` with `tag` until `deadline`.
    fn recv_deadline(
        &self,
        from: usize,
        tag: u64,
        deadline: std::time::Instant,
    ) -> Result<Vec<u8>, TransportError>;
    /// recv with the transport's default timeout.
    fn recv(&self, from: usize, tag: u64) -> Result<Vec<u8>, TransportError>;
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("rank {rank} lost: {reason}")]
    PeerLost { rank: usize, reason: String },
    #[error("timed out waiting for rank {rank} (tag {tag:#x})")]
    Timeout { rank: usize, tag: u64 },
    #[error("protocol error from rank {rank}: {reason}")]
    Protocol { rank: usize, reason: String },
    #[error("no rank {0}")]
    NoSuchRank(usize),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}
