//! Frame layout.
//!
//! A frame is an 18-byte header, the payload (encrypted), then the 16-byte
//! authentication tag of its cipher (`wire::stream`):
//!
//! | bytes | field   | meaning                                       |
//! |-------|---------|-----------------------------------------------|
//! | 0..4  | magic   | `b"SWRM"`                                     |
//! | 4     | version | [`VERSION`]                                   |
//! | 5     | kind    | [`FrameKind`]                                 |
//! | 6..14 | tag     | u64 LE, chosen by the layer above             |
//! | 14..18| length  | u32 LE, payload bytes                         |
//!
//! All integers are little-endian. The header is checked in full (magic,
//! version, kind, and length against the stream's limit) before a single
//! payload byte is allocated or read, so a hostile length cannot make a rank
//! reserve gigabytes.

use std::net::SocketAddr;

use super::WireError;

/// First bytes of every handshake message and frame.
pub const MAGIC: [u8; 4] = *b"SWRM";

/// Wire protocol version; bumped on any incompatible change of the frames
/// and on any change of the shape of what ranks say in them
/// (`roles::protocol`'s orders and reports, whose tests pin their shape
/// to this version), so that ranks of two builds that would misread each
/// other (a site joining with an older release) are refused at the
/// handshake, naming both versions, instead of failing honest miners'
/// audits later (2: lanes in the hello, stripe frames; 3: Noise
/// handshake, encrypted frames; 4: loopback links unsealed, the key
/// confirmation's tag saying so; 5: audit tasks say whether the validator
/// holds the stage's weights; 6: the router's state, which a standby
/// orchestrator takes over, carries each miner's rate variance).
pub const VERSION: u8 = 6;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 18;

/// Bytes in the authentication tag that follows each payload.
pub const MAC_LEN: usize = 16;

/// What a frame carries. Unknown values are a protocol error rather than
/// being skipped, so a peer running a newer protocol fails loudly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// A whole message, or the last piece of one split across frames.
    Data = 1,
    /// A piece of a message that continues in the next frame: lets messages
    /// larger than the frame limit travel without raising the limit.
    DataMore = 2,
    /// Out-of-band messages of the layer above (rendezvous, membership).
    Control = 3,
    /// An orderly goodbye: the sender will send nothing more, so the receiver
    /// can tell a clean exit from a crash.
    Close = 4,
    /// The last frame of one part of a message striped over several
    /// connections (lanes) to the same peer; the payload starts with
    /// [`StripeHead`].
    Stripe = 5,
    /// A frame of such a part that continues in the next frame.
    StripeMore = 6,
}

/// What starts the payload of every stripe frame: which message (a
/// per-sender counter), which part, of how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StripeHead {
    pub message: u64,
    pub part: u16,
    pub parts: u16,
}

impl StripeHead {
    pub const LEN: usize = 12;

    pub fn encode(&self) -> [u8; StripeHead::LEN] {
        let mut out = [0u8; StripeHead::LEN];
        out[..8].copy_from_slice(&self.message.to_le_bytes());
        out[8..10].copy_from_slice(&self.part.to_le_bytes());
        out[10..].copy_from_slice(&self.parts.to_le_bytes());
        out
    }

    /// The head and the rest of a stripe frame's payload; `None` when the
    /// payload is too short or names a part beyond its count.
    pub fn split(payload: &[u8]) -> Option<(StripeHead, &[u8])> {
        let (head, rest) = payload.split_at_checked(StripeHead::LEN)?;
        let head = StripeHead {
            message: u64::from_le_bytes(head[..8].try_into().ok()?),
            part: u16::from_le_bytes(head[8..10].try_into().ok()?),
            parts: u16::from_le_bytes(head[10..].try_into().ok()?),
        };
        (head.part < head.parts).then_some((head, rest))
    }
}

