//! `swarmrun bench allreduce`: the nccl-tests table for our all-reduce over
//! TCP, shared memory or MPI, and for OpenMPI's own `MPI_Allreduce`.
//!
//! The driver (`run`) measures memcpy bandwidth, the physical limit, then
//! starts the ranks of a generated job (`task = "bench-allreduce"`) for each
//! transport asked for: `swarmrun launch` for tcp and shm, `mpirun` for mpi.
//! Rank 0 prints the table's rows; the driver relays them under one header.
//!
//! The ranks (`run_rank`) time each size nccl-tests' way: the slowest rank's
//! average over `iters` calls after `warmup` ones. Inputs are small
//! integers whose sum is known exactly, so `#wrong` counts real errors, not
//! rounding.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use thiserror::Error;

use super::record::Tables;
use crate::collective::{self, AllReduceAlgorithm, Call, CollectiveError, ReduceOp};
use crate::config::{AllReduceChoice, BenchSpec, Fabric};
use crate::launch::free_port;
use crate::transport::Transport;
use crate::wire::{JobKey, WireError, KEY_ENV};

#[derive(Debug, Error)]
pub enum BenchAllreduceError {
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error("bench allreduce: {0}")]
    Io(#[from] std::io::Error),
    #[error("{what} failed ({status}); its last lines:\n{tail}")]
    Failed {
        what: String,
        status: std::process::ExitStatus,
        tail: String,
    },
    #[error("transport {0:?} is not one of tcp, tcp-sealed, shm, shm-registered, mpi, mpi-tcp")]
    UnknownTransport(String),
    #[error("job key: {0}")]
    Key(#[from] WireError),
    #[error("--transport mpi needs a binary built with `--features mpi`")]
    NoMpiFeature,
}

/// Tags of the benchmark's collectives.
const TAG_BENCH: u64 = 0x4245_4e43_4800_0000;

/// Per-size figures, as nccl-tests prints them.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    pub bytes: usize,
    pub time_us: f64,
    pub wrong: u64,
}

impl Row {
    /// GB/s (1e9 bytes) of the user's buffer.
    pub fn algbw(&self) -> f64 {
        self.bytes as f64 / self.time_us / 1e3
    }

    /// algbw x 2(n-1)/n: what each link carried, comparable across n.
    pub fn busbw(&self, n: usize) -> f64 {
        self.algbw() * 2.0 * (n as f64 - 1.0) / n as f64
    }

    pub fn format(&self, n: usize) -> String {
        format!(
            "{:>12} {:>12} {:>6} {:>6} {:>10.1} {:>8.3} {:>8.3} {:>7}",
            self.bytes,
            self.bytes / 4,
            "float",
            "sum",
            self.time_us,
            self.algbw(),
            self.busbw(n),
            self.wrong
        )
    }
}

pub const TABLE_HEADER: &str = "#        size        count   type  redop   time(us)   algbw   busbw  #wrong\n#         (B)   (elements)                             (GB/s)  (GB/s)";

/// Sizes from `min` doubling to `max` (both rounded to whole f32s).
fn sizes(spec: &BenchSpec) -> impl Iterator<Item = usize> {
    let max = spec.max_bytes / 4 * 4;
    std::iter::successors(Some((spec.min_bytes / 4).max(1) * 4), move |b| {
        b.checked_mul(2).filter(|n| *n <= max)
    })
}

/// Rank `r`'s input: small integers, so every sum is exact in f32.
fn input(rank: usize, count: usize) -> Vec<f32> {
    (0..count)
        .map(|i| ((rank + 1) * (i % 7 + 1)) as f32)
        .collect()
}

/// The exact sum of all ranks' inputs at index `i`.
fn expected(size: usize, i: usize) -> f32 {
    ((i % 7 + 1) * size * (size + 1) / 2) as f32
}

/// One all-reduce implementation under test.
pub trait AllReduceUnderTest {
    /// Out of place; its result is checked.
    fn all_reduce(&self, input: &[f32], output: &mut [f32]) -> Result<(), CollectiveError>;
    /// What the timing loop calls: the same, unless the implementation
    /// keeps its data elsewhere (registered buffers).
    fn timed(&self, input: &[f32], output: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce(input, output)
    }
}

/// Our all-reduce over any transport.
pub struct Ours<'a, T: ?Sized> {
    pub transport: &'a T,
    pub algorithm: AllReduceAlgorithm,
}

