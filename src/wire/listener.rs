//! A TCP listener whose accept loop sleeps in the kernel until someone
//! connects, and that another thread can stop.
//!
//! Why: the long-lived accept loops (every rank's transport acceptor, rank
//! 0's join door, the status page) polled a non-blocking listener every 20
//! ms so that shutdown could stop them, and each poll woke a thread that
//! took a core from a compute thread for a moment: in the quickstart's six
//! ranks, about 300 wake-ups a second for nothing. Shutting a listening
//! socket down makes a blocked `accept` fail at once (Linux: `EINVAL`), and
//! every later one too, so the loop blocks and [`Stopper::stop`] ends it
//! without a connection to itself.

use nix::sys::socket::{shutdown, Shutdown};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The accepting end: [`Listener::accept`] blocks until a connection
/// comes or the [`Stopper`] stops it.
#[derive(Debug)]
pub struct Listener {
    socket: TcpListener,
    stopped: Arc<AtomicBool>,
}

/// Stops a [`Listener`] from another thread.
#[derive(Debug)]
pub struct Stopper {
    /// The same socket as the listener's (a duplicated descriptor).
    socket: TcpListener,
    stopped: Arc<AtomicBool>,
}

impl Listener {
    /// Takes over `socket` (made blocking), with the stopper that ends it.
    pub fn new(socket: TcpListener) -> io::Result<(Listener, Stopper)> {
        socket.set_nonblocking(false)?;
        let stopper = Stopper {
            socket: socket.try_clone()?,
            stopped: Arc::new(AtomicBool::new(false)),
        };
        let listener = Listener {
            socket,
            stopped: Arc::clone(&stopper.stopped),
        };
        Ok((listener, stopper))
    }

    /// Whether the stopper stopped it.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// The next connection, or its error (out of descriptors and the
    /// like: the caller backs off); `None` once stopped.
    pub fn accept(&self) -> Option<io::Result<(TcpStream, SocketAddr)>> {
        loop {
            if self.stopped.load(Ordering::SeqCst) {
                return None;
            }
            match self.socket.accept() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Stopped while it waited (the accept failed) or just as a
                // connection came (which is dropped).
                _ if self.stopped.load(Ordering::SeqCst) => return None,
                accepted => return Some(accepted),
            }
        }
    }

    /// The next connection, backing off `backoff` after each failed
    /// accept (out of descriptors and the like) and telling `say` of the
    /// failures: the first, a count every ten seconds, and the accept that
    /// ends them (see `FailedAccepts`); `None` once stopped. A streak of
    /// failures is the span of one call.
    pub fn accept_or_back_off(
        &self,
        backoff: Duration,
        mut say: impl FnMut(&str),
    ) -> Option<(TcpStream, SocketAddr)> {
        let mut failures = FailedAccepts::default();
        loop {
            match self.accept()? {
                Ok(pair) => {
                    if let Some(line) = failures.accepted(Instant::now()) {
                        say(&line);
                    }
                    return Some(pair);
                }
                Err(e) => {
                    if let Some(line) = failures.failed(&e, Instant::now()) {
                        say(&line);
                    }
                    std::thread::sleep(backoff);
                }
            }
        }
    }
}

impl Stopper {
    /// Ends the listener's accept, now and for good. Idempotent.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        // A listening socket stops listening, and a blocked accept on it
        // returns. It fails only on a descriptor that is not a socket.
        let _ = shutdown(self.socket.as_raw_fd(), Shutdown::Both);
    }
}

/// How often a streak of failed accepts is summed up while it lasts.
const FAILED_ACCEPTS_SAID_EVERY: Duration = Duration::from_secs(10);

/// What an accept loop says about its failed accepts: the first of a
/// streak, then one line every ten seconds with how many failed, and one
/// when accepts work again.
///
/// Why: a loop that backs off 20 ms after each failure and logs each one
/// wrote fifty identical lines a second for as long as the process was out
/// of descriptors (`EMFILE`), burying whatever else the rank said.
#[derive(Debug, Default)]
struct FailedAccepts {
    streak: Option<Streak>,
}

