//! Deadlines that follow observed times instead of a setting a user must
//! guess.
//!
//! A deadline is a high quantile of the recent durations of one kind of
//! wait, times a margin, never under a floor; until a few durations are
//! seen, a generous start value. A fixed timeout is either too tight for a
//! slow host or leaves a stopped peer holding the run for minutes (Psyche's
//! round time and hivemind's timeouts are settings, and their users ask
//! for this instead).

use std::collections::VecDeque;
use std::time::Duration;

/// How an [`AdaptiveDeadline`] turns durations into a deadline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeadlineRule {
    /// Which quantile of the recent durations, in `0..=1`.
    pub quantile: f64,
    /// How many times that quantile may pass before the wait is overdue.
    pub margin: f64,
    /// Seconds the deadline never goes under: scheduling noise on a
    /// loaded host is not a fault.
    pub floor_s: f64,
    /// Seconds before `min_samples` durations were seen.
    pub initial_s: f64,
    /// How many recent durations are kept (older ones are forgotten, so a
    /// run that speeds up or slows down is followed).
    pub keep: usize,
    pub min_samples: usize,
}

/// Recent durations of one kind and the deadline they give.
#[derive(Debug, Clone)]
pub struct AdaptiveDeadline {
    rule: DeadlineRule,
    recent: VecDeque<f64>,
}

impl AdaptiveDeadline {
    pub fn new(rule: DeadlineRule) -> AdaptiveDeadline {
        AdaptiveDeadline {
            rule,
            recent: VecDeque::with_capacity(rule.keep),
        }
    }

    /// One more duration, in seconds; not-a-number and negative ones are
    /// ignored.
    pub fn observe(&mut self, seconds: f64) {
        if !(seconds >= 0.0 && seconds.is_finite()) {
            return;
        }
        if self.recent.len() == self.rule.keep {
            self.recent.pop_front();
        }
        self.recent.push_back(seconds);
    }

    /// The deadline now, in seconds.
    pub fn seconds(&self) -> f64 {
        let r = &self.rule;
        if self.recent.len() < r.min_samples.max(1) {
            return r.initial_s.max(r.floor_s);
        }
        let mut sorted: Vec<f64> = self.recent.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        // Nearest rank: the smallest duration with at least `quantile` of
        // them at or below it.
        let rank = (r.quantile * sorted.len() as f64).ceil() as usize;
        let q = sorted[rank.clamp(1, sorted.len()) - 1];
        (q * r.margin).max(r.floor_s)
    }

    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: DeadlineRule = DeadlineRule {
        quantile: 0.9,
        margin: 3.0,
        floor_s: 0.5,
        initial_s: 60.0,
        keep: 10,
        min_samples: 4,
    };

    #[test]
    fn before_enough_durations_the_start_value_holds() {
        let mut d = AdaptiveDeadline::new(RULE);
        assert_eq!(d.seconds(), 60.0);
        for _ in 0..3 {
            d.observe(1.0);
        }
        assert_eq!(d.seconds(), 60.0);
        d.observe(1.0);
        assert_eq!(d.seconds(), 3.0);
    }

    #[test]
    fn the_deadline_is_the_quantile_times_the_margin_above_the_floor() {
        let mut d = AdaptiveDeadline::new(RULE);
        for s in 1..=10 {
            d.observe(f64::from(s));
        }
        // The 0.9 quantile of 1..=10 is 9.
        assert_eq!(d.seconds(), 27.0);
        let mut fast = AdaptiveDeadline::new(RULE);
        (0..10).for_each(|_| fast.observe(0.01));
        assert_eq!(fast.seconds(), 0.5);
    }

    #[test]
    fn old_durations_are_forgotten_so_a_slower_run_is_followed() {
        let mut d = AdaptiveDeadline::new(RULE);
        (0..10).for_each(|_| d.observe(1.0));
        (0..10).for_each(|_| d.observe(5.0));
        assert_eq!(d.seconds(), 15.0);
    }

    #[test]
    fn nonsense_durations_are_ignored() {
        let mut d = AdaptiveDeadline::new(RULE);
        for s in [f64::NAN, -1.0, f64::INFINITY, 2.0, 2.0, 2.0, 2.0] {
            d.observe(s);
        }
        assert_eq!(d.seconds(), 6.0);
    }
}
