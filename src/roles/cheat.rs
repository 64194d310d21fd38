//! `[[faults.cheat]]`: how a cheating miner fakes a pass, so that tests
//! and `swarmrun bench trust` can measure whether validators catch it.
//! An honest miner never gets here: `Cheater::new` is `None` for it.

use candle_core::Tensor;

use crate::collective::slice_holders;
use crate::config::{CheatKind, JobSpec};
use crate::data::rng::SplitMix64;
use crate::model::{AdamW, PassGrads};

/// Salt of the draws, apart from every other use of the job's seed.
const SALT: u64 = 0xc4ea_7000_0000_0000;
/// Salts of the colluders' shared draw and of the forger's, apart from
/// the per-pass draws.
const COLLUDE_SALT: u64 = 0x0c01_1de0_0000_0000;
const FORGE_SALT: u64 = 0xf0e9_e000_0000_0000;
const INFLATE_SALT: u64 = 0x1f1a_7e00_0000_0000;

/// A miner's cheats and what it keeps to replay stale work.
#[derive(Debug)]
pub struct Cheater {
    kind: CheatKind,
    probability: f64,
    seed: u64,
    rank: usize,
    /// Every rank the job makes a colluder, this one among them for `collude`.
    colluders: Vec<usize>,
    /// The last output and gradients it computed, for `replay_stale`.
    last_output: Option<Tensor>,
    last_grads: Option<PassGrads>,
}

impl Cheater {
    /// `rank`'s cheat, if the job gives it one.
    pub fn new(spec: &JobSpec, rank: usize) -> Option<Cheater> {
        let c = spec.faults.cheat.iter().find(|c| c.rank == rank)?;
        Some(Cheater {
            kind: c.kind,
            probability: c.probability,
            seed: spec.job.seed ^ SALT,
            rank,
            colluders: spec
                .faults
                .cheat
                .iter()
                .filter(|c| c.kind == CheatKind::Collude)
                .map(|c| c.rank)
                .collect(),
            last_output: None,
            last_grads: None,
        })
    }

    /// Whether it cheats on microbatch `id`: the same answer for the
    /// forward and the backward pass. A colluder's and a forger's passes
    /// are honest.
    pub fn cheats_on(&self, id: u64) -> bool {
        let mut rng = SplitMix64::new(self.seed, ((self.rank as u64) << 48) ^ id);
        let on_passes = matches!(
            self.kind,
            CheatKind::RandomGrad
                | CheatKind::SkipCompute
                | CheatKind::ReplayStale
                | CheatKind::ScaleUpdate
        );
        on_passes && rng.unit_open0() <= self.probability
    }

    /// For a colluder, the slices of `window`'s all-reduce among `peers`
    /// (in the all-reduce's rank order) that it changes: those it reduces
    /// with at least one other colluder, in the windows the colluders'
    /// shared draw picks. Where they are all the holders their copies
    /// agree; where they are the majority they outvote the honest copies.
    pub fn colluded_slices(&self, window: u64, peers: &[usize], copies: usize) -> Vec<usize> {
        if !self.strikes(CheatKind::Collude, COLLUDE_SALT, window) {
            return Vec::new();
        }
        let n = peers.len();
        (0..n)
            .filter(|&j| {
                let holders = slice_holders(j, n, copies);
                let colluding = holders
                    .iter()
                    .filter(|&&h| self.colluders.contains(&peers[h]));
                colluding.count() >= 2
            })
            .collect()
    }

    /// For a forger writing a checkpoint in `window` (when its draw says
    /// so), the optimizer state it writes instead of `honest`: the second
    /// moments times 4, so a run resumed from it takes smaller steps.
    pub fn forged_state(&self, window: u64, honest: &AdamW) -> Option<AdamW> {
        if !self.strikes(CheatKind::ForgeCheckpoint, FORGE_SALT, window) {
            return None;
        }
        let (m, v) = honest.moments();
        let v: Vec<f32> = v.iter().map(|x| x * 4.0).collect();
        let mut forged = honest.clone();
        forged.restore(honest.steps_taken(), m, &v).ok()?;
        Some(forged)
    }

    /// Whether an inflater multiplies its all-reduce contribution in
    /// `window` (its passes stay honest).
    pub fn inflates(&self, window: u64) -> bool {
        self.strikes(CheatKind::ScaleContribution, INFLATE_SALT, window)
    }

    /// Whether a once-a-window cheat of `kind` strikes in `window`: it is
    /// this miner's kind and the draw under `salt` says so. The draw leaves
    /// the rank out, so every miner with that cheat (colluders) agrees.
    fn strikes(&self, kind: CheatKind, salt: u64, window: u64) -> bool {
        let mut coin = SplitMix64::new(self.seed, salt ^ window);
        self.kind == kind && coin.unit_open0() <= self.probability
    }

    /// What an inflater makes of its contribution: every integer times 8,
    /// as if its gradients were (exactly, since 8 is a power of two).
    pub fn inflate(contribution: &mut [i64]) {
        for x in contribution {
            *x = x.wrapping_mul(8);
        }
    }

    /// What a colluder makes of a slice it changes: every element doubled
    /// (wrapping: the integers are fixed-point sums), the same bits on
    /// every colluder.
    pub fn collude(slice: &mut [i64]) {
        for x in slice {
            *x = x.wrapping_mul(2);
        }
    }

    /// The output it sends in place of `honest`.
    pub fn output(&mut self, id: u64, honest: &Tensor) -> candle_core::Result<Tensor> {
        let previous = self.last_output.replace(honest.clone());
        if !self.cheats_on(id) {
            return Ok(honest.clone());
        }
        match (self.kind, previous) {
            (CheatKind::SkipCompute, _) => honest.zeros_like(),
            (CheatKind::ReplayStale, Some(stale)) => Ok(stale),
            _ => Ok(honest.clone()),
        }
    }

    /// The gradients it keeps and sends in place of `honest`.
    pub fn grads(&mut self, id: u64, honest: PassGrads) -> candle_core::Result<PassGrads> {
        let previous = self.last_grads.replace(honest.clone());
        if !self.cheats_on(id) {
            return Ok(honest);
        }
        let PassGrads { params, input } = honest;
        Ok(match (self.kind, previous) {
            (CheatKind::RandomGrad, _) => {
                let mut rng = SplitMix64::new(self.seed, id);
                let params = params
                    .iter()
                    .map(|_| (rng.normal() * 1e-3) as f32)
                    .collect();
                PassGrads { params, input }
            }
            (CheatKind::SkipCompute, _) => PassGrads {
                params: vec![0.0; params.len()],
                input: input.map(|g| g.zeros_like()).transpose()?,
            },
            (CheatKind::ReplayStale, Some(stale)) => stale,
            (CheatKind::ScaleUpdate, _) => PassGrads {
                params: params.iter().map(|g| g * 10.0).collect(),
                input,
            },
            (CheatKind::ReplayStale, None)
            | (CheatKind::Collude | CheatKind::ForgeCheckpoint | CheatKind::ScaleContribution, _) => {
                PassGrads { params, input }
            }
        })
    }
}
