//! Job files: TOML -> typed [`JobSpec`], Slurm hostlists, and the rank plan.
//!
//! The lowest layer of swarmrun: it knows nothing of networks or models, it
//! only turns a job file into plain data every other module reads.
//!
//! # API
//!
//! - [`load`]`(path) -> Result<JobSpec, ConfigError>` reads and checks a file;
//!   [`parse`]`(text, path)` does the same for text already in memory (`path`
//!   is only used in error messages).
//! - [`JobSpec`] has one field per section: [`JobMeta`] (`[job]`),
//!   [`ModelSpec`], [`PipelineSpec`], `sites: Vec<`[`SiteSpec`]`>` (`[[site]]`),
//!   [`RolesSpec`], [`NetworkSpec`], [`FaultsSpec`]. Once `parse` returns
//!   `Ok`, defaults are filled in and the constraints documented on the
//!   fields hold. Helpers:
//!   [`JobMeta::run_dir`] and [`JobSpec::stage_layers`] resolve the two
//!   defaults that depend on other fields.
//! - String-typed values are parsed: [`Rendezvous`] (`tcp://host:port`,
//!   `file:///abs/dir`, `slurm`; also `FromStr` + `Display` for the CLI),
//!   [`Fabric`], [`Task`], and `max_frame` via [`parse_size`] into bytes.
//! - [`hostlist::expand`]`(s) -> Result<Vec<String>, HostlistError>` expands
//!   Slurm hostlists; `SiteSpec::hosts` is already expanded.
//! - [`JobSpec::plan`]`(world_size: Option<usize>) -> Result<Plan, PlanError>`
//!   maps ranks to sites, hosts, local ranks and [`Role`]s ([`Plan`] =
//!   `job_name`, `task`, `stages`, `rendezvous`, `ranks: Vec<`[`RankPlan`]`>`,
//!   `RankPlan` = `rank`, `site`, `host`, `local_rank`, `role`); [`Plan::render`]
//!   is the table `swarmrun check` prints, [`Role::short_label`] the output
//!   prefix label (`orch`, `val`, `miner s1`).
//! - [`ConfigError::Invalid`] carries `file`, `line`, `column` (1-based),
//!   `field` (`site[1].ranks_per_host`) and `message`, and displays as
//!   ``FILE:LINE:COL: field `PATH`: MESSAGE``; [`ConfigError::Io`] names an
//!   unreadable file.
//!
//! # Where errors point
//!
//! Type errors, unknown keys, missing fields and the string conversions
//! (hostlists, rendezvous, sizes, enums) fail while deserializing:
//! `serde_path_to_error` supplies the field path and the toml error its byte
//! span (a missing field is reported at the header of the table that lacks
//! it, with the field's own path). Range and cross-field constraints (ranks
//! per host >= 1, layers summing to `n_layer`, unique site names) are checked
//! afterwards on plain types; only when one fails is the text parsed again
//! with `toml::de::DeTable`, which keeps spans, to find the offending value
//! by its field path (or, for a default that breaks a constraint, its
//! enclosing table). This keeps `toml::Spanned` out of the public types, so
//! the rest of the crate reads `spec.model.n_head`, not
//! `spec.model.n_head.get_ref()`, and a valid file is parsed once. toml's
//! `preserve_order` feature makes the first error reported the first one in
//! the file.

mod error;
pub mod hostlist;
mod plan;
mod validate;
mod values;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use error::ConfigError;
pub use hostlist::HostlistError;
pub use plan::{Plan, PlanError, RankPlan, Role};
pub use values::{
    parse_size, AllReduceChoice, Device, Fabric, Rendezvous, RendezvousError, SizeError, Task,
};

