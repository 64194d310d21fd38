//! Checkpoints of a whole pipeline: every stage's weights and AdamW state
//! and the orchestrator's state, committed together or not at all.
//!
//! ```text
//! RUN_DIR/checkpoints/
//!   window-00000123/              committed: complete, manifest last
//!     stage-0.safetensors         weights, adamw.m, adamw.v, step in the metadata
//!     stage-1.safetensors
//!     manifest.json               format, window, step, job text, seed, stages, router
//!   .partial-window-00000124/     being written; never read
//! ```
//!
//! Stages live on different ranks, so no one process can write a
//! checkpoint alone. One miner per stage writes its file into the window's
//! partial directory ([`Checkpoints::write_stage`]) and reports the
//! returned [`StageEntry`]; the orchestrator, once it has every stage's
//! entry, writes the manifest and renames the directory
//! ([`Checkpoints::commit`]). The rename is the commit point: a crash before
//! it leaves only a partial directory, which [`Checkpoints::latest`] never
//! looks at, and every file is fsynced before it, so a committed directory
//! survives a power cut whole.
//!
//! The manifest records each file's BLAKE3 and its weights digest, so
//! loading refuses a damaged or swapped file, naming it.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::fsutil::write_atomic;
use crate::model::{AdamW, GptConfig, ModelError, StageModel};
use crate::pipeline::RouterState;

const MANIFEST: &str = "manifest.json";
/// The format `manifest.json` is written in, as its `format` field says.
/// Raised whenever a manifest's fields change meaning, so that a swarmrun
/// older than the checkpoint refuses it, naming both formats, instead of
/// misreading it or (since [`Checkpoints::latest`] passes over manifests
/// it cannot read) resuming quietly from an older checkpoint. Manifests
/// written before the field existed are format 1.
pub const MANIFEST_FORMAT: u32 = 1;
const COMMITTED_PREFIX: &str = "window-";
const PARTIAL_PREFIX: &str = ".partial-window-";

/// What a committed checkpoint holds, as `manifest.json`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Manifest {
    /// The last completed window: a resumed run starts at `window + 1`.
    pub window: u64,
    /// Optimizer steps taken (each stage's AdamW step count).
    pub step: u64,
    /// The job file's text, so the checkpoint alone says which model it
    /// is (shape, stage split) and how it was trained.
    pub job: String,
    /// The job's seed: initial weights and data order.
    pub seed: u64,
    /// One entry per stage, in stage order.
    pub stages: Vec<StageEntry>,
    /// The orchestrator's routing state, so a resumed run routes the same.
    pub router: RouterState,
}

impl Manifest {
    /// Reads a manifest's bytes, as read from `path` (named in errors): it
    /// must be JSON of the right shape with one entry per stage, in stage
    /// order, each naming a plain file inside the checkpoint directory (a
    /// manifest that says `../x` or `/etc/x` must not make a resume read
    /// outside it) and hex digests.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Manifest, CheckpointError> {
        let bad = |message: String| CheckpointError::Manifest {
            path: path.to_path_buf(),
            message,
        };
        let unparsable = |e: serde_json::Error| bad(format!("unparsable: {e}"));
        // Read first on its own: a newer format may change any other field.
        let Versioned { format } = serde_json::from_slice(bytes).map_err(unparsable)?;
        if format > MANIFEST_FORMAT {
            return Err(CheckpointError::NewerFormat {
                path: path.to_path_buf(),
                format,
            });
        }
        if format == 0 {
            return Err(bad("format 0: formats start at 1".into()));
        }
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(unparsable)?;
        if manifest.stages.is_empty() {
            return Err(bad("lists no stage".into()));
        }
        for (i, entry) in manifest.stages.iter().enumerate() {
            if entry.stage != i {
                return Err(bad(format!(
                    "entry {i} is stage {}: one entry per stage, in stage order",
                    entry.stage
                )));
            }
            let plain = Path::new(&entry.file).file_name() == Some(entry.file.as_ref());
            if !plain || entry.file == ".." {
                return Err(bad(format!(
                    "stage {i}'s file {:?} is not a plain file name",
                    entry.file
                )));
            }
            let digests = [Some(&entry.blake3), Some(&entry.weights_digest)];
            let digests = digests.into_iter().chain([entry.optimizer_digest.as_ref()]);
            if let Some(d) = digests.flatten().find(|d| !is_digest(d)) {
                return Err(bad(format!(
                    "stage {i} states {d:?}, which is not a BLAKE3 digest in hex"
                )));
            }
        }
        let router = &manifest.router;
        if router.stages != manifest.stages.len() {
            return Err(bad(format!(
                "its routing state has {} stages, its entries {}",
                router.stages,
                manifest.stages.len()
            )));
        }
        for (rank, miner) in &router.miners {
            if miner.stage >= router.stages {
                return Err(bad(format!(
                    "its routing state puts miner {rank} on stage {}",
                    miner.stage
                )));
            }
            if miner
                .throughput
                .is_some_and(|t| !(t.is_finite() && t > 0.0))
            {
                return Err(bad(format!(
                    "its routing state gives miner {rank} a throughput that is not a positive number"
                )));
            }
        }
        Ok(manifest)
    }
}

