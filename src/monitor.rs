//! The orchestrator's HTTP listener (`[metrics] listen`): Prometheus'
//! exposition at `/metrics`, the live status page at `/` and its data at
//! `/status.json`.
//!
//! The server is deliberately small: one request per connection, `GET` of
//! those three paths and nothing else, each client given a few seconds on
//! a thread of its own, at most `MAX_CLIENTS` at once (more wait to be
//! accepted). A thread per client because a connection that sends nothing (a
//! browser's speculative preconnect, a port scan) would otherwise hold
//! every scrape and page load behind it for its whole timeout. What it
//! serves is rendered by the orchestrator's thread after each window or
//! event and replaced whole, so a scrape never mixes two windows and a
//! slow client never holds up training.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::prometheus::Tallies;
use crate::roles::WindowReport;
use crate::status::{StatusBoard, PAGE};
use crate::wire::listener::{Listener, Stopper};

/// How long one client may take to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the listener waits before looking again, when every client
/// slot is taken or an accept failed.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// The longest request read; anything longer is not a GET of ours.
const MAX_REQUEST: usize = 8 * 1024;
/// Clients answered at once; more wait in the listen queue.
const MAX_CLIENTS: usize = 16;

/// What the listener serves, rendered ahead of any request.
#[derive(Debug, Default)]
struct Rendered {
    metrics: String,
    status: String,
}

/// The HTTP server and the state it renders from.
pub struct Monitor {
    addr: SocketAddr,
    rendered: Arc<Mutex<Rendered>>,
    tallies: Tallies,
    board: StatusBoard,
    stop: Stopper,
    thread: Option<JoinHandle<()>>,
}

impl Monitor {
    /// Listens on `addr` and serves `board` (with no window yet) from now on.
    pub fn serve(addr: &str, board: StatusBoard) -> io::Result<Monitor> {
        Self::serve_with(addr, board, CLIENT_TIMEOUT)
    }

    /// [`Monitor::serve`], each client given `client_timeout`.
    fn serve_with(addr: &str, board: StatusBoard, client_timeout: Duration) -> io::Result<Monitor> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let (listener, stop) = Listener::new(listener)?;
        let rendered = Arc::new(Mutex::new(Rendered::default()));
        let thread = {
            let rendered = Arc::clone(&rendered);
            thread::Builder::new()
                .name("swarmrun-monitor".into())
                .spawn(move || accept_loop(&listener, &rendered, client_timeout))?
        };
        let mut monitor = Monitor {
            addr,
            rendered,
            tallies: Tallies::default(),
            board,
            stop,
            thread: Some(thread),
        };
        monitor.publish(true);
        Ok(monitor)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counts window `w` in and serves the result; `host_of` names the
    /// host of a rank the page has not seen before.
    pub fn record_window(&mut self, w: &WindowReport, host_of: impl Fn(usize) -> Option<String>) {
        self.tallies.record(w);
        self.board.record_window(w, host_of);
        self.publish(true);
    }

    /// Shows an event line on the page.
    pub fn record_event(&mut self, line: &str, warning: bool) {
        self.board.record_event(line, warning);
        self.publish(false);
    }