/// A whole job file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub job: JobMeta,
    #[serde(default)]
    pub model: ModelSpec,
    #[serde(default)]
    pub pipeline: PipelineSpec,
    /// `[[site]]` blocks in file order; at least one.
    #[serde(rename = "site")]
    pub sites: Vec<SiteSpec>,
    #[serde(default)]
    pub roles: RolesSpec,
    #[serde(default)]
    pub network: NetworkSpec,
    #[serde(default)]
    pub faults: FaultsSpec,
    #[serde(default)]
    pub hello: HelloSpec,
    #[serde(default)]
    pub collective: CollectiveSpec,
    #[serde(default)]
    pub train: TrainSpec,
    #[serde(default)]
    pub bench: BenchSpec,
    #[serde(default)]
    pub metrics: MetricsSpec,
}

/// `[metrics]`: what the orchestrator serves while the job trains.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSpec {
    /// `host:port` where the orchestrator serves `GET /metrics` in
    /// Prometheus' text format and the live status page at `/` (for
    /// example `127.0.0.1:9464`); none when absent.
    pub listen: Option<String>,
}

/// `[job]`: names the job and says what its ranks do.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobMeta {
    /// Non-empty, `[A-Za-z0-9_.-]` only, because it becomes part of paths
    /// (`runs/<name>`) and of log lines.
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    /// As written; `None` means `runs/<name>`. Use [`JobMeta::run_dir`].
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
    #[serde(default)]
    pub task: Task,
}

impl JobMeta {
    /// The directory for the job's logs, checkpoints and ledger; relative
    /// paths are relative to the current directory, like every other tool
    /// run from a shell.
    pub fn run_dir(&self) -> PathBuf {
        self.run_dir
            .clone()
            .unwrap_or_else(|| Path::new("runs").join(&self.name))
    }
}

/// `[model]`: a character-level GPT. Defaults are nanoGPT's small CPU
/// shakespeare-char model, which trains in minutes on a laptop.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSpec {
    pub n_layer: usize,
    pub n_head: usize,
    /// Divisible by `n_head`.
    pub n_embd: usize,
    pub block_size: usize,
    /// In `[0, 1)`.
    pub dropout: f64,
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec {
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            block_size: 64,
            dropout: 0.0,
        }
    }
}

/// `[pipeline]`: how the model is cut into stages and fed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineSpec {
    /// In `1..=model.n_layer`, so every stage holds at least one block.
    pub stages: usize,
    /// Blocks per stage; `len == stages`, each >= 1, sum == `model.n_layer`.
    /// `None` splits evenly; see [`JobSpec::stage_layers`].
    pub layers: Option<Vec<usize>>,
    pub microbatch_size: usize,
    pub microbatches_per_window: usize,
    /// `[pipeline.compression]`: how boundary tensors and their gradients
    /// travel between stages.
    pub compression: CompressionSpec,
}

impl Default for PipelineSpec {
    fn default() -> Self {
        PipelineSpec {
            stages: 1,
            layers: None,
            microbatch_size: 12,
            microbatches_per_window: 8,
            compression: CompressionSpec::default(),
        }
    }
}

/// `[pipeline.compression]`: `bottleneck = b` puts a learned projection
/// `n_embd -> b` at the end of every stage but the last and `b -> n_embd`
/// at the start of every stage but the first, so only `b` numbers per
/// token cross a boundary; `quant` codes each token's boundary vector with
/// one f16 scale (see `crate::compress`); `zstd` squeezes the frame further
/// when that makes it smaller. Default: the full `n_embd` residual stream
/// as plain f32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressionSpec {
    /// In `1..=model.n_embd`.
    pub bottleneck: Option<usize>,
    pub quant: Quant,
    pub zstd: bool,
}

/// Code width of boundary tensors on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quant {
    /// f32 as computed.
    #[default]
    None,
    Int8,
    /// Two codes per byte.
    Int4,
}

