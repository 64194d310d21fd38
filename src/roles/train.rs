//! The training job (`task = "train"`): an orchestrator, miners per stage,
//! windows closed by a butterfly all-reduce among each stage's miners.
//!
//! One window, as data:
//! 1. The orchestrator routes each microbatch id through one miner per
//!    stage (SWARM's stochastic wiring) and sends the schedule to all.
//! 2. Each miner runs the forwards of its microbatches in ascending id,
//!    then (last stage: at once) the backwards in ascending id. Waits only
//!    point upstream in the forward phase and downstream in the backward
//!    phase, in one global id order, so they cannot form a cycle.
//! 3. Last-stage miners report each loss to the orchestrator.
//! 4. The miners of a stage all-reduce their summed gradients, apply the
//!    same AdamW step and compare weight digests: a miner whose weights
//!    differ from its peers' is an error, not a silent fork.

use std::time::Instant;

use candle_core::{Device, Tensor};
use thiserror::Error;

use super::schedule::{self, Schedule, ScheduleError};
use crate::collective::{
    all_gather, all_reduce, AllReduceAlgorithm, Call, CollectiveError, Group, Partition, ReduceOp,
};
use crate::config::{JobSpec, Plan, Role};
use crate::data::{Corpus, DataError, Dataset, Split};
use crate::model::{
    batch_tensors, AdamW, AdamWConfig, GptConfig, ModelError, StageInput, StageModel,
};
use crate::pipeline::Router;
use crate::transport::{Transport, TransportError};

#[derive(Debug, Error)]
pub enum TrainError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("candle: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("stage {stage} has no miner left")]
    EmptyStage { stage: usize },
    #[error("window {window}: stage {stage} weights differ between its miners")]
    DigestMismatch { window: u64, stage: usize },
    #[error("rank {rank}: {reason}")]
    Protocol { rank: usize, reason: String },
}

/// One window's result, as the orchestrator sees it.
#[derive(Debug, Clone)]
pub struct WindowReport {
    pub window: u64,
    /// Mean training loss of the window's microbatches.
    pub mean_loss: f32,
    /// Mean loss on validation microbatches, in evaluation windows.
    pub val_loss: Option<f32>,
    /// Training tokens per second over the window.
    pub tokens_per_s: f64,
}

/// What every role needs to know about the job.
struct Setup {
    stages: usize,
    layers: Vec<usize>,
    config: GptConfig,
    data: Dataset,
    batch_size: usize,
    per_window: u64,
    seed: u64,
}

impl Setup {
    fn new(spec: &JobSpec) -> Result<Setup, TrainError> {
        let data = Dataset::new(&Corpus::embedded()?)?;
        let config = GptConfig::new(&spec.model, data.tokenizer().vocab_size())?;
        Ok(Setup {
            stages: spec.pipeline.stages,
            layers: spec.stage_layers(),
            config,
            data,
            batch_size: spec.pipeline.microbatch_size,
            per_window: spec.pipeline.microbatches_per_window as u64,
            seed: spec.job.seed,
        })
    }
}

fn miners_of(plan: &Plan) -> Vec<(usize, usize)> {
    plan.ranks
        .iter()
        .filter_map(|r| match r.role {
            Role::Miner { stage } => Some((r.rank, stage)),
            _ => None,
        })
        .collect()
}

