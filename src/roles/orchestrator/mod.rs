//! The orchestrator (rank 0): routes every microbatch, notices lost
//! miners, re-routes their work, and closes each window in two phases
//! (reduce everywhere, then step everywhere) so that no stage applies an
//! update another stage may still have to redo.
//!
//! Its decisions are a state machine ([`machine::Coordinator`]: inputs in,
//! outputs out, no I/O); [`orchestrate`] is the shell around it that
//! listens on the transport, sends the orders, and writes the ledger, the
//! checkpoints' manifests and the window lines.

mod checks;
mod liveness;
pub mod machine;
mod membership;
pub mod sim;
mod suspicion;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use machine::{Beginning, Coordinator, Input, Output};

use super::protocol::{self, Handover, Order, Report};
use super::standby::Leading;
use super::train::{
    inject_planned_fault, inject_planned_fault_at, miners_of, send_unless_lost, validators_of,
    Progress, Setup, TrainError,
};
use crate::checkpoint::{Checkpoints, Manifest};
use crate::config::{CrashPhase, JobSpec, PassClock, Plan};
use crate::ledger::{Ledger, SigningKey};
use crate::model::StageModel;
use crate::pipeline::Router;
use crate::transport::{Transport, TransportError};
use crate::world::Membership;

/// How often a wait for reports looks for ranks that joined meanwhile
/// (any message wakes it at once).
const NEWCOMERS: Duration = Duration::from_millis(50);

/// Where a run starts: fresh, or after the newest checkpoint.
#[derive(Debug, Clone)]
pub struct StartPoint {
    /// The checkpoint resumed from.
    pub resumed: Option<Manifest>,
    /// The job file's text, recorded in every checkpoint's manifest.
    pub job_text: String,
}

impl StartPoint {
    /// With `resume`, the newest checkpoint in the run directory (none:
    /// a fresh start). Without it, a run directory that already holds
    /// checkpoints is refused rather than mixed with a new run.
    pub fn find(spec: &JobSpec, job_text: String, resume: bool) -> Result<StartPoint, TrainError> {
        let checkpoints = Checkpoints::new(&spec.job.run_dir());
        let latest = checkpoints.latest()?;
        if let (false, Some(m)) = (resume, &latest) {
            return Err(TrainError::RunDirTaken {
                dir: spec.job.run_dir(),
                window: m.window,
            });
        }
        if let Some(m) = latest
            .as_ref()
            .filter(|m| m.stages.len() != spec.pipeline.stages)
        {
            return Err(TrainError::CheckpointMismatch {
                window: m.window,
                reason: format!(
                    "it has {} stages, the job file {}",
                    m.stages.len(),
                    spec.pipeline.stages
                ),
            });
        }
        Ok(StartPoint {
            resumed: latest,
            job_text,
        })
    }

    /// The first window to run.
    pub fn first_window(&self) -> u64 {
        self.resumed.as_ref().map_or(0, |m| m.window + 1)
    }
}

