//! One pipeline stage: a slice of the GPT's blocks, its forward and
//! backward pass, and its parameters as flat `f32` buffers.

use std::cell::RefCell;
use std::ops::Range;

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor, Var};

use super::layers::{Block, BottleneckDown, BottleneckUp, Embeddings, Head};
use super::params::{ParamInfo, ParamSet};
use super::{with_f32, GptConfig, ModelError};

/// What enters a stage.
#[derive(Debug, Clone, Copy)]
pub enum StageInput<'a> {
    /// Token ids `(B, T)`, `u32`: the input of stage 0.
    Tokens(&'a Tensor),
    /// The boundary tensor `(B, T, w)` from the previous stage, the
    /// residual stream (`w = n_embd`) or the bottleneck's code (`w = b`, see
    /// [`GptConfig::boundary_width`]), and the microbatch's token ids `(B,
    /// T)`, which a bottleneck embeds again on the receiving side.
    Activations(&'a Tensor, &'a Tensor),
}

/// A forward pass kept for its backward pass: it owns the autograd graph,
/// so a miner can hold several microbatches in flight.
#[derive(Debug)]
pub struct Pass {
    /// The input as a leaf whose gradient is the stage's input gradient;
    /// `None` on stage 0 (token ids have none).
    input: Option<Var>,
    /// Boundary tensor `(B, T, w)`, or the scalar loss on the last stage.
    output: Tensor,
    is_loss: bool,
}

impl Pass {
    /// The boundary tensor to send on, or the loss tensor on the last stage.
    pub fn output(&self) -> &Tensor {
        &self.output
    }

    /// The microbatch's mean cross-entropy; last stage only.
    pub fn loss(&self) -> Result<f32, ModelError> {
        if !self.is_loss {
            return Err(ModelError::NotLastStage);
        }
        Ok(self.output.to_dtype(DType::F32)?.to_scalar::<f32>()?)
    }
}

/// The gradients of one backward pass of one stage.
#[derive(Debug, Clone)]
pub struct PassGrads {
    /// Parameter gradients, flat, in [`StageModel::layout`] order.
    pub params: Vec<f32>,
    /// Gradient of the stage's input boundary tensor (`None` on stage 0).
    pub input: Option<Tensor>,
}

/// Stage `stage` of a GPT cut into `layers.len()` stages: stage 0 also owns
/// the embeddings, the last stage the final LayerNorm, LM head and loss.
///
/// Parameters live as candle `Var`s in the compute dtype (`f32` unless
/// built with [`StageModel::with_dtype`]); the flat buffers the collectives
/// and AdamW work on are always `f32`, ordered as [`StageModel::layout`].
#[derive(Debug)]
pub struct StageModel {
    config: GptConfig,
    stage: usize,
    n_stages: usize,
    blocks_range: Range<usize>,
    embeddings: Option<Embeddings>,
    /// The receiving half of the bottleneck before this stage (not on
    /// stage 0).
    up: Option<BottleneckUp>,
    blocks: Vec<Block>,
    /// The sending half of the bottleneck after this stage (not on the
    /// last).
    down: Option<BottleneckDown>,
    head: Option<Head>,
    params: ParamSet,
    grads: Vec<f32>,
    microbatches: usize,
}

impl StageModel {
    /// Stage `stage` with `layers[s]` blocks on stage `s` (as
    /// `JobSpec::stage_layers`), `f32`, initialized from `seed`. A block's
    /// weights depend only on `seed` and its global index.
    pub fn new(
        config: &GptConfig,
        layers: &[usize],
        stage: usize,
        seed: u64,
    ) -> Result<Self, ModelError> {
        Self::with_dtype(config, layers, stage, seed, DType::F32)
    }

