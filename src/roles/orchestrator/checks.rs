//! What validators check, as the orchestrator asks for it and judges it:
//! replays of sampled passes (and of both ends of any broken chain of
//! receipts), recomputations of all-reduce slices, the proofs of slices
//! handed out wrong, and the audit of each checkpoint file. Everything
//! here decides; the caller's shell sends.

use std::collections::{BTreeMap, BTreeSet};

use super::machine::{Closed, Coordinator, Happened, Output, Phase, Stepping, WindowState};
use super::suspicion;
use crate::checkpoint::{Manifest, StageEntry};
use crate::collective::{scales_for, slice_holders};
use crate::data::rng::SplitMix64;
use crate::ledger::Tally;
use crate::roles::protocol::{
    self, AuditTask, CheckpointTask, CreditedPass, Order, Reduction, Report, SitePart, SliceTask,
    StatedSketch, Verdict,
};
use crate::roles::train::{Setup, TrainError};

/// Reports owed by validators, one per task, counted per validator.
#[derive(Debug, Default)]
struct Owed(BTreeMap<usize, usize>);

impl Owed {
    fn of(validators: impl Iterator<Item = usize>) -> Owed {
        let mut owed = BTreeMap::new();
        for v in validators {
            *owed.entry(v).or_default() += 1;
        }
        Owed(owed)
    }

    /// Takes one report from `v` if it owes one.
    fn take(&mut self, v: usize) -> bool {
        match self.0.get_mut(&v) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    fn is_done(&self) -> bool {
        self.0.values().all(|n| *n == 0)
    }
}

/// Validators' answers to one attempt's tasks, as they come in.
#[derive(Debug)]
pub(super) struct Replies<V> {
    window: u64,
    attempt: u32,
    owed: Owed,
    verdicts: Vec<V>,
}

impl<V> Replies<V> {
    fn new(window: u64, attempt: u32, validators: impl Iterator<Item = usize>) -> Replies<V> {
        Replies {
            window,
            attempt,
            owed: Owed::of(validators),
            verdicts: Vec::new(),
        }
    }

    /// Keeps `verdict` from `from` if it answers this attempt and `from`
    /// owed an answer; counts its replay time in `w`.
    fn accept(
        &mut self,
        from: usize,
        (window, attempt): (u64, u32),
        verdict: V,
        replay_s: f64,
        w: &mut WindowState,
    ) {
        if (window, attempt) == (self.window, self.attempt) && self.owed.take(from) {
            w.replay_s += replay_s;
            self.verdicts.push(verdict);
        }
    }

    pub fn owes_nothing(&self) -> bool {
        self.owed.is_done()
    }

    /// The window and attempt answered.
    fn of(&self) -> (u64, u32) {
        (self.window, self.attempt)
    }
}

/// Replays in flight, and the chain breaks they decide.
#[derive(Debug)]
pub(super) struct PassAudit {
    pub replies: Replies<(AuditTask, Verdict)>,
    /// (pass that sent, pass that received) for each break in a chain.
    breaks: Vec<((u64, usize), (u64, usize))>,
}

impl PassAudit {
    /// The replays of `a` and `b` as one audit; of two attempts, the
    /// later's alone (an abandoned attempt's answers are moot).
    fn merged(a: Option<PassAudit>, b: Option<PassAudit>) -> Option<PassAudit> {
        match (a, b) {
            (Some(mut a), Some(b)) if a.replies.of() == b.replies.of() => {
                for (v, n) in b.replies.owed.0 {
                    *a.replies.owed.0.entry(v).or_default() += n;
                }
                a.replies.verdicts.extend(b.replies.verdicts);
                a.breaks.extend(b.breaks);
                Some(a)
            }
            (a, None) => a,
            (_, b) => b,
        }
    }

    pub fn take(&mut self, from: usize, report: Report, w: &mut WindowState) {
        if let Report::Audited {
            window,
            attempt,
            task,
            verdict,
            replay_s,
        } = report
        {
            let answer = (*task, verdict);
            self.replies
                .accept(from, (window, attempt), answer, replay_s, w);
        }
    }
}

/// Slice recomputations in flight.
#[derive(Debug)]
pub(super) struct SliceAudit {
    pub replies: Replies<(SliceTask, Vec<(usize, Verdict)>)>,
    /// Stages whose copies of a slice disagreed.
    disagreed: Vec<usize>,
    tasks: u64,
}

impl SliceAudit {
    pub fn take(&mut self, from: usize, report: Report, w: &mut WindowState) {
        if let Report::Recomputed {
            window,
            attempt,
            task,
            verdicts,
            replay_s,
        } = report
        {
            let answer = (*task, verdicts);
            self.replies
                .accept(from, (window, attempt), answer, replay_s, w);
        }
    }
}

impl Coordinator<'_> {
    /// A training microbatch is done: each of its passes is drawn for
    /// replay now, on its own (with about `replay_rate`: [`draw_chance`]),
    /// so that validators replay beside the window's other microbatches
    /// instead of at its close, where every miner waits for them (on the
    /// quickstart the miners spent 5-6% of their time waiting there, half
    /// that since). Drawn one by one, a
    /// miner that sees a pass of its own audited mid-window learns nothing
    /// of its other passes' chances. A draw that lands on a miner owing
    /// draws (a suspect was replayed in the place of one) pays one off
    /// instead. Each pass is in one draw: a redo (after a miner was caught
    /// or lost) draws the passes new to it, not again those an earlier
    /// attempt left undrawn.
    pub(super) fn draw_done(&mut self, id: u64) {
        if self.validators.is_empty() {
            return;
        }
        let rate = self.spec.roles.replay_rate;
        let w = self.window.as_mut().expect("a window runs");
        let mut picked = BTreeSet::new();
        for stage in 0..self.setup.stages {
            let Some(&(miner, _)) = w.receipts.get(&(id, stage)) else {
                continue;
            };
            let routed = w.routed.get(&miner).copied().unwrap_or(0);
            let chance = draw_chance(rate, routed);
            if !w.pooled.insert((id, stage, miner)) || self.draws.unit_open0() > chance {
                continue;
            }
            match self.owed_draws.get_mut(&miner) {
                Some(owed) if *owed > 0 => {
                    *owed -= 1;
                    *w.paid.entry(miner).or_default() += 1;
                }
                _ => {
                    picked.insert((id, stage));
                }
            }
        }
        if picked.is_empty() {
            return;
        }
        let attempt = w.attempt;
        w.drawn_early
            .extend(picked.iter().map(|&pass| (pass, attempt)));
        let drawn = self.send_replays(&picked, Vec::new(), None);
        let w = self.window.as_mut().expect("a window runs");
        w.early = PassAudit::merged(w.early.take(), drawn);
    }

