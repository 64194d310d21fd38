//! The training job (`task = "train"`): what every role shares. The
//! orchestrator lives in `roles::orchestrator`, miners in `roles::miner`,
//! the protocol between them in [`super::protocol`].

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use super::protocol::ProtocolError;
use crate::checkpoint::CheckpointError;
use crate::collective::CollectiveError;
use crate::config::{CrashPhase, JobSpec, Plan, Role};
use crate::data::{Corpus, DataError, Dataset};
use crate::ledger::{LedgerError, Tally};
use crate::model::{AdamW, AdamWConfig, GptConfig, ModelError, StageModel};
use crate::pipeline::{BoundaryCodec, BoundaryError};
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
    Message(#[from] ProtocolError),
    #[error("candle: {0}")]
    Tensor(#[from] candle_core::Error),
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    #[error("device = \"{0}\" needs swarmrun built with the `{0}` cargo feature")]
    DeviceNotBuilt(crate::config::Device),
    #[error("a pass ran on a device not given its stage (a bug)")]
    DeviceUnprepared,
    #[error("stage {stage} has no miner left")]
    EmptyStage { stage: usize },
    #[error("window {window}: stage {stage} weights differ between its miners")]
    DigestMismatch { window: u64, stage: usize },
    #[error("rank {rank}: {reason}")]
    Protocol { rank: usize, reason: String },
    #[error("no miner reported anything for {waited:?}")]
    Stalled { waited: Duration },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Boundary(#[from] BoundaryError),
    #[error(
        "{dir} holds checkpoints up to window {window} of an earlier run: \
         pass --resume to continue it, or give the job another run_dir"
    )]
    RunDirTaken { dir: PathBuf, window: u64 },
    #[error("cannot resume from the checkpoint of window {window}: {reason}")]
    CheckpointMismatch { window: u64, reason: String },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Signing(#[from] crate::signing::NoRandomness),
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
    /// Share of the live miners' time not spent computing (pipeline
    /// bubble, communication, waiting for the close): 1 - busy / (miners x
    /// wall time).
    pub bubble: f64,
    /// The bubble by cause.
    pub causes: BubbleCauses,
    /// Miner-seconds spent in the close all-reduce (the sum over miners).
    pub reduce_s: f64,
    /// Boundary bytes sent, as computed (f32) and on the wire.
    pub dense_bytes: u64,
    pub wire_bytes: u64,
    /// Attempts the window needed: more than 1 when miners were lost.
    pub attempts: u32,
    /// Boundary bytes as computed / bytes on the wire (headers and scales
    /// included); `None` with one stage.
    pub compression: Option<f64>,
    /// Seconds miners spent computing, and the training passes they
    /// trained, all attempts included (a pass trained again after a loss
    /// counts twice, as it cost twice).
    pub compute_s: f64,
    pub trained: u64,
    /// Passes validators replayed, all-reduce slices they recomputed, and
    /// the seconds both took them.
    pub replayed: u64,
    pub recomputed: u64,
    pub replay_s: f64,
    /// Miners that failed a check in this window (and left the job).
    pub caught: Vec<usize>,
    /// The window's ledger credits: each miner's verified passes and
    /// failed checks.
    pub credits: Vec<Tally>,
    /// The deadlines the run's own times set.
    pub deadlines: Deadlines,
    /// Who is in the job at the window's end (the orchestrator aside).
    pub roster: Vec<Member>,
}

#[cfg(test)]
impl WindowReport {
    /// Window `window` of a run where nothing happened: loss 2.5, one
    /// attempt, one second of compute, zeros elsewhere. Tests change what
    /// they look at with struct update syntax.
    pub(crate) fn quiet(window: u64) -> WindowReport {
        WindowReport {
            window,
            mean_loss: 2.5,
            val_loss: None,
            tokens_per_s: 1.0,
            bubble: 0.0,
            causes: BubbleCauses::default(),
            reduce_s: 0.0,
            dense_bytes: 0,
            wire_bytes: 0,
            attempts: 1,
            compression: None,
            compute_s: 1.0,
            trained: 0,
            replayed: 0,
            recomputed: 0,
            replay_s: 0.0,
            caught: Vec::new(),
            credits: Vec::new(),
            deadlines: Deadlines::default(),
            roster: Vec::new(),
        }
    }
}

/// A rank in the job as the orchestrator sees it at a window's end.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub rank: usize,
    /// The stage it mines, for a miner placed on one.
    pub stage: Option<usize>,
    pub validator: bool,
    /// The site its job file or its join named, when known.
    pub site: Option<String>,
    pub state: MemberState,
}

