//! Weighted partitions from measured bandwidth: the slow rank gets the
//! small slice, every rank agrees on the partition, and the weighted
//! all-reduce still gives the exact sum.

use std::time::{Duration, Instant};

use swarmrun::collective::{
    all_reduce_partitioned, measure_bandwidth, AllReduceAlgorithm, Call, Partition, ReduceOp,
};
use swarmrun::transport::{LocalTransport, Transport, TransportError};

/// A rank behind a slow uplink: a send of 1 MiB takes a second, so a
/// probe of it is slower than any other rank's by far more than a busy
/// host's scheduling noise.
struct SlowUplink(LocalTransport);

impl Transport for SlowUplink {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn size(&self) -> usize {
        self.0.size()
    }
    fn send(&self, to: usize, tag: u64, payload: &[u8]) -> Result<(), TransportError> {
        std::thread::sleep(Duration::from_micros(
            payload.len() as u64 * 1_000_000 / (1 << 20),
        ));
        self.0.send(to, tag, payload)
    }
    fn recv_deadline(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, TransportError> {
        self.0.recv_deadline(from, tag, deadline)
    }
    fn default_timeout(&self) -> Duration {
        self.0.default_timeout()
    }
}

#[test]
fn every_rank_measures_the_same_rates_and_the_slow_uplink_is_slowest() {
    let (n, slow) = (4, 2);
    let results = LocalTransport::run(LocalTransport::world(n), |t| {
        let t: Box<dyn Transport> = if t.rank() == slow {
            Box::new(SlowUplink(t))
        } else {
            Box::new(t)
        };
        measure_bandwidth(Call::new(t.as_ref(), 1), 1 << 20).unwrap()
    });
    let rates = &results[0];
    for (r, other) in results.iter().enumerate() {
        assert_eq!(other, rates, "rank {r} measured other rates");
    }
    let slowest = (0..n).min_by(|&a, &b| rates[a].total_cmp(&rates[b]));
    assert_eq!(slowest, Some(slow), "{rates:?}");
    // The probe took at least the second its uplink needs.
    assert!(rates[slow] <= (1 << 20) as f64, "{rates:?}");
}

/// Rates as [`measure_bandwidth`] gives them (rank 2 a tenth of the
/// others'): the slow rank gets a slice about a tenth as long, every rank
/// builds the same partition, and the weighted all-reduce is exact.
#[test]
fn the_rank_with_the_slow_uplink_gets_the_smallest_slice_and_the_sum_stays_exact() {
    let (n, slow, len) = (4, 2, 100_000);
    let rates = [1e9, 1e9, 1e8, 1e9];
    let results = LocalTransport::run(LocalTransport::world(n), |t| {
        let rank = t.rank();
        let part = Partition::weighted(len, &rates).unwrap();
        let mut buf: Vec<i32> = (0..len)
            .map(|i| (i % 13) as i32 * (rank as i32 + 1))
            .collect();
        all_reduce_partitioned(
            Call::new(&t, 3),
            &mut buf,
            ReduceOp::Sum,
            AllReduceAlgorithm::Butterfly,
            &part,
        )
        .unwrap();
        ((0..n).map(|i| part.range(i).len()).collect::<Vec<_>>(), buf)
    });
    let (lens, _) = &results[0];
    for (r, (other_lens, _)) in results.iter().enumerate() {
        assert_eq!(other_lens, lens, "rank {r} built another partition");
    }
    let smallest = (0..n).min_by_key(|&i| lens[i]).unwrap();
    assert_eq!(smallest, slow, "slices {lens:?}");
    assert!(
        lens[slow] * 4 < len / n,
        "slow rank's slice {lens:?} is not much smaller"
    );
    let want: Vec<i32> = (0..len).map(|i| (i % 13) as i32 * 10).collect();
    assert!(results.iter().all(|(_, buf)| *buf == want));
}