/// One `[[site]]`: a group of hosts sharing a fast local fabric.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    /// Unique across sites.
    pub name: String,
    /// Expanded from the Slurm hostlist in the file, in order.
    #[serde(deserialize_with = "deserialize_hostlist")]
    pub hosts: Vec<String>,
    /// At least 1.
    #[serde(default = "one")]
    pub ranks_per_host: u32,
    #[serde(default)]
    pub fabric: Fabric,
    /// The stages this site's miners serve (dealt round-robin over them),
    /// joiners of this site included; empty: any. A site that serves one
    /// stage keeps that stage's all-reduce inside it, and only boundary
    /// tensors (compressed) cross to other sites.
    #[serde(default)]
    pub stages: Vec<usize>,
    /// Where the site's miners and validators compute: `cpu` (default) or
    /// `cuda`.
    #[serde(default)]
    pub device: Device,
}

fn one() -> u32 {
    1
}

fn deserialize_hostlist<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let text = String::deserialize(d)?;
    hostlist::expand(&text).map_err(|e| serde::de::Error::custom(format!("bad hostlist: {e}")))
}

/// `[roles]`: how many ranks after the orchestrator are validators, and
/// how much of the miners' work they replay.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolesSpec {
    pub validators: u32,
    /// Share of the training passes (one microbatch on one stage) that
    /// validators replay, in `0..=1`: of a miner's `n` passes in a window,
    /// `rate * n` rounded down or up at random, suspects (below) first and
    /// the rest drawn by a generator the miners cannot predict. Default
    /// 0.05: a replay costs what the pass cost, so validators spend 5% of
    /// the miners' compute.
    pub replay_rate: f64,
    /// How many of a miner's passes a window are replayed because their
    /// stated gradient maxima or gradient sketch stand out from the other
    /// passes of their stage (random, zero, scaled, repeated or, early in
    /// training, negated gradients do; honest passes seldom), in place of
    /// drawn ones: past the miner's share, its next draws are smaller by
    /// as many. Default 2; 0 turns it off.
    pub suspect_replays: u32,
    /// How many miners of a stage reduce each slice of its all-reduce
    /// (capped at the stage's miners), straight from the contributions, so
    /// that a lone miner cannot change the update unseen. Default 2.
    pub slice_copies: usize,
    /// Share of each stage's all-reduce slices that validators recompute
    /// from the contributions every window, in `0..=1`, to catch holders
    /// that agree on a wrong slice. Default 1: a slice costs the
    /// validator one addition per element and contribution, and the
    /// miners the bytes of one more all-reduce hop.
    pub slice_audit_rate: f64,
    /// Gradient chunks (1024 floats each) of every recomputed slice in
    /// which each miner's contribution is checked against the passes it
    /// is credited with, drawn after the contributions were stated; at
    /// least 1. Each costs a miner one chunk of every credited pass sent
    /// to the validator, and the validator, per pass, the chunk's digest,
    /// its sketch entries and an addition per float: on a stage whose
    /// passes are small, about what the pass cost (`bench trust`). A
    /// contribution changed in `k` elements is caught in a window with
    /// probability about `1 - (1 - slice_audit_rate * min(1, c / s))^k`
    /// for `c` chunks of slices of `s` chunks. Default 2.
    pub contribution_chunks: usize,
    /// Standby orchestrators: 0 or 1. A standby (the rank after the
    /// validators) holds a copy of the orchestrator's state as of the last
    /// closed window and takes over when the orchestrator is lost, without
    /// restarting any miner. Default 0: the launcher restarts the job from
    /// its checkpoint instead.
    pub standby: u32,
}

impl Default for RolesSpec {
    fn default() -> Self {
        RolesSpec {
            validators: 0,
            replay_rate: 0.05,
            suspect_replays: 2,
            slice_copies: 2,
            slice_audit_rate: 1.0,
            contribution_chunks: 2,
            standby: 0,
        }
    }
}

