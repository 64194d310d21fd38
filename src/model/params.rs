//! Parameters: their names, shapes, place in the flat buffer, and initial
//! values.

use std::ops::Range;

use candle_core::{DType, Device, Tensor, Var};

use super::ModelError;
use crate::data::rng::SplitMix64;

/// One parameter tensor of a stage and its slice of the stage's flat
/// buffers (`params_flat`, `grads_flat`, AdamW's moments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Global name, as nanoGPT's (`h.3.attn.c_attn.weight`), so a name means
    /// the same tensor whatever the stage split.
    pub name: String,
    pub shape: Vec<usize>,
    /// Start in the stage's flat buffer.
    pub offset: usize,
    /// Whether AdamW decays it: matrices and embeddings yes, LayerNorm
    /// gains no (nanoGPT's rule: decay every tensor of rank >= 2).
    pub decay: bool,
}

impl ParamInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel()
    }
}

/// How a parameter starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    /// N(0, std^2), nanoGPT's 0.02 (scaled down for residual projections).
    Normal(f64),
    /// LayerNorm gains.
    Ones,
}

/// Initial values of parameter `name`: a function of `(seed, name)` alone,
/// so a block gets the same weights whichever stage holds it and 1, 2 and 4
/// stage splits of one model start equal.
pub(crate) fn init_values(seed: u64, name: &str, numel: usize, init: Init) -> Vec<f32> {
    match init {
        Init::Ones => vec![1.0; numel],
        Init::Normal(std) => {
            let hash = blake3::hash(name.as_bytes());
            let mut key = [0u8; 8];
            key.copy_from_slice(&hash.as_bytes()[..8]);
            let mut rng = SplitMix64::new(seed, u64::from_le_bytes(key));
            (0..numel).map(|_| (rng.normal() * std) as f32).collect()
        }
    }
}

/// A stage's parameters in flat-buffer order, as candle `Var`s.
#[derive(Debug)]
pub(crate) struct ParamSet {
    pub(crate) infos: Vec<ParamInfo>,
    pub(crate) vars: Vec<Var>,
    seed: u64,
    dtype: DType,
}

impl ParamSet {
    pub(crate) fn new(seed: u64, dtype: DType) -> ParamSet {
        ParamSet {
            infos: Vec::new(),
            vars: Vec::new(),
            seed,
            dtype,
        }
    }

    /// Appends parameter `name` and returns its `Var` (a shared handle: the
    /// layer that keeps it sees updates made through the set).
    pub(crate) fn add(
        &mut self,
        name: String,
        shape: &[usize],
        init: Init,
    ) -> Result<Var, ModelError> {
        let numel = shape.iter().product();
        let values = init_values(self.seed, &name, numel, init);
        let tensor = Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(self.dtype)?;
        let var = Var::from_tensor(&tensor)?;
        self.infos.push(ParamInfo {
            name,
            shape: shape.to_vec(),
            offset: self.numel(),
            decay: shape.len() >= 2,
        });
        self.vars.push(var.clone());
        Ok(var)
    }

    pub(crate) fn numel(&self) -> usize {
        self.infos.last().map_or(0, |p| p.range().end)
    }

    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }
}
