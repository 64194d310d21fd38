//! `swarmrun launch`: start the ranks of one host as child processes, the
//! way torchrun's standalone mode does, and own their lifetime.
//!
//! - Each child runs `swarmrun rank` in a process group of its own, so the
//!   launcher decides which signals reach it and can end a rank's whole
//!   process tree.
//! - Output is relayed whole lines at a time with a `[r3 miner s1]` prefix.
//! - The first rank to exit non-zero ends the job: the others get SIGTERM,
//!   then SIGKILL after the grace period; the launcher exits with that
//!   rank's status, or restarts the whole job up to `max_restarts` times.
//! - Except an expendable rank (a miner or validator of a training job:
//!   SWARM survives miners leaving, and the other validators take over a
//!   lost one's checks; with a standby, the orchestrator and the standby
//!   too, since each can lead without the other): its failure is reported
//!   and the job goes on without it.
//! - SIGINT/SIGTERM/SIGHUP sent to the launcher are forwarded to every rank.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use thiserror::Error;

use super::progress::Progress;
use super::PEER_LOST_STATUS;
use crate::world::detect::identity_variables;

/// What one launch needs to know.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// The `swarmrun` binary the ranks run (normally this one).
    pub exe: PathBuf,
    /// Arguments after `swarmrun rank` (the job file and rank options).
    pub rank_args: Vec<OsString>,
    /// One output prefix per rank, e.g. `r3 miner s1`; its length is the
    /// number of ranks.
    pub labels: Vec<String>,
    /// Per rank: whether the job survives its failure (same length as
    /// `labels`).
    pub expendable: Vec<bool>,
    /// Ranks that lead a training job (its orchestrator, and a standby):
    /// once one of them finished cleanly, ranks left that the job can do
    /// without are given the grace period and then killed.
    pub leaders: Vec<usize>,
    /// Extra environment for every rank (rendezvous endpoint, job key).
    pub env: Vec<(String, String)>,
    /// Shared by all ranks of one attempt; suffixed with the attempt number.
    pub run_id: String,
    pub max_restarts: u32,
    pub grace: Duration,
    /// Windows of a training job, for the progress bar on a terminal.
    pub progress_windows: Option<u64>,
    /// Relay ranks' output as JSON lines (`--log-format json`) instead of
    /// tagging each line with its rank's label.
    pub json_lines: bool,
    /// The job's wall-clock limit over all its attempts (`--timeout`, as
    /// mpirun's `--timeout` and srun's `--time`): past it every rank gets
    /// SIGTERM, and SIGKILL after the grace period.
    pub time_limit: Option<Duration>,
}

#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("cannot start rank {rank} ({exe}): {source}")]
    Spawn {
        rank: usize,
        exe: String,
        source: io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
}

/// The launcher's exit status when the job ran past `--timeout`.
pub const TIMED_OUT_STATUS: i32 = 124;

/// How a launch ended: the status the launcher itself should exit with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A rank failed (and restarts ran out): its rank and shell-style status.
    RankFailed {
        rank: usize,
        status: i32,
    },
    /// The launcher was signalled; 128 + signal number.
    Signalled {
        signal: i32,
    },
    /// The job ran past its time limit and was stopped; 124, as
    /// timeout(1) exits.
    TimedOut,
}

impl Outcome {
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Success => 0,
            Outcome::RankFailed { status, .. } => status,
            Outcome::Signalled { signal } => 128 + signal,
            Outcome::TimedOut => TIMED_OUT_STATUS,
        }
    }
}

/// Runs the job, restarting it on failure as allowed; returns how it ended.
pub fn launch(opts: &LaunchOptions) -> Result<Outcome, LaunchError> {
    let signal = Arc::new(AtomicUsize::new(0));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register_usize(sig, Arc::clone(&signal), sig as usize)
            .map_err(LaunchError::Signals)?;
    }
    let deadline = opts.time_limit.map(|limit| Instant::now() + limit);
    let mut attempt = 0;
    loop {
        let outcome = run_attempt(opts, attempt, &signal, deadline)?;
        match outcome {
            Outcome::RankFailed { rank, status } if attempt < opts.max_restarts => {
                attempt += 1;
                tracing::warn!(
                    "swarmrun: rank {rank} failed with status {status}; restarting the job ({attempt}/{})",
                    opts.max_restarts
                );
            }
            other => return Ok(other),
        }
    }
}

