//! The orchestrator's state machine driven without processes: simulated
//! ranks answer its orders the way miners and validators do, and the tests
//! steer what they say (a loss, a join, a leave, a wrong replay) to check
//! what the orchestrator decides. No sockets, no clock: time is an
//! `Instant` the test moves by hand.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use super::machine::{Beginning, Coordinator, Input};
use super::sim::{Script, Seen, Sim};
use super::StartPoint;
use crate::config::{self, JobSpec};
use crate::pipeline::Router;
use crate::roles::protocol::{self, AuditTask, Order};
use crate::roles::train::{miners_of, Deadlines, Setup, TrainError};

/// Rank 0 orchestrates, rank 1 validates, ranks 2..6 mine two stages;
/// `roles` goes into `[roles]`.
fn spec(roles: &str) -> JobSpec {
    config::parse(&spec_text(roles), Path::new("unit.toml")).expect("the unit job parses")
}

/// [`spec`]'s job file.
fn spec_text(roles: &str) -> String {
    format!(
        "[job]\nname = \"unit\"\ntask = \"train\"\nseed = 3\n\n\
         [model]\nn_layer = 2\nn_head = 2\nn_embd = 16\nblock_size = 8\n\n\
         [pipeline]\nstages = 2\nmicrobatch_size = 2\nmicrobatches_per_window = 6\n\n\
         [roles]\nvalidators = 1\n{roles}\n\
         [[site]]\nname = \"local\"\nhosts = \"localhost\"\nranks_per_host = 6\n\n\
         [network]\nrendezvous = \"tcp://127.0.0.1:0\"\n\n\
         [train]\nwindows = 3\neval_every = 2\neval_microbatches = 1\ncheckpoint_every = 2\n"
    )
}

/// The `Run` orders of `window`, as (attempt, routes' paths).
fn runs(seen: &Seen, window: u64) -> Vec<(u32, Vec<Vec<usize>>)> {
    seen.orders
        .iter()
        .filter_map(|(_, o)| match o {
            Order::Run {
                window: w,
                attempt,
                routes,
            } if *w == window => Some((*attempt, routes.iter().map(|r| r.path.clone()).collect())),
            _ => None,
        })
        .collect()
}

/// The miners of each stage in the `Close` orders of `window`.
fn closes(seen: &Seen, window: u64) -> Vec<Vec<Vec<usize>>> {
    seen.orders
        .iter()
        .filter_map(|(_, o)| match o {
            Order::Close {
                window: w, stages, ..
            } if *w == window => Some(stages.clone()),
            _ => None,
        })
        .collect()
}

/// Every training pass of every window, counted once per stage.
fn credited(seen: &Seen) -> BTreeMap<usize, u64> {
    let mut per_miner = BTreeMap::new();
    for (_, tallies) in &seen.ledger {
        for t in tallies {
            *per_miner.entry(t.rank).or_default() += t.verified;
        }
    }
    per_miner
}

#[test]
fn an_undisturbed_run_serves_every_microbatch_once_per_stage_and_commits_due_checkpoints() {
    let spec = spec("");
    let seen = Sim::finished(&spec, Script::default());
    assert!(seen.done);
    assert_eq!(
        seen.windows
            .iter()
            .map(|(w, a, _)| (*w, *a))
            .collect::<Vec<_>>(),
        [(0, 1), (1, 1), (2, 1)]
    );
    // 6 training microbatches x 2 stages per window, all credited.
    assert_eq!(credited(&seen).values().sum::<u64>(), 3 * 6 * 2);
    for window in 0..3 {
        let runs = runs(&seen, window);
        assert_eq!(runs.len(), 1, "window {window}: {runs:?}");
        for path in &runs[0].1 {
            assert!([2, 3, 4, 5].contains(&path[0]) && [2, 3, 4, 5].contains(&path[1]));
        }
    }
    // checkpoint_every = 2, and the last window.
    assert_eq!(seen.commits, [1, 2]);
    assert!(matches!(seen.orders.last(), Some((_, Order::Stop))));
}

