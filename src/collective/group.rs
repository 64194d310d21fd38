//! A subset of a transport's ranks, renumbered densely, as a transport of
//! its own: what survivors shrink the world to after a failure (like
//! `MPI_Comm_shrink`), and what hierarchical collectives run sites on.

use std::time::Instant;

use super::CollectiveError;
use crate::transport::{copy_each_into, Placed, Transport, TransportError};

/// Ranks `members` of `parent`, where parent rank `members[i]` is rank `i`.
/// Members are sorted so that every member computes the same numbering.
///
/// A group shares its parent's tags: messages of a failed call still sit
/// under that call's tag, so retry on a group with a tag never used before.
pub struct Group<'a, T: ?Sized> {
    parent: &'a T,
    members: Vec<usize>,
    rank: usize,
    /// Once this says so, waits end as if their peer had timed out.
    abandoned: Option<&'a (dyn Fn() -> bool + Sync)>,
}

/// How often a wait on a group with [`Group::abandoned_when`] looks.
const ABANDON_POLL: std::time::Duration = std::time::Duration::from_millis(10);

impl<'a, T: Transport + ?Sized> Group<'a, T> {
    /// The group of `members` (parent ranks, in any order, duplicates
    /// ignored); the calling rank must be one of them.
    pub fn new(
        parent: &'a T,
        members: impl IntoIterator<Item = usize>,
    ) -> Result<Self, CollectiveError> {
        let mut members: Vec<usize> = members.into_iter().collect();
        members.sort_unstable();
        members.dedup();
        if let Some(&r) = members.iter().find(|&&r| r >= parent.size()) {
            return Err(CollectiveError::Transport(TransportError::NoSuchRank {
                rank: r,
                size: parent.size(),
            }));
        }
        let rank = members.binary_search(&parent.rank()).map_err(|_| {
            CollectiveError::InvalidArgument(format!(
                "rank {} is not in the group {members:?}",
                parent.rank()
            ))
        })?;
        Ok(Group {
            parent,
            members,
            rank,
            abandoned: None,
        })
    }

    /// A group whose waits give up as soon as `abandoned` says so, each
    /// as a timeout of the peer waited on: for a collective that became
    /// moot (a miner's all-reduce when a standby took over the job, which
    /// starts the window again), so that it fails within milliseconds
    /// instead of at its deadline.
    pub fn abandoned_when(self, abandoned: &'a (dyn Fn() -> bool + Sync)) -> Self {
        Group {
            abandoned: Some(abandoned),
            ..self
        }
    }

    /// Every parent rank except `lost`: the survivors of a failure.
    pub fn without(parent: &'a T, lost: &[usize]) -> Result<Self, CollectiveError> {
        Self::new(parent, (0..parent.size()).filter(|r| !lost.contains(r)))
    }

    /// Parent ranks of the members, in group order.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// The parent's number for group rank `rank`.
    pub fn parent_rank(&self, rank: usize) -> usize {
        self.members[rank]
    }

    fn to_parent(&self, rank: usize) -> Result<usize, TransportError> {
        self.members
            .get(rank)
            .copied()
            .ok_or(TransportError::NoSuchRank {
                rank,
                size: self.members.len(),
            })
    }

    /// Renames the peer in a parent's error to its group number.
    fn renamed(&self, e: TransportError) -> TransportError {
        let local = |r: usize| self.members.binary_search(&r).unwrap_or(r);
        match e {
            TransportError::PeerLost { rank, reason } => TransportError::PeerLost {
                rank: local(rank),
                reason,
            },
            TransportError::Timeout { rank, tag } => TransportError::Timeout {
                rank: local(rank),
                tag,
            },
            TransportError::Protocol { rank, reason } => TransportError::Protocol {
                rank: local(rank),
                reason,
            },
            other => other,
        }
    }

    /// A receive from member `from` through the parent's `recv`, in
    /// slices of [`ABANDON_POLL`] while the group watches for abandonment.
    fn recv_from_parent(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
        recv: impl Fn(&T, usize, u64, Instant) -> Result<Vec<u8>, TransportError>,
    ) -> Result<Vec<u8>, TransportError> {
        let parent = self.to_parent(from)?;
        let Some(abandoned) = self.abandoned else {
            return recv(self.parent, parent, tag, deadline).map_err(|e| self.renamed(e));
        };
        loop {
            let until = deadline.min(Instant::now() + ABANDON_POLL);
            match recv(self.parent, parent, tag, until) {
                Err(TransportError::Timeout { .. }) if until < deadline && !abandoned() => {}
                Err(TransportError::Timeout { .. }) if until < deadline => {
                    return Err(TransportError::Timeout { rank: from, tag })
                }
                other => return other.map_err(|e| self.renamed(e)),
            }
        }
    }
}

impl<T: Transport + ?Sized> Transport for Group<'_, T> {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn send(&self, to: usize, tag: u64, payload: &[u8]) -> Result<(), TransportError> {
        self.parent
            .send(self.to_parent(to)?, tag, payload)
            .map_err(|e| self.renamed(e))
    }

    fn recv_deadline(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, TransportError> {
        self.recv_from_parent(from, tag, deadline, T::recv_deadline)
    }

    fn recv_due(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, TransportError> {
        self.recv_from_parent(from, tag, deadline, T::recv_due)
    }

    /// The parent's own, when the group waits without watching for
    /// abandonment; otherwise the copying default over `recv_deadline`.
    fn recv_into(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
        into: &mut [u8],
        chunk: usize,
    ) -> Result<Placed, TransportError> {
        if self.abandoned.is_some() {
            return copy_each_into(self, from, tag, deadline, into, chunk);
        }
        self.parent
            .recv_into(self.to_parent(from)?, tag, deadline, into, chunk)
            .map_err(|e| self.renamed(e))
    }

    fn default_timeout(&self) -> std::time::Duration {
        self.parent.default_timeout()
    }
}
