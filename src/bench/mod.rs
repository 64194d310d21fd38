//! `swarmrun bench ...`: measurements printed as tables, ours beside a
//! reference measured in the same run (these machines are shared and noisy,
//! so only same-run ratios mean anything).

pub mod allreduce;
pub mod launch;

use std::time::Duration;

/// The median of some durations (`Duration::ZERO` for none).
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Whether this process runs as root (mpirun then needs --allow-run-as-root).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
