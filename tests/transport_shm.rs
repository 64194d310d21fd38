//! Shared-memory transport, with ranks as threads of this process: the
//! behaviours that do not need separate processes (see
//! `transport_shm_processes.rs` for those that do).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use swarmrun::transport::shm::{ShmOptions, ShmTransport};
use swarmrun::transport::{Transport, TransportError};

fn name(test: &str) -> String {
    format!("swarmrun-test-{}-{test}", std::process::id())
}

/// Long beside any scheduling delay of a busy host: a test that waits this
/// long has failed, and one that asserts "at once" checks it waited well
/// under half of it, so no outcome depends on how fast the host is.
const PATIENCE: Duration = Duration::from_secs(30);

fn small_opts() -> ShmOptions {
    ShmOptions {
        ring_capacity: 4096,
        chunk_bytes: 8192,
        timeout: PATIENCE,
        join_timeout: PATIENCE,
        ..ShmOptions::default()
    }
}

/// Opens ranks 0..size of segment `name` as threads and hands them back.
fn open_all(name: &str, size: usize, opts: &ShmOptions) -> Vec<ShmTransport> {
    let handles: Vec<_> = (0..size)
        .map(|rank| {
            let (name, opts) = (name.to_owned(), opts.clone());
            thread::spawn(move || ShmTransport::open(&name, rank, size, opts).expect("open"))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("open thread"))
        .collect()
}

fn sum_f32(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.chunks_exact_mut(4).zip(src.chunks_exact(4)) {
        let v =
            f32::from_ne_bytes(d.try_into().unwrap()) + f32::from_ne_bytes(s.try_into().unwrap());
        d.copy_from_slice(&v.to_ne_bytes());
    }
}

#[test]
fn a_message_sent_to_self_arrives() {
    let ranks = open_all(&name("self"), 1, &small_opts());
    let me: &dyn Transport = &ranks[0];
    let big = vec![7u8; 10 * 4096];
    me.send(0, 1, b"hi").unwrap();
    me.send(0, 2, &big).unwrap();
    assert_eq!(me.recv(0, 2).unwrap(), big);
    assert_eq!(me.recv(0, 1).unwrap(), b"hi");
}

#[test]
fn recv_past_its_deadline_times_out_naming_peer_and_tag() {
    let ranks = open_all(&name("timeout"), 2, &small_opts());
    let start = Instant::now();
    let err = ranks[0]
        .recv_deadline(1, 0x42, Instant::now() + Duration::from_millis(100))
        .unwrap_err();
    assert!(
        matches!(err, TransportError::Timeout { rank: 1, tag: 0x42 }),
        "{err}"
    );
    assert!(start.elapsed() < PATIENCE / 2, "waited for a timeout");
}

#[test]
fn sending_to_a_rank_that_does_not_exist_is_refused() {
    let ranks = open_all(&name("norank"), 2, &small_opts());
    assert!(matches!(
        ranks[0].send(2, 0, b"x"),
        Err(TransportError::NoSuchRank { rank: 2, .. })
    ));
    assert!(matches!(
        ranks[0].recv(5, 0),
        Err(TransportError::NoSuchRank { rank: 5, .. })
    ));
}

#[test]
fn messages_larger_than_the_ring_cross_in_both_directions_without_deadlock() {
    let ranks = open_all(&name("crossing"), 2, &small_opts());
    let payload = |rank: usize| -> Vec<u8> { (0..40_000).map(|i| (i * 7 + rank) as u8).collect() };
    thread::scope(|s| {
        for t in &ranks {
            s.spawn(move || {
                let peer = 1 - t.rank();
                // Both send first: each send only finishes because the other
                // side drains its incoming ring while it waits for space.
                t.send(peer, 9, &payload(t.rank())).unwrap();
                assert_eq!(t.recv(peer, 9).unwrap(), payload(peer));
            });
        }
    });
}

#[test]
fn a_dropped_peer_is_reported_lost_after_its_messages_are_delivered() {
    let mut ranks = open_all(&name("dropped"), 2, &small_opts());
    let one = ranks.pop().unwrap();
    one.send(0, 3, b"last words").unwrap();
    drop(one);
    assert_eq!(ranks[0].recv(1, 3).unwrap(), b"last words");
    let start = Instant::now();
    let err = ranks[0].recv(1, 3).unwrap_err();
    assert!(
        matches!(err, TransportError::PeerLost { rank: 1, .. }),
        "{err}"
    );
    assert!(start.elapsed() < PATIENCE / 2, "waited for a timeout");
    assert!(matches!(
        ranks[0].send(1, 3, b"anyone?"),
        Err(TransportError::PeerLost { rank: 1, .. })
    ));
}

#[test]
fn recv_any_sleeps_until_whichever_peer_speaks_and_names_one_that_left() {
    let mut ranks = open_all(&name("any"), 3, &small_opts());
    let two = ranks.pop().unwrap();
    let far = Instant::now() + PATIENCE;
    let nothing = ranks[0].recv_any(&[1, 2], 5, Instant::now()).unwrap_err();
    assert!(
        matches!(nothing, TransportError::NoneArrived { ranks: 2, tag: 5 }),
        "{nothing}"
    );
    thread::scope(|s| {
        let waiter = s.spawn(|| ranks[0].recv_any(&[1, 2], 5, far));
        two.send(0, 5, b"from two").unwrap();
        assert_eq!(waiter.join().unwrap().unwrap(), (2, b"from two".to_vec()));
    });
    // Another tag is not taken; what a peer sent before leaving comes
    // first, then its loss.
    two.send(0, 6, b"other tag").unwrap();
    two.send(0, 5, b"last words").unwrap();
    drop(two);
    assert_eq!(
        ranks[0].recv_any(&[1, 2], 5, far).unwrap(),
        (2, b"last words".to_vec())
    );
    let start = Instant::now();
    let lost = ranks[0].recv_any(&[1, 2], 5, far).unwrap_err();
    assert!(
        matches!(lost, TransportError::PeerLost { rank: 2, .. }),
        "{lost}"
    );
    assert!(start.elapsed() < PATIENCE / 2, "waited for a timeout");
    assert_eq!(ranks[0].recv(2, 6).unwrap(), b"other tag");
    ranks[1].send(0, 5, b"from one").unwrap();
    assert_eq!(
        ranks[0].recv_any(&[1], 5, far).unwrap(),
        (1, b"from one".to_vec())
    );
}

/// Writes `bytes` at `offset` of the segment file, as a misbehaving peer
/// writing through its mapping would.
fn scribble(segment: &str, offset: usize, bytes: &[u8]) {
    let file = OpenOptions::new()
        .write(true)
        .open(Path::new("/dev/shm").join(segment))
        .unwrap();
    file.write_all_at(bytes, offset as u64).unwrap();
}

#[test]
fn a_garbage_frame_length_is_refused_naming_the_peer() {
    let name = name("garbage-len");
    let ranks = open_all(&name, 2, &small_opts());
    let layout = ranks[0].layout();
    // A frame header (tag 5, length 2^62) and a producer counter saying 16
    // bytes are ready.
    let mut frame = 5u64.to_ne_bytes().to_vec();
    frame.extend_from_slice(&(1u64 << 62).to_ne_bytes());
    scribble(&name, layout.ring_data_offset(1, 0).unwrap(), &frame);
    scribble(
        &name,
        layout.ring_head_offset(1, 0).unwrap(),
        &16u64.to_ne_bytes(),
    );
    for _ in 0..2 {
        // Refused, and still refused: the stream cannot be re-framed.
        let err = ranks[0].recv(1, 5).unwrap_err();
        match err {
            TransportError::Protocol { rank: 1, reason } => {
                assert!(reason.contains("claims"), "{reason}")
            }
            other => panic!("expected a protocol error from rank 1, got {other}"),
        }
    }
}

#[test]
fn a_producer_counter_beyond_the_ring_is_refused_naming_the_peer() {
    let name = name("garbage-head");
    let ranks = open_all(&name, 3, &small_opts());
    let layout = ranks[0].layout();
    scribble(
        &name,
        layout.ring_head_offset(2, 0).unwrap(),
        &u64::MAX.to_ne_bytes(),
    );
    let err = ranks[0].recv(2, 1).unwrap_err();
    assert!(
        matches!(err, TransportError::Protocol { rank: 2, .. }),
        "{err}"
    );
    // The other peer is unaffected.
    ranks[1].send(0, 1, b"fine").unwrap();
    assert_eq!(ranks[0].recv(1, 1).unwrap(), b"fine");
}

#[test]
fn a_consumer_counter_ahead_of_the_producer_is_refused_naming_the_peer() {
    let name = name("garbage-tail");
    let ranks = open_all(&name, 2, &small_opts());
    let layout = ranks[0].layout();
    scribble(
        &name,
        layout.ring_tail_offset(0, 1).unwrap(),
        &12345u64.to_ne_bytes(),
    );
    let err = ranks[0].send(1, 1, b"x").unwrap_err();
    assert!(
        matches!(err, TransportError::Protocol { rank: 1, .. }),
        "{err}"
    );
}

#[test]
fn a_garbage_file_under_the_segment_name_is_replaced() {
    let name = name("stale-garbage");
    let path = Path::new("/dev/shm").join(&name);
    std::fs::write(&path, vec![0xAB; 100_000]).unwrap();
    let ranks = open_all(&name, 2, &small_opts());
    ranks[1].send(0, 1, b"ok").unwrap();
    assert_eq!(ranks[0].recv(1, 1).unwrap(), b"ok");
    assert_eq!(ranks[0].run_nonce(), ranks[1].run_nonce());
}

#[test]
fn a_segment_whose_creator_is_alive_is_not_taken_over() {
    let name = name("live-owner");
    let _first = open_all(&name, 1, &small_opts());
    let err = ShmTransport::open(&name, 0, 1, small_opts())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("live process"), "{err}");
}

