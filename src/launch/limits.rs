//! How many files a rank may hold open. Over TCP a rank holds four
//! descriptors per peer (the link's reader and writer, the handle it is
//! shut down by, the epoll set its reader thread waits on), so under the
//! soft limit most Linux hosts give a login shell, 1024, a job of some 250
//! ranks failed in its handshakes with `EMFILE`, and an orchestrator could
//! not hold a swarm of more miners than that. Every `swarmrun` process
//! raises its soft limit to the hard one as it starts, as the Go runtime
//! does for every program; the hard limit is the administrator's, and
//! stays as it is.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Raises this process's soft limit on open files to its hard limit (and
/// so its children's, which inherit it); returns the limit now in force.
pub fn raise_open_files() -> nix::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= hard {
        return Ok(soft);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_on_open_files_ends_at_the_hard_limit() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(raise_open_files().unwrap(), hard);
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
    }
}
