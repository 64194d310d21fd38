//! What goes on the wire under a call's tag, and the one step every
//! algorithm is built from.
//!
//! A **data frame** is the raw bytes of whole elements, a `u64` count or a
//! 32-byte digest: always an even number of bytes, because every
//! [`Element`] is 2, 4 or 8 bytes wide. An **abort frame** is 9 bytes, the
//! blamed rank (numbered as the caller of the outermost call knows it) as a
//! little-endian `u64` followed by [`ABORT_MARK`]: its odd
//! length is what sets it apart, so data needs no header and is sent
//! straight from the caller's buffer without a copy.
//!
//! Abort frames exist because a rank blocked on a healthy peer would
//! otherwise wait out the timeout when that peer's call has already failed
//! elsewhere. Since messages of one pair and tag arrive in order, the next
//! frame a waiting rank reads from a failed peer is its abort frame.
//!
//! An abort frame points at the rank its sender gave up on, which may
//! itself be alive and waiting on a third. When the deadline passes, every
//! rank of a chain of waiters times out at once, each on its neighbour; to
//! agree on the silent rank at the end, a failing rank sends its pointer at
//! once and then follows the others' pointers (see [`guarded`]).

use std::ops::Range;
use std::time::{Duration, Instant};

use super::element::{copy_bytes, reduce_bytes, Element, ReduceOp};
use super::{Call, CollectiveError};
use crate::transport::Transport;

/// Largest message a collective sends: big buffers go as a pipeline of
/// chunks of this size, so receiving and reducing one chunk overlaps with
/// sending the next, and no message needs a buffer-sized allocation.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Last byte of an abort frame (any odd-length frame must end with it).
const ABORT_MARK: u8 = 0xab;

/// How long a failing rank waits for a peer's abort frame while following
/// pointers: the time a live peer needs to notice the same failure and say
/// so. Only a rank that stays silent this long is blamed for it.
pub const BLAME_GRACE: Duration = Duration::from_millis(200);

pub(crate) fn send<T: Transport + ?Sized>(
    c: &Call<T>,
    to: usize,
    bytes: &[u8],
) -> Result<(), CollectiveError> {
    c.transport
        .send(to, c.tag, bytes)
        .map_err(|e| CollectiveError::from(e).renamed(|r| c.outer(r)))
}

/// Receives the next data frame from `from`, which must be `expected` bytes long.
pub(crate) fn recv<T: Transport + ?Sized>(
    c: &Call<T>,
    from: usize,
    expected: usize,
) -> Result<Vec<u8>, CollectiveError> {
    let frame = c
        .transport
        .recv_due(from, c.tag, deadline(c))
        .map_err(|e| CollectiveError::from(e).renamed(|r| c.outer(r)))?;
    // Element sizes are even, so an abort frame (odd) is never `expected`.
    if frame.len() != expected {
        return Err(refused(c, from, expected, &frame));
    }
    Ok(frame)
}

/// The call's deadline, or the transport's default timeout from now (as
/// [`Transport::recv`] waits).
fn deadline<T: Transport + ?Sized>(c: &Call<T>) -> Instant {
    c.deadline
        .unwrap_or_else(|| crate::wire::deadline_after(c.transport.default_timeout()))
}

/// [`recv`] of the [`CHUNK_BYTES`] frames that fill `into`, straight into
/// it: no buffer of each frame's own to copy out of where the transport
/// can place the bytes itself.
pub(crate) fn recv_into<T: Transport + ?Sized>(
    c: &Call<T>,
    from: usize,
    into: &mut [u8],
) -> Result<(), CollectiveError> {
    match c
        .transport
        .recv_into(from, c.tag, deadline(c), into, CHUNK_BYTES)
    {
        Ok(None) => Ok(()),
        Ok(Some((at, frame))) => {
            let expected = (into.len() - at).min(CHUNK_BYTES);
            Err(refused(c, from, expected, &frame))
        }
        Err(e) => Err(CollectiveError::from(e).renamed(|r| c.outer(r))),
    }
}