    /// As [`StageModel::new`], computing in `dtype`: `F32` or `F64` (for
    /// gradient checks; the initial values are the same `f32` numbers).
    pub fn with_dtype(
        config: &GptConfig,
        layers: &[usize],
        stage: usize,
        seed: u64,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        if !matches!(dtype, DType::F32 | DType::F64) {
            return Err(ModelError::DType(dtype));
        }
        super::matmul::check_cpu()?;
        if layers.is_empty() || layers.iter().sum::<usize>() != config.n_layer {
            return Err(ModelError::LayerSplit {
                layers: layers.to_vec(),
                n_layer: config.n_layer,
            });
        }
        if stage >= layers.len() {
            return Err(ModelError::NoSuchStage {
                stage,
                stages: layers.len(),
            });
        }
        let first_block: usize = layers[..stage].iter().sum();
        let blocks_range = first_block..first_block + layers[stage];
        let n_stages = layers.len();

        let mut params = ParamSet::new(seed, dtype);
        let is_last = stage + 1 == n_stages;
        let embeddings = match stage {
            0 => Some(Embeddings::new(&mut params, config)?),
            _ => None,
        };
        let up = match (config.bottleneck, stage) {
            (Some(b), 1..) => Some(BottleneckUp::new(&mut params, stage - 1, config, b)?),
            _ => None,
        };
        let blocks = blocks_range
            .clone()
            .map(|i| Block::new(&mut params, i, config))
            .collect::<Result<Vec<_>, _>>()?;
        let down = match config.bottleneck {
            Some(b) if !is_last => Some(BottleneckDown::new(&mut params, stage, config, b)?),
            _ => None,
        };
        let head = match is_last {
            true => Some(Head::new(&mut params, config)?),
            false => None,
        };
        let grads = vec![0.0; params.numel()];
        Ok(StageModel {
            config: config.clone(),
            stage,
            n_stages,
            blocks_range,
            embeddings,
            up,
            blocks,
            down,
            head,
            params,
            grads,
            microbatches: 0,
        })
    }

    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    pub fn stage(&self) -> usize {
        self.stage
    }

    pub fn n_stages(&self) -> usize {
        self.n_stages
    }

    pub fn is_first(&self) -> bool {
        self.stage == 0
    }

    pub fn is_last(&self) -> bool {
        self.stage + 1 == self.n_stages
    }

    /// Global indices of this stage's blocks.
    pub fn blocks(&self) -> Range<usize> {
        self.blocks_range.clone()
    }

    /// The parameters in flat-buffer order.
    pub fn layout(&self) -> &[ParamInfo] {
        &self.params.infos
    }

    /// Number of `f32`s in the flat buffers.
    pub fn numel(&self) -> usize {
        self.params.numel()
    }

    /// Parameters that take part in matmuls: every one but the token and
    /// position embeddings (stage 0's, and a bottleneck receiver's own),
    /// which are looked up, not multiplied. This is nanoGPT's count for its
    /// FLOPs estimate: it leaves out the position embedding, and its token
    /// embedding, tied to the LM head, counts once, as the LM head's
    /// matmul. Ours is not tied, so our LM head counts and our token
    /// embedding does not. LayerNorm gains count, as in nanoGPT (a few
    /// thousand, noise beside the matrices).
    pub fn matmul_params(&self) -> usize {
        let looked_up = |name: &str| name.ends_with("wte.weight") || name.ends_with("wpe.weight");
        self.layout()
            .iter()
            .filter(|p| !looked_up(&p.name))
            .map(|p| p.numel())
            .sum()
    }

    /// FLOPs to train this stage on one token, as nanoGPT's `estimate_mfu`
    /// counts them: 6 per matmul parameter (a multiply and an add, once
    /// forward and twice backward) plus 12 x n_embd x block_size per block
    /// for attention's two matmuls (scores and weighted values, same factor
    /// of 6), counted over the whole block as nanoGPT does, though the
    /// causal mask needs half.
    pub fn flops_per_token(&self) -> f64 {
        let c = &self.config;
        let attention = 12 * self.blocks_range.len() * c.n_embd * c.block_size;
        6.0 * self.matmul_params() as f64 + attention as f64
    }

    /// Runs the stage. `targets` (`(B, T)` u32) must be given to the last
    /// stage and only to it.
    pub fn forward(
        &self,
        input: StageInput<'_>,
        targets: Option<&Tensor>,
    ) -> Result<Pass, ModelError> {
        let (x, input) = self.trunk(input)?;
        let output = match (&self.head, targets) {
            (Some(head), Some(targets)) => head.loss(&x, targets)?,
            (None, None) => match &self.down {
                Some(down) => down.forward(&x)?,
                None => x,
            },
            (Some(_), None) | (None, Some(_)) => {
                return Err(ModelError::Targets {
                    stage: self.stage,
                    needed: self.is_last(),
                })
            }
        };
        Ok(Pass {
            input,
            output,
            is_loss: self.is_last(),
        })
    }

    /// Next-token logits `(B, T, vocab_size)` of the last stage, where
    /// [`StageModel::forward`] gives the loss: what sampling needs.
    pub fn logits(&self, input: StageInput<'_>) -> Result<Tensor, ModelError> {
        let head = self.head.as_ref().ok_or(ModelError::NotLastStage)?;
        let (x, _) = self.trunk(input)?;
        Ok(head.logits(&x)?)
    }

