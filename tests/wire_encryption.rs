//! What an eavesdropper or an active attacker on the path between two
//! sites gets: real ranks on real sockets, with a relay in between that
//! records (and, in some tests, injects) the bytes as a router on the WAN
//! would.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use swarmrun::transport::{TcpOptions, TcpTransport, Transport};
use swarmrun::wire::{
    AuthStream, FrameKind, Hello, JobKey, Session, StreamOptions, WireError, HEADER_LEN, MAC_LEN,
};

const JOB: &str = "wire-encryption";

/// Long beside any scheduling delay of a busy host; nothing here waits
/// for it unless it has failed.
const PATIENCE: Duration = Duration::from_secs(30);

/// The relays here stand for the network between two sites: on loopback,
/// only `seal_loopback` makes the links seal their frames as such a link
/// would.
const STREAM: StreamOptions = StreamOptions {
    max_frame: 1 << 20,
    handshake_timeout: PATIENCE,
    seal_loopback: true,
};

/// A loopback link's options as the ranks of one host use them.
const UNSEALED: StreamOptions = StreamOptions {
    seal_loopback: false,
    ..STREAM
};

/// A TCP relay for one connection to `target`, recording each direction.
struct Relay {
    addr: SocketAddr,
    /// Bytes client -> server, and server -> client.
    seen: [Arc<Mutex<Vec<u8>>>; 2],
    thread: JoinHandle<()>,
}

impl Relay {
    fn to(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = [Arc::default(), Arc::default()];
        let recorders = seen.clone();
        let thread = thread::spawn(move || {
            let (client, _) = listener.accept().unwrap();
            let server = TcpStream::connect(target).unwrap();
            let [up, down] = recorders;
            let forward = |from: TcpStream, to: TcpStream, log: Arc<Mutex<Vec<u8>>>| {
                thread::spawn(move || pump(from, to, &log))
            };
            let a = forward(client.try_clone().unwrap(), server.try_clone().unwrap(), up);
            let b = forward(server, client, down);
            a.join().unwrap();
            b.join().unwrap();
        });
        Relay { addr, seen, thread }
    }

    fn client_to_server(&self) -> Vec<u8> {
        self.seen[0].lock().unwrap().clone()
    }

    /// Waits for both sides to close; returns what each direction carried.
    fn finish(self) -> [Vec<u8>; 2] {
        self.thread.join().unwrap();
        self.seen.map(|log| log.lock().unwrap().clone())
    }
}

/// Copies `from` into `to`, logging every byte, until either side closes.
fn pump(mut from: TcpStream, mut to: TcpStream, log: &Mutex<Vec<u8>>) {
    let mut buf = [0u8; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        log.lock().unwrap().extend_from_slice(&buf[..n]);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A tensor whose every 16-byte window is distinct and far from zero, so
/// that any piece of it in clear would be found.
fn known_tensor(len: usize) -> Vec<f32> {
    let mut x = 0x9e37_79b9_u32;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            1.0 + (x >> 8) as f32 / (1u32 << 24) as f32
        })
        .collect()
}

/// How many of the 16-byte pieces of `needle` (at every 16-byte offset)
/// appear anywhere in `haystack`.
fn pieces_found(needle: &[u8], haystack: &[u8]) -> usize {
    let windows: HashSet<&[u8]> = haystack.windows(16).collect();
    needle
        .chunks_exact(16)
        .filter(|piece| windows.contains(piece))
        .count()
}