    /// At the end of serving, beside the replays drawn as microbatches
    /// finished ([`Coordinator::draw_done`]), has validators replay the
    /// passes whose stated gradient maxima stand out (see [`suspicion`];
    /// up to `suspect_replays`; a suspect stands in for a draw the rate's
    /// floor still asks for, and past that is owed, so that suspects cost
    /// about no more than the uniform draw: [`draws_at_close`]), the
    /// draws the floor asks for, those drawn in an attempt abandoned
    /// before its close, and every pass
    /// whose receipts do not chain with its neighbours' (what one stated
    /// it sent, the other that it received). The close starts at once,
    /// beside the replays: they take a validator's core, it takes the
    /// miners', and a caught miner, rare, costs one close thrown away
    /// (its window is redone without it, as before).
    ///
    /// A suspect takes a drawn pass's place without weakening the draw: a
    /// miner cannot make an honest pass a suspect (replays check the
    /// maxima it stated), and one made a suspect by cheating is caught.
    pub(super) fn begin_audit(&mut self) -> Result<(), TrainError> {
        if self.validators.is_empty() {
            return self.begin_close(None);
        }
        let w = self.window.as_mut().expect("a window runs");
        w.suspected.clear();
        let mut breaks = Vec::new();
        for (id, path) in w.trained() {
            for stage in 1..path.len() {
                let (Some((_, up)), Some((_, down))) = (
                    w.receipts.get(&(id, stage - 1)),
                    w.receipts.get(&(id, stage)),
                ) else {
                    continue;
                };
                if down.input.as_ref() != Some(&up.output) {
                    breaks.push(((id, stage - 1), (id, stage)));
                }
                if up.grad_in != down.grad_out {
                    breaks.push(((id, stage), (id, stage - 1)));
                }
            }
        }
        let mut unchecked = unchecked(w);
        for passes in unchecked.values_mut() {
            passes.retain(|pass| !w.drawn_early.contains_key(pass));
        }
        let mut picked = self.suspects(&unchecked, false);
        let w = self.window.as_mut().expect("a window runs");
        // Each miner's passes in a draw this window, and its draws (those
        // that paid off a debt too), counted once for all miners.
        let mut draws: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        for &(_, _, miner) in &w.pooled {
            draws.entry(miner).or_default().0 += 1;
        }
        for pass in w.drawn_early.keys() {
            if let Some((miner, _)) = w.receipts.get(pass) {
                draws.entry(*miner).or_default().1 += 1;
            }
        }
        for (&miner, &paid) in &w.paid {
            draws.entry(miner).or_default().1 += paid;
        }
        for (miner, mut passes) in unchecked {
            // A miner's draws this window come to at least `floor(rate *
            // n)` of its `n` passes: drawing each alone would leave a
            // miner of 20 passes unchecked in 36% of windows at rate 0.05.
            // What the draws fell short by is drawn now; a suspect stands
            // in for one such draw, and beyond them is owed (its miner's
            // next draws pay it off), as is what it owed before.
            let (pooled, drawn) = draws.get(&miner).copied().unwrap_or_default();
            let floor = (self.spec.roles.replay_rate * pooled as f64).floor() as usize;
            let suspected = passes.iter().filter(|p| picked.contains(p)).count();
            let owed = self.owed_draws.entry(miner).or_default();
            let due;
            (due, *owed) = draws_at_close(floor, drawn, suspected, *owed);
            passes.retain(|p| !picked.contains(p));
            picked.extend(self.draws.sample(due, &mut passes));
        }
        let attempt = w.attempt;
        for (pass, drawn_in) in w.drawn_early.iter_mut() {
            let done = w
                .receipts
                .get(pass)
                .is_none_or(|(miner, _)| w.passed.contains(&(pass.0, pass.1, *miner)));
            if *drawn_in != attempt && !done {
                *drawn_in = attempt;
                picked.insert(*pass);
            }
        }
        for &(sender, receiver) in &breaks {
            picked.extend([sender, receiver]);
        }
        let drawn = self.send_replays(&picked, breaks, None);
        let w = self.window.as_mut().expect("a window runs");
        let replays = PassAudit::merged(w.early.take(), drawn);
        self.begin_close(replays)
    }

