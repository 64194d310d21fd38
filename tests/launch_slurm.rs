//! `srun swarmrun rank` under a real one-node Slurm (started by
//! `launch/slurm-local.sh`, which `launch/test.sh` runs): identity from
//! SLURM_PROCID/SLURM_NTASKS, rendezvous derived from the step's nodelist
//! and job id, no port chosen by anyone.

mod common;

use std::process::Command;

use common::*;

fn srun_available() -> bool {
    let up = Command::new("sinfo")
        .arg("-h")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        up || std::env::var_os("SWARMRUN_SKIP_SLURM").is_some(),
        "no Slurm answers: run ./launch/test.sh (it starts a one-node Slurm via launch/slurm-local.sh) \
         or set SWARMRUN_SKIP_SLURM=1"
    );
    up
}

#[test]
fn hello_job_runs_under_srun_with_the_slurm_rendezvous() {
    if !srun_available() {
        return;
    }
    let out = Command::new("srun")
        .args(["-n", "4", "--overcommit", "--time=2", "--export=ALL"])
        .env("SWARMRUN_JOB_KEY", "5a".repeat(32))
        .env_remove("SWARMRUN_RENDEZVOUS")
        .arg(env!("CARGO_BIN_EXE_swarmrun"))
        .args(["rank", "--rdzv", "slurm"])
        .arg(repo_file("configs/hello.toml"))
        .output()
        .unwrap();
    assert_hello_under(&out, 4, "Slurm");
}

/// Waits until `path` has `count` lines containing `needle`, or the Slurm
/// job `id` is gone; returns the file's text.
fn await_lines(path: &std::path::Path, needle: &str, count: usize, id: &str) -> String {
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.matches(needle).count() >= count {
            return text;
        }
        assert!(
            slurm_job_alive(id),
            "job {id} ended before {count} x {needle:?}:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn slurm_job_alive(id: &str) -> bool {
    let out = Command::new("squeue")
        .args(["-h", "-j", id])
        .output()
        .unwrap();
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

fn sbatch(script: &str, dir: &std::path::Path, output: &str, args: &[&str]) -> String {
    let out = Command::new("sbatch")
        .args(["--parsable", "--chdir"])
        .arg(dir)
        .arg("--output")
        .arg(dir.join(output))
        .arg(repo_file(script))
        .args(args)
        .env("SWARMRUN", env!("CARGO_BIN_EXE_swarmrun"))
        .env("SWARMRUN_JOB_KEY", "3e".repeat(32))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

/// `launch/slurm/train.sbatch` trains a job under `srun`; a second
/// allocation, `launch/slurm/join.sbatch`, joins it while it trains and
/// leaves on `scancel --signal=TERM`; the losses are those of the run
/// nobody joined.
#[test]
fn a_second_slurm_allocation_joins_a_training_job_and_leaves_it() {
    use common::train::{field, metrics_of, run, train_job};
    if !srun_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (clean, _) = run(&train_job(dir.path(), "clean", 2, 12, ""));
    let holds = "\n[[faults.hold]]\nwindow = 3\njoined = 2\n\n\
                 [[faults.hold]]\nwindow = 8\nleft = true\n";
    let job = train_job(dir.path(), "slurm", 2, 12, holds);
    let job_arg = job.to_str().unwrap();
    let train = sbatch(
        "launch/slurm/train.sbatch",
        dir.path(),
        "train.out",
        &[job_arg],
    );
    let out = dir.path().join("train.out");
    let text = await_lines(&out, "window     2", 1, &train);
    let rdzv = text
        .lines()
        .find_map(|l| l.split("--rdzv ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("rank 0 printed no door:\n{text}"))
        .to_string();
    let join = sbatch(
        "launch/slurm/join.sbatch",
        dir.path(),
        "join.out",
        &[job_arg, &rdzv, "b"],
    );
    await_lines(&out, "(site b) joined stage", 2, &train);
    let cancel = Command::new("scancel")
        .args(["--signal=TERM", &join])
        .output()
        .unwrap();
    assert!(cancel.status.success(), "{}", stderr(&cancel));
    while slurm_job_alive(&train) {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.matches("as it asked").count(), 2, "{text}");
    assert!(
        text.contains("checkpoint "),
        "the job ran to its end:\n{text}"
    );
    let losses = |lines: &[String]| -> Vec<String> {
        let pick = |l: &String| format!("{} {}", field(l, "loss"), field(l, "val_loss"));
        lines.iter().map(pick).collect()
    };
    assert_eq!(losses(&clean), losses(&metrics_of(&job)));
}
