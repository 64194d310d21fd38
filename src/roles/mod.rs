//! What ranks do in a training job: the orchestrator routes and collects,
//! miners compute their stage, validators observe.

pub mod schedule;
pub mod train;

pub use train::{mine, observe, orchestrate, TrainError, WindowReport};