    /// Once every miner stated its passes' sketches with its reduction:
    /// has validators replay the passes that, by direction too, stand out
    /// most from their stage's (see [`suspicion`]), within what is left of
    /// each miner's `suspect_replays` this attempt; `None` when there are
    /// none, as in most windows. The miner's next draw is smaller by as
    /// many (see [`Coordinator::owed_draws`]).
    pub(super) fn replay_by_direction(&mut self, sketch_seed: u64) -> Option<PassAudit> {
        if self.validators.is_empty() {
            return None;
        }
        let unchecked = unchecked(self.window.as_ref().expect("a window runs"));
        let picked = self.suspects(&unchecked, true);
        let audit = self.send_replays(&picked, Vec::new(), Some(sketch_seed))?;
        let w = self.window.as_ref().expect("a window runs");
        for pass in &picked {
            if let Some((miner, _)) = w.receipts.get(pass) {
                *self.owed_draws.entry(*miner).or_default() += 1;
            }
        }
        Some(audit)
    }

    /// Sends validators the `Audit` order for `picked` passes, whose
    /// chain `breaks` the replays decide; after a close, with the sketches
    /// stated with its `sketch_seed`.
    fn send_replays(
        &mut self,
        picked: &BTreeSet<(u64, usize)>,
        breaks: Vec<((u64, usize), (u64, usize))>,
        sketch_seed: Option<u64>,
    ) -> Option<PassAudit> {
        let w = self.window.as_ref().expect("a window runs");
        let tasks: Vec<AuditTask> = picked
            .iter()
            .filter_map(|&(id, stage)| {
                let (miner, receipt) = w.receipts.get(&(id, stage))?;
                let validator = self.replayer_for(*miner)?;
                Some(AuditTask {
                    id,
                    stage,
                    miner: *miner,
                    validator,
                    receipt: receipt.clone(),
                    sketch: sketch_seed.map(|seed| StatedSketch {
                        seed,
                        sketch: w.sketches.get(&(id, stage)).cloned().unwrap_or_default(),
                    }),
                    // Only an earlier order's: a validator takes the
                    // bundles of one order in whatever order they come.
                    weights_held: w.weights_sent.contains(&(validator, stage)),
                })
            })
            .collect();
        if tasks.is_empty() {
            return None;
        }
        let w = self.window.as_mut().expect("a window runs");
        w.weights_sent
            .extend(tasks.iter().map(|t| (t.validator, t.stage)));
        let (window, attempt) = (w.window, w.attempt);
        let replies = Replies::new(window, attempt, tasks.iter().map(|t| t.validator));
        // To the miners and validators it names alone: drawn as
        // microbatches finish, a window has as many of these as draws,
        // and every other rank would read each to find nothing in it.
        let named: BTreeSet<usize> = tasks.iter().flat_map(|t| [t.miner, t.validator]).collect();
        let order = Order::Audit {
            window,
            attempt,
            tasks,
            weights: self.weights.clone(),
        };
        self.push(Output::Send(named.into_iter().collect(), order));
        Some(PassAudit { replies, breaks })
    }

    /// Each miner's unchecked passes that stand out most from their
    /// stage's passes in this window (by [`suspicion::standing`]: by their
    /// stated maxima, and with `by_direction` by their sketches too), past
    /// their threshold, up to what is left of its `suspect_replays` this
    /// attempt, which they use up.
    fn suspects(
        &mut self,
        unchecked: &BTreeMap<usize, Vec<(u64, usize)>>,
        by_direction: bool,
    ) -> BTreeSet<(u64, usize)> {
        let limit = self.spec.roles.suspect_replays;
        let w = self.window.as_mut().expect("a window runs");
        let mut by_stage: BTreeMap<usize, Vec<Stated>> = BTreeMap::new();
        for (&(id, stage), (_, receipt)) in &w.receipts {
            let sketch = match by_direction {
                // None stated is a sketch of the wrong length: a lie.
                true => w.sketches.get(&(id, stage)).map_or(&[][..], |s| &s[..]),
                false => &[],
            };
            by_stage
                .entry(stage)
                .or_default()
                .push((id, &receipt.maxes[..], sketch));
        }
        let mut score: BTreeMap<(u64, usize), f64> = BTreeMap::new();
        for (stage, passes) in by_stage {
            let maxes: Vec<&[u32]> = passes.iter().map(|p| p.1).collect();
            let sketches: Vec<&[u32]> = match by_direction {
                true => passes.iter().map(|p| p.2).collect(),
                false => Vec::new(),
            };
            let standing = suspicion::standing(&maxes, &sketches);
            for (p, s) in passes.iter().zip(standing) {
                score.insert((p.0, stage), s);
            }
        }
        let mut picked = BTreeSet::new();
        for (miner, passes) in unchecked {
            let used = w.suspected.entry(*miner).or_default();
            let mut standing_out: Vec<((u64, usize), f64)> = passes
                .iter()
                .filter_map(|p| Some((*p, *score.get(p)?)))
                .filter(|&(_, s)| s >= 1.0)
                .collect();
            standing_out.sort_by(|a, b| b.1.total_cmp(&a.1));
            for &(pass, _) in standing_out
                .iter()
                .take(limit.saturating_sub(*used) as usize)
            {
                picked.insert(pass);
                *used += 1;
            }
        }
        picked
    }

    /// The replays drawn by direction after the close are in: miners
    /// caught are excluded and the window is redone without them;
    /// otherwise it goes on to the slices.
    pub(super) fn finish_audit(&mut self) -> Result<(), TrainError> {
        let Phase::Auditing(audit, closed) = std::mem::replace(&mut self.phase, Phase::Finished)
        else {
            unreachable!("finish_audit runs in Auditing")
        };
        let gone = self.settle_replays(audit);
        if !gone.is_empty() {
            return self.redo_without(&gone);
        }
        self.hold_close(closed);
        Ok(())
    }

