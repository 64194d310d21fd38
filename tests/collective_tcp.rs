//! Collectives over the real authenticated TCP transport (one thread per
//! rank, real sockets on loopback): exact sums, identical bytes everywhere,
//! and a rank whose connections die mid-all-reduce.

mod common;

use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use common::{survivors, DiesAfter};
use swarmrun::collective::{
    all_reduce, AllReduceAlgorithm, Call, CollectiveError, Group, ReduceOp,
};
use swarmrun::transport::{TcpOptions, TcpTransport, Transport};
use swarmrun::wire::JobKey;

/// Long beside any scheduling delay of a busy host: a test that waits this
/// long has failed, and "survivors retry at once" means well under half of
/// it, so no outcome depends on how fast the host is.
const PATIENCE: Duration = Duration::from_secs(60);

/// Connects an n-rank mesh on loopback, its frames sealed or not, and
/// runs `f` on every rank's thread.
fn with_tcp_world<R: Send>(
    n: usize,
    seal_loopback: bool,
    f: impl Fn(TcpTransport) -> R + Sync,
) -> Vec<R> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let key = JobKey::from_hex(&"7e".repeat(32)).unwrap();
    let opts = TcpOptions {
        max_frame: 1 << 20,
        max_message: swarmrun::transport::DEFAULT_MAX_MESSAGE,
        connect_timeout: PATIENCE,
        default_timeout: PATIENCE,
        handshake_timeout: PATIENCE,
        joinable: false,
        lanes: 1,
        seal_loopback,
    };
    thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (addrs, key, f) = (&addrs, &key, &f);
                s.spawn(
                    move || f(TcpTransport::connect(rank, l, addrs, key, "coll", opts).unwrap()),
                )
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((rank * 13 + i) % 11) as f32).collect()
}

fn sum_over(ranks: impl Iterator<Item = usize>, len: usize) -> Vec<f32> {
    let mut acc = vec![0.0; len];
    for r in ranks {
        acc.iter_mut().zip(input(r, len)).for_each(|(a, x)| *a += x);
    }
    acc
}

#[test]
fn all_reduce_over_tcp_gives_the_exact_sum_on_every_rank_sealed_or_not() {
    for (n, seal) in [(3, false), (5, false), (3, true), (5, true)] {
        for len in [0, 1, 1009, 600_000] {
            for algorithm in AllReduceAlgorithm::CHOSEN {
                let want = sum_over(0..n, len);
                let got = with_tcp_world(n, seal, |t| {
                    let mut buf = input(t.rank(), len);
                    all_reduce(Call::new(&t, 1), &mut buf, ReduceOp::Sum, algorithm).unwrap();
                    buf
                });
                for (rank, buf) in got.iter().enumerate() {
                    assert!(
                        *buf == want,
                        "n={n} sealed={seal} len={len} {algorithm:?} rank {rank}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_rank_whose_connections_die_mid_all_reduce_is_blamed_and_survivors_retry() {
    let (n, victim, len) = (4, 2, 400_000);
    let want = sum_over((0..n).filter(|&r| r != victim), len);
    let start = Instant::now();
    let results = with_tcp_world(n, false, |t| {
        let mut buf = input(t.rank(), len);
        if t.rank() == victim {
            let dying = DiesAfter::new(t, 0, TcpTransport::shutdown);
            let _ = all_reduce(
                Call::new(&dying, 1),
                &mut buf,
                ReduceOp::Sum,
                AllReduceAlgorithm::Butterfly,
            );
            return None;
        }
        let lost = match all_reduce(
            Call::new(&t, 1),
            &mut buf,
            ReduceOp::Sum,
            AllReduceAlgorithm::Butterfly,
        ) {
            Err(CollectiveError::PeerLost { rank }) => rank,
            other => panic!("rank {}: expected PeerLost, got {other:?}", t.rank()),
        };
        let survivors = Group::without(&t, &[lost]).unwrap();
        let mut buf = input(t.rank(), len);
        all_reduce(
            Call::new(&survivors, 3),
            &mut buf,
            ReduceOp::Sum,
            AllReduceAlgorithm::Butterfly,
        )
        .unwrap();
        Some((lost, buf))
    });
    assert!(
        start.elapsed() < PATIENCE / 2,
        "survivors waited for a timeout"
    );
    for (rank, (lost, buf)) in survivors(results, victim) {
        assert_eq!(lost, victim, "rank {rank} blamed {lost}");
        assert!(
            buf == want,
            "rank {rank}: retry is not the survivors' exact sum"
        );
    }
}