#[test]
fn a_tensor_between_two_sites_never_crosses_the_wire_in_clear() {
    let key = JobKey::generate().unwrap();
    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    // Site B's rank 1 reaches site A's rank 0 only through the relay.
    let relay = Relay::to(addrs[0]);
    let views = [addrs.clone(), vec![relay.addr, addrs[1]]];
    let opts = TcpOptions {
        connect_timeout: PATIENCE,
        default_timeout: PATIENCE,
        handshake_timeout: PATIENCE,
        seal_loopback: true,
        ..TcpOptions::default()
    };
    let tensor = known_tensor(1 << 18);
    let bytes: &[u8] = bytemuck::cast_slice(&tensor);
    thread::scope(|s| {
        let ranks: Vec<_> = listeners
            .into_iter()
            .zip(&views)
            .enumerate()
            .map(|(rank, (listener, view))| {
                let key = &key;
                s.spawn(move || {
                    let t = TcpTransport::connect(rank, listener, view, key, JOB, opts).unwrap();
                    t.send(1 - rank, 7, bytes).unwrap();
                    assert_eq!(t.recv(1 - rank, 7).unwrap(), bytes, "rank {rank}");
                    t.shutdown();
                })
            })
            .collect();
        ranks.into_iter().for_each(|r| r.join().unwrap());
    });
    let [up, down] = relay.finish();
    // The search finds the tensor wherever it is in clear.
    assert_eq!(
        pieces_found(bytes, &[b"xy", bytes].concat()),
        bytes.len() / 16
    );
    for (direction, seen) in [("site B to site A", up), ("site A to site B", down)] {
        assert!(
            seen.len() > bytes.len(),
            "{direction}: the relay saw only {} bytes of a {}-byte tensor",
            seen.len(),
            bytes.len()
        );
        let found = pieces_found(bytes, &seen);
        assert_eq!(
            found, 0,
            "{direction}: {found} 16-byte pieces of the tensor in clear"
        );
    }
}

/// A client and a server handshaking over a relay; returns both streams
/// and the relay.
fn relayed_pair(key: &JobKey) -> (AuthStream, AuthStream, Relay) {
    let (client, server, relay) = relayed_handshake(key, (STREAM, STREAM));
    (client.unwrap(), server.unwrap(), relay)
}

/// A client and a server with their own options handshaking over a
/// relay: what each side's handshake gave, and the relay.
fn relayed_handshake(
    key: &JobKey,
    (client_opts, server_opts): (StreamOptions, StreamOptions),
) -> (
    Result<AuthStream, WireError>,
    Result<AuthStream, WireError>,
    Relay,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay = Relay::to(listener.local_addr().unwrap());
    let server_key = key.clone();
    let server = thread::spawn(move || {
        let (socket, _) = listener.accept().unwrap();
        AuthStream::server(socket, &server_key, Hello::new(0, JOB), server_opts)
    });
    let socket = TcpStream::connect(relay.addr).unwrap();
    let client = AuthStream::client(socket, key, Hello::new(1, JOB), client_opts);
    let server = server.join().unwrap();
    (client.map(|c| c.0), server.map(|s| s.0), relay)
}

#[test]
fn ranks_of_one_host_send_frames_unsealed_after_the_handshake() {
    // The handshake (the job key proven, `tests/transport_tcp.rs` and the
    // wire's unit tests) is the same either way; only the frames differ.
    let key = JobKey::generate().unwrap();
    let (client, server, relay) = relayed_handshake(&key, (UNSEALED, UNSEALED));
    let (mut client, mut server) = (client.unwrap(), server.unwrap());
    assert!(!client.sealed() && !server.sealed());
    let payload = b"stage 3 gradients, slice 5";
    let before = relay.client_to_server().len();
    client.send(FrameKind::Data, 42, payload).unwrap();
    assert_eq!(server.recv().unwrap().payload, payload);
    // The header and the payload as they are: nothing sealed, nothing added.
    let wire = relay.client_to_server()[before..].to_vec();
    assert_eq!(wire.len(), HEADER_LEN + payload.len());
    assert_eq!(&wire[HEADER_LEN..], payload);
}

#[test]
fn ends_that_disagree_on_sealing_a_loopback_link_are_refused_with_the_setting_named() {
    let key = JobKey::generate().unwrap();
    for (client_opts, server_opts, client_seals) in
        [(UNSEALED, STREAM, false), (STREAM, UNSEALED, true)]
    {
        let (_client, server, _relay) = relayed_handshake(&key, (client_opts, server_opts));
        let err = server.unwrap_err();
        assert!(
            matches!(err, WireError::SealMismatch { theirs_sealed, .. } if theirs_sealed == client_seals),
            "{err}"
        );
        assert!(err.to_string().contains("seal_loopback"), "{err}");
    }
}

