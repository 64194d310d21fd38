//! The orchestrator's view of the run in Prometheus' text exposition
//! format, served over HTTP while the job trains (`[metrics] listen`), so
//! that an operator's Prometheus (or `curl`) sees the window, the loss,
//! the throughput and each miner's credits without reading files on the
//! orchestrator's host.
//!
//! (The HTTP server is [`crate::monitor`].)

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::roles::WindowReport;

/// Totals over the windows seen so far.
#[derive(Debug, Default)]
pub struct Tallies {
    last: Option<WindowReport>,
    windows: u64,
    compute_s: f64,
    trained: u64,
    replayed: u64,
    recomputed: u64,
    redone_attempts: u64,
    caught: u64,
    reduce_s: f64,
    dense_bytes: u64,
    wire_bytes: u64,
    miners: BTreeMap<usize, MinerTotals>,
}

/// One miner's ledger credits over the windows seen so far.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct MinerTotals {
    /// The stage it served last.
    pub stage: usize,
    /// Backward passes credited.
    pub verified: u64,
    /// Checks it failed.
    pub failed: u64,
}

impl Tallies {
    /// Counts window `w` in.
    pub fn record(&mut self, w: &WindowReport) {
        self.windows += 1;
        self.compute_s += w.compute_s;
        self.trained += w.trained;
        self.replayed += w.replayed;
        self.recomputed += w.recomputed;
        self.redone_attempts += u64::from(w.attempts.saturating_sub(1));
        self.caught += w.caught.len() as u64;
        self.reduce_s += w.reduce_s;
        self.dense_bytes += w.dense_bytes;
        self.wire_bytes += w.wire_bytes;
        for t in &w.credits {
            let entry = self.miners.entry(t.rank).or_default();
            entry.stage = t.stage;
            entry.verified += t.verified;
            entry.failed += t.failed;
        }
        self.last = Some(w.clone());
    }

