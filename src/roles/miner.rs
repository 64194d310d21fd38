//! A miner: serves its stage's part of the microbatches routed to it,
//! keeps each one's gradients apart until the window closes, then merges
//! the counted ones with the other miners of its stage.
//!
//! Keeping gradients per microbatch (instead of one running sum) is what
//! lets a window survive a lost miner: the orchestrator decides at close
//! which copy of each microbatch counts, so work redone elsewhere is never
//! added twice, and the fixed-point all-reduce makes the sum the same bits
//! whichever miners did the work.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;

use super::audit::{self, Bundle, Frames};
use super::cheat::{self, Conduct};
use super::device::{DevicePass, StageDevice};
use super::leader::{Leader, Waited};
use super::protocol::{
    self, slice_digest, Across, AuditTask, CheckpointTask, CreditedPass, LeaderPart, Order,
    PassSketch, Placement, Receipt, Reduction, Report, Route, SliceTask, StageDigests,
};
use super::train::{
    inject_planned_fault, inject_planned_fault_at, leave_on_signal, send_unless_lost, Setup,
    TrainError,
};
use super::{handover, liveness};
use crate::checkpoint::{CheckpointError, Checkpoints, StageEntry};
use crate::collective::{
    hierarchical_all_reduce_redundant_checked, Call, CollectiveError, FixedPoint, Group, Handing,
    Partition, ReduceOp, Signing, SitesCopies, SliceCopies, Tampers,
};
use crate::config::{CrashPhase, JobSpec};
use crate::data::Split;
use crate::deadline::{AdaptiveDeadline, DeadlineRule};
use crate::model::{batch_tensors, AdamW, PassGrads, StageInput, StageModel};
use crate::pipeline::BoundaryCodec;
use crate::signing::SigningKey;
use crate::transport::{Transport, TransportError};

/// Serves the stage the orchestrator's `Start` names until told to stop,
/// answering liveness pings throughout.
pub fn mine<T: Transport + ?Sized>(
    t: &T,
    spec: &JobSpec,
    device: StageDevice,
) -> Result<(), TrainError> {
    liveness::following_leader(t, spec, |leader| mine_planned(leader, spec, device))
}

fn mine_planned<T: Transport + ?Sized>(
    leader: &Leader<'_, T>,
    spec: &JobSpec,
    device: StageDevice,
) -> Result<(), TrainError> {
    let setup = Setup::new(spec)?;
    let leaving = leave_on_signal()?;
    let checkpoints = Checkpoints::new(&spec.job.run_dir());
    let me = leader.transport().rank();
    let first = leader.order()?;
    // A standby that took over before this miner heard the orchestrator's
    // `Start` sends `Resume` instead: the same news, and no window ran.
    let (stages, checkpoint, resume) = match first {
        Order::Start { stages, checkpoint } => (stages, checkpoint, None),
        Order::Resume {
            ref stages,
            checkpoint,
            ..
        } => (stages.clone(), checkpoint, Some(first)),
        other => {
            return Err(TrainError::Protocol {
                rank: leader.rank(),
                reason: format!("expected Start, got {other:?}"),
            })
        }
    };
    let stage = stages.iter().position(|miners| miners.contains(&me));
    let stage = stage.ok_or_else(|| TrainError::Protocol {
        rank: leader.rank(),
        reason: format!("Start gives rank {me} no stage"),
    })?;
    let (mut model, mut opt) = setup.stage(spec, stage)?;
    if let Some(window) = checkpoint {
        let manifest = checkpoints.manifest(window)?;
        checkpoints.load_stage(&manifest, &mut model, &mut opt)?;
    }
    let at = checkpoint.map_or(0, |w| w + 1);
    Miner::new(leader, spec, setup, (stage, model, opt), leaving, device)?
        .starting_at(at)
        .serve(resume)
}

/// A rank that joined the running job: says so, waits until the
/// orchestrator places it on a stage (it then takes the stage's state from
/// the stage's miners), and mines that stage until told to stop.
pub fn mine_joined<T: Transport + ?Sized>(
    t: &T,
    spec: &JobSpec,
    device: StageDevice,
) -> Result<(), TrainError> {
    liveness::following_leader(t, spec, |leader| join_and_mine(leader, spec, device))
}

fn join_and_mine<T: Transport + ?Sized>(
    leader: &Leader<'_, T>,
    spec: &JobSpec,
    device: StageDevice,
) -> Result<(), TrainError> {
    let t = leader.transport();
    let setup = Setup::new(spec)?;
    let leaving = leave_on_signal()?;
    let me = t.rank();
    leader.report(&Report::Joining)?;
    let mut announced = false;
    loop {
        if leaving.load(Ordering::SeqCst) && !announced {
            leader.report(&Report::Leaving)?;
            announced = true;
        }
        let Some(order) = leader.order_by(Instant::now() + ORDER_POLL)? else {
            continue;
        };
        match order {
            Order::Place {
                window,
                attempt,
                placements,
            } => {
                let Some(p) = placements.iter().find(|p| p.rank == me) else {
                    continue;
                };
                let placed = handover::receive_state(t, (window, attempt), p, &setup, spec);
                let state = match &placed {
                    Ok((_, _, digests)) => Ok(digests.clone()),
                    Err(e) => Err(e.to_string()),
                };
                leader.report(&Report::Placed {
                    window,
                    stage: p.stage,
                    state,
                })?;
                if let Ok((model, opt, _)) = placed {
                    let state = (p.stage, model, opt);
                    let miner = Miner::new(leader, spec, setup, state, leaving, device)?
                        .starting_at(window);
                    miner.announced.store(announced, Ordering::SeqCst);
                    return miner.serve(None);
                }
            }
            Order::Stop => return Ok(()),
            // The job's business before this rank has a stage.
            _ => {}
        }
    }
}

