//! The orchestrator (rank 0): routes every microbatch, notices lost
//! miners, re-routes their work, and closes each window in two phases
//! (reduce everywhere, then step everywhere) so that no stage applies an
//! update another stage may still have to redo.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::protocol::{self, Handover, Order, Report, Route};
use super::train::{crash_if_planned, miners_of, Setup, TrainError, WindowReport};
use crate::checkpoint::{Checkpoints, Manifest, StageEntry};
use crate::config::{JobSpec, Plan};
use crate::pipeline::{InFlight, Router};
use crate::transport::{Transport, TransportError};

/// How long one poll waits on one miner when none has anything to say.
const POLL: Duration = Duration::from_millis(1);

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

/// Runs the job's windows from `start`, calling `report` after each.
pub fn orchestrate<T: Transport + ?Sized>(
    t: &T,
    spec: &JobSpec,
    plan: &Plan,
    start: &StartPoint,
    mut report: impl FnMut(&WindowReport),
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
    let miners: BTreeMap<usize, usize> = router.assignment().into_iter().collect();
    let mut o = Orchestrator {
        t,
        spec,
        start,
        router,
        setup,
        listeners: (1..t.size()).collect(),
        miners,
        cursor: 0,
    };
    o.broadcast(&Order::Start {
        stages: o.stage_miners(),
        checkpoint: start.resumed.as_ref().map(|m| m.window),
    })?;
    for window in start.first_window()..spec.train.windows {
        crash_if_planned(spec, t.rank(), window);
        let last_window = window + 1 == spec.train.windows;
        let evals = if last_window || (window + 1) % spec.train.eval_every == 0 {
            spec.train.eval_microbatches
        } else {
            0
        };
        report(&o.window(window, evals)?);
    }
    o.broadcast(&Order::Stop)
}

struct Orchestrator<'a, T: ?Sized> {
    t: &'a T,
    spec: &'a JobSpec,
    start: &'a StartPoint,
    setup: Setup,
    router: Router,
    /// Every rank still in the job but this one: miners and validators.
    listeners: BTreeSet<usize>,
    /// Live miners and their stages.
    miners: BTreeMap<usize, usize>,
    /// Where the next poll starts, so every miner gets heard.
    cursor: usize,
}

enum Event {
    Report(usize, Report),
    Lost(usize),
}

/// What happened to the training microbatches of a window so far.
struct WindowState {
    window: u64,
    attempt: u32,
    flight: InFlight,
    losses: BTreeMap<u64, f32>,
    /// Seconds miners spent computing, all attempts included.
    busy_s: f64,
    /// Boundary bytes sent: as computed, and on the wire.
    dense_bytes: u64,
    wire_bytes: u64,
}

