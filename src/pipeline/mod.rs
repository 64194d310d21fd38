//! Pipeline scheduling: which miners serve which microbatches.
//!
//! [`routing`] holds the orchestrator's decisions as plain data (SWARM's
//! stochastic wiring, rebalancing, re-queueing lost work); [`boundary`]
//! codes the tensors that cross between stages.

pub mod boundary;
pub mod routing;

pub use boundary::{BoundaryCodec, BoundaryError};
pub use routing::{InFlight, Miner, Move, Router, RouterState};
