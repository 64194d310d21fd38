//! What `swarmrun bench ... --json FILE` writes: the bench's tables as
//! data beside the machine they were measured on, so `launch/bench.sh`
//! can rebuild BENCHMARKS.md from files instead of pasted text.
//!
//! The printed tables stay as each bench formats them for a person; the
//! tables here have stable snake_case column keys (units in the key:
//! `busbw_gbps`, `time_us`) for scripts, and render as Markdown.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

/// Why a record could not be read or a report written.
#[derive(Debug, Error)]
pub enum RecordError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a bench record: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Chart(#[from] crate::plot::PlotError),
}

/// An I/O error on `path`, for `map_err`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RecordError + '_ {
    move |source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One bench's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// `allreduce`, `train`, ...
    pub bench: String,
    /// The command line, as run.
    pub command: Vec<String>,
    pub machine: Machine,
    /// Seconds since the Unix epoch when it started, and how long it ran.
    pub started_unix_s: u64,
    pub seconds: f64,
    pub tables: Vec<Table>,
}

/// One table: a title (what was measured and how), column keys, rows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

/// The facts a reader needs to compare two runs of a bench.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub host: String,
    pub cores: usize,
    pub cpu: String,
    pub memory_gib: f64,
    pub kernel: String,
    /// One thread's memcpy of 256 MiB, measured in this run: the scale
    /// every bandwidth in the tables is read against.
    pub memcpy_gbps: f64,
    pub swarmrun: String,
    pub features: Vec<String>,
}

/// The tables a bench fills as it measures.
#[derive(Debug, Default)]
pub struct Tables {
    tables: Vec<Table>,
}

impl Tables {
    /// Starts a table; rows go to the newest one.
    pub fn start(&mut self, title: impl Into<String>, columns: &[&str]) {
        self.tables.push(Table {
            title: title.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
        });
    }

    /// Adds a row to the newest table (one started by default when none
    /// was).
    pub fn row(&mut self, values: Vec<Value>) {
        if self.tables.is_empty() {
            self.start("", &[]);
        }
        if let Some(t) = self.tables.last_mut() {
            t.rows.push(values);
        }
    }

    pub fn into_tables(self) -> Vec<Table> {
        self.tables
    }
}

impl Machine {
    /// This machine, with its memcpy bandwidth measured now.
    pub fn measure() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |text: &str, key: &str| -> Option<String> {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        let memory_kib: f64 = field(&meminfo, "MemTotal")
            .and_then(|v| v.trim_end_matches(" kB").parse().ok())
            .unwrap_or(0.0);
        let mut features = Vec::new();
        for (on, name) in [
            (cfg!(feature = "mpi"), "mpi"),
            (cfg!(feature = "cuda"), "cuda"),
            (cfg!(feature = "hwloc"), "hwloc"),
        ] {
            if on {
                features.push(name.to_string());
            }
        }
        Machine {
            host: crate::world::hostname(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
            memory_gib: memory_kib / (1024.0 * 1024.0),
            kernel: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            memcpy_gbps: memcpy_gbps(256 << 20),
            swarmrun: env!("CARGO_PKG_VERSION").to_string(),
            features,
        }
    }

    /// One line for a reader: `2 cores, AMD EPYC ..., 24 GiB, memcpy 9.1 GB/s`.
    pub fn summary(&self) -> String {
        format!(
            "{}: {} cores, {}, {:.0} GiB, Linux {}, memcpy {:.1} GB/s (1 thread)",
            self.host, self.cores, self.cpu, self.memory_gib, self.kernel, self.memcpy_gbps
        )
    }
}

/// One thread's memcpy bandwidth: the best of 5 copies of `bytes`.
pub fn memcpy_gbps(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        best = best.min(t.elapsed());
        std::hint::black_box(&dst);
    }
    bytes as f64 / best.as_secs_f64() / 1e9
}

impl Record {
    /// The record of bench `bench` run as `command`, started at `started`.
    pub fn new(bench: &str, command: Vec<String>, started: SystemTime, tables: Tables) -> Record {
        Record {
            bench: bench.to_string(),
            command,
            machine: Machine::measure(),
            started_unix_s: started
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            seconds: started.elapsed().map_or(0.0, |d| d.as_secs_f64()),
            tables: tables.into_tables(),
        }
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        crate::fsutil::write_atomic(path, text.as_bytes())
    }

