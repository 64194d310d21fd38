//! `swarmrun rank` under a real OpenMPI `mpirun`: no MPI linked, rank and
//! size read from OMPI_COMM_WORLD_*.
//!
//! `launch/test.sh` installs OpenMPI; without it these tests fail rather
//! than pass silently, unless SWARMRUN_SKIP_MPIRUN=1 says so on purpose.

mod common;

use std::process::Command;

use common::*;

fn mpirun() -> Option<Command> {
    let found = Command::new("mpirun").arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("SWARMRUN_SKIP_MPIRUN").is_some(),
            "mpirun not found: run ./launch/test.sh (it installs openmpi-bin) or set SWARMRUN_SKIP_MPIRUN=1"
        );
        return None;
    }
    let mut cmd = Command::new("mpirun");
    if nix::unistd::geteuid().is_root() {
        cmd.arg("--allow-run-as-root");
    }
    cmd.args(["--oversubscribe", "--bind-to", "none"]);
    Some(cmd)
}

#[test]
fn hello_job_runs_under_mpirun_with_4_ranks() {
    let Some(mut cmd) = mpirun() else { return };
    let key = "ab".repeat(32);
    let out = cmd
        .args(["-n", "4", "-x", "SWARMRUN_JOB_KEY"])
        .env("SWARMRUN_JOB_KEY", &key)
        .arg(env!("CARGO_BIN_EXE_swarmrun"))
        .args([
            "rank",
            "--rdzv",
            &format!("tcp://127.0.0.1:{}", free_port()),
        ])
        .arg(repo_file("configs/hello.toml"))
        .output()
        .unwrap();
    assert_hello_under(&out, 4, "OpenMPI");
}

#[test]
fn mpirun_ranks_meet_through_a_file_rendezvous() {
    let Some(mut cmd) = mpirun() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = cmd
        .args(["-n", "3", "-x", "SWARMRUN_JOB_KEY"])
        .env("SWARMRUN_JOB_KEY", "cd".repeat(32))
        .arg(env!("CARGO_BIN_EXE_swarmrun"))
        .args([
            "rank",
            "--rdzv",
            &format!("file://{}", dir.path().display()),
        ])
        .arg(repo_file("configs/hello.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out).matches("barrier passed").count(), 3);
}

/// With the `mpi` feature, a site whose fabric is `mpi` runs its ranks'
/// messages over MPI point-to-point inside `mpirun` (rsmpi over the system
/// OpenMPI), after a TCP rendezvous as usual.
#[cfg(feature = "mpi")]
#[test]
fn the_mpi_fabric_carries_the_hello_ring_under_mpirun() {
    let Some(mut cmd) = mpirun() else { return };
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        dir.path(),
        "job.toml",
        "[job]\nname = \"t\"\ntask = \"hello\"\n\n[[site]]\nname = \"local\"\n\
         hosts = \"localhost\"\nranks_per_host = 3\nfabric = \"mpi\"\n",
    );
    let out = cmd
        .args(["-n", "3", "-x", "SWARMRUN_JOB_KEY"])
        .env("SWARMRUN_JOB_KEY", "ef".repeat(32))
        .arg(env!("CARGO_BIN_EXE_swarmrun"))
        .args([
            "rank",
            "--rdzv",
            &format!("tcp://127.0.0.1:{}", free_port()),
        ])
        .arg(&job)
        .output()
        .unwrap();
    assert_hello_under(&out, 3, "OpenMPI");
}

/// `launch/mpirun/train.sh` with the example hostfile trains a job to its
/// end under mpirun, with the losses of the same job under
/// `swarmrun launch`.
#[test]
fn the_mpirun_script_trains_a_job_with_the_example_hostfile() {
    use common::train::{field, metrics_of, run, train_job};
    if mpirun().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (launched, _) = run(&train_job(dir.path(), "launched", 2, 6, ""));
    let job = train_job(dir.path(), "mpirun", 2, 6, "");
    let out = Command::new(repo_file("launch/mpirun/train.sh"))
        .args(["--port", &free_port().to_string()])
        .arg(&job)
        .env("SWARMRUN", env!("CARGO_BIN_EXE_swarmrun"))
        .env_remove("SWARMRUN_JOB_KEY")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("OpenMPI"), "{}", stdout(&out));
    let losses = |lines: &[String]| -> Vec<String> {
        let pick = |l: &String| format!("{} {}", field(l, "loss"), field(l, "val_loss"));
        lines.iter().map(pick).collect()
    };
    assert_eq!(losses(&launched), losses(&metrics_of(&job)));
}
