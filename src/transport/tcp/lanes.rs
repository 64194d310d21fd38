//! Large messages striped over several connections to one peer.
//!
//! One TCP stream rarely fills a long, fast path: its window, not the
//! link, limits it (Prime Intellect measured one stream across western
//! Europe at about 3.7 Gbit/s, 64 at about 45). With
//! [`TcpOptions::lanes`](super::TcpOptions::lanes) above 1, the higher rank
//! of each pair also dials that many extra connections (lanes), and a
//! message of [`STRIPE_MIN`] bytes or more goes as one part per lane, sent
//! at once. Part 0 travels on the main connection, in the order of every
//! other message there, and its reader waits for the other parts before it
//! hands the whole message on, so order per (peer, tag) holds as without
//! lanes. Every part is authenticated like any frame; a lane that fails
//! takes the peer down with it, as the main connection does.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;

use super::state::{lock, Loss, Peer, Shared};
use crate::wire::{AuthStream, FrameKind, FrameReader, FrameWriter, StripeHead, WireError};

/// Messages smaller than this go whole on the main connection: striping
/// pays only when a stream's window, not its round trip, is the limit.
pub(super) const STRIPE_MIN: usize = 1 << 20;

/// Striped messages of one peer whose parts may wait for part 0 at once;
/// a peer that sends more has broken the protocol.
const MAX_PENDING: usize = 64;

/// Parts of striped messages that arrived on the extra lanes, by (sender,
/// message), waiting for part 0's reader.
#[derive(Default)]
pub(super) struct Stripes {
    parts: HashMap<(usize, u64), Vec<Option<Vec<u8>>>>,
}

impl Shared {
    /// Makes `stream` lane `lane` (1..) to `src` and starts its reader.
    pub(super) fn install_lane(
        self: &Arc<Self>,
        src: usize,
        lane: u16,
        stream: AuthStream,
    ) -> Result<(), String> {
        let addr = stream.peer_addr();
        let peer = self.peer_or_newcomer(src).map_err(|e| e.to_string())?;
        let Some(slot) = peer.lanes.get(usize::from(lane) - 1) else {
            return Err(format!(
                "{addr}: lane {lane} of rank {src}, but we run {} lanes",
                self.opts.lanes
            ));
        };
        let socket = stream.try_clone_socket().map_err(|e| e.to_string())?;
        socket
            .set_write_timeout(Some(self.opts.default_timeout))
            .map_err(|e| format!("{addr}: cannot set the send timeout: {e}"))?;
        let (reader, writer) = stream.into_split();
        {
            let mut slot = lock(slot);
            if slot.is_some() {
                return Err(format!(
                    "{addr}: lane {lane} of rank {src} is already connected"
                ));
            }
            *slot = Some(writer);
        }
        lock(&peer.lane_sockets).push(socket);
        let shared = Arc::clone(self);
        let reader = thread::Builder::new()
            .name(format!("swarmrun-lane-{src}-{lane}"))
            .spawn(move || shared.lane_loop(src, reader))
            .map_err(|e| format!("{addr}: cannot start its lane reader: {e}"))?;
        self.add_reader(reader);
        Ok(())
    }

    /// Reads one extra lane until it closes: parts of striped messages,
    /// filed for part 0's reader. Its `Close` ends it quietly; anything
    /// else ends the peer.
    fn lane_loop(&self, src: usize, mut reader: FrameReader) {
        let addr = reader.peer_addr();
        let mut building: HashMap<(u64, u16), Vec<u8>> = HashMap::new();
        let failure = loop {
            let frame = match reader.recv() {
                Ok(frame) => frame,
                Err(e) => break e.to_string(),
            };
            match frame.kind {
                FrameKind::Stripe | FrameKind::StripeMore => {
                    let Some((head, data)) = StripeHead::split(&frame.payload) else {
                        break format!("{addr}: a malformed stripe frame on a lane");
                    };
                    let key = (head.message, head.part);
                    if !building.contains_key(&key) && building.len() >= MAX_PENDING {
                        break format!(
                            "{addr}: more than {MAX_PENDING} stripes in flight on a lane"
                        );
                    }
                    let part = building.entry(key).or_default();
                    if part.len().saturating_add(data.len()) > self.opts.max_message {
                        break format!(
                            "{addr}: a stripe of more than {} bytes (network.max_message)",
                            self.opts.max_message
                        );
                    }
                    part.extend_from_slice(data);
                    if frame.kind == FrameKind::Stripe {
                        let part = building.remove(&key).unwrap_or_default();
                        if let Err(reason) = self.file_part(src, head, part) {
                            break format!("{addr}: {reason}");
                        }
                    }
                }
                FrameKind::Close => return,
                other => {
                    break format!(
                        "{addr}: a {other:?} frame on a lane, which carries stripes only"
                    )
                }
            }
        };
        if !self.stopping() {
            self.mark_lost(src, Loss::Failure(failure));
        }
    }

