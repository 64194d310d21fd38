//! Who is in the job, as the orchestrator changes it: ranks that join
//! while the job trains, miners moved to the bottleneck stage, miners that
//! leave politely, and the reports of any of them.
//!
//! Everything here happens at window boundaries: a joiner announces
//! itself whenever it is ready (`Joining`), and is placed on a stage
//! before the next window runs; a miner asked to leave (`Leaving`) serves
//! its window to the end and is stopped after the step, so its work
//! counts and no window is redone for it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::{Event, Orchestrator};
use crate::config::HoldPhase;
use crate::roles::protocol::{self, Order, Placement, Report, StageDigests};
use crate::roles::train::TrainError;
use crate::transport::{Transport, TransportError};

/// What one wait for reports heard.
pub(super) enum Heard {
    /// A report for the phase that waits, or the loss of a miner.
    Event(Event),
    /// A rank joined, asked to leave, or was lost before it had a stage.
    News,
    /// Nothing until the deadline.
    Silence,
}

/// How often a wait for reports looks for ranks that joined meanwhile.
const NEWCOMERS: Duration = Duration::from_millis(50);

impl<T: Transport + ?Sized> Orchestrator<'_, T> {
    /// Ranks whose reports the orchestrator reads between its phases' own
    /// waits: the miners, the joiners, and any rank id the door gave out
    /// since (whose first word is `Joining`). Validators answer tasks and
    /// are read where the tasks are.
    fn listening(&self) -> Vec<usize> {
        let joined_later = (self.planned..self.t.size())
            .filter(|r| !self.departed.contains(r) && !self.miners.contains_key(r));
        let mut from: BTreeSet<usize> = self.miners.keys().copied().collect();
        from.extend(joined_later);
        from.into_iter().collect()
    }

    /// The next report of a miner or the loss of one, or news of a join
    /// or leave, until `deadline`. `Joining` and `Leaving` are taken here:
    /// they change who takes part from the next window on.
    pub(super) fn next_report(&mut self, deadline: Instant) -> Result<Heard, TrainError> {
        loop {
            let from = self.listening();
            // A rank that joins meanwhile is not in `from`: look again now
            // and then (any message wakes the wait at once).
            let slice = deadline.min(Instant::now() + NEWCOMERS);
            let (rank, bytes) = match self.t.recv_any(&from, protocol::REPORT_TAG, slice) {
                Ok(message) => message,
                Err(TransportError::PeerLost { rank, reason }) => {
                    if self.miners.contains_key(&rank) {
                        self.lose(rank, &reason);
                        return Ok(Heard::Event(Event::Lost(rank)));
                    }
                    eprintln!("orchestrator: lost rank {rank} before it had a stage ({reason})");
                    self.depart(rank);
                    return Ok(Heard::News);
                }
                Err(TransportError::NoneArrived { .. }) if Instant::now() < deadline => continue,
                Err(TransportError::NoneArrived { .. }) => return Ok(Heard::Silence),
                Err(e) => return Err(e.into()),
            };
            match protocol::decode_report(&bytes, rank)? {
                Report::Joining => {
                    eprintln!("orchestrator: rank {rank} joined; it mines from the next window");
                    self.joining.insert(rank);
                    self.joined_ever.insert(rank);
                    self.listeners.insert(rank);
                }
                Report::Leaving => {
                    eprintln!(
                        "orchestrator: rank {rank} asked to leave; it goes after this window"
                    );
                    self.leaving.insert(rank);
                }
                report => return Ok(Heard::Event(Event::Report(rank, report))),
            }
            return Ok(Heard::News);
        }
    }

    /// Takes every report waiting now: between windows, news of joins and
    /// leaves; anything else is late news of a window already closed.
    fn take_news(&mut self) -> Result<(), TrainError> {
        // A miner lost now costs nothing: no window is running.
        while !matches!(self.next_report(Instant::now())?, Heard::Silence) {}
        Ok(())
    }

    /// Before `window` runs: places every rank that joined on the stage it
    /// helps most, and moves a miner to the bottleneck when that pays
    /// (SWARM's rebalancing). Each placed miner takes its stage's state in
    /// stripes from the stage's miners and must end with the digests the
    /// stage agreed on; one that does not (a source lost on the way) is
    /// placed again later, one whose state is wrong is stopped.
    pub(super) fn place(&mut self, window: u64) -> Result<(), TrainError> {
        self.take_news()?;
        // Nothing runs now: a miner lost meanwhile costs nothing.
        self.hold(window, HoldPhase::Start)?;
        let mut placements: Vec<(Placement, Option<usize>)> = Vec::new();
        for &rank in &self.joining {
            let site = self.membership.as_ref().and_then(|m| m.peer(rank));
            let served = site.and_then(|p| self.spec.site(&p.site).map(|s| s.stages.clone()));
            let stage = self.router.stage_for_newcomer(&served.unwrap_or_default());
            self.router.place(rank, stage);
            placements.push((self.placement(rank, stage), None));
        }
        if let Some(mv) = self.router.rebalance() {
            placements.push((self.placement(mv.rank, mv.to), Some(mv.from)));
        }
        if placements.is_empty() {
            return Ok(());
        }
        self.broadcast(&Order::Place {
            window,
            placements: placements.iter().map(|(p, _)| p.clone()).collect(),
        })?;
        let mut waiting: BTreeSet<usize> = placements.iter().map(|(p, _)| p.rank).collect();
        while !waiting.is_empty() {
            let (rank, stage, state) = match self.next_event()? {
                Event::Report(
                    from,
                    Report::Placed {
                        window: w,
                        stage,
                        state,
                    },
                ) if w == window && waiting.contains(&from) => (from, stage, state),
                Event::Lost(rank) => {
                    waiting.remove(&rank);
                    continue;
                }
                Event::Report(..) => continue,
            };
            waiting.remove(&rank);
            let Some((p, from)) = placements.iter().find(|(p, _)| p.rank == rank) else {
                continue;
            };
            match self.check_placed(p, stage, state) {
                Ok(()) => {
                    self.miners.insert(rank, stage);
                    self.joining.remove(&rank);
                    match from {
                        Some(from) => println!(
                            "moved miner {rank} from stage {from} to stage {stage} (the bottleneck); \
                             it took the stage from miners {:?}",
                            p.sources
                        ),
                        None => println!(
                            "miner {rank}{} joined stage {stage}; it took the stage from miners {:?}",
                            self.site_of(rank),
                            p.sources
                        ),
                    }
                }
                Err((reason, wrong)) => {
                    eprintln!("orchestrator: placing miner {rank} on stage {stage}: {reason}");
                    match (from, wrong) {
                        // A move that failed: the miner keeps its stage.
                        (Some(from), false) => self.router.place(rank, *from),
                        // A joiner tries again before the next window.
                        (None, false) => {
                            self.router.remove(rank);
                        }
                        (_, true) => self.stop(rank, &reason)?,
                    }
                }
            }
        }
        Ok(())
    }

    /// `[[faults.hold]]`: at `phase` of `window`, waits until as many ranks
    /// have joined as it says, or until every rank that joined has left
    /// (before a window, nothing runs, so a rank that asks to leave goes
    /// at once). Returns the miners lost meanwhile.
    pub(super) fn hold(&mut self, window: u64, phase: HoldPhase) -> Result<Vec<usize>, TrainError> {
        let mut lost = Vec::new();
        let holds = self.spec.faults.hold.iter();
        let holds: Vec<_> = holds
            .filter(|h| (h.window, h.phase) == (window, phase))
            .collect();
        for h in holds {
            println!(
                "holding window {window} ({phase:?}) until {} ranks joined{} ([[faults.hold]])",
                h.joined,
                if h.left { " and left" } else { "" }
            );
            let mut deadline = Instant::now() + self.t.default_timeout();
            loop {
                if phase == HoldPhase::Start {
                    self.dismiss_leavers(window.saturating_sub(1))?;
                }
                let joined = self.joined_ever.len();
                let present = self.miners.keys().chain(&self.joining);
                let joiners_left = !present.into_iter().any(|&r| r >= self.planned);
                if joined >= h.joined && (!h.left || joiners_left) {
                    break;
                }
                match self.next_report(deadline)? {
                    Heard::Silence => {
                        return Err(TrainError::Stalled {
                            waited: self.t.default_timeout(),
                        })
                    }
                    Heard::Event(Event::Lost(rank)) => lost.push(rank),
                    _ => {}
                }
                deadline = Instant::now() + self.t.default_timeout();
            }
        }
        Ok(lost)
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

    /// Whether a placed miner holds what its stage agreed on; when not,
    /// why, and whether its state is wrong (rather than missing).
    fn check_placed(
        &self,
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

    /// After `window`'s step: every miner that asked to leave goes, its
    /// work of the window counted.
    pub(super) fn dismiss_leavers(&mut self, window: u64) -> Result<(), TrainError> {
        for rank in std::mem::take(&mut self.leaving) {
            if self.miners.contains_key(&rank) || self.joining.contains(&rank) {
                self.stop(rank, &format!("left after window {window}, as it asked"))?;
            }
        }
        Ok(())
    }

    /// Tells `rank` to stop and forgets it.
    pub(super) fn stop(&mut self, rank: usize, reason: &str) -> Result<(), TrainError> {
        self.send_stop(rank)?;
        let stage = self.miners.remove(&rank);
        self.depart(rank);
        eprintln!(
            "orchestrator: miner {rank} of stage {} {reason}",
            stage.map_or("-".to_string(), |s| s.to_string())
        );
        Ok(())
    }

    /// `Stop` to `rank`; one already gone needs no telling.
    pub(super) fn send_stop(&self, rank: usize) -> Result<(), TrainError> {
        match self
            .t
            .send(rank, protocol::ORDER_TAG, &protocol::encode(&Order::Stop))
        {
            Ok(()) | Err(TransportError::PeerLost { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// `rank` is out of the job for good: no more orders, no route, and
    /// joiners no longer dial it.
    pub(super) fn depart(&mut self, rank: usize) {
        self.listeners.remove(&rank);
        self.joining.remove(&rank);
        self.leaving.remove(&rank);
        self.router.remove(rank);
        self.departed.insert(rank);
        if let Some(m) = &self.membership {
            m.remove(rank);
        }
    }

    /// " (site NAME)" for a joiner the door knows.
    fn site_of(&self, rank: usize) -> String {
        self.membership
            .as_ref()
            .and_then(|m| m.peer(rank))
            .map_or_else(String::new, |p| format!(" (site {})", p.site))
    }
}
