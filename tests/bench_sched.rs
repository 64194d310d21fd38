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

/// `--json` keeps the printed table as data with the machine it ran on,
/// and `bench report` puts it into its section of a document, leaving
/// the prose around it.
#[test]
fn bench_json_records_the_table_and_report_fills_its_section() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("sched.json");
    let out = swarmrun()
        .args([
            "bench",
            "sched",
            "--miners",
            "10,100",
            "--windows",
            "2",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(record["bench"], "sched");
    assert!(record["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(record["machine"]["memcpy_gbps"].as_f64().unwrap() > 0.0);
    let table = &record["tables"][0];
    assert_eq!(table["columns"][4], "us_per_microbatch");
    let printed: Vec<Vec<String>> = stdout(&out)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect();
    let rows = table["rows"].as_array().unwrap();
    assert_eq!(rows.len(), printed.len());
    for (row, line) in rows.iter().zip(&printed) {
        assert_eq!(row[0].to_string(), line[0]);
        let printed_us: f64 = line[4].parse().unwrap();
        assert!(
            (row[4].as_f64().unwrap() - printed_us).abs() < 0.01,
            "{row} {line:?}"
        );
    }

    let results = dir.path().join("results");
    std::fs::create_dir(&results).unwrap();
    std::fs::rename(&json, results.join("sched.json")).unwrap();
    let text = bench_report(
        dir.path(),
        &results,
        "# B\nkept\n<!-- bench sched -->\nold table\n<!-- /bench sched -->\nkept too\n",
    );
    assert!(
        text.starts_with("# B\nkept\n<!-- bench sched -->\n"),
        "{text}"
    );
    assert!(
        text.ends_with("<!-- /bench sched -->\nkept too\n"),
        "{text}"
    );
    assert!(!text.contains("old table"), "{text}");
    assert!(
        text.contains("| miners | stages | microbatches |"),
        "{text}"
    );
    assert!(text.contains("\n| 100 | 2 | 100 |"), "{text}");
}