    pub fn read(path: &Path) -> Result<Record, RecordError> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        serde_json::from_str(&text).map_err(|source| RecordError::Json {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The record as Markdown: the command, the machine, each table.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "```\n$ {}\n```", self.command.join(" "));
        let _ = writeln!(
            out,
            "Measured on {}; took {:.0} s.\n",
            self.machine.summary(),
            self.seconds
        );
        for t in &self.tables {
            if !t.title.is_empty() {
                let _ = writeln!(out, "{}\n", t.title);
            }
            let _ = writeln!(out, "| {} |", t.columns.join(" | "));
            let _ = writeln!(out, "|{}", "---:|".repeat(t.columns.len()));
            for row in &t.rows {
                let cells: Vec<String> = row.iter().map(cell).collect();
                let _ = writeln!(out, "| {} |", cells.join(" | "));
            }
            out.push('\n');
        }
        out
    }
}

/// A value as a table cell: numbers to at most 4 significant decimals.
fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Number(n) if n.is_f64() => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            match x.abs() {
                a if a >= 100.0 => format!("{x:.1}"),
                a if a >= 1.0 => format!("{x:.3}"),
                _ => format!("{x:.4}"),
            }
        }
        other => other.to_string(),
    }
}

/// Replaces, in `doc`, the text between `<!-- bench NAME -->` and
/// `<!-- /bench NAME -->` with `text`; the rest of the document (the
/// prose around the tables) stays. Returns `None` without the markers.
pub fn replace_section(doc: &str, name: &str, text: &str) -> Option<String> {
    let open = format!("<!-- bench {name} -->");
    let close = format!("<!-- /bench {name} -->");
    let start = doc.find(&open)? + open.len();
    let end = start + doc[start..].find(&close)?;
    Some(format!("{}\n{}{}", &doc[..start], text, &doc[end..]))
}

/// What `swarmrun bench report` did.
#[derive(Debug, Default)]
pub struct Reported {
    /// Sections of the document replaced, by bench.
    pub replaced: Vec<String>,
    /// Records with no section of their own in the document.
    pub unplaced: Vec<String>,
    /// Charts drawn.
    pub charts: Vec<PathBuf>,
}

/// Rebuilds `doc`'s bench sections from the records `DIR/NAME.json`
/// (section `NAME`) and the criterion results in `DIR/criterion`
/// (section `micro`), and draws the all-reduce records' bus bandwidth
/// against message size into `charts` (linked from their sections).
pub fn report(dir: &Path, doc: &Path, charts: &Path) -> Result<Reported, RecordError> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    names.sort();
    let mut text = std::fs::read_to_string(doc).map_err(io(doc))?;
    let mut done = Reported::default();
    for path in names {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let record = Record::read(&path)?;
        let mut section = record.markdown();
        if let Some(chart) = busbw_chart(&record, &name, charts)? {
            let link = relative_to(doc, &chart);
            section += &format!("![{name}: bus bandwidth against message size]({link})\n\n");
            done.charts.push(chart);
        }
        match replace_section(&text, &name, &section) {
            Some(new) => {
                text = new;
                done.replaced.push(name);
            }
            None => done.unplaced.push(name),
        }
    }
    if let Some(micro) = criterion_markdown(&dir.join("criterion")) {
        match replace_section(&text, "micro", &micro) {
            Some(new) => {
                text = new;
                done.replaced.push("micro".into());
            }
            None => done.unplaced.push("micro".into()),
        }
    }
    crate::fsutil::write_atomic(doc, text.as_bytes()).map_err(io(doc))?;
    Ok(done)
}

