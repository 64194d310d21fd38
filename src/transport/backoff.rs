//! How a receiver spends its first moments before it sleeps: shared by the
//! shared-memory and TCP transports.

/// How a waiter spends the first moments before sleeping: a few
/// `yield_now`s (a message is often microseconds away, and a yield lets the
/// process or thread that will deliver it run if it shares our core), then
/// sleeps.
///
/// Why no busy spinning first: with four ranks on two cores the peer we
/// wait for is often runnable but without a core, and every `pause` spent
/// spinning keeps it off ours. Measured with `bench allreduce -n 4 --transport
/// shm` on two cores, 16 rounds of exponential `pause` spinning before the
/// yields made a 1 KiB all-reduce take 21-25 us; yielding at once, 4-5 us.
/// Where cores are plenty a yield with nothing else to run returns at once,
/// so it costs no more than a spin check. Over TCP the message is filed by
/// the link's reader thread, which likewise may be waiting for our core:
/// yielding before sleeping made small all-reduces 10-20% faster.
pub(crate) struct Backoff {
    round: u32,
}

impl Backoff {
    const YIELDS: u32 = 16;

    pub(crate) fn new() -> Self {
        Self { round: 0 }
    }

    /// True once the yields are used up and the caller should sleep (on a
    /// futex, a condition variable) instead of calling [`Backoff::snooze`].
    pub(crate) fn should_sleep(&self) -> bool {
        self.round >= Self::YIELDS
    }

    pub(crate) fn snooze(&mut self) {
        std::thread::yield_now();
        self.round += 1;
    }

    /// Back to yielding after progress.
    pub(crate) fn reset(&mut self) {
        self.round = 0;
    }
}
