//! `swarmrun bench ...`: measurements printed as tables, ours beside a
//! reference measured in the same run (these machines are shared and noisy,
//! so only same-run ratios mean anything).

pub mod allreduce;
pub mod compress;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod launch;
pub mod matmul;
pub mod record;
pub mod sched;
pub mod train;
pub mod trust;
pub mod wan;

use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use thiserror::Error;

/// The median of some durations (`Duration::ZERO` for none).
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// The item whose `key` is the median, the lower of the middle two for an
/// even count (`None` for none): for rounds of a benchmark, where the
/// item is a whole round's figures and the key its headline number.
pub fn lower_median_by<T>(mut items: Vec<T>, key: impl Fn(&T) -> f64) -> Option<T> {
    items.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let middle = items.len().checked_sub(1)? / 2;
    Some(items.swap_remove(middle))
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

/// A benchmark's child process that did not run to a clean end.
#[derive(Debug, Error)]
pub enum ChildError {
    #[error("cannot start {what}: {source}")]
    Start {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} failed ({status}); its last lines:\n{tail}")]
    Failed {
        what: String,
        status: ExitStatus,
        tail: String,
    },
}

/// Lines of a failed child's output kept for its error: the reason is
/// nearly always among the last ones.
const TAIL_LINES: usize = 30;

/// Runs `cmd` to its end with stdin closed and its output captured, and
/// returns its stdout; when it fails, the error carries the last lines of
/// its stdout and stderr.
pub fn child_stdout(mut cmd: Command, what: &str) -> Result<String, ChildError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ChildError::Start {
            what: what.to_string(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stdout.lines().chain(stderr.lines()).collect();
    Err(ChildError::Failed {
        what: what.to_string(),
        status: out.status,
        tail: lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n"),
    })
}