/// The orchestrator (rank 0): routes every window, collects its losses,
/// and calls `report` once per window.
pub fn orchestrate<T: Transport + ?Sized>(
    t: &T,
    spec: &JobSpec,
    plan: &Plan,
    mut report: impl FnMut(&WindowReport),
) -> Result<(), TrainError> {
    let setup = Setup::new(spec)?;
    let mut router = Router::new(setup.stages, &miners_of(plan), spec.job.seed);
    let others: Vec<usize> = (1..t.size()).collect();
    let tokens = (setup.per_window as usize * setup.batch_size * setup.config.block_size) as f64;
    for window in 0..spec.train.windows {
        let start = Instant::now();
        let last_window = window + 1 == spec.train.windows;
        let evals = if last_window || (window + 1) % spec.train.eval_every == 0 {
            spec.train.eval_microbatches
        } else {
            0
        };
        let train_ids = (0..setup.per_window).map(|i| window * setup.per_window + i);
        let val_ids = (0..evals).map(|i| schedule::VALIDATION | (window * evals + i));
        let paths = train_ids
            .chain(val_ids)
            .map(|id| {
                let path = router.route().ok_or(TrainError::EmptyStage { stage: 0 })?;
                Ok((id, path))
            })
            .collect::<Result<Vec<_>, TrainError>>()?;
        let sched = Schedule { window, paths };
        let bytes = sched.encode(setup.stages);
        for &r in &others {
            t.send(r, schedule::schedule_tag(window), &bytes)?;
        }
        let (mut sum, mut val_sum) = (0.0f64, 0.0f64);
        for (id, path) in &sched.paths {
            let last = path[setup.stages - 1];
            let got = t.recv(last, schedule::loss_tag(*id))?;
            let loss = <[u8; 4]>::try_from(got.as_slice())
                .map(f32::from_le_bytes)
                .map_err(|_| TrainError::Protocol {
                    rank: last,
                    reason: format!("loss message of {} bytes", got.len()),
                })?;
            if schedule::is_validation(*id) {
                val_sum += f64::from(loss);
            } else {
                sum += f64::from(loss);
            }
        }
        report(&WindowReport {
            window,
            mean_loss: (sum / setup.per_window as f64) as f32,
            val_loss: (evals > 0).then(|| (val_sum / evals as f64) as f32),
            tokens_per_s: tokens / start.elapsed().as_secs_f64(),
        });
    }
    let stop = Schedule {
        window: spec.train.windows,
        paths: Vec::new(),
    }
    .encode(setup.stages);
    for &r in &others {
        t.send(r, schedule::schedule_tag(spec.train.windows), &stop)?;
    }
    Ok(())
}

/// A validator: observes until told to stop (replay comes with the
/// validators issue).
pub fn observe<T: Transport + ?Sized>(t: &T, spec: &JobSpec) -> Result<(), TrainError> {
    for window in 0..=spec.train.windows {
        let bytes = t.recv(0, schedule::schedule_tag(window))?;
        if Schedule::decode(&bytes, spec.pipeline.stages, t.size())?.is_stop() {
            break;
        }
    }
    Ok(())
}

/// A miner of `stage`: serves its microbatches every window, then merges
/// gradients with the other miners of its stage.
pub fn mine<T: Transport + ?Sized>(
    t: &T,
    spec: &JobSpec,
    plan: &Plan,
    stage: usize,
) -> Result<(), TrainError> {
    let setup = Setup::new(spec)?;
    let mut model = StageModel::new(&setup.config, &setup.layers, stage, spec.job.seed)?;
    let mut opt = AdamW::new(adamw_config(spec), model.layout());
    let peers: Vec<usize> = miners_of(plan)
        .into_iter()
        .filter(|(_, s)| *s == stage)
        .map(|(r, _)| r)
        .collect();
    let group = Group::new(t, peers.iter().copied())?;
    for window in 0..=spec.train.windows {
        let bytes = t.recv(0, schedule::schedule_tag(window))?;
        let sched = Schedule::decode(&bytes, setup.stages, t.size())?;
        if sched.is_stop() {
            break;
        }
        run_window(t, &setup, &mut model, &sched, stage)?;
        close_window(
            &group,
            &mut model,
            &mut opt,
            window,
            setup.per_window,
            stage,
        )?;
    }
    Ok(())
}

fn adamw_config(spec: &JobSpec) -> AdamWConfig {
    let t = &spec.train;
    AdamWConfig {
        lr: t.lr,
        min_lr: t.min_lr,
        warmup_steps: t.warmup_windows,
        decay_steps: t.windows,
        weight_decay: t.weight_decay,
        ..AdamWConfig::default()
    }
}

fn to_bytes(x: &Tensor) -> Result<Vec<u8>, TrainError> {
    let v = x.flatten_all()?.to_vec1::<f32>()?;
    Ok(bytemuck::cast_slice(&v).to_vec())
}

