//! The emulated link itself: a userspace bridge between two interfaces
//! that holds every frame back by a one-way delay (plus jitter) and drops
//! some, in each direction. Dropped frames are real packet loss, so TCP's
//! own retransmissions and congestion control answer them, as on a real
//! wide-area path; bandwidth is left to the kernel's `tbf` qdisc on the
//! interfaces the bridge sends on.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use super::raw::RawLink;
use crate::data::rng::SplitMix64;

/// What the link does to each frame, in each direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// One-way delay: half the round trip the link adds.
    pub delay: Duration,
    /// Each frame's delay is drawn uniformly within `delay ± jitter`.
    pub jitter: Duration,
    /// Share of frames dropped, `0..1`.
    pub loss: f64,
    pub seed: u64,
}

/// A frame and when it may leave; the sequence number keeps arrival order
/// among frames due at the same instant.
type Timed = Reverse<(Instant, u64, Vec<u8>)>;

/// Frames waiting for their time, earliest first.
#[derive(Default)]
struct DelayLine {
    frames: Mutex<BinaryHeap<Timed>>,
    changed: Condvar,
}

impl DelayLine {
    fn push(&self, due: Instant, seq: u64, frame: Vec<u8>) {
        let mut frames = self.frames.lock().unwrap_or_else(PoisonError::into_inner);
        frames.push(Reverse((due, seq, frame)));
        self.changed.notify_one();
    }

    /// The next frame whose time has come, waiting for it.
    fn pop_due(&self) -> Vec<u8> {
        let mut frames = self.frames.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = Instant::now();
            let wait = match frames.peek() {
                Some(Reverse((due, _, _))) if *due <= now => {
                    let Some(Reverse((_, _, frame))) = frames.pop() else {
                        continue;
                    };
                    return frame;
                }
                Some(Reverse((due, _, _))) => *due - now,
                None => Duration::from_secs(3600),
            };
            frames = self
                .changed
                .wait_timeout(frames, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Bridges interfaces `a` and `b` until an error: frames arriving on one
/// leave on the other, impaired as `link` says. Run it in the namespace
/// that holds both interfaces.
pub fn run(a: &str, b: &str, link: Impairment) -> io::Result<()> {
    let (a, b) = (Arc::new(RawLink::open(a)?), Arc::new(RawLink::open(b)?));
    let directions = [
        (Arc::clone(&a), Arc::clone(&b), 1),
        (Arc::clone(&b), Arc::clone(&a), 2),
    ];
    let mut threads = Vec::new();
    for (from, to, stream) in directions {
        let line = Arc::new(DelayLine::default());
        let sender = Arc::clone(&line);
        threads.push(thread::spawn(move || -> io::Result<()> {
            loop {
                let frame = sender.pop_due();
                // A frame the interface refuses (too big, link down) is a
                // frame lost, as on a wire.
                let _ = to.send(&frame);
            }
        }));
        threads.push(thread::spawn(move || -> io::Result<()> {
            let mut draws = SplitMix64::new(link.seed, stream);
            let mut buf = vec![0u8; 65536];
            let mut seq = 0u64;
            loop {
                let Some(n) = from.recv(&mut buf)? else {
                    continue;
                };
                if draws.unit_open0() <= link.loss {
                    continue;
                }
                let spread = link.jitter.as_secs_f64() * (2.0 * draws.unit_open0() - 1.0);
                let delay = (link.delay.as_secs_f64() + spread).max(0.0);
                seq += 1;
                line.push(
                    Instant::now() + Duration::from_secs_f64(delay),
                    seq,
                    buf[..n].to_vec(),
                );
            }
        }));
    }
    for t in threads {
        match t.join() {
            Ok(result) => result?,
            Err(_) => return Err(io::Error::other("a bridge thread panicked")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_leave_in_the_order_of_their_time() {
        let line = DelayLine::default();
        let now = Instant::now();
        line.push(now + Duration::from_millis(20), 1, vec![1]);
        line.push(now, 2, vec![2]);
        line.push(now, 3, vec![3]);
        assert_eq!(line.pop_due(), vec![2]);
        assert_eq!(line.pop_due(), vec![3]);
        assert_eq!(line.pop_due(), vec![1]);
        assert!(Instant::now() >= now + Duration::from_millis(20));
    }
}
