//! `[[faults.cheat]]`: how a cheating miner fakes a pass, so that tests
//! and `swarmrun bench trust` can measure whether validators catch it.
//! An honest miner never gets here: `Cheater::new` is `None` for it.

use candle_core::Tensor;

use crate::config::{CheatKind, JobSpec};
use crate::data::rng::SplitMix64;
use crate::model::PassGrads;

/// Salt of the draws, apart from every other use of the job's seed.
const SALT: u64 = 0xc4ea_7000_0000_0000;

/// A miner's cheats and what it keeps to replay stale work.
#[derive(Debug)]
pub struct Cheater {
    kind: CheatKind,
    probability: f64,
    seed: u64,
    rank: usize,
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
            last_output: None,
            last_grads: None,
        })
    }

    /// Whether it cheats on microbatch `id`: the same answer for the
    /// forward and the backward pass.
    pub fn cheats_on(&self, id: u64) -> bool {
        let mut rng = SplitMix64::new(self.seed, ((self.rank as u64) << 48) ^ id);
        rng.unit_open0() <= self.probability
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
            (CheatKind::ReplayStale, None) => PassGrads { params, input },
        })
    }
}
