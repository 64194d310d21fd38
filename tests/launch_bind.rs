//! `swarmrun launch --bind-to core|numa|none` with hwloc: each rank's
//! affinity as the kernel reports it (`Cpus_allowed_list` of
//! `/proc/self/status`, printed by `--report-bindings`), not as we meant it.
#![cfg(feature = "hwloc")]

mod common;

use std::collections::BTreeMap;

use common::*;

/// Launches the 2-rank hello job with `args` and returns, per rank label
/// (`r0`, `r1`), its report line.
fn reports(args: &[&str]) -> BTreeMap<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let job = hello_job(dir.path(), 2, "");
    let out = swarmrun()
        .args(["launch", "-n", "2", "--report-bindings"])
        .args(args)
        .arg(&job)
        .env_remove("SWARMRUN_BIND")
        .output()
        .expect("run swarmrun launch");
    let err = stderr(&out);
    assert!(out.status.success(), "{}\n{err}", stdout(&out));
    let lines: BTreeMap<String, String> = err
        .lines()
        .filter(|l| l.contains("Cpus_allowed_list"))
        .map(|l| {
            let rank = l.trim_start_matches('[').split(' ').next().unwrap_or("");
            (rank.to_string(), l.to_string())
        })
        .collect();
    assert_eq!(lines.len(), 2, "one report per rank:\n{err}");
    lines
}

/// The kernel's list at the end of a report line.
fn allowed(report: &str) -> &str {
    report
        .rsplit("Cpus_allowed_list ")
        .next()
        .unwrap_or("")
        .trim()
}

/// `0-2,5` -> [0, 1, 2, 5].
fn cpu_list(list: &str) -> Vec<usize> {
    list.split(',')
        .flat_map(|part| {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (a, b): (usize, usize) = (a.trim().parse().unwrap(), b.trim().parse().unwrap());
            a..=b
        })
        .collect()
}

fn my_allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap();
    cpu_list(list.trim())
}

#[test]
fn bind_to_core_gives_each_rank_one_core_of_its_own() {
    let reports = reports(&["--bind-to", "core"]);
    let mut sets = Vec::new();
    for (rank, line) in &reports {
        // "bound to core I of N (cpus X); Cpus_allowed_list Y": the kernel
        // agrees with hwloc's core cpuset.
        let hwloc_cpus = line
            .split("(cpus ")
            .nth(1)
            .and_then(|s| s.split(')').next())
            .unwrap_or_else(|| panic!("{rank}: no cpus in {line:?}"));
        let kernel = allowed(line);
        assert_eq!(cpu_list(kernel), cpu_list(hwloc_cpus), "{line}");
        assert!(line.contains("bound to core "), "{line}");
        sets.push(cpu_list(kernel));
    }
    let cores: usize = reports["r0"]
        .split(" of ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("core count in the report");
    // One core each: no more CPUs than a core has (one PU here, or its
    // hyperthreads), and fewer than this process may use when there is
    // more than one core.
    let all = my_allowed_cpus();
    for set in &sets {
        assert!(!set.is_empty() && set.iter().all(|c| all.contains(c)));
        if cores > 1 {
            assert!(set.len() <= all.len() / cores, "{set:?} of {all:?}");
        }
    }
    if cores > 1 {
        assert!(reports["r0"].contains("core 0 of"), "{}", reports["r0"]);
        assert!(reports["r1"].contains("core 1 of"), "{}", reports["r1"]);
        assert_ne!(sets[0], sets[1], "two ranks, two cores: {reports:?}");
    }
}

#[test]
fn bind_to_none_leaves_every_rank_the_whole_set() {
    let all = my_allowed_cpus();
    for (rank, line) in reports(&["--bind-to", "none"]) {
        assert!(line.contains("not bound"), "{rank}: {line}");
        assert_eq!(cpu_list(allowed(&line)), all, "{rank}: {line}");
    }
}

#[test]
fn bind_to_numa_gives_each_rank_its_nodes_cpus() {
    let all = my_allowed_cpus();
    for (rank, line) in reports(&["--bind-to", "numa"]) {
        assert!(line.contains("bound to numa "), "{rank}: {line}");
        let set = cpu_list(allowed(&line));
        assert!(
            !set.is_empty() && set.iter().all(|c| all.contains(c)),
            "{line}"
        );
        // One NUMA node (this machine, most VMs): the node is the machine.
        if line.contains(" of 1 ") {
            assert_eq!(set, all, "{line}");
        }
    }
}

#[test]
fn a_rank_under_another_launcher_binds_from_swarmrun_bind() {
    // As `mpirun --bind-to none -x SWARMRUN_BIND=core swarmrun rank` would:
    // one rank, identity from RANK/WORLD_SIZE, binding from the variable.
    let dir = tempfile::tempdir().unwrap();
    let job = hello_job(dir.path(), 1, "");
    let mut cmd = swarmrun();
    for (k, _) in std::env::vars() {
        if k.starts_with("OMPI_") || k.starts_with("SLURM_") || k.starts_with("PMI") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .args([
            "rank",
            "--rdzv",
            &format!("tcp://127.0.0.1:{}", free_port()),
        ])
        .arg(&job)
        .env("RANK", "0")
        .env("WORLD_SIZE", "1")
        .env("LOCAL_RANK", "0")
        .env("SWARMRUN_JOB_KEY", "cd".repeat(32))
        .env("SWARMRUN_BIND", "core")
        .env("SWARMRUN_REPORT_BINDINGS", "1")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{}\n{err}", stdout(&out));
    let line = err
        .lines()
        .find(|l| l.contains("Cpus_allowed_list"))
        .unwrap_or_else(|| panic!("no report:\n{err}"));
    assert!(line.starts_with("bound to core 0 of "), "{line}");
}
