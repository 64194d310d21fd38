//! Creating, finding and joining the segment file, and telling a live segment
//! from one left behind by a crashed run.
//!
//! Local rank 0 creates the segment under a temporary name, initializes it
//! completely and only then links it to its public name, so a file under the
//! public name is always fully written: a joiner never sees a half-built
//! header. If the public name is taken, rank 0 looks at the existing file:
//! one that is not a segment of this version, or whose creator is dead, is
//! stale and replaced; one whose creator is alive belongs to another job and
//! is left alone with an error. Joiners trust a file only when its creator
//! (rank 0's slot) is alive, so they skip a stale file and keep looking until
//! rank 0 has replaced it or their deadline passes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::liveness::ProcessId;
use super::segment::{self, Segment, SegmentLayout};
use super::{CONTROL_TAG, SLOT_JOINED, SLOT_LEFT};
use crate::transport::TransportError;

/// Slot state before its rank has started to join.
const SLOT_EMPTY: u32 = 0;
/// A rank has claimed the slot and is writing its identity.
const SLOT_CLAIMING: u32 = 1;

/// How often a joiner looks for the file again.
const RETRY: Duration = Duration::from_millis(2);

/// Where segments live: POSIX shared memory on Linux is this tmpfs.
const SHM_DIR: &str = "/dev/shm";

/// The path for segment `name`; names are restricted to characters that
/// cannot leave the directory or surprise a shell.
pub(crate) fn segment_path(name: &str) -> Result<PathBuf, TransportError> {
    let valid = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "shared segment name {name:?} must be 1 to 200 characters of A-Z a-z 0-9 . _ - \
                 and not start with a dot"
            ),
        )
        .into());
    }
    Ok(Path::new(SHM_DIR).join(name))
}

/// The layout-independent start of a segment, read with plain file reads
/// from a file we do not trust yet.
struct Prefix {
    ours: bool,
    size: u64,
    ring_capacity: u64,
    chunk_bytes: u64,
    total_len: u64,
    creator: ProcessId,
}

fn read_prefix(file: &File) -> io::Result<Option<Prefix>> {
    let mut bytes = [0u8; segment::PREFIX_LEN];
    if file.metadata()?.len() < bytes.len() as u64 {
        return Ok(None);
    }
    file.read_exact_at(&mut bytes, 0)?;
    let u64_at = |at: usize| u64::from_ne_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let u32_at = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let slot0 = segment::SLOT0_OFFSET;
    Ok(Some(Prefix {
        ours: u64_at(segment::H_MAGIC) == segment::MAGIC
            && u32_at(segment::H_VERSION) == segment::VERSION
            && u32_at(segment::H_STATE) == segment::STATE_READY
            && u32_at(slot0 + segment::S_STATE) == SLOT_JOINED,
        size: u64_at(segment::H_SIZE),
        ring_capacity: u64_at(segment::H_RING_CAPACITY),
        chunk_bytes: u64_at(segment::H_CHUNK_BYTES),
        total_len: u64_at(segment::H_TOTAL_LEN),
        creator: ProcessId {
            pid: u32_at(slot0 + segment::S_PID),
            start_time: u64_at(slot0 + segment::S_START_TIME),
        },
    }))
}

/// Why an existing file may be replaced, or who still owns it.
enum Verdict {
    Stale,
    Live(ProcessId),
}

fn inspect(file: &File) -> io::Result<Verdict> {
    Ok(match read_prefix(file)? {
        Some(prefix) if prefix.ours && prefix.creator.check_alive().is_ok() => {
            Verdict::Live(prefix.creator)
        }
        _ => Verdict::Stale,
    })
}

/// Rank 0: builds the segment and publishes it under `path`.
pub(crate) fn create(
    path: &Path,
    layout: &SegmentLayout,
    me: ProcessId,
) -> Result<(File, Segment, u64), TransportError> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("segment");
    let tmp = path.with_file_name(format!(".{file_name}.init.{}", me.pid));
    // Left by a crashed creator that had our pid; nobody else uses the name.
    let _ = std::fs::remove_file(&tmp);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let built = build(&file, layout, me).and_then(|(segment, nonce)| {
        publish(&tmp, path)?;
        Ok((segment, nonce))
    });
    let _ = std::fs::remove_file(&tmp);
    let (segment, nonce) = built?;
    Ok((file, segment, nonce))
}

fn build(
    file: &File,
    layout: &SegmentLayout,
    me: ProcessId,
) -> Result<(Segment, u64), TransportError> {
    let total = layout.total_len();
    file.set_len(total as u64)?;
    // Reserve the pages now: tmpfs files are sparse, and touching a page that
    // a full /dev/shm cannot back raises SIGBUS mid-run instead of an error here.
    let len = i64::try_from(total).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    nix::fcntl::posix_fallocate(file.as_raw_fd(), 0, len).map_err(|errno| {
        io::Error::new(
            io::Error::from(errno).kind(),
            format!("cannot reserve {total} bytes in {SHM_DIR}: {errno}"),
        )
    })?;
    let segment = Segment::map(file, layout.clone())?;
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce)
        .map_err(|e| io::Error::other(format!("no randomness for the run nonce: {e}")))?;
    let nonce = u64::from_ne_bytes(nonce);
    let header = segment.header();
    // Relaxed everywhere but the final `state` store: nobody can see the file
    // before `publish`, and readers acquire `state` before reading the rest.
    header.magic.store(segment::MAGIC, Ordering::Relaxed);
    header.version.store(segment::VERSION, Ordering::Relaxed);
    header.size.store(layout.size() as u64, Ordering::Relaxed);
    header
        .ring_capacity
        .store(layout.ring_capacity() as u64, Ordering::Relaxed);
    header
        .chunk_bytes
        .store(layout.chunk_bytes() as u64, Ordering::Relaxed);
    header.nonce.store(nonce, Ordering::Relaxed);
    header.total_len.store(total as u64, Ordering::Relaxed);
    let slot = segment.slot(0);
    slot.pid.store(me.pid, Ordering::Relaxed);
    slot.start_time.store(me.start_time, Ordering::Relaxed);
    slot.state.store(SLOT_JOINED, Ordering::Relaxed);
    // Release: pairs with the Acquire load in `join`; every field above is
    // visible to whoever sees READY.
    header.state.store(segment::STATE_READY, Ordering::Release);
    Ok((segment, nonce))
}

