//! The CPU a rank used, stated by the rank itself as it ends (as
//! `/usr/bin/time` states a command's): one line a benchmark can read back
//! from the launcher's output to say what each role cost in CPU, which the
//! wall times the ranks report cannot say on a host whose cores they share.

use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::time::TimeVal;

/// What precedes the figures in a rank's CPU line.
const MARK: &str = "s of CPU";

/// This process's CPU so far, in seconds: (user, system).
pub fn own_cpu() -> Option<(f64, f64)> {
    own_usage().map(|u| (u.user_s, u.system_s))
}

/// What a rank states of itself as it ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub user_s: f64,
    pub system_s: f64,
    /// Times it gave up its core to wait (a receive, a lock, a sleep).
    pub voluntary_switches: i64,
    /// Times the scheduler took its core away: many where ranks
    /// outnumber cores.
    pub involuntary_switches: i64,
}

/// This process's [`Usage`] so far.
pub fn own_usage() -> Option<Usage> {
    let usage = getrusage(UsageWho::RUSAGE_SELF).ok()?;
    let seconds = |t: TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 * 1e-6;
    Some(Usage {
        user_s: seconds(usage.user_time()),
        system_s: seconds(usage.system_time()),
        voluntary_switches: usage.voluntary_context_switches(),
        involuntary_switches: usage.involuntary_context_switches(),
    })
}

/// The line rank `rank` logs as it ends, having used `usage`.
pub fn cpu_line(rank: usize, usage: &Usage) -> String {
    let Usage {
        user_s,
        system_s,
        voluntary_switches,
        involuntary_switches,
    } = usage;
    format!(
        "rank {rank}: {:.3} {MARK} (user {user_s:.3} s, system {system_s:.3} s; \
         context switches {voluntary_switches} voluntary, {involuntary_switches} involuntary)",
        user_s + system_s
    )
}

/// The rank and CPU seconds a line of [`cpu_line`] states, wherever it
/// sits in a line of the launcher's output (after the rank's tag); `None`
/// for any other line.
pub fn cpu_of(line: &str) -> Option<(usize, f64)> {
    let (before, _) = line.split_once(MARK)?;
    let (head, figure) = before.trim_end().rsplit_once(": ")?;
    let (_, rank) = head.rsplit_once("rank ")?;
    Some((rank.parse().ok()?, figure.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_line_reads_back_as_its_total_from_the_launchers_output() {
        let usage = Usage {
            user_s: 1.25,
            system_s: 0.5,
            voluntary_switches: 120,
            involuntary_switches: 7,
        };
        let line = cpu_line(3, &usage);
        assert_eq!(
            line,
            "rank 3: 1.750 s of CPU (user 1.250 s, system 0.500 s; \
             context switches 120 voluntary, 7 involuntary)"
        );
        assert_eq!(cpu_of(&format!("[r3 miner s1] {line}")), Some((3, 1.75)));
        assert_eq!(cpu_of("[r3 miner s1] window 4 loss 2.5"), None);
        assert_eq!(cpu_of("rank 3: lots s of CPU"), None);
    }

    #[test]
    fn own_cpu_grows_as_this_process_works() {
        let (user, system) = own_cpu().expect("getrusage works on Linux");
        // Work, not a wait: its CPU is spent however long it takes.
        let mut x = 0u64;
        for _ in 0..100_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let (later_user, later_system) = own_cpu().expect("getrusage works on Linux");
        assert!(later_user + later_system > user + system);
    }
}