impl<T: Transport + ?Sized> AllReduceUnderTest for Ours<'_, T> {
    fn all_reduce(&self, input: &[f32], output: &mut [f32]) -> Result<(), CollectiveError> {
        collective::all_reduce_into(
            Call::new(self.transport, TAG_BENCH),
            input,
            output,
            ReduceOp::Sum,
            self.algorithm,
        )
    }
}

pub fn algorithm(choice: AllReduceChoice) -> AllReduceAlgorithm {
    match choice {
        AllReduceChoice::Auto => AllReduceAlgorithm::Auto,
        AllReduceChoice::Doubling => AllReduceAlgorithm::Doubling,
        AllReduceChoice::Butterfly => AllReduceAlgorithm::Butterfly,
        AllReduceChoice::Ring => AllReduceAlgorithm::Ring,
    }
}

/// Our shared-memory fast path.
pub struct ShmFast<'a>(pub &'a crate::transport::shm::ShmTransport);

impl AllReduceUnderTest for ShmFast<'_> {
    fn all_reduce(&self, input: &[f32], output: &mut [f32]) -> Result<(), CollectiveError> {
        collective::all_reduce_shm_into(self.0, input, output, ReduceOp::Sum)
    }
}

/// Our shared-memory all-reduce on registered buffers: the data lives in
/// the segment (as gradients written there in place would), so the timed
/// call copies nothing in or out, like nccl-tests' in-place run on buffers
/// NCCL can reach directly. The checked call copies the input in and the
/// result out, so `#wrong` still tests the same reduction.
pub struct ShmRegistered<'a>(pub &'a crate::transport::shm::ShmTransport);

impl AllReduceUnderTest for ShmRegistered<'_> {
    fn all_reduce(&self, input: &[f32], output: &mut [f32]) -> Result<(), CollectiveError> {
        let mut shared = self.0.shared_buffer(std::mem::size_of_val(input))?;
        shared
            .as_mut_slice()
            .copy_from_slice(bytemuck::cast_slice(input));
        let reduced = collective::all_reduce_shared::<f32>(shared, ReduceOp::Sum)?;
        bytemuck::cast_slice_mut(output).copy_from_slice(&reduced);
        Ok(())
    }

    fn timed(&self, input: &[f32], _output: &mut [f32]) -> Result<(), CollectiveError> {
        let shared = self.0.shared_buffer(std::mem::size_of_val(input))?;
        let reduced = collective::all_reduce_shared::<f32>(shared, ReduceOp::Sum)?;
        std::hint::black_box(&reduced[..]);
        Ok(())
    }
}

/// OpenMPI's `MPI_Allreduce`, the reference.
#[cfg(feature = "mpi")]
pub struct MpiNative<'a>(pub &'a crate::transport::mpi::MpiTransport);

#[cfg(feature = "mpi")]
impl AllReduceUnderTest for MpiNative<'_> {
    fn all_reduce(&self, input: &[f32], output: &mut [f32]) -> Result<(), CollectiveError> {
        self.0.mpi_all_reduce_sum_f32(input, output);
        Ok(())
    }
}

/// Most timed calls one size gets, however fast a call is.
const MAX_ITERS: usize = 100_000;

/// How many timed calls a size gets: `spec.iters`, or as many more as fill
/// `spec.min_time_ms` at the pace of one call timed on each rank (the
/// slowest rank's, so that every rank makes the same number).
fn iterations<T: Transport + ?Sized>(
    t: &T,
    spec: &BenchSpec,
    under_test: &dyn AllReduceUnderTest,
    src: &[f32],
    out: &mut [f32],
) -> Result<usize, BenchAllreduceError> {
    if spec.min_time_ms == 0 {
        return Ok(spec.iters);
    }
    let start = Instant::now();
    under_test.timed(src, out)?;
    let mut once = [start.elapsed().as_secs_f32()];
    collective::all_reduce(
        Call::new(t, TAG_BENCH + 32),
        &mut once,
        ReduceOp::Max,
        AllReduceAlgorithm::Auto,
    )?;
    let wanted = (spec.min_time_ms as f32 / 1e3 / once[0].max(1e-7)).ceil() as usize;
    Ok(wanted.clamp(spec.iters.max(1), MAX_ITERS.max(spec.iters)))
}

