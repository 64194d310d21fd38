//! Barrier by dissemination (Hensgen, Finkel and Manber): in round k every
//! rank signals rank + 2^k and waits for rank - 2^k. After ceil(log2 n)
//! rounds each rank has heard, directly or not, from every other, with no
//! root to become a hot spot — the same pattern MPICH and NCCL-less MPI
//! barriers use.

use crate::transport::{Transport, TransportError};

/// Returns once every rank of `t` has entered the barrier with the same `tag`.
pub fn barrier<T: Transport + ?Sized>(t: &T, tag: u64) -> Result<(), TransportError> {
    let (rank, size) = (t.rank(), t.size());
    let mut distance = 1;
    while distance < size {
        t.send((rank + distance) % size, tag, &[])?;
        t.recv((rank + size - distance) % size, tag)?;
        distance *= 2;
    }
    Ok(())
}