    /// Files part `head.part` (not 0) of a striped message from `src`.
    fn file_part(&self, src: usize, head: StripeHead, data: Vec<u8>) -> Result<(), String> {
        if head.part == 0 || usize::from(head.parts) > self.opts.lanes {
            return Err(format!(
                "part {} of {} of a striped message on a lane ({} lanes)",
                head.part, head.parts, self.opts.lanes
            ));
        }
        let mut stripes = lock(&self.stripes);
        let pending = stripes.parts.keys().filter(|(s, _)| *s == src).count();
        let parts = match stripes.parts.get_mut(&(src, head.message)) {
            Some(parts) => parts,
            None if pending >= MAX_PENDING => {
                return Err(format!(
                    "more than {MAX_PENDING} striped messages in flight"
                ))
            }
            None => stripes
                .parts
                .entry((src, head.message))
                .or_insert_with(|| vec![None; usize::from(head.parts)]),
        };
        match parts.get_mut(usize::from(head.part)) {
            Some(slot @ None) => *slot = Some(data),
            _ => {
                return Err(format!(
                    "part {} of message {} twice, or out of range",
                    head.part, head.message
                ))
            }
        }
        self.stripe_filed.notify_all();
        Ok(())
    }

    /// Part 0's reader: the whole message once the other parts are in, or
    /// why the peer is gone.
    pub(super) fn join_parts(
        &self,
        src: usize,
        head: StripeHead,
        part0: Vec<u8>,
    ) -> Result<Vec<u8>, Loss> {
        let mut stripes = lock(&self.stripes);
        loop {
            let complete = stripes.parts.get(&(src, head.message)).is_some_and(|p| {
                p.len() == usize::from(head.parts) && p[1..].iter().all(Option::is_some)
            });
            if complete || head.parts == 1 {
                let rest = stripes
                    .parts
                    .remove(&(src, head.message))
                    .unwrap_or_default();
                let mut message = part0;
                for part in rest.into_iter().skip(1).flatten() {
                    message.extend_from_slice(&part);
                }
                return Ok(message);
            }
            if let Some(reason) = self.lost_reason(src) {
                return Err(Loss::Failure(reason));
            }
            if self.stopping() {
                return Err(Loss::Goodbye("this transport was shut down".into()));
            }
            stripes = self
                .stripe_filed
                .wait_timeout(stripes, std::time::Duration::from_millis(100))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// A number no striped message from this rank had before.
    fn next_message(&self) -> u64 {
        self.next_message.fetch_add(1, Ordering::Relaxed)
    }
}

/// Sends `payload` striped over `main` (part 0) and every connected extra
/// lane of `peer`, all at once; `false` when the peer has no extra lane up
/// (the caller sends it whole).
pub(super) fn send_striped(
    shared: &Shared,
    peer: &Peer,
    main: &mut FrameWriter,
    tag: u64,
    payload: &[u8],
) -> Result<bool, WireError> {
    let mut lanes: Vec<std::sync::MutexGuard<'_, Option<FrameWriter>>> = peer
        .lanes
        .iter()
        .map(lock)
        .filter(|w| w.is_some())
        .collect();
    if lanes.is_empty() || payload.len() < STRIPE_MIN {
        return Ok(false);
    }
    let parts = lanes.len() + 1;
    let message = shared.next_message();
    let max_frame = shared.send_frame();
    let range = |k: usize| payload.len() * k / parts..payload.len() * (k + 1) / parts;
    // The guards stay here; the senders borrow the writers they hold.
    let writers: Vec<&mut FrameWriter> = lanes.iter_mut().filter_map(|w| w.as_mut()).collect();
    thread::scope(|s| {
        let senders: Vec<_> = writers
            .into_iter()
            .enumerate()
            .map(|(i, writer)| {
                let data = &payload[range(i + 1)];
                s.spawn(move || send_part(writer, message, i + 1, parts, tag, data, max_frame))
            })
            .collect();
        let first = send_part(main, message, 0, parts, tag, &payload[range(0)], max_frame);
        for sender in senders {
            sender
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        }
        first
    })?;
    Ok(true)
}

/// One part as stripe frames of at most `max_frame` bytes, head first.
fn send_part(
    writer: &mut FrameWriter,
    message: u64,
    part: usize,
    parts: usize,
    tag: u64,
    data: &[u8],
    max_frame: usize,
) -> Result<(), WireError> {
    let head = StripeHead {
        message,
        part: part as u16,
        parts: parts as u16,
    }
    .encode();
    let room = max_frame.saturating_sub(StripeHead::LEN).max(1);
    let mut chunks = data.chunks(room).peekable();
    loop {
        let chunk = chunks.next().unwrap_or(&[]);
        let last = chunks.peek().is_none();
        let kind = if last {
            FrameKind::Stripe
        } else {
            FrameKind::StripeMore
        };
        writer.send_gather(kind, tag, &[&head, chunk])?;
        if last {
            return Ok(());
        }
    }
}
