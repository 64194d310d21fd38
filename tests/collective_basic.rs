//! Barrier, broadcast, all-gather and reduce-scatter on in-process worlds of 1..=9 ranks.

use std::sync::atomic::{AtomicUsize, Ordering};

use swarmrun::collective::{
    all_gather, all_gather_varied, barrier, broadcast, reduce_scatter, AllReduceAlgorithm, Call,
    CollectiveError, Partition, ReduceOp, CHUNK_BYTES,
};
use swarmrun::transport::{LocalTransport, Transport};

fn value(rank: usize, i: usize) -> i32 {
    (rank * 1000 + i) as i32
}

#[test]
fn no_rank_leaves_the_barrier_before_every_rank_has_entered() {
    for n in 1..=9 {
        let entered = AtomicUsize::new(0);
        LocalTransport::run(LocalTransport::world(n), |t| {
            entered.fetch_add(1, Ordering::SeqCst);
            barrier(Call::new(&t, 1)).unwrap();
            assert_eq!(entered.load(Ordering::SeqCst), n);
            // A second barrier under another tag keeps the first one's check honest.
            barrier(Call::new(&t, 2)).unwrap();
        });
    }
}

#[test]
fn broadcast_copies_the_roots_buffer_from_every_root() {
    for n in 1..=9 {
        for root in 0..n {
            let got = LocalTransport::run(LocalTransport::world(n), |t| {
                let mut buf: Vec<i32> = (0..37).map(|i| value(t.rank(), i)).collect();
                broadcast(Call::new(&t, 1), &mut buf, root).unwrap();
                buf
            });
            let want: Vec<i32> = (0..37).map(|i| value(root, i)).collect();
            assert!(got.iter().all(|b| *b == want), "n={n} root={root}");
        }
    }
}

#[test]
fn broadcast_of_many_chunks_arrives_whole() {
    let len = CHUNK_BYTES / 4 * 3 + 5;
    let got = LocalTransport::run(LocalTransport::world(6), |t| {
        let mut buf = vec![0i32; len];
        if t.rank() == 2 {
            buf.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = value(2, i));
        }
        broadcast(Call::new(&t, 1), &mut buf, 2).unwrap();
        buf
    });
    let want: Vec<i32> = (0..len).map(|i| value(2, i)).collect();
    assert!(got.iter().all(|b| *b == want));
}

#[test]
fn all_gather_fills_parts_of_different_sizes() {
    for n in 1..=9 {
        // Rank r contributes r elements: rank 0 none at all.
        let part = Partition::from_lens(&(0..n).collect::<Vec<_>>());
        let want: Vec<i32> = (0..n)
            .flat_map(|r| (0..r).map(move |i| value(r, i)))
            .collect();
        let got = LocalTransport::run(LocalTransport::world(n), |t| {
            let mut buf = vec![-1i32; part.len()];
            for (k, i) in part.range(t.rank()).enumerate() {
                buf[i] = value(t.rank(), k);
            }
            all_gather(Call::new(&t, 1), &mut buf, &part).unwrap();
            buf
        });
        assert!(got.iter().all(|b| *b == want), "n={n}");
    }
}

#[test]
fn all_gather_varied_learns_the_sizes_first() {
    for n in 1..=9 {
        let got = LocalTransport::run(LocalTransport::world(n), |t| {
            let mine: Vec<i32> = (0..(t.rank() * 3) % 4)
                .map(|i| value(t.rank(), i))
                .collect();
            all_gather_varied(Call::new(&t, 1), &mine).unwrap()
        });
        let lens: Vec<usize> = (0..n).map(|r| (r * 3) % 4).collect();
        let want: Vec<i32> = (0..n)
            .flat_map(|r| (0..lens[r]).map(move |i| value(r, i)))
            .collect();
        for (buf, part) in got {
            assert_eq!(buf, want, "n={n}");
            assert_eq!(part, Partition::from_lens(&lens));
        }
    }
}

fn check_reduce_scatter(n: usize, len: usize, part: &Partition, algorithm: AllReduceAlgorithm) {
    let got = LocalTransport::run(LocalTransport::world(n), |t| {
        let mut buf: Vec<i32> = (0..len).map(|i| value(t.rank(), i)).collect();
        let mine =
            reduce_scatter(Call::new(&t, 1), &mut buf, ReduceOp::Sum, algorithm, part).unwrap();
        buf[mine].to_vec()
    });
    for (rank, slice) in got.iter().enumerate() {
        let want: Vec<i32> = part
            .range(rank)
            .map(|i| (0..n).map(|r| value(r, i)).sum())
            .collect();
        assert_eq!(*slice, want, "n={n} {algorithm:?} rank {rank}");
    }
}

#[test]
fn reduce_scatter_leaves_each_rank_its_part_reduced() {
    for n in 1..=9 {
        for algorithm in AllReduceAlgorithm::CHOSEN {
            for len in [0, 1, 1009] {
                check_reduce_scatter(n, len, &Partition::equal(len, n), algorithm);
            }
        }
    }
}

#[test]
fn weighted_reduce_scatter_gives_parts_proportional_to_weight() {
    let len = 1000;
    for n in 1..=9 {
        let weights: Vec<f64> = (1..=n).map(|w| w as f64).collect();
        let part = Partition::weighted(len, &weights).unwrap();
        let total: f64 = weights.iter().sum();
        for (r, w) in weights.iter().enumerate() {
            let exact = len as f64 * w / total;
            assert!(
                (part.range(r).len() as f64 - exact).abs() < 1.0,
                "n={n} rank {r}"
            );
        }
        assert_eq!(part.len(), len);
        for algorithm in AllReduceAlgorithm::CHOSEN {
            check_reduce_scatter(n, len, &part, algorithm);
        }
    }
}

#[test]
fn a_partition_that_does_not_fit_the_world_is_an_invalid_argument() {
    let got = LocalTransport::run(LocalTransport::world(2), |t| {
        let mut buf = vec![0i32; 10];
        all_gather(Call::new(&t, 1), &mut buf, &Partition::equal(10, 3))
    });
    assert!(got
        .iter()
        .all(|r| matches!(r, Err(CollectiveError::InvalidArgument(_)))));
}
