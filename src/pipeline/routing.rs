//! SWARM's stochastic wiring: which miner of each stage serves a
//! microbatch, how the miners are spread over stages, and what happens to
//! the work of a miner that disappears.
//!
//! - [`Router::route_batch`] picks one miner per stage at random with probability
//!   proportional to its measured throughput, so a fast miner gets more
//!   work and a slow one still gets some (and keeps being measured); a
//!   difference within the noise of the measurements is no difference.
//! - [`Router::rebalance`] moves one miner from the stage with the most
//!   spare capacity to the bottleneck stage, between windows, when that
//!   raises the pipeline's throughput (the slowest stage's capacity).
//! - [`InFlight`] remembers which microbatch runs on which miners, so a lost
//!   miner's microbatches are queued again exactly once and none is counted
//!   twice.
//!
//! Everything is plain data and deterministic for a seed: the orchestrator
//! decides, and a replay of its decisions gives the same paths.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::data::rng::SplitMix64;

/// Throughput of a miner not yet measured on its stage when no miner of
/// that stage is: at start all are equal, so any value favours nobody.
const UNMEASURED: f64 = 1.0;
/// A move must raise the slowest stage's capacity by more than this
/// factor: smaller gains are within the noise of measured throughput, and
/// chasing them would move miners back and forth. A gain of exactly this
/// factor (as moving a third miner to a stage of two gives when every
/// miner is timed alike) does not move anyone, whatever the rounding.
const REBALANCE_GAIN: f64 = 1.5 * (1.0 + 1e-9);
/// Miners a donor stage keeps: a move never leaves a stage one failure
/// away from stopping the job.
const MIN_STAGE_MINERS: usize = 2;
/// Measurements every miner needs (since joining or moving) before any
/// move: one slow microbatch on a busy host is not a slow miner.
const REBALANCE_SAMPLES: u32 = 8;
/// Weight of a new measurement in the moving average.
const EMA: f64 = 0.3;
/// Standard errors of its moving average by which a miner's throughput
/// must stand off its stage's mean before routing follows it (see
/// [`StageView::route_weight`]).
const ROUTE_NOISE_SIGMAS: f64 = 2.0;

/// One miner as the router sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Miner {
    pub stage: usize,
    /// Microbatches per second, moving average; `None` until measured.
    pub throughput: Option<f64>,
    /// Measurements since it joined or last moved.
    #[serde(default)]
    pub samples: u32,
    /// Moving variance of its measured rates, beside `throughput` (with
    /// the same weight): how far one measurement strays from the average.
    #[serde(default)]
    pub rate_variance: f64,
}

impl Miner {
    /// A miner of `stage` whose speed there is not measured yet.
    fn unmeasured(stage: usize) -> Miner {
        Miner {
            stage,
            throughput: None,
            samples: 0,
            rate_variance: 0.0,
        }
    }
}

/// A miner moved between stages by [`Router::rebalance`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub rank: usize,
    pub from: usize,
    pub to: usize,
}

/// Miners per stage and their measured throughput.
#[derive(Debug, Clone)]
pub struct Router {
    stages: usize,
    miners: BTreeMap<usize, Miner>,
    rng: SplitMix64,
}

/// A [`Router`] as plain data, for checkpoints: the router that
/// [`Router::from_state`] rebuilds from it makes exactly the decisions the
/// original would have made, so a resumed run routes as an uninterrupted one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterState {
    pub stages: usize,
    /// Live miners by rank.
    pub miners: BTreeMap<usize, Miner>,
    /// The routing generator's position ([`SplitMix64::state`]).
    pub rng: u64,
}

impl Router {
    /// `assignment` is (rank, stage) for every miner.
    pub fn new(stages: usize, assignment: &[(usize, usize)], seed: u64) -> Router {
        Router {
            stages,
            miners: assignment
                .iter()
                .map(|&(rank, stage)| (rank, Miner::unmeasured(stage)))
                .collect(),
            rng: SplitMix64::new(seed, 0x524f_5554_4552),
        }
    }

