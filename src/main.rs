//! The `swarmrun` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use swarmrun::bench::train::BenchTrainError;
use swarmrun::config::{self, ConfigError, JobSpec, PlanError, Task};
use swarmrun::launch::{self, JoinError, LaunchRequest, StartError};
use swarmrun::wire::JobKey;

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
        job: PathBuf,
    },
    /// Run one rank; rank and size come from mpirun, srun, PMI(x) or RANK/WORLD_SIZE.
    Rank {
        /// Rendezvous endpoint, overriding the job file and SWARMRUN_RENDEZVOUS.
        #[arg(long)]
        rdzv: Option<String>,
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
    /// Benchmarks, printed as tables.
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
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
        /// Comma-separated: tcp, shm, shm-registered, mpi (OpenMPI's MPI_Allreduce; needs --features mpi).
        #[arg(long, default_value = "tcp", value_delimiter = ',')]
        transport: Vec<String>,
        /// Smallest message (1K, 64KiB, 4M...).
        #[arg(long, default_value = "1K", value_parser = parse_size_arg)]
        min: usize,
        /// Largest message.
        #[arg(long, default_value = "64M", value_parser = parse_size_arg)]
        max: usize,
        #[arg(long, default_value_t = 20)]
        iters: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// auto, butterfly or ring.
        #[arg(long, default_value = "auto", value_parser = parse_algorithm)]
        algorithm: config::AllReduceChoice,
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
        /// One measurement of the benchmark, run in its own process by the benchmark itself.
        #[arg(long, hide = true)]
        part: Option<swarmrun::bench::train::Part>,
    },
}

fn parse_size_arg(s: &str) -> Result<usize, String> {
    config::parse_size(s)
        .map_err(|e| e.to_string())
        .and_then(|v| usize::try_from(v).map_err(|e| e.to_string()))
}

fn parse_algorithm(s: &str) -> Result<config::AllReduceChoice, String> {
    match s {
        "auto" => Ok(config::AllReduceChoice::Auto),
        "butterfly" => Ok(config::AllReduceChoice::Butterfly),
        "ring" => Ok(config::AllReduceChoice::Ring),
        other => Err(format!("{other:?} is not auto, butterfly or ring")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("swarmrun: error: {e:#}");
            if is_usage_error(&e) {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
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

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Launch {
            nprocs,
            max_restarts,
            grace_period,
            rdzv,
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
                },
            )?;
            Ok(ExitCode::from(outcome.exit_code().clamp(0, 255) as u8))
        }
        Cmd::Rank { rdzv, job } => {
            let spec = config::load(&job)?;
            run_rank(&spec, rdzv.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check { nprocs, job } => {
            let spec = config::load(&job)?;
            print!("{}", spec.plan(nprocs)?.render());
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
        Cmd::Bench { which } => match which {
            BenchCmd::Launch { nprocs, reps } => {
                swarmrun::bench::launch::run(nprocs, reps)?;
                Ok(ExitCode::SUCCESS)
            }
            BenchCmd::Allreduce {
                nprocs,
                transport,
                min,
                max,
                iters,
                warmup,
                algorithm,
            } => {
                swarmrun::bench::allreduce::run(&swarmrun::bench::allreduce::DriverOptions {
                    nprocs,
                    transports: transport,
                    spec: config::BenchSpec {
                        min_bytes: min,
                        max_bytes: max,
                        iters,
                        warmup,
                        registered: false,
                    },
                    algorithm,
                })?;
                Ok(ExitCode::SUCCESS)
            }
            BenchCmd::Train { job, windows, part } => {
                let spec = config::load(&job)?;
                match part {
                    Some(part) => swarmrun::bench::train::run_part(part, &spec, windows)?,
                    None => swarmrun::bench::train::run(&spec, &job, windows)?,
                }
                Ok(ExitCode::SUCCESS)
            }
        },
    }
}

/// One rank: join the world, run the job file's task.
fn run_rank(spec: &JobSpec, rdzv: Option<&str>) -> Result<()> {
    let joined = launch::join(spec, rdzv)?;
    let me = joined.me();
    println!(
        "rank {}/{} on {} (pid {}, site {}, {}): rendezvous done {:.1} ms after start",
        joined.world.rank,
        joined.world.size,
        joined.world.me().host,
        std::process::id(),
        me.site,
        joined.launcher,
        joined.startup.as_secs_f64() * 1e3
    );
    crash_if_planned(spec, joined.world.rank);
    match spec.job.task {
        Task::Hello => run_hello(spec, &joined),
        Task::Train => run_train(spec, &joined),
        Task::BenchAllreduce => run_bench_allreduce(spec, &joined),
    }
}

/// `[[faults.crash]]`: this rank exits on purpose, to exercise the
/// launcher and the survivors.
fn crash_if_planned(spec: &JobSpec, rank: usize) {
    if let Some(c) = spec.faults.crash.iter().find(|c| c.rank == rank) {
        std::thread::sleep(Duration::from_secs_f64(c.after_s));
        eprintln!(
            "exiting with status {} on purpose (faults.crash)",
            c.exit_code
        );
        std::process::exit(c.exit_code);
    }
}

/// A rank of the training job, by its role.
fn run_train(spec: &JobSpec, joined: &launch::Joined) -> Result<()> {
    use swarmrun::config::Role;
    use swarmrun::roles;
    let t = joined.transport.as_dyn();
    match joined.me().role {
        Role::Orchestrator => {
            let run_dir = spec.job.run_dir();
            let mut metrics = swarmrun::metrics::MetricsLog::create(&run_dir)
                .with_context(|| format!("creating {}", run_dir.display()))?;
            let started = std::time::Instant::now();
            let mut written = Ok(());
            roles::orchestrate(t, spec, &joined.plan, |w| {
                let val = w
                    .val_loss
                    .map_or(String::new(), |v| format!("  val_loss {v:.4}"));
                println!(
                    "window {:>5}  loss {:.4}{val}  {:.0} tokens/s",
                    w.window, w.mean_loss, w.tokens_per_s
                );
                if written.is_ok() {
                    written = metrics.append(w, started.elapsed().as_secs_f64());
                }
            })?;
            written.with_context(|| format!("writing {}", metrics.path().display()))?;
        }
        Role::Validator => roles::observe(t, spec)?,
        Role::Miner { stage } => roles::mine(t, spec, &joined.plan, stage)?,
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
        println!(
            "ring of {} ranks, {} B token, {} rounds: round trip min {:.1} us, median {:.1} us, max {:.1} us",
            joined.world.size,
            spec.hello.token_bytes,
            times.round_trips.len(),
            min.as_secs_f64() * 1e6,
            median.as_secs_f64() * 1e6,
            max.as_secs_f64() * 1e6
        );
    }
    println!("barrier passed");
    if spec.hello.hold_s > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(spec.hello.hold_s));
    }
    Ok(())
}
