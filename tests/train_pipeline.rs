//! The training job end to end: an orchestrator, miners per stage and a
//! validator as real processes over TCP.

mod common;

use std::path::PathBuf;
use std::process::Output;

use common::train::*;
use common::*;

#[test]
fn two_stages_of_two_miners_train_and_the_loss_goes_down() {
    let dir = tempfile::tempdir().unwrap();
    let (lines, _) = run(&train_job(dir.path(), "two", 2, 25, ""));
    assert_eq!(lines.len(), 25, "one line per window");
    assert!(
        lines[0].starts_with("{\"window\":0,\"step\":1,"),
        "{}",
        lines[0]
    );
    let loss: Vec<f32> = lines
        .iter()
        .map(|l| field(l, "loss").parse().unwrap())
        .collect();
    // Untrained, a 65-symbol model scores about ln 65 = 4.17.
    assert!((loss[0] - 65f32.ln()).abs() < 0.3, "{loss:?}");
    let (head, tail) = (
        loss[..5].iter().sum::<f32>(),
        loss[20..].iter().sum::<f32>(),
    );
    assert!(tail < head - 0.5, "the loss did not go down: {loss:?}");
    // Validation every 5 windows: windows 4, 9, ..., 24.
    let evaluated: Vec<usize> = (0..25)
        .filter(|&w| field(&lines[w], "val_loss") != "null")
        .collect();
    assert_eq!(evaluated, vec![4, 9, 14, 19, 24]);
    for l in &lines {
        let bubble: f64 = field(l, "bubble").parse().unwrap();
        assert!((0.0..1.0).contains(&bubble), "{l}");
        assert_eq!(field(l, "attempts"), "1", "{l}");
    }
}

/// Per-microbatch work is deterministic and the window's gradients are
/// summed in fixed point, so how the model is cut and which miner serves
/// which microbatch changes no bit of any loss.
#[test]
fn one_two_and_four_stages_give_bit_identical_losses_for_20_windows() {
    let dir = tempfile::tempdir().unwrap();
    let one = losses(&run(&train_job(dir.path(), "one", 1, 20, "")).0);
    let two = losses(&run(&train_job(dir.path(), "two", 2, 20, "")).0);
    let four = losses(&run(&train_job(dir.path(), "four", 4, 20, "")).0);
    assert_eq!(one.len(), 20);
    assert_eq!(one, two);
    assert_eq!(one, four);
}

/// Miner 3 (stage 1) exits after serving its first microbatch of window 5:
/// the window is redone around it and every loss, before and after, has
/// the bits of the run where nobody left. A microbatch lost or counted
/// twice would change them.
#[test]
fn a_miner_killed_mid_window_changes_no_loss_and_the_job_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let (clean, _) = run(&train_job(dir.path(), "clean", 2, 10, ""));
    let crash = "[[faults.crash]]\nrank = 3\nexit_code = 9\nwindow = 5\n";
    let (crashed, err) = run(&train_job(dir.path(), "crashed", 2, 10, crash));
    assert!(
        err.contains("rank 3 (r3 miner s1) exited with status 9; the job goes on without it"),
        "{err}"
    );
    assert!(err.contains("lost miner 3 of stage 1"), "{err}");
    assert_eq!(losses(&clean), losses(&crashed));
    let attempts: Vec<&str> = crashed.iter().map(|l| field(l, "attempts")).collect();
    assert_eq!(attempts[..5], ["1"; 5]);
    assert_ne!(attempts[5], "1", "window 5 was redone: {:?}", crashed[5]);
    assert_eq!(attempts[6..], ["1"; 4]);
}

