//! A transport whose ranks are threads of one process, like NCCL's
//! one-process-many-devices mode. Each rank owns a mailbox of queues keyed
//! by (sender, tag); a send copies the payload into the receiver's queue,
//! which is the one copy a network would make too.
//!
//! Failure is part of the model, because collectives are tested against it:
//! [`LocalTransport::kill`] (or dropping a rank) marks the rank dead and
//! wakes every waiter, so a peer blocked on it gets
//! [`TransportError::PeerLost`] at once instead of sitting out a timeout.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Transport, TransportError};

/// How long [`Transport::recv`] waits when the world was built by
/// [`LocalTransport::world`]: long enough for a loaded debug build, short
/// enough that a hung test fails instead of hanging CI.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// One rank of an in-process world.
pub struct LocalTransport {
    rank: usize,
    timeout: Duration,
    world: Arc<World>,
}

struct World {
    mailboxes: Vec<Mailbox>,
    alive: Vec<AtomicBool>,
}

/// Messages waiting for one rank, by (sender, tag), oldest first.
type Queues = HashMap<(usize, u64), VecDeque<Vec<u8>>>;

#[derive(Default)]
struct Mailbox {
    queues: Mutex<Queues>,
    arrived: Condvar,
}

impl Mailbox {
    /// Locks the queues. A poisoned lock only means another rank's thread
    /// panicked while holding it; the queues themselves are still whole.
    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LocalTransport {
    /// Builds a world of `n` ranks with [`DEFAULT_TIMEOUT`]; element `i` is rank `i`.
    pub fn world(n: usize) -> Vec<LocalTransport> {
        Self::world_with_timeout(n, DEFAULT_TIMEOUT)
    }

    /// Builds a world of `n` ranks whose [`Transport::recv`] gives up after `timeout`.
    pub fn world_with_timeout(n: usize, timeout: Duration) -> Vec<LocalTransport> {
        let world = Arc::new(World {
            mailboxes: (0..n).map(|_| Mailbox::default()).collect(),
            alive: (0..n).map(|_| AtomicBool::new(true)).collect(),
        });
        (0..n)
            .map(|rank| LocalTransport {
                rank,
                timeout,
                world: Arc::clone(&world),
            })
            .collect()
    }

    /// Runs `f` once per rank of `world`, each on its own thread, and returns
    /// the results in rank order: the SPMD launch of a one-process world.
    /// A panic on any rank is resumed on the caller.
    pub fn run<R, F>(world: Vec<LocalTransport>, f: F) -> Vec<R>
    where
        R: Send,
        F: Fn(LocalTransport) -> R + Sync,
    {
        std::thread::scope(|s| {
            let handles: Vec<_> = world
                .into_iter()
                .map(|t| {
                    let f = &f;
                    s.spawn(move || f(t))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    }

    /// Marks this rank dead, as if its process had crashed: its own calls
    /// and every peer's calls that involve it fail with `PeerLost` from now
    /// on, and messages still queued for it are dropped.
    pub fn kill(&self) {
        self.world.alive[self.rank].store(false, Ordering::SeqCst);
        self.world.mailboxes[self.rank].lock().clear();
        // Taking each lock before notifying closes the window between a
        // waiter's liveness check and its wait.
        for mailbox in &self.world.mailboxes {
            let _queues = mailbox.lock();
            mailbox.arrived.notify_all();
        }
    }

    fn is_alive(&self, rank: usize) -> bool {
        self.world.alive[rank].load(Ordering::SeqCst)
    }

    fn check_rank(&self, rank: usize) -> Result<(), TransportError> {
        if rank >= self.size() {
            return Err(TransportError::NoSuchRank {
                rank,
                size: self.size(),
            });
        }
        if !self.is_alive(self.rank) {
            return Err(lost(self.rank, "this rank was killed"));
        }
        Ok(())
    }
}

fn lost(rank: usize, reason: &str) -> TransportError {
    TransportError::PeerLost {
        rank,
        reason: reason.to_owned(),
    }
}

impl Transport for LocalTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.world.alive.len()
    }

    fn send(&self, to: usize, tag: u64, payload: &[u8]) -> Result<(), TransportError> {
        self.check_rank(to)?;
        if !self.is_alive(to) {
            return Err(lost(to, "killed"));
        }
        let mailbox = &self.world.mailboxes[to];
        mailbox
            .lock()
            .entry((self.rank, tag))
            .or_default()
            .push_back(payload.to_vec());
        mailbox.arrived.notify_all();
        Ok(())
    }

    /// Messages a peer sent before it died are still delivered; only an
    /// empty queue from a dead peer is `PeerLost`.
    fn recv_deadline(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, TransportError> {
        self.check_rank(from)?;
        let mailbox = &self.world.mailboxes[self.rank];
        let mut queues = mailbox.lock();
        loop {
            if !self.is_alive(self.rank) {
                return Err(lost(self.rank, "this rank was killed"));
            }
            if let Some(queue) = queues.get_mut(&(from, tag)) {
                if let Some(message) = queue.pop_front() {
                    // Tags are usually used once; keep the map from growing with them.
                    if queue.is_empty() {
                        queues.remove(&(from, tag));
                    }
                    return Ok(message);
                }
            }
            if !self.is_alive(from) {
                return Err(lost(from, "killed"));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TransportError::Timeout { rank: from, tag });
            }
            queues = mailbox
                .arrived
                .wait_timeout(queues, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn default_timeout(&self) -> std::time::Duration {
        self.timeout
    }

    /// Every message to this rank wakes its one condition variable, so a
    /// wait on many senders is a wait on it.
    fn recv_any(
        &self,
        from: &[usize],
        tag: u64,
        deadline: Instant,
    ) -> Result<(usize, Vec<u8>), TransportError> {
        for &rank in from {
            self.check_rank(rank)?;
        }
        let mailbox = &self.world.mailboxes[self.rank];
        let mut queues = mailbox.lock();
        loop {
            if !self.is_alive(self.rank) {
                return Err(lost(self.rank, "this rank was killed"));
            }
            for &rank in from {
                if let Some(queue) = queues.get_mut(&(rank, tag)) {
                    if let Some(message) = queue.pop_front() {
                        if queue.is_empty() {
                            queues.remove(&(rank, tag));
                        }
                        return Ok((rank, message));
                    }
                }
            }
            if let Some(&dead) = from.iter().find(|&&r| !self.is_alive(r)) {
                return Err(lost(dead, "killed"));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TransportError::NoneArrived {
                    ranks: from.len(),
                    tag,
                });
            }
            queues = mailbox
                .arrived
                .wait_timeout(queues, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for LocalTransport {
    /// A rank that goes away is a rank that died: peers must not wait for it.
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_between_one_pair_and_tag_arrive_in_order() {
        let w = LocalTransport::world(2);
        for i in 0..5u8 {
            w[0].send(1, 7, &[i]).unwrap();
        }
        w[0].send(1, 8, &[99]).unwrap();
        assert_eq!(w[1].recv(0, 8).unwrap(), vec![99]);
        for i in 0..5u8 {
            assert_eq!(w[1].recv(0, 7).unwrap(), vec![i]);
        }
    }

    #[test]
    fn sending_to_self_works() {
        let w = LocalTransport::world(1);
        w[0].send(0, 1, b"me").unwrap();
        assert_eq!(w[0].recv(0, 1).unwrap(), b"me");
    }

    #[test]
    fn dropping_a_rank_wakes_its_waiting_peer_with_peer_lost() {
        let mut w = LocalTransport::world(2);
        let victim = w.pop().unwrap();
        let start = Instant::now();
        let waiter = std::thread::spawn(move || w[0].recv(1, 3));
        std::thread::sleep(Duration::from_millis(50));
        drop(victim);
        let err = waiter.join().unwrap().unwrap_err();
        assert!(
            matches!(err, TransportError::PeerLost { rank: 1, .. }),
            "{err}"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn messages_sent_before_death_are_still_delivered() {
        let w = LocalTransport::world(2);
        w[1].send(0, 3, b"last words").unwrap();
        w[1].kill();
        assert_eq!(w[0].recv(1, 3).unwrap(), b"last words");
        assert!(matches!(
            w[0].recv(1, 3),
            Err(TransportError::PeerLost { rank: 1, .. })
        ));
    }

    #[test]
    fn a_silent_peer_times_out_at_the_deadline() {
        let w = LocalTransport::world_with_timeout(2, Duration::from_millis(30));
        assert!(matches!(
            w[0].recv(1, 3),
            Err(TransportError::Timeout { rank: 1, tag: 3 })
        ));
    }

    #[test]
    fn recv_any_takes_whoever_speaks_and_names_the_dead() {
        let w = LocalTransport::world(4);
        let soon = || Instant::now() + Duration::from_secs(5);
        w[3].send(0, 9, b"three").unwrap();
        w[2].send(0, 8, b"other tag").unwrap();
        assert_eq!(
            w[0].recv_any(&[1, 2, 3], 9, soon()).unwrap(),
            (3, b"three".to_vec())
        );
        assert!(matches!(
            w[0].recv_any(&[1, 2], 9, Instant::now()),
            Err(TransportError::NoneArrived { ranks: 2, tag: 9 })
        ));
        w[1].send(0, 9, b"last").unwrap();
        w[1].kill();
        assert_eq!(
            w[0].recv_any(&[1], 9, soon()).unwrap(),
            (1, b"last".to_vec())
        );
        assert!(matches!(
            w[0].recv_any(&[1, 2], 9, soon()),
            Err(TransportError::PeerLost { rank: 1, .. })
        ));
    }

    #[test]
    fn unknown_ranks_are_refused() {
        let w = LocalTransport::world(2);
        assert!(matches!(
            w[0].send(2, 0, &[]),
            Err(TransportError::NoSuchRank { rank: 2, .. })
        ));
    }
}
