//! Training across sites: each site's ranks talk over its own fabric
//! (shared memory here), ranks of different sites over TCP. The sums are
//! exact fixed point, so how messages travel changes no loss bit.

mod common;

use std::path::{Path, PathBuf};

use common::train::*;
use common::*;

/// `train_job`'s model and schedule with the ranks in `sites`
/// (`[[site]]` tables).
fn sites_job(dir: &Path, name: &str, sites: &str) -> PathBuf {
    let job = train_job(dir, name, 2, 10, "");
    let text = std::fs::read_to_string(&job).unwrap();
    let start = text.find("[[site]]").unwrap();
    let end = text.find("[network]").unwrap();
    let text = format!("{}{sites}\n{}", &text[..start], &text[end..]);
    std::fs::write(&job, text).unwrap();
    job
}

/// Two sites on this host, each on its own shared-memory segment, the
/// stages' miners spread over both: boundary tensors go over shared
/// memory inside a site and TCP between, each stage all-reduces inside
/// each site and then between the sites' leaders, and every loss has the
/// bits of the one-site (flat all-reduce) TCP run.
#[test]
fn two_shared_memory_sites_joined_by_tcp_train_the_bits_of_one_tcp_site() {
    let dir = tempfile::tempdir().unwrap();
    let (tcp, _) = run(&train_job(dir.path(), "tcp", 2, 10, ""));
    let sites = "[[site]]\nname = \"a\"\nhosts = \"localhost\"\nranks_per_host = 4\nfabric = \"shm\"\n\n\
                 [[site]]\nname = \"b\"\nhosts = \"localhost\"\nranks_per_host = 2\nfabric = \"shm\"\n";
    let job = sites_job(dir.path(), "sites", sites);
    let check = swarmrun().arg("check").arg(&job).output().unwrap();
    let plan = stdout(&check);
    // Each stage has a miner in both sites: (site, stage) of every miner.
    let mut miners: Vec<(String, String)> = plan
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.get(4) == Some(&"miner"))
        .map(|w| (w[1].to_string(), w[5].to_string()))
        .collect();
    miners.sort();
    let want = [("a", "0"), ("a", "1"), ("b", "0"), ("b", "1")];
    assert_eq!(
        miners,
        want.map(|(a, b)| (a.to_string(), b.to_string())),
        "{plan}"
    );
    let out = swarmrun().arg("launch").arg(&job).output().unwrap();
    let (text, err) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "{text}\n{err}");
    // Each stage all-reduces hierarchically, and validators recompute
    // slices of both levels (every slice, by default) and find nothing.
    for stage in 0..2 {
        let line = format!(
            "stage {stage}'s miners span sites {{\"a\", \"b\"}}: it all-reduces inside each site"
        );
        assert!(text.contains(&line), "{text}");
    }
    assert!(!err.contains("excluded"), "{err}");
    assert_eq!(losses(&tcp), losses(&metrics_of(&job)));
}

/// A site's leader that hands the other sites a forged partial sum (its
/// site's, doubled) is named by the validator that recomputes the slices
/// between sites, excluded, and the window redone without it; its site's
/// other miner leads from then on and the run finishes.
#[test]
fn a_site_leader_forging_its_site_s_partial_sum_is_caught_between_sites() {
    // Sites named in rank order, and against it (the leaders reduce in
    // rank order whatever the sites are called).
    for (first, second) in [("a", "b"), ("b", "a")] {
        forging_leader_is_caught(first, second);
    }
}

fn forging_leader_is_caught(first: &str, second: &str) {
    let dir = tempfile::tempdir().unwrap();
    let site = |name: &str| {
        format!(
            "[[site]]\nname = \"{name}\"\nhosts = \"localhost\"\nranks_per_host = 4\nfabric = \"shm\"\n\n"
        )
    };
    let sites = site(first) + &site(second);
    let job = sites_job(dir.path(), "forge", &sites);
    // Rank 4 is the lowest of the second site's stage-0 miners (4 and 6):
    // its leader.
    // One copy of each slice: every holder's copy is checked on its own.
    let mut text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("validators = 1\n", "validators = 1\nslice_copies = 1\n");
    text += "\n[[faults.cheat]]\nrank = 4\nkind = \"forge_partial\"\n";
    std::fs::write(&job, text).unwrap();
    let out = swarmrun().arg("launch").arg(&job).output().unwrap();
    let (text, err) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "{text}\n{err}");
    assert!(
        err.contains("lost miner 4 of stage 0 (failed a check in window 0")
            && err.contains("its site's partial sum is not the sum of its members' contributions"),
        "{err}"
    );
    let lines = metrics_of(&job);
    assert_eq!(field(&lines[0], "caught"), "[4]");
    assert_eq!(field(&lines[0], "attempts"), "2");
    assert!(lines[1..].iter().all(|l| field(l, "caught") == "[]"));
    // Nobody else was blamed: every other miner finished.
    for rank in [2, 3, 5, 6, 7] {
        assert!(!err.contains(&format!("lost miner {rank} ")), "{err}");
    }
}
