//! Tiny training jobs run end to end, and their metrics.

use std::path::{Path, PathBuf};

use super::{job_file, stderr, stdout, swarmrun};

/// A tiny training job in `dir/NAME.toml` writing to `dir/NAME/`, with
/// extra TOML appended.
pub fn train_job(dir: &Path, name: &str, stages: usize, windows: u64, extra: &str) -> PathBuf {
    sized_train_job(dir, name, stages, 6, windows, extra)
}

/// Stage 1 with 3 of the 4 blocks, about three times stage 0's work, so
/// rebalancing has a reason to move miners there. Such jobs time passes
/// with the model clock (`[faults] clock = "model"`): whether and when a
/// miner moves then follows the job file, never a busy host's noise.
pub const HEAVY_STAGE_1: usize = 0;

/// [`train_job`] with `ranks` ranks (an orchestrator, a validator, miners);
/// `stages` == [`HEAVY_STAGE_1`] means 2 stages of 1 and 3 blocks, timed
/// by the model clock.
pub fn sized_train_job(
    dir: &Path,
    name: &str,
    stages: usize,
    ranks: usize,
    windows: u64,
    extra: &str,
) -> PathBuf {
    let (split, clock) = match stages {
        HEAVY_STAGE_1 => (
            "stages = 2\nlayers = [1, 3]".to_string(),
            "[faults]\nclock = \"model\"\n\n",
        ),
        n => (format!("stages = {n}"), ""),
    };
    let run_dir = dir.join(name);
    job_file(
        dir,
        &format!("{name}.toml"),
        &format!(
            "[job]\nname = \"t\"\ntask = \"train\"\nseed = 3\nrun_dir = {run_dir:?}\n\n\
             [model]\nn_layer = 4\nn_head = 2\nn_embd = 32\nblock_size = 16\n\n\
             [pipeline]\n{split}\nmicrobatch_size = 4\nmicrobatches_per_window = 6\n\n\
             [roles]\nvalidators = 1\n\n\
             [[site]]\nname = \"local\"\nhosts = \"localhost\"\nranks_per_host = {ranks}\n\n\
             [network]\nrendezvous = \"tcp://127.0.0.1:0\"\n\n{clock}\
             [train]\nwindows = {windows}\nlr = 5e-3\nwarmup_windows = 2\neval_every = 5\neval_microbatches = 2\n\
             {extra}"
        ),
    )
}

/// Runs a job to success and returns its metrics.jsonl lines.
pub fn run(job: &Path) -> (Vec<String>, String) {
    let out = swarmrun().arg("launch").arg(job).output().unwrap();
    let (text, err) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "{text}\n{err}");
    (metrics_of(job), err)
}

/// The metrics.jsonl lines of `job`'s run directory (`job` without `.toml`).
pub fn metrics_of(job: &Path) -> Vec<String> {
    let metrics = std::fs::read_to_string(job.with_extension("").join("metrics.jsonl")).unwrap();
    metrics.lines().map(str::to_string).collect()
}

/// The value of `"field":` in a metrics line, as written.
pub fn field<'a>(line: &'a str, field: &str) -> &'a str {
    let key = format!("\"{field}\":");
    let rest = &line[line
        .find(&key)
        .unwrap_or_else(|| panic!("{field} in {line}"))
        + key.len()..];
    &rest[..rest.find([',', '}']).unwrap()]
}

/// Each window's loss and validation loss as written: runs that must agree
/// bit for bit compare these.
pub fn losses(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| format!("{} {}", field(l, "loss"), field(l, "val_loss")))
        .collect()
}