/// A manifest's `format` field alone (the other fields ignored).
#[derive(Deserialize)]
struct Versioned {
    #[serde(default = "first_format")]
    format: u32,
}

fn first_format() -> u32 {
    1
}

/// A manifest as written: its fields after the format they are in.
#[derive(Serialize)]
struct Written<'a> {
    format: u32,
    #[serde(flatten)]
    manifest: &'a Manifest,
}

/// 64 lowercase hex digits, as BLAKE3's `to_hex` writes them.
fn is_digest(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// One stage's file in a checkpoint, as its writer reports it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StageEntry {
    pub stage: usize,
    /// File name inside the checkpoint directory.
    pub file: String,
    /// BLAKE3 of the whole file, hex.
    pub blake3: String,
    /// BLAKE3 of the weights' flat buffer ([`StageModel::weights_digest`]),
    /// hex: the window's known hash of the stage.
    pub weights_digest: String,
    /// [`AdamW::state_digest`], hex; absent in checkpoints written before
    /// validators audited checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer_digest: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("manifest {}: {message}", path.display())]
    Manifest { path: PathBuf, message: String },
    #[error(
        "manifest {}: format {format}, newer than the {MANIFEST_FORMAT} this swarmrun reads: \
         resume with the swarmrun that wrote it, or a newer one",
        path.display()
    )]
    NewerFormat { path: PathBuf, format: u32 },
    #[error("{}: {what} {actual} does not match the manifest's {expected}", path.display())]
    Digest {
        path: PathBuf,
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("checkpoint {} exists already", path.display())]
    Exists { path: PathBuf },
    #[error(transparent)]
    Job(#[from] ConfigError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The checkpoints of one run: `RUN_DIR/checkpoints`.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    root: PathBuf,
}

impl Checkpoints {
    pub fn new(run_dir: &Path) -> Checkpoints {
        Checkpoints {
            root: run_dir.join("checkpoints"),
        }
    }

    /// `RUN_DIR/checkpoints`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The committed checkpoint directory of `window`.
    pub fn dir(&self, window: u64) -> PathBuf {
        self.root.join(format!("{COMMITTED_PREFIX}{window:08}"))
    }

    fn partial_dir(&self, window: u64) -> PathBuf {
        self.root.join(format!("{PARTIAL_PREFIX}{window:08}"))
    }

    /// Writes `model`'s stage (weights, and `opt`'s moments and step) into
    /// the partial checkpoint of `window`; the entry goes to the
    /// orchestrator for the manifest. One miner per stage calls this.
    pub fn write_stage(
        &self,
        window: u64,
        model: &StageModel,
        opt: &AdamW,
    ) -> Result<StageEntry, CheckpointError> {
        let dir = self.partial_dir(window);
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let file = format!("stage-{}.safetensors", model.stage());
        let path = dir.join(&file);
        let bytes = model.to_safetensors(Some(opt), &path)?;
        write_atomic(&path, &bytes).map_err(io_error(&path))?;
        Ok(StageEntry {
            stage: model.stage(),
            file,
            blake3: blake3::hash(&bytes).to_hex().to_string(),
            weights_digest: model.weights_digest()?.to_hex().to_string(),
            optimizer_digest: Some(opt.state_digest().to_hex().to_string()),
        })
    }

    /// Where [`Checkpoints::write_stage`] put `entry` for `window`, until
    /// the checkpoint is committed.
    pub fn written_path(&self, window: u64, entry: &StageEntry) -> PathBuf {
        self.partial_dir(window).join(&entry.file)
    }

