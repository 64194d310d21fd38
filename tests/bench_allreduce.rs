//! `swarmrun bench allreduce` end to end: real ranks, the nccl-tests table,
//! and no wrong element at any size.

mod common;

use common::*;

fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

#[test]
fn bench_allreduce_prints_every_size_with_no_wrong_element() {
    let transports = if cfg!(feature = "mpi") {
        "tcp,shm,shm-registered,mpi,mpi-tcp"
    } else {
        "tcp,shm,shm-registered"
    };
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results");
    std::fs::create_dir(&results).unwrap();
    let out = swarmrun()
        .args(["bench", "allreduce", "-n", "3", "--transport", transports])
        .args([
            "--min", "4", "--max", "256K", "--iters", "2", "--warmup", "1",
        ])
        .args(["--min-time-ms", "20"])
        .arg("--json")
        .arg(results.join("allreduce.json"))
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(text.contains("memcpy"), "{text}");
    assert!(
        text.contains("at least 2 iters and 20 ms per size"),
        "{text}"
    );
    let rows = rows(&text);
    // 4 B .. 256 KiB doubling: 17 sizes per transport.
    let tables = transports.split(',').count();
    assert_eq!(rows.len(), 17 * tables, "{text}");
    for row in &rows {
        assert_eq!(row.len(), 8, "{row:?}");
        assert_eq!(row[7], "0", "wrong elements: {row:?}");
        let time_us: f64 = row[4].parse().unwrap();
        assert!(time_us > 0.0, "{row:?}");
    }
    let largest = rows.iter().find(|r| r[0] == "262144").unwrap();
    assert!(largest[6].parse::<f64>().unwrap() > 0.0, "{largest:?}");

    // The recorded tables, one per transport, chart as busbw against size.
    let text = bench_report(
        dir.path(),
        &results,
        "<!-- bench allreduce -->\n<!-- /bench allreduce -->\n",
    );
    assert_eq!(
        text.matches("| bytes | time_us |").count(),
        tables,
        "{text}"
    );
    let png = std::fs::read(dir.path().join("charts/allreduce-busbw.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG chart");
    assert!(text.contains("allreduce-busbw.png"), "{text}");
}

/// With rounds, each transport is measured that many times in turn and
/// prints one row a size (its median-time round's), under one header.
#[test]
fn bench_allreduce_in_rounds_prints_one_row_a_size() {
    let out = swarmrun()
        .args(["bench", "allreduce", "-n", "2", "--transport", "tcp,shm"])
        .args(["--min", "4", "--max", "1K", "--iters", "2", "--warmup", "1"])
        .args(["--min-time-ms", "5", "--rounds", "3"])
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(
        text.contains(
            "# 3 rounds, the transports taking turns; each size's row is its median-time round's"
        ),
        "{text}"
    );
    assert_eq!(text.matches("# ours over TCP").count(), 1, "{text}");
    let rows = rows(&text);
    // 4 B .. 1 KiB doubling: 9 sizes, for each of the two transports.
    assert_eq!(rows.len(), 2 * 9, "{text}");
    assert!(rows.iter().all(|r| r.len() == 8 && r[7] == "0"), "{text}");
}
