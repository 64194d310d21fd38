//! `swarmrun bench wan`: one training job across two sites joined by an
//! emulated wide-area link ([`crate::wan`]): tokens/s with the boundary
//! codec off, at about 8x and at about 128x, each on the unshaped link and
//! on shaped ones, all in one run, in one table.
//!
//! The job file names two sites; ranks of the first run in namespace
//! `NAME-a`, of the second in `NAME-b`, started as `swarmrun rank` with
//! RANK/WORLD_SIZE the way a script or a launcher would. Its `[[site]]
//! stages` decide what crosses the link: the default job keeps each
//! stage's miners (and its all-reduce) in one site, so boundary tensors
//! and the orchestrator's orders are what cross, which is the traffic the
//! codec shrinks. Needs root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use thiserror::Error;
use toml::{Table, Value};

use super::record::Tables;
use super::ChildError;
use crate::config::{self, ConfigError, JobSpec, PlanError, Task};
use crate::wan::{LinkSpec, Sites, WanError, SITE_A};

/// What `swarmrun bench wan` runs (its command-line options).
#[derive(Debug, Clone, clap::Args)]
pub struct WanOptions {
    /// The training job; its first site runs in one namespace, its second
    /// in the other.
    #[arg(long, default_value = "configs/two-sites-wan.toml")]
    pub job: PathBuf,
    /// Windows timed in each run, after the warm-up.
    #[arg(long, default_value_t = 20)]
    pub windows: u64,
    /// Windows run first and not timed.
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// The shaped link's bandwidth each way (tc style).
    #[arg(long, default_value = "100mbit")]
    pub rate: String,
    /// The shaped link's round trip, in milliseconds.
    #[arg(long, default_value_t = 50.0)]
    pub rtt_ms: f64,
    /// Frames lost each way in the lossy column.
    #[arg(long, default_value_t = 0.01)]
    pub loss: f64,
    /// Namespaces NAME-a, NAME-b, NAME-r.
    #[arg(long, default_value = "benchwan")]
    pub name: String,
    /// Only the long-fat-pipe table.
    #[arg(long)]
    pub skip_training: bool,
    /// Lanes (TCP connections per pair of ranks) of the long-fat-pipe
    /// table: one rank in each site all-reduces over a fast, long link;
    /// empty skips it.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub lanes: Vec<usize>,
    /// The long fat pipe's bandwidth each way (tc style).
    #[arg(long, default_value = "1gbit")]
    pub lfp_rate: String,
    /// The long fat pipe's round trip, in milliseconds.
    #[arg(long, default_value_t = 100.0)]
    pub lfp_rtt_ms: f64,
}

