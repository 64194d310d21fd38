//! A character GPT (nanoGPT's architecture) on candle, cut into pipeline
//! stages, with flat `f32` buffers for the collectives and AdamW.
//!
//! A stage's work is a pure function of its weights and its inputs, and
//! every rank computes it identically on CPU: initial weights come from the
//! seed and the parameter's global name (not from the split), the backward
//! pass of a split model computes the same numbers as the whole model's,
//! AdamW is plain sequential Rust. So 1, 2 and 4 stage splits train to the
//! same losses bit for bit (`tests/model_training.rs`), and a validator
//! replays a miner's pass exactly.
//!
//! ```
//! use swarmrun::config::ModelSpec;
//! use swarmrun::data::{Corpus, Dataset, Split};
//! use swarmrun::model::{batch_tensors, AdamW, AdamWConfig, GptConfig, StageInput, StageModel};
//!
//! let data = Dataset::new(&Corpus::from_text("to be or not to be, that is the question"))?;
//! let spec = ModelSpec { n_layer: 2, n_head: 2, n_embd: 16, block_size: 8, dropout: 0.0 };
//! let config = GptConfig::new(&spec, data.tokenizer().vocab_size())?;
//! let layers = [1, 1];
//! let mut s0 = StageModel::new(&config, &layers, 0, 1337)?;
//! let mut s1 = StageModel::new(&config, &layers, 1, 1337)?;
//!
//! let batch = data.batch(Split::Train, 0, 1337, 2, 8)?;
//! let (ids, targets) = batch_tensors(&batch)?;
//! let p0 = s0.forward(StageInput::Tokens(&ids), None)?;
//! let p1 = s1.forward(StageInput::Activations(p0.output(), &ids), Some(&targets))?;
//! assert!(p1.loss()? > 0.0);
//! let grad = s1.backward(p1, None)?.expect("stage 1 has an input gradient");
//! s0.backward(p0, Some(&grad))?;
//!
//! let mut opt = AdamW::new(AdamWConfig::default(), s0.layout());
//! let grads = s0.grads_flat(); // all-reduce these among the stage's miners
//! s0.optimizer_step(&mut opt, &grads, 1.0 / s0.microbatches() as f32)?;
//! s0.zero_grads();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! API:
//!
//! ```text
//! GptConfig::new(&ModelSpec, vocab_size) -> GptConfig {vocab_size, n_layer, n_head, n_embd, block_size}
//! StageModel::new(&GptConfig, layers: &[usize], stage, seed) / with_dtype(.., DType)
//!   .forward(StageInput::{Tokens(&ids), Activations(&x, &ids)}, targets: Option<&Tensor>) -> Pass
//!   .backward(Pass, grad_output: Option<&Tensor>) -> Option<Tensor>   input gradient
//!   .gradients(Pass, grad_output) -> PassGrads {params, input}, .accumulate(&PassGrads)
//!                                         backward in two halves, for concurrent microbatches
//!   .grads_flat() -> Vec<f32>, .microbatches(), .zero_grads()         summed over passes
//!   .params_flat() -> Vec<f32>, .set_params_flat(&[f32]), .layout() -> &[ParamInfo]
//!   .optimizer_step(&mut AdamW, grads, grad_scale), .weights_digest() -> blake3::Hash
//!   .save_safetensors(&Path), .load_safetensors(&Path)
//!   .to_safetensors(Option<&AdamW>, &Path) -> bytes, .load_safetensors_bytes(&[u8], &Path, Option<&mut AdamW>)
//!                                         weights with the optimizer state, for checkpoints
//!   .logits(StageInput) -> (B, T, vocab)  last stage, for sampling
//!   .stage(), .n_stages(), .is_first(), .is_last(), .blocks(), .numel(), .config()
//! Pass: .output() -> &Tensor (boundary (B, T, n_embd), or the loss), .loss() -> f32
//! AdamW::new(AdamWConfig, &[ParamInfo]); .step(&mut params, &grads, grad_scale), .steps_taken(),
//!   .moments() -> (&m, &v), .restore(step, &m, &v)
//! AdamWConfig {lr, min_lr, warmup_steps, decay_steps, beta1, beta2, eps, weight_decay}; .lr_at(step)
//! LocalPipeline::new(&GptConfig, layers, seed, &AdamWConfig); .train_step(&[Batch]) -> mean loss,
//!   .loss(&Batch), .params_flat(), .stages()
//! batch_tensors(&Batch) -> (ids, targets)   (B, T) u32 tensors
//! digest(&[f32]) -> blake3::Hash            of the little-endian bytes
//! generate(&[StageModel], context, &SampleOptions {tokens, temperature, top_k, seed}) -> new token ids
//! ```
//!
//! The model: token and position embeddings (stage 0), pre-LayerNorm
//! blocks of causal self-attention and a 4x GELU MLP, final LayerNorm and
//! LM head with mean cross-entropy (last stage). As nanoGPT with
//! `bias = False`, except:
//! - the LM head is not tied to the token embedding: they live on
//!   different stages, and a tied weight would need its gradient merged
//!   across stages;
//! - GELU is GPT-2's tanh form (nanoGPT's is the erf form; they differ by
//!   under 1e-3), computed by our fused kernel with the causal softmax and
//!   LayerNorm (`ops.rs`);
//! - no dropout: [`GptConfig::new`] refuses `dropout > 0`, because dropout
//!   masks would have to be replayed by validators, and nanoGPT's small
//!   models train fine without.
//!
//! With a bottleneck (`GptConfig::bottleneck = Some(b)`, from the job's
//! `[pipeline.compression]`), every stage but the last ends in LayerNorm
//! and a projection to `b` numbers a token (`boundary.S.ln`,
//! `boundary.S.down`), and every stage but the first starts by projecting
//! them back (`boundary.S.up`) and adding its own token and position
//! embeddings of the microbatch's tokens (`boundary.S.wte`, `.wpe`): the
//! tokens are known to every miner from the microbatch id, so they cross no
//! wire, and the code carries only what the sender's blocks computed. The
//! bottleneck is part of the model: its weights train end to end with the
//! rest, and a split with a bottleneck is another model than the whole.
//!
//! This is the CPU model; `crate::gpu` runs the same stages' passes on a
//! CUDA GPU (feature `cuda`). Parameters and flat buffers are `f32` (a stage
//! built with `DType::F64` computes in `f64` but still trades `f32`
//! buffers). Thread count does not change results: gemm splits work across
//! threads without splitting the sums, and our kernels split only by rows
//! (`tests/model_training.rs` compares 1 and 2 threads). Nor does the CPU:
//! the linear layers' products split their depth themselves, in the same
//! chunks on every CPU (`matmul`), and each process checks before its
//! first pass that its CPU gives the reference bits.
//!
//! Speed: nanoGPT's small CPU model (4 layers, 4 heads, 128 wide, block
//! 64) trains at about 30k tokens/s on two cores of an AVX-512 Xeon,
//! forward, backward and AdamW, when [`LocalPipeline`] runs the quickstart's
//! step of four concurrent microbatches of 12 (`swarmrun bench train`,
//! 0.97-1.02x PyTorch 2.15 in the same run over six runs; BENCHMARKS.md).
//! Before the fused linear, LayerNorm and attention ops and the AVX-512
//! products it was about 16k with two microbatches of 6
//! (`tests/model_throughput.rs`); it reaches nanoGPT's validation loss
//! (1.89 after 2000 steps; nanoGPT reports 1.88).
//! One microbatch per core beats splitting each op across cores: matmuls
//! run near the core's peak either way, but the rest of a step (candle's
//! one allocation per op and per gradient) is serial. candle is built from
//! `third_party/candle-core` with one patch: its backward pass no longer
//! adds each first gradient to a fresh tensor of zeros
//! (third_party/README.md). Run ranks with `CANDLE_NUM_THREADS=1`:
//! candle's elementwise thread pool spins between ops and serializes
//! concurrent callers (two microbatches then reach only 6.6k tokens/s).

