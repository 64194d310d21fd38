//! AdamW with linear warmup and cosine decay, on flat `f32` buffers.
//!
//! Pure Rust, one element at a time in a fixed order, so every miner of a
//! stage that applies the same merged gradient gets bit-identical weights
//! (the window's weights hash depends on it).

use std::ops::Range;

use super::params::ParamInfo;
use super::stage::check_flat_len;
use super::ModelError;

/// Hyper-parameters; the defaults are nanoGPT's shakespeare-char ones.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    /// Peak learning rate, reached at the end of warmup.
    pub lr: f64,
    /// Floor of the cosine decay, and the rate after `decay_steps`.
    pub min_lr: f64,
    pub warmup_steps: u64,
    /// Step at which the cosine reaches `min_lr`.
    pub decay_steps: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to parameters with `decay` set.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            decay_steps: 5000,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

impl AdamWConfig {
    /// Learning rate of step `step` (0-based), as nanoGPT's `get_lr`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        if step >= self.decay_steps {
            return self.min_lr;
        }
        let ratio =
            (step - self.warmup_steps) as f64 / (self.decay_steps - self.warmup_steps) as f64;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + coeff * (self.lr - self.min_lr)
    }
}

/// AdamW state for one stage: the moments, the step count, and which
/// slices decay.
#[derive(Debug, Clone)]
pub struct AdamW {
    config: AdamWConfig,
    step: u64,
    m: Vec<f32>,
    v: Vec<f32>,
    /// Flat-buffer ranges with their decay flag, covering the buffer.
    segments: Vec<(Range<usize>, bool)>,
}

impl AdamW {
    /// State for a stage whose flat buffer is laid out as `layout`.
    pub fn new(config: AdamWConfig, layout: &[ParamInfo]) -> AdamW {
        let segments: Vec<_> = layout.iter().map(|p| (p.range(), p.decay)).collect();
        let n = segments.last().map_or(0, |(r, _)| r.end);
        AdamW {
            config,
            step: 0,
            m: vec![0.0; n],
            v: vec![0.0; n],
            segments,
        }
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Steps taken so far; the next step uses `lr_at(steps_taken())`.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One update of `params` with gradient `grads * grad_scale` (pass
    /// `1 / microbatches` to turn a summed gradient into a mean), as
    /// PyTorch's `AdamW` with bias correction.
    pub fn step(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        grad_scale: f32,
    ) -> Result<(), ModelError> {
        check_flat_len(params.len(), self.m.len())?;
        check_flat_len(grads.len(), self.m.len())?;
        let c = &self.config;
        let lr = c.lr_at(self.step);
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let step_size = (lr / (1.0 - c.beta1.powi(t))) as f32;
        let inv_sqrt_bc2 = (1.0 / (1.0 - c.beta2.powi(t)).sqrt()) as f32;
        let eps = c.eps as f32;
        for (range, decay) in &self.segments {
            let keep = if *decay {
                (1.0 - lr * c.weight_decay) as f32
            } else {
                1.0
            };
            let r = range.clone();
            let moments = self.m[r.clone()].iter_mut().zip(&mut self.v[r.clone()]);
            for ((p, &g), (m, v)) in params[r.clone()].iter_mut().zip(&grads[r]).zip(moments) {
                let g = g * grad_scale;
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *p = *p * keep - step_size * *m / (v.sqrt() * inv_sqrt_bc2 + eps);
            }
        }
        Ok(())
    }
}
