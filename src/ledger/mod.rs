//! The reward ledger: `RUN_DIR/ledger.jsonl`, an append-only, hash-chained
//! record of each window's verified backward passes and reward shares.
//!
//! # Format
//!
//! One line per window, in window order, each a JSON object written exactly
//! as [`serde_json`] writes it (no spaces, fields in this order; wrapped
//! here):
//!
//! ```text
//! {"seq":1,"window":0,"miners":[{"rank":2,"stage":0,"verified":12,"failed":0,"excluded":false,"share":0.5},...],
//!  "prev":"0000…0000","hash":"9f3c…"}
//! ```
//!
//! - `seq`: the line's number, 1 for the first line.
//! - `window`: the training window; strictly increasing down the file.
//! - `miners`: one entry per miner, ranks ascending. `verified`: its
//!   backward passes that count in the window's update (their receipts
//!   chain with their neighbours', and it failed no check; validators
//!   replay a random sample of them), `failed` checks;
//!   `excluded`: the miner failed a check in an earlier window; `share`:
//!   its part of the window's reward (see below).
//! - `prev`: the previous line's `hash`; 64 zeros on the first line.
//! - `hash`: hex BLAKE3 of `prev` (its 64 ASCII hex digits) followed by the
//!   record's canonical bytes, which are the line's own JSON up to and
//!   without `prev` and `hash`: `{"seq":…,"window":…,"miners":[…]}`.
//!
//! # Rewards
//!
//! A window's reward is split among its miners in proportion to their
//! verified backward passes. A miner that failed any check in the window
//! loses the whole window's credit (share 0, and its passes do not count
//! toward the window's total), and is excluded from every later window: each
//! later record lists it with `excluded: true` and share 0, whether or not
//! the orchestrator still reports passes for it. Each share is
//! `verified as f64 / total as f64`, so the shares of a window with any
//! credited pass add up to 1 (up to rounding). The shares and the
//! `excluded` flags in the file are for people reading it: [`read`] and
//! [`Ledger::open`] recompute both from the counts and refuse a line whose
//! stored values differ by a single bit.
//!
//! Payment settles when the run ends: a miner that fails a check in any
//! window also forfeits every window before it, since validators replay a
//! sample and a cheater caught now may have cheated unseen all along;
//! [`settled`] gives the shares as paid, and `swarmrun audit` prints
//! those. The lines themselves are never rewritten.
//!
//! # What the chain protects, and what it does not
//!
//! The ledger decides who gets paid, so a quiet edit must not pass for the
//! record. Every line names its predecessor's hash and its own, and the file
//! must be written byte for byte as the ledger writes it, so changing any
//! byte of a line, or deleting, inserting or reordering lines anywhere but
//! at the end, makes [`read`] fail, naming the first line that is wrong and
//! how. That covers disk corruption, hand edits, and a miner's or an
//! operator's attempt to raise one number.
//!
//! The chain alone does not stop someone who can rewrite the file from
//! recomputing every hash after an edit, so each line also carries its
//! leader's Ed25519 signature of its hash (`"sig":{"key":…,"sig":…}`,
//! after `hash`; see [`SigningKey`]), checked by [`check_signatures`] against
//! the run's book of keys. The chain itself uses no secret (a key derived
//! from the job file was considered, but every miner holds the job file,
//! and a resumed run may use an edited one, which would split the chain).
//! Nor can it notice
//! that lines were cut off the end, since nothing outside the file records
//! how long it was; a crash that leaves half a last line looks the same, and
//! [`Ledger::open`] drops such a line on resume. Anchoring the head (the last
//! line's `hash`) outside the file, in each checkpoint's manifest or signed
//! by the validators, would close both gaps; that is future work.
//! `swarmrun audit` prints the head so it can be compared by hand meanwhile.
//!
//! # Durability
//!
//! Each append is one `write` of one whole line to a file opened for
//! appending, followed by an fsync (and, when the file is created, an fsync
//! of the run directory), so a crash loses at most the line being written.
//!
//! The orchestrator appends a line after each window's step
//! ([`Ledger::create`] on a fresh start, [`Ledger::resume`] after a
//! checkpoint); `swarmrun audit` reads it with [`read`].

mod countersign;
mod rewards;
mod signing;

pub use countersign::{CountersignError, Countersignature, Countersigner, Refusal};
pub use rewards::{audit_table, settled};
pub use signing::{KeyBook, Signature, SignatureProblem, SigningError, SigningKey};

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The ledger's file name inside the run directory.
const FILE_NAME: &str = "ledger.jsonl";