mod adamw;
mod checkpoint;
pub mod digest_wide;
mod elementary;
mod generate;
mod layers;
mod local;
mod matmul;
mod ops;
mod params;
mod stage;
mod wide;

use std::path::PathBuf;

use candle_core::{Device, Tensor};

pub use adamw::{AdamW, AdamWConfig, SegmentSteps};
pub use generate::{generate, SampleOptions};
pub use local::LocalPipeline;
pub use params::ParamInfo;
pub use stage::{Pass, PassGrads, StageInput, StageModel};

use crate::config::{JobSpec, ModelSpec};
use crate::data::Batch;

/// The model's shape: `ModelSpec` plus the tokenizer's vocabulary size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptConfig {
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    /// Width of the learned code that crosses each stage boundary in
    /// place of the `n_embd` residual stream (`[pipeline.compression]
    /// bottleneck`); `None`: the stream itself crosses.
    pub bottleneck: Option<usize>,
}

impl GptConfig {
    pub fn new(spec: &ModelSpec, vocab_size: usize) -> Result<GptConfig, ModelError> {
        if spec.dropout != 0.0 {
            return Err(ModelError::Dropout(spec.dropout));
        }
        if spec.n_head == 0 || !spec.n_embd.is_multiple_of(spec.n_head) {
            return Err(ModelError::Heads {
                n_embd: spec.n_embd,
                n_head: spec.n_head,
            });
        }
        Ok(GptConfig {
            vocab_size,
            n_layer: spec.n_layer,
            n_head: spec.n_head,
            n_embd: spec.n_embd,
            block_size: spec.block_size,
            bottleneck: None,
        })
    }

