//! Ranks killed at random moments of real training runs: a miner or a
//! validator gets SIGKILL at a random point of a random window (serving,
//! closing, stepping, writing a checkpoint, being audited: wherever the
//! clock lands), and every run must finish with the losses of the run
//! where nobody died, bit for bit, and a ledger that credits each pass of
//! each window exactly once. Where the kill lands is random; what is
//! asserted holds wherever it lands.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::train::*;
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const WINDOWS: u64 = 12;
/// Training microbatches per window times stages: every window's credits.
const PASSES_PER_WINDOW: u64 = 6 * 2;

/// A small generator seeded from the clock; the seed is in every failure
/// message.
struct Draws(u64);

impl Draws {
    fn new() -> Draws {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Draws(nanos)
    }

    /// SplitMix64.
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a line of the launcher's output says.
enum Line {
    /// `rank R/N on HOST (pid P, ...)`.
    Pid(usize, i32),
    /// The orchestrator's line of window `w`.
    Window(u64),
    Other,
}

fn parse(line: &str) -> Line {
    let body = line.split_once("] ").map_or(line, |(_, b)| b);
    if let Some(rest) = body.strip_prefix("rank ") {
        let rank = rest.split('/').next().and_then(|r| r.parse().ok());
        let pid = rest
            .split_once("(pid ")
            .and_then(|(_, p)| p.split(',').next())
            .and_then(|p| p.parse().ok());
        if let (Some(rank), Some(pid)) = (rank, pid) {
            return Line::Pid(rank, pid);
        }
    }
    if let Some(rest) = body.strip_prefix("window ") {
        if let Some(w) = rest.split_whitespace().next().and_then(|w| w.parse().ok()) {
            return Line::Window(w);
        }
    }
    Line::Other
}

/// Launches `job` (restarting it once if a rank the job cannot lose
/// fails), kills `victim` with SIGKILL `share` of two windows after the
/// orchestrator's line of window `after` (a window as long as the mean
/// between the lines before it), and waits for the launcher; returns
/// everything it printed and the delay it waited.
fn run_and_kill(job: &Path, victim: usize, after: u64, share: f64) -> (String, Duration) {
    let mut child: Child = swarmrun()
        .args(["launch", "--max-restarts", "1"])
        .arg(job)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let outputs: [Box<dyn Read + Send>; 2] = [
        Box::new(child.stdout.take().unwrap()),
        Box::new(child.stderr.take().unwrap()),
    ];
    let readers: Vec<_> = outputs
        .into_iter()
        .map(|out| {
            let tx = tx.clone();
            thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            })
        })
        .collect();
    drop(tx);
    let (mut pid, mut killed, mut seen) = (None, false, Vec::new());
    let (mut first_window, mut delay) = (None, Duration::ZERO);
    for line in rx {
        match parse(&line) {
            Line::Pid(rank, p) if rank == victim => pid = Some(p),
            Line::Window(w) => {
                let (first, at) = *first_window.get_or_insert((w, Instant::now()));
                if w == after && !killed {
                    if let Some(p) = pid {
                        let window = at.elapsed() / (w - first).max(1) as u32;
                        delay = window.mul_f64(2.0 * share);
                        thread::sleep(delay);
                        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                        killed = true;
                    }
                }
            }
            _ => {}
        }
        seen.push(line);
    }
    readers.into_iter().for_each(|r| r.join().unwrap());
    let status = child.wait().unwrap();
    let text = seen.join("\n");
    assert!(status.success(), "{text}");
    assert!(killed, "rank {victim} was never killed:\n{text}");
    (text, delay)
}

/// Every window's credits add up to its passes: none lost, none twice.
fn assert_each_pass_credited_once(job: &Path, context: &str) {
    let chain = swarmrun::ledger::read(&job.with_extension("")).unwrap();
    assert_eq!(chain.records.len() as u64, WINDOWS, "{context}");
    for record in &chain.records {
        let credited: u64 = record.miners.iter().map(|m| m.verified).sum();
        assert_eq!(
            credited, PASSES_PER_WINDOW,
            "window {} credits {credited} passes: {context}",
            record.window
        );
    }
}

/// `trials` runs of `job(name)`, each killing the rank `victim` draws at
/// a random moment; each run must say `said(victim)` and keep every loss
/// bit and every credit of the run where nobody died. Returns what each
/// run printed.
fn kill_trials(
    job: impl Fn(&str) -> PathBuf,
    trials: usize,
    victim: impl Fn(&mut Draws) -> usize,
    said: impl Fn(usize) -> String,
) -> Vec<String> {
    let (clean, _) = run(&job("clean"));
    let mut draws = Draws::new();
    let seed = draws.0;
    let mut outputs = Vec::new();
    for trial in 0..trials {
        let victim = victim(&mut draws);
        let (after, share) = moment(&mut draws);
        let job = job(&format!("kill{trial}"));
        let (out, delay) = run_and_kill(&job, victim, after, share);
        let context = format!(
            "seed {seed}, trial {trial}: rank {victim} killed {delay:?} ({share:.2} of two \
             windows) after window {after}"
        );
        assert!(out.contains(&said(victim)), "{context}\n{out}");
        assert_eq!(
            losses(&clean),
            losses(&metrics_of(&job)),
            "{context}\n{out}"
        );
        assert_each_pass_credited_once(&job, &context);
        outputs.push(out);
    }
    outputs
}

