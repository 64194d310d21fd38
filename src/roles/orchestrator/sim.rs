//! Simulated ranks around a [`Coordinator`]: they answer its orders the
//! way miners and validators do, at once and without models, sockets or
//! clocks, unless a [`Script`] makes them misbehave (a loss, a leave, a
//! join, a cheat). The unit tests drive the orchestrator's decisions with
//! it, and `swarmrun bench sched` times those decisions for thousands of
//! miners.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::machine::{Beginning, Boundary, Coordinator, Input, Output};
use super::StartPoint;
use crate::checkpoint::StageEntry;
use crate::config::JobSpec;
use crate::ledger::Tally;
use crate::pipeline::Router;
use crate::roles::protocol::{
    is_validation, Order, PassSketch, Receipt, Reduction, Report, StageDigests, Verdict,
};
use crate::roles::train::{miners_of, validators_of, Deadlines, Setup, TrainError};

/// How the simulated ranks misbehave.
#[derive(Default)]
pub struct Script {
    /// When the first `Run` of this window arrives, this miner is lost
    /// (its reports for it never come).
    pub lose: Option<(u64, usize)>,
    /// In this window, this miner is lost after the first `n` reports of
    /// the first `Run` came in (the others' later reports still come).
    pub lose_midway: Option<(u64, usize, usize)>,
    /// This rank asks to leave when the first `Run` of the window arrives.
    pub leave: Option<(u64, usize)>,
    /// These ranks join when the first `Run` of the window arrives.
    pub join: Option<(u64, Vec<usize>)>,
    /// The validator finds this miner's passes wrong.
    pub cheater: Option<usize>,
    /// The passes of this microbatch state gradient maxima a thousand
    /// times their stages'.
    pub outlier: Option<u64>,
    /// The passes of this microbatch state a gradient sketch pointing
    /// against their stages'.
    pub flipped: Option<u64>,
    /// This miner states other weights after stepping.
    pub diverges: Option<usize>,
    /// When the first `Run` of this window arrives, this miner stops (as
    /// under SIGSTOP): no report and no answer to a ping ever comes, and
    /// its connection stays open.
    pub stop: Option<(u64, usize)>,
    /// When the first `Run` of this window arrives, this miner's reports
    /// are held back until `n` silences have passed; it answers pings
    /// meanwhile (a miner that is slow, not stopped).
    pub stall: Option<(u64, usize, u32)>,
    /// The orchestrator is lost right after it sent the orders that follow
    /// its handover before this window, and a standby takes over from that
    /// handover (orders already sent are answered; their reports reach the
    /// standby).
    pub take_over: Option<u64>,
    /// This miner cannot go back to the window's start when the standby
    /// takes over.
    pub cannot_rewind: Option<usize>,
}

/// What the simulation saw.
#[derive(Default)]
pub struct Seen {
    pub orders: Vec<(Vec<usize>, Order)>,
    pub ledger: Vec<(u64, Vec<Tally>)>,
    pub windows: Vec<(u64, u32, Vec<usize>)>,
    pub departed: Vec<usize>,
    pub commits: Vec<u64>,
    /// Time spent inside the coordinator (not in the simulated ranks).
    pub deciding: Duration,
    pub warnings: Vec<String>,
    /// The ranks of each liveness ping.
    pub pings: Vec<Vec<usize>>,
    /// Each window's deadlines.
    pub deadlines: Vec<Deadlines>,
    /// The window of each state handed to a standby.
    pub handovers: Vec<u64>,
    pub done: bool,
}

/// Simulated ranks around a coordinator.
pub struct Sim {
    script: Script,
    /// Ranks that no longer answer.
    dead: BTreeSet<usize>,
    /// The stage of every miner, as the orders tell it.
    stage_of: BTreeMap<usize, usize>,
    inbox: VecDeque<Input>,
    seen: Seen,
    /// Windows whose first `Run` was seen.
    ran: BTreeSet<u64>,
    /// Ranks stopped by [`Script::stop`].
    stopped: BTreeSet<usize>,
    /// The stalled miner of [`Script::stall`], its held reports, and the
    /// silences still to pass.
    stalled: Option<(usize, Vec<Input>, u32)>,
    /// The handover the standby takes over from, once it is due.
    handed: Option<Boundary>,
}

/// Simulated time per input, and per silence (nothing left to hear).
const TICK: Duration = Duration::from_millis(1);
const SILENCE: Duration = Duration::from_millis(500);
/// Silences after which a simulation that never ends is cut.
const MAX_SILENCES: u32 = 10_000;

