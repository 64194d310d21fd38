//! What the orchestrator and the miners say to each other, and the tags
//! their messages travel under.
//!
//! A change of these messages' shape bumps [`crate::wire::VERSION`], so
//! that builds that would misread each other cannot join one job
//! (a test here holds the shape to the version).
//!
//! Control is centralized and ordered: the orchestrator sends [`Order`]s
//! to every other rank on one tag, so each rank reads them in the order
//! they were given; miners answer with [`Report`]s on another. Boundary
//! tensors go directly between miners under tags that carry the
//! microbatch id and the attempt, so a tensor of an abandoned attempt can
//! never be taken for one of the attempt that replaced it.
//!
//! One window, as orders:
//! 1. `Run` (attempt 0): every microbatch id with its path, one miner per
//!    stage. When a miner is lost, the orchestrator sends another `Run`
//!    (attempt 1, 2, ...) with every microbatch not yet complete plus the
//!    complete ones the lost miner worked on (its gradients left with
//!    it); a miner drops whatever it was doing when a new order comes.
//! 2. `Close`: the final path of every training microbatch, and each
//!    stage's fixed-point scales (from the largest gradient magnitudes
//!    the counted passes' receipts state). Each miner sums the gradients
//!    of the ids whose final path names it and the miners of a stage
//!    all-reduce them; nothing is applied yet. A miner lost now sends the
//!    window back to step 1.
//! 3. `Step`: every stage reduced, so every miner applies the same AdamW
//!    step and reports its weights' and optimizer state's digests, which
//!    the orchestrator compares within each stage. When a checkpoint is
//!    due, one miner per stage writes its stage; with validators, each
//!    writer first sends one its state and the reduced sum, then the file
//!    it wrote, and the validator replays the step and compares. The
//!    orchestrator commits the manifest only when every file passed; a
//!    writer whose file did not is excluded and the window has no
//!    checkpoint.
//!
//! Before the first window, `Start` gives every miner its stage and says
//! whether to load a checkpoint. Before any window, `Place` may put
//! miners on stages: ranks that joined the running job (they announced
//! themselves with `Joining`), and a miner moving to the bottleneck stage
//! (SWARM's rebalancing). Each takes the stage's state in stripes from the
//! stage's miners and reports `Placed` with its digests. A miner asked to
//! leave reports `Leaving`, serves its window to the end and is told to
//! `Stop` after the step.
//!
//! Between 1 and 2, when it drew passes to replay, the orchestrator sends
//! `Audit`: each named miner sends its stage's weights and the frames it
//! received for those passes to a validator, which replays them against
//! the miner's [`Receipt`]s and reports each verdict. A miner caught is
//! told to `Stop` and the window goes back to step 1 without it. Passes
//! whose gradient sketches (stated with the reductions, with the `Close`
//! order's seed) point against their stage's are audited the same way
//! after 2.
//!
//! With a standby orchestrator (`[roles] standby = 1`), the orchestrator
//! hands it a [`Handover`] after each window (on [`STANDBY_TAG`]) and
//! waits for its acknowledgement before the next window's first order.
//! When the orchestrator is lost, every rank takes orders from the
//! standby, whose first is `Resume`: the window after the last one handed
//! over starts again, each miner going back to its state at that window's
//! start (`Rewound`), in attempts numbered from [`ATTEMPTS_PER_LEADER`] so
//! that no tensor of the lost orchestrator's attempts is taken for one of
//! the standby's.
//!
//! Between 2 and 3, `Recompute`: every stage's all-reduce is redundant
//! (each slice reduced by `[roles] slice_copies` miners straight from the
//! contributions, copies compared by digest), and validators recompute a
//! sample of the slices, and every slice whose copies differed, from the
//! contributions each miner stated in its [`Reduction`]. Holders that
//! agreed on a wrong slice (colluders) are caught here, and so is a
//! miner that sends a validator a contribution it did not state, or one
//! that is not, in the probed chunks, the sum of its credited passes'
//! gradients; the window then goes back to step 1 without them.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::checkpoint::StageEntry;
use crate::collective::WrongSlice;

/// Tag kinds, in the top byte; the low bytes carry a window or microbatch.
const KIND_ORDER: u64 = 0x4f;
const KIND_REPORT: u64 = 0x52;
const KIND_ACTIVATION: u64 = 0x41;
const KIND_GRADIENT: u64 = 0x47;
const KIND_CLOSE: u64 = 0x43;
const KIND_STATE: u64 = 0x54;
const KIND_AUDIT: u64 = 0x56;
const KIND_SLICE: u64 = 0x53;
const KIND_ACROSS: u64 = 0x58;
const KIND_CHECKPOINT: u64 = 0x4b;
const KIND_PING: u64 = 0x50;
const KIND_STANDBY: u64 = 0x48;

