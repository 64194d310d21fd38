//! Who is in the job, as the orchestrator changes it: ranks that joined
//! while the job trains, miners moved to the bottleneck stage, miners that
//! leave politely.
//!
//! Everything here happens at window boundaries: a joiner announces itself
//! whenever it is ready, and is placed on a stage before the next window
//! runs; a miner asked to leave serves its window to the end and is stopped
//! after the step, so its work counts and no window is redone for it.

use std::collections::BTreeSet;

use super::machine::{Coordinator, Happened, Output, Phase};
use crate::checkpoint::Manifest;
use crate::config::HoldPhase;
use crate::roles::protocol::{Order, Placement, StageDigests};
use crate::roles::train::TrainError;

impl Coordinator<'_> {
    /// Before `window` runs: places every rank that joined on the stage it
    /// helps most, and moves a miner to the bottleneck when that pays
    /// (SWARM's rebalancing). Each placed miner takes its stage's state in
    /// stripes from the stage's miners and must end with the digests the
    /// stage agreed on. With nobody to place, the window runs at once.
    pub(super) fn place(&mut self, window: u64) -> Result<(), TrainError> {
        let mut placements: Vec<(Placement, Option<usize>)> = Vec::new();
        let joining: Vec<(usize, Option<String>)> =
            self.joining.iter().map(|(r, s)| (*r, s.clone())).collect();
        for (rank, site) in joining {
            let served = site.and_then(|s| self.spec.site(&s).map(|s| s.stages.clone()));
            let stage = self.router.stage_for_newcomer(&served.unwrap_or_default());
            self.router.place(rank, stage);
            placements.push((self.placement(rank, stage), None));
        }
        if let Some(mv) = self.router.rebalance() {
            placements.push((self.placement(mv.rank, mv.to), Some(mv.from)));
        }
        if placements.is_empty() {
            return self.run_window();
        }
        let attempt = self.window.as_ref().map_or(0, |w| w.attempt);
        self.broadcast(Order::Place {
            window,
            attempt,
            placements: placements.iter().map(|(p, _)| p.clone()).collect(),
        });
        self.phase = Phase::Placing {
            waiting: placements.iter().map(|(p, _)| p.rank).collect(),
            placements,
        };
        Ok(())
    }

    /// Serves the window once nobody is being placed.
    fn run_window(&mut self) -> Result<(), TrainError> {
        self.phase = Phase::Placing {
            waiting: BTreeSet::new(),
            placements: Vec::new(),
        };
        Ok(())
    }

    /// A placed rank says how loading its stage went.
    pub(super) fn placed(
        &mut self,
        rank: usize,
        stage: usize,
        state: Result<StageDigests, String>,
    ) -> Result<(), TrainError> {
        let Phase::Placing { placements, .. } = &self.phase else {
            return Ok(());
        };
        let Some((p, from)) = placements.iter().find(|(p, _)| p.rank == rank).cloned() else {
            return Ok(());
        };
        match check_placed(&p, stage, state) {
            Ok(()) => {
                self.miners.insert(rank, stage);
                self.joining.remove(&rank);
                let line = match from {
                    Some(from) => format!(
                        "moved miner {rank} from stage {from} to stage {stage} (the bottleneck); \
                         it took the stage from miners {:?}",
                        p.sources
                    ),
                    None => format!(
                        "miner {rank}{} joined stage {stage}; it took the stage from miners {:?}",
                        self.site_label(rank),
                        p.sources
                    ),
                };
                self.say_about(Happened::Placed, rank, line);
            }
            Err((reason, wrong)) => {
                self.say_warn(format!(
                    "orchestrator: placing miner {rank} on stage {stage}: {reason}"
                ));
                match (from, wrong) {
                    // A move that failed: the miner keeps its stage.
                    (Some(from), false) => self.router.place(rank, from),
                    // A joiner tries again before the next window.
                    (None, false) => {
                        self.router.remove(rank);
                    }
                    (_, true) => self.stop(rank, Happened::Excluded, &reason),
                }
            }
        }
        Ok(())
    }

    /// Stage `stage`'s state for `rank`, from its miners now.
    fn placement(&self, rank: usize, stage: usize) -> Placement {
        Placement {
            rank,
            stage,
            sources: self
                .miners
                .iter()
                .filter(|(r, s)| **s == stage && **r != rank)
                .map(|(r, _)| *r)
                .collect(),
            weights: self.weights[stage].clone(),
            optimizer: self.optimizers[stage].clone(),
        }
    }

    /// `[[faults.hold]]` at `phase` of `window`: whether as many ranks
    /// have joined as it says, and (with `left`) every rank that joined
    /// has left.
    pub(super) fn hold_satisfied(&self, window: u64, phase: HoldPhase) -> bool {
        let joined = self.joined_ever.len();
        let present = self.miners.keys().chain(self.joining.keys());
        let joiners_left = !present.into_iter().any(|&r| r >= self.planned);
        self.spec
            .faults
            .hold
            .iter()
            .filter(|h| (h.window, h.phase) == (window, phase))
            .all(|h| joined >= h.joined && (!h.left || joiners_left))
    }

    /// Says that `window` is held at `phase`, if a hold says so.
    pub(super) fn announce_hold(&mut self, window: u64, phase: HoldPhase) {
        let holds = self.spec.faults.hold.iter();
        let lines: Vec<String> = holds
            .filter(|h| (h.window, h.phase) == (window, phase))
            .map(|h| {
                format!(
                    "holding window {window} ({phase:?}) until {} ranks joined{} ([[faults.hold]])",
                    h.joined,
                    if h.left { " and left" } else { "" }
                )
            })
            .collect();
        for line in lines {
            self.say(line);
        }
    }

    /// After `window`'s step (or before a window, when nothing runs): every
    /// miner that asked to leave goes, its work counted.
    pub(super) fn dismiss_leavers(&mut self, window: u64) {
        for rank in std::mem::take(&mut self.leaving) {
            if self.miners.contains_key(&rank) || self.joining.contains_key(&rank) {
                let reason = format!("left after window {window}, as it asked");
                self.stop(rank, Happened::Left, &reason);
            }
        }
    }

    /// Tells `rank` to stop and forgets it (`what`: it left, or was
    /// excluded).
    pub(super) fn stop(&mut self, rank: usize, what: Happened, reason: &str) {
        self.send_stop(rank);
        let stage = self.forget_miner(rank);
        let text = format!(
            "orchestrator: miner {rank} of stage {} {reason}",
            stage.map_or("-".to_string(), |s| s.to_string())
        );
        self.say_about(what, rank, text);
    }

    /// `Stop` to `rank` alone.
    pub(super) fn send_stop(&mut self, rank: usize) {
        self.push(Output::Send(vec![rank], Order::Stop));
    }

    /// A checkpoint to commit.
    pub(super) fn out_commit(&mut self, manifest: Manifest) {
        self.push(Output::Commit(Box::new(manifest)));
    }

    /// " (site NAME)" for a joiner that said its site.
    fn site_label(&self, rank: usize) -> String {
        self.sites
            .get(&rank)
            .filter(|_| rank >= self.planned)
            .map_or_else(String::new, |site| format!(" (site {site})"))
    }
}

/// Whether a placed miner holds what its stage agreed on; when not, why,
/// and whether its state is wrong (rather than missing).
fn check_placed(
    p: &Placement,
    stage: usize,
    state: Result<StageDigests, String>,
) -> Result<(), (String, bool)> {
    let digests = state.map_err(|e| (e, false))?;
    let optimizer_ok = p.optimizer.as_ref().is_none_or(|o| *o == digests.optimizer);
    if stage != p.stage || digests.weights != p.weights || !optimizer_ok {
        return Err((
            format!("it states stage {stage} with other digests than the stage's"),
            true,
        ));
    }
    Ok(())
}
