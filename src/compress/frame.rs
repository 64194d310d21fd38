//! The wire frame of a quantized boundary tensor: a fixed header, then the
//! f16 scales, then the codes, the two sections optionally compressed
//! together with zstd. Frames come from other machines, so `decode` trusts
//! nothing in them: every length is checked against the shape before a
//! byte is allocated for it.
//!
//! Header, 28 bytes, integers little-endian:
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 4 | magic `SWQF` |
//! | 4 | 1 | version (1) |
//! | 5 | 1 | codec: 1 int8, 2 int4 |
//! | 6 | 1 | flags: bit 0 zstd; other bits 0 |
//! | 7 | 1 | reserved, 0 |
//! | 8 | 4 | rows |
//! | 12 | 4 | width |
//! | 16 | 4 | scale section bytes, uncompressed (2 x rows) |
//! | 20 | 4 | code section bytes, uncompressed (rows x row bytes) |
//! | 24 | 4 | payload bytes on the wire, after the header |
//!
//! Then the payload: scales (f16, little-endian) followed by codes in
//! `quant`'s layout, or the zstd frame of those bytes.

use std::io::Write;

use half::f16;
use thiserror::Error;

use super::quant::{Bits, QuantError, Quantized};

pub const MAGIC: [u8; 4] = *b"SWQF";
pub const VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 28;

const FLAG_ZSTD: u8 = 1;

/// zstd's fastest level: frames are on the critical path of every
/// microbatch, and quantized codes gain little from harder work.
const ZSTD_LEVEL: i32 = 1;

/// Why bytes are not a frame, or a frame cannot be written.
#[derive(Debug, Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is shorter than its {HEADER_BYTES}-byte header")]
    Truncated { len: usize },
    #[error("bad magic {found:02x?}: not a swarmrun quantized frame")]
    BadMagic { found: [u8; 4] },
    #[error("frame version {found}, this build reads version {VERSION}")]
    BadVersion { found: u8 },
    #[error("unknown codec {found} (1 is int8, 2 is int4)")]
    BadCodec { found: u8 },
    #[error("unknown flags {found:#04x} (only bit 0, zstd, is defined) or reserved byte {reserved} not 0")]
    BadFlags { found: u8, reserved: u8 },
    #[error("frame is {len} bytes, its header says {expected} ({HEADER_BYTES} header + payload)")]
    WrongLength { len: usize, expected: usize },
    #[error("scale section of {got} bytes, {expected} expected for {rows} rows (2 bytes per row)")]
    ScaleSection {
        rows: u32,
        expected: usize,
        got: usize,
    },
    #[error("code section of {got} bytes, {expected} expected for {rows} rows of width {width}")]
    CodeSection {
        rows: u32,
        width: u32,
        expected: usize,
        got: usize,
    },
    #[error("uncompressed payload of {got} bytes, {expected} expected (scales + codes)")]
    PayloadLength { expected: usize, got: usize },
    #[error("{rows} x {width} = {elements} elements is more than the receiver accepts ({max})")]
    Oversized {
        rows: u32,
        width: u32,
        elements: u64,
        max: usize,
    },
    #[error(
        "a {rows} x {width} matrix does not fit a frame (32-bit rows, width and section lengths)"
    )]
    TooLarge { rows: usize, width: usize },
    #[error("zstd: {0}")]
    Zstd(std::io::Error),
    #[error("frame content: {0}")]
    Content(#[from] QuantError),
}

fn codec_byte(bits: Bits) -> u8 {
    match bits {
        Bits::Int8 => 1,
        Bits::Int4 => 2,
    }
}

fn bits_of(byte: u8) -> Result<Bits, FrameError> {
    match byte {
        1 => Ok(Bits::Int8),
        2 => Ok(Bits::Int4),
        found => Err(FrameError::BadCodec { found }),
    }
}

/// Writes `q` as a frame. With `zstd`, the payload is compressed, unless
/// that would make it larger (then the flag stays clear): the flag says
/// what the bytes are, not what was asked.
pub fn encode(q: &Quantized, zstd: bool) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_into(q, zstd, &mut out)?;
    Ok(out)
}

