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

/// A `swarmrun launch` of a job, with the job key, whose stdout a test
/// reads line by line while it runs (its stderr is collected on a thread,
/// so a full pipe never blocks it).
pub struct Launched {
    child: Child,
    stderr: std::thread::JoinHandle<String>,
    out: BufReader<ChildStdout>,
    seen: Vec<String>,
}

impl Launched {
    pub fn start(job: &std::path::Path) -> Launched {
        let mut child = start(super::swarmrun().arg("launch").arg(job), KEY);
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut err, &mut text).unwrap();
            text
        });
        let out = BufReader::new(child.stdout.take().unwrap());
        Launched {
            child,
            stderr,
            out,
            seen: Vec::new(),
        }
    }

    /// Reads stdout until a line contains `needle`.
    pub fn read_until(&mut self, needle: &str) {
        loop {
            let mut line = String::new();
            let n = self.out.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "output ended before {needle:?}:\n{}",
                self.seen.join("")
            );
            self.seen.push(line.clone());
            if line.contains(needle) {
                return;
            }
        }
    }

    /// Reads the rest and waits: how it ended, all of stdout, its stderr.
    pub fn finish(mut self) -> (std::process::ExitStatus, String, String) {
        for line in self.out.lines() {
            self.seen.push(line.unwrap() + "\n");
        }
        let status = self.child.wait().unwrap();
        (status, self.seen.join(""), self.stderr.join().unwrap())
    }
}