/// Miner 3 (stage 1) stops itself with SIGSTOP after serving its first
/// microbatch of window 5, its connections open: no error anywhere says
/// it is gone. Its microbatches overrun the serving deadline, it answers
/// no liveness ping, and it is evicted; the window is redone without it
/// and every loss keeps the bits of the run where nobody stopped. The
/// launcher kills the stopped process once the job is done.
#[test]
fn a_stopped_miner_is_evicted_and_no_loss_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (clean, _) = run(&train_job(dir.path(), "clean", 2, 10, ""));
    let hang = "[[faults.hang]]\nrank = 3\nwindow = 5\n";
    let (stopped, err) = run(&train_job(dir.path(), "stopped", 2, 10, hang));
    assert!(err.contains("stopping (SIGSTOP) during window 5"), "{err}");
    assert!(err.contains("rank 3 answered no liveness ping"), "{err}");
    assert_eq!(losses(&clean), losses(&stopped));
    let attempts: Vec<&str> = stopped.iter().map(|l| field(l, "attempts")).collect();
    assert_eq!(attempts[..5], ["1"; 5]);
    assert_ne!(attempts[5], "1", "window 5 was redone: {:?}", stopped[5]);
    // The deadlines the run set itself are in its metrics.
    for line in &stopped {
        let serving: f64 = field(line, "progress_deadline_s").parse().unwrap();
        let answer: f64 = field(line, "answer_deadline_s").parse().unwrap();
        let close: f64 = field(line, "close_deadline_s").parse().unwrap();
        assert!(serving >= 2.0 && answer >= 2.0 && close >= 5.0, "{line}");
    }
}

/// Miner 3 (stage 1) takes five times as long for every pass, timed by the
/// model clock so that routing follows the job file: it is routed fewer
/// microbatches than miner 5 beside it, answers its liveness pings and is
/// never evicted, and every loss keeps the bits of the healthy run.
#[test]
fn a_slow_miner_is_routed_fewer_microbatches_and_no_loss_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (clean, _) = run(&train_job(dir.path(), "healthy", 2, 10, ""));
    let slow = "[faults]\nclock = \"model\"\n\n[[faults.slow]]\nrank = 3\nfactor = 5.0\n";
    let job = train_job(dir.path(), "slow", 2, 10, slow);
    let (slowed, err) = run(&job);
    assert!(!err.contains("evicting"), "{err}");
    assert_eq!(losses(&clean), losses(&slowed));
    let chain = swarmrun::ledger::read(&job.with_extension("")).unwrap();
    let passes = |rank: usize| -> u64 {
        let of_rank = chain.records.iter().flat_map(|r| &r.miners);
        of_rank.filter(|m| m.rank == rank).map(|m| m.verified).sum()
    };
    assert!(
        passes(3) < passes(5),
        "slow miner 3 credited {} passes, miner 5 beside it {}",
        passes(3),
        passes(5)
    );
}

/// Stage 0 has miners 2, 4, 6 and the heavier stage 1 has 3 and 5 (timed
/// by the model clock, so the host's load decides nothing): a third miner
/// on stage 1 would only lift its capacity 1.5x, so nobody moves. When 3
/// leaves, one of stage 0's miners moves to stage 1, taking over its
/// weights and optimizer state from a miner there. The losses keep the
/// bits of the run where nobody left.
#[test]
fn a_miner_moves_to_the_stage_that_lost_one_and_no_loss_changes() {
    let dir = tempfile::tempdir().unwrap();
    let job = sized_train_job(dir.path(), "clean", HEAVY_STAGE_1, 7, 14, "");
    let out = swarmrun().arg("launch").arg(&job).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains("moving miner"), "{}", stdout(&out));
    let clean = metrics_of(&job);
    let crash = "[[faults.crash]]\nrank = 3\nexit_code = 9\nwindow = 3\n";
    let job = sized_train_job(dir.path(), "moved", HEAVY_STAGE_1, 7, 14, crash);
    let out = swarmrun().arg("launch").arg(&job).output().unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(
        text.contains("from stage 0 to stage 1 (the bottleneck)"),
        "{text}"
    );
    assert_eq!(losses(&clean), losses(&metrics_of(&job)));
}