    pub fn state(&self) -> RouterState {
        RouterState {
            stages: self.stages,
            miners: self.miners.clone(),
            rng: self.rng.state(),
        }
    }

    pub fn from_state(state: RouterState) -> Router {
        Router {
            stages: state.stages,
            miners: state.miners,
            rng: SplitMix64::from_state(state.rng),
        }
    }

    /// Miners serving `stage`, by rank.
    pub fn stage_miners(&self, stage: usize) -> Vec<usize> {
        self.miners
            .iter()
            .filter(|(_, m)| m.stage == stage)
            .map(|(r, _)| *r)
            .collect()
    }

    /// The stage `rank` serves, if it is a live miner.
    pub fn stage_of(&self, rank: usize) -> Option<usize> {
        self.miners.get(&rank).map(|m| m.stage)
    }

    /// Each stage's miner count, measured mean and capacity, from two
    /// passes over the miners (not one pass per miner: a swarm has
    /// thousands).
    fn view(&self) -> StageView {
        let n = self.stages;
        let (mut sums, mut measured, mut counts) = (vec![0.0; n], vec![0usize; n], vec![0; n]);
        for m in self.miners.values().filter(|m| m.stage < n) {
            counts[m.stage] += 1;
            if let Some(t) = m.throughput {
                sums[m.stage] += t;
                measured[m.stage] += 1;
            }
        }
        let means: Vec<f64> = sums
            .iter()
            .zip(&measured)
            .map(|(sum, &k)| if k == 0 { UNMEASURED } else { sum / k as f64 })
            .collect();
        let mut capacity = vec![0.0; n];
        for m in self.miners.values().filter(|m| m.stage < n) {
            capacity[m.stage] += m.throughput.unwrap_or(means[m.stage]);
        }
        StageView {
            means,
            capacity,
            counts,
        }
    }

    /// The miners of each stage with their throughput, by rank.
    fn candidates(&self) -> Vec<Vec<(usize, f64)>> {
        let view = self.view();
        let mut by_stage = vec![Vec::new(); self.stages];
        for (&rank, m) in self.miners.iter().filter(|(_, m)| m.stage < self.stages) {
            by_stage[m.stage].push((rank, view.route_weight(m)));
        }
        by_stage
    }

    /// Paths for `n` microbatches that run together (one window): stage by
    /// stage, each goes to the miner that would finish it first given what
    /// it already holds, `(held + 1) / throughput`, ties drawn at random.
    /// Over many microbatches each miner's share is its share of the
    /// stage's throughput (SWARM's wiring), and unlike independent random
    /// draws a small window is never piled onto one miner by chance.
    /// `None` when some stage has no miner left.
    pub fn route_batch(&mut self, n: usize) -> Option<Vec<Vec<usize>>> {
        let mut paths = vec![Vec::with_capacity(self.stages); n];
        for candidates in self.candidates() {
            if candidates.is_empty() {
                return None;
            }
            let mut held = vec![0usize; candidates.len()];
            for path in &mut paths {
                let start = self.rng.below(candidates.len() as u64) as usize;
                let finish = |k: usize| (held[k] + 1) as f64 / candidates[k].1;
                let mut best = start;
                for k in (0..candidates.len()).map(|i| (start + i) % candidates.len()) {
                    if finish(k) < finish(best) {
                        best = k;
                    }
                }
                held[best] += 1;
                path.push(candidates[best].0);
            }
        }
        Some(paths)
    }

    /// Records that `rank` took `seconds` for one microbatch.
    pub fn observe(&mut self, rank: usize, seconds: f64) {
        let Some(m) = self.miners.get_mut(&rank) else {
            return;
        };
        if !(seconds > 0.0 && seconds.is_finite()) {
            return;
        }
        let rate = 1.0 / seconds;
        m.samples = m.samples.saturating_add(1);
        m.throughput = Some(match m.throughput {
            Some(old) => {
                let off = rate - old;
                m.rate_variance = (1.0 - EMA) * (m.rate_variance + EMA * off * off);
                (1.0 - EMA) * old + EMA * rate
            }
            None => rate,
        });
    }

