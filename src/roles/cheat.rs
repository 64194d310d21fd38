//! `[[faults.cheat]]`: how a cheating miner fakes a pass, so that tests
//! and `swarmrun bench trust` can measure whether validators catch it.
//!
//! [`Conduct`] is the one seam: the miner hands every value a cheat could
//! change (a boundary output, a pass's gradients, its all-reduce
//! contribution and slices, a checkpoint's optimizer state) through it
//! and goes on with what comes back. An honest miner's conduct
//! ([`Honest`]) gives everything back untouched, so the miner's own close
//! and step hold no cheat of their own.

use candle_core::Tensor;

use crate::collective::{slice_holders, PartialTamper, SliceTamper};
use crate::config::{CheatKind, JobSpec, NUDGED_ELEMENTS};
use crate::data::rng::SplitMix64;
use crate::model::{AdamW, PassGrads};

/// Salt of the draws, apart from every other use of the job's seed.
const SALT: u64 = 0xc4ea_7000_0000_0000;
/// Salts of the colluders' shared draw and of the forger's, apart from
/// the per-pass draws.
const COLLUDE_SALT: u64 = 0x0c01_1de0_0000_0000;
const FORGE_SALT: u64 = 0xf0e9_e000_0000_0000;
const INFLATE_SALT: u64 = 0x1f1a_7e00_0000_0000;
const NUDGE_SALT: u64 = 0x0d6e_0000_0000_0000;
const PARTIAL_SALT: u64 = 0x9a27_1a10_0000_0000;
const GATHER_SALT: u64 = 0x6a7e_0000_0000_0000;

/// The salt of a once-a-window cheat's draw; `None` for a cheat drawn
/// pass by pass.
fn window_salt(kind: CheatKind) -> Option<u64> {
    match kind {
        CheatKind::Collude => Some(COLLUDE_SALT),
        CheatKind::ForgeCheckpoint => Some(FORGE_SALT),
        CheatKind::ScaleContribution => Some(INFLATE_SALT),
        CheatKind::NudgeContribution => Some(NUDGE_SALT),
        CheatKind::ForgePartial => Some(PARTIAL_SALT),
        CheatKind::ForgeGather | CheatKind::ForgeGatherDeniably => Some(GATHER_SALT),
        CheatKind::RandomGrad
        | CheatKind::SkipCompute
        | CheatKind::ReplayStale
        | CheatKind::ScaleUpdate
        | CheatKind::FlipGrad
        | CheatKind::FlipSketch
        | CheatKind::GuessUnaudited => None,
    }
}

/// How far a nudged element moves, in fixed-point units: far past any
/// rounding, small beside the sum's range.
const NUDGE: i64 = 1 << 24;

/// A miner's cheats and what it keeps to replay stale work.
#[derive(Debug)]
pub struct Cheater {
    kind: CheatKind,
    probability: f64,
    /// Honest before this window.
    from_window: u64,
    /// Training microbatches per window: a pass's window is its id over
    /// this.
    per_window: u64,
    seed: u64,
    rank: usize,
    /// Every rank the job makes a colluder, this one among them for `collude`.
    colluders: Vec<usize>,
    /// The last output and gradients it computed, for `replay_stale`.
    last_output: Option<Tensor>,
    last_grads: Option<PassGrads>,
    /// For `guess_unaudited`: how often validators asked for its passes,
    /// by place in the window.
    audits_by_place: Vec<u64>,
}

/// How a miner treats what it computes before it is sent, kept or written.
pub trait Conduct: Send {
    /// The boundary output it sends for training microbatch `id`.
    fn output(&mut self, id: u64, honest: &Tensor) -> candle_core::Result<Tensor>;
    /// The gradients it keeps and sends for training microbatch `id`.
    fn grads(&mut self, id: u64, honest: PassGrads) -> candle_core::Result<PassGrads>;
    /// Changes its fixed-point all-reduce contribution of `window` in place.
    fn contribution(&self, window: u64, contribution: &mut [i64]);
    /// What it does to the slices it reduces in `window`'s all-reduce among
    /// `peers` with `copies` copies per slice, if anything.
    fn slice_tamper(
        &self,
        window: u64,
        peers: &[usize],
        copies: usize,
    ) -> Option<Box<SliceTamper<'static, i64>>>;
    /// What it does, as a site's leader, to its site's partial sum in
    /// `window` before handing it to the other sites, if anything.
    fn partial_tamper(&self, window: u64) -> Option<Box<PartialTamper<'static, i64>>>;
    /// What it does to its own slice of `window`'s all-reduce, once the
    /// copies agreed, before handing it out, if anything; `deniably`: after
    /// signing the statement of what it hands out.
    fn handed_tamper(&self, window: u64, deniably: bool) -> Option<Box<SliceTamper<'static, i64>>>;
    /// The optimizer state it writes into `window`'s checkpoint instead of
    /// `honest`, if any.
    fn checkpoint_state(&self, window: u64, honest: &AdamW) -> Option<AdamW>;
    /// Hears which of its training passes validators asked to replay
    /// (every miner sees that: it sends them the frames).
    fn audited(&mut self, _ids: &[u64]) {}
    /// The gradient sketch (f32 bits) it states of training pass `id`
    /// instead of `honest`.
    fn sketch(&self, _id: u64, honest: Vec<u32>) -> Vec<u32> {
        honest
    }
}