/// `prev` of the first line.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One miner's counts in one window, as the orchestrator hands them to
/// [`Ledger::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub rank: usize,
    /// The stage it served in the window.
    pub stage: usize,
    /// Backward passes credited: counted in the window's update, receipts
    /// chained, no check failed.
    pub verified: u64,
    /// Checks it failed.
    pub failed: u64,
}

/// One miner's entry in a window's record.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MinerCredit {
    pub rank: usize,
    pub stage: usize,
    pub verified: u64,
    pub failed: u64,
    /// It failed a check in an earlier window.
    pub excluded: bool,
    /// Its part of the window's reward, between 0 and 1.
    pub share: f64,
}

impl MinerCredit {
    /// Whether its passes earn a part of the window's reward.
    fn earns(&self) -> bool {
        self.failed == 0 && !self.excluded
    }
}

/// One verified line of the ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowRecord {
    /// The line's number, from 1.
    pub seq: u64,
    pub window: u64,
    /// Ranks ascending.
    pub miners: Vec<MinerCredit>,
    /// The line's hash (over the chain up to it).
    pub hash: String,
    /// Its leader's signature of `hash`, when the leader signed.
    pub signature: Option<Signature>,
}

/// A ledger read back and verified.
#[derive(Debug, Clone)]
pub struct Chain {
    pub path: PathBuf,
    pub records: Vec<WindowRecord>,
    /// The last line's hash (64 zeros for an empty ledger).
    pub head: String,
    /// The number of a last line that ends without a newline (a crash
    /// while appending, or a cut file): it is not part of the record.
    pub torn_line: Option<usize>,
}

/// A line as it is stored.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    seq: u64,
    window: u64,
    miners: Vec<MinerCredit>,
    prev: String,
    hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sig: Option<Signature>,
}

/// The part of a line its hash covers, besides `prev`.
#[derive(Serialize)]
struct Body<'a> {
    seq: u64,
    window: u64,
    miners: &'a [MinerCredit],
}

impl Body<'_> {
    fn hash(&self, prev: &str) -> String {
        // Serializing plain integers, booleans, finite floats and strings
        // into memory cannot fail.
        let bytes = serde_json::to_vec(self).expect("a ledger record serializes");
        let mut h = blake3::Hasher::new();
        h.update(prev.as_bytes());
        h.update(&bytes);
        h.finalize().to_hex().to_string()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}:{line}: {problem}", path.display())]
    Line {
        path: PathBuf,
        /// From 1.
        line: usize,
        problem: LineProblem,
    },
    #[error(
        "window {window} cannot follow window {last}: windows are appended in increasing order"
    )]
    WindowNotAfter { window: u64, last: u64 },
    #[error("window {window} counts rank {rank} twice")]
    DuplicateRank { window: u64, rank: usize },
    #[error(transparent)]
    Signing(#[from] SigningError),
    #[error("{}: {problem}", path.display())]
    Signature {
        path: PathBuf,
        problem: SignatureProblem,
    },
}

