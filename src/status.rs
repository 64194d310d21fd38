//! The live status page: who is in the run, on which stage, how fast, who
//! was caught, and how the loss goes, as the orchestrator sees it.
//!
//! [`StatusBoard`] keeps that as plain data and renders it as JSON
//! (`/status.json`); [`PAGE`] is one HTML file with its script inline
//! that fetches the JSON every second and draws it. Nothing comes from
//! elsewhere (no CDN, no fonts, no build step), so the page works on a
//! cluster network with no way out.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use serde::Serialize;

use crate::ledger::Tally;
use crate::prometheus::Tallies;
use crate::roles::{MemberState, WindowReport};

/// The page, served at `/`.
pub const PAGE: &str = include_str!("status.html");

/// Windows kept for the curves: the page draws the newest this many.
const CURVE_POINTS: usize = 4096;
/// Event lines kept for the page.
const EVENTS_KEPT: usize = 64;

/// What the page shows, rebuilt from every window and event.
#[derive(Debug)]
pub struct StatusBoard {
    job: String,
    stages: usize,
    windows: u64,
    started: Instant,
    curve: VecDeque<Point>,
    members: BTreeMap<usize, Seen>,
    events: VecDeque<Event>,
}

/// One window on the curves.
#[derive(Debug, Clone, Serialize)]
struct Point {
    window: u64,
    loss: f32,
    val_loss: Option<f32>,
    tokens_per_s: f64,
    bubble: f64,
}

/// A rank as last seen: from the window's roster while it is in the job,
/// kept with why it went once it is gone.
#[derive(Debug, Clone)]
struct Seen {
    stage: Option<usize>,
    validator: bool,
    site: Option<String>,
    host: Option<String>,
    standing: Standing,
    /// Its share of its stage's credited passes in the last window, times
    /// the window's tokens/s: the tokens/s it carried.
    tokens_per_s: f64,
}

/// Where a rank the page has seen stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// In the job, as the last roster had it.
    In(MemberState),
    /// Gone after asking to leave.
    Left,
    /// Gone without asking (crashed, cut off, evicted).
    Lost,
    /// Excluded for failing a check.
    Caught,
}

impl Standing {
    fn name(self) -> &'static str {
        match self {
            Standing::In(state) => state.name(),
            Standing::Left => "left",
            Standing::Lost => "lost",
            Standing::Caught => "caught",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Event {
    /// Seconds since the board started.
    at_s: f64,
    line: String,
    warning: bool,
}

/// A rank as the page gets it.
#[derive(Debug, Serialize)]
struct MemberView<'a> {
    rank: usize,
    role: &'static str,
    stage: Option<usize>,
    site: Option<&'a str>,
    host: Option<&'a str>,
    state: &'static str,
    tokens_per_s: f64,
    passes: u64,
    failed: u64,
    /// Its share of every miner's credited passes so far.
    credit_share: f64,
}

#[derive(Debug, Serialize)]
struct View<'a> {
    job: &'a str,
    stages: usize,
    windows: u64,
    elapsed_s: f64,
    curve: &'a VecDeque<Point>,
    members: Vec<MemberView<'a>>,
    events: &'a VecDeque<Event>,
}

impl StatusBoard {
    /// A board for job `job` of `stages` stages and `windows` windows.
    pub fn new(job: &str, stages: usize, windows: u64) -> StatusBoard {
        StatusBoard {
            job: job.to_string(),
            stages,
            windows,
            started: Instant::now(),
            curve: VecDeque::new(),
            members: BTreeMap::new(),
            events: VecDeque::new(),
        }
    }

    /// Counts window `w` in; `host_of` names a rank's host when the board
    /// does not know it yet.
    pub fn record_window(&mut self, w: &WindowReport, host_of: impl Fn(usize) -> Option<String>) {
        if self.curve.len() == CURVE_POINTS {
            self.curve.pop_front();
        }
        self.curve.push_back(Point {
            window: w.window,
            loss: w.mean_loss,
            val_loss: w.val_loss,
            tokens_per_s: w.tokens_per_s,
            bubble: w.bubble,
        });
        let mut stage_passes = vec![0u64; self.stages];
        for t in &w.credits {
            if let Some(n) = stage_passes.get_mut(t.stage) {
                *n += t.verified;
            }
        }
        // By rank, once: a swarm has thousands of miners.
        let credits: BTreeMap<usize, &Tally> = w.credits.iter().map(|t| (t.rank, t)).collect();
        let in_roster: BTreeSet<usize> = w.roster.iter().map(|m| m.rank).collect();
        let carried = |rank: usize| -> f64 {
            credits
                .get(&rank)
                .map_or(0.0, |t| match stage_passes.get(t.stage) {
                    Some(&all) if all > 0 => w.tokens_per_s * t.verified as f64 / all as f64,
                    _ => 0.0,
                })
        };
        // Ranks gone since the last window: caught, left when asked, or lost.
        for (rank, seen) in &mut self.members {
            let Standing::In(state) = seen.standing else {
                continue;
            };
            if !in_roster.contains(rank) {
                seen.standing = match state {
                    MemberState::Leaving => Standing::Left,
                    _ => Standing::Lost,
                };
                seen.tokens_per_s = 0.0;
            }
        }
        for m in &w.roster {
            let host = self
                .members
                .get(&m.rank)
                .and_then(|s| s.host.clone())
                .or_else(|| host_of(m.rank));
            self.members.insert(
                m.rank,
                Seen {
                    stage: m.stage,
                    validator: m.validator,
                    site: m.site.clone(),
                    host,
                    standing: Standing::In(m.state),
                    tokens_per_s: carried(m.rank),
                },
            );
        }
        for rank in &w.caught {
            if let Some(seen) = self.members.get_mut(rank) {
                seen.standing = Standing::Caught;
                seen.tokens_per_s = 0.0;
            }
        }
    }

