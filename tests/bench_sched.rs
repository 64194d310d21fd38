//! `swarmrun bench sched` end to end: the table's shape for the swarm
//! sizes asked for, and every simulated window decided and written.

mod common;

use common::*;

#[test]
fn bench_sched_prints_a_row_per_swarm_size_with_its_stages_and_microbatches() {
    let out = swarmrun()
        .args(["bench", "sched", "--miners", "10,250", "--windows", "2"])
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    // 10 miners: 2 stages of 5, 2 microbatches per miner: 10 per window.
    // 250: 2 stages of 125 (stages hold 100 from 200 miners on: 250 / 100
    // rounds down to 2), 250 microbatches.
    let shapes: Vec<&[&str]> = rows.iter().map(|r| &r[..3]).collect();
    assert_eq!(
        shapes,
        [&["10", "2", "10"][..], &["250", "2", "250"][..]],
        "{text}"
    );
    for row in &rows {
        let per_window: f64 = row[3].parse().unwrap();
        let per_microbatch: f64 = row[4].parse().unwrap();
        assert!(per_window > 0.0 && per_microbatch > 0.0, "{text}");
    }
}
