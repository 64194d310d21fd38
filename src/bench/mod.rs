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

/// `mpirun -n N` on this host, ranks oversubscribed and unbound (they
/// share two cores with each other), with --allow-run-as-root when root.
pub fn mpirun(nprocs: usize) -> std::process::Command {
    let mut cmd = std::process::Command::new("mpirun");
    if nix::unistd::geteuid().is_root() {
        cmd.arg("--allow-run-as-root");
    }
    cmd.args(["--oversubscribe", "--bind-to", "none", "-n"])
        .arg(nprocs.to_string());
    cmd
}