    /// The embeddings (stage 0) or the input leaf (later stages, through
    /// the bottleneck's up-projection if any), then the blocks: everything
    /// but the head and the down-projection. Returns the leaf too, whose
    /// gradient the backward pass sends upstream.
    fn trunk(&self, input: StageInput<'_>) -> Result<(Tensor, Option<Var>), ModelError> {
        let (mut x, input) = match (&self.embeddings, input) {
            (Some(emb), StageInput::Tokens(ids)) => {
                self.check_tokens(ids)?;
                (emb.forward(ids)?, None)
            }
            (None, StageInput::Activations(acts, ids)) => {
                self.check_activations(acts, ids)?;
                // A fresh leaf (copied, so no graph links back to the
                // sender): its gradient is what this stage sends back.
                let var = Var::from_tensor(&acts.detach().to_dtype(self.params.dtype())?)?;
                let x = match &self.up {
                    Some(up) => up.forward(var.as_tensor(), ids)?,
                    None => var.as_tensor().clone(),
                };
                (x, Some(var))
            }
            (Some(_), StageInput::Activations(..)) | (None, StageInput::Tokens(_)) => {
                return Err(ModelError::WrongInput {
                    stage: self.stage,
                    tokens_expected: self.is_first(),
                });
            }
        };
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        Ok((x, input))
    }

    /// Backward pass of `pass`: adds the parameter gradients into the
    /// stage's accumulator and returns the gradient of the stage's input
    /// boundary tensor (`None` on stage 0). `grad_output` is the gradient of
    /// `pass.output()` sent back by the next stage; the last stage, whose
    /// output is the loss, takes `None`. The same as
    /// [`StageModel::gradients`] then [`StageModel::accumulate`].
    pub fn backward(
        &mut self,
        pass: Pass,
        grad_output: Option<&Tensor>,
    ) -> Result<Option<Tensor>, ModelError> {
        let grads = self.gradients(pass, grad_output)?;
        self.accumulate(&grads)?;
        Ok(grads.input)
    }

    /// Backward pass of `pass` without touching the stage, so several
    /// microbatches can run backward at once (`&self`); add the results
    /// with [`StageModel::accumulate`] in a fixed order to stay
    /// deterministic.
    ///
    /// For a non-last stage the backward pass starts from
    /// `sum(output * grad_output)`, whose gradient with respect to `output`
    /// is exactly `grad_output`, so a split model computes the same numbers
    /// as the whole one.
    pub fn gradients(
        &self,
        pass: Pass,
        grad_output: Option<&Tensor>,
    ) -> Result<PassGrads, ModelError> {
        let root = match (grad_output, pass.is_loss) {
            (None, true) => pass.output.clone(),
            (Some(grad), false) => {
                if grad.dims() != pass.output.dims() {
                    return Err(ModelError::Shape {
                        what: "grad_output",
                        expected: format!("{:?}", pass.output.dims()),
                        got: grad.dims().to_vec(),
                    });
                }
                let grad = grad.detach().to_dtype(pass.output.dtype())?;
                (&pass.output * grad)?.sum_all()?
            }
            (_, is_loss) => {
                return Err(ModelError::GradOutput {
                    stage: self.stage,
                    needed: !is_loss,
                })
            }
        };
        let grads = root.backward()?;
        let mut params = Vec::with_capacity(self.numel());
        for (info, var) in self.params.infos.iter().zip(&self.params.vars) {
            let grad = grads
                .get(var.as_tensor())
                .ok_or_else(|| ModelError::NoGradient(info.name.clone()))?;
            with_f32(grad, |values| params.extend_from_slice(values))?;
        }
        let input = match pass.input {
            None => None,
            Some(input) => Some(
                grads
                    .get(input.as_tensor())
                    .cloned()
                    .ok_or_else(|| ModelError::NoGradient("stage input".into()))?,
            ),
        };
        Ok(PassGrads { params, input })
    }

    /// Adds one backward pass's parameter gradients to the stage's sum.
    pub fn accumulate(&mut self, grads: &PassGrads) -> Result<(), ModelError> {
        check_flat_len(grads.params.len(), self.numel())?;
        for (acc, g) in self.grads.iter_mut().zip(&grads.params) {
            *acc += g;
        }
        self.microbatches += 1;
        Ok(())
    }

    /// Sum of the parameter gradients of every backward pass since the last
    /// [`StageModel::zero_grads`]: a copy, for the all-reduce to merge in
    /// place. Divide by the number of microbatches (over all miners) through
    /// `grad_scale` of [`super::AdamW::step`].
    pub fn grads_flat(&self) -> Vec<f32> {
        self.grads.clone()
    }

    /// Backward passes accumulated in [`StageModel::grads_flat`].
    pub fn microbatches(&self) -> usize {
        self.microbatches
    }