#[test]
fn rank_zero_removes_the_segment_when_dropped() {
    let name = name("cleanup");
    let ranks = open_all(&name, 2, &small_opts());
    let path = Path::new("/dev/shm").join(&name);
    assert!(path.exists());
    drop(ranks);
    assert!(!path.exists());
}

#[test]
fn segment_names_that_could_escape_dev_shm_are_refused() {
    for bad in ["", "../etc", "a/b", ".hidden", "sp ace"] {
        assert!(
            ShmTransport::open(bad, 0, 1, small_opts()).is_err(),
            "{bad:?} accepted"
        );
    }
}

#[test]
fn a_rank_opened_with_another_ring_size_is_refused_and_the_right_one_still_joins() {
    let name = name("mismatch-opts");
    let zero = thread::spawn({
        let name = name.clone();
        move || ShmTransport::open(&name, 0, 2, small_opts())
    });
    let other = ShmOptions {
        ring_capacity: 8192,
        ..small_opts()
    };
    let err = ShmTransport::open(&name, 1, 2, other)
        .err()
        .expect("refused");
    assert!(
        matches!(err, TransportError::Protocol { rank: 0, .. }),
        "{err}"
    );
    let one = ShmTransport::open(&name, 1, 2, small_opts()).unwrap();
    let zero = zero.join().unwrap().unwrap();
    one.send(0, 4, b"joined").unwrap();
    assert_eq!(zero.recv(1, 4).unwrap(), b"joined");
}

