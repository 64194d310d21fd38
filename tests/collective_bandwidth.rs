//! Weighted partitions from measured bandwidth: the slow rank gets the
//! small slice, every rank agrees on the partition, and the weighted
//! all-reduce still gives the exact sum.

use std::time::{Duration, Instant};

use swarmrun::collective::{
    all_reduce_partitioned, measure_bandwidth, AllReduceAlgorithm, Call, Partition, ReduceOp,
};
use swarmrun::transport::{LocalTransport, Transport, TransportError};

/// A rank behind a slow uplink: every send takes 250 ms per MiB, far above
/// the scheduling noise of a loaded 2-core machine.
struct SlowUplink(LocalTransport);

impl Transport for SlowUplink {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn size(&self) -> usize {
        self.0.size()
    }
    fn send(&self, to: usize, tag: u64, payload: &[u8]) -> Result<(), TransportError> {
        std::thread::sleep(Duration::from_micros(250 * payload.len() as u64 / 1024));
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
fn the_rank_with_the_slow_uplink_gets_the_smallest_slice_and_the_sum_stays_exact() {
    let (n, slow, len) = (4, 2, 100_000);
    let results = LocalTransport::run(LocalTransport::world(n), |t| {
        let rank = t.rank();
        let t: Box<dyn Transport> = if rank == slow {
            Box::new(SlowUplink(t))
        } else {
            Box::new(t)
        };
        let rates = measure_bandwidth(Call::new(t.as_ref(), 1), 1 << 20).unwrap();
        let part = Partition::weighted(len, &rates).unwrap();
        let mut buf: Vec<i32> = (0..len)
            .map(|i| (i % 13) as i32 * (rank as i32 + 1))
            .collect();
        all_reduce_partitioned(
            Call::new(t.as_ref(), 3),
            &mut buf,
            ReduceOp::Sum,
            AllReduceAlgorithm::Butterfly,
            &part,
        )
        .unwrap();
        (
            rates,
            (0..n).map(|i| part.range(i).len()).collect::<Vec<_>>(),
            buf,
        )
    });
    let (rates, lens, _) = &results[0];
    for (r, (other_rates, other_lens, _)) in results.iter().enumerate() {
        assert_eq!(other_rates, rates, "rank {r} measured other rates");
        assert_eq!(other_lens, lens, "rank {r} built another partition");
    }
    let smallest = (0..n).min_by_key(|&i| lens[i]).unwrap();
    assert_eq!(smallest, slow, "rates {rates:?} gave slices {lens:?}");
    assert!(
        lens[slow] * 4 < len / n,
        "slow rank's slice {lens:?} is not much smaller"
    );
    let want: Vec<i32> = (0..len).map(|i| (i % 13) as i32 * 10).collect();
    assert!(results.iter().all(|(_, _, buf)| *buf == want));
}