/// `[network]`: rendezvous, framing and timeouts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSpec {
    pub rendezvous: Rendezvous,
    /// Largest frame a peer may send, in bytes; in `4 KiB..=4 GiB`. Bounds the
    /// memory one malicious or broken peer can make a rank allocate.
    #[serde(deserialize_with = "values::deserialize_size")]
    pub max_frame: usize,
    /// Largest message a peer may send, in bytes (frames of one message
    /// joined); at least `max_frame`. Bounds what one peer can make a rank
    /// hold for a message it never finishes. Default 16 GiB.
    #[serde(deserialize_with = "values::deserialize_size")]
    pub max_message: usize,
    /// Job key written by `swarmrun keygen`; relative to the current
    /// directory.
    pub key_file: Option<PathBuf>,
    /// Seconds, > 0.
    pub connect_timeout_s: f64,
    /// Seconds, > 0.
    pub collective_timeout_s: f64,
    /// Shared-memory fabric: bytes each rank reduces per step, and the
    /// largest buffer that can be registered in shared memory; a multiple
    /// of 4 KiB. 1 MiB keeps a step's working set in cache; raise it to
    /// register larger buffers.
    #[serde(deserialize_with = "values::deserialize_size")]
    pub shm_chunk: usize,
    /// TCP connections per pair of ranks; above 1, messages of a MiB or
    /// more are striped over all of them, to fill long fat pipes between
    /// sites (one stream's window limits it long before the link does).
    pub lanes: usize,
    /// Seal (encrypt and authenticate) the frames between ranks of one
    /// host too. Off, a loopback link sends frames as they are once its
    /// handshake proved the job key: there only root can read or alter
    /// them, and root can read the ranks' memory anyway; sealing cost a
    /// quarter of the CPU of a large all-reduce. Links between hosts are
    /// always sealed.
    pub seal_loopback: bool,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        NetworkSpec {
            rendezvous: Rendezvous::default(),
            max_frame: 64 << 20,
            max_message: crate::transport::DEFAULT_MAX_MESSAGE,
            key_file: None,
            connect_timeout_s: 30.0,
            collective_timeout_s: 60.0,
            shm_chunk: 1 << 20,
            lanes: 1,
            seal_loopback: false,
        }
    }
}

/// `[faults]`: faults injected on purpose, to test how the launcher and the
/// surviving ranks cope. Unknown keys are errors so that nobody believes a
/// fault is being injected when it is not.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultsSpec {
    /// `[[faults.crash]]`: ranks that exit on their own after joining.
    pub crash: Vec<CrashFault>,
    /// `[[faults.cheat]]`: miners that cheat, for testing the validators.
    pub cheat: Vec<CheatFault>,
    /// `[[faults.slow]]`: miners that take longer for every pass.
    pub slow: Vec<SlowFault>,
    /// `[[faults.hang]]`: miners that stop (SIGSTOP) with their
    /// connections open.
    pub hang: Vec<HangFault>,
    /// How the orchestrator times miners' passes for routing and
    /// rebalancing.
    pub clock: PassClock,
    /// `[[faults.hold]]`: windows the orchestrator holds back until ranks
    /// have joined or left, so that a test of joining runs the same way
    /// on any host.
    pub hold: Vec<HoldFault>,
}

/// Before `window` runs (or, with `phase = "close"`, while it closes:
/// every stage reduced, nothing stepped yet), the orchestrator waits until
/// `joined` ranks have joined the job since it started, and with `left`
/// until every rank that joined has left it again.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldFault {
    pub window: u64,
    #[serde(default)]
    pub phase: HoldPhase,
    #[serde(default)]
    pub joined: usize,
    #[serde(default)]
    pub left: bool,
}

/// Where in its window a `[[faults.hold]]` holds the orchestrator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldPhase {
    /// Before the window runs.
    #[default]
    Start,
    /// Between the all-reduce and the step.
    Close,
}

/// A miner that takes `factor` times as long for every pass (it waits out
/// the difference after computing), like a miner on a slower machine.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowFault {
    pub rank: usize,
    pub factor: f64,
}

