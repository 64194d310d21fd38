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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;

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
