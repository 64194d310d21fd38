//! `swarmrun bench train [--job JOB] [--windows N]`: training speed of a
//! job's model in one process and as the job's pipeline, and the model
//! FLOP/s each reaches as a fraction of this machine's matmul FLOP/s, all
//! measured in one run.
//!
//! Each measurement runs where its thread settings are its own, because
//! candle fixes its elementwise pool at first use (see [`super::matmul`]):
//! 1. matmul FLOP/s of square and of the model's shapes, with every core
//!    in this process, and with one thread in a child started with
//!    `RAYON_NUM_THREADS=1`;
//! 2. one process: a child trains the whole model as one stage with
//!    [`LocalPipeline`], a step being one window's microbatches (run
//!    concurrently), `N` timed steps after [`ONE_PROCESS_WARMUP`];
//! 3. the pipeline: `swarmrun launch` of a copy of the job file that runs
//!    `N` + [`PIPELINE_WARMUP`] windows without evaluation, timed from its
//!    `metrics.jsonl` over the last `N` windows;
//! 4. model FLOP/s: [`StageModel::flops_per_token`] of the whole model x
//!    tokens/s;
//! 5. CPU per token, which on a host whose cores the ranks share says
//!    where the pipeline's time goes: getrusage of the one-process child
//!    over its timed steps, and of every rank of the pipeline (the CPU line
//!    each prints as it ends) less that of a one-window run of the same
//!    job, by role.
//!
//! The children are this executable again (`swarmrun bench train --part
//! ...`), as the other benchmarks start theirs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Instant;

use serde::Deserialize;
use thiserror::Error;
use toml::{Table, Value};

use super::matmul::{self, Gemm};
use super::record::Tables;
use super::{child_stdout, ChildError};
use crate::config::{self, ConfigError, JobSpec, Plan, PlanError, Role, Task};
use crate::data::{Batch, Corpus, DataError, Dataset, Split};
use crate::launch::usage::{cpu_of, own_cpu};
use crate::model::{AdamWConfig, GptConfig, LocalPipeline, ModelError, StageModel};

#[derive(Debug, Error)]
pub enum BenchTrainError {
    #[error("bench train measures a training job (task = \"train\"); {} is not one", .0.display())]
    NotTrain(PathBuf),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("matmul: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Child(#[from] ChildError),
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot find this executable: {0}")]
    Exe(std::io::Error),
    #[error("job file as a TOML table: {0}")]
    JobTable(#[from] toml::de::Error),
    #[error("writing the benchmark's job file: {0}")]
    JobText(#[from] toml::ser::Error),
    #[error("`{0}` in the job file is not a table")]
    NotATable(String),
    #[error("{what} printed {output:?}, not {want} numbers")]
    Figures {
        what: String,
        output: String,
        want: usize,
    },
    #[error("{}: {source}", path.display())]
    Metrics { path: PathBuf, source: MetricsError },
}

/// Why a pipeline run's `metrics.jsonl` gives no speed.
#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("line {line}: {source}")]
    Line {
        line: usize,
        source: serde_json::Error,
    },
    #[error("{got} windows, expected more than the {skip} warm-up ones")]
    TooFewWindows { got: usize, skip: usize },
    #[error("no time passed between window {from} and the last")]
    NoTime { from: usize },
}

/// One-process steps before timing: the first allocates candle's buffers
/// and starts rayon's threads, the second runs as every later one does.
pub const ONE_PROCESS_WARMUP: u64 = 2;

/// Pipeline windows before timing: besides start-up, the first windows
/// include connection set-up and the first all-reduces.
pub const PIPELINE_WARMUP: u64 = 3;

/// The environment variable that sizes candle's elementwise pool.
const CANDLE_THREADS: &str = "CANDLE_NUM_THREADS";

/// A measurement run in a child process (the hidden `--part` option); it
/// prints its figures as one line of numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// FLOP/s of every shape measured, in the order `run` prints them.
    Matmul,
    /// Tokens/s of the whole model trained in this process, and its CPU
    /// seconds per token over the timed steps.
    OneProcess,
}

impl Part {
    fn as_str(self) -> &'static str {
        match self {
            Part::Matmul => "matmul",
            Part::OneProcess => "one-process",
        }
    }
}

impl FromStr for Part {
    type Err = String;

