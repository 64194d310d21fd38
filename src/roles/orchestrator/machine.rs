//! The orchestrator's decisions as a state machine: it consumes what the
//! ranks say ([`Input`]) with the time it happened, and answers with what
//! to do ([`Output`]): orders to send, lines to print, a checkpoint to
//! commit, a finished window and its ledger credits, liveness pings. It has
//! no sockets, files or clock of its own, and its one source of randomness
//! (which passes are replayed) is seeded by whoever builds it, like
//! Psyche's coordinator `tick(clients, time, seed)`. So routing, joins,
//! leaves and audits are tested without processes (see the tests below),
//! and a benchmark can drive it with thousands of simulated miners.
//!
//! A window runs through phases, each waiting for reports: placing ranks
//! that joined or move ([`super::membership`]), serving the microbatches,
//! closing (every stage reduces while validators replay passes drawn from
//! their receipts, [`super::checks`]; passes whose sketches stand out are
//! replayed after it), recomputing
//! all-reduce slices, stepping (every miner applies the update, a
//! checkpoint may be written and audited). A miner lost, or caught by a
//! check, before the step sends the window back to serving without it, in
//! a new attempt; after the step it only leaves.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::checkpoint::{Manifest, StageEntry};
use crate::config::{HoldPhase, JobSpec};
use crate::data::rng::SplitMix64;
use crate::pipeline::{InFlight, Router, RouterState};
use crate::roles::protocol::{
    self, CheckpointTask, Order, PassSketch, Placement, Receipt, Reduction, Report, Route,
    StageDigests,
};
use crate::roles::train::{
    BubbleCauses, Deadlines, Member, MemberState, Setup, TrainError, WindowReport,
};

use super::liveness::Liveness;
use super::StartPoint;

/// Closes of one window in which a miner says the same owner handed it a
/// slice other than the agreed copy, with no signature to settle it,
/// before both leave: once may be a fault of the moment, twice is a
/// dispute the window cannot close with.
const DISPUTED_CLOSES: u32 = 2;

/// What the orchestrator hears.
#[derive(Debug)]
pub enum Input {
    /// A report from a rank.
    Report(usize, Report),
    /// A rank whose connection is gone, and why.
    Lost(usize, String),
    /// A rank that joined through the door and is ready for a stage; the
    /// site it says it belongs to, when known.
    Joined { rank: usize, site: Option<String> },
    /// Nothing was heard until [`Coordinator::deadline`].
    Silence,
}

/// What the orchestrator does, in order.
#[derive(Debug)]
pub enum Output {
    /// `order` to each of these ranks.
    Send(Vec<usize>, Order),
    /// A liveness ping with this nonce to each of these ranks.
    Ping(Vec<usize>, u64),
    /// A line for the log.
    Line(Line),
    /// `rank` is out of the job for good (the door's book forgets it).
    Departed(usize),
    /// Commit this checkpoint (its stage files are written and audited).
    Commit(Box<Manifest>),
    /// A window is done: append its ledger line (its `credits`), then
    /// report it (its checkpoint is filled in by whoever committed).
    Window(Box<WindowReport>),
    /// Hand the standby this state, and have it acknowledged, before any
    /// order that follows.
    Handover(Box<Boundary>),
    /// Every window ran and every rank was told to stop.
    Done,
}

/// A line the orchestrator says: for a person its text (a warning goes to
/// stderr); for a machine reading the log, what happened to which rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub text: String,
    pub warning: bool,
    pub about: Option<(Happened, usize)>,
}

/// What an event line says happened to a rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Happened {
    Joined,
    Leaving,
    Placed,
    Left,
    Lost,
    Evicted,
    Excluded,
}

impl Happened {
    pub fn name(self) -> &'static str {
        match self {
            Happened::Joined => "joined",
            Happened::Leaving => "leaving",
            Happened::Placed => "placed",
            Happened::Left => "left",
            Happened::Lost => "lost",
            Happened::Evicted => "evicted",
            Happened::Excluded => "excluded",
        }
    }
}

/// The orchestrator's state at the start of a window, before any
/// placement: what a standby needs to run the job on from there. The
/// window in progress is not in it: a standby starts that window again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Boundary {
    /// The window about to run.
    pub window: u64,
    router: RouterState,
    listeners: BTreeSet<usize>,
    miners: BTreeMap<usize, usize>,
    validators: Vec<usize>,
    weights: Vec<String>,
    optimizers: Vec<Option<String>>,
    joining: BTreeMap<usize, Option<String>>,
    joined_ever: BTreeSet<usize>,
    sites: BTreeMap<usize, String>,
    spanning: Vec<Vec<usize>>,
    leaving: BTreeSet<usize>,
    departed: BTreeSet<usize>,
}

/// Where the current window is.
#[derive(Debug)]
pub(super) enum Phase {
    /// A standby that took over: waiting for the miners to go back to the
    /// window's start.
    Rewinding { waiting: BTreeSet<usize> },
    /// `[[faults.hold]]` before the window: waiting for joins or leaves.
    HoldStart,
    /// Waiting for the ranks placed on stages to load them.
    Placing {
        waiting: BTreeSet<usize>,
        /// Each placement, and the stage a mover came from.
        placements: Vec<(Placement, Option<usize>)>,
    },
    /// Microbatches running; `served` holds the stages done per id.
    Serving {
        served: BTreeMap<u64, BTreeSet<usize>>,
    },
    /// Validators replaying passes whose sketches, stated with the close,
    /// stand out (what the close left for the step).
    Auditing(super::checks::PassAudit, Closed),
    /// Every stage all-reducing, and validators replaying the passes drawn
    /// before it.
    Closing {
        waiting: BTreeSet<usize>,
        replays: Option<super::checks::PassAudit>,
        /// The seed of the sketches the miners state as they reduce.
        sketch_seed: u64,
        reductions: BTreeMap<usize, Reduction>,
        failure: Option<(usize, String)>,
        scales: Vec<Vec<i32>>,
        sites: Vec<Vec<usize>>,
        recomputers: Vec<Vec<usize>>,
    },
    /// `[[faults.hold]] phase = "close"`, after every stage reduced.
    HoldClose(Closed),
    /// Validators recomputing all-reduce slices.
    Recomputing(super::checks::SliceAudit, Closed),
    /// Every miner applying the update.
    Stepping(Stepping),
    /// Every window ran.
    Finished,
}