/// Where a member stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    /// Mining its stage (or validating).
    Serving,
    /// Joined, waiting to be placed at the next window boundary.
    Joining,
    /// Asked to leave; goes after the current window.
    Leaving,
}

impl MemberState {
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Serving => "serving",
            MemberState::Joining => "joining",
            MemberState::Leaving => "leaving",
        }
    }
}

/// What the orchestrator tells its caller as the job trains.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// A window is done: its ledger line and countersignature orders are
    /// out; whatever the callback writes of it comes before the window's
    /// checkpoint is committed.
    Window(&'a WindowReport),
    /// The checkpoint of the window just reported is committed, in this
    /// directory.
    Checkpoint(&'a std::path::Path),
    /// An event worth a line (a join, a loss, an exclusion, a move),
    /// already printed; `warning` when it went to stderr.
    Event { line: &'a str, warning: bool },
}

/// Where the miners' time not spent computing went, each a share of the
/// miners' time (miners x wall time), like the bubble they add up to.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BubbleCauses {
    /// Waiting for a boundary tensor (activations or their gradients).
    pub wait: f64,
    /// The close all-reduce.
    pub reduce: f64,
    /// Applying the step (and writing a checkpoint).
    pub step: f64,
    /// Validators' replays and slice recomputes, which every miner waits
    /// out (replays run beside the close, so only from when the last
    /// miner has reduced).
    pub audit: f64,
    /// The rest: orders in flight, routing, a miner with nothing routed.
    pub idle: f64,
}

/// Deadlines at a window's end, in seconds, as the run's times set them
/// ([`crate::deadline::AdaptiveDeadline`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Deadlines {
    /// Silence after which the orchestrator pings every rank.
    pub progress_s: f64,
    /// How long a pinged rank has to answer.
    pub answer_s: f64,
    /// The longest any miner gave its stage's close all-reduce (0 when no
    /// close was reported).
    pub close_s: f64,
}

/// The console line rank 0 prints per window; [`WindowLine::parse`] reads
/// it back for the launcher's progress bar.
impl std::fmt::Display for WindowReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "window {:>5}  loss {:.4}", self.window, self.mean_loss)?;
        if let Some(v) = self.val_loss {
            write!(f, "  val_loss {v:.4}")?;
        }
        let c = &self.causes;
        let pct = |x: f64| (100.0 * x).round();
        write!(
            f,
            "  {:.0} tokens/s  bubble {:.0}% (wait {} reduce {} step {} audit {} idle {})",
            self.tokens_per_s,
            100.0 * self.bubble,
            pct(c.wait),
            pct(c.reduce),
            pct(c.step),
            pct(c.audit),
            pct(c.idle)
        )?;
        if let Some(ratio) = self.compression.filter(|r| *r != 1.0) {
            write!(f, "  wire {ratio:.1}x")?;
        }
        if self.attempts > 1 {
            write!(f, "  ({} attempts)", self.attempts)?;
        }
        if !self.caught.is_empty() {
            write!(f, "  caught {:?}", self.caught)?;
        }
        Ok(())
    }
}

/// What the launcher needs from a printed [`WindowReport`].
#[derive(Debug, Clone, PartialEq)]
pub struct WindowLine {
    pub window: u64,
    pub loss: f32,
    pub val_loss: Option<f32>,
    pub tokens_per_s: f64,
}

impl WindowLine {
    pub fn parse(line: &str) -> Option<WindowLine> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (val_loss, rest) = match words.get(4) {
            Some(&"val_loss") => (Some(words.get(5)?.parse().ok()?), &words[6..]),
            _ => (None, words.get(4..)?),
        };
        if words.first() != Some(&"window") || words.get(2) != Some(&"loss") {
            return None;
        }
        if rest.get(1) != Some(&"tokens/s") {
            return None;
        }
        Some(WindowLine {
            window: words.get(1)?.parse().ok()?,
            loss: words.get(3)?.parse().ok()?,
            val_loss,
            tokens_per_s: rest.first()?.parse().ok()?,
        })
    }
}

/// What every role needs to know about the job.
pub(crate) struct Setup {
    pub stages: usize,
    pub layers: Vec<usize>,
    pub config: GptConfig,
    pub data: Dataset,
    pub batch_size: usize,
    pub per_window: u64,
    pub seed: u64,
}

impl Setup {
    /// The codec of this job's boundary tensors, shared by miners and the
    /// validators who replay them.
    pub fn codec(&self, spec: &JobSpec) -> BoundaryCodec {
        BoundaryCodec::new(
            spec.pipeline.compression,
            self.batch_size * self.config.block_size,
            self.config.boundary_width(),
            self.config.n_embd,
        )
    }

