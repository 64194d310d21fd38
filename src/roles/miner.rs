//! A miner: serves its stage's part of the microbatches routed to it,
//! keeps each one's gradients apart until the window closes, then merges
//! the counted ones with the other miners of its stage.
//!
//! Keeping gradients per microbatch (instead of one running sum) is what
//! lets a window survive a lost miner: the orchestrator decides at close
//! which copy of each microbatch counts, so work redone elsewhere is never
//! added twice, and the fixed-point all-reduce makes the sum the same bits
//! whichever miners did the work.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};

use super::protocol::{self, Handover, Order, Report, Route};
use super::train::{adamw_config, crash_if_planned, recv_order, send_report, Setup, TrainError};
use crate::checkpoint::Checkpoints;
use crate::collective::{all_reduce_fixed_point, Call, CollectiveError, Group};
use crate::config::JobSpec;
use crate::data::Split;
use crate::model::{batch_tensors, AdamW, Pass, PassGrads, StageInput, StageModel};
use crate::pipeline::BoundaryCodec;
use crate::transport::{Transport, TransportError};

/// How long a miner waits on a peer before looking for new orders.
const POLL: std::time::Duration = std::time::Duration::from_millis(2);

/// Serves the stage the orchestrator's `Start` names until told to stop.
pub fn mine<T: Transport + ?Sized>(t: &T, spec: &JobSpec) -> Result<(), TrainError> {
    let setup = Setup::new(spec)?;
    let checkpoints = Checkpoints::new(&spec.job.run_dir());
    let me = t.rank();
    let (stage, checkpoint) = match recv_order(t)? {
        Order::Start { stages, checkpoint } => {
            let stage = stages.iter().position(|miners| miners.contains(&me));
            let stage = stage.ok_or_else(|| TrainError::Protocol {
                rank: 0,
                reason: format!("Start gives rank {me} no stage"),
            })?;
            (stage, checkpoint)
        }
        other => {
            return Err(TrainError::Protocol {
                rank: 0,
                reason: format!("expected Start, got {other:?}"),
            })
        }
    };
    let mut model = StageModel::new(&setup.config, &setup.layers, stage, spec.job.seed)?;
    let mut opt = AdamW::new(adamw_config(spec), model.layout());
    if let Some(window) = checkpoint {
        let manifest = checkpoints.manifest(window)?;
        checkpoints.load_stage(&manifest, &mut model, &mut opt)?;
    }
    let boundary = BoundaryCodec::new(
        spec.pipeline.compression,
        setup.batch_size * setup.config.block_size,
        setup.config.boundary_width(),
        setup.config.n_embd,
    );
    let mut miner = Miner {
        t,
        spec,
        checkpoints,
        setup,
        stage,
        model,
        opt,
        grads: BTreeMap::new(),
        reduced: None,
        boundary,
        unreported: (0, 0),
    };
    let mut order = recv_order(t)?;
    loop {
        order = match order {
            Order::Run {
                window,
                attempt,
                routes,
            } => match miner.run(window, attempt, &routes)? {
                Some(next) => next,
                None => recv_order(t)?,
            },
            Order::Close {
                window,
                attempt,
                counted,
                stages,
            } => {
                let peers = stages.get(miner.stage).cloned().unwrap_or_default();
                miner.close(window, attempt, &counted, peers)?;
                recv_order(t)?
            }
            Order::Step {
                window,
                writers,
                moves,
            } => {
                miner.step(window, &writers)?;
                for h in &moves {
                    miner.hand_over(window, h)?;
                }
                recv_order(t)?
            }
            Order::Stop => return Ok(()),
            Order::Start { .. } => {
                return Err(TrainError::Protocol {
                    rank: 0,
                    reason: "a second Start".into(),
                })
            }
        }
    }
}

struct Miner<'a, T: ?Sized> {
    t: &'a T,
    spec: &'a JobSpec,
    checkpoints: Checkpoints,
    setup: Setup,
    stage: usize,
    model: StageModel,
    opt: AdamW,
    /// Parameter gradients of each microbatch served this window.
    grads: BTreeMap<u64, Vec<f32>>,
    /// The stage's all-reduced gradient sum, waiting for `Step`.
    reduced: Option<(u64, Vec<f32>)>,
    boundary: BoundaryCodec,
    /// Boundary bytes sent and not yet reported: as computed, on the wire.
    unreported: (u64, u64),
}

/// What a wait on a peer ended with.
enum Wait {
    Got(Vec<u8>),
    /// The orchestrator gave a new order, or the peer is gone and this is
    /// the order that deals with it: the attempt is over for this miner.
    Order(Order),
}

