//! Measured bandwidth, for weighted partitions (Hivemind's load balancing):
//! a rank that moves bytes slowly gets a small slice of the all-reduce, so
//! it does not set the pace for everyone.
//!
//! Each rank sends one probe to its ring successor and times the send; the
//! probe is sized to outgrow socket buffers, so the send takes as long as
//! the rank's own upload does. Rates are then all-gathered, so every rank
//! holds the same numbers and builds the same [`Partition`].

use std::time::Instant;

use super::partition::Partition;
use super::{all_gather, Call, CollectiveError};
use crate::transport::Transport;

/// Bytes per second each rank sent its probe at, indexed by rank; the same
/// vector on every rank.
pub fn measure_bandwidth<T: Transport + ?Sized>(
    c: Call<'_, T>,
    probe_bytes: usize,
) -> Result<Vec<f64>, CollectiveError> {
    let (rank, size) = (c.rank(), c.size());
    let probe = vec![0x5au8; probe_bytes];
    let start = Instant::now();
    c.transport.send((rank + 1) % size, c.tag, &probe)?;
    let seconds = start.elapsed().as_secs_f64().max(1e-9);
    let from = (rank + size - 1) % size;
    let got = match c.deadline {
        Some(d) => c.transport.recv_deadline(from, c.tag, d)?,
        None => c.transport.recv(from, c.tag)?,
    };
    if got.len() != probe_bytes {
        return Err(CollectiveError::Protocol {
            rank: c.outer(from),
            reason: format!("probe of {} bytes, expected {probe_bytes}", got.len()),
        });
    }
    // The probe from our predecessor is consumed, so the gather may reuse
    // the tag: messages between a pair with one tag stay in order.
    let mut rates = vec![0f32; size];
    rates[rank] = (probe_bytes as f64 / seconds) as f32;
    all_gather(c, &mut rates, &Partition::equal(size, size))?;
    Ok(rates.into_iter().map(f64::from).collect())
}