    /// The model a job trains: its `[model]` with the bottleneck of its
    /// `[pipeline.compression]`, which is part of the model (its
    /// projections are trained weights), not of the wire.
    pub fn for_job(spec: &JobSpec, vocab_size: usize) -> Result<GptConfig, ModelError> {
        Ok(GptConfig {
            bottleneck: spec.pipeline.compression.bottleneck,
            ..GptConfig::new(&spec.model, vocab_size)?
        })
    }

    /// Width of the tensor that crosses a stage boundary.
    pub fn boundary_width(&self) -> usize {
        self.bottleneck.unwrap_or(self.n_embd)
    }
}

/// Token ids and targets of `batch` as `(B, T)` `u32` tensors.
pub fn batch_tensors(batch: &Batch) -> Result<(Tensor, Tensor), ModelError> {
    let shape = (batch.batch_size, batch.block_size);
    Ok((
        Tensor::from_slice(&batch.inputs, shape, &Device::Cpu)?,
        Tensor::from_slice(&batch.targets, shape, &Device::Cpu)?,
    ))
}

/// BLAKE3 of a flat weight buffer's little-endian bytes: the "known hash"
/// of a stage's weights in a window, computable from the all-reduced
/// buffer alone.
pub fn digest(flat: &[f32]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hash_f32(&mut hasher, flat);
    hasher.finalize()
}

/// Calls `f` with `t`'s values as `f32`, in row-major order: read where
/// they are kept when `t` is contiguous `f32` on the host (parameters,
/// their gradients and boundary tensors are), else from a converted copy.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(values)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    {
        return Ok(f(&values[start..end]));
    }
    drop(storage);
    Ok(f(&t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?))
}

/// Feeds `flat`'s little-endian bytes to `hasher`: straight from memory
/// on little-endian hosts (the digests are on the hot path of every pass's
/// receipt), converted 4096 values at a time elsewhere.
pub(crate) fn hash_f32(hasher: &mut blake3::Hasher, flat: &[f32]) {
    if cfg!(target_endian = "little") {
        hasher.update(bytemuck::cast_slice(flat));
        return;
    }
    for chunk in flat.chunks(4096) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
        hasher.update(&bytes);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("dropout {0} is not supported: the model trains without dropout (set it to 0)")]
    Dropout(f64),
    #[error("n_embd {n_embd} is not a multiple of n_head {n_head}")]
    Heads { n_embd: usize, n_head: usize },
    #[error("dtype {0:?} is not supported: stages compute in F32 or F64")]
    DType(candle_core::DType),
    #[error("stage split {layers:?} does not add up to the model's {n_layer} blocks")]
    LayerSplit { layers: Vec<usize>, n_layer: usize },
    #[error("stage {stage} does not exist in a {stages}-stage split")]
    NoSuchStage { stage: usize, stages: usize },
    #[error("stage {stage} takes {}", if *tokens_expected { "token ids" } else { "activations" })]
    WrongInput { stage: usize, tokens_expected: bool },
    #[error("stage {stage} {}", if *needed { "is the last and needs targets" } else { "takes no targets" })]
    Targets { stage: usize, needed: bool },
    #[error("stage {stage} {}", if *needed { "needs the gradient of its output" } else { "computes the loss and takes no output gradient" })]
    GradOutput { stage: usize, needed: bool },
    #[error("{what} has shape {got:?}, expected {expected}")]
    Shape {
        what: &'static str,
        expected: String,
        got: Vec<usize>,
    },
    #[error("flat buffer has {got} values, the stage has {want} parameters")]
    FlatLength { got: usize, want: usize },
    #[error("only the last stage computes logits and a loss")]
    NotLastStage,
    #[error("no gradient reached {0}")]
    NoGradient(String),
    #[error("a step needs at least one microbatch")]
    NoMicrobatches,
    #[error("sampling needs every stage of the model in order, got stages {0:?}")]
    IncompletePipeline(Vec<usize>),
    #[error("sampling needs at least one token of context")]
    EmptyContext,
    #[error("temperature {0} is not a finite number >= 0")]
    Temperature(f64),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    #[error("this CPU's matrix products are not in the order every rank uses, so validators could not replay its passes bit for bit ({0})")]
    CpuProducts(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    fn checkpoint(path: &std::path::Path, message: impl std::fmt::Display) -> ModelError {
        ModelError::Checkpoint {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }
}