/// Times every size on every rank; returns the rows (the same on all ranks).
pub fn run_rank<T: Transport + ?Sized>(
    t: &T,
    spec: &BenchSpec,
    under_test: &dyn AllReduceUnderTest,
    mut print: impl FnMut(&Row),
) -> Result<Vec<Row>, BenchAllreduceError> {
    let (rank, size) = (t.rank(), t.size());
    let mut rows = Vec::new();
    for bytes in sizes(spec) {
        let count = bytes / 4;
        let src = input(rank, count);
        let mut out = vec![0f32; count];
        for _ in 0..spec.warmup {
            under_test.timed(&src, &mut out)?;
        }
        let iters = iterations(t, spec, under_test, &src, &mut out)?;
        collective::barrier(Call::new(t, TAG_BENCH + 8))?;
        let start = Instant::now();
        for _ in 0..iters {
            under_test.timed(&src, &mut out)?;
        }
        let mut stats = [start.elapsed().as_secs_f32() * 1e6 / iters as f32];
        // The slowest rank sets the time, as in nccl-tests.
        collective::all_reduce(
            Call::new(t, TAG_BENCH + 16),
            &mut stats,
            ReduceOp::Max,
            AllReduceAlgorithm::Auto,
        )?;
        under_test.all_reduce(&src, &mut out)?;
        let wrong_here = out
            .iter()
            .enumerate()
            .filter(|(i, v)| **v != expected(size, *i))
            .count();
        let mut wrong = [wrong_here.min(i32::MAX as usize) as i32];
        collective::all_reduce(
            Call::new(t, TAG_BENCH + 24),
            &mut wrong,
            ReduceOp::Sum,
            AllReduceAlgorithm::Auto,
        )?;
        let row = Row {
            bytes,
            time_us: f64::from(stats[0]),
            wrong: wrong[0].max(0) as u64,
        };
        print(&row);
        rows.push(row);
    }
    Ok(rows)
}

/// What the driver was asked.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    pub nprocs: usize,
    pub transports: Vec<String>,
    pub spec: BenchSpec,
    pub algorithm: AllReduceChoice,
    /// Times each transport is measured, the transports taking turns;
    /// each size's row is then its median-time round's.
    pub rounds: u32,
}

/// The driver: memcpy, then one table per transport.
pub fn run(opts: &DriverOptions, tables: &mut Tables) -> Result<(), BenchAllreduceError> {
    let exe = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let memcpy_bytes = opts.spec.max_bytes.min(256 << 20);
    println!(
        "# swarmrun bench allreduce: {} ranks on one host, at least {} iters and {} ms per size \
         after {} warm-up, algorithm {:?}",
        opts.nprocs, opts.spec.iters, opts.spec.min_time_ms, opts.spec.warmup, opts.algorithm
    );
    println!(
        "# memcpy (1 thread, {} MiB): {:.2} GB/s",
        memcpy_bytes >> 20,
        super::record::memcpy_gbps(memcpy_bytes)
    );
    let setups = opts
        .transports
        .iter()
        .map(|name| Setup::new(name, opts, dir.path()))
        .collect::<Result<Vec<_>, _>>()?;
    if opts.rounds <= 1 {
        for setup in &setups {
            setup.start_table(opts, tables);
            relay_rank0(setup.command(&exe, opts)?, setup.label, |row| {
                print_row(row, tables)
            })?;
        }
        return Ok(());
    }
    // Every transport once a round, in turn, so that a host slowing down
    // for a while weighs on each alike.
    let mut measured: Vec<Vec<Vec<String>>> = vec![Vec::new(); setups.len()];
    for _ in 0..opts.rounds {
        for (setup, rounds) in setups.iter().zip(&mut measured) {
            let mut rows = Vec::new();
            relay_rank0(setup.command(&exe, opts)?, setup.label, |row| {
                rows.push(row.to_string())
            })?;
            rounds.push(rows);
        }
    }
    println!(
        "#\n# {} rounds, the transports taking turns; each size's row is its median-time round's",
        opts.rounds
    );
    for (setup, rounds) in setups.iter().zip(&measured) {
        setup.start_table(opts, tables);
        for row in median_rows(rounds) {
            print_row(row, tables);
        }
    }
    Ok(())
}

/// Prints a table row under its transport's header and records it.
fn print_row(row: &str, tables: &mut Tables) {
    println!("{row}");
    tables.row(recorded(row));
}

