//! Jobs that ranks join while they train: a fixed rendezvous port to
//! knock at, children whose output a test reads as it comes.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Stdio};

use super::train::train_job;

pub const KEY: &str = "5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c";

/// A job of `windows` on a fixed rendezvous port, so joiners know where
/// to knock.
pub fn joinable_job(
    dir: &std::path::Path,
    name: &str,
    port: u16,
    windows: u64,
    extra: &str,
) -> std::path::PathBuf {
    let job = train_job(dir, name, 2, windows, extra);
    let text = std::fs::read_to_string(&job).unwrap();
    let text = text.replace(
        "rendezvous = \"tcp://127.0.0.1:0\"",
        &format!("rendezvous = \"tcp://127.0.0.1:{port}\""),
    );
    std::fs::write(&job, text).unwrap();
    job
}

pub fn start(cmd: &mut std::process::Command, key: &str) -> Child {
    cmd.env("SWARMRUN_JOB_KEY", key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Collects a child's stderr on a thread, so a full pipe never blocks it.
pub fn collect_stderr(child: &mut Child) -> std::thread::JoinHandle<String> {
    let mut err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut err, &mut text).unwrap();
        text
    })
}

/// Reads `out` until a line contains `needle`; returns every line read.
pub fn read_until(out: &mut BufReader<ChildStdout>, needle: &str, seen: &mut Vec<String>) {
    loop {
        let mut line = String::new();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "output ended before {needle:?}:\n{}", seen.join(""));
        seen.push(line.clone());
        if line.contains(needle) {
            return;
        }
    }
}