/// How often a miner waiting for orders looks whether it was asked to
/// leave.
const ORDER_POLL: std::time::Duration = std::time::Duration::from_millis(100);

struct Miner<'a, T: ?Sized> {
    t: &'a T,
    leader: &'a Leader<'a, T>,
    spec: &'a JobSpec,
    checkpoints: Checkpoints,
    setup: Setup,
    stage: usize,
    model: StageModel,
    opt: AdamW,
    /// Where its passes run; it gets `model`'s weights before each window.
    device: StageDevice,
    /// Parameter gradients of each microbatch served this window.
    grads: BTreeMap<u64, KeptGrads>,
    /// The stage's all-reduced gradient sum, waiting for `Step`.
    reduced: Option<(u64, Vec<f32>)>,
    /// What this miner put into its stage's last all-reduce, for validators
    /// recomputing slices of it.
    contribution: Option<Contribution>,
    /// The frames each training microbatch of this window came with, for
    /// validators' replays.
    kept: BTreeMap<u64, Frames>,
    boundary: BoundaryCodec,
    /// Boundary bytes sent and not yet reported: as computed, on the wire.
    unreported: (u64, u64),
    /// Seconds spent waiting for boundary tensors, not yet reported.
    waited_s: f64,
    /// Honest, or this rank's `[[faults.cheat]]`: what it computes passes
    /// through here before it is sent, kept or written.
    conduct: Box<dyn Conduct>,
    /// Set by SIGTERM or SIGINT: leave at the next window boundary.
    leaving: Arc<AtomicBool>,
    /// Whether the orchestrator has been told.
    announced: AtomicBool,
    /// How long its stage's all-reduce may take: a peer silent past this
    /// is blamed, so that a stopped peer holds the close for seconds, not
    /// for the transport's timeout.
    closes: AdaptiveDeadline,
    /// The window whose start this miner's state is, or which runs.
    at: u64,
    /// With a standby orchestrator: the state at the start of the window
    /// that runs, kept until the next, so that a standby taking over can
    /// start that window again (even after this miner stepped it).
    start_of_window: Option<WindowStart>,
    /// Signs its statements of the all-reduce slices it hands out; its
    /// public half goes to each leader, which hands it to the stage.
    key: SigningKey,
}

/// A miner's stage and state at the start of `window`, before any
/// placement.
struct WindowStart {
    window: u64,
    stage: usize,
    state: Vec<u8>,
}

/// Close all-reduces: alike from window to window, so five times the 95th
/// percentile of recent ones is far outside a healthy close; the floor
/// leaves room for a loaded host, and until a few were seen the
/// transport's timeout holds.
const CLOSES: DeadlineRule = DeadlineRule {
    quantile: 0.95,
    margin: 5.0,
    floor_s: 5.0,
    initial_s: 0.0,
    keep: 32,
    min_samples: 3,
};

/// One pass's parameter gradients and the digests of their chunks (its
/// receipt's `params`), kept until the step.
struct KeptGrads {
    params: Vec<f32>,
    chunks: Vec<blake3::Hash>,
}

/// A miner's fixed-point contribution to one all-reduce, cut into the
/// all-reduce's slices, and what it knows of the copies.
struct Contribution {
    window: u64,
    attempt: u32,
    values: Vec<i64>,
    /// The slices of its (site's) all-reduce.
    part: Partition,
    held: Held,
    /// The slices it sent to validators at the close, and to whom.
    sent_early: Vec<(usize, usize)>,
    /// The gradient sketch it stated of each credited pass, by microbatch:
    /// what it shows validators beside the pass's chunks.
    sketches: BTreeMap<u64, Vec<u32>>,
}

/// The copies a miner saw in its stage's all-reduce.
enum Held {
    Flat {
        held: SliceCopies,
        size: usize,
    },
    /// Its stage spans `sites` sites; its own site has `site_size` miners.
    Sites {
        held: SitesCopies<i64>,
        site_size: usize,
        sites: usize,
    },
}

impl Held {
    fn agreed(&self) -> bool {
        match self {
            Held::Flat { held, .. } => held.holds_result(),
            Held::Sites { held, .. } => held.agreed,
        }
    }
}

impl Contribution {
    fn new(window: u64, attempt: u32, values: Vec<i64>, held: Held) -> Contribution {
        let slices = match &held {
            Held::Flat { size, .. } => *size,
            Held::Sites { site_size, .. } => *site_size,
        };
        Contribution {
            window,
            attempt,
            part: Partition::equal(values.len(), slices),
            values,
            held,
            sent_early: Vec::new(),
            sketches: BTreeMap::new(),
        }
    }

    /// The slices of the all-reduce between sites, one per site.
    fn across(&self) -> Option<Partition> {
        match &self.held {
            Held::Sites { sites, .. } => Some(Partition::equal(self.values.len(), *sites)),
            Held::Flat { .. } => None,
        }
    }

    /// What it states in its `Reduced` report, with `result` the digest of
    /// the sum it will apply (when every copy agreed).
    fn statement(&self, result: Option<String>) -> Reduction {
        let digests = |values: &[i64], part: &Partition| {
            (0..part.parts())
                .map(|j| slice_digest(&values[part.range(j)]))
                .collect::<Vec<_>>()
        };
        let stated = |copies: &SliceCopies| {
            copies
                .held
                .iter()
                .map(|(j, d)| (*j, d.to_hex().to_string()))
                .collect::<Vec<_>>()
        };
        let (copies, agreed, across) = match &self.held {
            Held::Flat { held, .. } => (stated(held), held.mismatch.is_none(), None),
            Held::Sites { held, sites, .. } => {
                let part = Partition::equal(self.values.len(), *sites);
                let leader = held.leader.as_ref().map(|(partial, among)| LeaderPart {
                    partial: digests(partial, &part),
                    copies: stated(among),
                    agreed: among.mismatch.is_none(),
                });
                let across = Across {
                    contributions: digests(&self.values, &part),
                    leader,
                };
                (
                    stated(&held.site),
                    held.site.mismatch.is_none(),
                    Some(across),
                )
            }
        };
        let wrong_slices = match &self.held {
            Held::Flat { held, .. } => held.wrong.clone(),
            Held::Sites { .. } => Vec::new(),
        };
        Reduction {
            contributions: digests(&self.values, &self.part),
            copies,
            agreed,
            result,
            wrong_slices,
            across,
        }
    }