/// One start of all ranks, until all have exited.
fn run_attempt(
    opts: &LaunchOptions,
    attempt: u32,
    signal: &AtomicUsize,
    deadline: Option<Instant>,
) -> Result<Outcome, LaunchError> {
    let size = opts.labels.len();
    let (exit_tx, exit_rx) = mpsc::channel::<(usize, i32)>();
    let mut pids: Vec<Pid> = Vec::with_capacity(size);
    let mut threads: Vec<JoinHandle<()>> = Vec::with_capacity(3 * size);
    let progress = opts
        .progress_windows
        .filter(|_| !opts.json_lines)
        .and_then(Progress::on_terminal)
        .map(Arc::new);
    for (rank, label) in opts.labels.iter().enumerate() {
        let child = match spawn_rank(opts, rank, attempt) {
            Ok(c) => c,
            Err(source) => {
                // Do not leave the ranks already started behind.
                signal_alive(&pids, &vec![false; pids.len()], Signal::SIGKILL);
                return Err(LaunchError::Spawn {
                    rank,
                    exe: opts.exe.display().to_string(),
                    source,
                });
            }
        };
        pids.push(Pid::from_raw(child.id() as i32));
        let relay = match &progress {
            None => Relay::Plain,
            Some(p) if rank == 0 => Relay::Feeding(Arc::clone(p)),
            Some(p) => Relay::Beside(Arc::clone(p)),
        };
        let framing = |stream| match opts.json_lines {
            true => Framing::Json {
                label: label.clone(),
                stream,
            },
            false => Framing::Tagged(format!("[{label}] ")),
        };
        let framings = [framing("stdout"), framing("stderr")];
        threads.extend(relay_and_wait(
            child,
            rank,
            framings,
            relay,
            exit_tx.clone(),
        ));
    }
    drop(exit_tx);

    let mut exited = vec![false; size];
    let mut first_failure: Option<(usize, i32)> = None;
    let mut signalled: Option<i32> = None;
    let mut kill_at: Option<Instant> = None;
    // Whether this launcher has signalled ranks itself: their statuses
    // then say so, not why the job failed.
    let mut stopping = false;
    // Whether every rank so far exited with status 0, and the first
    // failure of a rank the job survives.
    let mut clean = true;
    let mut first_expendable: Option<(usize, i32)> = None;
    let mut survivors = false;
    // Whether a leader (a training job's orchestrator or standby)
    // finished cleanly.
    let mut leader_ok = false;
    let mut timed_out = false;
    while exited.iter().any(|e| !e) {
        if !timed_out && deadline.is_some_and(|d| Instant::now() >= d) {
            tracing::warn!(
                "swarmrun: the job ran past its time limit of {:?} (--timeout); stopping every rank",
                opts.time_limit.unwrap_or_default()
            );
            signal_alive(&pids, &exited, Signal::SIGTERM);
            kill_at.get_or_insert(Instant::now() + opts.grace);
            stopping = true;
            timed_out = true;
        }
        let sig = signal.swap(0, Ordering::SeqCst);
        if sig != 0 {
            let sig = sig as i32;
            tracing::warn!("swarmrun: got signal {sig}, forwarding it to every rank");
            if let Ok(s) = Signal::try_from(sig) {
                signal_alive(&pids, &exited, s);
            }
            signalled.get_or_insert(sig);
            kill_at.get_or_insert(Instant::now() + opts.grace);
            stopping = true;
        }
        match exit_rx.recv_timeout(Duration::from_millis(20)) {
            Ok((rank, status)) => {
                exited[rank] = true;
                clean &= status == 0;
                survivors |= status == 0;
                leader_ok |= opts.leaders.contains(&rank) && status == 0;
                if leader_ok && only_expendable_left(opts, &exited) && kill_at.is_none() {
                    // What is left are miners the job no longer counts on:
                    // they have the grace period to see the Stop, then go.
                    // One evicted while stopped (SIGSTOP) or frozen would
                    // otherwise hold the launch open for ever.
                    kill_at = Some(Instant::now() + opts.grace);
                    stopping = true;
                }
                let survivable = opts.expendable.get(rank).copied().unwrap_or(false);
                // Ranks this launcher stopped, on a signal or past the
                // time limit, fail as told: no failure of theirs is news.
                let told = signalled.is_some() || timed_out;
                if status != 0 && survivable && !told && first_failure.is_none() {
                    first_expendable.get_or_insert((rank, status));
                    tracing::warn!(
                        "swarmrun: rank {rank} ({}) exited with status {status}; the job goes on without it",
                        opts.labels[rank]
                    );
                } else if status != 0 && first_failure.is_none() && !told {
                    first_failure = Some((rank, status));
                    if exited.iter().any(|e| !e) {
                        tracing::warn!(
                            "swarmrun: rank {rank} exited with status {status}; stopping the other ranks"
                        );
                        signal_alive(&pids, &exited, Signal::SIGTERM);
                        kill_at = Some(Instant::now() + opts.grace);
                        stopping = true;
                    }
                } else if first_failure.is_some_and(|(_, s)| s == PEER_LOST_STATUS)
                    && is_cause(status, stopping)
                {
                    // Reaped after a rank that only lost it: the cause.
                    tracing::warn!(
                        "swarmrun: rank {rank} exited with status {status}, the failure the others followed"
                    );
                    first_failure = Some((rank, status));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Every waiter is gone, so every rank has been reaped.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            tracing::warn!(
                "swarmrun: grace period of {:?} is over, killing the remaining ranks",
                opts.grace
            );
            signal_alive(&pids, &exited, Signal::SIGKILL);
            kill_at = None;
        }
    }
    for t in threads {
        let _ = t.join();
    }
    if let Some(p) = progress {
        p.finish();
    }
    if timed_out {
        return Ok(Outcome::TimedOut);
    }
    Ok(match (signalled, first_failure) {
        // Every rank took the signal as a request and finished cleanly (a
        // miner leaves a training job politely): the job ended as asked.
        (Some(_), None) if clean => Outcome::Success,
        (Some(signal), _) => Outcome::Signalled { signal },
        (None, Some((rank, status))) => Outcome::RankFailed { rank, status },
        // The job may go on without any one of them, but not without all.
        (None, None) => match first_expendable {
            Some((rank, status)) if !survivors => Outcome::RankFailed { rank, status },
            _ => Outcome::Success,
        },
    })
}

fn spawn_rank(opts: &LaunchOptions, rank: usize, attempt: u32) -> io::Result<Child> {
    let size = opts.labels.len();
    let mut cmd = Command::new(&opts.exe);
    cmd.arg("rank").args(&opts.rank_args);
    for var in identity_variables() {
        cmd.env_remove(var);
    }
    cmd.envs(opts.env.iter().map(|(k, v)| (k, v)))
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", size.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", size.to_string())
        .env("SWARMRUN_RUN_ID", format!("{}-{attempt}", opts.run_id))
        .env("SWARMRUN_RESTART_COUNT", attempt.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    cmd.spawn()
}

/// What relaying a rank's output does besides copying lines.
#[derive(Clone)]
enum Relay {
    Plain,
    /// Prints around the progress bar.
    Beside(Arc<Progress>),
    /// Rank 0's stdout: its window lines move the bar.
    Feeding(Arc<Progress>),
}

/// How a relayed line is marked with the rank it came from.
#[derive(Clone)]
enum Framing {
    /// Prefixed with the rank's label, for a person.
    Tagged(String),
    /// One JSON object per line (see [`crate::logging::relayed_json_line`]).
    Json { label: String, stream: &'static str },
}

impl Framing {
    fn frame(&self, line: &[u8], out: &mut Vec<u8>) {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        match self {
            Framing::Tagged(prefix) => {
                out.extend_from_slice(prefix.as_bytes());
                out.extend_from_slice(line);
            }
            Framing::Json { label, stream } => {
                let text = String::from_utf8_lossy(line);
                let json = crate::logging::relayed_json_line(label, stream, &text);
                out.extend_from_slice(json.as_bytes());
            }
        }
        out.push(b'\n');
    }
}

/// Starts the threads that relay a child's stdout and stderr (framed by
/// `framings`' first and second) and the one that waits for it, which
/// reports `(rank, status)` on `exits`.
fn relay_and_wait(
    mut child: Child,
    rank: usize,
    [out_framing, err_framing]: [Framing; 2],
    relay: Relay,
    exits: mpsc::Sender<(usize, i32)>,
) -> Vec<JoinHandle<()>> {
    let mut handles = Vec::with_capacity(3);
    if let Some(out) = child.stdout.take() {
        let relay = relay.clone();
        handles.push(thread::spawn(move || {
            relay_lines(out, &out_framing, io::stdout, &relay)
        }));
    }
    if let Some(err) = child.stderr.take() {
        let relay = match relay {
            Relay::Feeding(p) => Relay::Beside(p),
            other => other,
        };
        handles.push(thread::spawn(move || {
            relay_lines(err, &err_framing, io::stderr, &relay)
        }));
    }
    handles.push(thread::spawn(move || {
        let status = child.wait().map(shell_status).unwrap_or(1);
        let _ = exits.send((rank, status));
    }));
    handles
}

/// Copies `from` to `to` line by line, each line framed and written with
/// one locked write so lines of different ranks never interleave.
fn relay_lines<R: Read, W: Write>(from: R, framing: &Framing, to: impl Fn() -> W, relay: &Relay) {
    let mut reader = BufReader::with_capacity(64 * 1024, from);
    let mut line = Vec::with_capacity(256);
    let mut out = Vec::with_capacity(256);
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        out.clear();
        framing.frame(&line, &mut out);
        let write = || {
            let mut sink = to();
            // A closed terminal is no reason to stop draining the child's pipe.
            let _ = sink.write_all(&out).and_then(|_| sink.flush());
        };
        match relay {
            Relay::Plain => write(),
            Relay::Feeding(p) if p.take(&String::from_utf8_lossy(&line)) => {}
            Relay::Beside(p) | Relay::Feeding(p) => p.above(write),
        }
    }
}

/// A shell's view of a status: the exit code, or 128 + the signal.
fn shell_status(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Whether a rank's exit `status` may be why the job failed: not the
/// loss of a peer ([`PEER_LOST_STATUS`]), and not the launcher's own
/// SIGTERM or SIGKILL once it is `stopping` ranks.
fn is_cause(status: i32, stopping: bool) -> bool {
    let ours = [Signal::SIGTERM, Signal::SIGKILL].map(|s| 128 + s as i32);
    status != 0 && status != PEER_LOST_STATUS && !(stopping && ours.contains(&status))
}

/// Whether only ranks the job can do without (a training job's miners
/// and validators) still run, and some do: no leader among them.
fn only_expendable_left(opts: &LaunchOptions, exited: &[bool]) -> bool {
    let expendable = |r: usize| opts.expendable.get(r).copied().unwrap_or(false);
    let follower = |r: usize| expendable(r) && !opts.leaders.contains(&r);
    let running = || (0..exited.len()).filter(|&r| !exited[r]);
    running().next().is_some() && running().all(follower)
}

fn signal_alive(pids: &[Pid], exited: &[bool], sig: Signal) {
    for (pid, _) in pids.iter().zip(exited).filter(|(_, e)| !**e) {
        // The group may be gone already; that is what we wanted.
        let _ = killpg(*pid, sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_peer_or_the_launchers_own_signal_is_never_the_cause() {
        assert!(is_cause(7, false) && is_cause(7, true));
        assert!(!is_cause(PEER_LOST_STATUS, false));
        assert!(!is_cause(0, false));
        // SIGTERM and SIGKILL: ours once stopping, someone else's before.
        assert!(is_cause(143, false) && is_cause(137, false));
        assert!(!is_cause(143, true) && !is_cause(137, true));
        assert!(is_cause(128 + 11, true), "a crash is a cause");
    }

    #[test]
    fn relayed_lines_carry_the_prefix_or_are_json_and_end_in_a_newline() {
        let input: &[u8] = b"hello\npartial";
        let sink = std::sync::Mutex::new(Vec::new());
        struct Sink<'a>(&'a std::sync::Mutex<Vec<u8>>);
        impl Write for Sink<'_> {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let tagged = Framing::Tagged("[r1 miner s0] ".into());
        relay_lines(input, &tagged, || Sink(&sink), &Relay::Plain);
        let json = Framing::Json {
            label: "r1 miner s0".into(),
            stream: "stderr",
        };
        relay_lines(
            &b"{\"level\":\"INFO\"}\nplain"[..],
            &json,
            || Sink(&sink),
            &Relay::Plain,
        );
        let text = String::from_utf8(sink.into_inner().unwrap()).unwrap();
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        assert_eq!(
            lines[..2],
            ["[r1 miner s0] hello\n", "[r1 miner s0] partial\n"]
        );
        assert_eq!(
            lines[2], "{\"level\":\"INFO\"}\n",
            "a rank's JSON passes as it is"
        );
        assert!(lines[3].contains("\"message\":\"plain\"") && lines[3].ends_with("}\n"));
    }

    #[test]
    fn killed_by_signal_reads_as_128_plus_signal() {
        assert_eq!(shell_status(ExitStatus::from_raw(15)), 128 + 15);
        assert_eq!(shell_status(ExitStatus::from_raw(7 << 8)), 7);
    }
}