    /// Commits the partial checkpoint of `manifest.window`: checks that
    /// every stage's file is there as its entry says, writes the manifest,
    /// renames the directory, and fsyncs. A checkpoint of the window that
    /// is committed already is kept if it holds the same state, and is an
    /// error if not. Then deletes all but the `keep`
    /// newest committed checkpoints (at least this one is kept) and
    /// abandoned partial ones of earlier windows. Returns the directory.
    pub fn commit(&self, manifest: &Manifest, keep: usize) -> Result<PathBuf, CheckpointError> {
        let partial = self.partial_dir(manifest.window);
        let manifest_path = partial.join(MANIFEST);
        let bad = |message: String| CheckpointError::Manifest {
            path: manifest_path.clone(),
            message,
        };
        let order: Vec<usize> = manifest.stages.iter().map(|e| e.stage).collect();
        if order.is_empty() || order.iter().enumerate().any(|(i, &s)| s != i) {
            return Err(bad(format!(
                "stage entries {order:?} are not stages 0, 1, ... in order"
            )));
        }
        for entry in &manifest.stages {
            let path = partial.join(&entry.file);
            let bytes = fs::read(&path).map_err(io_error(&path))?;
            check_digest(&path, "file blake3", &entry.blake3, blake3::hash(&bytes))?;
        }
        let dir = self.dir(manifest.window);
        if dir.exists() {
            // A window run again (a standby took over after the lost
            // orchestrator committed it, before it could hand that over)
            // comes to the same state, bit for bit: the checkpoint stands.
            let same = |m: Manifest| {
                let state = |m: &Manifest| {
                    let entries = m.stages.iter();
                    entries
                        .map(|e| {
                            (
                                e.stage,
                                e.weights_digest.clone(),
                                e.optimizer_digest.clone(),
                            )
                        })
                        .collect::<Vec<_>>()
                };
                state(&m) == state(manifest)
            };
            if !self.manifest(manifest.window).is_ok_and(same) {
                return Err(CheckpointError::Exists { path: dir });
            }
            fs::remove_dir_all(&partial).map_err(io_error(&partial))?;
            self.prune(manifest.window, keep)?;
            return Ok(dir);
        }
        let written = Written {
            format: MANIFEST_FORMAT,
            manifest,
        };
        let json = serde_json::to_vec_pretty(&written).map_err(|e| bad(e.to_string()))?;
        write_atomic(&manifest_path, &json).map_err(io_error(&manifest_path))?;
        fs::rename(&partial, &dir).map_err(io_error(&partial))?;
        // The rename, and on the first commit the checkpoints directory
        // itself, are durable only once their parents are synced.
        let run_dir = match self.root.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        for d in [self.root.as_path(), run_dir] {
            fs::File::open(d)
                .and_then(|f| f.sync_all())
                .map_err(io_error(d))?;
        }
        self.prune(manifest.window, keep)?;
        Ok(dir)
    }

    /// Keeps the `keep` newest committed checkpoints up to `newest` whose
    /// manifest reads, and deletes every other one up to `newest`, with the
    /// partial ones before it (abandoned by a crash or a lost miner).
    fn prune(&self, newest: u64, keep: usize) -> Result<(), CheckpointError> {
        let (committed, partial) = self.windows()?;
        let mut kept = 0;
        for &window in committed.iter().rev().filter(|&&w| w <= newest) {
            if kept < keep.max(1) && self.manifest(window).is_ok() {
                kept += 1;
                continue;
            }
            let dir = self.dir(window);
            fs::remove_dir_all(&dir).map_err(io_error(&dir))?;
        }
        for &window in partial.iter().filter(|&&w| w < newest) {
            let dir = self.partial_dir(window);
            fs::remove_dir_all(&dir).map_err(io_error(&dir))?;
        }
        Ok(())
    }

