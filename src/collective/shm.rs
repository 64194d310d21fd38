//! All-reduce through shared memory: the fast path for ranks of one host.
//!
//! [`ShmTransport::all_reduce_bytes`] reads every rank's input straight
//! from the shared segment and reduces each slice once, in rank order; this
//! layer gives it types and an op. Results are bit-identical on every rank,
//! as with the message-passing algorithms.

use super::element::{finish, reduce_bytes, Element, ReduceOp};
use super::CollectiveError;
use crate::transport::shm::{Reduced, SharedBuffer, ShmTransport};
use crate::transport::Transport;

/// Reduces `buf` over all ranks of `t` with `op`, in place.
pub fn all_reduce_shm<E: Element>(
    t: &ShmTransport,
    buf: &mut [E],
    op: ReduceOp,
) -> Result<(), CollectiveError> {
    run(t, None, buf, op)
}

/// Reduces `input` over all ranks of `t` with `op` into `output`.
pub fn all_reduce_shm_into<E: Element>(
    t: &ShmTransport,
    input: &[E],
    output: &mut [E],
    op: ReduceOp,
) -> Result<(), CollectiveError> {
    run(t, Some(input), output, op)
}

fn run<E: Element>(
    t: &ShmTransport,
    input: Option<&[E]>,
    buf: &mut [E],
    op: ReduceOp,
) -> Result<(), CollectiveError> {
    let combine = combiner::<E>(op);
    let width = std::mem::size_of::<E>();
    match input {
        Some(input) => t.all_reduce_bytes_into(
            bytemuck::cast_slice(input),
            bytemuck::cast_slice_mut(buf),
            width,
            &combine,
        )?,
        None => t.all_reduce_bytes(bytemuck::cast_slice_mut(buf), width, &combine)?,
    }
    finish(buf, op, t.size());
    Ok(())
}

/// Reduces the ranks' registered buffers (`ShmTransport::shared_buffer`,
/// written in place by the caller) and leaves the result in shared memory:
/// no copy in, no copy out. `Avg` is refused: its division needs a buffer
/// of our own, use [`all_reduce_shm`].
pub fn all_reduce_shared<'a, E: Element>(
    buf: SharedBuffer<'a>,
    op: ReduceOp,
) -> Result<Reduced<'a>, CollectiveError> {
    if op == ReduceOp::Avg {
        return Err(CollectiveError::InvalidArgument(
            "Avg over a shared buffer: use all_reduce_shm, which divides in a private buffer"
                .into(),
        ));
    }
    Ok(buf.all_reduce(std::mem::size_of::<E>(), &combiner::<E>(op))?)
}

/// The byte-level reduction the shared-memory layer calls: `dst op= src`.
fn combiner<E: Element>(op: ReduceOp) -> impl Fn(&mut [u8], &[u8]) {
    move |dst: &mut [u8], src: &[u8]| match bytemuck::try_cast_slice_mut::<u8, E>(dst) {
        Ok(typed) => reduce_bytes(typed, None, src, op),
        // The segment's slices are 64-byte aligned, so this is the rare
        // path of a caller's odd buffer: reduce through an aligned copy.
        Err(_) => {
            let mut typed: Vec<E> = dst
                .chunks_exact(std::mem::size_of::<E>())
                .map(bytemuck::pod_read_unaligned)
                .collect();
            reduce_bytes(&mut typed, None, src, op);
            dst.copy_from_slice(bytemuck::cast_slice(&typed));
        }
    }
}