#[test]
fn a_stage_left_without_miners_ends_the_job_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let crash = "[[faults.crash]]\nrank = 3\nexit_code = 9\nwindow = 2\n\n\
                 [[faults.crash]]\nrank = 5\nexit_code = 9\nwindow = 2\n";
    let job = train_job(dir.path(), "empty", 2, 10, crash);
    let out = swarmrun().arg("launch").arg(&job).output().unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("stage 1 has no miner left"),
        "{}",
        stderr(&out)
    );
}

/// Checkpoints after windows 3, 7 and 11 of 12 or 14.
const EVERY_4: &str = "checkpoint_every = 4\n";

/// Runs `job(name, extra)` as "whole" without faults, then as "cut" with
/// `faults` and the orchestrator exiting in window 9, and returns the
/// whole run's metrics and the cut run's output.
fn whole_and_cut(job: impl Fn(&str, &str) -> PathBuf, faults: &str) -> (Vec<String>, Output) {
    let (whole, _) = run(&job("whole", EVERY_4));
    let faults =
        format!("{EVERY_4}{faults}\n[[faults.crash]]\nrank = 0\nexit_code = 5\nwindow = 9\n");
    let cut = swarmrun()
        .arg("launch")
        .arg(job("cut", &faults))
        .output()
        .unwrap();
    // Ranks that only noticed the orchestrator gone exit with 75; the
    // launcher reports the cause, whichever it reaps first.
    assert_eq!(cut.status.code(), Some(5), "{}", stderr(&cut));
    assert!(
        stderr(&cut).contains("exiting with status 5 during window 9"),
        "{}",
        stderr(&cut)
    );
    (whole, cut)
}

/// `launch --resume` of the cut run, without faults; asserts its losses
/// are the whole run's, bit for bit, and returns its output.
fn resume_cut(job: impl Fn(&str, &str) -> PathBuf, whole: &[String]) -> Output {
    let job = job("cut", EVERY_4);
    let out = swarmrun()
        .args(["launch", "--resume"])
        .arg(&job)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(losses(whole), losses(&metrics_of(&job)));
    out
}

/// The orchestrator dies in window 9; checkpoints were written after
/// windows 3 and 7. `launch --resume` continues from window 8 and the
/// metrics end with the loss bits of the run that was never interrupted.
#[test]
fn a_resumed_run_continues_the_exact_loss_sequence_of_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let job = |name: &str, extra: &str| train_job(dir.path(), name, 2, 12, extra);
    let (whole, _) = whole_and_cut(job, "");
    let checkpoints = dir.path().join("cut/checkpoints");
    let mut kept: Vec<String> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(kept, ["window-00000003", "window-00000007"]);

    // Without --resume the run directory is not reused.
    let again = swarmrun()
        .arg("launch")
        .arg(job("cut", EVERY_4))
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("pass --resume"),
        "{}",
        stderr(&again)
    );

    let out = resume_cut(job, &whole);
    assert!(
        stdout(&out).contains("resuming after window 7"),
        "{}",
        stdout(&out)
    );

    // The last checkpoint samples text from the corpus' alphabet.
    let sample = swarmrun()
        .args(["sample", "--tokens", "50", "--prompt", "ROMEO:"])
        .arg(dir.path().join("cut"))
        .output()
        .unwrap();
    assert!(sample.status.success(), "{}", stderr(&sample));
    assert!(stdout(&sample).starts_with("ROMEO:"));
    assert!(
        stderr(&sample).contains("window-00000011"),
        "{}",
        stderr(&sample)
    );
}