    /// Adds a miner of `stage` unless `rank` is known (as when a run resumes
    /// with every miner back, some of which had left before the checkpoint).
    pub fn join(&mut self, rank: usize, stage: usize) {
        self.miners
            .entry(rank)
            .or_insert_with(|| Miner::unmeasured(stage));
    }

    /// Puts `rank` on `stage` (a newcomer, or a miner that moves), its
    /// speed there unmeasured.
    pub fn place(&mut self, rank: usize, stage: usize) {
        self.miners.insert(rank, Miner::unmeasured(stage));
    }

    /// The stage of `allowed` (empty: any) a new miner of unknown speed
    /// raises the pipeline's pace (its slowest stage's capacity) most on,
    /// counting it at the mean rate of that stage's miners; ties go to the
    /// lower stage.
    pub fn stage_for_newcomer(&self, allowed: &[usize]) -> usize {
        let view = self.view();
        let caps = &view.capacity;
        let pace_with = |s: usize| {
            let miners = view.counts[s];
            let rate = if miners == 0 {
                UNMEASURED
            } else {
                caps[s] / miners as f64
            };
            (0..self.stages)
                .map(|t| if t == s { caps[t] + rate } else { caps[t] })
                .fold(f64::INFINITY, f64::min)
        };
        (0..self.stages)
            .rev()
            .filter(|s| allowed.is_empty() || allowed.contains(s))
            .max_by(|&a, &b| pace_with(a).total_cmp(&pace_with(b)))
            .unwrap_or(0)
    }

    /// (rank, stage) of every miner.
    pub fn assignment(&self) -> Vec<(usize, usize)> {
        self.miners.iter().map(|(r, m)| (*r, m.stage)).collect()
    }

    /// Forgets a miner that left; returns whether it was one.
    pub fn remove(&mut self, rank: usize) -> bool {
        self.miners.remove(&rank).is_some()
    }

    /// Microbatches per second stage `stage` can take (sum of its miners).
    pub fn capacity(&self, stage: usize) -> f64 {
        self.view().capacity.get(stage).copied().unwrap_or(0.0)
    }

    /// Moves one miner to the bottleneck stage if that raises the slowest
    /// stage's capacity by more than half (`REBALANCE_GAIN`); the donor
    /// keeps at least two miners (`MIN_STAGE_MINERS`).
    pub fn rebalance(&mut self) -> Option<Move> {
        if self.miners.values().any(|m| m.samples < REBALANCE_SAMPLES) {
            return None;
        }
        let view = self.view();
        let caps = &view.capacity;
        let bottleneck = (0..self.stages).min_by(|&a, &b| caps[a].total_cmp(&caps[b]))?;
        let before = caps[bottleneck];
        let mut best: Option<(Move, f64)> = None;
        for (&rank, m) in self.miners.iter().filter(|(_, m)| m.stage < self.stages) {
            if m.stage == bottleneck || view.counts[m.stage] <= MIN_STAGE_MINERS {
                continue;
            }
            let w = view.weight(m);
            let mut after = caps.clone();
            after[m.stage] -= w;
            after[bottleneck] += view.rate_on(m, w, bottleneck);
            let slowest = after.iter().cloned().fold(f64::INFINITY, f64::min);
            if slowest > before * REBALANCE_GAIN && best.as_ref().is_none_or(|(_, s)| slowest > *s)
            {
                best = Some((
                    Move {
                        rank,
                        from: m.stage,
                        to: bottleneck,
                    },
                    slowest,
                ));
            }
        }
        let (mv, _) = best?;
        if let Some(m) = self.miners.get_mut(&mv.rank) {
            // Its speed on the new stage is unknown.
            *m = Miner::unmeasured(mv.to);
        }
        Some(mv)
    }
}