    /// `stage`'s model as the job's seed makes it, with a fresh AdamW:
    /// what a miner loads a checkpoint or a handed-over state into.
    pub fn stage(&self, spec: &JobSpec, stage: usize) -> Result<(StageModel, AdamW), TrainError> {
        let model = StageModel::new(&self.config, &self.layers, stage, self.seed)?;
        let opt = AdamW::new(adamw_config(spec), model.layout());
        Ok((model, opt))
    }

    pub fn new(spec: &JobSpec) -> Result<Setup, TrainError> {
        let data = Dataset::new(&Corpus::embedded()?)?;
        let config = GptConfig::for_job(spec, data.tokenizer().vocab_size())?;
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

/// The validators of the plan, by rank.
pub(super) fn validators_of(plan: &Plan) -> Vec<usize> {
    plan.ranks
        .iter()
        .filter(|r| r.role == Role::Validator)
        .map(|r| r.rank)
        .collect()
}

/// (rank, stage) of every miner of the plan.
pub(super) fn miners_of(plan: &Plan) -> Vec<(usize, usize)> {
    plan.ranks
        .iter()
        .filter_map(|r| match r.role {
            Role::Miner { stage } => Some((r.rank, stage)),
            _ => None,
        })
        .collect()
}

pub(super) fn adamw_config(spec: &JobSpec) -> AdamWConfig {
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

/// `[[faults.crash]]` with a `window`: this rank leaves now, abruptly, the
/// way a machine drops out of a swarm; `[[faults.hang]]`: it stops where it
/// is, connections open, the way a frozen machine stays in one.
pub(super) fn inject_planned_fault(spec: &JobSpec, rank: usize, window: u64) {
    if let Some(code) = spec.faults.crash_in_window(rank, window) {
        tracing::warn!(
            "exiting with status {code} during window {window} on purpose (faults.crash)"
        );
        std::process::exit(code);
    }
    if spec.faults.hangs_in_window(rank, window) {
        tracing::warn!("stopping (SIGSTOP) during window {window} on purpose (faults.hang)");
        // If it cannot stop, it goes on as an honest miner would.
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    }
}

/// `[[faults.crash]]` with a `phase`: this rank leaves now, at `phase`
/// of `window` (see [`crate::config::CrashFault`]).
pub(super) fn inject_planned_fault_at(spec: &JobSpec, rank: usize, window: u64, phase: CrashPhase) {
    if let Some(code) = spec.faults.crash_at(rank, window, phase) {
        tracing::warn!(
            "exiting with status {code} at the {phase:?} of window {window} on purpose (faults.crash)"
        );
        std::process::exit(code);
    }
}

/// Sends `bytes` to `rank` on `tag`; a rank gone is no error here (the
/// orchestrator hears of its loss as an input; a miner mines on without a
/// validator).
pub(super) fn send_unless_lost<T: Transport + ?Sized>(
    t: &T,
    rank: usize,
    tag: u64,
    bytes: &[u8],
) -> Result<(), TrainError> {
    match t.send(rank, tag, bytes) {
        Ok(()) | Err(TransportError::PeerLost { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A flag SIGTERM and SIGINT set instead of ending the process: a miner
/// asked to leave finishes the window it holds work in, so no window is
/// redone because someone left politely.
pub(super) fn leave_on_signal() -> Result<Arc<AtomicBool>, TrainError> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&flag)).map_err(|e| {
            TrainError::Protocol {
                rank: 0,
                reason: format!("cannot catch signal {signal}: {e}"),
            }
        })?;
    }
    Ok(flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_printed_window_reads_back_and_other_lines_do_not() {
        let mut r = WindowReport {
            mean_loss: 1.98765,
            val_loss: Some(2.0),
            tokens_per_s: 12345.6,
            bubble: 0.5,
            attempts: 2,
            compression: Some(3.9),
            replayed: 1,
            recomputed: 2,
            replay_s: 0.05,
            ..WindowReport::quiet(42)
        };
        let line = WindowLine::parse(&r.to_string()).unwrap();
        assert_eq!(
            line,
            WindowLine {
                window: 42,
                loss: 1.9877,
                val_loss: Some(2.0),
                tokens_per_s: 12346.0
            }
        );
        r.val_loss = None;
        assert_eq!(WindowLine::parse(&r.to_string()).unwrap().val_loss, None);
        assert_eq!(WindowLine::parse("window of opportunity"), None);
        assert_eq!(WindowLine::parse("rank 0/6 on host"), None);
    }
}