/// Sends `payload` client -> server, receives it, and returns the frame's
/// bytes as they crossed the wire.
fn frame_on_the_wire(client: &mut AuthStream, server: &mut AuthStream, relay: &Relay) -> Vec<u8> {
    let payload = b"stage 3 gradients, slice 5";
    let before = relay.client_to_server().len();
    client.send(FrameKind::Data, 42, payload).unwrap();
    assert_eq!(server.recv().unwrap().payload, payload);
    let wire = relay.client_to_server()[before..].to_vec();
    assert_eq!(wire.len(), HEADER_LEN + payload.len() + MAC_LEN);
    wire
}

#[test]
fn a_frame_replayed_on_its_connection_is_refused() {
    let key = JobKey::generate().unwrap();
    let (mut client, mut server, relay) = relayed_pair(&key);
    let frame = frame_on_the_wire(&mut client, &mut server, &relay);
    assert_injected_frame_refused(&client, &mut server, &frame);
}

#[test]
fn a_frame_from_another_connection_of_the_same_job_is_refused() {
    let key = JobKey::generate().unwrap();
    let (mut client_a, mut server_a, relay_a) = relayed_pair(&key);
    let (mut client_b, mut server_b, relay_b) = relayed_pair(&key);
    // Both connections at the same frame number: only the keys differ.
    frame_on_the_wire(&mut client_a, &mut server_a, &relay_a);
    let foreign = frame_on_the_wire(&mut client_b, &mut server_b, &relay_b);
    assert_injected_frame_refused(&client_a, &mut server_a, &foreign);
}

/// Writes `frame` into `client`'s connection, as an attacker on the path
/// would, and asserts that the server refuses it.
fn assert_injected_frame_refused(client: &AuthStream, server: &mut AuthStream, frame: &[u8]) {
    let mut socket = client.try_clone_socket().unwrap();
    socket.write_all(frame).unwrap();
    let err = server.recv().unwrap_err();
    assert!(matches!(err, WireError::BadMac { .. }), "{err}");
}

#[test]
fn a_recorded_handshake_replayed_to_the_server_is_not_let_in() {
    let key = JobKey::generate().unwrap();
    let (_client, _server, relay) = relayed_pair(&key);
    // Everything the client sent: its hello and its key confirmation.
    let recorded = relay.client_to_server();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut replayer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (socket, _) = listener.accept().unwrap();
    replayer.write_all(&recorded).unwrap();
    let result = AuthStream::server(socket, &key, Hello::new(0, JOB), STREAM);
    match result {
        Err(WireError::AuthFailed { reason, .. }) => {
            assert!(reason.contains("did not confirm"), "{reason}")
        }
        other => panic!("a replayed handshake got {other:?}"),
    }
}

#[test]
fn frames_out_of_order_are_refused() {
    let peer = SocketAddr::from(([127, 0, 0, 1], 9));
    let key = [5u8; 32];
    let mut writer = Session::new(&key, 1024, peer);
    let mut frames = Vec::new();
    for payload in [&b"first"[..], b"second"] {
        let mut wire = Vec::new();
        writer
            .write(&mut wire, FrameKind::Data, 1, &[payload])
            .unwrap();
        frames.push(wire);
    }
    let mut in_order = Session::new(&key, 1024, peer);
    assert_eq!(
        in_order.read(&mut &frames[0][..]).unwrap().payload,
        b"first"
    );
    assert_eq!(
        in_order.read(&mut &frames[1][..]).unwrap().payload,
        b"second"
    );
    let mut swapped = Session::new(&key, 1024, peer);
    let err = swapped.read(&mut &frames[1][..]).unwrap_err();
    assert!(matches!(err, WireError::BadMac { .. }), "{err}");
}
