//! `RUN_DIR/metrics.jsonl`: one JSON object per training window, each
//! written with one `write` so a reader never sees half a line and a crash
//! loses at most the window being written.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::roles::WindowReport;

pub struct MetricsLog {
    file: File,
    path: PathBuf,
}

impl MetricsLog {
    /// Starts `run_dir/metrics.jsonl` afresh, creating the directory.
    pub fn create(run_dir: &Path) -> io::Result<MetricsLog> {
        fs::create_dir_all(run_dir)?;
        let path = run_dir.join("metrics.jsonl");
        fs::write(&path, b"")?;
        Self::open(path)
    }

    /// Continues `run_dir/metrics.jsonl` after `window`, the checkpoint a
    /// run resumes from: lines of later windows (written before the
    /// interruption, and about to be redone) are dropped, so each window
    /// appears once.
    pub fn resume(run_dir: &Path, window: u64) -> io::Result<MetricsLog> {
        fs::create_dir_all(run_dir)?;
        let path = run_dir.join("metrics.jsonl");
        let old = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let kept: String = old
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("window")?.as_u64())
                    .is_some_and(|w| w <= window)
            })
            .flat_map(|l| [l, "\n"])
            .collect();
        crate::fsutil::write_atomic(&path, kept.as_bytes())?;
        Self::open(path)
    }

    fn open(path: PathBuf) -> io::Result<MetricsLog> {
        let file = OpenOptions::new().append(true).open(&path)?;
        Ok(MetricsLog { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one window; `elapsed_s` counts from the start of training.
    /// Losses are written in the shortest form that reads back as the same
    /// `f32`, so runs can be compared bit for bit from this file.
    pub fn append(&mut self, r: &WindowReport, elapsed_s: f64) -> io::Result<()> {
        let val = r
            .val_loss
            .map_or_else(|| "null".to_string(), |v| v.to_string());
        let line = format!(
            "{{\"window\":{},\"step\":{},\"loss\":{},\"val_loss\":{val},\"tokens_per_s\":{:.1},\"bubble\":{:.4},\"bubble_wait\":{:.4},\"bubble_reduce\":{:.4},\"bubble_step\":{:.4},\"bubble_audit\":{:.4},\"bubble_idle\":{:.4},\"reduce_s\":{:.3},\"dense_bytes\":{},\"wire_bytes\":{},\"attempts\":{},\"compression\":{},\"compute_s\":{:.3},\"trained\":{},\"replayed\":{},\"recomputed\":{},\"replay_s\":{:.3},\"caught\":{:?},\"progress_deadline_s\":{:.3},\"answer_deadline_s\":{:.3},\"close_deadline_s\":{:.3},\"elapsed_s\":{:.3}}}\n",
            r.window,
            r.window + 1,
            r.mean_loss,
            r.tokens_per_s,
            r.bubble,
            r.causes.wait,
            r.causes.reduce,
            r.causes.step,
            r.causes.audit,
            r.causes.idle,
            r.reduce_s,
            r.dense_bytes,
            r.wire_bytes,
            r.attempts,
            r.compression
                .map_or_else(|| "null".to_string(), |c| format!("{c:.2}")),
            r.compute_s,
            r.trained,
            r.replayed,
            r.recomputed,
            r.replay_s,
            r.caught,
            r.deadlines.progress_s,
            r.deadlines.answer_s,
            r.deadlines.close_s,
            elapsed_s
        );
        self.file.write_all(line.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roles::train::{BubbleCauses, Deadlines};

    fn report(window: u64) -> WindowReport {
        WindowReport {
            deadlines: Deadlines {
                progress_s: 2.0,
                answer_s: 5.0,
                close_s: 5.0,
            },
            ..WindowReport::quiet(window)
        }
    }

    #[test]
    fn each_window_is_one_json_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::create(&dir.path().join("run")).unwrap();
        let r = WindowReport {
            tokens_per_s: 1000.0,
            bubble: 0.25,
            causes: BubbleCauses {
                wait: 0.125,
                reduce: 0.0625,
                step: 0.03125,
                audit: 0.0,
                idle: 0.03125,
            },
            reduce_s: 0.5,
            dense_bytes: 4096,
            wire_bytes: 1024,
            replayed: 2,
            recomputed: 4,
            replay_s: 0.05,
            caught: vec![3],
            ..report(4)
        };
        log.append(&r, 1.5).unwrap();
        log.append(
            &WindowReport {
                val_loss: Some(2.25),
                ..r
            },
            3.0,
        )
        .unwrap();
        let text = fs::read_to_string(log.path()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "{\"window\":4,\"step\":5,\"loss\":2.5,\"val_loss\":null,\"tokens_per_s\":1000.0,\"bubble\":0.2500,\"bubble_wait\":0.1250,\"bubble_reduce\":0.0625,\"bubble_step\":0.0312,\"bubble_audit\":0.0000,\"bubble_idle\":0.0312,\"reduce_s\":0.500,\"dense_bytes\":4096,\"wire_bytes\":1024,\"attempts\":1,\"compression\":null,\"compute_s\":1.000,\"trained\":0,\"replayed\":2,\"recomputed\":4,\"replay_s\":0.050,\"caught\":[3],\"progress_deadline_s\":2.000,\"answer_deadline_s\":5.000,\"close_deadline_s\":5.000,\"elapsed_s\":1.500}"
        );
        assert!(lines[1].contains("\"val_loss\":2.25,"));
    }

    #[test]
    fn resuming_drops_the_windows_after_the_checkpoint_and_a_fresh_start_drops_all() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let mut log = MetricsLog::create(&run).unwrap();
        for window in 0..5 {
            log.append(&report(window), 1.0).unwrap();
        }
        let log = MetricsLog::resume(&run, 2).unwrap();
        let text = fs::read_to_string(log.path()).unwrap();
        let windows: Vec<bool> = (0..5)
            .map(|w| text.contains(&format!("{{\"window\":{w},")))
            .collect();
        assert_eq!(windows, [true, true, true, false, false], "{text}");
        let log = MetricsLog::create(&run).unwrap();
        assert_eq!(fs::read_to_string(log.path()).unwrap(), "");
    }
}
