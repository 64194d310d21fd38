//! The orchestrator's state machine driven without processes: simulated
//! ranks answer its orders the way miners and validators do, and the tests
//! steer what they say (a loss, a join, a leave, a wrong replay) to check
//! what the orchestrator decides. No sockets, no clock: time is an
//! `Instant` the test moves by hand.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant};

use super::machine::{Beginning, Coordinator, Input, Output};
use super::StartPoint;
use crate::checkpoint::StageEntry;
use crate::config::{self, JobSpec};
use crate::ledger::Tally;
use crate::pipeline::Router;
use crate::roles::protocol::{
    is_validation, Order, Receipt, Reduction, Report, StageDigests, Verdict,
};
use crate::roles::train::{miners_of, Setup, TrainError};

/// Rank 0 orchestrates, rank 1 validates, ranks 2..6 mine two stages;
/// `roles` goes into `[roles]`.
fn spec(roles: &str) -> JobSpec {
    let text = format!(
        "[job]\nname = \"unit\"\ntask = \"train\"\nseed = 3\n\n\
         [model]\nn_layer = 2\nn_head = 2\nn_embd = 16\nblock_size = 8\n\n\
         [pipeline]\nstages = 2\nmicrobatch_size = 2\nmicrobatches_per_window = 6\n\n\
         [roles]\nvalidators = 1\n{roles}\n\
         [[site]]\nname = \"local\"\nhosts = \"localhost\"\nranks_per_host = 6\n\n\
         [network]\nrendezvous = \"tcp://127.0.0.1:0\"\n\n\
         [train]\nwindows = 3\neval_every = 2\neval_microbatches = 1\ncheckpoint_every = 2\n"
    );
    config::parse(&text, Path::new("unit.toml")).expect("the unit job parses")
}

/// How the simulated ranks misbehave.
#[derive(Default)]
struct Script {
    /// When the first `Run` of this window arrives, this miner is lost
    /// (its reports for it never come).
    lose: Option<(u64, usize)>,
    /// In this window, this miner is lost after the first `n` reports of
    /// the first `Run` came in (the others' later reports still come).
    lose_midway: Option<(u64, usize, usize)>,
    /// This rank asks to leave when the first `Run` of the window arrives.
    leave: Option<(u64, usize)>,
    /// These ranks join when the first `Run` of the window arrives.
    join: Option<(u64, Vec<usize>)>,
    /// The validator finds this miner's passes wrong.
    cheater: Option<usize>,
    /// This miner states other weights after stepping.
    diverges: Option<usize>,
}

/// What the simulation saw.
#[derive(Default)]
struct Seen {
    orders: Vec<(Vec<usize>, Order)>,
    ledger: Vec<(u64, Vec<Tally>)>,
    windows: Vec<(u64, u32, Vec<usize>)>,
    departed: Vec<usize>,
    commits: Vec<u64>,
    warnings: Vec<String>,
    done: bool,
}

impl Seen {
    /// The `Run` orders of `window`, as (attempt, routes' paths).
    fn runs(&self, window: u64) -> Vec<(u32, Vec<Vec<usize>>)> {
        self.orders
            .iter()
            .filter_map(|(_, o)| match o {
                Order::Run {
                    window: w,
                    attempt,
                    routes,
                } if *w == window => {
                    Some((*attempt, routes.iter().map(|r| r.path.clone()).collect()))
                }
                _ => None,
            })
            .collect()
    }