    /// Windows of the committed and of the partial directories, ascending;
    /// none if the run has no checkpoints directory yet.
    fn windows(&self) -> Result<(Vec<u64>, Vec<u64>), CheckpointError> {
        let (mut committed, mut partial) = (Vec::new(), Vec::new());
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((committed, partial)),
            Err(e) => return Err(io_error(&self.root)(e)),
        };
        for entry in entries {
            let name = entry.map_err(io_error(&self.root))?.file_name();
            let name = name.to_string_lossy();
            let parsed = |prefix: &str| name.strip_prefix(prefix)?.parse::<u64>().ok();
            if let Some(w) = parsed(COMMITTED_PREFIX) {
                committed.push(w);
            } else if let Some(w) = parsed(PARTIAL_PREFIX) {
                partial.push(w);
            }
        }
        committed.sort_unstable();
        partial.sort_unstable();
        Ok((committed, partial))
    }

    /// The manifest of the committed checkpoint of `window`.
    pub fn manifest(&self, window: u64) -> Result<Manifest, CheckpointError> {
        let path = self.dir(window).join(MANIFEST);
        let text = fs::read(&path).map_err(io_error(&path))?;
        let manifest = Manifest::parse(&text, &path)?;
        if manifest.window != window {
            return Err(CheckpointError::Manifest {
                path,
                message: format!("names window {}", manifest.window),
            });
        }
        Ok(manifest)
    }

    /// The newest committed checkpoint: the highest window whose manifest
    /// reads. Partial directories are ignored, and so is a directory whose
    /// manifest is missing (a crash while pruning it) or unreadable; but
    /// a manifest in a newer format ends the search with its error, as
    /// the checkpoints before it are not the run's latest.
    pub fn latest(&self) -> Result<Option<Manifest>, CheckpointError> {
        let (committed, _) = self.windows()?;
        for &window in committed.iter().rev() {
            match self.manifest(window) {
                Ok(manifest) => return Ok(Some(manifest)),
                Err(e @ CheckpointError::NewerFormat { .. }) => return Err(e),
                Err(_) => {}
            }
        }
        Ok(None)
    }

    /// Loads `model.stage()`'s weights and optimizer state from the
    /// checkpoint of `manifest`, refusing a file whose BLAKE3 or weights
    /// digest differs from the manifest's.
    pub fn load_stage(
        &self,
        manifest: &Manifest,
        model: &mut StageModel,
        opt: &mut AdamW,
    ) -> Result<(), CheckpointError> {
        self.load(manifest, model, Some(opt))
    }

    /// Every stage of the checkpoint's model, weights loaded (no optimizer
    /// state): the model for sampling. The shape and split come from the
    /// manifest's job text; `vocab_size` from the corpus's tokenizer.
    pub fn load_model(
        &self,
        manifest: &Manifest,
        vocab_size: usize,
    ) -> Result<Vec<StageModel>, CheckpointError> {
        let spec = crate::config::parse(&manifest.job, &self.dir(manifest.window).join(MANIFEST))?;
        let config = GptConfig::for_job(&spec, vocab_size)?;
        let layers = spec.stage_layers();
        (0..layers.len())
            .map(|stage| {
                let mut model = StageModel::new(&config, &layers, stage, manifest.seed)?;
                self.load(manifest, &mut model, None)?;
                Ok(model)
            })
            .collect()
    }

    /// Loads `model`'s stage, and the optimizer state if `opt` is given.
    /// If the weights digest is wrong the weights are already replaced:
    /// the caller must not go on with `model`.
    fn load(
        &self,
        manifest: &Manifest,
        model: &mut StageModel,
        opt: Option<&mut AdamW>,
    ) -> Result<(), CheckpointError> {
        let dir = self.dir(manifest.window);
        let entry = manifest
            .stages
            .iter()
            .find(|e| e.stage == model.stage())
            .filter(|_| manifest.stages.len() == model.n_stages())
            .ok_or_else(|| CheckpointError::Manifest {
                path: dir.join(MANIFEST),
                message: format!(
                    "has {} stages, no stage {} of {}",
                    manifest.stages.len(),
                    model.stage(),
                    model.n_stages()
                ),
            })?;
        let path = dir.join(&entry.file);
        let bytes = fs::read(&path).map_err(io_error(&path))?;
        check_digest(&path, "file blake3", &entry.blake3, blake3::hash(&bytes))?;
        model.load_safetensors_bytes(&bytes, &path, opt)?;
        check_digest(
            &path,
            "weights digest",
            &entry.weights_digest,
            model.weights_digest()?,
        )
    }
}

fn check_digest(
    path: &Path,
    what: &'static str,
    expected: &str,
    actual: blake3::Hash,
) -> Result<(), CheckpointError> {
    let actual = actual.to_hex().to_string();
    if actual == expected {
        return Ok(());
    }
    Err(CheckpointError::Digest {
        path: path.to_path_buf(),
        what,
        expected: expected.to_string(),
        actual,
    })
}