/// What the router knows of each stage at one moment.
struct StageView {
    /// Mean throughput of each stage's measured miners.
    means: Vec<f64>,
    /// Sum of each stage's miners' throughput.
    capacity: Vec<f64>,
    counts: Vec<usize>,
}

impl StageView {
    /// A miner's throughput; one not yet measured on its stage (new, or
    /// just moved) counts as the mean of its stage's measured miners, so
    /// it gets work and is measured instead of being starved.
    fn weight(&self, m: &Miner) -> f64 {
        m.throughput.unwrap_or(self.means[m.stage])
    }

    /// A miner's weight in routing: its [`weight`](StageView::weight)
    /// where that stands off its stage's mean by more than
    /// [`ROUTE_NOISE_SIGMAS`] standard errors of its moving average, else
    /// the mean. Why: on a host whose miners share cores, one pass's time
    /// says as much about who else ran as about the miner, and routing by
    /// the raw averages split 19 of a 60-window quickstart's windows 5 to
    /// 3 between two miners of the same speed, so the stage waited on
    /// one miner's fifth pass while the other idled (`BENCHMARKS.md`).
    /// Measurements that agree (a `[[faults.slow]]` factor, a model clock,
    /// a slower machine over its passes) keep the split they show.
    fn route_weight(&self, m: &Miner) -> f64 {
        let (own, mean) = (self.weight(m), self.means[m.stage]);
        // The standard error of an exponential moving average of weight
        // `EMA` over samples of this variance.
        let noise = (m.rate_variance * EMA / (2.0 - EMA)).sqrt();
        match (own - mean).abs() > ROUTE_NOISE_SIGMAS * noise {
            true => own,
            false => mean,
        }
    }

    /// The microbatches per second miner `m` (`w` on its own stage) would
    /// serve on `stage`: that stage's mean pace, scaled by how `m` compares
    /// with its own stage's miners. A pass's time is mostly its stage's
    /// work (a stage of three blocks is three times slower for everyone),
    /// so a miner's rate on one stage says little of its rate on another;
    /// how much faster than its peers it is carries over.
    fn rate_on(&self, m: &Miner, w: f64, stage: usize) -> f64 {
        let mean = |s: usize| {
            let miners = self.counts[s];
            (miners > 0).then(|| self.capacity[s] / miners as f64)
        };
        match (mean(m.stage), mean(stage)) {
            (Some(own), Some(there)) if own > 0.0 => w / own * there,
            _ => w,
        }
    }
}

/// Which microbatches of a window are waiting, running or done, and on
/// which miners.
///
/// A done microbatch is not safe yet: its gradients live on the miners of
/// its path until the window closes, so losing one of them sends it back
/// to the queue like a running one.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    queue: VecDeque<u64>,
    running: BTreeMap<u64, Vec<usize>>,
    done: BTreeMap<u64, Vec<usize>>,
}

impl InFlight {
    /// A window's microbatch ids, all waiting.
    pub fn new(ids: impl IntoIterator<Item = u64>) -> InFlight {
        InFlight {
            queue: ids.into_iter().collect(),
            ..InFlight::default()
        }
    }

    /// The next waiting microbatch, now running on `path`.
    pub fn start(&mut self, path: Vec<usize>) -> Option<u64> {
        let id = self.queue.pop_front()?;
        self.running.insert(id, path);
        Some(id)
    }

    /// Marks `id` finished; `false` if it was not running (a late or
    /// duplicate report, which must not count twice).
    pub fn finish(&mut self, id: u64) -> bool {
        match self.running.remove(&id) {
            Some(path) => self.done.insert(id, path).is_none(),
            None => false,
        }
    }

    /// A miner left: every running or done microbatch whose path uses it is
    /// queued again, at the front in ascending id so the window still ends
    /// soon. Returns them.
    pub fn lose(&mut self, rank: usize) -> Vec<u64> {
        let mut lost: Vec<u64> = self
            .running
            .iter()
            .chain(&self.done)
            .filter(|(_, path)| path.contains(&rank))
            .map(|(id, _)| *id)
            .collect();
        lost.sort_unstable();
        for id in &lost {
            self.running.remove(id);
            self.done.remove(id);
        }
        self.requeue(&lost);
        lost
    }