fn tag(kind: u64, n: u64) -> u64 {
    (kind << 56) | (n & ((1 << 56) - 1))
}

/// Orders, orchestrator to everyone else.
pub const ORDER_TAG: u64 = KIND_ORDER << 56;
/// Reports, miners to the orchestrator.
pub const REPORT_TAG: u64 = KIND_REPORT << 56;
/// Liveness pings, orchestrator to a rank's answering thread: a nonce
/// (u64 LE), answered with [`Report::Alive`]. A tag of their own, so that
/// the thread takes nothing meant for the rank's main loop.
pub const PING_TAG: u64 = KIND_PING << 56;
/// Orchestrator to standby: a [`Handover`]; standby to orchestrator: its
/// acknowledgement (empty).
pub const STANDBY_TAG: u64 = KIND_STANDBY << 56;

/// Marks a validation microbatch id: forward only, tokens from the
/// validation split.
pub const VALIDATION: u64 = 1 << 55;
/// Attempts of one window are numbered below this (7 bits of a tag).
pub const MAX_ATTEMPTS: u32 = 1 << 7;
/// Attempts each orchestrator of a window may make: the orchestrator's
/// are numbered from 0, a standby's that took over from this on.
pub const ATTEMPTS_PER_LEADER: u32 = MAX_ATTEMPTS / 2;
/// Microbatch ids proper are below this (48 bits of a tag).
pub const MAX_ID: u64 = 1 << 48;

pub fn is_validation(id: u64) -> bool {
    id & VALIDATION != 0
}

/// Bits: validation flag (55), attempt (48..55), id (0..48).
fn microbatch_tag(kind: u64, id: u64, attempt: u32) -> u64 {
    tag(
        kind,
        (id & VALIDATION) | (u64::from(attempt) << 48) | (id & (MAX_ID - 1)),
    )
}

pub fn activation_tag(id: u64, attempt: u32) -> u64 {
    microbatch_tag(KIND_ACTIVATION, id, attempt)
}
pub fn gradient_tag(id: u64, attempt: u32) -> u64 {
    microbatch_tag(KIND_GRADIENT, id, attempt)
}
/// The collectives of closing `window` in `attempt`: 8 tags apart, enough
/// for a fixed-point all-reduce.
pub fn close_tag(window: u64, attempt: u32) -> u64 {
    tag(KIND_CLOSE, ((window << 7) | u64::from(attempt)) << 3)
}

/// A stage's weights and optimizer state, striped over the stage's
/// miners, for a miner placed on it before `window` (in its `attempt`).
pub fn state_tag(window: u64, attempt: u32) -> u64 {
    tag(KIND_STATE, (window << 7) | u64::from(attempt))
}

/// What a miner sends a validator for the audits of `window`'s `attempt`.
pub fn audit_tag(window: u64, attempt: u32) -> u64 {
    tag(KIND_AUDIT, (window << 7) | u64::from(attempt))
}

/// A miner's contribution to `slice` of its stage's all-reduce in
/// `window`'s `attempt`, sent to the validator recomputing that slice.
pub fn slice_tag(window: u64, attempt: u32, slice: usize) -> u64 {
    let slice = (slice as u64) & ((1 << MAX_SLICE_BITS) - 1);
    tag(
        KIND_SLICE,
        (((window << 7) | u64::from(attempt)) << MAX_SLICE_BITS) | slice,
    )
}

/// For a stage whose miners span sites, what a miner sends the validator
/// recomputing `slice` of the all-reduce between the sites: its own
/// contribution to the slice, or (`partial`) a leader's site's partial sum.
pub fn across_tag(window: u64, attempt: u32, slice: usize, partial: bool) -> u64 {
    let slice = (slice as u64) & ((1 << MAX_SLICE_BITS) - 1);
    tag(
        KIND_ACROSS,
        (((((window << 7) | u64::from(attempt)) << MAX_SLICE_BITS) | slice) << 1)
            | u64::from(partial),
    )
}

/// What a checkpoint writer sends the validator auditing its stage file
/// of `window` (stepped in `attempt`): its state before the step, the
/// reduced sum, the file.
pub fn checkpoint_tag(window: u64, attempt: u32) -> u64 {
    tag(KIND_CHECKPOINT, (window << 7) | u64::from(attempt))
}

