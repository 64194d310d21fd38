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

    /// The first and second moments, flat in the stage's layout order: with
    /// [`AdamW::steps_taken`], all of the state a checkpoint must keep for a
    /// resumed run to take the same steps as an uninterrupted one.
    pub fn moments(&self) -> (&[f32], &[f32]) {
        (&self.m, &self.v)
    }

    /// BLAKE3 of the state a checkpoint keeps (step count, first and
    /// second moments): what the miners of a stage agree on after each
    /// step, so a validator can tell a checkpoint's optimizer state from a
    /// forged one.
    pub fn state_digest(&self) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.step.to_le_bytes());
        super::hash_f32(&mut hasher, &self.m);
        super::hash_f32(&mut hasher, &self.v);
        hasher.finalize()
    }

    /// Puts back state read from a checkpoint: `step` steps taken and the
    /// moments `m`, `v`, which must match the stage's flat length.
    pub fn restore(&mut self, step: u64, m: &[f32], v: &[f32]) -> Result<(), ModelError> {
        check_flat_len(m.len(), self.m.len())?;
        check_flat_len(v.len(), self.v.len())?;
        self.step = step;
        self.m.copy_from_slice(m);
        self.v.copy_from_slice(v);
        Ok(())
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
        let ranges: Vec<Range<usize>> = self.segments.iter().map(|(r, _)| r.clone()).collect();
        let mut steps = self.begin_step(grads, grad_scale)?;
        for range in ranges {
            steps.update(&mut params[range])?;
        }
        Ok(())
    }

    /// Starts one update with gradient `grads * grad_scale`, as
    /// [`AdamW::step`], for a stage whose parameters are not one flat
    /// buffer: the returned [`SegmentSteps`] updates them one segment at a
    /// time, in layout order, wherever each is kept.
    pub fn begin_step<'a>(
        &'a mut self,
        grads: &'a [f32],
        grad_scale: f32,
    ) -> Result<SegmentSteps<'a>, ModelError> {
        check_flat_len(grads.len(), self.m.len())?;
        let c = &self.config;
        let lr = c.lr_at(self.step);
        self.step += 1;
        let t = self.step as i32;
        Ok(SegmentSteps {
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            step_size: (lr / (1.0 - c.beta1.powi(t))) as f32,
            inv_sqrt_bc2: (1.0 / (1.0 - c.beta2.powi(t)).sqrt()) as f32,
            eps: c.eps as f32,
            decayed: (1.0 - lr * c.weight_decay) as f32,
            grad_scale,
            grads,
            m: &mut self.m,
            v: &mut self.v,
            segments: &self.segments,
            next: 0,
        })
    }
}

/// One AdamW update under way, segment by segment ([`AdamW::begin_step`]).
pub struct SegmentSteps<'a> {
    b1: f32,
    b2: f32,
    step_size: f32,
    inv_sqrt_bc2: f32,
    eps: f32,
    /// What a decaying parameter is multiplied by before its step.
    decayed: f32,
    grad_scale: f32,
    grads: &'a [f32],
    m: &'a mut [f32],
    v: &'a mut [f32],
    segments: &'a [(Range<usize>, bool)],
    next: usize,
}

impl SegmentSteps<'_> {
    /// Updates the next segment's `params`, which must be as long as the
    /// segment (past the last segment: none).
    pub fn update(&mut self, params: &mut [f32]) -> Result<(), ModelError> {
        let (range, decay) = self.segments.get(self.next).cloned().unwrap_or_default();
        check_flat_len(params.len(), range.len())?;
        self.next += 1;
        let keep = if decay { self.decayed } else { 1.0 };
        let (b1, b2, grad_scale) = (self.b1, self.b2, self.grad_scale);
        let (step_size, inv_sqrt_bc2, eps) = (self.step_size, self.inv_sqrt_bc2, self.eps);
        let r = range.clone();
        let moments = self.m[r.clone()].iter_mut().zip(&mut self.v[r.clone()]);
        for ((p, &g), (m, v)) in params.iter_mut().zip(&self.grads[r]).zip(moments) {
            let g = g * grad_scale;
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p = *p * keep - step_size * *m / (v.sqrt() * inv_sqrt_bc2 + eps);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Vec<ParamInfo> {
        let info = |name: &str, shape: Vec<usize>, offset| ParamInfo {
            name: name.into(),
            decay: shape.len() >= 2,
            shape,
            offset,
        };
        vec![info("w", vec![2, 2], 0), info("gain", vec![2], 4)]
    }

    #[test]
    fn schedule_warms_up_linearly_then_follows_the_cosine_to_min_lr() {
        let c = AdamWConfig {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 9,
            decay_steps: 109,
            ..AdamWConfig::default()
        };
        assert_eq!(c.lr_at(0), 0.1);
        assert_eq!(c.lr_at(9), 1.0);
        assert!((c.lr_at(59) - 0.55).abs() < 1e-12);
        assert_eq!(c.lr_at(109), 0.1);
        assert_eq!(c.lr_at(10_000), 0.1);
        assert!((10..109).all(|s| c.lr_at(s) < c.lr_at(s - 1)));
    }

    #[test]
    fn first_step_moves_each_weight_by_lr_against_its_gradient_sign_and_decays_matrices() {
        let c = AdamWConfig {
            lr: 0.01,
            warmup_steps: 0,
            weight_decay: 0.5,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(c, &layout());
        let mut p = vec![1.0f32; 6];
        let g = [2.0, -4.0, 0.5, -0.5, 3.0, -3.0];
        // The gradient is scaled by 0.5 first; Adam's first step is
        // lr * m / sqrt(v) = lr * sign(g) after bias correction.
        opt.step(&mut p, &g, 0.5).unwrap();
        for (i, (&p, &g)) in p.iter().zip(&g).enumerate() {
            let keep = if i < 4 { 1.0 - 0.01 * 0.5 } else { 1.0 };
            let expected = keep - 0.01 * g.signum();
            assert!((p - expected).abs() < 1e-6, "{i}: {p} vs {expected}");
        }
        assert_eq!(opt.steps_taken(), 1);
        assert!(matches!(
            opt.step(&mut [0.0; 5], &g, 1.0),
            Err(ModelError::FlatLength { got: 5, want: 6 })
        ));
    }

    #[test]
    fn a_restored_optimizer_takes_the_same_next_step_as_the_original() {
        let mut opt = AdamW::new(AdamWConfig::default(), &layout());
        let mut p = vec![0.5f32; 6];
        let g = [0.3, -0.2, 0.1, 0.7, -0.4, 0.9];
        opt.step(&mut p, &g, 1.0).unwrap();
        opt.step(&mut p, &g, 1.0).unwrap();

        let mut restored = AdamW::new(AdamWConfig::default(), &layout());
        let (m, v) = opt.moments();
        restored.restore(opt.steps_taken(), m, v).unwrap();
        let mut q = p.clone();
        opt.step(&mut p, &g, 1.0).unwrap();
        restored.step(&mut q, &g, 1.0).unwrap();
        assert_eq!(p, q);
        assert_eq!(restored.moments(), opt.moments());
        assert!(matches!(
            restored.restore(1, &[0.0; 6], &[0.0; 7]),
            Err(ModelError::FlatLength { got: 7, want: 6 })
        ));
    }
}