    /// A leader's site partial, for a validator between sites.
    fn partial(&self) -> Option<&[i64]> {
        match &self.held {
            Held::Sites { held, .. } => held.leader.as_ref().map(|(p, _)| &p[..]),
            Held::Flat { .. } => None,
        }
    }
}

/// A pass's receipt as far as it is known before its backward pass.
#[derive(Debug, Clone, Default)]
struct Stated {
    input: Option<String>,
    output: String,
    grad_in: Option<String>,
}

/// What a wait on a peer ended with.
enum Wait {
    Got(Vec<u8>),
    /// The orchestrator gave a new order, or the peer is gone and this is
    /// the order that deals with it: the attempt is over for this miner.
    Order(Order),
}

impl<'a, T: Transport + ?Sized> Miner<'a, T> {
    fn new(
        leader: &'a Leader<'a, T>,
        spec: &'a JobSpec,
        setup: Setup,
        (stage, model, opt): (usize, StageModel, AdamW),
        leaving: Arc<AtomicBool>,
        device: StageDevice,
    ) -> Result<Miner<'a, T>, TrainError> {
        let t = leader.transport();
        Ok(Miner {
            t,
            leader,
            spec,
            checkpoints: Checkpoints::new(&spec.job.run_dir()),
            boundary: setup.codec(spec),
            setup,
            stage,
            model,
            opt,
            device,
            grads: BTreeMap::new(),
            reduced: None,
            contribution: None,
            kept: BTreeMap::new(),
            unreported: (0, 0),
            waited_s: 0.0,
            conduct: cheat::conduct(spec, t.rank()),
            leaving,
            announced: AtomicBool::new(false),
            closes: AdaptiveDeadline::new(DeadlineRule {
                initial_s: t.default_timeout().as_secs_f64(),
                ..CLOSES
            }),
            at: 0,
            start_of_window: None,
            key: SigningKey::generate()?,
        })
    }

    fn report_key(&self) -> Result<(), TrainError> {
        self.leader.report(&Report::SigningKey {
            key: self.key.public_hex(),
        })
    }

    /// A miner whose state is the start of `window`.
    fn starting_at(mut self, window: u64) -> Self {
        self.at = window;
        self
    }

    /// Carries out orders, from `first` if given, until told to stop.
    fn serve(mut self, first: Option<Order>) -> Result<(), TrainError> {
        self.report_key()?;
        let mut order = match first {
            Some(order) => order,
            None => self.next_order()?,
        };
        loop {
            if let Some((window, _)) = order.attempt() {
                self.keep_window_start(window)?;
            }
            order = match order {
                Order::Run {
                    window,
                    attempt,
                    routes,
                } => match self.run(window, attempt, &routes)? {
                    Some(next) => next,
                    None => self.next_order()?,
                },
                Order::Close {
                    window,
                    attempt,
                    counted,
                    stages,
                    scales,
                    sites,
                    keys,
                    sketch_seed,
                    recomputers,
                } => {
                    let peers = stages.get(self.stage).cloned().unwrap_or_default();
                    let keys: Vec<Option<String>> = keys
                        .get(self.stage)
                        .filter(|k| k.len() == peers.len())
                        .map(|k| {
                            let known = |key: &String| (!key.is_empty()).then(|| key.clone());
                            k.iter().map(known).collect()
                        })
                        .unwrap_or_else(|| vec![None; peers.len()]);
                    let scales = scales.get(self.stage).cloned().unwrap_or_default();
                    let sites = sites
                        .get(self.stage)
                        .filter(|s| s.len() == peers.len())
                        .cloned()
                        .unwrap_or_default();
                    let scales = (scales, sketch_seed);
                    let recomputers = recomputers.get(self.stage).cloned().unwrap_or_default();
                    let sites = (sites, recomputers);
                    self.close(window, attempt, &counted, (peers, keys), sites, scales)?;
                    self.next_order()?
                }
                Order::Step {
                    window,
                    attempt,
                    writers,
                    audits,
                } => {
                    self.step((window, attempt), &writers, &audits)?;
                    self.next_order()?
                }
                Order::Place {
                    window,
                    attempt,
                    placements,
                } => {
                    self.place((window, attempt), &placements)?;
                    self.next_order()?
                }
                Order::Resume { window, .. } => {
                    let state = self.rewind(window);
                    self.leader.report(&Report::Rewound {
                        window,
                        stage: self.stage,
                        state,
                    })?;
                    // A new leader: it has not heard this miner's key.
                    self.report_key()?;
                    self.next_order()?
                }
                Order::Audit {
                    window,
                    attempt,
                    tasks,
                    ..
                } => {
                    self.answer_audit(window, attempt, &tasks)?;
                    self.next_order()?
                }
                Order::Recompute {
                    window,
                    attempt,
                    tasks,
                } => {
                    self.send_slices(window, attempt, &tasks)?;
                    self.next_order()?
                }
                // For validators.
                Order::Countersign { .. } => self.next_order()?,
                Order::Stop => return Ok(()),
                Order::Start { .. } => {
                    return Err(TrainError::Protocol {
                        rank: self.leader.rank(),
                        reason: "a second Start".into(),
                    })
                }
            }
        }
    }

    /// With a standby: keeps the state as it is at the start of `window`
    /// when this is the window's first order.
    fn keep_window_start(&mut self, window: u64) -> Result<(), TrainError> {
        let kept = self.start_of_window.as_ref().map(|k| k.window);
        let has_standby = self.spec.standby_rank().is_some();
        if has_standby && window == self.at && kept != Some(window) {
            self.start_of_window = Some(WindowStart {
                window,
                stage: self.stage,
                state: handover::state_bytes(&self.model, &self.opt)?,
            });
        }
        Ok(())
    }

    /// Puts back the state kept at the start of `window`, when it changed.
    fn restore_window_start(&mut self, window: u64) -> Result<(), TrainError> {
        match self.start_of_window.take() {
            Some(kept) if kept.window == window => {
                if kept.stage != self.stage {
                    (self.model, self.opt) = self.setup.stage(self.spec, kept.stage)?;
                    self.stage = kept.stage;
                }
                handover::restore(&kept.state, &mut self.model, &mut self.opt)
            }
            // Nothing of `window` ran here: this is its start.
            _ if self.at == window => Ok(()),
            _ => Err(TrainError::Protocol {
                rank: self.leader.rank(),
                reason: format!(
                    "cannot go back to the start of window {window}: this miner is at window {}",
                    self.at
                ),
            }),
        }
    }

    /// Goes back to the start of `window` (a standby took over and starts
    /// it again); the digests there, or why it cannot.
    fn rewind(&mut self, window: u64) -> Result<StageDigests, String> {
        self.restore_window_start(window)
            .map_err(|e| e.to_string())?;
        self.at = window;
        self.grads.clear();
        self.kept.clear();
        self.reduced = None;
        self.contribution = None;
        handover::digests(&self.model, &self.opt).map_err(|e| e.to_string())
    }

    /// The orchestrator's next order, however long it takes; meanwhile,
    /// tells it once if this miner was asked to leave.
    fn next_order(&self) -> Result<Order, TrainError> {
        loop {
            self.announce_leaving()?;
            if let Some(order) = self.leader.order_by(Instant::now() + ORDER_POLL)? {
                return Ok(order);
            }
        }
    }

    /// Says `Leaving` once SIGTERM or SIGINT came: the orchestrator lets
    /// this miner finish its window and stops it after the step.
    fn announce_leaving(&self) -> Result<(), TrainError> {
        if self.leaving.load(Ordering::SeqCst) && !self.announced.swap(true, Ordering::SeqCst) {
            self.leader.report(&Report::Leaving)?;
        }
        Ok(())
    }

    /// Sends this miner's stripe to miners placed on its stage; takes its
    /// own new stage's state when it is the one placed (a move).
    fn place(
        &mut self,
        (window, attempt): (u64, u32),
        placements: &[Placement],
    ) -> Result<(), TrainError> {
        for p in placements.iter().filter(|p| p.stage == self.stage) {
            handover::send_stripe(self.t, (window, attempt), p, &self.model, &self.opt)?;
        }
        let me = self.t.rank();
        let Some(p) = placements.iter().find(|p| p.rank == me) else {
            return Ok(());
        };
        let placed = handover::receive_state(self.t, (window, attempt), p, &self.setup, self.spec);
        let state = match placed {
            Ok((model, opt, digests)) => {
                (self.stage, self.model, self.opt) = (p.stage, model, opt);
                Ok(digests)
            }
            Err(e) => Err(e.to_string()),
        };
        self.leader.report(&Report::Placed {
            window,
            stage: p.stage,
            state,
        })
    }

    fn last(&self) -> usize {
        self.setup.stages - 1
    }

    /// Forwards in ascending id, then backwards in ascending id. Waits only
    /// point upstream in the forward phase and downstream in the backward
    /// phase, in one global id order, so they cannot form a cycle. Returns
    /// the order that cut the attempt short, if one did.
    #[tracing::instrument(name = "passes", skip_all, fields(window = window, attempt = attempt, stage = self.stage))]
    fn run(
        &mut self,
        window: u64,
        attempt: u32,
        routes: &[Route],
    ) -> Result<Option<Order>, TrainError> {
        let me = self.t.rank();
        let stage = self.stage;
        let mine = routes.iter().filter(|r| r.path.get(stage) == Some(&me));
        self.device.prepare(&self.model)?;
        let mut pending: Vec<(&Route, DevicePass, f64, Stated)> = Vec::new();
        for (served, route) in mine.enumerate() {
            let id = route.id;
            let validation = protocol::is_validation(id);
            let split = if validation { Split::Val } else { Split::Train };
            let batch = self.setup.data.batch(
                split,
                id & !protocol::VALIDATION,
                self.setup.seed,
                self.setup.batch_size,
                self.setup.config.block_size,
            )?;
            let (tokens, targets) = batch_tensors(&batch)?;
            let received = if stage == 0 {
                None
            } else {
                let from = route.path[stage - 1];
                match self.wait(from, protocol::activation_tag(id, attempt))? {
                    Wait::Got(bytes) => Some((self.tensor_from(&bytes, from)?, bytes)),
                    Wait::Order(next) => return Ok(Some(next)),
                }
            };
            let _pass = tracing::debug_span!("forward", id, stage).entered();
            let started = Instant::now();
            let frame = received.as_ref().map(|(_, bytes)| bytes.as_slice());
            let codes = self.device.codes_of(&self.boundary, frame)?;
            let pass = self.device.forward(
                &self.model,
                match &received {
                    None => StageInput::Tokens(&tokens),
                    Some((x, _)) => StageInput::Activations(x, &tokens),
                },
                (stage == self.last()).then_some(&targets),
                codes.as_ref(),
            )?;
            let mut stated = Stated {
                input: received.as_ref().map(|(_, bytes)| audit::digest(bytes)),
                ..Stated::default()
            };
            if !validation {
                self.kept.insert(
                    id,
                    Frames {
                        input: received.map(|(_, bytes)| bytes),
                        grad_in: None,
                    },
                );
            }
            if stage == self.last() {
                let loss = pass.loss()?;
                stated.output = audit::digest_f32(&[loss]);
                let receipt = match validation {
                    true => None,
                    false => {
                        let grads = self.device.gradients(&self.model, pass, None)?;
                        match self.keep_and_pass_back(route, attempt, grads, stated)? {
                            Ok(receipt) => Some(receipt),
                            Err(next) => return Ok(Some(next)),
                        }
                    }
                };
                let compute = self.computed_since(started);
                self.served(window, attempt, id, compute, Some(loss), receipt)?;
            } else {
                let compute = self.computed_since(started);
                let output = if validation {
                    pass.output()?
                } else {
                    self.conduct.output(id, &pass.output()?)?
                };
                let bytes = self.encode_boundary(&output)?;
                stated.output = audit::digest(&bytes);
                let to = route.path[stage + 1];
                if let Some(next) = self.send(to, protocol::activation_tag(id, attempt), &bytes)? {
                    return Ok(Some(next));
                }
                if validation {
                    self.served(window, attempt, id, compute, None, None)?;
                } else {
                    pending.push((route, pass, compute, stated));
                }
            }
            if served == 0 && attempt == 0 {
                // Leave with one microbatch served and the rest in flight.
                inject_planned_fault(self.spec, me, window);
            }
        }
        for (route, pass, forward_s, mut stated) in pending {
            let id = route.id;
            let from = route.path[stage + 1];
            let bytes = match self.wait(from, protocol::gradient_tag(id, attempt))? {
                Wait::Got(bytes) => bytes,
                Wait::Order(next) => return Ok(Some(next)),
            };
            let grad_out = self.tensor_from(&bytes, from)?;
            stated.grad_in = Some(audit::digest(&bytes));
            if let Some(kept) = self.kept.get_mut(&id) {
                kept.grad_in = Some(bytes);
            }
            let _pass = tracing::debug_span!("backward", id, stage).entered();
            let started = Instant::now();
            let grads = self.device.gradients(&self.model, pass, Some(&grad_out))?;
            let receipt = match self.keep_and_pass_back(route, attempt, grads, stated)? {
                Ok(receipt) => receipt,
                Err(next) => return Ok(Some(next)),
            };
            let compute = forward_s + self.computed_since(started);
            self.served(window, attempt, id, compute, None, Some(receipt))?;
        }
        Ok(None)
    }

    /// Seconds of computing since `started`, stretched by the rank's
    /// `[[faults.slow]]` factor: a slow miner waits out the difference
    /// before it goes on, as one on a slower machine would still be
    /// computing.
    fn computed_since(&self, started: Instant) -> f64 {
        let took = started.elapsed().as_secs_f64();
        let factor = self.spec.faults.slowdown(self.t.rank());
        if factor > 1.0 {
            std::thread::sleep(std::time::Duration::from_secs_f64(took * (factor - 1.0)));
        }
        took * factor
    }

    /// Keeps a microbatch's parameter gradients for the close and sends
    /// its input gradient upstream (none on stage 0); returns the pass's
    /// receipt, or the order that came instead.
    fn keep_and_pass_back(
        &mut self,
        route: &Route,
        attempt: u32,
        grads: PassGrads,
        stated: Stated,
    ) -> Result<Result<Receipt, Order>, TrainError> {
        let grads = self.conduct.grads(route.id, grads)?;
        let grad_out = match grads.input {
            Some(g) => {
                let bytes = self.encode_boundary(&g)?;
                let to = route.path[self.stage - 1];
                let tag = protocol::gradient_tag(route.id, attempt);
                if let Some(next) = self.send(to, tag, &bytes)? {
                    return Ok(Err(next));
                }
                Some(audit::digest(&bytes))
            }
            None => None,
        };
        let chunks = audit::chunk_digests(&grads.params);
        let receipt = Receipt {
            input: stated.input,
            output: stated.output,
            grad_in: stated.grad_in,
            grad_out,
            params: audit::params_digest(&chunks),
            maxes: audit::gradient_maxes(&self.model, &grads.params),
        };
        let kept = KeptGrads {
            params: grads.params,
            chunks,
        };
        self.grads.insert(route.id, kept);
        Ok(Ok(receipt))
    }

    /// An `Audit` order: what this miner's passes among `tasks` need sent
    /// to their validators (its conduct hears which were asked for).
    fn answer_audit(
        &mut self,
        window: u64,
        attempt: u32,
        tasks: &[AuditTask],
    ) -> Result<(), TrainError> {
        let me = self.t.rank();
        let mine: Vec<u64> = tasks
            .iter()
            .filter(|a| a.miner == me)
            .map(|a| a.id)
            .collect();
        self.conduct.audited(&mine);
        self.send_audits(window, attempt, tasks)
    }

    /// Sends the validators named in `tasks` what they need to replay this
    /// miner's passes: the window's weights, unless a validator holds them
    /// already, and the frames it kept.
    fn send_audits(
        &self,
        window: u64,
        attempt: u32,
        tasks: &[AuditTask],
    ) -> Result<(), TrainError> {
        let me = self.t.rank();
        // Each validator's passes, and whether it needs the weights.
        let mut by_validator: BTreeMap<usize, (Vec<u64>, bool)> = BTreeMap::new();
        for task in tasks.iter().filter(|a| a.miner == me) {
            let (ids, needs_weights) = by_validator.entry(task.validator).or_default();
            ids.push(task.id);
            *needs_weights |= !task.weights_held;
        }
        let weights = match by_validator.values().any(|(_, needs)| *needs) {
            true => self.model.to_safetensors(None, Path::new("audit"))?,
            false => Vec::new(),
        };
        for (validator, (ids, needs_weights)) in by_validator {
            let passes = ids
                .into_iter()
                .map(|id| (id, self.kept.get(&id).cloned().unwrap_or_default()))
                .collect();
            let bundle = audit::encode(&Bundle {
                stage: self.stage,
                weights: match needs_weights {
                    true => weights.clone(),
                    false => Vec::new(),
                },
                passes,
            });
            self.send_to_validator(validator, protocol::audit_tag(window, attempt), &bundle)?;
        }
        Ok(())
    }

    /// Sends the validators named in `tasks` this miner's contribution to
    /// the slices they recompute, as it stated them in its last `Reduced`.
    fn send_slices(
        &self,
        window: u64,
        attempt: u32,
        tasks: &[SliceTask],
    ) -> Result<(), TrainError> {
        let me = self.t.rank();
        let Some(c) = self
            .contribution
            .as_ref()
            .filter(|c| (c.window, c.attempt) == (window, attempt))
        else {
            return Ok(());
        };
        for task in tasks {
            let Some(at) = task.contributors.iter().position(|(r, _)| *r == me) else {
                continue;
            };
            // A slice of its site's (or a flat) all-reduce, or of the one
            // between sites.
            let (part, tag) = match c.across().filter(|_| !task.sites.is_empty()) {
                Some(part) => (
                    part,
                    protocol::across_tag(window, attempt, task.slice, false),
                ),
                None => (
                    c.part.clone(),
                    protocol::slice_tag(window, attempt, task.slice),
                ),
            };
            if task.slice >= part.parts() {
                continue;
            }
            let range = part.range(task.slice);
            let values = &c.values[range.clone()];
            let sent =
                task.sites.is_empty() && c.sent_early.contains(&(task.slice, task.validator));
            if !sent {
                self.send_to_validator(task.validator, tag, bytemuck::cast_slice(values))?;
            }
            if let Some(credited) = &task.passes {
                let passes = credited.get(at).map_or(&[][..], |p| p);
                let probed = task.probed(&range, self.spec.roles.contribution_chunks);
                let proof = self.gradient_proof(c, passes, &probed);
                self.send_to_validator(task.validator, tag, &proof)?;
            }
            let leads = task.sites.iter().any(|site| site.leader == me);
            if let Some(partial) = c.partial().filter(|_| leads) {
                let tag = protocol::across_tag(window, attempt, task.slice, true);
                let values = bytemuck::cast_slice(&partial[range]);
                self.send_to_validator(task.validator, tag, values)?;
            }
        }
        Ok(())
    }

    /// [`audit::gradient_proof`] of the gradients of `passes` it kept,
    /// with the sketches it stated of them in `c`'s close.
    fn gradient_proof(
        &self,
        c: &Contribution,
        passes: &[CreditedPass],
        probed: &[usize],
    ) -> Vec<u8> {
        let kept = passes.iter().filter_map(|p| {
            let k = self.grads.get(&p.id)?;
            let sketch = c.sketches.get(&p.id).map_or(&[][..], Vec::as_slice);
            Some((&k.params[..], &k.chunks[..], sketch))
        });
        audit::gradient_proof(kept, probed)
    }

    /// Reports a microbatch served, with the boundary bytes sent since the
    /// last report.
    fn served(
        &mut self,
        window: u64,
        attempt: u32,
        id: u64,
        compute_s: f64,
        loss: Option<f32>,
        receipt: Option<Receipt>,
    ) -> Result<(), TrainError> {
        let (dense_bytes, wire_bytes) = std::mem::take(&mut self.unreported);
        let wait_s = std::mem::take(&mut self.waited_s);
        self.leader.report(&Report::Served {
            wait_s,
            window,
            attempt,
            id,
            stage: self.stage,
            compute_s,
            loss,
            dense_bytes,
            wire_bytes,
            receipt: receipt.map(Box::new),
        })
    }

    /// A boundary tensor (activations or their gradient) coded as the job
    /// says, counted for the next report.
    fn encode_boundary(&mut self, x: &Tensor) -> Result<Vec<u8>, TrainError> {
        let bytes = self.boundary.encode_tensor(x)?;
        self.unreported.0 += self.boundary.dense_bytes() as u64;
        self.unreported.1 += bytes.len() as u64;
        Ok(bytes)
    }

    /// A boundary tensor received from `from`, decoded and shaped.
    fn tensor_from(&self, bytes: &[u8], from: usize) -> Result<Tensor, TrainError> {
        self.boundary
            .decode_tensor(bytes, self.setup.batch_size)
            .map_err(|e| TrainError::Protocol {
                rank: from,
                reason: e.to_string(),
            })
    }

    /// The next message from `from` with `tag`, unless an order comes first
    /// or `from` is gone (then the orchestrator's next order). A peer alive
    /// but silent for the transport's timeout ends this miner with an
    /// error: it leaves, and the orchestrator routes around it.
    ///
    /// An `Audit` order that comes meanwhile is answered here and the wait
    /// goes on: the orchestrator draws passes for replay as their
    /// microbatches finish, while the window still runs.
    fn wait(&mut self, from: usize, tag: u64) -> Result<Wait, TrainError> {
        let deadline = Instant::now() + self.t.default_timeout();
        loop {
            let started = Instant::now();
            let waited = self
                .leader
                .wait_or_order(from, tag, deadline, || self.announce_leaving());
            self.waited_s += started.elapsed().as_secs_f64();
            return match waited? {
                Waited::Got(bytes) => Ok(Wait::Got(bytes)),
                Waited::Order(Order::Audit {
                    window,
                    attempt,
                    tasks,
                    ..
                }) => {
                    self.answer_audit(window, attempt, &tasks)?;
                    continue;
                }
                Waited::Order(order) => Ok(Wait::Order(order)),
                Waited::Lost => Ok(Wait::Order(self.next_order()?)),
                Waited::TimedOut => Err(TransportError::Timeout { rank: from, tag }.into()),
            };
        }
    }

    /// Sends a boundary tensor; when the receiver is gone, returns the
    /// orchestrator's next order instead.
    fn send(&self, to: usize, tag: u64, bytes: &[u8]) -> Result<Option<Order>, TrainError> {
        match self.t.send(to, tag, bytes) {
            Ok(()) => Ok(None),
            Err(TransportError::PeerLost { .. }) => Ok(Some(self.next_order()?)),
            Err(e) => Err(e.into()),
        }
    }

    /// Sums the gradients of the microbatches `counted` credits to this
    /// miner and all-reduces them among the stage's live miners `peers`
    /// (whose signing keys are `keys`): hierarchically when `sites` (each
    /// peer's site) names several.
    #[tracing::instrument(name = "all_reduce", skip_all, fields(window = window, attempt = attempt, stage = self.stage, miners = peers.len()))]
    fn close(
        &mut self,
        window: u64,
        attempt: u32,
        counted: &[Route],
        (peers, keys): (Vec<usize>, Vec<Option<String>>),
        (sites, recomputers): (Vec<usize>, Vec<usize>),
        (scales, sketch_seed): (Vec<i32>, u64),
    ) -> Result<(), TrainError> {
        let me = self.t.rank();
        // A miner routed nothing in its crash window leaves here.
        inject_planned_fault(self.spec, me, window);
        inject_planned_fault_at(self.spec, me, window, CrashPhase::Close);
        let (mut ids, mut parts) = (Vec::new(), Vec::new());
        for route in counted
            .iter()
            .filter(|r| r.path.get(self.stage) == Some(&me))
        {
            let grads = self
                .grads
                .get(&route.id)
                .ok_or_else(|| TrainError::Protocol {
                    rank: self.leader.rank(),
                    reason: format!(
                        "window {window} counts microbatch {} on rank {me}, which never served it",
                        route.id
                    ),
                })?;
            ids.push(route.id);
            parts.push(grads.params.as_slice());
        }
        let site_of: BTreeMap<usize, usize> = peers.iter().copied().zip(sites).collect();
        // Moot once a standby took over: it starts the window again.
        let (leader, leading) = (self.leader, self.leader.rank());
        let taken_over = move || leader.rank() != leading;
        let group = Group::new(self.t, peers)?.abandoned_when(&taken_over);
        // Each member's site, in the group's (ascending) order.
        let sites: Vec<usize> = group
            .members()
            .iter()
            .map(|r| site_of.get(r).copied().unwrap_or_default())
            .collect();
        let segments: Vec<_> = self.model.layout().iter().map(|p| p.range()).collect();
        let numel = self.model.numel();
        let started = Instant::now();
        let deadline = self.closes.duration();
        let call =
            Call::new(&group, protocol::close_tag(window, attempt)).until(started + deadline);
        let copies = self.spec.roles.slice_copies;
        let spans_sites = sites.iter().any(|s| Some(s) != sites.first());
        let mut sent_early = Ok(Vec::new());
        let reduced = FixedPoint::with_exponents(&segments, scales).and_then(|scale| {
            let mut contribution = scale.encode(&parts);
            self.conduct.contribution(window, &mut contribution);
            if !spans_sites {
                let to = (window, attempt, &recomputers[..]);
                sent_early = send_contributions(self.t, to, &contribution, group.size());
            }
            let mut sums = contribution.clone();
            let held = if spans_sites {
                let mine = sites[group.rank()];
                let site: Vec<usize> = (0..group.size())
                    .filter(|&r| sites[r] == mine)
                    .map(|r| group.members()[r])
                    .collect();
                let tamper = self
                    .conduct
                    .slice_tamper(window, &site, copies.min(site.len()));
                let forge = self.conduct.partial_tamper(window);
                let tampers = Tampers {
                    slices: tamper.as_deref(),
                    partial: forge.as_deref(),
                };
                let held = hierarchical_all_reduce_redundant_checked(
                    call,
                    &mut sums,
                    ReduceOp::Sum,
                    copies,
                    &sites,
                    tampers,
                )?;
                Held::Sites {
                    held,
                    site_size: site.len(),
                    sites: sites.iter().collect::<BTreeSet<_>>().len(),
                }
            } else {
                let copies = copies.min(group.size());
                let tamper = self.conduct.slice_tamper(window, group.members(), copies);
                let forge = self.conduct.handed_tamper(window, false);
                let deny = self.conduct.handed_tamper(window, true);
                let handing = Handing {
                    signing: Some(Signing {
                        own: &self.key,
                        keys: &keys,
                    }),
                    tamper: forge.as_deref(),
                    deniable: deny.as_deref(),
                };
                let members = group.members();
                let held = self.device.site_all_reduce(
                    call,
                    &mut sums,
                    copies,
                    (tamper.as_deref(), handing),
                    members,
                )?;
                Held::Flat {
                    held,
                    size: group.size(),
                }
            };
            Ok((scale, contribution, sums, held))
        });
        let report = match reduced {
            Ok((scale, values, sums, held)) => {
                let reduce_s = started.elapsed().as_secs_f64();
                self.closes.observe(reduce_s);
                self.reduced = held.agreed().then(|| {
                    let mut sum = vec![0.0f32; numel];
                    scale.decode(&sums, &mut sum);
                    (window, sum)
                });
                let result = self.reduced.as_ref().map(|(_, sum)| audit::digest_f32(sum));
                let mut contribution = Contribution::new(window, attempt, values, held);
                contribution.sent_early = sent_early?;
                let reduction = contribution.statement(result);
                contribution.sketches = ids
                    .iter()
                    .zip(&parts)
                    .map(|(&id, grads)| {
                        let honest = audit::gradient_sketch(grads, sketch_seed);
                        (id, self.conduct.sketch(id, honest))
                    })
                    .collect();
                let sketches = contribution
                    .sketches
                    .iter()
                    .map(|(&id, sketch)| PassSketch {
                        id,
                        sketch: sketch.clone(),
                    })
                    .collect();
                self.contribution = Some(contribution);
                Report::Reduced {
                    window,
                    attempt,
                    reduction: Box::new(reduction),
                    deadline_s: deadline.as_secs_f64(),
                    reduce_s,
                    sketches,
                }
            }
            // A peer gone, or one that sent what the protocol does not
            // allow: the orchestrator sees who is alive and closes again.
            // A slice handed out wrong without proof is disputed, naming
            // its owner as the job numbers it.
            Err(CollectiveError::UnprovedSlice { rank, slice }) => {
                let owner = group.members().get(rank).copied();
                Report::ReduceFailed {
                    window,
                    attempt,
                    reason: format!(
                        "rank {} handed out slice {slice} other than the copy its holders \
                         agreed on, and no signature proves it",
                        owner.unwrap_or(rank)
                    ),
                    disputed: owner,
                }
            }
            Err(e @ (CollectiveError::PeerLost { .. } | CollectiveError::Protocol { .. })) => {
                Report::ReduceFailed {
                    window,
                    attempt,
                    reason: e.to_string(),
                    disputed: None,
                }
            }
            Err(e) => return Err(e.into()),
        };
        self.leader.report(&report)
    }

    /// Applies the reduced gradients (the mean over the window's training
    /// microbatches), writes the stage's checkpoint if this miner is among
    /// `writers` (sending the validator of its task in `audits` the state
    /// before the step, the sum, and the file), and reports the new
    /// weights' and optimizer state's digests.
    fn step(
        &mut self,
        (window, attempt): (u64, u32),
        writers: &[usize],
        audits: &[CheckpointTask],
    ) -> Result<(), TrainError> {
        let me = self.t.rank();
        let started = Instant::now();
        let audit = audits.iter().find(|a| a.writer == me);
        let sum = match self.reduced.take() {
            Some((w, sum)) if w == window => sum,
            _ => {
                return Err(TrainError::Protocol {
                    rank: self.leader.rank(),
                    reason: format!("step of window {window} before its gradients were reduced"),
                })
            }
        };
        let tag = protocol::checkpoint_tag(window, attempt);
        if let Some(a) = audit {
            let state = self
                .model
                .to_safetensors(Some(&self.opt), Path::new("audit"))?;
            self.send_to_validator(a.validator, tag, &state)?;
            self.send_to_validator(a.validator, tag, bytemuck::cast_slice(&sum))?;
        }
        let scale = 1.0 / self.setup.per_window as f32;
        self.model.optimizer_step(&mut self.opt, &sum, scale)?;
        inject_planned_fault_at(self.spec, me, window, CrashPhase::Step);
        self.at = window + 1;
        self.grads.clear();
        self.kept.clear();
        self.contribution = None;
        let optimizer = self.opt.state_digest().to_hex().to_string();
        let checkpoint = if writers.contains(&me) {
            let forged = self.conduct.checkpoint_state(window, &self.opt);
            let entry = match forged {
                // Other moments on disk, the honest digest stated.
                Some(forged) => StageEntry {
                    optimizer_digest: Some(optimizer.clone()),
                    ..self.checkpoints.write_stage(window, &self.model, &forged)?
                },
                None => self
                    .checkpoints
                    .write_stage(window, &self.model, &self.opt)?,
            };
            if let Some(a) = audit {
                let path = self.checkpoints.written_path(window, &entry);
                let file = std::fs::read(&path).map_err(|source| CheckpointError::Io {
                    path: path.clone(),
                    source,
                })?;
                self.send_to_validator(a.validator, tag, &file)?;
            }
            Some(entry)
        } else {
            None
        };
        self.leader.report(&Report::Stepped {
            window,
            stage: self.stage,
            digest: self.model.weights_digest()?.to_hex().to_string(),
            optimizer,
            checkpoint,
            step_s: started.elapsed().as_secs_f64(),
        })
    }

    /// Sends a validator what it needs for a check; a validator gone is
    /// no reason to stop mining.
    fn send_to_validator(
        &self,
        validator: usize,
        tag: u64,
        bytes: &[u8],
    ) -> Result<(), TrainError> {
        send_unless_lost(self.t, validator, tag, bytes)
    }
}

/// Sends `contribution`'s slice `j` (of `slices`, as the flat all-reduce
/// cuts it) to `recomputers[j]`, the validator the `Close` order named to
/// recompute it; the slices sent, with their validators.
fn send_contributions<T: Transport + ?Sized>(
    t: &T,
    (window, attempt, recomputers): (u64, u32, &[usize]),
    contribution: &[i64],
    slices: usize,
) -> Result<Vec<(usize, usize)>, TrainError> {
    if recomputers.len() != slices {
        return Ok(Vec::new());
    }
    let part = Partition::equal(contribution.len(), slices);
    let mut sent = Vec::with_capacity(slices);
    for (slice, &validator) in recomputers.iter().enumerate() {
        let tag = protocol::slice_tag(window, attempt, slice);
        let values = &contribution[part.range(slice)];
        send_unless_lost(t, validator, tag, bytemuck::cast_slice(values))?;
        sent.push((slice, validator));
    }
    Ok(sent)
}