    /// Counts replays' verdicts and judges chain breaks; excludes the
    /// miners caught and returns them.
    pub(super) fn settle_replays(&mut self, audit: PassAudit) -> Vec<usize> {
        let w = self.window.as_mut().expect("a window runs");
        let mut reasons: BTreeMap<usize, String> = BTreeMap::new();
        for (task, verdict) in audit.replies.verdicts {
            match verdict {
                Verdict::Passed => {
                    w.replayed += 1;
                    w.passed.insert((task.id, task.stage, task.miner));
                }
                Verdict::Failed(reason) => {
                    w.replayed += 1;
                    w.failed.entry(task.miner).or_insert((task.stage, 0)).1 += 1;
                    reasons.entry(task.miner).or_insert(reason);
                }
                Verdict::Unavailable => {}
            }
        }
        // A break between two passes that both replayed right: the
        // receiver kept (and stated) a frame its sender never sent.
        for &(sender, receiver) in &audit.breaks {
            let miner_of = |pass: (u64, usize)| w.receipts.get(&pass).map(|(m, _)| *m);
            let (Some(s), Some(r)) = (miner_of(sender), miner_of(receiver)) else {
                continue;
            };
            let right = |pass: (u64, usize), m| w.passed.contains(&(pass.0, pass.1, m));
            if right(sender, s) && right(receiver, r) {
                w.failed.entry(r).or_insert((receiver.1, 0)).1 += 1;
                reasons.entry(r).or_insert(format!(
                    "microbatch {}: it stated a frame that miner {s} never sent",
                    receiver.0
                ));
            }
        }
        let window = w.window;
        self.exclude_all(window, &reasons)
    }

    /// Has validators recompute, from the contributions the miners stated,
    /// a random `slice_audit_rate` of each stage's all-reduce slices, and
    /// every slice of an all-reduce whose copies disagreed. A stage whose
    /// miners span sites has an all-reduce per site and one between the
    /// sites' leaders, each audited alike.
    pub(super) fn begin_recompute(&mut self, closed: Closed) -> Result<(), TrainError> {
        let mut tasks = Vec::new();
        let mut disagreed = Vec::new();
        for (stage, peers) in self.stage_miners().into_iter().enumerate() {
            let ids = closed.sites.get(stage).filter(|s| s.len() == peers.len());
            let groups: Vec<Vec<usize>> = match ids {
                None => vec![peers.clone()],
                Some(ids) => {
                    let mut by_site: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
                    for (&rank, &site) in peers.iter().zip(ids) {
                        by_site.entry(site).or_default().push(rank);
                    }
                    by_site.into_values().collect()
                }
            };
            let mut agreed = true;
            for members in &groups {
                agreed &= self.group_tasks(stage, members, &closed, &mut tasks);
            }
            if groups.len() > 1 {
                agreed &= self.across_tasks(stage, &peers, &groups, &closed, &mut tasks);
            }
            if !agreed {
                disagreed.push(stage);
            }
        }
        let w = self.window.as_ref().expect("a window runs");
        let (window, attempt) = (w.window, w.attempt);
        let audit = SliceAudit {
            replies: Replies::new(window, attempt, tasks.iter().map(|t| t.validator)),
            disagreed,
            tasks: tasks.len() as u64,
        };
        if !tasks.is_empty() {
            self.broadcast(Order::Recompute {
                window,
                attempt,
                tasks,
            });
        }
        self.phase = Phase::Recomputing(audit, closed);
        Ok(())
    }

    /// The validator that replays `miner`'s passes: one whose site
    /// computes on the same kind of device as the miner's (a replay gives
    /// the miner's bits only there), spread over them by miner rank. `None`
    /// when no validator has that device: the miner's passes then go
    /// unreplayed (`swarmrun check` warns of such a plan).
    fn replayer_for(&self, miner: usize) -> Option<usize> {
        let device = |rank: usize| {
            let site = self.sites.get(&rank).and_then(|s| self.spec.site(s));
            site.map(|s| s.device).unwrap_or_default()
        };
        let same: Vec<usize> = self
            .validators
            .iter()
            .copied()
            .filter(|&v| device(v) == device(miner))
            .collect();
        (!same.is_empty()).then(|| same[miner % same.len()])
    }

    /// For the `Close` order: the validator that will recompute each slice
    /// of each stage's all-reduce, where every slice is recomputed whatever
    /// the close shows (`slice_audit_rate = 1`) and the stage's miners are
    /// inside one site (a stage spanning sites is recomputed per site and
    /// between them, from what only the close makes); spread as
    /// [`Self::begin_recompute`] spreads tasks. The miners then send their
    /// contributions beside the all-reduce instead of after it, when the
    /// recomputation would wait for them: the slice audit stops costing a
    /// round trip and a transfer between the all-reduce and the step.
    pub(super) fn recomputers(
        &self,
        stages: &[Vec<usize>],
        sites: &[Vec<usize>],
    ) -> Vec<Vec<usize>> {
        if self.validators.is_empty() || self.spec.roles.slice_audit_rate < 1.0 {
            return Vec::new();
        }
        let mut spread = self.validators.iter().copied().cycle();
        let mut assigned = Vec::with_capacity(stages.len());
        for (stage, miners) in stages.iter().enumerate() {
            let spans_sites = sites.get(stage).is_some_and(|s| !s.is_empty());
            assigned.push(match spans_sites {
                true => Vec::new(),
                false => spread.by_ref().take(miners.len()).collect(),
            });
        }
        assigned
    }

    /// The slices of an all-reduce of `n` to recompute: a random
    /// `slice_audit_rate` of them when its copies agreed, all when not.
    fn pick_slices(&mut self, n: usize, agreed: bool) -> Vec<usize> {
        let mut slices: Vec<usize> = (0..n).collect();
        if !agreed {
            return slices;
        }
        let k = sample_size(&mut self.draws, self.spec.roles.slice_audit_rate, n);
        self.draws.sample(k, &mut slices).to_vec()
    }

