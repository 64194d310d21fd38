//! One rank's transport in a job of sites: its site's own fabric (shared
//! memory on one host, MPI under one `mpirun`) to the ranks of its site,
//! and authenticated TCP to every other rank, which is the one fabric that
//! crosses sites and the one ranks that join later can reach.
//!
//! A message takes the same path every time between the same two ranks,
//! so order per (peer, tag) holds as on either fabric alone. The site's
//! fabric numbers its ranks `0..k` in job order; this layer translates.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{Placed, TcpTransport, Transport, TransportError};

/// How long a wait on ranks of both fabrics sleeps on one before it looks
/// at the other.
const SWITCH: Duration = Duration::from_millis(1);

/// The site's fabric to its members, TCP to the rest.
pub struct SiteTransport {
    tcp: TcpTransport,
    local: Box<dyn Transport>,
    /// Job rank of each of the site fabric's ranks.
    members: Vec<usize>,
    /// The site fabric's rank of each member.
    index: HashMap<usize, usize>,
}

impl SiteTransport {
    /// `local` numbers `members` (job ranks, in its own rank order) and
    /// must know this rank as `members.position(tcp.rank())`.
    pub fn new(
        tcp: TcpTransport,
        local: Box<dyn Transport>,
        members: Vec<usize>,
    ) -> Result<SiteTransport, TransportError> {
        let index: HashMap<usize, usize> =
            members.iter().enumerate().map(|(i, &r)| (r, i)).collect();
        if index.get(&tcp.rank()) != Some(&local.rank()) || members.len() != local.size() {
            return Err(TransportError::InvalidOptions(format!(
                "the site fabric has rank {}/{} but this rank is {} of site {members:?}",
                local.rank(),
                local.size(),
                tcp.rank()
            )));
        }
        Ok(SiteTransport {
            tcp,
            local,
            members,
            index,
        })
    }

    /// The TCP mesh, for what only it can do (joiners).
    pub fn tcp(&self) -> &TcpTransport {
        &self.tcp
    }

    /// The site fabric's rank of job rank `rank`, if it is in the site.
    fn local_rank(&self, rank: usize) -> Option<usize> {
        self.index.get(&rank).copied()
    }

    /// `call` on the fabric that reaches job rank `rank`, with `rank` as
    /// that fabric numbers it, and its errors naming the job's rank.
    fn routed<R>(
        &self,
        rank: usize,
        call: impl FnOnce(&dyn Transport, usize) -> Result<R, TransportError>,
    ) -> Result<R, TransportError> {
        match self.local_rank(rank) {
            Some(r) => call(&*self.local, r).map_err(|e| self.renamed(e)),
            None => call(&self.tcp, rank),
        }
    }

    /// Names the job rank in an error of the site fabric.
    fn renamed(&self, e: TransportError) -> TransportError {
        let job = |r: usize| self.members.get(r).copied().unwrap_or(r);
        match e {
            TransportError::PeerLost { rank, reason } => TransportError::PeerLost {
                rank: job(rank),
                reason,
            },
            TransportError::Timeout { rank, tag } => TransportError::Timeout {
                rank: job(rank),
                tag,
            },
            other => other,
        }
    }
}

impl Transport for SiteTransport {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }

    fn size(&self) -> usize {
        self.tcp.size()
    }

    fn send(&self, to: usize, tag: u64, payload: &[u8]) -> Result<(), TransportError> {
        self.routed(to, |t, r| t.send(r, tag, payload))
    }

    fn recv_deadline(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, TransportError> {
        self.routed(from, |t, r| t.recv_deadline(r, tag, deadline))
    }

    fn recv_due(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, TransportError> {
        self.routed(from, |t, r| t.recv_due(r, tag, deadline))
    }

    fn recv_into(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
        into: &mut [u8],
        chunk: usize,
    ) -> Result<Placed, TransportError> {
        self.routed(from, |t, r| t.recv_into(r, tag, deadline, into, chunk))
    }

    fn default_timeout(&self) -> Duration {
        self.tcp.default_timeout()
    }

    /// Waits on each fabric's own `recv_any`; with ranks on both, takes
    /// turns of `SWITCH` on each.
    fn recv_any(
        &self,
        from: &[usize],
        tag: u64,
        deadline: Instant,
    ) -> Result<(usize, Vec<u8>), TransportError> {
        let local: Vec<usize> = from.iter().filter_map(|&r| self.local_rank(r)).collect();
        let remote: Vec<usize> = from
            .iter()
            .copied()
            .filter(|r| self.local_rank(*r).is_none())
            .collect();
        let from_local = |until: Instant| {
            self.local
                .recv_any(&local, tag, until)
                .map(|(r, m)| (self.members[r], m))
                .map_err(|e| self.renamed(e))
        };
        if remote.is_empty() {
            return from_local(deadline);
        }
        if local.is_empty() {
            return self.tcp.recv_any(&remote, tag, deadline);
        }
        loop {
            match from_local(Instant::now()) {
                Err(TransportError::NoneArrived { .. }) => {}
                other => return other,
            }
            let until = deadline.min(Instant::now() + SWITCH);
            match self.tcp.recv_any(&remote, tag, until) {
                Err(TransportError::NoneArrived { .. }) if Instant::now() < deadline => {}
                Err(TransportError::NoneArrived { .. }) => {
                    return Err(TransportError::NoneArrived {
                        ranks: from.len(),
                        tag,
                    })
                }
                other => return other,
            }
        }
    }
}
