//! Telling a stopped miner from a slow one while a window serves.
//!
//! A microbatch running longer than the serving deadline makes the
//! orchestrator ping the miners on its path whose stage has not reported
//! it. Every miner answers from a thread of its own
//! ([`crate::roles::liveness`]), so a slow or waiting miner answers at
//! once; one that does not answer within the answer deadline is stopped,
//! frozen or cut off with its connections open. It is evicted like a lost
//! miner: its microbatches are redone by the others and it is credited
//! nothing of the attempt. A miner that answers is left alone for another
//! serving deadline: slowness is for routing to handle, not eviction.
//!
//! Both deadlines follow what the run shows ([`AdaptiveDeadline`]): the
//! serving deadline a high quantile of recent microbatch latencies (route
//! to last stage reported), the answer deadline one of recent ping round
//! trips; each times a margin, above a floor.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use super::machine::{Coordinator, Output, Phase};
use crate::deadline::{AdaptiveDeadline, DeadlineRule};
use crate::roles::train::TrainError;

/// Microbatch latencies: a microbatch's latency includes its wait behind
/// the others its miners serve, so the high quantile is about a whole
/// serving phase, and three of those is far outside any healthy run. The
/// start value covers the first window's warm-up.
const SERVING: DeadlineRule = DeadlineRule {
    quantile: 0.95,
    margin: 3.0,
    floor_s: 2.0,
    initial_s: 60.0,
    keep: 256,
    min_samples: 8,
};

/// Ping round trips: milliseconds when the answering thread runs at all,
/// so the floor, room for a loaded host's scheduling, is what counts.
const ANSWER: DeadlineRule = DeadlineRule {
    quantile: 0.95,
    margin: 10.0,
    floor_s: 2.0,
    initial_s: 5.0,
    keep: 64,
    min_samples: 4,
};

/// Deadlines and the ping in flight.
#[derive(Debug)]
pub(super) struct Liveness {
    pub serving: AdaptiveDeadline,
    pub answer: AdaptiveDeadline,
    /// When each running microbatch was routed.
    routed: BTreeMap<u64, Instant>,
    ping: Option<Ping>,
    /// No ping before this: the last round was answered in full.
    quiet_until: Option<Instant>,
    next_nonce: u64,
}

#[derive(Debug)]
struct Ping {
    nonce: u64,
    sent: Instant,
    waiting: BTreeSet<usize>,
}

impl Default for Liveness {
    fn default() -> Liveness {
        Liveness {
            serving: AdaptiveDeadline::new(SERVING),
            answer: AdaptiveDeadline::new(ANSWER),
            routed: BTreeMap::new(),
            ping: None,
            quiet_until: None,
            next_nonce: 1,
        }
    }
}

impl Liveness {
    /// `ids` were routed at `now`.
    pub fn routed(&mut self, ids: impl IntoIterator<Item = u64>, now: Instant) {
        self.routed.extend(ids.into_iter().map(|id| (id, now)));
    }

    /// Microbatch `id` was served by every stage at `now`.
    pub fn finished(&mut self, id: u64, now: Instant) {
        if let Some(at) = self.routed.remove(&id) {
            self.serving
                .observe(now.saturating_duration_since(at).as_secs_f64());
        }
    }

    /// The attempt is over: nothing runs, nobody is waited on.
    pub fn reset(&mut self) {
        self.routed.clear();
        self.ping = None;
        self.quiet_until = None;
    }

    /// `rank` answered the ping `nonce` at `now`.
    pub fn answered(&mut self, rank: usize, nonce: u64, now: Instant) {
        let Some(ping) = self.ping.as_mut().filter(|p| p.nonce == nonce) else {
            return;
        };
        if ping.waiting.remove(&rank) {
            let took = now.saturating_duration_since(ping.sent);
            self.answer.observe(took.as_secs_f64());
        }
        if ping.waiting.is_empty() {
            self.ping = None;
            self.quiet_until = Some(now + self.serving.duration());
        }
    }

    /// Running microbatches routed longer than the serving deadline ago.
    fn overdue(&self, now: Instant) -> impl Iterator<Item = u64> + '_ {
        let deadline = self.serving.duration();
        self.routed
            .iter()
            .filter(move |(_, at)| now.saturating_duration_since(**at) > deadline)
            .map(|(id, _)| *id)
    }

    /// Ranks pinged and silent past the answer deadline; the ping is over.
    fn silent(&mut self, now: Instant) -> Vec<usize> {
        let deadline = self.answer.duration();
        match &self.ping {
            Some(p) if now.saturating_duration_since(p.sent) > deadline => {
                let silent = p.waiting.iter().copied().collect();
                self.ping = None;
                silent
            }
            _ => Vec::new(),
        }
    }

    /// A new ping of `ranks` at `now`, unless one is in flight or the last
    /// round was answered too recently; its nonce.
    fn ping(&mut self, ranks: BTreeSet<usize>, now: Instant) -> Option<u64> {
        let quiet = self.quiet_until.is_some_and(|t| now < t);
        if ranks.is_empty() || self.ping.is_some() || quiet {
            return None;
        }
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        self.ping = Some(Ping {
            nonce,
            sent: now,
            waiting: ranks,
        });
        Some(nonce)
    }

    /// The two deadlines now, in seconds: serving, answer.
    pub fn seconds(&self) -> (f64, f64) {
        (self.serving.seconds(), self.answer.seconds())
    }
}

impl Coordinator<'_> {
    /// Evicts miners silent past the answer deadline, then pings the
    /// miners holding up overdue microbatches.
    pub(super) fn check_liveness(&mut self, now: Instant) -> Result<(), TrainError> {
        if !matches!(self.phase, Phase::Serving { .. }) {
            self.liveness.reset();
            return Ok(());
        }
        let answer_s = self.liveness.answer.seconds();
        for rank in self.liveness.silent(now) {
            if !self.miners.contains_key(&rank) {
                continue;
            }
            self.say_warn(format!(
                "orchestrator: miner {rank} answered no liveness ping in {answer_s:.1} s \
                 (stopped, frozen or cut off); evicting it"
            ));
            self.on_lost(rank, "evicted: no answer to a liveness ping")?;
        }
        let suspects = self.holding_up(now);
        if let Some(nonce) = self.liveness.ping(suspects.clone(), now) {
            self.push(Output::Ping(suspects.into_iter().collect(), nonce));
        }
        Ok(())
    }

    /// The miners on the paths of overdue microbatches whose stage has
    /// not reported them.
    fn holding_up(&self, now: Instant) -> BTreeSet<usize> {
        let (Phase::Serving { served }, Some(w)) = (&self.phase, &self.window) else {
            return BTreeSet::new();
        };
        let mut suspects = BTreeSet::new();
        for id in self.liveness.overdue(now) {
            let Some(path) = w.flight.path(id) else {
                continue;
            };
            let reported = served.get(&id);
            suspects.extend(
                path.iter()
                    .enumerate()
                    .filter(|(stage, _)| reported.is_none_or(|s| !s.contains(stage)))
                    .map(|(_, rank)| *rank)
                    .filter(|rank| self.miners.contains_key(rank)),
            );
        }
        suspects
    }
}