    fn publish(&mut self, metrics_too: bool) {
        let status = self.board.render(&self.tallies);
        let metrics = metrics_too.then(|| self.tallies.render());
        let mut r = self.rendered.lock().unwrap_or_else(PoisonError::into_inner);
        r.status = status;
        if let Some(m) = metrics {
            r.metrics = m;
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: &Listener, rendered: &Arc<Mutex<Rendered>>, client_timeout: Duration) {
    let clients = Arc::new(AtomicUsize::new(0));
    let say = |line: &str| tracing::warn!("swarmrun: status page: {line}");
    loop {
        // At the limit, newcomers wait in the listen queue until a client
        // is done or times out.
        if clients.load(Ordering::SeqCst) >= MAX_CLIENTS {
            if listener.is_stopped() {
                return;
            }
            thread::sleep(ACCEPT_BACKOFF);
            continue;
        }
        let Some((stream, _)) = listener.accept_or_back_off(ACCEPT_BACKOFF, say) else {
            return;
        };
        clients.fetch_add(1, Ordering::SeqCst);
        let (rendered, left) = (Arc::clone(rendered), Arc::clone(&clients));
        let spawned = thread::Builder::new()
            .name("swarmrun-monitor-client".into())
            .spawn(move || {
                // A client that misbehaves costs itself its answer, nothing more.
                let _ = answer(stream, &rendered, client_timeout);
                left.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            clients.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Reads one request and answers it.
fn answer(mut stream: TcpStream, rendered: &Mutex<Rendered>, timeout: Duration) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
        match stream.read(&mut buf)? {
            0 => break,
            n => request.extend_from_slice(&buf[..n]),
        }
    }
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let served = |pick: fn(&Rendered) -> &String| {
        pick(&rendered.lock().unwrap_or_else(PoisonError::into_inner)).clone()
    };
    let (status, kind, body) = match line.split(|&b| b == b' ').collect::<Vec<_>>()[..] {
        [b"GET", b"/metrics", _] => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            served(|r| &r.metrics),
        ),
        [b"GET", b"/status.json", _] => ("200 OK", "application/json", served(|r| &r.status)),
        [b"GET", b"/" | b"/index.html", _] => {
            ("200 OK", "text/html; charset=utf-8", PAGE.to_string())
        }
        [b"GET", _, _] => (
            "404 Not Found",
            "text/plain",
            "try /, /status.json or /metrics\n".to_string(),
        ),
        _ => ("400 Bad Request", "text/plain", "not a GET\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        // Far longer than any answer takes; only a server stuck behind
        // another client runs into it.
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn the_listener_serves_metrics_the_page_and_its_data_and_404s_the_rest() {
        let mut m = Monitor::serve("127.0.0.1:0", StatusBoard::new("job", 2, 5)).unwrap();
        let before = get(m.local_addr(), "/metrics");
        assert!(before.starts_with("HTTP/1.1 200 OK\r\n"), "{before}");
        assert!(before.contains("swarmrun_windows_total 0"), "{before}");
        m.record_event("orchestrator: rank 7 joined", false);
        let status = get(m.local_addr(), "/status.json");
        assert!(
            status.contains("Content-Type: application/json"),
            "{status}"
        );
        assert!(status.contains("rank 7 joined"), "{status}");
        let page = get(m.local_addr(), "/");
        assert!(page.contains("text/html") && page.contains("/status.json"));
        assert!(get(m.local_addr(), "/nothing").starts_with("HTTP/1.1 404"));
        // Garbage gets an answer, and the server keeps serving.
        let mut junk = TcpStream::connect(m.local_addr()).unwrap();
        junk.write_all(b"\x16\x03\x01 hello\r\n\r\n").unwrap();
        let mut reply = String::new();
        let _ = junk.read_to_string(&mut reply);
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
        assert!(get(m.local_addr(), "/metrics").contains("swarmrun_windows_total 0"));
    }

    /// A monitor giving each client an hour, and `n` clients connected to
    /// it that send nothing.
    fn with_silent_clients(n: usize) -> (Monitor, Vec<TcpStream>) {
        let m = Monitor::serve_with(
            "127.0.0.1:0",
            StatusBoard::new("job", 2, 5),
            Duration::from_secs(3600),
        )
        .unwrap();
        let silent = (0..n)
            .map(|_| TcpStream::connect(m.local_addr()).unwrap())
            .collect();
        (m, silent)
    }

    #[test]
    fn a_client_that_sends_nothing_holds_up_no_other() {
        // Each would hold a one-at-a-time server for its hour.
        let (m, silent) = with_silent_clients(3);
        let metrics = get(m.local_addr(), "/metrics");
        assert!(metrics.contains("swarmrun_windows_total 0"), "{metrics}");
        drop(silent);
    }

    #[test]
    fn clients_past_the_limit_wait_until_one_is_done() {
        let (m, mut silent) = with_silent_clients(MAX_CLIENTS);
        let mut waiting = TcpStream::connect(m.local_addr()).unwrap();
        write!(waiting, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        // While every place is taken, no answer can come (however long
        // this looks).
        waiting
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut byte = [0u8; 1];
        let early = waiting.read(&mut byte);
        assert!(
            matches!(&early, Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut),
            "answered past the limit: {early:?}"
        );
        // A silent client hangs up; its place goes to the one waiting.
        drop(silent.pop());
        waiting
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut answer = String::new();
        waiting.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("swarmrun_windows_total 0"), "{answer}");
    }
}