    /// Each miner's credits so far, by rank.
    pub fn miners(&self) -> &BTreeMap<usize, MinerTotals> {
        &self.miners
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP swarmrun_{name} {help}");
            let _ = writeln!(out, "# TYPE swarmrun_{name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "swarmrun_{name}{labels} {value}");
            }
        };
        let last = self.last.as_ref();
        let gauges = [
            (
                "window",
                "The last window finished.",
                last.map(|w| w.window as f64),
            ),
            (
                "loss",
                "Mean training loss of the last window.",
                last.map(|w| f64::from(w.mean_loss)),
            ),
            (
                "val_loss",
                "Validation loss at the last evaluation window.",
                last.and_then(|w| w.val_loss).map(f64::from),
            ),
            (
                "tokens_per_second",
                "Training tokens per second over the last window.",
                last.map(|w| w.tokens_per_s),
            ),
            (
                "bubble_ratio",
                "Share of the miners' time not spent computing in the last window.",
                last.map(|w| w.bubble),
            ),
            (
                "compression_ratio",
                "Boundary bytes as computed over bytes on the wire, last window.",
                last.and_then(|w| w.compression),
            ),
            (
                "progress_deadline_seconds",
                "Silence after which every rank is pinged.",
                last.map(|w| w.deadlines.progress_s),
            ),
            (
                "answer_deadline_seconds",
                "Time a pinged rank has to answer before it is evicted.",
                last.map(|w| w.deadlines.answer_s),
            ),
            (
                "close_deadline_seconds",
                "The longest a miner gave its stage's close all-reduce.",
                last.map(|w| w.deadlines.close_s),
            ),
        ];
        let counters = [
            (
                "windows_total",
                "Training windows finished.",
                self.windows as f64,
            ),
            (
                "compute_seconds_total",
                "Seconds miners spent computing.",
                self.compute_s,
            ),
            (
                "trained_passes_total",
                "Training passes miners trained, passes trained again included.",
                self.trained as f64,
            ),
            (
                "replayed_passes_total",
                "Passes validators replayed: over trained_passes_total, what checking costs.",
                self.replayed as f64,
            ),
            (
                "recomputed_slices_total",
                "All-reduce slices validators recomputed.",
                self.recomputed as f64,
            ),
            (
                "redone_attempts_total",
                "Window attempts redone after a miner was lost, evicted or caught.",
                self.redone_attempts as f64,
            ),
            (
                "miners_caught_total",
                "Miners that failed a check.",
                self.caught as f64,
            ),
            (
                "allreduce_seconds_total",
                "Seconds miners spent in their stages' close all-reduce.",
                self.reduce_s,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                metric(name, "gauge", help, &[(String::new(), v)]);
            }
        }
        for (name, help, value) in counters {
            metric(name, "counter", help, &[(String::new(), value)]);
        }
        if let Some(c) = last.map(|w| w.causes) {
            let causes = [
                ("wait", c.wait),
                ("reduce", c.reduce),
                ("step", c.step),
                ("audit", c.audit),
                ("idle", c.idle),
            ];
            metric(
                "bubble_cause_ratio",
                "gauge",
                "The last window's bubble by cause, each a share of the miners' time.",
                &causes.map(|(cause, v)| (format!("{{cause=\"{cause}\"}}"), v)),
            );
        }
        metric(
            "boundary_bytes_total",
            "counter",
            "Boundary tensor bytes sent: as computed (dense, f32) and on the wire.",
            &[
                ("{kind=\"dense\"}".to_string(), self.dense_bytes as f64),
                ("{kind=\"wire\"}".to_string(), self.wire_bytes as f64),
            ],
        );
        let per_miner = |pick: fn(&MinerTotals) -> u64| -> Vec<(String, f64)> {
            self.miners
                .iter()
                .map(|(rank, m)| {
                    let labels = format!("{{rank=\"{rank}\",stage=\"{}\"}}", m.stage);
                    (labels, pick(m) as f64)
                })
                .collect()
        };
        metric(
            "miner_passes_total",
            "counter",
            "Backward passes credited to each miner.",
            &per_miner(|m| m.verified),
        );
        metric(
            "miner_failed_checks_total",
            "counter",
            "Checks each miner failed.",
            &per_miner(|m| m.failed),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Tally;
    use crate::roles::train::BubbleCauses;

    fn window(n: u64) -> WindowReport {
        WindowReport {
            tokens_per_s: 1000.0,
            bubble: 0.25,
            causes: BubbleCauses {
                wait: 0.125,
                reduce: 0.0625,
                step: 0.0,
                audit: 0.0,
                idle: 0.0625,
            },
            reduce_s: 0.75,
            dense_bytes: 8000,
            wire_bytes: 1000,
            attempts: 2,
            compression: Some(8.0),
            compute_s: 1.5,
            trained: 24,
            replayed: 1,
            recomputed: 2,
            replay_s: 0.1,
            caught: vec![3],
            credits: vec![
                Tally {
                    rank: 2,
                    stage: 0,
                    verified: 6,
                    failed: 0,
                },
                Tally {
                    rank: 3,
                    stage: 1,
                    verified: 0,
                    failed: 1,
                },
            ],
            ..WindowReport::quiet(n)
        }
    }

    #[test]
    fn the_exposition_sums_windows_and_keeps_the_last_ones_values() {
        let mut t = Tallies::default();
        t.record(&window(0));
        t.record(&window(1));
        let text = t.render();
        for line in [
            "swarmrun_window 1",
            "swarmrun_windows_total 2",
            "swarmrun_loss 2.5",
            "swarmrun_compression_ratio 8",
            "swarmrun_compute_seconds_total 3",
            "swarmrun_trained_passes_total 48",
            "swarmrun_replayed_passes_total 2",
            "swarmrun_redone_attempts_total 2",
            "swarmrun_miners_caught_total 2",
            "swarmrun_miner_passes_total{rank=\"2\",stage=\"0\"} 12",
            "swarmrun_miner_failed_checks_total{rank=\"3\",stage=\"1\"} 2",
            "# TYPE swarmrun_miner_passes_total counter",
            "swarmrun_allreduce_seconds_total 1.5",
            "swarmrun_boundary_bytes_total{kind=\"dense\"} 16000",
            "swarmrun_boundary_bytes_total{kind=\"wire\"} 2000",
            "swarmrun_bubble_cause_ratio{cause=\"wait\"} 0.125",
            "swarmrun_bubble_cause_ratio{cause=\"idle\"} 0.0625",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
        }
        assert!(!text.contains("val_loss"), "{text}");
    }
}
