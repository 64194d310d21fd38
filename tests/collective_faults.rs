//! Ranks that die or go silent: survivors learn who, promptly and alike,
//! and can shrink the world to a Group and retry.

use std::time::{Duration, Instant};

use swarmrun::collective::{
    all_reduce, broadcast, hierarchical_all_reduce, AllReduceAlgorithm, Call, CollectiveError,
    Group, ReduceOp, CHUNK_BYTES,
};
use swarmrun::transport::{LocalTransport, Transport};

mod common;
use common::{survivors, DiesAfter};

/// Long enough that a test relying on it would be obviously slow.
const PATIENCE: Duration = Duration::from_secs(20);

fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((rank * 31 + i) % 17) as f32).collect()
}

fn sum_over(ranks: impl Iterator<Item = usize>, len: usize) -> Vec<f32> {
    ranks
        .map(|r| input(r, len))
        .fold(vec![0.0; len], |mut acc, x| {
            acc.iter_mut().zip(x).for_each(|(a, x)| *a += x);
            acc
        })
}

#[test]
fn survivors_of_a_rank_killed_mid_all_reduce_blame_it_and_retry_without_it() {
    let (n, victim, len) = (6, 3, 300_001);
    let want = sum_over((0..n).filter(|&r| r != victim), len);
    for algorithm in AllReduceAlgorithm::CHOSEN {
        // Dying before its contribution is out leaves no survivor able to finish;
        // a rank that dies later may let some finish (see the module docs).
        for sends in [0, 1] {
            let start = Instant::now();
            let results =
                LocalTransport::run(LocalTransport::world_with_timeout(n, PATIENCE), |t| {
                    let mut buf = input(t.rank(), len);
                    if t.rank() == victim {
                        let dying = DiesAfter::new(t, sends, LocalTransport::kill);
                        assert!(all_reduce(
                            Call::new(&dying, 1),
                            &mut buf,
                            ReduceOp::Sum,
                            algorithm
                        )
                        .is_err());
                        return None;
                    }
                    let first = all_reduce(Call::new(&t, 1), &mut buf, ReduceOp::Sum, algorithm);
                    let lost = match first {
                        Err(CollectiveError::PeerLost { rank }) => rank,
                        other => panic!(
                            "rank {} {algorithm:?} sends={sends}: expected PeerLost, got {other:?}",
                            t.rank()
                        ),
                    };
                    let survivors = Group::without(&t, &[lost]).unwrap();
                    let mut buf = input(t.rank(), len);
                    all_reduce(Call::new(&survivors, 2), &mut buf, ReduceOp::Sum, algorithm)
                        .unwrap();
                    Some((lost, buf))
                });
            assert!(
                start.elapsed() < PATIENCE / 2,
                "{algorithm:?}: waited for a timeout"
            );
            for (rank, (lost, buf)) in survivors(results, victim) {
                assert_eq!(
                    lost, victim,
                    "{algorithm:?} sends={sends}: rank {rank} blamed {lost}"
                );
                assert!(
                    buf == want,
                    "{algorithm:?} sends={sends}: rank {rank} retried wrong"
                );
            }
        }
    }
}

/// The ring lends each merged chunk to its sending thread and takes it
/// back in the all-gather: a rank that dies with chunks in flight, in the
/// reduce-scatter or in the all-gather, must still end every survivor's
/// call at once, with its blame or (dying late) the full result.
#[test]
fn a_rank_dying_mid_ring_with_chunks_in_flight_ends_every_call_at_once() {
    let (n, victim) = (4, 2);
    // Two chunks a part: each rank sends 6 frames in the reduce-scatter.
    let len = n * 2 * CHUNK_BYTES / 4;
    let want = sum_over(0..n, len);
    for sends in [1, 3, 8] {
        let start = Instant::now();
        let results = LocalTransport::run(LocalTransport::world_with_timeout(n, PATIENCE), |t| {
            let mut buf = input(t.rank(), len);
            if t.rank() == victim {
                let dying = DiesAfter::new(t, sends, LocalTransport::kill);
                let call = Call::new(&dying, 1);
                let _ = all_reduce(call, &mut buf, ReduceOp::Sum, AllReduceAlgorithm::Ring);
                return None;
            }
            let result = all_reduce(
                Call::new(&t, 1),
                &mut buf,
                ReduceOp::Sum,
                AllReduceAlgorithm::Ring,
            );
            Some(result.map(|()| buf))
        });
        assert!(
            start.elapsed() < PATIENCE / 2,
            "sends={sends}: waited for a timeout"
        );
        for (rank, result) in survivors(results, victim) {
            match result {
                Err(CollectiveError::PeerLost { rank: lost }) => {
                    assert_eq!(lost, victim, "sends={sends}: rank {rank} blamed {lost}")
                }
                Ok(buf) if sends >= 6 => assert!(buf == want, "sends={sends}: rank {rank} wrong"),
                other => panic!("sends={sends}: rank {rank} got {:?}", other.map(|_| ())),
            }
        }
    }
}