    /// Tasks for the slices of the all-reduce among `members` (a stage's
    /// miners, or one site's of them), ascending; returns whether its
    /// copies agreed. Every picked slice carries the contribution check.
    fn group_tasks(
        &mut self,
        stage: usize,
        members: &[usize],
        closed: &Closed,
        tasks: &mut Vec<SliceTask>,
    ) -> bool {
        let n = members.len();
        let copies = self.spec.roles.slice_copies.min(n);
        let stated = |r: &usize| closed.reductions.get(r);
        let agreed = members.iter().all(|r| stated(r).is_some_and(|x| x.agreed));
        let picked = self.pick_slices(n, agreed);
        if self.validators.is_empty() {
            return agreed;
        }
        let w = self.window.as_ref().expect("a window runs");
        // Each miner's credited passes, as their receipts and sketches
        // state them.
        let credited: Vec<Vec<CreditedPass>> = members
            .iter()
            .map(|&r| {
                let credited = w.trained().filter(|(_, path)| path.get(stage) == Some(&r));
                credited
                    .filter_map(|(id, _)| {
                        let (_, receipt) = w.receipts.get(&(id, stage))?;
                        Some(CreditedPass {
                            id,
                            params: receipt.params.clone(),
                            sketch: protocol::sketch_digest(
                                w.sketches.get(&(id, stage)).map_or(&[][..], Vec::as_slice),
                            ),
                        })
                    })
                    .collect()
            })
            .collect();
        for slice in picked {
            let contributors = with_digests(members, |r| {
                stated(r).and_then(|x| x.contributions.get(slice).cloned())
            });
            let holding = holders_of(slice, members, copies);
            let holders = with_digests(&holding, |r| {
                stated(r).and_then(|x| copy_of(&x.copies, slice))
            });
            // The validator the miners sent this slice to at the close,
            // if it is still here.
            let sent_to = closed.recomputers.get(stage).and_then(|v| v.get(slice));
            let validator = match sent_to {
                Some(v) if self.validators.contains(v) => *v,
                _ => self.validators[tasks.len() % self.validators.len()],
            };
            tasks.push(SliceTask {
                stage,
                slice,
                validator,
                contributors,
                holders,
                scales: closed.scales.get(stage).cloned().unwrap_or_default(),
                sketch_seed: closed.sketch_seed,
                passes: Some(credited.clone()),
                probe: self.draws.next_u64(),
                sites: Vec::new(),
            });
        }
        agreed
    }

    /// Tasks for the slices of the all-reduce between the sites of a
    /// stage (`groups`: each site's miners, ascending, in site order; the
    /// first of each is its leader); returns whether the leaders' copies
    /// agreed. A validator sums every miner's own contribution per site,
    /// checks each leader's partial against it, and the leaders' copies
    /// against the sum of the partials.
    fn across_tasks(
        &mut self,
        stage: usize,
        peers: &[usize],
        groups: &[Vec<usize>],
        closed: &Closed,
        tasks: &mut Vec<SliceTask>,
    ) -> bool {
        let k = groups.len();
        let copies = self.spec.roles.slice_copies.min(k);
        // Each site's lowest rank leads; the leaders reduce in rank order.
        let mut leaders: Vec<usize> = groups.iter().filter_map(|g| g.first().copied()).collect();
        leaders.sort_unstable();
        let across = |r: &usize| closed.reductions.get(r).and_then(|x| x.across.as_ref());
        let leader_part = |r: &usize| across(r).and_then(|a| a.leader.as_ref());
        let agreed = leaders
            .iter()
            .all(|r| leader_part(r).is_some_and(|p| p.agreed));
        let picked = self.pick_slices(k, agreed);
        if self.validators.is_empty() {
            return agreed;
        }
        for slice in picked {
            let contributors = with_digests(peers, |r| {
                across(r).and_then(|a| a.contributions.get(slice).cloned())
            });
            let holding = holders_of(slice, &leaders, copies);
            let holders = with_digests(&holding, |r| {
                leader_part(r).and_then(|p| copy_of(&p.copies, slice))
            });
            let sites = groups
                .iter()
                .filter_map(|members| Some((members, *members.first()?)))
                .map(|(members, leader)| SitePart {
                    leader,
                    partial: leader_part(&leader)
                        .and_then(|p| p.partial.get(slice).cloned())
                        .unwrap_or_default(),
                    members: members
                        .iter()
                        .filter_map(|m| peers.iter().position(|p| p == m))
                        .collect(),
                })
                .collect();
            tasks.push(SliceTask {
                stage,
                slice,
                validator: self.validators[tasks.len() % self.validators.len()],
                contributors,
                holders,
                scales: closed.scales.get(stage).cloned().unwrap_or_default(),
                sketch_seed: closed.sketch_seed,
                passes: None,
                probe: self.draws.next_u64(),
                sites,
            });
        }
        agreed
    }

