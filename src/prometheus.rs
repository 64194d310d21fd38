//! The orchestrator's view of the run in Prometheus' text exposition
//! format, served over HTTP while the job trains (`[metrics] listen`), so
//! that an operator's Prometheus (or `curl`) sees the window, the loss,
//! the throughput and each miner's credits without reading files on the
//! orchestrator's host.
//!
//! The server is deliberately small: one thread, one request per
//! connection, `GET /metrics` and nothing else, each client given a few
//! seconds. What it serves is replaced whole after every window, so a
//! scrape never mixes two windows.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::roles::WindowReport;

/// How long one client may take to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the listener looks whether it should stop.
const ACCEPT_POLL: Duration = Duration::from_millis(50);
/// The longest request read; anything longer is not a scrape.
const MAX_REQUEST: usize = 8 * 1024;

/// Totals over the windows seen so far.
#[derive(Debug, Default)]
pub struct Tallies {
    last: Option<WindowReport>,
    windows: u64,
    compute_s: f64,
    replayed: u64,
    recomputed: u64,
    redone_attempts: u64,
    caught: u64,
    reduce_s: f64,
    dense_bytes: u64,
    wire_bytes: u64,
    /// Per miner: its stage, verified passes, failed checks.
    miners: BTreeMap<usize, (usize, u64, u64)>,
}

impl Tallies {
    /// Counts window `w` in.
    pub fn record(&mut self, w: &WindowReport) {
        self.windows += 1;
        self.compute_s += w.compute_s;
        self.replayed += w.replayed;
        self.recomputed += w.recomputed;
        self.redone_attempts += u64::from(w.attempts.saturating_sub(1));
        self.caught += w.caught.len() as u64;
        self.reduce_s += w.reduce_s;
        self.dense_bytes += w.dense_bytes;
        self.wire_bytes += w.wire_bytes;
        for t in &w.credits {
            let entry = self.miners.entry(t.rank).or_default();
            entry.0 = t.stage;
            entry.1 += t.verified;
            entry.2 += t.failed;
        }
        self.last = Some(w.clone());
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
                "replayed_passes_total",
                "Passes validators replayed.",
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
        let per_miner = |pick: fn(&(usize, u64, u64)) -> u64| -> Vec<(String, f64)> {
            self.miners
                .iter()
                .map(|(rank, m)| {
                    let labels = format!("{{rank=\"{rank}\",stage=\"{}\"}}", m.0);
                    (labels, pick(m) as f64)
                })
                .collect()
        };
        metric(
            "miner_passes_total",
            "counter",
            "Backward passes credited to each miner.",
            &per_miner(|m| m.1),
        );
        metric(
            "miner_failed_checks_total",
            "counter",
            "Checks each miner failed.",
            &per_miner(|m| m.2),
        );
        out
    }
}

/// The HTTP server, serving the exposition of the windows recorded.
pub struct Exporter {
    addr: SocketAddr,
    page: Arc<Mutex<String>>,
    tallies: Tallies,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Exporter {
    /// Listens on `addr` and serves from now on.
    pub fn serve(addr: &str) -> io::Result<Exporter> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let tallies = Tallies::default();
        let page = Arc::new(Mutex::new(tallies.render()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (page, stop) = (Arc::clone(&page), Arc::clone(&stop));
            thread::Builder::new()
                .name("swarmrun-metrics".into())
                .spawn(move || accept_loop(&listener, &page, &stop))?
        };
        Ok(Exporter {
            addr,
            page,
            tallies,
            stop,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counts window `w` in and serves the result.
    pub fn record(&mut self, w: &WindowReport) {
        self.tallies.record(w);
        let text = self.tallies.render();
        *self.page.lock().unwrap_or_else(PoisonError::into_inner) = text;
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, page: &Mutex<String>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            // A client that misbehaves costs itself its answer, nothing more.
            Ok((stream, _)) => {
                let _ = answer(stream, page);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
            Err(_) => thread::sleep(ACCEPT_POLL),
        }
    }
}

/// Reads one request and answers it.
fn answer(mut stream: TcpStream, page: &Mutex<String>) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
        match stream.read(&mut buf)? {
            0 => break,
            n => request.extend_from_slice(&buf[..n]),
        }
    }
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let (status, kind, body) = match line.split(|&b| b == b' ').collect::<Vec<_>>()[..] {
        [b"GET", b"/metrics", _] => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            page.lock().unwrap_or_else(PoisonError::into_inner).clone(),
        ),
        [b"GET", _, _] => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
        _ => ("400 Bad Request", "text/plain", "not a GET\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Tally;
    use crate::roles::train::{BubbleCauses, Deadlines};

    fn window(n: u64) -> WindowReport {
        WindowReport {
            window: n,
            mean_loss: 2.5,
            val_loss: None,
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
            checkpoint: None,
            compression: Some(8.0),
            compute_s: 1.5,
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
            deadlines: Deadlines::default(),
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

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn get_metrics_answers_the_last_recorded_window_and_other_paths_404() {
        let mut e = Exporter::serve("127.0.0.1:0").unwrap();
        let before = get(e.local_addr(), "/metrics");
        assert!(before.starts_with("HTTP/1.1 200 OK\r\n"), "{before}");
        assert!(before.contains("swarmrun_windows_total 0"), "{before}");
        e.record(&window(7));
        let after = get(e.local_addr(), "/metrics");
        assert!(after.contains("\nswarmrun_window 7\n"), "{after}");
        assert!(get(e.local_addr(), "/").starts_with("HTTP/1.1 404"));
        // Garbage gets an answer, and the server keeps serving.
        let mut junk = TcpStream::connect(e.local_addr()).unwrap();
        junk.write_all(b"\x16\x03\x01 hello\r\n\r\n").unwrap();
        let mut reply = String::new();
        let _ = junk.read_to_string(&mut reply);
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
        assert!(get(e.local_addr(), "/metrics").contains("swarmrun_window 7"));
    }
}