/// Bits of a slice number in [`slice_tag`]: a stage has at most this
/// many miners' worth of slices.
pub const MAX_SLICE_BITS: u32 = 12;

impl Order {
    /// The window and attempt the order belongs to, when it belongs to
    /// one.
    pub fn attempt(&self) -> Option<(u64, u32)> {
        match self {
            Order::Run {
                window, attempt, ..
            }
            | Order::Close {
                window, attempt, ..
            }
            | Order::Audit {
                window, attempt, ..
            }
            | Order::Recompute {
                window, attempt, ..
            }
            | Order::Step {
                window, attempt, ..
            }
            | Order::Place {
                window, attempt, ..
            } => Some((*window, *attempt)),
            Order::Start { .. }
            | Order::Resume { .. }
            | Order::Countersign { .. }
            | Order::Stop => None,
        }
    }
}

/// What a miner states about one training pass (one microbatch through
/// its stage): BLAKE3 digests, hex, of what it took in and gave out. The
/// orchestrator checks that neighbours' receipts chain (what one sent is
/// what the next received), so a miner cannot invent its input; a
/// validator replays the pass from the same input and weights and must get
/// the same digests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The activation frame received; `None` on stage 0, whose input is
    /// the microbatch's tokens.
    pub input: Option<String>,
    /// The frame sent downstream, or on the last stage the loss (f32 LE).
    pub output: String,
    /// The gradient frame received from downstream; `None` on the last
    /// stage.
    pub grad_in: Option<String>,
    /// The input-gradient frame sent upstream; `None` on stage 0.
    pub grad_out: Option<String>,
    /// The pass's parameter gradients (f32 LE, layout order), as
    /// `audit::params_digest` takes it: chunk by chunk, so that a
    /// validator can check one chunk without the rest.
    pub params: String,
    /// The largest magnitude of the parameter gradients in each parameter
    /// tensor (f32 bits; infinity for a NaN): the orchestrator sets the
    /// all-reduce's fixed-point scales from them.
    pub maxes: Vec<u32>,
}

/// One pass to replay: microbatch `id` on `stage`, served by `miner`, whose
/// receipt says `receipt`, replayed by `validator`. Replayed after a close,
/// also the sketch its miner stated of it with the close's seed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditTask {
    pub id: u64,
    pub stage: usize,
    pub miner: usize,
    pub validator: usize,
    pub receipt: Receipt,
    pub sketch: Option<StatedSketch>,
    /// An earlier `Audit` of this attempt already had `validator` sent
    /// the stage's weights, so the miner leaves them out of its bundle.
    /// Replays are drawn as microbatches finish, one order each, and the
    /// weights are the same all window: sent with every bundle, each
    /// replay after a stage's first cost a copy of the stage (on a real
    /// model, gigabytes). A validator that does not hold them after all
    /// (that bundle never came) judges nothing and blames no one.
    #[serde(default)]
    pub weights_held: bool,
}

/// A pass's `audit::gradient_sketch` with `seed`, as its miner stated it
/// (empty where it stated none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatedSketch {
    pub seed: u64,
    #[serde(with = "words_hex")]
    pub sketch: Vec<u32>,
}

/// What a miner states about its part in its stage's all-reduce: enough
/// for a validator to recompute any slice and say which miner was wrong.
/// Digests are [`slice_digest`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reduction {
    /// Its contribution to each slice, by slice.
    pub contributions: Vec<String>,
    /// Each slice it reduced, and the digest of its copy.
    pub copies: Vec<(usize, String)>,
    /// Whether every slice's copies agreed, so that the stage holds a
    /// result; when not, validators must say whose copy was wrong. For a
    /// stage spanning sites: the copies of its site's level.
    pub agreed: bool,
    /// When every copy agreed, the result it will apply: `model::digest`
    /// of the summed gradients (f32).
    pub result: Option<String>,
    /// Slices handed to it that are not the agreed copies, each proved by
    /// its owner's signed statement: it then holds no result.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wrong_slices: Vec<WrongSlice>,
    /// For a stage whose miners span sites, where `contributions` and
    /// `copies` are those of its site's all-reduce: its part in the one
    /// between the sites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub across: Option<Across>,
}

/// A miner's part in the all-reduce between the sites of its stage, cut
/// into one slice per site (the sites in the order of their ids).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Across {
    /// Its own contribution to each slice.
    pub contributions: Vec<String>,
    /// For its site's leader: what it contributed among the leaders (its
    /// site's partial sum) to each slice, each slice it reduced with its
    /// copy, and whether the leaders' copies agreed.
    pub leader: Option<LeaderPart>,
}