    /// The recomputations are in: holders with a wrong copy and miners
    /// whose contribution is not what they stated or not their passes'
    /// sum are excluded and the window redone; otherwise it steps.
    pub(super) fn finish_recompute(&mut self) -> Result<(), TrainError> {
        let Phase::Recomputing(audit, closed) = std::mem::replace(&mut self.phase, Phase::Finished)
        else {
            unreachable!("finish_recompute runs in Recomputing")
        };
        let w = self.window.as_mut().expect("a window runs");
        w.recomputed += audit.tasks;
        let mut reasons: BTreeMap<usize, String> = BTreeMap::new();
        for (task, verdicts) in audit.replies.verdicts {
            for (miner, verdict) in verdicts {
                if let Verdict::Failed(reason) = verdict {
                    w.failed.entry(miner).or_insert((task.stage, 0)).1 += 1;
                    reasons.entry(miner).or_insert(format!(
                        "slice {} of stage {}'s all-reduce: {reason}",
                        task.slice, task.stage
                    ));
                }
            }
        }
        if let (Some(&stage), true) = (audit.disagreed.first(), reasons.is_empty()) {
            return Err(TrainError::Protocol {
                rank: 0,
                reason: format!(
                    "window {}: the copies of a slice of stage {stage}'s all-reduce disagree \
                     and no validator found whose copy was wrong",
                    w.window
                ),
            });
        }
        let window = w.window;
        let gone = self.exclude_all(window, &reasons);
        if gone.is_empty() {
            self.begin_step(closed)
        } else {
            self.redo_without(&gone)
        }
    }

    /// The proofs of wrong slices handed out in the close, as the miners
    /// stated them in `reductions`: a slice's owner whose own signed
    /// statement shows it handed out other than the copy it stated is to
    /// be excluded, and so is a miner stating a proof that does not hold
    /// (an honest one checks a proof before stating it, with the keys this
    /// leader handed out). Returns each with why. Stages spanning sites
    /// (`sites`) hand out nothing signed.
    pub(super) fn judge_handed(
        &mut self,
        reductions: &BTreeMap<usize, Reduction>,
        sites: &[Vec<usize>],
    ) -> BTreeMap<usize, String> {
        let stages = self.stage_miners();
        let w = self.window.as_mut().expect("a window runs");
        let tag = protocol::close_tag(w.window, w.attempt);
        let mut reasons: BTreeMap<usize, String> = BTreeMap::new();
        for (stage, members) in stages.iter().enumerate() {
            if sites.get(stage).is_some_and(|s| !s.is_empty()) {
                continue;
            }
            for &accuser in members {
                let stated = reductions.get(&accuser).map(|x| &x.wrong_slices[..]);
                for proof in stated.unwrap_or_default() {
                    let slice = proof.slice;
                    // The owner and the copy it stated of its slice.
                    let owned = members
                        .get(slice)
                        .and_then(|&o| Some((o, copy_of(&reductions.get(&o)?.copies, slice))));
                    let (culprit, reason) = match owned {
                        // Its owner stated no copy of it: no verdict.
                        Some((_, None)) => continue,
                        Some((owner, Some(agreed)))
                            if self
                                .keys
                                .get(&owner)
                                .is_some_and(|key| proof.proves(key, tag, &agreed)) =>
                        {
                            (
                                owner,
                                format!(
                                    "it handed rank {accuser} slice {slice} of stage {stage}'s \
                                     all-reduce other than the copy it agreed on, and signed that it did"
                                ),
                            )
                        }
                        _ => (
                            accuser,
                            format!(
                                "it stated that slice {slice} of stage {stage}'s all-reduce was \
                                 handed out wrong, with a proof that does not hold"
                            ),
                        ),
                    };
                    if let std::collections::btree_map::Entry::Vacant(e) = reasons.entry(culprit) {
                        w.failed.entry(culprit).or_insert((stage, 0)).1 += 1;
                        e.insert(reason);
                    }
                }
            }
        }
        reasons
    }

    /// With validators, one audit per checkpoint writer: its stage's agreed
    /// digests before the step and the reduced sum all its miners stated.
    pub(super) fn checkpoint_tasks(
        &self,
        window: u64,
        writers: &[usize],
        reductions: &BTreeMap<usize, Reduction>,
    ) -> Result<Vec<CheckpointTask>, TrainError> {
        if self.validators.is_empty() {
            return Ok(Vec::new());
        }
        let mut tasks = Vec::new();
        for &writer in writers {
            let Some(&stage) = self.miners.get(&writer) else {
                continue;
            };
            let sums: BTreeSet<Option<&String>> = self
                .miners
                .iter()
                .filter(|(_, s)| **s == stage)
                .map(|(r, _)| reductions.get(r).and_then(|x| x.result.as_ref()))
                .collect();
            let sum = match Vec::from_iter(sums)[..] {
                [Some(sum)] => sum.clone(),
                _ => {
                    return Err(TrainError::Protocol {
                        rank: 0,
                        reason: format!(
                        "window {window}: the miners of stage {stage} state different reduced sums"
                    ),
                    })
                }
            };
            tasks.push(CheckpointTask {
                stage,
                writer,
                validator: self.validators[stage % self.validators.len()],
                weights: self.weights[stage].clone(),
                optimizer: self.optimizers[stage].clone(),
                sum,
            });
        }
        Ok(tasks)
    }

    /// After the step: writers whose checkpoint failed its audit are
    /// excluded (with their stages, returned); when a checkpoint was due
    /// and every stage's file passed, it is to be committed.
    pub(super) fn judge_checkpoint(
        &mut self,
        window: u64,
        s: &Stepping,
    ) -> Result<Vec<(usize, usize)>, TrainError> {
        if !s.due {
            return Ok(Vec::new());
        }
        let reasons = checkpoint_faults(&s.entries, &s.digests, &s.audited);
        let caught: Vec<(usize, usize)> = self
            .exclude_all(window, &reasons)
            .into_iter()
            .filter_map(|rank| s.entries.values().find(|(w, _)| *w == rank))
            .map(|(rank, entry)| (*rank, entry.stage))
            .collect();
        if !caught.is_empty() || s.entries.len() != self.setup.stages {
            let why = if caught.is_empty() {
                "a checkpoint writer was lost"
            } else {
                "a checkpoint writer failed its audit"
            };
            self.say_warn(format!(
                "orchestrator: {why}; no checkpoint for window {window}"
            ));
            return Ok(caught);
        }
        let manifest = Manifest {
            window,
            step: window + 1,
            job: self.start.job_text.clone(),
            seed: self.spec.job.seed,
            stages: s.entries.values().map(|(_, e)| e.clone()).collect(),
            router: self.router.state(),
        };
        self.out_commit(manifest);
        Ok(caught)
    }