    fn from_str(s: &str) -> Result<Part, String> {
        [Part::Matmul, Part::OneProcess]
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not matmul or one-process"))
    }
}

/// The job's model as the benchmark sees it.
struct Model {
    config: GptConfig,
    data: Dataset,
    /// Parameters that multiply activations: see
    /// [`StageModel::matmul_params`].
    matmul_params: usize,
    flops_per_token: f64,
}

impl Model {
    fn of(spec: &JobSpec) -> Result<Model, BenchTrainError> {
        let data = Dataset::new(&Corpus::embedded()?)?;
        let config = GptConfig::for_job(spec, data.tokenizer().vocab_size())?;
        let whole = StageModel::new(&config, &[config.n_layer], 0, spec.job.seed)?;
        Ok(Model {
            matmul_params: whole.matmul_params(),
            flops_per_token: whole.flops_per_token(),
            config,
            data,
        })
    }
}

/// The shapes whose FLOP/s are measured: the squares, where gemm reaches
/// its peak, and the model's own forward products (a microbatch's tokens
/// times each weight matrix).
fn gemms(config: &GptConfig, microbatch_size: usize) -> Vec<Gemm> {
    let (rows, c) = (microbatch_size * config.block_size, config.n_embd);
    let mut all = matmul::squares();
    all.extend([
        Gemm::new("attn qkv", rows, c, 3 * c),
        Gemm::new("attn proj", rows, c, c),
        Gemm::new("mlp fc", rows, c, 4 * c),
        Gemm::new("mlp proj", rows, 4 * c, c),
        Gemm::new("lm head", rows, c, config.vocab_size),
    ]);
    all
}

/// FLOP/s of each shape, measured in this process.
fn matmul_rates(shapes: &[Gemm]) -> Result<Vec<f64>, candle_core::Error> {
    shapes.iter().map(matmul::flops_per_s).collect()
}

/// Training tokens in one window (one optimizer step).
fn tokens_per_window(spec: &JobSpec) -> f64 {
    (spec.pipeline.microbatches_per_window * spec.pipeline.microbatch_size * spec.model.block_size)
        as f64
}