    /// Keeps an event line (a join, a loss, an exclusion) for the page.
    pub fn record_event(&mut self, line: &str, warning: bool) {
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(Event {
            at_s: self.started.elapsed().as_secs_f64(),
            line: line.to_string(),
            warning,
        });
    }

    /// The JSON the page draws, with each miner's credits from `tallies`.
    pub fn render(&self, tallies: &Tallies) -> String {
        let all: u64 = tallies.miners().values().map(|t| t.verified).sum();
        let members = self
            .members
            .iter()
            .map(|(&rank, seen)| {
                let totals = tallies.miners().get(&rank).copied().unwrap_or_default();
                MemberView {
                    rank,
                    role: if seen.validator { "validator" } else { "miner" },
                    stage: seen.stage,
                    site: seen.site.as_deref(),
                    host: seen.host.as_deref(),
                    state: seen.standing.name(),
                    tokens_per_s: seen.tokens_per_s,
                    passes: totals.verified,
                    failed: totals.failed,
                    credit_share: if all > 0 {
                        totals.verified as f64 / all as f64
                    } else {
                        0.0
                    },
                }
            })
            .collect();
        let view = View {
            job: &self.job,
            stages: self.stages,
            windows: self.windows,
            elapsed_s: self.started.elapsed().as_secs_f64(),
            curve: &self.curve,
            members,
            events: &self.events,
        };
        // Plain data with string keys: serializing cannot fail.
        serde_json::to_string(&view).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Tally;
    use crate::roles::Member;

    fn member(rank: usize, stage: Option<usize>, state: MemberState) -> Member {
        Member {
            rank,
            stage,
            validator: stage.is_none() && state == MemberState::Serving,
            site: Some("local".into()),
            state,
        }
    }

    fn tally(rank: usize, stage: usize, verified: u64) -> Tally {
        Tally {
            rank,
            stage,
            verified,
            failed: 0,
        }
    }

    fn window(
        n: u64,
        roster: Vec<Member>,
        credits: Vec<Tally>,
        caught: Vec<usize>,
    ) -> WindowReport {
        WindowReport {
            mean_loss: 3.0 - n as f32 * 0.1,
            tokens_per_s: 1200.0,
            bubble: 0.5,
            caught,
            credits,
            roster,
            ..WindowReport::quiet(n)
        }
    }

    fn members(json: &str) -> Vec<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        v["members"].as_array().unwrap().clone()
    }

    #[test]
    fn miners_carry_their_share_of_their_stage_and_the_gone_keep_why() {
        let mut board = StatusBoard::new("t", 2, 10);
        let mut tallies = Tallies::default();
        let roster = vec![
            member(1, None, MemberState::Serving),
            member(2, Some(0), MemberState::Serving),
            member(3, Some(0), MemberState::Leaving),
            member(4, Some(1), MemberState::Serving),
            member(5, Some(1), MemberState::Serving),
        ];
        let credits = vec![
            tally(2, 0, 3),
            tally(3, 0, 1),
            tally(4, 1, 2),
            tally(5, 1, 2),
        ];
        let w0 = window(0, roster.clone(), credits, vec![]);
        tallies.record(&w0);
        board.record_window(&w0, |r| Some(format!("host{r}")));
        let m = members(&board.render(&tallies));
        assert_eq!(m.len(), 5);
        assert_eq!(m[0]["role"], "validator");
        assert_eq!(m[1]["tokens_per_s"], 900.0);
        assert_eq!(m[2]["state"], "leaving");
        assert_eq!(m[3]["host"], "host4");
        assert_eq!(m[3]["credit_share"], 0.25);

        // Rank 3 left as asked, rank 5 was caught, rank 4 vanished.
        let roster = vec![roster[0].clone(), roster[1].clone(), roster[4].clone()];
        let w1 = window(1, roster, vec![tally(2, 0, 4), tally(5, 1, 0)], vec![5]);
        tallies.record(&w1);
        board.record_window(&w1, |_| None);
        let m = members(&board.render(&tallies));
        let state = |rank: usize| m.iter().find(|x| x["rank"] == rank).unwrap()["state"].clone();
        assert_eq!(state(3), "left");
        assert_eq!(state(4), "lost");
        assert_eq!(state(5), "caught");
        assert_eq!(state(2), "serving");
        assert_eq!(m[1]["passes"], 7);
        assert_eq!(m[1]["host"], "host2", "a host once known is kept");
    }

    #[test]
    fn the_board_keeps_the_newest_events_and_points() {
        let mut board = StatusBoard::new("t", 1, 10);
        for i in 0..EVENTS_KEPT + 3 {
            board.record_event(&format!("event {i}"), i % 2 == 0);
        }
        let v: serde_json::Value =
            serde_json::from_str(&board.render(&Tallies::default())).unwrap();
        let events = v["events"].as_array().unwrap();
        assert_eq!(events.len(), EVENTS_KEPT);
        assert_eq!(events[0]["line"], "event 3");
        assert_eq!(v["job"], "t");
        assert_eq!(v["windows"], 10);
    }
}
