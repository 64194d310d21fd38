//! The orchestrator (rank 0): routes every microbatch, notices lost
//! miners, re-routes their work, and closes each window in two phases
//! (reduce everywhere, then step everywhere) so that no stage applies an
//! update another stage may still have to redo.

mod membership;

use membership::Heard;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::protocol::{
    self, AuditTask, CheckpointTask, Order, Receipt, Reduction, Report, Route, SliceTask, Verdict,
};
use super::train::{adamw_config, crash_if_planned, miners_of, Setup, TrainError, WindowReport};
use crate::checkpoint::{Checkpoints, Manifest, StageEntry};
use crate::collective::{scales_for, slice_holders};
use crate::config::{HoldPhase, JobSpec, PassClock, Plan, Role};
use crate::data::rng::SplitMix64;
use crate::ledger::{Ledger, Tally};
use crate::model::{AdamW, StageModel};
use crate::pipeline::{InFlight, Router};
use crate::transport::{Transport, TransportError};
use crate::world::Membership;

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
/// With `membership` (the book of a job whose door is open), ranks that
/// join while it trains are placed on stages, and the book is kept
/// current as ranks leave.
pub fn orchestrate<T: Transport + ?Sized>(
    t: &T,
    spec: &JobSpec,
    plan: &Plan,
    start: &StartPoint,
    membership: Option<Arc<Membership>>,
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
    let (weights, optimizers) = start_digests(spec, &setup, start)?;
    let run_dir = spec.job.run_dir();
    let ledger = match &start.resumed {
        Some(m) => Ledger::resume(&run_dir, m.window)?,
        None => Ledger::create(&run_dir)?,
    };
    let mut o = Orchestrator {
        t,
        spec,
        start,
        router,
        listeners: (1..t.size()).collect(),
        miners,
        validators: plan
            .ranks
            .iter()
            .filter(|r| r.role == Role::Validator)
            .map(|r| r.rank)
            .collect(),
        weights,
        optimizers,
        draws: SplitMix64::new(unpredictable_seed(), 0),
        ledger,
        modelled: match spec.faults.clock {
            PassClock::Wall => None,
            PassClock::Model => Some(modelled_pass_seconds(&setup)?),
        },
        setup,
        planned: plan.ranks.len(),
        membership,
        joining: BTreeSet::new(),
        joined_ever: BTreeSet::new(),
        leaving: BTreeSet::new(),
        departed: BTreeSet::new(),
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
    /// Validator ranks still in the job.
    validators: Vec<usize>,
    /// Digest of each stage's weights at the start of the window.
    weights: Vec<String>,
    /// Digest of each stage's optimizer state then, when known.
    optimizers: Vec<Option<String>>,
    /// Which passes validators replay: seeded from the OS, not from the
    /// job, so that no miner can tell which of its passes will be checked.
    draws: SplitMix64,
    /// Each window's credited passes and failed checks, per miner.
    ledger: Ledger,
    /// Ranks of the plan: every rank id from here on joined later.
    planned: usize,
    /// The door's book, when ranks may join.
    membership: Option<Arc<Membership>>,
    /// Ranks that joined and wait for a stage.
    joining: BTreeSet<usize>,
    /// Every rank that ever joined.
    joined_ever: BTreeSet<usize>,
    /// Miners that asked to leave at the end of the window.
    leaving: BTreeSet<usize>,
    /// Ranks gone for good: lost, excluded or left.
    departed: BTreeSet<usize>,
    /// Under `[faults] clock = "model"`, the seconds a training pass of
    /// each stage counts as (before its miner's slowdown).
    modelled: Option<Vec<f64>>,
}

enum Event {
    Report(usize, Report),
    Lost(usize),
}

/// How phase two ended: the checkpoint committed, the writers whose
/// checkpoint failed its audit (excluded, with their stages), and the
/// validators' seconds.
struct StepOutcome {
    checkpoint: Option<PathBuf>,
    caught: Vec<(usize, usize)>,
    audit_s: f64,
}

/// How phase one of closing ended.
struct Closed {
    /// Miners lost meanwhile: their work must be redone; empty when every
    /// stage reduced.
    lost: Vec<usize>,
    /// What each miner stated about its all-reduce.
    reductions: BTreeMap<usize, Reduction>,
    /// Each stage's fixed-point scales, as the `Close` order gave them.
    scales: Vec<Vec<i32>>,
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
    /// The receipt of each training pass `(id, stage)` and its miner.
    receipts: BTreeMap<(u64, usize), (usize, Receipt)>,
    /// Passes replayed and found right, with their miner.
    passed: BTreeSet<(u64, usize, usize)>,
    /// Passes replayed and found wrong.
    wrong: u64,
    /// All-reduce slices recomputed, all attempts included.
    recomputed: u64,
    /// Checks each miner failed, and its stage.
    failed: BTreeMap<usize, (usize, u64)>,
    /// Seconds validators spent replaying.
    replay_s: f64,
}

impl WindowState {
    /// The training microbatches done, with their final paths: the ones
    /// the window's update counts.
    fn trained(&self) -> impl Iterator<Item = (u64, &[usize])> + '_ {
        self.flight
            .done()
            .filter(|(id, _)| !protocol::is_validation(*id))
    }
}

