//! Collectives generic over [`Transport`](crate::transport::Transport), as
//! rsmpi's are generic over a communicator: a collective knows nothing of
//! models, and any transport (TCP, shared memory, MPI) runs every one.

mod barrier;

pub use barrier::barrier;