/// A site leader's statement of its part among the leaders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderPart {
    pub partial: Vec<String>,
    pub copies: Vec<(usize, String)>,
    pub agreed: bool,
}

/// A checkpoint to audit: `writer` sends `validator` its stage's state
/// before the step and the reduced sum, steps, writes its stage file and
/// sends it; the validator checks the state and the sum against the
/// digests the stage agreed on, replays the step and compares the file's
/// weights and optimizer state with its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointTask {
    pub stage: usize,
    pub writer: usize,
    pub validator: usize,
    /// The stage's weights digest before the step.
    pub weights: String,
    /// Its optimizer state digest before the step, when known (a run
    /// resumed from a checkpoint that does not record it does not know).
    pub optimizer: Option<String>,
    /// The reduced sum's digest ([`Reduction::result`]).
    pub sum: String,
}

/// The digest a [`Reduction`] states for fixed-point integers: BLAKE3,
/// hex, of their bytes as they travel (little-endian on every host we run).
pub fn slice_digest(values: &[i64]) -> String {
    super::audit::digest(bytemuck::cast_slice(values))
}

/// A pass a window credits a miner with, as its receipt and its close
/// state it: what a contribution check holds the probed chunks of its
/// gradients against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditedPass {
    pub id: u64,
    /// The receipt's `params`.
    pub params: String,
    /// [`sketch_digest`] of the gradient sketch the miner stated for it
    /// when it reduced: the miner sends the sketch itself to the validator
    /// with its proof, so the order stays small.
    pub sketch: String,
}

/// The digest a [`CreditedPass`] states of a sketch: BLAKE3, hex, of its
/// f32 bits, little-endian.
pub fn sketch_digest(sketch: &[u32]) -> String {
    super::audit::digest(bytemuck::cast_slice(sketch))
}

/// A miner's `audit::gradient_sketch` of one pass's parameter gradients
/// (f32 bits), with the window's `Close` seed: the orchestrator compares
/// its direction with the stage's other passes'.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassSketch {
    pub id: u64,
    #[serde(with = "words_hex")]
    pub sketch: Vec<u32>,
}

/// A sketch in a message: the hex of its words' little-endian bytes, not
/// a JSON array of numbers. A miner states 256 words for every pass it
/// served in a window, and parsing them as numbers was the orchestrator's
/// largest cost on `bench trust`'s job (many small passes). The `hex`
/// crate's iterators cost as much again, so the digits are done here.
mod words_hex {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    const DIGITS: &[u8; 16] = b"0123456789abcdef";

    /// Each byte's value as a hex digit, 0xff where it is none.
    const VALUES: [u8; 256] = {
        let mut values = [0xff; 256];
        let mut i = 0;
        while i < 16 {
            values[DIGITS[i] as usize] = i as u8;
            values[DIGITS[i].to_ascii_uppercase() as usize] = i as u8;
            i += 1;
        }
        values
    };

    pub fn serialize<S: Serializer>(words: &[u32], s: S) -> Result<S::Ok, S::Error> {
        let mut text = String::with_capacity(8 * words.len());
        for byte in words.iter().flat_map(|w| w.to_le_bytes()) {
            text.push(char::from(DIGITS[usize::from(byte >> 4)]));
            text.push(char::from(DIGITS[usize::from(byte & 15)]));
        }
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        let digits = text.as_bytes();
        if !digits.len().is_multiple_of(8) {
            return Err(D::Error::custom(format!(
                "a sketch of {} hex digits is not whole 4-byte words",
                digits.len()
            )));
        }
        let mut words = Vec::with_capacity(digits.len() / 8);
        // Any digit that is none sets a high bit of `seen`.
        let mut seen = 0u8;
        for eight in digits.chunks_exact(8) {
            let mut word = 0u32;
            for (i, pair) in eight.chunks_exact(2).enumerate() {
                let (high, low) = (VALUES[usize::from(pair[0])], VALUES[usize::from(pair[1])]);
                seen |= high | low;
                word |= u32::from(high << 4 | low & 15) << (8 * i);
            }
            words.push(word);
        }
        if seen & 0xf0 != 0 {
            return Err(D::Error::custom("a sketch that is not hex"));
        }
        Ok(words)
    }
}

