//! `swarmrun rank`: one rank joins the job, whoever started it (our
//! launcher, `mpirun`, `srun`, torchrun or a shell script).
//!
//! Order of events: identity from the environment, the CPU binding asked for
//! in SWARMRUN_BIND (see [`super::bind`]), the rank's place in the job file's plan, the job key, a transport listener on an ephemeral port,
//! the rendezvous (which publishes that port), then the full transport mesh.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::bind::{self, BindError, Binding};

use crate::config::{Fabric, JobSpec, Plan, PlanError, RankPlan, Rendezvous, Task};
use crate::transport::shm::{ShmOptions, ShmTransport};
use crate::transport::{TcpOptions, TcpTransport, Transport, TransportError};
use crate::wire::{JobKey, WireError};
use crate::world::{self, DetectError, Endpoint, RendezvousError, RendezvousOptions, World};

/// Environment variable `swarmrun launch` passes the resolved rendezvous in;
/// it overrides the job file, as `--rdzv` does.
pub const ENV_RENDEZVOUS: &str = "SWARMRUN_RENDEZVOUS";
/// The job key, hex; wins over the job file's `key_file`.
pub const ENV_JOB_KEY: &str = "SWARMRUN_JOB_KEY";
/// Unix time in microseconds when `swarmrun launch` started, so ranks can
/// say how long their start-up took.
pub const ENV_LAUNCH_T0_US: &str = "SWARMRUN_LAUNCH_T0_US";