/// A miner that stops itself with SIGSTOP during `window`, right after
/// the first microbatch it serves there: it keeps its connections and
/// answers nothing, as a frozen host or a suspended process would, until
/// the orchestrator evicts it (the launcher kills it when the job ends).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HangFault {
    pub rank: usize,
    pub window: u64,
}

/// What the orchestrator's throughput measurements (routing, rebalancing)
/// are taken with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PassClock {
    /// The seconds each pass took, as its miner reports them.
    #[default]
    Wall,
    /// Each pass's stage FLOPs at a fixed nominal rate, times its miner's
    /// `[[faults.slow]]` factor: routing and rebalancing then follow the
    /// job file instead of a busy host's noise, so a test of them has one
    /// outcome. The window lines' bubble and tokens/s stay measured.
    Model,
}

/// A miner that cheats on each training microbatch it serves with
/// `probability` (in `0..=1`), in the way `kind` says. Its receipts state
/// what it really sent, as a careful cheater's would: only a replay shows
/// that the work is wrong.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheatFault {
    pub rank: usize,
    pub kind: CheatKind,
    #[serde(default = "always")]
    pub probability: f64,
    /// The first window it cheats in: before it, it is honest (a cheater
    /// that builds a clean record first). Default 0.
    #[serde(default)]
    pub from_window: u64,
}

fn always() -> f64 {
    1.0
}

/// How a cheating miner fakes its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheatKind {
    /// Random numbers in place of its parameter gradients.
    RandomGrad,
    /// Zeros in place of its output, input gradient and parameter
    /// gradients: paid work not done.
    SkipCompute,
    /// The output and gradients of the previous microbatch it served.
    ReplayStale,
    /// Its parameter gradients times 10, to pull the model its way.
    ScaleUpdate,
    /// Its parameter gradients negated, to push the model uphill: every
    /// magnitude, so every stated gradient maximum, is the honest one,
    /// and only a replay tells it apart.
    FlipGrad,
    /// Honest passes, but the gradient sketch it states of each negated,
    /// so that they look pushed uphill and are replayed as suspects, in
    /// place of passes its later draws would pick: a miner thinning the
    /// uniform draw before it cheats. The replay recomputes the sketch.
    FlipSketch,
    /// With the other colluders of its stage, doubles every all-reduce
    /// slice two or more of them reduce, so that their copies agree (and
    /// outvote an honest copy where they are the majority); `probability`
    /// is per window, drawn alike by all of them.
    Collude,
    /// As a checkpoint writer, writes its stage file with the optimizer's
    /// second moments times 4 (a run resumed from it would take smaller
    /// steps) while stating the honest digests; `probability` is per
    /// checkpoint.
    ForgeCheckpoint,
    /// Honest passes, but its contribution to its stage's all-reduce
    /// times 8 (the scale_update of a careful cheater, whose receipts and
    /// replays are all right); `probability` is per window.
    ScaleContribution,
    /// `random_grad` on the passes it guesses go unreplayed: it counts
    /// which of its passes validators asked for, by place in the window,
    /// and cheats only in places asked for less than the average so far
    /// (as often overall as `probability` says). The draws come after its
    /// receipts and from a seed it never sees, so its guesses should be
    /// worth nothing; `bench trust` measures that.
    GuessUnaudited,
    /// Honest passes, but [`NUDGED_ELEMENTS`] elements of its all-reduce
    /// contribution, drawn anywhere in it, moved far past rounding: the
    /// careful cheater the contribution check sees only where its probed
    /// chunks land (`[roles] contribution_chunks`); `probability` is per
    /// window.
    NudgeContribution,
    /// As its site's leader in a stage whose miners span sites, hands the
    /// other sites' leaders its site's partial sum doubled (and states
    /// what it handed); `probability` is per window.
    ForgePartial,
    /// Reduces its slices of its stage's all-reduce honestly, and once the
    /// copies agreed hands out its own slice doubled, signing (as the
    /// protocol asks) a statement of what it handed out; `probability` is
    /// per window.
    ForgeGather,
    /// `forge_gather`, but signing a statement of the agreed slice and
    /// then handing out the doubled one, so that no signature proves it:
    /// the miners it hands it to dispute it, and a dispute repeated leaves
    /// neither in the job; `probability` is per window.
    ForgeGatherDeniably,
}