/// One slice of `stage`'s all-reduce for `validator` to recompute from
/// the contributions and compare with the copies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceTask {
    pub stage: usize,
    pub slice: usize,
    pub validator: usize,
    /// Every miner of the stage, in the all-reduce's rank order, with the
    /// digest of its contribution to the slice.
    pub contributors: Vec<(usize, String)>,
    /// The miners that reduced the slice, with their copies' digests.
    pub holders: Vec<(usize, String)>,
    /// The stage's fixed-point scales, as the `Close` order gave them.
    pub scales: Vec<i32>,
    /// The `Close` order's sketch seed.
    pub sketch_seed: u64,
    /// For each contributor (same order), the passes the window credits
    /// it with: its contribution must be their gradients' fixed-point sum,
    /// and their sketches those gradients', in the probed chunks. Every
    /// recomputed slice of one site's (or a flat) all-reduce carries them
    /// (`None` between sites, whose partials mix the sites' miners).
    pub passes: Option<Vec<Vec<CreditedPass>>>,
    /// Drawn after the miners stated their contributions: picks the
    /// gradient chunks (`audit::GRAD_CHUNK` floats) of the slice in which
    /// each contribution is checked against its passes
    /// ([`SliceTask::probed`]).
    pub probe: u64,
    /// Empty for a slice of one site's (or a flat) all-reduce. For a slice
    /// of the all-reduce between sites (one slice per site): each site's
    /// leader, its stated partial sum, and its members (indices into
    /// `contributors`, which then hold every miner of the stage). The
    /// holders are leaders, whose copies must be the sum of the partials,
    /// and each partial must be the sum of its members' contributions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<SitePart>,
}

/// One site's part in a [`SliceTask`] between sites.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SitePart {
    pub leader: usize,
    pub partial: String,
    pub members: Vec<usize>,
}

impl SliceTask {
    /// The `count` gradient chunks [`SliceTask::probe`] picks in the
    /// slice's `range` (`[roles] contribution_chunks`).
    pub fn probed(&self, range: &std::ops::Range<usize>, count: usize) -> Vec<usize> {
        super::audit::probed_chunks(self.probe, range, count)
    }
}

/// A validator's finding on one [`AuditTask`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The replay gave the receipt's digests, bit for bit.
    Passed,
    /// It did not, or the miner's weights or frames were not what it
    /// stated: why.
    Failed(String),
    /// The miner left before sending what the replay needs.
    Unavailable,
}

/// A miner placed on a stage between windows: a rank that joined the
/// job, or a miner moving to the bottleneck. Each of `sources`, the
/// stage's miners, sends it one stripe of the stage's weights and
/// optimizer state; it must come out with the digests the stage agreed
/// on, which the orchestrator states here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub rank: usize,
    pub stage: usize,
    pub sources: Vec<usize>,
    /// The stage's weights digest.
    pub weights: String,
    /// Its optimizer state digest, when known (a run resumed from a
    /// checkpoint that does not record it does not know).
    pub optimizer: Option<String>,
}

/// Digests of a placed miner's weights and optimizer state, as loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageDigests {
    pub weights: String,
    pub optimizer: String,
}

