//! NCCL between the GPUs of one site (`[[site]] fabric = "nccl"`): the
//! slices of a stage's redundant all-reduce move through NCCL on device
//! buffers ([`NcclMover`], a [`SliceMover`]), while the digests of the
//! copies, their comparison and the blame stay on the site's TCP transport.
//!
//! Only fixed-point (`i64`) sums go through NCCL: integer addition is
//! exact, so NCCL's own order of summing (rings, trees) gives the bits our
//! rank-order reduction gives, every copy of a slice agrees, and validators
//! recompute slices exactly as for TCP.
//!
//! A peer that dies inside an NCCL call would leave the others waiting on
//! the GPU: every call's work is polled until the call's deadline, and then
//! the communicator is aborted and the call fails as a lost peer would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::CudaSlice;
use cudarc::nccl::{result as nccl, Comm, Id, ReduceOp as NcclOp};

use super::{Gpu, GpuError};
use crate::collective::SliceMover;
use crate::collective::{broadcast, slice_holders, Call, CollectiveError, Partition, ReduceOp};
use crate::transport::Transport;

/// An NCCL communicator among one stage's miners of a site, on this rank's
/// GPU, and the outer ranks it was made for (a new set of miners needs a
/// new one).
pub struct NcclMover {
    gpu: Arc<Gpu>,
    comm: Comm,
    members: Vec<usize>,
}

impl NcclMover {
    /// A communicator among `c`'s ranks (`members`, as the caller numbers
    /// them): the call's rank 0 makes NCCL's unique id and broadcasts it
    /// over the call's transport; every rank then joins. All ranks of `c`
    /// must call this together.
    pub fn connect<T: Transport + ?Sized>(
        gpu: Arc<Gpu>,
        c: Call<'_, T>,
        members: Vec<usize>,
    ) -> Result<NcclMover, GpuError> {
        // SAFETY: only tries to dlopen libnccl under its usual names.
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(GpuError::NoNccl);
        }
        let (rank, size) = (c.rank(), c.size());
        // NCCL's 128-byte id, carried as 16 words (collectives move words).
        let mut words = [0i64; 16];
        if rank == 0 {
            let made = Id::new().map_err(nccl_error)?;
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
            for (b, &i) in bytes.iter_mut().zip(made.internal()) {
                *b = i as u8;
            }
        }
        broadcast(c, &mut words, 0)?;
        // NCCL joins the calling thread's current device.
        gpu.stream.context().bind_to_thread()?;
        let bytes: &[u8] = bytemuck::cast_slice(&words);
        let mut id = [0 as core::ffi::c_char; 128];
        for (i, &b) in id.iter_mut().zip(bytes) {
            *i = b as core::ffi::c_char;
        }
        let id = Id::uninit(id);
        let comm = Comm::from_rank(gpu.stream.clone(), rank, size, id).map_err(nccl_error)?;
        Ok(NcclMover { gpu, comm, members })
    }

    /// The outer ranks this communicator joins.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// Waits for the stream's work until the call's deadline (none: the
    /// transport's default timeout from now); past it the call fails as a
    /// lost peer would, and the caller must drop this mover.
    fn wait<T: Transport + ?Sized>(&self, c: &Call<'_, T>) -> Result<(), CollectiveError> {
        let deadline = c
            .deadline
            .unwrap_or_else(|| Instant::now() + c.transport.default_timeout());
        let event = self.gpu.stream.record_event(None).map_err(driver_error)?;
        while !event.try_is_complete().map_err(driver_error)? {
            if Instant::now() >= deadline {
                // NCCL names no culprit; the next rank after this one is
                // blamed, so the job redoes the window, as for a timeout.
                // The caller drops this mover, which aborts the
                // communicator and its kernels.
                return Err(CollectiveError::PeerLost {
                    rank: c.outer((c.rank() + 1) % c.size()),
                });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }
}

impl SliceMover<i64> for NcclMover {
    fn reduce_held<T: Transport + ?Sized>(
        &mut self,
        c: &Call<'_, T>,
        data: &[i64],
        (part, copies, op): (&Partition, usize, ReduceOp),
        held: &[usize],
    ) -> Result<Vec<Vec<i64>>, CollectiveError> {
        if op != ReduceOp::Sum {
            return Err(CollectiveError::InvalidArgument(format!(
                "NCCL moves only exact sums, not {op:?}"
            )));
        }
        let (rank, n) = (c.rank(), c.size());
        let gpu = &self.gpu;
        gpu.stream
            .context()
            .bind_to_thread()
            .map_err(driver_error)?;
        let device = gpu.upload_slice(data).map_err(into_collective)?;
        let mut recv: Vec<CudaSlice<i64>> = held
            .iter()
            .map(|&j| gpu.stream.alloc_zeros::<i64>(part.range(j).len()))
            .collect::<Result<_, _>>()
            .map_err(driver_error)?;
        nccl::group_start().map_err(|e| nccl_error(e).into_collective())?;
        // Every rank enqueues every slice's reduce to each of its holders,
        // in the same order; a holder gives its copy's buffer.
        let mut enqueued = Ok(());
        'slices: for j in 0..n {
            for root in slice_holders(j, n, copies) {
                let send = device.slice(part.range(j));
                let dst = match root == rank {
                    true => held.iter().position(|&h| h == j).map(|i| &mut recv[i]),
                    false => None,
                };
                if let Err(e) = self.comm.reduce(&send, dst, &NcclOp::Sum, root as i32) {
                    enqueued = Err(e);
                    break 'slices;
                }
            }
        }
        let ended = nccl::group_end();
        enqueued
            .and(ended.map(|_| ()))
            .map_err(|e| nccl_error(e).into_collective())?;
        self.wait(c)?;
        recv.iter()
            .map(|r| gpu.stream.clone_dtoh(r).map_err(driver_error))
            .collect()
    }

    fn all_gather<T: Transport + ?Sized>(
        &mut self,
        c: &Call<'_, T>,
        buf: &mut [i64],
        part: &Partition,
    ) -> Result<(), CollectiveError> {
        let gpu = &self.gpu;
        gpu.stream
            .context()
            .bind_to_thread()
            .map_err(driver_error)?;
        let mut device = gpu.upload_slice(buf).map_err(into_collective)?;
        nccl::group_start().map_err(|e| nccl_error(e).into_collective())?;
        let mut enqueued = Ok(());
        for j in 0..c.size() {
            let mut slice = device.slice_mut(part.range(j));
            if let Err(e) = self.comm.broadcast_in_place(&mut slice, j as i32) {
                enqueued = Err(e);
                break;
            }
        }
        let ended = nccl::group_end();
        enqueued
            .and(ended.map(|_| ()))
            .map_err(|e| nccl_error(e).into_collective())?;
        self.wait(c)?;
        gpu.stream.memcpy_dtoh(&device, buf).map_err(driver_error)
    }
}

fn nccl_error(e: nccl::NcclError) -> GpuError {
    GpuError::Nccl(format!("{e:?}"))
}

fn driver_error(e: cudarc::driver::DriverError) -> CollectiveError {
    into_collective(e.into())
}

fn into_collective(e: GpuError) -> CollectiveError {
    e.into_collective()
}

impl GpuError {
    /// A GPU failure inside a collective: this rank's own, which its peers
    /// see as its loss.
    fn into_collective(self) -> CollectiveError {
        CollectiveError::InvalidArgument(format!("GPU: {self}"))
    }
}
