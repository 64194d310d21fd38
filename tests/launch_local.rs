//! `swarmrun launch`: ranks as real child processes on this host.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// `swarmrun launch -n N --rdzv RDZV` of the hello job.
fn hello_command(n: usize, rdzv: &str) -> std::process::Command {
    let mut launch = swarmrun();
    launch
        .args(["launch", "-n", &n.to_string(), "--rdzv", rdzv])
        .arg(repo_file("configs/hello.toml"));
    launch
}

fn launch_hello(n: usize, rdzv: &str) -> std::process::Output {
    hello_command(n, rdzv)
        .output()
        .expect("run swarmrun launch")
}

fn assert_hello_ran(out: &std::process::Output, n: usize) {
    let text = stdout(out);
    assert!(
        out.status.success(),
        "launch failed: {}\n{}",
        text,
        stderr(out)
    );
    let passed: BTreeSet<String> = text
        .lines()
        .filter(|l| l.ends_with("barrier passed"))
        .map(|l| l.split(']').next().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        passed.len(),
        n,
        "every rank passes the barrier once:\n{text}"
    );
    let ring: Vec<&str> = text.lines().filter(|l| l.contains("ring of")).collect();
    assert_eq!(ring.len(), 1, "rank 0 alone reports the ring:\n{text}");
    assert!(ring[0].starts_with("[r0 "), "{}", ring[0]);
    assert!(
        ring[0].contains(&format!("ring of {n} ranks")),
        "{}",
        ring[0]
    );
}

#[test]
fn launch_runs_the_hello_job_with_1_4_and_8_ranks() {
    for n in [1, 4, 8] {
        let out = launch_hello(n, "tcp://127.0.0.1:0");
        assert_hello_ran(&out, n);
    }
}

/// [`launch_hello`] under the open-file limits `ulimit` sets from
/// `limits` (`-Sn 48`: the soft one; `-n 40`: both).
fn launch_hello_limited(n: usize, limits: &str) -> std::process::Output {
    let launch = hello_command(n, "tcp://127.0.0.1:0");
    let mut shell = std::process::Command::new("sh");
    for (key, value) in launch.get_envs() {
        match value {
            Some(value) => shell.env(key, value),
            None => shell.env_remove(key),
        };
    }
    shell
        .args(["-c", &format!("ulimit {limits} && exec \"$@\""), "sh"])
        .arg(launch.get_program())
        .args(launch.get_args())
        .output()
        .expect("run swarmrun launch under lowered limits")
}

#[test]
fn a_job_needing_more_open_files_than_the_soft_limit_raises_the_limit_and_runs() {
    // 16 ranks over TCP hold four descriptors per peer, 60 and more each:
    // past a soft limit of 48, which failed such a job with EMFILE in its
    // handshakes. The hard limit is the host's, untouched.
    assert_hello_ran(&launch_hello_limited(16, "-Sn 48"), 16);
}

#[test]
fn a_job_needing_more_open_files_than_the_hard_limit_is_refused_saying_so() {
    // 12 ranks need 44 descriptors each for their links alone.
    let out = launch_hello_limited(12, "-n 40");
    assert!(!out.status.success(), "{}", stdout(&out));
    let text = stdout(&out) + &stderr(&out);
    assert!(
        text.contains("links to 11 peers take about")
            && text.contains("may hold 40: raise the limit on open files"),
        "{text}"
    );
}

#[test]
fn every_output_line_is_whole_and_prefixed_with_rank_and_role() {
    let out = launch_hello(4, "tcp://127.0.0.1:0");
    for line in stdout(&out).lines() {
        assert!(
            line.starts_with("[r") && line.contains("] "),
            "line without prefix: {line:?}"
        );
        assert_eq!(line.matches("[r").count(), 1, "interleaved line: {line:?}");
    }
    assert!(stdout(&out).lines().any(|l| l.starts_with("[r0 orch] ")));
}

/// Launches the hello job on 2 ranks with `env` set, and checks that each
/// rank's start-up line, "rank i/n on HOST (..., N compute threads)", says
/// `threads`.
fn assert_compute_threads(env: &[(&str, &str)], threads: &str) {
    let out = swarmrun()
        .args(["launch", "-n", "2", "--rdzv", "tcp://127.0.0.1:0"])
        .arg(repo_file("configs/hello.toml"))
        .envs(env.iter().copied())
        .output()
        .expect("run swarmrun launch");
    assert_hello_ran(&out, 2);
    let text = stdout(&out);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" compute thread"))
        .collect();
    assert_eq!(lines.len(), 2, "one start-up line per rank:\n{text}");
    for line in lines {
        assert!(line.contains(&format!(", {threads})")), "{line}");
    }
}