#[derive(Debug, Error)]
pub enum BenchWanError {
    #[error("bench wan builds network namespaces: run it as root")]
    NotRoot,
    #[error("{0}: bench wan needs a training job with two [[site]]s")]
    NotTwoSites(PathBuf),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Wan(#[from] WanError),
    #[error(transparent)]
    Child(#[from] ChildError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}: no timed windows in its metrics")]
    NoFigures(PathBuf),
}

/// A boundary codec setting, as `[pipeline.compression]` spells it.
struct Codec {
    label: &'static str,
    table: &'static str,
}

const CODECS: [Codec; 3] = [
    Codec {
        label: "off (f32)",
        table: "",
    },
    Codec {
        label: "8x: bottleneck 64, int8",
        table: "bottleneck = 64\nquant = \"int8\"\n",
    },
    Codec {
        label: "128x: bottleneck 4, int4, zstd",
        table: "bottleneck = 4\nquant = \"int4\"\nzstd = true\n",
    },
];

/// One run's figures.
struct Figures {
    tokens_per_s: f64,
    compression: Option<f64>,
}

/// Runs every codec on every link and prints the table.
pub fn run(opts: &WanOptions, tables: &mut Tables) -> Result<(), BenchWanError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(BenchWanError::NotRoot);
    }
    let spec = config::load(&opts.job)?;
    if spec.job.task != Task::Train || spec.sites.len() != 2 {
        return Err(BenchWanError::NotTwoSites(opts.job.clone()));
    }
    let exe = std::env::current_exe().map_err(|source| BenchWanError::Io {
        what: "finding this executable".into(),
        source,
    })?;
    let dir = tempfile::tempdir().map_err(|source| BenchWanError::Io {
        what: "making a scratch directory".into(),
        source,
    })?;
    let rtt = Duration::from_secs_f64(opts.rtt_ms / 1e3);
    let links = [
        ("unshaped", None, Duration::ZERO, 0.0),
        ("shaped", Some(opts.rate.clone()), rtt, 0.0),
        ("shaped+loss", Some(opts.rate.clone()), rtt, opts.loss),
    ];
    println!(
        "# bench wan: {} across two sites; shaped = {} each way, {} ms round trip; loss = {}% of frames each way",
        opts.job.display(),
        opts.rate,
        opts.rtt_ms,
        opts.loss * 100.0
    );
    println!(
        "# {} timed windows after {} of warm-up; tokens/s over the timed windows",
        opts.windows, opts.warmup
    );
    let p = &spec.pipeline;
    let tokens_per_window =
        (p.microbatches_per_window * p.microbatch_size * spec.model.block_size) as f64;
    let sites = Sites::new(&opts.name)?;
    let mut figures: Vec<Vec<Figures>> = Vec::new();
    let links = if opts.skip_training {
        &links[..0]
    } else {
        &links[..]
    };
    for (i, (name, rate, rtt, loss)) in links.iter().enumerate() {
        let link = LinkSpec {
            rate: rate.clone(),
            rtt: *rtt,
            jitter: Duration::ZERO,
            loss: *loss,
        };
        sites.up(&link, &exe, 1)?;
        let mut row = Vec::new();
        for (c, codec) in CODECS.iter().enumerate() {
            let run_dir = dir.path().join(format!("{name}-{c}"));
            let job = bench_job(opts, codec, &run_dir, 29600 + (i * 10 + c) as u16)?;
            if let Err(e) = run_sites(&sites, &exe, &job, &spec) {
                sites.down();
                return Err(e);
            }
            row.push(read_figures(&run_dir, opts.warmup, tokens_per_window)?);
        }
        sites.down();
        figures.push(row);
    }
    if !figures.is_empty() {
        tables.start(
            format!(
                "{} across two sites; shaped = {} each way, {} ms round trip, loss {}%; tokens/s",
                opts.job.display(),
                opts.rate,
                opts.rtt_ms,
                opts.loss * 100.0
            ),
            &["codec", "ratio", "unshaped", "shaped", "shaped_loss"],
        );
        print_training_table(&figures, tables);
    }
    if !opts.lanes.is_empty() {
        tables.start(
            format!(
                "all-reduce between the sites over {} each way, {} ms round trip",
                opts.lfp_rate, opts.lfp_rtt_ms
            ),
            &[
                "lanes",
                "bytes",
                "time_us",
                "algbw_gbps",
                "busbw_gbps",
                "wrong",
            ],
        );
        lanes_table(opts, &sites, &exe, dir.path(), tables)?;
    }
    Ok(())
}

fn print_training_table(figures: &[Vec<Figures>], tables: &mut Tables) {
    println!(
        "{:<32} {:>8} {:>12} {:>20} {:>20}",
        "boundary codec", "ratio", "unshaped", "shaped", "shaped+loss"
    );
    for (c, codec) in CODECS.iter().enumerate() {
        let base = figures[0][c].tokens_per_s;
        let cell = |f: &Figures| format!("{:.0} ({:.2}x)", f.tokens_per_s, f.tokens_per_s / base);
        println!(
            "{:<32} {:>8} {:>12.0} {:>20} {:>20}",
            codec.label,
            figures[0][c]
                .compression
                .map_or_else(|| "1.0x".to_string(), |r| format!("{r:.1}x")),
            base,
            cell(&figures[1][c]),
            cell(&figures[2][c]),
        );
        tables.row(vec![
            codec.label.into(),
            figures[0][c].compression.unwrap_or(1.0).into(),
            base.into(),
            figures[1][c].tokens_per_s.into(),
            figures[2][c].tokens_per_s.into(),
        ]);
    }
}