/// The rank before a dead one cannot send it anything, yet can finish its
/// reduce-scatter (no part it reduces passes through the dead rank first)
/// and then takes back, for the all-gather, chunks whose sends failed. The
/// ring's sending thread must hand those back too, or that rank waits for
/// them forever instead of hearing of the death.
#[test]
fn the_rank_before_a_dead_one_is_not_stuck_on_chunks_it_could_not_send() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};

    let (n, victim) = (4, 2);
    let len = n * 2 * CHUNK_BYTES / 4;
    let dead = Arc::new(AtomicBool::new(false));
    let (done, results) = mpsc::channel();
    // A thread of its own, so that a stuck rank fails the test instead of
    // hanging it.
    std::thread::spawn(move || {
        let results = LocalTransport::run(LocalTransport::world_with_timeout(n, PATIENCE), |t| {
            let mut buf = input(t.rank(), len);
            if t.rank() == victim {
                // The ring's first sends (this rank's values of part
                // rank-1, two chunks) and nothing more.
                let part = &buf[(victim - 1) * len / n..victim * len / n];
                for chunk in part.chunks(CHUNK_BYTES / 4) {
                    t.send(victim + 1, 1, bytemuck::cast_slice(chunk)).unwrap();
                }
                t.kill();
                dead.store(true, Ordering::SeqCst);
                return None;
            }
            if t.rank() == victim - 1 {
                while !dead.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            let call = Call::new(&t, 1);
            Some(all_reduce(
                call,
                &mut buf,
                ReduceOp::Sum,
                AllReduceAlgorithm::Ring,
            ))
        });
        let _ = done.send(results);
    });
    let results = results
        .recv_timeout(PATIENCE)
        .expect("a survivor is stuck: the all-reduce never returned");
    for (rank, result) in survivors(results, victim) {
        assert!(
            matches!(result, Err(CollectiveError::PeerLost { rank: 2 })),
            "rank {rank}: {result:?}"
        );
    }
}

/// Rank 2 stays alive and silent; the others share one deadline. Who is
/// blamed must not depend on how the threads are scheduled: the grace for
/// abort frames is long beside any scheduling delay, and rank 2 speaks
/// only once every other rank has returned.
#[test]
fn a_rank_that_misses_the_deadline_is_reported_lost_by_everyone() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let n = 4;
    let deadline = Instant::now() + Duration::from_millis(200);
    let returned = AtomicUsize::new(0);
    let results = LocalTransport::run(LocalTransport::world_with_timeout(n, PATIENCE), |t| {
        if t.rank() == 2 {
            while returned.load(Ordering::SeqCst) < n - 1 {
                std::thread::sleep(Duration::from_millis(10));
            }
            return None;
        }
        let mut buf = input(t.rank(), 10);
        let call = Call::new(&t, 1)
            .until(deadline)
            .blame_grace(Duration::from_secs(2));
        let result = all_reduce(call, &mut buf, ReduceOp::Sum, AllReduceAlgorithm::Auto);
        returned.fetch_add(1, Ordering::SeqCst);
        Some(result)
    });
    for result in results.into_iter().flatten() {
        assert!(
            matches!(result, Err(CollectiveError::PeerLost { rank: 2 })),
            "{result:?}"
        );
    }
}

#[test]
fn every_site_blames_the_rank_that_died_in_another_site() {
    let (n, victim) = (6, 4);
    let sites = [0, 0, 0, 1, 1, 1];
    let results = LocalTransport::run(LocalTransport::world_with_timeout(n, PATIENCE), |t| {
        if t.rank() == victim {
            return None;
        }
        let mut buf = input(t.rank(), 1000);
        Some(hierarchical_all_reduce(
            Call::new(&t, 1),
            &mut buf,
            ReduceOp::Sum,
            &sites,
        ))
    });
    for (rank, result) in survivors(results, victim) {
        assert!(
            matches!(result, Err(CollectiveError::PeerLost { rank: 4 })),
            "rank {rank}: {result:?}"
        );
    }
}

#[test]
fn a_broadcast_from_a_missing_root_is_refused_on_every_rank() {
    let results = LocalTransport::run(LocalTransport::world(3), |t| {
        broadcast(Call::new(&t, 1), &mut [0i32; 4], 3)
    });
    assert!(results
        .iter()
        .all(|r| matches!(r, Err(CollectiveError::InvalidArgument(_)))));
}