/// One microbatch and the miner of each stage that serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub id: u64,
    pub path: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Order {
    /// The first order: the miners of each stage (the plan's, or after a
    /// resume the checkpoint's, where miners may have moved), and the
    /// checkpoint to load, if any.
    Start {
        stages: Vec<Vec<usize>>,
        checkpoint: Option<u64>,
    },
    /// Serve these microbatches, in ascending id; drop any earlier attempt.
    Run {
        window: u64,
        attempt: u32,
        routes: Vec<Route>,
    },
    /// Sum and all-reduce the gradients of `counted` (final paths of every
    /// training microbatch of the window) among the stage's live miners.
    Close {
        window: u64,
        attempt: u32,
        counted: Vec<Route>,
        /// The live miners of each stage.
        stages: Vec<Vec<usize>>,
        /// Each stage's fixed-point scales (`FixedPoint::exponents`), from
        /// the counted passes' receipts.
        scales: Vec<Vec<i32>>,
        /// For each stage whose miners span sites, the site id of each of
        /// its miners (in `stages` order): it all-reduces hierarchically.
        /// Empty for a stage inside one site.
        #[serde(default)]
        sites: Vec<Vec<usize>>,
        /// Each stage's miners' public keys (hex, in `stages` order; empty
        /// where the orchestrator has not heard one): the keys their signed
        /// statements of the slices they hand out are checked against.
        #[serde(default)]
        keys: Vec<Vec<String>>,
        /// Picks the signs and entries of the gradient sketches each miner
        /// states with its reduction. Drawn now, after every pass's receipt
        /// bound its gradients, so no miner can shape a wrong gradient to
        /// look right in its sketch.
        sketch_seed: u64,
        /// For each stage whose every slice validators recompute (the
        /// default `slice_audit_rate = 1`, a stage inside one site), the
        /// validator recomputing each slice: its miners send their
        /// contributions to it beside the all-reduce, so that `Recompute`
        /// finds them there. Empty for a stage whose slices are drawn
        /// after the close, whose contributions wait for `Recompute`.
        #[serde(default)]
        recomputers: Vec<Vec<usize>>,
    },
    /// Send what the validators need to replay `tasks`; `weights` is the
    /// digest every stage's weights had at the window's start. Goes to
    /// the miners and validators `tasks` names alone.
    Audit {
        window: u64,
        attempt: u32,
        tasks: Vec<AuditTask>,
        weights: Vec<String>,
    },
    /// Send the validators named in `tasks` your contribution to each
    /// slice they recompute.
    Recompute {
        window: u64,
        attempt: u32,
        tasks: Vec<SliceTask>,
    },
    /// Apply the reduced gradients; the miners in `writers` (one per stage,
    /// empty when no checkpoint is due) write their stage's checkpoint,
    /// sending what `audits` asks to validators.
    Step {
        window: u64,
        attempt: u32,
        writers: Vec<usize>,
        audits: Vec<CheckpointTask>,
    },
    /// Before `window` runs: each placed miner takes its stage's state
    /// from the stage's miners (see [`Placement`]) and reports `Placed`.
    Place {
        window: u64,
        attempt: u32,
        placements: Vec<Placement>,
    },
    /// Validators: countersign this ledger line (of `window`), as its
    /// leader wrote it.
    Countersign {
        window: u64,
        line: String,
    },
    /// The standby's first order, once the orchestrator is lost: `window`
    /// starts over. Each miner goes back to its state at the window's
    /// start (before any placement) and reports `Rewound`. A miner that
    /// never had `Start` takes this as its `Start`.
    Resume {
        window: u64,
        stages: Vec<Vec<usize>>,
        checkpoint: Option<u64>,
    },
    Stop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Report {
    /// This miner finished its part of a microbatch: the forward (and for
    /// training ids the backward, gradients stored) of its stage. The last
    /// stage adds the loss.
    Served {
        window: u64,
        attempt: u32,
        id: u64,
        stage: usize,
        compute_s: f64,
        loss: Option<f32>,
        /// Boundary tensors sent since the miner's last report: their bytes
        /// as computed (f32) and on the wire.
        dense_bytes: u64,
        wire_bytes: u64,
        /// For a training microbatch (boxed: most reports have none).
        receipt: Option<Box<Receipt>>,
        /// Seconds it waited for this microbatch's boundary tensors (and
        /// any waits since its last report).
        #[serde(default)]
        wait_s: f64,
    },
    /// A validator replayed `task` in `replay_s` seconds.
    Audited {
        window: u64,
        attempt: u32,
        task: Box<AuditTask>,
        verdict: Verdict,
        replay_s: f64,
    },
    /// The stage's gradients are all-reduced and held for `Step` (when
    /// the copies agreed).
    Reduced {
        window: u64,
        attempt: u32,
        reduction: Box<Reduction>,
        /// The deadline, in seconds, this miner gave the all-reduce.
        deadline_s: f64,
        /// Seconds the all-reduce took it.
        #[serde(default)]
        reduce_s: f64,
        /// The sketch of each counted pass it served, by microbatch.
        sketches: Vec<PassSketch>,
    },
    /// A validator recomputed a slice: the verdict on each miner involved
    /// (contributors and holders), after `replay_s` seconds of work.
    Recomputed {
        window: u64,
        attempt: u32,
        task: Box<SliceTask>,
        verdicts: Vec<(usize, Verdict)>,
        replay_s: f64,
    },
    /// The all-reduce failed (a peer was lost); waiting for orders.
    ReduceFailed {
        window: u64,
        attempt: u32,
        reason: String,
        /// The miner that handed this one a slice other than the agreed
        /// copy, where no signature proves it: a dispute, one's word
        /// against the other's.
        #[serde(default)]
        disputed: Option<usize>,
    },
    /// The step is applied; `digest` and `optimizer` are the digests of
    /// the new weights and optimizer state; `checkpoint` is the stage file
    /// this miner wrote, when it was a writer.
    Stepped {
        window: u64,
        stage: usize,
        digest: String,
        optimizer: String,
        checkpoint: Option<StageEntry>,
        /// Seconds the step took it (writing and sending a checkpoint
        /// included).
        #[serde(default)]
        step_s: f64,
    },
    /// A rank that joined the running job is connected to every rank and
    /// waits for a stage.
    Joining,
    /// A miner asked to leave (SIGTERM or SIGINT): it finishes the work it
    /// holds and goes at the next window boundary.
    Leaving,
    /// The answer to the liveness ping carrying `nonce`.
    Alive { nonce: u64 },
    /// A miner's public key (hex), which signs its statements of the
    /// all-reduce slices it hands out: told to each leader it serves,
    /// before anything else it reports to it.
    SigningKey { key: String },
    /// A placed miner loaded its stage's state (its digests), or could
    /// not (why).
    Placed {
        window: u64,
        stage: usize,
        state: Result<StageDigests, String>,
    },
    /// A miner went back to the start of `window` after a `Resume`: its
    /// stage and digests there, or why it could not.
    Rewound {
        window: u64,
        stage: usize,
        state: Result<StageDigests, String>,
    },
    /// A validator audited `task`'s checkpoint: the BLAKE3 (hex) of the
    /// file it got, the weights digest its replay of the step gave, and
    /// whether the file holds what the replay does.
    CheckpointAudited {
        window: u64,
        task: CheckpointTask,
        file: Option<String>,
        weights: Option<String>,
        verdict: Verdict,
        replay_s: f64,
    },
}

#[derive(Debug, Error)]
#[error("malformed {what} from rank {rank}: {reason}")]
pub struct ProtocolError {
    pub what: &'static str,
    pub rank: usize,
    pub reason: String,
}

pub fn encode<M: Serialize>(message: &M) -> Vec<u8> {
    // Plain enums of numbers, strings and vectors always serialize.
    serde_json::to_vec(message).unwrap_or_default()
}

/// Orchestrator to standby, on [`STANDBY_TAG`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Handover {
    /// The orchestrator's state as of the start of a window (boxed: large).
    Boundary(Box<crate::roles::orchestrator::machine::Boundary>),
    /// The job is done: the standby ends.
    Finished,
}