/// Elements of its contribution a `nudge_contribution` cheater changes in a
/// window it strikes.
pub const NUDGED_ELEMENTS: usize = 4;

/// One rank that exits with `exit_code` (1..=255): `after_s` seconds after
/// it has joined the job, or, in a training job, during window `window`
/// (a miner right after the first microbatch it serves in that window,
/// so that it leaves work half done; another rank as the window begins).
/// With `phase = "close"`: the orchestrator once it sent the window's
/// `Close` to half the ranks (the others never hear of it), a miner as
/// its close begins. With `phase = "step"`: the orchestrator right after
/// it sent the window's `Step` (some miners may have stepped, none has
/// said so), a miner right after it applied the step, before it says so.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrashFault {
    pub rank: usize,
    pub exit_code: i32,
    #[serde(default)]
    pub after_s: f64,
    #[serde(default)]
    pub window: Option<u64>,
    #[serde(default)]
    pub phase: CrashPhase,
}

/// Where in its window a `[[faults.crash]]` with a `window` strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrashPhase {
    /// As the window begins (a miner: after its first microbatch).
    #[default]
    Start,
    /// While the window's close is ordered or begins.
    Close,
    /// Once the window's step is ordered or applied.
    Step,
}

impl FaultsSpec {
    /// The exit status `rank` must leave with during `window`, if any.
    pub fn crash_in_window(&self, rank: usize, window: u64) -> Option<i32> {
        self.crash_at(rank, window, CrashPhase::Start)
    }

    /// The exit status `rank` must leave with at `phase` of `window`
    /// (see [`CrashFault`]), if any.
    pub fn crash_at(&self, rank: usize, window: u64, phase: CrashPhase) -> Option<i32> {
        self.crash
            .iter()
            .find(|c| c.rank == rank && c.window == Some(window) && c.phase == phase)
            .map(|c| c.exit_code)
    }

    /// Whether `rank` stops itself during `window`.
    pub fn hangs_in_window(&self, rank: usize, window: u64) -> bool {
        self.hang
            .iter()
            .any(|h| h.rank == rank && h.window == window)
    }

    /// How many times as long as its work takes `rank` takes for a pass
    /// (1 unless `[[faults.slow]]` names it).
    pub fn slowdown(&self, rank: usize) -> f64 {
        self.slow
            .iter()
            .find(|s| s.rank == rank)
            .map_or(1.0, |s| s.factor)
    }
}

/// `[train]`: how long and how fast the model learns (`task = "train"`).
/// One window is one optimizer step over `pipeline.microbatches_per_window`
/// microbatches.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSpec {
    pub windows: u64,
    /// Peak learning rate, after `warmup_windows`; cosine decay to `min_lr`
    /// at the last window.
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_windows: u64,
    pub weight_decay: f64,
    /// Validation loss every this many windows (and after the last).
    pub eval_every: u64,
    /// Validation microbatches per evaluation.
    pub eval_microbatches: u64,
    /// A checkpoint every this many windows (and after the last); 0 never.
    pub checkpoint_every: u64,
    /// Checkpoints kept in `run_dir/checkpoints`, newest first (at least 1).
    pub keep_checkpoints: usize,
}

impl Default for TrainSpec {
    fn default() -> Self {
        TrainSpec {
            windows: 100,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_windows: 10,
            weight_decay: 0.1,
            eval_every: 10,
            eval_microbatches: 8,
            checkpoint_every: 100,
            keep_checkpoints: 3,
        }
    }
}