    /// Every running microbatch goes back to the queue (its attempt was
    /// abandoned); done ones stay done.
    pub fn abandon_running(&mut self) {
        let ids: Vec<u64> = std::mem::take(&mut self.running).into_keys().collect();
        self.requeue(&ids);
    }

    fn requeue(&mut self, ascending: &[u64]) {
        for id in ascending.iter().rev() {
            self.queue.push_front(*id);
        }
        self.queue.make_contiguous().sort_unstable();
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn is_complete(&self) -> bool {
        self.queue.is_empty() && self.running.is_empty()
    }

    /// Finished microbatches and their paths, in id order.
    pub fn done(&self) -> impl Iterator<Item = (u64, &[usize])> + '_ {
        self.done.iter().map(|(id, path)| (*id, path.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_stages() -> Router {
        Router::new(2, &[(1, 0), (2, 0), (3, 1), (4, 1)], 7)
    }

    #[test]
    fn routes_take_one_miner_per_stage_in_proportion_to_throughput() {
        let mut r = two_stages();
        r.observe(1, 0.1); // 10 microbatches/s
        r.observe(2, 0.4); // 2.5 microbatches/s
        let mut on_fast = 0;
        for path in r.route_batch(4000).unwrap() {
            assert_eq!(path.len(), 2);
            assert!([1, 2].contains(&path[0]) && [3, 4].contains(&path[1]));
            on_fast += usize::from(path[0] == 1);
        }
        // Expected share 10 / 12.5 = 0.8.
        let share = on_fast as f64 / 4000.0;
        assert!((share - 0.8).abs() < 0.01, "fast miner's share {share}");
    }

    #[test]
    fn a_window_is_spread_over_miners_in_proportion_to_throughput() {
        let mut r = two_stages();
        let even = r.route_batch(4).unwrap();
        for (stage, miners) in [(0, [1, 2]), (1, [3, 4])] {
            for m in miners {
                assert_eq!(even.iter().filter(|p| p[stage] == m).count(), 2, "{even:?}");
            }
        }
        r.observe(1, 0.1); // 10 microbatches/s
        r.observe(2, 0.4); // 2.5 microbatches/s
        let weighted = r.route_batch(10).unwrap();
        assert_eq!(
            weighted.iter().filter(|p| p[0] == 1).count(),
            8,
            "{weighted:?}"
        );
        r.remove(3);
        r.remove(4);
        assert_eq!(r.route_batch(1), None);
    }

    #[test]
    fn miners_of_one_speed_whose_passes_scatter_split_a_window_evenly() {
        let mut r = two_stages();
        // Both take 0.1 s a pass on average, each pass 0.07-0.13 s as the
        // host's other work comes and goes; miner 1's last passes were
        // quick and miner 2's slow, so their averages stand 29% apart,
        // which split 8 microbatches 5 to 3.
        let quick_last = [0.13, 0.07, 0.12, 0.08, 0.11, 0.07, 0.07];
        let slow_last = [0.07, 0.13, 0.08, 0.12, 0.09, 0.13, 0.13];
        for (quick, slow) in quick_last.iter().zip(&slow_last) {
            r.observe(1, *quick);
            r.observe(2, *slow);
        }
        let on_1 = |r: &mut Router, n| {
            r.route_batch(n)
                .unwrap()
                .iter()
                .filter(|p| p[0] == 1)
                .count()
        };
        assert_eq!(on_1(&mut r, 8), 4);
        // Miner 2 twice as slow over the same scatter: that shows, and
        // the window follows it.
        for (quick, slow) in quick_last.iter().zip(&slow_last) {
            r.observe(1, *quick);
            r.observe(2, 2.0 * slow);
        }
        assert_eq!(on_1(&mut r, 9), 7);
    }

    #[test]
    fn the_same_seed_routes_the_same_way() {
        let (mut a, mut b) = (two_stages(), two_stages());
        let pa: Vec<_> = (0..50).map(|_| a.route_batch(3)).collect();
        let pb: Vec<_> = (0..50).map(|_| b.route_batch(3)).collect();
        assert_eq!(pa, pb);
    }

    #[test]
    fn a_router_restored_from_its_saved_state_routes_and_rebalances_as_the_original() {
        let mut a = two_stages();
        a.observe(1, 0.1);
        a.observe(3, 0.37);
        a.observe(3, 0.11);
        let first: Vec<_> = (0..50).map(|_| a.route_batch(3)).collect();
        assert!(first.iter().all(Option::is_some));
        // Through JSON, as a checkpoint's manifest stores it.
        let json = serde_json::to_string(&a.state()).unwrap();
        let mut b = Router::from_state(serde_json::from_str(&json).unwrap());
        assert_eq!(b.state(), a.state());
        let pa: Vec<_> = (0..50).map(|_| a.route_batch(3)).collect();
        let pb: Vec<_> = (0..50).map(|_| b.route_batch(3)).collect();
        assert_eq!(pa, pb);
        assert_eq!(a.rebalance(), b.rebalance());
    }

    #[test]
    fn a_removed_miner_is_never_routed_to_and_an_empty_stage_stops_routing() {
        let mut r = two_stages();
        assert!(r.remove(3));
        assert!(r.route_batch(200).unwrap().iter().all(|p| p[1] == 4));
        r.remove(4);
        assert_eq!(r.route_batch(1), None);
    }

    /// Enough measurements of `rank` for rebalancing to trust them.
    fn measure(r: &mut Router, rank: usize, seconds: f64) {
        for _ in 0..REBALANCE_SAMPLES {
            r.observe(rank, seconds);
        }
    }

    #[test]
    fn rebalance_moves_a_miner_from_the_over_served_stage_to_the_bottleneck() {
        let mut r = Router::new(2, &[(1, 0), (2, 0), (3, 0), (4, 1)], 1);
        for rank in 1..=3 {
            measure(&mut r, rank, 0.1);
        }
        r.observe(4, 0.1);
        assert_eq!(r.rebalance(), None, "miner 4 is measured once only");
        measure(&mut r, 4, 0.1);
        let mv = r.rebalance().unwrap();
        assert_eq!((mv.from, mv.to), (0, 1));
        assert_eq!(r.stage_miners(1).len(), 2);
        assert_eq!(r.stage_miners(0).len(), 2);
        assert_eq!(
            r.rebalance(),
            None,
            "the mover is not measured on stage 1 yet"
        );
        // Balanced now: moving another would not raise the minimum.
        measure(&mut r, mv.rank, 0.1);
        assert_eq!(r.rebalance(), None);
    }

    #[test]
    fn rebalance_ignores_gains_within_measurement_noise() {
        // Stage 1 is 10% slower per miner: moving one of stage 0's three
        // miners would lift the minimum from 2 x 9 to min(2 x 10, 3 x 9),
        // about 11%, which is not worth a move. Nor is a 2 + 2 job's
        // noise: one stage would be left with a single miner.
        let mut r = Router::new(2, &[(1, 0), (2, 0), (3, 0), (4, 1), (5, 1)], 1);
        for rank in 1..=3 {
            measure(&mut r, rank, 1.0 / 10.0);
        }
        for rank in 4..=5 {
            measure(&mut r, rank, 1.0 / 9.0);
        }
        assert_eq!(r.rebalance(), None);
    }

    #[test]
    fn a_gain_of_exactly_the_threshold_moves_nobody() {
        // Three miners on stage 0, two on the three-times-slower stage 1:
        // a third miner there lifts the minimum from 2/3 to 1, 1.5x.
        let mut r = Router::new(2, &[(1, 0), (2, 0), (3, 0), (4, 1), (5, 1)], 1);
        for rank in 1..=3 {
            measure(&mut r, rank, 0.1);
        }
        for rank in 4..=5 {
            measure(&mut r, rank, 0.3);
        }
        assert_eq!(r.rebalance(), None);
        // One of stage 1's miners gone: a move doubles its capacity.
        r.remove(5);
        let mv = r.rebalance().unwrap();
        assert_eq!((mv.from, mv.to), (0, 1));
    }

    #[test]
    fn a_newcomer_goes_where_it_raises_the_pace_most() {
        // Stage 1 is three times slower per miner: 2 x 10 against 2 x 3.3.
        let mut r = two_stages();
        for rank in [1, 2] {
            r.observe(rank, 0.1);
        }
        for rank in [3, 4] {
            r.observe(rank, 0.3);
        }
        assert_eq!(r.stage_for_newcomer(&[]), 1);
        // Unless its site serves stage 0 only.
        assert_eq!(r.stage_for_newcomer(&[0]), 0);
        // Alike stages: the lower one.
        let even = two_stages();
        assert_eq!(even.stage_for_newcomer(&[]), 0);
        // An empty stage always gets it.
        let mut empty = two_stages();
        empty.remove(1);
        empty.remove(2);
        assert_eq!(empty.stage_for_newcomer(&[]), 0);
        r.place(9, 1);
        assert_eq!(r.stage_of(9), Some(1));
        assert_eq!(r.stage_miners(1), vec![3, 4, 9]);
    }

    #[test]
    fn rebalance_never_leaves_a_stage_with_one_miner() {
        // Stage 1 is 100x slower, but stage 0 has only two miners to give.
        let mut r = Router::new(2, &[(1, 0), (2, 0), (3, 1)], 1);
        measure(&mut r, 1, 0.01);
        measure(&mut r, 2, 0.01);
        measure(&mut r, 3, 1.0);
        assert_eq!(r.rebalance(), None);
    }

    #[test]
    fn a_lost_miners_microbatches_are_queued_again_once_and_never_counted_twice() {
        let mut f = InFlight::new(0..5);
        assert_eq!(f.start(vec![1, 3]), Some(0));
        assert_eq!(f.start(vec![2, 3]), Some(1));
        assert_eq!(f.start(vec![2, 4]), Some(2));
        assert!(f.finish(1));
        // Both the running 2 and the done 1 used miner 2.
        assert_eq!(f.lose(2), vec![1, 2]);
        assert!(!f.finish(2), "a report from the lost miner does not count");
        assert_eq!(f.lose(2), Vec::<u64>::new());
        // Re-queued first, in id order, then the untouched ones.
        assert_eq!(f.start(vec![1, 4]), Some(1));
        assert_eq!(f.start(vec![1, 4]), Some(2));
        assert_eq!(f.start(vec![1, 4]), Some(3));
        assert!(f.finish(0) && f.finish(1) && f.finish(2) && f.finish(3));
        assert!(!f.finish(3));
        assert!(!f.is_complete(), "4 is still waiting");
        assert_eq!(f.start(vec![1, 3]), Some(4));
        assert!(f.finish(4));
        assert!(f.is_complete());
        let done: Vec<(u64, Vec<usize>)> = f.done().map(|(i, p)| (i, p.to_vec())).collect();
        assert_eq!(done[0], (0, vec![1, 3]));
        assert_eq!(done[1], (1, vec![1, 4]));
        assert_eq!(done.len(), 5);
    }

    #[test]
    fn an_abandoned_attempt_queues_its_running_microbatches_and_keeps_the_done_ones() {
        let mut f = InFlight::new(0..3);
        f.start(vec![1]);
        f.start(vec![1]);
        f.start(vec![2]);
        assert!(f.finish(1));
        f.abandon_running();
        assert_eq!(f.running(), 0);
        assert_eq!(f.start(vec![2]), Some(0));
        assert_eq!(f.start(vec![2]), Some(2));
        assert_eq!(f.done().map(|(i, _)| i).collect::<Vec<_>>(), vec![1]);
    }
}
