//! The standby orchestrator (`[roles] standby = 1`): keeps the state the
//! orchestrator hands it after every window and, once the orchestrator is
//! lost, leads the job from there (see [`super::orchestrate`] with
//! [`Leading::TakeOver`]). No miner restarts: each goes back to the start
//! of the window that was running, which runs again.
//!
//! It acknowledges each handover, and the orchestrator waits for that
//! before its next order, so whatever a miner was told to do, the standby
//! knows the window it belongs to. The standby takes over when its
//! connection to the orchestrator breaks; should only that link break
//! while the orchestrator still leads, the miners keep following the
//! orchestrator (they switch only when they lose it themselves) and the
//! standby, answered by no one, ends with an error while the job goes on.

use super::orchestrator::machine::Boundary;
use super::protocol::{self, Handover};
use super::train::TrainError;
use crate::transport::{Transport, TransportError};

/// The orchestrator the plan names.
const ORCHESTRATOR: usize = 0;

/// How a rank comes to lead the job.
#[derive(Debug)]
pub enum Leading {
    /// From the start: rank 0.
    Orchestrator,
    /// As the standby, the orchestrator being lost: from the state it last
    /// handed over (none: from the job's start).
    TakeOver(Option<Box<Boundary>>),
}

impl Leading {
    /// The last window closed before this leader's first, if any: the
    /// ledger and the metrics are cut after it. `resumed` is the window
    /// of the checkpoint the job started from.
    pub fn closed_before(&self, resumed: Option<u64>) -> Option<u64> {
        match self {
            Leading::TakeOver(Some(b)) => b.window.checked_sub(1).max(resumed),
            _ => resumed,
        }
    }
}

/// Keeps what the orchestrator hands over until it finishes the job
/// (`None`) or is lost (how to take over).
pub fn stand_by<T: Transport + ?Sized>(t: &T) -> Result<Option<Leading>, TrainError> {
    let mut last = None;
    loop {
        match t.recv(ORCHESTRATOR, protocol::STANDBY_TAG) {
            Ok(bytes) => match protocol::decode_handover(&bytes, ORCHESTRATOR)? {
                Handover::Boundary(b) => {
                    last = Some(b);
                    match t.send(ORCHESTRATOR, protocol::STANDBY_TAG, &[]) {
                        Ok(()) | Err(TransportError::PeerLost { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Handover::Finished => return Ok(None),
            },
            // A window can outlast the transport's timeout.
            Err(TransportError::Timeout { .. }) => {}
            Err(TransportError::PeerLost { .. }) => return Ok(Some(Leading::TakeOver(last))),
            Err(e) => return Err(e.into()),
        }
    }
}
