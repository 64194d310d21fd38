//! The `swarmrun` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use swarmrun::bench::train::BenchTrainError;
use swarmrun::checkpoint::Checkpoints;
use swarmrun::config::{self, ConfigError, JobSpec, PlanError, Task};
use swarmrun::data::{Corpus, Tokenizer};
use swarmrun::launch::bind::{self, BindError, BindTo};
use swarmrun::launch::{self, JoinError, LaunchRequest, StartError};
use swarmrun::ledger;
use swarmrun::logging::LogFormat;
use swarmrun::model::SampleOptions;
use swarmrun::wire::JobKey;
use swarmrun::world::{Door, Membership};

/// Exit status for bad input (job files, environment), as in sysexits'
/// spirit and the contract: 2 means "you asked for something wrong".
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "swarmrun",
    version,
    about = "HPC-style launcher and collectives for training one model across many unreliable machines"
)]
struct Cli {
    /// Who reads the log: `text`, a person (lines as printed, tagged by the
    /// launcher), or `json`, a machine (one JSON object per event and per
    /// closed span, on stdout; ranks started by the launcher inherit it).
    /// RUST_LOG filters either, e.g. RUST_LOG=swarmrun=debug.
    #[arg(
        long,
        global = true,
        value_enum,
        env = swarmrun::logging::FORMAT_ENV,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start N ranks of a job on this host (like torchrun --standalone).
    Launch {
        /// Number of ranks; default: the job file's slot count.
        #[arg(short = 'n', long = "nprocs")]
        nprocs: Option<usize>,
        /// Restart the whole job up to K times when a rank fails.
        #[arg(long, default_value_t = 0)]
        max_restarts: u32,
        /// Seconds between SIGTERM and SIGKILL when stopping ranks.
        #[arg(long, default_value_t = 5.0)]
        grace_period: f64,
        /// Rendezvous endpoint, overriding the job file (tcp://host:port, file:///dir).
        #[arg(long)]
        rdzv: Option<String>,
        /// Continue a training job from the newest checkpoint in its run_dir.
        #[arg(long)]
        resume: bool,
        /// Bind each rank to CPUs, as mpirun's --bind-to: core (local rank
        /// modulo cores, hwloc's logical order), numa (round-robin over NUMA
        /// nodes) or none. core and numa need --features hwloc.
        #[arg(long, value_name = "none|core|numa", default_value = "none")]
        bind_to: BindTo,
        /// Each rank prints what it is bound to and the CPUs it may run on.
        #[arg(long)]
        report_bindings: bool,
        #[command(flatten)]
        limit: TimeLimit,
        job: PathBuf,
    },
    /// Run one rank; rank and size come from mpirun, srun, PMI(x) or RANK/WORLD_SIZE.
    Rank {
        /// Rendezvous endpoint, overriding the job file and SWARMRUN_RENDEZVOUS.
        #[arg(long)]
        rdzv: Option<String>,
        /// Continue a training job from the newest checkpoint in its run_dir
        /// (implied when a launcher restarts the job).
        #[arg(long)]
        resume: bool,
        /// Join the training job at --rdzv while it trains, as a miner: the
        /// job gives this rank its id and stage (launcher variables are
        /// ignored, so mpirun and srun can start joiners too).
        #[arg(long)]
        join: bool,
        /// The site a joining rank belongs to.
        #[arg(long, default_value = "joined", requires = "join")]
        site: String,
        job: PathBuf,
    },
    /// Join a training job while it trains: start N miners on this host
    /// that get their ranks and stages from the running job. SIGTERM or
    /// SIGINT, or --timeout running out, makes them leave at the next
    /// window boundary (a limit a little under a batch allocation's lets
    /// them go before the scheduler kills them).
    Join {
        /// Miners to start on this host.
        #[arg(short = 'n', long = "nprocs", default_value_t = 1)]
        nprocs: usize,
        /// The running job's rendezvous (rank 0 prints it), tcp://HOST:PORT.
        #[arg(long)]
        rdzv: String,
        /// The site these miners belong to (a cluster, a lab).
        #[arg(long, default_value = "joined")]
        site: String,
        /// Seconds between SIGTERM and SIGKILL when stopping ranks.
        #[arg(long, default_value_t = 60.0)]
        grace_period: f64,
        #[command(flatten)]
        limit: TimeLimit,
        job: PathBuf,
    },
    /// Validate a job file and print each rank's site, host, role and stage.
    Check {
        #[arg(short = 'n', long = "nprocs")]
        nprocs: Option<usize>,
        job: PathBuf,
    },
    /// Write a new random job key (hex) for authenticating ranks.
    Keygen {
        #[arg(default_value = "job.key")]
        path: PathBuf,
    },
    /// Draw a run's metrics as PNG charts: loss.png, throughput.png and,
    /// when it compressed its boundaries, compression.png.
    Plot {
        /// The run directory (holding metrics.jsonl).
        run_dir: PathBuf,
        /// Where to write the charts; the run directory if not given.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print text generated by a run's newest checkpoint.
    Sample {
        /// Characters to generate.
        #[arg(long, default_value_t = 500)]
        tokens: usize,
        /// Text to continue (printed first); empty starts from the
        /// vocabulary's first character, a newline for Shakespeare.
        #[arg(long, default_value = "")]
        prompt: String,
        /// Below 1 plays safe, above 1 takes risks; 0 always takes the
        /// most likely character.
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Draw among the K most likely characters only; 0 means all.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// The same seed gives the same text.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The job's run directory; checkpoints are in its checkpoints/.
        run_dir: PathBuf,
    },
    /// Verify a run's reward ledger (RUN_DIR/ledger.jsonl): check the hash
    /// chain and the leaders' signatures (against RUN_DIR/ledger-keys.json,
    /// and the keys given with --key), recompute every share, print each
    /// miner's standing.
    Audit {
        /// The job's run directory.
        run_dir: PathBuf,
        /// A leader's public key (hex) as it printed it when it started
        /// (`ledger: lines signed with key ...`); repeat for each leader.
        /// Every key in the run's book must be one of these.
        #[arg(long = "key", value_name = "HEX")]
        keys: Vec<String>,
        /// Refuse a line that no validator countersigned.
        #[arg(long)]
        countersigned: bool,
    },
    /// Benchmarks, printed as tables.
    Bench {
        /// Also write the tables, with this machine's facts (cores, CPU,
        /// memcpy bandwidth measured in the run), as JSON to FILE.
        #[arg(long, global = true, value_name = "FILE")]
        json: Option<PathBuf>,
        #[command(subcommand)]
        which: BenchCmd,
    },
    /// Two sites on this machine (network namespaces NAME-a at 10.77.0.1
    /// and NAME-b at 10.77.0.2) joined by an emulated wide-area link, for
    /// trying what crosses sites. Needs root, ip, tc and ethtool.
    Wan {
        #[command(subcommand)]
        which: WanCmd,
    },
}

#[derive(Subcommand)]
enum WanCmd {
    /// Create the sites and start the link.
    Up {
        /// At most 8 letters, digits or `-`.
        name: String,
        /// Bandwidth each way, as tc says it (100mbit, 1gbit); default uncapped.
        #[arg(long)]
        rate: Option<String>,
        /// Round trip the link adds, in milliseconds.
        #[arg(long, default_value_t = 0.0)]
        rtt_ms: f64,
        /// Each frame's one-way delay varies by up to this, in milliseconds.
        #[arg(long, default_value_t = 0.0)]
        jitter_ms: f64,
        /// Share of frames lost each way (0.01 = 1%).
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Stop the link and remove the sites.
    Down { name: String },
    /// The link itself (`up` starts it in namespace NAME-r): bridges two
    /// interfaces with delay, jitter and loss until killed.
    #[command(hide = true)]
    Bridge {
        a: String,
        b: String,
        #[arg(long)]
        delay_us: u64,
        #[arg(long)]
        jitter_us: u64,
        #[arg(long)]
        loss: f64,
        #[arg(long)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Rebuilds BENCHMARKS.md's tables and charts from the `--json` files
    /// of a suite run (`launch/bench.sh`).
    Report(ReportArgs),
    /// Time from start until all ranks are past rendezvous, beside mpirun.
    Launch {
        #[arg(short = 'n', long = "nprocs", default_value_t = 16)]
        nprocs: usize,
        /// Repetitions of each measurement.
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// nccl-tests-style all-reduce table per transport, beside memcpy.
    Allreduce {
        #[arg(short = 'n', long = "nprocs", default_value_t = 4)]
        nprocs: usize,
        /// Comma-separated: tcp, tcp-sealed (every frame sealed, as between hosts), shm, shm-registered, mpi (OpenMPI's MPI_Allreduce), mpi-tcp (the same over its TCP path only); the mpi ones need --features mpi.
        #[arg(long, default_value = "tcp", value_delimiter = ',')]
        transport: Vec<String>,
        /// Smallest message (1K, 64KiB, 4M...).
        #[arg(long, default_value = "1K", value_parser = parse_size_arg)]
        min: usize,
        /// Largest message.
        #[arg(long, default_value = "64M", value_parser = parse_size_arg)]
        max: usize,
        /// Timed calls per size, at least.
        #[arg(long, default_value_t = 20)]
        iters: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// More calls where --iters of them would take less than this
        /// (milliseconds per size): small messages are noisy on shared hosts.
        #[arg(long, default_value_t = 200)]
        min_time_ms: u64,
        /// auto, doubling, butterfly or ring.
        #[arg(long, default_value = "auto", value_parser = parse_algorithm)]
        algorithm: config::AllReduceChoice,
        /// Rounds: every transport measured this many times, taking turns;
        /// each size's row is its median-time round's. On a shared host
        /// more rounds steady the ratios between transports.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
    },
    /// Tokens/s of one process and of the job's pipeline, and model FLOP/s
    /// as a fraction of this machine's matmul FLOP/s, measured in one run.
    Train {
        /// The training job whose model and pipeline are measured.
        #[arg(long, default_value = "configs/quickstart.toml")]
        job: PathBuf,
        /// Steps (windows) timed in each setup, after warm-up.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
        windows: u32,
        /// Rounds of the measurements (one process, PyTorch, the pipeline,
        /// back to back); the table is the round whose pipeline / one
        /// process ratio is the median, after a line with every round's.
        /// On a shared host more rounds steady the ratio.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
        /// One measurement of the benchmark, run in its own process by the benchmark itself.
        #[arg(long, hide = true)]
        part: Option<swarmrun::bench::train::Part>,
        /// `cuda`: train the job's model on GPU 0 instead (feature `cuda`).
        #[arg(long, value_enum, default_value_t = swarmrun::config::Device::Cpu)]
        device: swarmrun::config::Device,
    },
    /// Training jobs with one cheating miner of each kind: how often and how
    /// fast validators catch it, honest miners flagged, replay cost against
    /// miner compute, and the ledger's reward-share error.
    Trust(swarmrun::bench::trust::TrustOptions),
    /// The orchestrator's decisions (routing, rebalancing, audit draws,
    /// ledger) with 10 to 10,000 simulated miners: time per microbatch and
    /// per window.
    Sched(swarmrun::bench::sched::SchedOptions),
    /// One training job across two sites joined by an emulated wide-area
    /// link (network namespaces; needs root): tokens/s with the boundary
    /// codec off, at 8x and at 128x, on the unshaped and the shaped link.
    Wan(swarmrun::bench::wan::WanOptions),
    /// Boundary codec (int8/int4, with and without zstd): encode and decode
    /// GB/s on one thread beside memcpy, reconstruction error, ratio.
    Compress {
        /// Tokens (rows) of the boundary tensor.
        #[arg(long, default_value_t = 4096)]
        rows: usize,
        /// Width of the boundary tensor (the bottleneck's code width).
        #[arg(long, default_value_t = 128)]
        width: usize,
        /// `cuda`: the codec's kernels on GPU 0, on data already there,
        /// beside a device-to-device copy (feature `cuda`).
        #[arg(long, value_enum, default_value_t = swarmrun::config::Device::Cpu)]
        device: swarmrun::config::Device,
    },
}

/// `swarmrun bench report`: BENCHMARKS.md from a suite run's `--json` files.
#[derive(clap::Args)]
struct ReportArgs {
    /// The directory of `bench --json` files (NAME.json fills the section
    /// between `<!-- bench NAME -->` and `<!-- /bench NAME -->`).
    dir: PathBuf,
    /// The document to update in place.
    #[arg(long, default_value = "BENCHMARKS.md")]
    into: PathBuf,
    /// Where charts go.
    #[arg(long, default_value = "docs/bench")]
    charts: PathBuf,
}

impl BenchCmd {
    /// The bench's name, as on the command line.
    fn name(&self) -> &'static str {
        match self {
            BenchCmd::Launch { .. } => "launch",
            BenchCmd::Allreduce { .. } => "allreduce",
            BenchCmd::Train { .. } => "train",
            BenchCmd::Trust(_) => "trust",
            BenchCmd::Sched(_) => "sched",
            BenchCmd::Wan(_) => "wan",
            BenchCmd::Compress { .. } => "compress",
            BenchCmd::Report(_) => "report",
        }
    }
}

fn parse_size_arg(s: &str) -> Result<usize, String> {
    config::parse_size(s)
        .map_err(|e| e.to_string())
        .and_then(|v| usize::try_from(v).map_err(|e| e.to_string()))
}

fn parse_algorithm(s: &str) -> Result<config::AllReduceChoice, String> {
    match s {
        "auto" => Ok(config::AllReduceChoice::Auto),
        "doubling" => Ok(config::AllReduceChoice::Doubling),
        "butterfly" => Ok(config::AllReduceChoice::Butterfly),
        "ring" => Ok(config::AllReduceChoice::Ring),
        other => Err(format!(
            "{other:?} is not auto, doubling, butterfly or ring"
        )),
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    // The ranks a launcher starts log as it does.
    std::env::set_var(swarmrun::logging::FORMAT_ENV, cli.log_format.name());
    if let Err(e) = swarmrun::logging::init(cli.log_format) {
        eprintln!("swarmrun: error: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    // Not fatal: a rank with few peers needs few descriptors, and one that
    // runs out says so (EMFILE) where it happens.
    if let Err(e) = swarmrun::launch::limits::raise_open_files() {
        tracing::debug!("swarmrun: cannot raise the limit on open files: {e}");
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => ExitCode::from(report(&e)),
    }
}

/// `--timeout` of `launch` and `join`.
#[derive(clap::Args, Debug)]
struct TimeLimit {
    /// Stop the ranks once they have run this many seconds, restarts
    /// included, as mpirun's --timeout: SIGTERM to every rank, SIGKILL
    /// after the grace period, exit status 124.
    #[arg(long, value_name = "SECONDS", env = "SWARMRUN_TIMEOUT", value_parser = positive_seconds)]
    timeout: Option<Duration>,
}

/// A time limit in seconds, fractions allowed; more than none.
fn positive_seconds(text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 => Ok(Duration::from_secs_f64(s)),
        _ => Err(format!("{text:?} is not a positive number of seconds")),
    }
}

/// Prints `e` and returns the status to exit with.
fn report(e: &anyhow::Error) -> u8 {
    tracing::error!("swarmrun: error: {}", message(e));
    if is_usage_error(e) {
        EXIT_USAGE
    } else {
        1
    }
}

/// The error and its causes joined by ": ", each cause left out when the
/// text before it already ends with it: most of our errors put their
/// source in their own message, so `{e:#}` would print it twice.
fn message(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.ends_with(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// Bad job files, plans and launch environments exit with status 2.
fn is_usage_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<ConfigError>()
            || c.is::<PlanError>()
            || matches!(
                c.downcast_ref::<JoinError>(),
                Some(JoinError::Detect(_) | JoinError::Plan(_) | JoinError::BadRendezvous { .. })
            )
            || c.downcast_ref::<BindError>().is_some_and(bind_usage)
            || matches!(c.downcast_ref::<StartError>(), Some(StartError::Bind(b)) if bind_usage(b))
            || matches!(c.downcast_ref::<JoinError>(), Some(JoinError::Bind(b)) if bind_usage(b))
            || matches!(
                c.downcast_ref::<StartError>(),
                Some(StartError::Plan(_) | StartError::SlurmUnderLaunch)
            )
            || matches!(
                c.downcast_ref::<BenchTrainError>(),
                Some(BenchTrainError::NotTrain(_))
            )
    })
}

/// A binding this build cannot do, or a misspelt SWARMRUN_BIND: the
/// user's to fix. (Errors wrapped `transparent` hide from `chain()`.)
fn bind_usage(e: &BindError) -> bool {
    matches!(e, BindError::NotBuilt(_) | BindError::BadEnv { .. })
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Launch {
            nprocs,
            max_restarts,
            grace_period,
            rdzv,
            resume,
            bind_to,
            report_bindings,
            limit,
            job,
        } => {
            let spec = config::load(&job)?;
            let outcome = launch::start(
                &spec,
                &LaunchRequest {
                    job_path: &job,
                    nprocs,
                    rdzv: rdzv.as_deref(),
                    max_restarts,
                    grace: Duration::from_secs_f64(grace_period.max(0.0)),
                    resume,
                    bind_to,
                    report_bindings,
                    timeout: limit.timeout,
                },
            )?;
            Ok(ExitCode::from(outcome.exit_code().clamp(0, 255) as u8))
        }
        Cmd::Rank {
            rdzv,
            resume,
            join,
            site,
            job,
        } => {
            let spec = config::load(&job)?;
            if join {
                run_joined_rank(&spec, rdzv.as_deref(), &site)?;
            } else {
                run_rank(&spec, &job, rdzv.as_deref(), resume)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Join {
            nprocs,
            rdzv,
            site,
            grace_period,
            limit,
            job,
        } => {
            let spec = config::load(&job)?;
            let outcome = launch::start_joiners(
                &spec,
                &launch::JoinRequest {
                    job_path: &job,
                    nprocs,
                    rdzv: &rdzv,
                    site: &site,
                    grace: Duration::from_secs_f64(grace_period.max(0.0)),
                    timeout: limit.timeout,
                },
            )?;
            Ok(ExitCode::from(outcome.exit_code().clamp(0, 255) as u8))
        }
        Cmd::Check { nprocs, job } => {
            let spec = config::load(&job)?;
            let plan = spec.plan(nprocs)?;
            print!("{}", plan.render());
            for device in plan.devices_without_validator(&spec) {
                println!(
                    "warning: no validator computes on {device}: passes of {device} miners go unreplayed"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Keygen { path } => {
            JobKey::generate()?
                .write_new(&path)
                .with_context(|| format!("writing job key {}", path.display()))?;
            println!(
                "wrote a new job key to {} (mode 0600); point the job file's network.key_file at it, \
                 or export SWARMRUN_JOB_KEY=$(cat {})",
                path.display(),
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Plot { run_dir, out } => {
            let out = out.unwrap_or_else(|| run_dir.clone());
            for path in swarmrun::plot::plot(&run_dir, &out)? {
                println!("wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Sample {
            tokens,
            prompt,
            temperature,
            top_k,
            seed,
            run_dir,
        } => {
            let opts = SampleOptions {
                tokens,
                temperature,
                top_k,
                seed,
            };
            sample(&run_dir, &prompt, &opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Audit {
            run_dir,
            keys,
            countersigned,
        } => {
            audit(&run_dir, &keys, countersigned)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Wan { which } => {
            wan(which)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench { json, which } => {
            let started = std::time::SystemTime::now();
            let mut tables = swarmrun::bench::record::Tables::default();
            let name = which.name();
            bench(which, &mut tables)?;
            if let Some(path) = json {
                let command = std::env::args().collect();
                swarmrun::bench::record::Record::new(name, command, started, tables)
                    .write(&path)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs one bench, its tables printed and kept in `tables`.
fn bench(which: BenchCmd, tables: &mut swarmrun::bench::record::Tables) -> Result<()> {
    use swarmrun::bench;
    match which {
        BenchCmd::Launch { nprocs, reps } => bench::launch::run(nprocs, reps, tables)?,
        BenchCmd::Allreduce {
            nprocs,
            transport,
            min,
            max,
            iters,
            warmup,
            min_time_ms,
            algorithm,
            rounds,
        } => {
            let opts = bench::allreduce::DriverOptions {
                rounds,
                nprocs,
                transports: transport,
                spec: config::BenchSpec {
                    min_bytes: min,
                    max_bytes: max,
                    iters,
                    warmup,
                    min_time_ms,
                    registered: false,
                },
                algorithm,
            };
            bench::allreduce::run(&opts, tables)?;
        }
        BenchCmd::Wan(opts) => bench::wan::run(&opts, tables)?,
        BenchCmd::Trust(opts) => bench::trust::run(&opts, tables)?,
        BenchCmd::Sched(opts) => {
            bench::sched::run(&opts, tables)?;
        }
        BenchCmd::Train {
            job,
            windows,
            rounds,
            part,
            device,
        } => {
            let spec = config::load(&job)?;
            match (device, part) {
                (config::Device::Cuda, _) => bench_on_gpu(|| {
                    anyhow::ensure!(
                        rounds == 1,
                        "--rounds is for the CPU benchmark; --device cuda measures one round"
                    );
                    #[cfg(feature = "cuda")]
                    bench::gpu::train(&spec, windows, tables)?;
                    Ok(())
                })?,
                (_, Some(part)) => bench::train::run_part(part, &spec, windows)?,
                (_, None) => bench::train::run(&spec, &job, (windows, rounds), tables)?,
            }
        }
        BenchCmd::Report(args) => {
            let done = bench::record::report(&args.dir, &args.into, &args.charts)?;
            println!(
                "{}: replaced {}; charts {}",
                args.into.display(),
                done.replaced.join(", "),
                done.charts.len()
            );
            if !done.unplaced.is_empty() {
                bail!(
                    "{} has no section for {} (add <!-- bench NAME --> <!-- /bench NAME -->)",
                    args.into.display(),
                    done.unplaced.join(", ")
                );
            }
        }
        BenchCmd::Compress {
            rows,
            width,
            device,
        } => match device {
            config::Device::Cuda => bench_on_gpu(|| {
                #[cfg(feature = "cuda")]
                bench::gpu::compress(rows, width, tables)?;
                Ok(())
            })?,
            config::Device::Cpu => bench::compress::run(rows, width, tables)?,
        },
    }
    Ok(())
}

/// A benchmark's GPU side: refused with the reason in a build without
/// the `cuda` feature.
fn bench_on_gpu(run: impl FnOnce() -> Result<()>) -> Result<()> {
    if !cfg!(feature = "cuda") {
        bail!("--device cuda needs swarmrun built with the `cuda` cargo feature");
    }
    run()
}

/// `swarmrun wan`: two sites joined by an emulated wide-area link.
fn wan(which: WanCmd) -> Result<()> {
    use swarmrun::wan::{bridge, Impairment, LinkSpec, Sites, SITE_A, SITE_B};
    match which {
        WanCmd::Up {
            name,
            rate,
            rtt_ms,
            jitter_ms,
            loss,
            seed,
        } => {
            anyhow::ensure!((0.0..1.0).contains(&loss), "--loss {loss} is not in 0..1");
            let link = LinkSpec {
                rate,
                rtt: Duration::from_secs_f64(rtt_ms.max(0.0) / 1e3),
                jitter: Duration::from_secs_f64(jitter_ms.max(0.0) / 1e3),
                loss,
            };
            let sites = Sites::new(&name)?;
            sites.up(&link, &std::env::current_exe()?, seed)?;
            println!(
                "sites {name}-a ({SITE_A}) and {name}-b ({SITE_B}) are up; run a rank in one \
                 with `ip netns exec {name}-a swarmrun ...`; `swarmrun wan down {name}` removes them"
            );
        }
        WanCmd::Down { name } => Sites::new(&name)?.down(),
        WanCmd::Bridge {
            a,
            b,
            delay_us,
            jitter_us,
            loss,
            seed,
        } => bridge::run(
            &a,
            &b,
            Impairment {
                delay: Duration::from_micros(delay_us),
                jitter: Duration::from_micros(jitter_us),
                loss,
                seed,
            },
        )
        .with_context(|| format!("bridging {a} and {b}"))?,
    }
    Ok(())
}

/// `swarmrun sample`: the newest checkpoint of `run_dir` continues
/// `prompt`; the text goes to stdout, which checkpoint to stderr.
fn sample(run_dir: &Path, prompt: &str, opts: &SampleOptions) -> Result<()> {
    anyhow::ensure!(
        run_dir.is_dir(),
        "run directory {} does not exist",
        run_dir.display()
    );
    let checkpoints = Checkpoints::new(run_dir);
    let manifest = checkpoints.latest()?.with_context(|| {
        format!(
            "no checkpoint in {} (no window-* directory with a readable manifest.json)",
            checkpoints.root().display()
        )
    })?;
    eprintln!(
        "sampling from {} (window {}, step {})",
        checkpoints.dir(manifest.window).display(),
        manifest.window,
        manifest.step
    );
    // The training job reads the embedded corpus, so its vocabulary is the model's.
    let tokenizer = Tokenizer::from_text(Corpus::embedded()?.text());
    let stages = checkpoints.load_model(&manifest, tokenizer.vocab_size())?;
    let context = match prompt {
        "" => vec![0],
        text => tokenizer.encode(text).context("encoding --prompt")?,
    };
    let text = tokenizer.decode(&swarmrun::model::generate(&stages, &context, opts)?)?;
    println!("{prompt}{text}");
    Ok(())
}

/// `swarmrun audit`: the table goes to stdout; a torn last line (a crash
/// while appending) is reported on stderr and is not an error, since the
/// complete lines before it are intact.
fn audit(run_dir: &Path, keys: &[String], countersigned: bool) -> Result<()> {
    let failed = |e: ledger::LedgerError| {
        let what = match e {
            ledger::LedgerError::Line { .. } | ledger::LedgerError::Signature { .. } => {
                "the ledger fails verification"
            }
            _ => "reading the ledger",
        };
        anyhow::Error::new(e).context(what)
    };
    let chain = ledger::read(run_dir).map_err(failed)?;
    let signatures =
        ledger::check_signatures(&chain, run_dir, keys, countersigned).map_err(failed)?;
    print!("{}", ledger::audit_table(&chain));
    match &signatures.book {
        Some(book) => println!(
            "every line signed by a leader in {}: {}",
            ledger::KeyBook::path(run_dir).display(),
            book.leaders.join(", ")
        ),
        None => eprintln!(
            "warning: the ledger is not signed (written before leaders signed their lines)"
        ),
    }
    let counts = &signatures.countersigned;
    let (least, most) = (counts.iter().min(), counts.iter().max());
    if let (Some(least), Some(most)) = (least, most) {
        println!("countersigned by {least} to {most} validators per line");
    }
    if let Some(line) = chain.torn_line {
        eprintln!(
            "warning: {}:{line} ends without a newline (a crash while appending, or a cut file); \
             it is not part of the record",
            chain.path.display()
        );
    }
    Ok(())
}

/// One rank: join the world, run the job file's task.
fn run_rank(spec: &JobSpec, job: &Path, rdzv: Option<&str>, resume: bool) -> Result<()> {
    let joined = launch::join(spec, rdzv)?;
    let me = joined.me();
    // Every event and span of this rank is inside this one, so a JSON
    // line says which rank and role it came from.
    let _rank = tracing::info_span!("rank", rank = joined.world.rank, role = %me.role).entered();
    tracing::info!(
        "rank {}/{} on {} (pid {}, site {}, {}, {}): rendezvous done {:.1} ms after start",
        joined.world.rank,
        joined.world.size,
        joined.world.me().host,
        std::process::id(),
        me.site,
        joined.launcher,
        compute_threads(),
        joined.startup.as_secs_f64() * 1e3
    );
    if bind::report_requested() {
        tracing::warn!("{}", bind::report_line(joined.binding.as_ref()));
    }
    inject_planned_fault(spec, joined.world.rank);
    let result = on_compute_thread(|| match spec.job.task {
        Task::Hello => run_hello(spec, &joined),
        Task::Train => {
            // torchrun's restarts rerun the script, which loads its own
            // checkpoint; ours resume for the user.
            let restarted = std::env::var("SWARMRUN_RESTART_COUNT").is_ok_and(|n| n != "0");
            run_train(spec, job, &joined, resume || restarted)
        }
        Task::BenchAllreduce => run_bench_allreduce(spec, &joined),
    });
    if let Some(usage) = launch::usage::own_usage() {
        tracing::info!("{}", launch::usage::cpu_line(joined.world.rank, &usage));
    }
    if let Err(e) = &result {
        exit_for(e);
    }
    result
}

/// "N compute threads": how many threads this process's matmuls and
/// elementwise loops use (candle reads `RAYON_NUM_THREADS`, else counts the
/// cores).
fn compute_threads() -> String {
    match candle_core::utils::get_num_threads() {
        1 => "1 compute thread".to_string(),
        n => format!("{n} compute threads"),
    }
}

/// Has glibc keep memory this process frees for its next allocations
/// instead of handing it back to the kernel at once. A transport allocates
/// a buffer per message and candle one per op, up to megabytes each and
/// thousands of times a second; by default glibc unmaps a freed block above
/// its mmap threshold (128 KiB until it adapts) and trims the heap top, so
/// the next allocation faults its pages in again, zeroed by the kernel.
/// Measured on 2 cores (`perf stat`, `bench allreduce -n 4 --transport tcp
/// --min 64M --max 64M --iters 10`): 4.4x fewer page faults, 14-21% less
/// CPU.
/// A process keeps at most 64 MiB free at a heap's top; blocks from 32 MiB
/// up are still mapped and unmapped one by one.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters, and runs before this
    // process starts any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// Runs a rank's task. With one compute thread (`RAYON_NUM_THREADS=1`, as
/// `swarmrun launch` sets for ranks sharing a host) it runs on the thread of
/// a one-thread rayon pool, so that candle's parallel loops and ours run
/// inline: called from outside, each would be handed to a pool thread and
/// back, two context switches per op and hundreds of ops per pass.
fn on_compute_thread<R: Send>(task: impl FnOnce() -> R + Send) -> R {
    if candle_core::utils::get_num_threads() != 1 {
        return task();
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .thread_name(|_| "swarmrun-compute".to_string())
        // As much as the main thread had: the task used to run there.
        .stack_size(8 << 20)
        .build();
    match pool {
        Ok(pool) => {
            let span = tracing::Span::current();
            pool.install(|| span.in_scope(task))
        }
        Err(e) => {
            tracing::warn!(
                "cannot start this rank's compute thread ({e}); computing on the main thread"
            );
            task()
        }
    }
}

/// Reports a rank's error and exits, while its transport is still open:
/// once it closes, peers fail at once and the launcher may stop this rank
/// before it could say why. A rank that only lost a peer exits with
/// [`launch::PEER_LOST_STATUS`], so the launcher reports the cause instead.
fn exit_for(e: &anyhow::Error) -> ! {
    let code = report(e);
    if lost_a_peer(e) {
        std::process::exit(launch::PEER_LOST_STATUS);
    }
    std::process::exit(i32::from(code));
}

/// Whether `e` is the loss of a peer, as a rank's transport or collective
/// reports it, directly or inside a task's error.
fn lost_a_peer(e: &anyhow::Error) -> bool {
    use swarmrun::collective::CollectiveError;
    use swarmrun::hello::HelloError;
    use swarmrun::roles::TrainError;
    use swarmrun::transport::TransportError;
    let transport = |t: &TransportError| matches!(t, TransportError::PeerLost { .. });
    let collective = |c: &CollectiveError| matches!(c, CollectiveError::PeerLost { .. });
    e.chain().any(|c| {
        c.downcast_ref::<TransportError>().is_some_and(transport)
            || c.downcast_ref::<CollectiveError>().is_some_and(collective)
            || match c.downcast_ref::<HelloError>() {
                Some(HelloError::Transport(t)) => transport(t),
                Some(HelloError::Collective(c)) => collective(c),
                _ => false,
            }
            || match c.downcast_ref::<TrainError>() {
                Some(TrainError::Transport(t)) => transport(t),
                Some(TrainError::Collective(c)) => collective(c),
                _ => false,
            }
    })
}

/// `[[faults.crash]]`: this rank exits on purpose, to exercise the
/// launcher and the survivors.
fn inject_planned_fault(spec: &JobSpec, rank: usize) {
    let timed = spec.faults.crash.iter().filter(|c| c.window.is_none());
    if let Some(c) = timed.into_iter().find(|c| c.rank == rank) {
        std::thread::sleep(Duration::from_secs_f64(c.after_s));
        tracing::warn!(
            "exiting with status {} on purpose (faults.crash)",
            c.exit_code
        );
        std::process::exit(c.exit_code);
    }
}

/// A rank of the training job, by its role.
fn run_train(spec: &JobSpec, job: &Path, joined: &launch::Joined, resume: bool) -> Result<()> {
    use swarmrun::config::Role;
    use swarmrun::roles::{self, Leading, StartPoint};
    let t = joined.transport.as_dyn();
    let start = || -> Result<StartPoint> {
        let text =
            std::fs::read_to_string(job).with_context(|| format!("reading {}", job.display()))?;
        Ok(StartPoint::find(spec, text, resume)?)
    };
    match joined.me().role {
        Role::Orchestrator => lead(spec, job, joined, &start()?, Leading::Orchestrator)?,
        Role::Standby => {
            // Found now: later the run directory holds this run's own
            // checkpoints.
            let start = start()?;
            if let Some(leading) = roles::stand_by(t)? {
                lead(spec, job, joined, &start, leading)?;
            }
        }
        Role::Validator => roles::validate(t, spec, rank_device(spec, joined.me())?)?,
        Role::Miner { .. } => roles::mine(t, spec, rank_device(spec, joined.me())?)?,
    }
    Ok(())
}

/// The device of `me`'s site (`[[site]] device`), opened.
fn rank_device(
    spec: &JobSpec,
    me: &swarmrun::config::RankPlan,
) -> Result<swarmrun::roles::StageDevice> {
    let site = site_fabric(spec, &me.site);
    Ok(swarmrun::roles::StageDevice::open(site, me.local_rank)?)
}

/// Site `name`'s device and fabric (the defaults for a site not in the
/// job file).
fn site_fabric(spec: &JobSpec, name: &str) -> swarmrun::roles::SiteFabric {
    let site = spec.site(name);
    swarmrun::roles::SiteFabric {
        device: site.map(|s| s.device).unwrap_or_default(),
        fabric: site.map(|s| s.fabric).unwrap_or_default(),
    }
}

/// Leads the training job: the orchestrator from the start, or the
/// standby once it took over. Writes the window lines, `metrics.jsonl`
/// and, when asked, serves Prometheus metrics and the door for joiners.
fn lead(
    spec: &JobSpec,
    job: &Path,
    joined: &launch::Joined,
    start: &swarmrun::roles::StartPoint,
    leading: swarmrun::roles::Leading,
) -> Result<()> {
    use swarmrun::metrics::MetricsLog;
    use swarmrun::roles;
    let t = joined.transport.as_dyn();
    let run_dir = spec.job.run_dir();
    let resumed = start.resumed.as_ref().map(|m| m.window);
    if let Some(m) = &start.resumed {
        tracing::info!(
            "resuming after window {} from {}",
            m.window,
            run_dir.join("checkpoints").display()
        );
    }
    let mut metrics = match leading.closed_before(resumed) {
        Some(window) => MetricsLog::resume(&run_dir, window),
        None => MetricsLog::create(&run_dir),
    }
    .with_context(|| format!("opening the metrics in {}", run_dir.display()))?;
    // Ranks may join through the rendezvous while the job trains,
    // when every rank can reach them: over the TCP mesh.
    let door = match &joined.door {
        Some(listener) if joined.transport.joinable() => {
            let membership = Membership::new(&joined.world);
            let door = Door::open(
                listener.try_clone()?,
                launch::rank::job_key(spec)?,
                spec.job.name.clone(),
                Arc::clone(&membership),
            )?;
            tracing::info!(
                "joins: swarmrun join {} --rdzv tcp://{}:{}",
                job.display(),
                joined.world.me().host,
                listener.local_addr()?.port()
            );
            Some((door, membership))
        }
        _ => None,
    };
    let mut monitor = match &spec.metrics.listen {
        Some(addr) => {
            let board = swarmrun::status::StatusBoard::new(
                &spec.job.name,
                joined.plan.stages,
                spec.train.windows,
            );
            let m = swarmrun::monitor::Monitor::serve(addr, board)
                .with_context(|| format!("serving metrics on {addr}"))?;
            tracing::info!(
                "status: http://{0}/ (metrics: http://{0}/metrics)",
                m.local_addr()
            );
            Some(m)
        }
        None => None,
    };
    let started = std::time::Instant::now();
    let mut written = Ok(());
    let membership = door.as_ref().map(|(_, m)| Arc::clone(m));
    // The host a rank runs on: the job's ranks from the rendezvous, ranks
    // that joined from the door's book.
    let host_of = |rank: usize| {
        joined
            .world
            .peers
            .get(rank)
            .map(|p| p.host.clone())
            .or_else(|| {
                membership
                    .as_ref()
                    .and_then(|m| m.peer(rank))
                    .map(|p| p.host)
            })
    };
    let how = (&joined.plan, start, leading);
    roles::orchestrate(
        t,
        spec,
        how,
        membership.clone(),
        |progress| match progress {
            roles::Progress::Window(w) => {
                tracing::info!(
                    window = w.window,
                    loss = w.mean_loss,
                    val_loss = w.val_loss,
                    tokens_per_s = w.tokens_per_s,
                    bubble = w.bubble,
                    "{w}"
                );
                if written.is_ok() {
                    written = metrics.append(w, started.elapsed().as_secs_f64());
                }
                if let Some(m) = monitor.as_mut() {
                    m.record_window(w, host_of);
                }
            }
            roles::Progress::Checkpoint(dir) => {
                tracing::info!("checkpoint {}", dir.display());
            }
            roles::Progress::Event { line, warning } => {
                if let Some(m) = monitor.as_mut() {
                    m.record_event(line, warning);
                }
            }
        },
    )?;
    written.with_context(|| format!("writing {}", metrics.path().display()))?;
    Ok(())
}

/// A rank that joins a running training job as a miner.
fn run_joined_rank(spec: &JobSpec, rdzv: Option<&str>, site: &str) -> Result<()> {
    let joined = launch::join_running(spec, rdzv, site)?;
    let me = &joined.admission;
    let _rank = tracing::info_span!("rank", rank = me.rank, role = "joiner").entered();
    tracing::info!(
        "rank {} on {} (pid {}, site {site}) joined the running job; {} ranks in it",
        me.rank,
        swarmrun::world::hostname(),
        std::process::id(),
        me.peers.len()
    );
    // A joiner has no local rank in the plan: its global rank spreads the
    // joiners of one host over its GPUs.
    let device = swarmrun::roles::StageDevice::open(site_fabric(spec, site), me.rank)?;
    if let Err(e) = swarmrun::roles::mine_joined(&joined.transport, spec, device) {
        exit_for(&anyhow::Error::new(e));
    }
    Ok(())
}

/// A rank of `swarmrun bench allreduce`: rank 0 prints the rows.
fn run_bench_allreduce(spec: &JobSpec, joined: &launch::Joined) -> Result<()> {
    use swarmrun::bench::allreduce::{self, AllReduceUnderTest, Ours, ROW_MARK};
    let t = joined.transport.as_dyn();
    let ours = Ours {
        transport: t,
        algorithm: allreduce::algorithm(spec.collective.algorithm),
    };
    let under_test: &dyn AllReduceUnderTest = match &joined.transport {
        launch::RankTransport::Shm(shm) if spec.bench.registered => &allreduce::ShmRegistered(shm),
        launch::RankTransport::Shm(shm) => &allreduce::ShmFast(shm),
        #[cfg(feature = "mpi")]
        launch::RankTransport::Mpi(m) => &allreduce::MpiNative(m),
        _ => &ours,
    };
    let rank0 = joined.world.rank == 0;
    allreduce::run_rank(t, &spec.bench, under_test, |row| {
        if rank0 {
            println!("{ROW_MARK}{}", row.format(joined.world.size));
        }
    })?;
    Ok(())
}

fn run_hello(spec: &JobSpec, joined: &launch::Joined) -> Result<()> {
    let times = swarmrun::hello::run(
        joined.transport.as_dyn(),
        &swarmrun::hello::HelloOptions {
            rounds: spec.hello.rounds,
            token_bytes: spec.hello.token_bytes,
        },
    )?;
    if let Some((min, median, max)) = times.summary() {
        tracing::info!(
            "ring of {} ranks, {} B token, {} rounds: round trip min {:.1} us, median {:.1} us, max {:.1} us",
            joined.world.size,
            spec.hello.token_bytes,
            times.round_trips.len(),
            min.as_secs_f64() * 1e6,
            median.as_secs_f64() * 1e6,
            max.as_secs_f64() * 1e6
        );
    }
    tracing::info!("barrier passed");
    if spec.hello.hold_s > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(spec.hello.hold_s));
    }
    Ok(())
}
