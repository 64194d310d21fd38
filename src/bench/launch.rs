//! `swarmrun bench launch -n N`: how long until all N ranks are past
//! rendezvous, for `swarmrun launch` and for `mpirun` of a trivial MPI
//! program (MPI_Init + MPI_Barrier, MPI's own rendezvous), timed in the same
//! run. Both sides measure from the launcher's start (passed to the ranks as
//! SWARMRUN_LAUNCH_T0_US) to the slowest rank's "I'm connected".

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use thiserror::Error;

use super::record::Tables;
use super::{median, mpirun};
use crate::launch::rank::ENV_LAUNCH_T0_US;

#[derive(Debug, Error)]
pub enum BenchLaunchError {
    #[error("bench launch: {0}")]
    Io(#[from] std::io::Error),
    #[error("{what} failed with {status}: {stderr}")]
    Failed {
        what: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{what}: expected {want} start-up reports, got {got}")]
    MissingReports {
        what: String,
        want: usize,
        got: usize,
    },
}

/// The trivial MPI program: start-up time of each rank after MPI's
/// rendezvous, in the same words our ranks use.
const MPI_PROGRAM: &str = r#"
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Barrier(MPI_COMM_WORLD);
    struct timeval tv; gettimeofday(&tv, NULL);
    const char *t0 = getenv("SWARMRUN_LAUNCH_T0_US");
    double now_us = (double)tv.tv_sec * 1e6 + (double)tv.tv_usec;
    double ms = t0 ? (now_us - atof(t0)) / 1e3 : -1.0;
    printf("rendezvous done %.1f ms after start\n", ms);
    MPI_Finalize();
    return 0;
}
"#;

/// One measurement: slowest rank's start-up and the launcher's whole run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    all_past_rendezvous: Duration,
    wall: Duration,
}

/// Runs the benchmark and prints its table.
pub fn run(nprocs: usize, reps: usize, tables: &mut Tables) -> Result<(), BenchLaunchError> {
    let dir = tempfile::tempdir()?;
    let job = dir.path().join("bench-launch.toml");
    std::fs::write(&job, bench_job(nprocs))?;
    let exe = std::env::current_exe()?;

    let mpi = prepare_mpi(dir.path());
    let mut ours = Vec::with_capacity(reps);
    let mut theirs = Vec::with_capacity(reps);
    // Interleave the two so drifting machine load hits both alike.
    for _ in 0..reps.max(1) {
        let mut cmd = Command::new(&exe);
        cmd.arg("launch")
            .arg("-n")
            .arg(nprocs.to_string())
            .arg(&job);
        ours.push(measure("swarmrun launch", cmd, nprocs)?);
        if let Some(prog) = &mpi {
            let mut cmd = mpirun(nprocs);
            cmd.arg(prog);
            theirs.push(measure("mpirun", cmd, nprocs)?);
        }
    }

    let summarize = |v: &[Sample]| {
        (
            median(v.iter().map(|s| s.all_past_rendezvous).collect()),
            median(v.iter().map(|s| s.wall).collect()),
        )
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (o_rdzv, o_wall) = summarize(&ours);
    println!(
        "# swarmrun bench launch: {nprocs} ranks on one host, median of {} runs",
        reps.max(1)
    );
    println!(
        "{:<34} {:>22} {:>16}",
        "launcher", "all past rdzv (ms)", "wall (ms)"
    );
    tables.start(
        format!("{nprocs} ranks on one host, median of {} runs", reps.max(1)),
        &["launcher", "all_past_rendezvous_ms", "wall_ms"],
    );
    let mut row = |launcher: &str, rdzv: f64, wall: f64| {
        println!("{launcher:<34} {rdzv:>22.1} {wall:>16.1}");
        tables.row(vec![launcher.into(), rdzv.into(), wall.into()]);
    };
    row("swarmrun launch (hello, 1 round)", ms(o_rdzv), ms(o_wall));
    match &mpi {
        Some(_) => {
            let (m_rdzv, m_wall) = summarize(&theirs);
            row("mpirun (MPI_Init + MPI_Barrier)", ms(m_rdzv), ms(m_wall));
            println!(
                "{:<34} {:>21.2}x {:>15.2}x",
                "ratio mpirun / swarmrun",
                ms(m_rdzv) / ms(o_rdzv),
                ms(m_wall) / ms(o_wall)
            );
        }
        None => println!(
            "mpirun/mpicc not found: no reference measured (install openmpi-bin libopenmpi-dev)"
        ),
    }
    Ok(())
}

/// The job our ranks run: the smoke job, one ring round, all on this host.
fn bench_job(nprocs: usize) -> String {
    format!(
        "[job]\nname = \"bench-launch\"\ntask = \"hello\"\n\n[hello]\nrounds = 1\n\n\
         [[site]]\nname = \"local\"\nhosts = \"localhost\"\nranks_per_host = {nprocs}\n\n\
         [network]\nrendezvous = \"tcp://127.0.0.1:0\"\n"
    )
}

/// Compiles the trivial MPI program, or `None` without mpicc/mpirun.
fn prepare_mpi(dir: &Path) -> Option<PathBuf> {
    let src = dir.join("mpi_hello.c");
    let bin = dir.join("mpi_hello");
    std::fs::write(&src, MPI_PROGRAM).ok()?;
    let ok = Command::new("mpicc")
        .arg("-O2")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?
        .success();
    let has_mpirun = Command::new("mpirun")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    (ok && has_mpirun).then_some(bin)
}

/// Runs one launch with the start time in its environment and reads every
/// rank's "rendezvous done X ms after start" line.
fn measure(what: &str, mut cmd: Command, nprocs: usize) -> Result<Sample, BenchLaunchError> {
    let t0_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    let start = Instant::now();
    let out = cmd
        .env(ENV_LAUNCH_T0_US, t0_us.to_string())
        .stdin(Stdio::null())
        .output()?;
    let wall = start.elapsed();
    if !out.status.success() {
        return Err(BenchLaunchError::Failed {
            what: what.to_string(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let reports: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let rest = l.split("rendezvous done ").nth(1)?;
            rest.split(" ms after start").next()?.trim().parse().ok()
        })
        .collect();
    if reports.len() != nprocs {
        return Err(BenchLaunchError::MissingReports {
            what: what.to_string(),
            want: nprocs,
            got: reports.len(),
        });
    }
    let slowest = reports.iter().cloned().fold(0.0_f64, f64::max);
    Ok(Sample {
        all_past_rendezvous: Duration::from_secs_f64(slowest / 1e3),
        wall,
    })
}