/// Runs the whole benchmark for the job in `job` (already loaded as
/// `spec`) and prints its table.
pub fn run(
    spec: &JobSpec,
    job: &Path,
    (windows, rounds): (u32, u32),
    tables: &mut Tables,
) -> Result<(), BenchTrainError> {
    if spec.job.task != Task::Train {
        return Err(BenchTrainError::NotTrain(job.to_path_buf()));
    }
    let exe = std::env::current_exe().map_err(BenchTrainError::Exe)?;
    let model = Model::of(spec)?;
    let c = &model.config;
    println!(
        "# swarmrun bench train: {}: {} layers, {} wide, block {}, {} microbatches of {} a step; \
         {windows} steps timed after warm-up",
        job.display(),
        c.n_layer,
        c.n_embd,
        c.block_size,
        spec.pipeline.microbatches_per_window,
        spec.pipeline.microbatch_size
    );

    let (peak, peak_one) =
        matmul_peaks(&exe, job, windows, &gemms(c, spec.pipeline.microbatch_size))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "# machine: {cores} cores; matmul f32 peak {:.1} GFLOP/s (all threads: {}), {:.1} GFLOP/s (1 thread)",
        peak / 1e9,
        candle_core::utils::get_num_threads(),
        peak_one / 1e9
    );
    let per_token = model.flops_per_token;
    println!(
        "# model: {} parameters in matmuls (all but the embeddings), {:.2} MFLOP per token",
        model.matmul_params,
        per_token / 1e6
    );

    let mut measured = Vec::new();
    let mut torch_missing = false;
    // At least one round, whatever a caller asks.
    for _ in 0..rounds.max(1) {
        // As launch does for ranks: candle's spinning elementwise pool only
        // slows concurrent microbatches down. The user's own setting wins.
        let mut cmd = part_command(&exe, job, windows, Part::OneProcess);
        if std::env::var_os(CANDLE_THREADS).is_none() {
            cmd.env(CANDLE_THREADS, "1");
        }
        let one = figures(cmd, Part::OneProcess, 2)?;
        let torch = if torch_missing {
            None
        } else {
            pytorch(spec, c, windows, cores)
                .inspect_err(|why| {
                    println!("# PyTorch reference: none measured ({why})");
                    torch_missing = true;
                })
                .ok()
        };
        measured.push(Round {
            one_process: one[0],
            one_cpu_per_token: one[1],
            torch,
            pipeline: pipeline(&exe, spec, job, windows)?,
        });
    }
    let Round {
        one_process,
        one_cpu_per_token,
        torch,
        pipeline:
            PipelineRun {
                tokens_per_s: pipeline,
                plan,
                cpu_by_rank,
            },
    } = median_round(measured, tables);

    println!(
        "#  {:<24} {:>5} {:>10} {:>14} {:>8}",
        "setup", "ranks", "tokens/s", "model GFLOP/s", "of peak"
    );
    tables.start(
        format!(
            "{}: {} layers, {} wide, block {}, {} microbatches of {} a step; matmul f32 peak \
             {:.1} GFLOP/s on {cores} cores",
            job.display(),
            c.n_layer,
            c.n_embd,
            c.block_size,
            spec.pipeline.microbatches_per_window,
            spec.pipeline.microbatch_size,
            peak / 1e9
        ),
        &[
            "setup",
            "ranks",
            "tokens_per_s",
            "model_gflops",
            "of_peak_pct",
        ],
    );
    let reference = torch.map(|t| (format!("PyTorch {cores} threads"), 1, t));
    let ours = [
        ("one process".to_string(), 1, one_process),
        (pipeline_label(&plan), plan.ranks.len(), pipeline),
    ];
    for (setup, ranks, tokens_per_s) in reference.into_iter().chain(ours) {
        let flops = tokens_per_s * per_token;
        println!(
            "   {setup:<24} {ranks:>5} {tokens_per_s:>10.0} {:>14.2} {:>7.1}%",
            flops / 1e9,
            100.0 * flops / peak
        );
        tables.row(vec![
            setup.into(),
            ranks.into(),
            tokens_per_s.into(),
            (flops / 1e9).into(),
            (100.0 * flops / peak).into(),
        ]);
    }
    let mut ratio = |what: &str, r: f64| {
        println!("   {what:<24} {:>5} {r:>9.2}x", "");
        tables.row(vec![what.into(), serde_json::Value::Null, r.into()]);
    };
    if let Some(t) = torch {
        ratio("one process / PyTorch", one_process / t);
    }
    ratio("pipeline / one process", pipeline / one_process);
    // The one-window run taken off leaves the others.
    let pipeline_tokens =
        tokens_per_window(spec) * (f64::from(windows) + PIPELINE_WARMUP as f64 - 1.0);
    println!(
        "#  CPU ms per 1k tokens: one process {:.1} (its timed steps); {}",
        one_cpu_per_token * 1e6,
        cpu_by_role(&plan, &cpu_by_rank, pipeline_tokens)
    );
    Ok(())
}

/// One round of the measurements: one process, PyTorch (when there is a
/// reference), the pipeline, back to back.
struct Round {
    one_process: f64,
    one_cpu_per_token: f64,
    torch: Option<f64>,
    pipeline: PipelineRun,
}

impl Round {
    fn ratio(&self) -> f64 {
        self.pipeline.tokens_per_s / self.one_process
    }
}

/// With several rounds, the round whose pipeline / one process ratio is
/// the median (the lower of the middle two for an even count), after a
/// line with every round's figures. Whole rounds, not each setup's median:
/// a host that slows down for a while slows every setup of a round alike,
/// so a round's rows are the ones that belong together.
fn median_round(rounds: Vec<Round>, tables: &mut Tables) -> Round {
    if rounds.len() > 1 {
        tables.start(
            "every round, back to back".to_string(),
            &["round", "one_process", "pipeline", "pipeline_over_one"],
        );
        for (i, r) in rounds.iter().enumerate() {
            tables.row(vec![
                (i + 1).into(),
                r.one_process.into(),
                r.pipeline.tokens_per_s.into(),
                r.ratio().into(),
            ]);
        }
        let each: Vec<String> = rounds
            .iter()
            .map(|r| {
                format!(
                    "{:.0} / {:.0} = {:.2}x",
                    r.pipeline.tokens_per_s,
                    r.one_process,
                    r.ratio()
                )
            })
            .collect();
        println!(
            "# rounds, pipeline / one process tokens/s: {}; the table is the median round's",
            each.join(", ")
        );
    }
    super::lower_median_by(rounds, Round::ratio).expect("run measures at least one round")
}