/// Why `frame`, which is not the `expected`-byte data frame, ends the call:
/// a peer's abort, or a protocol error.
fn refused<T: Transport + ?Sized>(
    c: &Call<T>,
    from: usize,
    expected: usize,
    frame: &[u8],
) -> CollectiveError {
    if frame.len() % 2 == 1 {
        return match parse_abort(c, frame) {
            Some(rank) => CollectiveError::PeerLost { rank },
            None => malformed_abort(c, from, frame),
        };
    }
    CollectiveError::Protocol {
        rank: c.outer(from),
        reason: format!(
            "expected a {expected}-byte frame, got {} bytes",
            frame.len()
        ),
    }
}

/// The rank an abort frame blames, if it is well formed.
fn parse_abort<T: Transport + ?Sized>(c: &Call<T>, frame: &[u8]) -> Option<usize> {
    let [rank @ .., ABORT_MARK] = frame else {
        return None;
    };
    <[u8; 8]>::try_from(rank)
        .ok()
        .and_then(|r| usize::try_from(u64::from_le_bytes(r)).ok())
        // A phase of a bigger call names ranks outside its own group.
        .filter(|&r| c.names.is_some() || r < c.size())
}

fn malformed_abort<T: Transport + ?Sized>(
    c: &Call<T>,
    from: usize,
    frame: &[u8],
) -> CollectiveError {
    CollectiveError::Protocol {
        rank: c.outer(from),
        reason: format!("malformed {}-byte abort frame", frame.len()),
    }
}

/// Runs the body of one call on `c`. If it fails, tells every other rank
/// whom this rank gave up on, so that nobody waits for this rank's part,
/// then follows abort frames from that rank onwards (each peer's pointer,
/// waiting at most the call's grace for it) to the rank at the end of the
/// chain, and reports that one as lost.
pub(crate) fn guarded<T: Transport + ?Sized, R>(
    c: &Call<T>,
    body: impl FnOnce() -> Result<R, CollectiveError>,
) -> Result<R, CollectiveError> {
    body().map_err(|e| {
        abort(c, &e);
        match e {
            CollectiveError::PeerLost { rank } => CollectiveError::PeerLost {
                rank: follow(c, rank),
            },
            other => other,
        }
    })
}

/// Sends the abort frame for `e` to every other rank of `c`. A send that
/// fails is ignored: that peer is gone and has nothing left to wait for.
pub(crate) fn abort<T: Transport + ?Sized>(c: &Call<T>, e: &CollectiveError) {
    let blamed = match e {
        // Every rank reaches the same verdict from the same digests: no one waits.
        CollectiveError::SliceMismatch { .. } | CollectiveError::NonFinite { .. } => return,
        CollectiveError::PeerLost { rank }
        | CollectiveError::Protocol { rank, .. }
        | CollectiveError::UnprovedSlice { rank, .. } => *rank,
        CollectiveError::InvalidArgument(_) | CollectiveError::Transport(_) => c.outer(c.rank()),
    };
    let mut frame = [ABORT_MARK; 9];
    frame[..8].copy_from_slice(&(blamed as u64).to_le_bytes());
    for to in (0..c.size()).filter(|&to| to != c.rank()) {
        let _ = c.transport.send(to, c.tag, &frame);
    }
}

/// Follows abort pointers from `blamed` (an outer rank) while they lead to
/// live members of `c` that point elsewhere; returns the last rank reached.
fn follow<T: Transport + ?Sized>(c: &Call<T>, mut blamed: usize) -> usize {
    let me = c.outer(c.rank());
    let mut visited = Vec::new();
    while let Some(peer) = c
        .inner(blamed)
        .filter(|p| *p != c.rank() && !visited.contains(p))
    {
        visited.push(peer);
        match pointer_of(c, peer) {
            Some(next) if next != me => blamed = next,
            _ => break,
        }
    }
    blamed
}

/// The rank `peer`'s abort frame points at, skipping data frames this rank
/// will no longer read; `None` if `peer` is gone or sends none in time.
fn pointer_of<T: Transport + ?Sized>(c: &Call<T>, peer: usize) -> Option<usize> {
    let deadline = Instant::now() + c.grace;
    loop {
        let frame = c.transport.recv_deadline(peer, c.tag, deadline).ok()?;
        if frame.len() % 2 == 1 {
            return parse_abort(c, &frame);
        }
    }
}