/// What is wrong with one line of a ledger.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LineProblem {
    #[error("not a ledger record: {0}")]
    Unparsable(String),
    #[error("not written as the ledger writes it (spacing, escapes or number format changed)")]
    NotCanonical,
    #[error("its hash does not match its contents: the line was edited")]
    Edited,
    #[error("is record {found} where record {expected} belongs: a line before it was deleted, inserted or moved")]
    Seq { expected: u64, found: u64 },
    #[error("does not continue the chain (its prev is {found:.16}..., the line before hashes to {expected:.16}...): a line was deleted, inserted or moved")]
    Prev { expected: String, found: String },
    #[error("window {window} does not come after window {previous}")]
    WindowOrder { window: u64, previous: u64 },
    #[error("does not list its ranks once each in increasing order")]
    RankOrder,
    #[error("leaves out rank {rank}, excluded since it failed a check in window {caught_in}")]
    MissingExcluded { rank: usize, caught_in: u64 },
    #[error("marks rank {rank} excluded: {stored}, but by the checks before it: {expected}")]
    Excluded {
        rank: usize,
        stored: bool,
        expected: bool,
    },
    #[error("gives rank {rank} share {stored}, but its counts give {computed}")]
    Share {
        rank: usize,
        stored: f64,
        computed: f64,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> LedgerError + '_ {
    move |source| LedgerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `RUN_DIR/ledger.jsonl`.
pub fn path(run_dir: &Path) -> PathBuf {
    run_dir.join(FILE_NAME)
}

/// Reads and verifies the ledger of `run_dir` without changing it.
pub fn read(run_dir: &Path) -> Result<Chain, LedgerError> {
    let path = path(run_dir);
    let bytes = fs::read(&path).map_err(io_error(&path))?;
    parse(&bytes, &path)
}

/// What the signatures of a ledger say.
#[derive(Debug, Clone)]
pub struct Signatures {
    /// The run's book of leaders' keys; `None` for a ledger written before
    /// leaders signed.
    pub book: Option<KeyBook>,
    /// Per line, how many validators countersigned it.
    pub countersigned: Vec<usize>,
}

/// Checks the signatures of `chain`, the ledger of `run_dir`, against the
/// run's book of keys, and the book against the keys in `pinned` (when
/// any), and counts each line's countersignatures (with `pinned`, only by
/// pinned keys). With `require_countersigned`, a line no validator
/// countersigned is refused. A ledger without signatures and without a
/// book passes: it was written before leaders signed; `swarmrun audit`
/// says so.
pub fn check_signatures(
    chain: &Chain,
    run_dir: &Path,
    pinned: &[String],
    require_countersigned: bool,
) -> Result<Signatures, LedgerError> {
    let problem = |problem| LedgerError::Signature {
        path: chain.path.clone(),
        problem,
    };
    let book = KeyBook::read(run_dir)?;
    match &book {
        Some(book) => {
            let lines = chain
                .records
                .iter()
                .map(|r| (r.hash.as_str(), r.signature.as_ref()));
            book.check(lines, pinned).map_err(problem)?;
        }
        None if chain.records.iter().any(|r| r.signature.is_some()) || !pinned.is_empty() => {
            return Err(problem(SignatureProblem::NoBook))
        }
        None => {}
    }
    let by_key = countersign::read_all(run_dir).map_err(io_error(run_dir))?;
    let trusted = by_key
        .iter()
        .filter(|(key, _)| pinned.is_empty() || pinned.contains(key));
    let mut counts = vec![0; chain.records.len()];
    for (_, signed) in trusted {
        for (count, record) in counts.iter_mut().zip(&chain.records) {
            let leader = record.signature.as_ref().map(|s| &s.key);
            let seen = signed
                .iter()
                .any(|(hash, by)| *hash == record.hash && Some(by) == leader);
            *count += usize::from(seen);
        }
    }
    if let Some(i) = counts.iter().position(|&n| n == 0) {
        if require_countersigned {
            return Err(problem(SignatureProblem::NotCountersigned { line: i + 1 }));
        }
    }
    Ok(Signatures {
        book,
        countersigned: counts,
    })
}

/// Verifies a ledger's bytes, as read from `path` (named in errors).
pub fn parse(bytes: &[u8], path: &Path) -> Result<Chain, LedgerError> {
    Ok(verify(bytes, path)?.0)
}

/// What the chain says so far: enough to check or write the next line.
#[derive(Debug, Clone)]
struct State {
    lines: u64,
    head: String,
    last_window: Option<u64>,
    /// Rank → the first window in which it failed a check.
    caught: BTreeMap<usize, u64>,
    /// Rank → the stage of its latest entry.
    stages: BTreeMap<usize, usize>,
}

impl State {
    fn new() -> State {
        State {
            lines: 0,
            head: GENESIS.to_string(),
            last_window: None,
            caught: BTreeMap::new(),
            stages: BTreeMap::new(),
        }
    }

    /// The entries of the next window from its miners' counts (ranks
    /// distinct and ascending): exclusion from the chain so far, shares by
    /// the rule. Excluded ranks missing from `tallies` get an empty entry.
    fn credits(&self, tallies: &[Tally]) -> Vec<MinerCredit> {
        let entry = |t: &Tally| MinerCredit {
            rank: t.rank,
            stage: t.stage,
            verified: t.verified,
            failed: t.failed,
            excluded: self.caught.contains_key(&t.rank),
            share: 0.0,
        };
        let mut miners: Vec<MinerCredit> = tallies.iter().map(entry).collect();
        for &rank in self.caught.keys() {
            if !tallies.iter().any(|t| t.rank == rank) {
                miners.push(entry(&Tally {
                    rank,
                    stage: self.stages.get(&rank).copied().unwrap_or(0),
                    verified: 0,
                    failed: 0,
                }));
            }
        }
        miners.sort_by_key(|m| m.rank);
        rewards::assign_shares(&mut miners);
        miners
    }

    fn advance(&mut self, window: u64, miners: &[MinerCredit], hash: String) {
        self.lines += 1;
        self.head = hash;
        self.last_window = Some(window);
        for m in miners {
            self.stages.insert(m.rank, m.stage);
            if m.failed > 0 {
                self.caught.entry(m.rank).or_insert(window);
            }
        }
    }
}

/// Verifies a whole ledger file. Returns the chain, the state after its
/// last complete line, and the length of the complete lines.
fn verify(bytes: &[u8], path: &Path) -> Result<(Chain, State, usize), LedgerError> {
    let complete = bytes
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |newline| newline + 1);
    let mut state = State::new();
    let mut records = Vec::new();
    if complete > 0 {
        for (i, raw) in bytes[..complete - 1].split(|&b| b == b'\n').enumerate() {
            let line = i + 1;
            let record = check_line(raw, &state).map_err(|problem| LedgerError::Line {
                path: path.to_path_buf(),
                line,
                problem,
            })?;
            state.advance(record.0.window, &record.0.miners, record.1);
            records.push(record.0);
        }
    }
    let chain = Chain {
        path: path.to_path_buf(),
        records,
        head: state.head.clone(),
        torn_line: (complete < bytes.len()).then_some(state.lines as usize + 1),
    };
    Ok((chain, state, complete))
}