/// The pipeline's CPU per 1k tokens in all and by role, from each rank's
/// CPU over `tokens` (the warm-up windows included, where connections and
/// buffers are still new: a little high beside the one-process figure).
fn cpu_by_role(plan: &Plan, cpu_by_rank: &[(usize, f64)], tokens: f64) -> String {
    let ms = |s: f64| s / tokens * 1e6;
    let of = |want: fn(&Role) -> bool| -> f64 {
        cpu_by_rank
            .iter()
            .filter(|(r, _)| plan.ranks.get(*r).is_some_and(|p| want(&p.role)))
            .map(|(_, s)| s)
            .sum()
    };
    let total: f64 = cpu_by_rank.iter().map(|(_, s)| s).sum();
    format!(
        "pipeline {:.1} (its windows but the first): miners {:.1}, validators {:.1}, \
         orchestrator {:.1} ({} of {} ranks said)",
        ms(total),
        ms(of(|r| matches!(r, Role::Miner { .. }))),
        ms(of(|r| matches!(r, Role::Validator))),
        ms(of(|r| matches!(r, Role::Orchestrator))),
        cpu_by_rank.len(),
        plan.ranks.len()
    )
}

/// The reference script (`benches/torch_train.py`), carried in the binary
/// so the bench runs wherever the binary is.
const TORCH_SCRIPT: &str = include_str!("../../benches/torch_train.py");

/// PyTorch's tokens/s training the job's model the way the one-process
/// row does, on `threads` threads, or why there is none: `python3` (or
/// `SWARMRUN_PYTHON`) must import `torch`.
fn pytorch(spec: &JobSpec, c: &GptConfig, steps: u32, threads: usize) -> Result<f64, String> {
    let python = std::env::var("SWARMRUN_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import torch"])
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if !probe.status.success() {
        return Err(format!(
            "{python} cannot import torch; pip install torch to compare"
        ));
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let script = dir.path().join("torch_train.py");
    std::fs::write(&script, TORCH_SCRIPT).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&python);
    // torch warns on stderr when NumPy is missing; the figure is the same.
    cmd.arg(&script).env("PYTHONWARNINGS", "ignore");
    for (flag, value) in [
        ("--vocab", c.vocab_size),
        ("--n-layer", c.n_layer),
        ("--n-head", c.n_head),
        ("--n-embd", c.n_embd),
        ("--block", c.block_size),
        ("--microbatch", spec.pipeline.microbatch_size),
        ("--microbatches", spec.pipeline.microbatches_per_window),
        ("--steps", steps as usize),
        ("--threads", threads),
    ] {
        cmd.arg(flag).arg(value.to_string());
    }
    let out = child_stdout(cmd, "the PyTorch reference").map_err(|e| e.to_string())?;
    out.lines()
        .find_map(|l| l.strip_prefix("tokens_per_s ")?.trim().parse().ok())
        .ok_or_else(|| format!("the PyTorch reference printed {out:?}"))
}

