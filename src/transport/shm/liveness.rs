//! Is the process behind a slot still alive?
//!
//! A rank writes its pid and its start time (field 22 of `/proc/PID/stat`,
//! clock ticks since boot) into its slot when it joins. A peer counts as dead
//! when its pid is gone, when it is a zombie (killed but not yet reaped by its
//! parent: `kill(pid, 0)` still succeeds on those, and a launcher busy with
//! other children may not reap at once), or when the pid now belongs to a
//! process with another start time (reused after the rank died). This works
//! only for ranks in one pid namespace, which ranks sharing `/dev/shm` on one
//! host normally are.

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

/// Who this process is, as written into its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcessId {
    pub(crate) pid: u32,
    /// 0 when `/proc` could not tell; then only the pid is checked.
    pub(crate) start_time: u64,
}

impl ProcessId {
    pub(crate) fn current() -> Self {
        let pid = std::process::id();
        let start_time = proc_stat(pid).map_or(0, |stat| stat.start_time);
        Self { pid, start_time }
    }

    /// `Err(reason)` when the process is known to be gone. The values come
    /// from shared memory, so a pid that cannot name one process (0 would
    /// mean our process group, anything above `i32::MAX` a negative pid, i.e.
    /// a whole group) counts as gone rather than being passed to `kill`.
    pub(crate) fn check_alive(&self) -> Result<(), String> {
        let pid = match i32::try_from(self.pid) {
            Ok(pid) if pid > 0 => pid,
            _ => return Err(format!("its slot holds no valid pid ({})", self.pid)),
        };
        if kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH) {
            return Err(format!("process {pid} is gone"));
        }
        match proc_stat(self.pid) {
            Ok(stat) if matches!(stat.state, 'Z' | 'X') => Err(format!("process {pid} has exited")),
            Ok(stat) if self.start_time != 0 && stat.start_time != self.start_time => {
                Err(format!("process {pid} has exited and its pid was reused"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(format!("process {pid} is gone"))
            }
            // Alive, or /proc cannot tell and `kill` said it exists.
            _ => Ok(()),
        }
    }
}

struct ProcStat {
    state: char,
    start_time: u64,
}

fn proc_stat(pid: u32) -> std::io::Result<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("cannot parse /proc/{pid}/stat"),
        )
    })
}

/// Fields after the command name, which is in parentheses and may itself
/// contain spaces and parentheses, hence the search for the last `)`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `state` is field 3; `starttime` is field 22.
    let start_time = fields.nth(22 - 4)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_stat_reads_state_and_start_time_past_a_command_with_parens() {
        let line = "42 (a) b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200";
        let stat = parse_stat(line).expect("parses");
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.start_time, 987654);
    }

    #[test]
    fn this_process_is_alive_and_pid_zero_is_not_trusted() {
        assert_eq!(ProcessId::current().check_alive(), Ok(()));
        let zero = ProcessId {
            pid: 0,
            start_time: 0,
        };
        assert!(zero.check_alive().is_err());
        let negative = ProcessId {
            pid: u32::MAX,
            start_time: 0,
        };
        assert!(negative.check_alive().is_err());
    }

    #[test]
    fn a_reused_pid_with_another_start_time_counts_as_dead() {
        let me = ProcessId::current();
        assert_ne!(me.start_time, 0, "/proc gives a start time here");
        let impostor = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(impostor.check_alive().is_err());
    }
}
