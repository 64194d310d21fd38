//! The GPT's layers, written out on candle tensors as nanoGPT's model.py.
//!
//! The linear layer, causal self-attention, LayerNorm, GELU and the
//! cross-entropy are our fused ops (`ops`), their products gemm's with our
//! own depth chunks (`matmul`); the embeddings and residual additions are
//! candle's. All linear layers are
//! bias-free (nanoGPT's `bias = False`) and keep weights as `(in, out)`, so
//! a layer is `x @ W` with no transpose.

use candle_core::{Tensor, Var};

use super::ops::{attention, cross_entropy, gelu, layer_norm, linear};
use super::params::{Init, ParamSet};
use super::{GptConfig, ModelError};

/// nanoGPT's initial weight spread.
const INIT_STD: f64 = 0.02;

/// Token and position embeddings (stage 0 only). Not tied to the LM head:
/// the head lives on the last stage, and a tied weight would need its
/// gradient merged across stages every window.
#[derive(Debug)]
pub(crate) struct Embeddings {
    wte: Var,
    wpe: Var,
}

impl Embeddings {
    pub(crate) fn new(params: &mut ParamSet, cfg: &GptConfig) -> Result<Self, ModelError> {
        Self::named(params, cfg, "")
    }

    /// Embeddings whose parameter names start with `prefix`.
    fn named(params: &mut ParamSet, cfg: &GptConfig, prefix: &str) -> Result<Self, ModelError> {
        let c = cfg.n_embd;
        Ok(Embeddings {
            wte: params.add(
                format!("{prefix}wte.weight"),
                &[cfg.vocab_size, c],
                Init::Normal(INIT_STD),
            )?,
            wpe: params.add(
                format!("{prefix}wpe.weight"),
                &[cfg.block_size, c],
                Init::Normal(INIT_STD),
            )?,
        })
    }

    /// `ids: (B, T)` u32 -> `(B, T, n_embd)`.
    pub(crate) fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let c = self.wte.dim(1)?;
        let tok = self
            .wte
            .embedding(&ids.flatten_all()?)?
            .reshape((b, t, c))?;
        tok.broadcast_add(&self.wpe.narrow(0, 0, t)?)
    }
}

/// A pre-LayerNorm transformer block: causal self-attention, then a GELU
/// MLP four times as wide, each added to the residual stream.
#[derive(Debug)]
pub(crate) struct Block {
    ln_1: Var,
    c_attn: Var,
    attn_proj: Var,
    ln_2: Var,
    c_fc: Var,
    mlp_proj: Var,
    n_head: usize,
}

impl Block {
    /// Block `index` (global, counted over the whole model).
    pub(crate) fn new(
        params: &mut ParamSet,
        index: usize,
        cfg: &GptConfig,
    ) -> Result<Self, ModelError> {
        let c = cfg.n_embd;
        // GPT-2: residual projections start smaller so the stream's variance
        // does not grow with depth.
        let proj_std = INIT_STD / (2.0 * cfg.n_layer as f64).sqrt();
        let mut add = |name: &str, shape: &[usize], init| {
            params.add(format!("h.{index}.{name}"), shape, init)
        };
        Ok(Block {
            ln_1: add("ln_1.weight", &[c], Init::Ones)?,
            c_attn: add("attn.c_attn.weight", &[c, 3 * c], Init::Normal(INIT_STD))?,
            attn_proj: add("attn.c_proj.weight", &[c, c], Init::Normal(proj_std))?,
            ln_2: add("ln_2.weight", &[c], Init::Ones)?,
            c_fc: add("mlp.c_fc.weight", &[c, 4 * c], Init::Normal(INIT_STD))?,
            mlp_proj: add("mlp.c_proj.weight", &[4 * c, c], Init::Normal(proj_std))?,
            n_head: cfg.n_head,
        })
    }