#[test]
fn rank_0_gives_up_on_a_rank_that_never_joins() {
    let opts = ShmOptions {
        join_timeout: Duration::from_millis(200),
        ..small_opts()
    };
    let err = ShmTransport::open(&name("never-joined"), 0, 2, opts)
        .err()
        .expect("rank 0 gives up");
    assert!(
        matches!(err, TransportError::Timeout { rank: 1, .. }),
        "{err}"
    );
}

#[test]
fn all_reduce_over_many_chunks_matches_the_sum_in_rank_order_on_threads() {
    let ranks = open_all(&name("reduce-threads"), 3, &small_opts());
    let n_elems = 10_000; // ~5 chunks of 8 KiB
    let input = |rank: usize| -> Vec<f32> {
        (0..n_elems)
            .map(|i| ((i * 31 + rank * 17) % 1000) as f32 * 0.1 + 1e-3 * rank as f32)
            .collect()
    };
    let expected: Vec<f32> = (0..n_elems)
        .map(|i| (0..3).map(|r| input(r)[i]).reduce(|a, b| a + b).unwrap())
        .collect();
    thread::scope(|s| {
        for t in &ranks {
            let expected = &expected;
            s.spawn(move || {
                let mut buf: Vec<u8> = input(t.rank())
                    .iter()
                    .flat_map(|v| v.to_ne_bytes())
                    .collect();
                t.all_reduce_bytes(&mut buf, 4, &sum_f32).unwrap();
                let got: Vec<f32> = buf
                    .chunks_exact(4)
                    .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
                    .collect();
                assert!(got
                    .iter()
                    .zip(expected)
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            });
        }
    });
}

#[test]
fn shared_buffer_all_reduce_reads_the_result_in_place() {
    // 8 KiB folds after one barrier; 64 KiB is reduced slice by slice.
    for len in [8 << 10, 64 << 10] {
        let opts = ShmOptions {
            chunk_bytes: len,
            ..small_opts()
        };
        shared_buffer_rounds(&open_all(&name("shared-buffer"), 4, &opts), len);
    }
}

fn shared_buffer_rounds(ranks: &[ShmTransport], len: usize) {
    thread::scope(|s| {
        for t in ranks {
            s.spawn(move || {
                for round in 0..5u32 {
                    let mut shared = t.shared_buffer(len).unwrap();
                    for (i, c) in shared.as_mut_slice().chunks_exact_mut(4).enumerate() {
                        c.copy_from_slice(
                            &((i as u32 + round) as f32 * (t.rank() + 1) as f32).to_ne_bytes(),
                        );
                    }
                    let reduced = shared.all_reduce(4, &sum_f32).unwrap();
                    for (i, c) in reduced.chunks_exact(4).enumerate() {
                        let want = (i as u32 + round) as f32 * 10.0;
                        assert_eq!(f32::from_ne_bytes(c.try_into().unwrap()), want);
                    }
                }
            });
        }
    });
}

#[test]
fn mismatched_all_reduce_lengths_fail_on_every_rank_naming_the_odd_one() {
    let ranks = open_all(&name("reduce-mismatch"), 3, &small_opts());
    thread::scope(|s| {
        for t in &ranks {
            s.spawn(move || {
                let len = if t.rank() == 2 { 8 } else { 4 };
                let mut buf = vec![0u8; len];
                let err = t.all_reduce_bytes(&mut buf, 4, &sum_f32).unwrap_err();
                let TransportError::Protocol { rank, .. } = err else {
                    panic!("expected a protocol error, got {err}");
                };
                assert_eq!(rank, if t.rank() == 2 { 0 } else { 2 });
                // The group stays in step: the next collective works.
                let mut buf = vec![0u8; 4];
                t.all_reduce_bytes(&mut buf, 4, &sum_f32).unwrap();
            });
        }
    });
}

#[test]
fn a_length_that_is_not_whole_elements_is_refused_before_any_barrier() {
    let ranks = open_all(&name("reduce-ragged"), 2, &small_opts());
    let mut buf = vec![0u8; 6];
    let err = ranks[0]
        .all_reduce_bytes(&mut buf, 4, &sum_f32)
        .unwrap_err();
    assert!(matches!(err, TransportError::Io { .. }), "{err}");
}

/// One all-reduce of `n` f32 elements on `t`, rank r's element i being
/// `value(r, i)`, checked against the sum over the world's 4 ranks.
fn sum_round(t: &ShmTransport, n: usize, value: impl Fn(usize, usize) -> f32) {
    let mut buf: Vec<u8> = (0..n)
        .flat_map(|i| value(t.rank(), i).to_ne_bytes())
        .collect();
    t.all_reduce_bytes(&mut buf, 4, &sum_f32).unwrap();
    for (i, c) in buf.chunks_exact(4).enumerate() {
        let want: f32 = (0..4).map(|r| value(r, i)).sum();
        assert_eq!(f32::from_ne_bytes(c.try_into().unwrap()), want, "elem {i}");
    }
}

#[test]
fn alternating_chunked_and_shared_buffer_all_reduces_stay_correct() {
    // Every length from one to four chunks, interleaved with shared-buffer
    // reductions, walks the pipeline through every rotation of its sets.
    let ranks = open_all(&name("reduce-mixed"), 4, &small_opts());
    let value = |rank: usize, round: usize, i: usize| ((rank * 7 + round * 3 + i) % 50) as f32;
    thread::scope(|s| {
        for t in &ranks {
            s.spawn(move || {
                for round in 0..60 {
                    let n = 1 + round * 8192 * 4 / 4 / 60 + round % 5;
                    sum_round(t, n, |rank, i| value(rank, round, i));
                    if round % 3 == 0 {
                        let mut shared = t.shared_buffer(4 * 100).unwrap();
                        for (i, c) in shared.as_mut_slice().chunks_exact_mut(4).enumerate() {
                            c.copy_from_slice(&value(t.rank(), round, i).to_ne_bytes());
                        }
                        let reduced = shared.all_reduce(4, &sum_f32).unwrap();
                        for (i, c) in reduced.chunks_exact(4).enumerate() {
                            let want: f32 = (0..4).map(|r| value(r, round, i)).sum();
                            assert_eq!(f32::from_ne_bytes(c.try_into().unwrap()), want);
                        }
                    }
                }
            });
        }
    });
}

#[test]
fn back_to_back_small_all_reduces_are_right_and_never_taken_for_mismatched_calls() {
    // A small all-reduce takes one barrier, so a fast rank is often in the
    // next one, its descriptor published, while a slow one still compares
    // this one's: neither may be taken for a mismatch, nor a set reused
    // under a reader.
    let ranks = open_all(&name("reduce-small"), 4, &small_opts());
    let value = |rank: usize, round: usize, i: usize| ((rank * 5 + round * 11 + i) % 97) as f32;
    thread::scope(|s| {
        for t in &ranks {
            s.spawn(move || {
                for round in 0..3000 {
                    sum_round(t, 1 + round % 7, |rank, i| value(rank, round, i));
                }
            });
        }
    });
}

#[test]
fn a_barrier_with_a_dropped_peer_fails_with_peer_lost_at_once() {
    let mut ranks = open_all(&name("barrier-dropped"), 2, &small_opts());
    drop(ranks.pop());
    let start = Instant::now();
    let err = ranks[0].barrier().unwrap_err();
    assert!(
        matches!(err, TransportError::PeerLost { rank: 1, .. }),
        "{err}"
    );
    assert!(start.elapsed() < PATIENCE / 2, "waited for a timeout");
}
