//! TcpTransport over real sockets on 127.0.0.1, one thread per rank.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use swarmrun::transport::{TcpOptions, TcpTransport, Transport, TransportError};
use swarmrun::wire::{AuthStream, FrameHeader, FrameKind, Hello, JobKey, StreamOptions, WireError};

const JOB: &str = "transport-test";
const MAX_FRAME: usize = 1024;
/// Above the 3 MiB striped messages below, far below what a test host holds.
const MAX_MESSAGE: usize = 4 << 20;

/// Long beside any scheduling delay of a busy host: a test that waits this
/// long has failed, and one that asserts "at once" checks it waited well
/// under half of it, so no outcome depends on how fast the host is.
const PATIENCE: Duration = Duration::from_secs(30);

fn opts() -> TcpOptions {
    TcpOptions {
        max_frame: MAX_FRAME,
        max_message: MAX_MESSAGE,
        connect_timeout: PATIENCE,
        default_timeout: PATIENCE,
        handshake_timeout: PATIENCE,
        joinable: false,
        lanes: 1,
        seal_loopback: false,
    }
}

fn stream_opts() -> StreamOptions {
    StreamOptions {
        max_frame: MAX_FRAME,
        handshake_timeout: PATIENCE,
        seal_loopback: false,
    }
}

/// Binds `n` listeners on loopback; returns them and the address list
/// every rank is given.
fn listeners(n: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    (listeners, addrs)
}

/// Starts `TcpTransport::connect` for each given rank on its own thread.
fn start_ranks(
    listeners: Vec<TcpListener>,
    addrs: &[SocketAddr],
    ranks: usize,
    key: &JobKey,
    opts: TcpOptions,
) -> Vec<thread::JoinHandle<Result<TcpTransport, TransportError>>> {
    listeners
        .into_iter()
        .take(ranks)
        .enumerate()
        .map(|(rank, listener)| {
            let (addrs, key) = (addrs.to_vec(), key.clone());
            thread::spawn(move || TcpTransport::connect(rank, listener, &addrs, &key, JOB, opts))
        })
        .collect()
}