/// Runs the job's windows from `start`, or from where the lost
/// orchestrator left them (`leading`), telling `report` of each window and
/// each event line as it comes. With `membership` (the book of a job whose
/// door is open), ranks that join while it trains are placed on stages,
/// and the book is kept current as ranks leave.
pub fn orchestrate<T: Transport + ?Sized>(
    t: &T,
    spec: &JobSpec,
    (plan, start, leading): (&Plan, &StartPoint, Leading),
    membership: Option<Arc<Membership>>,
    mut report: impl FnMut(Progress<'_>),
) -> Result<(), TrainError> {
    let setup = Setup::new(spec)?;
    let planned = miners_of(plan);
    let mut router = match &start.resumed {
        // Miners keep the stages they had moved to; those lost before the
        // checkpoint are back, at their planned stage; ranks this run's
        // plan has no miner for are dropped.
        Some(m) => Router::from_state(m.router.clone()),
        None => Router::new(setup.stages, &planned, spec.job.seed),
    };
    for (rank, _) in router.assignment() {
        if !planned.iter().any(|(r, _)| *r == rank) {
            router.remove(rank);
        }
    }
    for &(rank, stage) in &planned {
        router.join(rank, stage);
    }
    let (weights, optimizers) = start_digests(spec, &setup, start)?;
    let run_dir = spec.job.run_dir();
    let ledger = match leading.closed_before(start.resumed.as_ref().map(|m| m.window)) {
        Some(window) => Ledger::resume(&run_dir, window)?,
        None => Ledger::create(&run_dir)?,
    };
    // Each leader signs the lines it appends with a key of its own, added
    // to the run's book and printed here for `swarmrun audit --key`.
    let key = SigningKey::generate()?;
    tracing::info!("ledger: lines signed with key {}", key.public_hex());
    let mut ledger = ledger.signed_by(key)?;
    let modelled = match spec.faults.clock {
        PassClock::Wall => None,
        PassClock::Model => Some(modelled_pass_seconds(&setup)?),
    };
    let mut c = Coordinator::new(
        spec,
        start,
        Beginning {
            setup,
            router,
            validators: validators_of(plan),
            planned: plan.ranks.len(),
            weights,
            optimizers,
            seed: unpredictable_seed(),
            modelled,
            timeout: t.default_timeout(),
            sites: plan
                .ranks
                .iter()
                .map(|r| (r.rank, r.site.clone()))
                .collect(),
        },
    );
    let checkpoints = Checkpoints::new(&run_dir);
    let validators = validators_of(plan);
    let mut due = None;
    let mut current = None;
    let mut standby = match leading {
        Leading::Orchestrator => spec.standby_rank(),
        Leading::TakeOver(_) => None,
    };
    let mut outputs = match leading {
        Leading::Orchestrator => c.begin(Instant::now())?,
        Leading::TakeOver(from) => c.take_over(from.map(|b| *b), Instant::now())?,
    };
    // The window in progress, as a span: its close gives the window's
    // wall time, and events of the window are inside it.
    let mut window_span = tracing::Span::none();
    loop {
        let in_window = window_span.clone().entered();
        for output in outputs {
            match output {
                Output::Send(to, order) => {
                    let bytes = protocol::encode(&order);
                    let half = to.len() / 2;
                    for (i, r) in to.into_iter().enumerate() {
                        if let (true, Order::Close { window, .. }) = (i == half, &order) {
                            inject_planned_fault_at(spec, t.rank(), *window, CrashPhase::Close);
                        }
                        send_unless_lost(t, r, protocol::ORDER_TAG, &bytes)?;
                    }
                    if let Order::Step { window, .. } = order {
                        inject_planned_fault_at(spec, t.rank(), window, CrashPhase::Step);
                    }
                }
                Output::Ping(to, nonce) => {
                    for r in to {
                        send_unless_lost(t, r, protocol::PING_TAG, &nonce.to_le_bytes())?;
                    }
                }
                Output::Line(line) => {
                    let (what, rank) = line.about.map(|(w, r)| (w.name(), r)).unzip();
                    match line.warning {
                        true => tracing::warn!(event = what, rank, "{}", line.text),
                        false => tracing::info!(event = what, rank, "{}", line.text),
                    }
                    report(Progress::Event {
                        line: &line.text,
                        warning: line.warning,
                    });
                }
                Output::Departed(rank) => {
                    if let Some(m) = &membership {
                        m.remove(rank);
                    }
                }
                // Committed after the window's lines are written (below):
                // a leader killed in between resumes from the checkpoint
                // before, and every line after that one is written again,
                // never a window committed without its lines.
                Output::Commit(manifest) => due = Some(manifest),
                Output::Window(w) => {
                    ledger.append(w.window, &w.credits)?;
                    let countersign = Order::Countersign {
                        window: w.window,
                        line: ledger.last_line().to_string(),
                    };
                    let bytes = protocol::encode(&countersign);
                    for &v in &validators {
                        send_unless_lost(t, v, protocol::ORDER_TAG, &bytes)?;
                    }
                    report(Progress::Window(&w));
                    if let Some(manifest) = due.take() {
                        let _span =
                            tracing::info_span!("checkpoint", window = manifest.window).entered();
                        let dir = commit(&checkpoints, &manifest, spec)?;
                        report(Progress::Checkpoint(&dir));
                    }
                }
                Output::Handover(boundary) => {
                    hand_over(t, &mut standby, &Handover::Boundary(boundary))?;
                }
                Output::Done => {
                    hand_over(t, &mut standby, &Handover::Finished)?;
                    return Ok(());
                }
            }
        }
        // A new window's span is the rank's child, not the last window's.
        drop(in_window);
        if c.current_window() != current {
            current = c.current_window();
            window_span = match current {
                Some(window) => tracing::info_span!("window", window),
                None => tracing::Span::none(),
            };
            if let Some(window) = current {
                inject_planned_fault(spec, t.rank(), window);
            }
        }
        let _in_window = window_span.clone().entered();
        let from = c.listening(t.size());
        let until = c.deadline().min(Instant::now() + NEWCOMERS);
        let input = match t.recv_any(&from, protocol::REPORT_TAG, until) {
            Ok((rank, bytes)) => match protocol::decode_report(&bytes, rank)? {
                Report::Joining => Input::Joined {
                    rank,
                    site: membership
                        .as_ref()
                        .and_then(|m| m.peer(rank))
                        .map(|p| p.site),
                },
                report => Input::Report(rank, report),
            },
            Err(TransportError::PeerLost { rank, reason }) => Input::Lost(rank, reason),
            Err(TransportError::NoneArrived { .. }) => Input::Silence,
            Err(e) => return Err(e.into()),
        };
        outputs = c.on(input, Instant::now())?;
    }
}

/// Sends the standby `handover` and waits for its acknowledgement (for a
/// boundary); a standby lost, or silent for the transport's timeout, is
/// given up, and the job goes on without one.
fn hand_over<T: Transport + ?Sized>(
    t: &T,
    standby: &mut Option<usize>,
    handover: &Handover,
) -> Result<(), TrainError> {
    let Some(rank) = *standby else {
        return Ok(());
    };
    let sent = t.send(rank, protocol::STANDBY_TAG, &protocol::encode(handover));
    let acknowledged = sent.and_then(|()| match handover {
        Handover::Boundary(_) => t
            .recv_deadline(
                rank,
                protocol::STANDBY_TAG,
                Instant::now() + t.default_timeout(),
            )
            .map(drop),
        Handover::Finished => Ok(()),
    });
    match acknowledged {
        Ok(()) => Ok(()),
        Err(e @ (TransportError::PeerLost { .. } | TransportError::Timeout { .. })) => {
            tracing::warn!(
                "orchestrator: lost the standby (rank {rank}: {e}); going on without one"
            );
            *standby = None;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Commits a checkpoint whose stage files are written and audited.
fn commit(
    checkpoints: &Checkpoints,
    manifest: &Manifest,
    spec: &JobSpec,
) -> Result<std::path::PathBuf, TrainError> {
    Ok(checkpoints.commit(manifest, spec.train.keep_checkpoints)?)
}

/// Digests of each stage's weights and optimizer state before the first
/// window: as the seed makes them, or as the checkpoint resumed from
/// records them (miners check their loaded weights against the same
/// entries; older checkpoints do not record the optimizer's).
fn start_digests(
    spec: &JobSpec,
    setup: &Setup,
    start: &StartPoint,
) -> Result<(Vec<String>, Vec<Option<String>>), TrainError> {
    match &start.resumed {
        Some(m) => {
            let mut entries: Vec<_> = m.stages.iter().collect();
            entries.sort_by_key(|e| e.stage);
            Ok(entries
                .iter()
                .map(|e| (e.weights_digest.clone(), e.optimizer_digest.clone()))
                .unzip())
        }
        None => (0..setup.stages)
            .map(|s| {
                let (model, opt) = setup.stage(spec, s)?;
                Ok((
                    model.weights_digest()?.to_hex().to_string(),
                    Some(opt.state_digest().to_hex().to_string()),
                ))
            })
            .collect::<Result<Vec<_>, TrainError>>()
            .map(|pairs| pairs.into_iter().unzip()),
    }
}

/// Under `[faults] clock = "model"`, a miner is timed as if it trained at
/// this rate: any fixed rate gives the same routing, since only ratios of
/// throughputs matter.
const MODELLED_FLOPS_PER_S: f64 = 1e9;

/// The seconds a training pass of each stage counts as under the model
/// clock: its FLOPs (nanoGPT's count) for one microbatch at
/// [`MODELLED_FLOPS_PER_S`].
fn modelled_pass_seconds(setup: &Setup) -> Result<Vec<f64>, TrainError> {
    let tokens = (setup.batch_size * setup.config.block_size) as f64;
    (0..setup.stages)
        .map(|s| {
            let model = StageModel::new(&setup.config, &setup.layers, s, setup.seed)?;
            Ok(model.flops_per_token() * tokens / MODELLED_FLOPS_PER_S)
        })
        .collect()
}

/// A seed no miner can know: the OS's per-process hash keys.
fn unpredictable_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}
