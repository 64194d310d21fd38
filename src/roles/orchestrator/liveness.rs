//! Telling a stopped rank from a slow one.
//!
//! When no rank has reported anything for the progress deadline, the
//! orchestrator pings every rank still in the job. Every miner and
//! validator answers from a thread of its own
//! ([`crate::roles::liveness`]), so a slow or waiting rank answers at once;
//! one that does not answer within the answer deadline is stopped, frozen
//! or cut off with its connections open. It is evicted like a lost rank:
//! a miner's window is redone without it and it is credited nothing of
//! the attempt, a validator's checks go to the others. When every rank
//! answers, nobody is pinged again for another progress deadline:
//! slowness is for routing to handle, not eviction.
//!
//! Both deadlines follow what the run shows ([`AdaptiveDeadline`]): the
//! progress deadline a high quantile of recent gaps between reports, the
//! answer deadline one of recent ping round trips; each times a margin,
//! above a floor. Pinging costs a message per rank and is harmless, so the
//! progress deadline may be tight; only the answer deadline evicts.

use std::time::Instant;

use super::machine::{Coordinator, Happened, Output, Phase};
use crate::deadline::{AdaptiveDeadline, DeadlineRule};
use crate::roles::protocol::Order;
use crate::roles::train::TrainError;

/// Gaps between reports: milliseconds to a second in a healthy run (a
/// pass, a replay, a checkpoint write), so three times the 95th percentile
/// is far outside one. The start value covers start-up and the first
/// window's warm-up.
const PROGRESS: DeadlineRule = DeadlineRule {
    quantile: 0.95,
    margin: 3.0,
    floor_s: 2.0,
    initial_s: 30.0,
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
    progress: AdaptiveDeadline,
    answer: AdaptiveDeadline,
    /// When a rank last reported something (or the job began).
    last_report: Option<Instant>,
    ping: Option<Ping>,
    /// No ping before this: the last round was answered in full.
    quiet_until: Option<Instant>,
    /// Ping at the next check, stalled or not: a rank was blamed.
    suspicious: bool,
    next_nonce: u64,
}

#[derive(Debug)]
struct Ping {
    nonce: u64,
    sent: Instant,
    waiting: Vec<usize>,
}

impl Default for Liveness {
    fn default() -> Liveness {
        Liveness {
            progress: AdaptiveDeadline::new(PROGRESS),
            answer: AdaptiveDeadline::new(ANSWER),
            last_report: None,
            ping: None,
            quiet_until: None,
            suspicious: false,
            next_nonce: 1,
        }
    }
}

impl Liveness {
    /// A rank reported something (not a ping's answer) at `now`.
    pub fn reported(&mut self, now: Instant) {
        if let Some(last) = self.last_report {
            self.progress
                .observe(now.saturating_duration_since(last).as_secs_f64());
        }
        self.last_report = Some(now);
    }

    /// `rank` answered the ping `nonce` at `now`.
    pub fn answered(&mut self, rank: usize, nonce: u64, now: Instant) {
        let Some(ping) = self.ping.as_mut().filter(|p| p.nonce == nonce) else {
            return;
        };
        let before = ping.waiting.len();
        ping.waiting.retain(|&r| r != rank);
        if ping.waiting.len() < before {
            let took = now.saturating_duration_since(ping.sent);
            self.answer.observe(took.as_secs_f64());
        }
        if ping.waiting.is_empty() {
            self.ping = None;
            self.quiet_until = Some(now + self.progress.duration());
        }
    }

    /// A peer blamed another for silence: ping everyone at the next check.
    pub fn suspect(&mut self) {
        self.suspicious = true;
        self.quiet_until = None;
    }

    /// Ranks pinged and silent past the answer deadline; the ping is over.
    fn silent(&mut self, now: Instant) -> Vec<usize> {
        let deadline = self.answer.duration();
        match &self.ping {
            Some(p) if now.saturating_duration_since(p.sent) > deadline => {
                self.ping.take().map(|p| p.waiting).unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }

    /// A ping of the ranks `everyone` lists when nothing was reported for
    /// the progress deadline (or a rank was blamed), no ping is in flight
    /// and the last round was not answered too recently: the ranks and
    /// the nonce. `everyone` is called only then: with thousands of
    /// miners, listing them on every report made the orchestrator's
    /// bookkeeping quadratic in the swarm.
    fn ping(
        &mut self,
        everyone: impl FnOnce() -> Vec<usize>,
        now: Instant,
    ) -> Option<(Vec<usize>, u64)> {
        let since = self.last_report.get_or_insert(now);
        let stalled = now.saturating_duration_since(*since) > self.progress.duration();
        let quiet = self.quiet_until.is_some_and(|t| now < t);
        if !(stalled || self.suspicious) || quiet || self.ping.is_some() {
            return None;
        }
        let ranks = everyone();
        if ranks.is_empty() {
            return None;
        }
        self.suspicious = false;
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        self.ping = Some(Ping {
            nonce,
            sent: now,
            waiting: ranks.clone(),
        });
        Some((ranks, nonce))
    }

    /// The two deadlines now, in seconds: progress, answer.
    pub fn seconds(&self) -> (f64, f64) {
        (self.progress.seconds(), self.answer.seconds())
    }
}

impl Coordinator<'_> {
    /// Evicts ranks silent past the answer deadline, then pings everyone
    /// when nothing has been reported for the progress deadline.
    pub(super) fn check_liveness(&mut self, now: Instant) -> Result<(), TrainError> {
        if matches!(self.phase, Phase::Finished) {
            return Ok(());
        }
        let answer_s = self.liveness.answer.seconds();
        for rank in self.liveness.silent(now) {
            if self.departed.contains(&rank) {
                continue;
            }
            self.say_about(
                Happened::Evicted,
                rank,
                format!(
                    "orchestrator: rank {rank} answered no liveness ping in {answer_s:.1} s \
                     (stopped, frozen or cut off); evicting it"
                ),
            );
            // Should it come back (SIGCONT, a healed path), the first
            // thing it reads is that it is done: under mpirun or srun no
            // launcher of ours would end it.
            self.push(Output::Send(vec![rank], Order::Stop));
            self.on_lost(rank, "evicted: no answer to a liveness ping")?;
        }
        let listeners = &self.listeners;
        if let Some((everyone, nonce)) = self
            .liveness
            .ping(|| listeners.iter().copied().collect(), now)
        {
            self.push(Output::Ping(everyone, nonce));
        }
        Ok(())
    }
}
