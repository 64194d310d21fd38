//! Logs through `tracing`: `--log-format json` turns a real training
//! job's output into JSON lines with its spans (window, stage passes,
//! all-reduce, audits, checkpoint) and events (each window's loss, as in
//! metrics.jsonl); `RUST_LOG` filters; the person's lines stay as they were.

mod common;

use std::collections::BTreeSet;

use serde_json::Value;

use common::train::*;
use common::*;

/// A 3-window job that checkpoints, so every kind of span closes.
fn job(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    train_job(dir, name, 2, 3, "checkpoint_every = 2\n")
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn json_logs_carry_each_ranks_spans_and_the_windows_losses() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path(), "json");
    let out = swarmrun()
        .args(["--log-format", "json", "launch"])
        .arg(&job)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&stdout(&out));
    json_lines(&stderr(&out));

    // Spans closed, by name, each inside its rank's span.
    let mut closed = BTreeSet::new();
    let mut ranks = BTreeSet::new();
    for l in lines.iter().filter(|l| l["fields"]["message"] == "close") {
        let name = l["span"]["name"].as_str().unwrap().to_string();
        if name == "rank" {
            ranks.insert(l["span"]["rank"].as_u64().unwrap());
        } else {
            assert_eq!(l["spans"][0]["name"], "rank", "{l}");
            assert!(l["fields"]["time.busy"].is_string(), "{l}");
        }
        closed.insert(name);
    }
    for name in [
        "window",
        "passes",
        "all_reduce",
        "checkpoint",
        "slice_recompute",
    ] {
        assert!(closed.contains(name), "no {name} span in {closed:?}");
    }
    assert_eq!(ranks, (0..6).collect(), "every rank's span closed");

    // Each window's event has the loss metrics.jsonl has, and the line.
    let windows: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["window"].is_u64() && l["fields"]["loss"].is_number())
        .collect();
    let metrics = metrics_of(&job);
    assert_eq!(windows.len(), metrics.len());
    for (event, line) in windows.iter().zip(&metrics) {
        let loss = event["fields"]["loss"].as_f64().unwrap() as f32;
        assert_eq!(loss, field(line, "loss").parse::<f32>().unwrap());
        let message = event["fields"]["message"].as_str().unwrap();
        assert!(message.starts_with("window "), "{message}");
        assert_eq!(event["spans"][0]["role"], "orchestrator");
    }
}

/// A miner that dies is an event a machine can pick out: its kind and
/// rank are fields, not only words in the line.
#[test]
fn a_lost_miner_is_a_json_event_with_its_rank() {
    let dir = tempfile::tempdir().unwrap();
    let crash = "\n[[faults.crash]]\nrank = 5\nexit_code = 9\nwindow = 1\n";
    let job = train_job(dir.path(), "lost", 2, 3, crash);
    let out = swarmrun()
        .args(["--log-format", "json", "launch"])
        .arg(&job)
        .output()
        .unwrap();
    let lines = json_lines(&stdout(&out));
    let lost: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["event"] == "lost")
        .collect();
    assert_eq!(lost.len(), 1, "{}", stdout(&out));
    assert_eq!(lost[0]["fields"]["rank"], 5);
    assert_eq!(lost[0]["level"], "WARN");
    assert!(lost[0]["fields"]["message"]
        .as_str()
        .unwrap()
        .contains("lost miner 5"));
    assert_eq!(metrics_of(&job).len(), 3, "the job trained on without it");
}

#[test]
fn rust_log_filters_and_text_keeps_the_lines_a_person_reads() {
    let dir = tempfile::tempdir().unwrap();
    // Warnings only: a clean run says nothing.
    let quiet = swarmrun()
        .args(["--log-format", "json", "launch"])
        .arg(job(dir.path(), "quiet"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(quiet.status.success(), "{}", stderr(&quiet));
    assert!(
        json_lines(&stdout(&quiet))
            .iter()
            .all(|l| l["level"] == "WARN" || l["level"] == "ERROR"),
        "{}",
        stdout(&quiet)
    );

    // Text: the window lines as ever on stdout, tagged; with RUST_LOG the
    // spans' timings on stderr.
    let text = swarmrun()
        .arg("launch")
        .arg(job(dir.path(), "text"))
        .env("RUST_LOG", "swarmrun=debug")
        .output()
        .unwrap();
    assert!(text.status.success(), "{}", stderr(&text));
    let (out, err) = (stdout(&text), stderr(&text));
    assert!(out.contains("[r0 orch] window     0  loss "), "{out}");
    assert!(!out.contains("INFO"), "{out}");
    assert!(
        err.lines()
            .any(|l| l.contains("all_reduce{window=0") && l.contains("close time.busy=")),
        "{err}"
    );
    assert!(err.contains("forward{id=0 stage=0}"), "{err}");

    // A filter that does not parse is the user's to fix: status 2.
    let bad = swarmrun()
        .args(["check"])
        .arg(job(dir.path(), "bad"))
        .env("RUST_LOG", "swarmrun=loud")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("RUST_LOG"), "{}", stderr(&bad));
}
