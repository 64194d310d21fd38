//! Pipeline scheduling: which miners serve which microbatches.
//!
//! [`routing`] holds the orchestrator's decisions as plain data (SWARM's
//! stochastic wiring, rebalancing, re-queueing lost work); the stage
//! workers that act on them come with the training loop.

pub mod routing;

pub use routing::{InFlight, Miner, Move, Router, RouterState};
