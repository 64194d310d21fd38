//! Ed25519 signatures on the ledger's lines, so that a file rewritten by
//! someone without the leader's key fails `swarmrun audit` even when its
//! hash chain was recomputed.
//!
//! Each leader of a run (the orchestrator; a standby that took over; the
//! orchestrator of a restarted job) makes a key pair of its own when it
//! opens the ledger, adds the public key to `RUN_DIR/ledger-keys.json`
//! (the run's book of signing keys) and prints it; every line it appends
//! carries its signature of the line's hash, which covers the whole chain
//! up to that line. The book says which keys may sign; what makes the
//! book itself trustworthy is that its keys match the ones the leaders
//! printed when they started: `swarmrun audit --key HEX` pins them.
//!
//! Keys live in memory only: a leader's key signs nothing after the
//! process ends ([`crate::signing`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::signing::{NoRandomness, SigningKey};

/// The book's file name inside the run directory.
const BOOK: &str = "ledger-keys.json";

/// What a signature covers besides the line's hash: this tag, so that a
/// signature made for anything else never passes for a ledger line's.
const DOMAIN: &[u8] = b"swarmrun ledger line v1\n";

/// A leader's signature of one line: its public key and the signature of
/// the line's hash, both hex.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    pub key: String,
    pub sig: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error(transparent)]
    Random(#[from] NoRandomness),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: not a book of ledger keys: {reason}", path.display())]
    Book { path: PathBuf, reason: String },
}

/// Why a ledger's signatures do not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureProblem {
    #[error("line {line} is not signed, in a ledger whose leaders sign every line")]
    Unsigned { line: usize },
    #[error(
        "line {line} is signed with key {key:.16}..., which the run's book of keys does not list"
    )]
    UnknownKey { line: usize, key: String },
    #[error("line {line}'s signature does not match its hash: the line was forged")]
    Forged { line: usize },
    #[error(
        "the run's book of keys lists {key:.16}..., which is not among the keys given with --key"
    )]
    NotPinned { key: String },
    #[error("the ledger has signed lines but its run has no book of keys ({BOOK})")]
    NoBook,
    #[error("line {line} is countersigned by no validator")]
    NotCountersigned { line: usize },
}

/// A leader's signature of the line whose hash is `hash`.
pub fn sign_line(key: &SigningKey, hash: &str) -> Signature {
    Signature {
        key: key.public_hex(),
        sig: key.sign(DOMAIN, hash.as_bytes()),
    }
}

/// Whether `s` is a valid signature of the line whose hash is `hash`.
pub fn verify(s: &Signature, hash: &str) -> bool {
    crate::signing::verify(&s.key, &s.sig, DOMAIN, hash.as_bytes())
}

/// `RUN_DIR/ledger-keys.json`: the public keys of every leader of the run,
/// in the order they started.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyBook {
    pub leaders: Vec<String>,
}

impl KeyBook {
    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join(BOOK)
    }

    /// The run's book; `None` for a run whose ledger was never signed.
    pub fn read(run_dir: &Path) -> Result<Option<KeyBook>, SigningError> {
        let path = Self::path(run_dir);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SigningError::Io { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SigningError::Book {
                path,
                reason: e.to_string(),
            })
    }

    /// Adds `key` to the run's book (created if need be), durably.
    pub fn add(run_dir: &Path, key: &SigningKey) -> Result<(), SigningError> {
        let mut book = Self::read(run_dir)?.unwrap_or_default();
        let public = key.public_hex();
        if !book.leaders.contains(&public) {
            book.leaders.push(public);
        }
        let path = Self::path(run_dir);
        let json = serde_json::to_vec_pretty(&book).expect("a key book serializes");
        crate::fsutil::write_atomic(&path, &json)
            .map_err(|source| SigningError::Io { path, source })
    }

    /// Checks every line's signature (`(line's hash, its signature)`, in
    /// order) against the book, and the book against the keys a user
    /// pinned (none: any key the book lists).
    pub fn check<'l>(
        &self,
        lines: impl IntoIterator<Item = (&'l str, Option<&'l Signature>)>,
        pinned: &[String],
    ) -> Result<(), SignatureProblem> {
        if let Some(key) = self
            .leaders
            .iter()
            .find(|k| !pinned.is_empty() && !pinned.contains(k))
        {
            return Err(SignatureProblem::NotPinned { key: key.clone() });
        }
        for (i, (hash, signature)) in lines.into_iter().enumerate() {
            let line = i + 1;
            let s = signature.ok_or(SignatureProblem::Unsigned { line })?;
            if !self.leaders.contains(&s.key) {
                return Err(SignatureProblem::UnknownKey {
                    line,
                    key: s.key.clone(),
                });
            }
            if !verify(s, hash) {
                return Err(SignatureProblem::Forged { line });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_hash_only_and_under_its_own_key_only() {
        let (a, b) = (
            SigningKey::generate().unwrap(),
            SigningKey::generate().unwrap(),
        );
        let hash = "9f".repeat(32);
        let s = sign_line(&a, &hash);
        assert!(verify(&s, &hash));
        assert!(!verify(&s, &"9e".repeat(32)));
        let other = Signature {
            key: b.public_hex(),
            ..s.clone()
        };
        assert!(!verify(&other, &hash));
        let garbled = Signature {
            sig: "zz".into(),
            ..s
        };
        assert!(!verify(&garbled, &hash));
    }
}