/// Miners move, then the orchestrator dies: the resumed run must give each
/// miner the stage it had moved to (the checkpoint's), bring back the
/// miner lost before the checkpoint, and still repeat every loss bit.
#[test]
fn a_run_resumed_after_miners_moved_keeps_their_stages_and_its_losses() {
    let dir = tempfile::tempdir().unwrap();
    let job =
        |name: &str, extra: &str| sized_train_job(dir.path(), name, HEAVY_STAGE_1, 7, 14, extra);
    let miner_leaves = "\n[[faults.crash]]\nrank = 3\nexit_code = 9\nwindow = 3\n";
    let (whole, cut) = whole_and_cut(job, miner_leaves);
    assert!(
        stdout(&cut).contains("to stage 1 (the bottleneck)"),
        "{}",
        stdout(&cut)
    );
    resume_cut(job, &whole);
}

#[test]
fn resuming_with_another_stage_count_is_refused_and_names_both() {
    let dir = tempfile::tempdir().unwrap();
    run(&train_job(
        dir.path(),
        "run",
        2,
        4,
        "checkpoint_every = 2\n",
    ));
    let job = train_job(dir.path(), "run", 1, 4, "checkpoint_every = 2\n");
    let out = swarmrun()
        .args(["launch", "--resume"])
        .arg(&job)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(
            "cannot resume from the checkpoint of window 3: it has 2 stages, the job file 1"
        ),
        "{}",
        stderr(&out)
    );
}

/// Boundary tensors coded as int4 with zstd: at least 5x fewer bytes on
/// the wire (the tiny model's 32 values a token become 16 bytes of codes
/// and 2 of scale), and the model learns almost as well as with f32.
#[test]
fn int4_boundaries_cut_the_wire_bytes_and_barely_change_the_losses() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, _) = run(&train_job(dir.path(), "plain", 2, 12, ""));
    let codec = "\n[pipeline.compression]\nquant = \"int4\"\nzstd = true\n";
    let (coded, _) = run(&train_job(dir.path(), "coded", 2, 12, codec));
    for (p, c) in plain.iter().zip(&coded) {
        assert_eq!(field(p, "compression"), "1.00", "{p}");
        let ratio: f64 = field(c, "compression").parse().unwrap();
        assert!(ratio >= 5.0, "{c}");
    }
    // Single windows are noisy; their sum is not.
    let total = |lines: &[String]| -> f64 {
        lines
            .iter()
            .map(|l| field(l, "loss").parse::<f64>().unwrap())
            .sum()
    };
    let (p, c) = (total(&plain), total(&coded));
    assert!((p - c).abs() < 0.01 * p, "{plain:?}\n{coded:?}");
    let single = run(&train_job(dir.path(), "single", 1, 2, "")).0;
    assert_eq!(field(&single[0], "compression"), "null", "no boundary");
}

/// A bottleneck of 2 values a token, int4-coded: the tiny model's 32-wide
/// stream (128 bytes a token in f32) crosses as 1 byte of codes and 2 of
/// scale, plus a 28-byte header per 64-token frame: 37x fewer bytes than
/// f32. The model still learns, and its checkpoint (bottleneck weights
/// included) samples text.
#[test]
fn a_bottleneck_job_sends_35x_fewer_bytes_learns_and_samples() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "checkpoint_every = 10\n\n\
                 [pipeline.compression]\nbottleneck = 2\nquant = \"int4\"\nzstd = true\n";
    let (lines, _) = run(&train_job(dir.path(), "narrow", 2, 20, extra));
    for l in &lines {
        let ratio: f64 = field(l, "compression").parse().unwrap();
        assert!(ratio >= 35.0, "{l}");
    }
    let loss: Vec<f32> = lines
        .iter()
        .map(|l| field(l, "loss").parse().unwrap())
        .collect();
    let (head, tail) = (
        loss[..5].iter().sum::<f32>(),
        loss[15..].iter().sum::<f32>(),
    );
    assert!(tail < head - 0.5, "the loss did not go down: {loss:?}");
    let sample = swarmrun()
        .args(["sample", "--tokens", "20", "--prompt", "ROMEO:"])
        .arg(dir.path().join("narrow"))
        .output()
        .unwrap();
    assert!(sample.status.success(), "{}", stderr(&sample));
    assert!(stdout(&sample).starts_with("ROMEO:"));
}