/// A miner that follows the protocol.
#[derive(Debug)]
pub struct Honest;

impl Conduct for Honest {
    fn output(&mut self, _: u64, honest: &Tensor) -> candle_core::Result<Tensor> {
        Ok(honest.clone())
    }

    fn grads(&mut self, _: u64, honest: PassGrads) -> candle_core::Result<PassGrads> {
        Ok(honest)
    }

    fn contribution(&self, _: u64, _: &mut [i64]) {}

    fn slice_tamper(
        &self,
        _: u64,
        _: &[usize],
        _: usize,
    ) -> Option<Box<SliceTamper<'static, i64>>> {
        None
    }

    fn partial_tamper(&self, _: u64) -> Option<Box<PartialTamper<'static, i64>>> {
        None
    }

    fn handed_tamper(&self, _: u64, _: bool) -> Option<Box<SliceTamper<'static, i64>>> {
        None
    }

    fn checkpoint_state(&self, _: u64, _: &AdamW) -> Option<AdamW> {
        None
    }
}

/// `rank`'s conduct: its `[[faults.cheat]]`, or honest.
pub fn conduct(spec: &JobSpec, rank: usize) -> Box<dyn Conduct> {
    match Cheater::new(spec, rank) {
        Some(cheater) => Box::new(cheater),
        None => Box::new(Honest),
    }
}

impl Cheater {
    /// `rank`'s cheat, if the job gives it one.
    pub fn new(spec: &JobSpec, rank: usize) -> Option<Cheater> {
        let c = spec.faults.cheat.iter().find(|c| c.rank == rank)?;
        Some(Cheater {
            kind: c.kind,
            probability: c.probability,
            from_window: c.from_window,
            per_window: spec.pipeline.microbatches_per_window.max(1) as u64,
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
            audits_by_place: vec![0; spec.pipeline.microbatches_per_window.max(1)],
        })
    }

    /// Whether it cheats on microbatch `id`: the same answer for the
    /// forward and the backward pass. A colluder's and a forger's passes
    /// are honest.
    pub fn cheats_on(&self, id: u64) -> bool {
        if id / self.per_window < self.from_window {
            return false;
        }
        let mut rng = SplitMix64::new(self.seed, ((self.rank as u64) << 48) ^ id);
        let probability = match self.kind {
            CheatKind::GuessUnaudited => self.guessed_probability(id),
            kind if window_salt(kind).is_none() => self.probability,
            _ => 0.0,
        };
        rng.unit_open0() <= probability
    }

    /// A guesser's chance of cheating on pass `id`: none in a place of the
    /// window validators asked for at least as often as the average, and
    /// in the others as much more than `probability` as makes its overall
    /// rate `probability`.
    fn guessed_probability(&self, id: u64) -> f64 {
        let counts = &self.audits_by_place;
        let mean = counts.iter().sum::<u64>() as f64 / counts.len().max(1) as f64;
        let cold = |c: u64| (c as f64) < mean;
        let cold_places = counts.iter().filter(|&&c| cold(c)).count();
        let place = (id % self.per_window) as usize;
        match counts.get(place) {
            // Nothing to tell the places apart yet: cheat at the rate.
            _ if cold_places == 0 => self.probability,
            Some(&c) if cold(c) => {
                (self.probability * counts.len() as f64 / cold_places as f64).min(1.0)
            }
            _ => 0.0,
        }
    }