/// `encode` into `out`, replacing its contents and reusing its capacity
/// (a sender writes every microbatch's frame into the same buffer).
pub fn encode_into(q: &Quantized, zstd: bool, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let too_large = || FrameError::TooLarge {
        rows: q.rows(),
        width: q.width(),
    };
    let u32_of = |n: usize| u32::try_from(n).map_err(|_| too_large());
    let scale_bytes = 2 * q.scales().len();
    let raw_len = scale_bytes + q.codes().len();
    out.clear();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[VERSION, codec_byte(q.bits()), 0, 0]);
    for n in [q.rows(), q.width(), scale_bytes, q.codes().len()] {
        out.extend_from_slice(&u32_of(n)?.to_le_bytes());
    }
    out.extend_from_slice(&[0; 4]); // payload length, known below
    if zstd {
        let mut enc =
            zstd::stream::Encoder::new(&mut *out, ZSTD_LEVEL).map_err(FrameError::Zstd)?;
        for s in q.scales() {
            enc.write_all(&s.to_le_bytes()).map_err(FrameError::Zstd)?;
        }
        enc.write_all(q.codes()).map_err(FrameError::Zstd)?;
        enc.finish().map_err(FrameError::Zstd)?;
        if out.len() - HEADER_BYTES < raw_len {
            out[6] = FLAG_ZSTD;
        } else {
            out.truncate(HEADER_BYTES);
        }
    }
    if out.len() == HEADER_BYTES {
        out.reserve(raw_len);
        out.extend(q.scales().iter().flat_map(|s| s.to_le_bytes()));
        out.extend_from_slice(q.codes());
    }
    let payload = u32_of(out.len() - HEADER_BYTES)?;
    out[24..HEADER_BYTES].copy_from_slice(&payload.to_le_bytes());
    Ok(())
}

/// The header's fields, as read, before any is believed.
struct Header {
    bits: Bits,
    zstd: bool,
    rows: u32,
    width: u32,
    scale_bytes: usize,
    code_bytes: usize,
    payload_bytes: usize,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn read_header(frame: &[u8]) -> Result<Header, FrameError> {
    let h = frame
        .get(..HEADER_BYTES)
        .ok_or(FrameError::Truncated { len: frame.len() })?;
    let found = [h[0], h[1], h[2], h[3]];
    if found != MAGIC {
        return Err(FrameError::BadMagic { found });
    }
    if h[4] != VERSION {
        return Err(FrameError::BadVersion { found: h[4] });
    }
    let bits = bits_of(h[5])?;
    if h[6] & !FLAG_ZSTD != 0 || h[7] != 0 {
        return Err(FrameError::BadFlags {
            found: h[6],
            reserved: h[7],
        });
    }
    Ok(Header {
        bits,
        zstd: h[6] & FLAG_ZSTD != 0,
        rows: u32_at(h, 8),
        width: u32_at(h, 12),
        scale_bytes: u32_at(h, 16) as usize,
        code_bytes: u32_at(h, 20) as usize,
        payload_bytes: u32_at(h, 24) as usize,
    })
}

/// Reads a frame of at most `max_elements` values (the receiver knows the
/// boundary's shape; a forged header must not make it allocate more).
/// The frame must be exactly its header's length, its sections exactly
/// what its rows and width need, and its scales finite and non-negative.
pub fn decode(frame: &[u8], max_elements: usize) -> Result<Quantized, FrameError> {
    let h = read_header(frame)?;
    let elements = h.rows as u64 * h.width as u64;
    if elements > max_elements as u64 {
        return Err(FrameError::Oversized {
            rows: h.rows,
            width: h.width,
            elements,
            max: max_elements,
        });
    }
    let expected = HEADER_BYTES + h.payload_bytes;
    if frame.len() != expected {
        return Err(FrameError::WrongLength {
            len: frame.len(),
            expected,
        });
    }
    // Within `max_elements`, so these products fit a usize.
    let rows = h.rows as usize;
    let width = h.width as usize;
    if h.scale_bytes != 2 * rows {
        return Err(FrameError::ScaleSection {
            rows: h.rows,
            expected: 2 * rows,
            got: h.scale_bytes,
        });
    }
    let code_bytes = rows * h.bits.row_bytes(width);
    if h.code_bytes != code_bytes {
        return Err(FrameError::CodeSection {
            rows: h.rows,
            width: h.width,
            expected: code_bytes,
            got: h.code_bytes,
        });
    }
    let raw_len = h.scale_bytes + code_bytes;
    let payload = &frame[HEADER_BYTES..];
    let unpacked;
    let raw = if h.zstd {
        // The capacity caps the output: a payload that inflates past the
        // shape's size is an error, not an allocation.
        unpacked = zstd::bulk::decompress(payload, raw_len).map_err(FrameError::Zstd)?;
        &unpacked[..]
    } else {
        payload
    };
    if raw.len() != raw_len {
        return Err(FrameError::PayloadLength {
            expected: raw_len,
            got: raw.len(),
        });
    }
    let (scale_bytes, codes) = raw.split_at(h.scale_bytes);
    let scales = scale_bytes
        .chunks_exact(2)
        .map(|b| f16::from_le_bytes([b[0], b[1]]))
        .collect();
    Ok(Quantized::from_parts(
        h.bits,
        rows,
        width,
        scales,
        codes.to_vec(),
    )?)
}

/// How many times smaller the frame is than the tensor it carries in f32
/// (the compute dtype): `rows * width * 4 / frame_bytes`, header and scales
/// included in `frame_bytes`.
pub fn compression_ratio(rows: usize, width: usize, frame_bytes: usize) -> f64 {
    (rows * width * 4) as f64 / frame_bytes as f64
}