#[test]
fn a_miner_lost_while_serving_has_its_window_redone_without_it_and_is_never_credited_there() {
    let spec = spec("");
    let seen = Sim::finished(
        &spec,
        Script {
            lose: Some((1, 3)),
            ..Script::default()
        },
    );
    let runs = runs(&seen, 1);
    assert_eq!(runs.iter().map(|(a, _)| *a).collect::<Vec<_>>(), [0, 1]);
    for path in &runs[1].1 {
        assert!(
            !path.contains(&3),
            "attempt 1 routes through the lost miner: {path:?}"
        );
    }
    assert!(closes(&seen, 1)
        .iter()
        .all(|stages| stages.iter().all(|s| !s.contains(&3))));
    let (_, tallies) = seen.ledger.iter().find(|(w, _)| *w == 1).unwrap();
    assert!(tallies.iter().all(|t| t.rank != 3), "{tallies:?}");
    assert_eq!(tallies.iter().map(|t| t.verified).sum::<u64>(), 6 * 2);
    assert_eq!(seen.departed, [3]);
    assert_eq!(seen.windows[1].1, 2, "window 1 took two attempts");
}

#[test]
fn a_validator_lost_while_replays_drawn_mid_window_are_owed_has_the_window_redone() {
    // Every pass drawn as its microbatch finishes; validator 1 is lost
    // after four of window 1's reports, its verdicts never come.
    let spec = spec("replay_rate = 1.0");
    let seen = Sim::finished(
        &spec,
        Script {
            lose_midway: Some((1, 1, 4)),
            ..Script::default()
        },
    );
    assert!(seen.done, "the run finished");
    let runs = runs(&seen, 1);
    assert_eq!(runs.iter().map(|(a, _)| *a).collect::<Vec<_>>(), [0, 1]);
    assert!(audit_orders(&seen, 1)
        .iter()
        .any(|(attempt, _)| *attempt == 0));
    assert_eq!(seen.departed, [1]);
}

#[test]
fn a_miner_that_asks_to_leave_finishes_its_window_and_goes_without_a_redo() {
    let spec = spec("");
    let seen = Sim::finished(
        &spec,
        Script {
            leave: Some((1, 4)),
            ..Script::default()
        },
    );
    assert_eq!(
        runs(&seen, 1).len(),
        1,
        "no window is redone for a polite leave"
    );
    assert!(closes(&seen, 1)[0].iter().any(|s| s.contains(&4)));
    assert!(seen
        .orders
        .iter()
        .any(|(to, o)| *to == [4] && *o == Order::Stop));
    assert!(closes(&seen, 2)[0].iter().all(|s| !s.contains(&4)));
    assert!(runs(&seen, 2)[0].1.iter().all(|path| !path.contains(&4)));
    assert_eq!(seen.departed, [4]);
}

