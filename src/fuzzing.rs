//! What must hold for every decoder of bytes that come from outside the
//! process, as functions of those bytes. The cargo-fuzz targets in `fuzz/`
//! call them (`cargo +nightly fuzz run wire_frames`), and
//! `tests/fuzz_corpus.rs` replays every target's committed corpus through
//! them on each test run, so a crash once found stays fixed. Each returns
//! quietly when its decoder refuses the bytes or accepts them correctly,
//! and panics, which is what a fuzzer reports, when a property breaks.

use std::net::SocketAddr;
use std::path::Path;

use crate::checkpoint::Manifest;
use crate::compress::frame;
use crate::config::{self, CompressionSpec, ConfigError, Quant};
use crate::ledger;
use crate::pipeline::{BoundaryCodec, Router};
use crate::wire::{Assembly, Frame, FrameKind, Session};

/// The frame limit of the wire target: small, so that long messages and
/// stripes take several frames.
const WIRE_MAX_FRAME: usize = 4096;
/// The message limit of the wire target: a few frames' worth, so that
/// refusing a message that grows too long is reached too.
const WIRE_MAX_MESSAGE: usize = 4 * WIRE_MAX_FRAME;

/// The peer errors of the wire target name.
const WIRE_PEER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

/// The session of [`wire_frames`] at its first frame (for writing seeds):
/// a fixed key, so that committed seeds decrypt on every replay.
pub fn wire_session() -> Session {
    Session::new(&[7; 32], WIRE_MAX_FRAME, WIRE_PEER)
}

/// The TCP transport's receiving side: frames off a socket (their header
/// and length checks, decryption and tag check), then messages rebuilt
/// from them ([`Assembly`]).
/// An even first byte: the rest is raw bytes off the socket, sealed when
/// the byte is a multiple of 4, unsealed (a loopback link's) otherwise. An odd one:
/// the rest is frames an authenticated peer sends in any order (a kind,
/// numbered as on the wire modulo 6, a tag, a length, the payload, per
/// frame); each must be read back as written, and with one bit flipped
/// anywhere the stream must fail somewhere.
pub fn wire_frames(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let mut socket = rest;
        let mut assembly = Assembly::new(WIRE_MAX_MESSAGE);
        let mut session = match mode % 4 {
            0 => wire_session(),
            _ => Session::unsealed(WIRE_MAX_FRAME, WIRE_PEER),
        };
        loop {
            let Ok(frame) = session.read(&mut socket) else {
                return;
            };
            if assembly.take(frame).is_err() {
                return;
            }
        }
    }
    let mut frames = Vec::new();
    let mut rest = rest;
    while let [kind, tag, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        frames.push(Frame {
            kind: FrameKind::from_u8(1 + kind % 6).unwrap_or(FrameKind::Data),
            tag: u64::from(*tag),
            payload: tail[..n].to_vec(),
        });
        rest = &tail[n..];
    }
    let mut stream = Vec::new();
    let mut writer = wire_session();
    for f in &frames {
        if let Err(e) = writer.write(&mut stream, f.kind, f.tag, &[&f.payload]) {
            panic!("a frame under the limit is refused: {e}");
        }
    }
    let mut socket = &stream[..];
    let mut assembly = Assembly::new(WIRE_MAX_MESSAGE);
    let mut reader = wire_session();
    for (seq, sent) in frames.iter().enumerate() {
        match reader.read(&mut socket) {
            Ok(got) => assert_eq!(&got, sent, "frame {seq} read back"),
            Err(e) => panic!("frame {seq} written is not read back: {e}"),
        }
        // Frames out of place end the peer; here the next ones start afresh.
        if assembly.take(sent.clone()).is_err() {
            assembly = Assembly::new(WIRE_MAX_MESSAGE);
        }
    }
    if stream.is_empty() {
        return;
    }
    let bit = usize::from(mode / 2) * 131 % (stream.len() * 8);
    stream[bit / 8] ^= 1 << (bit % 8);
    let mut socket = &stream[..];
    let mut reader = wire_session();
    let all_read = frames.iter().all(|_| reader.read(&mut socket).is_ok());
    assert!(!all_read, "a stream with bit {bit} flipped was read whole");
}

/// A boundary tensor from the previous stage: the quantized frame decoder,
/// and the codec a miner decodes with. A frame it accepts is re-encoded
/// and decoded to the same values.
pub fn boundary_frame(data: &[u8]) {
    if let Ok(q) = frame::decode(data, 1 << 16) {
        let values = q.dequantize();
        assert_eq!(values.len(), q.rows() * q.width());
        for zstd in [false, true] {
            let again = frame::encode(&q, zstd)
                .and_then(|bytes| frame::decode(&bytes, 1 << 16))
                .unwrap_or_else(|e| panic!("a decoded frame does not round-trip: {e}"));
            assert_eq!(
                (again.rows(), again.width(), again.scales(), again.codes()),
                (q.rows(), q.width(), q.scales(), q.codes())
            );
        }
    }
    for quant in [Quant::None, Quant::Int8, Quant::Int4] {
        let spec = CompressionSpec {
            bottleneck: None,
            quant,
            zstd: quant == Quant::Int4,
        };
        let codec = BoundaryCodec::new(spec, 16, 8, 8);
        if let Ok(values) = codec.decode(data) {
            assert_eq!(values.len(), 16 * 8);
        }
    }
}

/// A job file. A refusal names a line and column inside the text.
pub fn job_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::parse(text, Path::new("fuzz.toml")) {
        Ok(spec) => {
            // What `swarmrun check` and the launcher do next.
            let _ = spec.plan(None);
        }
        Err(ConfigError::Invalid { line, column, .. }) => {
            let lines = text.split('\n').count().max(1);
            assert!(
                (1..=lines).contains(&line) && column >= 1,
                "{line}:{column} in a text of {lines} lines"
            );
        }
        Err(_) => {}
    }
}

/// A reward ledger (`swarmrun audit`): a chain it accepts settles, and
/// each window's shares add up to one or to nothing.
pub fn ledger(data: &[u8]) {
    let Ok(chain) = ledger::parse(data, Path::new("ledger.jsonl")) else {
        return;
    };
    for record in ledger::settled(&chain.records) {
        let total: f64 = record.miners.iter().map(|m| m.share).sum();
        assert!(
            total == 0.0 || (total - 1.0).abs() < 1e-9,
            "window {}: shares add up to {total}",
            record.window
        );
    }
    let _ = ledger::audit_table(&chain);
}

/// A checkpoint's manifest (`--resume`, `swarmrun sample`): one it accepts
/// names plain files, and its routing state routes.
pub fn manifest(data: &[u8]) {
    let Ok(manifest) = Manifest::parse(data, Path::new("manifest.json")) else {
        return;
    };
    for entry in &manifest.stages {
        assert!(!entry.file.contains('/') && entry.file != "..");
    }
    let mut router = Router::from_state(manifest.router.clone());
    let _ = router.route_batch(4);
}
