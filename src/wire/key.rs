//! The job key: the one shared secret that admits a process into a job.
//!
//! Every rank of a job holds the same 32 random bytes; the handshake in
//! [`super::stream`] proves possession of them without sending them. The key
//! travels as 64 hex digits, either in the SWARMRUN_JOB_KEY environment
//! variable (convenient under mpirun/srun, which forward the environment) or
//! in a key file written by `swarmrun keygen` (convenient on a shared
//! filesystem, and it keeps the key out of `ps` and job scripts).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::WireError;

/// Number of random bytes in a job key.
pub const KEY_LEN: usize = 32;

/// The environment variable that carries the key as hex; it wins over a key file.
pub const KEY_ENV: &str = "SWARMRUN_JOB_KEY";

/// A job's shared secret. Its `Debug` output never shows the bytes, so the
/// key cannot leak through a logged config or error.
#[derive(Clone, PartialEq, Eq)]
pub struct JobKey([u8; KEY_LEN]);

impl fmt::Debug for JobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JobKey(<redacted>)")
    }
}

impl JobKey {
    /// Draws a fresh key from the operating system's random source.
    pub fn generate() -> Result<JobKey, WireError> {
        let mut bytes = [0u8; KEY_LEN];
        getrandom::fill(&mut bytes).map_err(WireError::Random)?;
        Ok(JobKey(bytes))
    }

    /// The key as 64 lowercase hex digits, the form users copy around.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits; surrounding whitespace (a trailing newline from
    /// `echo` or a file) is ignored.
    pub fn from_hex(text: &str) -> Result<JobKey, WireError> {
        parse(text, "hex string")
    }

    /// Writes a new key file as hex plus a newline, readable only by its
    /// owner. It never replaces an existing file: overwriting the key of a
    /// running job would lock its ranks out. File and directory are fsynced
    /// so the key survives a crash right after `swarmrun keygen`.
    pub fn write_new(&self, path: &Path) -> Result<(), WireError> {
        let fail = |action, source: io::Error| WireError::KeyFile {
            path: path.to_path_buf(),
            action,
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => WireError::KeyFileExists {
                    path: path.to_path_buf(),
                },
                _ => fail("create", source),
            })?;
        let written = writeln!(file, "{}", self.to_hex()).and_then(|()| file.sync_all());
        if let Err(source) = written {
            // A half-written key file would only fail later, on every rank;
            // removing it lets the user simply run keygen again.
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(fail("write", source));
        }
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| fail("sync the directory of", source))
    }

    /// Reads a key file written by [`JobKey::write_new`].
    pub fn load(path: &Path) -> Result<JobKey, WireError> {
        let text = std::fs::read_to_string(path).map_err(|source| WireError::KeyFile {
            path: path.to_path_buf(),
            action: "read",
            source,
        })?;
        parse(&text, &path.display().to_string())
    }

    /// Finds the job's key: the value of SWARMRUN_JOB_KEY (passed in by the
    /// caller, so this stays testable without touching the process
    /// environment) wins over the key file.
    pub fn resolve(env_value: Option<&str>, file: Option<&Path>) -> Result<JobKey, WireError> {
        match (env_value, file) {
            (Some(text), _) => parse(text, KEY_ENV),
            (None, Some(path)) => JobKey::load(path),
            (None, None) => Err(WireError::NoKey),
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

/// Parses hex key text; `origin` names where it came from for the error.
fn parse(text: &str, origin: &str) -> Result<JobKey, WireError> {
    let mut bytes = [0u8; KEY_LEN];
    hex::decode_to_slice(text.trim(), &mut bytes).map_err(|e| WireError::BadKey {
        origin: origin.to_string(),
        reason: format!("expected {} hex digits: {e}", KEY_LEN * 2),
    })?;
    Ok(JobKey(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn hex_round_trip_preserves_the_key() {
        let key = JobKey::generate().unwrap();
        let text = format!("  {}\n", key.to_hex());
        assert_eq!(JobKey::from_hex(&text).unwrap(), key);
    }

    #[test]
    fn wrong_length_and_non_hex_are_rejected() {
        assert!(matches!(
            JobKey::from_hex("abcd"),
            Err(WireError::BadKey { .. })
        ));
        let not_hex = "zz".repeat(KEY_LEN);
        assert!(matches!(
            JobKey::from_hex(&not_hex),
            Err(WireError::BadKey { .. })
        ));
    }

    #[test]
    fn debug_output_hides_the_key() {
        let key = JobKey::generate().unwrap();
        let shown = format!("{key:?}");
        assert!(!shown.contains(&key.to_hex()[..8]), "{shown}");
    }

    #[test]
    fn key_file_is_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.key");
        let first = JobKey::generate().unwrap();
        first.write_new(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let second = JobKey::generate().unwrap();
        assert!(matches!(
            second.write_new(&path),
            Err(WireError::KeyFileExists { .. })
        ));
        assert_eq!(JobKey::load(&path).unwrap(), first);
    }

    #[test]
    fn environment_value_wins_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.key");
        let in_file = JobKey::generate().unwrap();
        in_file.write_new(&path).unwrap();
        let in_env = JobKey::generate().unwrap();
        let hex = in_env.to_hex();
        assert_eq!(JobKey::resolve(Some(&hex), Some(&path)).unwrap(), in_env);
        assert_eq!(JobKey::resolve(None, Some(&path)).unwrap(), in_file);
    }

    #[test]
    fn missing_key_tells_the_user_how_to_make_one() {
        let err = JobKey::resolve(None, None).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("swarmrun keygen") && text.contains(KEY_ENV),
            "{text}"
        );
    }
}