#[derive(Debug, Error)]
pub enum JoinError {
    #[error(transparent)]
    Detect(#[from] DetectError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("job key: {0}")]
    Key(WireError),
    #[error("bad rendezvous {value:?} from {source_name}: {reason}")]
    BadRendezvous {
        value: String,
        source_name: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
    #[error("cannot listen for the transport: {0}")]
    Listen(std::io::Error),
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    #[error("fabric {0:?} needs swarmrun built with `--features {1}`")]
    FabricNotBuilt(Fabric, &'static str),
    #[error("fabric {fabric:?}: {reason}")]
    FabricUnusable { fabric: Fabric, reason: String },
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// The transport a rank's collectives run over, chosen by the site's fabric.
pub enum RankTransport {
    Tcp(TcpTransport),
    /// Boxed: the shared-memory transport carries its segment layout inline.
    Shm(Box<ShmTransport>),
    #[cfg(feature = "mpi")]
    Mpi(crate::transport::mpi::MpiTransport),
}

impl RankTransport {
    pub fn as_dyn(&self) -> &dyn Transport {
        match self {
            RankTransport::Tcp(t) => t,
            RankTransport::Shm(t) => t.as_ref(),
            #[cfg(feature = "mpi")]
            RankTransport::Mpi(t) => t,
        }
    }
}

/// A rank that has joined: who it is, its place in the plan, and the mesh.
pub struct Joined {
    pub world: World,
    pub plan: Plan,
    pub transport: RankTransport,
    /// Time from process start (or launcher start, when known) to a
    /// connected mesh.
    pub startup: Duration,
    pub launcher: world::LauncherKind,
    /// Where this rank bound itself (SWARMRUN_BIND); `None` when unbound.
    pub binding: Option<Binding>,
    /// On rank 0 of a TCP rendezvous, the listener it served: the door of
    /// a training job, through which ranks join while it trains.
    pub door: Option<TcpListener>,
}

impl Joined {
    pub fn me(&self) -> &RankPlan {
        &self.plan.ranks[self.world.rank]
    }
}

/// Where the rendezvous is: `--rdzv`, else SWARMRUN_RENDEZVOUS, else the job
/// file.
pub fn rendezvous_choice(spec: &JobSpec, cli: Option<&str>) -> Result<Rendezvous, JoinError> {
    let (value, source_name) = match (cli, std::env::var(ENV_RENDEZVOUS).ok()) {
        (Some(v), _) => (v.to_string(), "--rdzv"),
        (None, Some(v)) => (v, ENV_RENDEZVOUS),
        (None, None) => return Ok(spec.network.rendezvous.clone()),
    };
    value
        .parse::<Rendezvous>()
        .map_err(|reason| JoinError::BadRendezvous {
            value,
            source_name,
            reason: reason.to_string(),
        })
}

/// The job key from SWARMRUN_JOB_KEY or the job file's `key_file`.
pub fn job_key(spec: &JobSpec) -> Result<JobKey, JoinError> {
    JobKey::resolve(
        std::env::var(ENV_JOB_KEY).ok().as_deref(),
        spec.network.key_file.as_deref(),
    )
    .map_err(JoinError::Key)
}

/// Joins the job: detect, plan, rendezvous, connect.
pub fn join(spec: &JobSpec, rdzv_cli: Option<&str>) -> Result<Joined, JoinError> {
    let started = Instant::now();
    let slots = spec.plan(None)?.ranks.len();
    let env = world::detect_from_process(Some(slots))?;
    // Before the transport starts threads; binds every thread anyway.
    let binding = bind::apply(bind::from_env()?, env.local_rank)?;
    let plan = spec.plan(Some(env.size))?;
    let key = job_key(spec)?;
    let endpoint = Endpoint::resolve(
        &rendezvous_choice(spec, rdzv_cli)?,
        env.slurm_nodelist.as_deref(),
        env.slurm_job,
    )?;
    let listener = TcpListener::bind(("0.0.0.0", 0)).map_err(JoinError::Listen)?;
    let listen_port = listener.local_addr().map_err(JoinError::Listen)?.port();
    let connect_timeout = Duration::from_secs_f64(spec.network.connect_timeout_s);
    let run_id = env.run_id.clone().unwrap_or_else(|| {
        // Without a launcher-provided id, runs of the same job share a
        // directory; the job name at least keeps different jobs apart.
        format!("{}-default", spec.job.name)
    });
    let formed = world::rendezvous(
        &endpoint,
        &RendezvousOptions {
            rank: env.rank,
            size: env.size,
            local_rank: env.local_rank,
            site: &plan.ranks[env.rank].site,
            listen_port,
            key: &key,
            job_name: &spec.job.name,
            run_id: &run_id,
            timeout: connect_timeout,
        },
    )?;
    let world = formed.world;
    let transport = open_transport(spec, &plan, &world, listener, &key, &run_id)?;
    let startup = launch_t0_elapsed().unwrap_or_else(|| started.elapsed());
    Ok(Joined {
        world,
        plan,
        transport,
        startup,
        launcher: env.launcher,
        binding,
        door: formed.listener,
    })
}

/// A rank that joined a running training job through its door.
pub struct JoinedLate {
    /// Its id (never used before in this job) and everyone it connected
    /// to, itself included.
    pub admission: world::Admission,
    pub transport: TcpTransport,
    pub site: String,
}

/// Joins the training job whose rendezvous is `rdzv` (or the job file's)
/// while it trains: knock on its door, then dial every rank in the book.
/// The rank's place in the job (a stage) is the orchestrator's to give.
pub fn join_running(
    spec: &JobSpec,
    rdzv_cli: Option<&str>,
    site: &str,
) -> Result<JoinedLate, JoinError> {
    let key = job_key(spec)?;
    // The running job's own rendezvous, not one derived from the joiner's
    // Slurm step: that names another job.
    let endpoint = match rendezvous_choice(spec, rdzv_cli)? {
        Rendezvous::Tcp { host, port } if port != 0 => Endpoint::Tcp { host, port },
        other => {
            return Err(JoinError::BadRendezvous {
                value: other.to_string(),
                source_name: "the join",
                reason: "join a running job at its tcp://HOST:PORT rendezvous (rank 0 prints it)"
                    .into(),
            })
        }
    };
    let listener = TcpListener::bind(("0.0.0.0", 0)).map_err(JoinError::Listen)?;
    let listen_port = listener.local_addr().map_err(JoinError::Listen)?.port();
    let connect_timeout = Duration::from_secs_f64(spec.network.connect_timeout_s);
    let admission = world::knock(
        &endpoint,
        &world::KnockOptions {
            key: &key,
            job_name: &spec.job.name,
            site,
            listen_port,
            timeout: connect_timeout,
        },
    )?;
    let peers: Vec<(usize, std::net::SocketAddr)> = admission
        .peers
        .iter()
        .filter(|p| p.rank != admission.rank)
        .map(|p| (p.rank, p.addr))
        .collect();
    let transport = TcpTransport::join(
        admission.rank,
        listener,
        &peers,
        &key,
        &spec.job.name,
        tcp_options(spec),
    )?;
    Ok(JoinedLate {
        admission,
        transport,
        site: site.to_string(),
    })
}

/// The TCP transport's options from the job file. A training job's mesh
/// is joinable: ranks may join it while it trains.
fn tcp_options(spec: &JobSpec) -> TcpOptions {
    TcpOptions {
        max_frame: spec.network.max_frame,
        connect_timeout: Duration::from_secs_f64(spec.network.connect_timeout_s),
        default_timeout: Duration::from_secs_f64(spec.network.collective_timeout_s),
        joinable: spec.job.task == Task::Train,
        ..TcpOptions::default()
    }
}

/// Connects the transport of the world's fabric.
fn open_transport(
    spec: &JobSpec,
    plan: &Plan,
    world: &World,
    listener: TcpListener,
    key: &JobKey,
    run_id: &str,
) -> Result<RankTransport, JoinError> {
    let connect_timeout = Duration::from_secs_f64(spec.network.connect_timeout_s);
    let default_timeout = Duration::from_secs_f64(spec.network.collective_timeout_s);
    Ok(match world_fabric(spec, plan) {
        Fabric::Tcp => RankTransport::Tcp(TcpTransport::connect(
            world.rank,
            listener,
            &world.addrs(),
            key,
            &spec.job.name,
            tcp_options(spec),
        )?),
        #[cfg(feature = "mpi")]
        Fabric::Mpi => {
            let t = crate::transport::mpi::MpiTransport::init(default_timeout)?;
            if (t.rank(), t.size()) != (world.rank, world.size) {
                return Err(JoinError::FabricUnusable {
                    fabric: Fabric::Mpi,
                    reason: format!(
                        "MPI says rank {}/{}, the launcher said {}/{}: start the ranks with mpirun",
                        t.rank(),
                        t.size(),
                        world.rank,
                        world.size
                    ),
                });
            }
            RankTransport::Mpi(t)
        }
        #[cfg(not(feature = "mpi"))]
        Fabric::Mpi => return Err(JoinError::FabricNotBuilt(Fabric::Mpi, "mpi")),
        Fabric::Nccl => return Err(JoinError::FabricNotBuilt(Fabric::Nccl, "cuda")),
        Fabric::Shm => {
            if let Some(other) = world.peers.iter().find(|p| p.host != world.me().host) {
                return Err(JoinError::FabricUnusable {
                    fabric: Fabric::Shm,
                    reason: format!(
                        "rank {} is on host {}, not {}: shared memory needs one host",
                        other.rank,
                        other.host,
                        world.me().host
                    ),
                });
            }
            // Every rank of this run derives the same name; runs differ.
            let name: String = format!("swarmrun-{}-{run_id}", spec.job.name)
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "._-".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .take(200)
                .collect();
            RankTransport::Shm(Box::new(ShmTransport::open(
                &name,
                world.rank,
                world.size,
                ShmOptions {
                    timeout: default_timeout,
                    join_timeout: connect_timeout,
                    chunk_bytes: spec.network.shm_chunk,
                    ..ShmOptions::default()
                },
            )?))
        }
    })
}

/// The fabric the world's transport uses: the site's own when the whole
/// world is one site, else TCP, the one fabric that crosses sites.
fn world_fabric(spec: &JobSpec, plan: &Plan) -> Fabric {
    let first = plan.ranks.first().map(|r| r.site.as_str());
    let one_site = plan.ranks.iter().all(|r| Some(r.site.as_str()) == first);
    match spec.sites.iter().find(|s| Some(s.name.as_str()) == first) {
        Some(site) if one_site => site.fabric,
        _ => Fabric::Tcp,
    }
}

/// Time since `swarmrun launch` started, when it told us.
fn launch_t0_elapsed() -> Option<Duration> {
    let t0_us: u64 = std::env::var(ENV_LAUNCH_T0_US).ok()?.parse().ok()?;
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_micros() as u64;
    Some(Duration::from_micros(now_us.saturating_sub(t0_us)))
}