/// Checks one line (without its newline) against the chain before it;
/// returns its record and hash.
fn check_line(raw: &[u8], state: &State) -> Result<(WindowRecord, String), LineProblem> {
    let line: Line =
        serde_json::from_slice(raw).map_err(|e| LineProblem::Unparsable(e.to_string()))?;
    if serde_json::to_vec(&line).ok().as_deref() != Some(raw) {
        return Err(LineProblem::NotCanonical);
    }
    let body = Body {
        seq: line.seq,
        window: line.window,
        miners: &line.miners,
    };
    if body.hash(&line.prev) != line.hash {
        return Err(LineProblem::Edited);
    }
    let expected = state.lines + 1;
    if line.seq != expected {
        return Err(LineProblem::Seq {
            expected,
            found: line.seq,
        });
    }
    if line.prev != state.head {
        return Err(LineProblem::Prev {
            expected: state.head.clone(),
            found: line.prev,
        });
    }
    if let Some(previous) = state.last_window.filter(|&p| line.window <= p) {
        return Err(LineProblem::WindowOrder {
            window: line.window,
            previous,
        });
    }
    if line.miners.windows(2).any(|w| w[0].rank >= w[1].rank) {
        return Err(LineProblem::RankOrder);
    }
    if let Some((&rank, &caught_in)) = state
        .caught
        .iter()
        .find(|(r, _)| !line.miners.iter().any(|m| m.rank == **r))
    {
        return Err(LineProblem::MissingExcluded { rank, caught_in });
    }
    let tallies: Vec<Tally> = line
        .miners
        .iter()
        .map(|m| Tally {
            rank: m.rank,
            stage: m.stage,
            verified: m.verified,
            failed: m.failed,
        })
        .collect();
    for (stored, computed) in line.miners.iter().zip(state.credits(&tallies)) {
        if stored.excluded != computed.excluded {
            return Err(LineProblem::Excluded {
                rank: stored.rank,
                stored: stored.excluded,
                expected: computed.excluded,
            });
        }
        if stored.share.to_bits() != computed.share.to_bits() {
            return Err(LineProblem::Share {
                rank: stored.rank,
                stored: stored.share,
                computed: computed.share,
            });
        }
    }
    let record = WindowRecord {
        seq: line.seq,
        window: line.window,
        miners: line.miners,
        hash: line.hash.clone(),
        signature: line.sig,
    };
    Ok((record, line.hash))
}

/// The ledger of a run, open for appending.
#[derive(Debug)]
pub struct Ledger {
    /// The last line appended, as written (without its newline).
    last_line: String,
    file: File,
    path: PathBuf,
    state: State,
    /// The leader's key, when it signs the lines it appends.
    signer: Option<SigningKey>,
}