#[test]
fn ranks_sharing_a_host_compute_on_one_thread_each_unless_the_user_says_otherwise() {
    assert_compute_threads(&[], "1 compute thread");
    assert_compute_threads(&[("RAYON_NUM_THREADS", "3")], "3 compute threads");
}

#[test]
fn tcp_rendezvous_on_a_fixed_port_connects_every_rank() {
    let port = free_port();
    assert_hello_ran(&launch_hello(4, &format!("tcp://127.0.0.1:{port}")), 4);
}

#[test]
fn file_rendezvous_through_a_shared_directory_connects_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let rdzv = format!("file://{}", dir.path().display());
    assert_hello_ran(&launch_hello(4, &rdzv), 4);
    // One directory per run, one record per rank.
    let runs: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(runs.len(), 1);
    let run = runs[0].as_ref().unwrap().path();
    assert_eq!(std::fs::read_dir(run).unwrap().count(), 4);
}

#[test]
fn a_failing_rank_ends_the_job_with_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let job = hello_job(
        dir.path(),
        4,
        "[hello]\nhold_s = 60\n\n[[faults.crash]]\nrank = 2\nexit_code = 7\n",
    );
    let start = Instant::now();
    let out = swarmrun().args(["launch"]).arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "the other ranks (holding 60 s) were stopped"
    );
    assert!(
        stderr(&out).contains("rank 2 exited with status 7"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn max_restarts_restarts_the_job_before_giving_up() {
    let dir = tempfile::tempdir().unwrap();
    let job = hello_job(dir.path(), 2, "[[faults.crash]]\nrank = 1\nexit_code = 3\n");
    let out = swarmrun()
        .args(["launch", "--max-restarts", "2"])
        .arg(&job)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out);
    assert!(err.contains("restarting the job (1/2)"), "{err}");
    assert!(err.contains("restarting the job (2/2)"), "{err}");
    assert!(!err.contains("(3/2)"), "{err}");
}

/// `--timeout`, as mpirun's: a job still running past it (ranks holding
/// ten minutes) is stopped, every rank, and the launch exits 124 saying
/// why; a mistyped limit is refused before anything starts.
#[test]
fn a_job_past_its_timeout_is_stopped_with_status_124() {
    let dir = tempfile::tempdir().unwrap();
    let job = hello_job(dir.path(), 3, "[hello]\nhold_s = 600\n");
    let out = swarmrun()
        .args(["launch", "--timeout", "2", "--grace-period", "1"])
        .arg(&job)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(124), "{err}");
    assert!(err.contains("ran past its time limit of 2s"), "{err}");
    assert!(
        !err.contains("exited with status"),
        "ranks stopped as told are no failure: {err}"
    );
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    let pids = rank_pids(&lines);
    assert_eq!(pids.len(), 3, "{lines:?}");
    assert!(
        pids.iter().all(|&p| !alive(p)),
        "ranks left running: {pids:?}"
    );
    assert_bad_timeouts_refused(&["launch"], &[job.as_os_str()]);
}

/// Pids the ranks report in their start-up lines.
fn rank_pids(lines: &[String]) -> Vec<i32> {
    lines
        .iter()
        .filter_map(|l| {
            l.split("pid ")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn alive(pid: i32) -> bool {
    // Zombies count as gone: the launcher reaps its children.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn a_signal_to_the_launcher_ends_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let job = hello_job(dir.path(), 4, "[hello]\nhold_s = 120\n");
    let mut child = swarmrun()
        .arg("launch")
        .arg(&job)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    while lines
        .iter()
        .filter(|l: &&String| l.ends_with("barrier passed"))
        .count()
        < 4
    {
        let mut line = String::new();
        assert_ne!(
            reader.read_line(&mut line).unwrap(),
            0,
            "launcher output ended early: {lines:?}"
        );
        lines.push(line.trim_end().to_string());
    }
    let pids = rank_pids(&lines);
    assert_eq!(pids.len(), 4, "{lines:?}");
    assert!(pids.iter().all(|p| alive(*p)));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 15));
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "ranks outlived the launcher"
    );
}
