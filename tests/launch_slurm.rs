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
