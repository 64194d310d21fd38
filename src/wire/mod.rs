//! Framed, encrypted and authenticated byte streams between the ranks of
//! one job.
//!
//! Used by the TCP transport and the TCP rendezvous alike, so that every
//! byte a rank accepts from the network comes from a holder of the job key
//! and is checked before it is trusted:
//!
//! - [`JobKey`]: the job's shared secret, generated, stored and found
//!   (`SWARMRUN_JOB_KEY` over a key file).
//! - [`FrameHeader`], [`FrameKind`], [`Frame`]: the frame format.
//! - [`AuthStream`]: a Noise handshake keyed by the job key on a
//!   `TcpStream`, then AES-GCM frames numbered per direction; splits into a
//!   [`FrameReader`] and a [`FrameWriter`] for use from different threads.
//! - [`WireError`]: every failure, naming the peer address and the reason.
//! - [`listener::Listener`]: a blocking accept that another thread can stop.

pub mod assembly;
mod error;
pub mod frame;
mod key;
pub mod listener;
mod stream;

pub use assembly::{Assembled, Assembly};
pub use error::WireError;
pub use frame::{Frame, FrameHeader, FrameKind, StripeHead, HEADER_LEN, MAC_LEN, VERSION};
pub use key::{JobKey, KEY_ENV, KEY_LEN};
pub use stream::{
    job_id, AuthStream, FrameReader, FrameWriter, Hello, Queued, Session, StreamOptions, SEND_FRAME,
};

use std::time::{Duration, Instant};

/// Longest timeout honoured as given; longer ones (such as `Duration::MAX`,
/// meaning "practically never") are cut to this so `Instant` cannot overflow.
const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// The instant `timeout` from now, without the overflow panic of `+`.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    Instant::now() + timeout.min(MAX_TIMEOUT)
}
