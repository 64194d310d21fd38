//! The acceptor: admits higher ranks into the mesh, for the transport's
//! whole lifetime, and turns everyone else away without disturbing the job.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::state::{lock, Shared, MAX_RANKS};
use crate::wire::listener::Listener;
use crate::wire::AuthStream;

/// How long the acceptor backs off after a failed accept (out of file
/// descriptors and the like), instead of spinning on the error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// Handshakes allowed in flight at once. Each ends within the handshake
/// timeout, so this bounds the threads a flood of connections can cost.
const MAX_PENDING_HANDSHAKES: usize = 64;

/// A handshake in progress.
struct Pending {
    thread: JoinHandle<()>,
    abort: AbortHandle,
}

/// A second handle on a socket in handshake, for the acceptor to cut it at
/// shutdown. The handshake thread disarms it once the handshake is done, so
/// cutting can never hit a connection that has become a live link.
type AbortHandle = Arc<Mutex<Option<TcpStream>>>;

/// Admits connections until the transport's shutdown stops `listener`.
pub(super) fn accept_loop(shared: Arc<Shared>, listener: Listener) {
    let mut pending: Vec<Pending> = Vec::new();
    let say = |line: &str| shared.log(format_args!("{line}"));
    while let Some((stream, addr)) = listener.accept_or_back_off(ACCEPT_BACKOFF, say) {
        let (done, running): (Vec<_>, Vec<_>) =
            pending.into_iter().partition(|p| p.thread.is_finished());
        pending = running;
        done.into_iter().for_each(|p| {
            let _ = p.thread.join();
        });
        if pending.len() >= MAX_PENDING_HANDSHAKES {
            shared.log(format_args!(
                "rejected connection from {addr}: too many handshakes in progress"
            ));
            continue;
        }
        match start_handshake(&shared, stream) {
            Ok(started) => pending.push(started),
            Err(e) => {
                shared.log(format_args!("rejected connection from {addr}: {e}"));
            }
        }
    }
    for p in pending {
        if let Some(socket) = lock(&p.abort).take() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        let _ = p.thread.join();
    }
}

fn start_handshake(shared: &Arc<Shared>, stream: TcpStream) -> io::Result<Pending> {
    // Accepted sockets inherit non-blocking mode on some platforms.
    stream.set_nonblocking(false)?;
    let abort: AbortHandle = Arc::new(Mutex::new(Some(stream.try_clone()?)));
    let shared = Arc::clone(shared);
    let disarm = Arc::clone(&abort);
    let thread = thread::Builder::new()
        .name("swarmrun-handshake".into())
        .spawn(move || {
            let admitted = admit(&shared, stream, &disarm);
            // A refused connection closes now, not once the acceptor (which
            // sleeps in accept) next wakes to reap this thread: the handle
            // kept for shutdown is the last one open.
            lock(&disarm).take();
            if let Err(reason) = admitted {
                if !shared.stopping() {
                    // `reason` names the address already.
                    shared.log(format_args!("rejected connection: {reason}"));
                }
            }
        })?;
    Ok(Pending { thread, abort })
}

/// Authenticates one incoming connection and, if it is a rank that should
/// connect to us and has not yet, links it in.
fn admit(shared: &Arc<Shared>, stream: TcpStream, abort: &AbortHandle) -> Result<(), String> {
    let (stream, hello) =
        AuthStream::server(stream, &shared.key, shared.hello, shared.stream_options())
            .map_err(|e| e.to_string())?;
    lock(abort).take();
    let addr = stream.peer_addr();
    let src = usize::try_from(hello.rank).unwrap_or(usize::MAX);
    let size = shared.size();
    if src >= MAX_RANKS || (src >= size && !shared.opts.joinable) {
        return Err(format!(
            "{addr}: claims rank {}, but the job has {size} ranks",
            hello.rank
        ));
    }
    if src <= shared.rank {
        return Err(format!(
            "{addr}: claims rank {src}, but only higher ranks connect to rank {}",
            shared.rank
        ));
    }
    match hello.lane {
        0 => shared.install(src, stream),
        lane => shared.install_lane(src, lane, stream),
    }
}