/// What a step does with the elements it receives.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Merge<'b, E> {
    Copy,
    Reduce(ReduceOp),
    /// Reduce onto these elements of another buffer (an out-of-place
    /// call's input), the ones the destination stands for, overwriting
    /// the destination.
    ReduceOnto(ReduceOp, &'b [E]),
}

impl<E: Element> Merge<'_, E> {
    /// Merges the little-endian bytes of `dst[at]`'s elements into them.
    pub(crate) fn apply(&self, dst: &mut [E], at: Range<usize>, bytes: &[u8]) {
        match *self {
            Merge::Copy => copy_bytes(&mut dst[at], bytes),
            Merge::Reduce(op) => reduce_bytes(&mut dst[at], None, bytes, op),
            Merge::ReduceOnto(op, base) => {
                reduce_bytes(&mut dst[at.clone()], Some(&base[at]), bytes, op)
            }
        }
    }
}

/// One step of an algorithm: sends `out` to one peer while receiving as many
/// elements as `into` holds from another and merging them in. Both sides cut
/// their slices into the same [`CHUNK_BYTES`] frames; when there is more than
/// one chunk to send, a scoped thread sends while this one receives.
pub(crate) fn step<T: Transport + ?Sized, E: Element>(
    c: &Call<T>,
    out: Option<(usize, &[E])>,
    into: Option<(usize, &mut [E], Merge<'_, E>)>,
) -> Result<(), CollectiveError> {
    match (out, into) {
        (Some((to, data)), Some(into)) if data.len() > chunk_len::<E>() => {
            std::thread::scope(|s| {
                let sender = s.spawn(move || send_chunks(c, to, data));
                let received = recv_chunks(c, into);
                let sent = sender
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                received.and(sent)
            })
        }
        (out, into) => {
            if let Some((to, data)) = out {
                send_chunks(c, to, data)?;
            }
            into.map_or(Ok(()), |into| recv_chunks(c, into))
        }
    }
}

fn chunk_len<E: Element>() -> usize {
    CHUNK_BYTES / std::mem::size_of::<E>()
}

/// The chunks a slice of `len` elements travels in: at least one, so that an
/// empty slice still costs a frame and a length mismatch between ranks shows
/// as a protocol error instead of a hang.
pub(crate) fn chunks<E: Element>(len: usize) -> impl Iterator<Item = Range<usize>> {
    let chunk = chunk_len::<E>();
    (0..len.div_ceil(chunk).max(1)).map(move |k| k * chunk..len.min((k + 1) * chunk))
}

fn send_chunks<T: Transport + ?Sized, E: Element>(
    c: &Call<T>,
    to: usize,
    data: &[E],
) -> Result<(), CollectiveError> {
    chunks::<E>(data.len()).try_for_each(|r| send(c, to, bytemuck::cast_slice(&data[r])))
}

fn recv_chunks<T: Transport + ?Sized, E: Element>(
    c: &Call<T>,
    (from, dst, merge): (usize, &mut [E], Merge<'_, E>),
) -> Result<(), CollectiveError> {
    if let Merge::Copy = merge {
        return recv_into(c, from, bytemuck::cast_slice_mut(dst));
    }
    for r in chunks::<E>(dst.len()) {
        let frame = recv(c, from, r.len() * std::mem::size_of::<E>())?;
        merge.apply(dst, r, &frame);
    }
    Ok(())
}

/// Borrows two non-overlapping ranges of one buffer, one to read and one to
/// write, as a step that sends one part while receiving another needs.
pub(crate) fn split<E>(buf: &mut [E], read: Range<usize>, write: Range<usize>) -> (&[E], &mut [E]) {
    if read.end <= write.start {
        let (head, tail) = buf.split_at_mut(write.start);
        (&head[read], &mut tail[..write.len()])
    } else {
        let (head, tail) = buf.split_at_mut(read.start);
        (&tail[..read.len()], &mut head[write])
    }
}