    /// The miners of each stage in the `Close` orders of `window`.
    fn closes(&self, window: u64) -> Vec<Vec<Vec<usize>>> {
        self.orders
            .iter()
            .filter_map(|(_, o)| match o {
                Order::Close {
                    window: w, stages, ..
                } if *w == window => Some(stages.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Simulated ranks around a coordinator.
struct Sim {
    script: Script,
    /// Ranks that no longer answer.
    dead: BTreeSet<usize>,
    /// The stage of every miner, as the orders tell it.
    stage_of: BTreeMap<usize, usize>,
    inbox: VecDeque<Input>,
    seen: Seen,
    /// Windows whose first `Run` was seen.
    ran: BTreeSet<u64>,
}

impl Sim {
    fn new(script: Script) -> Sim {
        Sim {
            script,
            dead: BTreeSet::new(),
            stage_of: BTreeMap::new(),
            inbox: VecDeque::new(),
            seen: Seen::default(),
            ran: BTreeSet::new(),
        }
    }

    /// Runs the job to its end (or the coordinator's error).
    fn run(spec: &JobSpec, script: Script) -> (Seen, Result<(), TrainError>) {
        let start = StartPoint {
            resumed: None,
            job_text: String::new(),
        };
        let plan = spec.plan(None).expect("the unit job plans");
        let planned = miners_of(&plan);
        let setup = Setup::new(spec).expect("the unit job sets up");
        let stages = setup.stages;
        let mut c = Coordinator::new(
            spec,
            &start,
            Beginning {
                setup,
                router: Router::new(stages, &planned, spec.job.seed),
                validators: vec![1],
                planned: plan.ranks.len(),
                weights: (0..stages).map(|s| format!("start{s}")).collect(),
                optimizers: (0..stages).map(|s| Some(format!("adam{s}"))).collect(),
                seed: 7,
                modelled: None,
                timeout: Duration::from_secs(60),
                sites: plan
                    .ranks
                    .iter()
                    .map(|r| (r.rank, r.site.clone()))
                    .collect(),
            },
        );
        let mut sim = Sim::new(script);
        let now = Instant::now();
        let result = (|| {
            let outputs = c.begin(now)?;
            sim.take(outputs);
            while let Some(input) = sim.inbox.pop_front() {
                let outputs = c.on(input, now)?;
                sim.take(outputs);
                if sim.seen.done {
                    break;
                }
            }
            Ok(())
        })();
        (sim.seen, result)
    }

    fn take(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send(to, order) => {
                    self.answer(&to, &order);
                    self.seen.orders.push((to, order));
                }
                Output::Ledger { window, tallies } => self.seen.ledger.push((window, tallies)),
                Output::Window(w) => self.seen.windows.push((w.window, w.attempts, w.caught)),
                Output::Departed(rank) => {
                    self.dead.insert(rank);
                    self.seen.departed.push(rank);
                }
                Output::Commit(m) => self.seen.commits.push(m.window),
                Output::Warn(line) | Output::Say(line) => self.seen.warnings.push(line),
                Output::Done => self.seen.done = true,
            }
        }
    }

    fn report(&mut self, from: usize, report: Report) {
        if !self.dead.contains(&from) {
            self.inbox.push_back(Input::Report(from, report));
        }
    }

    /// What the ranks in `to` say back to `order`.
    fn answer(&mut self, to: &[usize], order: &Order) {
        match order {
            Order::Start { stages, .. } => {
                for (stage, miners) in stages.iter().enumerate() {
                    for &m in miners {
                        self.stage_of.insert(m, stage);
                    }
                }
            }
            Order::Run {
                window,
                attempt,
                routes,
            } => {
                let first = self.ran.insert(*window);
                if first {
                    self.script_events(*window);
                }
                let queued = self.inbox.len();
                for route in routes {
                    let last = route.path.len() - 1;
                    for (stage, &miner) in route.path.iter().enumerate() {
                        let receipt = (!is_validation(route.id)).then(|| {
                            Box::new(Receipt {
                                input: (stage > 0).then(|| format!("a{}-{}", route.id, stage - 1)),
                                output: format!("a{}-{stage}", route.id),
                                grad_in: (stage < last)
                                    .then(|| format!("g{}-{}", route.id, stage + 1)),
                                grad_out: (stage > 0).then(|| format!("g{}-{stage}", route.id)),
                                params: format!("p{}-{stage}", route.id),
                                maxes: vec![1.0f32.to_bits(); 3],
                            })
                        });
                        self.report(
                            miner,
                            Report::Served {
                                window: *window,
                                attempt: *attempt,
                                id: route.id,
                                stage,
                                compute_s: 0.01,
                                loss: (stage == last).then_some(2.5),
                                dense_bytes: 0,
                                wire_bytes: 0,
                                receipt,
                            },
                        );
                    }
                }
                match self.script.lose_midway {
                    Some((w, rank, n)) if first && w == *window => {
                        let at = queued + n;
                        let later: Vec<Input> =
                            self.inbox.drain(at.min(self.inbox.len())..).collect();
                        self.inbox
                            .push_back(Input::Lost(rank, "connection reset".into()));
                        let from_others = later
                            .into_iter()
                            .filter(|i| !matches!(i, Input::Report(r, _) if *r == rank));
                        self.inbox.extend(from_others);
                        self.dead.insert(rank);
                    }
                    _ => {}
                }
            }
            Order::Audit {
                window,
                attempt,
                tasks,
                ..
            } => {
                for task in tasks {
                    let verdict = if self.script.cheater == Some(task.miner) {
                        Verdict::Failed("its replay gives other gradients".into())
                    } else {
                        Verdict::Passed
                    };
                    self.report(
                        task.validator,
                        Report::Audited {
                            window: *window,
                            attempt: *attempt,
                            task: Box::new(task.clone()),
                            verdict,
                            replay_s: 0.01,
                        },
                    );
                }
            }
            Order::Close {
                window,
                attempt,
                stages,
                ..
            } => {
                for (stage, miners) in stages.iter().enumerate() {
                    for &m in miners.iter().filter(|m| to.contains(m)) {
                        let reduction = Reduction {
                            contributions: (0..miners.len()).map(|j| format!("c{m}-{j}")).collect(),
                            copies: Vec::new(),
                            agreed: true,
                            result: Some(format!("sum{window}-{stage}")),
                            across: None,
                        };
                        self.report(
                            m,
                            Report::Reduced {
                                window: *window,
                                attempt: *attempt,
                                reduction,
                            },
                        );
                    }
                }
            }
            Order::Recompute {
                window,
                attempt,
                tasks,
            } => {
                for task in tasks {
                    let verdicts = task
                        .contributors
                        .iter()
                        .chain(&task.holders)
                        .map(|(m, _)| (*m, Verdict::Passed))
                        .collect();
                    self.report(
                        task.validator,
                        Report::Recomputed {
                            window: *window,
                            attempt: *attempt,
                            task: Box::new(task.clone()),
                            verdicts,
                            replay_s: 0.01,
                        },
                    );
                }
            }
            Order::Step {
                window,
                writers,
                audits,
            } => {
                let digests =
                    |stage: usize| (format!("w{window}-{stage}"), format!("o{window}-{stage}"));
                let miners: Vec<(usize, usize)> = self
                    .stage_of
                    .iter()
                    .map(|(m, s)| (*m, *s))
                    .filter(|(m, _)| to.contains(m))
                    .collect();
                for (m, stage) in miners {
                    let (mut digest, optimizer) = digests(stage);
                    if self.script.diverges == Some(m) {
                        digest.push_str("-other");
                    }
                    let checkpoint = writers.contains(&m).then(|| StageEntry {
                        stage,
                        file: format!("stage{stage}.bin"),
                        blake3: format!("file{window}-{stage}"),
                        weights_digest: digest.clone(),
                        optimizer_digest: Some(optimizer.clone()),
                    });
                    self.report(
                        m,
                        Report::Stepped {
                            window: *window,
                            stage,
                            digest,
                            optimizer,
                            checkpoint,
                        },
                    );
                }
                for task in audits {
                    self.report(
                        task.validator,
                        Report::CheckpointAudited {
                            window: *window,
                            task: task.clone(),
                            file: Some(format!("file{window}-{}", task.stage)),
                            weights: Some(digests(task.stage).0),
                            verdict: Verdict::Passed,
                            replay_s: 0.01,
                        },
                    );
                }
            }
            Order::Place { window, placements } => {
                for p in placements {
                    self.stage_of.insert(p.rank, p.stage);
                    let state = Ok(StageDigests {
                        weights: p.weights.clone(),
                        optimizer: p.optimizer.clone().unwrap_or_default(),
                    });
                    self.report(
                        p.rank,
                        Report::Placed {
                            window: *window,
                            stage: p.stage,
                            state,
                        },
                    );
                }
            }
            Order::Stop => {
                for r in to {
                    self.stage_of.remove(r);
                }
            }
        }
    }

    /// What the script makes happen as `window` starts serving.
    fn script_events(&mut self, window: u64) {
        if let Some((w, rank)) = self.script.lose {
            if w == window {
                self.dead.insert(rank);
                self.inbox
                    .push_front(Input::Lost(rank, "connection reset".into()));
            }
        }
        if let Some((w, rank)) = self.script.leave {
            if w == window {
                self.inbox.push_back(Input::Report(rank, Report::Leaving));
            }
        }
        if let Some((w, ranks)) = &self.script.join {
            if *w == window {
                for &rank in ranks {
                    let site = Some("local".to_string());
                    self.inbox.push_back(Input::Joined { rank, site });
                }
            }
        }
    }
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
    let (seen, result) = Sim::run(&spec, Script::default());
    result.unwrap();
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
        let runs = seen.runs(window);
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
    let (seen, result) = Sim::run(
        &spec,
        Script {
            lose: Some((1, 3)),
            ..Script::default()
        },
    );
    result.unwrap();
    let runs = seen.runs(1);
    assert_eq!(runs.iter().map(|(a, _)| *a).collect::<Vec<_>>(), [0, 1]);
    for path in &runs[1].1 {
        assert!(
            !path.contains(&3),
            "attempt 1 routes through the lost miner: {path:?}"
        );
    }
    assert!(seen
        .closes(1)
        .iter()
        .all(|stages| stages.iter().all(|s| !s.contains(&3))));
    let (_, tallies) = seen.ledger.iter().find(|(w, _)| *w == 1).unwrap();
    assert!(tallies.iter().all(|t| t.rank != 3), "{tallies:?}");
    assert_eq!(tallies.iter().map(|t| t.verified).sum::<u64>(), 6 * 2);
    assert_eq!(seen.departed, [3]);
    assert_eq!(seen.windows[1].1, 2, "window 1 took two attempts");
}

#[test]
fn a_miner_that_asks_to_leave_finishes_its_window_and_goes_without_a_redo() {
    let spec = spec("");
    let (seen, result) = Sim::run(
        &spec,
        Script {
            leave: Some((1, 4)),
            ..Script::default()
        },
    );
    result.unwrap();
    assert_eq!(
        seen.runs(1).len(),
        1,
        "no window is redone for a polite leave"
    );
    assert!(seen.closes(1)[0].iter().any(|s| s.contains(&4)));
    assert!(seen
        .orders
        .iter()
        .any(|(to, o)| *to == [4] && *o == Order::Stop));
    assert!(seen.closes(2)[0].iter().all(|s| !s.contains(&4)));
    assert!(seen.runs(2)[0].1.iter().all(|path| !path.contains(&4)));
    assert_eq!(seen.departed, [4]);
}

#[test]
fn a_rank_that_joins_is_placed_at_the_next_boundary_with_its_stage_s_digests_and_mines() {
    let spec = spec("");
    let (seen, result) = Sim::run(
        &spec,
        Script {
            join: Some((0, vec![6])),
            ..Script::default()
        },
    );
    result.unwrap();
    let places: Vec<_> = seen
        .orders
        .iter()
        .filter_map(|(_, o)| match o {
            Order::Place { window, placements } => Some((*window, placements.clone())),
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
    assert!(seen.closes(0)[0].iter().all(|s| !s.contains(&6)));
    assert!(seen.closes(1)[0][p.stage].contains(&6));
    assert!(
        credited(&seen).get(&6).is_some_and(|n| *n > 0),
        "{:?}",
        credited(&seen)
    );
    assert!(seen.windows.iter().all(|(_, attempts, _)| *attempts == 1));
}

#[test]
fn a_miner_whose_replay_fails_is_excluded_credited_nothing_and_its_window_redone() {
    let spec = spec("replay_rate = 1.0");
    let (seen, result) = Sim::run(
        &spec,
        Script {
            cheater: Some(5),
            ..Script::default()
        },
    );
    result.unwrap();
    let runs = seen.runs(0);
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
    let (seen, result) = Sim::run(
        &spec,
        Script {
            lose_midway: Some((1, 2, 6)),
            ..Script::default()
        },
    );
    result.unwrap();
    let runs = seen.runs(1);
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
    for (id, path) in done.iter().take(3).zip(first) {
        if path.contains(&2) {
            // The lost miner held its gradients: it is served again.
            assert!(redone.contains(id), "{id} {path:?}");
        } else {
            // Finished elsewhere: kept as it was, and counted on its path.
            assert!(!redone.contains(id), "{id} {path:?} was redone");
            assert!(
                counted.contains(&(*id, path.clone())),
                "{id} {path:?}: {counted:?}"
            );
        }
    }
    // Nothing the lost miner did counts.
    assert!(counted.iter().all(|(_, path)| !path.contains(&2)));
    assert!(
        seen.runs(1)[0].1.iter().take(3).any(|p| !p.contains(&2)),
        "the case is covered"
    );
}