/// For each size, the row whose time is the median of the rounds' (the
/// lower of the middle two for an even count).
fn median_rows(rounds: &[Vec<String>]) -> Vec<&str> {
    let sizes = rounds.iter().map(Vec::len).min().unwrap_or(0);
    let time = |row: &str| {
        row.split_whitespace()
            .nth(4)
            .and_then(|t| t.parse::<f64>().ok())
            .unwrap_or(f64::INFINITY)
    };
    (0..sizes)
        .filter_map(|k| {
            let rows: Vec<&str> = rounds.iter().map(|r| r[k].as_str()).collect();
            super::lower_median_by(rows, |row| time(row))
        })
        .collect()
}

/// One transport's measurement: its job file and how its ranks start.
struct Setup {
    name: String,
    label: &'static str,
    fabric: Fabric,
    job: std::path::PathBuf,
}

impl Setup {
    /// Checks `name` and writes its job file into `dir`.
    fn new(name: &str, opts: &DriverOptions, dir: &Path) -> Result<Setup, BenchAllreduceError> {
        let (fabric, label) = match name {
            "tcp" => (
                Fabric::Tcp,
                "ours over TCP (loopback: frames unsealed after the handshake)",
            ),
            "tcp-sealed" => (
                Fabric::Tcp,
                "ours over TCP, every frame sealed (AES-256-GCM) as between hosts",
            ),
            "shm" => (
                Fabric::Shm,
                "ours over shared memory (out of place: copy in, reduce, copy out)",
            ),
            "shm-registered" => (
                Fabric::Shm,
                "ours over shared memory, registered buffers (in place, nothing copied)",
            ),
            "mpi" if cfg!(feature = "mpi") => (Fabric::Mpi, "OpenMPI MPI_Allreduce"),
            "mpi-tcp" if cfg!(feature = "mpi") => (
                Fabric::Mpi,
                "OpenMPI MPI_Allreduce over TCP (--mca btl tcp,self, loopback)",
            ),
            "mpi" | "mpi-tcp" => return Err(BenchAllreduceError::NoMpiFeature),
            other => return Err(BenchAllreduceError::UnknownTransport(other.to_string())),
        };
        let job = dir.join(format!("bench-allreduce-{name}.toml"));
        // Registering a buffer needs a chunk as large as the largest size.
        let registered = name == "shm-registered";
        let shm_chunk = if registered {
            opts.spec.max_bytes.next_multiple_of(4096)
        } else {
            1 << 20
        };
        let sealed = name == "tcp-sealed";
        std::fs::write(&job, job_text(opts, fabric, shm_chunk, registered, sealed))?;
        Ok(Setup {
            name: name.to_string(),
            label,
            fabric,
            job,
        })
    }

    /// Prints the transport's header and starts its recorded table.
    fn start_table(&self, opts: &DriverOptions, tables: &mut Tables) {
        println!("#\n# {}\n{TABLE_HEADER}", self.label);
        tables.start(
            format!("{}: {}, {} ranks", self.name, self.label, opts.nprocs),
            &["bytes", "time_us", "algbw_gbps", "busbw_gbps", "wrong"],
        );
    }

    /// The command that runs the transport's ranks once.
    fn command(&self, exe: &Path, opts: &DriverOptions) -> Result<Command, BenchAllreduceError> {
        if self.fabric == Fabric::Mpi {
            // OpenMPI's own TCP path, the reference for ours over TCP: its
            // default between ranks of one host is shared memory.
            let btl: &[&str] = match self.name.as_str() {
                "mpi-tcp" => &MCA_TCP_ONLY,
                _ => &[],
            };
            return Ok(mpirun(
                exe,
                &self.job,
                (opts.nprocs, btl),
                &JobKey::generate()?,
            )?);
        }
        let mut c = Command::new(exe);
        c.arg("launch")
            .arg("-n")
            .arg(opts.nprocs.to_string())
            .arg(&self.job);
        Ok(c)
    }
}