/// Measures every shape with all threads in this process and with one
/// thread in a child, prints both, and returns the best of each: the peaks.
fn matmul_peaks(
    exe: &Path,
    job: &Path,
    windows: u32,
    shapes: &[Gemm],
) -> Result<(f64, f64), BenchTrainError> {
    let all_threads = matmul_rates(shapes)?;
    let mut cmd = part_command(exe, job, windows, Part::Matmul);
    cmd.env("RAYON_NUM_THREADS", "1").env(CANDLE_THREADS, "1");
    let one_thread = figures(cmd, Part::Matmul, shapes.len())?;
    println!(
        "#   {:<14} {:>6} {:>6} {:>6} {:>12} {:>10}  (GFLOP/s)",
        "matmul f32", "m", "k", "n", "all threads", "1 thread"
    );
    for ((g, all), one) in shapes.iter().zip(&all_threads).zip(&one_thread) {
        println!(
            "#   {:<14} {:>6} {:>6} {:>6} {:>12.1} {:>10.1}",
            g.label,
            g.m,
            g.k,
            g.n,
            all / 1e9,
            one / 1e9
        );
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    Ok((best(&all_threads), best(&one_thread)))
}

/// Runs one measurement in this process and prints its figures as one
/// line of numbers, for [`run`] to read.
pub fn run_part(part: Part, spec: &JobSpec, windows: u32) -> Result<(), BenchTrainError> {
    let model = Model::of(spec)?;
    let figures = match part {
        Part::Matmul => matmul_rates(&gemms(&model.config, spec.pipeline.microbatch_size))?,
        Part::OneProcess => {
            let (tokens_per_s, cpu_per_token) = one_process(spec, &model, windows)?;
            vec![tokens_per_s, cpu_per_token]
        }
    };
    let line: Vec<String> = figures.iter().map(f64::to_string).collect();
    println!("{}", line.join(" "));
    Ok(())
}

/// This executable asked to run `part` of the benchmark of `job`.
fn part_command(exe: &Path, job: &Path, windows: u32, part: Part) -> Command {
    let mut cmd = Command::new(exe);
    cmd.args(["bench", "train", "--job"])
        .arg(job)
        .arg("--windows")
        .arg(windows.to_string())
        .args(["--part", part.as_str()]);
    cmd
}

/// The `want` numbers a `part` child prints.
fn figures(cmd: Command, part: Part, want: usize) -> Result<Vec<f64>, BenchTrainError> {
    let what = format!("bench train --part {}", part.as_str());
    let output = child_stdout(cmd, &what)?;
    output
        .split_whitespace()
        .map(f64::from_str)
        .collect::<Result<Vec<_>, _>>()
        .ok()
        .filter(|v| v.len() == want)
        .ok_or(BenchTrainError::Figures { what, output, want })
}

/// Tokens/s of the whole model trained as one stage in this process, and
/// the CPU seconds it spent per token meanwhile (getrusage: every thread).
/// AdamW's settings are the defaults: they change no step's cost.
fn one_process(spec: &JobSpec, model: &Model, windows: u32) -> Result<(f64, f64), BenchTrainError> {
    let mut trainer = LocalPipeline::new(
        &model.config,
        &[model.config.n_layer],
        spec.job.seed,
        &AdamWConfig::default(),
    )?;
    for step in 0..ONE_PROCESS_WARMUP {
        trainer.train_step(&step_batches(spec, model, step)?)?;
    }
    let cpu = || own_cpu().map_or(0.0, |(user, system)| user + system);
    let (start, cpu_start) = (Instant::now(), cpu());
    for step in ONE_PROCESS_WARMUP..ONE_PROCESS_WARMUP + u64::from(windows) {
        trainer.train_step(&step_batches(spec, model, step)?)?;
    }
    let tokens = tokens_per_window(spec) * f64::from(windows);
    Ok((
        tokens / start.elapsed().as_secs_f64(),
        (cpu() - cpu_start) / tokens,
    ))
}

/// The microbatches the pipeline trains on in window `step`: the same ids,
/// so the same tokens.
fn step_batches(spec: &JobSpec, model: &Model, step: u64) -> Result<Vec<Batch>, DataError> {
    let per_window = spec.pipeline.microbatches_per_window as u64;
    (0..per_window)
        .map(|i| {
            model.data.batch(
                Split::Train,
                step * per_window + i,
                spec.job.seed,
                spec.pipeline.microbatch_size,
                model.config.block_size,
            )
        })
        .collect()
}

/// What the pipeline row measures: tokens/s over the windows after the
/// warm-up, the plan, and each rank's CPU seconds over those windows and
/// the warm-up ones (a one-window run's taken off: start-up, connections,
/// the last checkpoint).
struct PipelineRun {
    tokens_per_s: f64,
    plan: Plan,
    cpu_by_rank: Vec<(usize, f64)>,
}

/// Runs the job itself, `swarmrun launch`, for the bench's windows and
/// for one window.
fn pipeline(
    exe: &Path,
    spec: &JobSpec,
    job: &Path,
    windows: u32,
) -> Result<PipelineRun, BenchTrainError> {
    let full = launched(exe, job, u64::from(windows) + PIPELINE_WARMUP)?;
    let start_up = launched(exe, job, 1)?;
    let tokens_per_s = tokens_per_s_after(
        &full.metrics,
        PIPELINE_WARMUP as usize,
        tokens_per_window(spec),
    )
    .map_err(|source| BenchTrainError::Metrics {
        path: full.metrics_path.clone(),
        source,
    })?;
    // A rank that said nothing in either run is left out (and the CPU
    // line counts the ranks that said both), not taken as 0 s.
    let cpu_by_rank = full
        .cpu_by_rank
        .iter()
        .filter_map(|&(rank, cpu)| {
            let before = start_up.cpu_by_rank.iter().find(|(r, _)| *r == rank)?;
            Some((rank, cpu - before.1))
        })
        .collect();
    Ok(PipelineRun {
        tokens_per_s,
        plan: full.plan,
        cpu_by_rank,
    })
}

/// One run of the job through `swarmrun launch`.
struct Launched {
    plan: Plan,
    metrics: String,
    metrics_path: PathBuf,
    /// The CPU seconds each rank said it used.
    cpu_by_rank: Vec<(usize, f64)>,
}

/// The job in `job` run for `windows` windows (see [`bench_job`]) in a
/// directory of its own.
fn launched(exe: &Path, job: &Path, windows: u64) -> Result<Launched, BenchTrainError> {
    let file = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BenchTrainError::File { path, source }
    };
    let dir = tempfile::tempdir().map_err(file(&std::env::temp_dir()))?;
    let run_dir = dir.path().join("run");
    let bench_job_path = dir.path().join("bench-train.toml");
    let text = std::fs::read_to_string(job).map_err(file(job))?;
    let text = bench_job(&text, &run_dir, windows)?;
    let plan = config::parse(&text, &bench_job_path)?.plan(None)?;
    std::fs::write(&bench_job_path, text).map_err(file(&bench_job_path))?;

    let mut cmd = Command::new(exe);
    cmd.arg("launch").arg(&bench_job_path);
    let out = child_stdout(cmd, "swarmrun launch (the pipeline)")?;
    let metrics_path = run_dir.join("metrics.jsonl");
    let metrics = std::fs::read_to_string(&metrics_path).map_err(file(&metrics_path))?;
    Ok(Launched {
        plan,
        metrics,
        metrics_path,
        cpu_by_rank: out.lines().filter_map(cpu_of).collect(),
    })
}

