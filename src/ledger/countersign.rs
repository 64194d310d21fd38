//! Validators' countersignatures of the ledger's lines, so that not even
//! the orchestrator can rewrite the ledger alone once the run is over.
//!
//! After appending a window's line, the leader sends it to every
//! validator, which checks that the line is whole (its hash covers its
//! contents) and signed by its leader, signs its hash with a key of its
//! own made when it started, and appends `{"window":…,"hash":…,
//! "leader":…,"sig":…}` (the signature covers the hash and the key of the
//! leader that signed the line, so a countersignature left in the run
//! directory by an earlier run of the same job, whose lines may hash
//! alike, never counts for this run's lines)
//! to `RUN_DIR/countersign-KEY.jsonl` (KEY: the start of its public key,
//! so that a validator of a restarted job adds a file rather than replace
//! one), fsynced, under a first line `{"key":…}` naming the key. The validator's key ends with its
//! process, so a line rewritten later, whatever its hashes and its
//! leader's signature, finds no countersignature of its new hash.
//! `swarmrun audit` counts each line's valid countersignatures, and with
//! `--countersigned` refuses a line that has none.
//!
//! A countersignature says "this validator saw the leader sign this line
//! while the run went on"; what the line claims (who gets paid) rests on
//! the checks the validators did during the window.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::signing::{self, Signature, SigningKey};
use super::{Body, Line};

/// The countersignature file of the validator with `key`.
fn file_name(key: &SigningKey) -> String {
    format!("countersign-{:.16}.jsonl", key.public_hex())
}

/// The first line of a countersignature file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyLine {
    key: String,
}

/// One countersigned line.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Countersignature {
    pub window: u64,
    pub hash: String,
    /// The key of the leader that signed the line.
    pub leader: String,
    pub sig: String,
}

/// What a validator signs for a line: its hash and its leader's key.
fn signed_text(hash: &str, leader: &str) -> String {
    format!("{hash} {leader}")
}

/// Why a validator does not countersign a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not a ledger line: {0}")]
    Unparsable(String),
    #[error("its hash does not cover its contents")]
    Edited,
    #[error("its leader did not sign it")]
    Unsigned,
}

/// A validator's countersignature file, open for appending.
pub struct Countersigner {
    key: SigningKey,
    file: File,
    path: PathBuf,
}

impl Countersigner {
    /// Starts the countersignature file of the validator with `key`.
    pub fn create(run_dir: &Path, key: SigningKey) -> io::Result<Countersigner> {
        fs::create_dir_all(run_dir)?;
        let path = run_dir.join(file_name(&key));
        let mut head = serde_json::to_vec(&KeyLine {
            key: key.public_hex(),
        })?;
        head.push(b'\n');
        crate::fsutil::write_atomic(&path, &head)?;
        let file = OpenOptions::new().append(true).open(&path)?;
        Ok(Countersigner { key, file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks `line` (a ledger line as its leader wrote it) and appends
    /// its countersignature, synced; returns it.
    pub fn countersign(&mut self, line: &str) -> Result<Countersignature, CountersignError> {
        let line: Line = serde_json::from_str(line)
            .map_err(|e| CountersignError::Refused(Refusal::Unparsable(e.to_string())))?;
        let body = Body {
            seq: line.seq,
            window: line.window,
            miners: &line.miners,
        };
        if body.hash(&line.prev) != line.hash {
            return Err(CountersignError::Refused(Refusal::Edited));
        }
        let leader = match &line.sig {
            Some(s) if signing::verify(s, &line.hash) => s.key.clone(),
            _ => return Err(CountersignError::Refused(Refusal::Unsigned)),
        };
        let signed = signing::sign_line(&self.key, &signed_text(&line.hash, &leader));
        let c = Countersignature {
            window: line.window,
            hash: line.hash,
            leader,
            sig: signed.sig,
        };
        let mut bytes = serde_json::to_vec(&c).expect("a countersignature serializes");
        bytes.push(b'\n');
        self.file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data())
            .map_err(|source| CountersignError::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(c)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CountersignError {
    #[error("refused to countersign: {0}")]
    Refused(Refusal),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// Every validator's countersignatures in `run_dir` that hold: by key, the
/// hashes it signed with a valid signature. Lines that do not parse or
/// whose signature fails are left out (they count for nothing).
pub fn read_all(run_dir: &Path) -> io::Result<BTreeMap<String, Vec<(String, String)>>> {
    let mut by_key = BTreeMap::new();
    let entries = match fs::read_dir(run_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(by_key),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !(name.starts_with("countersign-") && name.ends_with(".jsonl")) {
            continue;
        }
        let text = fs::read_to_string(&path)?;
        let mut lines = text.lines();
        let Some(Ok(KeyLine { key })) = lines.next().map(serde_json::from_str::<KeyLine>) else {
            continue;
        };
        let hashes: Vec<(String, String)> = lines
            .filter_map(|l| serde_json::from_str::<Countersignature>(l).ok())
            .filter(|c| {
                let s = Signature {
                    key: key.clone(),
                    sig: c.sig.clone(),
                };
                signing::verify(&s, &signed_text(&c.hash, &c.leader))
            })
            .map(|c| (c.hash, c.leader))
            .collect();
        by_key.insert(key, hashes);
    }
    Ok(by_key)
}
