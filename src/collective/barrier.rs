//! Barrier by dissemination (Hensgen, Finkel and Manber): in round k every
//! rank signals rank + 2^k and waits for rank - 2^k. After ceil(log2 n)
//! rounds each rank has heard, directly or not, from every other, with no
//! root to become a hot spot — the same pattern MPICH and NCCL-less MPI
//! barriers use.

use super::frame::{guarded, recv, send};
use super::{Call, CollectiveError};
use crate::transport::Transport;

/// Returns once every rank of the call's transport has entered the barrier
/// with the same tag.
pub fn barrier<T: Transport + ?Sized>(c: Call<'_, T>) -> Result<(), CollectiveError> {
    let (rank, size) = (c.rank(), c.size());
    guarded(&c, || {
        let mut distance = 1;
        while distance < size {
            send(&c, (rank + distance) % size, &[])?;
            recv(&c, (rank + size - distance) % size, 0)?;
            distance *= 2;
        }
        Ok(())
    })
}
