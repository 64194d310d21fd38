//! `swarmrun bench trust`: real training jobs (a tiny model, 2 stages of 4
//! miners, under `swarmrun launch`) with one cheating miner each (two
//! colluders for `collude`), and what
//! the validators made of it: how often and how fast the cheater was
//! caught, whether an honest miner ever was, what the replays cost against
//! the miners' compute, and how far the ledger's reward shares are from
//! the truth (a cheater earns nothing; honest miners share by passes).
//!
//! The model is tiny so that many windows fit in a benchmark; the code
//! paths are the training job's: receipts, audits, replays, exclusion and
//! the ledger are the same at any model size.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use thiserror::Error;

use super::record::Tables;
use crate::config::{self, ConfigError};
use crate::ledger::{self, LedgerError, WindowRecord};
use crate::roles::cheat::Cheater;

/// Kinds of cheat measured, as `[[faults.cheat]] kind` spells them, each
/// with the window it starts cheating in (`from_window`: honest before,
/// a clean record first).
const KINDS: [(&str, u64); 13] = [
    ("random_grad", 0),
    ("guess_unaudited", 0),
    ("skip_compute", 0),
    ("replay_stale", 0),
    ("scale_update", 0),
    ("flip_grad", 0),
    ("flip_sketch", 0),
    ("scale_contribution", 0),
    ("nudge_contribution", 0),
    ("collude", 0),
    ("forge_checkpoint", 0),
    ("forge_gather", 0),
    ("random_grad", LATE),
];

/// The window a late cheater starts cheating in.
const LATE: u64 = 2;

/// Ranks 0 and 1 are the orchestrator and the validator; 8 miners follow.
const VALIDATOR: usize = 1;
const MINERS: std::ops::Range<usize> = 2..10;
/// Pipeline stages of the benchmark's job.
const STAGES: u64 = 2;

/// Detection counts within this many windows.
const WITHIN: u64 = 3;

/// How many windows past those asked for a run may go on, so that a cheat
/// that strikes late still has [`WITHIN`] windows to be caught in.
const HORIZON: u64 = 60;

/// What `swarmrun bench trust` runs (its command-line options).
#[derive(Debug, Clone, clap::Args)]
pub struct TrustOptions {
    /// Windows of each cheating run.
    #[arg(long, default_value_t = 5)]
    pub windows: u64,
    /// Runs per kind of cheat, each with another seed and cheating rank.
    #[arg(long, default_value_t = 4)]
    pub seeds: u64,
    /// Microbatches per window.
    #[arg(long, default_value_t = 128)]
    pub microbatches: u64,
    /// Share of passes validators replay (`[roles] replay_rate`).
    #[arg(long, default_value_t = 0.05)]
    pub rate: f64,
    /// Share of all-reduce slices validators recompute (`[roles]
    /// slice_audit_rate`).
    #[arg(long, default_value_t = 1.0)]
    pub slice_rate: f64,
    /// Gradient chunks of each recomputed slice in which contributions are
    /// checked against their passes (`[roles] contribution_chunks`).
    #[arg(long, default_value_t = crate::config::RolesSpec::default().contribution_chunks)]
    pub chunks: usize,
    /// Chance the cheater cheats on each microbatch (in each window, for a
    /// once-a-window cheat such as `nudge_contribution`).
    #[arg(long, default_value_t = 1.0)]
    pub probability: f64,
    /// Windows of the run without cheaters, for false positives (0: no
    /// such run).
    #[arg(long, default_value_t = 1000)]
    pub honest_windows: u64,
    /// Only these kinds of cheat (comma-separated; default: every kind).
    #[arg(long, value_delimiter = ',')]
    pub kinds: Vec<String>,
}

#[derive(Debug, Error)]
pub enum BenchTrustError {
    #[error("no cheat kind {0:?} in the bench (see --help)")]
    UnknownKind(String),
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("swarmrun launch {job} failed: {stderr}")]
    Launch { job: String, stderr: String },
    #[error("{}: line {line}: {source}", path.display())]
    Metrics {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// What the benchmark reads from each metrics line.
#[derive(Debug, Deserialize)]
struct Line {
    window: u64,
    trained: u64,
    replayed: u64,
    caught: Vec<usize>,
}

/// The cheaters of one run: one rank, or for `collude` two miners of one
/// stage that reduce a slice together.
#[derive(Debug, Clone)]
struct Cheat<'a> {
    ranks: Vec<usize>,
    kind: &'a str,
    /// Honest before this window.
    from_window: u64,
    /// The first window it cheats in (see [`Cheater::first_window`]), if
    /// any: windows to catch count from there.
    first: Option<u64>,
}