    /// `x: (B, T, C)` -> `(B, T, C)`.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attention(&layer_norm(x, &self.ln_1)?)?)?;
        let h = gelu(&linear(&layer_norm(&x, &self.ln_2)?, &self.c_fc)?)?;
        x + linear(&h, &self.mlp_proj)?
    }

    fn attention(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = attention(&linear(x, &self.c_attn)?, self.n_head)?;
        linear(&y, &self.attn_proj)
    }
}

/// Final LayerNorm, LM head and cross-entropy (last stage only).
#[derive(Debug)]
pub(crate) struct Head {
    ln_f: Var,
    lm_head: Var,
}

impl Head {
    pub(crate) fn new(params: &mut ParamSet, cfg: &GptConfig) -> Result<Self, ModelError> {
        let c = cfg.n_embd;
        Ok(Head {
            ln_f: params.add("ln_f.weight".into(), &[c], Init::Ones)?,
            lm_head: params.add(
                "lm_head.weight".into(),
                &[c, cfg.vocab_size],
                Init::Normal(INIT_STD),
            )?,
        })
    }

    /// Logits `(B, T, vocab_size)` of `x: (B, T, C)`.
    pub(crate) fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear(&layer_norm(x, &self.ln_f)?, &self.lm_head)
    }

    /// Mean cross-entropy of `x: (B, T, C)` against `targets: (B, T)` u32.
    pub(crate) fn loss(&self, x: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
        let logits = self.logits(x)?;
        cross_entropy(&logits.flatten_to(1)?, &targets.flatten_all()?)
    }
}

/// The sending half of a stage boundary's bottleneck: LayerNorm, then a
/// projection of the residual stream `n_embd -> b`. Its output, the code,
/// is all that crosses the boundary. The LayerNorm makes the code's scale
/// independent of how the stream grew over the stage's blocks, as `ln_f`
/// does for the LM head.
#[derive(Debug)]
pub(crate) struct BottleneckDown {
    ln: Var,
    down: Var,
}

impl BottleneckDown {
    /// The bottleneck at the end of stage `stage` (the boundary between
    /// stages `stage` and `stage + 1`).
    pub(crate) fn new(
        params: &mut ParamSet,
        stage: usize,
        cfg: &GptConfig,
        width: usize,
    ) -> Result<Self, ModelError> {
        let c = cfg.n_embd;
        Ok(BottleneckDown {
            ln: params.add(format!("boundary.{stage}.ln.weight"), &[c], Init::Ones)?,
            down: params.add(
                format!("boundary.{stage}.down.weight"),
                &[c, width],
                Init::Normal(INIT_STD),
            )?,
        })
    }

    /// `x: (B, T, n_embd)` -> code `(B, T, b)`.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear(&layer_norm(x, &self.ln)?, &self.down)
    }
}

/// The receiving half: the code projected back to the residual stream
/// `b -> n_embd`, plus the receiver's own token and position embeddings of
/// the microbatch's tokens, which every miner derives from the microbatch
/// id and so cost no byte on the wire. Side information: the code then
/// spends none of its few numbers on which token it is, only on what the
/// sender's blocks made of its context. The stage's blocks continue from
/// there as if the stream had crossed whole.
#[derive(Debug)]
pub(crate) struct BottleneckUp {
    up: Var,
    embeddings: Embeddings,
}

impl BottleneckUp {
    /// The bottleneck at the start of stage `stage + 1`, the partner of
    /// [`BottleneckDown::new`] with the same `stage`.
    pub(crate) fn new(
        params: &mut ParamSet,
        stage: usize,
        cfg: &GptConfig,
        width: usize,
    ) -> Result<Self, ModelError> {
        Ok(BottleneckUp {
            up: params.add(
                format!("boundary.{stage}.up.weight"),
                &[width, cfg.n_embd],
                Init::Normal(INIT_STD),
            )?,
            embeddings: Embeddings::named(params, cfg, &format!("boundary.{stage}."))?,
        })
    }

    /// Code `(B, T, b)` and token ids `(B, T)` -> `(B, T, n_embd)`.
    pub(crate) fn forward(&self, code: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
        linear(code, &self.up)? + self.embeddings.forward(ids)?
    }
}