impl<T: Transport + ?Sized> Orchestrator<'_, T> {
    fn window(&mut self, window: u64, evals: u64) -> Result<WindowReport, TrainError> {
        let started = Instant::now();
        let per_window = self.setup.per_window;
        let train_ids = (0..per_window).map(|i| window * per_window + i);
        let val_ids = (0..evals).map(|i| protocol::VALIDATION | (window * evals + i));
        let mut w = WindowState {
            window,
            attempt: 0,
            flight: InFlight::new(train_ids.chain(val_ids)),
            losses: BTreeMap::new(),
            busy_s: 0.0,
            dense_bytes: 0,
            wire_bytes: 0,
        };
        loop {
            self.serve(&mut w)?;
            let newly_lost = self.close(&w)?;
            if newly_lost.is_empty() {
                break;
            }
            for rank in newly_lost {
                w.flight.lose(rank);
            }
            self.next_attempt(&mut w)?;
        }
        let checkpoint = self.step(window)?;

        let (mut train, mut val) = (0.0f64, 0.0f64);
        for (id, loss) in &w.losses {
            if protocol::is_validation(*id) {
                val += f64::from(*loss);
            } else {
                train += f64::from(*loss);
            }
        }
        let wall = started.elapsed().as_secs_f64();
        let tokens = per_window as usize * self.setup.batch_size * self.setup.config.block_size;
        Ok(WindowReport {
            window,
            mean_loss: (train / per_window as f64) as f32,
            val_loss: (evals > 0).then(|| (val / evals as f64) as f32),
            tokens_per_s: tokens as f64 / wall,
            bubble: 1.0 - w.busy_s / (self.miners.len() as f64 * wall),
            attempts: w.attempt + 1,
            checkpoint,
            compression: (w.wire_bytes > 0).then(|| w.dense_bytes as f64 / w.wire_bytes as f64),
        })
    }

    /// Routes and runs attempts until every microbatch of the window is
    /// done.
    fn serve(&mut self, w: &mut WindowState) -> Result<(), TrainError> {
        loop {
            let mut routes = Vec::new();
            for path in self.route(w.flight.queued())? {
                if let Some(id) = w.flight.start(path.clone()) {
                    routes.push(Route { id, path });
                }
            }
            self.broadcast(&Order::Run {
                window: w.window,
                attempt: w.attempt,
                routes,
            })?;
            // Stages that reported each running microbatch.
            let mut served: BTreeMap<u64, BTreeSet<usize>> = BTreeMap::new();
            while w.flight.running() > 0 {
                match self.next_event()? {
                    Event::Lost(rank) => {
                        w.flight.lose(rank);
                        self.next_attempt(w)?;
                        break;
                    }
                    Event::Report(
                        from,
                        Report::Served {
                            window,
                            attempt,
                            id,
                            stage,
                            compute_s,
                            loss,
                            dense_bytes,
                            wire_bytes,
                        },
                    ) if window == w.window && attempt == w.attempt => {
                        self.router.observe(from, compute_s);
                        w.busy_s += compute_s;
                        w.dense_bytes += dense_bytes;
                        w.wire_bytes += wire_bytes;
                        if let Some(loss) = loss {
                            w.losses.insert(id, loss);
                        }
                        let stages = served.entry(id).or_default();
                        stages.insert(stage);
                        let complete = if protocol::is_validation(id) {
                            stage == self.setup.stages - 1
                        } else {
                            stages.len() == self.setup.stages
                        };
                        if complete {
                            w.flight.finish(id);
                        }
                    }
                    // Late news of an abandoned attempt.
                    Event::Report(..) => {}
                }
            }
            if w.flight.is_complete() {
                return Ok(());
            }
        }
    }

    /// Abandons the running attempt: what was running is queued again.
    fn next_attempt(&mut self, w: &mut WindowState) -> Result<(), TrainError> {
        w.flight.abandon_running();
        w.attempt += 1;
        if w.attempt >= protocol::MAX_ATTEMPTS {
            return Err(TrainError::Protocol {
                rank: 0,
                reason: format!(
                    "window {} lost miners in {} attempts",
                    w.window,
                    protocol::MAX_ATTEMPTS
                ),
            });
        }
        Ok(())
    }

    /// Phase one of closing: every stage all-reduces the gradients of the
    /// done microbatches. Returns the miners lost meanwhile (their work
    /// must be redone), empty when every stage reduced.
    fn close(&mut self, w: &WindowState) -> Result<Vec<usize>, TrainError> {
        let counted = w
            .flight
            .done()
            .filter(|(id, _)| !protocol::is_validation(*id))
            .map(|(id, path)| Route {
                id,
                path: path.to_vec(),
            })
            .collect();
        self.broadcast(&Order::Close {
            window: w.window,
            attempt: w.attempt,
            counted,
            stages: self.stage_miners(),
        })?;
        let mut waiting: BTreeSet<usize> = self.miners.keys().copied().collect();
        let mut newly_lost = Vec::new();
        let mut failure = None;
        while !waiting.is_empty() {
            match self.next_event()? {
                Event::Lost(rank) => {
                    waiting.remove(&rank);
                    newly_lost.push(rank);
                }
                Event::Report(from, Report::Reduced { window, attempt })
                    if window == w.window && attempt == w.attempt =>
                {
                    waiting.remove(&from);
                }
                Event::Report(
                    from,
                    Report::ReduceFailed {
                        window,
                        attempt,
                        reason,
                    },
                ) if window == w.window && attempt == w.attempt => {
                    waiting.remove(&from);
                    failure.get_or_insert((from, reason));
                }
                Event::Report(..) => {}
            }
        }
        match failure {
            // The all-reduce blamed a miner that is still connected: a
            // hung peer, which this protocol does not evict.
            Some((rank, reason)) if newly_lost.is_empty() => Err(TrainError::Protocol {
                rank,
                reason: format!("window {} failed to reduce: {reason}", w.window),
            }),
            _ => Ok(newly_lost),
        }
    }

    /// Phase two: every miner steps; digests must agree within each stage.
    /// When a checkpoint is due, the lowest live miner of each stage writes
    /// its stage and the manifest is committed here; returns its directory.
    fn step(&mut self, window: u64) -> Result<Option<PathBuf>, TrainError> {
        let train = &self.spec.train;
        let due = train.checkpoint_every > 0
            && ((window + 1) % train.checkpoint_every == 0 || window + 1 == train.windows);
        let writers: Vec<usize> = if due {
            (0..self.setup.stages)
                .filter_map(|s| self.router.stage_miners(s).into_iter().min())
                .collect()
        } else {
            Vec::new()
        };
        let moves = self.rebalance();
        self.broadcast(&Order::Step {
            window,
            writers: writers.clone(),
            moves,
        })?;
        let mut waiting: BTreeSet<usize> = self.miners.keys().copied().collect();
        let mut digests: BTreeMap<usize, String> = BTreeMap::new();
        let mut entries: BTreeMap<usize, StageEntry> = BTreeMap::new();
        while !waiting.is_empty() {
            match self.next_event()? {
                // Its stage already holds the reduced gradients: the loss
                // costs nothing but the miner (and, for a writer, this
                // window's checkpoint).
                Event::Lost(rank) => {
                    waiting.remove(&rank);
                }
                Event::Report(
                    from,
                    Report::Stepped {
                        window: w,
                        stage,
                        digest,
                        checkpoint,
                    },
                ) if w == window => {
                    waiting.remove(&from);
                    if digests.get(&stage).is_some_and(|d| *d != digest) {
                        return Err(TrainError::DigestMismatch { window, stage });
                    }
                    digests.insert(stage, digest);
                    if let Some(entry) = checkpoint.filter(|_| writers.contains(&from)) {
                        entries.insert(entry.stage, entry);
                    }
                }
                Event::Report(..) => {}
            }
        }
        if !due {
            return Ok(None);
        }
        if entries.len() != self.setup.stages {
            eprintln!(
                "orchestrator: a checkpoint writer was lost; no checkpoint for window {window}"
            );
            return Ok(None);
        }
        let manifest = Manifest {
            window,
            step: window + 1,
            job: self.start.job_text.clone(),
            seed: self.spec.job.seed,
            stages: entries.into_values().collect(),
            router: self.router.state(),
        };
        let checkpoints = Checkpoints::new(&self.spec.job.run_dir());
        Ok(Some(checkpoints.commit(&manifest, train.keep_checkpoints)?))
    }

    /// The live miners of each stage.
    fn stage_miners(&self) -> Vec<Vec<usize>> {
        (0..self.setup.stages)
            .map(|stage| {
                let on = self.miners.iter().filter(|(_, s)| **s == stage);
                on.map(|(r, _)| *r).collect()
            })
            .collect()
    }

    /// At most one move per window, from the stage with the most spare
    /// capacity to the bottleneck, when that raises the pipeline's pace.
    fn rebalance(&mut self) -> Vec<Handover> {
        let Some(mv) = self.router.rebalance() else {
            return Vec::new();
        };
        let Some(donor) = self
            .miners
            .iter()
            .find(|(_, s)| **s == mv.to)
            .map(|(r, _)| *r)
        else {
            return Vec::new();
        };
        self.miners.insert(mv.rank, mv.to);
        println!(
            "moving miner {} from stage {} to stage {} (the bottleneck); miner {donor} hands it the stage",
            mv.rank, mv.from, mv.to
        );
        vec![Handover {
            rank: mv.rank,
            to: mv.to,
            donor,
        }]
    }

    fn route(&mut self, n: usize) -> Result<Vec<Vec<usize>>, TrainError> {
        self.router.route_batch(n).ok_or_else(|| {
            let stage = (0..self.setup.stages)
                .find(|s| self.router.stage_miners(*s).is_empty())
                .unwrap_or(0);
            TrainError::EmptyStage { stage }
        })
    }

    /// Sends `order` to every rank still in the job. A miner that cannot
    /// be reached is left for [`Orchestrator::next_event`] to report.
    fn broadcast(&self, order: &Order) -> Result<(), TrainError> {
        let bytes = protocol::encode(order);
        for &r in &self.listeners {
            match self.t.send(r, protocol::ORDER_TAG, &bytes) {
                Err(TransportError::PeerLost { .. }) if self.miners.contains_key(&r) => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// The next report of any live miner, or the loss of one. Silence from
    /// every miner for the transport's timeout is an error: the job is
    /// stuck, not merely short of a miner.
    fn next_event(&mut self) -> Result<Event, TrainError> {
        let deadline = Instant::now() + self.t.default_timeout();
        loop {
            let live: Vec<usize> = self.miners.keys().copied().collect();
            if live.is_empty() {
                return Err(TrainError::EmptyStage { stage: 0 });
            }
            // One sweep without waiting, then a short wait on one miner.
            for k in 0..=live.len() {
                let rank = live[(self.cursor + k) % live.len()];
                let until = if k < live.len() {
                    Instant::now()
                } else {
                    Instant::now() + POLL
                };
                match self.t.recv_deadline(rank, protocol::REPORT_TAG, until) {
                    Ok(bytes) => {
                        self.cursor = (self.cursor + k + 1) % live.len();
                        return Ok(Event::Report(rank, protocol::decode_report(&bytes, rank)?));
                    }
                    Err(TransportError::Timeout { .. }) => {}
                    Err(TransportError::PeerLost { reason, .. }) => {
                        self.lose(rank, &reason);
                        return Ok(Event::Lost(rank));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            self.cursor = (self.cursor + 1) % live.len();
            if Instant::now() >= deadline {
                return Err(TrainError::Stalled {
                    waited: self.t.default_timeout(),
                });
            }
        }
    }

    fn lose(&mut self, rank: usize, reason: &str) {
        let stage = self.miners.remove(&rank);
        self.listeners.remove(&rank);
        self.router.remove(rank);
        eprintln!(
            "orchestrator: lost miner {rank} of stage {} ({reason}); its microbatches go to the others",
            stage.map_or("?".to_string(), |s| s.to_string())
        );
    }
}