impl<T: Transport + ?Sized> Orchestrator<'_, T> {
    fn window(&mut self, window: u64, evals: u64) -> Result<WindowReport, TrainError> {
        let started = Instant::now();
        self.place(window)?;
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
            receipts: BTreeMap::new(),
            passed: BTreeSet::new(),
            wrong: 0,
            recomputed: 0,
            failed: BTreeMap::new(),
            replay_s: 0.0,
        };
        // Until an attempt ends with every stage reduced and nobody caught
        // or lost; the work of miners caught or lost is redone without them.
        let reductions = loop {
            self.serve(&mut w)?;
            let mut gone = self.audit(&mut w)?;
            if gone.is_empty() {
                let closed = self.close(&w)?;
                gone = if closed.lost.is_empty() {
                    self.recompute(&mut w, &closed)?
                } else {
                    closed.lost
                };
                if gone.is_empty() {
                    break closed.reductions;
                }
            }
            for rank in gone {
                w.flight.lose(rank);
            }
            self.next_attempt(&mut w)?;
        };
        let stepped = self.step(window, &reductions)?;
        for &(rank, stage) in &stepped.caught {
            w.failed.entry(rank).or_insert((stage, 0)).1 += 1;
        }
        self.ledger.append(window, &tallies(&w))?;
        self.dismiss_leavers(window)?;

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
            checkpoint: stepped.checkpoint,
            compression: (w.wire_bytes > 0).then(|| w.dense_bytes as f64 / w.wire_bytes as f64),
            compute_s: w.busy_s,
            replayed: w.passed.len() as u64 + w.wrong,
            recomputed: w.recomputed,
            replay_s: w.replay_s + stepped.audit_s,
            caught: w.failed.keys().copied().collect(),
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
                            receipt,
                        },
                    ) if window == w.window && attempt == w.attempt => {
                        if let Some(receipt) = receipt {
                            w.receipts.insert((id, stage), (from, *receipt));
                        }
                        // A validation pass runs forward only: its time
                        // says nothing of a training pass's.
                        if !protocol::is_validation(id) {
                            let seconds = match &self.modelled {
                                Some(per_stage) => {
                                    per_stage[stage] * self.spec.faults.slowdown(from)
                                }
                                None => compute_s,
                            };
                            self.router.observe(from, seconds);
                        }
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

    /// Has validators replay a random `replay_rate` of the window's passes
    /// not yet replayed, and every pass whose receipts do not chain with
    /// its neighbours' (what one stated it sent, the other that it
    /// received). Returns the miners caught, told to stop and gone from
    /// the job; the window must then be redone without them.
    fn audit(&mut self, w: &mut WindowState) -> Result<Vec<usize>, TrainError> {
        if self.validators.is_empty() {
            return Ok(Vec::new());
        }
        let rate = self.spec.roles.replay_rate;
        // (pass that sent, pass that received) for each break in a chain.
        let mut breaks = Vec::new();
        let done: Vec<(u64, usize)> = w.trained().map(|(id, path)| (id, path.len())).collect();
        // Each miner's passes not replayed yet.
        let mut unchecked: BTreeMap<usize, Vec<(u64, usize)>> = BTreeMap::new();
        for &(id, stages) in &done {
            for stage in 0..stages {
                if let Some((miner, _)) = w.receipts.get(&(id, stage)) {
                    if !w.passed.contains(&(id, stage, *miner)) {
                        unchecked.entry(*miner).or_default().push((id, stage));
                    }
                }
            }
        }
        let mut picked: BTreeSet<(u64, usize)> = BTreeSet::new();
        for passes in unchecked.values_mut() {
            picked.extend(self.draw(rate, passes));
        }
        for (id, stages) in done {
            for stage in 1..stages {
                let (Some((_, up)), Some((_, down))) = (
                    w.receipts.get(&(id, stage - 1)),
                    w.receipts.get(&(id, stage)),
                ) else {
                    continue;
                };
                if down.input.as_ref() != Some(&up.output) {
                    breaks.push(((id, stage - 1), (id, stage)));
                }
                if up.grad_in != down.grad_out {
                    breaks.push(((id, stage), (id, stage - 1)));
                }
            }
        }
        for &(sender, receiver) in &breaks {
            picked.extend([sender, receiver]);
        }
        let tasks: Vec<AuditTask> = picked
            .iter()
            .filter_map(|&(id, stage)| {
                let (miner, receipt) = w.receipts.get(&(id, stage))?;
                Some(AuditTask {
                    id,
                    stage,
                    miner: *miner,
                    validator: self.validators[*miner % self.validators.len()],
                    receipt: receipt.clone(),
                })
            })
            .collect();
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        self.broadcast(&Order::Audit {
            window: w.window,
            attempt: w.attempt,
            tasks: tasks.clone(),
            weights: self.weights.clone(),
        })?;
        let mut reasons: BTreeMap<usize, String> = BTreeMap::new();
        let verdicts =
            self.owed_reports(tasks.iter().map(|t| t.validator), |report| match report {
                Report::Audited {
                    window,
                    attempt,
                    task,
                    verdict,
                    replay_s,
                } if (window, attempt) == (w.window, w.attempt) => {
                    w.replay_s += replay_s;
                    Some((task, verdict))
                }
                _ => None,
            })?;
        for (task, verdict) in verdicts {
            match verdict {
                Verdict::Passed => {
                    w.passed.insert((task.id, task.stage, task.miner));
                }
                Verdict::Failed(reason) => {
                    w.wrong += 1;
                    w.failed.entry(task.miner).or_insert((task.stage, 0)).1 += 1;
                    reasons.entry(task.miner).or_insert(reason);
                }
                Verdict::Unavailable => {}
            }
        }
        // A break between two passes that both replayed right: the
        // receiver kept (and stated) a frame its sender never sent.
        for &(sender, receiver) in &breaks {
            let miner_of = |pass: (u64, usize)| w.receipts.get(&pass).map(|(m, _)| *m);
            let (Some(s), Some(r)) = (miner_of(sender), miner_of(receiver)) else {
                continue;
            };
            let right = |pass: (u64, usize), m| w.passed.contains(&(pass.0, pass.1, m));
            if right(sender, s) && right(receiver, r) {
                w.failed.entry(r).or_insert((receiver.1, 0)).1 += 1;
                reasons.entry(r).or_insert(format!(
                    "microbatch {}: it stated a frame that miner {s} never sent",
                    receiver.0
                ));
            }
        }
        self.exclude_all(w.window, &reasons)
    }

    /// Has validators recompute, from the contributions the miners stated,
    /// a random `slice_audit_rate` of each stage's all-reduce slices, and
    /// every slice of a stage whose copies disagreed. Returns the miners
    /// caught (a holder whose copy is not the sum, a contributor that sent
    /// other numbers than it stated), told to stop and gone from the job.
    fn recompute(
        &mut self,
        w: &mut WindowState,
        closed: &Closed,
    ) -> Result<Vec<usize>, TrainError> {
        let reductions = &closed.reductions;
        let rate = self.spec.roles.slice_audit_rate;
        let mut tasks = Vec::new();
        let mut disagreed = Vec::new();
        for (stage, peers) in self.stage_miners().into_iter().enumerate() {
            let n = peers.len();
            let copies = self.spec.roles.slice_copies.min(n);
            let stated = |r: &usize| reductions.get(r);
            let agreed = peers.iter().all(|r| stated(r).is_some_and(|x| x.agreed));
            let mut slices: Vec<usize> = (0..n).collect();
            let picked = if agreed {
                self.draw(rate, &mut slices).to_vec()
            } else {
                disagreed.push(stage);
                slices
            };
            if self.validators.is_empty() {
                continue;
            }
            // The slice whose task carries the contribution check.
            let proved = picked
                .get(self.draws.below(picked.len().max(1) as u64) as usize)
                .copied();
            for slice in picked {
                let contributors = peers
                    .iter()
                    .map(|r| {
                        let digest = stated(r).and_then(|x| x.contributions.get(slice));
                        (*r, digest.cloned().unwrap_or_default())
                    })
                    .collect();
                let holders = slice_holders(slice, n, copies)
                    .into_iter()
                    .map(|h| {
                        let copy = stated(&peers[h]).and_then(|x| {
                            x.copies.iter().find(|(j, _)| *j == slice).map(|(_, d)| d)
                        });
                        (peers[h], copy.cloned().unwrap_or_default())
                    })
                    .collect();
                let passes = (proved == Some(slice)).then(|| {
                    peers
                        .iter()
                        .map(|&r| {
                            let credited =
                                w.trained().filter(|(_, path)| path.get(stage) == Some(&r));
                            credited
                                .filter_map(|(id, _)| {
                                    let (_, receipt) = w.receipts.get(&(id, stage))?;
                                    Some((id, receipt.params.clone()))
                                })
                                .collect()
                        })
                        .collect()
                });
                tasks.push(SliceTask {
                    stage,
                    slice,
                    validator: self.validators[tasks.len() % self.validators.len()],
                    contributors,
                    holders,
                    scales: closed.scales.get(stage).cloned().unwrap_or_default(),
                    passes,
                    probe: self.draws.next_u64(),
                });
            }
        }
        let mut reasons: BTreeMap<usize, String> = BTreeMap::new();
        if !tasks.is_empty() {
            self.broadcast(&Order::Recompute {
                window: w.window,
                attempt: w.attempt,
                tasks: tasks.clone(),
            })?;
            let verdicts =
                self.owed_reports(tasks.iter().map(|t| t.validator), |report| match report {
                    Report::Recomputed {
                        window,
                        attempt,
                        task,
                        verdicts,
                        replay_s,
                    } if (window, attempt) == (w.window, w.attempt) => {
                        w.replay_s += replay_s;
                        Some((task, verdicts))
                    }
                    _ => None,
                })?;
            w.recomputed += tasks.len() as u64;
            for (task, verdicts) in verdicts {
                for (miner, verdict) in verdicts {
                    if let Verdict::Failed(reason) = verdict {
                        w.failed.entry(miner).or_insert((task.stage, 0)).1 += 1;
                        reasons.entry(miner).or_insert(format!(
                            "slice {} of stage {}'s all-reduce: {reason}",
                            task.slice, task.stage
                        ));
                    }
                }
            }
        }
        if let (Some(&stage), true) = (disagreed.first(), reasons.is_empty()) {
            return Err(TrainError::Protocol {
                rank: 0,
                reason: format!(
                    "window {}: the copies of a slice of stage {stage}'s all-reduce disagree \
                     and no validator found whose copy was wrong",
                    w.window
                ),
            });
        }
        self.exclude_all(w.window, &reasons)
    }

    /// Excludes every miner in `reasons` still in the job; returns them.
    fn exclude_all(
        &mut self,
        window: u64,
        reasons: &BTreeMap<usize, String>,
    ) -> Result<Vec<usize>, TrainError> {
        let caught: Vec<usize> = reasons
            .keys()
            .copied()
            .filter(|r| self.miners.contains_key(r))
            .collect();
        for &rank in &caught {
            self.exclude(rank, window, &reasons[&rank])?;
        }
        Ok(caught)
    }

    /// Moves a random sample of `items`, `rate * items.len()` of them (see
    /// [`Orchestrator::sample_size`]), to the front and returns it.
    fn draw<'i, I>(&mut self, rate: f64, items: &'i mut [I]) -> &'i [I] {
        let k = self.sample_size(rate, items.len());
        for i in 0..k {
            let j = i + self.draws.below((items.len() - i) as u64) as usize;
            items.swap(i, j);
        }
        &items[..k]
    }

    /// How many of a miner's `n` passes to replay: `rate * n` rounded down
    /// or up at random, so that the mean is `rate * n` exactly and a miner
    /// that serves many passes in a window has at least `floor(rate * n)`
    /// of them checked (drawing each pass alone would leave a miner of 20
    /// passes unchecked in 36% of windows at rate 0.05).
    fn sample_size(&mut self, rate: f64, n: usize) -> usize {
        let want = rate * n as f64;
        let k = want.floor() as usize + usize::from(self.draws.unit_open0() <= want.fract());
        k.min(n)
    }

    /// One report from a validator for each entry of `owed` (a validator
    /// rank per task), as `take` accepts them (reports of earlier attempts
    /// it refuses are dropped); a validator lost on the way leaves its
    /// reports unmade.
    fn owed_reports<R>(
        &mut self,
        owed: impl Iterator<Item = usize>,
        mut take: impl FnMut(Report) -> Option<R>,
    ) -> Result<Vec<R>, TrainError> {
        let mut count: BTreeMap<usize, usize> = BTreeMap::new();
        for v in owed {
            *count.entry(v).or_default() += 1;
        }
        let mut taken = Vec::new();
        let deadline = Instant::now() + self.t.default_timeout();
        loop {
            let owing: Vec<usize> = count
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(v, _)| *v)
                .collect();
            if owing.is_empty() {
                break;
            }
            match self.t.recv_any(&owing, protocol::REPORT_TAG, deadline) {
                Ok((v, bytes)) => {
                    if let Some(r) = take(protocol::decode_report(&bytes, v)?) {
                        *count.entry(v).or_default() -= 1;
                        taken.push(r);
                    }
                }
                Err(TransportError::PeerLost { rank: v, reason }) => {
                    eprintln!("orchestrator: lost validator {v} ({reason})");
                    count.remove(&v);
                    self.validators.retain(|&r| r != v);
                    self.listeners.remove(&v);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(taken)
    }

    /// Tells a miner caught cheating to leave; the job goes on without it.
    fn exclude(&mut self, rank: usize, window: u64, reason: &str) -> Result<(), TrainError> {
        self.send_stop(rank)?;
        self.lose(
            rank,
            &format!("failed a check in window {window}: {reason}; excluded"),
        );
        Ok(())
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
    /// done microbatches.
    fn close(&mut self, w: &WindowState) -> Result<Closed, TrainError> {
        let counted = w
            .trained()
            .map(|(id, path)| Route {
                id,
                path: path.to_vec(),
            })
            .collect();
        let scales = self.scales(w)?;
        self.broadcast(&Order::Close {
            window: w.window,
            attempt: w.attempt,
            counted,
            stages: self.stage_miners(),
            scales: scales.clone(),
        })?;
        let mut waiting: BTreeSet<usize> = self.miners.keys().copied().collect();
        let mut newly_lost = Vec::new();
        let mut reductions = BTreeMap::new();
        let mut failure = None;
        while !waiting.is_empty() {
            match self.next_event()? {
                Event::Lost(rank) => {
                    waiting.remove(&rank);
                    newly_lost.push(rank);
                }
                Event::Report(
                    from,
                    Report::Reduced {
                        window,
                        attempt,
                        reduction,
                    },
                ) if window == w.window && attempt == w.attempt => {
                    waiting.remove(&from);
                    reductions.insert(from, reduction);
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
        // `[[faults.hold]] phase = "close"`: joins and leaves that come now
        // wait for the boundary.
        newly_lost.extend(self.hold(w.window, HoldPhase::Close)?);
        match failure {
            // The all-reduce blamed a miner that is still connected: a
            // hung peer, which this protocol does not evict.
            Some((rank, reason)) if newly_lost.is_empty() => Err(TrainError::Protocol {
                rank,
                reason: format!("window {} failed to reduce: {reason}", w.window),
            }),
            _ => Ok(Closed {
                lost: newly_lost,
                reductions,
                scales,
            }),
        }
    }

    /// Each stage's fixed-point scales for the window's all-reduce, from the
    /// largest gradient magnitudes the counted passes' receipts state (a
    /// pass that understates them is caught when replayed).
    fn scales(&self, w: &WindowState) -> Result<Vec<Vec<i32>>, TrainError> {
        let mut maxes: Vec<Vec<f32>> = vec![Vec::new(); self.setup.stages];
        for (id, path) in w.trained() {
            for (stage, m) in maxes.iter_mut().enumerate().take(path.len()) {
                let Some((_, receipt)) = w.receipts.get(&(id, stage)) else {
                    continue;
                };
                if m.len() < receipt.maxes.len() {
                    m.resize(receipt.maxes.len(), 0.0);
                }
                for (m, &bits) in m.iter_mut().zip(&receipt.maxes) {
                    let x = f32::from_bits(bits);
                    *m = if x.is_nan() { f32::INFINITY } else { m.max(x) };
                }
            }
        }
        maxes
            .iter()
            .enumerate()
            .map(|(stage, m)| {
                scales_for(m).map_err(|e| TrainError::Protocol {
                    rank: 0,
                    reason: format!("window {}: stage {stage}'s gradients: {e}", w.window),
                })
            })
            .collect()
    }

    /// Phase two: every miner steps; digests must agree within each stage.
    /// When a checkpoint is due, the lowest live miner of each stage writes
    /// its stage, validators audit the files, and the manifest is committed
    /// here if every file passed.
    fn step(
        &mut self,
        window: u64,
        reductions: &BTreeMap<usize, Reduction>,
    ) -> Result<StepOutcome, TrainError> {
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
        let audits = self.checkpoint_tasks(window, &writers, reductions)?;
        self.broadcast(&Order::Step {
            window,
            writers: writers.clone(),
            audits: audits.clone(),
        })?;
        let mut waiting: BTreeSet<usize> = self.miners.keys().copied().collect();
        // Each stage's weights and optimizer digests after the step.
        let mut digests: BTreeMap<usize, (String, String)> = BTreeMap::new();
        let mut entries: BTreeMap<usize, (usize, StageEntry)> = BTreeMap::new();
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
                        optimizer,
                        checkpoint,
                    },
                ) if w == window => {
                    waiting.remove(&from);
                    let stated = (digest, optimizer);
                    if digests.get(&stage).is_some_and(|d| *d != stated) {
                        return Err(TrainError::DigestMismatch { window, stage });
                    }
                    if let Some(w) = self.weights.get_mut(stage) {
                        w.clone_from(&stated.0);
                    }
                    if let Some(o) = self.optimizers.get_mut(stage) {
                        *o = Some(stated.1.clone());
                    }
                    digests.insert(stage, stated);
                    if let Some(entry) = checkpoint.filter(|_| writers.contains(&from)) {
                        entries.insert(entry.stage, (from, entry));
                    }
                }
                Event::Report(..) => {}
            }
        }
        let mut audit_s = 0.0;
        let audited =
            self.owed_reports(audits.iter().map(|a| a.validator), |report| match report {
                Report::CheckpointAudited {
                    window: w,
                    task,
                    file,
                    weights,
                    verdict,
                    replay_s,
                } if w == window => {
                    audit_s += replay_s;
                    Some((task, file, weights, verdict))
                }
                _ => None,
            })?;
        let done = |checkpoint, caught| StepOutcome {
            checkpoint,
            caught,
            audit_s,
        };
        if !due {
            return Ok(done(None, Vec::new()));
        }
        let reasons = checkpoint_faults(&entries, &digests, audited);
        let caught: Vec<(usize, usize)> = self
            .exclude_all(window, &reasons)?
            .into_iter()
            .filter_map(|rank| entries.values().find(|(w, _)| *w == rank))
            .map(|(rank, entry)| (*rank, entry.stage))
            .collect();
        if !caught.is_empty() || entries.len() != self.setup.stages {
            let why = if caught.is_empty() {
                "a checkpoint writer was lost"
            } else {
                "a checkpoint writer failed its audit"
            };
            eprintln!("orchestrator: {why}; no checkpoint for window {window}");
            return Ok(done(None, caught));
        }
        let manifest = Manifest {
            window,
            step: window + 1,
            job: self.start.job_text.clone(),
            seed: self.spec.job.seed,
            stages: entries.into_values().map(|(_, e)| e).collect(),
            router: self.router.state(),
        };
        let checkpoints = Checkpoints::new(&self.spec.job.run_dir());
        let committed = checkpoints.commit(&manifest, train.keep_checkpoints)?;
        Ok(done(Some(committed), caught))
    }

    /// With validators, one audit per checkpoint writer: its stage's agreed
    /// digests before the step and the reduced sum all its miners stated.
    fn checkpoint_tasks(
        &self,
        window: u64,
        writers: &[usize],
        reductions: &BTreeMap<usize, Reduction>,
    ) -> Result<Vec<CheckpointTask>, TrainError> {
        if self.validators.is_empty() {
            return Ok(Vec::new());
        }
        let mut tasks = Vec::new();
        for &writer in writers {
            let Some(&stage) = self.miners.get(&writer) else {
                continue;
            };
            let sums: BTreeSet<Option<&String>> = self
                .miners
                .iter()
                .filter(|(_, s)| **s == stage)
                .map(|(r, _)| reductions.get(r).and_then(|x| x.result.as_ref()))
                .collect();
            let sum = match Vec::from_iter(sums)[..] {
                [Some(sum)] => sum.clone(),
                _ => {
                    return Err(TrainError::Protocol {
                        rank: 0,
                        reason: format!(
                        "window {window}: the miners of stage {stage} state different reduced sums"
                    ),
                    })
                }
            };
            tasks.push(CheckpointTask {
                stage,
                writer,
                validator: self.validators[stage % self.validators.len()],
                weights: self.weights[stage].clone(),
                optimizer: self.optimizers[stage].clone(),
                sum,
            });
        }
        Ok(tasks)
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
                Err(TransportError::PeerLost { .. })
                    if self.miners.contains_key(&r) || self.joining.contains(&r) => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// The next report of any live miner, or the loss of one. Silence from
    /// every miner for the transport's timeout is an error: the job is
    /// stuck, not merely short of a miner. News of joins and leaves is
    /// taken in passing ([`Orchestrator::take_news`]).
    fn next_event(&mut self) -> Result<Event, TrainError> {
        let deadline = Instant::now() + self.t.default_timeout();
        loop {
            if self.miners.is_empty() {
                return Err(TrainError::EmptyStage { stage: 0 });
            }
            match self.next_report(deadline)? {
                Heard::Event(event) => return Ok(event),
                Heard::News => {}
                Heard::Silence if Instant::now() < deadline => {}
                Heard::Silence => {
                    return Err(TrainError::Stalled {
                        waited: self.t.default_timeout(),
                    })
                }
            }
        }
    }

    fn lose(&mut self, rank: usize, reason: &str) {
        let stage = self.miners.remove(&rank);
        self.depart(rank);
        eprintln!(
            "orchestrator: lost miner {rank} of stage {} ({reason}); its microbatches go to the others",
            stage.map_or("?".to_string(), |s| s.to_string())
        );
    }
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
                let model = StageModel::new(&setup.config, &setup.layers, s, setup.seed)?;
                let opt = AdamW::new(adamw_config(spec), model.layout());
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

/// Why each checkpoint writer failed, if any did: its entry states other
/// digests than its stage agreed on after the step (`digests`: weights,
/// optimizer), or a validator found its file is not what the replayed step
/// gives, or the file the validator checked is not the one it stated.
fn checkpoint_faults(
    entries: &BTreeMap<usize, (usize, StageEntry)>,
    digests: &BTreeMap<usize, (String, String)>,
    audited: Vec<(CheckpointTask, Option<String>, Option<String>, Verdict)>,
) -> BTreeMap<usize, String> {
    let mut reasons = BTreeMap::new();
    for (stage, (writer, entry)) in entries {
        let agreed = digests.get(stage);
        let reason = if agreed.map(|d| &d.0) != Some(&entry.weights_digest) {
            "its entry states weights other than its stage's"
        } else if entry.optimizer_digest.as_ref() != agreed.map(|d| &d.1) {
            "its entry states an optimizer state other than its stage's"
        } else {
            continue;
        };
        reasons.insert(*writer, format!("checkpoint of stage {stage}: {reason}"));
    }
    for (task, file, weights, verdict) in audited {
        let Some((writer, entry)) = entries.get(&task.stage) else {
            continue;
        };
        let replayed = digests.get(&task.stage).map(|d| &d.0);
        let reason = match verdict {
            Verdict::Failed(reason) => reason,
            Verdict::Passed if file.as_ref() != Some(&entry.blake3) => {
                "the file it sent the validator is not the one it stated".into()
            }
            Verdict::Passed if weights.as_ref() != replayed => {
                "its stage stepped to other weights than the validator's replay".into()
            }
            Verdict::Passed | Verdict::Unavailable => continue,
        };
        reasons
            .entry(*writer)
            .or_insert(format!("checkpoint of stage {}: {reason}", task.stage));
    }
    reasons
}

/// Each miner's passes counted in the window's update and its failed
/// checks: a miner that failed one is credited nothing.
fn tallies(w: &WindowState) -> Vec<Tally> {
    let mut by_rank: BTreeMap<usize, Tally> = BTreeMap::new();
    for (_, path) in w.trained() {
        for (stage, &rank) in path.iter().enumerate() {
            let tally = by_rank.entry(rank).or_insert(Tally {
                rank,
                stage,
                verified: 0,
                failed: 0,
            });
            tally.verified += 1;
        }
    }
    for (&rank, &(stage, failed)) in &w.failed {
        by_rank.insert(
            rank,
            Tally {
                rank,
                stage,
                verified: 0,
                failed,
            },
        );
    }
    by_rank.into_values().collect()
}