    pub fn zero_grads(&mut self) {
        self.grads.fill(0.0);
        self.microbatches = 0;
    }

    /// The parameters as `f32`, in [`StageModel::layout`] order.
    pub fn params_flat(&self) -> Result<Vec<f32>, ModelError> {
        let mut flat = Vec::with_capacity(self.numel());
        for var in &self.params.vars {
            with_f32(var, |values| flat.extend_from_slice(values))?;
        }
        Ok(flat)
    }

    /// Replaces the parameters. Do it between windows: a [`Pass`] still in
    /// flight shares the weights' storage and would be corrupted.
    pub fn set_params_flat(&mut self, flat: &[f32]) -> Result<(), ModelError> {
        check_flat_len(flat.len(), self.numel())?;
        for (info, var) in self.params.infos.iter().zip(&self.params.vars) {
            let tensor =
                Tensor::from_slice(&flat[info.range()], info.shape.as_slice(), &Device::Cpu)?;
            var.set(&tensor.to_dtype(self.params.dtype())?)?;
        }
        Ok(())
    }

    /// One optimizer step on this stage's weights with `grads` (the merged
    /// [`StageModel::grads_flat`] of the window) times `grad_scale`.
    pub fn optimizer_step(
        &mut self,
        opt: &mut super::AdamW,
        grads: &[f32],
        grad_scale: f32,
    ) -> Result<(), ModelError> {
        if self.params.dtype() != DType::F32 {
            let mut params = self.params_flat()?;
            opt.step(&mut params, grads, grad_scale)?;
            return self.set_params_flat(&params);
        }
        // Where the weights are kept: copying them out to a flat buffer
        // and back cost a miner four passes over them a window.
        let mut steps = opt.begin_step(grads, grad_scale)?;
        for var in &self.params.vars {
            let mut updated = Ok(());
            var.inplace_op1(&InPlace::new(|values: &mut [f32]| {
                updated = steps.update(values);
            }))?;
            updated?;
        }
        Ok(())
    }

    /// BLAKE3 of the weights: the window's "known hash" of this stage,
    /// [`super::digest`] of [`StageModel::params_flat`], read where they are
    /// kept.
    pub fn weights_digest(&self) -> Result<blake3::Hash, ModelError> {
        let mut hasher = blake3::Hasher::new();
        for var in &self.params.vars {
            with_f32(var, |values| super::hash_f32(&mut hasher, values))?;
        }
        Ok(hasher.finalize())
    }

    fn check_tokens(&self, ids: &Tensor) -> Result<(), ModelError> {
        match ids.dims() {
            &[_, t] if t <= self.config.block_size => Ok(()),
            dims => Err(ModelError::Shape {
                what: "token ids",
                expected: format!("(B, T <= {})", self.config.block_size),
                got: dims.to_vec(),
            }),
        }
    }

    fn check_activations(&self, acts: &Tensor, ids: &Tensor) -> Result<(), ModelError> {
        self.check_tokens(ids)?;
        if acts.dims().get(..2) != Some(ids.dims()) {
            return Err(ModelError::Shape {
                what: "input activations",
                expected: format!("(B, T, _) with (B, T) = {:?} as the token ids", ids.dims()),
                got: acts.dims().to_vec(),
            });
        }
        match acts.dims() {
            &[_, t, c] if t <= self.config.block_size && c == self.config.boundary_width() => {
                Ok(())
            }
            dims => Err(ModelError::Shape {
                what: "input activations",
                expected: format!(
                    "(B, T <= {}, {})",
                    self.config.block_size,
                    self.config.boundary_width()
                ),
                got: dims.to_vec(),
            }),
        }
    }
}

pub(crate) fn check_flat_len(got: usize, want: usize) -> Result<(), ModelError> {
    match got == want {
        true => Ok(()),
        false => Err(ModelError::FlatLength { got, want }),
    }
}

/// A candle in-place op that hands a contiguous `f32` host tensor's values
/// to a closure, once: how [`StageModel::optimizer_step`] updates each
/// weight where it is kept.
struct InPlace<F>(RefCell<F>);

impl<F: FnMut(&mut [f32])> InPlace<F> {
    fn new(update: F) -> InPlace<F> {
        InPlace(RefCell::new(update))
    }
}

impl<F: FnMut(&mut [f32])> InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        "in-place f32 update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(values), Some((start, end))) => {
                (self.0.borrow_mut())(&mut values[start..end]);
                Ok(())
            }
            _ => candle_core::bail!("an in-place update of a tensor that is not contiguous f32"),
        }
    }
}