/// One rank in each site all-reduces f32 buffers over the long fat pipe,
/// with each lane count: the nccl-tests rows of rank 0, per lane count.
fn lanes_table(
    opts: &WanOptions,
    sites: &Sites,
    exe: &Path,
    dir: &Path,
    tables: &mut Tables,
) -> Result<(), BenchWanError> {
    let link = LinkSpec {
        rate: Some(opts.lfp_rate.clone()),
        rtt: Duration::from_secs_f64(opts.lfp_rtt_ms / 1e3),
        jitter: Duration::ZERO,
        loss: 0.0,
    };
    println!(
        "#\n# all-reduce between the sites, one rank each, over {} each way and {} ms round trip,\n\
         # large messages striped over [network] lanes TCP connections per pair\n\
         # lanes        size        count   type  redop   time(us)   algbw    busbw  #wrong",
        opts.lfp_rate, opts.lfp_rtt_ms
    );
    sites.up(&link, exe, 1)?;
    let result = (|| {
        for (i, &lanes) in opts.lanes.iter().enumerate() {
            let job = dir.join(format!("lanes-{lanes}.toml"));
            let text = format!(
                "[job]\nname = \"bench-wan-lanes\"\ntask = \"bench-allreduce\"\n\n\
                 [[site]]\nname = \"a\"\nhosts = \"site-a\"\n\n\
                 [[site]]\nname = \"b\"\nhosts = \"site-b\"\n\n\
                 [network]\nrendezvous = \"tcp://{SITE_A}:{port}\"\ncollective_timeout_s = 300.0\nlanes = {lanes}\n\n\
                 [bench]\nmin_bytes = \"16MiB\"\nmax_bytes = \"64MiB\"\niters = 3\nwarmup = 1\n",
                port = 29700 + i
            );
            std::fs::write(&job, text).map_err(|source| BenchWanError::Io {
                what: format!("writing {}", job.display()),
                source,
            })?;
            let spec = config::load(&job)?;
            let rank0 = run_sites(sites, exe, &job, &spec)?;
            for row in rank0
                .lines()
                .filter_map(|l| l.split_once(super::allreduce::ROW_MARK))
            {
                println!("{lanes:>7} {}", row.1);
                let mut recorded = super::allreduce::recorded(row.1);
                recorded.insert(0, lanes.into());
                tables.row(recorded);
            }
        }
        Ok(())
    })();
    sites.down();
    result
}

/// The job file of one run: the user's job with the codec, the windows,
/// no evaluation or checkpoints, its own run directory, and the
/// rendezvous in site a.
fn bench_job(
    opts: &WanOptions,
    codec: &Codec,
    run_dir: &Path,
    port: u16,
) -> Result<PathBuf, BenchWanError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| BenchWanError::Io { what, source }
    };
    let text = std::fs::read_to_string(&opts.job).map_err(io("reading the job file"))?;
    let mut table: Table = text
        .parse()
        .map_err(|e: toml::de::Error| BenchWanError::Io {
            what: format!("parsing {}", opts.job.display()),
            source: std::io::Error::other(e.to_string()),
        })?;
    let section = |table: &mut Table, name: &str| -> Table {
        table
            .remove(name)
            .and_then(|v| v.as_table().cloned())
            .unwrap_or_default()
    };
    let mut job = section(&mut table, "job");
    job.insert(
        "run_dir".into(),
        Value::String(run_dir.display().to_string()),
    );
    table.insert("job".into(), Value::Table(job));
    let mut pipeline = section(&mut table, "pipeline");
    let compression: Table = codec.table.parse().unwrap_or_default();
    pipeline.insert("compression".into(), Value::Table(compression));
    table.insert("pipeline".into(), Value::Table(pipeline));
    let mut train = section(&mut table, "train");
    let windows = (opts.warmup + opts.windows) as i64;
    for (key, value) in [
        ("windows", windows),
        ("eval_every", windows + 1),
        ("checkpoint_every", 0),
        ("warmup_windows", 1),
    ] {
        train.insert(key.into(), Value::Integer(value));
    }
    table.insert("train".into(), Value::Table(train));
    let mut network = section(&mut table, "network");
    network.insert(
        "rendezvous".into(),
        Value::String(format!("tcp://{SITE_A}:{port}")),
    );
    table.insert("network".into(), Value::Table(network));
    let path = run_dir.with_extension("toml");
    std::fs::create_dir_all(run_dir).map_err(io("making the run directory"))?;
    std::fs::write(&path, toml::to_string(&table).unwrap_or_default())
        .map_err(io("writing the job file"))?;
    Ok(path)
}

