//! How many files a rank may hold open. Over TCP a rank holds four
//! descriptors per peer (the link's reader and writer, the handle it is
//! shut down by, the epoll set its reader thread waits on), so under the
//! soft limit most Linux hosts give a login shell, 1024, a job of some 250
//! ranks failed in its handshakes with `EMFILE`, and an orchestrator could
//! not hold a swarm of more miners than that. Every `swarmrun` process
//! raises its soft limit towards the hard one as it starts, as the Go
//! runtime does for every program; the hard limit is the administrator's,
//! and stays as it is.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// How far the soft limit is raised at most: links to some 16k peers.
/// Not to the hard limit whatever it is (often 524288 under systemd): the
/// children a rank starts inherit it (`mpirun` and the Python of the
/// benchmarks), and programs that close every descriptor up to the limit
/// before they exec a child would pay for each.
pub const OPEN_FILES_WANTED: u64 = 1 << 16;

/// Raises this process's soft limit on open files to its hard limit or
/// [`OPEN_FILES_WANTED`], whichever is lower, where it is below that (a
/// higher one, the user's choice, stays); returns the limit now in force.
pub fn raise_open_files() -> nix::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let wanted = hard.min(OPEN_FILES_WANTED);
    if soft >= wanted {
        return Ok(soft);
    }
    setrlimit(Resource::RLIMIT_NOFILE, wanted, hard)?;
    Ok(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_on_open_files_ends_at_the_hard_limit_or_the_cap_and_never_falls() {
        let (before, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let want = hard.min(OPEN_FILES_WANTED).max(before);
        assert_eq!(raise_open_files().unwrap(), want);
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (want, hard));
    }
}
