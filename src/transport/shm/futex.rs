//! Sleeping on a word of shared memory until another process changes it.
//!
//! Why futexes and not spinning or sleeps: on the machines we target, four
//! ranks share two cores, so a rank that spins while waiting takes the core
//! from the very peer it waits for, and a fixed `sleep` adds its whole
//! granularity (tens of microseconds at best) to every wake-up. A futex wait
//! gives the core away and is woken within microseconds. Waiters still yield
//! a few times first (see [`crate::transport::backoff::Backoff`]), because a
//! message is often already on its way, and they always sleep with a
//! timeout so that a peer that died (and will never wake them) is noticed.
//!
//! The words are in a `MAP_SHARED` file mapping, so the futexes are the
//! process-shared kind (no `FUTEX_PRIVATE_FLAG`): the kernel keys them by
//! inode and offset, which works across processes and across several
//! mappings of the segment in one process.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Sleeps while `word` still holds `expected`, for at most `timeout`.
/// Returns early on a wake-up, a signal or a changed value; callers re-check
/// their condition in every case.
pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live, 4-aligned u32 (AtomicU32 has u32's layout)
    // that stays mapped for the duration of the call; `ts` outlives the call;
    // FUTEX_WAIT ignores the remaining arguments. The kernel only reads the
    // word. The result is deliberately ignored, see above.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every process sleeping in [`wait`] on `word`.
pub(crate) fn wake_all(word: &AtomicU32) {
    // SAFETY: as in `wait`; FUTEX_WAKE does not access the word's memory
    // beyond using its address as a key, and ignores the trailing arguments.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// A rank's doorbell: a counter anyone bumps when they have news for the
/// rank (data in one of its incoming rings, space in one of its outgoing
/// rings, a message to itself, a peer leaving), plus a count of sleepers so
/// that ringing costs no system call when nobody sleeps.
///
/// Lost wake-ups are excluded by SeqCst on both sides: a sleeper registers
/// (`waiters += 1`) *then* reads the counter, then checks its condition, then
/// sleeps only while the counter is unchanged; a ringer publishes its news,
/// bumps the counter, *then* reads `waiters`. In the single total order of
/// SeqCst operations either the ringer sees the registration (and wakes), or
/// the sleeper's read of the counter comes after the bump (and the kernel's
/// compare in FUTEX_WAIT fails, or the condition check already sees the news,
/// which the bump's ordering makes visible).
pub(crate) struct Doorbell<'a> {
    pub(crate) bell: &'a AtomicU32,
    pub(crate) waiters: &'a AtomicU32,
}

impl Doorbell<'_> {
    pub(crate) fn ring(&self) {
        self.bell.fetch_add(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) != 0 {
            wake_all(self.bell);
        }
    }

    /// Registers as a sleeper; check the condition after this and before
    /// [`Ticket::sleep`].
    pub(crate) fn prepare(&self) -> Ticket<'_> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        Ticket {
            seen: self.bell.load(Ordering::SeqCst),
            bell: self,
        }
    }
}

/// A registered sleeper; unregisters when dropped.
pub(crate) struct Ticket<'a> {
    seen: u32,
    bell: &'a Doorbell<'a>,
}

impl Ticket<'_> {
    pub(crate) fn sleep(self, timeout: Duration) {
        wait(self.bell.bell, self.seen, timeout);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        // A peer may have scribbled on the count; wrapping is harmless (it
        // only makes ringers wake needlessly or, until our timeout, not at
        // all).
        self.bell.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}