/// What closing left for the step.
#[derive(Debug, Clone)]
pub(super) struct Closed {
    pub reductions: BTreeMap<usize, Reduction>,
    pub scales: Vec<Vec<i32>>,
    pub sketch_seed: u64,
    /// The `Close` order's site ids of each stage's miners.
    pub sites: Vec<Vec<usize>>,
    /// The `Close` order's validators that got each slice's contributions.
    pub recomputers: Vec<Vec<usize>>,
}

/// The step of a window, as its reports come in.
#[derive(Debug)]
pub(super) struct Stepping {
    pub waiting: BTreeSet<usize>,
    pub due: bool,
    pub writers: Vec<usize>,
    /// Checkpoint audits owed, per validator.
    pub owed: BTreeMap<usize, usize>,
    /// Each stage's weights and optimizer digests after the step.
    pub digests: BTreeMap<usize, (String, String)>,
    pub entries: BTreeMap<usize, (usize, StageEntry)>,
    pub audited: Vec<(
        CheckpointTask,
        Option<String>,
        Option<String>,
        protocol::Verdict,
    )>,
    pub audit_s: f64,
}

/// What happened to the microbatches of a window so far.
#[derive(Debug)]
pub(super) struct WindowState {
    pub window: u64,
    pub evals: u64,
    pub started: Instant,
    pub attempt: u32,
    pub flight: InFlight,
    pub losses: BTreeMap<u64, f32>,
    /// Seconds miners spent computing, and training passes they trained:
    /// all attempts included.
    pub busy_s: f64,
    pub trained: u64,
    /// Boundary bytes sent: as computed, and on the wire.
    pub dense_bytes: u64,
    pub wire_bytes: u64,
    /// The receipt of each training pass `(id, stage)` and its miner.
    pub receipts: BTreeMap<(u64, usize), (usize, Receipt)>,
    /// Passes replayed and found right, with their miner (a pass trained
    /// again is new work, and leaves this).
    pub passed: BTreeSet<(u64, usize, usize)>,
    /// The gradient sketch of each pass `(id, stage)` counted by the
    /// current attempt's close, as its miner stated it.
    pub sketches: BTreeMap<(u64, usize), Vec<u32>>,
    /// Passes that were in a uniform draw for replay, with their miner:
    /// all attempts.
    pub pooled: BTreeSet<(u64, usize, usize)>,
    /// Replays drawn as their microbatches finished, this attempt's (see
    /// `Coordinator::draw_done`).
    pub early: Option<super::checks::PassAudit>,
    /// Every pass so drawn and the attempt that drew it: one drawn in an
    /// attempt abandoned before its close is asked for again at the next.
    pub drawn_early: BTreeMap<(u64, usize), u32>,
    /// Each validator and stage whose weights an `Audit` of this attempt
    /// had sent (see `AuditTask::weights_held`).
    pub weights_sent: BTreeSet<(usize, usize)>,
    /// Draws of each miner that paid off what it owed instead of being
    /// replayed.
    pub paid: BTreeMap<usize, usize>,
    /// Training passes routed to each miner, all attempts.
    pub routed: BTreeMap<usize, usize>,
    /// Suspect replays each miner had this attempt.
    pub suspected: BTreeMap<usize, u32>,
    /// Passes replayed, right or wrong: all attempts.
    pub replayed: u64,
    /// All-reduce slices recomputed, all attempts included.
    pub recomputed: u64,
    /// Checks each miner failed, and its stage.
    pub failed: BTreeMap<usize, (usize, u64)>,
    /// Slices handed out wrong without proof, as (the miner that says so,
    /// the owner it names), and how many closes said it: all attempts.
    pub disputes: BTreeMap<(usize, usize), u32>,
    /// Seconds validators spent replaying.
    pub replay_s: f64,
    /// The longest deadline a miner gave a close all-reduce.
    pub close_deadline_s: f64,
    /// Miner-seconds spent waiting for boundary tensors, all-reducing and
    /// stepping, as the miners report them (current attempts only).
    pub wait_s: f64,
    pub reduce_s: f64,
    pub step_s: f64,
    /// Seconds the window spent in validators' checks (replays, slice
    /// recomputes), when every miner waits; and since when, while it does.
    pub audit_wall_s: f64,
    pub audit_since: Option<Instant>,
}

impl WindowState {
    /// The training microbatches done, with their final paths: the ones
    /// the window's update counts.
    pub fn trained(&self) -> impl Iterator<Item = (u64, &[usize])> + '_ {
        self.flight
            .done()
            .filter(|(id, _)| !protocol::is_validation(*id))
    }
}

/// The orchestrator's state: who is in the job, on which stage, how fast,
/// what each stage agreed on, and the window in progress.
pub struct Coordinator<'a> {
    pub(super) spec: &'a JobSpec,
    pub(super) start: &'a StartPoint,
    pub(super) setup: Setup,
    pub(super) router: Router,
    /// Every rank still in the job but this one: miners, validators and
    /// ranks that joined.
    pub(super) listeners: BTreeSet<usize>,
    /// Live miners and their stages.
    pub(super) miners: BTreeMap<usize, usize>,
    /// Validator ranks still in the job.
    pub(super) validators: Vec<usize>,
    /// Digest of each stage's weights at the start of the window.
    pub(super) weights: Vec<String>,
    /// Digest of each stage's optimizer state then, when known.
    pub(super) optimizers: Vec<Option<String>>,
    /// Which passes and slices validators check: seeded by the caller, so
    /// that a run can be unpredictable to miners and a test repeatable.
    pub(super) draws: SplitMix64,
    /// Replays each miner had past its uniform draw's size (suspects),
    /// which its next draws are smaller by: validators replay
    /// `replay_rate` of a miner's passes, suspects included, and never
    /// more than that rate plus the suspects alone. Safe because no miner
    /// can make an honest pass a suspect at will: a replay checks the
    /// maxima and the sketch it stated of the pass. Not handed to a
    /// standby: one that takes over owes nothing, and replays a few
    /// passes more, never fewer.
    pub(super) owed_draws: BTreeMap<usize, usize>,
    /// Ranks of the plan: every rank id from here on joined later.
    pub(super) planned: usize,
    /// Ranks that joined and wait for a stage, with their sites.
    pub(super) joining: BTreeMap<usize, Option<String>>,
    /// Every rank that ever joined.
    pub(super) joined_ever: BTreeSet<usize>,
    /// The site of each rank: the plan's, or the one a joiner named.
    pub(super) sites: BTreeMap<usize, String>,
    /// The miners of each stage that spanned sites at the last close
    /// (empty for a stage inside one site): a change is said once.
    spanning: Vec<Vec<usize>>,
    /// Miners that asked to leave at the end of the window.
    pub(super) leaving: BTreeSet<usize>,
    /// Ranks gone for good: lost, excluded or left.
    pub(super) departed: BTreeSet<usize>,
    /// Each miner's public key, as it told this leader: handed to its
    /// stage's miners in `Close`, and what proofs against it are checked
    /// with.
    pub(super) keys: BTreeMap<usize, String>,
    /// Under `[faults] clock = "model"`, the seconds a training pass of
    /// each stage counts as (before its miner's slowdown).
    pub(super) modelled: Option<Vec<f64>>,
    pub(super) window: Option<WindowState>,
    pub(super) phase: Phase,
    /// When anything was last heard: silence for the default timeout
    /// after it means the job is stuck.
    last_heard: Instant,
    timeout: Duration,
    pub(super) liveness: Liveness,
    /// The first attempt of each window: 0, or for a standby that took
    /// over, [`protocol::ATTEMPTS_PER_LEADER`].
    first_attempt: u32,
    out: Vec<Output>,
}