#[derive(Debug)]
struct Streak {
    began: Instant,
    failed: u64,
    /// Failures since the last line said, and when that was.
    unsaid: u64,
    said: Instant,
}

impl FailedAccepts {
    /// An accept failed with `error` at `now`: the line to log, if one is
    /// due.
    fn failed(&mut self, error: &io::Error, now: Instant) -> Option<String> {
        let Some(streak) = &mut self.streak else {
            self.streak = Some(Streak {
                began: now,
                failed: 1,
                unsaid: 0,
                said: now,
            });
            return Some(format!("accept failed: {error} (retrying)"));
        };
        streak.failed += 1;
        streak.unsaid += 1;
        if now.saturating_duration_since(streak.said) < FAILED_ACCEPTS_SAID_EVERY {
            return None;
        }
        let line = format!(
            "accept still failing: {error} ({} more failures in {:.0} s, {} since the first {:.0} s ago)",
            streak.unsaid,
            now.saturating_duration_since(streak.said).as_secs_f64(),
            streak.failed,
            now.saturating_duration_since(streak.began).as_secs_f64(),
        );
        streak.unsaid = 0;
        streak.said = now;
        Some(line)
    }

    /// An accept worked at `now`: the line that ends a streak of more than
    /// one failure, if there was one.
    fn accepted(&mut self, now: Instant) -> Option<String> {
        let streak = self.streak.take()?;
        (streak.failed > 1).then(|| {
            format!(
                "accepting again after {} failed accepts over {:.1} s",
                streak.failed,
                now.saturating_duration_since(streak.began).as_secs_f64()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;

    fn out_of_files() -> io::Error {
        io::Error::from_raw_os_error(libc::EMFILE)
    }

    #[test]
    fn a_streak_of_failed_accepts_is_said_once_then_summed_up_every_ten_seconds() {
        let mut failures = FailedAccepts::default();
        let start = Instant::now();
        let first = failures.failed(&out_of_files(), start).unwrap();
        assert!(first.contains("Too many open files"), "{first}");
        // Fifty a second for just under ten seconds: nothing more said.
        let mut said = Vec::new();
        for i in 1..500u64 {
            let at = start + Duration::from_millis(20 * i);
            said.extend(failures.failed(&out_of_files(), at));
        }
        assert!(said.is_empty(), "{said:?}");
        let at = start + Duration::from_secs(10);
        let summary = failures.failed(&out_of_files(), at).unwrap();
        assert!(
            summary.contains("500 more failures in 10 s, 501 since the first 10 s ago"),
            "{summary}"
        );
        let at = start + Duration::from_millis(10_500);
        let back = failures.accepted(at).unwrap();
        assert_eq!(back, "accepting again after 501 failed accepts over 10.5 s");
        assert_eq!(failures.accepted(at), None, "the streak is over");
    }

    #[test]
    fn a_single_failed_accept_is_said_once_and_its_recovery_not_at_all() {
        let mut failures = FailedAccepts::default();
        let start = Instant::now();
        assert!(failures.failed(&out_of_files(), start).is_some());
        assert_eq!(failures.accepted(start), None);
        let again = failures.failed(&out_of_files(), start + Duration::from_secs(1));
        assert!(again.is_some(), "a new streak is said again");
    }

    #[test]
    fn a_stopped_listener_ends_its_blocked_accept_and_stops_listening() {
        let socket = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let (listener, stopper) = Listener::new(socket).unwrap();
        let (first, accepted_first) = mpsc::channel();
        let accepting = thread::spawn(move || {
            let mut accepted = Vec::new();
            while let Some(result) = listener.accept() {
                accepted.push(result.unwrap().0);
                let _ = first.send(());
            }
            (listener, accepted.len())
        });
        let _client = TcpStream::connect(addr).unwrap();
        accepted_first.recv().unwrap();
        // The loop is back in accept, with nobody else to connect.
        stopper.stop();
        let (listener, accepted) = accepting.join().unwrap();
        assert_eq!(accepted, 1);
        assert!(
            listener.accept().is_none(),
            "a stopped listener stays stopped"
        );
        assert!(TcpStream::connect(addr).is_err(), "nobody listens any more");
        stopper.stop();
    }
}
