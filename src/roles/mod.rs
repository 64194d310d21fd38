//! What ranks do in a training job: the orchestrator routes and collects,
//! miners compute their stage, validators observe.

mod miner;
mod orchestrator;
pub mod protocol;
pub mod train;

pub use miner::mine;
pub use orchestrator::{orchestrate, StartPoint};
pub use train::{observe, TrainError, WindowLine, WindowReport};