impl FrameKind {
    /// The kind numbered `value` on the wire, if any.
    pub fn from_u8(value: u8) -> Option<FrameKind> {
        match value {
            1 => Some(FrameKind::Data),
            2 => Some(FrameKind::DataMore),
            3 => Some(FrameKind::Control),
            4 => Some(FrameKind::Close),
            5 => Some(FrameKind::Stripe),
            6 => Some(FrameKind::StripeMore),
            _ => None,
        }
    }
}

/// One received frame, verified and decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub tag: u64,
    pub payload: Vec<u8>,
}

/// The fixed-size part of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub tag: u64,
    /// Payload length in bytes.
    pub len: u32,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = self.kind as u8;
        out[6..14].copy_from_slice(&self.tag.to_le_bytes());
        out[14..].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Parses and validates a header received from `peer`; `max_frame` is the
    /// largest payload this stream accepts.
    pub fn decode(
        bytes: [u8; HEADER_LEN],
        max_frame: usize,
        peer: SocketAddr,
    ) -> Result<FrameHeader, WireError> {
        let [m0, m1, m2, m3, version, kind, rest @ ..] = bytes;
        let [tag @ .., l0, l1, l2, l3] = rest;
        let magic = [m0, m1, m2, m3];
        if magic != MAGIC {
            return Err(WireError::BadMagic { peer, got: magic });
        }
        if version != VERSION {
            return Err(WireError::UnsupportedVersion {
                peer,
                got: version,
                ours: VERSION,
            });
        }
        let kind = FrameKind::from_u8(kind).ok_or(WireError::UnknownKind { peer, kind })?;
        let len = u32::from_le_bytes([l0, l1, l2, l3]);
        if u64::from(len) > max_frame as u64 {
            return Err(WireError::FrameTooLarge {
                peer,
                len: len.into(),
                max: max_frame,
            });
        }
        Ok(FrameHeader {
            kind,
            tag: u64::from_le_bytes(tag),
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    #[test]
    fn header_round_trips_every_kind() {
        for kind in [
            FrameKind::Data,
            FrameKind::DataMore,
            FrameKind::Control,
            FrameKind::Close,
        ] {
            let header = FrameHeader {
                kind,
                tag: 0x0102_0304_0506_0708,
                len: 4096,
            };
            assert_eq!(
                FrameHeader::decode(header.encode(), 4096, peer()).unwrap(),
                header
            );
        }
    }

    #[test]
    fn header_fields_are_little_endian_at_fixed_offsets() {
        let bytes = FrameHeader {
            kind: FrameKind::Close,
            tag: 1,
            len: 2,
        }
        .encode();
        assert_eq!(
            bytes,
            [b'S', b'W', b'R', b'M', VERSION, 4, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0]
        );
    }

    #[test]
    fn length_over_the_limit_is_rejected() {
        let bytes = FrameHeader {
            kind: FrameKind::Data,
            tag: 0,
            len: 1025,
        }
        .encode();
        assert!(matches!(
            FrameHeader::decode(bytes, 1024, peer()),
            Err(WireError::FrameTooLarge {
                len: 1025,
                max: 1024,
                ..
            })
        ));
    }

    #[test]
    fn bad_magic_version_and_kind_are_rejected() {
        let good = FrameHeader {
            kind: FrameKind::Data,
            tag: 0,
            len: 0,
        }
        .encode();
        let mut bad_magic = good;
        bad_magic[0] = b'X';
        assert!(matches!(
            FrameHeader::decode(bad_magic, 1, peer()),
            Err(WireError::BadMagic { .. })
        ));
        let mut bad_version = good;
        bad_version[4] = VERSION + 1;
        assert!(matches!(
            FrameHeader::decode(bad_version, 1, peer()),
            Err(WireError::UnsupportedVersion { got, .. }) if got == VERSION + 1
        ));
        let mut bad_kind = good;
        bad_kind[5] = 7;
        assert!(matches!(
            FrameHeader::decode(bad_kind, 1, peer()),
            Err(WireError::UnknownKind { kind: 7, .. })
        ));
    }
}