fn job_text(
    opts: &DriverOptions,
    fabric: Fabric,
    shm_chunk: usize,
    registered: bool,
    seal_loopback: bool,
) -> String {
    let fabric = match fabric {
        Fabric::Tcp => "tcp",
        Fabric::Shm => "shm",
        Fabric::Mpi => "mpi",
        Fabric::Nccl => "nccl",
    };
    let algorithm = match opts.algorithm {
        AllReduceChoice::Auto => "auto",
        AllReduceChoice::Doubling => "doubling",
        AllReduceChoice::Butterfly => "butterfly",
        AllReduceChoice::Ring => "ring",
    };
    format!(
        "[job]\nname = \"bench-allreduce\"\ntask = \"bench-allreduce\"\n\n\
         [[site]]\nname = \"local\"\nhosts = \"localhost\"\nranks_per_host = {n}\nfabric = \"{fabric}\"\n\n\
         [network]\nrendezvous = \"tcp://127.0.0.1:0\"\nmax_frame = \"64MiB\"\ncollective_timeout_s = 300.0\nshm_chunk = {shm_chunk}\n\
         seal_loopback = {seal_loopback}\n\n\
         [collective]\nalgorithm = \"{algorithm}\"\n\n\
         [bench]\nmin_bytes = {min}\nmax_bytes = {max}\niters = {iters}\nwarmup = {warmup}\n\
         min_time_ms = {min_time_ms}\nregistered = {registered}\n",
        n = opts.nprocs,
        min = opts.spec.min_bytes,
        max = opts.spec.max_bytes,
        iters = opts.spec.iters,
        warmup = opts.spec.warmup,
        min_time_ms = opts.spec.min_time_ms,
    )
}

/// mpirun's options that leave OpenMPI only its TCP path, over loopback
/// (which its TCP transport leaves out unless told).
const MCA_TCP_ONLY: [&str; 6] = [
    "--mca",
    "btl",
    "tcp,self",
    "--mca",
    "btl_tcp_if_include",
    "lo",
];

/// `mpirun` of our ranks; the key travels in the environment (`-x`), as a
/// user would pass it.
fn mpirun(
    exe: &Path,
    job: &Path,
    (nprocs, mca): (usize, &[&str]),
    key: &JobKey,
) -> std::io::Result<Command> {
    let mut c = super::mpirun(nprocs);
    c.args(mca)
        .env(KEY_ENV, key.to_hex())
        .args(["-x", KEY_ENV])
        .arg(exe)
        .arg("rank")
        .arg("--rdzv")
        .arg(format!("tcp://127.0.0.1:{}", free_port("127.0.0.1")?))
        .arg(job);
    Ok(c)
}

/// Prints the table rows rank 0 writes (`BENCH ` lines), prefix removed,
/// and records them.
fn relay_rank0(
    mut cmd: Command,
    what: &str,
    mut on_row: impl FnMut(&str),
) -> Result<(), BenchAllreduceError> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let mut tail: Vec<String> = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            match line.split_once(ROW_MARK) {
                Some((_, row)) => on_row(row),
                None => {
                    tail.push(line);
                    if tail.len() > 20 {
                        tail.remove(0);
                    }
                }
            }
        }
    }
    let err = child.wait_with_output()?;
    if !err.status.success() {
        tail.extend(
            String::from_utf8_lossy(&err.stderr)
                .lines()
                .map(String::from),
        );
        let start = tail.len().saturating_sub(30);
        return Err(BenchAllreduceError::Failed {
            what: what.to_string(),
            status: err.status,
            tail: tail[start..].join("\n"),
        });
    }
    Ok(())
}

/// A printed row ([`Row::format`]) as recorded: bytes, time, algbw,
/// busbw, wrong (count, type and op are implied).
pub(super) fn recorded(row: &str) -> Vec<serde_json::Value> {
    let cells: Vec<&str> = row.split_whitespace().collect();
    let number = |i: usize| {
        let cell = cells.get(i).copied().unwrap_or_default();
        match (cell.parse::<u64>(), cell.parse::<f64>()) {
            (Ok(n), _) => n.into(),
            (_, Ok(x)) => x.into(),
            _ => serde_json::Value::Null,
        }
    };
    vec![number(0), number(4), number(5), number(6), number(7)]
}

/// Rank 0 marks table rows so the driver finds them among other output.
pub const ROW_MARK: &str = "BENCH ";

#[cfg(test)]
mod tests {
    use super::*;

    fn row(bytes: usize, time_us: f64) -> String {
        Row {
            bytes,
            time_us,
            wrong: 0,
        }
        .format(4)
    }

    #[test]
    fn each_size_takes_its_own_median_round() {
        let rounds = vec![
            vec![row(1024, 30.0), row(2048, 9.0)],
            vec![row(1024, 10.0), row(2048, 7.0)],
            vec![row(1024, 20.0), row(2048, 8.0)],
        ];
        let medians = median_rows(&rounds);
        assert_eq!(medians, [rounds[2][0].as_str(), rounds[2][1].as_str()]);
        // Of two, the faster: the lower of the middle two.
        assert_eq!(median_rows(&rounds[..2])[0], rounds[1][0]);
    }
}
