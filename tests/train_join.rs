//! Ranks that join a training job while it trains, and leave it again:
//! real `swarmrun launch` and `swarmrun join` processes over TCP. The
//! oracle is the run where nobody joined: exact fixed-point sums and
//! microbatch ids that fix the data make every loss bit the same.
//!
//! `[[faults.hold]]` makes the orchestrator wait, before given windows,
//! until the joiners have come and until they have gone, so the test runs
//! the same way on a fast and on a busy host.

mod common;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use common::join::*;
use common::train::*;
use common::*;

/// Two miners of a second site join before window 3, mine, are asked to
/// leave (SIGTERM to their launcher) and are gone before window 8. Every
/// loss has the bits of the run where nobody joined, no window is redone,
/// and the joiners were placed between windows, on the stage each helps
/// most, with the stage's state (the orchestrator compares every miner's
/// weight digests with its stage's after each step, and the run would
/// fail on a joiner that differs).
#[test]
fn a_site_that_joins_and_leaves_changes_no_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (clean, _) = run(&train_job(dir.path(), "clean", 2, 12, ""));

    let port = free_port();
    let holds = "\n[faults]\nclock = \"model\"\n\n\
                 [[faults.hold]]\nwindow = 3\njoined = 2\n\n\
                 [[faults.hold]]\nwindow = 8\nleft = true\n";
    let job = joinable_job(dir.path(), "joined", port, 12, holds);
    let mut launch = Launched::start(&job);
    launch.read_until("joins: swarmrun join");
    // Window 2 is done, so the joiners come while window 3 is held back.
    launch.read_until("window     2");

    let rdzv = format!("tcp://127.0.0.1:{port}");
    let stranger = start(
        swarmrun().args(["join", "--rdzv", &rdzv]).arg(&job),
        &"77".repeat(32),
    );
    let joiners = start(
        swarmrun()
            .args(["join", "-n", "2", "--site", "lab", "--rdzv", &rdzv])
            .arg(&job),
        KEY,
    );
    launch.read_until("joined stage");
    launch.read_until("joined stage");
    kill(Pid::from_raw(joiners.id() as i32), Signal::SIGTERM).unwrap();
    let joined = joiners.wait_with_output().unwrap();
    assert!(
        joined.status.success(),
        "the joiners left cleanly: {}",
        stderr(&joined)
    );
    let (status, text, err) = launch.finish();
    assert!(status.success(), "{text}\n{err}");
    let refused = stranger.wait_with_output().unwrap();
    assert!(!refused.status.success(), "the stranger was let in");
    assert!(err.contains("join door: refused"), "{err}");

    assert_eq!(losses(&clean), losses(&metrics_of(&job)));
    for line in metrics_of(&job) {
        assert_eq!(field(&line, "attempts"), "1", "no window redone: {line}");
    }
    // Placed between windows 2 and 3: the first joined line comes after
    // window 2's line and before window 3's.
    let at = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("{needle}\n{text}"))
    };
    assert!(at("window     2") < at("joined stage"), "{text}");
    assert!(at("joined stage") < at("window     3"), "{text}");
    // By the model clock stage 1 (blocks and the LM head) is the
    // bottleneck: the first joiner goes there, the second to stage 0.
    assert_eq!(
        text.matches("(site lab) joined stage 1").count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.matches("(site lab) joined stage 0").count(),
        1,
        "{text}"
    );
}

/// A rank that joins while window 3 closes (the orchestrator holds the
/// close, once every stage has reduced, until it has joined) is placed at
/// the boundary, before window 4: window 3 is not redone and no loss
/// changes.
#[test]
fn a_join_while_a_window_closes_waits_for_the_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let (clean, _) = run(&train_job(dir.path(), "clean", 2, 6, ""));
    let port = free_port();
    let hold = "\n[[faults.hold]]\nwindow = 3\nphase = \"close\"\njoined = 1\n";
    let job = joinable_job(dir.path(), "closing", port, 6, hold);
    let mut launch = Launched::start(&job);
    launch.read_until("holding window 3 (Close)");
    let joiner = start(
        swarmrun()
            .args(["join", "--rdzv", &format!("tcp://127.0.0.1:{port}")])
            .arg(&job),
        KEY,
    );
    let (status, text, err) = launch.finish();
    assert!(status.success(), "{text}\n{err}");
    assert!(joiner.wait_with_output().unwrap().status.success());
    let at = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("{needle}\n{text}"))
    };
    assert!(at("window     3") < at("joined stage"), "{text}");
    assert!(at("joined stage") < at("window     4"), "{text}");
    let lines = metrics_of(&job);
    assert!(
        lines.iter().all(|l| field(l, "attempts") == "1"),
        "{lines:?}"
    );
    assert_eq!(losses(&clean), losses(&lines));
}

/// `join --timeout`, as `launch --timeout`: joiners still running past it
/// (here knocking at a rendezvous that takes their connection and never
/// answers) are stopped and `join` exits 124 saying why; a mistyped limit
/// is refused before anything starts.
#[test]
fn a_join_past_its_timeout_is_stopped_with_status_124() {
    let dir = tempfile::tempdir().unwrap();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let job = joinable_job(dir.path(), "silent", port, 6, "");
    let rdzv = format!("tcp://127.0.0.1:{port}");
    let joiner = start(
        swarmrun()
            .args(["join", "-n", "2", "--timeout", "2", "--grace-period", "1"])
            .args(["--rdzv", &rdzv])
            .arg(&job),
        KEY,
    );
    let out = joiner.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(124), "{err}");
    assert!(err.contains("ran past its time limit of 2s"), "{err}");
    assert!(
        !err.contains("exited with status"),
        "joiners stopped as told are no failure: {err}"
    );
    drop(silent);
    let rest = [
        std::ffi::OsStr::new("--rdzv"),
        rdzv.as_ref(),
        job.as_os_str(),
    ];
    assert_bad_timeouts_refused(&["join"], &rest);
}