impl Sim {
    fn new(script: Script) -> Sim {
        Sim {
            script,
            dead: BTreeSet::new(),
            stage_of: BTreeMap::new(),
            inbox: VecDeque::new(),
            seen: Seen::default(),
            ran: BTreeSet::new(),
            stopped: BTreeSet::new(),
            stalled: None,
            handed: None,
        }
    }

    /// The gradient sketch stated for microbatch `id` as its miners
    /// reduce: entries between 1 and 2, so that every pass points with the
    /// others, unless the script flips it.
    fn sketch(&self, id: u64) -> Vec<u32> {
        let sign = match self.script.flipped == Some(id) {
            true => -1.0,
            false => 1.0,
        };
        (0..8)
            .map(|j| (sign * (1.0 + ((id * 7 + j) % 13) as f32 / 13.0)).to_bits())
            .collect()
    }

    /// The gradient maxima stated for microbatch `id`: near 1, no two
    /// passes alike, unless the script makes it an outlier.
    fn maxes(&self, id: u64) -> Vec<u32> {
        let scale = match self.script.outlier == Some(id) {
            true => 1000.0,
            false => 1.0,
        };
        (0..3)
            .map(|j| (scale * (1.0 + ((id * 3 + j) % 97) as f32 / 1000.0)).to_bits())
            .collect()
    }

    /// Runs the job to its end (or the coordinator's error).
    pub fn run(spec: &JobSpec, script: Script) -> (Seen, Result<(), TrainError>) {
        let mut sim = Sim::new(script);
        let result = sim.drive(spec);
        (sim.seen, result)
    }

    /// [`Sim::run`] of a job that must finish: what was seen, or a panic
    /// with the coordinator's error.
    #[cfg(test)]
    pub fn finished(spec: &JobSpec, script: Script) -> Seen {
        let (seen, result) = Sim::run(spec, script);
        if let Err(e) = result {
            panic!("the simulated job failed: {e}");
        }
        seen
    }

