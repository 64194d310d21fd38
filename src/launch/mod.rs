//! Starting ranks: `swarmrun launch` (our own spawner for one host) and
//! `swarmrun rank` (one rank, under any launcher).

pub mod bind;
pub mod limits;
pub mod progress;
pub mod rank;
mod spawn;
pub mod usage;

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;

use crate::config::{JobSpec, PlanError, Rendezvous, Role, Task};
use crate::logging::LogFormat;
use crate::wire::JobKey;

pub use rank::{join, join_running, JoinError, Joined, JoinedLate, RankTransport};
pub use spawn::{launch, LaunchError, LaunchOptions, Outcome};

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("rendezvous `slurm` is for ranks started by srun (`srun swarmrun rank JOB`), not for `swarmrun launch`")]
    SlurmUnderLaunch,
    #[error("cannot find a free port on {host}: {source}")]
    NoFreePort {
        host: String,
        source: std::io::Error,
    },
    #[error("cannot find this executable: {0}")]
    Exe(std::io::Error),
    #[error(transparent)]
    Bind(#[from] bind::BindError),
    #[error("only a training job (`task = \"train\"`) can be joined while it runs")]
    JoinNotTrain,
}

/// The exit status of a rank that failed only because a peer was lost
/// (its transport or a collective said so): 75, `EX_TEMPFAIL`. Whatever
/// order `swarmrun launch` reaps ranks in, it reports another rank's
/// failure, the cause, in preference to this one.
pub const PEER_LOST_STATUS: i32 = 75;

/// The variables that size a process's compute threads: candle's
/// elementwise pool, and rayon's pool, from which candle also takes the
/// thread count of its matmuls.
const THREAD_COUNTS: [&str; 2] = ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"];

/// As torchrun sets OMP_NUM_THREADS=1: when several ranks share a host's
/// cores, each computes on one thread, since thread pools per rank only make
/// ranks fight (candle's elementwise pool spins between ops, and a matmul
/// split over two threads hands each piece to a pool thread and back). A
/// setting of the user's own wins.
fn one_compute_thread(env: &mut Vec<(String, String)>) {
    for name in THREAD_COUNTS {
        if std::env::var_os(name).is_none() {
            env.push((name.to_string(), "1".to_string()));
        }
    }
}

/// A port on `host` that nobody listens on now, for a rank to bind a
/// moment later. It is drawn at random below the kernel's ephemeral range:
/// the kernel's own next ephemeral port (torchrun's choice) can be handed
/// to any outgoing connection on this host before the rank binds it, an
/// "address in use" that a busy host making many connections does hit;
/// a port below the range is taken only by someone binding it by number.
pub fn free_port(host: &str) -> std::io::Result<u16> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (ephemeral_start / 2, ephemeral_start);
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut draws = crate::data::rng::SplitMix64::new(u64::from_ne_bytes(seed), 0);
    for _ in 0..64 {
        let port = low + draws.below(u64::from(high - low)) as u16;
        if TcpListener::bind((host, port)).is_ok() {
            return Ok(port);
        }
    }
    // Everything tried is taken: the kernel's choice, race and all.
    Ok(TcpListener::bind((host, 0))?.local_addr()?.port())
}

/// What `swarmrun launch` was asked.
#[derive(Debug, Clone)]
pub struct LaunchRequest<'a> {
    pub job_path: &'a Path,
    pub nprocs: Option<usize>,
    pub rdzv: Option<&'a str>,
    pub max_restarts: u32,
    pub grace: Duration,
    /// Pass `--resume` to every rank.
    pub resume: bool,
    /// Binding of each rank to CPUs (`--bind-to`).
    pub bind_to: bind::BindTo,
    /// Each rank prints its binding (`--report-bindings`).
    pub report_bindings: bool,
    /// Stop the job past this wall-clock time (`--timeout`).
    pub timeout: Option<Duration>,
}

/// What `swarmrun join` was asked: `nprocs` ranks of this host join the
/// training job whose rendezvous is `rdzv`, as members of `site`.
#[derive(Debug, Clone)]
pub struct JoinRequest<'a> {
    pub job_path: &'a Path,
    pub nprocs: usize,
    pub rdzv: &'a str,
    pub site: &'a str,
    pub grace: Duration,
    /// Stop the joiners past this wall-clock time (`--timeout`): they get
    /// SIGTERM, so they leave at the next window boundary.
    pub timeout: Option<Duration>,
}

