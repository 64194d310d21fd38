//! Matmul FLOP/s of this machine as candle reaches it on the CPU in f32:
//! the ceiling `bench train` measures a model's FLOP/s against, in the same
//! run, because a shared machine's speed drifts between runs.
//!
//! Threads: candle's matmul (gemm) takes its thread count from
//! `RAYON_NUM_THREADS` at every call, else from the number of physical
//! cores; `CANDLE_NUM_THREADS` sizes only candle's elementwise pool, fixed
//! at its first use. So a process's matmuls use every core unless
//! `RAYON_NUM_THREADS` says otherwise, and an honest one-thread figure
//! comes from a process started with `RAYON_NUM_THREADS=1`. Without
//! `RAYON_NUM_THREADS`, candle counts the physical cores by reading
//! `/proc/cpuinfo` at every matmul (some 25 us on the development VM):
//! small products show it, large ones do not. Figures here are taken with
//! the environment the process was given, as a training rank would run.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

/// One matrix product `(m, k) x (k, n)`, both operands contiguous, as the
/// model's linear layers multiply activations by weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gemm {
    pub label: String,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl Gemm {
    pub fn new(label: impl Into<String>, m: usize, k: usize, n: usize) -> Gemm {
        Gemm {
            label: label.into(),
            m,
            k,
            n,
        }
    }

    /// Two FLOPs (a multiply and an add) per term of every dot product.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.k as f64 * self.n as f64
    }
}

/// Square products from cache-sized to memory-sized: where gemm reaches
/// its peak whatever the model's shapes are.
pub fn squares() -> Vec<Gemm> {
    [256, 512, 1024]
        .into_iter()
        .map(|s| Gemm::new("square", s, s, s))
        .collect()
}

/// Each shape is repeated for at least this long and this many calls, so
/// that the best call shows the machine rather than a neighbour's burst.
const TIME_PER_SHAPE: Duration = Duration::from_millis(300);
const MIN_CALLS: usize = 3;

/// The best FLOP/s of one shape over repeated calls, after a warm-up call
/// (page faults, packing buffers, thread start-up).
pub fn flops_per_s(g: &Gemm) -> Result<f64, candle_core::Error> {
    let a = Tensor::ones((g.m, g.k), DType::F32, &Device::Cpu)?;
    let b = Tensor::ones((g.k, g.n), DType::F32, &Device::Cpu)?;
    std::hint::black_box(a.matmul(&b)?);
    let start = Instant::now();
    let mut best = Duration::MAX;
    let mut calls = 0;
    while calls < MIN_CALLS || start.elapsed() < TIME_PER_SHAPE {
        let t = Instant::now();
        std::hint::black_box(a.matmul(&b)?);
        best = best.min(t.elapsed());
        calls += 1;
    }
    Ok(g.flops() / best.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_product_counts_two_flops_per_multiply_add() {
        assert_eq!(Gemm::new("x", 2, 3, 4).flops(), 48.0);
    }

    #[test]
    fn a_small_product_measures_a_positive_finite_rate() {
        let rate = flops_per_s(&Gemm::new("tiny", 8, 8, 8)).unwrap();
        assert!(rate.is_finite() && rate > 0.0, "{rate}");
    }
}