    /// Answers the coordinator of `spec`'s plan until the job is done,
    /// timing the coordinator's decisions in [`Seen::deciding`].
    fn drive(&mut self, spec: &JobSpec) -> Result<(), TrainError> {
        let start = StartPoint {
            resumed: None,
            job_text: String::new(),
        };
        let plan = spec.plan(None).map_err(|e| TrainError::Protocol {
            rank: 0,
            reason: e.to_string(),
        })?;
        let stages = spec.pipeline.stages;
        let coordinator = || -> Result<Coordinator<'_>, TrainError> {
            Ok(Coordinator::new(
                spec,
                &start,
                Beginning {
                    setup: Setup::new(spec)?,
                    router: Router::new(stages, &miners_of(&plan), spec.job.seed),
                    validators: validators_of(&plan),
                    planned: plan.ranks.len(),
                    weights: (0..stages).map(|s| format!("start{s}")).collect(),
                    optimizers: (0..stages).map(|s| Some(format!("adam{s}"))).collect(),
                    seed: 7,
                    modelled: None,
                    timeout: Duration::from_secs(60),
                    sites: plan
                        .ranks
                        .iter()
                        .map(|r| (r.rank, r.site.clone()))
                        .collect(),
                },
            ))
        };
        let mut c = coordinator()?;
        let mut now = Instant::now();
        let timed = Instant::now();
        let outputs = c.begin(now)?;
        self.seen.deciding += timed.elapsed();
        self.take(outputs);
        let mut silences = 0;
        while !self.seen.done {
            let input = match self.inbox.pop_front() {
                Some(input) => {
                    now += TICK;
                    input
                }
                // Nothing to hear: time passes.
                None if silences < MAX_SILENCES => {
                    silences += 1;
                    now += SILENCE;
                    self.pass_silence();
                    Input::Silence
                }
                None => break,
            };
            let timed = Instant::now();
            let outputs = c.on(input, now)?;
            self.seen.deciding += timed.elapsed();
            self.take(outputs);
            if let Some(from) = self.handed.take() {
                c = coordinator()?;
                let outputs = c.take_over(Some(from), now)?;
                self.take(outputs);
            }
        }
        Ok(())
    }

    /// A silence passes: a stalled miner may catch up.
    fn pass_silence(&mut self) {
        if let Some((_, held, left)) = &mut self.stalled {
            *left = left.saturating_sub(1);
            if *left == 0 {
                let held = std::mem::take(held);
                self.inbox.extend(held);
                self.stalled = None;
            }
        }
    }

    fn take(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send(to, order) => {
                    self.answer(&to, &order);
                    self.seen.orders.push((to, order));
                }
                Output::Window(w) => {
                    self.seen.ledger.push((w.window, w.credits.clone()));
                    self.seen.deadlines.push(w.deadlines);
                    self.seen.windows.push((w.window, w.attempts, w.caught));
                }
                Output::Departed(rank) => {
                    self.dead.insert(rank);
                    self.seen.departed.push(rank);
                }
                Output::Commit(m) => self.seen.commits.push(m.window),
                Output::Handover(b) => {
                    self.seen.handovers.push(b.window);
                    if self.script.take_over == Some(b.window) {
                        self.handed = Some(*b);
                    }
                }
                Output::Line(line) => self.seen.warnings.push(line.text),
                Output::Ping(to, nonce) => {
                    for &r in &to {
                        if !self.dead.contains(&r) && !self.stopped.contains(&r) {
                            self.inbox
                                .push_back(Input::Report(r, Report::Alive { nonce }));
                        }
                    }
                    self.seen.pings.push(to);
                }
                Output::Done => self.seen.done = true,
            }
        }
    }

    fn report(&mut self, from: usize, report: Report) {
        if self.dead.contains(&from) || self.stopped.contains(&from) {
            return;
        }
        match &mut self.stalled {
            Some((rank, held, _)) if *rank == from => held.push(Input::Report(from, report)),
            _ => self.inbox.push_back(Input::Report(from, report)),
        }
    }

    /// What the ranks in `to` say back to `order`.
    fn answer(&mut self, to: &[usize], order: &Order) {
        match order {
            Order::Start { stages, .. } => {
                for (stage, miners) in stages.iter().enumerate() {
                    for &m in miners {
                        self.stage_of.insert(m, stage);
                    }
                }
            }
            Order::Run {
                window,
                attempt,
                routes,
            } => {
                let first = self.ran.insert(*window);
                if first {
                    self.script_events(*window);
                }
                let queued = self.inbox.len();
                for route in routes {
                    let last = route.path.len() - 1;
                    for (stage, &miner) in route.path.iter().enumerate() {
                        let receipt = (!is_validation(route.id)).then(|| {
                            Box::new(Receipt {
                                input: (stage > 0).then(|| format!("a{}-{}", route.id, stage - 1)),
                                output: format!("a{}-{stage}", route.id),
                                grad_in: (stage < last)
                                    .then(|| format!("g{}-{}", route.id, stage + 1)),
                                grad_out: (stage > 0).then(|| format!("g{}-{stage}", route.id)),
                                params: format!("p{}-{stage}", route.id),
                                maxes: self.maxes(route.id),
                            })
                        });
                        self.report(
                            miner,
                            Report::Served {
                                window: *window,
                                attempt: *attempt,
                                id: route.id,
                                stage,
                                compute_s: 0.01,
                                loss: (stage == last).then_some(2.5),
                                dense_bytes: 0,
                                wire_bytes: 0,
                                receipt,
                                wait_s: 0.0,
                            },
                        );
                    }
                }
                match self.script.lose_midway {
                    Some((w, rank, n)) if first && w == *window => {
                        let at = queued + n;
                        let later: Vec<Input> =
                            self.inbox.drain(at.min(self.inbox.len())..).collect();
                        self.inbox
                            .push_back(Input::Lost(rank, "connection reset".into()));
                        let from_others = later
                            .into_iter()
                            .filter(|i| !matches!(i, Input::Report(r, _) if *r == rank));
                        self.inbox.extend(from_others);
                        self.dead.insert(rank);
                    }
                    _ => {}
                }
            }
            Order::Audit {
                window,
                attempt,
                tasks,
                ..
            } => {
                for task in tasks {
                    let verdict = if self.script.cheater == Some(task.miner) {
                        Verdict::Failed("its replay gives other gradients".into())
                    } else {
                        Verdict::Passed
                    };
                    self.report(
                        task.validator,
                        Report::Audited {
                            window: *window,
                            attempt: *attempt,
                            task: Box::new(task.clone()),
                            verdict,
                            replay_s: 0.01,
                        },
                    );
                }
            }
            Order::Close {
                window,
                attempt,
                counted,
                stages,
                ..
            } => {
                for (stage, miners) in stages.iter().enumerate() {
                    for &m in miners.iter().filter(|m| to.contains(m)) {
                        let sketches = counted
                            .iter()
                            .filter(|r| r.path.get(stage) == Some(&m))
                            .map(|r| PassSketch {
                                id: r.id,
                                sketch: self.sketch(r.id),
                            })
                            .collect();
                        let reduction = Reduction {
                            contributions: (0..miners.len()).map(|j| format!("c{m}-{j}")).collect(),
                            copies: Vec::new(),
                            agreed: true,
                            result: Some(format!("sum{window}-{stage}")),
                            wrong_slices: Vec::new(),
                            across: None,
                        };
                        self.report(
                            m,
                            Report::Reduced {
                                window: *window,
                                attempt: *attempt,
                                reduction: Box::new(reduction),
                                deadline_s: 5.0,
                                reduce_s: 0.01,
                                sketches,
                            },
                        );
                    }
                }
            }
            Order::Recompute {
                window,
                attempt,
                tasks,
            } => {
                for task in tasks {
                    let verdicts = task
                        .contributors
                        .iter()
                        .chain(&task.holders)
                        .map(|(m, _)| (*m, Verdict::Passed))
                        .collect();
                    self.report(
                        task.validator,
                        Report::Recomputed {
                            window: *window,
                            attempt: *attempt,
                            task: Box::new(task.clone()),
                            verdicts,
                            replay_s: 0.01,
                        },
                    );
                }
            }
            Order::Step {
                window,
                writers,
                audits,
                ..
            } => {
                let digests =
                    |stage: usize| (format!("w{window}-{stage}"), format!("o{window}-{stage}"));
                let miners: Vec<(usize, usize)> = self
                    .stage_of
                    .iter()
                    .map(|(m, s)| (*m, *s))
                    .filter(|(m, _)| to.contains(m))
                    .collect();
                for (m, stage) in miners {
                    let (mut digest, optimizer) = digests(stage);
                    if self.script.diverges == Some(m) {
                        digest.push_str("-other");
                    }
                    let checkpoint = writers.contains(&m).then(|| StageEntry {
                        stage,
                        file: format!("stage{stage}.bin"),
                        blake3: format!("file{window}-{stage}"),
                        weights_digest: digest.clone(),
                        optimizer_digest: Some(optimizer.clone()),
                    });
                    self.report(
                        m,
                        Report::Stepped {
                            window: *window,
                            stage,
                            digest,
                            optimizer,
                            checkpoint,
                            step_s: 0.01,
                        },
                    );
                }
                for task in audits {
                    self.report(
                        task.validator,
                        Report::CheckpointAudited {
                            window: *window,
                            task: task.clone(),
                            file: Some(format!("file{window}-{}", task.stage)),
                            weights: Some(digests(task.stage).0),
                            verdict: Verdict::Passed,
                            replay_s: 0.01,
                        },
                    );
                }
            }
            Order::Place {
                window, placements, ..
            } => {
                for p in placements {
                    self.stage_of.insert(p.rank, p.stage);
                    let state = Ok(StageDigests {
                        weights: p.weights.clone(),
                        optimizer: p.optimizer.clone().unwrap_or_default(),
                    });
                    self.report(
                        p.rank,
                        Report::Placed {
                            window: *window,
                            stage: p.stage,
                            state,
                        },
                    );
                }
            }
            Order::Resume { window, stages, .. } => {
                // Every miner goes back to the state its stage had after
                // the previous window's step.
                for (stage, miners) in stages.iter().enumerate() {
                    for &m in miners {
                        self.stage_of.insert(m, stage);
                        let state = window
                            .checked_sub(1)
                            .filter(|_| self.script.cannot_rewind != Some(m))
                            .map(|w| StageDigests {
                                weights: format!("w{w}-{stage}"),
                                optimizer: format!("o{w}-{stage}"),
                            })
                            .ok_or_else(|| "cannot go back".to_string());
                        let rewound = Report::Rewound {
                            window: *window,
                            stage,
                            state,
                        };
                        self.report(m, rewound);
                    }
                }
            }
            Order::Stop => {
                for r in to {
                    self.stage_of.remove(r);
                }
            }
            Order::Countersign { .. } => {}
        }
    }

    /// What the script makes happen as `window` starts serving.
    fn script_events(&mut self, window: u64) {
        if let Some((w, rank)) = self.script.stop {
            if w == window {
                self.stopped.insert(rank);
            }
        }
        if let Some((w, rank, silences)) = self.script.stall {
            if w == window {
                self.stalled = Some((rank, Vec::new(), silences));
            }
        }
        if let Some((w, rank)) = self.script.lose {
            if w == window {
                self.dead.insert(rank);
                self.inbox
                    .push_front(Input::Lost(rank, "connection reset".into()));
            }
        }
        if let Some((w, rank)) = self.script.leave {
            if w == window {
                self.inbox.push_back(Input::Report(rank, Report::Leaving));
            }
        }
        if let Some((w, ranks)) = &self.script.join {
            if *w == window {
                for &rank in ranks {
                    let site = Some("local".to_string());
                    self.inbox.push_back(Input::Joined { rank, site });
                }
            }
        }
    }
}