/// Links the built file to its public name, replacing a stale one.
fn publish(tmp: &Path, path: &Path) -> Result<(), TransportError> {
    for _ in 0..3 {
        match std::fs::hard_link(tmp, path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
        let existing = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        if let Verdict::Live(owner) = inspect(&existing)? {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "shared segment {} belongs to live process {} (another job with the same \
                     name?)",
                    path.display(),
                    owner.pid
                ),
            )
            .into());
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "shared segment {} keeps being recreated by someone else",
            path.display()
        ),
    )
    .into())
}

/// Ranks other than 0: waits for rank 0's live segment and claims `rank`'s slot.
pub(crate) fn join(
    path: &Path,
    layout: &SegmentLayout,
    rank: usize,
    me: ProcessId,
    deadline: Instant,
) -> Result<(File, Segment, u64), TransportError> {
    loop {
        if let Some(joined) = try_join(path, layout, rank, me)? {
            return Ok(joined);
        }
        if Instant::now() >= deadline {
            return Err(TransportError::Timeout {
                rank: 0,
                tag: CONTROL_TAG,
            });
        }
        std::thread::sleep(RETRY);
    }
}

fn try_join(
    path: &Path,
    layout: &SegmentLayout,
    rank: usize,
    me: ProcessId,
) -> Result<Option<(File, Segment, u64)>, TransportError> {
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let prefix = match read_prefix(&file)? {
        Some(prefix) if prefix.ours && prefix.creator.check_alive().is_ok() => prefix,
        // Stale: rank 0 of this run will replace it.
        _ => return Ok(None),
    };
    let asked = (
        layout.size() as u64,
        layout.ring_capacity() as u64,
        layout.chunk_bytes() as u64,
        layout.total_len() as u64,
    );
    let found = (
        prefix.size,
        prefix.ring_capacity,
        prefix.chunk_bytes,
        prefix.total_len,
    );
    if asked != found {
        return Err(TransportError::Protocol {
            rank: 0,
            reason: format!(
                "segment {} was created for {} ranks, ring {} B, chunk {} B; this rank asked \
                 for {} ranks, ring {} B, chunk {} B",
                path.display(),
                found.0,
                found.1,
                found.2,
                asked.0,
                asked.1,
                asked.2
            ),
        });
    }
    let segment = Segment::map(&file, layout.clone())?;
    let header = segment.header();
    // Acquire: pairs with the creator's Release store of READY, making the
    // fields it wrote before visible through the mapping as well.
    if header.state.load(Ordering::Acquire) != segment::STATE_READY {
        return Ok(None);
    }
    let nonce = header.nonce.load(Ordering::Relaxed);
    let slot = segment.slot(rank);
    if let Err(held) = slot.state.compare_exchange(
        SLOT_EMPTY,
        SLOT_CLAIMING,
        Ordering::Acquire,
        Ordering::Relaxed,
    ) {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "rank {rank}'s slot in {} is already {} by pid {}; were two processes given \
                 the same rank?",
                path.display(),
                if held == SLOT_LEFT { "used" } else { "taken" },
                slot.pid.load(Ordering::Relaxed)
            ),
        )
        .into());
    }
    slot.pid.store(me.pid, Ordering::Relaxed);
    slot.start_time.store(me.start_time, Ordering::Relaxed);
    // Release: pairs with the Acquire loads in `wait_all_joined`, so a peer
    // that sees JOINED sees our identity.
    slot.state.store(SLOT_JOINED, Ordering::Release);
    Ok(Some((file, segment, nonce)))
}

/// Waits until every rank has joined; returns each rank's identity.
pub(crate) fn wait_all_joined(
    segment: &Segment,
    deadline: Instant,
) -> Result<Vec<ProcessId>, TransportError> {
    let size = segment.layout().size();
    let identity = |rank: usize| {
        let slot = segment.slot(rank);
        ProcessId {
            pid: slot.pid.load(Ordering::Relaxed),
            start_time: slot.start_time.load(Ordering::Relaxed),
        }
    };
    let mut next_check = Instant::now();
    loop {
        let mut missing = None;
        for rank in 0..size {
            // Acquire: pairs with the joiner's Release store of JOINED.
            match segment.slot(rank).state.load(Ordering::Acquire) {
                SLOT_JOINED => {}
                SLOT_LEFT => {
                    return Err(TransportError::PeerLost {
                        rank,
                        reason: "left before every rank had joined".into(),
                    })
                }
                _ => {
                    missing.get_or_insert(rank);
                }
            }
        }
        let Some(missing) = missing else {
            return Ok((0..size).map(identity).collect());
        };
        let now = Instant::now();
        if now >= next_check {
            for rank in 0..size {
                if segment.slot(rank).state.load(Ordering::Acquire) == SLOT_JOINED {
                    identity(rank)
                        .check_alive()
                        .map_err(|reason| TransportError::PeerLost { rank, reason })?;
                }
            }
            next_check = now + super::CHECK_PERIOD;
        }
        if now >= deadline {
            return Err(TransportError::Timeout {
                rank: missing,
                tag: CONTROL_TAG,
            });
        }
        std::thread::sleep(RETRY);
    }
}