#[test]
fn a_rank_that_joins_is_placed_at_the_next_boundary_with_its_stage_s_digests_and_mines() {
    let spec = spec("");
    let seen = Sim::finished(
        &spec,
        Script {
            join: Some((0, vec![6])),
            ..Script::default()
        },
    );
    let places: Vec<_> = seen
        .orders
        .iter()
        .filter_map(|(_, o)| match o {
            Order::Place {
                window, placements, ..
            } => Some((*window, placements.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(places.len(), 1, "{places:?}");
    let (window, placements) = &places[0];
    assert_eq!(
        *window, 1,
        "placed at the boundary after the window it joined in"
    );
    let p = &placements[0];
    assert_eq!(p.rank, 6);
    // The digests the stage agreed on after window 0's step, from the
    // stage's miners.
    assert_eq!(p.weights, format!("w0-{}", p.stage));
    assert_eq!(p.optimizer, Some(format!("o0-{}", p.stage)));
    assert!(!p.sources.is_empty() && !p.sources.contains(&6));
    assert!(closes(&seen, 0)[0].iter().all(|s| !s.contains(&6)));
    assert!(closes(&seen, 1)[0][p.stage].contains(&6));
    assert!(
        credited(&seen).get(&6).is_some_and(|n| *n > 0),
        "{:?}",
        credited(&seen)
    );
    assert!(seen.windows.iter().all(|(_, attempts, _)| *attempts == 1));
}

#[test]
fn a_miner_whose_replay_fails_is_excluded_credited_nothing_and_its_window_redone() {
    // The validator's verdicts come before the miners' reductions, or
    // (its reports held back over two silences) well after them.
    for stall in [None, Some((0, 1, 2))] {
        a_caught_miner_is_excluded_and_never_stepped(stall);
    }
}

fn a_caught_miner_is_excluded_and_never_stepped(stall: Option<(u64, usize, u32)>) {
    let spec = spec("replay_rate = 1.0");
    let seen = Sim::finished(
        &spec,
        Script {
            cheater: Some(5),
            stall,
            ..Script::default()
        },
    );
    let runs = runs(&seen, 0);
    assert_eq!(runs.len(), 2, "window 0 is redone without the cheater");
    assert!(runs[1].1.iter().all(|path| !path.contains(&5)));
    assert!(seen
        .orders
        .iter()
        .any(|(to, o)| *to == [5] && *o == Order::Stop));
    assert_eq!(seen.departed, [5]);
    assert_eq!(seen.windows[0].2, [5], "the window line names it");
    let (_, tallies) = &seen.ledger[0];
    let cheater = tallies.iter().find(|t| t.rank == 5).unwrap();
    assert_eq!((cheater.verified, cheater.failed > 0), (0, true));
    assert!(!credited(&seen).contains_key(&5) || credited(&seen)[&5] == 0);
    // Everyone else is replayed and credited for every pass.
    assert_eq!(credited(&seen).values().sum::<u64>(), 3 * 6 * 2);
    // A pass trained again is replayed again, even where the same miner
    // served it before and passed: its new receipt is new work.
    let retrained: BTreeSet<(u64, usize)> = miners_of_passes(&seen, 0, 1).into_keys().collect();
    let replayed_again: BTreeSet<(u64, usize)> = audit_orders(&seen, 0)
        .into_iter()
        .filter(|(attempt, _)| *attempt == 1)
        .flat_map(|(_, passes)| passes)
        .collect();
    assert!(!retrained.is_empty());
    assert_eq!(replayed_again, retrained);
    // The close goes to the miners alone: validator 1, replaying beside
    // it, would take it for the orchestrator moving on.
    assert!(seen
        .orders
        .iter()
        .filter(|(_, o)| matches!(o, Order::Close { .. }))
        .all(|(to, _)| !to.is_empty() && !to.contains(&1)));
    // The replays, drawn as microbatches finish, run beside the serving
    // and the close; the close the cheater was in is thrown away, never
    // recomputed or stepped.
    let mut flow = flow(&seen, 0);
    flow.dedup();
    assert_eq!(
        flow,
        [
            ("run", 0),
            ("audit", 0),
            ("close", 0),
            ("run", 1),
            ("audit", 1),
            ("close", 1),
            ("recompute", 1),
            ("step", 1)
        ]
    );
}

/// The window orders of `window` in the order sent, as (kind, attempt).
fn flow(seen: &Seen, window: u64) -> Vec<(&'static str, u32)> {
    let kind = |o: &Order| match *o {
        Order::Run {
            window, attempt, ..
        } => Some(("run", window, attempt)),
        Order::Audit {
            window, attempt, ..
        } => Some(("audit", window, attempt)),
        Order::Close {
            window, attempt, ..
        } => Some(("close", window, attempt)),
        Order::Recompute {
            window, attempt, ..
        } => Some(("recompute", window, attempt)),
        Order::Step {
            window, attempt, ..
        } => Some(("step", window, attempt)),
        _ => None,
    };
    seen.orders
        .iter()
        .filter_map(|(_, o)| kind(o))
        .filter(|&(_, w, _)| w == window)
        .map(|(k, _, attempt)| (k, attempt))
        .collect()
}

/// The passes, (microbatch, stage), in the `Audit` orders of `window`.
fn audited(seen: &Seen, window: u64) -> Vec<(u64, usize)> {
    audit_orders(seen, window)
        .into_iter()
        .flat_map(|(_, passes)| passes)
        .collect()
}

/// Each `Audit` order of `window`: its attempt and the passes it names.
fn audit_orders(seen: &Seen, window: u64) -> Vec<(u32, Vec<(u64, usize)>)> {
    audit_tasks(seen, window)
        .into_iter()
        .map(|(attempt, tasks)| (attempt, tasks.iter().map(|t| (t.id, t.stage)).collect()))
        .collect()
}

/// Each `Audit` order of `window`, in the order sent: its attempt and its
/// tasks.
fn audit_tasks(seen: &Seen, window: u64) -> Vec<(u32, &[AuditTask])> {
    seen.orders
        .iter()
        .filter_map(|(_, o)| match o {
            Order::Audit {
                window: w,
                attempt,
                tasks,
                ..
            } if *w == window => Some((*attempt, &tasks[..])),
            _ => None,
        })
        .collect()
}

#[test]
fn a_validator_is_sent_a_stages_weights_once_an_attempt() {
    // Every pass replayed, by one validator, drawn microbatch by
    // microbatch; miner 5 is caught, so window 0 has a second attempt.
    let seen = Sim::finished(
        &spec("replay_rate = 1.0"),
        Script {
            cheater: Some(5),
            ..Script::default()
        },
    );
    for window in 0..3 {
        let mut sent: BTreeSet<(u32, usize, usize)> = BTreeSet::new();
        let mut held = 0;
        for (attempt, tasks) in audit_tasks(&seen, window) {
            // Held only where an earlier order of the attempt sent them:
            // the bundles of one order may be taken in any order.
            for t in tasks {
                let before = sent.contains(&(attempt, t.validator, t.stage));
                assert_eq!(t.weights_held, before, "window {window}: {t:?}");
                held += usize::from(t.weights_held);
            }
            sent.extend(tasks.iter().map(|t| (attempt, t.validator, t.stage)));
        }
        assert!(held > 0, "window {window}: every bundle had the weights");
        if window == 0 {
            let attempts: BTreeSet<u32> = sent.iter().map(|s| s.0).collect();
            assert_eq!(
                attempts,
                BTreeSet::from([0, 1]),
                "a new attempt sends them again"
            );
        }
    }
}

#[test]
fn passes_whose_stated_maxima_or_direction_stand_out_are_replayed_without_a_random_draw() {
    let outlier = || Script {
        outlier: Some(2),
        ..Script::default()
    };
    let flipped = || Script {
        flipped: Some(2),
        ..Script::default()
    };
    // Maxima come with the receipts, so their suspects are replayed
    // before the close; sketches come with the close, drawn with its seed,
    // so theirs after it.
    let before = [("run", 0), ("audit", 0), ("close", 0), ("recompute", 0)];
    let after = [("run", 0), ("close", 0), ("audit", 0), ("recompute", 0)];
    for (script, when) in [(outlier as fn() -> Script, before), (flipped, after)] {
        let seen = Sim::finished(&spec("replay_rate = 0.0"), script());
        assert_eq!(audited(&seen, 0), [(2, 0), (2, 1)]);
        assert_eq!(flow(&seen, 0)[..4], when);
        assert!(
            audited(&seen, 1).is_empty(),
            "honest receipts draw no replay"
        );

        let off = spec("replay_rate = 0.0\nsuspect_replays = 0");
        let seen = Sim::finished(&off, script());
        assert!(audited(&seen, 0).is_empty());
    }
}

/// Each miner serves 3 of its stage's 6 passes a window: a third is one
/// replay a window.
const ONE_PASS_IN_THREE: &str = "replay_rate = 0.3333333333333333";

/// The miner of each pass `(id, stage)` that `window`'s `Run` orders of
/// `attempt` route.
fn miners_of_passes(seen: &Seen, window: u64, attempt: u32) -> BTreeMap<(u64, usize), usize> {
    seen.orders
        .iter()
        .filter_map(|(_, o)| match o {
            Order::Run {
                window: w,
                attempt: a,
                routes,
            } if (*w, *a) == (window, attempt) => Some(routes),
            _ => None,
        })
        .flatten()
        .flat_map(|r| r.path.iter().enumerate().map(|(s, &m)| ((r.id, s), m)))
        .collect()
}

/// How many of its passes each miner served in `window`'s first attempt,
/// and how many of them were replayed.
fn replays_per_miner(seen: &Seen, window: u64) -> BTreeMap<usize, (usize, usize)> {
    let miners = miners_of_passes(seen, window, 0);
    let mut per_miner: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for &miner in miners.values() {
        per_miner.entry(miner).or_default().0 += 1;
    }
    for pass in audited(seen, window) {
        per_miner.entry(miners[&pass]).or_default().1 += 1;
    }
    per_miner
}

#[test]
fn a_suspect_is_replayed_and_every_miner_at_least_at_the_rates_floor() {
    let script = Script {
        outlier: Some(2),
        ..Script::default()
    };
    let seen = Sim::finished(&spec(ONE_PASS_IN_THREE), script);
    let replayed = audited(&seen, 0);
    assert!(
        replayed.contains(&(2, 0)) && replayed.contains(&(2, 1)),
        "{replayed:?}"
    );
    // A third of 3 passes: at least one each, drawn as they finish or
    // at the close where the draw fell short.
    let per_miner = replays_per_miner(&seen, 0);
    assert!(
        per_miner
            .values()
            .all(|&(served, replayed)| served == 3 && replayed >= 1),
        "{per_miner:?}"
    );
}

#[test]
fn a_suspect_by_its_sketch_is_replayed_after_the_close_and_the_rest_at_the_rates_floor() {
    let script = Script {
        flipped: Some(2),
        ..Script::default()
    };
    let seen = Sim::finished(&spec(ONE_PASS_IN_THREE), script);
    // Window 0: drawn replays, at least one a miner, before the close;
    // after it, those of microbatch 2's passes by their sketches the draw
    // did not pick.
    let orders: Vec<Vec<(u64, usize)>> = audit_orders(&seen, 0)
        .into_iter()
        .map(|(_, passes)| passes)
        .collect();
    let Some((by_sketch, drawn)) = orders.split_last() else {
        panic!("no replay orders in window 0");
    };
    let miners = miners_of_passes(&seen, 0, 0);
    let drawn_miners: BTreeSet<usize> = drawn.iter().flatten().map(|p| miners[p]).collect();
    assert_eq!(drawn_miners.len(), 4, "{orders:?}");
    assert!(!by_sketch.is_empty() && by_sketch.iter().all(|p| p.0 == 2));
    let owing: Vec<usize> = by_sketch.iter().map(|p| miners[p]).collect();
    // Window 1: a third of 3 or 4 passes is at least one replay a miner
    // that owes nothing (what one owes pays off its draws: see
    // `checks::tests`).
    let window1 = replays_per_miner(&seen, 1);
    for (miner, &(served, replayed)) in &window1 {
        let floor = served / 3 - usize::from(owing.contains(miner));
        assert!(replayed >= floor, "miner {miner}: {window1:?}");
    }
}

#[test]
fn miners_of_one_stage_that_step_to_different_weights_stop_the_run() {
    let spec = spec("");
    let (_, result) = Sim::run(
        &spec,
        Script {
            diverges: Some(2),
            ..Script::default()
        },
    );
    assert!(
        matches!(result, Err(TrainError::DigestMismatch { window: 0, .. })),
        "{result:?}"
    );
}

#[test]
fn silence_past_the_timeout_is_a_stall_and_silence_before_it_is_nothing() {
    let spec = spec("");
    let start = StartPoint {
        resumed: None,
        job_text: String::new(),
    };
    let plan = spec.plan(None).unwrap();
    let setup = Setup::new(&spec).unwrap();
    let mut c = Coordinator::new(
        &spec,
        &start,
        Beginning {
            router: Router::new(2, &miners_of(&plan), 3),
            setup,
            validators: vec![1],
            planned: plan.ranks.len(),
            weights: vec!["a".into(), "b".into()],
            optimizers: vec![None, None],
            seed: 1,
            modelled: None,
            timeout: Duration::from_secs(60),
            sites: BTreeMap::new(),
        },
    );
    let t0 = Instant::now();
    c.begin(t0).unwrap();
    assert!(c
        .on(Input::Silence, t0 + Duration::from_secs(59))
        .unwrap()
        .is_empty());
    let stalled = c.on(Input::Silence, t0 + Duration::from_secs(61));
    assert!(
        matches!(stalled, Err(TrainError::Stalled { .. })),
        "{stalled:?}"
    );
}

#[test]
fn microbatches_finished_before_a_miner_is_lost_are_kept_and_credited_unless_it_holds_them() {
    let spec = spec("");
    // Window 1's first Run: the first 3 microbatches come back whole from
    // both stages (6 reports), then miner 2 is lost.
    let seen = Sim::finished(
        &spec,
        Script {
            lose_midway: Some((1, 2, 6)),
            ..Script::default()
        },
    );
    let runs = runs(&seen, 1);
    assert_eq!(runs.len(), 2, "{runs:?}");
    let first: Vec<&Vec<usize>> = runs[0].1.iter().take(3).collect();
    let ids_of_attempt = |attempt: usize| -> Vec<u64> {
        seen.orders
            .iter()
            .filter_map(|(_, o)| match o {
                Order::Run {
                    window: 1,
                    attempt: a,
                    routes,
                } if *a as usize == attempt => {
                    Some(routes.iter().map(|r| r.id).collect::<Vec<_>>())
                }
                _ => None,
            })
            .flatten()
            .collect()
    };
    let (done, redone) = (ids_of_attempt(0), ids_of_attempt(1));
    let counted: Vec<(u64, Vec<usize>)> = seen
        .orders
        .iter()
        .find_map(|(_, o)| match o {
            Order::Close {
                window: 1, counted, ..
            } => Some(counted.iter().map(|r| (r.id, r.path.clone())).collect()),
            _ => None,
        })
        .unwrap();
    for (id, path) in done.iter().take(3).zip(&first) {
        if path.contains(&2) {
            // The lost miner held its gradients: it is served again.
            assert!(redone.contains(id), "{id} {path:?}");
        } else {
            // Finished elsewhere: kept as it was, and counted on its path.
            assert!(!redone.contains(id), "{id} {path:?} was redone");
            assert!(
                counted.contains(&(*id, (*path).clone())),
                "{id} {path:?}: {counted:?}"
            );
        }
    }
    // Nothing the lost miner did counts.
    assert!(counted.iter().all(|(_, path)| !path.contains(&2)));
    assert!(first.iter().any(|p| !p.contains(&2)), "the case is covered");
}

#[test]
fn a_stopped_miner_is_pinged_evicted_and_its_window_redone_without_it() {
    let spec = spec("");
    let seen = Sim::finished(
        &spec,
        Script {
            stop: Some((1, 3)),
            ..Script::default()
        },
    );
    assert!(seen.done);
    assert!(
        seen.pings.iter().any(|p| p.contains(&3)),
        "{:?}",
        seen.pings
    );
    assert_eq!(seen.departed, [3]);
    // Told to stop, should it ever read again.
    assert!(seen
        .orders
        .iter()
        .any(|(to, o)| to == &[3] && matches!(o, Order::Stop)));
    assert!(
        seen.warnings
            .iter()
            .any(|w| w.contains("rank 3 answered no liveness ping")),
        "{:?}",
        seen.warnings
    );
    let runs = runs(&seen, 1);
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(runs[1].1.iter().all(|path| !path.contains(&3)));
    let (_, tallies) = seen.ledger.iter().find(|(w, _)| *w == 1).unwrap();
    assert!(tallies.iter().all(|t| t.rank != 3), "{tallies:?}");
    assert_eq!(tallies.iter().map(|t| t.verified).sum::<u64>(), 6 * 2);
}

#[test]
fn a_slow_miner_that_answers_its_pings_is_kept_and_credited() {
    let spec = spec("");
    // Eight silences of 0.5 s: past the 2 s serving deadline of a run
    // whose microbatches take milliseconds.
    let seen = Sim::finished(
        &spec,
        Script {
            stall: Some((1, 3, 8)),
            ..Script::default()
        },
    );
    assert!(
        seen.pings.iter().any(|p| p.contains(&3)),
        "{:?}",
        seen.pings
    );
    assert!(seen.departed.is_empty(), "{:?}", seen.departed);
    assert_eq!(seen.windows[1].1, 1, "window 1 needed no redo");
    let (_, tallies) = seen.ledger.iter().find(|(w, _)| *w == 1).unwrap();
    assert!(tallies.iter().any(|t| t.rank == 3 && t.verified > 0));
}

#[test]
fn liveness_deadlines_follow_the_run_and_are_reported_with_each_window() {
    let seen = Sim::finished(
        &spec(""),
        Script {
            stall: Some((1, 3, 8)),
            ..Script::default()
        },
    );
    // Reports a millisecond apart set the progress deadline's 2 s floor in
    // the first window; the answer deadline keeps its 5 s start value
    // until pings are answered (in window 1), then falls to its floor.
    let seconds = |d: &Deadlines| (d.progress_s, d.answer_s, d.close_s);
    assert_eq!(seconds(&seen.deadlines[0]), (2.0, 5.0, 5.0));
    assert_eq!(seconds(&seen.deadlines[2]), (2.0, 2.0, 5.0));
}

#[test]
fn a_standby_takes_over_from_the_last_handover_and_the_window_in_flight_runs_again() {
    let spec = spec("standby = 1");
    let seen = Sim::finished(
        &spec,
        Script {
            take_over: Some(1),
            ..Script::default()
        },
    );
    assert!(seen.done);
    // Handed over after window 0; the standby hands over to no one.
    assert_eq!(seen.handovers, [1]);
    let resumes: Vec<u64> = seen
        .orders
        .iter()
        .filter_map(|(_, o)| match o {
            Order::Resume { window, .. } => Some(*window),
            _ => None,
        })
        .collect();
    assert_eq!(resumes, [1]);
    // The lost orchestrator's attempt of window 1 ran (its reports reached
    // the standby, which ignored them); the standby's attempts are its own.
    let attempts: Vec<u32> = runs(&seen, 1).iter().map(|(a, _)| *a).collect();
    assert_eq!(attempts, [0, protocol::ATTEMPTS_PER_LEADER]);
    assert_eq!(
        seen.windows
            .iter()
            .map(|(w, a, _)| (*w, *a))
            .collect::<Vec<_>>(),
        [(0, 1), (1, 1), (2, 1)]
    );
    // Every pass of every window credited once: none of the lost
    // orchestrator's attempt counted twice.
    assert_eq!(credited(&seen).values().sum::<u64>(), 3 * 6 * 2);
    assert_eq!(seen.departed, Vec::<usize>::new());
}

#[test]
fn a_miner_that_cannot_go_back_to_the_windows_start_is_stopped_and_the_job_goes_on() {
    let spec = spec("standby = 1");
    let seen = Sim::finished(
        &spec,
        Script {
            take_over: Some(1),
            cannot_rewind: Some(3),
            ..Script::default()
        },
    );
    assert!(seen.done);
    assert_eq!(seen.departed, [3]);
    assert!(seen
        .orders
        .iter()
        .any(|(to, o)| *to == [3] && *o == Order::Stop));
    for (attempt, paths) in runs(&seen, 1).iter().skip(1) {
        assert!(
            paths.iter().all(|p| !p.contains(&3)),
            "attempt {attempt} routes through the stopped miner"
        );
    }
    // Its passes of window 0 stay credited.
    assert!(credited(&seen).get(&3).is_some_and(|&n| n > 0));
    assert_eq!(credited(&seen).values().sum::<u64>(), 3 * 6 * 2);
}

#[test]
fn each_slice_is_recomputed_by_the_validator_the_close_had_its_miners_send_it_to() {
    let two = |roles: &str| {
        let text = spec_text(roles)
            .replace("validators = 1", "validators = 2")
            .replace("ranks_per_host = 6", "ranks_per_host = 7");
        config::parse(&text, Path::new("unit.toml")).expect("the unit job parses")
    };
    let seen = Sim::finished(&two(""), Script::default());
    let mut named = BTreeMap::new();
    let mut recomputed = 0;
    for (_, order) in &seen.orders {
        match order {
            Order::Close {
                window,
                attempt,
                stages,
                recomputers,
                ..
            } => {
                // One validator for each slice (one slice a miner), both
                // validators (ranks 1 and 2) given slices.
                let slices: Vec<usize> = stages.iter().map(Vec::len).collect();
                assert_eq!(recomputers.iter().map(Vec::len).collect::<Vec<_>>(), slices);
                let given: BTreeSet<usize> = recomputers.iter().flatten().copied().collect();
                assert_eq!(given, BTreeSet::from([1, 2]));
                named.insert((*window, *attempt), recomputers.clone());
            }
            Order::Recompute {
                window,
                attempt,
                tasks,
            } => {
                let recomputers = &named[&(*window, *attempt)];
                for task in tasks {
                    assert_eq!(task.validator, recomputers[task.stage][task.slice]);
                    recomputed += 1;
                }
            }
            _ => {}
        }
    }
    // 3 windows of 2 stages of 2 slices.
    assert_eq!(recomputed, 12);
    // A share drawn after the close: nothing is sent before it.
    let seen = Sim::finished(&two("slice_audit_rate = 0.5"), Script::default());
    for (_, order) in &seen.orders {
        if let Order::Close { recomputers, .. } = order {
            assert!(recomputers.is_empty());
        }
    }
}