fn from_bytes(
    bytes: &[u8],
    shape: (usize, usize, usize),
    from: usize,
) -> Result<Tensor, TrainError> {
    let want = shape.0 * shape.1 * shape.2 * 4;
    if bytes.len() != want {
        return Err(TrainError::Protocol {
            rank: from,
            reason: format!("boundary tensor of {} bytes, expected {want}", bytes.len()),
        });
    }
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// This miner's forwards, then its backwards, for one window.
fn run_window<T: Transport + ?Sized>(
    t: &T,
    setup: &Setup,
    model: &mut StageModel,
    sched: &Schedule,
    stage: usize,
) -> Result<(), TrainError> {
    let me = t.rank();
    let last = setup.stages - 1;
    let shape = (
        setup.batch_size,
        setup.config.block_size,
        setup.config.n_embd,
    );
    let mine: Vec<&(u64, Vec<usize>)> =
        sched.paths.iter().filter(|(_, p)| p[stage] == me).collect();
    let mut pending = Vec::with_capacity(mine.len());
    for (id, path) in &mine {
        let validation = schedule::is_validation(*id);
        let split = if validation { Split::Val } else { Split::Train };
        let batch = setup.data.batch(
            split,
            *id & !schedule::VALIDATION,
            setup.seed,
            setup.batch_size,
            setup.config.block_size,
        )?;
        let (ids, targets) = batch_tensors(&batch)?;
        let input = if stage == 0 {
            ids
        } else {
            from_bytes(
                &t.recv(path[stage - 1], schedule::activation_tag(*id))?,
                shape,
                path[stage - 1],
            )?
        };
        let pass = model.forward(
            if stage == 0 {
                StageInput::Tokens(&input)
            } else {
                StageInput::Activations(&input)
            },
            (stage == last).then_some(&targets),
        )?;
        if stage == last {
            let loss = pass.loss()?;
            t.send(0, schedule::loss_tag(*id), &loss.to_le_bytes())?;
            if validation {
                continue;
            }
            if let Some(grad) = model.backward(pass, None)? {
                t.send(
                    path[stage - 1],
                    schedule::gradient_tag(*id),
                    &to_bytes(&grad)?,
                )?;
            }
        } else {
            t.send(
                path[stage + 1],
                schedule::activation_tag(*id),
                &to_bytes(pass.output())?,
            )?;
            if !validation {
                pending.push((*id, path, pass));
            }
        }
    }
    for (id, path, pass) in pending {
        let from = path[stage + 1];
        let grad_out = from_bytes(&t.recv(from, schedule::gradient_tag(id))?, shape, from)?;
        if let Some(grad) = model.backward(pass, Some(&grad_out))? {
            t.send(
                path[stage - 1],
                schedule::gradient_tag(id),
                &to_bytes(&grad)?,
            )?;
        }
    }
    Ok(())
}

/// All-reduce the stage's gradients, step, and check that every miner of
/// the stage now holds the same weights.
fn close_window<T: Transport + ?Sized>(
    group: &Group<'_, T>,
    model: &mut StageModel,
    opt: &mut AdamW,
    window: u64,
    microbatches: u64,
    stage: usize,
) -> Result<(), TrainError> {
    let mut grads = model.grads_flat();
    all_reduce(
        Call::new(group, schedule::reduce_tag(window)),
        &mut grads,
        ReduceOp::Sum,
        AllReduceAlgorithm::Auto,
    )?;
    model.optimizer_step(opt, &grads, 1.0 / microbatches as f32)?;
    model.zero_grads();
    let n = group.size();
    let digest = model.weights_digest()?;
    let mine: Vec<i32> = digest
        .as_bytes()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut all = vec![0i32; 8 * n];
    let me = group.rank();
    all[8 * me..8 * me + 8].copy_from_slice(&mine);
    all_gather(
        Call::new(group, schedule::digest_tag(window)),
        &mut all,
        &Partition::equal(8 * n, n),
    )?;
    if all.chunks_exact(8).any(|d| d != mine.as_slice()) {
        return Err(TrainError::DigestMismatch { window, stage });
    }
    Ok(())
}