impl<T: Transport + ?Sized> Miner<'_, T> {
    fn last(&self) -> usize {
        self.setup.stages - 1
    }

    fn shape(&self) -> (usize, usize, usize) {
        let s = &self.setup;
        (s.batch_size, s.config.block_size, s.config.boundary_width())
    }

    /// Forwards in ascending id, then backwards in ascending id. Waits only
    /// point upstream in the forward phase and downstream in the backward
    /// phase, in one global id order, so they cannot form a cycle. Returns
    /// the order that cut the attempt short, if one did.
    fn run(
        &mut self,
        window: u64,
        attempt: u32,
        routes: &[Route],
    ) -> Result<Option<Order>, TrainError> {
        let me = self.t.rank();
        let stage = self.stage;
        let mine = routes.iter().filter(|r| r.path.get(stage) == Some(&me));
        let mut pending: Vec<(&Route, Pass, f64)> = Vec::new();
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
                    Wait::Got(bytes) => Some(self.tensor_from(&bytes, from)?),
                    Wait::Order(next) => return Ok(Some(next)),
                }
            };
            let started = Instant::now();
            let pass = self.model.forward(
                match &received {
                    None => StageInput::Tokens(&tokens),
                    Some(x) => StageInput::Activations(x, &tokens),
                },
                (stage == self.last()).then_some(&targets),
            )?;
            if stage == self.last() {
                let loss = pass.loss()?;
                if !validation {
                    let grads = self.model.gradients(pass, None)?;
                    if let Some(next) = self.keep_and_pass_back(route, attempt, grads)? {
                        return Ok(Some(next));
                    }
                }
                self.served(
                    window,
                    attempt,
                    id,
                    started.elapsed().as_secs_f64(),
                    Some(loss),
                )?;
            } else {
                let compute = started.elapsed().as_secs_f64();
                let to = route.path[stage + 1];
                let tag = protocol::activation_tag(id, attempt);
                if let Some(next) = self.send_boundary(to, tag, pass.output())? {
                    return Ok(Some(next));
                }
                if validation {
                    self.served(window, attempt, id, compute, None)?;
                } else {
                    pending.push((route, pass, compute));
                }
            }
            if served == 0 && attempt == 0 {
                // Leave with one microbatch served and the rest in flight.
                crash_if_planned(self.spec, me, window);
            }
        }
        for (route, pass, forward_s) in pending {
            let id = route.id;
            let from = route.path[stage + 1];
            let grad_out = match self.wait(from, protocol::gradient_tag(id, attempt))? {
                Wait::Got(bytes) => self.tensor_from(&bytes, from)?,
                Wait::Order(next) => return Ok(Some(next)),
            };
            let started = Instant::now();
            let grads = self.model.gradients(pass, Some(&grad_out))?;
            if let Some(next) = self.keep_and_pass_back(route, attempt, grads)? {
                return Ok(Some(next));
            }
            let compute = forward_s + started.elapsed().as_secs_f64();
            self.served(window, attempt, id, compute, None)?;
        }
        Ok(None)
    }

    /// Keeps a microbatch's parameter gradients for the close and sends
    /// its input gradient upstream (none on stage 0).
    fn keep_and_pass_back(
        &mut self,
        route: &Route,
        attempt: u32,
        grads: PassGrads,
    ) -> Result<Option<Order>, TrainError> {
        self.grads.insert(route.id, grads.params);
        match grads.input {
            Some(g) => {
                let to = route.path[self.stage - 1];
                let tag = protocol::gradient_tag(route.id, attempt);
                self.send_boundary(to, tag, &g)
            }
            None => Ok(None),
        }
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
    ) -> Result<(), TrainError> {
        let (dense_bytes, wire_bytes) = std::mem::take(&mut self.unreported);
        send_report(
            self.t,
            &Report::Served {
                window,
                attempt,
                id,
                stage: self.stage,
                compute_s,
                loss,
                dense_bytes,
                wire_bytes,
            },
        )
    }

    /// Sends a boundary tensor (activations or their gradient) coded as
    /// the job says; see [`Miner::send`] for a receiver that is gone.
    fn send_boundary(
        &mut self,
        to: usize,
        tag: u64,
        x: &Tensor,
    ) -> Result<Option<Order>, TrainError> {
        let values = x.flatten_all()?.to_vec1::<f32>()?;
        let bytes = self.boundary.encode(&values)?;
        self.unreported.0 += self.boundary.dense_bytes() as u64;
        self.unreported.1 += bytes.len() as u64;
        self.send(to, tag, &bytes)
    }

    /// A boundary tensor received from `from`, decoded and shaped.
    fn tensor_from(&self, bytes: &[u8], from: usize) -> Result<Tensor, TrainError> {
        let values = self
            .boundary
            .decode(bytes)
            .map_err(|e| TrainError::Protocol {
                rank: from,
                reason: e.to_string(),
            })?;
        Ok(Tensor::from_vec(values, self.shape(), &Device::Cpu)?)
    }

    /// The next message from `from` with `tag`, unless an order comes first
    /// or `from` is gone (then the orchestrator's next order). A peer alive
    /// but silent for the transport's timeout ends this miner with an
    /// error: it leaves, and the orchestrator routes around it.
    fn wait(&self, from: usize, tag: u64) -> Result<Wait, TrainError> {
        let deadline = Instant::now() + self.t.default_timeout();
        loop {
            match self.t.recv_deadline(0, protocol::ORDER_TAG, Instant::now()) {
                Ok(bytes) => return Ok(Wait::Order(protocol::decode_order(&bytes, 0)?)),
                Err(TransportError::Timeout { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            let until = (Instant::now() + POLL).min(deadline);
            match self.t.recv_deadline(from, tag, until) {
                Ok(bytes) => return Ok(Wait::Got(bytes)),
                Err(TransportError::Timeout { .. }) if Instant::now() < deadline => {}
                Err(TransportError::PeerLost { .. }) => {
                    return Ok(Wait::Order(recv_order(self.t)?))
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends a boundary tensor; when the receiver is gone, returns the
    /// orchestrator's next order instead.
    fn send(&self, to: usize, tag: u64, bytes: &[u8]) -> Result<Option<Order>, TrainError> {
        match self.t.send(to, tag, bytes) {
            Ok(()) => Ok(None),
            Err(TransportError::PeerLost { .. }) => Ok(Some(recv_order(self.t)?)),
            Err(e) => Err(e.into()),
        }
    }

    /// Sums the gradients of the microbatches `counted` credits to this
    /// miner and all-reduces them among the stage's live miners.
    fn close(
        &mut self,
        window: u64,
        attempt: u32,
        counted: &[Route],
        peers: Vec<usize>,
    ) -> Result<(), TrainError> {
        let me = self.t.rank();
        // A miner routed nothing in its crash window leaves here.
        crash_if_planned(self.spec, me, window);
        let mut parts = Vec::new();
        for route in counted
            .iter()
            .filter(|r| r.path.get(self.stage) == Some(&me))
        {
            let grads = self
                .grads
                .get(&route.id)
                .ok_or_else(|| TrainError::Protocol {
                    rank: 0,
                    reason: format!(
                        "window {window} counts microbatch {} on rank {me}, which never served it",
                        route.id
                    ),
                })?;
            parts.push(grads.as_slice());
        }
        let group = Group::new(self.t, peers)?;
        let segments: Vec<_> = self.model.layout().iter().map(|p| p.range()).collect();
        let mut sum = vec![0.0f32; self.model.numel()];
        let call = Call::new(&group, protocol::close_tag(window, attempt));
        let report = match all_reduce_fixed_point(call, &parts, &segments, &mut sum) {
            Ok(()) => {
                self.reduced = Some((window, sum));
                Report::Reduced { window, attempt }
            }
            Err(e @ CollectiveError::PeerLost { .. }) => Report::ReduceFailed {
                window,
                attempt,
                reason: e.to_string(),
            },
            Err(e) => return Err(e.into()),
        };
        send_report(self.t, &report)
    }

    /// Applies the reduced gradients (the mean over the window's training
    /// microbatches), writes the stage's checkpoint if this miner is among
    /// `writers`, and reports the new weights' digest.
    fn step(&mut self, window: u64, writers: &[usize]) -> Result<(), TrainError> {
        let sum = match self.reduced.take() {
            Some((w, sum)) if w == window => sum,
            _ => {
                return Err(TrainError::Protocol {
                    rank: 0,
                    reason: format!("step of window {window} before its gradients were reduced"),
                })
            }
        };
        let scale = 1.0 / self.setup.per_window as f32;
        self.model.optimizer_step(&mut self.opt, &sum, scale)?;
        self.grads.clear();
        let checkpoint = if writers.contains(&self.t.rank()) {
            Some(
                self.checkpoints
                    .write_stage(window, &self.model, &self.opt)?,
            )
        } else {
            None
        };
        send_report(
            self.t,
            &Report::Stepped {
                window,
                stage: self.stage,
                digest: self.model.weights_digest()?.to_hex().to_string(),
                checkpoint,
            },
        )
    }
}

impl<T: Transport + ?Sized> Miner<'_, T> {
    /// Takes part in one move between stages: the donor sends its stage's
    /// weights and optimizer state (as a checkpoint's stage file), the
    /// mover becomes a miner of that stage.
    fn hand_over(&mut self, window: u64, h: &Handover) -> Result<(), TrainError> {
        let me = self.t.rank();
        let label = Path::new("handover");
        if h.donor == me {
            let bytes = self.model.to_safetensors(Some(&self.opt), label)?;
            self.t.send(h.rank, protocol::state_tag(window), &bytes)?;
        }
        if h.rank == me {
            let bytes = self.t.recv(h.donor, protocol::state_tag(window))?;
            let s = &self.setup;
            let mut model = StageModel::new(&s.config, &s.layers, h.to, s.seed)?;
            let mut opt = AdamW::new(adamw_config(self.spec), model.layout());
            model.load_safetensors_bytes(&bytes, label, Some(&mut opt))?;
            (self.model, self.opt, self.stage) = (model, opt, h.to);
        }
        Ok(())
    }
}