/// Starts the joining ranks as children running `swarmrun rank --join`,
/// with the launcher's usual prefixed output and signal forwarding. Each
/// is a miner of the running job, so one that fails leaves the others
/// mining; a SIGTERM or SIGINT makes them all leave at the next window
/// boundary.
pub fn start_joiners(spec: &JobSpec, req: &JoinRequest) -> Result<Outcome, StartError> {
    if spec.job.task != Task::Train {
        return Err(StartError::JoinNotTrain);
    }
    let n = req.nprocs.max(1);
    let mut env = Vec::new();
    if n > 1 {
        one_compute_thread(&mut env);
    }
    let opts = LaunchOptions {
        exe: std::env::current_exe().map_err(StartError::Exe)?,
        rank_args: vec![
            req.job_path.as_os_str().to_owned(),
            "--join".into(),
            "--rdzv".into(),
            req.rdzv.into(),
            "--site".into(),
            req.site.into(),
        ],
        labels: (0..n).map(|i| format!("join {i} {}", req.site)).collect(),
        expendable: vec![true; n],
        leaders: Vec::new(),
        env,
        run_id: format!("{}-join-{}", spec.job.name, std::process::id()),
        max_restarts: 0,
        grace: req.grace,
        progress_windows: None,
        json_lines: LogFormat::of_process() == LogFormat::Json,
        // Joiners mine until the job stops them, they are told to leave,
        // or their time is up.
        time_limit: req.timeout,
    };
    Ok(launch(&opts)?)
}

/// Plans the ranks, fixes the rendezvous and the key, and runs the job.
///
/// A `tcp://host:0` rendezvous gets a free port here, as torchrun's
/// `--standalone` does. Without a job key (no SWARMRUN_JOB_KEY, no
/// `key_file`), a fresh key is made for this launch: every rank is our own
/// child, so the key never leaves this host.
pub fn start(spec: &JobSpec, req: &LaunchRequest) -> Result<Outcome, StartError> {
    // Before any rank starts: a binding this build cannot do is refused.
    bind::check(req.bind_to)?;
    let plan = spec.plan(req.nprocs)?;
    let rendezvous = match rank::rendezvous_choice(spec, req.rdzv)? {
        Rendezvous::Slurm => return Err(StartError::SlurmUnderLaunch),
        Rendezvous::Tcp { host, port: 0 } => {
            let port = free_port(&host).map_err(|source| StartError::NoFreePort {
                host: host.clone(),
                source,
            })?;
            Rendezvous::Tcp { host, port }
        }
        other => other,
    };
    let key = if std::env::var_os(rank::ENV_JOB_KEY).is_none() && spec.network.key_file.is_none() {
        JobKey::generate().map_err(JoinError::Key)?
    } else {
        rank::job_key(spec)?
    };
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    let opts = LaunchOptions {
        exe: std::env::current_exe().map_err(StartError::Exe)?,
        rank_args: {
            let mut args = vec![req.job_path.as_os_str().to_owned()];
            if req.resume {
                args.push("--resume".into());
            }
            args
        },
        labels: plan
            .ranks
            .iter()
            .map(|r| format!("r{} {}", r.rank, r.role.short_label()))
            .collect(),
        expendable: plan
            .ranks
            .iter()
            .map(|r| {
                let leads = matches!(r.role, Role::Orchestrator | Role::Standby);
                spec.job.task == Task::Train
                    && (matches!(r.role, Role::Miner { .. } | Role::Validator)
                        || (leads && spec.standby_rank().is_some()))
            })
            .collect(),
        leaders: plan
            .ranks
            .iter()
            .filter(|r| matches!(r.role, Role::Orchestrator | Role::Standby))
            .map(|r| r.rank)
            .collect(),
        env: {
            let mut env = vec![
                (rank::ENV_RENDEZVOUS.to_string(), rendezvous.to_string()),
                (rank::ENV_JOB_KEY.to_string(), key.to_hex()),
                // Always set, so a binding exported by whoever started us
                // does not leak into a `--bind-to none` launch.
                (bind::ENV_BIND.to_string(), req.bind_to.to_string()),
            ];
            if req.report_bindings {
                env.push((bind::ENV_REPORT_BINDINGS.to_string(), "1".to_string()));
            }
            // A start time set by whoever started us (a benchmark) is kept:
            // it is the earlier and truer one.
            if std::env::var_os(rank::ENV_LAUNCH_T0_US).is_none() {
                env.push((rank::ENV_LAUNCH_T0_US.to_string(), now_us.to_string()));
            }
            if plan.ranks.len() > 1 {
                one_compute_thread(&mut env);
            }
            env
        },
        run_id: format!("{}-{}-{}", spec.job.name, std::process::id(), now_us),
        max_restarts: req.max_restarts,
        grace: req.grace,
        progress_windows: (spec.job.task == Task::Train).then_some(spec.train.windows),
        json_lines: LogFormat::of_process() == LogFormat::Json,
        time_limit: req.timeout,
    };
    Ok(launch(&opts)?)
}