/// A random moment: a window after whose line to wait, and for what share
/// of two windows, so that the kill lands in one of the next two windows
/// (however long a window takes on this host: a fixed delay of up to 100
/// ms, right when windows took 30-80 ms, landed after the last window once
/// they took 20) and at least two windows before the last.
fn moment(draws: &mut Draws) -> (u64, f64) {
    let after = 1 + draws.below(WINDOWS - 5);
    (after, draws.below(1000) as f64 / 1000.0)
}

/// Checkpoints every 2 windows, so that some kills land in a write.
const EVERY_2: &str = "checkpoint_every = 2\n";

/// 20 runs, each killing a random miner (ranks 2 to 5).
#[test]
fn miners_killed_at_random_moments_change_no_loss_and_lose_no_pass() {
    let dir = tempfile::tempdir().unwrap();
    let _ = kill_trials(
        |name| train_job(dir.path(), name, 2, WINDOWS, EVERY_2),
        20,
        |d| 2 + d.below(4) as usize,
        |rank| format!("lost miner {rank}"),
    );
}

/// With two validators (ranks 1 and 2), one killed at a random moment:
/// the other takes over its checks.
#[test]
fn a_validator_killed_at_a_random_moment_is_replaced_by_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let two_validators = |name: &str| {
        let job = train_job(dir.path(), name, 2, WINDOWS, EVERY_2);
        let text = std::fs::read_to_string(&job).unwrap();
        let text = text
            .replace("validators = 1", "validators = 2")
            .replace("ranks_per_host = 6", "ranks_per_host = 7");
        std::fs::write(&job, text).unwrap();
        job
    };
    let _ = kill_trials(
        two_validators,
        5,
        |d| 1 + d.below(2) as usize,
        |rank| format!("lost validator {rank}"),
    );
}

/// The orchestrator killed at a random moment, without a standby: the
/// launcher restarts the job, which resumes from its last checkpoint.
#[test]
fn an_orchestrator_killed_at_a_random_moment_is_restarted_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let _ = kill_trials(
        |name| train_job(dir.path(), name, 2, WINDOWS, EVERY_2),
        3,
        |_| 0,
        |_| "restarting the job (1/1)".to_string(),
    );
}

/// The job of [`train_job`] with a standby orchestrator (rank 2, after
/// the validator; miners are ranks 3 to 6) and `extra` appended.
fn standby_job(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let job = train_job(dir, name, 2, WINDOWS, &format!("{EVERY_2}{extra}"));
    let text = std::fs::read_to_string(&job).unwrap();
    let text = text
        .replace("validators = 1", "validators = 1\nstandby = 1")
        .replace("ranks_per_host = 6", "ranks_per_host = 7");
    std::fs::write(&job, text).unwrap();
    job
}

const TAKES_OVER: &str = "standby: the orchestrator is lost; taking over";

/// Nothing was restarted: the launcher restarted no job, and every rank
/// but the orchestrator started once.
fn assert_nothing_restarted(out: &str) {
    assert!(!out.contains("restarting the job"), "{out}");
    for rank in 1..7 {
        let starts = out
            .lines()
            .filter(|l| matches!(parse(l), Line::Pid(r, _) if r == rank))
            .count();
        assert_eq!(starts, 1, "rank {rank} started {starts} times:\n{out}");
    }
}

/// With a standby, the orchestrator killed at a random moment, 20 times:
/// the standby takes over from the last window it was handed, the window
/// in flight runs again with every miner back at its start, and the
/// launcher restarts nothing.
#[test]
fn an_orchestrator_killed_at_a_random_moment_is_replaced_by_its_standby() {
    let dir = tempfile::tempdir().unwrap();
    let outputs = kill_trials(
        |name| standby_job(dir.path(), name, ""),
        20,
        |_| 0,
        |_| TAKES_OVER.to_string(),
    );
    outputs.iter().for_each(|out| assert_nothing_restarted(out));
}

/// The orchestrator lost at the moments a random kill rarely hits: before
/// it handed anything over (the standby starts from the job's start);
/// halfway through ordering a close (the miners told reduce among
/// themselves and give up as soon as the standby leads); right after it
/// ordered a step that writes a checkpoint (miners that stepped go back;
/// the checkpoint is written again).
#[test]
fn a_standby_takes_over_before_any_handover_in_a_half_ordered_close_and_after_a_step() {
    let dir = tempfile::tempdir().unwrap();
    let (clean, _) = run(&standby_job(dir.path(), "clean", ""));
    let crashes = [
        (
            "window0",
            "[[faults.crash]]\nrank = 0\nexit_code = 3\nwindow = 0\n",
        ),
        (
            "close1",
            "[[faults.crash]]\nrank = 0\nexit_code = 3\nwindow = 1\nphase = \"close\"\n",
        ),
        (
            "step5",
            "[[faults.crash]]\nrank = 0\nexit_code = 3\nwindow = 5\nphase = \"step\"\n",
        ),
    ];
    for (name, crash) in crashes {
        let job = standby_job(dir.path(), name, crash);
        let done = swarmrun().arg("launch").arg(&job).output().unwrap();
        let out = format!("{}\n{}", stdout(&done), stderr(&done));
        assert!(done.status.success(), "{name}:\n{out}");
        assert!(out.contains(TAKES_OVER), "{name}:\n{out}");
        assert_nothing_restarted(&out);
        assert_eq!(losses(&clean), losses(&metrics_of(&job)), "{name}:\n{out}");
        assert_each_pass_credited_once(&job, name);
    }
}