    /// For a colluder, the slices of `window`'s all-reduce among `peers`
    /// (in the all-reduce's rank order) that it changes: those it reduces
    /// with at least one other colluder, in the windows the colluders'
    /// shared draw picks. Where they are all the holders their copies
    /// agree; where they are the majority they outvote the honest copies.
    fn colluded_slices(&self, window: u64, peers: &[usize], copies: usize) -> Vec<usize> {
        if !self.strikes(CheatKind::Collude, window) {
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
    fn forged_state(&self, window: u64, honest: &AdamW) -> Option<AdamW> {
        if !self.strikes(CheatKind::ForgeCheckpoint, window) {
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
    fn inflates(&self, window: u64) -> bool {
        self.strikes(CheatKind::ScaleContribution, window)
    }

    /// Whether a once-a-window cheat of `kind` strikes in `window`: it is
    /// this miner's kind and its draw says so.
    fn strikes(&self, kind: CheatKind, window: u64) -> bool {
        self.kind == kind && self.strikes_in(window)
    }

    /// Whether this miner's once-a-window cheat strikes in `window`, by a
    /// draw under its kind's salt. The draw leaves the rank out, so every
    /// miner with that cheat (colluders) agrees.
    fn strikes_in(&self, window: u64) -> bool {
        let Some(salt) = window_salt(self.kind) else {
            return false;
        };
        let mut coin = SplitMix64::new(self.seed, salt ^ window);
        window >= self.from_window && coin.unit_open0() <= self.probability
    }

    /// The first of windows `0..end` it cheats in, as known before the
    /// run: for a once-a-window cheat the first its draw strikes in, for
    /// one drawn pass by pass the first it may cheat in (`from_window`).
    /// `None`: it is honest throughout. `bench trust` counts the windows
    /// to catch a cheater from here, so a cheat that strikes late is not
    /// counted as missed before it struck.
    pub fn first_window(&self, end: u64) -> Option<u64> {
        match window_salt(self.kind) {
            Some(_) => (self.from_window..end).find(|&w| self.strikes_in(w)),
            None => (self.from_window < end).then_some(self.from_window),
        }
    }

    /// What an inflater makes of its contribution: every integer times 8,
    /// as if its gradients were (exactly, since 8 is a power of two).
    fn inflate(contribution: &mut [i64]) {
        for x in contribution {
            *x = x.wrapping_mul(8);
        }
    }

    /// What a colluder makes of a slice it changes, and a forger of its
    /// site's partial or of the slice it hands out: every element doubled
    /// (wrapping: the integers are fixed-point sums), the same bits on
    /// every colluder.
    fn collude(slice: &mut [i64]) {
        for x in slice {
            *x = x.wrapping_mul(2);
        }
    }

    /// The output it sends in place of `honest`.
    fn fake_output(&mut self, id: u64, honest: &Tensor) -> candle_core::Result<Tensor> {
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
    fn fake_grads(&mut self, id: u64, honest: PassGrads) -> candle_core::Result<PassGrads> {
        let previous = self.last_grads.replace(honest.clone());
        if !self.cheats_on(id) {
            return Ok(honest);
        }
        let PassGrads { params, input } = honest;
        Ok(match (self.kind, previous) {
            (CheatKind::RandomGrad | CheatKind::GuessUnaudited, _) => {
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
            (CheatKind::FlipGrad, _) => PassGrads {
                params: params.iter().map(|g| -g).collect(),
                input,
            },
            (CheatKind::ReplayStale, None)
            | (
                CheatKind::FlipSketch
                | CheatKind::Collude
                | CheatKind::ForgeCheckpoint
                | CheatKind::ScaleContribution
                | CheatKind::NudgeContribution
                | CheatKind::ForgePartial
                | CheatKind::ForgeGather
                | CheatKind::ForgeGatherDeniably,
                _,
            ) => PassGrads { params, input },
        })
    }
}

impl Conduct for Cheater {
    fn output(&mut self, id: u64, honest: &Tensor) -> candle_core::Result<Tensor> {
        self.fake_output(id, honest)
    }

    fn grads(&mut self, id: u64, honest: PassGrads) -> candle_core::Result<PassGrads> {
        self.fake_grads(id, honest)
    }

    fn audited(&mut self, ids: &[u64]) {
        for id in ids {
            if let Some(c) = self
                .audits_by_place
                .get_mut((id % self.per_window) as usize)
            {
                *c += 1;
            }
        }
    }

    fn contribution(&self, window: u64, contribution: &mut [i64]) {
        if self.inflates(window) {
            Cheater::inflate(contribution);
        }
        if self.strikes(CheatKind::NudgeContribution, window) && !contribution.is_empty() {
            // Where is drawn apart from whether, and per rank.
            let mut at = SplitMix64::new(self.seed ^ self.rank as u64, NUDGE_SALT ^ !window);
            for _ in 0..NUDGED_ELEMENTS {
                let i = (at.next_u64() % contribution.len() as u64) as usize;
                contribution[i] = contribution[i].wrapping_add(NUDGE);
            }
        }
    }

    fn slice_tamper(
        &self,
        window: u64,
        peers: &[usize],
        copies: usize,
    ) -> Option<Box<SliceTamper<'static, i64>>> {
        let colluded = self.colluded_slices(window, peers, copies);
        (!colluded.is_empty()).then(|| {
            Box::new(move |j: usize, slice: &mut [i64]| {
                if colluded.contains(&j) {
                    Cheater::collude(slice);
                }
            }) as Box<SliceTamper<'static, i64>>
        })
    }

    fn partial_tamper(&self, window: u64) -> Option<Box<PartialTamper<'static, i64>>> {
        self.strikes(CheatKind::ForgePartial, window)
            .then(|| Box::new(Cheater::collude) as Box<PartialTamper<'static, i64>>)
    }

    fn handed_tamper(&self, window: u64, deniably: bool) -> Option<Box<SliceTamper<'static, i64>>> {
        let kind = match deniably {
            false => CheatKind::ForgeGather,
            true => CheatKind::ForgeGatherDeniably,
        };
        self.strikes(kind, window)
            .then(|| Box::new(|_: usize, slice: &mut [i64]| Cheater::collude(slice)) as _)
    }

    fn checkpoint_state(&self, window: u64, honest: &AdamW) -> Option<AdamW> {
        self.forged_state(window, honest)
    }

    fn sketch(&self, id: u64, honest: Vec<u32>) -> Vec<u32> {
        match self.kind == CheatKind::FlipSketch && self.cheats_on(id) {
            true => honest.into_iter().map(|b| b ^ 0x8000_0000).collect(),
            false => honest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn cheater(kind: &str, probability: f64) -> Cheater {
        let text = format!(
            "[job]\nname = \"t\"\ntask = \"train\"\n\n\
             [model]\nn_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 16\n\n\
             [pipeline]\nstages = 2\nmicrobatches_per_window = 4\n\n\
             [[site]]\nname = \"s\"\nhosts = \"localhost\"\nranks_per_host = 6\n\n\
             [[faults.cheat]]\nrank = 2\nkind = \"{kind}\"\nprobability = {probability}\n"
        );
        let spec = crate::config::parse(&text, std::path::Path::new("t.toml")).unwrap();
        Cheater::new(&spec, 2).unwrap()
    }

    #[test]
    fn a_guesser_cheats_only_where_validators_asked_less_at_its_overall_rate() {
        let mut guesser = cheater("guess_unaudited", 0.5);
        // Before any audit it cannot tell places apart.
        let share = |g: &Cheater, places: &[u64]| {
            let ids = (0..4000u64).filter(|id| places.contains(&(id % 4)));
            let n = ids.clone().count() as f64;
            ids.filter(|&id| g.cheats_on(id)).count() as f64 / n
        };
        assert!((share(&guesser, &[0, 1, 2, 3]) - 0.5).abs() < 0.05);
        // Places 0 and 1 were asked for, 2 and 3 never: it cheats there
        // only, twice as often, and so as often as before overall.
        guesser.audited(&[0, 4, 9]);
        assert_eq!(share(&guesser, &[0, 1]), 0.0);
        assert_eq!(share(&guesser, &[2, 3]), 1.0);
        assert!((share(&guesser, &[0, 1, 2, 3]) - 0.5).abs() < 0.05);
    }

    #[test]
    fn a_nudger_moves_a_few_elements_anywhere_in_the_windows_it_strikes() {
        let honest = vec![5i64; 100_000];
        let nudger = cheater("nudge_contribution", 1.0);
        let mut places = BTreeSet::new();
        for window in 0..4 {
            let mut sent = honest.clone();
            nudger.contribution(window, &mut sent);
            let moved: Vec<usize> = (0..sent.len()).filter(|&i| sent[i] != honest[i]).collect();
            assert!(
                !moved.is_empty() && moved.len() <= NUDGED_ELEMENTS,
                "{moved:?}"
            );
            assert!(moved.iter().all(|&i| sent[i] - honest[i] >= NUDGE));
            places.extend(moved);
        }
        assert!(places.len() > NUDGED_ELEMENTS, "new places each window");
        // Its passes stay honest, and at probability 0 it never strikes.
        assert!(!nudger.cheats_on(7));
        let mut sent = honest.clone();
        cheater("nudge_contribution", 0.0).contribution(0, &mut sent);
        assert_eq!(sent, honest);
    }

    #[test]
    fn the_first_cheating_window_is_the_first_a_once_a_window_cheat_changes_anything_in() {
        let honest = vec![5i64; 1000];
        let changed = |c: &Cheater, window: u64| {
            let mut sent = honest.clone();
            c.contribution(window, &mut sent);
            sent != honest
        };
        for kind in ["nudge_contribution", "scale_contribution"] {
            let c = cheater(kind, 0.3);
            let first = c.first_window(40).expect("0.3 a window strikes within 40");
            // The test job's draws strike after window 0, so that the
            // windows before are checked too.
            assert!(first > 0, "{kind} struck at once");
            assert!(changed(&c, first), "{kind} strikes in {first}");
            assert!((0..first).all(|w| !changed(&c, w)), "{kind} before {first}");
            assert_eq!(c.first_window(first), None, "none before {first}");
        }
        assert_eq!(cheater("nudge_contribution", 0.0).first_window(40), None);
        // A cheat drawn pass by pass may cheat from its first window.
        assert_eq!(cheater("random_grad", 0.1).first_window(40), Some(0));
    }
}