impl<'a> Cheat<'a> {
    /// The cheat of run `seed` of `kind`, from `from_window` on: its rank
    /// moves with the seed.
    fn of((kind, from_window): (&'a str, u64), seed: u64) -> Self {
        let rank = MINERS.start + (seed as usize * 3) % MINERS.len();
        let ranks = match kind {
            // Stages take alternate ranks, so rank ± 2 is the next miner
            // of the same stage: with 2 copies of 4 slices they hold one.
            "collude" if rank + 2 < MINERS.end => vec![rank, rank + 2],
            "collude" => vec![rank, rank - 2],
            // The lowest miner of a stage writes its checkpoints.
            "forge_checkpoint" => vec![MINERS.start + seed as usize % 2],
            _ => vec![rank],
        };
        Cheat {
            ranks,
            kind,
            from_window,
            first: None,
        }
    }

    /// The same cheat, knowing the first window it cheats in within the
    /// longest run the bench would make for it: its draws are its job's
    /// (seed, probability), so the job file tells.
    fn with_first_window(mut self, opts: &TrustOptions, seed: u64) -> Result<Self, ConfigError> {
        let end = opts.windows + self.from_window + HORIZON;
        let text = job_text(Path::new("run"), opts, seed, end, Some(&self));
        let spec = config::parse(&text, Path::new("bench-trust.toml"))?;
        self.first = self
            .ranks
            .iter()
            .filter_map(|&rank| Cheater::new(&spec, rank)?.first_window(end))
            .min();
        Ok(self)
    }

    /// Windows of its run: those asked for (after its honest ones), or
    /// more, so that it has [`WITHIN`] windows to be caught in after it
    /// first cheats.
    fn windows(&self, asked: u64) -> u64 {
        let asked = asked + self.from_window;
        self.first.map_or(asked, |first| asked.max(first + WITHIN))
    }

    /// Its row's name: the kind, and when it starts if not at once.
    fn label(&self) -> String {
        match self.from_window {
            0 => self.kind.to_string(),
            w => format!("{} @w{w}", self.kind),
        }
    }

    /// Whether its runs write checkpoints (every window): only a forger
    /// needs them.
    fn checkpoints(&self) -> bool {
        self.kind == "forge_checkpoint"
    }
}

/// One run's findings.
#[derive(Debug, Default)]
struct Outcome {
    /// Whether the cheater cheated at all.
    cheated: bool,
    /// The window a cheater was first caught in, counted from the first
    /// it cheats in, if it was caught.
    caught_in: Option<u64>,
    /// Honest miners caught.
    false_positives: usize,
    /// CPU seconds of the validator and of all miners, as each rank stated
    /// it at its end (`launch::usage`).
    validator_cpu_s: f64,
    miners_cpu_s: f64,
    /// Passes replayed, and passes trained (all attempts: a pass trained
    /// again after a cheater's exclusion counts again).
    replayed: u64,
    passes: u64,
    /// Largest |share - true share| of any miner in any window.
    window_error: f64,
    /// Largest |mean share - mean true share| of any miner over the run:
    /// what it was paid against what it earned.
    run_error: f64,
}

pub fn run(opts: &TrustOptions, tables: &mut Tables) -> Result<(), BenchTrustError> {
    let exe = std::env::current_exe().map_err(|source| BenchTrustError::File {
        path: PathBuf::from("swarmrun"),
        source,
    })?;
    let tmp = tempfile::tempdir().map_err(|source| BenchTrustError::File {
        path: std::env::temp_dir(),
        source,
    })?;
    let setup = format!(
        "2 stages x 4 miners, {} microbatches a window, replay_rate {}, slice_audit_rate {}, \
         contribution_chunks {}, slice_copies 2, cheat probability {}, {} runs x {} windows per kind \
         (or until {WITHIN} past the cheater's first cheating window)",
        opts.microbatches,
        opts.rate,
        opts.slice_rate,
        opts.chunks,
        opts.probability,
        opts.seeds,
        opts.windows
    );
    println!("# swarmrun bench trust: {setup}");
    println!(
        "{:<18} {:>7} {:>8} {:>16} {:>10} {:>10} {:>15} {:>13} {:>10}",
        "cheat",
        "cheated",
        "recall",
        "windows to catch",
        "honest hit",
        "replayed %",
        "validator CPU %",
        "share err/win",
        "share err"
    );
    tables.start(
        setup,
        &[
            "cheat",
            "runs_cheated",
            "recall_pct",
            "mean_windows_to_catch",
            "honest_hit",
            "replayed_pct",
            "validator_cpu_pct",
            "share_err_per_window_pct",
            "share_err_pct",
        ],
    );
    let asked = |kind: &str| opts.kinds.is_empty() || opts.kinds.iter().any(|k| k == kind);
    if let Some(unknown) = opts
        .kinds
        .iter()
        .find(|k| !KINDS.iter().any(|(n, _)| n == k))
    {
        return Err(BenchTrustError::UnknownKind(unknown.clone()));
    }
    for (row, kind) in KINDS.into_iter().enumerate().filter(|(_, k)| asked(k.0)) {
        let mut outcomes = Vec::new();
        let mut label = String::new();
        for seed in 1..=opts.seeds {
            let dir = tmp.path().join(format!("{row}-{seed}"));
            let cheat = Cheat::of(kind, seed).with_first_window(opts, seed)?;
            label = cheat.label();
            let windows = cheat.windows(opts.windows);
            outcomes.push(run_one(&exe, &dir, opts, seed, windows, Some(&cheat))?);
        }
        let caught: Vec<u64> = outcomes.iter().filter_map(|o| o.caught_in).collect();
        let within = caught.iter().filter(|w| **w < WITHIN).count();
        let mean = (!caught.is_empty())
            .then(|| caught.iter().map(|w| (w + 1) as f64).sum::<f64>() / caught.len() as f64);
        let windows = match (mean, caught.iter().map(|w| w + 1).max()) {
            (Some(mean), Some(max)) => format!("{mean:.2} / {max}"),
            _ => "-".to_string(),
        };
        // Runs whose cheater never cheated are no misses.
        let cheated = outcomes.iter().filter(|o| o.cheated).count();
        let recall = (cheated > 0).then(|| 100.0 * within as f64 / cheated as f64);
        let recall_text = recall.map_or("-".to_string(), |r| format!("{r:.1}%"));
        let hits = outcomes.iter().map(|o| o.false_positives).sum::<usize>();
        let (replayed, share) = (share_replayed(&outcomes), share_of_compute(&outcomes));
        let window_error = 100.0 * outcomes.iter().map(|o| o.window_error).fold(0.0, f64::max);
        let run_error = 100.0 * outcomes.iter().map(|o| o.run_error).fold(0.0, f64::max);
        println!(
            "{label:<18} {cheated:>7} {recall_text:>8} {windows:>16} {hits:>10} {replayed:>9.2}% {share:>14.2}% {window_error:>12.2}% {run_error:>9.2}%",
        );
        tables.row(vec![
            label.into(),
            cheated.into(),
            recall.into(),
            mean.into(),
            hits.into(),
            replayed.into(),
            share.into(),
            window_error.into(),
            run_error.into(),
        ]);
    }
    if opts.honest_windows == 0 {
        return Ok(());
    }
    let honest = run_one(
        &exe,
        &tmp.path().join("honest"),
        opts,
        0,
        opts.honest_windows,
        None,
    )?;
    let label = format!("none ({}w)", opts.honest_windows);
    let honest_only = std::slice::from_ref(&honest);
    let (replayed, share) = (share_replayed(honest_only), share_of_compute(honest_only));
    println!(
        "{:<18} {:>7} {:>8} {:>16} {:>10} {:>9.2}% {:>14.2}% {:>12.2}% {:>9.2}%",
        label,
        "-",
        "-",
        "-",
        honest.false_positives,
        replayed,
        share,
        100.0 * honest.window_error,
        100.0 * honest.run_error,
    );
    tables.row(vec![
        label.into(),
        serde_json::Value::Null,
        serde_json::Value::Null,
        serde_json::Value::Null,
        honest.false_positives.into(),
        replayed.into(),
        share.into(),
        (100.0 * honest.window_error).into(),
        (100.0 * honest.run_error).into(),
    ]);
    Ok(())
}

/// Passes replayed over passes trained, in percent: what validators spend
/// on replays in compute, a replay being its pass again, whatever the
/// host's load did to either's wall time.
fn share_replayed(outcomes: &[Outcome]) -> f64 {
    let replayed: u64 = outcomes.iter().map(|o| o.replayed).sum();
    let passes: u64 = outcomes.iter().map(|o| o.passes).sum();
    100.0 * replayed as f64 / passes.max(1) as f64
}

/// The validator's CPU over the miners', in percent: all it spends
/// (replays, slice and contribution checks, receiving what they need)
/// against all they spend (passes, the all-reduce, their reports). CPU,
/// not wall time: a pass that shares its core takes longer than its
/// compute, and checks on a pool as wide as the host take less.
fn share_of_compute(outcomes: &[Outcome]) -> f64 {
    let validator: f64 = outcomes.iter().map(|o| o.validator_cpu_s).sum();
    let miners: f64 = outcomes.iter().map(|o| o.miners_cpu_s).sum();
    100.0 * validator / miners.max(f64::MIN_POSITIVE)
}

/// Runs one job in `dir` and reads its metrics and ledger.
fn run_one(
    exe: &Path,
    dir: &Path,
    opts: &TrustOptions,
    seed: u64,
    windows: u64,
    cheat: Option<&Cheat>,
) -> Result<Outcome, BenchTrustError> {
    let file = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BenchTrustError::File { path, source }
    };
    std::fs::create_dir_all(dir).map_err(file(dir))?;
    let run_dir = dir.join("run");
    let job = dir.join("job.toml");
    let text = job_text(&run_dir, opts, seed, windows, cheat);
    std::fs::write(&job, text).map_err(file(&job))?;
    // Info is the level of the ranks' CPU lines.
    let out = Command::new(exe)
        .arg("launch")
        .arg(&job)
        .env("RUST_LOG", "info")
        .output()
        .map_err(file(exe))?;
    if !out.status.success() {
        return Err(BenchTrustError::Launch {
            job: job.display().to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let metrics = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).map_err(file(&metrics))?;
    let mut outcome = Outcome::default();
    let said = [&out.stdout, &out.stderr].map(|s| String::from_utf8_lossy(s).into_owned());
    for (rank, seconds) in said
        .iter()
        .flat_map(|s| s.lines())
        .filter_map(crate::launch::usage::cpu_of)
    {
        match rank {
            VALIDATOR => outcome.validator_cpu_s += seconds,
            r if MINERS.contains(&r) => outcome.miners_cpu_s += seconds,
            _ => {}
        }
    }
    for (i, l) in text.lines().enumerate() {
        let line: Line = serde_json::from_str(l).map_err(|source| BenchTrustError::Metrics {
            path: metrics.clone(),
            line: i + 1,
            source,
        })?;
        outcome.replayed += line.replayed;
        outcome.passes += line.trained;
        for rank in line.caught {
            let first = cheat
                .filter(|c| c.ranks.contains(&rank))
                .and_then(|c| c.first);
            match first {
                // Caught before it cheated: a false positive.
                Some(first) if line.window >= first => {
                    outcome.caught_in.get_or_insert(line.window - first);
                }
                _ => outcome.false_positives += 1,
            }
        }
    }
    let chain = ledger::read(&run_dir)?;
    // One that never cheated earned its share.
    let cheaters = cheat.filter(|c| c.first.is_some());
    outcome.cheated = cheaters.is_some();
    let cheaters = cheaters.map_or(&[][..], |c| &c.ranks);
    (outcome.window_error, outcome.run_error) =
        share_errors(&ledger::settled(&chain.records), cheaters);
    Ok(outcome)
}

/// The ledger's settled shares (see [`ledger::settled`]) against the true
/// ones (nothing for cheaters, the rest split by passes credited): the
/// largest difference of any miner in any window, and of any miner's mean
/// over the run.
fn share_errors(records: &[WindowRecord], cheaters: &[usize]) -> (f64, f64) {
    let mut worst = 0.0f64;
    let mut paid_minus_earned: std::collections::BTreeMap<usize, f64> = Default::default();
    for record in records {
        let honest = |rank: usize| !cheaters.contains(&rank);
        let total: u64 = record
            .miners
            .iter()
            .filter(|m| honest(m.rank))
            .map(|m| m.verified)
            .sum();
        for m in &record.miners {
            let truth = match (honest(m.rank), total) {
                (true, t) if t > 0 => m.verified as f64 / t as f64,
                _ => 0.0,
            };
            worst = worst.max((m.share - truth).abs());
            *paid_minus_earned.entry(m.rank).or_default() += m.share - truth;
        }
    }
    let windows = records.len().max(1) as f64;
    let run = paid_minus_earned
        .values()
        .map(|d| d.abs() / windows)
        .fold(0.0, f64::max);
    (worst, run)
}

fn job_text(
    run_dir: &Path,
    opts: &TrustOptions,
    seed: u64,
    windows: u64,
    cheat: Option<&Cheat>,
) -> String {
    let mut text = format!(
        "[job]\nname = \"bench-trust\"\ntask = \"train\"\nseed = {seed}\nrun_dir = {run_dir:?}\n\n\
         [model]\nn_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 16\n\n\
         [pipeline]\nstages = {STAGES}\nmicrobatch_size = 2\nmicrobatches_per_window = {}\n\n\
         [roles]\nvalidators = 1\nreplay_rate = {}\nslice_audit_rate = {}\ncontribution_chunks = {}\n\n\
         [[site]]\nname = \"local\"\nhosts = \"localhost\"\nranks_per_host = {}\n\n\
         [network]\nrendezvous = \"tcp://127.0.0.1:0\"\n\n\
         [train]\nwindows = {windows}\neval_every = {}\neval_microbatches = 0\ncheckpoint_every = {}\n",
        opts.microbatches,
        opts.rate,
        opts.slice_rate,
        opts.chunks,
        MINERS.end,
        windows + 1,
        u64::from(cheat.is_some_and(Cheat::checkpoints)),
    );
    if let Some(c) = cheat {
        for rank in &c.ranks {
            text += &format!(
                "\n[[faults.cheat]]\nrank = {rank}\nkind = \"{}\"\nprobability = {}\n\
                 from_window = {}\n",
                c.kind, opts.probability, c.from_window
            );
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(probability: f64) -> TrustOptions {
        TrustOptions {
            windows: 5,
            seeds: 20,
            microbatches: 8,
            rate: 0.05,
            slice_rate: 1.0,
            chunks: 2,
            probability,
            honest_windows: 0,
            kinds: Vec::new(),
        }
    }

    fn cheat(kind: (&str, u64), probability: f64, seed: u64) -> Cheat<'_> {
        Cheat::of(kind, seed)
            .with_first_window(&options(probability), seed)
            .expect("the bench's job file parses")
    }

    #[test]
    fn a_once_a_window_cheat_runs_until_three_windows_past_its_first_strike() {
        let runs: Vec<Cheat> = (1..=20)
            .map(|seed| cheat(("nudge_contribution", 0), 0.1, seed))
            .collect();
        // At 0.1 a window some strike at once, some after the 5 asked for.
        let at_once = runs.iter().find(|c| c.first == Some(0)).expect("one");
        assert_eq!(at_once.windows(5), 5);
        let late = runs
            .iter()
            .find(|c| c.first.is_some_and(|f| f + WITHIN > 5))
            .expect("one strikes late");
        assert_eq!(late.windows(5), late.first.unwrap() + WITHIN);
        // One that never strikes runs the windows asked for.
        let never = cheat(("nudge_contribution", 0), 0.0, 1);
        assert_eq!((never.first, never.windows(5)), (None, 5));
        // A cheat drawn pass by pass is judged from its first window.
        let late_passes = cheat(("random_grad", LATE), 0.1, 1);
        assert_eq!(late_passes.first, Some(LATE));
        assert_eq!(late_passes.windows(5), 5 + LATE);
    }
}