/// Starts every rank of `job` in its site's namespace, waits for all, and
/// returns rank 0's output.
fn run_sites(
    sites: &Sites,
    exe: &Path,
    job: &Path,
    spec: &JobSpec,
) -> Result<String, BenchWanError> {
    let plan = spec.plan(None)?;
    let key = crate::wire::JobKey::generate().map_err(|e| BenchWanError::Io {
        what: "making a job key".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let size = plan.ranks.len().to_string();
    let mut ranks: Vec<(usize, Child)> = Vec::new();
    for r in &plan.ranks {
        let ns = if r.site == spec.sites[0].name {
            'a'
        } else {
            'b'
        };
        let child = Command::new("ip")
            .args(["netns", "exec", &sites.namespace(ns)])
            .arg(exe)
            .arg("rank")
            .arg(job)
            .env("RANK", r.rank.to_string())
            .env("WORLD_SIZE", &size)
            .env("LOCAL_RANK", r.local_rank.to_string())
            .env("SWARMRUN_JOB_KEY", key.to_hex())
            .env("CANDLE_NUM_THREADS", "1")
            .env_remove("SWARMRUN_RENDEZVOUS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ChildError::Start {
                what: format!("rank {} in {}", r.rank, sites.namespace(ns)),
                source,
            })?;
        ranks.push((r.rank, child));
    }
    let mut failed = None;
    let mut rank0 = String::new();
    for (rank, child) in ranks {
        let out = child
            .wait_with_output()
            .map_err(|source| BenchWanError::Io {
                what: format!("waiting for rank {rank}"),
                source,
            })?;
        if rank == 0 {
            rank0 = String::from_utf8_lossy(&out.stdout).into_owned();
        }
        if !out.status.success() && failed.is_none() {
            let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            failed = Some(ChildError::Failed {
                what: format!("rank {rank} of {}", job.display()),
                status: out.status,
                tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            });
        }
    }
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(rank0),
    }
}

/// Tokens/s over the windows after `warmup` (each window trains
/// `tokens_per_window` tokens), and the boundary ratio.
fn read_figures(
    run_dir: &Path,
    warmup: u64,
    tokens_per_window: f64,
) -> Result<Figures, BenchWanError> {
    #[derive(serde::Deserialize)]
    struct Line {
        window: u64,
        elapsed_s: f64,
        compression: Option<f64>,
    }
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|source| BenchWanError::Io {
        what: format!("reading {}", path.display()),
        source,
    })?;
    let lines: Vec<Line> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    // The clock starts when the last warm-up window ends.
    let start = lines.iter().find(|l| l.window + 1 == warmup);
    let timed = lines.iter().filter(|l| l.window >= warmup).count();
    let (Some(start), Some(end)) = (start, lines.last()) else {
        return Err(BenchWanError::NoFigures(path));
    };
    let seconds = end.elapsed_s - start.elapsed_s;
    if timed == 0 || seconds <= 0.0 {
        return Err(BenchWanError::NoFigures(path));
    }
    Ok(Figures {
        tokens_per_s: timed as f64 * tokens_per_window / seconds,
        compression: end.compression,
    })
}