/// The job file `text` changed to run `windows` windows without evaluation
/// or checkpoints into `run_dir`; every other key is kept (comments are not: the copy is
/// for `swarmrun launch`, not for people).
fn bench_job(text: &str, run_dir: &Path, windows: u64) -> Result<String, BenchTrainError> {
    let mut job: Table = text.parse()?;
    let count = |n: u64| Value::Integer(i64::try_from(n).unwrap_or(i64::MAX));
    set(
        &mut job,
        "job",
        "run_dir",
        Value::String(run_dir.display().to_string()),
    )?;
    set(&mut job, "train", "windows", count(windows))?;
    // The last window always evaluates, so no validation microbatches at
    // all, and no evaluation window before it.
    set(&mut job, "train", "eval_microbatches", count(0))?;
    set(&mut job, "train", "eval_every", count(windows + 1))?;
    set(&mut job, "train", "checkpoint_every", count(0))?;
    Ok(toml::to_string(&job)?)
}

fn set(job: &mut Table, section: &str, key: &str, value: Value) -> Result<(), BenchTrainError> {
    job.entry(section)
        .or_insert_with(|| Value::Table(Table::new()))
        .as_table_mut()
        .ok_or_else(|| BenchTrainError::NotATable(section.to_string()))?
        .insert(key.to_string(), value);
    Ok(())
}

/// One line of `metrics.jsonl`, as far as the benchmark reads it.
#[derive(Debug, Deserialize)]
struct WindowLine {
    /// Seconds from the start of training to the end of this window.
    elapsed_s: f64,
}

/// Tokens/s over the windows after the first `skip` in a run's
/// `metrics.jsonl`: their tokens over the time from the end of window
/// `skip - 1` to the end of the last.
fn tokens_per_s_after(
    metrics: &str,
    skip: usize,
    tokens_per_window: f64,
) -> Result<f64, MetricsError> {
    let ends = metrics
        .lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str::<WindowLine>(l)
                .map(|w| w.elapsed_s)
                .map_err(|source| MetricsError::Line {
                    line: i + 1,
                    source,
                })
        })
        .collect::<Result<Vec<f64>, _>>()?;
    let (Some(&last), true) = (ends.last(), ends.len() > skip) else {
        return Err(MetricsError::TooFewWindows {
            got: ends.len(),
            skip,
        });
    };
    let start = skip.checked_sub(1).map_or(0.0, |i| ends[i]);
    let secs = last - start;
    if secs <= 0.0 {
        return Err(MetricsError::NoTime { from: skip });
    }
    Ok((ends.len() - skip) as f64 * tokens_per_window / secs)
}