    /// Excludes every miner in `reasons` still in the job; returns them.
    pub(super) fn exclude_all(
        &mut self,
        window: u64,
        reasons: &BTreeMap<usize, String>,
    ) -> Vec<usize> {
        let caught: Vec<usize> = reasons
            .keys()
            .copied()
            .filter(|r| self.miners.contains_key(r))
            .collect();
        for &rank in &caught {
            // Told to leave; the job goes on without it.
            self.send_stop(rank);
            self.lose(
                rank,
                Happened::Excluded,
                &format!(
                    "failed a check in window {window}: {}; excluded",
                    reasons[&rank]
                ),
            );
        }
        caught
    }
}

/// How many of `n` things to check at `rate`: `rate * n` rounded down or
/// up at random (with `draws`), so that the mean is `rate * n` exactly and
/// at least `floor(rate * n)` are checked.
fn sample_size(draws: &mut SplitMix64, rate: f64, n: usize) -> usize {
    let want = rate * n as f64;
    let k = want.floor() as usize + usize::from(draws.unit_open0() <= want.fract());
    k.min(n)
}

/// The chance of each of a miner's `n` passes in a window to be drawn as
/// it finishes: `rate`, or where the close tops the draws up to
/// `floor(rate * n)` a little less, so that the mean of the two is `rate *
/// n` (the expectation of `max(B, floor)` for `B` binomial in `n` and the
/// chance, solved by bisection): at rate 0.05, 0.042 for 32 passes. But
/// never below half the rate: where `rate * n` is whole the floor alone
/// has the mean, and the replays would all wait for the close; there the
/// mean is up to a tenth above (20 passes at 0.05: 0.025, a mean of 1.1).
fn draw_chance(rate: f64, n: usize) -> f64 {
    let want = rate * n as f64;
    let floor = want.floor() as usize;
    if floor == 0 || rate >= 1.0 {
        return rate;
    }
    // The mean of max(B, floor): n q plus what the floor adds where B
    // falls short of it.
    let mean = |q: f64| {
        let (mut p, mut added) = ((1.0 - q).powi(n as i32), 0.0);
        for k in 0..floor {
            added += (floor - k) as f64 * p;
            p *= (n - k) as f64 / (k + 1) as f64 * q / (1.0 - q);
        }
        n as f64 * q + added
    };
    let (mut low, mut high) = (rate / 2.0, rate);
    if mean(low) >= want {
        return low;
    }
    for _ in 0..50 {
        let mid = (low + high) / 2.0;
        match mean(mid) < want {
            true => low = mid,
            false => high = mid,
        }
    }
    high
}

/// A miner's draws at the close (see [`Coordinator::begin_audit`]): with
/// `floor` replays due this window, `drawn` made as its microbatches
/// finished (or that paid off a draw it owed), `suspected` suspects
/// replayed now and `owed` draws owed before, how many more to draw now
/// and how many it owes after. A suspect stands in for a draw the floor
/// asks for, and is owed beyond them; what is owed pays for such draws.
fn draws_at_close(floor: usize, drawn: usize, suspected: usize, owed: usize) -> (usize, usize) {
    let short = floor.saturating_sub(drawn);
    let covered = suspected.min(short);
    let paid = (short - covered).min(owed);
    (short - covered - paid, owed - paid + (suspected - covered))
}

/// A pass as its miner stated it: microbatch, gradient maxima, sketch.
type Stated<'a> = (u64, &'a [u32], &'a [u32]);

/// Each miner's passes in `w` not replayed yet.
fn unchecked(w: &WindowState) -> BTreeMap<usize, Vec<(u64, usize)>> {
    let mut unchecked: BTreeMap<usize, Vec<(u64, usize)>> = BTreeMap::new();
    for (id, path) in w.trained() {
        for stage in 0..path.len() {
            if let Some((miner, _)) = w.receipts.get(&(id, stage)) {
                if !w.passed.contains(&(id, stage, *miner)) {
                    unchecked.entry(*miner).or_default().push((id, stage));
                }
            }
        }
    }
    unchecked
}

/// The ranks of an all-reduce among `ranks` (in its order) that reduce
/// `slice` with `copies` copies.
fn holders_of(slice: usize, ranks: &[usize], copies: usize) -> Vec<usize> {
    slice_holders(slice, ranks.len(), copies)
        .into_iter()
        .map(|h| ranks[h])
        .collect()
}

/// Each of `ranks` with the digest it stated (empty where it stated none,
/// which no recomputation matches).
fn with_digests(
    ranks: &[usize],
    stated: impl Fn(&usize) -> Option<String>,
) -> Vec<(usize, String)> {
    ranks
        .iter()
        .map(|r| (*r, stated(r).unwrap_or_default()))
        .collect()
}

/// The digest of `slice` among stated copies.
fn copy_of(copies: &[(usize, String)], slice: usize) -> Option<String> {
    copies
        .iter()
        .find(|(j, _)| *j == slice)
        .map(|(_, d)| d.clone())
}

