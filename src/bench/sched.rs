//! `swarmrun bench sched`: the orchestrator's decisions alone, for 10 to
//! 10,000 miners. Simulated ranks answer its orders at once
//! (`roles::orchestrator::sim`: no models, sockets or clocks), so what is
//! timed is the coordinator itself: routing every microbatch, the router's
//! rebalancing check, the audit and slice draws, judging the replies; and
//! apart, appending each window's ledger line (written and fsynced).
//!
//! The swarm is shaped like a real one as it grows: stages of at most 100
//! miners (2 stages up to 200 miners, then `miners / 100` stages), and 2
//! microbatches per miner and window.

use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::record::Tables;
use crate::config::{self, ConfigError};
use crate::ledger::{Ledger, LedgerError};
use crate::roles::orchestrator::sim::{Script, Sim};
use crate::roles::train::TrainError;

/// What `swarmrun bench sched` runs (its command-line options).
#[derive(Debug, Clone, clap::Args)]
pub struct SchedOptions {
    /// Miner counts, comma-separated.
    #[arg(long, default_value = "10,100,1000,10000", value_delimiter = ',')]
    pub miners: Vec<usize>,
    /// Windows timed per count.
    #[arg(long, default_value_t = 5)]
    pub windows: u64,
    /// Share of passes validators replay (`[roles] replay_rate`).
    #[arg(long, default_value_t = 0.05)]
    pub replay_rate: f64,
    /// Share of each stage's all-reduce slices validators recompute
    /// (`[roles] slice_audit_rate`).
    #[arg(long, default_value_t = 0.05)]
    pub slice_rate: f64,
}

#[derive(Debug, Error)]
pub enum SchedError {
    #[error("a simulated job: {0}")]
    Config(#[from] ConfigError),
    #[error("the orchestrator failed: {0}")]
    Train(#[from] TrainError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("a scratch directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0} miners: need at least 2, one per stage")]
    TooFew(usize),
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct SchedRow {
    pub miners: usize,
    pub stages: usize,
    pub microbatches: u64,
    /// Coordinator time per window and per microbatch.
    pub per_window: Duration,
    pub per_microbatch: Duration,
    /// Appending one ledger line (fsynced).
    pub ledger_per_window: Duration,
}

/// Stages for `miners`: 2, or stages of 100 miners.
fn stages_for(miners: usize) -> usize {
    (miners / 100).max(2)
}

/// The simulated job: every rank on one host, the orchestrator and one
/// validator first.
fn job_text(o: &SchedOptions, miners: usize, stages: usize, per_window: usize) -> String {
    format!(
        "[job]\nname = \"sched\"\ntask = \"train\"\nseed = 1\n\n\
         [model]\nn_layer = {stages}\nn_head = 1\nn_embd = 8\nblock_size = 8\n\n\
         [pipeline]\nstages = {stages}\nmicrobatch_size = 1\nmicrobatches_per_window = {per_window}\n\n\
         [roles]\nvalidators = 1\nreplay_rate = {}\nslice_audit_rate = {}\n\n\
         [[site]]\nname = \"sim\"\nhosts = \"localhost\"\nranks_per_host = {}\n\n\
         [train]\nwindows = {}\neval_microbatches = 0\ncheckpoint_every = 0\n",
        o.replay_rate,
        o.slice_rate,
        miners + 2,
        o.windows
    )
}

/// Times the coordinator with `miners` simulated miners.
pub fn measure(o: &SchedOptions, miners: usize) -> Result<SchedRow, SchedError> {
    if miners < 2 {
        return Err(SchedError::TooFew(miners));
    }
    let stages = stages_for(miners);
    let miners = miners / stages * stages;
    let per_window = 2 * miners / stages;
    let text = job_text(o, miners, stages, per_window);
    let spec = config::parse(&text, Path::new("sched.toml"))?;
    let (seen, result) = Sim::run(&spec, Script::default());
    result?;
    let dir = tempfile::tempdir()?;
    let mut ledger = Ledger::create(dir.path())?;
    let started = Instant::now();
    for (window, tallies) in &seen.ledger {
        ledger.append(*window, tallies)?;
    }
    let appending = started.elapsed();
    let windows = o.windows.max(1);
    let microbatches = windows * per_window as u64;
    Ok(SchedRow {
        miners,
        stages,
        microbatches: per_window as u64,
        per_window: seen.deciding / windows as u32,
        per_microbatch: seen.deciding / microbatches as u32,
        ledger_per_window: appending / windows as u32,
    })
}

/// Prints the table, one row per miner count.
pub fn run(o: &SchedOptions, tables: &mut Tables) -> Result<Vec<SchedRow>, SchedError> {
    println!(
        "{:>8} {:>7} {:>13} {:>16} {:>18} {:>16}",
        "miners",
        "stages",
        "microbatches",
        "ms per window",
        "us per microbatch",
        "ledger ms/window"
    );
    tables.start(
        "The orchestrator's decisions with simulated miners (no models)",
        &[
            "miners",
            "stages",
            "microbatches",
            "ms_per_window",
            "us_per_microbatch",
            "ledger_ms_per_window",
        ],
    );
    let mut rows = Vec::new();
    for &miners in &o.miners {
        let row = measure(o, miners)?;
        tables.row(vec![
            row.miners.into(),
            row.stages.into(),
            row.microbatches.into(),
            (row.per_window.as_secs_f64() * 1e3).into(),
            (row.per_microbatch.as_secs_f64() * 1e6).into(),
            (row.ledger_per_window.as_secs_f64() * 1e3).into(),
        ]);
        println!(
            "{:>8} {:>7} {:>13} {:>16.3} {:>18.2} {:>16.3}",
            row.miners,
            row.stages,
            row.microbatches,
            row.per_window.as_secs_f64() * 1e3,
            row.per_microbatch.as_secs_f64() * 1e6,
            row.ledger_per_window.as_secs_f64() * 1e3
        );
        rows.push(row);
    }
    Ok(rows)
}