/// The criterion micro-benchmarks' last results under `dir`
/// (`target/criterion`, as `cargo bench --bench micro` leaves them), as a
/// Markdown table: median time and input GB/s per benchmark.
pub fn criterion_markdown(dir: &Path) -> Option<String> {
    #[derive(Deserialize)]
    struct Benchmark {
        full_id: String,
        throughput: Option<serde_json::Map<String, Value>>,
    }
    #[derive(Deserialize)]
    struct Estimate {
        point_estimate: f64,
    }
    #[derive(Deserialize)]
    struct Estimates {
        median: Estimate,
    }
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.file_name().is_some_and(|n| n == "new") {
                let read = |f: &str| std::fs::read_to_string(path.join(f)).ok();
                let (Some(b), Some(e)) = (read("benchmark.json"), read("estimates.json")) else {
                    continue;
                };
                let (Ok(b), Ok(e)) = (
                    serde_json::from_str::<Benchmark>(&b),
                    serde_json::from_str::<Estimates>(&e),
                ) else {
                    continue;
                };
                let bytes = b
                    .throughput
                    .and_then(|t| t.get("Bytes").and_then(Value::as_f64));
                found.push((b.full_id, e.median.point_estimate, bytes));
            } else if path.is_dir() {
                stack.push(path);
            }
        }
    }
    if found.is_empty() {
        return None;
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::from(
        "```\n$ cargo bench --bench micro -- --quick\n```\n\n| benchmark | median_us | gbps |\n|---:|---:|---:|\n",
    );
    for (id, ns, bytes) in found {
        let gbps = bytes.map_or("-".to_string(), |b| format!("{:.2}", b / ns));
        let _ = writeln!(out, "| {id} | {:.3} | {gbps} |", ns / 1e3);
    }
    out.push('\n');
    Some(out)
}

/// A chart of each table's `busbw_gbps` against `bytes` (log2), for
/// records that have them.
fn busbw_chart(record: &Record, name: &str, charts: &Path) -> Result<Option<PathBuf>, RecordError> {
    let mut series = Vec::new();
    for t in &record.tables {
        let col = |key: &str| t.columns.iter().position(|c| c == key);
        let (Some(bytes), Some(busbw)) = (col("bytes"), col("busbw_gbps")) else {
            continue;
        };
        // One line per lane count where the table has several.
        let lanes = col("lanes");
        let mut lines: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for r in &t.rows {
            let (Some(x), Some(y)) = (
                r.get(bytes).and_then(Value::as_f64),
                r.get(busbw).and_then(Value::as_f64),
            ) else {
                continue;
            };
            let label = match lanes.and_then(|l| r.get(l)) {
                Some(n) => format!("lanes = {n}"),
                // A title's name is what comes before its first colon.
                None => t.title.split(':').next().unwrap_or(&t.title).to_string(),
            };
            match lines.iter_mut().find(|(l, _)| *l == label) {
                Some((_, points)) => points.push((x.log2(), y)),
                None => lines.push((label, vec![(x.log2(), y)])),
            }
        }
        series.extend(lines);
    }
    if series.is_empty() {
        return Ok(None);
    }
    std::fs::create_dir_all(charts).map_err(io(charts))?;
    let path = charts.join(format!("{name}-busbw.png"));
    let title = format!("bench {name}: bus bandwidth");
    crate::plot::series_chart(
        &path,
        &title,
        ("log2 message bytes", "busbw (GB/s)"),
        &series,
    )?;
    Ok(Some(path))
}

/// `target` as a link from the directory of `doc`.
fn relative_to(doc: &Path, target: &Path) -> String {
    let base = doc.parent().unwrap_or(Path::new(""));
    target
        .strip_prefix(base)
        .unwrap_or(target)
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_record_renders_its_tables_and_replaces_only_its_section() {
        let mut t = Tables::default();
        t.start("ours over TCP", &["bytes", "busbw_gbps"]);
        t.row(vec![json!(1024), json!(0.123456)]);
        t.row(vec![json!(67108864), json!(0.5)]);
        let r = Record::new(
            "allreduce",
            vec!["swarmrun".into(), "bench".into(), "allreduce".into()],
            SystemTime::now(),
            t,
        );
        assert!(r.machine.cores >= 1 && r.machine.memcpy_gbps > 0.0);
        let md = r.markdown();
        assert!(md.contains("$ swarmrun bench allreduce"), "{md}");
        assert!(
            md.contains("| bytes | busbw_gbps |\n|---:|---:|\n| 1024 | 0.1235 |"),
            "{md}"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allreduce.json");
        r.write(&path).unwrap();
        assert_eq!(Record::read(&path).unwrap().tables[0].rows.len(), 2);

        let doc = "# Benchmarks\nprose\n<!-- bench allreduce -->\nold\n<!-- /bench allreduce -->\nmore prose\n";
        let new = replace_section(doc, "allreduce", "NEW\n").unwrap();
        assert_eq!(
            new,
            "# Benchmarks\nprose\n<!-- bench allreduce -->\nNEW\n<!-- /bench allreduce -->\nmore prose\n"
        );
        assert!(replace_section(doc, "train", "x").is_none());
    }
}
