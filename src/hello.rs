//! The smoke job (`task = "hello"`): proves that every rank found every
//! other and that the authenticated transport carries data around the world.
//!
//! A token travels the ring 0 -> 1 -> ... -> n-1 -> 0 `rounds` times; each
//! rank checks the token's bytes, rank 0 times each round trip. Then all
//! ranks meet at a barrier. Like nccl-tests' first line, it is the thing to
//! run before blaming anything else.

use std::time::{Duration, Instant};

use thiserror::Error;

use crate::collective::{barrier, Call, CollectiveError};
use crate::transport::{Transport, TransportError};

/// Tags of the smoke job; collectives use their own range.
const TAG_RING: u64 = 0x4845_4c4c_4f00_0000;
const TAG_BARRIER: u64 = TAG_RING + 1;

#[derive(Debug, Clone)]
pub struct HelloOptions {
    pub rounds: usize,
    pub token_bytes: usize,
}

/// Round-trip times seen by rank 0 (empty elsewhere).
#[derive(Debug, Clone, Default)]
pub struct RingTimes {
    pub round_trips: Vec<Duration>,
}

impl RingTimes {
    /// `(min, median, max)`, or `None` without rounds.
    pub fn summary(&self) -> Option<(Duration, Duration, Duration)> {
        let mut v = self.round_trips.clone();
        v.sort();
        Some((*v.first()?, v[v.len() / 2], *v.last()?))
    }
}

#[derive(Debug, Error)]
pub enum HelloError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error("round {round}: token from rank {from} is corrupt ({len} bytes)")]
    CorruptToken {
        round: usize,
        from: usize,
        len: usize,
    },
}

/// The token of one round: its bytes depend on the round, so a stale or
/// mixed-up token is caught, not just a missing one.
fn token(round: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ round.wrapping_mul(131)) as u8)
        .collect()
}

/// Runs the ring and the barrier; returns rank 0's round-trip times.
pub fn run<T: Transport + ?Sized>(t: &T, opts: &HelloOptions) -> Result<RingTimes, HelloError> {
    let (rank, size) = (t.rank(), t.size());
    let next = (rank + 1) % size;
    let prev = (rank + size - 1) % size;
    let mut times = RingTimes::default();
    for round in 0..opts.rounds {
        let expected = token(round, opts.token_bytes);
        let check = |got: Vec<u8>| {
            if got == expected {
                Ok(got)
            } else {
                Err(HelloError::CorruptToken {
                    round,
                    from: prev,
                    len: got.len(),
                })
            }
        };
        if rank == 0 {
            let start = Instant::now();
            t.send(next, TAG_RING, &expected)?;
            check(t.recv(prev, TAG_RING)?)?;
            times.round_trips.push(start.elapsed());
        } else {
            let got = check(t.recv(prev, TAG_RING)?)?;
            t.send(next, TAG_RING, &got)?;
        }
    }
    barrier(Call::new(t, TAG_BARRIER))?;
    Ok(times)
}