pub fn decode_handover(bytes: &[u8], from: usize) -> Result<Handover, ProtocolError> {
    serde_json::from_slice(bytes).map_err(|e| ProtocolError {
        what: "handover",
        rank: from,
        reason: e.to_string(),
    })
}

pub fn decode_order(bytes: &[u8], from: usize) -> Result<Order, ProtocolError> {
    serde_json::from_slice(bytes).map_err(|e| ProtocolError {
        what: "order",
        rank: from,
        reason: e.to_string(),
    })
}

pub fn decode_report(bytes: &[u8], from: usize) -> Result<Report, ProtocolError> {
    serde_json::from_slice(bytes).map_err(|e| ProtocolError {
        what: "report",
        rank: from,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire version and the digest of the messages' shape at that
    /// version (see [`shape`]).
    const PINNED: (u8, &str) = (
        6,
        "ec26e739873d9d7aae933598949f56b0396861f870bc7626fdd90932099be1f5",
    );

    /// The serde shape of every message roles send each other, and of
    /// every type inside them: these orders, reports, handovers and pass
    /// sketches, and the audit bundle's header.
    fn shape() -> serde_reflection::Registry {
        use serde_reflection::{Samples, Tracer, TracerConfig};
        let mut tracer = Tracer::new(TracerConfig::default());
        let samples = Samples::new();
        // Enums inside the messages, each traced whole on its own first.
        tracer.trace_simple_type::<Verdict>().unwrap();
        tracer
            .trace_simple_type::<Result<StageDigests, String>>()
            .unwrap();
        tracer.trace_type::<Order>(&samples).unwrap();
        tracer.trace_type::<Report>(&samples).unwrap();
        tracer.trace_type::<Handover>(&samples).unwrap();
        tracer.trace_type::<PassSketch>(&samples).unwrap();
        tracer
            .trace_type::<crate::roles::audit::Header>(&samples)
            .unwrap();
        tracer.registry().unwrap()
    }

    /// Ranks of two builds that would misread each other's messages must
    /// be refused at the handshake, which compares [`crate::wire::VERSION`];
    /// so every change of the messages' shape (field and variant names and
    /// types) must come with a bump of that version, which this holds it
    /// to (last it was forgotten: `AuditTask::weights_held`).
    #[test]
    fn the_shape_of_what_roles_say_changes_only_with_the_wire_version() {
        let json = serde_json::to_vec(&shape()).unwrap();
        let digest = blake3::hash(&json).to_hex().to_string();
        let version = match digest == PINNED.1 {
            true => crate::wire::VERSION,
            false => crate::wire::VERSION.max(PINNED.0 + 1),
        };
        assert_eq!(
            (crate::wire::VERSION, digest.as_str()),
            PINNED,
            "what roles say, or wire::VERSION, is not as pinned: a change of \
             the messages' shape needs a bump of wire::VERSION \
             (src/wire/frame.rs, with a word on why), then pin ({version}, \
             \"{digest}\") here",
        );
    }

    #[test]
    fn orders_and_reports_round_trip_and_garbage_is_refused() {
        let order = Order::Run {
            window: 3,
            attempt: 1,
            routes: vec![Route {
                id: 24 | VALIDATION,
                path: vec![1, 3],
            }],
        };
        assert_eq!(decode_order(&encode(&order), 0).unwrap(), order);
        let report = Report::Served {
            window: 3,
            attempt: 1,
            id: 24,
            stage: 1,
            compute_s: 0.25,
            loss: Some(2.5),
            dense_bytes: 4096,
            wire_bytes: 1040,
            receipt: Some(Box::new(Receipt {
                input: Some("ab".into()),
                output: "cd".into(),
                grad_in: None,
                grad_out: Some("ef".into()),
                params: "01".into(),
                maxes: vec![0x3f80_0000],
            })),
            wait_s: 0.125,
        };
        assert_eq!(decode_report(&encode(&report), 4).unwrap(), report);
        let err = decode_report(b"{\"Served\":{}}", 4).unwrap_err();
        assert!(
            err.to_string().starts_with("malformed report from rank 4"),
            "{err}"
        );
        assert!(decode_order(&[0xff; 9], 0).is_err());
    }

    #[test]
    fn sketches_travel_as_hex_and_malformed_ones_are_refused() {
        let sketch = PassSketch {
            id: 7,
            sketch: vec![0x3f80_0000, 0xbf80_0000, 0, u32::MAX],
        };
        let bytes = encode(&sketch);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.contains("\"0000803f000080bf00000000ffffffff\""),
            "{text}"
        );
        assert_eq!(
            serde_json::from_slice::<PassSketch>(&bytes).unwrap(),
            sketch
        );
        for bad in [r#""0000803""#, r#""0000803g""#, r#""000080""#, "[1,2]"] {
            let message = format!(r#"{{"id":7,"sketch":{bad}}}"#);
            assert!(
                serde_json::from_str::<PassSketch>(&message).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn tags_of_other_kinds_attempts_or_splits_never_collide() {
        assert_ne!(activation_tag(7, 0), gradient_tag(7, 0));
        assert_ne!(activation_tag(7, 0), activation_tag(7, 1));
        assert_ne!(activation_tag(7, 0), activation_tag(7 | VALIDATION, 0));
        assert_ne!(close_tag(1, 0), close_tag(1, 1));
        assert!(close_tag(1, 0) + 8 <= close_tag(1, 1));
        assert_ne!(ORDER_TAG, REPORT_TAG);
        assert_ne!(PING_TAG, ORDER_TAG);
        assert_ne!(PING_TAG, REPORT_TAG);
        assert_ne!(audit_tag(1, 0), audit_tag(1, 1));
        assert_ne!(audit_tag(1, 0), state_tag(1, 0));
        assert_ne!(state_tag(1, 0), state_tag(1, ATTEMPTS_PER_LEADER));
        assert_ne!(checkpoint_tag(1, 0), checkpoint_tag(1, ATTEMPTS_PER_LEADER));
        assert_ne!(STANDBY_TAG, ORDER_TAG);
        assert_ne!(slice_tag(1, 0, 2), slice_tag(1, 0, 3));
        assert_ne!(slice_tag(1, 0, 2), slice_tag(1, 1, 2));
        assert_ne!(slice_tag(1, 0, 2), slice_tag(2, 0, 2));
        assert_ne!(across_tag(1, 0, 2, false), across_tag(1, 0, 2, true));
        assert_ne!(across_tag(1, 0, 2, false), across_tag(1, 0, 3, false));
        assert_ne!(across_tag(1, 0, 2, true), slice_tag(1, 0, 2));
        assert_ne!(checkpoint_tag(1, 0), state_tag(1, 0));
    }
}