fn join_results(
    handles: Vec<thread::JoinHandle<Result<TcpTransport, TransportError>>>,
) -> Vec<Result<TcpTransport, TransportError>> {
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn join_ranks(
    handles: Vec<thread::JoinHandle<Result<TcpTransport, TransportError>>>,
) -> Vec<TcpTransport> {
    join_results(handles)
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

/// A complete mesh of `n` ranks and the addresses they listen on.
fn mesh(n: usize, key: &JobKey, opts: TcpOptions) -> (Vec<TcpTransport>, Vec<SocketAddr>) {
    let (listeners, addrs) = listeners(n);
    (
        join_ranks(start_ranks(listeners, &addrs, n, key, opts)),
        addrs,
    )
}

/// Each given rank sends one message to each given rank (itself included)
/// and checks what it gets back.
fn exchange_round(ranks: &[&TcpTransport], tag: u64) {
    let ids: Vec<usize> = ranks.iter().map(|t| t.rank()).collect();
    thread::scope(|s| {
        for t in ranks {
            let ids = &ids;
            s.spawn(move || {
                for &to in ids {
                    t.send(to, tag, &[t.rank() as u8]).unwrap();
                }
                for &from in ids {
                    assert_eq!(t.recv(from, tag).unwrap(), vec![from as u8]);
                }
            });
        }
    });
}

/// A byte pattern that makes a misplaced or dropped chunk visible.
fn big_message(from: usize, to: usize) -> Vec<u8> {
    (0..10 * MAX_FRAME + 7)
        .map(|i| (i * 31 + from * 7 + to) as u8)
        .collect()
}

#[test]
fn all_to_all_keeps_per_tag_order_and_reassembles_large_messages() {
    let key = JobKey::generate().unwrap();
    let (ranks, _) = mesh(4, &key, opts());
    const TAGS: u64 = 3;
    const PER_TAG: u8 = 20;
    const BIG_TAG: u64 = 99;
    thread::scope(|s| {
        for t in &ranks {
            s.spawn(move || {
                let me = t.rank();
                for to in 0..t.size() {
                    t.send(to, BIG_TAG, &big_message(me, to)).unwrap();
                    for seq in 0..PER_TAG {
                        for tag in 0..TAGS {
                            t.send(to, tag, &[me as u8, tag as u8, seq]).unwrap();
                        }
                    }
                }
                for from in 0..t.size() {
                    // Highest tag first: other tags must queue, not block.
                    for tag in (0..TAGS).rev() {
                        for seq in 0..PER_TAG {
                            assert_eq!(t.recv(from, tag).unwrap(), [from as u8, tag as u8, seq]);
                        }
                    }
                    assert!(t.recv(from, BIG_TAG).unwrap() == big_message(from, me));
                }
            });
        }
    });
}

#[test]
fn connection_with_wrong_key_is_refused_and_mesh_keeps_working() {
    let key = JobKey::generate().unwrap();
    let (ranks, addrs) = mesh(3, &key, opts());
    let target = TcpStream::connect(addrs[0]).unwrap();
    let wrong = JobKey::generate().unwrap();
    let result = AuthStream::client(target, &wrong, Hello::new(2, JOB), stream_opts());
    assert!(
        matches!(result, Err(WireError::AuthFailed { .. })),
        "{result:?}"
    );
    exchange_round(&ranks.iter().collect::<Vec<_>>(), 1);
}

#[test]
fn other_job_and_garbage_are_refused_and_mesh_keeps_working() {
    let key = JobKey::generate().unwrap();
    let (ranks, addrs) = mesh(3, &key, opts());
    let addr = addrs[0];

    let other_job = Hello::new(2, "another-job");
    let result = AuthStream::client(
        TcpStream::connect(addr).unwrap(),
        &key,
        other_job,
        stream_opts(),
    );
    assert!(
        matches!(result, Err(WireError::JobMismatch { .. })),
        "{result:?}"
    );

    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    garbage.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut reply = Vec::new();
    garbage.read_to_end(&mut reply).unwrap();
    assert!(reply.is_empty(), "a stranger must learn nothing");

    exchange_round(&ranks.iter().collect::<Vec<_>>(), 1);
}

#[test]
fn second_connection_claiming_a_connected_rank_is_dropped() {
    let key = JobKey::generate().unwrap();
    let (ranks, addrs) = mesh(3, &key, opts());
    let impostor = TcpStream::connect(addrs[0]).unwrap();
    let (mut impostor, _) =
        AuthStream::client(impostor, &key, Hello::new(1, JOB), stream_opts()).unwrap();
    let result = impostor.recv();
    assert!(
        matches!(result, Err(WireError::Closed { .. })),
        "{result:?}"
    );
    exchange_round(&ranks.iter().collect::<Vec<_>>(), 1);
}

/// Ranks 0 and 1 are real; rank 2 is played by the test with the real key,
/// so it can put arbitrary bytes on an authenticated connection.
struct RogueWorld {
    ranks: Vec<TcpTransport>,
    /// Rank 2's authenticated stream to rank 0, and a raw handle on its socket.
    to_0: (AuthStream, TcpStream),
    to_1: AuthStream,
}

/// [`RogueWorld`] with its links' frames sealed (as between hosts) or not
/// (as the ranks of one host send them by default).
fn rogue_world(key: &JobKey, seal_loopback: bool) -> RogueWorld {
    let (listeners, addrs) = listeners(3);
    let rank_opts = TcpOptions {
        seal_loopback,
        ..opts()
    };
    let handles = start_ranks(listeners, &addrs, 2, key, rank_opts);
    let rogue_opts = StreamOptions {
        seal_loopback,
        ..stream_opts()
    };
    let dial = |to: usize| {
        let socket = TcpStream::connect(addrs[to]).unwrap();
        AuthStream::client(socket, key, Hello::new(2, JOB), rogue_opts)
            .unwrap()
            .0
    };
    let to_0 = dial(0);
    let raw = to_0.try_clone_socket().unwrap();
    let to_1 = dial(1);
    RogueWorld {
        ranks: join_ranks(handles),
        to_0: (to_0, raw),
        to_1,
    }
}

/// Checks that rank 0 dropped rank 2 for `expected` (a fragment of the
/// reason), while rank 1 still hears from rank 2 and ranks 0 and 1 still
/// talk.
fn assert_rogue_dropped(world: RogueWorld, bad_bytes: &[u8], expected: &str) {
    let write = |_: &mut AuthStream, raw: &mut TcpStream| raw.write_all(bad_bytes).unwrap();
    assert_rogue_dropped_by(world, write, expected);
}

/// [`assert_rogue_dropped`] after `misbehave` on rank 2's stream to rank
/// 0 (or the raw socket under it).
fn assert_rogue_dropped_by(
    world: RogueWorld,
    misbehave: impl FnOnce(&mut AuthStream, &mut TcpStream),
    expected: &str,
) {
    let RogueWorld {
        ranks,
        to_0: (mut to_0, mut raw),
        mut to_1,
    } = world;
    // A good frame first: the link works until the bad one.
    to_0.send(FrameKind::Data, 5, b"good").unwrap();
    assert_eq!(ranks[0].recv(2, 5).unwrap(), b"good");

    misbehave(&mut to_0, &mut raw);
    let rogue_addr = raw.local_addr().unwrap().to_string();
    let err = ranks[0].recv(2, 5).unwrap_err();
    match &err {
        TransportError::PeerLost { rank: 2, reason }
            if reason.contains(&rogue_addr) && reason.contains(expected) => {}
        other => panic!("expected rank 2 at {rogue_addr} lost for {expected:?}, got {other:?}"),
    }
    assert!(err.to_string().contains("rank 2"), "{err}");
    assert!(matches!(
        ranks[0].send(2, 5, b"x"),
        Err(TransportError::PeerLost { rank: 2, .. })
    ));

    to_1.send(FrameKind::Data, 5, b"still here").unwrap();
    assert_eq!(ranks[1].recv(2, 5).unwrap(), b"still here");
    exchange_round(&[&ranks[0], &ranks[1]], 6);
}

fn header(len: u32) -> Vec<u8> {
    FrameHeader {
        kind: FrameKind::Data,
        tag: 5,
        len,
    }
    .encode()
    .to_vec()
}

#[test]
fn frame_with_bad_mac_drops_only_that_peer() {
    let key = JobKey::generate().unwrap();
    let mut bytes = header(3);
    bytes.extend_from_slice(b"abc");
    bytes.extend_from_slice(&[0u8; 16]);
    assert_rogue_dropped(rogue_world(&key, true), &bytes, "integrity check");
}

#[test]
fn a_message_growing_past_max_message_drops_only_that_peer() {
    let key = JobKey::generate().unwrap();
    // Frames each within the frame limit, of a message that never ends.
    let chunk = [7u8; MAX_FRAME];
    let endless = |to_0: &mut AuthStream, _: &mut TcpStream| {
        for _ in 0..=MAX_MESSAGE / MAX_FRAME {
            to_0.send(FrameKind::DataMore, 5, &chunk).unwrap();
        }
    };
    assert_rogue_dropped_by(rogue_world(&key, false), endless, "network.max_message");
}

#[test]
fn oversized_frame_drops_only_that_peer_sealed_or_not() {
    let key = JobKey::generate().unwrap();
    let bytes = header(MAX_FRAME as u32 + 1);
    for seal in [false, true] {
        assert_rogue_dropped(rogue_world(&key, seal), &bytes, "exceeds the limit");
    }
}

#[test]
fn frame_with_bad_magic_drops_only_that_peer_sealed_or_not() {
    let key = JobKey::generate().unwrap();
    let mut bytes = header(0);
    bytes[..4].copy_from_slice(b"XXXX");
    for seal in [false, true] {
        assert_rogue_dropped(rogue_world(&key, seal), &bytes, "bad magic");
    }
}

#[test]
fn peer_that_shuts_down_is_lost_at_once_after_its_last_messages() {
    let key = JobKey::generate().unwrap();
    let (mut ranks, _) = mesh(2, &key, opts());
    let leaving = ranks.pop().unwrap();
    leaving.send(0, 1, b"last words").unwrap();
    drop(leaving);

    let started = Instant::now();
    assert_eq!(ranks[0].recv(1, 1).unwrap(), b"last words");
    let err = ranks[0].recv(1, 1).unwrap_err();
    assert!(
        matches!(&err, TransportError::PeerLost { rank: 1, reason } if reason.contains("closed its transport")),
        "{err:?}"
    );
    assert!(started.elapsed() < PATIENCE / 2, "waited for a timeout");
}

#[test]
fn peer_that_vanishes_without_goodbye_is_lost_at_once() {
    let key = JobKey::generate().unwrap();
    let world = rogue_world(&key, false);
    let started = Instant::now();
    drop(world.to_0);
    let err = world.ranks[0].recv(2, 1).unwrap_err();
    assert!(
        matches!(err, TransportError::PeerLost { rank: 2, .. }),
        "{err:?}"
    );
    assert!(started.elapsed() < PATIENCE / 2, "waited for a timeout");
}

#[test]
fn recv_into_places_a_message_of_its_length_and_hands_back_any_other_sealed_or_not() {
    let key = JobKey::generate().unwrap();
    for seal_loopback in [false, true] {
        let (ranks, _) = mesh(
            2,
            &key,
            TcpOptions {
                seal_loopback,
                ..opts()
            },
        );
        let patience = || Instant::now() + PATIENCE;
        // Two and a half frames' worth, received a frame a message.
        let pieces: Vec<u8> = (0..MAX_FRAME * 5 / 2).map(|i| (i * 7) as u8).collect();
        let three_frames = big_message(1, 0);
        thread::scope(|s| {
            // Waiting before anything is sent (a receive a reader can lend
            // its stream to) and after (messages already queued) alike.
            let receiver = s.spawn(|| {
                let mut into = vec![0u8; pieces.len()];
                let got = ranks[0].recv_into(1, 9, patience(), &mut into, MAX_FRAME);
                assert_eq!(got.unwrap(), None, "sealed: {seal_loopback}");
                assert_eq!(into, pieces);
                let cut = ranks[0].recv_into(1, 9, patience(), &mut into, MAX_FRAME);
                assert_eq!(cut.unwrap(), Some((MAX_FRAME, b"abort".to_vec())));
                assert_eq!(into[..MAX_FRAME], pieces[..MAX_FRAME]);
                // A message longer than a frame, joined from its frames.
                let mut big = vec![0u8; three_frames.len()];
                let got = ranks[0].recv_into(1, 9, patience(), &mut big, three_frames.len());
                assert_eq!(got.unwrap(), None);
                assert_eq!(big, three_frames);
            });
            for piece in pieces.chunks(MAX_FRAME) {
                ranks[1].send(0, 9, piece).unwrap();
            }
            ranks[1].send(0, 9, &pieces[..MAX_FRAME]).unwrap();
            ranks[1].send(0, 9, b"abort").unwrap();
            ranks[1].send(0, 9, &three_frames).unwrap();
            receiver.join().unwrap();
        });
        ranks[1].send(0, 10, b"que").unwrap();
        ranks[1].send(0, 10, b"ued").unwrap();
        let mut into = [0u8; 6];
        assert_eq!(
            ranks[0].recv_into(1, 10, patience(), &mut into, 3).unwrap(),
            None
        );
        assert_eq!(&into, b"queued");
        ranks[1].send(0, 10, b"").unwrap();
        assert_eq!(
            ranks[0].recv_into(1, 10, patience(), &mut [], 3).unwrap(),
            None
        );
        exchange_round(&[&ranks[0], &ranks[1]], 11);
    }
}

#[test]
fn recv_into_times_out_when_nothing_is_sent_and_what_comes_later_is_kept() {
    let key = JobKey::generate().unwrap();
    let (ranks, _) = mesh(2, &key, opts());
    let mut into = [0u8; 4];
    let started = Instant::now();
    let err = ranks[0]
        .recv_into(1, 7, started + Duration::from_millis(100), &mut into, 4)
        .unwrap_err();
    assert!(
        matches!(err, TransportError::Timeout { rank: 1, tag: 7 }),
        "{err:?}"
    );
    assert!(started.elapsed() < PATIENCE / 2);
    ranks[1].send(0, 7, b"late").unwrap();
    assert_eq!(ranks[0].recv(1, 7).unwrap(), b"late");
    ranks[1].send(0, 7, b"next").unwrap();
    let got = ranks[0].recv_into(1, 7, Instant::now() + PATIENCE, &mut into, 4);
    assert_eq!(got.unwrap(), None);
    assert_eq!(&into, b"next");
}

#[test]
fn recv_deadline_times_out_when_nothing_is_sent() {
    let key = JobKey::generate().unwrap();
    let (ranks, _) = mesh(2, &key, opts());
    let started = Instant::now();
    let err = ranks[0]
        .recv_deadline(1, 7, started + Duration::from_millis(100))
        .unwrap_err();
    assert!(
        matches!(err, TransportError::Timeout { rank: 1, tag: 7 }),
        "{err:?}"
    );
    let waited = started.elapsed();
    // The deadline's, not the transport's default timeout.
    assert!(waited >= Duration::from_millis(100) && waited < PATIENCE / 2);
}

#[test]
fn unknown_rank_is_an_error_not_a_panic() {
    let key = JobKey::generate().unwrap();
    let (ranks, _) = mesh(2, &key, opts());
    assert!(matches!(
        ranks[0].send(2, 0, b"x"),
        Err(TransportError::NoSuchRank { rank: 2, size: 2 })
    ));
    assert!(matches!(
        ranks[0].recv(9, 0),
        Err(TransportError::NoSuchRank { rank: 9, size: 2 })
    ));
}

#[test]
fn missing_rank_fails_connect_after_the_timeout() {
    let key = JobKey::generate().unwrap();
    let (listeners, addrs) = listeners(2);
    let quick = TcpOptions {
        connect_timeout: Duration::from_millis(300),
        ..opts()
    };
    let result = join_results(start_ranks(listeners, &addrs, 1, &key, quick));
    assert!(
        matches!(&result[..], [Err(TransportError::MissingPeers { ranks, .. })] if ranks == &[1]),
        "{result:?}"
    );
}

fn laned(lanes: usize) -> TcpOptions {
    TcpOptions { lanes, ..opts() }
}

/// With 4 lanes, each pair has 3 extra connections, and a message of a
/// MiB or more is striped over all 4: it arrives whole, in its place among
/// the small ones of the same tag, from two senders at once.
#[test]
fn messages_striped_over_lanes_arrive_whole_and_in_order() {
    let key = JobKey::generate().unwrap();
    let (ranks, _) = mesh(3, &key, laned(4));
    assert_eq!(ranks[0].lanes_up(2), 3);
    assert_eq!(ranks[2].lanes_up(0), 3);
    let big = |from: usize, n: usize| -> Vec<u8> {
        (0..(3 << 20) + n)
            .map(|i| (i * 31 + from * 7 + n) as u8)
            .collect()
    };
    thread::scope(|s| {
        for from in [1, 2] {
            let t = &ranks[from];
            s.spawn(move || {
                for n in 0..3 {
                    t.send(0, 5, &[from as u8, n as u8]).unwrap();
                    t.send(0, 5, &big(from, n)).unwrap();
                }
            });
        }
        for from in [1, 2] {
            for n in 0..3 {
                assert_eq!(ranks[0].recv(from, 5).unwrap(), [from as u8, n as u8]);
                assert!(
                    ranks[0].recv(from, 5).unwrap() == big(from, n),
                    "{from} {n}"
                );
            }
        }
    });
}

/// A lane is a connection like the main one: one that breaks the protocol
/// takes its peer down, and the others carry on.
#[test]
fn a_lane_that_breaks_the_protocol_takes_its_peer_down() {
    let key = JobKey::generate().unwrap();
    let (listeners, addrs) = listeners(3);
    let handles = start_ranks(listeners, &addrs, 2, &key, laned(2));
    let dial = |lane: u16| {
        let socket = TcpStream::connect(addrs[0]).unwrap();
        let hello = Hello::new(2, JOB).on_lane(lane);
        AuthStream::client(socket, &key, hello, stream_opts())
            .unwrap()
            .0
    };
    // Rank 2, played here: its main connection to rank 0, then a lane.
    let main = dial(0);
    let lane = dial(1);
    let to_1 = {
        let socket = TcpStream::connect(addrs[1]).unwrap();
        AuthStream::client(socket, &key, Hello::new(2, JOB), stream_opts())
            .unwrap()
            .0
    };
    let ranks = join_ranks(handles);
    let mut raw = lane.try_clone_socket().unwrap();
    raw.write_all(b"not a frame at all, just bytes").unwrap();
    let err = ranks[0].recv(2, 5).unwrap_err();
    assert!(
        matches!(err, TransportError::PeerLost { rank: 2, .. }),
        "{err:?}"
    );
    exchange_round(&[&ranks[0], &ranks[1]], 6);
    drop((main, lane, to_1));
}
