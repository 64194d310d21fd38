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
use crate::transport::{SiteTransport, TcpOptions, TcpTransport, Transport, TransportError};
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
    /// The site's fabric inside the site, TCP to the rest.
    Sites(Box<SiteTransport>),
}

impl RankTransport {
    pub fn as_dyn(&self) -> &dyn Transport {
        match self {
            RankTransport::Tcp(t) => t,
            RankTransport::Shm(t) => t.as_ref(),
            #[cfg(feature = "mpi")]
            RankTransport::Mpi(t) => t,
            RankTransport::Sites(t) => t.as_ref(),
        }
    }

    /// Whether every rank can be reached over the TCP mesh, which is what
    /// ranks that join later need.
    pub fn joinable(&self) -> bool {
        matches!(self, RankTransport::Tcp(_) | RankTransport::Sites(_))
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
        max_message: spec.network.max_message,
        connect_timeout: Duration::from_secs_f64(spec.network.connect_timeout_s),
        default_timeout: Duration::from_secs_f64(spec.network.collective_timeout_s),
        joinable: spec.job.task == Task::Train,
        lanes: spec.network.lanes,
        seal_loopback: spec.network.seal_loopback,
        ..TcpOptions::default()
    }
}

/// Connects this rank's transport. A rank uses its site's fabric to the
/// ranks of its site and TCP to everyone else; a training job's ranks also
/// keep TCP to all, so that ranks joining later (always over TCP) reach
/// them. A job of one site on a local fabric that nobody can join uses
/// that fabric alone.
fn open_transport(
    spec: &JobSpec,
    plan: &Plan,
    world: &World,
    listener: TcpListener,
    key: &JobKey,
    run_id: &str,
) -> Result<RankTransport, JoinError> {
    let me = &plan.ranks[world.rank];
    let fabric = spec.site(&me.site).map_or(Fabric::Tcp, |s| s.fabric);
    let members: Vec<usize> = plan
        .ranks
        .iter()
        .filter(|r| r.site == me.site)
        .map(|r| r.rank)
        .collect();
    let tcp = || {
        TcpTransport::connect(
            world.rank,
            listener,
            &world.addrs(),
            key,
            &spec.job.name,
            tcp_options(spec),
        )
    };
    let tcp_too = members.len() < plan.ranks.len() || spec.job.task == Task::Train;
    Ok(match (fabric, tcp_too) {
        (Fabric::Tcp, _) => RankTransport::Tcp(tcp()?),
        // NCCL carries only the stages' all-reduces (`gpu::nccl`), which
        // set it up over this transport; everything else goes over TCP.
        #[cfg(feature = "cuda")]
        (Fabric::Nccl, _) => RankTransport::Tcp(tcp()?),
        (_, true) if members.len() == 1 => RankTransport::Tcp(tcp()?),
        (fabric, false) => site_fabric(spec, fabric, world, &members, &me.site, run_id)?,
        (fabric, true) => {
            // The site fabric first: its ranks wait for each other there,
            // and the mesh's dialing must not hold them up.
            let local: Box<dyn Transport> =
                match site_fabric(spec, fabric, world, &members, &me.site, run_id)? {
                    RankTransport::Shm(t) => t,
                    #[cfg(feature = "mpi")]
                    RankTransport::Mpi(t) => Box::new(t),
                    other => return Ok(other),
                };
            RankTransport::Sites(Box::new(SiteTransport::new(tcp()?, local, members)?))
        }
    })
}

/// The transport of site `site`'s own fabric among its `members`.
fn site_fabric(
    spec: &JobSpec,
    fabric: Fabric,
    world: &World,
    members: &[usize],
    site: &str,
    run_id: &str,
) -> Result<RankTransport, JoinError> {
    let connect_timeout = Duration::from_secs_f64(spec.network.connect_timeout_s);
    let default_timeout = Duration::from_secs_f64(spec.network.collective_timeout_s);
    let index = members.iter().position(|&r| r == world.rank).unwrap_or(0);
    Ok(match fabric {
        Fabric::Tcp => {
            return Err(JoinError::FabricUnusable {
                fabric,
                reason: "TCP is not a site-local fabric".into(),
            })
        }
        #[cfg(feature = "mpi")]
        Fabric::Mpi => {
            let t = crate::transport::mpi::MpiTransport::init(default_timeout)?;
            if (t.rank(), t.size()) != (index, members.len()) {
                return Err(JoinError::FabricUnusable {
                    fabric: Fabric::Mpi,
                    reason: format!(
                        "MPI says rank {}/{}, the job says rank {}/{} of site {site}: start \
                         each site's ranks with its own mpirun",
                        t.rank(),
                        t.size(),
                        index,
                        members.len()
                    ),
                });
            }
            RankTransport::Mpi(t)
        }
        #[cfg(not(feature = "mpi"))]
        Fabric::Mpi => return Err(JoinError::FabricNotBuilt(Fabric::Mpi, "mpi")),
        // Built with `cuda`, an NCCL site's transport is TCP (see
        // `open_transport`) and never comes here.
        Fabric::Nccl => return Err(JoinError::FabricNotBuilt(Fabric::Nccl, "cuda")),
        Fabric::Shm => {
            let host = &world.me().host;
            let mut site_peers = members.iter().map(|&r| &world.peers[r]);
            if let Some(other) = site_peers.find(|p| &p.host != host) {
                return Err(JoinError::FabricUnusable {
                    fabric: Fabric::Shm,
                    reason: format!(
                        "rank {} of site {site} is on host {}, not {host}: shared memory needs \
                         one host",
                        other.rank, other.host
                    ),
                });
            }
            // Every rank of this site and run derives the same name.
            let name: String = format!("swarmrun-{}-{run_id}-{site}", spec.job.name)
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
                index,
                members.len(),
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

/// Time since `swarmrun launch` started, when it told us.
fn launch_t0_elapsed() -> Option<Duration> {
    let t0_us: u64 = std::env::var(ENV_LAUNCH_T0_US).ok()?.parse().ok()?;
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_micros() as u64;
    Some(Duration::from_micros(now_us.saturating_sub(t0_us)))
}