impl Ledger {
    /// Opens `run_dir`'s ledger, creating the directory and an empty file
    /// if need be. An existing ledger is verified first and refused if any
    /// complete line is wrong; a last line without its newline (a crash
    /// while appending) is cut off, and the chain continues after the last
    /// complete line.
    pub fn open(run_dir: &Path) -> Result<Ledger, LedgerError> {
        fs::create_dir_all(run_dir).map_err(io_error(run_dir))?;
        let path = path(run_dir);
        let existing = match fs::read(&path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_error(&path)(e)),
        };
        let Some(bytes) = existing else {
            let file = OpenOptions::new()
                .append(true)
                .create_new(true)
                .open(&path)
                .map_err(io_error(&path))?;
            file.sync_all().map_err(io_error(&path))?;
            File::open(run_dir)
                .and_then(|d| d.sync_all())
                .map_err(io_error(run_dir))?;
            return Ok(Ledger {
                last_line: String::new(),
                file,
                path,
                state: State::new(),
                signer: None,
            });
        };
        let (_, state, complete) = verify(&bytes, &path)?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_error(&path))?;
        if complete < bytes.len() {
            file.set_len(complete as u64)
                .and_then(|()| file.sync_all())
                .map_err(io_error(&path))?;
        }
        Ok(Ledger {
            last_line: String::new(),
            file,
            path,
            state,
            signer: None,
        })
    }

    /// From now on, every line appended is signed with `key`, which is
    /// added to the run's book of keys first.
    pub fn signed_by(mut self, key: SigningKey) -> Result<Ledger, LedgerError> {
        let run_dir = self.path.parent().unwrap_or(Path::new("."));
        KeyBook::add(run_dir, &key)?;
        self.signer = Some(key);
        Ok(self)
    }

    /// A fresh run's ledger: whatever an earlier run left in `run_dir` is
    /// dropped, as its metrics are, and so is the book of the keys that
    /// signed it.
    pub fn create(run_dir: &Path) -> Result<Ledger, LedgerError> {
        for path in [path(run_dir), KeyBook::path(run_dir)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path)(e)),
            }
        }
        Ledger::open(run_dir)
    }

    /// The ledger of a run resumed after `window`'s checkpoint: verified
    /// as [`Ledger::open`] does, then cut after `window`'s line, since the
    /// windows after it are run again.
    pub fn resume(run_dir: &Path, window: u64) -> Result<Ledger, LedgerError> {
        let path = path(run_dir);
        match fs::read(&path) {
            Ok(bytes) => {
                let (chain, _, complete) = verify(&bytes, &path)?;
                let keep = chain
                    .records
                    .iter()
                    .take_while(|r| r.window <= window)
                    .count();
                let cut: usize = bytes[..complete]
                    .split_inclusive(|&b| b == b'\n')
                    .take(keep)
                    .map(<[u8]>::len)
                    .sum();
                crate::fsutil::write_atomic(&path, &bytes[..cut]).map_err(io_error(&path))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&path)(e)),
        }
        Ledger::open(run_dir)
    }

    /// Appends `window`'s record from its miners' counts (any order) and
    /// syncs it to disk. Ranks excluded earlier are marked so, and listed
    /// even if `tallies` leaves them out; shares follow the rule in the
    /// module documentation. Returns the record as written.
    pub fn append(&mut self, window: u64, tallies: &[Tally]) -> Result<WindowRecord, LedgerError> {
        if let Some(last) = self.state.last_window.filter(|&l| window <= l) {
            return Err(LedgerError::WindowNotAfter { window, last });
        }
        let mut sorted = tallies.to_vec();
        sorted.sort_by_key(|t| t.rank);
        if let Some(w) = sorted.windows(2).find(|w| w[0].rank == w[1].rank) {
            return Err(LedgerError::DuplicateRank {
                window,
                rank: w[0].rank,
            });
        }
        let miners = self.state.credits(&sorted);
        let seq = self.state.lines + 1;
        let body = Body {
            seq,
            window,
            miners: &miners,
        };
        let hash = body.hash(&self.state.head);
        let line = Line {
            seq,
            window,
            miners,
            prev: self.state.head.clone(),
            sig: self.signer.as_ref().map(|k| signing::sign_line(k, &hash)),
            hash,
        };
        let mut bytes = serde_json::to_vec(&line).expect("a ledger line serializes");
        bytes.push(b'\n');
        let len = self.file.metadata().map_err(io_error(&self.path))?.len();
        let written = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Leave no torn line behind if the file can still be cut.
            let _ = self.file.set_len(len);
            return Err(io_error(&self.path)(e));
        }
        self.state.advance(window, &line.miners, line.hash.clone());
        self.last_line = String::from_utf8_lossy(&bytes[..bytes.len() - 1]).into_owned();
        Ok(WindowRecord {
            seq,
            window,
            miners: line.miners,
            hash: line.hash,
            signature: line.sig,
        })
    }

    /// The last line appended, as written (for validators to
    /// countersign); empty before the first.
    pub fn last_line(&self) -> &str {
        &self.last_line
    }

    /// The ranks excluded from the next window, each with the window in
    /// which it first failed a check.
    pub fn excluded(&self) -> &BTreeMap<usize, u64> {
        &self.state.caught
    }
}

#[cfg(test)]
mod tests;
