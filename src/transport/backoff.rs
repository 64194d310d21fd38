//! How a receiver spends its first moments before it sleeps: shared by the
//! shared-memory and TCP transports.

use std::time::{Duration, Instant};

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
///
/// Why the yields also end after [`Backoff::YIELD_FOR`]: a yield that hands
/// the core to another runnable thread returns only when the scheduler
/// takes it back, a slice later, and a miner waiting for a boundary tensor
/// (milliseconds away) yielded 16 times to the other miner on its core,
/// two context switches and a cache refill each. With the time bound the
/// quickstart's 20 windows took 18k context switches instead of 28k; a
/// collective's message, microseconds away, still arrives within it.
///
/// Why a second, longer bound for a message that is due ([`Backoff::due`]):
/// a collective's next step comes within microseconds unless a rank of it
/// lacks a core, and a TCP receive that stays awake reads it from the
/// socket itself, where one that sleeps waits for the link's reader
/// thread to be woken and then wake it. Measured with `bench allreduce -n
/// 4 --transport tcp`, 2 cores (Intel Xeon VM), two runs each: 1 KiB
/// 56-58 us awake for 200 us, 51-70 for 1 ms, against 85-96 us for 50 us.
pub(crate) struct Backoff {
    round: u32,
    /// When the first yield of this wait began.
    since: Option<Instant>,
    yields: u32,
    yield_for: Duration,
}

impl Backoff {
    const YIELDS: u32 = 16;
    const YIELD_FOR: Duration = Duration::from_micros(50);
    const DUE_YIELDS: u32 = 1000;
    const DUE_FOR: Duration = Duration::from_micros(200);

    /// For a message that may be milliseconds away.
    pub(crate) fn new() -> Self {
        Self {
            round: 0,
            since: None,
            yields: Self::YIELDS,
            yield_for: Self::YIELD_FOR,
        }
    }

    /// For a message due within microseconds, such as a collective's next
    /// step: stays awake longer before it sleeps.
    pub(crate) fn due() -> Self {
        Self {
            yields: Self::DUE_YIELDS,
            yield_for: Self::DUE_FOR,
            ..Self::new()
        }
    }

    /// True once the yields are used up and the caller should sleep (on a
    /// futex, a condition variable) instead of calling [`Backoff::snooze`].
    pub(crate) fn should_sleep(&self) -> bool {
        self.round >= self.yields || self.since.is_some_and(|t| t.elapsed() >= self.yield_for)
    }

    pub(crate) fn snooze(&mut self) {
        self.since.get_or_insert_with(Instant::now);
        std::thread::yield_now();
        self.round += 1;
    }

    /// Back to yielding after progress.
    pub(crate) fn reset(&mut self) {
        self.round = 0;
        self.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_that_has_yielded_for_long_sleeps_with_yields_left() {
        let mut backoff = Backoff::new();
        backoff.snooze();
        backoff.since = Instant::now().checked_sub(backoff.yield_for);
        assert!(backoff.round < Backoff::YIELDS);
        assert!(backoff.should_sleep());
        backoff.reset();
        assert!(!backoff.should_sleep());
    }

    #[test]
    fn a_wait_sleeps_once_its_yields_are_used_up() {
        let mut backoff = Backoff::new();
        for _ in 0..Backoff::YIELDS {
            backoff.snooze();
        }
        assert!(backoff.should_sleep());
    }

    #[test]
    fn a_wait_for_a_due_message_stays_awake_past_a_brief_waits_yields() {
        let mut due = Backoff::due();
        for _ in 0..Backoff::YIELDS {
            due.snooze();
        }
        // Only the time bound could end it here, and it is set far ahead.
        due.since = Some(Instant::now());
        assert!(!due.should_sleep());
        due.since = Instant::now().checked_sub(Backoff::DUE_FOR);
        assert!(due.should_sleep());
    }
}