/// The pipeline row's name: stages and miners per stage.
fn pipeline_label(plan: &Plan) -> String {
    let miners = plan
        .ranks
        .iter()
        .filter(|r| matches!(r.role, Role::Miner { .. }))
        .count();
    let stages = format!(
        "{} stage{}",
        plan.stages,
        if plan.stages == 1 { "" } else { "s" }
    );
    if miners % plan.stages == 0 {
        format!("{stages} x {} miners", miners / plan.stages)
    } else {
        format!("{stages}, {miners} miners")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_job_keeps_other_keys_and_turns_evaluation_off() {
        let text = "# a comment\n[job]\nname = \"q\"\ntask = \"train\"\nseed = 7\n\n\
                    [[site]]\nname = \"local\"\nhosts = \"localhost\"\nranks_per_host = 4\n\n\
                    [train]\nwindows = 600\nlr = 2e-3\neval_every = 50\neval_microbatches = 8\n";
        let run_dir = Path::new("/tmp/somewhere/run");
        let out = bench_job(text, run_dir, 33).unwrap();
        let spec = config::parse(&out, Path::new("bench.toml")).unwrap();
        assert_eq!(spec.job.seed, 7);
        assert_eq!(spec.train.lr, 2e-3);
        assert_eq!(spec.sites[0].ranks_per_host, 4);
        assert_eq!(spec.job.run_dir.as_deref(), Some(run_dir));
        assert_eq!(spec.train.windows, 33);
        assert_eq!(spec.train.eval_microbatches, 0);
        assert!(spec.train.eval_every > spec.train.windows);
        assert_eq!(spec.train.checkpoint_every, 0);
    }

    #[test]
    fn the_bench_job_adds_a_missing_train_table() {
        let text = "[job]\nname = \"q\"\ntask = \"train\"\n\n\
                    [[site]]\nname = \"local\"\nhosts = \"localhost\"\n";
        let out = bench_job(text, Path::new("run"), 5).unwrap();
        let spec = config::parse(&out, Path::new("bench.toml")).unwrap();
        assert_eq!(spec.train.windows, 5);
    }

    fn metrics(elapsed: &[f64]) -> String {
        elapsed
            .iter()
            .enumerate()
            .map(|(w, e)| {
                format!(
                    "{{\"window\":{w},\"step\":{},\"loss\":4.0,\"val_loss\":null,\
                     \"tokens_per_s\":1.0,\"elapsed_s\":{e}}}\n",
                    w + 1
                )
            })
            .collect()
    }

    #[test]
    fn pipeline_speed_counts_only_the_windows_after_the_warm_up() {
        // Slow warm-up windows (ending at 5, 6, 7 s), then 2 windows of 1 s.
        let text = metrics(&[5.0, 6.0, 7.0, 8.0, 9.0]);
        assert_eq!(tokens_per_s_after(&text, 3, 100.0).unwrap(), 100.0);
    }

    #[test]
    fn pipeline_speed_needs_a_window_after_the_warm_up() {
        let text = metrics(&[1.0, 2.0, 3.0]);
        assert!(matches!(
            tokens_per_s_after(&text, 3, 100.0),
            Err(MetricsError::TooFewWindows { got: 3, skip: 3 })
        ));
    }

    #[test]
    fn a_malformed_metrics_line_is_named_by_its_number() {
        let text = format!("{}not json\n", metrics(&[1.0]));
        assert!(matches!(
            tokens_per_s_after(&text, 0, 1.0),
            Err(MetricsError::Line { line: 2, .. })
        ));
    }

    #[test]
    fn parts_parse_from_their_names() {
        for part in [Part::Matmul, Part::OneProcess] {
            assert_eq!(part.as_str().parse::<Part>(), Ok(part));
        }
        assert!("both".parse::<Part>().is_err());
    }
}