/// Everything a [`Coordinator`] starts from.
pub struct Beginning {
    pub setup: Setup,
    pub router: Router,
    pub validators: Vec<usize>,
    /// Ranks of the plan (miners, validators and rank 0).
    pub planned: usize,
    pub weights: Vec<String>,
    pub optimizers: Vec<Option<String>>,
    /// Seeds which passes and slices are checked.
    pub seed: u64,
    pub modelled: Option<Vec<f64>>,
    /// How long silence may last before the job counts as stuck.
    pub timeout: Duration,
    /// The site of each rank of the plan.
    pub sites: BTreeMap<usize, String>,
}

impl<'a> Coordinator<'a> {
    pub fn new(spec: &'a JobSpec, start: &'a StartPoint, b: Beginning) -> Coordinator<'a> {
        let miners: BTreeMap<usize, usize> = b.router.assignment().into_iter().collect();
        let mut listeners: BTreeSet<usize> = miners.keys().copied().collect();
        listeners.extend(&b.validators);
        Coordinator {
            spec,
            start,
            setup: b.setup,
            router: b.router,
            listeners,
            miners,
            validators: b.validators,
            weights: b.weights,
            optimizers: b.optimizers,
            draws: SplitMix64::new(b.seed, 0),
            owed_draws: BTreeMap::new(),
            planned: b.planned,
            joining: BTreeMap::new(),
            joined_ever: BTreeSet::new(),
            sites: b.sites,
            spanning: Vec::new(),
            leaving: BTreeSet::new(),
            departed: BTreeSet::new(),
            keys: BTreeMap::new(),
            modelled: b.modelled,
            window: None,
            phase: Phase::Finished,
            last_heard: Instant::now(),
            timeout: b.timeout,
            liveness: Liveness::default(),
            first_attempt: 0,
            out: Vec::new(),
        }
    }

    /// Whether this is an orchestrator with a standby to hand its state to
    /// (a standby that took over has none: its attempts are numbered on).
    fn hands_over(&self) -> bool {
        self.spec.standby_rank().is_some() && self.first_attempt == 0
    }

    /// The state a standby takes over from, before `window`.
    fn boundary(&self, window: u64) -> Boundary {
        Boundary {
            window,
            router: self.router.state(),
            listeners: self.listeners.clone(),
            miners: self.miners.clone(),
            validators: self.validators.clone(),
            weights: self.weights.clone(),
            optimizers: self.optimizers.clone(),
            joining: self.joining.clone(),
            joined_ever: self.joined_ever.clone(),
            sites: self.sites.clone(),
            spanning: self.spanning.clone(),
            leaving: self.leaving.clone(),
            departed: self.departed.clone(),
        }
    }

    /// Leads the job as the standby, the orchestrator being lost: from the
    /// state it last handed over (none: the job's start), the window it
    /// was running starts again. Miners go back to that window's start;
    /// one that cannot is told to stop.
    pub fn take_over(
        &mut self,
        from: Option<Boundary>,
        now: Instant,
    ) -> Result<Vec<Output>, TrainError> {
        self.last_heard = now;
        self.first_attempt = protocol::ATTEMPTS_PER_LEADER;
        let window = match from {
            Some(b) => {
                self.router = Router::from_state(b.router);
                self.listeners = b.listeners;
                self.miners = b.miners;
                self.validators = b.validators;
                self.weights = b.weights;
                self.optimizers = b.optimizers;
                self.joining = b.joining;
                self.joined_ever = b.joined_ever;
                self.sites = b.sites;
                self.spanning = b.spanning;
                self.leaving = b.leaving;
                self.departed = b.departed;
                b.window
            }
            None => self.start.first_window(),
        };
        self.say_warn(format!(
            "standby: the orchestrator is lost; taking over, window {window} starts again"
        ));
        if window < self.spec.train.windows {
            self.broadcast(Order::Resume {
                window,
                stages: self.stage_miners(),
                checkpoint: self.start.resumed.as_ref().map(|m| m.window),
            });
        }
        self.next_window(window, now)?;
        if self.window.is_some() {
            self.phase = Phase::Rewinding {
                waiting: self.miners.keys().copied().collect(),
            };
        }
        self.advance(now)?;
        Ok(std::mem::take(&mut self.out))
    }

    /// Tells every rank its stage and starts the first window.
    pub fn begin(&mut self, now: Instant) -> Result<Vec<Output>, TrainError> {
        self.last_heard = now;
        let start = Order::Start {
            stages: self.stage_miners(),
            checkpoint: self.start.resumed.as_ref().map(|m| m.window),
        };
        self.broadcast(start);
        self.next_window(self.start.first_window(), now)?;
        self.advance(now)?;
        Ok(std::mem::take(&mut self.out))
    }

    /// Takes one input and returns what to do about it.
    pub fn on(&mut self, input: Input, now: Instant) -> Result<Vec<Output>, TrainError> {
        if !matches!(input, Input::Silence) {
            self.last_heard = now;
        }
        if !matches!(
            input,
            Input::Silence | Input::Report(_, Report::Alive { .. })
        ) {
            self.liveness.reported(now);
        }
        match input {
            Input::Silence if now >= self.deadline() => {
                return Err(TrainError::Stalled {
                    waited: self.timeout,
                })
            }
            Input::Silence => {}
            Input::Joined { rank, site } => {
                self.say_about(
                    Happened::Joined,
                    rank,
                    format!("orchestrator: rank {rank} joined; it mines from the next window"),
                );
                if let Some(site) = &site {
                    self.sites.insert(rank, site.clone());
                }
                self.joining.insert(rank, site);
                self.joined_ever.insert(rank);
                self.listeners.insert(rank);
            }
            Input::Report(rank, Report::Leaving) => {
                self.say_about(
                    Happened::Leaving,
                    rank,
                    format!("orchestrator: rank {rank} asked to leave; it goes after this window"),
                );
                self.leaving.insert(rank);
            }
            Input::Report(rank, Report::Joining) => {
                // A joiner whose site the caller did not know.
                return self.on(Input::Joined { rank, site: None }, now);
            }
            Input::Lost(rank, reason) => self.on_lost(rank, &reason)?,
            Input::Report(rank, Report::Alive { nonce }) => {
                self.liveness.answered(rank, nonce, now);
            }
            Input::Report(rank, Report::SigningKey { key }) => {
                self.keys.insert(rank, key);
            }
            Input::Report(rank, report) => self.on_report(rank, report)?,
        }
        self.check_liveness(now)?;
        self.advance(now)?;
        Ok(std::mem::take(&mut self.out))
    }

    /// When silence becomes an error.
    pub fn deadline(&self) -> Instant {
        self.last_heard + self.timeout
    }

    /// Ranks whose reports matter now: everyone in the job, and any rank
    /// id past the plan not known to be gone (a joiner says `Joining`
    /// first). `size` is the transport's count of rank ids.
    pub fn listening(&self, size: usize) -> Vec<usize> {
        let joined_later = (self.planned..size)
            .filter(|r| !self.departed.contains(r) && !self.listeners.contains(r));
        let mut from = self.listeners.clone();
        from.extend(joined_later);
        from.into_iter().collect()
    }

    /// The window in progress, if any.
    pub fn current_window(&self) -> Option<u64> {
        self.window.as_ref().map(|w| w.window)
    }

    // ---- window flow ----

    /// Starts `window`, or ends the job after the last one.
    fn next_window(&mut self, window: u64, now: Instant) -> Result<(), TrainError> {
        let train = &self.spec.train;
        if window >= train.windows {
            self.phase = Phase::Finished;
            self.window = None;
            self.broadcast(Order::Stop);
            self.out.push(Output::Done);
            return Ok(());
        }
        let last = window + 1 == train.windows;
        let evals = if last || (window + 1).is_multiple_of(train.eval_every) {
            train.eval_microbatches
        } else {
            0
        };
        let per_window = self.setup.per_window;
        let train_ids = (0..per_window).map(|i| window * per_window + i);
        let val_ids = (0..evals).map(|i| protocol::VALIDATION | (window * evals + i));
        self.window = Some(WindowState {
            window,
            evals,
            started: now,
            attempt: self.first_attempt,
            flight: InFlight::new(train_ids.chain(val_ids)),
            losses: BTreeMap::new(),
            busy_s: 0.0,
            trained: 0,
            dense_bytes: 0,
            wire_bytes: 0,
            receipts: BTreeMap::new(),
            passed: BTreeSet::new(),
            sketches: BTreeMap::new(),
            pooled: BTreeSet::new(),
            early: None,
            drawn_early: BTreeMap::new(),
            weights_sent: BTreeSet::new(),
            paid: BTreeMap::new(),
            routed: BTreeMap::new(),
            suspected: BTreeMap::new(),
            replayed: 0,
            recomputed: 0,
            failed: BTreeMap::new(),
            disputes: BTreeMap::new(),
            replay_s: 0.0,
            close_deadline_s: 0.0,
            wait_s: 0.0,
            reduce_s: 0.0,
            step_s: 0.0,
            audit_wall_s: 0.0,
            audit_since: None,
        });
        self.announce_hold(window, HoldPhase::Start);
        self.phase = Phase::HoldStart;
        Ok(())
    }

    /// Moves on from phases whose waiting is over, as far as it can.
    fn advance(&mut self, now: Instant) -> Result<(), TrainError> {
        loop {
            let Some(window) = self.window.as_ref().map(|w| w.window) else {
                return Ok(());
            };
            self.clock_audits(now);
            let moved = match &self.phase {
                Phase::Rewinding { waiting } if waiting.is_empty() => {
                    self.phase = Phase::HoldStart;
                    true
                }
                Phase::HoldStart => {
                    self.dismiss_leavers(window.saturating_sub(1));
                    if self.hold_satisfied(window, HoldPhase::Start) {
                        self.place(window)?;
                        true
                    } else {
                        false
                    }
                }
                Phase::Placing { waiting, .. } if waiting.is_empty() => {
                    self.begin_attempt()?;
                    true
                }
                Phase::Serving { .. } => {
                    let flight = &self.window.as_ref().expect("a window runs").flight;
                    if flight.running() > 0 {
                        false
                    } else if flight.is_complete() {
                        self.begin_audit()?;
                        true
                    } else {
                        self.route_attempt()?;
                        true
                    }
                }
                Phase::Auditing(a, _) if a.replies.owes_nothing() => {
                    self.finish_audit()?;
                    true
                }
                Phase::Closing {
                    waiting, replays, ..
                } if waiting.is_empty()
                    && replays.as_ref().is_none_or(|r| r.replies.owes_nothing()) =>
                {
                    self.finish_close()?;
                    true
                }
                Phase::HoldClose(_) if self.hold_satisfied(window, HoldPhase::Close) => {
                    let Phase::HoldClose(closed) =
                        std::mem::replace(&mut self.phase, Phase::Finished)
                    else {
                        unreachable!("matched above")
                    };
                    self.begin_recompute(closed)?;
                    true
                }
                Phase::Recomputing(audit, _) if audit.replies.owes_nothing() => {
                    self.finish_recompute()?;
                    true
                }
                Phase::Stepping(s) if s.waiting.is_empty() && s.owed.is_empty() => {
                    self.finish_step(now)?;
                    true
                }
                _ => false,
            };
            if !moved {
                return Ok(());
            }
        }
    }

    /// Keeps the time the window spends in validators' checks.
    fn clock_audits(&mut self, now: Instant) {
        // Replays beside the close count once every miner has reduced.
        let auditing = match &self.phase {
            Phase::Auditing(..) | Phase::Recomputing(..) => true,
            Phase::Closing {
                waiting, replays, ..
            } => waiting.is_empty() && replays.as_ref().is_some_and(|r| !r.replies.owes_nothing()),
            _ => false,
        };
        let Some(w) = self.window.as_mut() else {
            return;
        };
        match (auditing, w.audit_since) {
            (true, None) => w.audit_since = Some(now),
            (false, Some(since)) => {
                w.audit_wall_s += now.saturating_duration_since(since).as_secs_f64();
                w.audit_since = None;
            }
            _ => {}
        }
    }

    /// Starts a new attempt: what is not done is routed again.
    fn begin_attempt(&mut self) -> Result<(), TrainError> {
        self.phase = Phase::Serving {
            served: BTreeMap::new(),
        };
        self.route_attempt()
    }

    /// Routes every queued microbatch and sends the `Run` order.
    fn route_attempt(&mut self) -> Result<(), TrainError> {
        let queued = self.window.as_ref().expect("a window runs").flight.queued();
        let paths = self.route(queued)?;
        let w = self.window.as_mut().expect("a window runs");
        let mut routes = Vec::new();
        for path in paths {
            if let Some(id) = w.flight.start(path.clone()) {
                if !protocol::is_validation(id) {
                    for &miner in &path {
                        *w.routed.entry(miner).or_default() += 1;
                    }
                }
                routes.push(Route { id, path });
            }
        }
        let order = Order::Run {
            window: w.window,
            attempt: w.attempt,
            routes,
        };
        self.phase = Phase::Serving {
            served: BTreeMap::new(),
        };
        self.broadcast(order);
        Ok(())
    }

    /// Abandons the running attempt after `gone` miners were lost or
    /// caught: their work is queued again, and a new attempt starts.
    pub(super) fn redo_without(&mut self, gone: &[usize]) -> Result<(), TrainError> {
        let w = self.window.as_mut().expect("a window runs");
        for &rank in gone {
            for id in w.flight.lose(rank) {
                // Trained again, a pass is new work: replayed or drawn
                // before, it is neither now.
                w.passed.retain(|p| p.0 != id);
                w.pooled.retain(|p| p.0 != id);
                w.drawn_early.retain(|p, _| p.0 != id);
            }
        }
        w.flight.abandon_running();
        w.early = None;
        // A validator may have dropped a replay of the attempt before
        // loading its bundle.
        w.weights_sent.clear();
        w.attempt += 1;
        if w.attempt >= self.first_attempt + protocol::ATTEMPTS_PER_LEADER {
            return Err(TrainError::Protocol {
                rank: 0,
                reason: format!(
                    "window {} lost miners in {} attempts",
                    w.window,
                    protocol::ATTEMPTS_PER_LEADER
                ),
            });
        }
        self.begin_attempt()
    }

    fn on_report(&mut self, from: usize, report: Report) -> Result<(), TrainError> {
        let Some(w) = self.window.as_mut() else {
            return Ok(());
        };
        let (window, attempt) = (w.window, w.attempt);
        match &mut self.phase {
            Phase::Rewinding { waiting } => {
                if let Report::Rewound {
                    window: rw,
                    stage,
                    state,
                } = report
                {
                    if rw == window && waiting.remove(&from) {
                        self.rewound(from, stage, state);
                    }
                }
            }
            Phase::Placing { waiting, .. } => {
                if let Report::Placed {
                    window: pw,
                    stage,
                    state,
                } = report
                {
                    if pw == window && waiting.remove(&from) {
                        self.placed(from, stage, state)?;
                    }
                }
            }
            Phase::Serving { served } => {
                if let Report::Audited { .. } = report {
                    if let Some(mut early) = w.early.take() {
                        early.take(from, report, w);
                        w.early = Some(early);
                    }
                    return Ok(());
                }
                let Report::Served {
                    window: sw,
                    attempt: sa,
                    id,
                    stage,
                    compute_s,
                    loss,
                    dense_bytes,
                    wire_bytes,
                    receipt,
                    wait_s,
                } = report
                else {
                    return Ok(());
                };
                if (sw, sa) != (window, attempt) {
                    // Late news of an abandoned attempt.
                    return Ok(());
                }
                if let Some(receipt) = receipt {
                    w.trained += 1;
                    w.receipts.insert((id, stage), (from, *receipt));
                }
                // A validation pass runs forward only: its time says
                // nothing of a training pass's.
                if !protocol::is_validation(id) {
                    let seconds = match &self.modelled {
                        Some(per_stage) => per_stage[stage] * self.spec.faults.slowdown(from),
                        None => compute_s,
                    };
                    self.router.observe(from, seconds);
                }
                w.busy_s += compute_s;
                w.wait_s += wait_s;
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
                    if !protocol::is_validation(id) {
                        self.draw_done(id);
                    }
                }
            }
            Phase::Auditing(a, _) => a.take(from, report, w),
            Phase::Recomputing(a, _) => a.take(from, report, w),
            Phase::Closing {
                waiting,
                replays,
                reductions,
                failure,
                ..
            } => match report {
                Report::Audited { .. } => {
                    if let Some(r) = replays {
                        r.take(from, report, w);
                    }
                }
                Report::Reduced {
                    window: rw,
                    attempt: ra,
                    reduction,
                    deadline_s,
                    reduce_s,
                    sketches,
                } if (rw, ra) == (window, attempt) && waiting.remove(&from) => {
                    reductions.insert(from, *reduction);
                    if let Some(&stage) = self.miners.get(&from) {
                        for PassSketch { id, sketch } in sketches {
                            // Only a pass it served, as its receipt says.
                            if w.receipts
                                .get(&(id, stage))
                                .is_some_and(|(m, _)| *m == from)
                            {
                                w.sketches.insert((id, stage), sketch);
                            }
                        }
                    }
                    w.reduce_s += reduce_s;
                    w.close_deadline_s = w.close_deadline_s.max(deadline_s);
                }
                Report::ReduceFailed {
                    window: rw,
                    attempt: ra,
                    reason,
                    disputed,
                } if (rw, ra) == (window, attempt) && waiting.remove(&from) => {
                    if let Some(owner) = disputed {
                        *w.disputes.entry((from, owner)).or_default() += 1;
                    }
                    failure.get_or_insert((from, reason));
                }
                _ => {}
            },
            Phase::Stepping(s) => match report {
                Report::Stepped {
                    window: sw,
                    stage,
                    digest,
                    optimizer,
                    checkpoint,
                    step_s,
                } if sw == window && s.waiting.remove(&from) => {
                    w.step_s += step_s;
                    let stated = (digest, optimizer);
                    if s.digests.get(&stage).is_some_and(|d| *d != stated) {
                        return Err(TrainError::DigestMismatch { window, stage });
                    }
                    if let Some(w) = self.weights.get_mut(stage) {
                        w.clone_from(&stated.0);
                    }
                    if let Some(o) = self.optimizers.get_mut(stage) {
                        *o = Some(stated.1.clone());
                    }
                    s.digests.insert(stage, stated);
                    if let Some(entry) = checkpoint.filter(|_| s.writers.contains(&from)) {
                        s.entries.insert(entry.stage, (from, entry));
                    }
                }
                Report::CheckpointAudited {
                    window: aw,
                    task,
                    file,
                    weights,
                    verdict,
                    replay_s,
                } if aw == window && s.owed.get(&from).is_some_and(|n| *n > 0) => {
                    if let Some(n) = s.owed.get_mut(&from) {
                        *n -= 1;
                        if *n == 0 {
                            s.owed.remove(&from);
                        }
                    }
                    s.audit_s += replay_s;
                    s.audited.push((task, file, weights, verdict));
                }
                _ => {}
            },
            // Late news of an attempt or phase already over.
            Phase::HoldStart | Phase::HoldClose(_) | Phase::Finished => {}
        }
        Ok(())
    }

    pub(super) fn on_lost(&mut self, rank: usize, reason: &str) -> Result<(), TrainError> {
        if self.departed.contains(&rank) {
            return Ok(());
        }
        if self.miners.contains_key(&rank) {
            self.lose(rank, Happened::Lost, reason);
            match &mut self.phase {
                // Its stage already holds the reduced gradients: the loss
                // costs nothing but the miner (and, for a writer, this
                // window's checkpoint).
                Phase::Stepping(s) => {
                    s.waiting.remove(&rank);
                }
                // A source lost: the ranks it was placing report a failure.
                Phase::Placing { waiting, .. } | Phase::Rewinding { waiting } => {
                    waiting.remove(&rank);
                }
                // Nothing runs.
                Phase::HoldStart | Phase::Finished => {}
                // Everything not yet stepped that touched it is redone.
                _ => self.redo_without(&[rank])?,
            }
            return Ok(());
        }
        if self.validators.contains(&rank) {
            self.validators.retain(|&v| v != rank);
            let left = match self.validators.len() {
                0 => "none left: passes go unchecked from now on".to_string(),
                n => format!("{n} left"),
            };
            self.say_about(
                Happened::Lost,
                rank,
                format!("orchestrator: lost validator {rank} ({reason}); {left}"),
            );
            self.depart(rank);
            match &mut self.phase {
                // Its checks are redone by the others in a new attempt,
                // on fresh tags, so that no bundle meant for it is taken
                // for another task. The window's microbatches stay done.
                Phase::Auditing(..)
                | Phase::Recomputing(..)
                | Phase::Closing {
                    replays: Some(_), ..
                } => self.redo_without(&[])?,
                // Replays drawn while serving, likewise: a new attempt
                // asks for them again at its close.
                Phase::Serving { .. }
                    if self
                        .window
                        .as_ref()
                        .and_then(|w| w.early.as_ref())
                        .is_some_and(|early| !early.replies.owes_nothing()) =>
                {
                    self.redo_without(&[])?
                }
                // The step is done; its checkpoint audits go unaudited.
                Phase::Stepping(s) => {
                    s.owed.remove(&rank);
                }
                _ => {}
            }
            return Ok(());
        }
        self.say_about(
            Happened::Lost,
            rank,
            format!("orchestrator: lost rank {rank} before it had a stage ({reason})"),
        );
        if let Phase::Placing { waiting, .. } = &mut self.phase {
            waiting.remove(&rank);
        }
        self.router.remove(rank);
        self.depart(rank);
        Ok(())
    }

    /// Phase two of closing: every stage all-reduces the gradients of the
    /// done microbatches, and states their sketches, while validators work
    /// through `replays`; nothing is applied yet.
    pub(super) fn begin_close(
        &mut self,
        replays: Option<super::checks::PassAudit>,
    ) -> Result<(), TrainError> {
        let w = self.window.as_ref().expect("a window runs");
        let counted = w
            .trained()
            .map(|(id, path)| Route {
                id,
                path: path.to_vec(),
            })
            .collect();
        let scales = super::checks::scales(&self.setup, w)?;
        let stages = self.stage_miners();
        let sites: Vec<Vec<usize>> = stages.iter().map(|m| self.site_ids(m)).collect();
        let (window, attempt) = (w.window, w.attempt);
        self.announce_spanning(&stages, &sites);
        let keys = stages
            .iter()
            .map(|miners| {
                let key = |r: &usize| self.keys.get(r).cloned().unwrap_or_default();
                miners.iter().map(key).collect()
            })
            .collect();
        let sketch_seed = self.draws.next_u64();
        if let Some(w) = self.window.as_mut() {
            w.sketches.clear();
        }
        let recomputers = self.recomputers(&stages, &sites);
        let order = Order::Close {
            window,
            attempt,
            counted,
            stages,
            scales: scales.clone(),
            sites: sites.clone(),
            keys,
            sketch_seed,
            recomputers: recomputers.clone(),
        };
        let miners: Vec<usize> = self.miners.keys().copied().collect();
        self.phase = Phase::Closing {
            waiting: miners.iter().copied().collect(),
            replays,
            sketch_seed,
            reductions: BTreeMap::new(),
            failure: None,
            scales,
            sites,
            recomputers,
        };
        // To the miners alone: a validator replaying beside the close
        // takes any order it hears for the orchestrator moving on.
        self.push(Output::Send(miners, order));
        Ok(())
    }

    fn finish_close(&mut self) -> Result<(), TrainError> {
        let Phase::Closing {
            replays,
            reductions,
            failure,
            scales,
            sites,
            sketch_seed,
            recomputers,
            ..
        } = std::mem::replace(&mut self.phase, Phase::Finished)
        else {
            unreachable!("finish_close runs in Closing")
        };
        // A miner caught by a replay: the close, its work in it, is thrown
        // away.
        if let Some(replays) = replays {
            let gone = self.settle_replays(replays);
            if !gone.is_empty() {
                return self.redo_without(&gone);
            }
        }
        let window = self.window.as_ref().expect("a window runs").window;
        // A dispute between two miners still in the job, said again.
        let repeated = self.window.as_ref().and_then(|w| {
            let both_in = |(said, owner): &(usize, usize)| {
                self.miners.contains_key(said) && self.miners.contains_key(owner)
            };
            w.disputes
                .iter()
                .find(|(pair, &closes)| closes >= DISPUTED_CLOSES && both_in(pair))
                .map(|(&pair, _)| pair)
        });
        if let Some((said, owner)) = repeated {
            // One of the two lies and nothing shows which: both leave,
            // neither blamed (no failed check: what they earned in earlier
            // windows stands), so that the window can close.
            let why = format!(
                "rank {said} said, in {DISPUTED_CLOSES} closes of window {window}, that rank \
                 {owner} handed it a slice of the all-reduce other than the copy agreed on, \
                 and no signature settles it"
            );
            for rank in [said, owner] {
                self.send_stop(rank);
                self.lose(rank, Happened::Excluded, &format!("{why}; both leave"));
            }
            self.liveness.suspect();
            return self.redo_without(&[said, owner]);
        }
        if let Some((rank, reason)) = failure {
            // The all-reduce blamed a peer that is still connected: stopped
            // or merely slow. Everyone is pinged now, so a stopped one is
            // evicted; the close is tried again in a new attempt, whose
            // microbatches are the ones already done.
            self.say_warn(format!(
                "orchestrator: window {window} failed to reduce on rank {rank} ({reason}); \
                 checking who is alive and closing again"
            ));
            self.liveness.suspect();
            return self.redo_without(&[]);
        }
        let reasons = self.judge_handed(&reductions, &sites);
        if !reasons.is_empty() {
            let gone = self.exclude_all(window, &reasons);
            return self.redo_without(&gone);
        }
        let closed = Closed {
            reductions,
            scales,
            sketch_seed,
            sites,
            recomputers,
        };
        match self.replay_by_direction(closed.sketch_seed) {
            Some(replays) => self.phase = Phase::Auditing(replays, closed),
            None => self.hold_close(closed),
        }
        Ok(())
    }

    /// The close is done and judged: on to the slices' recomputation,
    /// after `[[faults.hold]] phase = "close"` if one is due.
    pub(super) fn hold_close(&mut self, closed: Closed) {
        let window = self.window.as_ref().expect("a window runs").window;
        self.announce_hold(window, HoldPhase::Close);
        self.phase = Phase::HoldClose(closed);
    }

    /// Phase two: every miner steps; digests must agree within each stage.
    /// When a checkpoint is due, the lowest live miner of each stage
    /// writes its stage and validators audit the files.
    pub(super) fn begin_step(&mut self, closed: Closed) -> Result<(), TrainError> {
        let window = self.window.as_ref().expect("a window runs").window;
        let train = &self.spec.train;
        let due = train.checkpoint_every > 0
            && ((window + 1).is_multiple_of(train.checkpoint_every) || window + 1 == train.windows);
        let writers: Vec<usize> = if due {
            (0..self.setup.stages)
                .filter_map(|s| self.router.stage_miners(s).into_iter().min())
                .collect()
        } else {
            Vec::new()
        };
        let audits = self.checkpoint_tasks(window, &writers, &closed.reductions)?;
        let mut owed: BTreeMap<usize, usize> = BTreeMap::new();
        for a in &audits {
            *owed.entry(a.validator).or_default() += 1;
        }
        self.phase = Phase::Stepping(Stepping {
            waiting: self.miners.keys().copied().collect(),
            due,
            writers: writers.clone(),
            owed,
            digests: BTreeMap::new(),
            entries: BTreeMap::new(),
            audited: Vec::new(),
            audit_s: 0.0,
        });
        let attempt = self.window.as_ref().expect("a window runs").attempt;
        self.broadcast(Order::Step {
            window,
            attempt,
            writers,
            audits,
        });
        Ok(())
    }

    /// After the step's reports and audits: the checkpoint (if its files
    /// all passed), the ledger line, the leavers, the window's report; then
    /// the next window.
    fn finish_step(&mut self, now: Instant) -> Result<(), TrainError> {
        let Phase::Stepping(s) = std::mem::replace(&mut self.phase, Phase::Finished) else {
            unreachable!("finish_step runs in Stepping")
        };
        let window = self.window.as_ref().expect("a window runs").window;
        let caught = self.judge_checkpoint(window, &s)?;
        let mut w = self.window.take().expect("a window runs");
        for &(rank, stage) in &caught {
            w.failed.entry(rank).or_insert((stage, 0)).1 += 1;
        }
        self.dismiss_leavers(window);
        let (mut train, mut val) = (0.0f64, 0.0f64);
        for (id, loss) in &w.losses {
            if protocol::is_validation(*id) {
                val += f64::from(*loss);
            } else {
                train += f64::from(*loss);
            }
        }
        let per_window = self.setup.per_window;
        let wall = now
            .saturating_duration_since(w.started)
            .as_secs_f64()
            .max(1e-9);
        let tokens = per_window as usize * self.setup.batch_size * self.setup.config.block_size;
        let miner_s = self.miners.len().max(1) as f64 * wall;
        let bubble = 1.0 - w.busy_s / miner_s;
        let causes = {
            let (wait, reduce, step) =
                (w.wait_s / miner_s, w.reduce_s / miner_s, w.step_s / miner_s);
            let audit = w.audit_wall_s / wall;
            BubbleCauses {
                wait,
                reduce,
                step,
                audit,
                idle: (bubble - wait - reduce - step - audit).max(0.0),
            }
        };
        self.out.push(Output::Window(Box::new(WindowReport {
            window,
            mean_loss: (train / per_window as f64) as f32,
            val_loss: (w.evals > 0).then(|| (val / w.evals as f64) as f32),
            tokens_per_s: tokens as f64 / wall,
            bubble,
            causes,
            reduce_s: w.reduce_s,
            dense_bytes: w.dense_bytes,
            wire_bytes: w.wire_bytes,
            attempts: w.attempt - self.first_attempt + 1,
            compression: (w.wire_bytes > 0).then(|| w.dense_bytes as f64 / w.wire_bytes as f64),
            compute_s: w.busy_s,
            trained: w.trained,
            replayed: w.replayed,
            recomputed: w.recomputed,
            replay_s: w.replay_s + s.audit_s,
            caught: w.failed.keys().copied().collect(),
            credits: super::checks::tallies(&w),
            deadlines: {
                let (progress_s, answer_s) = self.liveness.seconds();
                Deadlines {
                    progress_s,
                    answer_s,
                    close_s: w.close_deadline_s,
                }
            },
            roster: self.roster(),
        })));
        if self.hands_over() {
            let boundary = self.boundary(window + 1);
            self.out.push(Output::Handover(Box::new(boundary)));
        }
        self.next_window(window + 1, now)
    }

    /// A miner went back to the window's start after the takeover, or
    /// could not; one that could not, or holds other weights than its
    /// stage had there, is told to stop.
    fn rewound(&mut self, rank: usize, stage: usize, state: Result<StageDigests, String>) {
        let expected = self.miners.get(&rank).copied();
        let problem = match state {
            Err(reason) => Some(reason),
            Ok(_) if expected != Some(stage) => Some(format!(
                "it went back to stage {stage}, not {}",
                expected.map_or("-".to_string(), |s| s.to_string())
            )),
            Ok(d) => {
                let optimizer_ok = self.optimizers[stage]
                    .as_ref()
                    .is_none_or(|o| *o == d.optimizer);
                (d.weights != self.weights[stage] || !optimizer_ok)
                    .then(|| "its state is not the one its stage had".to_string())
            }
        };
        if let Some(reason) = problem {
            self.stop(
                rank,
                Happened::Excluded,
                &format!("could not start the window again ({reason})"),
            );
        }
    }

    // ---- helpers ----

    /// `order` to every rank still in the job.
    pub(super) fn broadcast(&mut self, order: Order) {
        let to = self.listeners.iter().copied().collect();
        self.out.push(Output::Send(to, order));
    }

    pub(super) fn push(&mut self, output: Output) {
        self.out.push(output);
    }

    pub(super) fn say(&mut self, text: String) {
        self.line(text, false, None);
    }

    pub(super) fn say_warn(&mut self, text: String) {
        self.line(text, true, None);
    }

    /// A line about what happened to `rank`: a warning unless it was
    /// placed on a stage.
    pub(super) fn say_about(&mut self, what: Happened, rank: usize, text: String) {
        self.line(text, what != Happened::Placed, Some((what, rank)));
    }

    fn line(&mut self, text: String, warning: bool, about: Option<(Happened, usize)>) {
        self.out.push(Output::Line(Line {
            text,
            warning,
            about,
        }));
    }

    /// The live miners of each stage.
    pub(super) fn stage_miners(&self) -> Vec<Vec<usize>> {
        (0..self.setup.stages)
            .map(|stage| {
                let on = self.miners.iter().filter(|(_, s)| **s == stage);
                on.map(|(r, _)| *r).collect()
            })
            .collect()
    }

    /// Who is in the job now: miners on their stages, validators, joiners
    /// not yet placed, each with its site and whether it is leaving.
    fn roster(&self) -> Vec<Member> {
        let state = |rank: usize| match self.leaving.contains(&rank) {
            true => MemberState::Leaving,
            false => MemberState::Serving,
        };
        let member =
            |rank: usize, stage: Option<usize>, validator: bool, state: MemberState| Member {
                rank,
                stage,
                validator,
                site: self.sites.get(&rank).cloned(),
                state,
            };
        let miners = self
            .miners
            .iter()
            .map(|(&rank, &stage)| member(rank, Some(stage), false, state(rank)));
        let validators = self
            .validators
            .iter()
            .map(|&rank| member(rank, None, true, state(rank)));
        let joining = self
            .joining
            .keys()
            .map(|&rank| member(rank, None, false, MemberState::Joining));
        let mut roster: Vec<Member> = miners.chain(validators).chain(joining).collect();
        roster.sort_by_key(|m| m.rank);
        roster
    }

    /// Says which stages' miners span sites, when that changed.
    fn announce_spanning(&mut self, stages: &[Vec<usize>], sites: &[Vec<usize>]) {
        let mut lines = Vec::new();
        for (stage, (ids, miners)) in sites.iter().zip(stages).enumerate() {
            if !ids.is_empty() && self.spanning.get(stage) != Some(miners) {
                let names: BTreeSet<&str> = miners
                    .iter()
                    .filter_map(|r| self.sites.get(r).map(String::as_str))
                    .collect();
                lines.push(format!(
                    "orchestrator: stage {stage}'s miners span sites {names:?}: it all-reduces \
                     inside each site, then between one leader per site"
                ));
            }
        }
        for line in lines {
            self.say(line);
        }
        self.spanning = stages
            .iter()
            .zip(sites)
            .map(|(m, ids)| {
                if ids.is_empty() {
                    Vec::new()
                } else {
                    m.clone()
                }
            })
            .collect();
    }

    /// The site id of each of `miners` (a stage's, ascending) when they
    /// span sites, numbering the sites in the order of their names; empty
    /// when they share one. A rank that joined without naming a site is a
    /// site of its own.
    fn site_ids(&self, miners: &[usize]) -> Vec<usize> {
        let label = |r: &usize| {
            self.sites
                .get(r)
                .map_or_else(|| format!("\u{0}rank {r}"), String::clone)
        };
        let labels: Vec<String> = miners.iter().map(label).collect();
        let names: BTreeSet<&String> = labels.iter().collect();
        if names.len() < 2 {
            return Vec::new();
        }
        let names: Vec<&String> = names.into_iter().collect();
        labels
            .iter()
            .map(|l| names.iter().position(|n| *n == l).unwrap_or_default())
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

    /// A miner is gone (`what`: lost, evicted or excluded): no route, no
    /// order.
    pub(super) fn lose(&mut self, rank: usize, what: Happened, reason: &str) {
        let stage = self.forget_miner(rank);
        let text = format!(
            "orchestrator: lost miner {rank} of stage {} ({reason}); its microbatches go to the others",
            stage.map_or("?".to_string(), |s| s.to_string())
        );
        self.say_about(what, rank, text);
    }

    /// A miner out of the job for good; its stage, if it had one.
    pub(super) fn forget_miner(&mut self, rank: usize) -> Option<usize> {
        let stage = self.miners.remove(&rank);
        self.depart(rank);
        stage
    }

    /// `rank` is out of the job for good.
    pub(super) fn depart(&mut self, rank: usize) {
        self.listeners.remove(&rank);
        self.joining.remove(&rank);
        self.leaving.remove(&rank);
        self.router.remove(rank);
        self.keys.remove(&rank);
        if self.departed.insert(rank) {
            self.out.push(Output::Departed(rank));
        }
    }
}
