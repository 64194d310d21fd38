//! The rank's side of liveness: a thread that answers the orchestrator's
//! pings at once, whatever the rank's main thread is doing (computing a
//! pass, waiting on a peer, blocked sending to one).
//!
//! A rank that stops answering while its connections stay open (stopped
//! with SIGSTOP, frozen, its host swapping to death, its path to us
//! black-holed) shows no read or write error anywhere; silence is the only
//! sign, and a slow miner is silent too. The ping tells them apart: a slow
//! miner's answering thread replies in milliseconds, a stopped one never
//! does (a stopped process stops all its threads).

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::leader::Leader;
use super::protocol::{self, Report};
use crate::config::JobSpec;
use crate::transport::{Transport, TransportError};

/// How often the answering thread looks whether its rank is done.
const DONE_POLL: Duration = Duration::from_millis(50);

/// Runs `body` with this rank's link to whoever leads the job, and a
/// thread answering the leader's pings beside it.
pub(super) fn following_leader<T: Transport + ?Sized, R>(
    t: &T,
    spec: &JobSpec,
    body: impl FnOnce(&Leader<'_, T>) -> R,
) -> R {
    let leader = Leader::new(t, spec);
    answering_pings(&leader, || body(&leader))
}

/// Runs `body` with a thread answering the leader's pings beside it.
fn answering_pings<T: Transport + ?Sized, R>(
    leader: &Leader<'_, T>,
    body: impl FnOnce() -> R,
) -> R {
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        let done = &done;
        s.spawn(move || answer_pings(leader, done));
        let result = body();
        done.store(true, Ordering::SeqCst);
        result
    })
}

fn answer_pings<T: Transport + ?Sized>(leader: &Leader<'_, T>, done: &AtomicBool) {
    let t = leader.transport();
    while !done.load(Ordering::SeqCst) {
        match t.recv_deadline(
            leader.rank(),
            protocol::PING_TAG,
            Instant::now() + DONE_POLL,
        ) {
            Ok(bytes) => {
                let Ok(nonce) = <[u8; 8]>::try_from(bytes.as_slice()) else {
                    // Not a ping of ours; the main loop hears of a broken
                    // orchestrator on its own.
                    continue;
                };
                let alive = Report::Alive {
                    nonce: u64::from_le_bytes(nonce),
                };
                if leader.report(&alive).is_err() {
                    return;
                }
            }
            Err(TransportError::Timeout { .. }) => {}
            // Pings come from the standby now.
            Err(TransportError::PeerLost { rank, .. }) if leader.lost(rank) => {}
            // Every leader is gone: the main thread finds out and ends.
            Err(_) => return,
        }
    }
}
