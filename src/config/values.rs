//! Scalar values of a job file that are written as strings but used as
//! something richer: rendezvous URLs, fabrics, tasks and byte sizes.
//!
//! Their parsers are public because the command line accepts the same
//! strings (`swarmrun join --rendezvous tcp://...`), and one parser keeps the
//! two spellings from drifting apart.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer};
use thiserror::Error;

/// Where ranks meet to learn each other's addresses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Rendezvous {
    /// `tcp://host:port`: rank 0 listens there, the others connect.
    Tcp { host: String, port: u16 },
    /// `file:///abs/dir`: ranks exchange addresses through files in a
    /// directory every host can see (a shared filesystem).
    File { dir: PathBuf },
    /// `slurm`: the first host of the Slurm step's node list plays rank 0.
    Slurm,
}

/// Why a rendezvous string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "invalid rendezvous `{input}`: {reason} (expected tcp://HOST:PORT, file:///ABS/DIR or slurm)"
)]
pub struct RendezvousError {
    pub input: String,
    pub reason: &'static str,
}

impl FromStr for Rendezvous {
    type Err = RendezvousError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason| RendezvousError {
            input: s.to_string(),
            reason,
        };
        if s == "slurm" {
            return Ok(Rendezvous::Slurm);
        }
        if let Some(dir) = s.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(fail("the directory must be an absolute path"));
            }
            return Ok(Rendezvous::File { dir: dir.into() });
        }
        let Some(addr) = s.strip_prefix("tcp://") else {
            return Err(fail("unknown scheme"));
        };
        let (host, port) = addr.rsplit_once(':').ok_or(fail("missing :PORT"))?;
        // `[::1]:29500` names an IPv6 host; the brackets are not part of it.
        let host = match host.strip_prefix('[') {
            Some(inner) => inner
                .strip_suffix(']')
                .ok_or(fail("unclosed `[` in host"))?,
            None => host,
        };
        if host.is_empty() || host.contains(['/', '[', ']']) {
            return Err(fail("missing or malformed host"));
        }
        // Port 0 is allowed: `swarmrun launch` then picks a free port, as
        // torchrun's --standalone does; `swarmrun rank` refuses it.
        let port: u16 = port
            .parse()
            .map_err(|_| fail("port is not a number in 0..=65535"))?;
        Ok(Rendezvous::Tcp {
            host: host.to_string(),
            port,
        })
    }
}

impl TryFrom<String> for Rendezvous {
    type Error = RendezvousError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for Rendezvous {
    /// Writes the string the rendezvous was parsed from.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rendezvous::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp://[{host}]:{port}")
            }
            Rendezvous::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Rendezvous::File { dir } => write!(f, "file://{}", dir.display()),
            Rendezvous::Slurm => f.write_str("slurm"),
        }
    }
}

impl Default for Rendezvous {
    fn default() -> Self {
        Rendezvous::Tcp {
            host: "127.0.0.1".to_string(),
            port: 29500,
        }
    }
}

/// How ranks of one site talk to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fabric {
    /// Authenticated TCP; works everywhere.
    #[default]
    Tcp,
    /// Shared memory; all of the site's ranks on one host.
    Shm,
    /// An MPI library (cargo feature `mpi`).
    Mpi,
    /// NCCL between GPUs (cargo feature `cuda`).
    Nccl,
}

/// Where a site's miners and validators run their stage passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    /// A CUDA GPU (cargo feature `cuda`): a rank uses GPU `local_rank`
    /// modulo the host's GPUs. Validators replay a GPU miner's passes only
    /// on a GPU, where the replay matches its bits.
    Cuda,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

/// What the ranks of a job do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Smoke job: pass a token around the ring of ranks and exit.
    Hello,
    /// Pipeline-parallel training of the model.
    #[default]
    Train,
    /// `swarmrun bench allreduce`'s ranks: time all-reduce over `[bench]` sizes.
    #[serde(rename = "bench-allreduce")]
    BenchAllreduce,
}

/// `[collective] algorithm`: which all-reduce to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllReduceChoice {
    /// Chosen by message size and world size.
    #[default]
    Auto,
    /// Recursive doubling of the whole buffer (small buffers).
    Doubling,
    /// Rabenseifner: recursive halving, then recursive doubling.
    Butterfly,
    /// Ring reduce-scatter and all-gather.
    Ring,
}

impl fmt::Display for Task {
    /// Writes the name used in job files.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Task::Hello => "hello",
            Task::Train => "train",
            Task::BenchAllreduce => "bench-allreduce",
        })
    }
}

/// Why a byte size string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid size `{0}`: expected an integer with an optional unit B, K, KiB, M, MiB, G or GiB (powers of 1024)")]
pub struct SizeError(pub String);

/// Parses `64MiB`, `512K`, `4096` or `1 GiB` into bytes. K, M and G mean
/// KiB, MiB and GiB: frame limits are about buffers, which come in powers of
/// two, and accepting both spellings with one meaning avoids a 2.4% trap.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let fail = || SizeError(s.to_string());
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    if number.is_empty() {
        return Err(fail());
    }
    let shift = match unit.trim_start() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => return Err(fail()),
    };
    let number: u64 = number.parse().map_err(|_| fail())?;
    number.checked_mul(1 << shift).ok_or_else(fail)
}

/// Deserializes a size written either as an integer (bytes) or as a string
/// for [`parse_size`].
pub(crate) fn deserialize_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    struct SizeVisitor;

    impl de::Visitor<'_> for SizeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte count or a size string like \"64MiB\"")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).map_err(E::custom)
        }
    }

    let bytes = d.deserialize_any(SizeVisitor)?;
    usize::try_from(bytes)
        .map_err(|_| de::Error::custom(format!("{bytes} bytes does not fit in memory")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_strings_parse_and_print_back() {
        for s in [
            "tcp://127.0.0.1:29500",
            "tcp://node01:1",
            "tcp://[::1]:29500",
            "file:///shared/rdv",
            "slurm",
        ] {
            let r: Rendezvous = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(r.to_string(), s);
        }
        assert_eq!(
            "tcp://[::1]:80".parse(),
            Ok(Rendezvous::Tcp {
                host: "::1".into(),
                port: 80
            })
        );
    }

    #[test]
    fn malformed_rendezvous_strings_are_rejected_with_a_reason() {
        for (s, reason) in [
            ("udp://h:1", "unknown scheme"),
            ("tcp://host", "missing :PORT"),
            ("tcp://:29500", "missing or malformed host"),
            ("tcp://h:70000", "port is not a number in 0..=65535"),
            ("tcp://[::1:5", "unclosed `[` in host"),
            ("file://rel/dir", "the directory must be an absolute path"),
            ("", "unknown scheme"),
        ] {
            assert_eq!(
                s.parse::<Rendezvous>().map_err(|e| e.reason),
                Err(reason),
                "{s}"
            );
        }
    }

    #[test]
    fn sizes_accept_bytes_and_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64 M"), Ok(64 << 20));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
    }

    #[test]
    fn sizes_reject_other_units_fractions_and_overflow() {
        for bad in [
            "",
            "MiB",
            "64MB",
            "64mb",
            "1.5GiB",
            "-1",
            "64 MiB extra",
            "99999999999999999999G",
        ] {
            assert_eq!(parse_size(bad), Err(SizeError(bad.to_string())), "{bad}");
        }
    }
}
