//! What the integration tests share: the binary, job files, free ports.
#![allow(dead_code)] // each test binary uses its own subset

pub mod join;
pub mod train;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use swarmrun::transport::{Transport, TransportError};

/// Every rank's result but `victim`'s, with its rank: the survivors of a
/// collective test in which `victim` returned `None` (it died or stayed
/// silent).
pub fn survivors<T>(results: Vec<Option<T>>, victim: usize) -> impl Iterator<Item = (usize, T)> {
    results
        .into_iter()
        .enumerate()
        .filter(move |(rank, _)| *rank != victim)
        .map(|(rank, result)| (rank, result.expect("a survivor returns its result")))
}

pub fn swarmrun() -> Command {
    // SWARMRUN_TEST_BIN: the binary under test when the tests run from a
    // copy on a machine without the build tree (launch/gpu-check.sh).
    let bin = std::env::var_os("SWARMRUN_TEST_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_swarmrun").into());
    let mut cmd = Command::new(bin);
    // Tests must not pick up a developer's key or rendezvous.
    cmd.env_remove("SWARMRUN_JOB_KEY")
        .env_remove("SWARMRUN_RENDEZVOUS");
    // A job that hangs (a report that never comes) fails its test with the
    // launcher's reason, exit status 124, instead of holding the suite
    // until CI's limit. The longest test job takes under a minute.
    if std::env::var_os("SWARMRUN_TIMEOUT").is_none() {
        cmd.env("SWARMRUN_TIMEOUT", "900");
    }
    cmd
}

pub fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A port nobody listens on right now, as `swarmrun launch` picks one.
pub fn free_port() -> u16 {
    swarmrun::launch::free_port("127.0.0.1").expect("a free port")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `swarmrun <args> --timeout=BAD <rest>` for limits that are no positive
/// number of seconds: each refused as a usage error (status 2) naming the
/// flag, before anything starts.
pub fn assert_bad_timeouts_refused(args: &[&str], rest: &[&std::ffi::OsStr]) {
    for bad in ["0", "-1", "soon"] {
        let out = swarmrun()
            .args(args)
            .arg(format!("--timeout={bad}"))
            .args(rest)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "--timeout {bad}: {err}");
        assert!(err.contains("--timeout"), "{err}");
    }
}

/// Asserts that the hello job ran to the end with `n` ranks, each of which
/// found its identity through `launcher` (as named in its start-up line).
pub fn assert_hello_under(out: &Output, n: usize, launcher: &str) {
    let text = stdout(out);
    assert!(out.status.success(), "{text}\n{}", stderr(out));
    assert_eq!(text.matches("barrier passed").count(), n, "{text}");
    assert_eq!(
        text.matches(launcher).count(),
        n,
        "ranks found the launcher's variables: {text}"
    );
    for r in 0..n {
        assert!(text.contains(&format!("rank {r}/{n} on")), "{text}");
    }
    assert!(text.contains(&format!("ring of {n} ranks")), "{text}");
}

/// Writes a job file into `dir` and returns its path.
pub fn job_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write job file");
    path
}

/// The smoke job with extra TOML appended (sections `[hello]`, `[faults]`).
pub fn hello_job(dir: &Path, ranks: usize, extra: &str) -> PathBuf {
    job_file(
        dir,
        "job.toml",
        &format!(
            "[job]\nname = \"t\"\ntask = \"hello\"\n\n[[site]]\nname = \"local\"\n\
             hosts = \"localhost\"\nranks_per_host = {ranks}\n\n\
             [network]\nrendezvous = \"tcp://127.0.0.1:0\"\n{extra}"
        ),
    )
}

/// A rank that crashes on its `sends`-th send, part-way through whatever it
/// is doing: `kill` cuts the transport as a dying process would.
pub struct DiesAfter<T> {
    inner: T,
    sends_left: AtomicUsize,
    kill: fn(&T),
}

impl<T> DiesAfter<T> {
    pub fn new(inner: T, sends: usize, kill: fn(&T)) -> Self {
        DiesAfter {
            inner,
            sends_left: AtomicUsize::new(sends),
            kill,
        }
    }
}

impl<T: Transport> Transport for DiesAfter<T> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn send(&self, to: usize, tag: u64, payload: &[u8]) -> Result<(), TransportError> {
        if self.sends_left.fetch_sub(1, Ordering::SeqCst) == 0 {
            (self.kill)(&self.inner);
        }
        self.inner.send(to, tag, payload)
    }
    fn recv_deadline(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, TransportError> {
        self.inner.recv_deadline(from, tag, deadline)
    }
    fn default_timeout(&self) -> std::time::Duration {
        self.inner.default_timeout()
    }
}

/// `swarmrun bench report RESULTS` into `doc` (its text before), charts
/// under `dir/charts`; the document's text after.
pub fn bench_report(dir: &Path, results: &Path, doc_text: &str) -> String {
    let doc = dir.join("BENCH.md");
    std::fs::write(&doc, doc_text).unwrap();
    let out = swarmrun()
        .args(["bench", "report"])
        .arg(results)
        .arg("--into")
        .arg(&doc)
        .arg("--charts")
        .arg(dir.join("charts"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::read_to_string(&doc).unwrap()
}