/// Each stage's fixed-point scales for the window's all-reduce, from the
/// largest gradient magnitudes the counted passes' receipts state (a pass
/// that understates them is caught when replayed).
pub(super) fn scales(setup: &Setup, w: &WindowState) -> Result<Vec<Vec<i32>>, TrainError> {
    let mut maxes: Vec<Vec<f32>> = vec![Vec::new(); setup.stages];
    for (id, path) in w.trained() {
        for (stage, m) in maxes.iter_mut().enumerate().take(path.len()) {
            let Some((_, receipt)) = w.receipts.get(&(id, stage)) else {
                continue;
            };
            if m.len() < receipt.maxes.len() {
                m.resize(receipt.maxes.len(), 0.0);
            }
            for (m, &bits) in m.iter_mut().zip(&receipt.maxes) {
                let x = f32::from_bits(bits);
                *m = if x.is_nan() { f32::INFINITY } else { m.max(x) };
            }
        }
    }
    maxes
        .iter()
        .enumerate()
        .map(|(stage, m)| {
            scales_for(m).map_err(|e| TrainError::Protocol {
                rank: 0,
                reason: format!("window {}: stage {stage}'s gradients: {e}", w.window),
            })
        })
        .collect()
}

/// Why each checkpoint writer failed, if any did: its entry states other
/// digests than its stage agreed on after the step (`digests`: weights,
/// optimizer), or a validator found its file is not what the replayed step
/// gives, or the file the validator checked is not the one it stated.
fn checkpoint_faults(
    entries: &BTreeMap<usize, (usize, StageEntry)>,
    digests: &BTreeMap<usize, (String, String)>,
    audited: &[(CheckpointTask, Option<String>, Option<String>, Verdict)],
) -> BTreeMap<usize, String> {
    let mut reasons = BTreeMap::new();
    for (stage, (writer, entry)) in entries {
        let agreed = digests.get(stage);
        let reason = if agreed.map(|d| &d.0) != Some(&entry.weights_digest) {
            "its entry states weights other than its stage's"
        } else if entry.optimizer_digest.as_ref() != agreed.map(|d| &d.1) {
            "its entry states an optimizer state other than its stage's"
        } else {
            continue;
        };
        reasons.insert(*writer, format!("checkpoint of stage {stage}: {reason}"));
    }
    for (task, file, weights, verdict) in audited {
        let Some((writer, entry)) = entries.get(&task.stage) else {
            continue;
        };
        let replayed = digests.get(&task.stage).map(|d| &d.0);
        let reason = match verdict {
            Verdict::Failed(reason) => reason.clone(),
            Verdict::Passed if file.as_ref() != Some(&entry.blake3) => {
                "the file it sent the validator is not the one it stated".into()
            }
            Verdict::Passed if weights.as_ref() != replayed => {
                "its stage stepped to other weights than the validator's replay".into()
            }
            Verdict::Passed | Verdict::Unavailable => continue,
        };
        reasons
            .entry(*writer)
            .or_insert(format!("checkpoint of stage {}: {reason}", task.stage));
    }
    reasons
}

/// Each miner's passes counted in the window's update and its failed
/// checks: a miner that failed one is credited nothing.
pub(super) fn tallies(w: &WindowState) -> Vec<Tally> {
    let mut by_rank: BTreeMap<usize, Tally> = BTreeMap::new();
    for (_, path) in w.trained() {
        for (stage, &rank) in path.iter().enumerate() {
            let tally = by_rank.entry(rank).or_insert(Tally {
                rank,
                stage,
                verified: 0,
                failed: 0,
            });
            tally.verified += 1;
        }
    }
    for (&rank, &(stage, failed)) in &w.failed {
        by_rank.insert(
            rank,
            Tally {
                rank,
                stage,
                verified: 0,
                failed,
            },
        );
    }
    by_rank.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::{draw_chance, draws_at_close};

    #[test]
    fn the_draw_chance_leaves_the_mean_at_the_rate_with_the_floor_topped_up() {
        assert_eq!(draw_chance(0.05, 4), 0.05, "no floor below 20 passes");
        assert_eq!(draw_chance(1.0, 7), 1.0);
        for (rate, n) in [(0.05, 32), (0.05, 50), (0.1, 64), (0.1, 25)] {
            let q = draw_chance(rate, n);
            assert!(q > 0.0 && q < rate, "{rate} of {n}: {q}");
            // The mean of max(B, floor) summed over the whole binomial.
            let floor = (rate * n as f64).floor();
            let mut p = (1.0 - q).powi(n as i32);
            let mut mean = 0.0;
            for k in 0..=n {
                mean += p * (k as f64).max(floor);
                p *= (n - k) as f64 / (k + 1) as f64 * q / (1.0 - q);
            }
            assert!(
                (mean - rate * n as f64).abs() < 1e-9,
                "{rate} of {n}: {mean}"
            );
        }
        assert!((draw_chance(0.05, 32) - 0.042).abs() < 0.001);
        assert_eq!(draw_chance(0.05, 20), 0.025, "never below half the rate");
    }

    #[test]
    fn the_close_draws_what_the_floor_lacks_and_suspects_and_debts_stand_in() {
        // (floor, drawn, suspected, owed) -> (drawn now, owed after)
        assert_eq!(draws_at_close(1, 0, 0, 0), (1, 0), "the floor is drawn");
        assert_eq!(draws_at_close(1, 2, 0, 0), (0, 0), "the draw went past it");
        assert_eq!(draws_at_close(1, 0, 1, 0), (0, 0), "a suspect stands in");
        assert_eq!(draws_at_close(1, 1, 1, 0), (0, 1), "past the floor: owed");
        assert_eq!(draws_at_close(2, 0, 0, 1), (1, 0), "a debt pays a draw");
        assert_eq!(draws_at_close(3, 1, 1, 3), (0, 2), "part of it");
        assert_eq!(draws_at_close(0, 0, 2, 3), (0, 5));
    }
}
