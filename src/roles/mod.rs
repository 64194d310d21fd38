//! What ranks do in a training job: the orchestrator routes and collects,
//! miners compute their stage, validators replay sampled miner work.

mod audit;
pub mod cheat;
mod device;
mod handover;
mod leader;
mod liveness;
mod miner;
pub(crate) mod orchestrator;
pub mod protocol;
mod standby;
pub mod train;
mod validator;

pub use device::{SiteFabric, StageDevice};
pub use miner::{mine, mine_joined};
pub use orchestrator::{orchestrate, StartPoint};
pub use standby::{stand_by, Leading};
pub use train::{Member, MemberState, Progress, TrainError, WindowLine, WindowReport};
pub use validator::validate;