/// `[collective]`: how ranks merge their updates.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CollectiveSpec {
    /// Fixes the all-reduce algorithm; `auto` chooses by message size.
    pub algorithm: AllReduceChoice,
}

/// `[bench]`: what the benchmark tasks measure (`task = "bench-allreduce"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BenchSpec {
    /// Smallest message, bytes (size string); doubled up to `max_bytes`.
    #[serde(deserialize_with = "values::deserialize_size")]
    pub min_bytes: usize,
    #[serde(deserialize_with = "values::deserialize_size")]
    pub max_bytes: usize,
    /// Timed repetitions per size (after `warmup` untimed ones), at least.
    pub iters: usize,
    pub warmup: usize,
    /// Each size runs more than `iters` times where that many calls would
    /// take less than this (milliseconds): a small message's time is a few
    /// microseconds of scheduling noise unless averaged over many calls.
    pub min_time_ms: u64,
    /// Shared-memory fabric: time all-reduce on buffers registered in the
    /// segment (nothing copied in or out); needs `network.shm_chunk >=
    /// max_bytes`.
    pub registered: bool,
}

impl Default for BenchSpec {
    fn default() -> Self {
        BenchSpec {
            min_bytes: 1 << 10,
            max_bytes: 64 << 20,
            iters: 20,
            warmup: 2,
            min_time_ms: 0,
            registered: false,
        }
    }
}

/// `[hello]`: the smoke job's ring (used when `job.task = "hello"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HelloSpec {
    /// Times the token goes around the ring.
    pub rounds: usize,
    /// Token size in bytes.
    pub token_bytes: usize,
    /// Seconds every rank stays alive after the barrier (for watching a job
    /// or testing signals).
    pub hold_s: f64,
}

impl Default for HelloSpec {
    fn default() -> Self {
        HelloSpec {
            rounds: 10,
            token_bytes: 1024,
            hold_s: 0.0,
        }
    }
}

impl JobSpec {
    /// The `[[site]]` called `name`.
    pub fn site(&self, name: &str) -> Option<&SiteSpec> {
        self.sites.iter().find(|s| s.name == name)
    }

    /// Blocks per pipeline stage: `pipeline.layers` if given, else
    /// `model.n_layer` split as evenly as possible with the earlier stages
    /// taking the remainder (stage 0 also embeds, the last also computes the
    /// loss, but the blocks dominate).
    pub fn stage_layers(&self) -> Vec<usize> {
        if let Some(layers) = &self.pipeline.layers {
            return layers.clone();
        }
        let (n, s) = (self.model.n_layer, self.pipeline.stages);
        (0..s).map(|i| n / s + usize::from(i < n % s)).collect()
    }
}

/// Reads and checks the job file at `path`.
pub fn load(path: &Path) -> Result<JobSpec, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and checks a job file's text; `path` only names it in errors.
pub fn parse(text: &str, path: &Path) -> Result<JobSpec, ConfigError> {
    let de = toml::Deserializer::parse(text)
        .map_err(|e| ConfigError::at(text, path, e.span(), None, e.message()))?;
    let spec: JobSpec = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.message();
        // serde reports a missing field at the table that lacks it; name the
        // field itself, so the path says what to add and where.
        let field = match missing_field(message) {
            Some(name) if field == "." => name.to_string(),
            Some(name) => format!("{field}.{name}"),
            None if field == "." => {
                return ConfigError::at(text, path, inner.span(), None, message)
            }
            None => field,
        };
        ConfigError::at(text, path, inner.span(), Some(field), message)
    })?;
    validate::check(&spec).map_err(|v| {
        let span = validate::locate(text, &v.field);
        ConfigError::at(text, path, span, Some(v.field), v.message)
    })?;
    Ok(spec)
}

/// The field name in serde's "missing field `NAME`" message.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.strip_suffix('`')
}
