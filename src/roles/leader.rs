//! The rank a miner or validator takes orders from and reports to: the
//! orchestrator, and once it is lost, the standby that takes over
//! (`[roles] standby = 1`).
//!
//! The switch is made by whichever thread first finds the orchestrator
//! gone (the main loop waiting for an order, the answering thread waiting
//! for a ping), and made once: a rank never goes back, and the standby's
//! own loss ends the rank as the orchestrator's did before.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::protocol::{self, Order, Report};
use super::train::TrainError;
use crate::config::JobSpec;
use crate::transport::{Transport, TransportError};

/// Rank 0, the orchestrator the plan names.
const ORCHESTRATOR: usize = 0;

/// How often a rank waiting on a peer looks for new orders.
const WAIT_POLL: Duration = Duration::from_millis(2);

/// A rank's link to whoever leads the job.
pub(super) struct Leader<'a, T: ?Sized> {
    t: &'a T,
    current: AtomicUsize,
    standby: Option<usize>,
    /// Orders taken during a wait and put off until the work in hand is
    /// done; [`Leader::order`] gives them first, in the order they came.
    put_off: Mutex<VecDeque<Order>>,
}

/// What a wait on a peer ended with.
pub(super) enum Waited {
    Got(Vec<u8>),
    /// The leader gave an order first: it has moved on (a peer was lost
    /// or evicted, a new attempt began, a standby took over), and waiting
    /// longer would only hold this rank back.
    Order(Order),
    /// The peer is gone.
    Lost,
    /// The peer is there but sent nothing until the deadline.
    TimedOut,
}

impl<'a, T: Transport + ?Sized> Leader<'a, T> {
    pub fn new(t: &'a T, spec: &JobSpec) -> Leader<'a, T> {
        Leader {
            t,
            current: AtomicUsize::new(ORCHESTRATOR),
            standby: spec.standby_rank(),
            put_off: Mutex::new(VecDeque::new()),
        }
    }

    pub fn transport(&self) -> &'a T {
        self.t
    }

    /// The rank that leads now.
    pub fn rank(&self) -> usize {
        self.current.load(Ordering::SeqCst)
    }

    /// `rank` is gone: whether a standby leads now.
    pub fn lost(&self, rank: usize) -> bool {
        match self.standby {
            Some(standby) if rank == ORCHESTRATOR => {
                self.current.store(standby, Ordering::SeqCst);
                true
            }
            _ => false,
        }
    }

    /// The leader's next order if one comes by `until`. The next order
    /// can be a whole window away (a validator waits from one audit to
    /// the next) and a window can outlast the transport's timeout on a
    /// loaded host, so only the loss of every leader is an error.
    pub fn order_by(&self, until: Instant) -> Result<Option<Order>, TrainError> {
        loop {
            let leader = self.rank();
            match self.t.recv_deadline(leader, protocol::ORDER_TAG, until) {
                Ok(bytes) => return Ok(Some(protocol::decode_order(&bytes, leader)?)),
                Err(TransportError::Timeout { .. }) => return Ok(None),
                Err(TransportError::PeerLost { rank, .. }) if self.lost(rank) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Keeps `order`, taken by a wait (see [`Leader::wait_or_order`]), for
    /// the next [`Leader::order`].
    pub fn put_off(&self, order: Order) {
        self.put_off_orders().push_back(order);
    }

    /// Forgets the orders put off that `moot` says the leader has moved
    /// past.
    pub fn forget_put_off(&self, moot: impl Fn(&Order) -> bool) {
        self.put_off_orders().retain(|order| !moot(order));
    }

    fn put_off_orders(&self) -> std::sync::MutexGuard<'_, VecDeque<Order>> {
        self.put_off.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The leader's next order, however long it takes: first those put
    /// off.
    pub fn order(&self) -> Result<Order, TrainError> {
        if let Some(order) = self.put_off_orders().pop_front() {
            return Ok(order);
        }
        loop {
            let until = Instant::now() + self.t.default_timeout();
            if let Some(order) = self.order_by(until)? {
                return Ok(order);
            }
        }
    }

    /// Reports to the leader; to the standby when the orchestrator is
    /// found gone meanwhile (it ignores what does not fit its window).
    pub fn report(&self, r: &Report) -> Result<(), TrainError> {
        let bytes = protocol::encode(r);
        loop {
            match self.t.send(self.rank(), protocol::REPORT_TAG, &bytes) {
                Err(TransportError::PeerLost { rank, .. }) if self.lost(rank) => {}
                other => return Ok(other?),
            }
        }
    }

    /// The next message from `from` on `tag`, unless an order comes first,
    /// `from` is gone or `deadline` passes. `between` runs before each look
    /// (a miner says there that it was asked to leave).
    pub fn wait_or_order(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
        mut between: impl FnMut() -> Result<(), TrainError>,
    ) -> Result<Waited, TrainError> {
        loop {
            between()?;
            if let Some(order) = self.order_by(Instant::now())? {
                return Ok(Waited::Order(order));
            }
            let until = (Instant::now() + WAIT_POLL).min(deadline);
            match self.t.recv_deadline(from, tag, until) {
                Ok(bytes) => return Ok(Waited::Got(bytes)),
                Err(TransportError::Timeout { .. }) if Instant::now() < deadline => {}
                Err(TransportError::Timeout { .. }) => return Ok(Waited::TimedOut),
                Err(TransportError::PeerLost { .. }) => return Ok(Waited::Lost),
                Err(e) => return Err(e.into()),
            }
        }
    }
}
